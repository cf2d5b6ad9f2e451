/* SPDX-License-Identifier: MIT */
/*
 * The kv-llama engine against itself through llama.h: weights in DRAM,
 * mapped or streamed under a quarter of the file give the same logits bit
 * for bit; a batch of one prompt four times decodes as the prompt alone;
 * seeded sampling repeats and a new seed changes it; a prompt sharing 40
 * tokens with an earlier one takes two blocks from the prefix cache with
 * the logits of an engine without one; a KV store brings a prompt's
 * blocks back after the engine is destroyed and made again; a full KV
 * pool fails a prefill or a decode step without leaving a trace; and bad
 * prompts, tokens and checkpoint files fail with the documented errors.
 */
#include <errno.h>
#include <inttypes.h>
#include <sys/stat.h>

#include "llamatest.h"

#define STEPS 48

static char scratch[4096];
/* Big enough that a quarter of it cannot hold every tensor: streaming
 * reads the weights again on every pass. */
static char model[4096];
static struct llm_config model_cfg = {
	.dim = 128, .hidden_dim = 384, .n_layers = 4, .n_heads = 4, .n_kv_heads = 4,
	.vocab_size = 512, .seq_len = 256, .shared_classifier = true,
};

static float *rows_alloc(uint32_t rows)
{
	float *p = malloc(sizeof(float) * model_cfg.vocab_size * rows);

	assert_non_null(p);
	return p;
}

/* Prefill prompt into a new sequence, then `steps` greedy llm_decode
 * steps. rows gets (steps + 1, vocab) logits: the prompt's, then each
 * step's; toks the steps' tokens; *cached the prompt's prefix hit. */
static void greedy_run(struct llm_engine *e, const int32_t *prompt, uint32_t len, uint32_t steps,
		       float *rows, int32_t *toks, uint32_t *cached)
{
	uint32_t vocab = llm_engine_model(e)->vocab_size;
	kv_seq_id s;

	kv_assert_ok(llm_seq_new(e, &s));
	kv_assert_ok(llm_prefill(e, 1, &s, &prompt, &len, rows, cached));
	for (uint32_t i = 0; i < steps; i++) {
		toks[i] = lt_argmax(rows + (size_t)i * vocab, vocab);
		kv_assert_ok(llm_decode(e, 1, &s, &toks[i], rows + (size_t)(i + 1) * vocab));
	}
	kv_assert_ok(llm_seq_free(e, s));
}

struct gen_opts {
	uint32_t n_prompts, samples;
	float temperature, top_p;
	uint64_t seed;
};

/* llm_generate of STEPS tokens from n_prompts copies of one prompt,
 * through EOS (so every sequence has STEPS tokens). */
static void generate(struct llm_engine *e, const int32_t *prompt, uint32_t len,
		     const struct gen_opts *o, struct llm_gen_result *out)
{
	const int32_t *pp[LT_MAX_BATCH];
	uint32_t lens[LT_MAX_BATCH];
	struct llm_gen_config g;

	assert_true(o->n_prompts <= LT_MAX_BATCH);
	for (uint32_t i = 0; i < o->n_prompts; i++) {
		pp[i] = prompt;
		lens[i] = len;
	}
	llm_gen_config_default(&g);
	g.n_prompts = o->n_prompts;
	g.prompts = pp;
	g.prompt_lens = lens;
	g.samples = o->samples;
	g.steps = STEPS;
	g.temperature = o->temperature;
	g.top_p = o->top_p;
	g.seed = o->seed;
	g.stop_at_eos = false;
	kv_assert_ok(llm_generate(e, &g, out));
	assert_int_equal(out->n_seqs, o->n_prompts * o->samples);
	for (uint32_t i = 0; i < out->n_seqs; i++)
		assert_int_equal(out->n_tokens[i], STEPS);
}

static bool same_tokens(const struct llm_gen_result *a, uint32_t i, const struct llm_gen_result *b,
			uint32_t j)
{
	return a->n_tokens[i] == b->n_tokens[j] &&
	       memcmp(a->tokens[i], b->tokens[j], sizeof(int32_t) * a->n_tokens[i]) == 0;
}

/* Weights in DRAM, mapped, and streamed under a quarter of the file (the
 * default lookahead): llm_generate's greedy tokens, and the logits of a
 * prefill and STEPS decode steps bit for bit (the same BLAS calls on the
 * same floats). */
static void test_weights_modes(void **state)
{
	static const enum llm_weights modes[] = { LLM_WEIGHTS_DRAM, LLM_WEIGHTS_MMAP,
						  LLM_WEIGHTS_STREAM };
	static const char *const names[] = { "dram", "mmap", "stream" };
	uint32_t vocab = model_cfg.vocab_size, len = 24;
	float *want = rows_alloc(STEPS + 1), *got = rows_alloc(STEPS + 1);
	int32_t prompt[24], want_toks[STEPS], toks[STEPS];
	struct llm_gen_result want_gen = { 0 };
	uint64_t rng = 5;

	(void)state;
	lt_prompt(prompt, len, vocab, &rng);
	for (size_t m = 0; m < sizeof(modes) / sizeof(modes[0]); m++) {
		struct lt_engine_opts o = { .weights = modes[m], .weight_budget_frac = 0.25,
					    .threads = 2 };
		struct gen_opts go = { .n_prompts = 1, .samples = 1, .top_p = 1 };
		struct llm_engine *e = lt_engine_open(model, &o);
		struct llm_gen_result gen;
		struct llm_engine_stats st;
		float *rows = m == 0 ? want : got;

		generate(e, prompt, len, &go, &gen);
		greedy_run(e, prompt, len, STEPS, rows, m == 0 ? want_toks : toks, NULL);
		llm_engine_stats(e, &st);
		if (m == 0) {
			want_gen = gen;
			/* llm_generate's greedy path is this file's greedy_run. */
			assert_memory_equal(gen.tokens[0], want_toks, sizeof(want_toks));
		} else {
			if (!same_tokens(&gen, 0, &want_gen, 0))
				fail_msg("weights %s: llm_generate's tokens differ from dram's", names[m]);
			assert_memory_equal(toks, want_toks, sizeof(toks));
			for (uint32_t r = 0; r <= STEPS; r++)
				if (memcmp(got + (size_t)r * vocab, want + (size_t)r * vocab,
					   sizeof(float) * vocab) != 0)
					fail_msg("weights %s: logits of step %u differ from dram's "
						 "(by up to %.3g)", names[m], r,
						 lt_max_diff(got + (size_t)r * vocab,
							     want + (size_t)r * vocab, vocab));
			llm_gen_result_free(&gen);
		}
		if (modes[m] == LLM_WEIGHTS_STREAM) {
			/* Really streamed: a quarter of the file as budget, and
			 * the 2 * (STEPS + 1) passes read the weights many times
			 * over. */
			printf("stream: budget %" PRIu64 " of %" PRIu64 " file bytes, read %" PRIu64
			       ", stall %.3f\n", st.stream_budget, st.file_bytes,
			       st.stream_bytes_read, st.stall_fraction);
			assert_true(st.stream_budget > 0);
			assert_true(st.stream_budget <= st.file_bytes / 4 + 4096);
			assert_true(st.stream_bytes_read > 8 * st.file_bytes);
		} else {
			assert_int_equal(st.stream_bytes_read, 0);
		}
		llm_engine_destroy(e);
	}
	llm_gen_result_free(&want_gen);
	free(want);
	free(got);
}

/* Four copies of a prompt in one llm_generate decode as the prompt alone
 * (fresh engines, so the single run's blocks are not in the cache): greedy
 * (on these synthetic models mostly a repeated token), and sampled at
 * temperature 0.8, where copy i (seed + i) must match the prompt alone
 * with seed + i, a token choice that follows every logit. */
static void test_batch_same_prompt(void **state)
{
	struct lt_engine_opts o = { .weights = LLM_WEIGHTS_DRAM, .threads = 2 };
	struct gen_opts one = { .n_prompts = 1, .samples = 1, .top_p = 1 };
	struct gen_opts four = { .n_prompts = 4, .samples = 1, .top_p = 1 };
	struct llm_gen_result a, b;
	struct llm_engine *e;
	int32_t prompt[21];
	uint64_t rng = 9;

	(void)state;
	lt_prompt(prompt, 21, model_cfg.vocab_size, &rng);
	for (int sampled = 0; sampled < 2; sampled++) {
		if (sampled) {
			one.temperature = four.temperature = 0.8f;
			four.seed = 77;
		}
		e = lt_engine_open(model, &o);
		generate(e, prompt, 21, &four, &b);
		/* The later copies took the first one's full block. */
		assert_int_equal(b.cached[0], 0);
		for (uint32_t i = 1; i < 4; i++)
			assert_int_equal(b.cached[i], 16);
		llm_engine_destroy(e);
		for (uint32_t i = 0; i < 4; i++) {
			one.seed = four.seed + i;
			e = lt_engine_open(model, &o);
			generate(e, prompt, 21, &one, &a);
			if (!same_tokens(&b, i, &a, 0))
				fail_msg("batch of 4%s: sequence %u differs from the prompt run alone",
					 sampled ? ", sampled" : "", i);
			llm_gen_result_free(&a);
			llm_engine_destroy(e);
			if (!sampled)
				break;
		}
		if (!sampled)
			for (uint32_t i = 1; i < 4; i++)
				assert_true(same_tokens(&b, i, &b, 0));
		llm_gen_result_free(&b);
	}
}

/* Seeded sampling: the same seed repeats token for token, another seed
 * changes every sequence, and "sequence i samples with seed + i". */
static void test_samples(void **state)
{
	struct lt_engine_opts o = { .weights = LLM_WEIGHTS_DRAM, .threads = 2 };
	struct gen_opts go = { .n_prompts = 1, .samples = 4, .temperature = 0.8f, .top_p = 0.9f,
			       .seed = 1234 };
	struct llm_gen_result a, b, c;
	struct llm_engine *e = lt_engine_open(model, &o);
	int32_t prompt[12];
	uint64_t rng = 13;

	(void)state;
	lt_prompt(prompt, 12, model_cfg.vocab_size, &rng);
	generate(e, prompt, 12, &go, &a);
	generate(e, prompt, 12, &go, &b);
	go.seed = 1235;
	generate(e, prompt, 12, &go, &c);
	for (uint32_t i = 0; i < 4; i++) {
		if (!same_tokens(&a, i, &b, i))
			fail_msg("seed 1234 twice: sample %u differs", i);
		if (same_tokens(&a, i, &c, i))
			fail_msg("seeds 1234 and 1235: sample %u is the same", i);
		for (uint32_t j = 0; j < i; j++)
			if (same_tokens(&a, i, &a, j))
				fail_msg("samples %u and %u of one prompt are the same", j, i);
		if (i < 3 && !same_tokens(&c, i, &a, i + 1))
			fail_msg("sample %u of seed 1235 differs from sample %u of seed 1234 "
				 "(both seed %u)", i, i + 1, 1235 + i);
	}
	llm_gen_result_free(&a);
	llm_gen_result_free(&b);
	llm_gen_result_free(&c);
	llm_engine_destroy(e);
}

/* The largest difference between logit rows, relative to max(1, max|b|). */
static double rel_diff(const float *a, const float *b, uint32_t n)
{
	double mag = 1;

	for (uint32_t i = 0; i < n; i++)
		mag = fmax(mag, fabs(b[i]));
	return lt_max_diff(a, b, n) / mag;
}

/* The cached path computes the prompt's tail in a smaller pass over K/V
 * read back from blocks: the same operations on the same values, so only
 * BLAS's choice of kernel for another row count could move a last bit. */
#define CACHED_TOL 1e-6

/* Two prompts sharing a 40-token prefix, prefilled one after the other:
 * the second takes the two full blocks (32 tokens) from the cache and
 * gets the logits of an engine that computes it all; so do prompts that
 * end where a cached block ends. */
static void test_prefix_cache(void **state)
{
	struct lt_engine_opts o = { .weights = LLM_WEIGHTS_DRAM, .threads = 2 };
	struct lt_engine_opts off = { .weights = LLM_WEIGHTS_DRAM, .threads = 2,
				      .no_prefix_cache = true };
	uint32_t vocab = model_cfg.vocab_size, cached = 99;
	float *a = rows_alloc(9), *b = rows_alloc(9);
	int32_t p1[45], p2[47], toks_a[8], toks_b[8];
	struct llm_engine *e = lt_engine_open(model, &o), *ref = lt_engine_open(model, &off);
	uint64_t rng = 17;

	(void)state;
	lt_prompt(p1, 45, vocab, &rng);
	lt_prompt(p2, 47, vocab, &rng);
	memcpy(p2, p1, sizeof(int32_t) * 40);
	if (p2[40] == p1[40])
		p2[40] = p1[40] == 3 ? 4 : 3;
	greedy_run(e, p1, 45, 0, a, toks_a, &cached);
	assert_int_equal(cached, 0);
	greedy_run(e, p2, 47, 8, a, toks_a, &cached);
	assert_int_equal(cached, 32);
	greedy_run(ref, p2, 47, 8, b, toks_b, &cached);
	assert_int_equal(cached, 0);
	for (uint32_t r = 0; r <= 8; r++) {
		double d = rel_diff(a + (size_t)r * vocab, b + (size_t)r * vocab, vocab);

		if (r == 0)
			printf("prefix hit: prompt logits differ from the uncached engine's by %.3g\n",
			       d);
		if (d > CACHED_TOL)
			fail_msg("prefix hit: logits of step %u differ by %.3g relative", r, d);
	}
	assert_memory_equal(toks_a, toks_b, sizeof(toks_a));
	/* The engine without a prefix cache never reports a hit. */
	greedy_run(ref, p2, 47, 0, b, toks_b, &cached);
	assert_int_equal(cached, 0);
	/* Prompts ending on a block boundary, every block cached: the last
	 * block still runs, for the last token's logits. */
	for (uint32_t len = 16; len <= 32; len += 16) {
		greedy_run(e, p1, len, 0, a, toks_a, &cached);
		assert_int_equal(cached, len - 16);
		greedy_run(ref, p1, len, 0, b, toks_b, &cached);
		if (rel_diff(a, b, vocab) > CACHED_TOL)
			fail_msg("a %u-token prompt with %u cached: logits differ by %.3g", len,
				 len - 16, rel_diff(a, b, vocab));
	}
	free(a);
	free(b);
	llm_engine_destroy(e);
	llm_engine_destroy(ref);
}

/* An engine with a KV store, destroyed and made again, finds the blocks
 * of a 50-token prompt computed by the first: 48 tokens (three blocks). */
static void test_kv_store_restart(void **state)
{
	char store[4200];
	struct lt_engine_opts o = { .weights = LLM_WEIGHTS_DRAM, .threads = 2, .kv_store = store };
	uint32_t vocab = model_cfg.vocab_size, cached = 99;
	float *a = rows_alloc(9), *b = rows_alloc(9);
	int32_t prompt[50], toks_a[8], toks_b[8];
	struct llm_engine *e;
	uint64_t rng = 21;

	(void)state;
	snprintf(store, sizeof(store), "%s/kv-store", scratch);
	assert_int_equal(mkdir(store, 0755), 0);
	lt_prompt(prompt, 50, vocab, &rng);
	e = lt_engine_open(model, &o);
	greedy_run(e, prompt, 50, 8, a, toks_a, &cached);
	assert_int_equal(cached, 0);
	llm_engine_destroy(e);

	e = lt_engine_open(model, &o);
	greedy_run(e, prompt, 50, 8, b, toks_b, &cached);
	assert_int_equal(cached, 48);
	for (uint32_t r = 0; r <= 8; r++) {
		double d = rel_diff(b + (size_t)r * vocab, a + (size_t)r * vocab, vocab);

		if (d > CACHED_TOL)
			fail_msg("after restart: logits of step %u differ by %.3g relative", r, d);
	}
	assert_memory_equal(toks_a, toks_b, sizeof(toks_a));
	llm_engine_destroy(e);
	free(a);
	free(b);
}

static void expect_detail(const char *what, const char *needle)
{
	if (!strstr(kv_last_error(), needle))
		fail_msg("%s: the detail \"%s\" does not name %s", what, kv_last_error(), needle);
}

/* Bad prompts and tokens through llm_prefill and llm_decode: -EINVAL with
 * a detail naming the value, nothing left in the sequence. */
static void test_bad_inputs(void **state)
{
	struct lt_engine_opts o = { .weights = LLM_WEIGHTS_DRAM, .threads = 1 };
	struct llm_engine *e = lt_engine_open(model, &o);
	uint32_t vocab = model_cfg.vocab_size, seq_len = model_cfg.seq_len;
	uint32_t len = seq_len + 1, zero = 0, ten = 10, nine = LT_MAX_BATCH + 1;
	int32_t *prompt = malloc(sizeof(int32_t) * len), bad;
	float *want = rows_alloc(2), *got = rows_alloc(LT_MAX_BATCH + 1);
	const int32_t *pp[LT_MAX_BATCH + 1];
	uint32_t lens[LT_MAX_BATCH + 1];
	kv_seq_id s, seqs[LT_MAX_BATCH + 1];
	uint64_t rng = 25;
	char num[16];

	(void)state;
	assert_non_null(prompt);
	lt_prompt(prompt, len, vocab, &rng);

	/* The reference: the first ten tokens, then one more, in a clean
	 * sequence (shorter than a block, so no prefix hit anywhere). */
	kv_assert_ok(llm_seq_new(e, &s));
	pp[0] = prompt;
	kv_assert_ok(llm_prefill(e, 1, &s, pp, &ten, want, NULL));
	kv_assert_ok(llm_decode(e, 1, &s, &prompt[10], want + vocab));
	kv_assert_ok(llm_seq_free(e, s));

	kv_assert_ok(llm_seq_new(e, &s));
	kv_assert_rc(llm_prefill(e, 1, &s, pp, &len, got, NULL), -EINVAL);
	snprintf(num, sizeof(num), "%u", len);
	expect_detail("a prompt above seq_len", num);
	kv_assert_rc(llm_prefill(e, 1, &s, pp, &zero, got, NULL), -EINVAL);
	for (int i = 0; i < 3; i++) {
		static const int32_t bads[3] = { 512, -1, INT32_MAX };

		bad = prompt[5];
		prompt[5] = bads[i];
		kv_assert_rc(llm_prefill(e, 1, &s, pp, &ten, got, NULL), -EINVAL);
		snprintf(num, sizeof(num), "%d", bads[i]);
		expect_detail("a prompt token outside the vocabulary", num);
		prompt[5] = bad;
	}
	/* n above max_batch. */
	for (uint32_t i = 0; i < nine; i++) {
		pp[i] = prompt;
		lens[i] = ten;
		seqs[i] = s;
	}
	kv_assert_rc(llm_prefill(e, nine, seqs, pp, lens, got, NULL), -EINVAL);

	/* The sequence stayed empty: a good prefill gives the clean logits. */
	kv_assert_ok(llm_prefill(e, 1, &s, pp, &ten, got, NULL));
	assert_memory_equal(got, want, sizeof(float) * vocab);
	for (int i = 0; i < 2; i++) {
		bad = i == 0 ? (int32_t)vocab : -5;
		kv_assert_rc(llm_decode(e, 1, &s, &bad, got), -EINVAL);
		snprintf(num, sizeof(num), "%d", bad);
		expect_detail("a decode token outside the vocabulary", num);
	}
	/* Nothing was appended. */
	kv_assert_ok(llm_decode(e, 1, &s, &prompt[10], got));
	assert_memory_equal(got, want + vocab, sizeof(float) * vocab);
	kv_assert_ok(llm_seq_free(e, s));

	/* A sequence at seq_len takes no more tokens. */
	kv_assert_ok(llm_seq_new(e, &s));
	kv_assert_ok(llm_prefill(e, 1, &s, pp, &seq_len, got, NULL));
	kv_assert_rc(llm_decode(e, 1, &s, &prompt[3], got), -EINVAL);
	kv_assert_ok(llm_seq_free(e, s));

	free(prompt);
	free(want);
	free(got);
	llm_engine_destroy(e);
}

static uint32_t seq_len_of(struct llm_engine *e, kv_seq_id s)
{
	struct kv_seq_info si;

	kv_assert_ok(kv_seq_info(llm_engine_cache(e), s, &si));
	return si.len;
}

/* An engine whose KV pool holds 5 blocks of 16 tokens. */
static struct llm_engine *open_small_kv(void)
{
	struct lt_engine_opts o = { .weights = LLM_WEIGHTS_DRAM, .threads = 1 };
	struct kv_cache_layout lay;
	struct kv_cache_stats cs;
	struct llm_engine *e = lt_engine_open(model, &o);

	kv_cache_layout(llm_engine_cache(e), &lay);
	llm_engine_destroy(e);
	o.kv_budget = 5 * (uint64_t)lay.block_bytes;
	e = lt_engine_open(model, &o);
	kv_cache_stats(llm_engine_cache(e), &cs);
	assert_int_equal(cs.blocks_total, 5);
	return e;
}

/* A full KV pool: llm_prefill and llm_decode fail with -ENOMEM and leave
 * the sequences as they were (prefill: empty; decode: nothing appended,
 * not even to the sequences before the one that did not fit), so the
 * same calls work once there is room, with the logits of an engine that
 * never ran out. */
static void test_kv_full(void **state)
{
	struct lt_engine_opts big = { .weights = LLM_WEIGHTS_DRAM, .threads = 1 };
	uint32_t vocab = model_cfg.vocab_size, lens[2] = { 48, 48 }, cached = 99;
	int32_t a[64], b[48], next[2];
	const int32_t *pp[2] = { a, b };
	float *got = rows_alloc(2), *want = rows_alloc(2);
	struct kv_cache_stats cs;
	struct llm_engine *e, *ref = lt_engine_open(model, &big);
	kv_seq_id s[2], r;
	uint64_t rng = 33;

	(void)state;
	lt_prompt(a, 64, vocab, &rng);
	lt_prompt(b, 48, vocab, &rng);

	/* Prefill: 2 x 3 blocks do not fit in 5. */
	e = open_small_kv();
	kv_assert_ok(llm_seq_new(e, &s[0]));
	kv_assert_ok(llm_seq_new(e, &s[1]));
	kv_assert_rc(llm_prefill(e, 2, s, pp, lens, got, NULL), -ENOMEM);
	assert_int_equal(seq_len_of(e, s[0]), 0);
	assert_int_equal(seq_len_of(e, s[1]), 0);
	kv_cache_stats(llm_engine_cache(e), &cs);
	assert_int_equal(cs.blocks_used, 0);
	/* Blocks never computed are no prefix hits. */
	kv_assert_ok(llm_prefill(e, 1, &s[0], pp, lens, got, &cached));
	assert_int_equal(cached, 0);
	kv_assert_ok(llm_seq_new(ref, &r));
	kv_assert_ok(llm_prefill(ref, 1, &r, pp, lens, want, NULL));
	kv_assert_ok(llm_seq_free(ref, r));
	assert_memory_equal(got, want, sizeof(float) * vocab);
	llm_engine_destroy(e);

	/* Decode: a holds 63 tokens (4 blocks, one free slot), b 16 (one full
	 * block); a's token fits, b's needs a sixth block. */
	e = open_small_kv();
	lens[0] = 63;
	lens[1] = 16;
	kv_assert_ok(llm_seq_new(e, &s[0]));
	kv_assert_ok(llm_seq_new(e, &s[1]));
	kv_assert_ok(llm_prefill(e, 2, s, pp, lens, got, NULL));
	next[0] = a[63];
	next[1] = b[16];
	kv_assert_rc(llm_decode(e, 2, s, next, got), -ENOMEM);
	assert_int_equal(seq_len_of(e, s[0]), 63);
	assert_int_equal(seq_len_of(e, s[1]), 16);
	kv_assert_ok(llm_seq_free(e, s[1]));
	kv_assert_ok(kv_cache_evict(llm_engine_cache(e), UINT32_MAX, NULL));
	kv_assert_ok(llm_decode(e, 1, &s[0], &next[0], got));
	kv_assert_ok(llm_seq_new(ref, &r));
	kv_assert_ok(llm_prefill(ref, 1, &r, pp, lens, want, NULL));
	kv_assert_ok(llm_decode(ref, 1, &r, &next[0], want));
	assert_memory_equal(got, want, sizeof(float) * vocab);
	llm_engine_destroy(e);
	llm_engine_destroy(ref);
	free(got);
	free(want);
}

static void write_header(const char *path, const int32_t h[7], size_t extra_floats)
{
	FILE *f = fopen(path, "wb");
	float zero = 0;

	assert_non_null(f);
	assert_int_equal(fwrite(h, sizeof(int32_t), 7, f), 7);
	for (size_t i = 0; i < extra_floats; i++)
		assert_int_equal(fwrite(&zero, sizeof(zero), 1, f), 1);
	assert_int_equal(fclose(f), 0);
}

/* llm_engine_create on path in every weights mode returns want. */
static void expect_create(const char *path, int want, const char *needle)
{
	static const enum llm_weights modes[] = { LLM_WEIGHTS_DRAM, LLM_WEIGHTS_MMAP,
						  LLM_WEIGHTS_STREAM };

	for (size_t m = 0; m < sizeof(modes) / sizeof(modes[0]); m++) {
		struct llm_engine_config ec;
		struct llm_engine *e = NULL;

		llm_engine_config_default(&ec);
		ec.model_path = path;
		ec.weights = modes[m];
		ec.max_batch = 2;
		if (want == -EOVERFLOW) {
			int rc = llm_engine_create(&ec, &e);

			if (rc != -EOVERFLOW && rc != -EINVAL)
				fail_msg("%s: %d (%s), want -EOVERFLOW or -EINVAL; %s", path, rc,
					 kv_strerror(rc), kv_last_error());
		} else {
			kv_assert_rc(llm_engine_create(&ec, &e), want);
		}
		assert_null(e);
		if (needle)
			expect_detail(path, needle);
	}
}

/* Bad checkpoint files: errors, never a crash or a leak (ASan). */
static void test_bad_files(void **state)
{
	char path[4200], missing[4200], sizes[64];
	struct stat st;
	uint64_t full;

	(void)state;
	snprintf(missing, sizeof(missing), "%s/no-such-model.bin", scratch);
	expect_create(missing, -ENOENT, missing);

	/* Truncated: 4 bytes short, a tenth left, only the header, half a header. */
	snprintf(path, sizeof(path), "%s/truncated.bin", scratch);
	lt_copy_file(model, path);
	assert_int_equal(stat(path, &st), 0);
	full = (uint64_t)st.st_size;
	assert_int_equal(truncate(path, (off_t)full - 4), 0);
	snprintf(sizes, sizeof(sizes), "%" PRIu64, full - 4);
	expect_create(path, -EFBIG, sizes);
	snprintf(sizes, sizeof(sizes), "%" PRIu64, full);
	expect_create(path, -EFBIG, sizes);
	assert_int_equal(truncate(path, (off_t)full / 10), 0);
	expect_create(path, -EFBIG, path);
	assert_int_equal(truncate(path, 28), 0);
	expect_create(path, -EFBIG, path);
	assert_int_equal(truncate(path, 14), 0);
	expect_create(path, -EFBIG, path);
	assert_int_equal(truncate(path, 0), 0);
	expect_create(path, -EFBIG, path);

	/* Trailing bytes. */
	lt_copy_file(model, path);
	assert_int_equal(truncate(path, (off_t)full + 1), 0);
	expect_create(path, -EBADMSG, path);

	/* Absurd headers. */
	{
		static const struct {
			int32_t h[7];
			int want;
			const char *needle;
		} bad[] = {
			{ { 1 << 30, 384, 1 << 30, 4, 4, 512, 256 }, -EOVERFLOW, "dim" },
			{ { 128, 1 << 30, 4, 4, 4, 512, 256 }, -EOVERFLOW, "hidden_dim" },
			{ { 128, 384, 4, 4, 4, 1 << 30, 1 << 30 }, -EOVERFLOW, "vocab_size" },
			{ { 128, 384, 4, 4, 4, -(1 << 30), 256 }, -EOVERFLOW, "vocab_size" },
			{ { 128, 384, 4, 4, 4, INT32_MIN, 256 }, -EINVAL, "vocab_size" },
			{ { 128, 384, 4, 4, 4, 512, 0 }, -EINVAL, "seq_len" },
			{ { 128, 384, -4, 4, 4, 512, 256 }, -EINVAL, "n_layers" },
			{ { 128, 384, 4, 3, 3, 512, 256 }, -EINVAL, "n_heads" },
			{ { 128, 384, 4, 4, 3, 512, 256 }, -EINVAL, "n_kv_heads" },
			{ { 128, 384, 4, 4, 8, 512, 256 }, -EINVAL, "n_kv_heads" },
			{ { 132, 384, 4, 4, 4, 512, 256 }, -EINVAL, "head size" },
			/* Every field at a large but plausible size: the file is
			 * only the header, and nothing is allocated for it. */
			{ { 65536, 1 << 18, 1024, 64, 64, 1 << 22, 1 << 20 }, -EFBIG, "needs" },
		};

		for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
			write_header(path, bad[i].h, 16);
			expect_create(path, bad[i].want, bad[i].needle);
		}
	}

	/* A directory. */
	{
		struct llm_engine_config ec;
		struct llm_engine *e = NULL;

		llm_engine_config_default(&ec);
		ec.model_path = scratch;
		assert_true(llm_engine_create(&ec, &e) < 0);
		assert_null(e);
		expect_detail("a directory", scratch);
	}
	unlink(path);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_weights_modes),
		cmocka_unit_test(test_batch_same_prompt),
		cmocka_unit_test(test_samples),
		cmocka_unit_test(test_prefix_cache),
		cmocka_unit_test(test_kv_store_restart),
		cmocka_unit_test(test_bad_inputs),
		cmocka_unit_test(test_kv_full),
		cmocka_unit_test(test_bad_files),
	};
	int rc;

	kv_test_mkdtemp(scratch, sizeof(scratch), "llama-engine");
	if (llm_synthetic_ensure(&model_cfg, 3, scratch, model, sizeof(model)) != 0) {
		fprintf(stderr, "llm_synthetic_ensure: %s\n", kv_last_error());
		kv_test_rmtree(scratch);
		return 1;
	}
	rc = cmocka_run_group_tests(tests, NULL, NULL);
	kv_test_rmtree(scratch);
	return rc;
}
