/* SPDX-License-Identifier: MIT */
/*
 * Internals shared by the taxonomy's own files: the registry's table of
 * stats sources, which stats.c implements and registry.c owns. Not
 * installed.
 */
#ifndef KV_TAXONOMY_IMPL_H
#define KV_TAXONOMY_IMPL_H

#include <kv/taxonomy.h>

struct kv_stats_table;

/* An empty table. Errors: -ENOMEM. */
int kv_stats_table_create(struct kv_stats_table **out);

/* Free the table, dropping the sources still in it. No call may be in
 * progress. NULL is a no-op. */
void kv_stats_table_destroy(struct kv_stats_table *t);

/* Check the table's invariants (names valid and unique, counts agree,
 * free slots clear). Returns 0 or -EFAULT. */
int kv_stats_table_validate(struct kv_stats_table *t);

/* The stats table of reg. */
struct kv_stats_table *kv_registry_stats_table(const struct kv_registry *reg);

#endif /* KV_TAXONOMY_IMPL_H */
