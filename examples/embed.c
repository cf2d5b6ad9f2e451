#include <stdio.h>
#include <kv/kv.h>

int main(void)
{
	struct kv_registry *reg;
	kv_handle weights, block;

	if (kv_registry_create(NULL, &reg) != 0 ||
	    /* 64 MiB of read-only weights and a 2 MiB KV block in DRAM node 0 */
	    kv_registry_record(reg, 64u << 20, KV_TIER_DRAM, 0, KV_KIND_WEIGHTS,
			       KV_POLICY_READONLY, "model.weights", &weights) != 0 ||
	    kv_registry_record(reg, 2u << 20, KV_TIER_DRAM, 0, KV_KIND_KV,
			       KV_POLICY_SPILLABLE, "seq0.kv", &block) != 0 ||
	    /* memory pressure: the KV block is spilled to SSD */
	    kv_registry_move(reg, block, KV_TIER_SSD, 0) != 0) {
		fprintf(stderr, "libkv: %s\n", kv_last_error());
		return 1;
	}
	kv_report_write(reg, stdout, KV_REPORT_TEXT);
	kv_registry_forget(reg, block);
	kv_registry_forget(reg, weights);
	return kv_registry_destroy(reg, 0) == 0 ? 0 : 1;
}
