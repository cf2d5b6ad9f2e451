// SPDX-License-Identifier: MIT
/*
 * Stats sources: the table of functions through which subsystems hand
 * their own figures to a registry's reports. Entry points:
 * kv_registry_add_stats(), kv_registry_remove_stats() and
 * kv_registry_stats_foreach(), through which a report takes its snapshot
 * of them; kv_stats_table_validate() checks the table.
 *
 * One mutex guards the table, and a source's fn is called with it
 * released, so that fn may take its time and may query the registry.
 * While a call is in progress the source's `calls` is non-zero; removal
 * marks the source `going`, so that no new call starts, and waits on
 * `idle` until `calls` is back to zero: once it returns no call of fn is
 * running or can start, and the owner may free ctx. A thread-local list of
 * the tables whose fn or visitor the thread is inside turns what would
 * wait for itself (a fn removing its own source) or recurse (a fn writing
 * a report of its registry) into -EDEADLK.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <kv/taxonomy.h>

#include "kv-private.h"
#include "taxonomy-impl.h"

struct source {
	uint64_t id;    /* 0: the slot is free */
	kv_stats_fn fn;
	void *ctx;
	uint32_t calls; /* calls of fn, each with its visit, in progress */
	bool going;     /* being removed: no new call starts */
	char name[KV_STAT_NAME_MAX + 1];
};

struct kv_stats_table {
	pthread_mutex_t lock;
	pthread_cond_t idle; /* a going source's calls dropped to zero */
	uint64_t next_id;
	uint32_t n;          /* slots in use, going ones included */
	struct source src[KV_STATS_SOURCES_MAX];
};

/* The tables whose fn or visitor this thread is running, innermost first:
 * a fn of one registry may write a report of another. */
struct in_call {
	const struct kv_stats_table *t;
	struct in_call *up;
};

static _Thread_local struct in_call *tls_in_call;

static bool inside(const struct kv_stats_table *t)
{
	for (const struct in_call *c = tls_in_call; c; c = c->up)
		if (c->t == t)
			return true;
	return false;
}

/* The length of name when it is 1..KV_STAT_NAME_MAX bytes of [a-z0-9_],
 * or for a source name of [a-z0-9_.-]; else 0. These are the characters
 * that need no escaping in any report format, nor in a file name. */
static size_t name_len(const char *name, bool source)
{
	size_t n;

	if (!name)
		return 0;
	for (n = 0; name[n]; n++) {
		char c = name[n];

		if (n == KV_STAT_NAME_MAX)
			return 0;
		if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' ||
		      (source && (c == '.' || c == '-'))))
			return 0;
	}
	return n;
}

int kv_stats_table_create(struct kv_stats_table **out)
{
	struct kv_stats_table *t = calloc(1, sizeof(*t));

	if (!t)
		return kv_fail(ENOMEM, "no memory for a stats source table");
	pthread_mutex_init(&t->lock, NULL);
	pthread_cond_init(&t->idle, NULL);
	t->next_id = 1;
	*out = t;
	return 0;
}

void kv_stats_table_destroy(struct kv_stats_table *t)
{
	if (!t)
		return;
	pthread_cond_destroy(&t->idle);
	pthread_mutex_destroy(&t->lock);
	free(t);
}

/* The live source with handle id, not being removed; lock held. */
static struct source *find(struct kv_stats_table *t, uint64_t id)
{
	if (id == 0)
		return NULL;
	for (size_t i = 0; i < KV_STATS_SOURCES_MAX; i++)
		if (t->src[i].id == id && !t->src[i].going)
			return &t->src[i];
	return NULL;
}

int kv_registry_add_stats(struct kv_registry *reg, const char *source, kv_stats_fn fn,
			  void *ctx, uint64_t *id)
{
	struct kv_stats_table *t;
	struct source *slot = NULL;
	bool taken = false;
	size_t len;

	if (!reg || !fn || !id)
		return kv_fail(EINVAL, "kv_registry_add_stats: NULL %s",
			       !reg ? "registry" : !fn ? "fn" : "id");
	len = name_len(source, true);
	if (!len)
		return kv_fail(EINVAL, "registry '%s': stats source name '%.*s%s' is not 1..%d "
			       "characters of [a-z0-9_.-]", kv_registry_name(reg),
			       KV_STAT_NAME_MAX, source ? source : "(null)",
			       source && strlen(source) > KV_STAT_NAME_MAX ? "..." : "",
			       KV_STAT_NAME_MAX);
	t = kv_registry_stats_table(reg);
	if (inside(t))
		return kv_fail(EDEADLK, "registry '%s': stats source '%s' added from a stats "
			       "fn or visitor of the same registry", kv_registry_name(reg), source);

	pthread_mutex_lock(&t->lock);
	for (size_t i = 0; i < KV_STATS_SOURCES_MAX && !taken; i++) {
		struct source *s = &t->src[i];

		if (!s->id)
			slot = slot ? slot : s;
		else
			taken = strcmp(s->name, source) == 0;
	}
	if (!taken && slot) {
		memcpy(slot->name, source, len + 1);
		slot->fn = fn;
		slot->ctx = ctx;
		slot->id = t->next_id++;
		t->n++;
		*id = slot->id;
	}
	pthread_mutex_unlock(&t->lock);

	/* Failures are reported after unlocking: kv_fail() may call the log
	 * sink, which must not run under the table's lock. */
	if (taken)
		return kv_fail(EEXIST, "registry '%s': a stats source named '%s' exists already",
			       kv_registry_name(reg), source);
	if (!slot)
		return kv_fail(ENOSPC, "registry '%s': %d stats sources already, adding '%s'",
			       kv_registry_name(reg), KV_STATS_SOURCES_MAX, source);
	return 0;
}

int kv_registry_remove_stats(struct kv_registry *reg, uint64_t id)
{
	struct kv_stats_table *t;
	struct source *s;

	if (!reg)
		return kv_fail(EINVAL, "kv_registry_remove_stats: NULL registry");
	t = kv_registry_stats_table(reg);
	if (inside(t))
		return kv_fail(EDEADLK, "registry '%s': stats source %" PRIu64 " removed from a "
			       "stats fn or visitor of the same registry, which would wait for "
			       "itself", kv_registry_name(reg), id);

	pthread_mutex_lock(&t->lock);
	s = find(t, id);
	if (s) {
		s->going = true;
		while (s->calls)
			pthread_cond_wait(&t->idle, &t->lock);
		memset(s, 0, sizeof(*s));
		t->n--;
	}
	pthread_mutex_unlock(&t->lock);
	if (!s)
		return kv_fail(ENOENT, "registry '%s': no stats source with id %" PRIu64
			       " (never added, or removed already)", kv_registry_name(reg), id);
	return 0;
}

/* Check what a source's fn returned: n stats following the rules of
 * struct kv_stat, or -errno. Returns n, or the error (setting the detail
 * when the result broke the rules). */
static int check_result(const struct kv_registry *reg, const char *source,
			const struct kv_stat *st, int got)
{
	if (got < 0)
		return got >= -4095 ? got
				    : kv_fail(EINVAL, "registry '%s': stats source '%s' returned "
					      "%d, not a negative errno", kv_registry_name(reg),
					      source, got);
	if (got > KV_STATS_MAX)
		return kv_fail(EINVAL, "registry '%s': stats source '%s' returned %d stats, "
			       "room for %d", kv_registry_name(reg), source, got, KV_STATS_MAX);
	for (int i = 0; i < got; i++) {
		const struct kv_stat *x = &st[i];

		if (!name_len(x->name, false))
			return kv_fail(EINVAL, "registry '%s': stats source '%s': stat %d is named "
				       "'%.*s', not 1..%d characters of [a-z0-9_]",
				       kv_registry_name(reg), source, i, KV_STAT_NAME_MAX,
				       x->name ? x->name : "(null)", KV_STAT_NAME_MAX);
		if ((unsigned)x->type > KV_STAT_COUNTER)
			return kv_fail(EINVAL, "registry '%s': stats source '%s': stat '%s' has "
				       "type %u, neither gauge nor counter", kv_registry_name(reg),
				       source, x->name, (unsigned)x->type);
		if (x->help) {
			size_t hl = strnlen(x->help, KV_STAT_HELP_MAX + 1);

			if (hl > KV_STAT_HELP_MAX || memchr(x->help, '\n', hl))
				return kv_fail(EINVAL, "registry '%s': stats source '%s': help of "
					       "stat '%s' is not one line of at most %d bytes",
					       kv_registry_name(reg), source, x->name,
					       KV_STAT_HELP_MAX);
		}
		/* Quadratic, but bounded by KV_STATS_MAX and cheap next to fn. */
		for (int j = 0; j < i; j++)
			if (strcmp(st[j].name, x->name) == 0)
				return kv_fail(EINVAL, "registry '%s': stats source '%s': stat '%s' "
					       "appears twice", kv_registry_name(reg), source,
					       x->name);
	}
	return got;
}

struct pending {
	uint64_t id;
	char name[KV_STAT_NAME_MAX + 1];
};

static int pending_cmp(const void *a, const void *b)
{
	return strcmp(((const struct pending *)a)->name, ((const struct pending *)b)->name);
}

int kv_registry_stats_foreach(const struct kv_registry *reg, kv_stats_visit_fn visit,
			      void *cbctx)
{
	struct kv_stats_table *t;
	struct pending *todo;
	struct kv_stat *buf;
	char saved[KV_DETAIL_MAX];
	size_t n_todo = 0;
	int rc = 0;

	if (!reg || !visit)
		return kv_fail(EINVAL, "kv_registry_stats_foreach: NULL %s",
			       !reg ? "registry" : "visit");
	t = kv_registry_stats_table(reg);
	if (inside(t))
		return kv_fail(EDEADLK, "registry '%s': stats read from a stats fn or visitor "
			       "of the same registry", kv_registry_name(reg));
	/* About 9 KiB together: too much for the stack of a small thread. */
	todo = malloc(KV_STATS_SOURCES_MAX * sizeof(*todo));
	buf = malloc(KV_STATS_MAX * sizeof(*buf));
	if (!todo || !buf) {
		free(todo);
		free(buf);
		return kv_fail(ENOMEM, "registry '%s': no memory to read the stats sources",
			       kv_registry_name(reg));
	}
	snprintf(saved, sizeof(saved), "%s", kv_last_error());

	/* The list is taken once and sorted, so that every reader sees the
	 * sources in one order; each is then looked up again by id, as it may
	 * have been removed in the meantime. */
	pthread_mutex_lock(&t->lock);
	for (size_t i = 0; i < KV_STATS_SOURCES_MAX; i++) {
		if (!t->src[i].id || t->src[i].going)
			continue;
		todo[n_todo].id = t->src[i].id;
		memcpy(todo[n_todo++].name, t->src[i].name, sizeof(t->src[i].name));
	}
	pthread_mutex_unlock(&t->lock);
	qsort(todo, n_todo, sizeof(*todo), pending_cmp);

	for (size_t k = 0; k < n_todo && rc == 0; k++) {
		struct in_call me = { t, tls_in_call };
		struct source *s;
		kv_stats_fn fn = NULL;
		void *ctx = NULL;
		int got;

		pthread_mutex_lock(&t->lock);
		s = find(t, todo[k].id);
		if (s) {
			s->calls++;
			fn = s->fn;
			ctx = s->ctx;
		}
		pthread_mutex_unlock(&t->lock);
		if (!s)
			continue;

		tls_in_call = &me;
		/* A zeroed array: fields fn leaves alone read as 0 and NULL. */
		memset(buf, 0, KV_STATS_MAX * sizeof(*buf));
		kv_clear_error();
		got = check_result(reg, todo[k].name, buf, fn(ctx, buf, KV_STATS_MAX));
		rc = got < 0 ? visit(cbctx, todo[k].name, NULL, 0, got)
			     : visit(cbctx, todo[k].name, buf, (size_t)got, 0);
		tls_in_call = me.up;

		pthread_mutex_lock(&t->lock);
		if (--s->calls == 0 && s->going)
			pthread_cond_broadcast(&t->idle);
		pthread_mutex_unlock(&t->lock);
	}
	free(todo);
	free(buf);
	if (rc == 0)
		kv_set_error(saved);
	return rc;
}

int kv_stats_table_validate(struct kv_stats_table *t)
{
	char why[160] = "";
	uint32_t used = 0;

	pthread_mutex_lock(&t->lock);
	for (size_t i = 0; i < KV_STATS_SOURCES_MAX && !why[0]; i++) {
		const struct source *s = &t->src[i];

		if (!s->id) {
			if (s->fn || s->ctx || s->calls || s->going || s->name[0])
				snprintf(why, sizeof(why), "free slot %zu is not clear", i);
			continue;
		}
		used++;
		if (s->id >= t->next_id || !s->fn || !name_len(s->name, true))
			snprintf(why, sizeof(why), "slot %zu (id %" PRIu64 "): bad id, fn or name",
				 i, s->id);
		for (size_t j = 0; j < i && !why[0]; j++)
			if (t->src[j].id == s->id || (t->src[j].id &&
						      strcmp(t->src[j].name, s->name) == 0))
				snprintf(why, sizeof(why), "slots %zu and %zu share an id or a name",
					 j, i);
	}
	if (!why[0] && used != t->n)
		snprintf(why, sizeof(why), "%u slots in use, counter says %u", used, t->n);
	pthread_mutex_unlock(&t->lock);
	return why[0] ? kv_fail(EFAULT, "stats sources: %s", why) : 0;
}
