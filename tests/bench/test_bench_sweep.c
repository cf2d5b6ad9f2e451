/* SPDX-License-Identifier: MIT */
/*
 * kv-bench sweep --quick on the 260K synthetic model, run as a program
 * ($KV_TEST_BUILDDIR/bench/kv-bench) into a scratch folder: it exits 0;
 * sweep.csv has its header and one row per grid point (weights resident
 * x batch x KV dtype), each with as many fields as the header, skipped
 * points marked with a reason; sweep.json parses and holds the same
 * points, and every measured point's registry-versus-RSS check held;
 * report.md has the table; with gnuplot on PATH both plots are PNG files
 * (else that check is skipped, saying why). Timings are never checked:
 * benchmarks are not tests.
 */
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include <json-c/json.h>

#include "kvjson.h"

extern char **environ;

#define N_PCTS 5
#define N_BATCHES 3
#define N_DTYPES 2
#define N_POINTS (N_PCTS * N_BATCHES * N_DTYPES)
static const int pcts[N_PCTS] = { 100, 75, 50, 25, 10 };
static const int batches[N_BATCHES] = { 1, 8, 32 };
static const char *const dtypes[N_DTYPES] = { "f32", "int8" };

static char scratch[4096];
static char out_dir[4200];

static char *slurp_out(const char *name)
{
	char path[4400];
	char *s;

	snprintf(path, sizeof(path), "%s/%s", out_dir, name);
	s = kv_test_slurp(path);
	if (!s)
		fail_msg("%s was not written: %s", path, strerror(errno));
	return s;
}

/* Run the sweep once for all the tests. */
static int sweep_setup(void **state)
{
	const char *build = getenv("KV_TEST_BUILDDIR");
	char prog[4200], models[4200], log[4200], cache[4200];
	const char *argv[12];
	posix_spawn_file_actions_t fa;
	struct timespec t0, t1;
	pid_t pid;
	int st;

	(void)state;
	if (!build)
		kv_test_skip_all("KV_TEST_BUILDDIR is not set (run through meson test)");
	snprintf(prog, sizeof(prog), "%s/bench/kv-bench", build);
	kv_test_mkdtemp(scratch, sizeof(scratch), "sweep");
	/* The tier probe's cache goes to the scratch folder, not the user's. */
	snprintf(cache, sizeof(cache), "%s/xdg", scratch);
	setenv("XDG_CACHE_HOME", cache, 1);
	snprintf(out_dir, sizeof(out_dir), "%s/out", scratch);
	snprintf(models, sizeof(models), "%s/models", scratch);
	snprintf(log, sizeof(log), "%s/kv-bench.log", scratch);
	mkdir(models, 0755);
	argv[0] = prog;
	argv[1] = "sweep";
	argv[2] = "--quick";
	argv[3] = "--model";
	argv[4] = "260K";
	argv[5] = "--out";
	argv[6] = out_dir;
	argv[7] = "--dir";
	argv[8] = models;
	argv[9] = NULL;
	assert_int_equal(posix_spawn_file_actions_init(&fa), 0);
	assert_int_equal(posix_spawn_file_actions_addopen(&fa, 1, log, O_WRONLY | O_CREAT | O_TRUNC,
							  0644), 0);
	assert_int_equal(posix_spawn_file_actions_adddup2(&fa, 1, 2), 0);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	assert_int_equal(posix_spawn(&pid, prog, &fa, NULL, (char *const *)argv, environ), 0);
	posix_spawn_file_actions_destroy(&fa);
	assert_int_equal(waitpid(pid, &st, 0), pid);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
		char *text = kv_test_slurp(log);

		fprintf(stderr, "kv-bench sweep exited with %d:\n%s\n",
			WIFEXITED(st) ? WEXITSTATUS(st) : -1, text ? text : "(no output)");
		free(text);
		return -1;
	}
	printf("kv-bench sweep --quick --model 260K took %.1f s\n",
	       (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
	return 0;
}

static int sweep_teardown(void **state)
{
	(void)state;
	kv_test_rmtree(scratch);
	return 0;
}

/* Split one CSV line into fields (quoted fields may hold commas and
 * doubled quotes); returns the count, fields written up to max. */
static int csv_split(const char *line, char fields[][400], int max)
{
	int n = 0;

	for (const char *p = line;;) {
		char *out = n < max ? fields[n] : NULL;
		size_t len = 0;

		if (*p == '"') {
			for (p++; *p && !(*p == '"' && p[1] != '"'); p++) {
				if (*p == '"')
					p++;
				if (out && len < 399)
					out[len++] = *p;
			}
			if (*p == '"')
				p++;
		} else {
			for (; *p && *p != ','; p++)
				if (out && len < 399)
					out[len++] = *p;
		}
		if (out)
			out[len] = '\0';
		n++;
		if (*p != ',')
			return n;
		p++;
	}
}

static int column(char fields[][400], int n, const char *name)
{
	for (int i = 0; i < n; i++)
		if (strcmp(fields[i], name) == 0)
			return i;
	fail_msg("sweep.csv has no column %s", name);
	return -1;
}

static int grid_index(int pct, int batch, const char *dtype)
{
	for (int p = 0; p < N_PCTS; p++)
		for (int b = 0; b < N_BATCHES; b++)
			for (int d = 0; d < N_DTYPES; d++)
				if (pcts[p] == pct && batches[b] == batch && strcmp(dtypes[d], dtype) == 0)
					return (p * N_BATCHES + b) * N_DTYPES + d;
	return -1;
}

static void test_csv_every_point(void **state)
{
	static char head[64][400], f[64][400];
	char *text = slurp_out("sweep.csv"), *save = NULL;
	bool seen[N_POINTS] = { false };
	int n_head, rows = 0, c_pct, c_batch, c_dtype, c_status, c_reason, c_tps;

	(void)state;
	n_head = csv_split(strtok_r(text, "\n", &save), head, 64);
	assert_true(n_head > 10 && n_head <= 64);
	c_pct = column(head, n_head, "weights_pct");
	c_batch = column(head, n_head, "batch");
	c_dtype = column(head, n_head, "kv_dtype");
	c_status = column(head, n_head, "status");
	c_reason = column(head, n_head, "skip_reason");
	c_tps = column(head, n_head, "decode_tps");
	for (char *line; (line = strtok_r(NULL, "\n", &save)); rows++) {
		int n = csv_split(line, f, 64), g;

		if (n != n_head)
			fail_msg("sweep.csv row %d has %d fields, the header %d: %s", rows + 1, n, n_head,
				 line);
		g = grid_index(atoi(f[c_pct]), atoi(f[c_batch]), f[c_dtype]);
		if (g < 0 || seen[g])
			fail_msg("sweep.csv row %d: %s %% b%s %s is %s", rows + 1, f[c_pct], f[c_batch],
				 f[c_dtype], g < 0 ? "not a grid point" : "there twice");
		seen[g] = true;
		if (strcmp(f[c_status], "skipped") == 0) {
			if (!f[c_reason][0])
				fail_msg("sweep.csv row %d is skipped without a reason", rows + 1);
		} else if (strcmp(f[c_status], "ok") != 0 || strtod(f[c_tps], NULL) <= 0) {
			fail_msg("sweep.csv row %d: status '%s', decode_tps '%s'", rows + 1, f[c_status],
				 f[c_tps]);
		}
	}
	assert_int_equal(rows, N_POINTS);
	free(text);
}

static void test_json_points_and_rss(void **state)
{
	char *text = slurp_out("sweep.json");
	struct json_object *root = json_tokener_parse(text), *points, *tol;
	bool seen[N_POINTS] = { false };
	int measured = 0, ok = 0;

	(void)state;
	if (!root)
		fail_msg("sweep.json does not parse");
	assert_string_equal(json_object_get_string(get(root, "schema", json_type_string)),
			    "libkv.bench.sweep/1");
	get(root, "machine", json_type_object);
	get(root, "limits", json_type_object);
	tol = get(root, "rss_tolerance", json_type_object);
	points = get(root, "points", json_type_array);
	assert_int_equal(json_object_array_length(points), N_POINTS);
	for (size_t i = 0; i < N_POINTS; i++) {
		struct json_object *p = json_object_array_get_idx(points, i), *rss, *dram;
		const char *status = json_object_get_string(get(p, "status", json_type_string));
		int g = grid_index((int)get_number(p, "weights_pct"), (int)get_number(p, "batch"),
				   json_object_get_string(get(p, "kv_dtype", json_type_string)));

		assert_true(g >= 0 && !seen[g]);
		seen[g] = true;
		if (strcmp(status, "skipped") == 0) {
			assert_true(strlen(json_object_get_string(get(p, "skip_reason",
								      json_type_string))) > 0);
			continue;
		}
		assert_string_equal(status, "ok");
		assert_true(get_number(p, "decode_tps") > 0);
		assert_true(get_number(p, "prefill_tps") > 0);
		dram = get(get(p, "peak_bytes", json_type_object), "dram", json_type_object);
		assert_true(get_number(dram, "weights") > 0);
		assert_true(get_number(dram, "kv") > 0);
		assert_true(get_number(get(p, "prefix", json_type_object), "lookup_blocks") > 0);
		rss = get(p, "rss_check", json_type_object);
		if (!json_object_get_boolean(get(rss, "measured", json_type_boolean)))
			continue;
		measured++;
		if (json_object_get_boolean(get(rss, "ok", json_type_boolean)))
			ok++;
		else
			fprintf(stderr, "point %zu: RSS delta %.0f bytes, registry %.0f, tolerance %.0f\n",
				i, get_number(rss, "rss_delta_bytes"), get_number(rss, "registry_dram_bytes"),
				get_number(rss, "tolerance_bytes"));
	}
	if (!json_object_get_boolean(get(tol, "usable", json_type_boolean))) {
		printf("SKIP: the RSS cross-check could not run here: %s\n",
		       json_object_get_string(get(tol, "reason", json_type_string)));
		json_object_put(root);
		free(text);
		skip();
	}
	assert_true(measured > 0);
	assert_int_equal(ok, measured);
	json_object_put(root);
	free(text);
}

static void test_report_table(void **state)
{
	char *text = slurp_out("report.md");
	int rows = 0;

	(void)state;
	assert_non_null(strstr(text, "## Key findings"));
	assert_non_null(strstr(text, "## Machine"));
	assert_non_null(strstr(text, "## Limits"));
	assert_non_null(strstr(text, "| resident | actual | batch | KV | DRAM MB |"));
	for (const char *p = text; (p = strstr(p, "\n| ")); p++) {
		int pct;
		char tail[4];

		if (sscanf(p + 3, "%d %%%3s", &pct, tail) == 2 && strcmp(tail, "|") == 0)
			rows++;
	}
	assert_int_equal(rows, N_POINTS);
	free(text);
}

static void test_plots(void **state)
{
	static const unsigned char sig[8] = { 0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n' };
	static const char *const pngs[2] = { "tps_vs_footprint.png", "bound_vs_footprint.png" };
	char *report = slurp_out("report.md"), *gp = slurp_out("plots.gp");

	(void)state;
	free(gp);
	if (system("command -v gnuplot >/dev/null 2>&1") != 0) {
		assert_non_null(strstr(report, "Plots skipped"));
		free(report);
		printf("SKIP: gnuplot is not on PATH (scripts/deps.sh installs gnuplot-nox); the "
		       "report says the plots were skipped\n");
		skip();
	}
	for (int i = 0; i < 2; i++) {
		char path[4400];
		unsigned char buf[8];
		FILE *f;

		snprintf(path, sizeof(path), "%s/%s", out_dir, pngs[i]);
		f = fopen(path, "rb");
		if (!f)
			fail_msg("%s missing with gnuplot on PATH", path);
		assert_int_equal(fread(buf, 1, 8, f), 8);
		fclose(f);
		assert_memory_equal(buf, sig, 8);
		assert_non_null(strstr(report, pngs[i]));
	}
	free(report);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_csv_every_point),
		cmocka_unit_test(test_json_points_and_rss),
		cmocka_unit_test(test_report_table),
		cmocka_unit_test(test_plots),
	};

	return cmocka_run_group_tests(tests, sweep_setup, sweep_teardown);
}
