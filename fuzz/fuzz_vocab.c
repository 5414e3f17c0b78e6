/* The GGUF tokenizer (src/tokenizer/vocab.c). The input is a GGUF file whose
 * last byte t says how many bytes before it (at most t, at most 255) are also
 * the text to tokenize: the file's tail doubles as text, so the fuzzer mutates
 * both without a separator. An accepted vocab must encode that text, with and
 * without add_special and parse_special, to ids in range whose count the
 * cap-0 call predicts, no more than 3 per input byte (+ prefix space and
 * BOS/EOS: U+2581 is 3 bytes of byte fallback), each with a piece.
 * No round trip is asserted: llama.cpp's algorithms only guarantee one for
 * vocabs that hold every byte (docs/tokenizers.md), which a fuzzed vocab
 * need not. */
#include "fuzz.h"
#include "io/gguf.h"
#include "tokenizer/vocab.h"

#include <stdlib.h>

static void check_encode(const moe_vocab *v, const char *text, size_t len, int add, int special) {
    size_t need = 0, n = 0;
    int rc = moe_vocab_encode_special(v, text, len, add, special, NULL, 0, &need);
    if (rc != 0 && rc != MOE_ELIMIT) {
        if (rc != MOE_EINVAL) moe_fuzz_trap("vocab encode: unexpected error code");
        return;
    }
    if (need > 3 * (len + 1) + 2) moe_fuzz_trap("vocab encode: more ids than the text can need");
    int32_t *ids = malloc((need ? need : 1) * sizeof *ids); /* [N] */
    if (!ids) return;
    rc = moe_vocab_encode_special(v, text, len, add, special, ids, need, &n);
    if (rc || n != need) moe_fuzz_trap("vocab encode: second call differs from the size query");
    const int nv = moe_vocab_n_tokens(v);
    char buf[256];
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= nv) moe_fuzz_trap("vocab encode: id out of range");
        size_t pl = 0;
        rc = moe_vocab_piece(v, ids[i], buf, sizeof buf, &pl);
        if (rc == MOE_ELIMIT && pl <= sizeof buf) moe_fuzz_trap("vocab piece: ELIMIT for a piece that fits");
        if (rc && rc != MOE_ELIMIT) moe_fuzz_trap("vocab piece: error for an id in range");
    }
    free(ids);
}

MOE_FUZZ_TARGET(vocab) {
    if (size < 1) return -1;
    size_t tl = data[size - 1];
    if (tl > size - 1) tl = size - 1;
    const char *text = (const char *)data + (size - 1 - tl);
    char err[256];
    moe__gguf *g;
    int rc = moe__gguf_open_mem(data, size - 1, &g, err, sizeof err);
    if (rc) return rc;
    moe_vocab *v;
    rc = moe_vocab_from_gguf(g, &v, err, sizeof err);
    moe__gguf_close(g); /* the vocab copies what it needs */
    if (rc) return rc;
    const int nv = moe_vocab_n_tokens(v);
    if (nv <= 0 || moe_vocab_bos(v) >= nv || moe_vocab_eos(v) >= nv) moe_fuzz_trap("vocab: bad token count or special id");
    for (int k = 0; k < 4; k++) check_encode(v, text, tl, k & 1, k >> 1);
    size_t pl;
    if (moe_vocab_piece(v, nv, NULL, 0, &pl) != MOE_EINVAL || moe_vocab_piece(v, -1, NULL, 0, &pl) != MOE_EINVAL)
        moe_fuzz_trap("vocab piece: id out of range accepted");
    moe_vocab_free(v);
    return 0;
}
