#include "internal.h"

#include <cblas.h>
#include <omp.h>

static int g_threads; /* 0: OpenMP default */

void moe_set_num_threads(int n) { g_threads = n > 0 ? n : 0; }

int moe_get_num_threads(void) { return g_threads > 0 ? g_threads : omp_get_max_threads(); }

int moe__threads(int n) { return n > 0 ? n : moe_get_num_threads(); }

/* OpenBLAS (pthread build) would start its own threads inside our OpenMP
 * regions and oversubscribe the cores; we hand it one thread and split the
 * work ourselves, which also makes every output element's reduction order
 * independent of the thread count. */
void moe__blas_single_thread(void) {
    if (openblas_get_num_threads() != 1) openblas_set_num_threads(1);
}
