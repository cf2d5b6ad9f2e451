// SPDX-License-Identifier: MIT
/*
 * kv-bench: libkv's one benchmark program. `kv-bench <scenario>` runs one
 * scenario and prints its figures as a table, or with --json as one
 * object: {"scenario", "machine", "figures": [{"name", "value", "unit",
 * "reference", "ratio"}]}. Each figure is the median of --reps runs.
 * `kv-bench all` runs registry, alloc, io, kv, decode and sweep in turn
 * (with --json: one object a line). Benchmarks are programs, never
 * pass/fail tests: the machine is shared.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include <kv/kv.h>

#include "bench.h"
#include "taxonomy/kv-private.h"

/* The offload layer's figures together, as its issue lists them under
 * `kv-bench io`; each part also runs alone. */
static int bench_io_all(struct bench_run *run)
{
	int rc = bench_io(run);

	if (rc == 0)
		rc = bench_store(run);
	if (rc == 0)
		rc = bench_stream(run);
	return rc;
}

static const struct bench_scenario scenarios[] = {
	{ "registry", "ns per record+forget pair, 1 and 2 threads", bench_registry, 0 },
	{ "alloc", "pool alloc+free pairs/s vs malloc; first touch with huge pages", bench_alloc, 0 },
	{ "io", "io-engine, store and stream together (the offload figures)", bench_io_all, 0 },
	{ "io-engine", "kv_io O_DIRECT reads at QD1/16/64 vs a raw io_uring loop and pread", bench_io, 0 },
	{ "store", "kv_store put/get of 256 KiB checksummed extents vs raw io_uring", bench_store, 0 },
	{ "stream", "kv_stream read-ahead under a 25 % budget vs raw O_DIRECT bandwidth", bench_stream, 0 },
	{ "kv", "KV cache: appends, prefix lookup, waste, fork sharing, paged vs contiguous attention", bench_kv, 0 },
	{ "decode", "kv-llama decode tok/s vs the DRAM bound, batch 1/8/32, streamed weights vs SSD", bench_decode, 0 },
	{ "sweep", "tok/s against DRAM footprint: weights resident x batch x KV dtype, report and plots",
	  bench_sweep, BENCH_OPT_MODEL | BENCH_OPT_OUT },
};

/* What `kv-bench all` runs, in order (io covers io-engine, store, stream). */
static const char *const all_scenarios[] = { "registry", "alloc", "io", "kv", "decode", "sweep" };

void bench_figure(struct bench_run *run, const char *name, double value,
		  const char *unit, double reference, const char *reference_what)
{
	struct bench_figure *f;

	if (run->n_figures == BENCH_MAX_FIGURES) {
		fprintf(stderr, "kv-bench: too many figures, dropping %s\n", name);
		return;
	}
	f = &run->figures[run->n_figures++];
	*f = (struct bench_figure){ .name = name, .value = value, .unit = unit,
				    .has_reference = reference > 0, .reference = reference,
				    .reference_what = reference_what };
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

double bench_median(double *v, size_t n)
{
	if (n == 0)
		return 0;
	qsort(v, n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

uint64_t bench_now_ns(void)
{
	return kv_now_ns();
}

void bench_cpu_model(char *buf, size_t len)
{
	FILE *f = fopen("/proc/cpuinfo", "r");
	char line[512];

	snprintf(buf, len, "unknown");
	if (!f)
		return;
	while (fgets(line, sizeof(line), f)) {
		char *colon = strchr(line, ':');

		if (strncmp(line, "model name", 10) == 0 && colon) {
			colon += 2;
			colon[strcspn(colon, "\n")] = '\0';
			snprintf(buf, len, "%s", colon);
			break;
		}
	}
	fclose(f);
}

static void print_json(const char *scenario, const struct bench_run *run)
{
	struct utsname u;
	char host[256] = "unknown", model[256];
	time_t now = time(NULL);
	char when[64];

	uname(&u);
	gethostname(host, sizeof(host) - 1);
	bench_cpu_model(model, sizeof(model));
	strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
	printf("{\"scenario\":");
	kv_json_string(stdout, scenario);
	printf(",\"machine\":{\"host\":");
	kv_json_string(stdout, host);
	printf(",\"cpu\":");
	kv_json_string(stdout, model);
	printf(",\"cpus_online\":%ld,\"kernel\":", sysconf(_SC_NPROCESSORS_ONLN));
	kv_json_string(stdout, u.release);
	printf(",\"compiler\":");
	kv_json_string(stdout, __VERSION__);
	printf(",\"libkv_version\":");
	kv_json_string(stdout, kv_version());
	printf(",\"time\":");
	kv_json_string(stdout, when);
	printf(",\"reps\":%d},\"figures\":[", run->reps);
	for (size_t i = 0; i < run->n_figures; i++) {
		const struct bench_figure *f = &run->figures[i];

		printf("%s{\"name\":", i ? "," : "");
		kv_json_string(stdout, f->name);
		printf(",\"value\":");
		kv_json_double(stdout, f->value);
		printf(",\"unit\":");
		kv_json_string(stdout, f->unit);
		if (f->has_reference) {
			printf(",\"reference\":");
			kv_json_double(stdout, f->reference);
			printf(",\"reference_what\":");
			kv_json_string(stdout, f->reference_what);
			printf(",\"ratio\":");
			kv_json_double(stdout, f->value / f->reference);
		}
		printf("}");
	}
	printf("]}\n");
}

static void print_table(const char *scenario, const struct bench_run *run)
{
	printf("kv-bench %s (median of %d runs)\n", scenario, run->reps);
	printf("%-28s %14s %-6s %14s %8s  %s\n", "figure", "value", "unit", "reference",
	       "ratio", "reference is");
	for (size_t i = 0; i < run->n_figures; i++) {
		const struct bench_figure *f = &run->figures[i];

		if (f->has_reference)
			printf("%-28s %14.2f %-6s %14.2f %8.3f  %s\n", f->name, f->value, f->unit,
			       f->reference, f->value / f->reference, f->reference_what);
		else
			printf("%-28s %14.2f %-6s\n", f->name, f->value, f->unit);
	}
}

static void usage(FILE *out)
{
	fprintf(out, "usage: kv-bench <scenario> [--json] [--reps N] [--quick] [--dir DIR]\n"
		     "       kv-bench sweep [--quick] [--model 260K|15M|110M|1B] [--out DIR] [--dir DIR]\n"
		     "       kv-bench all [--quick] [options of the scenarios]\n"
		     "       kv-bench --list\n"
		     "scenarios:\n");
	for (size_t i = 0; i < KV_ARRAY_SIZE(scenarios); i++)
		fprintf(out, "  %-12s %s\n", scenarios[i].name, scenarios[i].summary);
	fprintf(out, "  %-12s %s\n", "all", "registry, alloc, io, kv, decode and sweep in turn");
}

static const struct bench_scenario *find_scenario(const char *name)
{
	for (size_t s = 0; s < KV_ARRAY_SIZE(scenarios); s++)
		if (strcmp(name, scenarios[s].name) == 0)
			return &scenarios[s];
	return NULL;
}

/* Run one scenario on a fresh copy of the options and print its figures.
 * 0, or 1 when it failed (the message is printed). */
static int run_one(const struct bench_scenario *sc, const struct bench_run *opts, bool json)
{
	struct bench_run *run = malloc(sizeof(*run));
	int rc;

	if (!run)
		return 1;
	*run = *opts;
	run->n_figures = 0;
	rc = sc->run(run);
	if (rc) {
		fprintf(stderr, "kv-bench %s: %s: %s\n", sc->name, kv_strerror(rc), kv_last_error());
		free(run);
		return 1;
	}
	if (json)
		print_json(sc->name, run);
	else
		print_table(sc->name, run);
	free(run);
	return 0;
}

int main(int argc, char **argv)
{
	struct bench_run *run = calloc(1, sizeof(*run));
	const struct bench_scenario *sc = NULL;
	bool json = false, all = false;
	unsigned given = 0;
	int rc = 0;

	if (!run)
		return 1;
	run->reps = 5;
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--json") == 0) {
			json = true;
		} else if (strcmp(argv[i], "--quick") == 0) {
			run->quick = true;
		} else if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc) {
			run->dir = argv[++i];
		} else if (strcmp(argv[i], "--model") == 0 && i + 1 < argc) {
			run->model = argv[++i];
			given |= BENCH_OPT_MODEL;
		} else if (strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
			run->out = argv[++i];
			given |= BENCH_OPT_OUT;
		} else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
			char *end;
			long r = strtol(argv[++i], &end, 10);

			if (*end || r < 1 || r > 64) {
				fprintf(stderr, "kv-bench: --reps wants 1..64, got '%s'\n", argv[i]);
				free(run);
				return 2;
			}
			run->reps = (int)r;
		} else if (strcmp(argv[i], "--list") == 0 || strcmp(argv[i], "-h") == 0 ||
			   strcmp(argv[i], "--help") == 0) {
			usage(stdout);
			free(run);
			return 0;
		} else if (argv[i][0] != '-' && !sc && !all) {
			all = strcmp(argv[i], "all") == 0;
			sc = all ? NULL : find_scenario(argv[i]);
			if (!sc && !all) {
				fprintf(stderr, "kv-bench: unknown scenario '%s'\n", argv[i]);
				usage(stderr);
				free(run);
				return 2;
			}
		} else {
			fprintf(stderr, "kv-bench: unexpected argument '%s'\n", argv[i]);
			usage(stderr);
			free(run);
			return 2;
		}
	}
	if (!sc && !all) {
		usage(stderr);
		free(run);
		return 2;
	}
	/* An option no scenario of the run reads is a mistake, not a no-op. */
	if (given & ~(all ? BENCH_OPT_MODEL | BENCH_OPT_OUT : sc->opts)) {
		fprintf(stderr, "kv-bench %s: --model and --out are options of sweep\n",
			sc->name);
		free(run);
		return 2;
	}
	if (sc) {
		rc = run_one(sc, run, json);
	} else {
		int failed = 0;

		for (size_t i = 0; i < KV_ARRAY_SIZE(all_scenarios); i++) {
			fprintf(stderr, "kv-bench all: %s\n", all_scenarios[i]);
			failed += run_one(find_scenario(all_scenarios[i]), run, json);
			if (!json)
				printf("\n");
		}
		if (failed)
			fprintf(stderr, "kv-bench all: %d of %zu scenarios failed\n", failed,
				KV_ARRAY_SIZE(all_scenarios));
		rc = failed != 0;
	}
	free(run);
	return rc;
}
