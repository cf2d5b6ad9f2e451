// SPDX-License-Identifier: MIT
/*
 * The error model and logging every layer uses: kv_strerror(), the
 * thread-local detail behind kv_last_error(), kv_fail() for internal code,
 * and the log sink (a callback, or stderr when KV_LOG asks). Also the
 * version calls. The log sink is the library's only global mutable state.
 */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <pthread.h>

#include "kv-private.h"

const char *kv_version(void)
{
	return KV_VERSION_STRING;
}

unsigned kv_version_number(void)
{
	return KV_VERSION_NUMBER;
}

const char *kv_strerror(int err)
{
	if (err < 0)
		err = -err;
	switch (err) {
	case 0: return "success";
	case EPERM: return "-EPERM: operation not permitted";
	case ENOENT: return "-ENOENT: no such entry";
	case EIO: return "-EIO: input/output error";
	case E2BIG: return "-E2BIG: too big";
	case EBADF: return "-EBADF: bad file descriptor";
	case EAGAIN: return "-EAGAIN: try again";
	case ENOMEM: return "-ENOMEM: out of memory or over budget";
	case EACCES: return "-EACCES: permission denied";
	case EFAULT: return "-EFAULT: broken invariant";
	case EBUSY: return "-EBUSY: still in use";
	case EEXIST: return "-EEXIST: already exists";
	case EDEADLK: return "-EDEADLK: would deadlock";
	case ENODEV: return "-ENODEV: no such device or node";
	case ENOTDIR: return "-ENOTDIR: not a directory";
	case EISDIR: return "-EISDIR: is a directory";
	case EINVAL: return "-EINVAL: invalid argument";
	case EFBIG: return "-EFBIG: file too large";
	case ENOSPC: return "-ENOSPC: no space left";
	case EROFS: return "-EROFS: read-only file system";
	case ERANGE: return "-ERANGE: out of range";
	case ENAMETOOLONG: return "-ENAMETOOLONG: name too long";
	case ENOSYS: return "-ENOSYS: not implemented by the kernel";
	case EOVERFLOW: return "-EOVERFLOW: value too large";
	case EBADMSG: return "-EBADMSG: corrupt data";
	case ENOTSUP: return "-ENOTSUP: not supported";
	case ETIMEDOUT: return "-ETIMEDOUT: timed out";
	case ECANCELED: return "-ECANCELED: canceled";
	case ESTALE: return "-ESTALE: stale handle or foreign data";
	case EINTR: return "-EINTR: interrupted";
	case EMFILE: return "-EMFILE: too many open files";
	case ESHUTDOWN: return "-ESHUTDOWN: shutting down";
	case EINPROGRESS: return "-EINPROGRESS: in progress";
	case EDQUOT: return "-EDQUOT: disk quota exceeded";
	case ENXIO: return "-ENXIO: no such device or address";
	case ESRCH: return "-ESRCH: no such process";
	default: return "unknown error (see errno.h)";
	}
}

/* ---- Detail string ---------------------------------------------------- */

static _Thread_local char tls_detail[KV_DETAIL_MAX];

const char *kv_last_error(void)
{
	return tls_detail;
}

void kv_clear_error(void)
{
	tls_detail[0] = '\0';
}

void kv_set_error(const char *detail)
{
	snprintf(tls_detail, sizeof(tls_detail), "%s", detail ? detail : "");
}

int kv_fail(int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(tls_detail, sizeof(tls_detail), fmt, ap);
	va_end(ap);
	kv_log(KV_LOG_DEBUG, "error %s: %s", kv_strerror(err), tls_detail);
	return err > 0 ? -err : err;
}

/* ---- Logging ---------------------------------------------------------- */

struct log_sink {
	kv_log_fn fn;
	void *ctx;
	int level;
};

/* -2: not yet read from the environment. The sink is swapped as a whole
 * under the mutex; the level is also kept in an atomic for the fast
 * "is anything listening" check on hot paths. */
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;
static struct log_sink log_sink = { NULL, NULL, -2 };
static atomic_int log_level = -2;

static int env_level(void)
{
	const char *s = getenv("KV_LOG");

	if (!s || !*s)
		return -1;
	for (int l = KV_LOG_ERROR; l <= KV_LOG_DEBUG; l++)
		if (strcasecmp(s, kv_log_level_name((enum kv_log_level)l)) == 0)
			return l;
	if (strcasecmp(s, "warning") == 0)
		return KV_LOG_WARN;
	return -1;
}

static int current_level(void)
{
	int l = atomic_load_explicit(&log_level, memory_order_acquire);

	if (l != -2)
		return l;
	pthread_mutex_lock(&log_lock);
	if (log_sink.level == -2)
		log_sink.level = env_level();
	l = log_sink.level;
	atomic_store_explicit(&log_level, l, memory_order_release);
	pthread_mutex_unlock(&log_lock);
	return l;
}

const char *kv_log_level_name(enum kv_log_level level)
{
	static const char *const names[] = { "error", "warn", "info", "debug" };

	if ((unsigned)level >= KV_ARRAY_SIZE(names))
		return NULL;
	return names[level];
}

void kv_set_log(kv_log_fn fn, enum kv_log_level level, void *ctx)
{
	pthread_mutex_lock(&log_lock);
	log_sink.fn = fn;
	log_sink.ctx = ctx;
	log_sink.level = fn ? (int)level : env_level();
	atomic_store_explicit(&log_level, log_sink.level, memory_order_release);
	pthread_mutex_unlock(&log_lock);
}

int kv_log_enabled(enum kv_log_level level)
{
	return (int)level <= current_level();
}

void kv_vlog(enum kv_log_level level, const char *fmt, va_list ap)
{
	char line[1024];
	struct log_sink sink;

	if (!kv_log_enabled(level))
		return;
	vsnprintf(line, sizeof(line), fmt, ap);
	pthread_mutex_lock(&log_lock);
	sink = log_sink;
	pthread_mutex_unlock(&log_lock);
	if ((int)level > sink.level)
		return;
	if (sink.fn)
		sink.fn(level, line, sink.ctx);
	else
		fprintf(stderr, "libkv %s: %s\n", kv_log_level_name(level), line);
}

void kv_log(enum kv_log_level level, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	kv_vlog(level, fmt, ap);
	va_end(ap);
}

void kv_vnote_degraded(char *notes, size_t size, const char *who, const char *fmt,
		       va_list ap)
{
	char msg[192];
	size_t used = strnlen(notes, size);

	vsnprintf(msg, sizeof(msg), fmt, ap);
	kv_log(KV_LOG_WARN, "%s: %s", who, msg);
	if (used < size)
		snprintf(notes + used, size - used, "%s%s", used ? "; " : "", msg);
}

const char *kv_format_bytes(uint64_t bytes, char *buf, size_t len)
{
	static const char *const units[] = { "B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
	double v = (double)bytes;
	size_t u = 0;

	while (v >= 1024.0 && u + 1 < KV_ARRAY_SIZE(units)) {
		v /= 1024.0;
		u++;
	}
	if (u == 0)
		snprintf(buf, len, "%llu B", (unsigned long long)bytes);
	else
		snprintf(buf, len, "%.2f %s", v, units[u]);
	return buf;
}
