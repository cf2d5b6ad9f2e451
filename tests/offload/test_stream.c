// SPDX-License-Identifier: MIT
/*
 * Tests of the tensor index and the streamer. A file of 24 tensors of
 * varied dtypes and sizes (about 64 MiB, unaligned offsets and sizes,
 * seeded content) is streamed for several passes under a budget of a
 * quarter of it, with each backend (KV_STREAM_IO over io_uring and over
 * the thread pool, KV_STREAM_MMAP): every acquired tensor equals the
 * file's bytes as pread(2) reads them, the stats add up (bytes read =
 * streamed bytes x passes + resident bytes once; acquires = order length x
 * passes), the buffers are the registry's DRAM weights and nothing is
 * left after destroy. Also: a read failing with EIO (kv_io_inject) makes
 * that acquire fail with the tensor named and the next acquire re-reads
 * it; shared engines, lookahead 0, holding several tensors, a tensor
 * named twice per pass, everything resident; bad configs and calls give
 * -EINVAL (or -ENOENT) and leave nothing. A second file of six tensors
 * of 15, 25, 25, 15, 25, 25 pages checks the ring's wrap: holding two
 * never fails inside a budget the stream accepted, read-ahead keeps going,
 * a read that fails to submit gives its space back; and the index refuses
 * to grow past its limit.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <sys/stat.h>

#include "kvtest.h"
#include "allocator/allocator-impl.h"
#include "offload/offload-impl.h"

#define KiB ((size_t)1 << 10)
#define MiB ((size_t)1 << 20)
#define N_TENSORS 24
#define PASSES 3

struct mode {
	enum kv_stream_backend backend;
	enum kv_io_backend io;
	const char *name;
};

static const struct mode io_uring_mode = { KV_STREAM_IO, KV_IO_URING, "io/io_uring" };
static const struct mode io_threads_mode = { KV_STREAM_IO, KV_IO_THREADS, "io/threads" };
static const struct mode mmap_mode = { KV_STREAM_MMAP, KV_IO_AUTO, "mmap" };

static char g_dir[4096];
static char g_path[4200];
static uint8_t *g_data;                /* (g_file_bytes) read back with pread */
static uint64_t g_file_bytes;
static uint64_t g_tensor_bytes;        /* sum over the tensors */
static struct kv_tensor_index *g_idx;
static uint32_t g_order[N_TENSORS];

/* The wrap fixture (small.bin): U8 tensors of W_PAGES pages, back to back
 * from offset 0, so every buffer is exactly its pages on both backends. */
#define W_N 6
static const uint32_t w_pages[W_N] = { 15, 25, 25, 15, 25, 25 };
static const uint32_t w_order[W_N] = { 0, 1, 2, 3, 4, 5 };
static char g_wpath[4200];
static uint8_t *g_wdata;
static size_t g_page;
static struct kv_tensor_index *g_widx;   /* all six */
static struct kv_tensor_index *g_widx3;  /* the first three */

/* The layout of struct kv_tensor_index in offload/stream.c, so a test can
 * fake an index at its size limit without 2^31 entries. Keep in sync. */
struct kv_tensor_index {
	struct kv_tensor_info *t;
	uint32_t n, cap;
};

/* The tensors: every sixth a small 1-d "norm", the others 2-d matrices
 * of about 3.2 MiB; dtypes cycle; gaps of 1..4095 bytes between them. */
static void build_index(uint64_t *seed)
{
	static const enum kv_dtype dts[] = { KV_DTYPE_F32, KV_DTYPE_F16, KV_DTYPE_BF16,
					     KV_DTYPE_I8, KV_DTYPE_U8 };
	uint64_t cursor = 777;

	kv_assert_ok(kv_tensor_index_create(&g_idx));
	for (uint32_t i = 0; i < N_TENSORS; i++) {
		struct kv_tensor_info t = { 0 };
		size_t es;
		uint32_t id;

		snprintf(t.name, sizeof(t.name), "blk.%u.%s", i / 4, i % 6 == 0 ? "norm" : "w");
		snprintf(t.name + strlen(t.name), sizeof(t.name) - strlen(t.name), ".%u", i);
		t.dtype = dts[i % KV_ARRAY_SIZE(dts)];
		es = kv_dtype_size(t.dtype);
		if (i % 6 == 0) {
			t.n_dims = 1;
			t.shape[0] = 1000 + 37 * i;
		} else {
			t.n_dims = 2;
			t.shape[0] = 384 + kv_test_rand(seed) % 256;
			t.shape[1] = (13 * MiB / 4 / es) / t.shape[0] - kv_test_rand(seed) % 64;
		}
		t.bytes = es * t.shape[0] * (t.n_dims == 2 ? t.shape[1] : 1);
		t.offset = cursor;
		cursor += t.bytes + 1 + kv_test_rand(seed) % 4095;
		kv_assert_ok(kv_tensor_index_add(g_idx, &t, &id));
		assert_int_equal(id, i);
		g_order[i] = i;
		g_tensor_bytes += t.bytes;
	}
	g_file_bytes = cursor + 999;
}

static int group_setup(void **state)
{
	uint64_t seed = 2024;
	int fd;

	(void)state;
	kv_test_mkdtemp(g_dir, sizeof(g_dir), "stream");
	snprintf(g_path, sizeof(g_path), "%s/model.bin", g_dir);
	build_index(&seed);
	g_data = malloc(g_file_bytes);
	assert_non_null(g_data);
	for (uint64_t i = 0; i + 8 <= g_file_bytes; i += 8) {
		uint64_t v = kv_test_rand(&seed);

		memcpy(g_data + i, &v, 8);
	}
	fd = open(g_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, g_data, g_file_bytes), (ssize_t)g_file_bytes);
	/* The reference is what pread returns. */
	memset(g_data, 0, g_file_bytes);
	assert_int_equal(pread(fd, g_data, g_file_bytes, 0), (ssize_t)g_file_bytes);
	close(fd);

	{
		uint64_t off = 0;

		g_page = kv_os_page_size();
		snprintf(g_wpath, sizeof(g_wpath), "%s/small.bin", g_dir);
		kv_assert_ok(kv_tensor_index_create(&g_widx));
		kv_assert_ok(kv_tensor_index_create(&g_widx3));
		for (uint32_t i = 0; i < W_N; i++) {
			struct kv_tensor_info t = { .dtype = KV_DTYPE_U8, .n_dims = 1 };

			snprintf(t.name, sizeof(t.name), "w%u", i);
			t.bytes = t.shape[0] = (uint64_t)w_pages[i] * g_page;
			t.offset = off;
			off += t.bytes;
			kv_assert_ok(kv_tensor_index_add(g_widx, &t, NULL));
			if (i < 3)
				kv_assert_ok(kv_tensor_index_add(g_widx3, &t, NULL));
		}
		g_wdata = malloc(off);
		assert_non_null(g_wdata);
		for (uint64_t i = 0; i + 8 <= off; i += 8) {
			uint64_t v = kv_test_rand(&seed);

			memcpy(g_wdata + i, &v, 8);
		}
		fd = open(g_wpath, O_RDWR | O_CREAT | O_TRUNC, 0600);
		assert_true(fd >= 0);
		assert_int_equal(write(fd, g_wdata, off), (ssize_t)off);
		close(fd);
	}
	return 0;
}

static int group_teardown(void **state)
{
	(void)state;
	kv_tensor_index_destroy(g_idx);
	kv_tensor_index_destroy(g_widx);
	kv_tensor_index_destroy(g_widx3);
	free(g_wdata);
	free(g_data);
	kv_test_rmtree(g_dir);
	return 0;
}

static void stream_config(struct kv_stream_config *cfg, const struct mode *m,
			  struct kv_registry *reg)
{
	kv_stream_config_default(cfg);
	cfg->index = g_idx;
	cfg->path = g_path;
	cfg->order = g_order;
	cfg->order_len = N_TENSORS;
	cfg->budget_bytes = g_tensor_bytes / 4;
	cfg->lookahead = 2;
	cfg->backend = m->backend;
	cfg->io_backend = m->io;
	cfg->registry = reg;
	cfg->label = "weights";
}

/* Create, or skip the test when the mode is io_uring and this machine
 * cannot set up a ring. Returns NULL when skipped. */
static struct kv_stream *create_or_skip(const struct kv_stream_config *cfg, const struct mode *m)
{
	struct kv_stream *s = NULL;
	int rc = kv_stream_create(cfg, &s);

	if (rc && m->io == KV_IO_URING && m->backend == KV_STREAM_IO) {
		printf("SKIP %s: %s\n", m->name, kv_last_error());
		return NULL;
	}
	if (rc)
		fail_msg("kv_stream_create: %s: %s", kv_strerror(rc), kv_last_error());
	return s;
}

static void check_tensor(uint32_t id, const void *p)
{
	struct kv_tensor_info t;

	kv_assert_ok(kv_tensor_index_get(g_idx, id, &t));
	assert_non_null(p);
	if (memcmp(p, g_data + t.offset, t.bytes) != 0)
		fail_msg("tensor '%s' (id %u) differs from the file", t.name, id);
}

/* Acquire, check and release the order `passes` times. */
static void run_passes(struct kv_stream *s, const uint32_t *order, uint32_t n, int passes)
{
	for (int p = 0; p < passes; p++) {
		for (uint32_t i = 0; i < n; i++) {
			const void *d = NULL;

			kv_assert_ok(kv_stream_acquire(s, order[i], &d));
			check_tensor(order[i], d);
			kv_assert_ok(kv_stream_validate(s));
			kv_assert_ok(kv_stream_release(s, order[i]));
		}
		kv_assert_ok(kv_stream_validate(s));
	}
}

static void test_index(void **state)
{
	struct kv_tensor_index *idx;
	struct kv_tensor_info t = { .name = "a", .dtype = KV_DTYPE_F16, .n_dims = 2,
				    .shape = { 3, 5 }, .bytes = 30, .offset = 10 }, g;
	uint32_t id;

	(void)state;
	assert_int_equal(kv_dtype_size(KV_DTYPE_BF16), 2);
	assert_string_equal(kv_dtype_name(KV_DTYPE_U8), "u8");
	assert_null(kv_dtype_name(KV_DTYPE_COUNT));
	kv_assert_ok(kv_tensor_index_create(&idx));
	kv_assert_ok(kv_tensor_index_add(idx, &t, &id));
	assert_int_equal(id, 0);
	kv_assert_rc(kv_tensor_index_add(idx, &t, &id), -EEXIST);
	t.bytes = 31;
	snprintf(t.name, sizeof(t.name), "b");
	kv_assert_rc(kv_tensor_index_add(idx, &t, &id), -EINVAL);
	assert_non_null(strstr(kv_last_error(), "'b'"));
	t.bytes = 30;
	t.n_dims = 5;
	kv_assert_rc(kv_tensor_index_add(idx, &t, &id), -EINVAL);
	t.n_dims = 2;
	t.shape[1] = 0;
	kv_assert_rc(kv_tensor_index_add(idx, &t, &id), -EINVAL);
	t.shape[1] = 5;
	t.dtype = KV_DTYPE_COUNT;
	kv_assert_rc(kv_tensor_index_add(idx, &t, &id), -EINVAL);
	t.dtype = KV_DTYPE_F16;
	t.name[0] = '\0';
	kv_assert_rc(kv_tensor_index_add(idx, &t, &id), -EINVAL);
	memset(t.name, 'x', sizeof(t.name));
	kv_assert_rc(kv_tensor_index_add(idx, &t, &id), -EINVAL);
	snprintf(t.name, sizeof(t.name), "b");
	t.offset = 100;
	kv_assert_ok(kv_tensor_index_add(idx, &t, &id));
	assert_int_equal(id, 1);
	assert_int_equal(kv_tensor_index_count(idx), 2);
	kv_assert_ok(kv_tensor_index_find(idx, "b", &id));
	assert_int_equal(id, 1);
	kv_assert_rc(kv_tensor_index_find(idx, "c", &id), -ENOENT);
	kv_assert_ok(kv_tensor_index_get(idx, 1, &g));
	assert_string_equal(g.name, "b");
	assert_int_equal(g.offset, 100);
	kv_assert_rc(kv_tensor_index_get(idx, 2, &g), -EINVAL);
	kv_assert_ok(kv_tensor_index_validate(idx, 130));
	kv_assert_rc(kv_tensor_index_validate(idx, 129), -EINVAL);
	assert_non_null(strstr(kv_last_error(), "'b'"));
	kv_tensor_index_destroy(idx);
	kv_assert_ok(kv_tensor_index_validate(g_idx, g_file_bytes));
}

static void test_passes(void **state)
{
	const struct mode *m = *state;
	struct kv_registry *reg;
	struct kv_stream_config cfg;
	struct kv_stream_stats st;
	struct kv_stream *s;
	uint64_t dram;

	kv_assert_ok(kv_registry_create(NULL, &reg));
	stream_config(&cfg, m, reg);
	s = create_or_skip(&cfg, m);
	if (!s) {
		kv_assert_ok(kv_registry_destroy(reg, 0));
		skip();
	}
	kv_assert_ok(kv_stream_stats(s, &st));
	printf("%s: budget %" PRIu64 ", window %" PRIu64 ", %u resident (%" PRIu64 " B), %u "
	       "streamed (%" PRIu64 " B)\n", m->name, cfg.budget_bytes, st.window_bytes,
	       st.n_resident, st.resident_bytes, st.n_streamed, st.streamed_bytes);
	/* The budget is a quarter of a pass: both kinds must be present, or
	 * the test shows nothing about one of them. */
	assert_true(st.n_resident > 0 && st.n_streamed > 0);
	assert_int_equal(st.n_resident + st.n_streamed, N_TENSORS);
	assert_int_equal(st.resident_bytes + st.streamed_bytes, g_tensor_bytes);
	assert_true(st.buffer_bytes <= cfg.budget_bytes);
	assert_true(st.window_bytes > 0);
	kv_assert_ok(kv_registry_bytes(reg, KV_TIER_DRAM, KV_ANY, KV_KIND_WEIGHTS, &dram));
	if (m->backend == KV_STREAM_IO)
		assert_int_equal(dram, st.buffer_bytes);
	else
		assert_int_equal(dram, 0);

	run_passes(s, g_order, N_TENSORS, PASSES);
	kv_assert_ok(kv_stream_stats(s, &st));
	assert_int_equal(st.acquires, (uint64_t)N_TENSORS * PASSES);
	assert_int_equal(st.releases, (uint64_t)N_TENSORS * PASSES);
	assert_int_equal(st.bytes_read, st.streamed_bytes * PASSES + st.resident_bytes);
	assert_int_equal(st.read_errors, 0);
	assert_true(st.overlap_ratio >= 0 && st.overlap_ratio <= 1);
	assert_true(st.stall_ns <= st.call_ns);
	printf("%s: read %" PRIu64 " B, stalls %" PRIu64 " (%.2f ms), overlap %.3f\n", m->name,
	       st.bytes_read, st.stalls, (double)st.stall_ns / 1e6, st.overlap_ratio);
	kv_stream_destroy(s);
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* The stream shares an engine the test owns, and a tensor is named twice
 * per pass (at both ends, like tied embeddings): it is kept resident first. */
static void test_shared_engine_and_repeats(void **state)
{
	const struct mode *m = *state;
	uint32_t order[N_TENSORS + 1];
	struct kv_registry *reg;
	struct kv_stream_config cfg;
	struct kv_stream_stats st;
	struct kv_io_config ic;
	struct kv_io_stats ios;
	struct kv_io *io;
	struct kv_stream *s;
	int rc;

	kv_assert_ok(kv_registry_create(NULL, &reg));
	kv_io_config_default(&ic);
	ic.backend = m->io;
	ic.registry = reg;
	rc = kv_io_create(&ic, &io);
	if (rc) {
		printf("SKIP %s: %s\n", m->name, kv_last_error());
		kv_assert_ok(kv_registry_destroy(reg, 0));
		skip();
	}
	memcpy(order, g_order, sizeof(g_order));
	order[N_TENSORS] = 5; /* a large one, used at both ends */
	stream_config(&cfg, m, reg);
	cfg.io = io;
	cfg.order = order;
	cfg.order_len = N_TENSORS + 1;
	/* The window (3 largest buffers plus the largest for the wrap) leaves
	 * a quarter budget just short of tensor 5: give it room. */
	cfg.budget_bytes += 4 * MiB;
	kv_assert_ok(kv_stream_create(&cfg, &s));
	assert_true(kv_stream_is_resident(s, 5));
	run_passes(s, order, N_TENSORS + 1, PASSES);
	kv_assert_ok(kv_stream_stats(s, &st));
	assert_int_equal(st.acquires, (uint64_t)(N_TENSORS + 1) * PASSES);
	assert_int_equal(st.bytes_read, st.streamed_bytes * PASSES + st.resident_bytes);
	kv_stream_destroy(s);
	kv_io_stats(io, &ios);
	assert_true(ios.bytes_read >= st.bytes_read);
	assert_int_equal(ios.in_flight, 0);
	kv_io_destroy(io, 0);
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* No read-ahead; and a consumer holding three tensors at once. */
static void test_lookahead0_and_hold(void **state)
{
	const struct mode *m = *state;
	struct kv_registry *reg;
	struct kv_stream_config cfg;
	struct kv_stream_stats st;
	struct kv_stream *s;

	kv_assert_ok(kv_registry_create(NULL, &reg));
	stream_config(&cfg, m, reg);
	cfg.lookahead = 0;
	s = create_or_skip(&cfg, m);
	if (!s) {
		kv_assert_ok(kv_registry_destroy(reg, 0));
		skip();
	}
	run_passes(s, g_order, N_TENSORS, 2);
	kv_assert_ok(kv_stream_stats(s, &st));
	assert_int_equal(st.bytes_read, st.streamed_bytes * 2 + st.resident_bytes);
	kv_stream_destroy(s);

	stream_config(&cfg, m, reg);
	cfg.hold = 3;
	kv_assert_ok(kv_stream_create(&cfg, &s));
	for (int p = 0; p < 2; p++) {
		for (uint32_t i = 0; i < N_TENSORS; i += 3) {
			const void *d[3];

			for (uint32_t k = 0; k < 3; k++) {
				kv_assert_ok(kv_stream_acquire(s, g_order[i + k], &d[k]));
				kv_assert_ok(kv_stream_validate(s));
			}
			for (uint32_t k = 0; k < 3; k++)
				check_tensor(g_order[i + k], d[k]);
			/* Released out of acquire order. */
			kv_assert_ok(kv_stream_release(s, g_order[i + 1]));
			kv_assert_ok(kv_stream_release(s, g_order[i + 2]));
			kv_assert_ok(kv_stream_release(s, g_order[i]));
			kv_assert_ok(kv_stream_validate(s));
		}
	}
	kv_assert_ok(kv_stream_stats(s, &st));
	assert_int_equal(st.bytes_read, st.streamed_bytes * 2 + st.resident_bytes);
	kv_stream_destroy(s);
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

static void test_all_resident(void **state)
{
	const struct mode *m = *state;
	struct kv_registry *reg;
	struct kv_stream_config cfg;
	struct kv_stream_stats st;
	struct kv_stream *s;

	kv_assert_ok(kv_registry_create(NULL, &reg));
	stream_config(&cfg, m, reg);
	cfg.budget_bytes = g_tensor_bytes + 64 * MiB;
	s = create_or_skip(&cfg, m);
	if (!s) {
		kv_assert_ok(kv_registry_destroy(reg, 0));
		skip();
	}
	run_passes(s, g_order, N_TENSORS, PASSES);
	kv_assert_ok(kv_stream_stats(s, &st));
	assert_int_equal(st.n_streamed, 0);
	assert_int_equal(st.window_bytes, 0);
	assert_int_equal(st.bytes_read, g_tensor_bytes);
	kv_stream_destroy(s);
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* An EIO on a read: the acquire of that tensor fails naming it, the next
 * acquire of it re-reads, and everything after is correct. */
static void test_read_error(void **state)
{
	const struct mode *m = *state;
	struct kv_registry *reg;
	struct kv_stream_config cfg;
	struct kv_stream_stats st;
	struct kv_stream *s;
	int errors = 0;

	kv_assert_ok(kv_registry_create(NULL, &reg));
	stream_config(&cfg, m, reg);
	s = create_or_skip(&cfg, m);
	if (!s) {
		kv_assert_ok(kv_registry_destroy(reg, 0));
		skip();
	}
	run_passes(s, g_order, N_TENSORS, 1);
	kv_io_inject(KV_IO_SEAM_READ, 3, EIO);
	for (int p = 0; p < 2; p++) {
		for (uint32_t i = 0; i < N_TENSORS; i++) {
			const void *d = NULL;
			int rc = kv_stream_acquire(s, g_order[i], &d);

			if (rc) {
				assert_int_equal(rc, -EIO);
				assert_non_null(strstr(kv_last_error(), "tensor 'blk."));
				errors++;
				/* The order did not move: another tensor is refused. */
				kv_assert_rc(kv_stream_acquire(s, g_order[(i + 1) % N_TENSORS], &d),
					     -EINVAL);
				kv_assert_ok(kv_stream_validate(s));
				kv_assert_ok(kv_stream_acquire(s, g_order[i], &d));
			}
			check_tensor(g_order[i], d);
			kv_assert_ok(kv_stream_release(s, g_order[i]));
		}
	}
	kv_io_inject(KV_IO_SEAM_READ, 0, 0);
	assert_int_equal(errors, 1);
	kv_assert_ok(kv_stream_stats(s, &st));
	assert_int_equal(st.read_errors, 1);
	assert_int_equal(st.acquires, (uint64_t)N_TENSORS * 3);
	assert_int_equal(st.bytes_read, st.streamed_bytes * 3 + st.resident_bytes);
	kv_stream_destroy(s);
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

static void expect_create_fails(struct kv_stream_config *cfg, int want, const char *needle)
{
	struct kv_stream *s = NULL;

	kv_assert_rc(kv_stream_create(cfg, &s), want);
	assert_null(s);
	if (needle && !strstr(kv_last_error(), needle))
		fail_msg("detail '%s' lacks '%s'", kv_last_error(), needle);
}

static void test_bad_config(void **state)
{
	const struct mode *m = *state;
	struct kv_registry *reg;
	struct kv_stream_config cfg;
	struct kv_tensor_index *idx;
	struct kv_tensor_info t;
	uint32_t bad_order[3] = { 0, 1, N_TENSORS };
	struct kv_stream *s;
	char missing[4300];
	const void *d;

	kv_assert_ok(kv_registry_create(NULL, &reg));
	stream_config(&cfg, m, reg);
	cfg.budget_bytes = 64 * KiB;
	expect_create_fails(&cfg, -EINVAL, "budget");

	stream_config(&cfg, m, reg);
	cfg.order = bad_order;
	cfg.order_len = 3;
	expect_create_fails(&cfg, -EINVAL, "order[2]");

	stream_config(&cfg, m, reg);
	cfg.hold = 0;
	expect_create_fails(&cfg, -EINVAL, NULL);
	stream_config(&cfg, m, reg);
	cfg.order_len = 0;
	expect_create_fails(&cfg, -EINVAL, NULL);
	stream_config(&cfg, m, reg);
	cfg.index = NULL;
	expect_create_fails(&cfg, -EINVAL, NULL);

	stream_config(&cfg, m, reg);
	snprintf(missing, sizeof(missing), "%s/missing.bin", g_dir);
	cfg.path = missing;
	expect_create_fails(&cfg, -ENOENT, missing);

	/* A tensor past the end of the file. */
	kv_assert_ok(kv_tensor_index_create(&idx));
	for (uint32_t i = 0; i < N_TENSORS; i++) {
		kv_assert_ok(kv_tensor_index_get(g_idx, i, &t));
		if (i == 7)
			t.offset = g_file_bytes - t.bytes + 1;
		kv_assert_ok(kv_tensor_index_add(idx, &t, NULL));
	}
	stream_config(&cfg, m, reg);
	cfg.index = idx;
	expect_create_fails(&cfg, -EINVAL, "outside the file");
	kv_tensor_index_destroy(idx);

	/* Calls out of order, and releases of what is not held. */
	stream_config(&cfg, m, reg);
	cfg.io_backend = KV_IO_THREADS;
	kv_assert_ok(kv_stream_create(&cfg, &s));
	kv_assert_rc(kv_stream_acquire(s, 1, &d), -EINVAL);
	kv_assert_rc(kv_stream_acquire(s, N_TENSORS + 5, &d), -EINVAL);
	kv_assert_rc(kv_stream_release(s, 0), -EINVAL);
	kv_assert_rc(kv_stream_release(s, N_TENSORS), -EINVAL);
	kv_assert_ok(kv_stream_acquire(s, 0, &d));
	check_tensor(0, d);
	kv_assert_rc(kv_stream_acquire(s, 0, &d), -EINVAL);
	kv_assert_ok(kv_stream_validate(s));
	/* Destroy with a tensor held and reads in flight. */
	kv_stream_destroy(s);
	kv_stream_destroy(NULL);

	/* Nothing of the failed creates is left in the registry. */
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* ---- The ring's wrap ---- */

static void wrap_config(struct kv_stream_config *cfg, const struct mode *m,
			struct kv_registry *reg, const struct kv_tensor_index *idx,
			uint32_t n, uint32_t hold, uint32_t lookahead, uint32_t budget_pages)
{
	kv_stream_config_default(cfg);
	cfg->index = idx;
	cfg->path = g_wpath;
	cfg->order = w_order;
	cfg->order_len = n;
	cfg->hold = hold;
	cfg->lookahead = lookahead;
	cfg->budget_bytes = (uint64_t)budget_pages * g_page;
	cfg->backend = m->backend;
	cfg->io_backend = m->io;
	cfg->registry = reg;
	cfg->label = "wrap";
}

static void check_wtensor(uint32_t id, const void *p)
{
	struct kv_tensor_info t;

	kv_assert_ok(kv_tensor_index_get(g_widx, id, &t));
	assert_non_null(p);
	if (memcmp(p, g_wdata + t.offset, t.bytes) != 0)
		fail_msg("wrap tensor %u differs from the file", id);
}

/* Acquire each tensor, then release the one before: two held at once, the
 * oldest released first (A, B, release A, C, release B, ...). */
static void run_hold2(struct kv_stream *s, uint32_t n, int passes)
{
	uint32_t prev = UINT32_MAX;

	for (int p = 0; p < passes; p++) {
		for (uint32_t i = 0; i < n; i++) {
			const void *d = NULL;
			int rc = kv_stream_acquire(s, w_order[i], &d);

			if (rc)
				fail_msg("pass %d: acquire of w%u holding w%u: %s: %s", p, i, prev,
					 kv_strerror(rc), kv_last_error());
			check_wtensor(w_order[i], d);
			kv_assert_ok(kv_stream_validate(s));
			if (prev != UINT32_MAX)
				kv_assert_ok(kv_stream_release(s, prev));
			prev = w_order[i];
		}
	}
	kv_assert_ok(kv_stream_release(s, prev));
	kv_assert_ok(kv_stream_validate(s));
}

/* The reproducer: 15, 25, 25 pages, hold 2, budget 50 pages. A FIFO ring
 * of 50 pages puts B at 15..40 and cannot place C beside it once A is
 * released, so holding two would fail mid-run. The stream must either
 * refuse the budget at create (-EINVAL naming it) or keep the hold. */
static void test_wrap_reproducer(void **state)
{
	const struct mode *m = *state;
	struct kv_registry *reg;

	kv_assert_ok(kv_registry_create(NULL, &reg));
	for (uint32_t la = 0; la <= 1; la++) {
		struct kv_stream_config cfg;
		struct kv_stream *s = NULL;
		int rc;

		wrap_config(&cfg, m, reg, g_widx3, 3, 2, la, 50);
		rc = kv_stream_create(&cfg, &s);
		if (rc) {
			assert_int_equal(rc, -EINVAL);
			assert_null(s);
			assert_non_null(strstr(kv_last_error(), "budget"));
			assert_non_null(strstr(kv_last_error(), "holding 2"));
			continue;
		}
		run_hold2(s, 3, 2);
		kv_stream_destroy(s);
	}
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* Six tensors in a budget of 74 pages (below the 130 of a pass): holding
 * two, releasing the oldest, never fails; the buffers stay in the budget. */
static void test_wrap_hold2(void **state)
{
	const struct mode *m = *state;
	struct kv_registry *reg;

	kv_assert_ok(kv_registry_create(NULL, &reg));
	for (uint32_t la = 0; la <= 2; la++) {
		struct kv_stream_config cfg;
		struct kv_stream_stats st;
		struct kv_stream *s;
		uint64_t dram;

		wrap_config(&cfg, m, reg, g_widx, W_N, 2, la, 74);
		kv_assert_ok(kv_stream_create(&cfg, &s));
		kv_assert_ok(kv_stream_stats(s, &st));
		assert_true(st.n_streamed > 0);
		assert_true(st.buffer_bytes <= cfg.budget_bytes);
		kv_assert_ok(kv_registry_bytes(reg, KV_TIER_DRAM, KV_ANY, KV_KIND_WEIGHTS, &dram));
		assert_int_equal(dram, m->backend == KV_STREAM_IO ? st.buffer_bytes : 0);
		run_hold2(s, W_N, 3);
		kv_assert_ok(kv_stream_stats(s, &st));
		assert_int_equal(st.bytes_read, st.streamed_bytes * 3 + st.resident_bytes);
		kv_stream_destroy(s);
	}
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* Hold 1 with read-ahead: after every acquire the next tensor's read is
 * issued (bytes_ahead > 0); a ring too small for the wrap would stop the
 * read-ahead until it drained, and the reads would stop overlapping. */
static void test_wrap_readahead(void **state)
{
	const struct mode *m = *state;
	struct kv_registry *reg;

	kv_assert_ok(kv_registry_create(NULL, &reg));
	for (uint32_t la = 1; la <= 2; la++) {
		struct kv_stream_config cfg;
		struct kv_stream_stats st;
		struct kv_stream *s;

		wrap_config(&cfg, m, reg, g_widx, W_N, 1, la, 74);
		kv_assert_ok(kv_stream_create(&cfg, &s));
		for (int p = 0; p < 3; p++) {
			for (uint32_t i = 0; i < W_N; i++) {
				const void *d = NULL;

				kv_assert_ok(kv_stream_acquire(s, w_order[i], &d));
				check_wtensor(w_order[i], d);
				kv_assert_ok(kv_stream_stats(s, &st));
				if (st.bytes_ahead == 0)
					fail_msg("lookahead %u, pass %d: nothing read ahead after w%u",
						 la, p, i);
				kv_assert_ok(kv_stream_validate(s));
				kv_assert_ok(kv_stream_release(s, w_order[i]));
			}
		}
		kv_assert_ok(kv_stream_stats(s, &st));
		assert_int_equal(st.bytes_read, st.streamed_bytes * 3 + st.resident_bytes);
		kv_stream_destroy(s);
	}
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* Make every submit to io fail (-ESHUTDOWN) as if it were being destroyed,
 * or stop doing so. */
static void engine_refuse(struct kv_io *io, bool on)
{
	pthread_mutex_lock(&io->q_lock);
	io->stopping = on;
	pthread_mutex_unlock(&io->q_lock);
}

/* A read that fails to submit gives its ring space back at once: retries
 * fail with the submit's error, not -ENOMEM from a ring filling up with
 * abandoned entries, and once the engine takes reads again all is well. */
static void test_submit_error(void **state)
{
	const struct mode *m = &io_threads_mode;
	struct kv_registry *reg;
	struct kv_stream_config cfg;
	struct kv_io_config ic;
	struct kv_io *io;
	struct kv_stream *s;
	const void *d;

	(void)state;
	kv_assert_ok(kv_registry_create(NULL, &reg));
	kv_io_config_default(&ic);
	ic.backend = m->io;
	ic.registry = reg;
	kv_assert_ok(kv_io_create(&ic, &io));
	wrap_config(&cfg, m, reg, g_widx, W_N, 2, 1, 74);
	cfg.io = io;
	kv_assert_ok(kv_stream_create(&cfg, &s));

	kv_assert_ok(kv_stream_acquire(s, 0, &d));   /* reads w0, w1 ahead */
	check_wtensor(0, d);
	engine_refuse(io, true);
	kv_assert_ok(kv_stream_acquire(s, 1, &d));   /* w2 ahead fails to submit */
	check_wtensor(1, d);
	kv_assert_ok(kv_stream_validate(s));
	kv_assert_ok(kv_stream_release(s, 0));       /* and again */
	kv_assert_ok(kv_stream_validate(s));
	for (int k = 0; k < 4; k++) {
		int rc = kv_stream_acquire(s, 2, &d);

		if (rc != -ESHUTDOWN)
			fail_msg("attempt %d: %s: %s", k, kv_strerror(rc), kv_last_error());
		assert_non_null(strstr(kv_last_error(), "'w2'"));
		kv_assert_ok(kv_stream_validate(s));
	}
	engine_refuse(io, false);
	kv_assert_ok(kv_stream_acquire(s, 2, &d));
	check_wtensor(2, d);
	kv_assert_ok(kv_stream_release(s, 1));
	for (uint32_t i = 3; i < W_N; i++) {
		kv_assert_ok(kv_stream_acquire(s, i, &d));
		check_wtensor(i, d);
		kv_assert_ok(kv_stream_release(s, i - 1));
		kv_assert_ok(kv_stream_validate(s));
	}
	kv_assert_ok(kv_stream_release(s, W_N - 1));
	kv_stream_destroy(s);
	kv_io_destroy(io, 0);
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* An index at 2^31 entries does not grow: cap * 2 would wrap to 0 and
 * realloc to 0 bytes would free the array. It fails with -ENOMEM and is
 * left as it was (and the entries are not walked: there are none). */
static void test_index_full(void **state)
{
	struct kv_tensor_info t = { .name = "x", .dtype = KV_DTYPE_U8, .n_dims = 1,
				    .shape = { 8 }, .bytes = 8 };
	struct kv_tensor_info *arr = calloc(1, sizeof(*arr));
	struct kv_tensor_index fake = { .t = arr, .n = 1u << 31, .cap = 1u << 31 };
	uint32_t id = 7;

	(void)state;
	assert_non_null(arr);
	kv_assert_rc(kv_tensor_index_add(&fake, &t, &id), -ENOMEM);
	assert_non_null(strstr(kv_last_error(), "full"));
	assert_ptr_equal(fake.t, arr);
	assert_int_equal(fake.n, 1u << 31);
	assert_int_equal(fake.cap, 1u << 31);
	assert_int_equal(id, 7);
	free(arr);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_index),
		cmocka_unit_test_prestate(test_passes, (void *)&io_uring_mode),
		cmocka_unit_test_prestate(test_passes, (void *)&io_threads_mode),
		cmocka_unit_test_prestate(test_passes, (void *)&mmap_mode),
		cmocka_unit_test_prestate(test_shared_engine_and_repeats, (void *)&io_uring_mode),
		cmocka_unit_test_prestate(test_shared_engine_and_repeats, (void *)&io_threads_mode),
		cmocka_unit_test_prestate(test_lookahead0_and_hold, (void *)&io_threads_mode),
		cmocka_unit_test_prestate(test_lookahead0_and_hold, (void *)&mmap_mode),
		cmocka_unit_test_prestate(test_all_resident, (void *)&io_threads_mode),
		cmocka_unit_test_prestate(test_all_resident, (void *)&mmap_mode),
		cmocka_unit_test_prestate(test_read_error, (void *)&io_uring_mode),
		cmocka_unit_test_prestate(test_read_error, (void *)&io_threads_mode),
		cmocka_unit_test_prestate(test_bad_config, (void *)&io_threads_mode),
		cmocka_unit_test_prestate(test_bad_config, (void *)&mmap_mode),
		cmocka_unit_test_prestate(test_wrap_reproducer, (void *)&io_threads_mode),
		cmocka_unit_test_prestate(test_wrap_reproducer, (void *)&mmap_mode),
		cmocka_unit_test_prestate(test_wrap_hold2, (void *)&io_threads_mode),
		cmocka_unit_test_prestate(test_wrap_hold2, (void *)&mmap_mode),
		cmocka_unit_test_prestate(test_wrap_readahead, (void *)&io_threads_mode),
		cmocka_unit_test_prestate(test_wrap_readahead, (void *)&mmap_mode),
		cmocka_unit_test(test_submit_error),
		cmocka_unit_test(test_index_full),
	};

	return cmocka_run_group_tests_name("stream", tests, group_setup, group_teardown);
}
