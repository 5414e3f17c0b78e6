/* Router: logits = x wg^T (fp32), scores, top-k, gate weights, auxiliary
 * losses and routing statistics; and the exact backward of all of it.
 *
 * Top-k is taken over the logits (softmax and sigmoid are monotone, and the
 * logits do not saturate as fp32 scores do); on equal logits the lower expert
 * id wins. Slots come out in decreasing logit order.
 *
 * Reductions over tokens (aux-loss P_i, entropy, z-loss) are summed per fixed
 * chunk of MOE__CHUNK tokens, then over chunks in order, so the result is the
 * same for any thread count.
 */
#include "layer/layer_impl.h"

#include "mathx.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

#define ROUTER_TILE_E 256

/* Per-token normalised scores q (what P_i and the entropy are taken over):
 * softmax scores are already normalised; sigmoid scores are divided by their
 * sum. Returns the normaliser (1 for softmax). */
static float score_norm(const moe_layer_config *c, const float *s) {
    if (c->score == MOE_SCORE_SOFTMAX) return 1.0f;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int e = 0; e < c->n_experts; e++) sum += s[e];
    return sum;
}

/* Scores, lse and top-k of one token; returns the entropy (nats) of the
 * normalised scores. Loops over E are branch-free so they vectorise; only the
 * top-k insertion branches, and rarely after the first few experts. */
static float route_token(const moe_layer_config *c, const float *lg, float *s, float *lse_out, int *ids,
                         float *w) {
    const int E = c->n_experts, K = c->top_k;
    /* omp simd reductions: a fixed vector order, the same on every run */
    float mx = lg[0];
#pragma omp simd reduction(max : mx)
    for (int e = 1; e < E; e++) mx = lg[e] > mx ? lg[e] : mx;
    float sum = 0.0f, sl = 0.0f;
#pragma omp simd reduction(+ : sum, sl)
    for (int e = 0; e < E; e++) {
        const float p = moe__exp(lg[e] - mx);
        s[e] = p;
        sum += p;
        sl += p * lg[e];
    }
    const float lse = mx + logf(sum);
    *lse_out = lse;
    float ent;
    if (c->score == MOE_SCORE_SOFTMAX) {
        const float inv = 1.0f / sum;
        for (int e = 0; e < E; e++) s[e] *= inv;
        ent = lse - sl * inv; /* -sum q log q with log q = l - lse */
    } else {
        float ssum = 0.0f, slog = 0.0f;
#pragma omp simd reduction(+ : ssum)
        for (int e = 0; e < E; e++) {
            s[e] = moe__sigmoid(lg[e]);
            ssum += s[e];
        }
        for (int e = 0; e < E; e++) slog += s[e] * logf(s[e] > 1e-30f ? s[e] : 1e-30f);
        ent = logf(ssum) - slog / ssum;
    }
    /* Keep the K best in a sorted list; strict '>' keeps the lower id ahead
     * on equal logits. The K-th best logit lives in a register, so the common
     * case is one compare per expert. */
    int n = 0;
    float kth = -INFINITY;
    for (int e = 0; e < E; e++) {
        const float v = lg[e];
        if (n == K && !(v > kth)) continue;
        int j = n < K ? n++ : K - 1;
        while (j > 0 && v > lg[ids[j - 1]]) {
            ids[j] = ids[j - 1];
            j--;
        }
        ids[j] = e;
        if (n == K) kth = lg[ids[K - 1]];
    }
    float denom = 1.0f;
    if (c->renormalize) {
        denom = 0.0f;
        for (int j = 0; j < K; j++) denom += s[ids[j]];
    }
    for (int j = 0; j < K; j++) w[j] = c->route_scale * s[ids[j]] / denom;
    return ent;
}

int moe__router_forward(moe_layer *l, const float *x, int n) {
    const moe_layer_config *c = &l->cfg;
    const int C = c->d_model, E = c->n_experts, K = c->top_k;
    const float *wg = l->params + l->off.wg;
    const int nchunks = (n + MOE__CHUNK - 1) / MOE__CHUNK;
    int bad = -1; /* first token with a non-finite logit */

#pragma omp parallel for schedule(dynamic, 1) num_threads(l->threads)
    for (int ch = 0; ch < nchunks; ch++) {
        const int t0 = ch * MOE__CHUNK, t1 = t0 + MOE__CHUNK < n ? t0 + MOE__CHUNK : n;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t1 - t0, E, C, 1.0f, x + (size_t)t0 * C,
                    C, wg, C, 0.0f, l->logits + (size_t)t0 * E, E);
        float *part = l->part + (size_t)ch * (E + 2); /* [E] score sums, entropy, lse^2 */
        memset(part, 0, sizeof(float) * (size_t)(E + 2));
        int chunk_bad = -1;
        for (int t = t0; t < t1; t++) {
            const float *lg = l->logits + (size_t)t * E;
            int finite = 1;
            for (int e = 0; e < E; e++) finite &= isfinite(lg[e]) != 0;
            if (!finite) {
                if (chunk_bad < 0) chunk_bad = t;
                continue;
            }
            float *s = l->scores + (size_t)t * E;
            const float ent =
                route_token(c, lg, s, &l->lse[t], l->topk_ids + (size_t)t * K, l->topk_w + (size_t)t * K);
            const float inv = 1.0f / score_norm(c, s);
            for (int e = 0; e < E; e++) part[e] += s[e] * inv;
            part[E] += ent;
            part[E + 1] += l->lse[t] * l->lse[t];
        }
        if (chunk_bad >= 0) {
#pragma omp critical(moe_router_bad)
            if (bad < 0 || chunk_bad < bad) bad = chunk_bad;
        }
    }
    if (bad >= 0) {
        const float *lg = l->logits + (size_t)bad * E;
        int e = 0;
        while (e < E && isfinite(lg[e])) e++;
        return moe__set_err(l->err, sizeof l->err, MOE_ENONFINITE,
                            "router logit of token %d, expert %d is %g (non-finite router weights?)",
                            bad, e, (double)lg[e]);
    }

    /* Statistics, reduced over chunks in order. */
    memset(l->counts, 0, sizeof(int) * (size_t)E);
    for (size_t i = 0; i < (size_t)n * K; i++) l->counts[l->topk_ids[i]]++;
    double *psum = l->psum;
    double ent = 0.0, z = 0.0;
    for (int e = 0; e < E; e++) psum[e] = 0.0;
    for (int ch = 0; ch < nchunks; ch++) {
        const float *part = l->part + (size_t)ch * (E + 2);
        for (int e = 0; e < E; e++) psum[e] += part[e];
        ent += part[E];
        z += part[E + 1];
    }
    moe_layer_stats *st = &l->stats;
    st->n_tokens = n;
    st->expert_count = l->counts;
    double aux = 0.0, mean = (double)n * K / E, var = 0.0, mx = 0.0;
    for (int e = 0; e < E; e++) {
        double f = n ? (double)l->counts[e] / ((double)n * K) : 0.0;
        double p = n ? psum[e] / n : 0.0;
        aux += f * p;
        double d = l->counts[e] - mean;
        var += d * d;
        if (l->counts[e] > mx) mx = l->counts[e];
    }
    st->aux_loss = (float)(c->aux_coef * E * aux);
    st->z_loss = n ? (float)(c->z_coef * z / n) : 0.0f;
    st->router_entropy = n ? (float)(ent / n) : 0.0f;
    st->load_cv = n ? (float)(sqrt(var / E) / mean) : 0.0f;
    st->load_max_over_mean = n ? (float)(mx / mean) : 0.0f;
    return MOE_OK;
}

/* dlogits from dgate (the combine's gradient), the aux loss and the z-loss;
 * then dwg += dlogits^T x and dx += dlogits wg. */
void moe__router_backward(moe_layer *l, const float *x, float *dx) {
    const moe_layer_config *c = &l->cfg;
    const int C = c->d_model, E = c->n_experts, K = c->top_k, n = l->n;
    /* d aux / d q_{t,i} = coef E f_i / N, the same for every token. */
    float *daux = l->daux;
    for (int e = 0; e < E; e++)
        daux[e] = n ? (float)((double)c->aux_coef * E * l->counts[e] / ((double)n * K) / n) : 0.0f;
    const float dz = n ? 2.0f * c->z_coef / n : 0.0f;

#pragma omp parallel for schedule(static) num_threads(l->threads)
    for (int t = 0; t < n; t++) {
        const float *s = l->scores + (size_t)t * E, *lg = l->logits + (size_t)t * E;
        const int *ids = l->topk_ids + (size_t)t * K;
        const float *dg = l->dgate + (size_t)t * K;
        float *dl = l->dlogits + (size_t)t * E; /* holds ds first, then dlogits */

        /* aux: through q = s / sum(s) for sigmoid scores */
        const float norm = score_norm(c, s);
        float qdot = 0.0f;
        if (c->score == MOE_SCORE_SIGMOID)
#pragma omp simd reduction(+ : qdot)
            for (int e = 0; e < E; e++) qdot += daux[e] * s[e] / norm;
        for (int e = 0; e < E; e++) dl[e] = c->score == MOE_SCORE_SIGMOID ? (daux[e] - qdot) / norm : daux[e];

        /* gates: w_j = scale s_j / S, S = sum of the K chosen scores (or 1) */
        if (c->renormalize) {
            float S = 0.0f, sd = 0.0f;
            for (int j = 0; j < K; j++) {
                S += s[ids[j]];
                sd += dg[j] * s[ids[j]];
            }
            for (int j = 0; j < K; j++) dl[ids[j]] += c->route_scale * (dg[j] * S - sd) / (S * S);
        } else {
            for (int j = 0; j < K; j++) dl[ids[j]] += c->route_scale * dg[j];
        }

        /* through the score function */
        if (c->score == MOE_SCORE_SOFTMAX) {
            float sds = 0.0f;
#pragma omp simd reduction(+ : sds)
            for (int e = 0; e < E; e++) sds += s[e] * dl[e];
            for (int e = 0; e < E; e++) dl[e] = s[e] * (dl[e] - sds);
        } else {
            for (int e = 0; e < E; e++) dl[e] *= s[e] * (1.0f - s[e]);
        }

        /* z-loss: d/dl (lse^2) = 2 lse softmax(l) */
        if (dz != 0.0f) {
            const float g = dz * l->lse[t];
            for (int e = 0; e < E; e++) dl[e] += g * moe__exp(lg[e] - l->lse[t]);
        }
    }

    float *dwg = l->grads + l->off.wg;
    const int nchunks = (n + MOE__CHUNK - 1) / MOE__CHUNK;
    /* dwg tiles: ROUTER_TILE_E experts x MOE__TILE_N columns, enough tiles for
     * every thread even at small C */
    const int etiles = (E + ROUTER_TILE_E - 1) / ROUTER_TILE_E, ctiles = (C + MOE__TILE_N - 1) / MOE__TILE_N;
#pragma omp parallel num_threads(l->threads)
    {
        /* dwg [E][C] += dlogits^T [E][N] x [N][C]: each output element reduced
         * over all N tokens in one call. */
#pragma omp for schedule(dynamic, 1) nowait
        for (int tile = 0; tile < etiles * ctiles; tile++) {
            const int e0 = tile / ctiles * ROUTER_TILE_E, c0 = tile % ctiles * MOE__TILE_N;
            const int e1 = e0 + ROUTER_TILE_E < E ? e0 + ROUTER_TILE_E : E;
            const int c1 = c0 + MOE__TILE_N < C ? c0 + MOE__TILE_N : C;
            if (n > 0)
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, e1 - e0, c1 - c0, n, 1.0f, l->dlogits + e0,
                            E, x + c0, C, 1.0f, dwg + (size_t)e0 * C + c0, C);
        }
        /* dx [N][C] += dlogits [N][E] wg [E][C] */
        if (dx) {
#pragma omp for schedule(dynamic, 1)
            for (int ch = 0; ch < nchunks; ch++) {
                const int t0 = ch * MOE__CHUNK, t1 = t0 + MOE__CHUNK < n ? t0 + MOE__CHUNK : n;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t1 - t0, C, E, 1.0f,
                            l->dlogits + (size_t)t0 * E, E, l->params + l->off.wg, C, 1.0f,
                            dx + (size_t)t0 * C, C);
            }
        }
    }
}
