/* Transformer building blocks of the language model (docs/model.md), forward
 * and exact backward, on flat float arrays. Internal API.
 *
 * Conventions, for every function here:
 *  - Layout: activations are [B][T][...] row-major, N = B*T tokens.
 *  - Backward functions ACCUMULATE (+=) into their input-gradient and
 *    parameter-gradient buffers; the caller zeroes them. The exceptions say
 *    so: moe__rope_backward (in place), moe__xent_forward_backward and
 *    moe__swiglu_backward (they write).
 *  - `threads` is the OpenMP thread count (<= 0: the library default,
 *    moe__threads). Results are bit-identical for any thread count: every
 *    output element and every reduction is computed by one thread in a fixed
 *    order (no float atomics, no OpenMP float reductions across threads).
 *  - No allocation: callers pass scratch buffers where one is needed (sizes
 *    below). Buffers do not alias unless a function says they may.
 *  - BLAS (OpenBLAS, set to one thread by these functions) is only called from
 *    inside our own parallel loops.
 */
#ifndef MOE_MODEL_OPS_H
#define MOE_MODEL_OPS_H

#include <stddef.h>
#include <stdint.h>

/* ---- RMSNorm --------------------------------------------------------------
 * y[n][c] = x[n][c] * rstd[n] * g[c],  rstd[n] = 1 / sqrt(mean_c x[n][c]^2 + eps)
 * (the mean of squares is accumulated in double).
 *   y [N][C] (may alias x), rstd [N] (saved for the backward), x [N][C], g [C] */
void moe__rmsnorm_forward(float *y, float *rstd, const float *x, const float *g, int N, int C, float eps,
                          int threads);
/* dx [N][C] += dL/dx, dg [C] += dL/dg, from dy [N][C], x [N][C], g [C] and
 * the forward's rstd [N]. dx may be NULL (not needed). dg is reduced over N
 * per column block, in row order (double accumulators). */
void moe__rmsnorm_backward(float *dx, float *dg, const float *dy, const float *x, const float *g,
                           const float *rstd, int N, int C, int threads);

/* ---- RoPE (Hugging Face rotate_half: dimension i pairs with i + D/2) ------
 * cos_sin: [T][2][D/2] floats, row p = D/2 cosines then D/2 sines of
 * angle = p * theta^(-2i/D), i < D/2 (computed in double). D must be even. */
void moe__rope_table(float *cos_sin, int T, int D, float theta);
/* In place on x [B][T][nheads][D]; position of t is pos0 + t, so the table
 * must have at least pos0 + T rows:
 *   x'[i] = x[i] cos - x[i+D/2] sin,  x'[i+D/2] = x[i+D/2] cos + x[i] sin. */
void moe__rope_forward(float *x, const float *cos_sin, int B, int T, int nheads, int D, int pos0,
                       int threads);
/* In place on the gradient dx [B][T][nheads][D]: replaces dL/dx' by dL/dx
 * (the inverse rotation). Not an accumulation. */
void moe__rope_backward(float *dx, const float *cos_sin, int B, int T, int nheads, int D, int pos0,
                        int threads);

/* ---- Causal grouped-query attention -----------------------------------------
 * q [B][T][H][D], k, v [B][T][G][D], H % G == 0; query head h reads kv head
 * h / (H/G). Scale 1/sqrt(D), causal mask, fp32 softmax with max subtraction.
 *   out [B][T][H][D] (written)
 *   att [B][H][T][T] softmax probabilities, saved for the backward: row t is
 *       valid for columns j <= t; the forward also writes zeros to some
 *       columns j > t and leaves the rest untouched.
 * Row blocks of MOE__ATT_BR queries run as BLAS calls per (b, h), only over
 * the keys the block can see; parallel over (b, h). */
#define MOE__ATT_BR 64
void moe__attention_forward(float *out, float *att, const float *q, const float *k, const float *v, int B,
                            int T, int H, int G, int D, int threads);
/* Scratch floats moe__attention_backward needs for T positions and
 * `threads` (the same value passed to it): moe__threads(threads) *
 * min(T, MOE__ATT_BR) * T. */
size_t moe__attention_scratch_size(int T, int threads);
/* dq [B][T][H][D], dk, dv [B][T][G][D] += gradients, from dout [B][T][H][D],
 * the forward's att, and q, k, v. Parallel over (b, kv head); the H/G query
 * heads of a group are handled in order by one thread, so dk, dv are
 * deterministic. scratch: moe__attention_scratch_size(T, threads) floats. */
void moe__attention_backward(float *dq, float *dk, float *dv, const float *dout, const float *att,
                             const float *q, const float *k, const float *v, int B, int T, int H, int G, int D,
                             float *scratch, int threads);
/* Inference with a KV cache, ONE new query position attending to all n_ctx
 * cached positions (the new position's k, v already appended, rope applied):
 *   q [H][D], kcache, vcache [n_ctx][G][D] (row stride G*D), out [H][D],
 *   scratch [n_ctx] floats.
 * Single-threaded (callable from inside a caller's parallel loop, e.g. over
 * sequences); n_ctx >= 1. */
void moe__attention_decode(float *out, const float *q, const float *kcache, const float *vcache, int n_ctx,
                           int H, int G, int D, float *scratch);

/* ---- Token embedding -------------------------------------------------------
 * out [N][C] = table [V][C] rows of tokens [N]. Tokens are NOT checked: the
 * caller validates 0 <= tokens[n] < V. */
void moe__embedding_forward(float *out, const int32_t *tokens, const float *table, int N, int C, int threads);
/* dtable [V][C] += scatter-add of dout [N][C] by tokens [N] (validated by the
 * caller). Parallel over column blocks; rows summed in token order n. */
void moe__embedding_backward(float *dtable, const float *dout, const int32_t *tokens, int N, int C,
                             int threads);

/* ---- Softmax cross-entropy, fused ------------------------------------------
 * losses [N]: losses[n] = -log softmax(logits[n])[targets[n]], logits [N][V].
 * If dlogits != NULL it is WRITTEN (not accumulated):
 *   dlogits[n][v] = (softmax(logits[n])[v] - (v == targets[n])) * dscale,
 * i.e. the gradient of dscale * sum_n losses[n]. dlogits may alias logits
 * (in place) but no other overlap. Targets are NOT checked: the caller
 * validates 0 <= targets[n] < V. */
void moe__xent_forward_backward(float *dlogits, float *losses, const float *logits, const int32_t *targets,
                                int N, int V, float dscale, int threads);

/* ---- SwiGLU (elementwise, dense FFN) ----------------------------------------
 * a [n] = silu(h1) * h3 = h1 * sigmoid(h1) * h3; h1, h3 [n]. a may alias h1 or h3. */
void moe__swiglu_forward(float *a, const float *h1, const float *h3, size_t n, int threads);
/* WRITES (not accumulates) dh1 [n], dh3 [n] from da [n], h1, h3:
 *   dh3 = da * silu(h1),  dh1 = da * h3 * s * (1 + h1 (1 - s)),  s = sigmoid(h1).
 * dh1 or dh3 may alias da (in place); no other overlap. */
void moe__swiglu_backward(float *dh1, float *dh3, const float *da, const float *h1, const float *h3,
                          size_t n, int threads);

#endif
