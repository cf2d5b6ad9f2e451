// SPDX-License-Identifier: MIT
/*
 * Tier descriptors: capacity, bandwidth and latency of DRAM on one NUMA node
 * (kv_tier_desc_dram()) and of the storage under a directory
 * (kv_tier_desc_dir()), plus kv_desc_source_name(). Each figure comes from
 * the first source that has it: hwloc memory attributes (DRAM only), the
 * per-(host, device) cache file under $XDG_CACHE_HOME/libkv/, or a short
 * probe (about 0.5 s) whose result is then cached. A cache file is trusted
 * only after cache_parse() has checked every value in it.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <hwloc.h>

#include <kv/taxonomy.h>

#include "kv-private.h"

#define DESC_FLAGS_ALL (KV_DESC_FORCE_PROBE | KV_DESC_NO_CACHE | KV_DESC_NO_PROBE)

/* Wall-clock budget of one probe. Each phase has a share of it and stops
 * early when its share is spent, so the figures come from less work on a
 * slow machine instead of a longer call. */
#define PROBE_BUDGET_NS 500000000ull

/* DRAM probe: a buffer four times the largest cache (128 MiB .. 1 GiB), so
 * that the sum and copy loops stream from memory, yet no bigger than needed
 * since faulting it in is much of the probe's time. The pointer chase runs
 * over up to 256 MiB of it: slots of one cache line linked in a random
 * cycle (a longer cycle would make building it cost more than chasing). */
#define DRAM_BUF_MIN ((size_t)128 << 20)
#define DRAM_BUF_MAX ((size_t)1 << 30)
#define DRAM_CHASE_MAX_BYTES ((size_t)256 << 20)
#define DRAM_SLOT_BYTES 64u
#define DRAM_CHASE_BATCH 65536u
#define DRAM_CHASE_MAX_LOADS (1u << 20)

/* SSD probe: a scratch file written and read back in 1 MiB requests, then
 * random single-block reads for latency. */
#define SSD_FILE_BYTES ((size_t)64 << 20)
#define SSD_CHUNK_BYTES ((size_t)1 << 20)
#define SSD_LAT_READS 256u
#define SSD_LAT_BYTES 4096u

#define CACHE_MAGIC "libkv-tier-cache 1"

/* The figures a probe measures and the cache stores. */
struct figures {
	double read_bw;     /* bytes/s */
	double write_bw;    /* bytes/s */
	double latency_ns;
	uint32_t dio_align; /* SSD: alignment the probe used; DRAM: 0 */
};

const char *kv_desc_source_name(enum kv_desc_source src)
{
	switch (src) {
	case KV_SRC_NONE: return "none";
	case KV_SRC_HWLOC: return "hwloc";
	case KV_SRC_OS: return "os";
	case KV_SRC_PROBE: return "probe";
	case KV_SRC_CACHE: return "cache";
	}
	return NULL;
}

static int check_flags(unsigned flags, const char *who)
{
	if (flags & ~DESC_FLAGS_ALL)
		return kv_fail(EINVAL, "%s: unknown flags 0x%x", who,
			       flags & ~DESC_FLAGS_ALL);
	if ((flags & KV_DESC_FORCE_PROBE) && (flags & KV_DESC_NO_PROBE))
		return kv_fail(EINVAL, "%s: KV_DESC_FORCE_PROBE and KV_DESC_NO_PROBE exclude each other",
			       who);
	return 0;
}

static double bytes_per_s(uint64_t bytes, uint64_t ns)
{
	return (double)bytes * 1e9 / (double)(ns ? ns : 1);
}

/* ---- Sanity of figures ------------------------------------------------ */

/* Bounds wide enough for any real device (100 kB/s .. 100 TB/s, 0.5 ns ..
 * 10 s), narrow enough to reject garbage that happens to parse. */
static bool bw_sane(double v)
{
	return isfinite(v) && v >= 1e5 && v <= 1e14;
}

static bool latency_sane(double v)
{
	return isfinite(v) && v >= 0.5 && v <= 1e10;
}

static bool align_sane(uint32_t a)
{
	return a == 0 || (a <= SSD_CHUNK_BYTES && (a & (a - 1)) == 0);
}

static bool figures_sane(const struct figures *f)
{
	return bw_sane(f->read_bw) && bw_sane(f->write_bw) &&
	       latency_sane(f->latency_ns) && align_sane(f->dio_align);
}

/* ---- The cache -------------------------------------------------------- */

/* Replace every character that is not safe in a file name with '-'. */
static void sanitize(char *s)
{
	for (; *s; s++) {
		char c = *s;

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		      (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
			*s = '-';
	}
}

/* mkdir -p with mode 0700 for every component created. */
static int mkdir_p(char *path)
{
	for (char *p = path + 1; ; p++) {
		if (*p != '/' && *p != '\0')
			continue;
		char saved = *p;

		*p = '\0';
		int rc = mkdir(path, 0700);
		int e = errno;

		*p = saved;
		if (rc != 0 && e != EEXIST)
			return -e;
		if (saved == '\0')
			return 0;
	}
}

/* The cache file of `device` on this host. With `create`, the directory is
 * made. Returns 0 or -errno (no home directory: -ENOENT). */
static int cache_path(const char *device, bool create, char *buf, size_t len)
{
	const char *xdg = getenv("XDG_CACHE_HOME");
	const char *home = getenv("HOME");
	char dir[PATH_MAX], host[256], dev[64];
	int n;

	/* The XDG spec says a relative XDG_CACHE_HOME is to be ignored. */
	if (xdg && xdg[0] == '/')
		n = snprintf(dir, sizeof(dir), "%s/libkv", xdg);
	else if (home && home[0] == '/')
		n = snprintf(dir, sizeof(dir), "%s/.cache/libkv", home);
	else
		return -ENOENT;
	if (n < 0 || (size_t)n >= sizeof(dir))
		return -ENAMETOOLONG;
	if (gethostname(host, sizeof(host)) != 0)
		snprintf(host, sizeof(host), "localhost");
	host[sizeof(host) - 1] = '\0';
	snprintf(dev, sizeof(dev), "%s", device);
	sanitize(host);
	sanitize(dev);
	if (create) {
		int rc = mkdir_p(dir);

		if (rc)
			return rc;
	}
	n = snprintf(buf, len, "%s/tier-%s-%s.txt", dir, host, dev);
	if (n < 0 || (size_t)n >= len)
		return -ENAMETOOLONG;
	return 0;
}

/* Read and check a cache file. Returns NULL and fills *out when every key
 * is present exactly once with a sane value; else why not. */
static const char *cache_parse(FILE *fp, struct figures *out)
{
	static const char *const keys[] = { "read_bw", "write_bw", "latency_ns", "dio_align" };
	struct figures f = { 0 };
	unsigned seen = 0, lines = 0;
	char line[128];

	if (!fgets(line, sizeof(line), fp))
		return "empty file";
	if (strcmp(line, CACHE_MAGIC "\n") != 0)
		return "not a version 1 tier cache";
	while (fgets(line, sizeof(line), fp)) {
		size_t len = strlen(line);
		unsigned k;

		if (++lines > KV_ARRAY_SIZE(keys))
			return "too many lines";
		if (len == 0 || line[len - 1] != '\n')
			return "truncated or overlong line";
		line[len - 1] = '\0';
		char *val = strchr(line, ' ');

		if (!val)
			return "line without a value";
		*val++ = '\0';
		for (k = 0; k < KV_ARRAY_SIZE(keys); k++)
			if (strcmp(line, keys[k]) == 0)
				break;
		if (k == KV_ARRAY_SIZE(keys))
			return "unknown key";
		if (seen & (1u << k))
			return "duplicate key";
		seen |= 1u << k;

		char *end;

		errno = 0;
		if (k == 3) {
			unsigned long a;

			if (val[0] < '0' || val[0] > '9')
				return "malformed dio_align";
			a = strtoul(val, &end, 10);
			if (errno || *end || a > UINT32_MAX)
				return "malformed dio_align";
			f.dio_align = (uint32_t)a;
		} else {
			double d = strtod(val, &end);

			if (end == val || *end || errno)
				return "malformed number";
			if (k == 0)
				f.read_bw = d;
			else if (k == 1)
				f.write_bw = d;
			else
				f.latency_ns = d;
		}
	}
	if (ferror(fp))
		return "read error";
	if (seen != (1u << KV_ARRAY_SIZE(keys)) - 1)
		return "missing keys";
	if (!figures_sane(&f))
		return "value out of range";
	*out = f;
	return NULL;
}

static bool cache_read(const char *device, struct figures *out)
{
	char path[PATH_MAX];
	const char *why;
	FILE *fp;

	if (cache_path(device, false, path, sizeof(path)) != 0)
		return false;
	fp = fopen(path, "re");
	if (!fp) {
		if (errno != ENOENT)
			kv_log(KV_LOG_INFO, "tier cache %s: cannot open: %s", path,
			       kv_strerror(errno));
		return false;
	}
	why = cache_parse(fp, out);
	fclose(fp);
	if (why) {
		kv_log(KV_LOG_INFO, "tier cache %s: %s: ignored", path, why);
		return false;
	}
	return true;
}

/* Write the cache atomically: a temporary file renamed over the old one.
 * No fsync: a crash may leave an empty or partial file, which cache_parse()
 * rejects, and the next call probes again. Failures are logged only. */
static void cache_write(const char *device, const struct figures *f)
{
	char path[PATH_MAX], tmp[PATH_MAX + 8];
	const char *step = "open";
	FILE *fp = NULL;
	int fd, rc;

	rc = cache_path(device, true, path, sizeof(path));
	if (rc) {
		kv_log(KV_LOG_WARN, "tier cache for %s not written: no cache directory (%s)",
		       device, kv_strerror(rc));
		return;
	}
	snprintf(tmp, sizeof(tmp), "%s.XXXXXX", path);
	fd = mkostemp(tmp, O_CLOEXEC);
	if (fd < 0)
		goto fail;
	fp = fdopen(fd, "w");
	if (!fp) {
		close(fd);
		goto fail_unlink;
	}
	step = "write";
	fprintf(fp, CACHE_MAGIC "\nread_bw %.17g\nwrite_bw %.17g\nlatency_ns %.17g\ndio_align %" PRIu32 "\n",
		f->read_bw, f->write_bw, f->latency_ns, f->dio_align);
	if (fflush(fp) != 0 || ferror(fp)) {
		fclose(fp);
		goto fail_unlink;
	}
	if (fclose(fp) != 0)
		goto fail_unlink;
	step = "rename";
	if (rename(tmp, path) != 0)
		goto fail_unlink;
	kv_log(KV_LOG_DEBUG, "tier cache %s written", path);
	return;

fail_unlink:
	rc = errno;
	unlink(tmp);
	errno = rc;
fail:
	kv_log(KV_LOG_WARN, "tier cache %s not written: %s failed: %s", path, step,
	       kv_strerror(errno));
}

/* ---- Cache, then probe ------------------------------------------------ */

typedef int (*probe_fn)(void *ctx, struct figures *f);

static bool figures_missing(const struct kv_tier_desc *d)
{
	return d->read_bw_src == KV_SRC_NONE || d->write_bw_src == KV_SRC_NONE ||
	       d->latency_src == KV_SRC_NONE;
}

/* Take from f the figures d lacks; figures hwloc gave stay. */
static void apply(struct kv_tier_desc *d, const struct figures *f,
		  enum kv_desc_source src)
{
	if (d->read_bw_src == KV_SRC_NONE) {
		d->read_bw = f->read_bw;
		d->read_bw_src = src;
	}
	if (d->write_bw_src == KV_SRC_NONE) {
		d->write_bw = f->write_bw;
		d->write_bw_src = src;
	}
	if (d->latency_src == KV_SRC_NONE) {
		d->latency_ns = f->latency_ns;
		d->latency_src = src;
	}
	if (d->dio_align == 0)
		d->dio_align = f->dio_align;
}

static int fill_measured(struct kv_tier_desc *d, unsigned flags, probe_fn probe,
			 void *ctx)
{
	struct figures f;
	int rc;

	if (!figures_missing(d))
		return 0;
	if (!(flags & (KV_DESC_FORCE_PROBE | KV_DESC_NO_CACHE)) &&
	    cache_read(d->device, &f)) {
		apply(d, &f, KV_SRC_CACHE);
		return 0;
	}
	if (flags & KV_DESC_NO_PROBE)
		return 0;
	rc = probe(ctx, &f);
	if (rc)
		return rc;
	apply(d, &f, KV_SRC_PROBE);
	if (!(flags & KV_DESC_NO_CACHE))
		cache_write(d->device, &f);
	return 0;
}

/* ---- DRAM ------------------------------------------------------------- */

struct dram_ctx {
	hwloc_topology_t topo; /* may be NULL */
	hwloc_obj_t obj;       /* the NUMA node; NULL without a topology */
	int node;
	bool bind_thread;      /* run on the node's cores (multi-node machines) */
};

/* Sum of all words: eight independent accumulators so the loads are not
 * serialised behind one add chain, which also lets the compiler vectorise.
 * n is a multiple of 8. */
static uint64_t sum_words(const uint64_t *p, size_t n)
{
	uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;

	for (size_t i = 0; i < n; i += 8) {
		s0 += p[i];
		s1 += p[i + 1];
		s2 += p[i + 2];
		s3 += p[i + 3];
		s4 += p[i + 4];
		s5 += p[i + 5];
		s6 += p[i + 6];
		s7 += p[i + 7];
	}
	return s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7;
}

/* Link the slots of buf into one random cycle (Sattolo's shuffle gives a
 * single cycle through all of them, so the chase never closes early), and
 * follow it: every load depends on the one before, so the time per load is
 * the memory latency. Returns ns per load, or a negative errno. */
static double dram_chase(char *buf, size_t len, uint64_t deadline, uint64_t *sink)
{
	size_t nslots = (len < DRAM_CHASE_MAX_BYTES ? len : DRAM_CHASE_MAX_BYTES) / DRAM_SLOT_BYTES;
	uint32_t *perm = malloc(nslots * sizeof(*perm));
	uint64_t rng = 0x2545f4914f6cdd1dull;
	uint64_t loads = 0, t0, ns;
	void *p;

	if (!perm)
		return -ENOMEM;
	for (size_t i = 0; i < nslots; i++)
		perm[i] = (uint32_t)i;
	for (size_t i = nslots - 1; i > 0; i--) {
		size_t j;
		uint32_t t;

		rng ^= rng << 13;
		rng ^= rng >> 7;
		rng ^= rng << 17;
		j = (size_t)(rng % i);
		t = perm[i];
		perm[i] = perm[j];
		perm[j] = t;
	}
	for (size_t i = 0; i < nslots; i++)
		*(void **)(buf + i * DRAM_SLOT_BYTES) = buf + (size_t)perm[i] * DRAM_SLOT_BYTES;
	free(perm);

	p = buf;
	for (unsigned k = 0; k < DRAM_CHASE_BATCH / 4; k++) /* warm the TLB and caches */
		p = *(void *const *)p;
	t0 = kv_now_ns();
	do {
		for (unsigned k = 0; k < DRAM_CHASE_BATCH; k++)
			p = *(void *const *)p;
		loads += DRAM_CHASE_BATCH;
	} while (loads < DRAM_CHASE_MAX_LOADS && kv_now_ns() < deadline);
	ns = kv_now_ns() - t0;
	*sink += (uint64_t)(uintptr_t)p;
	return (double)(ns ? ns : 1) / (double)loads;
}

/* The probe buffer's size for this machine (see DRAM_BUF_MIN). */
static size_t dram_buf_bytes(hwloc_topology_t topo)
{
	static const hwloc_obj_type_t levels[] = {
		HWLOC_OBJ_L3CACHE, HWLOC_OBJ_L4CACHE, HWLOC_OBJ_L5CACHE,
	};
	uint64_t llc = 0, len;

	for (size_t i = 0; topo && i < KV_ARRAY_SIZE(levels); i++) {
		hwloc_obj_t o = NULL;

		while ((o = hwloc_get_next_obj_by_type(topo, levels[i], o)) != NULL)
			if (o->attr && o->attr->cache.size > llc)
				llc = o->attr->cache.size;
	}
	len = 4 * llc;
	if (len < DRAM_BUF_MIN)
		len = DRAM_BUF_MIN;
	if (len > DRAM_BUF_MAX)
		len = DRAM_BUF_MAX;
	return (size_t)((len + (2u << 20) - 1) & ~(uint64_t)((2u << 20) - 1));
}

static int dram_probe(void *arg, struct figures *f)
{
	const struct dram_ctx *c = arg;
	const size_t len = dram_buf_bytes(c->topo), half = len / 2;
	uint64_t start = kv_now_ns(), sink = 0, t, prefault_ns;
	hwloc_bitmap_t saved = NULL;
	bool from_hwloc = false;
	double best = 0.0, lat;
	char *buf = NULL;
	char sz[32];

	if (c->bind_thread) {
		saved = hwloc_bitmap_alloc();
		if (saved && (hwloc_get_cpubind(c->topo, saved, HWLOC_CPUBIND_THREAD) != 0 ||
			      hwloc_set_cpubind(c->topo, c->obj->cpuset, HWLOC_CPUBIND_THREAD) != 0)) {
			kv_log(KV_LOG_INFO, "tier 'dram' node %d: cannot run the probe on the node's cores: measuring from here",
			       c->node);
			hwloc_bitmap_free(saved);
			saved = NULL;
		}
	}

	if (c->topo && c->obj) {
		if (!hwloc_topology_get_support(c->topo)->membind->alloc_membind)
			kv_log(KV_LOG_INFO, "tier 'dram' node %d: hwloc cannot bind memory here: the probe buffer is not bound to the node",
			       c->node);
		buf = hwloc_alloc_membind(c->topo, len, c->obj->nodeset, HWLOC_MEMBIND_BIND,
					  HWLOC_MEMBIND_BYNODESET);
		from_hwloc = buf != NULL;
		if (!buf)
			kv_log(KV_LOG_INFO, "tier 'dram' node %d: cannot bind the probe buffer to the node (%s): using unbound memory",
			       c->node, kv_strerror(errno));
	}
	if (!buf) {
		void *m = mmap(NULL, len, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		buf = m == MAP_FAILED ? NULL : m;
	}
	if (!buf) {
		if (saved) {
			hwloc_set_cpubind(c->topo, saved, HWLOC_CPUBIND_THREAD);
			hwloc_bitmap_free(saved);
		}
		return kv_fail(ENOMEM, "tier 'dram' node %d: cannot allocate the %s probe buffer",
			       c->node, kv_format_bytes(len, sz, sizeof(sz)));
	}
	/* libkv's arenas use huge pages when they can; measure memory the way
	 * it will be used (and fault it in faster). Best effort. */
	madvise(buf, len, MADV_HUGEPAGE);
	memset(buf, 0x5a, len);
	prefault_ns = kv_now_ns() - start;

	/* Shares of the budget: read to 40 %, copy to 65 %, chase to 100 %.
	 * Each phase runs at least once. */
	for (int pass = 0; pass < 4; pass++) {
		t = kv_now_ns();
		sink += sum_words((const uint64_t *)(void *)buf, len / sizeof(uint64_t));
		t = kv_now_ns() - t;
		if (bytes_per_s(len, t) > best)
			best = bytes_per_s(len, t);
		if (kv_now_ns() - start > PROBE_BUDGET_NS * 40 / 100)
			break;
	}
	f->read_bw = best;

	best = 0.0;
	for (int pass = 0; pass < 4; pass++) {
		t = kv_now_ns();
		memcpy(buf + half, buf, half);
		t = kv_now_ns() - t;
		sink += (unsigned char)buf[half + (size_t)pass * 4096];
		if (bytes_per_s(half, t) > best)
			best = bytes_per_s(half, t);
		if (kv_now_ns() - start > PROBE_BUDGET_NS * 65 / 100)
			break;
	}
	f->write_bw = best;

	lat = dram_chase(buf, len, start + PROBE_BUDGET_NS, &sink);

	if (from_hwloc)
		hwloc_free(c->topo, buf, len);
	else
		munmap(buf, len);
	if (saved) {
		if (hwloc_set_cpubind(c->topo, saved, HWLOC_CPUBIND_THREAD) != 0)
			kv_log(KV_LOG_WARN, "tier 'dram' node %d: could not restore the thread's CPU binding",
			       c->node);
		hwloc_bitmap_free(saved);
	}
	if (lat < 0)
		return kv_fail(ENOMEM, "tier 'dram' node %d: cannot allocate the latency probe's index",
			       c->node);
	f->latency_ns = lat;
	f->dio_align = 0;
	/* A volatile store keeps the loops above from being optimised away. */
	volatile uint64_t keep = sink;

	(void)keep;
	kv_log(KV_LOG_INFO, "tier 'dram' node %d: probed read %.2f GB/s, copy %.2f GB/s, latency %.1f ns in %.0f ms (%.0f ms to fault in %s)",
	       c->node, f->read_bw / 1e9, f->write_bw / 1e9, f->latency_ns,
	       (double)(kv_now_ns() - start) / 1e6, (double)prefault_ns / 1e6,
	       kv_format_bytes(len, sz, sizeof(sz)));
	return 0;
}

/* One memory attribute of node as seen from its own cores; 0 if unknown. */
static uint64_t hw_attr(hwloc_topology_t topo, hwloc_obj_t obj, hwloc_memattr_id_t id)
{
	struct hwloc_location loc;
	hwloc_uint64_t v = 0;

	if (!obj->cpuset || hwloc_bitmap_iszero(obj->cpuset))
		return 0;
	loc.type = HWLOC_LOCATION_TYPE_CPUSET;
	loc.location.cpuset = obj->cpuset;
	if (hwloc_memattr_get_value(topo, id, obj, &loc, 0, &v) != 0)
		return 0;
	return v;
}

static void dram_from_hwloc(hwloc_topology_t topo, hwloc_obj_t obj,
			    struct kv_tier_desc *d)
{
	const double mib = 1048576.0;
	hwloc_uint64_t cap = obj->attr ? obj->attr->numanode.local_memory : 0;
	uint64_t bw = hw_attr(topo, obj, HWLOC_MEMATTR_ID_BANDWIDTH);
	uint64_t v;

	if (!cap && hwloc_memattr_get_value(topo, HWLOC_MEMATTR_ID_CAPACITY, obj,
					    NULL, 0, &cap) != 0)
		cap = 0;
	if (cap) {
		d->capacity_bytes = cap;
		d->capacity_src = KV_SRC_HWLOC;
	}
	/* hwloc reports bandwidth in MiB/s; the generic figure stands in for
	 * a missing read or write one. */
	v = hw_attr(topo, obj, HWLOC_MEMATTR_ID_READ_BANDWIDTH);
	if (v || bw) {
		d->read_bw = (double)(v ? v : bw) * mib;
		d->read_bw_src = KV_SRC_HWLOC;
	}
	v = hw_attr(topo, obj, HWLOC_MEMATTR_ID_WRITE_BANDWIDTH);
	if (v || bw) {
		d->write_bw = (double)(v ? v : bw) * mib;
		d->write_bw_src = KV_SRC_HWLOC;
	}
	v = hw_attr(topo, obj, HWLOC_MEMATTR_ID_READ_LATENCY);
	if (!v)
		v = hw_attr(topo, obj, HWLOC_MEMATTR_ID_LATENCY);
	if (v) {
		d->latency_ns = (double)v;
		d->latency_src = KV_SRC_HWLOC;
	}
}

int kv_tier_desc_dram(int node, unsigned flags, struct kv_tier_desc *out)
{
	uint64_t mask = kv_numa_nodes();
	hwloc_topology_t topo = kv_hw_topology();
	struct kv_tier_desc d;
	struct dram_ctx ctx;
	int rc;

	if (!out)
		return kv_fail(EINVAL, "tier 'dram': out is NULL");
	rc = check_flags(flags, "tier 'dram'");
	if (rc)
		return rc;
	if (node < 0 || node >= KV_NODE_MAX_BITS || !(mask & (UINT64_C(1) << node)))
		return kv_fail(ENODEV, "tier 'dram' node %d: no such NUMA node (machine has %d)",
			       node, __builtin_popcountll(mask));

	memset(&d, 0, sizeof(d));
	d.tier = KV_TIER_DRAM;
	d.node = node;
	snprintf(d.device, sizeof(d.device), "node%d", node);
	d.persistent = false;

	memset(&ctx, 0, sizeof(ctx));
	ctx.node = node;
	ctx.topo = topo;
	if (topo)
		ctx.obj = hwloc_get_numanode_obj_by_os_index(topo, (unsigned)node);
	if (ctx.obj) {
		const struct hwloc_topology_support *sup = hwloc_topology_get_support(topo);

		dram_from_hwloc(topo, ctx.obj, &d);
		ctx.bind_thread = __builtin_popcountll(mask) > 1 && ctx.obj->cpuset &&
				  !hwloc_bitmap_iszero(ctx.obj->cpuset) &&
				  sup->cpubind->set_thisthread_cpubind &&
				  sup->cpubind->get_thisthread_cpubind;
	}
	if (d.capacity_src == KV_SRC_NONE) {
		/* No topology: the machine is one node holding all memory. */
		long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);

		if (pages > 0 && psz > 0) {
			d.capacity_bytes = (uint64_t)pages * (uint64_t)psz;
			d.capacity_src = KV_SRC_OS;
		}
	}

	rc = fill_measured(&d, flags, dram_probe, &ctx);
	if (rc)
		return rc;
	*out = d;
	return 0;
}

/* ---- SSD (a directory) ------------------------------------------------- */

struct ssd_ctx {
	const char *dir;
	uint32_t align; /* best alignment known before the probe */
};

/* The O_DIRECT offset alignment statx reports for fd/path, 0 if none (most
 * file systems report it for regular files only). mem_align gets the
 * buffer alignment when asked for. */
static uint32_t statx_dio_align(int dirfd, const char *path, int at_flags,
				uint32_t *mem_align)
{
	uint32_t off = 0, mem = 0;

	if (!kv_hw_dio_align(dirfd, path, at_flags, &off, &mem) || !off || !align_sane(off))
		return 0;
	if (mem_align)
		*mem_align = mem;
	return off;
}

static uint32_t sysfs_block_size(dev_t dev)
{
	uint32_t v = kv_hw_block_size(dev);

	return align_sane(v) ? v : 0;
}

static int ssd_io_error(const char *dir, const char *what, int e)
{
	if (e == ENOSPC || e == EDQUOT)
		return kv_fail(ENOSPC, "tier 'ssd' dir '%s': probe %s: no space left", dir, what);
	return kv_fail(e ? e : EIO, "tier 'ssd' dir '%s': probe %s failed: %s", dir, what,
		       kv_strerror(e ? e : EIO));
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

/* Write, read back and randomly read a scratch file in c->dir. The file is
 * unlinked as soon as it is open, so it disappears on every path, even if
 * the process dies mid-probe. */
static int ssd_probe_fd(const struct ssd_ctx *c, int fd, bool direct,
			struct figures *f)
{
	uint64_t start = kv_now_ns(), t, rng = 0x9e3779b97f4a7c15ull;
	uint64_t lat[SSD_LAT_READS];
	uint32_t align = c->align, mem_align = 0, io_align;
	size_t written = 0, done = 0, buf_align, lat_bytes;
	unsigned nlat = 0;
	uint64_t *buf;
	int rc = 0;

	if (direct) {
		uint32_t a = statx_dio_align(fd, "", AT_EMPTY_PATH, &mem_align);

		if (a)
			align = a;
	}
	io_align = align > 4096 ? align : 4096;
	buf_align = mem_align > io_align ? mem_align : io_align;
	lat_bytes = io_align > SSD_LAT_BYTES ? io_align : SSD_LAT_BYTES;
	buf = aligned_alloc(buf_align, SSD_CHUNK_BYTES);
	if (!buf)
		return kv_fail(ENOMEM, "tier 'ssd' dir '%s': cannot allocate the probe buffer", c->dir);
	/* Random contents: some devices and file systems compress or skip
	 * zeroes, which would flatter the figures. */
	for (size_t i = 0; i < SSD_CHUNK_BYTES / sizeof(*buf); i++) {
		rng ^= rng << 13;
		rng ^= rng >> 7;
		rng ^= rng << 17;
		buf[i] = rng;
	}

	/* Shares of the budget: write (with fdatasync) to 45 %, read to 75 %,
	 * random reads to 100 %. Each runs at least once. */
	while (written < SSD_FILE_BYTES) {
		ssize_t n = pwrite(fd, buf, SSD_CHUNK_BYTES, (off_t)written);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			rc = ssd_io_error(c->dir, "write", n < 0 ? errno : ENOSPC);
			goto out;
		}
		written += (size_t)n;
		if ((size_t)n < SSD_CHUNK_BYTES ||
		    kv_now_ns() - start > PROBE_BUDGET_NS * 45 / 100)
			break;
	}
	if (fdatasync(fd) != 0) {
		rc = ssd_io_error(c->dir, "fdatasync", errno);
		goto out;
	}
	t = kv_now_ns();
	f->write_bw = bytes_per_s(written, t - start);
	/* Buffered reads would come from the page cache: drop it first (a
	 * request the kernel may ignore). */
	if (!direct)
		posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
	written -= written % io_align;

	if (written == 0) {
		rc = ssd_io_error(c->dir, "write", ENOSPC);
		goto out;
	}
	while (done < written) {
		size_t want = written - done < SSD_CHUNK_BYTES ? written - done : SSD_CHUNK_BYTES;
		ssize_t n = pread(fd, buf, want, (off_t)done);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			rc = ssd_io_error(c->dir, "read", n < 0 ? errno : EIO);
			goto out;
		}
		done += (size_t)n;
		if (kv_now_ns() - start > PROBE_BUDGET_NS * 75 / 100)
			break;
	}
	f->read_bw = bytes_per_s(done, kv_now_ns() - t);

	while (nlat < SSD_LAT_READS) {
		size_t blocks = written / lat_bytes;
		off_t off;
		ssize_t n;

		rng ^= rng << 13;
		rng ^= rng >> 7;
		rng ^= rng << 17;
		off = (off_t)((rng % (blocks ? blocks : 1)) * lat_bytes);
		t = kv_now_ns();
		n = pread(fd, buf, lat_bytes, off);
		t = kv_now_ns() - t;
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			rc = ssd_io_error(c->dir, "random read", n < 0 ? errno : EIO);
			goto out;
		}
		lat[nlat++] = t ? t : 1;
		if (kv_now_ns() - start > PROBE_BUDGET_NS)
			break;
	}
	qsort(lat, nlat, sizeof(lat[0]), cmp_u64);
	f->latency_ns = (double)lat[nlat / 2];
	f->dio_align = align;
	kv_log(KV_LOG_INFO, "tier 'ssd' dir '%s': probed%s write %.1f MB/s, read %.1f MB/s, %zu-byte read latency %.1f us in %.0f ms",
	       c->dir, direct ? "" : " (buffered I/O)", f->write_bw / 1e6, f->read_bw / 1e6,
	       lat_bytes, f->latency_ns / 1e3, (double)(kv_now_ns() - start) / 1e6);
out:
	free(buf);
	return rc;
}

static int ssd_probe(void *arg, struct figures *f)
{
	const struct ssd_ctx *c = arg;
	char path[PATH_MAX];
	bool direct = true;
	int fd, rc, n;

	n = snprintf(path, sizeof(path), "%s/.libkv-probe-%ld-%" PRIx64 ".tmp", c->dir,
		     (long)getpid(), kv_now_ns());
	if (n < 0 || (size_t)n >= sizeof(path))
		return kv_fail(EINVAL, "tier 'ssd' dir '%s': path too long for a scratch file", c->dir);
	fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_DIRECT, 0600);
	if (fd < 0 && errno == EINVAL) {
		/* The file system refuses O_DIRECT (tmpfs on older kernels,
		 * some FUSE): the figures will be those of buffered I/O. */
		kv_log(KV_LOG_INFO, "tier 'ssd' dir '%s': no O_DIRECT here: probing with buffered I/O",
		       c->dir);
		direct = false;
		fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	}
	if (fd < 0) {
		int e = errno;

		if (e == EACCES || e == EPERM || e == EROFS)
			return kv_fail(EACCES, "tier 'ssd' dir '%s': cannot create a file (%s)",
				       c->dir, kv_strerror(e));
		return ssd_io_error(c->dir, "create", e);
	}
	if (unlink(path) != 0)
		kv_log(KV_LOG_WARN, "tier 'ssd' dir '%s': cannot remove scratch file %s: %s",
		       c->dir, path, kv_strerror(errno));
	rc = ssd_probe_fd(c, fd, direct, f);
	close(fd);
	return rc;
}

int kv_tier_desc_dir(const char *dir, unsigned flags, struct kv_tier_desc *out)
{
	struct kv_tier_desc d;
	struct ssd_ctx ctx;
	struct statvfs vfs;
	struct stat st;
	uint32_t align_dir, align_fb;
	int rc;

	if (!dir || !out)
		return kv_fail(EINVAL, "tier 'ssd': %s is NULL", dir ? "out" : "dir");
	rc = check_flags(flags, "tier 'ssd'");
	if (rc)
		return rc;
	if (!*dir)
		return kv_fail(EINVAL, "tier 'ssd': empty directory path");
	if (strlen(dir) >= sizeof(d.path))
		return kv_fail(EINVAL, "tier 'ssd' dir '%.64s...': longer than %zu bytes",
			       dir, sizeof(d.path) - 1);
	if (stat(dir, &st) != 0) {
		int e = errno;

		if (e == ENOENT)
			return kv_fail(ENOENT, "tier 'ssd' dir '%s': no such directory", dir);
		if (e == ENOTDIR)
			return kv_fail(ENOTDIR, "tier 'ssd' dir '%s': a component of the path is not a directory",
				       dir);
		return kv_fail(e, "tier 'ssd' dir '%s': cannot stat: %s", dir, kv_strerror(e));
	}
	if (!S_ISDIR(st.st_mode))
		return kv_fail(ENOTDIR, "tier 'ssd' dir '%s': not a directory", dir);
	/* Root passes access() on any directory of a writable file system;
	 * the probe's file creation catches what remains. */
	if (access(dir, W_OK | X_OK) != 0) {
		int e = errno;

		if (e == EACCES || e == EPERM || e == EROFS)
			return kv_fail(EACCES, "tier 'ssd' dir '%s': not writable (%s)", dir,
				       kv_strerror(e));
		return kv_fail(e, "tier 'ssd' dir '%s': access check failed: %s", dir,
			       kv_strerror(e));
	}
	if (statvfs(dir, &vfs) != 0) {
		int e = errno;

		return kv_fail(e, "tier 'ssd' dir '%s': statvfs failed: %s", dir, kv_strerror(e));
	}

	memset(&d, 0, sizeof(d));
	d.tier = KV_TIER_SSD;
	d.node = -1;
	memcpy(d.path, dir, strlen(dir) + 1);
	snprintf(d.device, sizeof(d.device), "dev %u:%u", major(st.st_dev), minor(st.st_dev));
	d.persistent = true;
	d.capacity_bytes = (uint64_t)vfs.f_blocks * vfs.f_frsize;
	d.free_bytes = (uint64_t)vfs.f_bavail * vfs.f_frsize;
	d.capacity_src = KV_SRC_OS;

	/* The alignment: what statx says of the directory (few file systems
	 * answer for one), else what the probe or cache learnt from a regular
	 * file, else the device's logical block size, else a page. */
	align_dir = statx_dio_align(AT_FDCWD, dir, 0, NULL);
	align_fb = sysfs_block_size(st.st_dev);
	if (!align_fb)
		align_fb = 4096;
	d.dio_align = align_dir;
	ctx.dir = dir;
	ctx.align = align_dir ? align_dir : align_fb;

	rc = fill_measured(&d, flags, ssd_probe, &ctx);
	if (rc)
		return rc;
	if (!d.dio_align)
		d.dio_align = align_fb;
	*out = d;
	return 0;
}
