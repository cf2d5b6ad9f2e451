// SPDX-License-Identifier: MIT
/*
 * Reports of a registry: an aligned table for people, JSON (schema
 * "libkv.report/1", docs/report.md) for tools and Prometheus text
 * exposition 0.0.4 for servers; entry point kv_report_write(). Every report
 * is formatted from one snapshot taken first through the registry's public
 * query calls, and all totals are summed from that snapshot, so a report
 * always agrees with itself even while other threads keep recording. The
 * snapshot also holds a copy of what every stats source said (or how it
 * failed), read through kv_registry_stats_foreach().
 */
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kv/taxonomy.h>

#include "kv-private.h"

/* Holders listed in the text table, and in JSON and Prometheus. Prometheus
 * makes a series of each, so the machine formats stay bounded too. */
#define REPORT_TOP_TEXT 10
#define REPORT_TOP_MACHINE 64

/* Text table rows: the header, one per DRAM or device node, one per other
 * tier, and the total. */
#define REPORT_ROWS_MAX (2 + 2 * KV_NODE_MAX + KV_TIER_COUNT)

/* A byte count in kv_format_bytes() form, or a decimal integer. */
#define REPORT_NUM_MAX 32

/* A stats source as the snapshot holds it. Its strings are copied: the
 * source's own may go once it is removed. */
struct report_stat {
	char name[KV_STAT_NAME_MAX + 1];
	double value;
	enum kv_stat_type type;
	char *help; /* NULL: none */
};

struct report_source {
	char name[KV_STAT_NAME_MAX + 1];
	int err;      /* 0, or the error the source failed with */
	char *detail; /* with err: its kv_last_error() detail, maybe "" */
	size_t n;
	struct report_stat *stats; /* (n) */
};

struct report_snap {
	const char *name;
	struct kv_registry_ops ops;
	uint64_t bytes[KV_TIER_COUNT][KV_NODE_MAX][KV_KIND_COUNT];
	uint64_t records[KV_TIER_COUNT][KV_NODE_MAX][KV_KIND_COUNT];
	/* Derived from the two arrays above, never queried separately. */
	uint64_t tier_kind[KV_TIER_COUNT][KV_KIND_COUNT];
	uint64_t tier_bytes[KV_TIER_COUNT];
	uint64_t tier_records[KV_TIER_COUNT];
	uint64_t node_bytes[KV_TIER_COUNT][KV_NODE_MAX];
	uint64_t node_records[KV_TIER_COUNT][KV_NODE_MAX];
	uint64_t total_bytes, total_records;
	uint64_t peak[KV_TIER_COUNT][KV_KIND_COUNT];
	struct kv_holder top[REPORT_TOP_MACHINE];
	size_t n_top;
	/* Ordered by name, as kv_registry_stats_foreach() visits them. */
	struct report_source src[KV_STATS_SOURCES_MAX];
	size_t n_src;
};

static int snap_source(void *p, const char *source, const struct kv_stat *st,
		       size_t n, int err)
{
	struct report_snap *s = p;
	struct report_source *r = &s->src[s->n_src];

	if (s->n_src == KV_ARRAY_SIZE(s->src))
		return kv_fail(EFAULT, "report: more stats sources visited than a registry holds");
	s->n_src++;
	snprintf(r->name, sizeof(r->name), "%s", source);
	r->err = err;
	if (err < 0) {
		r->detail = strdup(kv_last_error());
		return r->detail ? 0 : kv_fail(ENOMEM, "report: no memory for stats source '%s'",
					       source);
	}
	if (n == 0)
		return 0;
	r->stats = calloc(n, sizeof(*r->stats));
	if (!r->stats)
		return kv_fail(ENOMEM, "report: no memory for %zu stats of source '%s'", n, source);
	r->n = n;
	for (size_t i = 0; i < n; i++) {
		struct report_stat *d = &r->stats[i];

		snprintf(d->name, sizeof(d->name), "%s", st[i].name);
		d->value = st[i].value;
		d->type = st[i].type;
		if (st[i].help && !(d->help = strdup(st[i].help)))
			return kv_fail(ENOMEM, "report: no memory for stats of source '%s'", source);
	}
	return 0;
}

static void report_snap_free(struct report_snap *s)
{
	for (size_t i = 0; i < s->n_src; i++) {
		for (size_t j = 0; j < s->src[i].n; j++)
			free(s->src[i].stats[j].help);
		free(s->src[i].stats);
		free(s->src[i].detail);
	}
	free(s);
}

/* Query every cell once, then derive the sums. Peaks are read after the
 * cells and raised to at least the bytes shown: cells read at slightly
 * different instants may add up to more than any one instant held, and a
 * report whose high-water mark is below its live bytes would contradict
 * itself. */
static int report_snapshot(const struct kv_registry *reg, struct report_snap *s)
{
	int rc;

	s->name = kv_registry_name(reg);
	kv_registry_ops(reg, &s->ops);
	for (int t = 0; t < KV_TIER_COUNT; t++) {
		for (int n = 0; n < KV_NODE_MAX; n++) {
			for (int k = 0; k < KV_KIND_COUNT; k++) {
				rc = kv_registry_bytes(reg, t, n, k, &s->bytes[t][n][k]);
				if (rc == 0)
					rc = kv_registry_count(reg, t, n, k,
							       &s->records[t][n][k]);
				if (rc < 0)
					return rc;
				s->tier_kind[t][k] += s->bytes[t][n][k];
				s->node_bytes[t][n] += s->bytes[t][n][k];
				s->node_records[t][n] += s->records[t][n][k];
			}
			s->tier_bytes[t] += s->node_bytes[t][n];
			s->tier_records[t] += s->node_records[t][n];
		}
		s->total_bytes += s->tier_bytes[t];
		s->total_records += s->tier_records[t];
	}
	for (int t = 0; t < KV_TIER_COUNT; t++) {
		for (int k = 0; k < KV_KIND_COUNT; k++) {
			rc = kv_registry_peak(reg, (enum kv_tier)t, (enum kv_kind)k,
					      &s->peak[t][k]);
			if (rc < 0)
				return rc;
			if (s->peak[t][k] < s->tier_kind[t][k])
				s->peak[t][k] = s->tier_kind[t][k];
		}
	}
	rc = kv_registry_top(reg, s->top, KV_ARRAY_SIZE(s->top), &s->n_top);
	if (rc < 0)
		return rc;
	for (size_t i = 0; i < s->n_top; i++)
		if (s->top[i].peak < s->top[i].bytes)
			s->top[i].peak = s->top[i].bytes;
	/* A source that fails is recorded as failed by snap_source(); only
	 * running out of memory (or a nested call) fails the report. */
	return kv_registry_stats_foreach(reg, snap_source, s);
}

/* A stat's value exactly, for machines: the shortest of 15 to 17
 * significant digits that reads back as v ("0.1", not
 * "0.10000000000000001"). v must be finite. */
static const char *stat_exact(double v, char *buf, size_t len)
{
	for (int prec = 15;; prec++) {
		snprintf(buf, len, "%.*g", prec, v);
		if (prec == 17 || strtod(buf, NULL) == v)
			return buf;
	}
}

/* ---- Text ------------------------------------------------------------- */

/* Write s for a one-line table cell: backslash and control characters
 * escaped C-style so a label cannot break a line or fake a column. Returns
 * the width in columns (UTF-8 code points), also when f is NULL, which
 * only measures. */
static size_t text_escaped(FILE *f, const char *s)
{
	size_t w = 0;
	char esc[8];

	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		const char *out = NULL;

		if (*p == '\\')
			out = "\\\\";
		else if (*p == '\n')
			out = "\\n";
		else if (*p == '\t')
			out = "\\t";
		else if (*p == '\r')
			out = "\\r";
		else if (*p < 0x20 || *p == 0x7f) {
			snprintf(esc, sizeof(esc), "\\x%02x", *p);
			out = esc;
		}
		if (out) {
			w += strlen(out);
			if (f)
				fputs(out, f);
			continue;
		}
		if ((*p & 0xc0) != 0x80)
			w++;
		if (f)
			fputc(*p, f);
	}
	return w;
}

/* A table is a function giving the text of (row, col); row 0 is the
 * header. It is called twice per cell, once to measure and once to print,
 * so no cell text has to be kept. */
struct text_table {
	size_t rows, cols;
	const char *(*cell)(const struct text_table *t, size_t row, size_t col,
			    char *buf, size_t len);
	const struct report_snap *s;
	/* Main table: each body row's tier and node (-1: all nodes). */
	int row_tier[REPORT_ROWS_MAX];
	int row_node[REPORT_ROWS_MAX];
};

/* The first column is left-aligned (names), the others right-aligned
 * (figures), so that units line up. Every line has the same width. */
static void text_table_print(FILE *f, const struct text_table *t)
{
	size_t width[KV_KIND_COUNT + 3] = { 0 };
	char buf[REPORT_NUM_MAX];

	for (size_t r = 0; r < t->rows; r++) {
		for (size_t c = 0; c < t->cols; c++) {
			size_t w = text_escaped(NULL, t->cell(t, r, c, buf, sizeof(buf)));

			if (w > width[c])
				width[c] = w;
		}
	}
	for (size_t r = 0; r < t->rows; r++) {
		for (size_t c = 0; c < t->cols; c++) {
			const char *s = t->cell(t, r, c, buf, sizeof(buf));
			size_t pad = width[c] - text_escaped(NULL, s);

			if (c > 0)
				fputs("  ", f);
			if (c == 0)
				text_escaped(f, s);
			for (size_t i = 0; i < pad; i++)
				fputc(' ', f);
			if (c > 0)
				text_escaped(f, s);
		}
		fputc('\n', f);
	}
}

static const char *text_num(uint64_t v, char *buf, size_t len)
{
	snprintf(buf, len, "%" PRIu64, v);
	return buf;
}

/* Columns: tier, one per kind, total, records. */
static const char *text_cell_live(const struct text_table *t, size_t row,
				  size_t col, char *buf, size_t len)
{
	const struct report_snap *s = t->s;
	uint64_t bytes = 0, records = 0;

	if (row == 0) {
		if (col == 0)
			return "tier";
		if (col <= KV_KIND_COUNT)
			return kv_kind_name((enum kv_kind)(col - 1));
		return col == KV_KIND_COUNT + 1 ? "total" : "records";
	}
	if (row == t->rows - 1) {
		if (col == 0)
			return "total";
		if (col <= KV_KIND_COUNT) {
			for (int tier = 0; tier < KV_TIER_COUNT; tier++)
				bytes += s->tier_kind[tier][col - 1];
			return kv_format_bytes(bytes, buf, len);
		}
		if (col == KV_KIND_COUNT + 1)
			return kv_format_bytes(s->total_bytes, buf, len);
		return text_num(s->total_records, buf, len);
	}

	int tier = t->row_tier[row], node = t->row_node[row];

	if (col == 0) {
		if (node < 0)
			return kv_tier_name((enum kv_tier)tier);
		snprintf(buf, len, "%s/%d", kv_tier_name((enum kv_tier)tier), node);
		return buf;
	}
	if (col <= KV_KIND_COUNT) {
		bytes = node < 0 ? s->tier_kind[tier][col - 1]
				 : s->bytes[tier][node][col - 1];
		return kv_format_bytes(bytes, buf, len);
	}
	if (col == KV_KIND_COUNT + 1) {
		bytes = node < 0 ? s->tier_bytes[tier] : s->node_bytes[tier][node];
		return kv_format_bytes(bytes, buf, len);
	}
	records = node < 0 ? s->tier_records[tier] : s->node_records[tier][node];
	return text_num(records, buf, len);
}

/* Columns: tier, one per kind. Body rows are tiers (all nodes). */
static const char *text_cell_peak(const struct text_table *t, size_t row,
				  size_t col, char *buf, size_t len)
{
	if (col == 0)
		return row == 0 ? "tier" : kv_tier_name((enum kv_tier)t->row_tier[row]);
	if (row == 0)
		return kv_kind_name((enum kv_kind)(col - 1));
	return kv_format_bytes(t->s->peak[t->row_tier[row]][col - 1], buf, len);
}

/* Columns: label, bytes, records, peak. Body rows are the top holders. */
static const char *text_cell_top(const struct text_table *t, size_t row,
				 size_t col, char *buf, size_t len)
{
	static const char *const head[] = { "label", "bytes", "records", "peak" };
	const struct kv_holder *h = &t->s->top[row - (row > 0)];

	if (row == 0)
		return head[col];
	switch (col) {
	case 0: return h->label[0] ? h->label : "(no label)";
	case 1: return kv_format_bytes(h->bytes, buf, len);
	case 2: return text_num(h->records, buf, len);
	default: return kv_format_bytes(h->peak, buf, len);
	}
}

/* DRAM and device memory are split per node, the node being a NUMA node or
 * a device ordinal that matters for placement; the farther tiers are one
 * row each. Tiers with nothing live are left out, except DRAM, which
 * always has a row so that an empty report still shows the table. */
static void text_live_rows(struct text_table *t)
{
	const struct report_snap *s = t->s;
	size_t r = 1;

	for (int tier = 0; tier < KV_TIER_COUNT; tier++) {
		bool split = tier == KV_TIER_DRAM || tier == KV_TIER_DEVICE;
		size_t first = r;

		if (split) {
			for (int n = 0; n < KV_NODE_MAX; n++) {
				if (!s->node_bytes[tier][n] && !s->node_records[tier][n])
					continue;
				t->row_tier[r] = tier;
				t->row_node[r++] = n;
			}
		} else if (s->tier_bytes[tier] || s->tier_records[tier]) {
			t->row_tier[r] = tier;
			t->row_node[r++] = -1;
		}
		if (r == first && tier == KV_TIER_DRAM) {
			t->row_tier[r] = tier;
			t->row_node[r++] = -1;
		}
	}
	t->rows = r + 1;
}

/* A stat's value for people: integers without decimals while a double
 * holds them exactly (below 2^53), anything else in 6 significant digits. */
static const char *stat_text(double v, char *buf, size_t len)
{
	if (v == 0)
		v = 0; /* no "-0" */
	if (isfinite(v) && v == floor(v) && fabs(v) < 9007199254740992.0)
		snprintf(buf, len, "%.0f", v);
	else
		snprintf(buf, len, "%.6g", v);
	return buf;
}

/* One line per stat, "<source>.<name>  <value>  <help>", names
 * left-aligned and values right-aligned so that digits line up; a source
 * that failed or has no stats gets one line saying so. Names need no
 * escaping: the registry only accepts [a-z0-9_.-]. */
static void report_text_stats(FILE *f, const struct report_snap *s)
{
	char buf[REPORT_NUM_MAX];
	size_t wkey = 0, wval = 0;

	fputs("\nstats:\n", f);
	if (s->n_src == 0) {
		fputs("(none)\n", f);
		return;
	}
	for (size_t i = 0; i < s->n_src; i++) {
		const struct report_source *r = &s->src[i];
		size_t w = strlen(r->name);

		if ((r->err || r->n == 0) && w > wkey)
			wkey = w;
		for (size_t j = 0; j < r->n; j++) {
			size_t wk = w + 1 + strlen(r->stats[j].name);
			size_t wv = strlen(stat_text(r->stats[j].value, buf, sizeof(buf)));

			wkey = wk > wkey ? wk : wkey;
			wval = wv > wval ? wv : wval;
		}
	}
	for (size_t i = 0; i < s->n_src; i++) {
		const struct report_source *r = &s->src[i];

		if (r->err) {
			fprintf(f, "  %-*s  failed: %s", (int)wkey, r->name, kv_strerror(r->err));
			if (r->detail[0]) {
				fputs(": ", f);
				text_escaped(f, r->detail);
			}
			fputc('\n', f);
			continue;
		}
		if (r->n == 0)
			fprintf(f, "  %-*s  (no stats)\n", (int)wkey, r->name);
		for (size_t j = 0; j < r->n; j++) {
			const struct report_stat *st = &r->stats[j];
			int pad = (int)(wkey - strlen(r->name) - 1 - strlen(st->name));

			fprintf(f, "  %s.%s%*s  %*s", r->name, st->name, pad, "", (int)wval,
				stat_text(st->value, buf, sizeof(buf)));
			if (st->help && st->help[0]) {
				fputs("  ", f);
				text_escaped(f, st->help);
			}
			fputc('\n', f);
		}
	}
}

static void report_text(FILE *f, const struct report_snap *s)
{
	struct text_table t = { .s = s };
	char total[REPORT_NUM_MAX];

	fprintf(f, "libkv %s report: registry \"", kv_version());
	text_escaped(f, s->name);
	fprintf(f, "\", %" PRIu64 " live records, %s\n", s->total_records,
		kv_format_bytes(s->total_bytes, total, sizeof(total)));
	fprintf(f, "operations: %" PRIu64 " recorded, %" PRIu64 " moved, %" PRIu64
		" resized, %" PRIu64 " forgotten\n\n",
		s->ops.records, s->ops.moves, s->ops.resizes, s->ops.forgets);

	fputs("live bytes (tier x kind):\n", f);
	t.cols = KV_KIND_COUNT + 3;
	t.cell = text_cell_live;
	text_live_rows(&t);
	text_table_print(f, &t);

	t.rows = 1;
	for (int tier = 0; tier < KV_TIER_COUNT; tier++) {
		for (int k = 0; k < KV_KIND_COUNT; k++) {
			if (s->peak[tier][k]) {
				t.row_tier[t.rows++] = tier;
				break;
			}
		}
	}
	fputs("\nhigh-water marks (tier x kind, all nodes):\n", f);
	if (t.rows == 1) {
		fputs("(none)\n", f);
	} else {
		t.cols = KV_KIND_COUNT + 1;
		t.cell = text_cell_peak;
		text_table_print(f, &t);
	}

	t.rows = 1 + (s->n_top < REPORT_TOP_TEXT ? s->n_top : REPORT_TOP_TEXT);
	fprintf(f, "\ntop holders (up to %d):\n", REPORT_TOP_TEXT);
	if (t.rows == 1) {
		fputs("(none)\n", f);
	} else {
		t.cols = 4;
		t.cell = text_cell_top;
		text_table_print(f, &t);
	}

	report_text_stats(f, s);
}

/* ---- JSON ------------------------------------------------------------- */

/* "stats" (info false) or "stat_info" (info true): the sources that
 * answered, by name, each an object of its stats by name holding the
 * value, or its type and help. Names are written unescaped: the registry
 * only accepts [a-z0-9_.-]. */
static void json_stats_object(FILE *f, const struct report_snap *s, bool info)
{
	char buf[REPORT_NUM_MAX];
	const char *sep = "";

	fputs(info ? "  \"stat_info\": {" : "  \"stats\": {", f);
	for (size_t i = 0; i < s->n_src; i++) {
		const struct report_source *r = &s->src[i];

		if (r->err)
			continue;
		fprintf(f, "%s\n    \"%s\": {", sep, r->name);
		sep = ",";
		for (size_t j = 0; j < r->n; j++) {
			const struct report_stat *st = &r->stats[j];

			fprintf(f, "%s\"%s\": ", j ? ", " : "", st->name);
			if (info) {
				fprintf(f, "{\"type\": \"%s\", \"help\": ",
					st->type == KV_STAT_COUNTER ? "counter" : "gauge");
				kv_json_string(f, st->help);
				fputc('}', f);
			} else if (isfinite(st->value)) {
				fputs(stat_exact(st->value, buf, sizeof(buf)), f);
			} else {
				fputs("null", f);
			}
		}
		fputc('}', f);
	}
	fputs(*sep ? "\n  },\n" : "},\n", f);
}

/* "stat_errors": the sources that failed, by name. Last in the report. */
static void json_stat_errors(FILE *f, const struct report_snap *s)
{
	const char *sep = "";

	fputs("  \"stat_errors\": {", f);
	for (size_t i = 0; i < s->n_src; i++) {
		const struct report_source *r = &s->src[i];

		if (!r->err)
			continue;
		fprintf(f, "%s\n    \"%s\": {\"code\": %d, \"error\": ", sep, r->name, r->err);
		kv_json_string(f, kv_strerror(r->err));
		fputs(", \"detail\": ", f);
		kv_json_string(f, r->detail);
		fputc('}', f);
		sep = ",";
	}
	fputs(*sep ? "\n  }\n" : "}\n", f);
}

static void report_json(FILE *f, const struct report_snap *s)
{
	const char *sep = "";

	fputs("{\n  \"schema\": \"libkv.report/1\",\n  \"libkv_version\": ", f);
	kv_json_string(f, kv_version());
	fputs(",\n  \"registry\": ", f);
	kv_json_string(f, s->name);
	fprintf(f, ",\n  \"total_bytes\": %" PRIu64 ",\n  \"total_records\": %" PRIu64
		",\n  \"ops\": {\"records\": %" PRIu64 ", \"moves\": %" PRIu64
		", \"resizes\": %" PRIu64 ", \"forgets\": %" PRIu64 "},\n",
		s->total_bytes, s->total_records, s->ops.records, s->ops.moves,
		s->ops.resizes, s->ops.forgets);

	fputs("  \"cells\": [", f);
	for (int t = 0; t < KV_TIER_COUNT; t++) {
		for (int n = 0; n < KV_NODE_MAX; n++) {
			for (int k = 0; k < KV_KIND_COUNT; k++) {
				if (!s->bytes[t][n][k] && !s->records[t][n][k])
					continue;
				fprintf(f, "%s\n    {\"tier\": \"%s\", \"node\": %d, \"kind\": \"%s\""
					", \"bytes\": %" PRIu64 ", \"records\": %" PRIu64 "}",
					sep, kv_tier_name((enum kv_tier)t), n,
					kv_kind_name((enum kv_kind)k),
					s->bytes[t][n][k], s->records[t][n][k]);
				sep = ",";
			}
		}
	}
	fputs(*sep ? "\n  ],\n" : "],\n", f);

	fputs("  \"tiers\": [", f);
	for (int t = 0; t < KV_TIER_COUNT; t++) {
		fprintf(f, "%s\n    {\"tier\": \"%s\", \"bytes\": %" PRIu64
			", \"records\": %" PRIu64 ", \"kinds\": {",
			t ? "," : "", kv_tier_name((enum kv_tier)t),
			s->tier_bytes[t], s->tier_records[t]);
		for (int k = 0; k < KV_KIND_COUNT; k++)
			fprintf(f, "%s\"%s\": %" PRIu64, k ? ", " : "",
				kv_kind_name((enum kv_kind)k), s->tier_kind[t][k]);
		fputs("}}", f);
	}
	fputs("\n  ],\n", f);

	fputs("  \"peaks\": [", f);
	sep = "";
	for (int t = 0; t < KV_TIER_COUNT; t++) {
		for (int k = 0; k < KV_KIND_COUNT; k++) {
			if (!s->peak[t][k])
				continue;
			fprintf(f, "%s\n    {\"tier\": \"%s\", \"kind\": \"%s\", \"bytes\": %"
				PRIu64 "}", sep, kv_tier_name((enum kv_tier)t),
				kv_kind_name((enum kv_kind)k), s->peak[t][k]);
			sep = ",";
		}
	}
	fputs(*sep ? "\n  ],\n" : "],\n", f);

	fputs("  \"labels\": [", f);
	for (size_t i = 0; i < s->n_top; i++) {
		fputs(i ? ",\n    {\"label\": " : "\n    {\"label\": ", f);
		kv_json_string(f, s->top[i].label);
		fprintf(f, ", \"bytes\": %" PRIu64 ", \"records\": %" PRIu64
			", \"peak\": %" PRIu64 "}",
			s->top[i].bytes, s->top[i].records, s->top[i].peak);
	}
	fputs(s->n_top ? "\n  ],\n" : "],\n", f);

	json_stats_object(f, s, false);
	json_stats_object(f, s, true);
	json_stat_errors(f, s);
	fputs("}\n", f);
}

/* ---- Prometheus ------------------------------------------------------- */

/* A label value in exposition format 0.0.4: only backslash, double quote
 * and line feed are escaped; everything else, UTF-8 included, is literal. */
static void prom_value(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		if (*s == '\\')
			fputs("\\\\", f);
		else if (*s == '"')
			fputs("\\\"", f);
		else if (*s == '\n')
			fputs("\\n", f);
		else
			fputc(*s, f);
	}
	fputc('"', f);
}

static void prom_family(FILE *f, const char *name, const char *type,
			const char *help)
{
	fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* Start a sample: the name and the registry label, the rest is added by
 * the caller. */
static void prom_sample(FILE *f, const char *name, const struct report_snap *s)
{
	fprintf(f, "%s{registry=", name);
	prom_value(f, s->name);
}

/* Cells of tier x kind on node 0 are always exported, so a scraper sees
 * the same series from the first scrape on and an idle tier reads 0
 * instead of vanishing; cells on other nodes appear while they hold
 * records. */
static bool prom_cell_shown(const struct report_snap *s, int t, int n, int k)
{
	return n == 0 || s->bytes[t][n][k] || s->records[t][n][k];
}

static void prom_cells(FILE *f, const struct report_snap *s, const char *name,
		       const uint64_t (*v)[KV_NODE_MAX][KV_KIND_COUNT])
{
	for (int t = 0; t < KV_TIER_COUNT; t++) {
		for (int n = 0; n < KV_NODE_MAX; n++) {
			for (int k = 0; k < KV_KIND_COUNT; k++) {
				if (!prom_cell_shown(s, t, n, k))
					continue;
				prom_sample(f, name, s);
				fprintf(f, ",tier=\"%s\",node=\"%d\",kind=\"%s\"} %" PRIu64 "\n",
					kv_tier_name((enum kv_tier)t), n,
					kv_kind_name((enum kv_kind)k), v[t][n][k]);
			}
		}
	}
}

/* The stats of one type from every source that answered. Values are
 * exact; the format spells the non-finite ones NaN, +Inf and -Inf. */
static void prom_stats(FILE *f, const struct report_snap *s, const char *name,
		       enum kv_stat_type type)
{
	char buf[REPORT_NUM_MAX];

	for (size_t i = 0; i < s->n_src; i++) {
		const struct report_source *r = &s->src[i];

		for (size_t j = 0; j < r->n; j++) {
			double v = r->stats[j].value;

			if (r->stats[j].type != type)
				continue;
			prom_sample(f, name, s);
			fputs(",source=", f);
			prom_value(f, r->name);
			fputs(",name=", f);
			prom_value(f, r->stats[j].name);
			fprintf(f, "} %s\n", isnan(v) ? "NaN" : isinf(v) ? (v > 0 ? "+Inf" : "-Inf")
					  : stat_exact(v, buf, sizeof(buf)));
		}
	}
}

static void report_prometheus(FILE *f, const struct report_snap *s)
{
	static const char *const op_names[] = { "record", "move", "resize", "forget" };
	const uint64_t ops[] = { s->ops.records, s->ops.moves, s->ops.resizes,
				 s->ops.forgets };

	prom_family(f, "libkv_bytes", "gauge",
		    "Live bytes recorded in the libkv registry, by tier, node and kind.");
	prom_cells(f, s, "libkv_bytes", s->bytes);
	prom_family(f, "libkv_records", "gauge",
		    "Live records in the libkv registry, by tier, node and kind.");
	prom_cells(f, s, "libkv_records", s->records);

	prom_family(f, "libkv_peak_bytes", "gauge",
		    "High-water mark of live bytes per tier and kind, all nodes together.");
	for (int t = 0; t < KV_TIER_COUNT; t++) {
		for (int k = 0; k < KV_KIND_COUNT; k++) {
			prom_sample(f, "libkv_peak_bytes", s);
			fprintf(f, ",tier=\"%s\",kind=\"%s\"} %" PRIu64 "\n",
				kv_tier_name((enum kv_tier)t),
				kv_kind_name((enum kv_kind)k), s->peak[t][k]);
		}
	}

	prom_family(f, "libkv_label_bytes", "gauge",
		    "Live bytes of the labels holding the most, up to 64 labels.");
	for (size_t i = 0; i < s->n_top; i++) {
		prom_sample(f, "libkv_label_bytes", s);
		fputs(",label=", f);
		prom_value(f, s->top[i].label);
		fprintf(f, "} %" PRIu64 "\n", s->top[i].bytes);
	}

	prom_family(f, "libkv_ops_total", "counter",
		    "Registry operations since the registry was created.");
	for (size_t i = 0; i < KV_ARRAY_SIZE(op_names); i++) {
		prom_sample(f, "libkv_ops_total", s);
		fprintf(f, ",op=\"%s\"} %" PRIu64 "\n", op_names[i], ops[i]);
	}

	prom_family(f, "libkv_stat", "gauge",
		    "Gauges of the registry's stats sources, by source and stat name.");
	prom_stats(f, s, "libkv_stat", KV_STAT_GAUGE);
	prom_family(f, "libkv_stat_total", "counter",
		    "Counters of the registry's stats sources, by source and stat name.");
	prom_stats(f, s, "libkv_stat_total", KV_STAT_COUNTER);
	prom_family(f, "libkv_stat_source_up", "gauge",
		    "1 if the stats source answered for this report, 0 if it failed.");
	for (size_t i = 0; i < s->n_src; i++) {
		prom_sample(f, "libkv_stat_source_up", s);
		fputs(",source=", f);
		prom_value(f, s->src[i].name);
		fprintf(f, "} %d\n", s->src[i].err ? 0 : 1);
	}
}

/* ---- Entry point ------------------------------------------------------ */

int kv_report_write(const struct kv_registry *reg, FILE *f, unsigned format)
{
	struct report_snap *s;
	int rc;

	if (!reg || !f)
		return kv_fail(EINVAL, "report: %s is NULL", !reg ? "registry" : "stream");
	if (format != KV_REPORT_TEXT && format != KV_REPORT_JSON &&
	    format != KV_REPORT_PROMETHEUS)
		return kv_fail(EINVAL, "report: format %#x is not exactly one of "
			       "KV_REPORT_TEXT (1), KV_REPORT_JSON (2), "
			       "KV_REPORT_PROMETHEUS (4)", format);
	/* A stream already in error would make a good write look failed. */
	if (ferror(f))
		return kv_fail(EIO, "report: the stream's error indicator is already set");

	/* About 40 KiB: too much for the stack of a small thread. */
	s = calloc(1, sizeof(*s));
	if (!s)
		return kv_fail(ENOMEM, "report: no memory for a %zu-byte snapshot",
			       sizeof(*s));
	rc = report_snapshot(reg, s);
	if (rc < 0)
		goto out;

	switch (format) {
	case KV_REPORT_TEXT: report_text(f, s); break;
	case KV_REPORT_JSON: report_json(f, s); break;
	default: report_prometheus(f, s); break;
	}
	/* errno is only meaningful right after the call that failed. */
	errno = 0;
	if (fflush(f) != 0 || ferror(f))
		rc = kv_fail(EIO, "report: writing the %s report failed (%s)",
			     format == KV_REPORT_TEXT ? "text" :
			     format == KV_REPORT_JSON ? "JSON" : "Prometheus",
			     errno ? kv_strerror(errno) : "stream error");
out:
	report_snap_free(s);
	return rc;
}
