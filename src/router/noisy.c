/* Noisy top-k gating (Shazeer et al. 2017, eqs. 3-5 and appendix A).
 *
 *   xn = x · wnoiseᵀ                         [N][E]
 *   H  = logits + eps · softplus(xn)          [N][E]  training, eps ~ N(0, 1)
 *   H  = logits                               [N][E]  evaluation (no noise)
 *   ids = top K of H (ties: the lower id), slots in decreasing H
 *   w_j = route_scale · softmax over the K kept H   (cfg.renormalize is not read:
 *                                                    this is renormalised top-k)
 *
 * The draws eps come from moe__router_normal (counter-based in call, token
 * and expert), so they do not depend on the thread count; they are stored,
 * because router.c advances the call counter after the forward.
 *
 * Load loss (training with load_coef > 0 and K < E): the smooth estimator
 *   P(x, i) = Phi((logits_i - thr_i) / softplus(xn_i)),
 *   thr_i   = the (K+1)-th largest H when i is in the top K, else the K-th,
 *   Load_i  = sum_x P(x, i),  L_load = load_coef · var(Load) / (mean(Load)^2 + 1e-10)
 * with the population variance (divided by E), as the importance loss in
 * router.c. "K-th" and "(K+1)-th" are positions in the order the selection
 * uses (H descending, the lower id first on equal H), so at an exact tie the
 * threshold and its gradient belong to the expert ranked at that position;
 * ties have probability zero with noise. In evaluation there is no noise,
 * so the estimator is undefined and the load loss is 0 (no gradient); the
 * same holds when K = E (every expert is always chosen: P = 1).
 *
 * softplus is floored at FLT_MIN, so a very negative xn (std = 0 in fp32)
 * gives a step function instead of 0/0.
 *
 * Reductions over tokens: Load per fixed chunk of MOE__CHUNK tokens, then
 * over chunks in order; dwnoise tiles reduce over all N tokens in one sgemm.
 * Results are bit-identical for any thread count.
 */
#include "layer/layer_impl.h"

#include <cblas.h>
#include <float.h>
#include <math.h>
#include <string.h>

#define NOISY_TILE_E 256
#define NOISY_HDR 16 /* floats before the arrays: the mode flags, padded to a cache line */

/* Views of l->ws; M = max_tokens, nch = chunks of M. */
typedef struct noisy_ws {
    int *mode;    /* [2] of the last forward: noise on, load estimator on */
    float *xn;    /* [M][E] x · wnoiseᵀ */
    float *eps;   /* [M][E] the normal draws */
    float *h;     /* [M][E] noisy logits H */
    float *dxn;   /* [M][E] backward: d loss / d xn */
    float *part;  /* [nch][E] per-chunk sums of P(x, i) */
    float *dload; /* [E] d L_load / d Load_i */
    int *next;    /* [M] expert ranked K+1 (K < E) */
} noisy_ws;

static size_t chunks_of(int n) { return ((size_t)n + MOE__CHUNK - 1) / MOE__CHUNK; }

size_t moe__noisy_ws_floats(const moe_layer_config *c) {
    const size_t M = (size_t)c->max_tokens, E = (size_t)c->n_experts;
    return NOISY_HDR + 4 * M * E + chunks_of(c->max_tokens) * E + E + M;
}

static noisy_ws ws_of(const moe_layer *l) {
    const size_t M = (size_t)l->cfg.max_tokens, E = (size_t)l->cfg.n_experts;
    noisy_ws w;
    float *p = l->ws;
    /* ints share the float buffer: allocated memory takes the type stored into it */
    w.mode = (int *)p;
    p += NOISY_HDR;
    w.xn = p, p += M * E;
    w.eps = p, p += M * E;
    w.h = p, p += M * E;
    w.dxn = p, p += M * E;
    w.part = p, p += chunks_of(l->cfg.max_tokens) * E;
    w.dload = p, p += E;
    w.next = (int *)p;
    return w;
}

static inline float softplus(float v) {
    const float s = v > 0.0f ? v + log1pf(expf(-v)) : log1pf(expf(v));
    return s > FLT_MIN ? s : FLT_MIN;
}

static inline float sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }

/* Expert i is ranked at or before expert k (H descending, then id). */
static inline int ranks_before(const float *h, int i, int k) { return h[i] > h[k] || (h[i] == h[k] && i <= k); }

/* The best expert ranked after k (k is the K-th, so this is the (K+1)-th). */
static int next_after(const float *h, int E, int k) {
    int best = -1;
    for (int e = 0; e < E; e++)
        if (!ranks_before(h, e, k) && (best < 0 || h[e] > h[best])) best = e;
    return best;
}

/* z = (logit_i - thr_i) / std_i of the load estimator for one token; the
 * forward and the backward call this, so both see the same values. */
static inline float load_z(const float *lg, const float *h, const float *xn, int e, int kth, int next,
                           float *std_out, int *in_top) {
    const int in = ranks_before(h, e, kth);
    const float std = softplus(xn[e]);
    *std_out = std;
    *in_top = in;
    return (lg[e] - h[in ? next : kth]) / std;
}

/* Load_i summed over chunks in order. */
static double load_of(const float *part, size_t nch, int E, int e) {
    double s = 0.0;
    for (size_t ch = 0; ch < nch; ch++) s += part[ch * (size_t)E + e];
    return s;
}

/* L_load and d L_load / d Load_i (as router.c's importance()); under expert
 * parallelism Load is the global batch's (a fixed-order sum over ranks, so a
 * collective: router.c calls it after the ranks agree). */
static int load_loss(moe_layer *l, const noisy_ws *w, int n) {
    const int E = l->cfg.n_experts;
    const size_t nch = chunks_of(n);
    double *load = l->psum; /* [E]; router_stats refills psum later */
    for (int e = 0; e < E; e++) load[e] = load_of(w->part, nch, E, e);
    int rc = moe__ep_sum(l, load, E);
    if (rc) return rc;
    double m = 0.0, var = 0.0;
    for (int e = 0; e < E; e++) m += load[e];
    m /= E;
    for (int e = 0; e < E; e++) {
        const double d = load[e] - m;
        var += d * d;
    }
    var /= E;
    const double den = m * m + 1e-10, coef = l->cfg.load_coef;
    l->stats.load_loss = (float)(coef * var / den);
    for (int e = 0; e < E; e++) {
        const double d = load[e] - m;
        w->dload[e] = (float)(coef * (2.0 * d / E / den - var * 2.0 * m / E / (den * den)));
    }
    return MOE_OK;
}

int moe__noisy_ep_load_loss(moe_layer *l, int n) {
    const noisy_ws w = ws_of(l);
    return w.mode[1] ? load_loss(l, &w, n) : MOE_OK;
}

int moe__noisy_select(moe_layer *l, int n) {
    const moe_layer_config *c = &l->cfg;
    const int C = c->d_model, E = c->n_experts, K = c->top_k;
    const int noise = l->training, est = noise && c->load_coef > 0 && K < E;
    const noisy_ws w = ws_of(l);
    const float *wn = l->params + l->off.wnoise;
    const int nchunks = (int)chunks_of(n);
    int bad = -1; /* first token with a non-finite noisy logit */
    w.mode[0] = noise, w.mode[1] = est;

#pragma omp parallel for schedule(dynamic, 1) num_threads(l->threads)
    for (int ch = 0; ch < nchunks; ch++) {
        const int t0 = ch * MOE__CHUNK, t1 = t0 + MOE__CHUNK < n ? t0 + MOE__CHUNK : n;
        if (noise)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t1 - t0, E, C, 1.0f, l->x + (size_t)t0 * C, C,
                        wn, C, 0.0f, w.xn + (size_t)t0 * E, E);
        float *part = w.part + (size_t)ch * E; /* [E] this chunk's sum of P(x, i) */
        if (est) memset(part, 0, sizeof(float) * (size_t)E);
        int chunk_bad = -1;
        for (int t = t0; t < t1; t++) {
            const float *lg = l->logits + (size_t)t * E, *xn = w.xn + (size_t)t * E;
            float *h = w.h + (size_t)t * E, *eps = w.eps + (size_t)t * E;
            if (noise) {
                int finite = 1;
                for (int e = 0; e < E; e++) {
                    eps[e] = moe__router_normal(l, t, e);
                    h[e] = lg[e] + eps[e] * softplus(xn[e]);
                    finite &= isfinite(h[e]) != 0;
                }
                if (!finite) {
                    if (chunk_bad < 0) chunk_bad = t;
                    continue;
                }
            } else {
                memcpy(h, lg, sizeof(float) * (size_t)E);
            }
            int *ids = l->topk_ids + (size_t)t * K;
            float *gw = l->topk_w + (size_t)t * K;
            moe__topk(h, 1, 0, E, K, ids);
            /* softmax over the kept H; ids[0] holds the largest */
            float sum = 0.0f;
            for (int j = 0; j < K; j++) {
                gw[j] = expf(h[ids[j]] - h[ids[0]]);
                sum += gw[j];
            }
            const float scale = c->route_scale / sum;
            for (int j = 0; j < K; j++) gw[j] *= scale;
            if (K == E) continue;
            const int kth = ids[K - 1], next = next_after(h, E, kth);
            w.next[t] = next;
            if (!est) continue;
            for (int e = 0; e < E; e++) {
                float std;
                int in;
                const float z = load_z(lg, h, xn, e, kth, next, &std, &in);
                part[e] += 0.5f * erfcf(-z * (float)M_SQRT1_2);
            }
        }
        if (chunk_bad >= 0) {
#pragma omp critical(moe_noisy_bad)
            if (bad < 0 || chunk_bad < bad) bad = chunk_bad;
        }
    }
    if (bad >= 0) {
        const float *xn = w.xn + (size_t)bad * E;
        int e = 0;
        while (e < E && isfinite(w.h[(size_t)bad * E + e])) e++;
        return moe__set_err(l->err, sizeof l->err, MOE_ENONFINITE,
                            "noisy logit of token %d, expert %d is non-finite (noise logit %g: non-finite "
                            "wnoise?)",
                            bad, e, (double)xn[e]);
    }

    moe__slots_token_choice(l, n, K);
    memset(l->keep, 1, (size_t)n * K);
    l->stats.load_loss = 0.0f;
    if (est && !l->dist) return load_loss(l, &w, n); /* expert parallelism: moe__noisy_ep_load_loss */
    return MOE_OK;
}

/* Adds to dlogits the gate path through the softmax over the kept H and the
 * load loss's; collects d loss / d xn and takes it into dwnoise and dx. */
void moe__noisy_backward(moe_layer *l, const float *x, float *dx) {
    const moe_layer_config *c = &l->cfg;
    const int C = c->d_model, E = c->n_experts, K = c->top_k, n = l->n;
    const noisy_ws w = ws_of(l);
    const int noise = w.mode[0], est = w.mode[1];

#pragma omp parallel for schedule(static) num_threads(l->threads)
    for (int t = 0; t < n; t++) {
        const float *lg = l->logits + (size_t)t * E, *h = w.h + (size_t)t * E;
        const float *xn = w.xn + (size_t)t * E, *eps = w.eps + (size_t)t * E;
        const int *ids = l->topk_ids + (size_t)t * K;
        const float *gw = l->topk_w + (size_t)t * K, *dg = l->dgate + (size_t)t * K;
        float *dl = l->dlogits + (size_t)t * E, *dxn = w.dxn + (size_t)t * E;
        if (noise) memset(dxn, 0, sizeof(float) * (size_t)E);

        /* w_j = s p_j, p = softmax(H kept): dH_j = w_j (dg_j - sum_i dg_i p_i) */
        float gdot = 0.0f;
        for (int j = 0; j < K; j++) gdot += dg[j] * gw[j];
        gdot /= c->route_scale;
        for (int j = 0; j < K; j++) {
            const int e = ids[j];
            const float dh = gw[j] * (dg[j] - gdot);
            dl[e] += dh;
            if (noise) dxn[e] += dh * eps[e] * sigmoid(xn[e]);
        }
        if (!est) continue;

        /* P = Phi(z), z = (lg_i - thr_i) / std_i: to lg_i, to std_i (so xn_i),
         * and to thr_i, the H of the expert ranked K+1 (for i in the top K)
         * or K (the others) */
        const int kth = ids[K - 1], next = w.next[t];
        float dthr_in = 0.0f, dthr_out = 0.0f;
        for (int e = 0; e < E; e++) {
            float std;
            int in;
            const float z = load_z(lg, h, xn, e, kth, next, &std, &in);
            const float pdf = 0.3989422804014327f * expf(-0.5f * z * z);
            if (pdf == 0.0f) continue; /* also keeps z = +-inf out of the products */
            const float g = w.dload[e] * pdf / std; /* d L / d lg_i = -d L / d thr_i */
            dl[e] += g;
            dxn[e] -= g * z * sigmoid(xn[e]);
            if (in) dthr_in -= g;
            else dthr_out -= g;
        }
        dl[next] += dthr_in;
        dxn[next] += dthr_in * eps[next] * sigmoid(xn[next]);
        dl[kth] += dthr_out;
        dxn[kth] += dthr_out * eps[kth] * sigmoid(xn[kth]);
    }
    if (!noise || n == 0) return; /* evaluation: wnoise took no part */

    float *dwn = l->grads + l->off.wnoise;
    const float *wn = l->params + l->off.wnoise;
    const int nchunks = (int)chunks_of(n);
    const int etiles = (E + NOISY_TILE_E - 1) / NOISY_TILE_E, ctiles = (C + MOE__TILE_N - 1) / MOE__TILE_N;
#pragma omp parallel num_threads(l->threads)
    {
        /* dwnoise [E][C] += dxnᵀ [E][N] x [N][C]: each element reduced over all
         * N tokens in one call */
#pragma omp for schedule(dynamic, 1) nowait
        for (int tile = 0; tile < etiles * ctiles; tile++) {
            const int e0 = tile / ctiles * NOISY_TILE_E, c0 = tile % ctiles * MOE__TILE_N;
            const int e1 = e0 + NOISY_TILE_E < E ? e0 + NOISY_TILE_E : E;
            const int c1 = c0 + MOE__TILE_N < C ? c0 + MOE__TILE_N : C;
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, e1 - e0, c1 - c0, n, 1.0f, w.dxn + e0, E,
                        x + c0, C, 1.0f, dwn + (size_t)e0 * C + c0, C);
        }
        /* dx [N][C] += dxn [N][E] wnoise [E][C] */
        if (dx) {
#pragma omp for schedule(dynamic, 1)
            for (int ch = 0; ch < nchunks; ch++) {
                const int t0 = ch * MOE__CHUNK, t1 = t0 + MOE__CHUNK < n ? t0 + MOE__CHUNK : n;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t1 - t0, C, E, 1.0f, w.dxn + (size_t)t0 * E,
                            E, wn, C, 1.0f, dx + (size_t)t0 * C, C);
            }
        }
    }
}
