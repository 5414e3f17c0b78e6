/* The MoE layer against the naive double reference: forward values, routing,
 * finite-difference gradients of every parameter and the input, invariants,
 * determinism across thread counts, bad input, and no allocation per call. */
#include "layer/layer_impl.h"
#include "ref_layer.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    moe_layer *l;
    moe_layer_config cfg;
    moe_layer_params off;
    int n;
    float *x, *y, *dy, *dx; /* [N][C] */
    double *pd, *xd, *dyd;  /* double copies for the reference */
} fixture;

static double randn(uint64_t *s) {
    /* small local generator: tests must not depend on library internals for data */
    double u1, u2;
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    u1 = ((*s >> 11) + 1.0) / 9007199254740993.0;
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    u2 = (*s >> 11) / 9007199254740992.0;
    return sqrt(-2 * log(u1)) * cos(2 * M_PI * u2);
}

static void fixture_free(fixture *f) {
    moe_layer_free(f->l);
    free(f->x), free(f->y), free(f->dy), free(f->dx), free(f->pd), free(f->xd), free(f->dyd);
    memset(f, 0, sizeof *f);
}

/* Builds a layer with random parameters and inputs whose routing margin is at
 * least min_margin (reseeding until it is). router_gain scales wg so logits
 * are O(1) and routing varies between tokens. */
static int fixture_make(fixture *f, moe_layer_config cfg, int n, uint64_t seed, double min_margin) {
    memset(f, 0, sizeof *f);
    int err = 0;
    char msg[256];
    f->l = moe_layer_create(&cfg, &err, msg, sizeof msg);
    if (!f->l) {
        moe_test_fail(__FILE__, __LINE__, "create: %s", msg);
        return -1;
    }
    f->cfg = cfg;
    f->off = moe_layer_param_offsets(f->l);
    f->n = n;
    const size_t nc = (size_t)n * cfg.d_model;
    f->x = malloc(sizeof(float) * (nc + 1));
    f->y = malloc(sizeof(float) * (nc + 1));
    f->dy = malloc(sizeof(float) * (nc + 1));
    f->dx = malloc(sizeof(float) * (nc + 1));
    f->pd = malloc(sizeof(double) * f->off.total);
    f->xd = malloc(sizeof(double) * (nc + 1));
    f->dyd = malloc(sizeof(double) * (nc + 1));
    for (int attempt = 0; attempt < 200; attempt++, seed += 7919) {
        moe_layer_init(f->l, seed, 1.0f);
        float *p = moe_layer_params_ptr(f->l);
        for (size_t i = f->off.wg; i < f->off.w1; i++) p[i] *= 2.0f; /* livelier routing */
        uint64_t s = seed;
        for (size_t i = 0; i < nc; i++) f->x[i] = (float)randn(&s);
        for (size_t i = 0; i < nc; i++) f->dy[i] = (float)randn(&s);
        for (size_t i = 0; i < f->off.total; i++) f->pd[i] = p[i];
        for (size_t i = 0; i < nc; i++) f->xd[i] = f->x[i], f->dyd[i] = f->dy[i];
        if (ref_layer_margin(&cfg, &f->off, f->pd, f->xd, n) >= min_margin) return 0;
    }
    moe_test_fail(__FILE__, __LINE__, "no seed gave routing margin %g", min_margin);
    return -1;
}

static double max_abs_diff_fd(const float *a, const double *b, size_t n, double *maxref) {
    double m = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        m = fmax(m, fabs(a[i] - b[i]));
        r = fmax(r, fabs(b[i]));
    }
    if (maxref) *maxref = r;
    return m;
}

static moe_layer_config small_cfg(moe_act act, moe_score score, int renorm, int E, int K) {
    moe_layer_config c = moe_layer_config_default(12, 20, E, K, 64);
    c.act = act;
    c.score = score;
    c.renormalize = renorm;
    c.route_scale = score == MOE_SCORE_SIGMOID ? 2.5f : 1.0f;
    c.aux_coef = 0.3f; /* large, so their gradients are visible in the checks */
    c.z_coef = 0.2f;
    return c;
}

/* Forward of the fast path equals the double reference (values and routing). */
static void check_forward(moe_layer_config cfg, int n, uint64_t seed, double tol) {
    fixture f;
    if (fixture_make(&f, cfg, n, seed, 1e-4)) return;
    int rc = moe_layer_forward(f.l, f.x, n, f.y);
    CHECK_MSG(rc == 0, "forward: %s", moe_layer_errmsg(f.l));
    const size_t nc = (size_t)n * cfg.d_model, nk = (size_t)n * cfg.top_k;
    double *yr = malloc(sizeof(double) * nc), *wr = malloc(sizeof(double) * nk), aux, z;
    int *idr = malloc(sizeof(int) * nk);
    ref_layer_objective(&cfg, &f.off, f.pd, f.xd, n, NULL, yr, idr, wr, &aux, &z);
    double ref, d = max_abs_diff_fd(f.y, yr, nc, &ref);
    CHECK_MSG(d <= tol * fmax(1, ref), "y: max abs err %g (max |y| %g)", d, ref);
    const int *ids = moe_layer_topk_ids(f.l);
    const float *w = moe_layer_topk_weights(f.l);
    int id_mismatch = 0;
    for (size_t i = 0; i < nk; i++) id_mismatch += ids[i] != idr[i];
    CHECK_EQ_INT(id_mismatch, 0);
    CHECK(max_abs_diff_fd(w, wr, nk, NULL) <= 1e-5);
    const moe_layer_stats *st = moe_layer_get_stats(f.l);
    CHECK_CLOSE(st->aux_loss, aux, 1e-6, 1e-5);
    CHECK_CLOSE(st->z_loss, z, 1e-6, 1e-5);
    free(yr), free(wr), free(idr);
    fixture_free(&f);
}

TEST(layer_forward_matches_reference_all_variants) {
    const moe_act acts[] = {MOE_ACT_RELU, MOE_ACT_GELU, MOE_ACT_SWIGLU};
    const moe_score scores[] = {MOE_SCORE_SOFTMAX, MOE_SCORE_SIGMOID};
    const int ek[][2] = {{1, 1}, {4, 1}, {4, 2}, {6, 3}, {5, 5}};
    uint64_t seed = 1;
    for (int a = 0; a < 3; a++)
        for (int s = 0; s < 2; s++)
            for (int r = 0; r < 2; r++)
                for (size_t k = 0; k < sizeof ek / sizeof ek[0]; k++)
                    check_forward(small_cfg(acts[a], scores[s], r, ek[k][0], ek[k][1]), 37, seed++, 2e-5);
}

/* Big enough that GEMM tiles split rows and columns (TILE_M 256, TILE_N 512). */
TEST(layer_forward_matches_reference_tiled) {
    moe_layer_config c = moe_layer_config_default(160, 600, 5, 2, 700);
    check_forward(c, 700, 11, 2e-4);
    c.act = MOE_ACT_GELU;
    check_forward(c, 650, 12, 2e-4);
}

/* Central differences of the double objective vs the fp32 backward, over
 * every parameter and every input element. */
static void check_gradients(moe_layer_config cfg, int n, uint64_t seed) {
    fixture f;
    if (fixture_make(&f, cfg, n, seed, 1e-3)) return;
    moe_layer_zero_grad(f.l);
    int rc = moe_layer_forward(f.l, f.x, n, f.y);
    CHECK(rc == 0);
    rc = moe_layer_backward(f.l, f.dy, f.dx);
    CHECK_MSG(rc == 0, "backward: %s", moe_layer_errmsg(f.l));
    const float *g = moe_layer_grads_ptr(f.l);
    const double h = 1e-6;
    double worst = 0;
    const char *worst_what = "";
    size_t worst_i = 0;
    for (size_t i = 0; i < f.off.total; i++) {
        const double keep = f.pd[i];
        f.pd[i] = keep + h;
        double up = ref_layer_objective(&cfg, &f.off, f.pd, f.xd, n, f.dyd, NULL, NULL, NULL, NULL, NULL);
        f.pd[i] = keep - h;
        double dn = ref_layer_objective(&cfg, &f.off, f.pd, f.xd, n, f.dyd, NULL, NULL, NULL, NULL, NULL);
        f.pd[i] = keep;
        double fd = (up - dn) / (2 * h), err = fabs(g[i] - fd) / fmax(1e-2, fabs(fd));
        if (err > worst) {
            worst = err, worst_i = i;
            worst_what = i < f.off.w1 ? "wg" : i < f.off.w2 ? "w1" : (f.off.w3 == SIZE_MAX || i < f.off.w3) ? "w2" : "w3";
        }
    }
    const size_t nc = (size_t)n * cfg.d_model;
    for (size_t i = 0; i < nc; i++) {
        const double keep = f.xd[i];
        f.xd[i] = keep + h;
        double up = ref_layer_objective(&cfg, &f.off, f.pd, f.xd, n, f.dyd, NULL, NULL, NULL, NULL, NULL);
        f.xd[i] = keep - h;
        double dn = ref_layer_objective(&cfg, &f.off, f.pd, f.xd, n, f.dyd, NULL, NULL, NULL, NULL, NULL);
        f.xd[i] = keep;
        double fd = (up - dn) / (2 * h), err = fabs(f.dx[i] - fd) / fmax(1e-2, fabs(fd));
        if (err > worst) worst = err, worst_i = i, worst_what = "x";
    }
    CHECK_MSG(worst < 2e-3, "act %d score %d renorm %d E %d K %d: worst rel err %g at %s[%zu]", cfg.act,
              cfg.score, cfg.renormalize, cfg.n_experts, cfg.top_k, worst, worst_what, worst_i);
    fixture_free(&f);
}

TEST(layer_gradients_finite_difference) {
    const moe_act acts[] = {MOE_ACT_RELU, MOE_ACT_GELU, MOE_ACT_SWIGLU};
    uint64_t seed = 100;
    for (int a = 0; a < 3; a++)
        for (int s = 0; s < 2; s++)
            for (int r = 0; r < 2; r++) {
                moe_layer_config c = small_cfg(acts[a], (moe_score)s, r, 4, 2);
                c.d_model = 6, c.d_ff = 7;
                check_gradients(c, 9, seed++);
            }
    moe_layer_config c = small_cfg(MOE_ACT_SWIGLU, MOE_SCORE_SOFTMAX, 1, 5, 1);
    c.d_model = 5, c.d_ff = 6;
    check_gradients(c, 8, seed++);
    c.top_k = 5; /* every expert active */
    check_gradients(c, 7, seed++);
}

/* Gradients accumulate across backward calls (llm.c convention). */
TEST(layer_gradients_accumulate) {
    fixture f;
    if (fixture_make(&f, small_cfg(MOE_ACT_SWIGLU, MOE_SCORE_SOFTMAX, 1, 4, 2), 10, 5, 0)) return;
    moe_layer_zero_grad(f.l);
    CHECK(moe_layer_forward(f.l, f.x, 10, f.y) == 0);
    CHECK(moe_layer_backward(f.l, f.dy, NULL) == 0);
    size_t T = f.off.total;
    float *g1 = malloc(sizeof(float) * T);
    memcpy(g1, moe_layer_grads_ptr(f.l), sizeof(float) * T);
    CHECK(moe_layer_backward(f.l, f.dy, NULL) == 0);
    const float *g2 = moe_layer_grads_ptr(f.l);
    int bad = 0;
    for (size_t i = 0; i < T; i++) bad += fabsf(g2[i] - 2 * g1[i]) > 1e-6f * (1 + fabsf(g1[i]));
    CHECK_EQ_INT(bad, 0);
    free(g1);
    fixture_free(&f);
}

/* ---- dispatch invariants ------------------------------------------------- */

/* Routes by hand (ids), dispatches, and checks segments and the round trip
 * gather -> combine(weight 1 on slot 0) == identity. */
static void check_permutation(int n, int E, int K, const int *ids) {
    moe_layer_config c = moe_layer_config_default(5, 4, E, K, n > 0 ? n : 1);
    moe_layer *l = moe_layer_create(&c, NULL, NULL, 0);
    CHECK(l != NULL);
    if (!l) return;
    float *x = malloc(sizeof(float) * (size_t)(n * 5 + 1)), *y = malloc(sizeof(float) * (size_t)(n * 5 + 1));
    for (int i = 0; i < n * 5; i++) x[i] = (float)(i * 0.37 - 3.1);
    l->n = n;
    memset(l->counts, 0, sizeof(int) * E);
    for (int i = 0; i < n * K; i++) {
        l->topk_ids[i] = ids[i];
        l->counts[ids[i]]++;
        l->topk_w[i] = i % K == 0 ? 1.0f : 0.0f;
    }
    moe__slots_token_choice(l, n, K);
    memset(l->keep, 1, (size_t)n * K);
    moe__dispatch_build(l, n);
    moe__dispatch_gather(l, x);
    CHECK_EQ_INT(l->seg_off[0], 0);
    CHECK_EQ_INT(l->seg_off[E], n * K);
    int bad = 0;
    for (int e = 0; e < E; e++) {
        CHECK_EQ_INT(l->seg_off[e + 1] - l->seg_off[e], l->counts[e]);
        for (int r = l->seg_off[e]; r < l->seg_off[e + 1]; r++) {
            int slot = l->slot_of_row[r];
            bad += l->topk_ids[slot] != e;                                  /* right segment */
            bad += r > l->seg_off[e] && l->slot_of_row[r - 1] >= slot;      /* stable order */
            bad += l->row_of_slot[slot] != r;                               /* inverse maps */
        }
    }
    CHECK_EQ_INT(bad, 0);
    memcpy(l->out, l->xg, sizeof(float) * (size_t)n * K * 5); /* identity experts */
    moe__dispatch_combine(l, y);
    CHECK(n == 0 || memcmp(x, y, sizeof(float) * (size_t)n * 5) == 0);
    free(x), free(y);
    moe_layer_free(l);
}

TEST(dispatch_permute_unpermute_identity) {
    int ids[64 * 3];
    uint64_t s = 3;
    for (int i = 0; i < 64; i++) { /* 3 distinct experts of 8, expert 5 never used */
        int pool[7] = {0, 1, 2, 3, 4, 6, 7};
        for (int j = 0; j < 3; j++) {
            s = s * 6364136223846793005ULL + 1442695040888963407ULL;
            int k = j + (int)((s >> 33) % (uint64_t)(7 - j)), tmp = pool[j];
            pool[j] = pool[k], pool[k] = tmp;
            ids[i * 3 + j] = pool[j];
        }
    }
    check_permutation(64, 8, 3, ids);
    for (int i = 0; i < 64; i++) ids[i] = 2; /* everything to one expert */
    check_permutation(64, 4, 1, ids);
    check_permutation(0, 4, 1, ids); /* no tokens at all */
}

/* ---- aux loss invariants ------------------------------------------------- */

/* K = 1, N = E tokens, x_t = e_t, wg = gain * I: token t goes to expert t
 * (spread) or, with all tokens equal, every token to expert 0 (collapse). */
static float aux_for(int E, int collapse) {
    moe_layer_config c = moe_layer_config_default(E, 4, E, 1, E);
    c.aux_coef = 0.5f;
    moe_layer *l = moe_layer_create(&c, NULL, NULL, 0);
    float *p = moe_layer_params_ptr(l);
    memset(p, 0, sizeof(float) * moe_layer_param_offsets(l).total);
    for (int e = 0; e < E; e++) p[e * E + e] = 80.0f;
    float *x = calloc((size_t)E * E, sizeof(float)), *y = calloc((size_t)E * E, sizeof(float));
    for (int t = 0; t < E; t++) x[t * E + (collapse ? 0 : t)] = 1.0f;
    CHECK(moe_layer_forward(l, x, E, y) == 0);
    float aux = moe_layer_get_stats(l)->aux_loss;
    const moe_layer_stats *st = moe_layer_get_stats(l);
    if (collapse) {
        CHECK_EQ_INT(st->expert_count[0], E);
        CHECK_CLOSE(st->load_max_over_mean, (double)E, 1e-6, 1e-6);
    } else {
        CHECK_CLOSE(st->load_cv, 0.0, 1e-7, 0);
        CHECK_CLOSE(st->load_max_over_mean, 1.0, 1e-7, 0);
    }
    free(x), free(y);
    moe_layer_free(l);
    return aux;
}

TEST(aux_loss_alpha_when_balanced_alpha_E_when_collapsed) {
    for (int E = 2; E <= 16; E *= 2) {
        CHECK_CLOSE(aux_for(E, 0), 0.5, 1e-6, 1e-5);
        CHECK_CLOSE(aux_for(E, 1), 0.5 * E, 1e-6, 1e-5);
    }
}

/* ---- determinism ---------------------------------------------------------- */

/* Both expert paths: OpenBLAS tiles (hundreds of rows per expert) and the
 * small in-place kernel (a few dozen rows per expert). */
static void check_threads_bitwise(moe_layer_config c, int n) {
    float *res[2][3];
    size_t T = 0, nc = (size_t)n * c.d_model;
    for (int th = 1; th <= 2; th++) {
        c.n_threads = th;
        fixture f;
        if (fixture_make(&f, c, n, 77, 0)) return;
        T = f.off.total;
        moe_layer_zero_grad(f.l);
        CHECK(moe_layer_forward(f.l, f.x, n, f.y) == 0);
        CHECK(moe_layer_backward(f.l, f.dy, f.dx) == 0);
        res[th - 1][0] = malloc(sizeof(float) * nc), res[th - 1][1] = malloc(sizeof(float) * nc);
        res[th - 1][2] = malloc(sizeof(float) * T);
        memcpy(res[th - 1][0], f.y, sizeof(float) * nc);
        memcpy(res[th - 1][1], f.dx, sizeof(float) * nc);
        memcpy(res[th - 1][2], moe_layer_grads_ptr(f.l), sizeof(float) * T);
        fixture_free(&f);
    }
    CHECK_MSG(memcmp(res[0][0], res[1][0], sizeof(float) * nc) == 0, "E=%d: y differs between 1 and 2 threads", c.n_experts);
    CHECK_MSG(memcmp(res[0][1], res[1][1], sizeof(float) * nc) == 0, "E=%d: dx differs between 1 and 2 threads", c.n_experts);
    CHECK_MSG(memcmp(res[0][2], res[1][2], sizeof(float) * T) == 0, "E=%d: grads differ between 1 and 2 threads", c.n_experts);
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 3; j++) free(res[i][j]);
}

TEST(layer_bitwise_identical_1_and_2_threads) {
    check_threads_bitwise(moe_layer_config_default(192, 520, 6, 2, 900), 900);
    check_threads_bitwise(moe_layer_config_default(96, 136, 64, 2, 900), 900);
}

/* ---- no allocation after sizing ------------------------------------------- */

TEST(layer_no_allocation_in_forward_backward) {
    fixture f;
    if (fixture_make(&f, small_cfg(MOE_ACT_SWIGLU, MOE_SCORE_SOFTMAX, 1, 8, 2), 50, 9, 0)) return;
    uint64_t before = moe_alloc_count();
    for (int i = 0; i < 3; i++) {
        CHECK(moe_layer_forward(f.l, f.x, 50 - i * 10, f.y) == 0);
        CHECK(moe_layer_backward(f.l, f.dy, f.dx) == 0);
    }
    CHECK_EQ_INT(moe_alloc_count(), before);
    fixture_free(&f);
}

/* ---- bad input ---------------------------------------------------------- */

static int create_err(moe_layer_config c, char *msg, size_t n) {
    int err = 0;
    moe_layer *l = moe_layer_create(&c, &err, msg, n);
    moe_layer_free(l);
    return l ? 0 : err;
}

TEST(layer_rejects_bad_config) {
    char msg[256];
    moe_layer_config ok = moe_layer_config_default(8, 8, 4, 2, 16), c;
    c = ok, c.top_k = 5;
    CHECK_EQ_INT(create_err(c, msg, sizeof msg), MOE_EINVAL);
    CHECK(strstr(msg, "top_k") != NULL);
    c = ok, c.top_k = 0;
    CHECK_EQ_INT(create_err(c, msg, sizeof msg), MOE_EINVAL);
    c = ok, c.n_experts = 0;
    CHECK_EQ_INT(create_err(c, msg, sizeof msg), MOE_EINVAL);
    CHECK(strstr(msg, "n_experts") != NULL);
    c = ok, c.d_model = 0;
    CHECK_EQ_INT(create_err(c, msg, sizeof msg), MOE_EINVAL);
    c = ok, c.d_ff = -3;
    CHECK_EQ_INT(create_err(c, msg, sizeof msg), MOE_EINVAL);
    c = ok, c.max_tokens = 0;
    CHECK_EQ_INT(create_err(c, msg, sizeof msg), MOE_EINVAL);
    c = ok, c.act = (moe_act)7;
    CHECK_EQ_INT(create_err(c, msg, sizeof msg), MOE_EINVAL);
    c = ok, c.route_scale = NAN;
    CHECK_EQ_INT(create_err(c, msg, sizeof msg), MOE_EINVAL);
    c = ok, c.aux_coef = -1;
    CHECK_EQ_INT(create_err(c, msg, sizeof msg), MOE_EINVAL);
    c = ok, c.max_tokens = 2000000000;
    CHECK_EQ_INT(create_err(c, msg, sizeof msg), MOE_EINVAL);
    CHECK(moe_layer_create(NULL, NULL, msg, sizeof msg) == NULL);
    CHECK_EQ_INT(create_err(ok, msg, sizeof msg), 0);
}

TEST(layer_rejects_bad_calls_and_nonfinite) {
    fixture f;
    if (fixture_make(&f, small_cfg(MOE_ACT_SWIGLU, MOE_SCORE_SOFTMAX, 1, 4, 2), 20, 4, 0)) return;
    CHECK_EQ_INT(moe_layer_backward(f.l, f.dy, f.dx), MOE_ESTATE); /* before any forward */
    CHECK_EQ_INT(moe_layer_forward(f.l, f.x, 65, f.y), MOE_ESHAPE); /* > max_tokens */
    CHECK(strstr(moe_layer_errmsg(f.l), "max_tokens") != NULL);
    CHECK_EQ_INT(moe_layer_forward(f.l, f.x, -1, f.y), MOE_ESHAPE);
    CHECK_EQ_INT(moe_layer_forward(f.l, NULL, 3, f.y), MOE_EINVAL);
    CHECK_EQ_INT(moe_layer_forward(f.l, f.x, 3, f.x), MOE_EINVAL); /* in place */
    f.x[5 * 12 + 3] = NAN;
    CHECK_EQ_INT(moe_layer_forward(f.l, f.x, 20, f.y), MOE_ENONFINITE);
    CHECK(strstr(moe_layer_errmsg(f.l), "x[5][3]") != NULL);
    CHECK_EQ_INT(moe_layer_backward(f.l, f.dy, f.dx), MOE_ESTATE); /* failed forward: nothing to differentiate */
    f.x[5 * 12 + 3] = INFINITY;
    CHECK_EQ_INT(moe_layer_forward(f.l, f.x, 20, f.y), MOE_ENONFINITE);
    f.x[5 * 12 + 3] = 0.5f;
    float *p = moe_layer_params_ptr(f.l);
    p[f.off.wg + 2 * 12 + 1] = INFINITY; /* router weight of expert 2 */
    CHECK_EQ_INT(moe_layer_forward(f.l, f.x, 20, f.y), MOE_ENONFINITE);
    CHECK(strstr(moe_layer_errmsg(f.l), "router logit") != NULL);
    p[f.off.wg + 2 * 12 + 1] = 0.1f;
    CHECK_EQ_INT(moe_layer_forward(f.l, f.x, 20, f.y), 0);
    CHECK_EQ_INT(moe_layer_forward(f.l, f.x, 0, f.y), 0); /* zero tokens is fine */
    CHECK_EQ_INT(moe_layer_get_stats(f.l)->n_tokens, 0);
    CHECK_EQ_INT(moe_layer_backward(f.l, f.dy, f.dx), 0);
    CHECK_EQ_INT(moe_layer_bind(f.l, NULL, NULL), MOE_EINVAL);
    fixture_free(&f);
}

TEST(error_strings) {
    CHECK(strcmp(moe_strerror(MOE_OK), "success") == 0);
    CHECK(strcmp(moe_err_name(MOE_ESHAPE), "MOE_ESHAPE") == 0);
    CHECK(strcmp(moe_strerror(MOE_ENONFINITE), "non-finite value (NaN or Inf)") == 0);
    CHECK(strcmp(moe_strerror(-999), "unknown error") == 0);
}

/* Equal logits: the lower expert id wins, slots in increasing id order. */
TEST(router_tie_break_lower_id_wins) {
    moe_layer_config c = moe_layer_config_default(4, 4, 6, 3, 5);
    moe_layer *l = moe_layer_create(&c, NULL, NULL, 0);
    float *p = moe_layer_params_ptr(l);
    memset(p, 0, sizeof(float) * moe_layer_param_offsets(l).total);
    for (int i = 0; i < 4; i++) p[4 * 4 + i] = p[5 * 4 + i] = 1.0f; /* experts 4, 5 tie on top */
    float x[5 * 4], y[5 * 4];
    for (int i = 0; i < 20; i++) x[i] = 0.25f;
    CHECK(moe_layer_forward(l, x, 5, y) == 0);
    const int *ids = moe_layer_topk_ids(l);
    for (int t = 0; t < 5; t++) {
        CHECK_EQ_INT(ids[t * 3 + 0], 4);
        CHECK_EQ_INT(ids[t * 3 + 1], 5);
        CHECK_EQ_INT(ids[t * 3 + 2], 0); /* experts 0..3 tie below */
    }
    moe_layer_free(l);
}

/* ---- capacity (Switch) ------------------------------------------------------ */

/* E = 2, K = 1, four tokens that all prefer expert 0 with probabilities
 * increasing in v = 0.5, 2, 1, 3; capacity_factor 1 gives capacity
 * ceil(1 * 4 * 1 / 2) = 2. Arrival keeps tokens 0, 1; probability keeps 1, 3. */
static void capacity_case(moe_drop_policy pol, const int *kept_tokens) {
    moe_layer_config c = moe_layer_config_default(2, 3, 2, 1, 4);
    c.capacity_factor = 1.0f;
    c.drop_policy = pol;
    c.renormalize = 0;
    moe_layer *l = moe_layer_create(&c, NULL, NULL, 0);
    moe_layer_init(l, 3, 1.0f);
    float *p = moe_layer_params_ptr(l);
    p[0] = 1, p[1] = 0, p[2] = -1, p[3] = 0; /* wg: logit0 = v, logit1 = -v */
    const float v[4] = {0.5f, 2.0f, 1.0f, 3.0f};
    float x[8], y[8];
    for (int t = 0; t < 4; t++) x[2 * t] = v[t], x[2 * t + 1] = 0.3f;
    CHECK(moe_layer_forward(l, x, 4, y) == 0);
    const moe_layer_stats *st = moe_layer_get_stats(l);
    CHECK_EQ_INT(st->capacity, 2);
    CHECK_CLOSE(st->dropped_fraction, 0.5, 0, 0);
    CHECK_EQ_INT(st->expert_count[0], 4); /* routed, before drops: what the aux loss counts */
    for (int t = 0; t < 4; t++) {
        const int kept = t == kept_tokens[0] || t == kept_tokens[1];
        const int zero = y[2 * t] == 0.0f && y[2 * t + 1] == 0.0f;
        CHECK_MSG(kept != zero, "policy %d: token %d %s", pol, t, kept ? "dropped" : "kept");
    }
    /* evaluation never drops */
    moe_layer_set_training(l, 0);
    CHECK(moe_layer_forward(l, x, 4, y) == 0);
    CHECK_CLOSE(moe_layer_get_stats(l)->dropped_fraction, 0, 0, 0);
    for (int t = 0; t < 4; t++) CHECK(y[2 * t] != 0.0f || y[2 * t + 1] != 0.0f);
    moe_layer_free(l);
}

TEST(capacity_drops_by_arrival_and_by_probability) {
    const int arrival[2] = {0, 1}, prob[2] = {1, 3};
    capacity_case(MOE_DROP_ARRIVAL, arrival);
    capacity_case(MOE_DROP_PROBABILITY, prob);
}

TEST(capacity_forward_and_gradients_match_reference) {
    const float cfs[] = {0.5f, 1.0f, 1.25f};
    uint64_t seed = 500;
    for (int pol = 0; pol < 2; pol++)
        for (int i = 0; i < 3; i++) {
            moe_layer_config c = small_cfg(MOE_ACT_SWIGLU, MOE_SCORE_SOFTMAX, 1, 4, 2);
            c.capacity_factor = cfs[i];
            c.drop_policy = (moe_drop_policy)pol;
            check_forward(c, 37, seed++, 2e-5);
            c.d_model = 6, c.d_ff = 7;
            check_gradients(c, 9, seed++);
        }
}

TEST(capacity_rejects_bad_config) {
    char msg[256];
    moe_layer_config c = moe_layer_config_default(8, 8, 4, 2, 16);
    c.capacity_factor = -1;
    CHECK_EQ_INT(create_err(c, msg, sizeof msg), MOE_EINVAL);
    c.capacity_factor = NAN;
    CHECK_EQ_INT(create_err(c, msg, sizeof msg), MOE_EINVAL);
    c.capacity_factor = 1, c.drop_policy = (moe_drop_policy)5;
    CHECK_EQ_INT(create_err(c, msg, sizeof msg), MOE_EINVAL);
}
