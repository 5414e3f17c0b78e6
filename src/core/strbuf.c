#include "strbuf.h"

#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Room for n more bytes plus the terminating NUL. */
static int reserve(moe__sb *b, size_t n) {
    if (b->oom) return -1;
    if (n < b->cap - b->len && b->p) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len <= n) {
        if (cap > SIZE_MAX / 2) {
            b->oom = 1;
            return -1;
        }
        cap *= 2;
    }
    char *p = moe__malloc(cap);
    if (!p) {
        b->oom = 1;
        return -1;
    }
    if (b->len) memcpy(p, b->p, b->len);
    moe__free(b->p);
    b->p = p;
    b->cap = cap;
    return 0;
}

void moe__sb_put(moe__sb *b, const void *s, size_t n) {
    if (reserve(b, n)) return;
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void moe__sb_str(moe__sb *b, const char *s) { moe__sb_put(b, s, strlen(s)); }

void moe__sb_printf(moe__sb *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) {
        b->oom = 1;
        return;
    }
    if (reserve(b, (size_t)n)) return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

void moe__sb_free(moe__sb *b) {
    moe__free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}
