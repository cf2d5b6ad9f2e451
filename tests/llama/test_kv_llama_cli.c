/* SPDX-License-Identifier: MIT */
/*
 * kv-llama, run as a program ($KV_TEST_BUILDDIR/examples/llama/kv-llama):
 * bad files fail with exit 1 and bad arguments with exit 2, with a
 * message naming what was wrong (a missing or truncated checkpoint, a
 * tokenizer of another vocabulary, a prompt above seq_len, bad option
 * values); the synthetic 260K model prints its ids, the same for weights
 * in DRAM, mapped and streamed; seeded samples repeat; --json parses and
 * holds the summary; a --kv-store serves a prefix to the next process.
 * Synthetic models go to a scratch --cache-dir, where the test writes
 * the 260K model first (the seed kv-llama uses, 1).
 */
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <json-c/json.h>

#include "kvjson.h"

#include "llamatest.h"

extern char **environ;

static char prog[4096];
static char scratch[4096];
static char cache_home[4096];
static char model_260k[4200];     /* a 260K checkpoint written by the test */

struct run {
	int status;     /* exit status, or -1 if killed by a signal */
	char *out, *err;
};

static char *slurp(const char *path)
{
	char *s = kv_test_slurp(path);

	if (!s)
		fail_msg("cannot read %s: %s", path, strerror(errno));
	return s;
}

/* Run kv-llama with the NULL-terminated args (after --cache-dir scratch),
 * its stdout and stderr captured. */
static void run_args(struct run *r, const char *const *args)
{
	char out_path[4200], err_path[4200];
	const char *argv[64];
	posix_spawn_file_actions_t fa;
	size_t n = 0;
	pid_t pid;
	int st;

	argv[n++] = prog;
	argv[n++] = "--cache-dir";
	argv[n++] = scratch;
	for (; *args; args++) {
		assert_true(n < 63);
		argv[n++] = *args;
	}
	argv[n] = NULL;
	snprintf(out_path, sizeof(out_path), "%s/stdout", scratch);
	snprintf(err_path, sizeof(err_path), "%s/stderr", scratch);
	assert_int_equal(posix_spawn_file_actions_init(&fa), 0);
	assert_int_equal(posix_spawn_file_actions_addopen(&fa, 1, out_path,
							  O_WRONLY | O_CREAT | O_TRUNC, 0644), 0);
	assert_int_equal(posix_spawn_file_actions_addopen(&fa, 2, err_path,
							  O_WRONLY | O_CREAT | O_TRUNC, 0644), 0);
	assert_int_equal(posix_spawn(&pid, prog, &fa, NULL, (char *const *)argv, environ), 0);
	posix_spawn_file_actions_destroy(&fa);
	assert_int_equal(waitpid(pid, &st, 0), pid);
	r->status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
	r->out = slurp(out_path);
	r->err = slurp(err_path);
}

#define RUN(r, ...) run_args((r), (const char *const[]){ __VA_ARGS__, NULL })

static void run_free(struct run *r)
{
	free(r->out);
	free(r->err);
}

/* The run succeeded (exit 0). */
static void expect_ok(const struct run *r, const char *what)
{
	if (r->status != 0)
		fail_msg("%s: exit %d, want 0\nstdout:\n%s\nstderr:\n%s", what, r->status, r->out,
			 r->err);
}

/* The run exited with status (1: a failure, 2: a bad command line) and
 * stderr names each of the NULL-terminated needles. */
static void expect_fail(const struct run *r, int status, const char *what,
			const char *const *needles)
{
	if (r->status != status)
		fail_msg("%s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", what, r->status, status,
			 r->out, r->err);
	for (; *needles; needles++)
		if (!strstr(r->err, *needles))
			fail_msg("%s: stderr does not name \"%s\":\n%s", what, *needles, r->err);
}

#define EXPECT_FAIL(r, status, what, ...) \
	expect_fail((r), (status), (what), (const char *const[]){ __VA_ARGS__, NULL })

static void test_missing_model(void **state)
{
	char path[4200];
	struct run r;

	(void)state;
	snprintf(path, sizeof(path), "%s/no-such-model.bin", scratch);
	RUN(&r, "--model", path, "--prompt", "hi");
	EXPECT_FAIL(&r, 1, "missing --model", path);
	run_free(&r);
}

static void test_truncated_model(void **state)
{
	char path[4200], size[32];
	struct stat st;
	struct run r;

	(void)state;
	snprintf(path, sizeof(path), "%s/truncated.bin", scratch);
	lt_copy_file(model_260k, path);
	assert_int_equal(stat(path, &st), 0);
	assert_int_equal(truncate(path, st.st_size / 2), 0);
	snprintf(size, sizeof(size), "%lld", (long long)(st.st_size / 2));
	RUN(&r, "--model", path, "--prompt", "hi");
	EXPECT_FAIL(&r, 1, "truncated --model", path, size);
	run_free(&r);
	unlink(path);
}

/* A llama2.c tokenizer file of n tokens: <unk>, <s>, </s>, the 256 byte
 * tokens, then made-up pieces. */
static void write_tokenizer(const char *path, int32_t n)
{
	FILE *f = fopen(path, "wb");
	int32_t max_len = 16;

	assert_non_null(f);
	assert_int_equal(fwrite(&max_len, sizeof(max_len), 1, f), 1);
	for (int32_t i = 0; i < n; i++) {
		char piece[32];
		float score = i < 259 ? 0.0f : -(float)i;
		int32_t len;

		if (i == 0)
			snprintf(piece, sizeof(piece), "<unk>");
		else if (i == 1)
			snprintf(piece, sizeof(piece), "<s>");
		else if (i == 2)
			snprintf(piece, sizeof(piece), "</s>");
		else if (i < 259)
			snprintf(piece, sizeof(piece), "<0x%02X>", i - 3);
		else
			snprintf(piece, sizeof(piece), "t%d", i);
		len = (int32_t)strlen(piece);
		assert_int_equal(fwrite(&score, sizeof(score), 1, f), 1);
		assert_int_equal(fwrite(&len, sizeof(len), 1, f), 1);
		assert_int_equal(fwrite(piece, 1, (size_t)len, f), (size_t)len);
	}
	assert_int_equal(fclose(f), 0);
}

static void test_tokenizer_vocab(void **state)
{
	char tok[4200];
	struct run r;

	(void)state;
	snprintf(tok, sizeof(tok), "%s/tok511.bin", scratch);
	write_tokenizer(tok, 511);
	RUN(&r, "--model", model_260k, "--tokenizer", tok, "--prompt", "hi");
	EXPECT_FAIL(&r, 1, "a 511-token tokenizer for a 512-token model", tok, "511", "512");
	run_free(&r);

	/* The same file with 512 tokens is taken. */
	write_tokenizer(tok, 512);
	RUN(&r, "--model", model_260k, "--tokenizer", tok, "--prompt", "hi", "--steps", "4",
	    "--print-ids");
	expect_ok(&r, "a 512-token tokenizer");
	run_free(&r);
	unlink(tok);
}

/* The tokens of text with BOS under the byte tokenizer kv-llama gives
 * the synthetic models. */
static uint32_t byte_tokens(const char *text)
{
	struct llm_tokenizer *t;
	uint32_t n = 0;

	kv_assert_ok(llm_tokenizer_bytes(512, &t));
	kv_assert_rc(llm_tokenizer_encode(t, text, true, false, NULL, 0, &n), -ENOSPC);
	llm_tokenizer_free(t);
	return n;
}

static void test_prompt_too_long(void **state)
{
	char prompt[601], tokens[16];
	struct run r;

	(void)state;
	memset(prompt, 'a', 600);
	prompt[600] = '\0';
	snprintf(tokens, sizeof(tokens), "%u", byte_tokens(prompt));
	RUN(&r, "--synthetic", "260K", "--prompt", prompt, "--steps", "4");
	EXPECT_FAIL(&r, 1, "a 600-byte prompt (seq_len 512)", tokens, "512");
	run_free(&r);
}

static void test_bad_options(void **state)
{
	static const struct {
		const char *opt, *value;
	} bad[] = {
		{ "--weights", "disk" },
		{ "--kv-dtype", "f8" },
		{ "--huge", "4k" },
		{ "--steps", "many" },
		{ "--steps", "-1" },
		{ "--weight-budget", "lots" },
		{ "--weight-budget", "250%" },
		{ "--top-p", "0" },
		{ "--batch", "0" },
	};
	struct run r;

	(void)state;
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		RUN(&r, "--synthetic", "260K", "--prompt", "hi", bad[i].opt, bad[i].value);
		EXPECT_FAIL(&r, 2, bad[i].opt, bad[i].opt, bad[i].value);
		run_free(&r);
	}
	RUN(&r, "--synthetic", "260K", "--no-such-option");
	EXPECT_FAIL(&r, 2, "an unknown option", "--no-such-option");
	run_free(&r);
	RUN(&r, "--prompt", "hi");
	EXPECT_FAIL(&r, 2, "no model", "--model", "--synthetic");
	run_free(&r);
	RUN(&r, "--synthetic", "260K", "--model", model_260k);
	EXPECT_FAIL(&r, 2, "two models", "not both");
	run_free(&r);
	/* A well-formed option naming something that does not exist. */
	RUN(&r, "--synthetic", "7T", "--prompt", "hi");
	EXPECT_FAIL(&r, 1, "an unknown synthetic model", "7T", "260K");
	run_free(&r);
}

/* The ids --print-ids prints: a line per sequence of ids separated by
 * blanks, then a blank line before the summary. Returns the number of
 * lines; ids[line][i], n[line]. */
static int parse_ids(const char *out, int32_t ids[][64], int n[], int max_lines)
{
	int lines = 0;

	for (const char *p = out; *p && *p != '\n'; lines++) {
		const char *eol = strchr(p, '\n');

		if (!eol)
			eol = p + strlen(p);
		assert_true(lines < max_lines);
		n[lines] = 0;
		for (const char *q = p; q < eol;) {
			char *end;
			long v = strtol(q, &end, 10);

			if (end == q)
				fail_msg("--print-ids printed a line that is not ids: %.*s",
					 (int)(eol - p), p);
			assert_true(v >= 0 && v < 512 && n[lines] < 64);
			ids[lines][n[lines]++] = (int32_t)v;
			for (q = end; q < eol && *q == ' '; q++)
				;
		}
		p = *eol ? eol + 1 : eol;
	}
	return lines;
}

/* The id lines of a --print-ids run (up to the blank line before the
 * summary), malloc'ed. */
static char *id_lines(const struct run *r)
{
	const char *end = strstr(r->out, "\n\n");
	size_t n = end ? (size_t)(end - r->out) + 1 : strlen(r->out);
	char *s = malloc(n + 1);

	assert_non_null(s);
	memcpy(s, r->out, n);
	s[n] = '\0';
	return s;
}

static void test_print_ids(void **state)
{
	static const char *const weights[][4] = {
		{ "--weights", "dram", NULL, NULL },
		{ "--weights", "mmap", NULL, NULL },
		{ "--weights", "stream", "--weight-budget", "25%" },
	};
	int32_t ids[4][64];
	int n[4];
	struct run r;
	char *want = NULL, *got, *one;

	(void)state;
	RUN(&r, "--synthetic", "260K", "--prompt", "hi", "--steps", "8", "--print-ids");
	expect_ok(&r, "--print-ids");
	assert_int_equal(parse_ids(r.out, ids, n, 4), 1);
	assert_int_equal(n[0], 8);
	one = id_lines(&r);
	run_free(&r);

	/* Two prompts: two lines, the first one the prompt's alone. */
	RUN(&r, "--synthetic", "260K", "--prompt", "hi", "--prompt", "there", "--steps", "8",
	    "--print-ids");
	expect_ok(&r, "two prompts");
	assert_int_equal(parse_ids(r.out, ids, n, 4), 2);
	assert_int_equal(n[0], 8);
	assert_int_equal(n[1], 8);
	assert_int_equal(strncmp(r.out, one, strlen(one)), 0);
	run_free(&r);
	free(one);

	/* The weights' homes: the same ids. Greedy ids of a synthetic model
	 * mostly repeat the prompt's last token, so these are sampled (at
	 * temperature 1, a choice that follows every logit). */
	for (size_t w = 0; w < sizeof(weights) / sizeof(weights[0]); w++) {
		const char *const *wa = weights[w];

		if (wa[2])
			RUN(&r, "--synthetic", "260K", "--prompt", "hi", "--steps", "16", "--print-ids",
			    "--temperature", "1", "--samples", "2", "--ignore-eos", wa[0], wa[1], wa[2],
			    wa[3]);
		else
			RUN(&r, "--synthetic", "260K", "--prompt", "hi", "--steps", "16", "--print-ids",
			    "--temperature", "1", "--samples", "2", "--ignore-eos", wa[0], wa[1]);
		expect_ok(&r, wa[1]);
		assert_int_equal(parse_ids(r.out, ids, n, 4), 2);
		got = id_lines(&r);
		if (!want)
			want = got;
		else if (strcmp(got, want) != 0)
			fail_msg("--weights %s printed\n%sdram printed\n%s", wa[1], got, want);
		/* With --print-ids the summary goes to stderr. */
		if (wa[2] && !strstr(r.err, "streamer: budget"))
			fail_msg("--weights stream: no streamer line in\n%s", r.err);
		if (strstr(r.out, "prefill:"))
			fail_msg("--print-ids: the summary is on stdout:\n%s", r.out);
		if (got != want)
			free(got);
		run_free(&r);
	}
	free(want);
}

/* --samples 3 at temperature 0.8: three lines of 8 ids, the same for the
 * same --seed, another for another seed. */
static void test_samples(void **state)
{
	const char *seeds[3] = { "7", "7", "8" };
	char *out[3];
	int32_t ids[4][64];
	int n[4];
	struct run r;

	(void)state;
	for (int i = 0; i < 3; i++) {
		RUN(&r, "--synthetic", "260K", "--prompt", "hi", "--steps", "8", "--print-ids",
		    "--samples", "3", "--temperature", "0.8", "--seed", seeds[i], "--ignore-eos");
		expect_ok(&r, "--samples 3");
		assert_int_equal(parse_ids(r.out, ids, n, 4), 3);
		for (int j = 0; j < 3; j++)
			assert_int_equal(n[j], 8);
		out[i] = id_lines(&r);
		run_free(&r);
	}
	assert_string_equal(out[0], out[1]);
	assert_string_not_equal(out[0], out[2]);
	for (int i = 0; i < 3; i++)
		free(out[i]);
}


/* Run with --json and the args; the parsed output. */
static struct json_object *run_json(const char *const *args)
{
	struct json_object *root;
	struct run r;

	run_args(&r, args);
	expect_ok(&r, "--json");
	root = json_tokener_parse(r.out);
	if (!root || !json_object_is_type(root, json_type_object))
		fail_msg("--json printed no JSON object:\n%s", r.out);
	run_free(&r);
	return root;
}

#define RUN_JSON(...) run_json((const char *const[]){ __VA_ARGS__, NULL })

static void test_json(void **state)
{
	struct json_object *root, *sum, *outs, *o0, *ids;
	const char *weights[] = { "dram", "stream" };

	(void)state;
	for (int w = 0; w < 2; w++) {
		root = RUN_JSON("--synthetic", "260K", "--prompt", "hi", "--steps", "8", "--json",
				"--ignore-eos", "--weights", weights[w]);
		assert_string_equal(json_object_get_string(get(root, "weights", json_type_string)),
				    weights[w]);
		outs = get(root, "outputs", json_type_array);
		assert_int_equal(json_object_array_length(outs), 1);
		o0 = json_object_array_get_idx(outs, 0);
		ids = get(o0, "ids", json_type_array);
		assert_int_equal(json_object_array_length(ids), 8);
		get(o0, "text", json_type_string);
		sum = get(root, "summary", json_type_object);
		assert_true(get_number(sum, "prefill_tps") > 0);
		assert_true(get_number(sum, "decode_tps") > 0);
		assert_true(get_number(sum, "ms_per_token") > 0);
		assert_true(get_number(sum, "prefix_hit_tokens") == 0);
		if (w == 0)
			assert_true(get_number(sum, "stall_fraction") == 0);
		else
			assert_true(get_number(sum, "stall_fraction") >= 0 &&
				    get_number(sum, "stall_fraction") <= 1);
		get(root, "report", json_type_object);
		json_object_put(root);
	}
}

/* A prompt's blocks written to --kv-store by one run are prefix hits of
 * the next process: of a 40-byte prompt, the full 16-token blocks before
 * its last token. */
static void test_kv_store(void **state)
{
	char store[4200];
	const char *prompt = "0123456789012345678901234567890123456789";
	struct json_object *root, *sum, *o0;
	uint32_t hit = (byte_tokens(prompt) - 1) / 16 * 16;
	int32_t first[8];

	(void)state;
	assert_true(hit >= 32);
	snprintf(store, sizeof(store), "%s/kv-store", scratch);
	for (int i = 0; i < 2; i++) {
		struct json_object *ids;

		root = RUN_JSON("--synthetic", "260K", "--prompt", prompt, "--steps", "8", "--json",
				"--ignore-eos", "--kv-store", store);
		sum = get(root, "summary", json_type_object);
		o0 = json_object_array_get_idx(get(root, "outputs", json_type_array), 0);
		assert_non_null(o0);
		assert_int_equal(get_number(sum, "prefix_hit_tokens"), i == 0 ? 0 : hit);
		assert_int_equal(get_number(o0, "cached"), i == 0 ? 0 : hit);
		ids = get(o0, "ids", json_type_array);
		assert_int_equal(json_object_array_length(ids), 8);
		for (int j = 0; j < 8; j++) {
			int32_t id = json_object_get_int(json_object_array_get_idx(ids, (size_t)j));

			if (i == 0)
				first[j] = id;
			else
				assert_int_equal(id, first[j]);
		}
		json_object_put(root);
	}
}

static int setup(void **state)
{
	struct llm_config cfg;
	const char *b = getenv("KV_TEST_BUILDDIR");

	(void)state;
	if (!b || !*b)
		kv_test_skip_all("KV_TEST_BUILDDIR is not set (run through meson test)");
	snprintf(prog, sizeof(prog), "%s/examples/llama/kv-llama", b);
	if (access(prog, X_OK) != 0)
		kv_test_skip_all("%s is not built", prog);
	kv_test_private_cache(cache_home, sizeof(cache_home), "kv-llama-cli-xdg");
	kv_test_mkdtemp(scratch, sizeof(scratch), "kv-llama-cli");
	if (llm_synthetic_config("260K", &cfg) != 0 ||
	    llm_synthetic_ensure(&cfg, 1, scratch, model_260k, sizeof(model_260k)) != 0) {
		print_error("260K model: %s\n", kv_last_error());
		return -1;
	}
	return 0;
}

static int teardown(void **state)
{
	(void)state;
	kv_test_rmtree(scratch);
	kv_test_rmtree(cache_home);
	return 0;
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_missing_model),
		cmocka_unit_test(test_truncated_model),
		cmocka_unit_test(test_tokenizer_vocab),
		cmocka_unit_test(test_prompt_too_long),
		cmocka_unit_test(test_bad_options),
		cmocka_unit_test(test_print_ids),
		cmocka_unit_test(test_samples),
		cmocka_unit_test(test_json),
		cmocka_unit_test(test_kv_store),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
