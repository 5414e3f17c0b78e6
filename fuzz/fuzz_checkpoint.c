/* A checkpoint directory: the input is the files of one directory joined by
 * MOE_FUZZ_SEP, in the order of FILES below (missing trailing parts are empty
 * files). It is loaded the way `moe train --resume` and `moe generate` do:
 * moe_model_load (config.json + model.safetensors), moe_trainer_load_state
 * (optimizer.safetensors) and moe_tokenizer_load (tokenizer.json).
 * train_state.json has a target of its own (fuzz_train_state.c).
 * No cap on the declared model size is needed: moe_model_load checks that
 * model.safetensors can hold the parameters before it allocates them, so the
 * memory an input costs is bounded by its size. */
#include "fuzz.h"
#include "moe.h"
#include "tokenizer/tokenizer.h"

#include <stdio.h>
#include <string.h>

static const char *const FILES[] = {"config.json", "model.safetensors", "optimizer.safetensors",
                                    "tokenizer.json"};
#define N_FILES 4

MOE_FUZZ_TARGET(checkpoint) {
    const uint8_t *part[N_FILES];
    size_t len[N_FILES];
    moe_fuzz_split(data, size, N_FILES, part, len);
    for (int i = 0; i < N_FILES; i++)
        if (!moe_fuzz_write(i, FILES[i], part[i], len[i])) return -1;
    char err[256];
    const char *dir = moe_fuzz_tmpdir();
    moe_model *m;
    int rc = moe_model_load(dir, 1, 4, 1, 1, &m, err, sizeof err);
    if (rc) return rc;
    moe_train_config tc = {.batch = 1, .seq = 2, .grad_accum = 1, .eval_batches = 1, .seed = 1, .n_threads = 1,
                           .opt = moe_adamw_config_default()};
    static const int32_t toks[8] = {0, 1, 0, 1, 0, 1, 0, 1};
    moe_trainer *t = moe_trainer_create(m, &tc, toks, 8, NULL, 0, &rc, err, sizeof err);
    if (t) {
        rc = moe_trainer_load_state(t, dir, err, sizeof err);
        moe_trainer_free(t);
    }
    moe_model_free(m);
    char tpath[512];
    snprintf(tpath, sizeof tpath, "%s/tokenizer.json", dir);
    moe_tokenizer *tok;
    if (moe_tokenizer_load(tpath, &tok, err, sizeof err) == 0) moe_tokenizer_free(tok);
    return rc;
}
