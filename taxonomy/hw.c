// SPDX-License-Identifier: MIT
/*
 * The process's hwloc topology, loaded once, and the NUMA node mask built
 * on it. This is the taxonomy layer's only contact with hwloc topology
 * loading; the allocator's kv_topo builds on kv_hw_topology(). Also the
 * storage facts two layers need: O_DIRECT alignment and block size.
 */
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <hwloc.h>

#include <kv/taxonomy.h>

#include "kv-private.h"

static pthread_once_t hw_once = PTHREAD_ONCE_INIT;
static hwloc_topology_t hw_topo;
static uint64_t hw_nodes;

static void hw_load(void)
{
	hwloc_topology_t t;
	hwloc_obj_t node = NULL;

	hw_nodes = 1; /* a machine hwloc cannot read behaves as one node */
	if (hwloc_topology_init(&t) != 0) {
		kv_log(KV_LOG_WARN, "hwloc_topology_init failed: behaving as one NUMA node");
		return;
	}
	if (hwloc_topology_load(t) != 0) {
		kv_log(KV_LOG_WARN, "hwloc_topology_load failed: behaving as one NUMA node");
		hwloc_topology_destroy(t);
		return;
	}
	hw_topo = t;
	uint64_t mask = 0;
	while ((node = hwloc_get_next_obj_by_type(t, HWLOC_OBJ_NUMANODE, node)) != NULL) {
		if (node->os_index < KV_NODE_MAX_BITS)
			mask |= UINT64_C(1) << node->os_index;
		else
			kv_log(KV_LOG_WARN, "NUMA node %u is beyond libkv's limit of %d nodes: ignored",
			       node->os_index, KV_NODE_MAX_BITS);
	}
	if (mask == 0)
		kv_log(KV_LOG_INFO, "hwloc reports no NUMA node: behaving as one node");
	else
		hw_nodes = mask;
}

struct hwloc_topology *kv_hw_topology(void)
{
	pthread_once(&hw_once, hw_load);
	return hw_topo;
}

uint64_t kv_numa_nodes(void)
{
	pthread_once(&hw_once, hw_load);
	return hw_nodes;
}

int kv_hw_dio_align(int dirfd, const char *path, int at_flags, uint32_t *offset_align,
		    uint32_t *mem_align)
{
#ifdef STATX_DIOALIGN
	struct statx stx;

	memset(&stx, 0, sizeof(stx));
	if (statx(dirfd, path, at_flags, STATX_DIOALIGN, &stx) == 0 &&
	    (stx.stx_mask & STATX_DIOALIGN)) {
		*offset_align = stx.stx_dio_offset_align;
		if (mem_align)
			*mem_align = stx.stx_dio_mem_align;
		return 1;
	}
#else
	(void)dirfd, (void)path, (void)at_flags, (void)offset_align, (void)mem_align;
#endif
	return 0;
}

uint32_t kv_hw_block_size(dev_t dev)
{
	/* A partition has no queue/ of its own: its parent disk does. */
	static const char *const rel[] = { "queue", "../queue" };

	for (size_t i = 0; i < KV_ARRAY_SIZE(rel); i++) {
		char path[128];
		unsigned v = 0;
		FILE *fp;

		snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/%s/logical_block_size",
			 major(dev), minor(dev), rel[i]);
		fp = fopen(path, "re");
		if (!fp)
			continue;
		if (fscanf(fp, "%u", &v) != 1)
			v = 0;
		fclose(fp);
		if (v && !(v & (v - 1)))
			return v;
	}
	return 0;
}
