/* The MoE layer's state, shared by its modules (router, dispatch, experts).
 *
 * A forward call runs:  router  -> dispatch (counting sort + gather)
 *                       -> experts (grouped GEMMs over segments) -> combine.
 * Backward mirrors it. Rows of the dispatched buffers are "slots" sorted by
 * expert: R = N*K rows, expert e owns rows [seg_off[e], seg_off[e+1]).
 */
#ifndef MOE_LAYER_IMPL_H
#define MOE_LAYER_IMPL_H

#include "internal.h"

/* One tile of a grouped GEMM's output: group (expert) e, output rows
 * [r0, r1) and columns [c0, c1). Tile sizes depend on shapes only, never on
 * the thread count, so BLAS sees the same calls for any number of threads. */
typedef struct moe__tile {
    int op, e, r0, r1, c0, c1;
} moe__tile;

struct moe_layer {
    moe_layer_config cfg;
    moe_layer_params off;
    int threads;
    int k_cap;                      /* buffers hold N*k_cap dispatched rows */
    char err[256];

    float *params, *grads;          /* [total] each; owned or bound */
    float *own_params, *own_grads;

    /* last forward */
    int n;                          /* N */
    int have_fwd;                   /* backward allowed */

    /* router. Slots: the R chosen (token, expert) pairs, grouped by token:
     * token t owns [tok_off[t], tok_off[t+1]). Token-choice routers give every
     * token K slots (tok_off[t] = t K, slot t K + j is its j-th choice);
     * expert choice gives a token 0..E. R <= r_cap. */
    float *x;                       /* [N][C] copy of the input */
    float *logits, *scores;         /* [N][E] clean logits; softmax or sigmoid of them */
    float *lse;                     /* [N] logsumexp of the logits */
    int *tok_off;                   /* [N+1] */
    int *slot_tok;                  /* [R] token of each slot */
    int *topk_ids;                  /* [R] expert of each slot */
    float *topk_w;                  /* [R] gate weight of each slot */
    int n_slots;                    /* R of the last forward */
    int r_cap;                      /* slots the buffers hold */
    float *part;                    /* [nchunks][E+2] per-chunk score sums, entropy, lse^2 */
    int *counts;                    /* [E] slots per expert, before drops */
    double *psum;                   /* [E] sum over tokens of q */
    float *daux;                    /* [E] d aux / d q, per token (whole-call aux) */
    int *blk_counts;                /* [E] scratch: one block's counts */
    float *blk_daux;                /* [max_blocks][E] d aux / d q per block */
    int max_blocks;
    float *dimp;                    /* [E] d importance loss / d gate weight */
    float *ws;                      /* [ws_floats] the router scheme's own work memory */
    size_t ws_floats;
    float *tscr;                    /* [threads][2E] per-thread router scratch */
    int64_t *bias_load;             /* [E] slots per expert since the last bias update */
    uint64_t calls;                 /* training forward calls: the noise stream */
    moe_layer_stats stats;

    /* dispatch */
    int *seg_off;                   /* [E+1] */
    int *row_of_slot;               /* [R] slot -> sorted row, -1 when dropped */
    int *slot_of_row;               /* [R] sorted row -> slot (first R_kept rows) */
    int *kept;                      /* [E] pairs each expert computes (<= counts) */
    unsigned char *keep;            /* [R] 0: dropped (router's random routing, then capacity) */
    int *order;                     /* [R] scratch: slots sorted by expert, pre-drop */
    struct moe__prio { float s; int slot; } *prio; /* [R] scratch: probability policy */
    int training;

    /* experts, sorted rows */
    float *xg;                      /* [R][C] gathered input (R = kept rows) */
    float *h1, *h3;                 /* [R][F] pre-activations (h3: SwiGLU) */
    float *act;                     /* [R][F] activation, input of w2 */
    float *out;                     /* [R][C] expert outputs, unscaled */

    /* backward work */
    float *dout;                    /* [R][C] gate-scaled dy */
    float *dh1, *dh3;               /* [R][F] */
    float *dxg;                     /* [R][C] */
    float *dgate;                   /* [R] d loss / d gate weight of each slot */
    float *dlogits;                 /* [N][E] */

    /* Expert parallelism (dist != NULL): this rank holds experts [e_first,
     * e_first + e_local) and routes its n of the n_glob tokens. The token
     * side (dispatch, combine) works on rows sorted by global expert, tx..tdx
     * [R][C]; the expert side on rows received from every rank, sorted by
     * local expert then source rank, xg..dxg [P R][C] (so an expert's rows
     * are in global token order, as in one process). Single process: tx..tdx
     * alias xg, out, dout, dxg. */
    moe_dist *dist;
    int ep_size, ep_rank, e_first, e_local;
    int tok_base;                   /* global index of the first local token */
    long long n_glob;               /* tokens of the global batch */
    int n_seg;                      /* segments the experts run: E or E_l */
    int *eoff;                      /* [n_seg+1]: seg_off or ep_off */
    int *ep_off;                    /* [E_l+1] local experts' received segments */
    int *ep_cnt;                    /* [P][E_l] rows rank s sends to local expert le */
    int *ep_send, *ep_recv;         /* [P] rows to / from each rank */
    int *ep_ntok;                   /* [P] tokens of each rank */
    int *ep_cur;                    /* [E_l] scratch cursor */
    float *tx, *ty, *tdy, *tdx;     /* [R][C] token-side rows (see above) */
    float *ep_buf;                  /* [P R][C] rows in rank-major order, as MPI moves them */
    double *ep_red;                 /* [2E+4] reduction vector */
    int *ep_before;                 /* [P+1][E] capacity, arrival: kept slots per (rank, expert); a cursor */
    struct moe__ep_cand { float s; int slot, e; } *ep_cand; /* [(P+1) R] capacity, probability:
                                       this rank's kept slots (global slot ids), then every rank's */
    struct moe__ep_cand *ep_thr;    /* [E] the last slot each expert keeps (slot -1: keeps all) */
    double ms_a2a;                  /* all-to-all time of the current call */

    moe__tile *tiles;               /* [max_tiles] */
    float *small_ws;                /* [threads][small_ws_stride] packed A of the small GEMM */
    size_t small_ws_stride;
    int max_tiles;
};

/* Fixed chunk of tokens for per-chunk partial reductions (thread-count
 * independent order), and output tile sizes of the grouped GEMMs. */
#define MOE__CHUNK 256
#ifndef MOE__TILE_M
#define MOE__TILE_M 256
#endif
#ifndef MOE__TILE_N
#define MOE__TILE_N 512
#endif

/* router.c: logits, scores, statistics and the common losses for every
 * scheme; selection for TOPK. */
int moe__router_forward(moe_layer *l, const float *x, int n);
void moe__router_backward(moe_layer *l, const float *x, float *dx);
/* The k largest of v[i * stride], i in [lo, hi), into ids (indices i),
 * decreasing; on equal values the lower index wins. Every router's top-k. */
void moe__topk(const float *v, size_t stride, int lo, int hi, int k, int *ids);
/* Token-choice slot layout for n tokens of K slots (tok_off, slot_tok). */
void moe__slots_token_choice(moe_layer *l, int n, int K);
/* A standard normal draw for (call, token, index), from the layer's seed:
 * counter-based, so the same for any thread count and order. */
float moe__router_normal(const moe_layer *l, int t, int i);
/* A uniform draw in [0, 1) for (call, token, index). */
float moe__router_uniform(const moe_layer *l, int t, int i);

/* Router schemes. select: fill the slots (tok_off, slot_tok, topk_ids,
 * topk_w, keep) of n tokens from l->logits / l->scores, and the scheme's
 * loss statistics. backward: runs after the common pass has written
 * dlogits [N][E] (aux, z-loss and, for score-weighted routers, the gate
 * path); adds the scheme's own gradient to dlogits, its extra parameters'
 * gradients, and (when dx) to dx. ws_floats: work memory for max_tokens. */
/* noisy.c */
size_t moe__noisy_ws_floats(const moe_layer_config *c);
int moe__noisy_select(moe_layer *l, int n);
void moe__noisy_backward(moe_layer *l, const float *x, float *dx);
/* the load loss over the global batch, after the ranks agree (expert parallelism) */
int moe__noisy_ep_load_loss(moe_layer *l, int n);
/* hier.c */
size_t moe__hier_ws_floats(const moe_layer_config *c);
int moe__hier_select(moe_layer *l, int n);
void moe__hier_backward(moe_layer *l, const float *x, float *dx);
/* choice.c: expert choice (weights = softmax scores of the chosen pairs, its
 * gradient taken by the common pass), forced balance, GShard's random
 * second expert (clears keep[] of dropped second slots) */
int moe__ec_capacity(const moe_layer_config *c, int n);
int moe__ec_select(moe_layer *l, int n);
int moe__balanced_select(moe_layer *l, int n);
void moe__gshard_random(moe_layer *l, int n);
/* bias.c: top-k of token t over selection scores s + ebias, within the
 * topk_groups best of n_groups groups when n_groups > 1; writes K ids in
 * decreasing selection-score order (ties: lower id). */
void moe__biased_topk(const moe_layer *l, int t, int *ids, float *scratch /* [2E] */);

/* dispatch.c */
int moe__dispatch_build(moe_layer *l, int n); /* a collective under expert parallelism */
void moe__dispatch_gather(moe_layer *l, const float *x);
void moe__dispatch_combine(moe_layer *l, float *y);
void moe__dispatch_backward(moe_layer *l, const float *dy);
void moe__dispatch_scatter_dx(moe_layer *l, float *dx);

/* ep.c: the collectives of an expert-parallel layer (no-ops without dist) */
int moe__ep_agree(moe_layer *l, int rc);               /* every rank returns an error if one does */
int moe__ep_start(moe_layer *l, int rc, int n);         /* token counts, tok_base, n_glob */
int moe__ep_sum(moe_layer *l, double *v, int n);        /* fixed-order sum over ranks */
int moe__ep_plan(moe_layer *l);                         /* rows per (rank, expert) after dispatch_build */
/* Capacity over the global batch in global token order (rank, then local
 * slot): clears keep[] of this rank's slots that one process would drop. */
int moe__ep_capacity(moe_layer *l, int cap);
/* Expert choice over the global batch: each expert takes the tokens one
 * process would give it; this rank lays out the slots of its tokens. */
int moe__ep_ec_select(moe_layer *l, int n);
int moe__ep_to_experts(moe_layer *l, const float *tok, float *exp);
int moe__ep_to_tokens(moe_layer *l, const float *exp, float *tok);

/* experts.c */
int moe__experts_max_tiles(const moe_layer_config *cfg, int max_rows);
void moe__experts_forward(moe_layer *l);
void moe__experts_backward(moe_layer *l);

#endif
