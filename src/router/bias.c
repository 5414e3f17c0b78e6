/* Auxiliary-loss-free balancing (DeepSeek-V3) and group-limited routing.
 *
 * Selection uses v_e = s_e + b_e (s: the unbiased score, b: the ebias block,
 * 0 without balancing); gate weights are taken from s alone (router.c). With
 * n_groups > 1 the experts form n_groups contiguous groups; a group's score
 * is the sum of its two best v (its best when a group has one expert); the
 * topk_groups best groups are kept and the top k is taken inside them. Ties
 * go to the lower id, for groups and for experts.
 */
#include "layer/layer_impl.h"

#include <math.h>
#include <string.h>

void moe__biased_topk(const moe_layer *l, int t, int *ids, float *scratch) {
    const moe_layer_config *c = &l->cfg;
    const int E = c->n_experts, K = c->top_k;
    const float *s = l->scores + (size_t)t * E;
    const float *b = l->off.ebias != SIZE_MAX ? l->params + l->off.ebias : NULL;
    float *v = scratch;         /* [E] selection scores, -inf outside kept groups */
    float *gs = scratch + E;    /* [G] group scores */
    for (int e = 0; e < E; e++) v[e] = b ? s[e] + b[e] : s[e];
    if (c->n_groups > 1) {
        const int G = c->n_groups, per = E / G;
        for (int g = 0; g < G; g++) {
            float m1 = -INFINITY, m2 = -INFINITY;
            for (int e = g * per; e < (g + 1) * per; e++) {
                if (v[e] > m1) m2 = m1, m1 = v[e];
                else if (v[e] > m2) m2 = v[e];
            }
            gs[g] = per > 1 ? m1 + m2 : m1;
        }
        /* mark the kept groups by ranking: group g is kept when fewer than
         * topk_groups groups beat it (strictly, or equal with a lower id) */
        for (int g = 0; g < G; g++) {
            int better = 0;
            for (int h = 0; h < G; h++) better += gs[h] > gs[g] || (gs[h] == gs[g] && h < g);
            if (better >= c->topk_groups)
                for (int e = g * per; e < (g + 1) * per; e++) v[e] = -INFINITY;
        }
    }
    /* top k of v: the kept groups hold at least K finite values (the k
     * check at creation and in moe_layer_set_top_k), so -inf never wins */
    moe__topk(v, 1, 0, E, K, ids);
}

int moe_layer_update_bias(moe_layer *l) {
    if (!l) return MOE_EINVAL;
    const moe_layer_config *c = &l->cfg;
    if (c->bias_update_rate <= 0 || l->off.ebias == SIZE_MAX) return MOE_OK;
    const int E = c->n_experts;
    int64_t total = 0;
    for (int e = 0; e < E; e++) total += l->bias_load[e];
    if (total == 0) return MOE_OK;
    float *b = l->params + l->off.ebias;
    const double mean = (double)total / E;
    /* sign(mean - load): underloaded experts (load < mean) move up */
    for (int e = 0; e < E; e++) {
        const double d = mean - (double)l->bias_load[e];
        b[e] += d > 0 ? c->bias_update_rate : d < 0 ? -c->bias_update_rate : 0.0f;
        l->bias_load[e] = 0;
    }
    return MOE_OK;
}
