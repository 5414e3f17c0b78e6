/* moe_trainer_load_state is all or nothing: an optimizer.safetensors that
 * fails anywhere (a tensor of the wrong shape, a NaN or negative moment, a
 * missing tensor, bad metadata read after every tensor) leaves the trainer's
 * state bit-identical to before. The state is compared through what a save
 * writes (optimizer.safetensors: moments, step, sampler RNG, tokens, numerics
 * counters), so every field a resume restores is covered. */
#include "test.h"

#include "internal.h"
#include "io/atomic.h"
#include "io/safetensors.h"
#include "robust_fixture.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* The bytes of dir/optimizer.safetensors (caller frees with moe__free). */
static char *opt_bytes(const char *dir, size_t *n) {
    char p[700], err[256], *buf = NULL;
    snprintf(p, sizeof p, "%s/optimizer.safetensors", dir);
    if (moe__read_file(p, 1u << 28, &buf, n, err, sizeof err)) return NULL;
    return buf;
}

/* Saves t into a new directory base/tag and returns its optimizer bytes. */
static char *state_of(moe_trainer *t, const char *base, const char *tag, size_t *n) {
    char dir[600], err[512];
    snprintf(dir, sizeof dir, "%s/%s", base, tag);
    if (mkdir(dir, 0777) || moe_trainer_save(t, dir, err, sizeof err)) return NULL;
    return opt_bytes(dir, n);
}

enum { WRONG_SHAPE, NAN_M, NEGATIVE_V, MISSING_V, BAD_RNG, BAD_LOSS_EMA, INT_MOMENT, N_CASES };
static const char *const CASE_NAME[N_CASES] = {"wrong-shape", "nan-m", "negative-v", "missing-v",
                                               "bad-rng", "bad-loss-ema", "int-moment"};

/* Rewrites src (a valid optimizer.safetensors) into dst with one defect:
 * m5 is the 5th tensor the loader reads ("m." + the model's 5th tensor),
 * vlast the last one. */
static int corrupt(const char *src, const char *dst, int kind, const char *m5, const char *vlast) {
    char err[512];
    moe__st_file *f;
    if (moe__st_open(src, &f, err, sizeof err)) return -1;
    const int n = moe__st_count(f), nm = moe__st_meta_count(f);
    moe__st_out *outs = calloc((size_t)n, sizeof *outs);
    const char **meta = calloc(2 * (size_t)nm + 1, sizeof *meta);
    float *copy = NULL;
    int32_t *ints = NULL;
    int k = 0, rc = -1;
    for (int i = 0; i < n; i++) {
        const moe__st_tensor *t = moe__st_get(f, i);
        if (kind == MISSING_V && !strcmp(t->name, vlast)) continue;
        moe__st_out *o = &outs[k++];
        o->name = t->name, o->dtype = t->dtype, o->ndim = t->ndim, o->data = t->data;
        memcpy(o->shape, t->shape, sizeof o->shape);
        const int hit = !strcmp(t->name, kind == NEGATIVE_V ? vlast : m5);
        if (!hit || kind == MISSING_V || kind == BAD_RNG || kind == BAD_LOSS_EMA) continue;
        copy = malloc(t->nbytes);
        memcpy(copy, t->data, t->nbytes);
        o->data = copy;
        if (kind == WRONG_SHAPE) o->shape[o->ndim - 1]--; /* the data shrinks with it */
        if (kind == NAN_M) copy[3] = NAN;
        if (kind == NEGATIVE_V) copy[t->numel - 1] = -1e-8f;
        if (kind == INT_MOMENT) {
            ints = calloc(t->numel, sizeof *ints);
            o->dtype = MOE__DT_I32, o->data = ints;
        }
    }
    for (int i = 0; i < nm; i++) {
        moe__st_meta_at(f, i, &meta[2 * i], &meta[2 * i + 1]);
        if (kind == BAD_RNG && !strcmp(meta[2 * i], "rng2")) meta[2 * i + 1] = "00000000000000zz";
        if (kind == BAD_LOSS_EMA && !strcmp(meta[2 * i], "loss_ema")) meta[2 * i + 1] = "nan";
    }
    if (outs && meta) rc = moe__st_write(dst, outs, k, meta, err, sizeof err);
    free(copy), free(ints), free(outs), free(meta);
    moe__st_close(f);
    return rc;
}

TEST(load_state_failure_leaves_the_trainer_unchanged) {
    char base[64], src[600], bad[600], path[700], err[512];
    if (!moe_test_tmpdir(base, "loadstate")) return;
    rb_fix a, b;
    moe_train_step_info si;
    /* a: the checkpoint to load (step 3, numerics counters set); b: the
     * trainer with a known, different state (step 1) */
    CHECK(rb_fix_create(&a, MOE_NAN_ERROR, 0) == 0 && rb_fix_create(&b, MOE_NAN_ERROR, 0) == 0);
    for (int i = 0; i < 3; i++) CHECK(moe_trainer_step(a.t, &si) == 0);
    CHECK(moe_trainer_step(b.t, &si) == 0);
    snprintf(src, sizeof src, "%s/src", base);
    CHECK_MSG(moe_trainer_save(a.t, src, err, sizeof err) == 0, "%s", err);
    size_t n_ref = 0, n_src = 0, n;
    char *ref = state_of(b.t, base, "ref", &n_ref);
    snprintf(path, sizeof path, "%s/optimizer.safetensors", src);
    char *want = opt_bytes(src, &n_src);
    CHECK(ref && want && (n_ref != n_src || memcmp(ref, want, n_ref))); /* the states differ */

    const int nt = moe_model_n_tensors(b.m);
    char m5[128], vlast[128];
    snprintf(m5, sizeof m5, "m.%s", moe_model_tensor(b.m, 4)->name);
    snprintf(vlast, sizeof vlast, "v.%s", moe_model_tensor(b.m, nt - 1)->name);
    const char *named[N_CASES] = {m5, m5, vlast, vlast, "rng2", "loss_ema", m5};
    for (int kind = 0; kind < N_CASES; kind++) {
        snprintf(bad, sizeof bad, "%s/%s", base, CASE_NAME[kind]);
        CHECK(mkdir(bad, 0777) == 0);
        char dst[800];
        snprintf(dst, sizeof dst, "%s/optimizer.safetensors", bad);
        CHECK_MSG(corrupt(path, dst, kind, m5, vlast) == 0, "%s: corrupt", CASE_NAME[kind]);
        const int rc = moe_trainer_load_state(b.t, bad, err, sizeof err);
        CHECK_MSG(rc == MOE_EFORMAT, "%s: rc %d (%s)", CASE_NAME[kind], rc, err);
        CHECK_MSG(strstr(err, "optimizer.safetensors") && strstr(err, named[kind]), "%s: %s", CASE_NAME[kind], err);
        char tag[64];
        snprintf(tag, sizeof tag, "after-%s", CASE_NAME[kind]);
        char *after = state_of(b.t, base, tag, &n);
        CHECK_MSG(after && n == n_ref && !memcmp(after, ref, n), "%s: the failed load changed the state",
                  CASE_NAME[kind]);
        moe__free(after);
    }
    /* the intact file loads, and then the state is exactly the checkpoint's */
    CHECK_MSG(moe_trainer_load_state(b.t, src, err, sizeof err) == 0, "%s", err);
    char *got = state_of(b.t, base, "loaded", &n);
    CHECK(got && n == n_src && !memcmp(got, want, n));
    CHECK_EQ_INT(moe_trainer_get_step(b.t), 3);
    moe__free(got), moe__free(ref), moe__free(want);
    rb_fix_free(&a), rb_fix_free(&b);
    moe_test_rmdir(base);
}
