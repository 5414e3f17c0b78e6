/* Noisy top-k gating (src/router/noisy.c): hand-computed routing, a double
 * reference whose finite differences check every parameter and the input
 * (training, with the load and importance losses), PyTorch's autograd
 * (tools/gen_noisy_fixture.py), no noise in evaluation, and bit-identical
 * results for 1 and 2 threads. */
#include "io/safetensors.h"
#include "layer/layer_impl.h"
#include "test.h"
#include "ref_layer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static double randn(uint64_t *s) {
    /* local generator: test data must not depend on library internals */
    double u1, u2;
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    u1 = ((*s >> 11) + 1.0) / 9007199254740993.0;
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    u2 = (*s >> 11) / 9007199254740992.0;
    return sqrt(-2 * log(u1)) * cos(2 * M_PI * u2);
}




/* ---- double reference ------------------------------------------------------ */

typedef struct {
    double *y;     /* [N][C] when not NULL */
    int *ids;      /* [N][K] when not NULL */
    double *w;     /* [N][K] when not NULL */
    double aux, z, imp, load;
    double margin; /* smallest gap between consecutive H among each token's top K+1 */
} ref_out;

/* Noisy top-k layer in double with the noise draws eps [N][E] given (NULL:
 * evaluation, H = logits). Softmax scores only. Returns the objective
 * sum(y dy) + aux + z + importance + load (coefficients included). */
static double ref_noisy(const moe_layer_config *c, const moe_layer_params *off, const double *p, const double *x,
                        int n, const double *eps, const double *dy, ref_out *o) {
    const int C = c->d_model, F = c->d_ff, E = c->n_experts, K = c->top_k;
    double *lg = calloc(E, sizeof *lg), *H = calloc(E, sizeof *H), *sp = calloc(E, sizeof *sp);
    double *Psum = calloc(E, sizeof *Psum), *imp = calloc(E, sizeof *imp), *load = calloc(E, sizeof *load);
    double *hid = calloc(F, sizeof *hid), *yt = calloc(C, sizeof *yt), *g = calloc(K, sizeof *g);
    int *ord = calloc(E, sizeof *ord), *count = calloc(E, sizeof *count);
    const double *wg = p + off->wg, *wn = p + off->wnoise;
    double obj = 0, zsum = 0, margin = INFINITY;
    for (int t = 0; t < n; t++) {
        const double *xt = x + (size_t)t * C;
        double mx = -INFINITY;
        for (int e = 0; e < E; e++) {
            double a = 0, b = 0;
            for (int i = 0; i < C; i++) a += wg[(size_t)e * C + i] * xt[i], b += wn[(size_t)e * C + i] * xt[i];
            lg[e] = a;
            sp[e] = ref_softplus(b);
            H[e] = eps ? a + eps[(size_t)t * E + e] * sp[e] : a;
            mx = fmax(mx, a);
        }
        double sum = 0;
        for (int e = 0; e < E; e++) sum += exp(lg[e] - mx);
        const double lse = mx + log(sum);
        zsum += lse * lse;
        for (int e = 0; e < E; e++) Psum[e] += exp(lg[e] - lse);
        /* order by H descending, the lower id first on equal H */
        for (int e = 0; e < E; e++) ord[e] = e;
        for (int i = 1; i < E; i++) {
            int v = ord[i], j = i;
            while (j > 0 && (H[ord[j - 1]] < H[v] || (H[ord[j - 1]] == H[v] && ord[j - 1] > v))) {
                ord[j] = ord[j - 1];
                j--;
            }
            ord[j] = v;
        }
        for (int j = 0; j < (K < E ? K : E - 1); j++) margin = fmin(margin, H[ord[j]] - H[ord[j + 1]]);
        double den = 0;
        for (int j = 0; j < K; j++) den += g[j] = exp(H[ord[j]] - H[ord[0]]);
        for (int j = 0; j < K; j++) {
            g[j] *= c->route_scale / den;
            count[ord[j]]++;
            imp[ord[j]] += g[j];
            if (o && o->ids) o->ids[(size_t)t * K + j] = ord[j];
            if (o && o->w) o->w[(size_t)t * K + j] = g[j];
        }
        if (eps && c->load_coef > 0 && K < E)
            for (int r = 0; r < E; r++) {
                const int e = ord[r];
                const double thr = r < K ? H[ord[K]] : H[ord[K - 1]];
                load[e] += 0.5 * erfc(-(lg[e] - thr) / sp[e] / sqrt(2.0));
            }
        memset(yt, 0, sizeof(double) * C);
        for (int j = 0; j < K; j++) {
            const int e = ord[j];
            const double *w1 = p + off->w1 + (size_t)e * F * C, *w2 = p + off->w2 + (size_t)e * C * F;
            const double *w3 = c->act == MOE_ACT_SWIGLU ? p + off->w3 + (size_t)e * F * C : NULL;
            for (int f = 0; f < F; f++) {
                double a1 = 0, a3 = 0;
                for (int i = 0; i < C; i++) {
                    a1 += w1[(size_t)f * C + i] * xt[i];
                    if (w3) a3 += w3[(size_t)f * C + i] * xt[i];
                }
                hid[f] = ref_act(c->act, a1, a3);
            }
            for (int i = 0; i < C; i++) {
                double v = 0;
                for (int f = 0; f < F; f++) v += w2[(size_t)i * F + f] * hid[f];
                yt[i] += g[j] * v;
            }
        }
        for (int i = 0; i < C; i++) {
            if (o && o->y) o->y[(size_t)t * C + i] = yt[i];
            if (dy) obj += yt[i] * dy[(size_t)t * C + i];
        }
    }
    double aux = 0;
    for (int e = 0; e < E && n > 0; e++) aux += (double)count[e] / ((double)n * K) * Psum[e] / n;
    aux *= (double)c->aux_coef * E;
    const double z = n > 0 ? c->z_coef * zsum / n : 0;
    const double li = c->importance_coef * ref_cv2(imp, E);
    const double ll = eps && c->load_coef > 0 && K < E ? c->load_coef * ref_cv2(load, E) : 0;
    if (o) o->aux = aux, o->z = z, o->imp = li, o->load = ll, o->margin = margin;
    free(lg), free(H), free(sp), free(Psum), free(imp), free(load), free(hid), free(yt), free(g), free(ord);
    free(count);
    return obj + aux + z + li + ll;
}

/* ---- fixture: layer, random data, the draws of its next training call ------ */

typedef struct {
    moe_layer *l;
    moe_layer_config cfg;
    moe_layer_params off;
    int n;
    float *x, *y, *dy, *dx;  /* [N][C] */
    double *pd, *xd, *dyd;   /* double copies */
    double *eps;             /* [N][E] the next training forward's draws */
} fixture;

static void fixture_free(fixture *f) {
    moe_layer_free(f->l);
    free(f->x), free(f->y), free(f->dy), free(f->dx), free(f->pd), free(f->xd), free(f->dyd), free(f->eps);
    memset(f, 0, sizeof *f);
}

/* The draws a training forward makes at the layer's current call counter. */
static void read_eps(moe_layer *l, int n, double *eps) {
    const int E = l->cfg.n_experts;
    for (int t = 0; t < n; t++)
        for (int e = 0; e < E; e++) eps[(size_t)t * E + e] = moe__router_normal(l, t, e);
}

/* Random parameters (wnoise too: init zeroes it) and inputs whose routing
 * (noisy in training, clean in evaluation) has a margin of at least
 * min_margin, reseeding until it does. */
static int fixture_make(fixture *f, moe_layer_config cfg, int n, uint64_t seed, double min_margin, int training) {
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
    moe_layer_set_training(f->l, training);
    const size_t nc = (size_t)n * cfg.d_model, E = (size_t)cfg.n_experts, C = (size_t)cfg.d_model;
    f->x = malloc(sizeof(float) * (nc + 1));
    f->y = malloc(sizeof(float) * (nc + 1));
    f->dy = malloc(sizeof(float) * (nc + 1));
    f->dx = malloc(sizeof(float) * (nc + 1));
    f->pd = malloc(sizeof(double) * f->off.total);
    f->xd = malloc(sizeof(double) * (nc + 1));
    f->dyd = malloc(sizeof(double) * (nc + 1));
    f->eps = malloc(sizeof(double) * ((size_t)n * E + 1));
    read_eps(f->l, n, f->eps);
    for (int attempt = 0; attempt < 200; attempt++, seed += 7919) {
        moe_layer_init(f->l, seed, 1.0f);
        float *p = moe_layer_params_ptr(f->l);
        uint64_t s = seed ^ 0x5eed;
        for (size_t i = 0; i < E * C; i++) p[f->off.wg + i] = (float)(1.5 * randn(&s) / sqrt((double)C));
        for (size_t i = 0; i < E * C; i++) p[f->off.wnoise + i] = (float)(0.8 * randn(&s) / sqrt((double)C));
        for (size_t i = 0; i < nc; i++) f->x[i] = (float)randn(&s);
        for (size_t i = 0; i < nc; i++) f->dy[i] = (float)randn(&s);
        for (size_t i = 0; i < f->off.total; i++) f->pd[i] = p[i];
        for (size_t i = 0; i < nc; i++) f->xd[i] = f->x[i], f->dyd[i] = f->dy[i];
        ref_out o = {0};
        ref_noisy(&cfg, &f->off, f->pd, f->xd, n, f->l->training ? f->eps : NULL, NULL, &o);
        if (o.margin >= min_margin) return 0;
    }
    moe_test_fail(__FILE__, __LINE__, "no seed gave routing margin %g", min_margin);
    return -1;
}

static moe_layer_config noisy_cfg(int C, int F, int E, int K, int max_tokens) {
    moe_layer_config c = moe_layer_config_default(C, F, E, K, max_tokens);
    c.router = MOE_ROUTER_NOISY_TOPK;
    c.seed = 1234;
    c.load_coef = 0.1f;
    c.importance_coef = 0.1f;
    c.aux_coef = 0.05f;
    c.z_coef = 0.01f;
    return c;
}

/* ---- hand-computed routing ------------------------------------------------ */

/* E = 4, K = 2, C = 3: wg rows e0, e1, e2, (e0 + e1) / 2, so the logits are
 * readable off x. */
static moe_layer *hand_layer(float *x) {
    moe_layer_config c = noisy_cfg(3, 2, 4, 2, 3);
    moe_layer *l = moe_layer_create(&c, NULL, NULL, 0);
    if (!l) return NULL;
    moe_layer_init(l, 1, 1.0f);
    float *p = moe_layer_params_ptr(l);
    const moe_layer_params off = moe_layer_param_offsets(l);
    const float wg[12] = {1, 0, 0, 0, 1, 0, 0, 0, 1, 0.5f, 0.5f, 0};
    memcpy(p + off.wg, wg, sizeof wg);
    /* logits (2, 1, 0, 1.5), (0, 0, 3, 0), (-1, 2, 1, 0.5) */
    const float xs[9] = {2, 1, 0, 0, 0, 3, -1, 2, 1};
    memcpy(x, xs, sizeof xs);
    return l;
}

TEST(noisy_hand_computed_eval_and_train) {
    float x[9], y[9];
    moe_layer *l = hand_layer(x);
    CHECK(l != NULL);
    if (!l) return;
    /* evaluation: H = logits. Token 1's second place is a three-way tie at 0:
     * the lower id (0) wins */
    moe_layer_set_training(l, 0);
    CHECK(moe_layer_forward(l, x, 3, y) == 0);
    const int ids_eval[6] = {0, 3, 2, 0, 1, 2};
    const double w_eval[6] = {1 / (1 + exp(-0.5)), 1 / (1 + exp(0.5)), 1 / (1 + exp(-3.0)),
                              1 / (1 + exp(3.0)),  1 / (1 + exp(-1.0)), 1 / (1 + exp(1.0))};
    for (int i = 0; i < 6; i++) {
        CHECK_EQ_INT(moe_layer_topk_ids(l)[i], ids_eval[i]);
        CHECK_CLOSE(moe_layer_topk_weights(l)[i], w_eval[i], 1e-7, 1e-6);
    }
    CHECK(moe_layer_get_stats(l)->load_loss == 0.0f);

    /* training, wnoise = 0: std = softplus(0) = ln 2 for every expert;
     * H = logits + eps ln 2 with the draws of this call */
    moe_layer_set_training(l, 1);
    const uint64_t call = l->calls;
    double eps[12], H[12];
    read_eps(l, 3, eps);
    CHECK(moe_layer_forward(l, x, 3, y) == 0);
    CHECK(l->calls == call + 1);
    const double lg[12] = {2, 1, 0, 1.5, 0, 0, 3, 0, -1, 2, 1, 0.5};
    double load[4] = {0}, imp[4] = {0};
    for (int t = 0; t < 3; t++) {
        const double *h = H + 4 * t;
        for (int e = 0; e < 4; e++) H[4 * t + e] = lg[4 * t + e] + eps[4 * t + e] * log(2.0);
        int a = 0; /* best, second, third by H (draws are continuous: no ties) */
        for (int e = 1; e < 4; e++) a = h[e] > h[a] ? e : a;
        int b = a == 0 ? 1 : 0;
        for (int e = 0; e < 4; e++) b = e != a && h[e] > h[b] ? e : b;
        int d = -1;
        for (int e = 0; e < 4; e++) d = e != a && e != b && (d < 0 || h[e] > h[d]) ? e : d;
        CHECK_EQ_INT(moe_layer_topk_ids(l)[2 * t], a);
        CHECK_EQ_INT(moe_layer_topk_ids(l)[2 * t + 1], b);
        const double wa = 1 / (1 + exp(h[b] - h[a]));
        CHECK_CLOSE(moe_layer_topk_weights(l)[2 * t], wa, 1e-7, 1e-6);
        CHECK_CLOSE(moe_layer_topk_weights(l)[2 * t + 1], 1 - wa, 1e-7, 1e-6);
        imp[a] += wa, imp[b] += 1 - wa;
        for (int e = 0; e < 4; e++) {
            const double thr = e == a || e == b ? h[d] : h[b];
            load[e] += 0.5 * erfc(-(lg[4 * t + e] - thr) / log(2.0) / sqrt(2.0));
        }
    }
    const moe_layer_stats *st = moe_layer_get_stats(l);
    CHECK_CLOSE(st->load_loss, 0.1 * ref_cv2(load, 4), 1e-7, 1e-5);
    CHECK_CLOSE(st->importance_loss, 0.1 * ref_cv2(imp, 4), 1e-7, 1e-5);
    CHECK(st->load_loss > 0);
    moe_layer_free(l);
}

/* ---- finite differences ---------------------------------------------------- */

/* Central differences of the double reference (same draws) against the fp32
 * backward, over every parameter and input element. */
static void check_gradients(moe_layer_config cfg, int n, uint64_t seed, int training, double *worst_out) {
    fixture f;
    if (fixture_make(&f, cfg, n, seed, 2e-3, training)) return;
    const double *eps = training ? f.eps : NULL;
    moe_layer_zero_grad(f.l);
    CHECK(moe_layer_forward(f.l, f.x, n, f.y) == 0);
    CHECK_MSG(moe_layer_backward(f.l, f.dy, f.dx) == 0, "backward: %s", moe_layer_errmsg(f.l));
    const float *g = moe_layer_grads_ptr(f.l);

    /* the forward agrees with the reference on routing and losses */
    const size_t nk = (size_t)n * cfg.top_k;
    int *ids = malloc(sizeof(int) * nk);
    ref_out o = {.ids = ids};
    ref_noisy(&cfg, &f.off, f.pd, f.xd, n, eps, f.dyd, &o);
    int mism = 0;
    for (size_t i = 0; i < nk; i++) mism += ids[i] != moe_layer_topk_ids(f.l)[i];
    CHECK_EQ_INT(mism, 0);
    const moe_layer_stats *st = moe_layer_get_stats(f.l);
    CHECK_CLOSE(st->load_loss, o.load, 1e-7, 1e-4);
    CHECK_CLOSE(st->importance_loss, o.imp, 1e-7, 1e-4);
    CHECK_CLOSE(st->aux_loss, o.aux, 1e-7, 1e-4);
    if (training && cfg.load_coef > 0) CHECK(st->load_loss > 0);

    const double h = 1e-6;
    double worst = 0;
    const char *worst_what = "";
    size_t worst_i = 0;
    for (size_t i = 0; i < f.off.total; i++) {
        const double keep = f.pd[i];
        f.pd[i] = keep + h;
        const double up = ref_noisy(&cfg, &f.off, f.pd, f.xd, n, eps, f.dyd, NULL);
        f.pd[i] = keep - h;
        const double dn = ref_noisy(&cfg, &f.off, f.pd, f.xd, n, eps, f.dyd, NULL);
        f.pd[i] = keep;
        const double fd = (up - dn) / (2 * h), err = fabs(g[i] - fd) / fmax(1e-2, fabs(fd));
        if (err > worst) {
            worst = err, worst_i = i;
            worst_what = i < f.off.w1 ? "wg" : i >= f.off.wnoise ? "wnoise" : "experts";
        }
    }
    const size_t nc = (size_t)n * cfg.d_model;
    for (size_t i = 0; i < nc; i++) {
        const double keep = f.xd[i];
        f.xd[i] = keep + h;
        const double up = ref_noisy(&cfg, &f.off, f.pd, f.xd, n, eps, f.dyd, NULL);
        f.xd[i] = keep - h;
        const double dn = ref_noisy(&cfg, &f.off, f.pd, f.xd, n, eps, f.dyd, NULL);
        f.xd[i] = keep;
        const double fd = (up - dn) / (2 * h), err = fabs(f.dx[i] - fd) / fmax(1e-2, fabs(fd));
        if (err > worst) worst = err, worst_i = i, worst_what = "x";
    }
    /* the noise path is exercised (training) or absent (evaluation) */
    double gn = 0;
    for (size_t i = 0; i < (size_t)cfg.n_experts * cfg.d_model; i++) gn = fmax(gn, fabs(g[f.off.wnoise + i]));
    if (training) CHECK_MSG(gn > 1e-3, "wnoise gradient is %g", gn);
    else CHECK_MSG(gn == 0, "wnoise gradient in evaluation: %g", gn);
    printf("    train %d E %d K %d: worst rel err %.3e at %s[%zu], max |dwnoise| %.3g\n", training, cfg.n_experts,
           cfg.top_k, worst, worst_what, worst_i, gn);
    CHECK_MSG(worst < 2e-3, "train %d E %d K %d: worst rel err %g at %s[%zu]", training, cfg.n_experts, cfg.top_k,
              worst, worst_what, worst_i);
    if (worst_out) *worst_out = fmax(*worst_out, worst);
    free(ids);
    fixture_free(&f);
}

TEST(noisy_gradients_finite_difference) {
    const int ek[][2] = {{4, 2}, {5, 1}, {6, 3}};
    uint64_t seed = 300;
    for (size_t k = 0; k < sizeof ek / sizeof ek[0]; k++)
        check_gradients(noisy_cfg(6, 7, ek[k][0], ek[k][1], 16), 11, seed++, 1, NULL);
    moe_layer_config c = noisy_cfg(5, 6, 4, 2, 16);
    c.act = MOE_ACT_GELU;
    c.route_scale = 1.7f;
    check_gradients(c, 9, seed++, 1, NULL);
    check_gradients(c, 9, seed++, 0, NULL); /* evaluation: no noise, no load loss */
}

/* ---- PyTorch fixture -------------------------------------------------------- */

static float *fx_load(moe__st_file *f, const char *name, size_t n) {
    const moe__st_tensor *t = moe__st_find(f, name);
    if (!t || t->numel != n) {
        moe_test_fail(__FILE__, __LINE__, "router_noisy fixture: tensor %s missing or of the wrong size", name);
        return NULL;
    }
    float *v = malloc(sizeof(float) * (n ? n : 1));
    if (moe__st_read_f32(t, v, n)) {
        moe_test_fail(__FILE__, __LINE__, "router_noisy fixture: tensor %s unreadable", name);
        free(v);
        return NULL;
    }
    return v;
}

/* max |a-b| / max(1e-6, max |b|), printed, checked against tol */
static void fx_compare(const char *what, const float *a, const float *b, size_t n, double tol) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        r = fmax(r, fabs((double)b[i]));
    }
    const double rel = d / fmax(1e-6, r);
    printf("    %-14s max abs err %.3e  rel %.3e\n", what, d, rel);
    CHECK_MSG(rel <= tol, "%s: rel err %g > %g", what, rel, tol);
}

static const char *fx_meta(moe__st_file *f, const char *k) {
    const char *v = moe__st_meta(f, k);
    return v ? v : "";
}

TEST(noisy_pytorch_fixture) {
    char path[512], msg[256];
    snprintf(path, sizeof path, "%s/router_noisy.safetensors", moe_test_data_dir());
    moe__st_file *f = NULL;
    int rc = moe__st_open(path, &f, msg, sizeof msg);
    CHECK_MSG(rc == 0, "%s", msg);
    if (rc) return;
    const int N = atoi(fx_meta(f, "N")), C = atoi(fx_meta(f, "C")), F = atoi(fx_meta(f, "F"));
    const int E = atoi(fx_meta(f, "E")), K = atoi(fx_meta(f, "K"));
    moe_layer_config c = moe_layer_config_default(C, F, E, K, N);
    c.router = MOE_ROUTER_NOISY_TOPK;
    c.act = MOE_ACT_SWIGLU;
    c.seed = strtoull(fx_meta(f, "seed"), NULL, 10);
    c.route_scale = strtof(fx_meta(f, "scale"), NULL);
    c.aux_coef = strtof(fx_meta(f, "aux_coef"), NULL);
    c.z_coef = strtof(fx_meta(f, "z_coef"), NULL);
    c.load_coef = strtof(fx_meta(f, "load_coef"), NULL);
    c.importance_coef = strtof(fx_meta(f, "importance_coef"), NULL);
    moe_layer *l = moe_layer_create(&c, &rc, msg, sizeof msg);
    CHECK_MSG(l != NULL, "create: %s", msg);
    if (!l) {
        moe__st_close(f);
        return;
    }
    l->calls = strtoull(fx_meta(f, "call"), NULL, 10);

    const moe_layer_params off = moe_layer_param_offsets(l);
    const size_t NC = (size_t)N * C, EC = (size_t)E * C, EFC = (size_t)E * F * C, NE = (size_t)N * E;
    const char *pn[] = {"wg", "wnoise", "w1", "w2", "w3"}, *gn[] = {"dwg", "dwnoise", "dw1", "dw2", "dw3"};
    const size_t po[] = {off.wg, off.wnoise, off.w1, off.w2, off.w3}, pl[] = {EC, EC, EFC, EFC, EFC};
    float *p = moe_layer_params_ptr(l);
    for (int i = 0; i < 5; i++) {
        float *v = fx_load(f, pn[i], pl[i]);
        if (v) memcpy(p + po[i], v, sizeof(float) * pl[i]);
        free(v);
    }
    float *x = fx_load(f, "x", NC), *dy = fx_load(f, "dy", NC), *yref = fx_load(f, "y", NC);
    float *dxref = fx_load(f, "dx", NC), *wref = fx_load(f, "topk_weights", (size_t)N * K);
    float *eps = fx_load(f, "eps", NE), *losses = fx_load(f, "losses", 4);
    float *y = malloc(sizeof(float) * NC), *dx = malloc(sizeof(float) * NC), *mine = malloc(sizeof(float) * NE);
    if (!x || !dy || !yref || !dxref || !wref || !eps || !losses) goto out;

    /* the Python port of the counter-based draws gives the same bits */
    for (int t = 0; t < N; t++)
        for (int e = 0; e < E; e++) mine[(size_t)t * E + e] = moe__router_normal(l, t, e);
    CHECK(memcmp(mine, eps, sizeof(float) * NE) == 0);

    CHECK_MSG(moe_layer_forward(l, x, N, y) == 0, "forward: %s", moe_layer_errmsg(l));
    const moe__st_tensor *ids = moe__st_find(f, "topk_ids");
    CHECK(ids && ids->dtype == MOE__DT_I32 && ids->numel == (size_t)N * K);
    if (ids && ids->numel == (size_t)N * K) {
        int mism = 0;
        for (size_t i = 0; i < ids->numel; i++) {
            int32_t v;
            memcpy(&v, (const char *)ids->data + 4 * i, 4);
            mism += v != moe_layer_topk_ids(l)[i];
        }
        CHECK_EQ_INT(mism, 0);
    }
    fx_compare("y", y, yref, NC, 1e-4);
    fx_compare("gates", moe_layer_topk_weights(l), wref, (size_t)N * K, 1e-4);
    const moe_layer_stats *st = moe_layer_get_stats(l);
    const float got[4] = {st->aux_loss, st->z_loss, st->importance_loss, st->load_loss};
    fx_compare("losses", got, losses, 4, 1e-4);
    printf("    load_loss %.9g (torch %.9g), importance_loss %.9g (torch %.9g)\n", st->load_loss, losses[3],
           st->importance_loss, losses[2]);
    CHECK_CLOSE(st->load_loss, losses[3], 0, 1e-4);
    CHECK_CLOSE(st->importance_loss, losses[2], 0, 1e-4);

    moe_layer_zero_grad(l);
    CHECK(moe_layer_backward(l, dy, dx) == 0);
    fx_compare("dx", dx, dxref, NC, 1e-4);
    for (int i = 0; i < 5; i++) {
        float *v = fx_load(f, gn[i], pl[i]);
        if (v) fx_compare(gn[i], moe_layer_grads_ptr(l) + po[i], v, pl[i], 1e-4);
        free(v);
    }
out:
    free(x), free(dy), free(yref), free(dxref), free(wref), free(eps), free(losses), free(y), free(dx), free(mine);
    moe_layer_free(l);
    moe__st_close(f);
}

/* ---- evaluation ----------------------------------------------------------------- */

/* In evaluation the noisy router is plain renormalised softmax top-k of the
 * clean logits whatever wnoise is: the same routing as a TOPK layer with the
 * same weights, no draw (the call counter stays), no load loss, and no
 * gradient to wnoise. */
TEST(noisy_eval_has_no_noise) {
    const int N = 40, E = 8, K = 2;
    fixture f;
    if (fixture_make(&f, noisy_cfg(12, 16, E, K, N), N, 41, 0, 1)) return;
    float *p = moe_layer_params_ptr(f.l);
    for (size_t i = 0; i < (size_t)E * 12; i++) p[f.off.wnoise + i] *= 5.0f; /* loud noise, if it leaked */
    moe_layer_config tc = moe_layer_config_default(12, 16, E, K, N);
    moe_layer *ref = moe_layer_create(&tc, NULL, NULL, 0);
    CHECK(ref != NULL);
    if (!ref) {
        fixture_free(&f);
        return;
    }
    memcpy(moe_layer_params_ptr(ref), p, sizeof(float) * moe_layer_param_offsets(ref).total); /* same prefix */
    moe_layer_set_training(f.l, 0);
    moe_layer_set_training(ref, 0);
    const size_t nc = (size_t)N * 12;
    float *y2 = malloc(sizeof(float) * nc), *yr = malloc(sizeof(float) * nc);
    const uint64_t calls = f.l->calls;
    CHECK(moe_layer_forward(f.l, f.x, N, f.y) == 0);
    CHECK(moe_layer_forward(f.l, f.x, N, y2) == 0);
    CHECK(f.l->calls == calls);
    CHECK(memcmp(f.y, y2, sizeof(float) * nc) == 0);
    CHECK(moe_layer_forward(ref, f.x, N, yr) == 0);
    int mism = 0;
    double dw = 0, dyv = 0;
    for (int i = 0; i < N * K; i++) {
        mism += moe_layer_topk_ids(f.l)[i] != moe_layer_topk_ids(ref)[i];
        dw = fmax(dw, fabs(moe_layer_topk_weights(f.l)[i] - moe_layer_topk_weights(ref)[i]));
    }
    for (size_t i = 0; i < nc; i++) dyv = fmax(dyv, fabs(f.y[i] - yr[i]));
    CHECK_EQ_INT(mism, 0);
    CHECK_MSG(dw <= 1e-6, "gate weights differ from TOPK by %g", dw);
    CHECK_MSG(dyv <= 1e-5, "y differs from TOPK by %g", dyv);
    CHECK(moe_layer_get_stats(f.l)->load_loss == 0.0f);
    moe_layer_zero_grad(f.l);
    CHECK(moe_layer_backward(f.l, f.dy, f.dx) == 0);
    int nz = 0;
    for (size_t i = 0; i < (size_t)E * 12; i++) nz += moe_layer_grads_ptr(f.l)[f.off.wnoise + i] != 0.0f;
    CHECK_EQ_INT(nz, 0);

    /* training with the same weights does draw: routing moves for some token */
    moe_layer_set_training(f.l, 1);
    CHECK(moe_layer_forward(f.l, f.x, N, f.y) == 0);
    CHECK(f.l->calls == calls + 1);
    mism = 0;
    for (int i = 0; i < N * K; i++) mism += moe_layer_topk_ids(f.l)[i] != moe_layer_topk_ids(ref)[i];
    CHECK(mism > 0);
    free(y2), free(yr);
    moe_layer_free(ref);
    fixture_free(&f);
}

/* top_k raised to E after creation: every expert is always chosen, the load
 * estimator is undefined and the load loss is 0; gradients stay finite. */
TEST(noisy_top_k_equal_to_E_has_no_load_loss) {
    moe_layer_config c = noisy_cfg(6, 5, 4, 2, 10);
    c.max_top_k = 4;
    fixture f;
    if (fixture_make(&f, c, 10, 9, 0, 1)) return;
    CHECK(moe_layer_set_top_k(f.l, 4) == 0);
    CHECK(moe_layer_forward(f.l, f.x, 10, f.y) == 0);
    CHECK(moe_layer_get_stats(f.l)->load_loss == 0.0f);
    moe_layer_zero_grad(f.l);
    CHECK(moe_layer_backward(f.l, f.dy, f.dx) == 0);
    int bad = 0;
    for (size_t i = 0; i < f.off.total; i++) bad += !isfinite(moe_layer_grads_ptr(f.l)[i]);
    CHECK_EQ_INT(bad, 0);
    fixture_free(&f);
}

/* ---- determinism ---------------------------------------------------------------- */

/* Several chunks of tokens (MOE__CHUNK 256) and dwnoise tiles over experts
 * and columns; results must not depend on the thread count. */
TEST(noisy_bitwise_identical_1_and_2_threads) {
    const int N = 900, C = 96, E = 8;
    const size_t nc = (size_t)N * C;
    float *res[2][3] = {{0}};
    float loss[2][2] = {{0}};
    size_t T = 0;
    for (int th = 1; th <= 2; th++) {
        moe_layer_config c = noisy_cfg(C, 64, E, 2, N);
        c.n_threads = th;
        fixture f;
        if (fixture_make(&f, c, N, 77, 0, 1)) return;
        T = f.off.total;
        moe_layer_zero_grad(f.l);
        for (int rep = 0; rep < 2; rep++) { /* a second call: fresh draws */
            CHECK(moe_layer_forward(f.l, f.x, N, f.y) == 0);
            CHECK(moe_layer_backward(f.l, f.dy, f.dx) == 0);
        }
        res[th - 1][0] = malloc(sizeof(float) * nc), res[th - 1][1] = malloc(sizeof(float) * nc);
        res[th - 1][2] = malloc(sizeof(float) * T);
        memcpy(res[th - 1][0], f.y, sizeof(float) * nc);
        memcpy(res[th - 1][1], f.dx, sizeof(float) * nc);
        memcpy(res[th - 1][2], moe_layer_grads_ptr(f.l), sizeof(float) * T);
        loss[th - 1][0] = moe_layer_get_stats(f.l)->load_loss;
        loss[th - 1][1] = moe_layer_get_stats(f.l)->importance_loss;
        fixture_free(&f);
    }
    CHECK_MSG(memcmp(res[0][0], res[1][0], sizeof(float) * nc) == 0, "y differs between 1 and 2 threads");
    CHECK_MSG(memcmp(res[0][1], res[1][1], sizeof(float) * nc) == 0, "dx differs between 1 and 2 threads");
    CHECK_MSG(memcmp(res[0][2], res[1][2], sizeof(float) * T) == 0, "grads differ between 1 and 2 threads");
    CHECK(memcmp(loss[0], loss[1], sizeof loss[0]) == 0);
    CHECK(loss[0][0] > 0);
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 3; j++) free(res[i][j]);
}

/* Non-finite noise weights are reported by name (training only: evaluation
 * does not read wnoise). */
TEST(noisy_rejects_nonfinite_wnoise) {
    float x[9], y[9];
    moe_layer *l = hand_layer(x);
    CHECK(l != NULL);
    if (!l) return;
    const moe_layer_params off = moe_layer_param_offsets(l);
    moe_layer_params_ptr(l)[off.wnoise + 3 * 2 + 1] = INFINITY; /* expert 2 */
    CHECK_EQ_INT(moe_layer_forward(l, x, 3, y), MOE_ENONFINITE);
    CHECK(strstr(moe_layer_errmsg(l), "expert 2") != NULL);
    moe_layer_set_training(l, 0);
    CHECK_EQ_INT(moe_layer_forward(l, x, 3, y), 0);
    moe_layer_free(l);
}
