/* SentencePiece-style encoding of a text fragment (tokenizer.ggml.model =
 * llama), as llama.cpp's llm_tokenizer_spm: an optional leading space, every
 * space escaped to U+2581, symbols merged over the whole fragment by the
 * score of the token they form, and symbols that are no token emitted as
 * byte tokens. */
#include "tokenizer/vocab_impl.h"

#include <string.h>

#define ESC "\xe2\x96\x81" /* U+2581 LOWER ONE EIGHTH BLOCK */

int moe__spm_fragment(const moe_vocab *v, moe__work *w, const char *text, size_t len, int space_prefix,
                      moe__idbuf *out) {
    size_t need;
    /* each byte may grow to 3 (a space to U+2581), plus the prefix */
    if (moe__mul_size(len + 1, 3, &need) || moe__buf_reserve(w, need)) return MOE_ENOMEM;
    size_t n = 0;
    if (space_prefix) {
        memcpy(w->buf, ESC, 3);
        n = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(w->buf + n, ESC, 3);
            n += 3;
        } else {
            w->buf[n++] = (unsigned char)text[i];
        }
    }
    if (n == 0) return 0;
    int rc = moe__merge_symbols(v, w, n);
    if (rc) return rc;
    for (int32_t i = 0; i >= 0; i = w->sym[i].next) {
        const moe__sym *s = &w->sym[i];
        if (s->id >= 0) {
            moe__idbuf_push(out, s->id);
            continue;
        }
        /* Only unmerged single characters can be unknown: byte fallback. */
        for (uint32_t k = 0; k < s->n; k++) {
            int32_t id = v->byte_tok[w->buf[s->start + k]];
            if (id < 0) return MOE_EINVAL; /* llama.cpp throws: the vocab lacks this byte */
            moe__idbuf_push(out, id);
        }
    }
    return 0;
}
