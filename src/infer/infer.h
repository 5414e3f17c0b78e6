/* Internal: the CPU inference engine for GGUF MoE models (docs/inference.md).
 *
 * Split as llama2.c does: an immutable model (hyperparameters and weight views
 * pointing into the read-only GGUF mapping, plus the few 1-D tensors converted
 * to float) and per-engine state (KV cache, work buffers). Quantized matrices
 * (and with repack 2 the float ones) are copied for the kernels
 * (moe__wt_pack_rows) lazily, each thread its rows on their first use, so an
 * expert that is never routed to is never paged in, nor copied. */
#ifndef MOE_INFER_H
#define MOE_INFER_H

#include "internal.h"
#include "io/gguf.h"
#include "io/quant.h"

typedef enum moe__arch {
    MOE__ARCH_LLAMA = 0,    /* Mixtral: adjacent-pair RoPE, top-k weights renormalised */
    MOE__ARCH_QWEN2MOE = 1, /* half-split RoPE, raw top-k weights, sigmoid-gated shared expert */
    MOE__ARCH_OLMOE = 2,    /* half-split RoPE, raw top-k weights, RMSNorm on q and k */
} moe__arch;

/* A weight matrix (or a stack of n_mat of them: the experts) in the file's
 * type: W [n_mat][rows][cols], rows of row_bytes, matrices of mat_bytes.
 * Hugging Face files keep one tensor per expert: then mats[i] is matrix i
 * (each contiguous, anywhere); NULL when the stack is one block at data. */
typedef struct moe__wt {
    const uint8_t *data;
    const uint8_t *const *mats; /* [n_mat] or NULL */
    uint32_t type;
    int rows, cols, n_mat;
    size_t row_bytes, mat_bytes;
    /* 1: data is the model's own F32 copy of a file tensor whose type has no
     * kernel (the type table's to_float, at load), not the file mapping: its
     * pages are never dropped (MADV_DONTNEED would zero them) */
    int converted;
    /* the engine's packed copies (moe__wt_packed_bytes each, pk_bytes apart;
     * NULL: none), made lazily: pk_id numbers the first in the engine's flags */
    uint8_t *pk;
    size_t pk_bytes;
    int pk_id;
} moe__wt;

static inline const uint8_t *moe__wt_mat(const moe__wt *w, int mat) {
    return w->mats ? w->mats[mat] : w->data + (size_t)mat * w->mat_bytes;
}

typedef struct moe__ilayer {
    const float *attn_norm, *ffn_norm;     /* [C] */
    const float *q_norm, *k_norm;          /* olmoe: [H*D], [G*D]; else NULL */
    const float *bq, *bk, *bv, *bo;        /* optional biases [H*D] [G*D] [G*D] [C] */
    moe__wt wq, wk, wv, wo;                /* [H*D][C] [G*D][C] [G*D][C] [C][H*D] */
    moe__wt gate_inp;                      /* router [E][C] */
    moe__wt gate_exps, up_exps, down_exps; /* [E][F][C] [E][F][C] [E][C][F] */
    const float *gate_inp_sh;              /* qwen2moe shared gate [C]; else NULL */
    moe__wt gate_sh, up_sh, down_sh;       /* shared expert [Fs][C] [Fs][C] [C][Fs] */
} moe__ilayer;

typedef struct moe__imodel {
    moe__arch arch;
    moe_engine_hparams hp;
    int rope_neox;  /* 1: pairs (i, i + n_rot/2); 0: adjacent pairs (2i, 2i+1) */
    int norm_topk;  /* renormalise the k weights to sum 1 */
    float w_scale;  /* expert_weights_scale (0 or 1: none) */
    const float *output_norm; /* [C] */
    moe__wt tok_embd, output; /* [V][C]; output is tok_embd when tied */
    moe__ilayer *layers;      /* [L] */
    float *owned;             /* the converted 1-D tensors */
    moe__gguf *g;
    void *file_buf;           /* the whole file when not mapped */
    int file_mapped;          /* the GGUF weights are a read-only file mapping (pages can be dropped) */
    struct moe__hf_files *hf; /* a Hugging Face directory's mapped files (model_hf.c); NULL for GGUF */
} moe__imodel;

/* Opens, checks and binds a model file, or a Hugging Face / `moe train`
 * directory (config.json + *.safetensors, model_hf.c); messages name the
 * file and tensor. */
int moe__imodel_load(const char *path, int use_mmap, moe__imodel **out, char *err, size_t errsz);
int moe__imodel_load_hf(const char *dir, moe__imodel **out, char *err, size_t errsz);
void moe__hf_files_free(struct moe__hf_files *f); /* NULL is a no-op */
void moe__imodel_free(moe__imodel *m);
/* moe_engine_get_stats with k experts per token and a cache of kv_elem_bytes
 * per K value plus V value (8: F32, 4: F16, 6: mixed) (card.c) */
void moe__imodel_stats(const moe__imodel *m, int k, int kv_elem_bytes, moe_engine_stats *s);

/* ---- kernels (kernels.c) -------------------------------------------------- */

/* 1 when w's type runs on the quantized kernels (the type table's engine
 * column, io/quant.c), 0 for float rows */
static inline int moe__wt_quant(const moe__wt *w) {
    const moe__gguf_type_info *t = moe__gguf_type_info_of(w->type);
    return t && t->engine == MOE__TYPE_ENGINE_QUANT;
}

/* [lo, hi) of n items for thread ith of nth: contiguous chunks, multiples of
 * align except the last (empty when ith is past the end). */
void moe__split(int n, int align, int ith, int nth, int *lo, int *hi);

/* Bytes of the per-thread scratch moe__wt_matmul_rows needs for rows of up
 * to max_cols values (a multiple of 64; the buffer must be 64-byte aligned). */
size_t moe__wt_scratch_bytes(int max_cols);
/* Bytes of one Q8_0 activation row of cols values. */
size_t moe__qrow_bytes(int cols);
/* Rows [t0, t1) of x [N][cols] to Q8_0 rows of moe__qrow_bytes(cols) at q. */
void moe__quantize_rows(const float *x, int cols, int t0, int t1, uint8_t *q);

/* y[t][r] (row stride ldy) = sum_c W[mat][r][c] x[t][c] for t < N and
 * r_lo <= r < r_hi, on the calling thread: threads of one parallel region
 * split the rows among themselves (moe__split with align 4). x [N][cols].
 * Q8_0/Q4_0 weights dot with xq, x quantized by moe__quantize_rows
 * (llama.cpp's scheme; x itself is then unused). scratch is the calling
 * thread's own, moe__wt_scratch_bytes(max_cols) bytes, 64-byte aligned, with
 * cols <= max_cols. Each output
 * element is one dot product in a fixed order that depends on neither N nor
 * the row range: a token gets bit-identical results alone or inside a
 * batch, with any thread count. */
void moe__wt_matmul_rows(const moe__wt *w, int mat, const float *x, const uint8_t *xq, int N, float *y, int ldy,
                         int r_lo, int r_hi, void *scratch, int max_cols, const uint8_t *pk);
/* Bytes of a packed copy of W[mat]: the tile layout of the quantized kernels
 * (kernels.c), 0 when this build has no packed kernel for the type; float
 * types keep the file's layout. pk of moe__wt_matmul_rows (NULL: the file
 * itself) is such a copy, 64-byte aligned, holding at least rows [r_lo,
 * r_hi) (their tiles); the results are bit-identical to the file's. */
size_t moe__wt_packed_bytes(const moe__wt *w);
/* Packs the tiles of rows [r_lo, r_hi) of W[mat] (r_lo a multiple of 4) into
 * dst, the packed matrix. */
void moe__wt_pack_rows(const moe__wt *w, int mat, uint8_t *dst, int r_lo, int r_hi);
/* g[i] = silu(g[i]) * u[i] = g / (1 + e^-g) * u for i < n (vectorized e^x
 * within 2 ulp of expf on AVX-512, expf elsewhere). */
void moe__swiglu(float *g, const float *u, size_t n);
/* x[i] = e^(x[i] - m) for i < n, with the same e^x. */
void moe__exp_shift(float *x, int n, float m);
/* Row r of W[mat] to float (embedding lookups). */
void moe__wt_row(const moe__wt *w, int mat, int r, float *out);
/* Dot of two float vectors, fixed blocked order. */
float moe__dot_f32(const float *a, const float *b, int n);
/* out[k] = moe__dot_f32(a + k * as, b, n) for k < 4, bit for bit, in one pass. */
void moe__dot4_f32(const float *a, size_t as, const float *b, int n, float *out);
/* o[d] = sum_j p[j] v[j][d] (rows of stride vs) for d < n, j in order with
 * one fused multiply-add each: attention's weighted sum of values. */
void moe__axpy_rows(const float *p, const float *v, size_t vs, int m, int n, float *o);
/* The F16 KV cache's variants: rows of fp16 (strides in elements), each
 * value widened exactly, so the result is bit for bit the float kernel's on
 * the widened rows. */
float moe__dot_f16(const uint16_t *a, const float *b, int n);
void moe__dot4_f16(const uint16_t *a, size_t as, const float *b, int n, float *out);
void moe__axpy_rows_f16(const float *p, const uint16_t *v, size_t vs, int m, int n, float *o);
/* y[i] = x[i] rounded to fp16, to nearest even (the bits of moe__gguf_f32_to_fp16). */
void moe__f32_to_f16_row(const float *x, uint16_t *y, int n);

/* ---- expert parallelism (engine_ep.c) ------------------------------------- */

/* Under a communicator of P > 1 ranks (moe_set_dist) rank r computes only
 * its experts [first, end) and the slot outputs are exchanged; NULL (and no
 * collective ever) in one process. Collectives: every rank calls them in the
 * same order. */
typedef struct moe__engine_ep moe__engine_ep;
/* rc of this rank's load, or of another's: every rank fails if one does */
int moe__engine_ep_agree(int rc, char *err, size_t errsz);
/* *out = NULL without a communicator of P > 1; rows: the slot rows to hold */
int moe__engine_ep_create(int n_expert, int C, size_t rows, moe__engine_ep **out, char *err, size_t errsz);
int moe__engine_ep_reserve(moe__engine_ep *ep, size_t rows);
void moe__engine_ep_free(moe__engine_ep *ep);
void moe__engine_ep_range(const moe__engine_ep *ep, int *first, int *end);
/* outs [S][C], the slot of (token t, top-k rank s) at row pos[t K + s]:
 * this rank's experts' slots filled; on return every slot, the same on every
 * rank. sel [n][stride]: the experts of each token. */
int moe__engine_ep_exchange(moe__engine_ep *ep, const int *sel, int stride, int n, int K, const int *pos, float *outs,
                            char *err, size_t errsz);

#endif
