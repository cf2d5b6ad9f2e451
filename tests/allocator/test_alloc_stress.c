// SPDX-License-Identifier: MIT
/*
 * Allocator stress: 4 threads with seeded generators allocate and free
 * pool blocks and arena ranges of one shared pool and one shared arena,
 * filling each with a cookie (from the block id, or from the range's
 * address and size) that is checked when it is freed. Work runs in
 * batches; after each, threads hand some of their blocks and ranges to a
 * neighbour (so frees cross threads and land in other threads' caches)
 * and one thread runs kv_pool_validate and kv_arena_validate and checks
 * the counts against what the threads hold while the others wait. Run
 * without and with thread caches. KV_TEST_SEED overrides the seed,
 * KV_STRESS_OPS the operations per thread.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>

#include "kvtest.h"

#define THREADS 4
#define BATCH 4000
#define POOL_LIVE 256     /* blocks a thread holds at most */
#define ARENA_LIVE 64     /* ranges a thread holds at most */
#define HAND_OVER 16      /* blocks (and ranges / 4) given away per batch */
#define BLOCK_BYTES 192   /* stride 192: ids from a division, not a shift */

struct range {
	void *p;
	size_t bytes;
};

struct shared {
	struct kv_pool *pool;
	struct kv_arena *arena;
	pthread_barrier_t barrier;
	long ops;
	uint64_t seed;
	/* Hand-over mailboxes, one per sender; read by the next thread. */
	uint32_t mail_ids[THREADS][HAND_OVER];
	uint32_t n_mail_ids[THREADS];
	struct range mail_ranges[THREADS][HAND_OVER / 4];
	uint32_t n_mail_ranges[THREADS];
	/* What each thread holds, published before the validation barrier. */
	uint32_t held_blocks[THREADS];
	uint32_t held_ranges[THREADS];
	atomic_int errors;
	char first_error[256];
	pthread_mutex_t err_lock;
	long pool_enomem, arena_enomem;
};

struct worker {
	struct shared *sh;
	int tid;
	uint64_t rng;
	uint32_t ids[POOL_LIVE];
	uint32_t n_ids;
	struct range ranges[ARENA_LIVE];
	uint32_t n_ranges;
	long pool_enomem, arena_enomem;
};

static void report(struct shared *sh, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void report(struct shared *sh, const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&sh->err_lock);
	if (atomic_fetch_add(&sh->errors, 1) == 0) {
		va_start(ap, fmt);
		vsnprintf(sh->first_error, sizeof(sh->first_error), fmt, ap);
		va_end(ap);
	}
	pthread_mutex_unlock(&sh->err_lock);
}

static uint64_t mix(uint64_t x)
{
	return kv_test_rand(&x);
}

static void cookie_fill(void *p, size_t bytes, uint64_t key)
{
	uint64_t *w = p, c = mix(key);

	for (size_t i = 0; i < bytes / 8; i++)
		w[i] = c ^ i;
}

static bool cookie_ok(const void *p, size_t bytes, uint64_t key)
{
	const uint64_t *w = p;
	uint64_t c = mix(key);

	for (size_t i = 0; i < bytes / 8; i++)
		if (w[i] != (c ^ i))
			return false;
	return true;
}

static uint64_t range_key(const struct range *r)
{
	return (uint64_t)(uintptr_t)r->p * 31 + r->bytes;
}

static void pool_free_at(struct worker *w, uint32_t i)
{
	struct shared *sh = w->sh;
	uint32_t id = w->ids[i];
	void *b = kv_pool_ptr(sh->pool, id);
	int rc;

	if (!b || !cookie_ok(b, BLOCK_BYTES, id))
		report(sh, "thread %d: block %u cookie broken", w->tid, id);
	/* Free by pointer and by id, alternately. */
	rc = id & 1 ? kv_pool_free(sh->pool, b) : kv_pool_free_id(sh->pool, id);
	if (rc)
		report(sh, "thread %d: free of block %u: %s", w->tid, id, kv_last_error());
	w->ids[i] = w->ids[--w->n_ids];
}

static void arena_free_at(struct worker *w, uint32_t i)
{
	struct shared *sh = w->sh;
	struct range *r = &w->ranges[i];
	int rc;

	if (!cookie_ok(r->p, r->bytes, range_key(r)))
		report(sh, "thread %d: range %p+%zu cookie broken", w->tid, r->p, r->bytes);
	rc = kv_arena_free(sh->arena, r->p);
	if (rc)
		report(sh, "thread %d: arena free of %p: %s", w->tid, r->p, kv_last_error());
	*r = w->ranges[--w->n_ranges];
}

static void pool_op(struct worker *w)
{
	struct shared *sh = w->sh;
	uint64_t r = kv_test_rand(&w->rng);
	void *b;
	uint32_t id;
	int rc;

	if (w->n_ids > 0 && (w->n_ids == POOL_LIVE || (r & 1))) {
		pool_free_at(w, (uint32_t)((r >> 8) % w->n_ids));
		return;
	}
	rc = kv_pool_alloc(sh->pool, &b, &id);
	if (rc == -ENOMEM) {
		/* At max_bytes, possibly with free blocks in other caches. */
		w->pool_enomem++;
		if (w->n_ids)
			pool_free_at(w, (uint32_t)((r >> 8) % w->n_ids));
		return;
	}
	if (rc) {
		report(sh, "thread %d: pool alloc: %s", w->tid, kv_last_error());
		return;
	}
	if (b != kv_pool_ptr(sh->pool, id) || kv_pool_id(sh->pool, b) != id)
		report(sh, "thread %d: block %u: id and pointer disagree", w->tid, id);
	cookie_fill(b, BLOCK_BYTES, id);
	w->ids[w->n_ids++] = id;
}

static void arena_op(struct worker *w)
{
	static const size_t aligns[] = { 0, 64, 256, 4096 };
	struct shared *sh = w->sh;
	uint64_t r = kv_test_rand(&w->rng);
	struct range rg;
	size_t align = aligns[(r >> 4) % (sizeof(aligns) / sizeof(aligns[0]))];
	int rc;

	if (w->n_ranges > 0 && (w->n_ranges == ARENA_LIVE || (r & 1))) {
		arena_free_at(w, (uint32_t)((r >> 8) % w->n_ranges));
		return;
	}
	rg.bytes = 8 * (1 + (r >> 16) % 1024); /* 8 B .. 8 KiB */
	rc = kv_arena_alloc(sh->arena, rg.bytes, align, &rg.p);
	if (rc == -ENOMEM) {
		w->arena_enomem++;
		if (w->n_ranges)
			arena_free_at(w, (uint32_t)((r >> 8) % w->n_ranges));
		return;
	}
	if (rc) {
		report(sh, "thread %d: arena alloc: %s", w->tid, kv_last_error());
		return;
	}
	if (align && (uintptr_t)rg.p % align)
		report(sh, "thread %d: range %p not aligned to %zu", w->tid, rg.p, align);
	cookie_fill(rg.p, rg.bytes, range_key(&rg));
	w->ranges[w->n_ranges++] = rg;
}

/* Between batches: hand blocks to the next thread, let thread 0 check
 * everything while the others wait, then take the previous thread's. */
static void between_batches(struct worker *w)
{
	struct shared *sh = w->sh;
	int t = w->tid, from = (t + THREADS - 1) % THREADS;
	uint32_t n;

	for (n = 0; n < HAND_OVER && w->n_ids > 0; n++)
		sh->mail_ids[t][n] = w->ids[--w->n_ids];
	sh->n_mail_ids[t] = n;
	for (n = 0; n < HAND_OVER / 4 && w->n_ranges > 0; n++)
		sh->mail_ranges[t][n] = w->ranges[--w->n_ranges];
	sh->n_mail_ranges[t] = n;
	sh->held_blocks[t] = w->n_ids + sh->n_mail_ids[t];
	sh->held_ranges[t] = w->n_ranges + sh->n_mail_ranges[t];
	pthread_barrier_wait(&sh->barrier);

	if (t == 0) {
		struct kv_pool_stats ps;
		struct kv_arena_stats as;
		uint32_t blocks = 0, ranges = 0;

		for (int i = 0; i < THREADS; i++) {
			blocks += sh->held_blocks[i];
			ranges += sh->held_ranges[i];
		}
		if (kv_pool_validate(sh->pool))
			report(sh, "kv_pool_validate: %s", kv_last_error());
		if (kv_arena_validate(sh->arena))
			report(sh, "kv_arena_validate: %s", kv_last_error());
		if (kv_pool_stats(sh->pool, &ps) == 0 && ps.blocks_used - ps.blocks_cached != blocks)
			report(sh, "pool: %u used - %u cached, threads hold %u", ps.blocks_used,
			       ps.blocks_cached, blocks);
		if (kv_arena_stats(sh->arena, &as) == 0 && as.n_allocs != ranges)
			report(sh, "arena: %u allocations, threads hold %u", as.n_allocs, ranges);
	}
	pthread_barrier_wait(&sh->barrier);

	for (uint32_t i = 0; i < sh->n_mail_ids[from]; i++)
		w->ids[w->n_ids++] = sh->mail_ids[from][i];
	for (uint32_t i = 0; i < sh->n_mail_ranges[from]; i++)
		w->ranges[w->n_ranges++] = sh->mail_ranges[from][i];
	pthread_barrier_wait(&sh->barrier);
}

static void *stress_thread(void *arg)
{
	struct worker *w = arg;
	struct shared *sh = w->sh;

	for (long done = 0; done < sh->ops; done += BATCH) {
		for (int i = 0; i < BATCH; i++) {
			if ((kv_test_rand(&w->rng) & 3) == 0)
				arena_op(w);
			else
				pool_op(w);
		}
		between_batches(w);
	}
	while (w->n_ids)
		pool_free_at(w, w->n_ids - 1);
	while (w->n_ranges)
		arena_free_at(w, w->n_ranges - 1);
	/* Half the threads flush, the others leave it to thread exit. */
	if (w->tid % 2)
		kv_pool_flush(sh->pool);
	return NULL;
}

static long env_long(const char *name, long def)
{
	const char *s = getenv(name);

	return s && *s ? strtol(s, NULL, 0) : def;
}

static uint64_t label_bytes(struct kv_registry *reg, const char *label)
{
	struct kv_holder h;

	return kv_registry_label(reg, label, &h) == 0 ? h.bytes : 0;
}

static void run_stress(uint32_t thread_cache)
{
	struct shared *sh = calloc(1, sizeof(*sh));
	struct worker *w = calloc(THREADS, sizeof(*w));
	struct kv_registry *reg;
	struct kv_pool_config pc;
	struct kv_arena_config ac;
	struct kv_pool_stats ps;
	struct kv_arena_stats as;
	pthread_t th[THREADS];
	uint64_t n;

	assert_non_null(sh);
	assert_non_null(w);
	kv_assert_ok(kv_registry_create(NULL, &reg));
	kv_pool_config_default(&pc);
	pc.block_bytes = BLOCK_BYTES;
	/* Tight enough that -ENOMEM happens: threads may hold 4 * 256. */
	pc.max_bytes = 560 * BLOCK_BYTES;
	pc.chunk_bytes = 16 << 10;  /* many concurrent grows */
	pc.thread_cache = thread_cache;
	pc.registry = reg;
	pc.label = "stress/pool";
	kv_assert_ok(kv_pool_create(&pc, &sh->pool));
	kv_arena_config_default(&ac);
	ac.bytes = 768 << 10; /* threads may hold 4 * 64 ranges of up to 8 KiB */
	ac.registry = reg;
	ac.label = "stress/arena";
	kv_assert_ok(kv_arena_create(&ac, &sh->arena));

	sh->ops = env_long("KV_STRESS_OPS", 500000);
	sh->seed = (uint64_t)env_long("KV_TEST_SEED", 20240601);
	pthread_mutex_init(&sh->err_lock, NULL);
	pthread_barrier_init(&sh->barrier, NULL, THREADS);
	print_message("    thread_cache %u: %d threads x %ld ops, seed %llu\n", thread_cache,
		      THREADS, sh->ops, (unsigned long long)sh->seed);
	for (int t = 0; t < THREADS; t++) {
		w[t].sh = sh;
		w[t].tid = t;
		w[t].rng = sh->seed * 1000003u + (uint64_t)t;
		assert_int_equal(pthread_create(&th[t], NULL, stress_thread, &w[t]), 0);
	}
	for (int t = 0; t < THREADS; t++) {
		assert_int_equal(pthread_join(th[t], NULL), 0);
		sh->pool_enomem += w[t].pool_enomem;
		sh->arena_enomem += w[t].arena_enomem;
	}
	if (atomic_load(&sh->errors))
		fail_msg("%d errors, first: %s", atomic_load(&sh->errors), sh->first_error);
	print_message("    -ENOMEM seen: pool %ld, arena %ld\n", sh->pool_enomem, sh->arena_enomem);

	/* The "used" record moves in steps; a flush makes it exact. */
	kv_pool_flush(sh->pool);
	kv_assert_ok(kv_pool_validate(sh->pool));
	kv_assert_ok(kv_arena_validate(sh->arena));
	kv_assert_ok(kv_pool_stats(sh->pool, &ps));
	assert_int_equal(ps.blocks_used, 0);
	assert_int_equal(ps.blocks_cached, 0);
	assert_true(ps.committed_bytes <= pc.max_bytes);
	assert_int_equal(label_bytes(reg, "stress/pool"), 0);
	assert_int_equal(label_bytes(reg, "stress/pool/free"), ps.committed_bytes);
	kv_assert_ok(kv_arena_stats(sh->arena, &as));
	assert_int_equal(as.n_allocs, 0);
	assert_int_equal(as.used_bytes, 0);
	assert_int_equal(label_bytes(reg, "stress/arena"), 0);
	assert_int_equal(label_bytes(reg, "stress/arena/free"), as.bytes);
	kv_assert_ok(kv_registry_validate(reg));

	kv_assert_ok(kv_pool_destroy(sh->pool, 0));
	kv_assert_ok(kv_arena_destroy(sh->arena, 0));
	kv_assert_ok(kv_registry_count(reg, KV_ANY, KV_ANY, KV_ANY, &n));
	assert_int_equal(n, 0);
	kv_assert_ok(kv_registry_destroy(reg, 0));
	pthread_barrier_destroy(&sh->barrier);
	pthread_mutex_destroy(&sh->err_lock);
	free(w);
	free(sh);
}

static void test_stress_no_cache(void **state)
{
	(void)state;
	run_stress(0);
}

static void test_stress_thread_cache(void **state)
{
	(void)state;
	run_stress(32);
}

/* A thread that used a pool through its cache and is exiting while the
 * pool is destroyed: its exit-time flush must not touch the freed pool
 * (under the thread sanitizer this would show as a use after free). */
struct exiting {
	struct kv_pool *pool;
	atomic_int done;
	int rc;
};

static void *use_and_leave(void *arg)
{
	struct exiting *e = arg;
	void *b[8];

	for (int i = 0; i < 8 && e->rc == 0; i++)
		e->rc = kv_pool_alloc(e->pool, &b[i], NULL);
	for (int i = 0; i < 8 && e->rc == 0; i++)
		e->rc = kv_pool_free(e->pool, b[i]);
	atomic_store(&e->done, 1);
	return NULL; /* the cache's destructor runs from here on */
}

static void test_destroy_while_user_thread_exits(void **state)
{
	struct kv_registry *reg;

	(void)state;
	kv_assert_ok(kv_registry_create(NULL, &reg));
	for (int round = 0; round < 50; round++) {
		struct kv_pool_config cfg;
		struct exiting e = { 0 };
		pthread_t th;

		kv_pool_config_default(&cfg);
		cfg.block_bytes = 4096;
		cfg.max_bytes = 4u << 20;
		cfg.thread_cache = 16;
		cfg.registry = reg;
		kv_assert_ok(kv_pool_create(&cfg, &e.pool));
		assert_int_equal(pthread_create(&th, NULL, use_and_leave, &e), 0);
		while (!atomic_load(&e.done))
			sched_yield();
		kv_assert_ok(kv_pool_destroy(e.pool, 0));
		assert_int_equal(pthread_join(th, NULL), 0);
		kv_assert_ok(e.rc);
	}
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_stress_no_cache),
		cmocka_unit_test(test_stress_thread_cache),
		cmocka_unit_test(test_destroy_while_user_thread_exits),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
