// SPDX-License-Identifier: MIT
/*
 * Stress of the spill store's replace-then-verify path, as the KV cache's
 * spiller runs it: one thread puts the same 16-byte key again and again
 * (each put replacing the extent before it), waits for the put's
 * callback, and reads the new extent back (kv_store_get, or
 * kv_store_get_async and a wait) and compares it with what it wrote; a
 * helper thread meanwhile puts batches of other keys asynchronously, reads
 * them back asynchronously, deletes some and calls kv_store_sync(). Small
 * extents (640 and 1152 bytes), SYNC_NONE (with the default held-space
 * limit, and with a small one so that the finisher syncs on its own every
 * few dozen puts, right after the callback the verifying get follows) and
 * SYNC_BATCHED; on a tmpfs (/dev/shm: buffered I/O) and under $TMPDIR or
 * /tmp (O_DIRECT where the file system takes it); each once per engine
 * backend (io_uring, skipped saying why where no ring can be set up; then
 * the thread pool), with one engine shared by the store and the test.
 *
 * A hang is the failure this looks for, so a watchdog thread aborts the
 * test, printing the store's and the engine's counters, when either
 * thread has made no progress for WATCHDOG_S seconds. Each case runs for
 * CASE_S seconds (KV_STRESS_SECONDS overrides it, for soaking) or
 * MAX_ITERS verified replacements, whichever comes first, and at least
 * MIN_ITERS; then the store is validated, its counters checked (no get
 * or checksum errors), closed, reopened, and the key's last extent read
 * back.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>

#include "kvtest.h"
#include "offload/offload-impl.h"
#include "offload/store-impl.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define KV_STRESS_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define KV_STRESS_SANITIZED 1
#endif
#endif

#ifdef KV_STRESS_SANITIZED
#define MAX_ITERS 20000u
#define WATCHDOG_S 60
#else
#define MAX_ITERS 100000u
#define WATCHDOG_S 10
#endif
#define MIN_ITERS 200u
#define CASE_S 0.5
#define SMALL_HELD (64u << 10)   /* bytes held before the store syncs */
#define HELPER_KEYS 32
#define HELPER_BATCH 8
#define HELPER_MAX 1536          /* bytes: largest helper extent */

static const char g_identity[] = "test_store_stress";

/* ---- Backends and media --------------------------------------------------- */

struct backend {
	enum kv_io_backend b;
	const char *name;
};

static const struct backend uring = { KV_IO_URING, "io_uring" };
static const struct backend threads = { KV_IO_THREADS, "threads" };

struct medium {
	const struct backend *be;
	bool shm;                  /* /dev/shm, else $TMPDIR or /tmp */
};

static const struct medium uring_shm = { &uring, true };
static const struct medium uring_tmp = { &uring, false };
static const struct medium threads_shm = { &threads, true };
static const struct medium threads_tmp = { &threads, false };

/* ---- One waiter per request ---------------------------------------------- */

struct waiter {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	unsigned pending;
};

struct op {
	struct waiter *w;
	int result;
	struct kv_store_extent ext;
};

static void waiter_init(struct waiter *w)
{
	pthread_mutex_init(&w->mu, NULL);
	pthread_cond_init(&w->cv, NULL);
	w->pending = 0;
}

static void waiter_destroy(struct waiter *w)
{
	pthread_cond_destroy(&w->cv);
	pthread_mutex_destroy(&w->mu);
}

static void waiter_add(struct waiter *w, int n)
{
	pthread_mutex_lock(&w->mu);
	w->pending = (unsigned)((int)w->pending + n);
	pthread_mutex_unlock(&w->mu);
}

/* No timeout: the watchdog catches a completion that never comes. */
static void waiter_wait(struct waiter *w)
{
	pthread_mutex_lock(&w->mu);
	while (w->pending)
		pthread_cond_wait(&w->cv, &w->mu);
	pthread_mutex_unlock(&w->mu);
}

static void on_done(void *ctx, int result, const struct kv_store_extent *ext)
{
	struct op *o = ctx;
	struct waiter *w = o->w;

	o->result = result;
	if (!result && ext)
		o->ext = *ext;
	pthread_mutex_lock(&w->mu);
	w->pending--;
	pthread_cond_signal(&w->cv);
	pthread_mutex_unlock(&w->mu);
}

/* ---- Shared state of a case ---------------------------------------------- */

struct run {
	struct kv_store *st;
	struct kv_io *io;
	atomic_bool stop;          /* the helper finishes its batch and leaves */
	atomic_bool helper_left, watch_off;
	/* Progress counters the watchdog reads, and where each thread is. */
	atomic_ulong main_iters, helper_ops;
	atomic_int main_phase;     /* enum phase */
	char label[160];
	/* The helper's results, read after it is joined. */
	unsigned long helper_puts, helper_gets, helper_deletes;
	int helper_failures;
	char helper_why[200];
};

enum phase { PH_PUT, PH_GET, PH_GET_ASYNC, PH_DONE };

static const char *phase_name(int p)
{
	static const char *const names[] = { "waiting for a put's callback",
					     "in kv_store_get", "waiting for a get's callback",
					     "done" };

	return p >= 0 && p <= PH_DONE ? names[p] : "?";
}

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void *watchdog_main(void *arg)
{
	struct run *r = arg;
	unsigned long last_m = atomic_load(&r->main_iters), last_h = atomic_load(&r->helper_ops);
	double since_m = now_s(), since_h = since_m;

	/* Until both threads are done: the helper may still wait for a batch
	 * after the verifying thread finished. */
	while (!atomic_load(&r->watch_off)) {
		unsigned long m = atomic_load(&r->main_iters), h = atomic_load(&r->helper_ops);
		double t = now_s();

		nanosleep(&(struct timespec){ .tv_nsec = 50 * 1000 * 1000 }, NULL);
		if (m != last_m || atomic_load(&r->main_phase) == PH_DONE) {
			last_m = m;
			since_m = t;
		}
		if (h != last_h || atomic_load(&r->helper_left)) {
			last_h = h;
			since_h = t;
		}
		if (t - since_m > WATCHDOG_S || t - since_h > WATCHDOG_S) {
			struct kv_store_stats s;
			struct kv_io_stats is;

			kv_store_stats(r->st, &s);
			kv_io_stats(r->io, &is);
			fprintf(stderr, "HANG (%s): %s thread made no progress for %d s; main at "
				"iteration %lu, %s; helper at op %lu; store: %" PRIu64 " puts, %"
				PRIu64 " gets, %" PRIu64 " deletes, %" PRIu64 " get errors, %"
				PRIu64 " extents, file %" PRIu64 " bytes; engine: %" PRIu32
				" requests in flight, %" PRIu64 " reads, %" PRIu64 " writes\n",
				r->label, t - since_m > WATCHDOG_S ? "the verifying" : "the helper",
				WATCHDOG_S, m, phase_name(atomic_load(&r->main_phase)), h, s.puts,
				s.gets, s.deletes, s.get_errors, s.extents, s.file_bytes,
				is.in_flight, is.reads, is.writes);
			abort();
		}
	}
	return NULL;
}

/* Bytes of iteration i of the verifying thread: all different, so a read
 * of a stale or overwritten extent shows. */
static void fill_iter(uint8_t *p, size_t n, uint64_t i)
{
	uint64_t s = i * 0x9e3779b97f4a7c15ull + 1;

	for (size_t k = 0; k < n; k += 8) {
		uint64_t v = kv_test_rand(&s);

		memcpy(p + k, &v, n - k < 8 ? n - k : 8);
	}
}

static size_t helper_len(unsigned k)
{
	return 512 + (size_t)k * 31;   /* up to HELPER_MAX, mostly unaligned */
}

/* ---- The helper: other keys, in batches --------------------------------- */

static void helper_fail(struct run *r, const char *what, int rc)
{
	if (!r->helper_failures++)
		snprintf(r->helper_why, sizeof(r->helper_why), "%s: %s (%s)", what,
			 kv_strerror(rc), kv_last_error());
}

static void *helper_main(void *arg)
{
	struct run *r = arg;
	struct kv_store_extent live[HELPER_KEYS];
	uint8_t (*bufs)[HELPER_MAX] = malloc(HELPER_BATCH * sizeof(*bufs));
	uint8_t (*got)[HELPER_MAX] = malloc(HELPER_BATCH * sizeof(*got));
	uint8_t (*want)[HELPER_MAX] = malloc(HELPER_KEYS * sizeof(*want));
	struct op ops[HELPER_BATCH];
	unsigned idx[HELPER_BATCH];
	uint64_t rng = 0x5eed;

	if (!bufs || !got || !want) {
		helper_fail(r, "out of memory", -ENOMEM);
		goto out;
	}
	memset(live, 0, sizeof(live));
	while (!atomic_load(&r->stop)) {
		unsigned what = (unsigned)(kv_test_rand(&rng) % 10), n = 0;
		struct waiter w;

		waiter_init(&w);
		if (what < 4) {
			/* A batch of puts, a key at most once per batch. */
			for (unsigned j = 0; j < HELPER_BATCH; j++) {
				unsigned k = (unsigned)((kv_test_rand(&rng) % (HELPER_KEYS / HELPER_BATCH)) *
							HELPER_BATCH + j);
				uint8_t key[16] = { 'h', (uint8_t)k };
				int rc;

				fill_iter(bufs[n], helper_len(k), kv_test_rand(&rng));
				ops[n] = (struct op){ .w = &w };
				idx[n] = k;
				waiter_add(&w, 1);
				rc = kv_store_put_async(r->st, key, sizeof(key), bufs[n], helper_len(k),
							on_done, &ops[n]);
				if (rc) {
					waiter_add(&w, -1);
					helper_fail(r, "put_async", rc);
					continue;
				}
				n++;
			}
			waiter_wait(&w);
			for (unsigned j = 0; j < n; j++) {
				if (ops[j].result) {
					helper_fail(r, "put", ops[j].result);
					continue;
				}
				live[idx[j]] = ops[j].ext;
				memcpy(want[idx[j]], bufs[j], helper_len(idx[j]));
				r->helper_puts++;
			}
		} else if (what < 8) {
			/* A batch of gets of this thread's live extents. */
			for (unsigned j = 0; j < HELPER_BATCH; j++) {
				unsigned k = (unsigned)(kv_test_rand(&rng) % HELPER_KEYS);
				int rc;

				if (!live[k].id)
					continue;
				ops[n] = (struct op){ .w = &w };
				idx[n] = k;
				waiter_add(&w, 1);
				rc = kv_store_get_async(r->st, &live[k], got[n], on_done, &ops[n]);
				if (rc) {
					waiter_add(&w, -1);
					helper_fail(r, "get_async", rc);
					continue;
				}
				n++;
			}
			waiter_wait(&w);
			for (unsigned j = 0; j < n; j++) {
				if (ops[j].result)
					helper_fail(r, "get", ops[j].result);
				else if (memcmp(got[j], want[idx[j]], helper_len(idx[j])))
					helper_fail(r, "get: bytes differ", -EBADMSG);
				else
					r->helper_gets++;
			}
		} else if (what == 8) {
			unsigned k = (unsigned)(kv_test_rand(&rng) % HELPER_KEYS);

			if (live[k].id) {
				int rc = kv_store_delete(r->st, &live[k]);

				if (rc)
					helper_fail(r, "delete", rc);
				else
					r->helper_deletes++;
				live[k].id = 0;
			}
		} else if (kv_test_rand(&rng) % 4 == 0) {
			int rc = kv_store_sync(r->st);

			if (rc)
				helper_fail(r, "sync", rc);
		}
		waiter_destroy(&w);
		atomic_fetch_add(&r->helper_ops, 1);
	}
out:
	free(bufs);
	free(got);
	free(want);
	atomic_store(&r->helper_left, true);
	return NULL;
}

/* ---- A case ---------------------------------------------------------------- */

struct scase {
	enum kv_store_sync sync;
	size_t len;
	bool small_held;
};

static const struct scase g_cases[] = {
	{ KV_STORE_SYNC_NONE, 640, false },
	{ KV_STORE_SYNC_NONE, 1152, true },
	{ KV_STORE_SYNC_BATCHED, 640, true },
	{ KV_STORE_SYNC_BATCHED, 1152, false },
};

static double case_seconds(void)
{
	const char *e = getenv("KV_STRESS_SECONDS");
	double s = e && *e ? atof(e) : CASE_S;

	return s > 0 ? s : CASE_S;
}

static void store_open(struct run *r, const char *dir, struct kv_registry *reg,
		       const struct scase *c)
{
	struct kv_store_config cfg;

	kv_store_config_default(&cfg);
	cfg.dir = dir;
	cfg.identity = g_identity;
	cfg.identity_len = sizeof(g_identity);
	cfg.registry = reg;
	cfg.sync = c->sync;
	cfg.io = r->io;
	kv_assert_ok(kv_store_open(&cfg, &r->st));
	if (c->small_held)
		kv_store_set_held_limit(r->st, SMALL_HELD);
}

static void run_case(const struct medium *m, struct kv_io *io, struct kv_registry *reg,
		     const char *base, const struct scase *c)
{
	static struct run r;
	const uint8_t key[16] = "spill-same-key!";
	uint8_t *data = malloc(c->len), *got = malloc(c->len);
	struct kv_store_extent last = { 0 };
	struct kv_store_stats s;
	pthread_t wd, helper;
	char dir[3072];
	double t0, budget = case_seconds();
	char why[400] = "";
	unsigned long i;

	assert_non_null(data);
	assert_non_null(got);
	snprintf(dir, sizeof(dir), "%s/libkv-store-stress-XXXXXX", base);
	assert_non_null(mkdtemp(dir));
	memset(&r, 0, sizeof(r));
	r.io = io;
	store_open(&r, dir, reg, c);
	kv_store_stats(r.st, &s);
	snprintf(r.label, sizeof(r.label), "%s, %s, %s, %zu bytes%s", m->be->name,
		 s.direct ? "O_DIRECT" : "buffered",
		 c->sync == KV_STORE_SYNC_NONE ? "SYNC_NONE" : "SYNC_BATCHED", c->len,
		 c->small_held ? ", small held limit" : "");
	assert_int_equal(pthread_create(&wd, NULL, watchdog_main, &r), 0);
	assert_int_equal(pthread_create(&helper, NULL, helper_main, &r), 0);

	t0 = now_s();
	/* A failure here must not leave the function while the helper and
	 * the watchdog run on r: it is recorded, the loop ends, and it is
	 * reported once both are joined. */
	for (i = 0; i < MAX_ITERS && (i < MIN_ITERS || now_s() - t0 < budget) && !*why; i++) {
		struct waiter w;
		struct op put = { .w = &w }, get = { .w = &w };
		int rc;

		waiter_init(&w);
		fill_iter(data, c->len, i);
		atomic_store(&r.main_phase, PH_PUT);
		waiter_add(&w, 1);
		rc = kv_store_put_async(r.st, key, sizeof(key), data, c->len, on_done, &put);
		if (rc)
			waiter_add(&w, -1);
		waiter_wait(&w);
		if (!rc)
			rc = put.result;
		if (rc) {
			snprintf(why, sizeof(why), "put %lu: %s (%s)", i, kv_strerror(rc),
				 kv_last_error());
			waiter_destroy(&w);
			break;
		}
		/* Both forms of the read: the synchronous one waits on the
		 * store's own condition, the other on ours. */
		memset(got, 0, c->len);
		if (i % 2 == 0) {
			atomic_store(&r.main_phase, PH_GET);
			rc = kv_store_get(r.st, &put.ext, got);
		} else {
			atomic_store(&r.main_phase, PH_GET_ASYNC);
			waiter_add(&w, 1);
			rc = kv_store_get_async(r.st, &put.ext, got, on_done, &get);
			if (rc)
				waiter_add(&w, -1);
			waiter_wait(&w);
			if (!rc)
				rc = get.result;
		}
		if (rc)
			snprintf(why, sizeof(why), "get %lu (extent %" PRIu64 "): %s (%s)", i,
				 put.ext.id, kv_strerror(rc), kv_last_error());
		else if (memcmp(got, data, c->len))
			snprintf(why, sizeof(why), "get %lu (extent %" PRIu64 "): bytes differ", i,
				 put.ext.id);
		/* The extent before it was replaced. */
		else if (last.id && (rc = kv_store_get(r.st, &last, got)) != -ENOENT)
			snprintf(why, sizeof(why), "get of replaced extent %" PRIu64 ": %d, want "
				 "-ENOENT", last.id, rc);
		last = put.ext;
		waiter_destroy(&w);
		atomic_fetch_add(&r.main_iters, 1);
	}
	atomic_store(&r.main_phase, PH_DONE);
	atomic_store(&r.stop, true);
	pthread_join(helper, NULL);
	atomic_store(&r.watch_off, true);
	pthread_join(wd, NULL);
	printf("%s: %lu replacements verified in %.2f s; helper: %lu puts, %lu gets, "
	       "%lu deletes\n", r.label, i, now_s() - t0, r.helper_puts, r.helper_gets,
	       r.helper_deletes);
	if (*why)
		fail_msg("%s: %s", r.label, why);
	if (r.helper_failures)
		fail_msg("%s: helper: %d failures, the first: %s", r.label, r.helper_failures,
			 r.helper_why);

	kv_assert_ok(kv_store_validate(r.st));
	kv_store_stats(r.st, &s);
	assert_int_equal(s.get_errors, 0);
	assert_int_equal(s.checksum_failures, 0);
	assert_int_equal(s.put_errors, 0);
	assert_int_equal(s.puts, i + r.helper_puts);
	kv_assert_ok(kv_store_close(r.st));
	store_open(&r, dir, reg, c);
	kv_assert_ok(kv_store_get(r.st, &last, got));
	assert_memory_equal(got, data, c->len);
	kv_assert_ok(kv_store_validate(r.st));
	kv_assert_ok(kv_store_close(r.st));
	kv_test_rmtree(dir);
	free(data);
	free(got);
}

static void test_replace_verify(void **state)
{
	const struct medium *m = *state;
	struct kv_io_config icfg;
	struct kv_registry *reg;
	struct kv_io *io;
	char base[2048];
	uint64_t b;
	int rc;

	if (m->shm) {
		struct stat sb;

		if (stat("/dev/shm", &sb) || !S_ISDIR(sb.st_mode) || access("/dev/shm", W_OK)) {
			print_message("skip: no writable /dev/shm: no tmpfs for buffered I/O\n");
			skip();
		}
		snprintf(base, sizeof(base), "/dev/shm");
	} else {
		const char *tmp = getenv("TMPDIR");

		snprintf(base, sizeof(base), "%s", tmp && *tmp ? tmp : "/tmp");
	}
	kv_assert_ok(kv_registry_create(NULL, &reg));
	kv_io_config_default(&icfg);
	icfg.backend = m->be->b;
	icfg.registry = reg;
	rc = kv_io_create(&icfg, &io);
	if (rc && m->be->b == KV_IO_URING) {
		printf("SKIP %s: %s\n", m->be->name, kv_last_error());
		kv_assert_ok(kv_registry_destroy(reg, 0));
		skip();
	}
	kv_assert_ok(rc);
	for (size_t k = 0; k < sizeof(g_cases) / sizeof(g_cases[0]); k++)
		run_case(m, io, reg, base, &g_cases[k]);
	kv_assert_ok(kv_io_destroy(io, 0));
	/* The stores' records and the engine's staging are gone. */
	kv_assert_ok(kv_registry_bytes(reg, KV_ANY, KV_ANY, KV_ANY, &b));
	assert_int_equal(b, 0);
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_prestate(test_replace_verify, (void *)&uring_shm),
		cmocka_unit_test_prestate(test_replace_verify, (void *)&uring_tmp),
		cmocka_unit_test_prestate(test_replace_verify, (void *)&threads_shm),
		cmocka_unit_test_prestate(test_replace_verify, (void *)&threads_tmp),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
