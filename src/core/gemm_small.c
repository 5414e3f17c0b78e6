/* C = A B^T (+ C) for few rows of A: the expert GEMM when an expert receives
 * a few dozen tokens (many experts, fine-grained MoE). OpenBLAS packs all of B
 * (the expert's weights) on every call, which at M = 32 costs as much as the
 * arithmetic; here B is read in place, once per 32 rows, and only the small A
 * is packed (transposed) into a per-thread buffer.
 *
 * Micro-kernels (AVX-512: 2 vectors of 16 rows x 8 columns of accumulators,
 * per k one 32-row column of A^T and 8 broadcasts of B[n][k]; AVX2 + FMA: 2
 * vectors of 8 rows x 6 columns). Each output element is a single sequential
 * FMA chain over k, so results depend neither on threads nor on which of the
 * two kernels ran. */
#include "gemm_small.h"

#include <cblas.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>

/* C rows [0, rows) x columns [0, nr) = (or +=) the kernel's accumulators,
 * spilled as tmp[column][row] with row stride ld. */
static inline __attribute__((always_inline)) void store_block(const float *tmp, int ld, int rows, int nr, float *C,
                                                              int ldc, int accumulate) {
    for (int m = 0; m < rows; m++) {
        float *c = C + (size_t)m * ldc;
        if (accumulate)
            for (int j = 0; j < nr; j++) c[j] += tmp[j * ld + m];
        else
            for (int j = 0; j < nr; j++) c[j] = tmp[j * ld + m];
    }
}

/* at [K][mpad]: A transposed, rows past M zero (mpad: a multiple of 16, the
 * row block of both kernels) */
void moe__sgemm_small_pack(int M, int K, const float *A, int lda, float *work) {
    const int mpad = (M + 15) & ~15;
    for (int k = 0; k < K; k++) {
        float *dst = work + (size_t)k * mpad;
        for (int m = 0; m < M; m++) dst[m] = A[(size_t)m * lda + k];
        for (int m = M; m < mpad; m++) dst[m] = 0.0f;
    }
}

int moe__sgemm_small_enabled(void) { return 1; }

#endif

#if defined(__AVX512F__)

#define NR 8

/* acc[v][j] += sum_k at[k][m0 + 16 v .. +16] * b[j][k], stored into C. */
/* next: the following block's B rows, prefetched one cache line per row every
 * 16 k (the weights are cold: each expert's rows are read once per call, in
 * streams too short for the hardware prefetcher), or NULL. */
static inline __attribute__((always_inline)) void kernel(int mv, int nr, int rows, int K, const float *at,
                                                         int mpad, const float *B, int ldb, float *C, int ldc,
                                                         int accumulate, const float *next) {
    __m512 acc[2][NR];
    for (int v = 0; v < 2; v++)
        for (int j = 0; j < NR; j++) acc[v][j] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        if (next && (k & 15) == 0)
            for (int j = 0; j < NR; j++) _mm_prefetch((const char *)(next + (size_t)j * ldb + k), _MM_HINT_T0);
        const __m512 a0 = _mm512_load_ps(at + (size_t)k * mpad);
        const __m512 a1 = mv > 1 ? _mm512_load_ps(at + (size_t)k * mpad + 16) : a0;
        for (int j = 0; j < nr; j++) {
            const __m512 b = _mm512_set1_ps(B[(size_t)j * ldb + k]);
            acc[0][j] = _mm512_fmadd_ps(a0, b, acc[0][j]);
            if (mv > 1) acc[1][j] = _mm512_fmadd_ps(a1, b, acc[1][j]);
        }
    }
    float tmp[NR][32] __attribute__((aligned(64)));
    for (int j = 0; j < nr; j++) {
        _mm512_store_ps(tmp[j], acc[0][j]);
        if (mv > 1) _mm512_store_ps(tmp[j] + 16, acc[1][j]);
    }
    store_block(&tmp[0][0], 32, rows, nr, C, ldc, accumulate);
}

void moe__sgemm_small_nt(int M, int N, int K, const float *work, const float *B, int ldb, float *C, int ldc,
                         int accumulate) {
    if (M <= 0 || N <= 0) return;
    const int mpad = (M + 15) & ~15;
    for (int n0 = 0; n0 < N; n0 += NR) {
        const int nr = N - n0 < NR ? N - n0 : NR;
        const float *b = B + (size_t)n0 * ldb;
        for (int m0 = 0; m0 < M; m0 += 32) {
            const int rows = M - m0 < 32 ? M - m0 : 32;
            float *c = C + (size_t)m0 * ldc + n0;
            const float *at = work + m0;
            /* constant arguments let the compiler unroll each variant fully */
            const float *next = m0 == 0 && n0 + 2 * NR <= N ? b + (size_t)NR * ldb : NULL;
            if (nr == NR) {
                if (rows > 16) kernel(2, NR, rows, K, at, mpad, b, ldb, c, ldc, accumulate, next);
                else kernel(1, NR, rows, K, at, mpad, b, ldb, c, ldc, accumulate, next);
            } else {
                for (int j = 0; j < nr; j++) {
                    const float *bj = b + (size_t)j * ldb;
                    if (rows > 16) kernel(2, 1, rows, K, at, mpad, bj, ldb, c + j, ldc, accumulate, NULL);
                    else kernel(1, 1, rows, K, at, mpad, bj, ldb, c + j, ldc, accumulate, NULL);
                }
            }
        }
    }
}

#elif defined(__AVX2__) && defined(__FMA__)

/* AVX2 has 16 vector registers: 2 vectors of 8 rows x 6 columns of
 * accumulators (12), 2 columns of A^T and one broadcast per k. Each output is
 * the same sequential FMA chain over k as the AVX-512 kernel's, so the two
 * give the same bits. */
#define NR 6

/* Named accumulators (cV_J: vector V of column J): with an array, GCC kept
 * a copy of every accumulator on the stack and stored all twelve on each k
 * (27 GFLOP/s); in registers the kernel runs at the FMA units' rate. */
#define SG_ACC(j) __m256 c0_##j = _mm256_setzero_ps(), c1_##j = _mm256_setzero_ps();
#define SG_FMA(j)                                                                                             \
    if (nr > j) {                                                                                             \
        const __m256 b = _mm256_broadcast_ss(B + (size_t)(j) * ldb + k);                                      \
        c0_##j = _mm256_fmadd_ps(a0, b, c0_##j);                                                              \
        if (mv > 1) c1_##j = _mm256_fmadd_ps(a1, b, c1_##j);                                                  \
    }
#define SG_STORE(j)                                                                                           \
    if (nr > j) _mm256_store_ps(tmp[j], c0_##j), _mm256_store_ps(tmp[j] + 8, c1_##j);

static inline __attribute__((always_inline)) void kernel(int mv, int nr, int rows, int K, const float *at,
                                                         int mpad, const float *B, int ldb, float *C, int ldc,
                                                         int accumulate, const float *next) {
    SG_ACC(0) SG_ACC(1) SG_ACC(2) SG_ACC(3) SG_ACC(4) SG_ACC(5)
    for (int k = 0; k < K; k++) {
        if (next && (k & 15) == 0)
            for (int j = 0; j < NR; j++) _mm_prefetch((const char *)(next + (size_t)j * ldb + k), _MM_HINT_T0);
        const __m256 a0 = _mm256_load_ps(at + (size_t)k * mpad);
        const __m256 a1 = mv > 1 ? _mm256_load_ps(at + (size_t)k * mpad + 8) : a0;
        SG_FMA(0) SG_FMA(1) SG_FMA(2) SG_FMA(3) SG_FMA(4) SG_FMA(5)
    }
    float tmp[NR][16] __attribute__((aligned(32))); /* [column][row]; rows past 8 are 0 when mv == 1 */
    SG_STORE(0) SG_STORE(1) SG_STORE(2) SG_STORE(3) SG_STORE(4) SG_STORE(5)
    store_block(&tmp[0][0], 16, rows, nr, C, ldc, accumulate);
}
#undef SG_ACC
#undef SG_FMA
#undef SG_STORE

/* One 16-row block of nr (1..6) columns; constant arguments let the compiler
 * keep every accumulator in a register. */
static void block(int mv, int nr, int rows, int K, const float *at, int mpad, const float *b, int ldb, float *c,
                  int ldc, int accumulate, const float *next) {
#define CASE(n)                                                                                              \
    case n:                                                                                                  \
        if (mv > 1) kernel(2, n, rows, K, at, mpad, b, ldb, c, ldc, accumulate, next);                       \
        else kernel(1, n, rows, K, at, mpad, b, ldb, c, ldc, accumulate, next);                              \
        break;
    switch (nr) {
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6)
    }
#undef CASE
}

void moe__sgemm_small_nt(int M, int N, int K, const float *work, const float *B, int ldb, float *C, int ldc,
                         int accumulate) {
    if (M <= 0 || N <= 0) return;
    const int mpad = (M + 15) & ~15;
    for (int n0 = 0; n0 < N; n0 += NR) {
        const int nr = N - n0 < NR ? N - n0 : NR;
        const float *b = B + (size_t)n0 * ldb;
        const float *next = n0 + 2 * NR <= N ? b + (size_t)NR * ldb : NULL;
        for (int m0 = 0; m0 < M; m0 += 16) { /* the block's B rows stay in L1 across m0 */
            const int rows = M - m0 < 16 ? M - m0 : 16;
            block(rows > 8 ? 2 : 1, nr, rows, K, work + m0, mpad, b, ldb, C + (size_t)m0 * ldc + n0, ldc, accumulate,
                  m0 == 0 ? next : NULL);
        }
    }
}

#else /* neither AVX-512 nor AVX2 + FMA at build time: plain BLAS */

/* the "packed" A is A itself, copied densely */
void moe__sgemm_small_pack(int M, int K, const float *A, int lda, float *work) {
    for (int m = 0; m < M; m++)
        for (int k = 0; k < K; k++) work[(size_t)m * K + k] = A[(size_t)m * lda + k];
}

void moe__sgemm_small_nt(int M, int N, int K, const float *work, const float *B, int ldb, float *C, int ldc,
                         int accumulate) {
    if (M <= 0 || N <= 0) return;
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, work, K, B, ldb, accumulate ? 1.0f : 0.0f,
                C, ldc);
}

int moe__sgemm_small_enabled(void) { return 0; }

#endif
