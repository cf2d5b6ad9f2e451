// SPDX-License-Identifier: MIT
/*
 * The registry: every allocation libkv hands out is a record here, with
 * its bytes, tier, node, kind, policy and label. Entry points:
 * kv_registry_record/move/resize/forget and the queries below them.
 *
 * Layout. Records live in slots owned by lock shards; a thread records
 * into "its" shard (picked once per thread, round robin), so threads on
 * different shards never share a lock. A handle is (generation, shard,
 * slot index): a stale handle is detected because a freed slot's
 * generation moves on. Per shard, under its lock, plain counters hold
 * bytes and records per (tier, node, kind); the (tier, kind) totals and
 * their high-water marks, and the per-label totals, are process-wide
 * atomics because a peak is a property of the sum over all shards.
 * kv_registry_validate() recounts everything from the live slots. The
 * registry's stats sources are a table of their own, kept by stats.c.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>

#include <kv/taxonomy.h>

#include "kv-private.h"
#include "taxonomy-impl.h"

#define SLOT_BITS 24
#define SLOT_MASK ((UINT32_C(1) << SLOT_BITS) - 1)
#define SHARD_MAX 256
#define CHUNK_SLOTS 1024u
#define DEFAULT_SHARDS 16
#define DEFAULT_LABELS 4096
#define LABELS_MAX (1u << 20)

struct slot {
	uint64_t bytes;
	uint64_t created_ns;
	uint64_t moved_ns;
	uint32_t policy;
	uint32_t label;     /* label id; 0 is "" */
	uint32_t gen;       /* odd while live, even while free (wraps) */
	uint32_t next_free; /* index + 1 of the next free slot, 0 ends */
	uint32_t moves;
	uint8_t tier;
	uint8_t kind;
	uint8_t node;
};

/* Counters of one shard, written under its lock, read lock-free by
 * queries (hence relaxed atomics: plain loads and stores on x86). */
struct shard_counts {
	_Atomic uint64_t bytes[KV_TIER_COUNT][KV_NODE_MAX][KV_KIND_COUNT];
	_Atomic uint64_t records[KV_TIER_COUNT][KV_NODE_MAX][KV_KIND_COUNT];
};

struct shard {
	pthread_mutex_t lock;
	struct slot **chunks; /* (n_chunks, CHUNK_SLOTS) */
	uint32_t n_chunks;
	uint32_t used;        /* slots ever handed out: [0, used) exist */
	uint32_t free_head;   /* index + 1, 0 = none */
	uint32_t live;
	_Atomic uint64_t ops[4];   /* record, move, resize, forget */
	/* Bytes this shard has charged to the shared (tier, kind) counters
	 * beyond what its records hold: see charge(). */
	uint64_t stock[KV_TIER_COUNT][KV_KIND_COUNT];
	struct shard_counts *counts;
} __attribute__((aligned(64)));

/* A (tier, kind) cell: `charged` is the live bytes plus every shard's
 * stock (see charge()); `peak` is the highest `charged` seen. */
struct cell {
	_Atomic uint64_t charged;
	_Atomic uint64_t peak;
} __attribute__((aligned(64)));

struct label {
	char *name;
	uint64_t hash;
	_Atomic uint64_t bytes;
	_Atomic uint64_t records;
	_Atomic uint64_t peak;
} __attribute__((aligned(64))); /* labels of different threads: no false sharing */

struct kv_registry {
	char *name;
	uint64_t numa_nodes;
	uint32_t n_shards;
	uint64_t peak_batch;
	bool is_default;

	struct cell cells[KV_TIER_COUNT][KV_KIND_COUNT];

	/* Labels: an append-only table plus an open-addressing index of
	 * (id + 1), read lock-free; inserts take labels_lock. */
	pthread_mutex_t labels_lock;
	struct label *labels;      /* (max_labels) */
	uint32_t max_labels;
	_Atomic uint32_t n_labels;
	_Atomic uint32_t *index;   /* (index_mask + 1) */
	uint32_t index_mask;

	struct shard *shards;      /* (n_shards) */

	struct kv_stats_table *stats; /* stats.c */
};

enum { OP_RECORD, OP_MOVE, OP_RESIZE, OP_FORGET };

#define RELAXED memory_order_relaxed

/* ---- Small helpers ---------------------------------------------------- */

static inline void counter_add(_Atomic uint64_t *c, uint64_t v)
{
	/* Only ever written under the owning shard's lock: no RMW needed. */
	atomic_store_explicit(c, atomic_load_explicit(c, RELAXED) + v, RELAXED);
}

static inline void counter_sub(_Atomic uint64_t *c, uint64_t v)
{
	atomic_store_explicit(c, atomic_load_explicit(c, RELAXED) - v, RELAXED);
}

static inline void peak_raise(_Atomic uint64_t *peak, uint64_t now)
{
	uint64_t p = atomic_load_explicit(peak, RELAXED);

	while (now > p &&
	       !atomic_compare_exchange_weak_explicit(peak, &p, now, RELAXED, RELAXED))
		;
}

static inline void shared_add(_Atomic uint64_t *c, _Atomic uint64_t *peak, uint64_t v)
{
	uint64_t now = atomic_fetch_add_explicit(c, v, RELAXED) + v;

	if (peak)
		peak_raise(peak, now);
}

static inline kv_handle make_handle(uint32_t gen, uint32_t shard, uint32_t idx)
{
	return ((uint64_t)gen << 32) | ((uint64_t)shard << SLOT_BITS) | idx;
}

static inline struct slot *slot_at(const struct shard *s, uint32_t idx)
{
	return &s->chunks[idx / CHUNK_SLOTS][idx % CHUNK_SLOTS];
}

static uint32_t thread_shard_seq(void)
{
	static atomic_uint next_seq;
	static _Thread_local uint32_t seq;

	if (KV_UNLIKELY(seq == 0))
		seq = atomic_fetch_add_explicit(&next_seq, 1, RELAXED) + 1;
	return seq;
}

/* Check (tier, node) for a record. DRAM nodes must exist in the registry's
 * node mask; other tiers take any index below KV_NODE_MAX. */
static int check_place(const struct kv_registry *reg, int tier, int node)
{
	if ((unsigned)tier >= KV_TIER_COUNT)
		return kv_fail(EINVAL, "registry '%s': tier %d out of range (0..%d)",
			       reg->name, tier, KV_TIER_COUNT - 1);
	if (node < 0 || node >= KV_NODE_MAX)
		return kv_fail(EINVAL, "tier '%s' node %d: out of range (0..%d)",
			       kv_tier_name((enum kv_tier)tier), node, KV_NODE_MAX - 1);
	if (tier == KV_TIER_DRAM && !(reg->numa_nodes & (UINT64_C(1) << node)))
		return kv_fail(EINVAL, "tier 'dram' node %d: no such NUMA node (machine has %d)",
			       node, __builtin_popcountll(reg->numa_nodes));
	return 0;
}

/* ---- Labels ----------------------------------------------------------- */

static uint32_t label_find(const struct kv_registry *reg, const char *name,
			   size_t len, uint64_t hash, uint32_t *pos_out)
{
	uint32_t pos = (uint32_t)hash & reg->index_mask;

	for (;;) {
		uint32_t e = atomic_load_explicit(&reg->index[pos], memory_order_acquire);

		if (e == 0) {
			if (pos_out)
				*pos_out = pos;
			return UINT32_MAX;
		}
		const struct label *l = &reg->labels[e - 1];
		if (l->hash == hash && strncmp(l->name, name, len) == 0 && l->name[len] == '\0')
			return e - 1;
		pos = (pos + 1) & reg->index_mask;
	}
}

/* The id of label `name`, inserting it if new. */
static int label_get(struct kv_registry *reg, const char *name, uint32_t *id)
{
	size_t len;
	uint64_t hash;
	uint32_t found, pos, n;

	if (!name || !*name) {
		*id = 0;
		return 0;
	}
	len = strnlen(name, KV_LABEL_MAX + 1);
	if (len > KV_LABEL_MAX)
		return kv_fail(EINVAL, "registry '%s': label '%.32s...' longer than %d bytes",
			       reg->name, name, KV_LABEL_MAX);
	hash = XXH3_64bits(name, len);
	found = label_find(reg, name, len, hash, NULL);
	if (KV_LIKELY(found != UINT32_MAX)) {
		*id = found;
		return 0;
	}

	pthread_mutex_lock(&reg->labels_lock);
	found = label_find(reg, name, len, hash, &pos);
	if (found != UINT32_MAX) {
		pthread_mutex_unlock(&reg->labels_lock);
		*id = found;
		return 0;
	}
	n = atomic_load_explicit(&reg->n_labels, RELAXED);
	if (n >= reg->max_labels) {
		pthread_mutex_unlock(&reg->labels_lock);
		return kv_fail(ENOSPC, "registry '%s': label table full (%u labels) adding '%s'",
			       reg->name, reg->max_labels - 1, name);
	}
	char *copy = malloc(len + 1);
	if (!copy) {
		pthread_mutex_unlock(&reg->labels_lock);
		return kv_fail(ENOMEM, "registry '%s': no memory for label '%s'", reg->name, name);
	}
	memcpy(copy, name, len + 1);
	reg->labels[n].name = copy;
	reg->labels[n].hash = hash;
	atomic_store_explicit(&reg->n_labels, n + 1, memory_order_release);
	atomic_store_explicit(&reg->index[pos], n + 1, memory_order_release);
	pthread_mutex_unlock(&reg->labels_lock);
	*id = n;
	return 0;
}

/* ---- Create / destroy ------------------------------------------------- */

/* Zeroed memory aligned to a cache line, for the structs above that must
 * not share one (calloc only promises 16 bytes). */
static void *zalloc_lines(size_t n, size_t size)
{
	size_t bytes;
	void *p;

	if (size && n > SIZE_MAX / size)
		return NULL;
	bytes = (n * size + 63) & ~(size_t)63;
	p = aligned_alloc(64, bytes ? bytes : 64);
	if (p)
		memset(p, 0, bytes);
	return p;
}

void kv_registry_config_default(struct kv_registry_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->max_labels = DEFAULT_LABELS;
	cfg->shards = DEFAULT_SHARDS;
	cfg->name = "libkv";
	cfg->peak_batch = 1u << 20;
}

static void registry_free(struct kv_registry *reg)
{
	if (!reg)
		return;
	if (reg->shards) {
		for (uint32_t i = 0; i < reg->n_shards; i++) {
			struct shard *s = &reg->shards[i];

			for (uint32_t c = 0; c < s->n_chunks; c++)
				free(s->chunks[c]);
			free(s->chunks);
			free(s->counts);
			pthread_mutex_destroy(&s->lock);
		}
		free(reg->shards);
	}
	if (reg->labels) {
		uint32_t n = atomic_load_explicit(&reg->n_labels, RELAXED);

		for (uint32_t i = 1; i < n; i++)
			free(reg->labels[i].name);
		free(reg->labels);
	}
	free((void *)reg->index);
	kv_stats_table_destroy(reg->stats);
	pthread_mutex_destroy(&reg->labels_lock);
	free(reg->name);
	free(reg);
}

int kv_registry_create(const struct kv_registry_config *cfg, struct kv_registry **out)
{
	struct kv_registry_config def;
	struct kv_registry *reg;
	uint32_t index_size = 1;

	if (!out)
		return kv_fail(EINVAL, "kv_registry_create: NULL out");
	if (!cfg) {
		kv_registry_config_default(&def);
		cfg = &def;
	}
	const char *name = cfg->name && *cfg->name ? cfg->name : "libkv";
	uint32_t shards = cfg->shards ? cfg->shards : DEFAULT_SHARDS;
	uint32_t max_labels = cfg->max_labels ? cfg->max_labels : DEFAULT_LABELS;
	if (shards > SHARD_MAX)
		return kv_fail(EINVAL, "registry '%s': %u shards, at most %d", name, shards, SHARD_MAX);
	if (max_labels > LABELS_MAX)
		return kv_fail(EINVAL, "registry '%s': %u labels, at most %u", name,
			       max_labels, LABELS_MAX);
	if (strlen(name) > KV_LABEL_MAX)
		return kv_fail(EINVAL, "registry name longer than %d bytes", KV_LABEL_MAX);

	reg = zalloc_lines(1, sizeof(*reg));
	if (!reg)
		return kv_fail(ENOMEM, "registry '%s': no memory", name);
	pthread_mutex_init(&reg->labels_lock, NULL);
	reg->name = strdup(name);
	reg->numa_nodes = cfg->numa_nodes ? cfg->numa_nodes : kv_numa_nodes();
	reg->n_shards = shards;
	reg->peak_batch = cfg->peak_batch;
	reg->max_labels = max_labels + 1; /* id 0 is the empty label */
	while (index_size < 2 * reg->max_labels)
		index_size <<= 1;
	reg->index_mask = index_size - 1;
	reg->index = calloc(index_size, sizeof(*reg->index));
	reg->labels = zalloc_lines(reg->max_labels, sizeof(*reg->labels));
	reg->shards = zalloc_lines(shards, sizeof(*reg->shards));
	if (reg->shards) /* before any failure path: registry_free destroys them */
		for (uint32_t i = 0; i < shards; i++)
			pthread_mutex_init(&reg->shards[i].lock, NULL);
	if (!reg->name || !reg->index || !reg->labels || !reg->shards) {
		registry_free(reg);
		return kv_fail(ENOMEM, "registry '%s': no memory", name);
	}
	reg->labels[0].name = (char *)"";
	atomic_store(&reg->n_labels, 1);
	for (uint32_t i = 0; i < shards; i++) {
		reg->shards[i].counts = zalloc_lines(1, sizeof(struct shard_counts));
		if (!reg->shards[i].counts) {
			registry_free(reg);
			return kv_fail(ENOMEM, "registry '%s': no memory", name);
		}
	}
	if (kv_stats_table_create(&reg->stats) < 0) {
		registry_free(reg);
		return kv_fail(ENOMEM, "registry '%s': no memory", name);
	}
	*out = reg;
	return 0;
}

static void lock_all(const struct kv_registry *reg)
{
	for (uint32_t i = 0; i < reg->n_shards; i++)
		pthread_mutex_lock(&reg->shards[i].lock);
}

static void unlock_all(const struct kv_registry *reg)
{
	for (uint32_t i = reg->n_shards; i-- > 0;)
		pthread_mutex_unlock(&reg->shards[i].lock);
}

/* Iterate the live slots of one shard (lock held by the caller). */
static int shard_foreach(const struct kv_registry *reg, uint32_t si,
			 int (*fn)(const struct kv_record *, void *), void *ctx)
{
	const struct shard *s = &reg->shards[si];

	for (uint32_t i = 0; i < s->used; i++) {
		const struct slot *sl = slot_at(s, i);
		struct kv_record rec;
		int rc;

		if (!(sl->gen & 1))
			continue;
		rec.handle = make_handle(sl->gen, si, i);
		rec.bytes = sl->bytes;
		rec.tier = (enum kv_tier)sl->tier;
		rec.node = sl->node;
		rec.kind = (enum kv_kind)sl->kind;
		rec.policy = sl->policy;
		rec.label = reg->labels[sl->label].name;
		rec.moves = sl->moves;
		rec.created_ns = sl->created_ns;
		rec.moved_ns = sl->moved_ns;
		rc = fn(&rec, ctx);
		if (rc)
			return rc;
	}
	return 0;
}

struct leak_ctx {
	const struct kv_registry *reg;
	uint64_t n, bytes;
	char first[192];
};

#define LEAK_LOG_LINES 64

static int leak_visit(const struct kv_record *r, void *p)
{
	struct leak_ctx *lc = p;
	char b[32];

	kv_format_bytes(r->bytes, b, sizeof(b));
	if (lc->n == 0)
		snprintf(lc->first, sizeof(lc->first), "'%s' %s %s node %d %s", r->label,
			 kv_kind_name(r->kind), kv_tier_name(r->tier), r->node, b);
	if (lc->n < LEAK_LOG_LINES)
		kv_log(KV_LOG_WARN, "registry '%s' leak: label '%s' kind %s tier %s node %d bytes %" PRIu64 " (%s)",
		       lc->reg->name, r->label, kv_kind_name(r->kind), kv_tier_name(r->tier),
		       r->node, r->bytes, b);
	lc->n++;
	lc->bytes += r->bytes;
	return 0;
}

int kv_registry_destroy(struct kv_registry *reg, unsigned flags)
{
	struct leak_ctx lc = { .reg = reg };
	char b[32];

	if (!reg)
		return 0;
	if (reg->is_default)
		return kv_fail(EPERM, "the default registry cannot be destroyed");
	if (flags & ~KV_REGISTRY_FORCE)
		return kv_fail(EINVAL, "registry '%s': unknown destroy flags 0x%x", reg->name, flags);

	lock_all(reg);
	for (uint32_t i = 0; i < reg->n_shards; i++)
		shard_foreach(reg, i, leak_visit, &lc);
	unlock_all(reg);
	if (lc.n > LEAK_LOG_LINES)
		kv_log(KV_LOG_WARN, "registry '%s' leak: ... and %" PRIu64 " more records",
		       reg->name, lc.n - LEAK_LOG_LINES);
	if (lc.n && !(flags & KV_REGISTRY_FORCE))
		return kv_fail(EBUSY, "registry '%s': %" PRIu64 " records still live (%s), first %s",
			       reg->name, lc.n, kv_format_bytes(lc.bytes, b, sizeof(b)), lc.first);
	registry_free(reg);
	return 0;
}

static pthread_once_t default_once = PTHREAD_ONCE_INIT;
static struct kv_registry *default_reg;
static char default_err[256];

static void default_create(void)
{
	struct kv_registry_config cfg;

	kv_registry_config_default(&cfg);
	if (kv_registry_create(&cfg, &default_reg) == 0)
		default_reg->is_default = true;
	else
		snprintf(default_err, sizeof(default_err), "%s", kv_last_error());
}

struct kv_registry *kv_registry_default(void)
{
	pthread_once(&default_once, default_create);
	if (!default_reg)
		kv_fail(ENOMEM, "default registry: %s", default_err);
	return default_reg;
}

const char *kv_registry_name(const struct kv_registry *reg)
{
	return reg ? reg->name : NULL;
}

struct kv_stats_table *kv_registry_stats_table(const struct kv_registry *reg)
{
	return reg->stats;
}

/* ---- Mutations -------------------------------------------------------- */

/* Locate a live slot for h and lock its shard. Returns NULL (with the
 * detail set, nothing locked) for an unknown or stale handle. */
static struct slot *lookup_lock(const struct kv_registry *reg, kv_handle h,
				struct shard **shard_out, const char *op)
{
	uint32_t gen = (uint32_t)(h >> 32);
	uint32_t si = (uint32_t)(h >> SLOT_BITS) & 0xff;
	uint32_t idx = (uint32_t)h & SLOT_MASK;
	struct shard *s;
	struct slot *sl;

	if (!reg) {
		kv_fail(EINVAL, "%s: NULL registry", op);
		return NULL;
	}
	if (!(gen & 1) || si >= reg->n_shards) {
		kv_fail(ENOENT, "registry '%s': %s of unknown handle 0x%" PRIx64, reg->name, op, h);
		return NULL;
	}
	s = &reg->shards[si];
	pthread_mutex_lock(&s->lock);
	if (idx >= s->used || (sl = slot_at(s, idx))->gen != gen) {
		pthread_mutex_unlock(&s->lock);
		kv_fail(ENOENT, "registry '%s': %s of unknown or stale handle 0x%" PRIx64,
			reg->name, op, h);
		return NULL;
	}
	*shard_out = s;
	return sl;
}

/* Charge b bytes of (tier, kind) to the shared counter. Like the kernel's
 * memory cgroup charging, a shard keeps bytes freed by its records as a
 * stock of at most peak_batch and takes new records from it first, so
 * threads recording and freeing in their own shards rarely write a shared
 * cache line. The shared counter only rises when a stock ran out, and
 * then it equals the live bytes plus the other shards' stocks: a peak is
 * exact with one shard in use, and at most peak_batch too high per other
 * shard in use. peak_batch 0 is exact always. */
static inline void charge(struct kv_registry *reg, struct shard *s, int t, int k, uint64_t b)
{
	struct cell *c = &reg->cells[t][k];
	uint64_t need;

	if (s->stock[t][k] >= b) {
		s->stock[t][k] -= b;
		return;
	}
	need = b - s->stock[t][k];
	s->stock[t][k] = 0;
	shared_add(&c->charged, &c->peak, need);
}

static inline void uncharge(struct kv_registry *reg, struct shard *s, int t, int k, uint64_t b)
{
	s->stock[t][k] += b;
	if (s->stock[t][k] > reg->peak_batch) {
		uint64_t excess = s->stock[t][k] - reg->peak_batch;

		s->stock[t][k] = reg->peak_batch;
		atomic_fetch_sub_explicit(&reg->cells[t][k].charged, excess, RELAXED);
	}
}

/* Add (sign > 0) or remove the slot's bytes from every counter. Called
 * with the slot's shard locked. */
static inline void account(struct kv_registry *reg, struct shard *s,
			   const struct slot *sl, int sign)
{
	struct label *l = &reg->labels[sl->label];
	_Atomic uint64_t *nb = &s->counts->bytes[sl->tier][sl->node][sl->kind];
	_Atomic uint64_t *nr = &s->counts->records[sl->tier][sl->node][sl->kind];

	if (sign > 0) {
		counter_add(nb, sl->bytes);
		counter_add(nr, 1);
		charge(reg, s, sl->tier, sl->kind, sl->bytes);
		shared_add(&l->bytes, &l->peak, sl->bytes);
		atomic_fetch_add_explicit(&l->records, 1, RELAXED);
	} else {
		counter_sub(nb, sl->bytes);
		counter_sub(nr, 1);
		uncharge(reg, s, sl->tier, sl->kind, sl->bytes);
		atomic_fetch_sub_explicit(&l->bytes, sl->bytes, RELAXED);
		atomic_fetch_sub_explicit(&l->records, 1, RELAXED);
	}
}

/* A free slot index in s, growing the chunk table when needed. */
static int slot_alloc(struct kv_registry *reg, struct shard *s, uint32_t *idx)
{
	if (s->free_head) {
		*idx = s->free_head - 1;
		s->free_head = slot_at(s, *idx)->next_free;
		return 0;
	}
	if (s->used == s->n_chunks * CHUNK_SLOTS) {
		if ((uint64_t)s->used + CHUNK_SLOTS > (uint64_t)SLOT_MASK + 1)
			return kv_fail(ENOSPC, "registry '%s': shard full (%u records)",
				       reg->name, s->used);
		struct slot **chunks = realloc(s->chunks, (s->n_chunks + 1) * sizeof(*chunks));
		if (!chunks)
			return kv_fail(ENOMEM, "registry '%s': no memory for record table", reg->name);
		s->chunks = chunks;
		chunks[s->n_chunks] = calloc(CHUNK_SLOTS, sizeof(struct slot));
		if (!chunks[s->n_chunks])
			return kv_fail(ENOMEM, "registry '%s': no memory for records", reg->name);
		s->n_chunks++;
	}
	*idx = s->used++;
	return 0;
}

int kv_registry_record(struct kv_registry *reg, size_t bytes, enum kv_tier tier,
		       int node, enum kv_kind kind, uint32_t policy, const char *label,
		       kv_handle *out)
{
	uint32_t label_id = 0, si, idx = 0;
	struct shard *s;
	struct slot *sl;
	int rc;

	if (!reg || !out)
		return kv_fail(EINVAL, "kv_registry_record: NULL %s", reg ? "out" : "registry");
	rc = check_place(reg, (int)tier, node);
	if (rc)
		return rc;
	if ((unsigned)kind >= KV_KIND_COUNT)
		return kv_fail(EINVAL, "registry '%s': kind %d out of range (0..%d)", reg->name,
			       (int)kind, KV_KIND_COUNT - 1);
	if (policy & ~KV_POLICY_ALL)
		return kv_fail(EINVAL, "registry '%s': policy has unknown bits 0x%x", reg->name,
			       policy & ~KV_POLICY_ALL);
	rc = label_get(reg, label, &label_id);
	if (rc)
		return rc;

	/* A coarse clock (a vDSO read, no syscall): a record's age is for
	 * leak reports, not for timing. */
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);

	si = thread_shard_seq() % reg->n_shards;
	s = &reg->shards[si];
	pthread_mutex_lock(&s->lock);
	rc = slot_alloc(reg, s, &idx);
	if (rc) {
		pthread_mutex_unlock(&s->lock);
		return rc;
	}
	sl = slot_at(s, idx);
	sl->gen = (sl->gen + 1) | 1; /* odd: live */
	sl->bytes = bytes;
	sl->tier = (uint8_t)tier;
	sl->node = (uint8_t)node;
	sl->kind = (uint8_t)kind;
	sl->policy = policy;
	sl->label = label_id;
	sl->moves = 0;
	sl->moved_ns = 0;
	sl->created_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
	sl->next_free = 0;
	s->live++;
	account(reg, s, sl, +1);
	counter_add(&s->ops[OP_RECORD], 1);
	*out = make_handle(sl->gen, si, idx);
	pthread_mutex_unlock(&s->lock);
	return 0;
}

int kv_registry_move(struct kv_registry *reg, kv_handle h, enum kv_tier tier, int node)
{
	struct shard *s;
	struct slot *sl;
	int rc;

	if (!reg)
		return kv_fail(EINVAL, "kv_registry_move: NULL registry");
	rc = check_place(reg, (int)tier, node);
	if (rc)
		return rc;
	sl = lookup_lock(reg, h, &s, "move");
	if (!sl)
		return -ENOENT;
	if (sl->tier != (uint8_t)tier || sl->node != (uint8_t)node) {
		account(reg, s, sl, -1);
		sl->tier = (uint8_t)tier;
		sl->node = (uint8_t)node;
		sl->moves++;
		sl->moved_ns = kv_now_ns();
		account(reg, s, sl, +1);
		counter_add(&s->ops[OP_MOVE], 1);
	}
	pthread_mutex_unlock(&s->lock);
	return 0;
}

int kv_registry_resize(struct kv_registry *reg, kv_handle h, size_t bytes)
{
	struct shard *s;
	struct slot *sl = lookup_lock(reg, h, &s, "resize");

	if (!sl)
		return reg ? -ENOENT : -EINVAL;
	account(reg, s, sl, -1);
	sl->bytes = bytes;
	account(reg, s, sl, +1);
	counter_add(&s->ops[OP_RESIZE], 1);
	pthread_mutex_unlock(&s->lock);
	return 0;
}

int kv_registry_forget(struct kv_registry *reg, kv_handle h)
{
	struct shard *s;
	struct slot *sl = lookup_lock(reg, h, &s, "forget");

	if (!sl)
		return reg ? -ENOENT : -EINVAL;
	account(reg, s, sl, -1);
	sl->gen++; /* even: free; the next record makes it odd again */
	sl->next_free = s->free_head;
	s->free_head = (uint32_t)(h & SLOT_MASK) + 1;
	s->live--;
	counter_add(&s->ops[OP_FORGET], 1);
	pthread_mutex_unlock(&s->lock);
	return 0;
}

/* ---- Queries ---------------------------------------------------------- */

int kv_registry_get(const struct kv_registry *reg, kv_handle h, struct kv_record *out)
{
	struct shard *s;
	struct slot *sl;

	if (!out)
		return kv_fail(EINVAL, "kv_registry_get: NULL out");
	sl = lookup_lock(reg, h, &s, "get");
	if (!sl)
		return reg ? -ENOENT : -EINVAL;
	out->handle = h;
	out->bytes = sl->bytes;
	out->tier = (enum kv_tier)sl->tier;
	out->node = sl->node;
	out->kind = (enum kv_kind)sl->kind;
	out->policy = sl->policy;
	out->label = reg->labels[sl->label].name;
	out->moves = sl->moves;
	out->created_ns = sl->created_ns;
	out->moved_ns = sl->moved_ns;
	pthread_mutex_unlock(&s->lock);
	return 0;
}

/* Check a (tier, node, kind) query, each possibly KV_ANY, and give its
 * ranges as [lo, hi). */
static int query_range(const struct kv_registry *reg, int tier, int node, int kind,
		       int r[3][2], const char *op)
{
	const int lim[3] = { KV_TIER_COUNT, KV_NODE_MAX, KV_KIND_COUNT };
	const int v[3] = { tier, node, kind };
	static const char *const what[3] = { "tier", "node", "kind" };

	if (!reg)
		return kv_fail(EINVAL, "%s: NULL registry", op);
	for (int i = 0; i < 3; i++) {
		if (v[i] == KV_ANY) {
			r[i][0] = 0;
			r[i][1] = lim[i];
		} else if (v[i] < 0 || v[i] >= lim[i]) {
			return kv_fail(EINVAL, "%s: %s %d out of range (0..%d or KV_ANY)", op,
				       what[i], v[i], lim[i] - 1);
		} else {
			r[i][0] = v[i];
			r[i][1] = v[i] + 1;
		}
	}
	return 0;
}

static int sum_counts(const struct kv_registry *reg, int tier, int node, int kind,
		      uint64_t *out, bool records, const char *op)
{
	int r[3][2];
	uint64_t sum = 0;
	int rc = query_range(reg, tier, node, kind, r, op);

	if (rc)
		return rc;
	if (!out)
		return kv_fail(EINVAL, "%s: NULL out", op);
	for (uint32_t si = 0; si < reg->n_shards; si++) {
		const struct shard_counts *c = reg->shards[si].counts;

		for (int t = r[0][0]; t < r[0][1]; t++)
			for (int n = r[1][0]; n < r[1][1]; n++)
				for (int k = r[2][0]; k < r[2][1]; k++)
					sum += atomic_load_explicit(records ? &c->records[t][n][k]
									    : &c->bytes[t][n][k],
								    RELAXED);
	}
	*out = sum;
	return 0;
}

int kv_registry_bytes(const struct kv_registry *reg, int tier, int node, int kind,
		      uint64_t *out)
{
	return sum_counts(reg, tier, node, kind, out, false, "kv_registry_bytes");
}

int kv_registry_count(const struct kv_registry *reg, int tier, int node, int kind,
		      uint64_t *out)
{
	return sum_counts(reg, tier, node, kind, out, true, "kv_registry_count");
}

int kv_registry_peak(const struct kv_registry *reg, enum kv_tier tier, enum kv_kind kind,
		     uint64_t *out)
{
	int r[3][2];
	int rc = query_range(reg, (int)tier, 0, (int)kind, r, "kv_registry_peak");

	if (rc)
		return rc;
	if (tier == (enum kv_tier)KV_ANY || kind == (enum kv_kind)KV_ANY || !out)
		return kv_fail(EINVAL, "kv_registry_peak: tier and kind must be exact, out non-NULL");
	*out = atomic_load_explicit(&reg->cells[tier][kind].peak, RELAXED);
	return 0;
}

void kv_registry_reset_peaks(struct kv_registry *reg)
{
	uint32_t n;

	if (!reg)
		return;
	/* Under all locks so no update slips between the read and the store. */
	lock_all(reg);
	for (int t = 0; t < KV_TIER_COUNT; t++)
		for (int k = 0; k < KV_KIND_COUNT; k++)
			atomic_store(&reg->cells[t][k].peak, atomic_load(&reg->cells[t][k].charged));
	n = atomic_load(&reg->n_labels);
	for (uint32_t i = 0; i < n; i++)
		atomic_store(&reg->labels[i].peak, atomic_load(&reg->labels[i].bytes));
	unlock_all(reg);
}

static void holder_of(const struct kv_registry *reg, uint32_t id, struct kv_holder *h)
{
	const struct label *l = &reg->labels[id];

	h->label = l->name;
	h->bytes = atomic_load_explicit(&l->bytes, RELAXED);
	h->records = atomic_load_explicit(&l->records, RELAXED);
	h->peak = atomic_load_explicit(&l->peak, RELAXED);
}

int kv_registry_label(const struct kv_registry *reg, const char *label, struct kv_holder *out)
{
	uint32_t id;

	if (!reg || !label || !out)
		return kv_fail(EINVAL, "kv_registry_label: NULL argument");
	if (!*label) {
		id = 0;
	} else {
		size_t len = strnlen(label, KV_LABEL_MAX + 1);

		id = len > KV_LABEL_MAX ? UINT32_MAX
					: label_find(reg, label, len, XXH3_64bits(label, len), NULL);
		if (id == UINT32_MAX)
			return kv_fail(ENOENT, "registry '%s': no label '%.*s'", reg->name,
				       KV_LABEL_MAX, label);
	}
	holder_of(reg, id, out);
	return 0;
}

static bool holder_before(const struct kv_holder *a, const struct kv_holder *b)
{
	if (a->bytes != b->bytes)
		return a->bytes > b->bytes;
	return strcmp(a->label, b->label) < 0;
}

int kv_registry_top(const struct kv_registry *reg, struct kv_holder *out, size_t n,
		    size_t *n_out)
{
	size_t have = 0;
	uint32_t labels;

	if (!reg || !n_out || (n && !out))
		return kv_fail(EINVAL, "kv_registry_top: NULL argument");
	labels = atomic_load_explicit(&reg->n_labels, memory_order_acquire);
	/* Insertion into a sorted window of n: O(labels * n), fine for the
	 * few dozen holders a report shows. */
	for (uint32_t i = 0; i < labels && n; i++) {
		struct kv_holder h;
		size_t pos;

		holder_of(reg, i, &h);
		if (h.bytes == 0)
			continue;
		if (have == n && !holder_before(&h, &out[n - 1]))
			continue;
		pos = have < n ? have++ : n - 1;
		while (pos > 0 && holder_before(&h, &out[pos - 1])) {
			out[pos] = out[pos - 1];
			pos--;
		}
		out[pos] = h;
	}
	*n_out = have;
	return 0;
}

int kv_registry_foreach(const struct kv_registry *reg,
			int (*fn)(const struct kv_record *rec, void *ctx), void *ctx)
{
	if (!reg || !fn)
		return kv_fail(EINVAL, "kv_registry_foreach: NULL argument");
	for (uint32_t si = 0; si < reg->n_shards; si++) {
		struct shard *s = &reg->shards[si];
		int rc;

		pthread_mutex_lock(&s->lock);
		rc = shard_foreach(reg, si, fn, ctx);
		pthread_mutex_unlock(&s->lock);
		if (rc)
			return rc;
	}
	return 0;
}

void kv_registry_ops(const struct kv_registry *reg, struct kv_registry_ops *out)
{
	uint64_t sum[4] = { 0 };

	if (!reg || !out)
		return;
	for (uint32_t si = 0; si < reg->n_shards; si++)
		for (int op = 0; op < 4; op++)
			sum[op] += atomic_load_explicit(&reg->shards[si].ops[op], RELAXED);
	out->records = sum[OP_RECORD];
	out->moves = sum[OP_MOVE];
	out->resizes = sum[OP_RESIZE];
	out->forgets = sum[OP_FORGET];
}

/* ---- Validation ------------------------------------------------------- */

struct recount {
	uint64_t bytes[KV_TIER_COUNT][KV_NODE_MAX][KV_KIND_COUNT];
	uint64_t records[KV_TIER_COUNT][KV_NODE_MAX][KV_KIND_COUNT];
};

static int validate_shard(const struct kv_registry *reg, uint32_t si, struct recount *rc,
			  uint64_t *label_bytes, uint64_t *label_records)
{
	const struct shard *s = &reg->shards[si];
	uint32_t live = 0, free_count = 0, n_labels = atomic_load(&reg->n_labels);

	if (s->used > s->n_chunks * CHUNK_SLOTS)
		return kv_fail(EFAULT, "shard %u: %u slots used, only %u exist", si, s->used,
			       s->n_chunks * CHUNK_SLOTS);
	memset(rc, 0, sizeof(*rc));
	for (uint32_t i = 0; i < s->used; i++) {
		const struct slot *sl = slot_at(s, i);

		if (!(sl->gen & 1))
			continue;
		live++;
		if (sl->tier >= KV_TIER_COUNT || sl->kind >= KV_KIND_COUNT ||
		    sl->node >= KV_NODE_MAX || sl->label >= n_labels ||
		    (sl->policy & ~KV_POLICY_ALL))
			return kv_fail(EFAULT, "shard %u slot %u: field out of range", si, i);
		rc->bytes[sl->tier][sl->node][sl->kind] += sl->bytes;
		rc->records[sl->tier][sl->node][sl->kind]++;
		label_bytes[sl->label] += sl->bytes;
		label_records[sl->label]++;
	}
	if (live != s->live)
		return kv_fail(EFAULT, "shard %u: %u live slots, counter says %u", si, live, s->live);
	for (uint32_t f = s->free_head; f; f = slot_at(s, f - 1)->next_free) {
		if (f - 1 >= s->used)
			return kv_fail(EFAULT, "shard %u: free list points past the used slots", si);
		if (slot_at(s, f - 1)->gen & 1)
			return kv_fail(EFAULT, "shard %u: live slot %u on the free list", si, f - 1);
		if (++free_count > s->used - live)
			return kv_fail(EFAULT, "shard %u: free list longer than the free slots (cycle?)", si);
	}
	if (free_count != s->used - live)
		return kv_fail(EFAULT, "shard %u: %u free slots but %u on the free list", si,
			       s->used - live, free_count);
	for (int t = 0; t < KV_TIER_COUNT; t++)
		for (int n = 0; n < KV_NODE_MAX; n++)
			for (int k = 0; k < KV_KIND_COUNT; k++) {
				if (rc->bytes[t][n][k] != atomic_load(&s->counts->bytes[t][n][k]) ||
				    rc->records[t][n][k] != atomic_load(&s->counts->records[t][n][k]))
					return kv_fail(EFAULT,
						       "shard %u cell %s/%d/%s: counters disagree with records",
						       si, kv_tier_name((enum kv_tier)t), n,
						       kv_kind_name((enum kv_kind)k));
			}
	return 0;
}

int kv_registry_validate(const struct kv_registry *reg)
{
	uint64_t cell_bytes[KV_TIER_COUNT][KV_KIND_COUNT] = { { 0 } };
	uint64_t *label_bytes, *label_records;
	struct recount *rc;
	uint32_t n_labels;
	int err = 0;

	if (!reg)
		return kv_fail(EINVAL, "kv_registry_validate: NULL registry");
	rc = malloc(sizeof(*rc));
	label_bytes = calloc(reg->max_labels, sizeof(uint64_t));
	label_records = calloc(reg->max_labels, sizeof(uint64_t));
	if (!rc || !label_bytes || !label_records) {
		err = kv_fail(ENOMEM, "kv_registry_validate: no memory");
		goto out;
	}
	lock_all(reg);
	for (uint32_t si = 0; si < reg->n_shards && !err; si++) {
		err = validate_shard(reg, si, rc, label_bytes, label_records);
		for (int t = 0; t < KV_TIER_COUNT; t++)
			for (int n = 0; n < KV_NODE_MAX; n++)
				for (int k = 0; k < KV_KIND_COUNT; k++)
					cell_bytes[t][k] += rc->bytes[t][n][k];
	}
	for (int t = 0; t < KV_TIER_COUNT && !err; t++)
		for (int k = 0; k < KV_KIND_COUNT && !err; k++) {
			const struct cell *c = &reg->cells[t][k];
			uint64_t stock = 0;

			for (uint32_t si = 0; si < reg->n_shards; si++) {
				if (reg->shards[si].stock[t][k] > reg->peak_batch)
					err = kv_fail(EFAULT, "shard %u cell %s/%s: stock over the batch",
						      si, kv_tier_name((enum kv_tier)t),
						      kv_kind_name((enum kv_kind)k));
				stock += reg->shards[si].stock[t][k];
			}
			if (!err && atomic_load(&c->charged) != cell_bytes[t][k] + stock)
				err = kv_fail(EFAULT, "cell %s/%s: %" PRIu64 " bytes charged, records hold %"
					      PRIu64 " and stocks %" PRIu64,
					      kv_tier_name((enum kv_tier)t), kv_kind_name((enum kv_kind)k),
					      atomic_load(&c->charged), cell_bytes[t][k], stock);
			else if (!err && atomic_load(&c->peak) < atomic_load(&c->charged))
				err = kv_fail(EFAULT, "cell %s/%s: peak below charged bytes",
					      kv_tier_name((enum kv_tier)t), kv_kind_name((enum kv_kind)k));
		}
	n_labels = atomic_load(&reg->n_labels);
	for (uint32_t i = 0; i < n_labels && !err; i++) {
		const struct label *l = &reg->labels[i];

		if (atomic_load(&l->bytes) != label_bytes[i] ||
		    atomic_load(&l->records) != label_records[i])
			err = kv_fail(EFAULT, "label '%s': counters disagree with records", l->name);
		else if (atomic_load(&l->peak) < label_bytes[i])
			err = kv_fail(EFAULT, "label '%s': peak below live bytes", l->name);
		else if (i > 0 && label_find(reg, l->name, strlen(l->name), l->hash, NULL) != i)
			err = kv_fail(EFAULT, "label '%s': not found through the index", l->name);
	}
	unlock_all(reg);
	if (!err)
		err = kv_stats_table_validate(reg->stats);
out:
	free(rc);
	free(label_bytes);
	free(label_records);
	return err;
}
