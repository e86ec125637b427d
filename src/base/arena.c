/*
 * arena.c — a bump allocator over one 64-byte aligned block. Activations
 * and per-step scratch come from here: sized once from the config, reset
 * each step, so a training step never calls malloc.
 */
#include "base.h"

#include <stdlib.h>

kiln_status arena_init(kiln_ctx *ctx, arena *a, size_t cap)
{
    a->base = NULL;
    a->cap = a->used = a->peak = 0;
    if (cap == 0) return KILN_OK;
    a->base = kiln_aligned_alloc(ctx, cap);
    if (!a->base) return KILN_ERR_NOMEM;
    a->cap = (cap + 63) & ~(size_t)63;
    return KILN_OK;
}

void *arena_alloc(arena *a, size_t n)
{
    size_t sz = (n + 63) & ~(size_t)63;
    if (sz > a->cap - a->used) return NULL;
    void *p = a->base + a->used;
    a->used += sz;
    if (a->used > a->peak) a->peak = a->used;
    return p;
}

void arena_reset(arena *a) { a->used = 0; }

void arena_free(arena *a)
{
    free(a->base);
    a->base = NULL;
    a->cap = a->used = 0;
}
