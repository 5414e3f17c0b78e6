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
 * freed with the hooks they were made with. alloc returns NULL on failure.
 * moe_set_allocator also points cJSON's process-wide hooks (cJSON_InitHooks)
 * at these, so the JSON parsers' trees are counted and can fail like the rest;
 * free cJSON output with cJSON_free, not free(), once a custom allocator is set. */
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
void moe_set_num_threads(int n); /* capped at moe_max_threads() */
int moe_get_num_threads(void);
/* The most threads an object may use: 4 per online CPU. Constructors given
 * more return MOE_EINVAL. */
int moe_max_threads(void);

/* The engine's kernel set in this build, in words (moe info --system). */
const char *moe_kernel_set(void);
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
/* What happens to (token, expert) pairs beyond an expert's capacity. */
typedef enum moe_drop_policy {
    MOE_DROP_ARRIVAL = 0,     /* keep the first pairs in token order (Switch, GShard) */
    MOE_DROP_PROBABILITY = 1, /* keep the pairs with the highest router probability
                                 (ties: the earlier pair); "batch prioritized" routing */
} moe_drop_policy;

/* How tokens and experts are matched (docs/routing.md). */
typedef enum moe_router_type {
    MOE_ROUTER_TOPK = 0,          /* token choice: each token takes its top-k experts by
                                     score (default). Switch = top-1 with capacity;
                                     DeepSeek-V3 = sigmoid scores + bias_update_rate (+ groups) */
    MOE_ROUTER_NOISY_TOPK = 1,    /* Shazeer et al. 2017: H = x Wg + N(0,1) softplus(x Wnoise)
                                     in training; weights = softmax over the k kept H */
    MOE_ROUTER_EXPERT_CHOICE = 2, /* Zhou et al. 2022: each expert takes its top
                                     ceil(capacity_factor N K / E) tokens (factor 1 when 0).
                                     Non-causal: training and encoders only */
    MOE_ROUTER_HIERARCHICAL = 3,  /* Shazeer et al. 2017 app. B: a noisy primary gate picks
                                     topk_groups of n_groups groups, a noisy secondary gate per
                                     group picks top_k/topk_groups experts in each */
    MOE_ROUTER_BALANCED = 4,      /* debug/benchmarks: slot j of token t goes to expert
                                     (t K + j) mod E with weight 1/K; the router gets no gradient */
} moe_router_type;

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
    int max_top_k;    /* largest k moe_layer_set_top_k may set later (sizes the
                         buffers); 0: top_k */
    float capacity_factor; /* > 0: each expert takes at most
                              capacity = ceil(capacity_factor * N * K / E) pairs per
                              call in training; the others are dropped (their token
                              gets nothing from that expert: in a model, the
                              residual carries it). 0 (default): dropless. */
    moe_drop_policy drop_policy;

    /* ---- routing schemes (docs/routing.md); all zero = plain softmax top-k ---- */
    moe_router_type router;
    int gshard_random;      /* TOPK with top_k == 2: in training, keep the second expert
                               with probability min(1, 2 g2), g2 its normalised weight
                               (GShard); a dropped slot costs no capacity */
    float importance_coef;  /* Shazeer's importance loss w CV(sum_x G(x))^2, any token-choice
                               router (G = gate weights); population CV */
    float load_coef;        /* Shazeer's load loss w CV(sum_x P(x, i))^2 with the smooth
                               normal-CDF load estimator; NOISY_TOPK and HIERARCHICAL only */
    float bias_update_rate; /* gamma > 0: auxiliary-loss-free balancing (DeepSeek-V3). A
                               per-expert bias (parameter block ebias, never trained by
                               gradients) is added to the scores for selection only;
                               moe_layer_update_bias() moves it by gamma sign(mean - load_i) */
    int n_groups;           /* TOPK: group-limited routing when > 1 (DeepSeek-V3: groups
                               ranked by the sum of their top-2 selection scores); and the
                               groups of HIERARCHICAL. E % n_groups == 0 */
    int topk_groups;        /* groups kept per token (TOPK with n_groups > 1: top_k experts
                               are picked inside them; HIERARCHICAL: the primary gate's k,
                               top_k % topk_groups == 0) */
    int aux_seq_len;        /* > 0: the aux loss is taken per block of aux_seq_len
                               consecutive tokens and averaged over blocks (DeepSeek-V3's
                               sequence-wise balance loss); 0: over the whole call */
    uint64_t seed;          /* routing noise and random routing (training only); fixed
                               seed, a fresh draw per forward call */
} moe_layer_config;

/* Fills defaults for fields left zero (act/score keep their values, being
 * valid zero enums; renormalize is set to 1 only when route_scale is 0, i.e.
 * on a fully zeroed struct). */
moe_layer_config moe_layer_config_default(int d_model, int d_ff, int n_experts,
                                          int top_k, int max_tokens);

/* Parameter layout in one flat float array (offsets from moe_layer_param_offsets):
 *   wg [E][C]        router
 *   w1 [E][F][C]     expert up projection (SwiGLU: the gate branch, HF w1)
 *   w2 [E][C][F]     expert down projection (HF w2)
 *   w3 [E][F][C]     SwiGLU only: the linear branch (HF w3)
 *   wnoise [E][C]    NOISY_TOPK, HIERARCHICAL: noise scale of each expert's logit
 *   wgroup [G][C]    HIERARCHICAL: primary gate over the G = n_groups groups
 *   wgroup_noise [G][C] HIERARCHICAL: its noise scale
 *   ebias [E]        bias_update_rate > 0: selection bias (gradient always 0)
 * Absent blocks have offset SIZE_MAX. Each expert's slice of w1, w2, w3 is
 * contiguous. Gradients use the same layout. */
typedef struct moe_layer_params {
    size_t wg, w1, w2, w3; /* offsets in floats */
    size_t wnoise, wgroup, wgroup_noise, ebias;
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
    float aux_loss;         /* aux_coef * E * sum_i f_i P_i, f_i = count_i/(N K),
                               counted before capacity drops (as Switch/GShard) */
    float dropped_fraction; /* pairs dropped by the capacity limit / (N K) */
    /* wall time of the last forward's phases, milliseconds: router (logits,
     * scores, top-k, losses), dispatch (sort + gather), experts (grouped
     * GEMMs + activations), combine */
    double ms_router, ms_dispatch, ms_experts, ms_combine;
    int capacity;           /* per-expert capacity of the call (tokens per expert for
                               expert choice), 0 when dropless */
    float z_loss;           /* z_coef * mean_t logsumexp(logits_t)^2 */
    float importance_loss;  /* importance_coef * CV(importance)^2 */
    float load_loss;        /* load_coef * CV(smooth load)^2 */
    float importance_cv;    /* CV over experts of sum_t (gate weight of t for e) */
    int n_slots;            /* (token, expert) pairs chosen, N K for token choice */
    double ms_alltoall;     /* expert parallelism: the forward's all-to-alls (0 otherwise) */
    /* wall time of the last backward's phases, milliseconds, mirroring the
     * forward's: combine (gate-scaled dy rows, gate gradients), experts,
     * dispatch (dx rows back to tokens), router; the all-to-alls of dy and dx
     * rows on their own (expert parallelism, 0 otherwise) */
    double ms_bwd_combine, ms_bwd_experts, ms_bwd_dispatch, ms_bwd_router, ms_bwd_alltoall;
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
/* Training mode (default 1) applies the capacity limit; evaluation (0) never
 * drops tokens. */
void moe_layer_set_training(moe_layer *l, int training);
/* Changes k for the next calls (e.g. more or fewer experts at inference);
 * 1 <= k <= max(top_k at creation, max_top_k), and k must fit the groups
 * (group-limited: k experts in the kept groups; hierarchical: a multiple of
 * topk_groups, at most a group per kept group). */
int moe_layer_set_top_k(moe_layer *l, int k);
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
 * weight, both [N][K]. Slots are in decreasing score order. Token-choice
 * routers only (expert choice gives tokens a varying number of experts: use
 * moe_layer_routing). */
const int *moe_layer_topk_ids(const moe_layer *l);
const float *moe_layer_topk_weights(const moe_layer *l);
/* Routing of the last forward for any router: token t owns slots
 * [tok_off[t], tok_off[t+1]) (tok_off [N+1]); ids and weights [R] give each
 * slot's expert and gate weight; kept [R] is 0 for slots dropped by the
 * capacity limit or random routing. Returns R, the number of slots. */
int moe_layer_routing(const moe_layer *l, const int **tok_off, const int **ids, const float **weights,
                      const unsigned char **kept);
/* Aux-loss-free balancing: moves ebias by bias_update_rate * sign(mean load -
 * load_i), loads summed over the training forward calls since the last update
 * (call it after each optimizer step). A no-op without bias_update_rate. */
int moe_layer_update_bias(moe_layer *l);
/* Position of the routing random stream (noise, random routing): draws come
 * from (seed, counter, token), and each training forward advances the counter
 * by one. Set it to make a resumed run draw what the uninterrupted one did. */
void moe_layer_set_rng_counter(moe_layer *l, uint64_t counter);
/* Block length of the sequence-wise aux loss (e.g. the batch's T); the layer
 * must have been created with aux_seq_len > 0, and max_tokens / seq_len blocks
 * must fit the buffers sized at creation (any seq_len >= the creation value). */
int moe_layer_set_aux_seq_len(moe_layer *l, int seq_len);

/* Message for the last error on this handle ("" when none). */
const char *moe_layer_errmsg(const moe_layer *l);

/* FLOPs of the expert computation for N tokens (active experts only):
 * forward 2*N*K*m*C*F with m = 3 for SwiGLU, 2 otherwise. */
double moe_layer_expert_flops(const moe_layer_config *cfg, int n_tokens);

/* ---- expert parallelism (MPI) ------------------------------------------- */
/* The experts of a layer split over the P processes of a communicator (E % P
 * == 0; rank r holds the global ids [r E/P, (r+1) E/P)); each process routes
 * its own tokens with a replicated gate, and tokens travel to their experts'
 * ranks by all-to-all (docs/distributed.md). Built on MPI with `make MPI=1`;
 * without it moe_dist_world() gives a single process (P = 1). */
typedef struct moe_dist moe_dist;
/* The world communicator (initialises MPI when the program has not). */
moe_dist *moe_dist_world(int *err, char *errbuf, size_t errbuf_size);
void moe_dist_free(moe_dist *d); /* finalises MPI when moe_dist_world initialised it */
int moe_dist_rank(const moe_dist *d);
int moe_dist_size(const moe_dist *d);
int moe_dist_is_mpi(void); /* 1 when the library was built with MPI */
const char *moe_dist_errmsg(const moe_dist *d);
/* A layer holding the experts of its rank only: moe_layer_param_offsets()
 * then has w1, w2, w3 of E/P experts (local index e - first); the router (wg,
 * wnoise, ebias) is replicated. Every rank must call forward and backward
 * together (any token count, zero included). Statistics, aux/z/importance
 * losses and bias loads are those of the global batch on every rank; the
 * router's gradients are this rank's share (sum them over ranks). Supports
 * TOPK (softmax or sigmoid, groups, bias, GShard's random routing) and
 * NOISY_TOPK without load_coef, dropless; others: MOE_EUNSUPPORTED.
 * moe_layer_init draws the same values as the single-process layer. */
moe_layer *moe_layer_create_ep(const moe_layer_config *cfg, moe_dist *d, int *err, char *errbuf,
                               size_t errbuf_size);
/* Global id of the first local expert and their number (0 and E without EP). */
void moe_layer_expert_range(const moe_layer *l, int *first, int *count);
/* The communicator of the models created (or loaded) after this call (NULL,
 * the default: one process). Such a model holds E/P experts of each MoE layer
 * (tensor names keep global ids), takes this rank's share of the global batch
 * in forward (the loss and its gradient are those of the global batch), and
 * moe_model_save / moe_trainer_save write one file set from rank 0 that any
 * number of ranks can load. Every rank calls forward, backward, the trainer
 * and save together. */
void moe_set_dist(moe_dist *d);
moe_dist *moe_get_dist(void);
/* 1 on every rank when flag is set on any (a collective; flag without d). */
int moe_dist_any(moe_dist *d, int flag);

/* ---- the language model -------------------------------------------------- */

#define MOE_MAX_LAYERS 256

/* Configuration of a decoder-only MoE transformer (docs/model.md). Field names
 * follow the Hugging Face Mixtral config.json keys. */
typedef struct moe_model_config {
    int vocab_size;              /* V */
    int hidden_size;             /* C */
    int intermediate_size;       /* F: one expert's hidden size */
    int num_hidden_layers;       /* L */
    int num_attention_heads;     /* H */
    int num_key_value_heads;     /* G, H % G == 0 */
    int head_dim;                /* D */
    int max_position_embeddings; /* context length */
    float rope_theta;
    float rms_norm_eps;
    int tie_word_embeddings;
    int num_local_experts;       /* E; 0 = dense model */
    int num_experts_per_tok;     /* K */
    int norm_topk_prob;
    moe_score scoring_func;
    float routed_scaling_factor;
    float router_aux_loss_coef;
    float router_z_loss_coef;
    float capacity_factor;       /* 0: dropless (default); see moe_layer_config */
    moe_drop_policy drop_policy;
    unsigned char is_moe_layer[MOE_MAX_LAYERS];
    int dense_intermediate_size; /* FFN size of the non-MoE layers */
    int n_shared_experts;
    int shared_expert_intermediate_size;
    int shared_expert_gate;      /* Qwen2-MoE: shared output scaled by sigmoid(x w), w [1][C] */
    float initializer_range;
    /* routing schemes (see moe_layer_config and docs/routing.md) */
    moe_router_type router_type; /* "router_type": "topk" (default), "noisy_topk",
                                    "expert_choice", "hierarchical", "balanced" */
    int gshard_random;
    float router_importance_loss_coef, router_load_loss_coef;
    float router_bias_update_rate; /* aux-loss-free balancing gamma (DeepSeek-V3: 1e-3) */
    int n_group, topk_group;     /* DeepSeek-V3 keys: group-limited routing; hierarchical groups */
    int seq_aux;                 /* DeepSeek key: the aux loss per sequence, not per batch */
    uint64_t router_seed;        /* routing noise / random routing (layer i uses seed + i) */
} moe_model_config;

/* Defaults of docs/model.md for the fields a JSON file may omit. */
void moe_model_config_defaults(moe_model_config *c);
/* Reads config.json (hostile input: checked types and ranges; the message
 * names the file and the key). Missing keys take the defaults. */
int moe_model_config_load(const char *path, moe_model_config *c, char *err, size_t errsz);
int moe_model_config_parse(const char *json, size_t len, const char *name, moe_model_config *c, char *err,
                           size_t errsz);
/* Checks ranges and consistency (also done by load/parse). */
int moe_model_config_check(const moe_model_config *c, char *err, size_t errsz);
/* JSON text of the config (caller frees with free()); NULL when out of memory. */
char *moe_model_config_to_json(const moe_model_config *c);
int moe_model_config_save(const moe_model_config *c, const char *path, char *err, size_t errsz);
int moe_model_n_moe_layers(const moe_model_config *c);
/* Named configurations: "tiny", "tiny-dense", "small" (16 experts top-2 + 1
 * shared), "small-dense", "small-mixtral" (8 experts top-2) (the
 * dense ones match their MoE twin's active parameters per token). The vocab
 * size is left at 4096; callers set it from their tokenizer. */
int moe_model_preset(const char *name, moe_model_config *c);
/* Names of the presets, NULL-terminated. */
const char *const *moe_model_preset_names(void);

/* Parameter counts and costs, for model cards. Active parameters are those a
 * token touches: all but the experts it is not routed to (embeddings counted
 * once when tied; the input embedding is a lookup, counted in total but not in
 * the FLOPs). flops_per_token: forward matmul FLOPs per token at context ctx
 * (attention scores over ctx/2 positions on average), 2 per multiply-add. */
typedef struct moe_model_costs {
    double total_params, active_params, expert_params, embedding_params;
    double flops_per_token;
    double weight_bytes_f32;
} moe_model_costs;
moe_model_costs moe_model_config_costs(const moe_model_config *c, int n_ctx);

/* One parameter tensor of a model: a named view into the flat arena. */
typedef struct moe_param_info {
    char name[96];
    int ndim;
    int64_t shape[3];
    size_t offset, numel; /* in floats, into moe_model_params() */
    int decay;            /* AdamW weight decay applies (matrices) */
} moe_param_info;

typedef struct moe_model moe_model;

/* Creates a model able to run batches of up to max_batch sequences of up to
 * max_seq tokens (max_seq <= max_position_embeddings); all activation and
 * work memory is sized here. want_grads = 0 for inference only. */
moe_model *moe_model_create(const moe_model_config *cfg, int max_batch, int max_seq, int want_grads,
                            int n_threads, int *err, char *errbuf, size_t errbuf_size);
void moe_model_free(moe_model *m);
const moe_model_config *moe_model_get_config(const moe_model *m);
const char *moe_model_errmsg(const moe_model *m);

/* Parameters: one flat arena (and one of gradients, same layout). */
size_t moe_model_n_params(const moe_model *m);
float *moe_model_params(moe_model *m);
float *moe_model_grads(moe_model *m); /* NULL without gradients */
int moe_model_n_tensors(const moe_model *m);
const moe_param_info *moe_model_tensor(const moe_model *m, int i);
const moe_param_info *moe_model_find_tensor(const moe_model *m, const char *name);
int moe_model_init(moe_model *m, uint64_t seed);
void moe_model_zero_grad(moe_model *m);

/* tokens [B][T]; targets [B][T] or NULL (logits only). On success *loss (when
 * targets) = mean cross-entropy + the routers' aux losses, and ce/aux are
 * available from moe_model_last_losses. Tokens are checked against the vocab. */
int moe_model_forward(moe_model *m, const int32_t *tokens, const int32_t *targets, int B, int T, float *loss);
/* Gradients of the last forward's loss (it must have had targets); accumulate. */
int moe_model_backward(moe_model *m);
const float *moe_model_logits(const moe_model *m); /* [B][T][V] of the last forward */
void moe_model_last_losses(const moe_model *m, float *ce, float *aux);
/* Routing statistics of the last forward, one per MoE layer (NULL for dense layers). */
const moe_layer_stats *moe_model_layer_stats(const moe_model *m, int layer);
/* Routing of MoE layer `layer` in the last forward or decode step (see
 * moe_layer_routing; a decode step is one token). Returns R, the number of
 * slots, or MOE_EINVAL for a dense layer or a bad index. */
int moe_model_layer_routing(const moe_model *m, int layer, const int **tok_off, const int **ids, const float **weights,
                            const unsigned char **kept);
/* Cross-entropy of each token [B*T] of the last forward with targets (nats);
 * NULL when the last call had no targets or was a decode step. */
const float *moe_model_token_losses(const moe_model *m);
/* Training mode of every MoE layer (capacity drops only in training). */
void moe_model_set_training(moe_model *m, int training);
/* Override k at inference (1..E); 0 restores the configured value. */
int moe_model_set_experts_used(moe_model *m, int k);
/* Aux-loss-free balancing: moe_layer_update_bias on every MoE layer (the
 * trainer calls it after each optimizer step). */
int moe_model_update_bias(moe_model *m);
/* moe_layer_set_rng_counter on every MoE layer. */
void moe_model_set_rng_counter(moe_model *m, uint64_t counter);
/* Name of a router type ("topk", ...) and back; -1 when unknown. */
const char *moe_router_name(moe_router_type r);
int moe_router_from_name(const char *name);

/* Incremental decoding with a KV cache: resets the cache, then feeds tokens
 * one position at a time; logits [V] of the position just fed. Both fail with
 * MOE_EUNSUPPORTED for expert-choice routing (non-causal: a token's experts
 * depend on the tokens after it). */
int moe_model_decode_reset(moe_model *m);
int moe_model_decode(moe_model *m, int32_t token, const float **logits);

/* Model directories (docs/model.md): config.json + model.safetensors (Hugging
 * Face names, F32), replaced together atomically (docs/robustness.md). */
int moe_model_save(const moe_model *m, const char *dir, char *err, size_t errsz);
/* Loads config.json and model.safetensors from dir (hostile input: every
 * tensor's name, dtype and shape checked; F16/BF16 converted; NaN/Inf
 * weights fail with MOE_ENONFINITE naming the tensor). */
int moe_model_load(const char *dir, int max_batch, int max_seq, int want_grads, int n_threads, moe_model **out,
                   char *err, size_t errsz);

/* ---- optimiser -------------------------------------------------------------- */

typedef struct moe_adamw_config {
    float lr;           /* peak learning rate (default 3e-3) */
    float min_lr;       /* end of the cosine (default lr / 10) */
    float beta1, beta2; /* default 0.9, 0.95 */
    float eps;          /* default 1e-8 */
    float weight_decay; /* default 0.1, matrices only */
    float grad_clip;    /* global L2 norm; 0 = off (default 1.0) */
    int warmup_steps;   /* linear warm-up from 0 (default 0) */
    int max_steps;      /* end of the cosine; 0 = constant lr after warm-up */
} moe_adamw_config;

moe_adamw_config moe_adamw_config_default(void);
/* Learning rate at step (0-based): linear warm-up, then cosine to min_lr. */
float moe_adamw_lr(const moe_adamw_config *c, int step);

typedef struct moe_adamw moe_adamw;
moe_adamw *moe_adamw_create(size_t n_params, const moe_adamw_config *c, int n_threads, int *err);
void moe_adamw_free(moe_adamw *o);
/* One update of params from grads (clipped first; the global norm before
 * clipping goes to *grad_norm); the tensor table says which ranges decay.
 * Bit-identical for any thread count, and equal in formula to
 * torch.optim.AdamW + clip_grad_norm_. Returns MOE_ENONFINITE (and updates
 * nothing) when the gradient norm is not finite. */
int moe_adamw_step(moe_adamw *o, float *params, float *grads, const moe_param_info *tensors, int n_tensors,
                   float *grad_norm);
int moe_adamw_get_step(const moe_adamw *o);
/* The state arrays [n_params] (for checkpoints) and the step counter. */
float *moe_adamw_m(moe_adamw *o);
float *moe_adamw_v(moe_adamw *o);
void moe_adamw_set_step(moe_adamw *o, int step);

/* ---- training -------------------------------------------------------------- */

/* What a step does when its loss, gradients or weights hold NaN/Inf
 * (docs/robustness.md). Either way parameters and optimizer state are left
 * as they were before the step. */
typedef enum moe_nan_policy {
    MOE_NAN_ERROR = 0, /* the step fails with MOE_ENONFINITE; the message names
                          the layer and tensor (default) */
    MOE_NAN_SKIP = 1,  /* the update is skipped and counted (step info); after
                          MOE_MAX_CONSECUTIVE_SKIPS skips in a row it fails */
} moe_nan_policy;
#define MOE_MAX_CONSECUTIVE_SKIPS 10

typedef struct moe_train_config {
    int batch;          /* B sequences per micro-batch */
    int seq;            /* T tokens per sequence */
    int grad_accum;     /* micro-batches per optimizer step (default 1) */
    int eval_batches;   /* micro-batches of validation per evaluation */
    uint64_t seed;      /* data sampling (and init, done by the caller) */
    int n_threads;
    moe_adamw_config opt;
    moe_nan_policy nan_policy;
    float spike_factor; /* a step's loss above spike_factor x the running mean
                           (EMA, decay 0.98, after 20 steps) is a spike, reported
                           in the step info. 0: default 2; < 0: off */
} moe_train_config;

typedef struct moe_train_step_info {
    int step;                /* optimizer steps done after this one */
    float loss, ce, aux;     /* means over the step's micro-batches */
    float lr, grad_norm;
    double tokens;           /* tokens seen so far */
    double step_seconds;
    int skipped;             /* 1: non-finite, the update was skipped (MOE_NAN_SKIP);
                                moe_trainer_errmsg says where */
    int spike;               /* 1: loss > spike_factor x loss_ema */
    float loss_ema;          /* running mean of the loss before this step */
    int n_skipped, n_spikes; /* totals over the run (kept by checkpoints) */
} moe_train_step_info;

typedef struct moe_trainer moe_trainer;
/* The trainer samples windows of seq+1 tokens from train uniformly at random
 * (seeded) and evaluates on fixed, evenly spaced windows of val. The token
 * arrays must outlive the trainer. */
moe_trainer *moe_trainer_create(moe_model *m, const moe_train_config *tc, const int32_t *train, size_t n_train,
                                const int32_t *val, size_t n_val, int *err, char *errbuf, size_t errsz);
void moe_trainer_free(moe_trainer *t);
int moe_trainer_step(moe_trainer *t, moe_train_step_info *info);
/* Mean validation cross-entropy (nats/token) over the fixed windows. */
int moe_trainer_eval(moe_trainer *t, float *val_loss);
const char *moe_trainer_errmsg(const moe_trainer *t);
/* Saves the model (config.json, model.safetensors) and the optimizer/sampler
 * state (optimizer.safetensors) into dir as one checkpoint: a crash at any
 * point leaves the previous checkpoint or this one, never a mix
 * (docs/robustness.md); load_state restores the state from a directory
 * written by save, for a bit-exact resume. */
int moe_trainer_save(moe_trainer *t, const char *dir, char *err, size_t errsz);
int moe_trainer_load_state(moe_trainer *t, const char *dir, char *err, size_t errsz);
int moe_trainer_get_step(const moe_trainer *t);
/* Resizes the learning-rate schedule (e.g. once a time budget's step count
 * is known from the measured speed). */
void moe_trainer_set_schedule(moe_trainer *t, int max_steps, int warmup_steps);

/* ---- inference on GGUF MoE models (docs/inference.md) ---------------------- */

/* Architectures: Mixtral (GGUF arch "llama" with experts), "qwen2moe",
 * "olmoe"; weights F32, F16, BF16, Q8_0, Q4_0 (llama.cpp's conventions). */
typedef struct moe_engine_params {
    int n_ctx;        /* KV cache positions (0: the model's context length, at most 4096) */
    int n_batch;      /* tokens per forward pass; longer inputs are split (0: 512) */
    int n_threads;    /* 0: the library default */
    int experts_used; /* k, experts per token (0: the file's expert_used_count) */
    int use_mmap;     /* 1: map the file (experts never routed to are never read); 0: read it */
    int kv_f16_k, kv_f16_v; /* 1 (default): K / V cached as fp16, llama.cpp's -ctk/-ctv f16; 0: F32 */
    int repack;       /* 1 (default): Q8_0/Q4_0 matrices copied at their first use into the kernels'
                         tile layout, in huge pages (the file's pages are then dropped); 2: float
                         matrices of a mapped file too, as they are (faster decode, but the first
                         use copies the whole model); 0: everything read in place */
} moe_engine_params;
moe_engine_params moe_engine_params_default(void);

typedef struct moe_engine_hparams {
    char arch[16];
    int n_vocab, n_embd, n_layer, n_head, n_head_kv, head_dim, n_rot;
    int n_expert, n_expert_used, n_ff_exp, n_ff_shexp; /* n_ff_shexp 0: no shared expert */
    int n_ctx_train, n_ctx;                            /* n_ctx: the engine's cache */
    float rms_eps, rope_base;
    int tied_output;          /* no output.weight: the token embedding is the LM head */
    uint32_t expert_type;     /* ggml type code of the expert weights */
} moe_engine_hparams;

typedef struct moe_engine moe_engine;
/* Loads a GGUF model (hostile input: every key, tensor name, type and shape is
 * checked; the message names the file and the tensor). p NULL: defaults. */
int moe_engine_load(const char *path, const moe_engine_params *p, moe_engine **out, char *err, size_t errsz);
void moe_engine_free(moe_engine *e);
const moe_engine_hparams *moe_engine_get_hparams(const moe_engine *e);
const char *moe_engine_errmsg(const moe_engine *e);
/* Overrides k (1..n_expert); 0 restores the file's value. */
int moe_engine_set_experts_used(moe_engine *e, int k);
/* Runs tokens [n] at positions n_past .. n_past+n-1 and appends them to the
 * KV cache. logits: [n][V] when all_logits, else [V] of the last token; may
 * be NULL. The batch's experts run once each over the tokens routed to them;
 * a token's logits are bit-identical whether fed alone or in a batch, and for
 * any thread count. MOE_ELIMIT when the cache would overflow. */
int moe_engine_eval(moe_engine *e, const int32_t *tokens, int n, float *logits, int all_logits);
int moe_engine_n_past(const moe_engine *e);
/* Keeps the first n cached positions (0: reset). */
int moe_engine_truncate(moe_engine *e, int n);

/* Weights of the loaded model, as stored (a Q4_0 matrix counts 18 bytes per
 * 32 weights), in total and read per decoded token at the current k: every
 * attention, router and shared-expert matrix, k of the E experts per layer,
 * the norms, the output matrix and one embedding row. The KV cache comes on
 * top: kv_bytes_per_pos for every cached position attended to. */
typedef struct moe_engine_stats {
    uint64_t n_params, n_params_active;
    uint64_t n_bytes, n_bytes_active;
    uint64_t kv_bytes_per_pos; /* K and V, all layers, at the cache types in use */
    uint64_t n_bytes_packed;   /* weights copied so far into the kernels' layout (repack): grows as
                                  experts are first routed to; their file pages are dropped */
} moe_engine_stats;
void moe_engine_get_stats(const moe_engine *e, moe_engine_stats *out);

/* llama.cpp's perplexity protocol (tools/perplexity) over tokens [n], the
 * whole text tokenized once: n / n_ctx chunks of n_ctx tokens (n >= n_ctx;
 * llama-perplexity refuses inputs under 2 n_ctx, moe perplexity too),
 * each evaluated from an empty cache with its first token replaced by bos
 * (bos < 0: kept), scoring the predictions of its tokens n_ctx/2 + 1 ..
 * n_ctx - 1. *ppl = exp(mean NLL), *ppl_err its standard error as llama.cpp
 * prints it; on_chunk (may be NULL) gets the running value after each
 * chunk (chunk counts from 0). n_ctx <= the engine's context. */
typedef void (*moe_ppl_chunk_fn)(int chunk, int n_chunk, double running_ppl, void *user);
int moe_engine_perplexity(moe_engine *e, const int32_t *tokens, size_t n, int n_ctx, int bos, double *ppl,
                          double *ppl_err, moe_ppl_chunk_fn on_chunk, void *user);

/* Token sampling, llama.cpp's order: top-k, top-p (on the untempered
 * distribution), temperature, then a seeded draw. temp <= 0: greedy argmax
 * (the lowest id among equal maxima). */
typedef struct moe_sampler_params {
    float temp;    /* default 0.8 */
    int top_k;     /* 0: all (default 40) */
    float top_p;   /* 1: off (default 0.95) */
    uint64_t seed; /* default 42 */
} moe_sampler_params;
moe_sampler_params moe_sampler_params_default(void);
typedef struct moe_sampler moe_sampler;
int moe_sampler_create(const moe_sampler_params *p, int n_vocab, moe_sampler **out);
void moe_sampler_free(moe_sampler *s);
/* logits [V]; returns the token id. */
int32_t moe_sampler_sample(moe_sampler *s, const float *logits);

/* ---- conversion (docs/convert.md) ------------------------------------------- */

/* Weight type of an exported GGUF: matrices in this type; 1-D tensors and the
 * router stay F32; rows that do not fill whole 32-value blocks fall back to F16. */
typedef enum moe_convert_type {
    MOE_CONVERT_F32 = 0,
    MOE_CONVERT_F16 = 1,
    MOE_CONVERT_Q8_0 = 2,
    MOE_CONVERT_Q4_0 = 3,
} moe_convert_type;
/* A `moe train` model directory (config.json, model.safetensors,
 * tokenizer.json) to a GGUF file llama.cpp loads, written atomically: arch
 * "llama" (Mixtral layout, q/k rows permuted to adjacent-pair RoPE) for plain
 * softmax top-k models with norm_topk_prob, "qwen2moe" for a sigmoid-gated
 * shared expert with raw top-k weights. Anything else (dense layers, other
 * routers, an ungated shared expert, ...) is MOE_EUNSUPPORTED naming the key. */
int moe_convert_model_to_gguf(const char *dir, const char *out_path, moe_convert_type type, char *err, size_t errsz);
/* A model the engine loads (a GGUF file: llama with experts or qwen2moe, any
 * type the engine reads; or a Hugging Face directory) to a model directory
 * moe_model_load reads: config.json and F32 model.safetensors, plus
 * tokenizer.json when the vocabulary is a byte-level BPE of ours in
 * substance (*has_tokenizer, may be NULL, says whether it was written).
 * Attention biases, q/k norms, partial RoPE and expert weight scaling are
 * MOE_EUNSUPPORTED, naming the layer or key. */
int moe_convert_to_model_dir(const char *src, const char *dir, int *has_tokenizer, char *err, size_t errsz);

/* ---- reports ---------------------------------------------------------------- */

/* A line chart as standalone SVG (no dependencies), written atomically. */
typedef struct moe_plot_series {
    const char *label;
    const double *x, *y;
    int n;
    int markers; /* draw points as well */
} moe_plot_series;
int moe_plot_svg(const char *path, const char *title, const char *xlabel, const char *ylabel,
                 const moe_plot_series *series, int n_series, int log_x, char *err, size_t errsz);

/* ---- experiments (docs/experiments.md) ------------------------------------ */

/* The capacity experiment's family of models. base: "exper" (the default
 * budget) or "tiny" (CI). n_experts E > 0: E routed experts of the base's
 * width F, top-2, no shared expert, softmax top-k with the default aux and z
 * losses; E = 0: the dense twin, FFN width K*F, so every member multiplies a
 * token through the same matrices except the router (E*C per layer). The
 * vocab is left at 4096. MOE_ENOTFOUND for an unknown base. */
int moe_experiment_model(const char *base, int n_experts, moe_model_config *c);
const char *const *moe_experiment_bases(void); /* NULL-terminated */
/* The balancing ablation: applies one method to an MoE config (it resets
 * every balancing field first). Methods: "none", "importance", "load",
 * "importance+load" (noisy top-k, Shazeer et al.), "none-topk", "switch",
 * "z-loss" (softmax top-k), "loss-free" (sigmoid scores + selection bias,
 * DeepSeek-V3). MOE_ENOTFOUND for an unknown name. */
int moe_experiment_balance_method(const char *method, moe_model_config *c);
const char *const *moe_experiment_balance_methods(void); /* NULL-terminated */

/* Routing statistics averaged over samples (one sample = one MoE layer's
 * last forward). overflow: the fraction of (token, expert) pairs beyond
 * ceil(ref_capacity_factor * R / E) per expert, i.e. what that capacity
 * would drop, computed from the counts whether or not capacity is on. */
typedef struct moe_routing_summary {
    int n;                  /* samples */
    float ref_capacity_factor;
    double importance_cv, load_cv, max_over_mean, dropped_fraction, overflow; /* means */
} moe_routing_summary;
/* Adds one sample from a layer's statistics (E experts). */
void moe_routing_summary_add(moe_routing_summary *s, const moe_layer_stats *st, int n_experts);
/* Adds a sample per MoE layer of the model's last forward. */
void moe_routing_summary_add_model(moe_routing_summary *s, const moe_model *m);

/* One run of an experiment: create the model, init (train.seed), train
 * `steps` optimizer steps, evaluate on the fixed val windows. */
typedef struct moe_experiment_opts {
    moe_train_config train; /* batch, seq, accum, eval batches, seed, threads, schedule */
    int steps;
    int stats_steps;        /* routing stats from the last micro-batch of each of the
                               last stats_steps steps (0: a fifth of the steps, >= 1) */
    float ref_capacity_factor; /* for moe_routing_summary.overflow (0: 1.25) */
    const char *save_dir;   /* model saved there when not NULL */
    void (*progress)(void *ctx, const moe_train_step_info *si); /* after each step, or NULL */
    void *progress_ctx;
} moe_experiment_opts;
typedef struct moe_experiment_result {
    moe_model_costs costs;     /* at context train.seq */
    double train_seconds;      /* wall time inside the training steps only */
    double tokens, tokens_per_s;
    float train_loss;          /* mean cross-entropy of the last stats_steps steps */
    float val_loss;            /* nats/token */
    moe_routing_summary routing; /* n = 0 for a dense model */
} moe_experiment_result;
int moe_experiment_run(const moe_model_config *c, const moe_experiment_opts *o, const int32_t *train, size_t n_train,
                       const int32_t *val, size_t n_val, moe_experiment_result *r, char *err, size_t errsz);

#ifdef __cplusplus
}
#endif
#endif /* MOE_H */
