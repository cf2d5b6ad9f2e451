/* SPDX-License-Identifier: MIT */
/*
 * The engine's forward pass against a reference written here and sharing
 * nothing with it: its own reader of the llama2.c checkpoint (fopen and
 * fread, the tensors walked in file order), contiguous KV arrays and
 * plain loops in double with the math of llama2.c's run.c (RMSNorm eps
 * 1e-5, RoPE on interleaved pairs, GQA, SwiGLU, shared or separate
 * classifier). Two models: the synthetic 260K (GQA 8/4, shared
 * classifier) and a GQA 8/2 model with its own classifier; engines with
 * 1 and 2 threads. Token by token, prefill then decode, three prompts of
 * different lengths in one batch, three long ones (chunked across passes;
 * blocks of 16 and 7 tokens); and the f16, bf16 and int8 KV caches under
 * teacher forcing, within tolerances measured here.
 */
#include <errno.h>

#include "llamatest.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the reference reads the checkpoint's little-endian values as host values"
#endif

/* f32 KV: the engine's logits are within REL_TOL of the reference's in the
 * relative criterion max|a - b| <= REL_TOL * max(1, max|ref|): the bound
 * scales with large logits and is REL_TOL absolute for small ones. float
 * sums of a few hundred terms are good to ~1e-6 here, so 1e-4 leaves room
 * for any summation order and still catches a wrong operation. */
#define REL_TOL 1e-4
#define DECODE_STEPS 64
#define DTYPE_STEPS 32

/* The checkpoint as this file reads it. */
struct ref_model {
	int32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
	bool shared;             /* the header's vocab_size was positive */
	int32_t head_size, kv_dim;
	float *data;             /* every float after the header */
	const float *emb;        /* (vocab, dim) */
	const float *rms_att;    /* (layer, dim) */
	const float *wq;         /* (layer, dim, dim) */
	const float *wk;         /* (layer, kv_dim, dim) */
	const float *wv;         /* (layer, kv_dim, dim) */
	const float *wo;         /* (layer, dim, dim) */
	const float *rms_ffn;    /* (layer, dim) */
	const float *w1;         /* (layer, hidden_dim, dim) */
	const float *w2;         /* (layer, dim, hidden_dim) */
	const float *w3;         /* (layer, hidden_dim, dim) */
	const float *rms_final;  /* (dim) */
	const float *cls;        /* (vocab, dim): emb when shared */
};

/* One sequence of the reference. */
struct ref_state {
	const struct ref_model *m;
	int32_t pos;             /* tokens run so far */
	double *key_cache;       /* (layer, seq_len, kv_dim) */
	double *value_cache;     /* (layer, seq_len, kv_dim) */
	double *x, *xb, *xb2, *q; /* (dim) each */
	double *hb, *hb2;        /* (hidden_dim) each */
	double *att;             /* (seq_len) */
	double *logits;          /* (vocab) */
};

/* A model under test: its checkpoint and the reference's copy of it. */
struct model_case {
	const char *name;
	char path[4096];
	struct ref_model ref;
};

static char scratch[4096];
static double worst_f32;         /* the largest f32 error expect_match saw */
static struct model_case cases[2] = { { .name = "260K" }, { .name = "gqa-8-2-unshared" } };

/* Take n floats from the file's tensors at *at. */
static const float *take(const struct ref_model *m, size_t *at, size_t n)
{
	const float *p = m->data + *at;

	*at += n;
	return p;
}

static void ref_load(struct ref_model *m, const char *path)
{
	FILE *f = fopen(path, "rb");
	int32_t h[7];
	size_t L, dim, hid, kvd, voc, want, at = 0;
	long size;

	if (!f)
		fail_msg("fopen(%s): %s", path, strerror(errno));
	assert_int_equal(fread(h, sizeof(int32_t), 7, f), 7);
	m->dim = h[0];
	m->hidden_dim = h[1];
	m->n_layers = h[2];
	m->n_heads = h[3];
	m->n_kv_heads = h[4];
	m->shared = h[5] > 0;
	m->vocab_size = h[5] > 0 ? h[5] : -h[5];
	m->seq_len = h[6];
	for (int i = 0; i < 7; i++)
		assert_true(h[i] != 0 && h[i] < (1 << 20) && h[i] > -(1 << 20));
	assert_int_equal(m->dim % m->n_heads, 0);
	assert_int_equal(m->n_heads % m->n_kv_heads, 0);
	m->head_size = m->dim / m->n_heads;
	m->kv_dim = m->n_kv_heads * m->head_size;

	L = (size_t)m->n_layers;
	dim = (size_t)m->dim;
	hid = (size_t)m->hidden_dim;
	kvd = (size_t)m->kv_dim;
	voc = (size_t)m->vocab_size;
	want = voc * dim + L * dim * 2 + L * dim * dim * 2 + L * kvd * dim * 2 +
	       L * hid * dim * 3 + dim + (size_t)m->seq_len * (size_t)m->head_size +
	       (m->shared ? 0 : voc * dim);
	assert_int_equal(fseek(f, 0, SEEK_END), 0);
	size = ftell(f);
	assert_int_equal((size_t)size, 28 + want * sizeof(float));
	assert_int_equal(fseek(f, 28, SEEK_SET), 0);
	m->data = malloc(want * sizeof(float));
	assert_non_null(m->data);
	assert_int_equal(fread(m->data, sizeof(float), want, f), want);
	fclose(f);

	/* File order, as llama2.c's memory_map_weights walks it. */
	m->emb = take(m, &at, voc * dim);
	m->rms_att = take(m, &at, L * dim);
	m->wq = take(m, &at, L * dim * dim);
	m->wk = take(m, &at, L * kvd * dim);
	m->wv = take(m, &at, L * kvd * dim);
	m->wo = take(m, &at, L * dim * dim);
	m->rms_ffn = take(m, &at, L * dim);
	m->w1 = take(m, &at, L * hid * dim);
	m->w2 = take(m, &at, L * dim * hid);
	m->w3 = take(m, &at, L * hid * dim);
	m->rms_final = take(m, &at, dim);
	/* The two legacy RoPE tables (freq_cis_real, freq_cis_imag). */
	take(m, &at, (size_t)m->seq_len * (size_t)m->head_size / 2);
	take(m, &at, (size_t)m->seq_len * (size_t)m->head_size / 2);
	m->cls = m->shared ? m->emb : take(m, &at, voc * dim);
	assert_int_equal(at, want);
}

static double *dalloc(size_t n)
{
	double *p = calloc(n, sizeof(double));

	assert_non_null(p);
	return p;
}

static void ref_init(struct ref_state *s, const struct ref_model *m)
{
	size_t kv = (size_t)m->n_layers * (size_t)m->seq_len * (size_t)m->kv_dim;

	s->m = m;
	s->pos = 0;
	s->key_cache = dalloc(kv);
	s->value_cache = dalloc(kv);
	s->x = dalloc((size_t)m->dim);
	s->xb = dalloc((size_t)m->dim);
	s->xb2 = dalloc((size_t)m->dim);
	s->q = dalloc((size_t)m->dim);
	s->hb = dalloc((size_t)m->hidden_dim);
	s->hb2 = dalloc((size_t)m->hidden_dim);
	s->att = dalloc((size_t)m->seq_len);
	s->logits = dalloc((size_t)m->vocab_size);
}

static void ref_free(struct ref_state *s)
{
	free(s->key_cache);
	free(s->value_cache);
	free(s->x);
	free(s->xb);
	free(s->xb2);
	free(s->q);
	free(s->hb);
	free(s->hb2);
	free(s->att);
	free(s->logits);
}

/* o = x * w / sqrt(mean(x^2) + 1e-5); o may be x. */
static void rmsnorm(double *o, const double *x, const float *w, int32_t n)
{
	double ss = 0;

	for (int32_t j = 0; j < n; j++)
		ss += x[j] * x[j];
	ss = 1.0 / sqrt(ss / n + 1e-5);
	for (int32_t j = 0; j < n; j++)
		o[j] = w[j] * (ss * x[j]);
}

/* o (d) = W (d, n) x (n). */
static void matmul(double *o, const double *x, const float *w, int32_t n, int32_t d)
{
	for (int32_t i = 0; i < d; i++) {
		double v = 0;

		for (int32_t j = 0; j < n; j++)
			v += (double)w[(size_t)i * (size_t)n + (size_t)j] * x[j];
		o[i] = v;
	}
}

static void softmax(double *x, int32_t n)
{
	double mx = x[0], sum = 0;

	for (int32_t i = 1; i < n; i++)
		mx = fmax(mx, x[i]);
	for (int32_t i = 0; i < n; i++) {
		x[i] = exp(x[i] - mx);
		sum += x[i];
	}
	for (int32_t i = 0; i < n; i++)
		x[i] /= sum;
}

/* Run token at s->pos; s->logits gets the logits after it. */
static void ref_forward(struct ref_state *s, int32_t token)
{
	const struct ref_model *m = s->m;
	int32_t dim = m->dim, hid = m->hidden_dim, kvd = m->kv_dim, hs = m->head_size;
	int32_t kv_mul = m->n_heads / m->n_kv_heads, pos = s->pos;

	assert_true(token >= 0 && token < m->vocab_size && pos < m->seq_len);
	for (int32_t j = 0; j < dim; j++)
		s->x[j] = m->emb[(size_t)token * (size_t)dim + (size_t)j];

	for (int32_t l = 0; l < m->n_layers; l++) {
		size_t lo = (size_t)l * (size_t)m->seq_len * (size_t)kvd;
		double *k = s->key_cache + lo + (size_t)pos * (size_t)kvd;
		double *v = s->value_cache + lo + (size_t)pos * (size_t)kvd;

		rmsnorm(s->xb, s->x, m->rms_att + (size_t)l * (size_t)dim, dim);
		matmul(s->q, s->xb, m->wq + (size_t)l * (size_t)dim * (size_t)dim, dim, dim);
		matmul(k, s->xb, m->wk + (size_t)l * (size_t)kvd * (size_t)dim, dim, kvd);
		matmul(v, s->xb, m->wv + (size_t)l * (size_t)kvd * (size_t)dim, dim, kvd);

		/* RoPE: pairs (i, i + 1) of q everywhere and of k below kv_dim. */
		for (int32_t i = 0; i < dim; i += 2) {
			double freq = 1.0 / pow(10000.0, (double)(i % hs) / (double)hs);
			double fcr = cos(pos * freq), fci = sin(pos * freq);

			for (int r = 0; r < (i < kvd ? 2 : 1); r++) {
				double *vec = r == 0 ? s->q : k;
				double v0 = vec[i], v1 = vec[i + 1];

				vec[i] = v0 * fcr - v1 * fci;
				vec[i + 1] = v0 * fci + v1 * fcr;
			}
		}

		for (int32_t h = 0; h < m->n_heads; h++) {
			const double *q = s->q + h * hs;
			size_t kh = (size_t)(h / kv_mul) * (size_t)hs;
			double *xb = s->xb + h * hs;

			for (int32_t t = 0; t <= pos; t++) {
				const double *kt = s->key_cache + lo + (size_t)t * (size_t)kvd + kh;
				double score = 0;

				for (int32_t i = 0; i < hs; i++)
					score += q[i] * kt[i];
				s->att[t] = score / sqrt((double)hs);
			}
			softmax(s->att, pos + 1);
			for (int32_t i = 0; i < hs; i++)
				xb[i] = 0;
			for (int32_t t = 0; t <= pos; t++) {
				const double *vt = s->value_cache + lo + (size_t)t * (size_t)kvd + kh;

				for (int32_t i = 0; i < hs; i++)
					xb[i] += s->att[t] * vt[i];
			}
		}
		matmul(s->xb2, s->xb, m->wo + (size_t)l * (size_t)dim * (size_t)dim, dim, dim);
		for (int32_t j = 0; j < dim; j++)
			s->x[j] += s->xb2[j];

		rmsnorm(s->xb, s->x, m->rms_ffn + (size_t)l * (size_t)dim, dim);
		matmul(s->hb, s->xb, m->w1 + (size_t)l * (size_t)hid * (size_t)dim, dim, hid);
		matmul(s->hb2, s->xb, m->w3 + (size_t)l * (size_t)hid * (size_t)dim, dim, hid);
		for (int32_t i = 0; i < hid; i++)
			s->hb[i] = s->hb[i] / (1.0 + exp(-s->hb[i])) * s->hb2[i];
		matmul(s->xb, s->hb, m->w2 + (size_t)l * (size_t)dim * (size_t)hid, hid, dim);
		for (int32_t j = 0; j < dim; j++)
			s->x[j] += s->xb[j];
	}
	rmsnorm(s->x, s->x, m->rms_final, dim);
	matmul(s->logits, s->x, m->cls, dim, m->vocab_size);
	s->pos++;
}

static int32_t ref_argmax(const struct ref_state *s)
{
	int32_t best = 0;

	for (int32_t i = 1; i < s->m->vocab_size; i++)
		if (s->logits[i] > s->logits[best])
			best = i;
	return best;
}

/* max|got - ref| / max(1, max|ref|): the relative criterion. */
static double rel_err(const float *got, const struct ref_state *s)
{
	double err = 0, mag = 1;

	for (int32_t i = 0; i < s->m->vocab_size; i++) {
		err = fmax(err, fabs((double)got[i] - s->logits[i]));
		mag = fmax(mag, fabs(s->logits[i]));
	}
	return err / mag;
}

/* The engine's logits match the reference's within tol (relative), and
 * pick the same greedy token; returns that token. */
static int32_t expect_match(const float *got, const struct ref_state *s, double tol,
			    const char *what, uint32_t threads, int step)
{
	double err = rel_err(got, s);
	int32_t want = ref_argmax(s);

	worst_f32 = fmax(worst_f32, err);
	if (!(err <= tol))
		fail_msg("%s, threads %u, step %d (pos %d): logits off by %.3g relative (bound %.3g)",
			 what, threads, step, s->pos - 1, err, tol);
	if (lt_argmax(got, (uint32_t)s->m->vocab_size) != want)
		fail_msg("%s, threads %u, step %d: greedy token %d, the reference's %d", what,
			 threads, step, lt_argmax(got, (uint32_t)s->m->vocab_size), want);
	return want;
}

static float *logits_alloc(const struct model_case *mc, uint32_t rows)
{
	float *p = malloc(sizeof(float) * (size_t)mc->ref.vocab_size * rows);

	assert_non_null(p);
	return p;
}

static struct llm_engine *open_engine(const struct model_case *mc, uint32_t threads,
				      enum kv_dtype dt, uint32_t block_tokens)
{
	struct lt_engine_opts o = { .weights = LLM_WEIGHTS_DRAM, .threads = threads, .kv_dtype = dt,
				    .block_tokens = block_tokens };
	struct llm_engine *e = lt_engine_open(mc->path, &o);
	const struct llm_config *c = llm_engine_model(e);

	/* The engine's parser and ours read the same header. */
	assert_int_equal(c->dim, mc->ref.dim);
	assert_int_equal(c->n_kv_heads, mc->ref.n_kv_heads);
	assert_int_equal(c->vocab_size, mc->ref.vocab_size);
	assert_int_equal(c->shared_classifier, mc->ref.shared);
	return e;
}

/* (a) BOS, then DECODE_STEPS greedy tokens, one llm_decode each. */
static void test_decode(void **state)
{
	const struct model_case *mc = *state;

	for (uint32_t threads = 1; threads <= 2; threads++) {
		struct llm_engine *e = open_engine(mc, threads, KV_DTYPE_F32, 0);
		float *logits = logits_alloc(mc, 1);
		struct ref_state r;
		int32_t tok = LLM_BOS;
		kv_seq_id s;

		ref_init(&r, &mc->ref);
		kv_assert_ok(llm_seq_new(e, &s));
		for (int step = 0; step <= DECODE_STEPS; step++) {
			kv_assert_ok(llm_decode(e, 1, &s, &tok, logits));
			ref_forward(&r, tok);
			tok = expect_match(logits, &r, REL_TOL, "decode", threads, step);
		}
		kv_assert_ok(llm_seq_free(e, s));
		ref_free(&r);
		free(logits);
		llm_engine_destroy(e);
	}
}

/* A run of n <= 3 seeded prompts of lens[] tokens: one llm_prefill of
 * them all, then `steps` greedy llm_decode steps of them all, each
 * sequence against its own reference run. */
struct prompts_run {
	const char *what;
	uint32_t n, lens[3], steps, threads, block_tokens;
	uint64_t seed;
};

static void run_prompts(const struct model_case *mc, const struct prompts_run *pr)
{
	struct llm_engine *e = open_engine(mc, pr->threads, KV_DTYPE_F32, pr->block_tokens);
	uint32_t vocab = (uint32_t)mc->ref.vocab_size, n = pr->n, cached[3];
	float *logits = logits_alloc(mc, n);
	int32_t *prompts[3], toks[3];
	const int32_t *pp[3];
	struct ref_state r[3];
	uint64_t rng = pr->seed;
	kv_seq_id s[3];

	assert_true(n >= 1 && n <= 3);
	for (uint32_t i = 0; i < n; i++) {
		prompts[i] = malloc(sizeof(int32_t) * pr->lens[i]);
		assert_non_null(prompts[i]);
		lt_prompt(prompts[i], pr->lens[i], vocab, &rng);
		pp[i] = prompts[i];
		ref_init(&r[i], &mc->ref);
		kv_assert_ok(llm_seq_new(e, &s[i]));
	}
	kv_assert_ok(llm_prefill(e, n, s, pp, pr->lens, logits, cached));
	for (uint32_t i = 0; i < n; i++) {
		assert_int_equal(cached[i], 0);
		for (uint32_t t = 0; t < pr->lens[i]; t++)
			ref_forward(&r[i], prompts[i][t]);
		toks[i] = expect_match(logits + (size_t)i * vocab, &r[i], REL_TOL, pr->what,
				       pr->threads, -1);
	}
	for (uint32_t step = 0; step < pr->steps; step++) {
		kv_assert_ok(llm_decode(e, n, s, toks, logits));
		for (uint32_t i = 0; i < n; i++) {
			ref_forward(&r[i], toks[i]);
			toks[i] = expect_match(logits + (size_t)i * vocab, &r[i], REL_TOL, pr->what,
					       pr->threads, (int)step);
		}
	}
	for (uint32_t i = 0; i < n; i++) {
		kv_assert_ok(llm_seq_free(e, s[i]));
		ref_free(&r[i]);
		free(prompts[i]);
	}
	free(logits);
	llm_engine_destroy(e);
}

/* (b) A prompt of 20 tokens in one llm_prefill (across a block boundary),
 * then 32 greedy decode steps. */
static void test_prefill(void **state)
{
	for (uint32_t threads = 1; threads <= 2; threads++) {
		struct prompts_run pr = { .what = "prefill, then decode", .n = 1, .lens = { 20 },
					  .steps = 32, .threads = threads, .seed = 11 + threads };

		run_prompts(*state, &pr);
	}
}

/* (c) Three prompts of 6, 21 and 35 tokens prefilled in one call and
 * decoded together for 24 steps. */
static void test_batch(void **state)
{
	for (uint32_t threads = 1; threads <= 2; threads++) {
		struct prompts_run pr = { .what = "batch of 3", .n = 3, .lens = { 6, 21, 35 },
					  .steps = 24, .threads = threads, .seed = 29 + threads };

		run_prompts(*state, &pr);
	}
}

/* Three long prompts (seq_len - 12, 3/5 and 2/5 of it) in one llm_prefill:
 * on the 260K model more rows than one pass holds (512), so prompts run in
 * chunks across passes; then 8 decode steps. Blocks of 16 tokens and of 7
 * (blocks that divide neither the passes nor the prompts). */
static void test_long_prompts(void **state)
{
	const struct model_case *mc = *state;
	uint32_t sl = (uint32_t)mc->ref.seq_len;
	static const uint32_t block_tokens[2] = { 16, 7 };

	for (int b = 0; b < 2; b++) {
		struct prompts_run pr = {
			.what = b ? "long prompts, blocks of 7" : "long prompts", .n = 3,
			.lens = { sl - 12, sl * 3 / 5, sl * 2 / 5 }, .steps = 8, .threads = 2,
			.block_tokens = block_tokens[b], .seed = 61,
		};

		run_prompts(mc, &pr);
	}
}

/* The compressed KV caches against the f32 reference, in the relative
 * criterion above. Their error compounds with depth, so greedy choices
 * may part from the reference's: the engine is fed the reference's
 * tokens (teacher forcing) and only the logits are compared. The worst
 * errors measured on these two models (printed by the test; f32: 4e-7)
 * were f16 1.6e-4, bf16 9.5e-4 and int8 5.3e-3, in line with the storage
 * bounds of <kv/cache.h> (2^-11, 2^-8, a scale step of 1/127) carried
 * through attention. Each bound is 2.5-3x its dtype's worst and below the
 * next coarser dtype's error, so a cache storing the wrong format fails. */
static const struct {
	enum kv_dtype dt;
	double tol;
} dtypes[] = {
	{ KV_DTYPE_F16, 4e-4 },
	{ KV_DTYPE_BF16, 2.5e-3 },
	{ KV_DTYPE_I8, 1.5e-2 },
};

static void test_kv_dtypes(void **state)
{
	const struct model_case *mc = *state;
	uint32_t vocab = (uint32_t)mc->ref.vocab_size, len = 20;

	for (size_t d = 0; d < sizeof(dtypes) / sizeof(dtypes[0]); d++) {
		struct llm_engine *e = open_engine(mc, 2, dtypes[d].dt, 0);
		float *logits = logits_alloc(mc, 1);
		int32_t prompt[20], tok;
		const int32_t *pp = prompt;
		uint64_t rng = 47;
		struct kv_cache_layout lay;
		struct ref_state r;
		double worst = 0;
		kv_seq_id s;

		/* The cache stores the dtype asked for. */
		kv_cache_layout(llm_engine_cache(e), &lay);
		assert_int_equal(lay.head_bytes,
				 16 * (size_t)mc->ref.head_size * kv_dtype_size(dtypes[d].dt));
		lt_prompt(prompt, len, vocab, &rng);
		ref_init(&r, &mc->ref);
		kv_assert_ok(llm_seq_new(e, &s));
		kv_assert_ok(llm_prefill(e, 1, &s, &pp, &len, logits, NULL));
		for (uint32_t i = 0; i < len; i++)
			ref_forward(&r, prompt[i]);
		/* The prompt's logits (step -1), then DTYPE_STEPS steps. */
		for (int step = -1;; step++) {
			double err = rel_err(logits, &r);

			if (!(err <= dtypes[d].tol))
				fail_msg("kv %s, step %d: logits off by %.3g relative (bound %.3g)",
					 kv_dtype_name(dtypes[d].dt), step, err, dtypes[d].tol);
			worst = fmax(worst, err);
			if (step + 1 == DTYPE_STEPS)
				break;
			tok = ref_argmax(&r);
			kv_assert_ok(llm_decode(e, 1, &s, &tok, logits));
			ref_forward(&r, tok);
		}
		printf("%s: kv %s: worst relative logit error %.3g over %d steps (bound %.3g)\n",
		       mc->name, kv_dtype_name(dtypes[d].dt), worst, DTYPE_STEPS, dtypes[d].tol);
		kv_assert_ok(llm_seq_free(e, s));
		ref_free(&r);
		free(logits);
		llm_engine_destroy(e);
	}
}

static int setup_model(struct model_case *mc, const struct llm_config *cfg, uint64_t seed)
{
	struct llm_config c = *cfg;

	if (llm_synthetic_ensure(&c, seed, scratch, mc->path, sizeof(mc->path)) != 0) {
		print_error("llm_synthetic_ensure(%s): %s\n", mc->name, kv_last_error());
		return -1;
	}
	ref_load(&mc->ref, mc->path);
	return 0;
}

static int setup_260k(void **state)
{
	struct llm_config cfg;

	if (llm_synthetic_config("260K", &cfg) != 0)
		return -1;
	*state = &cases[0];
	return setup_model(&cases[0], &cfg, 1);
}

static int setup_gqa(void **state)
{
	struct llm_config cfg = {
		.dim = 64, .hidden_dim = 160, .n_layers = 3, .n_heads = 8, .n_kv_heads = 2,
		.vocab_size = 300, .seq_len = 128, .shared_classifier = false,
	};

	if (llm_config_check(&cfg) != 0) {
		print_error("llm_config_check: %s\n", kv_last_error());
		return -1;
	}
	*state = &cases[1];
	return setup_model(&cases[1], &cfg, 2);
}

static int teardown_model(void **state)
{
	struct model_case *mc = *state;

	printf("%s: kv f32: worst relative logit error %.3g (bound %.3g)\n", mc->name, worst_f32,
	       REL_TOL);
	worst_f32 = 0;
	free(mc->ref.data);
	mc->ref.data = NULL;
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_decode),
		cmocka_unit_test(test_prefill),
		cmocka_unit_test(test_batch),
		cmocka_unit_test(test_long_prompts),
		cmocka_unit_test(test_kv_dtypes),
	};
	int rc = 0;

	kv_test_mkdtemp(scratch, sizeof(scratch), "llama-ref");
	rc |= cmocka_run_group_tests_name("260K", tests, setup_260k, teardown_model);
	rc |= cmocka_run_group_tests_name("gqa-8-2-unshared", tests, setup_gqa, teardown_model);
	kv_test_rmtree(scratch);
	return rc;
}
