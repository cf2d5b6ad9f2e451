/* SPDX-License-Identifier: MIT */
/*
 * The KV cache's SSD tier: cached blocks spilled under pressure and read
 * back on a prefix hit (values identical), the index surviving a restart
 * (a reopened cache and a second process get the hits), a store of
 * another shape refused, swap out / in byte-identical, preemption by
 * recompute, a corrupted extent shortening a hit without harm, a full
 * store dropping its least recently used blocks, write-through, and
 * events. Every case runs on both I/O backends (io_uring, threads).
 */
#include <fcntl.h>
#include <math.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#define L 2
#define H 2
#define D 8
#define T 4
#define ROW (H * D)

#include "cachetest.h"

static struct kv_registry *reg;
static char dir[4096];
static enum kv_io_backend backend;
static struct kv_io *io;

static void config(struct kv_cache_config *cfg, uint32_t blocks)
{
	kv_cache_config_default(cfg);
	cfg->n_layers = L;
	cfg->n_kv_heads = H;
	cfg->head_dim = D;
	cfg->block_tokens = T;
	cfg->capacity_blocks = blocks;
	cfg->threads = 1;
	cfg->registry = reg;
	cfg->model_key = "test-model";
	cfg->spill.dir = dir;
	cfg->spill.io = io;
	cfg->spill.sync = KV_STORE_SYNC_NONE;
}

static struct kv_cache *make(uint32_t blocks, double watermark)
{
	struct kv_cache_config cfg;
	struct kv_cache *c = NULL;

	config(&cfg, blocks);
	cfg.spill.watermark = watermark;
	kv_assert_ok(kv_cache_create(&cfg, &c));
	return c;
}

static void check(struct kv_cache *c)
{
	kv_assert_ok(kv_cache_validate(c));
}

/* A prompt computed in full: its blocks end up in the prefix cache. */
static void compute(struct kv_cache *c, const int32_t *tok, uint32_t n, uint32_t tag)
{
	uint32_t cached;
	kv_seq_id s;

	kv_assert_ok(kv_seq_create(c, NULL, &s));
	kv_assert_ok(kv_seq_prompt(c, s, tok, n, &cached));
	write_all(c, s, tag, cached, n - cached);
	kv_assert_ok(kv_seq_free(c, s));
	check(c);
}

/* Fill DRAM with other sequences' blocks (kept live). */
static kv_seq_id pressure(struct kv_cache *c, uint32_t blocks)
{
	int32_t tok[T];
	kv_seq_id s;

	tokens_seq(tok, T, 90000);
	kv_assert_ok(kv_seq_create(c, NULL, &s));
	for (uint32_t i = 0; i < blocks; i++)
		kv_assert_ok(kv_seq_append(c, s, tok, T));
	check(c);
	return s;
}

static void fresh_dir(void)
{
	if (dir[0])
		kv_test_rmtree(dir);
	kv_test_mkdtemp(dir, sizeof(dir), "cache-spill");
}

/* ---- spill and read back --------------------------------------------------- */

struct ev_log {
	uint32_t n[4];
};

static void on_event(void *ctx, const struct kv_cache_event *ev)
{
	((struct ev_log *)ctx)->n[ev->type]++;
}

static void test_spill_and_load(void **state)
{
	struct kv_cache_config cfg;
	struct kv_cache *c;
	struct kv_prefix_hit hit;
	struct kv_cache_stats st;
	struct ev_log log = { { 0 } };
	int32_t tok[25];
	uint32_t cached;
	kv_seq_id p, s;

	(void)state;
	fresh_dir();
	config(&cfg, 10);
	cfg.spill.watermark = 1.0; /* spill on demand only */
	cfg.on_event = on_event;
	cfg.event_ctx = &log;
	kv_assert_ok(kv_cache_create(&cfg, &c));
	tokens_seq(tok, 25, 10);
	compute(c, tok, 25, 1);
	kv_assert_ok(kv_cache_lookup(c, tok, 25, NULL, 0, &hit));
	assert_int_equal(hit.dram_tokens, 24);
	/* Eight blocks of other work push the six cached ones out. */
	p = pressure(c, 8);
	kv_cache_stats(c, &st);
	assert_true(st.spills >= 4);
	assert_int_equal(st.spill_errors, 0);
	kv_assert_ok(kv_cache_lookup(c, tok, 25, NULL, 0, &hit));
	assert_int_equal(hit.dram_tokens + hit.ssd_tokens, 24);
	assert_true(hit.ssd_tokens >= 16);
	assert_true(log.n[KV_EVENT_SPILLED] >= 4);
	kv_assert_ok(kv_seq_free(c, p));
	/* The prompt again: the blocks come back from SSD, byte for byte. */
	kv_assert_ok(kv_seq_create(c, NULL, &s));
	kv_assert_ok(kv_seq_prompt(c, s, tok, 25, &cached));
	assert_int_equal(cached, 24);
	expect(c, s, 1, 0, 24);
	kv_cache_stats(c, &st);
	assert_true(st.loads >= 4);
	assert_true(st.hit_blocks_ssd >= 4);
	assert_true(log.n[KV_EVENT_LOADED] >= 4);
	check(c);
	kv_assert_ok(kv_seq_free(c, s));
	check(c);
	kv_assert_ok(kv_cache_destroy(c));
}

/* Past the watermark the spiller writes cached blocks out by itself. */
static void test_watermark(void **state)
{
	struct kv_cache *c;
	struct kv_cache_stats st;
	int32_t tok[33];
	kv_seq_id p;
	int i;

	(void)state;
	fresh_dir();
	c = make(16, 0.5);
	tokens_seq(tok, 33, 1);
	compute(c, tok, 33, 2);  /* 8 cached blocks */
	p = pressure(c, 4);      /* 12 of 16 in DRAM: over the mark of 8 */
	for (i = 0; i < 5000; i++) {
		kv_cache_stats(c, &st);
		if (st.blocks_used + st.blocks_cached <= 8 && st.blocks_spilling == 0)
			break;
		usleep(2000);
	}
	kv_cache_stats(c, &st);
	assert_true(st.blocks_used + st.blocks_cached <= 8);
	assert_true(st.spills >= 4);
	assert_true(st.blocks_spilled >= 4);
	check(c);
	kv_assert_ok(kv_seq_free(c, p));
	kv_assert_ok(kv_cache_destroy(c));
}

/* kv_cache_evict spills what the store lacks before freeing it. */
static void test_evict_spills(void **state)
{
	struct kv_cache *c;
	struct kv_prefix_hit hit;
	uint32_t n;
	int32_t tok[13];

	(void)state;
	fresh_dir();
	c = make(16, 1.0);
	tokens_seq(tok, 13, 7);
	compute(c, tok, 13, 3);
	kv_assert_ok(kv_cache_evict(c, UINT32_MAX, &n));
	assert_int_equal(n, 3);
	kv_assert_ok(kv_cache_lookup(c, tok, 13, NULL, 0, &hit));
	assert_int_equal(hit.dram_tokens, 0);
	assert_int_equal(hit.ssd_tokens, 12);
	check(c);
	kv_assert_ok(kv_cache_destroy(c));
}

/* ---- restart ------------------------------------------------------------------ */

static void test_restart(void **state)
{
	struct kv_cache *c;
	struct kv_prefix_hit hit;
	int32_t tok[41];
	uint32_t cached;
	kv_seq_id s;
	pid_t pid;
	int status;

	(void)state;
	fresh_dir();
	tokens_seq(tok, 41, 300);
	c = make(32, 0.9);
	compute(c, tok, 41, 4);
	kv_assert_ok(kv_cache_persist(c));
	kv_assert_ok(kv_cache_destroy(c));

	/* The same process, a new cache. */
	c = make(32, 0.9);
	kv_assert_ok(kv_cache_lookup(c, tok, 41, NULL, 0, &hit));
	assert_int_equal(hit.dram_tokens, 0);
	assert_int_equal(hit.ssd_tokens, 40);
	kv_assert_ok(kv_seq_create(c, NULL, &s));
	kv_assert_ok(kv_seq_prompt(c, s, tok, 41, &cached));
	assert_int_equal(cached, 40);
	expect(c, s, 4, 0, 40);
	kv_assert_ok(kv_seq_free(c, s));
	kv_assert_ok(kv_cache_destroy(c));

	/* A second process computes another prompt; this one finds it. */
	tokens_seq(tok, 41, 7000);
	pid = fork();
	assert_true(pid >= 0);
	if (pid == 0) {
		execl("/proc/self/exe", "test_cache_spill", "--child", dir, (char *)NULL);
		_exit(127);
	}
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFEXITED(status));
	assert_int_equal(WEXITSTATUS(status), 0);
	c = make(32, 0.9);
	kv_assert_ok(kv_seq_create(c, NULL, &s));
	kv_assert_ok(kv_seq_prompt(c, s, tok, 41, &cached));
	assert_int_equal(cached, 40);
	expect(c, s, 5, 0, 40);
	check(c);
	kv_assert_ok(kv_seq_free(c, s));
	kv_assert_ok(kv_cache_destroy(c));
}

static void test_other_shape_refused(void **state)
{
	struct kv_cache_config cfg;
	struct kv_cache *c = NULL;
	int32_t tok[9];

	(void)state;
	fresh_dir();
	tokens_seq(tok, 9, 1);
	c = make(8, 0.9);
	compute(c, tok, 9, 1);
	kv_assert_ok(kv_cache_destroy(c));
	c = NULL;
	config(&cfg, 8);
	cfg.head_dim = D * 2;
	kv_assert_rc(kv_cache_create(&cfg, &c), -ESTALE);
	assert_null(c);
	assert_non_null(strstr(kv_last_error(), "another cache shape"));
	config(&cfg, 8);
	cfg.dtype = KV_DTYPE_F16;
	kv_assert_rc(kv_cache_create(&cfg, &c), -ESTALE);
	config(&cfg, 8);
	cfg.model_key = "other-model";
	kv_assert_rc(kv_cache_create(&cfg, &c), -ESTALE);
	config(&cfg, 8);
	cfg.hash = KV_HASH_SHA256;
	kv_assert_rc(kv_cache_create(&cfg, &c), -ESTALE);
	/* The right shape still opens it, and nothing was lost. */
	c = make(8, 0.9);
	kv_assert_ok(kv_cache_destroy(c));
}

/* ---- swap and preemption --------------------------------------------------------- */

static void test_swap(void **state)
{
	struct kv_cache *c;
	struct kv_cache_stats st;
	struct kv_seq_info info;
	float k[ROW], v[ROW];
	int32_t tok[30];
	kv_seq_id a, b;
	uint32_t cached;

	(void)state;
	fresh_dir();
	c = make(20, 1.0);
	tokens_seq(tok, 30, 1);
	kv_assert_ok(kv_seq_create(c, NULL, &a));
	kv_assert_ok(kv_seq_prompt(c, a, tok, 30, &cached));
	write_all(c, a, 6, 0, 30);
	kv_assert_ok(kv_seq_fork(c, a, &b));  /* b shares all of a's blocks */
	kv_assert_ok(kv_seq_append(c, b, tok, 3));
	write_all(c, b, 7, 30, 3);
	kv_cache_stats(c, &st);
	uint32_t used = st.blocks_used;

	kv_assert_ok(kv_seq_swap_out(c, b));
	check(c);
	kv_assert_ok(kv_seq_info(c, b, &info));
	assert_true(info.swapped);
	assert_int_equal(info.len, 33);
	kv_cache_stats(c, &st);
	assert_int_equal(st.seqs_swapped, 1);
	assert_true(st.blocks_used < used);
	kv_assert_rc(kv_seq_append(c, b, tok, 1), -EBUSY);
	kv_assert_rc(kv_seq_read(c, b, 0, 0, 1, k, v), -EBUSY);
	kv_assert_rc(kv_seq_swap_out(c, b), -EBUSY);
	kv_assert_rc(kv_seq_swap_in(c, a), -EBUSY);
	/* a is free to change meanwhile. */
	write_all(c, a, 8, 28, 2);
	kv_assert_ok(kv_seq_swap_in(c, b));
	check(c);
	expect(c, b, 6, 0, 30);
	expect(c, b, 7, 30, 3);
	expect(c, a, 8, 28, 2);
	/* It works normally afterwards. */
	kv_assert_ok(kv_seq_append(c, b, tok, 2));
	write_all(c, b, 9, 33, 2);
	expect(c, b, 9, 33, 2);
	/* Swapped out and freed: its extents go. */
	kv_assert_ok(kv_seq_swap_out(c, a));
	kv_assert_ok(kv_seq_free(c, a));
	kv_assert_ok(kv_seq_free(c, b));
	check(c);
	kv_cache_stats(c, &st);
	assert_int_equal(st.swaps_out, 2);
	assert_int_equal(st.swaps_in, 1);
	kv_assert_ok(kv_cache_destroy(c));
}

static void test_preempt(void **state)
{
	struct kv_cache *c;
	uint32_t cached, re;
	int32_t tok[22];
	kv_seq_id s;

	(void)state;
	fresh_dir();
	c = make(16, 1.0);
	tokens_seq(tok, 22, 1);
	kv_assert_ok(kv_seq_create(c, NULL, &s));
	kv_assert_ok(kv_seq_prompt(c, s, tok, 22, &cached));
	write_all(c, s, 3, 0, 22);
	kv_assert_ok(kv_seq_preempt(c, s, &re));
	/* 5 full blocks stay cached; of 22 tokens, 20 are kept, but one
	 * token must be computed for its logits anyway (cap n - 1). */
	assert_int_equal(re, 2);
	check(c);
	kv_assert_rc(kv_seq_append(c, s, tok, 1), -EBUSY);
	kv_assert_ok(kv_seq_resume(c, s, &cached));
	assert_int_equal(cached, 20);
	expect(c, s, 3, 0, 20);
	write_all(c, s, 3, 20, 2);
	check(c);
	kv_assert_ok(kv_seq_free(c, s));
	kv_assert_ok(kv_cache_destroy(c));
}

/* ---- damaged or full store -------------------------------------------------------- */

static void test_corrupt_extent(void **state)
{
	struct kv_cache *c;
	char path[4200];
	int32_t tok[17];
	uint32_t n, cached;
	struct stat sb;
	kv_seq_id s;
	int fd;

	(void)state;
	fresh_dir();
	c = make(16, 1.0);
	tokens_seq(tok, 17, 1);
	compute(c, tok, 17, 2);
	kv_assert_ok(kv_cache_evict(c, UINT32_MAX, &n));
	assert_int_equal(n, 4);
	kv_assert_ok(kv_cache_destroy(c));
	/* Damage the second block header found in the data file (each
	 * extent starts with one). */
	snprintf(path, sizeof(path), "%s/store.data", dir);
	fd = open(path, O_RDWR);
	assert_true(fd >= 0);
	assert_int_equal(fstat(fd, &sb), 0);
	{
		char *buf = malloc((size_t)sb.st_size), junk[16];
		off_t at = -1;
		int seen = 0;

		assert_int_equal(pread(fd, buf, (size_t)sb.st_size, 0), sb.st_size);
		for (off_t o = 0; o + 8 <= sb.st_size; o += 64)
			if (!memcmp(buf + o, "KVBLOCK1", 8) && ++seen == 2) {
				at = o + 40;
				break;
			}
		assert_true(at > 0);
		memset(junk, 0x5a, sizeof(junk));
		assert_int_equal(pwrite(fd, junk, sizeof(junk), at), sizeof(junk));
		free(buf);
	}
	close(fd);
	c = make(16, 1.0);
	kv_assert_ok(kv_seq_create(c, NULL, &s));
	kv_assert_ok(kv_seq_prompt(c, s, tok, 17, &cached));
	assert_true(cached < 16);
	assert_int_equal(cached % T, 0);
	expect(c, s, 2, 0, cached);
	check(c);
	kv_assert_ok(kv_seq_free(c, s));
	kv_assert_ok(kv_cache_destroy(c));
}

static void test_store_full(void **state)
{
	struct kv_cache_config cfg;
	struct kv_cache *c;
	struct kv_cache_stats st;
	struct kv_cache_layout lay;
	int32_t tok[9];
	uint32_t n;

	(void)state;
	fresh_dir();
	config(&cfg, 8);
	cfg.spill.watermark = 1.0;
	kv_assert_ok(kv_cache_create(&cfg, &c));
	kv_cache_layout(c, &lay);
	kv_assert_ok(kv_cache_destroy(c));
	fresh_dir();
	/* Room for 6 blocks on SSD with 512-byte alignment (2 with 4096). */
	cfg.spill.capacity = 6 * ((lay.block_bytes + 511) / 512 * 512);
	kv_assert_ok(kv_cache_create(&cfg, &c));
	for (int r = 0; r < 8; r++) {
		tokens_seq(tok, 9, 1000 * (r + 1));
		compute(c, tok, 9, (uint32_t)r);
		kv_assert_ok(kv_cache_evict(c, UINT32_MAX, &n));
		check(c);
	}
	kv_cache_stats(c, &st);
	assert_true(st.ssd_evictions > 0);
	assert_true(st.blocks_spilled <= 6);
	/* The newest prompt is still there. */
	{
		struct kv_prefix_hit hit;

		kv_assert_ok(kv_cache_lookup(c, tok, 9, NULL, 0, &hit));
		assert_int_equal(hit.ssd_tokens, 8);
	}
	kv_assert_ok(kv_cache_destroy(c));
}

static void test_write_through(void **state)
{
	struct kv_cache_config cfg;
	struct kv_cache *c;
	struct kv_cache_stats st;
	int32_t tok[13];
	int i;

	(void)state;
	fresh_dir();
	config(&cfg, 16);
	cfg.spill.write_through = true;
	kv_assert_ok(kv_cache_create(&cfg, &c));
	tokens_seq(tok, 13, 5);
	compute(c, tok, 13, 1);
	for (i = 0; i < 5000; i++) {
		kv_cache_stats(c, &st);
		if (st.blocks_spilled == 3 && st.blocks_pinned == 0)
			break;
		usleep(2000);
	}
	assert_int_equal(st.blocks_spilled, 3);
	assert_int_equal(st.blocks_cached, 3);  /* still in DRAM too */
	check(c);
	kv_assert_ok(kv_cache_destroy(c));
}

static int setup(void **state)
{
	struct kv_io_config icfg;

	(void)state;
	kv_io_config_default(&icfg);
	icfg.backend = backend;
	if (kv_io_create(&icfg, &io))
		return -1;
	return kv_registry_create(NULL, &reg);
}

static int teardown(void **state)
{
	(void)state;
	kv_io_destroy(io, 0);
	io = NULL;
	if (dir[0])
		kv_test_rmtree(dir);
	dir[0] = 0;
	return kv_registry_destroy(reg, 0);
}

/* The second process of test_restart: compute a prompt into the store
 * in argv[2] and persist it. */
static int child(const char *store_dir)
{
	struct kv_cache_config cfg;
	struct kv_cache *c;
	int32_t tok[41];

	snprintf(dir, sizeof(dir), "%s", store_dir);
	config(&cfg, 32);
	cfg.registry = NULL;
	if (kv_cache_create(&cfg, &c))
		return 2;
	tokens_seq(tok, 41, 7000);
	compute(c, tok, 41, 5);
	return kv_cache_persist(c) || kv_cache_destroy(c) ? 3 : 0;
}

int main(int argc, char **argv)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_spill_and_load),
		cmocka_unit_test(test_watermark),
		cmocka_unit_test(test_evict_spills),
		cmocka_unit_test(test_restart),
		cmocka_unit_test(test_other_shape_refused),
		cmocka_unit_test(test_swap),
		cmocka_unit_test(test_preempt),
		cmocka_unit_test(test_corrupt_extent),
		cmocka_unit_test(test_store_full),
		cmocka_unit_test(test_write_through),
	};
	struct kv_io_config icfg;
	struct kv_io *probe;
	char cache[4096];
	int rc = 0;

	if (argc == 3 && !strcmp(argv[1], "--child"))
		return child(argv[2]);
	kv_test_private_cache(cache, sizeof(cache), "cache-spill-xdg");
	kv_io_config_default(&icfg);
	icfg.backend = KV_IO_URING;
	if (kv_io_create(&icfg, &probe) == 0) {
		kv_io_destroy(probe, 0);
		backend = KV_IO_URING;
		rc |= cmocka_run_group_tests_name("io_uring", tests, setup, teardown);
	} else {
		printf("io_uring unavailable here (%s): its group is skipped\n", kv_last_error());
	}
	backend = KV_IO_THREADS;
	rc |= cmocka_run_group_tests_name("threads", tests, setup, teardown);
	kv_test_rmtree(cache);
	return rc;
}
