/* The few-row expert GEMM (src/core/gemm_small.c): every compiled kernel
 * (AVX-512, AVX2 + FMA) computes each output as one sequential FMA chain over
 * k, so it must equal a scalar fmaf chain bit for bit, for every shape of the
 * blocking (rows 1..64 around the 8/16/32-row blocks, column tails of the
 * 6- and 8-column blocks, odd K) and with accumulation. The BLAS fallback
 * is held to a tolerance instead. */
#include "test.h"

#include "core/gemm_small.h"
#include "internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

TEST(gemm_small_equals_the_sequential_fma_chain) {
    const int Ms[] = {1, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 48, 63, 64};
    const int Ns[] = {1, 5, 6, 7, 8, 12, 13, 17};
    const int Ks[] = {1, 3, 16, 37};
    const int exact = moe__sgemm_small_enabled();
    uint64_t s = 12345;
    float a[64 * 37], b[17 * 37], c[64 * 17], ref[64 * 17];
    float *work = moe__aligned_alloc(sizeof(float) * 64 * 37 + 64);
    if (!work) return;
    for (size_t i = 0; i < sizeof a / sizeof a[0]; i++) s = s * 6364136223846793005ULL + 1, a[i] = (float)(int)(s >> 40) / 8388608.0f - 1;
    for (size_t i = 0; i < sizeof b / sizeof b[0]; i++) s = s * 6364136223846793005ULL + 1, b[i] = (float)(int)(s >> 40) / 8388608.0f - 1;
    int bad = 0, cases = 0;
    for (size_t im = 0; im < sizeof Ms / sizeof *Ms; im++)
        for (size_t in = 0; in < sizeof Ns / sizeof *Ns; in++)
            for (size_t ik = 0; ik < sizeof Ks / sizeof *Ks; ik++)
                for (int acc = 0; acc < 2; acc++) {
                    const int M = Ms[im], N = Ns[in], K = Ks[ik];
                    for (int i = 0; i < M * N; i++) c[i] = ref[i] = acc ? 0.25f * (float)(i % 7) : NAN;
                    for (int m = 0; m < M; m++)
                        for (int n = 0; n < N; n++) {
                            float x = 0.0f;
                            for (int k = 0; k < K; k++) x = fmaf(a[m * K + k], b[n * K + k], x);
                            ref[m * N + n] = acc ? ref[m * N + n] + x : x;
                        }
                    moe__sgemm_small_pack(M, K, a, K, work);
                    moe__sgemm_small_nt(M, N, K, work, b, K, c, N, acc);
                    for (int i = 0; i < M * N; i++) {
                        const int ok = exact ? !memcmp(&c[i], &ref[i], sizeof(float))
                                             : fabsf(c[i] - ref[i]) <= 1e-5f * (1 + fabsf(ref[i]));
                        if (!ok && bad++ < 5)
                            CHECK_MSG(0, "M %d N %d K %d acc %d: [%d][%d] = %.9g, the chain gives %.9g", M, N, K, acc,
                                      i / N, i % N, (double)c[i], (double)ref[i]);
                    }
                    cases++;
                }
    CHECK_EQ_INT(bad, 0);
    CHECK_EQ_INT(cases, 14 * 8 * 4 * 2);
    moe__afree(work);
}
