/* The Hugging Face directory loader (src/infer/model_hf.c) through
 * moe_engine_load on a directory. The input is the files of one directory
 * joined by MOE_FUZZ_SEP, in the order of FILES below: config.json and
 * model.safetensors always exist (empty when the part is missing); the index
 * and the two shards it may name exist only when their part is non-empty, so
 * that both the one-file and the sharded layout are reached. A model that
 * loads is evaluated on two tokens (n_ctx 8, n_batch 2, one thread). */
#include "fuzz.h"
#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *const FILES[] = {"config.json", "model.safetensors", "model.safetensors.index.json",
                                    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"};
#define N_FILES 5
#define N_ALWAYS 2

MOE_FUZZ_TARGET(hf_dir) {
    const uint8_t *part[N_FILES];
    size_t len[N_FILES];
    moe_fuzz_split(data, size, N_FILES, part, len);
    const char *dir = moe_fuzz_tmpdir();
    for (int i = 0; i < N_FILES; i++) {
        if (i >= N_ALWAYS && !len[i]) {
            char path[512];
            snprintf(path, sizeof path, "%s/%s", dir, FILES[i]);
            unlink(path);
        } else if (!moe_fuzz_write(i, FILES[i], part[i], len[i])) {
            return -1;
        }
    }
    moe_engine_params ep = moe_engine_params_default();
    ep.n_ctx = 8, ep.n_batch = 2, ep.n_threads = 1;
    char err[256];
    moe_engine *e;
    int rc = moe_engine_load(dir, &ep, &e, err, sizeof err);
    if (rc) return rc;
    const moe_engine_hparams *h = moe_engine_get_hparams(e);
    if (h->n_vocab <= 0 || h->n_embd <= 0 || h->n_layer <= 0 || h->n_expert_used <= 0 ||
        h->n_expert_used > h->n_expert)
        moe_fuzz_trap("hf_dir: accepted hyperparameters out of range");
    if ((double)h->n_layer * h->n_head * h->head_dim * 8 < 1e7 && (double)h->n_vocab * h->n_embd < 1e7) {
        float *logits = malloc(sizeof(float) * (size_t)h->n_vocab); /* [V] */
        if (logits) {
            const int32_t toks[2] = {0, h->n_vocab - 1};
            rc = moe_engine_eval(e, toks, 2, logits, 0);
            free(logits);
        }
    }
    moe_engine_free(e);
    return rc;
}
