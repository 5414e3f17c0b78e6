/* tokenizer.json: the loader; an accepted tokenizer must round-trip text
 * (decode(encode(s)) == s), here the input bytes themselves. */
#include "fuzz.h"
#include "tokenizer/tokenizer.h"

#include <stdlib.h>
#include <string.h>

#define MAX_TEXT 4096

MOE_FUZZ_TARGET(tokenizer) {
    const char *path = moe_fuzz_write(0, "tokenizer.json", data, size);
    if (!path) return -1;
    moe_tokenizer *t;
    char err[256];
    int rc = moe_tokenizer_load(path, &t, err, sizeof err);
    if (rc) return rc;
    size_t len = size < MAX_TEXT ? size : MAX_TEXT, n = 0, back = 0;
    int32_t *ids = malloc((len + 1) * sizeof *ids);
    char *text = malloc(len + 1);
    if (ids && text) {
        if (moe_tokenizer_encode(t, (const char *)data, len, ids, len + 1, &n)) moe_fuzz_trap("encode failed");
        if (moe_tokenizer_decode(t, ids, n, text, len + 1, &back)) moe_fuzz_trap("decode failed");
        if (back != len || memcmp(text, data, len)) moe_fuzz_trap("decode(encode(s)) != s");
    }
    for (int id = 0; id < moe_tokenizer_vocab_size(t); id++) {
        size_t plen;
        if (!moe_tokenizer_piece(t, id, &plen)) moe_fuzz_trap("a valid id has no piece");
    }
    free(ids);
    free(text);
    moe_tokenizer_free(t);
    return 0;
}
