/* Deterministic parallel GEMM for the model's dense matmuls.
 *
 * OpenBLAS runs single-threaded in this library (moe__blas_single_thread);
 * the parallelism is ours. moe__gemm splits C into output tiles whose sizes
 * depend only on M and N (never on the thread count); each tile is one
 * single-threaded cblas_sgemm over the full K, so every element of C is
 * computed by the same call, in the same order, for any number of threads.
 */
#ifndef MOE_GEMM_H
#define MOE_GEMM_H

/* Output tile: at most MOE__GEMM_TILE_M rows x MOE__GEMM_TILE_N columns.
 * Rows shrink (by halves, down to MOE__GEMM_TILE_M_MIN) while there would be
 * fewer than MOE__GEMM_MIN_TILES tiles; a function of M and N only. */
#define MOE__GEMM_TILE_M 256
#define MOE__GEMM_TILE_M_MIN 32
#define MOE__GEMM_TILE_N 512
#define MOE__GEMM_MIN_TILES 8

/* Row-major cblas_sgemm semantics:
 *   C [M][N] (row stride ldc) = alpha * op(A) op(B) + beta * C
 *   op(A) [M][K]: A is [M][lda] when !transA, [K][lda] when transA;
 *   op(B) [K][N]: B is [K][ldb] when !transB, [N][ldb] when transB.
 * beta == 0 overwrites C without reading it (NaN in C do not propagate).
 * K == 0 gives C = beta*C. threads <= 0: the library default. Must not be
 * called from inside an OpenMP parallel region of more than one thread (it
 * would run with one thread; still correct and deterministic). */
void moe__gemm(int transA, int transB, int M, int N, int K, float alpha, const float *A, int lda,
               const float *B, int ldb, float beta, float *C, int ldc, int threads);

/* The tile rows moe__gemm uses for an M x N output (exposed for tests). */
int moe__gemm_tile_m(int M, int N);

#endif
