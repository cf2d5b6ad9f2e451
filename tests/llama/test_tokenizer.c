/* SPDX-License-Identifier: MIT */
/*
 * The tokenizer: a llama2.c tokenizer file built here, encodings derived
 * by hand, encode against a plain transcription of run.c's encode() on a
 * random vocabulary, decode(encode(s)) == s for ASCII, UTF-8 in and out of
 * the vocabulary and random bytes, the byte tokenizer, -ENOSPC, and
 * damaged files: every truncation, bad lengths, vocabulary mismatches,
 * random corruption, missing files.
 */
#include <errno.h>
#include <math.h>
#include <string.h>
#include <sys/stat.h>

#include "kvtest.h"
#include "llama.h"

/* ---- tokenizer files -------------------------------------------------- */

struct tf_piece {
	char s[16];
	uint32_t len;
	float score;
};

/* A tokenizer file being built, and its pieces for the reference. */
struct tokfile {
	uint8_t buf[16384];
	size_t len;
	uint32_t count;
	struct tf_piece pieces[600];
};

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void tf_add(struct tokfile *f, const char *s, uint32_t n, float score)
{
	uint32_t bits;

	assert_true(f->len + 8 + n <= sizeof(f->buf) && f->count < 600 && n < 16);
	memcpy(&bits, &score, 4);
	put32(f->buf + f->len, bits);
	put32(f->buf + f->len + 4, n);
	memcpy(f->buf + f->len + 8, s, n);
	f->len += 8 + n;
	memcpy(f->pieces[f->count].s, s, n);
	f->pieces[f->count].len = n;
	f->pieces[f->count].score = score;
	f->count++;
}

static void tf_str(struct tokfile *f, const char *s, float score)
{
	tf_add(f, s, (uint32_t)strlen(s), score);
}

/* max_token_length, then the three specials (as llama2.c's
 * tokenizer.py writes them) and the 256 byte tokens, score 0. */
static void tf_base(struct tokfile *f, uint32_t max_len)
{
	char s[8];

	memset(f, 0, sizeof(*f));
	put32(f->buf, max_len);
	f->len = 4;
	tf_str(f, "<unk>", 0);
	tf_str(f, "\n<s>\n", 0);
	tf_str(f, "\n</s>\n", 0);
	for (int b = 0; b < 256; b++) {
		snprintf(s, sizeof(s), "<0x%02X>", b);
		tf_str(f, s, 0);
	}
}

/* Ids of the hand-made vocabulary. */
enum {
	SP = 259, A, B, AB, SP_AB, C, ABC, SP_H, HE, HELLO, SP_HELLO, E_ACUTE, L, O, H, E,
	LL, LLO, BA, LOWER_HEX, NOT_HEX, BAD_HEX, CC, CA, N_PIECES
};

/* Scores chosen so that the order of merges is known: "he" before "ll"
 * before "llo" before "hello" before " hello"; " ab" above "abc" above
 * "ab"; "ab" and "ba" tie. Single characters never form by merging. */
static const struct {
	int id;
	const char *s;
	float score;
} hand[] = {
	{ SP, " ", -100 },
	{ A, "a", -100 },
	{ B, "b", -100 },
	{ AB, "ab", -5 },
	{ SP_AB, " ab", -3 },
	{ C, "c", -100 },
	{ ABC, "abc", -4 },
	{ SP_H, " h", -6 },
	{ HE, "he", -2 },
	{ HELLO, "hello", -1 },
	{ SP_HELLO, " hello", -0.5f },
	{ E_ACUTE, "\xc3\xa9", -100 },
	{ L, "l", -100 },
	{ O, "o", -100 },
	{ H, "h", -100 },
	{ E, "e", -100 },
	{ LL, "ll", -7 },
	{ LLO, "llo", -8 },
	{ BA, "ba", -5 },
	{ LOWER_HEX, "<0xab>", -100 },  /* lower-case hex: still a byte */
	{ NOT_HEX, "<0x41>!", -100 },   /* not exactly <0xXX>: itself */
	{ BAD_HEX, "<0x4G>", -100 },    /* not hex: itself */
	{ CC, "cc", -1e10f },           /* run.c never merges at or below -1e10 */
	{ CA, "ca", NAN },              /* nor at NaN */
};

static void tf_hand(struct tokfile *f)
{
	tf_base(f, 8);
	for (size_t i = 0; i < sizeof(hand) / sizeof(hand[0]); i++) {
		assert_int_equal(f->count, hand[i].id);
		tf_str(f, hand[i].s, hand[i].score);
	}
	assert_int_equal(f->count, N_PIECES);
}

static struct llm_tokenizer *tf_parse(const struct tokfile *f)
{
	struct llm_tokenizer *t = NULL;

	kv_assert_ok(llm_tokenizer_parse(f->buf, f->len, f->count, &t));
	assert_int_equal(llm_tokenizer_vocab(t), f->count);
	return t;
}

/* What a failed call must leave in its out-parameter. */
static char sentinel_obj;
#define SENTINEL ((struct llm_tokenizer *)&sentinel_obj)

static void spit(const char *path, const void *p, size_t n)
{
	FILE *fp = fopen(path, "wb");

	assert_non_null(fp);
	assert_true(n == 0 || fwrite(p, 1, n, fp) == n);
	assert_int_equal(fclose(fp), 0);
}

static void want_detail(const char *word)
{
	if (!strstr(kv_last_error(), word))
		fail_msg("detail '%s' lacks '%s'", kv_last_error(), word);
}

/* ---- encode and decode helpers ---------------------------------------- */

#define MAXTOK 4096

static uint32_t enc(const struct llm_tokenizer *t, const char *s, bool bos, bool eos,
		    int32_t *out)
{
	uint32_t n = 0;

	kv_assert_ok(llm_tokenizer_encode(t, s, bos, eos, out, MAXTOK, &n));
	for (uint32_t i = 0; i < n; i++)
		assert_true(out[i] >= 0 && (uint32_t)out[i] < llm_tokenizer_vocab(t));
	return n;
}

/* The bytes of ids[0..n) decoded in order, each after its predecessor
 * (the first after `prev`), into out; returns their count. */
static size_t dec(const struct llm_tokenizer *t, int32_t prev, const int32_t *ids, uint32_t n,
		  char *out, size_t cap)
{
	size_t len = 0;

	for (uint32_t i = 0; i < n; i++) {
		size_t k = 99;
		const char *p = llm_tokenizer_decode(t, i ? ids[i - 1] : prev, ids[i], &k);

		assert_non_null(p);
		assert_true(len + k < cap);
		memcpy(out + len, p, k);
		len += k;
	}
	out[len] = '\0';
	return len;
}

#define assert_ids(t, s, bos, eos, ...)                                                  \
	do {                                                                              \
		const int32_t want_[] = { __VA_ARGS__ };                                  \
		int32_t got_[MAXTOK];                                                     \
		uint32_t n_ = enc(t, s, bos, eos, got_);                                  \
		if (n_ != sizeof(want_) / sizeof(want_[0]) ||                             \
		    memcmp(got_, want_, sizeof(want_)))                                   \
			fail_msg("encode('%s'): %u tokens, first %d; want %zu, first %d", \
				 s, n_, n_ ? got_[0] : -1,                                \
				 sizeof(want_) / sizeof(want_[0]), want_[0]);             \
	} while (0)

/* Byte fallback id of byte b. */
#define BY(b) (3 + (b))

/* BOS, text, EOS: decoding drops the dummy prefix's space after BOS, so
 * the text comes back; without BOS it comes back after that space. */
static void round_trip(const struct llm_tokenizer *t, const char *s, size_t slen)
{
	static int32_t ids[MAXTOK];
	static char back[4 * MAXTOK];
	uint32_t n = enc(t, s, true, true, ids);
	size_t len;

	assert_int_equal(ids[0], LLM_BOS);
	assert_int_equal(ids[n - 1], LLM_EOS);
	len = dec(t, LLM_BOS, ids + 1, n - 2, back, sizeof(back));
	if (len != slen || memcmp(back, s, slen))
		fail_msg("round trip of %zu bytes '%s' gave %zu bytes '%s'", slen, s, len, back);
	n = enc(t, s, false, false, ids);
	len = dec(t, -1, ids, n, back, sizeof(back));
	assert_int_equal(len, slen + (slen > 0));
	if (slen) {
		assert_int_equal(back[0], ' ');
		assert_memory_equal(back + 1, s, slen);
	}
}

/* ---- hand-derived encodings ------------------------------------------- */

static void test_encode_known(void **state)
{
	struct tokfile *f = malloc(sizeof(*f));
	struct llm_tokenizer *t;
	int32_t ids[8];
	uint32_t n = 99;

	(void)state;
	tf_hand(f);
	t = tf_parse(f);
	/* Empty text: no dummy prefix. */
	kv_assert_ok(llm_tokenizer_encode(t, "", false, false, ids, 8, &n));
	assert_int_equal(n, 0);
	assert_ids(t, "", true, true, LLM_BOS, LLM_EOS);
	assert_ids(t, "a", false, false, SP, A);
	/* " "+a, b -> ab -> " ab". */
	assert_ids(t, "ab", true, false, LLM_BOS, SP_AB);
	/* ab (-5), then " ab" (-3) beats "abc" (-4). */
	assert_ids(t, "abc", false, true, SP_AB, C, LLM_EOS);
	/* With no " ab" in reach, "abc" forms: the stray bytes 80 80 are one
	 * group (a byte and its continuation) with no piece. */
	assert_ids(t, "\x80\x80" "abc", false, false, SP, BY(0x80), BY(0x80), ABC);
	/* "ab" and "ba" tie at -5: the first pair merges. */
	assert_ids(t, "aba", false, false, SP_AB, A);
	/* he, ll, llo, hello, " hello". */
	assert_ids(t, "hello", true, true, LLM_BOS, SP_HELLO, LLM_EOS);
	assert_ids(t, " hello", false, false, SP, SP_HELLO);
	assert_ids(t, "h", false, false, SP_H);
	/* he (-2) beats " h" (-6); " he" is no piece. */
	assert_ids(t, "he", false, false, SP, HE);
	/* A code point in the vocabulary, then the same followed by a. */
	assert_ids(t, "\xc3\xa9", false, false, SP, E_ACUTE);
	assert_ids(t, "h\xc3\xa9", false, false, SP_H, E_ACUTE);
	/* Not in the vocabulary: its bytes. */
	assert_ids(t, "\xe2\x82\xac", false, false, SP, BY(0xe2), BY(0x82), BY(0xac)); /* € */
	assert_ids(t, "\xf0\x9f\x98\x80", false, false, SP, BY(0xf0), BY(0x9f), BY(0x98),
		   BY(0x80)); /* U+1F600 */
	/* A group stops at four bytes: c3 a9 a9 a9 has no piece, a9 alone. */
	assert_ids(t, "\xc3\xa9\xa9\xa9\xa9", false, false, SP, BY(0xc3), BY(0xa9), BY(0xa9),
		   BY(0xa9), BY(0xa9));
	assert_ids(t, "cc", false, false, SP, C, C);
	assert_ids(t, "ca", false, false, SP, C, A);
	/* Never merged with BOS, and the byte pieces never merge as text. */
	assert_ids(t, "<", true, false, LLM_BOS, SP, BY('<'));
	llm_tokenizer_free(t);
	free(f);
}

/* decode(prev, id) gives exactly the n bytes of want. */
static void want_decode(const struct llm_tokenizer *t, int32_t prev, int32_t id,
			const char *want, size_t n)
{
	size_t len = 99;
	const char *p = llm_tokenizer_decode(t, prev, id, &len);

	assert_non_null(p);
	if (len != n || memcmp(p, want, n))
		fail_msg("decode(%d, %d): %zu bytes '%.*s', want %zu '%s'", prev, id, len,
			 (int)len, p, n, want);
}
#define DECODES(t, prev, id, lit) want_decode(t, prev, id, lit, sizeof(lit) - 1)

static void test_decode(void **state)
{
	struct tokfile *f = malloc(sizeof(*f));
	struct llm_tokenizer *t;

	(void)state;
	tf_hand(f);
	t = tf_parse(f);
	DECODES(t, LLM_BOS, SP_HELLO, "hello");
	DECODES(t, SP, SP_HELLO, " hello");
	DECODES(t, LLM_BOS, SP, "");
	DECODES(t, A, BY(0xe2), "\xe2");
	DECODES(t, LLM_BOS, BY(0), "\0");
	DECODES(t, A, LOWER_HEX, "\xab");
	DECODES(t, A, NOT_HEX, "<0x41>!");
	DECODES(t, A, BAD_HEX, "<0x4G>");
	DECODES(t, A, LLM_BOS, "\n<s>\n");
	/* Out of range. */
	DECODES(t, A, -2, "");
	DECODES(t, A, -1, "");
	DECODES(t, A, N_PIECES, "");
	DECODES(t, A, INT32_MAX, "");
	DECODES(NULL, A, A, "");
	llm_tokenizer_free(t);
	free(f);
}

static void test_round_trips(void **state)
{
	static const char *const fixed[] = {
		"", "a", "hello", "hello hello", " hello", "  leading spaces", "trailing ",
		"abcabc ab ba aba", "h\xc3\xa9llo", "\xc3\xa9\xc3\xa9",
		"\xe2\x82\xac 5", "\xf0\x9f\x98\x80!", "\xe4\xb8\xad\xe6\x96\x87",
		"<0x41> <0xab>", "tab\there\nnewline", "\xc3", "\xa9\xa9", "\xff\xfe",
		"\xf0\x9f\x98", "\xc3\xa9\xa9\xa9\xa9\xa9",
	};
	static const char *const alphabet[] = {
		" ", "a", "b", "c", "h", "e", "l", "o", "\xc3\xa9", "\xe2\x82\xac",
		"\xf0\x9f\x98\x80", "<", "0x", ">", "\xc3", "\x80",
	};
	struct tokfile *f = malloc(sizeof(*f));
	struct llm_tokenizer *t;
	uint64_t rng = 42;
	char s[512];

	(void)state;
	tf_hand(f);
	t = tf_parse(f);
	for (size_t i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++)
		round_trip(t, fixed[i], strlen(fixed[i]));
	/* Strings of the vocabulary's pieces and stray bytes. */
	for (int iter = 0; iter < 2000; iter++) {
		size_t len = 0, parts = kv_test_rand(&rng) % 40;

		for (size_t k = 0; k < parts; k++) {
			const char *a = alphabet[kv_test_rand(&rng) % (sizeof(alphabet) /
								       sizeof(alphabet[0]))];

			memcpy(s + len, a, strlen(a));
			len += strlen(a);
		}
		s[len] = '\0';
		round_trip(t, s, len);
	}
	/* Random bytes, mostly invalid UTF-8. */
	for (int iter = 0; iter < 2000; iter++) {
		size_t len = kv_test_rand(&rng) % 300;

		for (size_t k = 0; k < len; k++)
			s[k] = (char)(1 + kv_test_rand(&rng) % 255);
		s[len] = '\0';
		round_trip(t, s, len);
	}
	llm_tokenizer_free(t);
	free(f);
}

/* ---- against run.c ---------------------------------------------------- */

/* run.c's lookup (linear here; the lowest id on duplicates). */
static int ref_lookup(const struct tokfile *f, const char *s, size_t n)
{
	for (uint32_t i = 0; i < f->count; i++)
		if (f->pieces[i].len == n && !memcmp(f->pieces[i].s, s, n))
			return (int)i;
	return -1;
}

/* run.c's encode() without BOS and EOS: the dummy prefix, code points or
 * bytes, then merge the best pair (first on ties) until none is left. */
static uint32_t ref_encode(const struct tokfile *f, const char *text, int32_t *tok)
{
	size_t len = strlen(text);
	uint32_t n = 0;
	char buf[64];

	if (len)
		tok[n++] = ref_lookup(f, " ", 1);
	for (size_t i = 0; i < len;) {
		size_t j = i + 1;
		int id;

		while (j < len && j - i < 4 && ((uint8_t)text[j] & 0xc0) == 0x80)
			j++;
		id = ref_lookup(f, text + i, j - i);
		if (id >= 0)
			tok[n++] = id;
		else
			for (size_t k = i; k < j; k++)
				tok[n++] = 3 + (uint8_t)text[k];
		i = j;
	}
	for (;;) {
		float best = -1e10f;
		int best_id = -1;
		uint32_t at = 0;

		for (uint32_t i = 0; i + 1 < n; i++) {
			const struct tf_piece *a = &f->pieces[tok[i]], *b = &f->pieces[tok[i + 1]];
			int id;

			memcpy(buf, a->s, a->len);
			memcpy(buf + a->len, b->s, b->len);
			id = ref_lookup(f, buf, a->len + b->len);
			if (id >= 0 && f->pieces[id].score > best) {
				best = f->pieces[id].score;
				best_id = id;
				at = i;
			}
		}
		if (best_id < 0)
			break;
		tok[at] = best_id;
		memmove(tok + at + 1, tok + at + 2, (n - at - 2) * sizeof(*tok));
		n--;
	}
	return n;
}

/* Random pieces over a small alphabet with few distinct scores, so that
 * merges chain and tie often; some duplicates, some never reachable. */
static void test_against_run_c(void **state)
{
	static const char letters[] = " abc\xc3\xa9";
	struct tokfile *f = malloc(sizeof(*f));
	struct llm_tokenizer *t;
	static int32_t got[MAXTOK], want[MAXTOK];
	uint64_t rng = 7;
	char s[200];

	(void)state;
	for (int vocab_iter = 0; vocab_iter < 8; vocab_iter++) {
		tf_base(f, 6);
		tf_str(f, " ", -50);
		while (f->count < 259 + 120) {
			char p[7];
			uint32_t n = 1 + (uint32_t)(kv_test_rand(&rng) % 6);

			for (uint32_t k = 0; k < n; k++)
				p[k] = letters[kv_test_rand(&rng) % (sizeof(letters) - 1)];
			tf_add(f, p, n, -(float)(kv_test_rand(&rng) % 5));
		}
		t = tf_parse(f);
		for (int iter = 0; iter < 500; iter++) {
			size_t len = kv_test_rand(&rng) % 120;
			uint32_t n, m;

			for (size_t k = 0; k < len; k++)
				s[k] = letters[kv_test_rand(&rng) % (sizeof(letters) - 1)];
			s[len] = '\0';
			n = enc(t, s, false, false, got);
			m = ref_encode(f, s, want);
			if (n != m || memcmp(got, want, n * sizeof(*got)))
				fail_msg("vocab %d, '%s': %u tokens, run.c %u", vocab_iter, s, n, m);
			n = enc(t, s, true, true, got);
			assert_int_equal(n, m + 2);
			assert_memory_equal(got + 1, want, m * sizeof(*got));
		}
		llm_tokenizer_free(t);
	}
	free(f);
}

/* ---- the byte tokenizer ----------------------------------------------- */

static void test_bytes(void **state)
{
	struct llm_tokenizer *t = SENTINEL, *u = NULL;
	static int32_t ids[MAXTOK];
	uint64_t rng = 3;
	char s[600], back[600];
	uint32_t n;
	size_t len;

	(void)state;
	kv_assert_rc(llm_tokenizer_bytes(258, &t), -EINVAL);
	assert_ptr_equal(t, SENTINEL);
	want_detail("258");
	kv_assert_rc(llm_tokenizer_bytes(0, &t), -EINVAL);
	kv_assert_rc(llm_tokenizer_bytes(512, NULL), -EINVAL);
	kv_assert_ok(llm_tokenizer_bytes(259, &t));
	assert_int_equal(llm_tokenizer_vocab(t), 259);
	llm_tokenizer_free(t);
	kv_assert_ok(llm_tokenizer_bytes(512, &t));
	kv_assert_ok(llm_tokenizer_bytes(512, &u));
	/* No dummy prefix, no merges. */
	assert_ids(t, "", true, true, LLM_BOS, LLM_EOS);
	assert_ids(t, "hi", true, false, LLM_BOS, BY('h'), BY('i'));
	assert_ids(t, "\xc3\xa9", false, true, BY(0xc3), BY(0xa9), LLM_EOS);
	assert_string_equal(llm_tokenizer_decode(t, 0, 0, &len), "<unk>");
	assert_string_equal(llm_tokenizer_decode(t, 0, LLM_BOS, &len), "<s>");
	assert_string_equal(llm_tokenizer_decode(t, 0, LLM_EOS, &len), "</s>");
	/* Arbitrary bytes come back. */
	for (int iter = 0; iter < 500; iter++) {
		len = kv_test_rand(&rng) % 500;
		for (size_t k = 0; k < len; k++)
			s[k] = (char)(1 + kv_test_rand(&rng) % 255);
		s[len] = '\0';
		n = enc(t, s, true, false, ids);
		assert_int_equal(n, len + 1);
		for (uint32_t i = 1; i < n; i++)
			assert_true(ids[i] >= 3 && ids[i] < 259);
		assert_int_equal(dec(t, LLM_BOS, ids + 1, n - 1, back, sizeof(back)), len);
		assert_memory_equal(back, s, len);
	}
	/* Ids from 259: words after a space (none after BOS), the same in
	 * every tokenizer. */
	for (int32_t id = 259; id < 512; id++) {
		size_t k, k2;
		const char *w = llm_tokenizer_decode(t, 0, id, &k);

		assert_true(k >= 3 && k <= 7);
		assert_int_equal(w[0], ' ');
		for (size_t i = 1; i < k; i++)
			assert_true(w[i] >= 'a' && w[i] <= 'z');
		assert_memory_equal(llm_tokenizer_decode(u, 0, id, &k2), w, k);
		assert_int_equal(k2, k);
		assert_memory_equal(llm_tokenizer_decode(t, LLM_BOS, id, &k2), w + 1, k - 1);
		assert_int_equal(k2, k - 1);
	}
	assert_string_equal(llm_tokenizer_decode(t, 0, 512, &len), "");
	llm_tokenizer_free(u);
	llm_tokenizer_free(t);
}

/* ---- errors ----------------------------------------------------------- */

static void test_enospc(void **state)
{
	struct tokfile *f = malloc(sizeof(*f));
	struct llm_tokenizer *t;
	int32_t ids[4] = { -7, -7, -7, -7 };
	uint32_t n = 0;

	(void)state;
	tf_hand(f);
	t = tf_parse(f);
	/* BOS " hello" EOS: three. */
	kv_assert_rc(llm_tokenizer_encode(t, "hello", true, true, ids, 2, &n), -ENOSPC);
	assert_int_equal(n, 3);
	want_detail("3 tokens");
	assert_int_equal(ids[0], -7);
	n = 0;
	kv_assert_rc(llm_tokenizer_encode(t, "hello", true, true, NULL, 0, &n), -ENOSPC);
	assert_int_equal(n, 3);
	kv_assert_ok(llm_tokenizer_encode(t, "hello", true, true, ids, 3, &n));
	assert_int_equal(n, 3);
	assert_int_equal(ids[3], -7);
	/* 1 dummy + 4 bytes of an emoji, unmerged. */
	kv_assert_rc(llm_tokenizer_encode(t, "\xf0\x9f\x98\x80", false, false, ids, 4, &n),
		     -ENOSPC);
	assert_int_equal(n, 5);
	kv_assert_ok(llm_tokenizer_encode(t, "", false, false, NULL, 0, &n));
	assert_int_equal(n, 0);
	kv_assert_rc(llm_tokenizer_encode(NULL, "a", false, false, ids, 4, &n), -EINVAL);
	kv_assert_rc(llm_tokenizer_encode(t, NULL, false, false, ids, 4, &n), -EINVAL);
	kv_assert_rc(llm_tokenizer_encode(t, "a", false, false, ids, 4, NULL), -EINVAL);
	kv_assert_rc(llm_tokenizer_encode(t, "a", false, false, NULL, 4, &n), -EINVAL);
	llm_tokenizer_free(t);
	free(f);
}

/* Offsets of each record in a file, for the boundary checks. */
static bool at_record_start(const struct tokfile *f, size_t off, uint32_t *index)
{
	size_t o = 4;

	for (uint32_t i = 0; i <= f->count; i++) {
		if (o == off) {
			*index = i;
			return true;
		}
		if (i < f->count)
			o += 8 + f->pieces[i].len;
	}
	return false;
}

static void test_truncated(void **state)
{
	struct tokfile *f = malloc(sizeof(*f));
	struct llm_tokenizer *t;
	char dir[256], path[300], want[64];
	uint32_t index;

	(void)state;
	tf_hand(f);
	kv_test_mkdtemp(dir, sizeof(dir), "tok-trunc");
	snprintf(path, sizeof(path), "%s/tokenizer.bin", dir);
	for (size_t cut = 0; cut < f->len; cut++) {
		int rc;

		t = SENTINEL;
		rc = llm_tokenizer_parse(f->buf, cut, f->count, &t);
		assert_ptr_equal(t, SENTINEL);
		if (at_record_start(f, cut, &index) && cut >= 4) {
			/* Whole records, too few of them. */
			if (rc != -EINVAL)
				fail_msg("cut at %zu (record %u): %d, want -EINVAL", cut, index, rc);
			snprintf(want, sizeof(want), "has %u tokens, the model %u", index, f->count);
			want_detail(want);
		} else if (rc != -EBADMSG) {
			fail_msg("cut at %zu: %d (%s), want -EBADMSG", cut, rc, kv_last_error());
		}
		/* The file reader says the same with the path, at a stride. */
		if (cut % 61 == 0 || cut < 12) {
			spit(path, f->buf, cut);
			kv_assert_rc(llm_tokenizer_load(path, f->count, &t), rc);
			assert_ptr_equal(t, SENTINEL);
			want_detail(path);
		}
	}
	spit(path, f->buf, f->len);
	kv_assert_ok(llm_tokenizer_load(path, f->count, &t));
	llm_tokenizer_free(t);
	kv_test_rmtree(dir);
	free(f);
}

/* The length field of record i. */
static uint8_t *length_of(struct tokfile *f, uint32_t index)
{
	size_t o = 4;

	for (uint32_t i = 0; i < index; i++)
		o += 8 + f->pieces[i].len;
	return f->buf + o + 4;
}

static void test_bad_files(void **state)
{
	struct tokfile *f = malloc(sizeof(*f)), *g = malloc(sizeof(*g));
	struct llm_tokenizer *t = SENTINEL;
	char dir[256], path[300], want[400];

	(void)state;
#define BAD(call, rc, word)                                                              \
	do {                                                                              \
		t = SENTINEL;                                                             \
		kv_assert_rc(call, rc);                                                   \
		assert_ptr_equal(t, SENTINEL);                                            \
		want_detail(word);                                                        \
	} while (0)
	tf_hand(f);
	/* A negative length, a length above max_token_length (8), a length
	 * past the end. */
	*g = *f;
	put32(length_of(g, 17), (uint32_t)-1);
	BAD(llm_tokenizer_parse(g->buf, g->len, g->count, &t), -EBADMSG, "token 17: length -1");
	*g = *f;
	put32(length_of(g, 17), 9);
	BAD(llm_tokenizer_parse(g->buf, g->len, g->count, &t), -EBADMSG,
	    "token 17: length 9 above max_token_length 8");
	*g = *f;
	put32(g->buf, 4);
	BAD(llm_tokenizer_parse(g->buf, g->len, g->count, &t), -EBADMSG,
	    "token 0: length 5 above max_token_length 4");
	*g = *f;
	put32(g->buf, (uint32_t)-3);
	BAD(llm_tokenizer_parse(g->buf, g->len, g->count, &t), -EBADMSG, "max_token_length -3");
	*g = *f;
	put32(g->buf, UINT32_MAX >> 1);
	put32(length_of(g, N_PIECES - 1), 0x7fffffff);
	BAD(llm_tokenizer_parse(g->buf, g->len, g->count, &t), -EBADMSG, "record truncated");
	/* The model's vocabulary against the file's, both ways. */
	snprintf(want, sizeof(want), "tokenizer has %u tokens, the model %u", N_PIECES,
		 N_PIECES + 1);
	BAD(llm_tokenizer_parse(f->buf, f->len, f->count + 1, &t), -EINVAL, want);
	snprintf(want, sizeof(want), "has %u tokens, the model %u", N_PIECES, N_PIECES - 1);
	BAD(llm_tokenizer_parse(f->buf, f->len, f->count - 1, &t), -EINVAL, want);
	*g = *f;
	tf_str(g, "zz", -1);
	tf_str(g, "zzz", -1);
	snprintf(want, sizeof(want), "has %u tokens, the model %u", N_PIECES + 2, N_PIECES);
	BAD(llm_tokenizer_parse(g->buf, g->len, f->count, &t), -EINVAL, want);
	/* Bytes after the last record that are no record. */
	*g = *f;
	g->len += 3;
	snprintf(want, sizeof(want), "token %u: record truncated: 3 of its 8 bytes", N_PIECES);
	BAD(llm_tokenizer_parse(g->buf, g->len, f->count, &t), -EBADMSG, want);
	BAD(llm_tokenizer_parse(f->buf, f->len, 258, &t), -EINVAL, "vocab_size 258 below 259");
	BAD(llm_tokenizer_parse(f->buf, f->len, 0, &t), -EINVAL, "vocab_size 0");
	BAD(llm_tokenizer_parse(f->buf, 0, f->count, &t), -EBADMSG, "0 bytes");
	BAD(llm_tokenizer_parse(NULL, 0, f->count, &t), -EBADMSG, "0 bytes");
	BAD(llm_tokenizer_parse(NULL, 8, f->count, &t), -EINVAL, "NULL");
	kv_assert_rc(llm_tokenizer_parse(f->buf, f->len, f->count, NULL), -EINVAL);

	/* Files: missing, a directory, empty, a mismatch with the path. */
	kv_test_mkdtemp(dir, sizeof(dir), "tok-bad");
	snprintf(path, sizeof(path), "%s/missing.bin", dir);
	BAD(llm_tokenizer_load(path, f->count, &t), -ENOENT, path);
	BAD(llm_tokenizer_load(dir, f->count, &t), -EINVAL, "not a regular file");
	snprintf(path, sizeof(path), "%s/empty.bin", dir);
	spit(path, "", 0);
	BAD(llm_tokenizer_load(path, f->count, &t), -EBADMSG, path);
	snprintf(path, sizeof(path), "%s/tokenizer.bin", dir);
	spit(path, f->buf, f->len);
	snprintf(want, sizeof(want), "tokenizer '%s' has %u tokens, the model 512", path,
		 N_PIECES);
	BAD(llm_tokenizer_load(path, 512, &t), -EINVAL, want);
	BAD(llm_tokenizer_load(path, 100, &t), -EINVAL, "below 259");
	BAD(llm_tokenizer_load(NULL, 512, &t), -EINVAL, "NULL");
	kv_assert_rc(llm_tokenizer_load(path, f->count, NULL), -EINVAL);
	kv_test_rmtree(dir);
#undef BAD
	free(g);
	free(f);
}

/* Random byte flips of a valid file: each parse fails cleanly or gives a
 * tokenizer whose encodings stay in range and whose decodes are readable
 * (ASan checks the reads). */
static void test_corrupted(void **state)
{
	struct tokfile *f = malloc(sizeof(*f)), *g = malloc(sizeof(*g));
	static int32_t ids[MAXTOK];
	uint64_t rng = 11;
	unsigned ok = 0;

	(void)state;
	tf_hand(f);
	for (int iter = 0; iter < 3000; iter++) {
		struct llm_tokenizer *t = NULL;
		int flips = 1 + (int)(kv_test_rand(&rng) % 4), rc;
		char text[64];

		*g = *f;
		for (int k = 0; k < flips; k++)
			g->buf[kv_test_rand(&rng) % g->len] ^= (uint8_t)(1 + kv_test_rand(&rng) % 255);
		rc = llm_tokenizer_parse(g->buf, g->len, g->count, &t);
		if (rc) {
			assert_true(rc == -EBADMSG || rc == -EINVAL);
			assert_null(t);
			continue;
		}
		ok++;
		/* Text from the bytes of the file's last pieces, so that
		 * some of them match. */
		for (size_t k = 0; k < sizeof(text) - 1; k++) {
			uint8_t b = g->buf[g->len - 1 - kv_test_rand(&rng) % 200];

			text[k] = (char)(b ? b : 'a');
		}
		text[sizeof(text) - 1] = '\0';
		(void)enc(t, text, true, true, ids);
		for (int32_t id = -1; id <= (int32_t)g->count; id++) {
			size_t len;
			const char *p = llm_tokenizer_decode(t, LLM_BOS, id, &len);
			volatile char sink = 0;

			for (size_t k = 0; k < len; k++)
				sink ^= p[k];
			(void)sink;
		}
		llm_tokenizer_free(t);
	}
	/* Most flips land in scores and piece bytes, which stay valid. */
	assert_true(ok > 500);
	free(g);
	free(f);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_encode_known),
		cmocka_unit_test(test_decode),
		cmocka_unit_test(test_round_trips),
		cmocka_unit_test(test_against_run_c),
		cmocka_unit_test(test_bytes),
		cmocka_unit_test(test_enospc),
		cmocka_unit_test(test_truncated),
		cmocka_unit_test(test_bad_files),
		cmocka_unit_test(test_corrupted),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
