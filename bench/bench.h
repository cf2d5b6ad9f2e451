/* SPDX-License-Identifier: MIT */
/*
 * kv-bench internals: a scenario adds figures to a run; the driver prints
 * them as a table or as one JSON object. Figure names are an interface:
 * keep them stable.
 */
#ifndef KV_BENCH_H
#define KV_BENCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "llama.h"

#define BENCH_MAX_FIGURES 64

struct bench_figure {
	const char *name;
	double value;
	const char *unit;
	/* What the value is compared with, and value / reference; only
	 * when has_reference. reference_what says what the reference is
	 * ("target", "measured DRAM read bandwidth"). */
	bool has_reference;
	double reference;
	const char *reference_what;
};

struct bench_run {
	int reps;             /* repetitions a scenario takes the median of */
	bool quick;           /* smaller sizes (used by the smoke test) */
	const char *dir;      /* --dir: where I/O scenarios put their files
			       * (NULL: the current directory) and the
			       * kv-llama scenarios their models (NULL:
			       * llm_cache_dir()) */
	const char *model;    /* --model: sweep's synthetic model (NULL: its
			       * default) */
	const char *out;      /* --out: sweep's results folder (NULL: its
			       * default) */
	struct bench_figure figures[BENCH_MAX_FIGURES];
	size_t n_figures;
};

/* Add a figure; reference <= 0 means none. */
void bench_figure(struct bench_run *run, const char *name, double value,
		  const char *unit, double reference, const char *reference_what);

/* Median of n values (sorts them in place). */
double bench_median(double *v, size_t n);

/* Monotonic time in nanoseconds. */
uint64_t bench_now_ns(void);

/* splitmix64: the next value of the seeded stream whose state is *s (the
 * same stream on every machine, so workloads repeat). */
static inline uint64_t bench_rand(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Options a scenario reads beside --json, --reps, --quick and --dir. */
#define BENCH_OPT_MODEL 1u
#define BENCH_OPT_OUT 2u

struct bench_scenario {
	const char *name;
	const char *summary;
	int (*run)(struct bench_run *run);  /* 0 or -errno */
	unsigned opts;                      /* BENCH_OPT_* it reads */
};

/* The CPU's model name from /proc/cpuinfo ("unknown" if none). */
void bench_cpu_model(char *buf, size_t len);

/* Make `path` a file of `bytes` seeded pseudo-random bytes, written with
 * large O_DIRECT writes, unless it already has that size (kept between
 * runs). `who` names the scenario in messages. 0 or -errno. */
int bench_data_file(const char *path, uint64_t bytes, const char *who);

int bench_registry(struct bench_run *run);
int bench_alloc(struct bench_run *run);
int bench_io(struct bench_run *run);
int bench_store(struct bench_run *run);
int bench_stream(struct bench_run *run);
int bench_kv(struct bench_run *run);
int bench_decode(struct bench_run *run);
int bench_sweep(struct bench_run *run);

/* A synthetic llama2.c model (llm_synthetic_config name) and its file,
 * as the kv-llama scenarios use them (bench_decode.c). */
struct bench_model {
	const char *name;
	struct llm_config cfg;
	char path[4096];
};

/* The model `name` in run->dir (else llm_cache_dir()), written first if
 * missing (seed 1, as kv-llama's); `who` names the scenario in messages.
 * Errors: those of llm_synthetic_config and llm_synthetic_ensure. */
int bench_model_ensure(const struct bench_run *run, const char *who, const char *name,
		       struct bench_model *m);

/* The raw sequential O_DIRECT read bandwidth of a whole file
 * (bench_raw_uring, BENCH_RAW_BLOCK requests, BENCH_RAW_DEPTH in flight:
 * the 64 MiB the streamer keeps in flight); bufs holds (BENCH_RAW_DEPTH,
 * BENCH_RAW_BLOCK), best from bench_map_huge(). GB/s into *gbps. */
#define BENCH_RAW_BLOCK ((size_t)4 << 20)
#define BENCH_RAW_DEPTH 16u
int bench_raw_read_file(const char *path, uint64_t file_bytes, char *bufs, double *gbps);

/* The raw reference loop of the I/O scenarios (bench_io.c): count
 * O_DIRECT requests of `block` bytes, `depth` in flight, straight on
 * liburing, at the offsets offset(ctx, i) gives; GB/s into *gbps. */
struct bench_raw_loop {
	const char *path;
	bool write;               /* writes (the file must exist) or reads */
	size_t block;             /* bytes per request, aligned */
	unsigned depth;
	uint64_t count;           /* requests */
	uint64_t file_bytes;      /* reads: the file's size when the last
				   * request may run past its end (it then
				   * reads the rest); 0: every request is whole */
	char *bufs;               /* (depth, block), aligned */
	uint64_t (*offset)(void *ctx, uint64_t i);
	void *ctx;
};
int bench_raw_uring(const struct bench_raw_loop *l, double *gbps);

/* The DRAM reference (bench_mem.c): a streaming sum of 64-bit words over
 * a buffer of `bytes` (a multiple of BENCH_DRAM_CHUNK; THP-backed, written
 * once at create) on a thread pool's threads, one chunk an item, repeated
 * until at least 1 GiB is read. Errors of create: -EINVAL (bytes), -ENOMEM.
 * Ownership: bench_dram_destroy() frees it (NULL is a no-op). */
#define BENCH_DRAM_CHUNK ((size_t)1 << 20)
struct bench_dram;
struct kv_tpool;
int bench_dram_create(size_t bytes, struct bench_dram **out);
void bench_dram_destroy(struct bench_dram *d);
/* One measurement on tp's threads: GB/s. */
double bench_dram_read_gbps(struct bench_dram *d, struct kv_tpool *tp);

/* An anonymous mapping of `bytes` with MADV_HUGEPAGE (best effort), for
 * munmap; NULL when mmap fails. */
void *bench_map_huge(size_t bytes);

#endif
