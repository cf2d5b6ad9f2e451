/* SPDX-License-Identifier: MIT */
/*
 * llm_matmul (examples/llama/matmul.h) against a naive double-precision
 * reference, on every kernel this machine runs (OpenBLAS, portable C,
 * AVX2, AVX-512, forced through llm_matmul_with()):
 *
 *  - every n from 1 to 70 over shapes with odd out and in (1, 3, 15, 16,
 *    17, 100, 773 = 768 + 5) and rows longer than one k tile (1025, 2053,
 *    5632), beta 0 (y full of NaN, which must not be read) and beta 1,
 *    x and W at 4-byte (not vector) alignment;
 *  - y untouched outside its (n, out) block: guard floats around it, and
 *    with a row stride ldy > out (llm_matmul_ld) the columns past out;
 *  - the same bits for 1, 2, 3 and 5 threads, and for several threads
 *    calling one pool at once (OpenBLAS, which does not promise this,
 *    only against the reference);
 *  - a row of y the same bits whatever the other rows of x (n 1 to 300,
 *    past the kernel's passes of 128 rows);
 *  - llm_matmul() and llm_matmul_ld() equal to llm_matmul_best()'s
 *    kernel, bit for bit;
 *    -ENOTSUP for a kernel that does not exist; n 0, out 0, in 0.
 *
 * Tolerance: f32 accumulation errs by a small multiple of epsilon times
 * the condition of the sum, |beta y| + sum_k |w_k x_k|, not times the
 * result (which cancels towards 0 for random signs). The check is
 * |got - ref| <= 1e-5 * (|ref| + |beta y| + sum_k |w_k x_k|).
 */
#include <cblas.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>

#include "kvtest.h"
#include "matmul.h"

#define TOL 1e-5
#define GUARD 16u              /* floats of guard on each side of y */
#define GUARD_VAL 12345.0f
#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

static uint64_t g_seed = 42;
static double g_worst;

struct shape {
	uint32_t n, out, in;
};

/* One problem: inputs, the reference and its error scale. */
struct prob {
	struct shape s;
	uint32_t ldy;              /* y's row stride in run() */
	float beta;
	float *wbuf, *xbuf, *y0;
	const float *w, *x;        /* wbuf + 1, xbuf + 1: not 16-byte aligned */
	double *ref, *scale;       /* (n, out) */
};

static float rnd(void)
{
	return (float)((double)(kv_test_rand(&g_seed) >> 11) * 0x1p-53 * 2.0 - 1.0);
}

static void prob_make(struct prob *p, struct shape s, float beta, uint32_t ldy)
{
	size_t ny = (size_t)s.n * s.out;

	p->s = s;
	p->ldy = ldy;
	p->beta = beta;
	p->wbuf = malloc(((size_t)s.out * s.in + 1) * sizeof(float));
	p->xbuf = malloc(((size_t)s.n * s.in + 1) * sizeof(float));
	p->y0 = malloc(ny * sizeof(float));
	p->ref = malloc(ny * sizeof(double));
	p->scale = malloc(ny * sizeof(double));
	assert_non_null(p->wbuf);
	assert_non_null(p->xbuf);
	assert_non_null(p->y0);
	assert_non_null(p->ref);
	assert_non_null(p->scale);
	p->w = p->wbuf + 1;
	p->x = p->xbuf + 1;
	for (size_t i = 0; i < (size_t)s.out * s.in + 1; i++)
		p->wbuf[i] = rnd();
	for (size_t i = 0; i < (size_t)s.n * s.in + 1; i++)
		p->xbuf[i] = rnd();
	for (size_t i = 0; i < ny; i++)
		p->y0[i] = beta == 0 ? NAN : rnd();
	for (uint32_t r = 0; r < s.n; r++)
		for (uint32_t o = 0; o < s.out; o++) {
			const float *wr = p->w + (size_t)o * s.in, *xr = p->x + (size_t)r * s.in;
			size_t i = (size_t)r * s.out + o;
			double acc = beta == 0 ? 0 : (double)beta * p->y0[i];
			double sc = fabs(acc);

			for (uint32_t k = 0; k < s.in; k++) {
				acc += (double)wr[k] * xr[k];
				sc += fabs((double)wr[k] * xr[k]);
			}
			p->ref[i] = acc;
			p->scale[i] = sc;
		}
}

static void prob_free(struct prob *p)
{
	free(p->wbuf);
	free(p->xbuf);
	free(p->y0);
	free(p->ref);
	free(p->scale);
}

/* Run kernel k with `threads` threads on p into a fresh guarded y of
 * row stride p->ldy; the result (n, out) is copied to out. */
static void run(const struct prob *p, enum llm_matmul_kernel k, uint32_t threads, float *out)
{
	uint32_t n = p->s.n, nc = p->s.out, ld = p->ldy;
	size_t ny = (size_t)n * ld;
	float *buf = malloc((ny + 2 * GUARD) * sizeof(float)), *y = buf + GUARD;

	assert_non_null(buf);
	for (size_t i = 0; i < ny + 2 * GUARD; i++)
		buf[i] = GUARD_VAL;
	for (uint32_t r = 0; r < n; r++)
		memcpy(y + (size_t)r * ld, p->y0 + (size_t)r * nc, nc * sizeof(float));
	if (k == LLM_MM_BLAS)
		openblas_set_num_threads((int)threads);
	kv_assert_ok(llm_matmul_with(k, n, nc, p->s.in, p->w, p->x, y, ld, p->beta, threads));
	for (size_t i = 0; i < ny + 2 * GUARD; i++) {
		bool inside = i >= GUARD && i < GUARD + ny && (i - GUARD) % ld < nc;

		if (!inside && buf[i] != GUARD_VAL)
			fail_msg("%s n %u out %u in %u ldy %u: wrote outside y",
				 llm_matmul_kernel_name(k), n, nc, p->s.in, ld);
	}
	for (uint32_t r = 0; r < n; r++)
		memcpy(out + (size_t)r * nc, y + (size_t)r * ld, nc * sizeof(float));
	free(buf);
}

static void check_ref(const struct prob *p, enum llm_matmul_kernel k, const float *got)
{
	for (uint32_t r = 0; r < p->s.n; r++)
		for (uint32_t o = 0; o < p->s.out; o++) {
			size_t i = (size_t)r * p->s.out + o;
			double bound = fabs(p->ref[i]) + p->scale[i];
			double err = fabs((double)got[i] - p->ref[i]);

			if (!(err <= TOL * bound))
				fail_msg("%s n %u out %u in %u beta %g: y[%u][%u] = %.9g, want %.9g "
					 "(error %.3g of scale %.3g)", llm_matmul_kernel_name(k),
					 p->s.n, p->s.out, p->s.in, (double)p->beta, r, o,
					 (double)got[i], p->ref[i], err, bound);
			if (bound > 0 && err / bound > g_worst)
				g_worst = err / bound;
		}
}

static void check_same(const struct prob *p, enum llm_matmul_kernel k, uint32_t threads,
		       const float *a, const float *b)
{
	size_t ny = (size_t)p->s.n * p->s.out;

	if (memcmp(a, b, ny * sizeof(float)) != 0)
		fail_msg("%s n %u out %u in %u beta %g: %u threads differ from 1 thread",
			 llm_matmul_kernel_name(k), p->s.n, p->s.out, p->s.in, (double)p->beta,
			 threads);
}

/* Every kernel on p against the reference, and with each thread count
 * of threads[] (the first being 1) against the first, bit for bit. */
static void check_prob(const struct prob *p, const uint32_t *threads, size_t n_threads)
{
	size_t ny = (size_t)p->s.n * p->s.out;
	float *first = malloc(ny * sizeof(float)), *got = malloc(ny * sizeof(float));

	assert_non_null(first);
	assert_non_null(got);
	for (int k = 0; k < LLM_MM_KERNELS; k++) {
		if (!llm_matmul_supported(k))
			continue;
		run(p, k, threads[0], first);
		check_ref(p, k, first);
		for (size_t t = 1; t < n_threads && k != LLM_MM_BLAS; t++) {
			run(p, k, threads[t], got);
			check_same(p, k, threads[t], first, got);
		}
	}
	openblas_set_num_threads(1);
	free(first);
	free(got);
}

/* Both betas; beta 1 with a row stride past out. */
static void check_shape(struct shape s, const uint32_t *threads, size_t n_threads)
{
	for (int b = 0; b < 2; b++) {
		struct prob p;

		prob_make(&p, s, (float)b, b ? s.out + 3 : s.out);
		check_prob(&p, threads, n_threads);
		prob_free(&p);
	}
}

/* Every n from 1 to 70 (decode batches; tile edges of every width) on
 * small and odd shapes. */
static void test_every_n(void **state)
{
	static const struct shape shapes[] = {
		{ 0, 1, 1 }, { 0, 3, 17 }, { 0, 17, 3 }, { 0, 5, 100 }, { 0, 100, 16 },
		{ 0, 7, 773 }, { 0, 33, 15 }, { 0, 45, 200 },
	};
	static const uint32_t threads[] = { 1, 2 };

	(void)state;
	for (size_t i = 0; i < NELEM(shapes); i++)
		for (uint32_t n = 1; n <= 70; n++) {
			struct shape s = shapes[i];

			s.n = n;
			check_shape(s, threads, NELEM(threads));
		}
	printf("worst error / scale: %.3g\n", g_worst);
}

/* Rows longer than one k tile (the kernel's tiles of at most 1024), and
 * the 1B model's w2 (in 5632). */
static void test_long_rows(void **state)
{
	static const uint32_t ns[] = { 1, 2, 5, 8, 13, 32, 70 };
	static const uint32_t outs[] = { 9, 67 };
	static const uint32_t ins[] = { 1025, 2053, 5632 };
	static const uint32_t threads[] = { 1, 2 };

	(void)state;
	for (size_t a = 0; a < NELEM(ns); a++)
		for (size_t b = 0; b < NELEM(outs); b++)
			for (size_t c = 0; c < NELEM(ins); c++)
				check_shape((struct shape){ ns[a], outs[b], ins[c] }, threads,
					    NELEM(threads));
	printf("worst error / scale: %.3g\n", g_worst);
}

/* More thread counts, on shapes big enough to be split (small products
 * run on the caller alone): odd counts give runs of rows that end in
 * other places. */
static void test_thread_counts(void **state)
{
	static const struct shape shapes[] = {
		{ 8, 768, 768 }, { 32, 203, 773 }, { 3, 1001, 100 }, { 64, 100, 1100 },
	};
	static const uint32_t threads[] = { 1, 2, 3, 5 };

	(void)state;
	for (size_t i = 0; i < NELEM(shapes); i++)
		check_shape(shapes[i], threads, NELEM(threads));
}

/* llm_matmul() is llm_matmul_best()'s kernel, and a row of y does not
 * depend on the other rows of x: each row of a 300-row product equals
 * that row alone. */
static void test_best(void **state)
{
	enum llm_matmul_kernel best = llm_matmul_best();
	struct prob p;
	size_t ny;
	float *a, *b, *row, *wide;

	(void)state;
	printf("best kernel: %s\n", llm_matmul_kernel_name(best));
	assert_true(best != LLM_MM_BLAS && llm_matmul_supported(best));
	prob_make(&p, (struct shape){ 300, 40, 96 }, 1, 40);
	ny = (size_t)p.s.n * p.s.out;
	a = malloc(ny * sizeof(float));
	b = malloc(ny * sizeof(float));
	row = malloc(p.s.out * sizeof(float));
	assert_non_null(a);
	assert_non_null(b);
	assert_non_null(row);
	memcpy(a, p.y0, ny * sizeof(float));
	llm_matmul(p.s.n, p.s.out, p.s.in, p.w, p.x, a, 1, 2);
	run(&p, best, 2, b);
	assert_memory_equal(a, b, ny * sizeof(float));
	check_ref(&p, best, a);
	/* llm_matmul_ld into the first 40 columns of (300, 45), the rest 0. */
	wide = calloc((size_t)p.s.n * 45, sizeof(float));
	assert_non_null(wide);
	for (uint32_t r = 0; r < p.s.n; r++)
		memcpy(wide + (size_t)r * 45, p.y0 + (size_t)r * p.s.out, p.s.out * sizeof(float));
	llm_matmul_ld(p.s.n, p.s.out, p.s.in, p.w, p.x, wide, 45, 1, 2);
	for (uint32_t r = 0; r < p.s.n; r++) {
		assert_memory_equal(wide + (size_t)r * 45, b + (size_t)r * p.s.out,
				    p.s.out * sizeof(float));
		for (uint32_t c = p.s.out; c < 45; c++)
			assert_true(wide[(size_t)r * 45 + c] == 0);
	}
	free(wide);
	for (int k = LLM_MM_GENERIC; k < LLM_MM_KERNELS; k++) {
		if (!llm_matmul_supported(k))
			continue;
		run(&p, k, 2, b);
		for (uint32_t r = 0; r < p.s.n; r++) {
			memcpy(row, p.y0 + (size_t)r * p.s.out, p.s.out * sizeof(float));
			kv_assert_ok(llm_matmul_with(k, 1, p.s.out, p.s.in, p.w,
						     p.x + (size_t)r * p.s.in, row, p.s.out, 1, 1));
			if (memcmp(row, b + (size_t)r * p.s.out, p.s.out * sizeof(float)))
				fail_msg("%s: row %u of 300 differs from that row alone",
					 llm_matmul_kernel_name(k), r);
		}
	}
	free(a);
	free(b);
	free(row);
	prob_free(&p);
}

/* A kernel that does not exist is refused; empty products write
 * nothing; in 0 gives beta y. */
static void test_edges(void **state)
{
	float yv[4] = { 1, 2, 3, 4 }, wv[1] = { 5 }, xv[1] = { 6 };

	(void)state;
	assert_false(llm_matmul_supported(LLM_MM_KERNELS));
	assert_int_equal(llm_matmul_with(LLM_MM_KERNELS, 1, 1, 1, wv, xv, yv, 1, 0, 1), -ENOTSUP);
	assert_int_equal(llm_matmul_with(LLM_MM_GENERIC, 2, 2, 1, wv, xv, yv, 1, 0, 1), -EINVAL);
	assert_true(yv[0] == 1);
	assert_string_equal(llm_matmul_kernel_name(LLM_MM_KERNELS), "?");
	for (int k = 0; k < LLM_MM_KERNELS; k++) {
		float y2[4] = { 1, 2, 3, 4 };

		if (!llm_matmul_supported(k))
			continue;
		kv_assert_ok(llm_matmul_with(k, 0, 4, 1, wv, xv, y2, 4, 0, 2));
		kv_assert_ok(llm_matmul_with(k, 4, 0, 1, wv, xv, y2, 4, 0, 2));
		assert_true(y2[0] == 1 && y2[3] == 4);
		kv_assert_ok(llm_matmul_with(k, 2, 2, 0, wv, xv, y2, 2, 1, 2));
		assert_true(y2[0] == 1 && y2[3] == 4);
		kv_assert_ok(llm_matmul_with(k, 2, 1, 0, wv, xv, y2, 2, 0, 2));
		assert_true(y2[0] == 0 && y2[1] == 2 && y2[2] == 0 && y2[3] == 4);
	}
}

/* Several threads calling llm_matmul at once with the same thread count
 * (one pool, so most calls find it busy and run on their caller), each
 * result the same bits as a serial run. */
struct caller {
	const struct prob *p;
	enum llm_matmul_kernel k;
	const float *want;
	int mismatches;
};

static void *caller_main(void *arg)
{
	struct caller *c = arg;
	size_t ny = (size_t)c->p->s.n * c->p->s.out;
	float *y = malloc(ny * sizeof(float));

	if (!y)
		return NULL;
	for (int it = 0; it < 20; it++) {
		memcpy(y, c->p->y0, ny * sizeof(float));
		llm_matmul_with(c->k, c->p->s.n, c->p->s.out, c->p->s.in, c->p->w, c->p->x, y,
				c->p->s.out, c->p->beta, 2);
		if (memcmp(y, c->want, ny * sizeof(float)) != 0)
			c->mismatches++;
	}
	free(y);
	return NULL;
}

static void test_concurrent(void **state)
{
	struct prob p;
	size_t ny;

	(void)state;
	prob_make(&p, (struct shape){ 16, 300, 773 }, 1, 300);
	ny = (size_t)p.s.n * p.s.out;
	for (int k = LLM_MM_GENERIC; k < LLM_MM_KERNELS; k++) {
		struct caller c[4];
		pthread_t tid[4];
		float *want = malloc(ny * sizeof(float));

		if (!llm_matmul_supported(k)) {
			free(want);
			continue;
		}
		assert_non_null(want);
		run(&p, k, 1, want);
		for (int i = 0; i < 4; i++) {
			c[i] = (struct caller){ .p = &p, .k = k, .want = want };
			assert_int_equal(pthread_create(&tid[i], NULL, caller_main, &c[i]), 0);
		}
		for (int i = 0; i < 4; i++) {
			assert_int_equal(pthread_join(tid[i], NULL), 0);
			assert_int_equal(c[i].mismatches, 0);
		}
		free(want);
	}
	prob_free(&p);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_edges),
		cmocka_unit_test(test_best),
		cmocka_unit_test(test_every_n),
		cmocka_unit_test(test_long_rows),
		cmocka_unit_test(test_thread_counts),
		cmocka_unit_test(test_concurrent),
	};

	for (int k = 0; k < LLM_MM_KERNELS; k++)
		printf("kernel %s: %s\n", llm_matmul_kernel_name(k),
		       llm_matmul_supported(k) ? "tested" : "not supported here");
	openblas_set_num_threads(1);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
