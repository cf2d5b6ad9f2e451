// SPDX-License-Identifier: MIT
/*
 * Tier descriptors: DRAM and directory (SSD) descriptors, where each figure
 * came from (hwloc, OS, probe, cache), the cache's round trip and its
 * rejection of corrupt files, and the errors with their details. The cache
 * lives in a scratch $XDG_CACHE_HOME. Assertions on measured figures are
 * sanity only (finite, > 0): the machine may be noisy.
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <sys/stat.h>

#include "kvtest.h"

static char cache_home[256];

static int setup_all(void **state)
{
	(void)state;
	kv_test_private_cache(cache_home, sizeof(cache_home), "tiercache");
	return 0;
}

static int teardown_all(void **state)
{
	(void)state;
	kv_test_rmtree(cache_home);
	return 0;
}

static bool measured(enum kv_desc_source s)
{
	return s == KV_SRC_PROBE || s == KV_SRC_CACHE || s == KV_SRC_HWLOC;
}

static void assert_figure(double v, enum kv_desc_source src, const char *what)
{
	if (src == KV_SRC_NONE) {
		if (v != 0.0)
			fail_msg("%s is %g with source none", what, v);
		return;
	}
	if (!isfinite(v) || v <= 0.0)
		fail_msg("%s is %g from %s", what, v, kv_desc_source_name(src));
}

static void assert_desc_sane(const struct kv_tier_desc *d)
{
	assert_figure(d->read_bw, d->read_bw_src, "read_bw");
	assert_figure(d->write_bw, d->write_bw_src, "write_bw");
	assert_figure(d->latency_ns, d->latency_src, "latency_ns");
}

/* Whether any figure of d came from a probe (i.e. hwloc lacked it). */
static bool any_probed(const struct kv_tier_desc *d)
{
	return d->read_bw_src == KV_SRC_PROBE || d->write_bw_src == KV_SRC_PROBE ||
	       d->latency_src == KV_SRC_PROBE;
}

/* The cache file whose name ends in `suffix` ("-node0.txt"); "" if none. */
static void find_cache_file(const char *suffix, char *buf, size_t len)
{
	char dir[512];
	struct dirent *e;
	DIR *dp;

	buf[0] = '\0';
	snprintf(dir, sizeof(dir), "%s/libkv", cache_home);
	dp = opendir(dir);
	if (!dp)
		return;
	while ((e = readdir(dp)) != NULL) {
		size_t n = strlen(e->d_name), m = strlen(suffix);

		if (strncmp(e->d_name, "tier-", 5) == 0 && n > m &&
		    strcmp(e->d_name + n - m, suffix) == 0) {
			snprintf(buf, len, "%s/%s", dir, e->d_name);
			break;
		}
	}
	closedir(dp);
}

static void write_file(const char *path, const char *text)
{
	FILE *fp = fopen(path, "w");

	assert_non_null(fp);
	fputs(text, fp);
	assert_int_equal(fclose(fp), 0);
}

static size_t read_file(const char *path, char *buf, size_t len)
{
	FILE *fp = fopen(path, "r");
	size_t n;

	assert_non_null(fp);
	n = fread(buf, 1, len - 1, fp);
	buf[n] = '\0';
	fclose(fp);
	return n;
}

static void test_source_names(void **state)
{
	(void)state;
	assert_string_equal(kv_desc_source_name(KV_SRC_NONE), "none");
	assert_string_equal(kv_desc_source_name(KV_SRC_HWLOC), "hwloc");
	assert_string_equal(kv_desc_source_name(KV_SRC_OS), "os");
	assert_string_equal(kv_desc_source_name(KV_SRC_PROBE), "probe");
	assert_string_equal(kv_desc_source_name(KV_SRC_CACHE), "cache");
	assert_null(kv_desc_source_name((enum kv_desc_source)99));
}

static void test_dram_probe_then_cache(void **state)
{
	struct kv_tier_desc a, b;
	char path[1024];

	(void)state;
	kv_assert_ok(kv_tier_desc_dram(0, KV_DESC_FORCE_PROBE, &a));
	assert_int_equal(a.tier, KV_TIER_DRAM);
	assert_int_equal(a.node, 0);
	assert_string_equal(a.device, "node0");
	assert_string_equal(a.path, "");
	assert_false(a.persistent);
	assert_int_equal(a.capacity_src, KV_SRC_HWLOC);
	assert_true(a.capacity_bytes > 0);
	assert_true(a.read_bw_src == KV_SRC_PROBE || a.read_bw_src == KV_SRC_HWLOC);
	assert_true(a.write_bw_src == KV_SRC_PROBE || a.write_bw_src == KV_SRC_HWLOC);
	assert_true(a.latency_src == KV_SRC_PROBE || a.latency_src == KV_SRC_HWLOC);
	assert_desc_sane(&a);
	printf("# dram node 0: %.2f GB/s read (%s), %.2f GB/s copy (%s), %.1f ns (%s)\n",
	       a.read_bw / 1e9, kv_desc_source_name(a.read_bw_src),
	       a.write_bw / 1e9, kv_desc_source_name(a.write_bw_src),
	       a.latency_ns, kv_desc_source_name(a.latency_src));
	if (!any_probed(&a)) {
		printf("# hwloc reports every DRAM figure here: nothing is probed or cached\n");
		return;
	}

	find_cache_file("-node0.txt", path, sizeof(path));
	assert_true(path[0] != '\0');

	/* Without flags the figures come back from the cache, bit for bit. */
	kv_assert_ok(kv_tier_desc_dram(0, 0, &b));
	assert_int_equal(b.capacity_bytes, a.capacity_bytes);
	if (a.read_bw_src == KV_SRC_PROBE) {
		assert_int_equal(b.read_bw_src, KV_SRC_CACHE);
		assert_true(b.read_bw == a.read_bw);
	}
	if (a.write_bw_src == KV_SRC_PROBE) {
		assert_int_equal(b.write_bw_src, KV_SRC_CACHE);
		assert_true(b.write_bw == a.write_bw);
	}
	if (a.latency_src == KV_SRC_PROBE) {
		assert_int_equal(b.latency_src, KV_SRC_CACHE);
		assert_true(b.latency_ns == a.latency_ns);
	}

	/* KV_DESC_NO_CACHE ignores a good cache too. */
	kv_assert_ok(kv_tier_desc_dram(0, KV_DESC_NO_CACHE | KV_DESC_NO_PROBE, &b));
	assert_true(b.read_bw_src == KV_SRC_NONE || b.read_bw_src == KV_SRC_HWLOC);
	assert_true(b.latency_src == KV_SRC_NONE || b.latency_src == KV_SRC_HWLOC);
}

/* Each of these must make the reader ignore the file. */
static const char *const bad_caches[] = {
	"",
	"garbage\x01\x02 not a cache at all\n",
	"libkv-tier-cache 1\nread_bw 1e10\nwrite_bw 1e10\n",       /* truncated */
	"libkv-tier-cache 1\nread_bw 1e10\nwrite_bw 1e10\nlatency_ns 90\ndio_al",
	"libkv-tier-cache 1\nread_bw 1e10\nwrite_bw 1e10\nlatency_ns 90\ndio_align 0", /* no newline */
	"libkv-tier-cache 1\nread_bw -1e10\nwrite_bw 1e10\nlatency_ns 90\ndio_align 0\n",
	"libkv-tier-cache 1\nread_bw nan\nwrite_bw 1e10\nlatency_ns 90\ndio_align 0\n",
	"libkv-tier-cache 1\nread_bw 1e10\nwrite_bw inf\nlatency_ns 90\ndio_align 0\n",
	"libkv-tier-cache 1\nread_bw 1e10\nwrite_bw 1e10\nlatency_ns 0\ndio_align 0\n",
	"libkv-tier-cache 1\nread_bw 1e300\nwrite_bw 1e10\nlatency_ns 90\ndio_align 0\n",
	"libkv-tier-cache 1\nread_bw 1e10x\nwrite_bw 1e10\nlatency_ns 90\ndio_align 0\n",
	"libkv-tier-cache 1\nread_bw 1e10\nread_bw 1e10\nlatency_ns 90\ndio_align 0\n",
	"libkv-tier-cache 1\nread_bw 1e10\nwrite_bw 1e10\nlatency_ns 90\ndio_align 3000\n",
	"libkv-tier-cache 1\nread_bw 1e10\nwrite_bw 1e10\nlatency_ns 90\ndio_align -4096\n",
	"libkv-tier-cache 2\nread_bw 1e10\nwrite_bw 1e10\nlatency_ns 90\ndio_align 0\n",
	"libkv-tier-cache 1\nread_bw 1e10\nwrite_bw 1e10\nlatency_ns 90\ncolour blue\n",
};

static void test_dram_corrupt_cache(void **state)
{
	struct kv_tier_desc d;
	char path[1024], good[512];
	size_t n;

	(void)state;
	find_cache_file("-node0.txt", path, sizeof(path));
	if (!path[0]) {
		kv_assert_ok(kv_tier_desc_dram(0, KV_DESC_FORCE_PROBE, &d));
		if (!any_probed(&d))
			skip();
		find_cache_file("-node0.txt", path, sizeof(path));
	}
	assert_true(path[0] != '\0');
	n = read_file(path, good, sizeof(good));
	assert_true(n > 20);

	/* The good file is used... */
	kv_assert_ok(kv_tier_desc_dram(0, KV_DESC_NO_PROBE, &d));
	assert_true(d.read_bw_src == KV_SRC_CACHE || d.read_bw_src == KV_SRC_HWLOC);

	/* ...a bad one never: with probing off the figures stay unknown. */
	for (size_t i = 0; i < sizeof(bad_caches) / sizeof(bad_caches[0]); i++) {
		write_file(path, bad_caches[i]);
		kv_assert_ok(kv_tier_desc_dram(0, KV_DESC_NO_PROBE, &d));
		if (d.read_bw_src == KV_SRC_CACHE || d.write_bw_src == KV_SRC_CACHE ||
		    d.latency_src == KV_SRC_CACHE)
			fail_msg("corrupt cache #%zu was used", i);
		assert_desc_sane(&d);
	}

	/* A good file cut in half is rejected too. */
	good[n / 2] = '\0';
	write_file(path, good);
	kv_assert_ok(kv_tier_desc_dram(0, KV_DESC_NO_PROBE, &d));
	assert_true(d.read_bw_src != KV_SRC_CACHE);

	/* Without NO_PROBE a corrupt cache means a new probe, which rewrites
	 * the file, which the next call then reads. */
	write_file(path, "libkv-tier-cache 1\nread_bw nan\nwrite_bw nan\nlatency_ns nan\ndio_align 0\n");
	kv_assert_ok(kv_tier_desc_dram(0, 0, &d));
	assert_true(any_probed(&d));
	assert_desc_sane(&d);
	kv_assert_ok(kv_tier_desc_dram(0, KV_DESC_NO_PROBE, &d));
	assert_true(d.read_bw_src == KV_SRC_CACHE || d.read_bw_src == KV_SRC_HWLOC);
	assert_true(d.latency_src == KV_SRC_CACHE || d.latency_src == KV_SRC_HWLOC);
	assert_desc_sane(&d);
}

static void test_dram_no_probe_no_cache(void **state)
{
	struct kv_tier_desc d;

	(void)state;
	kv_assert_ok(kv_tier_desc_dram(0, KV_DESC_NO_PROBE | KV_DESC_NO_CACHE, &d));
	assert_int_equal(d.capacity_src, KV_SRC_HWLOC);
	assert_true(d.capacity_bytes > 0);
	assert_int_equal(d.free_bytes, 0);
	assert_true(d.read_bw_src == KV_SRC_NONE || d.read_bw_src == KV_SRC_HWLOC);
	assert_true(d.write_bw_src == KV_SRC_NONE || d.write_bw_src == KV_SRC_HWLOC);
	assert_true(d.latency_src == KV_SRC_NONE || d.latency_src == KV_SRC_HWLOC);
	assert_desc_sane(&d);
}

static void test_dram_bad_node(void **state)
{
	uint64_t mask = kv_numa_nodes();
	struct kv_tier_desc d;
	char want[32];
	int absent = -1;

	(void)state;
	assert_true(mask & 1u);
	for (int i = 0; i < 64; i++)
		if (!(mask & (UINT64_C(1) << i))) {
			absent = i;
			break;
		}
	if (absent >= 0) {
		kv_clear_error();
		kv_assert_rc(kv_tier_desc_dram(absent, 0, &d), -ENODEV);
		snprintf(want, sizeof(want), "node %d", absent);
		assert_non_null(strstr(kv_last_error(), want));
		assert_non_null(strstr(kv_last_error(), "no such NUMA node"));
	}
	kv_assert_rc(kv_tier_desc_dram(-1, 0, &d), -ENODEV);
	assert_non_null(strstr(kv_last_error(), "node -1"));
	kv_assert_rc(kv_tier_desc_dram(64, 0, &d), -ENODEV);
	assert_non_null(strstr(kv_last_error(), "node 64"));
}

static void test_bad_args(void **state)
{
	struct kv_tier_desc d;

	(void)state;
	kv_assert_rc(kv_tier_desc_dram(0, 0, NULL), -EINVAL);
	kv_assert_rc(kv_tier_desc_dram(0, KV_DESC_FORCE_PROBE | KV_DESC_NO_PROBE, &d), -EINVAL);
	kv_assert_rc(kv_tier_desc_dram(0, 0x100, &d), -EINVAL);
	kv_assert_rc(kv_tier_desc_dir(NULL, 0, &d), -EINVAL);
	kv_assert_rc(kv_tier_desc_dir("/tmp", 0, NULL), -EINVAL);
	kv_assert_rc(kv_tier_desc_dir("", 0, &d), -EINVAL);
	kv_assert_rc(kv_tier_desc_dir("/tmp", KV_DESC_FORCE_PROBE | KV_DESC_NO_PROBE, &d), -EINVAL);
}

static bool dir_is_empty(const char *dir)
{
	struct dirent *e;
	bool empty = true;
	DIR *dp = opendir(dir);

	assert_non_null(dp);
	while ((e = readdir(dp)) != NULL)
		if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
			empty = false;
	closedir(dp);
	return empty;
}

static void test_dir_probe_then_cache(void **state)
{
	struct kv_tier_desc a, b;
	char dir[256], path[1024], suffix[80];

	(void)state;
	kv_test_mkdtemp(dir, sizeof(dir), "tierdir");
	kv_assert_ok(kv_tier_desc_dir(dir, KV_DESC_FORCE_PROBE, &a));
	assert_int_equal(a.tier, KV_TIER_SSD);
	assert_int_equal(a.node, -1);
	assert_string_equal(a.path, dir);
	assert_true(strncmp(a.device, "dev ", 4) == 0);
	assert_true(a.persistent);
	assert_int_equal(a.capacity_src, KV_SRC_OS);
	assert_true(a.capacity_bytes > 0);
	assert_true(a.free_bytes <= a.capacity_bytes);
	assert_true(a.dio_align >= 512);
	assert_int_equal(a.dio_align & (a.dio_align - 1), 0);
	assert_int_equal(a.read_bw_src, KV_SRC_PROBE);
	assert_int_equal(a.write_bw_src, KV_SRC_PROBE);
	assert_int_equal(a.latency_src, KV_SRC_PROBE);
	assert_desc_sane(&a);
	printf("# dir %s (%s): write %.1f MB/s, read %.1f MB/s, latency %.1f us, dio_align %u\n",
	       dir, a.device, a.write_bw / 1e6, a.read_bw / 1e6, a.latency_ns / 1e3,
	       a.dio_align);
	assert_true(dir_is_empty(dir));

	/* The cache file is named after the device: "dev 254:0" -> "-dev-254-0.txt". */
	snprintf(suffix, sizeof(suffix), "-%s.txt", a.device);
	for (char *p = suffix; *p; p++)
		if (*p == ' ' || *p == ':')
			*p = '-';
	find_cache_file(suffix, path, sizeof(path));
	assert_true(path[0] != '\0');

	kv_assert_ok(kv_tier_desc_dir(dir, 0, &b));
	assert_int_equal(b.read_bw_src, KV_SRC_CACHE);
	assert_int_equal(b.write_bw_src, KV_SRC_CACHE);
	assert_int_equal(b.latency_src, KV_SRC_CACHE);
	assert_true(b.read_bw == a.read_bw);
	assert_true(b.write_bw == a.write_bw);
	assert_true(b.latency_ns == a.latency_ns);
	assert_int_equal(b.dio_align, a.dio_align);
	assert_true(dir_is_empty(dir));

	/* A corrupt device cache is ignored like a DRAM one. */
	write_file(path, "libkv-tier-cache 1\nread_bw 1e9\nwrite_bw 1e9\nlatency_ns 1e5\ndio_align 1000\n");
	kv_assert_ok(kv_tier_desc_dir(dir, KV_DESC_NO_PROBE, &b));
	assert_int_equal(b.read_bw_src, KV_SRC_NONE);
	assert_int_equal(b.latency_src, KV_SRC_NONE);
	assert_true(b.dio_align >= 512);
	assert_int_equal(b.dio_align & (b.dio_align - 1), 0);
	assert_desc_sane(&b);

	kv_test_rmtree(dir);
}

static void test_dir_errors(void **state)
{
	struct kv_tier_desc d;
	char dir[256], path[512];

	(void)state;
	kv_test_mkdtemp(dir, sizeof(dir), "tierbad");

	snprintf(path, sizeof(path), "%s/missing", dir);
	kv_assert_rc(kv_tier_desc_dir(path, 0, &d), -ENOENT);
	assert_non_null(strstr(kv_last_error(), path));
	assert_non_null(strstr(kv_last_error(), "no such directory"));

	snprintf(path, sizeof(path), "%s/file", dir);
	write_file(path, "x");
	kv_assert_rc(kv_tier_desc_dir(path, 0, &d), -ENOTDIR);
	assert_non_null(strstr(kv_last_error(), path));

	/* /proc/self refuses new files even to root. */
	kv_assert_rc(kv_tier_desc_dir("/proc/self", KV_DESC_NO_CACHE, &d), -EACCES);
	assert_non_null(strstr(kv_last_error(), "'/proc/self'"));

	if (geteuid() != 0) {
		snprintf(path, sizeof(path), "%s/ro", dir);
		assert_int_equal(mkdir(path, 0500), 0);
		kv_assert_rc(kv_tier_desc_dir(path, 0, &d), -EACCES);
		assert_non_null(strstr(kv_last_error(), path));
		chmod(path, 0700);
	} else {
		printf("# running as root: a chmod 0500 directory would be writable, only /proc/self is checked\n");
	}
	kv_test_rmtree(dir);
}

struct log_catch {
	int warnings;
	char last[256];
};

static void catch_log(enum kv_log_level level, const char *msg, void *ctx)
{
	struct log_catch *c = ctx;

	if (level == KV_LOG_WARN) {
		c->warnings++;
		snprintf(c->last, sizeof(c->last), "%s", msg);
	}
}

/* A cache that cannot be written costs a warning, not the descriptor. */
static void test_cache_unwritable(void **state)
{
	struct log_catch c = { 0, "" };
	struct kv_tier_desc d;
	char blocker[512];

	(void)state;
	snprintf(blocker, sizeof(blocker), "%s/not-a-dir", cache_home);
	write_file(blocker, "x");
	setenv("XDG_CACHE_HOME", blocker, 1);
	kv_set_log(catch_log, KV_LOG_WARN, &c);
	kv_assert_ok(kv_tier_desc_dram(0, KV_DESC_FORCE_PROBE, &d));
	kv_set_log(NULL, KV_LOG_ERROR, NULL);
	setenv("XDG_CACHE_HOME", cache_home, 1);
	assert_desc_sane(&d);
	if (any_probed(&d)) {
		assert_true(c.warnings >= 1);
		assert_non_null(strstr(c.last, "not written"));
	}
	assert_true(measured(d.read_bw_src));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_source_names),
		cmocka_unit_test(test_bad_args),
		cmocka_unit_test(test_dram_bad_node),
		cmocka_unit_test(test_dram_no_probe_no_cache),
		cmocka_unit_test(test_dram_probe_then_cache),
		cmocka_unit_test(test_dram_corrupt_cache),
		cmocka_unit_test(test_cache_unwritable),
		cmocka_unit_test(test_dir_probe_then_cache),
		cmocka_unit_test(test_dir_errors),
	};

	return cmocka_run_group_tests(tests, setup_all, teardown_all);
}
