// SPDX-License-Identifier: MIT
/*
 * The machine's topology as the allocator sees it: NUMA nodes (OS index,
 * memory, nearby PUs), cores, PUs, page sizes and per-node huge page
 * counts, copied once from the process's hwloc topology and sysfs into an
 * immutable struct kv_topo. Entry points: kv_topo_create() (and the test
 * seam kv_topo_create_from(), which also builds the one-node topology used
 * when hwloc reports no NUMA node), the kv_topo_*() queries, and
 * kv_topo_current_node(), the only call that asks the OS anything after
 * creation. Invariants (nodes sorted by OS index, page sizes strictly
 * increasing from the base page) hold by construction in topo_build().
 */
#include <dirent.h>
#include <inttypes.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <hwloc.h>

#include "allocator-impl.h"

#define SYS_HUGEPAGES "/sys/kernel/mm/hugepages"
#define SYS_NODES "/sys/devices/system/node"
/* Huge page sizes considered before keeping KV_PAGE_SIZES_MAX - 1 of them. */
#define HUGE_CANDIDATES 16

struct topo_node {
	struct kv_topo_node pub;
	hwloc_bitmap_t cpuset; /* the PUs of pub.cpus, for kv_topo_current_node() */
};

struct kv_topo {
	uint32_t n_nodes;
	uint32_t cores;
	uint32_t pus;
	uint32_t n_page_sizes;
	uint64_t page_sizes[KV_PAGE_SIZES_MAX]; /* bytes, base page first */
	bool numa_reported;
	/* Describes the machine we run on (not an XML or synthetic hwloc
	 * topology): sysfs counts apply and the current CPU means something. */
	bool thissystem;
	struct topo_node nodes[]; /* (n_nodes), by increasing OS index */
};

/* ---- sysfs ---------------------------------------------------------------- */

/* One unsigned number from a one-line sysfs file. Returns 0 or -errno. */
static int read_u64(const char *path, uint64_t *out)
{
	unsigned long long v;
	FILE *fp = fopen(path, "re");
	int rc = 0;

	if (!fp)
		return -errno;
	if (fscanf(fp, "%llu", &v) != 1)
		rc = -EINVAL;
	fclose(fp);
	if (rc == 0)
		*out = v;
	return rc;
}

/* nr_hugepages and free_hugepages under dir. Returns 0 or -errno (then
 * both are 0). */
static int read_hp_pair(const char *dir, uint64_t *total, uint64_t *freep)
{
	char path[256];
	int rc;

	*total = *freep = 0;
	snprintf(path, sizeof(path), "%s/nr_hugepages", dir);
	rc = read_u64(path, total);
	if (rc)
		return rc;
	snprintf(path, sizeof(path), "%s/free_hugepages", dir);
	rc = read_u64(path, freep);
	if (rc)
		*total = 0;
	return rc;
}

/* ---- Page sizes --------------------------------------------------------- */

struct size_set {
	uint64_t v[HUGE_CANDIDATES];
	uint32_t n;
};

static void size_add(struct size_set *s, uint64_t bytes)
{
	for (uint32_t i = 0; i < s->n; i++)
		if (s->v[i] == bytes)
			return;
	if (s->n < HUGE_CANDIDATES)
		s->v[s->n++] = bytes;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

/* The huge page sizes the kernel offers, whether or not any are reserved. */
static void sysfs_huge_sizes(struct size_set *s, uint64_t base)
{
	DIR *dp = opendir(SYS_HUGEPAGES);
	struct dirent *e;

	if (!dp)
		return;
	while ((e = readdir(dp)) != NULL) {
		unsigned long long kb;
		char tail;

		if (sscanf(e->d_name, "hugepages-%llukB%c", &kb, &tail) == 1 &&
		    kb * 1024 > base)
			size_add(s, (uint64_t)kb * 1024);
	}
	closedir(dp);
}

/* Fill t->page_sizes: the base page, then up to KV_PAGE_SIZES_MAX - 1
 * huge sizes. When a kernel offers more (arm64 with 4 KiB pages has four),
 * 2 MiB and 1 GiB win because KV_HUGE_2M and KV_HUGE_1G name them; the
 * rest go smallest first. */
static void pick_page_sizes(struct kv_topo *t, struct size_set *huge)
{
	const uint32_t slots = KV_PAGE_SIZES_MAX - 1;
	uint32_t kept = 0;
	bool keep[HUGE_CANDIDATES] = { false };

	qsort(huge->v, huge->n, sizeof(huge->v[0]), cmp_u64);
	for (uint32_t i = 0; i < huge->n && kept < slots; i++)
		if (huge->v[i] == (UINT64_C(2) << 20) || huge->v[i] == (UINT64_C(1) << 30)) {
			keep[i] = true;
			kept++;
		}
	for (uint32_t i = 0; i < huge->n && kept < slots; i++)
		if (!keep[i]) {
			keep[i] = true;
			kept++;
		}
	for (uint32_t i = 0; i < huge->n; i++) {
		if (keep[i])
			t->page_sizes[t->n_page_sizes++] = huge->v[i];
		else
			kv_log(KV_LOG_INFO, "topology: huge page size %" PRIu64
			       " KiB not listed (libkv keeps %d page sizes)",
			       huge->v[i] >> 10, KV_PAGE_SIZES_MAX);
	}
}

/* ---- Nodes -------------------------------------------------------------- */

/* cpus as a list string. A list too long for the field is cut after a
 * whole element and ends in ",..." so nobody mistakes it for complete;
 * n_cpus still counts them all. */
static void format_cpus(char *buf, size_t len, hwloc_const_bitmap_t set)
{
	int n = hwloc_bitmap_list_snprintf(buf, len, set);
	size_t cut;

	if (n < 0) {
		buf[0] = '\0';
		return;
	}
	if ((size_t)n < len)
		return;
	cut = len - sizeof(",...");
	while (cut > 0 && buf[cut] != ',')
		cut--;
	memcpy(buf + cut, cut ? ",..." : "...", cut ? sizeof(",...") : sizeof("..."));
}

static int cmp_node(const void *a, const void *b)
{
	int x = ((const struct topo_node *)a)->pub.os_index;
	int y = ((const struct topo_node *)b)->pub.os_index;

	return (x > y) - (x < y);
}

/* Huge page counts of every node for the kept sizes. On this system they
 * come from sysfs: per node, or the machine-wide counts for a node that
 * stands for the whole machine (the synthetic node, or the only node of a
 * kernel without per-node files). For a topology of another machine, the
 * totals hwloc recorded (free counts are unknown: 0). */
static void fill_hugepages(struct kv_topo *t, hwloc_topology_t hw)
{
	for (uint32_t i = 0; i < t->n_nodes; i++) {
		struct kv_topo_node *n = &t->nodes[i].pub;
		hwloc_obj_t obj = NULL;

		if (!t->thissystem && hw)
			obj = hwloc_get_numanode_obj_by_os_index(hw, (unsigned)n->os_index);
		for (uint32_t j = 1; j < t->n_page_sizes; j++) {
			unsigned long long kb = t->page_sizes[j] >> 10;
			char dir[160];

			if (!t->thissystem) {
				for (unsigned k = 0; obj && obj->attr &&
				     k < obj->attr->numanode.page_types_len; k++)
					if (obj->attr->numanode.page_types[k].size == t->page_sizes[j])
						n->hugepages_total[j] =
							obj->attr->numanode.page_types[k].count;
				continue;
			}
			snprintf(dir, sizeof(dir), SYS_NODES "/node%d/hugepages/hugepages-%llukB",
				 n->os_index, kb);
			if (t->numa_reported &&
			    read_hp_pair(dir, &n->hugepages_total[j], &n->hugepages_free[j]) == 0)
				continue;
			if (t->n_nodes == 1) {
				snprintf(dir, sizeof(dir), SYS_HUGEPAGES "/hugepages-%llukB", kb);
				read_hp_pair(dir, &n->hugepages_total[j], &n->hugepages_free[j]);
			}
		}
	}
}

/* PUs of the whole machine when there is no hwloc: the kernel's online
 * list, else 0..sysconf(ONLN)-1. Returns 0 or -ENOMEM. */
static int online_cpus(hwloc_bitmap_t set)
{
	char line[4096];
	FILE *fp = fopen("/sys/devices/system/cpu/online", "re");
	bool ok = false;
	long n;

	if (fp) {
		if (fgets(line, sizeof(line), fp)) {
			line[strcspn(line, "\n")] = '\0';
			ok = hwloc_bitmap_list_sscanf(set, line) == 0 && !hwloc_bitmap_iszero(set);
		}
		fclose(fp);
	}
	if (ok)
		return 0;
	n = sysconf(_SC_NPROCESSORS_ONLN);
	hwloc_bitmap_zero(set);
	if (hwloc_bitmap_set_range(set, 0, n > 1 ? (int)n - 1 : 0) != 0)
		return -ENOMEM;
	return 0;
}

static uint64_t physical_memory(void)
{
	long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);

	return pages > 0 && psz > 0 ? (uint64_t)pages * (uint64_t)psz : 0;
}

/* NUMA nodes hwloc reports that libkv can name (OS index below
 * KV_NODE_MAX_BITS, like kv_numa_nodes(): masks of nodes are 64 bits). */
static uint32_t count_nodes(hwloc_topology_t hw)
{
	hwloc_obj_t obj = NULL;
	uint32_t n = 0;

	while (hw && (obj = hwloc_get_next_obj_by_type(hw, HWLOC_OBJ_NUMANODE, obj)) != NULL)
		if (obj->os_index < KV_NODE_MAX_BITS)
			n++;
	return n;
}

static void topo_free(struct kv_topo *t)
{
	for (uint32_t i = 0; i < t->n_nodes; i++)
		hwloc_bitmap_free(t->nodes[i].cpuset);
	free(t);
}

/* The nodes from hwloc, or one synthetic node when it reports none. */
static int fill_nodes(struct kv_topo *t, hwloc_topology_t hw)
{
	hwloc_obj_t obj = NULL;
	int rc;

	if (!t->numa_reported) {
		struct topo_node *n = &t->nodes[0];

		t->n_nodes = 1;
		n->cpuset = hwloc_bitmap_alloc();
		if (!n->cpuset)
			return kv_fail(ENOMEM, "topology: out of memory for a cpuset");
		if (hw) {
			rc = hwloc_bitmap_copy(n->cpuset, hwloc_topology_get_topology_cpuset(hw));
			rc = rc ? -ENOMEM : 0;
		} else {
			rc = online_cpus(n->cpuset);
		}
		if (rc)
			return kv_fail(-rc, "topology: out of memory for a cpuset");
		n->pub.os_index = 0;
		n->pub.memory_bytes = physical_memory();
		return 0;
	}
	while ((obj = hwloc_get_next_obj_by_type(hw, HWLOC_OBJ_NUMANODE, obj)) != NULL) {
		struct topo_node *n = &t->nodes[t->n_nodes];
		hwloc_uint64_t mem = obj->attr ? obj->attr->numanode.local_memory : 0;

		if (obj->os_index >= KV_NODE_MAX_BITS)
			continue; /* kv_hw_topology() already warned */
		t->n_nodes++;
		n->pub.os_index = (int)obj->os_index;
		n->cpuset = obj->cpuset ? hwloc_bitmap_dup(obj->cpuset) : hwloc_bitmap_alloc();
		if (!n->cpuset)
			return kv_fail(ENOMEM, "topology: out of memory for node %u's cpuset",
				       obj->os_index);
		/* Some kernels leave local_memory unset; hwloc may still know the
		 * capacity as a memory attribute. */
		if (!mem && hwloc_memattr_get_value(hw, HWLOC_MEMATTR_ID_CAPACITY, obj, NULL,
						    0, &mem) != 0)
			mem = 0;
		n->pub.memory_bytes = mem;
	}
	qsort(t->nodes, t->n_nodes, sizeof(t->nodes[0]), cmp_node);
	if (t->n_nodes == 1 && !t->nodes[0].pub.memory_bytes && t->thissystem)
		t->nodes[0].pub.memory_bytes = physical_memory();
	return 0;
}

/* ---- Creation ----------------------------------------------------------- */

/* Build the snapshot from hw (NULL: no hwloc). Returns 0 or -errno. */
static int topo_build(hwloc_topology_t hw, struct kv_topo **out)
{
	uint32_t n_hw = count_nodes(hw);
	struct size_set huge = { .n = 0 };
	long psz = sysconf(_SC_PAGESIZE);
	struct kv_topo *t;
	hwloc_bitmap_t all;
	int rc, v;

	t = calloc(1, sizeof(*t) + (n_hw ? n_hw : 1) * sizeof(t->nodes[0]));
	if (!t)
		return kv_fail(ENOMEM, "topology: out of memory for %u nodes", n_hw);
	t->numa_reported = n_hw > 0;
	t->thissystem = !hw || hwloc_topology_is_thissystem(hw);
	rc = fill_nodes(t, hw);
	if (rc) {
		topo_free(t);
		return rc;
	}

	all = hwloc_bitmap_alloc();
	if (!all) {
		topo_free(t);
		return kv_fail(ENOMEM, "topology: out of memory for a cpuset");
	}
	for (uint32_t i = 0; i < t->n_nodes; i++) {
		struct topo_node *n = &t->nodes[i];

		v = hwloc_bitmap_weight(n->cpuset);
		n->pub.n_cpus = v > 0 ? (uint32_t)v : 0;
		format_cpus(n->pub.cpus, sizeof(n->pub.cpus), n->cpuset);
		if (hwloc_bitmap_or(all, all, n->cpuset) != 0) {
			hwloc_bitmap_free(all);
			topo_free(t);
			return kv_fail(ENOMEM, "topology: out of memory for a cpuset");
		}
	}
	/* Without hwloc's objects, PUs are those of the nodes and cores are
	 * unknown: counted as PUs, which is what a scheduler may use. */
	v = hw ? hwloc_get_nbobjs_by_type(hw, HWLOC_OBJ_PU) : 0;
	if (v <= 0)
		v = hwloc_bitmap_weight(all);
	t->pus = v > 0 ? (uint32_t)v : 1;
	hwloc_bitmap_free(all);
	v = hw ? hwloc_get_nbobjs_by_type(hw, HWLOC_OBJ_CORE) : 0;
	t->cores = v > 0 ? (uint32_t)v : t->pus;

	t->page_sizes[t->n_page_sizes++] = psz > 0 ? (uint64_t)psz : 4096;
	for (uint32_t i = 0; hw && i < t->n_nodes; i++) {
		hwloc_obj_t obj = hwloc_get_numanode_obj_by_os_index(hw,
								     (unsigned)t->nodes[i].pub.os_index);

		for (unsigned k = 0; obj && obj->attr && k < obj->attr->numanode.page_types_len; k++)
			if (obj->attr->numanode.page_types[k].size > t->page_sizes[0])
				size_add(&huge, obj->attr->numanode.page_types[k].size);
	}
	if (t->thissystem)
		sysfs_huge_sizes(&huge, t->page_sizes[0]);
	pick_page_sizes(t, &huge);
	fill_hugepages(t, hw);

	if (!t->numa_reported) {
		char mem[32];

		kv_log(KV_LOG_INFO, "topology: %s; using one node 0 with all memory (%s) "
		       "and PUs %s", hw ? "hwloc reports no NUMA node" : "no hwloc topology",
		       kv_format_bytes(t->nodes[0].pub.memory_bytes, mem, sizeof(mem)),
		       t->nodes[0].pub.cpus);
	}
	*out = t;
	return 0;
}

int kv_topo_create_from(struct hwloc_topology *hw, struct kv_topo **out)
{
	if (!out)
		return kv_fail(EINVAL, "kv_topo_create: NULL out");
	return topo_build(hw, out);
}

int kv_topo_create(struct kv_topo **out)
{
	return kv_topo_create_from(kv_hw_topology(), out);
}

void kv_topo_destroy(struct kv_topo *topo)
{
	if (topo)
		topo_free(topo);
}

/* ---- Queries ------------------------------------------------------------ */

uint32_t kv_topo_node_count(const struct kv_topo *topo)
{
	return topo->n_nodes;
}

int kv_topo_node(const struct kv_topo *topo, uint32_t i, struct kv_topo_node *out)
{
	if (!out)
		return kv_fail(EINVAL, "kv_topo_node: NULL out");
	if (i >= topo->n_nodes)
		return kv_fail(ERANGE, "topology: node index %" PRIu32 " out of range (%" PRIu32
			       " node%s)", i, topo->n_nodes, topo->n_nodes == 1 ? "" : "s");
	*out = topo->nodes[i].pub;
	return 0;
}

int kv_topo_node_index(const struct kv_topo *topo, int os_index, uint32_t *out)
{
	char list[96];
	size_t len = 0;

	if (!out)
		return kv_fail(EINVAL, "kv_topo_node_index: NULL out");
	for (uint32_t i = 0; i < topo->n_nodes; i++)
		if (topo->nodes[i].pub.os_index == os_index) {
			*out = i;
			return 0;
		}
	list[0] = '\0';
	for (uint32_t i = 0; i < topo->n_nodes && len < sizeof(list); i++) {
		int w = snprintf(list + len, sizeof(list) - len, "%s%d", i ? "," : "",
				 topo->nodes[i].pub.os_index);

		len += w > 0 ? (size_t)w : 0;
	}
	return kv_fail(ENODEV, "NUMA node %d: not on this machine (nodes: %s)", os_index, list);
}

bool kv_topo_numa_reported(const struct kv_topo *topo)
{
	return topo->numa_reported;
}

uint32_t kv_topo_cores(const struct kv_topo *topo)
{
	return topo->cores;
}

uint32_t kv_topo_pus(const struct kv_topo *topo)
{
	return topo->pus;
}

uint32_t kv_topo_page_sizes(const struct kv_topo *topo, uint64_t *sizes, uint32_t max)
{
	uint32_t n = topo->n_page_sizes < max ? topo->n_page_sizes : max;

	for (uint32_t i = 0; i < n; i++)
		sizes[i] = topo->page_sizes[i];
	return n;
}

/* The CPU the calling thread last ran on, or -1. */
static int current_cpu(void)
{
	hwloc_topology_t hw = kv_hw_topology();
	hwloc_bitmap_t set;
	int cpu = -1;

	if (hw && (set = hwloc_bitmap_alloc()) != NULL) {
		if (hwloc_get_last_cpu_location(hw, set, HWLOC_CPUBIND_THREAD) == 0)
			cpu = hwloc_bitmap_first(set);
		hwloc_bitmap_free(set);
	}
	if (cpu < 0)
		cpu = sched_getcpu();
	return cpu;
}

int kv_topo_current_node(const struct kv_topo *topo, int *node)
{
	const struct topo_node *best = NULL;
	int cpu, best_w = 0;

	if (!node)
		return kv_fail(EINVAL, "kv_topo_current_node: NULL node");
	*node = 0;
	if (!topo->thissystem)
		return kv_fail(ENOTSUP, "topology describes another machine: no current node");
	cpu = current_cpu();
	if (cpu < 0)
		return kv_fail(ENOTSUP, "cannot tell which CPU this thread runs on");
	/* Nodes may share PUs (a CPU-less memory node is near a whole
	 * package): the one with the fewest PUs is the closest. */
	for (uint32_t i = 0; i < topo->n_nodes; i++) {
		const struct topo_node *n = &topo->nodes[i];
		int w = hwloc_bitmap_weight(n->cpuset);

		if (hwloc_bitmap_isset(n->cpuset, (unsigned)cpu) && (!best || w < best_w)) {
			best = n;
			best_w = w;
		}
	}
	if (!best)
		return kv_fail(ENOTSUP, "CPU %d is near no NUMA node of the topology", cpu);
	*node = best->pub.os_index;
	return 0;
}
