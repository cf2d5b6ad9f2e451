// SPDX-License-Identifier: MIT
/*
 * Seeded mutation test of the tier-descriptor cache reader: a valid cache
 * file for DRAM node 0 is cut at every length, mutated byte by byte and
 * token by token (numbers swapped for nan, inf, hex floats, overflowing or
 * negative values; lines duplicated, dropped, reordered, stretched past
 * the reader's line buffer), and replaced by random bytes; after each,
 * kv_tier_desc_dram(0, KV_DESC_NO_PROBE) must succeed, and each figure it
 * reports must either be hwloc's (as without a cache), or come from the
 * cache with a finite value inside the documented bounds that equals the
 * file's own line, or be absent (KV_SRC_NONE, zero). The cache lives in a
 * scratch $XDG_CACHE_HOME. KV_FUZZ_SEED / KV_FUZZ_ROUNDS override the seed.
 */
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <sys/stat.h>
#include <time.h>

#include "kvtest.h"

#define DEFAULT_ROUNDS 10000
#define FILE_MAX 1024

static const char g_valid[] =
	"libkv-tier-cache 1\n"
	"read_bw 12345678901.5\n"
	"write_bw 9876543210\n"
	"latency_ns 87.25\n"
	"dio_align 0\n";

static char g_home[256], g_path[PATH_MAX];
static struct kv_tier_desc g_base;    /* without a cache file */
static uint64_t g_round_seed;

/* The cache file's name for node 0, as the reader builds it: host and
 * device with every character outside [A-Za-z0-9._-] made '-'. */
static void cache_file_path(void)
{
	char host[256], *p;

	if (gethostname(host, sizeof(host)) != 0)
		snprintf(host, sizeof(host), "localhost");
	host[sizeof(host) - 1] = '\0';
	for (p = host; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
		      (*p >= '0' && *p <= '9') || *p == '.' || *p == '_' || *p == '-'))
			*p = '-';
	snprintf(g_path, sizeof(g_path), "%s/libkv/tier-%s-node0.txt", g_home, host);
}

static void write_cache(const void *p, size_t n)
{
	FILE *fp = fopen(g_path, "w");

	assert_non_null(fp);
	if (n)
		assert_int_equal(fwrite(p, 1, n, fp), n);
	assert_int_equal(fclose(fp), 0);
}

/* The value the file gives key (a line "key value\n" after the first);
 * NAN if no such line. Only consulted when the reader accepted the file,
 * so the file is then known to be well formed. */
static double file_value(const char *text, size_t n, const char *key)
{
	char pat[32], *copy, *at;
	double v = NAN;

	snprintf(pat, sizeof(pat), "\n%s ", key);
	copy = malloc(n + 1);
	assert_non_null(copy);
	memcpy(copy, text, n);
	copy[n] = '\0';
	at = strstr(copy, pat);
	if (at)
		v = strtod(at + strlen(pat), NULL);
	free(copy);
	return v;
}

struct tally {
	size_t accepted, ignored;
};

/* One figure: hwloc's as before, or the cache's and sane, or none. */
static bool check_figure(const char *name, enum kv_desc_source src, double v,
			 enum kv_desc_source base_src, double base_v, double lo, double hi,
			 const char *text, size_t n)
{
	if (base_src != KV_SRC_NONE) {
		if (src != base_src || v != base_v)
			fail_msg("%s: %s %g changed to %s %g by a cache file", name,
				 kv_desc_source_name(base_src), base_v, kv_desc_source_name(src), v);
		return false;
	}
	if (src == KV_SRC_NONE) {
		if (v != 0)
			fail_msg("%s: absent but %g", name, v);
		return false;
	}
	if (src != KV_SRC_CACHE)
		fail_msg("%s: from %s under KV_DESC_NO_PROBE", name, kv_desc_source_name(src));
	if (!isfinite(v) || v < lo || v > hi)
		fail_msg("%s: %g from the cache, outside [%g, %g]", name, v, lo, hi);
	if (v != file_value(text, n, name))
		fail_msg("%s: %g from the cache, the file says %g", name, v,
			 file_value(text, n, name));
	return true;
}

static void check_file(const void *text, size_t n, struct tally *t)
{
	struct kv_tier_desc d;
	unsigned from_cache = 0, wanted = 0;

	write_cache(text, n);
	memset(&d, 0xa5, sizeof(d));
	kv_assert_ok(kv_tier_desc_dram(0, KV_DESC_NO_PROBE, &d));
	assert_int_equal(d.tier, KV_TIER_DRAM);
	assert_int_equal(d.capacity_src, g_base.capacity_src);
	assert_int_equal(d.capacity_bytes, g_base.capacity_bytes);
	from_cache += check_figure("read_bw", d.read_bw_src, d.read_bw, g_base.read_bw_src,
				   g_base.read_bw, 1e5, 1e14, text, n);
	from_cache += check_figure("write_bw", d.write_bw_src, d.write_bw, g_base.write_bw_src,
				   g_base.write_bw, 1e5, 1e14, text, n);
	from_cache += check_figure("latency_ns", d.latency_src, d.latency_ns,
				   g_base.latency_src, g_base.latency_ns, 0.5, 1e10, text, n);
	wanted = (g_base.read_bw_src == KV_SRC_NONE) + (g_base.write_bw_src == KV_SRC_NONE) +
		 (g_base.latency_src == KV_SRC_NONE);
	/* A file is taken whole or not at all. */
	if (from_cache && from_cache != wanted)
		fail_msg("%u of %u missing figures taken from a cache file", from_cache, wanted);
	if (d.dio_align & (d.dio_align - 1))
		fail_msg("dio_align %" PRIu32 " is not a power of two", d.dio_align);
	if (from_cache)
		t->accepted++;
	else
		t->ignored++;
}

/* ---- Mutations ------------------------------------------------------------ */

static uint64_t rnd(uint64_t *rng, uint64_t n)
{
	return n ? kv_test_rand(rng) % n : 0;
}

/* Numbers and near-numbers that strtod and strtoul treat in odd ways. */
static const char *const g_tokens[] = {
	"nan", "-nan", "inf", "-inf", "infinity", "1e999", "-1e999", "1e-400", "0",
	"-0", "0x1p40", "0X1P-2", "1e14", "1.0000000000000001e14", "100000", "99999.99",
	"0.5", "0.49999999", "1e10", "10000000000.000001", "+5e9", " 5e9", "5e9 ",
	"5e9\t", "", "4096", "4097", "-4096", "4294967296", "18446744073709551616",
	"0x1000", "007", "1e", "e9", ".", "5e9x", "\xff", "0.0e0000000000000000000001",
	"1" "000000000000000000000000000000000000000000000000000000000000000000000000"
	"000000000000000000000000000000000000000000000000000000000000000000000000",
};

static const char *const g_keys[] = { "read_bw", "write_bw", "latency_ns", "dio_align",
				      "read_bwx", "READ_BW", "", "libkv-tier-cache" };

/* A file built line by line from keys and tokens: mostly well formed, so
 * the value checks are reached rather than the format checks. */
static size_t gen_lines(uint64_t *rng, char *out, size_t cap)
{
	size_t n = 0, lines = rnd(rng, 4) ? 4 : 2 + (size_t)rnd(rng, 5);
	int w;

	w = snprintf(out, cap, "%s", rnd(rng, 10) ? "libkv-tier-cache 1\n" : "libkv-tier-cache 1\r\n");
	n = (size_t)w;
	for (size_t i = 0; i < lines && n < cap; i++) {
		const char *key = rnd(rng, 12) ? g_keys[i % 4] : g_keys[rnd(rng, 8)];
		const char *val = rnd(rng, 8) ? NULL : g_tokens[rnd(rng, sizeof(g_tokens) / sizeof(g_tokens[0]))];
		char num[64];

		if (!val) {
			/* A plausible value, sometimes just outside the bounds. */
			double v = (i % 4 == 2 ? 1.0 : 1e5) * pow(10.0, (double)rnd(rng, 110) / 10.0);

			snprintf(num, sizeof(num), i % 4 == 3 ? "%.0f" : "%.17g",
				 i % 4 == 3 ? (double)(1u << rnd(rng, 24)) : v);
			val = num;
		}
		w = snprintf(out + n, cap - n, "%s%s%s%s", key, rnd(rng, 20) ? " " : "  ", val,
			     rnd(rng, 20) ? "\n" : "");
		if (w < 0 || (size_t)w >= cap - n)
			break;
		n += (size_t)w;
	}
	return n < cap ? n : cap - 1;
}

static size_t mutate(uint64_t *rng, char *buf, size_t n, size_t cap)
{
	switch (rnd(rng, 7)) {
	case 0: /* bit flips */
		for (uint64_t k = 1 + rnd(rng, 3); k && n; k--)
			buf[rnd(rng, n)] ^= (char)(1u << rnd(rng, 8));
		return n;
	case 1: /* bytes overwritten, NUL and newline among them */
		for (uint64_t k = 1 + rnd(rng, 4); k && n; k--) {
			static const char odd[] = { '\0', '\n', ' ', '\r', '-', '.', 'e', '9' };

			buf[rnd(rng, n)] = rnd(rng, 2) ? odd[rnd(rng, sizeof(odd))]
						       : (char)kv_test_rand(rng);
		}
		return n;
	case 2: /* truncation */
		return (size_t)rnd(rng, n + 1);
	case 3: { /* a span duplicated (a line twice, or half of one) */
		size_t a = (size_t)rnd(rng, n + 1), len = (size_t)rnd(rng, n - a + 1);

		if (n + len > cap)
			return n;
		memmove(buf + a + len, buf + a, n - a);
		return n + len;
	}
	case 4: { /* a span deleted */
		size_t a = (size_t)rnd(rng, n + 1), len = (size_t)rnd(rng, n - a + 1);

		memmove(buf + a, buf + a + len, n - a - len);
		return n - len;
	}
	case 5: { /* a long run inserted: lines past the reader's buffer */
		size_t a = (size_t)rnd(rng, n + 1), len = 100 + (size_t)rnd(rng, 200);
		char c = rnd(rng, 2) ? '9' : (char)('a' + rnd(rng, 26));

		if (n + len > cap)
			return n;
		memmove(buf + a + len, buf + a, n - a);
		memset(buf + a, c, len);
		return n + len;
	}
	default: { /* garbage appended */
		size_t len = 1 + (size_t)rnd(rng, 64);

		if (n + len > cap)
			return n;
		for (size_t i = 0; i < len; i++)
			buf[n + i] = (char)kv_test_rand(rng);
		return n + len;
	}
	}
}

/* ---- Tests ------------------------------------------------------------------ */

static int setup(void **state)
{
	char dir[PATH_MAX];

	(void)state;
	kv_test_private_cache(g_home, sizeof(g_home), "tiercache-fuzz");
	snprintf(dir, sizeof(dir), "%s/libkv", g_home);
	if (mkdir(dir, 0700) != 0)
		return -1;
	cache_file_path();
	/* Without a cache file, what hwloc (if anything) gives. */
	if (kv_tier_desc_dram(0, KV_DESC_NO_PROBE, &g_base) != 0)
		return -1;
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	kv_test_rmtree(g_home);
	return 0;
}

/* The valid file is taken (unless hwloc gave every figure), and so is it
 * at every length only when whole. */
static void test_truncations(void **state)
{
	struct tally t = { 0 };
	size_t n = sizeof(g_valid) - 1;

	(void)state;
	for (size_t len = 0; len <= n; len++)
		check_file(g_valid, len, &t);
	if (g_base.read_bw_src == KV_SRC_NONE)
		assert_int_equal(t.accepted, 1);
	printf("# %zu lengths: %zu accepted\n", n + 1, t.accepted);
}

/* Every byte of the valid file set to each of a few values. */
static void test_every_byte(void **state)
{
	static const char vals[] = { '\0', '\n', ' ', '0', '9', 'e', '-', '.', 'x', '\x80' };
	struct tally t = { 0 };
	char buf[sizeof(g_valid)];

	(void)state;
	for (size_t i = 0; i < sizeof(g_valid) - 1; i++)
		for (size_t v = 0; v < sizeof(vals); v++) {
			memcpy(buf, g_valid, sizeof(g_valid));
			buf[i] = vals[v];
			check_file(buf, sizeof(g_valid) - 1, &t);
		}
	printf("# %zu one-byte changes: %zu accepted\n", t.accepted + t.ignored, t.accepted);
}

static void test_seeded(void **state)
{
	const char *env_seed = getenv("KV_FUZZ_SEED"), *env_rounds = getenv("KV_FUZZ_ROUNDS");
	uint64_t seed = env_seed ? strtoull(env_seed, NULL, 0) : 0x7ea1cac4eull;
	uint64_t rounds = env_rounds ? strtoull(env_rounds, NULL, 0) : DEFAULT_ROUNDS;
	struct tally t = { 0 };
	struct timespec t0, t1;
	char buf[FILE_MAX];

	(void)state;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	printf("# seed 0x%" PRIx64 ", %" PRIu64 " rounds\n", seed, rounds);
	for (uint64_t k = 0; k < rounds; k++) {
		uint64_t rng = g_round_seed = seed + k * 0x9e3779b97f4a7c15ull;
		size_t n;

		switch (rnd(&rng, 4)) {
		case 0: /* the valid file, mutated */
			n = sizeof(g_valid) - 1;
			memcpy(buf, g_valid, n);
			for (uint64_t m = 1 + rnd(&rng, 3); m; m--)
				n = mutate(&rng, buf, n, sizeof(buf));
			break;
		case 1: /* pure random bytes, sometimes behind the right first line */
			n = (size_t)rnd(&rng, 300);
			for (size_t i = 0; i < n; i++)
				buf[i] = (char)kv_test_rand(&rng);
			if (rnd(&rng, 2) && n > 19)
				memcpy(buf, "libkv-tier-cache 1\n", 19);
			break;
		default: /* generated lines, sometimes mutated */
			n = gen_lines(&rng, buf, sizeof(buf));
			if (rnd(&rng, 3) == 0)
				n = mutate(&rng, buf, n, sizeof(buf));
			break;
		}
		check_file(buf, n, &t);
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("# %zu accepted, %zu ignored; %.2f s\n", t.accepted, t.ignored,
	       (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
	/* Both outcomes reached, or the generator checks little. */
	if (g_base.read_bw_src == KV_SRC_NONE)
		assert_true(t.accepted > rounds / 20);
	assert_true(t.ignored > rounds / 4);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_truncations),
		cmocka_unit_test(test_every_byte),
		cmocka_unit_test(test_seeded),
	};
	int rc = cmocka_run_group_tests(tests, setup, teardown);

	if (rc)
		printf("# last seeded round: KV_FUZZ_SEED=0x%" PRIx64 " KV_FUZZ_ROUNDS=1 replays it\n",
		       g_round_seed);
	return rc;
}
