/* SPDX-License-Identifier: MIT */
/*
 * kv_attention through the cache against a plain contiguous reference in
 * double precision, for every storage dtype, GQA group sizes 1, 2 and 4,
 * decode batches and causal prefill, forked sequences sharing blocks, a
 * sliding window, and several thread counts. Two references per case:
 * one over the K/V as read back from the cache (every dtype must match
 * it within 1e-5 relative: the kernel reads the blocks correctly), one
 * over the f32 values written (the storage error, within the bound
 * <kv/cache.h> states for the dtype).
 */
#include <math.h>
#include <string.h>

#include "kvtest.h"

#define L 2
#define MAXH 4
#define MAXD 64
#define MAXQ 16
#define MAXLEN 320

struct shape {
	uint32_t h, d, group, t;
	enum kv_dtype dt;
	uint32_t window, threads;
};

/* The K/V a test writes: what the reference uses as "written". */
struct seqdata {
	kv_seq_id id;
	uint32_t len;
	float k[L][MAXLEN][MAXH * MAXD], v[L][MAXLEN][MAXH * MAXD];
};

static uint64_t rng;

static float frand(float amp)
{
	return amp * ((float)(kv_test_rand(&rng) % 20001) / 10000.0f - 1.0f);
}

/* out[qh][d] for one query at position p of one layer, from K/V arrays
 * (len, h * d); keys (p - window, p]. Also the worst score error bound
 * terms: the L1 norm of q for the storage bound. */
static void reference(const struct shape *sh, float (*k)[MAXH * MAXD], float (*v)[MAXH * MAXD],
		      const float *q, uint32_t p, double *out)
{
	uint32_t qh = sh->h * sh->group, lo = sh->window && p + 1 > sh->window ?
						       p + 1 - sh->window : 0;
	double scale = 1.0 / sqrt((double)sh->d);

	for (uint32_t h = 0; h < qh; h++) {
		uint32_t kh = h / sh->group;
		double mx = -INFINITY, sum = 0, s[MAXLEN], acc[MAXD] = { 0 };

		for (uint32_t t = lo; t <= p; t++) {
			s[t] = 0;
			for (uint32_t e = 0; e < sh->d; e++)
				s[t] += (double)q[h * sh->d + e] * k[t][kh * sh->d + e];
			s[t] *= scale;
			mx = fmax(mx, s[t]);
		}
		for (uint32_t t = lo; t <= p; t++) {
			double w = exp(s[t] - mx);

			sum += w;
			for (uint32_t e = 0; e < sh->d; e++)
				acc[e] += w * v[t][kh * sh->d + e];
		}
		for (uint32_t e = 0; e < sh->d; e++)
			out[h * sh->d + e] = acc[e] / sum;
	}
}

/* Per-element storage error bound of the dtype, relative to `mag` (the
 * element itself for f16/bf16, the largest magnitude of its block and
 * head for INT8), as <kv/cache.h> states it. */
static double storage_eps(enum kv_dtype dt)
{
	switch (dt) {
	case KV_DTYPE_F16:
		return 1.0 / 2048;
	case KV_DTYPE_BF16:
		return 1.0 / 256;
	case KV_DTYPE_I8:
		return 2.0 / 127;
	default:
		return 0;
	}
}

/* Write [t, t + n) of layer l from the padded arrays, packed as the
 * cache takes them: (n, h * d). */
static void write_rows(struct kv_cache *c, const struct seqdata *s, uint32_t l, uint32_t t,
		       uint32_t n, uint32_t row)
{
	static float pk[MAXLEN * MAXH * MAXD], pv[MAXLEN * MAXH * MAXD];

	for (uint32_t j = 0; j < n; j++) {
		memcpy(pk + (size_t)j * row, s->k[l][t + j], sizeof(float) * row);
		memcpy(pv + (size_t)j * row, s->v[l][t + j], sizeof(float) * row);
	}
	kv_assert_ok(kv_seq_write(c, s->id, l, t, n, pk, pv));
}

/* Each stored element is within the dtype's bound of what was written:
 * eps * |x| for f16 and bf16 (plus the f16 subnormal step), eps * the
 * largest |x| of its (block, head) for INT8. */
static void check_storage(const struct shape *sh, const struct seqdata *s, uint32_t l,
			  uint32_t lo, float (*sk)[MAXH * MAXD], float (*sv)[MAXH * MAXD])
{
	const double eps = storage_eps(sh->dt);

	for (int kv = 0; kv < 2; kv++) {
		const float (*w)[MAXH * MAXD] = kv ? s->v[l] : s->k[l];
		float (*g)[MAXH * MAXD] = kv ? sv : sk;

		for (uint32_t t = lo; t < s->len; t++)
			for (uint32_t h = 0; h < sh->h; h++) {
				double amax = 0;

				for (uint32_t u = t / sh->t * sh->t; u < (t / sh->t + 1) * sh->t &&
								     u < s->len; u++)
					for (uint32_t e = 0; e < sh->d; e++)
						amax = fmax(amax, fabs(w[u][h * sh->d + e]));
				for (uint32_t e = 0; e < sh->d; e++) {
					double x = w[t][h * sh->d + e];
					double err = fabs(g[t][h * sh->d + e] - x);
					double bound = eps * (sh->dt == KV_DTYPE_I8 ? amax : fabs(x)) + 1e-7;

					if (err > bound)
						fail_msg("%s: stored %g for %g at t %u: error %g > %g",
							 kv_dtype_name(sh->dt), g[t][h * sh->d + e], x, t, err,
							 bound);
				}
			}
	}
}

static void run_shape(const struct shape *sh)
{
	static struct seqdata sd[6];
	static float rk[MAXLEN * MAXH * MAXD], rv[MAXLEN * MAXH * MAXD];
	static float stored_k[L][MAXLEN][MAXH * MAXD], stored_v[L][MAXLEN][MAXH * MAXD];
	const uint32_t lens[6] = { 1, 15, 16, 17, 100, 300 };
	const uint32_t row = sh->h * sh->d, qh = sh->h * sh->group;
	struct kv_cache_config cfg;
	struct kv_cache *c;
	float *q, *out;
	double ref[MAXH * 4 * MAXD], worst_exact = 0, worst_store = 0;
	int32_t tok[MAXLEN];
	uint32_t i, l;

	kv_cache_config_default(&cfg);
	cfg.n_layers = L;
	cfg.n_kv_heads = sh->h;
	cfg.head_dim = sh->d;
	cfg.block_tokens = sh->t;
	cfg.dtype = sh->dt;
	cfg.capacity_blocks = 512;
	cfg.threads = sh->threads;
	cfg.window = sh->window;
	kv_assert_ok(kv_cache_create(&cfg, &c));
	q = malloc(sizeof(float) * MAXQ * qh * sh->d * 6);
	out = malloc(sizeof(float) * MAXQ * qh * sh->d * 6);
	/* Six sequences; the last forks the fifth halfway and diverges
	 * (without a window: a fork's truncation would need released keys). */
	for (i = 0; i < 6; i++) {
		struct seqdata *s = &sd[i];
		uint32_t from = 0;

		s->len = lens[i];
		for (uint32_t t = 0; t < s->len; t++)
			tok[t] = (int32_t)(i * 1000 + t);
		for (l = 0; l < L; l++)
			for (uint32_t t = 0; t < s->len; t++)
				for (uint32_t e = 0; e < row; e++) {
					/* Magnitudes vary by token, so INT8 scales grow. */
					s->k[l][t][e] = frand(1.0f + (float)(t % 7));
					s->v[l][t][e] = frand(2.0f);
				}
		if (i == 5 && !sh->window) {
			kv_assert_ok(kv_seq_truncate(c, sd[4].id, 100));
			sd[4].len = 100;
			kv_assert_ok(kv_seq_fork(c, sd[4].id, &s->id));
			from = 50;
			for (l = 0; l < L; l++) {
				memcpy(s->k[l], sd[4].k[l], sizeof(s->k[l][0]) * from);
				memcpy(s->v[l], sd[4].v[l], sizeof(s->v[l][0]) * from);
			}
			kv_assert_ok(kv_seq_truncate(c, s->id, from));
		} else {
			kv_assert_ok(kv_seq_create(c, NULL, &s->id));
		}
		if (sh->window) {
			/* A token at a time, as decode does: the window releases
			 * blocks as it slides. */
			for (uint32_t t = 0; t < s->len; t++) {
				kv_assert_ok(kv_seq_append(c, s->id, tok + t, 1));
				for (l = 0; l < L; l++)
					kv_assert_ok(kv_seq_write(c, s->id, l, t, 1, s->k[l][t],
								  s->v[l][t]));
			}
			continue;
		}
		kv_assert_ok(kv_seq_append(c, s->id, tok + from, s->len - from));
		for (l = 0; l < L; l++) {
			/* Written in uneven pieces. */
			for (uint32_t t = from; t < s->len;) {
				uint32_t n = 1 + (uint32_t)(kv_test_rand(&rng) % 37);

				if (t + n > s->len)
					n = s->len - t;
				write_rows(c, s, l, t, n, row);
				t += n;
			}
		}
	}
	kv_assert_ok(kv_cache_validate(c));

	for (l = 0; l < L; l++) {
		for (int prefill = 0; prefill < 2; prefill++) {
			kv_seq_id ids[6];
			uint32_t nq[6], off = 0;
			struct kv_attn_batch b = { 0 };

			for (i = 0; i < 6; i++) {
				ids[i] = sd[i].id;
				nq[i] = prefill ? (sd[i].len < MAXQ ? sd[i].len : MAXQ) : 1;
				/* With a window, queries may not reach released keys. */
				if (sh->window && nq[i] > 1)
					nq[i] = 1;
			}
			for (i = 0; i < MAXQ * qh * sh->d * 6; i++)
				q[i] = frand(1.0f);
			b.n_seqs = 6;
			b.seqs = ids;
			b.n_queries = nq;
			b.n_q_heads = qh;
			b.q = q;
			b.out = out;
			kv_assert_ok(kv_attention(c, l, &b));
			for (i = 0; i < 6; i++) {
				struct seqdata *s = &sd[i];
				struct kv_seq_info info;
				uint32_t lo = 0;

				kv_assert_ok(kv_seq_info(c, s->id, &info));
				lo = info.released;
				/* What the cache stores, read back. */
				kv_assert_ok(kv_seq_read(c, s->id, l, lo, s->len - lo, rk, rv));
				for (uint32_t t = lo; t < s->len; t++) {
					memcpy(stored_k[l][t], rk + (size_t)(t - lo) * row,
					       sizeof(float) * row);
					memcpy(stored_v[l][t], rv + (size_t)(t - lo) * row,
					       sizeof(float) * row);
				}
				check_storage(sh, s, l, lo, stored_k[l], stored_v[l]);
				for (uint32_t j = 0; j < nq[i]; j++) {
					uint32_t p = s->len - nq[i] + j;
					const float *qq = q + (size_t)(off + j) * qh * sh->d;
					const float *o = out + (size_t)(off + j) * qh * sh->d;
					double vmax = 0, kmax_err = 0, vmax_err = 0;

					/* Relative to the largest visible value: an output is
					 * an average of values, so that is its scale (an
					 * element near 0 comes from cancellation). */
					double vscale = 0;

					for (uint32_t t = (sh->window && p + 1 > sh->window ?
							   p + 1 - sh->window : 0); t <= p; t++)
						for (uint32_t e = 0; e < row; e++)
							vscale = fmax(vscale, fabs(stored_v[l][t][e]));
					reference(sh, stored_k[l], stored_v[l], qq, p, ref);
					for (uint32_t e = 0; e < qh * sh->d; e++) {
						double err = fabs(o[e] - ref[e]) / (vscale + 1e-30);

						if (err > 1e-5)
							fail_msg("%s h %u d %u g %u: seq %u query %u elem %u: %g "
								 "vs stored-data reference %g", kv_dtype_name(sh->dt),
								 sh->h, sh->d, sh->group, i, j, e, o[e], ref[e]);
						worst_exact = fmax(worst_exact, err);
					}
					/* Storage bound: score error of head h is at most
					 * scale * sum_e |q_e| * max |dk|; weights move by at
					 * most exp(2 ds) - 1; values by max |dv|. */
					for (uint32_t t = lo; t <= p; t++)
						for (uint32_t e = 0; e < row; e++) {
							vmax = fmax(vmax, fabs(s->v[l][t][e]));
							kmax_err = fmax(kmax_err, fabs(stored_k[l][t][e] -
											s->k[l][t][e]));
							vmax_err = fmax(vmax_err, fabs(stored_v[l][t][e] -
											s->v[l][t][e]));
						}
					reference(sh, s->k[l], s->v[l], qq, p, ref);
					for (uint32_t h = 0; h < qh; h++) {
						double q1 = 0, ds, bound;

						for (uint32_t e = 0; e < sh->d; e++)
							q1 += fabs(qq[h * sh->d + e]);
						ds = q1 * kmax_err / sqrt((double)sh->d);
						bound = vmax_err + (exp(2 * ds) - 1) * (vmax + vmax_err) + 1e-5;
						for (uint32_t e = 0; e < sh->d; e++) {
							double err = fabs(o[h * sh->d + e] - ref[h * sh->d + e]);

							if (err > bound)
								fail_msg("%s: seq %u query %u: error %g over the bound "
									 "%g", kv_dtype_name(sh->dt), i, j, err, bound);
							worst_store = fmax(worst_store, err / (vmax + 1e-30));
						}
					}
				}
				off += nq[i];
			}
		}
	}
	print_message("%-4s kv heads %u, head_dim %u, group %u, block %u, window %u, threads %u: "
		      "vs stored %.2g, vs written %.2g of max |v|\n", kv_dtype_name(sh->dt), sh->h,
		      sh->d, sh->group, sh->t, sh->window, sh->threads, worst_exact, worst_store);
	for (i = 0; i < 6; i++)
		kv_assert_ok(kv_seq_free(c, sd[i].id));
	kv_assert_ok(kv_cache_validate(c));
	kv_assert_ok(kv_cache_destroy(c));
	free(q);
	free(out);
}

static void test_dtypes_gqa(void **state)
{
	const enum kv_dtype dts[4] = { KV_DTYPE_F32, KV_DTYPE_F16, KV_DTYPE_BF16, KV_DTYPE_I8 };
	const struct { uint32_t h, d, group; } shapes[3] = { { 4, 16, 1 }, { 2, 64, 4 }, { 2, 48, 2 } };

	(void)state;
	rng = 42;
	for (int s = 0; s < 3; s++)
		for (int i = 0; i < 4; i++) {
			struct shape sh = { shapes[s].h, shapes[s].d, shapes[s].group, 16, dts[i], 0,
					    (uint32_t)(1 + (s + i) % 3) };

			run_shape(&sh);
		}
}

static void test_block_sizes_window(void **state)
{
	(void)state;
	rng = 7;
	for (uint32_t t = 1; t <= 32; t = t * 4 + 1) {
		struct shape sh = { 2, 16, 2, t, KV_DTYPE_F32, 0, 2 };

		run_shape(&sh);
	}
	for (uint32_t w = 1; w <= 64; w *= 4) {
		struct shape sh = { 2, 16, 2, 8, KV_DTYPE_F16, w, 2 };

		run_shape(&sh);
	}
}

/* Calls the kernel must refuse, with nothing written to out. */
static void test_bad_batches(void **state)
{
	struct kv_cache_config cfg;
	struct kv_cache *c;
	float kv[8 * 2 * 16] = { 0 }, q[6 * 16] = { 0 }, out[6 * 16];
	int32_t tok[8] = { 1, 2, 3, 4, 5, 6, 7, 8 };
	struct kv_attn_batch b = { 0 };
	uint32_t nq = 1;
	kv_seq_id s, dead;

	(void)state;
	kv_cache_config_default(&cfg);
	cfg.n_layers = 2;
	cfg.n_kv_heads = 2;
	cfg.head_dim = 16;
	cfg.capacity_blocks = 8;
	cfg.threads = 1;
	kv_assert_ok(kv_cache_create(&cfg, &c));
	kv_assert_ok(kv_seq_create(c, NULL, &s));
	kv_assert_ok(kv_seq_append(c, s, tok, 8));
	kv_assert_ok(kv_seq_write(c, s, 0, 0, 8, kv, kv));
	kv_assert_ok(kv_seq_create(c, NULL, &dead));
	kv_assert_ok(kv_seq_free(c, dead));
	memset(out, 0x7f, sizeof(out));
	b.n_seqs = 1;
	b.seqs = &s;
	b.n_q_heads = 2;
	b.q = q;
	b.out = out;
	kv_assert_rc(kv_attention(c, 1, &b), -EINVAL);   /* layer 1 not written */
	kv_assert_rc(kv_attention(c, 2, &b), -EINVAL);   /* no layer 2 */
	b.n_q_heads = 3;
	kv_assert_rc(kv_attention(c, 0, &b), -EINVAL);   /* not a multiple of 2 */
	b.n_q_heads = 2;
	nq = 9;
	b.n_queries = &nq;
	kv_assert_rc(kv_attention(c, 0, &b), -EINVAL);   /* more queries than tokens */
	b.n_queries = NULL;
	b.seqs = &dead;
	kv_assert_rc(kv_attention(c, 0, &b), -ENOENT);
	b.seqs = &s;
	b.scale = -1;
	kv_assert_rc(kv_attention(c, 0, &b), -EINVAL);
	for (size_t i = 0; i < sizeof(out); i++)
		assert_int_equal(((unsigned char *)out)[i], 0x7f);
	b.scale = 0;
	kv_assert_ok(kv_attention(c, 0, &b));
	kv_assert_ok(kv_cache_destroy(c));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_dtypes_gqa),
		cmocka_unit_test(test_block_sizes_window),
		cmocka_unit_test(test_bad_batches),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
