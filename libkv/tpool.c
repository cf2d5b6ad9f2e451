// SPDX-License-Identifier: MIT
/*
 * The thread pool that runs the attention kernel: kv_tpool_create(),
 * kv_tpool_run(), kv_tpool_destroy(). Persistent pthreads plus the
 * calling thread claim the items of one call from a shared ticket; a
 * second caller that finds the pool busy runs its items itself rather
 * than wait, so a pool shared by many threads never serialises them.
 *
 * Decode dispatches once per layer, a few hundred microseconds apart, so
 * waking sleeping threads each time (a futex round trip of tens of
 * microseconds) would cost as much as the work. Idle workers therefore
 * spin for SPIN_NS before sleeping on a condition variable; the caller
 * signals only when someone sleeps.
 *
 * One call is a "generation". The ticket holds (generation, next item) in
 * one 64-bit word and the limit (generation, item count) in another, so a
 * worker that wakes late, after its generation ended, cannot claim an
 * item of the next call with the old count: a claim is a compare-and-swap
 * that fails once the generation moved on. A call ends when its count of
 * finished items reaches its item count.
 */
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libkv/kernels.h"
#include "taxonomy/kv-private.h"

#define SPIN_NS 50000u
/* Spins of the caller waiting for claimed items before it yields. */
#define WAIT_SPINS 4096u

typedef void (*item_fn)(void *ctx, uint32_t item, uint32_t worker);

struct worker {
	struct kv_tpool *pool;
	uint32_t index;                 /* 1..threads-1 */
	pthread_t tid;
};

struct kv_tpool {
	uint32_t threads;               /* including the caller */
	struct worker *workers;         /* (threads - 1) */
	uint32_t gen;                   /* owned by the holder of busy */
	atomic_flag busy;               /* held by the call that uses the workers */

	_Atomic(item_fn) fn;            /* of the current generation */
	_Atomic(void *) ctx;
	_Atomic uint64_t limit;         /* gen << 32 | n_items */
	_Atomic uint64_t ticket;        /* gen << 32 | next item */
	atomic_uint done;               /* items finished in this generation */

	/* Waking: seq changes once per call (and at destroy). */
	atomic_uint seq;
	atomic_uint sleepers;
	atomic_bool stop;
	pthread_mutex_t mu;
	pthread_cond_t cv;
};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#endif
}

/* Claim and run items of whatever generation is current until none is
 * left. The limit is read after the ticket: equal generations mean the
 * count belongs to the ticket's call; the compare-and-swap then fails if
 * that call was replaced in between. */
static void run_items(struct kv_tpool *p, uint32_t worker)
{
	for (;;) {
		uint64_t t = atomic_load_explicit(&p->ticket, memory_order_acquire);
		uint64_t lim = atomic_load_explicit(&p->limit, memory_order_acquire);
		item_fn fn;
		void *ctx;

		if ((t >> 32) != (lim >> 32) || (uint32_t)t >= (uint32_t)lim)
			return;
		if (!atomic_compare_exchange_weak_explicit(&p->ticket, &t, t + 1,
							   memory_order_acquire,
							   memory_order_relaxed))
			continue;
		/* The claimed item keeps its call alive, so these are its. */
		fn = atomic_load_explicit(&p->fn, memory_order_relaxed);
		ctx = atomic_load_explicit(&p->ctx, memory_order_relaxed);
		fn(ctx, (uint32_t)t, worker);
		atomic_fetch_add_explicit(&p->done, 1, memory_order_release);
	}
}

/* Wait for seq to move past seen: spin, then sleep. Returns the new seq. */
static unsigned wait_seq(struct kv_tpool *p, unsigned seen)
{
	uint64_t start = kv_now_ns();
	unsigned s;

	for (unsigned i = 1;; i++) {
		s = atomic_load_explicit(&p->seq, memory_order_acquire);
		if (s != seen)
			return s;
		cpu_relax();
		if (i % 64 == 0 && kv_now_ns() - start > SPIN_NS)
			break;
	}
	pthread_mutex_lock(&p->mu);
	/* Dekker with kv_tpool_run(): it bumps seq then reads sleepers, we
	 * count ourselves then read seq; seq_cst on both sides means one of
	 * the two sees the other, so a wake-up is never lost. */
	atomic_fetch_add(&p->sleepers, 1);
	while ((s = atomic_load(&p->seq)) == seen)
		pthread_cond_wait(&p->cv, &p->mu);
	atomic_fetch_sub(&p->sleepers, 1);
	pthread_mutex_unlock(&p->mu);
	return s;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct kv_tpool *p = w->pool;
	/* seq was 0 when the pool was made; a thread that starts late must
	 * still see every change since, the stop included. */
	unsigned seen = 0;

	for (;;) {
		seen = wait_seq(p, seen);
		if (atomic_load_explicit(&p->stop, memory_order_acquire))
			return NULL;
		run_items(p, w->index);
	}
}

static void wake_all(struct kv_tpool *p)
{
	pthread_mutex_lock(&p->mu);
	pthread_cond_broadcast(&p->cv);
	pthread_mutex_unlock(&p->mu);
}

/* Stop and join the first n workers. */
static void stop_workers(struct kv_tpool *p, uint32_t n)
{
	atomic_store(&p->stop, true);
	atomic_fetch_add(&p->seq, 1);
	wake_all(p);
	for (uint32_t i = 0; i < n; i++)
		pthread_join(p->workers[i].tid, NULL);
}

int kv_tpool_create(uint32_t threads, struct kv_tpool **out)
{
	struct kv_tpool *p;
	int rc;

	if (!out)
		return kv_fail(EINVAL, "kv_tpool_create: out is NULL");
	*out = NULL;
	if (threads == 0)
		return kv_fail(EINVAL, "kv_tpool_create: 0 threads");
	p = calloc(1, sizeof(*p));
	if (!p)
		return kv_fail(ENOMEM, "thread pool of %u threads", threads);
	p->threads = threads;
	atomic_flag_clear(&p->busy);
	atomic_init(&p->fn, NULL);
	atomic_init(&p->ctx, NULL);
	atomic_init(&p->limit, 0);
	atomic_init(&p->ticket, 0);
	atomic_init(&p->done, 0);
	atomic_init(&p->seq, 0);
	atomic_init(&p->sleepers, 0);
	atomic_init(&p->stop, false);
	if (threads > 1) {
		p->workers = calloc(threads - 1, sizeof(*p->workers));
		if (!p->workers) {
			free(p);
			return kv_fail(ENOMEM, "thread pool of %u threads", threads);
		}
	}
	rc = pthread_mutex_init(&p->mu, NULL);
	if (rc == 0) {
		rc = pthread_cond_init(&p->cv, NULL);
		if (rc)
			pthread_mutex_destroy(&p->mu);
	}
	if (rc) {
		free(p->workers);
		free(p);
		return kv_fail(rc == ENOMEM ? ENOMEM : EAGAIN, "thread pool: %s", strerror(rc));
	}
	for (uint32_t i = 0; i + 1 < threads; i++) {
		struct worker *w = &p->workers[i];
		char name[32];

		w->pool = p;
		w->index = i + 1;
		rc = pthread_create(&w->tid, NULL, worker_main, w);
		if (rc) {
			stop_workers(p, i);
			pthread_cond_destroy(&p->cv);
			pthread_mutex_destroy(&p->mu);
			free(p->workers);
			free(p);
			return kv_fail(EAGAIN, "thread pool: starting thread %u of %u: %s",
				       i + 2, threads, strerror(rc));
		}
		snprintf(name, sizeof(name), "kv-pool-%u", i + 1);
		name[15] = '\0'; /* the kernel's limit */
		pthread_setname_np(w->tid, name);
	}
	*out = p;
	return 0;
}

void kv_tpool_destroy(struct kv_tpool *p)
{
	if (!p)
		return;
	stop_workers(p, p->threads - 1);
	pthread_cond_destroy(&p->cv);
	pthread_mutex_destroy(&p->mu);
	free(p->workers);
	free(p);
}

uint32_t kv_tpool_threads(const struct kv_tpool *p)
{
	return p ? p->threads : 1;
}

void kv_tpool_run(struct kv_tpool *p, uint32_t n_items,
		  void (*fn)(void *ctx, uint32_t item, uint32_t worker), void *ctx)
{
	uint64_t gen;

	if (n_items == 0)
		return;
	if (!p || p->threads == 1 || n_items == 1 || atomic_flag_test_and_set(&p->busy)) {
		for (uint32_t i = 0; i < n_items; i++)
			fn(ctx, i, 0);
		return;
	}
	gen = ++p->gen;
	atomic_store_explicit(&p->fn, fn, memory_order_relaxed);
	atomic_store_explicit(&p->ctx, ctx, memory_order_relaxed);
	atomic_store_explicit(&p->done, 0, memory_order_relaxed);
	atomic_store_explicit(&p->limit, gen << 32 | n_items, memory_order_release);
	atomic_store_explicit(&p->ticket, gen << 32, memory_order_release);
	atomic_fetch_add(&p->seq, 1);
	if (atomic_load(&p->sleepers))
		wake_all(p);

	run_items(p, 0);
	for (unsigned i = 1; atomic_load_explicit(&p->done, memory_order_acquire) != n_items; i++) {
		/* A worker was preempted inside an item: let it run. */
		if (i >= WAIT_SPINS)
			sched_yield();
		else
			cpu_relax();
	}
	atomic_flag_clear_explicit(&p->busy, memory_order_release);
}
