/* `moe bench bandwidth`: the machine's streaming read bandwidth, the ceiling
 * of decoding (each token reads its active weights once: `moe generate`
 * reports weights read per token and the rate they were read at). Threads
 * sum disjoint contiguous parts of a buffer far larger than the caches,
 * each part first touched by the thread that reads it. */
#include "bench.h"

#include "../cli/args.h"
#include "internal.h"

#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float read_all(const float *a, size_t n, int threads) {
    float total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        const size_t nt = (size_t)omp_get_num_threads(), id = (size_t)omp_get_thread_num();
        const size_t lo = n * id / nt, hi = n * (id + 1) / nt;
        float acc[64] = {0}; /* independent lanes: the sum is never the bottleneck */
        for (size_t i = lo; i + 64 <= hi; i += 64)
#pragma omp simd
            for (int j = 0; j < 64; j++) acc[j] += a[i + j];
        for (int j = 0; j < 64; j++) total += acc[j];
    }
    return total;
}

int moe_bench_bandwidth_main(int argc, char **argv) {
    int mib = 1024, max_threads = 2, reps = 10;
    cli_arg args[] = {
        {"--mib", NULL, ARG_INT, &mib, "buffer size in MiB (far larger than the caches)", RANGE(1, 1 << 20)},
        {"--threads", "-t", ARG_INT, &max_threads, "measure with 1 .. this many threads", RANGE(1, moe_max_threads())},
        {"--reps", NULL, ARG_INT, &reps, "passes per thread count (the best one counts)", AT_LEAST(1)},
    };
    const int rc = cli_parse("moe bench bandwidth [--mib 1024] [-t 2] [--reps 10]", args, sizeof args / sizeof args[0],
                             argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (mib < 1 || max_threads < 1 || reps < 1) {
        fprintf(stderr, "moe bench bandwidth: --mib, -t and --reps must be positive\n");
        return 2;
    }
    const size_t n = (size_t)mib << 18; /* floats */
    float *a = moe__aligned_alloc(n * sizeof(float));
    if (!a) {
        fprintf(stderr, "moe bench bandwidth: cannot allocate %d MiB\n", mib);
        return 1;
    }
    printf("streaming read of %d MiB, best of %d\n%8s %10s\n", mib, reps, "threads", "GB/s");
    for (int t = 1; t <= max_threads; t++) {
#pragma omp parallel num_threads(t)
        { /* first touch by the reader of each part (NUMA, page faults out of the timing) */
            const size_t nt = (size_t)omp_get_num_threads(), id = (size_t)omp_get_thread_num();
            for (size_t i = n * id / nt; i < n * (id + 1) / nt; i++) a[i] = (float)(i & 1023) * 1e-3f;
        }
        double best = 1e30;
        float sink = 0;
        for (int r = 0; r < reps; r++) {
            const double t0 = omp_get_wtime();
            sink += read_all(a, n, t);
            const double dt = omp_get_wtime() - t0;
            best = dt < best ? dt : best;
        }
        printf("%8d %10.2f%s\n", t, (double)n * sizeof(float) / best / 1e9, sink == 0.5f ? " " : "");
    }
    moe__afree(a);
    return 0;
}
