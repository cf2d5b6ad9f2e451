// SPDX-License-Identifier: MIT
/*
 * The three homes of the weights: read into a DRAM arena (placed by the
 * allocator: NUMA policy, huge pages), mapped from the page cache, or
 * streamed from SSD by the offload layer's streamer under a budget.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine-impl.h"
#include "taxonomy/kv-private.h"

/* Read the whole file into the arena with O_DIRECT through the I/O
 * engine, a few requests in flight. */
static int load_image(struct llm_weights_src *w, const char *path, void *dst)
{
	enum { CHUNK = 8u << 20, DEPTH = 8 };
	struct kv_io_req reqs[DEPTH], *rp[1];
	uint64_t off = 0, done = 0;
	int file, rc = 0;
	uint32_t inflight = 0, head = 0;

	file = kv_io_open(w->io, path, KV_IO_READ);
	if (file < 0)
		return file;
	while (done < w->file_bytes && !rc) {
		while (inflight < DEPTH && off < w->file_bytes) {
			struct kv_io_req *r = &reqs[(head + inflight) % DEPTH];
			uint64_t len = w->file_bytes - off < CHUNK ? w->file_bytes - off : CHUNK;

			*r = (struct kv_io_req){ .file = file, .op = KV_IO_OP_READ, .offset = off,
						 .len = (size_t)len, .buf = (uint8_t *)dst + off };
			rp[0] = r;
			if ((rc = kv_io_submit(w->io, rp, 1)))
				break;
			off += len;
			inflight++;
		}
		if (!inflight)
			break;
		struct kv_io_req *r = &reqs[head];
		int64_t got = kv_io_wait(w->io, r->ticket, -1);

		if (got < 0 && !rc)
			rc = (int)got;
		else if (!rc && (uint64_t)got != r->len)
			rc = kv_fail(-EIO, "weights '%s': short read at %" PRIu64 " (%" PRId64 " of %zu bytes)",
				     path, r->offset, got, r->len);
		done += r->len;
		head = (head + 1) % DEPTH;
		inflight--;
	}
	/* Collect what is still in flight before the buffers go. */
	while (inflight) {
		kv_io_wait(w->io, reqs[head].ticket, -1);
		head = (head + 1) % DEPTH;
		inflight--;
	}
	kv_io_close(w->io, file);
	return rc;
}

static int open_dram(struct llm_weights_src *w, const struct llm_engine_config *cfg,
		     struct kv_registry *reg, const char *label)
{
	struct kv_arena_config acfg;
	struct kv_io_config icfg;
	char name[96];
	void *p;
	int rc;

	kv_arena_config_default(&acfg);
	acfg.bytes = w->file_bytes;
	acfg.place = cfg->place;
	acfg.kind = KV_KIND_WEIGHTS;
	acfg.policy = KV_POLICY_READONLY;
	snprintf(name, sizeof(name), "%s/weights", label);
	acfg.label = name;
	acfg.registry = reg;
	if ((rc = kv_arena_create(&acfg, &w->arena)))
		return rc;
	if ((rc = kv_arena_alloc(w->arena, w->file_bytes, 4096, &p)))
		return rc;
	kv_io_config_default(&icfg);
	icfg.registry = reg;
	if ((rc = kv_io_create(&icfg, &w->io)))
		return rc;
	rc = load_image(w, cfg->model_path, p);
	kv_io_destroy(w->io, 0);
	w->io = NULL;
	if (rc)
		return rc;
	w->image = p;
	return 0;
}

static int open_mmap(struct llm_weights_src *w, const struct llm_engine_config *cfg,
		     struct kv_registry *reg, const char *label)
{
	struct kv_mmap_config mcfg;
	char name[96];
	int rc;

	kv_mmap_config_default(&mcfg);
	mcfg.populate = cfg->mmap_populate;
	mcfg.registry = reg;
	snprintf(name, sizeof(name), "%s/weights", label);
	mcfg.label = name;
	if ((rc = kv_mmap_open(cfg->model_path, &mcfg, &w->map)))
		return rc;
	if (kv_mmap_size(w->map) != w->file_bytes)
		return kv_fail(-ESTALE, "weights '%s': the file changed size while opening",
			       cfg->model_path);
	w->image = kv_mmap_data(w->map);
	return 0;
}

static int open_stream(struct llm_weights_src *w, const struct llm_engine_config *cfg,
		       const struct llm_config *mc, struct kv_registry *reg, const char *label)
{
	struct kv_stream_config scfg;
	char name[96];

	w->fd = open(cfg->model_path, O_RDONLY | O_CLOEXEC);
	if (w->fd < 0)
		return kv_fail(-errno, "weights '%s': open: %s", cfg->model_path, strerror(errno));
	w->budget = cfg->weight_budget;
	if (!w->budget) {
		double f = cfg->weight_budget_frac > 0 ? cfg->weight_budget_frac : 0.25;

		if (f > 1)
			return kv_fail(-EINVAL, "weight budget %.0f %% of the model: above 100 %%",
				       f * 100);
		w->budget = (uint64_t)((double)w->file_bytes * f);
	}
	kv_stream_config_default(&scfg);
	scfg.index = w->index;
	scfg.path = cfg->model_path;
	scfg.order = w->order;
	scfg.order_len = w->order_len;
	scfg.budget_bytes = w->budget;
	if (cfg->lookahead)
		scfg.lookahead = cfg->lookahead;
	scfg.hold = 1;
	scfg.registry = reg;
	snprintf(name, sizeof(name), "%s/weights", label);
	scfg.label = name;
	(void)mc;
	return kv_stream_create(&scfg, &w->stream);
}

int llm_weights_open(struct llm_weights_src *w, const struct llm_engine_config *cfg,
		     const struct llm_config *mc, struct kv_registry *reg, const char *label)
{
	uint32_t n = 0;
	int rc;

	memset(w, 0, sizeof(*w));
	w->fd = -1;
	w->mode = cfg->weights;
	if ((rc = llm_config_file_bytes(mc, &w->file_bytes)) ||
	    (rc = llm_tensor_index_build(mc, &w->index)))
		return rc;
	w->order_len = mc->n_layers * LLM_T_PER_LAYER + 1 + llm_cls_chunks(mc);
	w->order = malloc(sizeof(*w->order) * w->order_len);
	if (!w->order) {
		rc = kv_fail(-ENOMEM, "weights: out of memory");
		goto fail;
	}
	for (uint32_t l = 0; l < mc->n_layers; l++)
		for (int t = 0; t < LLM_T_PER_LAYER; t++)
			w->order[n++] = llm_tensor_layer(mc, l, (enum llm_tensor)t);
	w->order[n++] = llm_tensor_norm(mc);
	for (uint32_t k = 0; k < llm_cls_chunks(mc); k++)
		w->order[n++] = llm_tensor_cls_chunk(mc, k);
	for (uint32_t i = 0; i < n; i++) {
		struct kv_tensor_info ti;

		kv_tensor_index_get(w->index, w->order[i], &ti);
		w->pass_bytes += ti.bytes;
	}
	switch (cfg->weights) {
	case LLM_WEIGHTS_DRAM:
		rc = open_dram(w, cfg, reg, label);
		break;
	case LLM_WEIGHTS_MMAP:
		rc = open_mmap(w, cfg, reg, label);
		break;
	case LLM_WEIGHTS_STREAM:
		rc = open_stream(w, cfg, mc, reg, label);
		break;
	default:
		rc = kv_fail(-EINVAL, "weights: unknown mode %d", (int)cfg->weights);
	}
	if (!rc)
		return 0;
fail:
	{
		/* Keep the first failure's detail across the cleanup. */
		char detail[512];

		snprintf(detail, sizeof(detail), "%s", kv_last_error());
		llm_weights_close(w);
		kv_fail(rc, "%s", detail);
	}
	return rc;
}

void llm_weights_close(struct llm_weights_src *w)
{
	kv_stream_destroy(w->stream);
	kv_mmap_close(w->map);
	if (w->arena)
		kv_arena_destroy(w->arena, KV_ARENA_FORCE);
	if (w->io)
		kv_io_destroy(w->io, 0);
	if (w->fd >= 0)
		close(w->fd);
	kv_tensor_index_destroy(w->index);
	free(w->order);
	memset(w, 0, sizeof(*w));
	w->fd = -1;
}

int llm_weights_get(struct llm_weights_src *w, uint32_t id, const float **out)
{
	struct kv_tensor_info ti;
	const void *p;
	int rc;

	if (w->mode == LLM_WEIGHTS_STREAM) {
		if ((rc = kv_stream_acquire(w->stream, id, &p)))
			return rc;
		w->next = (w->next + 1) % w->order_len;
		*out = p;
		return 0;
	}
	kv_tensor_index_get(w->index, id, &ti);
	*out = (const float *)(w->image + ti.offset);
	return 0;
}

void llm_weights_put(struct llm_weights_src *w, uint32_t id)
{
	if (w->mode == LLM_WEIGHTS_STREAM)
		kv_stream_release(w->stream, id);
}

int llm_weights_abort_pass(struct llm_weights_src *w)
{
	while (w->mode == LLM_WEIGHTS_STREAM && w->next != 0) {
		uint32_t id = w->order[w->next];
		const float *p;
		int rc = llm_weights_get(w, id, &p);

		if (rc)
			return rc;
		llm_weights_put(w, id);
	}
	return 0;
}

int llm_weights_embed(struct llm_weights_src *w, const struct llm_config *mc,
		      const int32_t *tokens, uint32_t n, float *x)
{
	struct kv_tensor_info ti;
	size_t row = (size_t)mc->dim * sizeof(float);

	kv_tensor_index_get(w->index, llm_tensor_emb(mc), &ti);
	for (uint32_t i = 0; i < n; i++) {
		uint64_t off = ti.offset + (uint64_t)tokens[i] * row;

		if (w->mode != LLM_WEIGHTS_STREAM) {
			memcpy(x + (size_t)i * mc->dim, w->image + off, row);
			continue;
		}
		for (size_t got = 0; got < row;) {
			ssize_t r = pread(w->fd, (uint8_t *)(x + (size_t)i * mc->dim) + got,
					  row - got, (off_t)(off + got));

			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				return kv_fail(r < 0 ? -errno : -EIO,
					       "weights: embedding row %" PRId32 ": read: %s", tokens[i],
					       r < 0 ? strerror(errno) : "end of file");
			got += (size_t)r;
		}
	}
	return 0;
}
