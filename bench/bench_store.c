// SPDX-License-Identifier: MIT
/*
 * kv-bench store: asynchronous puts and gets of 256 KiB extents through
 * the spill store (checksums computed on put and verified on get,
 * KV_STORE_SYNC_NONE so the figure is the store's path rather than the
 * drive's flush latency), 64 in flight, against a plain O_DIRECT io_uring
 * loop writing and reading the same number of 256 KiB blocks at the same
 * depth (bench_raw_uring() of bench_io.c), in the same run. The store
 * lives in <dir>/kv-bench-store/, the raw file next to it; a first,
 * untimed round lays both files out, so no measurement pays for file
 * allocation. Each rep puts a fresh set of keys into the space the last
 * rep freed, reads them all back, then deletes them; figures are medians
 * over reps, ratios medians of per-rep ratios.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <kv/kv.h>

#include "bench.h"
#include "taxonomy/kv-private.h"

#define KiB ((uint64_t)1 << 10)
#define EXTENT (256 * KiB)
#define DEPTH 64u
#define MAX_REPS 64

static const char identity[] = "kv-bench store";

struct sb {
	struct kv_store *st;
	uint64_t n;                 /* extents per rep */
	char *data;                 /* (EXTENT) what every put writes */
	char *bufs;                 /* (DEPTH, EXTENT) get destinations */
	struct kv_store_extent *ext;  /* (n) this rep's extents */

	pthread_mutex_t lock;
	pthread_cond_t cond;
	unsigned in_flight;
	bool slot_busy[DEPTH];      /* a get into bufs slot k in flight */
	int err;
	char detail[256];
};

struct put_ctx {
	struct sb *b;
	uint64_t i;
};

static void done_common(struct sb *b, int result)
{
	if (result && !b->err) {
		b->err = result;
		snprintf(b->detail, sizeof(b->detail), "%s", kv_last_error());
	}
	b->in_flight--;
	pthread_cond_broadcast(&b->cond);
}

static void on_put(void *ctx, int result, const struct kv_store_extent *ext)
{
	struct put_ctx *c = ctx;
	struct sb *b = c->b;

	pthread_mutex_lock(&b->lock);
	if (!result)
		b->ext[c->i] = *ext;
	done_common(b, result);
	pthread_mutex_unlock(&b->lock);
	free(c);
}

static void on_get(void *ctx, int result, const struct kv_store_extent *ext)
{
	struct sb *b = ctx;

	uint64_t key;

	/* A rep's keys start at a multiple of DEPTH, so the key gives the
	 * slot back. */
	memcpy(&key, ext->key, sizeof(key));
	pthread_mutex_lock(&b->lock);
	b->slot_busy[key % DEPTH] = false;
	done_common(b, result);
	pthread_mutex_unlock(&b->lock);
}

/* Wait until fewer than `below` requests are in flight. */
static int wait_below(struct sb *b, unsigned below)
{
	pthread_mutex_lock(&b->lock);
	while (b->in_flight >= below)
		pthread_cond_wait(&b->cond, &b->lock);
	pthread_mutex_unlock(&b->lock);
	if (b->err)
		return kv_fail(-b->err, "store bench: %s", b->detail);
	return 0;
}

static int put_all(struct sb *b, uint64_t first, double *gbps)
{
	uint64_t t0 = kv_now_ns();
	int rc;

	for (uint64_t i = 0; i < b->n; i++) {
		struct put_ctx *c = malloc(sizeof(*c));
		uint64_t key[2] = { first + i, 0x6b762d62656e6368ull };

		if (!c)
			return kv_fail(ENOMEM, "store bench: out of memory");
		*c = (struct put_ctx){ b, i };
		rc = wait_below(b, DEPTH);
		if (rc) {
			free(c);
			return rc;
		}
		pthread_mutex_lock(&b->lock);
		b->in_flight++;
		pthread_mutex_unlock(&b->lock);
		rc = kv_store_put_async(b->st, key, sizeof(key), b->data, EXTENT, on_put, c);
		if (rc) {
			pthread_mutex_lock(&b->lock);
			b->in_flight--;
			pthread_mutex_unlock(&b->lock);
			free(c);
			wait_below(b, 1);
			return rc;
		}
	}
	rc = wait_below(b, 1);
	*gbps = (double)(b->n * EXTENT) / (double)(kv_now_ns() - t0);
	return rc;
}

/* Get i reads into slot i % DEPTH, once the get before it there is done. */
static int get_all(struct sb *b, double *gbps)
{
	uint64_t t0 = kv_now_ns();
	int rc;

	for (uint64_t i = 0; i < b->n; i++) {
		unsigned slot = (unsigned)(i % DEPTH);

		pthread_mutex_lock(&b->lock);
		while (b->slot_busy[slot])
			pthread_cond_wait(&b->cond, &b->lock);
		b->slot_busy[slot] = true;
		b->in_flight++;
		pthread_mutex_unlock(&b->lock);
		rc = kv_store_get_async(b->st, &b->ext[i], b->bufs + (size_t)slot * EXTENT, on_get, b);
		if (rc) {
			pthread_mutex_lock(&b->lock);
			b->slot_busy[slot] = false;
			b->in_flight--;
			pthread_mutex_unlock(&b->lock);
			wait_below(b, 1);
			return rc;
		}
		if (b->err)
			break;
	}
	rc = wait_below(b, 1);
	*gbps = (double)(b->n * EXTENT) / (double)(kv_now_ns() - t0);
	return rc;
}

/* Delete every extent and sync: under SYNC_NONE freed space is reused
 * only after an index sync (a power loss must not find a synced extent
 * overwritten), and the next rep should overwrite the same space, as a
 * store in steady state does, not extend the file. */
static int delete_all(struct sb *b)
{
	for (uint64_t i = 0; i < b->n; i++) {
		int rc = kv_store_delete(b->st, &b->ext[i]);

		if (rc)
			return rc;
	}
	return kv_store_sync(b->st);
}

static uint64_t seq_offset(void *ctx, uint64_t i)
{
	return i * EXTENT;
}

/* Lay the raw file out once, at full size. */
static int raw_prepare(const char *path, uint64_t bytes)
{
	struct stat st;
	int fd;

	if (stat(path, &st) == 0 && (uint64_t)st.st_size == bytes)
		return 0;
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0)
		return kv_fail(errno, "store bench: create %s: %s", path, strerror(errno));
	if (ftruncate(fd, (off_t)bytes) || fsync(fd)) {
		int e = errno;

		close(fd);
		return kv_fail(e, "store bench: size %s: %s", path, strerror(e));
	}
	close(fd);
	return 0;
}

int bench_store(struct bench_run *run)
{
	const char *dir = run->dir ? run->dir : ".";
	double put[MAX_REPS], get[MAX_REPS], rw[MAX_REPS], rr[MAX_REPS];
	double put_ratio[MAX_REPS], get_ratio[MAX_REPS], warm;
	char sdir[4200], path[4300], raw_path[4300];
	struct kv_store_config cfg;
	struct kv_io_config icfg;
	struct kv_io *io = NULL;
	struct sb b = { 0 };
	struct bench_raw_loop raw;
	int reps = run->reps < MAX_REPS ? run->reps : MAX_REPS, rc;

	b.n = (run->quick ? 256 : 2048) * 1024 * KiB / EXTENT;
	snprintf(sdir, sizeof(sdir), "%s/kv-bench-store", dir);
	snprintf(raw_path, sizeof(raw_path), "%s/kv-bench-store-raw.dat", dir);
	/* A fresh store each run: the previous run's may be another size. */
	snprintf(path, sizeof(path), "%s/store.data", sdir);
	unlink(path);
	snprintf(path, sizeof(path), "%s/store.idx", sdir);
	unlink(path);

	pthread_mutex_init(&b.lock, NULL);
	pthread_cond_init(&b.cond, NULL);
	b.data = aligned_alloc(4096, EXTENT);
	b.bufs = aligned_alloc(4096, DEPTH * EXTENT);
	b.ext = calloc(b.n, sizeof(*b.ext));
	if (!b.data || !b.bufs || !b.ext) {
		rc = kv_fail(ENOMEM, "store bench: out of memory");
		goto out;
	}
	for (size_t i = 0; i < EXTENT; i++)
		b.data[i] = (char)(i * 131 + (i >> 12));
	memset(b.bufs, 0, DEPTH * EXTENT);
	memcpy(b.bufs, b.data, EXTENT);
	for (unsigned i = 1; i < DEPTH; i++)
		memcpy(b.bufs + (size_t)i * EXTENT, b.data, EXTENT);

	kv_io_config_default(&icfg);
	icfg.queue_depth = DEPTH;
	rc = kv_io_create(&icfg, &io);
	if (rc)
		goto out;
	kv_store_config_default(&cfg);
	cfg.dir = sdir;
	cfg.identity = identity;
	cfg.identity_len = sizeof(identity);
	cfg.sync = KV_STORE_SYNC_NONE;
	cfg.io = io;
	rc = kv_store_open(&cfg, &b.st);
	if (rc)
		goto out;
	{
		struct kv_store_stats s;

		kv_store_stats(b.st, &s);
		fprintf(stderr, "kv-bench store: kv_io backend: %s; %" PRIu64 " extents of 256 KiB "
			"per measurement, %u in flight, %s, %u-byte alignment\n",
			kv_io_backend_reason(io), b.n, DEPTH, s.direct ? "O_DIRECT" :
			"buffered (the page cache is measured)", s.align);
	}
	rc = raw_prepare(raw_path, b.n * EXTENT);
	if (rc)
		goto out;
	raw = (struct bench_raw_loop){ .path = raw_path, .block = EXTENT, .depth = DEPTH,
				       .count = b.n, .bufs = b.bufs, .offset = seq_offset };

	/* The untimed round: lays out the store's file and the raw file. */
	rc = put_all(&b, 0, &warm);
	if (!rc)
		rc = delete_all(&b);
	raw.write = true;
	if (!rc)
		rc = bench_raw_uring(&raw, &warm);
	if (rc)
		goto out;

	for (int r = 0; r < reps; r++) {
		uint64_t first = (uint64_t)(r + 1) * b.n;

		raw.write = true;
		rc = bench_raw_uring(&raw, &rw[r]);
		if (!rc)
			rc = put_all(&b, first, &put[r]);
		raw.write = false;
		if (!rc)
			rc = bench_raw_uring(&raw, &rr[r]);
		if (!rc)
			rc = get_all(&b, &get[r]);
		if (!rc)
			rc = delete_all(&b);
		if (rc)
			goto out;
		put_ratio[r] = put[r] / rw[r];
		get_ratio[r] = get[r] / rr[r];
	}
	{
		double raw_w = bench_median(rw, (size_t)reps), raw_r = bench_median(rr, (size_t)reps);

		bench_figure(run, "store_put_gbps", bench_median(put, (size_t)reps), "GB/s", raw_w,
			     "raw io_uring O_DIRECT writes, same size and depth");
		bench_figure(run, "store_get_gbps", bench_median(get, (size_t)reps), "GB/s", raw_r,
			     "raw io_uring O_DIRECT reads, same size and depth");
		bench_figure(run, "raw_write_gbps", raw_w, "GB/s", 0, NULL);
		bench_figure(run, "raw_read_gbps", raw_r, "GB/s", 0, NULL);
		bench_figure(run, "store_put_ratio", bench_median(put_ratio, (size_t)reps), "x", 0.9,
			     "target (store / raw)");
		bench_figure(run, "store_get_ratio", bench_median(get_ratio, (size_t)reps), "x", 0.9,
			     "target (store / raw)");
	}
out:
	if (b.st) {
		int crc = kv_store_close(b.st);

		if (!rc)
			rc = crc;
	}
	kv_io_destroy(io, 0);
	free(b.data);
	free(b.bufs);
	free(b.ext);
	pthread_mutex_destroy(&b.lock);
	pthread_cond_destroy(&b.cond);
	return rc;
}
