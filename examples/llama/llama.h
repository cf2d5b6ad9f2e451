/* SPDX-License-Identifier: MIT */
/*
 * kv-llama's engine: a Llama-architecture decoder in C on libkv, shared by
 * the kv-llama program, its tests and kv-bench (decode, sweep).
 *
 * Files are llama2.c's (github.com/karpathy/llama2.c, run.c and
 * tokenizer.py describe them): a checkpoint of seven int32 and float32
 * tensors, and a tokenizer of scored pieces. The math follows llama2.c:
 * RMSNorm (eps 1e-5), RoPE on interleaved pairs, GQA, SwiGLU.
 *
 * Errors follow <kv/core.h>: 0 or -errno, with a sentence naming what was
 * wrong (what was expected, what was found) in kv_last_error().
 */
#ifndef KV_LLAMA_H
#define KV_LLAMA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <kv/kv.h>

/* ---- Checkpoint ------------------------------------------------------- */

#define LLM_HEADER_BYTES 28u     /* seven int32 */
#define LLM_BOS 1
#define LLM_EOS 2
#define LLM_MAX_SEQ_LEN (1u << 20)

struct llm_config {
	uint32_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
	bool shared_classifier;     /* the header's vocab_size was positive */
	/* Derived: */
	uint32_t head_size;         /* dim / n_heads */
	uint32_t kv_dim;            /* n_kv_heads * head_size */
};

/* Parse the header in buf (len >= LLM_HEADER_BYTES, little-endian int32)
 * and check it, with overflow-safe arithmetic, against a file of
 * file_bytes: every size positive and within bounds, dim divisible by
 * n_heads, n_heads by n_kv_heads, head_size even, the tensors' total
 * (llm_config_file_bytes) equal to file_bytes. Errors: -EINVAL (a field:
 * the detail names it, its value and the bound), -EOVERFLOW (sizes whose
 * product overflows 64 bits), -EFBIG (the file is shorter than the header
 * says; the detail gives both sizes), -EBADMSG (longer: trailing bytes).
 * On error *out is untouched. */
int llm_config_parse(const void *buf, size_t len, uint64_t file_bytes,
		     struct llm_config *out);

/* Fill the derived fields and check a config as llm_config_parse does
 * (without a file). Errors: -EINVAL, -EOVERFLOW. */
int llm_config_check(struct llm_config *cfg);

/* Bytes of a checkpoint with this config (header included). */
int llm_config_file_bytes(const struct llm_config *cfg, uint64_t *out);

/* The config as the 28 header bytes (vocab negated when unshared). */
void llm_config_header(const struct llm_config *cfg, uint8_t out[LLM_HEADER_BYTES]);

/* Per-layer tensors, in the order the forward pass uses them. */
enum llm_tensor {
	LLM_T_ATT_NORM = 0, LLM_T_WQ, LLM_T_WK, LLM_T_WV, LLM_T_WO,
	LLM_T_FFN_NORM, LLM_T_W1, LLM_T_W3, LLM_T_W2,
	LLM_T_PER_LAYER
};

/* Tensor ids in the index llm_tensor_index_build() makes: the token
 * embedding is 0, layer l's tensor t is 1 + l * LLM_T_PER_LAYER + t, then
 * the final norm, then the classifier (which is id 0 when shared). Names:
 * "tok_embeddings", "layers.<l>.<attention_norm|wq|wk|wv|wo|ffn_norm|w1|
 * w3|w2>", "norm", "output". The two legacy RoPE tables are not indexed. */
uint32_t llm_tensor_emb(const struct llm_config *cfg);
uint32_t llm_tensor_layer(const struct llm_config *cfg, uint32_t layer, enum llm_tensor t);
uint32_t llm_tensor_norm(const struct llm_config *cfg);
uint32_t llm_tensor_cls(const struct llm_config *cfg);

/* The classifier is also indexed as row chunks "output.<k>" of at most
 * LLM_CLS_CHUNK_BYTES (ids after the classifier's), so that streaming it
 * needs a buffer of a chunk, not of the whole (vocab, dim) table; every
 * weights mode computes logits chunk by chunk, so all give the same bits. */
#define LLM_CLS_CHUNK_BYTES (4u << 20)
uint32_t llm_cls_chunk_rows(const struct llm_config *cfg);
uint32_t llm_cls_chunks(const struct llm_config *cfg);
uint32_t llm_tensor_cls_chunk(const struct llm_config *cfg, uint32_t k);

/* The offload layer's index of the checkpoint's tensors (f32, shapes
 * (out, in) for matrices). Errors: -EINVAL, -ENOMEM. */
int llm_tensor_index_build(const struct llm_config *cfg, struct kv_tensor_index **out);

/* Open a checkpoint file: read its header, fstat it, check the two.
 * Errors: -errno of open/fstat/read (path in the detail), and those of
 * llm_config_parse with the path in the detail. */
int llm_checkpoint_read_config(const char *path, struct llm_config *out);

/* ---- Synthetic models ------------------------------------------------- */

/* The built-in shapes: "260K", "15M", "110M", "1B" (case-insensitive).
 * Errors: -ENOENT (unknown name: the detail lists the known ones). */
int llm_synthetic_config(const char *name, struct llm_config *out);

/* The default cache directory: $KV_LLAMA_CACHE, else
 * $XDG_CACHE_HOME/libkv, else $HOME/.cache/libkv, else /tmp/libkv-cache. */
void llm_cache_dir(char *buf, size_t len);

/* The path of the synthetic checkpoint with this config and seed in dir
 * (NULL: llm_cache_dir()), writing it first when missing or of the wrong
 * size (to a temporary file renamed into place, so concurrent writers and
 * interrupted runs never leave a partial file). Weights are deterministic
 * in (config, seed): normal with std 0.02 (matrices and the embedding),
 * norms 1 + N(0, 0.02); so logits stay finite at any depth here. The
 * classifier is shared unless cfg->shared_classifier is false.
 * Errors: -errno of the file system (path in the detail), -ENOMEM,
 * -EINVAL (config). */
int llm_synthetic_ensure(const struct llm_config *cfg, uint64_t seed, const char *dir,
			 char *path, size_t path_len);

/* ---- Tokenizer -------------------------------------------------------- */

struct llm_tokenizer;

/* Read a llama2.c tokenizer file for a model of vocab_size tokens:
 * int32 max_token_length, then per token float32 score, int32 length,
 * the bytes. Errors: -errno of the file (path in the detail), -EBADMSG (a
 * token's length negative or above max_token_length, a truncated record:
 * the detail names the token), -EINVAL (the file holds another number of
 * tokens than vocab_size: "tokenizer has N tokens, the model V"; a
 * vocab_size below 259, which byte fallback needs; not a regular file),
 * -EFBIG (a file over 1 GiB), -ENOMEM. Thread safety: a loaded tokenizer
 * is only read by encode and decode, which may run concurrently. */
int llm_tokenizer_load(const char *path, uint32_t vocab_size, struct llm_tokenizer **out);

/* The same from bytes in memory (the fuzz target's entry); the same
 * errors, vocab_size below 259 included. */
int llm_tokenizer_parse(const void *buf, size_t len, uint32_t vocab_size,
			struct llm_tokenizer **out);

/* A byte-level tokenizer for models without a tokenizer file: 0 <unk>,
 * 1 <s>, 2 </s>, 3 + b the byte b ("<0xXX>"); ids from 259 on decode to
 * deterministic made-up syllables (so a synthetic model's output reads
 * as words) and are never produced by encoding. vocab_size >= 259, else
 * -EINVAL. */
int llm_tokenizer_bytes(uint32_t vocab_size, struct llm_tokenizer **out);

void llm_tokenizer_free(struct llm_tokenizer *t);
uint32_t llm_tokenizer_vocab(const struct llm_tokenizer *t);

/* Encode UTF-8 text as llama2.c does: BOS if bos, a dummy space token
 * before non-empty text, each code point as its token or as byte
 * fallback tokens (<0xXX>, id 3 + byte), then merges of the adjacent pair
 * with the highest score while one exists (byte tokenizer: no dummy
 * space, no merges), EOS if eos. Writes at most max ids; *n gets the
 * count. Errors: -ENOSPC (more than max tokens; *n gets how many are
 * needed, tokens untouched), -EINVAL (NULL, text over 1 GiB), -ENOMEM. */
int llm_tokenizer_encode(const struct llm_tokenizer *t, const char *text, bool bos,
			 bool eos, int32_t *tokens, uint32_t max, uint32_t *n);

/* The bytes a token decodes to after token prev: <0xXX> gives that byte,
 * a piece after BOS loses its leading space. *len gets the count (the
 * bytes may hold a partial UTF-8 character; they are NUL-terminated). An
 * out-of-range id gives "".
 * Valid while the tokenizer lives. */
const char *llm_tokenizer_decode(const struct llm_tokenizer *t, int32_t prev, int32_t token,
				 size_t *len);

/* ---- Sampler ---------------------------------------------------------- */

struct llm_sampler;

/* temperature 0: greedy (argmax, lowest id on ties); else softmax of
 * logits / temperature, then nucleus sampling with top_p in (0, 1]
 * (1: the whole distribution), with a splitmix64 stream from seed.
 * Errors: -EINVAL (temperature < 0, top_p outside (0, 1], vocab 0). */
int llm_sampler_create(uint32_t vocab, float temperature, float top_p, uint64_t seed,
		       struct llm_sampler **out);
void llm_sampler_free(struct llm_sampler *s);
/* Sample a token from logits (vocab floats; overwritten). */
int32_t llm_sample(struct llm_sampler *s, float *logits);

/* ---- Engine ----------------------------------------------------------- */

enum llm_weights {
	LLM_WEIGHTS_DRAM = 0,   /* read into an arena (tier DRAM, kind WEIGHTS) */
	LLM_WEIGHTS_MMAP = 1,   /* kv_mmap of the file (tier MMAP) */
	LLM_WEIGHTS_STREAM = 2, /* kv_stream with O_DIRECT under weight_budget */
};

struct llm_engine_config {
	const char *model_path;     /* a llama2.c checkpoint */
	enum llm_weights weights;
	/* STREAM: DRAM for weight buffers in bytes, or (bytes 0) this
	 * fraction of the file (default 0.25). The rest of the budget beyond
	 * the streamer's window keeps tensors resident. */
	uint64_t weight_budget;
	double weight_budget_frac;
	uint32_t lookahead;         /* STREAM: tensors read ahead (default 4) */
	bool mmap_populate;         /* MMAP: read the file in at open */
	struct kv_placement place;  /* DRAM weights and the KV pool */
	uint32_t threads;           /* BLAS and attention threads (0: cores) */
	uint32_t max_batch;         /* sequences per step (default 64) */
	/* KV cache */
	enum kv_dtype kv_dtype;     /* default F32 */
	uint32_t block_tokens;      /* default 16 */
	uint64_t kv_budget;         /* bytes of KV blocks; 0: max_batch full
				     * sequences of seq_len tokens */
	bool prefix_cache;          /* default true */
	const char *kv_store;       /* SSD tier directory, or NULL */
	uint64_t kv_store_capacity; /* 0: the disk */
	double kv_watermark;        /* spill watermark (default 0.9) */
	struct kv_registry *registry; /* NULL: the engine makes its own */
	const char *label;          /* registry label prefix (default "llama") */
};

void llm_engine_config_default(struct llm_engine_config *cfg);

struct llm_engine;

/* Open the checkpoint, load or map its weights (or set up the stream),
 * create the KV cache. Errors: those of llm_checkpoint_read_config,
 * -EINVAL (config), -ENOMEM, and libkv's (arena, mmap, stream, cache). */
int llm_engine_create(const struct llm_engine_config *cfg, struct llm_engine **out);
/* With a kv_store, persists the prefix cache first (kv_cache_persist), so
 * that the next engine on the same store finds this run's prefixes. */
void llm_engine_destroy(struct llm_engine *e);

const struct llm_config *llm_engine_model(const struct llm_engine *e);
struct kv_cache *llm_engine_cache(struct llm_engine *e);
struct kv_registry *llm_engine_registry(struct llm_engine *e);

/* A new empty sequence (kv_seq_create). */
int llm_seq_new(struct llm_engine *e, kv_seq_id *out);
/* Fork a sequence (children share its blocks). */
int llm_seq_fork(struct llm_engine *e, kv_seq_id parent, kv_seq_id *child);
int llm_seq_free(struct llm_engine *e, kv_seq_id s);

/* Prefill n empty sequences with their prompts (lens[i] >= 1, at most
 * seq_len): each takes what the prefix cache holds (cached[i] tokens, if
 * cached is not NULL), the rest runs as batched passes (sgemm over all
 * tokens of a pass; prompts sharing their first block run in separate
 * passes, so the later ones hit the earlier ones' blocks). logits gets
 * (n, vocab): those after each prompt's last token. n <= max_batch.
 * Errors: -EINVAL (n, a length 0 or above seq_len: the detail names the
 * prompt), -ENOMEM (KV full), libkv's. On error the sequences are left
 * empty. */
int llm_prefill(struct llm_engine *e, uint32_t n, const kv_seq_id *seqs,
		const int32_t *const *prompts, const uint32_t *lens, float *logits,
		uint32_t *cached);

/* One decode step: token[i] is appended to seqs[i] and run (sgemv at
 * n 1, sgemm above); logits gets (n, vocab). Errors: -EINVAL (a sequence
 * at seq_len, a token outside the vocabulary), -ENOMEM (KV full: nothing
 * appended), libkv's. */
int llm_decode(struct llm_engine *e, uint32_t n, const kv_seq_id *seqs,
	       const int32_t *tokens, float *logits);

struct llm_engine_stats {
	uint64_t prefill_tokens;    /* computed (prefix hits excluded) */
	uint64_t prefill_ns;
	uint64_t prefix_hit_tokens; /* prompt tokens taken from the cache */
	uint64_t decode_tokens;     /* sum over steps of sequences stepped */
	uint64_t decode_steps;
	uint64_t decode_ns;
	uint64_t weight_bytes;      /* bytes of weights one pass reads (all
				     * matrices and norms, the classifier;
				     * not the embedding rows) */
	uint64_t file_bytes;
	/* STREAM (zeros otherwise): */
	uint64_t stream_stall_ns;
	uint64_t stream_bytes_read;
	uint64_t stream_budget;
	double stall_fraction;      /* stream_stall_ns / (prefill + decode ns) */
};
void llm_engine_stats(const struct llm_engine *e, struct llm_engine_stats *out);

/* ---- Generation (the program's loop, shared with kv-bench) ------------ */

struct llm_gen_config {
	uint32_t n_prompts;
	const int32_t *const *prompts;  /* encoded (BOS included) */
	const uint32_t *prompt_lens;
	uint32_t samples;           /* sequences per prompt, forked after its
				     * prefill (default 1) */
	uint32_t steps;             /* new tokens per sequence (clipped at
				     * seq_len) */
	float temperature;          /* 0: greedy */
	float top_p;                /* default 1 */
	uint64_t seed;              /* sequence i samples with seed + i */
	bool stop_at_eos;           /* a sequence ends at EOS (default true) */
	/* Called for each generated token of sequence i (prompt p = i /
	 * samples); may be NULL. */
	void (*on_token)(void *ctx, uint32_t seq, int32_t token);
	void *ctx;
};

void llm_gen_config_default(struct llm_gen_config *g);

struct llm_gen_result {
	uint32_t n_seqs;            /* n_prompts * samples */
	int32_t **tokens;           /* (n_seqs) generated ids */
	uint32_t *n_tokens;
	uint32_t *cached;           /* (n_seqs) prompt tokens from the cache */
};

/* Prefill every prompt, fork the samples, decode all sequences together
 * for `steps` steps, free the sequences. n_prompts * samples <= the
 * engine's max_batch. Errors: -EINVAL (the detail names it), and those of
 * llm_prefill / llm_decode. The result is freed with llm_gen_result_free. */
int llm_generate(struct llm_engine *e, const struct llm_gen_config *g,
		 struct llm_gen_result *out);
void llm_gen_result_free(struct llm_gen_result *r);

#endif /* KV_LLAMA_H */
