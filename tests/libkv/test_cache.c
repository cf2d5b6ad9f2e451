/* SPDX-License-Identifier: MIT */
/*
 * The paged KV cache without an SSD tier: configuration errors, append /
 * write / read against a contiguous copy, fork and copy on write,
 * truncation, prefix hits and skipped tokens, deduplication, eviction
 * order (deepest first), pins, salts, events, admission, the sliding
 * window, quantisation bounds, registry records, and bad input leaving
 * everything unchanged. kv_cache_validate() runs after every change.
 */
#include <math.h>
#include <string.h>

#define L 2
#define H 2
#define D 8
#define T 4
#define ROW (H * D)

#include "cachetest.h"

static struct kv_registry *reg;

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
}

static struct kv_cache *make(uint32_t blocks)
{
	struct kv_cache_config cfg;
	struct kv_cache *c = NULL;

	config(&cfg, blocks);
	kv_assert_ok(kv_cache_create(&cfg, &c));
	return c;
}

static void check(struct kv_cache *c)
{
	kv_assert_ok(kv_cache_validate(c));
}

static uint64_t live_records(void)
{
	uint64_t n = 0;

	kv_registry_count(reg, KV_ANY, KV_ANY, KV_ANY, &n);
	return n;
}

/* ---- configuration ---------------------------------------------------- */

static void test_config_errors(void **state)
{
	struct kv_cache_config cfg;
	struct kv_cache *c = (struct kv_cache *)&cfg;
	uint64_t before = live_records();
	char salt[300] = { 0 };

	(void)state;

#define BAD(stmt, want, word)                                                            \
	do {                                                                              \
		config(&cfg, 16);                                                         \
		stmt;                                                                     \
		kv_assert_rc(kv_cache_create(&cfg, &c), want);                            \
		assert_ptr_equal(c, (struct kv_cache *)&cfg);                             \
		if (!strstr(kv_last_error(), word))                                       \
			fail_msg("detail '%s' lacks '%s'", kv_last_error(), word);        \
	} while (0)
	BAD(cfg.n_layers = 0, -EINVAL, "n_layers");
	BAD(cfg.n_kv_heads = 0, -EINVAL, "n_kv_heads");
	BAD(cfg.head_dim = 0, -EINVAL, "head_dim");
	BAD(cfg.block_tokens = 0, -EINVAL, "block_tokens");
	BAD(cfg.block_tokens = 1u << 20, -EINVAL, "block_tokens");
	BAD(cfg.capacity_blocks = 0, -EINVAL, "capacity");
	BAD((cfg.capacity_blocks = 0, cfg.capacity_bytes = 100), -EINVAL, "capacity_bytes");
	BAD((cfg.capacity_blocks = 0, cfg.capacity_bytes = UINT64_MAX), -EINVAL, "absurd");
	BAD(cfg.capacity_blocks = 0x80000000u, -EINVAL, "absurd");
	BAD((cfg.n_layers = 1024, cfg.n_kv_heads = 1024, cfg.head_dim = 1024,
	     cfg.block_tokens = 1024), -EINVAL, "");
	BAD(cfg.dtype = KV_DTYPE_I32, -EINVAL, "dtype");
	BAD(cfg.max_seqs = 0, -EINVAL, "max_seqs");
	BAD((cfg.salt = salt, cfg.salt_len = sizeof(salt)), -EINVAL, "salt");
	BAD((cfg.salt = NULL, cfg.salt_len = 4), -EINVAL, "salt");
	BAD(cfg.spill.dir = "/tmp", -EINVAL, "model_key");
	BAD(cfg.hash = (enum kv_hash_kind)7, -EINVAL, "hash");
	BAD(cfg.window_mode = (enum kv_window_mode)9, -EINVAL, "window_mode");
	BAD(cfg.label = "", -EINVAL, "label");
#undef BAD
	kv_assert_rc(kv_cache_create(NULL, &c), -EINVAL);
	assert_int_equal(live_records(), before);
}

/* ---- append, write, read, truncate --------------------------------------- */

static void test_round_trip(void **state)
{
	struct kv_cache *c = make(64);
	struct kv_cache_layout lay;
	struct kv_seq_info info;
	int32_t tok[40];
	kv_seq_id s;

	(void)state;
	kv_cache_layout(c, &lay);
	assert_int_equal(lay.blocks_total, 64);
	assert_int_equal(lay.head_bytes, T * D * 4);
	assert_true(lay.header_offset >= L * lay.layer_bytes);
	assert_int_equal(lay.block_bytes, lay.header_offset + lay.header_bytes);
	kv_assert_ok(kv_seq_create(c, NULL, &s));
	tokens_seq(tok, 40, 100);
	/* One token at a time, then in bulk; writes in uneven pieces. */
	for (int i = 0; i < 7; i++)
		kv_assert_ok(kv_seq_append(c, s, tok + i, 1));
	kv_assert_ok(kv_seq_append(c, s, tok + 7, 33));
	check(c);
	write_all(c, s, 1, 0, 3);
	write_all(c, s, 1, 3, 10);
	write_all(c, s, 1, 13, 27);
	check(c);
	expect(c, s, 1, 0, 40);
	expect(c, s, 1, 5, 9);
	kv_assert_ok(kv_seq_info(c, s, &info));
	assert_int_equal(info.len, 40);
	assert_int_equal(info.written, 40);
	assert_int_equal(info.blocks, 10);
	assert_int_equal(info.blocks_held, 10);

	/* Roll back 6 tokens, append others, write them, read all. */
	kv_assert_ok(kv_seq_truncate(c, s, 34));
	check(c);
	kv_assert_ok(kv_seq_info(c, s, &info));
	assert_int_equal(info.len, 34);
	assert_int_equal(info.blocks, 9);
	tokens_seq(tok, 6, 900);
	kv_assert_ok(kv_seq_append(c, s, tok, 6));
	write_all(c, s, 2, 34, 6);
	expect(c, s, 1, 0, 34);
	expect(c, s, 2, 34, 6);
	{
		int32_t got[6];

		kv_assert_ok(kv_seq_tokens(c, s, 34, 6, got));
		assert_memory_equal(got, tok, sizeof(got));
	}
	check(c);
	kv_assert_ok(kv_seq_free(c, s));
	check(c);
	kv_assert_ok(kv_cache_destroy(c));
}

static void test_bad_input(void **state)
{
	struct kv_cache *c = make(8);
	struct kv_cache_stats st0, st1;
	float k[ROW * 40] = { 0 }, v[ROW * 40] = { 0 };
	int32_t tok[40];
	kv_seq_id s, dead;

	(void)state;
	tokens_seq(tok, 40, 1);
	kv_assert_ok(kv_seq_create(c, NULL, &dead));
	kv_assert_ok(kv_seq_free(c, dead));
	kv_assert_rc(kv_seq_append(c, dead, tok, 1), -ENOENT);
	kv_assert_rc(kv_seq_write(c, dead, 0, 0, 1, k, v), -ENOENT);
	kv_assert_rc(kv_seq_free(c, dead), -ENOENT);
	kv_assert_rc(kv_seq_append(c, 0, tok, 1), -ENOENT);
	kv_assert_rc(kv_seq_append(c, ((uint64_t)1 << 32) | 5000, tok, 1), -ENOENT);

	kv_assert_ok(kv_seq_create(c, NULL, &s));
	kv_assert_ok(kv_seq_append(c, s, tok, 6));
	write_all(c, s, 3, 0, 6);
	kv_cache_stats(c, &st0);
	kv_assert_rc(kv_seq_write(c, s, 0, 5, 2, k, v), -EINVAL);  /* past the length */
	kv_assert_rc(kv_seq_write(c, s, L, 0, 1, k, v), -EINVAL);  /* layer */
	kv_assert_rc(kv_seq_write(c, s, 0, 0, 1, NULL, v), -EINVAL);
	kv_assert_rc(kv_seq_read(c, s, 0, 4, 3, k, v), -EINVAL);   /* not written */
	kv_assert_rc(kv_seq_read(c, s, L + 3, 0, 1, k, v), -EINVAL);
	kv_assert_rc(kv_seq_truncate(c, s, 7), -EINVAL);
	kv_assert_ok(kv_seq_append(c, s, tok, 4));
	kv_assert_rc(kv_seq_write(c, s, 0, 8, 1, k, v), -EINVAL);  /* gap at 6..7 */
	/* More than the cache holds: nothing appended. */
	kv_assert_rc(kv_seq_append(c, s, tok, 40), -ENOMEM);
	kv_cache_stats(c, &st1);
	assert_int_equal(st1.blocks_used, st0.blocks_used + 1);
	assert_int_equal(st1.tokens, 10);
	expect(c, s, 3, 0, 6);
	check(c);
	kv_assert_ok(kv_cache_destroy(c));
}

/* ---- fork and copy on write ---------------------------------------------- */

static void test_fork_cow(void **state)
{
	struct kv_cache *c = make(64);
	struct kv_cache_stats st;
	struct kv_seq_info info;
	int32_t tok[16];
	kv_seq_id p, ch;

	(void)state;
	tokens_seq(tok, 16, 7);
	kv_assert_ok(kv_seq_create(c, NULL, &p));
	kv_assert_ok(kv_seq_append(c, p, tok, 10));  /* blocks 0, 1 full, 2 partial */
	write_all(c, p, 1, 0, 10);
	kv_assert_ok(kv_seq_fork(c, p, &ch));
	check(c);
	kv_assert_ok(kv_seq_info(c, ch, &info));
	assert_int_equal(info.blocks_shared, 3);
	expect(c, ch, 1, 0, 10);
	/* Both grow differently from the shared partial block. */
	kv_assert_ok(kv_seq_append(c, p, tok + 10, 2));
	kv_assert_ok(kv_seq_append(c, ch, tok + 3, 2));
	write_all(c, p, 1, 10, 2);
	write_all(c, ch, 2, 10, 2);
	check(c);
	expect(c, p, 1, 0, 12);
	expect(c, ch, 1, 0, 10);
	expect(c, ch, 2, 10, 2);
	kv_cache_stats(c, &st);
	assert_true(st.cow_copies >= 1);
	/* A rewrite of a shared full block copies it too. */
	write_all(c, ch, 5, 0, 4);
	expect(c, ch, 5, 0, 4);
	expect(c, p, 1, 0, 4);
	check(c);
	kv_assert_ok(kv_seq_free(c, p));
	expect(c, ch, 5, 0, 4);
	expect(c, ch, 1, 4, 6);
	kv_assert_ok(kv_seq_free(c, ch));
	check(c);
	kv_cache_stats(c, &st);
	assert_int_equal(st.blocks_used, 0);
	kv_assert_ok(kv_cache_destroy(c));
}

/* ---- prefix cache ---------------------------------------------------------- */

static void test_prefix_hits(void **state)
{
	struct kv_cache *c = make(64);
	struct kv_cache_stats st;
	struct kv_prefix_hit hit;
	uint32_t cached;
	int32_t tok[30];
	kv_seq_id a, b, x;

	(void)state;
	tokens_seq(tok, 30, 50);
	kv_assert_ok(kv_seq_create(c, NULL, &a));
	kv_assert_ok(kv_seq_prompt(c, a, tok, 30, &cached));
	assert_int_equal(cached, 0);
	write_all(c, a, 1, 0, 30);
	check(c);
	kv_assert_ok(kv_cache_lookup(c, tok, 30, NULL, 0, &hit));
	assert_int_equal(hit.dram_tokens, 28);  /* 7 full blocks, no n - 1 cap */
	assert_int_equal(hit.blocks_hashed, 7);
	kv_assert_ok(kv_seq_free(c, a));
	check(c);
	kv_cache_stats(c, &st);
	assert_int_equal(st.blocks_cached, 7);
	assert_int_equal(st.blocks_used, 0);

	/* The same prompt: 7 blocks, but one token is left to compute. */
	kv_assert_ok(kv_seq_create(c, NULL, &b));
	kv_assert_ok(kv_seq_prompt(c, b, tok, 28, &cached));
	assert_int_equal(cached, 24);
	check(c);
	expect(c, b, 1, 0, 24);
	write_all(c, b, 1, 24, 4);
	check(c);  /* block 6 deduplicated against the cached one */
	kv_cache_stats(c, &st);
	assert_int_equal(st.dedups, 1);
	assert_int_equal(st.tokens_skipped, 24);
	assert_int_equal(st.hit_blocks_dram, 6);
	assert_int_equal(st.lookup_blocks, 7 + 6);  /* a's prompt missed 7 */
	assert_true(fabs(st.hit_rate_dram - 6.0 / 13) < 1e-12);
	/* A longer prompt sharing 2 blocks and then diverging. */
	tok[9] = 999;
	kv_assert_ok(kv_seq_create(c, NULL, &x));
	kv_assert_ok(kv_seq_prompt(c, x, tok, 20, &cached));
	assert_int_equal(cached, 8);
	expect(c, x, 1, 0, 8);
	kv_assert_ok(kv_seq_free(c, x));
	kv_assert_ok(kv_seq_free(c, b));
	check(c);
	kv_assert_ok(kv_cache_destroy(c));
}

static void test_salt_isolation(void **state)
{
	struct kv_cache *c = make(64);
	struct kv_seq_config sc = { 0 };
	struct kv_prefix_hit hit;
	uint32_t cached;
	int32_t tok[17];
	kv_seq_id a, b;

	(void)state;
	tokens_seq(tok, 17, 1);
	sc.salt = "tenant-a";
	sc.salt_len = 8;
	kv_assert_ok(kv_seq_create(c, &sc, &a));
	kv_assert_ok(kv_seq_prompt(c, a, tok, 17, &cached));
	write_all(c, a, 1, 0, 17);
	kv_assert_ok(kv_seq_free(c, a));
	sc.salt = "tenant-b";
	kv_assert_ok(kv_seq_create(c, &sc, &b));
	kv_assert_ok(kv_seq_prompt(c, b, tok, 17, &cached));
	assert_int_equal(cached, 0);
	kv_assert_ok(kv_cache_lookup(c, tok, 17, "tenant-b", 8, &hit));
	assert_int_equal(hit.dram_tokens, 0);
	kv_assert_ok(kv_cache_lookup(c, tok, 17, NULL, 0, &hit));
	assert_int_equal(hit.dram_tokens, 0);
	kv_assert_ok(kv_cache_lookup(c, tok, 17, "tenant-a", 8, &hit));
	assert_int_equal(hit.dram_tokens, 16);
	kv_assert_ok(kv_seq_free(c, b));
	check(c);
	kv_assert_ok(kv_cache_destroy(c));
}

/* A chain of 6 blocks, cached; pressure takes its blocks deepest first. */
static void test_evict_deepest_first(void **state)
{
	struct kv_cache *c = make(8);
	struct kv_prefix_hit hit;
	int32_t tok[24], other[8];
	kv_seq_id a, b;
	uint32_t cached, last = 24;

	(void)state;
	tokens_seq(tok, 24, 1);
	tokens_seq(other, 8, 5000);
	kv_assert_ok(kv_seq_create(c, NULL, &a));
	kv_assert_ok(kv_seq_prompt(c, a, tok, 24, &cached));
	write_all(c, a, 1, 0, 24);
	kv_assert_ok(kv_seq_free(c, a));
	kv_assert_ok(kv_seq_create(c, NULL, &b));
	/* Each new block past the 2 free ones evicts one cached block. */
	for (uint32_t i = 0; i < 8; i++) {
		kv_assert_ok(kv_seq_append(c, b, other, T));
		check(c);
		kv_assert_ok(kv_cache_lookup(c, tok, 24, NULL, 0, &hit));
		if (hit.dram_tokens > last || (last - hit.dram_tokens) % T)
			fail_msg("step %u: hit went from %u to %u tokens", i, last, hit.dram_tokens);
		last = hit.dram_tokens;
		if (i < 2)
			assert_int_equal(hit.dram_tokens, 24);
		else
			assert_int_equal(hit.dram_tokens, 24 - (i - 1) * T);
	}
	kv_assert_ok(kv_seq_free(c, b));
	kv_assert_ok(kv_cache_destroy(c));
}

static void test_pin(void **state)
{
	struct kv_cache *c = make(8);
	struct kv_prefix_hit hit;
	struct kv_cache_stats st;
	int32_t tok[12], other[4];
	uint32_t cached, pinned;
	kv_seq_id a, b;

	(void)state;
	tokens_seq(tok, 12, 1);
	tokens_seq(other, 4, 700);
	kv_assert_ok(kv_seq_create(c, NULL, &a));
	kv_assert_ok(kv_seq_prompt(c, a, tok, 12, &cached));
	write_all(c, a, 1, 0, 12);
	kv_assert_ok(kv_seq_free(c, a));
	kv_assert_ok(kv_cache_pin(c, tok, 8, NULL, 0, &pinned));
	assert_int_equal(pinned, 8);
	check(c);
	kv_cache_stats(c, &st);
	assert_int_equal(st.blocks_pinned, 2);
	/* Fill the cache: the unpinned block goes, the pinned ones stay. */
	kv_assert_ok(kv_seq_create(c, NULL, &b));
	for (int i = 0; i < 6; i++)
		kv_assert_ok(kv_seq_append(c, b, other, 4));
	kv_assert_rc(kv_seq_append(c, b, other, 4), -ENOMEM);
	check(c);
	kv_assert_ok(kv_cache_lookup(c, tok, 12, NULL, 0, &hit));
	assert_int_equal(hit.dram_tokens, 8);
	kv_assert_ok(kv_cache_unpin(c, tok, 8, NULL, 0));
	kv_assert_rc(kv_cache_unpin(c, tok, 8, NULL, 0), -ENOENT);
	check(c);
	kv_assert_ok(kv_seq_append(c, b, other, 4));
	kv_assert_ok(kv_cache_lookup(c, tok, 12, NULL, 0, &hit));
	assert_int_equal(hit.dram_tokens, 4);
	kv_assert_ok(kv_seq_free(c, b));
	check(c);
	kv_assert_ok(kv_cache_destroy(c));
}

static void test_priority(void **state)
{
	struct kv_cache *c = make(6);
	struct kv_seq_config hi = { .priority = 3 }, lo = { .priority = 0 };
	struct kv_prefix_hit hit;
	int32_t ta[8], tb[8], other[4];
	uint32_t cached;
	kv_seq_id a, b, x;

	(void)state;
	tokens_seq(ta, 8, 1);
	tokens_seq(tb, 8, 100);
	tokens_seq(other, 4, 700);
	/* High priority first (older), low priority second (newer). */
	kv_assert_ok(kv_seq_create(c, &hi, &a));
	kv_assert_ok(kv_seq_prompt(c, a, ta, 8, &cached));
	write_all(c, a, 1, 0, 8);
	kv_assert_ok(kv_seq_free(c, a));
	kv_assert_ok(kv_seq_create(c, &lo, &b));
	kv_assert_ok(kv_seq_prompt(c, b, tb, 8, &cached));
	write_all(c, b, 1, 0, 8);
	kv_assert_ok(kv_seq_free(c, b));
	kv_assert_ok(kv_seq_create(c, NULL, &x));
	for (int i = 0; i < 4; i++)
		kv_assert_ok(kv_seq_append(c, x, other, 4));
	kv_assert_ok(kv_cache_lookup(c, ta, 8, NULL, 0, &hit));
	assert_int_equal(hit.dram_tokens, 8);
	kv_assert_ok(kv_cache_lookup(c, tb, 8, NULL, 0, &hit));
	assert_int_equal(hit.dram_tokens, 0);
	kv_assert_ok(kv_seq_free(c, x));
	check(c);
	kv_assert_ok(kv_cache_destroy(c));
}

/* ---- events ---------------------------------------------------------------- */

struct ev_log {
	uint32_t n[4];
	int32_t first_token;
	uint32_t last_depth;
};

static void on_event(void *ctx, const struct kv_cache_event *ev)
{
	struct ev_log *log = ctx;

	log->n[ev->type]++;
	if (ev->type == KV_EVENT_STORED) {
		assert_int_equal(ev->hash_len, 16);
		assert_int_equal(ev->n_tokens, T);
		log->first_token = ev->tokens[0];
		log->last_depth = ev->depth;
	}
}

static void test_events(void **state)
{
	struct kv_cache_config cfg;
	struct ev_log log = { { 0 }, 0, 0 };
	struct kv_cache *c;
	int32_t tok[12], other[4];
	uint32_t cached;
	kv_seq_id a, b;

	(void)state;
	config(&cfg, 4);
	cfg.on_event = on_event;
	cfg.event_ctx = &log;
	kv_assert_ok(kv_cache_create(&cfg, &c));
	tokens_seq(tok, 12, 40);
	tokens_seq(other, 4, 400);
	kv_assert_ok(kv_seq_create(c, NULL, &a));
	kv_assert_ok(kv_seq_prompt(c, a, tok, 12, &cached));
	write_all(c, a, 1, 0, 12);
	assert_int_equal(log.n[KV_EVENT_STORED], 3);
	assert_int_equal(log.first_token, 48);
	assert_int_equal(log.last_depth, 2);
	kv_assert_ok(kv_seq_free(c, a));
	kv_assert_ok(kv_seq_create(c, NULL, &b));
	kv_assert_ok(kv_seq_append(c, b, other, 4));
	kv_assert_ok(kv_seq_append(c, b, other, 4));
	assert_int_equal(log.n[KV_EVENT_EVICTED], 1);
	kv_assert_ok(kv_seq_free(c, b));
	kv_assert_ok(kv_cache_destroy(c));
}


/* SHA-256 chain hashes behave as XXH3-128 ones do, 32 bytes each. */
static void test_sha256(void **state)
{
	struct kv_cache_config cfg;
	struct kv_cache *c;
	uint32_t cached;
	int32_t tok[9];
	kv_seq_id a, b;
	int rc;

	(void)state;
	config(&cfg, 16);
	cfg.hash = KV_HASH_SHA256;
	rc = kv_cache_create(&cfg, &c);
	if (rc == -ENOTSUP) {
		print_message("skipped: %s\n", kv_last_error());
		return;
	}
	kv_assert_ok(rc);
	tokens_seq(tok, 9, 77);
	kv_assert_ok(kv_seq_create(c, NULL, &a));
	kv_assert_ok(kv_seq_prompt(c, a, tok, 9, &cached));
	write_all(c, a, 1, 0, 9);
	kv_assert_ok(kv_seq_free(c, a));
	kv_assert_ok(kv_seq_create(c, NULL, &b));
	kv_assert_ok(kv_seq_prompt(c, b, tok, 9, &cached));
	assert_int_equal(cached, 8);
	expect(c, b, 1, 0, 8);
	check(c);
	kv_assert_ok(kv_cache_destroy(c));
}

/* The cache's counters are a stats source of its registry. */
struct stat_find {
	double total, used;
	bool seen;
};

static int visit_stats(void *ctx, const char *source, const struct kv_stat *st, size_t n,
		       int err)
{
	struct stat_find *f = ctx;

	if (strcmp(source, "cache.kv") || err)
		return 0;
	f->seen = true;
	for (size_t i = 0; i < n; i++) {
		if (!strcmp(st[i].name, "blocks_total"))
			f->total = st[i].value;
		if (!strcmp(st[i].name, "blocks_used"))
			f->used = st[i].value;
	}
	return 0;
}

static void test_stats_source(void **state)
{
	struct kv_cache *c = make(12);
	struct stat_find f = { 0, 0, false };
	int32_t tok[9];
	kv_seq_id a;
	char *buf = NULL;
	size_t len = 0;
	FILE *mf;

	(void)state;
	tokens_seq(tok, 9, 1);
	kv_assert_ok(kv_seq_create(c, NULL, &a));
	kv_assert_ok(kv_seq_append(c, a, tok, 9));
	kv_assert_ok(kv_registry_stats_foreach(reg, visit_stats, &f));
	assert_true(f.seen);
	assert_true(f.total == 12);
	assert_true(f.used == 3);
	mf = open_memstream(&buf, &len);
	kv_assert_ok(kv_report_write(reg, mf, KV_REPORT_PROMETHEUS));
	fclose(mf);
	assert_non_null(strstr(buf, "source=\"cache.kv\",name=\"hit_rate_dram\""));
	free(buf);
	kv_assert_ok(kv_cache_destroy(c));
	f.seen = false;
	kv_assert_ok(kv_registry_stats_foreach(reg, visit_stats, &f));
	assert_false(f.seen);
}

/* KV_WINDOW_CACHE: blocks the window leaves stay hittable prefix blocks. */
static void test_window_cache_mode(void **state)
{
	struct kv_cache_config cfg;
	struct kv_cache *c;
	struct kv_prefix_hit hit;
	struct kv_cache_stats st;
	struct kv_seq_info info;
	int32_t tok[24];
	kv_seq_id s;

	(void)state;
	config(&cfg, 16);
	cfg.window = 5;
	cfg.window_mode = KV_WINDOW_CACHE;
	kv_assert_ok(kv_cache_create(&cfg, &c));
	tokens_seq(tok, 24, 1);
	kv_assert_ok(kv_seq_create(c, NULL, &s));
	for (uint32_t p = 0; p < 24; p++) {
		kv_assert_ok(kv_seq_append(c, s, tok + p, 1));
		write_all(c, s, 1, p, 1);
		check(c);
	}
	kv_assert_ok(kv_seq_info(c, s, &info));
	assert_int_equal(info.released, 16);
	kv_cache_stats(c, &st);
	assert_int_equal(st.blocks_cached, 4);  /* released, kept as entries */
	kv_assert_ok(kv_cache_lookup(c, tok, 24, NULL, 0, &hit));
	assert_int_equal(hit.dram_tokens, 24);
	kv_assert_ok(kv_seq_free(c, s));
	check(c);
	kv_assert_ok(kv_cache_destroy(c));
}

/* ---- admission --------------------------------------------------------------- */

static void test_admission(void **state)
{
	struct kv_cache *c = make(10);
	uint32_t need, avail, cached, n1 = 5, n2[2] = { 4, 24 };
	int32_t tok[20];
	kv_seq_id a, b, ids[2];

	(void)state;
	tokens_seq(tok, 20, 1);
	assert_int_equal(kv_cache_can_append(c, NULL, &n1, 1, &need, &avail), 1);
	assert_int_equal(need, 2);
	assert_int_equal(avail, 10);
	kv_assert_ok(kv_seq_create(c, NULL, &a));
	kv_assert_ok(kv_seq_prompt(c, a, tok, 6, &cached));
	write_all(c, a, 1, 0, 6);
	kv_assert_ok(kv_seq_fork(c, a, &b));
	ids[0] = a;
	ids[1] = b;
	/* a: 4 more tokens fill its shared tail (a copy) and one more
	 * block; b: 24 more need 6 blocks and a copy. */
	assert_int_equal(kv_cache_can_append(c, ids, n2, 2, &need, &avail), 0);
	assert_int_equal(need, 2 + 7);
	assert_int_equal(avail, 8);
	n2[1] = 10;
	assert_int_equal(kv_cache_can_append(c, ids, n2, 2, &need, &avail), 1);
	kv_assert_ok(kv_seq_free(c, b));
	/* Cached blocks count as available. */
	kv_assert_ok(kv_seq_free(c, a));
	assert_int_equal(kv_cache_can_append(c, NULL, &n1, 1, &need, &avail), 1);
	assert_int_equal(avail, 10);
	ids[0] = a;
	kv_assert_rc(kv_cache_can_append(c, ids, n2, 1, &need, &avail), -ENOENT);
	kv_assert_ok(kv_cache_destroy(c));
}

/* ---- sliding window --------------------------------------------------------- */

static void test_window(void **state)
{
	struct kv_cache_config cfg;
	struct kv_cache *c;
	struct kv_seq_info info;
	struct kv_cache_stats st;
	float k[ROW], v[ROW];
	int32_t tok[64];
	kv_seq_id s;

	(void)state;
	config(&cfg, 16);
	cfg.window = 6;
	kv_assert_ok(kv_cache_create(&cfg, &c));
	tokens_seq(tok, 64, 1);
	kv_assert_ok(kv_seq_create(c, NULL, &s));
	for (uint32_t p = 0; p < 40; p++) {
		kv_assert_ok(kv_seq_append(c, s, tok + p, 1));
		write_all(c, s, 1, p, 1);
		check(c);
		kv_assert_ok(kv_seq_info(c, s, &info));
		/* The token at p sees (p - 6, p]: blocks ending at or before
		 * p - 5 are gone. */
		uint32_t want = p + 1 > 6 ? (p + 1 - 6) / T * T : 0;
		assert_int_equal(info.released, want);
		assert_int_equal(info.blocks_held, info.blocks - want / T);
	}
	kv_cache_stats(c, &st);
	assert_true(st.blocks_used <= 3);
	expect(c, s, 1, 36, 4);
	kv_assert_rc(kv_seq_read(c, s, 0, 30, 1, k, v), -EINVAL);
	kv_assert_rc(kv_seq_truncate(c, s, 34), -EINVAL);
	kv_assert_ok(kv_seq_truncate(c, s, 38));
	check(c);
	kv_assert_ok(kv_seq_free(c, s));
	kv_assert_ok(kv_cache_destroy(c));
}

/* ---- quantised storage -------------------------------------------------------- */

static void quant_case(enum kv_dtype dt, double rel_bound)
{
	struct kv_cache_config cfg;
	struct kv_cache *c;
	float k[ROW * 20], v[ROW * 20], rk[ROW * 20], rv[ROW * 20];
	int32_t tok[20];
	double worst = 0;
	kv_seq_id s;

	config(&cfg, 16);
	cfg.dtype = dt;
	kv_assert_ok(kv_cache_create(&cfg, &c));
	tokens_seq(tok, 20, 1);
	kv_assert_ok(kv_seq_create(c, NULL, &s));
	kv_assert_ok(kv_seq_append(c, s, tok, 20));
	for (uint32_t l = 0; l < L; l++) {
		ct_fill(k, v, 9, l, 0, 20);
		/* Growing magnitudes, written a token at a time, so INT8
		 * scales grow and requantise. */
		for (uint32_t t = 0; t < 20; t++)
			for (uint32_t i = 0; i < ROW; i++) {
				k[t * ROW + i] *= 1.0f + (float)t;
				v[t * ROW + i] *= 1.0f + (float)(t % 5);
			}
		for (uint32_t t = 0; t < 20; t++)
			kv_assert_ok(kv_seq_write(c, s, l, t, 1, k + t * ROW, v + t * ROW));
		kv_assert_ok(kv_seq_read(c, s, l, 0, 20, rk, rv));
		/* Bound relative to the largest magnitude of the (block, head). */
		for (uint32_t t = 0; t < 20; t++)
			for (uint32_t h = 0; h < H; h++)
				for (int kvi = 0; kvi < 2; kvi++) {
					const float *src = kvi ? v : k, *got = kvi ? rv : rk;
					double amax = 0;

					for (uint32_t u = t / T * T; u < t / T * T + T; u++)
						for (uint32_t d = 0; d < D; d++)
							amax = fmax(amax, fabs(src[u * ROW + h * D + d]));
					for (uint32_t d = 0; d < D; d++) {
						size_t i = t * ROW + h * D + d;
						double e = fabs((double)got[i] - src[i]);
						double ref = dt == KV_DTYPE_I8 ? amax : fabs(src[i]);

						if (e > rel_bound * ref + 1e-30)
							fail_msg("%s: error %g at t %u h %u, bound %g x %g",
								 kv_dtype_name(dt), e, t, h, rel_bound, ref);
						if (ref > 0 && e / ref > worst)
							worst = e / ref;
					}
				}
	}
	print_message("%s: worst relative error %.3g (bound %.3g)\n", kv_dtype_name(dt), worst,
		      rel_bound);
	check(c);
	kv_assert_ok(kv_seq_free(c, s));
	kv_assert_ok(kv_cache_destroy(c));
}

static void test_quantised(void **state)
{
	(void)state;
	/* Half an ulp: 2^-11 for f16 (in its normal range), 2^-8 for bf16;
	 * INT8: scale < 2 absmax / 127 and error <= one step. */
	quant_case(KV_DTYPE_F16, 1.0 / 2048);
	quant_case(KV_DTYPE_BF16, 1.0 / 256);
	quant_case(KV_DTYPE_I8, 2.0 / 127);
}

/* ---- registry ------------------------------------------------------------------ */

static void test_registry_records(void **state)
{
	struct kv_cache_config cfg;
	struct kv_cache *c;
	struct kv_holder hu, hc, hf;
	struct kv_cache_layout lay;
	struct kv_cache_stats st;
	uint64_t kv_bytes = 0;
	int32_t tok[12];
	uint32_t cached;
	kv_seq_id a;

	(void)state;
	config(&cfg, 32);
	cfg.label = "reg-test";
	kv_assert_ok(kv_cache_create(&cfg, &c));
	kv_cache_layout(c, &lay);
	tokens_seq(tok, 12, 3);
	kv_assert_ok(kv_seq_create(c, NULL, &a));
	kv_assert_ok(kv_seq_prompt(c, a, tok, 10, &cached));
	write_all(c, a, 1, 0, 10);
	kv_assert_ok(kv_seq_fork(c, a, &a));
	kv_cache_stats(c, &st);
	kv_assert_ok(kv_registry_label(reg, "reg-test", &hu));
	kv_assert_ok(kv_registry_label(reg, "reg-test/cached", &hc));
	kv_assert_ok(kv_registry_label(reg, "reg-test/free", &hf));
	assert_true(hu.bytes >= (uint64_t)st.blocks_used * lay.block_bytes);
	assert_int_equal(hu.bytes % st.blocks_used, 0);
	assert_int_equal(hc.bytes, 0);
	kv_registry_bytes(reg, KV_TIER_DRAM, KV_ANY, KV_KIND_KV, &kv_bytes);
	assert_true(kv_bytes >= hu.bytes + hf.bytes);
	check(c);
	kv_assert_ok(kv_cache_destroy(c));
	kv_registry_bytes(reg, KV_TIER_DRAM, KV_ANY, KV_KIND_KV, &kv_bytes);
	assert_int_equal(kv_bytes, 0);
}

static int setup(void **state)
{
	(void)state;
	return kv_registry_create(NULL, &reg);
}

static int teardown(void **state)
{
	(void)state;
	return kv_registry_destroy(reg, 0);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_config_errors),
		cmocka_unit_test(test_round_trip),
		cmocka_unit_test(test_bad_input),
		cmocka_unit_test(test_fork_cow),
		cmocka_unit_test(test_prefix_hits),
		cmocka_unit_test(test_salt_isolation),
		cmocka_unit_test(test_evict_deepest_first),
		cmocka_unit_test(test_pin),
		cmocka_unit_test(test_priority),
		cmocka_unit_test(test_events),
		cmocka_unit_test(test_admission),
		cmocka_unit_test(test_window),
		cmocka_unit_test(test_quantised),
		cmocka_unit_test(test_registry_records),
		cmocka_unit_test(test_sha256),
		cmocka_unit_test(test_stats_source),
		cmocka_unit_test(test_window_cache_mode),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
