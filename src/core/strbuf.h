/* A growable byte buffer for building text (JSON headers, SVG, cleaned
 * corpus text). Errors are sticky: after a failed allocation every append is
 * a no-op and oom stays set, so callers check once at the end. The content is
 * always NUL-terminated when p is not NULL. */
#ifndef MOE_STRBUF_H
#define MOE_STRBUF_H

#include <stddef.h>

typedef struct moe__sb {
    char *p;
    size_t len, cap;
    int oom;
} moe__sb;

void moe__sb_put(moe__sb *b, const void *s, size_t n);
void moe__sb_str(moe__sb *b, const char *s);
void moe__sb_printf(moe__sb *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void moe__sb_free(moe__sb *b);

#endif
