// SPDX-License-Identifier: MIT
/*
 * Tests of budgets: limits per tier and per node are exact, a refused
 * charge changes nothing, peaks, and threads charging one budget never
 * push it past a limit.
 */
#include <pthread.h>
#include <stdatomic.h>

#include "kvtest.h"

static struct kv_budget_usage usage(struct kv_budget *b, enum kv_tier t, int node)
{
	struct kv_budget_usage u;

	kv_assert_ok(kv_budget_usage(b, t, node, &u));
	return u;
}

static void test_limits_exact(void **state)
{
	struct kv_budget *b;

	(void)state;
	kv_assert_ok(kv_budget_create(&b));
	assert_true(usage(b, KV_TIER_DRAM, KV_ANY).limit == KV_BUDGET_UNLIMITED);
	kv_assert_ok(kv_budget_set(b, KV_TIER_DRAM, KV_ANY, 1000));
	kv_assert_ok(kv_budget_charge(b, KV_TIER_DRAM, 0, 600));
	kv_assert_ok(kv_budget_charge(b, KV_TIER_DRAM, KV_ANY, 400));
	assert_int_equal(usage(b, KV_TIER_DRAM, KV_ANY).used, 1000);
	kv_assert_rc(kv_budget_charge(b, KV_TIER_DRAM, 0, 1), -ENOMEM);
	assert_non_null(strstr(kv_last_error(), "tier 'dram'"));
	assert_int_equal(usage(b, KV_TIER_DRAM, KV_ANY).used, 1000);
	assert_int_equal(usage(b, KV_TIER_DRAM, 0).used, 600);
	kv_assert_ok(kv_budget_uncharge(b, KV_TIER_DRAM, KV_ANY, 400));
	kv_assert_ok(kv_budget_charge(b, KV_TIER_SSD, KV_ANY, UINT64_MAX - 1));
	kv_assert_rc(kv_budget_charge(b, KV_TIER_SSD, KV_ANY, 2), -ENOMEM);

	/* Node limit binds below the tier limit; failure takes neither. */
	kv_assert_ok(kv_budget_set(b, KV_TIER_DRAM, 0, 700));
	kv_assert_rc(kv_budget_charge(b, KV_TIER_DRAM, 0, 101), -ENOMEM);
	assert_non_null(strstr(kv_last_error(), "node 0"));
	assert_int_equal(usage(b, KV_TIER_DRAM, KV_ANY).used, 600);
	kv_assert_ok(kv_budget_charge(b, KV_TIER_DRAM, 0, 100));
	assert_int_equal(usage(b, KV_TIER_DRAM, 0).used, 700);
	assert_int_equal(usage(b, KV_TIER_DRAM, 0).peak, 700);
	assert_int_equal(usage(b, KV_TIER_DRAM, KV_ANY).peak, 1000);

	/* Bad input. */
	kv_assert_rc(kv_budget_uncharge(b, KV_TIER_DRAM, 0, 701), -EINVAL);
	kv_assert_rc(kv_budget_charge(b, (enum kv_tier)9, 0, 1), -EINVAL);
	kv_assert_rc(kv_budget_charge(b, KV_TIER_DRAM, KV_NODE_MAX, 1), -EINVAL);
	kv_assert_rc(kv_budget_set(NULL, KV_TIER_DRAM, 0, 1), -EINVAL);
	assert_int_equal(usage(b, KV_TIER_DRAM, 0).used, 700);

	kv_assert_rc(kv_budget_destroy(b), -EBUSY);
	kv_assert_ok(kv_budget_uncharge(b, KV_TIER_DRAM, 0, 700));
	kv_assert_ok(kv_budget_uncharge(b, KV_TIER_SSD, KV_ANY, UINT64_MAX - 1));
	kv_assert_ok(kv_budget_destroy(b));
}

#define THREADS 4
#define LIMIT 100000u

struct charger {
	struct kv_budget *b;
	uint64_t seed;
	uint64_t held;
	int over;
};

static void *charge_loop(void *p)
{
	struct charger *c = p;

	for (int i = 0; i < 100000; i++) {
		uint64_t r = kv_test_rand(&c->seed);
		uint64_t n = r % 5000;
		struct kv_budget_usage u;

		if ((r >> 32) & 1) {
			if (kv_budget_charge(c->b, KV_TIER_DRAM, 0, n) == 0)
				c->held += n;
		} else if (c->held >= n) {
			if (kv_budget_uncharge(c->b, KV_TIER_DRAM, 0, n) != 0)
				c->over++;
			c->held -= n;
		}
		if (kv_budget_usage(c->b, KV_TIER_DRAM, 0, &u) != 0 || u.used > LIMIT ||
		    u.peak > LIMIT)
			c->over++;
	}
	return NULL;
}

static void test_threads_never_pass_limit(void **state)
{
	struct charger c[THREADS];
	pthread_t th[THREADS];
	struct kv_budget *b;
	uint64_t held = 0;

	(void)state;
	kv_assert_ok(kv_budget_create(&b));
	kv_assert_ok(kv_budget_set(b, KV_TIER_DRAM, 0, LIMIT));
	for (int i = 0; i < THREADS; i++) {
		c[i] = (struct charger){ .b = b, .seed = (uint64_t)i + 1 };
		assert_int_equal(pthread_create(&th[i], NULL, charge_loop, &c[i]), 0);
	}
	for (int i = 0; i < THREADS; i++) {
		assert_int_equal(pthread_join(th[i], NULL), 0);
		assert_int_equal(c[i].over, 0);
		held += c[i].held;
	}
	assert_int_equal(usage(b, KV_TIER_DRAM, 0).used, held);
	assert_int_equal(usage(b, KV_TIER_DRAM, KV_ANY).used, held);
	for (int i = 0; i < THREADS; i++)
		kv_assert_ok(kv_budget_uncharge(b, KV_TIER_DRAM, 0, c[i].held));
	kv_assert_ok(kv_budget_destroy(b));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_limits_exact),
		cmocka_unit_test(test_threads_never_pass_limit),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
