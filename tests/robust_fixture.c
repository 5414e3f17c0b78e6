#include "robust_fixture.h"

#include "internal.h"
#include "io/atomic.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *TINY =
    "{\"vocab_size\": 40, \"hidden_size\": 32, \"intermediate_size\": 24, \"num_hidden_layers\": 2,"
    " \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"max_position_embeddings\": 16,"
    " \"num_local_experts\": 4, \"num_experts_per_tok\": 2, \"initializer_range\": 0.1,"
    " \"router_bias_update_rate\": 0.01}"; /* the bias state a skipped step must not touch */

static int32_t *stream(size_t n, uint64_t seed) {
    int32_t *s = malloc(sizeof(int32_t) * n);
    for (size_t i = 0; s && i < n; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        s[i] = (seed >> 60) < 2 ? (int32_t)((seed >> 33) % 40) : (int32_t)((i * 7 + i / 13) % 40);
    }
    return s;
}

int rb_fix_create(rb_fix *f, moe_nan_policy policy, float spike_factor) {
    memset(f, 0, sizeof *f);
    char msg[256];
    moe_model_config c;
    if (moe_model_config_parse(TINY, strlen(TINY), "tiny", &c, msg, sizeof msg)) return -1;
    f->m = moe_model_create(&c, 2, 16, 1, 1, NULL, msg, sizeof msg);
    f->train = stream(3000, 1), f->val = stream(500, 2);
    if (!f->m || !f->train || !f->val) return -1;
    moe_model_init(f->m, 1);
    moe_train_config tc;
    memset(&tc, 0, sizeof tc);
    tc.batch = 2, tc.seq = 16, tc.grad_accum = 1, tc.eval_batches = 1, tc.seed = 7, tc.n_threads = 1;
    tc.opt = moe_adamw_config_default();
    tc.opt.lr = 1e-2f, tc.opt.warmup_steps = 2, tc.opt.max_steps = 100;
    tc.nan_policy = policy, tc.spike_factor = spike_factor;
    f->t = moe_trainer_create(f->m, &tc, f->train, 3000, f->val, 500, NULL, msg, sizeof msg);
    return f->t ? 0 : -1;
}

void rb_fix_free(rb_fix *f) {
    moe_trainer_free(f->t);
    moe_model_free(f->m);
    free(f->train), free(f->val);
    memset(f, 0, sizeof *f);
}

float *rb_params_copy(moe_model *m) {
    const size_t n = moe_model_n_params(m);
    float *p = malloc(sizeof(float) * n);
    if (p) memcpy(p, moe_model_params(m), sizeof(float) * n);
    return p;
}

int rb_params_equal(moe_model *m, const float *p) {
    return !memcmp(moe_model_params(m), p, sizeof(float) * moe_model_n_params(m));
}

int rb_copy_dir(const char *src, const char *dst) {
    DIR *d = opendir(src);
    if (!d) return -1;
    int rc = 0;
    for (struct dirent *e; !rc && (e = readdir(d));) {
        if (e->d_name[0] == '.') continue;
        char from[512], to[512], err[256], *buf;
        size_t n;
        snprintf(from, sizeof from, "%s/%s", src, e->d_name);
        snprintf(to, sizeof to, "%s/%s", dst, e->d_name);
        if (moe__read_file(from, 1u << 30, &buf, &n, err, sizeof err)) continue; /* not a regular file */
        moe__iov part = {buf, n};
        rc = moe__write_atomic(to, &part, 1, err, sizeof err);
        moe__free(buf);
    }
    closedir(d);
    return rc;
}

int rb_has_leftovers(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int found = 0;
    for (struct dirent *e; (e = readdir(d));) {
        const size_t n = strlen(e->d_name);
        if ((n > 4 && !strcmp(e->d_name + n - 4, ".new")) || strstr(e->d_name, ".tmp.") ||
            !strcmp(e->d_name, "checkpoint.commit"))
            found = 1;
    }
    closedir(d);
    return found;
}
