/*
 * moe: sparse Mixture-of-Experts layers and models in C.
 *
 * One public header. Conventions used everywhere:
 *   - Shape letters: N tokens, C model dim, E experts, K top-k, F expert hidden,
 *     V vocab, L layers. Shapes are written in brackets, row-major, e.g. x [N][C].
 *   - Weights are row-major (out, in): a linear map y = W x has W [out][in].
 *   - Every function that can fail returns an int error code: 0 (MOE_OK) or a
 *     negative MOE_E* value; moe_strerror() names it. Handles keep a message
 *     with the details of the last error (moe_layer_errmsg).
 *   - The library never prints and never exits.
 *   - Gradients accumulate (+=) into the gradient buffers, as in llm.c; zero
 *     them yourself (moe_layer_zero_grad) between optimizer steps.
 */
#ifndef MOE_H
#define MOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_VERSION_MAJOR 0
#define MOE_VERSION_MINOR 1
#define MOE_VERSION_PATCH 0
const char *moe_version(void);

/* ---- errors ------------------------------------------------------------ */

/* X(name, value, description): the single table of error codes. */
#define MOE_ERRNO_MAP(X)                                                        \
    X(INVAL, -1, "invalid argument")                                            \
    X(NOMEM, -2, "out of memory")                                               \
    X(SHAPE, -3, "shape mismatch")                                              \
    X(NONFINITE, -4, "non-finite value (NaN or Inf)")                           \
    X(STATE, -5, "call out of order")                                           \
    X(IO, -6, "input/output error")                                             \
    X(FORMAT, -7, "malformed file")                                             \
    X(LIMIT, -8, "limit exceeded")                                              \
    X(UNSUPPORTED, -9, "unsupported feature")                                   \
    X(NOTFOUND, -10, "not found")

typedef enum moe_errno {
    MOE_OK = 0,
#define MOE__ERR_ENUM(name, value, desc) MOE_E##name = value,
    MOE_ERRNO_MAP(MOE__ERR_ENUM)
#undef MOE__ERR_ENUM
} moe_errno;

/* Static description of an error code; never NULL. */
const char *moe_strerror(int err);
/* Symbolic name of an error code, e.g. "MOE_ESHAPE"; never NULL. */
const char *moe_err_name(int err);

/* ---- allocator ----------------------------------------------------------- */

/* Every allocation the library makes goes through these hooks (default: the C
 * library's malloc/free). Set them before creating any object; objects must be
 * freed with the hooks they were made with. alloc returns NULL on failure. */
typedef struct moe_allocator {
    void *(*alloc)(size_t size, void *ctx);
    void (*free)(void *ptr, void *ctx);
    void *ctx;
} moe_allocator;
void moe_set_allocator(const moe_allocator *a); /* NULL restores the default */
/* Number of successful allocations made through the hooks since start-up. */
uint64_t moe_alloc_count(void);

/* ---- threads ------------------------------------------------------------- */

/* Default number of threads for new objects (0 = OpenMP's default). All
 * parallelism is OpenMP; BLAS is driven single-threaded inside it, so results
 * are bit-identical for any thread count. */
void moe_set_num_threads(int n);
int moe_get_num_threads(void);

/* The OpenBLAS kernel in use (e.g. "Haswell", "SkylakeX"). */
const char *moe_blas_info(void);
/* A faster OPENBLAS_CORETYPE for this CPU than the one OpenBLAS chose, or NULL.
 * OpenBLAS reads that variable only when it is loaded: set it in the
 * environment before the program starts (the moe CLI re-executes itself once
 * with it). Returns NULL when OPENBLAS_CORETYPE is already set. */
const char *moe_blas_coretype_hint(void);

/* ---- the MoE layer ------------------------------------------------------- */

typedef enum moe_act {
    MOE_ACT_RELU = 0,   /* y = W2 relu(W1 x)                          */
    MOE_ACT_GELU = 1,   /* y = W2 gelu(W1 x), tanh approximation      */
    MOE_ACT_SWIGLU = 2, /* y = W2 (silu(W1 x) * (W3 x)), as Mixtral  */
} moe_act;

typedef enum moe_score {
    MOE_SCORE_SOFTMAX = 0, /* s = softmax(logits) over all E experts    */
    MOE_SCORE_SIGMOID = 1, /* s = sigmoid(logits), per expert           */
} moe_score;

/* Layer configuration. Zero-initialise, set what you need, then call
 * moe_layer_config_default() for the rest, or start from it. */
typedef struct moe_layer_config {
    int d_model;      /* C */
    int d_ff;         /* F: hidden size of one expert */
    int n_experts;    /* E >= 1 */
    int top_k;        /* K, 1 <= K <= E */
    int max_tokens;   /* largest N a forward call may take; sizes work buffers */
    moe_act act;      /* default MOE_ACT_SWIGLU */
    moe_score score;  /* default MOE_SCORE_SOFTMAX */
    int renormalize;  /* 1: gate weights renormalised over the K chosen (Mixtral);
                         0: raw scores (Switch, Qwen1.5-MoE, OLMoE). default 1 */
    float route_scale;/* gate weights multiplied by this (DeepSeek-V3 2.5). default 1 */
    float aux_coef;   /* load-balancing loss coefficient alpha. default 0.01 */
    float z_coef;     /* router z-loss coefficient. default 0.001 */
    int n_threads;    /* 0: moe_get_num_threads() */
} moe_layer_config;

/* Fills defaults for fields left zero (act/score keep their values, being
 * valid zero enums; renormalize is set to 1 only when route_scale is 0, i.e.
 * on a fully zeroed struct). */
moe_layer_config moe_layer_config_default(int d_model, int d_ff, int n_experts,
                                          int top_k, int max_tokens);

/* Parameter layout in one flat float array (offsets from moe_layer_param_offsets):
 *   wg [E][C]     router
 *   w1 [E][F][C]  expert up projection (SwiGLU: the gate branch, HF w1)
 *   w2 [E][C][F]  expert down projection (HF w2)
 *   w3 [E][F][C]  SwiGLU only: the linear branch (HF w3); absent otherwise
 * Each expert's slice of w1, w2, w3 is contiguous. Gradients use the same layout. */
typedef struct moe_layer_params {
    size_t wg, w1, w2, w3; /* offsets in floats; w3 == SIZE_MAX when absent */
    size_t total;          /* number of floats */
} moe_layer_params;

/* Statistics of the last forward call. */
typedef struct moe_layer_stats {
    int n_tokens;           /* N */
    const int *expert_count;/* [E] tokens routed to each expert (all K slots) */
    float load_cv;          /* std/mean of expert_count (population std) */
    float load_max_over_mean;
    float router_entropy;   /* mean over tokens of the entropy (nats) of the
                               normalised scores */
    float aux_loss;         /* aux_coef * E * sum_i f_i P_i, f_i = count_i/(N K) */
    float z_loss;           /* z_coef * mean_t logsumexp(logits_t)^2 */
} moe_layer_stats;

typedef struct moe_layer moe_layer;

/* Creates a layer and sizes all its work buffers for cfg->max_tokens. The layer
 * owns its parameter and gradient arrays unless moe_layer_bind() points it at
 * external ones. On failure returns NULL and, when err is not NULL, stores the
 * code in *err; errbuf (when not NULL) receives a message. */
moe_layer *moe_layer_create(const moe_layer_config *cfg, int *err,
                            char *errbuf, size_t errbuf_size);
void moe_layer_free(moe_layer *l);

const moe_layer_config *moe_layer_get_config(const moe_layer *l);
moe_layer_params moe_layer_param_offsets(const moe_layer *l);
float *moe_layer_params_ptr(moe_layer *l); /* [total] */
float *moe_layer_grads_ptr(moe_layer *l);  /* [total] */

/* Use external parameter and gradient arrays of moe_layer_param_offsets().total
 * floats each (e.g. slices of a model's arena). grads may be NULL for
 * inference-only use (backward then fails with MOE_ESTATE). */
int moe_layer_bind(moe_layer *l, float *params, float *grads);

/* Initialisation: router and expert weights ~ N(0, std^2) with std =
 * init_scale/sqrt(fan_in), deterministic in seed. */
int moe_layer_init(moe_layer *l, uint64_t seed, float init_scale);
void moe_layer_zero_grad(moe_layer *l);

/* y [N][C] = MoE(x [N][C]). x and y must not overlap. Keeps what backward
 * needs (x is copied). Fails with MOE_ESHAPE if N > max_tokens or N < 0 and
 * MOE_ENONFINITE if x or the router logits hold NaN/Inf. */
int moe_layer_forward(moe_layer *l, const float *x, int n_tokens, float *y);

/* Given dy [N][C] for the last forward's output, writes dx [N][C] (dx is
 * overwritten, not accumulated) and accumulates parameter gradients, including
 * those of the auxiliary losses (which are part of the objective with their
 * coefficients). dx may be NULL when not needed. */
int moe_layer_backward(moe_layer *l, const float *dy, float *dx);

const moe_layer_stats *moe_layer_get_stats(const moe_layer *l);
/* Routing of the last forward: for token t, slot j in [0,K): expert id and gate
 * weight, both [N][K]. Slots are in decreasing score order. */
const int *moe_layer_topk_ids(const moe_layer *l);
const float *moe_layer_topk_weights(const moe_layer *l);

/* Message for the last error on this handle ("" when none). */
const char *moe_layer_errmsg(const moe_layer *l);

/* FLOPs of the expert computation for N tokens (active experts only):
 * forward 2*N*K*m*C*F with m = 3 for SwiGLU, 2 otherwise. */
double moe_layer_expert_flops(const moe_layer_config *cfg, int n_tokens);

#ifdef __cplusplus
}
#endif
#endif /* MOE_H */
