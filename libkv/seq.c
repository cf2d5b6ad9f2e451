// SPDX-License-Identifier: MIT
/*
 * Sequences of the paged KV cache: create and free, prompt (prefix hits,
 * then append), append, write and read of K/V in the storage dtype,
 * truncate, fork, preemption by recompute, the sliding window's release,
 * and the queries on one sequence. Swap is in spill.c, attention in
 * attend.c. A sequence's arrays belong to its caller (one at a time, see
 * <kv/cache.h>), so only the steps that touch blocks' shared state take
 * the cache lock. kv_cache_validate() (cache.c) checks every sequence.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "libkv/cache-impl.h"
#include "taxonomy/kv-private.h"

#define MAX_LEN 0x7fffffffu

static uint32_t blocks_for(uint64_t tokens, uint32_t T)
{
	return (uint32_t)((tokens + T - 1) / T);
}

struct kv_seq *seq_get(struct kv_cache *c, kv_seq_id id, int *err)
{
	uint32_t slot = (uint32_t)id, gen = (uint32_t)(id >> 32);

	if (!c) {
		*err = kv_fail(EINVAL, "kv cache: NULL cache");
		return NULL;
	}
	if (gen == 0 || slot >= c->max_seqs ||
	    atomic_load_explicit(&c->seqs[slot].gen, memory_order_acquire) != gen) {
		*err = kv_fail(ENOENT, "kv cache '%s': sequence %#" PRIx64 " is not live (freed, "
			       "or not of this cache)", c->label, id);
		return NULL;
	}
	return &c->seqs[slot];
}

/* The sequence of a call that changes or reads its K/V. */
static struct kv_seq *seq_active(struct kv_cache *c, kv_seq_id id, int *err)
{
	struct kv_seq *s = seq_get(c, id, err);

	if (s && s->state != SEQ_ACTIVE) {
		*err = kv_fail(EBUSY, "kv cache '%s': sequence %#" PRIx64 " is %s", c->label, id,
			       s->state == SEQ_SWAPPED ? "swapped out (swap it in first)"
						       : "preempted (resume it first)");
		return NULL;
	}
	return s;
}

void seq_free_arrays(struct kv_seq *s)
{
	free(s->tokens);
	free(s->blocks);
	free(s->hashes);
	free(s->written);
	free(s->swap);
	s->tokens = NULL;
	s->blocks = NULL;
	s->hashes = NULL;
	s->written = NULL;
	s->swap = NULL;
	s->tok_cap = s->blk_cap = 0;
}

/* Arrays for len tokens. On failure the sequence is unchanged (an array
 * may have grown, which changes nothing it holds). */
static int seq_reserve(struct kv_cache *c, struct kv_seq *s, uint32_t len)
{
	uint32_t nb = blocks_for(len, c->T);

	if (len > s->tok_cap) {
		uint32_t cap = s->tok_cap ? s->tok_cap : 64;
		int32_t *t;

		while (cap < len)
			cap = cap > MAX_LEN / 2 ? MAX_LEN : cap * 2;
		t = realloc(s->tokens, sizeof(*t) * cap);
		if (!t)
			return kv_fail(ENOMEM, "kv cache: out of memory for %u tokens", cap);
		s->tokens = t;
		s->tok_cap = cap;
	}
	if (nb > s->blk_cap) {
		uint32_t cap = s->blk_cap ? s->blk_cap : 8, *b;
		uint8_t *h;

		while (cap < nb)
			cap *= 2;
		b = realloc(s->blocks, sizeof(*b) * cap);
		if (!b)
			return kv_fail(ENOMEM, "kv cache: out of memory for a table of %u blocks", cap);
		s->blocks = b;
		h = realloc(s->hashes, (size_t)cap * c->hash_len);
		if (!h)
			return kv_fail(ENOMEM, "kv cache: out of memory for %u block hashes", cap);
		s->hashes = h;
		s->blk_cap = cap;
	}
	return 0;
}

static void seq_set_table(struct kv_seq *s, uint32_t len, uint32_t nblk)
{
	atomic_store_explicit(&s->n_blocks, nblk, RELAXED);
	atomic_store_explicit(&s->tail, nblk ? s->blocks[nblk - 1] : BLK_NONE, RELAXED);
	atomic_store_explicit(&s->len, len, RELAXED);
}

void seq_release_blocks(struct kv_cache *c, struct kv_seq *s)
{
	uint32_t n = atomic_load_explicit(&s->n_blocks, RELAXED), b;

	/* Deepest first, so the LRU order puts a chain's first block last. */
	if (s->state == SEQ_ACTIVE && s->blocks) {
		for (b = n; b-- > 0;) {
			if (s->blocks[b] != BLK_NONE)
				blk_release(c, s->blocks[b], s->prio);
			s->blocks[b] = BLK_NONE;
		}
	}
	atomic_store_explicit(&s->tail, BLK_NONE, RELAXED);
}

/* Blocks wholly before position `to` can no longer be attended to
 * (lock). */
static void window_release(struct kv_cache *c, struct kv_seq *s, uint32_t to)
{
	uint32_t b;

	for (b = s->released / c->T; b < to / c->T; b++) {
		uint32_t x = s->blocks[b];
		struct kv_blk *blk;

		if (x == BLK_NONE)
			continue;
		s->blocks[b] = BLK_NONE;
		blk = &c->blk[x];
		if (c->window_mode == KV_WINDOW_RELEASE && (blk->flags & BF_INDEXED) &&
		    atomic_load_explicit(&blk->ref, RELAXED) == 1 && blk->pins == 0) {
			/* Not kept for the prefix cache: out of the index too. */
			cache_event(c, KV_EVENT_EVICTED, x, KV_TIER_DRAM);
			index_remove(c, x);
			c->st.evictions++;
		}
		blk_release(c, x, s->prio);
	}
	s->released = to;
}

/* ---- Create and free -------------------------------------------------- */

/* A free sequence slot (lock). Errors: -ENOSPC. */
static int slot_take(struct kv_cache *c, uint32_t *slot)
{
	*slot = c->seq_free;
	if (*slot == BLK_NONE)
		return kv_fail(ENOSPC, "kv cache '%s': all %u sequences in use (max_seqs)",
			       c->label, c->max_seqs);
	c->seq_free = c->seqs[*slot].next_free;
	return 0;
}

/* Make a filled slot live under a new generation; its handle (lock). */
static kv_seq_id slot_publish(struct kv_cache *c, uint32_t slot)
{
	struct kv_seq *s = &c->seqs[slot];

	if (++s->gen_last == 0)
		s->gen_last = 1;
	c->n_seqs++;
	atomic_store_explicit(&s->gen, s->gen_last, memory_order_release);
	return ((uint64_t)s->gen_last << 32) | slot;
}

int kv_seq_create(struct kv_cache *c, const struct kv_seq_config *cfg, kv_seq_id *out)
{
	uint8_t dig[KV_CACHE_HASH_MAX];
	uint32_t *written, slot, prio = 0;
	struct kv_seq *s;
	uint64_t fp;
	int rc;

	if (!c || !out)
		return kv_fail(EINVAL, "kv_seq_create: NULL %s", c ? "out" : "cache");
	if (cfg && cfg->priority >= KV_CACHE_PRIORITIES)
		return kv_fail(EINVAL, "kv_seq_create: priority %u out of range (0..%u)",
			       cfg->priority, KV_CACHE_PRIORITIES - 1);
	if (cfg && (cfg->salt || cfg->salt_len)) {
		rc = prefix_salt(c, cfg->salt, cfg->salt_len, dig, &fp);
		if (rc)
			return rc;
	} else {
		memcpy(dig, c->default_salt_digest, sizeof(dig));
		fp = c->default_salt_fp;
	}
	if (cfg)
		prio = cfg->priority;
	written = calloc(c->n_layers, sizeof(*written));
	if (!written)
		return kv_fail(ENOMEM, "kv_seq_create: out of memory");
	cache_lock(c);
	rc = slot_take(c, &slot);
	if (rc) {
		cache_unlock(c);
		free(written);
		return rc;
	}
	s = &c->seqs[slot];
	s->state = SEQ_ACTIVE;
	s->prio = prio;
	s->n_hashed = s->chain = s->released = 0;
	s->chain_stop = BLK_NONE;
	s->written = written;
	memcpy(s->salt_digest, dig, sizeof(dig));
	s->salt_fp = fp;
	seq_set_table(s, 0, 0);
	*out = slot_publish(c, slot);
	cache_unlock(c);
	return 0;
}

int kv_seq_free(struct kv_cache *c, kv_seq_id id)
{
	struct kv_seq *s, arrays;
	int err = 0;

	s = seq_get(c, id, &err);
	if (!s)
		return err;
	if (s->state == SEQ_SWAPPED)
		spill_swap_delete(c, s);
	cache_lock(c);
	seq_release_blocks(c, s);
	if (s->state == SEQ_SWAPPED)
		c->n_swapped--;
	s->state = SEQ_FREE;
	atomic_store_explicit(&s->gen, 0, memory_order_release);
	seq_set_table(s, 0, 0);
	/* The arrays leave the slot before it goes back on the free list:
	 * another thread may take the slot as soon as the lock is dropped. */
	arrays = *s;
	s->tokens = NULL;
	s->blocks = NULL;
	s->hashes = NULL;
	s->written = NULL;
	s->swap = NULL;
	s->tok_cap = s->blk_cap = 0;
	s->next_free = c->seq_free;
	c->seq_free = (uint32_t)id;
	c->n_seqs--;
	cache_unlock(c);
	seq_free_arrays(&arrays);
	return 0;
}

/* ---- Append and prompt ------------------------------------------------ */

static void hash_full_blocks(struct kv_cache *c, struct kv_seq *s, uint32_t len)
{
	uint32_t i, hl = c->hash_len;

	if (!c->prefix)
		return;
	for (i = s->n_hashed; i < len / c->T; i++)
		prefix_hash(c, i ? s->hashes + (size_t)(i - 1) * hl : NULL, s->salt_digest,
			    s->tokens + (size_t)i * c->T, s->hashes + (size_t)i * hl);
	s->n_hashed = len / c->T;
}

static int seq_append(struct kv_cache *c, struct kv_seq *s, const int32_t *tokens, uint32_t n)
{
	uint32_t len = atomic_load_explicit(&s->len, RELAXED);
	uint32_t nblk = atomic_load_explicit(&s->n_blocks, RELAXED);
	uint32_t new_len, need, rel_to = 0;
	int rc;

	if ((uint64_t)len + n > MAX_LEN)
		return kv_fail(EOVERFLOW, "kv cache: %u + %u tokens pass the longest sequence "
			       "(2^31 - 1)", len, n);
	new_len = len + n;
	rc = seq_reserve(c, s, new_len);
	if (rc)
		return rc;
	need = blocks_for(new_len, c->T) - nblk;
	/* The first new token at position len sees keys from
	 * len - window + 1 on: blocks ending at or before that go. */
	if (c->window && len + 1 > c->window) {
		rel_to = (len + 1 - c->window) / c->T * c->T;
		if (rel_to <= s->released)
			rel_to = 0;
	}
	if (need || rel_to) {
		cache_lock(c);
		rc = blk_alloc_n(c, need, s->blocks + nblk);
		if (rc) {
			cache_unlock(c);
			return rc;
		}
		if (rel_to)
			window_release(c, s, rel_to);
		cache_unlock(c);
	}
	memcpy(s->tokens + len, tokens, sizeof(*tokens) * n);
	hash_full_blocks(c, s, new_len);
	seq_set_table(s, new_len, nblk + need);
	return 0;
}

int kv_seq_append(struct kv_cache *c, kv_seq_id id, const int32_t *tokens, uint32_t n)
{
	struct kv_seq *s;
	int err = 0;

	s = seq_active(c, id, &err);
	if (!s)
		return err;
	if (!tokens && n)
		return kv_fail(EINVAL, "kv_seq_append: NULL tokens");
	if (n == 0)
		return 0;
	return seq_append(c, s, tokens, n);
}

/* Prompt into an empty active sequence: hits first, then the rest. */
static int seq_prompt(struct kv_cache *c, struct kv_seq *s, const int32_t *tokens, uint32_t n,
		      uint32_t *cached)
{
	uint32_t nf, max_hit, d = 0, from_ssd = 0, need, l, i;
	int rc;

	*cached = 0;
	if (!c->prefix)
		return seq_append(c, s, tokens, n);
	rc = seq_reserve(c, s, n);
	if (rc)
		return rc;
	/* Hash into the sequence's own arrays: they become its hashes. */
	memcpy(s->tokens, tokens, sizeof(*tokens) * n);
	s->n_hashed = 0;
	hash_full_blocks(c, s, n);
	nf = n / c->T;
	max_hit = (n - 1) / c->T;
	if (max_hit)
		d = prefix_acquire(c, s->hashes, max_hit, s->tokens, s->salt_fp, s->blocks,
				   &from_ssd);
	need = blocks_for(n, c->T) - d;
	cache_lock(c);
	rc = blk_alloc_n(c, need, s->blocks + d);
	if (rc) {
		for (i = d; i-- > 0;)
			blk_release(c, s->blocks[i], s->prio);
		s->n_hashed = 0;
		cache_unlock(c);
		return rc;
	}
	c->st.lookup_blocks += max_hit;
	c->st.hit_blocks_dram += d - from_ssd;
	c->st.hit_blocks_ssd += from_ssd;
	c->st.tokens_skipped += (uint64_t)d * c->T;
	s->chain = d;
	for (l = 0; l < c->n_layers; l++)
		s->written[l] = d * c->T;
	seq_set_table(s, n, blocks_for(n, c->T));
	cache_unlock(c);
	(void)nf;
	*cached = d * c->T;
	return 0;
}

int kv_seq_prompt(struct kv_cache *c, kv_seq_id id, const int32_t *tokens, uint32_t n,
		  uint32_t *cached)
{
	struct kv_seq *s;
	uint32_t dummy;
	int err = 0;

	s = seq_active(c, id, &err);
	if (!s)
		return err;
	if (!tokens || n == 0)
		return kv_fail(EINVAL, "kv_seq_prompt: %s", tokens ? "no tokens" : "NULL tokens");
	if (atomic_load_explicit(&s->len, RELAXED))
		return kv_fail(EINVAL, "kv_seq_prompt: sequence %#" PRIx64 " already holds %u "
			       "tokens (a prompt starts an empty sequence)", id,
			       atomic_load_explicit(&s->len, RELAXED));
	if (n > MAX_LEN)
		return kv_fail(EOVERFLOW, "kv_seq_prompt: %u tokens", n);
	return seq_prompt(c, s, tokens, n, cached ? cached : &dummy);
}

/* ---- Write and read --------------------------------------------------- */

/* The layer region of block x. */
static char *layer_ptr(const struct kv_cache *c, uint32_t x, uint32_t layer)
{
	return (char *)blk_ptr(c, x) + (size_t)layer * c->lay.layer_bytes;
}

/* Store rows [s0, s1) of one of K (kv 0) or V (kv 1) of a block's layer
 * region from src (rows of n_kv_heads * head_dim). fresh: nothing valid
 * remains in the block outside these rows, so INT8 scales start over. */
static void store_rows(const struct kv_cache *c, char *region, int kv, uint32_t s0, uint32_t s1,
		       const float *src, bool fresh)
{
	const size_t D = c->head_dim, H = c->n_kv_heads, row = H * D;
	char *part = region + (kv ? c->lay.v_offset : 0);
	uint32_t h, r;

	for (h = 0; h < H; h++) {
		char *run = part + h * c->lay.head_bytes;

		if (c->dtype != KV_DTYPE_I8) {
			for (r = s0; r < s1; r++)
				kv_rows_store(c->dtype, run + (size_t)r * D * c->es,
					      src + (size_t)(r - s0) * row + h * D, D);
			continue;
		}
		float *scale = (float *)(region + c->lay.scale_offset) + (size_t)kv * H + h;
		float amax = 0, s = fresh ? 0 : *scale, inv;

		for (r = s0; r < s1; r++) {
			float m = kv_absmax(src + (size_t)(r - s0) * row + h * D, D);

			if (m > amax)
				amax = m;
		}
		if (fresh) {
			s = amax / 127.0f;
		} else if (amax > s * 127.0f) {
			float grown = amax / 127.0f;

			if (grown < 2 * s)
				grown = 2 * s;
			if (s > 0)
				kv_requant_i8((int8_t *)run, (size_t)c->T * D, s / grown);
			s = grown;
		}
		inv = s > 0 ? 1.0f / s : 0;
		for (r = s0; r < s1; r++)
			kv_quant_i8((int8_t *)run + (size_t)r * D, src + (size_t)(r - s0) * row + h * D,
				    D, inv);
		*scale = s;
	}
}

static void load_rows(const struct kv_cache *c, const char *region, int kv, uint32_t s0,
		      uint32_t s1, float *dst)
{
	const size_t D = c->head_dim, H = c->n_kv_heads, row = H * D;
	const char *part = region + (kv ? c->lay.v_offset : 0);
	uint32_t h, r;

	for (h = 0; h < H; h++) {
		const char *run = part + h * c->lay.head_bytes;
		float scale = 1;

		if (c->dtype == KV_DTYPE_I8)
			scale = ((const float *)(region + c->lay.scale_offset))[(size_t)kv * H + h];
		for (r = s0; r < s1; r++)
			kv_rows_load(c->dtype, dst + (size_t)(r - s0) * row + h * D,
				     run + (size_t)r * D * c->es, D, scale);
	}
}

/* Without the lock: a block this sequence holds alone (ref 1, acquired
 * against the release of the last other holder) can only enter or leave
 * the index through it. Its other flag bits (IN_STORE) may change under
 * the lock meanwhile, which is why flags are atomic. */
static bool must_copy(const struct kv_cache *c, uint32_t x)
{
	return atomic_load_explicit(&c->blk[x].ref, memory_order_acquire) > 1 ||
	       (c->blk[x].flags & BF_INDEXED);
}

int kv_seq_write(struct kv_cache *c, kv_seq_id id, uint32_t layer, uint32_t pos, uint32_t n,
		 const float *k, const float *v)
{
	uint32_t len, b, b0, b1, before, l, done;
	const size_t row = (size_t)c->n_kv_heads * c->head_dim;
	struct kv_seq *s;
	bool cow = false;
	int err = 0, rc;

	s = seq_active(c, id, &err);
	if (!s)
		return err;
	len = atomic_load_explicit(&s->len, RELAXED);
	if (layer >= c->n_layers)
		return kv_fail(EINVAL, "kv_seq_write: layer %u out of range (%u layers)", layer,
			       c->n_layers);
	if (!k || !v)
		return kv_fail(EINVAL, "kv_seq_write: NULL %s", k ? "v" : "k");
	if ((uint64_t)pos + n > len)
		return kv_fail(EINVAL, "kv_seq_write: positions %u..%" PRIu64 " past the %u "
			       "appended tokens", pos, (uint64_t)pos + n - 1, len);
	if (pos > s->written[layer])
		return kv_fail(EINVAL, "kv_seq_write: layer %u: writing at %u leaves positions "
			       "%u..%u unwritten", layer, pos, s->written[layer], pos - 1);
	if (pos < s->released)
		return kv_fail(EINVAL, "kv_seq_write: positions below %u were released by the "
			       "sliding window", s->released);
	if (n == 0)
		return 0;
	b0 = pos / c->T;
	b1 = (pos + n - 1) / c->T;
	for (b = b0; b <= b1; b++)
		cow |= must_copy(c, s->blocks[b]);
	if (cow) {
		cache_lock(c);
		for (b = b0; b <= b1; b++) {
			uint32_t x = s->blocks[b], nx;

			if (!must_copy(c, x))
				continue;
			rc = blk_copy(c, x, &nx);
			if (rc) {
				/* Copies made so far hold the same bytes: nothing
				 * the sequence reads has changed. */
				cache_unlock(c);
				return rc;
			}
			s->blocks[b] = nx;
			blk_release(c, x, s->prio);
		}
		seq_set_table(s, len, atomic_load_explicit(&s->n_blocks, RELAXED));
		cache_unlock(c);
	}
	before = s->written[layer];
	/* Rewriting a position changes a block that may have gone into (or
	 * been meant for) the index: this sequence's chain ends there. */
	if (pos < before) {
		if (b0 < s->chain)
			s->chain = b0;
		if (b0 < s->chain_stop)
			s->chain_stop = b0;
	}
	for (b = b0; b <= b1; b++) {
		uint32_t start = b * c->T, s0 = pos > start ? pos - start : 0;
		uint32_t s1 = pos + n < start + c->T ? pos + n - start : c->T;
		bool fresh = s0 == 0 && before <= start + s1;
		char *region = layer_ptr(c, s->blocks[b], layer);
		size_t off = (size_t)(start + s0 - pos) * row;

		store_rows(c, region, 0, s0, s1, k + off, fresh);
		store_rows(c, region, 1, s0, s1, v + off, fresh);
	}
	if (pos + n > before)
		s->written[layer] = pos + n;
	if (c->prefix && s->chain < s->n_hashed) {
		done = UINT32_MAX;
		for (l = 0; l < c->n_layers; l++)
			if (s->written[l] < done)
				done = s->written[l];
		if (done / c->T > s->chain) {
			cache_lock(c);
			prefix_register(c, s);
			seq_set_table(s, len, atomic_load_explicit(&s->n_blocks, RELAXED));
			cache_unlock(c);
		}
	}
	return 0;
}

int kv_seq_read(struct kv_cache *c, kv_seq_id id, uint32_t layer, uint32_t pos, uint32_t n,
		float *k, float *v)
{
	const size_t row = (size_t)c->n_kv_heads * c->head_dim;
	struct kv_seq *s;
	uint32_t b, b0, b1;
	int err = 0;

	s = seq_active(c, id, &err);
	if (!s)
		return err;
	if (layer >= c->n_layers)
		return kv_fail(EINVAL, "kv_seq_read: layer %u out of range (%u layers)", layer,
			       c->n_layers);
	if ((uint64_t)pos + n > s->written[layer])
		return kv_fail(EINVAL, "kv_seq_read: layer %u: positions %u..%" PRIu64 " not all "
			       "written (written up to %u)", layer, pos, (uint64_t)pos + n - 1,
			       s->written[layer]);
	if (pos < s->released)
		return kv_fail(EINVAL, "kv_seq_read: positions below %u were released by the "
			       "sliding window", s->released);
	if (n == 0)
		return 0;
	b0 = pos / c->T;
	b1 = (pos + n - 1) / c->T;
	for (b = b0; b <= b1; b++) {
		uint32_t start = b * c->T, s0 = pos > start ? pos - start : 0;
		uint32_t s1 = pos + n < start + c->T ? pos + n - start : c->T;
		const char *region = layer_ptr(c, s->blocks[b], layer);
		size_t off = (size_t)(start + s0 - pos) * row;

		if (k)
			load_rows(c, region, 0, s0, s1, k + off);
		if (v)
			load_rows(c, region, 1, s0, s1, v + off);
	}
	return 0;
}

/* ---- Truncate, fork ----------------------------------------------------- */

int kv_seq_truncate(struct kv_cache *c, kv_seq_id id, uint32_t new_len)
{
	uint32_t len, nblk, keep, b, l;
	struct kv_seq *s;
	int err = 0;

	s = seq_active(c, id, &err);
	if (!s)
		return err;
	len = atomic_load_explicit(&s->len, RELAXED);
	if (new_len > len)
		return kv_fail(EINVAL, "kv_seq_truncate: %u is past the length %u", new_len, len);
	/* A token appended at new_len would attend to keys from
	 * new_len - window + 1 on: none of them may be gone. */
	if (c->window && s->released && (uint64_t)new_len + 1 < (uint64_t)s->released + c->window)
		return kv_fail(EINVAL, "kv_seq_truncate: to %u, the next token would need positions "
			       "below %u, which the sliding window released", new_len, s->released);
	nblk = atomic_load_explicit(&s->n_blocks, RELAXED);
	keep = blocks_for(new_len, c->T);
	if (keep < nblk) {
		cache_lock(c);
		for (b = nblk; b-- > keep;) {
			if (s->blocks[b] != BLK_NONE)
				blk_release(c, s->blocks[b], s->prio);
			s->blocks[b] = BLK_NONE;
		}
		seq_set_table(s, new_len, keep);
		cache_unlock(c);
	}
	for (l = 0; l < c->n_layers; l++)
		if (s->written[l] > new_len)
			s->written[l] = new_len;
	if (s->chain > new_len / c->T)
		s->chain = new_len / c->T;
	if (s->chain_stop != BLK_NONE && new_len <= s->chain_stop * c->T)
		s->chain_stop = BLK_NONE;
	if (s->n_hashed > new_len / c->T)
		s->n_hashed = new_len / c->T;
	seq_set_table(s, new_len, keep);
	return 0;
}

int kv_seq_fork(struct kv_cache *c, kv_seq_id parent, kv_seq_id *child)
{
	struct kv_seq *p, *s;
	uint32_t len, nblk, slot, b;
	struct kv_seq tmp;
	int err = 0;

	if (!child)
		return kv_fail(EINVAL, "kv_seq_fork: NULL child");
	p = seq_active(c, parent, &err);
	if (!p)
		return err;
	len = atomic_load_explicit(&p->len, RELAXED);
	nblk = atomic_load_explicit(&p->n_blocks, RELAXED);
	memset(&tmp, 0, sizeof(tmp));
	tmp.written = malloc(sizeof(*tmp.written) * c->n_layers);
	if (!tmp.written || seq_reserve(c, &tmp, len)) {
		seq_free_arrays(&tmp);
		return kv_fail(ENOMEM, "kv_seq_fork: out of memory for a copy of %u tokens", len);
	}
	if (len) {
		memcpy(tmp.tokens, p->tokens, sizeof(*tmp.tokens) * len);
		memcpy(tmp.blocks, p->blocks, sizeof(*tmp.blocks) * nblk);
		memcpy(tmp.hashes, p->hashes, (size_t)p->n_hashed * c->hash_len);
	}
	memcpy(tmp.written, p->written, sizeof(*tmp.written) * c->n_layers);
	cache_lock(c);
	err = slot_take(c, &slot);
	if (err) {
		cache_unlock(c);
		seq_free_arrays(&tmp);
		return err;
	}
	s = &c->seqs[slot];
	for (b = 0; b < nblk; b++)
		if (tmp.blocks[b] != BLK_NONE)
			atomic_fetch_add_explicit(&c->blk[tmp.blocks[b]].ref, 1, RELAXED);
	s->tokens = tmp.tokens;
	s->blocks = tmp.blocks;
	s->hashes = tmp.hashes;
	s->written = tmp.written;
	s->tok_cap = tmp.tok_cap;
	s->blk_cap = tmp.blk_cap;
	s->swap = NULL;
	s->state = SEQ_ACTIVE;
	s->prio = p->prio;
	s->n_hashed = p->n_hashed;
	s->chain = p->chain;
	s->chain_stop = p->chain_stop;
	s->released = p->released;
	memcpy(s->salt_digest, p->salt_digest, sizeof(s->salt_digest));
	s->salt_fp = p->salt_fp;
	seq_set_table(s, len, nblk);
	*child = slot_publish(c, slot);
	cache_unlock(c);
	return 0;
}

/* ---- Preemption by recompute ------------------------------------------ */

int kv_seq_preempt(struct kv_cache *c, kv_seq_id id, uint32_t *recompute)
{
	uint32_t len, d = 0, i, max_hit, l;
	struct kv_seq *s;
	int err = 0;

	s = seq_active(c, id, &err);
	if (!s)
		return err;
	len = atomic_load_explicit(&s->len, RELAXED);
	cache_lock(c);
	seq_release_blocks(c, s);
	s->state = SEQ_PREEMPTED;
	atomic_store_explicit(&s->n_blocks, 0, RELAXED);
	/* What a resume would find now (its own full blocks included). */
	max_hit = len ? (len - 1) / c->T : 0;
	if (max_hit > s->n_hashed)
		max_hit = s->n_hashed;
	if (c->prefix) {
		while (d < max_hit && index_find(c, s->hashes + (size_t)d * c->hash_len) != BLK_NONE)
			d++;
		for (i = d; i < max_hit && ssd_find(c, s->hashes + (size_t)i * c->hash_len) !=
						   BLK_NONE; i++)
			d++;
	}
	cache_unlock(c);
	for (l = 0; l < c->n_layers; l++)
		s->written[l] = 0;
	s->chain = 0;
	s->chain_stop = BLK_NONE;
	s->released = 0;
	if (recompute)
		*recompute = len - d * c->T;
	return 0;
}

int kv_seq_resume(struct kv_cache *c, kv_seq_id id, uint32_t *cached)
{
	uint32_t len, dummy;
	struct kv_seq *s;
	int32_t *toks;
	int err = 0, rc;

	s = seq_get(c, id, &err);
	if (!s)
		return err;
	if (s->state != SEQ_PREEMPTED)
		return kv_fail(EBUSY, "kv_seq_resume: sequence %#" PRIx64 " is not preempted", id);
	len = atomic_load_explicit(&s->len, RELAXED);
	if (!cached)
		cached = &dummy;
	*cached = 0;
	if (len == 0) {
		cache_lock(c);
		s->state = SEQ_ACTIVE;
		cache_unlock(c);
		return 0;
	}
	toks = malloc(sizeof(*toks) * len);
	if (!toks)
		return kv_fail(ENOMEM, "kv_seq_resume: out of memory");
	memcpy(toks, s->tokens, sizeof(*toks) * len);
	cache_lock(c);
	s->state = SEQ_ACTIVE;
	cache_unlock(c);
	s->n_hashed = 0;
	seq_set_table(s, 0, 0);
	rc = seq_prompt(c, s, toks, len, cached);
	if (rc) {
		/* Back to preempted with the same tokens. */
		memcpy(s->tokens, toks, sizeof(*toks) * len);
		s->n_hashed = 0;
		hash_full_blocks(c, s, len);
		cache_lock(c);
		s->state = SEQ_PREEMPTED;
		atomic_store_explicit(&s->len, len, RELAXED);
		cache_unlock(c);
	}
	free(toks);
	return rc;
}

/* ---- Queries ------------------------------------------------------------ */

int kv_seq_info(struct kv_cache *c, kv_seq_id id, struct kv_seq_info *out)
{
	struct kv_seq *s;
	uint32_t b, nblk, l;
	int err = 0;

	if (!out)
		return kv_fail(EINVAL, "kv_seq_info: NULL out");
	s = seq_get(c, id, &err);
	if (!s)
		return err;
	memset(out, 0, sizeof(*out));
	out->len = atomic_load_explicit(&s->len, RELAXED);
	nblk = atomic_load_explicit(&s->n_blocks, RELAXED);
	out->blocks = nblk;
	out->released = s->released;
	out->priority = s->prio;
	out->swapped = s->state == SEQ_SWAPPED;
	out->preempted = s->state == SEQ_PREEMPTED;
	out->written = UINT32_MAX;
	for (l = 0; l < c->n_layers; l++)
		if (s->written[l] < out->written)
			out->written = s->written[l];
	if (s->state == SEQ_ACTIVE) {
		/* Shared blocks' flags change under the lock. */
		cache_lock(c);
		for (b = 0; b < nblk; b++) {
			uint32_t x = s->blocks[b];

			if (x == BLK_NONE)
				continue;
			out->blocks_held++;
			if (atomic_load_explicit(&c->blk[x].ref, RELAXED) > 1 ||
			    (c->blk[x].flags & BF_INDEXED))
				out->blocks_shared++;
		}
		pthread_mutex_unlock(&c->lock);
	}
	return 0;
}

int kv_seq_tokens(struct kv_cache *c, kv_seq_id id, uint32_t pos, uint32_t n, int32_t *out)
{
	struct kv_seq *s;
	int err = 0;

	s = seq_get(c, id, &err);
	if (!s)
		return err;
	if (!out && n)
		return kv_fail(EINVAL, "kv_seq_tokens: NULL out");
	if ((uint64_t)pos + n > atomic_load_explicit(&s->len, RELAXED))
		return kv_fail(EINVAL, "kv_seq_tokens: %u..%" PRIu64 " past the length %u", pos,
			       (uint64_t)pos + n - 1, atomic_load_explicit(&s->len, RELAXED));
	if (n)
		memcpy(out, s->tokens + pos, sizeof(*out) * n);
	return 0;
}

int kv_seq_block_table(struct kv_cache *c, kv_seq_id id, const uint32_t **ids, uint32_t *n)
{
	struct kv_seq *s;
	int err = 0;

	if (!ids || !n)
		return kv_fail(EINVAL, "kv_seq_block_table: NULL out");
	s = seq_active(c, id, &err);
	if (!s)
		return err;
	*ids = s->blocks;
	*n = atomic_load_explicit(&s->n_blocks, RELAXED);
	return 0;
}

int kv_seq_swap_out(struct kv_cache *c, kv_seq_id id)
{
	struct kv_seq *s;
	int err = 0;

	s = seq_get(c, id, &err);
	if (!s)
		return err;
	if (!c->store)
		return kv_fail(ENOTSUP, "kv_seq_swap_out: cache '%s' has no SSD tier (spill.dir)",
			       c->label);
	if (s->state != SEQ_ACTIVE)
		return kv_fail(EBUSY, "kv_seq_swap_out: sequence %#" PRIx64 " is %s", id,
			       s->state == SEQ_SWAPPED ? "already swapped out" : "preempted");
	return spill_swap_out(c, s, id);
}

int kv_seq_swap_in(struct kv_cache *c, kv_seq_id id)
{
	struct kv_seq *s;
	int err = 0;

	s = seq_get(c, id, &err);
	if (!s)
		return err;
	if (s->state != SEQ_SWAPPED)
		return kv_fail(EBUSY, "kv_seq_swap_in: sequence %#" PRIx64 " is not swapped out", id);
	return spill_swap_in(c, s);
}
