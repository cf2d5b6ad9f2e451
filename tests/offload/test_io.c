// SPDX-License-Identifier: MIT
/*
 * Tests of the I/O engine, every case run once per backend (io_uring, then
 * the thread pool; io_uring cases are skipped, saying why, where it cannot
 * be set up): a differential test of thousands of random reads (unaligned
 * starts, tails and buffers, reads across and past the end of the file)
 * against the file's bytes and plain pread(2); batches with callbacks and
 * with tickets; writes read back; faults through the I/O seam (EIO on the
 * Nth read, short reads, -EAGAIN, ENOSPC on a write); destroy draining and
 * cancelling; bad input; tmpfs falling back to buffered I/O; AUTO falling
 * back to threads when io_uring setup fails. Each engine records its
 * staging in a private registry that must be empty after destroy.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/stat.h>

#include "kvtest.h"
#include "offload/offload-impl.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)
/* Not a multiple of any block size, so the end of the file is unaligned. */
#define DATA_BYTES (64 * MiB - 1000)
#define GUARD 64
#define GUARD_BYTE 0xA5

struct backend {
	enum kv_io_backend b;
	const char *name;
};

static const struct backend uring = { KV_IO_URING, "io_uring" };
static const struct backend threads = { KV_IO_THREADS, "threads" };

static char g_dir[4096];
static char g_path[4200];
static uint8_t *g_data;      /* (DATA_BYTES) the file's bytes */
static int g_pread_fd = -1;  /* the file, buffered, for the pread reference */

/* One engine with its private registry. */
struct eng {
	struct kv_io *io;
	struct kv_registry *reg;
};

static void fill_random(uint8_t *p, size_t n, uint64_t seed)
{
	size_t i = 0;

	for (; i + 8 <= n; i += 8) {
		uint64_t v = kv_test_rand(&seed);

		memcpy(p + i, &v, 8);
	}
	for (; i < n; i++)
		p[i] = (uint8_t)kv_test_rand(&seed);
}

static void write_file(const char *path, const uint8_t *data, size_t n)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	size_t done = 0;

	if (fd < 0)
		fail_msg("create %s: %s", path, strerror(errno));
	while (done < n) {
		ssize_t w = write(fd, data + done, n - done);

		if (w <= 0)
			fail_msg("write %s: %s", path, strerror(errno));
		done += (size_t)w;
	}
	close(fd);
}

static int group_setup(void **state)
{
	(void)state;
	kv_test_mkdtemp(g_dir, sizeof(g_dir), "io");
	snprintf(g_path, sizeof(g_path), "%s/data.bin", g_dir);
	g_data = malloc(DATA_BYTES);
	assert_non_null(g_data);
	fill_random(g_data, DATA_BYTES, 42);
	write_file(g_path, g_data, DATA_BYTES);
	g_pread_fd = open(g_path, O_RDONLY);
	assert_true(g_pread_fd >= 0);
	return 0;
}

static int group_teardown(void **state)
{
	(void)state;
	close(g_pread_fd);
	free(g_data);
	kv_test_rmtree(g_dir);
	return 0;
}

/* Start an engine of the test's backend; skip the test if it is io_uring
 * and this machine cannot set a ring up. */
static struct eng eng_start(void **state, const struct kv_io_config *base)
{
	const struct backend *be = *state;
	struct kv_io_config cfg;
	struct eng e = { 0 };
	int rc;

	if (base)
		cfg = *base;
	else
		kv_io_config_default(&cfg);
	kv_assert_ok(kv_registry_create(NULL, &e.reg));
	cfg.registry = e.reg;
	cfg.backend = be->b;
	rc = kv_io_create(&cfg, &e.io);
	if (rc && be->b == KV_IO_URING) {
		printf("SKIP %s: %s\n", be->name, kv_last_error());
		kv_registry_destroy(e.reg, 0);
		skip();
	}
	kv_assert_ok(rc);
	assert_int_equal(kv_io_backend(e.io), be->b);
	return e;
}

static void eng_stop(struct eng *e)
{
	assert_int_equal(kv_io_destroy(e->io, 0), 0);
	/* Staging went back to its arena and the arena away: nothing left. */
	kv_assert_ok(kv_registry_destroy(e->reg, 0));
}

static int open_data(struct kv_io *io)
{
	int f = kv_io_open(io, g_path, KV_IO_READ);

	if (f < 0)
		fail_msg("kv_io_open(%s): %s", g_path, kv_last_error());
	return f;
}

/* ---- Reads checked against the file ------------------------------------ */

/* A read request with a buffer surrounded by guard bytes. */
struct rd {
	struct kv_io_req req;
	uint8_t *mem;        /* allocation: GUARD, buf (len), GUARD */
	size_t mis;          /* buf = mem + 4096 + mis */
};

static void rd_init(struct rd *r, int file, uint64_t off, size_t len, size_t mis)
{
	memset(r, 0, sizeof(*r));
	/* C11 wants the size a multiple of the alignment. */
	r->mem = aligned_alloc(4096, (4096 + mis + len + GUARD + 4095) & ~(size_t)4095);
	assert_non_null(r->mem);
	memset(r->mem, GUARD_BYTE, 4096 + mis + len + GUARD);
	r->mis = mis;
	r->req.file = file;
	r->req.op = KV_IO_OP_READ;
	r->req.offset = off;
	r->req.len = len;
	r->req.buf = r->mem + 4096 + mis;
}

static size_t expect_len(uint64_t off, size_t len, size_t size)
{
	if (off >= size)
		return 0;
	return len < size - off ? len : (size_t)(size - off);
}

/* Whether r's result and bytes match data (the file is `size` bytes), the
 * guards around the buffer are intact, and pread(2) agrees. The buffer
 * past a short result is not checked: O_DIRECT may fill the rest of the
 * last block there. Returns a reason or NULL. */
static const char *rd_check(const struct rd *r, int64_t result, const uint8_t *data,
			    size_t size, int pread_fd, uint8_t *scratch)
{
	size_t want = expect_len(r->req.offset, r->req.len, size);
	const uint8_t *buf = r->req.buf;

	if (result != (int64_t)want)
		return "wrong result";
	if (want && memcmp(buf, data + r->req.offset, want) != 0)
		return "bytes differ from the file";
	for (size_t i = 0; i < GUARD; i++)
		if (buf[-1 - (ptrdiff_t)i] != GUARD_BYTE || buf[r->req.len + i] != GUARD_BYTE)
			return "guard bytes overwritten";
	if (pread_fd >= 0) {
		ssize_t n = pread(pread_fd, scratch, r->req.len, (off_t)r->req.offset);

		if (n != (ssize_t)want || (want && memcmp(scratch, buf, want) != 0))
			return "pread(2) disagrees";
	}
	return NULL;
}

/* Random (offset, length, misalignment): aligned and unaligned starts,
 * tails and buffers, small and multi-chunk lengths, some across or past
 * the end of the file. */
static void random_read(uint64_t *rng, size_t size, size_t max_len, uint64_t *off,
			size_t *len, size_t *mis)
{
	uint64_t r = kv_test_rand(rng);

	switch (r % 3) {
	case 0:
		*len = 1 + kv_test_rand(rng) % 9000;
		break;
	case 1:
		*len = 1 + kv_test_rand(rng) % (256 * KiB);
		break;
	default:
		*len = 1 + kv_test_rand(rng) % max_len;
		break;
	}
	if ((r >> 8) % 3 == 0)
		*len = (*len + 4095) & ~(size_t)4095;
	if ((r >> 16) % 20 == 0)
		*off = size - kv_test_rand(rng) % (*len + 8192);   /* around the end */
	else
		*off = kv_test_rand(rng) % size;
	if ((r >> 24) % 3 == 0)
		*off &= ~(uint64_t)4095;
	*mis = (r >> 32) % 3 == 0 ? 0 : kv_test_rand(rng) % 64;
}

/* n random reads of the file open as `file`, `depth` at a time, checked;
 * returns the number checked. */
static void differential(struct kv_io *io, int file, const uint8_t *data, size_t size,
			 int pread_fd, unsigned n, unsigned depth, size_t max_len, uint64_t seed)
{
	struct rd *rs = calloc(depth, sizeof(*rs));
	struct kv_io_req **ptrs = calloc(depth, sizeof(*ptrs));
	uint8_t *scratch = malloc(max_len + 8192);
	uint64_t rng = seed;

	assert_non_null(rs);
	assert_non_null(ptrs);
	assert_non_null(scratch);
	for (unsigned done = 0; done < n;) {
		unsigned k = n - done < depth ? n - done : depth;

		for (unsigned i = 0; i < k; i++) {
			uint64_t off;
			size_t len, mis;

			random_read(&rng, size, max_len, &off, &len, &mis);
			rd_init(&rs[i], file, off, len, mis);
			ptrs[i] = &rs[i].req;
		}
		kv_assert_ok(kv_io_submit(io, ptrs, k));
		/* Collect in reverse: many have completed before their wait. */
		for (unsigned i = k; i-- > 0;) {
			int64_t res = kv_io_wait(io, rs[i].req.ticket, -1);
			const char *bad = rd_check(&rs[i], res, data, size, pread_fd, scratch);

			if (bad)
				fail_msg("read %u: offset %" PRIu64 " len %zu buffer +%zu: %s "
					 "(result %" PRId64 ", detail %s)", done + i, rs[i].req.offset,
					 rs[i].req.len, rs[i].mis, bad, res, kv_last_error());
			assert_int_equal(rs[i].req.result, res);
			free(rs[i].mem);
		}
		done += k;
	}
	free(scratch);
	free(ptrs);
	free(rs);
}

/* Stats once the engine has finished its bookkeeping: a waiter is woken
 * as its request completes, a moment before the engine counts it out of
 * flight, so poll briefly (bounded) instead of reading at once. */
static void settled_stats(struct kv_io *io, struct kv_io_stats *st)
{
	for (int i = 0; i < 10000; i++) {
		kv_io_stats(io, st);
		if (st->in_flight == 0)
			return;
		usleep(1000);
	}
}

static void test_differential(void **state)
{
	struct eng e = eng_start(state, NULL);
	struct kv_io_file_info info;
	struct kv_io_stats st;
	int f = open_data(e.io);

	kv_assert_ok(kv_io_file_info(e.io, f, &info));
	assert_int_equal(info.size, DATA_BYTES);
	if (info.direct)
		assert_true(info.offset_align >= 512 &&
			    !(info.offset_align & (info.offset_align - 1)));
	else
		printf("note: %s does not take O_DIRECT, the reads are buffered\n", g_dir);
	differential(e.io, f, g_data, DATA_BYTES, g_pread_fd, 1500, 32, 3 * MiB, 1);
	settled_stats(e.io, &st);
	assert_int_equal(st.reads, 1500);
	assert_int_equal(st.errors, 0);
	if (info.direct)
		assert_true(st.staged > 0);
	assert_int_equal(st.in_flight, 0);
	kv_assert_ok(kv_io_close(e.io, f));
	eng_stop(&e);
}

/* Small transfers, few slots, one staging slot per worker: many chunks per
 * request, requests waiting for staging. */
static void test_differential_small(void **state)
{
	struct kv_io_config cfg;
	struct eng e;
	int f;

	kv_io_config_default(&cfg);
	cfg.queue_depth = 4;
	cfg.max_request = 16 * KiB;
	cfg.staging_bytes = 2 * 64 * KiB; /* the least two workers may have */
	cfg.workers = 2;
	e = eng_start(state, &cfg);
	f = open_data(e.io);
	differential(e.io, f, g_data, DATA_BYTES, -1, 400, 16, 300 * KiB, 2);
	eng_stop(&e);
}

/* staging_bytes bounds the staging memory whatever max_request and the
 * worker count: slots shrink below max_request and staged transfers are
 * cut to them; a budget below one smallest slot per worker is refused. */
static void test_staging_bound(void **state)
{
	const struct backend *be = *state;
	struct kv_io_config cfg;
	struct kv_io *io = NULL;
	struct eng e;
	int f;

	kv_io_config_default(&cfg);
	cfg.max_request = (size_t)1 << 30;
	/* io_uring rings cost locked memory each; 64 threads are cheap. */
	cfg.workers = be->b == KV_IO_URING ? 8 : 64;
	cfg.staging_bytes = 8 * MiB;
	e = eng_start(state, &cfg);
	assert_true(e.io->stage_bytes <= cfg.staging_bytes);
	assert_true(e.io->stage_slot < cfg.max_request);
	assert_true(e.io->stage_per_worker >= 1);
	assert_true((size_t)e.io->stage_slot * e.io->stage_per_worker * cfg.workers <=
		    cfg.staging_bytes);
	f = open_data(e.io);
	/* Reads of up to 3 MiB, many unaligned: staged chunks of a slot. */
	differential(e.io, f, g_data, DATA_BYTES, -1, 200, 16, 3 * MiB, 8);
	eng_stop(&e);

	/* Defaults keep a slot of max_request and stay within the bound. */
	kv_io_config_default(&cfg);
	e = eng_start(state, &cfg);
	assert_true(e.io->stage_slot >= cfg.max_request);
	assert_true(e.io->stage_bytes <= cfg.staging_bytes);
	eng_stop(&e);

	/* Too little for one 64 KiB slot per worker: refused, saying why. */
	kv_io_config_default(&cfg);
	cfg.backend = be->b;
	cfg.workers = 2;
	cfg.staging_bytes = 128 * KiB - 1;
	assert_int_equal(kv_io_create(&cfg, &io), -EINVAL);
	assert_null(io);
	assert_non_null(strstr(kv_last_error(), "staging_bytes 131071"));
	assert_non_null(strstr(kv_last_error(), "2 workers"));
	cfg.workers = 0;
	cfg.staging_bytes = 0;
	assert_int_equal(kv_io_create(&cfg, &io), -EINVAL);
	assert_non_null(strstr(kv_last_error(), "4 workers (the default)"));
	assert_null(io);
}

static void test_eof(void **state)
{
	struct eng e = eng_start(state, NULL);
	int f = open_data(e.io);
	static const struct { uint64_t off; size_t len; } cases[] = {
		{ DATA_BYTES - 100, 4096 },          /* across the end */
		{ DATA_BYTES - 5000, 3 * MiB },      /* across, several chunks */
		{ (DATA_BYTES & ~(uint64_t)4095), 8192 }, /* aligned start, unaligned end */
		{ DATA_BYTES, 4096 },                /* at the end */
		{ DATA_BYTES + 12345, 100 },         /* past it */
		{ 0, DATA_BYTES + 7 * MiB },         /* the whole file and more */
	};

	for (size_t i = 0; i < KV_ARRAY_SIZE(cases); i++) {
		struct rd r;
		int64_t res;
		const char *bad;

		rd_init(&r, f, cases[i].off, cases[i].len, i % 2 ? 3 : 0);
		res = kv_io_rw(e.io, f, KV_IO_OP_READ, r.req.offset, r.req.buf, r.req.len);
		bad = rd_check(&r, res, g_data, DATA_BYTES, -1, NULL);
		if (bad)
			fail_msg("case %zu: %s (result %" PRId64 ")", i, bad, res);
		free(r.mem);
	}
	eng_stop(&e);
}

/* ---- Callbacks and tickets ---------------------------------------------- */

struct cb_state {
	pthread_mutex_t lock;
	pthread_cond_t cond;
	unsigned done, bad, cancelled;
	struct kv_io *io;
	struct rd *extra;         /* submitted from a callback */
	atomic_int extra_rc;
};

static void on_done(struct kv_io_req *req)
{
	struct rd *r = (struct rd *)req;   /* req is the first member */
	struct cb_state *s = req->ctx;
	bool bad;

	if (req->result == -ECANCELED) {
		bad = false;
	} else {
		bad = rd_check(r, req->result, g_data, DATA_BYTES, -1, NULL) != NULL;
	}
	pthread_mutex_lock(&s->lock);
	s->done++;
	s->bad += bad;
	s->cancelled += req->result == -ECANCELED;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
}

static void on_done_then_submit(struct kv_io_req *req)
{
	struct cb_state *s = req->ctx;
	struct kv_io_req *p = &s->extra->req;

	/* A callback may submit: the engine must not hold a lock here. */
	atomic_store(&s->extra_rc, kv_io_submit(s->io, &p, 1));
	on_done(req);
}

static void cb_init(struct cb_state *s, struct kv_io *io)
{
	memset(s, 0, sizeof(*s));
	pthread_mutex_init(&s->lock, NULL);
	pthread_cond_init(&s->cond, NULL);
	s->io = io;
}

static void cb_wait(struct cb_state *s, unsigned n)
{
	pthread_mutex_lock(&s->lock);
	while (s->done < n)
		pthread_cond_wait(&s->cond, &s->lock);
	pthread_mutex_unlock(&s->lock);
}

/* Requests with callbacks, n of them at once. */
static struct rd *submit_cb_reads(struct kv_io *io, int f, struct cb_state *s, unsigned n,
				  size_t len, uint64_t seed)
{
	struct rd *rs = calloc(n, sizeof(*rs));
	struct kv_io_req **ptrs = calloc(n, sizeof(*ptrs));
	uint64_t rng = seed;

	assert_non_null(rs);
	assert_non_null(ptrs);
	for (unsigned i = 0; i < n; i++) {
		uint64_t off = kv_test_rand(&rng) % (DATA_BYTES - len);

		rd_init(&rs[i], f, i % 2 ? off : off & ~(uint64_t)4095, len, i % 3 ? 0 : 5);
		rs[i].req.cb = on_done;
		rs[i].req.ctx = s;
		ptrs[i] = &rs[i].req;
	}
	kv_assert_ok(kv_io_submit(io, ptrs, n));
	free(ptrs);
	return rs;
}

static void test_callbacks(void **state)
{
	struct eng e = eng_start(state, NULL);
	int f = open_data(e.io);
	struct cb_state s;
	struct rd extra, *rs;
	const unsigned n = 256;

	cb_init(&s, e.io);
	rd_init(&extra, f, 12345, 100 * KiB, 7);
	extra.req.cb = on_done;
	extra.req.ctx = &s;
	s.extra = &extra;
	rs = submit_cb_reads(e.io, f, &s, n, 200 * KiB, 3);
	/* One more whose callback submits `extra`. */
	{
		struct rd first;
		struct kv_io_req *p = &first.req;

		rd_init(&first, f, 777, 5000, 1);
		first.req.cb = on_done_then_submit;
		first.req.ctx = &s;
		kv_assert_ok(kv_io_submit(e.io, &p, 1));
		cb_wait(&s, n + 2);
		free(first.mem);
	}
	assert_int_equal(s.bad, 0);
	assert_int_equal(atomic_load(&s.extra_rc), 0);
	/* A request with a callback has no ticket to wait for. */
	assert_int_equal(kv_io_wait(e.io, rs[0].req.ticket, 0), -ENOENT);
	for (unsigned i = 0; i < n; i++)
		free(rs[i].mem);
	free(rs);
	free(extra.mem);
	eng_stop(&e);
}

static void test_tickets(void **state)
{
	struct eng e = eng_start(state, NULL);
	int f = open_data(e.io);
	struct rd r;
	struct kv_io_req *p = &r.req;
	int64_t res = 0;
	int rc;

	rd_init(&r, f, 4096, 2 * MiB + 17, 0);
	kv_assert_ok(kv_io_submit(e.io, &p, 1));
	assert_true(r.req.ticket != 0);
	while ((rc = kv_io_poll(e.io, r.req.ticket, &res)) == 0)
		usleep(100);
	assert_int_equal(rc, 1);
	assert_null(rd_check(&r, res, g_data, DATA_BYTES, -1, NULL));
	/* Collected once. */
	assert_int_equal(kv_io_poll(e.io, r.req.ticket, &res), -ENOENT);
	assert_int_equal(kv_io_wait(e.io, r.req.ticket, 0), -ENOENT);
	free(r.mem);

	/* A ticket that completed long before its wait. */
	rd_init(&r, f, 1, 1000, 1);
	kv_assert_ok(kv_io_submit(e.io, &p, 1));
	usleep(20000);
	assert_int_equal(kv_io_wait(e.io, r.req.ticket, 1000000000), 1000);
	assert_null(rd_check(&r, 1000, g_data, DATA_BYTES, -1, NULL));
	free(r.mem);
	eng_stop(&e);
}

/* ---- Writes ------------------------------------------------------------- */

static void check_file(const char *path, const uint8_t *want, size_t n)
{
	uint8_t *got = malloc(n + 1);
	int fd = open(path, O_RDONLY);
	ssize_t r;

	assert_non_null(got);
	assert_true(fd >= 0);
	r = pread(fd, got, n + 1, 0);
	close(fd);
	assert_int_equal(r, (ssize_t)n);
	assert_memory_equal(got, want, n);
	free(got);
}

static void test_write_direct(void **state)
{
	struct eng e = eng_start(state, NULL);
	char path[4300];
	struct kv_io_file_info info;
	const size_t n = 5 * MiB;   /* several max_request chunks */
	uint8_t *aligned = aligned_alloc(4096, n), *raw = malloc(n + 64), *back;
	int f;

	snprintf(path, sizeof(path), "%s/w-direct.bin", g_dir);
	f = kv_io_open(e.io, path, KV_IO_READ | KV_IO_WRITE | KV_IO_CREATE | KV_IO_TRUNCATE);
	assert_true(f >= 0);
	kv_assert_ok(kv_io_file_info(e.io, f, &info));
	if (!info.direct) {
		printf("SKIP: %s does not take O_DIRECT\n", g_dir);
		kv_io_close(e.io, f);
		eng_stop(&e);
		skip();
	}
	fill_random(aligned, n, 7);
	fill_random(raw + 3, n, 8);
	/* Aligned buffer straight through, unaligned buffer through staging. */
	assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_WRITE, 0, aligned, n), (int64_t)n);
	assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_WRITE, n, raw + 3, n), (int64_t)n);
	/* Unaligned offsets or lengths on O_DIRECT files are refused. */
	assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_WRITE, 1, aligned, 4096), -EINVAL);
	assert_non_null(strstr(kv_last_error(), "not aligned"));
	assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_WRITE, 0, aligned, 100), -EINVAL);

	back = malloc(2 * n + 5);
	assert_non_null(back);
	assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_READ, 0, back + 5, 2 * n), (int64_t)(2 * n));
	assert_memory_equal(back + 5, aligned, n);
	assert_memory_equal(back + 5 + n, raw + 3, n);
	kv_assert_ok(kv_io_close(e.io, f));
	memcpy(back, aligned, n);
	memcpy(back + n, raw + 3, n);
	check_file(path, back, 2 * n);
	free(back);
	free(aligned);
	free(raw);
	eng_stop(&e);
}

static void test_write_buffered(void **state)
{
	struct eng e = eng_start(state, NULL);
	char path[4300];
	const size_t n = 3 * MiB;
	uint8_t *model = calloc(1, n), *src = malloc(300 * KiB);
	uint64_t rng = 99;
	size_t size = 0;
	int f;

	assert_non_null(model);
	assert_non_null(src);
	snprintf(path, sizeof(path), "%s/w-buffered.bin", g_dir);
	f = kv_io_open(e.io, path, KV_IO_READ | KV_IO_WRITE | KV_IO_CREATE | KV_IO_BUFFERED);
	assert_true(f >= 0);
	/* Any offset and length: the model predicts the file. */
	for (int i = 0; i < 200; i++) {
		size_t len = 1 + kv_test_rand(&rng) % (250 * KiB);
		uint64_t off = kv_test_rand(&rng) % (n - len);
		size_t mis = kv_test_rand(&rng) % 64;

		fill_random(src + mis, len, (uint64_t)i);
		assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_WRITE, off, src + mis, len),
				 (int64_t)len);
		memcpy(model + off, src + mis, len);
		if (off + len > size)
			size = off + len;
	}
	kv_assert_ok(kv_io_close(e.io, f));
	check_file(path, model, size);
	free(model);
	free(src);
	eng_stop(&e);
}

/* ---- Faults through the seam -------------------------------------------- */

static void test_fault_eio(void **state)
{
	struct eng e = eng_start(state, NULL);
	int f = open_data(e.io);
	const unsigned n = 16;
	struct rd rs[16];
	struct kv_io_req *ptrs[16];
	unsigned failed = 0;
	struct kv_io_stats st;

	for (unsigned i = 0; i < n; i++) {
		rd_init(&rs[i], f, (uint64_t)i * MiB + (i % 2) * 100, 256 * KiB, i % 4 ? 0 : 9);
		ptrs[i] = &rs[i].req;
	}
	kv_io_inject(KV_IO_SEAM_READ, 5, EIO);
	kv_assert_ok(kv_io_submit(e.io, ptrs, n));
	for (unsigned i = 0; i < n; i++) {
		int64_t res = kv_io_wait(e.io, rs[i].req.ticket, -1);

		if (res == -EIO) {
			failed++;
			assert_non_null(strstr(kv_last_error(), "EIO"));
			assert_non_null(strstr(kv_last_error(), "injected"));
		} else {
			assert_null(rd_check(&rs[i], res, g_data, DATA_BYTES, -1, NULL));
		}
		free(rs[i].mem);
	}
	assert_int_equal(failed, 1);
	kv_io_stats(e.io, &st);
	assert_int_equal(st.errors, 1);
	/* Still usable. */
	differential(e.io, f, g_data, DATA_BYTES, -1, 50, 8, 2 * MiB, 5);
	eng_stop(&e);
}

static void test_fault_short(void **state)
{
	struct eng e = eng_start(state, NULL);
	int f = open_data(e.io);
	struct kv_io_stats before, after;

	kv_io_stats(e.io, &before);
	for (unsigned i = 0; i < 12; i++) {
		struct rd r;
		int64_t res;

		/* Direct into the buffer (even i) and through staging (odd),
		 * each one transfer, so the fault lands on a big one (a
		 * transfer of one block cannot be cut short). */
		rd_init(&r, f, (uint64_t)i * 3 * MiB + (i % 2) * 1111,
			i % 2 ? 700 * KiB + 3 : 1 * MiB, i % 2);
		kv_io_inject(KV_IO_SEAM_READ, 1, i % 3 == 2 ? EAGAIN : KV_IO_INJECT_SHORT);
		res = kv_io_rw(e.io, f, KV_IO_OP_READ, r.req.offset, r.req.buf, r.req.len);
		assert_null(rd_check(&r, res, g_data, DATA_BYTES, -1, NULL));
		free(r.mem);
	}
	kv_io_stats(e.io, &after);
	if (after.resubmits - before.resubmits < 12)
		fail_msg("%" PRIu64 " resubmits for 12 short or -EAGAIN transfers",
			 after.resubmits - before.resubmits);
	assert_int_equal(after.errors, 0);
	eng_stop(&e);
}

static void test_fault_enospc(void **state)
{
	struct eng e = eng_start(state, NULL);
	char path[4300];
	const size_t n = 2 * MiB;
	uint8_t *a = aligned_alloc(4096, n), *b = aligned_alloc(4096, n);
	int f;

	snprintf(path, sizeof(path), "%s/w-enospc.bin", g_dir);
	f = kv_io_open(e.io, path, KV_IO_READ | KV_IO_WRITE | KV_IO_CREATE | KV_IO_TRUNCATE);
	assert_true(f >= 0);
	fill_random(a, n, 11);
	kv_io_inject(KV_IO_SEAM_WRITE, 1, ENOSPC);
	assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_WRITE, 0, a, n), -ENOSPC);
	assert_non_null(strstr(kv_last_error(), "ENOSPC"));
	/* The engine and the file are still usable; the caller's bytes are
	 * untouched, so the write can simply be retried. */
	assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_WRITE, 0, a, n), (int64_t)n);
	assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_READ, 0, b, n), (int64_t)n);
	assert_memory_equal(a, b, n);
	kv_assert_ok(kv_io_close(e.io, f));
	free(a);
	free(b);
	eng_stop(&e);
}

/* ---- Destroy ------------------------------------------------------------ */

static void test_destroy_drain(void **state)
{
	struct eng e = eng_start(state, NULL);
	int f = open_data(e.io);
	struct cb_state s;
	struct rd *rs;
	const unsigned n = 200;

	cb_init(&s, e.io);
	rs = submit_cb_reads(e.io, f, &s, n, 512 * KiB, 4);
	assert_int_equal(kv_io_destroy(e.io, 0), 0);
	/* Every request completed, successfully, before destroy returned. */
	assert_int_equal(s.done, n);
	assert_int_equal(s.bad, 0);
	assert_int_equal(s.cancelled, 0);
	kv_assert_ok(kv_registry_destroy(e.reg, 0));
	for (unsigned i = 0; i < n; i++)
		free(rs[i].mem);
	free(rs);
}

static void test_destroy_cancel(void **state)
{
	struct kv_io_config cfg;
	struct eng e;
	struct cb_state s;
	struct rd *rs;
	const unsigned n = 600;
	int f, cancelled;

	kv_io_config_default(&cfg);
	cfg.queue_depth = 2;
	cfg.workers = 1;
	e = eng_start(state, &cfg);
	f = open_data(e.io);
	cb_init(&s, e.io);
	rs = submit_cb_reads(e.io, f, &s, n, 1 * MiB, 5);
	cancelled = kv_io_destroy(e.io, KV_IO_CANCEL);
	assert_true(cancelled > 0);
	assert_int_equal(s.done, n);
	assert_int_equal(s.cancelled, (unsigned)cancelled);
	assert_int_equal(s.bad, 0);
	kv_assert_ok(kv_registry_destroy(e.reg, 0));
	for (unsigned i = 0; i < n; i++)
		free(rs[i].mem);
	free(rs);
}

/* ---- Destroy racing with callers ---------------------------------------- */

#define RACE_THREADS 6
#define RACE_SLOTS 8
#define RACE_MAX_LEN (16 * KiB)
#define RACE_UNTOUCHED 12345

struct race {
	struct kv_io *io;
	int file;
	bool rw;                /* also kv_io_rw (see race_round) */
	atomic_uint finished;   /* threads that made their last call */
	atomic_uint results, shutdowns, cancelled, bad;
	atomic_int gate_result; /* the gate request's, once its callback ran */
	char why[200];          /* the first bad outcome */
	pthread_mutex_t why_lock;
};

/* A thread's requests and buffers outlive it: one given up on (a wait
 * timed out, then destroy began) is the engine's until destroy returns. */
struct race_thread {
	struct race *r;
	unsigned index;
	pthread_t thread;
	struct kv_io_req reqs[RACE_SLOTS];
	bool busy[RACE_SLOTS];  /* submitted, not collected */
	uint8_t *bufs;          /* (RACE_SLOTS * RACE_MAX_LEN) */
};

static void race_bad(struct race *r, const char *what, int64_t got)
{
	pthread_mutex_lock(&r->why_lock);
	if (atomic_fetch_add(&r->bad, 1) == 0)
		snprintf(r->why, sizeof(r->why), "%s: %" PRId64 " (%s)", what, got,
			 kv_last_error());
	pthread_mutex_unlock(&r->why_lock);
}

/* A completed read of slot i: its result and bytes. */
static void race_result(struct race *r, const struct kv_io_req *q, int64_t res)
{
	if (res == -ECANCELED)
		atomic_fetch_add(&r->cancelled, 1);
	else if (res != (int64_t)q->len)
		race_bad(r, "read result", res);
	else if (memcmp(q->buf, g_data + q->offset, q->len) != 0)
		race_bad(r, "bytes differ from the file", res);
	else
		atomic_fetch_add(&r->results, 1);
}

/* 0 goes on, -ESHUTDOWN stops; anything else is bad. */
static bool race_refused(struct race *r, const char *what, int64_t rc)
{
	if (rc == -ESHUTDOWN) {
		atomic_fetch_add(&r->shutdowns, 1);
		return true;
	}
	if (rc)
		race_bad(r, what, rc);
	return false;
}

/* Submit the free slots, then wait for (or poll) every busy one, with a
 * file_info, a stats and (see race_round) an rw call now and then, until
 * a call answers -ESHUTDOWN. Waits are timed: a request may be stuck
 * behind the gate's callback, and the thread must still come to hear
 * -ESHUTDOWN from a submit. */
static void *race_main(void *arg)
{
	struct race_thread *t = arg;
	struct race *r = t->r;
	uint64_t rng = 1000 + t->index;

	for (;;) {
		struct kv_io_req *p[RACE_SLOTS];
		struct kv_io_file_info info;
		struct kv_io_stats st;
		uint32_t n = 0;
		int64_t res;
		int rc;

		for (unsigned i = 0; i < RACE_SLOTS; i++) {
			if (t->busy[i])
				continue;
			t->reqs[i] = (struct kv_io_req){
				.file = r->file, .op = KV_IO_OP_READ,
				.offset = kv_test_rand(&rng) % (DATA_BYTES - RACE_MAX_LEN),
				.len = 1 + (size_t)(kv_test_rand(&rng) % RACE_MAX_LEN),
				.buf = t->bufs + i * RACE_MAX_LEN,
				.result = RACE_UNTOUCHED,
			};
			p[n++] = &t->reqs[i];
		}
		rc = kv_io_submit(r->io, p, n);
		if (race_refused(r, "submit", rc)) {
			/* A refused submit left its requests as they were. */
			for (uint32_t i = 0; i < n; i++)
				if (p[i]->ticket != 0 || p[i]->result != RACE_UNTOUCHED)
					race_bad(r, "refused submit wrote its requests",
						 p[i]->result);
			break;
		}
		if (rc)
			break;
		for (uint32_t i = 0; i < n; i++)
			t->busy[p[i] - t->reqs] = true;

		for (unsigned i = 0; i < RACE_SLOTS; i++) {
			if (!t->busy[i])
				continue;
			if (kv_test_rand(&rng) % 4 == 0) {
				rc = kv_io_poll(r->io, t->reqs[i].ticket, &res);
				if (rc < 0)
					race_bad(r, "poll", rc);
				if (rc != 1)
					continue;
			} else {
				res = kv_io_wait(r->io, t->reqs[i].ticket, 20 * 1000000);
				if (res == -ETIMEDOUT)
					continue;
			}
			t->busy[i] = false;
			race_result(r, &t->reqs[i], res);
		}
		if (kv_test_rand(&rng) % 8 == 0) {
			if (race_refused(r, "file_info", kv_io_file_info(r->io, r->file, &info)))
				break;
			kv_io_stats(r->io, &st);
		}
		if (r->rw && kv_test_rand(&rng) % 8 == 0) {
			uint8_t b[100];
			uint64_t off = kv_test_rand(&rng) % (DATA_BYTES - sizeof(b));

			res = kv_io_rw(r->io, r->file, KV_IO_OP_READ, off, b, sizeof(b));
			if (res == -ECANCELED)
				atomic_fetch_add(&r->cancelled, 1);
			else if (race_refused(r, "rw", res == (int64_t)sizeof(b) ? 0 : res))
				break;
			if (res == (int64_t)sizeof(b) && memcmp(b, g_data + off, sizeof(b)) != 0)
				race_bad(r, "rw bytes differ from the file", res);
		}
	}
	atomic_fetch_add(&r->finished, 1);
	return NULL;
}

/* The callback of a request submitted just before destroy: destroy waits
 * for it, so holding it until every thread made its last call keeps those
 * calls inside destroy's span (a call starting after destroy returned
 * would touch freed memory, which no engine can guard against). */
static void race_gate(struct kv_io_req *req)
{
	struct race *r = req->ctx;

	for (int i = 0; i < 60000 && atomic_load(&r->finished) < RACE_THREADS; i++)
		nanosleep(&(struct timespec){ .tv_nsec = 1000000 }, NULL);
	atomic_store(&r->gate_result, (int)req->result);
}

static void race_round(void **state, unsigned flags)
{
	const struct backend *be = *state;
	struct race_thread *ts = calloc(RACE_THREADS, sizeof(*ts));
	struct kv_io_req gate;
	struct kv_io_req *gp = &gate;
	struct race r;
	struct eng e;
	uint8_t gate_buf[512];
	int rc;

	assert_non_null(ts);
	e = eng_start(state, NULL);
	memset(&r, 0, sizeof(r));
	pthread_mutex_init(&r.why_lock, NULL);
	r.io = e.io;
	r.file = open_data(e.io);
	/* kv_io_rw waits without a timeout: on a ring, its request could sit
	 * behind the gate's callback for good; a pool thread holds only the
	 * chunk it works on. */
	r.rw = be->b == KV_IO_THREADS;
	atomic_init(&r.gate_result, 1);
	for (unsigned i = 0; i < RACE_THREADS; i++) {
		ts[i].r = &r;
		ts[i].index = i + 10 * flags;
		ts[i].bufs = malloc(RACE_SLOTS * RACE_MAX_LEN);
		assert_non_null(ts[i].bufs);
		assert_int_equal(pthread_create(&ts[i].thread, NULL, race_main, &ts[i]), 0);
	}
	/* Let them get going, so destroy meets submits, waits and polls. */
	for (int i = 0; i < 10000 && atomic_load(&r.results) < 20 * RACE_THREADS; i++)
		nanosleep(&(struct timespec){ .tv_nsec = 100000 }, NULL);

	gate = (struct kv_io_req){ .file = r.file, .op = KV_IO_OP_READ, .offset = 0,
				   .len = sizeof(gate_buf), .buf = gate_buf, .cb = race_gate,
				   .ctx = &r };
	kv_assert_ok(kv_io_submit(e.io, &gp, 1));
	rc = kv_io_destroy(e.io, flags);
	assert_true(rc >= 0);
	if (!(flags & KV_IO_CANCEL))
		assert_int_equal(rc, 0);
	for (unsigned i = 0; i < RACE_THREADS; i++)
		assert_int_equal(pthread_join(ts[i].thread, NULL), 0);

	if (atomic_load(&r.bad))
		fail_msg("%u bad outcomes, first: %s", atomic_load(&r.bad), r.why);
	assert_int_equal(atomic_load(&r.finished), RACE_THREADS);
	/* Every thread stopped on -ESHUTDOWN, after real work. */
	assert_int_equal(atomic_load(&r.shutdowns), RACE_THREADS);
	assert_true(atomic_load(&r.results) > 0);
	assert_true(atomic_load(&r.gate_result) == (int)sizeof(gate_buf) ||
		    atomic_load(&r.gate_result) == -ECANCELED);
	if (!(flags & KV_IO_CANCEL))
		assert_int_equal(atomic_load(&r.cancelled), 0);
	/* Requests given up on completed before destroy returned. */
	for (unsigned i = 0; i < RACE_THREADS; i++) {
		for (unsigned j = 0; j < RACE_SLOTS; j++)
			if (ts[i].busy[j])
				assert_true(ts[i].reqs[j].result == (int64_t)ts[i].reqs[j].len ||
					    ts[i].reqs[j].result == -ECANCELED);
		free(ts[i].bufs);
	}
	free(ts);
	pthread_mutex_destroy(&r.why_lock);
	kv_assert_ok(kv_registry_destroy(e.reg, 0));
}

/* Threads submitting, waiting and polling while destroy runs: each call
 * returns a result or -ESHUTDOWN, and destroy frees nothing under them
 * (the thread sanitizer runs this). */
static void test_destroy_race(void **state)
{
	race_round(state, 0);
	race_round(state, KV_IO_CANCEL);
}

/* Once destroy began every entry point but wait and poll says -ESHUTDOWN,
 * also from the callbacks of cancelled requests (run by destroy itself),
 * and a refused submit writes nothing into its requests. */
struct refuse {
	struct kv_io *io;
	int file;
	unsigned checked, bad;
};

static void on_cancel_try_all(struct kv_io_req *req)
{
	struct refuse *rf = req->ctx;
	struct kv_io_req again = { .file = rf->file, .op = KV_IO_OP_READ, .len = 10,
				   .buf = req->buf, .result = RACE_UNTOUCHED };
	struct kv_io_req *p = &again;
	struct kv_io_file_info info;
	struct kv_io_stats st;
	int64_t res;
	char b[10];

	if (req->result != -ECANCELED)
		return;
	rf->checked++;
	rf->bad += kv_io_submit(rf->io, &p, 1) != -ESHUTDOWN;
	rf->bad += again.ticket != 0 || again.result != RACE_UNTOUCHED;
	rf->bad += kv_io_submit(rf->io, &p, 0) != -ESHUTDOWN;
	/* Collecting still works (a callback request has no ticket). */
	rf->bad += kv_io_wait(rf->io, req->ticket, 0) != -ENOENT;
	rf->bad += kv_io_poll(rf->io, req->ticket, &res) != -ENOENT;
	rf->bad += kv_io_rw(rf->io, rf->file, KV_IO_OP_READ, 0, b, sizeof(b)) != -ESHUTDOWN;
	rf->bad += kv_io_open(rf->io, g_path, KV_IO_READ) != -ESHUTDOWN;
	rf->bad += kv_io_file_info(rf->io, rf->file, &info) != -ESHUTDOWN;
	rf->bad += kv_io_close(rf->io, rf->file) != -ESHUTDOWN;
	kv_io_stats(rf->io, &st);
	rf->bad += st.reads != 0 || st.in_flight != 0;
}

static void test_destroy_refuses(void **state)
{
	struct kv_io_config cfg;
	struct refuse rf = { 0 };
	struct kv_io_req *reqs, **ps;
	const unsigned n = 300;
	uint8_t *buf;
	struct eng e;
	int cancelled;

	kv_io_config_default(&cfg);
	cfg.queue_depth = 1;
	cfg.workers = 1;
	e = eng_start(state, &cfg);
	rf.io = e.io;
	rf.file = open_data(e.io);
	reqs = calloc(n, sizeof(*reqs));
	ps = calloc(n, sizeof(*ps));
	buf = malloc(n * 64 * KiB);
	assert_true(reqs && ps && buf);
	for (unsigned i = 0; i < n; i++) {
		reqs[i] = (struct kv_io_req){ .file = rf.file, .op = KV_IO_OP_READ,
					      .offset = (uint64_t)i * 64 * KiB + 7,
					      .len = 64 * KiB, .buf = buf + i * 64 * KiB,
					      .cb = on_cancel_try_all, .ctx = &rf };
		ps[i] = &reqs[i];
	}
	kv_assert_ok(kv_io_submit(e.io, ps, n));
	cancelled = kv_io_destroy(e.io, KV_IO_CANCEL);
	assert_true(cancelled > 0);
	assert_int_equal(rf.checked, (unsigned)cancelled);
	assert_int_equal(rf.bad, 0);
	kv_assert_ok(kv_registry_destroy(e.reg, 0));
	free(buf);
	free(ps);
	free(reqs);
}

/* ---- Bad input ---------------------------------------------------------- */

static void test_bad_input(void **state)
{
	struct eng e = eng_start(state, NULL);
	int f = open_data(e.io);
	char buf[4096], path[4300];
	struct kv_io_req good = { .file = f, .op = KV_IO_OP_READ, .offset = 0, .len = 100,
				  .buf = buf };
	struct kv_io_req bad = good;
	struct kv_io_req *batch[2] = { &good, &bad };
	struct kv_io_stats st;

	assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_READ, 0, NULL, 10), -EINVAL);
	assert_int_equal(kv_io_rw(e.io, f, (enum kv_io_op)7, 0, buf, 10), -EINVAL);
	assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_READ, 0, buf, 0), -EINVAL);
	assert_int_equal(kv_io_rw(e.io, 999, KV_IO_OP_READ, 0, buf, 10), -EBADF);
	assert_int_equal(kv_io_rw(e.io, -1, KV_IO_OP_READ, 0, buf, 10), -EBADF);
	assert_int_equal(kv_io_rw(e.io, 100000, KV_IO_OP_READ, 0, buf, 10), -EBADF);
	assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_WRITE, 0, buf, 4096), -EBADF);
	assert_non_null(strstr(kv_last_error(), "not open for write"));
	assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_READ, UINT64_MAX - 5, buf, 10), -EINVAL);
	assert_int_equal(kv_io_submit(e.io, NULL, 1), -EINVAL);

	/* One bad request in a batch: nothing of it is queued. */
	bad.buf = NULL;
	assert_int_equal(kv_io_submit(e.io, batch, 2), -EINVAL);
	assert_non_null(strstr(kv_last_error(), "request 1 of 2"));
	assert_int_equal(good.ticket, 0);
	kv_io_stats(e.io, &st);
	assert_int_equal(st.in_flight, 0);
	assert_int_equal(st.reads, 0);

	assert_int_equal(kv_io_wait(e.io, 123456789, 0), -ENOENT);
	assert_int_equal(kv_io_close(e.io, 1000), -EBADF);
	assert_int_equal(kv_io_close(e.io, f + 1), -EBADF);
	assert_int_equal(kv_io_open(e.io, "/nonexistent/dir/x", KV_IO_READ), -ENOENT);
	assert_non_null(strstr(kv_last_error(), "/nonexistent/dir/x"));
	assert_int_equal(kv_io_open(e.io, g_path, 0), -EINVAL);
	snprintf(path, sizeof(path), "%s", g_path);
	assert_int_equal(kv_io_open(e.io, path, KV_IO_READ | 4096u), -EINVAL);

	/* Still usable. */
	assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_READ, 3, buf, 100), 100);
	assert_memory_equal(buf, g_data + 3, 100);
	kv_assert_ok(kv_io_close(e.io, f));
	assert_int_equal(kv_io_rw(e.io, f, KV_IO_OP_READ, 3, buf, 100), -EBADF);
	eng_stop(&e);
}

/* ---- Buffered fallbacks -------------------------------------------------- */

static void test_tmpfs(void **state)
{
	const size_t n = 8 * MiB + 333;
	char path[128];
	struct kv_io_file_info info;
	struct eng e;
	uint8_t *data;
	int f, fd;
	struct stat st;

	if (stat("/dev/shm", &st) != 0 || !S_ISDIR(st.st_mode)) {
		printf("SKIP: no /dev/shm here\n");
		skip();
	}
	e = eng_start(state, NULL);
	snprintf(path, sizeof(path), "/dev/shm/libkv-test-io-%d.bin", (int)getpid());
	data = malloc(n);
	assert_non_null(data);
	fill_random(data, n, 13);
	write_file(path, data, n);
	f = kv_io_open(e.io, path, KV_IO_READ);
	assert_true(f >= 0);
	kv_assert_ok(kv_io_file_info(e.io, f, &info));
	/* tmpfs either refuses O_DIRECT or gives no alignment for it. */
	assert_false(info.direct);
	fd = open(path, O_RDONLY);
	differential(e.io, f, data, n, fd, 300, 16, 2 * MiB, 6);
	close(fd);
	kv_assert_ok(kv_io_close(e.io, f));
	unlink(path);
	free(data);

	/* An O_DIRECT open refused with EINVAL (as older tmpfs does) falls back
	 * to buffered too. */
	kv_io_inject(KV_IO_SEAM_OPEN, 1, EINVAL);
	f = kv_io_open(e.io, g_path, KV_IO_READ);
	assert_true(f >= 0);
	kv_assert_ok(kv_io_file_info(e.io, f, &info));
	assert_false(info.direct);
	differential(e.io, f, g_data, DATA_BYTES, -1, 100, 16, 1 * MiB, 7);
	eng_stop(&e);
}

/* ---- Backend choice (not per backend) ------------------------------------ */

static void test_auto_fallback(void **state)
{
	struct kv_io_config cfg;
	struct kv_io *io = NULL;
	char buf[100];
	int f;

	(void)state;
	kv_io_config_default(&cfg);
	kv_io_inject_setup(EPERM);
	kv_assert_ok(kv_io_create(&cfg, &io));
	assert_int_equal(kv_io_backend(io), KV_IO_THREADS);
	assert_non_null(strstr(kv_io_backend_reason(io), "EPERM"));
	f = open_data(io);
	assert_int_equal(kv_io_rw(io, f, KV_IO_OP_READ, 10, buf, 100), 100);
	assert_memory_equal(buf, g_data + 10, 100);
	assert_int_equal(kv_io_destroy(io, 0), 0);

	cfg.backend = KV_IO_URING;
	io = NULL;
	assert_int_equal(kv_io_create(&cfg, &io), -EPERM);
	assert_null(io);
	kv_io_inject_setup(0);

	cfg.backend = KV_IO_AUTO;
	setenv("KV_IO_BACKEND", "threads", 1);
	kv_assert_ok(kv_io_create(&cfg, &io));
	assert_int_equal(kv_io_backend(io), KV_IO_THREADS);
	assert_non_null(strstr(kv_io_backend_reason(io), "KV_IO_BACKEND"));
	assert_int_equal(kv_io_destroy(io, 0), 0);
	unsetenv("KV_IO_BACKEND");

	cfg.queue_depth = 0;
	assert_int_equal(kv_io_create(&cfg, &io), -EINVAL);
	kv_io_config_default(&cfg);
	cfg.max_request = 100;
	assert_int_equal(kv_io_create(&cfg, &io), -EINVAL);
	assert_int_equal(kv_io_destroy(NULL, 0), 0);
}

#define PER_BACKEND(fn) \
	cmocka_unit_test_prestate(fn, (void *)&uring), \
	cmocka_unit_test_prestate(fn, (void *)&threads)

int main(void)
{
	const struct CMUnitTest tests[] = {
		PER_BACKEND(test_differential),
		PER_BACKEND(test_differential_small),
		PER_BACKEND(test_staging_bound),
		PER_BACKEND(test_eof),
		PER_BACKEND(test_callbacks),
		PER_BACKEND(test_tickets),
		PER_BACKEND(test_write_direct),
		PER_BACKEND(test_write_buffered),
		PER_BACKEND(test_fault_eio),
		PER_BACKEND(test_fault_short),
		PER_BACKEND(test_fault_enospc),
		PER_BACKEND(test_destroy_drain),
		PER_BACKEND(test_destroy_cancel),
		PER_BACKEND(test_destroy_race),
		PER_BACKEND(test_destroy_refuses),
		PER_BACKEND(test_bad_input),
		PER_BACKEND(test_tmpfs),
		cmocka_unit_test(test_auto_fallback),
	};

	return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
