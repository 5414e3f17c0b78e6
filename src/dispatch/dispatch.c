/* Dispatch: a stable counting sort of the N*K (token, slot) pairs by expert
 * into contiguous row segments, the gather of token rows into that order, and
 * the combine back (in fixed slot order, so no atomics and no order that
 * depends on threads). Dropless: every pair gets a row.
 */
#include "layer/layer_impl.h"

#include <string.h>

void moe__dispatch_build(moe_layer *l, int n) {
    const int E = l->cfg.n_experts, K = l->cfg.top_k;
    const int R = n * K;
    int *off = l->seg_off;
    /* counts were taken by the router; prefix sum gives the segment starts */
    off[0] = 0;
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + l->counts[e];
    /* Placing pairs in (token, slot) order keeps each segment sorted by token:
     * the sort is stable and the same on every run. off[] is used as the
     * cursor and then restored. */
    for (int i = 0; i < R; i++) {
        const int e = l->topk_ids[i];
        const int row = off[e]++;
        l->row_of_slot[i] = row;
        l->slot_of_row[row] = i;
    }
    for (int e = E; e > 0; e--) off[e] = off[e - 1];
    off[0] = 0;
}

void moe__dispatch_gather(moe_layer *l, const float *x) {
    const int C = l->cfg.d_model, K = l->cfg.top_k, R = l->n * K;
#pragma omp parallel for schedule(static) num_threads(l->threads)
    for (int r = 0; r < R; r++)
        memcpy(l->xg + (size_t)r * C, x + (size_t)(l->slot_of_row[r] / K) * C, sizeof(float) * (size_t)C);
}

/* y[t] = sum_j w_tj out[row(t,j)], j ascending */
void moe__dispatch_combine(moe_layer *l, float *y) {
    const int C = l->cfg.d_model, K = l->cfg.top_k, n = l->n;
#pragma omp parallel for schedule(static) num_threads(l->threads)
    for (int t = 0; t < n; t++) {
        float *yt = y + (size_t)t * C;
        const float *w = l->topk_w + (size_t)t * K;
        const float *o0 = l->out + (size_t)l->row_of_slot[(size_t)t * K] * C;
        for (int c = 0; c < C; c++) yt[c] = w[0] * o0[c];
        for (int j = 1; j < K; j++) {
            const float *oj = l->out + (size_t)l->row_of_slot[(size_t)t * K + j] * C;
            const float wj = w[j];
            for (int c = 0; c < C; c++) yt[c] += wj * oj[c];
        }
    }
}

/* Backward of the combine: dgate[t][j] = <dy_t, out_row>, and the expert
 * outputs' gradient dout[row] = w_tj dy_t. */
void moe__dispatch_backward(moe_layer *l, const float *dy) {
    const int C = l->cfg.d_model, K = l->cfg.top_k, n = l->n;
#pragma omp parallel for schedule(static) num_threads(l->threads)
    for (int t = 0; t < n; t++) {
        const float *dyt = dy + (size_t)t * C;
        for (int j = 0; j < K; j++) {
            const size_t row = (size_t)l->row_of_slot[(size_t)t * K + j];
            const float *o = l->out + row * C;
            float *d = l->dout + row * C;
            const float w = l->topk_w[(size_t)t * K + j];
            float dot = 0.0f;
            for (int c = 0; c < C; c++) {
                dot += dyt[c] * o[c];
                d[c] = w * dyt[c];
            }
            l->dgate[(size_t)t * K + j] = dot;
        }
    }
}

/* dx[t] = sum_j dxg[row(t,j)], j ascending (overwrites dx). */
void moe__dispatch_scatter_dx(moe_layer *l, float *dx) {
    const int C = l->cfg.d_model, K = l->cfg.top_k, n = l->n;
#pragma omp parallel for schedule(static) num_threads(l->threads)
    for (int t = 0; t < n; t++) {
        float *d = dx + (size_t)t * C;
        memcpy(d, l->dxg + (size_t)l->row_of_slot[(size_t)t * K] * C, sizeof(float) * (size_t)C);
        for (int j = 1; j < K; j++) {
            const float *g = l->dxg + (size_t)l->row_of_slot[(size_t)t * K + j] * C;
            for (int c = 0; c < C; c++) d[c] += g[c];
        }
    }
}
