// SPDX-License-Identifier: MIT
/*
 * Built-in synthetic models: the shapes of llama2.c's TinyStories models
 * and of TinyLlama 1.1B, with deterministic seeded weights, written once
 * as real checkpoint files in a cache directory so that the mmap and
 * streaming paths read a file like the user's own.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "llama.h"
#include "taxonomy/kv-private.h"

static const struct {
	const char *name;
	uint32_t v[7]; /* header order */
} shapes[] = {
	{ "260K", { 64, 172, 5, 8, 4, 512, 512 } },
	{ "15M", { 288, 768, 6, 6, 6, 32000, 256 } },
	{ "110M", { 768, 2048, 12, 12, 12, 32000, 1024 } },
	{ "1B", { 2048, 5632, 22, 32, 4, 32000, 2048 } },
};

int llm_synthetic_config(const char *name, struct llm_config *out)
{
	for (size_t i = 0; name && i < sizeof(shapes) / sizeof(shapes[0]); i++) {
		const uint32_t *v = shapes[i].v;
		struct llm_config c = {
			.dim = v[0], .hidden_dim = v[1], .n_layers = v[2], .n_heads = v[3],
			.n_kv_heads = v[4], .vocab_size = v[5], .seq_len = v[6],
			.shared_classifier = true,
		};

		if (strcasecmp(name, shapes[i].name))
			continue;
		int rc = llm_config_check(&c);
		if (rc)
			return rc;
		*out = c;
		return 0;
	}
	return kv_fail(-ENOENT, "no synthetic model '%s' (known: 260K, 15M, 110M, 1B)",
		       name ? name : "(null)");
}

void llm_cache_dir(char *buf, size_t len)
{
	const char *e;

	if ((e = getenv("KV_LLAMA_CACHE")) && *e)
		snprintf(buf, len, "%s", e);
	else if ((e = getenv("XDG_CACHE_HOME")) && *e)
		snprintf(buf, len, "%s/libkv", e);
	else if ((e = getenv("HOME")) && *e)
		snprintf(buf, len, "%s/.cache/libkv", e);
	else
		snprintf(buf, len, "/tmp/libkv-cache");
}

/* mkdir -p, 0755. */
static int make_dirs(const char *dir)
{
	char tmp[4096];
	size_t n = strlen(dir);

	if (n == 0 || n >= sizeof(tmp))
		return kv_fail(-ENAMETOOLONG, "cache directory '%s': bad length", dir);
	memcpy(tmp, dir, n + 1);
	for (char *p = tmp + 1; ; p++) {
		if (*p == '/' || *p == 0) {
			char c = *p;

			*p = 0;
			if (mkdir(tmp, 0755) < 0 && errno != EEXIST)
				return kv_fail(-errno, "cache directory '%s': mkdir: %s", tmp,
					       strerror(errno));
			*p = c;
			if (!c)
				break;
		}
	}
	return 0;
}

/* The weight at float index i of the file's stream: a stateless hash of
 * (seed, i), so any range can be produced on its own. Irwin-Hall with four
 * 16-bit uniforms: mean 0, variance 1 after scaling, within +-3.46; close
 * enough to normal for weights, and an order of magnitude cheaper than
 * Box-Muller for the 1B model's billion floats. */
static inline float synth_value(uint64_t seed, uint64_t i)
{
	uint64_t z = seed ^ (i * 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	z ^= z >> 31;
	uint32_t s = (uint32_t)(z & 0xffff) + (uint32_t)((z >> 16) & 0xffff) +
		     (uint32_t)((z >> 32) & 0xffff) + (uint32_t)(z >> 48);
	/* s / 65536 is Irwin-Hall(4): mean 2, variance 1/3. */
	return ((float)s * (1.0f / 65536.0f) - 2.0f) * 1.7320508f;
}

enum region { R_MATRIX, R_NORM, R_ROPE_COS, R_ROPE_SIN };

struct writer {
	FILE *f;
	const char *path;
	uint64_t seed;
	uint64_t index;      /* floats written so far */
	float buf[1 << 16];
};

static int emit(struct writer *w, enum region r, uint64_t count, const struct llm_config *c)
{
	const uint32_t half = c->head_size / 2;

	for (uint64_t done = 0; done < count;) {
		size_t n = count - done < (1u << 16) ? (size_t)(count - done) : (1u << 16);

		for (size_t k = 0; k < n; k++) {
			uint64_t i = w->index + k, local = done + k;

			switch (r) {
			case R_MATRIX:
				w->buf[k] = 0.02f * synth_value(w->seed, i);
				break;
			case R_NORM:
				w->buf[k] = 1.0f + 0.02f * synth_value(w->seed, i);
				break;
			case R_ROPE_COS:
			case R_ROPE_SIN: {
				/* llama2.c's legacy tables: (seq_len, head_size / 2). */
				double pos = (double)(local / half), j = (double)(local % half);
				double a = pos / pow(10000.0, 2.0 * j / c->head_size);

				w->buf[k] = (float)(r == R_ROPE_COS ? cos(a) : sin(a));
				break;
			}
			}
		}
		if (fwrite(w->buf, sizeof(float), n, w->f) != n)
			return kv_fail(-EIO, "synthetic model '%s': write: %s", w->path, strerror(errno));
		done += n;
		w->index += n;
	}
	return 0;
}

static int write_model(const struct llm_config *c, uint64_t seed, const char *path)
{
	uint64_t L = c->n_layers, dim = c->dim, hid = c->hidden_dim, kvd = c->kv_dim;
	uint8_t hdr[LLM_HEADER_BYTES];
	struct writer *w = malloc(sizeof(*w));
	int rc = 0;

	if (!w)
		return kv_fail(-ENOMEM, "synthetic model: out of memory");
	w->f = fopen(path, "wbx");
	if (!w->f) {
		rc = kv_fail(-errno, "synthetic model '%s': create: %s", path, strerror(errno));
		free(w);
		return rc;
	}
	w->path = path;
	w->seed = seed;
	w->index = 0;
	llm_config_header(c, hdr);
	if (fwrite(hdr, 1, sizeof(hdr), w->f) != sizeof(hdr))
		rc = kv_fail(-EIO, "synthetic model '%s': write: %s", path, strerror(errno));
	/* File order: embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3,
	 * rms_final, two RoPE tables, classifier. */
	if (!rc) rc = emit(w, R_MATRIX, (uint64_t)c->vocab_size * dim, c);
	if (!rc) rc = emit(w, R_NORM, L * dim, c);
	if (!rc) rc = emit(w, R_MATRIX, L * dim * dim, c);
	if (!rc) rc = emit(w, R_MATRIX, L * kvd * dim, c);
	if (!rc) rc = emit(w, R_MATRIX, L * kvd * dim, c);
	if (!rc) rc = emit(w, R_MATRIX, L * dim * dim, c);
	if (!rc) rc = emit(w, R_NORM, L * dim, c);
	if (!rc) rc = emit(w, R_MATRIX, L * hid * dim, c);
	if (!rc) rc = emit(w, R_MATRIX, L * dim * hid, c);
	if (!rc) rc = emit(w, R_MATRIX, L * hid * dim, c);
	if (!rc) rc = emit(w, R_NORM, dim, c);
	if (!rc) rc = emit(w, R_ROPE_COS, (uint64_t)c->seq_len * (c->head_size / 2), c);
	if (!rc) rc = emit(w, R_ROPE_SIN, (uint64_t)c->seq_len * (c->head_size / 2), c);
	if (!rc && !c->shared_classifier)
		rc = emit(w, R_MATRIX, (uint64_t)c->vocab_size * dim, c);
	if (fclose(w->f) != 0 && !rc)
		rc = kv_fail(-EIO, "synthetic model '%s': close: %s", path, strerror(errno));
	free(w);
	return rc;
}

int llm_synthetic_ensure(const struct llm_config *cfg, uint64_t seed, const char *dir,
			 char *path, size_t path_len)
{
	struct llm_config c, found;
	char cache[4096], tmp[4200];
	uint64_t want;
	struct stat st;
	int rc;

	if (!cfg || !path || path_len == 0)
		return kv_fail(-EINVAL, "llm_synthetic_ensure: NULL argument");
	c = *cfg;
	if ((rc = llm_config_check(&c)) || (rc = llm_config_file_bytes(&c, &want)))
		return rc;
	if (!dir) {
		llm_cache_dir(cache, sizeof(cache));
		dir = cache;
	}
	if ((rc = make_dirs(dir)))
		return rc;
	if ((size_t)snprintf(path, path_len,
			     "%s/llama-synth-%" PRIu32 "-%" PRIu32 "-%" PRIu32 "-%" PRIu32 "-%" PRIu32
			     "-%" PRIu32 "%s-%" PRIu32 "-seed%" PRIx64 "-v1.bin",
			     dir, c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads,
			     c.vocab_size, c.shared_classifier ? "" : "u", c.seq_len, seed) >= path_len)
		return kv_fail(-ENAMETOOLONG, "synthetic model path in '%s' too long", dir);
	/* Already there and whole (a file only ever appears by rename). */
	if (stat(path, &st) == 0 && (uint64_t)st.st_size == want &&
	    llm_checkpoint_read_config(path, &found) == 0)
		return 0;
	snprintf(tmp, sizeof(tmp), "%s.tmp.%ld.%" PRIx64, path, (long)getpid(), kv_now_ns());
	if (want > ((uint64_t)1 << 30))
		kv_log(KV_LOG_WARN, "writing synthetic model %s (%.1f GB, once)", path, want / 1e9);
	rc = write_model(&c, seed, tmp);
	if (!rc && rename(tmp, path) < 0)
		rc = kv_fail(-errno, "synthetic model '%s': rename: %s", path, strerror(errno));
	if (rc)
		unlink(tmp);
	return rc;
}
