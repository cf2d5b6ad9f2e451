// SPDX-License-Identifier: MIT
/*
 * y (n, out) = x (n, in) W^T for kv-llama: llm_matmul() picks OpenBLAS or
 * the streaming kernel here by n; llm_matmul_with() runs a given one.
 *
 * The streaming kernel is for the few rows of a batched decode step,
 * where the product is bound by reading W: it reads each block of MR W
 * rows once and computes that block's dot products with every x row
 * (NR rows a tile, MR x NR accumulators in registers, horizontal sums at
 * the end), so x stays in L1/L2 and W goes by once. Long rows are cut
 * into tiles of at most KT_MAX floats, so that a block's tile stays in L1
 * while all of x passes it. While the first x tile runs, the next W tile
 * is prefetched: the other x tiles leave the memory bus idle otherwise.
 * Threads take contiguous runs of W rows from a shared ticket
 * (libkv/tpool.c).
 *
 * Determinism: each y element comes from one thread, accumulated lane by
 * lane in k order, the lanes summed by one fixed tree (reduce16(),
 * reduce4x8(), sum8()) whatever the tile's shape, the tiles of k added in
 * order; nothing depends on the thread count or on where a thread's rows
 * begin. The choice of kernel depends on n only.
 */
#include <cblas.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

#include "libkv/kernels.h"
#include "matmul.h"

#if KV_KERN_X86
#include <immintrin.h>
#endif

/* Longest run of k a tile covers (floats): 4 W rows of it are 16 KiB. */
#ifndef KT_MAX
#define KT_MAX 1024u
#endif
/* A pass over W takes at most X_ROWS_MAX rows of x and at most X_BYTES
 * of them, which every block of W rows goes through: they stay in L2. */
#define X_ROWS_MAX 128u
#ifndef X_BYTES
#define X_BYTES (1u << 20)
#endif
/* Products smaller than this (n * out * in) run on the caller alone. */
#define SERIAL_FLOPS (1u << 16)
/* Items per thread: runs of W rows claimed dynamically, so a thread that
 * loses its core to another process does not hold the call up. */
#define ITEMS_PER_THREAD 4u
/* Largest pool; more threads than this are served by this many. */
#define MAX_POOL_THREADS 256u

/* A run of cache lines of a (rows, lpr lines) region of W with rows ld
 * floats apart, from line col of the row at p on. */
struct pf_walk {
	const float *p;
	uint32_t left;              /* lines still to prefetch */
	uint32_t col, lpr;
};

/* One register tile: y (nr, mr) [+]= x (nr, klen) W (mr, klen)^T. */
struct tile {
	const float *w;             /* (mr, ld): the tile's first W row, at k0 */
	const float *x;             /* (nr, ld) */
	float *y;                   /* (nr, ldy): the tile's first x row and W row */
	struct pf_walk pf;          /* W lines to prefetch meanwhile */
	size_t ld, ldy;             /* in, out */
	uint32_t klen;
	float beta;
	bool first;                 /* the first k tile: y = beta y + s, else y += s */
};

typedef void tile_fn(const struct tile *t, uint32_t mr, uint32_t nr);

struct isa {
	tile_fn *tile;
	uint32_t mr, nr;            /* the largest tile */
};

/* The shapes a tile function instantiates. */
#define CASES_4x4(C) C(1, 1) C(1, 2) C(1, 3) C(1, 4) C(2, 1) C(2, 2) C(2, 3) C(2, 4) \
	C(3, 1) C(3, 2) C(3, 3) C(3, 4) C(4, 1) C(4, 2) C(4, 3) C(4, 4)
#define CASES_3x4(C) C(1, 1) C(1, 2) C(1, 3) C(1, 4) C(2, 1) C(2, 2) C(2, 3) C(2, 4) \
	C(3, 1) C(3, 2) C(3, 3) C(3, 4)
#define CASES_ROW(C, M) C(M, 1) C(M, 2) C(M, 3) C(M, 4)
#define CASES_8x4(C) CASES_ROW(C, 1) CASES_ROW(C, 2) CASES_ROW(C, 3) CASES_ROW(C, 4) \
	CASES_ROW(C, 5) CASES_ROW(C, 6) CASES_ROW(C, 7) CASES_ROW(C, 8)
#ifndef AVX512_MR
#define AVX512_MR 6
#define AVX512_NR 4
#endif
#define AVX512_CASES CASES_8x4
#define CASES_4x2(C) C(1, 1) C(1, 2) C(2, 1) C(2, 2) C(3, 1) C(3, 2) C(4, 1) C(4, 2)
#define SHAPE(M, N) ((M) * 8 + (N))

static inline float update(float y, float s, const struct tile *t)
{
	if (!t->first)
		return y + s;
	return t->beta == 0 ? s : t->beta * y + s;
}

/* ---- Portable C: 8 lanes in arrays -------------------------------------- */

/* Prefetch up to n lines of the walk. Prefetches never fault, but the
 * walk stays inside the region anyway. */
static inline void pf_next(struct pf_walk *pw, uint32_t n, size_t ld)
{
	for (; n && pw->left; n--, pw->left--) {
		__builtin_prefetch(pw->p, 0, 3);
		pw->p += 16;
		if (++pw->col == pw->lpr) {
			pw->col = 0;
			pw->p += ld - (size_t)pw->lpr * 16;
		}
	}
}

/* Lines to prefetch per k step of 16 so that the walk ends with the
 * tile's full steps. */
static inline uint32_t pf_per_step(const struct tile *t)
{
	uint32_t steps = t->klen / 16;

	return steps ? (t->pf.left + steps - 1) / steps : 0;
}

/* ((v0 + v4) + (v1 + v5)) + ((v2 + v6) + (v3 + v7)): the pairs of AVX2's
 * reduce4x8(). */
static inline float sum8(const float *v)
{
	float s[4];

	for (int l = 0; l < 4; l++)
		s[l] = v[l] + v[l + 4];
	return (s[0] + s[1]) + (s[2] + s[3]);
}

KV_ALWAYS_INLINE void tile_generic_body(const struct tile *t, const int MR, const int NR)
{
	float acc[4][2][8];
	size_t ld = t->ld;
	uint32_t k = 0;

	memset(acc, 0, sizeof(acc));
	for (; k + 8 <= t->klen; k += 8)
		for (int i = 0; i < MR; i++)
			for (int j = 0; j < NR; j++)
				for (int l = 0; l < 8; l++)
					acc[i][j][l] += t->w[i * ld + k + l] * t->x[j * ld + k + l];
	for (uint32_t l = 0; k + l < t->klen; l++)
		for (int i = 0; i < MR; i++)
			for (int j = 0; j < NR; j++)
				acc[i][j][l] += t->w[i * ld + k + l] * t->x[j * ld + k + l];
	for (int j = 0; j < NR; j++)
		for (int i = 0; i < MR; i++) {
			float *y = t->y + j * t->ldy + i;

			*y = update(*y, sum8(acc[i][j]), t);
		}
}

static void tile_generic(const struct tile *t, uint32_t mr, uint32_t nr)
{
	switch (SHAPE(mr, nr)) {
#define C(M, N) case SHAPE(M, N): tile_generic_body(t, M, N); break;
	CASES_4x2(C)
#undef C
	}
}

static const struct isa isa_generic = { tile_generic, 4, 2 };

#if KV_KERN_X86

/* AVX-512F alone (not libkv's VL/BW/DQ set): the kernel needs no more. */
#define MM_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma")))

/* ---- AVX2 + FMA: 3 W rows x 4 x rows of ymm ----------------------------- */

/* -1 in the first m of 8 ints (loaded from &mask_tab[8 - m]). */
static const int32_t mask_tab[16] = { -1, -1, -1, -1, -1, -1, -1, -1 };

/* The sums of a[0..3], each paired as sum8() pairs: out[i] = sum of a[i]. */
KV_ALWAYS_INLINE KV_TARGET_AVX2 __m128 reduce4x8(const __m256 *a)
{
	__m128 t[4];

	for (int i = 0; i < 4; i++)
		t[i] = _mm_add_ps(_mm256_castps256_ps128(a[i]), _mm256_extractf128_ps(a[i], 1));
	return _mm_hadd_ps(_mm_hadd_ps(t[0], t[1]), _mm_hadd_ps(t[2], t[3]));
}

KV_ALWAYS_INLINE KV_TARGET_AVX2 void tile_avx2_body(const struct tile *t, const int MR,
						   const int NR)
{
	__m256 acc[3][4];
	const float *w = t->w, *x = t->x;
	size_t ld = t->ld;
	uint32_t k = 0, klen = t->klen, pf_n = pf_per_step(t);
	struct pf_walk pf = t->pf;

	for (int i = 0; i < MR; i++)
		for (int j = 0; j < NR; j++)
			acc[i][j] = _mm256_setzero_ps();
	for (; k + 8 <= klen; k += 8) {
		__m256 wv[3];

		if (k % 16 == 0)
			pf_next(&pf, pf_n, ld);
		for (int i = 0; i < MR; i++)
			wv[i] = _mm256_loadu_ps(w + i * ld + k);
		for (int j = 0; j < NR; j++) {
			__m256 xv = _mm256_loadu_ps(x + j * ld + k);

			for (int i = 0; i < MR; i++)
				acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
		}
	}
	if (k < klen) {
		__m256i m = _mm256_loadu_si256((const __m256i *)(mask_tab + 8 - (klen - k)));
		__m256 wv[3];

		for (int i = 0; i < MR; i++)
			wv[i] = _mm256_maskload_ps(w + i * ld + k, m);
		for (int j = 0; j < NR; j++) {
			__m256 xv = _mm256_maskload_ps(x + j * ld + k, m);

			for (int i = 0; i < MR; i++)
				acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
		}
	}

	__m128i ym = _mm_loadu_si128((const __m128i *)(mask_tab + 8 - MR));

	for (int j = 0; j < NR; j++) {
		__m256 a[4] = { _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
				_mm256_setzero_ps() };
		float *yj = t->y + j * t->ldy;
		__m128 s, yv;

		for (int i = 0; i < MR; i++)
			a[i] = acc[i][j];
		s = reduce4x8(a);
		if (t->first && t->beta == 0) {
			_mm_maskstore_ps(yj, ym, s);
			continue;
		}
		yv = _mm_maskload_ps(yj, ym);
		if (t->first)
			yv = _mm_mul_ps(yv, _mm_set1_ps(t->beta));
		_mm_maskstore_ps(yj, ym, _mm_add_ps(yv, s));
	}
}

KV_TARGET_AVX2 static void tile_avx2(const struct tile *t, uint32_t mr, uint32_t nr)
{
	switch (SHAPE(mr, nr)) {
#define C(M, N) case SHAPE(M, N): tile_avx2_body(t, M, N); break;
	CASES_3x4(C)
#undef C
	}
}

static const struct isa isa_avx2 = { tile_avx2, 3, 4 };

/* ---- AVX-512F: 4 W rows x 4 x rows of zmm -------------------------------- */

/* [a.lo256 + a.hi256, b.lo256 + b.hi256]. */
KV_ALWAYS_INLINE MM_TARGET_AVX512 __m512 fold256(__m512 a, __m512 b)
{
	return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
			     _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}

/* Inputs a, b each holding two 8-lane partials (128-bit lanes 0-1, 2-3):
 * each folded to 4, giving [a0, a1, b0, b1] by 128-bit lane. */
KV_ALWAYS_INLINE MM_TARGET_AVX512 __m512 fold128(__m512 a, __m512 b)
{
	return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
			     _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The sums of the 16 accumulators a_ij, every one by the tree
 * s8[l] = v[l] + v[l + 8], s4[l] = s8[l] + s8[l + 4], s2[l] = s4[l] +
 * s4[l + 2], s2[0] + s2[1] (a single vector's halving sum). Element
 * 4 j + i of the result is the sum of a_ij. */
KV_ALWAYS_INLINE MM_TARGET_AVX512 __m512 reduce16(__m512 a00, __m512 a01, __m512 a02,
						  __m512 a03, __m512 a10, __m512 a11,
						  __m512 a12, __m512 a13, __m512 a20,
						  __m512 a21, __m512 a22, __m512 a23,
						  __m512 a30, __m512 a31, __m512 a32,
						  __m512 a33)
{
	/* u[i] lane j: a[i][j]'s four partials. */
	__m512 u[4] = {
		fold128(fold256(a00, a01), fold256(a02, a03)),
		fold128(fold256(a10, a11), fold256(a12, a13)),
		fold128(fold256(a20, a21), fold256(a22, a23)),
		fold128(fold256(a30, a31), fold256(a32, a33)),
	};
	__m512 w0, w1;

	/* w0 lane j: a[0][j]'s two partials, then a[1][j]'s; w1: a[2], a[3]. */
	w0 = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
			   _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
	w1 = _mm512_add_ps(_mm512_shuffle_ps(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
			   _mm512_shuffle_ps(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
	return _mm512_add_ps(_mm512_shuffle_ps(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
			     _mm512_shuffle_ps(w0, w1, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* The accumulators a_ij (W row i < 8, x row j < 4) are named variables,
 * not an array: GCC keeps an array of vectors indexed in unrolled loops
 * on the stack. Those past the tile's shape stay 0 and fold away. */
#define ACC_ROW(F, i) F(i, 0) F(i, 1) F(i, 2) F(i, 3)
#define ACC_EACH(F) ACC_ROW(F, 0) ACC_ROW(F, 1) ACC_ROW(F, 2) ACC_ROW(F, 3) \
	ACC_ROW(F, 4) ACC_ROW(F, 5) ACC_ROW(F, 6) ACC_ROW(F, 7)

/* One k step of 16 at k: a_ij += W row i * x row j lane by lane, the x
 * rows in registers and W a row at a time; the loads masked by m (all
 * ones but for the last, partial step). */
#define STEP512(k, m) do {                                                          \
		const size_t k_ = (k);                                              \
		const __mmask16 m_ = (m);                                           \
		const __m512 x0_ = _mm512_maskz_loadu_ps(m_, x0 + k_);             \
		const __m512 x1_ = NR > 1 ? _mm512_maskz_loadu_ps(m_, x1 + k_) : x0_; \
		const __m512 x2_ = NR > 2 ? _mm512_maskz_loadu_ps(m_, x2 + k_) : x0_; \
		const __m512 x3_ = NR > 3 ? _mm512_maskz_loadu_ps(m_, x3 + k_) : x0_; \
		ROW512_(0) ROW512_(1) ROW512_(2) ROW512_(3)                        \
		ROW512_(4) ROW512_(5) ROW512_(6) ROW512_(7)                        \
	} while (0)
#define ROW512_(i)                                                                  \
	if (MR > i) {                                                               \
		const __m512 w_ = _mm512_maskz_loadu_ps(m_, w##i + k_);            \
		a##i##0 = _mm512_fmadd_ps(w_, x0_, a##i##0);                        \
		if (NR > 1) a##i##1 = _mm512_fmadd_ps(w_, x1_, a##i##1);           \
		if (NR > 2) a##i##2 = _mm512_fmadd_ps(w_, x2_, a##i##2);           \
		if (NR > 3) a##i##3 = _mm512_fmadd_ps(w_, x3_, a##i##3);           \
	}

/* y (NR, 4 columns from c) [+]= the sums s (4 j + i: W row c + i, x row
 * j) for the first m columns. */
KV_ALWAYS_INLINE MM_TARGET_AVX512 void store4(const struct tile *t, const float *s, int c,
					      int m, const int NR)
{
	/* AVX's masked moves: 128-bit masked AVX-512 ones need VL. */
	__m128i ym = _mm_loadu_si128((const __m128i *)(mask_tab + 8 - m));

	for (int j = 0; j < NR; j++) {
		float *yj = t->y + j * t->ldy + c;
		__m128 sv = _mm_loadu_ps(s + 4 * j), yv;

		if (t->first && t->beta == 0) {
			_mm_maskstore_ps(yj, ym, sv);
			continue;
		}
		yv = _mm_maskload_ps(yj, ym);
		if (t->first)
			yv = _mm_mul_ps(yv, _mm_set1_ps(t->beta));
		_mm_maskstore_ps(yj, ym, _mm_add_ps(yv, sv));
	}
}

KV_ALWAYS_INLINE MM_TARGET_AVX512 void tile_avx512_body(const struct tile *t, const int MR,
						       const int NR)
{
	const size_t ld = t->ld, klen = t->klen;
	/* Rows past the shape alias row 0 and are never loaded. */
#define ROWP_(p, i, R) const float *p##i = R > i ? p##0 + i * ld : p##0;
	const float *w0 = t->w, *x0 = t->x;
	ROWP_(w, 1, MR) ROWP_(w, 2, MR) ROWP_(w, 3, MR) ROWP_(w, 4, MR) ROWP_(w, 5, MR)
	ROWP_(w, 6, MR) ROWP_(w, 7, MR) ROWP_(x, 1, NR) ROWP_(x, 2, NR) ROWP_(x, 3, NR)
#undef ROWP_
#define ZERO_(i, j) __m512 a##i##j = _mm512_setzero_ps();
	ACC_EACH(ZERO_)
#undef ZERO_
	size_t k = 0;
	float s[16];

	(void)w1; (void)w2; (void)w3; (void)w4; (void)w5; (void)w6; (void)w7;
	(void)x1; (void)x2; (void)x3;
	if (t->pf.left) {
		struct pf_walk pf = t->pf;
		uint32_t pf_n = pf_per_step(t);

		for (; k + 16 <= klen && pf.left; k += 16) {
			pf_next(&pf, pf_n, ld);
			STEP512(k, 0xffff);
		}
	}
	for (; k + 16 <= klen; k += 16)
		STEP512(k, 0xffff);
	if (k < klen)
		STEP512(k, (__mmask16)((1u << (klen - k)) - 1));

	/* Rows 0-3, then 4-7: s[4 j + i] = the sum for W row i, x row j. */
	_mm512_storeu_ps(s, reduce16(a00, a01, a02, a03, a10, a11, a12, a13,
				     a20, a21, a22, a23, a30, a31, a32, a33));
	store4(t, s, 0, MR < 4 ? MR : 4, NR);
	if (MR > 4) {
		_mm512_storeu_ps(s, reduce16(a40, a41, a42, a43, a50, a51, a52, a53,
					     a60, a61, a62, a63, a70, a71, a72, a73));
		store4(t, s, 4, MR - 4, NR);
	}
}

MM_TARGET_AVX512 static void tile_avx512(const struct tile *t, uint32_t mr, uint32_t nr)
{
	switch (SHAPE(mr, nr)) {
#define C(M, N) case SHAPE(M, N): tile_avx512_body(t, M, N); break;
	AVX512_CASES(C)
#undef C
	}
}

static const struct isa isa_avx512 = { tile_avx512, AVX512_MR, AVX512_NR };

#endif /* KV_KERN_X86 */

/* ---- The streaming driver ------------------------------------------------ */

struct job {
	const struct isa *isa;
	uint32_t n, out, in;
	uint32_t kt;                /* k tile: at most KT_MAX, a multiple of 16 */
	uint32_t item_rows;         /* W rows of one item */
	const float *w, *x;
	float *y;                   /* (n, ldy) */
	uint32_t ldy;
	float beta;
};

static inline uint32_t min_u32(uint32_t a, uint32_t b)
{
	return a < b ? a : b;
}

/* y[:, o0..o1) of the job: block of W rows outer, then k tiles, then x. */
static void stream_rows(const struct job *jb, uint32_t o0, uint32_t o1)
{
	const struct isa *isa = jb->isa;
	size_t in = jb->in;
	uint32_t nb = (jb->n + isa->nr - 1) / isa->nr;   /* x tiles */

	for (uint32_t o = o0; o < o1; o += isa->mr) {
		uint32_t mr = min_u32(isa->mr, o1 - o);

		for (uint32_t k0 = 0; k0 < jb->in; k0 += jb->kt) {
			struct tile t = {
				.w = jb->w + o * in + k0,
				.ld = in,
				.ldy = jb->ldy,
				.klen = min_u32(jb->kt, jb->in - k0),
				.beta = jb->beta,
				.first = k0 == 0,
			};

			/* What this block needs next: its next k tile or the
			 * next block's first, prefetched while this one runs,
			 * each x tile taking its share of the lines, so they
			 * are asked for at an even rate (bursts would run out
			 * of fill buffers). */
			const float *pf = NULL;
			uint32_t pf_rows = 0, lpr = 0, lines;

			if (k0 + jb->kt < jb->in) {
				pf = t.w + jb->kt;
				pf_rows = mr;
				lpr = (min_u32(jb->kt, jb->in - k0 - jb->kt) + 15) / 16;
			} else if (o + mr < o1) {
				pf = jb->w + (o + mr) * in;
				pf_rows = min_u32(isa->mr, o1 - (o + mr));
				lpr = (min_u32(jb->kt, jb->in) + 15) / 16;
			}
			lines = pf_rows * lpr;
			for (uint32_t r = 0, b = 0; r < jb->n; r += isa->nr, b++) {
				uint32_t lo = (uint32_t)((uint64_t)lines * b / nb);
				uint32_t hi = (uint32_t)((uint64_t)lines * (b + 1) / nb);

				t.pf.left = hi - lo;
				if (t.pf.left) {
					t.pf.p = pf + (lo / lpr) * in + (lo % lpr) * 16;
					t.pf.col = lo % lpr;
					t.pf.lpr = lpr;
				}
				t.x = jb->x + r * in + k0;
				t.y = jb->y + (size_t)r * jb->ldy + o;
				isa->tile(&t, mr, min_u32(isa->nr, jb->n - r));
			}
		}
	}
}

static void run_item(void *ctx, uint32_t item, uint32_t worker)
{
	const struct job *jb = ctx;
	uint32_t o0 = item * jb->item_rows;

	(void)worker;
	stream_rows(jb, o0, min_u32(jb->out, o0 + jb->item_rows));
}

/* One pool per thread count, made on first use and kept for the process
 * (as OpenBLAS keeps its threads): a decode step calls this ~100 times,
 * and an idle pool's threads sleep. NULL (run on the caller) if one
 * cannot be made. */
static _Atomic(struct kv_tpool *) pools[MAX_POOL_THREADS + 1];
static pthread_mutex_t pools_mu = PTHREAD_MUTEX_INITIALIZER;

static struct kv_tpool *pool_get(uint32_t threads)
{
	struct kv_tpool *p = atomic_load_explicit(&pools[threads], memory_order_acquire);

	if (p)
		return p;
	pthread_mutex_lock(&pools_mu);
	p = atomic_load_explicit(&pools[threads], memory_order_relaxed);
	if (!p && kv_tpool_create(threads, &p) == 0)
		atomic_store_explicit(&pools[threads], p, memory_order_release);
	pthread_mutex_unlock(&pools_mu);
	return p;
}

static void stream(const struct isa *isa, uint32_t n, uint32_t out, uint32_t in,
		   const float *w, const float *x, float *y, uint32_t ldy, float beta,
		   uint32_t threads)
{
	uint32_t tiles = (in + KT_MAX - 1) / KT_MAX, items = 1, chunk;
	struct job jb = {
		.isa = isa, .out = out, .in = in, .w = w, .ldy = ldy, .beta = beta,
		.item_rows = out,
	};
	struct kv_tpool *pool = NULL;

	jb.kt = tiles == 1 ? in : ((in + tiles - 1) / tiles + 15) / 16 * 16;
	threads = min_u32(threads, MAX_POOL_THREADS);
	if (threads > 1 && (uint64_t)n * out * in >= SERIAL_FLOPS)
		pool = pool_get(threads);
	if (pool) {
		items = threads * ITEMS_PER_THREAD;
		jb.item_rows = (out + items - 1) / items;
		jb.item_rows = (jb.item_rows + isa->mr - 1) / isa->mr * isa->mr;
		items = (out + jb.item_rows - 1) / jb.item_rows;
	}
	/* Many rows (prefill) go a chunk at a time, so that x stays in L2;
	 * W is then read once a chunk, which the compute hides. */
	chunk = min_u32(X_ROWS_MAX, X_BYTES / (in * (uint32_t)sizeof(float)));
	chunk = chunk < 4 ? 4 : chunk / 4 * 4;
	for (uint32_t r0 = 0; r0 < n; r0 += chunk) {
		jb.n = min_u32(chunk, n - r0);
		jb.x = x + (size_t)r0 * in;
		jb.y = y + (size_t)r0 * ldy;
		if (pool)
			kv_tpool_run(pool, items, run_item, &jb);
		else
			stream_rows(&jb, 0, out);
	}
}

/* ---- Choice ------------------------------------------------------------- */

static void blas(uint32_t n, uint32_t out, uint32_t in, const float *w, const float *x,
		 float *y, uint32_t ldy, float beta)
{
	if (n == 1)
		cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)out, (int)in, 1.0f, w, (int)in, x, 1,
			    beta, y, 1);
	else
		cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)out, (int)in, 1.0f,
			    x, (int)in, w, (int)in, beta, y, (int)ldy);
}

bool llm_matmul_supported(enum llm_matmul_kernel k)
{
	switch (k) {
	case LLM_MM_BLAS:
	case LLM_MM_GENERIC:
		return true;
#if KV_KERN_X86
	case LLM_MM_AVX2:
		__builtin_cpu_init();
		return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
	case LLM_MM_AVX512:
		__builtin_cpu_init();
		return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
		       __builtin_cpu_supports("fma");
#endif
	default:
		return false;
	}
}

const char *llm_matmul_kernel_name(enum llm_matmul_kernel k)
{
	static const char *const names[LLM_MM_KERNELS] = { "blas", "generic", "avx2", "avx512" };

	return (unsigned)k < LLM_MM_KERNELS ? names[k] : "?";
}

enum llm_matmul_kernel llm_matmul_best(void)
{
	if (llm_matmul_supported(LLM_MM_AVX512))
		return LLM_MM_AVX512;
	if (llm_matmul_supported(LLM_MM_AVX2))
		return LLM_MM_AVX2;
	return LLM_MM_GENERIC;
}

int llm_matmul_with(enum llm_matmul_kernel k, uint32_t n, uint32_t out, uint32_t in,
		    const float *w, const float *x, float *y, uint32_t ldy, float beta,
		    uint32_t threads)
{
	const struct isa *isa = &isa_generic;

	if (!llm_matmul_supported(k))
		return -ENOTSUP;
	if (ldy < out)
		return -EINVAL;
	if (n == 0 || out == 0)
		return 0;
	if (in == 0) {
		/* BLAS refuses a leading dimension of 0; y = beta y. */
		for (uint32_t r = 0; r < n; r++)
			for (uint32_t o = 0; o < out; o++) {
				float *yo = y + (size_t)r * ldy + o;

				*yo = beta == 0 ? 0 : beta * *yo;
			}
		return 0;
	}
	switch (k) {
	case LLM_MM_BLAS:
		blas(n, out, in, w, x, y, ldy, beta);
		return 0;
#if KV_KERN_X86
	case LLM_MM_AVX2:
		isa = &isa_avx2;
		break;
	case LLM_MM_AVX512:
		isa = &isa_avx512;
		break;
#endif
	default:
		break;
	}
	stream(isa, n, out, in, w, x, y, ldy, beta, threads);
	return 0;
}

void llm_matmul_ld(uint32_t n, uint32_t out, uint32_t in, const float *w, const float *x,
		   float *y, uint32_t ldy, float beta, uint32_t threads)
{
	(void)llm_matmul_with(llm_matmul_best(), n, out, in, w, x, y, ldy, beta, threads);
}

void llm_matmul(uint32_t n, uint32_t out, uint32_t in, const float *w, const float *x,
		float *y, float beta, uint32_t threads)
{
	llm_matmul_ld(n, out, in, w, x, y, out, beta, threads);
}
