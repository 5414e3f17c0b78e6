/* Hierarchical routing (Shazeer et al. 2017, appendix B): hand-computed
 * routes in evaluation, a double reference of the whole objective (outputs,
 * aux, z, importance and hierarchical load losses) with the layer's own noise
 * draws, finite differences of every parameter block and the input in
 * training, G = 1 against plain top-k, and determinism across threads. */
#include "layer/layer_impl.h"
#include "test.h"
#include "ref_layer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static double randn(uint64_t *s) {
    double u1, u2;
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    u1 = ((*s >> 11) + 1.0) / 9007199254740993.0;
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    u2 = (*s >> 11) / 9007199254740992.0;
    return sqrt(-2 * log(u1)) * cos(2 * M_PI * u2);
}

static moe_layer_config hier_cfg(int C, int F, int E, int G, int K1, int K, int max_tokens) {
    moe_layer_config c = moe_layer_config_default(C, F, E, K, max_tokens);
    c.router = MOE_ROUTER_HIERARCHICAL;
    c.n_groups = G;
    c.topk_groups = K1;
    c.seed = 1234;
    return c;
}

/* ---- double reference ------------------------------------------------------ */

static double phi_cdf(double z) { return 0.5 * erfc(-z / sqrt(2.0)); }

static double dot_d(const double *w, const double *x, int C) {
    double s = 0;
    for (int i = 0; i < C; i++) s += w[i] * x[i];
    return s;
}




typedef struct ref_out {
    double aux, z, imp, load;
    double margin; /* smallest gap between consecutive sorted noisy logits
                      among each gate's top k + 2 */
} ref_out;

/* Objective sum(y dy) + aux + z + importance + load. training: the draws
 * eps_p [N][G], eps_s [N][E] and the load loss apply. y [N][C], ids and w
 * [N][K] are written when not NULL. */
static double ref_objective(const moe_layer_config *c, const moe_layer_params *off, const double *p,
                            const double *x, int n, const double *dy, const double *eps_p, const double *eps_s,
                            int training, double *y, int *ids, double *w, ref_out *out) {
    const int C = c->d_model, F = c->d_ff, E = c->n_experts, G = c->n_groups, B = E / G, K = c->top_k;
    const int K1 = c->topk_groups, K2 = K / K1;
    double *lg = calloc(E, sizeof *lg), *hs = calloc(E, sizeof *hs), *sn = calloc(E, sizeof *sn);
    double *pc = calloc(G, sizeof *pc), *pr = calloc(G, sizeof *pr), *hp = calloc(G, sizeof *hp);
    double *P = calloc(E, sizeof *P), *imp = calloc(E, sizeof *imp), *LS = calloc(E, sizeof *LS);
    double *LP = calloc(G, sizeof *LP), *CNT = calloc(G, sizeof *CNT), *LH = calloc(E, sizeof *LH);
    double *hid = calloc(F, sizeof *hid), *yt = calloc(C, sizeof *yt);
    int *ordp = calloc(G, sizeof *ordp), *ords = calloc(B, sizeof *ords), *count = calloc(E, sizeof *count);
    const int load = training && c->load_coef > 0;
    double obj = 0, zsum = 0, margin = INFINITY;
    for (int t = 0; t < n; t++) {
        const double *xt = x + (size_t)t * C;
        for (int e = 0; e < E; e++) {
            lg[e] = dot_d(p + off->wg + (size_t)e * C, xt, C);
            sn[e] = dot_d(p + off->wnoise + (size_t)e * C, xt, C);
        }
        for (int g = 0; g < G; g++) {
            pc[g] = dot_d(p + off->wgroup + (size_t)g * C, xt, C);
            pr[g] = dot_d(p + off->wgroup_noise + (size_t)g * C, xt, C);
            hp[g] = pc[g] + (training ? eps_p[(size_t)t * G + g] * ref_softplus(pr[g]) : 0);
        }
        /* scores for aux and z */
        double mx = lg[0], sum = 0;
        for (int e = 1; e < E; e++) mx = fmax(mx, lg[e]);
        for (int e = 0; e < E; e++) sum += exp(lg[e] - mx);
        const double lse = mx + log(sum);
        zsum += lse * lse;
        for (int e = 0; e < E; e++) P[e] += exp(lg[e] - lse);

        ref_sort_desc(hp, 0, G, ordp);
        /* the kept order, the cut, and the (k+1)-th vs (k+2)-th (a threshold) */
        for (int j = 0; j <= K1 && j + 1 < G; j++) margin = fmin(margin, hp[ordp[j]] - hp[ordp[j + 1]]);
        double gp[64], den = 0;
        for (int j = 0; j < K1; j++) den += exp(hp[ordp[j]] - hp[ordp[0]]);
        for (int j = 0; j < K1; j++) gp[j] = exp(hp[ordp[j]] - hp[ordp[0]]) / den;
        if (load) {
            for (int j = 0; j < G; j++) {
                const int g = ordp[j];
                if (K1 == G) {
                    LP[g] += 1;
                    continue;
                }
                const double thr = j < K1 ? hp[ordp[K1]] : hp[ordp[K1 - 1]];
                LP[g] += phi_cdf((pc[g] - thr) / ref_softplus(pr[g]));
            }
        }
        memset(yt, 0, sizeof(double) * C);
        for (int j1 = 0; j1 < K1; j1++) {
            const int g = ordp[j1];
            CNT[g] += 1;
            for (int e = g * B; e < (g + 1) * B; e++)
                hs[e] = lg[e] + (training ? eps_s[(size_t)t * E + e] * ref_softplus(sn[e]) : 0);
            ref_sort_desc(hs, g * B, (g + 1) * B, ords);
            for (int j = 0; j <= K2 && j + 1 < B; j++) margin = fmin(margin, hs[ords[j]] - hs[ords[j + 1]]);
            double sden = 0;
            for (int j = 0; j < K2; j++) sden += exp(hs[ords[j]] - hs[ords[0]]);
            if (load)
                for (int j = 0; j < B; j++) {
                    const int e = ords[j];
                    if (K2 == B) {
                        LS[e] += 1;
                        continue;
                    }
                    const double thr = j < K2 ? hs[ords[K2]] : hs[ords[K2 - 1]];
                    LS[e] += phi_cdf((lg[e] - thr) / ref_softplus(sn[e]));
                }
            for (int j2 = 0; j2 < K2; j2++) {
                const int e = ords[j2], slot = t * K + j1 * K2 + j2;
                const double wt = c->route_scale * gp[j1] * exp(hs[e] - hs[ords[0]]) / sden;
                if (ids) ids[slot] = e;
                if (w) w[slot] = wt;
                imp[e] += wt;
                count[e]++;
                const double *w1 = p + off->w1 + (size_t)e * F * C, *w2 = p + off->w2 + (size_t)e * C * F;
                const double *w3 = c->act == MOE_ACT_SWIGLU ? p + off->w3 + (size_t)e * F * C : NULL;
                for (int f = 0; f < F; f++)
                    hid[f] = ref_act(c->act, dot_d(w1 + (size_t)f * C, xt, C), w3 ? dot_d(w3 + (size_t)f * C, xt, C) : 0);
                for (int o = 0; o < C; o++) yt[o] += wt * dot_d(w2 + (size_t)o * F, hid, F);
            }
        }
        for (int o = 0; o < C; o++) {
            if (y) y[(size_t)t * C + o] = yt[o];
            if (dy) obj += yt[o] * dy[(size_t)t * C + o];
        }
    }
    double aux = 0;
    for (int e = 0; e < E && n > 0; e++) aux += (double)count[e] / ((double)n * K) * P[e] / n;
    aux *= (double)c->aux_coef * E;
    const double z = n > 0 ? c->z_coef * zsum / n : 0;
    const double li = c->importance_coef * ref_cv2(imp, E);
    double ll = 0;
    if (load) {
        for (int e = 0; e < E; e++) {
            const int g = e / B;
            LH[e] = LP[g] * (CNT[g] > 0 ? LS[e] / CNT[g] : (double)K2 / B);
        }
        ll = c->load_coef * ref_cv2(LH, E);
    }
    if (out) out->aux = aux, out->z = z, out->imp = li, out->load = ll, out->margin = margin;
    free(lg), free(hs), free(sn), free(pc), free(pr), free(hp), free(P), free(imp), free(LS), free(LP), free(CNT);
    free(LH), free(hid), free(yt), free(ordp), free(ords), free(count);
    return obj + aux + z + li + ll;
}

/* ---- fixture ---------------------------------------------------------------- */

typedef struct {
    moe_layer *l;
    moe_layer_config cfg;
    moe_layer_params off;
    int n, training;
    float *x, *y, *dy, *dx;
    double *pd, *xd, *dyd, *eps_p, *eps_s;
} fixture;

static void fixture_free(fixture *f) {
    moe_layer_free(f->l);
    free(f->x), free(f->y), free(f->dy), free(f->dx), free(f->pd), free(f->xd), free(f->dyd);
    free(f->eps_p), free(f->eps_s);
    memset(f, 0, sizeof *f);
}

#define FD_CALLS 5 /* the noise stream the checks run at */

/* Random parameters (router blocks set by hand: init zeroes them for noisy
 * routers) and inputs, reseeded until every token's noisy routing has a
 * margin of at least min_margin. starve: group G-1 gets a strongly negative
 * primary logit, so no token keeps it (the |X_g| = 0 convention). */
static int fixture_make(fixture *f, moe_layer_config cfg, int n, int training, uint64_t seed, double min_margin,
                        int starve) {
    memset(f, 0, sizeof *f);
    int err = 0;
    char msg[256];
    f->l = moe_layer_create(&cfg, &err, msg, sizeof msg);
    if (!f->l) {
        moe_test_fail(__FILE__, __LINE__, "create: %s", msg);
        return -1;
    }
    moe_layer_set_training(f->l, training);
    f->cfg = cfg, f->off = moe_layer_param_offsets(f->l), f->n = n, f->training = training;
    const int C = cfg.d_model, E = cfg.n_experts, G = cfg.n_groups;
    const size_t nc = (size_t)n * C;
    f->x = malloc(sizeof(float) * (nc + 1)), f->y = malloc(sizeof(float) * (nc + 1));
    f->dy = malloc(sizeof(float) * (nc + 1)), f->dx = malloc(sizeof(float) * (nc + 1));
    f->pd = malloc(sizeof(double) * f->off.total);
    f->xd = malloc(sizeof(double) * (nc + 1)), f->dyd = malloc(sizeof(double) * (nc + 1));
    f->eps_p = calloc((size_t)n * G + 1, sizeof(double)), f->eps_s = calloc((size_t)n * E + 1, sizeof(double));
    f->l->calls = FD_CALLS;
    for (int t = 0; t < n && training; t++) {
        for (int g = 0; g < G; g++) f->eps_p[(size_t)t * G + g] = moe__router_normal(f->l, t, E + g);
        for (int e = 0; e < E; e++) f->eps_s[(size_t)t * E + e] = moe__router_normal(f->l, t, e);
    }
    const double sc = 1.0 / sqrt((double)C);
    for (int attempt = 0; attempt < 500; attempt++, seed += 7919) {
        moe_layer_init(f->l, seed, 1.0f);
        float *p = moe_layer_params_ptr(f->l);
        uint64_t s = seed ^ 0x5eed;
        for (size_t i = 0; i < (size_t)E * C; i++) p[f->off.wg + i] = (float)(2.0 * sc * randn(&s));
        for (size_t i = 0; i < (size_t)E * C; i++) p[f->off.wnoise + i] = (float)(0.7 * sc * randn(&s));
        for (size_t i = 0; i < (size_t)G * C; i++) p[f->off.wgroup + i] = (float)(2.0 * sc * randn(&s));
        for (size_t i = 0; i < (size_t)G * C; i++) p[f->off.wgroup_noise + i] = (float)(0.7 * sc * randn(&s));
        for (size_t i = 0; i < nc; i++) f->x[i] = (float)randn(&s);
        for (size_t i = 0; i < nc; i++) f->dy[i] = (float)randn(&s);
        if (starve) {
            for (int t = 0; t < n; t++) f->x[(size_t)t * C] = 2.0f;
            p[f->off.wgroup + (size_t)(G - 1) * C] = -6.0f;
        }
        for (size_t i = 0; i < f->off.total; i++) f->pd[i] = p[i];
        for (size_t i = 0; i < nc; i++) f->xd[i] = f->x[i], f->dyd[i] = f->dy[i];
        ref_out ro;
        ref_objective(&cfg, &f->off, f->pd, f->xd, n, NULL, f->eps_p, f->eps_s, training, NULL, NULL, NULL, &ro);
        if (ro.margin >= min_margin) return 0;
    }
    moe_test_fail(__FILE__, __LINE__, "no seed gave routing margin %g", min_margin);
    return -1;
}

static const char *block_of(const moe_layer_params *o, size_t i) {
    if (i >= o->wgroup_noise) return "wgroup_noise";
    if (i >= o->wgroup) return "wgroup";
    if (i >= o->wnoise) return "wnoise";
    if (i < o->w1) return "wg";
    if (i < o->w2) return "w1";
    if (o->w3 == SIZE_MAX || i < o->w3) return "w2";
    return "w3";
}

/* The layer at the fixed noise stream against the double reference: routes,
 * weights, outputs and losses; then central differences of the reference
 * objective against the fp32 backward over every parameter and input. */
/* Every parameter and input element, or (sample > 0) about that many spread
 * evenly over each block and x, plus the tile and chunk edges of the
 * row-major [rows][C] router blocks and x: rows 0, 255, 256, last by
 * columns 0, 511, 512, last. */
static int fd_pick(const moe_layer_params *o, size_t i, size_t nc, int C, int sample) {
    if (sample <= 0) return 1;
    const size_t starts[] = {o->wg, o->w1, o->w2, o->w3, o->wnoise, o->wgroup, o->wgroup_noise, o->total + 1,
                             o->total + 1 + nc};
    const int router[] = {1, 0, 0, 0, 1, 1, 1, 1};
    for (int b = 0; b + 1 < 9; b++) {
        if (starts[b] == SIZE_MAX) continue;
        size_t end = starts[b + 1];
        for (int k = b + 2; end == SIZE_MAX && k < 9; k++) end = starts[k];
        if (b == 6) end = o->total;
        if (i < starts[b] || i >= end) continue;
        const size_t len = end - starts[b], step = len / (size_t)sample + 1, r = i - starts[b];
        if (r % step == 0 || r + 1 == len) return 1;
        if (!router[b]) return 0;
        const size_t row = r / (size_t)C, col = r % (size_t)C, rows = len / (size_t)C;
        return (row == 0 || row == 255 || row == 256 || row + 1 == rows) &&
               (col == 0 || col == 511 || col == 512 || col + 1 == (size_t)C);
    }
    return 0;
}

static void check_hier_sampled(moe_layer_config cfg, int n, int training, uint64_t seed, int starve, int sample,
                               double margin) {
    fixture f;
    if (fixture_make(&f, cfg, n, training, seed, margin, starve)) return;
    const int C = cfg.d_model, K = cfg.top_k;
    const size_t nc = (size_t)n * C, nk = (size_t)n * K;
    moe_layer_zero_grad(f.l);
    f.l->calls = FD_CALLS;
    int rc = moe_layer_forward(f.l, f.x, n, f.y);
    CHECK_MSG(rc == 0, "forward: %s", moe_layer_errmsg(f.l));
    if (rc) {
        fixture_free(&f);
        return;
    }
    CHECK_EQ_INT(f.l->calls, FD_CALLS + (training ? 1 : 0));
    rc = moe_layer_backward(f.l, f.dy, f.dx);
    CHECK_MSG(rc == 0, "backward: %s", moe_layer_errmsg(f.l));

    double *yr = malloc(sizeof(double) * nc), *wr = malloc(sizeof(double) * nk);
    int *idr = malloc(sizeof(int) * nk);
    ref_out ro;
    ref_objective(&cfg, &f.off, f.pd, f.xd, n, NULL, f.eps_p, f.eps_s, training, yr, idr, wr, &ro);
    const int *ids = moe_layer_topk_ids(f.l);
    const float *w = moe_layer_topk_weights(f.l);
    int id_bad = 0;
    double werr = 0, yerr = 0, ymax = 0;
    for (size_t i = 0; i < nk; i++) id_bad += ids[i] != idr[i], werr = fmax(werr, fabs(w[i] - wr[i]));
    for (size_t i = 0; i < nc; i++) yerr = fmax(yerr, fabs(f.y[i] - yr[i])), ymax = fmax(ymax, fabs(yr[i]));
    CHECK_EQ_INT(id_bad, 0);
    CHECK_MSG(werr <= 2e-6, "weights: max err %g", werr);
    CHECK_MSG(yerr <= 2e-5 * fmax(1, ymax), "y: max err %g (max |y| %g)", yerr, ymax);
    const moe_layer_stats *st = moe_layer_get_stats(f.l);
    CHECK_CLOSE(st->aux_loss, ro.aux, 1e-6, 1e-5);
    CHECK_CLOSE(st->z_loss, ro.z, 1e-6, 1e-5);
    CHECK_CLOSE(st->importance_loss, ro.imp, 1e-7, 1e-4);
    CHECK_CLOSE(st->load_loss, ro.load, 1e-7, 1e-4);
    const int B = cfg.n_experts / cfg.n_groups, K2 = K / cfg.topk_groups;
    if (training && cfg.load_coef > 0 && (cfg.topk_groups < cfg.n_groups || K2 < B)) CHECK(ro.load > 0);

    const float *g = moe_layer_grads_ptr(f.l);
    const double h = 1e-6;
    double worst = 0, worst_blk[8] = {0};
    const char *names[8] = {"wg", "w1", "w2", "w3", "wnoise", "wgroup", "wgroup_noise", "x"};
    const char *worst_what = "";
    size_t worst_i = 0;
    for (size_t i = 0; i <= f.off.total + nc; i++) {
        if (i == f.off.total || !fd_pick(&f.off, i, nc, C, sample)) continue;
        const int is_x = i > f.off.total;
        double *v = is_x ? &f.xd[i - f.off.total - 1] : &f.pd[i];
        const double keep = *v;
        *v = keep + h;
        const double up = ref_objective(&cfg, &f.off, f.pd, f.xd, n, f.dyd, f.eps_p, f.eps_s, training, NULL,
                                        NULL, NULL, NULL);
        *v = keep - h;
        const double dn = ref_objective(&cfg, &f.off, f.pd, f.xd, n, f.dyd, f.eps_p, f.eps_s, training, NULL,
                                        NULL, NULL, NULL);
        *v = keep;
        const double fd = (up - dn) / (2 * h);
        const double an = is_x ? f.dx[i - f.off.total - 1] : g[i];
        const double err = fabs(an - fd) / fmax(1e-2, fabs(fd));
        const char *what = is_x ? "x" : block_of(&f.off, i);
        for (int b = 0; b < 8; b++)
            if (!strcmp(what, names[b])) worst_blk[b] = fmax(worst_blk[b], err);
        if (err > worst) worst = err, worst_i = is_x ? i - f.off.total - 1 : i, worst_what = what;
    }
    CHECK_MSG(worst < 2e-3, "E %d G %d K1 %d K %d training %d: worst rel err %g at %s[%zu]", cfg.n_experts,
              cfg.n_groups, cfg.topk_groups, K, training, worst, worst_what, worst_i);
    if (getenv("MOE_TEST_VERBOSE")) {
        printf("    E %d G %d K1 %d K %d train %d starve %d load %.4g:", cfg.n_experts, cfg.n_groups, cfg.topk_groups,
               K, training, starve, ro.load);
        for (int b = 0; b < 8; b++)
            if (strcmp(names[b], "w3") || cfg.act == MOE_ACT_SWIGLU) printf(" %s %.2g", names[b], worst_blk[b]);
        printf("\n");
    }
    free(yr), free(wr), free(idr);
    fixture_free(&f);
}

static void check_hier(moe_layer_config cfg, int n, int training, uint64_t seed, int starve) {
    check_hier_sampled(cfg, n, training, seed, starve, 0, 1e-3);
}

static moe_layer_config fd_cfg(int E, int G, int K1, int K) {
    moe_layer_config c = hier_cfg(6, 5, E, G, K1, K, 16);
    c.aux_coef = 0.3f; /* large, so their gradients are visible in the checks */
    c.z_coef = 0.2f;
    c.importance_coef = 0.1f;
    c.load_coef = 0.1f;
    return c;
}

/* Both levels below their size: every Phi term and threshold is live. */
TEST(hier_gradients_fd_training) {
    check_hier(fd_cfg(8, 4, 2, 2), 10, 1, 11, 0);   /* B 2, K2 1 */
    moe_layer_config c = fd_cfg(12, 3, 2, 4);        /* B 4, K2 2 */
    c.act = MOE_ACT_GELU;
    c.route_scale = 1.7f;
    check_hier(c, 10, 1, 12, 0);
    c = fd_cfg(12, 4, 1, 2); /* K1 1 (the primary softmax is constant) */
    c.act = MOE_ACT_RELU;
    check_hier(c, 10, 1, 13, 0);
}

/* P = 1 conventions: K1 = G (every group kept), K2 = B (every expert of a
 * kept group), and both at once; G = 1 is flat noisy top-k. */
TEST(hier_gradients_fd_edge_cases) {
    check_hier(fd_cfg(8, 2, 2, 4), 10, 1, 21, 0); /* K1 = G */
    check_hier(fd_cfg(8, 4, 1, 2), 10, 1, 22, 0); /* K2 = B */
    check_hier(fd_cfg(8, 4, 4, 8), 10, 1, 23, 0); /* all experts */
    check_hier(fd_cfg(6, 1, 1, 2), 10, 1, 24, 0); /* one group */
}

/* A group no token keeps: Load_g / |X_g| is taken as K2 / B. */
TEST(hier_gradients_fd_empty_group) {
    check_hier(fd_cfg(8, 4, 2, 2), 10, 1, 31, 1);
    check_hier(fd_cfg(12, 3, 1, 2), 10, 1, 32, 1);
}

/* Evaluation: no noise, no load loss; the noise blocks get zero gradient. */
TEST(hier_gradients_fd_evaluation) {
    check_hier(fd_cfg(8, 4, 2, 2), 10, 0, 41, 0);
    check_hier(fd_cfg(12, 3, 2, 4), 10, 0, 42, 0);
}

/* Shapes past the tiles: more than 256 tokens (several chunks), more than
 * 256 experts and 512 columns (several weight-gradient tiles). */
TEST(hier_gradients_fd_chunks_and_tiles) {
    moe_layer_config c = fd_cfg(8, 4, 2, 2);
    c.max_tokens = 300;
    check_hier_sampled(c, 300, 1, 51, 0, 60, 1e-3);
    c = hier_cfg(520, 3, 264, 4, 2, 4, 6);
    c.aux_coef = 0.3f, c.z_coef = 0.2f, c.importance_coef = 0.1f, c.load_coef = 0.1f;
    c.act = MOE_ACT_RELU;
    check_hier_sampled(c, 6, 1, 52, 0, 24, 2e-5);
}

/* ---- hand-computed routes ------------------------------------------------------ */

/* C = 2; token 0 is x = (1, 0), token 1 is x = (0, 1), so column 0 of each
 * router matrix gives token 0's logits and column 1 token 1's. */
static void hand_case(int G, int K1, int K, float scale, const float *wg /* [8][2] */,
                      const float *wgroup /* [G][2] */, const int *want_ids, const double *want_w) {
    moe_layer_config c = hier_cfg(2, 3, 8, G, K1, K, 4);
    c.route_scale = scale;
    moe_layer *l = moe_layer_create(&c, NULL, NULL, 0);
    CHECK(l != NULL);
    if (!l) return;
    moe_layer_init(l, 7, 1.0f);
    moe_layer_set_training(l, 0);
    const moe_layer_params o = moe_layer_param_offsets(l);
    float *p = moe_layer_params_ptr(l);
    memcpy(p + o.wg, wg, sizeof(float) * 16);
    memcpy(p + o.wgroup, wgroup, sizeof(float) * 2 * (size_t)G);
    for (int i = 0; i < 16; i++) p[o.wnoise + i] = 5.0f; /* large noise scales: unused in evaluation */
    for (int i = 0; i < 2 * G; i++) p[o.wgroup_noise + i] = 5.0f;
    const float x[4] = {1, 0, 0, 1};
    float y[4];
    CHECK_EQ_INT(moe_layer_forward(l, x, 2, y), 0);
    CHECK_EQ_INT(l->calls, 0);
    const int *ids = moe_layer_topk_ids(l);
    const float *w = moe_layer_topk_weights(l);
    for (int i = 0; i < 2 * K; i++) {
        CHECK_MSG(ids[i] == want_ids[i], "G %d K1 %d K %d slot %d: id %d, want %d", G, K1, K, i, ids[i], want_ids[i]);
        CHECK_MSG(fabs(w[i] - want_w[i]) <= 1e-6, "G %d K1 %d K %d slot %d: w %.8f, want %.8f", G, K1, K, i,
                  (double)w[i], want_w[i]);
    }
    CHECK(moe_layer_get_stats(l)->load_loss == 0.0f);
    moe_layer_free(l);
}

TEST(hier_eval_hand_computed_routes) {
    /* token 0 logits a, token 1 logits b */
    const float a[8] = {0.5f, 2.0f, -1.0f, 1.0f, 3.0f, 0.0f, 0.2f, -0.5f};
    const float b[8] = {0.1f, -0.3f, 0.4f, 0.0f, 1.5f, 1.5f, -2.0f, 0.7f};
    float wg[16];
    for (int e = 0; e < 8; e++) wg[2 * e] = a[e], wg[2 * e + 1] = b[e];
    const double s1 = 1 / (1 + exp(-1.0)); /* softmax(1, 0) */

    /* G 2, K1 1, K 2. Token 0: group 0 (1 > 0), experts 1 (2.0), 3 (1.0).
     * Token 1: group 1 (0.25 > -0.5), experts 4, 5 tie at 1.5: lower id first. */
    const float wgr2[4] = {1.0f, -0.5f, 0.0f, 0.25f};
    const int ids_a[4] = {1, 3, 4, 5};
    const double w_a[4] = {s1, 1 - s1, 0.5, 0.5};
    hand_case(2, 1, 2, 1.0f, wg, wgr2, ids_a, w_a);

    /* G 2, K1 2, K 4: Gp = softmax over both groups. Token 0: Gp (s1, 1-s1),
     * group 0 -> 1, 3; group 1 -> 4 (3.0), 6 (0.2). Token 1: group 1 first
     * (Gp sigmoid(0.75)) -> 4, 5; then group 0 -> 2 (0.4), 0 (0.1). */
    const double s28 = 1 / (1 + exp(-2.8)), s75 = 1 / (1 + exp(-0.75)), s03 = 1 / (1 + exp(-0.3));
    const int ids_b[8] = {1, 3, 4, 6, 4, 5, 2, 0};
    const double w_b[8] = {s1 * s1, s1 * (1 - s1), (1 - s1) * s28, (1 - s1) * (1 - s28),
                           s75 * 0.5, s75 * 0.5, (1 - s75) * s03, (1 - s75) * (1 - s03)};
    hand_case(2, 2, 4, 1.0f, wg, wgr2, ids_b, w_b);
    /* literal values of the first slots, for the record */
    CHECK_CLOSE(w_b[0], 0.534446645, 1e-8, 0);
    CHECK_CLOSE(w_b[2], 0.253524576, 1e-8, 0);

    /* G 4 (B 2), K1 2, K 2, route_scale 2. Token 0: hp (0.3, -1, 2, 0) ->
     * groups 2, 0, Gp softmax(2, 0.3); experts 4 (3 > 0) and 1 (2 > 0.5).
     * Token 1: hp all 0 -> groups 0, 1 (lower ids), Gp 0.5 each; experts 0
     * (0.1 > -0.3) and 2 (0.4 > 0). */
    const float wgr4[8] = {0.3f, 0.0f, -1.0f, 0.0f, 2.0f, 0.0f, 0.0f, 0.0f};
    const double s17 = 1 / (1 + exp(-1.7));
    const int ids_c[4] = {4, 1, 0, 2};
    const double w_c[4] = {2 * s17, 2 * (1 - s17), 1.0, 1.0};
    hand_case(4, 2, 2, 2.0f, wg, wgr4, ids_c, w_c);
}

/* ---- G = 1 in evaluation is plain renormalised softmax top-k ---------------- */

TEST(hier_one_group_eval_matches_plain_topk) {
    moe_layer_config ch = hier_cfg(10, 12, 6, 1, 1, 3, 40);
    moe_layer_config ct = moe_layer_config_default(10, 12, 6, 3, 40);
    moe_layer *lh = moe_layer_create(&ch, NULL, NULL, 0), *lt = moe_layer_create(&ct, NULL, NULL, 0);
    CHECK(lh && lt);
    if (!lh || !lt) return;
    moe_layer_init(lt, 3, 1.0f);
    moe_layer_init(lh, 3, 1.0f);
    const moe_layer_params oh = moe_layer_param_offsets(lh), ot = moe_layer_param_offsets(lt);
    CHECK_EQ_INT(oh.w1, ot.w1);
    memcpy(moe_layer_params_ptr(lh), moe_layer_params_ptr(lt), sizeof(float) * ot.total); /* wg and experts */
    moe_layer_set_training(lh, 0);
    moe_layer_set_training(lt, 0);
    float x[40 * 10], yh[40 * 10], yt[40 * 10];
    uint64_t s = 9;
    for (int i = 0; i < 400; i++) x[i] = (float)randn(&s);
    CHECK_EQ_INT(moe_layer_forward(lh, x, 40, yh), 0);
    CHECK_EQ_INT(moe_layer_forward(lt, x, 40, yt), 0);
    int bad = 0;
    double werr = 0, yerr = 0;
    for (int i = 0; i < 120; i++) {
        bad += moe_layer_topk_ids(lh)[i] != moe_layer_topk_ids(lt)[i];
        werr = fmax(werr, fabs(moe_layer_topk_weights(lh)[i] - moe_layer_topk_weights(lt)[i]));
    }
    for (int i = 0; i < 400; i++) yerr = fmax(yerr, fabs(yh[i] - yt[i]));
    CHECK_EQ_INT(bad, 0);
    CHECK_MSG(werr < 1e-6, "weights differ by %g", werr);
    CHECK_MSG(yerr < 1e-5, "y differs by %g", yerr);
    moe_layer_free(lh), moe_layer_free(lt);
}

/* ---- noise stream, config changes, bad values ------------------------------- */

/* Training draws fresh noise per call, reproducible from (seed, call). */
TEST(hier_training_noise_per_call) {
    moe_layer_config c = hier_cfg(8, 8, 16, 4, 2, 4, 64);
    moe_layer *l = moe_layer_create(&c, NULL, NULL, 0);
    CHECK(l != NULL);
    if (!l) return;
    moe_layer_init(l, 5, 1.0f); /* zero gates: the noise alone routes */
    float x[64 * 8], y[64 * 8];
    uint64_t s = 4;
    for (int i = 0; i < 64 * 8; i++) x[i] = (float)randn(&s);
    int ids0[256], ids1[256];
    CHECK_EQ_INT(moe_layer_forward(l, x, 64, y), 0);
    memcpy(ids0, moe_layer_topk_ids(l), sizeof ids0);
    CHECK_EQ_INT(moe_layer_forward(l, x, 64, y), 0);
    memcpy(ids1, moe_layer_topk_ids(l), sizeof ids1);
    CHECK(memcmp(ids0, ids1, sizeof ids0) != 0);
    l->calls = 0;
    CHECK_EQ_INT(moe_layer_forward(l, x, 64, y), 0);
    CHECK(memcmp(ids0, moe_layer_topk_ids(l), sizeof ids0) == 0);
    /* every slot of a token in a distinct expert, K1 distinct groups */
    int bad = 0;
    for (int t = 0; t < 64; t++)
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < i; j++) bad += ids0[t * 4 + i] == ids0[t * 4 + j];
    for (int t = 0; t < 64; t++) bad += ids0[t * 4] / 4 != ids0[t * 4 + 1] / 4 || ids0[t * 4] / 4 == ids0[t * 4 + 2] / 4;
    CHECK_EQ_INT(bad, 0);
    CHECK(moe_layer_get_stats(l)->importance_loss == 0.0f); /* coefficients off */
    moe_layer_free(l);
}

TEST(hier_rejects_bad_top_k_and_nonfinite) {
    moe_layer_config c = hier_cfg(4, 4, 8, 2, 2, 4, 8);
    c.max_top_k = 6;
    moe_layer *l = moe_layer_create(&c, NULL, NULL, 0);
    CHECK(l != NULL);
    if (!l) return;
    moe_layer_init(l, 1, 1.0f);
    float x[32], y[32];
    for (int i = 0; i < 32; i++) x[i] = (float)(i % 7) - 3.0f;
    /* 3 % topk_groups != 0: refused by set_top_k or, at the latest, by forward */
    const int rc = moe_layer_set_top_k(l, 3);
    CHECK(rc == 0 || rc == MOE_EINVAL);
    if (rc == 0) CHECK_EQ_INT(moe_layer_forward(l, x, 8, y), MOE_EINVAL);
    CHECK(strstr(moe_layer_errmsg(l), "topk_groups") != NULL);
    CHECK_EQ_INT(moe_layer_set_top_k(l, 6), 0); /* 3 of 4 per group */
    CHECK_EQ_INT(moe_layer_forward(l, x, 8, y), 0);
    const int *ids = moe_layer_topk_ids(l);
    int bad = 0;
    for (int t = 0; t < 8; t++) bad += ids[t * 6] / 4 != ids[t * 6 + 2] / 4 || ids[t * 6] / 4 == ids[t * 6 + 3] / 4;
    CHECK_EQ_INT(bad, 0);
    float *p = moe_layer_params_ptr(l);
    const moe_layer_params o = moe_layer_param_offsets(l);
    p[o.wgroup_noise + 1] = NAN;
    CHECK_EQ_INT(moe_layer_forward(l, x, 8, y), MOE_ENONFINITE);
    CHECK(strstr(moe_layer_errmsg(l), "hierarchical") != NULL);
    moe_layer_set_training(l, 0); /* evaluation never reads the noise weights */
    CHECK_EQ_INT(moe_layer_forward(l, x, 8, y), 0);
    moe_layer_free(l);
}

/* ---- determinism and allocation ---------------------------------------------- */

TEST(hier_bitwise_identical_1_and_2_threads) {
    const int n = 900, C = 64;
    moe_layer_config c = hier_cfg(C, 96, 16, 4, 2, 4, n);
    c.importance_coef = 0.1f;
    c.load_coef = 0.1f;
    const size_t nc = (size_t)n * C;
    float *x = malloc(sizeof(float) * nc), *dy = malloc(sizeof(float) * nc);
    uint64_t s = 77;
    for (size_t i = 0; i < nc; i++) x[i] = (float)randn(&s), dy[i] = (float)randn(&s);
    float *res[2][3];
    float loss[2] = {0, 0};
    size_t T = 0;
    for (int th = 1; th <= 2; th++) {
        c.n_threads = th;
        moe_layer *l = moe_layer_create(&c, NULL, NULL, 0);
        CHECK(l != NULL);
        if (!l) return;
        moe_layer_init(l, 8, 1.0f);
        const moe_layer_params o = moe_layer_param_offsets(l);
        T = o.total;
        float *p = moe_layer_params_ptr(l);
        uint64_t s2 = 99;
        for (size_t i = o.wnoise; i < o.total; i++) p[i] = (float)(0.2 * randn(&s2)); /* wnoise, wgroup, noise */
        for (size_t i = 0; i < (size_t)16 * C; i++) p[o.wg + i] = (float)(0.2 * randn(&s2));
        res[th - 1][0] = malloc(sizeof(float) * nc), res[th - 1][1] = malloc(sizeof(float) * nc);
        res[th - 1][2] = malloc(sizeof(float) * T);
        moe_layer_zero_grad(l);
        for (int call = 0; call < 2; call++) { /* two noise draws */
            CHECK(moe_layer_forward(l, x, n, res[th - 1][0]) == 0);
            CHECK(moe_layer_backward(l, dy, res[th - 1][1]) == 0);
        }
        loss[th - 1] = moe_layer_get_stats(l)->load_loss;
        memcpy(res[th - 1][2], moe_layer_grads_ptr(l), sizeof(float) * T);
        moe_layer_free(l);
    }
    CHECK(loss[0] > 0 && loss[0] == loss[1]);
    CHECK_MSG(memcmp(res[0][0], res[1][0], sizeof(float) * nc) == 0, "y differs between 1 and 2 threads");
    CHECK_MSG(memcmp(res[0][1], res[1][1], sizeof(float) * nc) == 0, "dx differs between 1 and 2 threads");
    CHECK_MSG(memcmp(res[0][2], res[1][2], sizeof(float) * T) == 0, "grads differ between 1 and 2 threads");
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 3; j++) free(res[i][j]);
    free(x), free(dy);
}

TEST(hier_no_allocation_in_forward_backward) {
    moe_layer_config c = hier_cfg(8, 8, 8, 2, 1, 2, 50);
    c.load_coef = 0.1f;
    c.importance_coef = 0.1f;
    moe_layer *l = moe_layer_create(&c, NULL, NULL, 0);
    CHECK(l != NULL);
    if (!l) return;
    moe_layer_init(l, 2, 1.0f);
    float x[50 * 8], y[50 * 8], dx[50 * 8];
    uint64_t s = 6;
    for (int i = 0; i < 400; i++) x[i] = (float)randn(&s);
    const uint64_t before = moe_alloc_count();
    for (int i = 0; i < 3; i++) {
        CHECK(moe_layer_forward(l, x, 50 - i * 20, y) == 0);
        CHECK(moe_layer_backward(l, x, dx) == 0);
    }
    CHECK_EQ_INT(moe_alloc_count(), before);
    moe_layer_free(l);
}
