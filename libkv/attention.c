// SPDX-License-Identifier: MIT
/*
 * The paged attention kernel: kv_attn_run() computes causal (optionally
 * windowed) softmax attention of a batch of sequences, reading K and V
 * through their block tables; kv_attn_plan() says how a job is divided.
 *
 * Work item = (sequence, kv head, query tile[, key part]). An item holds
 * the queries of a whole GQA group for a tile of consecutive positions
 * (rows = queries x group heads, at most ROW_FLOATS floats of them), so
 * each K and V row it reads from memory serves every row of the item.
 * Keys are consumed in chunks of `chunk` positions aligned to absolute
 * multiples of the chunk, gathered through the block table into row
 * pointers (f32) or decoded into a small f32 tile (f16, bf16, i8): the
 * arithmetic therefore does not depend on the block layout, and a paged
 * job gives bit for bit the output of the same data laid out contiguously.
 *
 * Per chunk: scores S = (scale q) . k for the rows that see the chunk,
 * masked to each row's window, then the online softmax of FlashAttention
 * (Dao et al., 2022): a running max m and sum l per row, the accumulator
 * rescaled by exp(m_old - m_new), all in f32, out = acc / l at the end.
 * When a job has few items for the threads (decode of a few sequences),
 * each item's key range is cut into parts whose partial (m, l, acc) are
 * merged afterwards, as in flash-decoding (Dao et al., 2023). Jobs that
 * read under SMALL_JOB_BYTES run on the caller alone.
 *
 * Decode is memory bound: while it computes a chunk, the score loop
 * prefetches the next chunk's K rows and the weighted-sum loop its V rows
 * (their addresses come from the block table a chunk ahead), spread over
 * the loops, because the arithmetic between loads leaves the core too few
 * misses in flight to stream from DRAM on its own, and the hardware
 * prefetchers stop at every block. The prefetches go to L2, a page's
 * first line of every page of the chunk before any page's second (see
 * struct pf_cursor), so that the L2 streamer runs on all of them.
 *
 * The item body is portable C (`omp simd` loops, 2 rows x 4 keys register
 * blocks) compiled three times under function target attributes: generic,
 * AVX2+FMA and AVX-512 (kv_kern_isa() picks one per call). The AVX2 and
 * AVX-512 variants take the score and weighted-sum loops from intrinsics
 * (qk_avx2, pv_avx2; qk_avx512, pv_avx512 sixteen floats wide): the
 * compilers' horizontal sums of `omp simd` reductions cost as much as the
 * dot products themselves, the weighted sum keeps its accumulators in
 * registers across a chunk's keys only when tiled by hand, and the
 * arithmetic the core does between loads is time in which fewer misses
 * are in flight. Keys no query of a tile sees are never touched, so
 * blocks the window excludes may be released.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "libkv/kernels.h"
#include "taxonomy/kv-private.h"

#if KV_KERN_X86
#include <immintrin.h>
#endif

/* q and accumulator floats of one item (64 KiB each: L2-resident). */
#define ROW_FLOATS 16384u
#define ROWS_MAX 256u
/* Keys per chunk, and chunk * D bound for the decoded K and V tiles:
 * 48 keys of 128 floats, 24 KiB of f32 K (and of V) a chunk. At f32
 * decode of head_dim 128 with the L2 prefetches below, 48 keys measured
 * 2-5% faster than 32, and 64 about 5% slower than 32. */
#define CHUNK_MAX 64u
#define CHUNK_FLOATS 6144u
/* Prefetches go to L2 (prefetcht2), not L1: a chunk's worth of lines
 * ahead does not fit in L1 beside the chunk being read, and a prefetch
 * into L1 holds one of the core's few fill buffers until its line comes
 * from DRAM, which caps a core at about 16 lines per DRAM latency. */
#define PF_LOC 1
/* Below this much K/V to read, waking threads costs more than it saves. */
#define SMALL_JOB_BYTES ((size_t)64 << 10)
/* Split-K aims for this many items per thread, each part >= MIN_PART keys. */
#define ITEMS_PER_THREAD 4u
#define MIN_PART 256u
#define NO_PART UINT32_MAX

/* Full unrolling of the register tiles' constant-count loops, so that
 * their accumulator arrays live in registers. */
#define KV_UNROLL _Pragma("GCC unroll 8")

/* a * b + c, fused in the variants that have FMA. */
#define MADD(fma, a, b, c) ((fma) ? fmaf((a), (b), (c)) : (a) * (b) + (c))

/* Shape of a job's items. */
struct geom {
	uint32_t d;                 /* head_dim */
	uint32_t dp;                /* row stride of q and acc: d rounded to 16 */
	uint32_t group;             /* q heads per kv head */
	uint32_t gs;                /* q heads per item */
	uint32_t n_sub;             /* items per (tile, kv head): ceil(group / gs) */
	uint32_t qt;                /* queries per tile */
	uint32_t rows;              /* qt * gs */
	uint32_t chunk;             /* keys per chunk: multiple of 4 */
	size_t es;                  /* element bytes */
	size_t scratch_bytes;       /* per worker */
	size_t part_floats;         /* one partial result: (m, l, acc) of rows */
};

struct item {
	uint32_t seq, head;         /* sequence, kv head */
	uint32_t g0, gn;            /* q heads head * group + g0 .. + gn */
	uint32_t j0, j1;            /* queries [j0, j1) of the sequence */
	uint32_t k0, k1;            /* keys [k0, k1) read */
	uint32_t part;              /* NO_PART: writes out; else its partial slot */
};

/* The consecutive items holding the parts of one split tile. */
struct merge {
	uint32_t item0, parts;
};

struct call;
typedef void (*item_run_fn)(const struct call *c, const struct item *it, char *mem);

struct call {
	const struct kv_attn_job *job;
	struct geom g;
	const struct item *items;
	float *partials;            /* (parts, part_floats) */
	char *scratch;              /* (workers, g.scratch_bytes) */
	item_run_fn run;
};

/* One worker's scratch, carved out of its slice. */
struct wsp {
	float *qs;                  /* (rows, dp) scaled queries */
	float *acc;                 /* (rows, dp) */
	float *m, *l;               /* (rows) running max and sum */
	float *s;                   /* (rows, chunk) scores, then weights */
	float *tk, *tv;             /* (chunk, d) decoded K and V (not f32) */
	const float **kp, **vp;     /* (chunk) f32 rows the loops read */
	const char **rk[2], **rv[2]; /* (chunk) cache rows: this chunk, next */
};

static inline uint32_t min_u32(uint32_t a, uint32_t b)
{
	return a < b ? a : b;
}

static inline size_t round_up(size_t x, size_t a)
{
	return (x + a - 1) / a * a;
}

/* ---- Geometry and plan -------------------------------------------------- */

/* First key query position p sees. */
static inline uint32_t key_lo(uint32_t p, uint32_t window)
{
	return window && p + 1 > window ? p + 1 - window : 0;
}

static void geom_init(struct geom *g, const struct kv_attn_job *job)
{
	const struct kv_attn_layout *lay = &job->lay;
	uint32_t rows_max, max_nq = 1;
	size_t f;

	g->d = lay->head_dim;
	g->dp = (uint32_t)round_up(g->d, 16);
	g->group = job->n_q_heads / lay->n_kv_heads;
	rows_max = min_u32(ROWS_MAX, ROW_FLOATS / g->dp);
	if (rows_max == 0)
		rows_max = 1;
	if (g->group <= rows_max) {
		g->gs = g->group;
		g->qt = rows_max / g->group;
	} else {
		g->gs = rows_max;
		g->qt = 1;
	}
	g->n_sub = (g->group + g->gs - 1) / g->gs;
	for (uint32_t s = 0; s < job->n_seqs; s++)
		if (job->seqs[s].n_queries > max_nq)
			max_nq = job->seqs[s].n_queries;
	g->qt = min_u32(g->qt, max_nq);
	g->rows = g->qt * g->gs;
	g->chunk = (CHUNK_FLOATS / g->dp) & ~3u;
	g->chunk = g->chunk < 4 ? 4 : g->chunk > CHUNK_MAX ? CHUNK_MAX : g->chunk;
	g->es = kv_dtype_size(lay->dtype);

	/* Every piece starts on 64 bytes (16 floats). */
	f = 2 * (size_t)g->rows * g->dp + 2 * round_up(g->rows, 16) +
	    round_up((size_t)g->rows * g->chunk, 16);
	if (lay->dtype != KV_DTYPE_F32)
		f += 2 * round_up((size_t)g->chunk * g->d, 16);
	g->scratch_bytes = f * sizeof(float) + 6 * round_up(g->chunk * sizeof(float *), 64);
	g->part_floats = (size_t)g->rows * g->dp + 2 * round_up(g->rows, 16);
}

static void wsp_carve(const struct geom *g, char *mem, struct wsp *w)
{
	float *f = (float *)(void *)mem;

	w->qs = f, f += (size_t)g->rows * g->dp;
	w->acc = f, f += (size_t)g->rows * g->dp;
	w->m = f, f += round_up(g->rows, 16);
	w->l = f, f += round_up(g->rows, 16);
	w->s = f, f += round_up((size_t)g->rows * g->chunk, 16);
	w->tk = w->tv = NULL;
	if (g->es != sizeof(float)) {
		w->tk = f, f += round_up((size_t)g->chunk * g->d, 16);
		w->tv = f, f += round_up((size_t)g->chunk * g->d, 16);
	}
	{
		char *pp = (char *)f;
		const size_t pb = round_up(g->chunk * sizeof(float *), 64);

		w->kp = (const float **)(void *)pp;
		w->vp = (const float **)(void *)(pp + pb);
		w->rk[0] = (const char **)(void *)(pp + 2 * pb);
		w->rv[0] = (const char **)(void *)(pp + 3 * pb);
		w->rk[1] = (const char **)(void *)(pp + 4 * pb);
		w->rv[1] = (const char **)(void *)(pp + 5 * pb);
	}
}

/* Counts of one job's decomposition. */
struct counts {
	uint32_t base;              /* (seq, kv head, tile, subgroup) items */
	uint32_t want;              /* parts wanted per base item */
	uint32_t items, parts, merges, max_parts;
	uint32_t workers;
	size_t bytes;
};

static uint32_t tiles_of(const struct geom *g, const struct kv_attn_seq *sq)
{
	if (sq->n_tokens == 0 || sq->n_queries == 0)
		return 0;
	return (sq->n_queries + g->qt - 1) / g->qt;
}

/* How many parts a base item of `keys` keys is cut into, and their
 * length (whole chunks' worth, at least MIN_PART keys). */
static uint32_t parts_of(const struct geom *g, uint32_t want, uint32_t keys, uint32_t *len)
{
	uint32_t n = want;

	if (n > keys / MIN_PART)
		n = keys / MIN_PART;
	if (n <= 1) {
		*len = keys;
		return 1;
	}
	*len = (uint32_t)round_up((keys + n - 1) / n, g->chunk);
	return (keys + *len - 1) / *len;
}

/* Walk the base items in the order they run: sequences in turn, within a
 * sequence the last (longest, under causality) tile first. With items
 * non-NULL, fill items and merges; always count. */
static void plan_walk(const struct kv_attn_job *job, const struct geom *g, struct counts *cn,
		      struct item *items, struct merge *merges)
{
	cn->items = cn->parts = cn->merges = 0;
	cn->max_parts = 1;
	for (uint32_t s = 0; s < job->n_seqs; s++) {
		const struct kv_attn_seq *sq = &job->seqs[s];
		uint32_t tiles = tiles_of(g, sq);
		uint32_t p0 = sq->n_tokens - sq->n_queries;

		for (uint32_t ti = tiles; ti-- > 0;) {
			uint32_t j0 = ti * g->qt, j1 = min_u32(j0 + g->qt, sq->n_queries);
			uint32_t k0 = key_lo(p0 + j0, job->window), k1 = p0 + j1;
			uint32_t len, np = parts_of(g, cn->want, k1 - k0, &len);

			for (uint32_t h = 0; h < job->lay.n_kv_heads; h++) {
				for (uint32_t sub = 0; sub < g->n_sub; sub++) {
					uint32_t g0 = sub * g->gs;

					if (np > 1) {
						if (merges)
							merges[cn->merges] =
								(struct merge){ cn->items, np };
						cn->merges++;
					}
					for (uint32_t pi = 0; pi < np; pi++) {
						if (items) {
							struct item *it = &items[cn->items];

							it->seq = s;
							it->head = h;
							it->g0 = g0;
							it->gn = min_u32(g->gs, g->group - g0);
							it->j0 = j0;
							it->j1 = j1;
							it->k0 = k0 + pi * len;
							it->k1 = min_u32(k1, it->k0 + len);
							it->part = np > 1 ? cn->parts + pi : NO_PART;
						}
						cn->items++;
					}
					if (np > 1)
						cn->parts += np;
				}
			}
			if (np > cn->max_parts)
				cn->max_parts = np;
		}
	}
}

static void plan_count(const struct kv_attn_job *job, const struct geom *g, uint32_t threads,
		       struct counts *cn)
{
	cn->base = 0;
	cn->bytes = 0;
	for (uint32_t s = 0; s < job->n_seqs; s++) {
		const struct kv_attn_seq *sq = &job->seqs[s];
		uint32_t tiles = tiles_of(g, sq);
		uint32_t p0 = sq->n_tokens - sq->n_queries;

		cn->base += tiles * job->lay.n_kv_heads * g->n_sub;
		for (uint32_t ti = 0; ti < tiles; ti++) {
			uint32_t j0 = ti * g->qt, j1 = min_u32(j0 + g->qt, sq->n_queries);
			size_t keys = p0 + j1 - key_lo(p0 + j0, job->window);

			cn->bytes += keys * job->lay.n_kv_heads * g->n_sub * 2 * g->d * g->es;
		}
	}
	cn->workers = threads > 1 && cn->bytes >= SMALL_JOB_BYTES ? threads : 1;
	cn->want = 1;
	if (cn->workers > 1 && cn->base && cn->base < ITEMS_PER_THREAD * cn->workers)
		cn->want = (ITEMS_PER_THREAD * cn->workers + cn->base - 1) / cn->base;
	plan_walk(job, g, cn, NULL, NULL);
}

/* Sizes of the call's allocation: items, merges, partials, scratch. */
struct layout_sizes {
	size_t items, merges, partials, scratch, total;
};

static void sizes_of(const struct geom *g, const struct counts *cn, struct layout_sizes *z)
{
	z->items = round_up(cn->items * sizeof(struct item), 64);
	z->merges = round_up(cn->merges * sizeof(struct merge), 64);
	z->partials = round_up(cn->parts * g->part_floats * sizeof(float), 64);
	z->scratch = cn->workers * round_up(g->scratch_bytes, 64);
	z->total = z->items + z->merges + z->partials + z->scratch;
}

void kv_attn_plan(const struct kv_attn_job *job, uint32_t threads, struct kv_attn_plan *out)
{
	struct geom g;
	struct counts cn;
	struct layout_sizes z;

	geom_init(&g, job);
	plan_count(job, &g, threads ? threads : 1, &cn);
	sizes_of(&g, &cn, &z);
	out->items = cn.items;
	out->max_parts = cn.max_parts;
	out->tile_queries = g.qt;
	out->tile_heads = g.gs;
	out->workers = cn.workers;
	out->kv_bytes = cn.bytes;
	out->scratch_bytes = z.total;
}

/* ---- Gathering keys ----------------------------------------------------- */

/* The cache rows of keys [a, b) of kv head `head`, run by run through the
 * block table, padded to a multiple of 4 with the last row. Only the
 * blocks holding [a, b) are looked at. */
static void chunk_rows(const struct call *c, const struct kv_attn_seq *sq, uint32_t head,
		       uint32_t a, uint32_t b, const char **rk, const char **rv)
{
	const struct kv_attn_layout *lay = &c->job->lay;
	const uint32_t bt = lay->block_tokens, n = b - a;
	const size_t row_bytes = (size_t)c->g.d * c->g.es;

	for (uint32_t t = a; t < b;) {
		uint32_t blk = t / bt, off = t - blk * bt, run = min_u32(bt - off, b - t);
		const char *kr = sq->base + (size_t)sq->blocks[blk] * sq->stride + sq->layer_offset +
				 head * lay->head_bytes + off * row_bytes;

		for (uint32_t i = 0; i < run; i++) {
			rk[t - a + i] = kr + i * row_bytes;
			rv[t - a + i] = kr + lay->v_offset + i * row_bytes;
		}
		t += run;
	}
	for (uint32_t i = n; i % 4; i++) {
		rk[i] = rk[n - 1];
		rv[i] = rv[n - 1];
	}
}

/* Point kp/vp at f32 rows for the n (padded: n4) keys of rk/rv starting
 * at key a: the cache's rows for f32, else rows decoded into the tiles,
 * one conversion call per run of consecutive rows. */
static void chunk_load(const struct call *c, const struct kv_attn_seq *sq, uint32_t head,
		       uint32_t a, uint32_t n, uint32_t n4, const char *const *rk,
		       const char *const *rv, struct wsp *w)
{
	const struct kv_attn_layout *lay = &c->job->lay;
	const uint32_t d = c->g.d;

	if (lay->dtype == KV_DTYPE_F32) {
		for (uint32_t i = 0; i < n4; i++) {
			w->kp[i] = (const float *)(const void *)rk[i];
			w->vp[i] = (const float *)(const void *)rv[i];
		}
		return;
	}
	for (uint32_t i = 0; i < n;) {
		uint32_t run = 1;
		float ks = 1.0f, vs = 1.0f;

		/* Rows of one block are consecutive, K and V each. */
		while (i + run < n && (a + i + run) % lay->block_tokens != 0)
			run++;
		if (lay->dtype == KV_DTYPE_I8) {
			/* The run's block: its region starts at the K of head 0. */
			uint32_t blk = (a + i) / lay->block_tokens;
			const char *reg = sq->base + (size_t)sq->blocks[blk] * sq->stride + sq->layer_offset;

			memcpy(&ks, reg + lay->scale_offset + head * sizeof(float), sizeof(ks));
			memcpy(&vs, reg + lay->scale_offset + (lay->n_kv_heads + head) * sizeof(float),
			       sizeof(vs));
		}
		kv_rows_load(lay->dtype, w->tk + (size_t)i * d, rk[i], (size_t)run * d, ks);
		kv_rows_load(lay->dtype, w->tv + (size_t)i * d, rv[i], (size_t)run * d, vs);
		i += run;
	}
	for (uint32_t i = 0; i < n4; i++) {
		uint32_t src = i < n ? i : n - 1;

		w->kp[i] = w->tk + (size_t)src * d;
		w->vp[i] = w->tv + (size_t)src * d;
	}
}

/* Ask for four rows (of row_bytes) ahead of their use. */
static inline void prefetch4(const char *const *r, size_t row_bytes)
{
	for (int i = 0; i < 4; i++)
		for (size_t o = 0; o < row_bytes; o += 64)
			__builtin_prefetch(r[i] + o, 0, PF_LOC);
}

/* ---- Inner loops (inlined into each variant) ---------------------------- */

/* e^x for x <= 0 (also fine up to 88), about 2 ulp; 0 from -87 down and
 * for -inf. Range reduction x = n ln2 + r with a two-part ln2 (its high
 * part has 16 bits, so n * ln2_hi is exact), a degree-7 Taylor polynomial
 * on |r| <= ln2 / 2 (truncation 5e-9), and 2^n put in the exponent field.
 *
 * Written so that the softmax loops vectorise: the clamp and the zeroing
 * are integer selects on the bit pattern (for x <= 0 a larger pattern is
 * a larger magnitude). A float select against a constant would let GCC
 * split the loop body into a constant path and one with multiplies it
 * must not speculate (-ftrapping-math), and give up vectorising. */
KV_ALWAYS_INLINE float kexp(float x, const int fma)
{
	const uint32_t lim = 0xc2ae0000u; /* -87.0f */
	uint32_t xb, cb, e;
	float xc, n, r, p, two_n;

	memcpy(&xb, &x, sizeof(xb));
	cb = xb < lim ? xb : lim;
	memcpy(&xc, &cb, sizeof(xc));
	n = (xc * 1.44269504f + 12582912.0f) - 12582912.0f;
	r = MADD(fma, n, -0.693145751953125f, xc);
	r = MADD(fma, n, -1.428606765330187e-06f, r);
	p = 1.0f / 5040.0f;
	p = MADD(fma, p, r, 1.0f / 720.0f);
	p = MADD(fma, p, r, 1.0f / 120.0f);
	p = MADD(fma, p, r, 1.0f / 24.0f);
	p = MADD(fma, p, r, 1.0f / 6.0f);
	p = MADD(fma, p, r, 0.5f);
	p = MADD(fma, p, r, 1.0f);
	p = MADD(fma, p, r, 1.0f);
	e = (uint32_t)((int32_t)n + 127) << 23;
	e = xb < lim ? e : 0u;
	memcpy(&two_n, &e, sizeof(two_n));
	return p * two_n;
}

/* Scores of two rows against four keys: 8 independent accumulators keep
 * both FMA pipes busy with 6 loads per 8 FMAs. */
KV_ALWAYS_INLINE void dot2x4(const float *q0, const float *q1, const float *const *k,
			     uint32_t d, float *s0, float *s1, const int fma)
{
	const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
	float a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;

	KV_SIMD_SUM(a0, a1, a2, a3, b0, b1, b2, b3)
	for (uint32_t i = 0; i < d; i++) {
		float x0 = k0[i], x1 = k1[i], x2 = k2[i], x3 = k3[i];

		a0 = MADD(fma, q0[i], x0, a0);
		a1 = MADD(fma, q0[i], x1, a1);
		a2 = MADD(fma, q0[i], x2, a2);
		a3 = MADD(fma, q0[i], x3, a3);
		b0 = MADD(fma, q1[i], x0, b0);
		b1 = MADD(fma, q1[i], x1, b1);
		b2 = MADD(fma, q1[i], x2, b2);
		b3 = MADD(fma, q1[i], x3, b3);
	}
	s0[0] = a0, s0[1] = a1, s0[2] = a2, s0[3] = a3;
	s1[0] = b0, s1[1] = b1, s1[2] = b2, s1[3] = b3;
}

KV_ALWAYS_INLINE void dot1x4(const float *q0, const float *const *k, uint32_t d, float *s0,
			     const int fma)
{
	const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
	float a0 = 0, a1 = 0, a2 = 0, a3 = 0;

	KV_SIMD_SUM(a0, a1, a2, a3)
	for (uint32_t i = 0; i < d; i++) {
		a0 = MADD(fma, q0[i], k0[i], a0);
		a1 = MADD(fma, q0[i], k1[i], a1);
		a2 = MADD(fma, q0[i], k2[i], a2);
		a3 = MADD(fma, q0[i], k3[i], a3);
	}
	s0[0] = a0, s0[1] = a1, s0[2] = a2, s0[3] = a3;
}

/* Scores of rows [r0, r1) against the chunk's n4 keys, prefetching the
 * next chunk's K rows (nk: nn4 of them) as it goes. */
KV_ALWAYS_INLINE void qk_portable(const float *qs, uint32_t dp, uint32_t r0, uint32_t r1,
				  const float *const *kp, uint32_t n4, uint32_t d, float *s,
				  uint32_t ch, const char *const *nk, uint32_t nn4, size_t row_bytes,
				  const int fma)
{
	for (uint32_t t = 0; t < n4; t += 4) {
		uint32_t r = r0;

		if (t < nn4)
			prefetch4(nk + t, row_bytes);
		for (; r + 2 <= r1; r += 2)
			dot2x4(qs + (size_t)r * dp, qs + (size_t)(r + 1) * dp, kp + t, d,
			       s + (size_t)r * ch + t, s + (size_t)(r + 1) * ch + t, fma);
		if (r < r1)
			dot1x4(qs + (size_t)r * dp, kp + t, d, s + (size_t)r * ch + t, fma);
	}
}

#if KV_KERN_X86
/* Lines of the next chunk's K or V rows still to prefetch, `per` at each
 * step. The steps sit in the inner loops, one or two lines at a time:
 * a burst of prefetches would fill the miss buffers and then the load
 * queue, stalling the arithmetic behind it, which is how memory and
 * compute end up taking turns instead of overlapping.
 *
 * The rows are cut into page-sized segments (a block's run of rows is a
 * page or a few) and the cursor asks for line k of every segment before
 * line k + 1 of any. The L2 streamer, which fetches far more lines in
 * flight than software prefetches can, works within a page and starts
 * on a page only after a few misses there; asking page after page
 * starts it on each page late, and that is most of what a paged layout,
 * whose runs end every block, loses against a contiguous one. */
struct pf_cursor {
	const char *const *rows;
	uint32_t end;               /* rows [0, end) */
	uint32_t per;               /* lines per step */
	uint32_t left;              /* lines still to ask for */
	uint32_t seg_rows, nseg;    /* rows of a segment, segments */
	uint32_t seg, row;          /* the next line: its segment, its row in it */
	size_t off, row_bytes;      /* ... and its offset in the row */
};

static inline void pf_init(struct pf_cursor *pf, const char *const *rows, uint32_t n,
			   size_t row_bytes, size_t steps)
{
	size_t lines = (size_t)n * ((row_bytes + 63) / 64);

	pf->rows = rows;
	pf->end = n;
	pf->per = (uint32_t)(steps ? (lines + steps - 1) / steps : lines);
	pf->left = (uint32_t)lines;
	pf->seg_rows = row_bytes >= 4096 ? 1u : (uint32_t)(4096 / row_bytes);
	pf->nseg = (n + pf->seg_rows - 1) / pf->seg_rows;
	pf->seg = 0;
	pf->row = 0;
	pf->off = 0;
	pf->row_bytes = row_bytes;
}

static inline void pf_step(struct pf_cursor *pf)
{
	for (uint32_t k = 0; k < pf->per && pf->left;) {
		uint32_t row = pf->seg * pf->seg_rows + pf->row;

		/* The last segment may be short: its missing rows are skipped. */
		if (row < pf->end) {
			__builtin_prefetch(pf->rows[row] + pf->off, 0, PF_LOC);
			pf->left--;
			k++;
		}
		if (++pf->seg == pf->nseg) {
			pf->seg = 0;
			pf->off += 64;
			if (pf->off >= pf->row_bytes) {
				pf->off = 0;
				pf->row++;
			}
		}
	}
}

/* Whatever the steps left over. */
static inline void pf_finish(struct pf_cursor *pf)
{
	pf->per = UINT32_MAX;
	pf_step(pf);
}

/* acc[k][i, i + 8 nw) += sum_t s[k][t] v_t[i, i + 8 nw) for nr rows over
 * all n4 keys of the chunk, the accumulators held in registers across the
 * keys (nr * nw = 8 of them cover the FMA latency); a prefetch step per
 * key. masked: nw is 1 and the V rows end inside these 8 floats; acc rows
 * are padded to 16 floats so their 8 can be loaded and stored whole. */
KV_TARGET_AVX2 static inline __attribute__((always_inline)) void
pv_tile_avx2(float *acc, uint32_t dp, const float *s, uint32_t ch, const float *const *vp,
	     uint32_t n4, uint32_t i, const int nr, const int nw, const int masked, __m256i tail,
	     struct pf_cursor *pf)
{
	__m256 a[4][8];

	KV_UNROLL
	for (int k = 0; k < nr; k++) {
		KV_UNROLL
		for (int j = 0; j < nw; j++)
			a[k][j] = _mm256_loadu_ps(acc + (size_t)k * dp + i + 8 * j);
	}
	for (uint32_t t = 0; t < n4; t++) {
		const float *v = vp[t] + i;
		__m256 x[8];

		pf_step(pf);
		KV_UNROLL
		for (int j = 0; j < nw; j++)
			x[j] = masked ? _mm256_maskload_ps(v, tail) : _mm256_loadu_ps(v + 8 * j);
		KV_UNROLL
		for (int k = 0; k < nr; k++) {
			__m256 p = _mm256_broadcast_ss(s + (size_t)k * ch + t);

			KV_UNROLL
			for (int j = 0; j < nw; j++)
				a[k][j] = _mm256_fmadd_ps(p, x[j], a[k][j]);
		}
	}
	KV_UNROLL
	for (int k = 0; k < nr; k++) {
		KV_UNROLL
		for (int j = 0; j < nw; j++)
			_mm256_storeu_ps(acc + (size_t)k * dp + i + 8 * j, a[k][j]);
	}
}

/* nr rows over all of d: tiles of nw vectors, then narrower ones for the
 * rest, the last 1-7 floats masked. */
KV_TARGET_AVX2 static inline __attribute__((always_inline)) void
pv_rows_avx2(float *acc, uint32_t dp, const float *s, uint32_t ch, const float *const *vp,
	     uint32_t n4, uint32_t d, const int nr, const int nw, struct pf_cursor *pf)
{
	const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
	uint32_t i = 0;

	for (; i + 8 * nw <= d; i += 8 * nw)
		pv_tile_avx2(acc, dp, s, ch, vp, n4, i, nr, nw, 0, lanes, pf);
	if (nw >= 8 && i + 32 <= d) {
		pv_tile_avx2(acc, dp, s, ch, vp, n4, i, nr, 4, 0, lanes, pf);
		i += 32;
	}
	if (nw >= 4 && i + 16 <= d) {
		pv_tile_avx2(acc, dp, s, ch, vp, n4, i, nr, 2, 0, lanes, pf);
		i += 16;
	}
	if (nw >= 2 && i + 8 <= d) {
		pv_tile_avx2(acc, dp, s, ch, vp, n4, i, nr, 1, 0, lanes, pf);
		i += 8;
	}
	if (i < d)
		pv_tile_avx2(acc, dp, s, ch, vp, n4, i, nr, 1, 1,
			     _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(d - i)), lanes), pf);
}

/* acc rows [r0, r1) += weights s times the chunk's V rows: four rows at a
 * time (two vectors wide), then two (four wide), then one (eight wide),
 * prefetching the next chunk's V rows (nv: nn4 of them) on the way. */
KV_TARGET_AVX2 static void pv_avx2(float *acc, uint32_t dp, uint32_t r0, uint32_t r1,
				   const float *s, uint32_t ch, const float *const *vp, uint32_t n4,
				   uint32_t d, const char *const *nv, uint32_t nn4, size_t row_bytes)
{
	/* Keys visited: a tile per 16 floats of d (about) per 4 rows. */
	size_t steps = (size_t)((r1 - r0 + 3) / 4) * ((d + 15) / 16) * n4;
	struct pf_cursor pf;
	uint32_t r = r0;

	pf_init(&pf, nv, nn4, row_bytes, steps);
	for (; r + 4 <= r1; r += 4)
		pv_rows_avx2(acc + (size_t)r * dp, dp, s + (size_t)r * ch, ch, vp, n4, d, 4, 2, &pf);
	if (r + 2 <= r1) {
		pv_rows_avx2(acc + (size_t)r * dp, dp, s + (size_t)r * ch, ch, vp, n4, d, 2, 4, &pf);
		r += 2;
	}
	if (r < r1)
		pv_rows_avx2(acc + (size_t)r * dp, dp, s + (size_t)r * ch, ch, vp, n4, d, 1, 8, &pf);
	pf_finish(&pf);
}

/* The four sums of a0..a3 as one vector: two rounds of pairwise adds
 * across the accumulators, then the two 128-bit halves. The compilers'
 * own reductions of omp simd sums go through memory lane by lane, which
 * costs as much as the dot products at head_dim 128. */
KV_TARGET_AVX2 static inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3)
{
	__m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));

	return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* Scores of rows q0 (and q1 when two) against keys k[0..3]; pf, when
 * given, takes a prefetch step per 8 floats. A masked load takes the
 * d % 8 tail. */
KV_TARGET_AVX2 static inline __attribute__((always_inline)) void
dot_avx2(const float *q0, const float *q1, const float *const *k, uint32_t d, __m256i tail,
	 float *s0, float *s1, const int two, struct pf_cursor *pf)
{
	const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
	const uint32_t d8 = d & ~7u;
	__m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
	__m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
	uint32_t i = 0;

	for (; i < d8; i += 8) {
		__m256 x0 = _mm256_loadu_ps(k0 + i), x1 = _mm256_loadu_ps(k1 + i);
		__m256 x2 = _mm256_loadu_ps(k2 + i), x3 = _mm256_loadu_ps(k3 + i);
		__m256 u = _mm256_loadu_ps(q0 + i);

		if (pf)
			pf_step(pf);
		a0 = _mm256_fmadd_ps(u, x0, a0);
		a1 = _mm256_fmadd_ps(u, x1, a1);
		a2 = _mm256_fmadd_ps(u, x2, a2);
		a3 = _mm256_fmadd_ps(u, x3, a3);
		if (two) {
			__m256 v = _mm256_loadu_ps(q1 + i);

			b0 = _mm256_fmadd_ps(v, x0, b0);
			b1 = _mm256_fmadd_ps(v, x1, b1);
			b2 = _mm256_fmadd_ps(v, x2, b2);
			b3 = _mm256_fmadd_ps(v, x3, b3);
		}
	}
	if (i < d) {
		__m256 x0 = _mm256_maskload_ps(k0 + i, tail), x1 = _mm256_maskload_ps(k1 + i, tail);
		__m256 x2 = _mm256_maskload_ps(k2 + i, tail), x3 = _mm256_maskload_ps(k3 + i, tail);
		__m256 u = _mm256_maskload_ps(q0 + i, tail);

		if (pf)
			pf_step(pf);
		a0 = _mm256_fmadd_ps(u, x0, a0);
		a1 = _mm256_fmadd_ps(u, x1, a1);
		a2 = _mm256_fmadd_ps(u, x2, a2);
		a3 = _mm256_fmadd_ps(u, x3, a3);
		if (two) {
			__m256 v = _mm256_maskload_ps(q1 + i, tail);

			b0 = _mm256_fmadd_ps(v, x0, b0);
			b1 = _mm256_fmadd_ps(v, x1, b1);
			b2 = _mm256_fmadd_ps(v, x2, b2);
			b3 = _mm256_fmadd_ps(v, x3, b3);
		}
	}
	_mm_storeu_ps(s0, hsum4(a0, a1, a2, a3));
	if (two)
		_mm_storeu_ps(s1, hsum4(b0, b1, b2, b3));
}

/* qk_portable with intrinsics; the first row pair of each four keys
 * carries the prefetch steps for the next chunk's K rows. */
KV_TARGET_AVX2 static void qk_avx2(const float *qs, uint32_t dp, uint32_t r0, uint32_t r1,
				   const float *const *kp, uint32_t n4, uint32_t d, float *s,
				   uint32_t ch, const char *const *nk, uint32_t nn4, size_t row_bytes)
{
	const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(d & 7u)),
						_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
	struct pf_cursor pf;

	pf_init(&pf, nk, nn4, row_bytes, (size_t)(n4 / 4) * ((d + 7) / 8));
	for (uint32_t t = 0; t < n4; t += 4) {
		uint32_t r = r0;

		if (r + 2 <= r1) {
			dot_avx2(qs + (size_t)r * dp, qs + (size_t)(r + 1) * dp, kp + t, d, tail,
				 s + (size_t)r * ch + t, s + (size_t)(r + 1) * ch + t, 1, &pf);
			r += 2;
		} else {
			dot_avx2(qs + (size_t)r * dp, NULL, kp + t, d, tail, s + (size_t)r * ch + t,
				 NULL, 0, &pf);
			r++;
		}
		for (; r + 2 <= r1; r += 2)
			dot_avx2(qs + (size_t)r * dp, qs + (size_t)(r + 1) * dp, kp + t, d, tail,
				 s + (size_t)r * ch + t, s + (size_t)(r + 1) * ch + t, 1, NULL);
		if (r < r1)
			dot_avx2(qs + (size_t)r * dp, NULL, kp + t, d, tail, s + (size_t)r * ch + t,
				 NULL, 0, NULL);
	}
	pf_finish(&pf);
}

/* ---- AVX-512 ------------------------------------------------------------ */
/* The same loops sixteen floats wide: half the loads, broadcasts and FMAs
 * of the AVX2 ones per key, which leaves the core more time in which the
 * next chunk's misses are in flight. Tails are masked loads. */

/* The low 8 floats plus the high 8 of a. */
KV_TARGET_AVX512 static inline __m256 fold512(__m512 a)
{
	return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}

/* As dot_avx2, sixteen floats a step, the d % 16 tail under mask. */
KV_TARGET_AVX512 static inline __attribute__((always_inline)) void
dot_avx512(const float *q0, const float *q1, const float *const *k, uint32_t d,
	   __mmask16 tail, float *s0, float *s1, const int two, struct pf_cursor *pf)
{
	const float *k0 = k[0], *k1 = k[1], *k2 = k[2], *k3 = k[3];
	const uint32_t d16 = d & ~15u;
	__m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
	__m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
	uint32_t i = 0;

	for (; i < d16; i += 16) {
		__m512 x0 = _mm512_loadu_ps(k0 + i), x1 = _mm512_loadu_ps(k1 + i);
		__m512 x2 = _mm512_loadu_ps(k2 + i), x3 = _mm512_loadu_ps(k3 + i);
		__m512 u = _mm512_loadu_ps(q0 + i);

		if (pf)
			pf_step(pf);
		a0 = _mm512_fmadd_ps(u, x0, a0);
		a1 = _mm512_fmadd_ps(u, x1, a1);
		a2 = _mm512_fmadd_ps(u, x2, a2);
		a3 = _mm512_fmadd_ps(u, x3, a3);
		if (two) {
			__m512 v = _mm512_loadu_ps(q1 + i);

			b0 = _mm512_fmadd_ps(v, x0, b0);
			b1 = _mm512_fmadd_ps(v, x1, b1);
			b2 = _mm512_fmadd_ps(v, x2, b2);
			b3 = _mm512_fmadd_ps(v, x3, b3);
		}
	}
	if (i < d) {
		__m512 x0 = _mm512_maskz_loadu_ps(tail, k0 + i), x1 = _mm512_maskz_loadu_ps(tail, k1 + i);
		__m512 x2 = _mm512_maskz_loadu_ps(tail, k2 + i), x3 = _mm512_maskz_loadu_ps(tail, k3 + i);
		__m512 u = _mm512_maskz_loadu_ps(tail, q0 + i);

		if (pf)
			pf_step(pf);
		a0 = _mm512_fmadd_ps(u, x0, a0);
		a1 = _mm512_fmadd_ps(u, x1, a1);
		a2 = _mm512_fmadd_ps(u, x2, a2);
		a3 = _mm512_fmadd_ps(u, x3, a3);
		if (two) {
			__m512 v = _mm512_maskz_loadu_ps(tail, q1 + i);

			b0 = _mm512_fmadd_ps(v, x0, b0);
			b1 = _mm512_fmadd_ps(v, x1, b1);
			b2 = _mm512_fmadd_ps(v, x2, b2);
			b3 = _mm512_fmadd_ps(v, x3, b3);
		}
	}
	_mm_storeu_ps(s0, hsum4(fold512(a0), fold512(a1), fold512(a2), fold512(a3)));
	if (two)
		_mm_storeu_ps(s1, hsum4(fold512(b0), fold512(b1), fold512(b2), fold512(b3)));
}

/* qk_avx2 sixteen floats wide. */
KV_TARGET_AVX512 static void qk_avx512(const float *qs, uint32_t dp, uint32_t r0, uint32_t r1,
				       const float *const *kp, uint32_t n4, uint32_t d, float *s,
				       uint32_t ch, const char *const *nk, uint32_t nn4,
				       size_t row_bytes)
{
	const __mmask16 tail = (__mmask16)((1u << (d & 15u)) - 1u);
	struct pf_cursor pf;

	pf_init(&pf, nk, nn4, row_bytes, (size_t)(n4 / 4) * ((d + 15) / 16));
	for (uint32_t t = 0; t < n4; t += 4) {
		uint32_t r = r0;

		if (r + 2 <= r1) {
			dot_avx512(qs + (size_t)r * dp, qs + (size_t)(r + 1) * dp, kp + t, d, tail,
				   s + (size_t)r * ch + t, s + (size_t)(r + 1) * ch + t, 1, &pf);
			r += 2;
		} else {
			dot_avx512(qs + (size_t)r * dp, NULL, kp + t, d, tail, s + (size_t)r * ch + t,
				   NULL, 0, &pf);
			r++;
		}
		for (; r + 2 <= r1; r += 2)
			dot_avx512(qs + (size_t)r * dp, qs + (size_t)(r + 1) * dp, kp + t, d, tail,
				   s + (size_t)r * ch + t, s + (size_t)(r + 1) * ch + t, 1, NULL);
		if (r < r1)
			dot_avx512(qs + (size_t)r * dp, NULL, kp + t, d, tail, s + (size_t)r * ch + t,
				   NULL, 0, NULL);
	}
	pf_finish(&pf);
}

/* As pv_tile_avx2 with 16-float vectors: nr rows x nw vectors of
 * accumulators (16 of them) over all n4 keys; masked: nw is 1 and the V
 * rows end inside these 16 floats (acc rows are padded to 16). */
KV_TARGET_AVX512 static inline __attribute__((always_inline)) void
pv_tile_avx512(float *acc, uint32_t dp, const float *s, uint32_t ch, const float *const *vp,
	       uint32_t n4, uint32_t i, const int nr, const int nw, const int masked,
	       __mmask16 tail, struct pf_cursor *pf)
{
	__m512 a[4][8];

	KV_UNROLL
	for (int k = 0; k < nr; k++) {
		KV_UNROLL
		for (int j = 0; j < nw; j++)
			a[k][j] = _mm512_loadu_ps(acc + (size_t)k * dp + i + 16 * j);
	}
	for (uint32_t t = 0; t < n4; t++) {
		const float *v = vp[t] + i;
		__m512 x[8];

		pf_step(pf);
		KV_UNROLL
		for (int j = 0; j < nw; j++)
			x[j] = masked ? _mm512_maskz_loadu_ps(tail, v) : _mm512_loadu_ps(v + 16 * j);
		KV_UNROLL
		for (int k = 0; k < nr; k++) {
			__m512 p = _mm512_set1_ps(s[(size_t)k * ch + t]);

			KV_UNROLL
			for (int j = 0; j < nw; j++)
				a[k][j] = _mm512_fmadd_ps(p, x[j], a[k][j]);
		}
	}
	KV_UNROLL
	for (int k = 0; k < nr; k++) {
		KV_UNROLL
		for (int j = 0; j < nw; j++)
			_mm512_storeu_ps(acc + (size_t)k * dp + i + 16 * j, a[k][j]);
	}
}

/* nr rows over all of d: tiles of nw vectors, then narrower ones, the
 * last 1-15 floats masked. */
KV_TARGET_AVX512 static inline __attribute__((always_inline)) void
pv_rows_avx512(float *acc, uint32_t dp, const float *s, uint32_t ch, const float *const *vp,
	       uint32_t n4, uint32_t d, const int nr, const int nw, struct pf_cursor *pf)
{
	uint32_t i = 0;

	for (; i + 16 * nw <= d; i += 16 * nw)
		pv_tile_avx512(acc, dp, s, ch, vp, n4, i, nr, nw, 0, 0, pf);
	if (nw >= 8 && i + 64 <= d) {
		pv_tile_avx512(acc, dp, s, ch, vp, n4, i, nr, 4, 0, 0, pf);
		i += 64;
	}
	if (nw >= 4 && i + 32 <= d) {
		pv_tile_avx512(acc, dp, s, ch, vp, n4, i, nr, 2, 0, 0, pf);
		i += 32;
	}
	if (nw >= 2 && i + 16 <= d) {
		pv_tile_avx512(acc, dp, s, ch, vp, n4, i, nr, 1, 0, 0, pf);
		i += 16;
	}
	if (i < d)
		pv_tile_avx512(acc, dp, s, ch, vp, n4, i, nr, 1, 1,
			       (__mmask16)((1u << (d - i)) - 1u), pf);
}

/* pv_avx2 sixteen floats wide: four rows at a time (four vectors wide),
 * then two (eight wide), then one (eight wide): 16 or 8 accumulators. */
KV_TARGET_AVX512 static void pv_avx512(float *acc, uint32_t dp, uint32_t r0, uint32_t r1,
				       const float *s, uint32_t ch, const float *const *vp,
				       uint32_t n4, uint32_t d, const char *const *nv, uint32_t nn4,
				       size_t row_bytes)
{
	/* Keys visited: a tile per 64 floats of d (about) per 4 rows. */
	size_t steps = (size_t)((r1 - r0 + 3) / 4) * ((d + 63) / 64) * n4;
	struct pf_cursor pf;
	uint32_t r = r0;

	pf_init(&pf, nv, nn4, row_bytes, steps);
	for (; r + 4 <= r1; r += 4)
		pv_rows_avx512(acc + (size_t)r * dp, dp, s + (size_t)r * ch, ch, vp, n4, d, 4, 4, &pf);
	if (r + 2 <= r1) {
		pv_rows_avx512(acc + (size_t)r * dp, dp, s + (size_t)r * ch, ch, vp, n4, d, 2, 8, &pf);
		r += 2;
	}
	if (r < r1)
		pv_rows_avx512(acc + (size_t)r * dp, dp, s + (size_t)r * ch, ch, vp, n4, d, 1, 8, &pf);
	pf_finish(&pf);
}
#endif

/* acc0 += sum_t p0[t] v_t and acc1 likewise over four keys: one load and
 * store of each accumulator per four rows of V. */
KV_ALWAYS_INLINE void pv2x4(float *acc0, float *acc1, const float *p0, const float *p1,
			    const float *const *v, uint32_t d, const int fma)
{
	const float *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
	const float c0 = p0[0], c1 = p0[1], c2 = p0[2], c3 = p0[3];
	const float e0 = p1[0], e1 = p1[1], e2 = p1[2], e3 = p1[3];

	KV_SIMD
	for (uint32_t i = 0; i < d; i++) {
		float x0 = v0[i], x1 = v1[i], x2 = v2[i], x3 = v3[i];

		acc0[i] = MADD(fma, c3, x3, MADD(fma, c2, x2, MADD(fma, c1, x1, MADD(fma, c0, x0, acc0[i]))));
		acc1[i] = MADD(fma, e3, x3, MADD(fma, e2, x2, MADD(fma, e1, x1, MADD(fma, e0, x0, acc1[i]))));
	}
}

KV_ALWAYS_INLINE void pv1x4(float *acc0, const float *p0, const float *const *v, uint32_t d,
			    const int fma)
{
	const float *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
	const float c0 = p0[0], c1 = p0[1], c2 = p0[2], c3 = p0[3];

	KV_SIMD
	for (uint32_t i = 0; i < d; i++)
		acc0[i] = MADD(fma, c3, v3[i], MADD(fma, c2, v2[i],
				MADD(fma, c1, v1[i], MADD(fma, c0, v0[i], acc0[i]))));
}

/* Fold a row's scores s[0, n4) into its running (m, l, acc) and leave the
 * weights exp(s - m_new) in s. The row sees at least one key of the
 * chunk, so m_new is finite. */
KV_ALWAYS_INLINE void softmax_row(float *s, uint32_t n4, float *m, float *l, float *acc,
				  uint32_t d, const int fma)
{
	float mx, mn, corr, sum = 0.0f;
	int32_t best = INT32_MIN;

	/* The max on the bit patterns, with the negatives' magnitude bits
	 * flipped so that integer order is float order: clang will not
	 * vectorise a float max reduction without -ffinite-math-only. */
	KV_SIMD_MAX(best)
	for (uint32_t t = 0; t < n4; t++) {
		int32_t b;

		memcpy(&b, &s[t], sizeof(b));
		b ^= (b >> 31) & 0x7fffffff;
		best = b > best ? b : best;
	}
	best ^= (best >> 31) & 0x7fffffff;
	memcpy(&mx, &best, sizeof(mx));
	mn = mx > *m ? mx : *m;
	corr = kexp(*m - mn, fma);
	KV_SIMD_SUM(sum)
	for (uint32_t t = 0; t < n4; t++) {
		float e = kexp(s[t] - mn, fma);

		s[t] = e;
		sum += e;
	}
	*l = MADD(fma, *l, corr, sum);
	*m = mn;
	if (corr != 1.0f) {
		KV_SIMD
		for (uint32_t i = 0; i < d; i++)
			acc[i] *= corr;
	}
}

/* One work item: the rows (query j0.., q head g0..) of kv head it->head
 * over keys [k0, k1). */
KV_ALWAYS_INLINE void item_body(const struct call *c, const struct item *it, char *mem,
				const int isa)
{
	const int fma = isa != KV_KERN_GENERIC;
	const struct kv_attn_job *job = c->job;
	const struct kv_attn_seq *sq = &job->seqs[it->seq];
	const uint32_t d = c->g.d, dp = c->g.dp, ch = c->g.chunk, gn = it->gn;
	const uint32_t nrow = (it->j1 - it->j0) * gn;
	const uint32_t p0 = sq->n_tokens - sq->n_queries; /* position of query 0 */
	const uint32_t win = job->window;
	const float scale = job->scale;
	const size_t row_bytes = (size_t)d * c->g.es;
	struct wsp w;

	wsp_carve(&c->g, mem, &w);
	for (uint32_t r = 0; r < nrow; r++) {
		uint32_t j = it->j0 + r / gn, qh = it->head * c->g.group + it->g0 + r % gn;
		const float *q = sq->q + ((size_t)j * job->n_q_heads + qh) * d;
		float *qs = w.qs + (size_t)r * dp, *acc = w.acc + (size_t)r * dp;

		KV_SIMD
		for (uint32_t i = 0; i < d; i++)
			qs[i] = q[i] * scale;
		for (uint32_t i = d; i < dp; i++)
			qs[i] = 0.0f;
		for (uint32_t i = 0; i < dp; i++)
			acc[i] = 0.0f;
		w.m[r] = -INFINITY;
		w.l[r] = 0.0f;
	}

	/* Cache rows of the chunk being computed (rk[cur]) and of the next
	 * one, which its loops prefetch; the first chunk is asked for here. */
	uint32_t a = it->k0, b = min_u32(it->k1, (a / ch + 1) * ch), cur = 0;

	chunk_rows(c, sq, it->head, a, b, w.rk[0], w.rv[0]);
	for (uint32_t t = 0; t < b - a; t += 4) {
		prefetch4(w.rk[0] + t, row_bytes);
		prefetch4(w.rv[0] + t, row_bytes);
	}
	while (a < it->k1) {
		const uint32_t n = b - a, n4 = (n + 3) & ~3u;
		const uint32_t nb = min_u32(it->k1, b + ch), nn4 = (nb - b + 3) & ~3u;
		const char *const *nk = w.rk[cur ^ 1], *const *nv = w.rv[cur ^ 1];
		uint32_t jf, je, r0, r1;

		if (b < it->k1)
			chunk_rows(c, sq, it->head, b, nb, w.rk[cur ^ 1], w.rv[cur ^ 1]);
		/* The queries that see part of [a, b): p >= a, lo(p) < b. */
		jf = a > p0 ? a - p0 : 0;
		jf = jf > it->j0 ? jf : it->j0;
		je = it->j1;
		if (win) {
			uint64_t lim = (uint64_t)b + win - 1; /* p < b + win - 1 */

			je = lim <= p0 ? 0 : (uint32_t)(lim - p0 < je ? lim - p0 : je);
		}
		if (jf >= je)
			goto next;
		r0 = (jf - it->j0) * gn;
		r1 = (je - it->j0) * gn;
		chunk_load(c, sq, it->head, a, n, n4, w.rk[cur], w.rv[cur], &w);

#if KV_KERN_X86
		if (isa == KV_KERN_AVX512)
			qk_avx512(w.qs, dp, r0, r1, w.kp, n4, d, w.s, ch, nk, nn4, row_bytes);
		else if (isa != KV_KERN_GENERIC)
			qk_avx2(w.qs, dp, r0, r1, w.kp, n4, d, w.s, ch, nk, nn4, row_bytes);
		else
#endif
			qk_portable(w.qs, dp, r0, r1, w.kp, n4, d, w.s, ch, nk, nn4, row_bytes, fma);
		for (uint32_t j = jf; j < je; j++) {
			uint32_t p = p0 + j, lo = key_lo(p, win), hi = min_u32(p + 1, b);

			lo = lo > a ? lo - a : 0;
			hi -= a;
			for (uint32_t g = 0; g < gn; g++) {
				uint32_t r = (j - it->j0) * gn + g;
				float *s = w.s + (size_t)r * ch;

				for (uint32_t t = 0; t < lo; t++)
					s[t] = -INFINITY;
				for (uint32_t t = hi; t < n4; t++)
					s[t] = -INFINITY;
				softmax_row(s, n4, &w.m[r], &w.l[r], w.acc + (size_t)r * dp, d, fma);
			}
		}
#if KV_KERN_X86
		if (isa == KV_KERN_AVX512)
			pv_avx512(w.acc, dp, r0, r1, w.s, ch, w.vp, n4, d, nv, nn4, row_bytes);
		else if (isa != KV_KERN_GENERIC)
			pv_avx2(w.acc, dp, r0, r1, w.s, ch, w.vp, n4, d, nv, nn4, row_bytes);
		else
#endif
			for (uint32_t r = r0; r < r1; r += 2) {
				const float *s0 = w.s + (size_t)r * ch, *s1 = s0 + ch;
				float *a0 = w.acc + (size_t)r * dp, *a1 = a0 + dp;

				for (uint32_t t = 0; t < n4; t += 4) {
					if (r == r0 && t < nn4)
						prefetch4(nv + t, row_bytes);
					if (r + 1 < r1)
						pv2x4(a0, a1, s0 + t, s1 + t, w.vp + t, d, fma);
					else
						pv1x4(a0, s0 + t, w.vp + t, d, fma);
				}
			}
next:
		a = b;
		b = nb;
		cur ^= 1;
	}

	if (it->part == NO_PART) {
		for (uint32_t r = 0; r < nrow; r++) {
			uint32_t j = it->j0 + r / gn, qh = it->head * c->g.group + it->g0 + r % gn;
			float *o = sq->out + ((size_t)j * job->n_q_heads + qh) * d;
			const float *acc = w.acc + (size_t)r * dp;
			const float lr = w.l[r];

			KV_SIMD
			for (uint32_t i = 0; i < d; i++)
				o[i] = acc[i] / lr;
		}
	} else {
		float *slot = c->partials + (size_t)it->part * c->g.part_floats;
		size_t rows16 = round_up(c->g.rows, 16);

		memcpy(slot, w.acc, (size_t)nrow * dp * sizeof(float));
		memcpy(slot + (size_t)c->g.rows * dp, w.m, nrow * sizeof(float));
		memcpy(slot + (size_t)c->g.rows * dp + rows16, w.l, nrow * sizeof(float));
	}
}

static void item_generic(const struct call *c, const struct item *it, char *mem)
{
	item_body(c, it, mem, KV_KERN_GENERIC);
}

#if KV_KERN_X86
KV_TARGET_AVX2 static void item_avx2(const struct call *c, const struct item *it, char *mem)
{
	item_body(c, it, mem, KV_KERN_AVX2);
}

KV_TARGET_AVX512 static void item_avx512(const struct call *c, const struct item *it, char *mem)
{
	item_body(c, it, mem, KV_KERN_AVX512);
}
#endif

static item_run_fn pick_variant(void)
{
#if KV_KERN_X86
	switch (kv_kern_isa()) {
	case KV_KERN_AVX512: return item_avx512;
	case KV_KERN_AVX2: return item_avx2;
	default: break;
	}
#endif
	return item_generic;
}

static void item_task(void *ctx, uint32_t i, uint32_t worker)
{
	const struct call *c = ctx;

	c->run(c, &c->items[i], c->scratch + (size_t)worker * round_up(c->g.scratch_bytes, 64));
}

/* Combine the parts of a split tile: with M the largest part max, weights
 * exp(m_i - M) rescale each part's sum and accumulator. A part none of
 * whose keys a row sees has m = -inf and weight 0. */
static void merge_parts(const struct call *c, const struct merge *mg)
{
	const struct kv_attn_job *job = c->job;
	const struct item *first = &c->items[mg->item0];
	const struct kv_attn_seq *sq = &job->seqs[first->seq];
	const uint32_t d = c->g.d, dp = c->g.dp, gn = first->gn;
	const uint32_t nrow = (first->j1 - first->j0) * gn;
	const size_t rows16 = round_up(c->g.rows, 16);

	for (uint32_t r = 0; r < nrow; r++) {
		uint32_t j = first->j0 + r / gn, qh = first->head * c->g.group + first->g0 + r % gn;
		float *o = sq->out + ((size_t)j * job->n_q_heads + qh) * d;
		float mmax = -INFINITY, lsum = 0.0f;

		for (uint32_t pi = 0; pi < mg->parts; pi++) {
			const float *slot = c->partials + (size_t)first[pi].part * c->g.part_floats;
			float mi = slot[(size_t)c->g.rows * dp + r];

			mmax = mi > mmax ? mi : mmax;
		}
		for (uint32_t i = 0; i < d; i++)
			o[i] = 0.0f;
		for (uint32_t pi = 0; pi < mg->parts; pi++) {
			const float *slot = c->partials + (size_t)first[pi].part * c->g.part_floats;
			float mi = slot[(size_t)c->g.rows * dp + r];
			float li = slot[(size_t)c->g.rows * dp + rows16 + r];
			const float *acc = slot + (size_t)r * dp;
			float wgt;

			if (mi == -INFINITY)
				continue;
			wgt = expf(mi - mmax);
			lsum += li * wgt;
			for (uint32_t i = 0; i < d; i++)
				o[i] += acc[i] * wgt;
		}
		for (uint32_t i = 0; i < d; i++)
			o[i] /= lsum;
	}
}

int kv_attn_run(struct kv_tpool *pool, const struct kv_attn_job *job)
{
	struct geom g;
	struct counts cn;
	struct layout_sizes z;
	struct item *items;
	struct merge *merges;
	struct call c;
	char *mem;

	geom_init(&g, job);
	plan_count(job, &g, kv_tpool_threads(pool), &cn);
	if (cn.items == 0)
		return 0;
	sizes_of(&g, &cn, &z);
	mem = aligned_alloc(64, z.total);
	if (!mem)
		return kv_fail(ENOMEM, "attention: %zu bytes of scratch for %u items",
			       z.total, cn.items);
	items = (struct item *)(void *)mem;
	merges = (struct merge *)(void *)(mem + z.items);
	plan_walk(job, &g, &cn, items, merges);

	c.job = job;
	c.g = g;
	c.items = items;
	c.partials = (float *)(void *)(mem + z.items + z.merges);
	c.scratch = mem + z.items + z.merges + z.partials;
	c.run = pick_variant();
	if (cn.workers > 1)
		kv_tpool_run(pool, cn.items, item_task, &c);
	else
		for (uint32_t i = 0; i < cn.items; i++)
			item_task(&c, i, 0);
	for (uint32_t i = 0; i < cn.merges; i++)
		merge_parts(&c, &merges[i]);
	free(mem);
	return 0;
}
