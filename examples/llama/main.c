// SPDX-License-Identifier: MIT
/*
 * kv-llama: generate text with a llama2.c checkpoint (or a built-in
 * synthetic model) on libkv: weights in DRAM, mapped or streamed from SSD,
 * the KV cache paged with a prefix cache (and an SSD tier), attention
 * through the block tables. Prints the text, a summary and the memory
 * report (bytes by tier x kind).
 *
 * Exit codes: 0 done, 1 a failure (bad file, prompt too long, out of
 * memory...: the message says what), 2 a bad command line.
 */
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "llama.h"
#include "taxonomy/kv-private.h"

#define MAX_PROMPTS 4096

struct opts {
	const char *model, *tokenizer, *synthetic, *prompts_file, *kv_store, *cache_dir;
	const char *prompts[MAX_PROMPTS];
	uint32_t n_prompts;
	uint32_t steps, batch, samples, threads, block_tokens;
	float temperature, top_p;
	uint64_t seed;
	bool print_ids, json, no_prefix_cache, ignore_eos;
	struct llm_engine_config ec;
};

static void usage(FILE *f)
{
	fprintf(f,
		"usage: kv-llama (--model PATH [--tokenizer PATH] | --synthetic 260K|15M|110M|1B) [options]\n"
		"  --prompt STR          a prompt (repeatable; default \"Once upon a time\")\n"
		"  --prompts-file PATH   one prompt per line\n"
		"  --steps N             new tokens per sequence (default 64; clipped at seq_len)\n"
		"  --temperature T       0 = greedy (default)\n"
		"  --top-p P             nucleus sampling mass (default 0.9)\n"
		"  --seed N              sampling seed (default 42)\n"
		"  --batch N             sequences decoded together, cycling through the prompts\n"
		"                        (default: one per prompt)\n"
		"  --samples N           parallel samples per prompt, forked through the KV cache\n"
		"  --threads N           BLAS and attention threads (default: cores)\n"
		"  --ignore-eos          keep generating after EOS\n"
		"weights:\n"
		"  --weights dram|mmap|stream   (default dram)\n"
		"  --weight-budget BYTES|PCT    stream: DRAM for weights (default 25%%)\n"
		"  --lookahead N                stream: tensors read ahead (default 4)\n"
		"  --numa local|interleave|first-touch|bind:NODE   placement of weights and KV\n"
		"  --huge none|thp|2m|1g|auto   huge pages (default thp)\n"
		"KV cache:\n"
		"  --kv-budget BYTES     DRAM for KV blocks (default: every sequence at seq_len)\n"
		"  --kv-dtype f32|f16|bf16|int8 (default f32)\n"
		"  --block-tokens N      tokens per block (default 16)\n"
		"  --no-prefix-cache\n"
		"  --kv-store DIR        SSD tier: prefixes persist across runs\n"
		"output:\n"
		"  --print-ids           generated token ids, one line per sequence\n"
		"  --json                the outputs and summary as one JSON object\n"
		"  --cache-dir DIR       where synthetic models are written\n");
}

static int bad(const char *fmt, ...) KV_PRINTF(1, 2);
static int bad(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "kv-llama: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, " (see --help)\n");
	return 2;
}

static bool parse_u32(const char *s, uint32_t min, uint32_t max, uint32_t *out)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s || *end || s[0] == '-' || v < min || v > max)
		return false;
	*out = (uint32_t)v;
	return true;
}

/* "123", "64K", "1.5G", "512MiB" (powers of 1024). */
static bool parse_bytes(const char *s, uint64_t *out)
{
	char *end;
	double v = strtod(s, &end), mul = 1;

	if (end == s || !(v > 0))
		return false;
	switch (*end) {
	case 'k': case 'K': mul = 1024.0; end++; break;
	case 'm': case 'M': mul = 1024.0 * 1024; end++; break;
	case 'g': case 'G': mul = 1024.0 * 1024 * 1024; end++; break;
	case 't': case 'T': mul = 1024.0 * 1024 * 1024 * 1024; end++; break;
	}
	if (*end == 'i')
		end++;
	if (*end == 'B' || *end == 'b')
		end++;
	if (*end || v * mul > 1e18)
		return false;
	*out = (uint64_t)(v * mul);
	return true;
}

static int parse_args(int argc, char **argv, struct opts *o)
{
	enum { O_MODEL = 256, O_TOK, O_SYN, O_PROMPT, O_PFILE, O_STEPS, O_TEMP, O_TOPP, O_SEED,
	       O_BATCH, O_SAMPLES, O_THREADS, O_WEIGHTS, O_WBUDGET, O_NUMA, O_HUGE, O_KVB,
	       O_KVD, O_BT, O_NOPC, O_STORE, O_IDS, O_JSON, O_CDIR, O_NOEOS, O_LOOK, O_HELP };
	static const struct option lo[] = {
		{ "model", 1, 0, O_MODEL }, { "tokenizer", 1, 0, O_TOK }, { "synthetic", 1, 0, O_SYN },
		{ "prompt", 1, 0, O_PROMPT }, { "prompts-file", 1, 0, O_PFILE },
		{ "steps", 1, 0, O_STEPS }, { "temperature", 1, 0, O_TEMP }, { "top-p", 1, 0, O_TOPP },
		{ "seed", 1, 0, O_SEED }, { "batch", 1, 0, O_BATCH }, { "samples", 1, 0, O_SAMPLES },
		{ "threads", 1, 0, O_THREADS }, { "weights", 1, 0, O_WEIGHTS },
		{ "weight-budget", 1, 0, O_WBUDGET }, { "numa", 1, 0, O_NUMA }, { "huge", 1, 0, O_HUGE },
		{ "kv-budget", 1, 0, O_KVB }, { "kv-dtype", 1, 0, O_KVD },
		{ "block-tokens", 1, 0, O_BT }, { "no-prefix-cache", 0, 0, O_NOPC },
		{ "kv-store", 1, 0, O_STORE }, { "print-ids", 0, 0, O_IDS }, { "json", 0, 0, O_JSON },
		{ "cache-dir", 1, 0, O_CDIR }, { "ignore-eos", 0, 0, O_NOEOS },
		{ "lookahead", 1, 0, O_LOOK },
		{ "help", 0, 0, O_HELP }, { 0, 0, 0, 0 },
	};
	struct llm_engine_config *ec = &o->ec;
	int c;

	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		char *end;

		switch (c) {
		case O_MODEL: o->model = optarg; break;
		case O_TOK: o->tokenizer = optarg; break;
		case O_SYN: o->synthetic = optarg; break;
		case O_PROMPT:
			if (o->n_prompts == MAX_PROMPTS)
				return bad("more than %d prompts", MAX_PROMPTS);
			o->prompts[o->n_prompts++] = optarg;
			break;
		case O_PFILE: o->prompts_file = optarg; break;
		case O_STEPS:
			if (!parse_u32(optarg, 0, LLM_MAX_SEQ_LEN, &o->steps))
				return bad("--steps '%s': expected 0..1048576", optarg);
			break;
		case O_TEMP:
			o->temperature = strtof(optarg, &end);
			if (end == optarg || *end || !(o->temperature >= 0))
				return bad("--temperature '%s': expected a number >= 0", optarg);
			break;
		case O_TOPP:
			o->top_p = strtof(optarg, &end);
			if (end == optarg || *end || !(o->top_p > 0 && o->top_p <= 1))
				return bad("--top-p '%s': expected a number in (0, 1]", optarg);
			break;
		case O_SEED:
			errno = 0;
			o->seed = strtoull(optarg, &end, 0);
			if (errno || end == optarg || *end)
				return bad("--seed '%s': expected an integer", optarg);
			break;
		case O_BATCH:
			if (!parse_u32(optarg, 1, 4096, &o->batch))
				return bad("--batch '%s': expected 1..4096", optarg);
			break;
		case O_SAMPLES:
			if (!parse_u32(optarg, 1, 4096, &o->samples))
				return bad("--samples '%s': expected 1..4096", optarg);
			break;
		case O_THREADS:
			if (!parse_u32(optarg, 1, 1024, &ec->threads))
				return bad("--threads '%s': expected 1..1024", optarg);
			break;
		case O_WEIGHTS:
			if (!strcmp(optarg, "dram"))
				ec->weights = LLM_WEIGHTS_DRAM;
			else if (!strcmp(optarg, "mmap"))
				ec->weights = LLM_WEIGHTS_MMAP;
			else if (!strcmp(optarg, "stream"))
				ec->weights = LLM_WEIGHTS_STREAM;
			else
				return bad("--weights '%s': expected dram, mmap or stream", optarg);
			break;
		case O_WBUDGET: {
			size_t n = strlen(optarg);

			if (n > 1 && optarg[n - 1] == '%') {
				double pct = strtod(optarg, &end);

				if (end != optarg + n - 1 || !(pct > 0 && pct <= 100))
					return bad("--weight-budget '%s': expected a percentage in (0, 100]",
						   optarg);
				ec->weight_budget = 0;
				ec->weight_budget_frac = pct / 100;
			} else if (!parse_bytes(optarg, &ec->weight_budget)) {
				return bad("--weight-budget '%s': expected bytes (e.g. 512M) or a percentage (25%%)",
					   optarg);
			}
			break;
		}
		case O_NUMA:
			if (!strcmp(optarg, "local"))
				ec->place.numa = KV_NUMA_LOCAL;
			else if (!strcmp(optarg, "interleave"))
				ec->place.numa = KV_NUMA_INTERLEAVE;
			else if (!strcmp(optarg, "first-touch"))
				ec->place.numa = KV_NUMA_FIRST_TOUCH;
			else if (!strncmp(optarg, "bind:", 5) &&
				 parse_u32(optarg + 5, 0, 63, (uint32_t *)&ec->place.node))
				ec->place.numa = KV_NUMA_BIND;
			else
				return bad("--numa '%s': expected local, interleave, first-touch or bind:NODE",
					   optarg);
			break;
		case O_HUGE: {
			static const char *const names[] = { "none", "thp", "2m", "1g", "auto" };
			static const enum kv_huge vals[] = { KV_HUGE_NONE, KV_HUGE_THP, KV_HUGE_2M,
							     KV_HUGE_1G, KV_HUGE_AUTO };
			size_t i;

			for (i = 0; i < 5 && strcasecmp(optarg, names[i]); i++)
				;
			if (i == 5)
				return bad("--huge '%s': expected none, thp, 2m, 1g or auto", optarg);
			ec->place.huge = vals[i];
			break;
		}
		case O_KVB:
			if (!parse_bytes(optarg, &ec->kv_budget))
				return bad("--kv-budget '%s': expected bytes (e.g. 256M)", optarg);
			break;
		case O_KVD:
			if (!strcmp(optarg, "f32"))
				ec->kv_dtype = KV_DTYPE_F32;
			else if (!strcmp(optarg, "f16"))
				ec->kv_dtype = KV_DTYPE_F16;
			else if (!strcmp(optarg, "bf16"))
				ec->kv_dtype = KV_DTYPE_BF16;
			else if (!strcmp(optarg, "int8"))
				ec->kv_dtype = KV_DTYPE_I8;
			else
				return bad("--kv-dtype '%s': expected f32, f16, bf16 or int8", optarg);
			break;
		case O_BT:
			if (!parse_u32(optarg, 1, KV_CACHE_MAX_BLOCK_TOKENS, &ec->block_tokens))
				return bad("--block-tokens '%s': expected 1..1024", optarg);
			break;
		case O_NOPC: ec->prefix_cache = false; break;
		case O_STORE: o->kv_store = optarg; break;
		case O_IDS: o->print_ids = true; break;
		case O_JSON: o->json = true; break;
		case O_CDIR: o->cache_dir = optarg; break;
		case O_NOEOS: o->ignore_eos = true; break;
		case O_LOOK:
			if (!parse_u32(optarg, 1, 1024, &ec->lookahead))
				return bad("--lookahead '%s': expected 1..1024", optarg);
			break;
		case O_HELP: usage(stdout); exit(0);
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc)
		return bad("unexpected argument '%s'", argv[optind]);
	if (!o->model == !o->synthetic)
		return bad("%s", o->model ? "give --model or --synthetic, not both"
					  : "give --model PATH or --synthetic NAME");
	if (o->tokenizer && o->synthetic)
		return bad("%s", "--tokenizer goes with --model (synthetic models use a byte tokenizer)");
	return 0;
}

/* Read prompts, one per line, from a file (kept for the whole run). */
static int read_prompts(struct opts *o, char **buf_out)
{
	FILE *f = fopen(o->prompts_file, "rb");
	char *buf = NULL;
	size_t cap = 0, len = 0;

	if (!f) {
		fprintf(stderr, "kv-llama: prompts file '%s': %s\n", o->prompts_file, strerror(errno));
		return 1;
	}
	for (;;) {
		if (len + 4096 + 1 > cap) {
			char *nb = realloc(buf, cap = cap * 2 + 8192);

			if (!nb) {
				free(buf);
				fclose(f);
				fprintf(stderr, "kv-llama: out of memory\n");
				return 1;
			}
			buf = nb;
		}
		size_t n = fread(buf + len, 1, 4096, f);
		if (n == 0)
			break;
		len += n;
	}
	fclose(f);
	buf[len] = 0;
	for (char *line = buf, *nl; line && *line; line = nl) {
		nl = strchr(line, '\n');
		if (nl)
			*nl++ = 0;
		size_t n = strlen(line);
		if (n && line[n - 1] == '\r')
			line[n - 1] = 0;
		if (!*line)
			continue;
		if (o->n_prompts == MAX_PROMPTS) {
			fprintf(stderr, "kv-llama: prompts file '%s': more than %d prompts\n",
				o->prompts_file, MAX_PROMPTS);
			free(buf);
			return 1;
		}
		o->prompts[o->n_prompts++] = line;
	}
	*buf_out = buf;
	return 0;
}

struct stream_out {
	const struct llm_tokenizer *tok;
	int32_t prev;
};

static void on_token(void *ctx, uint32_t seq, int32_t token)
{
	struct stream_out *so = ctx;
	size_t len;
	const char *s = llm_tokenizer_decode(so->tok, so->prev, token, &len);

	(void)seq;
	fwrite(s, 1, len, stdout);
	fflush(stdout);
	so->prev = token;
}

static void json_text(FILE *f, const struct llm_tokenizer *tok, int32_t prev, const int32_t *ids,
		      uint32_t n)
{
	/* The text as raw bytes first, then escaped as one JSON string. */
	char *buf = NULL;
	size_t len = 0;
	FILE *m = open_memstream(&buf, &len);

	for (uint32_t i = 0; m && i < n; i++) {
		size_t l;
		const char *s = llm_tokenizer_decode(tok, prev, ids[i], &l);

		fwrite(s, 1, l, m);
		prev = ids[i];
	}
	if (m)
		fclose(m);
	kv_json_string(f, buf ? buf : "");
	free(buf);
}

int main(int argc, char **argv)
{
	struct opts o = { .steps = 64, .samples = 1, .top_p = 0.9f, .seed = 42 };
	char model_path[4096], *pbuf = NULL;
	struct llm_config mc;
	struct llm_tokenizer *tok = NULL;
	struct llm_engine *e = NULL;
	struct llm_gen_config g;
	struct llm_gen_result res = { 0 };
	struct llm_engine_stats st;
	int32_t **ptok = NULL;
	uint32_t *plen = NULL, n_used = 0;
	struct stream_out so = { 0 };
	int rc, status = 1;

	llm_engine_config_default(&o.ec);
	if ((rc = parse_args(argc, argv, &o)))
		return rc;
	if (o.prompts_file && read_prompts(&o, &pbuf))
		return 1;
	if (o.n_prompts == 0)
		o.prompts[o.n_prompts++] = "Once upon a time";

	/* The model file. */
	if (o.synthetic) {
		if ((rc = llm_synthetic_config(o.synthetic, &mc)) ||
		    (rc = llm_synthetic_ensure(&mc, 1, o.cache_dir, model_path, sizeof(model_path)))) {
			fprintf(stderr, "kv-llama: %s\n", kv_last_error());
			goto out;
		}
	} else {
		snprintf(model_path, sizeof(model_path), "%s", o.model);
		if ((rc = llm_checkpoint_read_config(model_path, &mc))) {
			fprintf(stderr, "kv-llama: %s\n", kv_last_error());
			goto out;
		}
	}
	rc = o.tokenizer ? llm_tokenizer_load(o.tokenizer, mc.vocab_size, &tok)
			 : llm_tokenizer_bytes(mc.vocab_size, &tok);
	if (rc) {
		fprintf(stderr, "kv-llama: %s\n", kv_last_error());
		goto out;
	}

	/* Prompts: --batch N takes N of them, cycling. */
	n_used = o.batch ? o.batch : o.n_prompts;
	if ((uint64_t)n_used * o.samples > 4096) {
		fprintf(stderr, "kv-llama: %" PRIu32 " prompts x %" PRIu32 " samples: at most 4096 sequences\n",
			n_used, o.samples);
		goto out;
	}
	ptok = calloc(n_used, sizeof(*ptok));
	plen = calloc(n_used, sizeof(*plen));
	if (!ptok || !plen) {
		fprintf(stderr, "kv-llama: out of memory\n");
		goto out;
	}
	for (uint32_t i = 0; i < n_used; i++) {
		const char *text = o.prompts[i % o.n_prompts];
		/* At most a token per byte, plus BOS and the dummy space. */
		uint32_t cap = (uint32_t)(strlen(text) < (1u << 28) ? strlen(text) : (1u << 28)) + 2;

		if (!(ptok[i] = malloc(sizeof(int32_t) * cap))) {
			fprintf(stderr, "kv-llama: out of memory\n");
			goto out;
		}
		if (llm_tokenizer_encode(tok, text, true, false, ptok[i], cap, &plen[i])) {
			fprintf(stderr, "kv-llama: prompt %" PRIu32 ": %s\n", i, kv_last_error());
			goto out;
		}
		if (plen[i] > mc.seq_len) {
			fprintf(stderr, "kv-llama: prompt %" PRIu32 " is %" PRIu32
				" tokens, longer than the model's seq_len %" PRIu32 "\n",
				i, plen[i], mc.seq_len);
			goto out;
		}
	}

	/* The engine. */
	o.ec.model_path = model_path;
	o.ec.max_batch = n_used * o.samples;
	o.ec.kv_store = o.kv_store;
	if ((rc = llm_engine_create(&o.ec, &e))) {
		fprintf(stderr, "kv-llama: %s\n", kv_last_error());
		goto out;
	}
	llm_gen_config_default(&g);
	g.n_prompts = n_used;
	g.prompts = (const int32_t *const *)ptok;
	g.prompt_lens = plen;
	g.samples = o.samples;
	g.steps = o.steps;
	g.temperature = o.temperature;
	g.top_p = o.top_p;
	g.seed = o.seed;
	g.stop_at_eos = !o.ignore_eos;
	/* One sequence of plain text streams as it is generated. */
	bool streaming = n_used * o.samples == 1 && !o.print_ids && !o.json;
	if (streaming) {
		so.tok = tok;
		so.prev = plen[0] ? ptok[0][plen[0] - 1] : LLM_BOS;
		fputs(o.prompts[0], stdout);
		g.on_token = on_token;
		g.ctx = &so;
	}
	if ((rc = llm_generate(e, &g, &res))) {
		if (streaming)
			putchar('\n');
		fprintf(stderr, "kv-llama: %s\n", kv_last_error());
		goto out;
	}
	llm_engine_stats(e, &st);
	double prefill_tps = st.prefill_ns ? st.prefill_tokens / (st.prefill_ns / 1e9) : 0;
	double decode_tps = st.decode_ns ? st.decode_tokens / (st.decode_ns / 1e9) : 0;
	double ms_per_token = st.decode_steps ? st.decode_ns / 1e6 / st.decode_steps : 0;
	static const char *const wname[] = { "dram", "mmap", "stream" };

	if (o.json) {
		printf("{\"model\":");
		kv_json_string(stdout, o.synthetic ? o.synthetic : model_path);
		printf(",\"weights\":\"%s\",\"kv_dtype\":\"%s\",\"sequences\":%" PRIu32 ",\"outputs\":[",
		       wname[o.ec.weights], kv_dtype_name(o.ec.kv_dtype), res.n_seqs);
		for (uint32_t i = 0; i < res.n_seqs; i++) {
			uint32_t p = i / o.samples;

			printf("%s{\"prompt\":%" PRIu32 ",\"cached\":%" PRIu32 ",\"ids\":[", i ? "," : "", p,
			       res.cached[i]);
			for (uint32_t j = 0; j < res.n_tokens[i]; j++)
				printf("%s%" PRId32, j ? "," : "", res.tokens[i][j]);
			printf("],\"text\":");
			json_text(stdout, tok, ptok[p][plen[p] - 1], res.tokens[i], res.n_tokens[i]);
			printf("}");
		}
		printf("],\"summary\":{\"prefill_tokens\":%" PRIu64 ",\"prefill_tps\":", st.prefill_tokens);
		kv_json_double(stdout, prefill_tps);
		printf(",\"decode_tokens\":%" PRIu64 ",\"decode_tps\":", st.decode_tokens);
		kv_json_double(stdout, decode_tps);
		printf(",\"ms_per_token\":");
		kv_json_double(stdout, ms_per_token);
		printf(",\"prefix_hit_tokens\":%" PRIu64 ",\"stall_fraction\":", st.prefix_hit_tokens);
		kv_json_double(stdout, st.stall_fraction);
		printf(",\"weight_bytes_per_pass\":%" PRIu64 ",\"stream_bytes_read\":%" PRIu64 "},\"report\":",
		       st.weight_bytes, st.stream_bytes_read);
		fflush(stdout);
		kv_report_write(llm_engine_registry(e), stdout, KV_REPORT_JSON);
		printf("}\n");
	} else {
		if (streaming) {
			putchar('\n');
		} else {
			for (uint32_t i = 0; i < res.n_seqs; i++) {
				uint32_t p = i / o.samples;

				if (o.print_ids) {
					for (uint32_t j = 0; j < res.n_tokens[i]; j++)
						printf("%s%" PRId32, j ? " " : "", res.tokens[i][j]);
					putchar('\n');
					continue;
				}
				printf("[%" PRIu32 "] %s", i, o.prompts[p % o.n_prompts]);
				int32_t prev = ptok[p][plen[p] - 1];
				for (uint32_t j = 0; j < res.n_tokens[i]; j++) {
					size_t l;
					const char *s = llm_tokenizer_decode(tok, prev, res.tokens[i][j], &l);

					fwrite(s, 1, l, stdout);
					prev = res.tokens[i][j];
				}
				putchar('\n');
			}
		}
		/* With --print-ids stdout holds only the ids. */
		FILE *sum = o.print_ids ? stderr : stdout;

		fprintf(sum, "\n-- kv-llama: %s, %s weights, KV %s, %" PRIu32 " sequence%s\n",
					o.synthetic ? o.synthetic : model_path, wname[o.ec.weights],
		       kv_dtype_name(o.ec.kv_dtype), res.n_seqs, res.n_seqs == 1 ? "" : "s");
		fprintf(sum, "prefill: %" PRIu64 " tokens, %.1f tokens/s\n", st.prefill_tokens, prefill_tps);
		fprintf(sum, "decode:  %" PRIu64 " tokens, %.1f tokens/s, %.2f ms per step\n",
		       st.decode_tokens, decode_tps, ms_per_token);
		fprintf(sum, "prefix hits: %" PRIu64 " prompt tokens taken from the cache\n",
		       st.prefix_hit_tokens);
		if (o.ec.weights == LLM_WEIGHTS_STREAM)
			fprintf(sum, "streamer: budget %.1f MiB of %.1f MiB, stall fraction %.3f\n",
			       st.stream_budget / 1048576.0, st.file_bytes / 1048576.0, st.stall_fraction);
		fprintf(sum, "\n");
		fflush(sum);
		kv_report_write(llm_engine_registry(e), sum, KV_REPORT_TEXT);
	}
	status = 0;
out:
	llm_gen_result_free(&res);
	llm_engine_destroy(e);
	llm_tokenizer_free(tok);
	for (uint32_t i = 0; ptok && i < n_used; i++)
		free(ptok[i]);
	free(ptok);
	free(plen);
	free(pbuf);
	return status;
}
