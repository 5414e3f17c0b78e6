#include "internal.h"

#include <cjson/cJSON.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static void *default_alloc(size_t size, void *ctx) { (void)ctx; return malloc(size); }
static void default_free(void *p, void *ctx) { (void)ctx; free(p); }

static moe_allocator g_alloc = {default_alloc, default_free, NULL};
static _Atomic uint64_t g_count;

static _Thread_local int g_json_oom;

static void *json_alloc(size_t size) {
    void *p = moe__malloc(size);
    if (!p) g_json_oom = 1;
    return p;
}

int moe__json_oom(void) {
    int r = g_json_oom;
    g_json_oom = 0;
    return r;
}

/* cJSON's hooks are process-wide; pointing them at ours (for the default
 * allocator too) makes the parsers' JSON trees count, and fail, like every
 * other allocation. */
void moe_set_allocator(const moe_allocator *a) {
    if (a && a->alloc && a->free) g_alloc = *a;
    else g_alloc = (moe_allocator){default_alloc, default_free, NULL};
    cJSON_Hooks h = {json_alloc, moe__free};
    cJSON_InitHooks(&h);
}

uint64_t moe_alloc_count(void) { return atomic_load(&g_count); }

void *moe__malloc(size_t size) {
    void *p = g_alloc.alloc(size ? size : 1, g_alloc.ctx);
    if (p) atomic_fetch_add(&g_count, 1);
    return p;
}

void *moe__calloc(size_t n, size_t size) {
    size_t total;
    if (moe__mul_size(n, size, &total)) return NULL;
    void *p = moe__malloc(total);
    if (p) memset(p, 0, total);
    return p;
}

void moe__free(void *p) {
    if (p) g_alloc.free(p, g_alloc.ctx);
}

/* Aligned blocks keep the raw pointer just below the aligned address, so any
 * allocator hook works. */
void *moe__aligned_alloc(size_t size) {
    size_t total;
    if (moe__add_size(size, 64 + sizeof(void *), &total)) return NULL;
    unsigned char *raw = moe__malloc(total);
    if (!raw) return NULL;
    uintptr_t a = ((uintptr_t)raw + sizeof(void *) + 63) & ~(uintptr_t)63;
    ((void **)a)[-1] = raw;
    return (void *)a;
}

void moe__afree(void *p) {
    if (p) moe__free(((void **)p)[-1]);
}

char *moe__strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = moe__malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}
