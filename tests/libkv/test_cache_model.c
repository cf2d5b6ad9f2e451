/* SPDX-License-Identifier: MIT */
/*
 * A model-based random test of the paged KV cache: seeded operations
 * (prompt, append, write, rewrite, read, fork, truncate, free, swap out
 * and in, preempt and resume, lookup, pin, eviction pressure, attention)
 * on up to 64 sequences, checked against a plain model of what each
 * sequence's tokens and K/V values must be. After every operation the
 * cache's validator runs and a sampled read must match the model; at the
 * end every K/V of every live sequence must.
 *
 * How the model predicts prefix hits: normal writes store values that
 * are a function of (salt, the token prefix up to the position, position,
 * layer, element), as a model's K/V are, so whichever block a hit returns
 * must hold exactly those values. Rewrites with other values ("noise")
 * only ever change the rewriting sequence (copy on write) and stop its
 * blocks from entering the prefix index, which the model checks too.
 *
 * 1,000,000 operations in the release build; 200,000 under sanitizers,
 * which run the same code an order of magnitude slower.
 */
#include <math.h>
#include <string.h>
#include <sys/stat.h>

#include "kvtest.h"

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define DEFAULT_OPS 200000u
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define DEFAULT_OPS 200000u
#endif
#endif
#ifndef DEFAULT_OPS
#define DEFAULT_OPS 1000000u
#endif

#define L 2
#define H 2
#define D 4
#define T 4
#define ROW (H * D)
#define QH (2 * H)
#define MAX_SEQS 64
#define MAX_LEN 64
#define CAPACITY 192
#define FAMILIES 8
#define FAMILY_LEN 40

enum { ACTIVE = 0, SWAPPED = 1, PREEMPTED = 2 };

struct mseq {
	bool live;
	kv_seq_id id;
	int salt;
	int state;
	uint32_t len;
	int32_t tok[MAX_LEN];
	uint64_t hp[MAX_LEN];          /* prefix hash up to and including p */
	uint32_t written[L];
	float kv[MAX_LEN][L][2][ROW];  /* what reads must return */
};

static struct mseq model[MAX_SEQS];
static struct kv_cache *cache;
static uint64_t rng;
static char dir[4096];
static const char *salts[3] = { NULL, "alpha", "beta" };
static uint32_t pins[FAMILIES];

static struct {
	uint64_t op[16], enomem, hits, hit_tokens, noise, swaps, attn;
} count;

static uint32_t rnd(uint32_t n)
{
	return n ? (uint32_t)(kv_test_rand(&rng) % n) : 0;
}

static uint64_t mix(uint64_t h, uint64_t x)
{
	uint64_t s = h ^ (x * 0x9e3779b97f4a7c15ull);

	return kv_test_rand(&s);
}

/* The value a normal write stores. */
static float fval(const struct mseq *m, uint32_t p, uint32_t l, int kv, uint32_t i)
{
	uint64_t s = mix(mix(mix(m->hp[p], (uint64_t)m->salt + 1), l * 2 + (uint64_t)kv), i);

	return (float)(s % 2001) / 100.0f - 10.0f;
}

static void family_tokens(uint32_t f, int32_t *t, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		t[i] = (int32_t)(f * 1000 + i);
}

static void model_set_tokens(struct mseq *m, uint32_t from)
{
	for (uint32_t p = from; p < m->len; p++)
		m->hp[p] = mix(p ? m->hp[p - 1] : 12345, (uint64_t)(uint32_t)m->tok[p]);
}

static struct mseq *pick(int state, uint32_t min_len)
{
	uint32_t start = rnd(MAX_SEQS);

	for (uint32_t k = 0; k < MAX_SEQS; k++) {
		struct mseq *m = &model[(start + k) % MAX_SEQS];

		if (m->live && m->state == state && m->len >= min_len)
			return m;
	}
	return NULL;
}

static struct mseq *free_slot(void)
{
	for (uint32_t k = 0; k < MAX_SEQS; k++)
		if (!model[k].live)
			return &model[k];
	return NULL;
}

static void check_read(const struct mseq *m, uint32_t l, uint32_t pos, uint32_t n, int line)
{
	float k[MAX_LEN * ROW], v[MAX_LEN * ROW];

	kv_assert_ok(kv_seq_read(cache, m->id, l, pos, n, k, v));
	for (uint32_t t = 0; t < n; t++)
		for (uint32_t i = 0; i < ROW; i++)
			if (k[t * ROW + i] != m->kv[pos + t][l][0][i] ||
			    v[t * ROW + i] != m->kv[pos + t][l][1][i])
				fail_msg("line %d: seq %#llx layer %u pos %u elem %u: read %g/%g, "
					 "model %g/%g (seed %llu)", line, (unsigned long long)m->id, l,
					 pos + t, i, k[t * ROW + i], v[t * ROW + i],
					 m->kv[pos + t][l][0][i], m->kv[pos + t][l][1][i],
					 (unsigned long long)rng);
}

static void check_all(const struct mseq *m, int line)
{
	struct kv_seq_info info;
	int32_t tok[MAX_LEN];

	kv_assert_ok(kv_seq_info(cache, m->id, &info));
	assert_int_equal(info.len, m->len);
	assert_int_equal(info.swapped, m->state == SWAPPED);
	assert_int_equal(info.preempted, m->state == PREEMPTED);
	kv_assert_ok(kv_seq_tokens(cache, m->id, 0, m->len, tok));
	assert_memory_equal(tok, m->tok, sizeof(int32_t) * m->len);
	if (m->state != ACTIVE)
		return;
	for (uint32_t l = 0; l < L; l++)
		if (m->written[l])
			check_read(m, l, 0, m->written[l], line);
}

/* ---- operations ----------------------------------------------------------- */

static void make_prompt(int32_t *t, uint32_t *n)
{
	uint32_t f = rnd(FAMILIES), base = 1 + rnd(FAMILY_LEN), extra = rnd(3) ? rnd(12) : 0;

	family_tokens(f, t, base);
	for (uint32_t i = 0; i < extra && base + i < MAX_LEN - 16; i++)
		t[base + i] = (int32_t)rnd(50);
	*n = base + extra;
	if (*n > MAX_LEN - 16)
		*n = MAX_LEN - 16;
}

static void op_prompt(void)
{
	struct kv_seq_config sc = { 0 };
	struct mseq *m = free_slot();
	uint32_t n, cached;
	int32_t t[MAX_LEN];
	int rc;

	if (!m)
		return;
	memset(m, 0, sizeof(*m));
	m->salt = (int)rnd(3);
	sc.salt = salts[m->salt];
	sc.salt_len = sc.salt ? strlen(sc.salt) : 0;
	sc.priority = rnd(KV_CACHE_PRIORITIES);
	make_prompt(t, &n);
	kv_assert_ok(kv_seq_create(cache, &sc, &m->id));
	rc = kv_seq_prompt(cache, m->id, t, n, &cached);
	if (rc == -ENOMEM) {
		count.enomem++;
		kv_assert_ok(kv_seq_free(cache, m->id));
		return;
	}
	kv_assert_ok(rc);
	m->live = true;
	m->len = n;
	memcpy(m->tok, t, sizeof(int32_t) * n);
	model_set_tokens(m, 0);
	if (cached % T || cached > n - 1)
		fail_msg("prompt of %u tokens: %u cached", n, cached);
	for (uint32_t l = 0; l < L; l++) {
		m->written[l] = cached;
		for (uint32_t p = 0; p < cached; p++)
			for (int kv = 0; kv < 2; kv++)
				for (uint32_t i = 0; i < ROW; i++)
					m->kv[p][l][kv][i] = fval(m, p, l, kv, i);
	}
	if (cached) {
		count.hits++;
		count.hit_tokens += cached;
		for (uint32_t l = 0; l < L; l++)
			check_read(m, l, 0, cached, __LINE__);
	}
}

static void op_append(void)
{
	struct mseq *m = pick(ACTIVE, 0);
	uint32_t n = 1 + rnd(8);
	int32_t t[8];
	int rc;

	if (!m || m->len + n > MAX_LEN)
		return;
	for (uint32_t i = 0; i < n; i++)
		t[i] = rnd(4) ? (int32_t)rnd(50) : (int32_t)((m->tok[0] / 1000) * 1000 + m->len + i);
	rc = kv_seq_append(cache, m->id, t, n);
	if (rc == -ENOMEM) {
		count.enomem++;
		return;
	}
	kv_assert_ok(rc);
	memcpy(m->tok + m->len, t, sizeof(int32_t) * n);
	m->len += n;
	model_set_tokens(m, m->len - n);
}

static void op_write(void)
{
	struct mseq *m = pick(ACTIVE, 1);
	float k[8 * ROW], v[8 * ROW];
	uint32_t l, pos, n, mode;
	int rc;

	if (!m)
		return;
	l = rnd(L);
	mode = rnd(100);
	if (mode < 70 || m->written[l] == 0) {
		if (m->written[l] == m->len)
			return;
		pos = m->written[l];
		mode = 0;
	} else {
		pos = rnd(m->written[l]);
		mode = mode < 85 ? 1 : 2;  /* rewrite the same values, or noise */
	}
	n = 1 + rnd(8);
	if (pos + n > m->len)
		n = m->len - pos;
	for (uint32_t t = 0; t < n; t++)
		for (uint32_t i = 0; i < ROW; i++) {
			k[t * ROW + i] = mode == 2 ? (float)rnd(1000) / 7.0f : fval(m, pos + t, l, 0, i);
			v[t * ROW + i] = mode == 2 ? (float)rnd(1000) / 9.0f : fval(m, pos + t, l, 1, i);
		}
	rc = kv_seq_write(cache, m->id, l, pos, n, k, v);
	if (rc == -ENOMEM) {
		/* A copy on write found no block: nothing may have changed. */
		count.enomem++;
		check_all(m, __LINE__);
		return;
	}
	kv_assert_ok(rc);
	count.noise += mode == 2;
	for (uint32_t t = 0; t < n; t++) {
		memcpy(m->kv[pos + t][l][0], k + t * ROW, sizeof(float) * ROW);
		memcpy(m->kv[pos + t][l][1], v + t * ROW, sizeof(float) * ROW);
	}
	if (pos + n > m->written[l])
		m->written[l] = pos + n;
}

static void op_fork(void)
{
	struct mseq *p = pick(ACTIVE, 0), *ch = free_slot();

	if (!p || !ch)
		return;
	kv_assert_ok(kv_seq_fork(cache, p->id, &ch->id));
	{
		kv_seq_id id = ch->id;

		*ch = *p;
		ch->id = id;
	}
}

static void op_truncate(void)
{
	struct mseq *m = pick(ACTIVE, 1);
	uint32_t keep;

	if (!m)
		return;
	keep = m->len - rnd((m->len < 10 ? m->len : 10) + 1);
	kv_assert_ok(kv_seq_truncate(cache, m->id, keep));
	m->len = keep;
	for (uint32_t l = 0; l < L; l++)
		if (m->written[l] > keep)
			m->written[l] = keep;
}

static void op_free(void)
{
	struct mseq *m = NULL;
	uint32_t start = rnd(MAX_SEQS);

	for (uint32_t k = 0; k < MAX_SEQS && !m; k++)
		if (model[(start + k) % MAX_SEQS].live)
			m = &model[(start + k) % MAX_SEQS];
	if (!m)
		return;
	kv_assert_ok(kv_seq_free(cache, m->id));
	kv_assert_rc(kv_seq_append(cache, m->id, m->tok, 1), -ENOENT);
	m->live = false;
}

static void op_swap(void)
{
	struct mseq *m = rnd(2) ? pick(ACTIVE, 1) : pick(SWAPPED, 0);
	int rc;

	if (!m)
		return;
	if (m->state == ACTIVE) {
		kv_assert_ok(kv_seq_swap_out(cache, m->id));
		m->state = SWAPPED;
		count.swaps++;
		return;
	}
	rc = kv_seq_swap_in(cache, m->id);
	if (rc == -ENOMEM) {
		count.enomem++;
		return;
	}
	kv_assert_ok(rc);
	m->state = ACTIVE;
	check_all(m, __LINE__);
}

static void op_preempt(void)
{
	struct mseq *m = rnd(2) ? pick(ACTIVE, 1) : pick(PREEMPTED, 0);
	uint32_t r, cached;
	int rc;

	if (!m)
		return;
	if (m->state == ACTIVE) {
		kv_assert_ok(kv_seq_preempt(cache, m->id, &r));
		if (r > m->len || (m->len - r) % T)
			fail_msg("preempt of %u tokens: recompute %u", m->len, r);
		m->state = PREEMPTED;
		return;
	}
	rc = kv_seq_resume(cache, m->id, &cached);
	if (rc == -ENOMEM) {
		count.enomem++;
		check_all(m, __LINE__);
		return;
	}
	kv_assert_ok(rc);
	if (cached % T || (m->len && cached > m->len - 1))
		fail_msg("resume of %u tokens: %u cached", m->len, cached);
	m->state = ACTIVE;
	for (uint32_t l = 0; l < L; l++) {
		m->written[l] = cached;
		for (uint32_t p = 0; p < cached; p++)
			for (int kv = 0; kv < 2; kv++)
				for (uint32_t i = 0; i < ROW; i++)
					m->kv[p][l][kv][i] = fval(m, p, l, kv, i);
	}
	check_all(m, __LINE__);
}

static void op_lookup(void)
{
	struct kv_prefix_hit hit;
	int32_t t[MAX_LEN];
	uint32_t n;
	int s = (int)rnd(3);

	make_prompt(t, &n);
	kv_assert_ok(kv_cache_lookup(cache, t, n, salts[s], salts[s] ? strlen(salts[s]) : 0,
				     &hit));
	if (hit.blocks_hashed != n / T || hit.dram_tokens % T || hit.ssd_tokens % T ||
	    hit.dram_tokens + hit.ssd_tokens > hit.blocks_hashed * T)
		fail_msg("lookup of %u tokens: %u + %u of %u blocks", n, hit.dram_tokens,
			 hit.ssd_tokens, hit.blocks_hashed);
}

static void op_pin(void)
{
	uint32_t f = rnd(FAMILIES), pinned;
	int32_t t[16];

	family_tokens(f, t, 16);
	if (pins[f] && rnd(2)) {
		kv_assert_ok(kv_cache_unpin(cache, t, 16, NULL, 0));
		pins[f]--;
		return;
	}
	if (pins[f] >= 2)
		return;
	kv_assert_ok(kv_cache_pin(cache, t, 16, NULL, 0, &pinned));
	if (pinned) {
		pins[f]++;
	} else {
		/* Nothing cached to pin: unpin must then say so. */
		if (!pins[f])
			kv_assert_rc(kv_cache_unpin(cache, t, 16, NULL, 0), -ENOENT);
	}
}

static void op_evict(void)
{
	uint32_t n;

	kv_assert_ok(kv_cache_evict(cache, rnd(12), &n));
}

static void op_attention(void)
{
	struct mseq *m = pick(ACTIVE, 1);
	float q[4 * QH * D], out[4 * QH * D];
	uint32_t nq;
	struct kv_attn_batch b = { 0 };
	uint32_t l = rnd(L);

	if (!m || m->written[l] < m->len)
		return;
	nq = 1 + rnd(m->len < 4 ? m->len : 4);
	for (uint32_t i = 0; i < nq * QH * D; i++)
		q[i] = (float)rnd(2000) / 1000.0f - 1.0f;
	b.n_seqs = 1;
	b.seqs = &m->id;
	b.n_queries = &nq;
	b.n_q_heads = QH;
	b.q = q;
	b.out = out;
	kv_assert_ok(kv_attention(cache, l, &b));
	count.attn++;
	for (uint32_t j = 0; j < nq; j++) {
		uint32_t p = m->len - nq + j;

		for (uint32_t h = 0; h < QH; h++) {
			uint32_t kh = h / (QH / H);
			const float *qq = q + ((size_t)j * QH + h) * D;
			double mx = -INFINITY, sum = 0, acc[D] = { 0 }, s[MAX_LEN];

			for (uint32_t t = 0; t <= p; t++) {
				s[t] = 0;
				for (uint32_t d = 0; d < D; d++)
					s[t] += (double)qq[d] * m->kv[t][l][0][kh * D + d];
				s[t] /= sqrt((double)D);
				mx = fmax(mx, s[t]);
			}
			for (uint32_t t = 0; t <= p; t++) {
				double e = exp(s[t] - mx);

				sum += e;
				for (uint32_t d = 0; d < D; d++)
					acc[d] += e * m->kv[t][l][1][kh * D + d];
			}
			for (uint32_t d = 0; d < D; d++) {
				double want = acc[d] / sum, got = out[((size_t)j * QH + h) * D + d];

				if (fabs(got - want) > 1e-4 * (1 + fabs(want)))
					fail_msg("attention: seq len %u query %u head %u dim %u: %g, "
						 "want %g", m->len, j, h, d, got, want);
			}
		}
	}
}

/* A sampled read of a random written position of a random sequence. */
static void sample_read(void)
{
	struct mseq *m = pick(ACTIVE, 1);
	uint32_t l = rnd(L);

	if (m && m->written[l])
		check_read(m, l, rnd(m->written[l]), 1, __LINE__);
}

static void run(uint64_t seed, uint32_t ops)
{
	struct kv_cache_config cfg;
	struct kv_cache_stats st;
	uint32_t i;

	rng = seed;
	memset(model, 0, sizeof(model));
	memset(pins, 0, sizeof(pins));
	memset(&count, 0, sizeof(count));
	kv_cache_config_default(&cfg);
	cfg.n_layers = L;
	cfg.n_kv_heads = H;
	cfg.head_dim = D;
	cfg.block_tokens = T;
	cfg.capacity_blocks = CAPACITY;
	cfg.max_seqs = 2 * MAX_SEQS;
	cfg.threads = 1;
	cfg.model_key = "model-test";
	cfg.spill.dir = dir;
	cfg.spill.sync = KV_STORE_SYNC_NONE;
	cfg.spill.watermark = 0.85;
	/* A bounded SSD tier: its own LRU drops blocks too. */
	cfg.spill.capacity = 2u << 20;
	cfg.spill.verify = true;
	kv_assert_ok(kv_cache_create(&cfg, &cache));
	for (i = 0; i < ops; i++) {
		uint32_t r = rnd(1000);

		if (r < 80)
			op_prompt(), count.op[0]++;
		else if (r < 260)
			op_append(), count.op[1]++;
		else if (r < 560)
			op_write(), count.op[2]++;
		else if (r < 620)
			sample_read(), count.op[3]++;
		else if (r < 660)
			op_fork(), count.op[4]++;
		else if (r < 720)
			op_truncate(), count.op[5]++;
		else if (r < 800)
			op_free(), count.op[6]++;
		else if (r < 810)
			op_swap(), count.op[7]++;
		else if (r < 830)
			op_preempt(), count.op[8]++;
		else if (r < 880)
			op_lookup(), count.op[9]++;
		else if (r < 890)
			op_pin(), count.op[10]++;
		else if (r < 920)
			op_evict(), count.op[11]++;
		else
			op_attention(), count.op[12]++;
		kv_assert_ok(kv_cache_validate(cache));
		sample_read();
	}
	for (i = 0; i < MAX_SEQS; i++)
		if (model[i].live)
			check_all(&model[i], __LINE__);
	kv_cache_stats(cache, &st);
	assert_int_equal(st.blocks_used + st.blocks_cached + st.blocks_free, st.blocks_total);
	print_message("seed %llu, %u ops: prompts %llu (hits %llu, %llu tokens), appends %llu, "
		      "writes %llu (noise %llu), forks %llu, truncates %llu, frees %llu, swaps "
		      "%llu, attention %llu, -ENOMEM %llu; cache: %llu evictions, %llu spills, "
		      "%llu loads, %llu copies, %llu dedups, %llu SSD evictions\n",
		      (unsigned long long)seed, ops, (unsigned long long)count.op[0],
		      (unsigned long long)count.hits, (unsigned long long)count.hit_tokens,
		      (unsigned long long)count.op[1], (unsigned long long)count.op[2],
		      (unsigned long long)count.noise, (unsigned long long)count.op[4],
		      (unsigned long long)count.op[5], (unsigned long long)count.op[6],
		      (unsigned long long)count.swaps, (unsigned long long)count.attn,
		      (unsigned long long)count.enomem, (unsigned long long)st.evictions,
		      (unsigned long long)st.spills, (unsigned long long)st.loads,
		      (unsigned long long)st.cow_copies, (unsigned long long)st.dedups,
		      (unsigned long long)st.ssd_evictions);
	/* Everything the run was meant to exercise happened. */
	assert_true(count.hits > 0 && st.dedups > 0 && st.cow_copies > 0 && st.evictions > 0 &&
		    st.spills > 0 && st.loads > 0 && count.swaps > 0 && count.attn > 0);
	if (ops >= 100000)
		assert_true(st.ssd_evictions > 0);
	kv_assert_ok(kv_cache_destroy(cache));
	cache = NULL;
}

static void test_model(void **state)
{
	const char *env = getenv("KV_TEST_OPS"), *seed_env = getenv("KV_TEST_SEED");
	uint32_t ops = env ? (uint32_t)strtoul(env, NULL, 10) : DEFAULT_OPS;
	uint64_t seed = seed_env ? strtoull(seed_env, NULL, 10) : 20261202;

	(void)state;
	run(seed, ops);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_model),
	};
	char cache_dir[4096];
	struct stat sb;
	int rc;

	kv_test_private_cache(cache_dir, sizeof(cache_dir), "cache-model-xdg");
	/* The SSD tier in memory when /dev/shm is there: the test is about
	 * the cache's logic, not the disk's speed. */
	if (!getenv("TMPDIR") && stat("/dev/shm", &sb) == 0 && S_ISDIR(sb.st_mode))
		setenv("TMPDIR", "/dev/shm", 1);
	kv_test_mkdtemp(dir, sizeof(dir), "cache-model");
	rc = cmocka_run_group_tests(tests, NULL, NULL);
	kv_test_rmtree(dir);
	kv_test_rmtree(cache_dir);
	return rc;
}
