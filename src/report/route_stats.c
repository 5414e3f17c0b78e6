/* Routing audit accumulators and statistics (docs/audit.md). */
#include "report/route_stats.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int moe__route_acc_init(moe__route_acc *a, int G, int L, int E) {
    memset(a, 0, sizeof *a);
    if (G <= 0 || L <= 0 || E <= 0 || G > 1024 || L > 4096 || E > (1 << 20)) return MOE_EINVAL;
    size_t gle;
    if (moe__mul_size((size_t)G * (size_t)L, (size_t)E, &gle)) return MOE_ELIMIT;
    a->G = G, a->L = L, a->E = E;
    a->count = moe__calloc(gle, sizeof *a->count);
    a->mass = moe__calloc(gle, sizeof *a->mass);
    a->ent = moe__calloc((size_t)L, sizeof *a->ent);
    a->ent_tokens = moe__calloc((size_t)L, sizeof *a->ent_tokens);
    a->tokens = moe__calloc((size_t)G, sizeof *a->tokens);
    a->ce = moe__calloc((size_t)G, sizeof *a->ce);
    a->ce_tokens = moe__calloc((size_t)G, sizeof *a->ce_tokens);
    if (!a->count || !a->mass || !a->ent || !a->ent_tokens || !a->tokens || !a->ce || !a->ce_tokens) {
        moe__route_acc_free(a);
        return MOE_ENOMEM;
    }
    return MOE_OK;
}

void moe__route_acc_free(moe__route_acc *a) {
    moe__free(a->count), moe__free(a->mass), moe__free(a->ent), moe__free(a->ent_tokens);
    moe__free(a->tokens), moe__free(a->ce), moe__free(a->ce_tokens);
    memset(a, 0, sizeof *a);
}

int moe__route_acc_add(moe__route_acc *a, int l, int n, const int *group, const int *tok_off, const int *ids,
                       const float *w, const unsigned char *kept, double entropy_mean) {
    if (l < 0 || l >= a->L || n < 0) return MOE_EINVAL;
    /* validate everything first so that a bad call leaves the totals unchanged */
    for (int t = 0; t < n; t++) {
        if (group[t] < 0 || group[t] >= a->G || tok_off[t + 1] < tok_off[t]) return MOE_EINVAL;
        for (int s = tok_off[t]; s < tok_off[t + 1]; s++)
            if (ids[s] < 0 || ids[s] >= a->E) return MOE_EINVAL;
    }
    for (int t = 0; t < n; t++) {
        const size_t base = ((size_t)group[t] * a->L + l) * a->E;
        for (int s = tok_off[t]; s < tok_off[t + 1]; s++) {
            if (kept && !kept[s]) continue;
            a->count[base + ids[s]]++;
            a->mass[base + ids[s]] += w[s];
        }
        if (l == 0) a->tokens[group[t]]++;
    }
    a->ent[l] += entropy_mean * n;
    a->ent_tokens[l] += n;
    return MOE_OK;
}

int moe__route_acc_add_loss(moe__route_acc *a, int n, const int *group, const float *ce) {
    for (int t = 0; t < n; t++)
        if (group[t] < 0 || group[t] >= a->G) return MOE_EINVAL;
    for (int t = 0; t < n; t++) a->ce[group[t]] += ce[t], a->ce_tokens[group[t]]++;
    return MOE_OK;
}

int64_t moe__route_count(const moe__route_acc *a, int g, int l, int e) {
    if (g >= 0) return a->count[((size_t)g * a->L + l) * a->E + e];
    int64_t s = 0;
    for (int h = 0; h < a->G; h++) s += a->count[((size_t)h * a->L + l) * a->E + e];
    return s;
}

static double sum_of(const double *x, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += x[i];
    return s;
}

double moe__route_cv(const double *x, int n) {
    if (n <= 0) return 0;
    const double mean = sum_of(x, n) / n;
    if (mean <= 0) return 0;
    double var = 0;
    for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    return sqrt(var / n) / mean;
}

double moe__route_max_over_mean(const double *x, int n) {
    if (n <= 0) return 0;
    const double mean = sum_of(x, n) / n;
    if (mean <= 0) return 0;
    double mx = x[0];
    for (int i = 1; i < n; i++) mx = fmax(mx, x[i]);
    return mx / mean;
}

double moe__route_norm_entropy(const double *x, int n) {
    const double s = sum_of(x, n);
    if (n <= 0 || s <= 0) return 0;
    if (n == 1) return 1;
    double h = 0;
    for (int i = 0; i < n; i++)
        if (x[i] > 0) h -= x[i] / s * log(x[i] / s);
    return h / log(n);
}

double moe__route_js(const double *x, const double *y, int n) {
    const double sx = sum_of(x, n), sy = sum_of(y, n);
    if (!(sx > 0) || !(sy > 0)) return NAN;
    double js = 0;
    for (int i = 0; i < n; i++) {
        const double p = x[i] / sx, q = y[i] / sy, m = 0.5 * (p + q);
        if (p > 0) js += 0.5 * p * log2(p / m);
        if (q > 0) js += 0.5 * q * log2(q / m);
    }
    return js < 0 ? 0 : js > 1 ? 1 : js; /* rounding only */
}

static int flag_cmp(const void *pa, const void *pb) {
    const moe__route_flag *a = pa, *b = pb;
    if (a->ratio != b->ratio) return a->ratio > b->ratio ? -1 : 1;
    if (a->group != b->group) return a->group - b->group;
    if (a->layer != b->layer) return a->layer - b->layer;
    return a->expert - b->expert;
}

int moe__route_flags(const moe__route_acc *a, double min_ratio, int64_t min_count, moe__route_flag *out, int max_out) {
    int nf = 0;
    /* at most one flag per (group, layer, expert): the init bounded G L E */
    moe__route_flag *all = moe__calloc((size_t)a->G * a->L * a->E, sizeof *all);
    if (!all) return MOE_ENOMEM;
    for (int l = 0; l < a->L; l++) {
        int64_t layer_total = 0;
        for (int e = 0; e < a->E; e++) layer_total += moe__route_count(a, -1, l, e);
        for (int g = 0; g < a->G; g++) {
            int64_t gtot = 0;
            for (int e = 0; e < a->E; e++) gtot += moe__route_count(a, g, l, e);
            const int64_t rtot = layer_total - gtot;
            if (gtot <= 0 || rtot <= 0) continue;
            for (int e = 0; e < a->E; e++) {
                const int64_t c = moe__route_count(a, g, l, e), rc = moe__route_count(a, -1, l, e) - c;
                const double share = (double)c / gtot, rest = (double)rc / rtot;
                const double ratio = rest > 0 ? share / rest : INFINITY;
                if (c < min_count || !(ratio >= min_ratio)) continue;
                all[nf++] = (moe__route_flag){g, l, e, c, share, rest, ratio};
            }
        }
    }
    if (nf) qsort(all, (size_t)nf, sizeof *all, flag_cmp);
    for (int i = 0; i < nf && i < max_out; i++) out[i] = all[i];
    moe__free(all);
    return nf;
}
