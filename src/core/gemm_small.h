#ifndef MOE_GEMM_SMALL_H
#define MOE_GEMM_SMALL_H

/* Rows of A up to which the small kernel beats OpenBLAS's sgemm at its best
 * (`moe bench small-gemm`, N = K = 256, one thread). AVX-512 (SkylakeX
 * kernels): 225 vs 142 GFLOP/s at M = 32, 219 vs 189 at 64, 197 vs 212 at 96;
 * under OpenBLAS's Haswell kernels the kernel wins at every M measured.
 * AVX2 + FMA (Zen 3, OpenBLAS Zen kernels, three runs): +10-25% up to M = 32,
 * -5% at 48, -10-17% at 64. */
#if defined(__AVX512F__)
#define MOE__SMALL_M_MAX 64
#else
#define MOE__SMALL_M_MAX 40
#endif

/* Packs A [M][K] (row stride lda) into work: 64-byte aligned, at least
 * K * round_up(M, 16) floats. One packing serves several products. */
void moe__sgemm_small_pack(int M, int K, const float *A, int lda, float *work);
/* C [M][N] = (or +=, when accumulate) A B^T with A packed in work and
 * B [N][K] row-major (row stride ldb), read in place. */
void moe__sgemm_small_nt(int M, int N, int K, const float *work, const float *B, int ldb, float *C, int ldc,
                         int accumulate);
/* 1 when built with the AVX-512 or the AVX2 + FMA kernel, 0 when it falls
 * back to BLAS. */
int moe__sgemm_small_enabled(void);

#endif
