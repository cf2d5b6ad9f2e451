// SPDX-License-Identifier: MIT
/*
 * Tests of the KV cache's kernels (libkv/kernels.h):
 *
 *  - f16 and bf16 conversion against hand-derived bit patterns (zeros,
 *    infinities, NaNs, the largest finite values, subnormals, every kind
 *    of halfway case), against an ldexp decoder on all 65536 inputs, and
 *    for nearest-even on random f32 inputs; the portable code against
 *    F16C bit for bit;
 *  - int8 absmax, quantisation and requantisation within half a step,
 *    with ties to even, clamping and NaN;
 *  - the thread pool: every item run exactly once by a unique worker
 *    index, with several threads calling one pool at once;
 *  - paged attention against a naive double-precision reference that
 *    gathers K and V by position from hand-built block tables (shuffled
 *    block ids with unused, NaN-filled blocks between them, K of layer 1
 *    of 2, partial last blocks filled with NaN), decode and causal
 *    prefill, over group sizes, head dims, block sizes, contexts,
 *    windows, batches and thread counts, every case on each instruction
 *    set variant the machine has. Blocks wholly outside every window are
 *    released (UINT32_MAX in the table, their memory PROT_NONE);
 *  - f16, bf16 and i8 caches against the reference on the dequantised
 *    values, split-K, huge scores, small jobs on the caller, paged against
 *    contiguous layouts (bit for bit), and several threads running jobs
 *    on one pool.
 *
 * Tolerance: the kernel accumulates in f32, so the error of an output
 * element out_d = sum_t w_t v_td / sum_t w_t is a small multiple of
 * f32 epsilon times the condition of that sum, sum_t w_t |v_td| / sum_t
 * w_t, not of |out_d| (which cancels towards 0 for random v). The check
 * is |got - ref| <= 1e-5 * (|ref| + sum_t w_t |v_td| / sum_t w_t); the
 * test also reports the largest norm-relative error of an output row.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/mman.h>

#include "kvtest.h"
#include "libkv/kernels.h"

#define TOL 1e-5
#define NELEM(a) (sizeof(a) / sizeof((a)[0]))
#define MAX_SEQS 4
#define N_LAYERS 2
#define LAYER 1 /* the layer attended; layer 0 holds other data */

static struct kv_tpool *g_pool[5]; /* [t]: t threads; [0] unused */
static enum kv_kern_isa g_best;
static double g_worst_elem, g_worst_norm;
static unsigned g_case;

static uint32_t f2u(float f)
{
	uint32_t u;

	memcpy(&u, &f, 4);
	return u;
}

static float u2f(uint32_t u)
{
	float f;

	memcpy(&f, &u, 4);
	return f;
}

static float rand_unit(uint64_t *s)
{
	return (float)((double)(kv_test_rand(s) >> 11) * 0x1p-53 * 2.0 - 1.0);
}

/* Independent decoders. */
static double f16_value(uint16_t h)
{
	int e = (h >> 10) & 0x1f, m = h & 0x3ff;
	double v;

	if (e == 0x1f)
		v = m ? NAN : INFINITY;
	else if (e == 0)
		v = ldexp(m, -24);
	else
		v = ldexp(1024 + m, e - 25);
	return (h & 0x8000) ? -v : v;
}

static double bf16_value(uint16_t h)
{
	return u2f((uint32_t)h << 16);
}

/* ---- Conversions ---------------------------------------------------------- */

static int g_isa_count;
static enum kv_kern_isa g_isas[3];

static void test_f16_specials(void **state)
{
	static const struct { uint32_t f; uint16_t h; } cases[] = {
		{ 0x00000000, 0x0000 }, /* +0 */
		{ 0x80000000, 0x8000 }, /* -0 */
		{ 0x3f800000, 0x3c00 }, /* 1 */
		{ 0xc0000000, 0xc000 }, /* -2 */
		{ 0x477fe000, 0x7bff }, /* 65504, the largest finite */
		{ 0x477fefff, 0x7bff }, /* just below the 65504/65536 halfway */
		{ 0x477ff000, 0x7c00 }, /* 65520: halfway, 0x3ff is odd: up to inf */
		{ 0xc77ff000, 0xfc00 },
		{ 0x501502f9, 0x7c00 }, /* 1e10 saturates */
		{ 0x7f7fffff, 0x7c00 }, /* FLT_MAX */
		{ 0x7f800000, 0x7c00 }, /* inf */
		{ 0xff800000, 0xfc00 }, /* -inf */
		{ 0x38800000, 0x0400 }, /* 2^-14, smallest normal */
		{ 0x387fc000, 0x03ff }, /* 1023 * 2^-24, largest subnormal */
		{ 0x387fe000, 0x0400 }, /* halfway 0x3ff/0x400: up to even */
		{ 0x33800000, 0x0001 }, /* 2^-24, smallest subnormal */
		{ 0xb3800000, 0x8001 },
		{ 0x33000000, 0x0000 }, /* 2^-25: halfway 0/1, to even 0 */
		{ 0x33000001, 0x0001 }, /* just above */
		{ 0x33c00000, 0x0002 }, /* 1.5 * 2^-24: halfway 1/2, to 2 */
		{ 0x34200000, 0x0002 }, /* 2.5 * 2^-24: halfway 2/3, to 2 */
		{ 0x32800000, 0x0000 }, /* 2^-26 */
		{ 0x00000001, 0x0000 }, /* f32 subnormal */
		{ 0x3f801000, 0x3c00 }, /* 1 + 2^-11: halfway, to even */
		{ 0x3f803000, 0x3c02 }, /* 1 + 3 * 2^-11: halfway, to even */
		{ 0x3f801001, 0x3c01 }, /* just above halfway */
		{ 0x3f800fff, 0x3c00 }, /* just below */
		{ 0x3eaaaaab, 0x3555 }, /* 1/3 */
	};
	static const uint32_t nans[] = { 0x7fc00000, 0xffc00000, 0x7f800001, 0x7fbfffff, 0xff802000 };

	(void)state;
	for (int i = 0; i < g_isa_count; i++) {
		kv_kern_isa_cap(g_isas[i]);
		for (size_t c = 0; c < NELEM(cases); c++) {
			float f = u2f(cases[c].f), back;
			uint16_t h;

			kv_f32_to_f16(&h, &f, 1);
			if (h != cases[c].h)
				fail_msg("isa %d: f32 %08x -> f16 %04x, want %04x", g_isas[i],
					 cases[c].f, h, cases[c].h);
			kv_f16_to_f32(&back, &h, 1);
			assert_true(f2u(back) == f2u((float)f16_value(h)));
		}
		for (size_t c = 0; c < NELEM(nans); c++) {
			float f = u2f(nans[c]), back;
			uint16_t h;

			kv_f32_to_f16(&h, &f, 1);
			assert_true((h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0);
			assert_int_equal(h >> 15, nans[c] >> 31);
			kv_f16_to_f32(&back, &h, 1);
			assert_true(isnan(back));
		}
	}
	kv_kern_isa_cap(KV_KERN_AVX512);
}

/* Every f16 decodes to its ldexp value and encodes back to itself; a
 * random sample of f32 (weighted to f16's range) encodes to a nearest f16,
 * ties to even; all variants agree bit for bit, NaNs included. */
static void test_f16_exhaustive(void **state)
{
	uint16_t *h = malloc(65536 * sizeof(*h)), *h2 = malloc(65536 * sizeof(*h2));
	float *f = malloc(65536 * sizeof(*f)), *fbase = malloc(65536 * sizeof(*f));
	uint16_t *hbase = malloc(65536 * sizeof(*h));
	const size_t n_rand = 1u << 16;
	float *rf = malloc(n_rand * sizeof(*rf));
	uint64_t rng = 7;

	(void)state;
	assert_non_null(h && h2 && f && fbase && hbase && rf);
	for (uint32_t i = 0; i < 65536; i++)
		h[i] = (uint16_t)i;
	for (size_t i = 0; i < n_rand; i++) {
		uint32_t r = (uint32_t)kv_test_rand(&rng);
		/* exponents 97..146 cover below the smallest subnormal to past inf */
		uint32_t e = 97 + (r >> 8) % 50;

		rf[i] = u2f((r & 0x80000000u) | e << 23 | ((uint32_t)kv_test_rand(&rng) & 0x7fffffu));
	}
	for (int k = 0; k < g_isa_count; k++) {
		kv_kern_isa_cap(g_isas[k]);
		/* Odd length: the vector paths' tails. */
		kv_f16_to_f32(f, h, 65535);
		kv_f16_to_f32(f + 65535, h + 65535, 1);
		for (uint32_t i = 0; i < 65536; i++) {
			double want = f16_value((uint16_t)i);

			if (isnan(want)) {
				assert_true(isnan(f[i]));
			} else if ((double)f[i] != want || !signbit(f[i]) != !signbit(want)) {
				fail_msg("f16 %04x -> %a, want %a", i, (double)f[i], want);
			}
		}
		kv_f32_to_f16(h2, f, 65536);
		for (uint32_t i = 0; i < 65536; i++) {
			if (isnan(f[i]))
				assert_true((h2[i] & 0x7c00) == 0x7c00 && (h2[i] & 0x3ff));
			else if (h2[i] != i)
				fail_msg("f16 round trip %04x -> %04x", i, h2[i]);
		}
		kv_f32_to_f16(h2, rf, n_rand);
		for (size_t i = 0; i < n_rand; i++) {
			double x = fabs((double)rf[i]);
			uint16_t mag = h2[i] & 0x7fff;
			double got = f16_value(mag);

			assert_int_equal(h2[i] >> 15, f2u(rf[i]) >> 31);
			if (x >= 65520.0) {
				assert_int_equal(mag, 0x7c00);
				continue;
			}
			assert_true(mag < 0x7c00);
			if (mag > 0 && fabs(f16_value(mag - 1) - x) < fabs(got - x))
				fail_msg("%a -> %04x: %04x is nearer", (double)rf[i], h2[i], mag - 1);
			if (mag < 0x7bff && fabs(f16_value(mag + 1) - x) < fabs(got - x))
				fail_msg("%a -> %04x: %04x is nearer", (double)rf[i], h2[i], mag + 1);
			if ((mag > 0 && fabs(f16_value(mag - 1) - x) == fabs(got - x)) ||
			    (mag < 0x7bff && fabs(f16_value(mag + 1) - x) == fabs(got - x)))
				assert_int_equal(mag & 1, 0);
		}
		/* Variant agreement, NaN payloads included. */
		if (k == 0) {
			memcpy(fbase, f, 65536 * sizeof(*f));
			memcpy(hbase, h2, n_rand * sizeof(*h2));
		} else {
			assert_memory_equal(fbase, f, 65536 * sizeof(*f));
			assert_memory_equal(hbase, h2, n_rand * sizeof(*h2));
			{
				uint32_t nanbits[6] = { 0x7f800001, 0x7fc00000, 0xffbfffff,
							0x7f802000, 0x7fffffff, 0xff800100 };
				uint16_t a[6], b[6];

				kv_f32_to_f16(a, (const float *)(const void *)nanbits, 6);
				kv_kern_isa_cap(KV_KERN_GENERIC);
				kv_f32_to_f16(b, (const float *)(const void *)nanbits, 6);
				kv_kern_isa_cap(g_isas[k]);
				assert_memory_equal(a, b, sizeof(a));
			}
		}
	}
	kv_kern_isa_cap(KV_KERN_AVX512);
	free(h), free(h2), free(f), free(fbase), free(hbase), free(rf);
}

static void test_bf16(void **state)
{
	static const struct { uint32_t f; uint16_t h; } cases[] = {
		{ 0x3f800000, 0x3f80 }, /* 1 */
		{ 0x3f808000, 0x3f80 }, /* halfway, lower even */
		{ 0x3f818000, 0x3f82 }, /* halfway, lower odd: up */
		{ 0x3f808001, 0x3f81 }, /* just above halfway */
		{ 0x3f807fff, 0x3f80 }, /* just below */
		{ 0x7f7fffff, 0x7f80 }, /* FLT_MAX rounds to inf */
		{ 0x7f7f7fff, 0x7f7f }, /* largest value that stays finite */
		{ 0x7f800000, 0x7f80 },
		{ 0xff800000, 0xff80 },
		{ 0x80000000, 0x8000 },
		{ 0x00000001, 0x0000 }, /* subnormals round too */
		{ 0x00008000, 0x0000 },
		{ 0x00018000, 0x0002 },
		{ 0x00008001, 0x0001 },
		{ 0x807fffff, 0x8080 }, /* up to -FLT_MIN */
		{ 0xc0490fdb, 0xc049 }, /* -pi */
	};
	static const uint32_t nans[] = { 0x7f800001, 0x7fc00000, 0xffc00000, 0xff800001, 0x7fffffff };
	uint16_t *h = malloc(65536 * sizeof(*h));
	float *f = malloc(65536 * sizeof(*f));

	(void)state;
	assert_non_null(h && f);
	for (int k = 0; k < g_isa_count; k++) {
		kv_kern_isa_cap(g_isas[k]);
		for (size_t c = 0; c < NELEM(cases); c++) {
			float x = u2f(cases[c].f);
			uint16_t r;

			kv_f32_to_bf16(&r, &x, 1);
			if (r != cases[c].h)
				fail_msg("f32 %08x -> bf16 %04x, want %04x", cases[c].f, r, cases[c].h);
		}
		for (size_t c = 0; c < NELEM(nans); c++) {
			float x = u2f(nans[c]), back;
			uint16_t r;

			kv_f32_to_bf16(&r, &x, 1);
			assert_true((r & 0x7f80) == 0x7f80 && (r & 0x7f));
			assert_int_equal(r >> 15, nans[c] >> 31);
			kv_bf16_to_f32(&back, &r, 1);
			assert_true(isnan(back));
		}
		for (uint32_t i = 0; i < 65536; i++)
			h[i] = (uint16_t)i;
		kv_bf16_to_f32(f, h, 65533);
		kv_bf16_to_f32(f + 65533, h + 65533, 3);
		for (uint32_t i = 0; i < 65536; i++) {
			double v = bf16_value((uint16_t)i);

			assert_true(f2u(f[i]) == i << 16);
			assert_true(isnan(v) ? isnan(f[i]) : (double)f[i] == v);
		}
		kv_f32_to_bf16(h, f, 65536);
		for (uint32_t i = 0; i < 65536; i++) {
			if (isnan(f[i]))
				assert_int_equal(h[i], i | 0x40);
			else if (h[i] != i)
				fail_msg("bf16 round trip %04x -> %04x", i, h[i]);
		}
	}
	kv_kern_isa_cap(KV_KERN_AVX512);
	free(h);
	free(f);
}

static void test_quant(void **state)
{
	const float xs[] = { 0.5f, 1.5f, 2.5f, -0.5f, -2.5f, 126.5f, 127.4f, 200.0f,
			     -1000.0f, NAN, -3.5f, 3.5f, 0.0f, -0.0f, INFINITY, -INFINITY };
	const int8_t want[] = { 0, 2, 2, 0, -2, 126, 127, 127, -127, 0, -4, 4, 0, 0, 127, -127 };
	const size_t n = 1003;
	float *x = malloc(n * sizeof(*x)), *y = malloc(n * sizeof(*y));
	int8_t *q = malloc(n), *q2 = malloc(n);
	uint64_t rng = 11;

	(void)state;
	assert_non_null(x && y && q && q2);
	for (int k = 0; k < g_isa_count; k++) {
		int8_t got[NELEM(xs)];
		const float am[] = { 1.0f, -3.0f, NAN, 2.0f, -0.0f };
		const float nan2[] = { NAN, -NAN };
		const float inf1[] = { 1.0f, -INFINITY };
		float scale, inv, ratio = 0.7f, scale2;

		kv_kern_isa_cap(g_isas[k]);
		assert_true(kv_absmax(am, 5) == 3.0f);
		assert_true(kv_absmax(am, 0) == 0.0f);
		assert_true(kv_absmax(nan2, 2) == 0.0f);
		assert_true(kv_absmax(inf1, 2) == INFINITY);

		kv_quant_i8(got, xs, NELEM(xs), 1.0f);
		assert_memory_equal(got, want, sizeof(want));

		for (size_t i = 0; i < n; i++)
			x[i] = rand_unit(&rng) * 3.0f;
		scale = kv_absmax(x, n) / 127.0f;
		inv = 1.0f / scale;
		kv_quant_i8(q, x, n, inv);
		kv_dequant_i8(y, q, n, scale);
		for (size_t i = 0; i < n; i++) {
			assert_true(q[i] >= -127 && q[i] <= 127);
			assert_true(y[i] == (float)q[i] * scale);
			if (fabs((double)y[i] - x[i]) > 0.5 * scale * (1 + 1e-5))
				fail_msg("quant %zu: %g -> %d (step %g)", i, (double)x[i], q[i], (double)scale);
		}
		/* Requant: the scale grew by 1 / ratio. A tie (q * ratio = k +
		 * 0.5) is off by exactly half a step; q * ratio itself rounds in
		 * f32, hence the 1e-4 step of slack. */
		memcpy(q2, q, n);
		kv_requant_i8(q2, n, ratio);
		scale2 = scale / ratio;
		for (size_t i = 0; i < n; i++)
			if (fabs((double)q2[i] * scale2 - (double)q[i] * scale) > (0.5 + 1e-4) * scale2)
				fail_msg("requant %zu: %d -> %d", i, q[i], q2[i]);
		{
			int8_t r[] = { 5, 7, -5, -7, 1, -1, 127, -127, 3 };
			const int8_t rw[] = { 2, 4, -2, -4, 0, 0, 64, -64, 2 };

			kv_requant_i8(r, NELEM(r), 0.5f);
			assert_memory_equal(r, rw, sizeof(rw));
		}
	}
	kv_kern_isa_cap(KV_KERN_AVX512);
	free(x), free(y), free(q), free(q2);
}

/* Values exactly representable in every dtype round-trip exactly, any n. */
static void test_rows(void **state)
{
	static const size_t ns[] = { 0, 1, 7, 8, 9, 33, 128 };
	float src[128], dst[128];
	uint16_t h[130];
	int8_t q[128];

	(void)state;
	for (int i = 0; i < 128; i++)
		src[i] = (float)(i - 64) / 32.0f;
	for (int k = 0; k < g_isa_count; k++) {
		kv_kern_isa_cap(g_isas[k]);
		for (size_t c = 0; c < NELEM(ns); c++) {
			size_t n = ns[c];
			float fbuf[128];

			h[n] = 0xabcd; /* no write past n */
			kv_rows_store(KV_DTYPE_F16, h, src, n);
			assert_int_equal(h[n], 0xabcd);
			memset(dst, 0, sizeof(dst));
			kv_rows_load(KV_DTYPE_F16, dst, h, n, 0.0f);
			assert_memory_equal(dst, src, n * sizeof(float));
			kv_rows_store(KV_DTYPE_BF16, h, src, n);
			kv_rows_load(KV_DTYPE_BF16, dst, h, n, 0.0f);
			assert_memory_equal(dst, src, n * sizeof(float));
			kv_rows_store(KV_DTYPE_F32, fbuf, src, n);
			kv_rows_load(KV_DTYPE_F32, dst, fbuf, n, 0.0f);
			assert_memory_equal(dst, src, n * sizeof(float));
			for (size_t i = 0; i < n; i++)
				q[i] = (int8_t)((int)i - 64);
			kv_rows_load(KV_DTYPE_I8, dst, q, n, 0.25f);
			for (size_t i = 0; i < n; i++)
				assert_true(dst[i] == (float)((int)i - 64) * 0.25f);
		}
	}
	kv_kern_isa_cap(KV_KERN_AVX512);
}

/* ---- Thread pool ---------------------------------------------------------- */

struct pool_job {
	uint32_t threads;
	atomic_uint *count;         /* (n) runs of each item */
	atomic_int *inuse;          /* (threads) worker index held */
	atomic_uint bad;            /* out-of-range or doubly used worker index */
	uint32_t spin;              /* busy work per item */
	atomic_uint work;           /* its result, so that it is not optimised out */
};

static void pool_item(void *ctx, uint32_t item, uint32_t worker)
{
	struct pool_job *j = ctx;
	uint32_t sink = 0;

	if (worker >= j->threads || atomic_exchange(&j->inuse[worker], 1) != 0) {
		atomic_fetch_add(&j->bad, 1);
		if (worker >= j->threads)
			return;
	}
	atomic_fetch_add(&j->count[item], 1);
	for (uint32_t i = 0; i < j->spin; i++) {
		sink += i;
		__asm__ __volatile__("" : "+r"(sink)); /* keep the loop: it is the work */
	}
	atomic_fetch_add_explicit(&j->work, sink, memory_order_relaxed);
	atomic_store(&j->inuse[worker], 0);
}

/* One call; returns the number of errors (wrong counts, bad workers). */
static unsigned pool_call(struct kv_tpool *p, uint32_t n, uint32_t spin)
{
	uint32_t threads = kv_tpool_threads(p);
	struct pool_job j;
	unsigned errs = 0;

	j.threads = threads;
	j.count = calloc(n ? n : 1, sizeof(*j.count));
	j.inuse = calloc(threads, sizeof(*j.inuse));
	atomic_init(&j.bad, 0);
	atomic_init(&j.work, 0);
	j.spin = spin;
	if (!j.count || !j.inuse)
		return 1000000;
	kv_tpool_run(p, n, pool_item, &j);
	for (uint32_t i = 0; i < n; i++)
		errs += atomic_load(&j.count[i]) != 1;
	errs += atomic_load(&j.bad);
	free(j.count);
	free(j.inuse);
	return errs;
}

static void test_tpool_basic(void **state)
{
	static const uint32_t ns[] = { 0, 1, 2, 3, 7, 100, 1000, 5000 };
	struct kv_tpool *p = NULL;

	(void)state;
	kv_assert_rc(kv_tpool_create(0, &p), -EINVAL);
	assert_null(p);
	kv_tpool_destroy(NULL);
	assert_int_equal(kv_tpool_threads(NULL), 1);
	for (uint32_t t = 1; t <= 4; t++) {
		assert_int_equal(kv_tpool_threads(g_pool[t]), t);
		for (size_t c = 0; c < NELEM(ns); c++)
			assert_int_equal(pool_call(g_pool[t], ns[c], c * 50), 0);
		/* Let the workers fall asleep, then wake them. */
		usleep(2000);
		assert_int_equal(pool_call(g_pool[t], 64, 100), 0);
	}
	/* A short-lived pool, destroyed with workers asleep and awake. */
	for (int k = 0; k < 2; k++) {
		kv_assert_ok(kv_tpool_create(3, &p));
		assert_int_equal(pool_call(p, 10, 0), 0);
		if (k)
			usleep(2000);
		kv_tpool_destroy(p);
	}
}

struct caller_arg {
	struct kv_tpool *pool;
	uint64_t seed;
	unsigned errors;
};

static void *caller_main(void *arg)
{
	struct caller_arg *a = arg;

	for (int i = 0; i < 150; i++) {
		uint32_t n = (uint32_t)(kv_test_rand(&a->seed) % 400);

		a->errors += pool_call(a->pool, n, (uint32_t)(kv_test_rand(&a->seed) % 300));
		if (kv_test_rand(&a->seed) % 16 == 0)
			usleep(300);
	}
	return NULL;
}

/* Four threads on one three-thread pool: whoever finds it busy runs its
 * items itself; every call still runs each of its items once. */
static void test_tpool_concurrent(void **state)
{
	pthread_t tid[4];
	struct caller_arg args[4];

	(void)state;
	for (int i = 0; i < 4; i++) {
		args[i] = (struct caller_arg){ g_pool[3], 100 + (uint64_t)i, 0 };
		assert_int_equal(pthread_create(&tid[i], NULL, caller_main, &args[i]), 0);
	}
	for (int i = 0; i < 4; i++) {
		pthread_join(tid[i], NULL);
		assert_int_equal(args[i].errors, 0);
	}
}

/* ---- Block stores and the reference ---------------------------------------- */

/* Physical blocks of N_LAYERS layer regions; a layer region is
 * [K: H runs of T*D][V: H runs][I8: 2H float scales], padded to 64 bytes.
 * Slots are 64 bytes apart at least, page-aligned when some will be
 * released (made PROT_NONE). */
struct store {
	enum kv_dtype dt;
	uint32_t t, h, d;
	size_t es, head_bytes, layer_bytes, stride;
	uint32_t n_phys, next;
	uint32_t *perm;             /* (n_phys) slot order handed out */
	char *mem;
	size_t bytes;
};

/* One sequence: its logical data and table. */
struct tseq {
	uint32_t n_tokens, n_queries;
	uint32_t n_blocks;
	uint32_t *blocks;           /* (n_blocks) */
	float *k, *v;               /* (N_LAYERS, H, n_tokens, D) logical values */
	float *q;                   /* (n_queries, n_q_heads, D) */
};

static size_t page_size(void)
{
	return (size_t)sysconf(_SC_PAGESIZE);
}

static void store_init(struct store *st, enum kv_dtype dt, uint32_t t, uint32_t h, uint32_t d,
		       uint32_t blocks_needed, int page_slots, uint64_t *rng)
{
	size_t pg = page_slots ? page_size() : 64, block;

	memset(st, 0, sizeof(*st));
	st->dt = dt;
	st->t = t;
	st->h = h;
	st->d = d;
	st->es = kv_dtype_size(dt);
	st->head_bytes = (size_t)t * d * st->es;
	st->layer_bytes = 2 * h * st->head_bytes + (dt == KV_DTYPE_I8 ? 2 * h * sizeof(float) : 0);
	st->layer_bytes = (st->layer_bytes + 63) / 64 * 64;
	block = N_LAYERS * st->layer_bytes;
	st->stride = (block + 64 + pg - 1) / pg * pg;
	st->n_phys = blocks_needed + blocks_needed / 2 + 3;
	st->bytes = st->n_phys * st->stride;
	st->mem = mmap(NULL, st->bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	assert_true(st->mem != MAP_FAILED);
	/* All ones: NaN in f32, f16 and bf16; -1 with NaN scales in i8. */
	memset(st->mem, 0xff, st->bytes);
	st->perm = malloc(st->n_phys * sizeof(*st->perm));
	assert_non_null(st->perm);
	for (uint32_t i = 0; i < st->n_phys; i++)
		st->perm[i] = i;
	for (uint32_t i = st->n_phys - 1; i > 0; i--) {
		uint32_t j = (uint32_t)(kv_test_rand(rng) % (i + 1)), x = st->perm[i];

		st->perm[i] = st->perm[j];
		st->perm[j] = x;
	}
}

static void store_free(struct store *st)
{
	munmap(st->mem, st->bytes);
	free(st->perm);
}

static struct kv_attn_layout store_layout(const struct store *st)
{
	struct kv_attn_layout lay = {
		.dtype = st->dt,
		.block_tokens = st->t,
		.n_kv_heads = st->h,
		.head_dim = st->d,
		.head_bytes = st->head_bytes,
		.v_offset = st->h * st->head_bytes,
		.scale_offset = 2 * st->h * st->head_bytes,
	};
	return lay;
}

static char *layer_region(const struct store *st, uint32_t slot, uint32_t layer)
{
	return st->mem + (size_t)slot * st->stride + (size_t)layer * st->layer_bytes;
}

static float *lkv(const struct store *st, const struct tseq *s, int is_v, uint32_t layer,
		  uint32_t head, uint32_t pos)
{
	float *base = is_v ? s->v : s->k;

	return base + (((size_t)layer * st->h + head) * s->n_tokens + pos) * st->d;
}

/* Allocate the sequence's blocks in the store and write its data: per
 * block, layer and head one run of K and one of V (i8: scaled to the
 * run's absmax). Tokens past n_tokens stay all-ones. */
static void store_write(struct store *st, struct tseq *s)
{
	const uint32_t t = st->t, d = st->d;

	s->n_blocks = (s->n_tokens + t - 1) / t;
	s->blocks = malloc(s->n_blocks * sizeof(*s->blocks));
	assert_non_null(s->blocks);
	for (uint32_t b = 0; b < s->n_blocks; b++) {
		uint32_t n = s->n_tokens - b * t < t ? s->n_tokens - b * t : t;

		assert_true(st->next < st->n_phys);
		s->blocks[b] = st->perm[st->next++];
		for (uint32_t layer = 0; layer < N_LAYERS; layer++) {
			char *reg = layer_region(st, s->blocks[b], layer);

			for (uint32_t h = 0; h < st->h; h++) {
				for (int is_v = 0; is_v < 2; is_v++) {
					char *run = reg + (is_v ? st->h : 0) * st->head_bytes +
						    h * st->head_bytes;
					const float *src = lkv(st, s, is_v, layer, h, b * t);

					if (st->dt == KV_DTYPE_I8) {
						float am = kv_absmax(src, (size_t)n * d);
						float scale = am > 0 ? am / 127.0f : 1.0f;

						kv_quant_i8((int8_t *)run, src, (size_t)n * d, 1.0f / scale);
						memcpy(reg + 2 * st->h * st->head_bytes +
							       ((is_v ? st->h : 0) + h) * sizeof(float),
						       &scale, sizeof(scale));
					} else {
						kv_rows_store(st->dt, run, src, (size_t)n * d);
					}
				}
			}
		}
	}
}

/* The value the cache holds for element (pos, i) of a head's K or V,
 * decoded by the test's own code. */
static double stored(const struct store *st, const struct tseq *s, int is_v, uint32_t layer,
		     uint32_t head, uint32_t pos, uint32_t i)
{
	uint32_t b = pos / st->t, off = pos % st->t;
	const char *reg = layer_region(st, s->blocks[b], layer);
	const char *run = reg + (is_v ? st->h : 0) * st->head_bytes + head * st->head_bytes;
	size_t e = (size_t)off * st->d + i;
	uint16_t h16;
	float f;

	switch (st->dt) {
	case KV_DTYPE_F32:
		memcpy(&f, run + e * 4, 4);
		return f;
	case KV_DTYPE_F16:
		memcpy(&h16, run + e * 2, 2);
		return f16_value(h16);
	case KV_DTYPE_BF16:
		memcpy(&h16, run + e * 2, 2);
		return bf16_value(h16);
	default:
		memcpy(&f, reg + 2 * st->h * st->head_bytes + ((is_v ? st->h : 0) + head) * 4, 4);
		return (double)((float)((const int8_t *)run)[e] * f);
	}
}

static uint32_t lo_of(uint32_t p, uint32_t window)
{
	return window && p + 1 > window ? p + 1 - window : 0;
}

/* Release (UINT32_MAX, PROT_NONE) the blocks of s no query sees. */
static void release_blocks(struct store *st, struct tseq *s, uint32_t window)
{
	uint32_t first = lo_of(s->n_tokens - s->n_queries, window);

	for (uint32_t b = 0; (b + 1) * st->t <= first; b++) {
		assert_int_equal(mprotect(st->mem + (size_t)s->blocks[b] * st->stride, st->stride,
					  PROT_NONE), 0);
		s->blocks[b] = UINT32_MAX;
	}
}

/* The reference in double: explicit scores, max, exp and sums over the
 * keys each query sees, K and V gathered by position. ref and bound are
 * (n_queries, n_q_heads, D): the output and sum_t w_t |v_td| / sum w. */
static void reference(const struct store *st, const struct tseq *s, uint32_t n_q_heads,
		      float scale, uint32_t window, double *ref, double *bound)
{
	const uint32_t d = st->d, group = n_q_heads / st->h;
	const uint32_t p0 = s->n_tokens - s->n_queries, first = lo_of(p0, window);
	const uint32_t nk = s->n_tokens - first;
	double *kd = malloc((size_t)st->h * nk * d * sizeof(double));
	double *vd = malloc((size_t)st->h * nk * d * sizeof(double));
	double *w = malloc((size_t)nk * sizeof(double));

	assert_non_null(kd && vd && w);
	for (uint32_t h = 0; h < st->h; h++)
		for (uint32_t t = 0; t < nk; t++)
			for (uint32_t i = 0; i < d; i++) {
				size_t e = ((size_t)h * nk + t) * d + i;

				kd[e] = stored(st, s, 0, LAYER, h, first + t, i);
				vd[e] = stored(st, s, 1, LAYER, h, first + t, i);
			}
	for (uint32_t j = 0; j < s->n_queries; j++) {
		uint32_t p = p0 + j, lo = lo_of(p, window);

		for (uint32_t qh = 0; qh < n_q_heads; qh++) {
			const float *q = s->q + ((size_t)j * n_q_heads + qh) * d;
			const double *kh = kd + (size_t)(qh / group) * nk * d;
			const double *vh = vd + (size_t)(qh / group) * nk * d;
			double *o = ref + ((size_t)j * n_q_heads + qh) * d;
			double *bo = bound + ((size_t)j * n_q_heads + qh) * d;
			double mx = -INFINITY, sum = 0;

			for (uint32_t t = lo; t <= p; t++) {
				double dot = 0;

				for (uint32_t i = 0; i < d; i++)
					dot += (double)q[i] * kh[(size_t)(t - first) * d + i];
				w[t - first] = (double)scale * dot;
				mx = w[t - first] > mx ? w[t - first] : mx;
			}
			for (uint32_t t = lo; t <= p; t++) {
				w[t - first] = exp(w[t - first] - mx);
				sum += w[t - first];
			}
			for (uint32_t i = 0; i < d; i++) {
				double acc = 0, accabs = 0;

				for (uint32_t t = lo; t <= p; t++) {
					double v = vh[(size_t)(t - first) * d + i];

					acc += w[t - first] * v;
					accabs += w[t - first] * fabs(v);
				}
				o[i] = acc / sum;
				bo[i] = accabs / sum;
			}
		}
	}
	free(kd);
	free(vd);
	free(w);
}

/* ---- Attention cases ---------------------------------------------------------- */

struct acase {
	enum kv_dtype dt;
	uint32_t group, n_kv_heads, d, t;
	uint32_t n_seqs;
	uint32_t n_tokens[MAX_SEQS], n_queries[MAX_SEQS];
	uint32_t window;
	uint32_t threads;
	int release;                /* release blocks outside every window */
	float qmag;                 /* |q| up to this (0: 1) */
	uint64_t seed;
};

struct built {
	struct store st;
	struct tseq s[MAX_SEQS];
	struct kv_attn_seq js[MAX_SEQS];
	float *out[MAX_SEQS];
	struct kv_attn_job job;
};

static void fill_seq_data(const struct acase *c, uint32_t i, struct tseq *s, uint64_t *rng)
{
	const uint32_t n_q_heads = c->group * c->n_kv_heads;
	size_t nkv = (size_t)N_LAYERS * c->n_kv_heads * c->n_tokens[i] * c->d;
	size_t nq = (size_t)c->n_queries[i] * n_q_heads * c->d;
	float qmag = c->qmag > 0 ? c->qmag : 1.0f;

	s->n_tokens = c->n_tokens[i];
	s->n_queries = c->n_queries[i];
	s->k = malloc(nkv * sizeof(float));
	s->v = malloc(nkv * sizeof(float));
	s->q = malloc(nq * sizeof(float));
	assert_non_null(s->k && s->v && s->q);
	for (size_t e = 0; e < nkv; e++) {
		s->k[e] = rand_unit(rng);
		s->v[e] = rand_unit(rng);
	}
	for (size_t e = 0; e < nq; e++)
		s->q[e] = rand_unit(rng) * qmag;
}

/* Lay the (already filled) sequences out in a store of block size t. */
static void build_layout(const struct acase *c, uint32_t t, struct built *bt, uint64_t *rng)
{
	uint32_t need = 0;
	const uint32_t n_q_heads = c->group * c->n_kv_heads;

	for (uint32_t i = 0; i < c->n_seqs; i++)
		need += (c->n_tokens[i] + t - 1) / t;
	store_init(&bt->st, c->dt, t, c->n_kv_heads, c->d, need, c->release, rng);
	for (uint32_t i = 0; i < c->n_seqs; i++) {
		struct tseq *s = &bt->s[i];
		size_t nq = (size_t)s->n_queries * n_q_heads * c->d;

		store_write(&bt->st, s);
		bt->out[i] = malloc(nq * sizeof(float));
		assert_non_null(bt->out[i]);
		bt->js[i] = (struct kv_attn_seq){
			.base = bt->st.mem,
			.stride = bt->st.stride,
			.layer_offset = LAYER * bt->st.layer_bytes,
			.blocks = s->blocks,
			.n_tokens = s->n_tokens,
			.n_queries = s->n_queries,
			.q = s->q,
			.out = bt->out[i],
		};
	}
	bt->job = (struct kv_attn_job){
		.lay = store_layout(&bt->st),
		.n_q_heads = n_q_heads,
		.scale = 1.0f / sqrtf((float)c->d),
		.window = c->window,
		.n_seqs = c->n_seqs,
		.seqs = bt->js,
	};
}

static void build(const struct acase *c, struct built *bt)
{
	uint64_t rng = c->seed;

	memset(bt, 0, sizeof(*bt));
	for (uint32_t i = 0; i < c->n_seqs; i++)
		fill_seq_data(c, i, &bt->s[i], &rng);
	build_layout(c, c->t, bt, &rng);
}

static void run_job(struct built *bt, uint32_t threads)
{
	for (uint32_t i = 0; i < bt->job.n_seqs; i++) {
		size_t n = (size_t)bt->js[i].n_queries * bt->job.n_q_heads * bt->job.lay.head_dim;

		for (size_t e = 0; e < n; e++)
			bt->out[i][e] = NAN;
	}
	kv_assert_ok(kv_attn_run(threads > 1 ? g_pool[threads] : NULL, &bt->job));
}

static void free_built(struct built *bt, int free_data)
{
	for (uint32_t i = 0; i < bt->job.n_seqs; i++) {
		free(bt->s[i].blocks);
		free(bt->out[i]);
		if (free_data) {
			free(bt->s[i].k);
			free(bt->s[i].v);
			free(bt->s[i].q);
		}
	}
	store_free(&bt->st);
}

static void describe(const struct acase *c, char *buf, size_t len)
{
	snprintf(buf, len, "dt %s G %u H %u D %u T %u win %u threads %u seqs %u (n %u q %u)",
		 kv_dtype_name(c->dt), c->group, c->n_kv_heads, c->d, c->t, c->window,
		 c->threads, c->n_seqs, c->n_tokens[0], c->n_queries[0]);
}

/* Check outputs against the reference; track the worst errors seen. */
static void check_out(const struct acase *c, const struct built *bt, double *const *ref,
		      double *const *bound, const char *what)
{
	for (uint32_t i = 0; i < c->n_seqs; i++) {
		const uint32_t d = c->d, rows = bt->js[i].n_queries * bt->job.n_q_heads;

		for (uint32_t r = 0; r < rows; r++) {
			double en = 0, rn = 0;

			for (uint32_t e = 0; e < d; e++) {
				size_t x = (size_t)r * d + e;
				double got = bt->out[i][x], want = ref[i][x];
				double err = fabs(got - want), lim = fabs(want) + bound[i][x];

				if (!(err <= TOL * lim)) {
					char desc[200];

					describe(c, desc, sizeof(desc));
					fail_msg("%s: %s: seq %u row %u elem %u: got %.9g want %.9g (bound %.3g)",
						 what, desc, i, r, e, got, want, bound[i][x]);
				}
				if (lim > 0 && err / lim > g_worst_elem)
					g_worst_elem = err / lim;
				en += err * err;
				rn += want * want;
			}
			if (rn > 0 && sqrt(en / rn) > g_worst_norm)
				g_worst_norm = sqrt(en / rn);
		}
	}
}

/* Build, run on every variant, compare with the reference. */
static void run_case(const struct acase *c)
{
	struct built bt;
	double *ref[MAX_SEQS], *bound[MAX_SEQS];

	build(c, &bt);
	for (uint32_t i = 0; i < c->n_seqs; i++) {
		size_t n = (size_t)c->n_queries[i] * bt.job.n_q_heads * c->d;

		ref[i] = malloc(n * sizeof(double));
		bound[i] = malloc(n * sizeof(double));
		assert_non_null(ref[i] && bound[i]);
		if (c->release)
			release_blocks(&bt.st, &bt.s[i], c->window);
		reference(&bt.st, &bt.s[i], bt.job.n_q_heads, bt.job.scale, c->window, ref[i],
			  bound[i]);
	}
	/* The variants share their C source: the best one on every case,
	 * the others on every third, which keeps the sanitizer runs short. */
	for (int k = g_case++ % 3 ? g_isa_count - 1 : 0; k < g_isa_count; k++) {
		kv_kern_isa_cap(g_isas[k]);
		run_job(&bt, c->threads);
		check_out(c, &bt, ref, bound, k == 0 ? "generic" : k == 1 ? "avx2" : "avx512");
	}
	kv_kern_isa_cap(KV_KERN_AVX512);
	for (uint32_t i = 0; i < c->n_seqs; i++) {
		free(ref[i]);
		free(bound[i]);
	}
	free_built(&bt, 1);
}

static const uint32_t k_groups[] = { 1, 2, 4, 8 };
static const uint32_t k_dims[] = { 8, 48, 64, 128, 100 };
static const uint32_t k_blocks[] = { 1, 16, 17, 64 };

/* Decode: one query per sequence, over groups x dims x block sizes x
 * contexts; batch size, window and thread count rotate through the
 * combinations so that each meets several of the others. */
static void test_decode_f32(void **state)
{
	static const uint32_t ctxs[] = { 1, 15, 16, 17, 1000 };
	unsigned idx = 0;

	(void)state;
	for (size_t gi = 0; gi < NELEM(k_groups); gi++)
	for (size_t di = 0; di < NELEM(k_dims); di++)
	for (size_t ti = 0; ti < NELEM(k_blocks); ti++)
	for (size_t ci = 0; ci < NELEM(ctxs); ci++, idx++) {
		const uint32_t windows[] = { 0, 0, 5, k_blocks[ti] / 2 + 1, 100 };
		struct acase c = {
			.dt = KV_DTYPE_F32,
			.group = k_groups[gi],
			.n_kv_heads = 2,
			.d = k_dims[di],
			.t = k_blocks[ti],
			.n_seqs = 1 + idx % 3,
			.window = windows[idx % 5],
			.threads = 1 + idx % 4,
			.qmag = idx % 2 ? 3.0f : 1.0f,
			.seed = 1000 + idx,
		};

		/* The long context on a quarter of the (G, D, T) combinations,
		 * windowed where many heads would make it slow. */
		if (ctxs[ci] == 1000 && (gi + di + ti) % 4 != 0)
			continue;
		if (ctxs[ci] == 1000 && c.group * c.d > 256 && c.window == 0)
			c.window = 300;
		c.release = c.window != 0;
		for (uint32_t s = 0; s < c.n_seqs; s++) {
			uint32_t n = ctxs[ci] > 3 * s ? ctxs[ci] - 3 * s : 1;

			c.n_tokens[s] = n;
			c.n_queries[s] = 1;
		}
		run_case(&c);
	}
}

/* Causal prefill: all positions of short prompts, and the last queries of
 * a long one (chunked prefill), with and without windows. */
static void test_prefill_f32(void **state)
{
	unsigned idx = 0;

	(void)state;
	for (size_t gi = 0; gi < NELEM(k_groups); gi++)
	for (size_t di = 0; di < NELEM(k_dims); di++)
	for (size_t ti = 0; ti < NELEM(k_blocks); ti++, idx++) {
		const uint32_t windows[] = { 0, 3, 20, 0 };
		struct acase c = {
			.dt = KV_DTYPE_F32,
			.group = k_groups[gi],
			.n_kv_heads = 1 + idx % 2,
			.d = k_dims[di],
			.t = k_blocks[ti],
			.n_seqs = 1 + idx % 2,
			.window = windows[idx % 4],
			.threads = 1 + (idx + 1) % 4,
			.seed = 5000 + idx,
		};
		static const uint32_t lens[][2] = { { 16, 16 }, { 17, 17 }, { 40, 40 },
						    { 300, 17 }, { 1, 1 }, { 15, 9 } };

		c.release = c.window != 0;
		for (uint32_t s = 0; s < c.n_seqs; s++) {
			const uint32_t *l = lens[(idx + s) % NELEM(lens)];

			c.n_tokens[s] = l[0];
			c.n_queries[s] = l[1];
		}
		run_case(&c);
	}
}

/* Windows smaller than, equal to and larger than a block, with released
 * blocks, over batches of different lengths. */
static void test_windows(void **state)
{
	static const uint32_t windows[] = { 1, 3, 15, 16, 17, 33, 200 };
	unsigned idx = 0;

	(void)state;
	for (size_t wi = 0; wi < NELEM(windows); wi++)
	for (uint32_t prefill = 0; prefill < 2; prefill++, idx++) {
		struct acase c = {
			.dt = KV_DTYPE_F32,
			.group = 4,
			.n_kv_heads = 2,
			.d = 64,
			.t = 16,
			.n_seqs = 4,
			.n_tokens = { 400, 321, 48, 5 },
			.n_queries = { 1, 1, 1, 1 },
			.window = windows[wi],
			.threads = 2 + idx % 3,
			.release = 1,
			.seed = 9000 + idx,
		};

		if (prefill)
			for (uint32_t s = 0; s < c.n_seqs; s++)
				c.n_queries[s] = c.n_tokens[s] < 40 ? c.n_tokens[s] : 40;
		run_case(&c);
	}
}

/* f16, bf16 and i8 caches: the reference reads the values the cache
 * holds, so the kernel's decoding is checked exactly. */
static void test_dtypes(void **state)
{
	static const enum kv_dtype dts[] = { KV_DTYPE_F16, KV_DTYPE_BF16, KV_DTYPE_I8 };
	static const uint32_t dims[] = { 48, 128, 100, 8 };
	static const uint32_t blocks[] = { 16, 17, 1 };
	unsigned idx = 0;

	(void)state;
	for (size_t k = 0; k < NELEM(dts); k++)
	for (size_t di = 0; di < NELEM(dims); di++)
	for (size_t ti = 0; ti < NELEM(blocks); ti++, idx++) {
		struct acase c = {
			.dt = dts[k],
			.group = idx % 2 ? 4 : 1,
			.n_kv_heads = 2,
			.d = dims[di],
			.t = blocks[ti],
			.n_seqs = 2,
			.n_tokens = { idx % 3 ? 500 : 17, 40 },
			.n_queries = { 1, idx % 2 ? 40 : 7 },
			.window = idx % 4 == 3 ? 37 : 0,
			.threads = 1 + idx % 4,
			.seed = 12000 + idx,
		};

		c.release = c.window != 0;
		run_case(&c);
	}
}

/* Decode of one long sequence on a multi-thread pool: few items for the
 * threads, so key ranges are split and merged. */
static void test_split_k(void **state)
{
	(void)state;
	for (uint32_t threads = 2; threads <= 4; threads++) {
		for (uint32_t win = 0; win < 2; win++) {
			struct acase c = {
				.dt = win ? KV_DTYPE_F16 : KV_DTYPE_F32,
				.group = 4,
				.n_kv_heads = 1,
				.d = 64,
				.t = 16,
				.n_seqs = 1,
				.n_tokens = { 1500 + threads },
				.n_queries = { threads == 4 ? 3 : 1 },
				.window = win ? 1000 : 0,
				.threads = threads,
				.release = (int)win,
				.qmag = 2.0f,
				.seed = 15000 + threads * 2 + win,
			};
			struct built bt;
			struct kv_attn_plan pl;

			build(&c, &bt);
			kv_attn_plan(&bt.job, threads, &pl);
			assert_true(pl.max_parts > 1);
			assert_int_equal(pl.workers, threads);
			free_built(&bt, 1);
			run_case(&c);
		}
	}
}

/* A tiny job runs on the caller alone; a big one on every thread, split
 * when there are too few items. The plan reads no K/V. */
static void test_plan(void **state)
{
	struct kv_attn_seq seqs[4];
	struct kv_attn_job job = {
		.lay = { .dtype = KV_DTYPE_F32, .block_tokens = 16, .n_kv_heads = 2, .head_dim = 64,
			 .head_bytes = 16 * 64 * 4, .v_offset = 2 * 16 * 64 * 4 },
		.n_q_heads = 4, .scale = 0.125f, .n_seqs = 1, .seqs = seqs,
	};
	struct kv_attn_plan pl;

	(void)state;
	memset(seqs, 0, sizeof(seqs));
	seqs[0].n_tokens = 20;
	seqs[0].n_queries = 1;
	kv_attn_plan(&job, 4, &pl);
	assert_int_equal(pl.workers, 1);
	assert_int_equal(pl.items, 2);
	assert_int_equal(pl.max_parts, 1);
	assert_int_equal(pl.tile_heads, 2);
	assert_int_equal(pl.tile_queries, 1);
	assert_true(pl.kv_bytes == 20 * 2 * 2 * 64 * 4);

	/* 4 sequences x 4 kv heads: 16 items, enough for 4 threads. */
	job.lay.n_kv_heads = 4;
	job.n_q_heads = 8;
	job.n_seqs = 4;
	for (uint32_t s = 0; s < 4; s++) {
		seqs[s].n_tokens = 2000;
		seqs[s].n_queries = 1;
	}
	kv_attn_plan(&job, 4, &pl);
	assert_int_equal(pl.workers, 4);
	assert_int_equal(pl.items, 16);
	assert_int_equal(pl.max_parts, 1);
	/* On 8 threads too few: each is cut in two. */
	kv_attn_plan(&job, 8, &pl);
	assert_int_equal(pl.max_parts, 2);
	assert_int_equal(pl.items, 32);
	/* A window bounds the bytes read. */
	job.window = 100;
	kv_attn_plan(&job, 8, &pl);
	assert_true(pl.kv_bytes == (size_t)4 * 100 * 4 * 2 * 64 * 4);
	/* Prefill of 100 queries: tiles of at most tile_queries queries. */
	job.window = 0;
	job.n_seqs = 1;
	seqs[0].n_tokens = seqs[0].n_queries = 100;
	kv_attn_plan(&job, 2, &pl);
	assert_true(pl.tile_queries >= 1 && pl.tile_queries <= 100);
	assert_int_equal(pl.items, 4 * ((100 + pl.tile_queries - 1) / pl.tile_queries));
}

/* Scores around 1e2..1e4: exp of them overflows f32, the online softmax
 * must still give the right (finite) answer. The values are integers and
 * the scale a power of two, so the kernel's scores are exact. */
static void test_stability(void **state)
{
	static const float qs[] = { 100.0f, -100.0f, 1000.0f };

	(void)state;
	for (size_t k = 0; k < NELEM(qs); k++) {
		struct acase c = {
			.dt = KV_DTYPE_F32, .group = 2, .n_kv_heads = 2, .d = 16, .t = 16,
			.n_seqs = 2, .n_tokens = { 600, 37 }, .n_queries = { 1, 37 },
			.threads = 2, .seed = 77 + k,
		};
		struct built bt;
		double *ref[2], *bound[2];
		uint64_t rng = 5;

		memset(&bt, 0, sizeof(bt));
		for (uint32_t s = 0; s < c.n_seqs; s++) {
			struct tseq *sq = &bt.s[s];

			fill_seq_data(&c, s, sq, &rng);
			for (uint32_t l = 0; l < N_LAYERS; l++)
				for (uint32_t h = 0; h < c.n_kv_heads; h++)
					for (uint32_t p = 0; p < sq->n_tokens; p++) {
						float *kr = sq->k + (((size_t)l * c.n_kv_heads + h) *
								     sq->n_tokens + p) * c.d;

						memset(kr, 0, c.d * sizeof(float));
						kr[0] = qs[k] + (float)(int)(kv_test_rand(&rng) % 7) - 3.0f;
					}
			for (size_t e = 0; e < (size_t)sq->n_queries * 4; e++) {
				float *qr = sq->q + e * c.d;

				memset(qr, 0, c.d * sizeof(float));
				qr[0] = fabsf(qs[k]);
			}
		}
		build_layout(&c, c.t, &bt, &rng);
		bt.job.scale = 1.0f / 64.0f;
		for (uint32_t s = 0; s < c.n_seqs; s++) {
			size_t n = (size_t)c.n_queries[s] * bt.job.n_q_heads * c.d;

			ref[s] = malloc(n * sizeof(double));
			bound[s] = malloc(n * sizeof(double));
			assert_non_null(ref[s] && bound[s]);
			reference(&bt.st, &bt.s[s], bt.job.n_q_heads, bt.job.scale, 0, ref[s], bound[s]);
		}
		for (int i = 0; i < g_isa_count; i++) {
			kv_kern_isa_cap(g_isas[i]);
			run_job(&bt, c.threads);
			for (uint32_t s = 0; s < c.n_seqs; s++)
				for (size_t e = 0; e < (size_t)c.n_queries[s] * 4 * c.d; e++)
					assert_true(isfinite(bt.out[s][e]));
			check_out(&c, &bt, ref, bound, "stability");
		}
		kv_kern_isa_cap(KV_KERN_AVX512);
		for (uint32_t s = 0; s < c.n_seqs; s++) {
			free(ref[s]);
			free(bound[s]);
		}
		free_built(&bt, 1);
	}
}

/* The same data paged (block_tokens 16, shuffled) and contiguous (one
 * block per sequence) gives the same bits, split-K and dtypes included. */
static void test_paged_vs_contiguous(void **state)
{
	static const struct acase cases[] = {
		{ .dt = KV_DTYPE_F32, .group = 4, .n_kv_heads = 2, .d = 128, .n_seqs = 3,
		  .n_tokens = { 600, 515, 3 }, .n_queries = { 1, 1, 1 }, .threads = 2 },
		{ .dt = KV_DTYPE_F32, .group = 4, .n_kv_heads = 1, .d = 64, .n_seqs = 1,
		  .n_tokens = { 1500 }, .n_queries = { 1 }, .threads = 4 },
		{ .dt = KV_DTYPE_F32, .group = 2, .n_kv_heads = 2, .d = 100, .n_seqs = 2,
		  .n_tokens = { 300, 77 }, .n_queries = { 300, 20 }, .threads = 3, .window = 50 },
		{ .dt = KV_DTYPE_F16, .group = 8, .n_kv_heads = 1, .d = 48, .n_seqs = 2,
		  .n_tokens = { 700, 40 }, .n_queries = { 1, 40 }, .threads = 2 },
		{ .dt = KV_DTYPE_BF16, .group = 1, .n_kv_heads = 4, .d = 64, .n_seqs = 1,
		  .n_tokens = { 900 }, .n_queries = { 1 }, .threads = 1 },
		{ .dt = KV_DTYPE_I8, .group = 4, .n_kv_heads = 2, .d = 128, .n_seqs = 2,
		  .n_tokens = { 1024, 64 }, .n_queries = { 1, 64 }, .threads = 4 },
	};

	(void)state;
	for (size_t k = 0; k < NELEM(cases); k++) {
		struct acase c = cases[k];
		struct built paged, contig;
		uint64_t rng = 40 + k;
		uint32_t maxn = 0;

		memset(&paged, 0, sizeof(paged));
		memset(&contig, 0, sizeof(contig));
		for (uint32_t s = 0; s < c.n_seqs; s++) {
			fill_seq_data(&c, s, &paged.s[s], &rng);
			contig.s[s] = paged.s[s];
			maxn = c.n_tokens[s] > maxn ? c.n_tokens[s] : maxn;
		}
		/* i8 scales are per block and head: values that are multiples
		 * of 1/127 with a 1 in every 16-token block give the same
		 * scale (1/127) and integers in both layouts. */
		if (c.dt == KV_DTYPE_I8)
			for (uint32_t s = 0; s < c.n_seqs; s++) {
				struct tseq *sq = &paged.s[s];
				size_t n = (size_t)N_LAYERS * c.n_kv_heads * sq->n_tokens * c.d;

				for (size_t e = 0; e < n; e++) {
					sq->k[e] = (float)(int)(sq->k[e] * 127.0f) / 127.0f;
					sq->v[e] = (float)(int)(sq->v[e] * 127.0f) / 127.0f;
				}
				for (uint32_t l = 0; l < N_LAYERS; l++)
					for (uint32_t h = 0; h < c.n_kv_heads; h++)
						for (uint32_t p = 0; p < sq->n_tokens; p += 16) {
							size_t e = (((size_t)l * c.n_kv_heads + h) *
								    sq->n_tokens + p) * c.d;

							sq->k[e] = sq->v[e] = 1.0f;
						}
			}
		build_layout(&c, 16, &paged, &rng);
		build_layout(&c, maxn, &contig, &rng);
		for (int i = 0; i < g_isa_count; i++) {
			kv_kern_isa_cap(g_isas[i]);
			run_job(&paged, c.threads);
			run_job(&contig, c.threads);
			for (uint32_t s = 0; s < c.n_seqs; s++) {
				size_t n = (size_t)c.n_queries[s] * paged.job.n_q_heads * c.d;

				assert_memory_equal(paged.out[s], contig.out[s], n * sizeof(float));
			}
		}
		kv_kern_isa_cap(KV_KERN_AVX512);
		free_built(&contig, 0);
		free_built(&paged, 1);
	}
}

/* Several threads run jobs on one pool at once (as several sequences'
 * threads of a server would); each result matches the one computed
 * alone. */
struct attn_caller {
	struct built *bt;
	float *want[MAX_SEQS];
	int rounds;
	unsigned mismatches;
	int rc;
};

static void *attn_caller_main(void *arg)
{
	struct attn_caller *a = arg;
	struct built *bt = a->bt;

	for (int r = 0; r < a->rounds; r++) {
		a->rc |= kv_attn_run(g_pool[3], &bt->job);
		for (uint32_t s = 0; s < bt->job.n_seqs; s++) {
			size_t n = (size_t)bt->js[s].n_queries * bt->job.n_q_heads * bt->job.lay.head_dim;

			a->mismatches += memcmp(bt->out[s], a->want[s], n * sizeof(float)) != 0;
		}
	}
	return NULL;
}

static void test_attn_concurrent(void **state)
{
	struct built bt[3];
	struct attn_caller ac[3];
	pthread_t tid[3];

	(void)state;
	for (int i = 0; i < 3; i++) {
		/* Decode batches too big for the caller alone and too many
		 * items for split-K, so results do not depend on who ran them. */
		struct acase c = {
			.dt = i == 1 ? KV_DTYPE_F16 : KV_DTYPE_F32, .group = 2, .n_kv_heads = 4,
			.d = 64, .t = 16, .n_seqs = 3, .n_tokens = { 150, 100, 80 },
			.n_queries = { 1, 1, 1 }, .threads = 3, .seed = 300 + (uint64_t)i,
		};
		struct kv_attn_plan pl;

		build(&c, &bt[i]);
		kv_attn_plan(&bt[i].job, 3, &pl);
		assert_int_equal(pl.max_parts, 1);
		run_job(&bt[i], 1);
		ac[i] = (struct attn_caller){ .bt = &bt[i], .rounds = 20 };
		for (uint32_t s = 0; s < c.n_seqs; s++) {
			size_t n = (size_t)c.n_queries[s] * bt[i].job.n_q_heads * c.d;

			ac[i].want[s] = malloc(n * sizeof(float));
			assert_non_null(ac[i].want[s]);
			memcpy(ac[i].want[s], bt[i].out[s], n * sizeof(float));
		}
	}
	for (int i = 0; i < 3; i++)
		assert_int_equal(pthread_create(&tid[i], NULL, attn_caller_main, &ac[i]), 0);
	for (int i = 0; i < 3; i++) {
		pthread_join(tid[i], NULL);
		assert_int_equal(ac[i].rc, 0);
		assert_int_equal(ac[i].mismatches, 0);
		for (uint32_t s = 0; s < bt[i].job.n_seqs; s++)
			free(ac[i].want[s]);
		free_built(&bt[i], 1);
	}
}

static int group_setup(void **state)
{
	(void)state;
	g_best = kv_kern_isa_cap(KV_KERN_AVX512);
	g_isa_count = 0;
	for (int i = 0; i <= (int)g_best; i++)
		g_isas[g_isa_count++] = (enum kv_kern_isa)i;
	printf("# kernel variants tested: %d (best %d)\n", g_isa_count, (int)g_best);
	for (uint32_t t = 1; t <= 4; t++)
		if (kv_tpool_create(t, &g_pool[t]) != 0)
			return -1;
	return 0;
}

static int group_teardown(void **state)
{
	(void)state;
	for (uint32_t t = 1; t <= 4; t++)
		kv_tpool_destroy(g_pool[t]);
	printf("# worst element error / bound %.3g, worst row norm-relative error %.3g\n",
	       g_worst_elem, g_worst_norm);
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_f16_specials),
		cmocka_unit_test(test_f16_exhaustive),
		cmocka_unit_test(test_bf16),
		cmocka_unit_test(test_quant),
		cmocka_unit_test(test_rows),
		cmocka_unit_test(test_tpool_basic),
		cmocka_unit_test(test_tpool_concurrent),
		cmocka_unit_test(test_plan),
		cmocka_unit_test(test_decode_f32),
		cmocka_unit_test(test_prefill_f32),
		cmocka_unit_test(test_windows),
		cmocka_unit_test(test_dtypes),
		cmocka_unit_test(test_split_k),
		cmocka_unit_test(test_stability),
		cmocka_unit_test(test_paged_vs_contiguous),
		cmocka_unit_test(test_attn_concurrent),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
