// SPDX-License-Identifier: MIT
/*
 * kv-bench io: 1 MiB O_DIRECT reads of one file (2 GiB, 256 MiB with
 * --quick, kept as <dir>/kv-bench-io.dat between runs) through kv_io at
 * queue depths 1, 16 and 64, sequential and random, against references
 * measured in the same run on the same file: a plain io_uring loop at the
 * same depth written directly against liburing, and a pread(2) loop.
 * O_DIRECT everywhere keeps the page cache out. Each rep runs every
 * measurement once, kv_io next to its raw reference, so drift of a shared
 * machine hits both alike; figures are medians over reps, and the ratio
 * figures are medians of the per-rep ratios.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <liburing.h>

#include <kv/kv.h>

#include "bench.h"
#include "taxonomy/kv-private.h"

#define MiB ((uint64_t)1 << 20)
#define BLOCK MiB
#define MAX_DEPTH 64u

struct io_bench {
	char path[4200];
	uint64_t file_bytes;
	uint64_t rep_bytes;      /* bytes read by one measurement */
	uint64_t blocks;         /* file_bytes / BLOCK */
	char *bufs;              /* (MAX_DEPTH, BLOCK) */
	uint64_t rng;
};

/* The offset of the i-th read of a measurement. */
static uint64_t block_offset(struct io_bench *b, bool rnd, uint64_t i)
{
	if (rnd)
		return (bench_rand(&b->rng) % b->blocks) * BLOCK;
	return (i % b->blocks) * BLOCK;
}

int bench_data_file(const char *path, uint64_t bytes, const char *who)
{
	struct stat st;
	uint64_t seed = 1;
	char *buf;
	int fd;

	if (stat(path, &st) == 0 && (uint64_t)st.st_size == bytes)
		return 0;
	fprintf(stderr, "kv-bench %s: writing %" PRIu64 " MiB to %s\n", who, bytes >> 20, path);
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT | O_CLOEXEC, 0600);
	if (fd < 0)
		return kv_fail(errno, "%s bench: create %s: %s (O_DIRECT: use --dir on a disk)",
			       who, path, strerror(errno));
	buf = aligned_alloc(4 * MiB, 4 * MiB);
	if (!buf) {
		close(fd);
		return kv_fail(ENOMEM, "%s bench: out of memory", who);
	}
	for (uint64_t off = 0; off < bytes; off += 4 * MiB) {
		for (size_t i = 0; i < 4 * MiB; i += 8) {
			uint64_t v = bench_rand(&seed);

			memcpy(buf + i, &v, 8);
		}
		if (pwrite(fd, buf, 4 * MiB, (off_t)off) != (ssize_t)(4 * MiB)) {
			int e = errno ? errno : EIO;

			free(buf);
			close(fd);
			unlink(path);
			return kv_fail(e, "%s bench: write %s: %s", who, path, strerror(e));
		}
	}
	free(buf);
	fsync(fd);
	close(fd);
	return 0;
}

/* ---- kv_io ------------------------------------------------------------ */

static int kvio_run(struct io_bench *b, struct kv_io *io, int file, unsigned depth,
		    bool rnd, double *gbps)
{
	struct kv_io_req reqs[MAX_DEPTH];
	uint64_t n = b->rep_bytes / BLOCK, issued = 0, done = 0, t0;

	memset(reqs, 0, sizeof(reqs));
	t0 = kv_now_ns();
	for (unsigned i = 0; i < depth && issued < n; i++, issued++) {
		struct kv_io_req *p = &reqs[i];

		*p = (struct kv_io_req){ .file = file, .op = KV_IO_OP_READ,
					 .offset = block_offset(b, rnd, issued), .len = BLOCK,
					 .buf = b->bufs + i * BLOCK };
		if (kv_io_submit(io, &p, 1))
			return -EIO;
	}
	/* Oldest first: the slot collected is refilled at once. */
	for (unsigned slot = 0; done < n; slot = (slot + 1) % depth) {
		struct kv_io_req *p = &reqs[slot];
		int64_t r = kv_io_wait(io, p->ticket, -1);

		if (r != (int64_t)BLOCK)
			return kv_fail(EIO, "io bench: kv_io read returned %" PRId64 ": %s", r,
				       kv_last_error());
		done++;
		if (issued < n) {
			p->offset = block_offset(b, rnd, issued++);
			if (kv_io_submit(io, &p, 1))
				return -EIO;
		}
	}
	*gbps = (double)(n * BLOCK) / (double)(kv_now_ns() - t0);
	return 0;
}

/* ---- The raw references ------------------------------------------------ */

/* What the request at `off` returns: the whole block, or at the end of
 * the file what is left of it. */
static uint64_t raw_want(const struct bench_raw_loop *l, uint64_t off)
{
	if (!l->write && l->file_bytes && off + l->block > l->file_bytes)
		return l->file_bytes > off ? l->file_bytes - off : 0;
	return l->block;
}

static void raw_prep(const struct bench_raw_loop *l, struct io_uring_sqe *sqe, int fd,
		     uint64_t slot, uint64_t off)
{
	if (l->write)
		io_uring_prep_write(sqe, fd, l->bufs + slot * l->block, (unsigned)l->block, off);
	else
		io_uring_prep_read(sqe, fd, l->bufs + slot * l->block, (unsigned)l->block, off);
	io_uring_sqe_set_data64(sqe, slot);
}

int bench_raw_uring(const struct bench_raw_loop *l, double *gbps)
{
	struct io_uring ring;
	uint64_t n = l->count, issued = 0, done = 0, bytes = 0, t0;
	uint64_t *offs = calloc(l->depth, sizeof(*offs));   /* (depth) offset per slot */
	int fd, rc;

	if (!offs)
		return kv_fail(ENOMEM, "bench: out of memory");
	fd = open(l->path, (l->write ? O_WRONLY : O_RDONLY) | O_DIRECT | O_CLOEXEC);
	if (fd < 0) {
		free(offs);
		return kv_fail(errno, "bench: open %s: %s", l->path, strerror(errno));
	}
	rc = io_uring_queue_init(l->depth, &ring, 0);
	if (rc < 0) {
		close(fd);
		free(offs);
		return kv_fail(-rc, "bench: io_uring_queue_init: %s", strerror(-rc));
	}
	t0 = kv_now_ns();
	for (unsigned i = 0; i < l->depth && issued < n; i++, issued++) {
		offs[i] = l->offset(l->ctx, issued);
		raw_prep(l, io_uring_get_sqe(&ring), fd, i, offs[i]);
	}
	while (done < n) {
		struct io_uring_cqe *cqe;
		unsigned head, seen = 0;

		rc = io_uring_submit_and_wait(&ring, 1);
		if (rc < 0 && rc != -EINTR)
			break;
		io_uring_for_each_cqe(&ring, head, cqe) {
			uint64_t slot = io_uring_cqe_get_data64(cqe);

			seen++;
			if (cqe->res < 0 || (uint64_t)cqe->res != raw_want(l, offs[slot])) {
				rc = cqe->res < 0 ? cqe->res : -EIO;
				break;
			}
			rc = 0;
			done++;
			bytes += (uint64_t)cqe->res;
			if (issued < n) {
				offs[slot] = l->offset(l->ctx, issued++);
				raw_prep(l, io_uring_get_sqe(&ring), fd, slot, offs[slot]);
			}
		}
		io_uring_cq_advance(&ring, seen);
		if (rc < 0)
			break;
	}
	io_uring_queue_exit(&ring);
	close(fd);
	free(offs);
	if (rc < 0)
		return kv_fail(-rc, "bench: raw io_uring %s: %s", l->write ? "write" : "read",
			       strerror(-rc));
	*gbps = (double)bytes / (double)(kv_now_ns() - t0);
	return 0;
}

struct raw_ctx {
	struct io_bench *b;
	bool rnd;
};

static uint64_t raw_offset(void *ctx, uint64_t i)
{
	struct raw_ctx *c = ctx;

	return block_offset(c->b, c->rnd, i);
}

static int raw_run(struct io_bench *b, unsigned depth, bool rnd, double *gbps)
{
	struct raw_ctx c = { b, rnd };
	struct bench_raw_loop l = { .path = b->path, .block = BLOCK, .depth = depth,
				    .count = b->rep_bytes / BLOCK, .bufs = b->bufs,
				    .offset = raw_offset, .ctx = &c };

	return bench_raw_uring(&l, gbps);
}

static int pread_run(struct io_bench *b, double *gbps)
{
	uint64_t n = b->rep_bytes / BLOCK, t0;
	int fd = open(b->path, O_RDONLY | O_DIRECT | O_CLOEXEC);

	if (fd < 0)
		return kv_fail(errno, "io bench: open %s: %s", b->path, strerror(errno));
	t0 = kv_now_ns();
	for (uint64_t i = 0; i < n; i++) {
		if (pread(fd, b->bufs, BLOCK, (off_t)block_offset(b, false, i)) != (ssize_t)BLOCK) {
			int e = errno ? errno : EIO;

			close(fd);
			return kv_fail(e, "io bench: pread: %s", strerror(e));
		}
	}
	close(fd);
	*gbps = (double)(n * BLOCK) / (double)(kv_now_ns() - t0);
	return 0;
}

/* ---- The scenario -------------------------------------------------------- */

/* One kv_io measurement and its raw reference. */
struct pair {
	const char *kv_name, *raw_name, *ratio_name;
	unsigned depth;
	bool rnd;
	double kv[64], raw[64], ratio[64];
};

int bench_io(struct bench_run *run)
{
	static struct pair pairs[] = {
		{ "kvio_seq_read_gbps_qd1", "raw_seq_read_gbps_qd1", "kvio_seq_read_ratio_qd1", 1, false,
		  { 0 }, { 0 }, { 0 } },
		{ "kvio_seq_read_gbps_qd16", "raw_seq_read_gbps_qd16", "kvio_seq_read_ratio_qd16", 16,
		  false, { 0 }, { 0 }, { 0 } },
		{ "kvio_seq_read_gbps_qd64", "raw_seq_read_gbps_qd64", "kvio_seq_read_ratio_qd64", 64,
		  false, { 0 }, { 0 }, { 0 } },
		{ "kvio_rand_read_gbps_qd16", "raw_rand_read_gbps_qd16", "kvio_rand_read_ratio_qd16", 16,
		  true, { 0 }, { 0 }, { 0 } },
		{ "kvio_rand_read_gbps_qd64", "raw_rand_read_gbps_qd64", "kvio_rand_read_ratio_qd64", 64,
		  true, { 0 }, { 0 }, { 0 } },
	};
	struct io_bench b = { .rng = 12345 };
	struct kv_io_config cfg;
	struct kv_io *io = NULL;
	double pr[64];
	int file = -1, rc;
	const char *dir = run->dir ? run->dir : ".";

	b.file_bytes = run->quick ? 256 * MiB : 2048 * MiB;
	b.rep_bytes = run->quick ? 128 * MiB : 1024 * MiB;
	b.blocks = b.file_bytes / BLOCK;
	snprintf(b.path, sizeof(b.path), "%s/kv-bench-io.dat", dir);
	rc = bench_data_file(b.path, b.file_bytes, "io");
	if (rc)
		return rc;
	b.bufs = aligned_alloc(BLOCK, MAX_DEPTH * BLOCK);
	if (!b.bufs)
		return kv_fail(ENOMEM, "io bench: out of memory for buffers");
	/* Touch the buffers once so no measurement pays their first faults. */
	memset(b.bufs, 0, MAX_DEPTH * BLOCK);

	kv_io_config_default(&cfg);
	cfg.queue_depth = MAX_DEPTH;
	cfg.max_request = BLOCK;
	rc = kv_io_create(&cfg, &io);
	if (rc)
		goto out;
	fprintf(stderr, "kv-bench io: kv_io backend: %s; file %s, %" PRIu64 " MiB, %" PRIu64
		" MiB per measurement\n", kv_io_backend_reason(io), b.path, b.file_bytes >> 20,
		b.rep_bytes >> 20);
	file = kv_io_open(io, b.path, KV_IO_READ);
	if (file < 0) {
		rc = file;
		goto out;
	}
	{
		struct kv_io_file_info info;

		if (kv_io_file_info(io, file, &info) == 0 && !info.direct)
			fprintf(stderr, "kv-bench io: warning: %s does not take O_DIRECT, the page "
				"cache is measured\n", dir);
	}

	for (int r = 0; r < run->reps; r++) {
		for (size_t i = 0; i < KV_ARRAY_SIZE(pairs); i++) {
			struct pair *p = &pairs[i];

			/* Alternate which goes first, so neither always
			 * follows the other's tail. */
			if (r % 2) {
				rc = raw_run(&b, p->depth, p->rnd, &p->raw[r]);
				if (!rc)
					rc = kvio_run(&b, io, file, p->depth, p->rnd, &p->kv[r]);
			} else {
				rc = kvio_run(&b, io, file, p->depth, p->rnd, &p->kv[r]);
				if (!rc)
					rc = raw_run(&b, p->depth, p->rnd, &p->raw[r]);
			}
			if (rc)
				goto out;
			p->ratio[r] = p->kv[r] / p->raw[r];
		}
		rc = pread_run(&b, &pr[r]);
		if (rc)
			goto out;
	}

	for (size_t i = 0; i < KV_ARRAY_SIZE(pairs); i++) {
		struct pair *p = &pairs[i];
		double raw = bench_median(p->raw, (size_t)run->reps);

		bench_figure(run, p->kv_name, bench_median(p->kv, (size_t)run->reps), "GB/s", raw,
			     "raw io_uring loop, same depth");
	}
	for (size_t i = 0; i < KV_ARRAY_SIZE(pairs); i++)
		bench_figure(run, pairs[i].raw_name, bench_median(pairs[i].raw, (size_t)run->reps),
			     "GB/s", 0, NULL);
	bench_figure(run, "pread_seq_read_gbps", bench_median(pr, (size_t)run->reps), "GB/s", 0,
		     NULL);
	for (size_t i = 0; i < KV_ARRAY_SIZE(pairs); i++)
		bench_figure(run, pairs[i].ratio_name,
			     bench_median(pairs[i].ratio, (size_t)run->reps), "x",
			     pairs[i].depth >= 16 ? 0.95 : 0, "target (kv_io / raw)");
out:
	if (file >= 0)
		kv_io_close(io, file);
	kv_io_destroy(io, 0);
	free(b.bufs);
	return rc;
}
