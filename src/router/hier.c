/* Hierarchical MoE (Shazeer et al. 2017, appendix B): a noisy top-k primary
 * gate over G = n_groups groups of B = E / G consecutive experts keeps
 * K1 = topk_groups of them; inside each kept group g a noisy top-k secondary
 * gate keeps K2 = top_k / K1 experts. A slot's weight is
 * route_scale * Gp_g * Gs_{g,j}, both softmaxes over the kept noisy logits.
 *
 *   primary    Hp_g = x wgroup_g + eps * softplus(x wgroup_noise_g)
 *   secondary  Hs_e = x wg_e     + eps * softplus(x wnoise_e)
 *
 * eps ~ N(0, 1) in training (draw index e for expert e, E + g for group g,
 * so the two gates never share a draw), 0 in evaluation. Ties in either
 * top-k go to the lower id; a token's slots come grouped by primary slot
 * (decreasing Hp), then by decreasing Hs.
 *
 * Load loss (training, load_coef > 0), Eq. 14:
 *   Load_H(e = g B + j) = Load_p(g) * Load_g(j) / |X_g|
 * Load_p(g) = sum over all tokens of P(t, g), Load_g(j) = sum over X_g (the
 * tokens whose primary gate kept g) of P(t, e), with the smooth estimator
 * P = Phi((clean - thr) / softplus(noise logit)), thr the noisy value of the
 * (k+1)-th best competitor when kept, the k-th best when not. |X_g| is a
 * count and carries no gradient. Conventions:
 *   - k = the number of candidates (K1 = G, or K2 = B): every candidate is
 *     always kept, so P = 1 exactly (no threshold, no gradient);
 *   - |X_g| = 0: Load_g(j) / |X_g| is taken as K2 / B, the value for evenly
 *     spread tokens, so an unused group still pulls its primary load up;
 *   - L_load = load_coef * var / (mean^2 + 1e-10) over the E values,
 *     population variance (as the importance loss in router.c).
 *
 * Every per-token quantity lives in l->ws; sums over tokens are taken per
 * fixed chunk of MOE__CHUNK tokens and then over chunks in order, weight
 * gradients by one GEMM over all N per output tile, so results do not
 * depend on the thread count.
 */
#include "layer/layer_impl.h"

#include "mathx.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#define WG_TILE_ROWS 256

/* Views into l->ws. Shapes use N = max_tokens, K = the layer's k_cap. */
typedef struct hier_ws {
    float *pg;   /* [N][2G] primary clean logits | primary raw noise logits */
    float *hp;   /* [N][G] noisy primary logits */
    float *ep;   /* [N][G] primary draws (0 in evaluation) */
    float *sn;   /* [N][E] secondary raw noise logits (training) */
    float *hs;   /* [N][E] noisy secondary logits (kept groups only) */
    float *es;   /* [N][E] secondary draws (kept groups only) */
    float *gp;   /* [N][K] primary gate of each slot's group */
    float *gs;   /* [N][K] secondary gate of each slot */
    float *dpg;  /* [N][2G] backward: d/d primary clean | raw noise logits */
    float *dsn;  /* [N][E] backward: d/d secondary raw noise logits */
    float *part; /* [nchunks][2G+E] per chunk: sum P(t,g), |X_g|, sum P(t,e) */
    float *cp;   /* [G] d L_load / d P(t, g), the same for every token */
    float *cs;   /* [E] d L_load / d P(t, e), for tokens in X_g */
    float *hdr;  /* [2] last forward: noise on, load loss on */
} hier_ws;

/* Offsets of the views (base NULL: sizing only); returns the float count. */
static size_t ws_layout(const moe_layer_config *c, int kcap, float *base, hier_ws *v) {
    const size_t N = (size_t)c->max_tokens, E = (size_t)c->n_experts;
    const size_t G = (size_t)(c->n_groups > 0 ? c->n_groups : 1), K = (size_t)kcap;
    const size_t nch = (N + MOE__CHUNK - 1) / MOE__CHUNK;
    const size_t sz[] = {N * 2 * G, N * G, N * G, N * E, N * E, N * E, N * K, N * K,
                         N * 2 * G, N * E, nch * (2 * G + E), G, E, 2};
    float **dst[] = {&v->pg, &v->hp, &v->ep, &v->sn, &v->hs, &v->es, &v->gp, &v->gs,
                     &v->dpg, &v->dsn, &v->part, &v->cp, &v->cs, &v->hdr};
    size_t off = 0;
    for (size_t i = 0; i < sizeof sz / sizeof sz[0]; i++) {
        if (base) *dst[i] = base + off;
        off += (sz[i] + 15) & ~(size_t)15; /* 64-byte aligned rows for BLAS */
    }
    return off;
}

static int kcap_of(const moe_layer_config *c) { return c->max_top_k > c->top_k ? c->max_top_k : c->top_k; }

size_t moe__hier_ws_floats(const moe_layer_config *c) {
    hier_ws v;
    return ws_layout(c, kcap_of(c), NULL, &v);
}

static hier_ws views(moe_layer *l) {
    hier_ws v;
    ws_layout(&l->cfg, l->k_cap, l->ws, &v);
    return v;
}

static float softplus(float r) { return r > 0.0f ? r + log1pf(expf(-r)) : log1pf(expf(r)); }

/* Softmax over v[ids[0..k)] (ids[0] the largest) into p. */
static void softmax_kept(const float *v, const int *ids, int k, float *p) {
    const float mx = v[ids[0]];
    float sum = 0.0f;
    for (int j = 0; j < k; j++) sum += p[j] = moe__exp(v[ids[j]] - mx);
    const float inv = 1.0f / sum;
    for (int j = 0; j < k; j++) p[j] *= inv;
}

/* Smooth load estimator P = Phi((c - thr) / softplus(r)); a = dP/dc =
 * -dP/dthr, dr = dP/dr. A vanishing noise scale makes P a step: no gradient. */
static float load_prob(float c, float thr, float r, float *a, float *dr) {
    const float sp = softplus(r), z = (c - thr) / sp;
    if (!(sp > 0.0f) || !isfinite(z)) {
        *a = *dr = 0.0f;
        return c > thr ? 1.0f : 0.0f;
    }
    const float pdf = 0.3989422804014327f * expf(-0.5f * z * z);
    *a = pdf / sp;
    *dr = -pdf * z / sp * moe__sigmoid(r);
    return 0.5f * erfcf(-z * 0.7071067811865476f);
}

/* Selection of token t: the primary top K1 groups, then each group's top K2
 * experts. ids/gp first hold the K1 primary picks, then are expanded in
 * place from the last primary slot down (slot j1 moves to [j1 K2,
 * (j1+1) K2), never below j1, so unread picks survive). Returns 0, or -1
 * when a noisy logit is not finite. */
static int route_token(moe_layer *l, const hier_ws *v, int t, int noisy) {
    const moe_layer_config *c = &l->cfg;
    const int E = c->n_experts, G = c->n_groups, B = E / G, K = c->top_k, K1 = c->topk_groups, K2 = K / K1;
    const float *pc = v->pg + (size_t)t * 2 * G, *pr = pc + G;
    float *hp = v->hp + (size_t)t * G, *ep = v->ep + (size_t)t * G;
    const float *lg = l->logits + (size_t)t * E, *sn = v->sn + (size_t)t * E;
    float *hs = v->hs + (size_t)t * E, *es = v->es + (size_t)t * E;
    int *ids = l->topk_ids + (size_t)t * K;
    float *gp = v->gp + (size_t)t * K, *gs = v->gs + (size_t)t * K, *w = l->topk_w + (size_t)t * K;
    int finite = 1;
    for (int g = 0; g < G; g++) {
        ep[g] = noisy ? moe__router_normal(l, t, E + g) : 0.0f;
        hp[g] = noisy ? pc[g] + ep[g] * softplus(pr[g]) : pc[g];
        finite &= isfinite(hp[g]) != 0;
    }
    if (!finite) return -1;
    moe__topk(hp, 1, 0, G, K1, ids);
    softmax_kept(hp, ids, K1, gp);
    for (int j1 = K1 - 1; j1 >= 0; j1--) {
        const int g = ids[j1];
        const float p = gp[j1];
        for (int e = g * B; e < (g + 1) * B; e++) {
            es[e] = noisy ? moe__router_normal(l, t, e) : 0.0f;
            hs[e] = noisy ? lg[e] + es[e] * softplus(sn[e]) : lg[e];
            finite &= isfinite(hs[e]) != 0;
        }
        if (!finite) return -1;
        int *sid = ids + j1 * K2;
        float *sg = gs + j1 * K2;
        moe__topk(hs, 1, g * B, (g + 1) * B, K2, sid);
        softmax_kept(hs, sid, K2, sg);
        for (int j2 = 0; j2 < K2; j2++) {
            gp[j1 * K2 + j2] = p;
            w[j1 * K2 + j2] = c->route_scale * p * sg[j2];
        }
    }
    return 0;
}

/* The load estimator's terms of token t. Forward (part != NULL): adds
 * P(t, g) for every group, 1 to |X_g| and P(t, e) for every expert of each
 * kept group. Backward: adds cp[g] dP(t,g) + cs[e] dP(t,e) into the primary
 * (dpg) and secondary (dlg clean, dsn raw noise) logit gradients, the
 * threshold being the noisy logit of another candidate. */
static void load_token(const moe_layer *l, const hier_ws *v, int t, float *part, float *dlg) {
    const moe_layer_config *c = &l->cfg;
    const int E = c->n_experts, G = c->n_groups, B = E / G, K = c->top_k, K1 = c->topk_groups, K2 = K / K1;
    const float *pc = v->pg + (size_t)t * 2 * G, *pr = pc + G;
    const float *hp = v->hp + (size_t)t * G, *ep = v->ep + (size_t)t * G;
    const float *lg = l->logits + (size_t)t * E, *sn = v->sn + (size_t)t * E;
    const float *hs = v->hs + (size_t)t * E, *es = v->es + (size_t)t * E;
    const int *ids = l->topk_ids + (size_t)t * K;
    float *dpg = v->dpg + (size_t)t * 2 * G, *dsn = v->dsn + (size_t)t * E;
    float a, dr;

    if (K1 < G) {
        /* thresholds: the K1-th best (last kept) and the (K1+1)-th best
         * (best of the rest, lower id first on ties, as the selection) */
        const int last = ids[(K1 - 1) * K2] / B;
        int next = -1;
        for (int g = 0; g < G; g++) {
            int kept = 0;
            for (int j1 = 0; j1 < K1; j1++) kept |= ids[j1 * K2] / B == g;
            if (!kept && (next < 0 || hp[g] > hp[next])) next = g;
        }
        for (int g = 0; g < G; g++) {
            int kept = 0;
            for (int j1 = 0; j1 < K1; j1++) kept |= ids[j1 * K2] / B == g;
            const int m = kept ? next : last;
            const float P = load_prob(pc[g], hp[m], pr[g], &a, &dr);
            if (part) {
                part[g] += P;
                continue;
            }
            const float d = v->cp[g], dthr = -d * a;
            dpg[g] += d * a;
            dpg[G + g] += d * dr;
            dpg[m] += dthr;
            dpg[G + m] += dthr * ep[m] * moe__sigmoid(pr[m]);
        }
    } else if (part) {
        for (int g = 0; g < G; g++) part[g] += 1.0f;
    }

    for (int j1 = 0; j1 < K1; j1++) {
        const int *sid = ids + j1 * K2, g = sid[0] / B;
        if (part) part[G + g] += 1.0f;
        if (K2 == B) {
            if (part)
                for (int e = g * B; e < (g + 1) * B; e++) part[2 * G + e] += 1.0f;
            continue;
        }
        const int last = sid[K2 - 1];
        int next = -1;
        for (int e = g * B; e < (g + 1) * B; e++) {
            int kept = 0;
            for (int j2 = 0; j2 < K2; j2++) kept |= sid[j2] == e;
            if (!kept && (next < 0 || hs[e] > hs[next])) next = e;
        }
        for (int e = g * B; e < (g + 1) * B; e++) {
            int kept = 0;
            for (int j2 = 0; j2 < K2; j2++) kept |= sid[j2] == e;
            const int m = kept ? next : last;
            const float P = load_prob(lg[e], hs[m], sn[e], &a, &dr);
            if (part) {
                part[2 * G + e] += P;
                continue;
            }
            const float d = v->cs[e], dthr = -d * a;
            dlg[e] += d * a;
            dsn[e] += d * dr;
            dlg[m] += dthr;
            dsn[m] += dthr * es[m] * moe__sigmoid(sn[m]);
        }
    }
}

/* L_load from the chunk partials; leaves cp, cs for the backward. */
static void load_loss(moe_layer *l, const hier_ws *v, int n) {
    const moe_layer_config *c = &l->cfg;
    const int E = c->n_experts, G = c->n_groups, B = E / G, K2 = c->top_k / c->topk_groups;
    const int nch = (n + MOE__CHUNK - 1) / MOE__CHUNK, stride = 2 * G + E;
    double *lh = l->psum; /* [E] Load_H; router_stats refills psum later */
    /* first pass: cp[g] = Load_p(g) / |X_g|, cs[e] = Load_g(j) / |X_g| (the
     * factors of Load_H each side's gradient needs) */
    for (int g = 0; g < G; g++) {
        double lp = 0.0, cnt = 0.0;
        for (int ch = 0; ch < nch; ch++) {
            lp += v->part[(size_t)ch * stride + g];
            cnt += v->part[(size_t)ch * stride + G + g];
        }
        for (int e = g * B; e < (g + 1) * B; e++) {
            double ls = 0.0;
            for (int ch = 0; ch < nch; ch++) ls += v->part[(size_t)ch * stride + 2 * G + e];
            const double ratio = cnt > 0 ? ls / cnt : (double)K2 / B;
            lh[e] = lp * ratio;
            v->cs[e] = (float)ratio;
        }
        v->cp[g] = cnt > 0 ? (float)(lp / cnt) : 0.0f;
    }
    double m = 0.0, var = 0.0;
    for (int e = 0; e < E; e++) m += lh[e];
    m /= E;
    for (int e = 0; e < E; e++) var += (lh[e] - m) * (lh[e] - m);
    var /= E;
    const double den = m * m + 1e-10, w = c->load_coef;
    l->stats.load_loss = (float)(w * var / den);
    /* second pass: d L / d P(t, g) = sum_j dLH_e cs[e], d L / d P(t, e) =
     * dLH_e cp[g] */
    for (int g = 0; g < G; g++) {
        double dp = 0.0;
        for (int e = g * B; e < (g + 1) * B; e++) {
            const double dlh = w * (2.0 * (lh[e] - m) / E / den - var * 2.0 * m / E / (den * den));
            dp += dlh * v->cs[e];
            v->cs[e] = (float)(dlh * v->cp[g]);
        }
        v->cp[g] = (float)dp;
    }
}

int moe__hier_select(moe_layer *l, int n) {
    const moe_layer_config *c = &l->cfg;
    const int C = c->d_model, E = c->n_experts, G = c->n_groups, K = c->top_k;
    const hier_ws v = views(l);
    const int noisy = l->training, load = noisy && c->load_coef > 0;
    const float *x = l->x;
    const float *wgrp = l->params + l->off.wgroup, *wgrn = l->params + l->off.wgroup_noise;
    const float *wns = l->params + l->off.wnoise;
    const int nch = (n + MOE__CHUNK - 1) / MOE__CHUNK, stride = 2 * G + E;
    int bad = -1;

#pragma omp parallel for schedule(dynamic, 1) num_threads(l->threads)
    for (int ch = 0; ch < nch; ch++) {
        const int t0 = ch * MOE__CHUNK, t1 = t0 + MOE__CHUNK < n ? t0 + MOE__CHUNK : n, m = t1 - t0;
        const float *xc = x + (size_t)t0 * C;
        float *pg = v.pg + (size_t)t0 * 2 * G;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, G, C, 1.0f, xc, C, wgrp, C, 0.0f, pg, 2 * G);
        if (noisy) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, G, C, 1.0f, xc, C, wgrn, C, 0.0f, pg + G,
                        2 * G);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, E, C, 1.0f, xc, C, wns, C, 0.0f,
                        v.sn + (size_t)t0 * E, E);
        }
        float *part = v.part + (size_t)ch * stride;
        memset(part, 0, sizeof(float) * (size_t)stride);
        int chunk_bad = -1;
        for (int t = t0; t < t1 && chunk_bad < 0; t++) {
            if (route_token(l, &v, t, noisy)) chunk_bad = t;
            else if (load) load_token(l, &v, t, part, NULL);
        }
        if (chunk_bad >= 0) {
#pragma omp critical(moe_hier_bad)
            if (bad < 0 || chunk_bad < bad) bad = chunk_bad;
        }
    }
    if (bad >= 0)
        return moe__set_err(l->err, sizeof l->err, MOE_ENONFINITE,
                            "hierarchical gate: a noisy logit of token %d is not finite "
                            "(non-finite wgroup, wgroup_noise or wnoise weights?)",
                            bad);

    moe__slots_token_choice(l, n, K);
    memset(l->keep, 1, (size_t)n * K);
    v.hdr[0] = (float)noisy;
    v.hdr[1] = (float)load;
    if (load) load_loss(l, &v, n);
    return MOE_OK;
}

/* One weight gradient: dw [rows][C] += d^T [rows][N] x [N][C]. */
typedef struct wgrad_job {
    const float *d;
    int ld, rows;
    float *dw;
} wgrad_job;

void moe__hier_backward(moe_layer *l, const float *x, float *dx) {
    const moe_layer_config *c = &l->cfg;
    const int C = c->d_model, E = c->n_experts, G = c->n_groups, B = E / G, n = l->n;
    const int K = c->top_k, K1 = c->topk_groups, K2 = K / K1;
    if (n <= 0) return;
    const hier_ws v = views(l);
    const int noisy = v.hdr[0] != 0.0f, load = v.hdr[1] != 0.0f;
    const float rs = c->route_scale;

#pragma omp parallel for schedule(static) num_threads(l->threads)
    for (int t = 0; t < n; t++) {
        const float *pr = v.pg + (size_t)t * 2 * G + G, *ep = v.ep + (size_t)t * G;
        const float *sn = v.sn + (size_t)t * E, *es = v.es + (size_t)t * E;
        const int *ids = l->topk_ids + (size_t)t * K;
        const float *dg = l->dgate + (size_t)t * K, *gp = v.gp + (size_t)t * K, *gs = v.gs + (size_t)t * K;
        float *dpg = v.dpg + (size_t)t * 2 * G, *dsn = v.dsn + (size_t)t * E;
        float *dlg = l->dlogits + (size_t)t * E;
        memset(dpg, 0, sizeof(float) * 2 * (size_t)G);
        if (noisy) memset(dsn, 0, sizeof(float) * (size_t)E);

        /* w = rs Gp Gs: through both softmaxes to the noisy logits, then to
         * the clean logit (1) and the raw noise logit (eps softplus') */
        float pdot = 0.0f; /* sum_j1 Gp dGp */
        for (int j1 = 0; j1 < K1; j1++) {
            float dgp = 0.0f;
            for (int j2 = 0; j2 < K2; j2++) dgp += dg[j1 * K2 + j2] * gs[j1 * K2 + j2];
            pdot += gp[j1 * K2] * rs * dgp;
        }
        for (int j1 = 0; j1 < K1; j1++) {
            const int s0 = j1 * K2, g = ids[s0] / B;
            float dgp = 0.0f, ss = 0.0f; /* ss: sum_j2 Gs dGs */
            for (int j2 = 0; j2 < K2; j2++) {
                dgp += dg[s0 + j2] * gs[s0 + j2];
                ss += gs[s0 + j2] * rs * dg[s0 + j2] * gp[s0];
            }
            const float dh = gp[s0] * (rs * dgp - pdot);
            dpg[g] += dh;
            if (noisy) dpg[G + g] += dh * ep[g] * moe__sigmoid(pr[g]);
            for (int j2 = 0; j2 < K2; j2++) {
                const int e = ids[s0 + j2];
                const float dhs = gs[s0 + j2] * (rs * dg[s0 + j2] * gp[s0] - ss);
                dlg[e] += dhs;
                if (noisy) dsn[e] += dhs * es[e] * moe__sigmoid(sn[e]);
            }
        }
        if (load) load_token(l, &v, t, NULL, dlg);
    }

    /* weight gradients: each output tile reduced over all N in one call */
    const wgrad_job jobs[3] = {
        {v.dpg, 2 * G, G, l->grads + l->off.wgroup},
        {v.dpg + G, 2 * G, noisy ? G : 0, l->grads + l->off.wgroup_noise},
        {v.dsn, E, noisy ? E : 0, l->grads + l->off.wnoise},
    };
    const int ctiles = (C + MOE__TILE_N - 1) / MOE__TILE_N;
    int ntasks = 0;
    for (int j = 0; j < 3; j++) ntasks += (jobs[j].rows + WG_TILE_ROWS - 1) / WG_TILE_ROWS * ctiles;
    const int nch = (n + MOE__CHUNK - 1) / MOE__CHUNK;
    const float *wgrp = l->params + l->off.wgroup, *wgrn = l->params + l->off.wgroup_noise;
    const float *wns = l->params + l->off.wnoise;
#pragma omp parallel num_threads(l->threads)
    {
#pragma omp for schedule(dynamic, 1) nowait
        for (int task = 0; task < ntasks; task++) {
            int j = 0, k = task;
            while (k >= (jobs[j].rows + WG_TILE_ROWS - 1) / WG_TILE_ROWS * ctiles)
                k -= (jobs[j].rows + WG_TILE_ROWS - 1) / WG_TILE_ROWS * ctiles, j++;
            const int r0 = k / ctiles * WG_TILE_ROWS, c0 = k % ctiles * MOE__TILE_N;
            const int r1 = r0 + WG_TILE_ROWS < jobs[j].rows ? r0 + WG_TILE_ROWS : jobs[j].rows;
            const int c1 = c0 + MOE__TILE_N < C ? c0 + MOE__TILE_N : C;
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1 - r0, c1 - c0, n, 1.0f, jobs[j].d + r0,
                        jobs[j].ld, x + c0, C, 1.0f, jobs[j].dw + (size_t)r0 * C + c0, C);
        }
        /* dx [N][C] += dpg_clean wgroup + dpg_noise wgroup_noise + dsn wnoise */
        if (dx) {
#pragma omp for schedule(dynamic, 1)
            for (int ch = 0; ch < nch; ch++) {
                const int t0 = ch * MOE__CHUNK, t1 = t0 + MOE__CHUNK < n ? t0 + MOE__CHUNK : n, m = t1 - t0;
                float *dxc = dx + (size_t)t0 * C;
                const float *dp = v.dpg + (size_t)t0 * 2 * G;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, C, G, 1.0f, dp, 2 * G, wgrp, C, 1.0f,
                            dxc, C);
                if (noisy) {
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, C, G, 1.0f, dp + G, 2 * G, wgrn, C,
                                1.0f, dxc, C);
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, C, E, 1.0f, v.dsn + (size_t)t0 * E,
                                E, wns, C, 1.0f, dxc, C);
                }
            }
        }
    }
}
