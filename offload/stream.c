// SPDX-License-Identifier: MIT
/*
 * The tensor index (names, offsets, sizes, dtypes, shapes over one file)
 * and the streamer that serves those tensors in a repeating order from a
 * DRAM budget, reading ahead of use through kv_io (O_DIRECT) or a kv_mmap
 * (WILLNEED ahead, DONTNEED behind). Entry points kv_tensor_index_*(),
 * kv_stream_create(), kv_stream_acquire(), kv_stream_release().
 *
 * The budget is split once at create (split_budget()): a FIFO ring for
 * the streamed tensors, sized for the tensors held plus those in flight
 * plus the tail a wrap may skip (window_need()), and buffers for the
 * tensors that stay resident. Order positions are
 * absolute counters: `pos` is the next position to acquire, `ahead` the
 * next one to issue; each tensor counts the positions in [pos, ahead)
 * naming it plus its acquires not yet released (`refs`), and a streamed
 * tensor's buffer returns to the ring when that reaches 0. Everything but
 * a tensor's read state belongs to the consumer thread; the read state is
 * written by completions on engine threads, under s->lock.
 * kv_stream_validate() checks the ring and the counts.
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "allocator/allocator-impl.h"
#include "offload-impl.h"

/* ---- dtypes and the tensor index --------------------------------------- */

size_t kv_dtype_size(enum kv_dtype dtype)
{
	static const size_t sizes[] = { 4, 2, 2, 1, 1, 4 };

	return (unsigned)dtype < KV_ARRAY_SIZE(sizes) ? sizes[dtype] : 0;
}

const char *kv_dtype_name(enum kv_dtype dtype)
{
	static const char *const names[] = { "f32", "f16", "bf16", "i8", "u8", "i32" };

	return (unsigned)dtype < KV_ARRAY_SIZE(names) ? names[dtype] : NULL;
}

struct kv_tensor_index {
	struct kv_tensor_info *t;   /* (cap) */
	uint32_t n, cap;
};

int kv_tensor_index_create(struct kv_tensor_index **out)
{
	struct kv_tensor_index *idx;

	if (!out)
		return kv_fail(EINVAL, "tensor index: out is NULL");
	idx = calloc(1, sizeof(*idx));
	if (!idx)
		return kv_fail(ENOMEM, "tensor index: out of memory");
	*out = idx;
	return 0;
}

void kv_tensor_index_destroy(struct kv_tensor_index *idx)
{
	if (!idx)
		return;
	free(idx->t);
	free(idx);
}

/* Check one entry on its own (not against a file). */
static int check_tensor(const struct kv_tensor_info *t)
{
	size_t nlen = strnlen(t->name, sizeof(t->name));
	uint64_t elems = 1;
	size_t es = kv_dtype_size(t->dtype);

	if (nlen == 0 || nlen > KV_TENSOR_NAME_MAX)
		return kv_fail(EINVAL, "tensor index: name is empty or longer than %d bytes",
			       KV_TENSOR_NAME_MAX);
	if (!es)
		return kv_fail(EINVAL, "tensor '%s': unknown dtype %d", t->name, (int)t->dtype);
	if (t->n_dims < 1 || t->n_dims > KV_TENSOR_DIMS_MAX)
		return kv_fail(EINVAL, "tensor '%s': %" PRIu32 " dims (1..%d)", t->name, t->n_dims,
			       KV_TENSOR_DIMS_MAX);
	for (uint32_t d = 0; d < t->n_dims; d++) {
		if (t->shape[d] == 0 || elems > UINT64_MAX / t->shape[d])
			return kv_fail(EINVAL, "tensor '%s': dim %" PRIu32 " is %" PRIu64
				       " (zero, or the shape overflows)", t->name, d, t->shape[d]);
		elems *= t->shape[d];
	}
	if (elems > UINT64_MAX / es || elems * es != t->bytes)
		return kv_fail(EINVAL, "tensor '%s': shape gives %" PRIu64 " %s elements = %" PRIu64
			       " bytes, the entry says %" PRIu64, t->name, elems,
			       kv_dtype_name(t->dtype), elems * es, t->bytes);
	if (t->offset > UINT64_MAX - t->bytes)
		return kv_fail(EINVAL, "tensor '%s': offset %" PRIu64 " + %" PRIu64
			       " bytes overflows", t->name, t->offset, t->bytes);
	return 0;
}

int kv_tensor_index_find(const struct kv_tensor_index *idx, const char *name, uint32_t *id)
{
	if (!idx || !name || !id)
		return kv_fail(EINVAL, "tensor index: find: NULL argument");
	for (uint32_t i = 0; i < idx->n; i++) {
		if (strcmp(idx->t[i].name, name) == 0) {
			*id = i;
			return 0;
		}
	}
	return kv_fail(ENOENT, "tensor index: no tensor named '%s'", name);
}

int kv_tensor_index_add(struct kv_tensor_index *idx, const struct kv_tensor_info *t,
			uint32_t *id)
{
	uint32_t dup;
	int rc;

	if (!idx || !t)
		return kv_fail(EINVAL, "tensor index: add: NULL argument");
	rc = check_tensor(t);
	if (rc)
		return rc;
	/* Grow before the duplicate scan: growing leaves the entries as they
	 * are, and a full index fails without walking them. The doubling
	 * stops at 2^31 entries, where cap * 2 would wrap to 0 and realloc
	 * to 0 bytes would free the array; the byte count must fit a size_t
	 * too (32-bit). */
	if (idx->n == idx->cap) {
		uint32_t cap = idx->cap ? idx->cap * 2 : 64;
		size_t max_cap = SIZE_MAX / sizeof(struct kv_tensor_info);
		struct kv_tensor_info *nt;

		if (idx->cap > UINT32_MAX / 2 || cap > max_cap)
			return kv_fail(ENOMEM, "tensor index: full at %" PRIu32 " tensors",
				       idx->n);
		nt = realloc(idx->t, (size_t)cap * sizeof(*nt));
		if (!nt)
			return kv_fail(ENOMEM, "tensor index: out of memory for %" PRIu32 " tensors",
				       cap);
		idx->t = nt;
		idx->cap = cap;
	}
	for (dup = 0; dup < idx->n; dup++)
		if (strcmp(idx->t[dup].name, t->name) == 0)
			return kv_fail(EEXIST, "tensor index: '%s' is already tensor %" PRIu32,
				       t->name, dup);
	idx->t[idx->n] = *t;
	/* Unused dims are kept 0 so copies compare equal. */
	for (uint32_t d = t->n_dims; d < KV_TENSOR_DIMS_MAX; d++)
		idx->t[idx->n].shape[d] = 0;
	if (id)
		*id = idx->n;
	idx->n++;
	return 0;
}

uint32_t kv_tensor_index_count(const struct kv_tensor_index *idx)
{
	return idx ? idx->n : 0;
}

int kv_tensor_index_get(const struct kv_tensor_index *idx, uint32_t id,
			struct kv_tensor_info *out)
{
	if (!idx || !out || id >= idx->n)
		return kv_fail(EINVAL, "tensor index: get: %s", !idx || !out ? "NULL argument"
										 : "id out of range");
	*out = idx->t[id];
	return 0;
}

int kv_tensor_index_validate(const struct kv_tensor_index *idx, uint64_t file_bytes)
{
	if (!idx)
		return kv_fail(EINVAL, "tensor index: validate: NULL index");
	for (uint32_t i = 0; i < idx->n; i++) {
		const struct kv_tensor_info *t = &idx->t[i];
		int rc = check_tensor(t);

		if (rc)
			return rc;
		if (t->offset + t->bytes > file_bytes)
			return kv_fail(EINVAL, "tensor '%s' (id %" PRIu32 "): bytes %" PRIu64 "..%"
				       PRIu64 " lie outside the file (%" PRIu64 " bytes)", t->name,
				       i, t->offset, t->offset + t->bytes, file_bytes);
	}
	return 0;
}

/* ---- The streamer ------------------------------------------------------ */

/* A tensor's read state, shared with completions (under s->lock). */
enum st_state { T_EMPTY = 0, T_INFLIGHT, T_READY, T_FAILED };

/* When a populate of an MMAP tensor counts as a stall: it had to read at
 * least one page instead of only mapping cached ones. */
#define MMAP_STALL_NS 20000u

struct st_tensor {
	struct kv_stream *s;
	char name[KV_TENSOR_NAME_MAX + 1];
	uint64_t offset, bytes;      /* the tensor in the file */
	uint64_t io_off;             /* IO: the read, widened to the alignment */
	size_t io_len;
	size_t buf_bytes;            /* its buffer (IO) or page span (MMAP) */
	uint32_t uses;               /* positions naming it in the order */
	uint32_t first_use;
	bool resident;

	/* Consumer thread only. */
	char *buf;                   /* IO: buffer of the read; MMAP: the map */
	bool issued;                 /* a read was issued; buf is live */
	bool counted;                /* this read was counted by an acquire */
	bool retry;                  /* a failure was reported: re-read next */
	uint32_t refs;               /* positions in [pos, ahead) + held */
	uint32_t held;
	uint32_t ring_slot;          /* index in s->q, while on the ring */
	uint64_t issue_ns;

	/* Under s->lock. */
	enum st_state state;
	int err;                     /* positive errno of a failed read */
	uint64_t ready_ns;
	char detail[200];
	struct kv_io_req req;
};

struct ring_entry {
	uint64_t off, len;
	uint32_t tensor;
	bool freed;
};

struct kv_stream {
	char label[KV_LABEL_MAX + 1];
	char *path;
	enum kv_stream_backend backend;
	struct st_tensor *t;         /* (n_tensors) */
	uint32_t n_tensors;
	uint32_t *order;             /* (order_len) */
	uint32_t order_len;
	uint32_t lookahead, hold;
	uint64_t pos, ahead;         /* absolute order positions */
	/* Positions in [pos, ahead) that cost a read when walked (all but
	 * resident tensors already loaded), flagged in costly[p % order_len]:
	 * the lookahead bounds these, so a run of resident tensors does not
	 * stall the read-ahead behind it. ahead - pos <= order_len. */
	uint32_t ahead_reads;
	bool *costly;                /* (order_len) */

	/* The ring: live entries q[q_head .. q_head + q_n) (mod q_cap) in
	 * allocation order, each inside [0, ring_bytes). */
	char *ring_base;             /* IO: arena memory; MMAP: NULL */
	uint64_t ring_bytes;
	size_t gran;                 /* buffers are multiples of this */
	struct ring_entry *q;
	uint32_t q_cap, q_head, q_n;

	struct kv_io *io;
	bool own_io;
	int file;
	struct kv_mmap *map;
	const char *map_base;
	struct kv_arena *arena;

	pthread_mutex_t lock;
	pthread_cond_t cond;         /* a read completed */
	uint32_t inflight;           /* under lock */
	uint64_t read_errors;        /* under lock */

	struct kv_stream_stats st;   /* consumer fields */
};

void kv_stream_config_default(struct kv_stream_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->lookahead = 4;
	cfg->hold = 1;
	cfg->backend = KV_STREAM_IO;
	cfg->io_backend = KV_IO_AUTO;
	cfg->label = "stream";
}

/* ---- The ring ---- */

/* Take len bytes at the head of the ring: 0 and *off, or -1 when the
 * free space at the head (or, wrapping, before the oldest entry) is too
 * small. The tail skipped by a wrap stays unused until the oldest entry
 * passes it; window_need() sizes the ring for that. */
static int ring_alloc(struct kv_stream *s, uint64_t len, uint32_t tensor, uint64_t *off)
{
	uint64_t at, head, tail;
	uint32_t slot;

	if (s->q_n == 0) {
		if (len > s->ring_bytes)
			return -1;
		at = 0;
	} else {
		const struct ring_entry *old = &s->q[s->q_head];
		const struct ring_entry *nw = &s->q[(s->q_head + s->q_n - 1) % s->q_cap];

		if (s->q_n == s->q_cap)
			return -1;
		tail = old->off;
		head = nw->off + nw->len;
		if (head > tail) {
			if (s->ring_bytes - head >= len)
				at = head;
			else if (tail >= len)
				at = 0;
			else
				return -1;
		} else if (tail - head >= len) {
			at = head;
		} else {
			return -1;
		}
	}
	slot = (s->q_head + s->q_n) % s->q_cap;
	s->q[slot] = (struct ring_entry){ .off = at, .len = len, .tensor = tensor };
	s->q_n++;
	s->t[tensor].ring_slot = slot;
	*off = at;
	return 0;
}

/* Free an entry; freed entries at either end leave the ring. The oldest
 * move the tail; the newest move the head back, so a buffer given up right
 * after ring_alloc() (a read that failed to submit) or a tensor released
 * while older ones are still held does not keep its space until the ring
 * drains. Freed entries in the middle stay until an end reaches them. */
static void ring_free(struct kv_stream *s, uint32_t slot)
{
	s->q[slot].freed = true;
	while (s->q_n && s->q[s->q_head].freed) {
		s->q_head = (s->q_head + 1) % s->q_cap;
		s->q_n--;
	}
	while (s->q_n && s->q[(s->q_head + s->q_n - 1) % s->q_cap].freed)
		s->q_n--;
}

/* ---- Reads ---- */

static void read_done(struct kv_io_req *req)
{
	struct st_tensor *t = req->ctx;
	struct kv_stream *s = t->s;
	uint64_t need = t->offset + t->bytes - t->io_off;

	pthread_mutex_lock(&s->lock);
	t->ready_ns = kv_now_ns();
	if (req->result < 0 || (uint64_t)req->result < need) {
		t->err = req->result < 0 ? (int)-req->result : EIO;
		if (req->result < 0)
			snprintf(t->detail, sizeof(t->detail), "%s", kv_last_error());
		else
			snprintf(t->detail, sizeof(t->detail), "read %" PRId64 " of %" PRIu64
				 " bytes: the file ends early", req->result, need);
		t->state = T_FAILED;
		s->read_errors++;
	} else {
		t->state = T_READY;
	}
	s->inflight--;
	pthread_cond_broadcast(&s->cond);
	pthread_mutex_unlock(&s->lock);
}

/* Start reading t into its buffer (IO), or advise the kernel to (MMAP). */
static int start_read(struct kv_stream *s, struct st_tensor *t)
{
	struct kv_io_req *r = &t->req;
	int rc;

	t->issue_ns = kv_now_ns();
	t->counted = false;
	if (s->backend == KV_STREAM_MMAP) {
		rc = kv_mmap_advise(s->map, t->offset, t->bytes, KV_ADVISE_WILLNEED);
		if (rc)
			return rc;
		pthread_mutex_lock(&s->lock);
		t->state = T_INFLIGHT;
		pthread_mutex_unlock(&s->lock);
		s->st.bytes_ahead += t->bytes;
		return 0;
	}
	pthread_mutex_lock(&s->lock);
	t->state = T_INFLIGHT;
	t->err = 0;
	s->inflight++;
	pthread_mutex_unlock(&s->lock);
	*r = (struct kv_io_req){ .file = s->file, .op = KV_IO_OP_READ, .offset = t->io_off,
				 .len = t->io_len, .buf = t->buf, .cb = read_done, .ctx = t };
	rc = kv_io_submit(s->io, &r, 1);
	if (rc) {
		pthread_mutex_lock(&s->lock);
		t->state = T_EMPTY;
		s->inflight--;
		pthread_mutex_unlock(&s->lock);
		return kv_fail(-rc, "stream '%s': submit of tensor '%s': %s", s->label, t->name,
			       kv_last_error());
	}
	s->st.bytes_ahead += t->bytes;
	return 0;
}

/* Give t a buffer (a streamed tensor: from the ring) and issue its read. */
static int issue(struct kv_stream *s, struct st_tensor *t)
{
	uint32_t id = (uint32_t)(t - s->t);
	uint64_t off;
	int rc;

	if (!t->resident) {
		if (ring_alloc(s, t->buf_bytes, id, &off))
			return kv_fail(ENOMEM, "stream '%s': no room in the %" PRIu64 "-byte window "
				       "for tensor '%s' (%zu bytes): release held tensors first",
				       s->label, s->ring_bytes, t->name, t->buf_bytes);
		if (s->backend == KV_STREAM_IO)
			t->buf = s->ring_base + off;
	}
	rc = start_read(s, t);
	if (rc) {
		if (!t->resident) {
			ring_free(s, t->ring_slot);
			/* The newest entry: ring_free() takes it off the
			 * ring, so the retry gets the same space. */
			if (s->backend == KV_STREAM_IO)
				t->buf = NULL;
		}
		return rc;
	}
	t->issued = true;
	return 0;
}

/* Walk the order from `ahead`, issuing reads, until at least position
 * min_ahead - 1 is walked and `reads` costly positions are ahead (at most
 * one pass ahead); stop at the first read that cannot be issued (no room
 * yet) and return its error. */
static int pump(struct kv_stream *s, uint32_t reads, uint64_t min_ahead)
{
	while (s->ahead < s->pos + s->order_len) {
		struct st_tensor *t = &s->t[s->order[s->ahead % s->order_len]];
		bool costly = !(t->resident && t->issued);

		if (costly && s->ahead_reads >= reads && s->ahead >= min_ahead)
			break;
		if (!t->issued) {
			int rc = issue(s, t);

			if (rc)
				return rc;
		}
		s->costly[s->ahead % s->order_len] = costly;
		s->ahead_reads += costly;
		t->refs++;
		s->ahead++;
	}
	return 0;
}

/* A streamed tensor nothing holds or expects any more: its buffer goes
 * back to the ring and, for MMAP, its pages out of the page cache. */
static void drop(struct kv_stream *s, struct st_tensor *t)
{
	if (s->backend == KV_STREAM_MMAP)
		(void)kv_mmap_advise(s->map, t->offset, t->bytes, KV_ADVISE_DONTNEED);
	else
		t->buf = NULL;
	ring_free(s, t->ring_slot);
	t->issued = false;
	pthread_mutex_lock(&s->lock);
	t->state = T_EMPTY;
	pthread_mutex_unlock(&s->lock);
}

/* ---- Create and destroy ---- */

static int cmp_size_desc(const void *a, const void *b)
{
	size_t x = *(const size_t *)a, y = *(const size_t *)b;

	return (x < y) - (x > y);
}

/* The ring that always has room for k live buffers of the streamed (not
 * resident) tensors of the order: the sum S of the k largest, plus, when
 * two or more can be live, the largest L minus one granule g. Why the
 * extra: the ring is FIFO and a buffer is contiguous, so an entry that
 * does not fit before the end wraps to 0 and skips the tail, up to L - g
 * bytes. With R = S + L - g and the other live entries taking at most
 * S - len: unwrapped, the two free pieces (end and start) total at least
 * L + len - g, so one holds len; wrapped, the free run before the oldest
 * is R minus the entries minus the skipped tail, at least len. Without it
 * sizes 15, 25, 25 pages in 50 fail with 25 held (B at 15..40 leaves 15 +
 * 10 pages). A lone live buffer always starts at 0, so k = 1 needs L. */
static uint64_t window_need(const struct kv_stream *s, uint32_t k, size_t *tmp)
{
	uint32_t n = 0;
	uint64_t sum = 0;

	for (uint32_t i = 0; i < s->n_tensors; i++)
		if (s->t[i].uses && !s->t[i].resident)
			tmp[n++] = s->t[i].buf_bytes;
	qsort(tmp, n, sizeof(*tmp), cmp_size_desc);
	for (uint32_t i = 0; i < n && i < k; i++)
		sum += tmp[i];
	if (n >= 2 && k >= 2)
		sum += tmp[0] - s->gran;
	return sum;
}

/* A candidate for residency: keeping it saves `uses` reads per pass. */
struct rank {
	uint32_t id, uses, first_use;
};

static int cmp_rank(const void *a, const void *b)
{
	const struct rank *x = a, *y = b;

	if (x->uses != y->uses)
		return x->uses > y->uses ? -1 : 1;
	return (x->first_use > y->first_use) - (x->first_use < y->first_use);
}

/* Decide which tensors stay resident and how big the ring is (see the
 * header): the ring is window_need(hold + lookahead), cut to the budget
 * but never below window_need(hold) (else -EINVAL: the consumer could not
 * hold what it said, and would learn it as -ENOMEM mid-run); the rest of
 * the budget keeps tensors by uses, then first use. Read-ahead beyond the
 * hold is best effort, so cutting into it only costs overlap. Choosing
 * residents can only shrink the ring, which frees budget for more
 * residents, so repeat until nothing changes. */
static int split_budget(struct kv_stream *s, uint64_t budget, uint64_t *resident_bytes)
{
	struct rank *rank = malloc((size_t)s->n_tensors * sizeof(*rank));
	size_t *tmp = malloc((size_t)s->n_tensors * sizeof(*tmp));
	uint64_t total = 0, used_res = 0, ring;
	uint32_t n = 0;
	bool changed = true;
	int rc;

	if (!rank || !tmp) {
		rc = kv_fail(ENOMEM, "stream '%s': out of memory", s->label);
		goto out;
	}
	for (uint32_t i = 0; i < s->n_tensors; i++) {
		if (s->t[i].uses) {
			rank[n++] = (struct rank){ i, s->t[i].uses, s->t[i].first_use };
			total += s->t[i].buf_bytes;
		}
	}
	if (total <= budget) {
		for (uint32_t i = 0; i < n; i++)
			s->t[rank[i].id].resident = true;
		used_res = total;
		ring = 0;
		rc = 0;
		goto done;
	}
	qsort(rank, n, sizeof(*rank), cmp_rank);
	ring = window_need(s, s->hold, tmp);
	if (ring > budget) {
		rc = kv_fail(EINVAL, "stream '%s': budget of %" PRIu64 " bytes is below the "
			     "window for holding %" PRIu32 " tensors (%" PRIu64 " bytes: the %"
			     PRIu32 " largest buffers and the largest again, less %zu, for the "
			     "ring's wrap)", s->label, budget, s->hold, ring, s->hold, s->gran);
		goto out;
	}
	ring = window_need(s, s->hold + s->lookahead, tmp);
	if (ring > budget)
		ring = budget;
	while (changed) {
		changed = false;
		for (uint32_t i = 0; i < n; i++) {
			struct st_tensor *t = &s->t[rank[i].id];

			if (!t->resident && used_res + t->buf_bytes + ring <= budget) {
				t->resident = true;
				used_res += t->buf_bytes;
				changed = true;
			}
		}
		if (changed) {
			uint64_t w = window_need(s, s->hold + s->lookahead, tmp);

			ring = w < ring ? w : ring;
		}
	}
	rc = 0;
done:
	s->ring_bytes = ring;
	*resident_bytes = used_res;
out:
	free(rank);
	free(tmp);
	return rc;
}

static int check_config(const struct kv_stream_config *cfg)
{
	if (!cfg)
		return kv_fail(EINVAL, "stream: config is NULL");
	if (!cfg->index || !cfg->path || !cfg->order)
		return kv_fail(EINVAL, "stream: config without %s", !cfg->index ? "index"
								      : !cfg->path ? "path"
										   : "order");
	if (cfg->order_len == 0 || kv_tensor_index_count(cfg->index) == 0)
		return kv_fail(EINVAL, "stream '%s': empty %s", cfg->path,
			       cfg->order_len ? "index" : "order");
	if (cfg->backend != KV_STREAM_IO && cfg->backend != KV_STREAM_MMAP)
		return kv_fail(EINVAL, "stream '%s': unknown backend %d", cfg->path,
			       (int)cfg->backend);
	if (cfg->hold == 0)
		return kv_fail(EINVAL, "stream '%s': hold is 0", cfg->path);
	if (cfg->lookahead > 1024 || cfg->hold > 1024)
		return kv_fail(EINVAL, "stream '%s': lookahead %" PRIu32 " or hold %" PRIu32
			       " above 1024", cfg->path, cfg->lookahead, cfg->hold);
	if (cfg->label && strlen(cfg->label) > KV_LABEL_MAX - 8)
		return kv_fail(EINVAL, "stream '%s': label longer than %d bytes", cfg->path,
			       KV_LABEL_MAX - 8);
	for (uint32_t i = 0; i < cfg->order_len; i++)
		if (cfg->order[i] >= kv_tensor_index_count(cfg->index))
			return kv_fail(EINVAL, "stream '%s': order[%" PRIu32 "] = %" PRIu32
				       " is not a tensor of the index (%" PRIu32 " tensors)",
				       cfg->path, i, cfg->order[i],
				       kv_tensor_index_count(cfg->index));
	return 0;
}

/* Open the file on the backend and learn its size and alignment. */
static int open_backend(struct kv_stream *s, const struct kv_stream_config *cfg,
			struct kv_registry *reg, uint64_t *size, uint32_t *off_align,
			uint32_t *mem_align)
{
	if (cfg->backend == KV_STREAM_MMAP) {
		struct kv_mmap_config mc;
		char label[sizeof(s->label) + 8];
		int rc;

		kv_mmap_config_default(&mc);
		snprintf(label, sizeof(label), "%s/mmap", s->label);
		mc.label = label;
		mc.registry = reg;
		rc = kv_mmap_open(cfg->path, &mc, &s->map);
		if (rc)
			return rc;
		s->map_base = kv_mmap_data(s->map);
		*size = kv_mmap_size(s->map);
		*off_align = *mem_align = 1;
		return 0;
	}
	if (cfg->io) {
		s->io = cfg->io;
	} else {
		struct kv_io_config ic;
		int rc;

		kv_io_config_default(&ic);
		ic.backend = cfg->io_backend;
		ic.registry = reg;
		rc = kv_io_create(&ic, &s->io);
		if (rc)
			return rc;
		s->own_io = true;
	}
	s->file = kv_io_open(s->io, cfg->path, KV_IO_READ);
	if (s->file < 0)
		return s->file;
	{
		struct kv_io_file_info fi;
		int rc = kv_io_file_info(s->io, s->file, &fi);

		if (rc)
			return rc;
		*size = fi.size;
		*off_align = fi.offset_align ? fi.offset_align : 1;
		*mem_align = fi.mem_align ? fi.mem_align : 1;
	}
	return 0;
}

static void stream_free(struct kv_stream *s)
{
	if (s->io && s->file >= 0)
		kv_io_close(s->io, s->file);
	if (s->own_io)
		kv_io_destroy(s->io, 0);
	kv_arena_destroy(s->arena, KV_ARENA_FORCE);
	kv_mmap_close(s->map);
	pthread_cond_destroy(&s->cond);
	pthread_mutex_destroy(&s->lock);
	free(s->q);
	free(s->costly);
	free(s->order);
	free(s->t);
	free(s->path);
	free(s);
}

int kv_stream_create(const struct kv_stream_config *cfg, struct kv_stream **out)
{
	struct kv_registry *reg;
	struct kv_stream *s;
	uint64_t size = 0, largest = 0, res_bytes = 0, min_stream = UINT64_MAX;
	uint32_t oa = 1, ma = 1;
	size_t page = kv_os_page_size(), gran;
	int rc;

	rc = check_config(cfg);
	if (rc)
		return rc;
	if (!out)
		return kv_fail(EINVAL, "stream '%s': out is NULL", cfg->path);
	reg = cfg->registry ? cfg->registry : kv_registry_default();
	if (!reg)
		return kv_fail(ENOMEM, "stream '%s': no registry: %s", cfg->path, kv_last_error());
	s = calloc(1, sizeof(*s));
	if (!s)
		return kv_fail(ENOMEM, "stream '%s': out of memory", cfg->path);
	s->file = -1;
	pthread_mutex_init(&s->lock, NULL);
	pthread_cond_init(&s->cond, NULL);
	snprintf(s->label, sizeof(s->label), "%s", cfg->label ? cfg->label : "stream");
	s->backend = cfg->backend;
	s->lookahead = cfg->lookahead;
	s->hold = cfg->hold;
	s->n_tensors = kv_tensor_index_count(cfg->index);
	s->order_len = cfg->order_len;
	s->path = strdup(cfg->path);
	s->t = calloc(s->n_tensors, sizeof(*s->t));
	s->order = malloc((size_t)s->order_len * sizeof(*s->order));
	s->costly = calloc(s->order_len, sizeof(*s->costly));
	if (!s->path || !s->t || !s->order || !s->costly) {
		rc = kv_fail(ENOMEM, "stream '%s': out of memory for %" PRIu32 " tensors",
			     cfg->path, s->n_tensors);
		goto fail;
	}
	memcpy(s->order, cfg->order, (size_t)s->order_len * sizeof(*s->order));

	rc = open_backend(s, cfg, reg, &size, &oa, &ma);
	if (rc)
		goto fail;
	rc = kv_tensor_index_validate(cfg->index, size);
	if (rc) {
		rc = kv_fail(-rc, "stream '%s': %s", cfg->path, kv_last_error());
		goto fail;
	}
	gran = page;
	if (oa > gran)
		gran = oa;
	if (ma > gran)
		gran = ma;
	s->gran = gran;
	for (uint32_t i = 0; i < s->n_tensors; i++) {
		struct st_tensor *t = &s->t[i];
		struct kv_tensor_info ti;

		kv_tensor_index_get(cfg->index, i, &ti);
		t->s = s;
		memcpy(t->name, ti.name, sizeof(t->name));
		t->offset = ti.offset;
		t->bytes = ti.bytes;
		if (s->backend == KV_STREAM_IO) {
			t->io_off = ti.offset & ~((uint64_t)oa - 1);
			t->io_len = (size_t)(kv_round_up(ti.offset + ti.bytes, oa) - t->io_off);
			t->buf_bytes = kv_round_up(t->io_len, gran);
		} else {
			uint64_t lo = ti.offset & ~((uint64_t)page - 1);

			t->buf_bytes = (size_t)(kv_round_up(ti.offset + ti.bytes, page) - lo);
			t->buf = (char *)s->map_base;
		}
	}
	for (uint32_t i = 0; i < s->order_len; i++) {
		struct st_tensor *t = &s->t[s->order[i]];

		if (!t->uses++)
			t->first_use = i;
		if (t->buf_bytes > largest)
			largest = t->buf_bytes;
	}
	if (cfg->budget_bytes < largest) {
		rc = kv_fail(EINVAL, "stream '%s': budget of %" PRIu64 " bytes is below the largest "
			     "tensor buffer of the order (%" PRIu64 " bytes)", cfg->path,
			     cfg->budget_bytes, largest);
		goto fail;
	}
	rc = split_budget(s, cfg->budget_bytes, &res_bytes);
	if (rc)
		goto fail;
	for (uint32_t i = 0; i < s->n_tensors; i++) {
		const struct st_tensor *t = &s->t[i];

		if (!t->uses)
			continue;
		if (t->resident) {
			s->st.n_resident++;
			s->st.resident_bytes += t->bytes;
		} else {
			s->st.n_streamed++;
			s->st.streamed_bytes += t->bytes;
			if (t->buf_bytes < min_stream)
				min_stream = t->buf_bytes;
		}
	}
	if (s->ring_bytes) {
		/* Entries on the ring are disjoint and at least min_stream
		 * bytes each. */
		s->q_cap = (uint32_t)(s->ring_bytes / min_stream + 2);
		s->q = calloc(s->q_cap, sizeof(*s->q));
		if (!s->q) {
			rc = kv_fail(ENOMEM, "stream '%s': out of memory for the ring", cfg->path);
			goto fail;
		}
	}
	s->st.window_bytes = s->ring_bytes;
	s->st.buffer_bytes = s->ring_bytes + res_bytes;
	if (s->backend == KV_STREAM_IO && s->st.buffer_bytes) {
		struct kv_arena_config ac;

		kv_arena_config_default(&ac);
		ac.bytes = s->st.buffer_bytes;
		ac.kind = KV_KIND_WEIGHTS;
		ac.policy = KV_POLICY_PREFETCH | KV_POLICY_READONLY;
		ac.label = s->label;
		ac.registry = reg;
		rc = kv_arena_create(&ac, &s->arena);
		if (rc)
			goto fail;
		if (s->ring_bytes) {
			rc = kv_arena_alloc(s->arena, s->ring_bytes, gran, (void **)&s->ring_base);
			if (rc)
				goto fail;
		}
		for (uint32_t i = 0; i < s->n_tensors; i++) {
			struct st_tensor *t = &s->t[i];

			if (!t->resident)
				continue;
			rc = kv_arena_alloc(s->arena, t->buf_bytes, gran, (void **)&t->buf);
			if (rc)
				goto fail;
		}
	}
	kv_log(KV_LOG_INFO, "stream '%s': %s, budget %" PRIu64 ": window %" PRIu64 " bytes, %"
	       PRIu32 " resident tensors (%" PRIu64 " bytes), %" PRIu32 " streamed (%" PRIu64
	       " bytes)", s->label, s->backend == KV_STREAM_IO ? "io" : "mmap",
	       cfg->budget_bytes, s->ring_bytes, s->st.n_resident, s->st.resident_bytes,
	       s->st.n_streamed, s->st.streamed_bytes);
	*out = s;
	return 0;
fail:
	stream_free(s);
	return rc;
}

void kv_stream_destroy(struct kv_stream *s)
{
	if (!s)
		return;
	pthread_mutex_lock(&s->lock);
	while (s->inflight)
		pthread_cond_wait(&s->cond, &s->lock);
	pthread_mutex_unlock(&s->lock);
	stream_free(s);
}

/* ---- Acquire and release ---- */

static const char *tensor_ptr(const struct kv_stream *s, const struct st_tensor *t)
{
	if (s->backend == KV_STREAM_MMAP)
		return s->map_base + t->offset;
	return t->buf + (t->offset - t->io_off);
}

/* Wait until t's data is in DRAM: 0, or the read's error (reported once;
 * the next acquire re-reads). */
static int wait_ready(struct kv_stream *s, struct st_tensor *t)
{
	uint64_t t0 = kv_now_ns(), now;
	enum st_state state;
	char detail[200];
	int err = 0;

	if (s->backend == KV_STREAM_MMAP) {
		pthread_mutex_lock(&s->lock);
		state = t->state;
		pthread_mutex_unlock(&s->lock);
		if (state == T_READY)
			return 0;
		err = kv_mmap_advise(s->map, t->offset, t->bytes, KV_ADVISE_POPULATE);
		now = kv_now_ns();
		s->st.stall_ns += now - t0;
		if (now - t0 >= MMAP_STALL_NS)
			s->st.stalls++;
		pthread_mutex_lock(&s->lock);
		t->ready_ns = now;
		if (err) {
			t->state = T_FAILED;
			t->err = -err;
			snprintf(t->detail, sizeof(t->detail), "%s", kv_last_error());
			s->read_errors++;
		} else {
			t->state = T_READY;
		}
		pthread_mutex_unlock(&s->lock);
	}
	pthread_mutex_lock(&s->lock);
	if (t->state == T_INFLIGHT) {
		while (t->state == T_INFLIGHT)
			pthread_cond_wait(&s->cond, &s->lock);
		s->st.stall_ns += kv_now_ns() - t0;
		s->st.stalls++;
	}
	if (t->state == T_FAILED) {
		err = t->err;
		snprintf(detail, sizeof(detail), "%s", t->detail);
	}
	pthread_mutex_unlock(&s->lock);
	if (err) {
		t->retry = true;
		s->st.bytes_ahead -= t->bytes;
		t->counted = true;
		return kv_fail(err, "stream '%s': read of tensor '%s' (%" PRIu64 " bytes at %" PRIu64
			       ") failed: %s; acquire it again to re-read", s->label, t->name,
			       t->bytes, t->offset, detail);
	}
	if (!t->counted) {
		t->counted = true;
		s->st.bytes_read += t->bytes;
		s->st.bytes_ahead -= t->bytes;
		pthread_mutex_lock(&s->lock);
		s->st.read_ns += t->ready_ns > t->issue_ns ? t->ready_ns - t->issue_ns : 0;
		pthread_mutex_unlock(&s->lock);
	}
	return 0;
}

int kv_stream_acquire(struct kv_stream *s, uint32_t id, const void **data)
{
	uint64_t t0 = kv_now_ns();
	struct st_tensor *t;
	uint32_t want;
	int rc;

	if (!s || !data)
		return kv_fail(EINVAL, "stream: acquire: NULL argument");
	want = s->order[s->pos % s->order_len];
	if (id != want)
		return kv_fail(EINVAL, "stream '%s': acquire of tensor %" PRIu32 " out of order: "
			       "position %" PRIu64 " is '%s' (id %" PRIu32 ")", s->label, id,
			       s->pos, s->t[want].name, want);
	t = &s->t[id];
	rc = pump(s, 0, s->pos + 1);
	if (s->ahead <= s->pos)
		goto out; /* this position could not be issued: rc says why */
	if (t->retry) {
		t->retry = false;
		rc = start_read(s, t);
		if (rc) {
			t->retry = true;
			goto out;
		}
	}
	rc = wait_ready(s, t);
	if (rc)
		goto out;
	t->held++;
	s->ahead_reads -= s->costly[s->pos % s->order_len];
	s->pos++;
	s->st.acquires++;
	*data = tensor_ptr(s, t);
	/* Read-ahead past here is best effort: no room is not an error. */
	(void)pump(s, s->lookahead, 0);
	rc = 0;
out:
	s->st.call_ns += kv_now_ns() - t0;
	return rc;
}

int kv_stream_release(struct kv_stream *s, uint32_t id)
{
	uint64_t t0 = kv_now_ns();
	struct st_tensor *t;

	if (!s || id >= s->n_tensors)
		return kv_fail(EINVAL, "stream: release: %s", s ? "id out of range" : "NULL stream");
	t = &s->t[id];
	if (!t->held)
		return kv_fail(EINVAL, "stream '%s': release of tensor '%s' (id %" PRIu32
			       "), which is not held", s->label, t->name, id);
	t->held--;
	t->refs--;
	s->st.releases++;
	if (t->refs == 0 && !t->resident)
		drop(s, t);
	(void)pump(s, s->lookahead, 0);
	s->st.call_ns += kv_now_ns() - t0;
	return 0;
}

bool kv_stream_is_resident(const struct kv_stream *s, uint32_t id)
{
	return s && id < s->n_tensors && s->t[id].resident;
}

int kv_stream_stats(const struct kv_stream *s, struct kv_stream_stats *out)
{
	struct kv_stream *m = (struct kv_stream *)s;

	if (!s || !out)
		return kv_fail(EINVAL, "stream: stats: NULL argument");
	*out = s->st;
	pthread_mutex_lock(&m->lock);
	out->read_errors = s->read_errors;
	pthread_mutex_unlock(&m->lock);
	out->overlap_ratio = out->read_ns ? 1.0 - (double)out->stall_ns / (double)out->read_ns : 1.0;
	if (out->overlap_ratio < 0)
		out->overlap_ratio = 0;
	return 0;
}

int kv_stream_validate(const struct kv_stream *s)
{
	uint64_t end = 0;
	uint32_t costly = 0;

	if (!s)
		return kv_fail(EINVAL, "stream: validate: NULL stream");
	for (uint64_t p = s->pos; p < s->ahead; p++)
		costly += s->costly[p % s->order_len];
	if (s->ahead < s->pos || s->ahead - s->pos > s->order_len || costly != s->ahead_reads)
		return kv_fail(EFAULT, "stream '%s': positions: pos %" PRIu64 " ahead %" PRIu64
			       ", %" PRIu32 " reads ahead, counted %" PRIu32, s->label, s->pos,
			       s->ahead, s->ahead_reads, costly);
	for (uint32_t k = 0; k < s->q_n; k++) {
		uint32_t slot = (s->q_head + k) % s->q_cap;
		const struct ring_entry *e = &s->q[slot];
		const struct st_tensor *t = &s->t[e->tensor];

		if (e->len == 0 || e->off + e->len > s->ring_bytes)
			return kv_fail(EFAULT, "stream '%s': ring entry %" PRIu32 " outside the ring",
				       s->label, slot);
		/* FIFO: each entry starts where the previous ended, or at 0
		 * after a wrap; either way it must not reach the oldest. */
		if (k && e->off != end && e->off != 0)
			return kv_fail(EFAULT, "stream '%s': ring entry %" PRIu32 " not after its "
				       "predecessor", s->label, slot);
		if (k && e->off < s->q[s->q_head].off && e->off + e->len > s->q[s->q_head].off)
			return kv_fail(EFAULT, "stream '%s': ring entry %" PRIu32 " overlaps the "
				       "oldest", s->label, slot);
		if (!e->freed && (t->resident || !t->issued || t->ring_slot != slot))
			return kv_fail(EFAULT, "stream '%s': ring entry %" PRIu32 " does not match "
				       "tensor '%s'", s->label, slot, t->name);
		end = e->off + e->len;
	}
	for (uint32_t i = 0; i < s->n_tensors; i++) {
		const struct st_tensor *t = &s->t[i];
		uint32_t expect = t->held;

		for (uint64_t p = s->pos; p < s->ahead; p++)
			expect += s->order[p % s->order_len] == i;
		if (t->refs != expect)
			return kv_fail(EFAULT, "stream '%s': tensor '%s' refs %" PRIu32 ", expected %"
				       PRIu32, s->label, t->name, t->refs, expect);
		if (!t->resident && t->refs && !t->issued)
			return kv_fail(EFAULT, "stream '%s': tensor '%s' expected but not issued",
				       s->label, t->name);
		if (!t->resident && t->issued && s->q[t->ring_slot].freed)
			return kv_fail(EFAULT, "stream '%s': tensor '%s' on a freed ring entry",
				       s->label, t->name);
	}
	return 0;
}
