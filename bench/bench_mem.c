// SPDX-License-Identifier: MIT
/*
 * kv-bench's DRAM reference: the read bandwidth a streaming sum reaches
 * over a buffer on a thread pool, measured by the scenarios that compare
 * memory-bound work with DRAM (kv's attention, decode) in the same run.
 * Entry points: bench_dram_create(), bench_dram_read_gbps(),
 * bench_dram_destroy(); bench_map_huge() for large THP-backed buffers.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <kv/kv.h>

#include "bench.h"
#include "libkv/kernels.h"
#include "taxonomy/kv-private.h"

/* Each measurement reads at least this much. */
#define MEASURE_BYTES ((size_t)1 << 30)

struct bench_dram {
	char *buf;                  /* (bytes) */
	size_t bytes;
	uint64_t *sums;             /* (bytes / BENCH_DRAM_CHUNK) */
	volatile uint64_t sink;     /* the sums are used, so no load is dropped */
};

void *bench_map_huge(size_t bytes)
{
	void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		return NULL;
	/* As the cache's pool does by default (KV_HUGE_THP); best effort. */
	madvise(p, bytes, MADV_HUGEPAGE);
	return p;
}

int bench_dram_create(size_t bytes, struct bench_dram **out)
{
	struct bench_dram *d;

	if (bytes == 0 || bytes % BENCH_DRAM_CHUNK)
		return kv_fail(EINVAL, "bench: DRAM probe of %zu bytes: not a positive multiple "
			       "of %zu", bytes, (size_t)BENCH_DRAM_CHUNK);
	d = calloc(1, sizeof(*d));
	if (!d)
		return kv_fail(ENOMEM, "bench: out of memory");
	d->bytes = bytes;
	d->buf = bench_map_huge(bytes);
	d->sums = calloc(bytes / BENCH_DRAM_CHUNK, sizeof(*d->sums));
	if (!d->buf || !d->sums) {
		bench_dram_destroy(d);
		return kv_fail(ENOMEM, "bench: out of memory for a DRAM probe of %zu MiB",
			       bytes >> 20);
	}
	memset(d->buf, 0x5a, bytes);
	*out = d;
	return 0;
}

void bench_dram_destroy(struct bench_dram *d)
{
	if (!d)
		return;
	if (d->buf)
		munmap(d->buf, d->bytes);
	free(d->sums);
	free(d);
}

struct dram_pass {
	const char *buf;
	uint64_t *sums;
};

/* One BENCH_DRAM_CHUNK an item, claimed in order, so the threads stream
 * neighbouring chunks. */
static void dram_item(void *ctx, uint32_t item, uint32_t worker)
{
	const struct dram_pass *p = ctx;
	const uint64_t *w = (const uint64_t *)(const void *)(p->buf + (size_t)item * BENCH_DRAM_CHUNK);
	uint64_t acc[8] = { 0 };

	(void)worker;
	/* Eight lanes so that no add chain serialises the loads. */
	for (size_t i = 0; i < BENCH_DRAM_CHUNK / sizeof(*w); i += KV_ARRAY_SIZE(acc))
		for (size_t j = 0; j < KV_ARRAY_SIZE(acc); j++)
			acc[j] += w[i + j];
	for (size_t j = 1; j < KV_ARRAY_SIZE(acc); j++)
		acc[0] += acc[j];
	p->sums[item] = acc[0];
}

double bench_dram_read_gbps(struct bench_dram *d, struct kv_tpool *tp)
{
	struct dram_pass p = { d->buf, d->sums };
	const uint32_t items = (uint32_t)(d->bytes / BENCH_DRAM_CHUNK);
	uint32_t passes = (uint32_t)((MEASURE_BYTES + d->bytes - 1) / d->bytes);
	uint64_t t0 = bench_now_ns(), keep = 0;
	double gbps;

	for (uint32_t i = 0; i < passes; i++)
		kv_tpool_run(tp, items, dram_item, &p);
	gbps = (double)d->bytes * passes / (double)(bench_now_ns() - t0);
	for (uint32_t i = 0; i < items; i++)
		keep += d->sums[i];
	d->sink += keep;
	return gbps;
}
