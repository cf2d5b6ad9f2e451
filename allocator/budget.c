// SPDX-License-Identifier: MIT
/*
 * Budgets: byte limits per tier and per (tier, node), shared by the arenas
 * and pools that draw on them. Entry points kv_budget_charge() and
 * kv_budget_uncharge(); a charge checks every limit it touches and either
 * takes all of them or none. Charges come per region or chunk, not per
 * block, so one mutex is cheap enough and keeps tier and node exact
 * together.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>

#include "allocator-impl.h"

struct kv_budget {
	pthread_mutex_t lock;
	struct kv_budget_usage tier[KV_TIER_COUNT];
	struct kv_budget_usage node[KV_TIER_COUNT][KV_NODE_MAX];
};

int kv_budget_create(struct kv_budget **out)
{
	struct kv_budget *b;

	if (!out)
		return kv_fail(EINVAL, "kv_budget_create: NULL out");
	b = calloc(1, sizeof(*b));
	if (!b)
		return kv_fail(ENOMEM, "budget: no memory");
	pthread_mutex_init(&b->lock, NULL);
	for (int t = 0; t < KV_TIER_COUNT; t++) {
		b->tier[t].limit = KV_BUDGET_UNLIMITED;
		for (int n = 0; n < KV_NODE_MAX; n++)
			b->node[t][n].limit = KV_BUDGET_UNLIMITED;
	}
	*out = b;
	return 0;
}

int kv_budget_destroy(struct kv_budget *b)
{
	if (!b)
		return 0;
	pthread_mutex_lock(&b->lock);
	for (int t = 0; t < KV_TIER_COUNT; t++)
		if (b->tier[t].used) {
			uint64_t used = b->tier[t].used;

			pthread_mutex_unlock(&b->lock);
			return kv_fail(EBUSY, "budget: tier '%s' still has %" PRIu64 " bytes charged",
				       kv_tier_name((enum kv_tier)t), used);
		}
	pthread_mutex_unlock(&b->lock);
	pthread_mutex_destroy(&b->lock);
	free(b);
	return 0;
}

static int check_args(const struct kv_budget *b, enum kv_tier tier, int node, const char *op)
{
	if (!b)
		return kv_fail(EINVAL, "%s: NULL budget", op);
	if ((unsigned)tier >= KV_TIER_COUNT)
		return kv_fail(EINVAL, "%s: tier %d out of range", op, (int)tier);
	if (node != KV_ANY && (node < 0 || node >= KV_NODE_MAX))
		return kv_fail(EINVAL, "%s: tier '%s' node %d out of range (0..%d or KV_ANY)", op,
			       kv_tier_name(tier), node, KV_NODE_MAX - 1);
	return 0;
}

int kv_budget_set(struct kv_budget *b, enum kv_tier tier, int node, uint64_t limit)
{
	int rc = check_args(b, tier, node, "kv_budget_set");

	if (rc)
		return rc;
	pthread_mutex_lock(&b->lock);
	if (node == KV_ANY)
		b->tier[tier].limit = limit;
	else
		b->node[tier][node].limit = limit;
	pthread_mutex_unlock(&b->lock);
	return 0;
}

static const char *limit_name(enum kv_tier tier, int node, char *buf, size_t len)
{
	if (node == KV_ANY)
		snprintf(buf, len, "tier '%s'", kv_tier_name(tier));
	else
		snprintf(buf, len, "tier '%s' node %d", kv_tier_name(tier), node);
	return buf;
}

static void raise_peak(struct kv_budget_usage *u)
{
	if (u->used > u->peak)
		u->peak = u->used;
}

int kv_budget_charge(struct kv_budget *b, enum kv_tier tier, int node, uint64_t bytes)
{
	struct kv_budget_usage *t, *n = NULL;
	char name[64], have[32], want[32], lim[32];
	int rc = check_args(b, tier, node, "kv_budget_charge");

	if (rc)
		return rc;
	pthread_mutex_lock(&b->lock);
	t = &b->tier[tier];
	if (node != KV_ANY)
		n = &b->node[tier][node];
	struct kv_budget_usage *over = NULL;
	if (bytes > t->limit || t->used > t->limit - bytes)
		over = t;
	else if (n && (bytes > n->limit || n->used > n->limit - bytes))
		over = n;
	if (over) {
		uint64_t used = over->used, limit = over->limit;

		pthread_mutex_unlock(&b->lock);
		return kv_fail(ENOMEM, "budget %s: %s wanted, %s of %s used",
			       limit_name(tier, over == t ? KV_ANY : node, name, sizeof(name)),
			       kv_format_bytes(bytes, want, sizeof(want)),
			       kv_format_bytes(used, have, sizeof(have)),
			       kv_format_bytes(limit, lim, sizeof(lim)));
	}
	t->used += bytes;
	raise_peak(t);
	if (n) {
		n->used += bytes;
		raise_peak(n);
	}
	pthread_mutex_unlock(&b->lock);
	return 0;
}

int kv_budget_uncharge(struct kv_budget *b, enum kv_tier tier, int node, uint64_t bytes)
{
	struct kv_budget_usage *t, *n = NULL;
	int rc = check_args(b, tier, node, "kv_budget_uncharge");

	if (rc)
		return rc;
	pthread_mutex_lock(&b->lock);
	t = &b->tier[tier];
	if (node != KV_ANY)
		n = &b->node[tier][node];
	if (t->used < bytes || (n && n->used < bytes)) {
		char name[64];

		pthread_mutex_unlock(&b->lock);
		return kv_fail(EINVAL, "budget %s: uncharging %" PRIu64 " bytes, more than charged",
			       limit_name(tier, node, name, sizeof(name)), bytes);
	}
	t->used -= bytes;
	if (n)
		n->used -= bytes;
	pthread_mutex_unlock(&b->lock);
	return 0;
}

int kv_budget_usage(const struct kv_budget *b, enum kv_tier tier, int node,
		    struct kv_budget_usage *out)
{
	int rc = check_args(b, tier, node, "kv_budget_usage");

	if (rc)
		return rc;
	if (!out)
		return kv_fail(EINVAL, "kv_budget_usage: NULL out");
	/* The lock only orders this read against charges; it does not
	 * change the budget, hence the cast. */
	pthread_mutex_lock((pthread_mutex_t *)&b->lock);
	*out = node == KV_ANY ? b->tier[tier] : b->node[tier][node];
	pthread_mutex_unlock((pthread_mutex_t *)&b->lock);
	return 0;
}
