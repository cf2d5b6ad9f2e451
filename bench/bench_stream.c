// SPDX-License-Identifier: MIT
/*
 * kv-bench stream: the streamer over a tensor file of 2 GiB (256 MiB with
 * --quick; the io scenario's <dir>/kv-bench-io.dat, written if missing)
 * cut into 10 llama-like layers of 7 tensors, with a DRAM budget of 25 %
 * of it and a compute time simulated per tensor by spinning for a time
 * proportional to its size. Measured in the same run, next to each other
 * per rep: the raw O_DIRECT sequential read bandwidth of the file (the io
 * scenario's liburing loop, 1 MiB at depth 64), the streamer (kv_io
 * backend) with compute faster than the reads (half the raw read time:
 * I/O bound, so its effective read bandwidth is compared with raw), the
 * same with compute slower than the reads (twice: compute bound, so the
 * time the consumer spends inside acquire/release should be near zero),
 * and the mmap backend with the fast compute. The first pass loads the
 * resident tensors and is not measured. A separate scenario rather than
 * part of `kv-bench io`, so each can be run alone.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <kv/kv.h>

#include "bench.h"
#include "taxonomy/kv-private.h"

#define MiB ((uint64_t)1 << 20)
#define LAYERS 10
#define PER_LAYER 7
#define N_TENSORS (LAYERS * PER_LAYER)
#define PASSES 3
#define RAW_BLOCK MiB
#define RAW_DEPTH 64u

struct sbench {
	char path[4200];
	uint64_t file_bytes;
	struct kv_tensor_index *idx;
	uint32_t order[N_TENSORS];
	uint64_t tensor_bytes;
	double raw_gbps;          /* this rep's raw reference */
};

struct stream_result {
	double read_gbps;         /* bytes read / wall time, measured passes */
	double stall_fraction;    /* time inside acquire+release / wall time */
	double overlap;
};

/* Per layer: four attention matrices of 1/12 of the layer and three FFN
 * matrices sharing the rest, page multiples, back to back (as a GGUF file
 * lays a model out, 4 KiB-aligned). */
static int build_index(struct sbench *b)
{
	static const char *const names[PER_LAYER] = { "attn_q", "attn_k", "attn_v", "attn_o",
						       "ffn_gate", "ffn_up", "ffn_down" };
	uint64_t layer = (b->file_bytes / LAYERS) & ~(MiB - 1);
	uint64_t attn = (layer / 12) & ~(uint64_t)4095;
	uint64_t ffn = ((layer - 4 * attn) / 3) & ~(uint64_t)4095;
	uint64_t off = 0;
	int rc = kv_tensor_index_create(&b->idx);

	for (uint32_t l = 0; l < LAYERS && !rc; l++) {
		for (uint32_t k = 0; k < PER_LAYER && !rc; k++) {
			struct kv_tensor_info t = { 0 };
			uint32_t id;

			snprintf(t.name, sizeof(t.name), "blk.%u.%s", l, names[k]);
			t.dtype = KV_DTYPE_U8;
			t.n_dims = 1;
			t.bytes = t.shape[0] = k < 4 ? attn : ffn;
			t.offset = off;
			off += t.bytes;
			rc = kv_tensor_index_add(b->idx, &t, &id);
			b->order[id] = id;
			b->tensor_bytes += t.bytes;
		}
	}
	return rc;
}

static void spin_until(uint64_t deadline)
{
	while (kv_now_ns() < deadline)
		;
}

/* PASSES passes of the order with compute of `ns_per_byte` per tensor
 * byte; the passes after the first are measured. */
static int stream_run(struct sbench *b, enum kv_stream_backend backend, double ns_per_byte,
		      struct stream_result *res)
{
	struct kv_stream_config cfg;
	struct kv_stream_stats st0, st1;
	struct kv_stream *s;
	uint64_t t0 = 0;
	int rc, fd;

	/* The mmap backend reads through the page cache: start cold. */
	fd = open(b->path, O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		(void)posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
		close(fd);
	}
	kv_stream_config_default(&cfg);
	cfg.index = b->idx;
	cfg.path = b->path;
	cfg.order = b->order;
	cfg.order_len = N_TENSORS;
	cfg.budget_bytes = b->tensor_bytes / 4;
	cfg.lookahead = 4;
	cfg.backend = backend;
	cfg.label = "bench.weights";
	rc = kv_stream_create(&cfg, &s);
	if (rc)
		return rc;
	memset(&st0, 0, sizeof(st0));
	for (int p = 0; p < PASSES && !rc; p++) {
		if (p == 1) {
			kv_stream_stats(s, &st0);
			t0 = kv_now_ns();
		}
		for (uint32_t i = 0; i < N_TENSORS && !rc; i++) {
			struct kv_tensor_info ti;
			const void *d;

			kv_tensor_index_get(b->idx, b->order[i], &ti);
			rc = kv_stream_acquire(s, b->order[i], &d);
			if (rc)
				break;
			spin_until(kv_now_ns() + (uint64_t)(ns_per_byte * (double)ti.bytes));
			rc = kv_stream_release(s, b->order[i]);
		}
	}
	if (!rc) {
		uint64_t wall = kv_now_ns() - t0;

		kv_stream_stats(s, &st1);
		res->read_gbps = (double)(st1.bytes_read - st0.bytes_read) / (double)wall;
		res->stall_fraction = (double)(st1.call_ns - st0.call_ns) / (double)wall;
		res->overlap = st1.overlap_ratio;
		if (kv_log_enabled(KV_LOG_INFO) || getenv("KV_BENCH_VERBOSE"))
			fprintf(stderr, "kv-bench stream: %s %.2f ns/B: %.2f GB/s, in calls %.3f, "
				"%u resident / %u streamed, window %" PRIu64 " MiB, stalls %" PRIu64
				"\n", backend == KV_STREAM_IO ? "io" : "mmap", ns_per_byte,
				res->read_gbps, res->stall_fraction, st1.n_resident, st1.n_streamed,
				st1.window_bytes >> 20, st1.stalls - st0.stalls);
	}
	kv_stream_destroy(s);
	return rc;
}

static uint64_t raw_offset(void *ctx, uint64_t i)
{
	const struct sbench *b = ctx;

	return (i * RAW_BLOCK) % (b->file_bytes - b->file_bytes % RAW_BLOCK);
}

int bench_stream(struct bench_run *run)
{
	double raw[64], io_bw[64], io_ratio[64], stall[64], mm_bw[64], mm_ratio[64], ovl[64];
	struct sbench b = { 0 };
	char *bufs;
	int rc;
	const char *dir = run->dir ? run->dir : ".";

	b.file_bytes = run->quick ? 256 * MiB : 2048 * MiB;
	snprintf(b.path, sizeof(b.path), "%s/kv-bench-io.dat", dir);
	rc = bench_data_file(b.path, b.file_bytes, "stream");
	if (rc)
		return rc;
	rc = build_index(&b);
	if (rc)
		goto out_idx;
	bufs = aligned_alloc(RAW_BLOCK, RAW_DEPTH * RAW_BLOCK);
	if (!bufs) {
		rc = kv_fail(ENOMEM, "stream bench: out of memory");
		goto out_idx;
	}
	memset(bufs, 0, RAW_DEPTH * RAW_BLOCK);
	fprintf(stderr, "kv-bench stream: %s, %u tensors, %" PRIu64 " MiB, budget %" PRIu64
		" MiB, %d passes (first not measured)\n", b.path, N_TENSORS, b.tensor_bytes >> 20,
		(b.tensor_bytes / 4) >> 20, PASSES);

	for (int r = 0; r < run->reps; r++) {
		struct bench_raw_loop l = { .path = b.path, .block = RAW_BLOCK, .depth = RAW_DEPTH,
					    .count = b.file_bytes / RAW_BLOCK, .bufs = bufs,
					    .offset = raw_offset, .ctx = &b };
		struct stream_result sr;
		double read_ns_per_byte;

		rc = bench_raw_uring(&l, &raw[r]);
		if (rc)
			goto out;
		/* GB/s is bytes per ns. */
		read_ns_per_byte = 1.0 / raw[r];
		rc = stream_run(&b, KV_STREAM_IO, read_ns_per_byte / 2, &sr);
		if (rc)
			goto out;
		io_bw[r] = sr.read_gbps;
		io_ratio[r] = sr.read_gbps / raw[r];
		rc = stream_run(&b, KV_STREAM_IO, read_ns_per_byte * 2, &sr);
		if (rc)
			goto out;
		stall[r] = sr.stall_fraction;
		ovl[r] = sr.overlap;
		rc = stream_run(&b, KV_STREAM_MMAP, read_ns_per_byte / 2, &sr);
		if (rc)
			goto out;
		mm_bw[r] = sr.read_gbps;
		mm_ratio[r] = sr.read_gbps / raw[r];
	}
	{
		size_t n = (size_t)run->reps;
		double rawm = bench_median(raw, n);

		bench_figure(run, "raw_read_gbps", rawm, "GB/s", 0, NULL);
		bench_figure(run, "stream_read_gbps", bench_median(io_bw, n), "GB/s", rawm,
			     "raw O_DIRECT io_uring loop, QD64");
		bench_figure(run, "stream_bw_ratio", bench_median(io_ratio, n), "x", 0.9,
			     "target (compute shorter than reads)");
		bench_figure(run, "stream_stall_fraction", bench_median(stall, n), "x", 0.05,
			     "target maximum (compute longer)");
		bench_figure(run, "stream_overlap_ratio", bench_median(ovl, n), "x", 0, NULL);
		bench_figure(run, "stream_mmap_read_gbps", bench_median(mm_bw, n), "GB/s", rawm,
			     "raw O_DIRECT io_uring loop, QD64");
		bench_figure(run, "stream_mmap_bw_ratio", bench_median(mm_ratio, n), "x", 0.9,
			     "target (compute shorter than reads)");
	}
out:
	free(bufs);
out_idx:
	kv_tensor_index_destroy(b.idx);
	return rc;
}
