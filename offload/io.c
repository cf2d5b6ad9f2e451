// SPDX-License-Identifier: MIT
/*
 * The I/O engine (kv_io) above its two backends: configuration and backend
 * choice, the file table (O_DIRECT and its alignment), request validation
 * and the shared queue, chunking of requests into transfers of at most
 * max_request bytes (through staging slots when O_DIRECT cannot take the
 * caller's offset, length or buffer), completion (results, short reads,
 * end of file, errors with their detail), tickets, destroy, and the I/O
 * seam. Entry points are those of <kv/offload.h>; the backends call
 * kv_io_take(), kv_io_chunk_begin() and kv_io_chunk_done().
 *
 * A request is finished when the bytes of its finished chunks add up to
 * its length; its result is its first error, else for a read the bytes up
 * to the lowest end of data any chunk met, else its length.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#include "offload-impl.h"

#define DEFAULT_QUEUE_DEPTH 64u
#define DEFAULT_MAX_REQUEST ((size_t)1 << 20)
#define DEFAULT_STAGING ((size_t)8 << 20)
#define DEFAULT_RINGS 1u
#define DEFAULT_THREADS 4u
#define MAX_QUEUE_DEPTH 4096u
#define MAX_WORKERS 64u
#define MIN_REQUEST ((size_t)512)
/* A transfer's length must fit the 32-bit length of an SQE; 1 GiB also
 * keeps a staging slot registrable (the kernel's limit per buffer). */
#define MAX_REQUEST ((size_t)1 << 30)
/* Staging slots are at least this big, so any alignment a file system
 * reports fits a slot many times over. */
#define MIN_STAGE_SLOT ((size_t)64 << 10)

struct io_ticket {
	uint64_t ticket;   /* 0: empty */
	int64_t result;
	bool done;
	char *detail;      /* for an error result, or NULL */
};

/* ---- The seam ----------------------------------------------------------- */

static struct kv_seam io_seam;
static atomic_int inj_setup;

void kv_io_inject(unsigned ops, unsigned nth, int err_or_short)
{
	kv_seam_inject(&io_seam, ops, nth,
		       err_or_short == KV_IO_INJECT_SHORT ? KV_IO_INJECT_SHORT
		       : (err_or_short > 0 ? err_or_short : -err_or_short));
}

unsigned long kv_io_seam_calls(unsigned ops)
{
	return kv_seam_calls(&io_seam, ops);
}

void kv_io_inject_setup(int err)
{
	atomic_store(&inj_setup, err > 0 ? err : -err);
}

int kv_io_setup_injected(void)
{
	return atomic_load(&inj_setup);
}

/* Count an event of op; returns 0, an errno to fail with, or
 * KV_IO_INJECT_SHORT. */
static int seam(unsigned op)
{
	return kv_seam_hit(&io_seam, op);
}

/* ---- Small helpers ------------------------------------------------------ */

static inline bool is_pow2(uint64_t x)
{
	return x && !(x & (x - 1));
}

static inline uint64_t align_down(uint64_t x, uint64_t a)
{
	return x - x % a;
}

static inline uint64_t align_up(uint64_t x, uint64_t a)
{
	return align_down(x + a - 1, a);
}

static const char *op_name(bool write)
{
	return write ? "write" : "read";
}

/* ---- Callers and destroy ------------------------------------------------ */

/* Every entry point that touches the engine's tables, locks or tickets
 * counts itself in io->callers for as long as it runs: kv_io_destroy()
 * sets `stopping`, then waits for the count to reach zero before it frees
 * anything, and a call arriving after `stopping` leaves at once with
 * -ESHUTDOWN. Both under q_lock, so destroy can never see zero while a
 * caller is between its check and its count.
 * Collecting (wait, poll) is the exception: it starts no work, destroy
 * completes every request before it returns, and refusing it would hand
 * the caller back a buffer and a struct the engine still writes to. */
static int io_enter(struct kv_io *io, const char *what, bool collect)
{
	pthread_mutex_lock(&io->q_lock);
	if (io->stopping && !collect) {
		pthread_mutex_unlock(&io->q_lock);
		return kv_fail(ESHUTDOWN, "io: %s: the engine is being destroyed", what);
	}
	io->callers++;
	pthread_mutex_unlock(&io->q_lock);
	return 0;
}

/* The caller touches nothing of io after this returns: once the count is
 * zero destroy may free the engine. */
static void io_leave(struct kv_io *io)
{
	pthread_mutex_lock(&io->q_lock);
	if (--io->callers == 0 && io->stopping)
		pthread_cond_broadcast(&io->drain_cond);
	pthread_mutex_unlock(&io->q_lock);
}

/* ---- Configuration and creation ----------------------------------------- */

void kv_io_config_default(struct kv_io_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->backend = KV_IO_AUTO;
	cfg->queue_depth = DEFAULT_QUEUE_DEPTH;
	cfg->max_request = DEFAULT_MAX_REQUEST;
	/* 0: the backend's own default (1 ring, 4 threads), as a ring keeps
	 * many requests in flight alone while a pool thread has one. */
	cfg->workers = 0;
	cfg->staging_bytes = DEFAULT_STAGING;
}

static int check_config(const struct kv_io_config *cfg)
{
	/* Workers 0 lets the backend choose; the pool's default is the most. */
	uint32_t workers = cfg->workers ? cfg->workers : DEFAULT_THREADS;

	if (cfg->backend != KV_IO_AUTO && cfg->backend != KV_IO_URING &&
	    cfg->backend != KV_IO_THREADS)
		return kv_fail(EINVAL, "io: unknown backend %d", (int)cfg->backend);
	if (cfg->queue_depth < 1 || cfg->queue_depth > MAX_QUEUE_DEPTH)
		return kv_fail(EINVAL, "io: queue_depth %" PRIu32 " outside 1..%u",
			       cfg->queue_depth, MAX_QUEUE_DEPTH);
	if (cfg->max_request < MIN_REQUEST || cfg->max_request > MAX_REQUEST)
		return kv_fail(EINVAL, "io: max_request %zu outside %zu..%zu", cfg->max_request,
			       MIN_REQUEST, MAX_REQUEST);
	if (cfg->workers > MAX_WORKERS)
		return kv_fail(EINVAL, "io: workers %" PRIu32 " above %u", cfg->workers,
			       MAX_WORKERS);
	/* staging_bytes is a bound on the staging memory, and every worker
	 * needs one slot of at least MIN_STAGE_SLOT to stage anything. */
	if (cfg->staging_bytes / workers < MIN_STAGE_SLOT)
		return kv_fail(EINVAL, "io: staging_bytes %zu is below %" PRIu32 " workers%s x %zu "
			       "bytes (one smallest staging slot each) = %zu bytes",
			       cfg->staging_bytes, workers, cfg->workers ? "" : " (the default)",
			       MIN_STAGE_SLOT, (size_t)workers * MIN_STAGE_SLOT);
	return 0;
}

/* The backend to try: the config's, or with AUTO the environment's. */
static enum kv_io_backend wanted_backend(const struct kv_io_config *cfg, const char **why)
{
	const char *env;

	*why = NULL;
	if (cfg->backend != KV_IO_AUTO)
		return cfg->backend;
	env = getenv("KV_IO_BACKEND");
	if (!env || !*env)
		return KV_IO_AUTO;
	if (strcmp(env, "threads") == 0) {
		*why = "KV_IO_BACKEND=threads";
		return KV_IO_THREADS;
	}
	if (strcmp(env, "uring") == 0 || strcmp(env, "io_uring") == 0) {
		*why = "KV_IO_BACKEND=uring";
		return KV_IO_URING;
	}
	kv_log(KV_LOG_WARN, "io: KV_IO_BACKEND='%s' is neither 'threads' nor 'uring', ignored",
	       env);
	return KV_IO_AUTO;
}

static int staging_create(struct kv_io *io)
{
	struct kv_arena_config ac;
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	void *p;
	int rc;

	/* Each worker's share of staging_bytes, at least MIN_STAGE_SLOT
	 * (check_config). A slot holds a whole max_request transfer when the
	 * share allows; else it is the largest power of two the share holds,
	 * and kv_io_take() cuts staged chunks to the slot, so the config's
	 * staging_bytes stays a bound whatever max_request and workers are. */
	size_t share = io->cfg.staging_bytes / io->n_workers;

	io->stage_slot = MIN_STAGE_SLOT;
	while (io->stage_slot < io->cfg.max_request && io->stage_slot <= share / 2)
		io->stage_slot <<= 1;
	io->stage_per_worker = (uint32_t)(share / io->stage_slot);
	io->stage_bytes = io->stage_slot * io->stage_per_worker * io->n_workers;

	kv_arena_config_default(&ac);
	ac.bytes = io->stage_bytes;
	ac.kind = KV_KIND_STAGING;
	ac.label = "io.staging";
	ac.registry = io->cfg.registry;
	rc = kv_arena_create(&ac, &io->staging);
	if (rc)
		return rc;
	/* One allocation of the whole region: the registry then shows the
	 * staging bytes as in use by the engine. */
	rc = kv_arena_alloc(io->staging, io->stage_bytes, page > 0 ? page : 64, &p);
	if (rc) {
		kv_arena_destroy(io->staging, KV_ARENA_FORCE);
		io->staging = NULL;
		return rc;
	}
	io->stage_base = p;
	return 0;
}

static void staging_destroy(struct kv_io *io)
{
	if (!io->staging)
		return;
	kv_arena_free(io->staging, io->stage_base);
	kv_arena_destroy(io->staging, KV_ARENA_FORCE);
	io->staging = NULL;
}

/* Start one backend with n workers (0: its default). */
static int start_backend(struct kv_io *io, enum kv_io_backend b, char *why, size_t why_len)
{
	io->backend = b;
	io->ops = b == KV_IO_URING ? &kv_io_uring_ops : &kv_io_threads_ops;
	io->n_workers = io->cfg.workers ? io->cfg.workers
					: (b == KV_IO_URING ? DEFAULT_RINGS : DEFAULT_THREADS);
	staging_destroy(io);
	if (staging_create(io)) {
		snprintf(why, why_len, "staging: %s", kv_last_error());
		return -ENOMEM;
	}
	return io->ops->start(io, why, why_len);
}

static int tickets_init(struct kv_io *io)
{
	pthread_condattr_t ca;

	io->tk_cap = 256;
	io->tickets = calloc(io->tk_cap, sizeof(*io->tickets));
	if (!io->tickets)
		return -ENOMEM;
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&io->tk_cond, &ca);
	pthread_condattr_destroy(&ca);
	pthread_mutex_init(&io->tk_lock, NULL);
	atomic_init(&io->next_ticket, 1);
	return 0;
}

int kv_io_create(const struct kv_io_config *cfg, struct kv_io **out)
{
	struct kv_io_config def;
	enum kv_io_backend want;
	const char *env_why;
	char why[160] = "";
	struct kv_io *io;
	int rc;

	if (!out)
		return kv_fail(EINVAL, "io: out is NULL");
	if (!cfg) {
		kv_io_config_default(&def);
		cfg = &def;
	}
	rc = check_config(cfg);
	if (rc)
		return rc;
	io = calloc(1, sizeof(*io));
	if (!io)
		return kv_fail(ENOMEM, "io: out of memory for the engine");
	io->cfg = *cfg;
	for (unsigned i = 0; i < KV_IO_MAX_FILES; i++)
		io->files[i].fd = -1;
	pthread_mutex_init(&io->files_lock, NULL);
	pthread_mutex_init(&io->q_lock, NULL);
	pthread_cond_init(&io->q_cond, NULL);
	pthread_cond_init(&io->drain_cond, NULL);
	if (tickets_init(io)) {
		free(io);
		return kv_fail(ENOMEM, "io: out of memory for the ticket table");
	}

	want = wanted_backend(cfg, &env_why);
	if (want != KV_IO_THREADS) {
		rc = start_backend(io, KV_IO_URING, why, sizeof(why));
		if (rc == 0) {
			snprintf(io->reason, sizeof(io->reason), "io_uring (%s%s%s)", why,
				 env_why ? ", " : "", env_why ? env_why : "");
		} else if (want == KV_IO_URING) {
			rc = kv_fail(-rc, "io: io_uring backend unavailable: %s", why);
			goto fail;
		} else {
			snprintf(io->reason, sizeof(io->reason), "threads: %s", why);
			kv_log(KV_LOG_INFO, "io: io_uring unavailable (%s), using the thread pool",
			       why);
			want = KV_IO_THREADS;
		}
	} else {
		snprintf(io->reason, sizeof(io->reason), "threads: %s",
			 env_why ? env_why : "asked for by the config");
	}
	if (want == KV_IO_THREADS) {
		rc = start_backend(io, KV_IO_THREADS, why, sizeof(why));
		if (rc) {
			rc = kv_fail(-rc, "io: thread pool: %s", why);
			goto fail;
		}
	}
	kv_log(KV_LOG_DEBUG, "io: engine up: %s, %" PRIu32 " workers, queue depth %" PRIu32
	       ", %zu staging slots of %zu bytes", io->reason, io->n_workers,
	       io->cfg.queue_depth, (size_t)io->stage_per_worker * io->n_workers,
	       io->stage_slot);
	*out = io;
	return 0;

fail:
	staging_destroy(io);
	free(io->tickets);
	free(io);
	return rc;
}

enum kv_io_backend kv_io_backend(const struct kv_io *io)
{
	return io ? io->backend : KV_IO_AUTO;
}

const char *kv_io_backend_reason(const struct kv_io *io)
{
	return io ? io->reason : "";
}

/* ---- Files -------------------------------------------------------------- */

/* Alignment O_DIRECT needs on fd: from statx(STATX_DIOALIGN), else the
 * device's logical block size for both. Returns false when direct I/O is
 * not possible or the alignment cannot be known (*why says which). */
static bool direct_alignment(int fd, const struct stat *st, uint32_t *mem, uint32_t *off,
			     const char **why)
{
	if (kv_hw_dio_align(fd, "", AT_EMPTY_PATH, off, mem)) {
		if (!*off) {
			*why = "statx says the file does not support direct I/O";
			return false;
		}
		if (!is_pow2(*off) || (*mem && !is_pow2(*mem))) {
			*why = "statx reports an alignment that is not a power of two";
			return false;
		}
		if (!*mem)
			*mem = *off;
		return true;
	}
	*off = *mem = kv_hw_block_size(st->st_dev);
	if (!*off) {
		*why = "no STATX_DIOALIGN and no block device to take the alignment from";
		return false;
	}
	return true;
}

static int open_fd(const char *path, int oflags, bool direct)
{
	int fd, inj;

	if (direct) {
		inj = seam(KV_IO_SEAM_OPEN);
		if (inj > 0) {
			errno = inj;
			return -1;
		}
		oflags |= O_DIRECT;
	}
	fd = open(path, oflags | O_CLOEXEC, 0600);
	return fd;
}

static int do_open(struct kv_io *io, const char *path, unsigned flags)
{
	int oflags, fd, slot = -1, e;
	bool direct = !(flags & KV_IO_BUFFERED);
	uint32_t mem = 1, off = 1;
	const char *why = NULL;
	struct io_file *f;
	struct stat st;
	char *copy;

	if (flags & ~(KV_IO_READ | KV_IO_WRITE | KV_IO_CREATE | KV_IO_TRUNCATE | KV_IO_BUFFERED))
		return kv_fail(EINVAL, "io: open '%s': unknown flags 0x%x", path, flags);
	switch (flags & (KV_IO_READ | KV_IO_WRITE)) {
	case KV_IO_READ:
		oflags = O_RDONLY;
		break;
	case KV_IO_WRITE:
		oflags = O_WRONLY;
		break;
	case KV_IO_READ | KV_IO_WRITE:
		oflags = O_RDWR;
		break;
	default:
		return kv_fail(EINVAL, "io: open '%s': neither KV_IO_READ nor KV_IO_WRITE", path);
	}
	if (flags & KV_IO_CREATE)
		oflags |= O_CREAT;
	if (flags & KV_IO_TRUNCATE)
		oflags |= O_TRUNC;

	fd = open_fd(path, oflags, direct);
	if (fd < 0 && direct && errno == EINVAL) {
		why = "the file system refuses O_DIRECT (EINVAL)";
		direct = false;
		fd = open_fd(path, oflags, false);
	}
	if (fd < 0) {
		e = errno;
		return kv_fail(e, "io: open '%s': %s", path, kv_strerror(e));
	}
	if (fstat(fd, &st) != 0) {
		e = errno;
		close(fd);
		return kv_fail(e, "io: fstat '%s': %s", path, kv_strerror(e));
	}
	if (direct && !direct_alignment(fd, &st, &mem, &off, &why))
		direct = false;
	if (direct) {
		/* A buffer alignment stricter than the offset one would make a
		 * resubmitted remainder's buffer misaligned; raising the
		 * offset alignment keeps every aligned offset valid. */
		if (mem > off)
			off = mem;
		if (off > io->stage_slot || mem > (uint32_t)sysconf(_SC_PAGESIZE)) {
			why = "its alignment exceeds the staging slots";
			direct = false;
		}
	}
	if (!direct && !(flags & KV_IO_BUFFERED)) {
		/* Keep the descriptor: clearing O_DIRECT is allowed by F_SETFL. */
		int fl = fcntl(fd, F_GETFL);

		if (fl >= 0 && (fl & O_DIRECT))
			(void)fcntl(fd, F_SETFL, fl & ~O_DIRECT);
		kv_log(KV_LOG_INFO, "io: '%s': buffered I/O, no O_DIRECT: %s", path, why);
	}
	if (!direct)
		mem = off = 1;

	copy = strdup(path);
	if (!copy) {
		close(fd);
		return kv_fail(ENOMEM, "io: open '%s': out of memory", path);
	}
	pthread_mutex_lock(&io->files_lock);
	for (unsigned i = 0; i < KV_IO_MAX_FILES; i++) {
		if (io->files[i].fd < 0) {
			slot = (int)i;
			break;
		}
	}
	if (slot < 0) {
		pthread_mutex_unlock(&io->files_lock);
		close(fd);
		free(copy);
		return kv_fail(EMFILE, "io: open '%s': the engine's %u file slots are in use",
			       path, KV_IO_MAX_FILES);
	}
	f = &io->files[slot];
	f->fd = fd;
	f->gen++;
	f->direct = direct;
	f->readable = flags & KV_IO_READ;
	f->writable = flags & KV_IO_WRITE;
	f->mem_align = mem;
	f->off_align = off;
	f->size = (uint64_t)st.st_size;
	f->busy = 0;
	f->path = copy;
	pthread_mutex_unlock(&io->files_lock);
	kv_log(KV_LOG_DEBUG, "io: opened '%s' as file %d: %s, alignment %" PRIu32
	       " (offset) %" PRIu32 " (memory)", path, slot, direct ? "O_DIRECT" : "buffered",
	       off, mem);
	return slot;
}

int kv_io_open(struct kv_io *io, const char *path, unsigned flags)
{
	int rc;

	if (!io || !path)
		return kv_fail(EINVAL, "io: open: %s is NULL", io ? "path" : "engine");
	rc = io_enter(io, "open", false);
	if (rc)
		return rc;
	rc = do_open(io, path, flags);
	io_leave(io);
	return rc;
}

int kv_io_file_info(const struct kv_io *io, int file, struct kv_io_file_info *out)
{
	struct kv_io *m = (struct kv_io *)io;
	int rc = 0;

	if (!io || !out)
		return kv_fail(EINVAL, "io: file_info: NULL argument");
	if (file < 0 || (unsigned)file >= KV_IO_MAX_FILES)
		return kv_fail(EBADF, "io: file %d: no such file id", file);
	rc = io_enter(m, "file_info", false);
	if (rc)
		return rc;
	pthread_mutex_lock(&m->files_lock);
	if (m->files[file].fd < 0) {
		rc = kv_fail(EBADF, "io: file %d: not open", file);
	} else {
		const struct io_file *f = &m->files[file];

		out->direct = f->direct;
		out->mem_align = f->mem_align;
		out->offset_align = f->off_align;
		out->size = f->size;
	}
	pthread_mutex_unlock(&m->files_lock);
	io_leave(m);
	return rc;
}

static int do_close(struct kv_io *io, int file)
{
	struct io_file *f;
	int fd, rc;
	char *path;

	pthread_mutex_lock(&io->files_lock);
	f = &io->files[file];
	if (f->fd < 0) {
		pthread_mutex_unlock(&io->files_lock);
		return kv_fail(EBADF, "io: close: file %d is not open", file);
	}
	if (f->busy) {
		/* The detail is written under the lock: once it is released
		 * another close of the same id may free f->path. */
		rc = kv_fail(EBUSY, "io: close: file %d ('%s') has %" PRIu32
			     " requests in flight", file, f->path, f->busy);
		pthread_mutex_unlock(&io->files_lock);
		return rc;
	}
	fd = f->fd;
	path = f->path;
	f->fd = -1;
	f->path = NULL;
	f->gen++;
	atomic_fetch_add(&io->files_gen, 1);
	pthread_mutex_unlock(&io->files_lock);
	close(fd);
	free(path);
	/* Rings drop their registration of the file when they next look;
	 * waking them makes that soon rather than at the next request. */
	pthread_mutex_lock(&io->q_lock);
	io->ops->wake(io);
	pthread_mutex_unlock(&io->q_lock);
	return 0;
}

int kv_io_close(struct kv_io *io, int file)
{
	int rc;

	if (!io)
		return kv_fail(EINVAL, "io: close: engine is NULL");
	if (file < 0 || (unsigned)file >= KV_IO_MAX_FILES)
		return kv_fail(EBADF, "io: file %d: no such file id", file);
	rc = io_enter(io, "close", false);
	if (rc)
		return rc;
	rc = do_close(io, file);
	io_leave(io);
	return rc;
}

/* ---- Tickets ------------------------------------------------------------ */

static size_t tk_hash(uint64_t t, size_t cap)
{
	return (size_t)((t * 0x9e3779b97f4a7c15ull) >> 20) & (cap - 1);
}

/* The slot of ticket t, or NULL. tk_lock held. */
static struct io_ticket *tk_find(struct kv_io *io, uint64_t t)
{
	for (size_t i = tk_hash(t, io->tk_cap);; i = (i + 1) & (io->tk_cap - 1)) {
		if (io->tickets[i].ticket == t)
			return &io->tickets[i];
		if (io->tickets[i].ticket == 0)
			return NULL;
	}
}

static void tk_place(struct io_ticket *tab, size_t cap, const struct io_ticket *e)
{
	size_t i = tk_hash(e->ticket, cap);

	while (tab[i].ticket)
		i = (i + 1) & (cap - 1);
	tab[i] = *e;
}

/* Insert n pending tickets, growing to stay at most half full. tk_lock held. */
static int tk_reserve(struct kv_io *io, size_t n)
{
	size_t cap = io->tk_cap;
	struct io_ticket *tab;

	while ((io->tk_count + n) * 2 > cap)
		cap *= 2;
	if (cap == io->tk_cap)
		return 0;
	tab = calloc(cap, sizeof(*tab));
	if (!tab)
		return -ENOMEM;
	for (size_t i = 0; i < io->tk_cap; i++)
		if (io->tickets[i].ticket)
			tk_place(tab, cap, &io->tickets[i]);
	free(io->tickets);
	io->tickets = tab;
	io->tk_cap = cap;
	return 0;
}

/* Remove slot e (backward-shift deletion keeps probes unbroken). */
static void tk_remove(struct kv_io *io, struct io_ticket *e)
{
	size_t mask = io->tk_cap - 1, i = (size_t)(e - io->tickets), j = i;

	for (;;) {
		size_t home;

		j = (j + 1) & mask;
		if (!io->tickets[j].ticket)
			break;
		home = tk_hash(io->tickets[j].ticket, io->tk_cap);
		/* Move j back to i unless its home lies cyclically in (i, j]. */
		if ((i <= j) ? (home > i && home <= j) : (home > i || home <= j))
			continue;
		io->tickets[i] = io->tickets[j];
		i = j;
	}
	memset(&io->tickets[i], 0, sizeof(io->tickets[i]));
	io->tk_count--;
}

static void tk_complete(struct kv_io *io, uint64_t t, int64_t result, const char *detail)
{
	struct io_ticket *e;

	pthread_mutex_lock(&io->tk_lock);
	e = tk_find(io, t);
	if (e) {
		e->result = result;
		e->done = true;
		if (result < 0 && detail && *detail)
			e->detail = strdup(detail);
		if (io->tk_waiters)
			pthread_cond_broadcast(&io->tk_cond);
	}
	pthread_mutex_unlock(&io->tk_lock);
}

/* Collect a done ticket: its result, and the caller's error detail. */
static int64_t tk_collect(struct kv_io *io, struct io_ticket *e)
{
	int64_t r = e->result;
	char *detail = e->detail;

	tk_remove(io, e);
	if (r < 0) {
		if (detail)
			kv_fail((int)-r, "%s", detail);
		else
			kv_fail((int)-r, "io: request failed: %s", kv_strerror((int)r));
	}
	free(detail);
	return r;
}

static int64_t do_wait(struct kv_io *io, uint64_t ticket, int64_t timeout_ns)
{
	struct timespec until;
	struct io_ticket *e;
	int64_t r;

	if (timeout_ns >= 0) {
		clock_gettime(CLOCK_MONOTONIC, &until);
		until.tv_sec += timeout_ns / 1000000000;
		until.tv_nsec += timeout_ns % 1000000000;
		if (until.tv_nsec >= 1000000000) {
			until.tv_sec++;
			until.tv_nsec -= 1000000000;
		}
	}
	pthread_mutex_lock(&io->tk_lock);
	for (;;) {
		e = tk_find(io, ticket);
		if (!e) {
			pthread_mutex_unlock(&io->tk_lock);
			return kv_fail(ENOENT, "io: wait: ticket %" PRIu64
				       " unknown or already collected", ticket);
		}
		if (e->done)
			break;
		io->tk_waiters++;
		if (timeout_ns < 0) {
			pthread_cond_wait(&io->tk_cond, &io->tk_lock);
		} else if (pthread_cond_timedwait(&io->tk_cond, &io->tk_lock, &until) == ETIMEDOUT) {
			io->tk_waiters--;
			e = tk_find(io, ticket);
			if (e && e->done)
				break;
			pthread_mutex_unlock(&io->tk_lock);
			return kv_fail(ETIMEDOUT, "io: wait: ticket %" PRIu64 " still in flight",
				       ticket);
		} else {
			io->tk_waiters--;
			continue;
		}
		io->tk_waiters--;
	}
	r = tk_collect(io, e);
	pthread_mutex_unlock(&io->tk_lock);
	return r;
}

int64_t kv_io_wait(struct kv_io *io, uint64_t ticket, int64_t timeout_ns)
{
	int64_t r;

	if (!io)
		return kv_fail(EINVAL, "io: wait: engine is NULL");
	r = io_enter(io, "wait", true);
	if (r)
		return r;
	r = do_wait(io, ticket, timeout_ns);
	io_leave(io);
	return r;
}

int kv_io_poll(struct kv_io *io, uint64_t ticket, int64_t *result)
{
	struct io_ticket *e;
	int rc;

	if (!io || !result)
		return kv_fail(EINVAL, "io: poll: NULL argument");
	rc = io_enter(io, "poll", true);
	if (rc)
		return rc;
	pthread_mutex_lock(&io->tk_lock);
	e = tk_find(io, ticket);
	if (!e) {
		rc = kv_fail(ENOENT, "io: poll: ticket %" PRIu64 " unknown or already collected",
			     ticket);
	} else if (e->done) {
		*result = tk_collect(io, e);
		rc = 1;
	}
	pthread_mutex_unlock(&io->tk_lock);
	io_leave(io);
	return rc;
}

/* ---- Completion --------------------------------------------------------- */

static void op_finish(struct kv_io *io, struct io_op *op)
{
	int err = atomic_load(&op->err);
	uint64_t eof = atomic_load(&op->eof), end = op->offset + op->len;
	struct kv_io_req *req = op->req;
	int64_t result;

	if (err)
		result = -err;
	else if (!op->write && eof < end)
		result = eof > op->offset ? (int64_t)(eof - op->offset) : 0;
	else
		result = (int64_t)op->len;

	if (result < 0) {
		atomic_fetch_add(&io->st_errors, 1);
	} else if (op->write) {
		atomic_fetch_add(&io->st_writes, 1);
		atomic_fetch_add(&io->st_bytes_written, (uint64_t)result);
	} else {
		atomic_fetch_add(&io->st_reads, 1);
		atomic_fetch_add(&io->st_bytes_read, (uint64_t)result);
	}
	if (op->staged)
		atomic_fetch_add(&io->st_staged, 1);

	/* The file is no longer busy before anyone hears of the completion,
	 * so a caller may close it as soon as its wait returns. */
	pthread_mutex_lock(&io->files_lock);
	io->files[op->slot].busy--;
	pthread_mutex_unlock(&io->files_lock);

	req->result = result;
	atomic_fetch_sub(&io->st_unreported, 1);
	if (op->has_cb) {
		if (result < 0)
			kv_fail(err, "%s", op->detail);
		req->cb(req);
	} else {
		tk_complete(io, op->ticket, result, op->detail);
	}
	free(op);

	pthread_mutex_lock(&io->q_lock);
	if (atomic_fetch_sub(&io->ops_in_flight, 1) == 1)
		pthread_cond_broadcast(&io->drain_cond);
	pthread_mutex_unlock(&io->q_lock);
}

/* Record the request's first error and its detail; later ones are lost,
 * as the caller gets one result. */
static void op_error(struct io_op *op, int err, uint64_t pos, size_t len, const char *note)
{
	int zero = 0;

	if (!atomic_compare_exchange_strong(&op->err, &zero, err))
		return;
	snprintf(op->detail, sizeof(op->detail),
		 "io: %s of file %d at offset %" PRIu64 " (%zu bytes) failed: %s%s",
		 op_name(op->write), op->slot, pos, len, kv_strerror(err), note);
}

static void chunk_finish(struct kv_io *io, struct io_chunk *c)
{
	struct io_op *op = c->op;
	uint64_t end = c->pos + c->done;
	size_t len;

	if (!op->write && c->done < c->len) {
		uint64_t cur = atomic_load(&op->eof);

		while (end < cur && !atomic_compare_exchange_weak(&op->eof, &cur, end))
			;
	}
	if (!op->write && c->mem != c->user_mem && !atomic_load(&op->err) && end > c->user_pos) {
		size_t valid = end - c->user_pos;

		if (valid > c->user_len)
			valid = c->user_len;
		memcpy(c->user_mem, c->mem + (c->user_pos - c->pos), valid);
	}
	/* The last chunk to account finishes the request; once this add is
	 * done another worker may free op, so its length is read before. */
	len = op->len;
	if (atomic_fetch_add(&op->accounted, c->user_len) + c->user_len == len)
		op_finish(io, op);
}

int kv_io_chunk_done(struct kv_io *io, struct io_chunk *c, int64_t res)
{
	struct io_op *op = c->op;
	size_t asked = c->len - c->done;
	uint64_t pos = c->pos + c->done;
	int inj = seam(op->write ? KV_IO_SEAM_WRITE : KV_IO_SEAM_READ);
	bool injected = false;

	if (inj == KV_IO_INJECT_SHORT && res > 0) {
		int64_t cut = res / 2;

		if (op->direct)
			cut = (int64_t)align_down((uint64_t)cut, op->off_align);
		if (cut > 0)
			res = cut;
	} else if (inj > 0) {
		res = -inj;
		injected = true;
	}

	if (res == -EAGAIN || res == -EINTR) {
		atomic_fetch_add(&io->st_resubmits, 1);
		return 1;
	}
	if (res < 0) {
		op_error(op, (int)-res, pos, asked, injected ? " (injected)" : "");
		chunk_finish(io, c);
		return 0;
	}
	if ((uint64_t)res > asked)
		res = (int64_t)asked;
	c->done += (size_t)res;
	if (c->done < c->len) {
		if (op->write) {
			if (res > 0) {
				atomic_fetch_add(&io->st_resubmits, 1);
				return 1;
			}
			op_error(op, EIO, pos, asked, " (write made no progress)");
		} else if (res > 0 && (!op->direct || (c->pos + c->done) % op->off_align == 0)) {
			/* A short read ending on an alignment boundary may be
			 * anything (a signal, a device limit): ask again. One
			 * ending off a boundary under O_DIRECT is the end of
			 * the file. */
			atomic_fetch_add(&io->st_resubmits, 1);
			return 1;
		}
	}
	chunk_finish(io, c);
	return 0;
}

/* ---- Queue -------------------------------------------------------------- */

int kv_io_take(struct kv_io *io, struct io_chunk *c, bool stage_free)
{
	struct io_op *op = io->q_head;
	uint64_t pos, end;
	size_t rem, n = 0;
	char *mem;
	bool stage;

	if (!op)
		return 0;
	rem = op->len - op->cursor;
	pos = op->offset + op->cursor;
	mem = op->buf + op->cursor;
	if (!op->direct) {
		stage = false;
		n = rem < io->cfg.max_request ? rem : io->cfg.max_request;
	} else {
		stage = pos % op->off_align || (uintptr_t)mem % op->mem_align;
		if (!stage) {
			n = (size_t)align_down(rem < io->cfg.max_request ? rem : io->cfg.max_request,
					       op->off_align);
			stage = n == 0;
		}
	}
	if (stage) {
		uint64_t a = align_down(pos, op->off_align);

		if (!stage_free)
			return -EAGAIN;
		end = op->offset + op->len;
		if (end > a + io->stage_slot)
			end = a + io->stage_slot;
		n = (size_t)(end - pos);
		c->pos = a;
		c->len = (size_t)(align_up(end, op->off_align) - a);
		c->mem = NULL;
		op->staged = true;
	} else {
		c->pos = pos;
		c->len = n;
		c->mem = mem;
	}
	c->op = op;
	c->done = 0;
	c->stage = -1;
	c->needs_stage = stage;
	c->user_pos = pos;
	c->user_len = n;
	c->user_mem = mem;
	op->cursor += n;
	if (op->cursor == op->len) {
		io->q_head = op->next;
		if (!io->q_head)
			io->q_tail = NULL;
	}
	return 1;
}

void kv_io_chunk_begin(struct kv_io *io, struct io_chunk *c, char *stage_mem)
{
	c->mem = stage_mem;
	if (c->op->write)
		memcpy(stage_mem + (c->user_pos - c->pos), c->user_mem, c->user_len);
}

/* ---- Submission --------------------------------------------------------- */

/* Check one request against the file table and copy what the engine needs
 * into op. files_lock held. */
static int check_req(struct kv_io *io, const struct kv_io_req *r, struct io_op *op)
{
	const struct io_file *f;

	if (!r)
		return kv_fail(EINVAL, "io: submit: request is NULL");
	if (r->op != KV_IO_OP_READ && r->op != KV_IO_OP_WRITE)
		return kv_fail(EINVAL, "io: submit: unknown op %d", (int)r->op);
	if (!r->buf)
		return kv_fail(EINVAL, "io: submit: %s of %zu bytes with a NULL buffer",
			       op_name(r->op == KV_IO_OP_WRITE), r->len);
	if (r->len == 0 || r->len > (size_t)INT64_MAX || r->offset > (uint64_t)INT64_MAX - r->len)
		return kv_fail(EINVAL, "io: submit: bad length %zu at offset %" PRIu64, r->len,
			       r->offset);
	if (r->file < 0 || (unsigned)r->file >= KV_IO_MAX_FILES || io->files[r->file].fd < 0)
		return kv_fail(EBADF, "io: submit: file %d is not open", r->file);
	f = &io->files[r->file];
	if (r->op == KV_IO_OP_WRITE ? !f->writable : !f->readable)
		return kv_fail(EBADF, "io: submit: file %d ('%s') is not open for %s", r->file,
			       f->path, op_name(r->op == KV_IO_OP_WRITE));
	if (r->op == KV_IO_OP_WRITE && f->direct &&
	    (r->offset % f->off_align || r->len % f->off_align))
		return kv_fail(EINVAL, "io: submit: write of %zu bytes at offset %" PRIu64
			       " to O_DIRECT file %d ('%s') is not aligned to %" PRIu32
			       " bytes (open it with KV_IO_BUFFERED to write any range)",
			       r->len, r->offset, r->file, f->path, f->off_align);
	op->req = (struct kv_io_req *)r;
	op->slot = r->file;
	op->fd = f->fd;
	op->gen = f->gen;
	op->direct = f->direct;
	op->write = r->op == KV_IO_OP_WRITE;
	op->has_cb = r->cb != NULL;
	op->mem_align = f->mem_align;
	op->off_align = f->off_align;
	op->offset = r->offset;
	op->len = r->len;
	op->buf = r->buf;
	atomic_init(&op->accounted, 0);
	atomic_init(&op->err, 0);
	atomic_init(&op->eof, UINT64_MAX);
	return 0;
}

static int do_submit(struct kv_io *io, struct kv_io_req **reqs, uint32_t n)
{
	struct io_op **ops;
	uint32_t i, checked = 0, n_tickets = 0;
	int rc = 0;

	ops = calloc(n, sizeof(*ops));
	if (!ops)
		return kv_fail(ENOMEM, "io: submit: out of memory for %" PRIu32 " requests", n);
	for (i = 0; i < n; i++) {
		ops[i] = calloc(1, sizeof(**ops));
		if (!ops[i]) {
			rc = kv_fail(ENOMEM, "io: submit: out of memory");
			goto undo;
		}
	}

	pthread_mutex_lock(&io->files_lock);
	for (i = 0; i < n; i++) {
		rc = check_req(io, reqs[i], ops[i]);
		if (rc) {
			/* Name the request, keeping the reason. */
			char why[256];

			snprintf(why, sizeof(why), "%s", kv_last_error());
			rc = kv_fail(-rc, "%s (request %" PRIu32 " of %" PRIu32
				     ", nothing queued)", why, i, n);
			break;
		}
		io->files[reqs[i]->file].busy++;
		checked++;
	}
	if (rc) {
		for (i = 0; i < checked; i++)
			io->files[reqs[i]->file].busy--;
		pthread_mutex_unlock(&io->files_lock);
		goto undo;
	}
	pthread_mutex_unlock(&io->files_lock);

	for (i = 0; i < n; i++) {
		ops[i]->ticket = atomic_fetch_add(&io->next_ticket, 1);
		n_tickets += !ops[i]->has_cb;
	}
	if (n_tickets) {
		pthread_mutex_lock(&io->tk_lock);
		if (tk_reserve(io, n_tickets)) {
			pthread_mutex_unlock(&io->tk_lock);
			rc = kv_fail(ENOMEM, "io: submit: out of memory for tickets");
			goto unbusy;
		}
		for (i = 0; i < n; i++) {
			struct io_ticket e = { .ticket = ops[i]->ticket };

			if (ops[i]->has_cb)
				continue;
			tk_place(io->tickets, io->tk_cap, &e);
			io->tk_count++;
		}
		pthread_mutex_unlock(&io->tk_lock);
	}

	pthread_mutex_lock(&io->q_lock);
	if (io->stopping) {
		pthread_mutex_unlock(&io->q_lock);
		rc = kv_fail(ESHUTDOWN, "io: submit: the engine is being destroyed");
		goto untick;
	}
	/* Only a call that queues changes the caller's structs; before the
	 * requests are linked in, as a worker may complete one (and write
	 * its result) as soon as q_lock is released. */
	for (i = 0; i < n; i++) {
		reqs[i]->ticket = ops[i]->ticket;
		reqs[i]->result = -EINPROGRESS;
	}
	for (i = 0; i < n; i++) {
		if (io->q_tail)
			io->q_tail->next = ops[i];
		else
			io->q_head = ops[i];
		io->q_tail = ops[i];
	}
	atomic_fetch_add(&io->ops_in_flight, n);
	atomic_fetch_add(&io->st_unreported, n);
	io->ops->wake(io);
	pthread_mutex_unlock(&io->q_lock);
	free(ops);
	return 0;

untick:
	pthread_mutex_lock(&io->tk_lock);
	for (i = 0; i < n; i++) {
		struct io_ticket *e = ops[i]->has_cb ? NULL : tk_find(io, ops[i]->ticket);

		if (e)
			tk_remove(io, e);
	}
	pthread_mutex_unlock(&io->tk_lock);
unbusy:
	pthread_mutex_lock(&io->files_lock);
	for (i = 0; i < n; i++)
		io->files[reqs[i]->file].busy--;
	pthread_mutex_unlock(&io->files_lock);
undo:
	for (i = 0; i < n; i++)
		free(ops[i]);
	free(ops);
	return rc;
}

int kv_io_submit(struct kv_io *io, struct kv_io_req **reqs, uint32_t n)
{
	int rc;

	if (!io || (!reqs && n))
		return kv_fail(EINVAL, "io: submit: NULL argument");
	rc = io_enter(io, "submit", false);
	if (rc)
		return rc;
	if (n)
		rc = do_submit(io, reqs, n);
	io_leave(io);
	return rc;
}

int64_t kv_io_rw(struct kv_io *io, int file, enum kv_io_op op, uint64_t offset, void *buf,
		 size_t len)
{
	struct kv_io_req req = { .file = file, .op = op, .offset = offset, .len = len,
				 .buf = buf };
	struct kv_io_req *p = &req;
	int64_t r;

	if (!io)
		return kv_fail(EINVAL, "io: rw: engine is NULL");
	/* One count over both steps: between a separate submit and wait
	 * destroy could finish (the request done, no caller inside) and
	 * the wait would find the engine freed, with req on this stack. */
	r = io_enter(io, "rw", false);
	if (r)
		return r;
	r = do_submit(io, &p, 1);
	if (r == 0)
		r = do_wait(io, req.ticket, -1);
	io_leave(io);
	return r;
}

void kv_io_stats(const struct kv_io *io, struct kv_io_stats *out)
{
	struct kv_io *m = (struct kv_io *)io;

	if (!out)
		return;
	memset(out, 0, sizeof(*out));
	if (!io || io_enter(m, "stats", false))
		return;
	out->reads = atomic_load(&io->st_reads);
	out->writes = atomic_load(&io->st_writes);
	out->bytes_read = atomic_load(&io->st_bytes_read);
	out->bytes_written = atomic_load(&io->st_bytes_written);
	out->resubmits = atomic_load(&io->st_resubmits);
	out->staged = atomic_load(&io->st_staged);
	out->errors = atomic_load(&io->st_errors);
	out->in_flight = atomic_load(&io->st_unreported);
	io_leave(m);
}

/* ---- Destroy ------------------------------------------------------------ */

int kv_io_destroy(struct kv_io *io, unsigned flags)
{
	struct io_op *cancel = NULL, **tail = &cancel, **pp;
	int cancelled = 0;

	if (!io)
		return 0;
	/* From here on every new call but a collecting one (wait, poll) is
	 * refused (io_enter), and submits already past it find `stopping`
	 * when they come to queue. */
	pthread_mutex_lock(&io->q_lock);
	io->stopping = true;
	if (flags & KV_IO_CANCEL) {
		struct io_op *prev = NULL;

		pp = &io->q_head;
		while (*pp) {
			struct io_op *op = *pp;

			if (op->cursor) {
				prev = op;
				pp = &op->next;
				continue;
			}
			*pp = op->next;
			op->next = NULL;
			*tail = op;
			tail = &op->next;
		}
		io->q_tail = prev;
	}
	pthread_mutex_unlock(&io->q_lock);

	/* Cancelled requests complete here, on the destroying thread, in
	 * submission order; their callbacks run as for any other, and a
	 * waiter on one gets -ECANCELED. */
	while (cancel) {
		struct io_op *op = cancel;

		cancel = op->next;
		op_error(op, ECANCELED, op->offset, op->len, " (by kv_io_destroy())");
		atomic_store(&op->accounted, op->len);
		op_finish(io, op);
		cancelled++;
	}

	/* Nothing is freed before every request completed (which also ends
	 * every kv_io_wait) and every caller left: a call inside the engine
	 * holds its tables and locks. */
	pthread_mutex_lock(&io->q_lock);
	while (atomic_load(&io->ops_in_flight) || io->callers)
		pthread_cond_wait(&io->drain_cond, &io->q_lock);
	io->exiting = true;
	pthread_mutex_unlock(&io->q_lock);
	io->ops->stop(io);

	for (unsigned i = 0; i < KV_IO_MAX_FILES; i++) {
		if (io->files[i].fd >= 0)
			close(io->files[i].fd);
		free(io->files[i].path);
	}
	for (size_t i = 0; i < io->tk_cap; i++)
		free(io->tickets[i].detail);
	free(io->tickets);
	staging_destroy(io);
	pthread_mutex_destroy(&io->files_lock);
	pthread_mutex_destroy(&io->q_lock);
	pthread_mutex_destroy(&io->tk_lock);
	pthread_cond_destroy(&io->q_cond);
	pthread_cond_destroy(&io->drain_cond);
	pthread_cond_destroy(&io->tk_cond);
	if (cancelled)
		kv_log(KV_LOG_INFO, "io: destroy cancelled %d queued requests", cancelled);
	free(io);
	return cancelled;
}
