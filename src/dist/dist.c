/* Communicator: MPI (MOE_MPI) or a single process. See dist.h. */
#include "dist/dist.h"

#include <limits.h>
#include <string.h>

#ifdef MOE_MPI
#include <mpi.h>
#define COMM(d) (*(MPI_Comm *)(d)->comm)
#endif

static size_t dsize(moe__dist_type t) { return t == MOE__DIST_F64 ? sizeof(double) : sizeof(float); }

moe_dist *moe_dist_world(int *err, char *errbuf, size_t errbuf_size) {
    moe_dist *d = moe__calloc(1, sizeof *d);
    if (!d) {
        if (err) *err = MOE_ENOMEM;
        moe__set_err(errbuf, errbuf_size, MOE_ENOMEM, "out of memory creating the communicator");
        return NULL;
    }
    d->size = 1;
#ifdef MOE_MPI
    int inited = 0, finalized = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&finalized);
    if (finalized) { /* MPI cannot start twice in a process */
        moe__free(d);
        if (err) *err = MOE_ESTATE;
        moe__set_err(errbuf, errbuf_size, MOE_ESTATE, "MPI was finalized: the communicator cannot be made again");
        return NULL;
    }
    if (!inited) {
        int provided;
        /* the library calls MPI from the main thread only, outside OpenMP regions */
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
            moe__free(d);
            if (err) *err = MOE_EIO;
            moe__set_err(errbuf, errbuf_size, MOE_EIO, "MPI_Init_thread failed");
            return NULL;
        }
        d->owns_init = 1;
    }
    d->comm = moe__malloc(sizeof(MPI_Comm));
    if (!d->comm || MPI_Comm_dup(MPI_COMM_WORLD, (MPI_Comm *)d->comm) != MPI_SUCCESS) {
        moe__free(d->comm);
        moe__free(d);
        if (err) *err = MOE_EIO;
        moe__set_err(errbuf, errbuf_size, MOE_EIO, "MPI_Comm_dup failed");
        return NULL;
    }
    MPI_Comm_rank(COMM(d), &d->rank);
    MPI_Comm_size(COMM(d), &d->size);
#endif
    if (err) *err = MOE_OK;
    return d;
}

void moe_dist_free(moe_dist *d) {
    if (!d) return;
#ifdef MOE_MPI
    if (d->comm) {
        MPI_Comm_free((MPI_Comm *)d->comm);
        moe__free(d->comm);
    }
    int fin = 0;
    MPI_Finalized(&fin);
    if (d->owns_init && !fin) MPI_Finalize();
#endif
    moe__afree(d->scratch);
    moe__free(d);
}

int moe_dist_rank(const moe_dist *d) { return d ? d->rank : 0; }
int moe_dist_size(const moe_dist *d) { return d ? d->size : 1; }
int moe_dist_is_mpi(void) {
#ifdef MOE_MPI
    return 1;
#else
    return 0;
#endif
}

#ifdef MOE_MPI
static int mpi_fail(moe_dist *d, int rc, const char *what) {
    char s[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, s, &len);
    return moe__set_err(d->err, sizeof d->err, MOE_EIO, "%s: %s", what, s);
}
#define MPI_CHECK(call, what)                                                                      \
    do {                                                                                           \
        int rc_ = (call);                                                                          \
        if (rc_ != MPI_SUCCESS) return mpi_fail(d, rc_, what);                                     \
    } while (0)
#endif

int moe__dist_alltoall_int(moe_dist *d, const int *send, int *recv, int per) {
    if (d->size == 1) {
        memmove(recv, send, sizeof(int) * (size_t)per);
        return MOE_OK;
    }
#ifdef MOE_MPI
    MPI_CHECK(MPI_Alltoall(send, per, MPI_INT, recv, per, MPI_INT, COMM(d)), "MPI_Alltoall");
#endif
    return MOE_OK;
}

int moe__dist_allgather_int(moe_dist *d, const int *send, int *recv, int per) {
    if (d->size == 1) {
        memmove(recv, send, sizeof(int) * (size_t)per);
        return MOE_OK;
    }
#ifdef MOE_MPI
    MPI_CHECK(MPI_Allgather(send, per, MPI_INT, recv, per, MPI_INT, COMM(d)), "MPI_Allgather");
#endif
    return MOE_OK;
}

int moe__dist_alltoallv_rows(moe_dist *d, const float *send, const int *send_rows, float *recv,
                             const int *recv_rows, int cols) {
    if (d->size == 1) {
        memmove(recv, send, sizeof(float) * (size_t)send_rows[0] * (size_t)cols);
        return MOE_OK;
    }
#ifdef MOE_MPI
    /* counts in rows of a contiguous type: int counts cover 2^31 rows, not
     * 2^31 floats */
    const int P = d->size;
    int sd[P], rd[P];
    long long s = 0, r = 0;
    for (int q = 0; q < P; q++) {
        if (s > INT_MAX || r > INT_MAX)
            return moe__set_err(d->err, sizeof d->err, MOE_ELIMIT, "all-to-all: more than %d rows", INT_MAX);
        sd[q] = (int)s, rd[q] = (int)r;
        s += send_rows[q], r += recv_rows[q];
    }
    MPI_Datatype row;
    MPI_CHECK(MPI_Type_contiguous(cols, MPI_FLOAT, &row), "MPI_Type_contiguous");
    MPI_Type_commit(&row);
    const int rc = MPI_Alltoallv(send, send_rows, sd, row, recv, recv_rows, rd, row, COMM(d));
    MPI_Type_free(&row);
    if (rc != MPI_SUCCESS) return mpi_fail(d, rc, "MPI_Alltoallv");
#endif
    return MOE_OK;
}

int moe__dist_allgatherv_rows(moe_dist *d, const void *send, void *recv, const int *rows, size_t row_bytes) {
    if (d->size == 1) {
        memmove(recv, send, row_bytes * (size_t)rows[0]);
        return MOE_OK;
    }
#ifdef MOE_MPI
    const int P = d->size;
    int off[P];
    long long r = 0;
    for (int q = 0; q < P; q++) {
        if (r > INT_MAX || rows[q] < 0)
            return moe__set_err(d->err, sizeof d->err, MOE_ELIMIT, "all-gather: %d rows from rank %d after %lld",
                                rows[q], q, r);
        off[q] = (int)r;
        r += rows[q];
    }
    if (row_bytes > INT_MAX)
        return moe__set_err(d->err, sizeof d->err, MOE_ELIMIT, "all-gather: rows of %zu bytes", row_bytes);
    MPI_Datatype row;
    MPI_CHECK(MPI_Type_contiguous((int)row_bytes, MPI_BYTE, &row), "MPI_Type_contiguous");
    MPI_Type_commit(&row);
    const int rc = MPI_Allgatherv(send, rows[d->rank], row, recv, rows, off, row, COMM(d));
    MPI_Type_free(&row);
    if (rc != MPI_SUCCESS) return mpi_fail(d, rc, "MPI_Allgatherv");
#endif
    return MOE_OK;
}

#ifdef MOE_MPI
static int grow_scratch(moe_dist *d, size_t bytes) {
    if (bytes <= d->scratch_bytes) return MOE_OK;
    void *p = moe__aligned_alloc(bytes);
    if (!p) return moe__set_err(d->err, sizeof d->err, MOE_ENOMEM, "all-reduce: out of memory (%zu bytes)", bytes);
    moe__afree(d->scratch);
    d->scratch = p;
    d->scratch_bytes = bytes;
    return MOE_OK;
}
#endif

int moe__dist_allreduce_sum(moe_dist *d, void *buf, size_t n, moe__dist_type type) {
    if (d->size == 1 || n == 0) return MOE_OK;
#ifdef MOE_MPI
    /* MPI_Allreduce does not promise an order of the additions (nor the same
     * bits on every rank); this one owns it. Rank q sums block q of every
     * rank's buffer in rank order, then every rank gathers every block. */
    const int P = d->size;
    const size_t es = dsize(type);
    if (n / (size_t)P + 1 > (size_t)INT_MAX / 2)
        return moe__set_err(d->err, sizeof d->err, MOE_ELIMIT, "all-reduce of %zu values: blocks too large", n);
    int cnt[P], off[P], rcnt[P], roff[P];
    cnt[0] = 0;
    for (int q = 0; q < P; q++) {
        const size_t a = n * (size_t)q / (size_t)P, b = n * (size_t)(q + 1) / (size_t)P;
        off[q] = (int)a, cnt[q] = (int)(b - a);
    }
    const int me = d->rank < P ? d->rank : 0, len = cnt[me];
    for (int q = 0; q < P; q++) rcnt[q] = len, roff[q] = q * len;
    size_t bytes;
    if (moe__mul_size((size_t)P * (size_t)(len ? len : 1), es, &bytes))
        return moe__set_err(d->err, sizeof d->err, MOE_ELIMIT, "all-reduce: size overflow");
    int rc = grow_scratch(d, bytes);
    if (rc) return rc;
    const MPI_Datatype mt = type == MOE__DIST_F64 ? MPI_DOUBLE : MPI_FLOAT;
    MPI_CHECK(MPI_Alltoallv(buf, cnt, off, mt, d->scratch, rcnt, roff, mt, COMM(d)), "MPI_Alltoallv (reduce)");
    if (type == MOE__DIST_F64) {
        double *s = d->scratch, *o = (double *)buf + off[me];
        for (int i = 0; i < len; i++) {
            double acc = s[i];
            for (int q = 1; q < P; q++) acc += s[(size_t)q * len + i];
            o[i] = acc;
        }
    } else {
        float *s = d->scratch, *o = (float *)buf + off[me];
        for (int i = 0; i < len; i++) {
            float acc = s[i];
            for (int q = 1; q < P; q++) acc += s[(size_t)q * len + i];
            o[i] = acc;
        }
    }
    MPI_CHECK(MPI_Allgatherv(MPI_IN_PLACE, 0, mt, buf, cnt, off, mt, COMM(d)), "MPI_Allgatherv");
#else
    (void)buf, (void)type, (void)dsize;
#endif
    return MOE_OK;
}

int moe__dist_allreduce_max_int(moe_dist *d, int *buf, int n) {
    if (d->size == 1) return MOE_OK;
#ifdef MOE_MPI
    MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buf, n, MPI_INT, MPI_MAX, COMM(d)), "MPI_Allreduce (max)");
#endif
    return MOE_OK;
}

int moe__dist_barrier(moe_dist *d) {
    if (d->size == 1) return MOE_OK;
#ifdef MOE_MPI
    MPI_CHECK(MPI_Barrier(COMM(d)), "MPI_Barrier");
#endif
    return MOE_OK;
}

int moe__dist_gather_f32(moe_dist *d, const float *send, size_t n, float *recv, int root) {
    if (d->size == 1) {
        memmove(recv, send, sizeof(float) * n);
        return MOE_OK;
    }
#ifdef MOE_MPI
    if (n > INT_MAX) return moe__set_err(d->err, sizeof d->err, MOE_ELIMIT, "gather of %zu floats", n);
    MPI_CHECK(MPI_Gather(send, (int)n, MPI_FLOAT, recv, (int)n, MPI_FLOAT, root, COMM(d)), "MPI_Gather");
#else
    (void)root;
#endif
    return MOE_OK;
}

static moe_dist *g_dist;
void moe_set_dist(moe_dist *d) { g_dist = d; }
moe_dist *moe__dist_default(void) { return g_dist; }
moe_dist *moe_get_dist(void) { return g_dist; }

int moe_dist_any(moe_dist *d, int flag) {
    int v = flag != 0;
    if (!d || moe__dist_allreduce_max_int(d, &v, 1)) return flag != 0;
    return v;
}

const char *moe_dist_errmsg(const moe_dist *d) { return d ? d->err : "communicator is NULL"; }
