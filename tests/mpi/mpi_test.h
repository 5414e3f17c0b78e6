/* A tiny harness for the MPI tests (built only with MPI=1, run under mpirun):
 * every rank checks its own share; failures are counted per rank and summed
 * at the end, and rank 0 prints "N passed, N failed". */
#ifndef MOE_MPI_TEST_H
#define MOE_MPI_TEST_H

#include <math.h>
#include <mpi.h>
#include <stdio.h>

extern int mt_rank, mt_size, mt_fail;

#define MT_CHECK(cond, ...)                                                                        \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            mt_fail++;                                                                             \
            fprintf(stderr, "FAIL rank %d/%d %s:%d: ", mt_rank, mt_size, __FILE__, __LINE__);      \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fputc('\n', stderr);                                                                   \
        }                                                                                          \
    } while (0)

/* |a-b| <= atol + rtol |b| */
static inline int mt_close(double a, double b, double atol, double rtol) {
    return fabs(a - b) <= atol + rtol * fabs(b);
}

typedef struct moe_dist moe_dist;
void mt_train_tests(moe_dist *d);
void mt_model_bad_batch(moe_dist *d);
void mt_train_nan_skip(moe_dist *d);
void mt_model_decode(moe_dist *d);
void mt_ckpt_save(moe_dist *d, const char *dir);
void mt_ckpt_resume(moe_dist *d, const char *dir);
void mt_infer_tests(moe_dist *d);

#endif
