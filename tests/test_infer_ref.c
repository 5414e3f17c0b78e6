/* Tiny GGUF MoE models and their double-precision reference forward. */
#include "test_infer_ref.h"

#include "io/gguf.h"
#include "io/quant.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

tiny_spec tiny_default(int arch) {
    tiny_spec s = {.arch = arch, .V = 67, .C = 64, .L = 2, .H = 4, .G = 2, .D = 16, .n_rot = 16, .E = 4, .K = 2,
                   .F = 32, .Fs = 0, .tied = 0, .bias = 0, .wtype = MOE__GGML_F32, .rope_base = 10000.0f,
                   .eps = 1e-5f};
    if (arch == TINY_QWEN2MOE) s.Fs = 64, s.bias = 1;
    if (arch == TINY_OLMOE) s.G = 4;
    return s;
}

static uint64_t g_state;
static float urand(void) { /* uniform in [-1, 1): an LCG, independent of the library's RNG */
    g_state = g_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (float)((double)(g_state >> 11) / (double)(1ULL << 53) * 2.0 - 1.0);
}

static void add(tiny_model *m, const char *name, int nd, int64_t n0, int64_t n1, int64_t n2, uint32_t type,
                float scale, float offset) {
    tiny_tensor *t = &m->t[m->n++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->nd = nd, t->ne[0] = n0, t->ne[1] = n1, t->ne[2] = n2, t->type = type;
    size_t n = (size_t)(n0 * n1 * n2);
    float *x = malloc(n * sizeof(float));
    /* in double, rounded once: the same floats whether or not the compiler fuses the multiply-add */
    for (size_t i = 0; i < n; i++) x[i] = (float)((double)offset + (double)scale * (double)urand());
    t->nbytes = moe__gguf_row_size(type, n);
    t->bytes = malloc(t->nbytes);
    moe__gguf_quantize(type, x, t->bytes, n);
    t->ref = malloc(n * sizeof(float));
    moe__gguf_dequantize(type, t->bytes, t->ref, n);
    free(x);
}

void tiny_build(tiny_model *m, const tiny_spec *s, uint64_t seed) {
    memset(m, 0, sizeof *m);
    m->s = *s;
    m->t = calloc((size_t)(8 + 24 * s->L), sizeof(tiny_tensor));
    g_state = seed;
    const int C = s->C, HD = s->H * s->D, GD = s->G * s->D;
    const uint32_t w = s->wtype, f32 = MOE__GGML_F32;
    const float ws = 1.0f / sqrtf((float)C);
    add(m, "token_embd.weight", 2, C, s->V, 1, w, 1.0f, 0);
    add(m, "output_norm.weight", 1, C, 1, 1, f32, 0.2f, 1.0f);
    if (!s->tied) add(m, "output.weight", 2, C, s->V, 1, w, ws, 0);
    for (int l = 0; l < s->L; l++) {
        char n[64];
#define NM(x) (snprintf(n, sizeof n, "blk.%d." x, l), n)
        add(m, NM("attn_norm.weight"), 1, C, 1, 1, f32, 0.2f, 1.0f);
        add(m, NM("attn_q.weight"), 2, C, HD, 1, w, ws * 2, 0);
        add(m, NM("attn_k.weight"), 2, C, GD, 1, w, ws * 2, 0);
        add(m, NM("attn_v.weight"), 2, C, GD, 1, w, ws, 0);
        add(m, NM("attn_output.weight"), 2, HD, C, 1, w, 1.0f / sqrtf((float)HD), 0);
        if (s->bias) {
            add(m, NM("attn_q.bias"), 1, HD, 1, 1, f32, 0.3f, 0);
            add(m, NM("attn_k.bias"), 1, GD, 1, 1, f32, 0.3f, 0);
            add(m, NM("attn_v.bias"), 1, GD, 1, 1, f32, 0.3f, 0);
        }
        if (s->arch == TINY_OLMOE) {
            add(m, NM("attn_q_norm.weight"), 1, HD, 1, 1, f32, 0.2f, 1.0f);
            add(m, NM("attn_k_norm.weight"), 1, GD, 1, 1, f32, 0.2f, 1.0f);
        }
        add(m, NM("ffn_norm.weight"), 1, C, 1, 1, f32, 0.2f, 1.0f);
        add(m, NM("ffn_gate_inp.weight"), 2, C, s->E, 1, f32, ws * 3, 0); /* routers stay F32, as in llama.cpp */
        add(m, NM("ffn_gate_exps.weight"), 3, C, s->F, s->E, w, ws * 2, 0);
        add(m, NM("ffn_up_exps.weight"), 3, C, s->F, s->E, w, ws * 2, 0);
        add(m, NM("ffn_down_exps.weight"), 3, s->F, C, s->E, w, 1.0f / sqrtf((float)s->F), 0);
        if (s->arch == TINY_QWEN2MOE) {
            add(m, NM("ffn_gate_inp_shexp.weight"), 1, C, 1, 1, f32, ws * 3, 0);
            add(m, NM("ffn_gate_shexp.weight"), 2, C, s->Fs, 1, w, ws * 2, 0);
            add(m, NM("ffn_up_shexp.weight"), 2, C, s->Fs, 1, w, ws * 2, 0);
            add(m, NM("ffn_down_shexp.weight"), 2, s->Fs, C, 1, w, 1.0f / sqrtf((float)s->Fs), 0);
        }
#undef NM
    }
}

void tiny_free(tiny_model *m) {
    for (int i = 0; i < m->n; i++) free(m->t[i].ref), free(m->t[i].bytes);
    free(m->t);
    memset(m, 0, sizeof *m);
}

const float *tiny_get(const tiny_model *m, const char *name) {
    for (int i = 0; i < m->n; i++)
        if (!strcmp(m->t[i].name, name)) return m->t[i].ref;
    return NULL;
}

int tiny_write(const tiny_model *m, const char *path, const char *skip, int expert_used) {
    static const char *archs[] = {"llama", "qwen2moe", "olmoe"};
    const tiny_spec *s = &m->s;
    const char *a = archs[s->arch];
    moe__gguf_writer *w;
    if (moe__gguf_writer_new(&w)) return -1;
    char k[96];
#define KEY(x) (snprintf(k, sizeof k, "%s." x, a), k)
    moe__gguf_writer_add_str(w, "general.architecture", a);
    moe__gguf_writer_add_u32(w, KEY("context_length"), 64);
    moe__gguf_writer_add_u32(w, KEY("embedding_length"), (uint32_t)s->C);
    moe__gguf_writer_add_u32(w, KEY("block_count"), (uint32_t)s->L);
    moe__gguf_writer_add_u32(w, KEY("attention.head_count"), (uint32_t)s->H);
    moe__gguf_writer_add_u32(w, KEY("attention.head_count_kv"), (uint32_t)s->G);
    moe__gguf_writer_add_u32(w, KEY("attention.key_length"), (uint32_t)s->D);
    moe__gguf_writer_add_u32(w, KEY("attention.value_length"), (uint32_t)s->D);
    moe__gguf_writer_add_u32(w, KEY("rope.dimension_count"), (uint32_t)s->n_rot);
    moe__gguf_writer_add_f32(w, KEY("rope.freq_base"), s->rope_base);
    moe__gguf_writer_add_f32(w, KEY("attention.layer_norm_rms_epsilon"), s->eps);
    moe__gguf_writer_add_u32(w, KEY("expert_count"), (uint32_t)s->E);
    moe__gguf_writer_add_u32(w, KEY("expert_used_count"), (uint32_t)(expert_used > 0 ? expert_used : s->K));
    if (s->arch == TINY_QWEN2MOE) {
        moe__gguf_writer_add_u32(w, KEY("feed_forward_length"), 999); /* unused when the expert keys exist */
        moe__gguf_writer_add_u32(w, KEY("expert_feed_forward_length"), (uint32_t)s->F);
        moe__gguf_writer_add_u32(w, KEY("expert_shared_feed_forward_length"), (uint32_t)s->Fs);
    } else {
        moe__gguf_writer_add_u32(w, KEY("feed_forward_length"), (uint32_t)s->F);
    }
#undef KEY
    for (int i = 0; i < m->n; i++) {
        const tiny_tensor *t = &m->t[i];
        if (skip && !strcmp(skip, t->name)) continue;
        moe__gguf_writer_add_tensor(w, t->name, t->type, t->nd, t->ne, t->bytes, t->nbytes);
    }
    char err[256];
    int rc = moe__gguf_writer_write(w, path, err, sizeof err);
    if (rc) fprintf(stderr, "tiny_write: %s\n", err);
    moe__gguf_writer_free(w);
    return rc;
}

/* ---- the reference ---------------------------------------------------------- */

static void rmsnorm(double *y, const double *x, const float *g, int n, double eps) {
    double ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const double r = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++) y[i] = x[i] * r * g[i];
}

/* y [rows] = W [rows][cols] x (+ b) */
static void linear(double *y, const float *W, const float *b, const double *x, int rows, int cols) {
    for (int r = 0; r < rows; r++) {
        double s = b ? b[r] : 0;
        for (int c = 0; c < cols; c++) s += (double)W[(size_t)r * cols + c] * x[c];
        y[r] = s;
    }
}

/* llama.cpp's rope types: arch llama rotates adjacent pairs (the converter
 * permuted the Hugging Face rows), qwen2moe and olmoe the halves. */
static void rope(double *v, int pos, const tiny_spec *s) {
    for (int i = 0; i < s->n_rot / 2; i++) {
        const double ang = pos * pow(s->rope_base, -2.0 * i / s->n_rot);
        const int a = s->arch == TINY_LLAMA ? 2 * i : i, b = s->arch == TINY_LLAMA ? 2 * i + 1 : i + s->n_rot / 2;
        const double x0 = v[a], x1 = v[b];
        v[a] = x0 * cos(ang) - x1 * sin(ang);
        v[b] = x0 * sin(ang) + x1 * cos(ang);
    }
}

static double silu(double x) { return x / (1 + exp(-x)); }

/* y [C] = down(silu(gate x) * up x) of one expert's matrices */
static void ffn(double *y, const float *Wg, const float *Wu, const float *Wd, const double *x, int C, int F) {
    double *g = malloc(sizeof(double) * F), *u = malloc(sizeof(double) * F);
    linear(g, Wg, NULL, x, F, C);
    linear(u, Wu, NULL, x, F, C);
    for (int i = 0; i < F; i++) g[i] = silu(g[i]) * u[i];
    linear(y, Wd, NULL, g, C, F);
    free(g), free(u);
}

void tiny_ref_forward(const tiny_model *m, const int32_t *tok, int T, int k, double *out) {
    const tiny_spec *s = &m->s;
    const int C = s->C, H = s->H, G = s->G, D = s->D, HD = H * D, GD = G * D, E = s->E, F = s->F;
    double *x = calloc((size_t)T * C, sizeof(double)), *xn = malloc(sizeof(double) * C);
    double *q = malloc(sizeof(double) * T * HD), *kk = malloc(sizeof(double) * T * GD);
    double *vv = malloc(sizeof(double) * T * GD), *att = malloc(sizeof(double) * HD);
    double *o = malloc(sizeof(double) * C), *y = malloc(sizeof(double) * C), *p = malloc(sizeof(double) * T);
    double *lg = malloc(sizeof(double) * E);
    const float *emb = tiny_get(m, "token_embd.weight");
    for (int t = 0; t < T; t++)
        for (int c = 0; c < C; c++) x[(size_t)t * C + c] = emb[(size_t)tok[t] * C + c];
    char n[64];
#define W(l, x) (snprintf(n, sizeof n, "blk.%d." x, l), tiny_get(m, n))
    for (int l = 0; l < s->L; l++) {
        for (int t = 0; t < T; t++) { /* q, k, v of every position */
            rmsnorm(xn, x + (size_t)t * C, W(l, "attn_norm.weight"), C, s->eps);
            linear(q + (size_t)t * HD, W(l, "attn_q.weight"), W(l, "attn_q.bias"), xn, HD, C);
            linear(kk + (size_t)t * GD, W(l, "attn_k.weight"), W(l, "attn_k.bias"), xn, GD, C);
            linear(vv + (size_t)t * GD, W(l, "attn_v.weight"), W(l, "attn_v.bias"), xn, GD, C);
            if (s->arch == TINY_OLMOE) {
                rmsnorm(q + (size_t)t * HD, q + (size_t)t * HD, W(l, "attn_q_norm.weight"), HD, s->eps);
                rmsnorm(kk + (size_t)t * GD, kk + (size_t)t * GD, W(l, "attn_k_norm.weight"), GD, s->eps);
            }
            for (int h = 0; h < H; h++) rope(q + (size_t)t * HD + h * D, t, s);
            for (int g = 0; g < G; g++) rope(kk + (size_t)t * GD + g * D, t, s);
        }
        for (int t = 0; t < T; t++) {
            double *xt = x + (size_t)t * C;
            for (int h = 0; h < H; h++) {
                const int g = h / (H / G);
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= t; j++) {
                    double d = 0;
                    for (int i = 0; i < D; i++) d += q[(size_t)t * HD + h * D + i] * kk[(size_t)j * GD + g * D + i];
                    p[j] = d / sqrt((double)D);
                    mx = p[j] > mx ? p[j] : mx;
                }
                for (int j = 0; j <= t; j++) sum += p[j] = exp(p[j] - mx);
                for (int i = 0; i < D; i++) {
                    double a = 0;
                    for (int j = 0; j <= t; j++) a += p[j] / sum * vv[(size_t)j * GD + g * D + i];
                    att[h * D + i] = a;
                }
            }
            linear(o, W(l, "attn_output.weight"), NULL, att, C, HD);
            /* x is updated per position after all q/k/v were taken: only this
             * position's residual changes, later positions read their own */
            for (int c = 0; c < C; c++) xt[c] += o[c];
            rmsnorm(xn, xt, W(l, "ffn_norm.weight"), C, s->eps);
            linear(lg, W(l, "ffn_gate_inp.weight"), NULL, xn, E, C);
            double mx = -INFINITY, sum = 0;
            for (int e = 0; e < E; e++) mx = lg[e] > mx ? lg[e] : mx;
            for (int e = 0; e < E; e++) sum += lg[e] = exp(lg[e] - mx);
            for (int e = 0; e < E; e++) lg[e] /= sum;
            int sel[64];
            double w[64], wsum = 0;
            for (int r = 0; r < k; r++) { /* highest probability first, lower id on ties */
                int best = -1;
                for (int e = 0; e < E; e++) {
                    int used = 0;
                    for (int u = 0; u < r; u++) used |= sel[u] == e;
                    if (!used && (best < 0 || lg[e] > lg[best])) best = e;
                }
                sel[r] = best, w[r] = lg[best], wsum += lg[best];
            }
            double moe[256] = {0};
            for (int r = 0; r < k; r++) {
                const double wr = s->arch == TINY_LLAMA ? w[r] / wsum : w[r]; /* only Mixtral renormalises */
                const size_t e = (size_t)sel[r];
                ffn(y, W(l, "ffn_gate_exps.weight") + e * F * C, W(l, "ffn_up_exps.weight") + e * F * C,
                    W(l, "ffn_down_exps.weight") + e * C * F, xn, C, F);
                for (int c = 0; c < C; c++) moe[c] += wr * y[c];
            }
            if (s->arch == TINY_QWEN2MOE) {
                const float *gi = W(l, "ffn_gate_inp_shexp.weight");
                double gl = 0;
                for (int c = 0; c < C; c++) gl += gi[c] * xn[c];
                const double sg = 1 / (1 + exp(-gl));
                snprintf(n, sizeof n, "blk.%d.ffn_gate_shexp.weight", l);
                const float *wg = tiny_get(m, n);
                snprintf(n, sizeof n, "blk.%d.ffn_up_shexp.weight", l);
                const float *wu = tiny_get(m, n);
                snprintf(n, sizeof n, "blk.%d.ffn_down_shexp.weight", l);
                ffn(y, wg, wu, tiny_get(m, n), xn, C, s->Fs);
                for (int c = 0; c < C; c++) moe[c] += sg * y[c];
            }
            for (int c = 0; c < C; c++) xt[c] += moe[c];
        }
    }
#undef W
    const float *outw = tiny_get(m, s->tied ? "token_embd.weight" : "output.weight");
    for (int t = 0; t < T; t++) {
        rmsnorm(xn, x + (size_t)t * C, tiny_get(m, "output_norm.weight"), C, s->eps);
        linear(out + (size_t)t * s->V, outw, NULL, xn, s->V, C);
    }
    free(x), free(xn), free(q), free(kk), free(vv), free(att), free(o), free(y), free(p), free(lg);
}
