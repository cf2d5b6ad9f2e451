/* SPDX-License-Identifier: MIT */
/*
 * The paged KV cache used from several threads at once, as the "Thread
 * safety" paragraph of <kv/cache.h> allows. Worker threads, each owning
 * its sequences, run seeded random mixes of create, prompt (from a small
 * shared set of prompts, so prefix hits and deduplication happen across
 * threads), append, write, read, rewrite, fork, truncate, attention,
 * preempt / resume, free and, with an SSD tier, swap out / in; beside
 * them one thread makes the cache-wide calls (lookup, admission, stats,
 * pin / unpin, evict, persist, reports of the registry). The capacity is
 * small, so eviction (and spilling) under pressure runs concurrently with
 * prefix hits; an -ENOMEM is counted and answered by freeing something.
 *
 * Every K/V value is a function of (salt, token prefix, position, layer,
 * element), so any thread can predict what a prefix hit must read back,
 * whoever computed the blocks and wherever they have been. After the
 * join: kv_cache_validate(), every live sequence reads back as predicted,
 * the stats add up, destroy succeeds and the registry holds nothing.
 * Meant for the TSan and ASan builds too (suite 'concurrency').
 *
 * A worker cannot use cmocka's asserts (they longjmp to the main thread's
 * stack): it records its first failure and stops every thread, and the
 * main thread fails the test with it after the join. KV_TEST_SEED=<n>
 * replays another seed: the operations each thread chooses follow from
 * it, the interleaving of the threads does not.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>

#include "kvtest.h"

#define L 2
#define H 4
#define D 32
#define T 4
#define ROW (H * D)
#define QH 8                 /* query heads: GQA groups of 2 */
#define WORKERS 4
#define MAX_OWN 4            /* live sequences per worker */
#define MAX_LEN 48
#define MAX_Q 3              /* queries per sequence in an attention batch */
#define N_PROMPTS 8
#define N_BASES 3
#define N_SALTS 2
#define MAX_PINS 3
#define CAPACITY 48          /* blocks: well below what the workers want */
/* K/V an attention call must read before the cache's pool takes part
 * (SMALL_JOB_BYTES in attention.c): counted, to show that it happened. */
#define POOLED_BYTES (64u << 10)

static const char *const salts[N_SALTS] = { "tenant-a", "tenant-b" };

/* ---- Predicted values --------------------------------------------------- */

static uint64_t mix(uint64_t x)
{
	return kv_test_rand(&x);
}

/* The K (kv 0) or V (kv 1) element i of the position pos whose token
 * prefix hashes to ph, under salt. */
static float val(uint32_t salt, uint64_t ph, uint32_t pos, uint32_t layer, uint32_t i, int kv)
{
	uint64_t x = mix(ph ^ (0x5a17ull + salt) * 0x9e3779b97f4a7c15ull) ^ ((uint64_t)pos << 40) ^
		     ((uint64_t)layer << 32) ^ ((uint64_t)i << 1) ^ (uint64_t)kv;

	return (float)(kv_test_rand(&x) % 20001) / 1000.0f - 10.0f;
}

/* ---- Shared prompts ----------------------------------------------------- */

struct prompt {
	int32_t tok[MAX_LEN];
	uint32_t n;
};

/* Prompt p is base p % N_BASES (4, 3 or 2 blocks: the shared prefixes
 * the cache-wide thread pins) and a suffix of its own; one of them is a
 * whole number of blocks, so its last block is computed by every prompt
 * and deduplicated. */
static struct prompt bases[N_BASES], prompts[N_PROMPTS];

static void make_prompts(void)
{
	for (uint32_t b = 0; b < N_BASES; b++) {
		bases[b].n = (4 - b) * T;
		for (uint32_t i = 0; i < bases[b].n; i++)
			bases[b].tok[i] = (int32_t)(100 * (b + 1) + i);
	}
	for (uint32_t p = 0; p < N_PROMPTS; p++) {
		const struct prompt *b = &bases[p % N_BASES];
		uint32_t extra = 1 + (p * 5) % 13;

		memcpy(prompts[p].tok, b->tok, sizeof(int32_t) * b->n);
		for (uint32_t i = 0; i < extra; i++)
			prompts[p].tok[b->n + i] = (int32_t)(5000 + 50 * p + i);
		prompts[p].n = b->n + extra;
	}
}

/* ---- Thread state --------------------------------------------------------- */

enum tstate { ACTIVE, SWAPPED, PREEMPTED };

/* A sequence as its owner sees it. Between operations every appended
 * position of an ACTIVE or SWAPPED sequence is written for every layer
 * (len is both); a PREEMPTED one has its tokens only. */
struct tseq {
	kv_seq_id id;
	uint32_t salt;
	uint32_t len;
	enum tstate state;
	int32_t tok[MAX_LEN];
	uint64_t ph[MAX_LEN];   /* hash of tok[0..p] */
};

enum op {
	OP_PROMPT, OP_APPEND, OP_READ, OP_REWRITE, OP_FORK, OP_TRUNCATE, OP_ATTENTION,
	OP_INFO, OP_PREEMPT, OP_RESUME, OP_SWAP_OUT, OP_SWAP_IN, OP_FREE, N_OPS
};

static const char *const op_names[N_OPS] = {
	"prompt", "append", "read", "rewrite", "fork", "truncate", "attention",
	"info+admission", "preempt", "resume", "swap_out", "swap_in", "free",
};

struct tally {
	uint64_t ops[N_OPS];
	uint64_t hits, hit_tokens, prompt_tokens, resume_tokens, enomem, attn_pooled;
};

struct run {
	struct kv_cache *c;
	struct kv_registry *reg;
	bool ssd;
	uint32_t iters;          /* operations per worker */
	atomic_bool stop;        /* a thread failed: the others stop too */
	atomic_uint workers_done;
};

struct worker {
	struct run *run;
	uint64_t rng;
	struct tseq seq[MAX_OWN];
	uint32_t n;
	struct tally t;
	char err[512];
	/* Scratch rows: (MAX_LEN, ROW) each. */
	float k[MAX_LEN * ROW], v[MAX_LEN * ROW], rk[MAX_LEN * ROW], rv[MAX_LEN * ROW];
	float q[MAX_OWN * MAX_Q * QH * D], out[MAX_OWN * MAX_Q * QH * D];
};

static void wfail(char *err, size_t len, int line, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));

static void wfail(char *err, size_t len, int line, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (err[0])
		return;
	n = snprintf(err, len, "line %d: ", line);
	va_start(ap, fmt);
	vsnprintf(err + n, len - (size_t)n, fmt, ap);
	va_end(ap);
}

/* Record the first failure of a thread (x: a worker or the cache-wide
 * thread), stop the others, leave the operation. */
#define XCHECK(x, cond, ...)                                                      \
	do {                                                                      \
		if (!(cond)) {                                                    \
			wfail((x)->err, sizeof((x)->err), __LINE__, __VA_ARGS__); \
			atomic_store(&(x)->run->stop, true);                      \
			return false;                                             \
		}                                                                 \
	} while (0)
#define XCALL(x, call, want)                                                         \
	do {                                                                         \
		int xrc_ = (call);                                                   \
		XCHECK(x, xrc_ == (want), "%s returned %d (%s), want %d; detail: %s", \
		       #call, xrc_, kv_strerror(xrc_), (want), kv_last_error());     \
	} while (0)

static uint32_t rnd(uint64_t *rng, uint32_t n)
{
	return (uint32_t)(kv_test_rand(rng) % n);
}

static void set_tokens(struct tseq *s, uint32_t from, const int32_t *tok, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		uint32_t p = from + i;

		s->tok[p] = tok[i];
		s->ph[p] = mix((p ? s->ph[p - 1] : 0x1234567ull) ^ (uint32_t)tok[i]);
	}
}

static void fill(const struct tseq *s, uint32_t layer, uint32_t pos, uint32_t n, float *k,
		 float *v)
{
	for (uint32_t t = 0; t < n; t++)
		for (uint32_t i = 0; i < ROW; i++) {
			k[t * ROW + i] = val(s->salt, s->ph[pos + t], pos + t, layer, i, 0);
			v[t * ROW + i] = val(s->salt, s->ph[pos + t], pos + t, layer, i, 1);
		}
}

/* Read [pos, pos + n) of one layer and compare with the prediction. */
static bool check_layer(struct worker *w, const struct tseq *s, uint32_t layer, uint32_t pos,
			uint32_t n)
{
	struct kv_cache *c = w->run->c;

	if (n == 0)
		return true;
	fill(s, layer, pos, n, w->k, w->v);
	XCALL(w, kv_seq_read(c, s->id, layer, pos, n, w->rk, w->rv), 0);
	for (uint32_t i = 0; i < n * ROW; i++)
		XCHECK(w, w->k[i] == w->rk[i] && w->v[i] == w->rv[i],
		       "seq %#llx (salt %u): layer %u pos %u elem %u reads %g/%g, want %g/%g",
		       (unsigned long long)s->id, s->salt, layer, pos + i / ROW, i % ROW, w->rk[i],
		       w->rv[i], w->k[i], w->v[i]);
	return true;
}

static bool check_all(struct worker *w, const struct tseq *s, uint32_t pos, uint32_t n)
{
	for (uint32_t l = 0; l < L; l++)
		if (!check_layer(w, s, l, pos, n))
			return false;
	return true;
}

/* Write the predicted K/V of [from, to) for every layer, in two pieces
 * taken layer by layer. *rc gets -ENOMEM (a copy on write found no block)
 * and the call returns true; other failures return false. */
static bool write_range(struct worker *w, const struct tseq *s, uint32_t from, uint32_t to,
			int *rc)
{
	struct kv_cache *c = w->run->c;
	uint32_t cut[3] = { from, from + rnd(&w->rng, to - from + 1), to };

	*rc = 0;
	for (int piece = 0; piece < 2; piece++) {
		uint32_t a = cut[piece], n = cut[piece + 1] - a;

		if (n == 0)
			continue;
		for (uint32_t l = 0; l < L; l++) {
			fill(s, l, a, n, w->k, w->v);
			*rc = kv_seq_write(c, s->id, l, a, n, w->k, w->v);
			if (*rc == -ENOMEM)
				return true;
			XCHECK(w, *rc == 0, "kv_seq_write(layer %u, %u, %u) returned %d; detail: %s",
			       l, a, n, *rc, kv_last_error());
		}
	}
	return true;
}

/* ---- Worker operations -------------------------------------------------- */

static bool do_free(struct worker *w, uint32_t i)
{
	XCALL(w, kv_seq_free(w->run->c, w->seq[i].id), 0);
	/* A freed handle is refused, not reused. */
	XCALL(w, kv_seq_append(w->run->c, w->seq[i].id, w->seq[i].tok, 1), -ENOENT);
	w->seq[i] = w->seq[--w->n];
	w->t.ops[OP_FREE]++;
	return true;
}

/* Out of memory: give back one of our sequences other than `keep`. */
static bool relieve(struct worker *w, uint32_t keep)
{
	uint32_t i;

	w->t.enomem++;
	if (w->n == 0 || (w->n == 1 && keep == 0))
		return true;
	do
		i = rnd(&w->rng, w->n);
	while (i == keep);
	return do_free(w, i);
}

/* A random owned sequence in state st, or UINT32_MAX. */
static uint32_t pick(struct worker *w, enum tstate st)
{
	uint32_t i0 = rnd(&w->rng, w->n ? w->n : 1);

	for (uint32_t k = 0; k < w->n; k++) {
		uint32_t i = (i0 + k) % w->n;

		if (w->seq[i].state == st)
			return i;
	}
	return UINT32_MAX;
}

/* After a prompt or a resume put the first *cached tokens' K/V from the
 * prefix cache: check them, compute the rest. */
static bool after_prompt(struct worker *w, struct tseq *s, uint32_t cached)
{
	int rc;

	XCHECK(w, cached % T == 0 && (s->len == 0 ? cached == 0 : cached < s->len),
	       "%u of %u tokens cached", cached, s->len);
	/* Whoever computed these blocks, they hold our values. */
	if (!check_all(w, s, 0, cached))
		return false;
	if (!write_range(w, s, cached, s->len, &rc))
		return false;
	/* Fresh blocks held by this sequence alone need no copy. */
	XCHECK(w, rc == 0, "writing a prompt's own blocks: %d", rc);
	return true;
}

static bool op_prompt(struct worker *w)
{
	struct kv_cache *c = w->run->c;
	const struct prompt *p = &prompts[rnd(&w->rng, N_PROMPTS)];
	struct kv_seq_config sc = { 0 };
	uint32_t cached = UINT32_MAX;
	struct tseq *s;
	int rc;

	if (w->n == MAX_OWN)
		return do_free(w, rnd(&w->rng, w->n));
	s = &w->seq[w->n];
	memset(s, 0, sizeof(*s));
	s->salt = rnd(&w->rng, N_SALTS);
	sc.salt = salts[s->salt];
	sc.salt_len = strlen(salts[s->salt]);
	sc.priority = rnd(&w->rng, KV_CACHE_PRIORITIES);
	XCALL(w, kv_seq_create(c, &sc, &s->id), 0);
	w->n++;
	rc = kv_seq_prompt(c, s->id, p->tok, p->n, &cached);
	if (rc == -ENOMEM)
		return relieve(w, w->n - 1);  /* it stays, empty */
	XCHECK(w, rc == 0, "kv_seq_prompt returned %d; detail: %s", rc, kv_last_error());
	set_tokens(s, 0, p->tok, p->n);
	s->len = p->n;
	w->t.ops[OP_PROMPT]++;
	w->t.prompt_tokens += p->n;
	w->t.hits += cached > 0;
	w->t.hit_tokens += cached;
	return after_prompt(w, s, cached);
}

static bool op_append(struct worker *w, uint32_t i)
{
	struct kv_cache *c = w->run->c;
	struct tseq *s = &w->seq[i];
	uint32_t n = 1 + rnd(&w->rng, 6), old = s->len;
	int32_t tok[6];
	int rc;

	if (old + n > MAX_LEN) {
		XCALL(w, kv_seq_truncate(c, s->id, old / 2), 0);
		s->len = old / 2;
		w->t.ops[OP_TRUNCATE]++;
		return true;
	}
	/* A small alphabet: equal continuations of equal prompts happen. */
	for (uint32_t j = 0; j < n; j++)
		tok[j] = (int32_t)(1000 + rnd(&w->rng, 3));
	rc = kv_seq_append(c, s->id, tok, n);
	if (rc == -ENOMEM)
		return relieve(w, i);
	XCHECK(w, rc == 0, "kv_seq_append returned %d; detail: %s", rc, kv_last_error());
	set_tokens(s, old, tok, n);
	s->len = old + n;
	if (!write_range(w, s, old, old + n, &rc))
		return false;
	if (rc == -ENOMEM) {
		/* A shared tail could not be copied: roll back. */
		XCALL(w, kv_seq_truncate(c, s->id, old), 0);
		s->len = old;
		return relieve(w, i);
	}
	w->t.ops[OP_APPEND]++;
	return true;
}

static bool op_read(struct worker *w, uint32_t i)
{
	const struct tseq *s = &w->seq[i];
	uint32_t pos, n;

	if (s->len == 0)
		return true;
	pos = rnd(&w->rng, s->len);
	n = 1 + rnd(&w->rng, s->len - pos);
	w->t.ops[OP_READ]++;
	return check_layer(w, s, rnd(&w->rng, L), pos, n);
}

/* Write positions again with the same values: a block in the index or
 * shared with a fork is copied first, so nothing reads differently; the
 * chain of the prefix index is broken there (its cached parent then has
 * children in use, the last resort of eviction). */
static bool op_rewrite(struct worker *w, uint32_t i)
{
	struct kv_cache *c = w->run->c;
	const struct tseq *s = &w->seq[i];
	uint32_t pos, n, layer = rnd(&w->rng, L);
	int rc;

	if (s->len == 0)
		return true;
	pos = rnd(&w->rng, s->len);
	n = 1 + rnd(&w->rng, s->len - pos < 6 ? s->len - pos : 6);
	fill(s, layer, pos, n, w->k, w->v);
	rc = kv_seq_write(c, s->id, layer, pos, n, w->k, w->v);
	if (rc == -ENOMEM)
		return relieve(w, i);
	XCHECK(w, rc == 0, "rewrite: kv_seq_write returned %d; detail: %s", rc, kv_last_error());
	w->t.ops[OP_REWRITE]++;
	return check_layer(w, s, layer, pos > 0 ? pos - 1 : 0, n + (pos > 0));
}

static bool op_fork(struct worker *w, uint32_t i)
{
	struct tseq *s, *ch;

	if (w->n == MAX_OWN)
		return do_free(w, (i + 1) % w->n);
	s = &w->seq[i];
	ch = &w->seq[w->n];
	*ch = *s;
	XCALL(w, kv_seq_fork(w->run->c, s->id, &ch->id), 0);
	w->n++;
	w->t.ops[OP_FORK]++;
	return check_layer(w, ch, rnd(&w->rng, L), 0, ch->len);
}

static bool op_truncate(struct worker *w, uint32_t i)
{
	struct tseq *s = &w->seq[i];
	uint32_t len = rnd(&w->rng, s->len + 1);

	XCALL(w, kv_seq_truncate(w->run->c, s->id, len), 0);
	s->len = len;
	w->t.ops[OP_TRUNCATE]++;
	return len ? check_layer(w, s, rnd(&w->rng, L), len - 1, 1) : true;
}

/* Softmax attention of one query head over K/V rows read back (in
 * w->rk, w->rv), in double: what kv_attention must give. */
static void reference(const struct worker *w, const float *q, uint32_t kh, uint32_t p,
		      double *out)
{
	const double scale = 1.0 / sqrt((double)D);
	double sc[MAX_LEN], m = -INFINITY, sum = 0;

	for (uint32_t t = 0; t <= p; t++) {
		double dot = 0;

		for (uint32_t d = 0; d < D; d++)
			dot += (double)q[d] * w->rk[t * ROW + kh * D + d];
		sc[t] = dot * scale;
		m = sc[t] > m ? sc[t] : m;
	}
	for (uint32_t d = 0; d < D; d++)
		out[d] = 0;
	for (uint32_t t = 0; t <= p; t++) {
		double e = exp(sc[t] - m);

		sum += e;
		for (uint32_t d = 0; d < D; d++)
			out[d] += e * w->rv[t * ROW + kh * D + d];
	}
	for (uint32_t d = 0; d < D; d++)
		out[d] /= sum;
}

/* A batch over some of our sequences, decode or a few queries each,
 * against the reference computed from what kv_seq_read returns. */
static bool op_attention(struct worker *w)
{
	struct kv_cache *c = w->run->c;
	uint32_t which[MAX_OWN], nq[MAX_OWN], nb = 0, layer = rnd(&w->rng, L), total = 0, off = 0;
	kv_seq_id ids[MAX_OWN];
	struct kv_attn_batch b;
	size_t bytes = 0;

	for (uint32_t i = 0; i < w->n; i++) {
		const struct tseq *s = &w->seq[i];

		if (s->state != ACTIVE || s->len == 0 || rnd(&w->rng, 5) == 0)
			continue;
		which[nb] = i;
		ids[nb] = s->id;
		nq[nb] = rnd(&w->rng, 2) ? 1 : 1 + rnd(&w->rng, s->len < MAX_Q ? s->len : MAX_Q);
		total += nq[nb];
		bytes += (size_t)s->len * H * 2 * D * sizeof(float);
		nb++;
	}
	if (nb == 0)
		return true;
	for (uint32_t i = 0; i < total * QH * D; i++)
		w->q[i] = (float)rnd(&w->rng, 2001) / 1000.0f - 1.0f;
	memset(&b, 0, sizeof(b));
	b.n_seqs = nb;
	b.seqs = ids;
	b.n_queries = nq;
	b.n_q_heads = QH;
	b.q = w->q;
	b.out = w->out;
	XCALL(w, kv_attention(c, layer, &b), 0);
	w->t.ops[OP_ATTENTION]++;
	w->t.attn_pooled += bytes >= POOLED_BYTES;
	for (uint32_t j = 0; j < nb; j++) {
		const struct tseq *s = &w->seq[which[j]];

		XCALL(w, kv_seq_read(c, s->id, layer, 0, s->len, w->rk, w->rv), 0);
		for (uint32_t qi = 0; qi < nq[j]; qi++) {
			uint32_t p = s->len - nq[j] + qi;

			for (uint32_t h = 0; h < QH; h++) {
				size_t at = ((size_t)(off + qi) * QH + h) * D;
				double ref[D];

				reference(w, w->q + at, h / (QH / H), p, ref);
				for (uint32_t d = 0; d < D; d++)
					XCHECK(w, fabs(w->out[at + d] - ref[d]) <= 1e-3 * (1 + fabs(ref[d])),
					       "attention: seq %u of %u, query at %u, head %u, dim %u: "
					       "%g, reference %g", j, nb, p, h, d, w->out[at + d], ref[d]);
			}
		}
		off += nq[j];
	}
	return true;
}

/* kv_seq_info, kv_seq_tokens and admission for our own sequences. */
static bool op_info(struct worker *w)
{
	struct kv_cache *c = w->run->c;
	uint32_t more[MAX_OWN], need = 0, avail = 0;
	kv_seq_id ids[MAX_OWN];
	int32_t tok[MAX_LEN];
	int rc;

	if (w->n == 0)
		return true;
	for (uint32_t i = 0; i < w->n; i++) {
		const struct tseq *s = &w->seq[i];
		uint32_t written = s->state == PREEMPTED ? 0 : s->len;
		uint32_t blocks = s->state == PREEMPTED ? 0 : (s->len + T - 1) / T;
		struct kv_seq_info info;

		XCALL(w, kv_seq_info(c, s->id, &info), 0);
		XCHECK(w, info.len == s->len && info.written == written &&
				  info.swapped == (s->state == SWAPPED) &&
				  info.preempted == (s->state == PREEMPTED) &&
				  info.blocks == blocks,
		       "kv_seq_info: len %u written %u blocks %u swapped %d preempted %d; want "
		       "%u %u state %d", info.len, info.written, info.blocks, info.swapped,
		       info.preempted, s->len, written, (int)s->state);
		XCALL(w, kv_seq_tokens(c, s->id, 0, s->len, tok), 0);
		XCHECK(w, !memcmp(tok, s->tok, sizeof(int32_t) * s->len), "kv_seq_tokens differ");
		ids[i] = s->id;
		more[i] = rnd(&w->rng, 9);
	}
	rc = kv_cache_can_append(c, ids, more, w->n, &need, &avail);
	XCHECK(w, (rc == 0 || rc == 1) && rc == (need <= avail),
	       "kv_cache_can_append returned %d for %u needed, %u available; detail: %s", rc,
	       need, avail, kv_last_error());
	w->t.ops[OP_INFO]++;
	return true;
}

static bool op_preempt(struct worker *w, uint32_t i)
{
	struct tseq *s = &w->seq[i];
	uint32_t re = UINT32_MAX;
	float k[ROW], v[ROW];

	XCALL(w, kv_seq_preempt(w->run->c, s->id, &re), 0);
	XCHECK(w, re <= s->len && (s->len == 0 || re > 0), "preempt: %u of %u to recompute", re,
	       s->len);
	s->state = PREEMPTED;
	w->t.ops[OP_PREEMPT]++;
	XCALL(w, kv_seq_read(w->run->c, s->id, 0, 0, 1, k, v), -EBUSY);
	return true;
}

static bool op_swap_out(struct worker *w, uint32_t i)
{
	struct tseq *s = &w->seq[i];
	float k[ROW], v[ROW];

	XCALL(w, kv_seq_swap_out(w->run->c, s->id), 0);
	s->state = SWAPPED;
	w->t.ops[OP_SWAP_OUT]++;
	XCALL(w, kv_seq_read(w->run->c, s->id, 0, 0, 1, k, v), -EBUSY);
	return true;
}

/* Bring one sequence that is swapped out or preempted back; -ENOMEM
 * leaves it as it was (*rc says so). */
static bool restore(struct worker *w, struct tseq *s, int *rc)
{
	uint32_t cached = UINT32_MAX;

	if (s->state == SWAPPED) {
		*rc = kv_seq_swap_in(w->run->c, s->id);
		if (*rc == -ENOMEM)
			return true;
		XCHECK(w, *rc == 0, "kv_seq_swap_in returned %d; detail: %s", *rc, kv_last_error());
		s->state = ACTIVE;
		w->t.ops[OP_SWAP_IN]++;
		/* Byte-identical, wherever its blocks went meanwhile. */
		return check_all(w, s, 0, s->len);
	}
	*rc = kv_seq_resume(w->run->c, s->id, &cached);
	if (*rc == -ENOMEM)
		return true;
	XCHECK(w, *rc == 0, "kv_seq_resume returned %d; detail: %s", *rc, kv_last_error());
	s->state = ACTIVE;
	w->t.ops[OP_RESUME]++;
	w->t.resume_tokens += cached;
	return after_prompt(w, s, cached);
}

static bool op_restore(struct worker *w)
{
	uint32_t i = pick(w, rnd(&w->rng, 2) ? SWAPPED : PREEMPTED);
	int rc;

	if (i == UINT32_MAX)
		return true;
	if (!restore(w, &w->seq[i], &rc))
		return false;
	return rc == -ENOMEM ? relieve(w, i) : true;
}

static bool worker_step(struct worker *w)
{
	uint32_t r = rnd(&w->rng, 100), i = pick(w, ACTIVE);

	if (w->n == 0 || r < 12)
		return op_prompt(w);
	if (r < 17)
		return op_restore(w);
	if (i == UINT32_MAX)
		return r < 60 ? op_restore(w) : do_free(w, rnd(&w->rng, w->n));
	if (r < 35)
		return op_append(w, i);
	if (r < 45)
		return op_read(w, i);
	if (r < 51)
		return op_rewrite(w, i);
	if (r < 57)
		return op_fork(w, i);
	if (r < 62)
		return op_truncate(w, i);
	if (r < 76)
		return op_attention(w);
	if (r < 81)
		return op_info(w);
	if (r < 85)
		return op_preempt(w, i);
	if (w->run->ssd && r < 91)
		return op_swap_out(w, i);
	return do_free(w, rnd(&w->rng, w->n));
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;

	for (uint32_t it = 0; it < w->run->iters && !atomic_load(&w->run->stop); it++)
		if (!worker_step(w))
			break;
	atomic_fetch_add(&w->run->workers_done, 1);
	return NULL;
}

/* ---- The cache-wide thread ------------------------------------------------ */

enum wide_op { W_LOOKUP, W_ADMIT, W_STATS, W_PIN, W_UNPIN, W_EVICT, W_REPORT, W_PERSIST, N_WIDE };

static const char *const wide_names[N_WIDE] = {
	"lookup", "can_append", "stats", "pin", "unpin", "evict", "report", "persist",
};

struct wide {
	struct run *run;
	uint64_t rng;
	uint32_t min_ops;
	uint64_t ops[N_WIDE];
	uint64_t lookup_dram_tokens, lookup_ssd_tokens, pinned_tokens, evicted;
	struct { uint32_t base, salt; } pins[MAX_PINS];  /* pins held, a stack */
	uint32_t n_pins;
	FILE *devnull;
	char err[512];
};

static bool stats_sane(struct wide *x, const struct kv_cache_stats *st)
{
	XCHECK(x, st->blocks_used + st->blocks_cached + st->blocks_free == st->blocks_total,
	       "stats: used %u + cached %u + free %u != total %u", st->blocks_used,
	       st->blocks_cached, st->blocks_free, st->blocks_total);
	XCHECK(x, st->blocks_total == CAPACITY && st->blocks_pinned <= CAPACITY &&
			  st->seqs <= WORKERS * MAX_OWN &&
			  st->hit_blocks_dram + st->hit_blocks_ssd <= st->lookup_blocks &&
			  (x->run->ssd || st->blocks_spilled + st->spills + st->loads == 0),
	       "stats: total %u pinned %u seqs %u hits %llu + %llu of %llu, spills %llu",
	       st->blocks_total, st->blocks_pinned, st->seqs,
	       (unsigned long long)st->hit_blocks_dram, (unsigned long long)st->hit_blocks_ssd,
	       (unsigned long long)st->lookup_blocks, (unsigned long long)st->spills);
	return true;
}

static bool wide_step(struct wide *x)
{
	struct kv_cache *c = x->run->c;
	uint32_t r = rnd(&x->rng, 100), b, s, n;
	struct kv_prefix_hit hit;
	struct kv_cache_stats st;
	const struct prompt *p;

	if (r < 25) {
		p = &prompts[rnd(&x->rng, N_PROMPTS)];
		s = rnd(&x->rng, N_SALTS);
		XCALL(x, kv_cache_lookup(c, p->tok, p->n, salts[s], strlen(salts[s]), &hit), 0);
		XCHECK(x, hit.blocks_hashed == p->n / T && hit.dram_tokens % T == 0 &&
				  hit.ssd_tokens % T == 0 &&
				  hit.dram_tokens + hit.ssd_tokens <= hit.blocks_hashed * T &&
				  (x->run->ssd || hit.ssd_tokens == 0),
		       "lookup of %u tokens: dram %u ssd %u of %u blocks", p->n, hit.dram_tokens,
		       hit.ssd_tokens, hit.blocks_hashed);
		x->lookup_dram_tokens += hit.dram_tokens;
		x->lookup_ssd_tokens += hit.ssd_tokens;
		x->ops[W_LOOKUP]++;
	} else if (r < 35) {
		uint32_t need, avail;
		int rc;

		n = 1 + rnd(&x->rng, CAPACITY * T);
		rc = kv_cache_can_append(c, NULL, &n, 1, &need, &avail);
		XCHECK(x, (rc == 0 || rc == 1) && need == (n + T - 1) / T && avail <= CAPACITY &&
				  rc == (need <= avail),
		       "can_append(new, %u): %d, %u needed, %u available", n, rc, need, avail);
		x->ops[W_ADMIT]++;
	} else if (r < 55) {
		kv_cache_stats(c, &st);
		if (!stats_sane(x, &st))
			return false;
		x->ops[W_STATS]++;
	} else if (r < 65 && x->n_pins < MAX_PINS) {
		uint32_t got = UINT32_MAX;

		b = rnd(&x->rng, N_BASES);
		s = rnd(&x->rng, N_SALTS);
		XCALL(x, kv_cache_pin(c, bases[b].tok, bases[b].n, salts[s], strlen(salts[s]), &got),
		      0);
		XCHECK(x, got % T == 0 && got <= bases[b].n, "pin of %u tokens: %u pinned",
		       bases[b].n, got);
		if (got) {
			x->pins[x->n_pins].base = b;
			x->pins[x->n_pins++].salt = s;
			x->pinned_tokens += got;
		}
		x->ops[W_PIN]++;
	} else if (r < 75 && x->n_pins) {
		b = x->pins[--x->n_pins].base;
		s = x->pins[x->n_pins].salt;
		XCALL(x, kv_cache_unpin(c, bases[b].tok, bases[b].n, salts[s], strlen(salts[s])), 0);
		x->ops[W_UNPIN]++;
	} else if (r < 85) {
		n = UINT32_MAX;
		XCALL(x, kv_cache_evict(c, 1 + rnd(&x->rng, 8), &n), 0);
		XCHECK(x, n <= CAPACITY, "evict: %u evicted", n);
		x->evicted += n;
		x->ops[W_EVICT]++;
	} else if (r < 95 || !x->run->ssd) {
		static const unsigned fmt[3] = { KV_REPORT_TEXT, KV_REPORT_JSON, KV_REPORT_PROMETHEUS };

		XCALL(x, kv_report_write(x->run->reg, x->devnull, fmt[rnd(&x->rng, 3)]), 0);
		x->ops[W_REPORT]++;
	} else {
		XCALL(x, kv_cache_persist(c), 0);
		x->ops[W_PERSIST]++;
	}
	return true;
}

static void *wide_main(void *arg)
{
	struct wide *x = arg;
	uint64_t done = 0;

	/* Until the workers are done, and at least min_ops calls. */
	while (!atomic_load(&x->run->stop) &&
	       (atomic_load(&x->run->workers_done) < WORKERS || done < x->min_ops)) {
		if (!wide_step(x))
			break;
		/* Leave the lock to the workers now and then (2 cores). */
		if (++done % 4 == 0)
			usleep(100);
	}
	while (x->n_pins && !x->err[0]) {
		uint32_t b = x->pins[--x->n_pins].base, s = x->pins[x->n_pins].salt;
		int rc = kv_cache_unpin(x->run->c, bases[b].tok, bases[b].n, salts[s],
					strlen(salts[s]));

		if (rc)
			wfail(x->err, sizeof(x->err), __LINE__, "final unpin returned %d: %s", rc,
			      kv_last_error());
	}
	return NULL;
}

/* ---- After the join ------------------------------------------------------- */

/* The first sequence of any worker that is (active) or is not (!active)
 * in state ACTIVE, with its owner in *owner. */
static struct tseq *find_seq(struct worker *w, bool active, struct worker **owner)
{
	for (uint32_t i = 0; i < WORKERS; i++)
		for (uint32_t j = 0; j < w[i].n; j++)
			if ((w[i].seq[j].state == ACTIVE) == active) {
				*owner = &w[i];
				return &w[i].seq[j];
			}
	return NULL;
}

/* Every sequence back in DRAM and checked; -ENOMEM frees checked ones. */
static void restore_all(struct worker *w)
{
	struct worker *o, *vo;
	struct tseq *s, *victim;
	int rc;

	for (uint32_t i = 0; i < WORKERS; i++)
		for (uint32_t j = 0; j < w[i].n; j++)
			if (w[i].seq[j].state == ACTIVE && !check_all(&w[i], &w[i].seq[j], 0,
								      w[i].seq[j].len))
				fail_msg("after the join: %s", w[i].err);
	while ((s = find_seq(w, false, &o)) != NULL) {
		if (!restore(o, s, &rc))
			fail_msg("after the join: %s", o->err);
		if (rc != -ENOMEM)
			continue;
		victim = find_seq(w, true, &vo);
		if (!victim)
			fail_msg("restoring a sequence: -ENOMEM with nothing left to free");
		kv_assert_ok(kv_seq_free(vo->run->c, victim->id));
		*victim = vo->seq[--vo->n];
	}
}

/* The registry's stats sources include the cache's. */
struct source_seen {
	const char *name;
	bool seen;
};

static int visit(void *ctx, const char *source, const struct kv_stat *stats, size_t n, int err)
{
	struct source_seen *ss = ctx;

	(void)stats;
	if (!strcmp(source, ss->name) && err == 0 && n > 0)
		ss->seen = true;
	return 0;
}

static void print_counts(const struct worker *w, const struct wide *x,
			 const struct kv_cache_stats *st, bool ssd)
{
	struct tally sum;

	memset(&sum, 0, sizeof(sum));
	for (uint32_t i = 0; i < WORKERS; i++) {
		for (uint32_t k = 0; k < N_OPS; k++)
			sum.ops[k] += w[i].t.ops[k];
		sum.hits += w[i].t.hits;
		sum.hit_tokens += w[i].t.hit_tokens;
		sum.prompt_tokens += w[i].t.prompt_tokens;
		sum.resume_tokens += w[i].t.resume_tokens;
		sum.enomem += w[i].t.enomem;
		sum.attn_pooled += w[i].t.attn_pooled;
	}
	print_message("  workers:");
	for (uint32_t k = 0; k < N_OPS; k++)
		if (ssd || (k != OP_SWAP_IN && k != OP_SWAP_OUT))
			print_message(" %s %llu", op_names[k], (unsigned long long)sum.ops[k]);
	print_message("\n  prompts hit %llu times (%llu of %llu tokens cached), resumes reused "
		      "%llu tokens, -ENOMEM %llu, attention batches past the pool threshold %llu\n",
		      (unsigned long long)sum.hits, (unsigned long long)sum.hit_tokens,
		      (unsigned long long)sum.prompt_tokens, (unsigned long long)sum.resume_tokens,
		      (unsigned long long)sum.enomem, (unsigned long long)sum.attn_pooled);
	print_message("  cache-wide:");
	for (uint32_t k = 0; k < N_WIDE; k++)
		if (ssd || k != W_PERSIST)
			print_message(" %s %llu", wide_names[k], (unsigned long long)x->ops[k]);
	print_message("\n  lookups found %llu DRAM + %llu SSD tokens, pins held %llu tokens, "
		      "evict freed %llu blocks\n", (unsigned long long)x->lookup_dram_tokens,
		      (unsigned long long)x->lookup_ssd_tokens,
		      (unsigned long long)x->pinned_tokens, (unsigned long long)x->evicted);
	print_message("  cache: hit blocks %llu DRAM + %llu SSD of %llu, dedups %llu, copies "
		      "%llu, evictions %llu, spills %llu, loads %llu, swaps %llu out %llu in\n",
		      (unsigned long long)st->hit_blocks_dram,
		      (unsigned long long)st->hit_blocks_ssd, (unsigned long long)st->lookup_blocks,
		      (unsigned long long)st->dedups, (unsigned long long)st->cow_copies,
		      (unsigned long long)st->evictions, (unsigned long long)st->spills,
		      (unsigned long long)st->loads, (unsigned long long)st->swaps_out,
		      (unsigned long long)st->swaps_in);
}

/* ---- The test ------------------------------------------------------------- */

static uint64_t base_seed(void)
{
	const char *e = getenv("KV_TEST_SEED");

	return e && *e ? strtoull(e, NULL, 0) : 20240611u;
}

static void run_case(bool ssd, uint32_t iters)
{
	struct source_seen ss = { "cache.threads", false };
	struct worker *w = calloc(WORKERS, sizeof(*w));
	struct kv_registry *reg = NULL;
	struct kv_cache_config cfg;
	struct kv_cache_stats st;
	pthread_t tid[WORKERS], wtid;
	uint64_t seed = base_seed(), live = 0, tokens = 0, records = 1;
	char dir[4096] = "", xdg[4096] = "";
	struct wide x;
	struct run run;

	assert_non_null(w);
	make_prompts();
	kv_assert_ok(kv_registry_create(NULL, &reg));
	kv_cache_config_default(&cfg);
	cfg.n_layers = L;
	cfg.n_kv_heads = H;
	cfg.head_dim = D;
	cfg.block_tokens = T;
	cfg.capacity_blocks = CAPACITY;
	cfg.threads = 2;
	cfg.registry = reg;
	cfg.label = "threads";
	if (ssd) {
		kv_test_private_cache(xdg, sizeof(xdg), "cache-threads-xdg");
		kv_test_mkdtemp(dir, sizeof(dir), "cache-threads");
		cfg.spill.dir = dir;
		cfg.model_key = "test-model";
		cfg.spill.sync = KV_STORE_SYNC_NONE;
		cfg.spill.watermark = 0.5;
	}
	memset(&run, 0, sizeof(run));
	kv_assert_ok(kv_cache_create(&cfg, &run.c));
	run.reg = reg;
	run.ssd = ssd;
	run.iters = iters;
	atomic_init(&run.stop, false);
	atomic_init(&run.workers_done, 0);
	memset(&x, 0, sizeof(x));
	x.run = &run;
	x.rng = seed ^ 0xc0ffee;
	x.min_ops = iters / 4;
	x.devnull = fopen("/dev/null", "w");
	assert_non_null(x.devnull);
	for (uint32_t i = 0; i < WORKERS; i++) {
		w[i].run = &run;
		w[i].rng = seed * (i + 1) + (ssd ? 77 : 0);
	}
	print_message("seed %llu (KV_TEST_SEED), %u workers x %u operations, %s\n",
		      (unsigned long long)seed, WORKERS, iters, ssd ? "SSD tier" : "DRAM only");
	for (uint32_t i = 0; i < WORKERS; i++)
		assert_int_equal(pthread_create(&tid[i], NULL, worker_main, &w[i]), 0);
	assert_int_equal(pthread_create(&wtid, NULL, wide_main, &x), 0);
	for (uint32_t i = 0; i < WORKERS; i++)
		pthread_join(tid[i], NULL);
	pthread_join(wtid, NULL);
	fclose(x.devnull);
	for (uint32_t i = 0; i < WORKERS; i++)
		if (w[i].err[0])
			fail_msg("worker %u: %s", i, w[i].err);
	if (x.err[0])
		fail_msg("cache-wide thread: %s", x.err);

	/* Quiescent: every invariant, every value, the counters. */
	kv_assert_ok(kv_cache_validate(run.c));
	kv_cache_stats(run.c, &st);
	print_counts(w, &x, &st, ssd);
	restore_all(w);
	kv_assert_ok(kv_cache_validate(run.c));
	kv_cache_stats(run.c, &st);
	for (uint32_t i = 0; i < WORKERS; i++) {
		live += w[i].n;
		for (uint32_t j = 0; j < w[i].n; j++)
			tokens += w[i].seq[j].len;
	}
	assert_int_equal(st.blocks_used + st.blocks_cached + st.blocks_free, st.blocks_total);
	assert_int_equal(st.seqs, live);
	assert_int_equal(st.seqs_swapped, 0);
	assert_int_equal(st.tokens, tokens);
	assert_int_equal(st.blocks_pinned, 0);
	assert_int_equal(st.spill_errors, 0);
	assert_true(st.hit_blocks_dram + st.hit_blocks_ssd <= st.lookup_blocks);
	assert_int_equal(kv_registry_stats_foreach(reg, visit, &ss), 0);
	assert_true(ss.seen);
	/* A mix that made none of these happen would prove little. */
	assert_true(st.hit_blocks_dram > 0);
	assert_true(st.dedups > 0);
	assert_true(st.cow_copies > 0);
	assert_true(st.evictions > 0);
	assert_true(x.ops[W_PIN] > 0 && x.ops[W_UNPIN] > 0);
	if (ssd) {
		assert_true(st.spills > 0);
		assert_true(st.loads > 0 && st.hit_blocks_ssd > 0);
		assert_true(st.swaps_out > 0 && st.swaps_in > 0);
	} else {
		assert_int_equal(st.hit_blocks_ssd + st.spills + st.loads + st.swaps_out, 0);
	}

	/* Free half of the sequences; destroy with the rest still live. */
	for (uint32_t i = 0; i < WORKERS; i++)
		for (uint32_t j = 0; j < w[i].n; j += 2)
			kv_assert_ok(kv_seq_free(run.c, w[i].seq[j].id));
	kv_assert_ok(kv_cache_validate(run.c));
	kv_cache_stats(run.c, &st);
	assert_int_equal(st.blocks_used + st.blocks_cached + st.blocks_free, st.blocks_total);
	kv_assert_ok(kv_cache_destroy(run.c));
	kv_registry_count(reg, KV_ANY, KV_ANY, KV_ANY, &records);
	assert_int_equal(records, 0);
	kv_assert_ok(kv_registry_destroy(reg, 0));
	if (ssd) {
		kv_test_rmtree(dir);
		kv_test_rmtree(xdg);
	}
	free(w);
}

/* Operations per worker: about a second per case in an optimised build,
 * ten times that under the thread sanitizer. */
#define ITERS 2500u

static void test_threads_dram(void **state)
{
	(void)state;
	run_case(false, ITERS);
}

static void test_threads_ssd(void **state)
{
	(void)state;
	run_case(true, ITERS);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_threads_dram),
		cmocka_unit_test(test_threads_ssd),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
