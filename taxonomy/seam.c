// SPDX-License-Identifier: MIT
/*
 * Fault-injection counters for the OS seams of the layers above (the
 * allocator's kv_os_*, the I/O engine's reads and writes): count each call
 * of an operation, and make the Nth call of a chosen set fail once.
 * Process-wide and lock-free; meant for tests.
 */
#include <stdatomic.h>

#include "kv-private.h"

void kv_seam_inject(struct kv_seam *s, unsigned ops, unsigned nth, int value)
{
	atomic_store(&s->ops, 0);
	atomic_store(&s->value, value);
	atomic_store(&s->left, nth);
	atomic_store(&s->ops, nth ? ops : 0);
}

unsigned long kv_seam_calls(const struct kv_seam *s, unsigned ops)
{
	unsigned long n = 0;

	for (int i = 0; i < KV_SEAM_OPS; i++)
		if (ops & (1u << i))
			n += atomic_load(&s->calls[i]);
	return n;
}

int kv_seam_hit(struct kv_seam *s, unsigned op)
{
	unsigned left;

	for (int i = 0; i < KV_SEAM_OPS; i++)
		if (op & (1u << i))
			atomic_fetch_add(&s->calls[i], 1);
	if (!(atomic_load(&s->ops) & op))
		return 0;
	left = atomic_load(&s->left);
	while (left) {
		if (atomic_compare_exchange_weak(&s->left, &left, left - 1)) {
			if (left != 1)
				return 0;
			atomic_store(&s->ops, 0);
			return atomic_load(&s->value);
		}
	}
	return 0;
}
