/* SPDX-License-Identifier: MIT */
/*
 * Internals of the paged KV cache (cache.c, seq.c, prefix.c, spill.c,
 * attend.c), not installed: the block and sequence records, the cache
 * object, and the functions the files share. Everything marked "lock"
 * runs with c->lock held.
 *
 * Block life. A pool block is ALLOC from kv_pool_alloc to kv_pool_free.
 * While allocated it is held by `ref` block-table entries (or one
 * operation in progress: a load, a copy), and may be INDEXED (in the
 * prefix index under its chain hash, content immutable from then on:
 * writes copy it first). An allocated block with ref 0 must be INDEXED:
 * it is "cached", on the LRU list of its priority unless pinned or
 * SPILLING; anything else with ref 0 is returned to the pool at once.
 * Counters: n_alloc blocks taken from the pool, n_cached of them with
 * ref 0; "used" is the difference.
 *
 * Sequences. A live slot holds a generation (the high half of the
 * handle). Its arrays belong to whichever thread is calling on that
 * sequence (see <kv/cache.h>: one caller per sequence at a time), so the
 * paths that touch only them take no lock; the fields other threads read
 * (len, n_blocks, tail block, for stats) are relaxed atomics.
 */
#ifndef KV_CACHE_IMPL_H
#define KV_CACHE_IMPL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <kv/cache.h>

#include "libkv/kernels.h"

#define BLK_NONE UINT32_MAX
#define RELAXED memory_order_relaxed

/* Block flags (under the lock; the owner of an exclusively held block
 * may read them without it, since only it could change them then). */
#define BF_ALLOC 0x01u     /* taken from the pool */
#define BF_INDEXED 0x02u   /* in the prefix index */
#define BF_IN_STORE 0x04u  /* the SSD map holds an extent of its hash */
#define BF_SPILLING 0x08u  /* the spiller is writing it (ref was 0) */
#define BF_LRU 0x10u       /* on an LRU list */
#define BF_NOSPILL 0x20u   /* a spill failed: drop it instead next time */

struct kv_blk {
	_Atomic uint32_t ref;      /* block-table references (+1 per op holding it) */
	uint32_t pins;
	/* Atomic: written under the lock, but a sequence's owner reads the
	 * INDEXED bit of its blocks without it (must_copy). */
	_Atomic uint8_t flags;
	uint8_t prio;              /* LRU list it goes to */
	uint16_t stat_mark;        /* scratch of kv_cache_stats / validate */
	uint32_t stat_fill;
	uint32_t parent;           /* index parent (a block), or BLK_NONE */
	uint32_t n_children;       /* indexed blocks whose parent this is */
	uint32_t child_head;       /* those children, linked through sib_* */
	uint32_t sib_prev, sib_next;
	uint32_t lru_prev, lru_next;
	uint32_t hnext;            /* prefix index bucket chain */
	uint32_t depth;            /* block index in its chain */
	uint64_t hkey;             /* first 8 bytes of hash: bucket and quick compare */
	uint8_t hash[KV_CACHE_HASH_MAX];
};

/* The head of every block's memory: what a spilled extent carries so
 * that a reader can check it is the block it asked for. Native byte
 * order (a store is local to its machine). */
#define KV_BLOCK_MAGIC "KVBLOCK1"
#define KV_BLOCK_VERSION 1u
#define KV_BLOCK_PREFIX 1u   /* keyed by chain hash */
#define KV_BLOCK_SWAP 2u     /* a swapped-out sequence's block */
struct kv_blk_hdr {
	char magic[8];
	uint32_t version;
	uint32_t what;            /* KV_BLOCK_PREFIX or KV_BLOCK_SWAP */
	uint32_t hash_kind;
	uint32_t block_tokens;
	uint32_t depth;
	uint32_t dtype;
	uint64_t salt_fp;         /* first 8 bytes of the salt digest */
	uint8_t hash[KV_CACHE_HASH_MAX];
	uint8_t parent_hash[KV_CACHE_HASH_MAX];
	int32_t tokens[];         /* (block_tokens) */
};

enum seq_state { SEQ_FREE = 0, SEQ_ACTIVE = 1, SEQ_SWAPPED = 2, SEQ_PREEMPTED = 3 };

struct kv_seq {
	_Atomic uint32_t gen;      /* 0: slot free; else the handle's generation */
	uint32_t gen_last;         /* the slot's last generation (never reused) */
	uint32_t next_free;        /* free slot list, under the lock */
	enum seq_state state;      /* written under the lock */
	uint32_t prio;
	_Atomic uint32_t len;      /* tokens */
	_Atomic uint32_t n_blocks; /* table entries = ceil(len / T) */
	_Atomic uint32_t tail;     /* blocks[n_blocks - 1] or BLK_NONE */
	uint32_t tok_cap, blk_cap;
	int32_t *tokens;           /* (tok_cap) */
	uint32_t *blocks;          /* (blk_cap) block ids, BLK_NONE released */
	uint8_t *hashes;           /* (blk_cap, hash_len): chain hash of full blocks */
	uint32_t n_hashed;         /* full blocks hashed: len / T */
	uint32_t chain;            /* leading blocks entered in the index by or for
				    * this sequence; a rewrite or truncation cuts it */
	uint32_t chain_stop;       /* first block rewritten in place: it and the
				    * ones after never enter the index (until a
				    * truncation drops it); BLK_NONE: none */
	uint32_t *written;         /* (n_layers) written prefix per layer */
	uint32_t released;         /* leading positions the window released (x T) */
	uint8_t salt_digest[KV_CACHE_HASH_MAX];
	uint64_t salt_fp;
	struct kv_store_extent *swap; /* (n_blocks) while swapped out */
};

/* The SSD map: what the store holds of the prefix cache, by chain hash,
 * in LRU order (the store itself keeps no access order). */
struct ssd_ent {
	uint64_t hkey;
	uint32_t hnext;            /* bucket chain; free list link when unused */
	uint32_t prev, next;       /* LRU, head = least recently used */
	bool live;
	struct kv_store_extent ext;
};

struct kv_cache {
	/* Shape, read-only after create. */
	uint32_t n_layers, n_kv_heads, head_dim, T;
	enum kv_dtype dtype;
	size_t es;                 /* bytes per element */
	enum kv_hash_kind hash_kind;
	uint32_t hash_len;
	bool prefix;
	uint32_t window;
	enum kv_window_mode window_mode;
	struct kv_cache_layout lay;
	uint32_t max_seqs;
	kv_cache_event_fn on_event;
	void *event_ctx;
	char label[KV_LABEL_MAX - 7];     /* room for "/cached" */
	uint8_t default_salt_digest[KV_CACHE_HASH_MAX];
	uint64_t default_salt_fp;

	/* Memory. */
	struct kv_pool *pool;
	struct kv_registry *pool_reg;   /* the pool's own records stay private */
	char *base;                     /* block 0 */
	size_t stride;
	struct kv_blk *blk;             /* (lay.blocks_total) */
	struct kv_tpool *tp;

	pthread_mutex_t lock;
	pthread_cond_t progress;        /* a spill finished, a block was freed */
	uint32_t n_alloc, n_cached, n_spilling, n_pinned, n_lru;
	uint32_t *buckets;              /* prefix index, (bucket_mask + 1) */
	uint32_t bucket_mask;
	uint32_t n_indexed;
	struct { uint32_t head, tail, n; } lru[KV_CACHE_PRIORITIES];

	struct kv_seq *seqs;            /* (max_seqs) */
	uint32_t seq_free;              /* head of free slots */
	uint32_t n_seqs, n_swapped;

	/* Registry records, exact at the end of each call (publish()). */
	struct kv_registry *reg;
	kv_handle h_used, h_cached, h_free;
	uint64_t pub_used, pub_cached, pub_free;
	uint64_t pub_free_total;        /* committed bytes of the pool */
	uint32_t committed_blocks;
	uint16_t stat_epoch;            /* marks of kv_cache_stats() */
	int rec_node;
	uint32_t rec_policy;
	uint64_t stats_id;              /* registry stats source, 0: none */

	/* Counters (lock). */
	struct kv_cache_stats st;

	/* SSD tier (spill.c). */
	struct kv_store *store;
	struct kv_cache_spill_config spill;
	uint32_t spill_mark;            /* n_alloc above which the spiller runs */
	struct ssd_ent *ssd;            /* (ssd_cap) */
	uint32_t ssd_cap, ssd_n, ssd_free, ssd_head, ssd_tail;
	uint32_t *ssd_buckets;
	uint32_t ssd_mask;
	uint64_t nonce;                 /* names this cache's swap extents */
	pthread_t spiller;
	bool spiller_started, spiller_stop, spiller_busy, spill_wanted;
	pthread_cond_t spill_cv;        /* wakes the spiller */
	void *verify_buf;               /* spiller's read-back buffer */
	uint32_t spill_inflight;
	uint32_t spill_waiters;         /* threads waiting for a spill to free DRAM */
	uint32_t spill_force;           /* kv_cache_evict() asks to spill below the mark */
	uint32_t *wt_queue;             /* write-through: blocks to put, pinned */
	uint32_t wt_head, wt_n;
};

/* ---- cache.c ---------------------------------------------------------- */

void cache_lock(struct kv_cache *c);
void cache_unlock(struct kv_cache *c);   /* also publishes registry records */

/* A block from the pool, evicting or waiting for spills when it is full.
 * May drop and retake the lock while it waits. The block comes with
 * ref 1, no flags but ALLOC. Errors: -ENOMEM (nothing can be freed). */
int blk_alloc(struct kv_cache *c, uint32_t *id);
/* n blocks, all or nothing (lock). */
int blk_alloc_n(struct kv_cache *c, uint32_t n, uint32_t *ids);
/* Drop one reference; prio is the releasing sequence's (lock). */
void blk_release(struct kv_cache *c, uint32_t id, uint32_t prio);
/* Take a reference on an indexed block (lock). */
void blk_take(struct kv_cache *c, uint32_t id);
/* Return an allocated, unreferenced, unindexed block to the pool (lock). */
void blk_free(struct kv_cache *c, uint32_t id);
/* Drop an unreferenced cached block out of DRAM (lock): unindexed,
 * children orphaned, event SPILLED or EVICTED, pool. */
void blk_drop(struct kv_cache *c, uint32_t id);
/* Copy block src into a fresh block (lock; may wait like blk_alloc). */
int blk_copy(struct kv_cache *c, uint32_t src, uint32_t *out);

void lru_push(struct kv_cache *c, uint32_t id);   /* at the MRU end */
void lru_push_head(struct kv_cache *c, uint32_t id);
void lru_remove(struct kv_cache *c, uint32_t id);
/* The eviction victim: LRU order, lowest priority first, leaves first;
 * BLK_NONE when nothing is evictable. need_leaf false allows a cached
 * block whose children are in use (the last resort). */
uint32_t lru_victim(struct kv_cache *c, bool need_leaf, bool skip_unstored);

static inline void *blk_ptr(const struct kv_cache *c, uint32_t id)
{
	return c->base + (size_t)id * c->stride;
}

static inline struct kv_blk_hdr *blk_hdr(const struct kv_cache *c, uint32_t id)
{
	return (struct kv_blk_hdr *)((char *)blk_ptr(c, id) + c->lay.header_offset);
}

void cache_event(struct kv_cache *c, enum kv_cache_event_type type, uint32_t id,
		 enum kv_tier tier);

/* ---- prefix.c --------------------------------------------------------- */

/* Chain hash of one block (out: hash_len bytes). parent NULL: the first. */
void prefix_hash(const struct kv_cache *c, const uint8_t *parent, const uint8_t *salt_digest,
		 const int32_t *tokens, uint8_t *out);
/* Digest of a salt (zeros for none). Errors: -EINVAL (too long). */
int prefix_salt(const struct kv_cache *c, const void *salt, size_t len, uint8_t *digest,
		uint64_t *fp);
uint32_t index_find(const struct kv_cache *c, const uint8_t *hash);
void index_insert(struct kv_cache *c, uint32_t id);   /* hash, hkey set */
void index_remove(struct kv_cache *c, uint32_t id);   /* children orphaned */
static inline uint64_t hash_key(const uint8_t *h)
{
	uint64_t k;

	__builtin_memcpy(&k, h, sizeof(k));
	return k;
}

/* Enter the sequence's completed blocks into the index, as far as its
 * chain and the written prefix allow, sharing an equal indexed block
 * instead of its own where there is one (lock). */
void prefix_register(struct kv_cache *c, struct kv_seq *s);
/* References on the longest cached chain of hashes h[0, nf) (DRAM, then
 * read back from the store): ids[] get the blocks; returns how many,
 * *from_ssd how many of them were read back. No lock on entry or return. */
uint32_t prefix_acquire(struct kv_cache *c, const uint8_t *h, uint32_t nf, const int32_t *tokens,
			uint64_t salt_fp, uint32_t *ids, uint32_t *from_ssd);

/* ---- seq.c ------------------------------------------------------------ */

/* The live sequence of a handle, or NULL with -ENOENT in the detail. */
struct kv_seq *seq_get(struct kv_cache *c, kv_seq_id id, int *err);
void seq_release_blocks(struct kv_cache *c, struct kv_seq *s);  /* lock */
void seq_free_arrays(struct kv_seq *s);

/* ---- spill.c ---------------------------------------------------------- */

int spill_open(struct kv_cache *c, const struct kv_cache_config *cfg);
int spill_close(struct kv_cache *c);
/* Wake the spiller when DRAM use passed the watermark (lock). */
void spill_kick(struct kv_cache *c);
/* SSD map (lock). */
uint32_t ssd_find(const struct kv_cache *c, const uint8_t *hash);
void ssd_touch(struct kv_cache *c, uint32_t e);
/* Read the chain hashes[from, to) from the store into fresh indexed
 * blocks, stopping at the first miss or failure; ids[] get them, each with
 * a reference for the caller. Returns how many were loaded. No lock held
 * on entry or return. */
uint32_t spill_load_chain(struct kv_cache *c, const uint8_t *hashes, uint32_t from,
			  uint32_t to, const int32_t *tokens, uint64_t salt_fp,
			  uint32_t *ids);
int spill_swap_out(struct kv_cache *c, struct kv_seq *s, kv_seq_id id);
int spill_swap_in(struct kv_cache *c, struct kv_seq *s);
void spill_swap_delete(struct kv_cache *c, struct kv_seq *s);
int spill_validate(struct kv_cache *c);   /* lock */

#endif /* KV_CACHE_IMPL_H */
