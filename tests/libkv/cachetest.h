/* SPDX-License-Identifier: MIT */
/*
 * Helpers of the KV cache tests: values a test writes (a function of a
 * tag, layer, position and element, so a read can be checked without
 * keeping a copy), writing every layer of a range, checking a range, and
 * token runs. Include after defining L (layers), H (kv heads) and D
 * (head_dim) and ROW (H * D).
 */
#ifndef KV_CACHETEST_H
#define KV_CACHETEST_H

#include "kvtest.h"

/* The K (kv 0) or V (kv 1) value of (tag, layer, pos, element i). */
static inline float ct_val(uint32_t tag, uint32_t layer, uint32_t pos, uint32_t i, int kv)
{
	uint64_t x = ((uint64_t)tag << 40) ^ ((uint64_t)layer << 32) ^ ((uint64_t)pos << 12) ^
		     ((uint64_t)i << 1) ^ (uint64_t)kv;

	return (float)(kv_test_rand(&x) % 20001) / 1000.0f - 10.0f;
}

/* Rows (n, ROW) of K and V of `tag` for [pos, pos + n) of a layer. */
static inline void ct_fill(float *k, float *v, uint32_t tag, uint32_t layer, uint32_t pos,
			   uint32_t n)
{
	for (uint32_t t = 0; t < n; t++)
		for (uint32_t i = 0; i < ROW; i++) {
			k[t * ROW + i] = ct_val(tag, layer, pos + t, i, 0);
			v[t * ROW + i] = ct_val(tag, layer, pos + t, i, 1);
		}
}

/* Write every layer of [pos, pos + n) with the values of `tag`. */
static inline void write_all(struct kv_cache *c, kv_seq_id s, uint32_t tag, uint32_t pos,
			     uint32_t n)
{
	float *k = malloc(sizeof(float) * ROW * (n ? n : 1));
	float *v = malloc(sizeof(float) * ROW * (n ? n : 1));

	for (uint32_t l = 0; l < L; l++) {
		ct_fill(k, v, tag, l, pos, n);
		kv_assert_ok(kv_seq_write(c, s, l, pos, n, k, v));
	}
	free(k);
	free(v);
}

/* Every layer of [pos, pos + n) reads back exactly as `tag` wrote it. */
static inline void expect_at(int line, struct kv_cache *c, kv_seq_id s, uint32_t tag,
			     uint32_t pos, uint32_t n)
{
	float *rk = malloc(sizeof(float) * ROW * (n ? n : 1));
	float *rv = malloc(sizeof(float) * ROW * (n ? n : 1));

	for (uint32_t l = 0; l < L; l++) {
		kv_assert_ok(kv_seq_read(c, s, l, pos, n, rk, rv));
		for (uint32_t t = 0; t < n; t++)
			for (uint32_t i = 0; i < ROW; i++) {
				float k = ct_val(tag, l, pos + t, i, 0), v = ct_val(tag, l, pos + t, i, 1);

				if (rk[t * ROW + i] != k || rv[t * ROW + i] != v)
					fail_msg("line %d: layer %u pos %u elem %u: read %g/%g, want "
						 "%g/%g", line, l, pos + t, i, rk[t * ROW + i],
						 rv[t * ROW + i], k, v);
			}
	}
	free(rk);
	free(rv);
}
#define expect(...) expect_at(__LINE__, __VA_ARGS__)

/* base, base + 1, ... */
static inline void tokens_seq(int32_t *t, uint32_t n, int32_t base)
{
	for (uint32_t i = 0; i < n; i++)
		t[i] = base + (int32_t)i;
}

#endif
