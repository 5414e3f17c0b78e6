/* The inference engine's GGUF model loader (src/infer/model_gguf.c) through
 * moe_engine_load, which only takes a path: the input is written to a
 * per-process scratch file. The input's size parity picks mmap or read, so
 * both paths are driven. A model that loads is evaluated on two tokens with a
 * small cache (n_ctx 8, n_batch 2, one thread); its weights lie inside the
 * file, so eval costs at most a few passes over the input, except for the
 * attention and norm loops sized by the header, hence the cap below. Logits
 * are not checked for finiteness: a fuzzed F16 weight may be Inf or NaN. */
#include "fuzz.h"
#include "moe.h"

#include <stdlib.h>

MOE_FUZZ_TARGET(gguf_model) {
    const char *path = moe_fuzz_write(0, "model.gguf", data, size);
    if (!path) return -1;
    moe_engine_params p = moe_engine_params_default();
    p.n_ctx = 8, p.n_batch = 2, p.n_threads = 1, p.use_mmap = (int)(size & 1);
    char err[256];
    moe_engine *e;
    int rc = moe_engine_load(path, &p, &e, err, sizeof err);
    if (rc) return rc;
    const moe_engine_hparams *h = moe_engine_get_hparams(e);
    if (h->n_vocab <= 0 || h->n_embd <= 0 || h->n_layer <= 0 || h->n_expert_used <= 0 ||
        h->n_expert_used > h->n_expert || h->n_ctx != 8)
        moe_fuzz_trap("gguf_model: accepted hyperparameters out of range");
    /* header-sized work per token (heads x head_dim, vocab x embd) not bounded by the file size */
    if ((double)h->n_layer * h->n_head * h->head_dim * 8 < 1e7 && (double)h->n_vocab * h->n_embd < 1e7) {
        float *logits = malloc(sizeof(float) * (size_t)h->n_vocab); /* [V] */
        if (logits) {
            const int32_t toks[2] = {0, h->n_vocab - 1};
            rc = moe_engine_eval(e, toks, 2, logits, 0);
            if (rc == 0 && moe_engine_n_past(e) != 2) moe_fuzz_trap("gguf_model: eval did not advance the cache");
            free(logits);
        }
    }
    moe_engine_free(e);
    return rc;
}
