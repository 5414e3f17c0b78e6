/* The model's state, shared by model.c and the checkpoint / training code. */
#ifndef MOE_MODEL_IMPL_H
#define MOE_MODEL_IMPL_H

#include "internal.h"

/* A dense SwiGLU FFN: weight offsets into the arena and its activations. */
typedef struct moe__ffn {
    int F;                      /* hidden size */
    size_t gate, up, down;      /* [F][C], [F][C], [C][F] */
    float *h1, *h3, *act;       /* [N][F] */
} moe__ffn;

typedef struct moe__mlayer {
    size_t ln1, wq, wk, wv, wo, ln2;
    int is_moe, has_shared;
    size_t moe_off;             /* start of the moe_layer's parameter block */
    size_t shared_gate;         /* [1][C] sigmoid gate of the shared experts, 0 when absent */
    float *sg;                  /* [2][N] shared gate values sigmoid(a2 w), their dz */
    float *sh_out;              /* [N][C] ungated shared output (gated layers only) */
    moe_layer *moe;             /* MoE FFN (bound to the arena) */
    moe__ffn dense;             /* dense FFN when !is_moe */
    moe__ffn shared;            /* shared experts when has_shared */
    /* saved activations, N = B*T */
    float *res;                 /* [N][C] input of the layer */
    float *a1, *rstd1;          /* [N][C], [N] */
    float *q, *k, *v;           /* [N][H*D], [N][G*D] x2, after RoPE */
    float *att;                 /* [B][H][T][T] probabilities */
    float *ao;                  /* [N][H*D] attention output */
    float *res2;                /* [N][C] after attention */
    float *a2, *rstd2;          /* [N][C], [N] */
} moe__mlayer;

struct moe_model {
    moe_model_config cfg;
    int max_B, max_T, threads, has_grads, n_moe;
    /* expert parallelism (moe_set_dist at creation): the MoE layers hold the
     * experts [e_first, e_first + e_local) under their global-id names;
     * everything else is replicated and data-parallel */
    moe_dist *dist;
    int e_first, e_local;
    char err[256];

    moe_param_info *tensors;
    int n_tensors, cap_tensors;
    size_t n_params;
    size_t embed, norm, lm_head; /* offsets (lm_head == embed when tied) */
    moe__mlayer *layers;         /* [L] */

    void *arena;                 /* everything below lives in it */
    float *params, *grads;       /* [n_params] */
    struct {
        float *res_final, *lnf, *rstdf; /* [N][C], [N][C], [N] */
        float *logits;                  /* [N][V] */
        float *rope;                    /* [T][D] cos | sin table */
        float *ffo;                     /* [N][C] MoE output */
    } act;
    struct {
        float *dres, *dtmp;             /* [N][C] */
        float *dq, *dk, *dv, *dao;      /* [N][H*D], [N][G*D] x2, [N][H*D] */
        float *dlogits;                 /* [N][V] */
        float *att_scratch;             /* moe__attention_scratch_size(T, threads) */
        float *dh1, *dh3, *dact;        /* [N][Fmax] */
        float *dsh;                     /* [N][C] gated dy of the shared experts */
    } bw;
    float *kcache, *vcache;             /* [L][T][G*D] */
    struct {
        float *x, *a, *y;               /* [C] */
        float *q, *o;                   /* [H*D] */
        float *scratch;                 /* [T*H + 64] */
    } dec;
    int pos;                            /* decode position */

    int32_t *tok, *tgt;                 /* [N] of the last forward */
    float *ce_tok;                      /* [N] per-token cross-entropy */
    int B, T, have_fwd, have_targets;
    float last_ce, last_aux;
};

/* model.c, expert parallelism (no-ops without a communicator) */
/* Sums the gradients of the replicated parameters over ranks (expert
 * gradients stay local). */
int moe__model_sync_grads(moe_model *m);
/* The global gradient norm: replicated parameters once, experts of every rank. */
int moe__model_grad_norm(moe_model *m, const float *g, double *norm);

#endif
