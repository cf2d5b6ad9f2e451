// SPDX-License-Identifier: MIT
/*
 * Arenas: one region committed whole at creation (placement, huge pages,
 * mlock and prefault are the region's business, see region.c), carved into
 * tensors by best fit. Entry points: kv_arena_create/destroy,
 * kv_arena_alloc/free/reset, kv_arena_stats and kv_arena_validate, which
 * checks every invariant below; tests run it after each mutation.
 *
 * Layout. Every offset and size is a multiple of GRAIN (64 bytes), so a
 * gap left in front of an aligned allocation is itself a usable free
 * range and an allocation starts exactly at the pointer handed out. The
 * region is tiled by live allocations and free ranges:
 *  - free ranges sit in an array sorted by offset, never empty, never
 *    touching (coalesced on free), so there are at most n_live + 1 of them
 *    and the array, sized for that, never grows on free;
 *  - live allocations sit in an open-addressing table keyed by offset
 *    (linear probing, backward-shift deletion), so free(p) needs no size
 *    and a pointer that is not the start of a live allocation is refused
 *    without changing anything.
 * Best fit scans the free array: O(free ranges) per allocation, fine for
 * tensors (tens to thousands per arena), not meant for tiny objects.
 * One mutex serialises everything, registry updates included: the two
 * records "<label>" and "<label>/free" always sum to the region.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "allocator-impl.h"

#define GRAIN 64u                        /* default and minimum alignment */
#define ALIGN_MAX ((size_t)2 << 20)      /* largest alignment accepted */
#define LIVE_CAP0 64u                    /* initial table slots */
#define LIVE_MAX (UINT32_MAX / 2)        /* live allocations, n_allocs is 32-bit */
#define EMPTY SIZE_MAX                   /* key of an unused table slot */
#define FREE_SUFFIX "/free"
#define LABEL_ARENA_MAX (KV_LABEL_MAX - (int)(sizeof(FREE_SUFFIX) - 1))

/* Policy bits that describe placement: set from what the region obtained,
 * never taken on trust from the config, so the registry cannot claim huge
 * pages or a lock the arena did not get. */
#define PLACEMENT_POLICY (KV_POLICY_PINNED | KV_POLICY_HUGEPAGE | \
			  KV_POLICY_NUMA_BIND | KV_POLICY_NUMA_INTERLEAVE)

struct range {
	size_t off;  /* from the region base */
	size_t len;
};

struct kv_arena {
	pthread_mutex_t lock;
	struct kv_region region;
	char *base;
	size_t bytes;            /* the whole region, all committed */

	struct range *ranges;    /* free ranges: (cap_ranges), sorted by off */
	size_t n_ranges;
	size_t cap_ranges;       /* live_cap / 2 + 1 */
	struct range *live;      /* (live_cap) hash table; off == EMPTY: unused */
	size_t live_cap;         /* power of two, at most half full */
	unsigned live_bits;      /* log2(live_cap) */
	size_t n_live;
	struct range *scratch;   /* (live_cap / 2) for validate's sort */

	size_t used;
	size_t high_water;

	struct kv_registry *reg;
	kv_handle h_used;
	kv_handle h_free;
	struct kv_budget *budget;
	int budget_node;         /* node charged, or KV_ANY */

	char label[KV_LABEL_MAX + 1];
	char free_label[KV_LABEL_MAX + 1];
};

/* ---- Small helpers ---------------------------------------------------- */

/* Queries take the lock too; the object is never defined const (it comes
 * from calloc), so casting the qualifier away for the mutex is sound. */
static void lock_const(const struct kv_arena *a)
{
	pthread_mutex_lock((pthread_mutex_t *)&a->lock);
}

static void unlock_const(const struct kv_arena *a)
{
	pthread_mutex_unlock((pthread_mutex_t *)&a->lock);
}

/* Fibonacci hashing of an offset; offsets are multiples of GRAIN, so the
 * low bits carry nothing. */
static size_t live_home(const struct kv_arena *a, size_t off)
{
	uint64_t h = (uint64_t)(off / GRAIN) * UINT64_C(0x9e3779b97f4a7c15);

	return (size_t)(h >> (64 - a->live_bits));
}

/* Slot holding offset `off`, or SIZE_MAX. */
static size_t live_find(const struct kv_arena *a, size_t off)
{
	size_t mask = a->live_cap - 1;

	for (size_t i = live_home(a, off);; i = (i + 1) & mask) {
		if (a->live[i].off == off)
			return i;
		if (a->live[i].off == EMPTY)
			return SIZE_MAX;
	}
}

static void live_insert(struct range *table, const struct kv_arena *a, struct range r)
{
	size_t mask = a->live_cap - 1;
	size_t i = live_home(a, r.off);

	while (table[i].off != EMPTY)
		i = (i + 1) & mask;
	table[i] = r;
}

/* Remove slot i, shifting later members of its probe run back so that
 * lookups never need tombstones. */
static void live_delete(struct kv_arena *a, size_t i)
{
	size_t mask = a->live_cap - 1;

	for (size_t j = (i + 1) & mask; a->live[j].off != EMPTY; j = (j + 1) & mask) {
		size_t k = live_home(a, a->live[j].off);

		/* j's entry may move to i unless its home lies cyclically in (i, j]. */
		bool stays = i <= j ? (k > i && k <= j) : (k > i || k <= j);

		if (!stays) {
			a->live[i] = a->live[j];
			i = j;
		}
	}
	a->live[i].off = EMPTY;
}

/* Double the live table (and the free and scratch arrays that are sized
 * from it) so one more allocation fits. Nothing changes on failure. */
static int tables_grow(struct kv_arena *a, size_t cap)
{
	struct range *live = malloc(cap * sizeof(*live));
	struct range *fr = malloc((cap / 2 + 1) * sizeof(*fr));
	struct range *scratch = malloc(cap / 2 * sizeof(*scratch));
	struct range *old = a->live;
	size_t old_cap = a->live_cap;
	unsigned bits = 0;

	if (!live || !fr || !scratch) {
		free(live);
		free(fr);
		free(scratch);
		return kv_fail(ENOMEM, "arena '%s': no memory to track %zu allocations",
			       a->label, cap / 2);
	}
	while (((size_t)1 << bits) < cap)
		bits++;
	for (size_t i = 0; i < cap; i++)
		live[i].off = EMPTY;
	a->live_cap = cap;
	a->live_bits = bits;
	for (size_t i = 0; old && i < old_cap; i++)
		if (old[i].off != EMPTY)
			live_insert(live, a, old[i]);
	if (a->n_ranges)
		memcpy(fr, a->ranges, a->n_ranges * sizeof(*fr));
	free(old);
	free(a->ranges);
	free(a->scratch);
	a->live = live;
	a->ranges = fr;
	a->scratch = scratch;
	a->cap_ranges = cap / 2 + 1;
	return 0;
}

/* Index of the first free range starting after `off`. */
static size_t free_upper(const struct kv_arena *a, size_t off)
{
	size_t lo = 0, hi = a->n_ranges;

	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (a->ranges[mid].off <= off)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

static size_t largest_free(const struct kv_arena *a, size_t *at)
{
	size_t best = 0;

	*at = 0;
	for (size_t i = 0; i < a->n_ranges; i++) {
		if (a->ranges[i].len > best) {
			best = a->ranges[i].len;
			*at = a->ranges[i].off;
		}
	}
	return best;
}

/* Resize `first`, then `second`; if the second fails, undo the first. */
static int resize_pair(struct kv_arena *a, kv_handle first, size_t first_bytes,
		       size_t first_old, kv_handle second, size_t second_bytes)
{
	int rc = kv_registry_resize(a->reg, first, first_bytes);

	if (rc == 0) {
		rc = kv_registry_resize(a->reg, second, second_bytes);
		if (rc)
			kv_registry_resize(a->reg, first, first_old);
	}
	if (rc)
		return kv_fail(-rc, "arena '%s': registry record vanished (%s)",
			       a->label, kv_strerror(rc));
	return 0;
}

/* Set the registry records to `used` and the rest of the region, shrinking
 * one before growing the other so that a concurrent report never sees
 * more than the region. On failure the records are as they were. */
static int registry_update(struct kv_arena *a, size_t used)
{
	if (used > a->used)
		return resize_pair(a, a->h_free, a->bytes - used, a->bytes - a->used,
				   a->h_used, used);
	return resize_pair(a, a->h_used, used, a->used, a->h_free, a->bytes - used);
}

/* ---- Create / destroy ------------------------------------------------- */

void kv_arena_config_default(struct kv_arena_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->kind = KV_KIND_SCRATCH;
	cfg->label = "arena";
	/* First touch, like malloc: it needs no binding call, so it works
	 * (and never degrades) on any machine, and memory lands on the node
	 * of the thread that first writes it, which for scratch buffers is
	 * usually the thread that uses them. Binding is a choice the caller
	 * makes knowing the topology. */
	cfg->place.numa = KV_NUMA_FIRST_TOUCH;
	cfg->place.node = 0;
	cfg->place.huge = KV_HUGE_NONE;
}

static int check_config(const struct kv_arena_config *cfg, const char *label)
{
	size_t len = strnlen(label, KV_LABEL_MAX + 1);

	if (len > (size_t)LABEL_ARENA_MAX)
		return kv_fail(EINVAL, "arena '%.32s...': label longer than %d bytes "
			       "(the registry also needs '%s' after it)",
			       label, LABEL_ARENA_MAX, FREE_SUFFIX);
	if (cfg->bytes == 0)
		return kv_fail(EINVAL, "arena '%s': size 0", label);
	if ((unsigned)cfg->kind >= KV_KIND_COUNT)
		return kv_fail(EINVAL, "arena '%s': kind %d out of range (0..%d)",
			       label, (int)cfg->kind, KV_KIND_COUNT - 1);
	if (cfg->policy & ~KV_POLICY_ALL)
		return kv_fail(EINVAL, "arena '%s': policy has unknown bits 0x%x",
			       label, cfg->policy & ~KV_POLICY_ALL);
	return 0;
}

/* Registry policy: the caller's bits, with the placement bits replaced by
 * what the region actually obtained. */
static uint32_t obtained_policy(uint32_t policy, const struct kv_placement_result *res)
{
	policy &= ~(uint32_t)PLACEMENT_POLICY;
	if (res->huge != KV_HUGE_NONE)
		policy |= KV_POLICY_HUGEPAGE;
	if (res->locked)
		policy |= KV_POLICY_PINNED;
	if (res->numa == KV_NUMA_INTERLEAVE)
		policy |= KV_POLICY_NUMA_INTERLEAVE;
	else if ((res->numa == KV_NUMA_BIND || res->numa == KV_NUMA_LOCAL) && res->node >= 0)
		policy |= KV_POLICY_NUMA_BIND;
	return policy;
}

/* The node a budget is charged on: the one node the region is bound to
 * (resolved by kv_region_reserve(), LOCAL included), else the tier as a
 * whole. */
static int charge_node(const struct kv_region *r)
{
	return r->res.node >= 0 ? r->res.node : KV_ANY;
}

static void arena_free_mem(struct kv_arena *a)
{
	free(a->live);
	free(a->ranges);
	free(a->scratch);
	pthread_mutex_destroy(&a->lock);
	free(a);
}

/* Re-issue the calling thread's detail with the arena named in front,
 * for errors from layers that do not know which arena asked. */
static int fail_named(int rc, const char *label)
{
	char detail[400];

	snprintf(detail, sizeof(detail), "%s", kv_last_error());
	return kv_fail(-rc, "arena '%s': %s", label, detail);
}

int kv_arena_create(const struct kv_arena_config *cfg, struct kv_arena **out)
{
	struct kv_arena *a;
	const char *label;
	char what[sizeof(a->region.what)];
	char b1[32];
	uint32_t policy;
	int node, rc;

	if (!cfg || !out)
		return kv_fail(EINVAL, "kv_arena_create: NULL %s", cfg ? "out" : "config");
	label = cfg->label && *cfg->label ? cfg->label : "arena";
	rc = check_config(cfg, label);
	if (rc)
		return rc;

	a = calloc(1, sizeof(*a));
	if (!a)
		return kv_fail(ENOMEM, "arena '%s': no memory", label);
	pthread_mutex_init(&a->lock, NULL);
	snprintf(a->label, sizeof(a->label), "%s", label);
	snprintf(a->free_label, sizeof(a->free_label), "%s%s", label, FREE_SUFFIX);
	a->reg = cfg->registry ? cfg->registry : kv_registry_default();
	if (!a->reg) {
		rc = fail_named(-ENOMEM, label);
		goto fail_mem;
	}
	rc = tables_grow(a, LIVE_CAP0);
	if (rc)
		goto fail_mem;

	snprintf(what, sizeof(what), "arena '%s'", label);
	rc = kv_region_reserve(&a->region, cfg->bytes, &cfg->place, what);
	if (rc)
		goto fail_mem;
	a->base = a->region.base;
	a->bytes = a->region.reserved;

	/* Charge before committing: a budget exists to keep the memory from
	 * being touched at all when it would not fit. */
	a->budget = cfg->budget;
	a->budget_node = charge_node(&a->region);
	if (a->budget) {
		rc = kv_budget_charge(a->budget, KV_TIER_DRAM, a->budget_node, a->bytes);
		if (rc) {
			rc = fail_named(rc, label);
			goto fail_release;
		}
	}

	rc = kv_region_commit(&a->region, a->bytes);
	if (rc)
		goto fail_uncharge;

	policy = obtained_policy(cfg->policy, &a->region.res);
	node = kv_record_node(a->region.res.node);
	rc = kv_registry_record(a->reg, 0, KV_TIER_DRAM, node, cfg->kind, policy,
				a->label, &a->h_used);
	if (rc) {
		rc = fail_named(rc, label);
		goto fail_uncharge;
	}
	rc = kv_registry_record(a->reg, a->bytes, KV_TIER_DRAM, node, cfg->kind, policy,
				a->free_label, &a->h_free);
	if (rc) {
		rc = fail_named(rc, label);
		kv_registry_forget(a->reg, a->h_used);
		goto fail_uncharge;
	}

	a->ranges[0] = (struct range){ 0, a->bytes };
	a->n_ranges = 1;
	if (kv_log_enabled(KV_LOG_INFO)) {
		const struct kv_placement_result *res = &a->region.res;

		kv_log(KV_LOG_INFO, "arena '%s': %s, pages %s (%" PRIu64 " B), numa %s node %d%s%s%s%s",
		       label, kv_format_bytes(a->bytes, b1, sizeof(b1)), kv_huge_name(res->huge),
		       res->page_bytes, kv_numa_policy_name(res->numa), res->node,
		       res->locked ? ", locked" : "", res->prefaulted ? ", prefaulted" : "",
		       res->degraded[0] ? "; degraded: " : "", res->degraded);
	}
	*out = a;
	return 0;

fail_uncharge:
	if (a->budget)
		kv_budget_uncharge(a->budget, KV_TIER_DRAM, a->budget_node, a->bytes);
fail_release:
	kv_region_release(&a->region);
fail_mem:
	arena_free_mem(a);
	return rc;
}

int kv_arena_destroy(struct kv_arena *a, unsigned flags)
{
	if (!a)
		return 0;
	if (flags & ~KV_ARENA_FORCE)
		return kv_fail(EINVAL, "arena '%s': unknown destroy flags 0x%x",
			       a->label, flags & ~KV_ARENA_FORCE);
	if (a->n_live && !(flags & KV_ARENA_FORCE)) {
		char b1[32];

		return kv_fail(EBUSY, "arena '%s': %zu allocations (%s) still live",
			       a->label, a->n_live, kv_format_bytes(a->used, b1, sizeof(b1)));
	}
	if (a->n_live)
		kv_log(KV_LOG_WARN, "arena '%s': destroyed with %zu allocations live",
		       a->label, a->n_live);
	kv_registry_forget(a->reg, a->h_used);
	kv_registry_forget(a->reg, a->h_free);
	if (a->budget)
		kv_budget_uncharge(a->budget, KV_TIER_DRAM, a->budget_node, a->bytes);
	kv_region_release(&a->region);
	arena_free_mem(a);
	return 0;
}

/* ---- Sub-allocation --------------------------------------------------- */

/* The -ENOMEM detail: what was asked and the largest range there is. */
static int fail_full(const struct kv_arena *a, size_t bytes, size_t align)
{
	char b1[32], b2[32], b3[32];
	size_t at, big = largest_free(a, &at);

	return kv_fail(ENOMEM, "arena '%s': no free range fits %s aligned to %zu; "
		       "largest free range is %s at offset %zu%s (%s free in %zu ranges)",
		       a->label, kv_format_bytes(bytes, b1, sizeof(b1)), align,
		       kv_format_bytes(big, b2, sizeof(b2)), at,
		       big >= bytes ? ", too small once aligned" : "",
		       kv_format_bytes(a->bytes - a->used, b3, sizeof(b3)), a->n_ranges);
}

int kv_arena_alloc(struct kv_arena *a, size_t bytes, size_t align, void **out)
{
	uintptr_t base;
	size_t size, best = SIZE_MAX, at = 0;
	int rc;

	if (!a || !out)
		return kv_fail(EINVAL, "kv_arena_alloc: NULL %s", a ? "out" : "arena");
	if (bytes == 0)
		return kv_fail(EINVAL, "arena '%s': allocation of 0 bytes", a->label);
	if (align == 0)
		align = GRAIN;
	if (align & (align - 1) || align > ALIGN_MAX)
		return kv_fail(EINVAL, "arena '%s': alignment %zu is not a power of two "
			       "up to 2 MiB", a->label, align);
	if (align < GRAIN)
		align = GRAIN;
	size = kv_round_up(bytes, GRAIN);

	pthread_mutex_lock(&a->lock);
	if (size == 0 || size > a->bytes - a->used) {
		rc = fail_full(a, bytes, align);
		goto out;
	}
	if (a->n_live + 1 > a->live_cap / 2) {
		if (a->n_live >= LIVE_MAX) {
			rc = kv_fail(ENOMEM, "arena '%s': %zu allocations, at most %u",
				     a->label, a->n_live, (unsigned)LIVE_MAX);
			goto out;
		}
		rc = tables_grow(a, a->live_cap * 2);
		if (rc)
			goto out;
	}

	/* Best fit: the shortest range that holds the aligned block; ties go
	 * to the lowest offset, which keeps the top of the region free. */
	base = (uintptr_t)a->base;
	for (size_t i = 0; i < a->n_ranges; i++) {
		const struct range *r = &a->ranges[i];
		size_t off;

		if (r->len < size || (best != SIZE_MAX && r->len >= a->ranges[best].len))
			continue;
		off = (size_t)(kv_round_up(base + r->off, align) - base);
		if (off - r->off > r->len - size)
			continue;
		best = i;
		at = off;
		if (r->len == size)
			break;
	}
	if (best == SIZE_MAX) {
		rc = fail_full(a, bytes, align);
		goto out;
	}

	rc = registry_update(a, a->used + size);
	if (rc)
		goto out;

	/* From here nothing can fail: the arrays have room (see the top). */
	struct range r = a->ranges[best];
	size_t pad = at - r.off, tail = r.len - pad - size;

	if (pad && tail) {
		memmove(&a->ranges[best + 2], &a->ranges[best + 1],
			(a->n_ranges - best - 1) * sizeof(*a->ranges));
		a->ranges[best] = (struct range){ r.off, pad };
		a->ranges[best + 1] = (struct range){ at + size, tail };
		a->n_ranges++;
	} else if (pad) {
		a->ranges[best].len = pad;
	} else if (tail) {
		a->ranges[best] = (struct range){ at + size, tail };
	} else {
		memmove(&a->ranges[best], &a->ranges[best + 1],
			(a->n_ranges - best - 1) * sizeof(*a->ranges));
		a->n_ranges--;
	}
	live_insert(a->live, a, (struct range){ at, size });
	a->n_live++;
	a->used += size;
	if (a->used > a->high_water)
		a->high_water = a->used;
	*out = a->base + at;
out:
	pthread_mutex_unlock(&a->lock);
	return rc;
}

/* Why p is not a live allocation: for the detail of a refused free. */
static int fail_bad_free(const struct kv_arena *a, const void *p)
{
	uintptr_t base = (uintptr_t)a->base, at = (uintptr_t)p;
	size_t off, i;

	if (at < base || at - base >= a->bytes)
		return kv_fail(EINVAL, "arena '%s': free of %p, outside the region [%p, %p)",
			       a->label, p, (void *)a->base, (void *)(a->base + a->bytes));
	off = (size_t)(at - base);
	i = free_upper(a, off);
	if (i > 0 && off < a->ranges[i - 1].off + a->ranges[i - 1].len)
		return kv_fail(EINVAL, "arena '%s': free of %p (offset %zu), which is free: "
			       "double free or never allocated", a->label, p, off);
	for (i = 0; i < a->live_cap; i++) {
		const struct range *r = &a->live[i];

		if (r->off != EMPTY && off > r->off && off < r->off + r->len)
			return kv_fail(EINVAL, "arena '%s': free of %p (offset %zu), inside the "
				       "allocation at offset %zu (%zu bytes)",
				       a->label, p, off, r->off, r->len);
	}
	return kv_fail(EINVAL, "arena '%s': free of %p (offset %zu), not a live allocation",
		       a->label, p, off);
}

int kv_arena_free(struct kv_arena *a, void *p)
{
	uintptr_t base, at = (uintptr_t)p;
	size_t slot = SIZE_MAX, off = 0, i;
	struct range r;
	int rc;

	if (!a)
		return kv_fail(EINVAL, "kv_arena_free: NULL arena");
	base = (uintptr_t)a->base;

	pthread_mutex_lock(&a->lock);
	if (at >= base && at - base < a->bytes) {
		off = (size_t)(at - base);
		if (off % GRAIN == 0)
			slot = live_find(a, off);
	}
	if (slot == SIZE_MAX) {
		rc = fail_bad_free(a, p);
		goto out;
	}
	r = a->live[slot];
	rc = registry_update(a, a->used - r.len);
	if (rc)
		goto out;

	live_delete(a, slot);
	a->n_live--;
	a->used -= r.len;

	/* Coalesce with the neighbours; without either the array gains one
	 * range, which always fits (at most n_live + 1 ranges). */
	i = free_upper(a, r.off);
	bool join_prev = i > 0 && a->ranges[i - 1].off + a->ranges[i - 1].len == r.off;
	bool join_next = i < a->n_ranges && r.off + r.len == a->ranges[i].off;

	if (join_prev && join_next) {
		a->ranges[i - 1].len += r.len + a->ranges[i].len;
		memmove(&a->ranges[i], &a->ranges[i + 1], (a->n_ranges - i - 1) * sizeof(*a->ranges));
		a->n_ranges--;
	} else if (join_prev) {
		a->ranges[i - 1].len += r.len;
	} else if (join_next) {
		a->ranges[i].off = r.off;
		a->ranges[i].len += r.len;
	} else {
		memmove(&a->ranges[i + 1], &a->ranges[i], (a->n_ranges - i) * sizeof(*a->ranges));
		a->ranges[i] = r;
		a->n_ranges++;
	}
out:
	pthread_mutex_unlock(&a->lock);
	return rc;
}

void kv_arena_reset(struct kv_arena *a)
{
	if (!a)
		return;
	pthread_mutex_lock(&a->lock);
	/* Both records exist for the arena's lifetime: this cannot fail. */
	if (registry_update(a, 0))
		kv_log(KV_LOG_WARN, "%s", kv_last_error());
	for (size_t i = 0; i < a->live_cap; i++)
		a->live[i].off = EMPTY;
	a->n_live = 0;
	a->used = 0;
	a->ranges[0] = (struct range){ 0, a->bytes };
	a->n_ranges = 1;
	pthread_mutex_unlock(&a->lock);
}

/* ---- Queries ---------------------------------------------------------- */

void *kv_arena_base(const struct kv_arena *a)
{
	return a ? a->base : NULL;
}

size_t kv_arena_size(const struct kv_arena *a)
{
	return a ? a->bytes : 0;
}

int kv_arena_stats(const struct kv_arena *a, struct kv_arena_stats *out)
{
	size_t at;

	if (!a || !out)
		return kv_fail(EINVAL, "kv_arena_stats: NULL %s", a ? "out" : "arena");
	lock_const(a);
	memset(out, 0, sizeof(*out));
	out->bytes = a->bytes;
	out->used_bytes = a->used;
	out->free_bytes = a->bytes - a->used;
	out->largest_free = largest_free(a, &at);
	out->high_water = a->high_water;
	out->n_allocs = (uint32_t)a->n_live;
	out->n_free_ranges = (uint32_t)a->n_ranges;
	out->fragmentation = out->free_bytes ?
		1.0 - (double)out->largest_free / (double)out->free_bytes : 0.0;
	out->placement = a->region.res;
	unlock_const(a);
	return 0;
}

static int cmp_range(const void *x, const void *y)
{
	const struct range *p = x, *q = y;

	return (p->off > q->off) - (p->off < q->off);
}

/* The checks of kv_arena_validate(), lock held. */
static int validate_locked(const struct kv_arena *a)
{
	const char *name = a->label;
	size_t free_sum = 0, live_sum = 0, n = 0, f, l, end;
	struct kv_record rec;

	if (!a->base || a->bytes == 0 || a->bytes % GRAIN || a->region.committed < a->bytes)
		return kv_fail(EFAULT, "arena '%s': region %p of %zu bytes (%zu committed) "
			       "is not a committed multiple of %u", name, (void *)a->base,
			       a->bytes, a->region.committed, GRAIN);
	if (a->n_ranges > a->cap_ranges || a->n_ranges > a->n_live + 1)
		return kv_fail(EFAULT, "arena '%s': %zu free ranges for %zu allocations "
			       "(at most one more) and room for %zu",
			       name, a->n_ranges, a->n_live, a->cap_ranges);

	/* Free ranges: non-empty, granular, inside, sorted and coalesced. */
	for (size_t i = 0; i < a->n_ranges; i++) {
		const struct range *r = &a->ranges[i];

		if (r->len == 0 || r->off % GRAIN || r->len % GRAIN)
			return kv_fail(EFAULT, "arena '%s': free range %zu [%zu, +%zu) is empty "
				       "or not a multiple of %u", name, i, r->off, r->len, GRAIN);
		if (r->off > a->bytes || r->len > a->bytes - r->off)
			return kv_fail(EFAULT, "arena '%s': free range %zu [%zu, +%zu) ends past "
				       "the region (%zu bytes)", name, i, r->off, r->len, a->bytes);
		if (i > 0 && a->ranges[i - 1].off + a->ranges[i - 1].len >= r->off)
			return kv_fail(EFAULT, "arena '%s': free ranges %zu and %zu are %s", name,
				       i - 1, i, a->ranges[i - 1].off + a->ranges[i - 1].len == r->off ?
				       "adjacent (not coalesced)" : "unsorted or overlapping");
		free_sum += r->len;
	}

	/* Allocations: each findable from its home slot, inside, granular. */
	if (a->n_live > a->live_cap / 2)
		return kv_fail(EFAULT, "arena '%s': %zu allocations in a table of %zu slots",
			       name, a->n_live, a->live_cap);
	for (size_t i = 0; i < a->live_cap; i++) {
		const struct range *r = &a->live[i];

		if (r->off == EMPTY)
			continue;
		if (r->len == 0 || r->off % GRAIN || r->len % GRAIN || r->off > a->bytes ||
		    r->len > a->bytes - r->off)
			return kv_fail(EFAULT, "arena '%s': allocation [%zu, +%zu) is empty, not "
				       "a multiple of %u or outside the region", name, r->off,
				       r->len, GRAIN);
		if (live_find(a, r->off) != i)
			return kv_fail(EFAULT, "arena '%s': allocation at offset %zu is not "
				       "reachable from its hash slot", name, r->off);
		if (n == a->n_live)
			return kv_fail(EFAULT, "arena '%s': more allocations in the table than "
				       "the count %zu", name, a->n_live);
		a->scratch[n++] = *r;
		live_sum += r->len;
	}
	if (n != a->n_live)
		return kv_fail(EFAULT, "arena '%s': %zu allocations in the table, count says %zu",
			       name, n, a->n_live);

	/* Disjointness: walk allocations and free ranges merged by offset;
	 * each must start at or after the end of the previous one. With the
	 * byte sums equal to the region this means they tile it exactly. */
	qsort(a->scratch, n, sizeof(*a->scratch), cmp_range);
	f = l = end = 0;
	while (f < a->n_ranges || l < n) {
		bool take_free = l == n || (f < a->n_ranges && a->ranges[f].off < a->scratch[l].off);
		const struct range *r = take_free ? &a->ranges[f++] : &a->scratch[l++];

		if (r->off < end)
			return kv_fail(EFAULT, "arena '%s': %s [%zu, +%zu) overlaps the range "
				       "ending at %zu", name, take_free ? "free range" : "allocation",
				       r->off, r->len, end);
		end = r->off + r->len;
	}
	if (live_sum != a->used)
		return kv_fail(EFAULT, "arena '%s': allocations hold %zu bytes, used says %zu",
			       name, live_sum, a->used);
	if (free_sum + live_sum != a->bytes)
		return kv_fail(EFAULT, "arena '%s': %zu free + %zu used bytes, region is %zu",
			       name, free_sum, live_sum, a->bytes);
	if (a->high_water < a->used)
		return kv_fail(EFAULT, "arena '%s': high water %zu below used %zu",
			       name, a->high_water, a->used);

	/* The registry shows the same split. */
	if (kv_registry_get(a->reg, a->h_used, &rec) != 0 || rec.bytes != a->used)
		return kv_fail(EFAULT, "arena '%s': registry record '%s' does not hold the "
			       "%zu used bytes", name, a->label, a->used);
	if (kv_registry_get(a->reg, a->h_free, &rec) != 0 || rec.bytes != free_sum)
		return kv_fail(EFAULT, "arena '%s': registry record '%s' does not hold the "
			       "%zu free bytes", name, a->free_label, free_sum);
	return 0;
}

int kv_arena_validate(const struct kv_arena *a)
{
	int rc;

	if (!a)
		return kv_fail(EINVAL, "kv_arena_validate: NULL arena");
	lock_const(a);
	rc = validate_locked(a);
	unlock_const(a);
	return rc;
}
