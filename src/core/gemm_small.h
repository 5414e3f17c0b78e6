#ifndef MOE_GEMM_SMALL_H
#define MOE_GEMM_SMALL_H

/* Rows of A up to which the small kernel beats OpenBLAS's sgemm at its best
 * (SkylakeX kernels; `moe bench small-gemm`, N = K = 256, one thread: 225 vs
 * 142 GFLOP/s at M = 32, 219 vs 189 at 64, 197 vs 212 at 96; under OpenBLAS's
 * Haswell kernels the kernel wins at every M measured). */
#define MOE__SMALL_M_MAX 64

/* Packs A [M][K] (row stride lda) into work: 64-byte aligned, at least
 * K * round_up(M, 16) floats. One packing serves several products. */
void moe__sgemm_small_pack(int M, int K, const float *A, int lda, float *work);
/* C [M][N] = (or +=, when accumulate) A B^T with A packed in work and
 * B [N][K] row-major (row stride ldb), read in place. */
void moe__sgemm_small_nt(int M, int N, int K, const float *work, const float *B, int ldb, float *C, int ldc,
                         int accumulate);
/* 1 when built with the AVX-512 kernel, 0 when it falls back to BLAS. */
int moe__sgemm_small_enabled(void);

#endif
