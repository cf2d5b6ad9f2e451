// SPDX-License-Identifier: MIT
/*
 * Tests of the registry: record/move/resize/forget bookkeeping, queries
 * (cells, labels, top-N, peaks, foreach), bad input leaving nothing
 * behind, leak reports on destroy, and a seeded stress of 4 threads x
 * 1,000,000 operations checked against each thread's own bookkeeping,
 * with the validator run after every batch. Stats sources: bad input and
 * limits, results that break the rules, calls a fn may not make, removal
 * waiting for a call in progress, and add/remove churn against threads
 * writing reports, each context freed right after its removal.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#include "kvtest.h"

#define NODES_01 UINT64_C(0x3)

/* A registry allowing DRAM nodes 0 and 1 whatever the machine has; peaks
 * exact unless the test asks for batching. */
static struct kv_registry *make_reg_batch(uint64_t peak_batch)
{
	struct kv_registry_config cfg;
	struct kv_registry *reg = NULL;

	kv_registry_config_default(&cfg);
	cfg.numa_nodes = NODES_01;
	cfg.peak_batch = peak_batch;
	cfg.name = "test";
	kv_assert_ok(kv_registry_create(&cfg, &reg));
	return reg;
}

static struct kv_registry *make_reg(void)
{
	return make_reg_batch(0);
}

static uint64_t bytes_of(struct kv_registry *reg, int tier, int node, int kind)
{
	uint64_t v = ~0ull;

	kv_assert_ok(kv_registry_bytes(reg, tier, node, kind, &v));
	return v;
}

static uint64_t count_of(struct kv_registry *reg, int tier, int node, int kind)
{
	uint64_t v = ~0ull;

	kv_assert_ok(kv_registry_count(reg, tier, node, kind, &v));
	return v;
}

static void test_record_move_resize_forget(void **state)
{
	struct kv_registry *reg = make_reg();
	struct kv_record rec;
	kv_handle a, b;

	(void)state;
	kv_assert_ok(kv_registry_record(reg, 1000, KV_TIER_DRAM, 0, KV_KIND_KV,
					KV_POLICY_SPILLABLE, "cache", &a));
	kv_assert_ok(kv_registry_record(reg, 500, KV_TIER_DRAM, 1, KV_KIND_WEIGHTS,
					KV_POLICY_READONLY, "weights", &b));
	assert_true(a != KV_HANDLE_NONE && b != KV_HANDLE_NONE && a != b);
	assert_int_equal(bytes_of(reg, KV_TIER_DRAM, KV_ANY, KV_ANY), 1500);
	assert_int_equal(bytes_of(reg, KV_TIER_DRAM, 1, KV_ANY), 500);
	assert_int_equal(bytes_of(reg, KV_ANY, KV_ANY, KV_KIND_KV), 1000);
	assert_int_equal(count_of(reg, KV_ANY, KV_ANY, KV_ANY), 2);

	kv_assert_ok(kv_registry_get(reg, a, &rec));
	assert_int_equal(rec.bytes, 1000);
	assert_int_equal(rec.tier, KV_TIER_DRAM);
	assert_int_equal(rec.kind, KV_KIND_KV);
	assert_int_equal(rec.policy, KV_POLICY_SPILLABLE);
	assert_string_equal(rec.label, "cache");
	assert_int_equal(rec.moves, 0);
	assert_true(rec.created_ns > 0);

	/* Spill to SSD: DRAM drops, SSD gains, in one call. */
	kv_assert_ok(kv_registry_move(reg, a, KV_TIER_SSD, 0));
	assert_int_equal(bytes_of(reg, KV_TIER_DRAM, KV_ANY, KV_ANY), 500);
	assert_int_equal(bytes_of(reg, KV_TIER_SSD, 0, KV_KIND_KV), 1000);
	kv_assert_ok(kv_registry_get(reg, a, &rec));
	assert_int_equal(rec.moves, 1);
	assert_true(rec.moved_ns > 0);
	/* A move to where it already is is no move. */
	kv_assert_ok(kv_registry_move(reg, a, KV_TIER_SSD, 0));
	kv_assert_ok(kv_registry_get(reg, a, &rec));
	assert_int_equal(rec.moves, 1);

	kv_assert_ok(kv_registry_resize(reg, b, 4096));
	assert_int_equal(bytes_of(reg, KV_TIER_DRAM, 1, KV_KIND_WEIGHTS), 4096);

	struct kv_registry_ops ops;
	kv_registry_ops(reg, &ops);
	assert_int_equal(ops.records, 2);
	assert_int_equal(ops.moves, 1);
	assert_int_equal(ops.resizes, 1);
	assert_int_equal(ops.forgets, 0);

	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_registry_forget(reg, a));
	kv_assert_ok(kv_registry_forget(reg, b));
	assert_int_equal(bytes_of(reg, KV_ANY, KV_ANY, KV_ANY), 0);
	assert_int_equal(count_of(reg, KV_ANY, KV_ANY, KV_ANY), 0);
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

static void test_stale_and_unknown_handles(void **state)
{
	struct kv_registry *reg = make_reg();
	struct kv_record rec;
	uint64_t seed = 42;
	kv_handle a, c;

	(void)state;
	kv_assert_ok(kv_registry_record(reg, 64, KV_TIER_MMAP, 0, KV_KIND_WEIGHTS, 0, NULL, &a));
	kv_assert_ok(kv_registry_forget(reg, a));
	kv_assert_rc(kv_registry_forget(reg, a), -ENOENT);
	assert_non_null(strstr(kv_last_error(), "handle"));
	kv_assert_rc(kv_registry_move(reg, a, KV_TIER_DRAM, 0), -ENOENT);
	kv_assert_rc(kv_registry_resize(reg, a, 1), -ENOENT);
	kv_assert_rc(kv_registry_get(reg, a, &rec), -ENOENT);
	kv_assert_rc(kv_registry_forget(reg, KV_HANDLE_NONE), -ENOENT);

	/* The slot is reused, but the old handle stays dead. */
	kv_assert_ok(kv_registry_record(reg, 128, KV_TIER_MMAP, 0, KV_KIND_WEIGHTS, 0, NULL, &c));
	assert_true(c != a);
	kv_assert_rc(kv_registry_forget(reg, a), -ENOENT);
	assert_int_equal(bytes_of(reg, KV_ANY, KV_ANY, KV_ANY), 128);

	/* Random handles: never a crash, never a live record hit by chance
	 * except c itself. */
	for (int i = 0; i < 100000; i++) {
		kv_handle h = kv_test_rand(&seed);
		if (h == c)
			continue;
		assert_int_equal(kv_registry_forget(reg, h), -ENOENT);
	}
	kv_assert_ok(kv_registry_get(reg, c, &rec));
	assert_int_equal(rec.bytes, 128);
	kv_assert_ok(kv_registry_forget(reg, c));
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

static void test_bad_input_changes_nothing(void **state)
{
	struct kv_registry *reg = make_reg();
	kv_handle h = 12345, ok;
	char longlabel[KV_LABEL_MAX + 2];

	(void)state;
	kv_assert_ok(kv_registry_record(reg, 10, KV_TIER_DRAM, 0, KV_KIND_KV, 0, "x", &ok));
	kv_assert_rc(kv_registry_record(reg, 1, KV_TIER_DRAM, 3, KV_KIND_KV, 0, "x", &h), -EINVAL);
	assert_string_equal(kv_last_error(), "tier 'dram' node 3: no such NUMA node (machine has 2)");
	kv_assert_rc(kv_registry_record(reg, 1, (enum kv_tier)9, 0, KV_KIND_KV, 0, "x", &h), -EINVAL);
	kv_assert_rc(kv_registry_record(reg, 1, KV_TIER_SSD, KV_NODE_MAX, KV_KIND_KV, 0, "x", &h), -EINVAL);
	kv_assert_rc(kv_registry_record(reg, 1, KV_TIER_SSD, -1, KV_KIND_KV, 0, "x", &h), -EINVAL);
	kv_assert_rc(kv_registry_record(reg, 1, KV_TIER_SSD, 0, (enum kv_kind)6, 0, "x", &h), -EINVAL);
	kv_assert_rc(kv_registry_record(reg, 1, KV_TIER_SSD, 0, KV_KIND_KV, 1u << 30, "x", &h), -EINVAL);
	assert_non_null(strstr(kv_last_error(), "policy"));
	memset(longlabel, 'l', sizeof(longlabel) - 1);
	longlabel[sizeof(longlabel) - 1] = '\0';
	kv_assert_rc(kv_registry_record(reg, 1, KV_TIER_SSD, 0, KV_KIND_KV, 0, longlabel, &h), -EINVAL);
	kv_assert_rc(kv_registry_record(reg, 1, KV_TIER_SSD, 0, KV_KIND_KV, 0, "x", NULL), -EINVAL);
	kv_assert_rc(kv_registry_move(reg, ok, KV_TIER_DRAM, 5), -EINVAL);
	assert_int_equal(h, 12345);

	assert_int_equal(bytes_of(reg, KV_ANY, KV_ANY, KV_ANY), 10);
	assert_int_equal(count_of(reg, KV_ANY, KV_ANY, KV_ANY), 1);
	assert_int_equal(bytes_of(reg, KV_TIER_DRAM, 0, KV_KIND_KV), 10);
	struct kv_registry_ops ops;
	kv_registry_ops(reg, &ops);
	assert_int_equal(ops.records, 1);
	assert_int_equal(ops.moves, 0);

	uint64_t v;
	kv_assert_rc(kv_registry_bytes(reg, 7, KV_ANY, KV_ANY, &v), -EINVAL);
	kv_assert_rc(kv_registry_bytes(reg, KV_ANY, KV_NODE_MAX, KV_ANY, &v), -EINVAL);
	kv_assert_rc(kv_registry_bytes(reg, KV_ANY, KV_ANY, -2, &v), -EINVAL);
	kv_assert_rc(kv_registry_peak(reg, (enum kv_tier)KV_ANY, KV_KIND_KV, &v), -EINVAL);

	kv_assert_ok(kv_registry_forget(reg, ok));
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_registry_destroy(reg, 0));

	struct kv_registry_config cfg;
	struct kv_registry *bad = (struct kv_registry *)&cfg;
	kv_registry_config_default(&cfg);
	cfg.shards = 1000;
	kv_assert_rc(kv_registry_create(&cfg, &bad), -EINVAL);
	assert_ptr_equal(bad, (struct kv_registry *)&cfg);
	kv_assert_rc(kv_registry_create(NULL, NULL), -EINVAL);
}

static void test_label_table_full(void **state)
{
	struct kv_registry_config cfg;
	struct kv_registry *reg;
	kv_handle h[4];
	char name[16];

	(void)state;
	kv_registry_config_default(&cfg);
	cfg.max_labels = 3;
	kv_assert_ok(kv_registry_create(&cfg, &reg));
	for (int i = 0; i < 3; i++) {
		snprintf(name, sizeof(name), "l%d", i);
		kv_assert_ok(kv_registry_record(reg, 1, KV_TIER_SSD, 0, KV_KIND_KV, 0, name, &h[i]));
	}
	kv_assert_rc(kv_registry_record(reg, 1, KV_TIER_SSD, 0, KV_KIND_KV, 0, "l3", &h[3]), -ENOSPC);
	/* Known labels and the empty label still work. */
	kv_assert_ok(kv_registry_record(reg, 1, KV_TIER_SSD, 0, KV_KIND_KV, 0, "l1", &h[3]));
	kv_assert_ok(kv_registry_forget(reg, h[3]));
	kv_assert_ok(kv_registry_record(reg, 1, KV_TIER_SSD, 0, KV_KIND_KV, 0, NULL, &h[3]));
	for (int i = 0; i < 4; i++)
		kv_assert_ok(kv_registry_forget(reg, h[i]));
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

static void test_peaks_labels_top(void **state)
{
	struct kv_registry *reg = make_reg();
	struct kv_holder top[3], hl;
	kv_handle a, b, c, d;
	uint64_t peak;
	size_t n;

	(void)state;
	kv_assert_ok(kv_registry_record(reg, 100, KV_TIER_DRAM, 0, KV_KIND_KV, 0, "seq", &a));
	kv_assert_ok(kv_registry_record(reg, 200, KV_TIER_DRAM, 1, KV_KIND_KV, 0, "seq", &b));
	kv_assert_ok(kv_registry_record(reg, 50, KV_TIER_DRAM, 0, KV_KIND_WEIGHTS, 0, "w", &c));
	kv_assert_ok(kv_registry_record(reg, 70, KV_TIER_SSD, 0, KV_KIND_STAGING, 0, "io", &d));
	kv_assert_ok(kv_registry_peak(reg, KV_TIER_DRAM, KV_KIND_KV, &peak));
	assert_int_equal(peak, 300);
	kv_assert_ok(kv_registry_forget(reg, b));
	kv_assert_ok(kv_registry_peak(reg, KV_TIER_DRAM, KV_KIND_KV, &peak));
	assert_int_equal(peak, 300);
	kv_assert_ok(kv_registry_label(reg, "seq", &hl));
	assert_int_equal(hl.bytes, 100);
	assert_int_equal(hl.records, 1);
	assert_int_equal(hl.peak, 300);
	kv_assert_rc(kv_registry_label(reg, "nobody", &hl), -ENOENT);

	/* A move out of the cell lowers its bytes, not its peak; the move
	 * into SSD raises that cell's peak. */
	kv_assert_ok(kv_registry_move(reg, a, KV_TIER_SSD, 0));
	kv_assert_ok(kv_registry_peak(reg, KV_TIER_SSD, KV_KIND_KV, &peak));
	assert_int_equal(peak, 100);
	kv_registry_reset_peaks(reg);
	kv_assert_ok(kv_registry_peak(reg, KV_TIER_DRAM, KV_KIND_KV, &peak));
	assert_int_equal(peak, 0);
	kv_assert_ok(kv_registry_label(reg, "seq", &hl));
	assert_int_equal(hl.peak, 100);

	kv_assert_ok(kv_registry_top(reg, top, 3, &n));
	assert_int_equal(n, 3);
	assert_string_equal(top[0].label, "seq");
	assert_string_equal(top[1].label, "io");
	assert_string_equal(top[2].label, "w");
	kv_assert_ok(kv_registry_top(reg, top, 1, &n));
	assert_int_equal(n, 1);
	assert_string_equal(top[0].label, "seq");
	kv_assert_ok(kv_registry_top(reg, NULL, 0, &n));
	assert_int_equal(n, 0);

	kv_assert_ok(kv_registry_forget(reg, a));
	kv_assert_ok(kv_registry_forget(reg, c));
	kv_assert_ok(kv_registry_forget(reg, d));
	kv_assert_ok(kv_registry_top(reg, top, 3, &n));
	assert_int_equal(n, 0);
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* With batched charging the peak is still exact while one thread (one
 * shard) records, whatever the sizes. */
static void test_batched_peak_exact_one_thread(void **state)
{
	const uint64_t batch = 1u << 20;
	struct kv_registry *reg = make_reg_batch(batch);
	kv_handle h[64];
	uint64_t seed = 7, live = 0, true_peak = 0, peak;
	uint64_t sizes[64] = { 0 };

	(void)state;
	for (int round = 0; round < 2000; round++) {
		int i = (int)(kv_test_rand(&seed) % 64);

		if (sizes[i]) {
			kv_assert_ok(kv_registry_forget(reg, h[i]));
			live -= sizes[i];
			sizes[i] = 0;
		} else {
			sizes[i] = 1 + kv_test_rand(&seed) % (3u << 20);
			kv_assert_ok(kv_registry_record(reg, sizes[i], KV_TIER_DRAM, 0, KV_KIND_KV, 0,
							"b", &h[i]));
			live += sizes[i];
		}
		if (live > true_peak)
			true_peak = live;
		kv_assert_ok(kv_registry_peak(reg, KV_TIER_DRAM, KV_KIND_KV, &peak));
		assert_int_equal(peak, true_peak);
		assert_int_equal(bytes_of(reg, KV_TIER_DRAM, 0, KV_KIND_KV), live);
	}
	kv_assert_ok(kv_registry_validate(reg));
	for (int i = 0; i < 64; i++)
		if (sizes[i])
			kv_assert_ok(kv_registry_forget(reg, h[i]));
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

struct other_thread {
	struct kv_registry *reg;
	uint64_t bytes;
	int rc;
};

static void *record_and_forget(void *p)
{
	struct other_thread *o = p;
	kv_handle h;

	o->rc = kv_registry_record(o->reg, o->bytes, KV_TIER_DRAM, 0, KV_KIND_KV, 0, "other", &h);
	if (o->rc == 0)
		o->rc = kv_registry_forget(o->reg, h);
	return NULL;
}

/* Another thread's stock can make a peak run ahead, by at most the batch
 * per other shard; never below the truth. */
static void test_batched_peak_bound_two_threads(void **state)
{
	const uint64_t batch = 1u << 20;
	struct kv_registry *reg = make_reg_batch(batch);
	struct other_thread o = { reg, 512u << 10, -1 };
	uint64_t peak;
	pthread_t th;
	kv_handle h;

	(void)state;
	assert_int_equal(pthread_create(&th, NULL, record_and_forget, &o), 0);
	assert_int_equal(pthread_join(th, NULL), 0);
	kv_assert_ok(o.rc);
	kv_assert_ok(kv_registry_peak(reg, KV_TIER_DRAM, KV_KIND_KV, &peak));
	assert_int_equal(peak, 512u << 10);
	for (int i = 0; i < 3; i++) {
		uint64_t truth = (512u << 10) > (uint64_t)(i + 1) * (300u << 10)
					 ? 512u << 10 : (uint64_t)(i + 1) * (300u << 10);

		kv_assert_ok(kv_registry_record(reg, 300u << 10, KV_TIER_DRAM, 0, KV_KIND_KV, 0,
						"main", &h));
		kv_assert_ok(kv_registry_peak(reg, KV_TIER_DRAM, KV_KIND_KV, &peak));
		assert_true(peak >= truth);
		assert_true(peak <= truth + batch);
	}
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_registry_destroy(reg, KV_REGISTRY_FORCE));
}

struct visit {
	int seen;
	uint64_t bytes;
	int stop_after;
};

static int visit_fn(const struct kv_record *r, void *ctx)
{
	struct visit *v = ctx;

	v->seen++;
	v->bytes += r->bytes;
	return v->stop_after && v->seen == v->stop_after ? 99 : 0;
}

static void test_foreach(void **state)
{
	struct kv_registry *reg = make_reg();
	kv_handle h[10];
	struct visit v = { 0 };

	(void)state;
	for (int i = 0; i < 10; i++)
		kv_assert_ok(kv_registry_record(reg, (size_t)i + 1, KV_TIER_DRAM, 0,
						KV_KIND_SCRATCH, 0, "s", &h[i]));
	kv_assert_ok(kv_registry_forget(reg, h[3]));
	kv_assert_ok(kv_registry_foreach(reg, visit_fn, &v));
	assert_int_equal(v.seen, 9);
	assert_int_equal(v.bytes, 55 - 4);
	v = (struct visit){ .stop_after = 2 };
	assert_int_equal(kv_registry_foreach(reg, visit_fn, &v), 99);
	assert_int_equal(v.seen, 2);
	for (int i = 0; i < 10; i++)
		if (i != 3)
			kv_assert_ok(kv_registry_forget(reg, h[i]));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

static void test_destroy_with_leaks(void **state)
{
	struct kv_registry *reg = make_reg();
	kv_handle h;

	(void)state;
	kv_assert_ok(kv_registry_record(reg, 3 << 20, KV_TIER_DRAM, 1, KV_KIND_ACTIVATIONS, 0,
					"forgotten", &h));
	kv_assert_rc(kv_registry_destroy(reg, 0), -EBUSY);
	assert_non_null(strstr(kv_last_error(), "1 records still live"));
	assert_non_null(strstr(kv_last_error(), "'forgotten' activations dram node 1 3.00 MiB"));
	/* Still intact and usable. */
	assert_int_equal(bytes_of(reg, KV_TIER_DRAM, 1, KV_KIND_ACTIVATIONS), 3 << 20);
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_rc(kv_registry_destroy(reg, 8), -EINVAL);
	kv_assert_ok(kv_registry_destroy(reg, KV_REGISTRY_FORCE));
	kv_assert_ok(kv_registry_destroy(NULL, 0));
}

static void test_default_registry(void **state)
{
	struct kv_registry *d = kv_registry_default();
	kv_handle h;

	(void)state;
	assert_non_null(d);
	assert_ptr_equal(d, kv_registry_default());
	assert_string_equal(kv_registry_name(d), "libkv");
	kv_assert_ok(kv_registry_record(d, 1, KV_TIER_DRAM, 0, KV_KIND_METADATA, 0, "d", &h));
	kv_assert_rc(kv_registry_destroy(d, KV_REGISTRY_FORCE), -EPERM);
	kv_assert_ok(kv_registry_forget(d, h));
}

/* ---- Stress ----------------------------------------------------------- */

#define STRESS_THREADS 4
#define STRESS_OPS 1000000
#define STRESS_BATCHES 10
#define STRESS_LIVE 4096
#define STRESS_LABELS 8

struct live {
	kv_handle h;
	uint64_t bytes;
	uint8_t tier, node, kind, label;
};

struct worker {
	struct kv_registry *reg;
	pthread_barrier_t *barrier;
	uint64_t seed;
	int id;
	int failures;
	struct live live[STRESS_LIVE];
	uint32_t n_live;
	/* Per-thread bookkeeping of what this thread holds. */
	uint64_t bytes[KV_TIER_COUNT][2][KV_KIND_COUNT];
	uint64_t records[KV_TIER_COUNT][2][KV_KIND_COUNT];
	uint64_t label_bytes[STRESS_LABELS];
	uint64_t ops[4];
};

static const char *const stress_labels[STRESS_LABELS] = {
	"kv/seq", "weights/l0", "weights/l1", "act", "scratch", "staging/ring", "meta", "kv/prefix",
};

static void book(struct worker *w, const struct live *l, int sign)
{
	w->bytes[l->tier][l->node][l->kind] += sign > 0 ? l->bytes : -l->bytes;
	w->records[l->tier][l->node][l->kind] += sign > 0 ? 1 : (uint64_t)-1;
	w->label_bytes[l->label] += sign > 0 ? l->bytes : -l->bytes;
}

static void stress_op(struct worker *w)
{
	uint64_t r = kv_test_rand(&w->seed);
	unsigned op = (unsigned)(r % 100);
	struct live *l;

	if (w->n_live == 0 || (op < 40 && w->n_live < STRESS_LIVE)) {
		l = &w->live[w->n_live];
		l->bytes = (r >> 8) % (1u << 20);
		l->tier = (uint8_t)((r >> 32) % KV_TIER_COUNT);
		l->node = (uint8_t)((r >> 40) & 1);
		l->kind = (uint8_t)((r >> 44) % KV_KIND_COUNT);
		l->label = (uint8_t)((r >> 52) % STRESS_LABELS);
		if (kv_registry_record(w->reg, l->bytes, (enum kv_tier)l->tier, l->node,
				       (enum kv_kind)l->kind, KV_POLICY_SPILLABLE,
				       stress_labels[l->label], &l->h) != 0) {
			w->failures++;
			return;
		}
		w->n_live++;
		book(w, l, +1);
		w->ops[0]++;
		return;
	}
	l = &w->live[(r >> 16) % w->n_live];
	if (op < 60) {
		uint8_t tier = (uint8_t)((r >> 36) % KV_TIER_COUNT), node = (uint8_t)((r >> 41) & 1);
		if (kv_registry_move(w->reg, l->h, (enum kv_tier)tier, node) != 0) {
			w->failures++;
			return;
		}
		if (tier != l->tier || node != l->node)
			w->ops[1]++;
		book(w, l, -1);
		l->tier = tier;
		l->node = node;
		book(w, l, +1);
	} else if (op < 75) {
		uint64_t nb = (r >> 24) % (1u << 20);
		if (kv_registry_resize(w->reg, l->h, nb) != 0) {
			w->failures++;
			return;
		}
		book(w, l, -1);
		l->bytes = nb;
		book(w, l, +1);
		w->ops[2]++;
	} else {
		if (kv_registry_forget(w->reg, l->h) != 0) {
			w->failures++;
			return;
		}
		book(w, l, -1);
		*l = w->live[--w->n_live];
		w->ops[3]++;
	}
}

static void *stress_thread(void *arg)
{
	struct worker *w = arg;

	for (int b = 0; b < STRESS_BATCHES; b++) {
		for (int i = 0; i < STRESS_OPS / STRESS_BATCHES; i++)
			stress_op(w);
		/* Quiesce, let worker 0 validate, go on. */
		pthread_barrier_wait(w->barrier);
		if (w->id == 0 && kv_registry_validate(w->reg) != 0) {
			fprintf(stderr, "validate after batch %d: %s\n", b, kv_last_error());
			w->failures++;
		}
		pthread_barrier_wait(w->barrier);
	}
	return NULL;
}

static void test_stress_threads(void **state)
{
	struct kv_registry *reg = make_reg_batch(256u << 10);
	struct worker *w = calloc(STRESS_THREADS, sizeof(*w));
	pthread_t th[STRESS_THREADS];
	pthread_barrier_t barrier;
	uint64_t total_ops[4] = { 0 };

	(void)state;
	assert_non_null(w);
	pthread_barrier_init(&barrier, NULL, STRESS_THREADS);
	for (int i = 0; i < STRESS_THREADS; i++) {
		w[i].reg = reg;
		w[i].barrier = &barrier;
		w[i].seed = 0x5eed0000u + (uint64_t)i;
		w[i].id = i;
		assert_int_equal(pthread_create(&th[i], NULL, stress_thread, &w[i]), 0);
	}
	for (int i = 0; i < STRESS_THREADS; i++)
		assert_int_equal(pthread_join(th[i], NULL), 0);
	pthread_barrier_destroy(&barrier);

	for (int i = 0; i < STRESS_THREADS; i++) {
		assert_int_equal(w[i].failures, 0);
		for (int k = 0; k < 4; k++)
			total_ops[k] += w[i].ops[k];
	}
	for (int t = 0; t < KV_TIER_COUNT; t++)
		for (int n = 0; n < 2; n++)
			for (int k = 0; k < KV_KIND_COUNT; k++) {
				uint64_t want_b = 0, want_r = 0;

				for (int i = 0; i < STRESS_THREADS; i++) {
					want_b += w[i].bytes[t][n][k];
					want_r += w[i].records[t][n][k];
				}
				assert_int_equal(bytes_of(reg, t, n, k), want_b);
				assert_int_equal(count_of(reg, t, n, k), want_r);
			}
	for (int l = 0; l < STRESS_LABELS; l++) {
		struct kv_holder h;
		uint64_t want = 0;

		for (int i = 0; i < STRESS_THREADS; i++)
			want += w[i].label_bytes[l];
		kv_assert_ok(kv_registry_label(reg, stress_labels[l], &h));
		assert_int_equal(h.bytes, want);
		assert_true(h.peak >= h.bytes);
	}
	struct kv_registry_ops ops;
	kv_registry_ops(reg, &ops);
	assert_int_equal(ops.records, total_ops[0]);
	assert_int_equal(ops.moves, total_ops[1]);
	assert_int_equal(ops.resizes, total_ops[2]);
	assert_int_equal(ops.forgets, total_ops[3]);
	kv_assert_ok(kv_registry_validate(reg));

	/* Forget everything: the registry ends empty and destroys cleanly. */
	for (int i = 0; i < STRESS_THREADS; i++)
		for (uint32_t j = 0; j < w[i].n_live; j++)
			kv_assert_ok(kv_registry_forget(reg, w[i].live[j].h));
	assert_int_equal(bytes_of(reg, KV_ANY, KV_ANY, KV_ANY), 0);
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_registry_destroy(reg, 0));
	free(w);
}

/* ---- Stats sources ---------------------------------------------------- */

static int one_stat(void *ctx, struct kv_stat *out, size_t max)
{
	const double *v = ctx;

	(void)max;
	out[0] = (struct kv_stat){ "value", *v, KV_STAT_GAUGE, NULL };
	return 1;
}

/* What a visitor saw of one source. */
struct seen {
	size_t visits;
	char source[KV_STAT_NAME_MAX + 1];
	int err;
	size_t n;
	double first;
	char detail[256];
};

static int record_visit(void *p, const char *source, const struct kv_stat *st, size_t n,
			int err)
{
	struct seen *s = p;

	s->visits++;
	snprintf(s->source, sizeof(s->source), "%s", source);
	s->err = err;
	s->n = n;
	s->first = n ? st[0].value : -1;
	/* The rules of kv_stats_visit_fn, checked where they hold. */
	if ((err < 0) != (st == NULL) || (err < 0 && n != 0))
		s->err = 12345;
	snprintf(s->detail, sizeof(s->detail), "%s", kv_last_error());
	return 0;
}

/* Results that break the rules of struct kv_stat, one per mode, and a few
 * right at the limits. */
enum bad_mode {
	BAD_TOO_MANY, BAD_NULL_NAME, BAD_UPPER, BAD_LONG_NAME, BAD_TWICE, BAD_TYPE,
	BAD_HELP_LF, BAD_LONG_HELP, BAD_NOT_ERRNO, BAD_MODES,
	OK_MAX_STATS = BAD_MODES, OK_LONG_NAME, OK_LONG_HELP, OK_UNTOUCHED, OK_MODES
};

struct bad_ctx {
	int mode;
	char long_name[KV_STAT_NAME_MAX + 2];
	char long_help[KV_STAT_HELP_MAX + 2];
	char names[KV_STATS_MAX][24];
};

static int bad_fn(void *p, struct kv_stat *out, size_t max)
{
	struct bad_ctx *c = p;
	struct kv_stat ok = { "fine", 1, KV_STAT_GAUGE, NULL };

	out[0] = ok;
	switch (c->mode) {
	case BAD_TOO_MANY:
		return (int)max + 1;
	case BAD_NULL_NAME:
		out[0].name = NULL;
		return 1;
	case BAD_UPPER:
		out[0].name = "Fine";
		return 1;
	case BAD_LONG_NAME:
		memset(c->long_name, 'n', KV_STAT_NAME_MAX + 1);
		c->long_name[KV_STAT_NAME_MAX + 1] = '\0';
		out[0].name = c->long_name;
		return 1;
	case BAD_TWICE:
		out[1] = ok;
		return 2;
	case BAD_TYPE:
		out[0].type = (enum kv_stat_type)7;
		return 1;
	case BAD_HELP_LF:
		out[0].help = "two\nlines";
		return 1;
	case BAD_LONG_HELP:
		memset(c->long_help, 'h', KV_STAT_HELP_MAX + 1);
		c->long_help[KV_STAT_HELP_MAX + 1] = '\0';
		out[0].help = c->long_help;
		return 1;
	case BAD_NOT_ERRNO:
		return -100000;
	case OK_MAX_STATS:
		for (size_t i = 0; i < max; i++) {
			snprintf(c->names[i], sizeof(c->names[i]), "s%zu", i);
			out[i] = ok;
			out[i].name = c->names[i];
		}
		return (int)max;
	case OK_LONG_NAME:
		memset(c->long_name, 'n', KV_STAT_NAME_MAX);
		c->long_name[KV_STAT_NAME_MAX] = '\0';
		out[0].name = c->long_name;
		return 1;
	case OK_LONG_HELP:
		memset(c->long_help, 'h', KV_STAT_HELP_MAX);
		c->long_help[KV_STAT_HELP_MAX] = '\0';
		out[0].help = c->long_help;
		return 1;
	default:
		/* Leaves type and help alone: they read as gauge and NULL. */
		out[0] = (struct kv_stat){ 0 };
		out[0].name = "untouched";
		return out[0].type == KV_STAT_GAUGE && !out[0].help && !out[1].name ? 1 : -EFAULT;
	}
}

static void test_stats_bad_input(void **state)
{
	struct kv_registry *reg = make_reg();
	uint64_t id = 777, ids[KV_STATS_SOURCES_MAX], first;
	char name[KV_STAT_NAME_MAX + 2];
	double v = 1;
	struct seen seen;

	(void)state;
	kv_assert_rc(kv_registry_add_stats(NULL, "x", one_stat, &v, &id), -EINVAL);
	kv_assert_rc(kv_registry_add_stats(reg, "x", NULL, &v, &id), -EINVAL);
	kv_assert_rc(kv_registry_add_stats(reg, "x", one_stat, &v, NULL), -EINVAL);
	static const char *const bad_names[] = { "", "Cache", "a b", "cache/0", "k\xc3\xa4", "x\n" };
	kv_assert_rc(kv_registry_add_stats(reg, NULL, one_stat, &v, &id), -EINVAL);
	for (size_t i = 0; i < sizeof(bad_names) / sizeof(bad_names[0]); i++)
		kv_assert_rc(kv_registry_add_stats(reg, bad_names[i], one_stat, &v, &id), -EINVAL);
	memset(name, 'a', KV_STAT_NAME_MAX + 1);
	name[KV_STAT_NAME_MAX + 1] = '\0';
	kv_assert_rc(kv_registry_add_stats(reg, name, one_stat, &v, &id), -EINVAL);
	assert_non_null(strstr(kv_last_error(), "[a-z0-9_.-]"));
	assert_int_equal(id, 777);

	/* The longest name, and every allowed character. */
	name[KV_STAT_NAME_MAX] = '\0';
	kv_assert_ok(kv_registry_add_stats(reg, name, one_stat, &v, &first));
	assert_true(first != 0);
	kv_assert_ok(kv_registry_remove_stats(reg, first));
	kv_assert_ok(kv_registry_add_stats(reg, "a.b-c_09", one_stat, &v, &id));
	/* Handles are not reused. */
	assert_true(id != 0 && id != first);
	kv_assert_rc(kv_registry_add_stats(reg, "a.b-c_09", one_stat, &v, &ids[0]), -EEXIST);
	kv_assert_ok(kv_registry_remove_stats(reg, id));
	kv_assert_rc(kv_registry_remove_stats(reg, id), -ENOENT);
	kv_assert_rc(kv_registry_remove_stats(reg, 0), -ENOENT);
	kv_assert_rc(kv_registry_remove_stats(reg, UINT64_C(0xfeedface)), -ENOENT);
	kv_assert_rc(kv_registry_remove_stats(NULL, 1), -EINVAL);

	/* The table holds KV_STATS_SOURCES_MAX, then says so. */
	for (int i = 0; i < KV_STATS_SOURCES_MAX; i++) {
		snprintf(name, sizeof(name), "src%02d", i);
		kv_assert_ok(kv_registry_add_stats(reg, name, one_stat, &v, &ids[i]));
	}
	id = 777;
	kv_assert_rc(kv_registry_add_stats(reg, "one-more", one_stat, &v, &id), -ENOSPC);
	assert_int_equal(id, 777);
	kv_assert_ok(kv_registry_validate(reg));
	memset(&seen, 0, sizeof(seen));
	kv_assert_ok(kv_registry_stats_foreach(reg, record_visit, &seen));
	assert_int_equal(seen.visits, KV_STATS_SOURCES_MAX);
	assert_string_equal(seen.source, "src63"); /* the last in name order */
	kv_assert_ok(kv_registry_remove_stats(reg, ids[5]));
	kv_assert_ok(kv_registry_add_stats(reg, "one-more", one_stat, &v, &ids[5]));
	for (int i = 0; i < KV_STATS_SOURCES_MAX; i++)
		kv_assert_ok(kv_registry_remove_stats(reg, ids[i]));

	kv_assert_rc(kv_registry_stats_foreach(NULL, record_visit, &seen), -EINVAL);
	kv_assert_rc(kv_registry_stats_foreach(reg, NULL, &seen), -EINVAL);
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* A source whose result breaks a rule fails alone, with -EINVAL and a
 * detail; one at the limits does not. */
static void test_stats_bad_results(void **state)
{
	struct kv_registry *reg = make_reg();
	struct bad_ctx *c = calloc(1, sizeof(*c));
	struct seen seen;
	uint64_t id;

	(void)state;
	assert_non_null(c);
	kv_assert_ok(kv_registry_add_stats(reg, "bad", bad_fn, c, &id));
	for (c->mode = 0; c->mode < OK_MODES; c->mode++) {
		memset(&seen, 0, sizeof(seen));
		kv_assert_ok(kv_registry_stats_foreach(reg, record_visit, &seen));
		assert_int_equal(seen.visits, 1);
		if (c->mode < BAD_MODES) {
			if (seen.err != -EINVAL)
				fail_msg("mode %d: err %d, want -EINVAL", c->mode, seen.err);
			assert_non_null(strstr(seen.detail, "'bad'"));
			continue;
		}
		if (seen.err != 0)
			fail_msg("mode %d: err %d (%s)", c->mode, seen.err, seen.detail);
		assert_int_equal(seen.n, c->mode == OK_MAX_STATS ? KV_STATS_MAX : 1);
	}
	kv_assert_ok(kv_registry_remove_stats(reg, id));
	free(c);
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* Calls a stats fn may make, and those it may not. */
struct nested {
	struct kv_registry *reg;   /* whose source this is */
	struct kv_registry *other; /* a report of it is written from fn */
	uint64_t self;
	int rc_add, rc_remove, rc_foreach, rc_report, rc_bytes, rc_other;
	int calls;
};

static int nested_fn(void *p, struct kv_stat *out, size_t max)
{
	struct nested *n = p;
	double v = 0;
	uint64_t id = 0, bytes = 0;
	struct seen seen = { 0 };
	FILE *f = fopen("/dev/null", "w");

	(void)max;
	n->calls++;
	n->rc_add = kv_registry_add_stats(n->reg, "inner", one_stat, &v, &id);
	n->rc_remove = kv_registry_remove_stats(n->reg, n->self);
	n->rc_foreach = kv_registry_stats_foreach(n->reg, record_visit, &seen);
	n->rc_report = f ? kv_report_write(n->reg, f, KV_REPORT_JSON) : -EIO;
	n->rc_bytes = kv_registry_bytes(n->reg, KV_ANY, KV_ANY, KV_ANY, &bytes);
	n->rc_other = n->other && f ? kv_report_write(n->other, f, KV_REPORT_TEXT) : 0;
	if (f)
		fclose(f);
	out[0] = (struct kv_stat){ "bytes", (double)bytes, KV_STAT_GAUGE, NULL };
	return 1;
}

static int removing_visit(void *p, const char *source, const struct kv_stat *st, size_t n,
			  int err)
{
	struct nested *ne = p;

	(void)source;
	(void)st;
	(void)n;
	(void)err;
	ne->rc_remove = kv_registry_remove_stats(ne->reg, ne->self);
	return 0;
}

static void test_stats_nested_calls(void **state)
{
	struct kv_registry *a = make_reg(), *b = make_reg();
	struct nested na = { .reg = a, .other = b }, nb = { .reg = a };
	struct seen seen = { 0 };
	kv_handle h;

	(void)state;
	kv_assert_ok(kv_registry_record(a, 4096, KV_TIER_DRAM, 0, KV_KIND_KV, 0, "kv", &h));
	kv_assert_ok(kv_registry_add_stats(a, "outer", nested_fn, &na, &na.self));
	/* b's source removes a's: called from a's fn, through a report of b,
	 * it would wait for the call it runs in. */
	kv_assert_ok(kv_registry_add_stats(b, "cross", nested_fn, &nb, &nb.self));
	nb.self = na.self;
	kv_assert_ok(kv_registry_stats_foreach(a, record_visit, &seen));
	assert_int_equal(seen.visits, 1);
	assert_int_equal(seen.err, 0);
	assert_true(seen.first == 4096);
	assert_int_equal(na.rc_add, -EDEADLK);
	assert_int_equal(na.rc_remove, -EDEADLK);
	assert_int_equal(na.rc_foreach, -EDEADLK);
	assert_int_equal(na.rc_report, -EDEADLK);
	assert_int_equal(na.rc_bytes, 0);
	assert_int_equal(na.rc_other, 0);
	assert_int_equal(nb.calls, 1);
	assert_int_equal(nb.rc_remove, -EDEADLK);
	assert_int_equal(nb.rc_bytes, 0);

	/* A visitor is held to the same rules. */
	na.rc_remove = 0;
	na.other = NULL;
	kv_assert_ok(kv_registry_stats_foreach(a, removing_visit, &na));
	assert_int_equal(na.rc_remove, -EDEADLK);
	/* Outside any call all of it works again. */
	kv_assert_ok(kv_registry_remove_stats(a, na.self));
	kv_assert_ok(kv_registry_forget(a, h));
	kv_assert_ok(kv_registry_validate(a));
	kv_assert_ok(kv_registry_destroy(a, 0));
	/* A source still added at destroy is dropped, not called. */
	nb.calls = 0;
	kv_assert_ok(kv_registry_destroy(b, 0));
	assert_int_equal(nb.calls, 0);
}

static int stop_visit(void *p, const char *source, const struct kv_stat *st, size_t n,
		      int err)
{
	int *visits = p;

	(void)source;
	(void)st;
	(void)n;
	(void)err;
	return ++*visits == 2 ? 42 : 0;
}

static int failing_stats(void *ctx, struct kv_stat *out, size_t max)
{
	(void)ctx;
	(void)out;
	(void)max;
	return -EIO;
}

static void test_stats_foreach(void **state)
{
	struct kv_registry *reg = make_reg();
	double v1 = 1, v2 = 2, v3 = 3;
	uint64_t id[4];
	struct seen seen = { 0 };
	struct kv_holder hl;
	int visits = 0;
	char before[256];

	(void)state;
	kv_assert_ok(kv_registry_add_stats(reg, "c", one_stat, &v3, &id[0]));
	kv_assert_ok(kv_registry_add_stats(reg, "a", one_stat, &v1, &id[1]));
	kv_assert_ok(kv_registry_add_stats(reg, "b", one_stat, &v2, &id[2]));
	kv_assert_ok(kv_registry_add_stats(reg, "d", failing_stats, NULL, &id[3]));
	kv_assert_rc(kv_registry_stats_foreach(reg, stop_visit, &visits), 42);
	assert_int_equal(visits, 2);

	/* The last visited is "d", whose fn failed without a detail. */
	kv_assert_rc(kv_registry_label(reg, "nobody", &hl), -ENOENT);
	snprintf(before, sizeof(before), "%s", kv_last_error());
	kv_assert_ok(kv_registry_stats_foreach(reg, record_visit, &seen));
	assert_string_equal(kv_last_error(), before);
	assert_int_equal(seen.visits, 4);
	assert_string_equal(seen.source, "d");
	assert_int_equal(seen.err, -EIO);
	assert_string_equal(seen.detail, "");
	kv_assert_ok(kv_registry_remove_stats(reg, id[3]));
	memset(&seen, 0, sizeof(seen));
	kv_assert_ok(kv_registry_stats_foreach(reg, record_visit, &seen));
	assert_string_equal(seen.source, "c");
	assert_true(seen.first == 3);
	for (int i = 0; i < 3; i++)
		kv_assert_ok(kv_registry_remove_stats(reg, id[i]));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* ---- Stats sources under concurrency ---------------------------------- */

/* kv_registry_remove_stats() waits for a call of fn in progress: fn here
 * holds until the test lets it go. */
struct gate {
	atomic_int entered, release, left;
};

static int gate_fn(void *p, struct kv_stat *out, size_t max)
{
	struct gate *g = p;
	const struct timespec ms = { 0, 1000000 };

	(void)max;
	atomic_store(&g->entered, 1);
	while (!atomic_load(&g->release))
		nanosleep(&ms, NULL);
	out[0] = (struct kv_stat){ "gated", 1, KV_STAT_GAUGE, NULL };
	atomic_store(&g->left, 1);
	return 1;
}

struct gate_run {
	struct kv_registry *reg;
	struct gate *g;
	uint64_t id;
	int rc;
	int left_at_return;
	atomic_int done;
};

static void *gate_reporter(void *p)
{
	struct gate_run *r = p;
	FILE *f = fopen("/dev/null", "w");

	r->rc = f ? kv_report_write(r->reg, f, KV_REPORT_PROMETHEUS) : -EIO;
	if (f)
		fclose(f);
	atomic_store(&r->done, 1);
	return NULL;
}

static void *gate_remover(void *p)
{
	struct gate_run *r = p;

	r->rc = kv_registry_remove_stats(r->reg, r->id);
	r->left_at_return = atomic_load(&r->g->left);
	atomic_store(&r->done, 1);
	return NULL;
}

static void test_stats_remove_waits(void **state)
{
	struct kv_registry *reg = make_reg();
	struct gate *g = calloc(1, sizeof(*g));
	struct gate_run rep = { .reg = reg }, rem = { .reg = reg };
	const struct timespec ms = { 0, 1000000 };
	struct seen seen = { 0 };
	pthread_t tr, tm;
	uint64_t id;

	(void)state;
	assert_non_null(g);
	rep.g = rem.g = g;
	kv_assert_ok(kv_registry_add_stats(reg, "gate", gate_fn, g, &id));
	rem.id = id;
	assert_int_equal(pthread_create(&tr, NULL, gate_reporter, &rep), 0);
	for (int i = 0; i < 10000 && !atomic_load(&g->entered); i++)
		nanosleep(&ms, NULL);
	assert_true(atomic_load(&g->entered));

	assert_int_equal(pthread_create(&tm, NULL, gate_remover, &rem), 0);
	/* 100 ms is ample for a remove that does not wait to return. */
	for (int i = 0; i < 100; i++)
		nanosleep(&ms, NULL);
	assert_false(atomic_load(&rem.done));
	assert_false(atomic_load(&rep.done));
	/* A source being removed is not called by later readers, which do not
	 * wait for it either. */
	kv_assert_ok(kv_registry_stats_foreach(reg, record_visit, &seen));
	assert_int_equal(seen.visits, 0);
	/* Nor can a second remover take it over: only the first one waits,
	 * and only it may free ctx. */
	kv_assert_rc(kv_registry_remove_stats(reg, id), -ENOENT);

	atomic_store(&g->release, 1);
	assert_int_equal(pthread_join(tm, NULL), 0);
	assert_int_equal(pthread_join(tr, NULL), 0);
	kv_assert_ok(rem.rc);
	kv_assert_ok(rep.rc);
	/* fn had returned before remove did; freeing its ctx now is safe. */
	assert_int_equal(rem.left_at_return, 1);
	free(g);
	kv_assert_rc(kv_registry_remove_stats(reg, id), -ENOENT);
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* Threads add a source, wait until a reader called it, remove it and free
 * its context at once, over and over, while other threads write reports
 * and read the stats in a loop. A call after remove returned would read
 * the poisoned cookie (and the sanitizers would see the freed memory). */
#define CHURN_ADDERS 3
#define CHURN_READERS 2
#define CHURN_ROUNDS 300
#define CHURN_COOKIE UINT64_C(0xc00c1e5eedc0ffee)

struct churn_ctx {
	uint64_t cookie;
	atomic_uint calls;
};

struct churn {
	struct kv_registry *reg;
	atomic_int stop;
	atomic_int bad_cookie;
	atomic_int failures;
	atomic_ulong reads;
};

struct churn_arg {
	struct churn *c;
	int id;
};

static int churn_fn(void *p, struct kv_stat *out, size_t max)
{
	struct churn_ctx *x = p;
	unsigned calls;

	(void)max;
	if (x->cookie != CHURN_COOKIE)
		return -EFAULT;
	calls = atomic_fetch_add(&x->calls, 1) + 1;
	out[0] = (struct kv_stat){ "calls", calls, KV_STAT_COUNTER, "Calls of this source." };
	out[1] = (struct kv_stat){ "cookie_ok", 1, KV_STAT_GAUGE, NULL };
	return 2;
}

static int churn_visit(void *p, const char *source, const struct kv_stat *st, size_t n,
		       int err)
{
	struct churn *c = p;

	(void)source;
	if (err == -EFAULT)
		atomic_fetch_add(&c->bad_cookie, 1);
	else if (err || n != 2 || strcmp(st[0].name, "calls") != 0 || st[1].value != 1)
		atomic_fetch_add(&c->failures, 1);
	return 0;
}

static void *churn_reader(void *p)
{
	struct churn_arg *a = p;
	struct churn *c = a->c;
	static const unsigned formats[] = { KV_REPORT_TEXT, KV_REPORT_JSON, KV_REPORT_PROMETHEUS };
	FILE *f = fopen("/dev/null", "w");
	unsigned long i = 0;

	if (!f) {
		atomic_fetch_add(&c->failures, 1);
		return NULL;
	}
	while (!atomic_load(&c->stop)) {
		int rc = i % 4 == 0 ? kv_report_write(c->reg, f, formats[(i / 4) % 3])
				    : kv_registry_stats_foreach(c->reg, churn_visit, c);

		if (rc != 0)
			atomic_fetch_add(&c->failures, 1);
		atomic_fetch_add(&c->reads, 1);
		i++;
	}
	fclose(f);
	return NULL;
}

static void *churn_adder(void *p)
{
	struct churn_arg *a = p;
	struct churn *c = a->c;
	const struct timespec us = { 0, 100000 };
	char name[32];

	snprintf(name, sizeof(name), "churn.%d", a->id);
	for (int round = 0; round < CHURN_ROUNDS; round++) {
		struct churn_ctx *x = malloc(sizeof(*x));
		uint64_t id;
		int waited = 0;

		if (!x) {
			atomic_fetch_add(&c->failures, 1);
			return NULL;
		}
		x->cookie = CHURN_COOKIE;
		atomic_init(&x->calls, 0);
		if (kv_registry_add_stats(c->reg, name, churn_fn, x, &id) != 0) {
			atomic_fetch_add(&c->failures, 1);
			free(x);
			return NULL;
		}
		/* Most rounds wait for a call, so that removals meet calls in
		 * progress; every fourth removes at once. */
		while (round % 4 && atomic_load(&x->calls) == 0 && waited++ < 100000)
			nanosleep(&us, NULL);
		if (round % 4 && atomic_load(&x->calls) == 0)
			atomic_fetch_add(&c->failures, 1);
		if (kv_registry_remove_stats(c->reg, id) != 0)
			atomic_fetch_add(&c->failures, 1);
		x->cookie = 0xdeadull;
		free(x);
	}
	return NULL;
}

static void test_stats_concurrent(void **state)
{
	struct churn c = { 0 };
	struct churn_arg args[CHURN_ADDERS + CHURN_READERS];
	pthread_t th[CHURN_ADDERS + CHURN_READERS];
	struct seen seen = { 0 };
	kv_handle h;

	(void)state;
	c.reg = make_reg();
	kv_assert_ok(kv_registry_record(c.reg, 1 << 20, KV_TIER_DRAM, 0, KV_KIND_KV, 0, "kv", &h));
	for (int i = 0; i < CHURN_ADDERS + CHURN_READERS; i++) {
		args[i] = (struct churn_arg){ &c, i };
		assert_int_equal(pthread_create(&th[i], NULL,
						i < CHURN_ADDERS ? churn_adder : churn_reader,
						&args[i]), 0);
	}
	for (int i = 0; i < CHURN_ADDERS; i++)
		assert_int_equal(pthread_join(th[i], NULL), 0);
	atomic_store(&c.stop, 1);
	for (int i = CHURN_ADDERS; i < CHURN_ADDERS + CHURN_READERS; i++)
		assert_int_equal(pthread_join(th[i], NULL), 0);

	assert_int_equal(atomic_load(&c.bad_cookie), 0);
	assert_int_equal(atomic_load(&c.failures), 0);
	assert_true(atomic_load(&c.reads) > 0);
	kv_assert_ok(kv_registry_stats_foreach(c.reg, record_visit, &seen));
	assert_int_equal(seen.visits, 0);
	kv_assert_ok(kv_registry_forget(c.reg, h));
	kv_assert_ok(kv_registry_validate(c.reg));
	kv_assert_ok(kv_registry_destroy(c.reg, 0));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_record_move_resize_forget),
		cmocka_unit_test(test_stale_and_unknown_handles),
		cmocka_unit_test(test_bad_input_changes_nothing),
		cmocka_unit_test(test_label_table_full),
		cmocka_unit_test(test_peaks_labels_top),
		cmocka_unit_test(test_batched_peak_exact_one_thread),
		cmocka_unit_test(test_batched_peak_bound_two_threads),
		cmocka_unit_test(test_foreach),
		cmocka_unit_test(test_destroy_with_leaks),
		cmocka_unit_test(test_default_registry),
		cmocka_unit_test(test_stress_threads),
		cmocka_unit_test(test_stats_bad_input),
		cmocka_unit_test(test_stats_bad_results),
		cmocka_unit_test(test_stats_nested_calls),
		cmocka_unit_test(test_stats_foreach),
		cmocka_unit_test(test_stats_remove_waits),
		cmocka_unit_test(test_stats_concurrent),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
