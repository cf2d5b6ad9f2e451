// SPDX-License-Identifier: MIT
/*
 * kv-info, run as a program: its JSON parses and holds the topology, the
 * io_uring verdict and a DRAM tier row; with --dir a power-of-two O_DIRECT
 * alignment and an SSD row; bad arguments fail with a message and the
 * documented exit status. The program's path is argv[1] (from meson), else
 * $KV_TEST_BUILDDIR/examples/kv-info.
 */
#include <dirent.h>
#include <sys/wait.h>

#include <json-c/json.h>

#include "kvjson.h"

#include "kvtest.h"

static char kv_info[1024];
static char cache_home[256];

/* Run kv-info with `args` through the shell; its stdout (and whatever the
 * args redirect there) goes to a malloc'ed *out. Returns the exit status,
 * or -1 if it did not exit normally. */
static int run(const char *args, char **out)
{
	char cmd[2048];
	size_t len = 0, cap = 4096;
	char *buf = malloc(cap);
	FILE *p;
	int st;

	assert_non_null(buf);
	snprintf(cmd, sizeof(cmd), "'%s' %s", kv_info, args);
	p = popen(cmd, "r");
	assert_non_null(p);
	for (;;) {
		size_t n;

		if (cap - len < 1024) {
			cap *= 2;
			buf = realloc(buf, cap);
			assert_non_null(buf);
		}
		n = fread(buf + len, 1, cap - len - 1, p);
		if (n == 0)
			break;
		len += n;
	}
	buf[len] = '\0';
	st = pclose(p);
	*out = buf;
	return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}


static struct json_object *run_json(const char *args)
{
	struct json_object *root;
	char *out;
	int rc = run(args, &out);

	if (rc != 0)
		fail_msg("kv-info %s exited with %d; output:\n%s", args, rc, out);
	root = json_tokener_parse(out);
	if (!root)
		fail_msg("kv-info %s printed invalid JSON:\n%s", args, out);
	free(out);
	assert_true(json_object_is_type(root, json_type_object));
	return root;
}

/* The checks every JSON output passes; returns the "tiers" array. */
static struct json_object *check_common(struct json_object *root)
{
	struct json_object *topo, *nodes, *uring, *tiers;
	bool dram = false;

	get(root, "libkv_version", json_type_string);
	get(root, "host", json_type_string);
	topo = get(root, "topology", json_type_object);
	nodes = get(topo, "numa_nodes", json_type_array);
	assert_true(json_object_array_length(nodes) >= 1);
	for (size_t i = 0; i < json_object_array_length(nodes); i++) {
		struct json_object *n = json_object_array_get_idx(nodes, i);

		get(n, "os_index", json_type_int);
		assert_true(json_object_get_int64(get(n, "memory_bytes", json_type_int)) > 0);
		get(n, "cpus", json_type_string);
	}
	assert_true(json_object_get_int(get(topo, "cores", json_type_int)) >= 1);
	assert_true(json_object_get_int(get(topo, "pus", json_type_int)) >= 1);
	get(topo, "hugepages", json_type_array);

	uring = get(root, "io_uring", json_type_object);
	if (json_object_get_boolean(get(uring, "works", json_type_boolean)))
		get(uring, "error", json_type_null);
	else
		get(uring, "error", json_type_string);

	tiers = get(root, "tiers", json_type_array);
	assert_true(json_object_array_length(tiers) >= 1);
	for (size_t i = 0; i < json_object_array_length(tiers); i++) {
		struct json_object *t = json_object_array_get_idx(tiers, i);
		struct json_object *src = get(t, "sources", json_type_object);

		assert_true(json_object_get_int64(get(t, "capacity_bytes", json_type_int)) > 0);
		get(src, "capacity", json_type_string);
		get(src, "read_bw", json_type_string);
		if (strcmp(json_object_get_string(get(t, "tier", json_type_string)), "dram") == 0) {
			dram = true;
			get(t, "node", json_type_int);
		}
	}
	assert_true(dram);
	return tiers;
}

static void test_json_no_probe(void **state)
{
	struct json_object *root, *tiers;

	(void)state;
	root = run_json("--json --no-probe");
	tiers = check_common(root);
	for (size_t i = 0; i < json_object_array_length(tiers); i++) {
		struct json_object *src = get(json_object_array_get_idx(tiers, i), "sources",
					      json_type_object);

		assert_string_not_equal(json_object_get_string(get(src, "read_bw", json_type_string)),
					"probe");
	}
	assert_false(json_object_object_get_ex(root, "dir", NULL));
	json_object_put(root);
}

static void test_json_dir(void **state)
{
	struct json_object *root, *tiers, *dir, *ssd = NULL;
	char tmp[256], args[512];
	int64_t align;
	struct dirent *e;
	DIR *dp;

	(void)state;
	kv_test_mkdtemp(tmp, sizeof(tmp), "kvinfo");
	snprintf(args, sizeof(args), "--json --dir '%s'", tmp);
	root = run_json(args);
	tiers = check_common(root);

	dir = get(root, "dir", json_type_object);
	assert_string_equal(json_object_get_string(get(dir, "path", json_type_string)), tmp);
	align = json_object_get_int64(get(dir, "dio_align", json_type_int));
	assert_true(align >= 512);
	assert_int_equal(align & (align - 1), 0);

	for (size_t i = 0; i < json_object_array_length(tiers); i++) {
		struct json_object *t = json_object_array_get_idx(tiers, i);

		if (strcmp(json_object_get_string(get(t, "tier", json_type_string)), "ssd") == 0)
			ssd = t;
	}
	assert_non_null(ssd);
	assert_string_equal(json_object_get_string(get(ssd, "path", json_type_string)), tmp);
	assert_true(json_object_get_boolean(get(ssd, "persistent", json_type_boolean)));
	assert_int_equal(json_object_get_int64(get(ssd, "dio_align", json_type_int)), align);
	assert_true(get_number(ssd, "read_bw_bytes_per_s") > 0);
	assert_true(get_number(ssd, "write_bw_bytes_per_s") > 0);
	assert_true(get_number(ssd, "latency_ns") > 0);
	assert_true(json_object_get_int64(get(ssd, "free_bytes", json_type_int)) <=
		    json_object_get_int64(get(ssd, "capacity_bytes", json_type_int)));
	json_object_put(root);

	/* The probe's scratch file is gone. */
	dp = opendir(tmp);
	assert_non_null(dp);
	while ((e = readdir(dp)) != NULL)
		if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
			fail_msg("left behind in %s: %s", tmp, e->d_name);
	closedir(dp);
	kv_test_rmtree(tmp);
}

static void test_text(void **state)
{
	char *out;

	(void)state;
	assert_int_equal(run("--no-probe", &out), 0);
	assert_non_null(strstr(out, "Topology"));
	assert_non_null(strstr(out, "io_uring"));
	assert_non_null(strstr(out, "Tiers"));
	assert_non_null(strstr(out, "dram"));
	free(out);
	assert_int_equal(run("--help", &out), 0);
	assert_non_null(strstr(out, "usage: kv-info"));
	free(out);
}

static void test_bad_dir(void **state)
{
	char *out;
	int rc;

	(void)state;
	rc = run("--no-probe --dir /nonexistent/libkv 2>&1 >/dev/null", &out);
	assert_int_equal(rc, 1);
	assert_non_null(strstr(out, "/nonexistent/libkv"));
	assert_non_null(strstr(out, "no such directory"));
	free(out);
}

static void test_usage_errors(void **state)
{
	char *out;

	(void)state;
	assert_int_equal(run("--bogus 2>&1 >/dev/null", &out), 2);
	assert_non_null(strstr(out, "--bogus"));
	free(out);
	assert_int_equal(run("--dir 2>&1 >/dev/null", &out), 2);
	assert_non_null(strstr(out, "--dir"));
	free(out);
	assert_int_equal(run("--probe --no-probe 2>&1 >/dev/null", &out), 2);
	free(out);
	assert_int_equal(run("stray 2>&1 >/dev/null", &out), 2);
	assert_non_null(strstr(out, "stray"));
	free(out);
}

static int setup_all(void **state)
{
	(void)state;
	kv_test_private_cache(cache_home, sizeof(cache_home), "kvinfo-cache");
	return 0;
}

static int teardown_all(void **state)
{
	(void)state;
	kv_test_rmtree(cache_home);
	return 0;
}

int main(int argc, char **argv)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_usage_errors),
		cmocka_unit_test(test_bad_dir),
		cmocka_unit_test(test_text),
		cmocka_unit_test(test_json_no_probe),
		cmocka_unit_test(test_json_dir),
	};
	const char *build = getenv("KV_TEST_BUILDDIR");

	if (argc > 1)
		snprintf(kv_info, sizeof(kv_info), "%s", argv[1]);
	else if (build)
		snprintf(kv_info, sizeof(kv_info), "%s/examples/kv-info", build);
	else
		kv_test_skip_all("no kv-info path: pass it as argv[1] or set KV_TEST_BUILDDIR");
	if (access(kv_info, X_OK) != 0)
		kv_test_skip_all("%s is not an executable (build the examples)", kv_info);
	return cmocka_run_group_tests(tests, setup_all, teardown_all);
}
