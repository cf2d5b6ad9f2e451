// SPDX-License-Identifier: MIT
/*
 * Sampling: greedy, or temperature then nucleus (top-p) sampling as
 * Holtzman et al. 2019 define it, from a seeded splitmix64 stream.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>

#include "llama.h"
#include "taxonomy/kv-private.h"

struct cand {
	float p;
	int32_t id;
};

struct llm_sampler {
	uint32_t vocab;
	float temperature, top_p;
	uint64_t state;
	struct cand *cand;
};

int llm_sampler_create(uint32_t vocab, float temperature, float top_p, uint64_t seed,
		       struct llm_sampler **out)
{
	struct llm_sampler *s;

	if (!out || vocab == 0)
		return kv_fail(-EINVAL, "sampler: vocab 0 or NULL");
	if (!(temperature >= 0) || !isfinite(temperature))
		return kv_fail(-EINVAL, "sampler: temperature %g, expected >= 0", temperature);
	if (!(top_p > 0 && top_p <= 1))
		return kv_fail(-EINVAL, "sampler: top_p %g, expected in (0, 1]", top_p);
	s = calloc(1, sizeof(*s));
	if (!s || !(s->cand = malloc(sizeof(*s->cand) * vocab))) {
		free(s);
		return kv_fail(-ENOMEM, "sampler: out of memory");
	}
	s->vocab = vocab;
	s->temperature = temperature;
	s->top_p = top_p;
	s->state = seed;
	*out = s;
	return 0;
}

void llm_sampler_free(struct llm_sampler *s)
{
	if (!s)
		return;
	free(s->cand);
	free(s);
}

/* A uniform in [0, 1) from the next 24 bits of the stream. */
static float next_uniform(struct llm_sampler *s)
{
	uint64_t z = (s->state += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	z ^= z >> 31;
	return (float)(z >> 40) * (1.0f / 16777216.0f);
}

static int by_prob_desc(const void *a, const void *b)
{
	const struct cand *x = a, *y = b;

	if (x->p != y->p)
		return x->p < y->p ? 1 : -1;
	return (x->id > y->id) - (x->id < y->id);
}

int32_t llm_sample(struct llm_sampler *s, float *logits)
{
	uint32_t n = s->vocab, best = 0, kept = 0;
	float max = logits[0], sum = 0, r, acc = 0;

	for (uint32_t i = 1; i < n; i++)
		if (logits[i] > max)
			max = logits[i], best = i;
	if (s->temperature == 0 || n == 1)
		return (int32_t)best;
	for (uint32_t i = 0; i < n; i++) {
		logits[i] = expf((logits[i] - max) / s->temperature);
		sum += logits[i];
	}
	r = next_uniform(s);
	if (s->top_p >= 1) {
		r *= sum;
		for (uint32_t i = 0; i < n; i++) {
			acc += logits[i];
			if (r < acc)
				return (int32_t)i;
		}
		return (int32_t)(n - 1);
	}
	/* Nucleus: only tokens that can be in the top_p mass need sorting; a
	 * token below (1 - top_p) / (n - 1) of the total cannot be (the rest
	 * together would exceed top_p without it), as llama2.c also prunes. */
	float cutoff = (1.0f - s->top_p) / (float)(n - 1) * sum;
	if (cutoff > 1.0f)
		cutoff = 1.0f; /* the most likely token, exp(0), always stays */
	for (uint32_t i = 0; i < n; i++)
		if (logits[i] >= cutoff)
			s->cand[kept++] = (struct cand){ logits[i] / sum, (int32_t)i };
	qsort(s->cand, kept, sizeof(*s->cand), by_prob_desc);
	uint32_t last = kept - 1;
	float mass = 0;
	for (uint32_t i = 0; i < kept; i++) {
		mass += s->cand[i].p;
		if (mass > s->top_p) {
			last = i;
			break;
		}
	}
	r *= mass;
	for (uint32_t i = 0; i <= last; i++) {
		acc += s->cand[i].p;
		if (r < acc)
			return s->cand[i].id;
	}
	return s->cand[last].id;
}
