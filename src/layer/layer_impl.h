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

    /* router, [N][E] and [N][K] */
    float *x;                       /* [N][C] copy of the input */
    float *logits, *scores;         /* [N][E] */
    float *lse;                     /* [N] logsumexp of the logits */
    int *topk_ids;                  /* [N][K] */
    float *topk_w;                  /* [N][K] gate weights */
    float *part;                    /* [nchunks][E] per-chunk score sums */
    int *counts;                    /* [E] */
    double *psum;                   /* [E] sum over tokens of q */
    float *daux;                    /* [E] d aux / d q, per token */
    moe_layer_stats stats;

    /* dispatch, R = N*K */
    int *seg_off;                   /* [E+1] */
    int *row_of_slot;               /* [R] slot t*K+j -> sorted row, -1 when dropped */
    int *slot_of_row;               /* [R] sorted row -> slot (first R_kept rows) */
    int *kept;                      /* [E] pairs each expert computes (<= counts) */
    unsigned char *keep;            /* [R] capacity decision per slot */
    int *order;                     /* [R] scratch: slots sorted by expert, pre-drop */
    struct moe__prio { float s; int slot; } *prio; /* [R] scratch: probability policy */
    int training;

    /* experts, sorted rows */
    float *xg;                      /* [R][C] gathered input */
    float *h1, *h3;                 /* [R][F] pre-activations (h3: SwiGLU) */
    float *act;                     /* [R][F] activation, input of w2 */
    float *out;                     /* [R][C] expert outputs, unscaled */

    /* backward work */
    float *dout;                    /* [R][C] gate-scaled dy */
    float *dh1, *dh3;               /* [R][F] */
    float *dxg;                     /* [R][C] */
    float *dgate;                   /* [N][K] */
    float *dlogits;                 /* [N][E] */

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

/* router.c */
int moe__router_forward(moe_layer *l, const float *x, int n);
void moe__router_backward(moe_layer *l, const float *x, float *dx);

/* dispatch.c */
void moe__dispatch_build(moe_layer *l, int n);
void moe__dispatch_gather(moe_layer *l, const float *x);
void moe__dispatch_combine(moe_layer *l, float *y);
void moe__dispatch_backward(moe_layer *l, const float *dy);
void moe__dispatch_scatter_dx(moe_layer *l, float *dx);

/* experts.c */
int moe__experts_max_tiles(const moe_layer_config *cfg);
void moe__experts_forward(moe_layer *l);
void moe__experts_backward(moe_layer *l);

#endif
