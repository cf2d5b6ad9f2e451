/* SPDX-License-Identifier: MIT */
/*
 * Internals of the KV cache layer, not installed: the element kernels
 * (dtype conversion of K/V rows), the paged attention kernel over a
 * described block layout, and the thread pool that runs it. The cache
 * (cache.c, seq.c) builds a kv_attn_job from its block tables; the
 * kernel knows nothing of sequences, reference counts or locks, so tests
 * and benchmarks can drive it on hand-built layouts (a contiguous layout
 * is one block of block_tokens = context).
 */
#ifndef KV_KERNELS_H
#define KV_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include <kv/offload.h> /* enum kv_dtype */

/* ---- Instruction-set variants ----------------------------------------- */
/* The kernels are compiled several times from one portable body (function
 * target attributes) and pick a variant at run time from what the CPU and
 * the OS support. Results of different variants agree to rounding (the
 * conversions bit for bit); one variant is deterministic. */
enum kv_kern_isa {
	KV_KERN_GENERIC = 0,        /* portable C (SSE2 on x86-64) */
	KV_KERN_AVX2 = 1,           /* AVX2 + FMA + F16C */
	KV_KERN_AVX512 = 2,         /* AVX-512 F/VL/BW/DQ + the above */
};

/* The variant in use: the best supported, at most the cap. Any thread. */
enum kv_kern_isa kv_kern_isa(void);
/* For tests and benchmarks: cap the variant for the whole process (a cap
 * above what the machine supports gives the best supported); returns the
 * variant now in use. Not to be called while kernels run. */
enum kv_kern_isa kv_kern_isa_cap(enum kv_kern_isa cap);

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define KV_KERN_X86 1
#define KV_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define KV_TARGET_AVX512 \
	__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")))
#else
#define KV_KERN_X86 0
#endif
#define KV_ALWAYS_INLINE static inline __attribute__((always_inline))

/* Loops to vectorise: `omp simd` (with -fopenmp-simd, no OpenMP runtime)
 * also overrides GCC's -O2 cost model, which will not vectorise a loop
 * whose count is unknown, and allows the reassociation of reductions. */
#if defined(KV_HAVE_OMP_SIMD)
#define KV_PRAGMA(...) _Pragma(#__VA_ARGS__)
#else
#define KV_PRAGMA(...)
#endif
#define KV_SIMD KV_PRAGMA(omp simd)
#define KV_SIMD_SUM(...) KV_PRAGMA(omp simd reduction(+ : __VA_ARGS__))
#define KV_SIMD_MAX(v) KV_PRAGMA(omp simd reduction(max : v))

/* ---- Element conversions ---------------------------------------------- */
/* All take any n (0 included) and any alignment; dst and src don't
 * overlap. f16 is IEEE binary16, bf16 the upper half of an f32; both
 * round to nearest even, keep infinities and NaNs (a NaN stays a NaN),
 * and f16 saturates to +-inf past 65504 and handles subnormals. */
void kv_f32_to_f16(uint16_t *dst, const float *src, size_t n);
void kv_f16_to_f32(float *dst, const uint16_t *src, size_t n);
void kv_f32_to_bf16(uint16_t *dst, const float *src, size_t n);
void kv_bf16_to_f32(float *dst, const uint16_t *src, size_t n);

/* Largest |x| of n floats (0 for n 0; NaNs ignored). */
float kv_absmax(const float *x, size_t n);
/* q[i] = clamp(round_nearest_even(x[i] * inv_scale), -127, 127). */
void kv_quant_i8(int8_t *q, const float *x, size_t n, float inv_scale);
/* x[i] = q[i] * scale. */
void kv_dequant_i8(float *x, const int8_t *q, size_t n, float scale);
/* In place: q[i] = clamp(round_nearest_even(q[i] * ratio), -127, 127),
 * ratio <= 1 (a scale grew by 1 / ratio). */
void kv_requant_i8(int8_t *q, size_t n, float ratio);

/* Store n elements (rows * head_dim floats) into dst as dtype (F32, F16,
 * BF16; I8 needs a scale: use kv_quant_i8, an I8 store writes nothing),
 * and load them back (I8: q * scale; scale unused otherwise). */
void kv_rows_store(enum kv_dtype dt, void *dst, const float *src, size_t n);
void kv_rows_load(enum kv_dtype dt, float *dst, const void *src, size_t n, float scale);

/* ---- Thread pool ------------------------------------------------------ */

struct kv_tpool;

/* threads counts the caller: threads - 1 workers are started (1: none).
 * Errors: -EINVAL (0), -ENOMEM, -EAGAIN (pthread_create). */
int kv_tpool_create(uint32_t threads, struct kv_tpool **out);
void kv_tpool_destroy(struct kv_tpool *p);
uint32_t kv_tpool_threads(const struct kv_tpool *p);

/* Run fn(ctx, item, worker) for every item in [0, n_items) and return
 * when all are done; worker is in [0, kv_tpool_threads()) and unique
 * among the threads running items of this call at the moment (so it may
 * index per-worker scratch). The caller runs items too. If another call
 * is using the pool, this one runs all its items on the caller (worker
 * 0) instead of waiting. Thread safety: any thread. */
void kv_tpool_run(struct kv_tpool *p, uint32_t n_items,
		  void (*fn)(void *ctx, uint32_t item, uint32_t worker), void *ctx);

/* ---- Paged attention kernel ------------------------------------------- */

/* Where a layer's K, V and scales sit inside a block's layer region. */
struct kv_attn_layout {
	enum kv_dtype dtype;        /* F32, F16, BF16, I8 */
	uint32_t block_tokens;      /* T */
	uint32_t n_kv_heads;
	uint32_t head_dim;          /* D */
	size_t head_bytes;          /* between heads' runs: T * D * es */
	size_t v_offset;            /* V's start relative to K's */
	size_t scale_offset;        /* I8: (2, n_kv_heads) floats relative to K's
				     * start: K scales then V scales */
};

/* One sequence of a job. Block b of the sequence (tokens [b*T, b*T+T))
 * has its layer region (K of head 0) at base + blocks[b] * stride +
 * layer_offset; blocks[b] == UINT32_MAX means released (never read: the
 * window excludes it). */
struct kv_attn_seq {
	const char *base;
	size_t stride;
	size_t layer_offset;
	const uint32_t *blocks;     /* (ceil(n_tokens / T)) */
	uint32_t n_tokens;          /* keys [0, n_tokens) are valid */
	uint32_t n_queries;         /* 1..n_tokens: positions n_tokens - n_queries.. */
	const float *q;             /* (n_queries, n_q_heads, D) */
	float *out;                 /* (n_queries, n_q_heads, D) */
};

struct kv_attn_job {
	struct kv_attn_layout lay;
	uint32_t n_q_heads;         /* multiple of lay.n_kv_heads */
	float scale;                /* > 0 */
	uint32_t window;            /* 0: none; else query p sees (p - window, p] */
	uint32_t n_seqs;
	const struct kv_attn_seq *seqs;
};

/* Compute the job, on pool's threads when it is big enough (pool may be
 * NULL: the caller alone). Exact softmax semantics: out = sum_t p_t v_t
 * with p = softmax(scale * q.k_t) over the visible keys, computed with an
 * online (streaming) max and sum in f32. Errors: -ENOMEM (scratch); the
 * job is assumed valid (the cache checks it), K/V rows aligned to their
 * element size. */
int kv_attn_run(struct kv_tpool *pool, const struct kv_attn_job *job);

/* How kv_attn_run() splits a job over `threads` threads (tests check
 * that a path is taken; benchmarks print it). Work items are (sequence,
 * kv head, query tile[, key part]); a part > 1 is split-K. */
struct kv_attn_plan {
	uint32_t items;             /* work items */
	uint32_t max_parts;         /* key-range parts of one tile: 1 = no split */
	uint32_t tile_queries;      /* queries per tile at most */
	uint32_t tile_heads;        /* q heads per item: the GQA group, or part of it */
	uint32_t workers;           /* threads running items: 1 = the caller alone */
	size_t kv_bytes;            /* K/V bytes read (re-reads included) */
	size_t scratch_bytes;       /* the one allocation of the call */
};
void kv_attn_plan(const struct kv_attn_job *job, uint32_t threads, struct kv_attn_plan *out);

#endif /* KV_KERNELS_H */
