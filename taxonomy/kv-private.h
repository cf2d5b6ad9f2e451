/* SPDX-License-Identifier: MIT */
/*
 * Internals shared by every libkv layer: failure reporting, logging, small
 * helpers. Not installed.
 */
#ifndef KV_PRIVATE_H
#define KV_PRIVATE_H

#include <errno.h>
#include <stdint.h>
#include <time.h>

#include <kv/core.h>

#if defined(__GNUC__)
#define KV_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define KV_LIKELY(x) __builtin_expect(!!(x), 1)
#define KV_UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define KV_PRINTF(a, b)
#define KV_LIKELY(x) (x)
#define KV_UNLIKELY(x) (x)
#endif

#define KV_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* Set the calling thread's detail string and return -err (err > 0).
 * Also logs the detail at debug level. Use as: return kv_fail(EINVAL, ...). */
int kv_fail(int err, const char *fmt, ...) KV_PRINTF(2, 3);

/* Log one line at `level` (no trailing newline needed). */
void kv_log(enum kv_log_level level, const char *fmt, ...) KV_PRINTF(2, 3);
void kv_vlog(enum kv_log_level level, const char *fmt, va_list ap);

/* Whether a message at `level` would go anywhere (cheap check before
 * building an expensive message). */
int kv_log_enabled(enum kv_log_level level);

/* Format a byte count with binary units into buf: "1.50 GiB", "512 B". */
const char *kv_format_bytes(uint64_t bytes, char *buf, size_t len);

static inline uint64_t kv_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The hwloc topology shared by the process, loaded once (never freed).
 * Returns NULL if hwloc could not load one (the caller then behaves as a
 * one-node machine). The topology is only read after loading, which hwloc
 * allows from several threads at once. */
#define KV_NODE_MAX_BITS 64

struct hwloc_topology;
struct hwloc_topology *kv_hw_topology(void);

/* JSON output: a quoted, escaped string (NULL prints ""); a number, or
 * null when not finite. */
#include <stdio.h>
void kv_json_string(FILE *f, const char *s);
void kv_json_double(FILE *f, double v);

#endif /* KV_PRIVATE_H */
