// SPDX-License-Identifier: MIT
/*
 * Tests of kv_report_write(): a registry is filled with a known set of
 * records plus a seeded random walk of records, moves, resizes and forgets,
 * while the test keeps its own bookkeeping of every cell, peak and label.
 * Each format is then read back by a real reader (json-c for JSON, a strict
 * exposition-format checker written here for Prometheus, a column splitter
 * for the text table) and compared with that bookkeeping. No other thread
 * mutates the registry, so every figure must be exact.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include <json-c/json.h>

#include "kvtest.h"
#include "taxonomy/kv-private.h"

/* ---- The test's own bookkeeping --------------------------------------- */

/* Labels used by the records; index 0 is "no label" (NULL when recording).
 * The escaped one has every character the formats must escape. */
#define ESCAPED_LABEL "say \"hi\"\\n and\nthen \\\"leave\\\""
static const char *const labels[] = {
	"", "model.weights", "kv-cache", "act", "model.mmap", ESCAPED_LABEL,
	"scratch", "kv-gpu", "zz-last",
};
#define N_LABELS (sizeof(labels) / sizeof(labels[0]))
#define LABEL_ESCAPED 5

#define MAX_RECS 512
#define REG_NAME "report \"test\""

struct model_rec {
	kv_handle h;
	uint64_t bytes;
	int tier, node, kind;
	size_t label;
	bool live;
};

struct model {
	struct kv_registry *reg;
	struct model_rec rec[MAX_RECS];
	size_t n_rec;
	uint64_t peak[KV_TIER_COUNT][KV_KIND_COUNT];
	uint64_t label_peak[N_LABELS];
	struct kv_registry_ops ops;
};

static struct model M;

static uint64_t model_cell(int tier, int node, int kind, bool records)
{
	uint64_t sum = 0;

	for (size_t i = 0; i < M.n_rec; i++) {
		const struct model_rec *r = &M.rec[i];

		if (!r->live || (tier != KV_ANY && r->tier != tier) ||
		    (node != KV_ANY && r->node != node) ||
		    (kind != KV_ANY && r->kind != kind))
			continue;
		sum += records ? 1 : r->bytes;
	}
	return sum;
}

static void model_label(size_t l, uint64_t *bytes, uint64_t *records)
{
	*bytes = *records = 0;
	for (size_t i = 0; i < M.n_rec; i++) {
		if (M.rec[i].live && M.rec[i].label == l) {
			*bytes += M.rec[i].bytes;
			(*records)++;
		}
	}
}

/* The registry raises a high-water mark after each change; so does this. */
static void model_after_change(void)
{
	for (int t = 0; t < KV_TIER_COUNT; t++) {
		for (int k = 0; k < KV_KIND_COUNT; k++) {
			uint64_t b = model_cell(t, KV_ANY, k, false);

			if (b > M.peak[t][k])
				M.peak[t][k] = b;
		}
	}
	for (size_t l = 0; l < N_LABELS; l++) {
		uint64_t b, r;

		model_label(l, &b, &r);
		if (b > M.label_peak[l])
			M.label_peak[l] = b;
	}
	kv_assert_ok(kv_registry_validate(M.reg));
}

static size_t model_record(uint64_t bytes, int tier, int node, int kind, size_t label)
{
	struct model_rec *r = &M.rec[M.n_rec];

	assert_true(M.n_rec < MAX_RECS);
	kv_assert_ok(kv_registry_record(M.reg, bytes, (enum kv_tier)tier, node,
					(enum kv_kind)kind, 0,
					label ? labels[label] : NULL, &r->h));
	r->bytes = bytes;
	r->tier = tier;
	r->node = node;
	r->kind = kind;
	r->label = label;
	r->live = true;
	M.ops.records++;
	M.n_rec++;
	model_after_change();
	return M.n_rec - 1;
}

static void model_move(size_t i, int tier, int node)
{
	struct model_rec *r = &M.rec[i];

	kv_assert_ok(kv_registry_move(M.reg, r->h, (enum kv_tier)tier, node));
	if (r->tier != tier || r->node != node)
		M.ops.moves++;
	r->tier = tier;
	r->node = node;
	model_after_change();
}

static void model_resize(size_t i, uint64_t bytes)
{
	kv_assert_ok(kv_registry_resize(M.reg, M.rec[i].h, bytes));
	M.rec[i].bytes = bytes;
	M.ops.resizes++;
	model_after_change();
}

static void model_forget(size_t i)
{
	kv_assert_ok(kv_registry_forget(M.reg, M.rec[i].h));
	M.rec[i].live = false;
	M.ops.forgets++;
	model_after_change();
}

#define MiB (UINT64_C(1) << 20)
#define GiB (UINT64_C(1) << 30)

static int setup_registry(void **state)
{
	struct kv_registry_config cfg;
	uint64_t seed = 0x5eed;
	size_t w, k, a, m, s, x;

	memset(&M, 0, sizeof(M));
	kv_registry_config_default(&cfg);
	/* Node 1 must be accepted even on a one-node machine. */
	cfg.numa_nodes = 0x3;
	cfg.name = REG_NAME;
	/* Peaks charged in batches run ahead of the true peak; exact here. */
	cfg.peak_batch = 0;
	kv_assert_ok(kv_registry_create(&cfg, &M.reg));

	/* A hand-made picture first: weights on both nodes, KV cache in DRAM,
	 * on the device and spilled, an mmap'd file, tiny metadata. */
	w = model_record(GiB, KV_TIER_DRAM, 0, KV_KIND_WEIGHTS, 1);
	model_record(512 * MiB, KV_TIER_DRAM, 1, KV_KIND_WEIGHTS, 1);
	k = model_record(256 * MiB, KV_TIER_DRAM, 0, KV_KIND_KV, 2);
	x = model_record(256 * MiB, KV_TIER_DRAM, 0, KV_KIND_KV, 2);
	a = model_record(64 * MiB, KV_TIER_DEVICE, 0, KV_KIND_ACTIVATIONS, 3);
	m = model_record(2 * GiB, KV_TIER_MMAP, 0, KV_KIND_WEIGHTS, 4);
	model_record(4 * MiB + 17, KV_TIER_DRAM, 1, KV_KIND_STAGING, LABEL_ESCAPED);
	model_record(1000, KV_TIER_DRAM, 0, KV_KIND_METADATA, 0);
	model_record(128 * MiB, KV_TIER_SSD, 0, KV_KIND_KV, 2);
	s = model_record(32 * MiB, KV_TIER_DRAM, 0, KV_KIND_SCRATCH, 6);
	model_record(3 * GiB, KV_TIER_DEVICE, 1, KV_KIND_KV, 7);

	model_move(x, KV_TIER_SSD, 0);       /* spilled */
	model_move(k, KV_TIER_DRAM, 1);      /* migrated between nodes */
	model_move(a, KV_TIER_DRAM, 0);      /* copied back to the host */
	model_move(a, KV_TIER_DRAM, 0);      /* no-op: not a move */
	model_resize(s, 48 * MiB);
	model_resize(w, 3 * GiB / 2);
	model_forget(s);                     /* leaves a scratch peak only */
	model_forget(m);                     /* leaves an mmap peak only */

	/* Then a seeded random walk over the whole grid. */
	for (int i = 0; i < 300; i++) {
		uint64_t r = kv_test_rand(&seed);
		size_t live[MAX_RECS], n_live = 0;

		for (size_t j = 0; j < M.n_rec; j++)
			if (M.rec[j].live)
				live[n_live++] = j;
		if (r % 4 == 0 || n_live < 4) {
			int tier = (int)(kv_test_rand(&seed) % KV_TIER_COUNT);
			int node = (int)(kv_test_rand(&seed) % (tier == KV_TIER_DRAM ? 2 : 4));

			if (M.n_rec < MAX_RECS)
				model_record(kv_test_rand(&seed) % (64 * MiB),
					     tier, node,
					     (int)(kv_test_rand(&seed) % KV_KIND_COUNT),
					     (size_t)(kv_test_rand(&seed) % N_LABELS));
			continue;
		}
		size_t j = live[kv_test_rand(&seed) % n_live];

		switch (r % 4) {
		case 1: {
			int tier = (int)(kv_test_rand(&seed) % KV_TIER_COUNT);

			model_move(j, tier, (int)(kv_test_rand(&seed) %
						  (tier == KV_TIER_DRAM ? 2 : 4)));
			break;
		}
		case 2:
			model_resize(j, kv_test_rand(&seed) % (16 * MiB));
			break;
		default:
			if (r % 8 == 3) /* forget less often than record */
				model_forget(j);
		}
	}
	/* Whatever the walk did, the escaped label holds bytes in the end. */
	model_record(MiB, KV_TIER_DRAM, 1, KV_KIND_STAGING, LABEL_ESCAPED);
	*state = &M;
	return 0;
}

static int teardown_registry(void **state)
{
	for (size_t i = 0; i < M.n_rec; i++)
		if (M.rec[i].live)
			kv_assert_ok(kv_registry_forget(M.reg, M.rec[i].h));
	/* Without FORCE: a leak here means the bookkeeping was wrong. */
	kv_assert_ok(kv_registry_destroy(M.reg, 0));
	return 0;
}

/* The expected top holders: most live bytes first, ties by name, labels
 * holding nothing left out. Returns how many were written. */
struct holder {
	size_t label;
	uint64_t bytes, records, peak;
};

static int holder_cmp(const void *pa, const void *pb)
{
	const struct holder *a = pa, *b = pb;

	if (a->bytes != b->bytes)
		return a->bytes > b->bytes ? -1 : 1;
	return strcmp(labels[a->label], labels[b->label]);
}

static size_t model_top(struct holder *out)
{
	size_t n = 0;

	for (size_t l = 0; l < N_LABELS; l++) {
		struct holder h = { .label = l, .peak = M.label_peak[l] };

		model_label(l, &h.bytes, &h.records);
		if (h.bytes)
			out[n++] = h;
	}
	qsort(out, n, sizeof(*out), holder_cmp);
	return n;
}

/* ---- Running a report ------------------------------------------------- */

static char *report(struct kv_registry *reg, unsigned format)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	assert_non_null(f);
	kv_assert_ok(kv_report_write(reg, f, format));
	assert_int_equal(fclose(f), 0);
	assert_true(len > 0 && buf[len - 1] == '\n');
	assert_int_equal(strlen(buf), len);
	return buf;
}

/* ---- JSON ------------------------------------------------------------- */

static json_object *jget(json_object *o, const char *key, json_type type)
{
	json_object *v = NULL;

	if (!json_object_object_get_ex(o, key, &v))
		fail_msg("JSON: no key \"%s\"", key);
	if (!json_object_is_type(v, type))
		fail_msg("JSON: \"%s\" is a %s, want %s", key,
			 json_type_to_name(json_object_get_type(v)), json_type_to_name(type));
	return v;
}

static uint64_t jint(json_object *o, const char *key)
{
	json_object *v = jget(o, key, json_type_int);

	if (json_object_get_int64(v) < 0)
		fail_msg("JSON: \"%s\" is negative", key);
	return json_object_get_uint64(v);
}

static int jtier(json_object *o)
{
	enum kv_tier t;

	kv_assert_ok(kv_tier_parse(json_object_get_string(jget(o, "tier", json_type_string)), &t));
	return (int)t;
}

static int jkind(json_object *o)
{
	enum kv_kind k;

	kv_assert_ok(kv_kind_parse(json_object_get_string(jget(o, "kind", json_type_string)), &k));
	return (int)k;
}

static json_object *parse_json(const char *text)
{
	enum json_tokener_error err;
	json_object *root = json_tokener_parse_verbose(text, &err);

	if (!root)
		fail_msg("report is not JSON: %s\n%s", json_tokener_error_desc(err), text);
	assert_true(json_object_is_type(root, json_type_object));
	assert_string_equal(json_object_get_string(jget(root, "schema", json_type_string)),
			    "libkv.report/1");
	assert_string_equal(json_object_get_string(jget(root, "libkv_version", json_type_string)),
			    kv_version());
	return root;
}

static void test_json(void **state)
{
	char *text = report(M.reg, KV_REPORT_JSON);
	json_object *root = parse_json(text);
	json_object *ops, *cells, *tiers, *peaks, *jl;
	bool seen[KV_TIER_COUNT][KV_NODE_MAX][KV_KIND_COUNT] = { { { false } } };
	size_t want_cells = 0, want_peaks = 0, n_top;
	struct holder top[N_LABELS];

	assert_string_equal(json_object_get_string(jget(root, "registry", json_type_string)),
			    REG_NAME);
	assert_int_equal(jint(root, "total_bytes"), model_cell(KV_ANY, KV_ANY, KV_ANY, false));
	assert_int_equal(jint(root, "total_records"), model_cell(KV_ANY, KV_ANY, KV_ANY, true));

	ops = jget(root, "ops", json_type_object);
	assert_int_equal(jint(ops, "records"), M.ops.records);
	assert_int_equal(jint(ops, "moves"), M.ops.moves);
	assert_int_equal(jint(ops, "resizes"), M.ops.resizes);
	assert_int_equal(jint(ops, "forgets"), M.ops.forgets);

	/* Every non-empty cell exactly once, with the right figures. */
	cells = jget(root, "cells", json_type_array);
	for (size_t i = 0; i < json_object_array_length(cells); i++) {
		json_object *c = json_object_array_get_idx(cells, i);
		int t = jtier(c), k = jkind(c), n = (int)jint(c, "node");

		assert_true(n < KV_NODE_MAX);
		assert_false(seen[t][n][k]);
		seen[t][n][k] = true;
		assert_int_equal(jint(c, "bytes"), model_cell(t, n, k, false));
		assert_int_equal(jint(c, "records"), model_cell(t, n, k, true));
	}
	for (int t = 0; t < KV_TIER_COUNT; t++)
		for (int n = 0; n < KV_NODE_MAX; n++)
			for (int k = 0; k < KV_KIND_COUNT; k++)
				want_cells += model_cell(t, n, k, true) != 0;
	assert_int_equal(json_object_array_length(cells), want_cells);

	/* Every tier, every kind in it, and the kinds add up. */
	tiers = jget(root, "tiers", json_type_array);
	assert_int_equal(json_object_array_length(tiers), KV_TIER_COUNT);
	for (int t = 0; t < KV_TIER_COUNT; t++) {
		json_object *o = json_object_array_get_idx(tiers, (size_t)t);
		json_object *kinds = jget(o, "kinds", json_type_object);
		uint64_t sum = 0;

		assert_int_equal(jtier(o), t);
		assert_int_equal(jint(o, "bytes"), model_cell(t, KV_ANY, KV_ANY, false));
		assert_int_equal(jint(o, "records"), model_cell(t, KV_ANY, KV_ANY, true));
		assert_int_equal(json_object_object_length(kinds), KV_KIND_COUNT);
		for (int k = 0; k < KV_KIND_COUNT; k++) {
			uint64_t b = jint(kinds, kv_kind_name((enum kv_kind)k));

			assert_int_equal(b, model_cell(t, KV_ANY, k, false));
			sum += b;
		}
		assert_int_equal(sum, jint(o, "bytes"));
	}

	/* Non-zero high-water marks, each once. */
	peaks = jget(root, "peaks", json_type_array);
	for (size_t i = 0; i < json_object_array_length(peaks); i++) {
		json_object *p = json_object_array_get_idx(peaks, i);

		assert_int_equal(jint(p, "bytes"), M.peak[jtier(p)][jkind(p)]);
	}
	for (int t = 0; t < KV_TIER_COUNT; t++)
		for (int k = 0; k < KV_KIND_COUNT; k++)
			want_peaks += M.peak[t][k] != 0;
	assert_int_equal(json_object_array_length(peaks), want_peaks);
	assert_int_equal(M.peak[KV_TIER_DRAM][KV_KIND_SCRATCH] >= 48 * MiB, 1);

	/* The holders in order; the escaped label comes back byte for byte. */
	n_top = model_top(top);
	jl = jget(root, "labels", json_type_array);
	assert_int_equal(json_object_array_length(jl), n_top);
	for (size_t i = 0; i < n_top; i++) {
		json_object *h = json_object_array_get_idx(jl, i);

		assert_string_equal(json_object_get_string(jget(h, "label", json_type_string)),
				    labels[top[i].label]);
		assert_int_equal(jint(h, "bytes"), top[i].bytes);
		assert_int_equal(jint(h, "records"), top[i].records);
		assert_int_equal(jint(h, "peak"), top[i].peak);
	}

	/* Nothing changed, so a second report is the same text. */
	char *again = report(M.reg, KV_REPORT_JSON);
	assert_string_equal(again, text);
	free(again);
	json_object_put(root);
	free(text);
}

/* ---- Prometheus text exposition format 0.0.4 --------------------------- */

#define PROM_LABELS 8
#define PROM_VALUE_MAX 512

struct prom_sample {
	char name[128];
	size_t n_labels;
	char lname[PROM_LABELS][64];
	char lvalue[PROM_LABELS][PROM_VALUE_MAX]; /* unescaped */
	double value;
};

struct prom_family {
	char name[128];
	bool help, type, sampled, closed;
};

struct prom_doc {
	struct prom_sample *samples;
	size_t n_samples;
	struct prom_family fam[64];
	size_t n_fam;
};

static bool name_start(int c, bool colon)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
	       (colon && c == ':');
}

static bool name_char(int c, bool colon)
{
	return name_start(c, colon) || (c >= '0' && c <= '9');
}

/* Copy a name matching [a-zA-Z_(:)][a-zA-Z0-9_(:)]* from *p into out. */
static bool prom_name(const char **p, char *out, size_t len, bool colon)
{
	size_t n = 0;

	if (!name_start(**p, colon))
		return false;
	while (name_char(**p, colon)) {
		if (n + 1 >= len)
			return false;
		out[n++] = *(*p)++;
	}
	out[n] = '\0';
	return true;
}

static struct prom_family *prom_fam(struct prom_doc *d, const char *name, bool add)
{
	for (size_t i = 0; i < d->n_fam; i++)
		if (strcmp(d->fam[i].name, name) == 0)
			return &d->fam[i];
	if (!add || d->n_fam == sizeof(d->fam) / sizeof(d->fam[0]))
		return NULL;
	snprintf(d->fam[d->n_fam].name, sizeof(d->fam[0].name), "%s", name);
	return &d->fam[d->n_fam++];
}

/* A series' identity: its name and its labels in sorted order. */
static void prom_key(const struct prom_sample *s, char *out, size_t len)
{
	bool used[PROM_LABELS] = { false };
	size_t off = (size_t)snprintf(out, len, "%s", s->name);

	for (size_t i = 0; i < s->n_labels; i++) {
		size_t best = SIZE_MAX;

		for (size_t j = 0; j < s->n_labels; j++)
			if (!used[j] && (best == SIZE_MAX ||
					 strcmp(s->lname[j], s->lname[best]) < 0))
				best = j;
		used[best] = true;
		off += (size_t)snprintf(out + off, len - off, "\x01%s\x02%s",
					s->lname[best], s->lvalue[best]);
		if (off >= len)
			return;
	}
}

/* Parse one sample line into s. Returns NULL or what is wrong. */
static const char *prom_sample_line(const char *p, struct prom_sample *s)
{
	char *end;

	memset(s, 0, sizeof(*s));
	if (!prom_name(&p, s->name, sizeof(s->name), true))
		return "bad metric name";
	if (*p == '{') {
		p++;
		while (*p != '}') {
			size_t n = 0;

			if (s->n_labels == PROM_LABELS)
				return "too many labels";
			if (!prom_name(&p, s->lname[s->n_labels], sizeof(s->lname[0]), false))
				return "bad label name";
			for (size_t i = 0; i < s->n_labels; i++)
				if (strcmp(s->lname[i], s->lname[s->n_labels]) == 0)
					return "label name repeated";
			if (*p++ != '=' || *p++ != '"')
				return "label name not followed by =\"";
			while (*p != '"') {
				char c = *p++;

				if (c == '\0' || c == '\n')
					return "unterminated label value";
				if (c == '\\') {
					c = *p++;
					if (c == 'n')
						c = '\n';
					else if (c != '\\' && c != '"')
						return "bad escape in label value";
				}
				if (n + 1 >= PROM_VALUE_MAX)
					return "label value too long";
				s->lvalue[s->n_labels][n++] = c;
			}
			p++;
			s->n_labels++;
			if (*p == ',')
				p++;
			else if (*p != '}')
				return "labels not separated by ','";
		}
		p++;
	}
	if (*p++ != ' ')
		return "no space before the value";
	if (*p == '\0' || *p == ' ')
		return "no value";
	s->value = strtod(p, &end);
	if (*end != '\0')
		return "value is not a number (or is followed by something)";
	return NULL;
}

static const char *prom_comment(struct prom_doc *d, const char *p)
{
	static const char *const types[] = { "counter", "gauge", "histogram",
					     "summary", "untyped" };
	char name[128];
	struct prom_family *fam;
	bool help = strncmp(p, "# HELP ", 7) == 0;

	if (!help && strncmp(p, "# TYPE ", 7) != 0)
		return "comment is neither # HELP nor # TYPE";
	p += 7;
	if (!prom_name(&p, name, sizeof(name), true) || *p++ != ' ')
		return "bad metric name in comment";
	fam = prom_fam(d, name, true);
	if (!fam)
		return "too many families";
	if (help) {
		if (fam->help)
			return "second # HELP for a family";
		fam->help = true;
		for (; *p; p++) {
			if (*p != '\\')
				continue;
			if (p[1] != '\\' && p[1] != 'n')
				return "bad escape in # HELP text";
			p++;
		}
		return NULL;
	}
	if (fam->type)
		return "second # TYPE for a family";
	if (fam->sampled)
		return "# TYPE after the family's samples";
	fam->type = true;
	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
		if (strcmp(p, types[i]) == 0)
			return NULL;
	return "unknown metric type";
}

/* Check a whole exposition; on success d holds its samples (free them). On
 * failure returns what is wrong, with the line, in err. */
static bool prom_parse(const char *text, struct prom_doc *d, char *err, size_t err_len)
{
	char line[2048];
	const char *why = NULL;
	size_t cap = 0, lineno = 0;
	struct prom_family *last = NULL;

	memset(d, 0, sizeof(*d));
	while (*text && !why) {
		const char *nl = strchr(text, '\n');
		size_t len;

		lineno++;
		if (!nl) {
			why = "last line has no line feed";
			break;
		}
		len = (size_t)(nl - text);
		if (len >= sizeof(line)) {
			why = "line too long";
			break;
		}
		memcpy(line, text, len);
		line[len] = '\0';
		text = nl + 1;
		if (len == 0)
			continue;
		if (line[0] == '#') {
			why = prom_comment(d, line);
			continue;
		}

		struct prom_sample s;
		struct prom_family *fam;
		char key[2 * PROM_LABELS * (PROM_VALUE_MAX + 64)], other[sizeof(key)];

		why = prom_sample_line(line, &s);
		if (why)
			break;
		fam = prom_fam(d, s.name, false);
		if (!fam || !fam->type) {
			why = "sample before its family's # TYPE";
			break;
		}
		if (fam != last && fam->sampled) {
			why = "family's samples are not one group";
			break;
		}
		if (last && fam != last)
			last->closed = true;
		last = fam;
		fam->sampled = true;
		prom_key(&s, key, sizeof(key));
		for (size_t i = 0; i < d->n_samples && !why; i++) {
			prom_key(&d->samples[i], other, sizeof(other));
			if (strcmp(key, other) == 0)
				why = "duplicate series";
		}
		if (why)
			break;
		if (d->n_samples == cap) {
			cap = cap ? 2 * cap : 64;
			d->samples = realloc(d->samples, cap * sizeof(*d->samples));
			assert_non_null(d->samples);
		}
		d->samples[d->n_samples++] = s;
	}
	if (why) {
		snprintf(err, err_len, "line %zu: %s", lineno, why);
		free(d->samples);
		d->samples = NULL;
		return false;
	}
	return true;
}

static const char *prom_label(const struct prom_sample *s, const char *name)
{
	for (size_t i = 0; i < s->n_labels; i++)
		if (strcmp(s->lname[i], name) == 0)
			return s->lvalue[i];
	fail_msg("%s sample without label %s", s->name, name);
	return NULL;
}

static struct prom_doc *prom_check(const char *text)
{
	static struct prom_doc d;
	char err[256];

	if (!prom_parse(text, &d, err, sizeof(err)))
		fail_msg("Prometheus exposition rejected: %s\n%s", err, text);
	return &d;
}

/* The checker must itself catch what it is there to catch. */
static void test_prom_checker(void **state)
{
	static const char *const bad[] = {
		"x 1\n",                                          /* no TYPE */
		"# TYPE x gauge\nx{a=\"1\"} 1\nx{a=\"1\"} 2\n",    /* duplicate */
		"# TYPE x gauge\nx{a=\"1\",a=\"2\"} 1\n",          /* label twice */
		"# TYPE x gauge\n# TYPE x gauge\nx 1\n",          /* TYPE twice */
		"# TYPE x gauge\nx 1\n# TYPE x gauge\n",          /* TYPE late */
		"# TYPE x meter\nx 1\n",                          /* bad type */
		"# TYPE x gauge\nx{a=\"\\t\"} 1\n",                /* bad escape */
		"# TYPE x gauge\nx{1a=\"b\"} 1\n",                 /* label name */
		"# TYPE 1x gauge\n1x 1\n",                        /* metric name */
		"# TYPE x gauge\nx 1z\n",                         /* value */
		"# TYPE x gauge\nx{a=\"b} 1\n",                    /* unterminated */
		"# TYPE x gauge\n# TYPE y gauge\nx 1\ny 1\nx{a=\"\"} 1\n", /* group */
		"# hello\n",                                      /* comment */
		"# TYPE x gauge\nx 1",                            /* no LF */
	};
	struct prom_doc d;
	char err[256];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		if (prom_parse(bad[i], &d, err, sizeof(err)))
			fail_msg("checker accepted bad input %zu:\n%s", i, bad[i]);
	assert_true(prom_parse("# HELP x a \\\\ b\n# TYPE x counter\nx{a=\"\\\"\\n\"} 1e3\n",
			       &d, err, sizeof(err)));
	assert_int_equal(d.n_samples, 1);
	assert_string_equal(d.samples[0].lvalue[0], "\"\n");
	free(d.samples);
}

static void test_prometheus(void **state)
{
	static const char *const families[] = { "libkv_bytes", "libkv_records",
		"libkv_peak_bytes", "libkv_label_bytes", "libkv_ops_total" };
	char *text = report(M.reg, KV_REPORT_PROMETHEUS);
	struct prom_doc *d = prom_check(text);
	double sum = 0;
	bool escaped_seen = false;
	size_t n_top, label_samples = 0;
	struct holder top[N_LABELS];

	for (size_t i = 0; i < sizeof(families) / sizeof(families[0]); i++) {
		struct prom_family *fam = prom_fam(d, families[i], false);

		if (!fam || !fam->help || !fam->type)
			fail_msg("family %s missing or without HELP/TYPE", families[i]);
	}
	n_top = model_top(top);
	for (size_t i = 0; i < d->n_samples; i++) {
		const struct prom_sample *s = &d->samples[i];
		enum kv_tier t;
		enum kv_kind k;

		assert_string_equal(prom_label(s, "registry"), REG_NAME);
		assert_true(s->value >= 0 && s->value == floor(s->value));
		if (strcmp(s->name, "libkv_bytes") == 0 || strcmp(s->name, "libkv_records") == 0) {
			bool records = s->name[6] == 'r';
			int node = atoi(prom_label(s, "node"));

			kv_assert_ok(kv_tier_parse(prom_label(s, "tier"), &t));
			kv_assert_ok(kv_kind_parse(prom_label(s, "kind"), &k));
			assert_int_equal((uint64_t)s->value, model_cell((int)t, node, (int)k, records));
			if (!records)
				sum += s->value;
		} else if (strcmp(s->name, "libkv_peak_bytes") == 0) {
			kv_assert_ok(kv_tier_parse(prom_label(s, "tier"), &t));
			kv_assert_ok(kv_kind_parse(prom_label(s, "kind"), &k));
			assert_int_equal((uint64_t)s->value, M.peak[t][k]);
		} else if (strcmp(s->name, "libkv_label_bytes") == 0) {
			const char *l = prom_label(s, "label");
			size_t j = 0;

			while (j < n_top && strcmp(labels[top[j].label], l) != 0)
				j++;
			if (j == n_top)
				fail_msg("label_bytes for a label that is no holder: \"%s\"", l);
			assert_int_equal((uint64_t)s->value, top[j].bytes);
			escaped_seen |= top[j].label == LABEL_ESCAPED;
			label_samples++;
		} else if (strcmp(s->name, "libkv_ops_total") == 0) {
			const char *op = prom_label(s, "op");
			uint64_t want = strcmp(op, "record") == 0 ? M.ops.records :
					strcmp(op, "move") == 0 ? M.ops.moves :
					strcmp(op, "resize") == 0 ? M.ops.resizes :
					strcmp(op, "forget") == 0 ? M.ops.forgets : UINT64_MAX;

			assert_int_equal((uint64_t)s->value, want);
		} else {
			fail_msg("unexpected family %s", s->name);
		}
	}
	/* Sums of a few GiB are exact in a double. */
	assert_int_equal((uint64_t)sum, model_cell(KV_ANY, KV_ANY, KV_ANY, false));
	assert_int_equal(label_samples, n_top);
	/* Node 0 of every tier x kind always, other nodes while they hold
	 * records: the series set is stable for a scraper. */
	size_t want_series = 0, got_series = 0;

	for (int t = 0; t < KV_TIER_COUNT; t++)
		for (int n = 0; n < KV_NODE_MAX; n++)
			for (int k = 0; k < KV_KIND_COUNT; k++)
				want_series += n == 0 || model_cell(t, n, k, true) > 0;
	for (size_t i = 0; i < d->n_samples; i++)
		got_series += strcmp(d->samples[i].name, "libkv_bytes") == 0;
	assert_int_equal(got_series, want_series);
	assert_true(escaped_seen);
	free(d->samples);
	free(text);
}

/* ---- Text ------------------------------------------------------------- */

/* Split a table line into cells separated by two or more spaces (a cell
 * such as "1.50 GiB" holds single spaces only). */
static size_t split_cells(const char *line, char cells[][64], size_t max)
{
	size_t n = 0;

	while (*line && n < max) {
		const char *end = strstr(line, "  ");
		size_t len = end ? (size_t)(end - line) : strlen(line);

		assert_true(len < 64);
		memcpy(cells[n], line, len);
		cells[n++][len] = '\0';
		line += len;
		while (*line == ' ')
			line++;
	}
	return n;
}

/* Lines of the table after `heading`, up to an empty line or the end;
 * fails unless all have the same width. */
static size_t table_lines(const char *text, const char *heading)
{
	const char *p = strstr(text, heading);
	size_t rows = 0, width = 0;

	if (!p)
		fail_msg("no table \"%s\" in:\n%s", heading, text);
	for (p += strlen(heading); *p && *p != '\n'; p = strchr(p, '\n') + 1) {
		size_t len = (size_t)(strchr(p, '\n') - p);

		if (rows++ == 0)
			width = len;
		else if (len != width)
			fail_msg("line %zu of table \"%s\" is %zu wide, not %zu:\n%s",
				 rows, heading, len, width, text);
	}
	return rows;
}

static void test_text(void **state)
{
	char *text = report(M.reg, KV_REPORT_TEXT);
	char *p, *line, cells[KV_KIND_COUNT + 4][64], buf[64];
	size_t width = 0, rows = 0, n, n_top;
	bool total_row = false;
	struct holder top[N_LABELS];

	assert_non_null(strstr(text, REG_NAME));
	assert_non_null(strstr(text, kv_version()));
	p = strstr(text, "live bytes (tier x kind):\n");
	assert_non_null(p);
	p = strchr(p, '\n') + 1;
	for (line = p; *line != '\n'; line = strchr(line, '\n') + 1) {
		size_t len = (size_t)(strchr(line, '\n') - line);
		char copy[512];
		int tier, node = -1;
		uint64_t want;

		assert_true(len < sizeof(copy));
		memcpy(copy, line, len);
		copy[len] = '\0';
		if (rows++ == 0)
			width = len;
		else if (len != width)
			fail_msg("table line %zu is %zu wide, header %zu:\n%s", rows, len, width, text);
		n = split_cells(copy, cells, KV_KIND_COUNT + 4);
		assert_int_equal(n, KV_KIND_COUNT + 3);
		if (rows == 1) {
			assert_string_equal(cells[0], "tier");
			assert_string_equal(cells[KV_KIND_COUNT + 1], "total");
			continue;
		}
		if (strcmp(cells[0], "total") == 0) {
			total_row = true;
			tier = KV_ANY;
		} else {
			char *slash = strchr(cells[0], '/');
			enum kv_tier t;

			if (slash) {
				*slash = '\0';
				node = atoi(slash + 1);
			}
			kv_assert_ok(kv_tier_parse(cells[0], &t));
			tier = (int)t;
			/* Only DRAM may show an empty row; the others are left out. */
			assert_true(tier == KV_TIER_DRAM ||
				    model_cell(tier, node, KV_ANY, true) > 0);
		}
		if (node < 0)
			node = KV_ANY;
		for (int k = 0; k < KV_KIND_COUNT; k++)
			assert_string_equal(cells[1 + k],
					    kv_format_bytes(model_cell(tier, node, k, false),
							    buf, sizeof(buf)));
		want = model_cell(tier, node, KV_ANY, false);
		assert_string_equal(cells[KV_KIND_COUNT + 1], kv_format_bytes(want, buf, sizeof(buf)));
		snprintf(buf, sizeof(buf), "%" PRIu64, model_cell(tier, node, KV_ANY, true));
		assert_string_equal(cells[KV_KIND_COUNT + 2], buf);
	}
	assert_true(total_row);
	/* Header, every live DRAM node (both here), at least one more tier,
	 * the total. */
	assert_true(rows >= 5);
	/* The other two tables line up too; the holders table holds the
	 * escaped label, which must stay on one line, escaped C-style. */
	assert_true(table_lines(text, "high-water marks (tier x kind, all nodes):\n") >= 3);
	n_top = model_top(top);
	assert_int_equal(table_lines(text, "top holders (up to 10):\n"),
			 1 + (n_top < 10 ? n_top : 10));
	assert_non_null(strstr(text, "\nsay \"hi\"\\\\n and\\nthen \\\\\"leave\\\\\"  "));
	free(text);
}

/* ---- Errors and edge cases -------------------------------------------- */

static void test_bad_format(void **state)
{
	static const unsigned bad[] = { 0, 3, 8, 5, 7, ~0u };
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	assert_non_null(f);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		kv_clear_error();
		kv_assert_rc(kv_report_write(M.reg, f, bad[i]), -EINVAL);
		assert_true(kv_last_error()[0] != '\0');
		assert_int_equal(fflush(f), 0);
		assert_int_equal(len, 0);
	}
	kv_clear_error();
	kv_assert_rc(kv_report_write(NULL, f, KV_REPORT_JSON), -EINVAL);
	assert_true(kv_last_error()[0] != '\0');
	kv_assert_rc(kv_report_write(M.reg, NULL, KV_REPORT_JSON), -EINVAL);
	assert_int_equal(fflush(f), 0);
	assert_int_equal(len, 0);
	fclose(f);
	free(buf);
}

static void test_empty(void **state)
{
	struct kv_registry_config cfg;
	struct kv_registry *reg;
	char *text;
	json_object *root, *tiers;
	struct prom_doc *d;

	kv_registry_config_default(&cfg);
	cfg.numa_nodes = 0x1;
	kv_assert_ok(kv_registry_create(&cfg, &reg));

	text = report(reg, KV_REPORT_JSON);
	root = parse_json(text);
	assert_int_equal(jint(root, "total_bytes"), 0);
	assert_int_equal(jint(root, "total_records"), 0);
	assert_int_equal(json_object_array_length(jget(root, "cells", json_type_array)), 0);
	assert_int_equal(json_object_array_length(jget(root, "peaks", json_type_array)), 0);
	assert_int_equal(json_object_array_length(jget(root, "labels", json_type_array)), 0);
	tiers = jget(root, "tiers", json_type_array);
	assert_int_equal(json_object_array_length(tiers), KV_TIER_COUNT);
	assert_int_equal(json_object_object_length(jget(root, "stats", json_type_object)), 0);
	assert_int_equal(json_object_object_length(jget(root, "stat_info", json_type_object)), 0);
	assert_int_equal(json_object_object_length(jget(root, "stat_errors", json_type_object)), 0);
	json_object_put(root);
	free(text);

	text = report(reg, KV_REPORT_PROMETHEUS);
	d = prom_check(text);
	for (size_t i = 0; i < d->n_samples; i++)
		if (strcmp(d->samples[i].name, "libkv_ops_total") != 0)
			assert_true(d->samples[i].value == 0);
	free(d->samples);
	free(text);

	text = report(reg, KV_REPORT_TEXT);
	assert_non_null(strstr(text, "\ndram "));
	assert_non_null(strstr(text, "\ntotal "));
	assert_non_null(strstr(text, "\nstats:\n(none)\n"));
	free(text);

	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* With the default batched charging a peak may run ahead of the truth,
 * within the bound the header states, and never below the live bytes. */
static void test_batched_peaks(void **state)
{
	struct kv_registry_config cfg;
	struct kv_registry *reg;
	kv_handle h[3];
	json_object *root, *peaks;
	char *text;
	uint64_t truth = 3 * (10 * MiB + 1), got = 0;

	kv_registry_config_default(&cfg);
	cfg.numa_nodes = 0x1;
	assert_true(cfg.peak_batch > 0);
	kv_assert_ok(kv_registry_create(&cfg, &reg));
	for (int i = 0; i < 3; i++)
		kv_assert_ok(kv_registry_record(reg, 10 * MiB + 1, KV_TIER_DRAM, 0,
						KV_KIND_KV, 0, "batched", &h[i]));
	kv_assert_ok(kv_registry_forget(reg, h[0]));

	text = report(reg, KV_REPORT_JSON);
	root = parse_json(text);
	peaks = jget(root, "peaks", json_type_array);
	for (size_t i = 0; i < json_object_array_length(peaks); i++) {
		json_object *p = json_object_array_get_idx(peaks, i);

		if (jtier(p) == KV_TIER_DRAM && jkind(p) == KV_KIND_KV)
			got = jint(p, "bytes");
	}
	assert_true(got >= truth);
	assert_true(got <= truth + 2 * cfg.peak_batch * cfg.shards);
	assert_int_equal(jint(root, "total_bytes"), 2 * (10 * MiB + 1));
	json_object_put(root);
	free(text);

	kv_assert_ok(kv_registry_forget(reg, h[1]));
	kv_assert_ok(kv_registry_forget(reg, h[2]));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

static void test_write_errors(void **state)
{
	static const unsigned formats[] = { KV_REPORT_TEXT, KV_REPORT_JSON,
					    KV_REPORT_PROMETHEUS };

	for (size_t i = 0; i < sizeof(formats) / sizeof(formats[0]); i++) {
		FILE *f = fopen("/dev/null", "r");

		assert_non_null(f);
		kv_clear_error();
		kv_assert_rc(kv_report_write(M.reg, f, formats[i]), -EIO);
		assert_true(kv_last_error()[0] != '\0');
		fclose(f);

		f = fopen("/dev/full", "w");
		if (!f) /* some containers have no /dev/full; /dev/null covered -EIO */
			continue;
		kv_assert_rc(kv_report_write(M.reg, f, formats[i]), -EIO);
		assert_true(kv_last_error()[0] != '\0');
		fclose(f);
	}
}

/* ---- Stats sources ---------------------------------------------------- */

/* One stat of each shape a report must print: small and huge integers,
 * fractions, zero, a negative, the non-finite values, both types, help
 * that needs escaping. */
static const struct kv_stat cache_stats[] = {
	{ "blocks_total", 1024, KV_STAT_GAUGE, "Blocks in the pool." },
	{ "blocks_free", 0, KV_STAT_GAUGE, NULL },
	{ "hit_ratio_dram", 0.875, KV_STAT_GAUGE, "Lookups served from DRAM." },
	{ "hit_ratio_ssd", 0.1, KV_STAT_GAUGE, "" },
	{ "tokens_skipped", 123456789, KV_STAT_COUNTER, "Prompt tokens not recomputed." },
	{ "spilled_bytes", 1152921504606846976.0 /* 2^60 */, KV_STAT_COUNTER, NULL },
	{ "waste_ratio", NAN, KV_STAT_GAUGE, NULL },
	{ "age_max", INFINITY, KV_STAT_GAUGE, NULL },
	{ "drift_min", -INFINITY, KV_STAT_GAUGE, NULL },
	{ "temp", -2.5, KV_STAT_GAUGE, "say \"hi\" \\ bye\tnow" },
};
#define N_CACHE_STATS (sizeof(cache_stats) / sizeof(cache_stats[0]))
/* How the text report prints each of them. */
static const char *const cache_text[N_CACHE_STATS] = {
	"1024", "0", "0.875", "0.1", "123456789", "1.15292e+18", "nan", "inf", "-inf", "-2.5",
};

static const struct kv_stat first_stats[] = {
	{ "ops", 7, KV_STAT_COUNTER, NULL },
};

struct fixed_source {
	const struct kv_stat *stats;
	size_t n;
	int calls;
};

static int fixed_fn(void *ctx, struct kv_stat *out, size_t max)
{
	struct fixed_source *fs = ctx;

	fs->calls++;
	if (max < fs->n)
		return -E2BIG;
	if (fs->n)
		memcpy(out, fs->stats, fs->n * sizeof(*out));
	return (int)fs->n;
}

/* Fails the way libkv code does: through a call that leaves a detail. */
static int failing_fn(void *ctx, struct kv_stat *out, size_t max)
{
	struct kv_holder h;

	(void)out;
	(void)max;
	return kv_registry_label(ctx, "no-such-label", &h);
}

static int bad_name_fn(void *ctx, struct kv_stat *out, size_t max)
{
	(void)ctx;
	(void)max;
	out[0] = (struct kv_stat){ "Bad-Name", 1, KV_STAT_GAUGE, NULL };
	return 1;
}

static const struct kv_stat *stat_named(const char *source, const char *name)
{
	const struct kv_stat *set = strcmp(source, "cache") == 0 ? cache_stats
				    : strcmp(source, "a-first") == 0 ? first_stats : NULL;
	size_t n = set == cache_stats ? N_CACHE_STATS : set ? 1 : 0;

	for (size_t i = 0; i < n; i++)
		if (strcmp(set[i].name, name) == 0)
			return &set[i];
	fail_msg("stat %s.%s was never reported by a source", source, name);
	return NULL;
}

static void assert_same_value(double got, double want)
{
	if (isnan(want))
		assert_true(isnan(got));
	else if (got != want)
		fail_msg("stat value %.17g, want %.17g", got, want);
}

static struct kv_registry *stats_registry(struct fixed_source *cache, struct fixed_source *empty,
					  struct fixed_source *first, uint64_t id[5])
{
	struct kv_registry_config cfg;
	struct kv_registry *reg;

	kv_registry_config_default(&cfg);
	cfg.numa_nodes = 0x1;
	cfg.name = "stats";
	kv_assert_ok(kv_registry_create(&cfg, &reg));
	*cache = (struct fixed_source){ cache_stats, N_CACHE_STATS, 0 };
	*empty = (struct fixed_source){ NULL, 0, 0 };
	*first = (struct fixed_source){ first_stats, 1, 0 };
	/* Added out of name order: reports sort them. */
	kv_assert_ok(kv_registry_add_stats(reg, "zz.bad-name", bad_name_fn, NULL, &id[0]));
	kv_assert_ok(kv_registry_add_stats(reg, "cache", fixed_fn, cache, &id[1]));
	kv_assert_ok(kv_registry_add_stats(reg, "empty", fixed_fn, empty, &id[2]));
	kv_assert_ok(kv_registry_add_stats(reg, "broken", failing_fn, reg, &id[3]));
	kv_assert_ok(kv_registry_add_stats(reg, "a-first", fixed_fn, first, &id[4]));
	return reg;
}

static void test_stats_json(void **state)
{
	struct fixed_source cache, empty, first;
	uint64_t id[5];
	struct kv_registry *reg = stats_registry(&cache, &empty, &first, id);
	struct kv_holder h;
	char before[256], *text;
	json_object *root, *stats, *info, *errs, *src, *v, *e;

	/* A detail the caller had keeps through a report whose sources fail. */
	kv_assert_rc(kv_registry_label(reg, "callers-own", &h), -ENOENT);
	snprintf(before, sizeof(before), "%s", kv_last_error());
	text = report(reg, KV_REPORT_JSON);
	assert_string_equal(kv_last_error(), before);
	assert_int_equal(cache.calls, 1);
	root = parse_json(text);

	stats = jget(root, "stats", json_type_object);
	info = jget(root, "stat_info", json_type_object);
	errs = jget(root, "stat_errors", json_type_object);
	assert_int_equal(json_object_object_length(stats), 3);
	assert_int_equal(json_object_object_length(info), 3);
	assert_int_equal(json_object_object_length(errs), 2);

	src = jget(stats, "cache", json_type_object);
	assert_int_equal(json_object_object_length(src), N_CACHE_STATS);
	for (size_t i = 0; i < N_CACHE_STATS; i++) {
		const struct kv_stat *want = &cache_stats[i];
		json_object *meta = jget(jget(info, "cache", json_type_object), want->name,
					 json_type_object);

		assert_true(json_object_object_get_ex(src, want->name, &v));
		if (!isfinite(want->value))
			assert_true(json_object_is_type(v, json_type_null));
		else
			assert_same_value(json_object_get_double(v), want->value);
		assert_string_equal(json_object_get_string(jget(meta, "type", json_type_string)),
				    want->type == KV_STAT_COUNTER ? "counter" : "gauge");
		assert_string_equal(json_object_get_string(jget(meta, "help", json_type_string)),
				    want->help ? want->help : "");
	}
	/* Integers stay integers (a tool reading int64 gets them exactly). */
	assert_true(json_object_is_type(jget(src, "blocks_total", json_type_int), json_type_int));
	assert_int_equal(jint(src, "tokens_skipped"), 123456789);
	/* Fractions are written so that they read back exactly. */
	assert_non_null(strstr(text, "\"hit_ratio_ssd\": 0.1,"));
	assert_int_equal(jint(jget(stats, "a-first", json_type_object), "ops"), 7);
	assert_int_equal(json_object_object_length(jget(stats, "empty", json_type_object)), 0);
	assert_int_equal(json_object_object_length(jget(info, "empty", json_type_object)), 0);

	e = jget(errs, "broken", json_type_object);
	assert_int_equal(json_object_get_int(jget(e, "code", json_type_int)), -ENOENT);
	assert_string_equal(json_object_get_string(jget(e, "error", json_type_string)),
			    kv_strerror(-ENOENT));
	assert_non_null(strstr(json_object_get_string(jget(e, "detail", json_type_string)),
			       "no-such-label"));
	e = jget(errs, "zz.bad-name", json_type_object);
	assert_int_equal(json_object_get_int(jget(e, "code", json_type_int)), -EINVAL);
	assert_non_null(strstr(json_object_get_string(jget(e, "detail", json_type_string)),
			       "Bad-Name"));
	assert_false(json_object_object_get_ex(stats, "broken", NULL));

	/* Sources in name order, whatever order they were added in. */
	assert_true(strstr(text, "\"a-first\"") < strstr(text, "\"cache\""));
	assert_true(strstr(text, "\"cache\"") < strstr(text, "\"empty\""));
	json_object_put(root);
	free(text);

	for (size_t i = 0; i < 5; i++)
		kv_assert_ok(kv_registry_remove_stats(reg, id[i]));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

static void test_stats_prometheus(void **state)
{
	struct fixed_source cache, empty, first;
	uint64_t id[5];
	struct kv_registry *reg = stats_registry(&cache, &empty, &first, id);
	static const char *const families[] = { "libkv_stat", "libkv_stat_total",
						"libkv_stat_source_up" };
	char *text = report(reg, KV_REPORT_PROMETHEUS);
	struct prom_doc *d = prom_check(text);
	size_t n_stats = 0, n_up = 0;

	for (size_t i = 0; i < sizeof(families) / sizeof(families[0]); i++) {
		struct prom_family *fam = prom_fam(d, families[i], false);

		if (!fam || !fam->help || !fam->type)
			fail_msg("family %s missing or without HELP/TYPE", families[i]);
	}
	assert_non_null(strstr(text, "# TYPE libkv_stat gauge\n"));
	assert_non_null(strstr(text, "# TYPE libkv_stat_total counter\n"));
	for (size_t i = 0; i < d->n_samples; i++) {
		const struct prom_sample *s = &d->samples[i];
		bool counter = strcmp(s->name, "libkv_stat_total") == 0;

		assert_string_equal(prom_label(s, "registry"), "stats");
		if (counter || strcmp(s->name, "libkv_stat") == 0) {
			const struct kv_stat *want = stat_named(prom_label(s, "source"),
								prom_label(s, "name"));

			assert_int_equal(want->type == KV_STAT_COUNTER, counter);
			assert_same_value(s->value, want->value);
			n_stats++;
		} else if (strcmp(s->name, "libkv_stat_source_up") == 0) {
			const char *src = prom_label(s, "source");
			bool ok = strcmp(src, "broken") != 0 && strcmp(src, "zz.bad-name") != 0;

			assert_true(s->value == (ok ? 1 : 0));
			n_up++;
		}
	}
	assert_int_equal(n_stats, N_CACHE_STATS + 1);
	assert_int_equal(n_up, 5);
	/* The format's own spellings of the non-finite values. */
	assert_non_null(strstr(text, "name=\"waste_ratio\"} NaN\n"));
	assert_non_null(strstr(text, "name=\"age_max\"} +Inf\n"));
	assert_non_null(strstr(text, "name=\"drift_min\"} -Inf\n"));
	assert_non_null(strstr(text, "name=\"hit_ratio_ssd\"} 0.1\n"));
	free(d->samples);
	free(text);

	for (size_t i = 0; i < 5; i++)
		kv_assert_ok(kv_registry_remove_stats(reg, id[i]));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* The line of text's stats section starting with "  <key> ", or fail. */
static const char *stats_line(const char *text, const char *key, size_t *len)
{
	char want[2 * KV_STAT_NAME_MAX + 8];
	const char *sec = strstr(text, "\nstats:\n"), *p, *nl;

	assert_non_null(sec);
	snprintf(want, sizeof(want), "\n  %.*s ", 2 * KV_STAT_NAME_MAX + 1, key);
	/* From the line feed that ends "stats:", so the first line matches. */
	p = strstr(sec + strlen("\nstats:"), want);
	if (!p)
		fail_msg("no stats line for %s in:\n%s", key, sec);
	p++;
	nl = strchr(p, '\n');
	assert_non_null(nl);
	*len = (size_t)(nl - p);
	return p;
}

static void test_stats_text(void **state)
{
	struct fixed_source cache, empty, first;
	uint64_t id[5];
	struct kv_registry *reg = stats_registry(&cache, &empty, &first, id);
	char *text = report(reg, KV_REPORT_TEXT);
	const char *sec = strstr(text, "\nstats:\n"), *line;
	size_t len, value_end = 0;
	char key[2 * KV_STAT_NAME_MAX + 2], copy[512];

	assert_non_null(sec);
	/* After the holders, last. */
	assert_true(sec > strstr(text, "top holders"));
	sec += strlen("\nstats:\n");
	for (size_t i = 0; i < N_CACHE_STATS; i++) {
		char cells[4][64];
		size_t n, end;

		snprintf(key, sizeof(key), "cache.%s", cache_stats[i].name);
		line = stats_line(text, key, &len);
		assert_true(len < sizeof(copy));
		memcpy(copy, line, len);
		copy[len] = '\0';
		n = split_cells(copy + 2, cells, 4);
		assert_true(n >= 2);
		assert_string_equal(cells[0], key);
		assert_string_equal(cells[1], cache_text[i]);
		/* Values are right-aligned: they all end in the same column. */
		end = (size_t)(strstr(copy + 2 + strlen(key), cells[1]) - copy) + strlen(cells[1]);
		if (value_end == 0)
			value_end = end;
		assert_int_equal(end, value_end);
		if (cache_stats[i].help && cache_stats[i].help[0] && i != N_CACHE_STATS - 1)
			assert_string_equal(cells[2], cache_stats[i].help);
		else if (i != N_CACHE_STATS - 1)
			assert_int_equal(n, 2);
	}
	/* Help is escaped like labels: a tab cannot fake a column. */
	assert_non_null(strstr(sec, "  say \"hi\" \\\\ bye\\tnow\n"));
	line = stats_line(text, "a-first.ops", &len);
	assert_non_null(strstr(line, " 7\n"));
	line = stats_line(text, "broken", &len);
	assert_true(strstr(line, "failed: -ENOENT") < line + len);
	assert_true(strstr(line, "no-such-label") < line + len);
	line = stats_line(text, "zz.bad-name", &len);
	assert_true(strstr(line, "failed: -EINVAL") < line + len);
	line = stats_line(text, "empty", &len);
	assert_true(strstr(line, "(no stats)") < line + len);
	/* Ordered by source name. */
	assert_true(strstr(sec, "  a-first.") < strstr(sec, "  broken "));
	assert_true(strstr(sec, "  broken ") < strstr(sec, "  cache."));
	assert_true(strstr(sec, "  empty ") < strstr(sec, "  zz.bad-name "));
	free(text);

	for (size_t i = 0; i < 5; i++)
		kv_assert_ok(kv_registry_remove_stats(reg, id[i]));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

/* A removed source is neither called nor shown, in any format. */
static void test_stats_removed(void **state)
{
	struct fixed_source cache, empty, first;
	uint64_t id[5];
	struct kv_registry *reg = stats_registry(&cache, &empty, &first, id);
	json_object *root;
	struct prom_doc *d;
	char *text;

	kv_assert_ok(kv_registry_remove_stats(reg, id[1])); /* cache */
	kv_assert_rc(kv_registry_remove_stats(reg, id[1]), -ENOENT);
	text = report(reg, KV_REPORT_JSON);
	root = parse_json(text);
	assert_false(json_object_object_get_ex(jget(root, "stats", json_type_object), "cache", NULL));
	assert_false(json_object_object_get_ex(jget(root, "stat_info", json_type_object), "cache",
					       NULL));
	assert_int_equal(json_object_object_length(jget(root, "stats", json_type_object)), 2);
	json_object_put(root);
	free(text);

	text = report(reg, KV_REPORT_PROMETHEUS);
	d = prom_check(text);
	for (size_t i = 0; i < d->n_samples; i++)
		if (strncmp(d->samples[i].name, "libkv_stat", 10) == 0)
			assert_string_not_equal(prom_label(&d->samples[i], "source"), "cache");
	free(d->samples);
	free(text);

	text = report(reg, KV_REPORT_TEXT);
	assert_null(strstr(text, "cache."));
	free(text);
	assert_int_equal(cache.calls, 0);
	assert_int_equal(first.calls, 3);

	for (size_t i = 0; i < 5; i++)
		if (i != 1)
			kv_assert_ok(kv_registry_remove_stats(reg, id[i]));
	text = report(reg, KV_REPORT_TEXT);
	assert_non_null(strstr(text, "\nstats:\n(none)\n"));
	free(text);
	assert_int_equal(first.calls, 3);
	kv_assert_ok(kv_registry_validate(reg));
	kv_assert_ok(kv_registry_destroy(reg, 0));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_prom_checker),
		cmocka_unit_test(test_json),
		cmocka_unit_test(test_prometheus),
		cmocka_unit_test(test_text),
		cmocka_unit_test(test_bad_format),
		cmocka_unit_test(test_empty),
		cmocka_unit_test(test_batched_peaks),
		cmocka_unit_test(test_write_errors),
		cmocka_unit_test(test_stats_json),
		cmocka_unit_test(test_stats_prometheus),
		cmocka_unit_test(test_stats_text),
		cmocka_unit_test(test_stats_removed),
	};

	return cmocka_run_group_tests(tests, setup_registry, teardown_registry);
}
