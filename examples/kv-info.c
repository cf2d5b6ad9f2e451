// SPDX-License-Identifier: MIT
/*
 * kv-info: what libkv sees on this machine. The topology as the allocator
 * has it (kv_topo: NUMA nodes, cores, huge pages) and the THP mode, whether
 * io_uring works here, with --dir the O_DIRECT alignment of a directory,
 * and the tier descriptor table (one row per DRAM node, plus the SSD row
 * for --dir) with the source of every figure. Everything is gathered first (collect_*()), then printed as
 * aligned tables or, with --json, as one JSON object (print_json()).
 * Exit status: 0, 1 on a runtime failure, 2 on a usage error.
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <liburing.h>

#include <kv/kv.h>

#include "taxonomy/kv-private.h"

struct info {
	char host[256];
	struct kv_topo_node numa[KV_NODE_MAX]; /* (n_numa), by OS index */
	uint32_t n_numa;
	uint32_t cores, pus;
	/* Base page first, then the huge page sizes: the counts of size j
	 * are numa[i].hugepages_total[j] and hugepages_free[j]. */
	uint64_t page_sizes[KV_PAGE_SIZES_MAX];
	uint32_t n_page_sizes;
	char thp[32]; /* "" when the kernel has no THP */

	bool uring_works;
	int uring_err; /* negative errno from io_uring_queue_init */
	const char *uring_reason;
	int uring_sysctl; /* kernel.io_uring_disabled; -1 when absent */

	struct kv_tier_desc tiers[KV_NODE_MAX + 1];
	int n_tiers;
	const char *dir; /* --dir or NULL */
	uint32_t dio_align;
};

/* ---- Collecting --------------------------------------------------------- */

/* A number from a one-line sysfs/procfs file; -1 if absent or malformed. */
static long read_long(const char *path)
{
	FILE *fp = fopen(path, "re");
	long v;

	if (!fp)
		return -1;
	if (fscanf(fp, "%ld", &v) != 1)
		v = -1;
	fclose(fp);
	return v;
}

/* The allocator's topology snapshot, copied out. Returns 0 or -errno. */
static int collect_topology(struct info *in)
{
	struct kv_topo *topo;
	int rc = kv_topo_create(&topo);

	if (rc)
		return rc;
	in->n_numa = kv_topo_node_count(topo);
	if (in->n_numa > KV_NODE_MAX)
		in->n_numa = KV_NODE_MAX; /* kv_topo keeps nodes below 64 anyway */
	for (uint32_t i = 0; i < in->n_numa && rc == 0; i++)
		rc = kv_topo_node(topo, i, &in->numa[i]);
	in->cores = kv_topo_cores(topo);
	in->pus = kv_topo_pus(topo);
	in->n_page_sizes = kv_topo_page_sizes(topo, in->page_sizes, KV_PAGE_SIZES_MAX);
	kv_topo_destroy(topo);
	return rc;
}

/* The THP mode in use is the bracketed word: "always [madvise] never". */
static void collect_thp(struct info *in)
{
	FILE *fp = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "re");
	char line[128], *l, *r;

	if (!fp)
		return;
	if (fgets(line, sizeof(line), fp) && (l = strchr(line, '[')) &&
	    (r = strchr(l, ']')) && (size_t)(r - l - 1) < sizeof(in->thp)) {
		memcpy(in->thp, l + 1, (size_t)(r - l - 1));
		in->thp[r - l - 1] = '\0';
	}
	fclose(fp);
}

/* Huge pages of size index j over all nodes. */
static void hp_sum(const struct info *in, uint32_t j, uint64_t *total, uint64_t *freep)
{
	*total = *freep = 0;
	for (uint32_t i = 0; i < in->n_numa; i++) {
		*total += in->numa[i].hugepages_total[j];
		*freep += in->numa[i].hugepages_free[j];
	}
}

static void collect_io_uring(struct info *in)
{
	struct io_uring ring;
	int rc;

	in->uring_sysctl = (int)read_long("/proc/sys/kernel/io_uring_disabled");
	rc = io_uring_queue_init(4, &ring, 0);
	in->uring_works = rc == 0;
	in->uring_err = rc;
	if (rc == 0) {
		io_uring_queue_exit(&ring);
		return;
	}
	switch (-rc) {
	case ENOSYS:
		in->uring_reason = "the kernel has no io_uring, or a seccomp filter hides it";
		break;
	case EPERM:
		in->uring_reason = in->uring_sysctl > 0
			? "kernel.io_uring_disabled forbids it for this process"
			: "refused: a seccomp profile (common in containers) or an LSM denies it";
		break;
	case ENOMEM:
		in->uring_reason = "cannot allocate or lock the rings (RLIMIT_MEMLOCK too low?)";
		break;
	case EINVAL:
		in->uring_reason = "the kernel rejects the setup parameters (too old?)";
		break;
	default:
		in->uring_reason = "io_uring_queue_init failed";
		break;
	}
}

/* ---- Printing: text ------------------------------------------------------ */

static const char *fmt_bw(double v, enum kv_desc_source src, char *buf, size_t len)
{
	if (src == KV_SRC_NONE)
		snprintf(buf, len, "-");
	else
		snprintf(buf, len, "%.2f GB/s (%s)", v / 1e9, kv_desc_source_name(src));
	return buf;
}

static const char *fmt_latency(double ns, enum kv_desc_source src, char *buf, size_t len)
{
	if (src == KV_SRC_NONE)
		snprintf(buf, len, "-");
	else if (ns < 1e3)
		snprintf(buf, len, "%.1f ns (%s)", ns, kv_desc_source_name(src));
	else if (ns < 1e6)
		snprintf(buf, len, "%.1f us (%s)", ns / 1e3, kv_desc_source_name(src));
	else
		snprintf(buf, len, "%.2f ms (%s)", ns / 1e6, kv_desc_source_name(src));
	return buf;
}

static void print_text(const struct info *in)
{
	char a[48], b[48], c[48], e[48];

	printf("libkv %s on %s\n\n", kv_version(), in->host);

	printf("Topology: %" PRIu32 " NUMA node%s, %" PRIu32 " cores, %" PRIu32 " PUs\n",
	       in->n_numa, in->n_numa == 1 ? "" : "s", in->cores, in->pus);
	printf("  %-6s %12s  %s\n", "node", "memory", "cpus");
	for (uint32_t i = 0; i < in->n_numa; i++)
		printf("  %-6d %12s  %s\n", in->numa[i].os_index,
		       kv_format_bytes(in->numa[i].memory_bytes, a, sizeof(a)),
		       in->numa[i].cpus[0] ? in->numa[i].cpus : "-");

	printf("\nHuge pages (transparent: %s)\n", in->thp[0] ? in->thp : "unavailable");
	if (in->n_page_sizes <= 1)
		printf("  none configured in this kernel\n");
	else
		printf("  %-10s %8s %8s  %s\n", "size", "total", "free", "per node (total/free)");
	for (uint32_t j = 1; j < in->n_page_sizes; j++) {
		uint64_t total, freep;

		hp_sum(in, j, &total, &freep);
		printf("  %-10s %8" PRIu64 " %8" PRIu64 " ",
		       kv_format_bytes(in->page_sizes[j], a, sizeof(a)), total, freep);
		for (uint32_t n = 0; n < in->n_numa; n++)
			printf(" node%d %" PRIu64 "/%" PRIu64, in->numa[n].os_index,
			       in->numa[n].hugepages_total[j], in->numa[n].hugepages_free[j]);
		printf("\n");
	}

	printf("\nio_uring: ");
	if (in->uring_works)
		printf("works");
	else
		printf("unavailable: %s (%s)", strerror(-in->uring_err), in->uring_reason);
	if (in->uring_sysctl >= 0)
		printf("; kernel.io_uring_disabled = %d", in->uring_sysctl);
	printf("\n");

	if (in->dir)
		printf("\nDirectory %s: O_DIRECT alignment %" PRIu32 " bytes\n", in->dir,
		       in->dio_align);

	printf("\nTiers\n");
	printf("  %-5s %-16s %-24s %-12s %-20s %-20s %-18s\n", "tier", "where", "capacity",
	       "free", "read", "write", "latency");
	for (int i = 0; i < in->n_tiers; i++) {
		const struct kv_tier_desc *d = &in->tiers[i];
		char where[24], cap[48], fr[24];

		if (d->tier == KV_TIER_DRAM)
			snprintf(where, sizeof(where), "node %d", d->node);
		else
			snprintf(where, sizeof(where), "%.23s", d->device);
		snprintf(cap, sizeof(cap), "%s (%s)",
			 kv_format_bytes(d->capacity_bytes, a, sizeof(a)),
			 kv_desc_source_name(d->capacity_src));
		if (d->tier == KV_TIER_DRAM)
			snprintf(fr, sizeof(fr), "-");
		else
			kv_format_bytes(d->free_bytes, fr, sizeof(fr));
		printf("  %-5s %-16s %-24s %-12s %-20s %-20s %-18s\n", kv_tier_name(d->tier),
		       where, cap, fr, fmt_bw(d->read_bw, d->read_bw_src, b, sizeof(b)),
		       fmt_bw(d->write_bw, d->write_bw_src, c, sizeof(c)),
		       fmt_latency(d->latency_ns, d->latency_src, e, sizeof(e)));
	}
	printf("  (dram write = copy bandwidth; ssd latency = one 4 KiB O_DIRECT read)\n");
}

/* ---- Printing: JSON ------------------------------------------------------ */

static void json_figure(const char *key, double v, enum kv_desc_source src)
{
	printf("\"%s\":", key);
	if (src == KV_SRC_NONE)
		printf("null");
	else
		kv_json_double(stdout, v);
}

static void json_count(long v)
{
	if (v < 0)
		printf("null");
	else
		printf("%ld", v);
}

static void print_json(const struct info *in)
{
	FILE *f = stdout;

	printf("{\"libkv_version\":");
	kv_json_string(f, kv_version());
	printf(",\"host\":");
	kv_json_string(f, in->host);

	printf(",\"topology\":{\"numa_nodes\":[");
	for (uint32_t i = 0; i < in->n_numa; i++) {
		printf("%s{\"os_index\":%d,\"memory_bytes\":%" PRIu64 ",\"cpus\":", i ? "," : "",
		       in->numa[i].os_index, in->numa[i].memory_bytes);
		kv_json_string(f, in->numa[i].cpus);
		printf("}");
	}
	printf("],\"cores\":%" PRIu32 ",\"pus\":%" PRIu32 ",\"hugepages\":[", in->cores,
	       in->pus);
	for (uint32_t j = 1; j < in->n_page_sizes; j++) {
		uint64_t total, freep;

		hp_sum(in, j, &total, &freep);
		printf("%s{\"page_bytes\":%" PRIu64 ",\"total\":%" PRIu64 ",\"free\":%" PRIu64
		       ",\"nodes\":[", j > 1 ? "," : "", in->page_sizes[j], total, freep);
		for (uint32_t n = 0; n < in->n_numa; n++)
			printf("%s{\"node\":%d,\"total\":%" PRIu64 ",\"free\":%" PRIu64 "}",
			       n ? "," : "", in->numa[n].os_index, in->numa[n].hugepages_total[j],
			       in->numa[n].hugepages_free[j]);
		printf("]}");
	}
	printf("],\"thp\":");
	if (in->thp[0])
		kv_json_string(f, in->thp);
	else
		printf("null");

	printf("},\"io_uring\":{\"works\":%s,\"error\":", in->uring_works ? "true" : "false");
	if (in->uring_works) {
		printf("null,\"reason\":null");
	} else {
		kv_json_string(f, strerror(-in->uring_err));
		printf(",\"reason\":");
		kv_json_string(f, in->uring_reason);
	}
	printf(",\"disabled_sysctl\":");
	json_count(in->uring_sysctl);
	printf("}");

	if (in->dir) {
		printf(",\"dir\":{\"path\":");
		kv_json_string(f, in->dir);
		printf(",\"dio_align\":%" PRIu32 "}", in->dio_align);
	}

	printf(",\"tiers\":[");
	for (int i = 0; i < in->n_tiers; i++) {
		const struct kv_tier_desc *d = &in->tiers[i];

		printf("%s{\"tier\":", i ? "," : "");
		kv_json_string(f, kv_tier_name(d->tier));
		printf(",\"node\":");
		if (d->tier == KV_TIER_DRAM)
			printf("%d", d->node);
		else
			printf("null");
		printf(",\"path\":");
		if (d->path[0])
			kv_json_string(f, d->path);
		else
			printf("null");
		printf(",\"device\":");
		kv_json_string(f, d->device);
		printf(",\"persistent\":%s,\"capacity_bytes\":%" PRIu64 ",\"free_bytes\":%" PRIu64,
		       d->persistent ? "true" : "false", d->capacity_bytes, d->free_bytes);
		printf(",");
		json_figure("read_bw_bytes_per_s", d->read_bw, d->read_bw_src);
		printf(",");
		json_figure("write_bw_bytes_per_s", d->write_bw, d->write_bw_src);
		printf(",");
		json_figure("latency_ns", d->latency_ns, d->latency_src);
		if (d->tier == KV_TIER_SSD)
			printf(",\"dio_align\":%" PRIu32, d->dio_align);
		printf(",\"sources\":{\"capacity\":\"%s\",\"read_bw\":\"%s\",\"write_bw\":\"%s\",\"latency\":\"%s\"}}",
		       kv_desc_source_name(d->capacity_src), kv_desc_source_name(d->read_bw_src),
		       kv_desc_source_name(d->write_bw_src), kv_desc_source_name(d->latency_src));
	}
	printf("]}\n");
}

/* ---- Main ---------------------------------------------------------------- */

static void usage(FILE *f)
{
	fprintf(f,
		"usage: kv-info [--json] [--dir DIR] [--probe | --no-probe]\n"
		"\n"
		"Print what libkv sees on this machine: NUMA topology, huge pages,\n"
		"io_uring support and the tier descriptors (capacity, bandwidth,\n"
		"latency, and where each figure came from).\n"
		"\n"
		"  --json       one JSON object instead of tables\n"
		"  --dir DIR    also describe the storage under DIR as the SSD tier\n"
		"               (a short probe writes a scratch file there, removed after)\n"
		"  --probe      measure now even if figures are cached; refresh the cache\n"
		"  --no-probe   never measure: hwloc, OS and cached figures only\n"
		"  -h, --help   this text\n");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "json", no_argument, NULL, 'j' },
		{ "dir", required_argument, NULL, 'd' },
		{ "probe", no_argument, NULL, 'p' },
		{ "no-probe", no_argument, NULL, 'n' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	static struct info in; /* large: kept off the stack */
	unsigned flags = 0;
	bool json = false;
	int c, rc;

	opterr = 0;
	while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
		switch (c) {
		case 'j': json = true; break;
		case 'd': in.dir = optarg; break;
		case 'p': flags |= KV_DESC_FORCE_PROBE; break;
		case 'n': flags |= KV_DESC_NO_PROBE; break;
		case 'h': usage(stdout); return 0;
		case ':':
			fprintf(stderr, "kv-info: option '%s' needs an argument\n", argv[optind - 1]);
			usage(stderr);
			return 2;
		default:
			fprintf(stderr, "kv-info: unknown option '%s'\n", argv[optind - 1]);
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "kv-info: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		return 2;
	}
	if ((flags & KV_DESC_FORCE_PROBE) && (flags & KV_DESC_NO_PROBE)) {
		fprintf(stderr, "kv-info: --probe and --no-probe exclude each other\n");
		usage(stderr);
		return 2;
	}

	/* The directory first: a bad one fails before seconds of DRAM probes. */
	if (in.dir) {
		struct kv_tier_desc *d = &in.tiers[0];

		rc = kv_tier_desc_dir(in.dir, flags, d);
		if (rc) {
			fprintf(stderr, "kv-info: --dir '%s': %s: %s\n", in.dir, kv_strerror(rc),
				kv_last_error());
			return 1;
		}
		in.dio_align = d->dio_align;
	}

	if (gethostname(in.host, sizeof(in.host)) != 0)
		snprintf(in.host, sizeof(in.host), "unknown");
	in.host[sizeof(in.host) - 1] = '\0';
	rc = collect_topology(&in);
	if (rc) {
		fprintf(stderr, "kv-info: topology: %s: %s\n", kv_strerror(rc), kv_last_error());
		return 1;
	}
	collect_thp(&in);
	collect_io_uring(&in);

	/* DRAM rows first, one per node, the SSD row (already measured) last. */
	struct kv_tier_desc ssd = in.tiers[0];

	for (uint32_t i = 0; i < in.n_numa; i++) {
		int n = in.numa[i].os_index;

		rc = kv_tier_desc_dram(n, flags, &in.tiers[in.n_tiers]);
		if (rc) {
			fprintf(stderr, "kv-info: DRAM node %d: %s: %s\n", n, kv_strerror(rc),
				kv_last_error());
			return 1;
		}
		in.n_tiers++;
	}
	if (in.dir)
		in.tiers[in.n_tiers++] = ssd;

	if (json)
		print_json(&in);
	else
		print_text(&in);
	if (fflush(stdout) != 0 || ferror(stdout)) {
		fprintf(stderr, "kv-info: writing the output failed\n");
		return 1;
	}
	return 0;
}
