// SPDX-License-Identifier: MIT
/*
 * Tests of the spill store: restart (1,000 extents written, closed,
 * reopened and read back verified; deletes reuse space); a crash test (a
 * forked child puts in a loop with SYNC_EVERY and is SIGKILLed at a
 * seeded random moment, several rounds, then every listed extent must read
 * back verified with the content its key implies); faults: ENOSPC through
 * the capacity and through the I/O seam, EIO on a read, failed index
 * appends and syncs, a flipped byte (-EBADMSG naming the extent), a
 * truncated or garbage index, a wrong identity key; asynchronous puts and
 * gets; several threads at once; held space bounded with SYNC_NONE and no
 * syncs. Every store records into a private
 * registry that must hold exactly the store's bytes, and nothing after
 * close. Content is derived from the key, so any reader can check it.
 * Every test runs once per I/O engine backend (io_uring, then the thread
 * pool; io_uring skipped, saying why, where no ring can be set up): the
 * store starts its own engine with KV_IO_AUTO, which takes the backend
 * from KV_IO_BACKEND, set per test (and inherited by the crash test's
 * forked child); each open checks the engine's backend.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>

#include "kvtest.h"
#include "offload/offload-impl.h"
#include "offload/store-impl.h"

#define KiB ((size_t)1 << 10)
#define MAX_LEN (300 * KiB)

static const char g_identity[] = "model=test-7b;layers=4;kv_heads=8;head_dim=64;dtype=f16";

/* ---- Backends ------------------------------------------------------------- */

struct backend {
	enum kv_io_backend b;
	const char *env;           /* KV_IO_BACKEND value */
	const char *name;
};

static const struct backend uring = { KV_IO_URING, "uring", "io_uring" };
static const struct backend threads = { KV_IO_THREADS, "threads", "threads" };
static const struct backend *g_be = &threads;

static int be_setup(void **state)
{
	g_be = *state;
	return setenv("KV_IO_BACKEND", g_be->env, 1) ? -1 : 0;
}

static int be_teardown(void **state)
{
	(void)state;
	return unsetenv("KV_IO_BACKEND") ? -1 : 0;
}

/* Skip the test if its backend is io_uring and this machine cannot set
 * a ring up (asked once). */
static void be_require(void)
{
	static int uring_ok = -1;
	static char why[256];

	if (g_be->b != KV_IO_URING)
		return;
	if (uring_ok < 0) {
		struct kv_io_config cfg;
		struct kv_registry *reg;
		struct kv_io *io;

		kv_assert_ok(kv_registry_create(NULL, &reg));
		kv_io_config_default(&cfg);
		cfg.registry = reg;
		cfg.backend = KV_IO_URING;
		uring_ok = kv_io_create(&cfg, &io) == 0;
		if (uring_ok)
			kv_assert_ok(kv_io_destroy(io, 0));
		else
			snprintf(why, sizeof(why), "%s", kv_last_error());
		kv_assert_ok(kv_registry_destroy(reg, 0));
	}
	if (!uring_ok) {
		printf("SKIP %s: %s\n", g_be->name, why);
		skip();
	}
}

/* ---- Helpers -------------------------------------------------------------- */

static void make_key(uint64_t i, uint8_t key[16])
{
	uint64_t a = i, b = ~i * 0x9e3779b97f4a7c15ull;

	memcpy(key, &a, 8);
	memcpy(key + 8, &b, 8);
}

static uint64_t key_index(const uint8_t *key)
{
	uint64_t a;

	memcpy(&a, key, 8);
	return a;
}

/* Length for key i: a spread of aligned and unaligned sizes, up to
 * MAX_LEN; keys 1000..1999 stay within 4 KiB (small enough for holes). */
static size_t len_of(uint64_t i)
{
	size_t max = i / 1000 % 2 ? 4096 : MAX_LEN;
	uint64_t s = i * 7919 + 1;
	uint64_t r = kv_test_rand(&s);

	switch (r % 4) {
	case 0:
		return 4096 * (1 + r / 4 % 8);
	case 1:
		return 1 + r / 4 % 5000;
	default:
		return 1 + r / 4 % max;
	}
}

static void fill(uint8_t *p, size_t n, uint64_t seed)
{
	size_t i = 0;

	seed ^= 0xabcdef;
	for (; i + 8 <= n; i += 8) {
		uint64_t v = kv_test_rand(&seed);

		memcpy(p + i, &v, 8);
	}
	for (; i < n; i++)
		p[i] = (uint8_t)kv_test_rand(&seed);
}

struct st {
	struct kv_store *s;
	struct kv_registry *reg;
	char dir[4096];
};

static void cfg_init(struct kv_store_config *cfg, const char *dir, struct kv_registry *reg)
{
	kv_store_config_default(cfg);
	cfg->dir = dir;
	cfg->identity = g_identity;
	cfg->identity_len = sizeof(g_identity);
	cfg->registry = reg;
}

static void st_open_cfg(struct st *t, struct kv_store_config *cfg)
{
	if (!t->reg)
		kv_assert_ok(kv_registry_create(NULL, &t->reg));
	cfg->registry = t->reg;
	cfg->dir = t->dir;
	kv_assert_ok(kv_store_open(cfg, &t->s));
	kv_assert_ok(kv_store_validate(t->s));
	assert_int_equal(kv_io_backend(kv_store_engine(t->s)), g_be->b);
}

static void st_open(struct st *t, enum kv_store_sync sync)
{
	struct kv_store_config cfg;

	cfg_init(&cfg, t->dir, NULL);
	cfg.sync = sync;
	st_open_cfg(t, &cfg);
}

/* The registry holds the store's used bytes, as tier SSD, kind KV. */
static void check_registry(struct st *t)
{
	struct kv_store_stats s;
	uint64_t b;

	kv_store_stats(t->s, &s);
	kv_assert_ok(kv_registry_bytes(t->reg, KV_TIER_SSD, KV_ANY, KV_KIND_KV, &b));
	assert_int_equal(b, s.used_bytes);
}

static void st_close(struct st *t)
{
	kv_assert_ok(kv_store_validate(t->s));
	check_registry(t);
	kv_assert_ok(kv_store_close(t->s));
	t->s = NULL;
}

static void st_finish(struct st *t)
{
	if (t->s)
		st_close(t);
	/* The store's record and its engine's staging are gone. */
	kv_assert_ok(kv_registry_destroy(t->reg, 0));
	t->reg = NULL;
	kv_test_rmtree(t->dir);
}

static void st_init(struct st *t, const char *tag)
{
	be_require();
	memset(t, 0, sizeof(*t));
	kv_test_mkdtemp(t->dir, sizeof(t->dir), tag);
}

static void put_i(struct st *t, uint64_t i, struct kv_store_extent *out)
{
	uint8_t key[16];
	size_t n = len_of(i);
	uint8_t *buf = malloc(n);

	assert_non_null(buf);
	make_key(i, key);
	fill(buf, n, i);
	kv_assert_ok(kv_store_put(t->s, key, sizeof(key), buf, n, out));
	free(buf);
}

/* Read an extent and check it holds what its key implies. */
static void check_ext(struct kv_store *s, const struct kv_store_extent *e)
{
	uint64_t i = key_index(e->key);
	uint8_t *got = malloc(e->len), *want = malloc(e->len);

	assert_non_null(got);
	assert_non_null(want);
	assert_int_equal(e->key_len, 16);
	kv_assert_ok(kv_store_get(s, e, got));
	fill(want, e->len, i);
	assert_int_equal(e->len, len_of(i));
	assert_memory_equal(got, want, e->len);
	free(got);
	free(want);
}

struct walk {
	struct kv_store *s;
	size_t n;
};

static int check_cb(void *ctx, const struct kv_store_extent *e)
{
	struct walk *w = ctx;

	check_ext(w->s, e);
	w->n++;
	return 0;
}

/* Read back every extent the store lists; returns how many. */
static size_t check_all(struct kv_store *s)
{
	struct walk w = { s, 0 };

	kv_assert_ok(kv_store_foreach(s, check_cb, &w));
	return w.n;
}

/* ---- Restart -------------------------------------------------------------- */

static void test_restart(void **state)
{
	struct kv_store_extent *ext = calloc(1200, sizeof(*ext));
	struct kv_store_stats s1, s2;
	struct st t;

	(void)state;
	st_init(&t, "store-restart");
	st_open(&t, KV_STORE_SYNC_NONE);
	for (uint64_t i = 0; i < 1000; i++)
		put_i(&t, i, &ext[i]);
	kv_store_stats(t.s, &s1);
	assert_int_equal(s1.extents, 1000);
	assert_int_equal(s1.puts, 1000);
	assert_true(s1.live_bytes > 0 && s1.used_bytes >= s1.live_bytes);
	for (uint64_t i = 0; i < 1000; i++)
		assert_int_equal(ext[i].offset % s1.align, 0);
	st_close(&t);

	st_open(&t, KV_STORE_SYNC_EVERY);
	kv_store_stats(t.s, &s2);
	assert_int_equal(s2.extents, 1000);
	assert_int_equal(s2.live_bytes, s1.live_bytes);
	assert_int_equal(check_all(t.s), 1000);
	for (uint64_t i = 0; i < 1000; i++) {
		struct kv_store_extent e;
		uint8_t key[16];

		make_key(i, key);
		kv_assert_ok(kv_store_lookup(t.s, key, 16, &e));
		assert_memory_equal(&e, &ext[i], sizeof(e));
	}
	check_registry(&t);

	/* Delete every other extent, and put smaller ones: they fit the
	 * holes, so the file does not grow. */
	for (uint64_t i = 0; i < 1000; i += 2)
		kv_assert_ok(kv_store_delete(t.s, &ext[i]));
	assert_int_equal(kv_store_delete(t.s, &ext[0]), -ENOENT);
	assert_int_equal(kv_store_get(t.s, &ext[0], NULL), -EINVAL);
	kv_assert_ok(kv_store_validate(t.s));
	for (uint64_t i = 1000; i < 1200; i++)
		put_i(&t, i, &ext[i]);
	kv_store_stats(t.s, &s2);
	assert_int_equal(s2.file_bytes, s1.file_bytes);
	assert_int_equal(s2.extents, 700);
	st_close(&t);

	st_open(&t, KV_STORE_SYNC_EVERY);
	assert_int_equal(check_all(t.s), 700);
	{
		uint8_t key[16];
		struct kv_store_extent e;
		uint8_t *buf = malloc(ext[2].len);

		make_key(2, key);
		assert_int_equal(kv_store_lookup(t.s, key, 16, &e), -ENOENT);
		/* A stale extent is refused, not read from reused space. */
		assert_int_equal(kv_store_get(t.s, &ext[2], buf), -ENOENT);
		free(buf);
	}
	st_finish(&t);
	free(ext);
}

/* Replacing a key frees the old extent's space; the index says the later
 * put wins after a restart. */
static void test_replace(void **state)
{
	struct kv_store_extent a, b, e;
	uint8_t key[16], buf[5000];
	struct st t;

	(void)state;
	st_init(&t, "store-replace");
	st_open(&t, KV_STORE_SYNC_EVERY);
	make_key(7, key);
	memset(buf, 1, sizeof(buf));
	kv_assert_ok(kv_store_put(t.s, key, 16, buf, sizeof(buf), &a));
	memset(buf, 2, sizeof(buf));
	kv_assert_ok(kv_store_put(t.s, key, 16, buf, sizeof(buf), &b));
	assert_true(b.id > a.id);
	assert_int_equal(kv_store_get(t.s, &a, buf), -ENOENT);
	st_close(&t);
	st_open(&t, KV_STORE_SYNC_EVERY);
	kv_assert_ok(kv_store_lookup(t.s, key, 16, &e));
	assert_int_equal(e.id, b.id);
	kv_assert_ok(kv_store_get(t.s, &e, buf));
	assert_int_equal(buf[0], 2);
	assert_int_equal(buf[4999], 2);
	st_close(&t);

	/* Over a thousand replacements: the reopen compacts the index down
	 * to the one live record, and the extent still reads back. */
	st_open(&t, KV_STORE_SYNC_NONE);
	for (int i = 0; i < 1100; i++) {
		memset(buf, i & 0xff, sizeof(buf));
		kv_assert_ok(kv_store_put(t.s, key, 16, buf, sizeof(buf), &b));
	}
	st_close(&t);
	st_open(&t, KV_STORE_SYNC_EVERY);
	{
		struct kv_store_stats s;

		kv_store_stats(t.s, &s);
		assert_int_equal(s.index_records, 1);
		assert_int_equal(s.extents, 1);
	}
	kv_assert_ok(kv_store_lookup(t.s, key, 16, &e));
	assert_int_equal(e.id, b.id);
	kv_assert_ok(kv_store_get(t.s, &e, buf));
	assert_int_equal(buf[4999], 1099 & 0xff);
	st_close(&t);
	st_open(&t, KV_STORE_SYNC_EVERY);
	assert_int_equal(kv_store_lookup(t.s, key, 16, &e), 0);
	st_finish(&t);
}

/* ---- Crash ---------------------------------------------------------------- */

/* The child: put keys from `first` on, forever, deleting now and then so
 * space is reused; killed by the parent. */
static void crash_child(const char *dir, uint64_t first)
{
	struct kv_store_config cfg;
	struct kv_store *s;
	struct kv_store_extent prev = { 0 };
	uint8_t *buf = malloc(MAX_LEN);

	cfg_init(&cfg, dir, NULL);
	cfg.sync = KV_STORE_SYNC_EVERY;
	if (!buf || kv_store_open(&cfg, &s))
		_exit(2);
	if (kv_io_backend(kv_store_engine(s)) != g_be->b)
		_exit(5);
	for (uint64_t i = first;; i++) {
		struct kv_store_extent e;
		uint8_t key[16];
		size_t n = len_of(i);

		make_key(i, key);
		fill(buf, n, i);
		if (kv_store_put(s, key, 16, buf, n, &e))
			_exit(3);
		if (i % 3 == 0 && prev.id && kv_store_delete(s, &prev))
			_exit(4);
		prev = e;
	}
}

static void test_crash(void **state)
{
	uint64_t rng = 20240607, first = 0;
	size_t last = 0;
	struct st t;

	(void)state;
	st_init(&t, "store-crash");
	for (int round = 0; round < 8; round++) {
		long delay_us = 5000 + (long)(kv_test_rand(&rng) % 60000);
		struct timespec ts = { 0, delay_us * 1000 };
		int status;
		pid_t pid;

		fflush(NULL);
		pid = fork();
		assert_true(pid >= 0);
		if (pid == 0)
			crash_child(t.dir, first);
		nanosleep(&ts, NULL);
		kill(pid, SIGKILL);
		assert_int_equal(waitpid(pid, &status, 0), pid);
		if (!WIFSIGNALED(status))
			fail_msg("round %d: child exited with %d before the kill", round,
				 WEXITSTATUS(status));
		st_open(&t, KV_STORE_SYNC_EVERY);
		last = check_all(t.s);
		st_close(&t);
		first += 100000;
	}
	/* The rounds did put something that stayed. */
	printf("crash: %zu extents listed after the last round\n", last);
	st_finish(&t);
}

/* ---- Faults --------------------------------------------------------------- */

static void test_enospc_capacity(void **state)
{
	struct kv_store_config cfg;
	struct kv_store_extent e[5];
	uint8_t *buf = malloc(256 * KiB), *copy = malloc(256 * KiB);
	uint8_t key[16];
	struct kv_store_stats s;
	struct st t;

	(void)state;
	st_init(&t, "store-enospc");
	cfg_init(&cfg, t.dir, NULL);
	cfg.capacity = 1024 * KiB;
	st_open_cfg(&t, &cfg);
	fill(buf, 256 * KiB, 1);
	memcpy(copy, buf, 256 * KiB);
	for (int i = 0; i < 4; i++) {
		make_key((uint64_t)i, key);
		kv_assert_ok(kv_store_put(t.s, key, 16, buf, 256 * KiB, &e[i]));
	}
	make_key(4, key);
	assert_int_equal(kv_store_put(t.s, key, 16, buf, 256 * KiB, &e[4]), -ENOSPC);
	assert_non_null(strstr(kv_last_error(), "capacity"));
	assert_memory_equal(buf, copy, 256 * KiB);
	kv_store_stats(t.s, &s);
	assert_int_equal(s.extents, 4);
	assert_int_equal(s.free_bytes, 0);
	assert_int_equal(s.put_errors, 1);
	kv_assert_ok(kv_store_validate(t.s));
	/* Space freed is reused. */
	kv_assert_ok(kv_store_delete(t.s, &e[1]));
	kv_assert_ok(kv_store_put(t.s, key, 16, buf, 256 * KiB, &e[4]));
	assert_int_equal(e[4].offset, e[1].offset);
	memset(copy, 0, 256 * KiB);
	kv_assert_ok(kv_store_get(t.s, &e[4], copy));
	assert_memory_equal(buf, copy, 256 * KiB);
	st_finish(&t);
	free(buf);
	free(copy);
}

static void test_enospc_seam(void **state)
{
	uint8_t *buf = malloc(100 * KiB), *copy = malloc(100 * KiB), key[16];
	struct kv_store_extent e;
	struct kv_store_stats s;
	struct st t;

	(void)state;
	st_init(&t, "store-enospc-io");
	st_open(&t, KV_STORE_SYNC_EVERY);
	put_i(&t, 1, &e);
	fill(buf, 100 * KiB, 2);
	memcpy(copy, buf, 100 * KiB);
	make_key(2, key);
	kv_io_inject(KV_IO_SEAM_WRITE, 1, ENOSPC);
	assert_int_equal(kv_store_put(t.s, key, 16, buf, 100 * KiB, &e), -ENOSPC);
	assert_non_null(strstr(kv_last_error(), "ENOSPC"));
	assert_memory_equal(buf, copy, 100 * KiB);
	kv_store_stats(t.s, &s);
	assert_int_equal(s.extents, 1);
	assert_int_equal(s.put_errors, 1);
	kv_assert_ok(kv_store_validate(t.s));
	assert_int_equal(kv_store_lookup(t.s, key, 16, &e), -ENOENT);
	/* Still usable: the retry goes through. */
	kv_assert_ok(kv_store_put(t.s, key, 16, buf, 100 * KiB, &e));
	st_close(&t);
	st_open(&t, KV_STORE_SYNC_EVERY);
	kv_store_stats(t.s, &s);
	assert_int_equal(s.extents, 2);
	kv_assert_ok(kv_store_lookup(t.s, key, 16, &e));
	memset(copy, 0, 100 * KiB);
	kv_assert_ok(kv_store_get(t.s, &e, copy));
	assert_memory_equal(buf, copy, 100 * KiB);
	st_finish(&t);
	free(buf);
	free(copy);
}

static void test_eio_read(void **state)
{
	struct kv_store_extent e;
	struct kv_store_stats s;
	uint8_t *buf;
	struct st t;

	(void)state;
	st_init(&t, "store-eio");
	st_open(&t, KV_STORE_SYNC_EVERY);
	put_i(&t, 3, &e);
	buf = malloc(e.len);
	kv_io_inject(KV_IO_SEAM_READ, 1, EIO);
	assert_int_equal(kv_store_get(t.s, &e, buf), -EIO);
	assert_non_null(strstr(kv_last_error(), "offset"));
	/* Never partial bytes: the buffer is zeroed. */
	for (size_t i = 0; i < e.len; i++)
		if (buf[i])
			fail_msg("byte %zu nonzero after a failed get", i);
	kv_store_stats(t.s, &s);
	assert_int_equal(s.get_errors, 1);
	assert_int_equal(s.checksum_failures, 0);
	check_ext(t.s, &e);
	st_finish(&t);
	free(buf);
}

/* Index appends and syncs failing: the put fails cleanly, the store goes
 * on, and a reopen sees exactly the puts that succeeded. */
static void test_index_faults(void **state)
{
	static const struct {
		unsigned op;
		unsigned nth;
	} faults[] = {
		{ KV_STORE_SEAM_LOG_WRITE, 1 },
		{ KV_STORE_SEAM_SYNC, 1 },  /* the data sync */
		{ KV_STORE_SEAM_SYNC, 2 },  /* the index sync */
	};
	struct kv_store_extent e;
	struct kv_store_stats s;
	struct st t;
	uint8_t buf[3000], key[16];

	(void)state;
	st_init(&t, "store-idx-faults");
	st_open(&t, KV_STORE_SYNC_EVERY);
	put_i(&t, 0, &e);
	memset(buf, 0x5a, sizeof(buf));
	for (size_t f = 0; f < KV_ARRAY_SIZE(faults); f++) {
		make_key(100 + f, key);
		kv_store_inject(faults[f].op, faults[f].nth, EIO);
		assert_int_equal(kv_store_put(t.s, key, 16, buf, sizeof(buf), &e), -EIO);
		assert_int_equal(kv_store_lookup(t.s, key, 16, &e), -ENOENT);
		kv_assert_ok(kv_store_validate(t.s));
	}
	/* A delete whose record fails stays live. */
	make_key(0, key);
	kv_assert_ok(kv_store_lookup(t.s, key, 16, &e));
	kv_store_inject(KV_STORE_SEAM_LOG_WRITE, 1, ENOSPC);
	assert_int_equal(kv_store_delete(t.s, &e), -ENOSPC);
	check_ext(t.s, &e);
	put_i(&t, 1, &e);
	kv_store_stats(t.s, &s);
	assert_int_equal(s.extents, 2);
	assert_int_equal(s.put_errors, 3);
	st_close(&t);
	st_open(&t, KV_STORE_SYNC_EVERY);
	assert_int_equal(check_all(t.s), 2);
	kv_store_stats(t.s, &s);
	assert_int_equal(s.index_records, 2);
	st_finish(&t);
}

static void test_flipped_byte(void **state)
{
	struct kv_store_extent e[3];
	struct kv_store_stats s;
	char path[4300];
	uint8_t b, *buf;
	struct st t;
	int fd;

	(void)state;
	st_init(&t, "store-flip");
	st_open(&t, KV_STORE_SYNC_EVERY);
	for (uint64_t i = 0; i < 3; i++)
		put_i(&t, i, &e[i]);
	st_close(&t);

	snprintf(path, sizeof(path), "%s/store.data", t.dir);
	fd = open(path, O_RDWR);
	assert_true(fd >= 0);
	assert_int_equal(pread(fd, &b, 1, (off_t)(e[1].offset + e[1].len / 2)), 1);
	b ^= 0x10;
	assert_int_equal(pwrite(fd, &b, 1, (off_t)(e[1].offset + e[1].len / 2)), 1);
	close(fd);

	st_open(&t, KV_STORE_SYNC_EVERY);
	buf = malloc(e[1].len);
	assert_int_equal(kv_store_get(t.s, &e[1], buf), -EBADMSG);
	{
		char want[64];

		snprintf(want, sizeof(want), "offset %" PRIu64, e[1].offset);
		assert_non_null(strstr(kv_last_error(), want));
		assert_non_null(strstr(kv_last_error(), "checksum"));
		/* The key, in hex: its first byte is 01. */
		assert_non_null(strstr(kv_last_error(), "key 0100000000000000"));
	}
	for (size_t i = 0; i < e[1].len; i++)
		if (buf[i])
			fail_msg("corrupt byte %zu handed to the caller", i);
	kv_store_stats(t.s, &s);
	assert_int_equal(s.checksum_failures, 1);
	check_ext(t.s, &e[0]);
	check_ext(t.s, &e[2]);
	st_finish(&t);
	free(buf);
}

static void idx_path(const struct st *t, char *buf, size_t len)
{
	snprintf(buf, len, "%s/store.idx", t->dir);
}

static void test_truncated_index(void **state)
{
	struct kv_store_config cfg;
	struct kv_store_extent e;
	struct kv_store *s = NULL;
	struct stat sb;
	char path[4300];
	struct st t;

	(void)state;
	st_init(&t, "store-trunc");
	st_open(&t, KV_STORE_SYNC_EVERY);
	for (uint64_t i = 0; i < 10; i++)
		put_i(&t, i, &e);
	st_close(&t);
	idx_path(&t, path, sizeof(path));
	assert_int_equal(stat(path, &sb), 0);
	/* A torn last record: dropped, the other nine read back. */
	assert_int_equal(truncate(path, sb.st_size - 30), 0);
	st_open(&t, KV_STORE_SYNC_EVERY);
	assert_int_equal(check_all(t.s), 9);
	put_i(&t, 20, &e);
	st_close(&t);
	st_open(&t, KV_STORE_SYNC_EVERY);
	assert_int_equal(check_all(t.s), 10);
	st_close(&t);

	/* A corrupt record in the middle: everything from there dropped. */
	{
		int fd = open(path, O_RDWR);
		uint8_t junk[8] = { 1, 2, 3, 4, 5, 6, 7, 8 };

		assert_true(fd >= 0);
		assert_int_equal(pwrite(fd, junk, 8, 512 + 80 * 5 + 20), 8);
		close(fd);
	}
	st_open(&t, KV_STORE_SYNC_EVERY);
	assert_int_equal(check_all(t.s), 5);
	kv_assert_ok(kv_store_validate(t.s));
	st_close(&t);

	/* Cut into the header: refused, nothing changed. */
	assert_int_equal(truncate(path, 100), 0);
	cfg_init(&cfg, t.dir, t.reg);
	assert_int_equal(kv_store_open(&cfg, &s), -EBADMSG);
	assert_null(s);
	assert_non_null(strstr(kv_last_error(), "store.idx"));
	assert_int_equal(stat(path, &sb), 0);
	assert_int_equal(sb.st_size, 100);
	st_finish(&t);
}

static void test_garbage_index(void **state)
{
	struct kv_store_config cfg;
	struct kv_store_extent e;
	struct kv_store *s = NULL;
	uint8_t junk[4096];
	uint64_t rng = 5;
	char path[4300];
	struct st t;
	int fd;

	(void)state;
	st_init(&t, "store-garbage");
	st_open(&t, KV_STORE_SYNC_EVERY);
	put_i(&t, 1, &e);
	st_close(&t);
	idx_path(&t, path, sizeof(path));
	fill(junk, sizeof(junk), rng);
	fd = open(path, O_WRONLY | O_TRUNC);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, junk, sizeof(junk)), (ssize_t)sizeof(junk));
	close(fd);
	cfg_init(&cfg, t.dir, t.reg);
	assert_int_equal(kv_store_open(&cfg, &s), -EBADMSG);
	assert_null(s);
	assert_non_null(strstr(kv_last_error(), "not a store file"));

	/* An empty index file, and a missing one: refused too. */
	fd = open(path, O_WRONLY | O_TRUNC);
	close(fd);
	assert_int_equal(kv_store_open(&cfg, &s), -EBADMSG);
	unlink(path);
	assert_int_equal(kv_store_open(&cfg, &s), -EBADMSG);
	assert_non_null(strstr(kv_last_error(), "without"));
	st_finish(&t);
}

static void test_identity(void **state)
{
	struct kv_store_config cfg;
	struct kv_store_extent e;
	struct kv_store *s = NULL;
	struct stat sb;
	char path[4300];
	struct st t;

	(void)state;
	st_init(&t, "store-ident");
	st_open(&t, KV_STORE_SYNC_EVERY);
	put_i(&t, 1, &e);
	st_close(&t);
	cfg_init(&cfg, t.dir, t.reg);
	cfg.identity = "model=other";
	cfg.identity_len = 11;
	assert_int_equal(kv_store_open(&cfg, &s), -ESTALE);
	assert_null(s);
	assert_non_null(strstr(kv_last_error(), "identity"));
	/* The files were created 0600, and are untouched: the right
	 * identity still opens the store. */
	snprintf(path, sizeof(path), "%s/store.data", t.dir);
	assert_int_equal(stat(path, &sb), 0);
	assert_int_equal(sb.st_mode & 0777, 0600);
	idx_path(&t, path, sizeof(path));
	assert_int_equal(stat(path, &sb), 0);
	assert_int_equal(sb.st_mode & 0777, 0600);
	st_open(&t, KV_STORE_SYNC_EVERY);
	assert_int_equal(check_all(t.s), 1);
	/* A second opener is refused while the first holds it. */
	cfg_init(&cfg, t.dir, t.reg);
	assert_int_equal(kv_store_open(&cfg, &s), -EBUSY);
	st_finish(&t);
}

static void test_bad_input(void **state)
{
	struct kv_store_config cfg;
	struct kv_store_extent e;
	struct kv_store *s = NULL;
	uint8_t key[40] = { 1 }, buf[16] = { 0 };
	struct st t;

	(void)state;
	st_init(&t, "store-bad");
	cfg_init(&cfg, t.dir, NULL);
	cfg.identity_len = 0;
	assert_int_equal(kv_store_open(&cfg, &s), -EINVAL);
	cfg_init(&cfg, NULL, NULL);
	assert_int_equal(kv_store_open(&cfg, &s), -EINVAL);
	cfg_init(&cfg, t.dir, NULL);
	cfg.sync = KV_STORE_SYNC_BATCHED;
	cfg.sync_every = 0;
	assert_int_equal(kv_store_open(&cfg, &s), -EINVAL);
	assert_null(s);
	st_open(&t, KV_STORE_SYNC_EVERY);
	assert_int_equal(kv_store_put(t.s, key, 0, buf, 16, &e), -EINVAL);
	assert_int_equal(kv_store_put(t.s, key, 33, buf, 16, &e), -EINVAL);
	assert_int_equal(kv_store_put(t.s, key, 32, buf, 0, &e), -EINVAL);
	assert_int_equal(kv_store_put(t.s, key, 32, NULL, 16, &e), -EINVAL);
	kv_assert_ok(kv_store_put(t.s, key, 32, buf, 16, &e));
	assert_int_equal(kv_store_lookup(t.s, key, 31, &e), -ENOENT);
	assert_int_equal(kv_store_close(NULL), 0);
	st_finish(&t);
}

/* ---- Asynchronous --------------------------------------------------------- */

struct async_state {
	atomic_uint done, errors;
	struct kv_store_extent ext[64];
	uint8_t *bufs[64];
};

static void on_put(void *ctx, int result, const struct kv_store_extent *e)
{
	struct async_state *a = ctx;
	uint64_t i;

	if (result) {
		atomic_fetch_add(&a->errors, 1);
		return;
	}
	i = key_index(e->key);
	a->ext[i] = *e;
	/* The write completed and the extent is indexed: the DRAM copy may
	 * go now, as the KV cache will do. */
	free(a->bufs[i]);
	a->bufs[i] = NULL;
	atomic_fetch_add(&a->done, 1);
}

static void on_get(void *ctx, int result, const struct kv_store_extent *e)
{
	struct async_state *a = ctx;

	if (result)
		atomic_fetch_add(&a->errors, 1);
	atomic_fetch_add(&a->done, 1);
}

static void wait_done(struct async_state *a, unsigned n)
{
	while (atomic_load(&a->done) < n) {
		struct timespec ts = { 0, 200000 };

		nanosleep(&ts, NULL);
	}
}

static void test_async(void **state)
{
	static struct async_state a;
	struct st t;

	(void)state;
	memset(&a, 0, sizeof(a));
	st_init(&t, "store-async");
	st_open(&t, KV_STORE_SYNC_BATCHED);
	for (uint64_t i = 0; i < 64; i++) {
		uint8_t key[16];
		size_t n = len_of(i);

		a.bufs[i] = malloc(n);
		fill(a.bufs[i], n, i);
		make_key(i, key);
		kv_assert_ok(kv_store_put_async(t.s, key, 16, a.bufs[i], n, on_put, &a));
	}
	wait_done(&a, 64);
	assert_int_equal(atomic_load(&a.errors), 0);
	atomic_store(&a.done, 0);
	for (uint64_t i = 0; i < 64; i++) {
		a.bufs[i] = malloc(a.ext[i].len);
		kv_assert_ok(kv_store_get_async(t.s, &a.ext[i], a.bufs[i], on_get, &a));
	}
	wait_done(&a, 64);
	assert_int_equal(atomic_load(&a.errors), 0);
	for (uint64_t i = 0; i < 64; i++) {
		uint8_t *want = malloc(a.ext[i].len);

		fill(want, a.ext[i].len, i);
		assert_memory_equal(a.bufs[i], want, a.ext[i].len);
		free(want);
		free(a.bufs[i]);
	}
	kv_assert_ok(kv_store_sync(t.s));
	st_close(&t);
	st_open(&t, KV_STORE_SYNC_NONE);
	assert_int_equal(check_all(t.s), 64);
	st_finish(&t);
}

/* ---- Threads -------------------------------------------------------------- */

#define THREADS 4
#define PER_THREAD 150

struct worker {
	struct kv_store *s;
	unsigned id;
	int failures;
};

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct kv_store_extent own[PER_THREAD];
	uint8_t *buf = malloc(MAX_LEN), *got = malloc(MAX_LEN);
	uint64_t rng = w->id;

	for (unsigned k = 0; k < PER_THREAD; k++) {
		uint64_t i = (uint64_t)w->id * 1000000 + k;
		size_t n = len_of(i);
		uint8_t key[16];

		make_key(i, key);
		fill(buf, n, i);
		if (kv_store_put(w->s, key, 16, buf, n, &own[k]))
			w->failures++;
		/* Read back a random earlier one; delete some. */
		unsigned j = (unsigned)(kv_test_rand(&rng) % (k + 1));

		if (own[j].id && kv_store_get(w->s, &own[j], got) == 0) {
			fill(buf, own[j].len, key_index(own[j].key));
			if (memcmp(buf, got, own[j].len))
				w->failures++;
		}
		if (k % 4 == 3 && own[j].id) {
			if (kv_store_delete(w->s, &own[j]))
				w->failures++;
			own[j].id = 0;
		}
	}
	free(buf);
	free(got);
	return NULL;
}

static void test_threads(void **state)
{
	struct worker w[THREADS];
	pthread_t th[THREADS];
	struct kv_store_stats s;
	struct st t;
	size_t n;

	(void)state;
	st_init(&t, "store-threads");
	st_open(&t, KV_STORE_SYNC_NONE);
	for (unsigned i = 0; i < THREADS; i++) {
		w[i] = (struct worker){ .s = t.s, .id = i + 1 };
		assert_int_equal(pthread_create(&th[i], NULL, worker_main, &w[i]), 0);
	}
	for (unsigned i = 0; i < THREADS; i++) {
		pthread_join(th[i], NULL);
		assert_int_equal(w[i].failures, 0);
	}
	kv_assert_ok(kv_store_validate(t.s));
	kv_store_stats(t.s, &s);
	assert_int_equal(s.puts, THREADS * PER_THREAD);
	assert_int_equal(s.extents, s.puts - s.deletes);
	st_close(&t);
	st_open(&t, KV_STORE_SYNC_NONE);
	n = check_all(t.s);
	assert_int_equal(n, s.extents);
	st_finish(&t);
}

/* ---- Review fixes ----------------------------------------------------------- */

/* A buffered store (tmpfs has no O_DIRECT here) pads each extent's tail
 * to its allocation as O_DIRECT does, so the file always covers the
 * newest extent: it survives a reopen, and its space is not handed out
 * again to overlap a stale record. */
static void test_buffered_tail(void **state)
{
	struct kv_store_extent e[3];
	struct kv_store_stats s;
	uint8_t buf[100], key[16];
	struct stat sb;
	struct st t;

	(void)state;
	be_require();
	if (stat("/dev/shm", &sb) || !S_ISDIR(sb.st_mode)) {
		print_message("skip: /dev/shm missing: no tmpfs to test buffered I/O on\n");
		skip();
	}
	memset(&t, 0, sizeof(t));
	snprintf(t.dir, sizeof(t.dir), "/dev/shm/libkv-store-shm-XXXXXX");
	if (!mkdtemp(t.dir)) {
		print_message("skip: /dev/shm not writable\n");
		skip();
	}
	st_open(&t, KV_STORE_SYNC_EVERY);
	kv_store_stats(t.s, &s);
	if (s.direct)
		print_message("note: /dev/shm takes O_DIRECT here; buffered path not exercised\n");
	memset(buf, 0x77, sizeof(buf));
	make_key(1, key);
	kv_assert_ok(kv_store_put(t.s, key, sizeof(key), buf, sizeof(buf), &e[0]));
	st_close(&t);
	st_open(&t, KV_STORE_SYNC_EVERY);
	kv_store_stats(t.s, &s);
	assert_int_equal(s.extents, 1);
	{
		uint8_t got[100];

		kv_assert_ok(kv_store_get(t.s, &e[0], got));
		assert_memory_equal(got, buf, sizeof(buf));
	}
	/* A second put goes after it, not over it. */
	make_key(2, key);
	kv_assert_ok(kv_store_put(t.s, key, sizeof(key), buf, sizeof(buf), &e[1]));
	assert_true(e[1].offset >= e[0].offset + s.align);
	st_close(&t);
	st_open(&t, KV_STORE_SYNC_EVERY);
	kv_store_stats(t.s, &s);
	assert_int_equal(s.extents, 2);
	kv_assert_ok(kv_store_get(t.s, &e[0], buf));
	kv_assert_ok(kv_store_get(t.s, &e[1], buf));
	st_finish(&t);
}

/* Ids stay unique across compaction: it drops delete records and dead
 * puts, yet a reopen after it must not hand out an old id again, and an
 * old handle must not read a later put's bytes. */
static void test_ids_after_compaction(void **state)
{
	struct kv_store_extent b, a0, a, a2;
	struct kv_store_stats s;
	uint8_t buf[200], got[200], key_a[16], key_b[16];
	struct st t;

	(void)state;
	st_init(&t, "store-ids");
	st_open(&t, KV_STORE_SYNC_NONE);
	make_key(1, key_b);
	make_key(2, key_a);
	memset(buf, 0xb0, sizeof(buf));
	kv_assert_ok(kv_store_put(t.s, key_b, 16, buf, sizeof(buf), &b));
	for (int i = 0; i < 1100; i++) {
		memset(buf, i & 0xff, sizeof(buf));
		kv_assert_ok(kv_store_put(t.s, key_a, 16, buf, sizeof(buf), &a));
		if (!i)
			a0 = a;
	}
	kv_assert_ok(kv_store_delete(t.s, &a));
	st_close(&t);
	st_open(&t, KV_STORE_SYNC_NONE);        /* compacts to the one put of B */
	kv_store_stats(t.s, &s);
	assert_int_equal(s.index_records, 1);
	st_close(&t);
	st_open(&t, KV_STORE_SYNC_NONE);
	memset(buf, 0xee, sizeof(buf));
	kv_assert_ok(kv_store_put(t.s, key_a, 16, buf, sizeof(buf), &a2));
	assert_true(a2.id > a.id);
	assert_int_equal(kv_store_get(t.s, &a0, got), -ENOENT);
	assert_int_equal(kv_store_get(t.s, &a, got), -ENOENT);
	kv_assert_ok(kv_store_get(t.s, &a2, got));
	assert_memory_equal(got, buf, sizeof(buf));
	st_close(&t);
	/* The mark survives a reopen without compaction too. */
	st_open(&t, KV_STORE_SYNC_NONE);
	kv_assert_ok(kv_store_put(t.s, key_b, 16, buf, sizeof(buf), &b));
	assert_true(b.id > a2.id);
	st_finish(&t);
}

/* A handle whose checksum (or length) differs from the live extent's is
 * not that extent: refused, not read. */
static void test_handle_checksum(void **state)
{
	struct kv_store_extent e, bad;
	uint8_t buf[300];
	struct st t;

	(void)state;
	st_init(&t, "store-handle");
	st_open(&t, KV_STORE_SYNC_NONE);
	memset(buf, 0x31, sizeof(buf));
	kv_assert_ok(kv_store_put(t.s, "k", 1, buf, sizeof(buf), &e));
	bad = e;
	bad.checksum ^= 1;
	assert_int_equal(kv_store_get(t.s, &bad, buf), -ENOENT);
	assert_int_equal(kv_store_delete(t.s, &bad), -ENOENT);
	bad = e;
	bad.len--;
	assert_int_equal(kv_store_get(t.s, &bad, buf), -ENOENT);
	kv_assert_ok(kv_store_get(t.s, &e, buf));
	st_finish(&t);
}

static void read_file_all(const char *path, uint8_t **buf, size_t *len)
{
	struct stat sb;
	int fd = open(path, O_RDONLY);

	assert_true(fd >= 0);
	assert_int_equal(fstat(fd, &sb), 0);
	*len = (size_t)sb.st_size;
	*buf = malloc(*len);
	assert_non_null(*buf);
	assert_int_equal(pread(fd, *buf, *len, 0), (ssize_t)*len);
	close(fd);
}

static void write_file_all(const char *path, const uint8_t *buf, size_t len)
{
	int fd = open(path, O_WRONLY | O_TRUNC);

	assert_true(fd >= 0);
	assert_int_equal(pwrite(fd, buf, len, 0), (ssize_t)len);
	close(fd);
}

/* With BATCHED and NONE, the space of a replaced or deleted extent is not
 * reused before the record retiring it is synced: a power loss (simulated
 * by putting back the index as of the last kv_store_sync) keeps the synced
 * versions readable. */
static void test_power_loss_reuse(void **state)
{
	static const enum kv_store_sync pol[] = { KV_STORE_SYNC_BATCHED, KV_STORE_SYNC_NONE };
	uint8_t *snap, v1[5000], v2[5000], got[5000];
	struct kv_store_extent a, b, e;
	struct kv_store_config cfg;
	char path[4300];
	size_t snap_len;
	struct st t;

	(void)state;
	for (size_t p = 0; p < KV_ARRAY_SIZE(pol); p++) {
		st_init(&t, "store-powerloss");
		cfg_init(&cfg, t.dir, NULL);
		cfg.sync = pol[p];
		cfg.sync_every = 1000;
		st_open_cfg(&t, &cfg);
		memset(v1, 0x11, sizeof(v1));
		memset(v2, 0x22, sizeof(v2));
		kv_assert_ok(kv_store_put(t.s, "a", 1, v1, sizeof(v1), &a));
		kv_assert_ok(kv_store_put(t.s, "b", 1, v1, sizeof(v1), &b));
		kv_assert_ok(kv_store_sync(t.s));
		idx_path(&t, path, sizeof(path));
		read_file_all(path, &snap, &snap_len);
		/* Replace a, delete b, then new puts that would take their
		 * space. */
		kv_assert_ok(kv_store_put(t.s, "a", 1, v2, sizeof(v2), &e));
		kv_assert_ok(kv_store_delete(t.s, &b));
		kv_assert_ok(kv_store_validate(t.s));
		kv_assert_ok(kv_store_put(t.s, "c", 1, v2, sizeof(v2), &e));
		assert_true(e.offset != a.offset && e.offset != b.offset);
		kv_assert_ok(kv_store_put(t.s, "d", 1, v2, sizeof(v2), &e));
		assert_true(e.offset != a.offset && e.offset != b.offset);
		kv_assert_ok(kv_store_validate(t.s));
		st_close(&t);

		/* The power loss: back to the index of the last sync, where
		 * the synced a and b must read intact. */
		write_file_all(path, snap, snap_len);
		free(snap);
		st_open_cfg(&t, &cfg);
		kv_assert_ok(kv_store_get(t.s, &a, got));
		assert_memory_equal(got, v1, sizeof(v1));
		kv_assert_ok(kv_store_get(t.s, &b, got));
		assert_memory_equal(got, v1, sizeof(v1));

		/* Once a sync made the replacement durable, the space is
		 * reused. */
		kv_assert_ok(kv_store_put(t.s, "a", 1, v2, sizeof(v2), &e));
		kv_assert_ok(kv_store_sync(t.s));
		kv_assert_ok(kv_store_validate(t.s));
		kv_assert_ok(kv_store_put(t.s, "e", 1, v2, sizeof(v2), &e));
		assert_int_equal(e.offset, a.offset);
		st_finish(&t);
	}
}

/* Put n bytes of v under the one-byte key k. */
static void put_v(struct st *t, char k, uint8_t v, uint8_t *buf, size_t n,
		  struct kv_store_extent *out)
{
	memset(buf, v, n);
	kv_assert_ok(kv_store_put(t->s, &k, 1, buf, n, out));
}

static void check_v(struct st *t, const struct kv_store_extent *e, uint8_t v, uint8_t *got)
{
	kv_assert_ok(kv_store_get(t->s, e, got));
	for (size_t i = 0; i < e->len; i++)
		assert_int_equal(got[i], v);
}

/* With SYNC_NONE and no kv_store_sync() calls, the space of replaced and
 * deleted extents is held only up to the limit: the store then syncs on
 * its own (after a put's batch, or in the delete that passed the limit)
 * and reuses it, so the data file stays bounded while 50 times the live
 * bytes are written. Then a power loss right after a sync made by a
 * delete: the index as of that sync lists only intact extents, although
 * puts and replacements followed. */
static void test_held_bounded(void **state)
{
	enum { KEYS = 8, EXT = 32 * 1024, ROUNDS = 400 };
	const uint64_t limit = KEYS * EXT;
	struct kv_store_extent e[KEYS], x[KEYS], z;
	struct kv_store_config cfg;
	uint8_t *buf = malloc(EXT), *got = malloc(EXT), *snap;
	uint64_t bound, written = 0;
	char dpath[4300], ipath[4300];
	size_t snap_len;
	struct stat sb;
	struct st t;

	(void)state;
	assert_non_null(buf);
	assert_non_null(got);
	st_init(&t, "store-held");
	cfg_init(&cfg, t.dir, NULL);
	cfg.sync = KV_STORE_SYNC_NONE;
	st_open_cfg(&t, &cfg);
	kv_store_set_held_limit(t.s, limit);
	snprintf(dpath, sizeof(dpath), "%s/store.data", t.dir);
	idx_path(&t, ipath, sizeof(ipath));

	/* Replacements (retired by the finisher) and deletes (retired by
	 * the caller), each reaching the limit on its own. */
	for (unsigned r = 0; r < ROUNDS; r++) {
		unsigned k = r % KEYS;

		if (r >= KEYS && r / KEYS % 4 == 3)
			kv_assert_ok(kv_store_delete(t.s, &e[k]));
		put_v(&t, (char)('a' + k), (uint8_t)r, buf, EXT, &e[k]);
		written += EXT;
	}
	kv_assert_ok(kv_store_validate(t.s));
	for (unsigned k = 0; k < KEYS; k++)
		check_v(&t, &e[k], (uint8_t)(ROUNDS - KEYS + k), got);
	/* Live extents, what is held (under the limit, plus the extent that
	 * passed it while the finisher syncs), and the header block. */
	bound = KEYS * EXT + limit + 2 * EXT + 64 * KiB;
	assert_int_equal(stat(dpath, &sb), 0);
	printf("held: %" PRIu64 " bytes written, data file %jd bytes (bound %" PRIu64 ")\n",
	       written, (intmax_t)sb.st_size, bound);
	assert_true((uint64_t)sb.st_size <= bound);
	assert_true(written > 10 * bound);

	/* A known sync point: from nothing held (kv_store_sync, the only
	 * call of it), 7 replacements of z stay under the limit, and the
	 * delete of z reaches it and syncs before it returns. */
	kv_assert_ok(kv_store_sync(t.s));
	for (unsigned k = 0; k < KEYS; k++)
		put_v(&t, (char)('A' + k), (uint8_t)(0x40 + k), buf, EXT, &x[k]);
	for (unsigned i = 0; i < KEYS; i++)
		put_v(&t, 'z', 0x7a, buf, EXT, &z);
	kv_assert_ok(kv_store_delete(t.s, &z));
	read_file_all(ipath, &snap, &snap_len);
	/* After it, under the limit again: 7 replacements and new puts,
	 * which must not take the space of the extents the snapshot lists. */
	for (unsigned k = 0; k + 1 < KEYS; k++)
		put_v(&t, (char)('A' + k), 0x99, buf, EXT, NULL);
	for (unsigned k = 0; k < KEYS; k++)
		put_v(&t, (char)('0' + k), 0x98, buf, EXT, NULL);
	kv_assert_ok(kv_store_validate(t.s));
	st_close(&t);
	write_file_all(ipath, snap, snap_len);
	free(snap);
	st_open_cfg(&t, &cfg);
	for (unsigned k = 0; k < KEYS; k++)
		check_v(&t, &x[k], (uint8_t)(0x40 + k), got);
	for (unsigned k = 0; k < KEYS; k++)
		check_v(&t, &e[k], (uint8_t)(ROUNDS - KEYS + k), got);
	free(buf);
	free(got);
	st_finish(&t);
}

/* Reopened with a capacity below the space in use: no free room (not an
 * underflow), and puts fit only in holes. */
static void test_capacity_shrunk(void **state)
{
	struct kv_store_config cfg;
	struct kv_store_extent e;
	struct kv_store_stats s;
	uint8_t buf[8192];
	struct st t;

	(void)state;
	st_init(&t, "store-shrunk");
	st_open(&t, KV_STORE_SYNC_NONE);
	memset(buf, 0x42, sizeof(buf));
	kv_assert_ok(kv_store_put(t.s, "a", 1, buf, sizeof(buf), &e));
	kv_assert_ok(kv_store_put(t.s, "b", 1, buf, sizeof(buf), &e));
	st_close(&t);
	cfg_init(&cfg, t.dir, NULL);
	cfg.capacity = 4096;
	st_open_cfg(&t, &cfg);
	kv_store_stats(t.s, &s);
	assert_int_equal(s.extents, 2);
	assert_int_equal(s.free_bytes, 0);
	assert_int_equal(kv_store_put(t.s, "c", 1, buf, sizeof(buf), NULL), -ENOSPC);
	st_finish(&t);
}

/* A creation cut short (store.data with only its header, or empty, and no
 * index) is completed by the next open rather than refused forever; an
 * index without its data file is still refused, creating nothing. */
static void test_creation_cut_short(void **state)
{
	struct kv_store_config cfg;
	struct kv_store_extent e;
	struct kv_store_stats s;
	struct kv_store *s2 = NULL;
	char dpath[4300], ipath[4300];
	uint8_t buf[1000];
	struct stat sb;
	struct st t;

	(void)state;
	st_init(&t, "store-cutshort");
	st_open(&t, KV_STORE_SYNC_EVERY);
	st_close(&t);
	snprintf(dpath, sizeof(dpath), "%s/store.data", t.dir);
	idx_path(&t, ipath, sizeof(ipath));
	assert_int_equal(unlink(ipath), 0);
	st_open(&t, KV_STORE_SYNC_EVERY);
	kv_store_stats(t.s, &s);
	assert_int_equal(s.extents, 0);
	memset(buf, 0x5c, sizeof(buf));
	kv_assert_ok(kv_store_put(t.s, "k", 1, buf, sizeof(buf), &e));
	st_close(&t);
	st_open(&t, KV_STORE_SYNC_EVERY);
	assert_int_equal(kv_store_get(t.s, &e, buf), 0);
	st_close(&t);

	/* An empty data file without an index: created afresh. */
	assert_int_equal(unlink(ipath), 0);
	assert_int_equal(truncate(dpath, 0), 0);
	st_open(&t, KV_STORE_SYNC_EVERY);
	kv_store_stats(t.s, &s);
	assert_int_equal(s.extents, 0);
	st_close(&t);

	/* An index without its data file: refused, and no data file made. */
	assert_int_equal(unlink(dpath), 0);
	cfg_init(&cfg, t.dir, t.reg);
	assert_int_equal(kv_store_open(&cfg, &s2), -EBADMSG);
	assert_non_null(strstr(kv_last_error(), "without"));
	assert_int_equal(stat(dpath, &sb), -1);
	st_finish(&t);
}

/* A failed append whose cut-back cannot be made durable (the fdatasync
 * after the ftruncate fails) leaves the store refusing writes (-EIO)
 * until reopen, while reads go on. */
static void test_cutback_sync_fails(void **state)
{
	struct kv_store_extent e, e2;
	uint8_t buf[3000], got[3000];
	struct st t;

	(void)state;
	st_init(&t, "store-cutback");
	st_open(&t, KV_STORE_SYNC_EVERY);
	memset(buf, 0x6d, sizeof(buf));
	kv_assert_ok(kv_store_put(t.s, "a", 1, buf, sizeof(buf), &e));
	kv_store_inject(KV_STORE_SEAM_LOG_WRITE, 1, EIO);
	kv_store_inject(KV_STORE_SEAM_CUTBACK, 1, EIO);
	assert_int_equal(kv_store_put(t.s, "b", 1, buf, sizeof(buf), &e2), -EIO);
	assert_int_equal(kv_store_put(t.s, "c", 1, buf, sizeof(buf), &e2), -EIO);
	assert_non_null(strstr(kv_last_error(), "reopen"));
	assert_int_equal(kv_store_delete(t.s, &e), -EIO);
	kv_assert_ok(kv_store_get(t.s, &e, got));
	assert_memory_equal(got, buf, sizeof(buf));
	st_close(&t);
	st_open(&t, KV_STORE_SYNC_EVERY);
	kv_assert_ok(kv_store_put(t.s, "c", 1, buf, sizeof(buf), &e2));
	{
		struct kv_store_stats s;

		kv_store_stats(t.s, &s);
		assert_int_equal(s.extents, 2);
	}
	st_finish(&t);
}

/* Seen from inside a delete, after its record was appended (through the
 * log sink, called by the failed batch sync of that append). */
struct mid_delete {
	struct kv_store *s;
	struct kv_store_extent e;
	bool seen;
	int lookup, validate, again;
	size_t listed;
};

static int count_cb(void *ctx, const struct kv_store_extent *e)
{
	(void)e;
	(*(size_t *)ctx)++;
	return 0;
}

static void mid_delete_sink(enum kv_log_level level, const char *msg, void *ctx)
{
	struct mid_delete *m = ctx;
	struct kv_store_extent e;

	if (level != KV_LOG_WARN || !strstr(msg, "batch sync failed") || m->seen)
		return;
	m->seen = true;
	m->lookup = kv_store_lookup(m->s, "a", 1, &e);
	m->validate = kv_store_validate(m->s);
	m->again = kv_store_delete(m->s, &m->e);
	(void)kv_store_foreach(m->s, count_cb, &m->listed);
}

/* An extent being deleted stays live until its record is in the index:
 * lookups and walks still see it, validate finds nothing wrong, and a
 * second delete of it is refused. */
static void test_delete_window(void **state)
{
	struct kv_store_config cfg;
	struct mid_delete m = { 0 };
	struct kv_store_extent e;
	uint8_t buf[2000];
	struct st t;

	(void)state;
	st_init(&t, "store-delwin");
	cfg_init(&cfg, t.dir, NULL);
	cfg.sync = KV_STORE_SYNC_BATCHED;
	cfg.sync_every = 1;
	st_open_cfg(&t, &cfg);
	memset(buf, 0x12, sizeof(buf));
	kv_assert_ok(kv_store_put(t.s, "a", 1, buf, sizeof(buf), &m.e));
	m.s = t.s;
	kv_set_log(mid_delete_sink, KV_LOG_WARN, &m);
	kv_store_inject(KV_STORE_SEAM_SYNC, 1, EIO);
	kv_assert_ok(kv_store_delete(t.s, &m.e));
	kv_set_log(NULL, KV_LOG_ERROR, NULL);
	assert_true(m.seen);
	assert_int_equal(m.lookup, 0);
	kv_assert_ok(m.validate);
	assert_int_equal(m.again, -ENOENT);
	assert_int_equal(m.listed, 1);
	assert_int_equal(kv_store_lookup(t.s, "a", 1, &e), -ENOENT);
	st_close(&t);
	st_open_cfg(&t, &cfg);
	assert_int_equal(kv_store_lookup(t.s, "a", 1, &e), -ENOENT);
	st_finish(&t);
}

/* The header's promise on dst: zeroes after a read or checksum failure
 * (test_flipped_byte), untouched after an error found before any read. */
static void test_get_dst_untouched(void **state)
{
	struct kv_store_extent e, stale;
	uint8_t buf[700], got[700];
	struct st t;

	(void)state;
	st_init(&t, "store-dst");
	st_open(&t, KV_STORE_SYNC_NONE);
	memset(buf, 0x3e, sizeof(buf));
	kv_assert_ok(kv_store_put(t.s, "a", 1, buf, sizeof(buf), &stale));
	kv_assert_ok(kv_store_put(t.s, "a", 1, buf, sizeof(buf), &e));
	memset(got, 0xa5, sizeof(got));
	assert_int_equal(kv_store_get(t.s, &stale, got), -ENOENT);
	for (size_t i = 0; i < sizeof(got); i++)
		assert_int_equal(got[i], 0xa5);
	st_finish(&t);
}

/* Each test with the backend in its state: io_uring, then threads. */
#define PER_BACKEND(fn) \
	cmocka_unit_test_prestate_setup_teardown(fn, be_setup, be_teardown, (void *)&uring), \
	cmocka_unit_test_prestate_setup_teardown(fn, be_setup, be_teardown, (void *)&threads)

int main(void)
{
	const struct CMUnitTest tests[] = {
		PER_BACKEND(test_restart),
		PER_BACKEND(test_replace),
		PER_BACKEND(test_crash),
		PER_BACKEND(test_enospc_capacity),
		PER_BACKEND(test_enospc_seam),
		PER_BACKEND(test_eio_read),
		PER_BACKEND(test_index_faults),
		PER_BACKEND(test_flipped_byte),
		PER_BACKEND(test_truncated_index),
		PER_BACKEND(test_garbage_index),
		PER_BACKEND(test_identity),
		PER_BACKEND(test_bad_input),
		PER_BACKEND(test_async),
		PER_BACKEND(test_threads),
		PER_BACKEND(test_buffered_tail),
		PER_BACKEND(test_ids_after_compaction),
		PER_BACKEND(test_handle_checksum),
		PER_BACKEND(test_power_loss_reuse),
		PER_BACKEND(test_held_bounded),
		PER_BACKEND(test_capacity_shrunk),
		PER_BACKEND(test_creation_cut_short),
		PER_BACKEND(test_cutback_sync_fails),
		PER_BACKEND(test_delete_window),
		PER_BACKEND(test_get_dst_untouched),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
