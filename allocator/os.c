// SPDX-License-Identifier: MIT
/*
 * The allocator's OS seam: mmap, munmap, mprotect, madvise, mlock and
 * hwloc area binding, each behind a kv_os_*() function that tests can make
 * fail on the Nth call (kv_os_inject()), plus the read-only facts the
 * placement decisions need (free huge pages, THP, page size, where pages
 * are). Nothing here keeps state but the injection counters (seam.c).
 */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <hwloc.h>

#include "allocator-impl.h"

static struct kv_seam os_seam;

void kv_os_inject(unsigned ops, unsigned nth, int err)
{
	kv_seam_inject(&os_seam, ops, nth, err > 0 ? err : -err);
}

unsigned long kv_os_calls(unsigned ops)
{
	return kv_seam_calls(&os_seam, ops);
}

/* Count a call of `op` (one or more bits) and say whether it must fail:
 * 0, or the injected -errno. */
static int seam(unsigned op)
{
	return -kv_seam_hit(&os_seam, op);
}

void *kv_os_mmap(void *addr, size_t len, int prot, int flags, int *err)
{
	int rc = seam(KV_OS_MMAP | ((flags & MAP_HUGETLB) ? KV_OS_HUGETLB : 0));
	void *p;

	if (rc) {
		*err = rc;
		return MAP_FAILED;
	}
	p = mmap(addr, len, prot, flags, -1, 0);
	*err = p == MAP_FAILED ? -errno : 0;
	return p;
}

int kv_os_munmap(void *addr, size_t len)
{
	int rc = seam(KV_OS_MUNMAP);

	if (rc)
		return rc;
	return munmap(addr, len) == 0 ? 0 : -errno;
}

int kv_os_mprotect(void *addr, size_t len, int prot)
{
	int rc = seam(KV_OS_MPROTECT);

	if (rc)
		return rc;
	return mprotect(addr, len, prot) == 0 ? 0 : -errno;
}

int kv_os_madvise(void *addr, size_t len, int advice)
{
	int rc = seam(KV_OS_MADVISE);

	if (rc)
		return rc;
	return madvise(addr, len, advice) == 0 ? 0 : -errno;
}

int kv_os_mlock(void *addr, size_t len)
{
	int rc = seam(KV_OS_MLOCK);

	if (rc)
		return rc;
	/* The raw system call: sanitizer runtimes replace mlock() with a
	 * no-op, and the tests of RLIMIT_MEMLOCK must see the kernel's answer
	 * in every build. */
	return syscall(SYS_mlock, addr, len) == 0 ? 0 : -errno;
}

int kv_os_munlock(void *addr, size_t len)
{
	return syscall(SYS_munlock, addr, len) == 0 ? 0 : -errno;
}

static hwloc_bitmap_t mask_to_bitmap(uint64_t nodes)
{
	hwloc_bitmap_t set = hwloc_bitmap_alloc();

	if (!set)
		return NULL;
	for (unsigned i = 0; i < 64; i++)
		if (nodes & (UINT64_C(1) << i))
			hwloc_bitmap_set(set, i);
	return set;
}

int kv_os_bind(void *addr, size_t len, uint64_t nodes, bool interleave, bool strict)
{
	hwloc_topology_t topo = kv_hw_topology();
	hwloc_bitmap_t set;
	int rc = seam(KV_OS_BIND);

	if (rc)
		return rc;
	if (!topo)
		return -ENOSYS;
	set = mask_to_bitmap(nodes);
	if (!set)
		return -ENOMEM;
	rc = hwloc_set_area_membind(topo, addr, len, set,
				    interleave ? HWLOC_MEMBIND_INTERLEAVE : HWLOC_MEMBIND_BIND,
				    HWLOC_MEMBIND_BYNODESET | (strict ? HWLOC_MEMBIND_STRICT : 0));
	rc = rc == 0 ? 0 : (errno ? -errno : -ENOSYS);
	hwloc_bitmap_free(set);
	return rc;
}

int kv_os_memlocation(const void *addr, size_t len, uint64_t *nodes)
{
	hwloc_topology_t topo = kv_hw_topology();
	hwloc_bitmap_t set;
	int rc = 0;

	if (!topo)
		return -ENOTSUP;
	set = hwloc_bitmap_alloc();
	if (!set)
		return -ENOMEM;
	if (hwloc_get_area_memlocation(topo, addr, len, set, HWLOC_MEMBIND_BYNODESET) != 0 ||
	    hwloc_bitmap_iszero(set)) {
		rc = -ENOTSUP;
	} else {
		uint64_t m = 0;
		int i;

		hwloc_bitmap_foreach_begin(i, set)
			if (i < 64)
				m |= UINT64_C(1) << i;
		hwloc_bitmap_foreach_end();
		*nodes = m;
	}
	hwloc_bitmap_free(set);
	return rc;
}

static uint64_t read_u64_file(const char *path)
{
	FILE *f = fopen(path, "r");
	unsigned long long v = 0;

	if (!f)
		return 0;
	if (fscanf(f, "%llu", &v) != 1)
		v = 0;
	fclose(f);
	return v;
}

uint64_t kv_os_free_hugepages(uint64_t page_bytes, int node)
{
	char path[160];

	if (node < 0)
		snprintf(path, sizeof(path), "/sys/kernel/mm/hugepages/hugepages-%llukB/free_hugepages",
			 (unsigned long long)(page_bytes >> 10));
	else
		snprintf(path, sizeof(path),
			 "/sys/devices/system/node/node%d/hugepages/hugepages-%llukB/free_hugepages",
			 node, (unsigned long long)(page_bytes >> 10));
	return read_u64_file(path);
}

bool kv_os_thp_available(void)
{
	FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
	char line[128] = "";
	bool ok;

	if (!f)
		return false;
	ok = fgets(line, sizeof(line), f) != NULL && strstr(line, "[never]") == NULL;
	fclose(f);
	return ok;
}

size_t kv_os_page_size(void)
{
	long p = sysconf(_SC_PAGESIZE);

	return p > 0 ? (size_t)p : 4096;
}
