/* SPDX-License-Identifier: MIT */
/*
 * libkv offload: the I/O engine (kv_io) that moves tensors and KV blocks
 * between DRAM and files on SSD: io_uring with O_DIRECT, registered
 * buffers and files, many requests in flight; or, where io_uring is not
 * available, a pread/pwrite thread pool with the same semantics.
 *
 * Errors follow <kv/core.h>: 0 or -errno, detail in kv_last_error().
 */
#ifndef KV_OFFLOAD_H
#define KV_OFFLOAD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <kv/core.h>
#include <kv/taxonomy.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- I/O engine ------------------------------------------------------- */

enum kv_io_backend {
	KV_IO_AUTO = 0,    /* io_uring if it works here, else threads */
	KV_IO_URING = 1,   /* io_uring only: creation fails if unavailable */
	KV_IO_THREADS = 2, /* pread/pwrite on a thread pool */
};

struct kv_io;

struct kv_io_config {
	/* AUTO also reads the environment: KV_IO_BACKEND=threads|uring. */
	enum kv_io_backend backend;
	uint32_t queue_depth;      /* requests in flight per worker (default 64) */
	size_t max_request;        /* larger requests are split (default 1 MiB) */
	uint32_t workers;          /* io_uring rings, or pool threads
				    * (default 0: 1 ring, or 4 threads) */
	size_t staging_bytes;      /* aligned bounce buffers for requests that
				    * O_DIRECT cannot take as they are
				    * (default 8 MiB; registered with io_uring) */
	struct kv_registry *registry; /* staging is recorded as DRAM/STAGING;
				       * NULL: the default registry */
};

KV_API void kv_io_config_default(struct kv_io_config *cfg);

/* Start an engine: its worker threads, rings or pool, staging buffers.
 * With AUTO, an io_uring setup failure (-ENOSYS, -EPERM under seccomp or
 * kernel.io_uring_disabled, ...) selects the thread pool and logs why at
 * info. Errors: -EINVAL, -ENOMEM, and with KV_IO_URING the setup error.
 * Ownership: destroy with kv_io_destroy(). */
KV_API int kv_io_create(const struct kv_io_config *cfg, struct kv_io **out);

/* Stop the engine. By default waits for every request in flight to
 * complete (callbacks run); with KV_IO_CANCEL, requests not yet started
 * complete with -ECANCELED (their callbacks run on the calling thread).
 * Submits made meanwhile, callbacks included, fail with -ESHUTDOWN.
 * Returns how many were cancelled (>= 0). Files still open are closed.
 * NULL is a no-op. */
#define KV_IO_CANCEL 1u
KV_API int kv_io_destroy(struct kv_io *io, unsigned flags);

/* The backend in use, and why it was chosen ("io_uring", or e.g.
 * "threads: io_uring_setup: -EPERM (kernel.io_uring_disabled = 2)"). */
KV_API enum kv_io_backend kv_io_backend(const struct kv_io *io);
KV_API const char *kv_io_backend_reason(const struct kv_io *io);

/* Open flags. */
#define KV_IO_READ 1u
#define KV_IO_WRITE 2u
#define KV_IO_CREATE 4u     /* create if missing, mode 0600 */
#define KV_IO_TRUNCATE 8u
#define KV_IO_BUFFERED 16u  /* do not use O_DIRECT */

struct kv_io_file_info {
	bool direct;            /* O_DIRECT in use (false: buffered, and why
				 * is in the log) */
	uint32_t mem_align;     /* buffer alignment O_DIRECT needs */
	uint32_t offset_align;  /* offset and length alignment */
	uint64_t size;          /* at open */
};

/* Open a file for the engine: O_DIRECT unless KV_IO_BUFFERED or the file
 * system refuses it (EINVAL) or gives no alignment for it (tmpfs accepts
 * O_DIRECT on recent kernels but has no block size), in which case it
 * falls back to buffered I/O and logs it at info. Alignment from
 * statx(STATX_DIOALIGN), else the device's logical block size. Returns a
 * file id >= 0 for requests.
 * Errors: -errno of open(2) with the path in the detail, -EMFILE (engine
 * file table full). Thread safety: any thread. */
KV_API int kv_io_open(struct kv_io *io, const char *path, unsigned flags);

/* Information about an open file. Errors: -EBADF. */
KV_API int kv_io_file_info(const struct kv_io *io, int file,
			   struct kv_io_file_info *out);

/* Close a file id; requests on it must have completed. Errors: -EBADF,
 * -EBUSY (requests in flight). */
KV_API int kv_io_close(struct kv_io *io, int file);

enum kv_io_op { KV_IO_OP_READ = 0, KV_IO_OP_WRITE = 1 };

struct kv_io_req;

/* Completion callback: runs on an engine thread, must not block for long;
 * it may submit new requests but must not wait for one (kv_io_wait,
 * kv_io_rw) nor destroy the engine. req->result holds the outcome, and on
 * error kv_last_error() in the callback holds its detail. */
typedef void (*kv_io_cb)(struct kv_io_req *req);

/* One request. A read accepts any offset, length and buffer alignment:
 * what O_DIRECT cannot take directly goes through staging buffers. A
 * write to an O_DIRECT file must have its offset and length aligned to
 * kv_io_file_info().offset_align (else -EINVAL: the engine does not
 * read-modify-write edge blocks, which would race with neighbouring
 * writes); its buffer may have any alignment. A file opened with
 * KV_IO_BUFFERED takes writes of any range. The caller owns the struct
 * and the buffer until completion; a request with a callback may be
 * reused or freed from the callback on. */
struct kv_io_req {
	int file;
	enum kv_io_op op;
	uint64_t offset;
	size_t len;
	void *buf;
	kv_io_cb cb;           /* NULL: complete by ticket (kv_io_wait) */
	void *ctx;             /* for the caller */
	/* Out: bytes transferred (== len), or -errno. A read past the end of
	 * the file returns fewer bytes (the rest of buf is unspecified:
	 * O_DIRECT may fill the last block); a write never completes short. */
	int64_t result;
	uint64_t ticket;       /* set by kv_io_submit */
};

/* Queue n requests; each gets a ticket. Short reads and -EAGAIN/-EINTR
 * are resubmitted for the remainder inside the engine.
 * Errors: -EINVAL (a bad request: nothing of the batch is queued),
 * -EBADF, -ESHUTDOWN (engine being destroyed). Thread safety: any thread. */
KV_API int kv_io_submit(struct kv_io *io, struct kv_io_req **reqs, uint32_t n);

/* Wait until the request with this ticket completed (timeout_ns < 0:
 * forever). Returns its result, -ETIMEDOUT, or -ENOENT (unknown ticket,
 * or already collected). A ticket is collected once, by wait or poll;
 * requests with a callback have no ticket to wait for. */
KV_API int64_t kv_io_wait(struct kv_io *io, uint64_t ticket, int64_t timeout_ns);

/* Whether the request completed: 1 (its result stored in *result and the
 * ticket collected), 0 (still in flight), -ENOENT. */
KV_API int kv_io_poll(struct kv_io *io, uint64_t ticket, int64_t *result);

/* Submit one request and wait for it: the synchronous form. */
KV_API int64_t kv_io_rw(struct kv_io *io, int file, enum kv_io_op op,
			uint64_t offset, void *buf, size_t len);

struct kv_io_stats {
	uint64_t reads, writes;             /* requests completed */
	uint64_t bytes_read, bytes_written;
	uint64_t resubmits;                 /* short or -EAGAIN/-EINTR */
	uint64_t staged;                    /* requests that went through staging */
	uint64_t errors;
	uint32_t in_flight;
};
KV_API void kv_io_stats(const struct kv_io *io, struct kv_io_stats *out);

#ifdef __cplusplus
}
#endif

#endif /* KV_OFFLOAD_H */
