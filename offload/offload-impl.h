/* SPDX-License-Identifier: MIT */
/*
 * Internals of the offload layer, not installed:
 *
 *  - the I/O seam: tests can make the Nth read or write transfer fail with
 *    an errno or complete short, make the O_DIRECT open fail, and make
 *    io_uring setup fail, in both backends;
 *  - the engine shared by the two backends (io.c): files, the request
 *    queue, chunking, staging, completion and tickets;
 *  - the backends (io_uring.c, io_threads.c): a small table of functions
 *    that start workers, wake them and stop them. A worker takes chunks
 *    from the shared queue, moves the bytes, and hands every completed
 *    transfer to kv_io_chunk_done(), which decides between resubmitting
 *    the remainder and finishing the chunk.
 */
#ifndef KV_OFFLOAD_IMPL_H
#define KV_OFFLOAD_IMPL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <kv/allocator.h>
#include <kv/offload.h>

#include "taxonomy/kv-private.h"

/* ---- I/O seam --------------------------------------------------------- */

enum kv_io_seam_op {
	KV_IO_SEAM_READ = 1u << 0,   /* a read transfer completing */
	KV_IO_SEAM_WRITE = 1u << 1,  /* a write transfer completing */
	KV_IO_SEAM_OPEN = 1u << 2,   /* kv_io_open's O_DIRECT open(2) */
	KV_IO_SEAM_ALL = (1u << 3) - 1,
};

/* err_or_short for kv_io_inject(): the transfer completes with about half
 * the bytes it asked for (rounded down to the file's alignment when it is
 * O_DIRECT; a transfer too small to be cut keeps its full result). */
#define KV_IO_INJECT_SHORT (-1)

/* Make the nth (1-based) next event of any op in `ops` fail with -err
 * (err > 0) or, with KV_IO_INJECT_SHORT, complete short; once; nth 0
 * cancels. Applied where a completion is processed, so both backends see
 * the same faults. Counting is process-wide. For tests. */
void kv_io_inject(unsigned ops, unsigned nth, int err_or_short);

/* Events of any op in `ops` seen since the process started. */
unsigned long kv_io_seam_calls(unsigned ops);

/* Make every io_uring setup fail with -err (err > 0) until called with 0:
 * AUTO then falls back to threads as on a machine without io_uring. */
void kv_io_inject_setup(int err);

/* The setup error injected, 0 if none (for the backend). */
int kv_io_setup_injected(void);

/* ---- The engine ------------------------------------------------------- */

#define KV_IO_MAX_FILES 1024u

struct io_file {
	int fd;                  /* -1: free slot */
	uint32_t gen;            /* changes at every open and close of the slot */
	bool direct;
	bool readable, writable;
	uint32_t mem_align;      /* O_DIRECT only */
	uint32_t off_align;
	uint64_t size;           /* at open */
	uint32_t busy;           /* requests in flight (under files_lock) */
	char *path;              /* for details and log lines */
};

/* One caller request as the engine tracks it; the caller's struct is only
 * written at completion, and everything needed on the way is copied here
 * so the caller may reuse its struct from the callback on. */
struct io_op {
	struct io_op *next;          /* queue link */
	struct kv_io_req *req;
	int slot;                    /* file id */
	int fd;
	uint32_t gen;                /* the slot's generation at submit */
	bool direct;
	bool write;
	bool has_cb;
	bool staged;                 /* a chunk went through staging (q_lock) */
	uint32_t mem_align, off_align;
	uint64_t offset;
	size_t len;
	char *buf;
	uint64_t ticket;
	size_t cursor;               /* bytes handed to chunks (q_lock) */
	atomic_size_t accounted;     /* bytes of finished chunks */
	atomic_int err;              /* first error, 0 if none */
	_Atomic uint64_t eof;        /* lowest end of data a read met */
	char detail[200];            /* written by whoever set err */
};

/* A piece of a request moved by one transfer (resubmitted until done).
 * For a staged chunk the transfer covers the aligned superset of the
 * caller's part, in a staging slot. */
struct io_chunk {
	struct io_op *op;
	uint64_t pos;       /* file offset of the transfer */
	char *mem;          /* transfer memory: the caller's buffer, or staging */
	size_t len;         /* transfer bytes */
	size_t done;        /* transferred so far */
	int stage;          /* staging slot of the worker, -1: none */
	bool needs_stage;   /* set by kv_io_take(): the worker assigns a slot */
	uint64_t user_pos;  /* the caller's part of the transfer */
	size_t user_len;
	char *user_mem;
};

struct kv_io;

struct io_backend_ops {
	const char *name;
	/* Start io->n_workers workers. On failure nothing is left running,
	 * why says what failed, and the return is -errno. */
	int (*start)(struct kv_io *io, char *why, size_t why_len);
	/* Work was queued (called with q_lock held). */
	void (*wake)(struct kv_io *io);
	/* Workers exit once io->exiting is set and the queue is empty;
	 * wake them, join them, free them. */
	void (*stop)(struct kv_io *io);
};

extern const struct io_backend_ops kv_io_uring_ops;
extern const struct io_backend_ops kv_io_threads_ops;

struct kv_io {
	struct kv_io_config cfg;
	enum kv_io_backend backend;
	const struct io_backend_ops *ops;
	char reason[200];
	uint32_t n_workers;
	void *workers;               /* the backend's */

	pthread_mutex_t files_lock;
	struct io_file files[KV_IO_MAX_FILES];
	atomic_uint files_gen;       /* bumped by every close */

	pthread_mutex_t q_lock;
	pthread_cond_t q_cond;       /* thread pool: work queued; startup */
	pthread_cond_t drain_cond;   /* ops_in_flight or callers reached 0 */
	struct io_op *q_head, *q_tail;
	atomic_uint ops_in_flight;
	uint32_t callers;            /* API calls inside the engine (q_lock) */
	bool stopping;               /* kv_io_destroy() began: calls refused */
	bool exiting;                /* workers leave when idle */

	pthread_mutex_t tk_lock;
	pthread_cond_t tk_cond;
	struct io_ticket *tickets;   /* (tk_cap) open addressing by ticket */
	size_t tk_cap, tk_count;
	uint32_t tk_waiters;
	atomic_uint_fast64_t next_ticket;

	/* Staging: slots of stage_slot bytes, stage_per_worker per worker,
	 * worker w owning slots [w * stage_per_worker, ...); all of it within
	 * cfg.staging_bytes. */
	struct kv_arena *staging;
	char *stage_base;
	size_t stage_bytes;
	size_t stage_slot;           /* a power of two >= MIN_STAGE_SLOT: the
				      * one >= max_request if it fits the
				      * worker's share, else smaller (staged
				      * chunks are cut to it) */
	uint32_t stage_per_worker;

	atomic_uint_fast64_t st_reads, st_writes, st_bytes_read, st_bytes_written;
	atomic_uint_fast64_t st_resubmits, st_staged, st_errors;
	/* Requests whose outcome the caller has not been given yet: what
	 * kv_io_stats() reports as in flight. ops_in_flight also counts the
	 * bookkeeping after the callback or wake-up, for destroy to wait on. */
	atomic_uint st_unreported;
};

/* Take the next chunk from the queue head into c. Called with q_lock
 * held. stage_free says whether the worker has a staging slot to give.
 * Returns 1 (c filled; if c->needs_stage the worker must give it a slot
 * and call kv_io_chunk_begin()), 0 (queue empty), -EAGAIN (the head needs
 * staging and stage_free is false). */
int kv_io_take(struct kv_io *io, struct io_chunk *c, bool stage_free);

/* Give a staged chunk its slot memory (copies a write's bytes in). */
void kv_io_chunk_begin(struct kv_io *io, struct io_chunk *c, char *stage_mem);

/* A transfer of c (asked: c->len - c->done bytes at c->pos + c->done)
 * completed with res (bytes, or -errno). Returns 1 if the remainder must
 * be submitted again, 0 if the chunk is finished (its request may have
 * completed and its callback run); the worker then frees c's slots.
 * Called without q_lock. */
int kv_io_chunk_done(struct kv_io *io, struct io_chunk *c, int64_t res);

/* The worker's staging slot memory. */
static inline char *kv_io_stage_mem(const struct kv_io *io, uint32_t worker, uint32_t i)
{
	return io->stage_base + ((size_t)worker * io->stage_per_worker + i) * io->stage_slot;
}

#endif /* KV_OFFLOAD_IMPL_H */
