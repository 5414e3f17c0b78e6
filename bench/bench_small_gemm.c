/* `moe bench small-gemm`: the experts' in-place kernel for few rows
 * (src/core/gemm_small.c) against OpenBLAS sgemm, one thread, C = A B^T with
 * N = K = 256 as in S3; the rows M sweep where the kernel is used. */
#include "bench.h"

#include "gemm_small.h"
#include "internal.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int moe_bench_small_gemm_main(int argc, char **argv) {
    if (argc > 0) {
        printf("usage: moe bench small-gemm\n  one thread, N = K = 256, M in 16..128: GFLOP/s of the in-place kernel\n"
               "  and of OpenBLAS sgemm (best of 50 calls each); the kernel is used up to M = %d\n",
               MOE__SMALL_M_MAX);
        return strcmp(argv[0], "--help") && strcmp(argv[0], "-h") ? 2 : 0;
    }
    const int N = 256, K = 256, Ms[] = {16, 32, 48, 64, 96, 128};
    float *a = malloc(sizeof(float) * 128 * K), *b = malloc(sizeof(float) * N * K), *c = malloc(sizeof(float) * 128 * N);
    float *w = moe__aligned_alloc(sizeof(float) * K * 128);
    for (int i = 0; i < 128 * K; i++) a[i] = (float)((i * 37) % 101) / 101.0f - 0.5f;
    for (int i = 0; i < N * K; i++) b[i] = (float)((i * 53) % 97) / 97.0f - 0.5f;
    moe__blas_single_thread();
    printf("OpenBLAS kernel %s, 1 thread, N = K = 256%s\n", moe_blas_info(),
           moe__sgemm_small_enabled() ? "" : " (built without AVX-512 or AVX2 + FMA: the kernel falls back to BLAS)");
    printf("%5s %14s %14s\n", "M", "kernel GF/s", "OpenBLAS GF/s");
    for (size_t i = 0; i < sizeof Ms / sizeof Ms[0]; i++) {
        const int M = Ms[i];
        double tk = 1e9, tb = 1e9;
        for (int r = 0; r < 50; r++) {
            double t0 = now_ms();
            moe__sgemm_small_pack(M, K, a, K, w);
            moe__sgemm_small_nt(M, N, K, w, b, K, c, N, 0);
            double t1 = now_ms();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, a, K, b, K, 0.0f, c, N);
            double t2 = now_ms();
            tk = t1 - t0 < tk ? t1 - t0 : tk;
            tb = t2 - t1 < tb ? t2 - t1 : tb;
        }
        const double f = 2.0 * M * N * K / 1e6;
        printf("%5d %14.1f %14.1f\n", M, f / tk, f / tb);
    }
    free(a), free(b), free(c);
    moe__afree(w);
    return 0;
}
