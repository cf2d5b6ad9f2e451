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
				    * (default 8 MiB; registered with io_uring).
				    * A bound, never exceeded: each worker gets
				    * staging_bytes / workers, in slots of the
				    * power of two >= max_request when that
				    * share holds one, else of the largest
				    * power of two it holds (staged transfers
				    * are then cut to a slot). Must be at
				    * least workers x 64 KiB (workers 0 counts
				    * as 4), else -EINVAL. */
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
 * Returns how many were cancelled (>= 0). Files still open are closed.
 * NULL is a no-op.
 * Calls overlapping it, from other threads or callbacks: once destroy has
 * begun, kv_io_submit, _rw, _open, _close and _file_info fail with
 * -ESHUTDOWN (a refused submit leaves its requests untouched) and
 * kv_io_stats reports zeros; kv_io_wait and kv_io_poll keep working, as
 * every request completes before destroy returns (a wait returns the
 * result, -ECANCELED for a cancelled request), so no call hands back a
 * buffer the engine may still write. Destroy frees nothing before every
 * call inside the engine has returned; but a call that starts after
 * destroy returned uses freed memory, so another thread may count on
 * -ESHUTDOWN only while destroy cannot have returned (e.g. while a
 * request it waits for, or that request's callback, still runs). */
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
 * Errors: -EINVAL (a bad request), -EBADF, -ENOMEM, -ESHUTDOWN (engine
 * being destroyed); on any error nothing of the batch is queued and the
 * requests are left as they were (ticket and result unwritten).
 * Thread safety: any thread. */
KV_API int kv_io_submit(struct kv_io *io, struct kv_io_req **reqs, uint32_t n);

/* Wait until the request with this ticket completed (timeout_ns < 0:
 * forever). Returns its result, -ETIMEDOUT, or -ENOENT (unknown ticket,
 * or already collected); works during kv_io_destroy too. A ticket is collected once, by wait or poll;
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

/* ---- Spill store (kv_store) ------------------------------------------ */
/*
 * A spill store: one directory on SSD holding blocks of bytes (KV blocks,
 * tensors) as extents of a data file, each found by a caller's key of up
 * to 32 bytes (a 128-bit or 256-bit hash) and carrying an XXH3-64 checksum
 * that every read verifies. An append-only index file lets
 * kv_store_open() find every extent again after a restart or a crash.
 *
 * Files in the directory (created 0600): "store.data" (a header block, then
 * extents aligned to the file's O_DIRECT alignment, free space reused) and
 * "store.idx" (a header, then fixed-size checksummed put/delete records).
 * A store is opened by one process at a time (-EBUSY otherwise).
 *
 * Durability. An extent enters the index only after its data write
 * completed; what survives:
 *   KV_STORE_SYNC_EVERY    every put and delete is durable when it returns
 *                          (data fdatasync'ed, then its index record
 *                          appended and fdatasync'ed): a process kill or a
 *                          power loss keeps every completed put.
 *   KV_STORE_SYNC_BATCHED  data and index are fdatasync'ed after every
 *                          sync_every puts and on kv_store_sync(): a
 *                          process kill keeps every completed put; a power
 *                          loss keeps those up to the last sync.
 *   KV_STORE_SYNC_NONE     only kv_store_sync() and kv_store_close() sync:
 *                          a process kill keeps every completed put; a
 *                          power loss may lose any put since the last sync.
 * Whatever the policy, after a crash the store opens, a torn index tail is
 * dropped, and no listed extent ever yields unverified bytes: an extent
 * whose data did not reach the disk before a power loss reads as -EBADMSG.
 * With BATCHED and NONE the space of a replaced or deleted extent is
 * reused only after the next sync (batch or kv_store_sync()), so that an
 * extent kept by a power loss still holds its bytes; until then it counts
 * in neither used_bytes nor free_bytes. So that this held space stays
 * bounded (with NONE and no kv_store_sync() calls it would grow with every
 * replacement, and the data file with it), once 64 MiB is held, or a
 * sixteenth of the capacity when that is less (held space counts against
 * the capacity), the store syncs on its own as kv_store_sync() does: in
 * its finisher thread after a batch of puts, or in the kv_store_delete()
 * that passed the mark. That sync makes the puts and deletes before it
 * durable too; a failed one is logged and retried at the next put or
 * delete.
 */

enum kv_store_sync {
	KV_STORE_SYNC_EVERY = 0,
	KV_STORE_SYNC_BATCHED = 1,
	KV_STORE_SYNC_NONE = 2,
};

#define KV_STORE_KEY_MAX 32       /* bytes: XXH3-128 is 16, SHA-256 is 32 */
#define KV_STORE_IDENTITY_MAX 256 /* bytes of identity key */

struct kv_store;

struct kv_store_config {
	const char *dir;            /* created if missing (0700); required */
	/* What the store holds, e.g. the model and KV shape, as bytes:
	 * written into the headers at creation; a reopen with other bytes
	 * is refused with -ESTALE. (identity_len) bytes, 1..IDENTITY_MAX. */
	const void *identity;
	size_t identity_len;
	uint64_t capacity;          /* bytes of extent space (the data file
				     * past its header); 0: until the disk is
				     * full */
	enum kv_store_sync sync;    /* default KV_STORE_SYNC_EVERY */
	uint32_t sync_every;        /* puts per sync with BATCHED (default 64) */
	struct kv_io *io;           /* engine to use (not owned; must outlive
				     * the store); NULL: the store starts its
				     * own with kv_io_config_default() */
	struct kv_registry *registry; /* NULL: the default registry */
	enum kv_kind kind;          /* recorded kind (default KV_KIND_KV) */
	const char *label;          /* registry label (default "kv_store") */
};

/* An extent: a value the caller keeps, compares and passes back. id is
 * unique over the store's life (a later put of the same key gets a new
 * one), so an extent that was deleted or replaced is refused (-ENOENT)
 * rather than read from reused space. */
struct kv_store_extent {
	uint64_t id;                /* sequence number of its put, > 0 */
	uint64_t offset;            /* in store.data, aligned */
	uint64_t len;               /* bytes of data (the space taken is len
				     * rounded up to the alignment) */
	uint64_t checksum;          /* XXH3_64bits of the data, seed 0 */
	uint32_t key_len;
	uint8_t key[KV_STORE_KEY_MAX];
};

/* Completion of an asynchronous put or get: result is 0 or -errno (with
 * the detail in kv_last_error() during the call); ext is the extent put
 * or read (NULL when a put failed), valid during the call only. Runs on a
 * store or engine thread; must not block for long nor wait for another
 * store request, nor close the store. */
typedef void (*kv_store_cb)(void *ctx, int result, const struct kv_store_extent *ext);

KV_API void kv_store_config_default(struct kv_store_config *cfg);

/* Create the store in cfg->dir, or reopen it: the index is replayed, a
 * torn or corrupt tail of it dropped (truncated, with a warning in the
 * log), the free space rebuilt from the live extents, and the index
 * compacted when it holds far more records than live extents. The
 * decision to create is taken under the store's lock; a store.data with
 * only its header and no store.idx (a creation cut short) is completed.
 * Errors: -EINVAL (config), -ESTALE (the store was written for another
 * identity), -EBADMSG (a header or the start of the index is not a
 * store's, store.idx exists without store.data, or store.data holds more
 * than its header without store.idx: the detail names the file and what
 * is wrong; nothing is changed), -EBUSY (open in another
 * process), -ENOMEM, -errno of the file system. Ownership: close with
 * kv_store_close(). */
KV_API int kv_store_open(const struct kv_store_config *cfg, struct kv_store **out);

/* Wait for the store's requests in flight (their callbacks run), sync the
 * index and data (every policy), and release everything. Returns 0, or
 * the error of the final sync (the store is closed anyway). NULL: no-op.
 * Thread safety: no other call on the store during or after it. */
KV_API int kv_store_close(struct kv_store *st);

/* Store len bytes under key, synchronously: on return the extent is in
 * the index (durable per the sync policy) and *out describes it. A live
 * extent with the same key is replaced (its space freed).
 * Errors: -EINVAL (key_len 0 or > KV_STORE_KEY_MAX, len 0, NULL data),
 * -ENOSPC (capacity reached or disk full), -EIO and other write or sync
 * errors; on error the store is unchanged and usable and data untouched.
 * Ownership: data stays the caller's. Thread safety: any thread. */
KV_API int kv_store_put(struct kv_store *st, const void *key, size_t key_len,
			const void *data, size_t len, struct kv_store_extent *out);

/* The asynchronous put: returns 0 once queued, and cb reports the
 * outcome as kv_store_put() would; cb runs after the data write
 * completed and the extent entered the index, so it is where the caller
 * may free data. data must stay valid and unchanged until then.
 * Errors (nothing queued, cb not called): -EINVAL, -ENOSPC (capacity),
 * -ENOMEM, -ESHUTDOWN. Thread safety: any thread. */
KV_API int kv_store_put_async(struct kv_store *st, const void *key, size_t key_len,
			      const void *data, size_t len, kv_store_cb cb, void *ctx);

/* Read an extent into dst (ext->len bytes, any alignment; aligned to the
 * file's memory alignment it is read in place without staging) and verify
 * its checksum. On a read or checksum failure dst holds zeroes over
 * ext->len: a caller is never handed corrupt or partial bytes. Errors
 * found before any read (-EINVAL, -ENOENT, -ENOMEM, -ESHUTDOWN, a failed
 * submit) leave dst untouched (ext->len of a stale handle is not trusted).
 * Errors: -ENOENT (not live: deleted, replaced, or not this store's),
 * -EBADMSG (checksum mismatch; the detail names the key and offset),
 * -EIO and other read errors. Thread safety: any thread; an extent being
 * read may be deleted meanwhile: its space is reused only after the read.
 * An extent whose delete is in progress reads normally until the delete
 * returns. */
KV_API int kv_store_get(struct kv_store *st, const struct kv_store_extent *ext, void *dst);

/* The asynchronous get: 0 once queued, then cb(ctx, result, ext) as
 * kv_store_get() would return, on an engine thread. dst belongs to the
 * store until cb. Errors (cb not called, dst untouched): -EINVAL,
 * -ENOENT, -ENOMEM, -ESHUTDOWN, and the engine's submit errors. */
KV_API int kv_store_get_async(struct kv_store *st, const struct kv_store_extent *ext,
			      void *dst, kv_store_cb cb, void *ctx);

/* The live extent stored under key. Errors: -ENOENT, -EINVAL.
 * Thread safety: any thread. */
KV_API int kv_store_lookup(struct kv_store *st, const void *key, size_t key_len,
			   struct kv_store_extent *out);

/* Delete an extent: its delete record enters the index (fdatasync'ed with
 * SYNC_EVERY) before its space can be reused. Until the record is in, the
 * extent stays live: gets, lookups and kv_store_foreach() still see it.
 * Errors: -ENOENT (not live, or its delete is already in progress), index
 * write errors (the extent then stays live). Thread safety: any. */
KV_API int kv_store_delete(struct kv_store *st, const struct kv_store_extent *ext);

/* Call fn once per live extent, in offset order, on a snapshot taken at
 * the call: fn may call the store (get, delete, ...). A nonzero return
 * from fn stops the walk and is returned. Errors: -ENOMEM. */
KV_API int kv_store_foreach(struct kv_store *st,
			    int (*fn)(void *ctx, const struct kv_store_extent *ext),
			    void *ctx);

/* Make every completed put and delete durable (fdatasync data, then index).
 * Errors: -errno of fdatasync. Thread safety: any thread. */
KV_API int kv_store_sync(struct kv_store *st);

struct kv_store_stats {
	uint64_t extents;           /* live */
	uint64_t live_bytes;        /* sum of live extents' len */
	uint64_t used_bytes;        /* space they take (aligned) */
	uint64_t free_bytes;        /* reusable holes plus room to capacity
				     * (without capacity: to the disk's free
				     * space) */
	uint64_t file_bytes;        /* extent space in use or freed: the
				     * data file's high-water mark past its
				     * header */
	uint64_t puts, gets, deletes;  /* completed successfully */
	uint64_t put_errors, get_errors;
	uint64_t checksum_failures; /* gets that found a mismatch */
	uint64_t index_records;     /* records in the index file */
	uint32_t align;             /* extent alignment (bytes) */
	bool direct;                /* data file uses O_DIRECT */
};

/* A snapshot of the counters. Thread safety: any thread. */
KV_API void kv_store_stats(struct kv_store *st, struct kv_store_stats *out);

/* Check the store's invariants (free ranges sorted, disjoint from each
 * other and from live extents, counters adding up). Returns 0 or -EFAULT
 * with the broken invariant in the detail. For tests. */
KV_API int kv_store_validate(struct kv_store *st);

/* (end of spill store) */

/* ---- mmap tensors, tensor index, streamer ----------------------------- */

/* -- mmap tensors (kv_mmap) --
 * A tensor file mapped read-only and shared, recorded in a registry as
 * tier MMAP (one record of the file's size, kind WEIGHTS by default). The
 * bytes live in the page cache: what is resident in DRAM at a moment is
 * what kv_mmap_resident() says. Thread safety: after open, every call but
 * close may be made from any thread; close must not race with them. */
struct kv_mmap;

struct kv_mmap_config {
	bool populate;       /* read the whole file into the page cache and map
			      * it at open (MADV_POPULATE_READ, else by
			      * touching every page) */
	bool lock;           /* mlock the mapping (implies populate) */
	bool required;       /* fail instead of degrading when populate or
			      * lock cannot be honoured (see <kv/allocator.h>) */
	enum kv_kind kind;   /* for the registry (default WEIGHTS) */
	uint32_t policy;     /* default READONLY|SHARED; PINNED is added when
			      * the lock was obtained */
	const char *label;   /* registry label (copied); default "mmap" */
	struct kv_registry *registry; /* NULL: the default registry */
};

KV_API void kv_mmap_config_default(struct kv_mmap_config *cfg);

/* Open `path` read-only and map all of it. cfg may be NULL for defaults.
 * A lock or populate that fails degrades (one warn line, kv_mmap_info()
 * says what was not honoured) unless cfg.required, in which case the open
 * fails and nothing is left behind.
 * Errors: -errno of open(2)/fstat(2)/mmap(2) with the path in the detail
 * (-ENOENT, -EACCES, ...), -EINVAL (NULL, empty file, not a regular file),
 * with required: -ENOMEM/-EPERM (mlock), -EIO (populate, whatever madvise
 * said: the detail names its error); -ENOMEM, and
 * the registry's errors. Ownership: close with kv_mmap_close(). */
KV_API int kv_mmap_open(const char *path, const struct kv_mmap_config *cfg,
			struct kv_mmap **out);

/* Unmap, close and forget the registry record. NULL is a no-op. Pointers
 * into the mapping are invalid afterwards. */
KV_API void kv_mmap_close(struct kv_mmap *m);

/* The mapped bytes (size bytes, read-only) and their count. */
KV_API const void *kv_mmap_data(const struct kv_mmap *m);
KV_API uint64_t kv_mmap_size(const struct kv_mmap *m);

enum kv_advice {
	KV_ADVISE_NORMAL = 0,
	KV_ADVISE_WILLNEED = 1,   /* start reading the range ahead (async) */
	KV_ADVISE_SEQUENTIAL = 2, /* aggressive read-ahead, pages dropped behind */
	KV_ADVISE_RANDOM = 3,     /* no read-ahead */
	KV_ADVISE_DONTNEED = 4,   /* drop the range from this mapping and, where
				   * nobody else holds them, its whole pages
				   * from the page cache (posix_fadvise) */
	KV_ADVISE_POPULATE = 5,   /* read the range in and map it now (sync) */
};

/* Advise on [offset, offset + len) of the mapping; len 0 means to the
 * end. The range is widened to whole pages (DONTNEED: narrowed, so pages
 * shared with neighbouring bytes stay). Errors: -EINVAL (bad advice, range
 * outside the file), -errno of madvise(2) with the path in the detail;
 * POPULATE on a kernel without MADV_POPULATE_READ touches each page. */
KV_API int kv_mmap_advise(struct kv_mmap *m, uint64_t offset, uint64_t len,
			  enum kv_advice advice);

/* Bytes of [offset, offset + len) (len 0: to the end) whose pages are
 * resident in the page cache (mincore), counted in whole pages clipped to
 * the range. Errors: -EINVAL (range), -errno of mincore(2), -ENOMEM. */
KV_API int kv_mmap_resident(const struct kv_mmap *m, uint64_t offset, uint64_t len,
			    uint64_t *bytes);

struct kv_mmap_info {
	uint64_t size;          /* bytes mapped: the file's size at open */
	bool populated;         /* populate was asked and done */
	bool locked;            /* mlock obtained */
	kv_handle record;       /* the registry record (tier MMAP) */
	char degraded[192];     /* what was asked and not obtained, or "" */
};
KV_API int kv_mmap_info(const struct kv_mmap *m, struct kv_mmap_info *out);

/* -- Tensor index --
 * Names, offsets, sizes, dtypes and shapes of the tensors stored in one
 * file. Format readers fill it; the streamer reads it. Ids are dense, in
 * the order of kv_tensor_index_add(). Thread safety: adds must not race
 * with anything; lookups may run concurrently. */
enum kv_dtype {
	KV_DTYPE_F32 = 0,
	KV_DTYPE_F16 = 1,
	KV_DTYPE_BF16 = 2,
	KV_DTYPE_I8 = 3,
	KV_DTYPE_U8 = 4,    /* raw bytes */
	KV_DTYPE_I32 = 5,
	KV_DTYPE_COUNT = 6
};

/* Bytes per element (0 when out of range) and a lower-case name (NULL). */
KV_API size_t kv_dtype_size(enum kv_dtype dtype);
KV_API const char *kv_dtype_name(enum kv_dtype dtype);

#define KV_TENSOR_NAME_MAX 63   /* bytes, excluding the NUL */
#define KV_TENSOR_DIMS_MAX 4

struct kv_tensor_info {
	char name[KV_TENSOR_NAME_MAX + 1];
	uint64_t offset;                    /* byte offset in the file; any alignment */
	uint64_t bytes;                     /* > 0 */
	enum kv_dtype dtype;
	uint32_t n_dims;                    /* 1..KV_TENSOR_DIMS_MAX */
	uint64_t shape[KV_TENSOR_DIMS_MAX]; /* outermost first; unused dims 0 */
};

struct kv_tensor_index;

/* An empty index. Errors: -EINVAL, -ENOMEM. Ownership: destroy it. */
KV_API int kv_tensor_index_create(struct kv_tensor_index **out);
KV_API void kv_tensor_index_destroy(struct kv_tensor_index *idx);

/* Add a tensor (copied); its id is the count before the call. The entry
 * is checked on its own: name 1..63 bytes and unique, dtype, 1..4 dims
 * each > 0, product of the shape times the dtype size == bytes, offset +
 * bytes without overflow. Errors: -EINVAL (naming the field), -EEXIST
 * (name taken), -ENOMEM (also: the index is full, at 2^31 tensors). On
 * error the index is unchanged. */
KV_API int kv_tensor_index_add(struct kv_tensor_index *idx,
			       const struct kv_tensor_info *t, uint32_t *id);

/* Look a name up (linear: an index holds hundreds of tensors, looked up
 * once when a model is loaded). Errors: -ENOENT, -EINVAL. */
KV_API int kv_tensor_index_find(const struct kv_tensor_index *idx,
				const char *name, uint32_t *id);

KV_API uint32_t kv_tensor_index_count(const struct kv_tensor_index *idx);

/* A copy of tensor `id`. Errors: -EINVAL (NULL, id out of range). */
KV_API int kv_tensor_index_get(const struct kv_tensor_index *idx, uint32_t id,
			       struct kv_tensor_info *out);

/* Check every tensor against a file of file_bytes: each lies inside it
 * and its shape matches its size. Errors: -EINVAL naming the first bad
 * tensor. */
KV_API int kv_tensor_index_validate(const struct kv_tensor_index *idx,
				    uint64_t file_bytes);

/* -- Streamer (kv_stream) --
 * Serves the tensors of one file, in a known repeating order (layer
 * 0..L-1, each token), from a DRAM budget smaller than the file: reads
 * are issued `lookahead` tensors ahead of use so I/O overlaps compute,
 * and kv_stream_acquire() blocks only when a read is late.
 *
 * Budget split, decided at create: the window is a FIFO ring that
 * streamed tensors cycle through, each buffer contiguous; the rest of the
 * budget keeps tensors resident after their first load, and window +
 * resident buffers <= budget_bytes. The window is sized for k = hold +
 * lookahead live buffers: the sum of the k largest streamed buffers plus
 * the largest once more less one granule (a page, or the O_DIRECT
 * alignment if larger), because an entry that does not fit before the end
 * of the ring wraps to its start and skips that tail (k = 1: just the
 * largest). A budget too small for that is cut into the read-ahead only
 * (read-ahead is best effort; less of it means less overlap): the window
 * for k = hold must fit, or create fails with -EINVAL. For example,
 * buffers of 15, 25 and 25 pages with hold 2 need a 74-page window, not
 * 50: with B at pages 15..40, C finds 15 + 10 free pages but not 25. Residents are chosen by uses
 * per pass (a tensor named twice in the order saves two reads per pass),
 * then by first use, skipping what does not fit. Why not by reuse
 * distance: in a cyclic order every tensor's reuse distance is one pass,
 * so each resident byte saves exactly one read per use whichever tensor it
 * holds; only the number of uses tells tensors apart. When the whole
 * order fits in the budget everything is resident and nothing is
 * re-read. Buffers come from one kv_arena (tier DRAM, kind WEIGHTS,
 * cfg.label) of at most the budget, so the budget is real memory that
 * the registry shows; each buffer is the tensor's range widened to the
 * file's O_DIRECT alignment (so reads need no staging) and rounded to a
 * page, and the budget is counted in those buffer bytes.
 *
 * Backends: KV_STREAM_IO reads through kv_io with O_DIRECT, bypassing the
 * page cache. KV_STREAM_MMAP maps the file (kv_mmap): the read-ahead is
 * MADV_WILLNEED, acquire populates the tensor's pages (the stall), and a
 * released streamed tensor gets DONTNEED, so the page cache held for it
 * stays near the budget; its pointers point into the mapping.
 *
 * Order: acquires must follow cfg.order, repeating; an acquire of any
 * other tensor is -EINVAL and changes nothing. A tensor stays valid from
 * acquire until its release; the consumer may hold `hold` tensors (more
 * may fail with -ENOMEM until it releases). The window assumes releases come
 * roughly in acquire order: the ring is FIFO, so a tensor kept held while
 * later ones are acquired and released pins their space until its own
 * release, and can run the window out (-ENOMEM) within `hold`.
 *
 * A failed read (-EIO, ...) makes the acquire of that tensor return the
 * error with the tensor and the engine's detail; the order position does
 * not advance, the buffer is kept, and the next acquire of the same
 * tensor re-reads it (the caller retries, or destroys the stream).
 *
 * Thread safety: one consumer thread calls acquire, release and stats;
 * read completions arrive on the engine's threads and are synchronised
 * inside. Destroy waits for reads in flight. */
enum kv_stream_backend {
	KV_STREAM_IO = 0,    /* kv_io, O_DIRECT */
	KV_STREAM_MMAP = 1,  /* a kv_mmap with WILLNEED ahead, DONTNEED behind */
};

struct kv_stream;

struct kv_stream_config {
	const struct kv_tensor_index *index; /* read at create, not kept */
	const char *path;                    /* the tensor file */
	const uint32_t *order;               /* (order_len) tensor ids; copied */
	uint32_t order_len;
	uint64_t budget_bytes;               /* DRAM for tensor buffers (>= the
					      * window for `hold`, see above) */
	uint32_t lookahead;                  /* tensors ahead in flight (default 4) */
	uint32_t hold;                       /* tensors held at once (default 1) */
	enum kv_stream_backend backend;
	struct kv_io *io;                    /* IO: an engine to share; NULL: the
					      * stream starts its own */
	enum kv_io_backend io_backend;       /* for the stream's own engine */
	struct kv_registry *registry;        /* NULL: the default registry */
	const char *label;                   /* default "stream" */
};

KV_API void kv_stream_config_default(struct kv_stream_config *cfg);

/* Create a stream: checks the config and the index against the file,
 * splits the budget, allocates the buffers. No tensor is read yet: the
 * first acquire issues the first reads. Errors: -EINVAL (NULL fields, an
 * order id outside the index, a tensor outside the file or with a shape
 * not matching its size, a budget below the largest buffer or the window
 * that `hold` needs, zero hold),
 * -errno of opening the file (path in the detail), -ENOMEM, the engine's
 * and the arena's errors. On error nothing is left behind.
 * Ownership: destroy with kv_stream_destroy(). */
KV_API int kv_stream_create(const struct kv_stream_config *cfg,
			    struct kv_stream **out);

/* Wait for reads in flight, then free everything. Pointers returned by
 * acquire become invalid. NULL is a no-op. */
KV_API void kv_stream_destroy(struct kv_stream *s);

/* The bytes of tensor `id`, the next tensor of the order, in DRAM (IO) or
 * mapped and populated (MMAP); read-only for the caller. Issues the reads
 * of the following tensors as the window allows. Blocks only while the
 * tensor's read is still in flight.
 * Errors: -EINVAL (not the next tensor of the order, id out of range),
 * -ENOMEM (window full of held tensors), a read's error (see above). */
KV_API int kv_stream_acquire(struct kv_stream *s, uint32_t id, const void **data);

/* The consumer is done with one acquire of `id`: a streamed tensor's
 * buffer is reused once nothing holds or expects it. Errors: -EINVAL
 * (not held). */
KV_API int kv_stream_release(struct kv_stream *s, uint32_t id);

/* Whether `id` was chosen to stay resident. */
KV_API bool kv_stream_is_resident(const struct kv_stream *s, uint32_t id);

struct kv_stream_stats {
	uint64_t acquires;        /* successful acquires */
	uint64_t releases;
	uint64_t bytes_read;      /* tensor bytes loaded for acquires: each acquire
				   * that found a freshly read tensor counts its
				   * bytes (read-ahead not yet acquired is not
				   * counted; nor are alignment margins) */
	uint64_t bytes_ahead;     /* tensor bytes issued and not yet acquired */
	uint64_t resident_bytes;  /* tensor bytes of the tensors kept resident */
	uint64_t streamed_bytes;  /* tensor bytes of the other tensors of the order */
	uint32_t n_resident, n_streamed;
	uint64_t window_bytes;    /* the ring of streamed buffers (with the
				   * margin for its wrap, see above) */
	uint64_t buffer_bytes;    /* window + resident buffers (<= budget) */
	uint64_t stall_ns;        /* time acquire waited for data */
	uint64_t call_ns;         /* time spent inside acquire and release, all
				   * in (issuing reads, waiting, advising) */
	uint64_t stalls;          /* acquires that waited */
	uint64_t read_ns;         /* sum of each acquired read's issue-to-ready
				   * time (MMAP: ready = acquire's populate done) */
	double overlap_ratio;     /* 1 - stall_ns / read_ns: the share of read
				   * time hidden behind compute (1 when none) */
	uint64_t read_errors;
};

KV_API int kv_stream_stats(const struct kv_stream *s, struct kv_stream_stats *out);

/* Check the ring and the per-tensor state: ring entries disjoint, inside
 * the window, in FIFO order; each streamed tensor with a buffer is held
 * or expected; counts match. Returns 0 or -EFAULT naming the first broken
 * invariant. Call from the consumer thread. */
KV_API int kv_stream_validate(const struct kv_stream *s);

/* (end of streamer) */

#ifdef __cplusplus
}
#endif

#endif /* KV_OFFLOAD_H */
