/* The expert-parallel model and trainer against one process on the same
 * global batch: P ranks with batch G/P each against one process with batch G
 * (the oracle: the single-process trainer, itself tested against PyTorch).
 * Both start from the same seed; every rank compares its tensors by name
 * (experts by global id), the losses and gradient norms of 20 steps, the
 * validation loss and the final parameters. The checkpoint pair saves with
 * one P and resumes with another. */
#include "mpi_test.h"

#include <moe.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GLOBAL_B 8 /* windows per global batch: divisible by P = 1, 2, 4 */
#define SEQ 16
#define STEPS 20
#define NTOK 6000

static int32_t tokens[NTOK];
static float g_capacity; /* the MoE layers' capacity factor (0: dropless) */
static int g_expert_choice; /* the MoE layers route by expert choice */

/* random: no repeated (token, context) pairs, so no two tokens of a batch
 * tie in the router scores (see the expert-choice run) */
static void make_data_ex(int random) {
    uint64_t s = 99;
    for (int i = 0; i < NTOK; i++) { /* a learnable pattern with noise */
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        tokens[i] = (int32_t)(random ? (int)((s >> 33) % 64) : (i * 7 + (int)((s >> 33) % 5)) % 64);
    }
}
static void make_data(void) { make_data_ex(0); }

static moe_model_config tiny(void) {
    moe_model_config c;
    moe_model_preset("tiny", &c);
    c.vocab_size = 64;
    c.router_bias_update_rate = 0.001f; /* global loads move the bias alike on every rank */
    c.capacity_factor = g_capacity;
    if (g_expert_choice) c.router_type = MOE_ROUTER_EXPERT_CHOICE, c.router_bias_update_rate = 0;
    return c;
}

static moe_train_config tcfg(int B, moe_nan_policy pol) {
    moe_train_config tc;
    memset(&tc, 0, sizeof tc);
    tc.nan_policy = pol;
    tc.batch = B, tc.seq = SEQ, tc.grad_accum = 1, tc.eval_batches = 1, tc.seed = 5, tc.n_threads = 1;
    tc.opt = moe_adamw_config_default();
    tc.opt.max_steps = STEPS;
    tc.opt.warmup_steps = 2;
    return tc;
}

/* A model and its trainer: dist NULL gives the single-process reference. */
typedef struct run {
    moe_model *m;
    moe_trainer *t;
} run;

static int make_run(run *r, moe_dist *d, int B, const char *load_dir, moe_nan_policy pol) {
    int err;
    char msg[256];
    moe_model_config c = tiny();
    moe_set_dist(d);
    r->m = NULL;
    if (load_dir) {
        err = moe_model_load(load_dir, B, SEQ, 1, 1, &r->m, msg, sizeof msg);
    } else {
        r->m = moe_model_create(&c, B, SEQ, 1, 1, &err, msg, sizeof msg);
        if (r->m) moe_model_init(r->m, 11);
    }
    moe_set_dist(NULL);
    MT_CHECK(r->m != NULL, "model (B %d): %s", B, msg);
    if (!r->m) return -1;
    moe_train_config tc = tcfg(B, pol);
    const int nval = 1000;
    r->t = moe_trainer_create(r->m, &tc, tokens, NTOK - nval, tokens + NTOK - nval, nval, &err, msg, sizeof msg);
    MT_CHECK(r->t != NULL, "trainer: %s", msg);
    if (load_dir && r->t) {
        err = moe_trainer_load_state(r->t, load_dir, msg, sizeof msg);
        MT_CHECK(err == 0, "load state: %s", msg);
    }
    return r->t ? 0 : -1;
}

static void free_run(run *r) {
    moe_trainer_free(r->t);
    moe_model_free(r->m);
}

/* Every tensor of the rank's model against the reference's tensor of the same name. */
static void cmp_models(const char *what, moe_model *ep, moe_model *ref, double atol, double rtol) {
    const float *pe = moe_model_params(ep), *pr = moe_model_params(ref);
    int bad = 0;
    double worst = 0;
    for (int i = 0; i < moe_model_n_tensors(ep) && bad < 3; i++) {
        const moe_param_info *te = moe_model_tensor(ep, i);
        const moe_param_info *tr = moe_model_find_tensor(ref, te->name);
        MT_CHECK(tr && tr->numel == te->numel, "%s: tensor %s missing in the reference", what, te->name);
        if (!tr || tr->numel != te->numel) return;
        for (size_t j = 0; j < te->numel; j++) {
            const double a = pe[te->offset + j], b = pr[tr->offset + j];
            if (fabs(a - b) > worst) worst = fabs(a - b);
            if (!mt_close(a, b, atol, rtol)) {
                MT_CHECK(0, "%s: %s[%zu] %.9g vs %.9g", what, te->name, j, a, b);
                bad++;
                break;
            }
        }
    }
    if (mt_rank == 0) printf("  %s: largest difference %.3g\n", what, worst);
}

static void step_both(run *ep, run *ref, int step, float *ref_loss) {
    moe_train_step_info ie, ir;
    int rc = moe_trainer_step(ep->t, &ie);
    MT_CHECK(rc == 0, "ep step %d: %s", step, moe_trainer_errmsg(ep->t));
    if (ref) {
        rc = moe_trainer_step(ref->t, &ir);
        MT_CHECK(rc == 0, "ref step %d: %s", step, moe_trainer_errmsg(ref->t));
        MT_CHECK(mt_close(ie.loss, ir.loss, 1e-6, 1e-5) && mt_close(ie.aux, ir.aux, 1e-7, 1e-4),
                 "step %d: loss %.9g vs %.9g, aux %.9g vs %.9g", step, ie.loss, ir.loss, ie.aux, ir.aux);
        MT_CHECK(mt_close(ie.grad_norm, ir.grad_norm, 1e-6, 1e-4), "step %d: grad norm %.9g vs %.9g", step,
                 ie.grad_norm, ir.grad_norm);
        MT_CHECK(ie.tokens == ir.tokens, "step %d: tokens %.0f vs %.0f", step, ie.tokens, ir.tokens);
        if (ref_loss) *ref_loss = ir.loss;
    } else if (ref_loss) {
        MT_CHECK(mt_close(ie.loss, *ref_loss, 1e-6, 1e-5), "resumed step %d: loss %.9g vs uninterrupted %.9g",
                 step, ie.loss, *ref_loss);
    }
}

/* 20 steps with P ranks against one process, then the validation loss. */
void mt_train_tests(moe_dist *d) {
    make_data();
    const int P = moe_dist_size(d), B = GLOBAL_B / P;
    run ep, ref;
    if (make_run(&ep, d, B, NULL, MOE_NAN_ERROR) || make_run(&ref, NULL, GLOBAL_B, NULL, MOE_NAN_ERROR)) return;
    cmp_models("init", ep.m, ref.m, 0, 0); /* the same draws: bit-identical */
    for (int s = 0; s < STEPS; s++) step_both(&ep, &ref, s, NULL);
    cmp_models("after 20 steps", ep.m, ref.m, 1e-5, 1e-4);
    float ve, vr;
    int rc = moe_trainer_eval(ep.t, &ve);
    rc |= moe_trainer_eval(ref.t, &vr);
    MT_CHECK(rc == 0 && mt_close(ve, vr, 1e-6, 1e-5), "val loss %.9g vs %.9g", ve, vr);
    if (mt_rank == 0) printf("train P=%d: %d steps, val loss %.6f (one process %.6f)\n", P, STEPS, ve, vr);
    free_run(&ep);
    free_run(&ref);
    /* a capacity limit (the drops of the global batch in global token
     * order), then expert choice (each expert's tokens of the global batch) */
    for (int v = 0; v < 2; v++) {
    g_capacity = v == 0 ? 1.0f : 0.0f, g_expert_choice = v == 1;
    make_data_ex(v == 1);
    if (make_run(&ep, d, B, NULL, MOE_NAN_ERROR) || make_run(&ref, NULL, GLOBAL_B, NULL, MOE_NAN_ERROR)) return;
    double drops = 0;
    for (int s = 0; s < STEPS / 2; s++) {
        step_both(&ep, &ref, s, NULL);
        for (int l = 0; l < moe_model_get_config(ref.m)->num_hidden_layers; l++) {
            const moe_layer_stats *se = moe_model_layer_stats(ep.m, l), *sr = moe_model_layer_stats(ref.m, l);
            if (!se || !sr) continue;
            MT_CHECK(se->capacity == sr->capacity && se->dropped_fraction == sr->dropped_fraction,
                     "capacity step %d layer %d: capacity %d dropped %.9g vs %d %.9g", s, l, se->capacity,
                     se->dropped_fraction, sr->capacity, sr->dropped_fraction);
            drops += sr->dropped_fraction;
        }
    }
    const char *what = v == 0 ? "capacity 1.0" : "expert choice";
    /* Expert choice ranks tokens against the whole batch: on the patterned
     * data, tokens with equal scores (a repeated token and context) split
     * over ranks differ in the last bit (the router GEMM sees other rows)
     * and can swap places at an expert's cut (parameters then drift by
     * ~3e-5): so that run uses random tokens */
    if (v == 0) MT_CHECK(drops > 0, "%s: no drops in %d steps", what, STEPS / 2);
    cmp_models(what, ep.m, ref.m, 1e-5, 1e-4);
    if (mt_rank == 0) printf("train P=%d %s: %d steps match, mean dropped fraction %.4f\n", P, what, STEPS / 2,
                             drops / (STEPS / 2) / moe_model_get_config(ref.m)->num_hidden_layers);
    free_run(&ep);
    free_run(&ref);
    }
    g_capacity = 0, g_expert_choice = 0;
    make_data();
}

/* save DIR: STEPS/2 steps on P ranks, then a checkpoint. */
void mt_ckpt_save(moe_dist *d, const char *dir) {
    make_data();
    const int P = moe_dist_size(d);
    run ep;
    if (make_run(&ep, d, GLOBAL_B / P, NULL, MOE_NAN_ERROR)) return;
    for (int s = 0; s < STEPS / 2; s++) step_both(&ep, NULL, s, NULL);
    char msg[256];
    int rc = moe_trainer_save(ep.t, dir, msg, sizeof msg);
    MT_CHECK(rc == 0, "save: %s", msg);
    if (mt_rank == 0) printf("saved %s after %d steps on %d ranks\n", dir, STEPS / 2, P);
    free_run(&ep);
}

/* resume DIR: the other half on this P; losses against one process that ran
 * all STEPS without stopping. */
void mt_ckpt_resume(moe_dist *d, const char *dir) {
    make_data();
    const int P = moe_dist_size(d);
    run ep, ref;
    if (make_run(&ref, NULL, GLOBAL_B, NULL, MOE_NAN_ERROR)) return;
    float want[STEPS];
    for (int s = 0; s < STEPS; s++) {
        moe_train_step_info ir;
        MT_CHECK(moe_trainer_step(ref.t, &ir) == 0, "ref step %d", s);
        want[s] = ir.loss;
    }
    if (make_run(&ep, d, GLOBAL_B / P, dir, MOE_NAN_ERROR)) return;
    MT_CHECK(moe_trainer_get_step(ep.t) == STEPS / 2, "resumed at step %d", moe_trainer_get_step(ep.t));
    for (int s = STEPS / 2; s < STEPS; s++) step_both(&ep, NULL, s, &want[s]);
    cmp_models("resumed vs uninterrupted", ep.m, ref.m, 1e-5, 1e-4);
    if (mt_rank == 0) printf("resumed %s on %d ranks: %d steps match\n", dir, P, STEPS / 2);
    free_run(&ep);
    free_run(&ref);
}

/* A NaN on one rank only, under the skip policy: its copy of the last MoE
 * layer's router weight (replicated, so only that rank's logits go bad).
 * Every rank must skip the same update (the layer fails on every rank and the
 * trainer agrees on the code; ranks deciding apart would hang in the next
 * collective), the router loads the earlier layers counted in the skipped
 * forward are dropped on every rank, and once the weight is repaired the run
 * goes on as one process that skipped the same step: same losses, same
 * parameters and biases. */
void mt_train_nan_skip(moe_dist *d) {
    make_data();
    const int P = moe_dist_size(d);
    run ep, ref;
    if (make_run(&ep, d, GLOBAL_B / P, NULL, MOE_NAN_SKIP) || make_run(&ref, NULL, GLOBAL_B, NULL, MOE_NAN_SKIP))
        return;
    for (int s = 0; s < 3; s++) step_both(&ep, &ref, s, NULL);
    const moe_param_info *ge = NULL, *gr = NULL;
    for (int i = 0; i < moe_model_n_tensors(ep.m); i++)
        if (strstr(moe_model_tensor(ep.m, i)->name, "block_sparse_moe.gate.weight")) ge = moe_model_tensor(ep.m, i);
    MT_CHECK(ge && ge != moe_model_find_tensor(ep.m, "model.layers.0.block_sparse_moe.gate.weight"),
             "no MoE layer after the first");
    if (!ge) return;
    gr = moe_model_find_tensor(ref.m, ge->name);
    float *pe = moe_model_params(ep.m) + ge->offset, *pr = moe_model_params(ref.m) + gr->offset;
    const float keep_e = pe[7], keep_r = pr[7];
    if (mt_rank == mt_size - 1) pe[7] = NAN;
    pr[7] = NAN;
    moe_train_step_info ie, ir;
    int rc = moe_trainer_step(ep.t, &ie);
    MT_CHECK(rc == 0 && ie.skipped == 1 && ie.n_skipped == 1, "NaN on rank %d: step returned %d, skipped %d (%s)",
             mt_size - 1, rc, ie.skipped, moe_trainer_errmsg(ep.t));
    rc = moe_trainer_step(ref.t, &ir);
    MT_CHECK(rc == 0 && ir.skipped == 1, "reference: step returned %d, skipped %d", rc, ir.skipped);
    MT_CHECK(moe_trainer_get_step(ep.t) == 3, "skipped step advanced to %d", moe_trainer_get_step(ep.t));
    pe[7] = keep_e, pr[7] = keep_r;
    for (int s = 3; s < 8; s++) step_both(&ep, &ref, s, NULL);
    cmp_models("after a NaN skipped on one rank", ep.m, ref.m, 1e-5, 1e-4);
    if (mt_rank == 0) printf("NaN on rank %d of %d, skip policy: every rank skipped, 5 steps match\n", mt_size - 1, P);
    free_run(&ep);
    free_run(&ref);
}

/* A bad token on one rank fails the forward on every rank (no rank is left
 * waiting in a collective), and the model works afterwards. */
void mt_model_bad_batch(moe_dist *d) {
    moe_model_config c = tiny();
    int err;
    char msg[256];
    moe_set_dist(d);
    moe_model *m = moe_model_create(&c, 1, SEQ, 1, 1, &err, msg, sizeof msg);
    moe_set_dist(NULL);
    MT_CHECK(m != NULL, "model: %s", msg);
    if (!m) return;
    moe_model_init(m, 1);
    int32_t tok[SEQ], tgt[SEQ];
    for (int i = 0; i < SEQ; i++) tok[i] = i, tgt[i] = i + 1;
    if (mt_rank == mt_size - 1) tok[3] = 1000;
    float loss;
    int rc = moe_model_forward(m, tok, tgt, 1, SEQ, &loss);
    MT_CHECK(rc == MOE_EINVAL, "bad token on the last rank: forward returned %d (%s)", rc, moe_model_errmsg(m));
    tok[3] = 3;
    rc = moe_model_forward(m, tok, tgt, 1, SEQ, &loss);
    MT_CHECK(rc == 0 && isfinite(loss), "forward after the failure: %s", moe_model_errmsg(m));
    moe_model_free(m);
}

/* Serving: decoding with the experts spread over the ranks (every rank feeds
 * the same token) gives the single-process logits. */
void mt_model_decode(moe_dist *d) {
    moe_model_config c = tiny();
    int err;
    char msg[256];
    moe_model *m[2];
    for (int k = 0; k < 2; k++) {
        moe_set_dist(k ? d : NULL);
        m[k] = moe_model_create(&c, 1, SEQ, 0, 1, &err, msg, sizeof msg);
        moe_set_dist(NULL);
        MT_CHECK(m[k] != NULL, "model: %s", msg);
        if (!m[k]) return;
        moe_model_init(m[k], 4);
        moe_model_decode_reset(m[k]);
    }
    double worst = 0;
    for (int pos = 0; pos < 6; pos++) {
        const float *lg[2];
        for (int k = 0; k < 2; k++) {
            int rc = moe_model_decode(m[k], (pos * 11) % 64, &lg[k]);
            MT_CHECK(rc == 0, "decode %d: %s", pos, moe_model_errmsg(m[k]));
            if (rc) return;
        }
        for (int v = 0; v < c.vocab_size; v++) {
            const double dd = fabs((double)lg[0][v] - lg[1][v]);
            if (dd > worst) worst = dd;
            if (!mt_close(lg[1][v], lg[0][v], 1e-5, 1e-5)) {
                MT_CHECK(0, "decode position %d logit %d: %.9g vs %.9g", pos, v, lg[1][v], lg[0][v]);
                break;
            }
        }
    }
    if (mt_rank == 0) printf("decode P=%d: 6 positions, largest logit difference %.3g\n", mt_size, worst);
    moe_model_free(m[0]);
    moe_model_free(m[1]);
}
