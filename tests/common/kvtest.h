/* SPDX-License-Identifier: MIT */
/*
 * Helpers shared by libkv's cmocka tests: skipping a whole executable
 * (exit 77, with a reason), scratch directories, reading a whole file,
 * and a seeded generator.
 */
#ifndef KV_TEST_H
#define KV_TEST_H

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include <kv/kv.h>

/* Exit code meson (and automake) read as "skipped". */
#define KV_TEST_SKIP 77

/* Skip the whole test executable, printing why. */
#define kv_test_skip_all(...)                                          \
	do {                                                            \
		printf("SKIP: ");                                       \
		printf(__VA_ARGS__);                                    \
		printf("\n");                                           \
		exit(KV_TEST_SKIP);                                     \
	} while (0)

/* Assert a libkv call returned `want` and print kv_last_error() if not. */
#define kv_assert_rc(call, want)                                        \
	do {                                                             \
		int kv_rc_ = (call);                                     \
		if (kv_rc_ != (want))                                    \
			fail_msg("%s returned %d (%s), want %d; detail: %s", \
				 #call, kv_rc_, kv_strerror(kv_rc_), (want), \
				 kv_last_error());                       \
	} while (0)
#define kv_assert_ok(call) kv_assert_rc(call, 0)

/* splitmix64: a small seeded generator, the same stream on every machine. */
static inline uint64_t kv_test_rand(uint64_t *state)
{
	uint64_t z = (*state += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Make a fresh scratch directory under $TMPDIR (or /tmp); the path is
 * written to buf. Aborts the test on failure. */
static inline void kv_test_mkdtemp(char *buf, size_t len, const char *tag)
{
	const char *tmp = getenv("TMPDIR");

	snprintf(buf, len, "%s/libkv-%s-XXXXXX", tmp && *tmp ? tmp : "/tmp", tag);
	if (!mkdtemp(buf))
		fail_msg("mkdtemp(%s) failed", buf);
}

/* Point XDG_CACHE_HOME at a fresh scratch directory (its path written to
 * buf), so a test never reads or writes the user's libkv cache. */
static inline void kv_test_private_cache(char *buf, size_t len, const char *tag)
{
	kv_test_mkdtemp(buf, len, tag);
	setenv("XDG_CACHE_HOME", buf, 1);
}

/* Remove a directory tree made by kv_test_mkdtemp(). */
static inline void kv_test_rmtree(const char *dir)
{
	char cmd[4200];

	snprintf(cmd, sizeof(cmd), "rm -rf -- '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "warning: could not remove %s\n", dir);
}

/* A whole file as a NUL-terminated string (malloc'ed, the caller frees
 * it), or NULL when it cannot be opened (errno says why). */
static inline char *kv_test_slurp(const char *path)
{
	FILE *f = fopen(path, "rb");
	size_t len = 0, cap = 4096, n;
	char *buf;

	if (!f)
		return NULL;
	buf = malloc(cap);
	assert_non_null(buf);
	while ((n = fread(buf + len, 1, cap - len - 1, f)) > 0) {
		len += n;
		if (cap - len < 2) {
			cap *= 2;
			buf = realloc(buf, cap);
			assert_non_null(buf);
		}
	}
	buf[len] = '\0';
	fclose(f);
	return buf;
}

#endif
