/* Experts: E independent FFNs run as grouped GEMMs over the dispatched row
 * segments. Each GEMM's output is cut into tiles (MOE__TILE_M x MOE__TILE_N,
 * sizes fixed by the shapes, not by the thread count); OpenMP hands tiles to
 * threads and each tile is one single-threaded BLAS call that does its full
 * reduction, so every output element is computed the same way for any number
 * of threads. Activations are fused into the tiles that produce their inputs.
 *
 * Per expert e with rows X [n_e][C] (SwiGLU; relu/gelu drop h3/w3):
 *   h1 = X w1^T, h3 = X w3^T        [n_e][F]
 *   a  = silu(h1) * h3              [n_e][F]
 *   o  = a w2^T                     [n_e][C]
 * backward, given do [n_e][C] (gate-scaled dy):
 *   da = do w2;  dw2 += do^T a;  dh1, dh3 from da;
 *   dw1 += dh1^T X;  dw3 += dh3^T X;  dX = dh1 w1 + dh3 w3
 */
#include "layer/layer_impl.h"

#include "gemm_small.h"
#include "mathx.h"

#include <omp.h>

#include <cblas.h>

enum tile_op {
    OP_UP,    /* h1 (h3) and a, tiles over [n_e rows][F cols]            */
    OP_DOWN,  /* o,             tiles over [n_e rows][C cols]            */
    OP_DA,    /* da -> dh1 (dh3), tiles over [n_e rows][F cols]          */
    OP_DW2,   /* dw2_e [C][F],  tiles over [C rows][F cols], sum over n_e */
    OP_DW13,  /* dw1_e (dw3_e) [F][C], tiles over [F rows][C cols]        */
    OP_DX,    /* dX,            tiles over [n_e rows][C cols]            */
};

static int cdiv(int a, int b) { return (a + b - 1) / b; }

/* Appends the tiles of one op over all experts that received tokens. Token
 * ops tile the segment's rows; weight-gradient ops tile the weight's rows. */
static int add_tiles(const moe_layer *l, moe__tile *t, int nt, enum tile_op op, int rows_w, int cols) {
    const int E = l->n_seg; /* the experts held here: E, or E / P under expert parallelism */
    const int token_op = op == OP_UP || op == OP_DOWN || op == OP_DA || op == OP_DX;
    for (int e = 0; e < E; e++) {
        const int ne = l->eoff[e + 1] - l->eoff[e];
        if (ne == 0) continue;
        const int rows = token_op ? ne : rows_w;
        for (int r = 0; r < rows; r += MOE__TILE_M)
            for (int c = 0; c < cols; c += MOE__TILE_N)
                t[nt++] = (moe__tile){op, e, r, r + MOE__TILE_M < rows ? r + MOE__TILE_M : rows, c,
                                      c + MOE__TILE_N < cols ? c + MOE__TILE_N : cols};
    }
    return nt;
}

int moe__experts_max_tiles(const moe_layer_config *c, int max_rows) {
    /* segments' row tiles: sum_e ceil(n_e/M) <= R/M + E */
    const int row_tiles = cdiv(max_rows, MOE__TILE_M) + c->n_experts;
    const int fwd = row_tiles * cdiv(c->d_ff, MOE__TILE_N);
    const int phase_a = row_tiles * cdiv(c->d_ff, MOE__TILE_N) +
                        c->n_experts * cdiv(c->d_model, MOE__TILE_M) * cdiv(c->d_ff, MOE__TILE_N);
    const int phase_b = c->n_experts * cdiv(c->d_ff, MOE__TILE_M) * cdiv(c->d_model, MOE__TILE_N) +
                        row_tiles * cdiv(c->d_model, MOE__TILE_N);
    int m = fwd > phase_a ? fwd : phase_a;
    m = m > phase_b ? m : phase_b;
    return m;
}

/* a = act(h1[, h3]) on a tile of [rows][cols] with row stride F */
static void act_forward(const moe_layer *l, size_t base, int rows, int cols) {
    const int F = l->cfg.d_ff;
    for (int r = 0; r < rows; r++) {
        const size_t o = base + (size_t)r * F;
        const float *h1 = l->h1 + o, *h3 = l->h3 + o;
        float *a = l->act + o;
        switch (l->cfg.act) {
        case MOE_ACT_RELU:
            for (int c = 0; c < cols; c++) a[c] = h1[c] > 0.0f ? h1[c] : 0.0f;
            break;
        case MOE_ACT_GELU:
            for (int c = 0; c < cols; c++) {
                const float x = h1[c];
                a[c] = 0.5f * x * (1.0f + moe__tanh(MOE__GELU_A * (x + MOE__GELU_B * x * x * x)));
            }
            break;
        case MOE_ACT_SWIGLU:
            for (int c = 0; c < cols; c++) a[c] = h1[c] * moe__sigmoid(h1[c]) * h3[c];
            break;
        }
    }
}

/* dh1 (and dh3) from da, in place: da arrives in dh1. */
static void act_backward(const moe_layer *l, size_t base, int rows, int cols) {
    const int F = l->cfg.d_ff;
    for (int r = 0; r < rows; r++) {
        const size_t o = base + (size_t)r * F;
        const float *h1 = l->h1 + o, *h3 = l->h3 + o;
        float *d1 = l->dh1 + o, *d3 = l->dh3 + o;
        switch (l->cfg.act) {
        case MOE_ACT_RELU:
            for (int c = 0; c < cols; c++) d1[c] = h1[c] > 0.0f ? d1[c] : 0.0f;
            break;
        case MOE_ACT_GELU:
            for (int c = 0; c < cols; c++) {
                const float x = h1[c], u = MOE__GELU_A * (x + MOE__GELU_B * x * x * x);
                const float th = moe__tanh(u);
                const float du = MOE__GELU_A * (1.0f + 3.0f * MOE__GELU_B * x * x);
                d1[c] *= 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du;
            }
            break;
        case MOE_ACT_SWIGLU:
            for (int c = 0; c < cols; c++) {
                const float sg = moe__sigmoid(h1[c]), silu = h1[c] * sg, da = d1[c];
                d3[c] = da * silu;
                d1[c] = da * h3[c] * sg * (1.0f + h1[c] * (1.0f - sg));
            }
            break;
        }
    }
}

static void run_tile(const moe_layer *l, const moe__tile *t) {
    const int C = l->cfg.d_model, F = l->cfg.d_ff;
    const int swiglu = l->cfg.act == MOE_ACT_SWIGLU;
    const size_t seg = (size_t)l->eoff[t->e];
    const int m = t->r1 - t->r0, nc = t->c1 - t->c0;
    const int ne = l->eoff[t->e + 1] - l->eoff[t->e];
    const float *w1 = l->params + l->off.w1 + (size_t)t->e * F * C;
    const float *w2 = l->params + l->off.w2 + (size_t)t->e * C * F;
    const float *w3 = swiglu ? l->params + l->off.w3 + (size_t)t->e * F * C : NULL;
    const size_t row = seg + (size_t)t->r0; /* first dispatched row (token ops) */

    /* a few rows: the in-place kernel (same choice for any thread count) */
    const int small = ne <= MOE__SMALL_M_MAX && moe__sgemm_small_enabled();
    float *work = l->small_ws + (size_t)omp_get_thread_num() * l->small_ws_stride;

    switch (t->op) {
    case OP_UP:
        if (small) {
            moe__sgemm_small_pack(m, C, l->xg + row * C, C, work);
            moe__sgemm_small_nt(m, nc, C, work, w1 + (size_t)t->c0 * C, C, l->h1 + row * F + t->c0, F, 0);
            if (swiglu)
                moe__sgemm_small_nt(m, nc, C, work, w3 + (size_t)t->c0 * C, C, l->h3 + row * F + t->c0, F, 0);
            act_forward(l, row * F + t->c0, m, nc);
            break;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, nc, C, 1.0f, l->xg + row * C, C,
                    w1 + (size_t)t->c0 * C, C, 0.0f, l->h1 + row * F + t->c0, F);
        if (swiglu)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, nc, C, 1.0f, l->xg + row * C, C,
                        w3 + (size_t)t->c0 * C, C, 0.0f, l->h3 + row * F + t->c0, F);
        act_forward(l, row * F + t->c0, m, nc);
        break;
    case OP_DOWN:
        if (small) {
            moe__sgemm_small_pack(m, F, l->act + row * F, F, work);
            moe__sgemm_small_nt(m, nc, F, work, w2 + (size_t)t->c0 * F, F, l->out + row * C + t->c0, C, 0);
            break;
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, nc, F, 1.0f, l->act + row * F, F,
                    w2 + (size_t)t->c0 * F, F, 0.0f, l->out + row * C + t->c0, C);
        break;
    case OP_DA:
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, nc, C, 1.0f, l->dout + row * C, C,
                    w2 + t->c0, F, 0.0f, l->dh1 + row * F + t->c0, F);
        act_backward(l, row * F + t->c0, m, nc);
        break;
    case OP_DW2: {
        float *g = l->grads + l->off.w2 + (size_t)t->e * C * F;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, nc, ne, 1.0f, l->dout + seg * C + t->r0, C,
                    l->act + seg * F + t->c0, F, 1.0f, g + (size_t)t->r0 * F + t->c0, F);
        break;
    }
    case OP_DW13: {
        float *g1 = l->grads + l->off.w1 + (size_t)t->e * F * C;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, nc, ne, 1.0f, l->dh1 + seg * F + t->r0, F,
                    l->xg + seg * C + t->c0, C, 1.0f, g1 + (size_t)t->r0 * C + t->c0, C);
        if (swiglu) {
            float *g3 = l->grads + l->off.w3 + (size_t)t->e * F * C;
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, m, nc, ne, 1.0f, l->dh3 + seg * F + t->r0,
                        F, l->xg + seg * C + t->c0, C, 1.0f, g3 + (size_t)t->r0 * C + t->c0, C);
        }
        break;
    }
    case OP_DX:
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, nc, F, 1.0f, l->dh1 + row * F, F,
                    w1 + t->c0, C, 0.0f, l->dxg + row * C + t->c0, C);
        if (swiglu)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, nc, F, 1.0f, l->dh3 + row * F, F,
                        w3 + t->c0, C, 1.0f, l->dxg + row * C + t->c0, C);
        break;
    }
}

static void run_tiles(const moe_layer *l, int nt) {
    moe__blas_single_thread();
#pragma omp parallel for schedule(dynamic, 1) num_threads(l->threads) if (nt > 1)
    for (int i = 0; i < nt; i++) run_tile(l, &l->tiles[i]);
}

void moe__experts_forward(moe_layer *l) {
    const int C = l->cfg.d_model, F = l->cfg.d_ff;
    run_tiles(l, add_tiles(l, l->tiles, 0, OP_UP, 0, F));
    run_tiles(l, add_tiles(l, l->tiles, 0, OP_DOWN, 0, C));
}

void moe__experts_backward(moe_layer *l) {
    const int C = l->cfg.d_model, F = l->cfg.d_ff;
    /* phase A needs dout only; phase B needs dh1/dh3 from OP_DA */
    int nt = add_tiles(l, l->tiles, 0, OP_DA, 0, F);
    nt = add_tiles(l, l->tiles, nt, OP_DW2, C, F);
    run_tiles(l, nt);
    nt = add_tiles(l, l->tiles, 0, OP_DW13, F, C);
    nt = add_tiles(l, l->tiles, nt, OP_DX, 0, C);
    run_tiles(l, nt);
}
