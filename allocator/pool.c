// SPDX-License-Identifier: MIT
/*
 * Block pools: fixed-size blocks with dense uint32_t ids, carved from one
 * region reserved once for max_bytes, so a block's address is
 * base + id * stride and both conversions are arithmetic. Entry points:
 * kv_pool_create/destroy, kv_pool_alloc/free (and the _id, _n forms),
 * kv_pool_flush, kv_pool_stats; kv_pool_validate() checks every
 * invariant listed below and is what the tests call after each change.
 *
 * Layout. The region is committed chunk by chunk (budget charged first);
 * blocks [0, n_committed) exist. Free blocks sit on a central LIFO stack
 * of ids under the pool lock, or in a per-thread cache (an array stack the
 * owning thread uses without any lock; refilled from and drained to the
 * central stack in batches of half its size). A state byte per block
 * says whether the user holds it; every user-facing alloc sets it and
 * every free checks and clears it, so a double free is caught even when
 * the first free went to a cache. A byte, not a bit: a thread changes
 * only the bytes of blocks it owns at that moment, so plain (relaxed
 * atomic) loads and stores suffice, where bits sharing a word with other
 * threads' blocks would need a locked RMW per call (measured: 5.2 ns per
 * alloc+free pair on the test machine, half the cost of the cached path).
 * What that gives up: two threads freeing the same block at the same
 * instant may both pass the check (a race in the caller); a double free
 * at any other time is refused. State bytes sit up to a cache line apart
 * (see kv_pool_create) so threads do not write each other's lines.
 *
 * Invariants (kv_pool_validate): every committed block is either held
 * (state 1) or on exactly one free stack (state 0), never both, never
 * neither; stacks hold only ids below n_committed, without duplicates;
 * committed - central free = held + cached; no uncommitted block is held;
 * the registry's two records sum to the committed bytes.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kv/allocator.h>

#include "allocator-impl.h"

#define DEFAULT_ALIGN 64u
#define MAX_ALIGN (2u << 20)
#define DEFAULT_CHUNK_MIN (2u << 20)
#define DEFAULT_CHUNK_BLOCKS 64u
#define MAX_THREAD_CACHE 65536u
/* Registry step: the "<label>" record follows the used blocks only when
 * they moved by max(64 blocks, 1/8 of a chunk) since it was last
 * written, so a trend of allocations pays one registry update per step. */
#define STEP_BLOCKS 64u

#define RELAXED memory_order_relaxed

/* One thread's cache of free blocks of one pool. Only the owning thread
 * touches ids[] and n while the pool is in use; n is atomic so that
 * kv_pool_stats() may read it from another thread. */
struct pool_cache {
	_Atomic uint32_t n;
	uint32_t cap;
	struct kv_pool *pool;
	uint64_t serial;                  /* never reused: the thread's key value */
	struct pool_cache *next, *prev;   /* the pool's list, under its lock */
	struct pool_cache *gnext, *gprev; /* all caches, under caches_lock */
	uint32_t ids[];                   /* (cap) free ids, top at n - 1 */
};

/* Every thread cache of every pool. A thread's key holds its cache's
 * serial, not its address: a thread-exit destructor may already be running
 * when kv_pool_destroy() frees the caches of a pool, so the destructor
 * looks its serial up here, under caches_lock, and finds nothing if the
 * pool went first. Lock order: caches_lock, then a pool's lock. */
static pthread_mutex_t caches_lock = PTHREAD_MUTEX_INITIALIZER;
static struct pool_cache *all_caches;
static _Atomic uint64_t cache_serial;

struct kv_pool {
	/* Read-only after create: the lock-free paths read these. */
	char *base;
	size_t stride;
	size_t stride_mask;          /* stride - 1 when a power of two */
	int stride_shift;            /* log2(stride) when a power of two, else -1 */
	uint32_t max_blocks;         /* blocks that fit in max_bytes */
	uint32_t cache_cap;          /* 0: no thread caches */
	uint32_t batch;              /* refill / drain size: cache_cap / 2 */
	uint64_t serial;             /* unique per pool, for the TLS lookaside */
	pthread_key_t key;           /* the calling thread's cache */
	_Atomic uint8_t *state;      /* (max_blocks << state_shift) 1: held, 0: free */
	int state_shift;             /* log2 of the bytes between state bytes */
	_Atomic uint32_t n_committed;/* blocks that exist; grows under the lock */

	/* Everything below. A mutex, not a spinlock: measured without
	 * thread caches (64 KiB blocks, alloc+free pairs) a spinlock costs
	 * 10 ns per pair against 17 on one thread, but was no better with
	 * two threads contending (135-255 against 112-192 ns), and a grow
	 * (mprotect, mlock, prefault of a chunk) holds the lock long
	 * enough that waiters should sleep. With thread caches the lock is
	 * taken once per batch. */
	pthread_mutex_t lock;
	uint32_t *stack;             /* (stack_cap) central free ids, top at n_free - 1 */
	uint32_t stack_cap;
	uint32_t n_free;
	uint32_t chunks;
	uint32_t peak_used;          /* high-water of n_committed - n_free */
	uint32_t pub_used;           /* used blocks the registry shows */
	uint32_t step;               /* see STEP_BLOCKS */
	struct pool_cache *caches;
	struct kv_region region;
	size_t chunk_bytes;          /* a multiple of the region's page size */
	size_t limit;                /* committed bytes never pass this */

	/* Config, copied. */
	size_t block_bytes;
	size_t max_bytes;
	enum kv_kind kind;
	uint32_t cfg_policy;
	struct kv_registry *reg;
	struct kv_budget *budget;
	int budget_node;             /* KV_ANY or the node charged */
	kv_handle h_used, h_free;
	uint32_t rec_policy;         /* policy and node the records carry */
	int rec_node;
	char label[KV_LABEL_MAX + 1];
	char label_free[KV_LABEL_MAX + 1];
};

static _Atomic uint64_t pool_serial;

/* The last pool this thread used and its cache there: most threads use
 * one pool at a time, and a compare against the pool's serial (never
 * reused) is cheaper than pthread_getspecific(). initial-exec: a fixed
 * offset from the thread pointer, where the default model for PIC code
 * calls __tls_get_addr and makes the hit path save registers around it;
 * the 16 bytes come from the static TLS surplus if libkv is dlopen'ed. */
static _Thread_local __attribute__((tls_model("initial-exec"))) struct {
	uint64_t serial;
	struct pool_cache *cache;
} tl_last;

/* ---- Small helpers ---------------------------------------------------- */

static const char *fmt_bytes(uint64_t b, char *buf, size_t len)
{
	return kv_format_bytes(b, buf, len);
}

static inline _Atomic uint8_t *state_of(const struct kv_pool *p, uint32_t id)
{
	return &p->state[(size_t)id << p->state_shift];
}

static inline uint8_t state_get(const struct kv_pool *p, uint32_t id)
{
	return atomic_load_explicit(state_of(p, id), RELAXED);
}

/* The block was just taken off a free stack by this thread. */
static inline void state_set(struct kv_pool *p, uint32_t id)
{
	atomic_store_explicit(state_of(p, id), 1, RELAXED);
}

/* Mark a held block free; false (and nothing changed) if it was free. */
static inline bool state_clear(struct kv_pool *p, uint32_t id)
{
	_Atomic uint8_t *st = state_of(p, id);

	if (KV_UNLIKELY(atomic_load_explicit(st, RELAXED) != 1))
		return false;
	atomic_store_explicit(st, 0, RELAXED);
	return true;
}

static inline uint32_t committed_blocks(const struct kv_pool *p)
{
	return atomic_load_explicit(&p->n_committed, memory_order_acquire);
}

/* The id of the block starting at `block`, or KV_POOL_NO_ID. */
static inline uint32_t block_id_exact(const struct kv_pool *p, const void *block)
{
	uintptr_t off = (uintptr_t)block - (uintptr_t)p->base;
	uintptr_t id;

	if (KV_LIKELY(p->stride_shift >= 0)) {
		if (off & p->stride_mask)
			return KV_POOL_NO_ID;
		id = off >> p->stride_shift;
	} else {
		id = off / p->stride;
		if (id * p->stride != off)
			return KV_POOL_NO_ID;
	}
	return id < committed_blocks(p) ? (uint32_t)id : KV_POOL_NO_ID;
}

/* Registry policy bits for what the region obtained, plus the config's. */
static uint32_t placement_policy(const struct kv_pool *p)
{
	const struct kv_placement_result *r = &p->region.res;
	/* Only what was obtained: the registry must not claim a lock or huge
	 * pages the pool did not get, whatever the config asked for. */
	uint32_t pol = p->cfg_policy & ~(uint32_t)(KV_POLICY_PINNED | KV_POLICY_HUGEPAGE |
						   KV_POLICY_NUMA_BIND |
						   KV_POLICY_NUMA_INTERLEAVE);

	if (r->huge != KV_HUGE_NONE)
		pol |= KV_POLICY_HUGEPAGE;
	if (r->locked)
		pol |= KV_POLICY_PINNED;
	if (r->numa == KV_NUMA_BIND || r->numa == KV_NUMA_LOCAL)
		pol |= KV_POLICY_NUMA_BIND;
	else if (r->numa == KV_NUMA_INTERLEAVE)
		pol |= KV_POLICY_NUMA_INTERLEAVE;
	return pol;
}

static int placement_node(const struct kv_pool *p)
{
	return kv_record_node(p->region.res.node);
}

/* ---- Registry --------------------------------------------------------- */

/* Make the records show `used` blocks held and the rest of the committed
 * bytes free; the one place both records change, so they always sum to
 * the committed bytes once it returns. The shrinking record goes first:
 * a concurrent reader sees at most the committed bytes. Lock held. */
static void publish(struct kv_pool *p, uint32_t used)
{
	uint64_t ub = (uint64_t)used * p->stride;
	uint64_t fb = p->region.committed - ub;
	int rc;

	if (used >= p->pub_used) {
		rc = kv_registry_resize(p->reg, p->h_free, fb);
		if (!rc)
			rc = kv_registry_resize(p->reg, p->h_used, ub);
	} else {
		rc = kv_registry_resize(p->reg, p->h_used, ub);
		if (!rc)
			rc = kv_registry_resize(p->reg, p->h_free, fb);
	}
	if (rc)
		kv_log(KV_LOG_WARN, "pool '%s': registry update failed: %s", p->label,
		       kv_last_error());
	p->pub_used = used;
}

/* After a central change: publish if the used count moved by a step, and
 * keep the high-water mark. Lock held. */
static inline void used_changed(struct kv_pool *p)
{
	uint32_t used = atomic_load_explicit(&p->n_committed, RELAXED) - p->n_free;
	uint32_t d = used > p->pub_used ? used - p->pub_used : p->pub_used - used;

	if (used > p->peak_used)
		p->peak_used = used;
	if (d >= p->step)
		publish(p, used);
}

static void publish_exact(struct kv_pool *p)
{
	publish(p, atomic_load_explicit(&p->n_committed, RELAXED) - p->n_free);
}

/* The records carry the policy and node obtained; a commit may change
 * them (the first one binds, locks, gets huge pages or degrades), and a
 * record's policy is fixed, so record anew and forget the old pair. On
 * failure the old pair stays (and says so in the log): the memory is
 * there either way. Lock held. */
static void rerecord(struct kv_pool *p)
{
	uint32_t pol = placement_policy(p);
	int node = placement_node(p);
	kv_handle hu, hf;
	int rc;

	if (pol == p->rec_policy && node == p->rec_node)
		return;
	rc = kv_registry_record(p->reg, (uint64_t)p->pub_used * p->stride, KV_TIER_DRAM, node,
				p->kind, pol, p->label, &hu);
	if (rc == 0) {
		rc = kv_registry_record(p->reg, p->region.committed -
					(uint64_t)p->pub_used * p->stride,
					KV_TIER_DRAM, node, p->kind, pol, p->label_free, &hf);
		if (rc)
			kv_registry_forget(p->reg, hu);
	}
	if (rc) {
		kv_log(KV_LOG_WARN, "pool '%s': registry records keep their old policy: %s",
		       p->label, kv_last_error());
		return;
	}
	kv_registry_forget(p->reg, p->h_used);
	kv_registry_forget(p->reg, p->h_free);
	p->h_used = hu;
	p->h_free = hf;
	p->rec_policy = pol;
	p->rec_node = node;
}

/* ---- Growing ---------------------------------------------------------- */

/* Commit the next chunk and push its blocks on the central stack, lowest
 * id on top. On failure the pool is exactly as it was. Lock held. */
static int pool_grow(struct kv_pool *p)
{
	size_t committed = p->region.committed;
	uint32_t old_n = atomic_load_explicit(&p->n_committed, RELAXED), new_n;
	char b1[32], b2[32], why[256];
	size_t len;
	int rc;

	if (committed >= p->limit)
		return kv_fail(ENOMEM, "pool '%s': at max_bytes %s (%" PRIu32 " blocks of %zu bytes)",
			       p->label, fmt_bytes(p->max_bytes, b1, sizeof(b1)), p->max_blocks,
			       p->stride);
	len = p->limit - committed < p->chunk_bytes ? p->limit - committed : p->chunk_bytes;
	new_n = (uint32_t)((committed + len) / p->stride);
	if (new_n > p->max_blocks)
		new_n = p->max_blocks;

	/* Room on the central stack first: this can fail harmlessly. */
	if (new_n > p->stack_cap) {
		uint64_t cap = (uint64_t)p->stack_cap * 2;
		uint32_t *s;

		if (cap < new_n)
			cap = new_n;
		if (cap > p->max_blocks)
			cap = p->max_blocks;
		s = realloc(p->stack, (size_t)cap * sizeof(*s));
		if (!s)
			return kv_fail(ENOMEM, "pool '%s': no memory for a free list of %" PRIu64
				       " blocks", p->label, cap);
		p->stack = s;
		p->stack_cap = (uint32_t)cap;
	}

	if (p->budget) {
		rc = kv_budget_charge(p->budget, KV_TIER_DRAM, p->budget_node, len);
		if (rc) {
			snprintf(why, sizeof(why), "%s", kv_last_error());
			return kv_fail(ENOMEM, "pool '%s': budget refused a chunk of %s: %s", p->label,
				       fmt_bytes(len, b1, sizeof(b1)), why);
		}
	}
	rc = kv_region_commit(&p->region, len);
	if (rc) {
		/* The region's detail starts with our name too: keep one. */
		const char *d = kv_last_error();
		size_t wl = strlen(p->region.what);

		if (strncmp(d, p->region.what, wl) == 0 && strncmp(d + wl, ": ", 2) == 0)
			d += wl + 2;
		snprintf(why, sizeof(why), "%s", d);
		if (p->budget)
			kv_budget_uncharge(p->budget, KV_TIER_DRAM, p->budget_node, len);
		/* -ENOMEM whatever the OS said (a required placement that
		 * cannot be had is -ENOTSUP from the region): the header
		 * promises callers one code to evict or spill on. */
		return kv_fail(ENOMEM, "pool '%s': committing %s at %s: %s", p->label,
			       fmt_bytes(len, b1, sizeof(b1)), fmt_bytes(committed, b2, sizeof(b2)),
			       why);
	}

	for (uint32_t id = new_n; id-- > old_n;)
		p->stack[p->n_free++] = id;
	p->chunks++;
	atomic_store_explicit(&p->n_committed, new_n, memory_order_release);
	rerecord(p);
	publish(p, new_n - p->n_free);
	return 0;
}

/* ---- Thread caches ---------------------------------------------------- */

/* Return the cache's blocks, all of them, to the central stack. Lock held. */
static void cache_return(struct kv_pool *p, struct pool_cache *c)
{
	uint32_t n = atomic_load_explicit(&c->n, RELAXED);

	memcpy(&p->stack[p->n_free], c->ids, (size_t)n * sizeof(uint32_t));
	p->n_free += n;
	atomic_store_explicit(&c->n, 0, RELAXED);
}

static void cache_unlink(struct kv_pool *p, struct pool_cache *c)
{
	if (c->prev)
		c->prev->next = c->next;
	else
		p->caches = c->next;
	if (c->next)
		c->next->prev = c->prev;
}

static void cache_unlink_global(struct pool_cache *c)
{
	if (c->gprev)
		c->gprev->gnext = c->gnext;
	else
		all_caches = c->gnext;
	if (c->gnext)
		c->gnext->gprev = c->gprev;
}

/* pthread key destructor: the thread is exiting; give its blocks back,
 * unless its pool was destroyed meanwhile (then the cache is gone). */
static void cache_exit(void *arg)
{
	uint64_t serial = (uint64_t)(uintptr_t)arg;
	struct pool_cache *c;

	pthread_mutex_lock(&caches_lock);
	for (c = all_caches; c && c->serial != serial; c = c->gnext)
		;
	if (c) {
		struct kv_pool *p = c->pool;

		pthread_mutex_lock(&p->lock);
		cache_return(p, c);
		cache_unlink(p, c);
		publish_exact(p);
		pthread_mutex_unlock(&p->lock);
		cache_unlink_global(c);
	}
	pthread_mutex_unlock(&caches_lock);
	if (c && tl_last.cache == c) {
		tl_last.serial = 0;
		tl_last.cache = NULL;
	}
	free(c);
}

/* The calling thread's cache, created on first use. NULL when the pool
 * has none, or when it could not be made (then the central stack serves:
 * slower, never wrong). */
static struct pool_cache *cache_slow(struct kv_pool *p, bool create)
{
	uint64_t serial = (uint64_t)(uintptr_t)pthread_getspecific(p->key);
	struct pool_cache *c = NULL;

	if (serial) {
		/* Only this thread adds or removes its own cache, and the pool
		 * is not being destroyed while we use it: the walk is safe. */
		pthread_mutex_lock(&p->lock);
		for (c = p->caches; c && c->serial != serial; c = c->next)
			;
		pthread_mutex_unlock(&p->lock);
	}
	if (!c && create) {
		c = malloc(sizeof(*c) + (size_t)p->cache_cap * sizeof(uint32_t));
		if (!c)
			return NULL;
		atomic_init(&c->n, 0);
		c->cap = p->cache_cap;
		c->pool = p;
		c->serial = atomic_fetch_add(&cache_serial, 1) + 1;
		c->prev = c->gprev = NULL;
		if (pthread_setspecific(p->key, (void *)(uintptr_t)c->serial) != 0) {
			free(c);
			return NULL;
		}
		pthread_mutex_lock(&caches_lock);
		pthread_mutex_lock(&p->lock);
		c->next = p->caches;
		if (c->next)
			c->next->prev = c;
		p->caches = c;
		c->gnext = all_caches;
		if (c->gnext)
			c->gnext->gprev = c;
		all_caches = c;
		pthread_mutex_unlock(&p->lock);
		pthread_mutex_unlock(&caches_lock);
	}
	if (c) {
		tl_last.serial = p->serial;
		tl_last.cache = c;
	}
	return c;
}

static inline struct pool_cache *cache_of(struct kv_pool *p)
{
	if (KV_LIKELY(tl_last.serial == p->serial))
		return tl_last.cache;
	if (!p->cache_cap)
		return NULL;
	return cache_slow(p, true);
}

/* Refill an empty cache with up to a batch from the central stack,
 * growing the pool if that is empty. The hottest central ids end on top. */
static int cache_refill(struct kv_pool *p, struct pool_cache *c)
{
	uint32_t take;
	int rc = 0;

	pthread_mutex_lock(&p->lock);
	if (p->n_free == 0)
		rc = pool_grow(p);
	if (rc == 0) {
		take = p->n_free < p->batch ? p->n_free : p->batch;
		p->n_free -= take;
		memcpy(c->ids, &p->stack[p->n_free], (size_t)take * sizeof(uint32_t));
		atomic_store_explicit(&c->n, take, RELAXED);
		used_changed(p);
	}
	pthread_mutex_unlock(&p->lock);
	return rc;
}

/* A full cache gives its oldest batch to the central stack. */
static void cache_drain(struct kv_pool *p, struct pool_cache *c)
{
	uint32_t n = atomic_load_explicit(&c->n, RELAXED), b = p->batch;

	pthread_mutex_lock(&p->lock);
	memcpy(&p->stack[p->n_free], c->ids, (size_t)b * sizeof(uint32_t));
	p->n_free += b;
	atomic_store_explicit(&c->n, n - b, RELAXED); /* stats never count them twice */
	used_changed(p);
	pthread_mutex_unlock(&p->lock);
	memmove(c->ids, c->ids + b, (size_t)(n - b) * sizeof(uint32_t));
}

/* ---- Create / destroy ------------------------------------------------- */

void kv_pool_config_default(struct kv_pool_config *cfg)
{
	if (!cfg)
		return;
	memset(cfg, 0, sizeof(*cfg));
	cfg->place.numa = KV_NUMA_FIRST_TOUCH;
	cfg->place.huge = KV_HUGE_NONE;
	cfg->kind = KV_KIND_KV;
	cfg->label = "pool";
}

static void pool_free_mem(struct kv_pool *p)
{
	free(p->stack);
	free((void *)p->state);
	pthread_mutex_destroy(&p->lock);
	free(p);
}

static int check_config(const struct kv_pool_config *cfg, const char *label, size_t *stride)
{
	size_t align = cfg->block_align ? cfg->block_align : DEFAULT_ALIGN;

	if (strnlen(label, KV_LABEL_MAX + 1) > KV_LABEL_MAX - 5)
		return kv_fail(EINVAL, "pool '%.32s...': label longer than %d bytes", label,
			       KV_LABEL_MAX - 5);
	if (cfg->block_bytes == 0)
		return kv_fail(EINVAL, "pool '%s': block_bytes is 0", label);
	if (align & (align - 1) || align > MAX_ALIGN)
		return kv_fail(EINVAL, "pool '%s': block_align %zu is not a power of two up to 2 MiB",
			       label, align);
	if (cfg->max_bytes == 0)
		return kv_fail(EINVAL, "pool '%s': max_bytes is 0", label);
	if (cfg->thread_cache > MAX_THREAD_CACHE)
		return kv_fail(EINVAL, "pool '%s': thread_cache %" PRIu32 " over %u blocks", label,
			       cfg->thread_cache, MAX_THREAD_CACHE);
	if ((unsigned)cfg->kind >= KV_KIND_COUNT)
		return kv_fail(EINVAL, "pool '%s': kind %d out of range", label, (int)cfg->kind);
	if (cfg->policy & ~KV_POLICY_ALL)
		return kv_fail(EINVAL, "pool '%s': policy has unknown bits 0x%x", label,
			       cfg->policy & ~KV_POLICY_ALL);
	*stride = kv_round_up(cfg->block_bytes, align);
	if (*stride == 0 || *stride > cfg->max_bytes)
		return kv_fail(EINVAL, "pool '%s': a block of %zu bytes (aligned to %zu) does not fit"
			       " in max_bytes %zu", label, cfg->block_bytes, align, cfg->max_bytes);
	return 0;
}

int kv_pool_create(const struct kv_pool_config *cfg, struct kv_pool **out)
{
	struct kv_pool *p;
	const char *label;
	char what[KV_LABEL_MAX + 16], b1[32], b2[32];
	size_t stride = 0, usable, page, chunk, align, extra, pad;
	uint64_t blocks;
	int rc;

	if (!cfg || !out)
		return kv_fail(EINVAL, "kv_pool_create: NULL %s", cfg ? "out" : "config");
	label = cfg->label && *cfg->label ? cfg->label : "pool";
	rc = check_config(cfg, label, &stride);
	if (rc)
		return rc;

	p = calloc(1, sizeof(*p));
	if (!p)
		return kv_fail(ENOMEM, "pool '%s': no memory", label);
	pthread_mutex_init(&p->lock, NULL);
	snprintf(p->label, sizeof(p->label), "%s", label);
	snprintf(p->label_free, sizeof(p->label_free), "%s/free", label);
	p->block_bytes = cfg->block_bytes;
	p->max_bytes = cfg->max_bytes;
	p->kind = cfg->kind;
	p->cfg_policy = cfg->policy;
	p->budget = cfg->budget;
	p->stride = stride;
	p->stride_shift = -1;
	if (!(stride & (stride - 1))) {
		p->stride_shift = __builtin_ctzll(stride);
		p->stride_mask = stride - 1;
	}
	p->reg = cfg->registry ? cfg->registry : kv_registry_default();
	if (!p->reg) {
		pool_free_mem(p);
		return -ENOMEM;
	}

	/* The region's base is aligned to its page; a block alignment above
	 * the base page gets extra address space (only that: nothing there
	 * is committed) and the region starts at the first aligned page. */
	align = cfg->block_align ? cfg->block_align : DEFAULT_ALIGN;
	extra = align > kv_os_page_size() ? align : 0;
	if (cfg->max_bytes + extra < cfg->max_bytes) {
		pool_free_mem(p);
		return kv_fail(EINVAL, "pool '%s': max_bytes %zu too large", label, cfg->max_bytes);
	}
	snprintf(what, sizeof(what), "pool '%s'", label);
	rc = kv_region_reserve(&p->region, cfg->max_bytes + extra, &cfg->place, what);
	if (rc) {
		pool_free_mem(p);
		return rc;
	}
	page = p->region.page_bytes;
	pad = kv_round_up((size_t)(uintptr_t)p->region.base, align) -
	      (size_t)(uintptr_t)p->region.base;
	p->region.base += pad;
	p->region.reserved -= pad;

	/* Commits are whole pages and never pass max_bytes: the blocks are
	 * those that fit below max_bytes rounded down to the page, and the
	 * last commit stops at the page holding the last block's end. */
	usable = cfg->max_bytes & ~(page - 1);
	if (usable > p->region.reserved)
		usable = p->region.reserved;
	blocks = usable / stride;
	if (blocks == 0 || blocks >= KV_POOL_NO_ID) {
		rc = kv_fail(EINVAL, "pool '%s': max_bytes %s holds %" PRIu64 " blocks of %zu bytes"
			     " with %s pages (need 1 to %u)", label,
			     fmt_bytes(cfg->max_bytes, b1, sizeof(b1)), blocks, stride,
			     fmt_bytes(page, b2, sizeof(b2)), KV_POOL_NO_ID - 1);
		goto fail_region;
	}
	p->max_blocks = (uint32_t)blocks;
	p->limit = kv_round_up((size_t)blocks * stride, page);
	p->base = p->region.base;

	chunk = cfg->chunk_bytes;
	if (chunk == 0) {
		chunk = DEFAULT_CHUNK_BLOCKS * stride;
		if (chunk / DEFAULT_CHUNK_BLOCKS != stride || chunk < DEFAULT_CHUNK_MIN)
			chunk = DEFAULT_CHUNK_MIN;
	}
	if (chunk < stride)
		chunk = stride;
	chunk = kv_round_up(chunk, page);
	if (chunk == 0 || chunk > p->limit)
		chunk = p->limit;
	p->chunk_bytes = chunk;
	p->step = (uint32_t)(chunk / stride / 8);
	if (p->step < STEP_BLOCKS)
		p->step = STEP_BLOCKS;

	/* State bytes of blocks that different threads use side by side
	 * would share a cache line and bounce between cores on every alloc
	 * and free (measured: two threads together slower than one). They
	 * are spread up to a line apart, for at most 1/64 of the block size
	 * (stride 4 KiB and more: a line each). calloc'ed, so the state of
	 * blocks never committed stays untouched zero pages. */
	p->state_shift = p->stride_shift >= 0 ? p->stride_shift - 6
					      : 63 - __builtin_clzll(stride) - 6;
	if (p->state_shift < 0)
		p->state_shift = 0;
	if (p->state_shift > 6)
		p->state_shift = 6;
	p->state = calloc(blocks << p->state_shift, sizeof(*p->state));
	if (!p->state) {
		rc = kv_fail(ENOMEM, "pool '%s': no memory for the state of %" PRIu64 " blocks",
			     label, blocks);
		goto fail_region;
	}

	/* The budget is charged at the node the reservation settled on (a
	 * bound pool) or the tier as a whole; every charge and the final
	 * uncharge use the same node. */
	p->budget_node = p->region.res.node >= 0 ? p->region.res.node : KV_ANY;
	p->rec_policy = placement_policy(p);
	p->rec_node = placement_node(p);
	rc = kv_registry_record(p->reg, 0, KV_TIER_DRAM, p->rec_node, p->kind, p->rec_policy,
				p->label, &p->h_used);
	if (rc)
		goto fail_region;
	rc = kv_registry_record(p->reg, 0, KV_TIER_DRAM, p->rec_node, p->kind, p->rec_policy,
				p->label_free, &p->h_free);
	if (rc)
		goto fail_used;

	if (cfg->thread_cache) {
		rc = pthread_key_create(&p->key, cache_exit);
		if (rc) {
			rc = kv_fail(ENOMEM, "pool '%s': no pthread key left for a thread cache "
				     "(pthread_key_create: %d)", label, rc);
			goto fail_free;
		}
		/* A cache of one would go to the lock on every other call. */
		p->cache_cap = cfg->thread_cache < 2 ? 2 : cfg->thread_cache;
		p->batch = p->cache_cap / 2;
	}
	p->serial = atomic_fetch_add_explicit(&pool_serial, 1, RELAXED) + 1;
	*out = p;
	return 0;

fail_free:
	kv_registry_forget(p->reg, p->h_free);
fail_used:
	kv_registry_forget(p->reg, p->h_used);
fail_region:
	kv_region_release(&p->region);
	pool_free_mem(p);
	return rc;
}

static uint32_t cached_blocks(const struct kv_pool *p)
{
	uint32_t n = 0;

	for (const struct pool_cache *c = p->caches; c; c = c->next)
		n += atomic_load_explicit(&c->n, RELAXED);
	return n;
}

int kv_pool_destroy(struct kv_pool *p, unsigned flags)
{
	uint32_t held;
	char b[32];

	if (!p)
		return 0;
	if (flags & ~KV_POOL_FORCE)
		return kv_fail(EINVAL, "pool '%s': unknown destroy flags 0x%x", p->label, flags);
	pthread_mutex_lock(&p->lock);
	held = atomic_load_explicit(&p->n_committed, RELAXED) - p->n_free - cached_blocks(p);
	pthread_mutex_unlock(&p->lock);
	if (held) {
		fmt_bytes((uint64_t)held * p->stride, b, sizeof(b));
		if (!(flags & KV_POOL_FORCE))
			return kv_fail(EBUSY, "pool '%s': %" PRIu32 " blocks (%s) still allocated",
				       p->label, held, b);
		kv_log(KV_LOG_WARN, "pool '%s': destroyed with %" PRIu32 " blocks (%s) allocated",
		       p->label, held, b);
	}

	/* Caches of threads still running are freed here. The key goes
	 * first so no new thread-exit destructor starts; one already running
	 * waits on caches_lock and then finds its cache gone. */
	pthread_mutex_lock(&caches_lock);
	if (p->cache_cap)
		pthread_key_delete(p->key);
	while (p->caches) {
		struct pool_cache *c = p->caches;

		p->caches = c->next;
		cache_unlink_global(c);
		free(c);
	}
	pthread_mutex_unlock(&caches_lock);
	if (tl_last.serial == p->serial) {
		tl_last.serial = 0;
		tl_last.cache = NULL;
	}
	kv_registry_forget(p->reg, p->h_used);
	kv_registry_forget(p->reg, p->h_free);
	if (p->budget && p->region.committed)
		kv_budget_uncharge(p->budget, KV_TIER_DRAM, p->budget_node, p->region.committed);
	kv_region_release(&p->region);
	pool_free_mem(p);
	return 0;
}

/* ---- Alloc / free ----------------------------------------------------- */

/* One id from the central stack, growing if needed. */
static int central_alloc(struct kv_pool *p, uint32_t *id)
{
	int rc = 0;

	pthread_mutex_lock(&p->lock);
	if (p->n_free == 0)
		rc = pool_grow(p);
	if (rc == 0) {
		*id = p->stack[--p->n_free];
		used_changed(p);
	}
	pthread_mutex_unlock(&p->lock);
	return rc;
}

static inline void hand_out(const struct kv_pool *p, uint32_t id, void **block, uint32_t *id_out)
{
	if (block)
		*block = p->base + (size_t)id * p->stride;
	if (id_out)
		*id_out = id;
}

/* Everything but a hit in the calling thread's cache: kept out of line so
 * the hit path needs no stack frame. */
static __attribute__((noinline)) int alloc_slow(struct kv_pool *p, void **block,
						uint32_t *id_out)
{
	struct pool_cache *c;
	uint32_t id, n;
	int rc;

	if (!p || (!block && !id_out))
		return kv_fail(EINVAL, "kv_pool_alloc: NULL %s", p ? "block and id" : "pool");
	c = cache_of(p);
	if (c) {
		n = atomic_load_explicit(&c->n, RELAXED);
		if (n == 0) {
			rc = cache_refill(p, c);
			if (rc)
				return rc;
			n = atomic_load_explicit(&c->n, RELAXED);
		}
		id = c->ids[--n];
		atomic_store_explicit(&c->n, n, RELAXED);
	} else {
		rc = central_alloc(p, &id);
		if (rc)
			return rc;
	}
	state_set(p, id);
	hand_out(p, id, block, id_out);
	return 0;
}

int kv_pool_alloc(struct kv_pool *p, void **block, uint32_t *id_out)
{
	struct pool_cache *c;
	uint32_t id, n;

	if (KV_LIKELY(p && tl_last.serial == p->serial && (block || id_out))) {
		c = tl_last.cache;
		n = atomic_load_explicit(&c->n, RELAXED);
		if (KV_LIKELY(n != 0)) {
			id = c->ids[n - 1];
			atomic_store_explicit(&c->n, n - 1, RELAXED);
			state_set(p, id);
			hand_out(p, id, block, id_out);
			return 0;
		}
	}
	return alloc_slow(p, block, id_out);
}

/* A checked free that did not fit the calling thread's cache: a full
 * cache drains half first; without a cache the central stack takes it. */
static __attribute__((noinline)) int free_slow(struct kv_pool *p, uint32_t id)
{
	struct pool_cache *c = cache_of(p);
	uint32_t n;

	if (c) {
		n = atomic_load_explicit(&c->n, RELAXED);
		if (n == c->cap) {
			cache_drain(p, c);
			n -= p->batch;
		}
		c->ids[n] = id;
		atomic_store_explicit(&c->n, n + 1, RELAXED);
		return 0;
	}
	pthread_mutex_lock(&p->lock);
	p->stack[p->n_free++] = id;
	used_changed(p);
	pthread_mutex_unlock(&p->lock);
	return 0;
}

static __attribute__((noinline)) int not_allocated(const struct kv_pool *p, uint32_t id)
{
	return kv_fail(EINVAL, "pool '%s': block %" PRIu32 " is not allocated (double free?)",
		       p->label, id);
}

static inline int free_checked(struct kv_pool *p, uint32_t id)
{
	struct pool_cache *c;
	uint32_t n;

	if (KV_UNLIKELY(!state_clear(p, id)))
		return not_allocated(p, id);
	if (KV_LIKELY(tl_last.serial == p->serial)) {
		c = tl_last.cache;
		n = atomic_load_explicit(&c->n, RELAXED);
		if (KV_LIKELY(n < c->cap)) {
			c->ids[n] = id;
			atomic_store_explicit(&c->n, n + 1, RELAXED);
			return 0;
		}
	}
	return free_slow(p, id);
}

static __attribute__((noinline)) int not_a_block(const struct kv_pool *p, const void *block)
{
	return kv_fail(EINVAL, "pool '%s': %p is not the start of a block of this pool",
		       p->label, block);
}

int kv_pool_free(struct kv_pool *p, void *block)
{
	uint32_t id;

	if (KV_UNLIKELY(!p))
		return kv_fail(EINVAL, "kv_pool_free: NULL pool");
	id = block_id_exact(p, block);
	if (KV_UNLIKELY(id == KV_POOL_NO_ID))
		return not_a_block(p, block);
	return free_checked(p, id);
}

int kv_pool_free_id(struct kv_pool *p, uint32_t id)
{
	if (KV_UNLIKELY(!p))
		return kv_fail(EINVAL, "kv_pool_free_id: NULL pool");
	if (KV_UNLIKELY(id >= committed_blocks(p)))
		return kv_fail(EINVAL, "pool '%s': id %" PRIu32 " out of range (%" PRIu32
			       " blocks committed)", p->label, id, committed_blocks(p));
	return free_checked(p, id);
}

/* Undo the grows of a bulk allocation that failed half way, so a failed
 * call leaves the committed bytes and the budget as they were. The blocks
 * those grows pushed are on top of the central stack (the lock was held
 * throughout). If the memory cannot be returned, the blocks stay: more
 * capacity, never a leak. Lock held; the detail of the failure is kept. */
static void shrink_back(struct kv_pool *p, size_t start_bytes, uint32_t start_n,
			uint32_t start_chunks)
{
	const uint32_t grown = atomic_load_explicit(&p->n_committed, RELAXED) - start_n;
	const size_t bytes = p->region.committed - start_bytes;
	char detail[512];

	snprintf(detail, sizeof(detail), "%s", kv_last_error());
	if (kv_region_uncommit(&p->region, bytes) != 0) {
		kv_log(KV_LOG_WARN, "pool '%s': keeping %zu bytes grown for a failed bulk "
		       "allocation: %s", p->label, bytes, kv_last_error());
	} else {
		p->n_free -= grown;
		p->chunks = start_chunks;
		atomic_store_explicit(&p->n_committed, start_n, memory_order_release);
		if (p->budget)
			kv_budget_uncharge(p->budget, KV_TIER_DRAM, p->budget_node, bytes);
		publish_exact(p);
	}
	kv_fail(ENOMEM, "%s", detail);
}

int kv_pool_alloc_n(struct kv_pool *p, uint32_t n, uint32_t *ids)
{
	uint64_t avail;
	int rc = 0;

	if (!p || (n && !ids))
		return kv_fail(EINVAL, "kv_pool_alloc_n: NULL %s", p ? "ids" : "pool");
	if (n == 0)
		return 0;
	pthread_mutex_lock(&p->lock);
	/* Refuse up front what max_bytes cannot hold, so no chunk is
	 * committed for a request that must fail anyway. */
	avail = (uint64_t)p->n_free + p->max_blocks - atomic_load_explicit(&p->n_committed, RELAXED);
	if (n > avail) {
		pthread_mutex_unlock(&p->lock);
		return kv_fail(ENOMEM, "pool '%s': %" PRIu32 " blocks asked, %" PRIu64
			       " left within max_bytes (%" PRIu32 " blocks)", p->label, n, avail,
			       p->max_blocks);
	}
	const size_t start_bytes = p->region.committed;
	const uint32_t start_n = atomic_load_explicit(&p->n_committed, RELAXED);
	const uint32_t start_chunks = p->chunks;

	while (p->n_free < n && rc == 0)
		rc = pool_grow(p);
	if (rc && p->region.committed > start_bytes)
		shrink_back(p, start_bytes, start_n, start_chunks);
	if (rc == 0) {
		p->n_free -= n;
		for (uint32_t i = 0; i < n; i++)
			ids[i] = p->stack[p->n_free + n - 1 - i];
		used_changed(p);
	}
	pthread_mutex_unlock(&p->lock);
	if (rc)
		return rc;
	for (uint32_t i = 0; i < n; i++)
		state_set(p, ids[i]);
	return 0;
}

int kv_pool_free_n(struct kv_pool *p, uint32_t n, const uint32_t *ids)
{
	uint32_t committed;

	if (!p || (n && !ids))
		return kv_fail(EINVAL, "kv_pool_free_n: NULL %s", p ? "ids" : "pool");
	committed = committed_blocks(p);
	for (uint32_t i = 0; i < n; i++)
		if (ids[i] >= committed)
			return kv_fail(EINVAL, "pool '%s': ids[%" PRIu32 "] = %" PRIu32 " out of range"
				       " (%" PRIu32 " blocks committed)", p->label, i, ids[i], committed);
	/* Clearing the bits is the check: a block not held, or listed twice,
	 * finds its bit clear, and the bits cleared so far are set again. */
	for (uint32_t i = 0; i < n; i++) {
		if (!state_clear(p, ids[i])) {
			for (uint32_t j = 0; j < i; j++)
				state_set(p, ids[j]);
			return kv_fail(EINVAL, "pool '%s': ids[%" PRIu32 "] = %" PRIu32
				       " is not allocated (or listed twice)", p->label, i, ids[i]);
		}
	}
	pthread_mutex_lock(&p->lock);
	for (uint32_t i = n; i-- > 0;)
		p->stack[p->n_free++] = ids[i];
	used_changed(p);
	pthread_mutex_unlock(&p->lock);
	return 0;
}

void *kv_pool_ptr(const struct kv_pool *p, uint32_t id)
{
	if (!p || id >= committed_blocks(p))
		return NULL;
	return p->base + (size_t)id * p->stride;
}

uint32_t kv_pool_id(const struct kv_pool *p, const void *block)
{
	uintptr_t off;
	uintptr_t id;

	if (!p)
		return KV_POOL_NO_ID;
	off = (uintptr_t)block - (uintptr_t)p->base;
	id = p->stride_shift >= 0 ? off >> p->stride_shift : off / p->stride;
	return id < committed_blocks(p) ? (uint32_t)id : KV_POOL_NO_ID;
}

void kv_pool_flush(struct kv_pool *p)
{
	struct pool_cache *c = NULL;

	if (!p)
		return;
	if (p->cache_cap)
		c = cache_slow(p, false);
	pthread_mutex_lock(&p->lock);
	if (c)
		cache_return(p, c);
	publish_exact(p);
	pthread_mutex_unlock(&p->lock);
}

/* ---- Stats and validation --------------------------------------------- */

int kv_pool_stats(const struct kv_pool *p, struct kv_pool_stats *out)
{
	struct kv_pool *mp = (struct kv_pool *)p; /* the lock, not the state */
	uint32_t committed;

	if (!p || !out)
		return kv_fail(EINVAL, "kv_pool_stats: NULL %s", p ? "out" : "pool");
	memset(out, 0, sizeof(*out));
	pthread_mutex_lock(&mp->lock);
	committed = atomic_load_explicit(&p->n_committed, RELAXED);
	out->block_bytes = p->block_bytes;
	out->block_stride = p->stride;
	out->blocks_committed = committed;
	out->blocks_used = committed - p->n_free;
	out->blocks_cached = cached_blocks(p);
	out->chunks = p->chunks;
	out->committed_bytes = p->region.committed;
	out->max_bytes = p->max_bytes;
	out->high_water = (size_t)p->peak_used * p->stride;
	out->placement = p->region.res;
	pthread_mutex_unlock(&mp->lock);
	return 0;
}

/* Mark id as seen on a free stack; fails on an id out of range, held, or
 * seen before (a duplicate, or a cycle had the stacks been lists). */
static int check_free_id(const struct kv_pool *p, uint64_t *seen, uint32_t committed,
			 uint32_t id, const char *where)
{
	if (id >= committed)
		return kv_fail(EFAULT, "pool '%s': %s holds id %" PRIu32 " past the %" PRIu32
			       " committed blocks", p->label, where, id, committed);
	if (state_get(p, id) != 0)
		return kv_fail(EFAULT, "pool '%s': %s holds block %" PRIu32 ", which is allocated",
			       p->label, where, id);
	if (seen[id >> 6] & (UINT64_C(1) << (id & 63)))
		return kv_fail(EFAULT, "pool '%s': block %" PRIu32 " is free twice (again in %s)",
			       p->label, id, where);
	seen[id >> 6] |= UINT64_C(1) << (id & 63);
	return 0;
}

static int validate_locked(const struct kv_pool *p)
{
	uint32_t committed = atomic_load_explicit(&p->n_committed, RELAXED);
	uint32_t words = (p->max_blocks + 63) / 64, held = 0, cached = 0;
	struct kv_record ru, rf;
	uint64_t *seen;
	int rc = 0;

	if (p->region.committed > p->limit || p->limit > p->max_bytes)
		return kv_fail(EFAULT, "pool '%s': %zu bytes committed, limit %zu, max_bytes %zu",
			       p->label, p->region.committed, p->limit, p->max_bytes);
	if (committed != (p->region.committed / p->stride < p->max_blocks
			  ? (uint32_t)(p->region.committed / p->stride) : p->max_blocks))
		return kv_fail(EFAULT, "pool '%s': %" PRIu32 " blocks for %zu committed bytes",
			       p->label, committed, p->region.committed);
	if (p->n_free > committed || p->n_free > p->stack_cap)
		return kv_fail(EFAULT, "pool '%s': %" PRIu32 " free of %" PRIu32 " blocks",
			       p->label, p->n_free, committed);
	seen = calloc(words, sizeof(uint64_t));
	if (!seen)
		return kv_fail(ENOMEM, "kv_pool_validate: no memory");
	for (uint32_t i = 0; i < p->n_free && !rc; i++)
		rc = check_free_id(p, seen, committed, p->stack[i], "the central free list");
	for (const struct pool_cache *c = p->caches; c && !rc; c = c->next) {
		uint32_t n = atomic_load_explicit(&c->n, RELAXED);

		if (c->pool != p || n > c->cap) {
			rc = kv_fail(EFAULT, "pool '%s': a thread cache holds %" PRIu32 " of %" PRIu32,
				     p->label, n, c->cap);
			break;
		}
		for (uint32_t i = 0; i < n && !rc; i++)
			rc = check_free_id(p, seen, committed, c->ids[i], "a thread cache");
		cached += n;
	}
	for (uint32_t id = 0; id < p->max_blocks && !rc; id++) {
		uint8_t st = state_get(p, id);
		bool free_listed = seen[id >> 6] & (UINT64_C(1) << (id & 63));

		if (st > 1)
			rc = kv_fail(EFAULT, "pool '%s': block %" PRIu32 " has state %u", p->label, id,
				     st);
		else if (id >= committed && st)
			rc = kv_fail(EFAULT, "pool '%s': uncommitted block %" PRIu32 " is allocated",
				     p->label, id);
		else if (id < committed && !st && !free_listed)
			rc = kv_fail(EFAULT, "pool '%s': block %" PRIu32 " is neither allocated nor free",
				     p->label, id);
		held += st;
	}
	free(seen);
	if (rc)
		return rc;
	if (committed - p->n_free != held + cached)
		return kv_fail(EFAULT, "pool '%s': %" PRIu32 " used by the counts, %" PRIu32
			       " held + %" PRIu32 " cached", p->label, committed - p->n_free, held,
			       cached);
	if (p->peak_used < committed - p->n_free)
		return kv_fail(EFAULT, "pool '%s': high-water below the used blocks", p->label);
	if (kv_registry_get(p->reg, p->h_used, &ru) || kv_registry_get(p->reg, p->h_free, &rf))
		return kv_fail(EFAULT, "pool '%s': registry records missing", p->label);
	if (ru.bytes != (uint64_t)p->pub_used * p->stride ||
	    ru.bytes + rf.bytes != p->region.committed)
		return kv_fail(EFAULT, "pool '%s': registry shows %" PRIu64 " + %" PRIu64
			       " bytes, committed %zu, published %" PRIu32 " blocks", p->label,
			       ru.bytes, rf.bytes, p->region.committed, p->pub_used);
	return 0;
}

int kv_pool_validate(const struct kv_pool *p)
{
	struct kv_pool *mp = (struct kv_pool *)p;
	int rc;

	if (!p)
		return kv_fail(EINVAL, "kv_pool_validate: NULL pool");
	pthread_mutex_lock(&mp->lock);
	rc = validate_locked(p);
	pthread_mutex_unlock(&mp->lock);
	return rc;
}
