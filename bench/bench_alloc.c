// SPDX-License-Identifier: MIT
/*
 * kv-bench alloc: the block pool's hot path against malloc, and what huge
 * pages save when memory is first touched.
 *
 * Figures (median of reps):
 *   pool_pairs_per_s       kv_pool_alloc + kv_pool_free pairs per second,
 *                          one thread, 64 KiB blocks, thread cache on
 *   pool_pairs_per_s_2t    the same on two threads at once, total
 *   malloc_pairs_per_s     malloc + free of 64 KiB, one thread
 *   pool_vs_malloc_ratio   pool / malloc
 *   first_touch_base_ms    writing one byte per 4 KiB of 1 GiB of fresh
 *                          pool memory, base pages
 *   first_touch_thp_ms     the same with transparent huge pages (madvise)
 *   first_touch_thp_ratio  base / THP
 *   first_touch_hugetlb_ms the same with hugetlb 2 MiB pages, only when
 *                          enough are free (else stderr says why)
 * Both pair loops write one byte of each block, so neither can be
 * optimised away. The one-thread figures are taken before any thread was
 * created: glibc's malloc is at its fastest in a single-threaded process,
 * so the ratio is against malloc's best case. --quick touches 128 MiB
 * and scales to 1 GiB.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kv/kv.h>

#include "bench.h"
#include "allocator/allocator-impl.h"

#define BLOCK (64u << 10)
#define MAX_REPS 64
#define TARGET_PAIRS 50e6

/* Keep a pointer (and the byte written through it) observable. */
static inline void escape(void *p)
{
	__asm__ volatile("" : : "r"(p) : "memory");
}

static int make_pool(struct kv_pool **out, uint32_t cache)
{
	struct kv_pool_config cfg;

	kv_pool_config_default(&cfg);
	cfg.block_bytes = BLOCK;
	cfg.max_bytes = 256u << 20;
	cfg.thread_cache = cache;
	cfg.label = "bench/alloc";
	return kv_pool_create(&cfg, out);
}

/* ns for `pairs` alloc+free pairs on p; 0 on error (*rc set). rc is
 * written once: threads' result slots share a cache line. */
static double pool_pairs(struct kv_pool *p, long pairs, int *rc)
{
	uint64_t t0 = bench_now_ns();
	int err = 0;

	for (long i = 0; i < pairs && !err; i++) {
		void *b;
		uint32_t id;

		err = kv_pool_alloc(p, &b, &id);
		if (err)
			break;
		*(volatile char *)b = (char)i;
		escape(b);
		err = kv_pool_free(p, b);
	}
	*rc = err;
	return err ? 0 : (double)(bench_now_ns() - t0);
}

static double malloc_pairs(long pairs)
{
	uint64_t t0 = bench_now_ns();

	for (long i = 0; i < pairs; i++) {
		char *b = malloc(BLOCK);

		if (!b)
			return 0;
		*(volatile char *)b = (char)i;
		escape(b);
		free(b);
	}
	return (double)(bench_now_ns() - t0);
}

struct pair_arg {
	struct kv_pool *pool;
	pthread_barrier_t *start;
	long pairs;
	double ns;
	int rc;
};

static void *pair_thread(void *arg)
{
	struct pair_arg *a = arg;

	pthread_barrier_wait(a->start);
	a->ns = pool_pairs(a->pool, a->pairs, &a->rc);
	kv_pool_flush(a->pool);
	return NULL;
}

static int pairs_2t(long pairs, double *per_s)
{
	struct pair_arg args[2];
	pthread_barrier_t start;
	pthread_t th[2];
	struct kv_pool *p;
	double slowest = 0;
	int rc = make_pool(&p, 64);

	if (rc)
		return rc;
	pthread_barrier_init(&start, NULL, 2);
	for (int t = 0; t < 2; t++) {
		args[t] = (struct pair_arg){ .pool = p, .start = &start, .pairs = pairs };
		if (pthread_create(&th[t], NULL, pair_thread, &args[t]) != 0) {
			fprintf(stderr, "kv-bench alloc: pthread_create failed\n");
			exit(1);
		}
	}
	for (int t = 0; t < 2; t++) {
		pthread_join(th[t], NULL);
		if (args[t].rc && !rc)
			rc = args[t].rc;
		if (args[t].ns > slowest)
			slowest = args[t].ns;
	}
	pthread_barrier_destroy(&start);
	if (rc == 0)
		*per_s = 2.0 * (double)pairs / (slowest / 1e9);
	kv_pool_destroy(p, KV_POOL_FORCE);
	return rc;
}

/* AnonHugePages of this process in KiB: how much THP really backs. */
static long anon_huge_kib(void)
{
	FILE *f = fopen("/proc/self/smaps_rollup", "r");
	char line[256];
	long kib = -1;

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "AnonHugePages: %ld kB", &kib) == 1)
			break;
	fclose(f);
	return kib;
}

/* ms to touch every 4 KiB of `bytes` of fresh pool memory placed with
 * `huge`; *huge_kib is how much of it the kernel backed with THP. */
static int first_touch(size_t bytes, enum kv_huge huge, bool required, double *ms,
		       long *huge_kib)
{
	struct kv_pool_config cfg;
	struct kv_pool *p;
	long kib0 = anon_huge_kib();
	uint32_t n = (uint32_t)(bytes / (2u << 20)), *ids;
	uint64_t t0;
	char *base;
	int rc;

	kv_pool_config_default(&cfg);
	cfg.block_bytes = 2u << 20;
	cfg.block_align = 2u << 20;
	cfg.max_bytes = bytes;
	cfg.chunk_bytes = bytes;
	cfg.place.huge = huge;
	cfg.place.required = required;
	cfg.label = "bench/first_touch";
	rc = kv_pool_create(&cfg, &p);
	if (rc)
		return rc;
	ids = calloc(n, sizeof(*ids));
	rc = ids ? kv_pool_alloc_n(p, n, ids) : -ENOMEM;
	if (rc == 0) {
		/* One chunk: the blocks are contiguous from block 0. */
		base = kv_pool_ptr(p, 0);
		t0 = bench_now_ns();
		for (size_t off = 0; off < bytes; off += 4096)
			((volatile char *)base)[off] = 1;
		*ms = (double)(bench_now_ns() - t0) / 1e6;
		*huge_kib = anon_huge_kib() - kib0;
		kv_pool_free_n(p, n, ids);
	}
	free(ids);
	kv_pool_destroy(p, KV_POOL_FORCE);
	return rc;
}

int bench_alloc(struct bench_run *run)
{
	const int reps = run->reps < MAX_REPS ? run->reps : MAX_REPS;
	const long pairs = run->quick ? 200000 : 10000000;
	const long mpairs = run->quick ? 100000 : 2000000;
	const size_t touch = run->quick ? (size_t)128 << 20 : (size_t)1 << 30;
	const double scale = (double)((size_t)1 << 30) / (double)touch;
	double pool1[MAX_REPS], mall[MAX_REPS], pool2[MAX_REPS], ratio[MAX_REPS];
	double base_ms[MAX_REPS], thp_ms[MAX_REPS], tlb_ms[MAX_REPS], thp_ratio[MAX_REPS];
	bool thp = kv_os_thp_available();
	long thp_kib = 0;
	uint64_t free_2m = kv_os_free_hugepages(2u << 20, -1);
	bool hugetlb = free_2m >= touch / (2u << 20);
	struct kv_pool *p;
	int rc;

	/* One thread: pool and malloc alternate within each rep. */
	rc = make_pool(&p, 64);
	if (rc)
		return rc;
	pool_pairs(p, pairs / 10 + 1, &rc); /* warm: commit, cache, TLS */
	for (int r = 0; r < reps && rc == 0; r++) {
		double ns = pool_pairs(p, pairs, &rc), mns;

		mns = malloc_pairs(mpairs);
		if (mns <= 0)
			rc = -ENOMEM;
		pool1[r] = (double)pairs / (ns / 1e9);
		mall[r] = (double)mpairs / (mns / 1e9);
		ratio[r] = pool1[r] / mall[r];
	}
	kv_pool_destroy(p, KV_POOL_FORCE);
	if (rc)
		return rc;

	for (int r = 0; r < reps && rc == 0; r++)
		rc = pairs_2t(pairs, &pool2[r]);
	if (rc)
		return rc;

	/* An untimed pass of each first: under a hypervisor, guest memory
	 * touched for the first time also faults in the host, which would
	 * land on whichever mode happened to run first. */
	{
		double ms;
		long kib;

		rc = first_touch(touch, KV_HUGE_NONE, false, &ms, &kib);
		if (rc == 0 && thp)
			rc = first_touch(touch, KV_HUGE_THP, true, &ms, &kib);
		if (rc)
			return rc;
	}
	for (int r = 0; r < reps && rc == 0; r++) {
		long kib;

		rc = first_touch(touch, KV_HUGE_NONE, false, &base_ms[r], &kib);
		base_ms[r] *= scale;
		if (rc == 0 && thp) {
			rc = first_touch(touch, KV_HUGE_THP, true, &thp_ms[r], &thp_kib);
			thp_ms[r] *= scale;
			thp_ratio[r] = base_ms[r] / thp_ms[r];
		}
		if (rc == 0 && hugetlb) {
			rc = first_touch(touch, KV_HUGE_2M, true, &tlb_ms[r], &kib);
			tlb_ms[r] *= scale;
		}
	}
	if (rc)
		return rc;

	bench_figure(run, "pool_pairs_per_s", bench_median(pool1, (size_t)reps), "1/s",
		     TARGET_PAIRS, "target");
	bench_figure(run, "pool_pairs_per_s_2t", bench_median(pool2, (size_t)reps), "1/s",
		     2 * TARGET_PAIRS, "target (2 x 1 thread)");
	bench_figure(run, "malloc_pairs_per_s", bench_median(mall, (size_t)reps), "1/s", 0, NULL);
	bench_figure(run, "pool_vs_malloc_ratio", bench_median(ratio, (size_t)reps), "x", 5,
		     "target");
	bench_figure(run, "first_touch_base_ms", bench_median(base_ms, (size_t)reps), "ms", 0, NULL);
	if (thp) {
		bench_figure(run, "first_touch_thp_ms", bench_median(thp_ms, (size_t)reps), "ms", 0,
			     NULL);
		bench_figure(run, "first_touch_thp_ratio", bench_median(thp_ratio, (size_t)reps),
			     "x", 0, NULL);
		if (thp_kib >= 0 && (size_t)thp_kib < (touch >> 10) / 2)
			fprintf(stderr, "kv-bench alloc: the kernel backed only %ld of %zu KiB with "
				"transparent huge pages: first_touch_thp_* mostly measure base pages\n",
				thp_kib, touch >> 10);
	} else {
		fprintf(stderr, "kv-bench alloc: first_touch_thp_* omitted: transparent huge "
			"pages are disabled (/sys/kernel/mm/transparent_hugepage/enabled)\n");
	}
	if (hugetlb)
		bench_figure(run, "first_touch_hugetlb_ms", bench_median(tlb_ms, (size_t)reps), "ms",
			     0, NULL);
	else
		fprintf(stderr, "kv-bench alloc: first_touch_hugetlb_ms omitted: %llu free 2 MiB "
			"huge pages, %zu needed (vm.nr_hugepages)\n", (unsigned long long)free_2m,
			touch / (2u << 20));
	return 0;
}
