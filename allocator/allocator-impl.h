/* SPDX-License-Identifier: MIT */
/*
 * Internals of the allocator layer, not installed:
 *
 *  - the OS seam (os.c): every OS call that can fail for reasons of the
 *    machine (mmap, munmap, mprotect, madvise, mlock, hwloc binding) goes
 *    through a kv_os_*() function, and tests can make the Nth such call
 *    fail with an errno of their choice;
 *  - regions (region.c): a range of address space reserved once and
 *    committed piece by piece with a placement (huge pages, NUMA binding,
 *    mlock, prefault), with the degrade-or-fail decisions in one place.
 *    Arenas commit their whole region at once; pools commit chunk by chunk
 *    inside one reservation, so a block's id and address convert by
 *    arithmetic.
 */
#ifndef KV_ALLOCATOR_IMPL_H
#define KV_ALLOCATOR_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <kv/allocator.h>

#include "taxonomy/kv-private.h"

/* ---- OS seam ---------------------------------------------------------- */

enum kv_os_op {
	KV_OS_MMAP = 1u << 0,     /* any mmap, including MAP_FIXED commits */
	KV_OS_HUGETLB = 1u << 1,  /* an mmap with MAP_HUGETLB (also counts as MMAP) */
	KV_OS_MPROTECT = 1u << 2,
	KV_OS_MADVISE = 1u << 3,
	KV_OS_MLOCK = 1u << 4,
	KV_OS_BIND = 1u << 5,     /* hwloc_set_area_membind */
	KV_OS_MUNMAP = 1u << 6,
	KV_OS_ALL = (1u << 7) - 1,
};

/* Make the nth (1-based) next call of any op in `ops` fail with -err
 * (err > 0), once; nth 0 cancels. Counting is process-wide. For tests. */
void kv_os_inject(unsigned ops, unsigned nth, int err);

/* Calls of any op in `ops` made since the process started (tests use it to
 * learn how many calls an operation makes, then fail each in turn). */
unsigned long kv_os_calls(unsigned ops);

/* Each returns 0 or -errno (mmap: the address, or MAP_FAILED with *err). */
void *kv_os_mmap(void *addr, size_t len, int prot, int flags, int *err);
int kv_os_munmap(void *addr, size_t len);
int kv_os_mprotect(void *addr, size_t len, int prot);
int kv_os_madvise(void *addr, size_t len, int advice);
int kv_os_mlock(void *addr, size_t len);
int kv_os_munlock(void *addr, size_t len);
/* Bind [addr, addr+len) to the nodes in `nodes` (OS indices): interleave
 * or bind. strict: fail rather than fall back (HWLOC_MEMBIND_STRICT). */
int kv_os_bind(void *addr, size_t len, uint64_t nodes, bool interleave, bool strict);
/* Nodes holding the (touched) pages of [addr, addr+len), as a mask;
 * -ENOTSUP when the system cannot tell. Not an injectable op. */
int kv_os_memlocation(const void *addr, size_t len, uint64_t *nodes);
/* Free huge pages of `page_bytes` (on `node`, or all nodes if node < 0),
 * from sysfs; 0 when unknown. */
uint64_t kv_os_free_hugepages(uint64_t page_bytes, int node);
/* Whether transparent huge pages can be asked for with madvise. */
bool kv_os_thp_available(void);
/* The base page size. */
size_t kv_os_page_size(void);

/* ---- Regions ---------------------------------------------------------- */

struct kv_region {
	char *base;            /* start of the usable range, page aligned */
	size_t reserved;       /* usable bytes of address space */
	size_t committed;      /* bytes committed from base */
	size_t page_bytes;     /* page size in use (commits are multiples) */
	char *map_base;        /* the raw reservation, for munmap */
	size_t map_len;
	struct kv_placement place;       /* as asked */
	struct kv_placement_result res;  /* as obtained so far */
	char what[64];                   /* for log lines: "arena 'x'" */
};

/* Reserve `bytes` of address space (rounded up to the page size chosen)
 * for placement `pl`: picks the page size (AUTO resolves here, checking
 * free huge pages), checks the nodes. Nothing is committed. `what` names
 * the owner in log lines and error details.
 * Errors: -EINVAL, -ENODEV (node not on this machine), -ENOMEM (mmap),
 * -ENOTSUP (required huge pages unavailable). */
int kv_region_reserve(struct kv_region *r, size_t bytes, const struct kv_placement *pl,
		      const char *what);

/* Commit [r->committed, r->committed + len) (len a multiple of
 * r->page_bytes): map it readable and writable with the huge page mode,
 * bind it, lock it and prefault it as placed. A part that cannot be
 * honoured degrades (one warn line, recorded in r->res) unless required.
 * On error the range is returned to the reservation and r->committed is
 * unchanged. Errors: -ENOMEM (past the reservation, or the OS refused),
 * and for required placements -ENOTSUP, -EPERM, -ENOMEM. */
int kv_region_commit(struct kv_region *r, size_t len);

/* Return the last len committed bytes (a multiple of r->page_bytes) to
 * the reservation: their memory is released. Errors: -EINVAL, or the OS
 * error (then nothing changed). */
int kv_region_uncommit(struct kv_region *r, size_t len);

/* Unmap the whole reservation. Safe on a zeroed or released region. */
void kv_region_release(struct kv_region *r);

/* The DRAM node a registry record names for memory placed on `node`:
 * itself, or for memory on no one node (first touch, interleave, binding
 * degraded) the machine's lowest node, which the registry always accepts
 * (node 0 may not exist). */
static inline int kv_record_node(int node)
{
	return node >= 0 && node < KV_NODE_MAX ? node : __builtin_ctzll(kv_numa_nodes());
}

/* Round bytes up to a multiple of align (a power of two); 0 on overflow. */
static inline size_t kv_round_up(size_t bytes, size_t align)
{
	size_t r = (bytes + align - 1) & ~(align - 1);

	return r < bytes ? 0 : r;
}

/* ---- Topology seam (topo.c) ------------------------------------------- */

/* kv_topo_create() from a given hwloc topology instead of the process's,
 * for tests: hw NULL builds the one-node topology of a machine without
 * hwloc; a synthetic or XML topology gives any nodes wanted (unless it is
 * flagged as this system, sysfs counts are not read and
 * kv_topo_current_node() is -ENOTSUP). Nothing of hw is kept.
 * Errors: -EINVAL (out NULL), -ENOMEM. */
int kv_topo_create_from(struct hwloc_topology *hw, struct kv_topo **out);

#endif /* KV_ALLOCATOR_IMPL_H */
