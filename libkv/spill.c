// SPDX-License-Identifier: MIT
/*
 * The SSD tier of the KV cache: the store the cache owns (opened with the
 * cache's shape as its identity), the SSD map (what the store holds of
 * the prefix cache, in LRU order, so that a full store drops its least
 * recently used blocks), the spiller thread (writes cached blocks out
 * when DRAM passes the watermark or an allocation waits, verifies them by
 * reading back, then frees their DRAM), reading chains back for prefix
 * hits, swapping whole sequences out and in, write-through and
 * kv_cache_persist. No store call is ever made with the cache lock held:
 * the store's completions run on its threads and take that lock.
 * spill_validate() checks the SSD map and the spilling counts.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "libkv/cache-impl.h"
#include "taxonomy/kv-private.h"

#define SWAP_KEY_LEN 24u
#define IDENTITY_TAG "libkv.cache/1"
/* SSD blocks deleted per attempt to make room in a full store, and
 * attempts per put. */
#define ROOM_BATCH 2u
#define ROOM_TRIES 8

/* ---- Waiting for asynchronous store calls ------------------------------ */

struct io_wait {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	uint32_t pending;
};

struct io_op {
	struct io_wait *w;
	int result;
	struct kv_store_extent ext;
};

static void io_wait_init(struct io_wait *w)
{
	pthread_mutex_init(&w->mu, NULL);
	pthread_cond_init(&w->cv, NULL);
	w->pending = 0;
}

static void io_wait_all(struct io_wait *w)
{
	pthread_mutex_lock(&w->mu);
	while (w->pending)
		pthread_cond_wait(&w->cv, &w->mu);
	pthread_mutex_unlock(&w->mu);
	pthread_cond_destroy(&w->cv);
	pthread_mutex_destroy(&w->mu);
}

static void io_done(void *ctx, int result, const struct kv_store_extent *ext)
{
	struct io_op *op = ctx;
	struct io_wait *w = op->w;

	op->result = result;
	if (result == 0 && ext)
		op->ext = *ext;
	pthread_mutex_lock(&w->mu);
	w->pending--;
	pthread_cond_signal(&w->cv);
	pthread_mutex_unlock(&w->mu);
}

/* ---- The SSD map ------------------------------------------------------- */

uint32_t ssd_find(const struct kv_cache *c, const uint8_t *hash)
{
	uint64_t k;
	uint32_t e;

	if (!c->ssd_buckets)
		return BLK_NONE;
	k = hash_key(hash);
	for (e = c->ssd_buckets[k & c->ssd_mask]; e != BLK_NONE; e = c->ssd[e].hnext)
		if (c->ssd[e].hkey == k && !memcmp(c->ssd[e].ext.key, hash, c->hash_len))
			return e;
	return BLK_NONE;
}

static void ssd_unlink(struct kv_cache *c, uint32_t e)
{
	struct ssd_ent *x = &c->ssd[e];

	if (x->prev != BLK_NONE)
		c->ssd[x->prev].next = x->next;
	else
		c->ssd_head = x->next;
	if (x->next != BLK_NONE)
		c->ssd[x->next].prev = x->prev;
	else
		c->ssd_tail = x->prev;
	x->prev = x->next = BLK_NONE;
}

static void ssd_link_tail(struct kv_cache *c, uint32_t e)
{
	struct ssd_ent *x = &c->ssd[e];

	x->next = BLK_NONE;
	x->prev = c->ssd_tail;
	if (c->ssd_tail != BLK_NONE)
		c->ssd[c->ssd_tail].next = e;
	else
		c->ssd_head = e;
	c->ssd_tail = e;
}

void ssd_touch(struct kv_cache *c, uint32_t e)
{
	if (e == BLK_NONE || c->ssd_tail == e)
		return;
	ssd_unlink(c, e);
	ssd_link_tail(c, e);
}

static int ssd_grow(struct kv_cache *c)
{
	uint32_t cap = c->ssd_cap ? c->ssd_cap * 2 : 1024, i, mask;
	struct ssd_ent *n;
	uint32_t *b;

	if (cap < c->ssd_cap)
		return -ENOMEM;
	n = realloc(c->ssd, sizeof(*n) * cap);
	if (!n)
		return -ENOMEM;
	c->ssd = n;
	for (mask = 1; mask < cap; mask <<= 1)
		;
	mask = mask * 2 - 1;
	b = malloc(sizeof(*b) * ((size_t)mask + 1));
	if (!b)
		return -ENOMEM;
	memset(b, 0xff, sizeof(*b) * ((size_t)mask + 1));
	for (i = 0; i < c->ssd_cap; i++) {
		if (!n[i].live)
			continue;
		n[i].hnext = b[n[i].hkey & mask];
		b[n[i].hkey & mask] = i;
	}
	/* New entries join the free list (linked through hnext). */
	for (i = cap; i-- > c->ssd_cap;) {
		n[i].live = false;
		n[i].hnext = c->ssd_free;
		c->ssd_free = i;
	}
	free(c->ssd_buckets);
	c->ssd_buckets = b;
	c->ssd_mask = mask;
	c->ssd_cap = cap;
	return 0;
}

/* Record (or refresh) the extent of a prefix block, as most recently
 * used. Out of memory only forgets it: the store keeps it. */
static void ssd_add(struct kv_cache *c, const struct kv_store_extent *ext)
{
	uint32_t e = ssd_find(c, ext->key);
	struct ssd_ent *x;

	if (e != BLK_NONE) {
		c->ssd[e].ext = *ext;
		ssd_touch(c, e);
		return;
	}
	if (c->ssd_free == BLK_NONE && ssd_grow(c)) {
		kv_log(KV_LOG_WARN, "kv cache '%s': out of memory for the SSD map; a spilled "
		       "block is not remembered", c->label);
		return;
	}
	e = c->ssd_free;
	x = &c->ssd[e];
	c->ssd_free = x->hnext;
	x->live = true;
	x->ext = *ext;
	x->hkey = hash_key(ext->key);
	x->hnext = c->ssd_buckets[x->hkey & c->ssd_mask];
	c->ssd_buckets[x->hkey & c->ssd_mask] = e;
	ssd_link_tail(c, e);
	c->ssd_n++;
}

static void ssd_remove(struct kv_cache *c, uint32_t e)
{
	struct ssd_ent *x = &c->ssd[e];
	uint32_t *link = &c->ssd_buckets[x->hkey & c->ssd_mask], b;

	while (*link != e)
		link = &c->ssd[*link].hnext;
	*link = x->hnext;
	ssd_unlink(c, e);
	b = index_find(c, x->ext.key);
	if (b != BLK_NONE)
		c->blk[b].flags &= (uint8_t)~BF_IN_STORE;
	x->live = false;
	x->hnext = c->ssd_free;
	c->ssd_free = e;
	c->ssd_n--;
}

/* The store is full: delete its least recently used prefix blocks. No
 * lock on entry. Returns how many went. */
static uint32_t make_room(struct kv_cache *c)
{
	struct kv_store_extent ext[ROOM_BATCH];
	struct kv_cache_event ev;
	uint32_t n = 0, i;

	cache_lock(c);
	while (n < ROOM_BATCH && c->ssd_head != BLK_NONE) {
		uint32_t e = c->ssd_head;

		ext[n++] = c->ssd[e].ext;
		if (c->on_event && index_find(c, c->ssd[e].ext.key) == BLK_NONE) {
			memset(&ev, 0, sizeof(ev));
			ev.type = KV_EVENT_EVICTED;
			ev.tier = KV_TIER_SSD;
			ev.hash_len = c->hash_len;
			memcpy(ev.hash, c->ssd[e].ext.key, c->hash_len);
			c->on_event(c->event_ctx, &ev);
		}
		ssd_remove(c, e);
		c->st.ssd_evictions++;
	}
	cache_unlock(c);
	for (i = 0; i < n; i++)
		kv_store_delete(c->store, &ext[i]);
	/* Deleted space is reused after the next index sync. */
	if (n)
		kv_store_sync(c->store);
	return n;
}

/* Put n buffers under their keys and wait; with verify, read each back
 * (checking its checksum) into c->verify_buf-sized scratch. ops[i].result
 * gets 0 or -errno. No lock on entry. */
static void put_all(struct kv_cache *c, const uint8_t *const *keys, uint32_t key_len,
		    void *const *data, uint32_t n, struct io_op *ops, void *scratch)
{
	struct io_wait w;
	uint32_t i;
	int rc;

	io_wait_init(&w);
	for (i = 0; i < n; i++) {
		ops[i].w = &w;
		ops[i].result = 0;
		pthread_mutex_lock(&w.mu);
		w.pending++;
		pthread_mutex_unlock(&w.mu);
		rc = kv_store_put_async(c->store, keys[i], key_len, data[i], c->lay.block_bytes,
					io_done, &ops[i]);
		for (int t = 0; rc == -ENOSPC && t < ROOM_TRIES && make_room(c); t++)
			rc = kv_store_put_async(c->store, keys[i], key_len, data[i],
						c->lay.block_bytes, io_done, &ops[i]);
		if (rc) {
			ops[i].result = rc;
			pthread_mutex_lock(&w.mu);
			w.pending--;
			pthread_mutex_unlock(&w.mu);
		}
	}
	io_wait_all(&w);
	if (!c->spill.verify)
		return;
	for (i = 0; i < n; i++) {
		if (ops[i].result)
			continue;
		rc = kv_store_get(c->store, &ops[i].ext, scratch);
		if (rc == 0 && memcmp(scratch, data[i], c->lay.block_bytes))
			rc = kv_fail(EBADMSG, "kv cache '%s': block read back differs from DRAM",
				     c->label);
		if (rc) {
			kv_log(KV_LOG_WARN, "kv cache '%s': spilled block failed verification: %s",
			       c->label, kv_last_error());
			kv_store_delete(c->store, &ops[i].ext);
			ops[i].result = rc;
		}
	}
}

/* ---- The spiller -------------------------------------------------------- */

static bool spill_over(const struct kv_cache *c)
{
	return c->n_alloc - c->n_spilling > c->spill_mark || c->spill_waiters || c->spill_force;
}

void spill_kick(struct kv_cache *c)
{
	if (!c->store || !c->spiller_started)
		return;
	if (!spill_over(c) && !c->wt_n)
		return;
	c->spill_wanted = true;
	if (!c->spiller_busy)
		pthread_cond_signal(&c->spill_cv);
}

static void pin_block(struct kv_cache *c, uint32_t id)
{
	struct kv_blk *b = &c->blk[id];

	if (b->pins++ == 0) {
		c->n_pinned++;
		lru_remove(c, id);
	}
}

static void unpin_block(struct kv_cache *c, uint32_t id)
{
	struct kv_blk *b = &c->blk[id];

	if (--b->pins)
		return;
	c->n_pinned--;
	if (atomic_load_explicit(&b->ref, RELAXED) == 0 && !(b->flags & BF_SPILLING)) {
		lru_push(c, id);
		spill_kick(c);
	}
}

/* Pick this round's work (lock): write-through blocks first, else the
 * LRU leaves that must leave DRAM. Leaves that cost no write are dropped
 * here and now. Returns the count; *wt says which kind. */
static uint32_t spill_pick(struct kv_cache *c, uint32_t *ids, bool *wt)
{
	uint32_t n = 0, freed = 0, max = c->spill.max_inflight, target, v;
	uint32_t resident = c->n_alloc - c->n_spilling;

	*wt = false;
	if (c->wt_n) {
		*wt = true;
		while (n < max && c->wt_n) {
			ids[n++] = c->wt_queue[c->wt_head];
			c->wt_head = (c->wt_head + 1) % c->lay.blocks_total;
			c->wt_n--;
		}
		return n;
	}
	/* As many as bring DRAM back to the mark, or as threads wait for;
	 * kv_cache_evict asks for a full round. */
	target = resident > c->spill_mark ? resident - c->spill_mark : 0;
	if (target < c->spill_waiters)
		target = c->spill_waiters;
	if (c->spill_force || target > max)
		target = max;
	while (n + freed < target) {
		v = lru_victim(c, true, true);
		if (v == BLK_NONE && c->spill_waiters)
			v = lru_victim(c, false, true);
		if (v != BLK_NONE) {
			blk_drop(c, v);
			freed++;
			continue;
		}
		/* Leaves first; a block whose children are in use only when an
		 * allocation has nothing else to wait for. */
		v = lru_victim(c, true, false);
		if (v == BLK_NONE && c->spill_waiters)
			v = lru_victim(c, false, false);
		if (v == BLK_NONE)
			break;
		lru_remove(c, v);
		c->blk[v].flags |= BF_SPILLING;
		c->n_spilling++;
		ids[n++] = v;
	}
	return n;
}

/* Apply a round's results (lock). */
static void spill_finish(struct kv_cache *c, const uint32_t *ids, uint32_t n, bool wt,
			 const struct io_op *ops)
{
	uint32_t i;

	for (i = 0; i < n; i++) {
		struct kv_blk *b = &c->blk[ids[i]];
		bool ok = ops[i].result == 0;

		if (ok) {
			ssd_add(c, &ops[i].ext);
			b->flags |= BF_IN_STORE;
			c->st.spills++;
		} else {
			b->flags |= BF_NOSPILL;
			c->st.spill_errors++;
		}
		if (wt) {
			unpin_block(c, ids[i]);
			continue;
		}
		b->flags &= (uint8_t)~BF_SPILLING;
		c->n_spilling--;
		if (atomic_load_explicit(&b->ref, RELAXED) || b->pins)
			continue;
		if (ok && b->n_children == 0)
			blk_drop(c, ids[i]);
		else
			lru_push_head(c, ids[i]);
	}
}

static void *spiller_main(void *arg)
{
	struct kv_cache *c = arg;
	uint32_t ids[256], n, i;
	const uint8_t *keys[256];
	void *data[256];
	struct io_op ops[256];
	bool wt;

	cache_lock(c);
	for (;;) {
		while (!c->spiller_stop && !c->spill_wanted) {
			c->spiller_busy = false;
			pthread_cond_broadcast(&c->progress);
			pthread_cond_wait(&c->spill_cv, &c->lock);
		}
		if (c->spiller_stop)
			break;
		c->spiller_busy = true;
		c->spill_wanted = false;
		n = spill_pick(c, ids, &wt);
		if (n == 0) {
			pthread_cond_broadcast(&c->progress);
			continue;
		}
		for (i = 0; i < n; i++) {
			keys[i] = c->blk[ids[i]].hash;
			data[i] = blk_ptr(c, ids[i]);
		}
		cache_unlock(c);
		put_all(c, keys, c->hash_len, data, n, ops, c->verify_buf);
		cache_lock(c);
		spill_finish(c, ids, n, wt, ops);
		if (spill_over(c) || c->wt_n)
			c->spill_wanted = true;
		pthread_cond_broadcast(&c->progress);
	}
	c->spiller_busy = false;
	cache_unlock(c);
	return NULL;
}

/* ---- Open and close ------------------------------------------------------ */

struct open_ctx {
	struct kv_cache *c;
	uint32_t stale_swaps;
};

static int open_each(void *ctx, const struct kv_store_extent *ext)
{
	struct open_ctx *o = ctx;
	struct kv_cache *c = o->c;

	if (ext->key_len == c->hash_len && ext->len == c->lay.block_bytes) {
		ssd_add(c, ext);
	} else if (ext->key_len == SWAP_KEY_LEN) {
		/* A swapped-out sequence of a process that is gone. */
		kv_store_delete(c->store, ext);
		o->stale_swaps++;
	}
	return 0;
}

/* Close the store and free the SSD map and buffers; the store's close
 * result. */
static int spill_free(struct kv_cache *c)
{
	int rc = kv_store_close(c->store);

	c->store = NULL;
	free(c->ssd);
	free(c->ssd_buckets);
	free(c->verify_buf);
	free(c->wt_queue);
	c->ssd = NULL;
	c->ssd_buckets = NULL;
	c->verify_buf = NULL;
	c->wt_queue = NULL;
	return rc;
}

int spill_open(struct kv_cache *c, const struct kv_cache_config *cfg)
{
	struct kv_store_config scfg;
	struct open_ctx o = { c, 0 };
	uint8_t id[KV_STORE_IDENTITY_MAX];
	char lbl[KV_LABEL_MAX + 1 + 16];
	uint32_t fields[8];
	uint64_t bb = c->lay.block_bytes;
	size_t n = 0, mk = strlen(cfg->model_key);
	int rc;

	/* The identity: every property that makes a stored block readable
	 * as this cache's block. */
	memset(id, 0, sizeof(id));
	memcpy(id, IDENTITY_TAG, sizeof(IDENTITY_TAG));
	n = 16;
	fields[0] = (uint32_t)c->dtype;
	fields[1] = c->T;
	fields[2] = c->n_layers;
	fields[3] = c->n_kv_heads;
	fields[4] = c->head_dim;
	fields[5] = (uint32_t)c->hash_kind;
	fields[6] = KV_BLOCK_VERSION;
	fields[7] = 0;
	memcpy(id + n, fields, sizeof(fields));
	n += sizeof(fields);
	memcpy(id + n, &bb, sizeof(bb));
	n += sizeof(bb);
	memcpy(id + n, cfg->model_key, mk);
	n += mk;

	snprintf(lbl, sizeof(lbl), "%s/ssd", c->label);
	kv_store_config_default(&scfg);
	scfg.dir = cfg->spill.dir;
	scfg.identity = id;
	scfg.identity_len = n;
	scfg.capacity = cfg->spill.capacity;
	scfg.sync = cfg->spill.sync;
	scfg.io = cfg->spill.io;
	scfg.registry = cfg->registry;
	scfg.kind = KV_KIND_KV;
	scfg.label = lbl;
	rc = kv_store_open(&scfg, &c->store);
	if (rc == -ESTALE)
		return kv_fail(ESTALE, "kv cache: the store in %s was written for another cache "
			       "shape or model (this one: model '%s', %s, block_tokens %u, %u "
			       "layers, %u kv heads, head_dim %u, %s hashes); use another spill "
			       "dir", cfg->spill.dir, cfg->model_key, kv_dtype_name(c->dtype),
			       c->T, c->n_layers, c->n_kv_heads, c->head_dim,
			       c->hash_kind == KV_HASH_SHA256 ? "SHA-256" : "XXH3-128");
	if (rc)
		return rc;
	c->ssd_head = c->ssd_tail = c->ssd_free = BLK_NONE;
	rc = ssd_grow(c);
	if (rc)
		goto fail;
	if (getrandom(&c->nonce, sizeof(c->nonce), GRND_NONBLOCK) != sizeof(c->nonce))
		c->nonce = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32) ^ kv_now_ns();
	rc = kv_store_foreach(c->store, open_each, &o);
	if (rc)
		goto fail;
	if (o.stale_swaps)
		kv_log(KV_LOG_INFO, "kv cache '%s': deleted %u swap extents of an earlier process",
		       c->label, o.stale_swaps);
	c->verify_buf = aligned_alloc(4096, (c->lay.block_bytes + 4095) & ~(size_t)4095);
	c->wt_queue = malloc(sizeof(*c->wt_queue) * c->lay.blocks_total);
	if (!c->verify_buf || !c->wt_queue) {
		rc = kv_fail(ENOMEM, "kv cache: out of memory for the spiller");
		goto fail;
	}
	rc = pthread_create(&c->spiller, NULL, spiller_main, c);
	if (rc) {
		rc = kv_fail(EAGAIN, "kv cache: cannot start the spiller thread (%d)", rc);
		goto fail;
	}
	c->spiller_started = true;
	return 0;
fail:
	spill_free(c);
	return rc;
}

int spill_close(struct kv_cache *c)
{
	if (!c->store)
		return 0;
	if (c->spiller_started) {
		cache_lock(c);
		c->spiller_stop = true;
		pthread_cond_signal(&c->spill_cv);
		cache_unlock(c);
		pthread_join(c->spiller, NULL);
		c->spiller_started = false;
	}
	return spill_free(c);
}

/* ---- Reading chains back ---------------------------------------------- */

static bool header_ok(const struct kv_cache *c, const struct kv_blk_hdr *h, const uint8_t *hash,
		      const uint8_t *parent, uint32_t depth, const int32_t *tokens,
		      uint64_t salt_fp)
{
	uint8_t zero[KV_CACHE_HASH_MAX] = { 0 };

	return !memcmp(h->magic, KV_BLOCK_MAGIC, sizeof(h->magic)) &&
	       h->version == KV_BLOCK_VERSION && h->what == KV_BLOCK_PREFIX &&
	       h->hash_kind == (uint32_t)c->hash_kind && h->block_tokens == c->T &&
	       h->dtype == (uint32_t)c->dtype && h->depth == depth && h->salt_fp == salt_fp &&
	       !memcmp(h->hash, hash, c->hash_len) &&
	       !memcmp(h->parent_hash, parent ? parent : zero, c->hash_len) &&
	       !memcmp(h->tokens, tokens, sizeof(int32_t) * c->T);
}

uint32_t spill_load_chain(struct kv_cache *c, const uint8_t *hashes, uint32_t from, uint32_t to,
			  const int32_t *tokens, uint64_t salt_fp, uint32_t *ids)
{
	const uint32_t hl = c->hash_len;
	struct kv_store_extent *ext = NULL, bad[4];
	struct io_op *ops = NULL;
	struct io_wait w;
	uint32_t m = 0, j, got = 0, n_bad = 0, max = to - from;
	int rc;

	ext = malloc(sizeof(*ext) * max);
	ops = malloc(sizeof(*ops) * max);
	if (!ext || !ops)
		goto out;
	cache_lock(c);
	while (m < max) {
		uint32_t e = ssd_find(c, hashes + (size_t)(from + m) * hl);

		if (e == BLK_NONE)
			break;
		ext[m++] = c->ssd[e].ext;
	}
	for (j = 0; j < m; j++)
		if (blk_alloc(c, &ids[j]))
			break;
	m = j;
	cache_unlock(c);
	if (m == 0)
		goto out;
	io_wait_init(&w);
	for (j = 0; j < m; j++) {
		ops[j].w = &w;
		pthread_mutex_lock(&w.mu);
		w.pending++;
		pthread_mutex_unlock(&w.mu);
		rc = kv_store_get_async(c->store, &ext[j], blk_ptr(c, ids[j]), io_done, &ops[j]);
		if (rc) {
			ops[j].result = rc;
			pthread_mutex_lock(&w.mu);
			w.pending--;
			pthread_mutex_unlock(&w.mu);
		}
	}
	io_wait_all(&w);
	cache_lock(c);
	for (j = 0; j < m; j++) {
		uint32_t i = from + j, y, e;
		const uint8_t *h = hashes + (size_t)i * hl;
		struct kv_blk *b = &c->blk[ids[j]];

		if (got == j && ops[j].result == 0 &&
		    !header_ok(c, blk_hdr(c, ids[j]), h, i ? h - hl : NULL, i,
			       tokens + (size_t)i * c->T, salt_fp))
			ops[j].result = kv_fail(EBADMSG, "kv cache '%s': SSD block at depth %u is "
						"not the block asked for", c->label, i);
		if (got < j || ops[j].result) {
			if (got == j && ops[j].result != -ENOENT && n_bad < 4) {
				bad[n_bad++] = ext[j];
				e = ssd_find(c, h);
				if (e != BLK_NONE)
					ssd_remove(c, e);
			}
			if (got == j)
				kv_log(KV_LOG_WARN, "kv cache '%s': reading a cached block back from "
				       "SSD failed (%s); the prefix hit ends there", c->label,
				       kv_strerror(ops[j].result));
			blk_release(c, ids[j], 0);
			continue;
		}
		y = index_find(c, h);
		if (y != BLK_NONE) {
			/* Another thread loaded or computed it meanwhile. */
			blk_take(c, y);
			blk_release(c, ids[j], 0);
			ids[j] = y;
		} else {
			memcpy(b->hash, h, hl);
			b->hkey = hash_key(h);
			b->depth = i;
			b->parent = i ? index_find(c, h - hl) : BLK_NONE;
			b->prio = 0;
			b->flags |= BF_IN_STORE;
			index_insert(c, ids[j]);
			ssd_touch(c, ssd_find(c, h));
			cache_event(c, KV_EVENT_LOADED, ids[j], KV_TIER_DRAM);
			c->st.loads++;
		}
		got++;
	}
	cache_unlock(c);
	for (j = 0; j < n_bad; j++)
		kv_store_delete(c->store, &bad[j]);
out:
	free(ext);
	free(ops);
	return got;
}

/* ---- Swap ---------------------------------------------------------------- */

static void swap_key(const struct kv_cache *c, uint32_t slot, uint32_t gen, uint32_t b,
		     uint8_t *key)
{
	memcpy(key, "KVSW", 4);
	memcpy(key + 4, &c->nonce, 8);
	memcpy(key + 12, &slot, 4);
	memcpy(key + 16, &gen, 4);
	memcpy(key + 20, &b, 4);
}

int spill_swap_out(struct kv_cache *c, struct kv_seq *s, kv_seq_id id)
{
	uint32_t nblk = atomic_load_explicit(&s->n_blocks, RELAXED), b, n = 0, i;
	struct kv_store_extent *ext;
	uint8_t *keys = NULL;
	const uint8_t **kp = NULL;
	void **data = NULL, *scratch = NULL;
	struct io_op *ops = NULL;
	uint32_t *which = NULL;
	int rc = 0;

	ext = calloc(nblk ? nblk : 1, sizeof(*ext));
	keys = malloc((size_t)(nblk ? nblk : 1) * SWAP_KEY_LEN);
	kp = malloc(sizeof(*kp) * (nblk ? nblk : 1));
	data = malloc(sizeof(*data) * (nblk ? nblk : 1));
	ops = malloc(sizeof(*ops) * (nblk ? nblk : 1));
	which = malloc(sizeof(*which) * (nblk ? nblk : 1));
	scratch = aligned_alloc(4096, (c->lay.block_bytes + 4095) & ~(size_t)4095);
	if (!ext || !keys || !kp || !data || !ops || !which || !scratch) {
		rc = kv_fail(ENOMEM, "kv_seq_swap_out: out of memory");
		goto out;
	}
	for (b = 0; b < nblk; b++) {
		if (s->blocks[b] == BLK_NONE)
			continue;
		swap_key(c, (uint32_t)id, (uint32_t)(id >> 32), b, keys + (size_t)n * SWAP_KEY_LEN);
		kp[n] = keys + (size_t)n * SWAP_KEY_LEN;
		data[n] = blk_ptr(c, s->blocks[b]);
		which[n++] = b;
	}
	/* In batches, so that the store's staging is not flooded. */
	for (i = 0; i < n && rc == 0; i += c->spill.max_inflight) {
		uint32_t k = n - i < c->spill.max_inflight ? n - i : c->spill.max_inflight, j;

		put_all(c, kp + i, SWAP_KEY_LEN, data + i, k, ops + i, scratch);
		for (j = i; j < i + k; j++) {
			if (ops[j].result && rc == 0)
				rc = kv_fail(-ops[j].result, "kv_seq_swap_out: writing block %u: %s",
					     which[j], kv_strerror(ops[j].result));
		}
	}
	if (rc) {
		for (i = 0; i < n; i++)
			if (ops[i].result == 0 && ops[i].ext.id)
				kv_store_delete(c->store, &ops[i].ext);
		goto out;
	}
	for (i = 0; i < n; i++)
		ext[which[i]] = ops[i].ext;
	cache_lock(c);
	seq_release_blocks(c, s);
	s->swap = ext;
	ext = NULL;
	s->state = SEQ_SWAPPED;
	c->n_swapped++;
	c->st.swaps_out++;
	cache_unlock(c);
out:
	free(ext);
	free(keys);
	free(kp);
	free(data);
	free(ops);
	free(which);
	free(scratch);
	return rc;
}

int spill_swap_in(struct kv_cache *c, struct kv_seq *s)
{
	uint32_t nblk = atomic_load_explicit(&s->n_blocks, RELAXED), b, n = 0, j;
	uint32_t len = atomic_load_explicit(&s->len, RELAXED);
	struct io_op *ops = NULL;
	uint32_t *ids = NULL;
	struct io_wait w;
	int rc = 0;

	for (b = 0; b < nblk; b++)
		n += s->swap[b].id != 0;
	ops = malloc(sizeof(*ops) * (n ? n : 1));
	ids = malloc(sizeof(*ids) * (n ? n : 1));
	if (!ops || !ids) {
		rc = kv_fail(ENOMEM, "kv_seq_swap_in: out of memory");
		goto out;
	}
	cache_lock(c);
	rc = blk_alloc_n(c, n, ids);
	cache_unlock(c);
	if (rc)
		goto out;
	io_wait_init(&w);
	for (b = 0, j = 0; b < nblk; b++) {
		if (!s->swap[b].id)
			continue;
		ops[j].w = &w;
		ops[j].result = 0;
		pthread_mutex_lock(&w.mu);
		w.pending++;
		pthread_mutex_unlock(&w.mu);
		rc = kv_store_get_async(c->store, &s->swap[b], blk_ptr(c, ids[j]), io_done, &ops[j]);
		if (rc) {
			ops[j].result = rc;
			pthread_mutex_lock(&w.mu);
			w.pending--;
			pthread_mutex_unlock(&w.mu);
		}
		j++;
	}
	io_wait_all(&w);
	rc = 0;
	for (j = 0; j < n; j++)
		if (ops[j].result && rc == 0)
			rc = kv_fail(-ops[j].result, "kv_seq_swap_in: reading a block back: %s",
				     kv_strerror(ops[j].result));
	cache_lock(c);
	if (rc) {
		for (j = 0; j < n; j++)
			blk_release(c, ids[j], 0);
		cache_unlock(c);
		goto out;
	}
	for (b = 0, j = 0; b < nblk; b++)
		s->blocks[b] = s->swap[b].id ? ids[j++] : BLK_NONE;
	s->state = SEQ_ACTIVE;
	c->n_swapped--;
	c->st.swaps_in++;
	atomic_store_explicit(&s->tail, nblk ? s->blocks[nblk - 1] : BLK_NONE, RELAXED);
	atomic_store_explicit(&s->len, len, RELAXED);
	cache_unlock(c);
	spill_swap_delete(c, s);
out:
	free(ops);
	free(ids);
	return rc;
}

void spill_swap_delete(struct kv_cache *c, struct kv_seq *s)
{
	uint32_t nblk = atomic_load_explicit(&s->n_blocks, RELAXED), b;

	if (!s->swap)
		return;
	for (b = 0; b < nblk; b++)
		if (s->swap[b].id)
			kv_store_delete(c->store, &s->swap[b]);
	free(s->swap);
	s->swap = NULL;
}

/* ---- Persist ------------------------------------------------------------- */

int kv_cache_persist(struct kv_cache *c)
{
	uint32_t *ids = NULL, n = 0, i, nb;
	const uint8_t **keys = NULL;
	void **data = NULL, *scratch = NULL;
	struct io_op *ops = NULL;
	int rc = 0;

	if (!c)
		return kv_fail(EINVAL, "kv_cache_persist: NULL cache");
	if (!c->store)
		return kv_fail(ENOTSUP, "kv_cache_persist: cache '%s' has no SSD tier (spill.dir)",
			       c->label);
	nb = c->lay.blocks_total;
	ids = malloc(sizeof(*ids) * nb);
	keys = malloc(sizeof(*keys) * nb);
	data = malloc(sizeof(*data) * nb);
	ops = malloc(sizeof(*ops) * nb);
	scratch = aligned_alloc(4096, (c->lay.block_bytes + 4095) & ~(size_t)4095);
	if (!ids || !keys || !data || !ops || !scratch) {
		rc = kv_fail(ENOMEM, "kv_cache_persist: out of memory");
		goto out;
	}
	cache_lock(c);
	for (i = 0; i < nb; i++) {
		struct kv_blk *b = &c->blk[i];

		if ((b->flags & (BF_INDEXED | BF_IN_STORE | BF_SPILLING)) != BF_INDEXED)
			continue;
		pin_block(c, i);
		keys[n] = b->hash;
		data[n] = blk_ptr(c, i);
		ids[n++] = i;
	}
	cache_unlock(c);
	for (i = 0; i < n; i += c->spill.max_inflight) {
		uint32_t k = n - i < c->spill.max_inflight ? n - i : c->spill.max_inflight;

		put_all(c, keys + i, c->hash_len, data + i, k, ops + i, scratch);
		if (rc == 0) {
			uint32_t j;

			for (j = i; j < i + k; j++)
				if (ops[j].result) {
					rc = ops[j].result;
					break;
				}
		}
	}
	cache_lock(c);
	spill_finish(c, ids, n, true, ops);
	cache_unlock(c);
	if (rc == 0)
		rc = kv_store_sync(c->store);
out:
	free(ids);
	free(keys);
	free(data);
	free(ops);
	free(scratch);
	return rc;
}

/* ---- Validation ---------------------------------------------------------- */

int spill_validate(struct kv_cache *c)
{
	uint32_t n = 0, e, prev = BLK_NONE, i, spilling = 0;

	for (i = 0; i < c->lay.blocks_total; i++) {
		const struct kv_blk *b = &c->blk[i];

		if (b->flags & BF_SPILLING)
			spilling++;
		if ((b->flags & BF_IN_STORE) &&
		    (!(b->flags & BF_INDEXED) || ssd_find(c, b->hash) == BLK_NONE))
			return kv_fail(EFAULT, "block %u: marked as on SSD, but the SSD map lacks it",
				       i);
	}
	if (spilling != c->n_spilling)
		return kv_fail(EFAULT, "%u blocks spilling, counter says %u", spilling,
			       c->n_spilling);
	if (!c->store)
		return 0;
	for (e = c->ssd_head; e != BLK_NONE; e = c->ssd[e].next) {
		if (e >= c->ssd_cap || !c->ssd[e].live || c->ssd[e].prev != prev || ++n > c->ssd_n)
			return kv_fail(EFAULT, "SSD map: LRU entry %u linked wrongly", e);
		if (ssd_find(c, c->ssd[e].ext.key) != e)
			return kv_fail(EFAULT, "SSD map: entry %u not found under its hash", e);
		prev = e;
	}
	if (n != c->ssd_n || prev != c->ssd_tail)
		return kv_fail(EFAULT, "SSD map: %u entries listed, %u counted", n, c->ssd_n);
	return 0;
}
