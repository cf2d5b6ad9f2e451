// SPDX-License-Identifier: MIT
/*
 * The forward pass: a batch of sequences, each contributing some tokens
 * (a prompt chunk, or one token when decoding), runs through every layer
 * as matrix products over all its tokens at once (sgemm; sgemv for a
 * single token), with K/V written into libkv's paged cache and attention
 * read through its block tables (kv_attention).
 */
#include <cblas.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <xxhash.h>

#include "engine-impl.h"
#include "taxonomy/kv-private.h"

/* Rows a pass holds at most: prompts longer than this run in chunks. */
#define PASS_ROWS 512u

struct llm_engine {
	struct llm_config m;
	struct llm_engine_config cfg;
	char label[64];
	struct kv_registry *reg;
	bool own_reg;
	struct llm_weights_src w;
	struct kv_cache *cache;
	struct kv_arena *act;          /* activations, kind ACTIVATIONS */
	uint32_t rows;                 /* capacity of the buffers below */
	float *x, *xb, *q, *k, *v, *att, *h1, *h3, *xf;
	float *rope_cos, *rope_sin;    /* (rows, head_size / 2) */
	float *logits;                 /* (max_batch, vocab): prefill's */
	float *inv_freq;               /* (head_size / 2) */
	uint32_t *pos;                 /* (rows) position of each row */
	int32_t *tok;                  /* (rows) */
	kv_seq_id *pass_seqs;          /* (max_batch) */
	uint32_t *pass_n;              /* (max_batch) */
	uint32_t *pass_idx;            /* (max_batch) */
	bool *pass_want;               /* (max_batch) */
	struct llm_engine_stats st;
};

void llm_engine_config_default(struct llm_engine_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->weights = LLM_WEIGHTS_DRAM;
	cfg->weight_budget_frac = 0.25;
	cfg->place.numa = KV_NUMA_FIRST_TOUCH;
	cfg->place.huge = KV_HUGE_THP;
	cfg->max_batch = 64;
	cfg->kv_dtype = KV_DTYPE_F32;
	cfg->block_tokens = 16;
	cfg->prefix_cache = true;
	cfg->kv_watermark = 0.9;
	cfg->label = "llama";
}

const struct llm_config *llm_engine_model(const struct llm_engine *e)
{
	return &e->m;
}

struct kv_cache *llm_engine_cache(struct llm_engine *e)
{
	return e->cache;
}

struct kv_registry *llm_engine_registry(struct llm_engine *e)
{
	return e->reg;
}

/* The store identity's model key: the shape and a hash of the file's
 * first MiB of weights and its size, so a store is never reused for other
 * weights of the same shape. */
static void model_key(const struct llm_engine *e, char *buf, size_t len)
{
	uint8_t *tmp = malloc(1u << 20);
	uint64_t h = 0;
	int fd = open(e->cfg.model_path, O_RDONLY | O_CLOEXEC);

	if (tmp && fd >= 0) {
		ssize_t n = pread(fd, tmp, 1u << 20, 0);

		if (n > 0)
			h = XXH3_64bits(tmp, (size_t)n);
	}
	if (fd >= 0)
		close(fd);
	free(tmp);
	snprintf(buf, len, "llama2c d%" PRIu32 " h%" PRIu32 " l%" PRIu32 " q%" PRIu32 " kv%" PRIu32
		 " v%" PRIu32 " s%" PRIu32 " bytes %" PRIu64 " xxh3 %016" PRIx64,
		 e->m.dim, e->m.hidden_dim, e->m.n_layers, e->m.n_heads, e->m.n_kv_heads,
		 e->m.vocab_size, e->m.seq_len, e->w.file_bytes, h);
}

/* The CPUs this process may run on (a container's or taskset's share,
 * not the host's count). */
static int usable_cpus(void)
{
	cpu_set_t set;

	if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
		return CPU_COUNT(&set);
	return 1;
}

static int make_cache(struct llm_engine *e)
{
	struct kv_cache_config cc;
	char key[256], label[96];

	kv_cache_config_default(&cc);
	cc.n_layers = e->m.n_layers;
	cc.n_kv_heads = e->m.n_kv_heads;
	cc.head_dim = e->m.head_size;
	cc.block_tokens = e->cfg.block_tokens ? e->cfg.block_tokens : 16;
	cc.dtype = e->cfg.kv_dtype;
	cc.capacity_bytes = e->cfg.kv_budget;
	/* Default: every sequence of a full batch at seq_len, plus a block
	 * each for copy on write (the pool commits memory as it is used). */
	if (!cc.capacity_bytes)
		cc.capacity_blocks = e->cfg.max_batch *
				     ((e->m.seq_len + cc.block_tokens - 1) / cc.block_tokens + 1);
	cc.max_seqs = e->cfg.max_batch * 2 + 16;
	cc.place = e->cfg.place;
	cc.prefix_cache = e->cfg.prefix_cache;
	cc.threads = e->cfg.threads ? e->cfg.threads : (uint32_t)usable_cpus();
	cc.registry = e->reg;
	snprintf(label, sizeof(label), "%s/kv", e->label);
	cc.label = label;
	if (e->cfg.kv_store) {
		model_key(e, key, sizeof(key));
		cc.model_key = key;
		cc.spill.dir = e->cfg.kv_store;
		cc.spill.capacity = e->cfg.kv_store_capacity;
		if (e->cfg.kv_watermark > 0)
			cc.spill.watermark = e->cfg.kv_watermark;
	}
	return kv_cache_create(&cc, &e->cache);
}

static int alloc_buffers(struct llm_engine *e)
{
	const struct llm_config *m = &e->m;
	uint32_t rows = e->rows = PASS_ROWS > e->cfg.max_batch ? PASS_ROWS : e->cfg.max_batch;
	size_t half = m->head_size / 2;
	size_t floats = (size_t)rows * (4 * (size_t)m->dim + 2 * (size_t)m->kv_dim +
					2 * (size_t)m->hidden_dim + 2 * half) +
			(size_t)e->cfg.max_batch * (m->dim + (size_t)m->vocab_size) + half;
	struct kv_arena_config acfg;
	char label[96];
	float *p;
	int rc;

	kv_arena_config_default(&acfg);
	acfg.bytes = floats * sizeof(float) + 64 * 16;
	acfg.place = e->cfg.place;
	acfg.place.huge = KV_HUGE_NONE;
	acfg.kind = KV_KIND_ACTIVATIONS;
	acfg.registry = e->reg;
	snprintf(label, sizeof(label), "%s/activations", e->label);
	acfg.label = label;
	if ((rc = kv_arena_create(&acfg, &e->act)))
		return rc;
	if ((rc = kv_arena_alloc(e->act, floats * sizeof(float), 64, (void **)&p)))
		return rc;
	e->x = p, p += (size_t)rows * m->dim;
	e->xb = p, p += (size_t)rows * m->dim;
	e->q = p, p += (size_t)rows * m->dim;
	e->att = p, p += (size_t)rows * m->dim;
	e->k = p, p += (size_t)rows * m->kv_dim;
	e->v = p, p += (size_t)rows * m->kv_dim;
	e->h1 = p, p += (size_t)rows * m->hidden_dim;
	e->h3 = p, p += (size_t)rows * m->hidden_dim;
	e->rope_cos = p, p += (size_t)rows * half;
	e->rope_sin = p, p += (size_t)rows * half;
	e->xf = p, p += (size_t)e->cfg.max_batch * m->dim;
	e->logits = p, p += (size_t)e->cfg.max_batch * m->vocab_size;
	e->inv_freq = p;
	for (size_t i = 0; i < half; i++)
		e->inv_freq[i] = 1.0f / powf(10000.0f, (float)(2 * i) / (float)m->head_size);
	e->pos = calloc(rows, sizeof(*e->pos));
	e->tok = calloc(rows, sizeof(*e->tok));
	e->pass_seqs = calloc(e->cfg.max_batch, sizeof(*e->pass_seqs));
	e->pass_n = calloc(e->cfg.max_batch, sizeof(*e->pass_n));
	e->pass_idx = calloc(e->cfg.max_batch, sizeof(*e->pass_idx));
	e->pass_want = calloc(e->cfg.max_batch, sizeof(*e->pass_want));
	if (!e->pos || !e->tok || !e->pass_seqs || !e->pass_n || !e->pass_idx || !e->pass_want)
		return kv_fail(-ENOMEM, "engine: out of memory");
	return 0;
}

int llm_engine_create(const struct llm_engine_config *cfg, struct llm_engine **out)
{
	struct llm_engine *e;
	char detail[512];
	int rc;

	if (!cfg || !out || !cfg->model_path)
		return kv_fail(-EINVAL, "llm_engine_create: NULL config, out or model_path");
	if (cfg->max_batch == 0 || cfg->max_batch > 4096)
		return kv_fail(-EINVAL, "engine: max_batch %" PRIu32 ", expected 1..4096",
			       cfg->max_batch);
	if (cfg->kv_dtype != KV_DTYPE_F32 && cfg->kv_dtype != KV_DTYPE_F16 &&
	    cfg->kv_dtype != KV_DTYPE_BF16 && cfg->kv_dtype != KV_DTYPE_I8)
		return kv_fail(-EINVAL, "engine: KV dtype %d: expected f32, f16, bf16 or int8",
			       (int)cfg->kv_dtype);
	e = calloc(1, sizeof(*e));
	if (!e)
		return kv_fail(-ENOMEM, "engine: out of memory");
	e->cfg = *cfg;
	e->cfg.label = NULL;
	e->cfg.registry = NULL;
	snprintf(e->label, sizeof(e->label), "%s", cfg->label ? cfg->label : "llama");
	e->w.fd = -1;
	if ((rc = llm_checkpoint_read_config(cfg->model_path, &e->m)))
		goto fail;
	if (cfg->registry) {
		e->reg = cfg->registry;
	} else {
		if ((rc = kv_registry_create(NULL, &e->reg)))
			goto fail;
		e->own_reg = true;
	}
	if ((rc = llm_weights_open(&e->w, cfg, &e->m, e->reg, e->label)) ||
	    (rc = make_cache(e)) || (rc = alloc_buffers(e)))
		goto fail;
	e->st.weight_bytes = e->w.pass_bytes;
	e->st.file_bytes = e->w.file_bytes;
	e->st.stream_budget = cfg->weights == LLM_WEIGHTS_STREAM ? e->w.budget : 0;
	*out = e;
	return 0;
fail:
	snprintf(detail, sizeof(detail), "%s", kv_last_error());
	llm_engine_destroy(e);
	return kv_fail(rc, "%s", detail);
}

void llm_engine_destroy(struct llm_engine *e)
{
	if (!e)
		return;
	if (e->cache) {
		/* The SSD tier keeps what this run computed for the next one. */
		if (e->cfg.kv_store && kv_cache_persist(e->cache))
			kv_log(KV_LOG_WARN, "kv-llama: persisting the prefix cache: %s",
			       kv_last_error());
		kv_cache_destroy(e->cache);
	}
	llm_weights_close(&e->w);
	if (e->act)
		kv_arena_destroy(e->act, KV_ARENA_FORCE);
	free(e->pos);
	free(e->tok);
	free(e->pass_seqs);
	free(e->pass_n);
	free(e->pass_idx);
	free(e->pass_want);
	if (e->own_reg)
		kv_registry_destroy(e->reg, KV_REGISTRY_FORCE);
	free(e);
}

int llm_seq_new(struct llm_engine *e, kv_seq_id *out)
{
	return kv_seq_create(e->cache, NULL, out);
}

int llm_seq_fork(struct llm_engine *e, kv_seq_id parent, kv_seq_id *child)
{
	return kv_seq_fork(e->cache, parent, child);
}

int llm_seq_free(struct llm_engine *e, kv_seq_id s)
{
	return kv_seq_free(e->cache, s);
}

/* ---- The math ---------------------------------------------------------- */

/* y (n, out) = x (n, in) W^T, W (out, in) row-major; beta 1 adds to y. */
static void matmul(uint32_t n, uint32_t out, uint32_t in, const float *w, const float *x,
		   float *y, float beta)
{
	/* set_threads() gave OpenBLAS the engine's thread count. */
	llm_matmul(n, out, in, w, x, y, beta, (uint32_t)openblas_get_num_threads());
}

static void rmsnorm(uint32_t n, uint32_t dim, const float *x, const float *w, float *out)
{
	for (uint32_t r = 0; r < n; r++) {
		const float *xr = x + (size_t)r * dim;
		float *o = out + (size_t)r * dim, ss = 0;

		for (uint32_t i = 0; i < dim; i++)
			ss += xr[i] * xr[i];
		ss = 1.0f / sqrtf(ss / (float)dim + 1e-5f);
		for (uint32_t i = 0; i < dim; i++)
			o[i] = w[i] * (ss * xr[i]);
	}
}

/* Rotate the interleaved pairs (i, i + 1) of each head of rows (n, width)
 * by pos * inv_freq[(i mod head_size) / 2]. */
static void rope(const struct llm_engine *e, uint32_t n, float *t, uint32_t width)
{
	uint32_t hs = e->m.head_size, half = hs / 2;

	for (uint32_t r = 0; r < n; r++) {
		const float *c = e->rope_cos + (size_t)r * half, *s = e->rope_sin + (size_t)r * half;
		float *row = t + (size_t)r * width;

		for (uint32_t h = 0; h < width; h += hs)
			for (uint32_t j = 0; j < half; j++) {
				float a = row[h + 2 * j], b = row[h + 2 * j + 1];

				row[h + 2 * j] = a * c[j] - b * s[j];
				row[h + 2 * j + 1] = a * s[j] + b * c[j];
			}
	}
}

static void swiglu(size_t n, float *h1, const float *h3)
{
	for (size_t i = 0; i < n; i++)
		h1[i] = h1[i] / (1.0f + expf(-h1[i])) * h3[i];
}

/* One pass over the weights for pass_n[i] new tokens of each of n
 * sequences, already appended (rows in sequence order, tokens in e->tok,
 * positions in e->pos). The last row of each sequence i with want[i]
 * (want NULL: every sequence) gets its logits, packed into out (wanted,
 * vocab). */
static int forward_pass(struct llm_engine *e, uint32_t n, uint32_t rows, const bool *want,
			float *out)
{
	const struct llm_config *m = &e->m;
	struct llm_weights_src *w = &e->w;
	uint32_t half = m->head_size / 2;
	const float *t[LLM_T_PER_LAYER];
	struct kv_attn_batch ab = {
		.n_seqs = n, .seqs = e->pass_seqs, .n_queries = e->pass_n,
		.n_q_heads = m->n_heads, .q = e->q, .out = e->att,
	};
	int rc;

	if ((rc = llm_weights_embed(w, m, e->tok, rows, e->x)))
		return rc;
	for (uint32_t r = 0; r < rows; r++)
		for (uint32_t j = 0; j < half; j++) {
			float a = (float)e->pos[r] * e->inv_freq[j];

			e->rope_cos[(size_t)r * half + j] = cosf(a);
			e->rope_sin[(size_t)r * half + j] = sinf(a);
		}
	for (uint32_t l = 0; l < m->n_layers; l++) {
		uint32_t row = 0;

		/* Each tensor is taken when used and given back at once, in the
		 * order the streamer was told (enum llm_tensor order). */
#define TAKE(T) do { if ((rc = llm_weights_get(w, llm_tensor_layer(m, l, T), &t[T]))) return rc; } while (0)
#define GIVE(T) llm_weights_put(w, llm_tensor_layer(m, l, T))
		TAKE(LLM_T_ATT_NORM);
		rmsnorm(rows, m->dim, e->x, t[LLM_T_ATT_NORM], e->xb);
		GIVE(LLM_T_ATT_NORM);
		TAKE(LLM_T_WQ);
		matmul(rows, m->dim, m->dim, t[LLM_T_WQ], e->xb, e->q, 0);
		GIVE(LLM_T_WQ);
		TAKE(LLM_T_WK);
		matmul(rows, m->kv_dim, m->dim, t[LLM_T_WK], e->xb, e->k, 0);
		GIVE(LLM_T_WK);
		TAKE(LLM_T_WV);
		matmul(rows, m->kv_dim, m->dim, t[LLM_T_WV], e->xb, e->v, 0);
		GIVE(LLM_T_WV);
		rope(e, rows, e->q, m->dim);
		rope(e, rows, e->k, m->kv_dim);
		for (uint32_t i = 0; i < n; i++) {
			size_t off = (size_t)row * m->kv_dim;

			rc = kv_seq_write(e->cache, e->pass_seqs[i], l, e->pos[row], e->pass_n[i],
					  e->k + off, e->v + off);
			if (rc)
				return rc;
			row += e->pass_n[i];
		}
		if ((rc = kv_attention(e->cache, l, &ab)))
			return rc;
		TAKE(LLM_T_WO);
		matmul(rows, m->dim, m->dim, t[LLM_T_WO], e->att, e->x, 1);
		GIVE(LLM_T_WO);
		TAKE(LLM_T_FFN_NORM);
		rmsnorm(rows, m->dim, e->x, t[LLM_T_FFN_NORM], e->xb);
		GIVE(LLM_T_FFN_NORM);
		TAKE(LLM_T_W1);
		matmul(rows, m->hidden_dim, m->dim, t[LLM_T_W1], e->xb, e->h1, 0);
		GIVE(LLM_T_W1);
		TAKE(LLM_T_W3);
		matmul(rows, m->hidden_dim, m->dim, t[LLM_T_W3], e->xb, e->h3, 0);
		GIVE(LLM_T_W3);
		swiglu((size_t)rows * m->hidden_dim, e->h1, e->h3);
		TAKE(LLM_T_W2);
		matmul(rows, m->dim, m->hidden_dim, t[LLM_T_W2], e->h1, e->x, 1);
		GIVE(LLM_T_W2);
#undef TAKE
#undef GIVE
	}
	/* The last row of each wanted sequence, normed, through the
	 * classifier (taken even when no row is wanted: the stream's order). */
	const float *norm, *cls;
	uint32_t row = 0, k = 0;

	if ((rc = llm_weights_get(w, llm_tensor_norm(m), &norm)))
		return rc;
	for (uint32_t i = 0; i < n; i++) {
		row += e->pass_n[i];
		if (!want || want[i])
			rmsnorm(1, m->dim, e->x + (size_t)(row - 1) * m->dim, norm,
				e->xf + (size_t)k++ * m->dim);
	}
	llm_weights_put(w, llm_tensor_norm(m));
	/* Logits chunk by chunk of the classifier's rows: (k, rows) blocks of
	 * out, which has (k, vocab). */
	for (uint32_t c = 0, crows = llm_cls_chunk_rows(m); c < llm_cls_chunks(m); c++) {
		uint32_t first = c * crows;
		uint32_t nr = m->vocab_size - first < crows ? m->vocab_size - first : crows;
		uint32_t id = llm_tensor_cls_chunk(m, c);

		if ((rc = llm_weights_get(w, id, &cls)))
			return rc;
		if (k == 1)
			matmul(1, nr, m->dim, cls, e->xf, out + first, 0);
		else if (k)
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)k, (int)nr, (int)m->dim,
				    1.0f, e->xf, (int)m->dim, cls, (int)m->dim, 0.0f, out + first,
				    (int)m->vocab_size);
		llm_weights_put(w, id);
	}
	return 0;
}

static int forward(struct llm_engine *e, uint32_t n, uint32_t rows, const bool *want,
		   float *out)
{
	int rc = forward_pass(e, n, rows, want, out);

	if (rc) {
		char detail[512];

		snprintf(detail, sizeof(detail), "%s", kv_last_error());
		if (llm_weights_abort_pass(&e->w))
			kv_log(KV_LOG_WARN, "kv-llama: the weight stream is out of step: %s",
			       kv_last_error());
		return kv_fail(rc, "%s", detail);
	}
	return 0;
}

static void set_threads(struct llm_engine *e)
{
	openblas_set_num_threads(e->cfg.threads ? (int)e->cfg.threads : usable_cpus());
}

/* ---- Prefill and decode ------------------------------------------------- */

static bool same_first_block(const struct llm_engine *e, const int32_t *a, uint32_t na,
			     const int32_t *b, uint32_t nb)
{
	uint32_t bt = e->cfg.block_tokens ? e->cfg.block_tokens : 16;

	/* A prompt only leaves full blocks that precede its last token. */
	if (na <= bt || nb <= bt)
		return false;
	return memcmp(a, b, bt * sizeof(*a)) == 0;
}

int llm_prefill(struct llm_engine *e, uint32_t n, const kv_seq_id *seqs,
		const int32_t *const *prompts, const uint32_t *lens, float *logits,
		uint32_t *cached)
{
	const struct llm_config *m = &e->m;
	uint32_t *done = NULL, *state = NULL;
	bool *follower = NULL;
	uint64_t t0 = kv_now_ns();
	int rc = 0;

	if (!e || !seqs || !prompts || !lens || !logits)
		return kv_fail(-EINVAL, "llm_prefill: NULL argument");
	if (n == 0 || n > e->cfg.max_batch)
		return kv_fail(-EINVAL, "llm_prefill: %" PRIu32 " sequences, expected 1..%" PRIu32,
			       n, e->cfg.max_batch);
	for (uint32_t i = 0; i < n; i++) {
		if (lens[i] == 0 || lens[i] > m->seq_len)
			return kv_fail(-EINVAL, "prompt %" PRIu32 ": %" PRIu32 " tokens, the model takes 1..%" PRIu32
				       " (seq_len)", i, lens[i], m->seq_len);
		for (uint32_t j = 0; j < lens[i]; j++)
			if (prompts[i][j] < 0 || (uint32_t)prompts[i][j] >= m->vocab_size)
				return kv_fail(-EINVAL, "prompt %" PRIu32 ": token %" PRIu32 " is %" PRId32
					       ", outside the vocabulary of %" PRIu32,
					       i, j, prompts[i][j], m->vocab_size);
	}
	done = calloc(n, sizeof(*done));
	/* state: 0 waiting, 1 started (prompt looked up), 2 finished */
	state = calloc(n, sizeof(*state));
	follower = calloc(n, sizeof(*follower));
	if (!done || !state || !follower) {
		rc = kv_fail(-ENOMEM, "llm_prefill: out of memory");
		goto out;
	}
	for (uint32_t i = 0; i < n; i++)
		for (uint32_t j = 0; j < i && !follower[i]; j++)
			follower[i] = same_first_block(e, prompts[i], lens[i], prompts[j], lens[j]);
	set_threads(e);
	for (uint32_t finished = 0; finished < n && !rc;) {
		/* Leaders (no earlier prompt has the same first block) start at
		 * once; followers once every leader is done, so that they hit
		 * the leaders' blocks in the prefix cache instead of computing
		 * the same prefix side by side. */
		bool leaders_done = true;

		for (uint32_t i = 0; i < n; i++)
			if (!follower[i] && state[i] != 2)
				leaders_done = false;
		for (uint32_t i = 0; i < n && !rc; i++) {
			uint32_t hit = 0;

			if (state[i] || (follower[i] && !leaders_done))
				continue;
			if ((rc = kv_seq_prompt(e->cache, seqs[i], prompts[i], lens[i], &hit)))
				break;
			/* Append the rest chunk by chunk, as each pass runs it. */
			if ((rc = kv_seq_truncate(e->cache, seqs[i], hit)))
				break;
			done[i] = hit;
			state[i] = 1;
			if (cached)
				cached[i] = hit;
			e->st.prefix_hit_tokens += hit;
		}
		if (rc)
			break;
		/* One pass: up to e->rows tokens of the started prompts. */
		uint32_t np = 0, rows = 0, *idx = e->pass_idx;
		bool *want = e->pass_want;

		for (uint32_t i = 0; i < n && rows < e->rows; i++) {
			if (state[i] != 1)
				continue;
			uint32_t take = lens[i] - done[i];

			if (take > e->rows - rows)
				take = e->rows - rows;
			if ((rc = kv_seq_append(e->cache, seqs[i], prompts[i] + done[i], take)))
				break;
			for (uint32_t j = 0; j < take; j++) {
				e->tok[rows + j] = prompts[i][done[i] + j];
				e->pos[rows + j] = done[i] + j;
			}
			e->pass_seqs[np] = seqs[i];
			e->pass_n[np] = take;
			want[np] = done[i] + take == lens[i];
			idx[np++] = i;
			rows += take;
		}
		if (!rc && np == 0)
			rc = kv_fail(-EFAULT, "llm_prefill: no prompt could start (internal error)");
		if (rc || (rc = forward(e, np, rows, want, e->logits)))
			break;
		/* Hand out the logits of the prompts this pass finished. */
		for (uint32_t p = 0, k = 0; p < np; p++) {
			uint32_t i = idx[p];

			done[i] += e->pass_n[p];
			if (!want[p])
				continue;
			memcpy(logits + (size_t)i * m->vocab_size,
			       e->logits + (size_t)k++ * m->vocab_size, sizeof(float) * m->vocab_size);
			state[i] = 2;
			finished++;
		}
		e->st.prefill_tokens += rows;
	}
out:
	if (rc) {
		for (uint32_t i = 0; i < n; i++)
			kv_seq_truncate(e->cache, seqs[i], 0);
	}
	free(done);
	free(state);
	free(follower);
	e->st.prefill_ns += kv_now_ns() - t0;
	return rc;
}

int llm_decode(struct llm_engine *e, uint32_t n, const kv_seq_id *seqs,
	       const int32_t *tokens, float *logits)
{
	const struct llm_config *m = &e->m;
	uint64_t t0 = kv_now_ns();
	uint32_t appended = 0;
	int rc = 0;

	if (!e || !seqs || !tokens || !logits)
		return kv_fail(-EINVAL, "llm_decode: NULL argument");
	if (n == 0 || n > e->cfg.max_batch)
		return kv_fail(-EINVAL, "llm_decode: %" PRIu32 " sequences, expected 1..%" PRIu32,
			       n, e->cfg.max_batch);
	for (uint32_t i = 0; i < n; i++) {
		struct kv_seq_info si;

		if (tokens[i] < 0 || (uint32_t)tokens[i] >= m->vocab_size)
			return kv_fail(-EINVAL, "llm_decode: token %" PRId32 " of sequence %" PRIu32
				       " is outside the vocabulary of %" PRIu32,
				       tokens[i], i, m->vocab_size);
		if ((rc = kv_seq_info(e->cache, seqs[i], &si)))
			return rc;
		if (si.len >= m->seq_len)
			return kv_fail(-EINVAL, "llm_decode: sequence %" PRIu32 " holds %" PRIu32
				       " tokens, the model's seq_len", i, si.len);
		e->pos[i] = si.len;
		e->tok[i] = tokens[i];
		e->pass_seqs[i] = seqs[i];
		e->pass_n[i] = 1;
	}
	set_threads(e);
	for (; appended < n; appended++)
		if ((rc = kv_seq_append(e->cache, seqs[appended], &tokens[appended], 1)))
			break;
	if (!rc)
		rc = forward(e, n, n, NULL, logits);
	if (rc) {
		/* Nothing of the step stays: the K/V some layers wrote go too. */
		char detail[512];

		snprintf(detail, sizeof(detail), "%s", kv_last_error());
		for (uint32_t i = 0; i < appended; i++)
			kv_seq_truncate(e->cache, seqs[i], e->pos[i]);
		return kv_fail(rc, "%s", detail);
	}
	e->st.decode_tokens += n;
	e->st.decode_steps++;
	e->st.decode_ns += kv_now_ns() - t0;
	return 0;
}

void llm_engine_stats(const struct llm_engine *e, struct llm_engine_stats *out)
{
	*out = e->st;
	if (e->w.stream) {
		struct kv_stream_stats ss;

		kv_stream_stats(e->w.stream, &ss);
		out->stream_stall_ns = ss.stall_ns;
		out->stream_bytes_read = ss.bytes_read;
		uint64_t busy = out->prefill_ns + out->decode_ns;
		out->stall_fraction = busy ? (double)ss.stall_ns / (double)busy : 0;
	}
}
