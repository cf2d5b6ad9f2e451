// SPDX-License-Identifier: MIT
/*
 * libFuzzer harness for the tier-descriptor cache reader: each input is
 * written as node 0's DRAM cache file under a scratch $XDG_CACHE_HOME and
 * read back through kv_tier_desc_dram(0, KV_DESC_NO_PROBE). It must
 * succeed, and every figure must be hwloc's (as without a cache file),
 * absent (KV_SRC_NONE, zero), or from the cache, finite and inside the
 * bounds the reader documents (bandwidth 1e5..1e14 B/s, latency
 * 0.5..1e10 ns), the three taken together or not at all. Anything else
 * aborts. With KV_FUZZ_SEED_DIR set, a valid file is written there.
 */
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <kv/kv.h>

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char g_valid[] = "libkv-tier-cache 1\nread_bw 12345678901.5\n"
			      "write_bw 9876543210\nlatency_ns 87.25\ndio_align 0\n";
static char g_home[256], g_path[PATH_MAX];
static struct kv_tier_desc g_base;

#define CHECK(cond)                                                            \
	do {                                                                   \
		if (!(cond)) {                                                 \
			fprintf(stderr, "fuzz_tier_cache: %s:%d: %s failed\n",   \
				__FILE__, __LINE__, #cond);                    \
			abort();                                               \
		}                                                              \
	} while (0)

static void spit(const char *path, const void *p, size_t n)
{
	FILE *fp = fopen(path, "w");

	CHECK(fp);
	CHECK(n == 0 || fwrite(p, 1, n, fp) == n);
	CHECK(fclose(fp) == 0);
}

/* libFuzzer leaves through exit(): take the scratch cache with it. */
static void cleanup(void)
{
	char dir[300];

	unlink(g_path);
	snprintf(dir, sizeof(dir), "%s/libkv", g_home);
	rmdir(dir);
	rmdir(g_home);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	const char *tmp = getenv("TMPDIR"), *seed_dir = getenv("KV_FUZZ_SEED_DIR");
	char host[256], dir[300];

	(void)argc;
	(void)argv;
	snprintf(g_home, sizeof(g_home), "%s/libkv-fuzz-tier-XXXXXX", tmp && *tmp ? tmp : "/tmp");
	CHECK(mkdtemp(g_home));
	setenv("XDG_CACHE_HOME", g_home, 1);
	atexit(cleanup);
	snprintf(dir, sizeof(dir), "%s/libkv", g_home);
	CHECK(mkdir(dir, 0700) == 0);
	/* The reader's file name: host and device, characters outside
	 * [A-Za-z0-9._-] made '-'. */
	if (gethostname(host, sizeof(host)) != 0)
		snprintf(host, sizeof(host), "localhost");
	host[sizeof(host) - 1] = '\0';
	for (char *p = host; *p; p++)
		if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
		      (*p >= '0' && *p <= '9') || *p == '.' || *p == '_' || *p == '-'))
			*p = '-';
	snprintf(g_path, sizeof(g_path), "%s/tier-%s-node0.txt", dir, host);
	CHECK(kv_tier_desc_dram(0, KV_DESC_NO_PROBE, &g_base) == 0);
	if (seed_dir) {
		char path[512];

		snprintf(path, sizeof(path), "%s/valid-tier-cache", seed_dir);
		spit(path, g_valid, sizeof(g_valid) - 1);
	}
	return 0;
}

/* 1 if the figure came from the cache, 0 if not; aborts if it is bad. */
static int figure(enum kv_desc_source src, double v, enum kv_desc_source base_src,
		  double base_v, double lo, double hi)
{
	if (base_src != KV_SRC_NONE) {
		CHECK(src == base_src && v == base_v);
		return 0;
	}
	if (src == KV_SRC_NONE) {
		CHECK(v == 0);
		return 0;
	}
	CHECK(src == KV_SRC_CACHE);
	CHECK(isfinite(v) && v >= lo && v <= hi);
	return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct kv_tier_desc d;
	int n, want;

	spit(g_path, data, size);
	memset(&d, 0xa5, sizeof(d));
	CHECK(kv_tier_desc_dram(0, KV_DESC_NO_PROBE, &d) == 0);
	CHECK(d.capacity_src == g_base.capacity_src && d.capacity_bytes == g_base.capacity_bytes);
	n = figure(d.read_bw_src, d.read_bw, g_base.read_bw_src, g_base.read_bw, 1e5, 1e14) +
	    figure(d.write_bw_src, d.write_bw, g_base.write_bw_src, g_base.write_bw, 1e5, 1e14) +
	    figure(d.latency_src, d.latency_ns, g_base.latency_src, g_base.latency_ns, 0.5, 1e10);
	want = (g_base.read_bw_src == KV_SRC_NONE) + (g_base.write_bw_src == KV_SRC_NONE) +
	       (g_base.latency_src == KV_SRC_NONE);
	CHECK(n == 0 || n == want);
	CHECK((d.dio_align & (d.dio_align - 1)) == 0);
	return 0;
}
