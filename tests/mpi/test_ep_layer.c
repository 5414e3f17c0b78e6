/* Expert-parallel layer against the single-process layer on the same global
 * batch: every rank runs the reference on all N tokens (the oracle: the
 * single-process layer, itself tested against PyTorch and finite differences)
 * and the expert-parallel layer on its slice, then compares its output rows,
 * dx rows, the global losses and statistics, its experts' gradients, and the
 * router gradients summed over ranks. Run with mpirun -np P, P = 1, 2, 4. */
#include "mpi_test.h"

#include <moe.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int mt_rank, mt_size, mt_fail;
static moe_dist *D;

static float frand(uint64_t *s) { /* uniform in [-1, 1), splitmix-driven */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)((z >> 40) * 0x1.0p-24 * 2.0 - 1.0);
}

enum split { EVEN, UNEVEN, ALL_ON_LAST };

/* tokens of rank q: EVEN splits N in P near-equal parts; UNEVEN gives rank 1
 * nothing (with P > 1) and rank 0 the odd remainder; ALL_ON_LAST leaves every
 * rank but the last empty */
static void split_tokens(enum split sp, int N, int *cnt) {
    const int P = mt_size;
    for (int q = 0; q < P; q++) cnt[q] = 0;
    if (sp == ALL_ON_LAST) {
        cnt[P - 1] = N;
        return;
    }
    if (sp == EVEN || P == 1) {
        for (int q = 0; q < P; q++) cnt[q] = N * (q + 1) / P - N * q / P;
        return;
    }
    int left = N;
    for (int q = P - 1; q >= 2; q--) cnt[q] = N / (P + 1), left -= cnt[q];
    cnt[0] = left; /* rank 1 keeps 0 */
}

typedef struct stat_ref {
    float aux, z, imp, ent, cv, dropped, load;
    int counts[64];
    int n_tokens, n_slots, capacity;
} stat_ref;

static stat_ref take_stats(const moe_layer *l, int E) {
    const moe_layer_stats *st = moe_layer_get_stats(l);
    stat_ref s = {st->aux_loss, st->z_loss, st->importance_loss, st->router_entropy, st->load_cv,
                  st->dropped_fraction, st->load_loss, {0}, st->n_tokens, st->n_slots, st->capacity};
    for (int e = 0; e < E; e++) s.counts[e] = st->expert_count[e];
    return s;
}

/* Compares one block of n floats; counts values that differ at all. */
static double cmp_block(const char *what, const float *got, const float *want, size_t n, double atol, double rtol,
                        long *bit_diff) {
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        const double d = fabs((double)got[i] - want[i]);
        if (d > worst) worst = d;
        if (got[i] != want[i]) (*bit_diff)++;
        if (!mt_close(got[i], want[i], atol, rtol)) {
            MT_CHECK(0, "%s[%zu]: %.9g vs %.9g", what, i, (double)got[i], (double)want[i]);
            return worst;
        }
    }
    return worst;
}

typedef struct scenario {
    const char *name;
    moe_layer_config cfg;
    int N;
    enum split sp;
    int skew;  /* route every token to the last rank's experts */
    int exact; /* slices of whole router chunks (256 tokens): bit-identical */
} scenario;

static void run(const scenario *sc) {
    moe_layer_config cfg = sc->cfg;
    const int N = sc->N, C = cfg.d_model, F = cfg.d_ff, E = cfg.n_experts;
    cfg.max_tokens = N;
    int err;
    char msg[256];
    moe_layer *ref = moe_layer_create(&cfg, &err, msg, sizeof msg);
    moe_layer *ep = moe_layer_create_ep(&cfg, D, &err, msg, sizeof msg);
    MT_CHECK(ref && ep, "%s: create: %s", sc->name, msg);
    if (!ref || !ep) return;
    moe_layer_init(ref, 7, 1.0f);
    moe_layer_init(ep, 7, 1.0f);
    const moe_layer_params ro = moe_layer_param_offsets(ref), eo = moe_layer_param_offsets(ep);
    int first, El;
    moe_layer_expert_range(ep, &first, &El);
    MT_CHECK(El * mt_size == E && first == mt_rank * El, "%s: expert range %d + %d", sc->name, first, El);
    float *rp = moe_layer_params_ptr(ref), *pp = moe_layer_params_ptr(ep);
    const size_t per = (size_t)F * C;
    const int swiglu = cfg.act == MOE_ACT_SWIGLU;
    const size_t nrw = swiglu ? 3 : 2; /* expert blocks w1, w2[, w3] */
    const size_t rblk[3] = {ro.w1, ro.w2, ro.w3}, eblk[3] = {eo.w1, eo.w2, eo.w3};
    /* the same seed initialises the same model on any number of ranks */
    long bits = 0;
    cmp_block("init wg", pp + eo.wg, rp + ro.wg, (size_t)E * C, 0, 0, &bits);
    for (size_t b = 0; b < nrw; b++)
        cmp_block("init experts", pp + eblk[b], rp + rblk[b] + (size_t)first * per, (size_t)El * per, 0, 0, &bits);
    if (sc->skew) { /* x[:, 0] > 0 always; a large positive weight on it for K experts of the last rank */
        for (int e = 0; e < E; e++) rp[ro.wg + (size_t)e * C] = e >= E - cfg.top_k ? 8.0f : -8.0f;
        memcpy(pp + eo.wg, rp + ro.wg, sizeof(float) * (size_t)E * C);
    }
    /* replicated router blocks after the expert weights have the same layout */
    const size_t rtail = swiglu ? ro.w3 + (size_t)E * per : ro.w2 + (size_t)E * per;
    const size_t etail = swiglu ? eo.w3 + (size_t)El * per : eo.w2 + (size_t)El * per;
    MT_CHECK(ro.total - rtail == eo.total - etail, "%s: router tails differ", sc->name);

    int cnt[16], off[16];
    split_tokens(sc->sp, N, cnt);
    off[0] = 0;
    for (int q = 1; q < mt_size; q++) off[q] = off[q - 1] + cnt[q - 1];
    const int n = cnt[mt_rank], o = off[mt_rank];
    float *x = malloc(sizeof(float) * N * C), *dy = malloc(sizeof(float) * N * C);
    float *yr = malloc(sizeof(float) * N * C), *dxr = malloc(sizeof(float) * N * C);
    float *y = malloc(sizeof(float) * (N + 1) * C), *dx = malloc(sizeof(float) * (N + 1) * C);
    double *gsum = malloc(sizeof(double) * ro.total);
    float *gref = malloc(sizeof(float) * ro.total);
    uint64_t seed = 12345;
    long ybits = 0, gbits = 0;
    for (int it = 0; it < 2; it++) { /* two steps: the rng counter, bias and grads accumulate */
        for (int i = 0; i < N * C; i++) x[i] = frand(&seed), dy[i] = frand(&seed);
        if (sc->skew)
            for (int t = 0; t < N; t++) x[(size_t)t * C] = 1.0f + fabsf(x[(size_t)t * C]);
        int rc = moe_layer_forward(ref, x, N, yr);
        MT_CHECK(rc == 0, "%s: ref forward: %s", sc->name, moe_layer_errmsg(ref));
        const stat_ref sr = take_stats(ref, E);
        rc = moe_layer_forward(ep, x + (size_t)o * C, n, y);
        MT_CHECK(rc == 0, "%s: ep forward: %s", sc->name, moe_layer_errmsg(ep));
        if (rc) break;
        const stat_ref se = take_stats(ep, E);
        cmp_block("y", y, yr + (size_t)o * C, (size_t)n * C, 1e-6, 1e-5, &ybits);
        MT_CHECK(se.n_tokens == N && se.n_slots == sr.n_slots, "%s: n_tokens %d n_slots %d", sc->name, se.n_tokens,
                 se.n_slots);
        for (int e = 0; e < E; e++)
            MT_CHECK(se.counts[e] == sr.counts[e], "%s: count[%d] %d vs %d", sc->name, e, se.counts[e], sr.counts[e]);
        MT_CHECK(mt_close(se.aux, sr.aux, 1e-7, 1e-5), "%s: aux %.9g vs %.9g", sc->name, se.aux, sr.aux);
        MT_CHECK(mt_close(se.z, sr.z, 1e-7, 1e-5), "%s: z %.9g vs %.9g", sc->name, se.z, sr.z);
        MT_CHECK(mt_close(se.imp, sr.imp, 1e-7, 1e-5), "%s: importance %.9g vs %.9g", sc->name, se.imp, sr.imp);
        MT_CHECK(mt_close(se.load, sr.load, 1e-7, 1e-5), "%s: load loss %.9g vs %.9g", sc->name, se.load, sr.load);
        if (sc->cfg.load_coef > 0) MT_CHECK(sr.load > 0, "%s: load loss %g", sc->name, sr.load);
        MT_CHECK(mt_close(se.ent, sr.ent, 1e-6, 1e-5), "%s: entropy %.9g vs %.9g", sc->name, se.ent, sr.ent);
        MT_CHECK(mt_close(se.cv, sr.cv, 1e-6, 1e-5), "%s: load cv %.9g vs %.9g", sc->name, se.cv, sr.cv);
        /* capacity: the global batch's capacity and dropped fraction, and drops do happen */
        MT_CHECK(se.capacity == sr.capacity && se.dropped == sr.dropped, "%s: capacity %d dropped %.9g vs %d %.9g",
                 sc->name, se.capacity, se.dropped, sr.capacity, sr.dropped);
        if (sc->cfg.capacity_factor > 0 && sc->cfg.router != MOE_ROUTER_EXPERT_CHOICE)
            MT_CHECK(sr.dropped > 0 && sr.capacity > 0, "%s: no capacity drops (%g, capacity %d)", sc->name,
                     sr.dropped, sr.capacity);
        if (sc->skew) { /* every slot on the last rank: the other experts are empty */
            int elsewhere = 0;
            for (int e = 0; e < E - cfg.top_k; e++) elsewhere += se.counts[e];
            MT_CHECK(elsewhere == 0, "%s: %d slots off the skewed experts", sc->name, elsewhere);
        }

        rc = moe_layer_backward(ref, dy, dxr);
        MT_CHECK(rc == 0, "%s: ref backward: %s", sc->name, moe_layer_errmsg(ref));
        const double w0 = MPI_Wtime();
        rc = moe_layer_backward(ep, dy + (size_t)o * C, dx);
        const double wall = (MPI_Wtime() - w0) * 1e3;
        MT_CHECK(rc == 0, "%s: ep backward: %s", sc->name, moe_layer_errmsg(ep));
        { /* the backward's phase timers: each >= 0, together within the call's wall time; rows
           * move (and the all-to-all takes time) only with P > 1; the router backward always runs */
            const moe_layer_stats *st = moe_layer_get_stats(ep);
            const double ph[5] = {st->ms_bwd_combine, st->ms_bwd_experts, st->ms_bwd_dispatch, st->ms_bwd_router,
                                  st->ms_bwd_alltoall};
            double sum = 0;
            for (int i = 0; i < 5; i++) {
                MT_CHECK(ph[i] >= 0, "%s: backward phase %d: %g ms", sc->name, i, ph[i]);
                sum += ph[i];
            }
            MT_CHECK(sum <= wall + 1e-3 && sum > 0, "%s: backward phases %g ms, call %g ms", sc->name, sum, wall);
            MT_CHECK((st->ms_bwd_alltoall > 0) == (mt_size > 1), "%s: backward all-to-all %g ms with P = %d",
                     sc->name, st->ms_bwd_alltoall, mt_size);
            MT_CHECK(st->ms_bwd_router > 0, "%s: backward router %g ms", sc->name, st->ms_bwd_router);
        }
        cmp_block("dx", dx, dxr + (size_t)o * C, (size_t)n * C, 1e-6, 1e-4, &ybits);
        const float *rg = moe_layer_grads_ptr(ref), *eg = moe_layer_grads_ptr(ep);
        for (size_t b = 0; b < nrw; b++)
            cmp_block("expert grads", eg + eblk[b], rg + rblk[b] + (size_t)first * per, (size_t)El * per, 1e-5,
                      1e-4, &gbits);
        /* router grads: this rank's share; their sum is the global gradient */
        const size_t nr = (size_t)E * C, nt = eo.total - etail;
        for (size_t i = 0; i < nr; i++) gsum[i] = eg[eo.wg + i];
        for (size_t i = 0; i < nt; i++) gsum[nr + i] = eg[etail + i];
        MPI_Allreduce(MPI_IN_PLACE, gsum, (int)(nr + nt), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
        for (size_t i = 0; i < nr; i++) gref[i] = (float)gsum[i];
        for (size_t i = 0; i < nt; i++) gref[nr + i] = (float)gsum[nr + i];
        long rb = 0;
        cmp_block("router grad wg", gref, rg + ro.wg, nr, 1e-6, 1e-4, &rb);
        cmp_block("router grad tail", gref + nr, rg + rtail, nt, 1e-6, 1e-4, &rb);
        /* aux-loss-free bias: the global loads move it identically */
        moe_layer_update_bias(ref);
        moe_layer_update_bias(ep);
        if (ro.ebias != SIZE_MAX)
            cmp_block("ebias", pp + eo.ebias, rp + ro.ebias, (size_t)E, 0, 0, &bits);
    }
    /* The expert side sees each expert's rows in global token order, so the
     * only source of difference is the router GEMM over a rank's tokens
     * (OpenBLAS rounds a row differently by its place in the call): with
     * slices of whole 256-token router chunks the calls are the same and
     * outputs, dx and expert gradients are bit-identical. */
    if (sc->exact)
        MT_CHECK(gbits == 0 && ybits == 0, "%s: %ld y/dx and %ld expert-gradient values not bit-identical", sc->name,
                 ybits, gbits);
    if (mt_rank == 0)
        printf("%-26s P=%d  values differing in any bit on rank 0: y/dx %ld, expert grads %ld\n", sc->name,
               mt_size, ybits, gbits);
    free(x), free(dy), free(yr), free(dxr), free(y), free(dx), free(gsum), free(gref);
    moe_layer_free(ref);
    moe_layer_free(ep);
}

/* Unsupported configurations fail at creation on every rank (no collective
 * is ever entered); a rank's bad input fails the call on every rank. */
static void errors(void) {
    moe_layer_config c = moe_layer_config_default(8, 12, 8, 2, 16);
    int err;
    char msg[256];
    c.router = MOE_ROUTER_HIERARCHICAL, c.n_groups = 2, c.topk_groups = 1, c.load_coef = 0.01f;
    moe_layer *l = moe_layer_create_ep(&c, D, &err, msg, sizeof msg);
    MT_CHECK(!l && err == MOE_EUNSUPPORTED, "hierarchical with the load estimator under EP: err %d", err);
    c.n_groups = 0, c.topk_groups = 0, c.load_coef = 0;
    c.router = MOE_ROUTER_TOPK;
    if (mt_size > 1) {
        c.n_experts = mt_size * 2 + 1;
        l = moe_layer_create_ep(&c, D, &err, msg, sizeof msg);
        MT_CHECK(!l && err == MOE_EINVAL, "E %% P != 0: err %d", err);
        c.n_experts = 8;
    }
    l = moe_layer_create_ep(&c, D, &err, msg, sizeof msg);
    MT_CHECK(l != NULL, "create: %s", msg);
    if (!l) return;
    moe_layer_init(l, 1, 1.0f);
    float x[16 * 8], y[16 * 8];
    for (int i = 0; i < 16 * 8; i++) x[i] = 0.01f * (i % 13);
    if (mt_rank == 0) x[5] = NAN;
    int rc = moe_layer_forward(l, x, 16, y);
    MT_CHECK(rc == MOE_ENONFINITE, "NaN on rank 0: forward returned %d (%s)", rc, moe_layer_errmsg(l));
    x[5] = 0.0f;
    /* too many tokens on the last rank: a shape error there, a failure everywhere */
    rc = moe_layer_forward(l, x, mt_rank == mt_size - 1 ? 17 : 16, y);
    MT_CHECK(rc != 0, "17 tokens on the last rank: forward returned 0");
    /* and the layer still works after a failed call */
    rc = moe_layer_forward(l, x, 16, y);
    MT_CHECK(rc == 0, "forward after a failure: %s", moe_layer_errmsg(l));
    moe_layer_free(l);
    /* the sequence-wise aux loss with a block split over two ranks: refused on every rank */
    c.aux_seq_len = 8;
    l = moe_layer_create_ep(&c, D, &err, msg, sizeof msg);
    MT_CHECK(l != NULL, "create (aux_seq_len): %s", msg);
    if (!l) return;
    moe_layer_init(l, 1, 1.0f);
    rc = moe_layer_forward(l, x, mt_rank == 0 ? 5 : 16, y);
    MT_CHECK(mt_size == 1 ? rc == 0 : rc == MOE_EUNSUPPORTED, "a block over two ranks: forward returned %d (%s)", rc,
             moe_layer_errmsg(l));
    moe_layer_free(l);
}

static int finish(const char *what) {
    int fails = mt_fail, total = 0;
    MPI_Allreduce(&fails, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (mt_rank == 0) printf("P=%d %s: %d failed checks\n", mt_size, what, total);
    moe_dist_free(D);
    return total ? 1 : 0;
}

int main(int argc, char **argv) {
    int err;
    char msg[256];
    D = moe_dist_world(&err, msg, sizeof msg);
    if (!D) {
        fprintf(stderr, "moe_dist_world: %s\n", msg);
        return 1;
    }
    mt_rank = moe_dist_rank(D), mt_size = moe_dist_size(D);
    const int P = mt_size;
    if (argc == 3 && (!strcmp(argv[1], "save") || !strcmp(argv[1], "resume"))) {
        if (argv[1][0] == 's') mt_ckpt_save(D, argv[2]);
        else mt_ckpt_resume(D, argv[2]);
        return finish(argv[1]);
    }
    scenario sc[24];
    int ns = 0;
    moe_layer_config base = moe_layer_config_default(16, 24, 8, 2, 0);
    base.importance_coef = 0.05f;
    base.n_threads = 1;
    sc[ns++] = (scenario){"topk even", base, 40, EVEN, 0, 0};
    moe_layer_config a = base;
    a.d_model = 8, a.d_ff = 8;
    sc[ns++] = (scenario){"whole chunks (bit-exact)", a, 256 * P, EVEN, 0, 1};
    sc[ns++] = (scenario){"topk zero-token rank", base, 37, UNEVEN, 0, 0};
    sc[ns++] = (scenario){"skewed to last rank", base, 33, EVEN, 1, 0};
    sc[ns++] = (scenario){"all tokens on last rank", base, 21, ALL_ON_LAST, 0, 0};
    moe_layer_config s = base; /* DeepSeek-V3 style: sigmoid, groups, bias, scale */
    s.score = MOE_SCORE_SIGMOID, s.renormalize = 1, s.route_scale = 2.5f, s.bias_update_rate = 0.01f;
    s.n_groups = 4, s.topk_groups = 2, s.act = MOE_ACT_RELU, s.top_k = 3;
    sc[ns++] = (scenario){"sigmoid groups bias", s, 45, UNEVEN, 0, 0};
    moe_layer_config g = base; /* GShard: random second expert, gelu, no renorm */
    g.gshard_random = 1, g.act = MOE_ACT_GELU, g.renormalize = 0;
    sc[ns++] = (scenario){"gshard random", g, 50, EVEN, 0, 0};
    moe_layer_config nz = base; /* noisy top-k: the noise of a token is the same on any rank */
    nz.router = MOE_ROUTER_NOISY_TOPK;
    sc[ns++] = (scenario){"noisy topk", nz, 29, UNEVEN, 0, 0};
    moe_layer_config nl = nz; /* Shazeer et al.'s smooth load estimator over the global batch */
    nl.load_coef = 0.1f;
    sc[ns++] = (scenario){"noisy topk load loss", nl, 43, EVEN, 0, 0};
    /* capacity limits: one process drops by global token order (arrival) or
     * by score over the global batch (probability) */
    moe_layer_config ca = base;
    ca.capacity_factor = 1.0f;
    sc[ns++] = (scenario){"capacity arrival", ca, 40, EVEN, 0, 0};
    sc[ns++] = (scenario){"capacity arrival zero-token", ca, 37, UNEVEN, 0, 0};
    sc[ns++] = (scenario){"capacity arrival skewed", ca, 33, EVEN, 1, 0};
    moe_layer_config cp = ca;
    cp.drop_policy = MOE_DROP_PROBABILITY;
    sc[ns++] = (scenario){"capacity probability", cp, 45, UNEVEN, 0, 0};
    sc[ns++] = (scenario){"capacity probability last", cp, 21, ALL_ON_LAST, 0, 0};
    moe_layer_config cg = g; /* GShard: random routing drops first, then capacity */
    cg.capacity_factor = 0.75f;
    sc[ns++] = (scenario){"capacity gshard", cg, 50, EVEN, 0, 0};
    moe_layer_config cx = a;
    cx.capacity_factor = 1.0f, cx.drop_policy = MOE_DROP_PROBABILITY;
    sc[ns++] = (scenario){"capacity chunks (bit-exact)", cx, 256 * P, EVEN, 0, 1};
    /* expert choice: each expert takes its best tokens of the global batch */
    moe_layer_config ec = base;
    ec.router = MOE_ROUTER_EXPERT_CHOICE, ec.importance_coef = 0;
    sc[ns++] = (scenario){"expert choice", ec, 40, EVEN, 0, 0};
    sc[ns++] = (scenario){"expert choice zero-token", ec, 37, UNEVEN, 0, 0};
    sc[ns++] = (scenario){"expert choice last rank", ec, 21, ALL_ON_LAST, 0, 0};
    moe_layer_config ex = a;
    ex.router = MOE_ROUTER_EXPERT_CHOICE, ex.capacity_factor = 1.5f;
    sc[ns++] = (scenario){"expert choice chunks (bit-exact)", ex, 256 * P, EVEN, 0, 1};
    moe_layer_config bl = base; /* forced balance: slot j of global token t to expert (t K + j) mod E */
    bl.router = MOE_ROUTER_BALANCED, bl.top_k = 3;
    sc[ns++] = (scenario){"balanced", bl, 37, EVEN, 0, 0};
    moe_layer_config sq = base; /* DeepSeek-V3's sequence-wise aux loss: blocks of 8 tokens, whole on each rank */
    sq.aux_seq_len = 8, sq.aux_coef = 0.05f;
    sc[ns++] = (scenario){"sequence-wise aux", sq, 24 * P, EVEN, 0, 0};
    moe_layer_config hi = base; /* hierarchical: noisy group gate, then noisy experts in the group */
    hi.router = MOE_ROUTER_HIERARCHICAL, hi.n_groups = 4, hi.topk_groups = 2, hi.top_k = 2;
    sc[ns++] = (scenario){"hierarchical", hi, 41, EVEN, 0, 0};
    sc[ns++] = (scenario){"hierarchical zero-token", hi, 30, UNEVEN, 0, 0};
    (void)P;
    for (int i = 0; i < ns; i++) run(&sc[i]);
    errors();
    mt_train_tests(D);
    mt_model_bad_batch(D);
    mt_train_nan_skip(D);
    mt_model_decode(D);
    mt_infer_tests(D);
    return finish("layer + train");
}
