/* SPDX-License-Identifier: MIT */
/*
 * libkv core: export macro, version, the error model and logging.
 *
 * Error model, kept by every libkv function:
 *   - a fallible function returns 0 on success or a negative errno
 *     (-EINVAL, -ENOMEM, -EIO, -ENOSPC, -EBUSY, -EBADMSG, -ENOTSUP, ...);
 *   - a constructor takes a config struct (filled by *_config_default())
 *     and returns the object through an out-parameter, untouched on error;
 *   - on error nothing was changed, and kv_last_error() holds a sentence
 *     saying exactly what failed, in the calling thread.
 * The library never exits, never aborts on a recoverable condition, and
 * never prints unless a log callback is set or KV_LOG asks for stderr.
 */
#ifndef KV_CORE_H
#define KV_CORE_H

#include <errno.h> /* the error codes every call returns, negated */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <kv/version.h>

#if defined(KV_BUILDING) && defined(__GNUC__)
#define KV_API __attribute__((visibility("default")))
#else
#define KV_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* The runtime version string, e.g. "0.1.0"; compare with KV_VERSION_STRING
 * to detect a header/library mismatch. Thread safety: any thread. */
KV_API const char *kv_version(void);

/* The runtime version as KV_VERSION_NUMBER (0xMMmmpp). */
KV_API unsigned kv_version_number(void);

/* A short, static name for an error code: accepts err or -err
 * ("-ENOMEM: out of memory"). Never NULL. Thread safety: any thread. */
KV_API const char *kv_strerror(int err);

/* The detail of the last failure in the calling thread, e.g.
 * "tier 'dram' node 3: no such NUMA node (machine has 1)". Successful calls
 * leave it alone (like errno); "" before any failure. The pointer is
 * thread-local and valid until the next libkv call in this thread. */
KV_API const char *kv_last_error(void);

/* Forget the calling thread's last error detail. */
KV_API void kv_clear_error(void);

enum kv_log_level {
	KV_LOG_ERROR = 0,
	KV_LOG_WARN = 1,
	KV_LOG_INFO = 2,
	KV_LOG_DEBUG = 3,
};

/* A log sink. msg is one line without a trailing newline; it is valid only
 * during the call. It may be called from any libkv thread, concurrently. */
typedef void (*kv_log_fn)(enum kv_log_level level, const char *msg, void *ctx);

/* Route messages at or below `level` to fn. fn == NULL restores the
 * default: silence, unless the environment variable
 * KV_LOG=error|warn|info|debug asks for stderr at that level.
 * Thread safety: any thread; a message being delivered concurrently may
 * still reach the previous sink. */
KV_API void kv_set_log(kv_log_fn fn, enum kv_log_level level, void *ctx);

/* Name of a log level ("error", "warn", "info", "debug"); NULL if invalid. */
KV_API const char *kv_log_level_name(enum kv_log_level level);

#ifdef __cplusplus
}
#endif

#endif /* KV_CORE_H */
