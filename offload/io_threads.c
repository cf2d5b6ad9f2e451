// SPDX-License-Identifier: MIT
/*
 * The thread-pool backend of the I/O engine, for machines where io_uring
 * cannot be set up (seccomp, kernel.io_uring_disabled, old kernels) or
 * when asked for: each pool thread takes one chunk at a time from the
 * shared queue and moves it with pread(2)/pwrite(2), handing every
 * transfer's outcome to kv_io_chunk_done() exactly as a ring completion
 * is, so short transfers, -EAGAIN/-EINTR, end of file and the seam behave
 * the same in both backends. Each thread owns one staging slot (it has
 * one chunk at a time). Entry: kv_io_threads_ops.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "offload-impl.h"

struct pool_thread {
	struct kv_io *io;
	uint32_t index;
	pthread_t thread;
	bool started;
};

static void *pool_main(void *arg)
{
	struct pool_thread *t = arg;
	struct kv_io *io = t->io;
	struct io_chunk c;

	for (;;) {
		pthread_mutex_lock(&io->q_lock);
		while (!io->q_head && !io->exiting)
			pthread_cond_wait(&io->q_cond, &io->q_lock);
		if (!io->q_head) {
			pthread_mutex_unlock(&io->q_lock);
			break;
		}
		kv_io_take(io, &c, true);
		/* A request split in many chunks wants more than one thread. */
		if (io->q_head)
			pthread_cond_signal(&io->q_cond);
		pthread_mutex_unlock(&io->q_lock);

		if (c.needs_stage) {
			c.stage = 0;
			kv_io_chunk_begin(io, &c, kv_io_stage_mem(io, t->index, 0));
		}
		for (;;) {
			size_t n = c.len - c.done;
			off_t pos = (off_t)(c.pos + c.done);
			ssize_t r = c.op->write ? pwrite(c.op->fd, c.mem + c.done, n, pos)
						: pread(c.op->fd, c.mem + c.done, n, pos);

			if (!kv_io_chunk_done(io, &c, r < 0 ? -errno : (int64_t)r))
				break;
		}
	}
	return NULL;
}

static void pool_wake(struct kv_io *io)
{
	pthread_cond_signal(&io->q_cond);
}

static void pool_stop(struct kv_io *io)
{
	struct pool_thread *ts = io->workers;

	if (!ts)
		return;
	pthread_mutex_lock(&io->q_lock);
	io->exiting = true;
	pthread_cond_broadcast(&io->q_cond);
	pthread_mutex_unlock(&io->q_lock);
	for (uint32_t i = 0; i < io->n_workers; i++)
		if (ts[i].started)
			pthread_join(ts[i].thread, NULL);
	free(ts);
	io->workers = NULL;
}

static int pool_start(struct kv_io *io, char *why, size_t why_len)
{
	struct pool_thread *ts = calloc(io->n_workers, sizeof(*ts));
	int rc;

	if (!ts) {
		snprintf(why, why_len, "out of memory");
		return -ENOMEM;
	}
	io->workers = ts;
	for (uint32_t i = 0; i < io->n_workers; i++) {
		ts[i].io = io;
		ts[i].index = i;
		rc = pthread_create(&ts[i].thread, NULL, pool_main, &ts[i]);
		if (rc) {
			snprintf(why, why_len, "pthread_create: %s", kv_strerror(rc));
			pool_stop(io);
			io->exiting = false;
			return -rc;
		}
		ts[i].started = true;
	}
	snprintf(why, why_len, "%" PRIu32 " threads", io->n_workers);
	return 0;
}

const struct io_backend_ops kv_io_threads_ops = {
	.name = "threads",
	.start = pool_start,
	.wake = pool_wake,
	.stop = pool_stop,
};
