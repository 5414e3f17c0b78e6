/* The forward pass of a GGUF MoE model with a KV cache (llama.cpp's graph for
 * llama/Mixtral, qwen2moe and olmoe; docs/inference.md). A batch of tokens
 * runs every matrix once over all of them; each expert runs once over the
 * tokens routed to it. */
#include "infer/infer.h"
#include "model/ops.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>

struct moe_engine {
    moe__imodel *m;
    moe_engine_params p;
    int threads, n_past, k; /* k: experts per token in use */
    int kcap;               /* slots per token that outs holds */
    float *kcache, *vcache; /* [L][n_ctx][G*D] */
    /* work buffers for B = n_batch tokens */
    float *x, *xn, *q, *kx, *vx, *att, *tmp; /* [B][C] [B][C] [B][H*D] [B][G*D] [B][G*D] [B][H*D] [B][C] */
    float *rstd, *rope;                      /* [B], [B][n_rot] (cos, sin pairs) */
    float *probs, *wts;                      /* [B][E], [B][E] (first k used) */
    int *sel, *cnt, *list;                   /* [B][E], [E], [E][B] (token * k + slot) */
    float *xe, *ge, *ue, *de;                /* gathered [B][C], [B][F], [B][F], [B][C] */
    float *outs;                             /* [B][kcap][C] expert outputs per (token, slot) */
    float *gs, *us, *shg;                    /* shared expert [B][Fs], [B][Fs], gate [B] */
    float *scores;                           /* [threads][n_ctx] */
    float *last;                             /* [V] */
    moe__kscratch ks;
    moe__engine_ep *ep;     /* expert parallelism: NULL in one process (engine_ep.c) */
    int ep_rc;              /* a failed exchange during the last eval */
    char errmsg[512];
};

moe_engine_params moe_engine_params_default(void) {
    moe_engine_params p = {.n_ctx = 0, .n_batch = 512, .n_threads = 0, .experts_used = 0, .use_mmap = 1};
    return p;
}

static int alloc_all(moe_engine *e) {
    const moe_engine_hparams *h = &e->m->hp;
    const size_t B = (size_t)e->p.n_batch, C = h->n_embd, HD = (size_t)h->n_head * h->head_dim,
                 GD = (size_t)h->n_head_kv * h->head_dim, E = h->n_expert, F = h->n_ff_exp,
                 Fs = h->n_ff_shexp ? h->n_ff_shexp : 1, L = h->n_layer, T = (size_t)e->p.n_ctx;
    size_t maxc = C > HD ? C : HD;
    if (F > maxc) maxc = F;
    if (Fs > maxc) maxc = Fs;
    size_t kv;
    if (moe__mul_size(L * T, GD, &kv) || moe__mul_size(B * E, C, &(size_t){0})) return MOE_ELIMIT;
    struct { float **p; size_t n; } f[] = {
        {&e->kcache, kv}, {&e->vcache, kv}, {&e->x, B * C}, {&e->xn, B * C}, {&e->q, B * HD},
        {&e->kx, B * GD}, {&e->vx, B * GD}, {&e->att, B * HD}, {&e->tmp, B * C}, {&e->rstd, B},
        {&e->rope, B * h->n_rot}, {&e->probs, B * E}, {&e->wts, B * E}, {&e->xe, B * C}, {&e->ge, B * F},
        {&e->ue, B * F}, {&e->de, B * C}, {&e->outs, B * (size_t)e->kcap * C}, {&e->gs, B * Fs}, {&e->us, B * Fs},
        {&e->shg, B}, {&e->scores, (size_t)e->threads * T}, {&e->last, (size_t)h->n_vocab},
        {&e->ks.rows, (size_t)e->threads * 16 * maxc}};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (!(*f[i].p = moe__aligned_alloc((f[i].n ? f[i].n : 1) * sizeof(float)))) return MOE_ENOMEM;
    e->sel = moe__malloc(B * E * sizeof(int));
    e->cnt = moe__malloc(E * sizeof(int));
    e->list = moe__malloc(B * E * sizeof(int));
    e->ks.q = moe__aligned_alloc(B * moe__gguf_row_size(MOE__GGML_Q8_0, (maxc + 31) / 32 * 32) + 64);
    e->ks.max_cols = (int)maxc, e->ks.threads = e->threads;
    return e->sel && e->cnt && e->list && e->ks.q ? 0 : MOE_ENOMEM;
}

void moe_engine_free(moe_engine *e) {
    if (!e) return;
    float *f[] = {e->kcache, e->vcache, e->x, e->xn, e->q, e->kx, e->vx, e->att, e->tmp, e->rstd, e->rope,
                  e->probs, e->wts, e->xe, e->ge, e->ue, e->de, e->outs, e->gs, e->us, e->shg, e->scores,
                  e->last, e->ks.rows};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) moe__afree(f[i]);
    moe__afree(e->ks.q);
    moe__free(e->sel), moe__free(e->cnt), moe__free(e->list);
    moe__engine_ep_free(e->ep);
    moe__imodel_free(e->m);
    moe__free(e);
}

static int load_local(const char *path, const moe_engine_params *pp, moe_engine **out, char *err, size_t errsz);

int moe_engine_load(const char *path, const moe_engine_params *pp, moe_engine **out, char *err, size_t errsz) {
    /* under expert parallelism every rank loads; one failing fails them all */
    const int rc = moe__engine_ep_agree(load_local(path, pp, out, err, errsz), err, errsz);
    if (rc && *out) {
        moe_engine_free(*out);
        *out = NULL;
    }
    return rc;
}

static int load_local(const char *path, const moe_engine_params *pp, moe_engine **out, char *err, size_t errsz) {
    *out = NULL;
    moe_engine_params p = pp ? *pp : moe_engine_params_default();
    if (p.n_ctx < 0 || p.n_batch < 0 || p.experts_used < 0 || p.n_batch > (1 << 16) || p.n_ctx > (1 << 24))
        return moe__set_err(err, errsz, MOE_EINVAL, "bad engine parameters (n_ctx %d, n_batch %d, experts_used %d)",
                            p.n_ctx, p.n_batch, p.experts_used);
    moe_engine *e = moe__calloc(1, sizeof *e);
    if (!e) return moe__set_err(err, errsz, MOE_ENOMEM, "out of memory");
    int rc = moe__imodel_load(path, p.use_mmap, &e->m, err, errsz);
    if (rc) {
        moe__free(e);
        return rc;
    }
    moe_engine_hparams *h = &e->m->hp;
    if (!p.n_ctx) p.n_ctx = h->n_ctx_train < 4096 ? h->n_ctx_train : 4096;
    if (p.n_ctx <= 0) p.n_ctx = 4096;
    if (!p.n_batch) p.n_batch = 512;
    if (p.n_batch > p.n_ctx) p.n_batch = p.n_ctx;
    h->n_ctx = p.n_ctx;
    e->p = p;
    e->threads = moe__threads(p.n_threads);
    e->k = h->n_expert_used;
    if (p.experts_used && p.experts_used > h->n_expert) {
        moe__set_err(err, errsz, MOE_EINVAL, "%s: --experts-used %d but the model has %d experts", path,
                     p.experts_used, h->n_expert);
        moe_engine_free(e);
        return MOE_EINVAL;
    }
    if (p.experts_used) e->k = p.experts_used;
    e->kcap = e->k;
    if ((rc = alloc_all(e))) {
        moe_engine_free(e);
        return moe__set_err(err, errsz, rc, "%s: cannot allocate the KV cache and buffers (n_ctx %d, n_batch %d)",
                            path, p.n_ctx, p.n_batch);
    }
    if ((rc = moe__engine_ep_create(h->n_expert, h->n_embd, (size_t)p.n_batch * e->kcap, &e->ep, err, errsz))) {
        moe_engine_free(e);
        return rc;
    }
    *out = e;
    return 0;
}

const moe_engine_hparams *moe_engine_get_hparams(const moe_engine *e) { return &e->m->hp; }
const char *moe_engine_errmsg(const moe_engine *e) { return e->errmsg; }
int moe_engine_n_past(const moe_engine *e) { return e->n_past; }

int moe_engine_set_experts_used(moe_engine *e, int k) {
    if (k < 0 || k > e->m->hp.n_expert)
        return moe__set_err(e->errmsg, sizeof e->errmsg, MOE_EINVAL, "experts used %d: the model has %d experts", k,
                            e->m->hp.n_expert);
    k = k ? k : e->m->hp.n_expert_used;
    if (k > e->kcap) { /* more slots per token than the buffer was sized for */
        float *o = moe__aligned_alloc(sizeof(float) * (size_t)e->p.n_batch * k * e->m->hp.n_embd);
        if (!o || (e->ep && moe__engine_ep_reserve(e->ep, (size_t)e->p.n_batch * k))) {
            moe__afree(o);
            return moe__set_err(e->errmsg, sizeof e->errmsg, MOE_ENOMEM, "experts used %d: out of memory", k);
        }
        moe__afree(e->outs);
        e->outs = o, e->kcap = k;
    }
    e->k = k;
    return 0;
}

int moe_engine_truncate(moe_engine *e, int n) {
    if (n < 0 || n > e->n_past)
        return moe__set_err(e->errmsg, sizeof e->errmsg, MOE_EINVAL, "truncate to %d: %d positions cached", n,
                            e->n_past);
    e->n_past = n;
    return 0;
}

/* ---- pieces of the forward -------------------------------------------------- */

static void add_bias(float *y, const float *b, int n, int d) {
    if (!b) return;
    for (int t = 0; t < n; t++)
        for (int i = 0; i < d; i++) y[(size_t)t * d + i] += b[i];
}

/* ggml's rope cache: theta starts at the position and is multiplied by
 * base^(-2/n_rot) in float for each pair, as llama.cpp computes it (so long
 * positions round the same way). */
static void rope_table(moe_engine *e, int n, int pos0) {
    const int nr = e->m->hp.n_rot;
    const float scale = powf(e->m->hp.rope_base, -2.0f / (float)nr);
    for (int t = 0; t < n; t++) {
        float theta = (float)(pos0 + t);
        for (int i = 0; i < nr / 2; i++) {
            e->rope[(size_t)t * nr + 2 * i] = cosf(theta);
            e->rope[(size_t)t * nr + 2 * i + 1] = sinf(theta);
            theta *= scale;
        }
    }
}

/* x [n][heads][D]; pair i rotates (2i, 2i+1) or, half-split, (i, i + n_rot/2). */
static void rope_apply(const moe_engine *e, float *x, int n, int heads) {
    const int D = e->m->hp.head_dim, nr = e->m->hp.n_rot, neox = e->m->rope_neox;
    for (int t = 0; t < n; t++) {
        const float *cs = e->rope + (size_t)t * nr;
        for (int hh = 0; hh < heads; hh++) {
            float *v = x + ((size_t)t * heads + hh) * D;
            for (int i = 0; i < nr / 2; i++) {
                const int a = neox ? i : 2 * i, b = neox ? i + nr / 2 : 2 * i + 1;
                const float x0 = v[a], x1 = v[b], c = cs[2 * i], s = cs[2 * i + 1];
                v[a] = x0 * c - x1 * s;
                v[b] = x0 * s + x1 * c;
            }
        }
    }
}

static void attention(moe_engine *e, int layer, int n, int pos0) {
    const moe_engine_hparams *h = &e->m->hp;
    const int H = h->n_head, G = h->n_head_kv, D = h->head_dim, GD = G * D;
    const float *kc = e->kcache + (size_t)layer * e->p.n_ctx * GD, *vc = e->vcache + (size_t)layer * e->p.n_ctx * GD;
    const float scale = 1.0f / sqrtf((float)D);
#pragma omp parallel for num_threads(e->threads) schedule(static)
    for (int th = 0; th < n * H; th++) {
        const int t = th / H, hh = th % H, g = hh / (H / G), last = pos0 + t;
        const float *qv = e->q + (size_t)t * H * D + (size_t)hh * D;
        float *sc = e->scores + (size_t)omp_get_thread_num() * e->p.n_ctx, *o = e->att + (size_t)t * H * D + (size_t)hh * D;
        float mx = -INFINITY;
        for (int j = 0; j <= last; j++) {
            sc[j] = moe__dot_f32(kc + (size_t)j * GD + (size_t)g * D, qv, D) * scale;
            if (sc[j] > mx) mx = sc[j];
        }
        double sum = 0;
        for (int j = 0; j <= last; j++) sum += sc[j] = expf(sc[j] - mx);
        const float inv = (float)(1.0 / sum);
        memset(o, 0, sizeof(float) * D);
        for (int j = 0; j <= last; j++) {
            const float pj = sc[j] * inv, *vv = vc + (size_t)j * GD + (size_t)g * D;
            for (int d = 0; d < D; d++) o[d] += pj * vv[d];
        }
    }
}

/* Router: softmax over E, top-k in descending order (lower id first on ties),
 * weights optionally renormalised (llama.cpp clamps the sum at the smallest
 * normal fp16) and scaled. */
static void route(moe_engine *e, int n) {
    const int E = e->m->hp.n_expert, K = e->k;
    for (int t = 0; t < n; t++) {
        float *p = e->probs + (size_t)t * E, mx = -INFINITY;
        for (int i = 0; i < E; i++) mx = p[i] > mx ? p[i] : mx;
        double sum = 0;
        for (int i = 0; i < E; i++) sum += p[i] = expf(p[i] - mx);
        const float inv = (float)(1.0 / sum);
        for (int i = 0; i < E; i++) p[i] *= inv;
        int *sel = e->sel + (size_t)t * E;
        float *w = e->wts + (size_t)t * E, wsum = 0;
        for (int s = 0; s < K; s++) {
            int best = -1;
            for (int i = 0; i < E; i++) {
                int taken = 0;
                for (int r = 0; r < s; r++) taken |= sel[r] == i;
                if (!taken && (best < 0 || p[i] > p[best])) best = i;
            }
            sel[s] = best, w[s] = p[best], wsum += p[best];
        }
        if (e->m->norm_topk) {
            if (wsum < 6.103515625e-5f) wsum = 6.103515625e-5f;
            for (int s = 0; s < K; s++) w[s] /= wsum;
        }
        if (e->m->w_scale != 0.0f && e->m->w_scale != 1.0f)
            for (int s = 0; s < K; s++) w[s] *= e->m->w_scale;
    }
}

static void swiglu(float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* The routed experts over e->xn, into e->tmp [n][C]. */
static void experts(moe_engine *e, const moe__ilayer *y, int n) {
    const int E = e->m->hp.n_expert, K = e->k, C = e->m->hp.n_embd, F = e->m->hp.n_ff_exp;
    memset(e->cnt, 0, sizeof(int) * E);
    for (int t = 0; t < n; t++) /* token order within each expert */
        for (int s = 0; s < K; s++) {
            const int x = e->sel[(size_t)t * E + s];
            e->list[(size_t)x * e->p.n_batch + e->cnt[x]++] = t * K + s;
        }
    int x0 = 0, x1 = E;
    if (e->ep) moe__engine_ep_range(e->ep, &x0, &x1); /* this rank's experts */
    for (int x = x0; x < x1; x++) {
        const int m = e->cnt[x];
        if (!m) continue; /* never touched: its pages are never read */
        const int *lst = e->list + (size_t)x * e->p.n_batch;
        for (int i = 0; i < m; i++) memcpy(e->xe + (size_t)i * C, e->xn + (size_t)(lst[i] / K) * C, sizeof(float) * C);
        moe__wt_matmul(&y->gate_exps, x, e->xe, m, e->ge, F, &e->ks, 0);
        moe__wt_matmul(&y->up_exps, x, e->xe, m, e->ue, F, &e->ks, 1);
        swiglu(e->ge, e->ue, (size_t)m * F);
        moe__wt_matmul(&y->down_exps, x, e->ge, m, e->de, C, &e->ks, 0);
        for (int i = 0; i < m; i++) memcpy(e->outs + (size_t)lst[i] * C, e->de + (size_t)i * C, sizeof(float) * C);
    }
    if (e->ep) { /* every rank exchanges, even after a failure, so none waits */
        const int rc = moe__engine_ep_exchange(e->ep, e->sel, E, n, K, e->outs, e->errmsg, sizeof e->errmsg);
        if (rc && !e->ep_rc) e->ep_rc = rc;
    }
    for (int t = 0; t < n; t++) { /* weighted sum in top-k order, as llama.cpp adds the slots */
        float *o = e->tmp + (size_t)t * C;
        for (int s = 0; s < K; s++) {
            const float w = e->wts[(size_t)t * E + s], *d = e->outs + ((size_t)t * K + s) * C;
            for (int c = 0; c < C; c++) o[c] = s ? o[c] + d[c] * w : d[c] * w;
        }
    }
}

/* qwen2moe: tmp += sigmoid(x . g) * shared_ffn(x). */
static void shared_expert(moe_engine *e, const moe__ilayer *y, int n) {
    const int C = e->m->hp.n_embd, Fs = e->m->hp.n_ff_shexp;
    moe__wt_matmul(&y->gate_sh, 0, e->xn, n, e->gs, Fs, &e->ks, 0);
    moe__wt_matmul(&y->up_sh, 0, e->xn, n, e->us, Fs, &e->ks, 1);
    swiglu(e->gs, e->us, (size_t)n * Fs);
    moe__wt_matmul(&y->down_sh, 0, e->gs, n, e->de, C, &e->ks, 0);
    for (int t = 0; t < n; t++) {
        const float g = moe__dot_f32(e->xn + (size_t)t * C, y->gate_inp_sh, C), sg = 1.0f / (1.0f + expf(-g));
        float *o = e->tmp + (size_t)t * C;
        const float *d = e->de + (size_t)t * C;
        for (int c = 0; c < C; c++) o[c] += d[c] * sg;
    }
}

static void forward_layer(moe_engine *e, int l, int n, int pos0) {
    const moe__imodel *m = e->m;
    const moe_engine_hparams *h = &m->hp;
    const moe__ilayer *y = &m->layers[l];
    const int C = h->n_embd, HD = h->n_head * h->head_dim, GD = h->n_head_kv * h->head_dim, E = h->n_expert;
    moe__rmsnorm_forward(e->xn, e->rstd, e->x, y->attn_norm, n, C, h->rms_eps, n > 1 ? e->threads : 1);
    moe__wt_matmul(&y->wq, 0, e->xn, n, e->q, HD, &e->ks, 0);
    moe__wt_matmul(&y->wk, 0, e->xn, n, e->kx, GD, &e->ks, 1);
    moe__wt_matmul(&y->wv, 0, e->xn, n, e->vx, GD, &e->ks, 1);
    add_bias(e->q, y->bq, n, HD), add_bias(e->kx, y->bk, n, GD), add_bias(e->vx, y->bv, n, GD);
    if (y->q_norm) { /* olmoe: RMSNorm over the whole projection, before the heads split */
        moe__rmsnorm_forward(e->q, e->rstd, e->q, y->q_norm, n, HD, h->rms_eps, n > 1 ? e->threads : 1);
        moe__rmsnorm_forward(e->kx, e->rstd, e->kx, y->k_norm, n, GD, h->rms_eps, n > 1 ? e->threads : 1);
    }
    rope_apply(e, e->q, n, h->n_head);
    rope_apply(e, e->kx, n, h->n_head_kv);
    float *kc = e->kcache + ((size_t)l * e->p.n_ctx + pos0) * GD, *vc = e->vcache + ((size_t)l * e->p.n_ctx + pos0) * GD;
    memcpy(kc, e->kx, sizeof(float) * n * GD);
    memcpy(vc, e->vx, sizeof(float) * n * GD);
    attention(e, l, n, pos0);
    moe__wt_matmul(&y->wo, 0, e->att, n, e->tmp, C, &e->ks, 0);
    add_bias(e->tmp, y->bo, n, C);
    for (size_t i = 0; i < (size_t)n * C; i++) e->x[i] += e->tmp[i];
    moe__rmsnorm_forward(e->xn, e->rstd, e->x, y->ffn_norm, n, C, h->rms_eps, n > 1 ? e->threads : 1);
    moe__wt_matmul(&y->gate_inp, 0, e->xn, n, e->probs, E, &e->ks, 0);
    route(e, n);
    experts(e, y, n);
    if (y->gate_inp_sh) shared_expert(e, y, n);
    for (size_t i = 0; i < (size_t)n * C; i++) e->x[i] += e->tmp[i];
}

/* One batch of n <= n_batch tokens; logits [n][V] (all) or [V] (last). */
static void forward(moe_engine *e, const int32_t *tok, int n, float *logits, int all) {
    const moe__imodel *m = e->m;
    const int C = m->hp.n_embd, pos0 = e->n_past;
    for (int t = 0; t < n; t++) moe__wt_row(&m->tok_embd, 0, tok[t], e->x + (size_t)t * C);
    rope_table(e, n, pos0);
    for (int l = 0; l < m->hp.n_layer; l++) forward_layer(e, l, n, pos0);
    e->n_past += n;
    if (!logits) return;
    const int first = all ? 0 : n - 1, rows = n - first;
    const float *xs = e->x + (size_t)first * C;
    moe__rmsnorm_forward(e->xn, e->rstd, xs, m->output_norm, rows, C, m->hp.rms_eps, n > 1 ? e->threads : 1);
    moe__wt_matmul(&m->output, 0, e->xn, rows, logits, m->hp.n_vocab, &e->ks, 0);
}

int moe_engine_eval(moe_engine *e, const int32_t *tokens, int n, float *logits, int all_logits) {
    const int V = e->m->hp.n_vocab;
    if (n <= 0 || !tokens)
        return moe__set_err(e->errmsg, sizeof e->errmsg, MOE_EINVAL, "eval: %d tokens", n);
    if (n > e->p.n_ctx - e->n_past)
        return moe__set_err(e->errmsg, sizeof e->errmsg, MOE_ELIMIT,
                            "eval: %d tokens after %d cached positions exceed the context of %d", n, e->n_past,
                            e->p.n_ctx);
    for (int t = 0; t < n; t++)
        if (tokens[t] < 0 || tokens[t] >= V)
            return moe__set_err(e->errmsg, sizeof e->errmsg, MOE_EINVAL, "eval: token %d at %d is outside the vocabulary of %d",
                                tokens[t], t, V);
    for (int i = 0; i < n; i += e->p.n_batch) {
        const int b = n - i < e->p.n_batch ? n - i : e->p.n_batch, lastb = i + b == n;
        float *dst = all_logits ? (logits ? logits + (size_t)i * V : NULL) : (lastb ? logits : NULL);
        forward(e, tokens + i, b, dst, all_logits);
    }
    const int rc = e->ep_rc;
    e->ep_rc = 0;
    return rc;
}

void moe_engine_get_stats(const moe_engine *e, moe_engine_stats *out) { moe__imodel_stats(e->m, e->k, out); }
