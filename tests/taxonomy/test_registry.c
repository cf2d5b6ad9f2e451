// SPDX-License-Identifier: MIT
/*
 * Tests of the registry: record/move/resize/forget bookkeeping, queries
 * (cells, labels, top-N, peaks, foreach), bad input leaving nothing
 * behind, leak reports on destroy, and a seeded stress of 4 threads x
 * 1,000,000 operations checked against each thread's own bookkeeping,
 * with the validator run after every batch.
 */
#include <pthread.h>

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
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
