/* SPDX-License-Identifier: MIT */
/*
 * libkv cache: the paged KV cache of LLM inference. Fixed-size blocks of
 * `block_tokens` tokens for every layer's K and V, taken from an allocator
 * pool (NUMA placement, huge pages); sequences that own block tables,
 * grow on demand, fork by sharing blocks (reference counts, copy on
 * write) and roll back; a prefix cache of chained block hashes with LRU
 * eviction (deepest block first), pins, priorities and per-tenant salts;
 * an SSD tier (a kv_store) that cached blocks spill to instead of being
 * dropped and that survives a restart; swapping whole sequences out and
 * in; a sliding window; and paged attention that reads K/V through the
 * block tables in any storage dtype.
 *
 * Errors follow <kv/core.h>: 0 or -errno, the detail in kv_last_error(),
 * and a failed call changes nothing (no block leaks, no partial append).
 *
 * Block layout. A block is one pool block of kv_cache_layout().block_bytes:
 *
 *     [layer 0: layer_bytes]                at 0
 *        K      (n_kv_heads, block_tokens, head_dim)   of dtype, at 0
 *        V      (n_kv_heads, block_tokens, head_dim)   of dtype, at v_offset
 *        scales (2, n_kv_heads) float, INT8 only: K's then V's, at
 *               scale_offset; each part starts on 64 bytes (V on a
 *               page when K is 32 KiB or more)
 *     [layer 1] ... [layer n_layers - 1]   layer l at l * layer_bytes
 *     [header: header_bytes]               at header_offset: spill
 *                                          header, the block's token ids
 *
 * Blocks of 64 KiB or more start on a page and so do their layers (a
 * layer_bytes of 64 KiB or more is a multiple of 4 KiB), so that a run
 * streams through as few pages as it can.
 *
 * so the keys of one head in one block are one contiguous run of
 * block_tokens * head_dim elements, the unit paged attention streams.
 * INT8 stores q = round(x / scale) in [-127, 127] with one scale per
 * (block, layer, K or V, head); see kv_seq_write() for how scales grow.
 *
 * Semantics the prefix cache relies on. The K/V of a position are taken
 * to be a function of the tokens up to it, as a model computes them, so
 * sequences with the same tokens (and salt) may share blocks: a full
 * block whose K/V were written for every layer is entered into the
 * prefix index, and a sequence that completes a block already in the
 * index switches to the indexed block and frees its own (as SGLang's
 * radix cache does). A position is "written" for a layer once
 * kv_seq_write() covered it; writes extend the written prefix of each
 * layer without gaps.
 *
 * Chained hash. Block i of a sequence has
 *   h_i = H(h_{i-1} || salt_digest || tokens[i*T .. i*T+T) as int32 LE)
 * with h_{-1} all zero, salt_digest = H(salt) (all zero without a salt),
 * H = XXH3-128 (16 bytes, canonical big-endian form) or SHA-256 (32).
 *
 * Thread safety. One cache may be used from many threads. Calls on
 * different sequences run concurrently (append, write, read, fork, free,
 * prompt, lookup, attention, swap); calls on the same sequence must not
 * overlap (a sequence has one user at a time, and a fork reads its
 * parent, so it counts as a call on the parent). Cache-wide calls (stats,
 * lookup, pin, admission, evict, persist) may run beside all of these.
 * kv_cache_validate() needs the cache quiescent. Shared state (block
 * reference counts, the prefix index, the LRU lists, the pool) sits
 * under one mutex held for short, bounded work; appends that need no new
 * block, writes to blocks the sequence alone holds, reads and attention
 * take no lock at all.
 */
#ifndef KV_CACHE_H
#define KV_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <kv/core.h>
#include <kv/taxonomy.h>
#include <kv/allocator.h>
#include <kv/offload.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A sequence handle: an index and a generation, so that a freed handle
 * is refused (-ENOENT) rather than reaching another sequence. Never 0. */
typedef uint64_t kv_seq_id;
#define KV_SEQ_NONE ((kv_seq_id)0)

/* Limits of a configuration. */
#define KV_CACHE_MAX_BLOCK_TOKENS 1024u
#define KV_CACHE_MAX_LAYERS 1024u
#define KV_CACHE_MAX_HEADS 1024u
#define KV_CACHE_MAX_HEAD_DIM 1024u
#define KV_CACHE_MAX_SEQS (1u << 20)
#define KV_CACHE_SALT_MAX 256u
#define KV_CACHE_HASH_MAX 32u
#define KV_CACHE_PRIORITIES 4u

enum kv_hash_kind {
	KV_HASH_XXH3_128 = 0, /* fast; 128 bits: collisions negligible by chance */
	KV_HASH_SHA256 = 1,   /* collision resistant, for tenants that do not
			       * trust each other (needs libkv built with
			       * libcrypto, else -ENOTSUP at create) */
};

/* What happens to blocks that fall wholly outside the sliding window. */
enum kv_window_mode {
	KV_WINDOW_RELEASE = 0, /* freed (the sequence's reference dropped) */
	KV_WINDOW_CACHE = 1,   /* dropped by the sequence but kept as prefix
				* cache entries while memory allows */
};

/* Events for building an index of cached blocks elsewhere (what vLLM's
 * KV events and LMCache consume). */
enum kv_cache_event_type {
	KV_EVENT_STORED = 0,  /* a block entered the DRAM prefix index */
	KV_EVENT_EVICTED = 1, /* a block left DRAM and is in no tier of ours
			       * (dropped; its SSD copy, if any, went too) */
	KV_EVENT_SPILLED = 2, /* a block left DRAM; its copy is on SSD */
	KV_EVENT_LOADED = 3,  /* a block was read back from SSD into DRAM */
};

struct kv_cache_event {
	enum kv_cache_event_type type;
	enum kv_tier tier;           /* where the block is after the event */
	uint32_t hash_len;           /* 16 or 32 */
	uint8_t hash[KV_CACHE_HASH_MAX];
	uint8_t parent_hash[KV_CACHE_HASH_MAX]; /* zero for a first block */
	uint32_t depth;              /* block index in its chain (0 = first) */
	const int32_t *tokens;       /* (n_tokens) the block's token ids */
	uint32_t n_tokens;           /* block_tokens */
};

/* Runs with the cache's lock held, on whichever thread caused the event
 * (a caller's, or an I/O completion thread for SPILLED and LOADED): it
 * must be quick and must not call into the cache. */
typedef void (*kv_cache_event_fn)(void *ctx, const struct kv_cache_event *ev);

/* The SSD tier. The cache opens (and owns) a kv_store in `dir` whose
 * identity is the cache's shape (model_key, dtype, block_tokens, n_layers,
 * n_kv_heads, head_dim, hash kind, layout version): reopening it with the
 * same shape finds every block an earlier process put there; another
 * shape is refused with -ESTALE. */
struct kv_cache_spill_config {
	const char *dir;            /* NULL: no SSD tier */
	uint64_t capacity;          /* bytes of store space (0: the disk);
				     * when full, the least recently used
				     * SSD blocks are deleted to make room */
	/* Cached blocks start being written to the store in the background
	 * once the blocks in DRAM (used + cached) pass this fraction of the
	 * capacity, until they fall below it again; a block's DRAM is reused
	 * only after its write completed and, with `verify`, was read back
	 * with a matching checksum. Default 0.9; 1.0 spills only on demand. */
	double watermark;
	uint32_t max_inflight;      /* background spills at once (default 8) */
	bool verify;                /* read back before freeing (default true) */
	bool write_through;         /* also put every block when it enters the
				     * index, so the store holds the whole
				     * prefix cache (default false) */
	enum kv_store_sync sync;    /* default KV_STORE_SYNC_BATCHED; destroy
				     * and kv_cache_persist() sync anyway */
	struct kv_io *io;           /* engine to share (not owned); NULL: the
				     * store starts its own */
};

struct kv_cache_config {
	uint32_t n_layers;          /* 1..KV_CACHE_MAX_LAYERS */
	uint32_t n_kv_heads;        /* 1..KV_CACHE_MAX_HEADS */
	uint32_t head_dim;          /* 1..KV_CACHE_MAX_HEAD_DIM */
	uint32_t block_tokens;      /* tokens per block (default 16) */
	enum kv_dtype dtype;        /* F32 (default), F16, BF16 or I8 */
	/* DRAM for blocks: capacity_blocks if nonzero, else capacity_bytes
	 * (rounded down to whole blocks); one of them is required. */
	uint64_t capacity_bytes;
	uint32_t capacity_blocks;
	uint32_t max_seqs;          /* live sequences at once (default 1024) */
	struct kv_placement place;  /* NUMA policy, huge pages, mlock of the
				     * block pool (default: first touch, THP) */
	bool prefix_cache;          /* default true */
	enum kv_hash_kind hash;     /* default XXH3_128 */
	const void *salt;           /* namespace salt of sequences created
				     * without one (NULL: none); copied */
	size_t salt_len;            /* 0..KV_CACHE_SALT_MAX */
	const char *model_key;      /* names the model in the store identity
				     * (required with a spill dir); copied */
	struct kv_cache_spill_config spill;
	uint32_t window;            /* sliding window in tokens (0: none): a
				     * query at p sees keys (p - window, p] */
	enum kv_window_mode window_mode;
	uint32_t threads;           /* attention threads including the caller
				     * (default 0: one per core) */
	kv_cache_event_fn on_event; /* NULL: no events */
	void *event_ctx;
	struct kv_registry *registry; /* NULL: the default registry */
	struct kv_budget *budget;   /* DRAM budget the pool charges (NULL: none) */
	const char *label;          /* registry label prefix (default "kv") */
};

KV_API void kv_cache_config_default(struct kv_cache_config *cfg);

struct kv_cache;

/* Create a cache. Reserves the pool's address space (memory is committed
 * as blocks are used), starts the attention threads, opens the store.
 * Registry records, all kind KV: "<label>" (DRAM blocks held by
 * sequences), "<label>/cached" (DRAM blocks only the prefix cache holds),
 * "<label>/free" (committed pool memory holding nothing), each at the
 * pool's node, exact whenever no call is running; and the store's
 * "<label>/ssd" in tier SSD. The cache's counters (kv_cache_stats) are a
 * stats source of the registry, so reports show them too.
 * Errors: -EINVAL (a size zero, out of range or overflowing; the detail
 * names the field), -ENOTSUP (SHA-256 without libcrypto), -ESTALE (the
 * spill dir holds a store of another shape), -EBUSY (store open in
 * another process), -ENOMEM, and the pool's and store's errors.
 * Ownership: destroy with kv_cache_destroy(). */
KV_API int kv_cache_create(const struct kv_cache_config *cfg, struct kv_cache **out);

/* Free every sequence and block, close the store (after waiting for its
 * writes and syncing it), stop the threads. NULL is a no-op. Returns 0 or
 * the store's final sync error (the cache is destroyed anyway).
 * Thread safety: no other call on the cache during or after it. */
KV_API int kv_cache_destroy(struct kv_cache *c);

/* Sizes of the block layout described at the top of this header. */
struct kv_cache_layout {
	size_t block_bytes;         /* one pool block */
	size_t header_offset;       /* the header, after the last layer */
	size_t header_bytes;
	size_t layer_bytes;         /* stride between layers */
	size_t kv_bytes;            /* one of K or V of a layer (all heads) */
	size_t head_bytes;          /* one head's run: block_tokens * head_dim * es */
	size_t v_offset;            /* V's offset in a layer (K's is 0): kv_bytes
				     * rounded up to 64 */
	size_t scale_offset;        /* INT8: scales' offset in a layer (else 0) */
	uint32_t block_tokens;
	uint32_t blocks_total;      /* capacity */
};
KV_API void kv_cache_layout(const struct kv_cache *c, struct kv_cache_layout *out);

/* ---- Sequences -------------------------------------------------------- */

struct kv_seq_config {
	const void *salt;           /* NULL: the cache's salt */
	size_t salt_len;
	/* Eviction priority of the blocks this sequence leaves in the
	 * prefix cache: 0 (evicted first) .. KV_CACHE_PRIORITIES - 1. */
	uint32_t priority;
};

/* A new empty sequence. cfg may be NULL. Errors: -EINVAL (salt too long,
 * priority), -ENOSPC (max_seqs live). Thread safety: any thread. */
KV_API int kv_seq_create(struct kv_cache *c, const struct kv_seq_config *cfg,
			 kv_seq_id *out);

/* Free a sequence: its blocks' references are dropped (full, indexed
 * blocks stay in the prefix cache), and the handle becomes stale. A
 * swapped-out sequence's store extents are deleted. Errors: -ENOENT. */
KV_API int kv_seq_free(struct kv_cache *c, kv_seq_id s);

/* Start an empty sequence from a prompt: reuse the longest chain of
 * cached blocks (DRAM, then the SSD tier, read back into DRAM), append
 * all n tokens, and set *cached to how many leading tokens already have
 * their K/V for every layer: the caller computes and writes only
 * [*cached, n). At least one token is left to compute (its logits are
 * needed), so *cached <= n - 1, a multiple of block_tokens. Without a
 * prefix cache it is kv_seq_append() with *cached = 0.
 * Errors: -EINVAL (n 0, sequence not empty, NULL), -ENOENT, -ENOMEM (no
 * block free and none evictable: nothing appended), -EIO/-EBADMSG never
 * (a failed SSD read only shortens the hit, and the bad extent is
 * deleted). */
KV_API int kv_seq_prompt(struct kv_cache *c, kv_seq_id s, const int32_t *tokens,
			 uint32_t n, uint32_t *cached);

/* Append n tokens (their ids, for prefix hashing): reserves their slots,
 * taking blocks as needed (evicting or spilling cached blocks when the
 * pool is full). All or nothing. Errors: -EINVAL, -ENOENT, -EBUSY
 * (swapped out or preempted), -ENOMEM (no block can be had), -EOVERFLOW
 * (length past 2^31 - 1 tokens). */
KV_API int kv_seq_append(struct kv_cache *c, kv_seq_id s, const int32_t *tokens,
			 uint32_t n);

/* Write K and V of positions [pos, pos + n) of one layer, given as f32
 * (n, n_kv_heads, head_dim) rows (the output of x*Wk, x*Wv), converted
 * to the storage dtype. pos must not leave a gap: pos <= the layer's
 * written length. A block shared with another sequence, or in the prefix
 * index, is copied first (copy on write): what others see never changes.
 * INT8: a (block, head) scale starts as absmax/127 of its first write and
 * grows to max(needed, 2 x old) when a later write exceeds it, requantising
 * the stored values once; every stored value is then within one scale
 * step, and scale < 2 * absmax / 127 (absmax: the largest magnitude
 * written to that block and head since it was last written from slot 0).
 * Errors: -EINVAL (layer out of range, pos + n past the appended length,
 * a gap, NULL k or v, positions released by the window), -ENOENT, -EBUSY,
 * -ENOMEM (a copy was needed and no block can be had; nothing written). */
KV_API int kv_seq_write(struct kv_cache *c, kv_seq_id s, uint32_t layer, uint32_t pos,
			uint32_t n, const float *k, const float *v);

/* Read K and V of written positions [pos, pos + n) of one layer back as
 * f32 (n, n_kv_heads, head_dim); k or v may be NULL to skip it.
 * Errors: -EINVAL (range not written, released by the window, layer),
 * -ENOENT, -EBUSY (swapped out). */
KV_API int kv_seq_read(struct kv_cache *c, kv_seq_id s, uint32_t layer, uint32_t pos,
		       uint32_t n, float *k, float *v);

/* Keep the first `len` tokens and drop the rest (speculative decoding's
 * rollback is kv_seq_truncate(c, s, length - n_rejected)). Blocks past the
 * new end are released. Errors: -EINVAL (len above the length, or below
 * what the sliding window has already released), -ENOENT, -EBUSY. */
KV_API int kv_seq_truncate(struct kv_cache *c, kv_seq_id s, uint32_t len);

/* A new sequence sharing every block of `parent` (parallel sampling,
 * beam search): no K/V is copied until one of them writes a shared block.
 * The child inherits the tokens, salt and priority. Errors: -ENOENT,
 * -EBUSY (parent swapped out), -ENOSPC (max_seqs). */
KV_API int kv_seq_fork(struct kv_cache *c, kv_seq_id parent, kv_seq_id *child);

struct kv_seq_info {
	uint32_t len;               /* tokens appended */
	uint32_t written;           /* positions written for every layer */
	uint32_t blocks;            /* block table entries (incl. released) */
	uint32_t blocks_held;       /* blocks the table holds in DRAM */
	uint32_t blocks_shared;     /* of those, shared with other holders */
	uint32_t released;          /* leading positions the window released */
	uint32_t priority;
	bool swapped;               /* swapped out to the store */
	bool preempted;             /* preempted for recompute */
};
KV_API int kv_seq_info(struct kv_cache *c, kv_seq_id s, struct kv_seq_info *out);

/* The token ids of [pos, pos + n). Errors: -EINVAL (range), -ENOENT. */
KV_API int kv_seq_tokens(struct kv_cache *c, kv_seq_id s, uint32_t pos, uint32_t n,
			 int32_t *out);

/* The block table, for runtimes with their own attention kernel: ids[i]
 * is the pool block holding tokens [i*T, i*T + T), or UINT32_MAX where the
 * window released it. Valid until the next call that changes the
 * sequence (append, write, truncate, swap, free). Pointer of a block:
 * kv_cache_block_ptr(). Errors: -ENOENT, -EBUSY (swapped out). */
KV_API int kv_seq_block_table(struct kv_cache *c, kv_seq_id s, const uint32_t **ids,
			      uint32_t *n);
KV_API void *kv_cache_block_ptr(const struct kv_cache *c, uint32_t block);

/* Preemption by swap: write every block of the sequence to the store
 * (waiting for the writes and their verification), drop its references
 * so that its DRAM can be reused, and keep only the store extents; and
 * read them back into fresh blocks, byte-identical. Between the two the
 * sequence accepts only kv_seq_swap_in, kv_seq_info, kv_seq_tokens and
 * kv_seq_free (others: -EBUSY). Errors: -ENOTSUP (no SSD tier), -EBUSY
 * (already swapped, or not swapped for swap_in), -ENOSPC (store full:
 * nothing changed), -ENOMEM (swap_in: not enough blocks: nothing
 * changed), -EIO/-EBADMSG (a read failed: the sequence stays swapped out
 * and may be retried or freed), -ENOENT. */
KV_API int kv_seq_swap_out(struct kv_cache *c, kv_seq_id s);
KV_API int kv_seq_swap_in(struct kv_cache *c, kv_seq_id s);

/* Preemption by recompute: drop the sequence's blocks (its full indexed
 * blocks stay hittable in the prefix cache) and keep its tokens;
 * *recompute gets how many of its tokens would have to be computed again
 * if it resumed now. kv_seq_resume() re-reads the prefix cache as
 * kv_seq_prompt() does and sets *cached (recompute = len - *cached).
 * Errors: -ENOENT, -EBUSY (swapped; resume: not preempted), -ENOMEM
 * (resume: nothing changed). */
KV_API int kv_seq_preempt(struct kv_cache *c, kv_seq_id s, uint32_t *recompute);
KV_API int kv_seq_resume(struct kv_cache *c, kv_seq_id s, uint32_t *cached);

/* ---- Admission -------------------------------------------------------- */

/* Whether n_tokens[i] more tokens for each sequence seqs[i] fit now,
 * counting free blocks, blocks the pool may still commit, and cached
 * blocks that eviction (or spilling) can free; a shared last block that
 * an append would copy counts as one more. Returns 1 (fits), 0 (does
 * not), or -errno (-ENOENT naming the bad id, -EINVAL). *needed and
 * *available (either may be NULL) get the block counts. A NULL seqs with
 * n 1 asks about a new sequence of n_tokens[0] tokens. */
KV_API int kv_cache_can_append(struct kv_cache *c, const kv_seq_id *seqs,
			       const uint32_t *n_tokens, uint32_t n,
			       uint32_t *needed, uint32_t *available);

/* ---- Prefix cache ----------------------------------------------------- */

struct kv_prefix_hit {
	uint32_t dram_tokens;       /* leading tokens found in DRAM */
	uint32_t ssd_tokens;        /* further tokens found on SSD */
	uint32_t blocks_hashed;     /* full blocks of the prompt */
};

/* How much of a prompt the prefix cache holds, without taking anything
 * (a scheduler's question). Counts every full block (no n - 1 cap).
 * salt NULL: the cache's. Errors: -EINVAL. */
KV_API int kv_cache_lookup(struct kv_cache *c, const int32_t *tokens, uint32_t n,
			   const void *salt, size_t salt_len, struct kv_prefix_hit *out);

/* Pin the longest cached chain of a prefix in DRAM (SSD blocks are read
 * back first): pinned blocks are never evicted. Pins nest; unpin undoes
 * one pin of the same prefix. *tokens_out (may be NULL) gets how many
 * tokens are pinned. Errors: -EINVAL, -ENOENT (unpin: not pinned),
 * -ENOMEM. */
KV_API int kv_cache_pin(struct kv_cache *c, const int32_t *tokens, uint32_t n,
			const void *salt, size_t salt_len, uint32_t *tokens_out);
KV_API int kv_cache_unpin(struct kv_cache *c, const int32_t *tokens, uint32_t n,
			  const void *salt, size_t salt_len);

/* Evict up to n unpinned cached blocks now (least recently used, deepest
 * first; spilled to the store when there is one); *evicted (may be NULL)
 * gets how many left DRAM. n UINT32_MAX: all. A cached block whose child
 * blocks are still held by sequences is not taken (that would cut their
 * chain); only an allocation with nothing else left takes one. */
KV_API int kv_cache_evict(struct kv_cache *c, uint32_t n, uint32_t *evicted);

/* Write every indexed DRAM block not yet in the store to it and sync, so
 * that a later process finds the whole prefix cache. Errors: -ENOTSUP (no
 * SSD tier), the store's errors (blocks written before stay). */
KV_API int kv_cache_persist(struct kv_cache *c);

/* ---- Stats and checks ------------------------------------------------- */

struct kv_cache_stats {
	uint32_t blocks_total;      /* capacity */
	uint32_t blocks_used;       /* held by sequences */
	uint32_t blocks_cached;     /* held only by the prefix cache (DRAM) */
	uint32_t blocks_spilling;   /* cached, write to the store in flight */
	uint32_t blocks_pinned;
	uint32_t blocks_free;       /* total - used - cached */
	uint64_t blocks_spilled;    /* blocks on SSD (store extents) */
	uint32_t seqs;
	uint32_t seqs_swapped;
	uint64_t tokens;            /* sum of sequence lengths */
	uint64_t slots_unused;      /* internal waste: unfilled slots of the
				     * blocks sequences hold, a shared block
				     * counted once */
	double waste_pct;           /* slots_unused / slots of held blocks */
	uint64_t lookup_blocks;     /* full blocks asked for by prompts */
	uint64_t hit_blocks_dram;
	uint64_t hit_blocks_ssd;
	double hit_rate_dram;       /* hit_blocks_dram / lookup_blocks */
	double hit_rate_ssd;
	uint64_t tokens_skipped;    /* prompt tokens whose K/V were reused */
	uint64_t evictions;         /* blocks dropped from DRAM */
	uint64_t spills;            /* blocks written to the store */
	uint64_t loads;             /* blocks read back */
	uint64_t spill_errors;      /* writes or verifications that failed */
	uint64_t ssd_evictions;     /* store blocks deleted to make room */
	uint64_t cow_copies;
	uint64_t dedups;            /* blocks freed because an equal one was indexed */
	uint64_t swaps_out, swaps_in;
};
KV_API void kv_cache_stats(struct kv_cache *c, struct kv_cache_stats *out);

/* Check every invariant: each block's reference count equals the
 * references in block tables (plus one per pin), the hash index holds
 * exactly the indexed blocks under their hashes, parents and child counts
 * agree, the LRU lists hold exactly the unreferenced unpinned indexed
 * blocks, no block is both free and in use, counters match, the pool's
 * own validator passes. Returns 0 or -EFAULT naming the first broken
 * invariant. Call when no other thread uses the cache. */
KV_API int kv_cache_validate(struct kv_cache *c);

/* ---- Paged attention -------------------------------------------------- */

/* One batched attention call for one layer. Sequence i contributes
 * n_queries[i] query tokens (NULL: 1 each, decode), its last ones: query j
 * sits at position len - n_queries[i] + j and attends causally to keys
 * [max(0, p - window + 1), p]. Queries and outputs are packed in sequence
 * order, (sum of n_queries, n_q_heads, head_dim) f32; q head h uses kv
 * head h / (n_q_heads / n_kv_heads) (GQA). Scores are scale * q.k with a
 * numerically stable online softmax; K/V are read through the block
 * tables in the storage dtype. */
struct kv_attn_batch {
	uint32_t n_seqs;
	const kv_seq_id *seqs;      /* (n_seqs) distinct sequences */
	const uint32_t *n_queries;  /* (n_seqs), each 1..len; NULL: all 1 */
	uint32_t n_q_heads;         /* a multiple of n_kv_heads */
	float scale;                /* 0: 1 / sqrt(head_dim) */
	const float *q;
	float *out;                 /* may not overlap q */
};

/* Accuracy. Against exact arithmetic on the values the cache stores,
 * every output element is within 1e-5 of the largest |v| the query sees
 * (f32 accumulation; tested). Against the f32 values that were written,
 * storage adds at most dv + (exp(2 ds) - 1) (max|v| + dv) per element,
 * where dv and dk are the largest storage errors of the visible values
 * and keys and ds = scale * sum|q| * dk: per element, f16 errs by at
 * most 2^-11 |x| (normal range), bf16 by 2^-8 |x|, INT8 by one scale
 * step < 2 absmax/127 of its (block, head) (see kv_seq_write). Measured
 * on random data (head_dim 16..64, contexts to 300): f16 ~7e-4, bf16
 * ~4e-3, INT8 ~4e-2 of max |v| (tests/libkv/test_cache_attn.c).
 *
 * Run attention on the cache's threads (the caller works too); small
 * batches run on the caller alone. Threading: a pool of persistent
 * pthreads splits the work into (sequence, kv head, query tile) items
 * and, for decode of few long sequences, into chunks of the context
 * merged afterwards (split-K); when another thread's call holds the pool,
 * a call runs on its own thread. Errors: -EINVAL (layer, n_q_heads, a
 * query count, NULL, positions not written for this layer), -ENOENT,
 * -EBUSY (swapped out). On error out is untouched. */
KV_API int kv_attention(struct kv_cache *c, uint32_t layer, const struct kv_attn_batch *b);

#ifdef __cplusplus
}
#endif

#endif /* KV_CACHE_H */
