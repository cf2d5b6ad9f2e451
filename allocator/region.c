// SPDX-License-Identifier: MIT
/*
 * Regions: address space reserved once (PROT_NONE) and committed piece by
 * piece with a placement. Entry points kv_region_reserve(),
 * kv_region_commit(), kv_region_release(). Every degrade-or-fail decision
 * of the allocator is made here, in one order:
 *   huge pages: hugetlb 1G -> hugetlb 2M -> THP (madvise) -> base pages;
 *   NUMA: bind / interleave as asked -> first touch;
 *   mlock: locked -> not locked.
 * A step that cannot be honoured logs one warn line and is recorded in
 * res.degraded, unless the placement is `required`, in which case the
 * commit fails and leaves the reservation as it was.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

#include <hwloc.h>

#include "allocator-impl.h"

#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26
#endif
#define HUGE_2M ((size_t)2 << 20)
#define HUGE_1G ((size_t)1 << 30)

const char *kv_numa_policy_name(enum kv_numa_policy p)
{
	static const char *const names[] = { "local", "bind", "interleave", "first_touch" };

	return (unsigned)p < KV_ARRAY_SIZE(names) ? names[p] : NULL;
}

const char *kv_huge_name(enum kv_huge h)
{
	static const char *const names[] = { "none", "thp", "2m", "1g", "auto" };

	return (unsigned)h < KV_ARRAY_SIZE(names) ? names[h] : NULL;
}

/* Note what was not honoured: one warn line, and appended to res.degraded. */
static void degrade(struct kv_region *r, const char *fmt, ...) KV_PRINTF(2, 3);
static void degrade(struct kv_region *r, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	kv_vnote_degraded(r->res.degraded, sizeof(r->res.degraded), r->what, fmt, ap);
	va_end(ap);
}

static size_t huge_bytes(enum kv_huge h)
{
	return h == KV_HUGE_1G ? HUGE_1G : h == KV_HUGE_2M ? HUGE_2M : 0;
}

static int node_of_calling_thread(void)
{
	hwloc_topology_t topo = kv_hw_topology();
	hwloc_bitmap_t cpu;
	int node = 0;

	if (!topo)
		return 0;
	cpu = hwloc_bitmap_alloc();
	if (cpu && hwloc_get_last_cpu_location(topo, cpu, HWLOC_CPUBIND_THREAD) == 0) {
		hwloc_obj_t n = NULL;

		while ((n = hwloc_get_next_obj_by_type(topo, HWLOC_OBJ_NUMANODE, n)) != NULL)
			if (hwloc_bitmap_intersects(n->cpuset, cpu)) {
				node = (int)n->os_index;
				break;
			}
	}
	hwloc_bitmap_free(cpu);
	return node;
}

/* Resolve the NUMA part of the placement into res (nodes to bind to). */
static int resolve_numa(struct kv_region *r)
{
	const struct kv_placement *pl = &r->place;
	uint64_t machine = kv_numa_nodes();

	r->res.numa = pl->numa;
	r->res.node = -1;
	r->res.nodes = machine;
	switch (pl->numa) {
	case KV_NUMA_LOCAL:
		r->res.node = node_of_calling_thread();
		if (r->res.node >= 64 || !(machine & (UINT64_C(1) << r->res.node)))
			r->res.node = __builtin_ctzll(machine); /* beyond libkv's node masks */
		r->res.nodes = UINT64_C(1) << r->res.node;
		break;
	case KV_NUMA_BIND:
		if (pl->node < 0 || pl->node >= 64 || !(machine & (UINT64_C(1) << pl->node)))
			return kv_fail(ENODEV, "%s: bind to node %d: no such NUMA node (machine has %d)",
				       r->what, pl->node, __builtin_popcountll(machine));
		r->res.node = pl->node;
		r->res.nodes = UINT64_C(1) << pl->node;
		break;
	case KV_NUMA_INTERLEAVE:
		if (pl->nodes & ~machine)
			return kv_fail(ENODEV, "%s: interleave over nodes 0x%llx: nodes 0x%llx do not exist",
				       r->what, (unsigned long long)pl->nodes,
				       (unsigned long long)(pl->nodes & ~machine));
		r->res.nodes = pl->nodes ? pl->nodes : machine;
		if (__builtin_popcountll(r->res.nodes) == 1)
			r->res.node = __builtin_ctzll(r->res.nodes);
		break;
	case KV_NUMA_FIRST_TOUCH:
		break;
	default:
		return kv_fail(EINVAL, "%s: NUMA policy %d out of range", r->what, (int)pl->numa);
	}
	return 0;
}

/* Resolve the huge page mode before reserving: AUTO picks the best that
 * looks available now; explicit hugetlb modes are tried at commit. */
static int resolve_huge(struct kv_region *r, size_t bytes)
{
	const struct kv_placement *pl = &r->place;
	size_t base = kv_os_page_size();
	int node = r->res.node;
	enum kv_huge h = pl->huge;

	if ((unsigned)h > KV_HUGE_AUTO)
		return kv_fail(EINVAL, "%s: huge page mode %d out of range", r->what, (int)h);
	if (h == KV_HUGE_AUTO) {
		if (bytes >= HUGE_1G &&
		    kv_os_free_hugepages(HUGE_1G, node) >= kv_round_up(bytes, HUGE_1G) / HUGE_1G)
			h = KV_HUGE_1G;
		else if (kv_os_free_hugepages(HUGE_2M, node) >= kv_round_up(bytes, HUGE_2M) / HUGE_2M)
			h = KV_HUGE_2M;
		else if (kv_os_thp_available())
			h = KV_HUGE_THP;
		else
			h = KV_HUGE_NONE;
		if (h == KV_HUGE_NONE && pl->required)
			return kv_fail(ENOTSUP, "%s: huge pages required but none available "
				       "(no free hugetlb pages, THP disabled)", r->what);
		kv_log(KV_LOG_INFO, "%s: huge pages auto: %s", r->what,
		       h == KV_HUGE_1G ? "hugetlb 1 GiB" : h == KV_HUGE_2M ? "hugetlb 2 MiB" :
		       h == KV_HUGE_THP ? "no free hugetlb pages, transparent huge pages" :
		       "no free hugetlb pages and THP disabled: base pages");
	}
	if (h == KV_HUGE_THP && !kv_os_thp_available()) {
		if (pl->required)
			return kv_fail(ENOTSUP, "%s: transparent huge pages required but disabled", r->what);
		degrade(r, "transparent huge pages disabled: base pages");
		h = KV_HUGE_NONE;
	}
	r->res.huge = h;
	/* THP gets 2 MiB alignment and granularity so the kernel can back the
	 * range with whole huge pages. */
	r->page_bytes = h == KV_HUGE_NONE ? base : h == KV_HUGE_THP ? HUGE_2M : huge_bytes(h);
	r->res.page_bytes = h == KV_HUGE_NONE ? base : r->page_bytes;
	return 0;
}

int kv_region_reserve(struct kv_region *r, size_t bytes, const struct kv_placement *pl,
		      const char *what)
{
	size_t len, map_len;
	char *p;
	int rc, err;

	memset(r, 0, sizeof(*r));
	snprintf(r->what, sizeof(r->what), "%s", what ? what : "region");
	if (!pl)
		return kv_fail(EINVAL, "%s: NULL placement", r->what);
	if (bytes == 0)
		return kv_fail(EINVAL, "%s: size 0", r->what);
	r->place = *pl;
	rc = resolve_numa(r);
	if (rc == 0)
		rc = resolve_huge(r, bytes);
	if (rc)
		return rc;
	len = kv_round_up(bytes, r->page_bytes);
	map_len = len + r->page_bytes;
	if (len == 0 || map_len < len)
		return kv_fail(EINVAL, "%s: size %zu too large", r->what, bytes);
	/* Over-reserve by one page so the base can be aligned to it. */
	p = kv_os_mmap(NULL, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, &err);
	if (p == MAP_FAILED)
		return kv_fail(ENOMEM, "%s: reserving %zu bytes of address space: %s", r->what,
			       map_len, kv_strerror(err));
	r->map_base = p;
	r->map_len = map_len;
	r->base = (char *)kv_round_up((size_t)(uintptr_t)p, r->page_bytes);
	r->reserved = len;
	return 0;
}

/* Return [addr, addr+len) to the reservation: no access, no memory. */
static int unreserve(struct kv_region *r, char *addr, size_t len, bool was_hugetlb)
{
	int err = 0;

	if (r->res.locked)
		kv_os_munlock(addr, len);
	if (was_hugetlb) {
		void *p = kv_os_mmap(addr, len, PROT_NONE,
				     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, &err);
		return p == MAP_FAILED ? err : 0;
	}
	kv_os_madvise(addr, len, MADV_DONTNEED);
	return kv_os_mprotect(addr, len, PROT_NONE);
}

/* Map [addr, addr+len) readable and writable in the current huge page
 * mode, stepping down the chain when hugetlb pages cannot be had. */
static int map_rw(struct kv_region *r, char *addr, size_t len, bool *hugetlb)
{
	int err;

	*hugetlb = false;
	while (r->res.huge == KV_HUGE_1G || r->res.huge == KV_HUGE_2M) {
		int shift = r->res.huge == KV_HUGE_1G ? 30 : 21;
		void *p = kv_os_mmap(addr, len, PROT_READ | PROT_WRITE,
				     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_HUGETLB |
				     (shift << MAP_HUGE_SHIFT), &err);

		if (p != MAP_FAILED) {
			*hugetlb = true;
			return 0;
		}
		/* A failed MAP_FIXED may have unmapped the old range: put the
		 * reservation back before anything else can map there. */
		int back_err;
		void *back = kv_os_mmap(addr, len, PROT_NONE,
					MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
					&back_err);
		if (back == MAP_FAILED)
			return kv_fail(ENOMEM, "%s: restoring the reservation after a failed "
				       "hugetlb mapping: %s", r->what, kv_strerror(back_err));
		if (r->place.required)
			return kv_fail(ENOTSUP, "%s: hugetlb %s pages required: mapping %zu bytes "
				       "failed (%s; %llu free)", r->what,
				       r->res.huge == KV_HUGE_1G ? "1 GiB" : "2 MiB", len,
				       kv_strerror(err),
				       (unsigned long long)kv_os_free_hugepages(r->page_bytes,
										r->res.node));
		enum kv_huge next = r->res.huge == KV_HUGE_1G ? KV_HUGE_2M
				  : kv_os_thp_available() ? KV_HUGE_THP : KV_HUGE_NONE;
		degrade(r, "hugetlb %s pages unavailable (%s): trying %s",
			r->res.huge == KV_HUGE_1G ? "1 GiB" : "2 MiB", kv_strerror(err),
			next == KV_HUGE_2M ? "2 MiB pages" : next == KV_HUGE_THP ?
			"transparent huge pages" : "base pages");
		r->res.huge = next;
		r->res.page_bytes = next == KV_HUGE_2M ? HUGE_2M : next == KV_HUGE_THP ? HUGE_2M
				  : kv_os_page_size();
		/* 1G -> 2M keeps alignment: 2 MiB divides everything below. */
	}
	err = kv_os_mprotect(addr, len, PROT_READ | PROT_WRITE);
	if (err)
		return kv_fail(ENOMEM, "%s: committing %zu bytes: %s", r->what, len, kv_strerror(err));
	if (r->res.huge == KV_HUGE_THP) {
		err = kv_os_madvise(addr, len, MADV_HUGEPAGE);
		if (err) {
			if (r->place.required) {
				kv_os_mprotect(addr, len, PROT_NONE);
				return kv_fail(ENOTSUP, "%s: transparent huge pages required: "
					       "madvise failed (%s)", r->what, kv_strerror(err));
			}
			degrade(r, "madvise(MADV_HUGEPAGE) failed (%s): base pages", kv_strerror(err));
			r->res.huge = KV_HUGE_NONE;
			r->res.page_bytes = kv_os_page_size();
		}
	}
	return 0;
}

static int bind_range(struct kv_region *r, char *addr, size_t len)
{
	const bool interleave = r->res.numa == KV_NUMA_INTERLEAVE;
	int err;

	if (r->res.numa == KV_NUMA_FIRST_TOUCH)
		return 0;
	err = kv_os_bind(addr, len, r->res.nodes, interleave, r->place.required);
	if (err == 0)
		return 0;
	if (r->place.required)
		return kv_fail(err == -ENOMEM ? ENOMEM : ENOTSUP, "%s: %s to nodes 0x%llx required: %s",
			       r->what, interleave ? "interleave" : "bind",
			       (unsigned long long)r->res.nodes, kv_strerror(err));
	degrade(r, "%s to nodes 0x%llx failed (%s): first touch", interleave ? "interleave" : "bind",
		(unsigned long long)r->res.nodes, kv_strerror(err));
	r->res.numa = KV_NUMA_FIRST_TOUCH;
	r->res.node = -1;
	r->res.nodes = kv_numa_nodes();
	return 0;
}

static int lock_range(struct kv_region *r, char *addr, size_t len)
{
	int err;

	if (!r->place.lock || (r->committed > 0 && !r->res.locked))
		return 0; /* not asked, or already degraded to unlocked */
	err = kv_os_mlock(addr, len);
	if (err == 0) {
		r->res.locked = true;
		return 0;
	}
	if (r->place.required)
		return kv_fail(err == -EPERM ? EPERM : ENOMEM, "%s: mlock of %zu bytes required: %s "
			       "(check RLIMIT_MEMLOCK, ulimit -l)", r->what, len, kv_strerror(err));
	if (r->res.locked) {
		/* Earlier commits are locked, this one cannot be: unlock all so
		 * the region is uniformly unlocked, as res says. */
		kv_os_munlock(r->base, r->committed);
		r->res.locked = false;
	}
	degrade(r, "mlock of %zu bytes failed (%s; see RLIMIT_MEMLOCK): not locked", len,
		kv_strerror(err));
	return 0;
}

static void prefault(struct kv_region *r, char *addr, size_t len)
{
	size_t step = r->res.huge == KV_HUGE_1G || r->res.huge == KV_HUGE_2M ? r->res.page_bytes
									     : kv_os_page_size();

	/* Writing makes the kernel allocate each page now, on the node the
	 * binding asks for, instead of at first use on the hot path. */
	for (size_t off = 0; off < len; off += step)
		((volatile char *)addr)[off] = 0;
}

static void verify(struct kv_region *r, char *addr, size_t len)
{
	uint64_t where = 0;

	if (r->res.numa == KV_NUMA_FIRST_TOUCH || !(r->res.prefaulted || r->res.locked)) {
		r->res.verified = 0;
		return;
	}
	if (kv_os_memlocation(addr, len, &where) != 0) {
		r->res.verified = 0;
		return;
	}
	if (where & ~r->res.nodes) {
		r->res.verified = -1;
		kv_log(KV_LOG_WARN, "%s: pages on nodes 0x%llx, bound to 0x%llx", r->what,
		       (unsigned long long)where, (unsigned long long)r->res.nodes);
	} else if (r->res.verified != -1) {
		r->res.verified = 1;
	}
}

int kv_region_commit(struct kv_region *r, size_t len)
{
	char *addr = r->base + r->committed;
	bool hugetlb;
	int rc;

	if (len == 0 || len % r->page_bytes)
		return kv_fail(EINVAL, "%s: commit of %zu bytes is not a multiple of the page (%zu)",
			       r->what, len, r->page_bytes);
	if (len > r->reserved - r->committed)
		return kv_fail(ENOMEM, "%s: commit of %zu bytes passes the reservation (%zu of %zu used)",
			       r->what, len, r->committed, r->reserved);
	struct kv_placement_result saved = r->res;
	rc = map_rw(r, addr, len, &hugetlb);
	if (rc)
		goto fail_mapped_none;
	rc = bind_range(r, addr, len);
	if (rc == 0)
		rc = lock_range(r, addr, len);
	if (rc) {
		unreserve(r, addr, len, hugetlb);
		goto fail_mapped_none;
	}
	if (r->place.prefault) {
		prefault(r, addr, len);
		r->res.prefaulted = true;
	}
	verify(r, addr, len);
	r->committed += len;
	return 0;

fail_mapped_none:
	/* Keep the degrade notes (they describe real attempts) but not the
	 * state changes of a commit that did not happen. */
	{
		char notes[sizeof(r->res.degraded)];

		memcpy(notes, r->res.degraded, sizeof(notes));
		r->res = saved;
		memcpy(r->res.degraded, notes, sizeof(notes));
	}
	return rc;
}

int kv_region_uncommit(struct kv_region *r, size_t len)
{
	char *addr;
	void *p;
	int err;

	if (len == 0 || len % r->page_bytes || len > r->committed)
		return kv_fail(EINVAL, "%s: uncommit of %zu bytes (%zu committed, page %zu)", r->what,
			       len, r->committed, r->page_bytes);
	addr = r->base + r->committed - len;
	/* A fresh PROT_NONE mapping over the range drops its pages and any
	 * lock, whatever page size committed it. */
	p = kv_os_mmap(addr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED,
		       &err);
	if (p == MAP_FAILED)
		return kv_fail(-err, "%s: uncommit of %zu bytes: %s", r->what, len, kv_strerror(err));
	r->committed -= len;
	return 0;
}

void kv_region_release(struct kv_region *r)
{
	if (r->map_base) {
		int err = kv_os_munmap(r->map_base, r->map_len);

		if (err) /* Only an injected failure gets here; retry for real. */
			munmap(r->map_base, r->map_len);
	}
	r->map_base = NULL;
	r->base = NULL;
	r->reserved = r->committed = r->map_len = 0;
}
