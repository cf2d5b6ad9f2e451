// SPDX-License-Identifier: MIT
/*
 * Names of tiers, kinds and policy flags, and their parsers. The tables
 * here are the only spelling of each name; reports and programs use them.
 */
#include <ctype.h>
#include <string.h>
#include <strings.h>

#include <kv/taxonomy.h>

#include "kv-private.h"

static const char *const tier_names[KV_TIER_COUNT] = {
	[KV_TIER_DEVICE] = "device",
	[KV_TIER_DRAM] = "dram",
	[KV_TIER_MMAP] = "mmap",
	[KV_TIER_SSD] = "ssd",
	[KV_TIER_REMOTE] = "remote",
};

static const char *const kind_names[KV_KIND_COUNT] = {
	[KV_KIND_WEIGHTS] = "weights",
	[KV_KIND_KV] = "kv",
	[KV_KIND_ACTIVATIONS] = "activations",
	[KV_KIND_SCRATCH] = "scratch",
	[KV_KIND_STAGING] = "staging",
	[KV_KIND_METADATA] = "metadata",
};

/* Indexed by bit number. */
static const char *const policy_names[KV_POLICY_COUNT] = {
	"pinned", "evictable", "spillable", "prefetch", "readonly",
	"shared", "hugepage", "numa_bind", "numa_interleave",
};

const char *kv_tier_name(enum kv_tier tier)
{
	return (unsigned)tier < KV_TIER_COUNT ? tier_names[tier] : NULL;
}

const char *kv_kind_name(enum kv_kind kind)
{
	return (unsigned)kind < KV_KIND_COUNT ? kind_names[kind] : NULL;
}

const char *kv_policy_flag_name(uint32_t flag)
{
	if (flag == 0 || (flag & (flag - 1)) != 0 || (flag & ~KV_POLICY_ALL))
		return NULL;
	return policy_names[__builtin_ctz(flag)];
}

/* Index of s (length n, case-insensitive) in names, or -1. */
static int lookup(const char *const *names, int count, const char *s, size_t n)
{
	for (int i = 0; i < count; i++)
		if (strlen(names[i]) == n && strncasecmp(names[i], s, n) == 0)
			return i;
	return -1;
}

int kv_tier_parse(const char *s, enum kv_tier *out)
{
	int i;

	if (!s || !out)
		return kv_fail(EINVAL, "kv_tier_parse: NULL argument");
	i = lookup(tier_names, KV_TIER_COUNT, s, strlen(s));
	if (i < 0)
		return kv_fail(EINVAL, "unknown tier '%s' (device, dram, mmap, ssd, remote)", s);
	*out = (enum kv_tier)i;
	return 0;
}

int kv_kind_parse(const char *s, enum kv_kind *out)
{
	int i;

	if (!s || !out)
		return kv_fail(EINVAL, "kv_kind_parse: NULL argument");
	i = lookup(kind_names, KV_KIND_COUNT, s, strlen(s));
	if (i < 0)
		return kv_fail(EINVAL,
			       "unknown kind '%s' (weights, kv, activations, scratch, staging, metadata)", s);
	*out = (enum kv_kind)i;
	return 0;
}

static int is_sep(char c)
{
	return c == '|' || c == ',' || c == '+' || isspace((unsigned char)c);
}

int kv_policy_parse(const char *s, uint32_t *out)
{
	uint32_t policy = 0;
	const char *p;

	if (!s || !out)
		return kv_fail(EINVAL, "kv_policy_parse: NULL argument");
	p = s;
	for (;;) {
		size_t n;
		int i;

		while (*p && is_sep(*p))
			p++;
		if (!*p)
			break;
		for (n = 0; p[n] && !is_sep(p[n]); n++)
			;
		if (n == 4 && strncasecmp(p, "none", 4) == 0) {
			p += n;
			continue;
		}
		i = lookup(policy_names, KV_POLICY_COUNT, p, n);
		if (i < 0)
			return kv_fail(EINVAL, "policy '%s': unknown flag '%.*s'", s, (int)n, p);
		policy |= 1u << i;
		p += n;
	}
	*out = policy;
	return 0;
}

int kv_policy_format(uint32_t policy, char *buf, size_t len)
{
	size_t need = 0;

	if (policy & ~KV_POLICY_ALL)
		return kv_fail(EINVAL, "policy 0x%x: unknown bits 0x%x", policy, policy & ~KV_POLICY_ALL);
	if (!buf && len)
		return kv_fail(EINVAL, "kv_policy_format: NULL buffer with length %zu", len);
	if (len)
		buf[0] = '\0';
	for (int i = 0; i < KV_POLICY_COUNT || need == 0; i++) {
		const char *name;
		size_t n;

		if (i == KV_POLICY_COUNT) {
			name = "none";
		} else if (policy & (1u << i)) {
			name = policy_names[i];
		} else {
			continue;
		}
		n = strlen(name) + (need ? 1 : 0);
		if (len && need + n < len) {
			if (need)
				buf[need] = '|';
			memcpy(buf + need + (need ? 1 : 0), name, strlen(name) + 1);
		} else if (len && need < len) {
			/* Truncate like snprintf: fill what fits. */
			char tmp[32];
			snprintf(tmp, sizeof(tmp), "%s%s", need ? "|" : "", name);
			snprintf(buf + need, len - need, "%s", tmp);
		}
		need += n;
		if (i == KV_POLICY_COUNT)
			break;
	}
	return (int)need;
}
