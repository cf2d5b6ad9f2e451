// SPDX-License-Identifier: MIT
/*
 * kv_attention: checks a batch against the sequences it names and turns
 * it into a kv_attn_job over their block tables for the kernel
 * (attention.c), which runs it on the cache's thread pool. No lock: the
 * tables belong to the callers of these sequences (<kv/cache.h>).
 */
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>

#include "libkv/cache-impl.h"
#include "taxonomy/kv-private.h"

#define STACK_SEQS 32u

int kv_attention(struct kv_cache *c, uint32_t layer, const struct kv_attn_batch *b)
{
	struct kv_attn_seq stack_seqs[STACK_SEQS], *seqs = stack_seqs;
	struct kv_attn_job job;
	uint64_t qoff = 0;
	uint32_t i;
	float scale;
	int err = 0;

	if (!c || !b || !b->seqs || !b->q || !b->out || b->n_seqs == 0)
		return kv_fail(EINVAL, "kv_attention: %s", !c ? "NULL cache" : !b ? "NULL batch" :
			       b->n_seqs == 0 ? "no sequences" : "NULL seqs, q or out");
	if (layer >= c->n_layers)
		return kv_fail(EINVAL, "kv_attention: layer %u out of range (%u layers)", layer,
			       c->n_layers);
	if (b->n_q_heads == 0 || b->n_q_heads % c->n_kv_heads || b->n_q_heads > (1u << 16))
		return kv_fail(EINVAL, "kv_attention: n_q_heads %u is not a multiple of the %u kv "
			       "heads", b->n_q_heads, c->n_kv_heads);
	scale = b->scale == 0 ? 1.0f / sqrtf((float)c->head_dim) : b->scale;
	if (!(scale > 0) || !isfinite(scale))
		return kv_fail(EINVAL, "kv_attention: scale %g is not a positive number", b->scale);
	if (b->n_seqs > STACK_SEQS) {
		seqs = malloc(sizeof(*seqs) * b->n_seqs);
		if (!seqs)
			return kv_fail(ENOMEM, "kv_attention: out of memory for %u sequences",
				       b->n_seqs);
	}
	for (i = 0; i < b->n_seqs; i++) {
		struct kv_seq *s = seq_get(c, b->seqs[i], &err);
		uint32_t nq = b->n_queries ? b->n_queries[i] : 1, len;

		if (!s)
			goto fail;
		if (s->state != SEQ_ACTIVE) {
			err = kv_fail(EBUSY, "kv_attention: sequence %#" PRIx64 " is %s", b->seqs[i],
				      s->state == SEQ_SWAPPED ? "swapped out" : "preempted");
			goto fail;
		}
		len = atomic_load_explicit(&s->len, RELAXED);
		if (nq == 0 || nq > len) {
			err = kv_fail(EINVAL, "kv_attention: sequence %u of the batch: %u queries for "
				      "%u tokens", i, nq, len);
			goto fail;
		}
		if (s->written[layer] < len) {
			err = kv_fail(EINVAL, "kv_attention: sequence %u of the batch: layer %u has "
				      "K/V written for %u of its %u positions", i, layer,
				      s->written[layer], len);
			goto fail;
		}
		if (c->window && s->released &&
		    (uint64_t)(len - nq) + 1 < (uint64_t)s->released + c->window) {
			err = kv_fail(EINVAL, "kv_attention: sequence %u of the batch: a query at %u "
				      "needs positions below %u, released by the sliding window", i,
				      len - nq, s->released);
			goto fail;
		}
		seqs[i] = (struct kv_attn_seq){
			.base = c->base,
			.stride = c->stride,
			.layer_offset = (size_t)layer * c->lay.layer_bytes,
			.blocks = s->blocks,
			.n_tokens = len,
			.n_queries = nq,
			.q = b->q + qoff * b->n_q_heads * c->head_dim,
			.out = b->out + qoff * b->n_q_heads * c->head_dim,
		};
		qoff += nq;
	}
	job = (struct kv_attn_job){
		.lay = { .dtype = c->dtype, .block_tokens = c->T, .n_kv_heads = c->n_kv_heads,
			 .head_dim = c->head_dim, .head_bytes = c->lay.head_bytes,
			 .v_offset = c->lay.v_offset,
			 .scale_offset = c->lay.scale_offset },
		.n_q_heads = b->n_q_heads,
		.scale = scale,
		.window = c->window,
		.n_seqs = b->n_seqs,
		.seqs = seqs,
	};
	err = kv_attn_run(c->tp, &job);
fail:
	if (seqs != stack_seqs)
		free(seqs);
	return err;
}
