// SPDX-License-Identifier: MIT
/*
 * The paged KV cache object: configuration, create/destroy, the life of
 * blocks (allocation with eviction, release, copy, drop), the LRU lists,
 * the registry records, events, stats, admission and explicit eviction.
 * Sequences are in seq.c, the prefix index in prefix.c, the SSD tier in
 * spill.c, attention in attend.c. kv_cache_validate() at the end checks
 * every invariant stated in cache-impl.h.
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kv/cache.h>

#include "libkv/cache-impl.h"
#include "taxonomy/kv-private.h"

#define MAX_THREADS 256u
#define MAX_INFLIGHT 256u
/* Address space a pool may reserve: beyond this a capacity is a mistake
 * (or an overflow), not a machine. */
#define MAX_CAPACITY_BYTES (1ull << 46)

void kv_cache_config_default(struct kv_cache_config *cfg)
{
	if (!cfg)
		return;
	memset(cfg, 0, sizeof(*cfg));
	cfg->block_tokens = 16;
	cfg->dtype = KV_DTYPE_F32;
	cfg->max_seqs = 1024;
	cfg->place.numa = KV_NUMA_FIRST_TOUCH;
	cfg->place.huge = KV_HUGE_THP;
	cfg->prefix_cache = true;
	cfg->hash = KV_HASH_XXH3_128;
	cfg->spill.watermark = 0.9;
	cfg->spill.max_inflight = 8;
	cfg->spill.verify = true;
	cfg->spill.sync = KV_STORE_SYNC_BATCHED;
	cfg->window_mode = KV_WINDOW_RELEASE;
	cfg->label = "kv";
}

static size_t round64(size_t v)
{
	return (v + 63) & ~(size_t)63;
}

static size_t round_page(size_t v)
{
	return (v + 4095) & ~(size_t)4095;
}

/* The block layout of <kv/cache.h>, with every product checked. */
static int layout_compute(const struct kv_cache_config *cfg, struct kv_cache_layout *lay)
{
	size_t es = kv_dtype_size(cfg->dtype), head, kv, layer, block, hdr;

	if (__builtin_mul_overflow((size_t)cfg->block_tokens, (size_t)cfg->head_dim, &head) ||
	    __builtin_mul_overflow(head, es, &head) ||
	    __builtin_mul_overflow(head, (size_t)cfg->n_kv_heads, &kv))
		return kv_fail(EINVAL, "kv cache: block_tokens %u x head_dim %u x n_kv_heads %u "
			       "overflows", cfg->block_tokens, cfg->head_dim, cfg->n_kv_heads);
	memset(lay, 0, sizeof(*lay));
	lay->head_bytes = head;
	lay->kv_bytes = kv;
	/* Large parts start on a page: the hardware prefetchers stop at page
	 * boundaries, so a head's run that straddles one more page than it
	 * needs streams measurably slower (about 5 % at 8 KiB runs). */
	lay->v_offset = kv >= 32768 ? round_page(kv) : round64(kv);
	layer = lay->v_offset + round64(kv);
	if (cfg->dtype == KV_DTYPE_I8) {
		lay->scale_offset = layer;
		layer += round64(2 * (size_t)cfg->n_kv_heads * sizeof(float));
	}
	if (layer >= 65536)
		layer = round_page(layer);
	lay->layer_bytes = layer;
	hdr = round64(sizeof(struct kv_blk_hdr) + sizeof(int32_t) * (size_t)cfg->block_tokens);
	lay->header_bytes = hdr;
	if (__builtin_mul_overflow(layer, (size_t)cfg->n_layers, &block) ||
	    __builtin_add_overflow(block, hdr, &block) || block > MAX_CAPACITY_BYTES)
		return kv_fail(EINVAL, "kv cache: a block of %u layers x %zu bytes is absurdly large",
			       cfg->n_layers, layer);
	lay->header_offset = block - hdr;
	lay->block_bytes = block;
	lay->block_tokens = cfg->block_tokens;
	return 0;
}

static int check_config(const struct kv_cache_config *cfg, struct kv_cache_layout *lay)
{
	uint64_t blocks, bytes;
	int rc;

	if (cfg->n_layers == 0 || cfg->n_layers > KV_CACHE_MAX_LAYERS)
		return kv_fail(EINVAL, "kv cache: n_layers %u out of range (1..%u)", cfg->n_layers,
			       KV_CACHE_MAX_LAYERS);
	if (cfg->n_kv_heads == 0 || cfg->n_kv_heads > KV_CACHE_MAX_HEADS)
		return kv_fail(EINVAL, "kv cache: n_kv_heads %u out of range (1..%u)",
			       cfg->n_kv_heads, KV_CACHE_MAX_HEADS);
	if (cfg->head_dim == 0 || cfg->head_dim > KV_CACHE_MAX_HEAD_DIM)
		return kv_fail(EINVAL, "kv cache: head_dim %u out of range (1..%u)", cfg->head_dim,
			       KV_CACHE_MAX_HEAD_DIM);
	if (cfg->block_tokens == 0 || cfg->block_tokens > KV_CACHE_MAX_BLOCK_TOKENS)
		return kv_fail(EINVAL, "kv cache: block_tokens %u out of range (1..%u)",
			       cfg->block_tokens, KV_CACHE_MAX_BLOCK_TOKENS);
	if (cfg->dtype != KV_DTYPE_F32 && cfg->dtype != KV_DTYPE_F16 &&
	    cfg->dtype != KV_DTYPE_BF16 && cfg->dtype != KV_DTYPE_I8)
		return kv_fail(EINVAL, "kv cache: dtype %d is not a KV storage type "
			       "(f32, f16, bf16, i8)", (int)cfg->dtype);
	if (cfg->max_seqs == 0 || cfg->max_seqs > KV_CACHE_MAX_SEQS)
		return kv_fail(EINVAL, "kv cache: max_seqs %u out of range (1..%u)", cfg->max_seqs,
			       KV_CACHE_MAX_SEQS);
	if (cfg->hash != KV_HASH_XXH3_128 && cfg->hash != KV_HASH_SHA256)
		return kv_fail(EINVAL, "kv cache: unknown hash kind %d", (int)cfg->hash);
#ifndef KV_HAVE_LIBCRYPTO
	if (cfg->hash == KV_HASH_SHA256)
		return kv_fail(ENOTSUP, "kv cache: SHA-256 block hashes need libkv built with "
			       "libcrypto (OpenSSL); this build has XXH3-128 only");
#endif
	if (cfg->salt_len > KV_CACHE_SALT_MAX || (cfg->salt_len && !cfg->salt))
		return kv_fail(EINVAL, "kv cache: salt of %zu bytes %s", cfg->salt_len,
			       cfg->salt_len > KV_CACHE_SALT_MAX ? "is too long (max 256)"
							 : "with a NULL pointer");
	if (cfg->window_mode != KV_WINDOW_RELEASE && cfg->window_mode != KV_WINDOW_CACHE)
		return kv_fail(EINVAL, "kv cache: unknown window_mode %d", (int)cfg->window_mode);
	if (cfg->threads > MAX_THREADS)
		return kv_fail(EINVAL, "kv cache: threads %u out of range (0..%u)", cfg->threads,
			       MAX_THREADS);
	if (cfg->label && (strlen(cfg->label) == 0 || strlen(cfg->label) > KV_LABEL_MAX - 8))
		return kv_fail(EINVAL, "kv cache: label must be 1..%d bytes", KV_LABEL_MAX - 8);
	if (cfg->spill.dir) {
		if (!cfg->model_key || !*cfg->model_key)
			return kv_fail(EINVAL, "kv cache: a spill dir needs a model_key (it names the "
				       "model in the store's identity)");
		if (strlen(cfg->model_key) > 128)
			return kv_fail(EINVAL, "kv cache: model_key longer than 128 bytes");
		if (!(cfg->spill.watermark > 0 && cfg->spill.watermark <= 1))
			return kv_fail(EINVAL, "kv cache: spill watermark %g out of range (0, 1]",
				       cfg->spill.watermark);
		if (cfg->spill.max_inflight == 0 || cfg->spill.max_inflight > MAX_INFLIGHT)
			return kv_fail(EINVAL, "kv cache: spill max_inflight %u out of range (1..%u)",
				       cfg->spill.max_inflight, MAX_INFLIGHT);
	}
	rc = layout_compute(cfg, lay);
	if (rc)
		return rc;
	if (cfg->capacity_blocks) {
		blocks = cfg->capacity_blocks;
	} else if (cfg->capacity_bytes) {
		blocks = cfg->capacity_bytes / lay->block_bytes;
		if (blocks == 0)
			return kv_fail(EINVAL, "kv cache: capacity_bytes %" PRIu64 " holds no block of "
				       "%zu bytes", cfg->capacity_bytes, lay->block_bytes);
	} else {
		return kv_fail(EINVAL, "kv cache: no capacity (set capacity_blocks or "
			       "capacity_bytes)");
	}
	if (blocks >= (1u << 31) || __builtin_mul_overflow(blocks, (uint64_t)lay->block_bytes,
							   &bytes) || bytes > MAX_CAPACITY_BYTES)
		return kv_fail(EINVAL, "kv cache: capacity of %" PRIu64 " blocks of %zu bytes is "
			       "absurd (over 64 TiB or 2^31 blocks)", blocks, lay->block_bytes);
	lay->blocks_total = (uint32_t)blocks;
	return 0;
}

/* ---- Locking and the registry records --------------------------------- */

void cache_lock(struct kv_cache *c)
{
	pthread_mutex_lock(&c->lock);
}

/* The pool commits memory chunk by chunk; what it committed is the
 * registry's "used + cached + free". */
static void refresh_committed(struct kv_cache *c)
{
	struct kv_pool_stats ps;

	if (kv_pool_stats(c->pool, &ps) == 0) {
		c->committed_blocks = ps.blocks_committed;
		c->pub_free_total = ps.committed_bytes;
		if (ps.placement.node != c->rec_node && ps.placement.node >= 0) {
			c->rec_node = ps.placement.node;
			kv_registry_move(c->reg, c->h_used, KV_TIER_DRAM, c->rec_node);
			kv_registry_move(c->reg, c->h_cached, KV_TIER_DRAM, c->rec_node);
			kv_registry_move(c->reg, c->h_free, KV_TIER_DRAM, c->rec_node);
		}
	}
}

/* Bring the three records to the counters. The shrinking records go
 * first, so a concurrent reader never sees more than was committed. */
static void publish(struct kv_cache *c)
{
	uint64_t used = (uint64_t)(c->n_alloc - c->n_cached) * c->stride;
	uint64_t cached = (uint64_t)c->n_cached * c->stride;
	uint64_t free_b, pass;

	if (c->n_alloc > c->committed_blocks)
		refresh_committed(c);
	free_b = c->pub_free_total > used + cached ? c->pub_free_total - used - cached : 0;
	for (pass = 0; pass < 2; pass++) {
		bool grow = pass == 1;

		if (used != c->pub_used && (used > c->pub_used) == grow) {
			kv_registry_resize(c->reg, c->h_used, used);
			c->pub_used = used;
		}
		if (cached != c->pub_cached && (cached > c->pub_cached) == grow) {
			kv_registry_resize(c->reg, c->h_cached, cached);
			c->pub_cached = cached;
		}
		if (free_b != c->pub_free && (free_b > c->pub_free) == grow) {
			kv_registry_resize(c->reg, c->h_free, free_b);
			c->pub_free = free_b;
		}
	}
}

void cache_unlock(struct kv_cache *c)
{
	publish(c);
	pthread_mutex_unlock(&c->lock);
}

/* ---- Events ----------------------------------------------------------- */

void cache_event(struct kv_cache *c, enum kv_cache_event_type type, uint32_t id,
		 enum kv_tier tier)
{
	struct kv_cache_event ev;
	const struct kv_blk_hdr *h;

	if (!c->on_event)
		return;
	h = blk_hdr(c, id);
	memset(&ev, 0, sizeof(ev));
	ev.type = type;
	ev.tier = tier;
	ev.hash_len = c->hash_len;
	memcpy(ev.hash, c->blk[id].hash, c->hash_len);
	memcpy(ev.parent_hash, h->parent_hash, c->hash_len);
	ev.depth = c->blk[id].depth;
	ev.tokens = h->tokens;
	ev.n_tokens = c->T;
	c->on_event(c->event_ctx, &ev);
}

/* ---- LRU lists -------------------------------------------------------- */

void lru_push(struct kv_cache *c, uint32_t id)
{
	struct kv_blk *b = &c->blk[id];
	uint32_t p = b->prio;

	b->lru_next = BLK_NONE;
	b->lru_prev = c->lru[p].tail;
	if (c->lru[p].tail != BLK_NONE)
		c->blk[c->lru[p].tail].lru_next = id;
	else
		c->lru[p].head = id;
	c->lru[p].tail = id;
	c->lru[p].n++;
	c->n_lru++;
	b->flags |= BF_LRU;
}

void lru_push_head(struct kv_cache *c, uint32_t id)
{
	struct kv_blk *b = &c->blk[id];
	uint32_t p = b->prio;

	b->lru_prev = BLK_NONE;
	b->lru_next = c->lru[p].head;
	if (c->lru[p].head != BLK_NONE)
		c->blk[c->lru[p].head].lru_prev = id;
	else
		c->lru[p].tail = id;
	c->lru[p].head = id;
	c->lru[p].n++;
	c->n_lru++;
	b->flags |= BF_LRU;
}

void lru_remove(struct kv_cache *c, uint32_t id)
{
	struct kv_blk *b = &c->blk[id];
	uint32_t p = b->prio;

	if (!(b->flags & BF_LRU))
		return;
	if (b->lru_prev != BLK_NONE)
		c->blk[b->lru_prev].lru_next = b->lru_next;
	else
		c->lru[p].head = b->lru_next;
	if (b->lru_next != BLK_NONE)
		c->blk[b->lru_next].lru_prev = b->lru_prev;
	else
		c->lru[p].tail = b->lru_prev;
	b->lru_prev = b->lru_next = BLK_NONE;
	c->lru[p].n--;
	c->n_lru--;
	b->flags &= (uint8_t)~BF_LRU;
}

/* Dropping costs nothing when there is no store, the store already has
 * the block, or writing it failed before. */
static bool droppable(const struct kv_cache *c, const struct kv_blk *b)
{
	return !c->store || (b->flags & (BF_IN_STORE | BF_NOSPILL));
}

uint32_t lru_victim(struct kv_cache *c, bool need_leaf, bool only_droppable)
{
	uint32_t p, id;

	for (p = 0; p < KV_CACHE_PRIORITIES; p++) {
		for (id = c->lru[p].head; id != BLK_NONE; id = c->blk[id].lru_next) {
			const struct kv_blk *b = &c->blk[id];

			if (need_leaf && b->n_children)
				continue;
			if (only_droppable && !droppable(c, b))
				continue;
			return id;
		}
	}
	return BLK_NONE;
}

/* ---- Block life ------------------------------------------------------- */

void blk_free(struct kv_cache *c, uint32_t id)
{
	struct kv_blk *b = &c->blk[id];

	atomic_store_explicit(&b->ref, 0, RELAXED);
	b->flags = 0;
	b->pins = 0;
	b->parent = b->child_head = b->sib_prev = b->sib_next = BLK_NONE;
	b->n_children = 0;
	kv_pool_free_id(c->pool, id);
	c->n_alloc--;
	pthread_cond_broadcast(&c->progress);
}

void blk_drop(struct kv_cache *c, uint32_t id)
{
	struct kv_blk *b = &c->blk[id];
	bool stored = b->flags & BF_IN_STORE;

	lru_remove(c, id);
	cache_event(c, stored ? KV_EVENT_SPILLED : KV_EVENT_EVICTED, id,
		    stored ? KV_TIER_SSD : KV_TIER_DRAM);
	index_remove(c, id);
	c->n_cached--;
	c->st.evictions++;
	blk_free(c, id);
}

void blk_take(struct kv_cache *c, uint32_t id)
{
	struct kv_blk *b = &c->blk[id];

	if (atomic_load_explicit(&b->ref, RELAXED) == 0) {
		c->n_cached--;
		lru_remove(c, id);
	}
	atomic_fetch_add_explicit(&b->ref, 1, RELAXED);
}

void blk_release(struct kv_cache *c, uint32_t id, uint32_t prio)
{
	struct kv_blk *b = &c->blk[id];

	/* Release: a holder that later sees ref 1 without the lock (a
	 * write's copy-on-write check) also sees what was done before. */
	if (atomic_fetch_sub_explicit(&b->ref, 1, memory_order_acq_rel) != 1)
		return;
	if (!(b->flags & BF_INDEXED)) {
		blk_free(c, id);
		return;
	}
	c->n_cached++;
	b->prio = (uint8_t)prio;
	if (b->pins == 0 && !(b->flags & BF_SPILLING)) {
		lru_push(c, id);
		spill_kick(c);
	}
}

/* Take one block from the pool or make room for one. */
static int alloc_one(struct kv_cache *c, uint32_t *out)
{
	uint32_t v;
	void *p;

	char why[160] = "";

	for (;;) {
		if (c->n_alloc < c->lay.blocks_total) {
			if (kv_pool_alloc(c->pool, &p, out) != 0) {
				snprintf(why, sizeof(why), "; the pool could not grow: %s",
					 kv_last_error());
				goto evict;
			}
			struct kv_blk *b = &c->blk[*out];

			c->n_alloc++;
			atomic_store_explicit(&b->ref, 1, RELAXED);
			b->flags = BF_ALLOC;
			b->pins = 0;
			b->parent = b->child_head = b->sib_prev = b->sib_next = BLK_NONE;
			b->n_children = 0;
			b->lru_prev = b->lru_next = BLK_NONE;
			if (c->n_alloc > c->spill_mark)
				spill_kick(c);
			return 0;
		}
evict:
		/* Cheapest first: a cached leaf whose loss costs no write. */
		v = lru_victim(c, true, true);
		if (v != BLK_NONE) {
			blk_drop(c, v);
			continue;
		}
		/* With a store the other leaves must be written first: the
		 * spiller does that; wait for it. */
		if (c->store && (c->n_spilling || lru_victim(c, true, false) != BLK_NONE)) {
			c->spill_waiters++;
			spill_kick(c);
			pthread_cond_wait(&c->progress, &c->lock);
			c->spill_waiters--;
			continue;
		}
		/* The last resort: a cached block whose children are still in
		 * use (only reachable after a rewrite broke a chain). */
		v = lru_victim(c, false, false);
		if (v != BLK_NONE) {
			blk_drop(c, v);
			continue;
		}
		return kv_fail(ENOMEM, "kv cache '%s': no block free (%u of %u allocated: %u held "
			       "by sequences, %u cached but pinned or being written)%s", c->label,
			       c->n_alloc, c->lay.blocks_total, c->n_alloc - c->n_cached,
			       c->n_cached, why);
	}
}

int blk_alloc(struct kv_cache *c, uint32_t *id)
{
	return alloc_one(c, id);
}

int blk_alloc_n(struct kv_cache *c, uint32_t n, uint32_t *ids)
{
	uint32_t i;
	int rc;

	for (i = 0; i < n; i++) {
		rc = alloc_one(c, &ids[i]);
		if (rc) {
			while (i--)
				blk_release(c, ids[i], 0);
			return rc;
		}
	}
	return 0;
}

int blk_copy(struct kv_cache *c, uint32_t src, uint32_t *out)
{
	int rc = alloc_one(c, out);

	if (rc)
		return rc;
	memcpy(blk_ptr(c, *out), blk_ptr(c, src), c->lay.block_bytes);
	c->st.cow_copies++;
	return 0;
}

/* ---- Create / destroy ------------------------------------------------- */

static void free_cache(struct kv_cache *c)
{
	if (c->h_used)
		kv_registry_forget(c->reg, c->h_used);
	if (c->h_cached)
		kv_registry_forget(c->reg, c->h_cached);
	if (c->h_free)
		kv_registry_forget(c->reg, c->h_free);
	if (c->pool)
		kv_pool_destroy(c->pool, KV_POOL_FORCE);
	if (c->pool_reg)
		kv_registry_destroy(c->pool_reg, KV_REGISTRY_FORCE);
	kv_tpool_destroy(c->tp);
	pthread_cond_destroy(&c->progress);
	pthread_cond_destroy(&c->spill_cv);
	pthread_mutex_destroy(&c->lock);
	free(c->seqs);
	free(c->buckets);
	free(c->blk);
	free(c);
}

static int stats_source(void *ctx, struct kv_stat *out, size_t max);

/* The registry's stats source "cache.<label>", made of the characters a
 * source name allows; a second cache with the same label gets ".2" and
 * so on. */
static int add_stats_source(struct kv_cache *c)
{
	char name[KV_STAT_NAME_MAX + 1], base[KV_STAT_NAME_MAX - 3];
	size_t i, n = 0;
	int rc, k;

	n = (size_t)snprintf(base, sizeof(base), "cache.");
	for (i = 0; c->label[i] && n + 1 < sizeof(base); i++) {
		char ch = c->label[i];

		if (ch >= 'A' && ch <= 'Z')
			ch = (char)(ch - 'A' + 'a');
		if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '.' ||
		      ch == '-'))
			ch = '_';
		base[n++] = ch;
	}
	base[n] = 0;
	for (k = 1; k <= KV_STATS_SOURCES_MAX; k++) {
		if (k == 1)
			snprintf(name, sizeof(name), "%s", base);
		else
			snprintf(name, sizeof(name), "%s.%d", base, k);
		rc = kv_registry_add_stats(c->reg, name, stats_source, c, &c->stats_id);
		if (rc != -EEXIST)
			return rc;
	}
	return kv_fail(ENOSPC, "kv cache '%s': no free stats source name", c->label);
}

int kv_cache_create(const struct kv_cache_config *cfg, struct kv_cache **out)
{
	struct kv_registry_config rcfg;
	struct kv_pool_config pcfg;
	struct kv_pool_stats ps;
	struct kv_cache_layout lay;
	struct kv_topo *topo = NULL;
	struct kv_cache *c;
	char lbl[KV_LABEL_MAX + 1 + 16];
	uint32_t i, nb, threads;
	uint64_t page = 2u << 20;
	int rc;

	if (!cfg || !out)
		return kv_fail(EINVAL, "kv_cache_create: NULL %s", cfg ? "out" : "config");
	rc = check_config(cfg, &lay);
	if (rc)
		return rc;
	c = calloc(1, sizeof(*c));
	if (!c)
		return kv_fail(ENOMEM, "kv cache: out of memory");
	pthread_mutex_init(&c->lock, NULL);
	pthread_cond_init(&c->progress, NULL);
	pthread_cond_init(&c->spill_cv, NULL);
	c->n_layers = cfg->n_layers;
	c->n_kv_heads = cfg->n_kv_heads;
	c->head_dim = cfg->head_dim;
	c->T = cfg->block_tokens;
	c->dtype = cfg->dtype;
	c->es = kv_dtype_size(cfg->dtype);
	c->hash_kind = cfg->hash;
	c->hash_len = cfg->hash == KV_HASH_SHA256 ? 32 : 16;
	c->prefix = cfg->prefix_cache;
	c->window = cfg->window;
	c->window_mode = cfg->window_mode;
	c->lay = lay;
	c->max_seqs = cfg->max_seqs;
	c->on_event = cfg->on_event;
	c->event_ctx = cfg->event_ctx;
	snprintf(c->label, sizeof(c->label), "%s", cfg->label ? cfg->label : "kv");
	c->spill_mark = UINT32_MAX;
	for (i = 0; i < KV_CACHE_PRIORITIES; i++)
		c->lru[i].head = c->lru[i].tail = BLK_NONE;
	rc = prefix_salt(c, cfg->salt, cfg->salt_len, c->default_salt_digest, &c->default_salt_fp);
	if (rc)
		goto fail;

	nb = lay.blocks_total;
	c->blk = calloc(nb, sizeof(*c->blk));
	for (c->bucket_mask = 1; c->bucket_mask < nb; c->bucket_mask <<= 1)
		;
	c->bucket_mask = c->bucket_mask * 2 - 1;
	c->buckets = malloc(((size_t)c->bucket_mask + 1) * sizeof(*c->buckets));
	c->seqs = calloc(c->max_seqs, sizeof(*c->seqs));
	if (!c->blk || !c->buckets || !c->seqs) {
		rc = kv_fail(ENOMEM, "kv cache: out of memory for %u blocks' metadata", nb);
		goto fail;
	}
	memset(c->buckets, 0xff, ((size_t)c->bucket_mask + 1) * sizeof(*c->buckets));
	for (i = 0; i < nb; i++)
		c->blk[i].parent = c->blk[i].lru_prev = c->blk[i].lru_next = c->blk[i].hnext =
			c->blk[i].child_head = c->blk[i].sib_prev = c->blk[i].sib_next = BLK_NONE;
	for (i = 0; i < c->max_seqs; i++)
		c->seqs[i].next_free = i + 1 < c->max_seqs ? i + 1 : BLK_NONE;
	c->seq_free = 0;

	/* The pool's own records would count the same bytes as ours: they go
	 * to a private registry. */
	kv_registry_config_default(&rcfg);
	rcfg.name = "kv-pool";
	rcfg.max_labels = 4;
	rcfg.shards = 1;
	rc = kv_registry_create(&rcfg, &c->pool_reg);
	if (rc)
		goto fail;
	kv_pool_config_default(&pcfg);
	pcfg.block_bytes = lay.block_bytes;
	/* Page-aligned blocks once the rounding costs little (layers start
	 * on pages, see layout_compute). */
	pcfg.block_align = lay.block_bytes >= 65536 ? 4096 : 64;
	/* Whole blocks (at the pool's stride) under max_bytes after the pool
	 * rounds it down to its page, whatever page it gets. */
	pcfg.max_bytes = (size_t)nb * ((lay.block_bytes + pcfg.block_align - 1) &
				       ~(pcfg.block_align - 1)) + page;
	pcfg.place = cfg->place;
	pcfg.kind = KV_KIND_KV;
	pcfg.label = "blocks";
	pcfg.registry = c->pool_reg;
	pcfg.budget = cfg->budget;
	rc = kv_pool_create(&pcfg, &c->pool);
	if (rc)
		goto fail;
	/* Block addresses are base + id * stride; the pool hands out
	 * pointers only for committed blocks, so take one to learn base. */
	{
		void *p0;
		uint32_t id0;

		kv_pool_stats(c->pool, &ps);
		c->stride = ps.block_stride;
		rc = kv_pool_alloc(c->pool, &p0, &id0);
		if (rc)
			goto fail;
		c->base = (char *)p0 - (size_t)id0 * c->stride;
		kv_pool_free_id(c->pool, id0);
		kv_pool_stats(c->pool, &ps);
	}

	c->reg = cfg->registry ? cfg->registry : kv_registry_default();
	if (!c->reg) {
		rc = -ENOMEM;
		goto fail;
	}
	c->rec_node = ps.placement.node >= 0 ? ps.placement.node
					     : __builtin_ctzll(kv_numa_nodes() | 1);
	c->rec_policy = 0;
	if (ps.placement.huge != KV_HUGE_NONE)
		c->rec_policy |= KV_POLICY_HUGEPAGE;
	if (ps.placement.locked)
		c->rec_policy |= KV_POLICY_PINNED;
	if (ps.placement.numa == KV_NUMA_BIND || ps.placement.numa == KV_NUMA_LOCAL)
		c->rec_policy |= KV_POLICY_NUMA_BIND;
	else if (ps.placement.numa == KV_NUMA_INTERLEAVE)
		c->rec_policy |= KV_POLICY_NUMA_INTERLEAVE;
	rc = kv_registry_record(c->reg, 0, KV_TIER_DRAM, c->rec_node, KV_KIND_KV,
				c->rec_policy | (cfg->spill.dir ? KV_POLICY_SPILLABLE : 0),
				c->label, &c->h_used);
	if (rc)
		goto fail;
	snprintf(lbl, sizeof(lbl), "%s/cached", c->label);
	rc = kv_registry_record(c->reg, 0, KV_TIER_DRAM, c->rec_node, KV_KIND_KV,
				c->rec_policy | KV_POLICY_EVICTABLE | KV_POLICY_SHARED |
					(cfg->spill.dir ? KV_POLICY_SPILLABLE : 0),
				lbl, &c->h_cached);
	if (rc)
		goto fail;
	snprintf(lbl, sizeof(lbl), "%s/free", c->label);
	rc = kv_registry_record(c->reg, 0, KV_TIER_DRAM, c->rec_node, KV_KIND_KV, c->rec_policy,
				lbl, &c->h_free);
	if (rc)
		goto fail;

	threads = cfg->threads;
	if (threads == 0) {
		threads = 1;
		if (kv_topo_create(&topo) == 0) {
			threads = kv_topo_cores(topo);
			kv_topo_destroy(topo);
		}
		if (threads == 0)
			threads = 1;
		if (threads > MAX_THREADS)
			threads = MAX_THREADS;
	}
	rc = kv_tpool_create(threads, &c->tp);
	if (rc)
		goto fail;

	if (cfg->spill.dir) {
		c->spill = cfg->spill;
		rc = spill_open(c, cfg);
		if (rc)
			goto fail;
		c->spill_mark = (uint32_t)floor(cfg->spill.watermark * nb);
		if (c->spill_mark >= nb)
			c->spill_mark = nb;
	}
	rc = add_stats_source(c);
	if (rc) {
		spill_close(c);
		goto fail;
	}
	*out = c;
	return 0;
fail:
	free_cache(c);
	return rc;
}

int kv_cache_destroy(struct kv_cache *c)
{
	uint32_t i;
	int rc;

	if (!c)
		return 0;
	if (c->stats_id)
		kv_registry_remove_stats(c->reg, c->stats_id);
	/* Sequences' swap extents are deleted and their blocks released
	 * first, so the store is closed with only the prefix cache in it. */
	for (i = 0; i < c->max_seqs; i++) {
		struct kv_seq *s = &c->seqs[i];

		if (!atomic_load_explicit(&s->gen, RELAXED))
			continue;
		if (s->state == SEQ_SWAPPED)
			spill_swap_delete(c, s);
		cache_lock(c);
		seq_release_blocks(c, s);
		cache_unlock(c);
		seq_free_arrays(s);
		atomic_store_explicit(&s->gen, 0, RELAXED);
	}
	rc = spill_close(c);
	free_cache(c);
	return rc;
}

void kv_cache_layout(const struct kv_cache *c, struct kv_cache_layout *out)
{
	if (c && out)
		*out = c->lay;
}

void *kv_cache_block_ptr(const struct kv_cache *c, uint32_t block)
{
	if (!c || block >= c->lay.blocks_total || !(c->blk[block].flags & BF_ALLOC))
		return NULL;
	return blk_ptr(c, block);
}

/* ---- Stats ------------------------------------------------------------ */

static uint16_t next_mark(struct kv_cache *c)
{
	uint32_t i;

	if (++c->stat_epoch == 0) {
		for (i = 0; i < c->lay.blocks_total; i++)
			c->blk[i].stat_mark = 0;
		c->stat_epoch = 1;
	}
	return c->stat_epoch;
}

/* Lock held. */
static void stats_locked(struct kv_cache *c, struct kv_cache_stats *out)
{
	uint64_t unused = 0, held_slots = 0;
	uint16_t mark = next_mark(c);
	uint32_t i;

	*out = c->st;
	out->blocks_total = c->lay.blocks_total;
	out->blocks_used = c->n_alloc - c->n_cached;
	out->blocks_cached = c->n_cached;
	out->blocks_spilling = c->n_spilling;
	out->blocks_pinned = c->n_pinned;
	out->blocks_free = c->lay.blocks_total - c->n_alloc;
	out->blocks_spilled = c->ssd_n;
	out->seqs = c->n_seqs;
	out->seqs_swapped = c->n_swapped;
	out->tokens = 0;
	/* Every block but a sequence's last is full; the last ones are
	 * counted once each, with the fill of the longest holder. */
	for (i = 0; i < c->max_seqs; i++) {
		struct kv_seq *s = &c->seqs[i];
		uint32_t len, nblk, tail, fill;

		if (!atomic_load_explicit(&s->gen, RELAXED))
			continue;
		len = atomic_load_explicit(&s->len, RELAXED);
		nblk = atomic_load_explicit(&s->n_blocks, RELAXED);
		tail = atomic_load_explicit(&s->tail, RELAXED);
		out->tokens += len;
		if (tail == BLK_NONE || nblk == 0 || tail >= c->lay.blocks_total)
			continue;
		fill = len - (nblk - 1) * c->T;
		if (fill > c->T)
			fill = c->T;
		if (c->blk[tail].stat_mark != mark) {
			c->blk[tail].stat_mark = mark;
			c->blk[tail].stat_fill = fill;
		} else if (fill > c->blk[tail].stat_fill) {
			c->blk[tail].stat_fill = fill;
		}
	}
	for (i = 0; i < c->max_seqs; i++) {
		struct kv_seq *s = &c->seqs[i];
		uint32_t tail;

		if (!atomic_load_explicit(&s->gen, RELAXED))
			continue;
		tail = atomic_load_explicit(&s->tail, RELAXED);
		if (tail == BLK_NONE || tail >= c->lay.blocks_total || c->blk[tail].stat_mark != mark)
			continue;
		unused += c->T - c->blk[tail].stat_fill;
		c->blk[tail].stat_mark = (uint16_t)(mark - 1);
	}
	held_slots = (uint64_t)out->blocks_used * c->T;
	out->slots_unused = unused;
	out->waste_pct = held_slots ? 100.0 * (double)unused / (double)held_slots : 0;
	out->hit_rate_dram = out->lookup_blocks ? (double)out->hit_blocks_dram /
							  (double)out->lookup_blocks
						: 0;
	out->hit_rate_ssd = out->lookup_blocks ? (double)out->hit_blocks_ssd /
							 (double)out->lookup_blocks
					       : 0;
}

void kv_cache_stats(struct kv_cache *c, struct kv_cache_stats *out)
{
	if (!c || !out)
		return;
	cache_lock(c);
	stats_locked(c, out);
	cache_unlock(c);
}

/* The registry's stats source: the same counters in every report. */
static int stats_source(void *ctx, struct kv_stat *out, size_t max)
{
	struct kv_cache *c = ctx;
	struct kv_cache_stats st;
	const struct kv_stat all[] = {
		{ "blocks_total", 0, KV_STAT_GAUGE, "KV blocks the cache may hold in DRAM" },
		{ "blocks_used", 0, KV_STAT_GAUGE, "blocks held by sequences" },
		{ "blocks_cached", 0, KV_STAT_GAUGE, "blocks held only by the prefix cache" },
		{ "blocks_free", 0, KV_STAT_GAUGE, "blocks neither used nor cached" },
		{ "blocks_spilling", 0, KV_STAT_GAUGE, "cached blocks being written to SSD" },
		{ "blocks_pinned", 0, KV_STAT_GAUGE, "pinned prefix blocks" },
		{ "blocks_spilled", 0, KV_STAT_GAUGE, "prefix blocks on SSD" },
		{ "seqs", 0, KV_STAT_GAUGE, "live sequences" },
		{ "seqs_swapped", 0, KV_STAT_GAUGE, "sequences swapped out to SSD" },
		{ "tokens", 0, KV_STAT_GAUGE, "tokens in live sequences" },
		{ "waste_pct", 0, KV_STAT_GAUGE, "unfilled slots of held blocks, percent" },
		{ "hit_rate_dram", 0, KV_STAT_GAUGE, "prompt blocks found in DRAM / asked" },
		{ "hit_rate_ssd", 0, KV_STAT_GAUGE, "prompt blocks found on SSD / asked" },
		{ "lookup_blocks", 0, KV_STAT_COUNTER, "full prompt blocks looked up" },
		{ "tokens_skipped", 0, KV_STAT_COUNTER, "prompt tokens whose KV was reused" },
		{ "evictions", 0, KV_STAT_COUNTER, "blocks that left DRAM" },
		{ "spills", 0, KV_STAT_COUNTER, "blocks written to SSD" },
		{ "loads", 0, KV_STAT_COUNTER, "blocks read back from SSD" },
		{ "spill_errors", 0, KV_STAT_COUNTER, "failed or unverified SSD writes" },
		{ "cow_copies", 0, KV_STAT_COUNTER, "copy-on-write block copies" },
	};
	double v[KV_ARRAY_SIZE(all)];
	size_t i, n = KV_ARRAY_SIZE(all);

	kv_cache_stats(c, &st);
	v[0] = st.blocks_total;
	v[1] = st.blocks_used;
	v[2] = st.blocks_cached;
	v[3] = st.blocks_free;
	v[4] = st.blocks_spilling;
	v[5] = st.blocks_pinned;
	v[6] = (double)st.blocks_spilled;
	v[7] = st.seqs;
	v[8] = st.seqs_swapped;
	v[9] = (double)st.tokens;
	v[10] = st.waste_pct;
	v[11] = st.hit_rate_dram;
	v[12] = st.hit_rate_ssd;
	v[13] = (double)st.lookup_blocks;
	v[14] = (double)st.tokens_skipped;
	v[15] = (double)st.evictions;
	v[16] = (double)st.spills;
	v[17] = (double)st.loads;
	v[18] = (double)st.spill_errors;
	v[19] = (double)st.cow_copies;
	if (n > max)
		n = max;
	for (i = 0; i < n; i++) {
		out[i] = all[i];
		out[i].value = v[i];
	}
	return (int)n;
}

/* ---- Admission and eviction ------------------------------------------- */

static uint32_t blocks_for(uint64_t tokens, uint32_t T)
{
	return (uint32_t)((tokens + T - 1) / T);
}

int kv_cache_can_append(struct kv_cache *c, const kv_seq_id *seqs, const uint32_t *n_tokens,
			uint32_t n, uint32_t *needed, uint32_t *available)
{
	uint64_t need = 0, avail;
	uint32_t i;
	int err = 0;

	if (!c || !n_tokens || n == 0 || (!seqs && n != 1))
		return kv_fail(EINVAL, "kv_cache_can_append: %s", !c ? "NULL cache" :
			       !n_tokens ? "NULL n_tokens" : n == 0 ? "no sequences" :
			       "NULL seqs with more than one count");
	/* Under the lock: other threads' sequences and blocks are read. */
	cache_lock(c);
	if (!seqs) {
		need = blocks_for(n_tokens[0], c->T);
	} else {
		for (i = 0; i < n; i++) {
			struct kv_seq *s = seq_get(c, seqs[i], &err);
			uint32_t len, nblk, tail;

			if (!s) {
				pthread_mutex_unlock(&c->lock);
				return err;
			}
			len = atomic_load_explicit(&s->len, RELAXED);
			nblk = atomic_load_explicit(&s->n_blocks, RELAXED);
			tail = atomic_load_explicit(&s->tail, RELAXED);
			if (s->state != SEQ_ACTIVE) {
				need += blocks_for((uint64_t)len + n_tokens[i], c->T);
				continue;
			}
			need += blocks_for((uint64_t)len + n_tokens[i], c->T) - nblk;
			/* A shared or indexed last block is copied at its next write. */
			if (n_tokens[i] && len % c->T && tail != BLK_NONE &&
			    (atomic_load_explicit(&c->blk[tail].ref, RELAXED) > 1 ||
			     (c->blk[tail].flags & BF_INDEXED)))
				need++;
		}
	}
	avail = (uint64_t)(c->lay.blocks_total - c->n_alloc) + c->n_lru + c->n_spilling;
	pthread_mutex_unlock(&c->lock);
	if (needed)
		*needed = need > UINT32_MAX ? UINT32_MAX : (uint32_t)need;
	if (available)
		*available = avail > UINT32_MAX ? UINT32_MAX : (uint32_t)avail;
	return need <= avail ? 1 : 0;
}

int kv_cache_evict(struct kv_cache *c, uint32_t n, uint32_t *evicted)
{
	uint32_t done = 0, before, v;

	if (!c)
		return kv_fail(EINVAL, "kv_cache_evict: NULL cache");
	cache_lock(c);
	before = c->n_alloc;
	while (done < n) {
		v = lru_victim(c, true, true);
		if (v != BLK_NONE) {
			blk_drop(c, v);
			done++;
			continue;
		}
		/* The rest must be written to the store first. */
		if (c->store && (c->n_spilling || lru_victim(c, true, false) != BLK_NONE)) {
			c->spill_waiters++;
			c->spill_force++;
			spill_kick(c);
			pthread_cond_wait(&c->progress, &c->lock);
			c->spill_force--;
			c->spill_waiters--;
			done = before > c->n_alloc ? before - c->n_alloc : 0;
			continue;
		}
		break;
	}
	done = before > c->n_alloc ? before - c->n_alloc : 0;
	cache_unlock(c);
	if (evicted)
		*evicted = done;
	return 0;
}

/* ---- Validation ------------------------------------------------------- */

#define VFAIL(...) do { rc = kv_fail(EFAULT, __VA_ARGS__); goto out; } while (0)

int kv_cache_validate(struct kv_cache *c)
{
	uint32_t nb, i, j, n_alloc = 0, n_cached = 0, n_indexed = 0, n_pinned = 0, n_lru = 0;
	uint32_t *refs = NULL, *kids = NULL;
	struct kv_registry_record_check {
		kv_handle h;
		uint64_t want;
		const char *what;
	} recs[3];
	int rc = 0;

	if (!c)
		return kv_fail(EINVAL, "kv_cache_validate: NULL cache");
	nb = c->lay.blocks_total;
	refs = calloc(nb, sizeof(*refs));
	kids = calloc(nb, sizeof(*kids));
	if (!refs || !kids) {
		free(refs);
		free(kids);
		return kv_fail(ENOMEM, "kv_cache_validate: out of memory");
	}
	cache_lock(c);
	/* Sequences: tables, hashes, counters. */
	for (i = 0; i < c->max_seqs; i++) {
		struct kv_seq *s = &c->seqs[i];
		uint32_t len, nblk, rel_blocks, l;
		uint8_t h[KV_CACHE_HASH_MAX];

		if (!atomic_load_explicit(&s->gen, RELAXED))
			continue;
		len = atomic_load_explicit(&s->len, RELAXED);
		nblk = atomic_load_explicit(&s->n_blocks, RELAXED);
		if (nblk != (s->state == SEQ_PREEMPTED ? 0 : blocks_for(len, c->T)))
			VFAIL("seq slot %u: %u table entries for %u tokens (state %d)", i, nblk, len,
			      (int)s->state);
		if (s->n_hashed != (c->prefix ? len / c->T : s->n_hashed))
			VFAIL("seq slot %u: %u blocks hashed, %u full", i, s->n_hashed, len / c->T);
		if (s->chain > s->n_hashed || s->chain > s->chain_stop)
			VFAIL("seq slot %u: chain %u past %u hashed blocks or the stop %u", i, s->chain,
			      s->n_hashed, s->chain_stop);
		for (l = 0; l < c->n_layers; l++)
			if (s->written[l] > len)
				VFAIL("seq slot %u: layer %u written to %u past length %u", i, l,
				      s->written[l], len);
		if (c->prefix) {
			for (j = 0; j < s->n_hashed; j++) {
				prefix_hash(c, j ? s->hashes + (size_t)(j - 1) * c->hash_len : NULL,
					    s->salt_digest, s->tokens + (size_t)j * c->T, h);
				if (memcmp(h, s->hashes + (size_t)j * c->hash_len, c->hash_len))
					VFAIL("seq slot %u: block %u's hash does not match its tokens",
					      i, j);
			}
		}
		if (s->state == SEQ_SWAPPED || s->state == SEQ_PREEMPTED) {
			if (atomic_load_explicit(&s->tail, RELAXED) != BLK_NONE)
				VFAIL("seq slot %u: swapped or preempted but holds a tail block", i);
			continue;
		}
		if (s->released % c->T || s->released > len)
			VFAIL("seq slot %u: released %u not whole blocks within %u", i, s->released,
			      len);
		rel_blocks = s->released / c->T;
		for (j = 0; j < nblk; j++) {
			uint32_t b = s->blocks[j];

			if (j < rel_blocks) {
				if (b != BLK_NONE)
					VFAIL("seq slot %u: released block %u still held", i, j);
				continue;
			}
			if (b >= nb)
				VFAIL("seq slot %u: block %u of the table is %u (of %u)", i, j, b, nb);
			if (!(c->blk[b].flags & BF_ALLOC))
				VFAIL("seq slot %u: table block %u (%u) is free in the pool", i, j, b);
			refs[b]++;
		}
		if (atomic_load_explicit(&s->tail, RELAXED) !=
		    (nblk && s->blocks[nblk - 1] != BLK_NONE ? s->blocks[nblk - 1] : BLK_NONE))
			VFAIL("seq slot %u: tail block does not match the table", i);
	}
	/* Blocks. */
	for (i = 0; i < nb; i++) {
		struct kv_blk *b = &c->blk[i];
		uint32_t ref = atomic_load_explicit(&b->ref, RELAXED);

		if (!(b->flags & BF_ALLOC)) {
			if (ref || b->flags || b->pins)
				VFAIL("block %u: free but ref %u, flags %#x, pins %u", i, ref, b->flags,
				      b->pins);
			continue;
		}
		n_alloc++;
		if (ref != refs[i])
			VFAIL("block %u: ref %u but %u table references", i, ref, refs[i]);
		if (b->pins)
			n_pinned++;
		if (b->flags & BF_INDEXED) {
			n_indexed++;
			if (index_find(c, b->hash) != i)
				VFAIL("block %u: indexed but the index finds %u for its hash", i,
				      index_find(c, b->hash));
			if (b->parent != BLK_NONE) {
				if (b->parent >= nb || !(c->blk[b->parent].flags & BF_INDEXED))
					VFAIL("block %u: parent %u is not indexed", i, b->parent);
				if (memcmp(blk_hdr(c, i)->parent_hash, c->blk[b->parent].hash,
					   c->hash_len))
					VFAIL("block %u: parent %u's hash is not its parent hash", i,
					      b->parent);
				kids[b->parent]++;
			}
			if (memcmp(blk_hdr(c, i)->hash, b->hash, c->hash_len))
				VFAIL("block %u: header hash differs from the index's", i);
		} else if (b->parent != BLK_NONE || b->n_children) {
			VFAIL("block %u: not indexed but has parent %u or %u children", i, b->parent,
			      b->n_children);
		}
		if (ref == 0) {
			if (!(b->flags & BF_INDEXED))
				VFAIL("block %u: allocated, unreferenced and not indexed (leaked)", i);
			n_cached++;
			bool listed = b->flags & BF_LRU;
			bool held = b->pins || (b->flags & BF_SPILLING);

			if (listed == held)
				VFAIL("block %u: cached, pins %u, flags %#x: LRU membership wrong", i,
				      b->pins, b->flags);
		} else if (b->flags & BF_LRU) {
			VFAIL("block %u: referenced (%u) but on an LRU list", i, ref);
		}
	}
	for (i = 0; i < nb; i++)
		if ((c->blk[i].flags & BF_INDEXED) && c->blk[i].n_children != kids[i])
			VFAIL("block %u: %u children counted, %u indexed blocks name it", i,
			      c->blk[i].n_children, kids[i]);
	/* LRU lists. */
	for (i = 0; i < KV_CACHE_PRIORITIES; i++) {
		uint32_t id, prev = BLK_NONE, count = 0;

		for (id = c->lru[i].head; id != BLK_NONE; id = c->blk[id].lru_next) {
			if (id >= nb || count > nb)
				VFAIL("LRU %u: bad link %u", i, id);
			if (c->blk[id].lru_prev != prev || c->blk[id].prio != i ||
			    !(c->blk[id].flags & BF_LRU))
				VFAIL("LRU %u: block %u linked wrongly", i, id);
			prev = id;
			count++;
		}
		if (prev != c->lru[i].tail || count != c->lru[i].n)
			VFAIL("LRU %u: tail or count (%u, listed %u) wrong", i, c->lru[i].n, count);
		n_lru += count;
	}
	if (n_lru != c->n_lru)
		VFAIL("LRU: %u blocks listed, counter says %u", n_lru, c->n_lru);
	if (n_alloc != c->n_alloc || n_cached != c->n_cached || n_indexed != c->n_indexed ||
	    n_pinned != c->n_pinned)
		VFAIL("counters: alloc %u/%u cached %u/%u indexed %u/%u pinned %u/%u (counted/kept)",
		      n_alloc, c->n_alloc, n_cached, c->n_cached, n_indexed, c->n_indexed, n_pinned,
		      c->n_pinned);
	/* The index holds nothing else. */
	for (i = 0, j = 0; i <= c->bucket_mask; i++) {
		uint32_t id;

		for (id = c->buckets[i]; id != BLK_NONE; id = c->blk[id].hnext) {
			if (id >= nb || !(c->blk[id].flags & BF_INDEXED) ||
			    (c->blk[id].hkey & c->bucket_mask) != i || ++j > n_indexed)
				VFAIL("prefix index: bucket %u holds block %u wrongly", i, id);
		}
	}
	if (j != n_indexed)
		VFAIL("prefix index: %u entries for %u indexed blocks", j, n_indexed);
	{
		struct kv_pool_stats ps;

		kv_pool_stats(c->pool, &ps);
		if (ps.blocks_used != c->n_alloc)
			VFAIL("pool: %u blocks used, cache took %u", ps.blocks_used, c->n_alloc);
		rc = kv_pool_validate(c->pool);
		if (rc)
			goto out;
	}
	rc = spill_validate(c);
	if (rc)
		goto out;
	/* Registry records, as published at the end of the last call. */
	publish(c);
	recs[0] = (struct kv_registry_record_check){ c->h_used,
		(uint64_t)(c->n_alloc - c->n_cached) * c->stride, "used" };
	recs[1] = (struct kv_registry_record_check){ c->h_cached,
		(uint64_t)c->n_cached * c->stride, "cached" };
	recs[2] = (struct kv_registry_record_check){ c->h_free, c->pub_free, "free" };
	for (i = 0; i < 3; i++) {
		struct kv_record r = { 0 };

		if (kv_registry_get(c->reg, recs[i].h, &r) || r.bytes != recs[i].want)
			VFAIL("registry: '%s' record shows %" PRIu64 " bytes, want %" PRIu64,
			      recs[i].what, r.bytes, recs[i].want);
	}
out:
	pthread_mutex_unlock(&c->lock);
	free(refs);
	free(kids);
	return rc;
}
