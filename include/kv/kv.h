/* SPDX-License-Identifier: MIT */
/* libkv umbrella header: include this one. Layers, bottom up:
 * core (errors, logging), taxonomy (tiers, kinds, the registry),
 * allocator (topology, budgets, arenas, block pools), offload (the I/O
 * engine, spill store, mmap tensors, streamer), cache (the paged KV cache
 * and paged attention). */
#ifndef KV_KV_H
#define KV_KV_H

#include <kv/version.h>
#include <kv/core.h>
#include <kv/taxonomy.h>
#include <kv/allocator.h>
#include <kv/offload.h>
#include <kv/cache.h>

#endif
