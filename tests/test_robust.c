/* Numerics of training (docs/robustness.md): a NaN weight fails the step
 * with the layer and tensor named and nothing changed, or (skip policy) the
 * update is dropped and counted and a resume across the skip stays exact;
 * NaN weights are refused on load; loss spikes follow the documented EMA
 * rule; top-k ranks NaN as -Inf. */
#include "test.h"

#include "layer/layer_impl.h"
#include "io/atomic.h"
#include "io/safetensors.h"
#include "robust_fixture.h"
#include "train/numerics.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *W2 = "model.layers.1.block_sparse_moe.experts.2.w2.weight";

/* Poisons element 5 of W2 (layer 1, expert 2); returns its old value. */
static float poison(moe_model *m, float v) {
    const moe_param_info *pi = moe_model_find_tensor(m, W2);
    float *p = moe_model_params(m) + pi->offset + 5, old = *p;
    *p = v;
    return old;
}

TEST(robust_nan_weight_fails_the_step_naming_layer_and_tensor) {
    rb_fix f;
    CHECK(rb_fix_create(&f, MOE_NAN_ERROR, 0) == 0);
    moe_train_step_info si;
    CHECK(moe_trainer_step(f.t, &si) == 0);
    poison(f.m, NAN);
    float *before = rb_params_copy(f.m);
    const int rc = moe_trainer_step(f.t, &si);
    CHECK_EQ_INT(rc, MOE_ENONFINITE);
    const char *msg = moe_trainer_errmsg(f.t);
    CHECK_MSG(strstr(msg, "layer 1 experts.2.w2") && strstr(msg, W2) && strstr(msg, "[0][5] = nan"), "%s", msg);
    if (getenv("MOE_TEST_VERBOSE")) printf("    %s\n", msg);
    CHECK(rb_params_equal(f.m, before));
    CHECK_EQ_INT(moe_trainer_get_step(f.t), 1);
    free(before);
    rb_fix_free(&f);
}

TEST(robust_overflow_without_bad_weight_is_reported) {
    /* a huge but finite weight: the forward overflows; no weight is
     * non-finite, so the symptom (the loss) is what the message gives */
    rb_fix f;
    CHECK(rb_fix_create(&f, MOE_NAN_ERROR, 0) == 0);
    const moe_param_info *pi = moe_model_find_tensor(f.m, "model.norm.weight");
    moe_model_params(f.m)[pi->offset + 3] = 3e38f;
    moe_train_step_info si;
    const int rc = moe_trainer_step(f.t, &si);
    CHECK_EQ_INT(rc, MOE_ENONFINITE);
    const char *msg = moe_trainer_errmsg(f.t);
    CHECK_MSG(strstr(msg, "step 0: ") && strstr(msg, "loss is") && !strstr(msg, "weight in") &&
                  strstr(msg, "the largest is norm (model.norm.weight) [3] = 3e+38"),
              "%s", msg);
    rb_fix_free(&f);
}

TEST(robust_bad_gradient_closest_to_the_loss_is_named) {
    rb_fix f;
    CHECK(rb_fix_create(&f, MOE_NAN_ERROR, 0) == 0);
    float *g = moe_model_grads(f.m);
    memset(g, 0, sizeof(float) * moe_model_n_params(f.m));
    const moe_param_info *early = moe_model_find_tensor(f.m, "model.layers.0.block_sparse_moe.experts.1.w1.weight");
    const moe_param_info *late = moe_model_find_tensor(f.m, W2);
    g[early->offset + 2] = NAN;
    g[late->offset + 24 + 7] = INFINITY; /* w2 is [C][F] = [32][24]: row 1, column 7 */
    size_t at;
    int i = moe__find_nonfinite(f.m, g, 1, &at);
    CHECK(i >= 0 && moe_model_tensor(f.m, i) == late && at == 31);
    char buf[320];
    moe__describe_value(f.m, i, at, g[late->offset + at], buf, sizeof buf);
    CHECK_MSG(!strcmp(buf, "layer 1 experts.2.w2 (model.layers.1.block_sparse_moe.experts.2.w2.weight) [1][7] = inf"),
              "%s", buf);
    i = moe__find_nonfinite(f.m, g, 0, &at); /* forward order: the early one */
    CHECK(i >= 0 && moe_model_tensor(f.m, i) == early && at == 2);
    g[early->offset + 2] = 0, g[late->offset + 31] = 0;
    CHECK_EQ_INT(moe__find_nonfinite(f.m, g, 1, &at), -1);
    rb_fix_free(&f);
}

TEST(robust_skip_policy_counts_skips_and_resume_stays_exact) {
    char dir[64], err[512];
    if (!moe_test_tmpdir(dir, "robust")) return;
    rb_fix a, b;
    CHECK(rb_fix_create(&a, MOE_NAN_SKIP, 0) == 0);
    moe_train_step_info si;
    for (int i = 0; i < 2; i++) CHECK(moe_trainer_step(a.t, &si) == 0);
    const float old = poison(a.m, INFINITY);
    float *before = rb_params_copy(a.m);
    CHECK(moe_trainer_step(a.t, &si) == 0);
    CHECK(si.skipped == 1 && si.n_skipped == 1 && si.step == 2);
    CHECK_MSG(strstr(moe_trainer_errmsg(a.t), W2) != NULL, "%s", moe_trainer_errmsg(a.t));
    CHECK(rb_params_equal(a.m, before));
    poison(a.m, old);
    CHECK(moe_trainer_save(a.t, dir, err, sizeof err) == 0); /* right after the skip */
    for (int i = 0; i < 3; i++) CHECK(moe_trainer_step(a.t, &si) == 0);
    CHECK(si.step == 5 && si.n_skipped == 1 && !si.skipped);
    /* resume from the checkpoint: the same 3 steps give the same weights */
    moe_model *m = NULL;
    CHECK(rb_fix_create(&b, MOE_NAN_SKIP, 0) == 0);
    CHECK_MSG(moe_model_load(dir, 2, 16, 1, 1, &m, err, sizeof err) == 0, "%s", err);
    memcpy(moe_model_params(b.m), moe_model_params(m), sizeof(float) * moe_model_n_params(m));
    CHECK_MSG(moe_trainer_load_state(b.t, dir, err, sizeof err) == 0, "%s", err);
    moe_train_step_info sb;
    for (int i = 0; i < 3; i++) CHECK(moe_trainer_step(b.t, &sb) == 0);
    CHECK(sb.step == 5 && sb.n_skipped == 1);
    CHECK(rb_params_equal(b.m, moe_model_params(a.m)));
    CHECK(sb.loss_ema == si.loss_ema && sb.loss_ema > 0); /* the spike EMA is checkpointed exactly */
    /* a weight that stays bad: MOE_MAX_CONSECUTIVE_SKIPS skips, then an error */
    poison(a.m, NAN);
    int skips = 0, rc = 0;
    while (!(rc = moe_trainer_step(a.t, &si)) && si.skipped && skips < 100) skips++;
    CHECK_EQ_INT(skips, MOE_MAX_CONSECUTIVE_SKIPS);
    CHECK_EQ_INT(rc, MOE_ENONFINITE);
    CHECK_MSG(strstr(moe_trainer_errmsg(a.t), "after 10 skipped updates in a row") != NULL, "%s", moe_trainer_errmsg(a.t));
    moe_model_free(m);
    free(before);
    rb_fix_free(&a), rb_fix_free(&b);
    moe_test_rmdir(dir);
}

/* model.safetensors of m's parameters as they are (NaN too), through the
 * safetensors writer: a file the checked saver would refuse to write. */
static int write_model_unchecked(const moe_model *m, const char *dir) {
    char path[128], err[256];
    const int n = moe_model_n_tensors(m);
    moe__st_out *t = calloc((size_t)n, sizeof *t);
    if (!t) return -1;
    for (int i = 0; i < n; i++) {
        const moe_param_info *pi = moe_model_tensor(m, i);
        t[i].name = pi->name, t[i].dtype = MOE__DT_F32, t[i].ndim = pi->ndim;
        for (int d = 0; d < pi->ndim; d++) t[i].shape[d] = pi->shape[d];
        t[i].data = moe_model_params((moe_model *)m) + pi->offset;
    }
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    const int rc = moe__st_write(path, t, n, NULL, err, sizeof err);
    free(t);
    return rc;
}

TEST(robust_load_refuses_nan_weights_naming_the_tensor) {
    char dir[64], err[512];
    if (!moe_test_tmpdir(dir, "robust")) return;
    rb_fix f;
    CHECK(rb_fix_create(&f, MOE_NAN_ERROR, 0) == 0);
    CHECK(moe_model_save(f.m, dir, err, sizeof err) == 0); /* finite: saved */
    char path[128];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    char *before;
    size_t nb;
    CHECK(moe__read_file(path, 1u << 26, &before, &nb, err, sizeof err) == 0);
    poison(f.m, NAN);
    /* the saver refuses to write it, naming the tensor, and the saved model stays */
    CHECK_EQ_INT(moe_model_save(f.m, dir, err, sizeof err), MOE_ENONFINITE);
    CHECK_MSG(strstr(err, "not saved") && strstr(err, "layer 1 experts.2.w2"), "%s", err);
    char *after;
    size_t na;
    CHECK(moe__read_file(path, 1u << 26, &after, &na, err, sizeof err) == 0);
    CHECK(na == nb && !memcmp(before, after, nb));
    moe__free(before), moe__free(after);
    CHECK(!rb_has_leftovers(dir));
    /* a file written by something else: the loader refuses it */
    CHECK(write_model_unchecked(f.m, dir) == 0);
    moe_model *m = NULL;
    const int rc = moe_model_load(dir, 2, 16, 0, 1, &m, err, sizeof err);
    CHECK_EQ_INT(rc, MOE_ENONFINITE);
    CHECK(m == NULL);
    CHECK_MSG(strstr(err, "model.safetensors") && strstr(err, "layer 1 experts.2.w2") && strstr(err, W2), "%s", err);
    rb_fix_free(&f);
    moe_test_rmdir(dir);
}

TEST(robust_loss_spike_rule) {
    rb_fix f;
    CHECK(rb_fix_create(&f, MOE_NAN_ERROR, 0) == 0); /* factor 0: the default 2 */
    moe_train_step_info si;
    double ema = 0;
    for (int i = 0; i < 25; i++) {
        CHECK(moe_trainer_step(f.t, &si) == 0);
        CHECK_CLOSE(si.loss_ema, ema, 0, 1e-5);
        CHECK_EQ_INT(si.spike, 0);
        ema = i ? 0.98 * ema + 0.02 * si.loss : si.loss;
    }
    /* scale the output head: the logits grow 40x and the loss jumps */
    const moe_param_info *pi = moe_model_find_tensor(f.m, "lm_head.weight");
    float *p = moe_model_params(f.m) + pi->offset;
    for (size_t i = 0; i < pi->numel; i++) p[i] *= 40;
    CHECK(moe_trainer_step(f.t, &si) == 0);
    CHECK_MSG(si.loss > 2 * ema, "loss %g, ema %g: the test needs a bigger jump", si.loss, ema);
    CHECK_CLOSE(si.loss_ema, ema, 0, 1e-5);
    CHECK_EQ_INT(si.spike, 1);
    CHECK_EQ_INT(si.n_spikes, 1);
    rb_fix_free(&f);
    /* off: no report for the same jump */
    CHECK(rb_fix_create(&f, MOE_NAN_ERROR, -1) == 0);
    for (int i = 0; i < 25; i++) CHECK(moe_trainer_step(f.t, &si) == 0);
    pi = moe_model_find_tensor(f.m, "lm_head.weight");
    p = moe_model_params(f.m) + pi->offset;
    for (size_t i = 0; i < pi->numel; i++) p[i] *= 40;
    CHECK(moe_trainer_step(f.t, &si) == 0);
    CHECK_EQ_INT(si.spike, 0);
    rb_fix_free(&f);
}

TEST(robust_topk_ranks_nan_as_minus_inf) {
    const float v[] = {1, NAN, 3, NAN, 2, -INFINITY};
    int ids[6];
    moe__topk(v, 1, 0, 6, 3, ids);
    CHECK(ids[0] == 2 && ids[1] == 4 && ids[2] == 0);
    moe__topk(v, 1, 0, 6, 6, ids); /* NaN ties with -Inf: the lower index first */
    CHECK(ids[0] == 2 && ids[1] == 4 && ids[2] == 0 && ids[3] == 1 && ids[4] == 3 && ids[5] == 5);
    const float w[] = {NAN, NAN, NAN, 0.5f};
    moe__topk(w, 1, 0, 4, 2, ids);
    CHECK(ids[0] == 3 && ids[1] == 0);
}
