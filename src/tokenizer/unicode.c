/* Code point classes (binary search in the generated range table) and UTF-8
 * decoding/encoding with llama.cpp's leniency (see unicode.h). */
#include "tokenizer/unicode.h"

unsigned moe__unicode_flags(uint32_t cp) {
    if (cp >= MOE__UC_MAX) return 0;
    size_t lo = 0, hi = moe__unicode_n_ranges; /* last start <= cp lies in [lo, hi) */
    while (hi - lo > 1) {
        size_t mid = lo + (hi - lo) / 2;
        if (moe__unicode_range_start[mid] <= cp) lo = mid;
        else hi = mid;
    }
    return moe__unicode_range_flags[lo];
}

uint32_t moe__utf8_decode(const unsigned char *s, size_t len, size_t *adv) {
    unsigned char c = s[0];
    size_t n = c < 0x80 ? 1 : c < 0xC0 ? 0 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : c < 0xF8 ? 4 : 0;
    if (n == 1) {
        *adv = 1;
        return c;
    }
    if (n == 0 || n > len) goto invalid;
    uint32_t cp = c & (0x7Fu >> n);
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80) goto invalid;
        cp = cp << 6 | (s[i] & 0x3Fu);
    }
    *adv = n;
    return cp;
invalid:
    *adv = 1;
    return 0xFFFD;
}

size_t moe__utf8_encode(uint32_t cp, unsigned char out[4]) {
    if (cp < 0x80) {
        out[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (unsigned char)(0xC0 | cp >> 6);
        out[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (unsigned char)(0xE0 | cp >> 12);
        out[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        out[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    if (cp < MOE__UC_MAX) {
        out[0] = (unsigned char)(0xF0 | cp >> 18);
        out[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3F));
        out[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        out[3] = (unsigned char)(0x80 | (cp & 0x3F));
        return 4;
    }
    return 0;
}
