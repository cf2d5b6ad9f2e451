// SPDX-License-Identifier: MIT
/*
 * Tests of regions, the allocator's placement core: the huge page chain
 * (hugetlb -> THP -> base pages) forced step by step through the OS seam,
 * mlock and binding degrading or failing as configured, and failed
 * commits leaving the region as it was.
 */
#include <sys/mman.h>

#include "kvtest.h"
#include "allocator/allocator-impl.h"

#define MiB ((size_t)1 << 20)

static struct kv_placement plain(void)
{
	struct kv_placement pl;

	memset(&pl, 0, sizeof(pl));
	pl.numa = KV_NUMA_FIRST_TOUCH;
	pl.huge = KV_HUGE_NONE;
	return pl;
}

static void fill_check(char *p, size_t len, char v)
{
	memset(p, v, len);
	for (size_t i = 0; i < len; i += 4096)
		assert_int_equal(p[i], v);
}

static void test_reserve_commit_chunks(void **state)
{
	struct kv_placement pl = plain();
	struct kv_region r;

	(void)state;
	kv_assert_ok(kv_region_reserve(&r, 10 * MiB, &pl, "test region"));
	assert_int_equal((uintptr_t)r.base % r.page_bytes, 0);
	assert_int_equal(r.reserved, 10 * MiB);
	assert_int_equal(r.committed, 0);
	kv_assert_ok(kv_region_commit(&r, 4 * MiB));
	fill_check(r.base, 4 * MiB, 0x5a);
	kv_assert_ok(kv_region_commit(&r, 6 * MiB));
	fill_check(r.base + 4 * MiB, 6 * MiB, 0x33);
	assert_int_equal(r.base[0], 0x5a); /* earlier chunk kept */
	kv_assert_rc(kv_region_commit(&r, r.page_bytes), -ENOMEM);
	assert_non_null(strstr(kv_last_error(), "test region"));
	assert_int_equal(r.committed, 10 * MiB);
	kv_assert_rc(kv_region_commit(&r, 1), -EINVAL);
	assert_string_equal(r.res.degraded, "");
	kv_region_release(&r);
	kv_region_release(&r); /* twice is harmless */
}

static void test_bad_placements(void **state)
{
	struct kv_placement pl = plain();
	struct kv_region r;

	(void)state;
	kv_assert_rc(kv_region_reserve(&r, 0, &pl, "r"), -EINVAL);
	kv_assert_rc(kv_region_reserve(&r, MiB, NULL, "r"), -EINVAL);
	pl.numa = KV_NUMA_BIND;
	pl.node = 63;
	if (kv_numa_nodes() & (UINT64_C(1) << 63))
		pl.node = 62;
	kv_assert_rc(kv_region_reserve(&r, MiB, &pl, "r"), -ENODEV);
	assert_non_null(strstr(kv_last_error(), "no such NUMA node"));
	pl = plain();
	pl.huge = (enum kv_huge)9;
	kv_assert_rc(kv_region_reserve(&r, MiB, &pl, "r"), -EINVAL);
	pl = plain();
	pl.numa = KV_NUMA_INTERLEAVE;
	pl.nodes = ~kv_numa_nodes();
	kv_assert_rc(kv_region_reserve(&r, MiB, &pl, "r"), -ENODEV);
}

/* A failure at each OS step of a commit leaves the region as it was and
 * the next commit works. */
static void test_commit_failures_leave_nothing(void **state)
{
	const unsigned ops[] = { KV_OS_MPROTECT, KV_OS_MLOCK, KV_OS_BIND, KV_OS_MADVISE };

	(void)state;
	for (size_t i = 0; i < KV_ARRAY_SIZE(ops); i++) {
		struct kv_placement pl = plain();
		struct kv_region r;
		int rc;

		pl.numa = KV_NUMA_BIND;
		pl.node = __builtin_ctzll(kv_numa_nodes());
		pl.huge = KV_HUGE_THP;
		pl.lock = true;
		pl.prefault = true;
		pl.required = true;
		rc = kv_region_reserve(&r, 4 * MiB, &pl, "faulty");
		if (rc == -ENOTSUP) {
			/* THP disabled on this machine: the required THP step
			 * cannot be reached. */
			pl.huge = KV_HUGE_NONE;
			rc = kv_region_reserve(&r, 4 * MiB, &pl, "faulty");
		}
		kv_assert_ok(rc);
		kv_os_inject(ops[i], 1, ops[i] == KV_OS_MLOCK ? EPERM : ENOMEM);
		rc = kv_region_commit(&r, 2 * MiB);
		kv_os_inject(0, 0, 0);
		if (ops[i] == KV_OS_MADVISE && pl.huge == KV_HUGE_NONE) {
			kv_assert_ok(rc); /* no madvise on this path */
		} else {
			assert_true(rc < 0);
			assert_true(strlen(kv_last_error()) > 0);
			assert_int_equal(r.committed, 0);
			kv_assert_ok(kv_region_commit(&r, 2 * MiB));
		}
		fill_check(r.base, 2 * MiB, 1);
		kv_region_release(&r);
	}
}

/* The chain: hugetlb 2M (forced to fail) -> THP -> (madvise forced to
 * fail) base pages, each step said in res.degraded. */
static void test_huge_chain_to_base_pages(void **state)
{
	struct kv_placement pl = plain();
	struct kv_region r;

	(void)state;
	pl.huge = KV_HUGE_2M;
	kv_assert_ok(kv_region_reserve(&r, 4 * MiB, &pl, "chain"));
	assert_int_equal(r.page_bytes, 2 * MiB);
	/* One injection at a time: first the hugetlb mmap. */
	kv_os_inject(KV_OS_HUGETLB, 1, ENOMEM);
	unsigned long madv = kv_os_calls(KV_OS_MADVISE);
	kv_assert_ok(kv_region_commit(&r, 2 * MiB));
	assert_non_null(strstr(r.res.degraded, "hugetlb 2 MiB pages unavailable"));
	if (kv_os_thp_available()) {
		assert_int_equal(r.res.huge, KV_HUGE_THP);
		assert_true(kv_os_calls(KV_OS_MADVISE) > madv);
		/* Now THP's madvise fails too: base pages. */
		kv_os_inject(KV_OS_MADVISE, 1, EINVAL);
		kv_assert_ok(kv_region_commit(&r, 2 * MiB));
		kv_os_inject(0, 0, 0);
		assert_non_null(strstr(r.res.degraded, "MADV_HUGEPAGE"));
	}
	assert_int_equal(r.res.huge, KV_HUGE_NONE);
	assert_int_equal(r.res.page_bytes, kv_os_page_size());
	fill_check(r.base, r.committed, 7);
	kv_region_release(&r);

	/* required: the first failed step is an error, nothing committed. */
	pl.required = true;
	kv_assert_ok(kv_region_reserve(&r, 4 * MiB, &pl, "chain-req"));
	kv_os_inject(KV_OS_HUGETLB, 1, ENOMEM);
	kv_assert_rc(kv_region_commit(&r, 2 * MiB), -ENOTSUP);
	kv_os_inject(0, 0, 0);
	assert_non_null(strstr(kv_last_error(), "required"));
	assert_int_equal(r.committed, 0);
	assert_int_equal(r.res.huge, KV_HUGE_2M);
	kv_region_release(&r);
}

/* AUTO on a machine with no free hugetlb pages takes THP, or base pages
 * when THP is off; with free pages it takes hugetlb. Either way it says. */
static void test_auto(void **state)
{
	struct kv_placement pl = plain();
	struct kv_region r;
	uint64_t free2m = kv_os_free_hugepages(2 * MiB, -1);

	(void)state;
	pl.huge = KV_HUGE_AUTO;
	kv_assert_ok(kv_region_reserve(&r, 8 * MiB, &pl, "auto"));
	kv_assert_ok(kv_region_commit(&r, 8 * MiB));
	if (free2m >= 4)
		assert_true(r.res.huge == KV_HUGE_2M || r.res.huge == KV_HUGE_THP);
	else if (kv_os_thp_available())
		assert_int_equal(r.res.huge, KV_HUGE_THP);
	else
		assert_int_equal(r.res.huge, KV_HUGE_NONE);
	printf("AUTO here: %s (%llu free 2 MiB hugetlb pages, THP %s)\n", kv_huge_name(r.res.huge),
	       (unsigned long long)free2m, kv_os_thp_available() ? "available" : "off");
	fill_check(r.base, r.committed, 9);
	kv_region_release(&r);

	/* Explicit 2 MiB pages, no injection: the kernel itself decides. */
	pl.huge = KV_HUGE_2M;
	kv_assert_ok(kv_region_reserve(&r, 4 * MiB, &pl, "real-2m"));
	kv_assert_ok(kv_region_commit(&r, 4 * MiB));
	if (free2m >= 2) {
		printf("2 MiB hugetlb pages free: explicit 2M obtained %s\n", kv_huge_name(r.res.huge));
	} else {
		assert_true(r.res.huge != KV_HUGE_2M);
		assert_non_null(strstr(r.res.degraded, "hugetlb 2 MiB pages unavailable"));
	}
	fill_check(r.base, r.committed, 3);
	kv_region_release(&r);
}

static void test_lock_degrades_or_fails(void **state)
{
	struct kv_placement pl = plain();
	struct kv_region r;

	(void)state;
	pl.lock = true;
	kv_assert_ok(kv_region_reserve(&r, 4 * MiB, &pl, "lock"));
	kv_assert_ok(kv_region_commit(&r, 2 * MiB));
	assert_true(r.res.locked);
	/* The second chunk cannot be locked: the whole region ends unlocked,
	 * and says so. */
	kv_os_inject(KV_OS_MLOCK, 1, ENOMEM);
	kv_assert_ok(kv_region_commit(&r, 2 * MiB));
	assert_false(r.res.locked);
	assert_non_null(strstr(r.res.degraded, "mlock"));
	kv_region_release(&r);

	pl.required = true;
	kv_assert_ok(kv_region_reserve(&r, 4 * MiB, &pl, "lock-req"));
	kv_os_inject(KV_OS_MLOCK, 1, EPERM);
	kv_assert_rc(kv_region_commit(&r, 2 * MiB), -EPERM);
	assert_non_null(strstr(kv_last_error(), "RLIMIT_MEMLOCK"));
	assert_int_equal(r.committed, 0);
	kv_assert_ok(kv_region_commit(&r, 2 * MiB));
	assert_true(r.res.locked);
	kv_region_release(&r);
}

static void test_bind(void **state)
{
	struct kv_placement pl = plain();
	struct kv_region r;
	int node = __builtin_ctzll(kv_numa_nodes());

	(void)state;
	pl.numa = KV_NUMA_BIND;
	pl.node = node;
	pl.prefault = true;
	kv_assert_ok(kv_region_reserve(&r, 4 * MiB, &pl, "bind"));
	kv_assert_ok(kv_region_commit(&r, 4 * MiB));
	assert_int_equal(r.res.numa, KV_NUMA_BIND);
	assert_int_equal(r.res.node, node);
	assert_true(r.res.prefaulted);
	assert_true(r.res.verified >= 0);
	if (r.res.verified == 0)
		printf("placement not verifiable here (hwloc cannot tell where pages are)\n");
	if (__builtin_popcountll(kv_numa_nodes()) < 2)
		printf("one NUMA node: placement across nodes not checked\n");
	kv_region_release(&r);

	/* Binding refused: first touch, said; required: an error. */
	kv_assert_ok(kv_region_reserve(&r, 2 * MiB, &pl, "bind-fail"));
	kv_os_inject(KV_OS_BIND, 1, ENOSYS);
	kv_assert_ok(kv_region_commit(&r, 2 * MiB));
	assert_int_equal(r.res.numa, KV_NUMA_FIRST_TOUCH);
	assert_int_equal(r.res.node, -1);
	assert_non_null(strstr(r.res.degraded, "first touch"));
	kv_region_release(&r);
	pl.required = true;
	kv_assert_ok(kv_region_reserve(&r, 2 * MiB, &pl, "bind-req"));
	kv_os_inject(KV_OS_BIND, 1, ENOSYS);
	kv_assert_rc(kv_region_commit(&r, 2 * MiB), -ENOTSUP);
	assert_int_equal(r.committed, 0);
	assert_int_equal(r.res.numa, KV_NUMA_BIND);
	kv_region_release(&r);
}

static void test_reserve_mmap_failure(void **state)
{
	struct kv_placement pl = plain();
	struct kv_region r;

	(void)state;
	kv_os_inject(KV_OS_MMAP, 1, ENOMEM);
	kv_assert_rc(kv_region_reserve(&r, MiB, &pl, "nomem"), -ENOMEM);
	assert_non_null(strstr(kv_last_error(), "address space"));
	kv_assert_ok(kv_region_reserve(&r, MiB, &pl, "nomem"));
	kv_region_release(&r);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_reserve_commit_chunks),
		cmocka_unit_test(test_bad_placements),
		cmocka_unit_test(test_commit_failures_leave_nothing),
		cmocka_unit_test(test_huge_chain_to_base_pages),
		cmocka_unit_test(test_auto),
		cmocka_unit_test(test_lock_degrades_or_fails),
		cmocka_unit_test(test_bind),
		cmocka_unit_test(test_reserve_mmap_failure),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
