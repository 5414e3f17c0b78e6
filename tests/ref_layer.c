#include "ref_layer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static void logits_of(const moe_layer_config *c, const double *wg, const double *xt, double *lg) {
    for (int e = 0; e < c->n_experts; e++) {
        double s = 0;
        for (int i = 0; i < c->d_model; i++) s += wg[(size_t)e * c->d_model + i] * xt[i];
        lg[e] = s;
    }
}

void ref_sort_desc(const double *v, int lo, int hi, int *ord) {
    const int m = hi - lo;
    for (int i = 0; i < m; i++) ord[i] = lo + i;
    for (int i = 1; i < m; i++) {
        int a = ord[i], j = i;
        while (j > 0 && (v[ord[j - 1]] < v[a] || (v[ord[j - 1]] == v[a] && ord[j - 1] > a))) {
            ord[j] = ord[j - 1];
            j--;
        }
        ord[j] = a;
    }
}

/* Full sort by logit, descending, lower id first on ties. */
static void order_of(int E, const double *lg, int *ord) { ref_sort_desc(lg, 0, E, ord); }

double ref_act(moe_act a, double h1, double h3) {
    switch (a) {
    case MOE_ACT_RELU: return h1 > 0 ? h1 : 0;
    case MOE_ACT_GELU: return 0.5 * h1 * (1 + tanh(sqrt(2 / M_PI) * (h1 + 0.044715 * h1 * h1 * h1)));
    case MOE_ACT_SWIGLU: return h1 / (1 + exp(-h1)) * h3;
    }
    return 0;
}

double ref_cv2(const double *v, int n) {
    double m = 0, var = 0;
    for (int e = 0; e < n; e++) m += v[e];
    m /= n;
    for (int e = 0; e < n; e++) var += (v[e] - m) * (v[e] - m);
    return var / n / (m * m + 1e-10);
}

double ref_softplus(double v) { return (v > 0 ? v : 0) + log1p(exp(-fabs(v))); }

/* Routing of every token first (the capacity rule needs all of it), then
 * the capacity decisions, then the experts over the kept slots. */
double ref_layer_objective(const moe_layer_config *c, const moe_layer_params *off, const double *p,
                           const double *x, int n, const double *dy, double *y, int *ids, double *w,
                           double *aux_out, double *z_out) {
    const int C = c->d_model, F = c->d_ff, E = c->n_experts, K = c->top_k;
    double *lg = calloc(E, sizeof *lg), *h = calloc(F, sizeof *h), *P = calloc(E, sizeof *P);
    double *yt = calloc(C, sizeof *yt);
    double *S = calloc((size_t)n * E + 1, sizeof *S), *G = calloc((size_t)n * K + 1, sizeof *G);
    int *ord = calloc(E, sizeof *ord), *count = calloc(E, sizeof *count), *ID = calloc((size_t)n * K + 1, sizeof *ID);
    char *keep = calloc((size_t)n * K + 1, 1);
    double obj = 0, zsum = 0;
    for (int t = 0; t < n; t++) {
        logits_of(c, p + off->wg, x + (size_t)t * C, lg);
        double mx = lg[0], sum = 0;
        for (int e = 1; e < E; e++) mx = fmax(mx, lg[e]);
        for (int e = 0; e < E; e++) sum += exp(lg[e] - mx);
        const double lse = mx + log(sum);
        zsum += lse * lse;
        double ssum = 0, *s = S + (size_t)t * E;
        for (int e = 0; e < E; e++) {
            s[e] = c->score == MOE_SCORE_SOFTMAX ? exp(lg[e] - lse) : 1 / (1 + exp(-lg[e]));
            ssum += s[e];
        }
        for (int e = 0; e < E; e++) P[e] += s[e] / ssum;
        order_of(E, lg, ord);
        double den = 0;
        for (int j = 0; j < K; j++) den += s[ord[j]];
        if (!c->renormalize) den = 1;
        for (int j = 0; j < K; j++) {
            ID[(size_t)t * K + j] = ord[j];
            G[(size_t)t * K + j] = c->route_scale * s[ord[j]] / den;
            count[ord[j]]++;
        }
    }
    /* capacity: per expert, the first cap slots in (token, slot) order, or
     * the cap with the highest probability (ties: the earlier slot) */
    const int R = n * K;
    for (int i = 0; i < R; i++) keep[i] = 1;
    if (c->capacity_factor > 0 && n > 0) {
        int cap = (int)ceil((double)c->capacity_factor * n * K / E);
        if (cap < 1) cap = 1;
        for (int e = 0; e < E; e++) {
            if (count[e] <= cap) continue;
            for (int kept = 0, i = 0; i < R; i++) {
                if (ID[i] != e) continue;
                if (c->drop_policy == MOE_DROP_ARRIVAL) {
                    keep[i] = kept++ < cap;
                } else { /* rank among this expert's slots */
                    int better = 0;
                    const double si = S[(size_t)(i / K) * E + e];
                    for (int k = 0; k < R; k++) {
                        if (ID[k] != e || k == i) continue;
                        const double sk = S[(size_t)(k / K) * E + e];
                        better += sk > si || (sk == si && k < i);
                    }
                    keep[i] = better < cap;
                }
            }
        }
    }
    for (int t = 0; t < n; t++) {
        const double *xt = x + (size_t)t * C;
        memset(yt, 0, sizeof(double) * C);
        for (int j = 0; j < K; j++) {
            const int e = ID[(size_t)t * K + j];
            const double g = G[(size_t)t * K + j];
            if (ids) ids[(size_t)t * K + j] = e;
            if (w) w[(size_t)t * K + j] = g;
            if (!keep[(size_t)t * K + j]) continue;
            const double *w1 = p + off->w1 + (size_t)e * F * C, *w2 = p + off->w2 + (size_t)e * C * F;
            const double *w3 = c->act == MOE_ACT_SWIGLU ? p + off->w3 + (size_t)e * F * C : NULL;
            for (int f = 0; f < F; f++) {
                double a1 = 0, a3 = 0;
                for (int i = 0; i < C; i++) {
                    a1 += w1[(size_t)f * C + i] * xt[i];
                    if (w3) a3 += w3[(size_t)f * C + i] * xt[i];
                }
                h[f] = ref_act(c->act, a1, a3);
            }
            for (int o = 0; o < C; o++) {
                double v = 0;
                for (int f = 0; f < F; f++) v += w2[(size_t)o * F + f] * h[f];
                yt[o] += g * v;
            }
        }
        for (int o = 0; o < C; o++) {
            if (y) y[(size_t)t * C + o] = yt[o];
            if (dy) obj += yt[o] * dy[(size_t)t * C + o];
        }
    }
    double aux = 0;
    for (int e = 0; e < E && n > 0; e++) aux += (double)count[e] / ((double)n * K) * P[e] / n;
    aux *= (double)c->aux_coef * E;
    const double z = n > 0 ? c->z_coef * zsum / n : 0;
    if (aux_out) *aux_out = aux;
    if (z_out) *z_out = z;
    free(lg), free(h), free(P), free(yt), free(S), free(G), free(ord), free(count), free(ID), free(keep);
    return obj + aux + z;
}

double ref_layer_margin(const moe_layer_config *c, const moe_layer_params *off, const double *p,
                        const double *x, int n) {
    const int E = c->n_experts, K = c->top_k;
    double *lg = calloc(E, sizeof *lg), m = INFINITY;
    int *ord = calloc(E, sizeof *ord);
    for (int t = 0; t < n; t++) {
        logits_of(c, p + off->wg, x + (size_t)t * c->d_model, lg);
        order_of(E, lg, ord);
        const int last = K < E ? K : E - 1;
        for (int j = 0; j < last; j++) m = fmin(m, lg[ord[j]] - lg[ord[j + 1]]);
    }
    free(lg), free(ord);
    return m;
}
