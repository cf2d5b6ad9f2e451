// SPDX-License-Identifier: MIT
/* Tests of tier, kind and policy names: every name parses back to its
 * value, parsing is case-insensitive, unknown words are clear errors. */
#include "kvtest.h"

static void test_tier_roundtrip(void **state)
{
	(void)state;
	for (int t = 0; t < KV_TIER_COUNT; t++) {
		enum kv_tier back;
		const char *name = kv_tier_name((enum kv_tier)t);

		assert_non_null(name);
		kv_assert_ok(kv_tier_parse(name, &back));
		assert_int_equal(back, t);
	}
	assert_null(kv_tier_name(KV_TIER_COUNT));
	assert_null(kv_tier_name((enum kv_tier)-1));
	assert_string_equal(kv_tier_name(KV_TIER_DRAM), "dram");
}

static void test_kind_roundtrip(void **state)
{
	(void)state;
	for (int k = 0; k < KV_KIND_COUNT; k++) {
		enum kv_kind back;
		const char *name = kv_kind_name((enum kv_kind)k);

		assert_non_null(name);
		kv_assert_ok(kv_kind_parse(name, &back));
		assert_int_equal(back, k);
	}
	assert_null(kv_kind_name(KV_KIND_COUNT));
	assert_string_equal(kv_kind_name(KV_KIND_KV), "kv");
}

static void test_parse_case_and_errors(void **state)
{
	enum kv_tier t = KV_TIER_DEVICE;
	enum kv_kind k = KV_KIND_WEIGHTS;

	(void)state;
	kv_assert_ok(kv_tier_parse("SSD", &t));
	assert_int_equal(t, KV_TIER_SSD);
	kv_assert_ok(kv_kind_parse("Staging", &k));
	assert_int_equal(k, KV_KIND_STAGING);

	kv_assert_rc(kv_tier_parse("nvram", &t), -EINVAL);
	assert_int_equal(t, KV_TIER_SSD); /* untouched on error */
	assert_non_null(strstr(kv_last_error(), "nvram"));
	kv_assert_rc(kv_tier_parse("", &t), -EINVAL);
	kv_assert_rc(kv_tier_parse("dramx", &t), -EINVAL);
	kv_assert_rc(kv_tier_parse(NULL, &t), -EINVAL);
	kv_assert_rc(kv_kind_parse("kvv", &k), -EINVAL);
	assert_non_null(strstr(kv_last_error(), "kvv"));
}

static void test_policy_roundtrip_all_sets(void **state)
{
	char buf[256];

	(void)state;
	/* Every one of the 512 sets formats and parses back to itself. */
	for (uint32_t p = 0; p <= KV_POLICY_ALL; p++) {
		uint32_t back = ~0u;
		int n = kv_policy_format(p, buf, sizeof(buf));

		assert_true(n > 0);
		assert_int_equal((size_t)n, strlen(buf));
		kv_assert_ok(kv_policy_parse(buf, &back));
		assert_int_equal(back, p);
	}
	for (int i = 0; i < KV_POLICY_COUNT; i++)
		assert_non_null(kv_policy_flag_name(1u << i));
	assert_null(kv_policy_flag_name(0));
	assert_null(kv_policy_flag_name(3));
	assert_null(kv_policy_flag_name(1u << KV_POLICY_COUNT));
}

static void test_policy_parse_forms(void **state)
{
	uint32_t p = 0;

	(void)state;
	kv_assert_ok(kv_policy_parse("pinned|spillable", &p));
	assert_int_equal(p, KV_POLICY_PINNED | KV_POLICY_SPILLABLE);
	kv_assert_ok(kv_policy_parse(" Pinned , HUGEPAGE+numa_bind ", &p));
	assert_int_equal(p, KV_POLICY_PINNED | KV_POLICY_HUGEPAGE | KV_POLICY_NUMA_BIND);
	kv_assert_ok(kv_policy_parse("", &p));
	assert_int_equal(p, 0);
	kv_assert_ok(kv_policy_parse("none", &p));
	assert_int_equal(p, 0);
	p = 7;
	kv_assert_rc(kv_policy_parse("pinned|sticky", &p), -EINVAL);
	assert_int_equal(p, 7);
	assert_non_null(strstr(kv_last_error(), "'sticky'"));
}

static void test_policy_format_truncates_like_snprintf(void **state)
{
	char full[256], small[8];
	uint32_t p = KV_POLICY_PINNED | KV_POLICY_READONLY | KV_POLICY_NUMA_INTERLEAVE;
	int n = kv_policy_format(p, full, sizeof(full));

	(void)state;
	assert_string_equal(full, "pinned|readonly|numa_interleave");
	memset(small, 'x', sizeof(small));
	assert_int_equal(kv_policy_format(p, small, sizeof(small)), n);
	assert_int_equal(strlen(small), sizeof(small) - 1);
	assert_memory_equal(small, full, sizeof(small) - 1);
	assert_int_equal(kv_policy_format(p, NULL, 0), n);
	assert_int_equal(kv_policy_format(0, full, sizeof(full)), 4);
	assert_string_equal(full, "none");
	kv_assert_rc(kv_policy_format(1u << 20, full, sizeof(full)), -EINVAL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_tier_roundtrip),
		cmocka_unit_test(test_kind_roundtrip),
		cmocka_unit_test(test_parse_case_and_errors),
		cmocka_unit_test(test_policy_roundtrip_all_sets),
		cmocka_unit_test(test_policy_parse_forms),
		cmocka_unit_test(test_policy_format_truncates_like_snprintf),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
