// SPDX-License-Identifier: MIT
/*
 * kv-bench kv: the paged KV cache (include/kv/cache.h). Block bookkeeping
 * on one thread, the prefix cache, internal waste under a ShareGPT-like
 * workload, block sharing of parallel sampling, and decode attention read
 * through the block tables against the same kernel on a contiguous layout
 * and against DRAM read bandwidth measured in the same run.
 *
 * Figures (medians over reps unless said otherwise):
 *   append_per_s            kv_seq_append of one token, 256 sequences in
 *                           turn to 256 tokens each (one block taken per 16
 *                           appends), created and freed in the timing
 *   block_alloc_free_per_s  cycles of kv_seq_append(16 tokens) +
 *                           kv_seq_truncate(0) on one sequence: one block
 *                           taken and returned (and one block hashed) each
 *   prefix_lookup_4096_us   kv_cache_lookup of a 4096-token prompt whose
 *                           256 blocks are all cached (hashing included),
 *                           median of single calls
 *   prompt_hit_4096_us      kv_seq_create + kv_seq_prompt of that prompt
 *                           (255 cached blocks taken, one block appended) +
 *                           kv_seq_free, median of single rounds
 *   waste_pct               kv_cache_stats().waste_pct averaged over every
 *                           step of a decode loop of 256 sequences whose
 *                           prompt and output lengths are log-normal
 *                           (sigma 1, means 160 and 340, in [1, 4096])
 *   sharing_reduction_x     blocks of 8 independent 1280-token sequences /
 *                           blocks of one 1024-token prompt forked 8 times,
 *                           each fork writing 256 tokens of its own
 *   attention               decode (one query a sequence), f32, 8 kv heads
 *                           of 128, 32 q heads (GQA 4), block 16: K/V bytes
 *                           read per second, 2 * ctx * 8 * 128 * 4 * batch
 *                           per call, through kv_attention on the cache
 *                           (paged) and through kv_attn_run on the same
 *                           values laid out contiguously (one block of
 *                           block_tokens = ctx), on the same threads:
 *     attn_paged_gbps_<ctx>_b<batch>, attn_contig_gbps_<ctx>_b<batch>
 *     paged_vs_contig_ratio_<ctx>_b<batch>   paged / contiguous
 *                           for ctx 512, 4096 and batch 1, 16
 *     paged_vs_contig_ratio_<ctx>            mean of batches 1 and 16
 *     dram_read_gbps        a streaming sum over 512 MiB on the same
 *                           number of threads, once a rep of each context
 *     attn_gbps_4096        paged, mean of batches 1 and 16
 *     attn_dram_bw_ratio_4096_b<batch>, attn_dram_bw_ratio_4096 (mean)
 *                           paged / the DRAM read of the same rep
 * The attention working sets are >= 512 MiB (16 sequences x enough
 * layers, visited in turn) so that K/V come from DRAM, not the 32 MiB L3;
 * the sequences' blocks interleave in the pool as a decode batch's do.
 * Within a rep paged and contiguous alternate which goes first, and every
 * ratio is the median of per-rep ratios. --quick: fewer rounds, one
 * layer and a 64 MiB DRAM probe (figures for the smoke test, not DRAM).
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <kv/kv.h>

#include "bench.h"
#include "libkv/kernels.h"
#include "taxonomy/kv-private.h"

#define MAX_REPS 64
#define MiB ((size_t)1 << 20)

#define TARGET_APPEND 20e6
#define TARGET_LOOKUP_US 20.0
#define TARGET_WASTE_PCT 2.0
#define TARGET_SHARING 3.0
#define TARGET_PAGED 0.95
#define TARGET_DRAM 0.7

/* The shape of the bookkeeping figures: one layer of a Llama-3-8B-like
 * model in f16 (64 KiB blocks). No K/V is touched there but the prefix
 * cache's writes, so the shape only sets the block size. */
#define META_LAYERS 1u
#define META_KV_HEADS 8u
#define META_HEAD_DIM 128u
#define BLOCK_TOKENS 16u
#define VOCAB 128000u

static int32_t rand_token(uint64_t *rng)
{
	return (int32_t)(bench_rand(rng) % VOCAB);
}

static void rand_tokens(int32_t *t, size_t n, uint64_t seed)
{
	for (size_t i = 0; i < n; i++)
		t[i] = rand_token(&seed);
}

struct shape {
	uint32_t layers, kv_heads, head_dim;
	enum kv_dtype dtype;
};

static const struct shape meta_shape = { META_LAYERS, META_KV_HEADS, META_HEAD_DIM,
					 KV_DTYPE_F16 };

/* A cache of `blocks` blocks of BLOCK_TOKENS tokens; threads 1 starts no
 * attention threads. */
static int make_cache(const struct shape *sh, uint32_t blocks, bool prefix, uint32_t threads,
		      struct kv_cache **out)
{
	struct kv_cache_config cfg;

	kv_cache_config_default(&cfg);
	cfg.n_layers = sh->layers;
	cfg.n_kv_heads = sh->kv_heads;
	cfg.head_dim = sh->head_dim;
	cfg.dtype = sh->dtype;
	cfg.block_tokens = BLOCK_TOKENS;
	cfg.capacity_blocks = blocks;
	cfg.prefix_cache = prefix;
	cfg.threads = threads;
	cfg.label = "bench/kv";
	return kv_cache_create(&cfg, out);
}

static int meta_cache(uint32_t blocks, bool prefix, struct kv_cache **out)
{
	return make_cache(&meta_shape, blocks, prefix, 1, out);
}

/* The end of a measurement: the cache must still hold its invariants
 * (else the figures measured a broken cache). Returns rc or the check's. */
static int cache_done(struct kv_cache *c, int rc)
{
	if (rc == 0 && c)
		rc = kv_cache_validate(c);
	kv_cache_destroy(c);
	return rc;
}

/* ---- Appends and block life ------------------------------------------- */

#define APPEND_SEQS 256u
#define APPEND_LEN 256u

/* One round: APPEND_SEQS sequences created, appended one token at a time
 * in turn to APPEND_LEN tokens, freed. */
static int append_round(struct kv_cache *c, const int32_t *toks, kv_seq_id *ids)
{
	uint32_t made = 0;
	int rc = 0;

	for (; made < APPEND_SEQS && rc == 0; made++)
		rc = kv_seq_create(c, NULL, &ids[made]);
	if (rc)
		made--;
	for (uint32_t t = 0; t < APPEND_LEN && rc == 0; t++)
		for (uint32_t s = 0; s < APPEND_SEQS && rc == 0; s++)
			rc = kv_seq_append(c, ids[s], &toks[(size_t)s * APPEND_LEN + t], 1);
	for (uint32_t s = 0; s < made; s++)
		kv_seq_free(c, ids[s]);
	return rc;
}

static int bench_append(struct bench_run *run, int reps)
{
	const uint32_t rounds = run->quick ? 2 : 60;
	const uint32_t cycles = run->quick ? 20000 : 1000000;
	double app[MAX_REPS], cyc[MAX_REPS];
	kv_seq_id *ids = malloc(sizeof(*ids) * APPEND_SEQS), one;
	int32_t *toks = malloc(sizeof(*toks) * APPEND_SEQS * APPEND_LEN);
	struct kv_cache *c = NULL;
	int rc = ids && toks ? 0 : -ENOMEM;

	if (rc == 0)
		rc = meta_cache(APPEND_SEQS * APPEND_LEN / BLOCK_TOKENS + 64, true, &c);
	if (rc == 0) {
		rand_tokens(toks, (size_t)APPEND_SEQS * APPEND_LEN, 1);
		rc = append_round(c, toks, ids); /* warm: pool commit, arrays */
	}
	for (int r = 0; r < reps && rc == 0; r++) {
		uint64_t t0 = bench_now_ns();

		for (uint32_t i = 0; i < rounds && rc == 0; i++)
			rc = append_round(c, toks, ids);
		app[r] = (double)rounds * APPEND_SEQS * APPEND_LEN /
			 ((double)(bench_now_ns() - t0) / 1e9);
	}
	if (rc == 0)
		rc = kv_seq_create(c, NULL, &one);
	for (int r = 0; r < reps && rc == 0; r++) {
		uint64_t t0 = bench_now_ns();

		for (uint32_t i = 0; i < cycles && rc == 0; i++) {
			rc = kv_seq_append(c, one, toks + (i % APPEND_SEQS) * BLOCK_TOKENS,
					   BLOCK_TOKENS);
			if (rc == 0)
				rc = kv_seq_truncate(c, one, 0);
		}
		cyc[r] = (double)cycles / ((double)(bench_now_ns() - t0) / 1e9);
	}
	if (rc == 0)
		rc = kv_seq_free(c, one);
	rc = cache_done(c, rc);
	free(ids);
	free(toks);
	if (rc)
		return rc;
	bench_figure(run, "append_per_s", bench_median(app, (size_t)reps), "1/s", TARGET_APPEND,
		     "target");
	bench_figure(run, "block_alloc_free_per_s", bench_median(cyc, (size_t)reps), "1/s", 0,
		     NULL);
	return 0;
}

/* ---- Prefix cache ----------------------------------------------------- */

#define PROMPT_TOKENS 4096u
#define WRITE_ROWS 256u

/* Write K/V (any values: zeros) of positions [0, n) of every layer. */
static int write_zeros(struct kv_cache *c, kv_seq_id s, uint32_t layers, uint32_t from,
		       uint32_t n, const float *zeros)
{
	int rc = 0;

	for (uint32_t l = 0; l < layers && rc == 0; l++)
		for (uint32_t p = from; p < from + n && rc == 0; p += WRITE_ROWS) {
			uint32_t k = from + n - p < WRITE_ROWS ? from + n - p : WRITE_ROWS;

			rc = kv_seq_write(c, s, l, p, k, zeros, zeros);
		}
	return rc;
}

static int bench_prefix(struct bench_run *run, int reps)
{
	const uint32_t calls = run->quick ? 50 : 2000;
	const size_t row = (size_t)META_KV_HEADS * META_HEAD_DIM;
	double look[MAX_REPS], hit[MAX_REPS], *one = malloc(sizeof(*one) * calls);
	int32_t *toks = malloc(sizeof(*toks) * PROMPT_TOKENS);
	float *zeros = calloc((size_t)WRITE_ROWS * row, sizeof(*zeros));
	struct kv_prefix_hit ph = { 0 };
	struct kv_cache *c = NULL;
	uint32_t cached = 0;
	kv_seq_id s;
	int rc = one && toks && zeros ? 0 : -ENOMEM;

	if (rc == 0)
		rc = meta_cache(2 * PROMPT_TOKENS / BLOCK_TOKENS, true, &c);
	if (rc == 0) {
		rand_tokens(toks, PROMPT_TOKENS, 2);
		rc = kv_seq_create(c, NULL, &s);
	}
	if (rc == 0) {
		/* Computed once (K/V written for every layer), then only the
		 * prefix cache holds its 256 blocks. */
		rc = kv_seq_prompt(c, s, toks, PROMPT_TOKENS, &cached);
		if (rc == 0)
			rc = write_zeros(c, s, META_LAYERS, 0, PROMPT_TOKENS, zeros);
		kv_seq_free(c, s);
	}
	if (rc == 0)
		rc = kv_cache_lookup(c, toks, PROMPT_TOKENS, NULL, 0, &ph);
	if (rc == 0 && ph.dram_tokens != PROMPT_TOKENS)
		rc = kv_fail(EPROTO, "kv bench: the written prompt's blocks are not cached "
			     "(%u of %u tokens hit)", ph.dram_tokens, PROMPT_TOKENS);
	for (int r = 0; r < reps && rc == 0; r++) {
		for (uint32_t i = 0; i < calls && rc == 0; i++) {
			uint64_t t0 = bench_now_ns();

			rc = kv_cache_lookup(c, toks, PROMPT_TOKENS, NULL, 0, &ph);
			one[i] = (double)(bench_now_ns() - t0) / 1e3;
		}
		look[r] = bench_median(one, calls);
		for (uint32_t i = 0; i < calls && rc == 0; i++) {
			uint64_t t0 = bench_now_ns();

			rc = kv_seq_create(c, NULL, &s);
			if (rc)
				break;
			rc = kv_seq_prompt(c, s, toks, PROMPT_TOKENS, &cached);
			kv_seq_free(c, s);
			one[i] = (double)(bench_now_ns() - t0) / 1e3;
			if (rc == 0 && cached != PROMPT_TOKENS - BLOCK_TOKENS)
				rc = kv_fail(EPROTO, "kv bench: prompt hit %u tokens, want %u", cached,
					     PROMPT_TOKENS - BLOCK_TOKENS);
		}
		hit[r] = bench_median(one, calls);
	}
	rc = cache_done(c, rc);
	free(one);
	free(toks);
	free(zeros);
	if (rc)
		return rc;
	bench_figure(run, "prefix_lookup_4096_us", bench_median(look, (size_t)reps), "us",
		     TARGET_LOOKUP_US, "target (at most)");
	bench_figure(run, "prompt_hit_4096_us", bench_median(hit, (size_t)reps), "us", 0, NULL);
	return 0;
}

/* ---- Internal waste --------------------------------------------------- */

#define WASTE_SEQS 256u
#define WASTE_MAX_LEN 4096u
#define WASTE_SIGMA 1.0
#define WASTE_PROMPT_MEAN 160.0
#define WASTE_OUTPUT_MEAN 340.0

/* A uniform double in (0, 1]. */
static double rand_open(uint64_t *rng)
{
	return (double)((bench_rand(rng) >> 11) + 1) * 0x1p-53;
}

/* A log-normal length of the given mean (mu = ln(mean) - sigma^2 / 2),
 * rounded and clamped to [1, WASTE_MAX_LEN]. Box-Muller for the normal. */
static uint32_t lognormal_len(uint64_t *rng, double mean)
{
	double mu = log(mean) - WASTE_SIGMA * WASTE_SIGMA / 2;
	double z = sqrt(-2 * log(rand_open(rng))) * cos(2 * M_PI * rand_open(rng));
	double x = round(exp(mu + WASTE_SIGMA * z));

	return x < 1 ? 1 : x > WASTE_MAX_LEN ? WASTE_MAX_LEN : (uint32_t)x;
}

struct waste_slot {
	kv_seq_id id;               /* KV_SEQ_NONE: start a new one next step */
	uint32_t left;              /* output tokens still to decode */
};

/* Steps of a continuous batch; the mean of waste_pct over the steps after
 * `warm`. */
static int waste_run(struct kv_cache *c, uint64_t seed, uint32_t warm, uint32_t steps,
		     const int32_t *toks, double *mean)
{
	struct waste_slot slot[WASTE_SEQS];
	struct kv_cache_stats st;
	double sum = 0;
	int rc = 0;

	memset(slot, 0, sizeof(slot));
	for (uint32_t step = 0; step < warm + steps && rc == 0; step++) {
		for (uint32_t i = 0; i < WASTE_SEQS && rc == 0; i++) {
			struct waste_slot *w = &slot[i];
			int32_t t = rand_token(&seed);

			if (w->id == KV_SEQ_NONE) {
				uint32_t p = lognormal_len(&seed, WASTE_PROMPT_MEAN);

				w->left = lognormal_len(&seed, WASTE_OUTPUT_MEAN);
				rc = kv_seq_create(c, NULL, &w->id);
				if (rc == 0)
					rc = kv_seq_append(c, w->id,
							   toks + bench_rand(&seed) % WASTE_MAX_LEN, p);
				continue;
			}
			rc = kv_seq_append(c, w->id, &t, 1);
			if (rc == 0 && --w->left == 0) {
				rc = kv_seq_free(c, w->id);
				w->id = KV_SEQ_NONE;
			}
		}
		if (step >= warm) {
			kv_cache_stats(c, &st);
			sum += st.waste_pct;
		}
	}
	for (uint32_t i = 0; i < WASTE_SEQS; i++)
		if (slot[i].id != KV_SEQ_NONE)
			kv_seq_free(c, slot[i].id);
	*mean = sum / steps;
	return rc;
}

static int bench_waste(struct bench_run *run, int reps)
{
	const uint32_t warm = run->quick ? 256 : 4096, steps = run->quick ? 256 : 8192;
	/* Room for every sequence at its longest: prompt and output. */
	const uint32_t blocks = WASTE_SEQS * (2 * WASTE_MAX_LEN / BLOCK_TOKENS) + 64;
	int32_t *toks = malloc(sizeof(*toks) * 2 * WASTE_MAX_LEN);
	double w[MAX_REPS];
	struct kv_cache *c = NULL;
	int rc = toks ? 0 : -ENOMEM;

	if (rc == 0) {
		rand_tokens(toks, 2 * WASTE_MAX_LEN, 3);
		rc = meta_cache(blocks, true, &c);
	}
	for (int r = 0; r < reps && rc == 0; r++)
		rc = waste_run(c, 100 + (uint64_t)r, warm, steps, toks, &w[r]);
	rc = cache_done(c, rc);
	free(toks);
	if (rc)
		return rc;
	bench_figure(run, "waste_pct", bench_median(w, (size_t)reps), "%", TARGET_WASTE_PCT,
		     "target (at most)");
	return 0;
}

/* ---- Sharing by fork -------------------------------------------------- */

#define SHARE_PROMPT 1024u
#define SHARE_SAMPLES 8u
#define SHARE_NEW 256u

/* Blocks held (blocks_used) once SHARE_SAMPLES samples of SHARE_NEW
 * tokens each follow one prompt, forked (fork true) or as independent
 * sequences in a cache without prefix sharing. */
static int share_blocks(bool fork, uint32_t *used, uint64_t *cow)
{
	const size_t row = (size_t)META_KV_HEADS * META_HEAD_DIM;
	const uint32_t total = SHARE_PROMPT + SHARE_NEW;
	int32_t *toks = malloc(sizeof(*toks) * total);
	float *zeros = calloc((size_t)WRITE_ROWS * row, sizeof(*zeros));
	kv_seq_id parent = KV_SEQ_NONE, kids[SHARE_SAMPLES];
	struct kv_cache_stats st;
	struct kv_cache *c = NULL;
	uint32_t made = 0, cached;
	uint64_t rng = 5;
	int rc = toks && zeros ? 0 : -ENOMEM;

	if (rc == 0) {
		rand_tokens(toks, total, 4);
		rc = meta_cache(2 * SHARE_SAMPLES * total / BLOCK_TOKENS, fork, &c);
	}
	if (rc == 0 && fork) {
		rc = kv_seq_create(c, NULL, &parent);
		if (rc == 0)
			rc = kv_seq_prompt(c, parent, toks, SHARE_PROMPT, &cached);
		if (rc == 0)
			rc = write_zeros(c, parent, META_LAYERS, 0, SHARE_PROMPT, zeros);
	}
	for (; made < SHARE_SAMPLES && rc == 0; made++) {
		kv_seq_id *k = &kids[made];

		if (fork) {
			rc = kv_seq_fork(c, parent, k);
			if (rc)
				break;
			/* Each sample decodes its own tokens: append and write
			 * one at a time, as a decode loop does. */
			for (uint32_t t = 0; t < SHARE_NEW && rc == 0; t++) {
				int32_t tok = rand_token(&rng);

				rc = kv_seq_append(c, *k, &tok, 1);
				if (rc == 0)
					rc = write_zeros(c, *k, META_LAYERS, SHARE_PROMPT + t, 1, zeros);
			}
		} else {
			rc = kv_seq_create(c, NULL, k);
			if (rc)
				break;
			rc = kv_seq_append(c, *k, toks, total);
		}
	}
	if (parent != KV_SEQ_NONE)
		kv_seq_free(c, parent); /* the samples hold what they share */
	if (rc == 0) {
		kv_cache_stats(c, &st);
		*used = st.blocks_used;
		*cow = st.cow_copies;
		rc = kv_cache_validate(c);
	}
	for (uint32_t i = 0; i < made; i++)
		kv_seq_free(c, kids[i]);
	kv_cache_destroy(c);
	free(toks);
	free(zeros);
	return rc;
}

static int bench_sharing(struct bench_run *run)
{
	uint32_t with = 0, without = 0;
	uint64_t cow = 0, cow0 = 0;
	int rc = share_blocks(true, &with, &cow);

	if (rc == 0)
		rc = share_blocks(false, &without, &cow0);
	if (rc == 0 && with == 0)
		rc = kv_fail(EPROTO, "kv bench: forked samples hold no blocks");
	if (rc)
		return rc;
	/* The same block size on both sides: bytes are blocks x block_bytes. */
	bench_figure(run, "sharing_reduction_x", (double)without / with, "x", TARGET_SHARING,
		     "target");
	fprintf(stderr, "kv-bench kv: sharing: %u blocks forked (%llu copied on write), %u "
		"independent\n", with, (unsigned long long)cow, without);
	return 0;
}

/* ---- Attention -------------------------------------------------------- */

#define ATTN_SEQS 16u
#define ATTN_KV_HEADS 8u
#define ATTN_Q_HEADS 32u
#define ATTN_HEAD_DIM 128u
/* K/V bytes of one token of one layer: K and V, every kv head, f32. */
#define ATTN_TOKEN_BYTES ((size_t)2 * ATTN_KV_HEADS * ATTN_HEAD_DIM * sizeof(float))
#define ATTN_WORKING_SET ((size_t)512 << 20)
#define DRAM_BYTES ((size_t)512 << 20)
/* Each measurement reads at least this much. */
#define MEASURE_BYTES ((size_t)1 << 30)

/* One context's data: ATTN_SEQS sequences of ctx tokens in `layers`
 * layers, written into a cache (paged) and, value for value, into a
 * contiguous buffer. */
struct attn_set {
	uint32_t ctx, layers;
	struct kv_cache *c;
	kv_seq_id ids[ATTN_SEQS];
	/* (layers, ATTN_SEQS, 2 [K, V], ATTN_KV_HEADS, ctx, ATTN_HEAD_DIM) f32:
	 * one sequence's layer is one block of block_tokens = ctx. */
	char *contig;
	size_t contig_bytes;
	float *q;                   /* (ATTN_SEQS, ATTN_Q_HEADS, ATTN_HEAD_DIM) */
	float *out_paged, *out_contig;  /* like q */
};

static size_t seq_layer_bytes(uint32_t ctx)
{
	return (size_t)ctx * ATTN_TOKEN_BYTES;
}

static void rand_floats(float *f, size_t n, uint64_t *rng)
{
	for (size_t i = 0; i < n; i += 2) {
		uint64_t r = bench_rand(rng);

		f[i] = (float)((int32_t)(r & 0xffffff) - 0x800000) * 0x1p-23f;
		if (i + 1 < n)
			f[i + 1] = (float)((int32_t)(r >> 40) - 0x800000) * 0x1p-23f;
	}
}

static void attn_set_free(struct attn_set *a)
{
	kv_cache_destroy(a->c);
	if (a->contig)
		munmap(a->contig, a->contig_bytes);
	free(a->q);
	free(a->out_paged);
	free(a->out_contig);
	memset(a, 0, sizeof(*a));
}

static int attn_set_make(struct attn_set *a, uint32_t ctx, uint32_t layers, uint32_t threads)
{
	const size_t rows = (size_t)ctx * ATTN_KV_HEADS, qn = ATTN_SEQS * ATTN_Q_HEADS * ATTN_HEAD_DIM;
	float *k = malloc(rows * ATTN_HEAD_DIM * sizeof(float));
	float *v = malloc(rows * ATTN_HEAD_DIM * sizeof(float));
	const struct shape sh = { layers, ATTN_KV_HEADS, ATTN_HEAD_DIM, KV_DTYPE_F32 };
	uint64_t rng = 7;
	int rc;

	memset(a, 0, sizeof(*a));
	a->ctx = ctx;
	a->layers = layers;
	a->contig_bytes = layers * ATTN_SEQS * seq_layer_bytes(ctx);
	a->contig = bench_map_huge(a->contig_bytes);
	a->q = malloc(qn * sizeof(float));
	a->out_paged = malloc(qn * sizeof(float));
	a->out_contig = malloc(qn * sizeof(float));
	rc = k && v && a->contig && a->q && a->out_paged && a->out_contig ? 0 : -ENOMEM;
	/* No prefix cache: attention does not care, and nothing is hashed. */
	if (rc == 0)
		rc = make_cache(&sh, ATTN_SEQS * (ctx / BLOCK_TOKENS) + 16, false, threads, &a->c);
	for (uint32_t s = 0; s < ATTN_SEQS && rc == 0; s++)
		rc = kv_seq_create(a->c, NULL, &a->ids[s]);
	/* Appended in turn, as a decode batch grows: the sequences' blocks
	 * interleave in the pool. */
	for (uint32_t t = 0; t < ctx && rc == 0; t++) {
		for (uint32_t s = 0; s < ATTN_SEQS && rc == 0; s++) {
			int32_t tok = rand_token(&rng);

			rc = kv_seq_append(a->c, a->ids[s], &tok, 1);
		}
	}
	for (uint32_t l = 0; l < layers && rc == 0; l++) {
		for (uint32_t s = 0; s < ATTN_SEQS && rc == 0; s++) {
			float *ck = (float *)(void *)(a->contig + (l * ATTN_SEQS + s) *
						      seq_layer_bytes(ctx));
			float *cv = ck + (size_t)ATTN_KV_HEADS * ctx * ATTN_HEAD_DIM;

			rand_floats(k, rows * ATTN_HEAD_DIM, &rng);
			rand_floats(v, rows * ATTN_HEAD_DIM, &rng);
			rc = kv_seq_write(a->c, a->ids[s], l, 0, ctx, k, v);
			/* (ctx, heads, D) rows -> (heads, ctx, D) runs */
			for (uint32_t t = 0; t < ctx && rc == 0; t++) {
				for (uint32_t h = 0; h < ATTN_KV_HEADS; h++) {
					size_t src = ((size_t)t * ATTN_KV_HEADS + h) * ATTN_HEAD_DIM;
					size_t dst = ((size_t)h * ctx + t) * ATTN_HEAD_DIM;

					memcpy(ck + dst, k + src, ATTN_HEAD_DIM * sizeof(float));
					memcpy(cv + dst, v + src, ATTN_HEAD_DIM * sizeof(float));
				}
			}
		}
	}
	if (rc == 0)
		rand_floats(a->q, qn, &rng);
	free(k);
	free(v);
	if (rc)
		attn_set_free(a);
	return rc;
}

/* `passes` visits of every (layer, group of `batch` sequences) through
 * kv_attention on the cache; *sec gets the time. */
static int run_paged(struct attn_set *a, uint32_t batch, uint32_t passes, double *sec)
{
	uint64_t t0 = bench_now_ns();
	int rc = 0;

	for (uint32_t p = 0; p < passes && rc == 0; p++) {
		for (uint32_t l = 0; l < a->layers && rc == 0; l++) {
			for (uint32_t g = 0; g < ATTN_SEQS && rc == 0; g += batch) {
				size_t qoff = (size_t)g * ATTN_Q_HEADS * ATTN_HEAD_DIM;
				struct kv_attn_batch b = {
					.n_seqs = batch, .seqs = a->ids + g, .n_q_heads = ATTN_Q_HEADS,
					.q = a->q + qoff, .out = a->out_paged + qoff,
				};

				rc = kv_attention(a->c, l, &b);
			}
		}
	}
	*sec = (double)(bench_now_ns() - t0) / 1e9;
	return rc;
}

/* The same visits through kv_attn_run on the contiguous layout. */
static int run_contig(struct attn_set *a, struct kv_tpool *tp, uint32_t batch, uint32_t passes,
		      double *sec)
{
	static const uint32_t block0 = 0;
	struct kv_attn_seq seqs[ATTN_SEQS];
	const size_t kv_bytes = (size_t)ATTN_KV_HEADS * a->ctx * ATTN_HEAD_DIM * sizeof(float);
	struct kv_attn_job job = {
		.lay = { .dtype = KV_DTYPE_F32, .block_tokens = a->ctx, .n_kv_heads = ATTN_KV_HEADS,
			 .head_dim = ATTN_HEAD_DIM,
			 .head_bytes = (size_t)a->ctx * ATTN_HEAD_DIM * sizeof(float),
			 .v_offset = kv_bytes },
		.n_q_heads = ATTN_Q_HEADS,
		.scale = 1.0f / sqrtf((float)ATTN_HEAD_DIM),
		.n_seqs = batch,
		.seqs = seqs,
	};
	uint64_t t0 = bench_now_ns();
	int rc = 0;

	for (uint32_t p = 0; p < passes && rc == 0; p++) {
		for (uint32_t l = 0; l < a->layers && rc == 0; l++) {
			for (uint32_t g = 0; g < ATTN_SEQS && rc == 0; g += batch) {
				for (uint32_t i = 0; i < batch; i++) {
					size_t qoff = (size_t)(g + i) * ATTN_Q_HEADS * ATTN_HEAD_DIM;

					seqs[i] = (struct kv_attn_seq){
						.base = a->contig + ((size_t)l * ATTN_SEQS + g + i) *
								    seq_layer_bytes(a->ctx),
						.stride = seq_layer_bytes(a->ctx),
						.blocks = &block0,
						.n_tokens = a->ctx,
						.n_queries = 1,
						.q = a->q + qoff,
						.out = a->out_contig + qoff,
					};
				}
				rc = kv_attn_run(tp, &job);
			}
		}
	}
	*sec = (double)(bench_now_ns() - t0) / 1e9;
	return rc;
}

#define N_BATCHES 2
static const uint32_t batches[N_BATCHES] = { 1, 16 };

/* Per-rep results of one context. */
struct attn_reps {
	double paged[N_BATCHES][MAX_REPS], contig[N_BATCHES][MAX_REPS];
	double ratio[N_BATCHES][MAX_REPS], dram_ratio[N_BATCHES][MAX_REPS];
};

/* Largest |x - y| of n floats. */
static float max_diff(const float *x, const float *y, size_t n)
{
	float m = 0;

	for (size_t i = 0; i < n; i++)
		if (fabsf(x[i] - y[i]) > m)
			m = fabsf(x[i] - y[i]);
	return m;
}

static int attn_context(struct bench_run *run, int reps, uint32_t ctx, struct kv_tpool *tp,
			struct bench_dram *probe, double *dram, size_t *n_dram,
			struct attn_reps *out)
{
	const uint32_t threads = kv_tpool_threads(tp);
	uint32_t layers = (uint32_t)(ATTN_WORKING_SET / (ATTN_SEQS * seq_layer_bytes(ctx)));
	struct attn_set a;
	double sec;
	int rc;

	if (layers < 2)
		layers = 2;
	if (run->quick)
		layers = 1;
	rc = attn_set_make(&a, ctx, layers, threads);
	if (rc)
		return rc;
	/* Warm both paths (threads, scratch), then check they agree: the
	 * kernel's arithmetic does not depend on the layout. */
	for (int b = 0; b < N_BATCHES && rc == 0; b++) {
		rc = run_paged(&a, batches[b], 1, &sec);
		if (rc == 0)
			rc = run_contig(&a, tp, batches[b], 1, &sec);
		if (rc == 0) {
			float d = max_diff(a.out_paged, a.out_contig,
					   (size_t)ATTN_SEQS * ATTN_Q_HEADS * ATTN_HEAD_DIM);

			if (d > 1e-4f)
				rc = kv_fail(EPROTO, "kv bench: paged and contiguous attention differ "
					     "by %g (context %u, batch %u)", d, ctx, batches[b]);
			else if (d > 0)
				fprintf(stderr, "kv-bench kv: paged and contiguous attention differ by "
					"%g (context %u, batch %u): not bit for bit\n", d, ctx,
					batches[b]);
		}
	}
	for (int r = 0; r < reps && rc == 0; r++) {
		double dr = bench_dram_read_gbps(probe, tp);

		dram[(*n_dram)++] = dr;
		for (int b = 0; b < N_BATCHES && rc == 0; b++) {
			const double pass_bytes = (double)a.layers * ATTN_SEQS * seq_layer_bytes(ctx);
			const uint32_t passes = run->quick ? 1 :
				(uint32_t)ceil((double)MEASURE_BYTES / pass_bytes);
			double ps = 0, cs = 0;

			/* Alternate which layout goes first. */
			if (r % 2 == 0) {
				rc = run_paged(&a, batches[b], passes, &ps);
				if (rc == 0)
					rc = run_contig(&a, tp, batches[b], passes, &cs);
			} else {
				rc = run_contig(&a, tp, batches[b], passes, &cs);
				if (rc == 0)
					rc = run_paged(&a, batches[b], passes, &ps);
			}
			out->paged[b][r] = pass_bytes * passes / ps / 1e9;
			out->contig[b][r] = pass_bytes * passes / cs / 1e9;
			out->ratio[b][r] = out->paged[b][r] / out->contig[b][r];
			out->dram_ratio[b][r] = out->paged[b][r] / dr;
		}
	}
	if (rc == 0) {
		struct kv_attn_plan plan[N_BATCHES];

		for (int b = 0; b < N_BATCHES; b++) {
			struct kv_attn_seq one = { .n_tokens = ctx, .n_queries = 1 };
			struct kv_attn_seq sq[ATTN_SEQS];
			struct kv_attn_job job = {
				.lay = { .dtype = KV_DTYPE_F32, .block_tokens = BLOCK_TOKENS,
					 .n_kv_heads = ATTN_KV_HEADS, .head_dim = ATTN_HEAD_DIM },
				.n_q_heads = ATTN_Q_HEADS, .scale = 1, .n_seqs = batches[b], .seqs = sq,
			};

			for (uint32_t i = 0; i < ATTN_SEQS; i++)
				sq[i] = one;
			kv_attn_plan(&job, threads, &plan[b]);
		}
		fprintf(stderr, "kv-bench kv: attention context %u: %u layers x %u sequences "
			"(%zu MiB of K/V in each layout), %u threads; plan b1: %u items on %u "
			"workers, b16: %u items on %u workers\n", ctx, a.layers, ATTN_SEQS,
			a.contig_bytes / MiB, threads, plan[0].items, plan[0].workers,
			plan[1].items, plan[1].workers);
	}
	attn_set_free(&a);
	return rc;
}

static uint32_t core_count(void)
{
	struct kv_topo *topo;
	uint32_t n = 1;

	/* What kv_cache_create takes for threads 0 (one per core). */
	if (kv_topo_create(&topo) == 0) {
		n = kv_topo_cores(topo);
		kv_topo_destroy(topo);
	}
	return n ? n : 1;
}

static double mean_of_medians(double v[N_BATCHES][MAX_REPS], int reps)
{
	double s = 0;

	for (int b = 0; b < N_BATCHES; b++)
		s += bench_median(v[b], (size_t)reps);
	return s / N_BATCHES;
}

static int bench_attention(struct bench_run *run, int reps)
{
	static const uint32_t ctxs[2] = { 512, 4096 };
	static const char *const names[2][N_BATCHES][3] = {
		{ { "attn_paged_gbps_512_b1", "attn_contig_gbps_512_b1", "paged_vs_contig_ratio_512_b1" },
		  { "attn_paged_gbps_512_b16", "attn_contig_gbps_512_b16",
		    "paged_vs_contig_ratio_512_b16" } },
		{ { "attn_paged_gbps_4096_b1", "attn_contig_gbps_4096_b1",
		    "paged_vs_contig_ratio_4096_b1" },
		  { "attn_paged_gbps_4096_b16", "attn_contig_gbps_4096_b16",
		    "paged_vs_contig_ratio_4096_b16" } },
	};
	static const char *const headline[2] = { "paged_vs_contig_ratio_512",
						 "paged_vs_contig_ratio_4096" };
	const size_t dram_bytes = run->quick ? DRAM_BYTES / 8 : DRAM_BYTES;
	struct attn_reps *res = calloc(2, sizeof(*res));
	double dram[2 * MAX_REPS];
	size_t n_dram = 0;
	struct kv_tpool *tp = NULL;
	struct bench_dram *probe = NULL;
	int rc = res ? 0 : -ENOMEM;

	if (rc == 0)
		rc = bench_dram_create(dram_bytes, &probe);
	if (rc == 0)
		rc = kv_tpool_create(core_count(), &tp);
	for (int i = 0; i < 2 && rc == 0; i++)
		rc = attn_context(run, reps, ctxs[i], tp, probe, dram, &n_dram, &res[i]);
	if (rc == 0) {
		for (int i = 0; i < 2; i++) {
			for (int b = 0; b < N_BATCHES; b++) {
				bench_figure(run, names[i][b][0], bench_median(res[i].paged[b], (size_t)reps),
					     "GB/s", 0, NULL);
				bench_figure(run, names[i][b][1],
					     bench_median(res[i].contig[b], (size_t)reps), "GB/s", 0, NULL);
				bench_figure(run, names[i][b][2],
					     bench_median(res[i].ratio[b], (size_t)reps), "x", TARGET_PAGED,
					     "target (paged / contiguous)");
			}
			bench_figure(run, headline[i], mean_of_medians(res[i].ratio, reps), "x",
				     TARGET_PAGED, "target; mean of batches 1 and 16");
		}
		bench_figure(run, "dram_read_gbps", bench_median(dram, n_dram), "GB/s", 0, NULL);
		bench_figure(run, "attn_gbps_4096", mean_of_medians(res[1].paged, reps), "GB/s", 0,
			     NULL);
		bench_figure(run, "attn_dram_bw_ratio_4096_b1",
			     bench_median(res[1].dram_ratio[0], (size_t)reps), "x", TARGET_DRAM,
			     "target (paged / DRAM read)");
		bench_figure(run, "attn_dram_bw_ratio_4096_b16",
			     bench_median(res[1].dram_ratio[1], (size_t)reps), "x", TARGET_DRAM,
			     "target (paged / DRAM read)");
		bench_figure(run, "attn_dram_bw_ratio_4096", mean_of_medians(res[1].dram_ratio, reps),
			     "x", TARGET_DRAM, "target; mean of batches 1 and 16");
	}
	kv_tpool_destroy(tp);
	bench_dram_destroy(probe);
	free(res);
	return rc;
}

int bench_kv(struct bench_run *run)
{
	const int reps = run->reps < MAX_REPS ? run->reps : MAX_REPS;
	int rc = bench_append(run, reps);

	if (rc == 0)
		rc = bench_prefix(run, reps);
	if (rc == 0)
		rc = bench_waste(run, reps);
	if (rc == 0)
		rc = bench_sharing(run);
	if (rc == 0)
		rc = bench_attention(run, reps);
	return rc;
}
