// SPDX-License-Identifier: MIT
/*
 * The io_uring backend of the I/O engine: one ring per worker thread, and
 * only that thread touches its ring, so the ring is created on the worker
 * with IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN when the
 * kernel takes them (setup is retried without on -EINVAL). The worker's
 * staging slots are registered as one fixed buffer (staged transfers use
 * READ_FIXED / WRITE_FIXED) and files go into a sparse fixed-file table,
 * registered lazily the first time a request of a file (generation) is
 * issued and dropped after the file is closed. Either registration may
 * fail (RLIMIT_MEMLOCK, old kernels); the worker then uses plain buffers
 * or descriptors and says so at debug level.
 *
 * A worker sleeps only in io_uring_submit_and_wait() with a read of its
 * eventfd always armed in the ring: submitters write the eventfd when the
 * worker said (under q_lock) that it found no work, so one wait covers
 * both new requests and completions. Entry: kv_io_uring_ops.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <liburing.h>

#include "offload-impl.h"

struct uring_worker {
	struct kv_io *io;
	uint32_t index;
	pthread_t thread;
	bool thread_started;
	struct io_uring ring;
	bool ring_up;
	int efd;                    /* eventfd that wakes the worker */
	uint64_t efd_val;           /* the armed read's target */
	bool efd_armed;
	bool idle;                  /* q_lock: found no work, wake me */
	bool fixed_files, fixed_bufs;
	uint32_t *file_gen;         /* (KV_IO_MAX_FILES) generation registered, 0: none */
	unsigned files_seen;        /* io->files_gen when file_gen was last synced */
	struct io_chunk *chunks;    /* (queue_depth) */
	uint32_t *free_chunk;       /* (queue_depth) indices of idle chunks */
	uint32_t n_free_chunk;
	uint32_t *free_stage;       /* (stage_per_worker) idle staging slots */
	uint32_t n_free_stage;
	struct io_chunk **fresh;    /* (queue_depth) taken in this round */
	uint32_t inflight;          /* chunks in the ring */
	int setup_rc;               /* q_lock: 1 until the worker reported */
	char why[128];
	unsigned setup_flags;
	unsigned long submit_errors;
};

static void wake_one(struct uring_worker *w)
{
	uint64_t one = 1;

	/* Only fails if the counter would overflow, and it is read back to
	 * zero at every wake-up. */
	if (write(w->efd, &one, sizeof(one)) < 0)
		kv_log(KV_LOG_DEBUG, "io: eventfd write failed: %s", kv_strerror(-errno));
}

static void uring_wake(struct kv_io *io)
{
	struct uring_worker *ws = io->workers;

	for (uint32_t i = 0; i < io->n_workers; i++) {
		if (ws[i].idle) {
			ws[i].idle = false;
			wake_one(&ws[i]);
		}
	}
}

static int ring_setup(struct uring_worker *w)
{
	struct kv_io *io = w->io;
	unsigned entries = io->cfg.queue_depth + 1;
	struct io_uring_params p;
	struct iovec iov;
	int rc = -kv_io_setup_injected();

	if (rc) {
		snprintf(w->why, sizeof(w->why), "io_uring_setup: %s (injected)", kv_strerror(rc));
		return rc;
	}
	memset(&p, 0, sizeof(p));
#if defined(IORING_SETUP_SINGLE_ISSUER) && defined(IORING_SETUP_DEFER_TASKRUN)
	p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
	rc = io_uring_queue_init_params(entries, &w->ring, &p);
	if (rc == -EINVAL) {
		memset(&p, 0, sizeof(p));
		rc = io_uring_queue_init_params(entries, &w->ring, &p);
	}
#else
	rc = io_uring_queue_init_params(entries, &w->ring, &p);
#endif
	if (rc < 0) {
		snprintf(w->why, sizeof(w->why), "io_uring_setup: %s", kv_strerror(rc));
		return rc;
	}
	w->ring_up = true;
	w->setup_flags = p.flags;

	iov.iov_base = kv_io_stage_mem(io, w->index, 0);
	iov.iov_len = io->stage_slot * io->stage_per_worker;
	rc = io_uring_register_buffers(&w->ring, &iov, 1);
	w->fixed_bufs = rc == 0;
	if (rc)
		kv_log(KV_LOG_DEBUG, "io: ring %" PRIu32 ": staging not registered (%s), "
		       "plain reads", w->index, kv_strerror(rc));
	rc = io_uring_register_files_sparse(&w->ring, KV_IO_MAX_FILES);
	w->fixed_files = rc == 0;
	if (rc)
		kv_log(KV_LOG_DEBUG, "io: ring %" PRIu32 ": no fixed file table (%s)", w->index,
		       kv_strerror(rc));
	return 0;
}

/* Drop the registrations of files closed (or reopened) since the last
 * look, so the ring does not keep a closed file alive. */
static void sync_files(struct uring_worker *w)
{
	struct kv_io *io = w->io;
	int none = -1;

	w->files_seen = atomic_load(&io->files_gen);
	if (!w->fixed_files)
		return;
	pthread_mutex_lock(&io->files_lock);
	for (unsigned i = 0; i < KV_IO_MAX_FILES; i++) {
		if (!w->file_gen[i] || w->file_gen[i] == io->files[i].gen)
			continue;
		(void)io_uring_register_files_update(&w->ring, i, &none, 1);
		w->file_gen[i] = 0;
	}
	pthread_mutex_unlock(&io->files_lock);
}

static struct io_uring_sqe *get_sqe(struct uring_worker *w)
{
	struct io_uring_sqe *sqe = io_uring_get_sqe(&w->ring);

	/* The ring has an entry per chunk plus the eventfd read, and every
	 * round submits what it prepared, so this is a safety net. */
	while (!sqe) {
		io_uring_submit(&w->ring);
		sqe = io_uring_get_sqe(&w->ring);
	}
	return sqe;
}

/* Queue the transfer of what remains of c. */
static void prep(struct uring_worker *w, struct io_chunk *c)
{
	struct io_op *op = c->op;
	struct io_uring_sqe *sqe = get_sqe(w);
	unsigned n = (unsigned)(c->len - c->done);
	uint64_t pos = c->pos + c->done;
	char *mem = c->mem + c->done;
	int fd = op->fd;
	bool fixed = false;

	if (w->fixed_files) {
		if (w->file_gen[op->slot] != op->gen &&
		    io_uring_register_files_update(&w->ring, (unsigned)op->slot, &op->fd, 1) >= 0)
			w->file_gen[op->slot] = op->gen;
		if (w->file_gen[op->slot] == op->gen) {
			fd = op->slot;
			fixed = true;
		}
	}
	if (c->stage >= 0 && w->fixed_bufs) {
		if (op->write)
			io_uring_prep_write_fixed(sqe, fd, mem, n, pos, 0);
		else
			io_uring_prep_read_fixed(sqe, fd, mem, n, pos, 0);
	} else if (op->write) {
		io_uring_prep_write(sqe, fd, mem, n, pos);
	} else {
		io_uring_prep_read(sqe, fd, mem, n, pos);
	}
	if (fixed)
		io_uring_sqe_set_flags(sqe, IOSQE_FIXED_FILE);
	io_uring_sqe_set_data(sqe, c);
}

static void arm_efd(struct uring_worker *w)
{
	struct io_uring_sqe *sqe = get_sqe(w);

	io_uring_prep_read(sqe, w->efd, &w->efd_val, sizeof(w->efd_val), 0);
	io_uring_sqe_set_data(sqe, NULL);
	w->efd_armed = true;
}

static void release(struct uring_worker *w, struct io_chunk *c)
{
	if (c->stage >= 0)
		w->free_stage[w->n_free_stage++] = (uint32_t)c->stage;
	w->free_chunk[w->n_free_chunk++] = (uint32_t)(c - w->chunks);
	w->inflight--;
}

/* Take as many chunks as there are idle chunk slots and queue them.
 * Returns true when the worker should exit. */
static bool fill(struct uring_worker *w)
{
	struct kv_io *io = w->io;
	uint32_t n = 0;
	bool leave;

	pthread_mutex_lock(&io->q_lock);
	while (w->n_free_chunk) {
		struct io_chunk *c = &w->chunks[w->free_chunk[w->n_free_chunk - 1]];

		if (kv_io_take(io, c, w->n_free_stage > 0) <= 0)
			break;
		w->n_free_chunk--;
		if (c->needs_stage)
			c->stage = (int)w->free_stage[--w->n_free_stage];
		w->fresh[n++] = c;
	}
	/* With work left in the queue a completion is coming (every slot
	 * the worker lacks is in flight), so no wake-up is needed. */
	w->idle = !io->q_head;
	leave = io->exiting && !io->q_head && w->inflight == 0 && n == 0;
	pthread_mutex_unlock(&io->q_lock);

	for (uint32_t i = 0; i < n; i++) {
		struct io_chunk *c = w->fresh[i];

		if (c->needs_stage)
			kv_io_chunk_begin(io, c, kv_io_stage_mem(io, w->index, (uint32_t)c->stage));
		prep(w, c);
		w->inflight++;
	}
	return leave;
}

static void reap(struct uring_worker *w)
{
	struct io_uring_cqe *cqe;
	unsigned head, seen = 0;

	io_uring_for_each_cqe(&w->ring, head, cqe) {
		struct io_chunk *c = io_uring_cqe_get_data(cqe);

		seen++;
		if (!c) {
			w->efd_armed = false;
			continue;
		}
		if (kv_io_chunk_done(w->io, c, cqe->res))
			prep(w, c);
		else
			release(w, c);
	}
	io_uring_cq_advance(&w->ring, seen);
}

static void *uring_main(void *arg)
{
	struct uring_worker *w = arg;
	struct kv_io *io = w->io;
	int rc = ring_setup(w);

	pthread_mutex_lock(&io->q_lock);
	w->setup_rc = rc;
	pthread_cond_broadcast(&io->q_cond);
	pthread_mutex_unlock(&io->q_lock);
	if (rc)
		return NULL;

	for (;;) {
		if (atomic_load(&io->files_gen) != w->files_seen)
			sync_files(w);
		if (fill(w))
			break;
		if (!w->efd_armed)
			arm_efd(w);
		rc = io_uring_submit_and_wait(&w->ring, 1);
		if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
			/* Nothing was lost: the entries stay queued and the
			 * next round submits them again. */
			if (w->submit_errors++ == 0)
				kv_log(KV_LOG_WARN, "io: ring %" PRIu32 ": io_uring_enter: %s, retrying",
				       w->index, kv_strerror(rc));
			nanosleep(&(struct timespec){ .tv_nsec = 1000000 }, NULL);
		}
		reap(w);
	}
	return NULL;
}

static void free_worker(struct uring_worker *w)
{
	if (w->ring_up)
		io_uring_queue_exit(&w->ring);
	if (w->efd >= 0)
		close(w->efd);
	free(w->file_gen);
	free(w->chunks);
	free(w->free_chunk);
	free(w->free_stage);
	free(w->fresh);
}

static void uring_stop(struct kv_io *io)
{
	struct uring_worker *ws = io->workers;

	if (!ws)
		return;
	pthread_mutex_lock(&io->q_lock);
	for (uint32_t i = 0; i < io->n_workers; i++) {
		if (ws[i].thread_started) {
			ws[i].idle = false;
			wake_one(&ws[i]);
		}
	}
	pthread_mutex_unlock(&io->q_lock);
	for (uint32_t i = 0; i < io->n_workers; i++) {
		if (ws[i].thread_started)
			pthread_join(ws[i].thread, NULL);
		free_worker(&ws[i]);
	}
	free(ws);
	io->workers = NULL;
}

static int init_worker(struct kv_io *io, struct uring_worker *w, uint32_t index)
{
	uint32_t qd = io->cfg.queue_depth;

	w->io = io;
	w->index = index;
	w->setup_rc = 1;
	w->efd = eventfd(0, EFD_CLOEXEC);
	w->file_gen = calloc(KV_IO_MAX_FILES, sizeof(*w->file_gen));
	w->chunks = calloc(qd, sizeof(*w->chunks));
	w->free_chunk = calloc(qd, sizeof(*w->free_chunk));
	w->free_stage = calloc(io->stage_per_worker, sizeof(*w->free_stage));
	w->fresh = calloc(qd, sizeof(*w->fresh));
	if (w->efd < 0)
		return -errno;
	if (!w->file_gen || !w->chunks || !w->free_chunk || !w->free_stage || !w->fresh)
		return -ENOMEM;
	for (uint32_t i = 0; i < qd; i++)
		w->free_chunk[i] = qd - 1 - i;
	w->n_free_chunk = qd;
	for (uint32_t i = 0; i < io->stage_per_worker; i++)
		w->free_stage[i] = i;
	w->n_free_stage = io->stage_per_worker;
	return 0;
}

static int uring_start(struct kv_io *io, char *why, size_t why_len)
{
	struct uring_worker *ws = calloc(io->n_workers, sizeof(*ws));
	int rc = 0;

	if (!ws) {
		snprintf(why, why_len, "out of memory");
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < io->n_workers; i++)
		ws[i].efd = -1;
	io->workers = ws;
	for (uint32_t i = 0; i < io->n_workers && !rc; i++) {
		rc = init_worker(io, &ws[i], i);
		if (rc) {
			snprintf(why, why_len, "worker %" PRIu32 ": %s", i, kv_strerror(rc));
			break;
		}
		rc = -pthread_create(&ws[i].thread, NULL, uring_main, &ws[i]);
		if (rc) {
			snprintf(why, why_len, "pthread_create: %s", kv_strerror(rc));
			break;
		}
		ws[i].thread_started = true;
	}

	/* Every started worker reports its ring setup. */
	pthread_mutex_lock(&io->q_lock);
	for (uint32_t i = 0; i < io->n_workers; i++) {
		while (ws[i].thread_started && ws[i].setup_rc == 1)
			pthread_cond_wait(&io->q_cond, &io->q_lock);
		if (ws[i].thread_started && ws[i].setup_rc && !rc) {
			rc = ws[i].setup_rc;
			snprintf(why, why_len, "%s", ws[i].why);
		}
	}
	if (rc)
		io->exiting = true;
	pthread_mutex_unlock(&io->q_lock);

	if (rc) {
		uring_stop(io);
		io->exiting = false;
		return rc;
	}
	snprintf(why, why_len, "%" PRIu32 " ring%s%s%s%s", io->n_workers,
		 io->n_workers == 1 ? "" : "s",
		 ws[0].setup_flags & IORING_SETUP_SINGLE_ISSUER ? ", single issuer" : "",
		 ws[0].fixed_bufs ? ", registered staging" : "",
		 ws[0].fixed_files ? ", registered files" : "");
	return 0;
}

const struct io_backend_ops kv_io_uring_ops = {
	.name = "io_uring",
	.start = uring_start,
	.wake = uring_wake,
	.stop = uring_stop,
};
