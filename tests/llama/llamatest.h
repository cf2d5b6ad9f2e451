/* SPDX-License-Identifier: MIT */
/*
 * Helpers of the kv-llama tests: opening an engine on a checkpoint with
 * the settings a test varies, greedy argmax with the engine's tie rule,
 * the largest difference between two logit rows, copying a checkpoint,
 * and seeded random prompts.
 */
#ifndef KV_LLAMATEST_H
#define KV_LLAMATEST_H

#include <math.h>

#include "kvtest.h"
#include "llama.h"

/* The settings an engine test varies; the rest are llama.h's defaults,
 * with a small max_batch so that the KV pool stays small. */
struct lt_engine_opts {
	enum llm_weights weights;
	double weight_budget_frac;  /* STREAM; 0: the default */
	uint32_t threads;           /* 0: 1 */
	enum kv_dtype kv_dtype;
	bool no_prefix_cache;
	const char *kv_store;
	uint64_t kv_budget;         /* 0: the default */
	uint32_t block_tokens;      /* 0: the default */
};

#define LT_MAX_BATCH 8

static inline struct llm_engine *lt_engine_open(const char *path, const struct lt_engine_opts *o)
{
	struct llm_engine_config ec;
	struct llm_engine *e = NULL;

	llm_engine_config_default(&ec);
	ec.model_path = path;
	ec.weights = o->weights;
	if (o->weight_budget_frac > 0)
		ec.weight_budget_frac = o->weight_budget_frac;
	ec.threads = o->threads ? o->threads : 1;
	ec.max_batch = LT_MAX_BATCH;
	ec.kv_dtype = o->kv_dtype;
	ec.prefix_cache = !o->no_prefix_cache;
	ec.kv_store = o->kv_store;
	ec.kv_budget = o->kv_budget;
	if (o->block_tokens)
		ec.block_tokens = o->block_tokens;
	kv_assert_ok(llm_engine_create(&ec, &e));
	return e;
}

/* The greedy token: the largest logit, the lowest id on ties (as
 * llm_sample does at temperature 0). */
static inline int32_t lt_argmax(const float *logits, uint32_t vocab)
{
	uint32_t best = 0;

	for (uint32_t i = 1; i < vocab; i++)
		if (logits[i] > logits[best])
			best = i;
	return (int32_t)best;
}

/* max_i |a[i] - b[i]|. */
static inline double lt_max_diff(const float *a, const float *b, uint32_t n)
{
	double m = 0;

	for (uint32_t i = 0; i < n; i++)
		m = fmax(m, fabs((double)a[i] - b[i]));
	return m;
}

/* Copy a file (a checkpoint, to damage the copy). */
static inline void lt_copy_file(const char *from, const char *to)
{
	FILE *in = fopen(from, "rb"), *out = fopen(to, "wb");
	char buf[65536];
	size_t n;

	assert_non_null(in);
	assert_non_null(out);
	while ((n = fread(buf, 1, sizeof(buf), in)) > 0)
		assert_int_equal(fwrite(buf, 1, n, out), n);
	fclose(in);
	assert_int_equal(fclose(out), 0);
}

/* BOS, then n - 1 ids drawn from [3, vocab) by the seeded generator. */
static inline void lt_prompt(int32_t *out, uint32_t n, uint32_t vocab, uint64_t *rng)
{
	out[0] = LLM_BOS;
	for (uint32_t i = 1; i < n; i++)
		out[i] = 3 + (int32_t)(kv_test_rand(rng) % (vocab - 3));
}

#endif
