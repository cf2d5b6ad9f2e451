// SPDX-License-Identifier: MIT
/*
 * The llama2.c checkpoint: its header, the sizes it implies, and the
 * offload layer's tensor index over the file. Every size is checked with
 * overflow-safe arithmetic before anything is read or mapped.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "llama.h"
#include "taxonomy/kv-private.h"

/* Bounds far above any real model, so a hostile header cannot make the
 * arithmetic or an allocation absurd. */
#define MAX_DIM (1u << 16)
#define MAX_HIDDEN (1u << 18)
#define MAX_LAYERS 1024u
#define MAX_VOCAB (1u << 22)

static int32_t le32(const uint8_t *p)
{
	return (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
			 (uint32_t)p[3] << 24);
}

static void put_le32(uint8_t *p, int32_t v)
{
	uint32_t u = (uint32_t)v;

	p[0] = (uint8_t)u;
	p[1] = (uint8_t)(u >> 8);
	p[2] = (uint8_t)(u >> 16);
	p[3] = (uint8_t)(u >> 24);
}

/* a * b + c in 64 bits, or false on overflow. */
static bool mul_add(uint64_t a, uint64_t b, uint64_t *acc)
{
	uint64_t p;

	if (__builtin_mul_overflow(a, b, &p) || __builtin_add_overflow(*acc, p, acc))
		return false;
	return true;
}

static int check_field(const char *name, uint32_t v, uint32_t max)
{
	if (v == 0 || v > max)
		return kv_fail(-EINVAL, "checkpoint header: %s = %" PRIu32 ", expected 1..%" PRIu32,
			       name, v, max);
	return 0;
}

int llm_config_check(struct llm_config *c)
{
	int rc;

	if (!c)
		return kv_fail(-EINVAL, "llm_config_check: NULL config");
	if ((rc = check_field("dim", c->dim, MAX_DIM)) ||
	    (rc = check_field("hidden_dim", c->hidden_dim, MAX_HIDDEN)) ||
	    (rc = check_field("n_layers", c->n_layers, MAX_LAYERS)) ||
	    (rc = check_field("n_heads", c->n_heads, c->dim < KV_CACHE_MAX_HEADS ? c->dim : KV_CACHE_MAX_HEADS)) ||
	    (rc = check_field("n_kv_heads", c->n_kv_heads, c->n_heads)) ||
	    (rc = check_field("vocab_size", c->vocab_size, MAX_VOCAB)) ||
	    (rc = check_field("seq_len", c->seq_len, LLM_MAX_SEQ_LEN)))
		return rc;
	if (c->dim % c->n_heads)
		return kv_fail(-EINVAL, "checkpoint header: dim %" PRIu32 " is not a multiple of n_heads %" PRIu32,
			       c->dim, c->n_heads);
	if (c->n_heads % c->n_kv_heads)
		return kv_fail(-EINVAL, "checkpoint header: n_heads %" PRIu32 " is not a multiple of n_kv_heads %" PRIu32,
			       c->n_heads, c->n_kv_heads);
	c->head_size = c->dim / c->n_heads;
	if (c->head_size % 2)
		return kv_fail(-EINVAL, "checkpoint header: head size %" PRIu32 " (dim / n_heads) is odd; RoPE needs pairs",
			       c->head_size);
	if (c->head_size > KV_CACHE_MAX_HEAD_DIM)
		return kv_fail(-EINVAL, "checkpoint header: head size %" PRIu32 " above %u",
			       c->head_size, KV_CACHE_MAX_HEAD_DIM);
	c->kv_dim = c->n_kv_heads * c->head_size;
	uint64_t bytes;
	return llm_config_file_bytes(c, &bytes);
}

int llm_config_file_bytes(const struct llm_config *c, uint64_t *out)
{
	uint64_t L = c->n_layers, dim = c->dim, hid = c->hidden_dim, kvd = c->kv_dim;
	uint64_t floats = 0, per_layer = 0;

	/* Per layer: two norms, wq, wk, wv, wo, w1, w2, w3. */
	if (!mul_add(2, dim, &per_layer) || !mul_add(dim, dim, &per_layer) ||
	    !mul_add(2 * kvd, dim, &per_layer) || !mul_add(dim, dim, &per_layer) ||
	    !mul_add(3 * hid, dim, &per_layer) || !mul_add(L, per_layer, &floats) ||
	    !mul_add(c->vocab_size, dim, &floats) || /* embedding */
	    !mul_add(1, dim, &floats) ||             /* final norm */
	    !mul_add(c->seq_len, c->head_size, &floats) || /* two tables of seq*hs/2 */
	    (!c->shared_classifier && !mul_add(c->vocab_size, dim, &floats)) ||
	    floats > (UINT64_MAX - LLM_HEADER_BYTES) / 4)
		return kv_fail(-EOVERFLOW, "checkpoint header: sizes overflow 64 bits (dim %" PRIu32
			       ", hidden %" PRIu32 ", layers %" PRIu32 ", vocab %" PRIu32 ")",
			       c->dim, c->hidden_dim, c->n_layers, c->vocab_size);
	*out = LLM_HEADER_BYTES + floats * 4;
	return 0;
}

int llm_config_parse(const void *buf, size_t len, uint64_t file_bytes, struct llm_config *out)
{
	const uint8_t *p = buf;
	const char *names[7] = { "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
				 "vocab_size", "seq_len" };
	int32_t v[7];
	struct llm_config c = { 0 };
	uint64_t want;
	int rc;

	if (!buf || !out)
		return kv_fail(-EINVAL, "llm_config_parse: NULL argument");
	if (len < LLM_HEADER_BYTES || file_bytes < LLM_HEADER_BYTES)
		return kv_fail(-EFBIG, "checkpoint: %" PRIu64 " bytes, shorter than the %u-byte header",
			       len < file_bytes ? (uint64_t)len : file_bytes, LLM_HEADER_BYTES);
	for (int i = 0; i < 7; i++) {
		v[i] = le32(p + 4 * i);
		/* vocab_size alone may be negative (an unshared classifier). */
		if (v[i] <= 0 && !(i == 5 && v[i] < 0 && v[i] != INT32_MIN))
			return kv_fail(-EINVAL, "checkpoint header: %s = %" PRId32 ", expected a positive size",
				       names[i], v[i]);
	}
	c.dim = (uint32_t)v[0];
	c.hidden_dim = (uint32_t)v[1];
	c.n_layers = (uint32_t)v[2];
	c.n_heads = (uint32_t)v[3];
	c.n_kv_heads = (uint32_t)v[4];
	c.shared_classifier = v[5] > 0;
	c.vocab_size = (uint32_t)(v[5] > 0 ? v[5] : -v[5]);
	c.seq_len = (uint32_t)v[6];
	if ((rc = llm_config_check(&c)))
		return rc;
	if ((rc = llm_config_file_bytes(&c, &want)))
		return rc;
	if (file_bytes < want)
		return kv_fail(-EFBIG, "checkpoint: the header (dim %" PRIu32 ", hidden %" PRIu32
			       ", layers %" PRIu32 ", heads %" PRIu32 "/%" PRIu32 ", vocab %" PRIu32
			       "%s, seq_len %" PRIu32 ") needs %" PRIu64 " bytes, the file has %" PRIu64
			       " (truncated?)",
			       c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size,
			       c.shared_classifier ? "" : " unshared", c.seq_len, want, file_bytes);
	if (file_bytes > want)
		return kv_fail(-EBADMSG, "checkpoint: the header needs %" PRIu64 " bytes, the file has %" PRIu64
			       " (%" PRIu64 " trailing bytes: %s)",
			       want, file_bytes, file_bytes - want,
			       c.shared_classifier ? "an unshared classifier with a positive vocab_size?"
						   : "not a llama2.c checkpoint?");
	*out = c;
	return 0;
}

void llm_config_header(const struct llm_config *c, uint8_t out[LLM_HEADER_BYTES])
{
	put_le32(out, (int32_t)c->dim);
	put_le32(out + 4, (int32_t)c->hidden_dim);
	put_le32(out + 8, (int32_t)c->n_layers);
	put_le32(out + 12, (int32_t)c->n_heads);
	put_le32(out + 16, (int32_t)c->n_kv_heads);
	put_le32(out + 20, c->shared_classifier ? (int32_t)c->vocab_size : -(int32_t)c->vocab_size);
	put_le32(out + 24, (int32_t)c->seq_len);
}

uint32_t llm_tensor_emb(const struct llm_config *cfg)
{
	(void)cfg;
	return 0;
}

uint32_t llm_tensor_layer(const struct llm_config *cfg, uint32_t layer, enum llm_tensor t)
{
	(void)cfg;
	return 1 + layer * LLM_T_PER_LAYER + (uint32_t)t;
}

uint32_t llm_tensor_norm(const struct llm_config *cfg)
{
	return 1 + cfg->n_layers * LLM_T_PER_LAYER;
}

uint32_t llm_tensor_cls(const struct llm_config *cfg)
{
	return cfg->shared_classifier ? 0 : llm_tensor_norm(cfg) + 1;
}

uint32_t llm_cls_chunk_rows(const struct llm_config *cfg)
{
	uint32_t rows = LLM_CLS_CHUNK_BYTES / (cfg->dim * 4u);

	return rows ? rows : 1;
}

uint32_t llm_cls_chunks(const struct llm_config *cfg)
{
	uint32_t rows = llm_cls_chunk_rows(cfg);

	return (cfg->vocab_size + rows - 1) / rows;
}

uint32_t llm_tensor_cls_chunk(const struct llm_config *cfg, uint32_t k)
{
	return llm_tensor_norm(cfg) + 1 + !cfg->shared_classifier + k;
}

static int add(struct kv_tensor_index *idx, const char *name, uint64_t offset, uint64_t rows,
	       uint64_t cols)
{
	struct kv_tensor_info t = { .offset = offset, .dtype = KV_DTYPE_F32 };

	snprintf(t.name, sizeof(t.name), "%s", name);
	t.bytes = rows * cols * 4;
	if (rows == 1) {
		t.n_dims = 1;
		t.shape[0] = cols;
	} else {
		t.n_dims = 2;
		t.shape[0] = rows;
		t.shape[1] = cols;
	}
	return kv_tensor_index_add(idx, &t, NULL);
}

int llm_tensor_index_build(const struct llm_config *c, struct kv_tensor_index **out)
{
	static const char *const names[LLM_T_PER_LAYER] = {
		[LLM_T_ATT_NORM] = "attention_norm", [LLM_T_WQ] = "wq", [LLM_T_WK] = "wk",
		[LLM_T_WV] = "wv", [LLM_T_WO] = "wo", [LLM_T_FFN_NORM] = "ffn_norm",
		[LLM_T_W1] = "w1", [LLM_T_W3] = "w3", [LLM_T_W2] = "w2",
	};
	uint64_t L = c->n_layers, dim = c->dim, hid = c->hidden_dim, kvd = c->kv_dim;
	/* Offsets of the stacked (L, ...) arrays in file order. */
	uint64_t off = LLM_HEADER_BYTES, emb, base[LLM_T_PER_LAYER], rows[LLM_T_PER_LAYER],
		 cols[LLM_T_PER_LAYER], norm, cls;
	static const enum llm_tensor file_order[LLM_T_PER_LAYER] = {
		LLM_T_ATT_NORM, LLM_T_WQ, LLM_T_WK, LLM_T_WV, LLM_T_WO,
		LLM_T_FFN_NORM, LLM_T_W1, LLM_T_W2, LLM_T_W3,
	};
	struct kv_tensor_index *idx;
	uint64_t bytes;
	int rc;

	if (!c || !out)
		return kv_fail(-EINVAL, "llm_tensor_index_build: NULL argument");
	if ((rc = llm_config_file_bytes(c, &bytes)))
		return rc;
	rows[LLM_T_ATT_NORM] = 1, cols[LLM_T_ATT_NORM] = dim;
	rows[LLM_T_WQ] = dim, cols[LLM_T_WQ] = dim;
	rows[LLM_T_WK] = kvd, cols[LLM_T_WK] = dim;
	rows[LLM_T_WV] = kvd, cols[LLM_T_WV] = dim;
	rows[LLM_T_WO] = dim, cols[LLM_T_WO] = dim;
	rows[LLM_T_FFN_NORM] = 1, cols[LLM_T_FFN_NORM] = dim;
	rows[LLM_T_W1] = hid, cols[LLM_T_W1] = dim;
	rows[LLM_T_W2] = dim, cols[LLM_T_W2] = hid;
	rows[LLM_T_W3] = hid, cols[LLM_T_W3] = dim;
	emb = off;
	off += (uint64_t)c->vocab_size * dim * 4;
	for (int i = 0; i < LLM_T_PER_LAYER; i++) {
		enum llm_tensor t = file_order[i];

		base[t] = off;
		off += L * rows[t] * cols[t] * 4;
	}
	norm = off;
	off += dim * 4 + (uint64_t)c->seq_len * c->head_size * 4;
	cls = off;

	if ((rc = kv_tensor_index_create(&idx)))
		return rc;
	rc = add(idx, "tok_embeddings", emb, c->vocab_size, dim);
	for (uint32_t l = 0; l < c->n_layers && !rc; l++) {
		for (int t = 0; t < LLM_T_PER_LAYER && !rc; t++) {
			char name[KV_TENSOR_NAME_MAX + 1];

			snprintf(name, sizeof(name), "layers.%" PRIu32 ".%s", l, names[t]);
			rc = add(idx, name, base[t] + l * rows[t] * cols[t] * 4, rows[t], cols[t]);
		}
	}
	if (!rc)
		rc = add(idx, "norm", norm, 1, dim);
	if (!rc && !c->shared_classifier)
		rc = add(idx, "output", cls, c->vocab_size, dim);
	if (c->shared_classifier)
		cls = emb;
	for (uint32_t k = 0, cr = llm_cls_chunk_rows(c); k < llm_cls_chunks(c) && !rc; k++) {
		uint32_t first = k * cr, n = c->vocab_size - first < cr ? c->vocab_size - first : cr;
		char name[KV_TENSOR_NAME_MAX + 1];

		snprintf(name, sizeof(name), "output.%" PRIu32, k);
		rc = add(idx, name, cls + (uint64_t)first * dim * 4, n, dim);
	}
	if (!rc)
		rc = kv_tensor_index_validate(idx, bytes);
	if (rc) {
		kv_tensor_index_destroy(idx);
		return rc;
	}
	*out = idx;
	return 0;
}

int llm_checkpoint_read_config(const char *path, struct llm_config *out)
{
	uint8_t hdr[LLM_HEADER_BYTES];
	struct stat st;
	ssize_t got = 0;
	int fd, rc;

	if (!path || !out)
		return kv_fail(-EINVAL, "llm_checkpoint_read_config: NULL argument");
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return kv_fail(-errno, "checkpoint '%s': open: %s", path, strerror(errno));
	if (fstat(fd, &st) < 0) {
		rc = kv_fail(-errno, "checkpoint '%s': fstat: %s", path, strerror(errno));
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = kv_fail(-EINVAL, "checkpoint '%s': not a regular file", path);
		goto out;
	}
	while (got < (ssize_t)sizeof(hdr)) {
		ssize_t n = pread(fd, hdr + got, sizeof(hdr) - (size_t)got, got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			rc = kv_fail(-errno, "checkpoint '%s': read: %s", path, strerror(errno));
			goto out;
		}
		if (n == 0)
			break;
		got += n;
	}
	rc = llm_config_parse(hdr, (size_t)got, (uint64_t)st.st_size, out);
	if (rc) {
		char detail[512];

		snprintf(detail, sizeof(detail), "%s", kv_last_error());
		rc = kv_fail(rc, "'%s': %s", path, detail);
	}
out:
	close(fd);
	return rc;
}
