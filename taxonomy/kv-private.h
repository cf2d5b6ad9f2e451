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

/* Size of the detail string behind kv_last_error(), with its NUL. */
#define KV_DETAIL_MAX 512

/* Put back a detail string saved from kv_last_error(), without logging:
 * for calls that run user callbacks, which may fail and leave a detail,
 * and must leave the caller's as it was when they succeed. */
void kv_set_error(const char *detail);

/* Log one line at `level` (no trailing newline needed). */
void kv_log(enum kv_log_level level, const char *fmt, ...) KV_PRINTF(2, 3);
void kv_vlog(enum kv_log_level level, const char *fmt, va_list ap) KV_PRINTF(2, 0);

/* A placement step that could not be honoured: log "who: msg" at warn and
 * append msg to notes (a "; "-separated list, truncated to size). */
void kv_vnote_degraded(char *notes, size_t size, const char *who, const char *fmt,
		       va_list ap) KV_PRINTF(4, 0);

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

/* Fault injection for OS seams: kv_seam_hit() counts a call of `op` (a
 * bit set of up to KV_SEAM_OPS operations) and returns 0, or `value` once
 * when it is the nth call since kv_seam_inject() of an op in `ops`. A
 * zero-initialised struct kv_seam injects nothing. */
#include <stdatomic.h>
#define KV_SEAM_OPS 8
struct kv_seam {
	atomic_uint ops;
	atomic_uint left;
	atomic_int value;
	atomic_ulong calls[KV_SEAM_OPS];
};
void kv_seam_inject(struct kv_seam *s, unsigned ops, unsigned nth, int value);
unsigned long kv_seam_calls(const struct kv_seam *s, unsigned ops);
int kv_seam_hit(struct kv_seam *s, unsigned op);

/* O_DIRECT alignment of a file or directory as statx(STATX_DIOALIGN)
 * reports it: 1 when statx answered (*offset_align 0 then means "no direct
 * I/O here"), 0 when it cannot tell (old kernel or file system). */
#include <sys/types.h>
int kv_hw_dio_align(int dirfd, const char *path, int at_flags, uint32_t *offset_align,
		    uint32_t *mem_align);
/* The logical block size of the block device dev (for a partition, its
 * disk's), from sysfs; 0 when unknown (tmpfs, no block device). */
uint32_t kv_hw_block_size(dev_t dev);

/* JSON output: a quoted, escaped string (NULL prints ""); a number, or
 * null when not finite. */
#include <stdio.h>
void kv_json_string(FILE *f, const char *s);
void kv_json_double(FILE *f, double v);

#endif /* KV_PRIVATE_H */
