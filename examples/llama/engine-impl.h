/* SPDX-License-Identifier: MIT */
/* kv-llama engine internals shared by weights.c, engine.c, generate.c. */
#ifndef KV_LLAMA_ENGINE_IMPL_H
#define KV_LLAMA_ENGINE_IMPL_H

#include "llama.h"
#include "matmul.h"

/* Where the weights are and how a pass gets them. DRAM and MMAP hand out
 * pointers into one image of the file; STREAM acquires each tensor from
 * the streamer in the order of a pass: every layer's tensors in
 * enum llm_tensor order, the final norm, the classifier. The embedding
 * rows a pass needs are read on their own (a few rows of the table; in
 * STREAM mode with pread, not by streaming the whole table). */
struct llm_weights_src {
	enum llm_weights mode;
	struct kv_tensor_index *index;
	const uint8_t *image;          /* DRAM, MMAP: the whole file */
	struct kv_arena *arena;        /* DRAM */
	struct kv_io *io;              /* DRAM: loads the image */
	struct kv_mmap *map;           /* MMAP */
	struct kv_stream *stream;      /* STREAM */
	int fd;                        /* STREAM: embedding rows (pread) */
	uint32_t *order;               /* STREAM: one pass */
	uint32_t order_len;
	uint32_t next;                 /* STREAM: position in the order */
	uint64_t pass_bytes;           /* tensor bytes of one pass */
	uint64_t file_bytes;
	uint64_t budget;               /* STREAM */
};

int llm_weights_open(struct llm_weights_src *w, const struct llm_engine_config *cfg,
		     const struct llm_config *mc, struct kv_registry *reg, const char *label);
void llm_weights_close(struct llm_weights_src *w);
/* The f32 data of tensor id (STREAM: the next one of the order). */
int llm_weights_get(struct llm_weights_src *w, uint32_t id, const float **out);
void llm_weights_put(struct llm_weights_src *w, uint32_t id);
/* After a pass failed midway: take and give back the rest of the order,
 * so the next pass starts where the streamer expects it. */
int llm_weights_abort_pass(struct llm_weights_src *w);
/* Copy embedding rows tokens[0..n) into x (n, dim). */
int llm_weights_embed(struct llm_weights_src *w, const struct llm_config *mc,
		      const int32_t *tokens, uint32_t n, float *x);

#endif
