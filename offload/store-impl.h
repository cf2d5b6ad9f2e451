/* SPDX-License-Identifier: MIT */
/*
 * Internals of the spill store (store.c), not installed: its fault seam.
 * Data reads and writes go through the I/O engine and its seam
 * (kv_io_inject); this one covers what the store does itself on its two
 * files: index appends and fdatasync.
 */
#ifndef KV_STORE_IMPL_H
#define KV_STORE_IMPL_H

#include <stdint.h>

struct kv_store;
struct kv_io;

enum kv_store_seam_op {
	KV_STORE_SEAM_LOG_WRITE = 1u << 0, /* an append to store.idx */
	KV_STORE_SEAM_SYNC = 1u << 1,      /* fdatasync of either file */
	/* The fdatasync of store.idx after a failed append was cut back.
	 * Not a SYNC event, and armed on its own counter, so that it can
	 * be armed together with a fault that makes an append fail. */
	KV_STORE_SEAM_CUTBACK = 1u << 2,
};

/* Make the nth (1-based) next event of any op in `ops` fail with -err
 * (err > 0), once; nth 0 cancels. CUTBACK is counted apart: arming it
 * leaves an armed LOG_WRITE or SYNC fault in place, and the reverse.
 * Process-wide. For tests. */
void kv_store_inject(unsigned ops, unsigned nth, int err);

/* The engine the store reads and writes through (its own or the
 * config's), so that a test can check which backend it runs on. */
struct kv_io *kv_store_engine(struct kv_store *st);

/* Set the bytes of retired space (SYNC_BATCHED and SYNC_NONE) past which
 * the store syncs on its own to reuse them (see <kv/offload.h>); 0 puts
 * back the default. The public default is tens of MiB, too much for a
 * test to churn through quickly; users have no reason to tune it, since
 * the sync it triggers is one kv_store_sync() per that many bytes. */
void kv_store_set_held_limit(struct kv_store *st, uint64_t bytes);

#endif
