/* Expert parallelism: the layer's collectives. Rank r owns the experts
 * [r E_l, (r+1) E_l). After the local counting sort by global expert
 * (dispatch_build) the rows for rank q are contiguous, so one Alltoallv moves
 * them; the receiver regroups them by local expert, keeping source ranks in
 * order, which puts each expert's rows in global token order (rank r holds the
 * tokens after those of ranks < r): the expert GEMMs then see the rows the
 * single-process layer sees. The return path is the exact inverse.
 *
 * Every function here is a collective (or a no-op without dist): the layer
 * calls them in the same order on every rank, with zero tokens too.
 */
#include "layer/layer_impl.h"
#include "dist/dist.h"

#include <limits.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

static int dist_err(moe_layer *l, int rc) {
    return moe__set_err(l->err, sizeof l->err, rc, "expert parallelism: %s", moe_dist_errmsg(l->dist));
}

int moe__ep_agree(moe_layer *l, int rc) {
    if (!l->dist) return rc;
    int v = -rc; /* error codes are negative: the largest -rc wins */
    const double t0 = omp_get_wtime();
    int mrc = moe__dist_allreduce_max_int(l->dist, &v, 1);
    l->ms_a2a += (omp_get_wtime() - t0) * 1e3; /* mostly waiting for the slowest rank */
    if (mrc) return dist_err(l, mrc);
    if (v > 0 && rc == MOE_OK)
        return moe__set_err(l->err, sizeof l->err, -v, "expert parallelism: another rank failed (%s)",
                            moe_strerror(-v));
    return rc;
}

int moe__ep_start(moe_layer *l, int rc, int n) {
    if (!l->dist) {
        l->tok_base = 0;
        l->n_glob = n;
        return rc;
    }
    /* one all-gather carries the token counts and any rank's early failure */
    int mine = rc ? rc : n; /* rc < 0, n >= 0 */
    const double t0 = omp_get_wtime();
    int arc = moe__dist_allgather_int(l->dist, &mine, l->ep_ntok, 1);
    l->ms_a2a += (omp_get_wtime() - t0) * 1e3;
    if (arc) return dist_err(l, arc);
    long long base = 0, total = 0;
    int worst = 0;
    for (int q = 0; q < l->ep_size; q++) {
        const int v = l->ep_ntok[q];
        if (v < 0) {
            if (v < worst) worst = v;
            continue;
        }
        if (q < l->ep_rank) base += v;
        total += v;
    }
    if (rc) return rc;
    if (worst)
        return moe__set_err(l->err, sizeof l->err, worst, "expert parallelism: another rank failed (%s)",
                            moe_strerror(worst));
    if (total > (1LL << 40) || base > 0x7fffffff)
        return moe__set_err(l->err, sizeof l->err, MOE_ELIMIT, "expert parallelism: %lld tokens in the global batch",
                            total);
    /* the sequence-wise aux loss needs whole blocks on every rank (every
     * rank sees every count: all decide alike) */
    const int S = l->cfg.aux_seq_len;
    if (S > 0 && l->cfg.aux_coef > 0) {
        long long start = 0;
        for (int q = 0; q < l->ep_size; q++) {
            if (l->ep_ntok[q] > 0 && start % S)
                return moe__set_err(l->err, sizeof l->err, MOE_EUNSUPPORTED,
                                    "expert parallelism: rank %d's tokens start at global token %lld, inside a "
                                    "block of aux_seq_len = %d (split the batch on whole blocks)", q, start, S);
            start += l->ep_ntok[q];
        }
    }
    l->tok_base = (int)base;
    l->n_glob = total;
    return MOE_OK;
}

int moe__ep_sum(moe_layer *l, double *v, int n) {
    if (!l->dist) return MOE_OK;
    const double t0 = omp_get_wtime();
    int rc = moe__dist_allreduce_sum(l->dist, v, (size_t)n, MOE__DIST_F64);
    l->ms_a2a += (omp_get_wtime() - t0) * 1e3;
    return rc ? dist_err(l, rc) : MOE_OK;
}

int moe__ep_plan(moe_layer *l) {
    if (!l->dist) return MOE_OK;
    const int P = l->ep_size, El = l->e_local;
    const double t0 = omp_get_wtime();
    /* kept [E] is already [P][E_l]: what this rank sends to each rank's experts */
    int rc = moe__dist_alltoall_int(l->dist, l->kept, l->ep_cnt, El);
    l->ms_a2a += (omp_get_wtime() - t0) * 1e3;
    if (rc) return dist_err(l, rc);
    for (int q = 0; q < P; q++) {
        l->ep_send[q] = l->seg_off[(q + 1) * El] - l->seg_off[q * El];
        int r = 0;
        for (int e = 0; e < El; e++) r += l->ep_cnt[q * El + e];
        l->ep_recv[q] = r;
    }
    l->ep_off[0] = 0;
    for (int e = 0; e < El; e++) {
        int r = 0;
        for (int q = 0; q < P; q++) r += l->ep_cnt[q * El + e];
        l->ep_off[e + 1] = l->ep_off[e] + r;
    }
    return MOE_OK;
}

/* Copies rows between the rank-major buffer (source rank, local expert) and
 * the expert-major one (local expert, source rank). */
static void regroup(moe_layer *l, float *rank_major, float *expert_major, int to_expert) {
    const int P = l->ep_size, El = l->e_local, C = l->cfg.d_model;
    const size_t rb = sizeof(float) * (size_t)C;
    memcpy(l->ep_cur, l->ep_off, sizeof(int) * (size_t)El);
    size_t pos = 0;
    for (int q = 0; q < P; q++)
        for (int e = 0; e < El; e++) {
            const int m = l->ep_cnt[q * El + e];
            float *a = rank_major + pos * C, *b = expert_major + (size_t)l->ep_cur[e] * C;
            if (to_expert) memcpy(b, a, rb * (size_t)m);
            else memcpy(a, b, rb * (size_t)m);
            l->ep_cur[e] += m;
            pos += (size_t)m;
        }
}

/* With one rank the token-side and expert-side rows are the same buffers
 * (the layer aliases them): nothing moves. */
int moe__ep_to_experts(moe_layer *l, const float *tok, float *exp) {
    if (!l->dist || l->ep_size == 1) return MOE_OK;
    const double t0 = omp_get_wtime();
    int rc = moe__dist_alltoallv_rows(l->dist, tok, l->ep_send, l->ep_buf, l->ep_recv, l->cfg.d_model);
    l->ms_a2a += (omp_get_wtime() - t0) * 1e3;
    if (rc) return dist_err(l, rc);
    regroup(l, l->ep_buf, exp, 1);
    return MOE_OK;
}

int moe__ep_to_tokens(moe_layer *l, const float *exp, float *tok) {
    if (!l->dist || l->ep_size == 1) return MOE_OK;
    regroup(l, l->ep_buf, (float *)exp, 0);
    const double t0 = omp_get_wtime();
    int rc = moe__dist_alltoallv_rows(l->dist, l->ep_buf, l->ep_recv, tok, l->ep_send, l->cfg.d_model);
    l->ms_a2a += (omp_get_wtime() - t0) * 1e3;
    return rc ? dist_err(l, rc) : MOE_OK;
}

/* Probability order of the capacity: higher score first, then the lower
 * global slot (as one process orders its slots); by expert first. */
static int by_cand(const void *a, const void *b) {
    const struct moe__ep_cand *x = a, *y = b;
    if (x->e != y->e) return x->e < y->e ? -1 : 1;
    if (x->s != y->s) return x->s > y->s ? -1 : 1;
    return (x->slot > y->slot) - (x->slot < y->slot);
}

/* Every rank's candidates (this rank's own[0..m)) gathered into all[] and
 * sorted by by_cand; l->ep_thr[e] becomes expert e's cap-th best (slot -1:
 * fewer than cap candidates, or cap 0). A candidate is taken iff it sorts at
 * or before its expert's threshold. The gather is the all-to-all time. */
static int ep_thresholds(moe_layer *l, const struct moe__ep_cand *own, int m, struct moe__ep_cand *all, int cap) {
    const int E = l->cfg.n_experts, P = l->ep_size;
    const double t0 = omp_get_wtime();
    int rc = moe__dist_allgather_int(l->dist, &m, l->ep_before, 1);
    if (!rc) rc = moe__dist_allgatherv_rows(l->dist, own, all, l->ep_before, sizeof *own);
    l->ms_a2a += (omp_get_wtime() - t0) * 1e3;
    if (rc) return dist_err(l, rc);
    long long tot = 0;
    for (int q = 0; q < P; q++) tot += l->ep_before[q];
    qsort(all, (size_t)tot, sizeof *all, by_cand);
    for (int e = 0; e < E; e++) l->ep_thr[e].slot = -1;
    for (long long a = 0; a < tot;) { /* expert segments of the sorted list */
        long long b = a;
        while (b < tot && all[b].e == all[a].e) b++;
        if (cap > 0 && b - a >= cap) l->ep_thr[all[a].e] = all[a + cap - 1];
        a = b;
    }
    return MOE_OK;
}

/* One process keeps, per expert, the first `cap` kept slots in slot order
 * (arrival) or the `cap` best by score (probability). Rank r holds the
 * global tokens after those of ranks < r, so global slot order is rank, then
 * local slot: arrival needs only how many kept slots each expert got from the
 * ranks before this one (one all-gather of [E] counts); probability needs
 * each expert's cap-th best slot over all ranks (an all-gather of every
 * rank's kept (expert, score, global slot) triples, then one sort). */
int moe__ep_capacity(moe_layer *l, int cap) {
    const int E = l->cfg.n_experts, R = l->n_slots, P = l->ep_size, me = l->ep_rank;
    int *mine = l->ep_before + (size_t)P * E; /* [E]: local counts, then a cursor */
    const double t0 = omp_get_wtime();
    int rc = MOE_OK;
    if (l->cfg.drop_policy == MOE_DROP_ARRIVAL) {
        memset(mine, 0, sizeof(int) * (size_t)E);
        for (int i = 0; i < R; i++) mine[l->topk_ids[i]] += l->keep[i] != 0;
        rc = moe__dist_allgather_int(l->dist, mine, l->ep_before, E);
        l->ms_a2a += (omp_get_wtime() - t0) * 1e3;
        if (rc) return dist_err(l, rc);
        for (int e = 0; e < E; e++) {
            long long before = 0;
            for (int q = 0; q < me; q++) before += l->ep_before[(size_t)q * E + e];
            mine[e] = before > cap ? cap : (int)before; /* global position of the next kept slot */
        }
        for (int i = 0; i < R; i++) {
            if (!l->keep[i]) continue;
            const int e = l->topk_ids[i];
            if (mine[e] >= cap) l->keep[i] = 0;
            else mine[e]++;
        }
        return MOE_OK;
    }
    struct moe__ep_cand *own = l->ep_cand, *all = l->ep_cand + R;
    const int K = l->cfg.top_k, base = l->tok_base * K; /* token-choice slots: t K + j */
    int m = 0;
    for (int i = 0; i < R; i++) {
        if (!l->keep[i]) continue;
        const int e = l->topk_ids[i];
        own[m++] = (struct moe__ep_cand){l->scores[(size_t)l->slot_tok[i] * E + e], base + i, e};
    }
    if ((rc = ep_thresholds(l, own, m, all, cap))) return rc;
    for (int j = 0; j < m; j++) {
        const struct moe__ep_cand *t = &l->ep_thr[own[j].e];
        if (t->slot >= 0 && by_cand(&own[j], t) > 0) l->keep[own[j].slot - base] = 0;
    }
    return MOE_OK;
}

/* Expert e takes the cap tokens of the global batch with the highest score
 * s[t][e] (ties: the lower global token), as moe__ec_select does in one
 * process. A rank's best min(cap, n) tokens per expert hold every one of its
 * tokens the expert can take, so those candidates travel (one all-gather),
 * every rank sorts them and finds each expert's last taken token, and lays
 * out the slots of its own tokens as one process does: by token, a token's
 * slots in increasing expert id. */
int moe__ep_ec_select(moe_layer *l, int n) {
    const moe_layer_config *c = &l->cfg;
    const int E = c->n_experts;
    const int cap = moe__ec_capacity(c, l->n_glob > INT_MAX ? INT_MAX : (int)l->n_glob);
    const int k = cap < n ? cap : n;
    int *chosen = l->order; /* [E][k] this rank's best tokens per expert */
#pragma omp parallel for schedule(dynamic, 1) num_threads(l->threads)
    for (int e = 0; e < E; e++) moe__topk(l->scores + e, (size_t)E, 0, n, k, chosen + (size_t)e * k);
    struct moe__ep_cand *own = l->ep_cand, *all = l->ep_cand + l->r_cap;
    int m = 0;
    for (int e = 0; e < E; e++)
        for (int j = 0; j < k; j++) {
            const int t = chosen[(size_t)e * k + j];
            own[m++] = (struct moe__ep_cand){l->scores[(size_t)t * E + e], l->tok_base + t, e};
        }
    /* every expert has >= cap candidates: sum over ranks of min(cap, n_q) */
    const int rc = ep_thresholds(l, own, m, all, cap);
    if (rc) return rc;
    /* this rank's taken (token, expert) pairs, laid out by token */
    int *off = l->tok_off;
    memset(off, 0, sizeof(int) * (size_t)(n + 1));
    int r = 0;
    for (int j = 0; j < m; j++) {
        const struct moe__ep_cand *t = &l->ep_thr[own[j].e];
        own[j].slot -= l->tok_base; /* local token, or -1: not taken */
        if (t->slot < 0 || by_cand(&(struct moe__ep_cand){own[j].s, own[j].slot + l->tok_base, own[j].e}, t) > 0)
            own[j].slot = -1;
        else
            off[own[j].slot + 1]++, r++;
    }
    for (int t = 0; t < n; t++) off[t + 1] += off[t];
    for (int j = 0; j < m; j++) { /* own[] runs by expert: a token's slots in expert order */
        const int t = own[j].slot;
        if (t < 0) continue;
        const int i = off[t]++;
        l->slot_tok[i] = t;
        l->topk_ids[i] = own[j].e;
        l->topk_w[i] = c->route_scale * own[j].s;
    }
    for (int t = n; t > 0; t--) off[t] = off[t - 1];
    off[0] = 0;
    l->n_slots = r;
    memset(l->keep, 1, (size_t)r);
    return MOE_OK;
}
