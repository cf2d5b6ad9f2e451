// SPDX-License-Identifier: MIT
/*
 * Element kernels of the KV cache: f32 <-> f16 and f32 <-> bf16
 * conversion (round to nearest even), the int8 helpers (kv_absmax,
 * kv_quant_i8, kv_dequant_i8, kv_requant_i8), kv_rows_store() and
 * kv_rows_load() over them, and the choice of instruction-set variant
 * (kv_kern_isa) that attention.c shares.
 *
 * Each loop is written once as portable C that compilers vectorise and
 * instantiated per variant under a function target attribute; f16 uses
 * the F16C instructions where present. The portable f16 code reproduces
 * F16C's results bit for bit, NaN payloads included, so a cache written on
 * one machine reads the same on another; the test checks this on every
 * f16 value and on edge cases of f32.
 */
#include <math.h>
#include <stdatomic.h>
#include <string.h>

#include "libkv/kernels.h"
#include "taxonomy/kv-private.h"

#if KV_KERN_X86
#include <cpuid.h>
#include <immintrin.h>
#endif

/* ---- Variant choice ---------------------------------------------------- */

/* -1 until detected; then the best variant the machine supports. */
static atomic_int isa_best = -1;
static atomic_int isa_cap_level = KV_KERN_AVX512;

static int isa_detect(void)
{
#if KV_KERN_X86
	unsigned a, b, c, d;
	int f16c;

	__builtin_cpu_init();
	/* The compilers' feature tests know AVX2 and FMA (and check that the
	 * OS saves the registers) but clang's does not know F16C. */
	f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
	if (!f16c || !__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
		return KV_KERN_GENERIC;
	if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
	    __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
		return KV_KERN_AVX512;
	return KV_KERN_AVX2;
#else
	return KV_KERN_GENERIC;
#endif
}

enum kv_kern_isa kv_kern_isa(void)
{
	int best = atomic_load_explicit(&isa_best, memory_order_relaxed);
	int cap = atomic_load_explicit(&isa_cap_level, memory_order_relaxed);

	if (KV_UNLIKELY(best < 0)) {
		best = isa_detect();
		atomic_store_explicit(&isa_best, best, memory_order_relaxed);
	}
	return (enum kv_kern_isa)(best < cap ? best : cap);
}

enum kv_kern_isa kv_kern_isa_cap(enum kv_kern_isa cap)
{
	atomic_store_explicit(&isa_cap_level, (int)cap, memory_order_relaxed);
	return kv_kern_isa();
}

/* ---- Portable bodies ---------------------------------------------------- */

static inline uint32_t f32_bits(float f)
{
	uint32_t u;

	memcpy(&u, &f, sizeof(u));
	return u;
}

static inline float bits_f32(uint32_t u)
{
	float f;

	memcpy(&f, &u, sizeof(f));
	return f;
}

/* As F16C's vcvtps2ph in round-to-nearest-even mode. */
static inline uint16_t f16_from_f32(float f)
{
	uint32_t x = f32_bits(f);
	uint32_t sign = (x >> 16) & 0x8000u;
	uint32_t ax = x & 0x7fffffffu;
	uint32_t e, m, shift, q, rem, half;

	if (ax > 0x7f800000u) /* NaN: quiet, top payload bits kept */
		return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
	if (ax >= 0x477ff000u) /* 65520 and up round past 65504: inf */
		return (uint16_t)(sign | 0x7c00u);
	if (ax >= 0x38800000u) { /* f16 normal range, 2^-14 and up */
		/* Adding 0xfff plus the kept lsb rounds to nearest even at bit
		 * 13; a carry out of the mantissa bumps the exponent, which is
		 * what rounding up to the next binade needs. */
		uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);

		return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
	}
	if (ax < 0x33000000u) /* below 2^-25, half the smallest subnormal */
		return (uint16_t)sign;
	/* Subnormal: the value in units of 2^-24 is m >> (126 - e). */
	e = ax >> 23;
	m = (ax & 0x7fffffu) | 0x800000u;
	shift = 126u - e; /* 14..24 */
	q = m >> shift;
	rem = m & ((1u << shift) - 1u);
	half = 1u << (shift - 1u);
	if (rem > half || (rem == half && (q & 1u)))
		q++;
	return (uint16_t)(sign | q);
}

/* As F16C's vcvtph2ps: exact; a signalling NaN comes back quiet. */
static inline float f16_to_f32_one(uint16_t h)
{
	uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
	uint32_t e = (h >> 10) & 0x1fu;
	uint32_t m = h & 0x3ffu;

	if (e == 0x1fu)
		return bits_f32(sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u));
	if (e)
		return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
	/* Zero or subnormal: m * 2^-24 is exact in f32. */
	return bits_f32(sign | f32_bits((float)m * 0x1p-24f));
}

KV_ALWAYS_INLINE void f32_to_f16_body(uint16_t *restrict dst, const float *restrict src, size_t n)
{
	for (size_t i = 0; i < n; i++)
		dst[i] = f16_from_f32(src[i]);
}

KV_ALWAYS_INLINE void f16_to_f32_body(float *restrict dst, const uint16_t *restrict src, size_t n)
{
	for (size_t i = 0; i < n; i++)
		dst[i] = f16_to_f32_one(src[i]);
}

/* Branch-free so that it vectorises. The addition rounds to nearest even
 * at bit 16 and carries into the exponent (up to inf at the top); a NaN
 * keeps its sign and top payload and is made quiet, since truncating a
 * payload held only in the low bits would turn it into inf. */
KV_ALWAYS_INLINE void f32_to_bf16_body(uint16_t *restrict dst, const float *restrict src, size_t n)
{
	KV_SIMD
	for (size_t i = 0; i < n; i++) {
		uint32_t x = f32_bits(src[i]);
		uint32_t r = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
		uint32_t nan = (x >> 16) | 0x40u;

		dst[i] = (uint16_t)((x & 0x7fffffffu) > 0x7f800000u ? nan : r);
	}
}

KV_ALWAYS_INLINE void bf16_to_f32_body(float *restrict dst, const uint16_t *restrict src, size_t n)
{
	KV_SIMD
	for (size_t i = 0; i < n; i++)
		dst[i] = bits_f32((uint32_t)src[i] << 16);
}

/* On the bit patterns: for non-NaN magnitudes the integer order is the
 * float order, and integer max vectorises without -ffinite-math. */
KV_ALWAYS_INLINE float absmax_body(const float *x, size_t n)
{
	uint32_t best = 0;

	KV_SIMD_MAX(best)
	for (size_t i = 0; i < n; i++) {
		uint32_t a = f32_bits(x[i]) & 0x7fffffffu;

		a = a > 0x7f800000u ? 0u : a;
		best = a > best ? a : best;
	}
	return bits_f32(best);
}

/* Round to nearest even for |v| <= 2^22 in the default rounding mode:
 * adding 1.5 * 2^23 leaves no fraction bits. */
static inline float round_even(float v)
{
	return (v + 12582912.0f) - 12582912.0f;
}

/* Clamp to [-127, 127] (a NaN becomes 0) and round. The clamp works on
 * the magnitude's bit pattern, whose integer order is the float order:
 * float selects against constants make GCC branch (it may not speculate
 * the float ops of the other path) and the loops would not vectorise. */
static inline int8_t to_i8(float v)
{
	uint32_t b = f32_bits(v), a = b & 0x7fffffffu;

	a = a > 0x7f800000u ? 0u : a;
	a = a < 0x42fe0000u ? a : 0x42fe0000u; /* 127.0f */
	return (int8_t)(int32_t)round_even(bits_f32((b & 0x80000000u) | a));
}

KV_ALWAYS_INLINE void quant_body(int8_t *restrict q, const float *restrict x, size_t n,
				 float inv_scale)
{
	KV_SIMD
	for (size_t i = 0; i < n; i++)
		q[i] = to_i8(x[i] * inv_scale);
}

KV_ALWAYS_INLINE void dequant_body(float *restrict x, const int8_t *restrict q, size_t n,
				   float scale)
{
	KV_SIMD
	for (size_t i = 0; i < n; i++)
		x[i] = (float)q[i] * scale;
}

KV_ALWAYS_INLINE void requant_body(int8_t *restrict q, size_t n, float ratio)
{
	KV_SIMD
	for (size_t i = 0; i < n; i++)
		q[i] = to_i8((float)q[i] * ratio);
}

/* ---- Variants ----------------------------------------------------------- */

/* Generic, AVX2 and AVX-512 instances of a void body, and its dispatcher. */
#if KV_KERN_X86
#define KV_VARIANTS(name, params, args)                                     \
	static void name##_generic params { name##_body args; }             \
	KV_TARGET_AVX2 static void name##_avx2 params { name##_body args; } \
	KV_TARGET_AVX512 static void name##_avx512 params { name##_body args; } \
	static void name##_any params                                       \
	{                                                                   \
		switch (kv_kern_isa()) {                                    \
		case KV_KERN_AVX512: name##_avx512 args; break;             \
		case KV_KERN_AVX2: name##_avx2 args; break;                 \
		default: name##_generic args; break;                        \
		}                                                           \
	}
#else
#define KV_VARIANTS(name, params, args) \
	static void name##_any params { name##_body args; }
#endif

KV_VARIANTS(f32_to_bf16, (uint16_t *dst, const float *src, size_t n), (dst, src, n))
KV_VARIANTS(bf16_to_f32, (float *dst, const uint16_t *src, size_t n), (dst, src, n))
KV_VARIANTS(quant, (int8_t *q, const float *x, size_t n, float s), (q, x, n, s))
KV_VARIANTS(dequant, (float *x, const int8_t *q, size_t n, float s), (x, q, n, s))
KV_VARIANTS(requant, (int8_t *q, size_t n, float r), (q, n, r))

static float absmax_generic(const float *x, size_t n) { return absmax_body(x, n); }
#if KV_KERN_X86
KV_TARGET_AVX2 static float absmax_avx2(const float *x, size_t n) { return absmax_body(x, n); }
KV_TARGET_AVX512 static float absmax_avx512(const float *x, size_t n) { return absmax_body(x, n); }
#endif

#if KV_KERN_X86
/* F16C, 8 at a time; the tail goes through a zero-padded block so that it
 * gets the same instruction's result. */
/* vcvtps2ph's immediate: round to nearest even, no exceptions. */
#define F16C_RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

KV_TARGET_AVX2 static void f32_to_f16_f16c(uint16_t *dst, const float *src, size_t n)
{
	size_t i = 0;

	for (; i + 8 <= n; i += 8) {
		__m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), F16C_RNE);

		_mm_storeu_si128((__m128i *)(void *)(dst + i), h);
	}
	if (i < n) {
		float f[8] = { 0 };
		uint16_t h[8];

		memcpy(f, src + i, (n - i) * sizeof(*f));
		_mm_storeu_si128((__m128i *)(void *)h, _mm256_cvtps_ph(_mm256_loadu_ps(f), F16C_RNE));
		memcpy(dst + i, h, (n - i) * sizeof(*h));
	}
}

KV_TARGET_AVX2 static void f16_to_f32_f16c(float *dst, const uint16_t *src, size_t n)
{
	size_t i = 0;

	for (; i + 8 <= n; i += 8) {
		__m128i h = _mm_loadu_si128((const __m128i *)(const void *)(src + i));

		_mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
	}
	if (i < n) {
		uint16_t h[8] = { 0 };
		float f[8];

		memcpy(h, src + i, (n - i) * sizeof(*h));
		_mm256_storeu_ps(f, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(void *)h)));
		memcpy(dst + i, f, (n - i) * sizeof(*f));
	}
}
#endif

/* ---- Entry points ------------------------------------------------------- */

void kv_f32_to_f16(uint16_t *dst, const float *src, size_t n)
{
#if KV_KERN_X86
	if (kv_kern_isa() >= KV_KERN_AVX2) {
		f32_to_f16_f16c(dst, src, n);
		return;
	}
#endif
	f32_to_f16_body(dst, src, n);
}

void kv_f16_to_f32(float *dst, const uint16_t *src, size_t n)
{
#if KV_KERN_X86
	if (kv_kern_isa() >= KV_KERN_AVX2) {
		f16_to_f32_f16c(dst, src, n);
		return;
	}
#endif
	f16_to_f32_body(dst, src, n);
}

void kv_f32_to_bf16(uint16_t *dst, const float *src, size_t n)
{
	f32_to_bf16_any(dst, src, n);
}

void kv_bf16_to_f32(float *dst, const uint16_t *src, size_t n)
{
	bf16_to_f32_any(dst, src, n);
}

float kv_absmax(const float *x, size_t n)
{
#if KV_KERN_X86
	switch (kv_kern_isa()) {
	case KV_KERN_AVX512: return absmax_avx512(x, n);
	case KV_KERN_AVX2: return absmax_avx2(x, n);
	default: break;
	}
#endif
	return absmax_generic(x, n);
}

void kv_quant_i8(int8_t *q, const float *x, size_t n, float inv_scale)
{
	quant_any(q, x, n, inv_scale);
}

void kv_dequant_i8(float *x, const int8_t *q, size_t n, float scale)
{
	dequant_any(x, q, n, scale);
}

void kv_requant_i8(int8_t *q, size_t n, float ratio)
{
	requant_any(q, n, ratio);
}

void kv_rows_store(enum kv_dtype dt, void *dst, const float *src, size_t n)
{
	switch (dt) {
	case KV_DTYPE_F32:
		if (n)
			memcpy(dst, src, n * sizeof(float));
		break;
	case KV_DTYPE_F16:
		kv_f32_to_f16(dst, src, n);
		break;
	case KV_DTYPE_BF16:
		kv_f32_to_bf16(dst, src, n);
		break;
	default:
		break;
	}
}

void kv_rows_load(enum kv_dtype dt, float *dst, const void *src, size_t n, float scale)
{
	switch (dt) {
	case KV_DTYPE_F32:
		if (n)
			memcpy(dst, src, n * sizeof(float));
		break;
	case KV_DTYPE_F16:
		kv_f16_to_f32(dst, src, n);
		break;
	case KV_DTYPE_BF16:
		kv_bf16_to_f32(dst, src, n);
		break;
	case KV_DTYPE_I8:
		kv_dequant_i8(dst, src, n, scale);
		break;
	default:
		break;
	}
}
