// SPDX-License-Identifier: MIT
/*
 * libFuzzer harness for the spill store's reader: each input becomes
 * store.idx of a small valid store (eight extents, made once in a scratch
 * directory) and the store is reopened. A random index almost never gets
 * past the header and record checksums (XXH3-64), so the input's first
 * byte asks the harness to reseal them: bit 0 the index header, bit 1
 * every whole record, bit 2 to copy the index header's layout (align,
 * data_start) into store.data's header, bit 3 to stamp the store's
 * identity into the index header first. The contract checked is the
 * store's: open gives 0 or -EBADMSG/-ESTALE/-EINVAL with a detail; an
 * open store passes kv_store_validate(); every listed extent lies inside
 * the data file and reads back either with bytes matching its checksum or
 * with -EBADMSG and zeroes. Anything else aborts. With KV_FUZZ_SEED_DIR
 * set, the valid index (all flags set) is written there as a first seed.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <xxhash.h>

#include <kv/kv.h>

#define HDR 512        /* bytes of each file's header (offload/store.c) */
#define REC 80         /* bytes of one index record */
#define H_ALIGN 16
#define H_IDLEN 20
#define H_START 24
#define H_IDENT 32
#define H_KIND 12
#define H_SUM (HDR - 8)
#define R_SUM 72
#define FILE_DATA 1u

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char g_identity[] = "model=fuzz;layers=2";
static char g_dir[256], g_idx[300], g_data[300];
static uint8_t *g_pristine;  /* (g_pristine_len) store.data as made */
static size_t g_pristine_len;
static struct kv_registry *g_reg;
static struct kv_io *g_io;

#define CHECK(cond)                                                            \
	do {                                                                   \
		if (!(cond)) {                                                 \
			fprintf(stderr, "fuzz_store_index: %s:%d: %s failed; "   \
				"detail: %s\n", __FILE__, __LINE__, #cond,       \
				kv_last_error());                              \
			abort();                                               \
		}                                                              \
	} while (0)

static void cfg_init(struct kv_store_config *cfg)
{
	kv_store_config_default(cfg);
	cfg->dir = g_dir;
	cfg->identity = g_identity;
	cfg->identity_len = sizeof(g_identity);
	cfg->registry = g_reg;
	cfg->io = g_io;
	cfg->sync = KV_STORE_SYNC_NONE;
}

static uint8_t *slurp(const char *path, size_t *len)
{
	struct stat sb;
	uint8_t *p;
	int fd = open(path, O_RDONLY);

	CHECK(fd >= 0 && fstat(fd, &sb) == 0);
	p = malloc((size_t)sb.st_size + 1);
	CHECK(p);
	CHECK(pread(fd, p, (size_t)sb.st_size, 0) == sb.st_size);
	close(fd);
	*len = (size_t)sb.st_size;
	return p;
}

static void spit(const char *path, const void *p, size_t n)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);

	CHECK(fd >= 0);
	CHECK(n == 0 || write(fd, p, n) == (ssize_t)n);
	close(fd);
}

/* libFuzzer leaves through exit(): take the scratch store with it. */
static void cleanup(void)
{
	char tmp[320];

	snprintf(tmp, sizeof(tmp), "%s.tmp", g_idx);
	unlink(tmp);
	unlink(g_idx);
	unlink(g_data);
	rmdir(g_dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	const char *tmp = getenv("TMPDIR"), *seed_dir = getenv("KV_FUZZ_SEED_DIR");
	struct kv_store_config cfg;
	struct kv_io_config icfg;
	struct kv_store *s;

	(void)argc;
	(void)argv;
	snprintf(g_dir, sizeof(g_dir), "%s/libkv-fuzz-store-XXXXXX", tmp && *tmp ? tmp : "/tmp");
	CHECK(mkdtemp(g_dir));
	atexit(cleanup);
	snprintf(g_idx, sizeof(g_idx), "%s/store.idx", g_dir);
	snprintf(g_data, sizeof(g_data), "%s/store.data", g_dir);
	CHECK(kv_registry_create(NULL, &g_reg) == 0);
	kv_io_config_default(&icfg);
	icfg.registry = g_reg;
	CHECK(kv_io_create(&icfg, &g_io) == 0);
	cfg_init(&cfg);
	CHECK(kv_store_open(&cfg, &s) == 0);
	for (uint32_t i = 0; i < 8; i++) {
		uint8_t key[16] = { 0 }, buf[9000];
		size_t len = 100 + i * 1100;
		struct kv_store_extent e;

		memcpy(key, &i, sizeof(i));
		for (size_t k = 0; k < len; k++)
			buf[k] = (uint8_t)(k * 31 + i);
		CHECK(kv_store_put(s, key, sizeof(key), buf, len, &e) == 0);
		if (i == 5)
			CHECK(kv_store_delete(s, &e) == 0);
	}
	CHECK(kv_store_close(s) == 0);
	g_pristine = slurp(g_data, &g_pristine_len);
	if (seed_dir) {
		char path[512];
		size_t n;
		uint8_t *idx = slurp(g_idx, &n), *seed = malloc(n + 1);

		CHECK(seed);
		seed[0] = 0x0f;
		memcpy(seed + 1, idx, n);
		snprintf(path, sizeof(path), "%s/valid-store-idx", seed_dir);
		spit(path, seed, n + 1);
		free(seed);
		free(idx);
	}
	return 0;
}

static void reseal(uint8_t *p, size_t sum_at)
{
	uint64_t s = XXH3_64bits(p, sum_at);

	memcpy(p + sum_at, &s, 8);
}

struct walk {
	struct kv_store *s;
};

static int check_extent(void *ctx, const struct kv_store_extent *e)
{
	struct walk *w = ctx;
	uint8_t *buf;
	int rc;

	CHECK(e->len > 0 && e->offset + e->len >= e->offset &&
	      e->offset + e->len <= g_pristine_len);
	buf = malloc(e->len);
	CHECK(buf);
	rc = kv_store_get(w->s, e, buf);
	if (rc == 0) {
		CHECK(XXH3_64bits(buf, e->len) == e->checksum);
	} else {
		CHECK(rc == -EBADMSG);
		for (size_t k = 0; k < e->len; k++)
			CHECK(buf[k] == 0);
	}
	free(buf);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct kv_store_config cfg;
	struct kv_store *s = NULL;
	uint8_t *idx, dhdr[HDR];
	unsigned flags;
	size_t n;
	int rc;

	if (size < 1)
		return 0;
	flags = data[0];
	n = size - 1;
	idx = malloc(n ? n : 1);
	CHECK(idx);
	memcpy(idx, data + 1, n);
	memcpy(dhdr, g_pristine, HDR);
	if (n >= HDR) {
		if (flags & 8) {
			uint32_t len = sizeof(g_identity);

			memcpy(idx + H_IDLEN, &len, 4);
			memcpy(idx + H_IDENT, g_identity, sizeof(g_identity));
		}
		if (flags & 1)
			reseal(idx, H_SUM);
		if (flags & 4) {
			uint32_t kind = FILE_DATA;

			memcpy(dhdr + H_ALIGN, idx + H_ALIGN, 4);
			memcpy(dhdr + H_START, idx + H_START, 8);
			memcpy(dhdr + H_KIND, &kind, 4);
			reseal(dhdr, H_SUM);
		}
		if (flags & 2)
			for (size_t off = HDR; off + REC <= n; off += REC)
				reseal(idx + off, R_SUM);
	}
	spit(g_idx, idx, n);
	free(idx);
	{
		int fd = open(g_data, O_WRONLY);

		CHECK(fd >= 0);
		CHECK(pwrite(fd, dhdr, HDR, 0) == HDR);
		close(fd);
	}

	cfg_init(&cfg);
	rc = kv_store_open(&cfg, &s);
	if (rc) {
		CHECK(s == NULL);
		CHECK(rc == -EBADMSG || rc == -ESTALE || rc == -EINVAL);
		CHECK(kv_last_error()[0] != '\0');
		return 0;
	}
	CHECK(kv_store_validate(s) == 0);
	{
		struct walk w = { s };

		CHECK(kv_store_foreach(s, check_extent, &w) == 0);
	}
	CHECK(kv_store_validate(s) == 0);
	CHECK(kv_store_close(s) == 0);
	return 0;
}
