/* Matrix-times-activations kernels per weight type. Threads split the output
 * rows (each weight row is read once and dotted with every token), so at
 * decode all threads stream the same expert, and every output element is one
 * dot product in a fixed order: results are independent of the thread count
 * and of the batch the token arrived in. */
#include "infer/infer.h"

#include <omp.h>
#include <string.h>

#define ROW_BLOCK 16 /* output rows per work item */
#define TOK_BLOCK 16 /* tokens per tile inside a work item */

#if defined(__AVX512F__)
#include <immintrin.h>

/* One 16-lane accumulator, the tail by a masked load: moe__dot_f32 and the
 * 4x4 tile below run the same per-lane fused multiply-adds and the same final
 * reduction, so a product is bit-identical whichever of them computed it. */
float moe__dot_f32(const float *a, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* y[t][r] (row stride ldy) = dot(w[r], x[t]) for r, t < 4: each loaded
 * vector serves four products, a quarter of the loads of separate dots. */
static void dot_4x4(const float *w, size_t ws, const float *x, size_t xs, int n, float *y, int ldy) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < 4; t++) acc[r][t] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 wv[4], xv[4];
        for (int r = 0; r < 4; r++) wv[r] = _mm512_loadu_ps(w + r * ws + i);
        for (int t = 0; t < 4; t++) xv[t] = _mm512_loadu_ps(x + t * xs + i);
        for (int r = 0; r < 4; r++)
            for (int t = 0; t < 4; t++) acc[r][t] = _mm512_fmadd_ps(wv[r], xv[t], acc[r][t]);
    }
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        __m512 wv[4], xv[4];
        for (int r = 0; r < 4; r++) wv[r] = _mm512_maskz_loadu_ps(m, w + r * ws + i);
        for (int t = 0; t < 4; t++) xv[t] = _mm512_maskz_loadu_ps(m, x + t * xs + i);
        for (int r = 0; r < 4; r++)
            for (int t = 0; t < 4; t++) acc[r][t] = _mm512_fmadd_ps(wv[r], xv[t], acc[r][t]);
    }
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < 4; t++) y[(size_t)t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}
#else
float moe__dot_f32(const float *a, const float *b, int n) {
    /* 16 independent partial sums so the compiler vectorises the loop; the
     * order is fixed by n alone. */
    float acc[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0;
    for (; i < n; i++) s += a[i] * b[i];
    for (int j = 0; j < 16; j += 2) s += acc[j] + acc[j + 1];
    return s;
}
#endif

/* y[t][r] = dot(w[r], x[t]) for r < nr, t0 <= t < t1 (w rows of stride ws). */
static void float_tile(const float *w, size_t ws, int nr, const float *x, int cols, int t0, int t1, float *y,
                       int ldy) {
    int r = 0;
#if defined(__AVX512F__)
    for (; r + 4 <= nr; r += 4) {
        int t = t0;
        for (; t + 4 <= t1; t += 4)
            dot_4x4(w + (size_t)r * ws, ws, x + (size_t)t * cols, (size_t)cols, cols, y + (size_t)t * ldy + r, ldy);
        for (; t < t1; t++)
            for (int i = 0; i < 4; i++)
                y[(size_t)t * ldy + r + i] = moe__dot_f32(w + (size_t)(r + i) * ws, x + (size_t)t * cols, cols);
    }
#endif
    for (; r < nr; r++)
        for (int t = t0; t < t1; t++) y[(size_t)t * ldy + r] = moe__dot_f32(w + (size_t)r * ws, x + (size_t)t * cols, cols);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define QUANT_TILES 1
/* Q8_0/Q4_0 weights against Q8_0 activations, llama.cpp's block dot: per
 * block the integer codes are widened to int16, multiplied pairwise into
 * int32 lanes (exact), converted to float and accumulated with the product
 * of the two fp16 scales. A tile of up to 4 rows x 4 tokens widens each
 * block once for all its products; every product runs the same per-lane
 * operations whatever the tile size, so a token's result does not depend
 * on the batch it came in. */
static inline __m512i widen_block(int q4, const uint8_t *b) {
    if (!q4) return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(b + 2)));
    const __m128i q = _mm_loadu_si128((const __m128i *)(b + 2)), m4 = _mm_set1_epi8(15);
    const __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_and_si128(q, m4));
    return _mm512_sub_epi16(_mm512_cvtepu8_epi16(nib), _mm512_set1_epi16(8));
}

/* The F16C instruction, inline: the out-of-line software conversion was a
 * tenth of decode time (five calls per block at T = 1). fp16 -> f32 is exact,
 * so the value is the same as moe__gguf_fp16_to_f32's. */
static inline float block_scale(const uint8_t *b) {
    uint16_t h;
    memcpy(&h, b, sizeof h);
    return _cvtsh_ss(h);
}

/* y[t][r] = dot(w row r, xq row t), r < R, t < T (both <= 4); nb blocks.
 * npf rows of the next tile exist (0..4): only those are prefetched, so no
 * address past the matrix is ever formed. */
static inline __attribute__((always_inline)) void quant_tile(int q4, const uint8_t *w, size_t wrb, int R,
                                                             const uint8_t *xq, size_t xrb, int T, int nb,
                                                             float *y, int ldy, int npf) {
    const size_t wbs = q4 ? sizeof(moe__gguf_block_q4_0) : sizeof(moe__gguf_block_q8_0);
    const size_t xbs = sizeof(moe__gguf_block_q8_0);
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512i wv[4], xv[4];
        float dw[4], dx[4];
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = w + r * wrb + b * wbs;
            wv[r] = widen_block(q4, blk), dw[r] = block_scale(blk);
            /* the next 4-row tile: the loads above stalled on memory at decode */
            if (r < npf) _mm_prefetch((const char *)(blk + 4 * wrb), _MM_HINT_T0);
        }
        for (int t = 0; t < T; t++) {
            const uint8_t *blk = xq + t * xrb + b * xbs;
            xv[t] = widen_block(0, blk), dx[t] = block_scale(blk);
        }
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++)
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(wv[r], xv[t])),
                                            _mm512_set1_ps(dw[r] * dx[t]), acc[r][t]);
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) y[(size_t)t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

/* Rows [0, nr) x tokens [t0, t1) in 4 x 4 tiles, the edges in smaller ones. */
static void quant_rows(int q4, const uint8_t *w, size_t wrb, int nr, const uint8_t *xq, size_t xrb, int t0,
                       int t1, int nb, float *y, int ldy) {
    for (int r = 0; r < nr; r += 4) {
        const int R = nr - r < 4 ? nr - r : 4;
        const int left = nr - r - 4, npf = left < 0 ? 0 : left < 4 ? left : 4;
        for (int t = t0; t < t1; t += 4) {
            const int T = t1 - t < 4 ? t1 - t : 4;
            const uint8_t *wr = w + (size_t)r * wrb, *xt = xq + (size_t)t * xrb;
            float *yt = y + (size_t)t * ldy + r;
            if (R == 4 && T == 4) quant_tile(q4, wr, wrb, 4, xt, xrb, 4, nb, yt, ldy, npf);
            else if (R == 4 && T == 1) quant_tile(q4, wr, wrb, 4, xt, xrb, 1, nb, yt, ldy, npf); /* decode */
            else quant_tile(q4, wr, wrb, R, xt, xrb, T, nb, yt, ldy, npf);
        }
    }
}
#endif

void moe__wt_row(const moe__wt *w, int mat, int r, float *out) {
    const uint8_t *p = moe__wt_mat(w, mat) + (size_t)r * w->row_bytes;
    moe__gguf_dequantize(w->type, p, out, (size_t)w->cols); /* types checked at load */
}

/* Work below this many multiply-adds runs on the calling thread: a parallel
 * region costs microseconds on an idle machine and a scheduler slice on a
 * loaded one, more than a router [E][C] or one token's quantization. Where
 * the work runs does not change any result. */
#define PAR_MIN_WORK (1 << 16)

void moe__wt_matmul(const moe__wt *w, int mat, const float *x, int N, float *y, int ldy, moe__kscratch *s,
                    int same_x) {
    const int rows = w->rows, cols = w->cols;
    const int quant = w->type == MOE__GGML_Q8_0 || w->type == MOE__GGML_Q4_0;
    const size_t qrow = moe__gguf_row_size(MOE__GGML_Q8_0, (size_t)cols);
    const uint8_t *base = moe__wt_mat(w, mat);
    const int threads = s->threads;
    if (quant && !(same_x && s->qx == x && s->qn == N && s->qcols == cols)) {
#pragma omp parallel for num_threads(threads) schedule(static) if ((size_t)N * cols >= PAR_MIN_WORK)
        for (int t = 0; t < N; t++)
            moe__gguf_quantize_q8_0(x + (size_t)t * cols, (uint8_t *)s->q + (size_t)t * qrow, (size_t)cols);
        s->qx = x, s->qn = N, s->qcols = cols;
    }
    if (!quant) s->qx = NULL; /* s->q untouched, but the caller's x may change before the next call */
    const int nblk = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if ((size_t)rows * cols * N >= PAR_MIN_WORK)
    for (int bi = 0; bi < nblk; bi++) {
        const int r0 = bi * ROW_BLOCK, nr = rows - r0 < ROW_BLOCK ? rows - r0 : ROW_BLOCK;
        const uint8_t *wb = base + (size_t)r0 * w->row_bytes;
        const float *wf = (const float *)(const void *)wb; /* F32 rows, contiguous */
        size_t wstride = (size_t)cols;
        if (w->type == MOE__GGML_F16 || w->type == MOE__GGML_BF16) { /* widen the block once for all tokens */
            float *tmp = s->rows + (size_t)omp_get_thread_num() * ROW_BLOCK * s->max_cols;
            for (int r = 0; r < nr; r++) moe__gguf_dequantize(w->type, wb + (size_t)r * w->row_bytes, tmp + (size_t)r * s->max_cols, (size_t)cols);
            wf = tmp, wstride = (size_t)s->max_cols;
        }
        /* token tiles keep the block's rows and a tile of activations in cache */
        for (int t0 = 0; t0 < N; t0 += TOK_BLOCK) {
            const int t1 = N - t0 < TOK_BLOCK ? N : t0 + TOK_BLOCK;
            if (!quant) {
                float_tile(wf, wstride, nr, x, cols, t0, t1, y + r0, ldy);
                continue;
            }
#ifdef QUANT_TILES
            quant_rows(w->type == MOE__GGML_Q4_0, wb, w->row_bytes, nr, (const uint8_t *)s->q, qrow, t0, t1,
                       cols / MOE__GGUF_QK, y + r0, ldy);
            continue;
#endif
            for (int r = 0; r < nr; r++) {
                const uint8_t *wr = wb + (size_t)r * w->row_bytes;
                float *yr = y + r0 + r;
                switch (w->type) {
                case MOE__GGML_Q8_0:
                    for (int t = t0; t < t1; t++)
                        yr[(size_t)t * ldy] = moe__gguf_vec_dot_q8_0_q8_0((size_t)cols, wr, (const uint8_t *)s->q + (size_t)t * qrow);
                    break;
                case MOE__GGML_Q4_0:
                    for (int t = t0; t < t1; t++)
                        yr[(size_t)t * ldy] = moe__gguf_vec_dot_q4_0_q8_0((size_t)cols, wr, (const uint8_t *)s->q + (size_t)t * qrow);
                    break;
                default: break; /* float types: float_tile above */
                }
            }
        }
    }
}
