// SPDX-License-Identifier: MIT
/*
 * kv-bench registry: the cost of one record+forget pair, uncontended, on
 * one thread and on two threads each recording its own allocations.
 * Figures: registry_pair_ns, registry_pair_ns_2t (median of reps).
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include <kv/kv.h>

#include "bench.h"

#define TARGET_NS 100.0

struct pair_arg {
	struct kv_registry *reg;
	pthread_barrier_t *start;
	const char *label;
	int pairs;
	int rc;
	double ns;
};

/* Keep a few records live so the pairs run against a populated registry,
 * as in a real process, not an empty one. */
#define LIVE_BACKGROUND 64

static void *pair_loop(void *p)
{
	struct pair_arg *a = p;
	kv_handle keep[LIVE_BACKGROUND];
	uint64_t t0;

	for (int i = 0; i < LIVE_BACKGROUND; i++)
		if ((a->rc = kv_registry_record(a->reg, 4096, KV_TIER_DRAM, 0, KV_KIND_KV,
						 0, a->label, &keep[i])) != 0)
			return NULL;
	if (a->start)
		pthread_barrier_wait(a->start);
	t0 = bench_now_ns();
	for (int i = 0; i < a->pairs; i++) {
		kv_handle h;

		a->rc = kv_registry_record(a->reg, 65536, KV_TIER_DRAM, 0, KV_KIND_KV,
					   KV_POLICY_SPILLABLE, a->label, &h);
		if (a->rc == 0)
			a->rc = kv_registry_forget(a->reg, h);
		if (a->rc)
			return NULL;
	}
	a->ns = (double)(bench_now_ns() - t0) / a->pairs;
	for (int i = 0; i < LIVE_BACKGROUND; i++)
		kv_registry_forget(a->reg, keep[i]);
	return NULL;
}

/* One repetition with `threads` threads; returns the mean ns per pair
 * per thread, or a negative errno. */
static int one_rep(int threads, int pairs, double *ns_out)
{
	static const char *const labels[] = { "bench/t0", "bench/t1" };
	struct pair_arg args[2];
	pthread_t th[2];
	pthread_barrier_t start;
	struct kv_registry *reg;
	double sum = 0;
	int rc = kv_registry_create(NULL, &reg);

	if (rc)
		return rc;
	pthread_barrier_init(&start, NULL, (unsigned)threads);
	for (int t = 0; t < threads; t++) {
		args[t] = (struct pair_arg){ .reg = reg, .start = threads > 1 ? &start : NULL,
					     .label = labels[t], .pairs = pairs };
		if (pthread_create(&th[t], NULL, pair_loop, &args[t]) != 0) {
			fprintf(stderr, "pthread_create failed\n");
			exit(1);
		}
	}
	for (int t = 0; t < threads; t++) {
		pthread_join(th[t], NULL);
		if (args[t].rc && !rc)
			rc = args[t].rc;
		sum += args[t].ns;
	}
	pthread_barrier_destroy(&start);
	if (rc) {
		fprintf(stderr, "registry bench: %s\n", kv_last_error());
		kv_registry_destroy(reg, KV_REGISTRY_FORCE);
		return rc;
	}
	*ns_out = sum / threads;
	return kv_registry_destroy(reg, 0);
}

int bench_registry(struct bench_run *run)
{
	int pairs = run->quick ? 20000 : 1000000;
	double ns1[64], ns2[64];
	int reps = run->reps < 64 ? run->reps : 64;

	for (int r = 0; r < reps; r++) {
		int rc = one_rep(1, pairs, &ns1[r]);

		if (rc == 0)
			rc = one_rep(2, pairs, &ns2[r]);
		if (rc)
			return rc;
	}
	bench_figure(run, "registry_pair_ns", bench_median(ns1, (size_t)reps), "ns",
		     TARGET_NS, "target");
	bench_figure(run, "registry_pair_ns_2t", bench_median(ns2, (size_t)reps), "ns",
		     TARGET_NS, "target");
	return 0;
}
