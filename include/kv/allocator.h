/* SPDX-License-Identifier: MIT */
/*
 * libkv allocator: the machine's topology (hwloc), per-tier and per-node
 * byte budgets, arenas (large regions with a NUMA policy, huge pages,
 * mlock, prefault; sub-allocation of tensors inside) and block pools
 * (fixed-size blocks, O(1) alloc/free, dense uint32_t ids). Placement is
 * decided here and every byte is recorded in a taxonomy registry.
 *
 * Errors follow <kv/core.h>: 0 or -errno, detail in kv_last_error().
 * A request the machine cannot honour (no free huge pages, RLIMIT_MEMLOCK
 * too low, binding unsupported) degrades by default: one log line at warn,
 * and the stats say what was obtained. With `required` set it fails
 * instead and nothing is left behind.
 */
#ifndef KV_ALLOCATOR_H
#define KV_ALLOCATOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <kv/core.h>
#include <kv/taxonomy.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Topology --------------------------------------------------------- */

/* Page sizes a topology reports: the base page first, then huge pages. */
#define KV_PAGE_SIZES_MAX 6

struct kv_topo;

struct kv_topo_node {
	int os_index;                 /* NUMA node number as the OS numbers it */
	uint64_t memory_bytes;        /* local memory */
	uint32_t n_cpus;              /* PUs near this node */
	char cpus[128];               /* PU list, "0-3,8-11" */
	/* Per page size of kv_topo_page_sizes(), on this node; [0] (base
	 * pages) is 0. From sysfs, read when the topology was created. */
	uint64_t hugepages_total[KV_PAGE_SIZES_MAX];
	uint64_t hugepages_free[KV_PAGE_SIZES_MAX];
};

/* Snapshot the machine: NUMA nodes, cores, page sizes, huge page counts.
 * On a machine where hwloc reports no NUMA node the topology has one node
 * (os_index 0, all memory and PUs) and kv_topo_numa_reported() is false,
 * and it says so in an info log line (also when hwloc could not load a
 * topology at all). Errors: -EINVAL (NULL out), -ENOMEM.
 * Ownership: destroy with kv_topo_destroy(). Thread safety: a topology is
 * immutable, any thread may query it. */
KV_API int kv_topo_create(struct kv_topo **out);
KV_API void kv_topo_destroy(struct kv_topo *topo);

/* Number of NUMA nodes (>= 1). */
KV_API uint32_t kv_topo_node_count(const struct kv_topo *topo);

/* Node i (0 <= i < count, in OS index order). Errors: -ERANGE. */
KV_API int kv_topo_node(const struct kv_topo *topo, uint32_t i,
			struct kv_topo_node *out);

/* Index i of the node with OS index os_index. Errors: -ENODEV. */
KV_API int kv_topo_node_index(const struct kv_topo *topo, int os_index,
			      uint32_t *out);

/* Whether hwloc reported NUMA nodes (false: one synthetic node). */
KV_API bool kv_topo_numa_reported(const struct kv_topo *topo);

/* Physical cores and processing units (hardware threads). */
KV_API uint32_t kv_topo_cores(const struct kv_topo *topo);
KV_API uint32_t kv_topo_pus(const struct kv_topo *topo);

/* Page sizes in bytes, base page first; returns how many (<= max). */
KV_API uint32_t kv_topo_page_sizes(const struct kv_topo *topo,
				   uint64_t *sizes, uint32_t max);

/* OS index of the NUMA node of the CPU the calling thread last ran on.
 * Errors: -ENOTSUP (the OS cannot tell; *node is then 0). */
KV_API int kv_topo_current_node(const struct kv_topo *topo, int *node);

/* ---- Budgets ---------------------------------------------------------- */

/* Byte limits per tier and per (tier, node), shared by every arena and
 * pool given the same budget. A charge that would pass any limit fails
 * with -ENOMEM and changes nothing. */
struct kv_budget;

#define KV_BUDGET_UNLIMITED UINT64_MAX

struct kv_budget_usage {
	uint64_t limit;  /* KV_BUDGET_UNLIMITED when none */
	uint64_t used;
	uint64_t peak;   /* high-water of used */
};

/* A budget with no limits. Errors: -ENOMEM. */
KV_API int kv_budget_create(struct kv_budget **out);

/* Destroy; -EBUSY (and nothing done) while bytes are still charged. */
KV_API int kv_budget_destroy(struct kv_budget *b);

/* Limit bytes of `tier` (node KV_ANY: the whole tier) or of one node of
 * it. A limit below what is already used is accepted (later charges fail
 * until usage drops). Errors: -EINVAL. Thread safety: any thread. */
KV_API int kv_budget_set(struct kv_budget *b, enum kv_tier tier, int node,
			 uint64_t limit);

/* Charge bytes to (tier, node): both the tier and the node limits must
 * allow it. node KV_ANY is memory on no one node (interleaved, first
 * touch): only the tier limit applies. Uncharge with the same node.
 * Errors: -ENOMEM naming the limit, -EINVAL. */
KV_API int kv_budget_charge(struct kv_budget *b, enum kv_tier tier, int node,
			    uint64_t bytes);

/* Return bytes charged earlier. Errors: -EINVAL (more than charged). */
KV_API int kv_budget_uncharge(struct kv_budget *b, enum kv_tier tier, int node,
			      uint64_t bytes);

/* Usage of a tier (node KV_ANY) or of one node. Errors: -EINVAL. */
KV_API int kv_budget_usage(const struct kv_budget *b, enum kv_tier tier,
			   int node, struct kv_budget_usage *out);

/* ---- Memory placement, shared by arenas and pools --------------------- */

enum kv_numa_policy {
	KV_NUMA_LOCAL = 0,       /* bind to the node of the creating thread */
	KV_NUMA_BIND = 1,        /* bind to config.node */
	KV_NUMA_INTERLEAVE = 2,  /* interleave pages over config.nodes */
	KV_NUMA_FIRST_TOUCH = 3, /* the OS default: where first touched */
};

enum kv_huge {
	KV_HUGE_NONE = 0,  /* base pages */
	KV_HUGE_THP = 1,   /* transparent huge pages via madvise */
	KV_HUGE_2M = 2,    /* hugetlbfs 2 MiB pages (MAP_HUGETLB) */
	KV_HUGE_1G = 3,    /* hugetlbfs 1 GiB pages */
	KV_HUGE_AUTO = 4,  /* best available: 1G (if the size suits), 2M,
			    * THP, base pages */
};

/* How memory is placed; part of the arena and pool configs. */
struct kv_placement {
	enum kv_numa_policy numa;
	int node;          /* BIND: OS index of the node */
	uint64_t nodes;    /* INTERLEAVE: mask of OS indices; 0 = all */
	enum kv_huge huge;
	bool lock;         /* mlock the memory */
	bool prefault;     /* touch every page at creation */
	bool required;     /* fail instead of degrading */
};

/* What was actually obtained. */
struct kv_placement_result {
	enum kv_huge huge;          /* NONE, THP, 2M or 1G */
	uint64_t page_bytes;        /* 4096, 2 MiB, 1 GiB (THP: 2 MiB asked) */
	bool locked;
	bool prefaulted;
	enum kv_numa_policy numa;   /* as applied (FIRST_TOUCH if binding failed) */
	int node;                   /* bound node, or -1 (interleave, first touch) */
	uint64_t nodes;             /* nodes the memory may be on */
	/* Placement checked with hwloc_get_area_memlocation: 1 matches,
	 * 0 could not be checked (untouched pages, unsupported), -1 differs. */
	int verified;
	char degraded[192];         /* what was not honoured, or "" */
};

/* Names for logs and reports. NULL when out of range. */
KV_API const char *kv_numa_policy_name(enum kv_numa_policy p);
KV_API const char *kv_huge_name(enum kv_huge h);

/* ---- Arenas ----------------------------------------------------------- */

struct kv_arena;

struct kv_arena_config {
	size_t bytes;                /* region size; rounded up to the page */
	struct kv_placement place;
	enum kv_kind kind;           /* for the registry (default SCRATCH) */
	uint32_t policy;             /* KV_POLICY_* for the registry */
	const char *label;           /* registry label (copied); default "arena" */
	struct kv_registry *registry;/* NULL: the default registry */
	struct kv_budget *budget;    /* NULL: none; charged the whole region */
};

KV_API void kv_arena_config_default(struct kv_arena_config *cfg);

/* Map and place a region. It is recorded in the registry as two records
 * of cfg.kind in tier DRAM: "<label>" holding the bytes sub-allocated and
 * "<label>/free" the rest, so their sum is the region.
 * Errors: -EINVAL (bad config), -ENOMEM (mmap failed, budget exceeded),
 * -ENODEV (no such node), -EPERM/-ENOMEM (required lock failed),
 * -ENOTSUP (required huge pages or binding unavailable).
 * Ownership: destroy with kv_arena_destroy(). */
KV_API int kv_arena_create(const struct kv_arena_config *cfg,
			   struct kv_arena **out);

/* Unmap. With live sub-allocations: -EBUSY (nothing done) unless flags has
 * KV_ARENA_FORCE. NULL is a no-op. Thread safety: no concurrent use. */
#define KV_ARENA_FORCE 1u
KV_API int kv_arena_destroy(struct kv_arena *a, unsigned flags);

/* Sub-allocate `bytes` aligned to `align` (0 = 64; a power of two up to
 * 2 MiB). Best fit over the free ranges, which are coalesced on free.
 * Errors: -EINVAL (bytes 0, bad align), -ENOMEM (no free range fits; the
 * detail gives the largest). Thread safety: any thread (a mutex). */
KV_API int kv_arena_alloc(struct kv_arena *a, size_t bytes, size_t align,
			  void **out);

/* Free a sub-allocation. Errors: -EINVAL (not a live allocation of this
 * arena: the arena is unchanged). */
KV_API int kv_arena_free(struct kv_arena *a, void *p);

/* Free every sub-allocation at once. */
KV_API void kv_arena_reset(struct kv_arena *a);

/* The region. */
KV_API void *kv_arena_base(const struct kv_arena *a);
KV_API size_t kv_arena_size(const struct kv_arena *a);

struct kv_arena_stats {
	size_t bytes;            /* region */
	size_t used_bytes;       /* sub-allocated, including alignment padding */
	size_t free_bytes;
	size_t largest_free;     /* largest free range */
	size_t high_water;       /* peak of used_bytes */
	uint32_t n_allocs;
	uint32_t n_free_ranges;
	double fragmentation;    /* 1 - largest_free / free_bytes (0 if none free) */
	struct kv_placement_result placement;
};
KV_API int kv_arena_stats(const struct kv_arena *a, struct kv_arena_stats *out);

/* Check every invariant: free ranges sorted, disjoint, coalesced and
 * inside the region; allocations disjoint from them and from each other;
 * counts and byte sums match. Returns 0 or -EFAULT naming the first
 * broken invariant. */
KV_API int kv_arena_validate(const struct kv_arena *a);

/* ---- Block pools ------------------------------------------------------ */

struct kv_pool;

#define KV_POOL_NO_ID UINT32_MAX

struct kv_pool_config {
	size_t block_bytes;          /* size of one block (> 0) */
	size_t block_align;          /* 0 = 64; a power of two <= 2 MiB */
	size_t chunk_bytes;          /* grow step; 0 = max(2 MiB, 64 blocks),
				      * rounded to the page size obtained */
	size_t max_bytes;            /* reserved bytes never exceed this (> 0) */
	struct kv_placement place;
	uint32_t thread_cache;       /* blocks cached per thread; 0 = none */
	enum kv_kind kind;           /* default KV */
	uint32_t policy;
	const char *label;           /* default "pool" */
	struct kv_registry *registry;/* NULL: the default registry */
	struct kv_budget *budget;    /* NULL: none; charged per chunk */
};

KV_API void kv_pool_config_default(struct kv_pool_config *cfg);

/* Create a pool: reserves address space for max_bytes, commits nothing
 * until the first allocation. Recorded in the registry as "<label>" (bytes
 * of blocks handed out; updated in steps, see kv_pool_stats()) and
 * "<label>/free" (committed but not handed out): their sum is exactly the
 * committed bytes. Errors: -EINVAL, -ENOMEM, -ENODEV, -ENOTSUP. */
KV_API int kv_pool_create(const struct kv_pool_config *cfg,
			  struct kv_pool **out);

/* Destroy. With blocks still allocated: -EBUSY (nothing done) unless
 * KV_POOL_FORCE (blocks in thread caches count as free). Thread safety:
 * no concurrent call on the pool; threads that used it may still be
 * running or exiting (their caches are reclaimed here). */
#define KV_POOL_FORCE 1u
KV_API int kv_pool_destroy(struct kv_pool *p, unsigned flags);

/* One block, O(1). Grows by one chunk when empty. Errors: -ENOMEM (at
 * max_bytes or the budget, or the OS refused; the pool is unchanged).
 * Thread safety: any thread. */
KV_API int kv_pool_alloc(struct kv_pool *p, void **block, uint32_t *id);

/* Return a block (by pointer). Errors: -EINVAL (not a block of this pool,
 * or not allocated). */
KV_API int kv_pool_free(struct kv_pool *p, void *block);
KV_API int kv_pool_free_id(struct kv_pool *p, uint32_t id);

/* n blocks at once, all or nothing: ids[0..n) filled. Errors: -ENOMEM
 * (then no block was taken, and chunks grown on the way are returned). */
KV_API int kv_pool_alloc_n(struct kv_pool *p, uint32_t n, uint32_t *ids);
KV_API int kv_pool_free_n(struct kv_pool *p, uint32_t n, const uint32_t *ids);

/* Conversions, O(1), no locking: valid for any id below the committed
 * block count / any pointer inside a committed block. */
KV_API void *kv_pool_ptr(const struct kv_pool *p, uint32_t id);
KV_API uint32_t kv_pool_id(const struct kv_pool *p, const void *block);

/* Move the calling thread's cached blocks back to the pool (also done at
 * thread exit), and bring the registry's used bytes up to date. */
KV_API void kv_pool_flush(struct kv_pool *p);

/* A snapshot of a pool, taken under its lock. "Used" blocks are those not
 * on the central free list: handed out, or sitting in a thread cache.
 * The registry's "<label>" record follows the used bytes in steps: it is
 * rewritten on every grow and whenever the used count has moved by
 * max(64 blocks, 1/8 of a chunk) since the last write, so it lags by less
 * than that; kv_pool_flush() makes it exact. "<label>/free" always holds
 * the rest of the committed bytes: the two sum to committed_bytes. */
struct kv_pool_stats {
	size_t block_bytes;      /* as configured */
	size_t block_stride;     /* bytes between blocks (size rounded to align) */
	uint32_t blocks_committed;
	uint32_t blocks_used;    /* handed out, including thread caches */
	uint32_t blocks_cached;  /* in thread caches */
	uint32_t chunks;
	size_t committed_bytes;  /* what the registry and budget see */
	size_t max_bytes;
	size_t high_water;       /* peak of used bytes (blocks_used * stride) */
	struct kv_placement_result placement;
};
KV_API int kv_pool_stats(const struct kv_pool *p, struct kv_pool_stats *out);

/* Check every invariant: each block is free or used, never both; free
 * lists acyclic and inside the committed range; counts match. Call when
 * no other thread uses the pool. Returns 0 or -EFAULT. */
KV_API int kv_pool_validate(const struct kv_pool *p);

#ifdef __cplusplus
}
#endif

#endif /* KV_ALLOCATOR_H */
