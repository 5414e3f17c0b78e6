/* Transformer building blocks, forward and exact backward (see ops.h for the
 * conventions: backward accumulates, bit-identical for any thread count, no
 * allocation). Shape letters as in docs/model.md. */
#include "model/ops.h"

#include "internal.h"
#include "mathx.h"

#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <string.h>

/* Column block of the reductions over rows (RMSNorm dg, embedding dtable):
 * one thread owns a block and sums its rows in order. */
#define OPS_COL_BLOCK 32
/* Elementwise loops smaller than this run on one thread. */
#define OPS_PAR_MIN MOE__PAR_MIN

/* ---- RMSNorm ------------------------------------------------------------- */

void moe__rmsnorm_forward(float *y, float *rstd, const float *x, const float *g, int N, int C, float eps,
                          int threads) {
    const int nt = moe__threads(threads);
#pragma omp parallel for schedule(static) num_threads(nt) if ((long)N * C > MOE__PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * C; /* [C] */
        float *yr = y + (size_t)n * C;       /* [C] */
        double ss = 0.0;
#pragma omp simd reduction(+ : ss)
        for (int c = 0; c < C; c++) ss += (double)xr[c] * xr[c];
        const float r = (float)(1.0 / sqrt(ss / C + (double)eps));
        rstd[n] = r;
#pragma omp simd
        for (int c = 0; c < C; c++) yr[c] = xr[c] * r * g[c];
    }
}

/* y_c = x_c r g_c with r = (mean x^2 + eps)^(-1/2), dr/dx_c = -r^3 x_c / C:
 *   dx_c = r (dy_c g_c - x_c r^2 (sum_j dy_j g_j x_j) / C)
 *   dg_c = sum_n dy_nc x_nc r_n */
void moe__rmsnorm_backward(float *dx, float *dg, const float *dy, const float *x, const float *g,
                           const float *rstd, int N, int C, int threads) {
    const int nt = moe__threads(threads);
    const int ncb = (C + OPS_COL_BLOCK - 1) / OPS_COL_BLOCK;
#pragma omp parallel num_threads(nt)
    {
        if (dx) {
#pragma omp for schedule(static) nowait
            for (int n = 0; n < N; n++) {
                const float *xr = x + (size_t)n * C, *dyr = dy + (size_t)n * C; /* [C] */
                float *dxr = dx + (size_t)n * C;                                /* [C] */
                const float r = rstd[n];
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int c = 0; c < C; c++) dot += dyr[c] * g[c] * xr[c];
                const float kx = r * r * dot / (float)C;
#pragma omp simd
                for (int c = 0; c < C; c++) dxr[c] += r * (dyr[c] * g[c] - xr[c] * kx);
            }
        }
        /* dg: one thread per column block, rows in order */
#pragma omp for schedule(dynamic, 1)
        for (int cb = 0; cb < ncb; cb++) {
            const int c0 = cb * OPS_COL_BLOCK, w = C - c0 < OPS_COL_BLOCK ? C - c0 : OPS_COL_BLOCK;
            double acc[OPS_COL_BLOCK] = {0};
            for (int n = 0; n < N; n++) {
                const float *xr = x + (size_t)n * C + c0, *dyr = dy + (size_t)n * C + c0;
                const double r = rstd[n];
#pragma omp simd
                for (int c = 0; c < w; c++) acc[c] += (double)dyr[c] * xr[c] * r;
            }
            for (int c = 0; c < w; c++) dg[c0 + c] += (float)acc[c];
        }
    }
}

/* ---- RoPE ---------------------------------------------------------------- */

void moe__rope_table(float *cos_sin, int T, int D, float theta) {
    const int hd = D / 2;
    for (int p = 0; p < T; p++) {
        float *row = cos_sin + (size_t)p * 2 * hd; /* [2][D/2] */
        for (int i = 0; i < hd; i++) {
            const double inv_freq = pow((double)theta, -2.0 * i / D);
            const double ang = (double)p * inv_freq;
            row[i] = (float)cos(ang);
            row[hd + i] = (float)sin(ang);
        }
    }
}

/* dir +1: the rotation; -1: its inverse (transpose), for the gradient. */
static void rope_apply(float *x, const float *cos_sin, int B, int T, int nheads, int D, int pos0, int dir,
                       int threads) {
    const int hd = D / 2, nt = moe__threads(threads);
    const long NT = (long)B * T;
    const float sgn = dir > 0 ? 1.0f : -1.0f;
#pragma omp parallel for schedule(static) num_threads(nt) if (NT * nheads * D > OPS_PAR_MIN)
    for (long bt = 0; bt < NT; bt++) {
        const int p = pos0 + (int)(bt % T);
        const float *cs = cos_sin + (size_t)p * 2 * hd, *sn = cs + hd; /* [D/2] each */
        for (int h = 0; h < nheads; h++) {
            float *xh = x + ((size_t)bt * nheads + h) * D; /* [D] */
#pragma omp simd
            for (int i = 0; i < hd; i++) {
                const float a = xh[i], b = xh[i + hd], s = sgn * sn[i];
                xh[i] = a * cs[i] - b * s;
                xh[i + hd] = b * cs[i] + a * s;
            }
        }
    }
}

void moe__rope_forward(float *x, const float *cos_sin, int B, int T, int nheads, int D, int pos0,
                       int threads) {
    rope_apply(x, cos_sin, B, T, nheads, D, pos0, 1, threads);
}

void moe__rope_backward(float *dx, const float *cos_sin, int B, int T, int nheads, int D, int pos0,
                        int threads) {
    rope_apply(dx, cos_sin, B, T, nheads, D, pos0, -1, threads);
}

/* ---- Attention ----------------------------------------------------------- */

/* In place: row[0..n) <- softmax(row[0..n)). */
static void softmax_row(float *row, int n) {
    float mx = row[0];
#pragma omp simd reduction(max : mx)
    for (int j = 1; j < n; j++) mx = row[j] > mx ? row[j] : mx;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < n; j++) {
        const float e = moe__exp(row[j] - mx);
        row[j] = e;
        sum += e;
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int j = 0; j < n; j++) row[j] *= inv;
}

void moe__attention_forward(float *out, float *att, const float *q, const float *k, const float *v, int B,
                            int T, int H, int G, int D, int threads) {
    if (B <= 0 || T <= 0) return;
    moe__blas_single_thread();
    const int nt = moe__threads(threads), rep = H / G;
    const int ldq = H * D, ldk = G * D; /* row strides of q/out and k/v */
    const float scale = 1.0f / sqrtf((float)D);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int bh = 0; bh < B * H; bh++) {
        const int b = bh / H, h = bh % H, g = h / rep;
        const float *Q = q + (size_t)b * T * ldq + (size_t)h * D;             /* [T][D], stride ldq */
        const float *K = k + (size_t)b * T * ldk + (size_t)g * D;             /* [T][D], stride ldk */
        const float *Vv = v + (size_t)b * T * ldk + (size_t)g * D;            /* [T][D], stride ldk */
        float *O = out + (size_t)b * T * ldq + (size_t)h * D;                 /* [T][D], stride ldq */
        float *A = att + (size_t)bh * T * T;                                  /* [T][T] */
        for (int r0 = 0; r0 < T; r0 += MOE__ATT_BR) {
            const int r1 = r0 + MOE__ATT_BR < T ? r0 + MOE__ATT_BR : T, m = r1 - r0;
            /* S [m][r1] = scale Q[r0:r1] K[0:r1]^T, into att rows r0.. */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, r1, D, scale, Q + (size_t)r0 * ldq, ldq, K,
                        ldk, 0.0f, A + (size_t)r0 * T, T);
            for (int t = r0; t < r1; t++) {
                float *row = A + (size_t)t * T;
                softmax_row(row, t + 1);
                for (int j = t + 1; j < r1; j++) row[j] = 0.0f; /* masked, for the P V product */
            }
            /* O[r0:r1] = P [m][r1] V[0:r1] */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, D, r1, 1.0f, A + (size_t)r0 * T, T, Vv, ldk,
                        0.0f, O + (size_t)r0 * ldq, ldq);
        }
    }
}

size_t moe__attention_scratch_size(int T, int threads) {
    const size_t br = T < MOE__ATT_BR ? (size_t)T : MOE__ATT_BR;
    return (size_t)moe__threads(threads) * br * (size_t)(T > 0 ? T : 0);
}

/* Per query head and row block [r0, r1), with P = att, W = scratch [m][T]:
 *   dP = dO V^T;  dS = P (dP - rowsum(P dP)) * scale  (j <= t, else 0)
 *   dQ[r0:r1] += dS K[0:r1];  dK[0:r1] += dS^T Q[r0:r1];  dV[0:r1] += P^T dO[r0:r1] */
void moe__attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                             const float *q, const float *k, const float *v, int B, int T, int H, int G, int D,
                             float *scratch, int threads) {
    if (B <= 0 || T <= 0) return;
    moe__blas_single_thread();
    const int nt = moe__threads(threads), rep = H / G;
    const int ldq = H * D, ldk = G * D;
    const float scale = 1.0f / sqrtf((float)D);
    const size_t br = T < MOE__ATT_BR ? (size_t)T : MOE__ATT_BR;
#pragma omp parallel num_threads(nt)
    {
        float *W = scratch + (size_t)omp_get_thread_num() * br * T; /* [br][T] */
#pragma omp for schedule(dynamic, 1)
        for (int bg = 0; bg < B * G; bg++) {
            const int b = bg / G, g = bg % G;
            const float *K = k + (size_t)b * T * ldk + (size_t)g * D;  /* [T][D], stride ldk */
            const float *Vv = v + (size_t)b * T * ldk + (size_t)g * D; /* [T][D], stride ldk */
            float *dK = dk + (size_t)b * T * ldk + (size_t)g * D;      /* [T][D], stride ldk */
            float *dV = dv + (size_t)b * T * ldk + (size_t)g * D;      /* [T][D], stride ldk */
            for (int h = g * rep; h < (g + 1) * rep; h++) {
                const float *Q = q + (size_t)b * T * ldq + (size_t)h * D;     /* [T][D], stride ldq */
                const float *dO = dout + (size_t)b * T * ldq + (size_t)h * D; /* [T][D], stride ldq */
                float *dQ = dq + (size_t)b * T * ldq + (size_t)h * D;         /* [T][D], stride ldq */
                const float *A = att + ((size_t)b * H + h) * T * T;          /* [T][T] */
                for (int r0 = 0; r0 < T; r0 += MOE__ATT_BR) {
                    const int r1 = r0 + MOE__ATT_BR < T ? r0 + MOE__ATT_BR : T, m = r1 - r0;
                    /* W [m][r1] = dO[r0:r1] V[0:r1]^T */
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, r1, D, 1.0f, dO + (size_t)r0 * ldq,
                                ldq, Vv, ldk, 0.0f, W, T);
                    for (int t = r0; t < r1; t++) {
                        const float *P = A + (size_t)t * T;
                        float *w = W + (size_t)(t - r0) * T;
                        float s = 0.0f;
#pragma omp simd reduction(+ : s)
                        for (int j = 0; j <= t; j++) s += P[j] * w[j];
#pragma omp simd
                        for (int j = 0; j <= t; j++) w[j] = P[j] * (w[j] - s) * scale;
                        for (int j = t + 1; j < r1; j++) w[j] = 0.0f;
                    }
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, D, r1, 1.0f, W, T, K, ldk, 1.0f,
                                dQ + (size_t)r0 * ldq, ldq);
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1, D, m, 1.0f, W, T,
                                Q + (size_t)r0 * ldq, ldq, 1.0f, dK, ldk);
                    /* W <- P masked (att is only valid for j <= t) */
                    for (int t = r0; t < r1; t++) {
                        float *w = W + (size_t)(t - r0) * T;
                        memcpy(w, A + (size_t)t * T, sizeof(float) * (size_t)(t + 1));
                        for (int j = t + 1; j < r1; j++) w[j] = 0.0f;
                    }
                    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, r1, D, m, 1.0f, W, T,
                                dO + (size_t)r0 * ldq, ldq, 1.0f, dV, ldk);
                }
            }
        }
    }
}

void moe__attention_decode(float *out, const float *q, const float *kcache, const float *vcache, int n_ctx,
                           int H, int G, int D, float *scratch) {
    const int rep = H / G, ld = G * D;
    const float scale = 1.0f / sqrtf((float)D);
    float *s = scratch; /* [n_ctx] */
    for (int h = 0; h < H; h++) {
        const int g = h / rep;
        const float *qh = q + (size_t)h * D; /* [D] */
        for (int j = 0; j < n_ctx; j++) {
            const float *kj = kcache + (size_t)j * ld + (size_t)g * D; /* [D] */
            float d = 0.0f;
#pragma omp simd reduction(+ : d)
            for (int i = 0; i < D; i++) d += qh[i] * kj[i];
            s[j] = d * scale;
        }
        softmax_row(s, n_ctx);
        float *oh = out + (size_t)h * D; /* [D] */
        memset(oh, 0, sizeof(float) * (size_t)D);
        for (int j = 0; j < n_ctx; j++) {
            const float *vj = vcache + (size_t)j * ld + (size_t)g * D; /* [D] */
            const float p = s[j];
#pragma omp simd
            for (int i = 0; i < D; i++) oh[i] += p * vj[i];
        }
    }
}

/* ---- Embedding ----------------------------------------------------------- */

void moe__embedding_forward(float *out, const int32_t *tokens, const float *table, int N, int C, int threads) {
    const int nt = moe__threads(threads);
#pragma omp parallel for schedule(static) num_threads(nt) if ((long)N * C > OPS_PAR_MIN)
    for (int n = 0; n < N; n++)
        memcpy(out + (size_t)n * C, table + (size_t)tokens[n] * C, sizeof(float) * (size_t)C);
}

void moe__embedding_backward(float *dtable, const float *dout, const int32_t *tokens, int N, int C,
                             int threads) {
    const int nt = moe__threads(threads);
    const int ncb = (C + OPS_COL_BLOCK - 1) / OPS_COL_BLOCK;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int cb = 0; cb < ncb; cb++) {
        const int c0 = cb * OPS_COL_BLOCK, w = C - c0 < OPS_COL_BLOCK ? C - c0 : OPS_COL_BLOCK;
        for (int n = 0; n < N; n++) {
            float *d = dtable + (size_t)tokens[n] * C + c0; /* [w] */
            const float *s = dout + (size_t)n * C + c0;     /* [w] */
#pragma omp simd
            for (int c = 0; c < w; c++) d[c] += s[c];
        }
    }
}

/* ---- Cross-entropy ------------------------------------------------------- */

void moe__xent_forward_backward(float *dlogits, float *losses, const float *logits, const int32_t *targets,
                                int N, int V, float dscale, int threads) {
    const int nt = moe__threads(threads);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int n = 0; n < N; n++) {
        const float *l = logits + (size_t)n * V;            /* [V] */
        float *d = dlogits ? dlogits + (size_t)n * V : NULL; /* [V], may be l */
        const int tg = targets[n];
        const float lt = l[tg];
        float mx = l[0];
#pragma omp simd reduction(max : mx)
        for (int i = 1; i < V; i++) mx = l[i] > mx ? l[i] : mx;
        float sum = 0.0f;
        if (d) {
#pragma omp simd reduction(+ : sum)
            for (int i = 0; i < V; i++) {
                const float e = moe__exp(l[i] - mx);
                d[i] = e;
                sum += e;
            }
        } else {
#pragma omp simd reduction(+ : sum)
            for (int i = 0; i < V; i++) sum += moe__exp(l[i] - mx);
        }
        /* -log softmax[tg] = log(sum) - (l[tg] - max) */
        losses[n] = logf(sum) - (lt - mx);
        if (d) {
            const float ks = dscale / sum;
#pragma omp simd
            for (int i = 0; i < V; i++) d[i] *= ks;
            d[tg] -= dscale;
        }
    }
}

/* ---- SwiGLU -------------------------------------------------------------- */

void moe__swiglu_forward(float *a, const float *h1, const float *h3, size_t n, int threads) {
    const int nt = moe__threads(threads);
#pragma omp parallel for simd schedule(static) num_threads(nt) if (n > OPS_PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        const float x = h1[i], u = h3[i];
        a[i] = x * moe__sigmoid(x) * u;
    }
}

void moe__swiglu_backward(float *dh1, float *dh3, const float *da, const float *h1, const float *h3,
                          size_t n, int threads) {
    const int nt = moe__threads(threads);
#pragma omp parallel for simd schedule(static) num_threads(nt) if (n > OPS_PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        const float x = h1[i], u = h3[i], g = da[i];
        const float s = moe__sigmoid(x);
        const float d3 = g * x * s, d1 = g * u * s * (1.0f + x * (1.0f - s));
        dh3[i] = d3;
        dh1[i] = d1;
    }
}
