// SPDX-License-Identifier: MIT
/*
 * kv-bench decode: kv-llama's engine (examples/llama/llama.h) decoding
 * synthetic llama2.c models on 2 threads, against bounds measured in the
 * same run: the DRAM read bandwidth on 2 threads (bench_mem.c, as kv
 * measures it) and the raw O_DIRECT sequential read bandwidth of the
 * model file (bench_raw_uring, 4 MiB requests, 16 in flight: the 64 MiB
 * the streamer's kv_io keeps in flight as 64 requests of 1 MiB). Each
 * bound uses the mean of two probes, just before and just after its
 * measurement, as a shared machine's bandwidths drift.
 *
 * Each measurement prefills `batch` distinct prompts of PROMPT_LEN tokens,
 * then decodes them together greedily for a number of steps with
 * llm_decode; tokens/s is decode_tokens / decode_ns of the engine's
 * counters across the steps alone (prefill and sampling excluded). A
 * warm-up measurement precedes the timed ones. Per rep, everything is
 * measured once next to its reference, and ratios are medians of per-rep
 * ratios.
 *
 * Figures (steps: 110M 32, 1B 8, streamed 16):
 *   dram_read_gbps, raw_read_gbps   the references (medians)
 *   decode_110m_b1_tps       weights in DRAM, batch 1; reference: the DRAM
 *                            bound, read bandwidth / weight_bytes a pass
 *   decode_110m_b1_bound_ratio, decode_1b_b1_bound_ratio   tps / bound
 *   decode_110m_b8_tps, decode_110m_b32_tps   aggregate tokens/s
 *   batch32_vs_batch1_x      b32 / b1
 *   stream_b<B>_tps          LLM_WEIGHTS_STREAM with 25 % of the file as
 *                            budget, batch 1 and 32; reference: min(the
 *                            resident tokens/s at that batch, the SSD
 *                            bound B x raw bandwidth / bytes streamed per
 *                            decode step)
 *   stream_b<B>_ratio, stream_b<B>_stall_fraction   tps / reference;
 *                            stream stall time / decode time
 *   stream_mb_per_step       bytes streamed per decode step at batch 1
 * KV attention reads (< 1 % of the weights at these contexts) are left
 * out of the bounds. --quick runs the same figures on the 15M model (in
 * place of 110M) and 260K (in place of 1B), at most 2 reps and fewer
 * steps: a smoke test of the path, not figures of the engine. Models are
 * written on first use into --dir, else llm_cache_dir().
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <kv/kv.h>

#include "bench.h"
#include "libkv/kernels.h"
#include "llama.h"
#include "taxonomy/kv-private.h"

#define MAX_REPS 64
#define MiB ((uint64_t)1 << 20)
#define THREADS 2u
#define PROMPT_LEN 8u
#define MAX_BATCH 32u
#define WARM_STEPS 2u
#define DRAM_BYTES ((size_t)512 << 20)
#define SYNTH_SEED 1u
#define STREAM_FRAC 0.25

#define TARGET_BOUND 0.8
#define TARGET_BATCH_X 10.0
#define TARGET_STREAM 0.85

#define N_BATCHES 3
static const uint32_t batches[N_BATCHES] = { 1, 8, 32 };

/* An engine with what a measurement needs beside it. */
struct bengine {
	struct llm_engine *e;
	struct llm_sampler *greedy;
	uint32_t vocab;
	float *logits;              /* (MAX_BATCH, vocab) */
};

struct decode_res {
	double tps;                 /* decode_tokens / decode_ns over the steps */
	double step_bytes;          /* STREAM: bytes streamed per decode step */
	double stall_fraction;      /* STREAM: stall_ns / decode_ns over the steps */
	double wall_tps;            /* tokens / wall time of the steps, sampling
				     * included (a check on decode_ns) */
};

/* (MAX_BATCH, PROMPT_LEN): BOS, then byte tokens (3 + byte) of a fixed
 * text whose first letter differs per prompt, so no two prompts share a
 * block. Byte ids are below 259, inside every model's vocabulary. */
struct prompts {
	int32_t tok[MAX_BATCH][PROMPT_LEN];
	const int32_t *ptr[MAX_BATCH];
	uint32_t len[MAX_BATCH];
};

static void prompts_make(struct prompts *p)
{
	static const char text[] = "Once upon a time";

	for (uint32_t i = 0; i < MAX_BATCH; i++) {
		p->tok[i][0] = LLM_BOS;
		p->tok[i][1] = 3 + 'A' + (int32_t)i;
		for (uint32_t j = 2; j < PROMPT_LEN; j++)
			p->tok[i][j] = 3 + (unsigned char)text[(j - 1) % (sizeof(text) - 1)];
		p->ptr[i] = p->tok[i];
		p->len[i] = PROMPT_LEN;
	}
}

int bench_model_ensure(const struct bench_run *run, const char *who, const char *name,
		       struct bench_model *m)
{
	uint64_t bytes, t0;
	int rc;

	m->name = name;
	rc = llm_synthetic_config(name, &m->cfg);
	if (rc == 0)
		rc = llm_config_file_bytes(&m->cfg, &bytes);
	if (rc)
		return rc;
	if (bytes > ((uint64_t)1 << 30))
		fprintf(stderr, "kv-bench %s: model %s: %.1f GB, written first if missing "
			"(once; that takes a while)...\n", who, name, (double)bytes / 1e9);
	t0 = bench_now_ns();
	rc = llm_synthetic_ensure(&m->cfg, SYNTH_SEED, run->dir, m->path, sizeof(m->path));
	if (rc == 0)
		fprintf(stderr, "kv-bench %s: model %s ready in %.1f s: %s\n", who, name,
			(double)(bench_now_ns() - t0) / 1e9, m->path);
	return rc;
}

static void bengine_close(struct bengine *b)
{
	llm_engine_destroy(b->e);
	llm_sampler_free(b->greedy);
	free(b->logits);
	memset(b, 0, sizeof(*b));
}

/* An engine for up to max_batch sequences of PROMPT_LEN + max_steps
 * tokens, on THREADS threads, without a prefix cache (every measurement
 * then does the same work). */
static int bengine_open(const struct bench_model *m, enum llm_weights weights,
			uint32_t max_batch, uint32_t max_steps, struct bengine *b)
{
	struct llm_engine_config ec;
	const uint64_t blocks = (PROMPT_LEN + max_steps + 1 + 15) / 16;
	/* K and V of every layer, f32, 16-token blocks; twice that and some,
	 * for the pool's page rounding. */
	const uint64_t need = (uint64_t)max_batch * blocks * 16 * m->cfg.n_layers * 2 *
			      m->cfg.kv_dim * sizeof(float);
	uint64_t t0 = bench_now_ns();
	int rc;

	memset(b, 0, sizeof(*b));
	llm_engine_config_default(&ec);
	ec.model_path = m->path;
	ec.weights = weights;
	if (weights == LLM_WEIGHTS_STREAM) {
		ec.weight_budget = 0;
		ec.weight_budget_frac = STREAM_FRAC;
	}
	ec.threads = THREADS;
	ec.max_batch = max_batch;
	ec.kv_budget = 2 * need + 16 * MiB;
	ec.prefix_cache = false;
	ec.label = "bench.decode";
	rc = llm_engine_create(&ec, &b->e);
	if (rc == 0) {
		b->vocab = llm_engine_model(b->e)->vocab_size;
		rc = llm_sampler_create(b->vocab, 0, 1, 0, &b->greedy);
	}
	if (rc == 0) {
		b->logits = malloc((size_t)max_batch * b->vocab * sizeof(float));
		if (!b->logits)
			rc = kv_fail(ENOMEM, "decode bench: out of memory for logits");
	}
	if (rc) {
		bengine_close(b);
		return rc;
	}
	fprintf(stderr, "kv-bench decode: %s engine for %s up in %.1f s\n",
		weights == LLM_WEIGHTS_STREAM ? "streaming" : "DRAM", m->name,
		(double)(bench_now_ns() - t0) / 1e9);
	return 0;
}

/* Prefill `batch` prompts, then `steps` greedy decode steps of them all;
 * the figures come from the engine's counters across the steps. */
static int decode_run(struct bengine *b, const struct prompts *p, uint32_t batch,
		      uint32_t steps, struct decode_res *out)
{
	kv_seq_id seqs[MAX_BATCH] = { 0 };
	int32_t tokens[MAX_BATCH] = { 0 };
	struct llm_engine_stats s0, s1;
	uint64_t t0, t1;
	uint32_t n = 0;
	int rc = 0;

	while (n < batch && rc == 0) {
		rc = llm_seq_new(b->e, &seqs[n]);
		if (rc == 0)
			n++;
	}
	if (rc == 0)
		rc = llm_prefill(b->e, batch, seqs, p->ptr, p->len, b->logits, NULL);
	for (uint32_t i = 0; i < batch && rc == 0; i++)
		tokens[i] = llm_sample(b->greedy, b->logits + (size_t)i * b->vocab);
	llm_engine_stats(b->e, &s0);
	t0 = bench_now_ns();
	for (uint32_t s = 0; s < steps && rc == 0; s++) {
		rc = llm_decode(b->e, batch, seqs, tokens, b->logits);
		for (uint32_t i = 0; i < batch && rc == 0; i++)
			tokens[i] = llm_sample(b->greedy, b->logits + (size_t)i * b->vocab);
	}
	t1 = bench_now_ns();
	llm_engine_stats(b->e, &s1);
	if (rc == 0) {
		uint64_t ns = s1.decode_ns - s0.decode_ns, dtok = s1.decode_tokens - s0.decode_tokens;
		uint64_t dsteps = s1.decode_steps - s0.decode_steps;

		if (ns == 0 || dtok != (uint64_t)batch * steps || dsteps != steps) {
			rc = kv_fail(EPROTO, "decode bench: after %u steps of %u sequences the engine "
				     "counts %" PRIu64 " steps, %" PRIu64 " tokens in %" PRIu64 " ns",
				     steps, batch, dsteps, dtok, ns);
		} else {
			out->tps = (double)dtok * 1e9 / (double)ns;
			out->step_bytes = (double)(s1.stream_bytes_read - s0.stream_bytes_read) /
					  (double)dsteps;
			out->stall_fraction = (double)(s1.stream_stall_ns - s0.stream_stall_ns) /
					      (double)ns;
			out->wall_tps = (double)dtok * 1e9 / (double)(t1 - t0);
		}
	}
	for (uint32_t i = 0; i < n; i++) {
		int frc = llm_seq_free(b->e, seqs[i]);

		if (rc == 0)
			rc = frc;
	}
	return rc;
}

static uint64_t seq_offset(void *ctx, uint64_t i)
{
	(void)ctx;
	return i * BENCH_RAW_BLOCK;
}

int bench_raw_read_file(const char *path, uint64_t file_bytes, char *bufs, double *gbps)
{
	struct bench_raw_loop l = { .path = path, .block = BENCH_RAW_BLOCK,
				    .depth = BENCH_RAW_DEPTH,
				    .count = (file_bytes + BENCH_RAW_BLOCK - 1) / BENCH_RAW_BLOCK,
				    .file_bytes = file_bytes, .bufs = bufs,
				    .offset = seq_offset };

	return bench_raw_uring(&l, gbps);
}

/* The whole model file with O_DIRECT, sequentially. */
static int raw_read(const struct bench_model *m, const struct llm_engine_stats *st, char *bufs,
		    double *gbps)
{
	return bench_raw_read_file(m->path, st->file_bytes, bufs, gbps);
}

static double min2(double a, double b)
{
	return a < b ? a : b;
}

/* Per-rep values of the main model's measurements. */
struct main_reps {
	double dram[MAX_REPS], raw[3 * MAX_REPS];
	double tps[N_BATCHES][MAX_REPS], bound[MAX_REPS], bound_ratio[MAX_REPS], x32[MAX_REPS];
	double stps[2][MAX_REPS], sref[2][MAX_REPS], sratio[2][MAX_REPS], stall[2][MAX_REPS];
	double smb[MAX_REPS];
};

static void verbose_rep(const char *what, int r, const struct decode_res *d, double ref)
{
	if (kv_log_enabled(KV_LOG_INFO) || getenv("KV_BENCH_VERBOSE"))
		fprintf(stderr, "kv-bench decode: rep %d %s: %.2f tok/s (wall %.2f, reference "
			"%.2f), %.1f MB streamed a step, stall %.3f\n", r, what, d->tps, d->wall_tps,
			ref, d->step_bytes / 1e6, d->stall_fraction);
}

/* The main model: DRAM weights at batch 1, 8, 32, and streamed weights
 * at batch 1 and 32, the two engines side by side. */
static int bench_main(struct bench_run *run, int reps, const struct bench_model *m,
		      const struct prompts *p, struct bench_dram *probe, struct kv_tpool *tp,
		      struct main_reps *o, uint64_t *weight_bytes)
{
	const uint32_t steps = run->quick ? 8 : 32, ssteps = run->quick ? 4 : 16;
	struct bengine dram = { 0 }, stream = { 0 };
	struct llm_engine_stats st;
	struct decode_res d;
	/* Huge pages, as the streamer's arena has: with 4 KiB pages, pinning
	 * each request's pages for O_DIRECT halved the raw loop's bandwidth in
	 * a VM here (2.4 vs 1.1 GB/s). */
	char *bufs = bench_map_huge(BENCH_RAW_DEPTH * BENCH_RAW_BLOCK);
	int rc = bufs ? 0 : kv_fail(ENOMEM, "decode bench: out of memory");

	if (rc == 0)
		rc = bengine_open(m, LLM_WEIGHTS_DRAM, MAX_BATCH, steps, &dram);
	if (rc == 0)
		rc = bengine_open(m, LLM_WEIGHTS_STREAM, MAX_BATCH, steps, &stream);
	if (rc)
		goto out;
	memset(bufs, 0, BENCH_RAW_DEPTH * BENCH_RAW_BLOCK);
	/* Warm-up: threads, scratch, the stream's resident tensors. */
	for (int b = 0; b < N_BATCHES && rc == 0; b++)
		rc = decode_run(&dram, p, batches[b], WARM_STEPS, &d);
	if (rc == 0)
		rc = decode_run(&stream, p, 1, WARM_STEPS, &d);
	if (rc == 0)
		rc = decode_run(&stream, p, MAX_BATCH, WARM_STEPS, &d);
	if (rc)
		goto out;
	llm_engine_stats(dram.e, &st);
	*weight_bytes = st.weight_bytes;
	llm_engine_stats(stream.e, &st);
	fprintf(stderr, "kv-bench decode: %s: %.1f MB of weights a pass, file %.1f MB, stream "
		"budget %.1f MB; %u steps (stream %u) of prompts of %u tokens, %d reps\n", m->name,
		(double)*weight_bytes / 1e6, (double)st.file_bytes / 1e6,
		(double)st.stream_budget / 1e6, steps, ssteps, PROMPT_LEN, reps);

	for (int r = 0; r < reps && rc == 0; r++) {
		for (int b = 0; b < N_BATCHES && rc == 0; b++) {
			const double before = b == 0 ? bench_dram_read_gbps(probe, tp) : 0;

			rc = decode_run(&dram, p, batches[b], steps, &d);
			o->tps[b][r] = d.tps;
			if (b == 0) {
				o->dram[r] = (before + bench_dram_read_gbps(probe, tp)) / 2;
				o->bound[r] = o->dram[r] * 1e9 / (double)*weight_bytes;
			}
			verbose_rep(b == 0 ? "DRAM b1" : b == 1 ? "DRAM b8" : "DRAM b32", r, &d,
				    b == 0 ? o->bound[r] : 0);
		}
		if (rc)
			break;
		o->bound_ratio[r] = o->tps[0][r] / o->bound[r];
		o->x32[r] = o->tps[2][r] / o->tps[0][r];
		/* Raw reads before, between and after the two: each bound takes
		 * the mean of the two beside its measurement. */
		rc = raw_read(m, &st, bufs, &o->raw[3 * r]);
		for (int s = 0; s < 2 && rc == 0; s++) {
			const uint32_t batch = s == 0 ? 1 : MAX_BATCH;
			const double resident = o->tps[s == 0 ? 0 : 2][r];
			double gbps;

			rc = decode_run(&stream, p, batch, ssteps, &d);
			if (rc == 0)
				rc = raw_read(m, &st, bufs, &o->raw[3 * r + s + 1]);
			if (rc)
				break;
			gbps = (o->raw[3 * r + s] + o->raw[3 * r + s + 1]) / 2;
			o->stps[s][r] = d.tps;
			o->sref[s][r] = d.step_bytes > 0 ?
				min2(resident, batch * gbps * 1e9 / d.step_bytes) : resident;
			o->sratio[s][r] = d.tps / o->sref[s][r];
			o->stall[s][r] = d.stall_fraction;
			if (s == 0)
				o->smb[r] = d.step_bytes / 1e6;
			verbose_rep(s == 0 ? "stream b1" : "stream b32", r, &d, o->sref[s][r]);
		}
	}
out:
	bengine_close(&stream);
	bengine_close(&dram);
	if (bufs)
		munmap(bufs, BENCH_RAW_DEPTH * BENCH_RAW_BLOCK);
	return rc;
}

/* The large model, DRAM weights, batch 1: tokens/s and their ratio to
 * the DRAM bound of the same rep. */
static int bench_big(int reps, const struct bench_model *m,
		     const struct prompts *p, struct bench_dram *probe, struct kv_tpool *tp,
		     double *dram, double *tps, double *bound, double *ratio)
{
	const uint32_t steps = 8;
	struct bengine e;
	struct llm_engine_stats st;
	struct decode_res d;
	int rc = bengine_open(m, LLM_WEIGHTS_DRAM, 1, steps, &e);

	if (rc)
		return rc;
	rc = decode_run(&e, p, 1, WARM_STEPS, &d);
	llm_engine_stats(e.e, &st);
	if (rc == 0)
		fprintf(stderr, "kv-bench decode: %s: %.1f MB of weights a pass; %u steps, %d reps\n",
			m->name, (double)st.weight_bytes / 1e6, steps, reps);
	for (int r = 0; r < reps && rc == 0; r++) {
		const double before = bench_dram_read_gbps(probe, tp);

		rc = decode_run(&e, p, 1, steps, &d);
		dram[r] = (before + bench_dram_read_gbps(probe, tp)) / 2;
		bound[r] = dram[r] * 1e9 / (double)st.weight_bytes;
		tps[r] = d.tps;
		ratio[r] = d.tps / bound[r];
		verbose_rep("DRAM b1", r, &d, bound[r]);
	}
	bengine_close(&e);
	return rc;
}

int bench_decode(struct bench_run *run)
{
	static const char *const stream_names[2][4] = {
		{ "stream_b1_tps", "stream_b1_ratio", "stream_b1_stall_fraction",
		  "min(resident b1, SSD bound)" },
		{ "stream_b32_tps", "stream_b32_ratio", "stream_b32_stall_fraction",
		  "min(resident b32, SSD bound)" },
	};
	const int reps = run->quick ? (run->reps < 2 ? run->reps : 2) :
				      (run->reps < MAX_REPS ? run->reps : MAX_REPS);
	struct main_reps *o = calloc(1, sizeof(*o));
	double bdram[MAX_REPS], btps[MAX_REPS], bbound[MAX_REPS], bratio[MAX_REPS];
	double dram_all[2 * MAX_REPS];
	struct bench_model main_m, big_m;
	struct prompts p;
	struct bench_dram *probe = NULL;
	struct kv_tpool *tp = NULL;
	uint64_t weight_bytes = 0;
	int rc = o ? 0 : kv_fail(ENOMEM, "decode bench: out of memory");

	prompts_make(&p);
	if (rc == 0)
		rc = bench_model_ensure(run, "decode", run->quick ? "15M" : "110M", &main_m);
	if (rc == 0)
		rc = bench_model_ensure(run, "decode", run->quick ? "260K" : "1B", &big_m);
	if (rc == 0)
		rc = bench_dram_create(run->quick ? DRAM_BYTES / 8 : DRAM_BYTES, &probe);
	if (rc == 0)
		rc = kv_tpool_create(THREADS, &tp);
	if (rc == 0)
		rc = bench_main(run, reps, &main_m, &p, probe, tp, o, &weight_bytes);
	if (rc == 0)
		rc = bench_big(reps, &big_m, &p, probe, tp, bdram, btps, bbound, bratio);
	if (rc == 0) {
		const size_t n = (size_t)reps;

		run->reps = reps;   /* what the table's "median of" says */

		memcpy(dram_all, o->dram, n * sizeof(double));
		memcpy(dram_all + n, bdram, n * sizeof(double));
		bench_figure(run, "dram_read_gbps", bench_median(dram_all, 2 * n), "GB/s", 0, NULL);
		bench_figure(run, "raw_read_gbps", bench_median(o->raw, 3 * n), "GB/s", 0, NULL);
		bench_figure(run, "decode_110m_weight_mb", (double)weight_bytes / 1e6, "MB", 0, NULL);
		bench_figure(run, "decode_110m_b1_tps", bench_median(o->tps[0], n), "tok/s",
			     bench_median(o->bound, n), "DRAM bound (read GB/s / weight bytes)");
		bench_figure(run, "decode_110m_b1_bound_ratio", bench_median(o->bound_ratio, n), "x",
			     TARGET_BOUND, "target (b1 tok/s / DRAM bound)");
		bench_figure(run, "decode_110m_b8_tps", bench_median(o->tps[1], n), "tok/s", 0, NULL);
		bench_figure(run, "decode_110m_b32_tps", bench_median(o->tps[2], n), "tok/s", 0, NULL);
		bench_figure(run, "batch32_vs_batch1_x", bench_median(o->x32, n), "x", TARGET_BATCH_X,
			     "target (b32 / b1 aggregate tok/s)");
		bench_figure(run, "decode_1b_b1_tps", bench_median(btps, n), "tok/s",
			     bench_median(bbound, n), "DRAM bound (read GB/s / weight bytes)");
		bench_figure(run, "decode_1b_b1_bound_ratio", bench_median(bratio, n), "x",
			     TARGET_BOUND, "target (b1 tok/s / DRAM bound)");
		bench_figure(run, "stream_mb_per_step", bench_median(o->smb, n), "MB", 0, NULL);
		for (int i = 0; i < 2; i++) {
			bench_figure(run, stream_names[i][0], bench_median(o->stps[i], n), "tok/s",
				     bench_median(o->sref[i], n), stream_names[i][3]);
			bench_figure(run, stream_names[i][1], bench_median(o->sratio[i], n), "x",
				     TARGET_STREAM, "target (stream / min(resident, SSD bound))");
			bench_figure(run, stream_names[i][2], bench_median(o->stall[i], n), "x", 0,
				     NULL);
		}
	}
	kv_tpool_destroy(tp);
	bench_dram_destroy(probe);
	free(o);
	return rc;
}
