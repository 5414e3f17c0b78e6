/* Expert parallelism for the inference engine (docs/distributed.md).
 *
 * Under a communicator of P > 1 ranks every rank runs the whole model except
 * the routed experts: embeddings, attention, norms, the router and the shared
 * expert are replicated and compute the same bits on every rank (the same
 * tokens through the same deterministic kernels). Rank r computes only the
 * experts [first, end) of its range, for the (token, slot) pairs routed to
 * them, exactly as one process computes them (same rows in token order, same
 * kernel calls). The slot outputs then travel by one all-gather, and every
 * rank combines all slots in the fixed top-k order: the logits are
 * bit-identical to the single process. With a mapped file a rank never reads
 * another rank's experts, so their pages are never loaded.
 *
 * Every function here is a collective: the engine calls them in the same
 * order on every rank.
 */
#include "infer/infer.h"
#include "dist/dist.h"

#include <stdint.h>
#include <string.h>

struct moe__engine_ep {
    moe_dist *d;
    int P, rank, first, end; /* this rank's experts: [first, end) */
    int E, C;
    int *owner;              /* [E] rank of each expert */
    int *rows, *off, *cur;   /* [P] rows each rank computed; offsets; cursors */
    int *check;              /* [P][P + 1] every rank's rows and routing hash */
    float *send, *recv;      /* [cap][C] this rank's slot rows; every rank's */
    size_t cap;
};

/* Rank q holds experts [q E / P, (q + 1) E / P): any P <= E works, and E % P
 * == 0 gives the E / P per rank of training. */
static int range_lo(int q, int E, int P) { return (int)((long long)q * E / P); }

int moe__engine_ep_agree(int rc, char *err, size_t errsz) {
    moe_dist *d = moe__dist_default();
    if (!d || d->size == 1) return rc;
    int v = -rc; /* error codes are negative: the largest -rc wins */
    if (moe__dist_allreduce_max_int(d, &v, 1))
        return rc ? rc : moe__set_err(err, errsz, MOE_EIO, "expert parallelism: %s", moe_dist_errmsg(d));
    if (v > 0 && rc == MOE_OK)
        return moe__set_err(err, errsz, -v, "expert parallelism: another rank failed to load the model (%s)",
                            moe_strerror(-v));
    return rc;
}

int moe__engine_ep_create(int n_expert, int C, size_t rows, moe__engine_ep **out, char *err, size_t errsz) {
    *out = NULL;
    moe_dist *d = moe__dist_default();
    if (!d || d->size == 1) return MOE_OK;
    const int P = d->size;
    if (n_expert < P)
        return moe__set_err(err, errsz, MOE_EINVAL, "expert parallelism: %d ranks for %d experts (at most one rank per expert)",
                            P, n_expert);
    moe__engine_ep *ep = moe__calloc(1, sizeof *ep);
    if (!ep) return moe__set_err(err, errsz, MOE_ENOMEM, "expert parallelism: out of memory");
    ep->d = d, ep->P = P, ep->rank = d->rank, ep->E = n_expert, ep->C = C;
    ep->first = range_lo(d->rank, n_expert, P), ep->end = range_lo(d->rank + 1, n_expert, P);
    ep->owner = moe__malloc(sizeof(int) * (size_t)n_expert);
    ep->rows = moe__malloc(sizeof(int) * 3 * (size_t)P);
    ep->check = moe__malloc(sizeof(int) * (size_t)P * (P + 1));
    int rc = ep->owner && ep->rows && ep->check ? moe__engine_ep_reserve(ep, rows) : MOE_ENOMEM;
    if (rc) {
        moe__engine_ep_free(ep);
        return moe__set_err(err, errsz, rc, "expert parallelism: out of memory for %zu slot rows", rows);
    }
    ep->off = ep->rows + P, ep->cur = ep->rows + 2 * P;
    for (int q = 0; q < P; q++)
        for (int x = range_lo(q, n_expert, P); x < range_lo(q + 1, n_expert, P); x++) ep->owner[x] = q;
    *out = ep;
    return MOE_OK;
}

int moe__engine_ep_reserve(moe__engine_ep *ep, size_t rows) {
    if (rows <= ep->cap) return MOE_OK;
    size_t n;
    if (moe__mul_size(rows, (size_t)ep->C * sizeof(float), &n)) return MOE_ELIMIT;
    float *s = moe__aligned_alloc(n), *r = moe__aligned_alloc(n);
    if (!s || !r) {
        moe__afree(s), moe__afree(r);
        return MOE_ENOMEM;
    }
    moe__afree(ep->send), moe__afree(ep->recv);
    ep->send = s, ep->recv = r, ep->cap = rows;
    return MOE_OK;
}

void moe__engine_ep_free(moe__engine_ep *ep) {
    if (!ep) return;
    moe__free(ep->owner), moe__free(ep->rows), moe__free(ep->check);
    moe__afree(ep->send), moe__afree(ep->recv);
    moe__free(ep);
}

void moe__engine_ep_range(const moe__engine_ep *ep, int *first, int *end) {
    *first = ep->first;
    *end = ep->end;
}

int moe__engine_ep_exchange(moe__engine_ep *ep, const int *sel, int stride, int n, int K, const int *pos, float *outs,
                            char *err, size_t errsz) {
    const int P = ep->P, C = ep->C;
    const size_t rb = sizeof(float) * (size_t)C;
    /* the rows each rank computed follow from the routing, which every rank
     * holds; a hash of it checks that they all hold the same (a rank that
     * routed differently would otherwise unpack the wrong rows) */
    uint64_t h = 1469598103934665603ull ^ (uint64_t)n ^ ((uint64_t)K << 32);
    memset(ep->rows, 0, sizeof(int) * (size_t)P);
    for (int t = 0; t < n; t++)
        for (int s = 0; s < K; s++) {
            const int x = sel[(size_t)t * stride + s];
            ep->rows[ep->owner[x]]++;
            h = (h ^ (uint64_t)(unsigned)x) * 1099511628211ull;
        }
    int mine[P + 1];
    memcpy(mine, ep->rows, sizeof(int) * (size_t)P);
    mine[P] = (int)(h ^ (h >> 32));
    if (moe__dist_allgather_int(ep->d, mine, ep->check, P + 1))
        return moe__set_err(err, errsz, MOE_EIO, "expert parallelism: %s", moe_dist_errmsg(ep->d));
    for (int q = 0; q < P; q++)
        if (memcmp(ep->check + (size_t)q * (P + 1), mine, sizeof(int) * (size_t)(P + 1)))
            return moe__set_err(err, errsz, MOE_ESTATE,
                                "expert parallelism: rank %d routed the batch differently from rank %d", q, ep->rank);
    /* this rank's slot rows in (token, slot) order */
    size_t i = 0;
    for (int t = 0; t < n; t++)
        for (int s = 0; s < K; s++)
            if (ep->owner[sel[(size_t)t * stride + s]] == ep->rank)
                memcpy(ep->send + i++ * C, outs + (size_t)pos[t * K + s] * C, rb);
    if (moe__dist_allgatherv_rows(ep->d, ep->send, ep->recv, ep->rows, rb))
        return moe__set_err(err, errsz, MOE_EIO, "expert parallelism: %s", moe_dist_errmsg(ep->d));
    /* the other ranks' rows back into their (token, slot) places */
    int acc = 0;
    for (int q = 0; q < P; q++) ep->off[q] = acc, acc += ep->rows[q], ep->cur[q] = 0;
    for (int t = 0; t < n; t++)
        for (int s = 0; s < K; s++) {
            const int q = ep->owner[sel[(size_t)t * stride + s]];
            const size_t row = (size_t)ep->off[q] + (size_t)ep->cur[q]++;
            if (q != ep->rank) memcpy(outs + (size_t)pos[t * K + s] * C, ep->recv + row * C, rb);
        }
    return MOE_OK;
}
