// SPDX-License-Identifier: MIT
/*
 * kv_topo against the machine, read independently: node count against
 * kv_numa_nodes(), PUs against sysconf and the affinity mask, cpu lists
 * parsed back, page sizes and per-node huge page counts against sysfs
 * (read here, in a stable snapshot), the current node with the thread
 * pinned to each CPU in turn; the error paths; and through the seam
 * kv_topo_create_from() the one-node topology of a machine without hwloc
 * and a two-node synthetic hwloc topology.
 */
#include <dirent.h>
#include <sched.h>

#include <hwloc.h>

#include "kvtest.h"

#include "allocator/allocator-impl.h"

/* CPUs this test can describe; a bigger machine skips what needs more. */
#define CPU_BITS 4096

struct cpu_set_bits {
	unsigned char b[CPU_BITS / 8];
};

static bool bit_get(const struct cpu_set_bits *s, unsigned i)
{
	return i < CPU_BITS && (s->b[i / 8] >> (i % 8)) & 1;
}

/* Parse "0-3,8,10-11" into s (ORed in). A list kv_topo cut short ends in
 * "..." (*cut set). Returns the number of CPUs parsed, -1 if malformed. */
static int parse_cpus(const char *str, struct cpu_set_bits *s, bool *cut)
{
	const char *p = str;
	int n = 0;

	*cut = false;
	if (*p == '\0')
		return 0;
	for (;;) {
		unsigned long lo, hi;
		char *end;

		if (strcmp(p, "...") == 0) {
			*cut = true;
			return n;
		}
		if (*p < '0' || *p > '9')
			return -1;
		lo = hi = strtoul(p, &end, 10);
		p = end;
		if (*p == '-') {
			p++;
			if (*p < '0' || *p > '9')
				return -1;
			hi = strtoul(p, &end, 10);
			p = end;
		}
		if (hi < lo || hi >= CPU_BITS)
			return -1;
		for (unsigned long c = lo; c <= hi; c++) {
			if (bit_get(s, (unsigned)c))
				continue; /* already counted by an earlier list */
			s->b[c / 8] |= (unsigned char)(1u << (c % 8));
			n++;
		}
		if (*p == '\0')
			return n;
		if (*p != ',')
			return -1;
		p++;
	}
}

/* The parser itself, so a node check cannot pass by a parser bug. */
static void test_parse_cpus(void **state)
{
	struct cpu_set_bits s;
	bool cut;

	(void)state;
	memset(&s, 0, sizeof(s));
	assert_int_equal(parse_cpus("0-3,8,10-11", &s, &cut), 7);
	assert_false(cut);
	assert_true(bit_get(&s, 3) && bit_get(&s, 8) && bit_get(&s, 11));
	assert_false(bit_get(&s, 4) || bit_get(&s, 9));
	memset(&s, 0, sizeof(s));
	assert_int_equal(parse_cpus("", &s, &cut), 0);
	assert_int_equal(parse_cpus("5,...", &s, &cut), 1);
	assert_true(cut);
	assert_int_equal(parse_cpus("3-1", &s, &cut), -1);
	assert_int_equal(parse_cpus("1,,2", &s, &cut), -1);
	assert_int_equal(parse_cpus("1-", &s, &cut), -1);
}

/* ---- sysfs, read here rather than through libkv ------------------------- */

static int read_num(const char *path, uint64_t *v)
{
	unsigned long long x;
	FILE *fp = fopen(path, "r");
	int ok;

	if (!fp)
		return -1;
	ok = fscanf(fp, "%llu", &x) == 1;
	fclose(fp);
	if (!ok)
		return -1;
	*v = x;
	return 0;
}

/* nr/free huge pages of `bytes` on node os_index (whole: the machine).
 * A kernel without per-node files has them only machine-wide. */
static void sysfs_hp(int os_index, bool whole, bool may_fall_back, uint64_t bytes,
		     uint64_t *total, uint64_t *freep)
{
	char dir[256], path[300];

	*total = *freep = 0;
	if (whole)
		snprintf(dir, sizeof(dir), "/sys/kernel/mm/hugepages/hugepages-%llukB",
			 (unsigned long long)(bytes >> 10));
	else
		snprintf(dir, sizeof(dir),
			 "/sys/devices/system/node/node%d/hugepages/hugepages-%llukB",
			 os_index, (unsigned long long)(bytes >> 10));
	snprintf(path, sizeof(path), "%s/nr_hugepages", dir);
	if (read_num(path, total) != 0) {
		if (!whole && may_fall_back)
			sysfs_hp(os_index, true, false, bytes, total, freep);
		return;
	}
	snprintf(path, sizeof(path), "%s/free_hugepages", dir);
	if (read_num(path, freep) != 0)
		*total = 0;
}

/* Every (node, size) count of t as sysfs has it now. */
struct hp_snap {
	uint64_t total[KV_NODE_MAX][KV_PAGE_SIZES_MAX];
	uint64_t free[KV_NODE_MAX][KV_PAGE_SIZES_MAX];
};

static void snap_sysfs(const struct kv_topo *t, struct hp_snap *s)
{
	uint64_t sizes[KV_PAGE_SIZES_MAX];
	uint32_t ns = kv_topo_page_sizes(t, sizes, KV_PAGE_SIZES_MAX);
	uint32_t nn = kv_topo_node_count(t);

	memset(s, 0, sizeof(*s));
	for (uint32_t i = 0; i < nn && i < KV_NODE_MAX; i++) {
		struct kv_topo_node n;

		kv_assert_ok(kv_topo_node(t, i, &n));
		for (uint32_t j = 1; j < ns; j++)
			sysfs_hp(n.os_index, !kv_topo_numa_reported(t), nn == 1, sizes[j],
				 &s->total[i][j], &s->free[i][j]);
	}
}

/* Create a topology with create() while sysfs holds still (the same
 * counts before and after), so a difference is libkv's. Skips the caller
 * if the counts keep moving (another process reserving huge pages). */
static struct kv_topo *create_stable(int (*create)(struct kv_topo **), struct hp_snap *snap)
{
	struct hp_snap after;
	struct kv_topo *t;

	for (int attempt = 0; attempt < 20; attempt++) {
		kv_assert_ok(create(&t));
		snap_sysfs(t, snap);
		kv_topo_destroy(t);
		kv_assert_ok(create(&t));
		snap_sysfs(t, &after);
		if (memcmp(snap, &after, sizeof(after)) == 0)
			return t;
		kv_topo_destroy(t);
		usleep(10000);
	}
	skip();
	return NULL;
}

static void check_hugepages(const struct kv_topo *t, const struct hp_snap *snap)
{
	uint64_t sizes[KV_PAGE_SIZES_MAX];
	uint32_t ns = kv_topo_page_sizes(t, sizes, KV_PAGE_SIZES_MAX);

	for (uint32_t i = 0; i < kv_topo_node_count(t); i++) {
		struct kv_topo_node n;

		kv_assert_ok(kv_topo_node(t, i, &n));
		assert_int_equal(n.hugepages_total[0], 0);
		assert_int_equal(n.hugepages_free[0], 0);
		for (uint32_t j = 1; j < ns; j++) {
			if (n.hugepages_total[j] != snap->total[i][j] ||
			    n.hugepages_free[j] != snap->free[i][j])
				fail_msg("node %d, %llu KiB pages: libkv %llu/%llu, sysfs %llu/%llu",
					 n.os_index, (unsigned long long)(sizes[j] >> 10),
					 (unsigned long long)n.hugepages_total[j],
					 (unsigned long long)n.hugepages_free[j],
					 (unsigned long long)snap->total[i][j],
					 (unsigned long long)snap->free[i][j]);
			assert_true(n.hugepages_free[j] <= n.hugepages_total[j]);
		}
		for (uint32_t j = ns; j < KV_PAGE_SIZES_MAX; j++)
			assert_int_equal(n.hugepages_total[j], 0);
	}
}

/* ---- The machine -------------------------------------------------------- */

static void test_nodes(void **state)
{
	struct kv_topo *t;
	struct cpu_set_bits all;
	uint64_t mask = kv_numa_nodes();
	uint32_t count, idx, sum_cpus = 0;
	int prev = -1, covered = 0;
	bool cut, any_cut = false;

	(void)state;
	memset(&all, 0, sizeof(all));
	kv_assert_ok(kv_topo_create(&t));
	count = kv_topo_node_count(t);
	assert_true(count >= 1);
	if (kv_topo_numa_reported(t))
		assert_int_equal(count, __builtin_popcountll(mask));
	else
		assert_int_equal(count, 1);

	for (uint32_t i = 0; i < count; i++) {
		struct kv_topo_node n;
		struct cpu_set_bits one;
		int parsed;

		memset(&one, 0, sizeof(one));
		kv_assert_ok(kv_topo_node(t, i, &n));
		assert_true(n.os_index > prev); /* OS index order, no duplicates */
		prev = n.os_index;
		if (kv_topo_numa_reported(t))
			assert_true(mask & (UINT64_C(1) << n.os_index));
		assert_true(n.memory_bytes > 0);
		assert_non_null(memchr(n.cpus, '\0', sizeof(n.cpus)));
		parsed = parse_cpus(n.cpus, &one, &cut);
		if (parsed < 0)
			fail_msg("node %d: cpus \"%s\" does not parse", n.os_index, n.cpus);
		if (cut)
			assert_true((uint32_t)parsed < n.n_cpus);
		else
			assert_int_equal(parsed, n.n_cpus);
		any_cut |= cut;
		parsed = parse_cpus(n.cpus, &all, &cut);
		assert_true(parsed >= 0);
		covered += parsed;
		sum_cpus += n.n_cpus;

		kv_assert_ok(kv_topo_node_index(t, n.os_index, &idx));
		assert_int_equal(idx, i);
	}
	/* Every PU is near some node; nodes may share PUs (a CPU-less memory
	 * node is near a whole package), so the union counts, not the sum. */
	if (!any_cut)
		assert_int_equal(covered, kv_topo_pus(t));
	assert_true(sum_cpus >= kv_topo_pus(t) || any_cut);
	kv_topo_destroy(t);
}

static void test_cpus(void **state)
{
	struct kv_topo *t;
	long online = sysconf(_SC_NPROCESSORS_ONLN);
	cpu_set_t aff;
	uint32_t pus;

	(void)state;
	kv_assert_ok(kv_topo_create(&t));
	pus = kv_topo_pus(t);
	/* hwloc drops the PUs a cgroup forbids, not those sched_setaffinity
	 * (taskset) excludes: between the two. */
	assert_true(online >= 1);
	assert_true(pus <= (uint32_t)online);
	if (sched_getaffinity(0, sizeof(aff), &aff) == 0 && online <= CPU_SETSIZE)
		assert_true(pus >= (uint32_t)CPU_COUNT(&aff));
	assert_true(kv_topo_cores(t) >= 1);
	assert_true(kv_topo_cores(t) <= pus);
	kv_topo_destroy(t);
}

static void test_errors(void **state)
{
	struct kv_topo *t;
	struct kv_topo_node n;
	uint64_t mask = 0;
	uint32_t idx = 12345, count;
	int absent = -1;

	(void)state;
	kv_assert_rc(kv_topo_create(NULL), -EINVAL);
	kv_assert_ok(kv_topo_create(&t));
	count = kv_topo_node_count(t);

	kv_clear_error();
	kv_assert_rc(kv_topo_node(t, count, &n), -ERANGE);
	assert_non_null(strstr(kv_last_error(), "out of range"));
	kv_assert_rc(kv_topo_node(t, UINT32_MAX, &n), -ERANGE);
	kv_assert_rc(kv_topo_node(t, 0, NULL), -EINVAL);

	for (uint32_t i = 0; i < count; i++) {
		kv_assert_ok(kv_topo_node(t, i, &n));
		if (n.os_index < 64)
			mask |= UINT64_C(1) << n.os_index;
	}
	for (int i = 0; i < 64 && absent < 0; i++)
		if (!(mask & (UINT64_C(1) << i)))
			absent = i;
	if (absent >= 0) {
		char want[32];

		kv_clear_error();
		kv_assert_rc(kv_topo_node_index(t, absent, &idx), -ENODEV);
		snprintf(want, sizeof(want), "NUMA node %d", absent);
		assert_non_null(strstr(kv_last_error(), want));
		assert_int_equal(idx, 12345); /* untouched on error */
	}
	kv_clear_error();
	kv_assert_rc(kv_topo_node_index(t, -1, &idx), -ENODEV);
	assert_string_not_equal(kv_last_error(), "");
	kv_assert_rc(kv_topo_node_index(t, 64, &idx), -ENODEV);
	kv_assert_rc(kv_topo_node_index(t, 0, NULL), -EINVAL);
	kv_assert_rc(kv_topo_current_node(t, NULL), -EINVAL);
	kv_topo_destroy(t);
	kv_topo_destroy(NULL);
}

/* Huge page sizes the kernel lists, sorted. */
static uint32_t sysfs_huge_sizes(uint64_t *out, uint32_t max)
{
	DIR *dp = opendir("/sys/kernel/mm/hugepages");
	struct dirent *e;
	uint32_t n = 0;

	while (dp && (e = readdir(dp)) != NULL) {
		unsigned long long kb;

		if (sscanf(e->d_name, "hugepages-%llukB", &kb) == 1 && n < max)
			out[n++] = (uint64_t)kb * 1024;
	}
	if (dp)
		closedir(dp);
	for (uint32_t i = 1; i < n; i++)
		for (uint32_t j = i; j > 0 && out[j - 1] > out[j]; j--) {
			uint64_t x = out[j];

			out[j] = out[j - 1];
			out[j - 1] = x;
		}
	return n;
}

static void test_page_sizes(void **state)
{
	struct kv_topo *t;
	uint64_t sizes[KV_PAGE_SIZES_MAX + 2], sys[32], one = 0;
	uint32_t n, n_sys = sysfs_huge_sizes(sys, 32);

	(void)state;
	kv_assert_ok(kv_topo_create(&t));
	memset(sizes, 0xff, sizeof(sizes));
	n = kv_topo_page_sizes(t, sizes, KV_PAGE_SIZES_MAX + 2);
	assert_true(n >= 1 && n <= KV_PAGE_SIZES_MAX);
	assert_int_equal(sizes[n], UINT64_MAX); /* nothing written past n */
	assert_int_equal(sizes[0], (uint64_t)sysconf(_SC_PAGESIZE));
	for (uint32_t i = 1; i < n; i++) {
		bool listed = false;

		assert_true(sizes[i] > sizes[i - 1]);
		assert_int_equal(sizes[i] & (sizes[i] - 1), 0);
		for (uint32_t j = 0; j < n_sys; j++)
			listed |= sys[j] == sizes[i];
		if (!listed)
			fail_msg("huge page size %llu KiB is not in /sys/kernel/mm/hugepages",
				 (unsigned long long)(sizes[i] >> 10));
	}
	/* Every size the kernel lists is there, unless there are too many. */
	if (n_sys <= KV_PAGE_SIZES_MAX - 1)
		assert_int_equal(n, 1 + n_sys);
	else
		assert_int_equal(n, KV_PAGE_SIZES_MAX);

	assert_int_equal(kv_topo_page_sizes(t, &one, 1), 1);
	assert_int_equal(one, sizes[0]);
	assert_int_equal(kv_topo_page_sizes(t, NULL, 0), 0);
	kv_topo_destroy(t);
}

static void test_hugepage_counts(void **state)
{
	struct hp_snap snap;
	struct kv_topo *t;
	uint64_t sizes[KV_PAGE_SIZES_MAX];
	uint32_t ns, nn, sys_nodes = 0;
	DIR *dp;
	struct dirent *e;

	(void)state;
	t = create_stable(kv_topo_create, &snap);
	check_hugepages(t, &snap);

	/* When libkv sees every node sysfs has (no cgroup hides one), the
	 * nodes add up to the machine-wide counts. */
	ns = kv_topo_page_sizes(t, sizes, KV_PAGE_SIZES_MAX);
	nn = kv_topo_node_count(t);
	dp = opendir("/sys/devices/system/node");
	while (dp && (e = readdir(dp)) != NULL) {
		int id;
		char tail;

		if (sscanf(e->d_name, "node%d%c", &id, &tail) == 1)
			sys_nodes++;
	}
	if (dp)
		closedir(dp);
	if (sys_nodes == nn || !kv_topo_numa_reported(t)) {
		for (uint32_t j = 1; j < ns; j++) {
			uint64_t total = 0, all_total, all_free;

			for (uint32_t i = 0; i < nn; i++)
				total += snap.total[i][j];
			sysfs_hp(0, true, false, sizes[j], &all_total, &all_free);
			if (total != all_total)
				fail_msg("%llu KiB pages: nodes hold %llu, the machine %llu",
					 (unsigned long long)(sizes[j] >> 10),
					 (unsigned long long)total,
					 (unsigned long long)all_total);
		}
	}
	kv_topo_destroy(t);
}

/* Whether node os_index of t lists cpu (a cut list may hold it unseen). */
static bool node_has_cpu(const struct kv_topo *t, int os_index, int cpu)
{
	struct kv_topo_node n;
	struct cpu_set_bits s;
	uint32_t idx;
	bool cut;

	if (kv_topo_node_index(t, os_index, &idx) != 0)
		return false;
	kv_assert_ok(kv_topo_node(t, idx, &n));
	memset(&s, 0, sizeof(s));
	if (parse_cpus(n.cpus, &s, &cut) < 0)
		return false;
	return bit_get(&s, (unsigned)cpu) || cut;
}

static void test_current_node(void **state)
{
	struct kv_topo *t;
	cpu_set_t orig, one;
	int node = -1, rc, checked = 0;

	(void)state;
	kv_assert_ok(kv_topo_create(&t));
	rc = kv_topo_current_node(t, &node);
	if (rc == -ENOTSUP) {
		assert_int_equal(node, 0);
		kv_topo_destroy(t);
		return;
	}
	kv_assert_ok(rc);
	assert_true(kv_topo_node_index(t, node, &(uint32_t){ 0 }) == 0);

	/* Pinned to each CPU in turn, the node named holds that CPU. */
	assert_int_equal(sched_getaffinity(0, sizeof(orig), &orig), 0);
	for (int cpu = 0; cpu < CPU_SETSIZE && checked < 256; cpu++) {
		if (!CPU_ISSET(cpu, &orig))
			continue;
		CPU_ZERO(&one);
		CPU_SET(cpu, &one);
		if (sched_setaffinity(0, sizeof(one), &one) != 0)
			continue;
		kv_assert_ok(kv_topo_current_node(t, &node));
		if (!node_has_cpu(t, node, cpu))
			fail_msg("pinned to CPU %d, current node %d does not hold it", cpu, node);
		checked++;
	}
	assert_int_equal(sched_setaffinity(0, sizeof(orig), &orig), 0);
	assert_true(checked >= 1);
	kv_topo_destroy(t);
}

/* ---- Through the seam --------------------------------------------------- */

struct log_capture {
	int topo_info_lines;
	char last[256];
};

static void capture(enum kv_log_level level, const char *msg, void *ctx)
{
	struct log_capture *c = ctx;

	if (level == KV_LOG_INFO && strncmp(msg, "topology:", 9) == 0) {
		c->topo_info_lines++;
		snprintf(c->last, sizeof(c->last), "%s", msg);
	}
}

static int create_no_hwloc(struct kv_topo **out)
{
	return kv_topo_create_from(NULL, out);
}

static void test_no_numa(void **state)
{
	struct log_capture cap = { 0, "" };
	struct kv_topo *t, *real;
	struct kv_topo_node n;
	struct cpu_set_bits s;
	struct hp_snap snap;
	uint64_t sizes[KV_PAGE_SIZES_MAX], real_sizes[KV_PAGE_SIZES_MAX];
	long online = sysconf(_SC_NPROCESSORS_ONLN);
	long psz = sysconf(_SC_PAGESIZE), pages_before, pages_after;
	uint32_t ns, idx;
	int node = -1, rc;
	bool cut;

	(void)state;
	kv_set_log(capture, KV_LOG_INFO, &cap);
	pages_before = sysconf(_SC_PHYS_PAGES);
	rc = kv_topo_create_from(NULL, &t);
	pages_after = sysconf(_SC_PHYS_PAGES);
	kv_set_log(NULL, KV_LOG_ERROR, NULL);
	kv_assert_ok(rc);
	assert_int_equal(cap.topo_info_lines, 1);
	assert_non_null(strstr(cap.last, "one node 0"));

	assert_false(kv_topo_numa_reported(t));
	assert_int_equal(kv_topo_node_count(t), 1);
	kv_assert_ok(kv_topo_node(t, 0, &n));
	assert_int_equal(n.os_index, 0);
	/* All of the machine's memory, which a VM may grow or shrink meanwhile. */
	if (n.memory_bytes != (uint64_t)pages_before * (uint64_t)psz)
		assert_int_equal(n.memory_bytes, (uint64_t)pages_after * (uint64_t)psz);
	assert_int_equal(n.n_cpus, (uint32_t)online);
	assert_int_equal(kv_topo_pus(t), (uint32_t)online);
	assert_int_equal(kv_topo_cores(t), kv_topo_pus(t));
	memset(&s, 0, sizeof(s));
	assert_int_equal(parse_cpus(n.cpus, &s, &cut), (int)n.n_cpus);
	assert_false(cut);
	kv_assert_ok(kv_topo_node_index(t, 0, &idx));
	assert_int_equal(idx, 0);
	kv_assert_rc(kv_topo_node_index(t, 1, &idx), -ENODEV);
	kv_assert_rc(kv_topo_node(t, 1, &n), -ERANGE);

	/* The same page sizes as the machine's own topology. */
	kv_assert_ok(kv_topo_create(&real));
	ns = kv_topo_page_sizes(t, sizes, KV_PAGE_SIZES_MAX);
	assert_int_equal(ns, kv_topo_page_sizes(real, real_sizes, KV_PAGE_SIZES_MAX));
	assert_memory_equal(sizes, real_sizes, ns * sizeof(sizes[0]));
	kv_topo_destroy(real);

	rc = kv_topo_current_node(t, &node);
	if (rc != -ENOTSUP)
		kv_assert_ok(rc);
	assert_int_equal(node, 0);
	kv_topo_destroy(t);

	/* The one node holds the machine-wide huge pages. */
	t = create_stable(create_no_hwloc, &snap);
	check_hugepages(t, &snap);
	kv_topo_destroy(t);
}

static void test_synthetic_hwloc(void **state)
{
	hwloc_topology_t hw;
	struct kv_topo *t;
	struct kv_topo_node n;
	uint64_t sizes[KV_PAGE_SIZES_MAX];
	uint32_t idx;
	int node = -1;

	(void)state;
	assert_int_equal(hwloc_topology_init(&hw), 0);
	/* Two packages whose nodes hwloc lists in reverse OS order, with a
	 * gap: OS indices 2 then 0. */
	assert_int_equal(hwloc_topology_set_synthetic(hw,
		"pack:2 [numa(memory=1GB indexes=2,0)] core:2 pu:2"), 0);
	assert_int_equal(hwloc_topology_load(hw), 0);
	kv_assert_ok(kv_topo_create_from(hw, &t));
	hwloc_topology_destroy(hw); /* the snapshot keeps nothing of it */

	assert_true(kv_topo_numa_reported(t));
	assert_int_equal(kv_topo_node_count(t), 2);
	assert_int_equal(kv_topo_cores(t), 4);
	assert_int_equal(kv_topo_pus(t), 8);

	kv_assert_ok(kv_topo_node(t, 0, &n));
	assert_int_equal(n.os_index, 0);
	assert_string_equal(n.cpus, "4-7");
	assert_int_equal(n.n_cpus, 4);
	assert_int_equal(n.memory_bytes, 1000000000);
	kv_assert_ok(kv_topo_node(t, 1, &n));
	assert_int_equal(n.os_index, 2);
	assert_string_equal(n.cpus, "0-3");
	assert_int_equal(n.memory_bytes, 1000000000);
	/* Not this machine: no sysfs counts. */
	for (int j = 0; j < KV_PAGE_SIZES_MAX; j++)
		assert_int_equal(n.hugepages_free[j], 0);

	kv_assert_ok(kv_topo_node_index(t, 2, &idx));
	assert_int_equal(idx, 1);
	kv_clear_error();
	kv_assert_rc(kv_topo_node_index(t, 1, &idx), -ENODEV);
	assert_non_null(strstr(kv_last_error(), "0,2"));
	kv_assert_rc(kv_topo_node(t, 2, &n), -ERANGE);

	assert_true(kv_topo_page_sizes(t, sizes, KV_PAGE_SIZES_MAX) >= 1);
	assert_int_equal(sizes[0], (uint64_t)sysconf(_SC_PAGESIZE));
	kv_assert_rc(kv_topo_current_node(t, &node), -ENOTSUP);
	assert_int_equal(node, 0);
	kv_topo_destroy(t);
}

/* A cpu list longer than the field: cut after a whole element, marked by
 * "...", while n_cpus counts every PU. */
static void test_cpus_cut(void **state)
{
	char desc[1024];
	size_t len;
	hwloc_topology_t hw;
	struct kv_topo *t;
	struct kv_topo_node n;
	struct cpu_set_bits s;
	bool cut;
	int parsed;

	(void)state;
	/* 100 PUs with OS indices 0, 2, ..., 198: no ranges to compress. */
	len = (size_t)snprintf(desc, sizeof(desc), "pack:1 [numa(memory=1GB)] core:100 pu:1(indexes=");
	for (int i = 0; i < 100; i++)
		len += (size_t)snprintf(desc + len, sizeof(desc) - len, "%s%d", i ? "," : "", 2 * i);
	snprintf(desc + len, sizeof(desc) - len, ")");
	assert_int_equal(hwloc_topology_init(&hw), 0);
	assert_int_equal(hwloc_topology_set_synthetic(hw, desc), 0);
	assert_int_equal(hwloc_topology_load(hw), 0);
	kv_assert_ok(kv_topo_create_from(hw, &t));
	hwloc_topology_destroy(hw);

	kv_assert_ok(kv_topo_node(t, 0, &n));
	assert_int_equal(n.n_cpus, 100);
	assert_int_equal(kv_topo_pus(t), 100);
	assert_true(strlen(n.cpus) < sizeof(n.cpus));
	len = strlen(n.cpus);
	assert_true(len > 4);
	assert_string_equal(n.cpus + len - 4, ",...");
	memset(&s, 0, sizeof(s));
	parsed = parse_cpus(n.cpus, &s, &cut);
	assert_true(cut);
	assert_true(parsed > 20 && parsed < 100);
	/* The listed ones are the first PUs, each whole. */
	for (int i = 0; i < parsed; i++)
		assert_true(bit_get(&s, (unsigned)(2 * i)));
	kv_topo_destroy(t);
}

/* The CPU-to-node lookup of kv_topo_current_node() on a topology that
 * claims to be this machine: a package-wide node 0 (CPUs 0-3, CPU-less in
 * effect: every CPU also has a closer node) and nodes 2 (CPUs 0-1) and 1
 * (CPUs 2-3), so neither OS order nor size alone finds the answer. The
 * closest node holding the CPU wins; a CPU of no node is -ENOTSUP. */
static void test_current_node_lookup(void **state)
{
	hwloc_topology_t hw;
	struct kv_topo *t;
	cpu_set_t orig, one;
	int checked = 0;

	(void)state;
	assert_int_equal(hwloc_topology_init(&hw), 0);
	assert_int_equal(hwloc_topology_set_synthetic(hw,
		"pack:1 [numa(memory=1GB indexes=2,1,0)] group:2 [numa(memory=1GB)] core:1 pu:2"), 0);
	assert_int_equal(hwloc_topology_set_flags(hw, HWLOC_TOPOLOGY_FLAG_IS_THISSYSTEM), 0);
	assert_int_equal(hwloc_topology_load(hw), 0);
	kv_assert_ok(kv_topo_create_from(hw, &t));
	hwloc_topology_destroy(hw);
	assert_int_equal(kv_topo_node_count(t), 3);

	assert_int_equal(sched_getaffinity(0, sizeof(orig), &orig), 0);
	for (int cpu = 0; cpu < CPU_SETSIZE && checked < 16; cpu++) {
		int node = -1, rc, want = cpu < 2 ? 2 : cpu < 4 ? 1 : -1;

		if (!CPU_ISSET(cpu, &orig))
			continue;
		CPU_ZERO(&one);
		CPU_SET(cpu, &one);
		if (sched_setaffinity(0, sizeof(one), &one) != 0)
			continue;
		rc = kv_topo_current_node(t, &node);
		if (want < 0) {
			kv_assert_rc(rc, -ENOTSUP);
			assert_int_equal(node, 0);
		} else {
			kv_assert_ok(rc);
			if (node != want)
				fail_msg("CPU %d: node %d, want %d", cpu, node, want);
		}
		checked++;
	}
	assert_int_equal(sched_setaffinity(0, sizeof(orig), &orig), 0);
	assert_true(checked >= 1);
	kv_topo_destroy(t);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_parse_cpus),
		cmocka_unit_test(test_nodes),
		cmocka_unit_test(test_cpus),
		cmocka_unit_test(test_errors),
		cmocka_unit_test(test_page_sizes),
		cmocka_unit_test(test_hugepage_counts),
		cmocka_unit_test(test_current_node),
		cmocka_unit_test(test_no_numa),
		cmocka_unit_test(test_synthetic_hwloc),
		cmocka_unit_test(test_cpus_cut),
		cmocka_unit_test(test_current_node_lookup),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
