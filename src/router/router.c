/* Router: logits = x wg^T (fp32), scores, selection, gate weights, the
 * common losses (Switch aux, sequence-wise aux, z-loss, importance) and
 * routing statistics; and the exact backward of all of it. Scheme-specific
 * selection lives beside this file (noisy.c, choice.c, bias.c, hier.c).
 *
 * TOPK takes the top k over the logits (softmax and sigmoid are monotone,
 * and the logits do not saturate as fp32 scores do), or over scores + bias
 * with aux-loss-free balancing; on equal values the lower expert id wins.
 * Slots come out in decreasing order.
 *
 * Reductions over tokens (aux-loss P_i, entropy, z-loss) are summed per fixed
 * chunk of MOE__CHUNK tokens, then over chunks in order, so the result is the
 * same for any thread count.
 */
#include "layer/layer_impl.h"

#include "mathx.h"

#include <cblas.h>
#include <omp.h>
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

/* ---- counter-based random numbers --------------------------------------- */

static uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t draw(const moe_layer *l, int t, int i) {
    /* global token index: the same draw for a token on any rank */
    const uint32_t g = (uint32_t)(t + l->tok_base);
    return mix64(mix64(mix64(l->cfg.seed ^ 0x6d6f65726f757465ull) + l->calls) + ((uint64_t)g << 32 | (uint32_t)i));
}

float moe__router_uniform(const moe_layer *l, int t, int i) {
    return (float)((draw(l, t, i) >> 40) * 0x1.0p-24);
}

float moe__router_normal(const moe_layer *l, int t, int i) {
    /* Box-Muller on two independent 53-bit uniforms; u1 in (0, 1] */
    const uint64_t a = draw(l, t, 2 * i), b = draw(l, t, 2 * i + 1) ;
    const double u1 = ((a >> 11) + 1) * 0x1.0p-53, u2 = (b >> 11) * 0x1.0p-53;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* ---- scores and top-k ----------------------------------------------------- */

/* Scores s and lse of one token's logits; returns the entropy (nats) of the
 * normalised scores. Loops over E are branch-free so they vectorise. */
static float score_token(const moe_layer_config *c, const float *lg, float *s, float *lse_out) {
    const int E = c->n_experts;
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
    if (c->score == MOE_SCORE_SOFTMAX) {
        const float inv = 1.0f / sum;
        for (int e = 0; e < E; e++) s[e] *= inv;
        return lse - sl * inv; /* -sum q log q with log q = l - lse */
    }
    float ssum = 0.0f, slog = 0.0f;
#pragma omp simd reduction(+ : ssum)
    for (int e = 0; e < E; e++) {
        s[e] = moe__sigmoid(lg[e]);
        ssum += s[e];
    }
    for (int e = 0; e < E; e++) slog += s[e] * logf(s[e] > 1e-30f ? s[e] : 1e-30f);
    return logf(ssum) - slog / ssum;
}

/* NaN ranks as -Inf: a NaN score must never win a slot over a number, and
 * comparisons with it must not break the insertion order */
static inline float rank_key(float x) { return x != x ? -INFINITY : x; }

void moe__topk(const float *v, size_t stride, int lo, int hi, int k, int *ids) {
    /* a sorted insertion; the k-th best lives in a register, so the common
     * case is one compare per candidate */
    int m = 0;
    float kth = -INFINITY;
    for (int i = lo; i < hi; i++) {
        const float x = rank_key(v[(size_t)i * stride]);
        if (m == k && !(x > kth)) continue;
        int j = m < k ? m++ : k - 1;
        while (j > 0 && x > rank_key(v[(size_t)ids[j - 1] * stride])) {
            ids[j] = ids[j - 1];
            j--;
        }
        ids[j] = i;
        if (m == k) kth = rank_key(v[(size_t)ids[k - 1] * stride]);
    }
}

/* Gate weights of a token's chosen experts from its unbiased scores. */
static void topk_weights(const moe_layer_config *c, const float *s, const int *ids, int K, float *w) {
    float denom = 1.0f;
    if (c->renormalize) {
        denom = 0.0f;
        for (int j = 0; j < K; j++) denom += s[ids[j]];
    }
    for (int j = 0; j < K; j++) w[j] = c->route_scale * s[ids[j]] / denom;
}

void moe__slots_token_choice(moe_layer *l, int n, int K) {
    for (int t = 0; t <= n; t++) l->tok_off[t] = t * K;
    for (int i = 0; i < n * K; i++) l->slot_tok[i] = i / K;
    l->n_slots = n * K;
}

/* ---- statistics and losses ------------------------------------------------ */

/* Sequence-wise aux loss (DeepSeek-V3): the Switch formula on each block of
 * aux_seq_len tokens, averaged over blocks; fills blk_daux. */
static int aux_per_block(moe_layer *l, int n, double *aux) {
    const moe_layer_config *c = &l->cfg;
    const int E = c->n_experts, S = c->aux_seq_len, nb = (n + S - 1) / S;
    /* under expert parallelism every rank's tokens start on a block
     * boundary (moe__ep_start checks it): the blocks are local, their count
     * and the sum of their losses global */
    long long nblk = nb;
    if (l->dist) {
        nblk = 0;
        for (int q = 0; q < l->ep_size; q++) nblk += (l->ep_ntok[q] + S - 1) / S;
    }
    double total = 0.0;
    for (int b = 0; b < nb; b++) {
        const int t0 = b * S, t1 = t0 + S < n ? t0 + S : n, T = t1 - t0;
        const int r0 = l->tok_off[t0], r1 = l->tok_off[t1], R = r1 - r0;
        double *q = l->psum; /* reused as the block's sum of q */
        int *cnt = l->blk_counts;
        for (int e = 0; e < E; e++) q[e] = 0.0, cnt[e] = 0;
        for (int t = t0; t < t1; t++) {
            const float *st = l->scores + (size_t)t * E, inv = 1.0f / score_norm(c, st);
            for (int e = 0; e < E; e++) q[e] += st[e] * inv;
        }
        for (int i = r0; i < r1; i++) cnt[l->topk_ids[i]]++;
        double a = 0.0;
        float *da = l->blk_daux + (size_t)b * E;
        for (int e = 0; e < E; e++) {
            const double f = R ? (double)cnt[e] / R : 0.0;
            a += f * q[e] / T;
            da[e] = (float)((double)c->aux_coef * E * f / T / nblk);
        }
        total += c->aux_coef * E * a;
    }
    int rc = moe__ep_sum(l, &total, 1);
    if (rc) return rc;
    *aux = nblk ? total / nblk : 0.0;
    return MOE_OK;
}

/* Importance loss w CV(imp)^2, imp_e = sum of the gate weights of expert e
 * over all slots; population variance, CV^2 = var / (mean^2 + 1e-10) as in
 * Shazeer et al.'s code. Fills dimp (d loss / d imp_e). */
static int importance(moe_layer *l) {
    const int E = l->cfg.n_experts, R = l->n_slots;
    double *imp = l->psum; /* free again after the aux loss */
    for (int e = 0; e < E; e++) imp[e] = 0.0;
    for (int i = 0; i < R; i++) imp[l->topk_ids[i]] += l->topk_w[i];
    int rc = moe__ep_sum(l, imp, E);
    if (rc) return rc;
    double m = 0.0, var = 0.0;
    for (int e = 0; e < E; e++) m += imp[e];
    m /= E;
    for (int e = 0; e < E; e++) var += (imp[e] - m) * (imp[e] - m);
    var /= E;
    const double den = m * m + 1e-10, w = l->cfg.importance_coef;
    l->stats.importance_cv = m > 0 ? (float)(sqrt(var) / m) : 0.0f;
    l->stats.importance_loss = (float)(w * var / den);
    for (int e = 0; e < E; e++)
        l->dimp[e] = (float)(w * (2.0 * (imp[e] - m) / E / den - var * 2.0 * m / E / (den * den)));
    return MOE_OK;
}

/* Statistics and losses of the global batch: under expert parallelism the
 * per-rank counts and sums travel in one fixed-order sum, so every rank holds
 * the same values (n and R become the global counts). */
static int router_stats(moe_layer *l, int n, int nchunks) {
    const moe_layer_config *c = &l->cfg;
    const int n_local = n;
    const int E = c->n_experts;
    int R = l->n_slots;
    memset(l->counts, 0, sizeof(int) * (size_t)E);
    for (int i = 0; i < R; i++) l->counts[l->topk_ids[i]]++;
    double *psum = l->psum;
    double ent = 0.0, z = 0.0;
    for (int e = 0; e < E; e++) psum[e] = 0.0;
    for (int ch = 0; ch < nchunks; ch++) {
        const float *part = l->part + (size_t)ch * (E + 2);
        for (int e = 0; e < E; e++) psum[e] += part[e];
        ent += part[E];
        z += part[E + 1];
    }
    if (l->dist) {
        double *v = l->ep_red; /* [E] counts, [E] psum, entropy, z, R */
        for (int e = 0; e < E; e++) v[e] = l->counts[e], v[E + e] = psum[e];
        v[2 * E] = ent, v[2 * E + 1] = z, v[2 * E + 2] = R;
        int rc = moe__ep_sum(l, v, 2 * E + 3);
        if (rc) return rc;
        for (int e = 0; e < E; e++) l->counts[e] = (int)v[e], psum[e] = v[E + e];
        ent = v[2 * E], z = v[2 * E + 1], R = (int)v[2 * E + 2];
        n = (int)l->n_glob;
    }
    if (l->training && c->bias_update_rate > 0)
        for (int e = 0; e < E; e++) l->bias_load[e] += l->counts[e];
    moe_layer_stats *st = &l->stats;
    st->n_tokens = n;
    st->n_slots = R;
    st->expert_count = l->counts;
    double aux = 0.0, mean = (double)R / E, var = 0.0, mx = 0.0;
    for (int e = 0; e < E; e++) {
        double f = R ? (double)l->counts[e] / R : 0.0;
        double p = n ? psum[e] / n : 0.0;
        aux += f * p;
        l->daux[e] = n ? (float)((double)c->aux_coef * E * f / n) : 0.0f;
        double d = l->counts[e] - mean;
        var += d * d;
        if (l->counts[e] > mx) mx = l->counts[e];
    }
    st->aux_loss = (float)(c->aux_coef * E * aux);
    if (c->aux_seq_len > 0 && c->aux_coef > 0) {
        double a;
        int rc = aux_per_block(l, n_local, &a);
        if (rc) return rc;
        st->aux_loss = (float)a;
    }
    st->z_loss = n ? (float)(c->z_coef * z / n) : 0.0f;
    st->router_entropy = n ? (float)(ent / n) : 0.0f;
    st->load_cv = R ? (float)(sqrt(var / E) / mean) : 0.0f;
    st->load_max_over_mean = R ? (float)(mx / mean) : 0.0f;
    return importance(l);
}

/* ---- forward -------------------------------------------------------------- */

int moe__router_forward(moe_layer *l, const float *x, int n) {
    const moe_layer_config *c = &l->cfg;
    const int C = c->d_model, E = c->n_experts, K = c->top_k;
    const float *wg = l->params + l->off.wg;
    const int nchunks = (n + MOE__CHUNK - 1) / MOE__CHUNK;
    const int plain_topk = c->router == MOE_ROUTER_TOPK;
    const int biased = plain_topk && (c->bias_update_rate > 0 || c->n_groups > 1);
    int bad = -1; /* first token with a non-finite logit */

    /* moe_layer_set_top_k may have moved k (it checks k against the groups);
     * GShard's rule is defined for the second of two slots, and it applies
     * in training only, so that check waits for the mode of the call */
    if (plain_topk && c->gshard_random && l->training && K != 2)
        return moe__set_err(l->err, sizeof l->err, MOE_EINVAL,
                            "gshard_random: random routing of the second expert needs top_k = 2 in training (top_k = %d)",
                            K);

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
            const float ent = score_token(c, lg, s, &l->lse[t]);
            if (plain_topk) {
                int *ids = l->topk_ids + (size_t)t * K;
                if (biased) moe__biased_topk(l, t, ids, l->tscr + (size_t)omp_get_thread_num() * 2 * E);
                else moe__topk(lg, 1, 0, E, K, ids);
                topk_weights(c, s, ids, K, l->topk_w + (size_t)t * K);
            }
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
    l->stats.importance_loss = l->stats.load_loss = l->stats.importance_cv = 0.0f;
    int rc = MOE_OK;
    if (bad >= 0) {
        const float *lg = l->logits + (size_t)bad * E;
        int e = 0;
        while (e < E && isfinite(lg[e])) e++;
        rc = moe__set_err(l->err, sizeof l->err, MOE_ENONFINITE,
                          "router logit of token %d, expert %d is %g (non-finite router weights?)",
                          bad + l->tok_base, e, (double)lg[e]);
    }
    if (bad < 0) switch (c->router) {
    case MOE_ROUTER_TOPK:
        moe__slots_token_choice(l, n, K);
        memset(l->keep, 1, (size_t)n * K);
        if (c->gshard_random && l->training) moe__gshard_random(l, n);
        break;
    case MOE_ROUTER_NOISY_TOPK: rc = moe__noisy_select(l, n); break;
    case MOE_ROUTER_EXPERT_CHOICE: /* under expert parallelism: after the agreement (a collective) */
        if (!l->dist) rc = moe__ec_select(l, n);
        break;
    case MOE_ROUTER_HIERARCHICAL: rc = moe__hier_select(l, n); break;
    case MOE_ROUTER_BALANCED: rc = moe__balanced_select(l, n); break;
    }
    /* under expert parallelism the ranks go on together or fail together */
    rc = moe__ep_agree(l, rc);
    if (!rc && l->dist && c->router == MOE_ROUTER_EXPERT_CHOICE) rc = moe__ep_ec_select(l, n);
    if (!rc && l->dist && c->router == MOE_ROUTER_NOISY_TOPK) rc = moe__noisy_ep_load_loss(l, n);
    if (rc) return rc;
    rc = router_stats(l, n, nchunks);
    if (rc) return rc;
    if (l->training) l->calls++;
    return MOE_OK;
}

/* ---- backward ------------------------------------------------------------- */

/* dlogits from dgate (the combine's gradient plus the importance loss's), the
 * aux loss and the z-loss; the scheme's own terms; then dwg += dlogits^T x
 * and dx += dlogits wg. */
void moe__router_backward(moe_layer *l, const float *x, float *dx) {
    const moe_layer_config *c = &l->cfg;
    const int C = c->d_model, E = c->n_experts, n = l->n, R = l->n_slots;
    const float dz = l->n_glob ? 2.0f * c->z_coef / (float)l->n_glob : 0.0f;
    const int seq_aux = c->aux_seq_len > 0 && c->aux_coef > 0;
    /* the gate path goes through the clean scores for these routers; noisy
     * and hierarchical gates take it in their own backward */
    const int score_weighted = c->router == MOE_ROUTER_TOPK || c->router == MOE_ROUTER_EXPERT_CHOICE;
    const int renorm = c->renormalize && c->router == MOE_ROUTER_TOPK;

    if (c->importance_coef > 0)
        for (int i = 0; i < R; i++) l->dgate[i] += l->dimp[l->topk_ids[i]];

#pragma omp parallel for schedule(static) num_threads(l->threads)
    for (int t = 0; t < n; t++) {
        const float *s = l->scores + (size_t)t * E, *lg = l->logits + (size_t)t * E;
        const float *daux = seq_aux ? l->blk_daux + (size_t)(t / c->aux_seq_len) * E : l->daux;
        const int i0 = l->tok_off[t], i1 = l->tok_off[t + 1];
        const int *ids = l->topk_ids;
        const float *dg = l->dgate;
        float *dl = l->dlogits + (size_t)t * E; /* holds ds first, then dlogits */

        /* aux: through q = s / sum(s) for sigmoid scores */
        const float norm = score_norm(c, s);
        float qdot = 0.0f;
        if (c->score == MOE_SCORE_SIGMOID)
#pragma omp simd reduction(+ : qdot)
            for (int e = 0; e < E; e++) qdot += daux[e] * s[e] / norm;
        for (int e = 0; e < E; e++) dl[e] = c->score == MOE_SCORE_SIGMOID ? (daux[e] - qdot) / norm : daux[e];

        /* gates: w_i = scale s_i / S, S = sum of the token's chosen scores (or 1) */
        if (score_weighted) {
            if (renorm) {
                float S = 0.0f, sd = 0.0f;
                for (int i = i0; i < i1; i++) {
                    S += s[ids[i]];
                    sd += dg[i] * s[ids[i]];
                }
                for (int i = i0; i < i1; i++) dl[ids[i]] += c->route_scale * (dg[i] * S - sd) / (S * S);
            } else {
                for (int i = i0; i < i1; i++) dl[ids[i]] += c->route_scale * dg[i];
            }
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

    if (c->router == MOE_ROUTER_NOISY_TOPK) moe__noisy_backward(l, x, dx);
    else if (c->router == MOE_ROUTER_HIERARCHICAL) moe__hier_backward(l, x, dx);

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
