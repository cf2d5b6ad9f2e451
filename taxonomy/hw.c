// SPDX-License-Identifier: MIT
/*
 * The process's hwloc topology, loaded once, and the NUMA node mask built
 * on it. This is the taxonomy layer's only contact with hwloc topology
 * loading; the allocator's kv_topo builds on kv_hw_topology().
 */
#include <pthread.h>

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
