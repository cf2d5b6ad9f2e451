// SPDX-License-Identifier: MIT
/*
 * Tests of arenas: sub-allocation checked against a reference model (a
 * granule map of the region that predicts the exact best-fit address),
 * coalescing, bad input leaving the arena unchanged, the registry's
 * "<label>" + "<label>/free" split, budgets, every OS call of a creation
 * failed in turn through the seam, and what this machine gives for huge
 * pages, mlock beyond RLIMIT_MEMLOCK and NUMA binding.
 */
#include <inttypes.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/capability.h>

#include "kvtest.h"
#include "allocator/allocator-impl.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)
#define GRAIN 64u /* the arena's granularity, also its default alignment */

/* ---- Helpers ---------------------------------------------------------- */

static struct kv_registry *make_reg(void)
{
	struct kv_registry *reg = NULL;

	kv_assert_ok(kv_registry_create(NULL, &reg));
	return reg;
}

static struct kv_arena_config arena_cfg(struct kv_registry *reg, size_t bytes,
					const char *label)
{
	struct kv_arena_config cfg;

	kv_arena_config_default(&cfg);
	cfg.bytes = bytes;
	cfg.label = label;
	cfg.registry = reg;
	return cfg;
}

static struct kv_arena *make_arena(struct kv_registry *reg, size_t bytes, const char *label)
{
	struct kv_arena_config cfg = arena_cfg(reg, bytes, label);
	struct kv_arena *a = NULL;

	kv_assert_ok(kv_arena_create(&cfg, &a));
	assert_non_null(a);
	kv_assert_ok(kv_arena_validate(a));
	return a;
}

static struct kv_arena_stats stats_of(const struct kv_arena *a)
{
	struct kv_arena_stats st;

	kv_assert_ok(kv_arena_stats(a, &st));
	return st;
}

static void assert_stats_equal(const struct kv_arena_stats *x, const struct kv_arena_stats *y)
{
	assert_int_equal(x->bytes, y->bytes);
	assert_int_equal(x->used_bytes, y->used_bytes);
	assert_int_equal(x->free_bytes, y->free_bytes);
	assert_int_equal(x->largest_free, y->largest_free);
	assert_int_equal(x->high_water, y->high_water);
	assert_int_equal(x->n_allocs, y->n_allocs);
	assert_int_equal(x->n_free_ranges, y->n_free_ranges);
	assert_true(x->fragmentation == y->fragmentation);
	assert_int_equal(x->placement.huge, y->placement.huge);
	assert_int_equal(x->placement.node, y->placement.node);
	assert_int_equal(x->placement.locked, y->placement.locked);
	assert_string_equal(x->placement.degraded, y->placement.degraded);
}

static uint64_t label_bytes(struct kv_registry *reg, const char *label)
{
	struct kv_holder h;

	kv_assert_ok(kv_registry_label(reg, label, &h));
	return h.bytes;
}

static uint64_t reg_records(struct kv_registry *reg)
{
	uint64_t n = ~0ull;

	kv_assert_ok(kv_registry_count(reg, KV_ANY, KV_ANY, KV_ANY, &n));
	return n;
}

static uint64_t budget_used(struct kv_budget *b, int node)
{
	struct kv_budget_usage u;

	kv_assert_ok(kv_budget_usage(b, KV_TIER_DRAM, node, &u));
	return u.used;
}

/* The live record with this label (asserted to exist once). */
struct find_ctx {
	const char *label;
	struct kv_record rec;
	int found;
};

static int find_cb(const struct kv_record *rec, void *ctx)
{
	struct find_ctx *f = ctx;

	if (strcmp(rec->label, f->label) == 0) {
		f->rec = *rec;
		f->found++;
	}
	return 0;
}

static struct kv_record record_of(struct kv_registry *reg, const char *label)
{
	struct find_ctx f = { label, { 0 }, 0 };

	kv_assert_ok(kv_registry_foreach(reg, find_cb, &f));
	assert_int_equal(f.found, 1);
	return f.rec;
}

static uint64_t meminfo(const char *key)
{
	FILE *f = fopen("/proc/meminfo", "r");
	char line[256];
	unsigned long long v = 0;
	size_t n = strlen(key);

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		if (strncmp(line, key, n) == 0 && line[n] == ':') {
			v = strtoull(line + n + 1, NULL, 10);
			break;
		}
	fclose(f);
	return v;
}

/* Bytes of address space mapped by this process: a leaked reservation
 * shows up here (ASan sees malloc leaks, not mmap ones). */
static uint64_t mapped_bytes(void)
{
	FILE *f = fopen("/proc/self/maps", "r");
	char line[512];
	uint64_t sum = 0;

	assert_non_null(f);
	while (fgets(line, sizeof(line), f)) {
		unsigned long long lo, hi;

		if (sscanf(line, "%llx-%llx", &lo, &hi) == 2)
			sum += hi - lo;
	}
	fclose(f);
	return sum;
}

static void clear_detail(void)
{
	kv_clear_error();
	assert_string_equal(kv_last_error(), "");
}

/* ---- Names and defaults ----------------------------------------------- */

static void test_names_and_default(void **state)
{
	struct kv_arena_config cfg;

	(void)state;
	assert_string_equal(kv_numa_policy_name(KV_NUMA_LOCAL), "local");
	assert_string_equal(kv_numa_policy_name(KV_NUMA_BIND), "bind");
	assert_string_equal(kv_numa_policy_name(KV_NUMA_INTERLEAVE), "interleave");
	assert_string_equal(kv_numa_policy_name(KV_NUMA_FIRST_TOUCH), "first_touch");
	assert_null(kv_numa_policy_name((enum kv_numa_policy)4));
	assert_null(kv_numa_policy_name((enum kv_numa_policy)-1));
	assert_string_equal(kv_huge_name(KV_HUGE_NONE), "none");
	assert_string_equal(kv_huge_name(KV_HUGE_THP), "thp");
	assert_string_equal(kv_huge_name(KV_HUGE_2M), "2m");
	assert_string_equal(kv_huge_name(KV_HUGE_1G), "1g");
	assert_string_equal(kv_huge_name(KV_HUGE_AUTO), "auto");
	assert_null(kv_huge_name((enum kv_huge)5));

	kv_arena_config_default(&cfg);
	assert_int_equal(cfg.kind, KV_KIND_SCRATCH);
	assert_string_equal(cfg.label, "arena");
	assert_int_equal(cfg.place.numa, KV_NUMA_FIRST_TOUCH);
	assert_int_equal(cfg.place.huge, KV_HUGE_NONE);
	assert_false(cfg.place.lock);
	assert_false(cfg.place.required);
	assert_null(cfg.registry);
	assert_null(cfg.budget);
}

/* ---- Sub-allocation --------------------------------------------------- */

static void test_alloc_free_reset(void **state)
{
	struct kv_registry *reg = make_reg();
	struct kv_arena *a = make_arena(reg, 1 * MiB, "basic");
	struct kv_arena_stats st;
	char *base = kv_arena_base(a);
	void *p[4];

	(void)state;
	assert_int_equal(kv_arena_size(a), 1 * MiB);
	assert_non_null(base);
	st = stats_of(a);
	assert_int_equal(st.bytes, 1 * MiB);
	assert_int_equal(st.used_bytes, 0);
	assert_int_equal(st.free_bytes, 1 * MiB);
	assert_int_equal(st.largest_free, 1 * MiB);
	assert_int_equal(st.n_allocs, 0);
	assert_int_equal(st.n_free_ranges, 1);
	assert_true(st.fragmentation == 0.0);

	kv_assert_ok(kv_arena_alloc(a, 100, 0, &p[0]));
	kv_assert_ok(kv_arena_validate(a));
	assert_ptr_equal(p[0], base); /* first fit of an empty arena: the start */
	kv_assert_ok(kv_arena_alloc(a, 1, 4096, &p[1]));
	kv_assert_ok(kv_arena_validate(a));
	assert_int_equal((uintptr_t)p[1] % 4096, 0);
	kv_assert_ok(kv_arena_alloc(a, 3000, 8, &p[2]));
	kv_assert_ok(kv_arena_validate(a));
	assert_int_equal((uintptr_t)p[2] % GRAIN, 0); /* below 64 still gets 64 */
	kv_assert_ok(kv_arena_alloc(a, 64 * KiB, 64 * KiB, &p[3]));
	kv_assert_ok(kv_arena_validate(a));
	assert_int_equal((uintptr_t)p[3] % (64 * KiB), 0);

	memset(p[0], 1, 100);
	memset(p[1], 2, 1);
	memset(p[2], 3, 3000);
	memset(p[3], 4, 64 * KiB);
	st = stats_of(a);
	assert_int_equal(st.n_allocs, 4);
	assert_int_equal(st.used_bytes, 128 + 64 + 3008 + 64 * KiB);
	assert_int_equal(st.free_bytes, st.bytes - st.used_bytes);
	assert_int_equal(st.high_water, st.used_bytes);
	/* The 4096-aligned block left a gap after p[0]; best fit puts p[2]
	 * there rather than in the big range after p[1]. */
	assert_ptr_equal(p[2], base + 128);
	assert_int_equal(((char *)p[2])[2999], 3);

	kv_assert_ok(kv_arena_free(a, p[1]));
	kv_assert_ok(kv_arena_validate(a));
	assert_int_equal(((char *)p[3])[0], 4); /* neighbours untouched */
	kv_assert_ok(kv_arena_free(a, p[0]));
	kv_assert_ok(kv_arena_validate(a));
	st = stats_of(a);
	assert_int_equal(st.n_allocs, 2);
	assert_int_equal(st.used_bytes, 3008 + 64 * KiB);
	assert_int_equal(st.high_water, 128 + 64 + 3008 + 64 * KiB);
	assert_true(st.fragmentation > 0.0);

	kv_arena_reset(a);
	kv_assert_ok(kv_arena_validate(a));
	st = stats_of(a);
	assert_int_equal(st.n_allocs, 0);
	assert_int_equal(st.used_bytes, 0);
	assert_int_equal(st.n_free_ranges, 1);
	assert_int_equal(st.largest_free, 1 * MiB);
	assert_int_equal(st.high_water, 128 + 64 + 3008 + 64 * KiB); /* a peak stays */
	assert_int_equal(label_bytes(reg, "basic"), 0);
	assert_int_equal(label_bytes(reg, "basic/free"), 1 * MiB);
	/* After a reset, a pointer from before is no allocation any more. */
	kv_assert_rc(kv_arena_free(a, p[2]), -EINVAL);
	/* The whole region in one piece. */
	kv_assert_ok(kv_arena_alloc(a, 1 * MiB, 0, &p[0]));
	kv_assert_ok(kv_arena_validate(a));
	assert_ptr_equal(p[0], base);
	assert_int_equal(stats_of(a).free_bytes, 0);
	assert_true(stats_of(a).fragmentation == 0.0);
	kv_assert_ok(kv_arena_free(a, p[0]));

	kv_assert_ok(kv_arena_destroy(a, 0));
	kv_assert_ok(kv_arena_destroy(NULL, 0));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

static void test_coalescing(void **state)
{
	enum { N = 256 };
	struct kv_registry *reg = make_reg();
	struct kv_arena *a = make_arena(reg, 1 * MiB, "coalesce");
	struct kv_arena_stats st;
	uint64_t seed = 7;
	void *p[N];
	int order[N];

	(void)state;
	for (int i = 0; i < N; i++) {
		kv_assert_ok(kv_arena_alloc(a, 4 * KiB, 0, &p[i]));
		order[i] = i;
	}
	st = stats_of(a);
	assert_int_equal(st.free_bytes, 0);
	assert_int_equal(st.n_free_ranges, 0);
	kv_assert_rc(kv_arena_alloc(a, 1, 0, &p[0]), -ENOMEM);

	/* Every other block: N/2 separate holes, none bigger than a block. */
	for (int i = 0; i < N; i += 2) {
		kv_assert_ok(kv_arena_free(a, p[i]));
		kv_assert_ok(kv_arena_validate(a));
	}
	st = stats_of(a);
	assert_int_equal(st.n_free_ranges, N / 2);
	assert_int_equal(st.largest_free, 4 * KiB);
	assert_int_equal(st.free_bytes, N / 2 * 4 * KiB);
	assert_true(st.fragmentation > 0.99);
	kv_assert_rc(kv_arena_alloc(a, 8 * KiB, 0, &p[0]), -ENOMEM);
	assert_non_null(strstr(kv_last_error(), "largest free range is 4.00 KiB"));

	/* The rest in a shuffled order: each free joins zero, one or two
	 * neighbours, and the end is one range. */
	int odd[N / 2];
	for (int i = 0; i < N / 2; i++)
		odd[i] = order[2 * i + 1];
	for (int i = N / 2 - 1; i > 0; i--) {
		int j = (int)(kv_test_rand(&seed) % (uint64_t)(i + 1)), t = odd[i];

		odd[i] = odd[j];
		odd[j] = t;
	}
	for (int i = 0; i < N / 2; i++) {
		kv_assert_ok(kv_arena_free(a, p[odd[i]]));
		kv_assert_ok(kv_arena_validate(a));
	}
	st = stats_of(a);
	assert_int_equal(st.n_allocs, 0);
	assert_int_equal(st.n_free_ranges, 1);
	assert_int_equal(st.largest_free, st.bytes);
	assert_int_equal(st.free_bytes, st.bytes);
	assert_true(st.fragmentation == 0.0);
	kv_assert_ok(kv_arena_destroy(a, 0));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* The reference model: one byte per 64-byte granule, 1 = allocated. From
 * it, the arena's documented choice is predictable: the shortest maximal
 * free run that holds the block once aligned, the lowest such on a tie,
 * at the first aligned address in it. */
struct model {
	uint8_t *map;      /* (n) granules */
	size_t n;
	uintptr_t base;
};

/* Predicted offset of a block of `size` (a multiple of 64), or SIZE_MAX. */
static size_t model_predict(const struct model *m, size_t size, size_t align)
{
	size_t best = SIZE_MAX, best_len = SIZE_MAX, g = 0;

	while (g < m->n) {
		const uint8_t *hole = memchr(m->map + g, 0, m->n - g);
		size_t s, e, len, at;

		if (!hole)
			break;
		s = (size_t)(hole - m->map);
		const uint8_t *used = memchr(m->map + s, 1, m->n - s);
		e = used ? (size_t)(used - m->map) : m->n;
		g = e;
		len = (e - s) * GRAIN;
		if (len < size || len >= best_len)
			continue;
		at = (size_t)(((m->base + s * GRAIN + align - 1) & ~(uintptr_t)(align - 1)) - m->base);
		if (at + size > e * GRAIN)
			continue;
		best = at;
		best_len = len;
	}
	return best;
}

struct live {
	char *p;
	size_t bytes;
	uint8_t cookie;
};

static void model_mark(struct model *m, const struct live *l, uint8_t v)
{
	size_t g0 = (size_t)((uintptr_t)l->p - m->base) / GRAIN;
	size_t ng = (l->bytes + GRAIN - 1) / GRAIN;

	for (size_t g = g0; g < g0 + ng; g++) {
		assert_int_equal(m->map[g], !v); /* no overlap, no double clear */
		m->map[g] = v;
	}
}

static size_t pick_size(uint64_t *seed)
{
	uint64_t r = kv_test_rand(seed);

	switch (r % 10) {
	case 0:
		return 64 * KiB + (size_t)(r >> 8) % (448 * KiB);
	case 1: case 2: case 3:
		return 4 * KiB + (size_t)(r >> 8) % (60 * KiB);
	default:
		return 1 + (size_t)(r >> 8) % (4 * KiB);
	}
}

static size_t pick_align(uint64_t *seed)
{
	static const size_t aligns[] = { 0, 0, 0, 1, 8, 64, 128, 256, 4096, 4096, 65536,
					 2 * MiB };

	return aligns[kv_test_rand(seed) % KV_ARRAY_SIZE(aligns)];
}

static void test_random_against_model(void **state)
{
	enum { OPS = 4000, MAX_LIVE = 512 };
	struct kv_registry *reg = make_reg();
	struct kv_arena *a = make_arena(reg, 4 * MiB, "model");
	struct live live[MAX_LIVE];
	struct model m;
	size_t n_live = 0, used = 0, high = 0;
	unsigned allocs = 0, frees = 0, full = 0, resets = 0, bad = 0;
	uint64_t seed = 0x5eed0a7e4a;

	(void)state;
	m.n = kv_arena_size(a) / GRAIN;
	m.map = calloc(m.n, 1);
	m.base = (uintptr_t)kv_arena_base(a);
	assert_non_null(m.map);

	for (int op = 0; op < OPS; op++) {
		uint64_t r = kv_test_rand(&seed);

		if (r % 1000 == 0) {
			kv_arena_reset(a);
			memset(m.map, 0, m.n);
			n_live = used = 0;
			resets++;
		} else if (n_live && (n_live == MAX_LIVE || r % 100 < 45)) {
			size_t i = (size_t)(r >> 16) % n_live;
			struct live l = live[i];

			if (r % 100 == 0 && l.bytes > GRAIN) {
				/* An interior pointer: refused, nothing changes. */
				struct kv_arena_stats before = stats_of(a), after;

				clear_detail();
				kv_assert_rc(kv_arena_free(a, l.p + GRAIN), -EINVAL);
				assert_true(kv_last_error()[0] != '\0');
				after = stats_of(a);
				assert_stats_equal(&before, &after);
				bad++;
			}
			for (size_t b = 0; b < l.bytes; b++)
				if ((uint8_t)l.p[b] != l.cookie)
					fail_msg("op %d: block %p byte %zu overwritten", op,
						 (void *)l.p, b);
			kv_assert_ok(kv_arena_free(a, l.p));
			model_mark(&m, &l, 0);
			used -= kv_round_up(l.bytes, GRAIN);
			live[i] = live[--n_live];
			frees++;
		} else {
			size_t bytes = pick_size(&seed), align = pick_align(&seed);
			size_t eff = align < GRAIN ? GRAIN : align;
			size_t want = model_predict(&m, kv_round_up(bytes, GRAIN), eff);
			void *p = NULL;
			int rc = kv_arena_alloc(a, bytes, align, &p);

			if (want == SIZE_MAX) {
				if (rc != -ENOMEM)
					fail_msg("op %d: %zu bytes align %zu: model says no fit, "
						 "arena returned %d at %p", op, bytes, align, rc, p);
				assert_non_null(strstr(kv_last_error(), "largest free range"));
				full++;
			} else {
				if (rc != 0)
					fail_msg("op %d: %zu bytes align %zu: model fits at offset "
						 "%zu, arena failed: %s", op, bytes, align, want,
						 kv_last_error());
				assert_int_equal((uintptr_t)p - m.base, want);
				assert_int_equal((uintptr_t)p % eff, 0);
				assert_true((uintptr_t)p + bytes <= m.base + m.n * GRAIN);
				struct live l = { p, bytes, (uint8_t)(op * 31 + 1) };
				model_mark(&m, &l, 1);
				memset(p, l.cookie, bytes);
				live[n_live++] = l;
				used += kv_round_up(bytes, GRAIN);
				if (used > high)
					high = used;
				allocs++;
			}
		}
		kv_assert_ok(kv_arena_validate(a));
		struct kv_arena_stats st = stats_of(a);
		assert_int_equal(st.n_allocs, n_live);
		assert_int_equal(st.used_bytes, used);
		assert_int_equal(st.high_water, high);
		assert_int_equal(label_bytes(reg, "model"), used);
		assert_int_equal(label_bytes(reg, "model/free"), st.bytes - used);
	}
	printf("model: %u allocs, %u frees, %u full, %u resets, %u bad frees; %zu live at end\n",
	       allocs, frees, full, resets, bad, n_live);
	assert_true(allocs > 1000 && frees > 1000 && full > 10 && resets > 0 && bad > 0);

	while (n_live) {
		kv_assert_ok(kv_arena_free(a, live[--n_live].p));
		kv_assert_ok(kv_arena_validate(a));
	}
	assert_int_equal(stats_of(a).n_free_ranges, 1);
	free(m.map);
	kv_assert_ok(kv_arena_destroy(a, 0));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* ---- Bad input -------------------------------------------------------- */

static void expect_einval_unchanged(struct kv_registry *reg, struct kv_arena *a, int rc,
				    const struct kv_arena_stats *before, const char *what)
{
	struct kv_arena_stats after = stats_of(a);

	if (rc != -EINVAL)
		fail_msg("%s: returned %d, want -EINVAL", what, rc);
	if (kv_last_error()[0] == '\0')
		fail_msg("%s: no detail", what);
	printf("%-22s -> %s\n", what, kv_last_error());
	assert_stats_equal(before, &after);
	kv_assert_ok(kv_arena_validate(a));
	assert_int_equal(label_bytes(reg, "bad"), before->used_bytes);
	assert_int_equal(label_bytes(reg, "bad/free"), before->free_bytes);
}

static void test_bad_input(void **state)
{
	struct kv_registry *reg = make_reg();
	struct kv_arena *a = make_arena(reg, 1 * MiB, "bad");
	struct kv_arena_stats before;
	void *p = NULL, *q = NULL, *out = (void *)0x1;
	int on_stack = 0;
	char *heap = malloc(128);

	(void)state;
	assert_non_null(heap);
	kv_assert_ok(kv_arena_alloc(a, 1000, 0, &p));
	kv_assert_ok(kv_arena_alloc(a, 3000, 0, &q));
	kv_assert_ok(kv_arena_free(a, q)); /* q now names a freed block */
	before = stats_of(a);

	clear_detail();
	expect_einval_unchanged(reg, a, kv_arena_alloc(a, 100, 3, &out), &before, "align 3");
	assert_ptr_equal(out, (void *)0x1); /* out untouched on error */
	clear_detail();
	expect_einval_unchanged(reg, a, kv_arena_alloc(a, 100, 4 * MiB, &out), &before,
				"align 4 MiB");
	clear_detail();
	expect_einval_unchanged(reg, a, kv_arena_alloc(a, 0, 0, &out), &before, "bytes 0");
	clear_detail();
	expect_einval_unchanged(reg, a, kv_arena_alloc(a, 100, 0, NULL), &before, "NULL out");
	clear_detail();
	expect_einval_unchanged(reg, a, kv_arena_free(a, &on_stack), &before, "free stack ptr");
	clear_detail();
	expect_einval_unchanged(reg, a, kv_arena_free(a, heap), &before, "free heap ptr");
	clear_detail();
	expect_einval_unchanged(reg, a, kv_arena_free(a, NULL), &before, "free NULL");
	clear_detail();
	expect_einval_unchanged(reg, a, kv_arena_free(a, q), &before, "double free");
	clear_detail();
	expect_einval_unchanged(reg, a, kv_arena_free(a, (char *)p + 64), &before,
				"free interior (64)");
	clear_detail();
	expect_einval_unchanged(reg, a, kv_arena_free(a, (char *)p + 1), &before,
				"free interior (1)");
	clear_detail();
	expect_einval_unchanged(reg, a, kv_arena_free(a, (char *)kv_arena_base(a) + 1 * MiB),
				&before, "free one past end");
	assert_non_null(strstr(kv_last_error(), "outside"));

	kv_assert_ok(kv_arena_free(a, p));
	before = stats_of(a);
	assert_int_equal(before.n_allocs, 0);
	clear_detail();
	expect_einval_unchanged(reg, a, kv_arena_free(a, p), &before, "double free (empty)");
	free(heap);
	kv_assert_ok(kv_arena_destroy(a, 0));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

static void test_bad_config(void **state)
{
	struct kv_registry *reg = make_reg();
	struct kv_arena_config cfg;
	struct kv_arena *a = NULL;
	char long_label[KV_LABEL_MAX + 2];

	(void)state;
	cfg = arena_cfg(reg, 0, "cfg");
	kv_assert_rc(kv_arena_create(&cfg, &a), -EINVAL);
	assert_non_null(strstr(kv_last_error(), "size 0"));
	cfg = arena_cfg(reg, MiB, "cfg");
	kv_assert_rc(kv_arena_create(NULL, &a), -EINVAL);
	kv_assert_rc(kv_arena_create(&cfg, NULL), -EINVAL);

	/* "<label>/free" must fit the registry's label limit too. */
	memset(long_label, 'x', sizeof(long_label));
	long_label[KV_LABEL_MAX - 4] = '\0';
	cfg.label = long_label;
	kv_assert_rc(kv_arena_create(&cfg, &a), -EINVAL);
	assert_non_null(strstr(kv_last_error(), "label longer"));
	long_label[KV_LABEL_MAX - 5] = '\0';
	kv_assert_ok(kv_arena_create(&cfg, &a));
	kv_assert_ok(kv_arena_destroy(a, 0));
	a = NULL;

	cfg = arena_cfg(reg, MiB, "cfg");
	cfg.kind = KV_KIND_COUNT;
	kv_assert_rc(kv_arena_create(&cfg, &a), -EINVAL);
	cfg = arena_cfg(reg, MiB, "cfg");
	cfg.policy = 1u << 20;
	kv_assert_rc(kv_arena_create(&cfg, &a), -EINVAL);
	cfg = arena_cfg(reg, MiB, "cfg");
	cfg.place.numa = (enum kv_numa_policy)9;
	kv_assert_rc(kv_arena_create(&cfg, &a), -EINVAL);
	cfg = arena_cfg(reg, MiB, "cfg");
	cfg.place.huge = (enum kv_huge)9;
	kv_assert_rc(kv_arena_create(&cfg, &a), -EINVAL);
	cfg = arena_cfg(reg, SIZE_MAX - 4096, "cfg");
	assert_true(kv_arena_create(&cfg, &a) < 0);
	assert_null(a);
	assert_int_equal(reg_records(reg), 0);

	/* NULL label is the default one. */
	cfg = arena_cfg(reg, 100, NULL);
	kv_assert_ok(kv_arena_create(&cfg, &a));
	assert_int_equal(kv_arena_size(a), kv_os_page_size()); /* rounded to the page */
	assert_int_equal(label_bytes(reg, "arena/free"), kv_os_page_size());
	kv_assert_ok(kv_arena_destroy(a, 0));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

static void test_full(void **state)
{
	struct kv_registry *reg = make_reg();
	struct kv_arena *a = make_arena(reg, 1 * MiB, "full");
	struct kv_arena_stats before;
	void *p, *q, *r;

	(void)state;
	kv_assert_ok(kv_arena_alloc(a, 512 * KiB, 0, &p));
	kv_assert_ok(kv_arena_alloc(a, 256 * KiB, 0, &q));
	kv_assert_ok(kv_arena_alloc(a, 256 * KiB - 64, 0, &r));
	kv_assert_ok(kv_arena_free(a, q));
	before = stats_of(a);
	assert_int_equal(before.largest_free, 256 * KiB);
	kv_assert_rc(kv_arena_alloc(a, 300 * KiB, 0, &q), -ENOMEM);
	printf("full: %s\n", kv_last_error());
	assert_non_null(strstr(kv_last_error(), "largest free range is 256.00 KiB"));
	assert_non_null(strstr(kv_last_error(), "'full'"));
	kv_assert_rc(kv_arena_alloc(a, 2 * MiB, 0, &q), -ENOMEM);
	kv_assert_rc(kv_arena_alloc(a, SIZE_MAX, 0, &q), -ENOMEM);
	/* The free range [512 KiB, 768 KiB) fits the size but not at this
	 * alignment, unless the mapping puts a 1 MiB boundary early enough in
	 * it (the first 1 MiB-aligned start must leave 64 KiB before its end). */
	uintptr_t lo = (uintptr_t)kv_arena_base(a) + 512 * KiB;
	uintptr_t aligned = (lo + MiB - 1) & ~(uintptr_t)(MiB - 1);

	if (aligned + 64 * KiB > lo + 256 * KiB) {
		kv_assert_rc(kv_arena_alloc(a, 64 * KiB, MiB, &q), -ENOMEM);
		assert_non_null(strstr(kv_last_error(), "too small once aligned"));
	}
	{
		struct kv_arena_stats after = stats_of(a);

		assert_stats_equal(&before, &after);
	}
	kv_assert_ok(kv_arena_validate(a));
	kv_assert_ok(kv_arena_alloc(a, 256 * KiB, 0, &q));
	assert_int_equal(stats_of(a).free_bytes, 64);
	kv_assert_ok(kv_arena_alloc(a, 1, 0, &p));
	kv_assert_rc(kv_arena_alloc(a, 1, 0, &p), -ENOMEM);
	assert_non_null(strstr(kv_last_error(), "largest free range is 0 B"));
	kv_assert_ok(kv_arena_destroy(a, KV_ARENA_FORCE));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* ---- Registry and budget ---------------------------------------------- */

static void test_registry_records(void **state)
{
	struct kv_registry *reg = make_reg();
	struct kv_arena_config cfg = arena_cfg(reg, 2 * MiB, "tensors");
	struct kv_arena *a = NULL, *b = NULL;
	struct kv_record used, fr;
	uint64_t total = 0;
	void *p, *q;

	(void)state;
	cfg.kind = KV_KIND_ACTIVATIONS;
	/* HUGEPAGE and PINNED asked in the policy but not obtained: the
	 * registry must not claim them. */
	cfg.policy = KV_POLICY_EVICTABLE | KV_POLICY_HUGEPAGE | KV_POLICY_PINNED;
	kv_assert_ok(kv_arena_create(&cfg, &a));
	used = record_of(reg, "tensors");
	fr = record_of(reg, "tensors/free");
	assert_int_equal(used.bytes, 0);
	assert_int_equal(fr.bytes, 2 * MiB);
	assert_int_equal(used.tier, KV_TIER_DRAM);
	assert_int_equal(used.kind, KV_KIND_ACTIVATIONS);
	assert_int_equal(fr.kind, KV_KIND_ACTIVATIONS);
	assert_int_equal(used.node, 0);
	assert_int_equal(used.policy, KV_POLICY_EVICTABLE);
	assert_int_equal(fr.policy, KV_POLICY_EVICTABLE);

	kv_assert_ok(kv_arena_alloc(a, 1000, 0, &p));
	assert_int_equal(label_bytes(reg, "tensors"), 1024);
	assert_int_equal(label_bytes(reg, "tensors/free"), 2 * MiB - 1024);
	kv_assert_ok(kv_arena_alloc(a, 300 * KiB, 4096, &q));
	assert_int_equal(label_bytes(reg, "tensors") + label_bytes(reg, "tensors/free"), 2 * MiB);
	kv_assert_ok(kv_registry_bytes(reg, KV_TIER_DRAM, KV_ANY, KV_KIND_ACTIVATIONS, &total));
	assert_int_equal(total, 2 * MiB);
	kv_assert_ok(kv_arena_free(a, p));
	assert_int_equal(label_bytes(reg, "tensors"), 300 * KiB);
	kv_assert_ok(kv_registry_validate(reg));

	/* A second arena in the same registry keeps its own pair. */
	cfg = arena_cfg(reg, 1 * MiB, "other");
	kv_assert_ok(kv_arena_create(&cfg, &b));
	kv_assert_ok(kv_arena_alloc(b, 10, 0, &p));
	assert_int_equal(label_bytes(reg, "other"), 64);
	assert_int_equal(label_bytes(reg, "tensors"), 300 * KiB);
	assert_int_equal(reg_records(reg), 4);

	/* Destroy with a live allocation: -EBUSY and nothing changes. */
	clear_detail();
	kv_assert_rc(kv_arena_destroy(a, 0), -EBUSY);
	assert_non_null(strstr(kv_last_error(), "tensors"));
	kv_assert_ok(kv_arena_validate(a));
	assert_int_equal(reg_records(reg), 4);
	assert_int_equal(label_bytes(reg, "tensors"), 300 * KiB);
	kv_assert_rc(kv_arena_destroy(a, 0x10), -EINVAL);
	kv_assert_ok(kv_arena_destroy(a, KV_ARENA_FORCE));
	assert_int_equal(reg_records(reg), 2);
	kv_assert_ok(kv_arena_free(b, p));
	kv_assert_ok(kv_arena_destroy(b, 0));
	assert_int_equal(reg_records(reg), 0);
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* The second record cannot be made (label table full): the first is
 * forgotten and the region released. */
static void test_registry_full(void **state)
{
	struct kv_registry_config rc;
	struct kv_registry *reg = NULL;
	struct kv_budget *b = NULL;
	struct kv_arena_config cfg;
	struct kv_arena *a = NULL;
	uint64_t mapped = mapped_bytes();

	(void)state;
	kv_registry_config_default(&rc);
	rc.max_labels = 1;
	kv_assert_ok(kv_registry_create(&rc, &reg));
	kv_assert_ok(kv_budget_create(&b));
	cfg = arena_cfg(reg, 8 * MiB, "one");
	cfg.budget = b;
	clear_detail();
	kv_assert_rc(kv_arena_create(&cfg, &a), -ENOSPC);
	printf("registry full: %s\n", kv_last_error());
	assert_non_null(strstr(kv_last_error(), "arena 'one'"));
	assert_null(a);
	assert_int_equal(reg_records(reg), 0);
	assert_int_equal(budget_used(b, KV_ANY), 0);
	assert_true(mapped_bytes() < mapped + 8 * MiB);
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_budget_destroy(b));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

static void test_default_registry(void **state)
{
	struct kv_arena_config cfg;
	struct kv_arena *a = NULL;
	struct kv_registry *def = kv_registry_default();
	uint64_t before = 0, during = 0, after = 0;

	(void)state;
	assert_non_null(def);
	kv_arena_config_default(&cfg);
	cfg.bytes = 1 * MiB;
	kv_assert_ok(kv_registry_bytes(def, KV_TIER_DRAM, KV_ANY, KV_KIND_SCRATCH, &before));
	kv_assert_ok(kv_arena_create(&cfg, &a));
	kv_assert_ok(kv_registry_bytes(def, KV_TIER_DRAM, KV_ANY, KV_KIND_SCRATCH, &during));
	assert_int_equal(during - before, 1 * MiB);
	kv_assert_ok(kv_arena_destroy(a, 0));
	kv_assert_ok(kv_registry_bytes(def, KV_TIER_DRAM, KV_ANY, KV_KIND_SCRATCH, &after));
	assert_int_equal(after, before);
}

static void test_budget(void **state)
{
	struct kv_registry *reg = make_reg();
	struct kv_budget *b = NULL;
	struct kv_arena_config cfg = arena_cfg(reg, 2 * MiB, "budgeted");
	struct kv_arena *a = NULL, *a2 = NULL;
	uint64_t mapped;

	(void)state;
	kv_assert_ok(kv_budget_create(&b));
	kv_assert_ok(kv_budget_set(b, KV_TIER_DRAM, KV_ANY, 3 * MiB));
	cfg.budget = b;

	mapped = mapped_bytes();
	cfg.bytes = 4 * MiB;
	clear_detail();
	kv_assert_rc(kv_arena_create(&cfg, &a), -ENOMEM);
	printf("over budget: %s\n", kv_last_error());
	assert_non_null(strstr(kv_last_error(), "budgeted"));
	assert_null(a);
	assert_int_equal(budget_used(b, KV_ANY), 0);
	assert_int_equal(reg_records(reg), 0);
	assert_true(mapped_bytes() < mapped + 4 * MiB);

	cfg.bytes = 2 * MiB;
	kv_assert_ok(kv_arena_create(&cfg, &a));
	assert_int_equal(budget_used(b, KV_ANY), 2 * MiB);
	kv_assert_rc(kv_arena_create(&cfg, &a2), -ENOMEM); /* 2 + 2 > 3 */
	assert_int_equal(budget_used(b, KV_ANY), 2 * MiB);
	assert_int_equal(reg_records(reg), 2);

	/* Bound to node 0: charged to the node as well as the tier. */
	cfg.bytes = 1 * MiB;
	cfg.place.numa = KV_NUMA_BIND;
	cfg.place.node = 0;
	kv_assert_ok(kv_budget_set(b, KV_TIER_DRAM, 0, 512 * KiB));
	kv_assert_rc(kv_arena_create(&cfg, &a2), -ENOMEM);
	assert_int_equal(budget_used(b, 0), 0);
	kv_assert_ok(kv_budget_set(b, KV_TIER_DRAM, 0, KV_BUDGET_UNLIMITED));
	kv_assert_ok(kv_arena_create(&cfg, &a2));
	assert_int_equal(budget_used(b, 0), 1 * MiB);
	assert_int_equal(budget_used(b, KV_ANY), 3 * MiB);

	kv_assert_ok(kv_arena_destroy(a2, 0));
	assert_int_equal(budget_used(b, 0), 0);
	kv_assert_rc(kv_budget_destroy(b), -EBUSY);
	kv_assert_ok(kv_arena_destroy(a, 0));
	assert_int_equal(budget_used(b, KV_ANY), 0);
	kv_assert_ok(kv_budget_destroy(b));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* ---- Fault injection -------------------------------------------------- */

static const struct {
	unsigned op;
	const char *name;
	bool optional; /* a failure degrades unless `required` */
} fault_ops[] = {
	{ KV_OS_MMAP, "mmap", false },
	{ KV_OS_MPROTECT, "mprotect", false },
	{ KV_OS_MADVISE, "madvise", true },
	{ KV_OS_MLOCK, "mlock", true },
	{ KV_OS_BIND, "bind", true },
};

/* The policy bits of a record must say what the arena obtained. */
static void check_policy_bits(struct kv_registry *reg, const char *label,
			      const struct kv_placement_result *res)
{
	struct kv_record rec = record_of(reg, label);

	assert_int_equal(!!(rec.policy & KV_POLICY_HUGEPAGE), res->huge != KV_HUGE_NONE);
	assert_int_equal(!!(rec.policy & KV_POLICY_PINNED), res->locked);
	assert_int_equal(!!(rec.policy & KV_POLICY_NUMA_BIND),
			 (res->numa == KV_NUMA_BIND || res->numa == KV_NUMA_LOCAL) && res->node >= 0);
}

static void fault_config(struct kv_arena_config *cfg, int variant)
{
	if (variant == 0)
		return; /* plain: first touch, base pages */
	cfg->place.numa = KV_NUMA_BIND;
	cfg->place.node = 0;
	cfg->place.huge = kv_os_thp_available() ? KV_HUGE_THP : KV_HUGE_NONE;
	cfg->place.lock = true;
	cfg->place.prefault = true;
	cfg->place.required = variant == 2;
}

static void test_fault_injection(void **state)
{
	static const char *const variants[] = { "plain", "bind+thp+lock", "required" };
	static const int errs[] = { ENOMEM, EIO };
	struct kv_registry *reg = make_reg();
	struct kv_budget *b = NULL;
	unsigned failed = 0, degraded = 0;

	(void)state;
	kv_assert_ok(kv_budget_create(&b));
	for (int v = 0; v < 3; v++) {
		for (size_t o = 0; o < KV_ARRAY_SIZE(fault_ops); o++) {
			struct kv_arena_config cfg = arena_cfg(reg, 8 * MiB, "faulty");
			struct kv_arena *a = NULL;
			unsigned long calls;

			cfg.budget = b;
			fault_config(&cfg, v);
			calls = kv_os_calls(fault_ops[o].op);
			kv_assert_ok(kv_arena_create(&cfg, &a));
			calls = kv_os_calls(fault_ops[o].op) - calls;
			kv_assert_ok(kv_arena_destroy(a, 0));
			printf("%-14s %-9s %lu call(s)\n", variants[v], fault_ops[o].name, calls);

			for (unsigned n = 1; n <= calls; n++) {
				for (size_t e = 0; e < KV_ARRAY_SIZE(errs); e++) {
					uint64_t mapped = mapped_bytes();
					int rc;

					a = NULL;
					clear_detail();
					kv_os_inject(fault_ops[o].op, n, errs[e]);
					rc = kv_arena_create(&cfg, &a);
					kv_os_inject(fault_ops[o].op, 0, 0);
					if (rc) {
						failed++;
						printf("  %s #%u gets %s -> fails: %s\n",
						       fault_ops[o].name, n, kv_strerror(-errs[e]),
						       kv_last_error());
						assert_null(a);
						assert_true(kv_last_error()[0] != '\0');
						if (fault_ops[o].optional && !cfg.place.required)
							fail_msg("optional %s failed the creation",
								 fault_ops[o].name);
						assert_int_equal(reg_records(reg), 0);
						assert_int_equal(budget_used(b, KV_ANY), 0);
						assert_int_equal(budget_used(b, 0), 0);
						assert_true(mapped_bytes() < mapped + cfg.bytes);
						kv_assert_ok(kv_registry_validate(reg));
					} else {
						struct kv_arena_stats st = stats_of(a);
						void *p;

						degraded++;
						printf("  %s #%u gets %s -> degrades: %s\n",
						       fault_ops[o].name, n, kv_strerror(-errs[e]),
						       st.placement.degraded);
						if (!fault_ops[o].optional || cfg.place.required)
							fail_msg("%s failure did not fail the creation",
								 fault_ops[o].name);
						assert_true(st.placement.degraded[0] != '\0');
						check_policy_bits(reg, "faulty", &st.placement);
						kv_assert_ok(kv_arena_alloc(a, MiB, 0, &p));
						memset(p, 0x77, MiB);
						kv_assert_ok(kv_arena_validate(a));
						assert_int_equal(budget_used(b, KV_ANY), st.bytes);
						kv_assert_ok(kv_arena_destroy(a, KV_ARENA_FORCE));
						assert_int_equal(reg_records(reg), 0);
						assert_int_equal(budget_used(b, KV_ANY), 0);
					}
					/* The next creation, without injection, works
					 * and gets everything. */
					kv_assert_ok(kv_arena_create(&cfg, &a));
					if (v)
						assert_string_equal(stats_of(a).placement.degraded, "");
					kv_assert_ok(kv_arena_destroy(a, 0));
				}
			}
		}
	}
	printf("fault injection: %u creations failed cleanly, %u degraded\n", failed, degraded);
	assert_true(failed > 0 && degraded > 0);
	kv_assert_ok(kv_budget_destroy(b));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* ---- Huge pages, mlock, NUMA on this machine ------------------------- */

static void test_huge_pages(void **state)
{
	struct kv_registry *reg = make_reg();
	struct kv_arena_config cfg = arena_cfg(reg, 4 * MiB, "huge");
	struct kv_arena *a = NULL;
	struct kv_arena_stats st;
	uint64_t free2m = meminfo("HugePages_Free");
	void *p;

	(void)state;
	printf("HugePages_Free %" PRIu64 " (Hugepagesize %" PRIu64 " kB), THP %s\n", free2m,
	       meminfo("Hugepagesize"), kv_os_thp_available() ? "available" : "off");

	cfg.place.huge = KV_HUGE_AUTO;
	cfg.place.prefault = true;
	kv_assert_ok(kv_arena_create(&cfg, &a));
	st = stats_of(a);
	printf("AUTO: %s, page %" PRIu64 " B, degraded '%s'\n", kv_huge_name(st.placement.huge),
	       st.placement.page_bytes, st.placement.degraded);
	if (free2m * 2 * MiB >= 4 * MiB) {
		assert_true(st.placement.huge == KV_HUGE_2M || st.placement.huge == KV_HUGE_1G);
	} else if (kv_os_thp_available()) {
		assert_int_equal(st.placement.huge, KV_HUGE_THP);
		assert_int_equal(st.placement.page_bytes, 2 * MiB);
	} else {
		assert_int_equal(st.placement.huge, KV_HUGE_NONE);
		assert_int_equal(st.placement.page_bytes, kv_os_page_size());
	}
	check_policy_bits(reg, "huge", &st.placement);
	if (st.placement.huge != KV_HUGE_NONE)
		assert_int_equal((uintptr_t)kv_arena_base(a) % (2 * MiB), 0);
	/* A 2 MiB-aligned tensor lands on a huge page boundary. */
	kv_assert_ok(kv_arena_alloc(a, 3 * MiB, 2 * MiB, &p));
	assert_int_equal((uintptr_t)p % (2 * MiB), 0);
	kv_assert_ok(kv_arena_destroy(a, KV_ARENA_FORCE));

	cfg.place.huge = KV_HUGE_2M;
	a = NULL;
	if (free2m >= 2) {
		printf("2 MiB pages free: checking 2M is obtained (no failure case here)\n");
		kv_assert_ok(kv_arena_create(&cfg, &a));
		assert_int_equal(stats_of(a).placement.huge, KV_HUGE_2M);
		kv_assert_ok(kv_arena_destroy(a, 0));
	} else {
		int rc;

		cfg.place.required = true;
		clear_detail();
		rc = kv_arena_create(&cfg, &a);
		printf("2M required: %s: %s\n", kv_strerror(rc), kv_last_error());
		assert_true(rc == -ENOTSUP || rc == -ENOMEM);
		assert_null(a);
		assert_int_equal(reg_records(reg), 0);

		cfg.place.required = false;
		kv_assert_ok(kv_arena_create(&cfg, &a));
		st = stats_of(a);
		printf("2M not required: %s, degraded '%s'\n", kv_huge_name(st.placement.huge),
		       st.placement.degraded);
		assert_true(st.placement.huge != KV_HUGE_2M);
		assert_true(st.placement.degraded[0] != '\0');
		check_policy_bits(reg, "huge", &st.placement);
		kv_assert_ok(kv_arena_destroy(a, 0));
	}
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* Child exit codes of the mlock test. */
enum {
	CHILD_OK = 0,
	CHILD_DEGRADE_FAILED = 1,
	CHILD_NOT_DEGRADED = 2,
	CHILD_REQUIRED_SUCCEEDED = 3,
	CHILD_LEFT_RECORDS = 4,
	CHILD_SETUP = 5,
	CHILD_SKIP = KV_TEST_SKIP,
};

/* Drop CAP_IPC_LOCK from the effective, permitted and inheritable sets,
 * so RLIMIT_MEMLOCK applies even to root. */
static int drop_ipc_lock(void)
{
	struct __user_cap_header_struct hdr = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct data[2];
	uint32_t bit = UINT32_C(1) << (CAP_IPC_LOCK % 32);

	memset(data, 0, sizeof(data));
	if (syscall(SYS_capget, &hdr, data) != 0)
		return -errno;
	data[CAP_IPC_LOCK / 32].effective &= ~bit;
	data[CAP_IPC_LOCK / 32].permitted &= ~bit;
	data[CAP_IPC_LOCK / 32].inheritable &= ~bit;
	if (syscall(SYS_capset, &hdr, data) != 0)
		return -errno;
	return 0;
}

static int mlock_child(void)
{
	struct rlimit rl = { 64 * KiB, 64 * KiB };
	struct kv_registry *reg = NULL;
	struct kv_arena_config cfg;
	struct kv_arena *a = NULL;
	struct kv_arena_stats st;
	size_t probe_len = 1 * MiB;
	char *probe;
	int rc;

	if (setrlimit(RLIMIT_MEMLOCK, &rl) != 0) {
		printf("SKIP mlock: setrlimit: %s\n", strerror(errno));
		return CHILD_SKIP;
	}
	if (geteuid() == 0 && (rc = drop_ipc_lock()) != 0) {
		printf("SKIP mlock: dropping CAP_IPC_LOCK: %s\n", strerror(-rc));
		return CHILD_SKIP;
	}
	/* Make sure the limit now bites, else the test would prove nothing. */
	probe = mmap(NULL, probe_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (probe == MAP_FAILED)
		return CHILD_SETUP;
	/* The raw system call, as libkv makes it: sanitizers turn mlock()
	 * into a no-op. */
	if (syscall(SYS_mlock, probe, probe_len) == 0) {
		printf("SKIP mlock: 1 MiB still lockable under a 64 KiB RLIMIT_MEMLOCK "
		       "(a capability kept)\n");
		munmap(probe, probe_len);
		return CHILD_SKIP;
	}
	munmap(probe, probe_len);

	if (kv_registry_create(NULL, &reg) != 0)
		return CHILD_SETUP;
	kv_arena_config_default(&cfg);
	cfg.bytes = 4 * MiB;
	cfg.label = "locked";
	cfg.registry = reg;
	cfg.place.lock = true;
	rc = kv_arena_create(&cfg, &a);
	if (rc != 0) {
		printf("lock, not required: %s: %s\n", kv_strerror(rc), kv_last_error());
		return CHILD_DEGRADE_FAILED;
	}
	kv_arena_stats(a, &st);
	printf("lock, not required: locked %d, degraded '%s'\n", st.placement.locked,
	       st.placement.degraded);
	if (st.placement.locked || !st.placement.degraded[0])
		return CHILD_NOT_DEGRADED;
	kv_arena_destroy(a, 0);
	a = NULL;

	cfg.place.required = true;
	rc = kv_arena_create(&cfg, &a);
	printf("lock, required: %s: %s\n", kv_strerror(rc), kv_last_error());
	if (rc != -EPERM && rc != -ENOMEM)
		return CHILD_REQUIRED_SUCCEEDED;
	if (kv_registry_destroy(reg, 0) != 0)
		return CHILD_LEFT_RECORDS;
	return CHILD_OK;
}

static void test_mlock_rlimit(void **state)
{
	pid_t pid;
	int status = 0;

	(void)state;
	fflush(stdout);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		int code = mlock_child();

		fflush(stdout);
		_exit(code);
	}
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	if (WEXITSTATUS(status) == CHILD_SKIP) {
		printf("mlock beyond RLIMIT_MEMLOCK not checked (see the child's reason)\n");
		return;
	}
	if (WEXITSTATUS(status) != CHILD_OK)
		fail_msg("mlock child failed with code %d", WEXITSTATUS(status));
}

static void test_numa(void **state)
{
	struct kv_registry *reg = make_reg();
	struct kv_arena_config cfg = arena_cfg(reg, 4 * MiB, "numa");
	struct kv_arena *a = NULL;
	struct kv_arena_stats st;
	uint64_t nodes = kv_numa_nodes();
	int missing = 0, last = 63 - __builtin_clzll(nodes);

	(void)state;
	assert_true(nodes & 1);
	cfg.place.numa = KV_NUMA_BIND;
	cfg.place.node = 0;
	cfg.place.prefault = true;
	kv_assert_ok(kv_arena_create(&cfg, &a));
	st = stats_of(a);
	printf("bind node 0: numa %s node %d verified %d degraded '%s'\n",
	       kv_numa_policy_name(st.placement.numa), st.placement.node, st.placement.verified,
	       st.placement.degraded);
	assert_int_equal(st.placement.numa, KV_NUMA_BIND);
	assert_int_equal(st.placement.node, 0);
	assert_true(st.placement.prefaulted);
	assert_int_not_equal(st.placement.verified, -1);
	assert_int_equal(record_of(reg, "numa").node, 0);
	check_policy_bits(reg, "numa", &st.placement);
	kv_assert_ok(kv_arena_destroy(a, 0));

	/* LOCAL resolves to the calling thread's node. */
	cfg.place.numa = KV_NUMA_LOCAL;
	kv_assert_ok(kv_arena_create(&cfg, &a));
	st = stats_of(a);
	assert_true(st.placement.node >= 0 && (nodes & (UINT64_C(1) << st.placement.node)));
	assert_int_equal(record_of(reg, "numa").node, st.placement.node);
	kv_assert_ok(kv_arena_destroy(a, 0));

	while (missing < 63 && (nodes & (UINT64_C(1) << missing)))
		missing++;
	cfg.place.numa = KV_NUMA_BIND;
	cfg.place.node = missing;
	clear_detail();
	kv_assert_rc(kv_arena_create(&cfg, &a), -ENODEV);
	printf("bind node %d: %s\n", missing, kv_last_error());
	assert_true(kv_last_error()[0] != '\0');
	assert_int_equal(reg_records(reg), 0);

	if (__builtin_popcountll(nodes) > 1) {
		uint64_t where = 0;

		cfg.place.node = last;
		cfg.place.required = true;
		kv_assert_ok(kv_arena_create(&cfg, &a));
		st = stats_of(a);
		assert_int_equal(st.placement.node, last);
		assert_int_equal(record_of(reg, "numa").node, last);
		if (kv_os_memlocation(kv_arena_base(a), kv_arena_size(a), &where) == 0)
			assert_int_equal(where, UINT64_C(1) << last);
		else
			printf("placement on node %d not verifiable (memlocation unsupported)\n", last);
		assert_int_not_equal(st.placement.verified, -1);
		kv_assert_ok(kv_arena_destroy(a, 0));
	} else {
		printf("one NUMA node (mask 0x%" PRIx64 "): placement across nodes not checked\n",
		       nodes);
	}
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* ---- Threads ---------------------------------------------------------- */

struct thread_arg {
	struct kv_arena *a;
	uint64_t seed;
	int errors;
};

/* Two threads allocating and freeing on one arena: the mutex must keep
 * blocks disjoint (each thread's cookies survive) and the counts exact. */
static void *thread_main(void *p)
{
	struct thread_arg *t = p;
	void *mine[32] = { 0 };
	uint8_t cookie[32];

	for (int i = 0; i < 3000; i++) {
		uint64_t r = kv_test_rand(&t->seed);
		int k = (int)(r % 32);

		if (mine[k]) {
			for (size_t b = 0; b < 1000; b++)
				if (((uint8_t *)mine[k])[b] != cookie[k])
					t->errors++;
			if (kv_arena_free(t->a, mine[k]) != 0)
				t->errors++;
			mine[k] = NULL;
		} else if (kv_arena_alloc(t->a, 1000, 0, &mine[k]) == 0) {
			cookie[k] = (uint8_t)r;
			memset(mine[k], cookie[k], 1000);
		} else {
			mine[k] = NULL;
		}
	}
	for (int k = 0; k < 32; k++)
		if (mine[k] && kv_arena_free(t->a, mine[k]) != 0)
			t->errors++;
	return NULL;
}

static void test_two_threads(void **state)
{
	struct kv_registry *reg = make_reg();
	struct kv_arena *a = make_arena(reg, 64 * KiB, "shared");
	struct thread_arg args[2] = { { a, 1, 0 }, { a, 2, 0 } };
	pthread_t th[2];

	(void)state;
	for (int i = 0; i < 2; i++)
		assert_int_equal(pthread_create(&th[i], NULL, thread_main, &args[i]), 0);
	for (int i = 0; i < 2; i++)
		assert_int_equal(pthread_join(th[i], NULL), 0);
	assert_int_equal(args[0].errors + args[1].errors, 0);
	kv_assert_ok(kv_arena_validate(a));
	assert_int_equal(stats_of(a).n_allocs, 0);
	assert_int_equal(stats_of(a).n_free_ranges, 1);
	assert_int_equal(label_bytes(reg, "shared"), 0);
	kv_assert_ok(kv_arena_destroy(a, 0));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_names_and_default),
		cmocka_unit_test(test_alloc_free_reset),
		cmocka_unit_test(test_coalescing),
		cmocka_unit_test(test_random_against_model),
		cmocka_unit_test(test_bad_input),
		cmocka_unit_test(test_bad_config),
		cmocka_unit_test(test_full),
		cmocka_unit_test(test_registry_records),
		cmocka_unit_test(test_registry_full),
		cmocka_unit_test(test_default_registry),
		cmocka_unit_test(test_budget),
		cmocka_unit_test(test_fault_injection),
		cmocka_unit_test(test_huge_pages),
		cmocka_unit_test(test_mlock_rlimit),
		cmocka_unit_test(test_numa),
		cmocka_unit_test(test_two_threads),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
