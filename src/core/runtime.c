#include "internal.h"

#include <cblas.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static int g_threads; /* 0: OpenMP default */

/* 4 threads per online CPU: past that a team only adds contention, and a
 * team of 100000 makes libgomp fail to create its threads (it crashed
 * rather than return an error). */
int moe_max_threads(void) {
    /* read once: moe__threads asks on every GEMM and op call, and glibc's
     * sysconf opens /sys/devices/system/cpu/online each time (two threads
     * racing here store the same value) */
    static int cached;
    int most = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (!most) {
        const long n = sysconf(_SC_NPROCESSORS_ONLN);
        most = n < 1 ? 4 : n > 1024 ? 4096 : 4 * (int)n;
        __atomic_store_n(&cached, most, __ATOMIC_RELAXED);
    }
    return most;
}

void moe_set_num_threads(int n) {
    const int most = moe_max_threads();
    g_threads = n > most ? most : n > 0 ? n : 0;
}

int moe_get_num_threads(void) {
    const int n = g_threads > 0 ? g_threads : omp_get_max_threads(), most = moe_max_threads();
    return n > most ? most : n;
}

/* The constructors refuse counts above the cap (moe__check_threads); this
 * clamp is the last line for any path that did not. */
int moe__threads(int n) {
    const int most = moe_max_threads();
    return n > most ? most : n > 0 ? n : moe_get_num_threads();
}

int moe__check_threads(int n, const char *what, char *err, size_t errsz) {
    const int most = moe_max_threads();
    if (n < 0 || n > most)
        return moe__set_err(err, errsz, MOE_EINVAL, "%s: %d threads; the range is 0 (the default) to %d (4 per CPU "
                            "of this machine)", what, n, most);
    return MOE_OK;
}

/* OpenBLAS (pthread build) would start its own threads inside our OpenMP
 * regions and oversubscribe the cores; we hand it one thread and split the
 * work ourselves, which also makes every output element's reduction order
 * independent of the thread count. */
void moe__blas_single_thread(void) {
    if (openblas_get_num_threads() != 1) openblas_set_num_threads(1);
}

/* OpenBLAS 0.3.21 (Debian 12) does not know AMD Zen 4/5 and runs its AVX2
 * "Haswell"/"Zen" kernels there although the CPU has AVX-512; its SkylakeX
 * kernels are about 1.9x faster on this project's machine (sgemm 2048^3,
 * 2 threads: 238 -> 455 GFLOP/s). OpenBLAS picks its kernel when it is loaded,
 * from OPENBLAS_CORETYPE, so only a program that has not started yet can
 * use this hint (the CLI re-executes itself once). */
const char *moe_blas_coretype_hint(void) {
    if (getenv("OPENBLAS_CORETYPE")) return NULL;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512dq") || !__builtin_cpu_supports("avx512vl"))
        return NULL;
    const char *core = openblas_get_corename();
    if (!core || (strcasecmp(core, "Haswell") != 0 && strcasecmp(core, "Zen") != 0)) return NULL;
    return "SkylakeX";
}

const char *moe_blas_info(void) {
    const char *core = openblas_get_corename();
    return core ? core : "unknown";
}
