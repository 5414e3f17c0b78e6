/* The forward pass of a GGUF MoE model with a KV cache (llama.cpp's graph for
 * llama/Mixtral, qwen2moe and olmoe; docs/inference.md). A batch of tokens
 * runs every matrix once over all of them; each expert runs once over the
 * tokens routed to it. */
#include "infer/infer.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

struct moe_engine {
    moe__imodel *m;
    moe_engine_params p;
    int threads, n_past, k; /* k: experts per token in use */
    int kcap;               /* slots per token that the expert buffers hold */
    void *kcache, *vcache;  /* [L][n_ctx][G*D] of float, or of fp16 (p.kv_f16_k, p.kv_f16_v) */
    /* work buffers for B = n_batch tokens, S = B * kcap (token, slot) rows */
    float *x, *xn, *q, *kx, *vx, *att, *tmp; /* [B][C] [B][C] [B][H*D] [B][G*D] [B][G*D] [B][H*D] [B][C] */
    float *rstd, *rope;                      /* [B], [B][n_rot] (cos, sin pairs) */
    float *probs, *wts;                      /* [B][E], [B][E] (first k used) */
    int *sel, *cnt, *off;                    /* [B][E], [E], [E + 1] (first row of each expert) */
    int *list, *pos;                         /* [S]: token * k + slot by expert; [S] its row in that order */
    float *xe, *ge, *ue, *outs;              /* by expert: [S][C], [S][F], [S][F], [S][C] */
    float *gs, *us, *shg, *sho;              /* shared expert [B][Fs], [B][Fs], gate [B], out [B][C] */
    float *scores;                           /* [threads][n_ctx] */
    uint8_t *wbuf;                           /* [threads][moe__wt_scratch_bytes(maxc)] */
    uint8_t *pk_arena;                       /* packed matrices (pack_setup); NULL: none */
    size_t pk_arena_bytes;
    uint8_t *pk_done;                        /* [packed tiles]: 1 once a 4-row tile is packed */
    uint8_t *qa, *qe;                        /* Q8_0 rows: [B][maxc], [S][maxc] (activations, experts) */
    size_t maxc;                             /* widest activation row */
    moe__engine_ep *ep;                      /* expert parallelism: NULL in one process (engine_ep.c) */
    int ep_rc;                               /* a failed exchange during the last eval */
    char errmsg[512];
};

moe_engine_params moe_engine_params_default(void) {
    moe_engine_params p = {.n_ctx = 0, .n_batch = 512, .n_threads = 0, .experts_used = 0, .use_mmap = 1,
                            .kv_f16_k = 1, .kv_f16_v = 1, .repack = 1};
    return p;
}

/* The buffers of S = n_batch * k rows (one per token and slot), replaced
 * when k grows past kcap; the old ones stay on failure. */
static int alloc_slots(moe_engine *e, int k) {
    const moe_engine_hparams *h = &e->m->hp;
    const size_t S = (size_t)e->p.n_batch * k, C = h->n_embd, F = h->n_ff_exp;
    float *xe = moe__aligned_alloc(S * C * sizeof(float)), *ge = moe__aligned_alloc(S * F * sizeof(float));
    float *ue = moe__aligned_alloc(S * F * sizeof(float)), *outs = moe__aligned_alloc(S * C * sizeof(float));
    int *list = moe__malloc(S * sizeof(int)), *pos = moe__malloc(S * sizeof(int));
    uint8_t *qe = moe__aligned_alloc(S * moe__qrow_bytes((int)((e->maxc + 31) / 32 * 32)) + 64);
    if (!xe || !ge || !ue || !outs || !list || !pos || !qe) {
        moe__afree(xe), moe__afree(ge), moe__afree(ue), moe__afree(outs), moe__afree(qe);
        moe__free(list), moe__free(pos);
        return MOE_ENOMEM;
    }
    moe__afree(e->xe), moe__afree(e->ge), moe__afree(e->ue), moe__afree(e->outs), moe__afree(e->qe);
    moe__free(e->list), moe__free(e->pos);
    e->xe = xe, e->ge = ge, e->ue = ue, e->outs = outs, e->qe = qe, e->list = list, e->pos = pos;
    e->kcap = k;
    return 0;
}

/* bytes of one cached K or V value */
static size_t kv_elem(int f16) { return f16 ? sizeof(uint16_t) : sizeof(float); }

static int alloc_all(moe_engine *e) {
    const moe_engine_hparams *h = &e->m->hp;
    const size_t B = (size_t)e->p.n_batch, C = h->n_embd, HD = (size_t)h->n_head * h->head_dim,
                 GD = (size_t)h->n_head_kv * h->head_dim, E = h->n_expert, F = h->n_ff_exp,
                 Fs = h->n_ff_shexp ? h->n_ff_shexp : 1, L = h->n_layer, T = (size_t)e->p.n_ctx;
    size_t maxc = C > HD ? C : HD;
    if (F > maxc) maxc = F;
    if (Fs > maxc) maxc = Fs;
    e->maxc = maxc;
    size_t kv;
    if (moe__mul_size(L * T, GD, &kv) || moe__mul_size(kv, sizeof(float), &(size_t){0}) ||
        moe__mul_size(B * E, maxc, &(size_t){0}))
        return MOE_ELIMIT;
    if (!(e->kcache = moe__aligned_alloc((kv ? kv : 1) * kv_elem(e->p.kv_f16_k))) ||
        !(e->vcache = moe__aligned_alloc((kv ? kv : 1) * kv_elem(e->p.kv_f16_v))))
        return MOE_ENOMEM;
    struct { float **p; size_t n; } f[] = {
        {&e->x, B * C}, {&e->xn, B * C}, {&e->q, B * HD},
        {&e->kx, B * GD}, {&e->vx, B * GD}, {&e->att, B * HD}, {&e->tmp, B * C}, {&e->rstd, B},
        {&e->rope, B * h->n_rot}, {&e->probs, B * E}, {&e->wts, B * E}, {&e->gs, B * Fs}, {&e->us, B * Fs},
        {&e->shg, B}, {&e->sho, B * C}, {&e->scores, (size_t)e->threads * T}};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (!(*f[i].p = moe__aligned_alloc((f[i].n ? f[i].n : 1) * sizeof(float)))) return MOE_ENOMEM;
    e->sel = moe__malloc(B * E * sizeof(int));
    e->cnt = moe__malloc(E * sizeof(int));
    e->off = moe__malloc((E + 1) * sizeof(int));
    e->qa = moe__aligned_alloc(B * moe__qrow_bytes((int)((maxc + 31) / 32 * 32)) + 64);
    e->wbuf = moe__aligned_alloc((size_t)e->threads * moe__wt_scratch_bytes((int)maxc));
    if (!e->sel || !e->cnt || !e->off || !e->qa || !e->wbuf) return MOE_ENOMEM;
    return alloc_slots(e, e->k);
}

void moe_engine_free(moe_engine *e) {
    if (!e) return;
    moe__afree(e->kcache), moe__afree(e->vcache);
    float *f[] = {e->x, e->xn, e->q, e->kx, e->vx, e->att, e->tmp, e->rstd, e->rope,
                  e->probs, e->wts, e->xe, e->ge, e->ue, e->outs, e->gs, e->us, e->shg, e->sho, e->scores};
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) moe__afree(f[i]);
    moe__afree(e->qa), moe__afree(e->qe), moe__afree(e->wbuf);
    moe__free(e->sel), moe__free(e->cnt), moe__free(e->off), moe__free(e->list), moe__free(e->pos);
    moe__engine_ep_free(e->ep);
#if defined(__linux__)
    if (e->pk_arena) munmap(e->pk_arena, e->pk_arena_bytes);
#endif
    moe__free(e->pk_done);
    moe__imodel_free(e->m);
    moe__free(e);
}

static int load_local(const char *path, const moe_engine_params *pp, moe_engine **out, char *err, size_t errsz);

/* The matrices the forward multiplies by (the embedding is only ever read
 * by rows), in an array the caller frees; NULL when out of memory. */
static moe__wt **matmul_weights(moe__imodel *m, int *n) {
    enum { PER_LAYER = 11 };
    moe__wt **out = moe__malloc(sizeof *out * ((size_t)m->hp.n_layer * PER_LAYER + 1));
    if (!out) return NULL;
    int k = 0;
    for (int l = 0; l < m->hp.n_layer; l++) {
        moe__ilayer *y = &m->layers[l];
        moe__wt *w[PER_LAYER] = {&y->wq,      &y->wk,        &y->wv,      &y->wo,    &y->gate_inp, &y->gate_exps,
                                 &y->up_exps, &y->down_exps, &y->gate_sh, &y->up_sh, &y->down_sh};
        for (int i = 0; i < PER_LAYER; i++) out[k++] = w[i];
    }
    out[k++] = &m->output;
    *n = k;
    return out;
}

/* Address space for a packed copy (moe__wt_pack_rows) of every matrix with
 * a packed kernel, and with repack 2 of the float ones of a mapped file.
 * Nothing is copied here: a thread packs the tiles it multiplies on their
 * first use (matmul), so memory grows with the experts actually routed to. Huge pages where the system gives them: the packed
 * stream then needs a TLB entry per 2 MiB instead of per 4 KiB, which under
 * nested paging cost a page walk every 4 KiB at decode. Without the
 * reservation (another OS, no address space) the file's layout serves. */
static void pack_setup(moe_engine *e) {
#if defined(__linux__)
    int nw;
    moe__wt **ws = matmul_weights(e->m, &nw);
    if (!ws) return;
    size_t bytes = 0, tiles = 0;
    for (int pass = 0; pass < 2; pass++) {
        bytes = 0, tiles = 0;
        for (int i = 0; i < nw; i++) {
            moe__wt *w = ws[i];
            /* a float copy (repack 2) only where the file's pages can be dropped (mapped GGUF) */
            const int use = (w->data || w->mats) && w->rows > 0 &&
                            (moe__wt_quant(w) || (e->p.repack == 2 && e->m->file_mapped && !w->converted));
            const size_t pb = use ? moe__wt_packed_bytes(w) : 0;
            if (!pb) continue;
            if (pass) w->pk = e->pk_arena + bytes, w->pk_bytes = pb, w->pk_id = (int)tiles;
            bytes += pb * (size_t)w->n_mat; /* pb is a multiple of 64 */
            tiles += ((size_t)w->rows + 3) / 4 * (size_t)w->n_mat;
        }
        if (pass || !bytes || tiles > INT32_MAX) break;
        void *a = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (a == MAP_FAILED) break;
        if (!(e->pk_done = moe__calloc(tiles, 1))) {
            munmap(a, bytes);
            break;
        }
#ifdef MADV_HUGEPAGE
        madvise(a, bytes, MADV_HUGEPAGE); /* a hint: 4 KiB pages work too */
#endif
        e->pk_arena = a, e->pk_arena_bytes = bytes;
    }
    moe__free(ws);
#endif
}

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
    int trc = moe__check_threads(p.n_threads, "engine", err, errsz);
    if (trc) return trc;
    if (p.n_ctx < 0 || p.n_batch < 0 || p.experts_used < 0 || p.n_batch > (1 << 16) || p.n_ctx > (1 << 24) ||
        (p.kv_f16_k & ~1) || (p.kv_f16_v & ~1) || p.repack < 0 || p.repack > 2)
        return moe__set_err(err, errsz, MOE_EINVAL,
                            "bad engine parameters (n_ctx %d, n_batch %d, experts_used %d, kv_f16_k %d, kv_f16_v %d, "
                            "repack %d)",
                            p.n_ctx, p.n_batch, p.experts_used, p.kv_f16_k, p.kv_f16_v, p.repack);
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
    if ((rc = alloc_all(e))) {
        moe_engine_free(e);
        return moe__set_err(err, errsz, rc, "%s: cannot allocate the KV cache and buffers (n_ctx %d, n_batch %d)",
                            path, p.n_ctx, p.n_batch);
    }
    if ((rc = moe__engine_ep_create(h->n_expert, h->n_embd, (size_t)p.n_batch * e->kcap, &e->ep, err, errsz))) {
        moe_engine_free(e);
        return rc;
    }
    if (p.repack) pack_setup(e);
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
    if (k > e->kcap && ((e->ep && moe__engine_ep_reserve(e->ep, (size_t)e->p.n_batch * k)) || alloc_slots(e, k)))
        /* more slots per token than the buffers were sized for */
        return moe__set_err(e->errmsg, sizeof e->errmsg, MOE_ENOMEM, "experts used %d: out of memory", k);
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

/* ---- the forward: one parallel region per batch ------------------------------
 *
 * forward() opens a single OpenMP region; every phase below runs on all of
 * its threads, each taking its own static share (moe__split) of tokens,
 * (token, head) pairs or output rows, and phases that read what another
 * thread wrote are separated by a barrier. A fork/join per matrix cost tens
 * of microseconds each on this workload (eleven per layer per token); a
 * barrier between spinning threads costs well under one. libgomp lets
 * waiting threads spin (GOMP_SPINCOUNT, 300,000 iterations by default when
 * OMP_WAIT_POLICY is unset and there are no more threads than CPUs) before
 * they sleep, which covers every gap inside a forward.
 *
 * Which thread computes an element never changes its value: each output is
 * one dot product (or one per-row loop) in a fixed order. */

typedef struct thr {
    int ith, nth;
} thr;

static void span(const thr *t, int n, int *lo, int *hi) { moe__split(n, 1, t->ith, t->nth, lo, hi); }

/* Packs the tiles of rows [lo, hi) of W[mat] not packed yet. Threads split
 * every matrix's rows in tiles of 4 (moe__split, align 4), so in one phase
 * no two threads touch a tile, and a packed tile is never written again:
 * the flags need no synchronization beyond the phases' barriers, whatever
 * the thread count of each call. Once packed, the rows' whole pages of the
 * read-only file mapping are dropped from the process (the page cache keeps
 * them; another reader refaults them): the packed copy replaces them. */
static void pack_tiles(moe_engine *e, const moe__wt *w, int mat, uint8_t *pk, int lo, int hi) {
    uint8_t *done = e->pk_done + w->pk_id + (size_t)mat * (((size_t)w->rows + 3) / 4);
    if (lo >= hi || !memchr(done + lo / 4, 0, (size_t)((hi + 3) / 4 - lo / 4))) return; /* every call after the first */
    for (int t = lo / 4, t1 = (hi + 3) / 4; t < t1;) {
        if (done[t]) {
            t++;
            continue;
        }
        int u = t;
        while (u < t1 && !done[u]) done[u++] = 1;
        const int r0 = 4 * t, r1 = 4 * u < w->rows ? 4 * u : w->rows;
        moe__wt_pack_rows(w, mat, pk, r0, r1);
#if defined(__linux__)
        if (e->m->file_mapped && !w->converted) { /* file pages refault; anonymous ones would read as 0 */
            const uintptr_t ps = (uintptr_t)sysconf(_SC_PAGESIZE), raw = (uintptr_t)moe__wt_mat(w, mat);
            const uintptr_t a = (raw + (size_t)r0 * w->row_bytes + ps - 1) / ps * ps;
            const uintptr_t b = (raw + (size_t)r1 * w->row_bytes) / ps * ps;
            if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
        }
#endif
        t = u;
    }
}

static void matmul(moe_engine *e, const thr *t, const moe__wt *w, int mat, const float *x, const uint8_t *xq,
                   int n, float *y, int ldy) {
    int lo, hi;
    moe__split(w->rows, 4, t->ith, t->nth, &lo, &hi);
    uint8_t *pk = w->pk ? w->pk + (size_t)mat * w->pk_bytes : NULL;
    if (pk) pack_tiles(e, w, mat, pk, lo, hi);
    moe__wt_matmul_rows(w, mat, x, xq, n, y, ldy, lo, hi, e->wbuf + (size_t)t->ith * moe__wt_scratch_bytes((int)e->maxc),
                        (int)e->maxc, pk);
}

/* The same per-row arithmetic as moe__rmsnorm_forward (model/ops.c). */
static void rmsnorm_row(float *y, const float *x, const float *g, int C, float eps) {
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int c = 0; c < C; c++) ss += (double)x[c] * x[c];
    const float r = (float)(1.0 / sqrt(ss / C + (double)eps));
#pragma omp simd
    for (int c = 0; c < C; c++) y[c] = x[c] * r * g[c];
}

static void add_bias(float *y, const float *b, int d) {
    if (b)
        for (int i = 0; i < d; i++) y[i] += b[i];
}

/* ggml's rope cache: theta starts at the position and is multiplied by
 * base^(-2/n_rot) in float for each pair, as llama.cpp computes it (so long
 * positions round the same way). Tokens [t0, t1). */
static void rope_table(moe_engine *e, int t0, int t1, int pos0) {
    const int nr = e->m->hp.n_rot;
    const float scale = powf(e->m->hp.rope_base, -2.0f / (float)nr);
    for (int t = t0; t < t1; t++) {
        float theta = (float)(pos0 + t);
        for (int i = 0; i < nr / 2; i++) {
            e->rope[(size_t)t * nr + 2 * i] = cosf(theta);
            e->rope[(size_t)t * nr + 2 * i + 1] = sinf(theta);
            theta *= scale;
        }
    }
}

/* One token's heads [heads][D]; pair i rotates (2i, 2i+1) or, half-split,
 * (i, i + n_rot/2). */
static void rope_apply(const moe_engine *e, float *x, int t, int heads) {
    const int D = e->m->hp.head_dim, nr = e->m->hp.n_rot, neox = e->m->rope_neox;
    const float *cs = e->rope + (size_t)t * nr;
    for (int hh = 0; hh < heads; hh++) {
        float *v = x + (size_t)hh * D;
        for (int i = 0; i < nr / 2; i++) {
            const int a = neox ? i : 2 * i, b = neox ? i + nr / 2 : 2 * i + 1;
            const float x0 = v[a], x1 = v[b], c = cs[2 * i], s = cs[2 * i + 1];
            v[a] = x0 * c - x1 * s;
            v[b] = x0 * s + x1 * c;
        }
    }
}

/* The thread's share of the n * H (query, head) pairs. */
static void attention(moe_engine *e, const thr *th, int layer, int n, int pos0) {
    const moe_engine_hparams *h = &e->m->hp;
    const int H = h->n_head, G = h->n_head_kv, D = h->head_dim, GD = G * D;
    const int fk = e->p.kv_f16_k, fv = e->p.kv_f16_v;
    const size_t l0 = (size_t)layer * e->p.n_ctx * GD; /* the layer's first cached value */
    const float scale = 1.0f / sqrtf((float)D);
    float *sc = e->scores + (size_t)th->ith * e->p.n_ctx; /* [n_ctx] */
    int lo, hi;
    span(th, n * H, &lo, &hi);
    for (int p = lo; p < hi; p++) {
        const int t = p / H, hh = p % H, g = hh / (H / G), last = pos0 + t;
        const float *qv = e->q + (size_t)t * H * D + (size_t)hh * D;
        float *o = e->att + (size_t)t * H * D + (size_t)hh * D;
        float mx = -INFINITY;
        int j = 0;
        for (; j + 4 <= last + 1; j += 4) {
            const size_t at = l0 + (size_t)j * GD + (size_t)g * D;
            if (fk) moe__dot4_f16((const uint16_t *)e->kcache + at, GD, qv, D, sc + j);
            else moe__dot4_f32((const float *)e->kcache + at, GD, qv, D, sc + j);
        }
        for (; j <= last; j++) {
            const size_t at = l0 + (size_t)j * GD + (size_t)g * D;
            sc[j] = fk ? moe__dot_f16((const uint16_t *)e->kcache + at, qv, D)
                       : moe__dot_f32((const float *)e->kcache + at, qv, D);
        }
        for (j = 0; j <= last; j++) {
            sc[j] *= scale;
            if (sc[j] > mx) mx = sc[j];
        }
        moe__exp_shift(sc, last + 1, mx);
        double sum = 0;
        for (j = 0; j <= last; j++) sum += sc[j];
        const float inv = (float)(1.0 / sum);
        for (j = 0; j <= last; j++) sc[j] *= inv;
        if (fv) moe__axpy_rows_f16(sc, (const uint16_t *)e->vcache + l0 + (size_t)g * D, (size_t)GD, last + 1, D, o);
        else moe__axpy_rows(sc, (const float *)e->vcache + l0 + (size_t)g * D, (size_t)GD, last + 1, D, o);
    }
}

/* Router of tokens [t0, t1): softmax over E, top-k in descending order (lower
 * id first on ties), weights optionally renormalised (llama.cpp clamps the
 * sum at the smallest normal fp16) and scaled. */
static void route(moe_engine *e, int t0, int t1) {
    const int E = e->m->hp.n_expert, K = e->k;
    for (int t = t0; t < t1; t++) {
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

/* Counting sort of the n * k (token, slot) pairs by expert, tokens in order
 * within each: rows off[x] .. off[x+1] of the expert buffers are expert x's. */
static void sort_slots(moe_engine *e, int n) {
    const int E = e->m->hp.n_expert, K = e->k;
    memset(e->cnt, 0, sizeof(int) * E);
    for (int i = 0; i < n * K; i++) e->cnt[e->sel[(size_t)(i / K) * E + i % K]]++;
    e->off[0] = 0;
    for (int x = 0; x < E; x++) e->off[x + 1] = e->off[x] + e->cnt[x], e->cnt[x] = 0;
    for (int i = 0; i < n * K; i++) {
        const int x = e->sel[(size_t)(i / K) * E + i % K], r = e->off[x] + e->cnt[x]++;
        e->list[r] = i, e->pos[i] = r;
    }
}

/* The feed-forward half after the router logits are in e->probs: routed
 * experts (and qwen2moe's shared one) over e->xn / e->qa, added to e->x.
 * Every expert that received tokens runs once over them; the others are
 * never read. All experts' row shares run between the same two barriers. */
static void ffn(moe_engine *e, const thr *th, const moe__ilayer *y, int n) {
    const moe_engine_hparams *h = &e->m->hp;
    const int E = h->n_expert, K = e->k, C = h->n_embd, F = h->n_ff_exp, Fs = h->n_ff_shexp, S = n * K;
    const int qx = moe__wt_quant(&y->gate_exps), qd = moe__wt_quant(&y->down_exps);
    const size_t qC = moe__qrow_bytes(C), qF = moe__qrow_bytes(F);
    const int sh = y->gate_inp_sh != NULL;
    int lo, hi;
#pragma omp single /* microseconds even for a full batch: not worth a barrier */
    {
        route(e, 0, n);
        sort_slots(e, n);
    }
    /* rows [r0, r1) belong to this rank's experts (all of them in one process) */
    int x0 = 0, x1 = E;
    if (e->ep) moe__engine_ep_range(e->ep, &x0, &x1);
    const int r0 = e->off[x0], r1 = e->off[x1];
    span(th, S, &lo, &hi); /* gather each slot's input row */
    for (int r = lo; r < hi; r++) {
        if (r < r0 || r >= r1) continue;
        const int t = e->list[r] / K;
        if (qx) memcpy(e->qe + r * qC, e->qa + t * qC, qC);
        else memcpy(e->xe + (size_t)r * C, e->xn + (size_t)t * C, sizeof(float) * C);
    }
#pragma omp barrier
    for (int x = x0; x < x1; x++) {
        const int o = e->off[x], m = e->off[x + 1] - o;
        if (!m) continue; /* never touched: its pages are never read */
        matmul(e, th, &y->gate_exps, x, e->xe + (size_t)o * C, e->qe + o * qC, m, e->ge + (size_t)o * F, F);
        matmul(e, th, &y->up_exps, x, e->xe + (size_t)o * C, e->qe + o * qC, m, e->ue + (size_t)o * F, F);
    }
    if (sh) {
        matmul(e, th, &y->gate_sh, 0, e->xn, e->qa, n, e->gs, Fs);
        matmul(e, th, &y->up_sh, 0, e->xn, e->qa, n, e->us, Fs);
    }
#pragma omp barrier
    span(th, S + (sh ? n : 0), &lo, &hi); /* slot rows, then the shared expert's token rows */
    for (int r = lo; r < hi; r++) {
        if (r < S) {
            if (r < r0 || r >= r1) continue; /* another rank's expert */
            moe__swiglu(e->ge + (size_t)r * F, e->ue + (size_t)r * F, (size_t)F);
            if (qd) moe__quantize_rows(e->ge, F, r, r + 1, e->qe); /* the gathered inputs are consumed */
        } else {
            const int t = r - S;
            moe__swiglu(e->gs + (size_t)t * Fs, e->us + (size_t)t * Fs, (size_t)Fs);
            if (moe__wt_quant(&y->down_sh)) moe__quantize_rows(e->gs, Fs, t, t + 1, e->qa); /* xn's are consumed */
        }
    }
#pragma omp barrier
    for (int x = x0; x < x1; x++) {
        const int o = e->off[x], m = e->off[x + 1] - o;
        if (m) matmul(e, th, &y->down_exps, x, e->ge + (size_t)o * F, e->qe + o * qF, m, e->outs + (size_t)o * C, C);
    }
    if (sh) matmul(e, th, &y->down_sh, 0, e->gs, e->qa, n, e->sho, C);
#pragma omp barrier
    if (e->ep) {
        /* a collective, so the main thread (MPI_THREAD_FUNNELED); every rank
         * exchanges, even after a failure, so none waits */
#pragma omp master
        {
            const int rc = moe__engine_ep_exchange(e->ep, e->sel, E, n, K, e->pos, e->outs, e->errmsg, sizeof e->errmsg);
            if (rc && !e->ep_rc) e->ep_rc = rc;
        }
#pragma omp barrier
    }
    span(th, n, &lo, &hi);
    for (int t = lo; t < hi; t++) { /* weighted sum in top-k order, as llama.cpp adds the slots */
        float *o = e->tmp + (size_t)t * C;
        for (int s = 0; s < K; s++) {
            const float w = e->wts[(size_t)t * E + s], *d = e->outs + (size_t)e->pos[t * K + s] * C;
            for (int c = 0; c < C; c++) o[c] = s ? o[c] + d[c] * w : d[c] * w;
        }
        if (sh) { /* qwen2moe: + sigmoid(x . g) * shared_ffn(x) */
            const float g = moe__dot_f32(e->xn + (size_t)t * C, y->gate_inp_sh, C), sg = 1.0f / (1.0f + expf(-g));
            const float *d = e->sho + (size_t)t * C;
            for (int c = 0; c < C; c++) o[c] += d[c] * sg;
        }
        float *xr = e->x + (size_t)t * C;
        for (int c = 0; c < C; c++) xr[c] += o[c];
    }
}

/* n values at element at of a cache: fp16 rounds to nearest even, as
 * ggml's F32 -> F16 copy into llama.cpp's cache does */
static void kv_store(void *cache, int f16, size_t at, const float *x, int n) {
    if (f16) moe__f32_to_f16_row(x, (uint16_t *)cache + at, n);
    else memcpy((float *)cache + at, x, sizeof(float) * n);
}

static void forward_layer(moe_engine *e, const thr *th, int l, int n, int pos0) {
    const moe__imodel *m = e->m;
    const moe_engine_hparams *h = &m->hp;
    const moe__ilayer *y = &m->layers[l];
    const int C = h->n_embd, HD = h->n_head * h->head_dim, GD = h->n_head_kv * h->head_dim, E = h->n_expert;
    const int qffn = moe__wt_quant(&y->gate_inp) || moe__wt_quant(&y->gate_exps) || moe__wt_quant(&y->gate_sh);
    int lo, hi;
    span(th, n, &lo, &hi);
    for (int t = lo; t < hi; t++) {
        rmsnorm_row(e->xn + (size_t)t * C, e->x + (size_t)t * C, y->attn_norm, C, h->rms_eps);
        if (moe__wt_quant(&y->wq) || moe__wt_quant(&y->wk) || moe__wt_quant(&y->wv))
            moe__quantize_rows(e->xn, C, t, t + 1, e->qa);
    }
#pragma omp barrier
    matmul(e, th, &y->wq, 0, e->xn, e->qa, n, e->q, HD);
    matmul(e, th, &y->wk, 0, e->xn, e->qa, n, e->kx, GD);
    matmul(e, th, &y->wv, 0, e->xn, e->qa, n, e->vx, GD);
#pragma omp barrier
    for (int t = lo; t < hi; t++) {
        float *q = e->q + (size_t)t * HD, *k = e->kx + (size_t)t * GD, *v = e->vx + (size_t)t * GD;
        add_bias(q, y->bq, HD), add_bias(k, y->bk, GD), add_bias(v, y->bv, GD);
        if (y->q_norm) { /* olmoe: RMSNorm over the whole projection, before the heads split */
            rmsnorm_row(q, q, y->q_norm, HD, h->rms_eps);
            rmsnorm_row(k, k, y->k_norm, GD, h->rms_eps);
        }
        rope_apply(e, q, t, h->n_head);
        rope_apply(e, k, t, h->n_head_kv);
        const size_t at = ((size_t)l * e->p.n_ctx + pos0 + t) * GD;
        kv_store(e->kcache, e->p.kv_f16_k, at, k, GD);
        kv_store(e->vcache, e->p.kv_f16_v, at, v, GD);
    }
#pragma omp barrier
    attention(e, th, l, n, pos0);
#pragma omp barrier
    if (moe__wt_quant(&y->wo)) {
        moe__quantize_rows(e->att, HD, lo, hi, e->qa);
#pragma omp barrier
    }
    matmul(e, th, &y->wo, 0, e->att, e->qa, n, e->tmp, C);
#pragma omp barrier
    for (int t = lo; t < hi; t++) {
        float *o = e->tmp + (size_t)t * C, *xr = e->x + (size_t)t * C;
        add_bias(o, y->bo, C);
        for (int c = 0; c < C; c++) xr[c] += o[c];
        rmsnorm_row(e->xn + (size_t)t * C, xr, y->ffn_norm, C, h->rms_eps);
        if (qffn) /* one quantization serves the router, the experts and the shared expert */
            moe__quantize_rows(e->xn, C, t, t + 1, e->qa);
    }
#pragma omp barrier
    matmul(e, th, &y->gate_inp, 0, e->xn, e->qa, n, e->probs, E);
#pragma omp barrier
    ffn(e, th, y, n); /* ends with each thread on its own tokens, as the next layer starts: no barrier */
}

/* One batch of n <= n_batch tokens; logits [n][V] (all) or [V] (last). */
static void forward(moe_engine *e, const int32_t *tok, int n, float *logits, int all) {
    const moe__imodel *m = e->m;
    const int C = m->hp.n_embd, pos0 = e->n_past;
    const int first = all ? 0 : n - 1, rows = n - first;
#pragma omp parallel num_threads(e->threads)
    {
        const thr th = {omp_get_thread_num(), omp_get_num_threads()};
        int lo, hi;
        span(&th, n, &lo, &hi);
        for (int t = lo; t < hi; t++) moe__wt_row(&m->tok_embd, 0, tok[t], e->x + (size_t)t * C);
        rope_table(e, lo, hi, pos0);
#pragma omp barrier
        for (int l = 0; l < m->hp.n_layer; l++) forward_layer(e, &th, l, n, pos0);
#pragma omp barrier
        if (logits) {
            span(&th, rows, &lo, &hi);
            for (int t = lo; t < hi; t++) {
                rmsnorm_row(e->xn + (size_t)t * C, e->x + (size_t)(first + t) * C, m->output_norm, C, m->hp.rms_eps);
                if (moe__wt_quant(&m->output)) moe__quantize_rows(e->xn, C, t, t + 1, e->qa);
            }
#pragma omp barrier
            matmul(e, &th, &m->output, 0, e->xn, e->qa, rows, logits, m->hp.n_vocab);
        }
    }
    e->n_past += n;
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

void moe_engine_get_stats(const moe_engine *e, moe_engine_stats *out) {
    moe__imodel_stats(e->m, e->k, (int)(kv_elem(e->p.kv_f16_k) + kv_elem(e->p.kv_f16_v)), out);
    int nw;
    moe__wt **ws = e->pk_arena ? matmul_weights(e->m, &nw) : NULL;
    if (!ws) return;
    for (int i = 0; i < nw; i++) {
        if (!ws[i]->pk) continue;
        const size_t tiles = ((size_t)ws[i]->rows + 3) / 4, tb = ws[i]->pk_bytes / tiles;
        for (size_t j = 0; j < tiles * (size_t)ws[i]->n_mat; j++) out->n_bytes_packed += e->pk_done[ws[i]->pk_id + j] * tb;
    }
    moe__free(ws);
}
