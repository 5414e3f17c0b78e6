/* Token shards (MOESHRD1): the loader and its per-field checks. */
#include "fuzz.h"
#include "data/shard.h"

MOE_FUZZ_TARGET(shard) {
    const char *path = moe_fuzz_write(0, "fuzz.shard", data, size);
    if (!path) return -1;
    moe_shard *s;
    char err[256];
    int rc = moe_shard_load(path, &s, err, sizeof err);
    if (rc) return rc;
    size_t total = 0;
    for (int i = 0; i < s->n_docs; i++) {
        size_t n = moe_shard_doc_len(s, i);
        if (n == 0 || s->tokens[s->doc_off[i] + n - 1] != s->vocab_size - 1) moe_fuzz_trap("document without EOS");
        total += n;
    }
    if (total != s->n_tokens) moe_fuzz_trap("documents do not cover the tokens");
    moe_shard_free(s);
    return 0;
}
