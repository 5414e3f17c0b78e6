/* The communicator under expert parallelism: rank, size and the few
 * collectives the layer and the trainer need. Built on MPI when MOE_MPI is
 * defined; otherwise a single-process implementation (size 1, collectives are
 * copies), so the library runs the same code paths in both builds.
 *
 * Every collective must be called by every rank in the same order, with any
 * row count (zero included). Sums are taken in rank order 0..P-1, so every
 * rank gets bit-identical values and reruns give the same bits.
 */
#ifndef MOE_DIST_H
#define MOE_DIST_H

#include "internal.h"

struct moe_dist {
    int rank, size;
    int owns_init;          /* MPI_Init was ours: finalize on free */
    void *comm;             /* MPI_Comm (MOE_MPI builds) */
    void *scratch;          /* reduction scratch, grown on demand */
    size_t scratch_bytes;
    char err[256];
};

typedef enum moe__dist_type { MOE__DIST_F32, MOE__DIST_F64 } moe__dist_type;

/* recv [P][per] = what each rank sent to this one: send [P][per] ints. */
int moe__dist_alltoall_int(moe_dist *d, const int *send, int *recv, int per);
/* recv [P][per] = every rank's send [per] ints (all-gather). */
int moe__dist_allgather_int(moe_dist *d, const int *send, int *recv, int per);
/* Rows of `cols` floats: send holds send_rows[q] rows for rank q, rank after
 * rank; recv receives recv_rows[s] rows from rank s, rank after rank. */
int moe__dist_alltoallv_rows(moe_dist *d, const float *send, const int *send_rows, float *recv,
                             const int *recv_rows, int cols);
/* Rows of row_bytes bytes: recv [sum rows] = every rank's send rows, rank
 * after rank; rows [P] is what each rank sends (every rank passes the same
 * rows). */
int moe__dist_allgatherv_rows(moe_dist *d, const void *send, void *recv, const int *rows, size_t row_bytes);
/* buf [n] = the sum over ranks of every rank's buf, added in rank order
 * (reduce-scatter by blocks, then all-gather: bandwidth 2 n per rank). */
int moe__dist_allreduce_sum(moe_dist *d, void *buf, size_t n, moe__dist_type type);
/* buf [n] ints = the maximum over ranks. */
int moe__dist_allreduce_max_int(moe_dist *d, int *buf, int n);
int moe__dist_barrier(moe_dist *d);
/* recv [P][n] on root = every rank's send [n] (others' recv unused). */
int moe__dist_gather_f32(moe_dist *d, const float *send, size_t n, float *recv, int root);
/* The communicator set by moe_set_dist (NULL: one process). */
moe_dist *moe__dist_default(void);

#endif
