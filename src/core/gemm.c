/* Deterministic parallel GEMM: fixed output tiles, one single-threaded
 * cblas_sgemm per tile (full K each), OpenMP dynamic schedule over tiles. */
#include "gemm.h"

#include "internal.h"

#include <cblas.h>
#include <string.h>

int moe__gemm_tile_m(int M, int N) {
    const int ntn = N > 0 ? (N + MOE__GEMM_TILE_N - 1) / MOE__GEMM_TILE_N : 1;
    int tm = MOE__GEMM_TILE_M;
    while (tm > MOE__GEMM_TILE_M_MIN && (long)((M + tm - 1) / tm) * ntn < MOE__GEMM_MIN_TILES) tm /= 2;
    return tm;
}

void moe__gemm(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
               const float *B, int ldb, float beta, float *C, int ldc, int threads) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) { /* C = beta C, row by row */
        for (int i = 0; i < M; i++) {
            float *c = C + (size_t)i * ldc;
            if (beta == 0.0f) memset(c, 0, sizeof(float) * (size_t)N);
            else if (beta != 1.0f)
                for (int j = 0; j < N; j++) c[j] *= beta;
        }
        return;
    }
    moe__blas_single_thread();
    const int nt = moe__threads(threads);
    const int tm = moe__gemm_tile_m(M, N), tn = MOE__GEMM_TILE_N;
    const int ntm = (M + tm - 1) / tm, ntn = (N + tn - 1) / tn;
    const int ntiles = ntm * ntn;
    const enum CBLAS_TRANSPOSE ta = transA ? CblasTrans : CblasNoTrans;
    const enum CBLAS_TRANSPOSE tb = transB ? CblasTrans : CblasNoTrans;
    /* a product of a few microseconds (a decoded token's projections) runs
     * on the calling thread: waking the team would cost as much */
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt < ntiles ? nt : ntiles) \
    if ((long long)M * N * K > 4LL * MOE__PAR_MIN)
    for (int tile = 0; tile < ntiles; tile++) {
        const int r0 = tile / ntn * tm, c0 = tile % ntn * tn;
        const int r1 = r0 + tm < M ? r0 + tm : M, c1 = c0 + tn < N ? c0 + tn : N;
        /* rows r0.. of op(A): row offset when A is [M][K], column offset when [K][M] */
        const float *a = transA ? A + r0 : A + (size_t)r0 * lda;
        /* columns c0.. of op(B): column offset when B is [K][N], row offset when [N][K] */
        const float *b = transB ? B + (size_t)c0 * ldb : B + c0;
        cblas_sgemm(CblasRowMajor, ta, tb, r1 - r0, c1 - c0, K, alpha, a, lda, b, ldb, beta,
                    C + (size_t)r0 * ldc + c0, ldc);
    }
}
