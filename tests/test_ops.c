/* Transformer ops (src/model/ops.c) and the parallel GEMM (src/core/gemm.c)
 * against naive double references: forward values, central finite
 * differences of sum(out * r) for every input and parameter, accumulation
 * (+=) of the backward, bit-identical results for 1, 2 and 3 threads, the
 * KV-cache decode path, in-place cross-entropy. */
#include "gemm.h"
#include "internal.h"
#include "model/ops.h"
#include "test.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- helpers ------------------------------------------------------------- */

static double randn(uint64_t *s) {
    double u1, u2;
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    u1 = ((*s >> 11) + 1.0) / 9007199254740993.0;
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    u2 = (*s >> 11) / 9007199254740992.0;
    return sqrt(-2 * log(u1)) * cos(2 * M_PI * u2);
}

static uint32_t rand_u32(uint64_t *s) {
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(*s >> 33);
}

static float *frand(size_t n, uint64_t *s, double scale) {
    float *p = malloc(sizeof(float) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) p[i] = (float)(scale * randn(s));
    return p;
}

static float *fdup(const float *a, size_t n) {
    float *p = malloc(sizeof(float) * (n ? n : 1));
    memcpy(p, a, sizeof(float) * n);
    return p;
}

static double *todouble(const float *a, size_t n) {
    double *p = malloc(sizeof(double) * (n ? n : 1));
    for (size_t i = 0; i < n; i++) p[i] = a[i];
    return p;
}

static float *fzeros(size_t n) { return calloc(n ? n : 1, sizeof(float)); }

/* max |a - b| / max(1, max |b|) */
static double rel_err(const float *a, const double *b, size_t n) {
    double m = 0, r = 1;
    for (size_t i = 0; i < n; i++) {
        m = fmax(m, fabs(a[i] - b[i]));
        r = fmax(r, fabs(b[i]));
    }
    return m / r;
}

/* Backward results minus the prefill (tests the += convention). */
static void unprefill(float *g, const float *pre, size_t n) {
    for (size_t i = 0; i < n; i++) g[i] -= pre[i];
}

typedef double (*objective_fn)(void *ctx);

/* Central differences of f w.r.t. p[idx[k]] (all of p when idx is NULL, n
 * entries) against the fp32 gradient g; returns the worst
 * |g - fd| / max(1e-2, |fd|) and its index. */
static double fd_worst(objective_fn f, void *ctx, double *p, const float *g, size_t n, const size_t *idx,
                       size_t nidx, size_t *where) {
    const double h = 1e-5;
    double worst = 0;
    const size_t cnt = idx ? nidx : n;
    for (size_t k = 0; k < cnt; k++) {
        const size_t i = idx ? idx[k] : k;
        const double keep = p[i];
        p[i] = keep + h;
        const double up = f(ctx);
        p[i] = keep - h;
        const double dn = f(ctx);
        p[i] = keep;
        const double fd = (up - dn) / (2 * h), err = fabs(g[i] - fd) / fmax(1e-2, fabs(fd));
        if (err > worst) worst = err, *where = i;
    }
    return worst;
}

#define FD_TOL 1e-3
#define CHECK_FD(name, f, ctx, p, g, n)                                                                 \
    do {                                                                                               \
        size_t w_ = 0;                                                                                 \
        double e_ = fd_worst(f, ctx, p, g, n, NULL, 0, &w_);                                           \
        CHECK_MSG(e_ < FD_TOL, "%s: worst rel err %g at [%zu]", name, e_, w_);                         \
    } while (0)

static int same_bits(const float *a, const float *b, size_t n) { return memcmp(a, b, sizeof(float) * n) == 0; }

/* ---- RMSNorm ------------------------------------------------------------- */

typedef struct {
    int N, C;
    double eps, *x, *g, *r; /* [N][C], [C], [N][C] */
} rms_ctx;

/* sum(y * r), y computed in double; y_out if not NULL */
static double rms_ref(rms_ctx *c, double *y_out) {
    double obj = 0;
    for (int n = 0; n < c->N; n++) {
        const double *x = c->x + (size_t)n * c->C;
        double ss = 0;
        for (int i = 0; i < c->C; i++) ss += x[i] * x[i];
        const double rs = 1 / sqrt(ss / c->C + c->eps);
        for (int i = 0; i < c->C; i++) {
            const double y = x[i] * rs * c->g[i];
            if (y_out) y_out[(size_t)n * c->C + i] = y;
            obj += y * c->r[(size_t)n * c->C + i];
        }
    }
    return obj;
}
static double rms_obj(void *ctx) { return rms_ref(ctx, NULL); }

TEST(ops_rmsnorm_reference_and_gradients) {
    const int N = 10, C = 12;
    const float eps = 1e-5f;
    uint64_t s = 1;
    const size_t nc = (size_t)N * C;
    float *x = frand(nc, &s, 1.0), *g = frand(C, &s, 0.3), *r = frand(nc, &s, 1.0);
    for (int i = 0; i < C; i++) g[i] += 1.0f;
    x[5] = 0.0f;
    float *y = fzeros(nc), *rstd = fzeros(N);
    moe__rmsnorm_forward(y, rstd, x, g, N, C, eps, 2);
    rms_ctx c = {N, C, eps, todouble(x, nc), todouble(g, C), todouble(r, nc)};
    double *yr = malloc(sizeof(double) * nc);
    rms_ref(&c, yr);
    CHECK_MSG(rel_err(y, yr, nc) < 1e-6, "y err %g", rel_err(y, yr, nc));

    /* y may alias x */
    float *xy = fdup(x, nc), *rstd2 = fzeros(N);
    moe__rmsnorm_forward(xy, rstd2, xy, g, N, C, eps, 2);
    CHECK(same_bits(xy, y, nc) && same_bits(rstd, rstd2, N));

    float *pdx = frand(nc, &s, 1.0), *pdg = frand(C, &s, 1.0);
    float *dx = fdup(pdx, nc), *dg = fdup(pdg, C);
    moe__rmsnorm_backward(dx, dg, r, x, g, rstd, N, C, 2);
    unprefill(dx, pdx, nc), unprefill(dg, pdg, C);
    CHECK_FD("rmsnorm dx", rms_obj, &c, c.x, dx, nc);
    CHECK_FD("rmsnorm dg", rms_obj, &c, c.g, dg, C);

    /* dx == NULL: dg alone */
    float *dg2 = fzeros(C);
    moe__rmsnorm_backward(NULL, dg2, r, x, g, rstd, N, C, 1);
    for (int i = 0; i < C; i++) CHECK_CLOSE(dg2[i], dg[i], 1e-5, 1e-5);

    free(x), free(g), free(r), free(y), free(rstd), free(c.x), free(c.g), free(c.r), free(yr);
    free(xy), free(rstd2), free(pdx), free(pdg), free(dx), free(dg), free(dg2);
}

/* ---- RoPE ---------------------------------------------------------------- */

typedef struct {
    int B, T, nh, D, pos0;
    double theta, *x, *r;
} rope_ctx;

static double rope_ref(rope_ctx *c, double *y_out) {
    const int hd = c->D / 2;
    double obj = 0;
    for (int b = 0; b < c->B; b++)
        for (int t = 0; t < c->T; t++)
            for (int h = 0; h < c->nh; h++) {
                const size_t o = (((size_t)b * c->T + t) * c->nh + h) * c->D;
                for (int i = 0; i < hd; i++) {
                    const double ang = (c->pos0 + t) * pow(c->theta, -2.0 * i / c->D);
                    const double a = c->x[o + i], bb = c->x[o + i + hd];
                    const double y1 = a * cos(ang) - bb * sin(ang), y2 = bb * cos(ang) + a * sin(ang);
                    if (y_out) y_out[o + i] = y1, y_out[o + i + hd] = y2;
                    obj += y1 * c->r[o + i] + y2 * c->r[o + i + hd];
                }
            }
    return obj;
}
static double rope_obj(void *ctx) { return rope_ref(ctx, NULL); }

TEST(ops_rope_reference_and_gradients) {
    const int B = 2, T = 5, nh = 4, D = 8;
    const int pos_list[] = {0, 3};
    const float thetas[] = {10000.0f, 7.0f};
    uint64_t s = 2;
    for (int pi = 0; pi < 2; pi++)
        for (int ti = 0; ti < 2; ti++) {
            const int pos0 = pos_list[pi], Tt = pos0 + T + 2;
            const size_t n = (size_t)B * T * nh * D;
            float *tab = fzeros((size_t)Tt * D);
            moe__rope_table(tab, Tt, D, thetas[ti]);
            double terr = 0;
            for (int p = 0; p < Tt; p++)
                for (int i = 0; i < D / 2; i++) {
                    const double ang = p * pow(thetas[ti], -2.0 * i / D);
                    terr = fmax(terr, fabs(tab[p * D + i] - cos(ang)));
                    terr = fmax(terr, fabs(tab[p * D + D / 2 + i] - sin(ang)));
                }
            CHECK_MSG(terr < 1e-7, "table err %g", terr);
            float *x = frand(n, &s, 1.0), *r = frand(n, &s, 1.0), *y = fdup(x, n);
            moe__rope_forward(y, tab, B, T, nh, D, pos0, 2);
            rope_ctx c = {B, T, nh, D, pos0, thetas[ti], todouble(x, n), todouble(r, n)};
            double *yr = malloc(sizeof(double) * n);
            rope_ref(&c, yr);
            CHECK_MSG(rel_err(y, yr, n) < 1e-6, "rope y err %g", rel_err(y, yr, n));
            float *dx = fdup(r, n);
            moe__rope_backward(dx, tab, B, T, nh, D, pos0, 2);
            CHECK_FD("rope dx", rope_obj, &c, c.x, dx, n);
            /* backward is the inverse rotation: it takes y back to x */
            moe__rope_backward(y, tab, B, T, nh, D, pos0, 1);
            double back = 0;
            for (size_t i = 0; i < n; i++) back = fmax(back, fabs(y[i] - x[i]));
            CHECK_MSG(back < 1e-6, "inverse err %g", back);
            free(tab), free(x), free(r), free(y), free(c.x), free(c.r), free(yr), free(dx);
        }
}

/* ---- Attention ----------------------------------------------------------- */

typedef struct {
    int B, T, H, G, D;
    double *q, *k, *v, *r; /* [B][T][H][D], [B][T][G][D] x2, [B][T][H][D] */
} att_ctx;

static double att_ref(att_ctx *c, double *out, double *att) {
    const int T = c->T, H = c->H, G = c->G, D = c->D, rep = H / G;
    double obj = 0, *s = malloc(sizeof(double) * T);
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < H; h++) {
            const int g = h / rep;
            for (int t = 0; t < T; t++) {
                const double *qt = c->q + (((size_t)b * T + t) * H + h) * D;
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= t; j++) {
                    const double *kj = c->k + (((size_t)b * T + j) * G + g) * D;
                    double d = 0;
                    for (int i = 0; i < D; i++) d += qt[i] * kj[i];
                    s[j] = d / sqrt((double)D);
                    mx = fmax(mx, s[j]);
                }
                for (int j = 0; j <= t; j++) sum += s[j] = exp(s[j] - mx);
                for (int j = 0; j <= t; j++) {
                    s[j] /= sum;
                    if (att) att[(((size_t)b * H + h) * T + t) * T + j] = s[j];
                }
                const size_t o = (((size_t)b * T + t) * H + h) * D;
                for (int i = 0; i < D; i++) {
                    double acc = 0;
                    for (int j = 0; j <= t; j++) acc += s[j] * c->v[(((size_t)b * T + j) * G + g) * D + i];
                    if (out) out[o + i] = acc;
                    obj += acc * c->r[o + i];
                }
            }
        }
    free(s);
    return obj;
}
static double att_obj(void *ctx) { return att_ref(ctx, NULL, NULL); }

/* Forward vs reference, then finite differences for q, k, v (every element,
 * or nsample random ones when nsample > 0). */
static void check_attention(int B, int T, int H, int G, int D, int nsample, uint64_t seed) {
    uint64_t s = seed;
    const size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * G * D, na = (size_t)B * H * T * T;
    float *q = frand(nq, &s, 1.0), *k = frand(nk, &s, 1.0), *v = frand(nk, &s, 1.0), *r = frand(nq, &s, 1.0);
    float *out = fzeros(nq), *att = malloc(sizeof(float) * na);
    for (size_t i = 0; i < na; i++) att[i] = NAN; /* only the lower triangle may be relied on */
    moe__attention_forward(out, att, q, k, v, B, T, H, G, D, 2);
    att_ctx c = {B, T, H, G, D, todouble(q, nq), todouble(k, nk), todouble(v, nk), todouble(r, nq)};
    double *outr = malloc(sizeof(double) * nq), *attr = calloc(na, sizeof(double));
    att_ref(&c, outr, attr);
    CHECK_MSG(rel_err(out, outr, nq) < 2e-6, "T %d G %d: out err %g", T, G, rel_err(out, outr, nq));
    double aerr = 0;
    for (int bh = 0; bh < B * H; bh++)
        for (int t = 0; t < T; t++)
            for (int j = 0; j <= t; j++) {
                const size_t i = ((size_t)bh * T + t) * T + j;
                aerr = fmax(aerr, fabs(att[i] - attr[i]));
            }
    CHECK_MSG(aerr < 1e-6, "att err %g", aerr);

    /* the backward must not read att above the diagonal: poison it */
    for (int bh = 0; bh < B * H; bh++)
        for (int t = 0; t < T; t++)
            for (int j = t + 1; j < T; j++) att[((size_t)bh * T + t) * T + j] = NAN;
    float *pq = frand(nq, &s, 1.0), *pk = frand(nk, &s, 1.0), *pv = frand(nk, &s, 1.0);
    float *dq = fdup(pq, nq), *dk = fdup(pk, nk), *dv = fdup(pv, nk);
    const size_t ns = moe__attention_scratch_size(T, 2);
    float *scratch = malloc(sizeof(float) * ns); /* exact size: ASan catches overruns */
    moe__attention_backward(dq, dk, dv, r, att, q, k, v, B, T, H, G, D, scratch, 2);
    unprefill(dq, pq, nq), unprefill(dk, pk, nk), unprefill(dv, pv, nk);
    double *ps[3] = {c.q, c.k, c.v};
    float *gs[3] = {dq, dk, dv};
    const size_t ns3[3] = {nq, nk, nk};
    const char *names[3] = {"dq", "dk", "dv"};
    for (int a = 0; a < 3; a++) {
        size_t w = 0, *idx = NULL, nidx = 0;
        if (nsample > 0) {
            nidx = (size_t)nsample;
            idx = malloc(sizeof(size_t) * nidx);
            for (size_t i = 0; i < nidx; i++) idx[i] = rand_u32(&s) % ns3[a];
        }
        const double e = fd_worst(att_obj, &c, ps[a], gs[a], ns3[a], idx, nidx, &w);
        CHECK_MSG(e < FD_TOL, "attention B %d T %d H %d G %d D %d: %s worst rel err %g at [%zu]", B, T, H, G,
                  D, names[a], e, w);
        free(idx);
    }
    free(q), free(k), free(v), free(r), free(out), free(att), free(c.q), free(c.k), free(c.v), free(c.r);
    free(outr), free(attr), free(pq), free(pk), free(pv), free(dq), free(dk), free(dv), free(scratch);
}

TEST(ops_attention_reference_and_gradients) {
    check_attention(2, 5, 4, 2, 8, 0, 3);  /* grouped query */
    check_attention(2, 5, 4, 4, 8, 0, 4);  /* multi-head */
    check_attention(1, 6, 3, 1, 8, 0, 5);  /* multi-query */
    check_attention(1, 1, 2, 1, 4, 0, 6);  /* one position */
}

/* T over several row blocks of MOE__ATT_BR (64, 64, 12), sampled FD. */
TEST(ops_attention_gradients_row_blocks) {
    check_attention(1, 140, 2, 1, 8, 150, 7);
    check_attention(2, 65, 4, 2, 4, 100, 8);
}

/* Token by token through rope + the KV cache equals rope + attention_forward
 * over the whole sequence (positions restart in each sequence). */
TEST(ops_attention_decode_matches_forward) {
    const int B = 2, T = 130, H = 4, G = 2, D = 16;
    uint64_t s = 9;
    const size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * G * D;
    float *q = frand(nq, &s, 1.0), *k = frand(nk, &s, 1.0), *v = frand(nk, &s, 1.0);
    float *tab = fzeros((size_t)T * D);
    moe__rope_table(tab, T, D, 10000.0f);
    float *qr = fdup(q, nq), *kr = fdup(k, nk), *out = fzeros(nq), *att = fzeros((size_t)B * H * T * T);
    moe__rope_forward(qr, tab, B, T, H, D, 0, 2);
    moe__rope_forward(kr, tab, B, T, G, D, 0, 2);
    moe__attention_forward(out, att, qr, kr, v, B, T, H, G, D, 2);

    float *kc = fzeros((size_t)T * G * D), *vc = fzeros((size_t)T * G * D), *qt = fzeros((size_t)H * D);
    float *ot = fzeros((size_t)H * D), *scratch = malloc(sizeof(float) * T);
    double worst = 0;
    int rope_same = 1;
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            const size_t ok = ((size_t)b * T + t) * G * D, oq = ((size_t)b * T + t) * H * D;
            memcpy(kc + (size_t)t * G * D, k + ok, sizeof(float) * G * D);
            memcpy(vc + (size_t)t * G * D, v + ok, sizeof(float) * G * D);
            moe__rope_forward(kc + (size_t)t * G * D, tab, 1, 1, G, D, t, 1);
            memcpy(qt, q + oq, sizeof(float) * H * D);
            moe__rope_forward(qt, tab, 1, 1, H, D, t, 1);
            rope_same &= same_bits(qt, qr + oq, (size_t)H * D) && same_bits(kc + (size_t)t * G * D, kr + ok, (size_t)G * D);
            moe__attention_decode(ot, qt, kc, vc, t + 1, H, G, D, scratch);
            for (int i = 0; i < H * D; i++) worst = fmax(worst, fabs(ot[i] - out[oq + i]));
        }
    CHECK(rope_same);
    CHECK_MSG(worst < 2e-6, "decode vs forward: max abs diff %g", worst);
    free(q), free(k), free(v), free(tab), free(qr), free(kr), free(out), free(att), free(kc), free(vc);
    free(qt), free(ot), free(scratch);
}

/* ---- Embedding ----------------------------------------------------------- */

typedef struct {
    int N, C;
    const int32_t *tok;
    double *table, *r;
} emb_ctx;

static double emb_obj(void *ctx) {
    emb_ctx *c = ctx;
    double obj = 0;
    for (int n = 0; n < c->N; n++)
        for (int i = 0; i < c->C; i++) obj += c->table[(size_t)c->tok[n] * c->C + i] * c->r[(size_t)n * c->C + i];
    return obj;
}

TEST(ops_embedding_reference_and_gradients) {
    const int N = 10, C = 12, V = 11;
    uint64_t s = 10;
    const int32_t tok[10] = {3, 0, 10, 3, 7, 3, 1, 10, 5, 0}; /* repeats */
    float *table = frand((size_t)V * C, &s, 1.0), *r = frand((size_t)N * C, &s, 1.0), *out = fzeros((size_t)N * C);
    moe__embedding_forward(out, tok, table, N, C, 2);
    for (int n = 0; n < N; n++) CHECK(same_bits(out + (size_t)n * C, table + (size_t)tok[n] * C, C));
    float *pre = frand((size_t)V * C, &s, 1.0), *dt = fdup(pre, (size_t)V * C);
    moe__embedding_backward(dt, r, tok, N, C, 2);
    unprefill(dt, pre, (size_t)V * C);
    emb_ctx c = {N, C, tok, todouble(table, (size_t)V * C), todouble(r, (size_t)N * C)};
    CHECK_FD("embedding dtable", emb_obj, &c, c.table, dt, (size_t)V * C);
    free(table), free(r), free(out), free(pre), free(dt), free(c.table), free(c.r);
}

/* ---- Cross-entropy ------------------------------------------------------- */

typedef struct {
    int N, V;
    const int32_t *tg;
    double dscale, *l;
} xent_ctx;

static double xent_ref(xent_ctx *c, double *losses) {
    double obj = 0;
    for (int n = 0; n < c->N; n++) {
        const double *l = c->l + (size_t)n * c->V;
        double mx = -INFINITY, sum = 0;
        for (int i = 0; i < c->V; i++) mx = fmax(mx, l[i]);
        for (int i = 0; i < c->V; i++) sum += exp(l[i] - mx);
        const double loss = mx + log(sum) - l[c->tg[n]];
        if (losses) losses[n] = loss;
        obj += c->dscale * loss;
    }
    return obj;
}
static double xent_obj(void *ctx) { return xent_ref(ctx, NULL); }

TEST(ops_xent_reference_gradients_in_place) {
    const int N = 10, V = 11;
    uint64_t s = 11;
    int32_t tg[10];
    for (int n = 0; n < N; n++) tg[n] = (int32_t)(rand_u32(&s) % V);
    const size_t nv = (size_t)N * V;
    float *l = frand(nv, &s, 3.0);
    for (int i = 0; i < V; i++) l[2 * V + i] += 1000.0f; /* large logits: max subtraction */
    for (int i = 0; i < V; i++) l[3 * V + i] -= 1000.0f;
    l[4 * V + tg[4]] = 40.0f; /* confident and right */
    l[5 * V + (tg[5] + 1) % V] = 40.0f; /* confident and wrong */
    const float dscale = 0.37f;
    float *losses = fzeros(N), *dl = fzeros(nv);
    moe__xent_forward_backward(dl, losses, l, tg, N, V, dscale, 2);
    xent_ctx c = {N, V, tg, dscale, todouble(l, nv)};
    double lr[10];
    xent_ref(&c, lr);
    for (int n = 0; n < N; n++) CHECK_CLOSE(losses[n], lr[n], 1e-5, 1e-5);
    CHECK_FD("xent dlogits", xent_obj, &c, c.l, dl, nv);
    double rowsum = 0; /* softmax - onehot sums to 0 per row */
    for (int n = 0; n < N; n++) {
        double sum = 0;
        for (int i = 0; i < V; i++) sum += dl[(size_t)n * V + i];
        rowsum = fmax(rowsum, fabs(sum));
    }
    CHECK_MSG(rowsum < 1e-6, "row sums %g", rowsum);

    /* in place (dlogits == logits), and losses only: bit-identical */
    float *ip = fdup(l, nv), *losses2 = fzeros(N), *losses3 = fzeros(N);
    moe__xent_forward_backward(ip, losses2, ip, tg, N, V, dscale, 2);
    CHECK(same_bits(ip, dl, nv));
    CHECK(same_bits(losses2, losses, N));
    moe__xent_forward_backward(NULL, losses3, l, tg, N, V, dscale, 1);
    CHECK(same_bits(losses3, losses, N));
    free(l), free(losses), free(dl), free(c.l), free(ip), free(losses2), free(losses3);
}

/* ---- SwiGLU -------------------------------------------------------------- */

typedef struct {
    size_t n;
    double *h1, *h3, *r;
} swiglu_ctx;

static double swiglu_obj(void *ctx) {
    swiglu_ctx *c = ctx;
    double obj = 0;
    for (size_t i = 0; i < c->n; i++) obj += c->h1[i] / (1 + exp(-c->h1[i])) * c->h3[i] * c->r[i];
    return obj;
}

TEST(ops_swiglu_reference_and_gradients) {
    const size_t n = 37;
    uint64_t s = 12;
    float *h1 = frand(n, &s, 2.0), *h3 = frand(n, &s, 1.0), *r = frand(n, &s, 1.0), *a = fzeros(n);
    h1[0] = 0.0f, h1[1] = 30.0f, h1[2] = -30.0f;
    moe__swiglu_forward(a, h1, h3, n, 2);
    double worst = 0;
    for (size_t i = 0; i < n; i++) worst = fmax(worst, fabs(a[i] - h1[i] / (1 + exp(-(double)h1[i])) * h3[i]));
    CHECK_MSG(worst < 1e-5, "a err %g", worst);
    float *d1 = fzeros(n), *d3 = fzeros(n);
    moe__swiglu_backward(d1, d3, r, h1, h3, n, 2);
    swiglu_ctx c = {n, todouble(h1, n), todouble(h3, n), todouble(r, n)};
    CHECK_FD("swiglu dh1", swiglu_obj, &c, c.h1, d1, n);
    CHECK_FD("swiglu dh3", swiglu_obj, &c, c.h3, d3, n);
    /* in place: dh1 over da, and a over h1 */
    float *ip = fdup(r, n), *d3b = fzeros(n), *a2 = fdup(h1, n);
    moe__swiglu_backward(ip, d3b, ip, h1, h3, n, 1);
    CHECK(same_bits(ip, d1, n) && same_bits(d3b, d3, n));
    moe__swiglu_forward(a2, a2, h3, n, 1);
    CHECK(same_bits(a2, a, n));
    free(h1), free(h3), free(r), free(a), free(d1), free(d3), free(c.h1), free(c.h3), free(c.r), free(ip);
    free(d3b), free(a2);
}

/* ---- GEMM ---------------------------------------------------------------- */

static void check_gemm(int ta, int tb, int M, int N, int K, float alpha, float beta, uint64_t seed) {
    uint64_t s = seed;
    const int lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 5, ldc = N + 2;
    const size_t na = (size_t)(ta ? K : M) * lda, nb = (size_t)(tb ? N : K) * ldb, nc = (size_t)M * ldc;
    float *A = frand(na, &s, 1.0), *B = frand(nb, &s, 1.0), *C0 = frand(nc, &s, 1.0);
    if (beta == 0.0f)
        for (size_t i = 0; i < nc; i++) C0[i] = NAN; /* beta 0 must not read C */
    float *C1 = fdup(C0, nc), *C2 = fdup(C0, nc), *C3 = fdup(C0, nc);
    moe__gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C1, ldc, 1);
    moe__gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C2, ldc, 2);
    moe__gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C3, ldc, 3);
    CHECK_MSG(same_bits(C1, C2, nc) && same_bits(C1, C3, nc), "gemm %d%d %dx%dx%d: threads differ", ta, tb, M,
              N, K);
    double worst = 0;
    int padding_ok = 1;
    for (int i = 0; i < M; i++) {
        for (int j = 0; j < N; j++) {
            double acc = 0, mag = 0;
            for (int p = 0; p < K; p++) {
                const double a = ta ? A[(size_t)p * lda + i] : A[(size_t)i * lda + p];
                const double b = tb ? B[(size_t)j * ldb + p] : B[(size_t)p * ldb + j];
                acc += a * b, mag += fabs(a * b);
            }
            const double c0 = C0[(size_t)i * ldc + j];
            const double bc = beta != 0.0f ? beta * c0 : 0.0, ref = alpha * acc + bc;
            const double tol = 1e-6 * (fabs(alpha) * mag + fabs(bc)) + 1e-30;
            const double e = fabs(C1[(size_t)i * ldc + j] - ref) / tol;
            worst = isnan(e) ? INFINITY : fmax(worst, e);
        }
        for (int j = N; j < ldc; j++) /* the row padding is untouched */
            padding_ok &= memcmp(&C1[(size_t)i * ldc + j], &C0[(size_t)i * ldc + j], sizeof(float)) == 0;
    }
    CHECK_MSG(worst < 1.0, "gemm %d%d %dx%dx%d alpha %g beta %g: err %g x tol", ta, tb, M, N, K, alpha, beta,
              worst);
    CHECK(padding_ok);
    free(A), free(B), free(C0), free(C1), free(C2), free(C3);
}

TEST(ops_gemm_matches_naive_and_is_deterministic) {
    uint64_t seed = 20;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            check_gemm(ta, tb, 300, 1100, 70, 0.7f, 0.3f, seed++); /* tiles split rows and columns */
            check_gemm(ta, tb, 530, 40, 33, 1.0f, 0.0f, seed++);   /* rows over 256 */
            check_gemm(ta, tb, 40, 30, 17, -1.5f, 1.0f, seed++);   /* small: shrunk row tiles */
            check_gemm(ta, tb, 1, 7, 5, 1.0f, 0.0f, seed++);
        }
    CHECK_EQ_INT(moe__gemm_tile_m(4096, 1024), MOE__GEMM_TILE_M);
    CHECK(moe__gemm_tile_m(64, 512) < 64);
    /* K == 0: C = beta C */
    float c[6] = {1, 2, 3, 4, 5, 6}, nanc[2] = {NAN, NAN};
    moe__gemm(0, 0, 2, 3, 0, 1.0f, NULL, 1, NULL, 3, 0.5f, c, 3, 2);
    CHECK(c[0] == 0.5f && c[5] == 3.0f);
    moe__gemm(0, 0, 1, 2, 0, 1.0f, NULL, 1, NULL, 2, 0.0f, nanc, 2, 2);
    CHECK(nanc[0] == 0.0f && nanc[1] == 0.0f);
}

/* ---- determinism across thread counts ----------------------------------- */

TEST(ops_bitwise_identical_across_threads) {
    uint64_t s = 30;
    const int th[3] = {1, 2, 3};
    { /* RMSNorm */
        const int N = 700, C = 300;
        const size_t nc = (size_t)N * C;
        float *x = frand(nc, &s, 1.0), *g = frand(C, &s, 1.0), *dy = frand(nc, &s, 1.0);
        float *y[3], *rs[3], *dx[3], *dg[3];
        for (int i = 0; i < 3; i++) {
            y[i] = fzeros(nc), rs[i] = fzeros(N), dx[i] = fzeros(nc), dg[i] = fzeros(C);
            moe__rmsnorm_forward(y[i], rs[i], x, g, N, C, 1e-5f, th[i]);
            moe__rmsnorm_backward(dx[i], dg[i], dy, x, g, rs[i], N, C, th[i]);
        }
        for (int i = 1; i < 3; i++)
            CHECK_MSG(same_bits(y[0], y[i], nc) && same_bits(rs[0], rs[i], N) && same_bits(dx[0], dx[i], nc) &&
                          same_bits(dg[0], dg[i], C),
                      "rmsnorm threads %d", th[i]);
        for (int i = 0; i < 3; i++) free(y[i]), free(rs[i]), free(dx[i]), free(dg[i]);
        free(x), free(g), free(dy);
    }
    { /* RoPE */
        const int B = 3, T = 100, nh = 8, D = 64;
        const size_t n = (size_t)B * T * nh * D;
        float *tab = fzeros((size_t)(T + 5) * D), *x = frand(n, &s, 1.0), *y[3], *d[3];
        moe__rope_table(tab, T + 5, D, 10000.0f);
        for (int i = 0; i < 3; i++) {
            y[i] = fdup(x, n), d[i] = fdup(x, n);
            moe__rope_forward(y[i], tab, B, T, nh, D, 5, th[i]);
            moe__rope_backward(d[i], tab, B, T, nh, D, 5, th[i]);
        }
        for (int i = 1; i < 3; i++)
            CHECK_MSG(same_bits(y[0], y[i], n) && same_bits(d[0], d[i], n), "rope threads %d", th[i]);
        for (int i = 0; i < 3; i++) free(y[i]), free(d[i]);
        free(tab), free(x);
    }
    { /* attention */
        const int B = 3, T = 150, H = 8, G = 2, D = 32;
        const size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * G * D, na = (size_t)B * H * T * T;
        float *q = frand(nq, &s, 1.0), *k = frand(nk, &s, 1.0), *v = frand(nk, &s, 1.0), *dout = frand(nq, &s, 1.0);
        float *out[3], *att[3], *dq[3], *dk[3], *dv[3];
        for (int i = 0; i < 3; i++) {
            out[i] = fzeros(nq), att[i] = fzeros(na), dq[i] = fzeros(nq), dk[i] = fzeros(nk), dv[i] = fzeros(nk);
            float *scratch = malloc(sizeof(float) * moe__attention_scratch_size(T, th[i]));
            moe__attention_forward(out[i], att[i], q, k, v, B, T, H, G, D, th[i]);
            moe__attention_backward(dq[i], dk[i], dv[i], dout, att[i], q, k, v, B, T, H, G, D, scratch, th[i]);
            free(scratch);
        }
        for (int i = 1; i < 3; i++)
            CHECK_MSG(same_bits(out[0], out[i], nq) && same_bits(att[0], att[i], na) && same_bits(dq[0], dq[i], nq) &&
                          same_bits(dk[0], dk[i], nk) && same_bits(dv[0], dv[i], nk),
                      "attention threads %d", th[i]);
        for (int i = 0; i < 3; i++) free(out[i]), free(att[i]), free(dq[i]), free(dk[i]), free(dv[i]);
        free(q), free(k), free(v), free(dout);
    }
    { /* embedding, cross-entropy, SwiGLU */
        const int N = 1000, C = 300, V = 1000;
        int32_t *tok = malloc(sizeof(int32_t) * N);
        for (int n = 0; n < N; n++) tok[n] = (int32_t)(rand_u32(&s) % 50); /* many repeats */
        float *table = frand((size_t)V * C, &s, 1.0), *dout = frand((size_t)N * C, &s, 1.0);
        float *logits = frand((size_t)N * V, &s, 2.0);
        const size_t ne = 100000;
        float *h1 = frand(ne, &s, 2.0), *h3 = frand(ne, &s, 1.0), *da = frand(ne, &s, 1.0);
        float *eo[3], *ed[3], *xl[3], *xd[3], *sa[3], *s1[3], *s3[3];
        for (int i = 0; i < 3; i++) {
            eo[i] = fzeros((size_t)N * C), ed[i] = fzeros((size_t)V * C);
            moe__embedding_forward(eo[i], tok, table, N, C, th[i]);
            moe__embedding_backward(ed[i], dout, tok, N, C, th[i]);
            xl[i] = fzeros(N), xd[i] = fzeros((size_t)N * V);
            moe__xent_forward_backward(xd[i], xl[i], logits, tok, N, V, 1.0f / N, th[i]);
            sa[i] = fzeros(ne), s1[i] = fzeros(ne), s3[i] = fzeros(ne);
            moe__swiglu_forward(sa[i], h1, h3, ne, th[i]);
            moe__swiglu_backward(s1[i], s3[i], da, h1, h3, ne, th[i]);
        }
        for (int i = 1; i < 3; i++) {
            CHECK_MSG(same_bits(eo[0], eo[i], (size_t)N * C) && same_bits(ed[0], ed[i], (size_t)V * C),
                      "embedding threads %d", th[i]);
            CHECK_MSG(same_bits(xl[0], xl[i], N) && same_bits(xd[0], xd[i], (size_t)N * V), "xent threads %d", th[i]);
            CHECK_MSG(same_bits(sa[0], sa[i], ne) && same_bits(s1[0], s1[i], ne) && same_bits(s3[0], s3[i], ne),
                      "swiglu threads %d", th[i]);
        }
        for (int i = 0; i < 3; i++) free(eo[i]), free(ed[i]), free(xl[i]), free(xd[i]), free(sa[i]), free(s1[i]), free(s3[i]);
        free(tok), free(table), free(dout), free(logits), free(h1), free(h3), free(da);
    }
}
