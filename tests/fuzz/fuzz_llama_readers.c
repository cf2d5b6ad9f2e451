// SPDX-License-Identifier: MIT
/*
 * libFuzzer harness for kv-llama's two file readers (examples/llama).
 * The first input byte picks one:
 *   even: the rest is a checkpoint's start, read by llm_config_parse()
 *         against a file of file_bytes: the little-endian uint64 after the
 *         28 header bytes if there is one, else the input's own length.
 *         A header it accepts must give a tensor index that
 *         kv_tensor_index_validate() accepts for that file, with the ids
 *         llama.h gives, the tensors disjoint, the classifier's chunks
 *         tiling it, the file size llm_config_file_bytes() says, and the
 *         same 28 header bytes back.
 *   odd:  the rest after one more byte is a tokenizer file, read by
 *         llm_tokenizer_parse() for a vocabulary of 1 + p % 600 tokens,
 *         p = byte 1 | (byte 0 >> 1) << 8. A tokenizer it accepts encodes
 *         the input's last 64 bytes into in-range ids (BOS first, EOS
 *         last, at most one per byte plus the dummy prefix), says -ENOSPC
 *         with the same count for a buffer one short, and decodes every
 *         id (each byte read, so ASan checks the bounds) to at most
 *         max_token_length bytes, out-of-range ids to "".
 * Failures must be the documented codes with a detail. Anything else
 * aborts. With KV_FUZZ_SEED_DIR set, valid inputs (the 260K model's header
 * shared and unshared, a small tokenizer) are written there as seeds.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define TEXT_MAX 64
#define VOCAB_MOD 600

#define CHECK(cond)                                                            \
	do {                                                                   \
		if (!(cond)) {                                                 \
			fprintf(stderr, "fuzz_llama_readers: %s:%d: %s failed; " \
				"detail: %s\n", __FILE__, __LINE__, #cond,       \
				kv_last_error());                              \
			abort();                                               \
		}                                                              \
	} while (0)

static uint64_t le(const uint8_t *p, int n)
{
	uint64_t v = 0;

	for (int i = n - 1; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static void put_le(uint8_t *p, uint64_t v, int n)
{
	for (int i = 0; i < n; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static int cmp_offset(const void *pa, const void *pb)
{
	const struct kv_tensor_info *a = pa, *b = pb;

	return (a->offset > b->offset) - (a->offset < b->offset);
}

static bool same_config(const struct llm_config *a, const struct llm_config *b)
{
	return a->dim == b->dim && a->hidden_dim == b->hidden_dim && a->n_layers == b->n_layers &&
	       a->n_heads == b->n_heads && a->n_kv_heads == b->n_kv_heads &&
	       a->vocab_size == b->vocab_size && a->seq_len == b->seq_len &&
	       a->shared_classifier == b->shared_classifier && a->head_size == b->head_size &&
	       a->kv_dim == b->kv_dim;
}

static void fuzz_config(const uint8_t *buf, size_t n)
{
	uint64_t file_bytes = n >= LLM_HEADER_BYTES + 8 ? le(buf + LLM_HEADER_BYTES, 8) : n, fb;
	union {
		struct llm_config cfg;
		uint8_t bytes[sizeof(struct llm_config)];
	} out;
	struct llm_config cfg, again;
	struct kv_tensor_index *idx = NULL;
	struct kv_tensor_info *tensors, cls;
	uint8_t hdr[LLM_HEADER_BYTES];
	uint32_t count, plain, chunks;
	int rc;

	memset(out.bytes, 0xa5, sizeof(out.bytes));
	rc = llm_config_parse(buf, n, file_bytes, &out.cfg);
	if (rc) {
		CHECK(rc == -EINVAL || rc == -EOVERFLOW || rc == -EFBIG || rc == -EBADMSG);
		CHECK(kv_last_error()[0] != '\0');
		for (size_t i = 0; i < sizeof(out.bytes); i++)
			CHECK(out.bytes[i] == 0xa5);
		return;
	}
	cfg = again = out.cfg;
	CHECK(llm_config_check(&again) == 0 && same_config(&again, &cfg));
	CHECK(llm_config_file_bytes(&cfg, &fb) == 0 && fb == file_bytes);
	llm_config_header(&cfg, hdr);
	CHECK(!memcmp(hdr, buf, LLM_HEADER_BYTES));
	CHECK(llm_tensor_index_build(&cfg, &idx) == 0);
	CHECK(kv_tensor_index_validate(idx, file_bytes) == 0);
	/* The tensors, then the classifier's row chunks (views into it). */
	count = kv_tensor_index_count(idx);
	plain = 2 + cfg.n_layers * LLM_T_PER_LAYER + !cfg.shared_classifier;
	chunks = llm_cls_chunks(&cfg);
	CHECK(chunks >= 1 && count == plain + chunks);
	CHECK(llm_tensor_norm(&cfg) == plain - 1 - !cfg.shared_classifier);
	CHECK(llm_tensor_cls(&cfg) < plain && llm_tensor_cls_chunk(&cfg, 0) == plain);
	tensors = malloc(count * sizeof(*tensors));
	CHECK(tensors);
	for (uint32_t i = 0; i < count; i++)
		CHECK(kv_tensor_index_get(idx, i, &tensors[i]) == 0);
	cls = tensors[llm_tensor_cls(&cfg)];
	for (uint32_t k = 0, at = 0; k < chunks; k++) {
		const struct kv_tensor_info *ck = &tensors[llm_tensor_cls_chunk(&cfg, k)];

		CHECK(ck->n_dims >= 1 && ck->shape[ck->n_dims - 1] == cfg.dim);
		CHECK(ck->offset == cls.offset + (uint64_t)at * cfg.dim * 4);
		at += (uint32_t)(ck->bytes / (cfg.dim * 4ull));
		CHECK(k + 1 < chunks || at == cfg.vocab_size);
	}
	qsort(tensors, plain, sizeof(*tensors), cmp_offset);
	CHECK(tensors[0].offset >= LLM_HEADER_BYTES);
	for (uint32_t i = 0; i + 1 < plain; i++)
		CHECK(tensors[i].offset + tensors[i].bytes <= tensors[i + 1].offset);
	free(tensors);
	kv_tensor_index_destroy(idx);
}

static void fuzz_tokenizer(uint32_t vocab, const uint8_t *buf, size_t n, const uint8_t *end)
{
	int32_t ids[TEXT_MAX + 3];
	struct llm_tokenizer *t = NULL;
	char text[TEXT_MAX + 1];
	uint32_t count = 0, need = 0;
	size_t text_len = 0, len;
	int64_t max_len;
	int rc;

	rc = llm_tokenizer_parse(buf, n, vocab, &t);
	if (rc) {
		CHECK(rc == -EBADMSG || rc == -EINVAL);
		CHECK(kv_last_error()[0] != '\0');
		CHECK(t == NULL);
		return;
	}
	CHECK(n >= 4 && llm_tokenizer_vocab(t) == vocab);
	max_len = (int32_t)le(buf, 4);
	/* The input's tail: the file's last pieces, so some of it matches;
	 * NULs made spaces, as the text is a C string. */
	while (text_len < TEXT_MAX && end - text_len > buf) {
		uint8_t b = *(end - 1 - text_len);

		text[text_len++] = b ? (char)b : ' ';
	}
	text[text_len] = '\0';
	CHECK(llm_tokenizer_encode(t, text, true, true, ids, TEXT_MAX + 3, &count) == 0);
	CHECK(count >= 2 && count <= text_len + 3);
	CHECK(ids[0] == LLM_BOS && ids[count - 1] == LLM_EOS);
	for (uint32_t i = 0; i < count; i++)
		CHECK(ids[i] >= 0 && (uint32_t)ids[i] < vocab);
	CHECK(llm_tokenizer_encode(t, text, true, true, ids, count - 1, &need) == -ENOSPC);
	CHECK(need == count);
	for (int32_t id = 0; id < (int32_t)vocab; id++) {
		for (int k = 0; k < 2; k++) {
			const char *p = llm_tokenizer_decode(t, k ? LLM_BOS : id - 1, id, &len);
			volatile uint8_t sink = 0;

			CHECK(p && (int64_t)len <= (max_len > 1 ? max_len : 1));
			for (size_t i = 0; i < len; i++)
				sink ^= (uint8_t)p[i];
			(void)sink;
		}
	}
	CHECK(llm_tokenizer_decode(t, 0, -1, &len)[0] == '\0' && len == 0);
	CHECK(llm_tokenizer_decode(t, 0, (int32_t)vocab, &len)[0] == '\0' && len == 0);
	CHECK(llm_tokenizer_decode(t, 0, INT32_MIN, &len)[0] == '\0' && len == 0);
	llm_tokenizer_free(t);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	uint32_t p;

	if (size < 1)
		return 0;
	if (!(data[0] & 1)) {
		fuzz_config(data + 1, size - 1);
		return 0;
	}
	if (size < 2)
		return 0;
	p = data[1] | (uint32_t)(data[0] >> 1) << 8;
	fuzz_tokenizer(1 + p % VOCAB_MOD, data + 2, size - 2, data + size);
	return 0;
}

/* ---- seeds ------------------------------------------------------------ */

static void spit(const char *dir, const char *name, const void *p, size_t n)
{
	char path[512];
	FILE *fp;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fp = fopen(path, "wb");
	CHECK(fp);
	CHECK(fwrite(p, 1, n, fp) == n);
	CHECK(fclose(fp) == 0);
}

static void seed_config(const char *dir, const char *name, bool shared)
{
	uint8_t in[1 + LLM_HEADER_BYTES + 8] = { 0 };
	struct llm_config cfg;
	uint64_t bytes;

	CHECK(llm_synthetic_config("260K", &cfg) == 0);
	cfg.shared_classifier = shared;
	CHECK(llm_config_file_bytes(&cfg, &bytes) == 0);
	llm_config_header(&cfg, in + 1);
	put_le(in + 1 + LLM_HEADER_BYTES, bytes, 8);
	spit(dir, name, in, sizeof(in));
}

static size_t add_piece(uint8_t *out, size_t off, const char *s, float score)
{
	uint32_t bits, n = (uint32_t)strlen(s);

	memcpy(&bits, &score, 4);
	put_le(out + off, bits, 4);
	put_le(out + off + 4, n, 4);
	memcpy(out + off + 8, s, n);
	return off + 8 + n;
}

/* llama2.c's specials, the byte tokens and a few scored merges. */
static void seed_tokenizer(const char *dir)
{
	static const char *const merges[] = {
		" ", "a", "b", "ab", " ab", "c", "abc", " h", "he", "l", "ll", "o", "llo",
		"hello", " hello", "\xc3\xa9", "h", "e",
	};
	static uint8_t in[2 + 4 + 300 * 24];
	uint32_t vocab = 0;
	size_t off = 6;
	char s[8];

	put_le(in + 2, 8, 4);
	off = add_piece(in, off, "<unk>", 0);
	off = add_piece(in, off, "\n<s>\n", 0);
	off = add_piece(in, off, "\n</s>\n", 0);
	for (int b = 0; b < 256; b++) {
		snprintf(s, sizeof(s), "<0x%02X>", b);
		off = add_piece(in, off, s, 0);
	}
	vocab = 259;
	for (size_t i = 0; i < sizeof(merges) / sizeof(merges[0]); i++, vocab++)
		off = add_piece(in, off, merges[i], -(float)(sizeof(merges) / sizeof(merges[0]) - i));
	in[0] = (uint8_t)(1 | ((vocab - 1) >> 8) << 1);
	in[1] = (uint8_t)(vocab - 1);
	spit(dir, "llama-tokenizer", in, off);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	const char *dir = getenv("KV_FUZZ_SEED_DIR");

	(void)argc;
	(void)argv;
	if (dir) {
		seed_config(dir, "llama-config-260k", true);
		seed_config(dir, "llama-config-260k-unshared", false);
		seed_tokenizer(dir);
	}
	return 0;
}
