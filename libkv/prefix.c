// SPDX-License-Identifier: MIT
/*
 * The prefix cache: chained block hashes (XXH3-128, or SHA-256 from
 * libcrypto), the DRAM index from hash to block (a chained hash table
 * with its links in the block records), registration of completed blocks
 * with deduplication, and the cache-wide prefix calls: kv_cache_lookup,
 * kv_cache_pin and kv_cache_unpin. kv_cache_validate() (cache.c) checks
 * the index, the parent links and the child counts.
 *
 * Why the child counts: eviction takes leaves first (lru_victim), so a
 * chain loses its deepest blocks before its middle, and a lookup, which
 * walks a chain from its first block, never finds a hole in it.
 */
#include <stdlib.h>
#include <string.h>

#include <xxhash.h>
#ifdef KV_HAVE_LIBCRYPTO
#include <openssl/evp.h>
#endif

#include "libkv/cache-impl.h"
#include "taxonomy/kv-private.h"

/* H(data): 16 bytes of XXH3-128 in canonical (big-endian) form, or 32 of
 * SHA-256. */
static void digest(enum kv_hash_kind kind, const void *data, size_t len, uint8_t *out)
{
#ifdef KV_HAVE_LIBCRYPTO
	if (kind == KV_HASH_SHA256) {
		unsigned int n = 0;

		/* A failure of EVP_Digest would be an OpenSSL without SHA-256:
		 * then every block hashes to zeros' digest, caught at create. */
		if (!EVP_Digest(data, len, out, &n, EVP_sha256(), NULL))
			memset(out, 0, 32);
		return;
	}
#endif
	XXH128_canonical_t canon;

	(void)kind;
	XXH128_canonicalFromHash(&canon, XXH3_128bits(data, len));
	memcpy(out, canon.digest, sizeof(canon.digest));
}

int prefix_salt(const struct kv_cache *c, const void *salt, size_t len, uint8_t *dig,
		uint64_t *fp)
{
	if (len > KV_CACHE_SALT_MAX || (len && !salt))
		return kv_fail(EINVAL, "kv cache: salt of %zu bytes %s", len,
			       len > KV_CACHE_SALT_MAX ? "is too long (max 256)" : "with NULL data");
	memset(dig, 0, KV_CACHE_HASH_MAX);
	if (len)
		digest(c->hash_kind, salt, len, dig);
	memcpy(fp, dig, sizeof(*fp));
	return 0;
}

void prefix_hash(const struct kv_cache *c, const uint8_t *parent, const uint8_t *salt_digest,
		 const int32_t *tokens, uint8_t *out)
{
	/* parent || salt digest || tokens as little-endian int32 */
	uint8_t buf[2 * KV_CACHE_HASH_MAX + 4 * KV_CACHE_MAX_BLOCK_TOKENS];
	size_t hl = c->hash_len, off = 0;

	if (parent)
		memcpy(buf, parent, hl);
	else
		memset(buf, 0, hl);
	off = hl;
	memcpy(buf + off, salt_digest, hl);
	off += hl;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	memcpy(buf + off, tokens, 4 * (size_t)c->T);
#else
	for (uint32_t i = 0; i < c->T; i++) {
		uint32_t t = (uint32_t)tokens[i];

		buf[off + 4 * i] = (uint8_t)t;
		buf[off + 4 * i + 1] = (uint8_t)(t >> 8);
		buf[off + 4 * i + 2] = (uint8_t)(t >> 16);
		buf[off + 4 * i + 3] = (uint8_t)(t >> 24);
	}
#endif
	off += 4 * (size_t)c->T;
	digest(c->hash_kind, buf, off, out);
}

/* ---- The DRAM index --------------------------------------------------- */

uint32_t index_find(const struct kv_cache *c, const uint8_t *hash)
{
	uint64_t k = hash_key(hash);
	uint32_t id;

	for (id = c->buckets[k & c->bucket_mask]; id != BLK_NONE; id = c->blk[id].hnext)
		if (c->blk[id].hkey == k && !memcmp(c->blk[id].hash, hash, c->hash_len))
			return id;
	return BLK_NONE;
}

void index_insert(struct kv_cache *c, uint32_t id)
{
	struct kv_blk *b = &c->blk[id];
	uint32_t *head = &c->buckets[b->hkey & c->bucket_mask];

	b->hnext = *head;
	*head = id;
	b->flags |= BF_INDEXED;
	b->child_head = BLK_NONE;
	b->n_children = 0;
	b->sib_prev = b->sib_next = BLK_NONE;
	c->n_indexed++;
	if (b->parent != BLK_NONE) {
		struct kv_blk *p = &c->blk[b->parent];

		b->sib_next = p->child_head;
		if (p->child_head != BLK_NONE)
			c->blk[p->child_head].sib_prev = id;
		p->child_head = id;
		p->n_children++;
	}
}

static void unlink_child(struct kv_cache *c, uint32_t id)
{
	struct kv_blk *b = &c->blk[id], *p = &c->blk[b->parent];

	if (b->sib_prev != BLK_NONE)
		c->blk[b->sib_prev].sib_next = b->sib_next;
	else
		p->child_head = b->sib_next;
	if (b->sib_next != BLK_NONE)
		c->blk[b->sib_next].sib_prev = b->sib_prev;
	p->n_children--;
	b->parent = b->sib_prev = b->sib_next = BLK_NONE;
}

void index_remove(struct kv_cache *c, uint32_t id)
{
	struct kv_blk *b = &c->blk[id];
	uint32_t *link = &c->buckets[b->hkey & c->bucket_mask];

	if (!(b->flags & BF_INDEXED))
		return;
	while (*link != id)
		link = &c->blk[*link].hnext;
	*link = b->hnext;
	b->hnext = BLK_NONE;
	b->flags &= (uint8_t)~BF_INDEXED;
	c->n_indexed--;
	if (b->parent != BLK_NONE)
		unlink_child(c, id);
	/* Children become orphans: only a last-resort eviction, the window's
	 * release or a rewrite removes a block that has any. */
	while (b->child_head != BLK_NONE)
		unlink_child(c, b->child_head);
}

/* Fill a block's header for the index and the store. */
static void header_fill(struct kv_cache *c, uint32_t id, const struct kv_seq *s, uint32_t i)
{
	struct kv_blk_hdr *h = blk_hdr(c, id);

	memcpy(h->magic, KV_BLOCK_MAGIC, sizeof(h->magic));
	h->version = KV_BLOCK_VERSION;
	h->what = KV_BLOCK_PREFIX;
	h->hash_kind = (uint32_t)c->hash_kind;
	h->block_tokens = c->T;
	h->depth = i;
	h->dtype = (uint32_t)c->dtype;
	h->salt_fp = s->salt_fp;
	memset(h->hash, 0, sizeof(h->hash));
	memset(h->parent_hash, 0, sizeof(h->parent_hash));
	memcpy(h->hash, s->hashes + (size_t)i * c->hash_len, c->hash_len);
	if (i)
		memcpy(h->parent_hash, s->hashes + (size_t)(i - 1) * c->hash_len, c->hash_len);
	memcpy(h->tokens, s->tokens + (size_t)i * c->T, sizeof(int32_t) * c->T);
}

static uint32_t seq_done(const struct kv_cache *c, const struct kv_seq *s)
{
	uint32_t l, done = UINT32_MAX;

	for (l = 0; l < c->n_layers; l++)
		if (s->written[l] < done)
			done = s->written[l];
	return done;
}

void prefix_register(struct kv_cache *c, struct kv_seq *s)
{
	uint32_t complete = seq_done(c, s) / c->T;

	if (!c->prefix)
		return;
	if (complete > s->n_hashed)
		complete = s->n_hashed;
	if (complete > s->chain_stop)
		complete = s->chain_stop;
	while (s->chain < complete) {
		uint32_t i = s->chain, x = s->blocks[i], parent = BLK_NONE, y;
		const uint8_t *h = s->hashes + (size_t)i * c->hash_len;

		if (x == BLK_NONE)
			break;
		if (i) {
			parent = index_find(c, h - c->hash_len);
			if (parent == BLK_NONE)
				break;
		}
		y = index_find(c, h);
		if (y == x) {
			s->chain++;
			continue;
		}
		if (y != BLK_NONE) {
			/* The same tokens were computed and indexed elsewhere:
			 * share that block and free this one. */
			blk_take(c, y);
			s->blocks[i] = y;
			if (i + 1 == atomic_load_explicit(&s->n_blocks, RELAXED))
				atomic_store_explicit(&s->tail, y, RELAXED);
			blk_release(c, x, s->prio);
			c->st.dedups++;
			s->chain++;
			continue;
		}
		header_fill(c, x, s, i);
		memcpy(c->blk[x].hash, h, c->hash_len);
		c->blk[x].hkey = hash_key(h);
		c->blk[x].depth = i;
		c->blk[x].parent = parent;
		index_insert(c, x);
		cache_event(c, KV_EVENT_STORED, x, KV_TIER_DRAM);
		if (c->store && c->spill.write_through && !(c->blk[x].flags & BF_IN_STORE) &&
		    c->wt_n < c->lay.blocks_total) {
			/* Pinned until the spiller has put it. */
			if (c->blk[x].pins++ == 0)
				c->n_pinned++;
			c->wt_queue[(c->wt_head + c->wt_n++) % c->lay.blocks_total] = x;
			spill_kick(c);
		}
		s->chain++;
	}
}

/* ---- Cache-wide prefix calls ------------------------------------------ */

/* The chain hashes of a prompt's full blocks (n_full of them). */
static int prompt_hashes(struct kv_cache *c, const int32_t *tokens, uint32_t n,
			 const void *salt, size_t salt_len, uint8_t **out, uint32_t *n_full,
			 uint64_t *salt_fp)
{
	uint8_t dig[KV_CACHE_HASH_MAX];
	uint32_t i, nf = n / c->T;
	uint8_t *h;
	int rc;

	if (!tokens && n)
		return kv_fail(EINVAL, "kv cache: NULL tokens");
	if (salt || salt_len) {
		rc = prefix_salt(c, salt, salt_len, dig, salt_fp);
		if (rc)
			return rc;
	} else {
		memcpy(dig, c->default_salt_digest, sizeof(dig));
		*salt_fp = c->default_salt_fp;
	}
	h = malloc((size_t)(nf ? nf : 1) * c->hash_len);
	if (!h)
		return kv_fail(ENOMEM, "kv cache: out of memory for %u hashes", nf);
	for (i = 0; i < nf; i++)
		prefix_hash(c, i ? h + (size_t)(i - 1) * c->hash_len : NULL, dig,
			    tokens + (size_t)i * c->T, h + (size_t)i * c->hash_len);
	*out = h;
	*n_full = nf;
	return 0;
}

int kv_cache_lookup(struct kv_cache *c, const int32_t *tokens, uint32_t n, const void *salt,
		    size_t salt_len, struct kv_prefix_hit *out)
{
	uint32_t nf, i, d;
	uint64_t fp;
	uint8_t *h;
	int rc;

	if (!c || !out)
		return kv_fail(EINVAL, "kv_cache_lookup: NULL %s", c ? "out" : "cache");
	memset(out, 0, sizeof(*out));
	if (!c->prefix || n < c->T)
		return tokens || !n ? 0 : kv_fail(EINVAL, "kv_cache_lookup: NULL tokens");
	rc = prompt_hashes(c, tokens, n, salt, salt_len, &h, &nf, &fp);
	if (rc)
		return rc;
	cache_lock(c);
	for (d = 0; d < nf && index_find(c, h + (size_t)d * c->hash_len) != BLK_NONE; d++)
		;
	for (i = d; i < nf && ssd_find(c, h + (size_t)i * c->hash_len) != BLK_NONE; i++)
		;
	pthread_mutex_unlock(&c->lock);
	out->blocks_hashed = nf;
	out->dram_tokens = d * c->T;
	out->ssd_tokens = (i - d) * c->T;
	free(h);
	return 0;
}

/* Take references on the cached chain of a prompt's hashes, reading what
 * only the store holds back into DRAM; returns how many leading blocks
 * are held (ids[]). No lock on entry or return. */
uint32_t prefix_acquire(struct kv_cache *c, const uint8_t *h, uint32_t nf, const int32_t *tokens,
			uint64_t salt_fp, uint32_t *ids, uint32_t *from_ssd)
{
	uint32_t d = 0, got;

	cache_lock(c);
	while (d < nf) {
		uint32_t b = index_find(c, h + (size_t)d * c->hash_len);

		if (b == BLK_NONE)
			break;
		blk_take(c, b);
		ids[d++] = b;
	}
	cache_unlock(c);
	*from_ssd = 0;
	if (d < nf && c->store) {
		got = spill_load_chain(c, h, d, nf, tokens, salt_fp, ids + d);
		*from_ssd = got;
		d += got;
	}
	return d;
}

int kv_cache_pin(struct kv_cache *c, const int32_t *tokens, uint32_t n, const void *salt,
		 size_t salt_len, uint32_t *tokens_out)
{
	uint32_t nf, d, i, ssd, *ids;
	uint64_t fp;
	uint8_t *h;
	int rc;

	if (!c)
		return kv_fail(EINVAL, "kv_cache_pin: NULL cache");
	if (tokens_out)
		*tokens_out = 0;
	if (!c->prefix)
		return kv_fail(EINVAL, "kv_cache_pin: the prefix cache is off");
	rc = prompt_hashes(c, tokens, n, salt, salt_len, &h, &nf, &fp);
	if (rc)
		return rc;
	ids = malloc(sizeof(*ids) * (nf ? nf : 1));
	if (!ids) {
		free(h);
		return kv_fail(ENOMEM, "kv_cache_pin: out of memory");
	}
	d = prefix_acquire(c, h, nf, tokens, fp, ids, &ssd);
	cache_lock(c);
	for (i = 0; i < d; i++) {
		if (c->blk[ids[i]].pins++ == 0)
			c->n_pinned++;
		blk_release(c, ids[i], 0);
	}
	cache_unlock(c);
	if (tokens_out)
		*tokens_out = d * c->T;
	free(ids);
	free(h);
	return 0;
}

int kv_cache_unpin(struct kv_cache *c, const int32_t *tokens, uint32_t n, const void *salt,
		   size_t salt_len)
{
	uint32_t nf, d, i;
	uint64_t fp;
	uint8_t *h;
	int rc;

	if (!c)
		return kv_fail(EINVAL, "kv_cache_unpin: NULL cache");
	if (!c->prefix)
		return kv_fail(EINVAL, "kv_cache_unpin: the prefix cache is off");
	rc = prompt_hashes(c, tokens, n, salt, salt_len, &h, &nf, &fp);
	if (rc)
		return rc;
	cache_lock(c);
	/* Pinned blocks cannot have left DRAM, so the pinned chain is the
	 * leading run of pinned blocks. */
	for (d = 0; d < nf; d++) {
		uint32_t b = index_find(c, h + (size_t)d * c->hash_len);

		if (b == BLK_NONE || c->blk[b].pins == 0)
			break;
	}
	if (d == 0) {
		cache_unlock(c);
		free(h);
		return kv_fail(ENOENT, "kv_cache_unpin: no pinned block at the start of this "
			       "prefix (%u full blocks)", nf);
	}
	for (i = 0; i < d; i++) {
		uint32_t b = index_find(c, h + (size_t)i * c->hash_len);
		struct kv_blk *blk = &c->blk[b];

		if (--blk->pins == 0) {
			c->n_pinned--;
			if (atomic_load_explicit(&blk->ref, RELAXED) == 0 &&
			    !(blk->flags & BF_SPILLING)) {
				lru_push(c, b);
				spill_kick(c);
			}
		}
	}
	cache_unlock(c);
	free(h);
	return 0;
}
