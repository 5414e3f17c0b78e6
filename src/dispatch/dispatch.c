/* Dispatch: a stable counting sort of the R (token, expert) slots by expert
 * into contiguous row segments, the gather of token rows into that order, and
 * the combine back (in fixed slot order, so no atomics and no order that
 * depends on threads). Dropless by default: every kept slot gets a row.
 * Rows live in the token-side buffers tx, ty, tdy, tdx (the expert buffers in
 * one process; under expert parallelism ep.c moves them to the experts).
 */
#include "layer/layer_impl.h"

#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static int by_prio(const void *a, const void *b) {
    const struct moe__prio *x = a, *y = b;
    if (x->s != y->s) return x->s > y->s ? -1 : 1;
    return (x->slot > y->slot) - (x->slot < y->slot);
}

/* Clears keep[] beyond each expert's capacity: per expert the first `cap`
 * kept slots in token order (arrival) or the `cap` with the highest router
 * probability. Slots the router already dropped cost no capacity. */
static void apply_capacity(moe_layer *l, int cap) {
    const int E = l->cfg.n_experts, R = l->n_slots;
    int *off = l->seg_off; /* pre-drop segments, as a cursor */
    off[0] = 0;
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + l->counts[e];
    for (int i = 0; i < R; i++) l->order[off[l->topk_ids[i]]++] = i;
    for (int e = E; e > 0; e--) off[e] = off[e - 1];
    off[0] = 0;
    for (int e = 0; e < E; e++) {
        const int *list = l->order + off[e];
        int m = 0; /* kept slots of e, compacted to the front of list[] */
        for (int r = 0; r < l->counts[e]; r++)
            if (l->keep[list[r]]) l->order[off[e] + m++] = list[r];
        if (m <= cap) continue;
        if (l->cfg.drop_policy == MOE_DROP_ARRIVAL) {
            for (int r = cap; r < m; r++) l->keep[list[r]] = 0;
        } else {
            for (int r = 0; r < m; r++)
                l->prio[r] = (struct moe__prio){l->scores[(size_t)l->slot_tok[list[r]] * E + e], list[r]};
            qsort(l->prio, (size_t)m, sizeof *l->prio, by_prio);
            for (int r = cap; r < m; r++) l->keep[l->prio[r].slot] = 0;
        }
    }
}

int moe__dispatch_build(moe_layer *l, int n) {
    const int E = l->cfg.n_experts, K = l->cfg.top_k;
    const int R = l->n_slots;
    /* the capacity is the global batch's under expert parallelism */
    const long long ng = l->dist ? l->n_glob : n, Rg = ng * K;
    int cap = 0;
    /* expert choice is balanced by construction: no capacity drops */
    if (l->training && l->cfg.capacity_factor > 0 && ng > 0 && l->cfg.router != MOE_ROUTER_EXPERT_CHOICE) {
        const double c = ceil((double)l->cfg.capacity_factor * ng * K / E);
        cap = c < 1 ? 1 : c > Rg ? (int)Rg : (int)c;
    }
    /* slots the router already dropped (GShard's random routing) are not
     * capacity drops: stats.dropped_fraction counts only the latter */
    int router_dropped = 0, dropped = 0;
    for (int i = 0; i < R; i++) router_dropped += !l->keep[i];
    if (cap > 0 && l->dist) {
        int rc = moe__ep_capacity(l, cap);
        if (rc) return rc;
    } else if (cap > 0) {
        apply_capacity(l, cap);
    }
    memset(l->kept, 0, sizeof(int) * (size_t)E);
    for (int i = 0; i < R; i++) {
        if (l->keep[i]) l->kept[l->topk_ids[i]]++;
        else dropped++;
    }
    int *off = l->seg_off;
    off[0] = 0;
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + l->kept[e];
    /* Placing slots in (token, slot) order keeps each segment sorted by token:
     * the sort is stable and the same on every run. off[] is used as the
     * cursor and then restored. */
    for (int i = 0; i < R; i++) {
        if (!l->keep[i]) {
            l->row_of_slot[i] = -1;
            continue;
        }
        const int row = off[l->topk_ids[i]]++;
        l->row_of_slot[i] = row;
        l->slot_of_row[row] = i;
    }
    for (int e = E; e > 0; e--) off[e] = off[e - 1];
    off[0] = 0;
    l->stats.capacity = cap;
    if (l->cfg.router == MOE_ROUTER_EXPERT_CHOICE) { /* tokens no expert took */
        cap = moe__ec_capacity(&l->cfg, ng > INT_MAX ? INT_MAX : (int)ng);
        l->stats.capacity = cap;
        int none = 0;
        for (int t = 0; t < n; t++) none += l->tok_off[t + 1] == l->tok_off[t];
        l->stats.dropped_fraction = n ? (float)none / n : 0.0f;
        if (l->dist) { /* the global batch's fraction */
            double v[2] = {none, (double)ng}; /* only the count is summed */
            int rc = moe__ep_sum(l, v, 1);
            if (rc) return rc;
            l->stats.dropped_fraction = v[1] > 0 ? (float)v[0] / (float)v[1] : 0.0f;
        }
    } else if (cap > 0 && l->dist) { /* the global batch's fraction */
        double v[2] = {dropped - router_dropped, (double)Rg}; /* only the count is summed */
        int rc = moe__ep_sum(l, v, 1);
        if (rc) return rc;
        l->stats.dropped_fraction = (float)(v[0] / v[1]);
    } else {
        l->stats.dropped_fraction = R ? (float)(dropped - router_dropped) / R : 0.0f;
    }
    return MOE_OK;
}

void moe__dispatch_gather(moe_layer *l, const float *x) {
    const int C = l->cfg.d_model, R = l->seg_off[l->cfg.n_experts];
#pragma omp parallel for schedule(static) num_threads(l->threads) if ((long)R * C > MOE__PAR_MIN)
    for (int r = 0; r < R; r++)
        memcpy(l->tx + (size_t)r * C, x + (size_t)l->slot_tok[l->slot_of_row[r]] * C, sizeof(float) * (size_t)C);
}

/* y[t] = sum_i w_i out[row(i)] over the token's kept slots i, ascending (a
 * token whose every slot was dropped gets 0). */
void moe__dispatch_combine(moe_layer *l, float *y) {
    const int C = l->cfg.d_model, n = l->n;
#pragma omp parallel for schedule(static) num_threads(l->threads) if ((long)n * C > MOE__PAR_MIN)
    for (int t = 0; t < n; t++) {
        float *yt = y + (size_t)t * C;
        memset(yt, 0, sizeof(float) * (size_t)C);
        for (int i = l->tok_off[t]; i < l->tok_off[t + 1]; i++) {
            const int row = l->row_of_slot[i];
            if (row < 0) continue;
            const float *oj = l->ty + (size_t)row * C;
            const float wj = l->topk_w[i];
            for (int c = 0; c < C; c++) yt[c] += wj * oj[c];
        }
    }
}

/* Backward of the combine: dgate[i] = <dy_t, out_row(i)>, and the expert
 * outputs' gradient dout[row(i)] = w_i dy_t. */
void moe__dispatch_backward(moe_layer *l, const float *dy) {
    const int C = l->cfg.d_model, n = l->n;
#pragma omp parallel for schedule(static) num_threads(l->threads) if ((long)n * C > MOE__PAR_MIN)
    for (int t = 0; t < n; t++) {
        const float *dyt = dy + (size_t)t * C;
        for (int i = l->tok_off[t]; i < l->tok_off[t + 1]; i++) {
            const int r = l->row_of_slot[i];
            if (r < 0) { /* dropped: no output, no gradient to its gate */
                l->dgate[i] = 0.0f;
                continue;
            }
            const size_t row = (size_t)r;
            const float *o = l->ty + row * C;
            float *d = l->tdy + row * C;
            const float w = l->topk_w[i];
            float dot = 0.0f;
            for (int c = 0; c < C; c++) {
                dot += dyt[c] * o[c];
                d[c] = w * dyt[c];
            }
            l->dgate[i] = dot;
        }
    }
}

/* dx[t] = sum_i dxg[row(i)] over the token's kept slots, ascending
 * (overwrites dx). */
void moe__dispatch_scatter_dx(moe_layer *l, float *dx) {
    const int C = l->cfg.d_model, n = l->n;
#pragma omp parallel for schedule(static) num_threads(l->threads) if ((long)n * C > MOE__PAR_MIN)
    for (int t = 0; t < n; t++) {
        float *d = dx + (size_t)t * C;
        memset(d, 0, sizeof(float) * (size_t)C);
        for (int i = l->tok_off[t]; i < l->tok_off[t + 1]; i++) {
            const int row = l->row_of_slot[i];
            if (row < 0) continue;
            const float *g = l->tdx + (size_t)row * C;
            for (int c = 0; c < C; c++) d[c] += g[c];
        }
    }
}
