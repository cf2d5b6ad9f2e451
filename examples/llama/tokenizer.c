// SPDX-License-Identifier: MIT
/*
 * The tokenizer: llama2.c's file of scored pieces (tokenizer.bin), walked
 * and checked in file order by walk(), and a byte-level stand-in for
 * models without a file (llm_tokenizer_bytes()). Encoding is run.c's
 * encode(): code points looked up as pieces, byte fallback, then greedy
 * merges of the best-scoring adjacent pair. Here the candidate pairs sit
 * in a heap, so n bytes of text cost O(n log n log V) where run.c rescans
 * every pair after each merge; each lookup is a binary search of the
 * pieces sorted by their bytes. Where run.c is loose this file decides:
 * BOS never takes part in a merge, a missing " " piece makes the dummy
 * prefix a byte token (run.c would write id -1), a piece found twice is
 * the lower id, and only a piece of exactly "<0xXX>" decodes to a byte.
 * A tokenizer is read-only once made: any number of threads may encode
 * and decode with it.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "llama.h"
#include "taxonomy/kv-private.h"

/* <unk>, <s>, </s>, then the 256 byte tokens: byte fallback writes id
 * 3 + b, so a smaller vocabulary would make encode() emit ids the model
 * does not have. */
#define TOK_BYTE0 3
#define TOK_MIN_VOCAB (TOK_BYTE0 + 256u)
/* Real tokenizer files are tens of MB at most; this only stops a wrong
 * path from being read into memory whole. */
#define TOK_MAX_FILE (1ull << 30)
/* Keeps heap and node indices (3 per byte) within 32 bits. */
#define TOK_MAX_TEXT (1u << 30)
#define NONE UINT32_MAX

struct piece {
	const char *s;  /* len bytes and a NUL, in pool */
	uint32_t len;
	float score;
};

struct sorted_piece {
	const char *s;
	uint32_t len;
	int32_t id;
};

struct llm_tokenizer {
	uint32_t vocab;
	uint32_t max_len;              /* bytes of the longest piece allowed */
	bool bytes_only;               /* llm_tokenizer_bytes(): no prefix, no merges */
	struct piece *pieces;          /* (vocab) */
	struct sorted_piece *sorted;   /* (vocab) by bytes, then id; NULL if bytes_only */
	char *pool;                    /* every piece's bytes, each NUL-terminated */
	size_t pool_used;
	char byte_str[256][2];         /* what <0xXX> decodes to: the byte and a NUL */
};

static uint32_t rd32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* The memcmp order of piece s (n bytes) against the concatenation a|b. */
static int cmp_concat(const char *s, size_t n, const char *a, size_t an, const char *b, size_t bn)
{
	size_t k = n < an ? n : an;
	int c = memcmp(s, a, k);

	if (c || n < an)
		return c ? c : -1;
	s += an;
	n -= an;
	k = n < bn ? n : bn;
	c = memcmp(s, b, k);
	if (c)
		return c;
	return (n > bn) - (n < bn);
}

static int cmp_sorted(const void *pa, const void *pb)
{
	const struct sorted_piece *a = pa, *b = pb;
	int c = cmp_concat(a->s, a->len, b->s, b->len, "", 0);

	return c ? c : (a->id > b->id) - (a->id < b->id);
}

/* The lowest id whose piece is a|b (bn may be 0), or -1. */
static int32_t lookup(const struct llm_tokenizer *t, const char *a, size_t an, const char *b,
		      size_t bn)
{
	size_t lo = 0, hi = t->vocab;

	if (an + bn > t->max_len)
		return -1;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (cmp_concat(t->sorted[mid].s, t->sorted[mid].len, a, an, b, bn) < 0)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo < t->vocab && cmp_concat(t->sorted[lo].s, t->sorted[lo].len, a, an, b, bn) == 0)
		return t->sorted[lo].id;
	return -1;
}

static struct llm_tokenizer *tok_alloc(uint32_t vocab, size_t pool_bytes)
{
	struct llm_tokenizer *t = calloc(1, sizeof(*t));

	if (!t)
		return NULL;
	t->vocab = vocab;
	t->pieces = calloc(vocab, sizeof(*t->pieces));
	t->pool = malloc(pool_bytes ? pool_bytes : 1);
	if (!t->pieces || !t->pool) {
		llm_tokenizer_free(t);
		return NULL;
	}
	for (int b = 0; b < 256; b++) {
		t->byte_str[b][0] = (char)b;
		t->byte_str[b][1] = '\0';
	}
	return t;
}

/* Piece id gets n bytes from s, copied into the pool (sized by the caller). */
static void put_piece(struct llm_tokenizer *t, uint32_t id, const void *s, uint32_t n, float score)
{
	char *dst = t->pool + t->pool_used;

	if (n)
		memcpy(dst, s, n);
	dst[n] = '\0';
	t->pieces[id] = (struct piece){ .s = dst, .len = n, .score = score };
	t->pool_used += (size_t)n + 1;
	if (n > t->max_len)
		t->max_len = n;
}

/* The file in order: int32 max_token_length, then per token float32
 * score, int32 length, the bytes. Without t, it checks every record and
 * counts them (all the way to the end, so a vocabulary mismatch can say
 * how many the file holds) and the pool bytes they need; with t (sized by
 * that first pass, so nothing here can fail) it fills t's pieces. */
static int walk(const char *who, const uint8_t *buf, size_t len, struct llm_tokenizer *t,
		uint64_t *count, size_t *pool_bytes)
{
	size_t off = 4, pool = 0;
	uint64_t i;
	int32_t max;

	if (len < 4)
		return kv_fail(EBADMSG, "%s: %zu bytes, shorter than its 4-byte max_token_length", who,
			       len);
	max = (int32_t)rd32(buf);
	if (max < 0)
		return kv_fail(EBADMSG, "%s: max_token_length %" PRId32 " is negative", who, max);
	for (i = 0; off < len; i++) {
		size_t left = len - off;
		uint32_t bits;
		int32_t n;
		float score;

		if (left < 8)
			return kv_fail(EBADMSG, "%s: token %" PRIu64 ": record truncated: %zu of "
				       "its 8 bytes of score and length", who, i, left);
		n = (int32_t)rd32(buf + off + 4);
		if (n < 0)
			return kv_fail(EBADMSG, "%s: token %" PRIu64 ": length %" PRId32 " is negative",
				       who, i, n);
		if (n > max)
			return kv_fail(EBADMSG, "%s: token %" PRIu64 ": length %" PRId32
				       " above max_token_length %" PRId32, who, i, n, max);
		if ((size_t)n > left - 8)
			return kv_fail(EBADMSG, "%s: token %" PRIu64 ": record truncated: length %"
				       PRId32 ", %zu bytes left", who, i, n, left - 8);
		if (t) {
			bits = rd32(buf + off);
			memcpy(&score, &bits, sizeof(score));
			put_piece(t, (uint32_t)i, buf + off + 8, (uint32_t)n, score);
		}
		pool += (size_t)n + 1;
		off += 8 + (size_t)n;
	}
	*count = i;
	*pool_bytes = pool;
	return 0;
}

static int check_vocab(const char *who, uint32_t vocab)
{
	if (vocab < TOK_MIN_VOCAB)
		return kv_fail(EINVAL, "%s: vocab_size %" PRIu32 " below %u (3 special tokens "
			       "and 256 byte tokens)", who, vocab, TOK_MIN_VOCAB);
	if (vocab > INT32_MAX)
		return kv_fail(EINVAL, "%s: vocab_size %" PRIu32 " above %d (ids are int32)", who,
			       vocab, INT32_MAX);
	return 0;
}

static int parse(const char *who, const void *buf, size_t len, uint32_t vocab,
		 struct llm_tokenizer **out)
{
	struct llm_tokenizer *t;
	size_t pool_bytes;
	uint64_t count;
	int rc;

	if ((rc = check_vocab(who, vocab)))
		return rc;
	if ((rc = walk(who, buf, len, NULL, &count, &pool_bytes)))
		return rc;
	if (count != vocab)
		return kv_fail(EINVAL, "%s has %" PRIu64 " tokens, the model %" PRIu32, who, count,
			       vocab);
	t = tok_alloc(vocab, pool_bytes);
	if (t)
		t->sorted = malloc((size_t)vocab * sizeof(*t->sorted));
	if (!t || !t->sorted) {
		llm_tokenizer_free(t);
		return kv_fail(ENOMEM, "%s: no memory for %" PRIu32 " tokens", who, vocab);
	}
	/* Cannot fail: the first pass checked every record. */
	walk(who, buf, len, t, &count, &pool_bytes);
	for (uint32_t i = 0; i < vocab; i++)
		t->sorted[i] = (struct sorted_piece){ t->pieces[i].s, t->pieces[i].len, (int32_t)i };
	qsort(t->sorted, vocab, sizeof(*t->sorted), cmp_sorted);
	*out = t;
	return 0;
}

int llm_tokenizer_parse(const void *buf, size_t len, uint32_t vocab_size,
			struct llm_tokenizer **out)
{
	if ((!buf && len) || !out)
		return kv_fail(EINVAL, "llm_tokenizer_parse: NULL argument");
	return parse("tokenizer", buf ? buf : "", len, vocab_size, out);
}

int llm_tokenizer_load(const char *path, uint32_t vocab_size, struct llm_tokenizer **out)
{
	char who[KV_DETAIL_MAX];
	struct stat st;
	uint8_t *buf = NULL;
	size_t got = 0;
	int fd, rc;

	if (!path || !out)
		return kv_fail(EINVAL, "llm_tokenizer_load: NULL argument");
	snprintf(who, sizeof(who), "tokenizer '%s'", path);
	if ((rc = check_vocab(who, vocab_size)))
		return rc;
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		rc = errno;
		return kv_fail(rc, "%s: open: %s", who, strerror(rc));
	}
	if (fstat(fd, &st) < 0) {
		rc = errno;
		rc = kv_fail(rc, "%s: fstat: %s", who, strerror(rc));
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = kv_fail(EINVAL, "%s: not a regular file", who);
		goto out;
	}
	if ((uint64_t)st.st_size > TOK_MAX_FILE) {
		rc = kv_fail(EFBIG, "%s: %" PRIu64 " bytes, more than a tokenizer file may have "
			     "(1 GiB)", who, (uint64_t)st.st_size);
		goto out;
	}
	buf = malloc(st.st_size ? (size_t)st.st_size : 1);
	if (!buf) {
		rc = kv_fail(ENOMEM, "%s: no memory for its %" PRIu64 " bytes", who,
			     (uint64_t)st.st_size);
		goto out;
	}
	/* A file that shrinks meanwhile is parsed as what was read. */
	while (got < (size_t)st.st_size) {
		ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			rc = errno;
			rc = kv_fail(rc, "%s: read: %s", who, strerror(rc));
			goto out;
		}
		if (n == 0)
			break;
		got += (size_t)n;
	}
	rc = parse(who, buf, got, vocab_size, out);
out:
	free(buf);
	close(fd);
	return rc;
}

/* A made-up word for id: a space, then one to three consonant-vowel
 * syllables chosen by a hash of the id. Returns its length (at most 7). */
static uint32_t syllables(uint32_t id, char out[8])
{
	static const char cons[] = "bdfghklmnprstvyz", vow[] = "aeiou";
	uint64_t h = id * 0x9e3779b97f4a7c15ull;
	uint32_t n = 1, k;

	h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
	h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
	h ^= h >> 31;
	k = 1 + (uint32_t)(h % 7) / 3; /* 1, 2 or 3 syllables, short ones likelier */
	h /= 7;
	out[0] = ' ';
	for (uint32_t i = 0; i < k; i++) {
		out[n++] = cons[h % (sizeof(cons) - 1)];
		h /= sizeof(cons) - 1;
		out[n++] = vow[h % (sizeof(vow) - 1)];
		h /= sizeof(vow) - 1;
	}
	return n;
}

int llm_tokenizer_bytes(uint32_t vocab_size, struct llm_tokenizer **out)
{
	static const char *const special[TOK_BYTE0] = { "<unk>", "<s>", "</s>" };
	struct llm_tokenizer *t;
	size_t pool_bytes;
	char s[8];
	int rc;

	if (!out)
		return kv_fail(EINVAL, "llm_tokenizer_bytes: NULL argument");
	if ((rc = check_vocab("byte tokenizer", vocab_size)))
		return rc;
	/* Specials under 8 bytes, "<0xXX>" 7 with its NUL, words 8. */
	pool_bytes = (size_t)vocab_size * 8;
	t = tok_alloc(vocab_size, pool_bytes);
	if (!t)
		return kv_fail(ENOMEM, "byte tokenizer: no memory for %" PRIu32 " tokens", vocab_size);
	t->bytes_only = true;
	for (uint32_t i = 0; i < TOK_BYTE0; i++)
		put_piece(t, i, special[i], (uint32_t)strlen(special[i]), 0);
	for (uint32_t b = 0; b < 256; b++) {
		snprintf(s, sizeof(s), "<0x%02X>", b);
		put_piece(t, TOK_BYTE0 + b, s, 6, 0);
	}
	for (uint32_t i = TOK_MIN_VOCAB; i < vocab_size; i++) {
		uint32_t n = syllables(i, s);

		put_piece(t, i, s, n, 0);
	}
	*out = t;
	return 0;
}

void llm_tokenizer_free(struct llm_tokenizer *t)
{
	if (!t)
		return;
	free(t->sorted);
	free(t->pieces);
	free(t->pool);
	free(t);
}

uint32_t llm_tokenizer_vocab(const struct llm_tokenizer *t)
{
	return t ? t->vocab : 0;
}

/* ---- Encoding --------------------------------------------------------- */

/* A token of the text being merged: a doubly linked list over an array,
 * in text order; merging keeps the left node and unlinks the right one. */
struct node {
	int32_t tok;    /* -1 once merged into its left neighbour */
	uint32_t prev, next;
};

/* A candidate merge: nodes left and right while they still hold ltok and
 * rtok (checked when popped; stale entries are skipped). */
struct pair {
	float score;
	uint32_t left, right;
	int32_t ltok, rtok, id;
};

/* run.c takes the best score, the first pair on ties; node indices grow
 * left to right, so "first" is the lower left index. */
static bool pair_before(const struct pair *a, const struct pair *b)
{
	return a->score > b->score || (a->score == b->score && a->left < b->left);
}

static void heap_push(struct pair *h, uint32_t *n, struct pair p)
{
	uint32_t i = (*n)++;

	while (i > 0 && pair_before(&p, &h[(i - 1) / 2])) {
		h[i] = h[(i - 1) / 2];
		i = (i - 1) / 2;
	}
	h[i] = p;
}

static struct pair heap_pop(struct pair *h, uint32_t *n)
{
	struct pair top = h[0], last = h[--(*n)];
	uint32_t i = 0;

	for (;;) {
		uint32_t c = 2 * i + 1;

		if (c >= *n)
			break;
		if (c + 1 < *n && pair_before(&h[c + 1], &h[c]))
			c++;
		if (!pair_before(&h[c], &last))
			break;
		h[i] = h[c];
		i = c;
	}
	if (*n)
		h[i] = last;
	return top;
}

/* Queue the merge of node l with its right neighbour if their pieces
 * concatenate to a piece. run.c starts its search at -1e10 and takes
 * only strictly better scores, so no score at or below that (nor NaN)
 * ever merges. */
static void push_pair(const struct llm_tokenizer *t, const struct node *nodes, uint32_t l,
		      struct pair *heap, uint32_t *hn)
{
	uint32_t r = nodes[l].next;
	const struct piece *a, *b;
	int32_t id;

	if (r == NONE)
		return;
	a = &t->pieces[nodes[l].tok];
	b = &t->pieces[nodes[r].tok];
	id = lookup(t, a->s, a->len, b->s, b->len);
	if (id < 0 || !(t->pieces[id].score > -1e10f))
		return;
	heap_push(heap, hn, (struct pair){ t->pieces[id].score, l, r, nodes[l].tok,
					   nodes[r].tok, id });
}

/* Append the tokens of one code point (or stray bytes) s: its piece, or
 * one byte token per byte. */
static uint32_t emit(const struct llm_tokenizer *t, const char *s, size_t n, struct node *nodes,
		     uint32_t k)
{
	int32_t id = lookup(t, s, n, "", 0);

	if (id >= 0) {
		nodes[k++].tok = id;
		return k;
	}
	for (size_t i = 0; i < n; i++)
		nodes[k++].tok = TOK_BYTE0 + (uint8_t)s[i];
	return k;
}

/* Tokens of text (len > 0) into nodes (len + 1 of them), merged; returns
 * the head's count of tokens. Errors: -ENOMEM. */
static int merge_text(const struct llm_tokenizer *t, const char *text, size_t len,
		      struct node *nodes, uint32_t *count)
{
	/* Every merge pushes at most two pairs after the first n - 1. */
	struct pair *heap = malloc(3 * (len + 1) * sizeof(*heap));
	uint32_t k, hn = 0, live;

	if (!heap)
		return -ENOMEM;
	/* sentencepiece's add_dummy_prefix: the text starts with a space. */
	k = emit(t, " ", 1, nodes, 0);
	/* run.c's split: a byte and the continuation bytes after it, at most
	 * four in all, so invalid UTF-8 still falls back to bytes. */
	for (size_t i = 0; i < len;) {
		size_t j = i + 1;

		while (j < len && j - i < 4 && ((uint8_t)text[j] & 0xc0) == 0x80)
			j++;
		k = emit(t, text + i, j - i, nodes, k);
		i = j;
	}
	for (uint32_t i = 0; i < k; i++) {
		nodes[i].prev = i ? i - 1 : NONE;
		nodes[i].next = i + 1 < k ? i + 1 : NONE;
	}
	for (uint32_t i = 0; i + 1 < k; i++)
		push_pair(t, nodes, i, heap, &hn);
	live = k;
	while (hn) {
		struct pair p = heap_pop(heap, &hn);
		struct node *l = &nodes[p.left];

		if (l->tok != p.ltok || l->next != p.right || nodes[p.right].tok != p.rtok)
			continue;
		l->tok = p.id;
		l->next = nodes[p.right].next;
		if (l->next != NONE)
			nodes[l->next].prev = p.left;
		nodes[p.right].tok = -1;
		live--;
		if (l->prev != NONE)
			push_pair(t, nodes, l->prev, heap, &hn);
		push_pair(t, nodes, p.left, heap, &hn);
	}
	free(heap);
	*count = live;
	return 0;
}

int llm_tokenizer_encode(const struct llm_tokenizer *t, const char *text, bool bos, bool eos,
			 int32_t *tokens, uint32_t max, uint32_t *n)
{
	struct node *nodes = NULL;
	uint32_t count, need, k = 0;
	size_t len;

	if (!t || !text || !n || (!tokens && max))
		return kv_fail(EINVAL, "llm_tokenizer_encode: NULL argument");
	len = strlen(text);
	if (len > TOK_MAX_TEXT)
		return kv_fail(EINVAL, "tokenizer: a text of %zu bytes, more than one encode "
			       "takes (1 GiB)", len);
	if (t->bytes_only || len == 0) {
		count = (uint32_t)len;
	} else {
		nodes = malloc((len + 1) * sizeof(*nodes));
		if (!nodes || merge_text(t, text, len, nodes, &count)) {
			free(nodes);
			return kv_fail(ENOMEM, "tokenizer: no memory to encode %zu bytes", len);
		}
	}
	need = (uint32_t)bos + count + (uint32_t)eos;
	if (need > max) {
		free(nodes);
		*n = need;
		return kv_fail(ENOSPC, "tokenizer: the text takes %" PRIu32 " tokens, the buffer "
			       "holds %" PRIu32, need, max);
	}
	if (bos)
		tokens[k++] = LLM_BOS;
	if (nodes) {
		for (uint32_t i = 0; i != NONE; i = nodes[i].next)
			tokens[k++] = nodes[i].tok;
	} else {
		for (size_t i = 0; i < len; i++)
			tokens[k++] = TOK_BYTE0 + (uint8_t)text[i];
	}
	if (eos)
		tokens[k++] = LLM_EOS;
	free(nodes);
	*n = k;
	return 0;
}

/* ---- Decoding --------------------------------------------------------- */

static int hex(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

const char *llm_tokenizer_decode(const struct llm_tokenizer *t, int32_t prev, int32_t token,
				 size_t *len)
{
	const char *s;
	size_t n;
	int hi, lo;

	if (!t || token < 0 || (uint32_t)token >= t->vocab) {
		if (len)
			*len = 0;
		return "";
	}
	s = t->pieces[token].s;
	n = t->pieces[token].len;
	/* sentencepiece drops the dummy prefix's space after BOS. */
	if (prev == LLM_BOS && n && s[0] == ' ')
		s++, n--;
	/* Byte tokens, "<0xXX>" exactly (run.c's sscanf would also take a
	 * piece that only starts so). */
	if (n == 6 && !memcmp(s, "<0x", 3) && s[5] == '>' && (hi = hex(s[3])) >= 0 &&
	    (lo = hex(s[4])) >= 0) {
		s = t->byte_str[hi * 16 + lo];
		n = 1;
	}
	if (len)
		*len = n;
	return s;
}
