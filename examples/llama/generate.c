// SPDX-License-Identifier: MIT
/*
 * The generation loop: prefill every prompt, fork its samples through the
 * KV cache, then decode all live sequences together, one batched step per
 * token, until each has its tokens or met EOS.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"
#include "taxonomy/kv-private.h"

void llm_gen_config_default(struct llm_gen_config *g)
{
	memset(g, 0, sizeof(*g));
	g->samples = 1;
	g->steps = 64;
	g->top_p = 1.0f;
	g->stop_at_eos = true;
}

void llm_gen_result_free(struct llm_gen_result *r)
{
	if (!r)
		return;
	for (uint32_t i = 0; r->tokens && i < r->n_seqs; i++)
		free(r->tokens[i]);
	free(r->tokens);
	free(r->n_tokens);
	free(r->cached);
	memset(r, 0, sizeof(*r));
}

int llm_generate(struct llm_engine *e, const struct llm_gen_config *g,
		 struct llm_gen_result *out)
{
	const struct llm_config *m = llm_engine_model(e);
	struct llm_gen_result r = { 0 };
	struct llm_sampler **samplers = NULL;
	kv_seq_id *seqs = NULL, *pseqs = NULL, *act_seqs = NULL;
	uint32_t *act = NULL, *limit = NULL, *pcached = NULL, n, n_act = 0;
	int32_t *next = NULL;
	float *logits = NULL;
	char detail[512];
	int rc = 0;

	if (!e || !g || !out || !g->prompts || !g->prompt_lens)
		return kv_fail(-EINVAL, "llm_generate: NULL argument");
	if (g->n_prompts == 0 || g->samples == 0)
		return kv_fail(-EINVAL, "llm_generate: %" PRIu32 " prompts x %" PRIu32 " samples",
			       g->n_prompts, g->samples);
	if ((uint64_t)g->n_prompts * g->samples > UINT32_MAX)
		return kv_fail(-EINVAL, "llm_generate: too many sequences");
	n = g->n_prompts * g->samples;
	r.n_seqs = n;
	r.tokens = calloc(n, sizeof(*r.tokens));
	r.n_tokens = calloc(n, sizeof(*r.n_tokens));
	r.cached = calloc(n, sizeof(*r.cached));
	seqs = calloc(n, sizeof(*seqs));
	pseqs = calloc(g->n_prompts, sizeof(*pseqs));
	act_seqs = calloc(n, sizeof(*act_seqs));
	act = calloc(n, sizeof(*act));
	limit = calloc(n, sizeof(*limit));
	pcached = calloc(g->n_prompts, sizeof(*pcached));
	next = calloc(n, sizeof(*next));
	samplers = calloc(n, sizeof(*samplers));
	logits = malloc(sizeof(float) * (size_t)n * m->vocab_size);
	if (!r.tokens || !r.n_tokens || !r.cached || !seqs || !pseqs || !act_seqs || !act ||
	    !limit || !pcached || !next || !samplers || !logits) {
		rc = kv_fail(-ENOMEM, "llm_generate: out of memory");
		goto out;
	}
	for (uint32_t i = 0; i < n && !rc; i++) {
		uint32_t p = i / g->samples, len = g->prompt_lens[p];

		limit[i] = g->steps;
		if (len < m->seq_len && limit[i] > m->seq_len - len)
			limit[i] = m->seq_len - len;
		if (len >= m->seq_len)
			limit[i] = 0;
		if (!(r.tokens[i] = malloc(sizeof(int32_t) * (limit[i] ? limit[i] : 1))))
			rc = kv_fail(-ENOMEM, "llm_generate: out of memory");
		else
			rc = llm_sampler_create(m->vocab_size, g->temperature, g->top_p, g->seed + i,
						&samplers[i]);
	}
	for (uint32_t p = 0; p < g->n_prompts && !rc; p++)
		rc = llm_seq_new(e, &pseqs[p]);
	if (rc)
		goto out;
	/* Prompt p's logits land in row p * samples, its first sample's. */
	if ((rc = llm_prefill(e, g->n_prompts, pseqs, g->prompts, g->prompt_lens, logits, pcached)))
		goto out;
	for (uint32_t p = g->n_prompts; p-- > 0;) {
		float *row = logits + (size_t)p * g->samples * m->vocab_size;

		memmove(row, logits + (size_t)p * m->vocab_size, sizeof(float) * m->vocab_size);
		seqs[p * g->samples] = pseqs[p];
		pseqs[p] = KV_SEQ_NONE;
		for (uint32_t s = 1; s < g->samples; s++)
			memcpy(row + (size_t)s * m->vocab_size, row, sizeof(float) * m->vocab_size);
	}
	for (uint32_t i = 0; i < n; i++)
		r.cached[i] = pcached[i / g->samples];
	for (uint32_t i = 0; i < n && !rc; i++)
		if (i % g->samples)
			rc = llm_seq_fork(e, seqs[i - i % g->samples], &seqs[i]);
	if (rc)
		goto out;
	/* Row j of logits belongs to act[j]. */
	for (uint32_t i = 0; i < n; i++)
		act[n_act++] = i;
	while (n_act) {
		uint32_t keep = 0;

		for (uint32_t j = 0; j < n_act; j++) {
			uint32_t i = act[j];
			int32_t tok;

			if (r.n_tokens[i] >= limit[i])
				continue;
			tok = llm_sample(samplers[i], logits + (size_t)j * m->vocab_size);
			r.tokens[i][r.n_tokens[i]++] = tok;
			if (g->on_token)
				g->on_token(g->ctx, i, tok);
			if ((g->stop_at_eos && tok == LLM_EOS) || r.n_tokens[i] == limit[i])
				continue;
			next[keep] = tok;
			act_seqs[keep] = seqs[i];
			act[keep++] = i;
		}
		n_act = keep;
		if (n_act && (rc = llm_decode(e, n_act, act_seqs, next, logits)))
			goto out;
	}
out:
	if (rc)
		snprintf(detail, sizeof(detail), "%s", kv_last_error());
	for (uint32_t i = 0; seqs && i < n; i++)
		if (seqs[i] != KV_SEQ_NONE)
			llm_seq_free(e, seqs[i]);
	for (uint32_t p = 0; pseqs && p < g->n_prompts; p++)
		if (pseqs[p] != KV_SEQ_NONE)
			llm_seq_free(e, pseqs[p]);
	for (uint32_t i = 0; samplers && i < n; i++)
		llm_sampler_free(samplers[i]);
	free(samplers);
	free(seqs);
	free(pseqs);
	free(act_seqs);
	free(act);
	free(limit);
	free(pcached);
	free(next);
	free(logits);
	if (rc) {
		llm_gen_result_free(&r);
		return kv_fail(rc, "%s", detail);
	}
	*out = r;
	return 0;
}
