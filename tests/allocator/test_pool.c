// SPDX-License-Identifier: MIT
/*
 * Block pools: id <-> pointer conversions, alignment and disjointness,
 * exact limits (max_bytes and a shared budget), refusal of bad input
 * without side effects, all-or-nothing bulk calls, every OS call of a
 * grow failed in turn, destroy with live blocks, thread caches. Each test
 * uses a private registry, so registry totals are exact; kv_pool_validate
 * runs after every mutation that matters.
 */
#include <pthread.h>
#include <sys/mman.h>

#include "kvtest.h"
#include "allocator/allocator-impl.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)

static struct kv_registry *reg;

static int setup(void **state)
{
	(void)state;
	kv_assert_ok(kv_registry_create(NULL, &reg));
	return 0;
}

/* Every test leaves the registry empty: pools forget their records. */
static int teardown(void **state)
{
	uint64_t n = 1;

	(void)state;
	kv_assert_ok(kv_registry_count(reg, KV_ANY, KV_ANY, KV_ANY, &n));
	assert_int_equal(n, 0);
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_registry_destroy(reg, 0));
	reg = NULL;
	return 0;
}

static void config(struct kv_pool_config *cfg, size_t block, size_t max)
{
	kv_pool_config_default(cfg);
	cfg->block_bytes = block;
	cfg->max_bytes = max;
	cfg->registry = reg;
	cfg->label = "tpool";
}

static uint64_t label_bytes(const char *label)
{
	struct kv_holder h;

	if (kv_registry_label(reg, label, &h) != 0)
		return 0;
	return h.bytes;
}

static uint64_t registry_total(const char *label)
{
	char free_label[160];

	snprintf(free_label, sizeof(free_label), "%s/free", label);
	return label_bytes(label) + label_bytes(free_label);
}

static struct kv_pool_stats stats_of(const struct kv_pool *p)
{
	struct kv_pool_stats st;

	kv_assert_ok(kv_pool_stats(p, &st));
	return st;
}

/* The parts of the stats a refused call must leave alone. */
static void assert_same_stats(const struct kv_pool_stats *a, const struct kv_pool_stats *b)
{
	assert_int_equal(a->blocks_committed, b->blocks_committed);
	assert_int_equal(a->blocks_used, b->blocks_used);
	assert_int_equal(a->blocks_cached, b->blocks_cached);
	assert_int_equal(a->chunks, b->chunks);
	assert_int_equal(a->committed_bytes, b->committed_bytes);
}

/* ---- Config ----------------------------------------------------------- */

static void test_config_default(void **state)
{
	struct kv_pool_config cfg;

	(void)state;
	memset(&cfg, 0xff, sizeof(cfg));
	kv_pool_config_default(&cfg);
	assert_int_equal(cfg.kind, KV_KIND_KV);
	assert_string_equal(cfg.label, "pool");
	assert_int_equal(cfg.thread_cache, 0);
	assert_int_equal(cfg.place.numa, KV_NUMA_FIRST_TOUCH);
	assert_int_equal(cfg.place.huge, KV_HUGE_NONE);
	assert_false(cfg.place.lock);
	assert_false(cfg.place.prefault);
	assert_int_equal(cfg.block_align, 0);
	assert_int_equal(cfg.chunk_bytes, 0);
	assert_null(cfg.registry);
	assert_null(cfg.budget);
}

static void test_create_bad(void **state)
{
	struct kv_pool_config cfg;
	struct kv_pool *p = (struct kv_pool *)0x1;
	char long_label[KV_LABEL_MAX + 1];

	(void)state;
	config(&cfg, 0, MiB);
	kv_assert_rc(kv_pool_create(&cfg, &p), -EINVAL);
	config(&cfg, 4 * KiB, 0);
	kv_assert_rc(kv_pool_create(&cfg, &p), -EINVAL);
	config(&cfg, 4 * KiB, MiB);
	cfg.block_align = 48;
	kv_assert_rc(kv_pool_create(&cfg, &p), -EINVAL);
	cfg.block_align = 4 * MiB;
	kv_assert_rc(kv_pool_create(&cfg, &p), -EINVAL);
	config(&cfg, 2 * MiB, MiB);
	kv_assert_rc(kv_pool_create(&cfg, &p), -EINVAL);
	config(&cfg, 4 * KiB, MiB);
	cfg.thread_cache = 1u << 30;
	kv_assert_rc(kv_pool_create(&cfg, &p), -EINVAL);
	config(&cfg, 4 * KiB, MiB);
	cfg.kind = KV_KIND_COUNT;
	kv_assert_rc(kv_pool_create(&cfg, &p), -EINVAL);
	config(&cfg, 4 * KiB, MiB);
	cfg.policy = 1u << 30;
	kv_assert_rc(kv_pool_create(&cfg, &p), -EINVAL);
	config(&cfg, 4 * KiB, MiB);
	memset(long_label, 'x', sizeof(long_label) - 1);
	long_label[sizeof(long_label) - 1] = '\0';
	cfg.label = long_label;
	kv_assert_rc(kv_pool_create(&cfg, &p), -EINVAL);
	assert_true(strlen(kv_last_error()) > 0);
	config(&cfg, 4 * KiB, MiB);
	cfg.place.numa = KV_NUMA_BIND;
	cfg.place.node = 63;
	kv_assert_rc(kv_pool_create(&cfg, &p), -ENODEV);
	config(&cfg, 4 * KiB, MiB);
	kv_assert_rc(kv_pool_create(&cfg, NULL), -EINVAL);
	kv_assert_rc(kv_pool_create(NULL, &p), -EINVAL);
	assert_ptr_equal(p, (struct kv_pool *)0x1);
	kv_assert_ok(kv_pool_destroy(NULL, 0));
}

/* ---- Conversions, alignment, disjointness ----------------------------- */

struct shape {
	size_t block, align, chunk;
	uint32_t cache;
};

static const struct shape shapes[] = {
	{ 64 * KiB, 0, 0, 0 },
	{ 1000, 0, 0, 0 },       /* stride 1024 */
	{ 3000, 0, 0, 16 },      /* stride 3008: not a power of two */
	{ 100, 4096, 0, 0 },     /* stride 4096 */
	{ 5000, 64 * KiB, 0, 8 },/* alignment above the base page */
	{ 24, 8, 4096, 4 },      /* small chunks: many grows */
	{ 200 * KiB, 2 * MiB, 0, 0 },
};

static void fill(void *b, size_t len, uint32_t id)
{
	uint32_t *w = b;

	for (size_t i = 0; i < len / sizeof(uint32_t); i++)
		w[i] = id * 2654435761u + (uint32_t)i;
}

static void check_fill(const void *b, size_t len, uint32_t id)
{
	const uint32_t *w = b;

	for (size_t i = 0; i < len / sizeof(uint32_t); i++)
		if (w[i] != id * 2654435761u + (uint32_t)i)
			fail_msg("block %u word %zu overwritten", id, i);
}

static void test_roundtrip(void **state)
{
	(void)state;
	for (size_t s = 0; s < KV_ARRAY_SIZE(shapes); s++) {
		const struct shape *sh = &shapes[s];
		size_t align = sh->align ? sh->align : 64;
		size_t stride = (sh->block + align - 1) & ~(align - 1);
		uint32_t n = 300;
		struct kv_pool_config cfg;
		struct kv_pool *p;
		struct kv_pool_stats st;
		uint32_t *ids = calloc(n, sizeof(*ids));
		void **ptrs = calloc(n, sizeof(*ptrs));
		char *base;

		assert_non_null(ids);
		assert_non_null(ptrs);
		/* Commits are whole pages below max_bytes: leave room for
		 * the page the last block ends in. */
		config(&cfg, sh->block, stride * n + 4096);
		cfg.block_align = sh->align;
		cfg.chunk_bytes = sh->chunk;
		cfg.thread_cache = sh->cache;
		kv_assert_ok(kv_pool_create(&cfg, &p));
		assert_null(kv_pool_ptr(p, 0)); /* nothing committed yet */
		for (uint32_t i = 0; i < n; i++) {
			kv_assert_ok(kv_pool_alloc(p, &ptrs[i], &ids[i]));
			assert_int_equal((uintptr_t)ptrs[i] % align, 0);
			assert_ptr_equal(kv_pool_ptr(p, ids[i]), ptrs[i]);
			assert_int_equal(kv_pool_id(p, ptrs[i]), ids[i]);
			assert_int_equal(kv_pool_id(p, (char *)ptrs[i] + sh->block - 1), ids[i]);
			fill(ptrs[i], sh->block, ids[i]);
		}
		kv_assert_ok(kv_pool_validate(p));
		st = stats_of(p);
		assert_int_equal(st.block_stride, stride);
		assert_int_equal(st.block_bytes, sh->block);
		assert_int_equal(st.blocks_used, n);
		assert_true(st.blocks_committed >= n);
		/* Distinct ids, and addresses follow from them: never overlap. */
		base = kv_pool_ptr(p, 0);
		for (uint32_t i = 0; i < n; i++) {
			assert_ptr_equal(ptrs[i], base + (size_t)ids[i] * stride);
			check_fill(ptrs[i], sh->block, ids[i]);
		}
		for (uint32_t i = 0; i < n; i++)
			for (uint32_t j = i + 1; j < n; j++)
				assert_int_not_equal(ids[i], ids[j]);
		assert_null(kv_pool_ptr(p, st.blocks_committed));
		assert_int_equal(kv_pool_id(p, base - 1), KV_POOL_NO_ID);
		assert_int_equal(kv_pool_id(p, base + (size_t)st.blocks_committed * stride),
				 KV_POOL_NO_ID);
		assert_int_equal(kv_pool_id(p, &n), KV_POOL_NO_ID);
		for (uint32_t i = 0; i < n; i++) {
			if (i % 2)
				kv_assert_ok(kv_pool_free(p, ptrs[i]));
			else
				kv_assert_ok(kv_pool_free_id(p, ids[i]));
		}
		kv_pool_flush(p);
		kv_assert_ok(kv_pool_validate(p));
		st = stats_of(p);
		assert_int_equal(st.blocks_used, 0);
		assert_int_equal(st.high_water, (size_t)n * stride);
		assert_int_equal(label_bytes("tpool"), 0);
		assert_int_equal(registry_total("tpool"), st.committed_bytes);
		kv_assert_ok(kv_pool_destroy(p, 0));
		free(ids);
		free(ptrs);
	}
}

/* ---- Exact limits ----------------------------------------------------- */

static void fill_to_limit(struct kv_pool *p, uint32_t expect, uint32_t *ids, const char *why)
{
	for (uint32_t i = 0; i < expect; i++)
		kv_assert_ok(kv_pool_alloc(p, NULL, &ids[i]));
	kv_assert_rc(kv_pool_alloc(p, NULL, &ids[expect]), -ENOMEM);
	if (!strstr(kv_last_error(), why))
		fail_msg("detail '%s' does not say '%s'", kv_last_error(), why);
	kv_assert_ok(kv_pool_validate(p));
}

static void test_max_bytes_exact(void **state)
{
	static const uint32_t caches[] = { 0, 8 };
	const size_t stride = 64 * KiB;
	const uint32_t n = 100; /* 6.25 MiB: a 4 MiB chunk, then a shortened one */

	(void)state;
	for (size_t c = 0; c < KV_ARRAY_SIZE(caches); c++) {
		uint32_t ids[101];
		struct kv_pool_config cfg;
		struct kv_pool *p;
		struct kv_pool_stats st;

		config(&cfg, stride, n * stride);
		cfg.thread_cache = caches[c];
		kv_assert_ok(kv_pool_create(&cfg, &p));
		fill_to_limit(p, n, ids, "max_bytes");
		kv_pool_flush(p);
		st = stats_of(p);
		assert_int_equal(st.committed_bytes, n * stride);
		assert_int_equal(st.blocks_committed, n);
		assert_int_equal(st.chunks, 2);
		assert_int_equal(label_bytes("tpool"), n * stride);
		assert_int_equal(registry_total("tpool"), n * stride);
		/* Full: one freed block is the one next handed out. */
		kv_assert_ok(kv_pool_free_id(p, ids[7]));
		kv_assert_ok(kv_pool_alloc(p, NULL, &ids[n]));
		assert_int_equal(ids[n], ids[7]);
		kv_assert_ok(kv_pool_free_n(p, n, ids));
		kv_assert_ok(kv_pool_destroy(p, 0));
	}
}

static void test_budget_exact(void **state)
{
	const size_t stride = 64 * KiB, limit = 10 * MiB;
	const uint32_t n = (uint32_t)(limit / stride);
	struct kv_budget_usage u;
	struct kv_budget *b;
	struct kv_pool_config cfg;
	struct kv_pool *p, *q;
	struct kv_pool_stats st, sq;
	uint32_t *ids = calloc(n + 1, sizeof(*ids));
	uint32_t idq;

	(void)state;
	assert_non_null(ids);
	kv_assert_ok(kv_budget_create(&b));
	kv_assert_ok(kv_budget_set(b, KV_TIER_DRAM, KV_ANY, limit));
	config(&cfg, stride, 64 * MiB);
	cfg.chunk_bytes = MiB;
	cfg.budget = b;
	kv_assert_ok(kv_pool_create(&cfg, &p));
	fill_to_limit(p, n, ids, "budget");
	st = stats_of(p);
	kv_assert_ok(kv_budget_usage(b, KV_TIER_DRAM, KV_ANY, &u));
	assert_int_equal(u.used, limit);
	assert_int_equal(st.committed_bytes, limit);
	assert_int_equal(registry_total("tpool"), limit);

	/* A second pool on the same budget gets nothing: the first keeps its
	 * chunks committed even while its blocks are free. */
	cfg.label = "tpool2";
	kv_assert_ok(kv_pool_create(&cfg, &q));
	kv_assert_rc(kv_pool_alloc(q, NULL, &idq), -ENOMEM);
	sq = stats_of(q);
	assert_int_equal(sq.committed_bytes, 0);
	assert_int_equal(registry_total("tpool2"), 0);
	kv_assert_ok(kv_pool_destroy(q, 0));

	kv_assert_ok(kv_pool_free_n(p, n, ids));
	kv_assert_ok(kv_pool_validate(p));
	kv_assert_ok(kv_pool_destroy(p, 0));
	kv_assert_ok(kv_budget_usage(b, KV_TIER_DRAM, KV_ANY, &u));
	assert_int_equal(u.used, 0);
	kv_assert_ok(kv_budget_destroy(b));
	free(ids);
}

/* A bulk allocation that grows a chunk and is then refused by the budget
 * returns that chunk: budget, committed bytes and registry as before. */
static void test_bulk_refused_gives_back_chunks(void **state)
{
	const size_t stride = 4 * KiB;
	struct kv_budget_usage u;
	struct kv_pool_stats before, after;
	struct kv_budget *b;
	struct kv_pool_config cfg;
	struct kv_pool *p;
	uint32_t ids[1024];

	(void)state;
	kv_assert_ok(kv_budget_create(&b));
	kv_assert_ok(kv_budget_set(b, KV_TIER_DRAM, KV_ANY, 3 * MiB));
	config(&cfg, stride, 16 * MiB);
	cfg.chunk_bytes = 2 * MiB;
	cfg.budget = b;
	kv_assert_ok(kv_pool_create(&cfg, &p));
	before = stats_of(p);
	kv_assert_rc(kv_pool_alloc_n(p, 1024, ids), -ENOMEM);
	assert_non_null(strstr(kv_last_error(), "budget"));
	after = stats_of(p);
	assert_same_stats(&before, &after);
	kv_assert_ok(kv_budget_usage(b, KV_TIER_DRAM, KV_ANY, &u));
	assert_int_equal(u.used, 0);
	assert_int_equal(registry_total("tpool"), 0);
	kv_assert_ok(kv_pool_validate(p));
	/* Half fits the budget: one chunk, then it works. */
	kv_assert_ok(kv_pool_alloc_n(p, 512, ids));
	kv_assert_ok(kv_budget_usage(b, KV_TIER_DRAM, KV_ANY, &u));
	assert_int_equal(u.used, 2 * MiB);
	kv_assert_ok(kv_pool_free_n(p, 512, ids));
	kv_assert_ok(kv_pool_validate(p));
	kv_assert_ok(kv_pool_destroy(p, 0));
	kv_assert_ok(kv_budget_destroy(b));
}

struct policy_seen {
	uint32_t policy;
	int n;
};

static int note_policy(const struct kv_record *r, void *ctx)
{
	struct policy_seen *ps = ctx;

	if (strncmp(r->label, "tpool", 5) == 0) {
		ps->policy |= r->policy;
		ps->n++;
	}
	return 0;
}

/* The registry shows the placement obtained, not the one asked for: a
 * config that claims pinned and huge pages on an unlocked base-page pool
 * must not make the records claim them. */
static void test_policy_bits_are_obtained(void **state)
{
	struct kv_pool_config cfg;
	struct policy_seen ps = { 0, 0 };
	struct kv_pool *p;
	uint32_t id;

	(void)state;
	config(&cfg, 4 * KiB, 4 * MiB);
	cfg.policy = KV_POLICY_PINNED | KV_POLICY_HUGEPAGE | KV_POLICY_SPILLABLE;
	kv_assert_ok(kv_pool_create(&cfg, &p));
	kv_assert_ok(kv_pool_alloc(p, NULL, &id));
	kv_assert_ok(kv_registry_foreach(reg, note_policy, &ps));
	assert_int_equal(ps.n, 2);
	assert_int_equal(ps.policy, KV_POLICY_SPILLABLE);
	kv_assert_ok(kv_pool_free_id(p, id));
	kv_assert_ok(kv_pool_destroy(p, 0));
}

/* ---- Bad input -------------------------------------------------------- */

static void test_bad_input(void **state)
{
	static const uint32_t caches[] = { 0, 4 };

	(void)state;
	for (size_t c = 0; c < KV_ARRAY_SIZE(caches); c++) {
		struct kv_pool_config cfg;
		struct kv_pool *p;
		struct kv_pool_stats before, after;
		void *b1, *b2, *b3;
		uint32_t i1, i2, i3, list[3];
		char *foreign = malloc(4096);
		char local;

		assert_non_null(foreign);
		config(&cfg, 4000, 4 * MiB); /* stride 4032 */
		cfg.thread_cache = caches[c];
		kv_assert_ok(kv_pool_create(&cfg, &p));
		kv_assert_ok(kv_pool_alloc(p, &b1, &i1));
		kv_assert_ok(kv_pool_alloc(p, &b2, &i2));
		kv_assert_ok(kv_pool_alloc(p, &b3, &i3));
		kv_assert_ok(kv_pool_free(p, b3));
		before = stats_of(p);

		kv_assert_rc(kv_pool_free(p, b3), -EINVAL);          /* double free */
		kv_assert_rc(kv_pool_free_id(p, i3), -EINVAL);
		kv_assert_rc(kv_pool_free(p, foreign), -EINVAL);     /* foreign */
		kv_assert_rc(kv_pool_free(p, &local), -EINVAL);
		kv_assert_rc(kv_pool_free(p, NULL), -EINVAL);
		kv_assert_rc(kv_pool_free(p, (char *)b1 + 1), -EINVAL); /* not a start */
		kv_assert_rc(kv_pool_free(p, (char *)b1 + 2016), -EINVAL);
		kv_assert_rc(kv_pool_free(p, (char *)b1 - 64), -EINVAL);
		kv_assert_rc(kv_pool_free_id(p, before.blocks_committed), -EINVAL); /* range */
		kv_assert_rc(kv_pool_free_id(p, KV_POOL_NO_ID), -EINVAL);
		kv_assert_rc(kv_pool_free_id(p, before.blocks_committed - 1), -EINVAL); /* never allocated */
		list[0] = i1;
		list[1] = i2;
		list[2] = i1;                                         /* listed twice */
		kv_assert_rc(kv_pool_free_n(p, 3, list), -EINVAL);
		list[2] = i3;                                         /* not allocated */
		kv_assert_rc(kv_pool_free_n(p, 3, list), -EINVAL);
		list[2] = 1u << 30;                                   /* out of range */
		kv_assert_rc(kv_pool_free_n(p, 3, list), -EINVAL);
		kv_assert_rc(kv_pool_free_n(p, 3, NULL), -EINVAL);
		kv_assert_rc(kv_pool_alloc(p, NULL, NULL), -EINVAL);
		kv_assert_rc(kv_pool_alloc_n(p, 2, NULL), -EINVAL);
		kv_assert_rc(kv_pool_alloc(NULL, &b3, &i3), -EINVAL);
		kv_assert_rc(kv_pool_free(NULL, b1), -EINVAL);
		kv_assert_rc(kv_pool_stats(p, NULL), -EINVAL);
		kv_assert_rc(kv_pool_destroy(p, 0x80), -EINVAL);

		after = stats_of(p);
		assert_same_stats(&before, &after);
		kv_assert_ok(kv_pool_validate(p));
		/* The two live blocks are still live, exactly once each. */
		list[0] = i1;
		list[1] = i2;
		kv_assert_ok(kv_pool_free_n(p, 2, list));
		kv_assert_rc(kv_pool_free(p, b1), -EINVAL);
		kv_assert_ok(kv_pool_validate(p));
		kv_assert_ok(kv_pool_destroy(p, 0));
		free(foreign);
	}
}

/* ---- Bulk ------------------------------------------------------------- */

static void test_bulk(void **state)
{
	const size_t stride = 16 * KiB;
	const uint32_t n = 256; /* 4 MiB */
	struct kv_pool_config cfg;
	struct kv_pool *p;
	struct kv_pool_stats before, after;
	uint32_t *ids = calloc(n + 1, sizeof(*ids));
	uint32_t one;

	(void)state;
	assert_non_null(ids);
	config(&cfg, stride, n * stride);
	cfg.chunk_bytes = MiB;
	kv_assert_ok(kv_pool_create(&cfg, &p));
	kv_assert_ok(kv_pool_alloc_n(p, 0, NULL));
	kv_assert_ok(kv_pool_alloc_n(p, 10, ids));
	for (uint32_t i = 0; i < 10; i++)
		for (uint32_t j = i + 1; j < 10; j++)
			assert_int_not_equal(ids[i], ids[j]);
	kv_assert_ok(kv_pool_validate(p));

	/* More than remain: refused, nothing taken, nothing committed. */
	before = stats_of(p);
	kv_assert_rc(kv_pool_alloc_n(p, n - 9, ids + 10), -ENOMEM);
	after = stats_of(p);
	assert_same_stats(&before, &after);
	kv_assert_ok(kv_pool_validate(p));

	/* Exactly what remains: fine (grows three chunks in one call). */
	kv_assert_ok(kv_pool_alloc_n(p, n - 10, ids + 10));
	kv_assert_rc(kv_pool_alloc(p, NULL, &one), -ENOMEM);
	after = stats_of(p);
	assert_int_equal(after.blocks_used, n);
	assert_int_equal(after.committed_bytes, n * stride);
	kv_assert_ok(kv_pool_validate(p));

	/* free_n refuses the whole list if one entry is bad. */
	ids[n] = ids[0];
	kv_assert_rc(kv_pool_free_n(p, n + 1, ids), -EINVAL);
	after = stats_of(p);
	assert_int_equal(after.blocks_used, n);
	kv_assert_ok(kv_pool_validate(p));
	kv_assert_ok(kv_pool_free_n(p, n, ids));
	kv_pool_flush(p);
	assert_int_equal(label_bytes("tpool"), 0);
	assert_int_equal(registry_total("tpool"), n * stride);
	kv_assert_ok(kv_pool_validate(p));
	kv_assert_ok(kv_pool_destroy(p, 0));
	free(ids);
}

/* ---- Fault injection -------------------------------------------------- */

struct fault_case {
	const char *name;
	struct kv_placement place;
	bool needs_thp;
};

static const unsigned fault_ops[] = { KV_OS_MMAP, KV_OS_MPROTECT, KV_OS_MADVISE, KV_OS_MLOCK,
				      KV_OS_BIND };
static const char *const fault_op_names[] = { "mmap", "mprotect", "madvise", "mlock", "bind" };

/* Allocate until the next allocation must grow the pool. */
static void alloc_until_grow(struct kv_pool *p, uint32_t *ids, uint32_t *n, uint32_t max)
{
	for (;;) {
		struct kv_pool_stats st = stats_of(p);

		if (st.blocks_used == st.blocks_committed)
			return;
		assert_true(*n < max);
		kv_assert_ok(kv_pool_alloc(p, NULL, &ids[(*n)++]));
	}
}

#define FAULT_IDS 1024

static struct kv_pool *fault_pool(const struct fault_case *fc, struct kv_budget *b)
{
	struct kv_pool_config cfg;
	struct kv_pool *p;

	config(&cfg, 64 * KiB, 64 * MiB);
	cfg.place = fc->place;
	cfg.chunk_bytes = 64 * KiB; /* one block per grow; THP rounds it to 2 MiB */
	cfg.budget = b;
	kv_assert_ok(kv_pool_create(&cfg, &p));
	return p;
}

static void fault_pool_done(struct kv_pool *p, uint32_t *ids, uint32_t n, struct kv_budget *b)
{
	struct kv_budget_usage u;

	kv_assert_ok(kv_pool_free_n(p, n, ids));
	kv_assert_ok(kv_pool_validate(p));
	kv_assert_ok(kv_pool_destroy(p, 0));
	kv_assert_ok(kv_budget_usage(b, KV_TIER_DRAM, KV_ANY, &u));
	assert_int_equal(u.used, 0);
}

/* Fail call nth of op during grow number `grow` (1: the first commit of a
 * fresh pool, 2: a later one) and check the outcome. Returns 1 if the
 * grow failed, 0 if it went through (degraded or not reached). */
static int inject_one(const struct fault_case *fc, struct kv_budget *b, size_t o,
		      unsigned nth, int grow)
{
	const unsigned op = fault_ops[o];
	struct kv_pool *p = fault_pool(fc, b);
	struct kv_pool_stats s0, s1;
	struct kv_budget_usage u;
	uint32_t *ids = calloc(FAULT_IDS, sizeof(*ids)), n = 0, id;
	unsigned long before;
	bool fired;
	int rc;

	assert_non_null(ids);
	if (grow == 2) {
		kv_assert_ok(kv_pool_alloc(p, NULL, &ids[n++]));
		alloc_until_grow(p, ids, &n, FAULT_IDS);
	}
	s0 = stats_of(p);
	kv_clear_error();
	before = kv_os_calls(op);
	kv_os_inject(op, nth, ENOMEM);
	rc = kv_pool_alloc(p, NULL, &id);
	kv_os_inject(op, 0, 0);
	fired = kv_os_calls(op) - before >= nth;
	s1 = stats_of(p);
	if (rc == 0) {
		ids[n++] = id;
		/* Only a step that may degrade lets the grow through. */
		if (fired && (fc->place.required || op == KV_OS_MPROTECT))
			fail_msg("%s: %s call %u of grow %d failed, yet the grow succeeded",
				 fc->name, fault_op_names[o], nth, grow);
		if (fired && s1.placement.degraded[0] == '\0')
			fail_msg("%s: %s call %u of grow %d failed, nothing says degraded",
				 fc->name, fault_op_names[o], nth, grow);
	} else {
		kv_assert_rc(rc, -ENOMEM);
		assert_true(fired);
		if (!strstr(kv_last_error(), "pool 'tpool'"))
			fail_msg("%s, %s call %u: detail '%s' does not name the pool", fc->name,
				 fault_op_names[o], nth, kv_last_error());
		assert_same_stats(&s0, &s1);
		kv_assert_ok(kv_pool_validate(p));
		/* Usable right after. */
		kv_assert_ok(kv_pool_alloc(p, NULL, &ids[n++]));
	}
	kv_assert_ok(kv_pool_validate(p));
	s1 = stats_of(p);
	assert_int_equal(registry_total("tpool"), s1.committed_bytes);
	kv_assert_ok(kv_budget_usage(b, KV_TIER_DRAM, KV_ANY, &u));
	assert_int_equal(u.used, s1.committed_bytes);
	fault_pool_done(p, ids, n, b);
	free(ids);
	return rc != 0;
}

static void run_fault_case(const struct fault_case *fc, struct kv_budget *b)
{
	unsigned tried = 0, failed = 0;

	for (size_t o = 0; o < KV_ARRAY_SIZE(fault_ops); o++) {
		const unsigned op = fault_ops[o];
		struct kv_pool *p = fault_pool(fc, b);
		uint32_t *ids = calloc(FAULT_IDS, sizeof(*ids)), n = 0;
		unsigned long calls[2], before;

		/* Learn how many calls of op the first and a later grow make. */
		assert_non_null(ids);
		for (int g = 0; g < 2; g++) {
			alloc_until_grow(p, ids, &n, FAULT_IDS);
			before = kv_os_calls(op);
			kv_assert_ok(kv_pool_alloc(p, NULL, &ids[n++]));
			calls[g] = kv_os_calls(op) - before;
		}
		fault_pool_done(p, ids, n, b);
		free(ids);

		for (int g = 0; g < 2; g++)
			for (unsigned nth = 1; nth <= calls[g]; nth++) {
				failed += (unsigned)inject_one(fc, b, o, nth, g + 1);
				tried++;
			}
	}
	print_message("    %-24s %2u injected failures: %2u failed the grow, %2u degraded\n",
		      fc->name, tried, failed, tried - failed);
}

static void test_fault_injection(void **state)
{
	const struct fault_case cases[] = {
		{ "base pages", { .numa = KV_NUMA_FIRST_TOUCH }, false },
		{ "thp", { .numa = KV_NUMA_FIRST_TOUCH, .huge = KV_HUGE_THP }, true },
		{ "thp required", { .numa = KV_NUMA_FIRST_TOUCH, .huge = KV_HUGE_THP,
				    .required = true }, true },
		{ "locked, prefaulted", { .numa = KV_NUMA_FIRST_TOUCH, .lock = true,
					  .prefault = true }, false },
		{ "locked required", { .numa = KV_NUMA_FIRST_TOUCH, .lock = true,
				       .required = true }, false },
		{ "bound to node 0", { .numa = KV_NUMA_BIND, .node = 0 }, false },
		{ "interleaved", { .numa = KV_NUMA_INTERLEAVE }, false },
		{ "hugetlb 2M (degrades)", { .numa = KV_NUMA_FIRST_TOUCH, .huge = KV_HUGE_2M }, false },
	};
	struct kv_pool_config cfg;
	struct kv_pool *p;
	struct kv_budget *b;
	uint64_t n;
	char *probe;
	bool can_lock;

	(void)state;
	/* Reserving the address space is the one mmap a pool makes itself. */
	config(&cfg, 64 * KiB, 64 * MiB);
	kv_os_inject(KV_OS_MMAP, 1, ENOMEM);
	kv_assert_rc(kv_pool_create(&cfg, &p), -ENOMEM);
	kv_os_inject(KV_OS_MMAP, 0, 0);
	kv_assert_ok(kv_registry_count(reg, KV_ANY, KV_ANY, KV_ANY, &n));
	assert_int_equal(n, 0);

	/* The required lock case needs RLIMIT_MEMLOCK for a few blocks. */
	probe = mmap(NULL, MiB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	can_lock = probe != MAP_FAILED && mlock(probe, MiB) == 0;
	if (probe != MAP_FAILED)
		munmap(probe, MiB);

	kv_assert_ok(kv_budget_create(&b));
	for (size_t i = 0; i < KV_ARRAY_SIZE(cases); i++) {
		if (cases[i].needs_thp && !kv_os_thp_available()) {
			print_message("    %-24s skipped: THP disabled here\n", cases[i].name);
			continue;
		}
		if (cases[i].place.lock && cases[i].place.required && !can_lock) {
			print_message("    %-24s skipped: RLIMIT_MEMLOCK below 1 MiB\n", cases[i].name);
			continue;
		}
		run_fault_case(&cases[i], b);
	}
	kv_assert_ok(kv_budget_destroy(b));
}

/* ---- Destroy, registry ------------------------------------------------ */

static void test_destroy_busy(void **state)
{
	struct kv_pool_config cfg;
	struct kv_pool *p;
	void *blk;
	uint32_t id, id2;
	uint64_t n;

	(void)state;
	config(&cfg, 8 * KiB, 4 * MiB);
	cfg.thread_cache = 4;
	kv_assert_ok(kv_pool_create(&cfg, &p));
	kv_assert_ok(kv_registry_count(reg, KV_ANY, KV_ANY, KV_ANY, &n));
	assert_int_equal(n, 2);
	kv_assert_ok(kv_pool_alloc(p, &blk, &id));
	kv_assert_ok(kv_pool_alloc(p, NULL, &id2));
	kv_assert_ok(kv_pool_free_id(p, id2)); /* cached: not "allocated" */
	kv_assert_rc(kv_pool_destroy(p, 0), -EBUSY);
	assert_non_null(strstr(kv_last_error(), "1 blocks"));
	kv_assert_ok(kv_pool_validate(p));
	kv_assert_ok(kv_pool_free(p, blk));
	kv_assert_ok(kv_pool_alloc(p, &blk, &id));
	kv_assert_ok(kv_pool_destroy(p, KV_POOL_FORCE));
	kv_assert_ok(kv_registry_count(reg, KV_ANY, KV_ANY, KV_ANY, &n));
	assert_int_equal(n, 0);
}

struct find_ctx {
	const char *label;
	uint32_t policy;
	int found;
};

static int find_label(const struct kv_record *r, void *arg)
{
	struct find_ctx *f = arg;

	if (strcmp(r->label, f->label) == 0) {
		f->policy = r->policy;
		f->found++;
	}
	return 0;
}

static void test_registry_records(void **state)
{
	struct kv_pool_config cfg;
	struct kv_pool *p;
	struct kv_pool_stats st;
	struct find_ctx f = { "tpool", 0, 0 }, ff = { "tpool/free", 0, 0 };
	uint32_t ids[40], want;
	uint64_t bytes;

	(void)state;
	config(&cfg, 64 * KiB, 32 * MiB);
	cfg.kind = KV_KIND_WEIGHTS;
	cfg.policy = KV_POLICY_SPILLABLE;
	cfg.place.lock = true;
	cfg.place.numa = KV_NUMA_BIND;
	cfg.place.node = 0;
	cfg.chunk_bytes = 2 * MiB;
	kv_assert_ok(kv_pool_create(&cfg, &p));
	kv_assert_ok(kv_pool_alloc_n(p, 40, ids));
	st = stats_of(p);
	want = KV_POLICY_SPILLABLE;
	if (st.placement.locked)
		want |= KV_POLICY_PINNED;
	if (st.placement.numa == KV_NUMA_BIND)
		want |= KV_POLICY_NUMA_BIND;
	kv_assert_ok(kv_registry_foreach(reg, find_label, &f));
	kv_assert_ok(kv_registry_foreach(reg, find_label, &ff));
	assert_int_equal(f.found, 1);
	assert_int_equal(ff.found, 1);
	assert_int_equal(f.policy, want);
	assert_int_equal(ff.policy, want);
	kv_assert_ok(kv_registry_bytes(reg, KV_TIER_DRAM, KV_ANY, KV_KIND_WEIGHTS, &bytes));
	assert_int_equal(bytes, st.committed_bytes);
	/* alloc_n moved the used count by 40 blocks, under the step of 64:
	 * the "used" record may lag; flush makes it exact. */
	kv_pool_flush(p);
	assert_int_equal(label_bytes("tpool"), 40 * 64 * KiB);
	kv_assert_ok(kv_pool_free_n(p, 40, ids));
	kv_pool_flush(p);
	assert_int_equal(label_bytes("tpool"), 0);
	assert_int_equal(label_bytes("tpool/free"), st.committed_bytes);
	kv_assert_ok(kv_pool_destroy(p, 0));
}

/* ---- Thread caches ---------------------------------------------------- */

struct worker {
	struct kv_pool *p;
	uint32_t to_free;    /* a block allocated by the main thread */
	int rc;
};

static void *cache_worker(void *arg)
{
	struct worker *w = arg;
	uint32_t ids[5];

	for (int i = 0; i < 5 && !w->rc; i++)
		w->rc = kv_pool_alloc(w->p, NULL, &ids[i]);
	for (int i = 0; i < 5 && !w->rc; i++)
		w->rc = kv_pool_free_id(w->p, ids[i]);
	if (!w->rc)
		w->rc = kv_pool_free_id(w->p, w->to_free);
	return NULL;
}

static void test_thread_cache(void **state)
{
	struct kv_pool_config cfg;
	struct kv_pool *p;
	struct kv_pool_stats st;
	struct worker w = { 0 };
	pthread_t th;
	uint32_t id, other, ids[20];

	(void)state;
	config(&cfg, 4 * KiB, 4 * MiB);
	cfg.thread_cache = 8;
	kv_assert_ok(kv_pool_create(&cfg, &p));

	/* A refill takes half the cache. */
	kv_assert_ok(kv_pool_alloc(p, NULL, &id));
	st = stats_of(p);
	assert_int_equal(st.blocks_cached, 3);
	assert_int_equal(st.blocks_used, 4);
	kv_assert_ok(kv_pool_free_id(p, id));
	kv_assert_rc(kv_pool_free_id(p, id), -EINVAL); /* caught though cached */
	st = stats_of(p);
	assert_int_equal(st.blocks_cached, 4);
	kv_assert_ok(kv_pool_validate(p));

	/* Overflow: a full cache gives half back. */
	for (int i = 0; i < 20; i++)
		kv_assert_ok(kv_pool_alloc(p, NULL, &ids[i]));
	for (int i = 0; i < 20; i++)
		kv_assert_ok(kv_pool_free_id(p, ids[i]));
	st = stats_of(p);
	assert_true(st.blocks_cached <= 8);
	kv_assert_ok(kv_pool_validate(p));

	kv_pool_flush(p);
	st = stats_of(p);
	assert_int_equal(st.blocks_cached, 0);
	assert_int_equal(st.blocks_used, 0);
	assert_int_equal(label_bytes("tpool"), 0);
	assert_int_equal(registry_total("tpool"), st.committed_bytes);

	/* A thread that exits returns its cache, including a block it
	 * freed for another thread (taken centrally: this thread's cache
	 * stays empty, so what the stats show is the worker's). */
	kv_assert_ok(kv_pool_alloc_n(p, 1, &other));
	w.p = p;
	w.to_free = other;
	assert_int_equal(pthread_create(&th, NULL, cache_worker, &w), 0);
	assert_int_equal(pthread_join(th, NULL), 0);
	kv_assert_ok(w.rc);
	st = stats_of(p);
	assert_int_equal(st.blocks_cached, 0);
	assert_int_equal(st.blocks_used, 0);
	assert_int_equal(label_bytes("tpool"), 0); /* thread exit publishes exactly */
	kv_assert_ok(kv_pool_validate(p));

	/* Destroy reclaims the caches of threads still running (here: this one). */
	kv_assert_ok(kv_pool_alloc(p, NULL, &id));
	kv_assert_ok(kv_pool_free_id(p, id));
	assert_true(stats_of(p).blocks_cached > 0);
	kv_assert_ok(kv_pool_destroy(p, 0));

	/* A new pool after destroy: no stale cache is used. */
	kv_assert_ok(kv_pool_create(&cfg, &p));
	kv_assert_ok(kv_pool_alloc(p, NULL, &id));
	kv_assert_ok(kv_pool_free_id(p, id));
	kv_assert_ok(kv_pool_validate(p));
	kv_assert_ok(kv_pool_destroy(p, 0));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_config_default),
		cmocka_unit_test_setup_teardown(test_create_bad, setup, teardown),
		cmocka_unit_test_setup_teardown(test_roundtrip, setup, teardown),
		cmocka_unit_test_setup_teardown(test_max_bytes_exact, setup, teardown),
		cmocka_unit_test_setup_teardown(test_budget_exact, setup, teardown),
		cmocka_unit_test_setup_teardown(test_bulk_refused_gives_back_chunks, setup, teardown),
		cmocka_unit_test_setup_teardown(test_policy_bits_are_obtained, setup, teardown),
		cmocka_unit_test_setup_teardown(test_bad_input, setup, teardown),
		cmocka_unit_test_setup_teardown(test_bulk, setup, teardown),
		cmocka_unit_test_setup_teardown(test_fault_injection, setup, teardown),
		cmocka_unit_test_setup_teardown(test_destroy_busy, setup, teardown),
		cmocka_unit_test_setup_teardown(test_registry_records, setup, teardown),
		cmocka_unit_test_setup_teardown(test_thread_cache, setup, teardown),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
