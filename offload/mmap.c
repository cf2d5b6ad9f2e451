// SPDX-License-Identifier: MIT
/*
 * mmap tensors: a tensor file mapped read-only and shared, with madvise
 * hints, optional populate and mlock (degrading like the allocator's
 * placement unless `required`), recorded in a registry as tier MMAP, and
 * mincore() to say how much of it is in DRAM. Entry points kv_mmap_open(),
 * kv_mmap_advise(), kv_mmap_resident(), kv_mmap_close(). madvise and mlock
 * go through the allocator's OS seam (kv_os_madvise, kv_os_mlock) so tests
 * can fail them; the file mapping itself is a plain mmap(2) because that
 * seam maps anonymous memory only.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "allocator/allocator-impl.h"
#include "offload-impl.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

struct kv_mmap {
	char *base;                  /* (size) the mapping */
	uint64_t size;
	int fd;                      /* kept for posix_fadvise on DONTNEED */
	size_t page;
	struct kv_registry *reg;
	struct kv_mmap_info info;
	char *path;                  /* for details */
};

void kv_mmap_config_default(struct kv_mmap_config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->kind = KV_KIND_WEIGHTS;
	cfg->policy = KV_POLICY_READONLY | KV_POLICY_SHARED;
	cfg->label = "mmap";
}

static void degrade(struct kv_mmap *m, const char *fmt, ...) KV_PRINTF(2, 3);
static void degrade(struct kv_mmap *m, const char *fmt, ...)
{
	char who[300];
	va_list ap;

	snprintf(who, sizeof(who), "mmap '%s'", m->path);
	va_start(ap, fmt);
	kv_vnote_degraded(m->info.degraded, sizeof(m->info.degraded), who, fmt, ap);
	va_end(ap);
}

/* Read [p, p + len) in page by page: the fallback for kernels before 5.14
 * that lack MADV_POPULATE_READ. A page the file no longer backs would
 * raise SIGBUS here; populate with the madvise never does. */
static void touch_pages(const char *p, size_t len, size_t page)
{
	volatile const char *v = p;
	char sink = 0;

	for (size_t i = 0; i < len; i += page)
		sink ^= v[i];
	(void)sink;
}

/* Populate [p, p + len) (page aligned): 0 or -errno. */
static int populate(char *p, size_t len, size_t page)
{
	int rc = kv_os_madvise(p, len, MADV_POPULATE_READ);

	if (rc == -EINVAL) {
		touch_pages(p, len, page);
		rc = 0;
	}
	return rc;
}

int kv_mmap_open(const char *path, const struct kv_mmap_config *cfg, struct kv_mmap **out)
{
	struct kv_mmap_config def;
	struct kv_mmap *m;
	struct stat st;
	uint32_t policy;
	int rc;

	if (!path || !out)
		return kv_fail(EINVAL, "mmap: %s is NULL", path ? "out" : "path");
	if (!cfg) {
		kv_mmap_config_default(&def);
		cfg = &def;
	}
	if ((unsigned)cfg->kind >= KV_KIND_COUNT || (cfg->policy & ~KV_POLICY_ALL))
		return kv_fail(EINVAL, "mmap '%s': bad kind %d or policy 0x%x", path,
			       (int)cfg->kind, cfg->policy);
	m = calloc(1, sizeof(*m));
	if (!m || !(m->path = strdup(path))) {
		free(m);
		return kv_fail(ENOMEM, "mmap '%s': out of memory", path);
	}
	m->page = kv_os_page_size();
	m->reg = cfg->registry ? cfg->registry : kv_registry_default();
	m->fd = open(path, O_RDONLY | O_CLOEXEC);
	if (m->fd < 0) {
		rc = kv_fail(errno, "mmap: open '%s': %s", path, kv_strerror(errno));
		goto fail;
	}
	if (fstat(m->fd, &st) != 0) {
		rc = kv_fail(errno, "mmap: fstat '%s': %s", path, kv_strerror(errno));
		goto fail;
	}
	if (!S_ISREG(st.st_mode) || st.st_size <= 0) {
		rc = kv_fail(EINVAL, "mmap '%s': %s", path,
			     S_ISREG(st.st_mode) ? "the file is empty" : "not a regular file");
		goto fail;
	}
	if (!m->reg) {
		rc = kv_fail(ENOMEM, "mmap '%s': no registry: %s", path, kv_last_error());
		goto fail;
	}
	m->size = (uint64_t)st.st_size;
	m->base = mmap(NULL, m->size, PROT_READ, MAP_SHARED, m->fd, 0);
	if (m->base == MAP_FAILED) {
		m->base = NULL;
		rc = kv_fail(errno, "mmap '%s': mmap of %" PRIu64 " bytes: %s", path, m->size,
			     kv_strerror(errno));
		goto fail;
	}
	m->info.size = m->size;

	/* mlock populates as it locks, so populate first only when not
	 * locking: a lock that then fails may still fall back to populate. */
	if (cfg->lock) {
		rc = kv_os_mlock(m->base, m->size);
		if (rc == 0) {
			m->info.locked = true;
			m->info.populated = true;
		} else if (cfg->required) {
			rc = kv_fail(rc == -EPERM ? EPERM : ENOMEM,
				     "mmap '%s': mlock of %" PRIu64 " bytes required: %s (see "
				     "RLIMIT_MEMLOCK)", path, m->size, kv_strerror(rc));
			goto fail;
		} else {
			degrade(m, "mlock of %" PRIu64 " bytes failed (%s; see RLIMIT_MEMLOCK): "
				"not locked", m->size, kv_strerror(rc));
		}
	}
	if ((cfg->populate || cfg->lock) && !m->info.populated) {
		rc = populate(m->base, m->size, m->page);
		if (rc == 0) {
			m->info.populated = true;
		} else if (cfg->required) {
			/* MADV_POPULATE_READ fails with -EFAULT (a page the
			 * file no longer backs), -ENOMEM, -EINTR, -EIO...;
			 * to the caller they all mean the bytes could not be
			 * read in, so the open says -EIO as documented and
			 * the detail keeps the cause. */
			rc = kv_fail(EIO, "mmap '%s': populate of %" PRIu64 " bytes required: "
				     "madvise(MADV_POPULATE_READ): %s", path, m->size,
				     kv_strerror(rc));
			goto fail;
		} else {
			degrade(m, "populate failed (%s): pages are read on first touch",
				kv_strerror(rc));
		}
	}
	policy = cfg->policy | (m->info.locked ? KV_POLICY_PINNED : 0);
	rc = kv_registry_record(m->reg, m->size, KV_TIER_MMAP, 0, cfg->kind, policy,
				cfg->label ? cfg->label : "mmap", &m->info.record);
	if (rc)
		goto fail;
	*out = m;
	return 0;
fail:
	if (m->base) {
		if (m->info.locked)
			kv_os_munlock(m->base, m->size);
		munmap(m->base, m->size);
	}
	if (m->fd >= 0)
		close(m->fd);
	free(m->path);
	free(m);
	return rc;
}

void kv_mmap_close(struct kv_mmap *m)
{
	if (!m)
		return;
	kv_registry_forget(m->reg, m->info.record);
	if (m->info.locked)
		kv_os_munlock(m->base, m->size);
	munmap(m->base, m->size);
	close(m->fd);
	free(m->path);
	free(m);
}

const void *kv_mmap_data(const struct kv_mmap *m)
{
	return m ? m->base : NULL;
}

uint64_t kv_mmap_size(const struct kv_mmap *m)
{
	return m ? m->size : 0;
}

int kv_mmap_info(const struct kv_mmap *m, struct kv_mmap_info *out)
{
	if (!m || !out)
		return kv_fail(EINVAL, "mmap: info: NULL argument");
	*out = m->info;
	return 0;
}

/* Check [offset, offset + *len) against the mapping; *len 0 becomes "to
 * the end". */
static int check_range(const struct kv_mmap *m, uint64_t offset, uint64_t *len,
		       const char *what)
{
	if (offset > m->size || (*len && *len > m->size - offset))
		return kv_fail(EINVAL, "mmap '%s': %s: range %" PRIu64 "+%" PRIu64
			       " outside the file (%" PRIu64 " bytes)", m->path, what, offset,
			       *len, m->size);
	if (*len == 0)
		*len = m->size - offset;
	return 0;
}

int kv_mmap_advise(struct kv_mmap *m, uint64_t offset, uint64_t len, enum kv_advice advice)
{
	static const int advs[] = { MADV_NORMAL, MADV_WILLNEED, MADV_SEQUENTIAL, MADV_RANDOM,
				    MADV_DONTNEED, MADV_POPULATE_READ };
	static const char *const names[] = { "normal", "willneed", "sequential", "random",
					     "dontneed", "populate" };
	uint64_t start, end;
	int rc;

	if (!m)
		return kv_fail(EINVAL, "mmap: advise: NULL mapping");
	if ((unsigned)advice >= KV_ARRAY_SIZE(advs))
		return kv_fail(EINVAL, "mmap '%s': unknown advice %d", m->path, (int)advice);
	rc = check_range(m, offset, &len, names[advice]);
	if (rc)
		return rc;
	if (advice == KV_ADVISE_DONTNEED) {
		/* Narrowed to whole pages inside the range: a page shared
		 * with a neighbouring tensor may be in use. */
		start = kv_round_up(offset, m->page);
		end = offset + len == m->size ? kv_round_up(m->size, m->page)
					      : (offset + len) & ~((uint64_t)m->page - 1);
		if (end <= start)
			return 0;
	} else {
		start = offset & ~((uint64_t)m->page - 1);
		end = kv_round_up(offset + len, m->page);
	}
	if (advice == KV_ADVISE_POPULATE)
		rc = populate(m->base + start, end - start, m->page);
	else
		rc = kv_os_madvise(m->base + start, end - start, advs[advice]);
	if (rc)
		return kv_fail(-rc, "mmap '%s': madvise %s of %" PRIu64 "+%" PRIu64 ": %s", m->path,
			       names[advice], start, end - start, kv_strerror(rc));
	/* DONTNEED on a shared file mapping only unmaps: the pages stay in
	 * the page cache. Dropping them there too is what keeps a streamer's
	 * DRAM near its budget. Advisory: a failure changes nothing. */
	if (advice == KV_ADVISE_DONTNEED)
		(void)posix_fadvise(m->fd, (off_t)start, (off_t)(end - start), POSIX_FADV_DONTNEED);
	return 0;
}

int kv_mmap_resident(const struct kv_mmap *m, uint64_t offset, uint64_t len, uint64_t *bytes)
{
	uint64_t start, end, total = 0;
	unsigned char *vec;
	size_t pages;
	int rc;

	if (!m || !bytes)
		return kv_fail(EINVAL, "mmap: resident: NULL argument");
	rc = check_range(m, offset, &len, "resident");
	if (rc)
		return rc;
	start = offset & ~((uint64_t)m->page - 1);
	end = kv_round_up(offset + len, m->page);
	pages = (size_t)((end - start) / m->page);
	vec = malloc(pages ? pages : 1);
	if (!vec)
		return kv_fail(ENOMEM, "mmap '%s': resident: out of memory for %zu pages", m->path,
			       pages);
	if (mincore(m->base + start, end - start, vec) != 0) {
		rc = errno;
		free(vec);
		return kv_fail(rc, "mmap '%s': mincore: %s", m->path, kv_strerror(rc));
	}
	for (size_t i = 0; i < pages; i++) {
		uint64_t lo, hi;

		if (!(vec[i] & 1))
			continue;
		lo = start + i * m->page;
		hi = lo + m->page;
		lo = lo < offset ? offset : lo;
		hi = hi > offset + len ? offset + len : hi;
		total += hi - lo;
	}
	free(vec);
	*bytes = total;
	return 0;
}
