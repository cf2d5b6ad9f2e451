/* SPDX-License-Identifier: MIT */
/*
 * libkv taxonomy: where every byte lives (tier), what it is (kind) and how
 * it may be treated (policy); the registry that records every allocation;
 * tier descriptors (capacity, bandwidth, latency); reports in text, JSON
 * and Prometheus form.
 *
 * Errors follow <kv/core.h>: 0 or -errno, detail in kv_last_error().
 */
#ifndef KV_TAXONOMY_H
#define KV_TAXONOMY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <kv/core.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Tiers, kinds, policies ------------------------------------------ */

/* Where bytes live. The order is from fastest to farthest. */
enum kv_tier {
	KV_TIER_DEVICE = 0, /* accelerator memory; node = device ordinal */
	KV_TIER_DRAM = 1,   /* host DRAM; node = NUMA node (OS index) */
	KV_TIER_MMAP = 2,   /* file-backed mapping, page cache */
	KV_TIER_SSD = 3,    /* spill store on local storage */
	KV_TIER_REMOTE = 4, /* another machine */
	KV_TIER_COUNT = 5
};

/* What the bytes are. */
enum kv_kind {
	KV_KIND_WEIGHTS = 0,
	KV_KIND_KV = 1,
	KV_KIND_ACTIVATIONS = 2,
	KV_KIND_SCRATCH = 3,
	KV_KIND_STAGING = 4, /* I/O buffers */
	KV_KIND_METADATA = 5,
	KV_KIND_COUNT = 6
};

/* How the bytes may be treated: a bit set. */
enum kv_policy {
	KV_POLICY_PINNED = 1u << 0,          /* mlock'ed, never paged out */
	KV_POLICY_EVICTABLE = 1u << 1,       /* may be dropped and recomputed */
	KV_POLICY_SPILLABLE = 1u << 2,       /* may be written to a lower tier */
	KV_POLICY_PREFETCH = 1u << 3,        /* read ahead of use */
	KV_POLICY_READONLY = 1u << 4,
	KV_POLICY_SHARED = 1u << 5,          /* shared between sequences/processes */
	KV_POLICY_HUGEPAGE = 1u << 6,
	KV_POLICY_NUMA_BIND = 1u << 7,
	KV_POLICY_NUMA_INTERLEAVE = 1u << 8,
};
#define KV_POLICY_COUNT 9
#define KV_POLICY_ALL ((1u << KV_POLICY_COUNT) - 1u)

/* Wildcard for tier, node or kind in queries. */
#define KV_ANY (-1)

/* Lower-case name ("dram", "kv", "spillable"); NULL when out of range.
 * kv_policy_flag_name() takes exactly one flag bit. */
KV_API const char *kv_tier_name(enum kv_tier tier);
KV_API const char *kv_kind_name(enum kv_kind kind);
KV_API const char *kv_policy_flag_name(uint32_t flag);

/* Parse a name, case-insensitively. Errors: -EINVAL (unknown name, NULL). */
KV_API int kv_tier_parse(const char *s, enum kv_tier *out);
KV_API int kv_kind_parse(const char *s, enum kv_kind *out);

/* Parse a policy set: flag names joined by '|', ',' or '+', spaces allowed;
 * "" or "none" is 0. Errors: -EINVAL naming the unknown word. */
KV_API int kv_policy_parse(const char *s, uint32_t *out);

/* Format a policy set as "pinned|spillable" ("none" for 0) into buf, like
 * snprintf: returns the length the full string needs (excluding the NUL),
 * truncating when len is too small. Errors: -EINVAL (unknown bits). */
KV_API int kv_policy_format(uint32_t policy, char *buf, size_t len);

/* ---- The registry ----------------------------------------------------- */

/* A record's handle: never 0 for a live record; stale handles are detected
 * (a freed slot's generation changes), so forgetting twice is -ENOENT. */
typedef uint64_t kv_handle;
#define KV_HANDLE_NONE ((kv_handle)0)

/* Longest label, excluding the NUL. */
#define KV_LABEL_MAX 127
/* Highest node number a record may carry, plus one. */
#define KV_NODE_MAX 64

struct kv_registry;

struct kv_registry_config {
	/* NUMA nodes that DRAM records may name, as a bit mask of OS indices;
	 * 0 = the machine's nodes (from hwloc, read once per process). */
	uint64_t numa_nodes;
	/* Distinct labels the registry can hold (default 4096). */
	uint32_t max_labels;
	/* Lock shards (default 16): threads record into different shards. */
	uint32_t shards;
	/* Name used in reports and log lines (copied; default "libkv"). */
	const char *name;
	/* Freed bytes a shard may keep as a stock for its next records
	 * without touching the shared (tier, kind) counters (default 1 MiB),
	 * as memory cgroups charge in batches: threads then rarely write a
	 * shared cache line. A (tier, kind) peak is exact while one shard is
	 * in use and may exceed the true peak by up to peak_batch per other
	 * shard in use; 0 makes peaks exact at the cost of a shared atomic
	 * per call. Live byte and record counts are always exact. */
	uint64_t peak_batch;
};

/* One live record, as returned by queries. label stays valid for the
 * registry's lifetime ("" when recorded without one). */
struct kv_record {
	kv_handle handle;
	uint64_t bytes;
	enum kv_tier tier;
	int node;
	enum kv_kind kind;
	uint32_t policy;
	const char *label;
	uint32_t moves;       /* how often the bytes changed tier or node */
	uint64_t created_ns;  /* CLOCK_MONOTONIC */
	uint64_t moved_ns;    /* last move, 0 if never moved */
};

KV_API void kv_registry_config_default(struct kv_registry_config *cfg);

/* Create an empty registry. cfg may be NULL for defaults.
 * Errors: -EINVAL (bad config), -ENOMEM. Ownership: the caller destroys it. */
KV_API int kv_registry_create(const struct kv_registry_config *cfg,
			      struct kv_registry **out);

/* Force flag for kv_registry_destroy(). */
#define KV_REGISTRY_FORCE 1u

/* Destroy a registry. If records are still live it returns -EBUSY, keeps
 * the registry intact, logs one warning line per leaked record (label,
 * kind, tier, node, bytes; the first 64, then a count of the rest) and
 * puts a summary in kv_last_error(); with
 * KV_REGISTRY_FORCE it logs the same and releases anyway (returns 0).
 * NULL is a no-op. The default registry cannot be destroyed (-EPERM).
 * Thread safety: no other thread may use reg during or after the call. */
KV_API int kv_registry_destroy(struct kv_registry *reg, unsigned flags);

/* The process-wide registry, created on first use and never destroyed.
 * NULL only if it could not be created (out of memory; see
 * kv_last_error()). Thread safety: any thread. */
KV_API struct kv_registry *kv_registry_default(void);

/* The registry's name. */
KV_API const char *kv_registry_name(const struct kv_registry *reg);

/* Record `bytes` at (tier, node) of `kind` with `policy`. label may be NULL.
 * Errors: -EINVAL (tier, kind, policy bits, node out of range; a DRAM node
 * not in the registry's node mask; label too long), -ENOSPC (label table
 * full), -ENOMEM. On error *out is untouched and nothing is recorded
 * (a label seen for the first time may stay known to kv_registry_label()).
 * Thread safety: any thread, concurrently with every call but destroy. */
KV_API int kv_registry_record(struct kv_registry *reg, size_t bytes,
			      enum kv_tier tier, int node, enum kv_kind kind,
			      uint32_t policy, const char *label,
			      kv_handle *out);

/* The record's bytes now live at (tier, node). Moving to where it already
 * is changes nothing and does not count as a move.
 * Errors: -ENOENT (unknown or stale handle), -EINVAL (tier/node).
 * Thread safety: any thread; concurrent calls on the same handle are
 * serialised. */
KV_API int kv_registry_move(struct kv_registry *reg, kv_handle h,
			    enum kv_tier tier, int node);

/* The record now holds `bytes`. Errors: -ENOENT. */
KV_API int kv_registry_resize(struct kv_registry *reg, kv_handle h,
			      size_t bytes);

/* Remove a record; h becomes stale. Errors: -ENOENT (unknown or stale). */
KV_API int kv_registry_forget(struct kv_registry *reg, kv_handle h);

/* A snapshot of one record. Errors: -ENOENT. */
KV_API int kv_registry_get(const struct kv_registry *reg, kv_handle h,
			   struct kv_record *out);

/* Live bytes summed over the cells matching (tier, node, kind); each may be
 * KV_ANY. Errors: -EINVAL (out of range). Under concurrent updates each
 * cell is read at some instant, so the sum is exact once updates stop. */
KV_API int kv_registry_bytes(const struct kv_registry *reg, int tier,
			     int node, int kind, uint64_t *out);

/* Live records matching (tier, node, kind), like kv_registry_bytes(). */
KV_API int kv_registry_count(const struct kv_registry *reg, int tier,
			     int node, int kind, uint64_t *out);

/* High-water mark of live bytes in the (tier, kind) cell, all nodes
 * together, since creation or the last kv_registry_reset_peaks(); never
 * below the true peak, exact while one thread records into the registry,
 * else above it by at most peak_batch per further shard in use (see
 * kv_registry_config.peak_batch). tier and kind must be exact.
 * Errors: -EINVAL. */
KV_API int kv_registry_peak(const struct kv_registry *reg, enum kv_tier tier,
			    enum kv_kind kind, uint64_t *out);

/* Restart every high-water mark (tier x kind and per label) from the
 * current live (for cells: charged) bytes. */
KV_API void kv_registry_reset_peaks(struct kv_registry *reg);

/* Totals per label. */
struct kv_holder {
	const char *label;  /* valid for the registry's lifetime */
	uint64_t bytes;     /* live */
	uint64_t records;   /* live */
	uint64_t peak;      /* high-water of bytes */
};

/* Totals of one label. Errors: -ENOENT (label never recorded),
 * -EINVAL (NULL). */
KV_API int kv_registry_label(const struct kv_registry *reg, const char *label,
			     struct kv_holder *out);

/* The n labels holding the most live bytes, largest first (ties by label
 * name); labels holding nothing are left out. *n_out gets how many were
 * written (<= n). Errors: -EINVAL. */
KV_API int kv_registry_top(const struct kv_registry *reg,
			   struct kv_holder *out, size_t n, size_t *n_out);

/* Call fn for every live record, shard by shard; stops when fn returns
 * non-zero and returns that value, else 0. The shard being visited is
 * locked: fn must not call mutating functions on the same registry. */
KV_API int kv_registry_foreach(const struct kv_registry *reg,
			       int (*fn)(const struct kv_record *rec, void *ctx),
			       void *ctx);

/* Cumulative operation counts. */
struct kv_registry_ops {
	uint64_t records, moves, resizes, forgets;
};
KV_API void kv_registry_ops(const struct kv_registry *reg,
			    struct kv_registry_ops *out);

/* Check every invariant: each live record is counted in exactly its cell
 * and label, counters equal the sums of live records, free lists are
 * acyclic and hold only free slots, stats source names are valid and
 * unique. Call it when no other thread mutates.
 * Returns 0 or -EFAULT naming the first broken invariant. */
KV_API int kv_registry_validate(const struct kv_registry *reg);

/* ---- Stats sources ---------------------------------------------------- */

/* A subsystem's own figures (a cache's blocks in use, hit rates, tokens
 * saved by prefix hits) belong in the same reports as the bytes it holds.
 * It adds a stats source: a function and its context, which every report
 * of the registry calls once, during the report's snapshot, to read the
 * figures as they are then. docs/report.md shows how each format prints
 * them. */

/* At most this many sources per registry, and stats per source (the `max`
 * every call of a kv_stats_fn gets). */
#define KV_STATS_SOURCES_MAX 64
#define KV_STATS_MAX 128
/* Longest source or stat name, and longest help text, in bytes without
 * the NUL. */
#define KV_STAT_NAME_MAX 63
#define KV_STAT_HELP_MAX 255

enum kv_stat_type {
	KV_STAT_GAUGE = 0,   /* a level that may go up and down */
	KV_STAT_COUNTER = 1, /* a running total that only grows */
};

/* One figure of a source. A unit belongs at the end of the name, as in
 * Prometheus: "spilled_bytes", "hit_ratio", "tokens_skipped". */
struct kv_stat {
	/* [a-z0-9_]+, 1..KV_STAT_NAME_MAX bytes, unique within its source. */
	const char *name;
	double value;           /* any double; NaN and infinities are shown */
	enum kv_stat_type type;
	/* One line (no line feed) of at most KV_STAT_HELP_MAX bytes, or NULL. */
	const char *help;
};

/* A source's function: fill out[0..n) with its stats (n <= max, in the
 * order reports should list them; out comes zeroed, so fields left alone
 * read as 0 and NULL) and return n, or return -errno; a
 * failure is shown in the report as this source's error, with the
 * calling thread's kv_last_error() detail if fn left one (e.g. from a
 * libkv call that failed), and the rest of the report is written as
 * usual. So is a result that breaks the rules of struct kv_stat, with
 * -EINVAL.
 * Strings: name and help are read after fn returns, until the report is
 * done with the source; point them at literals, or at memory ctx keeps
 * until kv_registry_remove_stats() returns.
 * Thread safety: fn runs in the thread writing a report, possibly in
 * several at once, with no registry lock held: it may call any registry
 * query or mutation, but not kv_registry_add_stats(),
 * kv_registry_remove_stats(), kv_registry_stats_foreach() or
 * kv_report_write() on the same registry (those fail with -EDEADLK). */
typedef int (*kv_stats_fn)(void *ctx, struct kv_stat *out, size_t max);

/* Add a stats source named `source` ([a-z0-9_.-]+, 1..KV_STAT_NAME_MAX
 * bytes, e.g. "cache" or "cache.gpu0"); from now on every report calls
 * fn(ctx, ...). *id gets the handle kv_registry_remove_stats() takes;
 * handles are never 0 and never reused within a registry.
 * Errors: -EINVAL (NULL reg, fn or id; bad name), -EEXIST (the registry
 * has a source of that name: names are unique, so a report never shows
 * two series of the same name; remove the old one first), -ENOSPC
 * (KV_STATS_SOURCES_MAX sources), -EDEADLK (called from a stats fn or
 * visitor of reg). On error nothing is added and *id is untouched.
 * Ownership: the name is copied; fn and ctx are only kept, ctx stays the
 * caller's and must stay valid until kv_registry_remove_stats() returns.
 * Sources still added at kv_registry_destroy() are dropped without
 * calling fn.
 * Thread safety: any thread, concurrently with reports and other
 * add/remove calls. */
KV_API int kv_registry_add_stats(struct kv_registry *reg, const char *source,
				 kv_stats_fn fn, void *ctx, uint64_t *id);

/* Remove the stats source with handle id. Reports starting later do not
 * call it; calls of its fn (and kv_registry_stats_foreach() visits of it)
 * already in progress in other threads are waited for, so when this
 * returns fn is not running and never will again: ctx may be freed.
 * Errors: -EINVAL (NULL reg), -ENOENT (unknown id, or removed already,
 * also by another thread now), -EDEADLK (called from a stats fn or
 * visitor of reg: it would wait for itself).
 * Thread safety: any thread; blocks as long as the longest such call in
 * progress. */
KV_API int kv_registry_remove_stats(struct kv_registry *reg, uint64_t id);

/* What kv_registry_stats_foreach() hands over for one source: its stats
 * (n of them, valid during the call) and err 0; or err < 0, stats NULL
 * and n 0 when its fn failed or broke the rules of struct kv_stat, and
 * then kv_last_error() says why, during the call ("" if fn said nothing).
 * A non-zero return stops the walk. */
typedef int (*kv_stats_visit_fn)(void *cbctx, const char *source,
				 const struct kv_stat *stats, size_t n, int err);

/* Read every stats source without writing a report: call each one's fn,
 * in the order of their names, and visit(cbctx, ...) with the result,
 * once per source. A source added or removed meanwhile may or may not be
 * visited. Returns 0, or what visit returned when it stopped the walk.
 * Errors: -EINVAL (NULL reg or visit), -ENOMEM, -EDEADLK (called from a
 * stats fn or visitor of reg). Unless visit stops the walk, the calling
 * thread's kv_last_error() is left as it was before the call.
 * Thread safety: any thread. No registry lock is held while fn or visit
 * runs; visit follows the rules of kv_stats_fn. */
KV_API int kv_registry_stats_foreach(const struct kv_registry *reg,
				     kv_stats_visit_fn visit, void *cbctx);

/* ---- Reports ---------------------------------------------------------- */

enum kv_report_format {
	KV_REPORT_TEXT = 1,       /* aligned table: tiers x kinds, human units */
	KV_REPORT_JSON = 2,       /* schema "libkv.report/1", docs/report.md */
	KV_REPORT_PROMETHEUS = 4, /* text exposition format 0.0.4 */
};

/* Write a report of reg to f in exactly one format: its bytes, records,
 * peaks and holders, and what each stats source says (its fn is called
 * once, from this thread; a source that fails is shown as failed and does
 * not fail the report).
 * Errors: -EINVAL (no or several formats, NULL), -EIO (write failed),
 * -ENOMEM (no memory for the snapshot), -EDEADLK (called from a stats fn
 * or visitor of reg); on -EINVAL and -EDEADLK nothing is written.
 * Thread safety: any thread; a concurrent update may or may not show. */
KV_API int kv_report_write(const struct kv_registry *reg, FILE *f,
			   unsigned format);

/* ---- Tier descriptors ------------------------------------------------- */

/* Where a descriptor's number came from. */
enum kv_desc_source {
	KV_SRC_NONE = 0,  /* unknown */
	KV_SRC_HWLOC = 1, /* hwloc memory attributes (firmware HMAT etc.) */
	KV_SRC_OS = 2,    /* the kernel: statvfs, sysfs */
	KV_SRC_PROBE = 3, /* measured now by a short probe */
	KV_SRC_CACHE = 4, /* measured earlier, read from the cache file */
};

struct kv_tier_desc {
	enum kv_tier tier;
	int node;                 /* DRAM: NUMA node (OS index); else -1 */
	char path[256];           /* SSD: the directory; else "" */
	char device[64];          /* cache key: "node0" or "dev 259:1" */
	bool persistent;          /* survives a power cycle */
	uint64_t capacity_bytes;  /* DRAM: node memory; SSD: file system size */
	uint64_t free_bytes;      /* SSD: available to us now; DRAM: 0 */
	double read_bw;           /* bytes/s; 0 when unknown */
	double write_bw;          /* bytes/s (DRAM: copy bandwidth) */
	double latency_ns;        /* DRAM: dependent load; SSD: 4 KiB read */
	uint32_t dio_align;       /* SSD: O_DIRECT offset/length alignment */
	enum kv_desc_source capacity_src, read_bw_src, write_bw_src,
		latency_src;
};

/* Descriptor flags. */
#define KV_DESC_FORCE_PROBE 1u /* measure now even if cached; rewrite cache */
#define KV_DESC_NO_CACHE 2u    /* neither read nor write the cache */
#define KV_DESC_NO_PROBE 4u    /* never measure: hwloc, OS and cache only */

/* Name of a source ("hwloc", "os", "probe", "cache", "none"); NULL when
 * out of range. */
KV_API const char *kv_desc_source_name(enum kv_desc_source src);

/* Describe DRAM on NUMA node `node` (OS index). Capacity comes from hwloc;
 * bandwidth and latency from hwloc memory attributes when the platform
 * reports them, else from the cache, else from a probe of at most ~0.5 s
 * whose result is cached in $XDG_CACHE_HOME/libkv/ (or ~/.cache/libkv/),
 * keyed by host and node. A cache that cannot be written is logged, not
 * an error. Errors: -ENODEV (no such node), -ENOMEM, -EINVAL (NULL out, bad flags).
 * Thread safety: any thread; concurrent probes may both measure. */
KV_API int kv_tier_desc_dram(int node, unsigned flags,
			     struct kv_tier_desc *out);

/* Describe the storage holding directory `dir` as an SSD tier: capacity
 * and free space (statvfs), O_DIRECT alignment (statx STATX_DIOALIGN, else
 * the logical block size), read/write bandwidth and 4 KiB read latency
 * from the cache (keyed by host and device) or a probe of at most ~0.5 s
 * with O_DIRECT I/O on a scratch file in dir, which is removed.
 * Errors: -ENOENT (no such directory), -ENOTDIR, -EACCES (not writable,
 * read-only file system), -ENOSPC (disk full during the probe), -EINVAL
 * (NULL, path over 255 bytes, FORCE_PROBE with NO_PROBE, unknown flags),
 * -EIO; the detail names the directory. */
KV_API int kv_tier_desc_dir(const char *dir, unsigned flags,
			    struct kv_tier_desc *out);

/* NUMA nodes of this machine as a bit mask of OS indices (hwloc, read once
 * per process); a machine without NUMA reports node 0 alone. */
KV_API uint64_t kv_numa_nodes(void);

#ifdef __cplusplus
}
#endif

#endif /* KV_TAXONOMY_H */
