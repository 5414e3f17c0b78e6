/* AdamW with global-norm gradient clipping and a warm-up + cosine schedule,
 * matching torch.optim.AdamW (decoupled decay applied first, bias corrections
 * as torch computes them) and torch.nn.utils.clip_grad_norm_. */
#include "internal.h"

#include <math.h>
#include <string.h>

#define NORM_CHUNK 65536

struct moe_adamw {
    moe_adamw_config cfg;
    size_t n;
    float *m, *v;     /* [n] */
    double *partial;  /* [nchunks] squared-norm partial sums */
    int step, threads;
};

moe_adamw_config moe_adamw_config_default(void) {
    moe_adamw_config c = {3e-3f, 3e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, 0, 0};
    return c;
}

float moe_adamw_lr(const moe_adamw_config *c, int step) {
    if (c->warmup_steps > 0 && step < c->warmup_steps) return c->lr * (float)(step + 1) / (float)c->warmup_steps;
    if (c->max_steps <= c->warmup_steps) return c->lr;
    double p = (double)(step - c->warmup_steps) / (double)(c->max_steps - c->warmup_steps);
    if (p > 1.0) p = 1.0;
    return (float)(c->min_lr + 0.5 * (c->lr - c->min_lr) * (1.0 + cos(M_PI * p)));
}

moe_adamw *moe_adamw_create(size_t n, const moe_adamw_config *c, int n_threads, int *err) {
    moe_adamw *o = moe__calloc(1, sizeof *o);
    size_t nch = (n + NORM_CHUNK - 1) / NORM_CHUNK + 1;
    if (o) {
        o->m = moe__aligned_alloc(sizeof(float) * (n ? n : 1));
        o->v = moe__aligned_alloc(sizeof(float) * (n ? n : 1));
        o->partial = moe__calloc(nch, sizeof(double));
    }
    if (!o || !o->m || !o->v || !o->partial) {
        moe_adamw_free(o);
        if (err) *err = MOE_ENOMEM;
        return NULL;
    }
    memset(o->m, 0, sizeof(float) * n);
    memset(o->v, 0, sizeof(float) * n);
    o->cfg = c ? *c : moe_adamw_config_default();
    o->n = n;
    o->threads = moe__threads(n_threads);
    if (err) *err = MOE_OK;
    return o;
}

void moe_adamw_free(moe_adamw *o) {
    if (!o) return;
    moe__afree(o->m);
    moe__afree(o->v);
    moe__free(o->partial);
    moe__free(o);
}

int moe_adamw_get_step(const moe_adamw *o) { return o->step; }
moe_adamw_config *moe__adamw_config(moe_adamw *o) { return &o->cfg; }
void moe_adamw_set_step(moe_adamw *o, int step) { o->step = step; }
float *moe_adamw_m(moe_adamw *o) { return o->m; }
float *moe_adamw_v(moe_adamw *o) { return o->v; }

/* sqrt(sum g^2), in double, fixed chunks reduced in order */
static double grad_norm(moe_adamw *o, const float *g) {
    const long nch = (long)((o->n + NORM_CHUNK - 1) / NORM_CHUNK);
#pragma omp parallel for schedule(static) num_threads(o->threads)
    for (long ch = 0; ch < nch; ch++) {
        const size_t i0 = (size_t)ch * NORM_CHUNK, i1 = i0 + NORM_CHUNK < o->n ? i0 + NORM_CHUNK : o->n;
        double s = 0;
        for (size_t i = i0; i < i1; i++) s += (double)g[i] * g[i];
        o->partial[ch] = s;
    }
    double s = 0;
    for (long ch = 0; ch < nch; ch++) s += o->partial[ch];
    return sqrt(s);
}

int moe_adamw_step(moe_adamw *o, float *p, float *g, const moe_param_info *t, int nt, float *gnorm_out) {
    return moe__adamw_step_norm(o, p, g, t, nt, grad_norm(o, g), gnorm_out);
}

/* The step with a gradient norm taken elsewhere (expert parallelism: over
 * every rank's experts). */
int moe__adamw_step_norm(moe_adamw *o, float *p, float *g, const moe_param_info *t, int nt, double norm,
                         float *gnorm_out) {
    const moe_adamw_config *c = &o->cfg;
    if (gnorm_out) *gnorm_out = (float)norm;
    if (!isfinite(norm)) return MOE_ENONFINITE;
    float clip = 1.0f;
    if (c->grad_clip > 0) {
        const double coef = c->grad_clip / (norm + 1e-6);
        clip = coef < 1.0 ? (float)coef : 1.0f;
    }
    const float lr = moe_adamw_lr(c, o->step);
    o->step++;
    const double bc1 = 1.0 - pow(c->beta1, o->step), bc2 = 1.0 - pow(c->beta2, o->step);
    const float step_size = (float)(lr / bc1), bc2_sqrt = (float)sqrt(bc2);
    const float b1 = c->beta1, b2 = c->beta2, eps = c->eps;
    for (int k = 0; k < nt; k++) {
        float *pp = p + t[k].offset, *gg = g + t[k].offset, *mm = o->m + t[k].offset, *vv = o->v + t[k].offset;
        const float decay = t[k].decay ? 1.0f - lr * c->weight_decay : 1.0f;
        const long n = (long)t[k].numel;
#pragma omp parallel for simd schedule(static) num_threads(o->threads) if (n > 65536)
        for (long i = 0; i < n; i++) {
            const float gi = gg[i] * clip;
            pp[i] *= decay;
            mm[i] = mm[i] * b1 + gi * (1.0f - b1);
            vv[i] = vv[i] * b2 + gi * gi * (1.0f - b2);
            pp[i] -= step_size * mm[i] / (sqrtf(vv[i]) / bc2_sqrt + eps);
        }
    }
    return MOE_OK;
}
