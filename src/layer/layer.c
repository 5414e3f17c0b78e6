/* The MoE layer object: configuration checks, one allocation pass that sizes
 * every work buffer for max_tokens (forward/backward never allocate), and the
 * forward/backward sequence over router, dispatch and experts. */
#include "layer/layer_impl.h"
#include "dist/dist.h"

#include "gemm_small.h"

#include <limits.h>
#include <omp.h>
#include <math.h>
#include <string.h>

/* Caps that keep every size computation far from overflow. */
#define MAX_DIM (1 << 20)
#define MAX_EXPERTS (1 << 16)

moe_layer_config moe_layer_config_default(int d_model, int d_ff, int n_experts, int top_k, int max_tokens) {
    moe_layer_config c;
    memset(&c, 0, sizeof c);
    c.d_model = d_model;
    c.d_ff = d_ff;
    c.n_experts = n_experts;
    c.top_k = top_k;
    c.max_tokens = max_tokens;
    c.act = MOE_ACT_SWIGLU;
    c.score = MOE_SCORE_SOFTMAX;
    c.renormalize = 1;
    c.route_scale = 1.0f;
    c.aux_coef = 0.01f;
    c.z_coef = 0.001f;
    return c;
}

/* k against the groups (valid groups assumed): hierarchical takes k /
 * topk_groups experts in each kept group, group-limited top-k needs k experts
 * in the kept groups. Checked at creation and by moe_layer_set_top_k. */
static int check_group_k(const moe_layer_config *c, int K, char *err, size_t n) {
    const int E = c->n_experts, G = c->n_groups, kg = c->topk_groups;
    if (c->router == MOE_ROUTER_HIERARCHICAL && (K % kg || K / kg > E / G))
        return moe__set_err(err, n, MOE_EINVAL,
                            "hierarchical: top_k = %d must be topk_groups (%d) times at most %d experts per group", K,
                            kg, E / G);
    if (c->router == MOE_ROUTER_TOPK && G > 1 && K > kg * (E / G))
        return moe__set_err(err, n, MOE_EINVAL, "top_k = %d: more than the %d experts of %d groups", K, kg * (E / G),
                            kg);
    return MOE_OK;
}

static int check_routing(const moe_layer_config *c, char *err, size_t n) {
    const int E = c->n_experts, K = c->top_k;
    const int noisy = c->router == MOE_ROUTER_NOISY_TOPK || c->router == MOE_ROUTER_HIERARCHICAL;
    if ((unsigned)c->router > MOE_ROUTER_BALANCED)
        return moe__set_err(err, n, MOE_EINVAL, "router = %d: unknown router", (int)c->router);
    if (c->gshard_random != 0 && (c->gshard_random != 1 || c->router != MOE_ROUTER_TOPK || K != 2))
        return moe__set_err(err, n, MOE_EINVAL, "gshard_random: needs router TOPK with top_k = 2 (top_k = %d)", K);
    if (!isfinite(c->importance_coef) || c->importance_coef < 0 || !isfinite(c->load_coef) || c->load_coef < 0)
        return moe__set_err(err, n, MOE_EINVAL, "importance_coef = %g, load_coef = %g: must be finite and >= 0",
                            (double)c->importance_coef, (double)c->load_coef);
    if (c->load_coef > 0 && !noisy)
        return moe__set_err(err, n, MOE_EINVAL,
                            "load_coef: the smooth load estimator needs routing noise (NOISY_TOPK or HIERARCHICAL)");
    if (c->router == MOE_ROUTER_NOISY_TOPK && c->load_coef > 0 && K >= E)
        return moe__set_err(err, n, MOE_EINVAL, "load_coef: the load estimator needs top_k < n_experts (%d, %d)", K,
                            E);
    if (!isfinite(c->bias_update_rate) || c->bias_update_rate < 0)
        return moe__set_err(err, n, MOE_EINVAL, "bias_update_rate = %g: must be finite and >= 0",
                            (double)c->bias_update_rate);
    if (c->bias_update_rate > 0 && c->router != MOE_ROUTER_TOPK)
        return moe__set_err(err, n, MOE_EINVAL, "bias_update_rate: aux-loss-free balancing needs router TOPK");
    if (c->aux_seq_len < 0)
        return moe__set_err(err, n, MOE_EINVAL, "aux_seq_len = %d: must be >= 0", c->aux_seq_len);
    const int grouped = c->router == MOE_ROUTER_HIERARCHICAL || (c->router == MOE_ROUTER_TOPK && c->n_groups > 1);
    if (c->n_groups < 0 || c->topk_groups < 0 || (c->n_groups > 1 && c->router != MOE_ROUTER_TOPK &&
                                                  c->router != MOE_ROUTER_HIERARCHICAL))
        return moe__set_err(err, n, MOE_EINVAL, "n_groups = %d, topk_groups = %d: groups apply to TOPK and HIERARCHICAL",
                            c->n_groups, c->topk_groups);
    if (grouped) {
        const int G = c->n_groups, kg = c->topk_groups;
        if (G < 1 || E % G)
            return moe__set_err(err, n, MOE_EINVAL, "n_groups = %d: must divide n_experts = %d", G, E);
        if (kg < 1 || kg > G)
            return moe__set_err(err, n, MOE_EINVAL, "topk_groups = %d: must be in [1, n_groups = %d]", kg, G);
        int rc = check_group_k(c, K, err, n);
        if (rc) return rc;
    }
    if (c->router == MOE_ROUTER_EXPERT_CHOICE && (long long)E * moe__ec_capacity(c, c->max_tokens) > MAX_DIM * 64LL)
        return moe__set_err(err, n, MOE_EINVAL, "expert choice: %d experts x capacity for %d tokens: too many slots",
                            E, c->max_tokens);
    return MOE_OK;
}

static int check_config(const moe_layer_config *c, char *err, size_t n) {
    if (c->n_experts < 1 || c->n_experts > MAX_EXPERTS)
        return moe__set_err(err, n, MOE_EINVAL, "n_experts = %d: must be in [1, %d]", c->n_experts, MAX_EXPERTS);
    if (c->top_k < 1 || c->top_k > c->n_experts)
        return moe__set_err(err, n, MOE_EINVAL, "top_k = %d: must be in [1, n_experts = %d]", c->top_k,
                            c->n_experts);
    if (c->d_model < 1 || c->d_model > MAX_DIM)
        return moe__set_err(err, n, MOE_EINVAL, "d_model = %d: must be in [1, %d]", c->d_model, MAX_DIM);
    if (c->d_ff < 1 || c->d_ff > MAX_DIM)
        return moe__set_err(err, n, MOE_EINVAL, "d_ff = %d: must be in [1, %d]", c->d_ff, MAX_DIM);
    if (c->max_tokens < 1 || c->max_tokens > MAX_DIM * 16 ||
        (long long)c->max_tokens * c->top_k > MAX_DIM * 64LL)
        return moe__set_err(err, n, MOE_EINVAL, "max_tokens = %d (top_k %d): out of range", c->max_tokens,
                            c->top_k);
    if ((unsigned)c->act > MOE_ACT_SWIGLU)
        return moe__set_err(err, n, MOE_EINVAL, "act = %d: unknown activation", (int)c->act);
    if ((unsigned)c->score > MOE_SCORE_SIGMOID)
        return moe__set_err(err, n, MOE_EINVAL, "score = %d: unknown score function", (int)c->score);
    if (c->renormalize != 0 && c->renormalize != 1)
        return moe__set_err(err, n, MOE_EINVAL, "renormalize = %d: must be 0 or 1", c->renormalize);
    if (!isfinite(c->route_scale) || c->route_scale == 0.0f)
        return moe__set_err(err, n, MOE_EINVAL, "route_scale = %g: must be finite and non-zero",
                            (double)c->route_scale);
    if (!isfinite(c->aux_coef) || c->aux_coef < 0.0f || !isfinite(c->z_coef) || c->z_coef < 0.0f)
        return moe__set_err(err, n, MOE_EINVAL, "aux_coef = %g, z_coef = %g: must be finite and >= 0",
                            (double)c->aux_coef, (double)c->z_coef);
    if (c->n_threads < 0 || c->n_threads > moe_max_threads())
        return moe__set_err(err, n, MOE_EINVAL, "n_threads = %d: must be 0 (the default) to %d (4 per CPU)",
                            c->n_threads, moe_max_threads());
    if (!isfinite(c->capacity_factor) || c->capacity_factor < 0 || c->capacity_factor > 1e6)
        return moe__set_err(err, n, MOE_EINVAL, "capacity_factor = %g: must be 0 (dropless) or a positive number",
                            (double)c->capacity_factor);
    if ((unsigned)c->drop_policy > MOE_DROP_PROBABILITY)
        return moe__set_err(err, n, MOE_EINVAL, "drop_policy = %d: unknown", (int)c->drop_policy);
    if (c->max_top_k < 0 || c->max_top_k > c->n_experts)
        return moe__set_err(err, n, MOE_EINVAL, "max_top_k = %d: must be in [0, n_experts = %d]", c->max_top_k,
                            c->n_experts);
    return check_routing(c, err, n);
}

int moe__layer_config_check(const moe_layer_config *c, char *err, size_t n) { return check_config(c, err, n); }

/* el: experts held here (E, or E / P under expert parallelism); the router
 * blocks always cover all E */
static moe_layer_params layout(const moe_layer_config *c, int el) {
    const size_t C = (size_t)c->d_model, F = (size_t)c->d_ff, E = (size_t)c->n_experts, El = (size_t)el;
    moe_layer_params p;
    p.wg = 0;
    p.w1 = p.wg + E * C;
    p.w2 = p.w1 + El * F * C;
    if (c->act == MOE_ACT_SWIGLU) {
        p.w3 = p.w2 + El * C * F;
        p.total = p.w3 + El * F * C;
    } else {
        p.w3 = SIZE_MAX;
        p.total = p.w2 + El * C * F;
    }
    /* the schemes' blocks go last, so the base layout never moves */
    const size_t G = c->n_groups > 0 ? (size_t)c->n_groups : 1;
    p.wnoise = p.wgroup = p.wgroup_noise = p.ebias = SIZE_MAX;
    if (c->router == MOE_ROUTER_NOISY_TOPK || c->router == MOE_ROUTER_HIERARCHICAL) {
        p.wnoise = p.total;
        p.total += E * C;
    }
    if (c->router == MOE_ROUTER_HIERARCHICAL) {
        p.wgroup = p.total;
        p.wgroup_noise = p.wgroup + G * C;
        p.total = p.wgroup_noise + G * C;
    }
    if (c->bias_update_rate > 0) {
        p.ebias = p.total;
        p.total += E;
    }
    return p;
}

void moe_layer_free(moe_layer *l) {
    if (!l) return;
    void *bufs[] = {l->own_params, l->own_grads, l->x,      l->logits, l->scores, l->lse,   l->topk_ids,
                    l->topk_w,     l->part,      l->counts, l->psum,   l->daux,   l->seg_off,
                    l->row_of_slot, l->slot_of_row, l->xg,  l->h1,     l->h3,     l->act,   l->out,
                    l->dout,       l->dh1,       l->dh3,    l->dxg,    l->dgate,  l->dlogits, l->tiles,
                    l->small_ws,   l->kept,      l->keep,   l->order,  l->prio,   l->tok_off, l->slot_tok,
                    l->blk_counts, l->blk_daux,  l->dimp,   l->ws,     l->tscr,   l->bias_load};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) moe__afree(bufs[i]);
    if (l->dist) {
        void *ep[] = {l->ep_buf, l->ep_red, l->ep_off, l->ep_cnt, l->ep_send, l->ep_recv, l->ep_ntok, l->ep_cur,
                      l->ep_before, l->ep_cand, l->ep_thr};
        for (size_t i = 0; i < sizeof ep / sizeof ep[0]; i++) moe__afree(ep[i]);
        if (l->ep_size > 1) moe__afree(l->tx), moe__afree(l->ty), moe__afree(l->tdy), moe__afree(l->tdx);
    }
    moe__free(l);
}

/* What the expert-parallel layer supports: schemes whose routing of a token
 * depends on that token alone (plus global sums), and no capacity limit
 * (a global per-expert capacity in token order would need the global slots). */
static int check_ep(const moe_layer_config *c, const moe_dist *d, char *err, size_t n) {
    const int P = d->size;
    if (c->n_experts % P)
        return moe__set_err(err, n, MOE_EINVAL, "expert parallelism: n_experts = %d is not a multiple of %d ranks",
                            c->n_experts, P);
    if (c->load_coef > 0 && c->router != MOE_ROUTER_NOISY_TOPK)
        return moe__set_err(err, n, MOE_EUNSUPPORTED,
                            "expert parallelism: load_coef with HIERARCHICAL is not supported");
    if (c->router == MOE_ROUTER_EXPERT_CHOICE && (long long)c->max_tokens * c->n_experts * P > MAX_DIM * 64LL)
        return moe__set_err(err, n, MOE_EINVAL, "expert parallelism: %d ranks x %d tokens x %d experts: too many rows",
                            P, c->max_tokens, c->n_experts);
    if ((long long)c->max_tokens * c->top_k * P > MAX_DIM * 64LL)
        return moe__set_err(err, n, MOE_EINVAL, "expert parallelism: %d ranks x %d tokens x top-%d: too many rows",
                            P, c->max_tokens, c->top_k);
    return MOE_OK;
}

moe_layer *moe_layer_create(const moe_layer_config *cfg, int *err, char *errbuf, size_t errbuf_size) {
    return moe_layer_create_ep(cfg, NULL, err, errbuf, errbuf_size);
}

moe_layer *moe_layer_create_ep(const moe_layer_config *cfg, moe_dist *dist, int *err, char *errbuf,
                               size_t errbuf_size) {
    int rc = cfg ? check_config(cfg, errbuf, errbuf_size)
                 : moe__set_err(errbuf, errbuf_size, MOE_EINVAL, "config is NULL");
    if (!rc && dist) rc = check_ep(cfg, dist, errbuf, errbuf_size);
    if (rc) {
        if (err) *err = rc;
        return NULL;
    }
    moe_layer *l = moe__calloc(1, sizeof *l);
    if (!l) goto nomem;
    l->cfg = *cfg;
    l->dist = dist;
    l->ep_size = dist ? dist->size : 1;
    l->ep_rank = dist ? dist->rank : 0;
    l->e_local = cfg->n_experts / l->ep_size;
    l->e_first = l->ep_rank * l->e_local;
    l->off = layout(cfg, l->e_local);
    l->threads = moe__threads(cfg->n_threads);

    const size_t N = (size_t)cfg->max_tokens, C = (size_t)cfg->d_model, F = (size_t)cfg->d_ff;
    const size_t E = (size_t)cfg->n_experts;
    const size_t K = (size_t)(cfg->max_top_k > cfg->top_k ? cfg->max_top_k : cfg->top_k);
    size_t R = N * K;
    if (cfg->router == MOE_ROUTER_EXPERT_CHOICE) {
        moe_layer_config sized = *cfg;
        sized.top_k = (int)K;
        size_t ec = E * (size_t)moe__ec_capacity(&sized, cfg->max_tokens);
        /* under expert parallelism an expert's share of the global batch
         * may all sit on one rank: up to every local token per expert */
        if (dist && dist->size > 1) ec = E * N;
        if (ec > R) R = ec;
    }
    const size_t nchunks = (N + MOE__CHUNK - 1) / MOE__CHUNK;
    const int swiglu = cfg->act == MOE_ACT_SWIGLU;
    l->k_cap = (int)K;
    l->r_cap = (int)R;
    /* the expert side may receive every rank's rows (all tokens to one rank) */
    const size_t Rx = R * (size_t)l->ep_size;
    l->max_tiles = moe__experts_max_tiles(cfg, (int)Rx);
    l->max_blocks = cfg->aux_seq_len > 0 ? (int)((N + (size_t)cfg->aux_seq_len - 1) / (size_t)cfg->aux_seq_len) : 0;
    l->ws_floats = cfg->router == MOE_ROUTER_NOISY_TOPK    ? moe__noisy_ws_floats(cfg)
                   : cfg->router == MOE_ROUTER_HIERARCHICAL ? moe__hier_ws_floats(cfg)
                                                            : 0;
    int ok = 1;
#define ALLOC(field, count, type)                                                                  \
    do {                                                                                           \
        size_t bytes_;                                                                             \
        if (moe__mul_size((count), sizeof(type), &bytes_) || !(l->field = moe__aligned_alloc(bytes_))) \
            ok = 0;                                                                                \
    } while (0)
    ALLOC(own_params, l->off.total, float);
    ALLOC(own_grads, l->off.total, float);
    ALLOC(x, N * C, float);
    ALLOC(logits, N * E, float);
    ALLOC(scores, N * E, float);
    ALLOC(lse, N, float);
    ALLOC(topk_ids, R, int);
    ALLOC(topk_w, R, float);
    ALLOC(part, nchunks * (E + 2), float);
    ALLOC(counts, E, int);
    ALLOC(psum, E, double);
    ALLOC(daux, E, float);
    ALLOC(seg_off, E + 1, int);
    ALLOC(row_of_slot, R, int);
    ALLOC(slot_of_row, R, int);
    ALLOC(kept, E, int);
    ALLOC(keep, R, unsigned char);
    ALLOC(order, R, int);
    ALLOC(prio, R, struct moe__prio);
    ALLOC(xg, Rx * C, float);
    ALLOC(h1, Rx * F, float);
    ALLOC(act, Rx * F, float);
    ALLOC(out, Rx * C, float);
    ALLOC(dout, Rx * C, float);
    ALLOC(dh1, Rx * F, float);
    ALLOC(dxg, Rx * C, float);
    ALLOC(dgate, R, float);
    ALLOC(dlogits, N * E, float);
    ALLOC(tiles, (size_t)l->max_tiles, moe__tile);
    ALLOC(tok_off, N + 1, int);
    ALLOC(slot_tok, R, int);
    ALLOC(blk_counts, E, int);
    ALLOC(blk_daux, (size_t)l->max_blocks * E + 1, float);
    ALLOC(dimp, E, float);
    ALLOC(ws, l->ws_floats + 1, float);
    ALLOC(tscr, 2 * E * (size_t)l->threads, float);
    ALLOC(bias_load, E, int64_t);
    /* packed rows of the small-GEMM path, per thread: K = max(C, F) by the
     * rows rounded up to 16, as moe__sgemm_small_pack writes them (sized by
     * the bare row limit, a limit that is not a multiple of 16 overflowed) */
    l->small_ws_stride = (size_t)(C > F ? C : F) * (size_t)((MOE__SMALL_M_MAX + 15) & ~15);
    ALLOC(small_ws, l->small_ws_stride * (size_t)l->threads, float);
    if (swiglu) {
        ALLOC(h3, Rx * F, float);
        ALLOC(dh3, Rx * F, float);
    }
    if (dist) {
        const size_t P = (size_t)l->ep_size, El = (size_t)l->e_local;
        if (P > 1) { /* one rank: the rows stay where they are (aliases below) */
            ALLOC(tx, R * C, float);
            ALLOC(ty, R * C, float);
            ALLOC(tdy, R * C, float);
            ALLOC(tdx, R * C, float);
            ALLOC(ep_buf, Rx * C, float);
        }
        ALLOC(ep_red, 2 * E + 4, double);
        ALLOC(ep_before, (P + 1) * E, int);
        ALLOC(ep_cand, (P + 1) * R, struct moe__ep_cand);
        ALLOC(ep_thr, E, struct moe__ep_cand);
        ALLOC(ep_off, El + 1, int);
        ALLOC(ep_cnt, P * El, int);
        ALLOC(ep_send, P, int);
        ALLOC(ep_recv, P, int);
        ALLOC(ep_ntok, P, int);
        ALLOC(ep_cur, El, int);
    }
#undef ALLOC
    if (!ok) goto nomem;
    memset(l->own_params, 0, sizeof(float) * l->off.total);
    memset(l->own_grads, 0, sizeof(float) * l->off.total);
    memset(l->counts, 0, sizeof(int) * E);
    memset(l->bias_load, 0, sizeof(int64_t) * E);
    memset(l->tok_off, 0, sizeof(int) * (N + 1));
    l->training = 1;
    l->params = l->own_params;
    l->grads = l->own_grads;
    l->stats.expert_count = l->counts;
    if (dist) {
        l->n_seg = l->e_local;
        l->eoff = l->ep_off;
        memset(l->ep_off, 0, sizeof(int) * ((size_t)l->e_local + 1));
    } else {
        l->n_seg = (int)E;
        l->eoff = l->seg_off;
    }
    if (l->ep_size == 1) l->tx = l->xg, l->ty = l->out, l->tdy = l->dout, l->tdx = l->dxg;
    if (err) *err = MOE_OK;
    return l;

nomem:
    moe_layer_free(l);
    if (err) *err = MOE_ENOMEM;
    moe__set_err(errbuf, errbuf_size, MOE_ENOMEM, "out of memory sizing a layer for %d tokens",
                 cfg->max_tokens);
    return NULL;
}

const moe_layer_config *moe_layer_get_config(const moe_layer *l) { return &l->cfg; }

void moe_layer_expert_range(const moe_layer *l, int *first, int *count) {
    if (first) *first = l ? l->e_first : 0;
    if (count) *count = l ? l->e_local : 0;
}

void moe_layer_set_training(moe_layer *l, int training) {
    if (l) l->training = training != 0;
}

int moe_layer_set_top_k(moe_layer *l, int k) {
    if (!l) return MOE_EINVAL;
    if (k < 1 || k > l->k_cap)
        return moe__set_err(l->err, sizeof l->err, MOE_EINVAL, "set_top_k: k = %d: must be in [1, %d]", k,
                            l->k_cap);
    char msg[160];
    if (check_group_k(&l->cfg, k, msg, sizeof msg))
        return moe__set_err(l->err, sizeof l->err, MOE_EINVAL, "set_top_k: %s", msg);
    l->cfg.top_k = k;
    l->have_fwd = 0;
    return MOE_OK;
}
moe_layer_params moe_layer_param_offsets(const moe_layer *l) { return l->off; }
float *moe_layer_params_ptr(moe_layer *l) { return l->params; }
float *moe_layer_grads_ptr(moe_layer *l) { return l->grads; }
const moe_layer_stats *moe_layer_get_stats(const moe_layer *l) { return &l->stats; }
const int *moe_layer_topk_ids(const moe_layer *l) { return l->topk_ids; }
int moe_layer_routing(const moe_layer *l, const int **tok_off, const int **ids, const float **weights,
                      const unsigned char **kept) {
    if (tok_off) *tok_off = l->tok_off;
    if (ids) *ids = l->topk_ids;
    if (weights) *weights = l->topk_w;
    if (kept) *kept = l->keep;
    return l->n_slots;
}

void moe_layer_set_rng_counter(moe_layer *l, uint64_t counter) {
    if (l) l->calls = counter;
}

int moe_layer_set_aux_seq_len(moe_layer *l, int seq_len) {
    if (!l) return MOE_EINVAL;
    if (l->cfg.aux_seq_len <= 0 && seq_len == 0) return MOE_OK;
    if (seq_len < 1 || l->max_blocks == 0 || (l->cfg.max_tokens + seq_len - 1) / seq_len > l->max_blocks)
        return moe__set_err(l->err, sizeof l->err, MOE_EINVAL,
                            "set_aux_seq_len: %d: the layer was created for blocks of >= %d tokens", seq_len,
                            l->cfg.aux_seq_len);
    l->cfg.aux_seq_len = seq_len;
    l->have_fwd = 0;
    return MOE_OK;
}
const float *moe_layer_topk_weights(const moe_layer *l) { return l->topk_w; }
const char *moe_layer_errmsg(const moe_layer *l) { return l ? l->err : "layer is NULL"; }

int moe_layer_bind(moe_layer *l, float *params, float *grads) {
    if (!l) return MOE_EINVAL;
    if (!params) return moe__set_err(l->err, sizeof l->err, MOE_EINVAL, "bind: params is NULL");
    l->params = params;
    l->grads = grads;
    l->have_fwd = 0;
    return MOE_OK;
}

int moe_layer_init(moe_layer *l, uint64_t seed, float init_scale) {
    if (!l) return MOE_EINVAL;
    if (!isfinite(init_scale) || init_scale < 0.0f)
        return moe__set_err(l->err, sizeof l->err, MOE_EINVAL, "init: scale %g must be finite and >= 0",
                            (double)init_scale);
    const moe_layer_config *c = &l->cfg;
    const double sc = init_scale / sqrt((double)c->d_model), sf = init_scale / sqrt((double)c->d_ff);
    moe__rng rng;
    moe__rng_seed(&rng, seed);
    /* The stream runs over the single-process layout (w1, w2 and w3 have the
     * same size E F C); under expert parallelism each rank keeps the draws of
     * its experts, so any P initialises the same model. */
    const moe_layer_params g = layout(c, c->n_experts);
    const size_t base_end = (l->off.w3 != SIZE_MAX ? l->off.w3 : l->off.w2) + (l->off.w2 - l->off.w1);
    const size_t gbase_end = (g.w3 != SIZE_MAX ? g.w3 : g.w2) + (g.w2 - g.w1);
    const size_t per = (size_t)c->d_ff * c->d_model, lo = (size_t)l->e_first * per, hi = lo + (size_t)l->e_local * per;
    for (size_t i = 0; i < gbase_end; i++) {
        /* w2 reads F inputs; the router, w1 and w3 read C */
        const int is_w2 = i >= g.w2 && (g.w3 == SIZE_MAX || i < g.w3);
        const float v = (float)(moe__rng_normal(&rng) * (is_w2 ? sf : sc));
        if (i < g.w1) {
            l->params[i] = v;
            continue;
        }
        const size_t blk = (i - g.w1) / (g.w2 - g.w1), r = (i - g.w1) % (g.w2 - g.w1);
        if (r >= lo && r < hi) l->params[l->off.w1 + blk * (l->off.w2 - l->off.w1) + (r - lo)] = v;
    }
    /* noisy gates start at zero, as in Shazeer et al. (equal logits, the
     * noise alone breaks ties at first); the selection bias starts at 0 */
    memset(l->params + base_end, 0, sizeof(float) * (l->off.total - base_end));
    if (c->router == MOE_ROUTER_NOISY_TOPK || c->router == MOE_ROUTER_HIERARCHICAL)
        memset(l->params + l->off.wg, 0, sizeof(float) * (size_t)c->n_experts * c->d_model);
    l->have_fwd = 0;
    return MOE_OK;
}

void moe_layer_zero_grad(moe_layer *l) {
    if (l && l->grads) memset(l->grads, 0, sizeof(float) * l->off.total);
}

/* Index of the first non-finite value, or -1; the same answer for any thread
 * count (minimum over fixed chunks). */
static long long first_nonfinite(const float *v, size_t n, int threads) {
    const size_t chunk = 1 << 16;
    const long long nch = (long long)((n + chunk - 1) / chunk);
    long long bad = LLONG_MAX;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(min : bad) if (nch > 1)
    for (long long ch = 0; ch < nch; ch++) {
        const size_t i0 = (size_t)ch * chunk, i1 = i0 + chunk < n ? i0 + chunk : n;
        int all = 1;
        for (size_t i = i0; i < i1; i++) all &= isfinite(v[i]) != 0;
        if (!all) {
            size_t i = i0;
            while (isfinite(v[i])) i++;
            if ((long long)i < bad) bad = (long long)i;
        }
    }
    return bad == LLONG_MAX ? -1 : bad;
}

int moe_layer_forward(moe_layer *l, const float *x, int n_tokens, float *y) {
    if (!l) return MOE_EINVAL;
    l->err[0] = '\0';
    l->have_fwd = 0;
    const int C = l->cfg.d_model;
    /* no early return before moe__ep_start: under expert parallelism the
     * other ranks learn of a failure there */
    int rc = MOE_OK;
    const size_t nx = (size_t)(n_tokens > 0 ? n_tokens : 0) * C;
    if (!x || !y) rc = moe__set_err(l->err, sizeof l->err, MOE_EINVAL, "forward: x or y is NULL");
    else if (n_tokens < 0 || n_tokens > l->cfg.max_tokens)
        rc = moe__set_err(l->err, sizeof l->err, MOE_ESHAPE, "forward: %d tokens, layer sized for [0, %d] (max_tokens)",
                          n_tokens, l->cfg.max_tokens);
    else if (x < y + nx && y < x + nx)
        rc = moe__set_err(l->err, sizeof l->err, MOE_EINVAL, "forward: x and y overlap");
    long long bad = rc ? -1 : first_nonfinite(x, nx, l->threads);
    if (bad >= 0)
        rc = moe__set_err(l->err, sizeof l->err, MOE_ENONFINITE, "forward: input x[%lld][%lld] is %g", bad / C,
                          bad % C, (double)x[bad]);
    const double t0 = omp_get_wtime();
    l->ms_a2a = 0.0;
    /* under expert parallelism every rank learns here whether all can go on */
    rc = moe__ep_start(l, rc, n_tokens);
    if (rc) return rc;
    l->n = n_tokens;
    memcpy(l->x, x, sizeof(float) * nx);
    rc = moe__router_forward(l, l->x, n_tokens);
    if (rc) return rc;
    const double t1 = omp_get_wtime(), a1 = l->ms_a2a;
    if ((rc = moe__dispatch_build(l, n_tokens))) return rc;
    moe__dispatch_gather(l, l->x);
    if ((rc = moe__ep_plan(l)) || (rc = moe__ep_to_experts(l, l->tx, l->xg))) return rc;
    const double t2 = omp_get_wtime(), a2 = l->ms_a2a;
    moe__experts_forward(l);
    const double t3 = omp_get_wtime();
    if ((rc = moe__ep_to_tokens(l, l->out, l->ty))) return rc;
    moe__dispatch_combine(l, y);
    const double t4 = omp_get_wtime();
    /* the all-to-alls (and the global sums) are reported on their own, out
     * of the phases they sit in */
    l->stats.ms_alltoall = l->ms_a2a;
    l->stats.ms_router = (t1 - t0) * 1e3 - a1;
    l->stats.ms_dispatch = (t2 - t1) * 1e3 - (a2 - a1);
    l->stats.ms_experts = (t3 - t2) * 1e3;
    l->stats.ms_combine = (t4 - t3) * 1e3 - (l->ms_a2a - a2);
    l->have_fwd = 1;
    return MOE_OK;
}

int moe_layer_backward(moe_layer *l, const float *dy, float *dx) {
    if (!l) return MOE_EINVAL;
    l->err[0] = '\0';
    if (!l->have_fwd)
        return moe__set_err(l->err, sizeof l->err, MOE_ESTATE, "backward: no successful forward to differentiate");
    if (!l->grads)
        return moe__set_err(l->err, sizeof l->err, MOE_ESTATE, "backward: layer bound without gradients");
    if (!dy) return moe__set_err(l->err, sizeof l->err, MOE_EINVAL, "backward: dy is NULL");
    const double t0 = omp_get_wtime();
    l->ms_a2a = 0.0;
    moe__dispatch_backward(l, dy);
    int rc = moe__ep_to_experts(l, l->tdy, l->dout);
    if (rc) return rc;
    const double t2 = omp_get_wtime(), a2 = l->ms_a2a;
    moe__experts_backward(l);
    const double t3 = omp_get_wtime();
    /* every rank takes part in the return trip, whether it wants dx or not */
    if ((rc = moe__ep_to_tokens(l, l->dxg, l->tdx))) return rc;
    if (dx) moe__dispatch_scatter_dx(l, dx);
    const double t4 = omp_get_wtime(), a4 = l->ms_a2a;
    moe__router_backward(l, l->x, dx);
    const double t5 = omp_get_wtime();
    /* the mirror of the forward's phases; the all-to-alls on their own */
    l->stats.ms_bwd_alltoall = l->ms_a2a;
    l->stats.ms_bwd_combine = (t2 - t0) * 1e3 - a2;
    l->stats.ms_bwd_experts = (t3 - t2) * 1e3;
    l->stats.ms_bwd_dispatch = (t4 - t3) * 1e3 - (a4 - a2);
    l->stats.ms_bwd_router = (t5 - t4) * 1e3;
    return MOE_OK;
}

double moe_layer_expert_flops(const moe_layer_config *c, int n_tokens) {
    const double m = c->act == MOE_ACT_SWIGLU ? 3.0 : 2.0;
    return 2.0 * n_tokens * c->top_k * m * c->d_model * c->d_ff;
}
