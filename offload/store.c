// SPDX-License-Identifier: MIT
/*
 * The spill store (kv_store): keyed, checksummed extents in one data file
 * ("store.data", written and read through the I/O engine with O_DIRECT)
 * and an append-only index ("store.idx": a header, then fixed-size put and
 * delete records, each with its own checksum and a rising sequence
 * number). A put allocates aligned space under the store lock, writes the
 * data without it, and hands the completed write to the store's finisher
 * thread, which syncs per policy, appends the records of every put that
 * completed meanwhile in one write, and only then makes the extents live
 * and runs the callbacks. kv_store_open() replays the index, truncates a
 * torn tail, and rebuilds the free ranges from the gaps between live
 * extents. With SYNC_BATCHED and SYNC_NONE the space of a replaced or
 * deleted extent is held back until the next index sync, so the index as
 * of any sync only names extents whose bytes are intact; once HELD_MAX
 * (or a share of the capacity) is held, the store syncs on its own. Entry
 * points are those of <kv/offload.h>; kv_store_validate() checks the free
 * ranges against the live extents and the counters.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <xxhash.h>

#include <kv/offload.h>

#include "offload/store-impl.h"
#include "taxonomy/kv-private.h"

#define STORE_MAGIC "KVSTORE1"
#define STORE_VERSION 1u
#define FILE_DATA 1u
#define FILE_INDEX 2u
#define HEADER_BYTES 512u
#define REC_PUT 1u
#define REC_DELETE 2u
/* Reopen rewrites the index when it holds more than this many records and
 * over COMPACT_FACTOR times the live extents. */
#define COMPACT_MIN 1024u
#define COMPACT_FACTOR 4u
/* Retired space held for the next index sync (SYNC_BATCHED and
 * SYNC_NONE) past which the store syncs on its own: HELD_MAX, or a
 * HELD_SHARE-th of the capacity when that is less, since held space
 * counts against the capacity (see <kv/offload.h>). */
#define HELD_MAX (64ull << 20)
#define HELD_SHARE 16u

/* On-disk header, at offset 0 of both files (native byte order: a store
 * is local to its machine). */
struct store_header {
	char magic[8];
	uint32_t version;
	uint32_t file_kind;        /* FILE_DATA or FILE_INDEX */
	uint32_t align;            /* extent alignment chosen at creation */
	uint32_t identity_len;
	uint64_t data_start;       /* first extent byte in store.data */
	uint8_t identity[KV_STORE_IDENTITY_MAX];
	/* Index only: every sequence number below this was used. Compaction
	 * drops delete records and replaced puts, so the highest one left
	 * would understate it and a reopen would hand out old ids again.
	 * 0 in data headers (and in indexes never compacted). */
	uint64_t next_seq;
	uint8_t pad[HEADER_BYTES - 304];
	uint64_t checksum;         /* XXH3-64 of everything before it */
};
_Static_assert(sizeof(struct store_header) == HEADER_BYTES, "header layout");

/* One index record. For a put, arg is the data's checksum; for a delete,
 * the id (sequence number) of the put it undoes. */
struct store_record {
	uint64_t seq;
	uint32_t type;
	uint32_t key_len;
	uint8_t key[KV_STORE_KEY_MAX];
	uint64_t offset;
	uint64_t len;
	uint64_t arg;
	uint64_t checksum;         /* XXH3-64 of the 72 bytes before it */
};
_Static_assert(sizeof(struct store_record) == 80, "record layout");

/* A live extent (or a dead one still being read). */
struct ext {
	struct ext *next;          /* hash chain */
	struct kv_store_extent e;
	uint64_t alloc;            /* space taken: len rounded up */
	uint32_t readers;          /* gets in flight (and a delete in progress) */
	bool dead;                 /* out of the table; freed by the last reader */
	bool deleting;             /* its delete record is being appended: still
				    * live (readable, counted) until it is in */
};

struct range {
	uint64_t off, len;
};

struct put_op {
	struct put_op *next;       /* finisher queue */
	struct kv_store *st;
	struct kv_io_req req[2];   /* aligned body, padded tail */
	atomic_uint left;
	atomic_int err;
	char detail[256];
	char *tail;                /* (align) bounce for an unaligned tail */
	struct kv_store_extent ext;
	uint64_t alloc;
	kv_store_cb cb;
	void *ctx;
};

struct get_op {
	struct kv_store *st;
	struct ext *x;             /* pinned: readers counted */
	struct kv_store_extent ext;
	struct kv_io_req req;
	kv_store_cb cb;
	void *ctx;
};

struct kv_store {
	char *dir, *label;
	enum kv_store_sync sync;
	uint32_t sync_every;
	uint64_t capacity;
	struct kv_io *io;
	bool own_io;
	int dfile;                 /* engine file id of store.data */
	int dfd, ifd;              /* plain descriptors: headers, index, syncs */
	uint32_t align;
	bool direct;
	uint64_t data_start;
	struct kv_registry *reg;
	kv_handle rec;

	/* lock: the extent table, free space, counters. Never held across
	 * I/O. */
	pthread_mutex_t lock;
	struct ext **buckets;      /* (n_buckets) chains by key hash */
	size_t n_buckets, n_ext;
	struct range *free;        /* (n_free) sorted, disjoint, not touching */
	size_t n_free, cap_free;
	/* (n_held) space of extents retired since the last index sync, with
	 * SYNC_BATCHED and SYNC_NONE: not reused until the record retiring
	 * them is durable (space_retire). Unsorted. */
	struct range *held;
	size_t n_held, cap_held;
	uint64_t held_bytes;       /* their sum */
	uint64_t held_limit;       /* > 0: held_bytes that trigger a sync */
	uint64_t end;              /* high-water mark of extent space */
	uint64_t live_bytes, used_bytes, pending_bytes;
	uint64_t puts, gets, deletes, put_errors, get_errors, csum_fail;

	/* log_lock: appends to the index, in sequence order. */
	pthread_mutex_t log_lock;
	uint64_t log_end, next_seq, records;
	uint32_t unsynced;
	bool broken;               /* a failed append could not be undone */

	pthread_t fin;
	pthread_mutex_t fin_lock;
	pthread_cond_t fin_cond;
	struct put_op *fin_head, *fin_tail;
	bool fin_exit;

	/* wait_lock: synchronous waiters and the in-flight count. */
	pthread_mutex_t wait_lock;
	pthread_cond_t wait_cond;
	uint32_t inflight;
	bool closing;
};

/* ---- The seam ----------------------------------------------------------- */

static struct kv_seam store_seam, cutback_seam;

void kv_store_inject(unsigned ops, unsigned nth, int err)
{
	if (ops & KV_STORE_SEAM_CUTBACK)
		kv_seam_inject(&cutback_seam, KV_STORE_SEAM_CUTBACK, nth, err);
	if (ops & ~(unsigned)KV_STORE_SEAM_CUTBACK)
		kv_seam_inject(&store_seam, ops & ~(unsigned)KV_STORE_SEAM_CUTBACK, nth, err);
}

/* Undo a failed append: cut store.idx back to start and sync that, so a
 * record of a put reported failed (whose space is reused) cannot reappear
 * after a power loss. Returns 0 or -errno; sets no detail. */
static int log_cut_back(struct kv_store *st, uint64_t start)
{
	int inj;

	if (ftruncate(st->ifd, (off_t)start))
		return -errno;
	inj = kv_seam_hit(&cutback_seam, KV_STORE_SEAM_CUTBACK);
	if (inj > 0)
		return -inj;
	if (fdatasync(st->ifd))
		return -errno;
	return 0;
}

static int do_datasync(int fd, const char *what)
{
	int inj = kv_seam_hit(&store_seam, KV_STORE_SEAM_SYNC);

	if (inj > 0)
		return kv_fail(inj, "store: fdatasync %s: %s (injected)", what, strerror(inj));
	if (fdatasync(fd))
		return kv_fail(errno, "store: fdatasync %s: %s", what, strerror(errno));
	return 0;
}

/* Write all of buf at off, or fail with -errno. */
static int pwrite_all(int fd, const void *buf, size_t len, uint64_t off, bool seam)
{
	const char *p = buf;

	if (seam) {
		int inj = kv_seam_hit(&store_seam, KV_STORE_SEAM_LOG_WRITE);

		if (inj > 0)
			return -inj;
	}
	while (len) {
		ssize_t w = pwrite(fd, p, len, (off_t)off);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return w < 0 ? -errno : -EIO;
		p += w;
		len -= (size_t)w;
		off += (uint64_t)w;
	}
	return 0;
}

/* ---- Small helpers ----------------------------------------------------- */

static uint64_t align_up(uint64_t v, uint64_t a)
{
	return (v + a - 1) / a * a;
}

/* The key as hex, for details: at most 64 digits. */
static const char *key_hex(const uint8_t *key, uint32_t len, char *buf)
{
	static const char digits[] = "0123456789abcdef";

	for (uint32_t i = 0; i < len && i < KV_STORE_KEY_MAX; i++) {
		buf[2 * i] = digits[key[i] >> 4];
		buf[2 * i + 1] = digits[key[i] & 15];
	}
	buf[2 * (len < KV_STORE_KEY_MAX ? len : KV_STORE_KEY_MAX)] = '\0';
	return buf;
}

static uint64_t header_sum(const struct store_header *h)
{
	return XXH3_64bits(h, offsetof(struct store_header, checksum));
}

static uint64_t record_sum(const struct store_record *r)
{
	return XXH3_64bits(r, offsetof(struct store_record, checksum));
}

/* ---- Extent table (under lock) ----------------------------------------- */

static size_t bucket_of(const struct kv_store *st, const uint8_t *key, uint32_t len)
{
	return (size_t)(XXH3_64bits(key, len) & (st->n_buckets - 1));
}

static struct ext **find_slot(struct kv_store *st, const uint8_t *key, uint32_t len)
{
	struct ext **pp = &st->buckets[bucket_of(st, key, len)];

	for (; *pp; pp = &(*pp)->next)
		if ((*pp)->e.key_len == len && !memcmp((*pp)->e.key, key, len))
			return pp;
	return pp;
}

static int table_grow(struct kv_store *st)
{
	size_t n = st->n_buckets * 2;
	struct ext **nb = calloc(n, sizeof(*nb));

	if (!nb)
		return -ENOMEM;
	for (size_t i = 0; i < st->n_buckets; i++) {
		struct ext *x = st->buckets[i], *next;

		for (; x; x = next) {
			size_t b = (size_t)(XXH3_64bits(x->e.key, x->e.key_len) & (n - 1));

			next = x->next;
			x->next = nb[b];
			nb[b] = x;
		}
	}
	free(st->buckets);
	st->buckets = nb;
	st->n_buckets = n;
	return 0;
}

/* ---- Free space (under lock) -------------------------------------------- */

static int space_alloc(struct kv_store *st, uint64_t need, uint64_t *off)
{
	for (size_t i = 0; i < st->n_free; i++) {
		struct range *r = &st->free[i];

		if (r->len < need)
			continue;
		*off = r->off;
		r->off += need;
		r->len -= need;
		if (!r->len) {
			memmove(r, r + 1, (st->n_free - i - 1) * sizeof(*r));
			st->n_free--;
		}
		return 0;
	}
	if (st->capacity && st->end - st->data_start + need > st->capacity) {
		char a[32], b[32];

		return kv_fail(ENOSPC, "store '%s': full: %s more would pass the capacity of %s "
			       "(largest hole too small)", st->dir,
			       kv_format_bytes(need, a, sizeof(a)),
			       kv_format_bytes(st->capacity, b, sizeof(b)));
	}
	*off = st->end;
	st->end += need;
	return 0;
}

/* Room for one more range in a growing array of n. On out of memory the
 * range [off, off+len) is left unused until the next open, which is safe:
 * returns false and says so. */
static bool ranges_room(const struct kv_store *st, struct range **arr, size_t *cap, size_t n,
			uint64_t off, uint64_t len)
{
	size_t ncap;
	struct range *nr;

	if (n < *cap)
		return true;
	ncap = *cap ? *cap * 2 : 64;
	nr = realloc(*arr, ncap * sizeof(*nr));
	if (!nr) {
		kv_log(KV_LOG_WARN, "store '%s': out of memory: %" PRIu64 " bytes at %" PRIu64
		       " unused until reopen", st->dir, len, off);
		return false;
	}
	*arr = nr;
	*cap = ncap;
	return true;
}

/* Give space back: merge with its neighbours, and into the tail when it
 * ends there. On out of memory for the range array the hole is leaked
 * until the next open rebuilds it, which is safe. */
static void space_free(struct kv_store *st, uint64_t off, uint64_t len)
{
	size_t lo = 0, hi = st->n_free;

	while (lo < hi) {
		size_t mid = (lo + hi) / 2;

		if (st->free[mid].off < off)
			lo = mid + 1;
		else
			hi = mid;
	}
	bool prev = lo > 0 && st->free[lo - 1].off + st->free[lo - 1].len == off;
	bool next = lo < st->n_free && off + len == st->free[lo].off;

	if (prev && next) {
		st->free[lo - 1].len += len + st->free[lo].len;
		memmove(&st->free[lo], &st->free[lo + 1], (st->n_free - lo - 1) * sizeof(struct range));
		st->n_free--;
		lo--;
	} else if (prev) {
		st->free[--lo].len += len;
	} else if (next) {
		st->free[lo].off = off;
		st->free[lo].len += len;
	} else {
		if (!ranges_room(st, &st->free, &st->cap_free, st->n_free, off, len))
			return;
		memmove(&st->free[lo + 1], &st->free[lo], (st->n_free - lo) * sizeof(struct range));
		st->free[lo] = (struct range){ off, len };
		st->n_free++;
	}
	if (lo == st->n_free - 1 && st->free[lo].off + st->free[lo].len == st->end) {
		st->end = st->free[lo].off;
		st->n_free--;
	}
}

/* Give back the space of an extent that was replaced or deleted. With
 * SYNC_BATCHED and SYNC_NONE the record that retired it may not be
 * durable yet: after a power loss the index as of the last sync lists the
 * extent again, so its bytes must still be there. Its space is held until
 * the next index sync (space_release_held); with SYNC_EVERY the record is
 * already synced. On out of memory the space is leaked until the next
 * open, which is safe. */
static void space_retire(struct kv_store *st, uint64_t off, uint64_t len)
{
	if (st->sync == KV_STORE_SYNC_EVERY) {
		space_free(st, off, len);
		return;
	}
	if (!ranges_room(st, &st->held, &st->cap_held, st->n_held, off, len))
		return;
	st->held[st->n_held++] = (struct range){ off, len };
	st->held_bytes += len;
}

/* After a successful index sync. Called with log_lock held, so every
 * held range's retiring record was appended before that sync (a retire
 * follows its append, and appends take log_lock). */
static void space_release_held(struct kv_store *st)
{
	pthread_mutex_lock(&st->lock);
	for (size_t i = 0; i < st->n_held; i++)
		space_free(st, st->held[i].off, st->held[i].len);
	st->n_held = 0;
	st->held_bytes = 0;
	pthread_mutex_unlock(&st->lock);
}

/* fdatasync data, then index, and release the held space: what
 * kv_store_sync() does. Called with log_lock held. */
static int index_sync(struct kv_store *st)
{
	int rc = do_datasync(st->dfd, "store.data");

	if (!rc)
		rc = do_datasync(st->ifd, "store.idx");
	if (!rc) {
		st->unsynced = 0;
		space_release_held(st);
	}
	return rc;
}

static bool held_over(struct kv_store *st)
{
	bool over;

	pthread_mutex_lock(&st->lock);
	over = st->held_bytes >= st->held_limit;
	pthread_mutex_unlock(&st->lock);
	return over;
}

/* Without kv_store_sync() calls (SYNC_NONE), held space would pile up
 * and the data file grow without bound: once held_limit bytes are held,
 * sync as kv_store_sync() does, which releases them. Called only where
 * blocking on two fdatasyncs is fine: the finisher after a batch (whose
 * callbacks already ran) and kv_store_delete() after its append. The put
 * or delete that got here succeeded, so a failed sync is only logged; the
 * next call tries again. */
static void held_sync_maybe(struct kv_store *st)
{
	int rc = 0;

	if (!held_over(st))
		return;
	pthread_mutex_lock(&st->log_lock);
	/* Another thread may have synced meanwhile. */
	if (held_over(st))
		rc = index_sync(st);
	pthread_mutex_unlock(&st->log_lock);
	if (rc)
		kv_log(KV_LOG_WARN, "store '%s': sync to release retired space failed: %s; "
		       "retried at the next put or delete", st->dir, kv_last_error());
}

static void registry_update(struct kv_store *st)
{
	if (st->rec != KV_HANDLE_NONE)
		(void)kv_registry_resize(st->reg, st->rec, st->used_bytes);
}

/* Take x out of the table's accounting; its space is freed now or by its
 * last reader. */
static void ext_retire(struct kv_store *st, struct ext *x)
{
	st->n_ext--;
	st->live_bytes -= x->e.len;
	st->used_bytes -= x->alloc;
	if (x->readers) {
		x->dead = true;
		return;
	}
	space_retire(st, x->e.offset, x->alloc);
	free(x);
}

/* Make a written extent live, replacing one with the same key. */
static void ext_insert(struct kv_store *st, struct ext *x)
{
	struct ext **pp = find_slot(st, x->e.key, x->e.key_len);

	if (*pp) {
		struct ext *old = *pp;

		x->next = old->next;
		*pp = x;
		ext_retire(st, old);
	} else {
		x->next = NULL;
		*pp = x;
	}
	st->n_ext++;
	st->live_bytes += x->e.len;
	st->used_bytes += x->alloc;
	if (st->n_ext > st->n_buckets && table_grow(st))
		kv_log(KV_LOG_DEBUG, "store '%s': table kept at %zu buckets (out of memory)",
		       st->dir, st->n_buckets);
}

/* The live extent that ext describes, or NULL. The id alone should do,
 * but ids can repeat after a power loss took index records with it (and
 * did after compaction in old versions): the checksum and length make a
 * stale handle fail rather than read another put's bytes. */
static struct ext *ext_find(struct kv_store *st, const struct kv_store_extent *e)
{
	struct ext *x;

	if (e->key_len == 0 || e->key_len > KV_STORE_KEY_MAX)
		return NULL;
	x = *find_slot(st, e->key, e->key_len);
	if (!x || x->e.id != e->id || x->e.offset != e->offset || x->e.len != e->len ||
	    x->e.checksum != e->checksum)
		return NULL;
	return x;
}

/* ---- In-flight accounting ----------------------------------------------- */

static int inflight_get(struct kv_store *st)
{
	int rc = 0;

	pthread_mutex_lock(&st->wait_lock);
	if (st->closing)
		rc = kv_fail(ESHUTDOWN, "store '%s': closing", st->dir);
	else
		st->inflight++;
	pthread_mutex_unlock(&st->wait_lock);
	return rc;
}

static void inflight_put(struct kv_store *st)
{
	pthread_mutex_lock(&st->wait_lock);
	if (--st->inflight == 0)
		pthread_cond_broadcast(&st->wait_cond);
	pthread_mutex_unlock(&st->wait_lock);
}

/* ---- Index appends ------------------------------------------------------ */

static void record_fill(struct store_record *r, uint64_t seq, uint32_t type,
			const struct kv_store_extent *e, uint64_t arg)
{
	memset(r, 0, sizeof(*r));
	r->seq = seq;
	r->type = type;
	r->key_len = e->key_len;
	memcpy(r->key, e->key, e->key_len);
	r->offset = e->offset;
	r->len = type == REC_PUT ? e->len : 0;
	r->arg = arg;
	r->checksum = record_sum(r);
}

/* Sync per policy after n records went into the log. Called with
 * log_lock held. For SYNC_EVERY a failure fails the call; for BATCHED the
 * records are already in the index, so a failed batch sync is logged and
 * the next sync tries again. */
static int log_policy_sync(struct kv_store *st, uint32_t n)
{
	int rc;

	if (st->sync == KV_STORE_SYNC_EVERY)
		return do_datasync(st->ifd, "store.idx");
	if (st->sync != KV_STORE_SYNC_BATCHED)
		return 0;
	st->unsynced += n;
	if (st->unsynced < st->sync_every)
		return 0;
	rc = index_sync(st);
	if (rc)
		kv_log(KV_LOG_WARN, "store '%s': batch sync failed: %s", st->dir, kv_last_error());
	return 0;
}

/* Append n records (their seq fields filled here) and sync per policy.
 * On failure the index is cut back to where it was. */
static int log_append(struct kv_store *st, struct store_record *recs, uint32_t n,
		      uint64_t *first_seq)
{
	uint64_t start;
	int rc;

	pthread_mutex_lock(&st->log_lock);
	if (st->broken) {
		pthread_mutex_unlock(&st->log_lock);
		return kv_fail(EIO, "store '%s': index unusable since a failed append "
			       "could not be undone; reopen the store", st->dir);
	}
	start = st->log_end;
	*first_seq = st->next_seq;
	for (uint32_t i = 0; i < n; i++) {
		recs[i].seq = st->next_seq + i;
		recs[i].checksum = record_sum(&recs[i]);
	}
	/* Sequence numbers are never reused, even after a failed append, so
	 * ids stay unique. */
	st->next_seq += n;
	rc = pwrite_all(st->ifd, recs, n * sizeof(*recs), start, true);
	if (rc) {
		rc = kv_fail(-rc, "store '%s': append to store.idx at %" PRIu64 ": %s", st->dir,
			     start, strerror(-rc));
	} else {
		rc = log_policy_sync(st, n);
	}
	if (rc) {
		int cut = log_cut_back(st, start);

		/* The records may still be there, or come back after a power
		 * loss: no further append may follow them. */
		if (cut) {
			st->broken = true;
			kv_log(KV_LOG_ERROR, "store '%s': cannot cut store.idx back to %" PRIu64
			       " after a failed append: %s; writes fail until reopen", st->dir,
			       start, strerror(-cut));
		}
	} else {
		st->log_end = start + n * sizeof(*recs);
		st->records += n;
	}
	pthread_mutex_unlock(&st->log_lock);
	return rc;
}

/* ---- Puts --------------------------------------------------------------- */

static void put_fail(struct kv_store *st, struct put_op *op, int err, const char *detail)
{
	pthread_mutex_lock(&st->lock);
	space_free(st, op->ext.offset, op->alloc);
	st->pending_bytes -= op->alloc;
	st->put_errors++;
	pthread_mutex_unlock(&st->lock);
	kv_fail(err, "%s", detail);
	op->cb(op->ctx, -err, NULL);
}

static void put_free(struct put_op *op)
{
	free(op->tail);
	free(op);
}

/* Finish a batch of completed data writes, in queue order. */
static void finish_batch(struct kv_store *st, struct put_op *list)
{
	struct put_op *ok = NULL, **ok_tail = &ok, *op, *next;
	struct store_record *recs = NULL;
	uint32_t n = 0, i;
	uint64_t first_seq = 0;
	int rc = 0;

	for (op = list; op; op = next) {
		next = op->next;
		op->next = NULL;
		if (atomic_load(&op->err)) {
			put_fail(st, op, atomic_load(&op->err), op->detail);
			inflight_put(st);
			put_free(op);
			continue;
		}
		*ok_tail = op;
		ok_tail = &op->next;
		n++;
	}
	if (!n)
		return;

	if (st->sync == KV_STORE_SYNC_EVERY)
		rc = do_datasync(st->dfd, "store.data");
	if (!rc) {
		recs = malloc(n * sizeof(*recs));
		if (!recs)
			rc = kv_fail(ENOMEM, "store '%s': out of memory for %u index records",
				     st->dir, n);
	}
	if (!rc) {
		for (op = ok, i = 0; op; op = op->next, i++)
			record_fill(&recs[i], 0, REC_PUT, &op->ext, op->ext.checksum);
		rc = log_append(st, recs, n, &first_seq);
	}
	free(recs);
	if (rc) {
		char detail[256];

		snprintf(detail, sizeof(detail), "%s", kv_last_error());
		for (op = ok; op; op = next) {
			next = op->next;
			put_fail(st, op, -rc, detail);
			inflight_put(st);
			put_free(op);
		}
		return;
	}

	pthread_mutex_lock(&st->lock);
	for (op = ok, i = 0; op; op = op->next, i++) {
		struct ext *x = malloc(sizeof(*x));

		op->ext.id = first_seq + i;
		st->pending_bytes -= op->alloc;
		if (!x) {
			/* In the index but not in memory: it is found again
			 * at the next open; until then its space stays
			 * reserved (never freed, so never overwritten). */
			kv_log(KV_LOG_WARN, "store '%s': out of memory: extent %" PRIu64
			       " visible after reopen only", st->dir, op->ext.id);
			continue;
		}
		*x = (struct ext){ .e = op->ext, .alloc = op->alloc };
		ext_insert(st, x);
		st->puts++;
	}
	registry_update(st);
	pthread_mutex_unlock(&st->lock);

	for (op = ok; op; op = next) {
		next = op->next;
		op->cb(op->ctx, 0, &op->ext);
		inflight_put(st);
		put_free(op);
	}
}

static void *finisher_main(void *arg)
{
	struct kv_store *st = arg;

	for (;;) {
		struct put_op *list;

		pthread_mutex_lock(&st->fin_lock);
		while (!st->fin_head && !st->fin_exit)
			pthread_cond_wait(&st->fin_cond, &st->fin_lock);
		list = st->fin_head;
		st->fin_head = st->fin_tail = NULL;
		if (!list && st->fin_exit) {
			pthread_mutex_unlock(&st->fin_lock);
			return NULL;
		}
		pthread_mutex_unlock(&st->fin_lock);
		finish_batch(st, list);
		held_sync_maybe(st);
	}
}

/* Engine callback of a put's data write. */
static void put_io_done(struct kv_io_req *req)
{
	struct put_op *op = req->ctx;
	struct kv_store *st = op->st;

	if (req->result < 0) {
		int zero = 0;

		if (atomic_compare_exchange_strong(&op->err, &zero, (int)-req->result))
			snprintf(op->detail, sizeof(op->detail), "store '%s': write of %" PRIu64
				 " bytes at %" PRIu64 ": %s", st->dir, op->ext.len,
				 op->ext.offset, kv_last_error());
	}
	if (atomic_fetch_sub(&op->left, 1) != 1)
		return;
	pthread_mutex_lock(&st->fin_lock);
	if (st->fin_tail)
		st->fin_tail->next = op;
	else
		st->fin_head = op;
	st->fin_tail = op;
	pthread_cond_signal(&st->fin_cond);
	pthread_mutex_unlock(&st->fin_lock);
}

static int check_key(const struct kv_store *st, const void *key, size_t key_len)
{
	if (!key || key_len == 0 || key_len > KV_STORE_KEY_MAX)
		return kv_fail(EINVAL, "store '%s': key of %zu bytes (1..%d)", st->dir, key_len,
			       KV_STORE_KEY_MAX);
	return 0;
}

int kv_store_put_async(struct kv_store *st, const void *key, size_t key_len, const void *data,
		       size_t len, kv_store_cb cb, void *ctx)
{
	struct kv_io_req *reqs[2];
	struct put_op *op;
	uint64_t body;
	unsigned n = 0;
	int rc;

	if (!st || !cb)
		return kv_fail(EINVAL, "kv_store_put_async: NULL %s", st ? "callback" : "store");
	rc = check_key(st, key, key_len);
	if (rc)
		return rc;
	if (!data || !len)
		return kv_fail(EINVAL, "store '%s': put of %s", st->dir,
			       data ? "0 bytes" : "NULL data");
	op = calloc(1, sizeof(*op));
	if (!op)
		return kv_fail(ENOMEM, "store '%s': out of memory for a put", st->dir);
	op->st = st;
	op->cb = cb;
	op->ctx = ctx;
	op->ext.key_len = (uint32_t)key_len;
	memcpy(op->ext.key, key, key_len);
	op->ext.len = len;
	op->alloc = align_up(len, st->align);
	/* O_DIRECT writes whole aligned blocks, and the engine does not pad:
	 * the tail goes through a zero-padded bounce block of our own. A
	 * buffered store pads the same way, so in both modes the file covers
	 * every extent's whole allocation (replay drops an extent the file
	 * does not cover) and the layout does not depend on the mode. */
	body = len / st->align * st->align;
	if (body < len) {
		op->tail = aligned_alloc(st->align < 4096 ? 4096 : st->align,
					 align_up(st->align, 4096));
		if (!op->tail) {
			free(op);
			return kv_fail(ENOMEM, "store '%s': out of memory for a put", st->dir);
		}
		memset(op->tail, 0, st->align);
		memcpy(op->tail, (const char *)data + body, len - body);
	}
	op->ext.checksum = XXH3_64bits(data, len);

	rc = inflight_get(st);
	if (rc) {
		put_free(op);
		return rc;
	}
	pthread_mutex_lock(&st->lock);
	rc = space_alloc(st, op->alloc, &op->ext.offset);
	if (rc)
		st->put_errors++;
	else
		st->pending_bytes += op->alloc;
	pthread_mutex_unlock(&st->lock);
	if (rc) {
		inflight_put(st);
		put_free(op);
		return rc;
	}
	if (body)
		op->req[n++] = (struct kv_io_req){ .file = st->dfile, .op = KV_IO_OP_WRITE,
						   .offset = op->ext.offset, .len = body,
						   .buf = (void *)(uintptr_t)data,
						   .cb = put_io_done, .ctx = op };
	if (body < len)
		op->req[n++] = (struct kv_io_req){ .file = st->dfile, .op = KV_IO_OP_WRITE,
						   .offset = op->ext.offset + body,
						   .len = st->align, .buf = op->tail,
						   .cb = put_io_done, .ctx = op };
	atomic_store(&op->left, n);
	for (unsigned i = 0; i < n; i++)
		reqs[i] = &op->req[i];
	rc = kv_io_submit(st->io, reqs, n);
	if (rc) {
		char detail[256];

		snprintf(detail, sizeof(detail), "%s", kv_last_error());
		pthread_mutex_lock(&st->lock);
		space_free(st, op->ext.offset, op->alloc);
		st->pending_bytes -= op->alloc;
		st->put_errors++;
		pthread_mutex_unlock(&st->lock);
		inflight_put(st);
		put_free(op);
		return kv_fail(-rc, "store '%s': submit a put: %s", st->dir, detail);
	}
	return 0;
}

/* Synchronous forms wait on the store's wait_cond for their callback. */
struct sync_wait {
	struct kv_store *st;
	bool done;
	int result;
	struct kv_store_extent ext;
	char detail[256];
};

static void sync_done(void *ctx, int result, const struct kv_store_extent *ext)
{
	struct sync_wait *w = ctx;

	if (result)
		snprintf(w->detail, sizeof(w->detail), "%s", kv_last_error());
	pthread_mutex_lock(&w->st->wait_lock);
	w->result = result;
	if (ext)
		w->ext = *ext;
	w->done = true;
	pthread_cond_broadcast(&w->st->wait_cond);
	pthread_mutex_unlock(&w->st->wait_lock);
}

static int sync_wait_for(struct sync_wait *w)
{
	pthread_mutex_lock(&w->st->wait_lock);
	while (!w->done)
		pthread_cond_wait(&w->st->wait_cond, &w->st->wait_lock);
	pthread_mutex_unlock(&w->st->wait_lock);
	if (w->result)
		return kv_fail(-w->result, "%s", w->detail);
	return 0;
}

int kv_store_put(struct kv_store *st, const void *key, size_t key_len, const void *data,
		 size_t len, struct kv_store_extent *out)
{
	struct sync_wait w = { .st = st };
	int rc = kv_store_put_async(st, key, key_len, data, len, sync_done, &w);

	if (rc)
		return rc;
	rc = sync_wait_for(&w);
	if (!rc && out)
		*out = w.ext;
	return rc;
}

/* ---- Gets --------------------------------------------------------------- */

/* Drop a reader's pin; the last reader of a dead extent frees it. */
static void ext_unpin(struct kv_store *st, struct ext *x)
{
	if (--x->readers == 0 && x->dead) {
		space_retire(st, x->e.offset, x->alloc);
		free(x);
	}
}

static void get_io_done(struct kv_io_req *req)
{
	struct get_op *op = req->ctx;
	struct kv_store *st = op->st;
	const struct kv_store_extent *e = &op->ext;
	char hex[2 * KV_STORE_KEY_MAX + 1];
	int rc = 0;
	bool bad_sum = false;

	if (req->result < 0) {
		rc = kv_fail((int)-req->result, "store '%s': extent key %s offset %" PRIu64
			     ": read: %s", st->dir, key_hex(e->key, e->key_len, hex), e->offset,
			     kv_last_error());
	} else if ((uint64_t)req->result != e->len) {
		rc = kv_fail(EIO, "store '%s': extent key %s offset %" PRIu64 ": read %" PRId64
			     " of %" PRIu64 " bytes (data file truncated?)", st->dir,
			     key_hex(e->key, e->key_len, hex), e->offset, req->result, e->len);
	} else {
		uint64_t sum = XXH3_64bits(req->buf, e->len);

		if (sum != e->checksum) {
			bad_sum = true;
			rc = kv_fail(EBADMSG, "store '%s': extent key %s offset %" PRIu64 " len %"
				     PRIu64 ": checksum mismatch (index %016" PRIx64 ", data %016"
				     PRIx64 ")", st->dir, key_hex(e->key, e->key_len, hex),
				     e->offset, e->len, e->checksum, sum);
		}
	}
	if (rc)
		memset(req->buf, 0, e->len);

	pthread_mutex_lock(&st->lock);
	ext_unpin(st, op->x);
	if (rc) {
		st->get_errors++;
		st->csum_fail += bad_sum;
	} else {
		st->gets++;
	}
	pthread_mutex_unlock(&st->lock);
	if (rc)
		kv_log(bad_sum ? KV_LOG_ERROR : KV_LOG_WARN, "%s", kv_last_error());
	op->cb(op->ctx, rc, e);
	free(op);
	inflight_put(st);
}

int kv_store_get_async(struct kv_store *st, const struct kv_store_extent *ext, void *dst,
		       kv_store_cb cb, void *ctx)
{
	struct kv_io_req *p;
	struct get_op *op;
	int rc;

	if (!st || !ext || !dst || !cb)
		return kv_fail(EINVAL, "kv_store_get_async: NULL argument");
	op = malloc(sizeof(*op));
	if (!op)
		return kv_fail(ENOMEM, "store '%s': out of memory for a get", st->dir);
	rc = inflight_get(st);
	if (rc) {
		free(op);
		return rc;
	}
	pthread_mutex_lock(&st->lock);
	op->x = ext_find(st, ext);
	if (op->x)
		op->x->readers++;
	pthread_mutex_unlock(&st->lock);
	if (!op->x) {
		char hex[2 * KV_STORE_KEY_MAX + 1];

		free(op);
		inflight_put(st);
		return kv_fail(ENOENT, "store '%s': extent %" PRIu64 " key %s offset %" PRIu64
			       " is not live (deleted, replaced or never put)", st->dir, ext->id,
			       key_hex(ext->key, ext->key_len < KV_STORE_KEY_MAX ? ext->key_len
				       : KV_STORE_KEY_MAX, hex), ext->offset);
	}
	op->st = st;
	op->ext = op->x->e;
	op->cb = cb;
	op->ctx = ctx;
	op->req = (struct kv_io_req){ .file = st->dfile, .op = KV_IO_OP_READ,
				      .offset = op->ext.offset, .len = op->ext.len, .buf = dst,
				      .cb = get_io_done, .ctx = op };
	p = &op->req;
	rc = kv_io_submit(st->io, &p, 1);
	if (rc) {
		pthread_mutex_lock(&st->lock);
		ext_unpin(st, op->x);
		st->get_errors++;
		pthread_mutex_unlock(&st->lock);
		free(op);
		inflight_put(st);
		return rc;
	}
	return 0;
}

int kv_store_get(struct kv_store *st, const struct kv_store_extent *ext, void *dst)
{
	struct sync_wait w = { .st = st };
	int rc = kv_store_get_async(st, ext, dst, sync_done, &w);

	if (rc)
		return rc;
	return sync_wait_for(&w);
}

/* ---- Lookup, delete, foreach, sync, stats -------------------------------- */

int kv_store_lookup(struct kv_store *st, const void *key, size_t key_len,
		    struct kv_store_extent *out)
{
	struct ext *x;
	int rc;

	if (!st || !out)
		return kv_fail(EINVAL, "kv_store_lookup: NULL argument");
	rc = check_key(st, key, key_len);
	if (rc)
		return rc;
	pthread_mutex_lock(&st->lock);
	x = *find_slot(st, key, (uint32_t)key_len);
	if (x)
		*out = x->e;
	pthread_mutex_unlock(&st->lock);
	if (!x) {
		char hex[2 * KV_STORE_KEY_MAX + 1];

		return kv_fail(ENOENT, "store '%s': no extent with key %s", st->dir,
			       key_hex(key, (uint32_t)key_len, hex));
	}
	return 0;
}

int kv_store_delete(struct kv_store *st, const struct kv_store_extent *ext)
{
	struct store_record rec;
	struct ext *x;
	uint64_t seq;
	int rc;

	if (!st || !ext)
		return kv_fail(EINVAL, "kv_store_delete: NULL argument");
	pthread_mutex_lock(&st->lock);
	x = ext_find(st, ext);
	if (x && x->deleting)
		x = NULL;
	if (x) {
		/* The extent stays live (gets, lookups and walks see it, and
		 * a failed delete has nothing to undo) until its record is in
		 * the index; deleting keeps a second delete out, and the pin
		 * keeps x if a put of the key replaces it meanwhile. */
		x->deleting = true;
		x->readers++;
	}
	pthread_mutex_unlock(&st->lock);
	if (!x)
		return kv_fail(ENOENT, "store '%s': delete of extent %" PRIu64 ": not live "
			       "(or being deleted)", st->dir, ext->id);
	record_fill(&rec, 0, REC_DELETE, &x->e, x->e.id);
	rc = log_append(st, &rec, 1, &seq);
	pthread_mutex_lock(&st->lock);
	x->deleting = false;
	if (!rc)
		st->deletes++;
	if (x->dead) {
		/* Replaced meanwhile and retired by that put: whichever record
		 * came first, replay ends with the put's extent. */
		ext_unpin(st, x);
	} else {
		x->readers--;
		if (!rc) {
			struct ext **pp = find_slot(st, x->e.key, x->e.key_len);

			*pp = x->next;
			ext_retire(st, x);
			registry_update(st);
		}
	}
	pthread_mutex_unlock(&st->lock);
	if (!rc)
		held_sync_maybe(st);
	return rc;
}

static int cmp_offset(const void *a, const void *b)
{
	const struct kv_store_extent *x = a, *y = b;

	return (x->offset > y->offset) - (x->offset < y->offset);
}

int kv_store_foreach(struct kv_store *st, int (*fn)(void *ctx, const struct kv_store_extent *ext),
		     void *ctx)
{
	struct kv_store_extent *snap;
	size_t n = 0;
	int rc = 0;

	if (!st || !fn)
		return kv_fail(EINVAL, "kv_store_foreach: NULL argument");
	pthread_mutex_lock(&st->lock);
	snap = malloc((st->n_ext ? st->n_ext : 1) * sizeof(*snap));
	if (snap)
		for (size_t b = 0; b < st->n_buckets; b++)
			for (struct ext *x = st->buckets[b]; x; x = x->next)
				snap[n++] = x->e;
	pthread_mutex_unlock(&st->lock);
	if (!snap)
		return kv_fail(ENOMEM, "store '%s': out of memory for a snapshot", st->dir);
	qsort(snap, n, sizeof(*snap), cmp_offset);
	for (size_t i = 0; i < n && !rc; i++)
		rc = fn(ctx, &snap[i]);
	free(snap);
	return rc;
}

int kv_store_sync(struct kv_store *st)
{
	int rc;

	if (!st)
		return kv_fail(EINVAL, "kv_store_sync: NULL store");
	pthread_mutex_lock(&st->log_lock);
	rc = index_sync(st);
	pthread_mutex_unlock(&st->log_lock);
	return rc;
}

struct kv_io *kv_store_engine(struct kv_store *st)
{
	return st->io;
}

static uint64_t held_limit_default(const struct kv_store *st)
{
	uint64_t lim = HELD_MAX;

	if (st->capacity && st->capacity / HELD_SHARE < lim)
		lim = st->capacity / HELD_SHARE;
	return lim > st->align ? lim : st->align;
}

void kv_store_set_held_limit(struct kv_store *st, uint64_t bytes)
{
	pthread_mutex_lock(&st->lock);
	st->held_limit = bytes ? bytes : held_limit_default(st);
	pthread_mutex_unlock(&st->lock);
}

void kv_store_stats(struct kv_store *st, struct kv_store_stats *out)
{
	struct statvfs sv;
	uint64_t room = 0;

	if (!out)
		return;
	memset(out, 0, sizeof(*out));
	if (!st)
		return;
	if (!st->capacity && statvfs(st->dir, &sv) == 0)
		room = (uint64_t)sv.f_bavail * sv.f_frsize;
	pthread_mutex_lock(&st->lock);
	out->extents = st->n_ext;
	out->live_bytes = st->live_bytes;
	out->used_bytes = st->used_bytes;
	out->file_bytes = st->end - st->data_start;
	for (size_t i = 0; i < st->n_free; i++)
		out->free_bytes += st->free[i].len;
	/* A reopen with a smaller capacity can leave more in use than it. */
	if (st->capacity)
		room = st->capacity > out->file_bytes ? st->capacity - out->file_bytes : 0;
	out->free_bytes += room;
	out->puts = st->puts;
	out->gets = st->gets;
	out->deletes = st->deletes;
	out->put_errors = st->put_errors;
	out->get_errors = st->get_errors;
	out->checksum_failures = st->csum_fail;
	pthread_mutex_unlock(&st->lock);
	pthread_mutex_lock(&st->log_lock);
	out->index_records = st->records;
	pthread_mutex_unlock(&st->log_lock);
	out->align = st->align;
	out->direct = st->direct;
}

static int cmp_range(const void *a, const void *b)
{
	const struct range *x = a, *y = b;

	return (x->off > y->off) - (x->off < y->off);
}

int kv_store_validate(struct kv_store *st)
{
	struct range *all;
	size_t n = 0, n_ext = 0;
	uint64_t live = 0, used = 0, covered = 0;
	int rc = 0;

	if (!st)
		return kv_fail(EINVAL, "kv_store_validate: NULL store");
	pthread_mutex_lock(&st->lock);
	all = malloc((st->n_ext + st->n_free + st->n_held + 1) * sizeof(*all));
	if (!all) {
		pthread_mutex_unlock(&st->lock);
		return kv_fail(ENOMEM, "store validate: out of memory");
	}
	for (size_t i = 0; i < st->n_free; i++) {
		const struct range *r = &st->free[i];

		if (!r->len || r->off % st->align || r->len % st->align)
			rc = kv_fail(EFAULT, "store: free range %zu (%" PRIu64 "+%" PRIu64
				     ") empty or unaligned", i, r->off, r->len);
		if (i && st->free[i - 1].off + st->free[i - 1].len >= r->off)
			rc = kv_fail(EFAULT, "store: free ranges %zu and %zu unsorted, "
				     "overlapping or touching", i - 1, i);
		all[n++] = *r;
		covered += r->len;
	}
	for (size_t i = 0; i < st->n_held; i++) {
		all[n++] = st->held[i];
		covered += st->held[i].len;
	}
	for (size_t b = 0; b < st->n_buckets; b++)
		for (struct ext *x = st->buckets[b]; x; x = x->next) {
			if (x->dead || x->alloc != align_up(x->e.len, st->align) ||
			    x->e.offset % st->align)
				rc = kv_fail(EFAULT, "store: extent %" PRIu64 " malformed", x->e.id);
			all[n++] = (struct range){ x->e.offset, x->alloc };
			live += x->e.len;
			used += x->alloc;
			covered += x->alloc;
			n_ext++;
		}
	qsort(all, n, sizeof(*all), cmp_range);
	for (size_t i = 0; i < n; i++) {
		if (all[i].off < st->data_start || all[i].off + all[i].len > st->end)
			rc = kv_fail(EFAULT, "store: range %" PRIu64 "+%" PRIu64 " outside "
				     "[%" PRIu64 ", %" PRIu64 ")", all[i].off, all[i].len,
				     st->data_start, st->end);
		if (i && all[i - 1].off + all[i - 1].len > all[i].off)
			rc = kv_fail(EFAULT, "store: ranges at %" PRIu64 " and %" PRIu64
				     " overlap", all[i - 1].off, all[i].off);
	}
	if (n_ext != st->n_ext || live != st->live_bytes || used != st->used_bytes)
		rc = kv_fail(EFAULT, "store: counters (%zu extents, %" PRIu64 " live, %" PRIu64
			     " used) disagree with the table (%zu, %" PRIu64 ", %" PRIu64 ")",
			     st->n_ext, st->live_bytes, st->used_bytes, n_ext, live, used);
	/* Space not in a range is held by puts in flight or by dead extents
	 * still being read; with neither, everything is accounted. */
	if (covered + st->pending_bytes > st->end - st->data_start)
		rc = kv_fail(EFAULT, "store: %" PRIu64 " bytes accounted beyond the %" PRIu64
			     " of extent space", covered + st->pending_bytes,
			     st->end - st->data_start);
	pthread_mutex_unlock(&st->lock);
	free(all);
	return rc;
}

/* ---- Open: headers, replay, compaction ----------------------------------- */

void kv_store_config_default(struct kv_store_config *cfg)
{
	if (!cfg)
		return;
	memset(cfg, 0, sizeof(*cfg));
	cfg->sync = KV_STORE_SYNC_EVERY;
	cfg->sync_every = 64;
	cfg->kind = KV_KIND_KV;
	cfg->label = "kv_store";
}

static void header_fill(struct store_header *h, const struct kv_store_config *cfg,
			uint32_t kind, uint32_t align, uint64_t data_start, uint64_t next_seq)
{
	memset(h, 0, sizeof(*h));
	memcpy(h->magic, STORE_MAGIC, 8);
	h->version = STORE_VERSION;
	h->file_kind = kind;
	h->align = align;
	h->identity_len = (uint32_t)cfg->identity_len;
	h->data_start = data_start;
	h->next_seq = next_seq;
	memcpy(h->identity, cfg->identity, cfg->identity_len);
	h->checksum = header_sum(h);
}

/* Read and check the header of one of the files. */
static int header_check(int fd, const char *dir, const char *name, uint32_t kind,
			const struct kv_store_config *cfg, struct store_header *h)
{
	ssize_t r = pread(fd, h, sizeof(*h), 0);

	if (r < 0)
		return kv_fail(errno, "store '%s': read %s: %s", dir, name, strerror(errno));
	if (r < (ssize_t)sizeof(*h))
		return kv_fail(EBADMSG, "store '%s': %s is not a store file: %zd bytes, "
			       "shorter than its %u-byte header", dir, name, r, HEADER_BYTES);
	if (memcmp(h->magic, STORE_MAGIC, 8))
		return kv_fail(EBADMSG, "store '%s': %s is not a store file (bad magic)", dir,
			       name);
	if (h->checksum != header_sum(h))
		return kv_fail(EBADMSG, "store '%s': %s header is corrupt (checksum)", dir, name);
	if (h->version != STORE_VERSION)
		return kv_fail(EBADMSG, "store '%s': %s has format version %u, this library "
			       "reads %u", dir, name, h->version, STORE_VERSION);
	if (h->file_kind != kind || h->identity_len > KV_STORE_IDENTITY_MAX || !h->align ||
	    h->data_start % h->align || h->data_start < HEADER_BYTES)
		return kv_fail(EBADMSG, "store '%s': %s header has impossible fields", dir, name);
	if (h->identity_len != cfg->identity_len ||
	    memcmp(h->identity, cfg->identity, cfg->identity_len))
		return kv_fail(ESTALE, "store '%s': written for another identity (%u bytes, "
			       "%s than the %zu given): refusing to read it as this one", dir,
			       h->identity_len,
			       h->identity_len == cfg->identity_len ? "other bytes" : "a length other",
			       cfg->identity_len);
	return 0;
}

static char *path_join(const char *dir, const char *name)
{
	size_t n = strlen(dir) + strlen(name) + 2;
	char *p = malloc(n);

	if (p)
		snprintf(p, n, "%s/%s", dir, name);
	return p;
}

static int fsync_dir(const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int rc = 0;

	if (fd < 0)
		return kv_fail(errno, "store: open directory '%s': %s", dir, strerror(errno));
	if (fsync(fd))
		rc = kv_fail(errno, "store: fsync directory '%s': %s", dir, strerror(errno));
	close(fd);
	return rc;
}

/* Write a new index file (header, then n records) atomically: a temporary
 * file synced, renamed over store.idx, and the directory synced. */
static int index_write_new(struct kv_store *st, const struct kv_store_config *cfg,
			   const struct store_record *recs, size_t n)
{
	char *tmp = path_join(st->dir, "store.idx.tmp"), *path = path_join(st->dir, "store.idx");
	struct store_header h;
	int fd = -1, rc;

	if (!tmp || !path) {
		rc = kv_fail(ENOMEM, "store: out of memory");
		goto out;
	}
	fd = open(tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		rc = kv_fail(errno, "store '%s': create %s: %s", st->dir, tmp, strerror(errno));
		goto out;
	}
	header_fill(&h, cfg, FILE_INDEX, st->align, st->data_start, st->next_seq);
	rc = pwrite_all(fd, &h, sizeof(h), 0, false);
	if (!rc && n)
		rc = pwrite_all(fd, recs, n * sizeof(*recs), sizeof(h), false);
	if (rc)
		rc = kv_fail(-rc, "store '%s': write %s: %s", st->dir, tmp, strerror(-rc));
	if (!rc && fsync(fd))
		rc = kv_fail(errno, "store '%s': fsync %s: %s", st->dir, tmp, strerror(errno));
	if (!rc && rename(tmp, path))
		rc = kv_fail(errno, "store '%s': rename %s: %s", st->dir, tmp, strerror(errno));
	if (!rc)
		rc = fsync_dir(st->dir);
	if (rc) {
		unlink(tmp);
		goto out;
	}
	if (st->ifd >= 0)
		close(st->ifd);
	st->ifd = fd;
	fd = -1;
	st->log_end = sizeof(h) + n * sizeof(*recs);
	st->records = n;
out:
	if (fd >= 0)
		close(fd);
	free(tmp);
	free(path);
	return rc;
}

static int cmp_ext_ptr_offset(const void *a, const void *b)
{
	const struct ext *x = *(struct ext *const *)a, *y = *(struct ext *const *)b;

	return (x->e.offset > y->e.offset) - (x->e.offset < y->e.offset);
}

static int cmp_ext_ptr_id(const void *a, const void *b)
{
	const struct ext *x = *(struct ext *const *)a, *y = *(struct ext *const *)b;

	return (x->e.id > y->e.id) - (x->e.id < y->e.id);
}

/* Remove x from the table during replay (no accounting yet). */
static void replay_drop(struct kv_store *st, struct ext *x)
{
	struct ext **pp = find_slot(st, x->e.key, x->e.key_len);

	*pp = x->next;
	st->n_ext--;
	free(x);
}

/* Check one record read back from the index; NULL if it is sound. */
static const char *record_problem(const struct kv_store *st, const struct store_record *r,
				  uint64_t prev_seq)
{
	if (r->checksum != record_sum(r))
		return "checksum";
	if (r->seq <= prev_seq)
		return "sequence number out of order";
	if ((r->type != REC_PUT && r->type != REC_DELETE) || !r->key_len ||
	    r->key_len > KV_STORE_KEY_MAX)
		return "bad type or key length";
	if (r->type == REC_PUT &&
	    (!r->len || r->offset % st->align || r->offset < st->data_start ||
	     r->len > UINT64_MAX - st->align ||
	     r->offset + align_up(r->len, st->align) < r->offset))
		return "extent out of range";
	return NULL;
}

/* Replay the index into the table, cut a torn tail, rebuild the free
 * ranges, and compact when the index is mostly dead records. */
static int replay(struct kv_store *st, const struct kv_store_config *cfg)
{
	struct stat sb;
	uint64_t size, n_rec, good = 0, prev_seq = 0, data_size;
	struct store_record *recs = NULL;
	struct ext **live = NULL;
	size_t n_live = 0;
	int rc = 0;

	if (fstat(st->dfd, &sb))
		return kv_fail(errno, "store '%s': fstat: %s", st->dir, strerror(errno));
	data_size = (uint64_t)sb.st_size;
	if (fstat(st->ifd, &sb))
		return kv_fail(errno, "store '%s': fstat: %s", st->dir, strerror(errno));
	size = (uint64_t)sb.st_size - HEADER_BYTES;
	n_rec = size / sizeof(struct store_record);
	if (n_rec) {
		recs = malloc(n_rec * sizeof(*recs));
		if (!recs)
			return kv_fail(ENOMEM, "store '%s': out of memory for %" PRIu64
				       " index records", st->dir, n_rec);
		ssize_t r = pread(st->ifd, recs, n_rec * sizeof(*recs), HEADER_BYTES);

		if (r != (ssize_t)(n_rec * sizeof(*recs))) {
			rc = kv_fail(r < 0 ? errno : EIO, "store '%s': read store.idx: %s",
				     st->dir, r < 0 ? strerror(errno) : "short read");
			goto out;
		}
	}
	for (; good < n_rec; good++) {
		const struct store_record *r = &recs[good];
		const char *why = record_problem(st, r, prev_seq);

		if (why) {
			kv_log(KV_LOG_WARN, "store '%s': index record %" PRIu64 " at byte %" PRIu64
			       ": %s; dropping the tail from there (%" PRIu64 " bytes)", st->dir,
			       good, HEADER_BYTES + good * sizeof(*r), why,
			       size - good * sizeof(*r));
			break;
		}
		prev_seq = r->seq;
		struct ext **pp = find_slot(st, r->key, r->key_len);

		if (r->type == REC_DELETE) {
			if (*pp && (*pp)->e.id == r->arg)
				replay_drop(st, *pp);
			continue;
		}
		struct ext *x = calloc(1, sizeof(*x));

		if (!x) {
			rc = kv_fail(ENOMEM, "store '%s': out of memory replaying", st->dir);
			goto out;
		}
		x->e = (struct kv_store_extent){ .id = r->seq, .offset = r->offset, .len = r->len,
						 .checksum = r->arg, .key_len = r->key_len };
		memcpy(x->e.key, r->key, r->key_len);
		x->alloc = align_up(r->len, st->align);
		if (*pp)
			replay_drop(st, *pp);
		pp = find_slot(st, r->key, r->key_len);
		x->next = NULL;
		*pp = x;
		st->n_ext++;
		if (st->n_ext > st->n_buckets && table_grow(st)) {
			rc = kv_fail(ENOMEM, "store '%s': out of memory replaying", st->dir);
			goto out;
		}
	}
	if (good * sizeof(struct store_record) != size) {
		if (good == n_rec)
			kv_log(KV_LOG_WARN, "store '%s': index ends in a torn record (%" PRIu64
			       " bytes); dropping it", st->dir, size - good * sizeof(*recs));
		if (ftruncate(st->ifd, (off_t)(HEADER_BYTES + good * sizeof(*recs)))) {
			rc = kv_fail(errno, "store '%s': truncate store.idx: %s", st->dir,
				     strerror(errno));
			goto out;
		}
	}
	st->log_end = HEADER_BYTES + good * sizeof(struct store_record);
	st->records = good;
	/* The header's mark (set by the open, from the last compaction)
	 * covers ids whose records compaction dropped. */
	if (st->next_seq < prev_seq + 1)
		st->next_seq = prev_seq + 1;

	/* Live extents by offset: gaps become free ranges. Overlaps (an
	 * index from before a power loss with SYNC_NONE) keep the later put;
	 * extents past the end of the data file are dropped. */
	live = malloc((st->n_ext ? st->n_ext : 1) * sizeof(*live));
	if (!live) {
		rc = kv_fail(ENOMEM, "store '%s': out of memory replaying", st->dir);
		goto out;
	}
	for (size_t b = 0; b < st->n_buckets; b++)
		for (struct ext *x = st->buckets[b]; x; x = x->next)
			live[n_live++] = x;
	qsort(live, n_live, sizeof(*live), cmp_ext_ptr_offset);
	st->end = st->data_start;
	{
		size_t k = 0;

		for (size_t i = 0; i < n_live; i++) {
			struct ext *x = live[i];

			if (x->e.offset + x->alloc > data_size) {
				kv_log(KV_LOG_WARN, "store '%s': extent %" PRIu64 " at %" PRIu64
				       " lies past the end of store.data; dropped", st->dir,
				       x->e.id, x->e.offset);
				replay_drop(st, x);
				continue;
			}
			if (k && live[k - 1]->e.offset + live[k - 1]->alloc > x->e.offset) {
				struct ext *older = live[k - 1]->e.id < x->e.id ? live[k - 1] : x;

				kv_log(KV_LOG_WARN, "store '%s': extents %" PRIu64 " and %" PRIu64
				       " overlap; keeping the later", st->dir, live[k - 1]->e.id,
				       x->e.id);
				if (older == live[k - 1])
					live[k - 1] = x;
				replay_drop(st, older);
				continue;
			}
			live[k++] = x;
		}
		n_live = k;
	}
	for (size_t i = 0; i < n_live; i++) {
		struct ext *x = live[i];

		if (x->e.offset > st->end)
			space_free(st, st->end, x->e.offset - st->end);
		if (x->e.offset + x->alloc > st->end)
			st->end = x->e.offset + x->alloc;
		st->live_bytes += x->e.len;
		st->used_bytes += x->alloc;
	}

	if (good > COMPACT_MIN && good > COMPACT_FACTOR * n_live) {
		struct store_record *out_recs = malloc((n_live ? n_live : 1) * sizeof(*out_recs));

		if (!out_recs) {
			rc = kv_fail(ENOMEM, "store '%s': out of memory compacting", st->dir);
			goto out;
		}
		qsort(live, n_live, sizeof(*live), cmp_ext_ptr_id);
		for (size_t i = 0; i < n_live; i++)
			record_fill(&out_recs[i], live[i]->e.id, REC_PUT, &live[i]->e,
				    live[i]->e.checksum);
		rc = index_write_new(st, cfg, out_recs, n_live);
		free(out_recs);
		if (rc)
			goto out;
		kv_log(KV_LOG_INFO, "store '%s': index compacted: %" PRIu64 " records to %zu",
		       st->dir, good, n_live);
	}
out:
	free(live);
	free(recs);
	return rc;
}

/* Create both files of a new store (store.data is open, locked, and
 * empty or header-only): data header first, then the index, which
 * appears atomically, so a store without an index was never in use. */
static int create_files(struct kv_store *st, const struct kv_store_config *cfg)
{
	struct store_header h;
	char *block;
	int rc;

	block = calloc(1, st->data_start);
	if (!block)
		return kv_fail(ENOMEM, "store: out of memory");
	header_fill(&h, cfg, FILE_DATA, st->align, st->data_start, 0);
	memcpy(block, &h, sizeof(h));
	/* A header left by a creation cut short may be of another layout. */
	rc = ftruncate(st->dfd, 0) ? -errno : 0;
	if (!rc)
		rc = pwrite_all(st->dfd, block, st->data_start, 0, false);
	free(block);
	if (rc)
		return kv_fail(-rc, "store '%s': write store.data header: %s", st->dir,
			       strerror(-rc));
	if (fsync(st->dfd))
		return kv_fail(errno, "store '%s': fsync store.data: %s", st->dir, strerror(errno));
	return index_write_new(st, cfg, NULL, 0);
}

static void store_free(struct kv_store *st)
{
	if (st->buckets)
		for (size_t b = 0; b < st->n_buckets; b++) {
			struct ext *x = st->buckets[b], *next;

			for (; x; x = next) {
				next = x->next;
				free(x);
			}
		}
	free(st->buckets);
	free(st->free);
	free(st->held);
	if (st->rec != KV_HANDLE_NONE)
		kv_registry_forget(st->reg, st->rec);
	if (st->io && st->dfile >= 0)
		kv_io_close(st->io, st->dfile);
	if (st->own_io)
		kv_io_destroy(st->io, 0);
	if (st->dfd >= 0)
		close(st->dfd);
	if (st->ifd >= 0)
		close(st->ifd);
	pthread_mutex_destroy(&st->lock);
	pthread_mutex_destroy(&st->log_lock);
	pthread_mutex_destroy(&st->fin_lock);
	pthread_cond_destroy(&st->fin_cond);
	pthread_mutex_destroy(&st->wait_lock);
	pthread_cond_destroy(&st->wait_cond);
	free(st->dir);
	free(st->label);
	free(st);
}

int kv_store_open(const struct kv_store_config *cfg, struct kv_store **out)
{
	struct kv_store *st;
	char *dpath = NULL, *ipath = NULL;
	struct stat sb, isb;
	bool have_idx;
	int rc;

	if (!cfg || !out || !cfg->dir || !*cfg->dir)
		return kv_fail(EINVAL, "kv_store_open: NULL %s", !cfg || !out ? "argument" : "dir");
	if (!cfg->identity || !cfg->identity_len || cfg->identity_len > KV_STORE_IDENTITY_MAX)
		return kv_fail(EINVAL, "store '%s': identity of %zu bytes (1..%d)", cfg->dir,
			       cfg->identity_len, KV_STORE_IDENTITY_MAX);
	if ((unsigned)cfg->sync > KV_STORE_SYNC_NONE ||
	    (cfg->sync == KV_STORE_SYNC_BATCHED && !cfg->sync_every) ||
	    (unsigned)cfg->kind >= KV_KIND_COUNT)
		return kv_fail(EINVAL, "store '%s': bad sync policy, sync_every or kind", cfg->dir);

	st = calloc(1, sizeof(*st));
	if (!st)
		return kv_fail(ENOMEM, "store: out of memory");
	st->dfile = st->dfd = st->ifd = -1;
	pthread_mutex_init(&st->lock, NULL);
	pthread_mutex_init(&st->log_lock, NULL);
	pthread_mutex_init(&st->fin_lock, NULL);
	pthread_cond_init(&st->fin_cond, NULL);
	pthread_mutex_init(&st->wait_lock, NULL);
	pthread_cond_init(&st->wait_cond, NULL);
	st->dir = strdup(cfg->dir);
	st->label = strdup(cfg->label ? cfg->label : "kv_store");
	st->n_buckets = 256;
	st->buckets = calloc(st->n_buckets, sizeof(*st->buckets));
	st->sync = cfg->sync;
	st->sync_every = cfg->sync_every;
	st->capacity = cfg->capacity;
	st->reg = cfg->registry ? cfg->registry : kv_registry_default();
	dpath = path_join(cfg->dir, "store.data");
	ipath = path_join(cfg->dir, "store.idx");
	if (!st->dir || !st->label || !st->buckets || !dpath || !ipath || !st->reg) {
		rc = kv_fail(ENOMEM, "store: out of memory");
		goto fail;
	}

	if (mkdir(cfg->dir, 0700) && errno != EEXIST) {
		rc = kv_fail(errno, "store: mkdir '%s': %s", cfg->dir, strerror(errno));
		goto fail;
	}
	/* An index without its data file: refused before store.data is
	 * created below, so the refusal changes nothing. (The index is
	 * written after the data header, so no creation leaves this.) */
	if (stat(ipath, &sb) == 0 && stat(dpath, &sb) && errno == ENOENT) {
		rc = kv_fail(EBADMSG, "store '%s': store.idx exists without store.data: not a "
			     "complete store (remove it to start afresh)", cfg->dir);
		goto fail;
	}

	if (cfg->io) {
		st->io = cfg->io;
	} else {
		struct kv_io_config icfg;

		kv_io_config_default(&icfg);
		icfg.registry = cfg->registry;
		rc = kv_io_create(&icfg, &st->io);
		if (rc)
			goto fail;
		st->own_io = true;
	}
	/* One process at a time: two would hand out the same space. The
	 * lock comes first, and whether to create or open is decided from
	 * what the locked files hold: two processes opening a fresh
	 * directory must not both create. */
	st->dfd = open(dpath, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (st->dfd < 0) {
		rc = kv_fail(errno, "store: open %s: %s", dpath, strerror(errno));
		goto fail;
	}
	if (flock(st->dfd, LOCK_EX | LOCK_NB)) {
		rc = kv_fail(errno == EWOULDBLOCK ? EBUSY : errno, "store '%s': %s", cfg->dir,
			     errno == EWOULDBLOCK ? "open in another process" : strerror(errno));
		goto fail;
	}
	st->dfile = kv_io_open(st->io, dpath, KV_IO_READ | KV_IO_WRITE);
	if (st->dfile < 0) {
		rc = st->dfile;
		goto fail;
	}
	{
		struct kv_io_file_info info;

		rc = kv_io_file_info(st->io, st->dfile, &info);
		if (rc)
			goto fail;
		st->direct = info.direct;
		/* Buffered files take any offset; 4 KiB keeps a store's
		 * layout usable if it later moves to a disk that does
		 * O_DIRECT. */
		st->align = info.direct ? info.offset_align : 4096;
		if (st->align < 512)
			st->align = 512;
	}

	if (fstat(st->dfd, &sb)) {
		rc = kv_fail(errno, "store: fstat %s: %s", dpath, strerror(errno));
		goto fail;
	}
	have_idx = stat(ipath, &isb) == 0;
	if (!have_idx && sb.st_size) {
		/* The index appears (atomically) only after the data header is
		 * synced: a data file with nothing past a sound header is a
		 * creation cut short and is completed; one with more is a
		 * store that lost its index. */
		struct store_header hd;

		rc = header_check(st->dfd, cfg->dir, "store.data", FILE_DATA, cfg, &hd);
		if (rc == -ESTALE)
			goto fail;
		if (rc || (uint64_t)sb.st_size > hd.data_start) {
			rc = kv_fail(EBADMSG, "store '%s': store.data exists without store.idx%s: "
				     "not a complete store (remove it to start afresh)", cfg->dir,
				     rc ? " and has no sound header" : "");
			goto fail;
		}
		kv_log(KV_LOG_WARN, "store '%s': store.data without store.idx holds only its "
		       "header: completing a creation cut short", cfg->dir);
	}
	if (!have_idx) {
		st->data_start = align_up(4096, st->align);
		st->next_seq = 1;
		/* On failure the files are left as they are: a later open
		 * completes the creation. */
		rc = create_files(st, cfg);
		if (rc)
			goto fail;
		st->end = st->data_start;
	} else {
		struct store_header h;

		st->ifd = open(ipath, O_RDWR | O_CLOEXEC);
		if (st->ifd < 0) {
			rc = kv_fail(errno, "store: open %s: %s", ipath, strerror(errno));
			goto fail;
		}
		rc = header_check(st->ifd, cfg->dir, "store.idx", FILE_INDEX, cfg, &h);
		if (rc)
			goto fail;
		{
			struct store_header hd;

			rc = header_check(st->dfd, cfg->dir, "store.data", FILE_DATA, cfg, &hd);
			if (rc)
				goto fail;
			if (hd.align != h.align || hd.data_start != h.data_start) {
				rc = kv_fail(EBADMSG, "store '%s': store.data and store.idx headers "
					     "disagree on the layout", cfg->dir);
				goto fail;
			}
		}
		if (st->direct && h.align % st->align) {
			rc = kv_fail(EINVAL, "store '%s': written with %u-byte alignment, this file "
				     "system needs %u", cfg->dir, h.align, st->align);
			goto fail;
		}
		st->align = h.align;
		st->data_start = h.data_start;
		st->next_seq = h.next_seq;
		rc = replay(st, cfg);
		if (rc)
			goto fail;
		if (st->capacity && st->end - st->data_start > st->capacity) {
			char a[32], b[32];

			kv_log(KV_LOG_WARN, "store '%s': %s of extent space in use, over the "
			       "capacity of %s: puts fit only in holes until deletes make room",
			       cfg->dir, kv_format_bytes(st->end - st->data_start, a, sizeof(a)),
			       kv_format_bytes(st->capacity, b, sizeof(b)));
		}
	}

	st->held_limit = held_limit_default(st);
	rc = kv_registry_record(st->reg, st->used_bytes, KV_TIER_SSD, 0, cfg->kind, 0, st->label,
				&st->rec);
	if (rc)
		goto fail;
	rc = pthread_create(&st->fin, NULL, finisher_main, st);
	if (rc) {
		rc = kv_fail(rc, "store '%s': start the finisher thread: %s", cfg->dir,
			     strerror(rc));
		goto fail;
	}
	kv_log(KV_LOG_INFO, "store '%s': open, %zu extents, %" PRIu64 " index records, %u-byte "
	       "alignment, %s", cfg->dir, st->n_ext, st->records, st->align,
	       st->direct ? "O_DIRECT" : "buffered");
	free(dpath);
	free(ipath);
	*out = st;
	return 0;
fail:
	free(dpath);
	free(ipath);
	{
		/* store_free() may log or call into the registry; keep the
		 * detail of the failure that matters. */
		char detail[256];

		snprintf(detail, sizeof(detail), "%s", kv_last_error());
		store_free(st);
		kv_fail(-rc, "%s", detail);
	}
	return rc;
}

int kv_store_close(struct kv_store *st)
{
	int rc;

	if (!st)
		return 0;
	pthread_mutex_lock(&st->wait_lock);
	st->closing = true;
	while (st->inflight)
		pthread_cond_wait(&st->wait_cond, &st->wait_lock);
	pthread_mutex_unlock(&st->wait_lock);
	pthread_mutex_lock(&st->fin_lock);
	st->fin_exit = true;
	pthread_cond_signal(&st->fin_cond);
	pthread_mutex_unlock(&st->fin_lock);
	pthread_join(st->fin, NULL);
	rc = kv_store_sync(st);
	if (rc) {
		char detail[256];

		snprintf(detail, sizeof(detail), "%s", kv_last_error());
		store_free(st);
		return kv_fail(-rc, "%s", detail);
	}
	store_free(st);
	return 0;
}
