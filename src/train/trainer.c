/* Training: micro-batch sampling, gradient accumulation, AdamW steps,
 * evaluation on fixed validation windows, and the state a bit-exact resume
 * needs (AdamW moments, step, sampler RNG). */
#include "dist/dist.h"
#include "io/ckpt.h"
#include "io/safetensors.h"
#include "layer/layer_impl.h"
#include "model/model_impl.h"
#include "train/numerics.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct moe_trainer {
    moe_model *m;
    moe_train_config tc;
    const int32_t *train, *val;
    size_t n_train, n_val;
    moe_adamw *opt;
    moe__rng rng;
    int32_t *tok, *tgt; /* [B][T] */
    double tokens;
    /* numerics (docs/robustness.md), kept by checkpoints */
    int n_skipped, consecutive_skips, n_spikes, n_ema;
    double loss_ema;
    char err[512];
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Settings AdamW cannot run sensibly with: a negative rate ascends the
 * loss, a floor above the peak inverts the cosine, a negative decay or clip
 * has no meaning (every value is finite here: NaN fails each comparison). */
static int check_opt(const moe_adamw_config *o, char *err, size_t errsz) {
    const char *why = NULL;
    if (!(o->lr > 0 && isfinite(o->lr))) why = "lr must be finite and above 0";
    else if (!(o->min_lr >= 0 && o->min_lr <= o->lr)) why = "min_lr must be in [0, lr]";
    else if (!(o->beta1 >= 0 && o->beta1 < 1 && o->beta2 >= 0 && o->beta2 < 1)) why = "beta1 and beta2 must be in [0, 1)";
    else if (!(o->eps > 0 && isfinite(o->eps))) why = "eps must be finite and above 0";
    else if (!(o->weight_decay >= 0 && isfinite(o->weight_decay))) why = "weight_decay must be finite, 0 or more";
    else if (!(o->grad_clip >= 0 && isfinite(o->grad_clip))) why = "grad_clip must be finite, 0 (off) or more";
    else if (o->warmup_steps < 0 || o->max_steps < 0) why = "warmup_steps and max_steps must be 0 or more";
    if (!why) return MOE_OK;
    return moe__set_err(err, errsz, MOE_EINVAL, "trainer: %s (lr %g, min_lr %g, beta1 %g, beta2 %g, eps %g, "
                        "weight_decay %g, grad_clip %g, warmup_steps %d, max_steps %d)", why, (double)o->lr,
                        (double)o->min_lr, (double)o->beta1, (double)o->beta2, (double)o->eps, (double)o->weight_decay,
                        (double)o->grad_clip, o->warmup_steps, o->max_steps);
}

moe_trainer *moe_trainer_create(moe_model *m, const moe_train_config *tc, const int32_t *train, size_t n_train,
                                const int32_t *val, size_t n_val, int *err, char *errbuf, size_t errsz) {
    int rc = MOE_OK;
    if (!m || !tc || !train || !m->has_grads)
        rc = moe__set_err(errbuf, errsz, MOE_EINVAL, "trainer: needs a model with gradients and training tokens");
    else if (tc->batch < 1 || tc->batch > m->max_B || tc->seq < 2 || tc->seq > m->max_T || tc->grad_accum < 1)
        rc = moe__set_err(errbuf, errsz, MOE_EINVAL, "trainer: batch %d x seq %d (accum %d) does not fit the model (%d x %d)",
                          tc->batch, tc->seq, tc->grad_accum, m->max_B, m->max_T);
    else if ((rc = check_opt(&tc->opt, errbuf, errsz)) || (rc = moe__check_threads(tc->n_threads, "trainer", errbuf, errsz)))
        ;
    else if (n_train < (size_t)tc->seq + 2 || (val && n_val < (size_t)tc->seq + 2))
        rc = moe__set_err(errbuf, errsz, MOE_EINVAL, "trainer: %zu training / %zu validation tokens: fewer than seq + 2",
                          n_train, n_val);
    if (rc) {
        if (err) *err = rc;
        return NULL;
    }
    moe_trainer *t = moe__calloc(1, sizeof *t);
    if (!t) goto nomem;
    t->m = m;
    t->tc = *tc;
    t->train = train, t->n_train = n_train, t->val = val, t->n_val = val ? n_val : 0;
    t->tok = moe__calloc((size_t)tc->batch * tc->seq, sizeof(int32_t));
    t->tgt = moe__calloc((size_t)tc->batch * tc->seq, sizeof(int32_t));
    t->opt = moe_adamw_create(m->n_params, &tc->opt, tc->n_threads, &rc);
    if (!t->tok || !t->tgt || !t->opt) goto nomem;
    moe__rng_seed(&t->rng, tc->seed ^ 0x5eed0da7aULL);
    if (err) *err = MOE_OK;
    return t;
nomem:
    moe_trainer_free(t);
    if (err) *err = MOE_ENOMEM;
    moe__set_err(errbuf, errsz, MOE_ENOMEM, "trainer: out of memory");
    return NULL;
}

void moe_trainer_free(moe_trainer *t) {
    if (!t) return;
    moe_adamw_free(t->opt);
    moe__free(t->tok);
    moe__free(t->tgt);
    moe__free(t);
}

const char *moe_trainer_errmsg(const moe_trainer *t) { return t ? t->err : "trainer is NULL"; }
int moe_trainer_get_step(const moe_trainer *t) { return moe_adamw_get_step(t->opt); }

void moe_trainer_set_schedule(moe_trainer *t, int max_steps, int warmup_steps) {
    moe_adamw_config *c = moe__adamw_config(t->opt);
    c->max_steps = max_steps;
    c->warmup_steps = warmup_steps;
}

/* Expert parallelism: rank r of P takes windows [r B, (r+1) B) of a global
 * batch of P B windows, so P ranks see what one process with batch P B sees. */
static void dp_share(const moe_trainer *t, int *rank, int *size) {
    *rank = t->m->dist ? moe_dist_rank(t->m->dist) : 0;
    *size = t->m->dist ? moe_dist_size(t->m->dist) : 1;
}

/* B windows of T+1 tokens at offsets drawn from the sampler (every rank
 * draws the whole global batch, so the sampler state is the same on all) */
static void sample(moe_trainer *t) {
    const int B = t->tc.batch, T = t->tc.seq;
    const uint64_t span = t->n_train - (size_t)T - 1;
    int r, P;
    dp_share(t, &r, &P);
    for (int g = 0; g < P * B; g++) {
        const size_t off = (size_t)(moe__rng_u64(&t->rng) % span);
        const int b = g - r * B;
        if (b < 0 || b >= B) continue;
        memcpy(t->tok + (size_t)b * T, t->train + off, sizeof(int32_t) * T);
        memcpy(t->tgt + (size_t)b * T, t->train + off + 1, sizeof(int32_t) * T);
    }
}

/* ---- numerics ------------------------------------------------------------------ */

#define SPIKE_DECAY 0.98
#define SPIKE_WARMUP 20

/* A skipped step must leave no trace: the routers' load counts of its forward
 * calls would otherwise move the next aux-loss-free bias update (and be lost
 * by a checkpoint taken in between, breaking exact resume). */
static void discard_bias_loads(moe_model *m) {
    for (int i = 0; i < m->cfg.num_hidden_layers; i++) {
        moe_layer *l = m->layers[i].moe;
        if (l && l->bias_load) memset(l->bias_load, 0, sizeof(int64_t) * (size_t)l->cfg.n_experts);
    }
}

/* The step found NaN/Inf (what: the symptom). Names the first bad weight, or
 * else the bad gradient closest to the loss, then fails or skips by policy.
 * Parameters and optimizer state are untouched either way. */
/* Where a non-finite symptom comes from, appended to where (n bytes): the
 * first bad weight, else (with gradients) the bad gradient closest to the
 * loss, else the largest weight (an overflow of finite values). */
static void describe_cause(const moe_model *m, int have_grads, char *where, size_t n) {
    size_t at;
    int i = moe__find_nonfinite(m, m->params, 0, &at);
    where[0] = '\0';
    if (i >= 0) {
        snprintf(where, n, ": non-finite weight in ");
        moe__describe_value(m, i, at, m->params[m->tensors[i].offset + at], where + strlen(where), n - strlen(where));
    } else if (have_grads && (i = moe__find_nonfinite(m, m->grads, 1, &at)) >= 0) {
        snprintf(where, n, ": first non-finite gradient (from the loss back) in ");
        moe__describe_value(m, i, at, m->grads[m->tensors[i].offset + at], where + strlen(where), n - strlen(where));
    } else if ((i = moe__find_largest(m, m->params, &at)) >= 0) { /* an overflow: point at the biggest weight */
        snprintf(where, n, " (no weight is NaN/Inf; the largest is ");
        moe__describe_value(m, i, at, m->params[m->tensors[i].offset + at], where + strlen(where),
                            n - strlen(where) - 1);
        strcat(where, ")");
    }
}

/* The step found NaN/Inf (what: the symptom). Names the cause, then fails or
 * skips by policy. Parameters and optimizer state are untouched either way. */
static int nonfinite_step(moe_trainer *t, const char *what, int have_grads, moe_train_step_info *info) {
    moe_model *m = t->m;
    const int step = moe_adamw_get_step(t->opt);
    char where[384];
    describe_cause(m, have_grads, where, sizeof where);
    moe__set_err(t->err, sizeof t->err, MOE_ENONFINITE, "step %d: %s%s", step, what, where);
    if (t->tc.nan_policy != MOE_NAN_SKIP) return MOE_ENONFINITE;
    discard_bias_loads(m);
    if (t->consecutive_skips >= MOE_MAX_CONSECUTIVE_SKIPS) {
        char last[sizeof t->err];
        memcpy(last, t->err, sizeof last);
        return moe__set_err(t->err, sizeof t->err, MOE_ENONFINITE, "after %d skipped updates in a row: %.400s",
                            t->consecutive_skips, last);
    }
    t->n_skipped++, t->consecutive_skips++;
    if (info) {
        memset(info, 0, sizeof *info);
        info->step = step;
        info->loss = info->ce = info->grad_norm = NAN;
        info->lr = moe_adamw_lr(moe__adamw_config(t->opt), step);
        info->tokens = t->tokens;
        info->skipped = 1;
        info->loss_ema = (float)t->loss_ema;
        info->n_skipped = t->n_skipped, info->n_spikes = t->n_spikes;
    }
    return MOE_OK;
}

/* Spike rule: after SPIKE_WARMUP finite losses, loss > factor x EMA. Every
 * finite loss (spikes included) then enters the EMA, so a lasting level
 * change stops being reported after a few dozen steps. */
static int spike_update(moe_trainer *t, double loss) {
    const double f = t->tc.spike_factor == 0 ? 2.0 : t->tc.spike_factor;
    const int spike = f > 0 && t->n_ema >= SPIKE_WARMUP && loss > f * t->loss_ema;
    t->loss_ema = t->n_ema ? SPIKE_DECAY * t->loss_ema + (1 - SPIKE_DECAY) * loss : loss;
    t->n_ema++;
    t->n_spikes += spike;
    return spike;
}

/* The optimizer step; under expert parallelism the replicated gradients are
 * summed over ranks first and the clip uses the global norm. */
static int dist_step(moe_trainer *t, float *gn) {
    moe_model *m = t->m;
    int rc;
    if (!m->dist) {
        rc = moe_adamw_step(t->opt, m->params, m->grads, m->tensors, m->n_tensors, gn);
    } else {
        double norm;
        rc = moe__model_sync_grads(m);
        if (!rc) rc = moe__model_grad_norm(m, m->grads, &norm);
        if (rc) return moe__set_err(t->err, sizeof t->err, rc, "step %d: %s", moe_adamw_get_step(t->opt), m->err);
        rc = moe__adamw_step_norm(t->opt, m->params, m->grads, m->tensors, m->n_tensors, norm, gn);
    }
    if (rc && rc != MOE_ENONFINITE) /* MOE_ENONFINITE: the caller applies the NaN policy */
        return moe__set_err(t->err, sizeof t->err, rc, "step %d: optimizer failed", moe_adamw_get_step(t->opt));
    return rc;
}

/* Expert parallelism: a forward or backward that fails on one rank fails on
 * every rank, in the same call (the layers and the model agree before their
 * collectives), but not always with the same code; the NaN policy must see
 * the same code everywhere, or one rank would skip while another stops and
 * the next collectives would not match. So the ranks take the worst code. */
static int agreed_failure(moe_trainer *t, int rc) {
    if (!t->m->dist) return rc;
    int v = -rc; /* error codes are negative */
    if (moe__dist_allreduce_max_int(t->m->dist, &v, 1)) return MOE_EIO;
    return -v;
}

int moe_trainer_step(moe_trainer *t, moe_train_step_info *info) {
    const double t0 = now_s();
    const int B = t->tc.batch, T = t->tc.seq, A = t->tc.grad_accum;
    moe_model *m = t->m;
    moe_model_zero_grad(m);
    double loss = 0, ce = 0, aux = 0;
    for (int a = 0; a < A; a++) {
        sample(t);
        float l, c, x;
        /* routing noise position from the step, so --resume draws the same */
        moe_model_set_rng_counter(m, (uint64_t)moe_adamw_get_step(t->opt) * (uint64_t)A + (uint64_t)a);
        int rc = moe_model_forward(m, t->tok, t->tgt, B, T, &l);
        if (!rc) rc = moe_model_backward(m);
        if (rc) rc = agreed_failure(t, rc);
        if (rc == MOE_ENONFINITE) return nonfinite_step(t, m->err, 0, info);
        if (rc) return moe__set_err(t->err, sizeof t->err, rc, "step %d: %s", moe_adamw_get_step(t->opt), m->err);
        moe_model_last_losses(m, &c, &x);
        loss += l, ce += c, aux += x;
    }
    if (!isfinite(loss)) {
        char what[64];
        snprintf(what, sizeof what, "the loss is %g", loss / A);
        return nonfinite_step(t, what, 1, info);
    }
    if (A > 1) { /* the mean over micro-batches: scale the summed gradients */
        const float s = 1.0f / A;
        for (size_t i = 0; i < m->n_params; i++) m->grads[i] *= s;
    }
    const float lr = moe_adamw_lr(moe__adamw_config(t->opt), moe_adamw_get_step(t->opt));
    const double ema_before = t->loss_ema;
    float gn;
    int rc = dist_step(t, &gn);
    if (rc == MOE_ENONFINITE) { /* gn is the global norm: every rank decides alike */
        char what[64];
        snprintf(what, sizeof what, "the gradient norm is %g", (double)gn);
        return nonfinite_step(t, what, 1, info);
    }
    if (rc) return rc;
    if ((rc = moe_model_update_bias(m)))
        return moe__set_err(t->err, sizeof t->err, rc, "step %d: %s", moe_adamw_get_step(t->opt), m->err);
    int r, P;
    dp_share(t, &r, &P);
    t->tokens += (double)A * B * T * P;
    t->consecutive_skips = 0;
    const int spike = spike_update(t, loss / A);
    if (info) {
        info->step = moe_adamw_get_step(t->opt);
        info->loss = (float)(loss / A), info->ce = (float)(ce / A), info->aux = (float)(aux / A);
        info->lr = lr, info->grad_norm = gn;
        info->tokens = t->tokens;
        info->step_seconds = now_s() - t0;
        info->skipped = 0, info->spike = spike;
        info->loss_ema = (float)ema_before;
        info->n_skipped = t->n_skipped, info->n_spikes = t->n_spikes;
    }
    return MOE_OK;
}

int moe_trainer_eval(moe_trainer *t, float *val_loss) {
    if (!t->val) return moe__set_err(t->err, sizeof t->err, MOE_ESTATE, "eval: no validation tokens");
    const int B = t->tc.batch, T = t->tc.seq, nb = t->tc.eval_batches > 0 ? t->tc.eval_batches : 1;
    int r, P;
    dp_share(t, &r, &P); /* rank r evaluates windows [r B, (r+1) B) of each global batch */
    const size_t nwin = (size_t)nb * B * P, span = t->n_val - (size_t)T - 1;
    double sum = 0;
    moe_model_set_training(t->m, 0); /* evaluation never drops tokens */
    for (int k = 0; k < nb; k++) {
        for (int b = 0; b < B; b++) {
            const size_t w = ((size_t)k * P + r) * B + b, off = nwin > 1 ? w * span / (nwin - 1) : 0;
            memcpy(t->tok + (size_t)b * T, t->val + off, sizeof(int32_t) * T);
            memcpy(t->tgt + (size_t)b * T, t->val + off + 1, sizeof(int32_t) * T);
        }
        float ce;
        int rc = moe_model_forward(t->m, t->tok, t->tgt, B, T, NULL);
        if (rc) {
            char where[384] = "";
            if (rc == MOE_ENONFINITE) describe_cause(t->m, 0, where, sizeof where);
            moe_model_set_training(t->m, 1);
            return moe__set_err(t->err, sizeof t->err, rc, "eval: %.200s%s", t->m->err, where);
        }
        moe_model_last_losses(t->m, &ce, NULL);
        sum += ce;
    }
    moe_model_set_training(t->m, 1);
    *val_loss = (float)(sum / nb);
    return MOE_OK;
}

/* ---- state ------------------------------------------------------------------- */

int moe__trainer_stage(moe_trainer *t, moe__ckpt *c, char *err, size_t errsz) {
    int rc = moe__model_stage(t->m, c, err, errsz);
    if (rc) return rc;
    char step[32], rng[4][32], tokens[32], num[4][40];
    snprintf(step, sizeof step, "%d", moe_adamw_get_step(t->opt));
    for (int k = 0; k < 4; k++) snprintf(rng[k], sizeof rng[k], "%016" PRIx64, t->rng.s[k]);
    snprintf(tokens, sizeof tokens, "%.0f", t->tokens);
    snprintf(num[0], sizeof num[0], "%d", t->n_skipped);
    snprintf(num[1], sizeof num[1], "%d", t->n_spikes);
    snprintf(num[2], sizeof num[2], "%d", t->n_ema);
    snprintf(num[3], sizeof num[3], "%a", t->loss_ema); /* hex: exact, so resumed spike reports match */
    const char *meta[] = {"step", step, "rng0", rng[0], "rng1", rng[1], "rng2", rng[2], "rng3", rng[3],
                          "tokens", tokens, "skipped", num[0], "spikes", num[1], "loss_ema_n", num[2],
                          "loss_ema", num[3], NULL};
    const float *bases[2] = {moe_adamw_m(t->opt), moe_adamw_v(t->opt)};
    const char *prefixes[2] = {"m.", "v."};
    return moe__model_stage_tensors(t->m, c, "optimizer.safetensors", bases, prefixes, 2, meta, err, errsz);
}

int moe_trainer_save(moe_trainer *t, const char *dir, char *err, size_t errsz) {
    moe__ckpt *c;
    int rc = moe__model_ckpt_begin(t->m, dir, moe_adamw_get_step(t->opt), &c, err, errsz);
    if (rc) return rc;
    return moe__model_ckpt_end(t->m, c, moe__trainer_stage(t, c, err, errsz), err, errsz);
}

/* Everything optimizer.safetensors restores besides the moments, parsed
 * before any of it is stored so that a bad file changes nothing. */
typedef struct {
    int step, n_skipped, n_spikes, n_ema;
    uint64_t rng[4];
    double tokens, loss_ema;
} loaded_state;

/* strtol/strtod with the whole string consumed and the range checked. */
static int meta_long(const moe__st_file *f, const char *key, int required, long lim, long *out) {
    const char *v = moe__st_meta(f, key);
    *out = 0;
    if (!v) return !required;
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (end == v || *end || errno || x < 0 || x > lim) return 0;
    *out = x;
    return 1;
}

static int meta_double(const moe__st_file *f, const char *key, int required, double lo, double *out) {
    const char *v = moe__st_meta(f, key);
    *out = 0;
    if (!v) return !required;
    char *end;
    double x = strtod(v, &end);
    if (end == v || *end || !isfinite(x) || x < lo) return 0;
    *out = x;
    return 1;
}

static int parse_state(const moe__st_file *f, const char *path, loaded_state *s, char *err, size_t errsz) {
    long x[4];
    if (!meta_long(f, "step", 1, 1L << 30, &x[0]))
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: metadata \"step\" missing or bad", path);
    s->step = (int)x[0];
    for (int k = 0; k < 4; k++) {
        char key[8];
        snprintf(key, sizeof key, "rng%d", k);
        const char *v = moe__st_meta(f, key);
        char *end;
        if (!v || strlen(v) != 16 || !isxdigit((unsigned char)v[0]))
            return moe__set_err(err, errsz, MOE_EFORMAT, "%s: metadata \"%s\" missing or bad", path, key);
        s->rng[k] = strtoull(v, &end, 16);
        if (*end) return moe__set_err(err, errsz, MOE_EFORMAT, "%s: metadata \"%s\" missing or bad", path, key);
    }
    if (!meta_double(f, "tokens", 1, 0, &s->tokens))
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: metadata \"tokens\" missing or bad", path);
    /* the numerics counters are absent in checkpoints from before they existed */
    const char *keys[3] = {"skipped", "spikes", "loss_ema_n"};
    for (int k = 0; k < 3; k++)
        if (!meta_long(f, keys[k], 0, 1L << 30, &x[1 + k]))
            return moe__set_err(err, errsz, MOE_EFORMAT, "%s: bad \"%s\"", path, keys[k]);
    s->n_skipped = (int)x[1], s->n_spikes = (int)x[2], s->n_ema = (int)x[3];
    if (!meta_double(f, "loss_ema", 0, -HUGE_VAL, &s->loss_ema))
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: bad \"loss_ema\"", path);
    return MOE_OK;
}

/* Moment i of the table (m. tensors, then v.) converted to float in dst. A
 * moment AdamW cannot have produced (NaN/Inf, a negative second moment) is
 * refused here: the first update would turn it into NaN weights. */
static int read_moment(moe_trainer *t, const moe__st_file *f, const char *path, int i, float *dst, char *err,
                       size_t errsz) {
    const moe_model *m = t->m;
    const moe_param_info *pi = &m->tensors[i % m->n_tensors];
    const int second = i >= m->n_tensors;
    char name[128];
    snprintf(name, sizeof name, "%s.%s", second ? "v" : "m", pi->name);
    const moe__st_tensor *st = moe__st_find(f, name);
    if (!st || st->numel != pi->numel)
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: tensor \"%s\" missing or of the wrong size", path, name);
    if (moe__st_read_f32(st, dst, pi->numel))
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: tensor \"%s\" has dtype %s, not a float type", path,
                            name, moe__dtype_name(st->dtype));
    for (size_t j = 0; j < pi->numel; j++)
        if (!isfinite(dst[j]) || (second && dst[j] < 0))
            return moe__set_err(err, errsz, MOE_EFORMAT, "%s: tensor \"%s\" [%zu] = %g is not a valid moment", path,
                                name, j, (double)dst[j]);
    return MOE_OK;
}

/* Two passes over the file, so that a failure leaves the trainer as it was
 * (a resume that fails must not leave half the moments of another run):
 * the first converts and checks every moment into a scratch buffer the
 * size of the largest tensor and parses the metadata; only when all of it
 * is good, and every rank agrees, does the second pass convert the same
 * bytes again into the optimizer, which cannot fail (same tensors, dtypes
 * and values). A scratch copy of all moments would cost 8 bytes per
 * parameter at the moment memory peaks. */
int moe_trainer_load_state(moe_trainer *t, const char *dir, char *err, size_t errsz) {
    char path[4200];
    moe__st_file *f = NULL;
    moe_model *m = t->m;
    loaded_state s = {0};
    float *scratch = NULL;
    int rc = moe__ckpt_path(dir, "optimizer.safetensors", path, sizeof path, err, errsz);
    if (!rc) rc = moe__st_open(path, &f, err, errsz);
    size_t most = 1;
    for (int i = 0; i < m->n_tensors; i++)
        if (m->tensors[i].numel > most) most = m->tensors[i].numel;
    if (!rc && !(scratch = moe__malloc(most * sizeof(float))))
        rc = moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path);
    for (int i = 0; i < 2 * m->n_tensors && !rc; i++) rc = read_moment(t, f, path, i, scratch, err, errsz);
    if (!rc) rc = parse_state(f, path, &s, err, errsz);
    moe__free(scratch);
    rc = moe__model_agree(m, rc, err, errsz); /* each rank read its own experts' moments */
    for (int i = 0; i < 2 * m->n_tensors && !rc; i++) {
        const moe_param_info *pi = &m->tensors[i % m->n_tensors];
        float *base = i < m->n_tensors ? moe_adamw_m(t->opt) : moe_adamw_v(t->opt);
        (void)read_moment(t, f, path, i, base + pi->offset, err, errsz);
    }
    if (!rc) {
        moe_adamw_set_step(t->opt, s.step);
        for (int k = 0; k < 4; k++) t->rng.s[k] = s.rng[k];
        t->tokens = s.tokens;
        t->n_skipped = s.n_skipped, t->n_spikes = s.n_spikes, t->n_ema = s.n_ema;
        t->loss_ema = s.loss_ema;
        t->consecutive_skips = 0;
    }
    moe__st_close(f);
    return rc;
}
