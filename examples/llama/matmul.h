/* SPDX-License-Identifier: MIT */
/*
 * kv-llama's matrix product y (n, out) = x (n, in) W^T for row-major
 * weights W (out, in): a kernel that streams W once and computes every x
 * row's dot products per block of W rows, so that a batched decode step
 * (n of a few to a few dozen rows) reads W at memory speed; OpenBLAS
 * 0.3.21's sgemm reads it at 3-5 GB/s there. OpenBLAS stays available
 * to compare with (LLM_MM_BLAS).
 */
#ifndef KV_LLAMA_MATMUL_H
#define KV_LLAMA_MATMUL_H

#include <stdbool.h>
#include <stdint.h>

/* y (n, out) = x (n, in) W^T + beta y, W (out, in) and x (n, in) and y
 * (n, out) row-major and dense; beta 0 writes y without reading it (NaNs
 * there do not propagate). Runs llm_matmul_best()'s kernel. threads
 * counts the caller (0 is taken as 1): W's rows are split over that many
 * threads of a pool kept per thread count for the life of the process.
 * Determinism: every output element is computed by one thread in an
 * order fixed by `in` and the kernel, so the same inputs give the same
 * bits whatever threads and n are (a row of y does not depend on the
 * other rows of x). OpenBLAS does not promise this (0.3.21 gives other
 * bits with another thread count for shapes such as out 203, in 773),
 * which is why it is not used here even for the n where its sgemm is
 * faster (a few percent for n >= 256 on the machine measured).
 * Thread safety: any thread; concurrent calls with the same thread count
 * share a pool, and a call that finds it busy runs on its caller alone. */
void llm_matmul(uint32_t n, uint32_t out, uint32_t in, const float *w, const float *x,
		float *y, float beta, uint32_t threads);

/* llm_matmul() into the first out columns of y (n, ldy), ldy >= out
 * (unchecked): a block of columns of a wider y, such as a chunk of the
 * classifier's rows into the logits (n, vocab). */
void llm_matmul_ld(uint32_t n, uint32_t out, uint32_t in, const float *w, const float *x,
		   float *y, uint32_t ldy, float beta, uint32_t threads);

enum llm_matmul_kernel {
	LLM_MM_BLAS = 0,            /* OpenBLAS: sgemv for n 1, sgemm above */
	LLM_MM_GENERIC,             /* portable C, 4 W rows x 2 x rows a tile */
	LLM_MM_AVX2,                /* AVX2 + FMA, 3 x 4 tiles of ymm */
	LLM_MM_AVX512,              /* AVX-512F, 4 x 4 tiles of zmm */
	LLM_MM_KERNELS
};

/* The kernel llm_matmul() uses: the widest streaming kernel the machine
 * runs. */
enum llm_matmul_kernel llm_matmul_best(void);

/* Whether this machine (CPU and OS) runs kernel k. */
bool llm_matmul_supported(enum llm_matmul_kernel k);

/* "blas", "generic", "avx2", "avx512". */
const char *llm_matmul_kernel_name(enum llm_matmul_kernel k);

/* llm_matmul_ld() with kernel k (tests, benchmarks). LLM_MM_BLAS runs
 * sgemv for n 1 and sgemm above on OpenBLAS's own threads (set with
 * openblas_set_num_threads; threads is ignored). Returns 0.
 * Errors (y untouched): -ENOTSUP (k is not supported here), -EINVAL
 * (ldy < out). */
int llm_matmul_with(enum llm_matmul_kernel k, uint32_t n, uint32_t out, uint32_t in,
		    const float *w, const float *x, float *y, uint32_t ldy, float beta,
		    uint32_t threads);

#endif
