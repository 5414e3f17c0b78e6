/* Matrix-times-activations kernels per weight type. Threads split the output
 * rows (each weight row is read once and dotted with every token), so at
 * decode all threads stream the same expert, and every output element is one
 * dot product in a fixed order: results are independent of the thread count
 * and of the batch the token arrived in. */
#include "infer/infer.h"

#include <omp.h>
#include <string.h>

#define ROW_BLOCK 16 /* output rows per work item */

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

void moe__wt_row(const moe__wt *w, int mat, int r, float *out) {
    const uint8_t *p = moe__wt_mat(w, mat) + (size_t)r * w->row_bytes;
    moe__gguf_dequantize(w->type, p, out, (size_t)w->cols); /* types checked at load */
}

void moe__wt_matmul(const moe__wt *w, int mat, const float *x, int N, float *y, int ldy,
                    const moe__kscratch *s) {
    const int rows = w->rows, cols = w->cols;
    const int quant = w->type == MOE__GGML_Q8_0 || w->type == MOE__GGML_Q4_0;
    const size_t qrow = moe__gguf_row_size(MOE__GGML_Q8_0, (size_t)cols);
    const uint8_t *base = moe__wt_mat(w, mat);
    const int threads = s->threads;
    if (quant) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int t = 0; t < N; t++)
            moe__gguf_quantize_q8_0(x + (size_t)t * cols, (uint8_t *)s->q + (size_t)t * qrow, (size_t)cols);
    }
    const int nblk = (rows + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int bi = 0; bi < nblk; bi++) {
        float *tmp = s->rows + (size_t)omp_get_thread_num() * s->max_cols;
        const int r1 = bi * ROW_BLOCK + ROW_BLOCK < rows ? bi * ROW_BLOCK + ROW_BLOCK : rows;
        for (int r = bi * ROW_BLOCK; r < r1; r++) {
            const uint8_t *wr = base + (size_t)r * w->row_bytes;
            switch (w->type) {
            case MOE__GGML_Q8_0:
                for (int t = 0; t < N; t++)
                    y[(size_t)t * ldy + r] =
                        moe__gguf_vec_dot_q8_0_q8_0((size_t)cols, wr, (const uint8_t *)s->q + (size_t)t * qrow);
                break;
            case MOE__GGML_Q4_0:
                for (int t = 0; t < N; t++)
                    y[(size_t)t * ldy + r] =
                        moe__gguf_vec_dot_q4_0_q8_0((size_t)cols, wr, (const uint8_t *)s->q + (size_t)t * qrow);
                break;
            case MOE__GGML_F32:
                for (int t = 0; t < N; t++)
                    y[(size_t)t * ldy + r] = moe__dot_f32((const float *)(const void *)wr, x + (size_t)t * cols, cols);
                break;
            default: /* F16, BF16: widen the row once for all tokens */
                moe__gguf_dequantize(w->type, wr, tmp, (size_t)cols);
                for (int t = 0; t < N; t++) y[(size_t)t * ldy + r] = moe__dot_f32(tmp, x + (size_t)t * cols, cols);
                break;
            }
        }
    }
}
