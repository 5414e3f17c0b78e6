/* Routers that are not "each token takes its top k": expert choice (each
 * expert takes its top tokens), forced balance (round-robin, for benchmarks)
 * and GShard's random routing of the second expert. */
#include "layer/layer_impl.h"

#include <math.h>
#include <string.h>

/* Tokens each expert takes: ceil(cf N K / E) with cf = capacity_factor (1
 * when 0), at least 1 when there are tokens, at most N. */
int moe__ec_capacity(const moe_layer_config *c, int n) {
    if (n <= 0) return 0;
    const double cf = c->capacity_factor > 0 ? c->capacity_factor : 1.0;
    const double cap = ceil(cf * n * c->top_k / c->n_experts);
    return cap < 1 ? 1 : cap > n ? n : (int)cap;
}

/* Expert e takes the cap tokens with the highest score s[t][e] (ties: the
 * lower token id); gate weight = route_scale * s[t][e]. Selection runs per
 * expert in parallel; the slots are then laid out by token (a counting sort),
 * a token's slots in increasing expert id. */
int moe__ec_select(moe_layer *l, int n) {
    const moe_layer_config *c = &l->cfg;
    const int E = c->n_experts, cap = moe__ec_capacity(c, n);
    /* order[] holds, per expert, its chosen tokens: [E][cap] */
    int *chosen = l->order;
#pragma omp parallel for schedule(dynamic, 1) num_threads(l->threads)
    for (int e = 0; e < E; e++) moe__topk(l->scores + e, (size_t)E, 0, n, cap, chosen + (size_t)e * cap);
    /* counting sort by token */
    int *off = l->tok_off;
    memset(off, 0, sizeof(int) * (size_t)(n + 1));
    for (int i = 0; i < E * cap; i++) off[chosen[i] + 1]++;
    for (int t = 0; t < n; t++) off[t + 1] += off[t];
    for (int e = 0; e < E; e++) /* e ascending: a token's slots in expert order */
        for (int j = 0; j < cap; j++) {
            const int t = chosen[(size_t)e * cap + j], i = off[t]++;
            l->slot_tok[i] = t;
            l->topk_ids[i] = e;
            l->topk_w[i] = c->route_scale * l->scores[(size_t)t * E + e];
        }
    for (int t = n; t > 0; t--) off[t] = off[t - 1];
    off[0] = 0;
    l->n_slots = E * cap;
    memset(l->keep, 1, (size_t)l->n_slots);
    return MOE_OK;
}

/* Slot j of token t -> expert (t K + j) mod E, weight 1/K: every expert gets
 * the same number of slots (to within one), whatever the router says. */
int moe__balanced_select(moe_layer *l, int n) {
    const int E = l->cfg.n_experts, K = l->cfg.top_k;
    moe__slots_token_choice(l, n, K);
    const long long base = (long long)l->tok_base * K; /* the global slot index (expert parallelism) */
    for (int i = 0; i < n * K; i++) {
        l->topk_ids[i] = (int)((base + i) % E);
        l->topk_w[i] = 1.0f / K;
    }
    memset(l->keep, 1, (size_t)n * K);
    return MOE_OK;
}

/* GShard: the second expert of a top-2 token is kept with probability
 * min(1, 2 g2), g2 = its normalised gate weight w2 / (w1 + w2). The draw is
 * counter-based in (call, token), so it does not depend on threads. */
void moe__gshard_random(moe_layer *l, int n) {
    for (int t = 0; t < n; t++) {
        const float w1 = l->topk_w[2 * t], w2 = l->topk_w[2 * t + 1];
        const float g2 = w1 + w2 > 0 ? w2 / (w1 + w2) : 0.0f;
        if (moe__router_uniform(l, t, 0) >= 2.0f * g2) l->keep[2 * t + 1] = 0;
    }
}
