/* The decoder-only MoE transformer of docs/model.md: parameter table (named
 * views into one arena), forward, exact backward, and KV-cache decoding.
 *
 * Activations are kept per layer for backward (llm.c style). MoE feed-forward
 * layers are moe_layer objects bound to slices of the arena; dense SwiGLU
 * layers (and shared experts) are plain GEMMs here. All parallel work goes
 * through deterministic kernels, so a training step gives the same bits for
 * any thread count.
 */
#include "model/model_impl.h"
#include "dist/dist.h"

#include "core/gemm.h"
#include "model/ops.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- parameter table ----------------------------------------------------------- */

static int add_tensor(moe_model *m, const char *name, int ndim, int64_t d0, int64_t d1, int64_t d2) {
    if (m->n_tensors == m->cap_tensors) {
        int cap = m->cap_tensors ? 2 * m->cap_tensors : 64;
        moe_param_info *t = moe__calloc((size_t)cap, sizeof *t);
        if (!t) return MOE_ENOMEM;
        if (m->tensors) memcpy(t, m->tensors, sizeof *t * (size_t)m->n_tensors);
        moe__free(m->tensors);
        m->tensors = t;
        m->cap_tensors = cap;
    }
    moe_param_info *t = &m->tensors[m->n_tensors++];
    snprintf(t->name, sizeof t->name, "%s", name);
    t->ndim = ndim;
    t->shape[0] = d0, t->shape[1] = d1, t->shape[2] = d2;
    t->numel = (size_t)d0 * (size_t)(ndim > 1 ? d1 : 1) * (size_t)(ndim > 2 ? d2 : 1);
    t->offset = m->n_params;
    t->decay = ndim >= 2;
    m->n_params += t->numel;
    return MOE_OK;
}

/* dense SwiGLU weights (gate, up, down) under prefix */
static int add_dense(moe_model *m, moe__ffn *f, const char *prefix, int C, int F) {
    char name[96];
    int rc = 0;
    f->F = F;
    snprintf(name, sizeof name, "%s.gate_proj.weight", prefix);
    f->gate = m->n_params;
    rc |= add_tensor(m, name, 2, F, C, 0);
    snprintf(name, sizeof name, "%s.up_proj.weight", prefix);
    f->up = m->n_params;
    rc |= add_tensor(m, name, 2, F, C, 0);
    snprintf(name, sizeof name, "%s.down_proj.weight", prefix);
    f->down = m->n_params;
    rc |= add_tensor(m, name, 2, C, F, 0);
    return rc;
}

static int build_table(moe_model *m) {
    const moe_model_config *c = &m->cfg;
    const int C = c->hidden_size, V = c->vocab_size, D = c->head_dim, H = c->num_attention_heads,
              G = c->num_key_value_heads, E = c->num_local_experts, F = c->intermediate_size;
    char name[96];
    int rc = 0;
    m->embed = m->n_params;
    rc |= add_tensor(m, "model.embed_tokens.weight", 2, V, C, 0);
    for (int i = 0; i < c->num_hidden_layers && !rc; i++) {
        moe__mlayer *L = &m->layers[i];
#define T2(field, suffix, d0, d1)                                                                    \
    snprintf(name, sizeof name, "model.layers.%d.%s", i, suffix);                                  \
    L->field = m->n_params;                                                                        \
    rc |= add_tensor(m, name, 2, d0, d1, 0);
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", i);
        L->ln1 = m->n_params;
        rc |= add_tensor(m, name, 1, C, 0, 0);
        T2(wq, "self_attn.q_proj.weight", H * D, C)
        T2(wk, "self_attn.k_proj.weight", G * D, C)
        T2(wv, "self_attn.v_proj.weight", G * D, C)
        T2(wo, "self_attn.o_proj.weight", C, H * D)
#undef T2
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", i);
        L->ln2 = m->n_params;
        rc |= add_tensor(m, name, 1, C, 0, 0);
        L->is_moe = E > 0 && c->is_moe_layer[i];
        if (L->is_moe) {
            /* the moe_layer layout: wg [E][C], w1 [E][F][C], w2 [E][C][F], w3 [E][F][C] */
            L->moe_off = m->n_params;
            snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.gate.weight", i);
            rc |= add_tensor(m, name, 2, E, C, 0);
            const char *w[3] = {"w1", "w2", "w3"};
            /* the experts held here, named by global id (all E in one process) */
            for (int k = 0; k < 3; k++)
                for (int e = m->e_first; e < m->e_first + m->e_local; e++) {
                    snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%d.%s.weight", i, e, w[k]);
                    rc |= add_tensor(m, name, 2, k == 1 ? C : F, k == 1 ? F : C, 0);
                }
            /* the routing schemes' blocks, in the layer's order (moe.h) */
            const int Gg = c->n_group > 0 ? c->n_group : 1;
            if (c->router_type == MOE_ROUTER_NOISY_TOPK || c->router_type == MOE_ROUTER_HIERARCHICAL) {
                snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.gate.noise.weight", i);
                rc |= add_tensor(m, name, 2, E, C, 0);
            }
            if (c->router_type == MOE_ROUTER_HIERARCHICAL) {
                snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.gate.group.weight", i);
                rc |= add_tensor(m, name, 2, Gg, C, 0);
                snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.gate.group_noise.weight", i);
                rc |= add_tensor(m, name, 2, Gg, C, 0);
            }
            if (c->router_bias_update_rate > 0) { /* DeepSeek-V3's name; moved by the balancer, not by AdamW */
                snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.gate.e_score_correction_bias", i);
                rc |= add_tensor(m, name, 1, E, 0, 0);
            }
            if (c->n_shared_experts > 0) {
                snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.shared_expert", i);
                rc |= add_dense(m, &L->shared, name, C, c->n_shared_experts * c->shared_expert_intermediate_size);
                L->has_shared = 1;
                if (c->shared_expert_gate) {
                    snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.shared_expert_gate.weight", i);
                    L->shared_gate = m->n_params;
                    rc |= add_tensor(m, name, 2, 1, C, 0);
                }
            }
        } else {
            snprintf(name, sizeof name, "model.layers.%d.mlp", i);
            rc |= add_dense(m, &L->dense, name, C, c->dense_intermediate_size);
        }
    }
    m->norm = m->n_params;
    rc |= add_tensor(m, "model.norm.weight", 1, C, 0, 0);
    if (c->tie_word_embeddings) {
        m->lm_head = m->embed;
    } else {
        m->lm_head = m->n_params;
        rc |= add_tensor(m, "lm_head.weight", 2, V, C, 0);
    }
    return rc;
}

/* ---- creation ------------------------------------------------------------------ */

void moe_model_free(moe_model *m) {
    if (!m) return;
    for (int i = 0; i < m->cfg.num_hidden_layers && m->layers; i++) moe_layer_free(m->layers[i].moe);
    moe__free(m->layers);
    moe__free(m->tensors);
    moe__afree(m->arena);
    moe__free(m->tok);
    moe__free(m->tgt);
    moe__free(m->ce_tok);
    moe__free(m);
}

#define ALLOC_F(ptr, count)                                                                         \
    do {                                                                                            \
        size_t b_;                                                                                  \
        if (moe__mul_size((count), sizeof(float), &b_) || moe__add_size(total, (b_ + 63) & ~(size_t)63, &total)) \
            goto too_big;                                                                           \
        offs[nbuf] = total - ((b_ + 63) & ~(size_t)63);                                             \
        ptrs[nbuf++] = (float **)&(ptr);                                                            \
    } while (0)

moe_model *moe_model_create(const moe_model_config *cfg, int max_batch, int max_seq, int want_grads,
                            int n_threads, int *err, char *errbuf, size_t errsz) {
    int rc = cfg ? moe_model_config_check(cfg, errbuf, errsz) : moe__set_err(errbuf, errsz, MOE_EINVAL, "config is NULL");
    if (!rc) rc = moe__check_threads(n_threads, "model", errbuf, errsz);
    if (!rc && (max_batch < 1 || max_seq < 1 || max_seq > cfg->max_position_embeddings ||
                (long long)max_batch * max_seq > (1LL << 24)))
        rc = moe__set_err(errbuf, errsz, MOE_EINVAL,
                          "model: batch %d x %d tokens: need batch >= 1 and 1 <= seq <= max_position_embeddings (%d)",
                          max_batch, max_seq, cfg->max_position_embeddings);
    if (rc) {
        if (err) *err = rc;
        return NULL;
    }
    moe_model *m = moe__calloc(1, sizeof *m);
    if (!m) goto nomem;
    m->cfg = *cfg;
    m->max_B = max_batch;
    m->max_T = max_seq;
    m->threads = moe__threads(n_threads);
    m->has_grads = want_grads != 0;
    const moe_model_config *c = &m->cfg;
    m->dist = moe__dist_default();
    const int P = m->dist ? moe_dist_size(m->dist) : 1;
    if (c->num_local_experts % P) {
        rc = moe__set_err(errbuf, errsz, MOE_EINVAL, "model: %d experts do not split over %d ranks",
                          c->num_local_experts, P);
        moe_model_free(m);
        if (err) *err = rc;
        return NULL;
    }
    m->e_local = c->num_local_experts / P;
    m->e_first = (m->dist ? moe_dist_rank(m->dist) : 0) * m->e_local;
    const int Lc = c->num_hidden_layers;
    m->layers = moe__calloc((size_t)Lc, sizeof *m->layers);
    if (!m->layers || build_table(m)) goto nomem;
    m->n_moe = moe_model_n_moe_layers(c);

    const size_t N = (size_t)max_batch * max_seq, C = (size_t)c->hidden_size, V = (size_t)c->vocab_size;
    const size_t HD = (size_t)c->num_attention_heads * c->head_dim, GD = (size_t)c->num_key_value_heads * c->head_dim;
    const size_t T = (size_t)max_seq, BH = (size_t)max_batch * c->num_attention_heads;
    /* One arena: params, grads, then activations; offsets first, pointers after. */
    size_t total = 0, offs[64 + 16 * MOE_MAX_LAYERS];
    float **ptrs[64 + 16 * MOE_MAX_LAYERS];
    int nbuf = 0;
    ALLOC_F(m->params, m->n_params);
    if (m->has_grads) ALLOC_F(m->grads, m->n_params);
    ALLOC_F(m->act.res_final, N * C);
    ALLOC_F(m->act.lnf, N * C);
    ALLOC_F(m->act.rstdf, N);
    ALLOC_F(m->act.logits, N * V);
    ALLOC_F(m->act.rope, T * (size_t)c->head_dim);
    ALLOC_F(m->act.ffo, N * C);
    ALLOC_F(m->kcache, (size_t)Lc * T * GD);
    ALLOC_F(m->vcache, (size_t)Lc * T * GD);
    ALLOC_F(m->dec.x, C);
    ALLOC_F(m->dec.a, C);
    ALLOC_F(m->dec.q, HD);
    ALLOC_F(m->dec.o, HD);
    ALLOC_F(m->dec.y, C);
    ALLOC_F(m->dec.scratch, T * (size_t)c->num_attention_heads + 64);
    size_t fmax = 0; /* widest dense FFN */
    for (int i = 0; i < Lc; i++) {
        moe__mlayer *L = &m->layers[i];
        ALLOC_F(L->res, N * C);
        ALLOC_F(L->a1, N * C);
        ALLOC_F(L->rstd1, N);
        ALLOC_F(L->q, N * HD);
        ALLOC_F(L->k, N * GD);
        ALLOC_F(L->v, N * GD);
        ALLOC_F(L->att, BH * T * T);
        ALLOC_F(L->ao, N * HD);
        ALLOC_F(L->res2, N * C);
        ALLOC_F(L->a2, N * C);
        ALLOC_F(L->rstd2, N);
        moe__ffn *f = L->is_moe ? (L->has_shared ? &L->shared : NULL) : &L->dense;
        if (L->shared_gate) {
            ALLOC_F(L->sg, 2 * N); /* gate values, then their gradient */
            ALLOC_F(L->sh_out, N * C);
        }
        if (f) {
            ALLOC_F(f->h1, N * (size_t)f->F);
            ALLOC_F(f->h3, N * (size_t)f->F);
            ALLOC_F(f->act, N * (size_t)f->F);
            if ((size_t)f->F > fmax) fmax = (size_t)f->F;
        }
    }
    if (m->has_grads) {
        ALLOC_F(m->bw.dres, N * C);
        ALLOC_F(m->bw.dtmp, N * C);
        ALLOC_F(m->bw.dq, N * HD);
        ALLOC_F(m->bw.dk, N * GD);
        ALLOC_F(m->bw.dv, N * GD);
        ALLOC_F(m->bw.dao, N * HD);
        ALLOC_F(m->bw.dlogits, N * V);
        ALLOC_F(m->bw.att_scratch, moe__attention_scratch_size(max_seq, m->threads));
        if (c->shared_expert_gate) ALLOC_F(m->bw.dsh, N * C);
        if (fmax) {
            ALLOC_F(m->bw.dh1, N * fmax);
            ALLOC_F(m->bw.dh3, N * fmax);
            ALLOC_F(m->bw.dact, N * fmax);
        }
    }
    m->arena = moe__aligned_alloc(total);
    if (!m->arena) goto nomem;
    memset(m->arena, 0, total);
    for (int i = 0; i < nbuf; i++) *ptrs[i] = (float *)((char *)m->arena + offs[i]);
    m->tok = moe__calloc(N, sizeof(int32_t));
    m->tgt = moe__calloc(N, sizeof(int32_t));
    m->ce_tok = moe__calloc(N, sizeof(float));
    if (!m->tok || !m->tgt || !m->ce_tok) goto nomem;
    moe__rope_table(m->act.rope, max_seq, c->head_dim, c->rope_theta);

    for (int i = 0; i < Lc; i++) {
        moe__mlayer *L = &m->layers[i];
        if (!L->is_moe) continue;
        moe_layer_config lc = moe__model_layer_config(c, i, (int)N, m->has_grads);
        lc.n_threads = m->threads;
        L->moe = moe_layer_create_ep(&lc, m->dist, &rc, errbuf, errsz);
        if (!L->moe) {
            moe_model_free(m);
            if (err) *err = rc;
            return NULL;
        }
        if (L->moe_off + moe_layer_param_offsets(L->moe).total > m->n_params) { /* table and layer disagree */
            moe_model_free(m);
            if (err) *err = MOE_EINVAL;
            moe__set_err(errbuf, errsz, MOE_EINVAL, "layer %d: parameter layout mismatch", i);
            return NULL;
        }
        moe_layer_bind(L->moe, m->params + L->moe_off, m->has_grads ? m->grads + L->moe_off : NULL);
        if (!m->has_grads) moe_layer_set_training(L->moe, 0); /* inference never drops */
    }
    if (err) *err = MOE_OK;
    return m;

too_big:
    moe_model_free(m);
    if (err) *err = MOE_EINVAL;
    moe__set_err(errbuf, errsz, MOE_EINVAL, "model: sizes overflow");
    return NULL;
nomem:
    moe_model_free(m);
    if (err) *err = MOE_ENOMEM;
    moe__set_err(errbuf, errsz, MOE_ENOMEM, "model: out of memory (batch %d x %d)", max_batch, max_seq);
    return NULL;
}
#undef ALLOC_F

/* ---- accessors ------------------------------------------------------------------ */

const moe_model_config *moe_model_get_config(const moe_model *m) { return &m->cfg; }
const char *moe_model_errmsg(const moe_model *m) { return m ? m->err : "model is NULL"; }
size_t moe_model_n_params(const moe_model *m) { return m->n_params; }
float *moe_model_params(moe_model *m) { return m->params; }
float *moe_model_grads(moe_model *m) { return m->grads; }
int moe_model_n_tensors(const moe_model *m) { return m->n_tensors; }
const moe_param_info *moe_model_tensor(const moe_model *m, int i) {
    return i >= 0 && i < m->n_tensors ? &m->tensors[i] : NULL;
}
const moe_param_info *moe_model_find_tensor(const moe_model *m, const char *name) {
    for (int i = 0; i < m->n_tensors; i++)
        if (!strcmp(m->tensors[i].name, name)) return &m->tensors[i];
    return NULL;
}
const float *moe_model_logits(const moe_model *m) { return m->act.logits; }
void moe_model_last_losses(const moe_model *m, float *ce, float *aux) {
    if (ce) *ce = m->last_ce;
    if (aux) *aux = m->last_aux;
}
const moe_layer_stats *moe_model_layer_stats(const moe_model *m, int layer) {
    if (layer < 0 || layer >= m->cfg.num_hidden_layers || !m->layers[layer].moe) return NULL;
    return moe_layer_get_stats(m->layers[layer].moe);
}
int moe_model_layer_routing(const moe_model *m, int layer, const int **tok_off, const int **ids, const float **weights,
                            const unsigned char **kept) {
    if (!m || layer < 0 || layer >= m->cfg.num_hidden_layers || !m->layers[layer].moe) return MOE_EINVAL;
    return moe_layer_routing(m->layers[layer].moe, tok_off, ids, weights, kept);
}
const float *moe_model_token_losses(const moe_model *m) {
    return m && m->have_fwd && m->have_targets ? m->ce_tok : NULL;
}

int moe_model_set_experts_used(moe_model *m, int k) {
    if (!m) return MOE_EINVAL;
    if (k == 0) k = m->cfg.num_experts_per_tok;
    for (int i = 0; i < m->cfg.num_hidden_layers; i++) {
        if (!m->layers[i].moe) continue;
        int rc = moe_layer_set_top_k(m->layers[i].moe, k);
        if (rc) return moe__set_err(m->err, sizeof m->err, rc, "experts used: %s", moe_layer_errmsg(m->layers[i].moe));
    }
    m->have_fwd = 0;
    return MOE_OK;
}

int moe_model_update_bias(moe_model *m) {
    if (!m) return MOE_EINVAL;
    for (int i = 0; i < m->cfg.num_hidden_layers; i++)
        if (m->layers[i].moe) {
            int rc = moe_layer_update_bias(m->layers[i].moe);
            if (rc) return moe__set_err(m->err, sizeof m->err, rc, "layer %d: %s", i, moe_layer_errmsg(m->layers[i].moe));
        }
    return MOE_OK;
}

void moe_model_set_rng_counter(moe_model *m, uint64_t counter) {
    for (int i = 0; m && i < m->cfg.num_hidden_layers; i++)
        if (m->layers[i].moe) moe_layer_set_rng_counter(m->layers[i].moe, counter);
}

void moe_model_set_training(moe_model *m, int training) {
    for (int i = 0; m && i < m->cfg.num_hidden_layers; i++)
        if (m->layers[i].moe) moe_layer_set_training(m->layers[i].moe, training);
}

void moe_model_zero_grad(moe_model *m) {
    if (m && m->grads) memset(m->grads, 0, sizeof(float) * m->n_params);
}

/* Global expert id of an expert tensor's name, or -1. */
static int expert_of(const char *name) {
    const char *s = strstr(name, ".experts.");
    return s ? atoi(s + 9) : -1;
}

static void skip_normals(moe__rng *rng, size_t n) {
    for (size_t j = 0; j < n; j++) (void)moe__rng_normal(rng);
}

int moe_model_init(moe_model *m, uint64_t seed) {
    const moe_model_config *c = &m->cfg;
    const double sd = c->initializer_range, sd_out = sd / sqrt(2.0 * c->num_hidden_layers);
    const int E = c->num_local_experts;
    moe__rng rng;
    moe__rng_seed(&rng, seed);
    for (int i = 0; i < m->n_tensors; i++) {
        const moe_param_info *t = &m->tensors[i];
        float *p = m->params + t->offset;
        /* one stream over the single-process tensor list: a rank skips the
         * draws of the experts it does not hold, so any P starts alike */
        const int ex = expert_of(t->name);
        if (ex >= 0 && ex == m->e_first) skip_normals(&rng, (size_t)m->e_first * t->numel);
        if (t->ndim == 1) { /* norm gains 1; the balancer's selection bias 0 */
            const float v = strstr(t->name, "e_score_correction_bias") ? 0.0f : 1.0f;
            for (size_t j = 0; j < t->numel; j++) p[j] = v;
            continue;
        }
        /* residual-branch outputs get GPT-2's 1/sqrt(2L) */
        const int out = strstr(t->name, "o_proj") || strstr(t->name, ".w2.") || strstr(t->name, "down_proj");
        const double s = out ? sd_out : sd;
        for (size_t j = 0; j < t->numel; j++) p[j] = (float)(moe__rng_normal(&rng) * s);
        if (ex >= 0 && ex == m->e_first + m->e_local - 1)
            skip_normals(&rng, (size_t)(E - m->e_first - m->e_local) * t->numel);
        /* noisy gates start at zero (Shazeer et al.: no signal, some noise); the
         * draws above are still made so every other tensor starts the same */
        if ((c->router_type == MOE_ROUTER_NOISY_TOPK || c->router_type == MOE_ROUTER_HIERARCHICAL) &&
            strstr(t->name, "block_sparse_moe.gate."))
            memset(p, 0, sizeof(float) * t->numel);
    }
    m->have_fwd = 0;
    return MOE_OK;
}

/* ---- dense SwiGLU FFN --------------------------------------------------------- */

/* out [N][C] (=, or += when accumulate) down(silu(gate x) * up x) */
static void ffn_forward(moe_model *m, moe__ffn *f, const float *x, int N, float *out, int accumulate) {
    const int C = m->cfg.hidden_size, F = f->F, th = m->threads;
    const float *P = m->params;
    moe__gemm(0, 1, N, F, C, 1.0f, x, C, P + f->gate, C, 0.0f, f->h1, F, th);
    moe__gemm(0, 1, N, F, C, 1.0f, x, C, P + f->up, C, 0.0f, f->h3, F, th);
    moe__swiglu_forward(f->act, f->h1, f->h3, (size_t)N * F, th);
    moe__gemm(0, 1, N, C, F, 1.0f, f->act, F, P + f->down, F, accumulate ? 1.0f : 0.0f, out, C, th);
}

/* dx [N][C] += d/dx of the FFN given dy; weight grads accumulate */
static void ffn_backward(moe_model *m, moe__ffn *f, const float *x, const float *dy, int N, float *dx) {
    const int C = m->cfg.hidden_size, F = f->F, th = m->threads;
    const float *P = m->params;
    float *Gr = m->grads;
    float *dact = m->bw.dact, *dh1 = m->bw.dh1, *dh3 = m->bw.dh3;
    moe__gemm(0, 0, N, F, C, 1.0f, dy, C, P + f->down, F, 0.0f, dact, F, th);       /* dact = dy down */
    moe__gemm(1, 0, C, F, N, 1.0f, dy, C, f->act, F, 1.0f, Gr + f->down, F, th);    /* ddown += dy^T act */
    moe__swiglu_backward(dh1, dh3, dact, f->h1, f->h3, (size_t)N * F, th);
    moe__gemm(1, 0, F, C, N, 1.0f, dh1, F, x, C, 1.0f, Gr + f->gate, C, th);
    moe__gemm(1, 0, F, C, N, 1.0f, dh3, F, x, C, 1.0f, Gr + f->up, C, th);
    moe__gemm(0, 0, N, C, F, 1.0f, dh1, F, P + f->gate, C, 1.0f, dx, C, th);
    moe__gemm(0, 0, N, C, F, 1.0f, dh3, F, P + f->up, C, 1.0f, dx, C, th);
}

/* The shared experts of a MoE layer: out += g * shared(x), g = sigmoid(x w)
 * per token with a Qwen2-MoE gate, else g = 1. */
static void shared_forward(moe_model *m, moe__mlayer *L, const float *x, int N, float *out, float *sh, float *g) {
    if (!L->shared_gate) {
        ffn_forward(m, &L->shared, x, N, out, 1);
        return;
    }
    const int C = m->cfg.hidden_size;
    const float *w = m->params + L->shared_gate;
    ffn_forward(m, &L->shared, x, N, sh, 0);
#pragma omp parallel for schedule(static) num_threads(m->threads) if (N > 64)
    for (int t = 0; t < N; t++) {
        const float *xt = x + (size_t)t * C;
        float z = 0.0f;
        for (int c = 0; c < C; c++) z += xt[c] * w[c];
        g[t] = 1.0f / (1.0f + expf(-z));
        for (int c = 0; c < C; c++) out[(size_t)t * C + c] += g[t] * sh[(size_t)t * C + c];
    }
}

/* dx += d/dx of shared_forward given dy; weight grads accumulate. */
static void shared_backward(moe_model *m, moe__mlayer *L, const float *x, const float *dy, int N, float *dx) {
    if (!L->shared_gate) {
        ffn_backward(m, &L->shared, x, dy, N, dx);
        return;
    }
    const int C = m->cfg.hidden_size;
    const float *w = m->params + L->shared_gate;
    float *dw = m->grads + L->shared_gate, *dsh = m->bw.dsh;
    float *dzt = L->sg + N; /* [N] after the gate values [N] */
    /* per token: dg = <dy, sh>, dz = dg g (1 - g); the shared FFN sees g dy */
#pragma omp parallel for schedule(static) num_threads(m->threads) if (N > 64)
    for (int t = 0; t < N; t++) {
        const float *dyt = dy + (size_t)t * C, *st = L->sh_out + (size_t)t * C;
        const float g = L->sg[t];
        float dg = 0.0f;
        for (int c = 0; c < C; c++) {
            dg += dyt[c] * st[c];
            dsh[(size_t)t * C + c] = g * dyt[c];
        }
        dzt[t] = dg * g * (1.0f - g);
    }
    /* dw += sum_t dz_t x_t in token order (fixed for any thread count); dx += dz w */
    for (int t = 0; t < N; t++)
        for (int c = 0; c < C; c++) dw[c] += dzt[t] * x[(size_t)t * C + c];
#pragma omp parallel for schedule(static) num_threads(m->threads) if (N > 64)
    for (int t = 0; t < N; t++)
        for (int c = 0; c < C; c++) dx[(size_t)t * C + c] += dzt[t] * w[c];
    ffn_backward(m, &L->shared, x, dsh, N, dx);
}

/* ---- forward ------------------------------------------------------------------- */

int moe_model_forward(moe_model *m, const int32_t *tokens, const int32_t *targets, int B, int T, float *loss) {
    if (!m || !tokens) return MOE_EINVAL;
    m->err[0] = '\0';
    m->have_fwd = 0;
    const moe_model_config *c = &m->cfg;
    if (B < 1 || B > m->max_B || T < 1 || T > m->max_T)
        return moe__set_err(m->err, sizeof m->err, MOE_ESHAPE, "forward: batch %d x %d, model sized for %d x %d", B, T,
                            m->max_B, m->max_T);
    const int N = B * T, C = c->hidden_size, V = c->vocab_size, H = c->num_attention_heads,
              G = c->num_key_value_heads, D = c->head_dim, th = m->threads;
    const int HD = H * D, GD = G * D;
    int bad = 0;
    for (int n = 0; n < N && !bad; n++) {
        if (tokens[n] < 0 || tokens[n] >= V || (targets && (targets[n] < 0 || targets[n] >= V))) {
            moe__set_err(m->err, sizeof m->err, MOE_EINVAL, "forward: token %d at position %d is outside [0, %d)",
                         tokens[n] < 0 || tokens[n] >= V ? tokens[n] : targets[n], n, V);
            bad = 1;
            break;
        }
        m->tok[n] = tokens[n];
        if (targets) m->tgt[n] = targets[n];
    }
    /* expert parallelism: one rank's bad batch stops every rank before the
     * layers' collectives */
    if (m->dist && moe_dist_any(m->dist, bad) && !bad)
        return moe__set_err(m->err, sizeof m->err, MOE_EINVAL, "forward: another rank's batch is invalid");
    if (bad) return MOE_EINVAL;
    const float *P = m->params;
    moe__embedding_forward(m->layers[0].res, m->tok, P + m->embed, N, C, th);
    for (int i = 0; i < c->num_hidden_layers; i++) {
        moe__mlayer *L = &m->layers[i];
        float *out = i + 1 < c->num_hidden_layers ? m->layers[i + 1].res : m->act.res_final;
        moe__rmsnorm_forward(L->a1, L->rstd1, L->res, P + L->ln1, N, C, c->rms_norm_eps, th);
        moe__gemm(0, 1, N, HD, C, 1.0f, L->a1, C, P + L->wq, C, 0.0f, L->q, HD, th);
        moe__gemm(0, 1, N, GD, C, 1.0f, L->a1, C, P + L->wk, C, 0.0f, L->k, GD, th);
        moe__gemm(0, 1, N, GD, C, 1.0f, L->a1, C, P + L->wv, C, 0.0f, L->v, GD, th);
        moe__rope_forward(L->q, m->act.rope, B, T, H, D, 0, th);
        moe__rope_forward(L->k, m->act.rope, B, T, G, D, 0, th);
        moe__attention_forward(L->ao, L->att, L->q, L->k, L->v, B, T, H, G, D, th);
        memcpy(L->res2, L->res, sizeof(float) * (size_t)N * C);
        moe__gemm(0, 1, N, C, HD, 1.0f, L->ao, HD, P + L->wo, HD, 1.0f, L->res2, C, th);
        moe__rmsnorm_forward(L->a2, L->rstd2, L->res2, P + L->ln2, N, C, c->rms_norm_eps, th);
        memcpy(out, L->res2, sizeof(float) * (size_t)N * C);
        if (L->is_moe) {
            /* DeepSeek's sequence-wise aux loss: blocks are the batch's sequences */
            int rc = c->seq_aux ? moe_layer_set_aux_seq_len(L->moe, T) : MOE_OK;
            if (!rc) rc = moe_layer_forward(L->moe, L->a2, N, m->act.ffo);
            if (rc)
                return moe__set_err(m->err, sizeof m->err, rc, "layer %d MoE: %s", i, moe_layer_errmsg(L->moe));
            for (size_t j = 0; j < (size_t)N * C; j++) out[j] += m->act.ffo[j];
            if (L->has_shared) shared_forward(m, L, L->a2, N, out, L->sh_out, L->sg);
        } else {
            ffn_forward(m, &L->dense, L->a2, N, out, 1);
        }
    }
    moe__rmsnorm_forward(m->act.lnf, m->act.rstdf, m->act.res_final, P + m->norm, N, C, c->rms_norm_eps, th);
    moe__gemm(0, 1, N, V, C, 1.0f, m->act.lnf, C, P + m->lm_head, C, 0.0f, m->act.logits, V, th);
    m->B = B, m->T = T;
    m->have_targets = targets != NULL;
    if (targets) {
        /* dlogits of the mean CE are made here (fused); backward uses them */
        /* the mean over the global batch (this rank's N in one process) */
        double nglob = N;
        if (m->dist && moe__dist_allreduce_sum(m->dist, &nglob, 1, MOE__DIST_F64))
            return moe__set_err(m->err, sizeof m->err, MOE_EIO, "forward: %s", moe_dist_errmsg(m->dist));
        moe__xent_forward_backward(m->has_grads ? m->bw.dlogits : NULL, m->ce_tok, m->act.logits, m->tgt, N, V,
                                   m->dist ? (float)(1.0 / nglob) : 1.0f / N, th);
        double ce = 0;
        for (int n = 0; n < N; n++) ce += m->ce_tok[n];
        if (m->dist && moe__dist_allreduce_sum(m->dist, &ce, 1, MOE__DIST_F64))
            return moe__set_err(m->err, sizeof m->err, MOE_EIO, "forward: %s", moe_dist_errmsg(m->dist));
        double aux = 0;
        for (int i = 0; i < c->num_hidden_layers; i++)
            if (m->layers[i].moe) {
                const moe_layer_stats *st = moe_layer_get_stats(m->layers[i].moe);
                aux += (double)st->aux_loss + st->z_loss;
            }
        m->last_ce = (float)(ce / nglob);
        m->last_aux = (float)aux;
        if (loss) *loss = (float)(ce / nglob + aux);
        if (!isfinite(m->last_ce))
            return moe__set_err(m->err, sizeof m->err, MOE_ENONFINITE, "forward: the loss is %g", (double)m->last_ce);
    }
    m->have_fwd = 1;
    return MOE_OK;
}

/* ---- backward ------------------------------------------------------------------- */

int moe_model_backward(moe_model *m) {
    if (!m) return MOE_EINVAL;
    if (!m->has_grads) return moe__set_err(m->err, sizeof m->err, MOE_ESTATE, "backward: model created without gradients");
    if (!m->have_fwd || !m->have_targets)
        return moe__set_err(m->err, sizeof m->err, MOE_ESTATE, "backward: needs a forward with targets first");
    const moe_model_config *c = &m->cfg;
    const int B = m->B, T = m->T, N = B * T, C = c->hidden_size, V = c->vocab_size, H = c->num_attention_heads,
              G = c->num_key_value_heads, D = c->head_dim, th = m->threads;
    const int HD = H * D, GD = G * D;
    const float *P = m->params;
    float *Gr = m->grads, *dres = m->bw.dres;

    /* head: dlnf = dlogits Wlm; dWlm += dlogits^T lnf */
    float *dlnf = m->bw.dtmp;
    moe__gemm(0, 0, N, C, V, 1.0f, m->bw.dlogits, V, P + m->lm_head, C, 0.0f, dlnf, C, th);
    moe__gemm(1, 0, V, C, N, 1.0f, m->bw.dlogits, V, m->act.lnf, C, 1.0f, Gr + m->lm_head, C, th);
    memset(dres, 0, sizeof(float) * (size_t)N * C);
    moe__rmsnorm_backward(dres, Gr + m->norm, dlnf, m->act.res_final, P + m->norm, m->act.rstdf, N, C,
                          th);

    for (int i = c->num_hidden_layers - 1; i >= 0; i--) {
        moe__mlayer *L = &m->layers[i];
        /* FFN: out = res2 + ffn(a2): dres flows to res2 unchanged, plus through a2 */
        float *da2 = m->bw.dtmp;
        if (L->is_moe) {
            int rc = moe_layer_backward(L->moe, dres, da2);
            if (rc) return moe__set_err(m->err, sizeof m->err, rc, "layer %d MoE backward: %s", i, moe_layer_errmsg(L->moe));
            if (L->has_shared) shared_backward(m, L, L->a2, dres, N, da2);
        } else {
            memset(da2, 0, sizeof(float) * (size_t)N * C);
            ffn_backward(m, &L->dense, L->a2, dres, N, da2);
        }
        moe__rmsnorm_backward(dres, Gr + L->ln2, da2, L->res2, P + L->ln2, L->rstd2, N, C, th);

        /* attention: res2 = res + ao Wo^T */
        moe__gemm(0, 0, N, HD, C, 1.0f, dres, C, P + L->wo, HD, 0.0f, m->bw.dao, HD, th);
        moe__gemm(1, 0, C, HD, N, 1.0f, dres, C, L->ao, HD, 1.0f, Gr + L->wo, HD, th);
        memset(m->bw.dq, 0, sizeof(float) * (size_t)N * HD);
        memset(m->bw.dk, 0, sizeof(float) * (size_t)N * GD);
        memset(m->bw.dv, 0, sizeof(float) * (size_t)N * GD);
        moe__attention_backward(m->bw.dq, m->bw.dk, m->bw.dv, m->bw.dao, L->att, L->q, L->k, L->v, B, T, H, G, D,
                                m->bw.att_scratch, th);
        moe__rope_backward(m->bw.dq, m->act.rope, B, T, H, D, 0, th);
        moe__rope_backward(m->bw.dk, m->act.rope, B, T, G, D, 0, th);
        float *da1 = m->bw.dtmp;
        moe__gemm(0, 0, N, C, HD, 1.0f, m->bw.dq, HD, P + L->wq, C, 0.0f, da1, C, th);
        moe__gemm(0, 0, N, C, GD, 1.0f, m->bw.dk, GD, P + L->wk, C, 1.0f, da1, C, th);
        moe__gemm(0, 0, N, C, GD, 1.0f, m->bw.dv, GD, P + L->wv, C, 1.0f, da1, C, th);
        moe__gemm(1, 0, HD, C, N, 1.0f, m->bw.dq, HD, L->a1, C, 1.0f, Gr + L->wq, C, th);
        moe__gemm(1, 0, GD, C, N, 1.0f, m->bw.dk, GD, L->a1, C, 1.0f, Gr + L->wk, C, th);
        moe__gemm(1, 0, GD, C, N, 1.0f, m->bw.dv, GD, L->a1, C, 1.0f, Gr + L->wv, C, th);
        moe__rmsnorm_backward(dres, Gr + L->ln1, da1, L->res, P + L->ln1, L->rstd1, N, C, th);
    }
    moe__embedding_backward(Gr + m->embed, dres, m->tok, N, C, th);
    return MOE_OK;
}

/* ---- expert parallelism ------------------------------------------------------------ */

/* [lo, hi) of MoE layer L's expert block (w1, w2[, w3] of the local experts) */
static void expert_block(const moe__mlayer *L, size_t *lo, size_t *hi) {
    const moe_layer_params o = moe_layer_param_offsets(L->moe);
    *lo = L->moe_off + o.w1;
    *hi = L->moe_off + (o.w3 != SIZE_MAX ? o.w3 : o.w2) + (o.w2 - o.w1);
}

int moe__model_sync_grads(moe_model *m) {
    if (!m->dist) return MOE_OK;
    /* the gaps between the expert blocks are the replicated parameters; the
     * blocks come in layer order in the arena */
    size_t from = 0;
    for (int i = 0; i <= m->cfg.num_hidden_layers; i++) {
        size_t lo = m->n_params, hi = m->n_params;
        if (i < m->cfg.num_hidden_layers) {
            if (!m->layers[i].moe) continue;
            expert_block(&m->layers[i], &lo, &hi);
        }
        if (moe__dist_allreduce_sum(m->dist, m->grads + from, lo - from, MOE__DIST_F32))
            return moe__set_err(m->err, sizeof m->err, MOE_EIO, "gradient sum: %s", moe_dist_errmsg(m->dist));
        from = hi;
    }
    return MOE_OK;
}

/* sum g^2 in double over 64 chunks that depend on n only, each with four
 * interleaved accumulators, added in order: the same bits for any thread
 * count, and not one serial chain of dependent adds over the whole model
 * (that made the norm a visible share of a P = 1 step under mpirun) */
static double sumsq(const float *g, size_t n, int threads) {
    enum { NCH = 64 };
    double part[NCH];
    const size_t per = (n + NCH - 1) / NCH;
#pragma omp parallel for schedule(static) num_threads(threads) if (n > MOE__PAR_MIN)
    for (int ch = 0; ch < NCH; ch++) {
        const size_t i0 = (size_t)ch * per < n ? (size_t)ch * per : n, i1 = i0 + per < n ? i0 + per : n;
        double a[4] = {0, 0, 0, 0};
        size_t i = i0;
        for (; i + 4 <= i1; i += 4)
            for (int k = 0; k < 4; k++) a[k] += (double)g[i + k] * g[i + k];
        for (; i < i1; i++) a[0] += (double)g[i] * g[i];
        part[ch] = (a[0] + a[1]) + (a[2] + a[3]);
    }
    double s = 0;
    for (int ch = 0; ch < NCH; ch++) s += part[ch];
    return s;
}

int moe__model_grad_norm(moe_model *m, const float *g, double *norm) {
    double v[2] = {0, 0}; /* replicated (the same on every rank), experts (this rank's) */
    size_t from = 0; /* the replicated gaps between the expert blocks, as in sync_grads */
    for (int i = 0; i <= m->cfg.num_hidden_layers; i++) {
        size_t lo = m->n_params, hi = m->n_params;
        if (i < m->cfg.num_hidden_layers) {
            if (!m->layers[i].moe) continue;
            expert_block(&m->layers[i], &lo, &hi);
            v[1] += sumsq(g + lo, hi - lo, m->threads);
        }
        v[0] += sumsq(g + from, lo - from, m->threads);
        from = hi;
    }
    if (m->dist && moe__dist_allreduce_sum(m->dist, &v[1], 1, MOE__DIST_F64))
        return moe__set_err(m->err, sizeof m->err, MOE_EIO, "gradient norm: %s", moe_dist_errmsg(m->dist));
    *norm = sqrt(fmax(v[0], 0.0) + v[1]);
    return MOE_OK;
}

/* ---- decoding with a KV cache ----------------------------------------------------- */

static int refuse_noncausal(moe_model *m) {
    if (m->cfg.router_type != MOE_ROUTER_EXPERT_CHOICE || m->cfg.num_local_experts == 0) return MOE_OK;
    return moe__set_err(m->err, sizeof m->err, MOE_EUNSUPPORTED,
                        "decode: expert-choice routing is non-causal (each expert picks among all tokens of a "
                        "batch, including later ones) and cannot generate token by token; use it for training "
                        "or encoders");
}

int moe_model_decode_reset(moe_model *m) {
    if (!m) return MOE_EINVAL;
    m->pos = 0;
    return refuse_noncausal(m);
}

int moe_model_decode(moe_model *m, int32_t token, const float **logits) {
    if (!m) return MOE_EINVAL;
    const moe_model_config *c = &m->cfg;
    const int C = c->hidden_size, V = c->vocab_size, H = c->num_attention_heads, G = c->num_key_value_heads,
              D = c->head_dim, th = m->threads;
    const int HD = H * D, GD = G * D;
    if (token < 0 || token >= V)
        return moe__set_err(m->err, sizeof m->err, MOE_EINVAL, "decode: token %d is outside [0, %d)", token, V);
    if (m->pos >= m->max_T)
        return moe__set_err(m->err, sizeof m->err, MOE_ELIMIT, "decode: context full (%d positions)", m->max_T);
    int rc = refuse_noncausal(m);
    if (rc) return rc;
    const float *P = m->params;
    float *x = m->dec.x, *a = m->dec.a;
    float rstd;
    memcpy(x, P + m->embed + (size_t)token * C, sizeof(float) * C);
    for (int i = 0; i < c->num_hidden_layers; i++) {
        moe__mlayer *L = &m->layers[i];
        float *kc = m->kcache + (size_t)i * m->max_T * GD, *vc = m->vcache + (size_t)i * m->max_T * GD;
        moe__rmsnorm_forward(a, &rstd, x, P + L->ln1, 1, C, c->rms_norm_eps, 1);
        moe__gemm(0, 1, 1, HD, C, 1.0f, a, C, P + L->wq, C, 0.0f, m->dec.q, HD, th);
        moe__gemm(0, 1, 1, GD, C, 1.0f, a, C, P + L->wk, C, 0.0f, kc + (size_t)m->pos * GD, GD, th);
        moe__gemm(0, 1, 1, GD, C, 1.0f, a, C, P + L->wv, C, 0.0f, vc + (size_t)m->pos * GD, GD, th);
        moe__rope_forward(m->dec.q, m->act.rope, 1, 1, H, D, m->pos, 1);
        moe__rope_forward(kc + (size_t)m->pos * GD, m->act.rope, 1, 1, G, D, m->pos, 1);
        moe__attention_decode(m->dec.o, m->dec.q, kc, vc, m->pos + 1, H, G, D, m->dec.scratch);
        moe__gemm(0, 1, 1, C, HD, 1.0f, m->dec.o, HD, P + L->wo, HD, 1.0f, x, C, th);
        moe__rmsnorm_forward(a, &rstd, x, P + L->ln2, 1, C, c->rms_norm_eps, 1);
        if (L->is_moe) {
            rc = moe_layer_forward(L->moe, a, 1, m->dec.y);
            if (rc) return moe__set_err(m->err, sizeof m->err, rc, "layer %d MoE: %s", i, moe_layer_errmsg(L->moe));
            for (int j = 0; j < C; j++) x[j] += m->dec.y[j];
            float g;
            if (L->has_shared) shared_forward(m, L, a, 1, x, m->dec.y, &g);
        } else {
            ffn_forward(m, &L->dense, a, 1, x, 1);
        }
    }
    moe__rmsnorm_forward(a, &rstd, x, P + m->norm, 1, C, c->rms_norm_eps, 1);
    moe__gemm(0, 1, 1, V, C, 1.0f, a, C, P + m->lm_head, C, 0.0f, m->act.logits, V, th);
    m->pos++;
    m->have_fwd = 0; /* the training activations no longer match */
    if (logits) *logits = m->act.logits;
    return MOE_OK;
}
