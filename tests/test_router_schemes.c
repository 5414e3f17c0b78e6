/* Routing schemes of the MoE layer: expert choice, forced balance, GShard's
 * random second expert, aux-loss-free bias, group-limited routing, the
 * sequence-wise aux loss, the importance loss, and capacity with the slot
 * layout.
 *
 * Three kinds of evidence:
 *   - hand cases: router weights set to the identity, so each token's x row
 *     is its logits and the expected slots can be worked out on paper;
 *   - a naive double reference of every scheme (sref_objective below) for
 *     values and for finite-difference gradients. ref_layer.c (top-k by
 *     logit, capacity, whole-call aux and z) is reused where it covers a
 *     scheme: the sequence-wise aux loss is a sum of ref_layer objectives
 *     over blocks, the importance loss is taken from ref_layer's gates, the
 *     Switch capacity checks use it directly, and sref itself is checked
 *     against it on the subset both cover;
 *   - PyTorch fixtures (tools/gen_router_fixtures.py, tests/data/router_*). */
#include "io/safetensors.h"
#include "layer/layer_impl.h"
#include "ref_layer.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- helpers ------------------------------------------------------------------ */

static double rnd_normal(uint64_t *s) {
    /* local generator: test data must not depend on the library's RNG */
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    const double u1 = ((*s >> 11) + 1.0) / 9007199254740993.0;
    *s = *s * 6364136223846793005ULL + 1442695040888963407ULL;
    const double u2 = (*s >> 11) / 9007199254740992.0;
    return sqrt(-2 * log(u1)) * cos(2 * M_PI * u2);
}

static moe_layer *make_layer(const moe_layer_config *c) {
    char msg[256] = "";
    int err = 0;
    moe_layer *l = moe_layer_create(c, &err, msg, sizeof msg);
    if (!l) moe_test_fail(__FILE__, __LINE__, "create: %s (%s)", msg, moe_err_name(err));
    return l;
}

/* Random experts, and router weights = the identity (C == E): token t's
 * logits are exactly its x row, so routing can be set by hand. */
static void identity_router(moe_layer *l, uint64_t seed) {
    const moe_layer_config *c = moe_layer_get_config(l);
    moe_layer_init(l, seed, 1.0f);
    float *p = moe_layer_params_ptr(l) + moe_layer_param_offsets(l).wg;
    memset(p, 0, sizeof(float) * (size_t)c->n_experts * c->d_model);
    for (int e = 0; e < c->n_experts; e++) p[e * c->d_model + e] = 1.0f;
}

static double sigm(double v) { return 1.0 / (1.0 + exp(-v)); }

static int row_is_zero(const float *y, int t, int C) {
    for (int c = 0; c < C; c++)
        if (y[(size_t)t * C + c] != 0.0f) return 0;
    return 1;
}

/* ---- a double reference of every scheme ------------------------------------------- */

#define SR_MAXN 64
#define SR_MAXE 16
#define SR_MAXR (SR_MAXN * SR_MAXE)

typedef struct {
    const double *u; /* [N] GShard's uniform draw per token (training), or NULL */
    int training;
} sref_opts;

typedef struct {
    int R;
    int off[SR_MAXN + 1];
    int tok[SR_MAXR], ex[SR_MAXR];
    double w[SR_MAXR];
    unsigned char keep[SR_MAXR];
    int count[SR_MAXE];
    double aux, z, imp_loss, imp_cv;
    double margin; /* smallest gap at any routing decision */
} sref_route;

/* Indices of v[0..n) by decreasing value, the lower index first on ties
 * (entries with skip[i] left out); returns how many. */
static int order_desc(const double *v, int n, const unsigned char *skip, int *ord) {
    int m = 0;
    for (int i = 0; i < n; i++) {
        if (skip && skip[i]) continue;
        int j = m++;
        while (j > 0 && v[ord[j - 1]] < v[i]) {
            ord[j] = ord[j - 1];
            j--;
        }
        ord[j] = i;
    }
    return m;
}

/* Objective sum(y dy) + aux + z + importance of the layer described by c with
 * params p (layout off) on x [n][C], every scheme written out from its
 * definition in include/moe.h; y and the routing go to y / rt when not NULL. */
static double sref_objective(const moe_layer_config *c, const moe_layer_params *off, const double *p,
                             const double *x, int n, const double *dy, const sref_opts *o, double *y,
                             sref_route *rt_out) {
    const int C = c->d_model, F = c->d_ff, E = c->n_experts, K = c->top_k;
    sref_route *rt = rt_out ? rt_out : malloc(sizeof *rt);
    static double lg[SR_MAXN][SR_MAXE], s[SR_MAXN][SR_MAXE], q[SR_MAXN][SR_MAXE], lse[SR_MAXN];
    double *h = malloc(sizeof(double) * (size_t)F), *yt = malloc(sizeof(double) * (size_t)C);
    memset(rt, 0, sizeof *rt);
    rt->margin = INFINITY;
    for (int t = 0; t < n; t++) {
        double mx = -INFINITY, sum = 0, ssum = 0;
        for (int e = 0; e < E; e++) {
            double v = 0;
            for (int i = 0; i < C; i++) v += p[off->wg + (size_t)e * C + i] * x[(size_t)t * C + i];
            lg[t][e] = v;
            mx = fmax(mx, v);
        }
        for (int e = 0; e < E; e++) sum += exp(lg[t][e] - mx);
        lse[t] = mx + log(sum);
        for (int e = 0; e < E; e++) {
            s[t][e] = c->score == MOE_SCORE_SOFTMAX ? exp(lg[t][e] - lse[t]) : sigm(lg[t][e]);
            ssum += s[t][e];
        }
        for (int e = 0; e < E; e++) q[t][e] = s[t][e] / ssum;
    }

    /* ---- selection ---- */
    int R = 0;
    if (c->router == MOE_ROUTER_EXPERT_CHOICE) {
        const double cf = c->capacity_factor > 0 ? c->capacity_factor : 1.0;
        int cap = (int)ceil(cf * n * K / E);
        cap = cap < 1 ? 1 : cap > n ? n : cap;
        static unsigned char take[SR_MAXN][SR_MAXE];
        for (int e = 0; e < E; e++) {
            double col[SR_MAXN];
            int ord[SR_MAXN];
            for (int t = 0; t < n; t++) col[t] = s[t][e];
            order_desc(col, n, NULL, ord);
            for (int r = 0; r < n; r++) take[ord[r]][e] = r < cap;
            if (cap < n) rt->margin = fmin(rt->margin, col[ord[cap - 1]] - col[ord[cap]]);
        }
        for (int t = 0; t < n; t++) {
            rt->off[t] = R;
            for (int e = 0; e < E; e++)
                if (take[t][e]) rt->tok[R] = t, rt->ex[R] = e, rt->w[R] = c->route_scale * s[t][e], R++;
        }
    } else if (c->router == MOE_ROUTER_BALANCED) {
        for (int t = 0; t < n; t++) {
            rt->off[t] = R;
            for (int j = 0; j < K; j++, R++) rt->tok[R] = t, rt->ex[R] = (t * K + j) % E, rt->w[R] = 1.0 / K;
        }
    } else { /* TOPK */
        const int biased = c->bias_update_rate > 0 || c->n_groups > 1;
        for (int t = 0; t < n; t++) {
            double v[SR_MAXE];
            unsigned char masked[SR_MAXE] = {0};
            int ord[SR_MAXE];
            for (int e = 0; e < E; e++)
                v[e] = !biased ? lg[t][e] : s[t][e] + (off->ebias != SIZE_MAX ? p[off->ebias + e] : 0.0);
            if (c->n_groups > 1) {
                const int G = c->n_groups, per = E / G;
                double gs[SR_MAXE];
                int gord[SR_MAXE];
                for (int g = 0; g < G; g++) {
                    int eo[SR_MAXE];
                    order_desc(v + g * per, per, NULL, eo);
                    gs[g] = v[g * per + eo[0]] + (per > 1 ? v[g * per + eo[1]] : 0.0);
                    if (per > 2) rt->margin = fmin(rt->margin, v[g * per + eo[1]] - v[g * per + eo[2]]);
                }
                order_desc(gs, G, NULL, gord);
                if (c->topk_groups < G) rt->margin = fmin(rt->margin, gs[gord[c->topk_groups - 1]] - gs[gord[c->topk_groups]]);
                for (int r = c->topk_groups; r < G; r++)
                    for (int e = gord[r] * per; e < (gord[r] + 1) * per; e++) masked[e] = 1;
            }
            const int m = order_desc(v, E, masked, ord);
            for (int j = 0; j + 1 < m && j < K; j++) rt->margin = fmin(rt->margin, v[ord[j]] - v[ord[j + 1]]);
            double den = 0;
            for (int j = 0; j < K; j++) den += s[t][ord[j]];
            if (!c->renormalize) den = 1;
            rt->off[t] = R;
            for (int j = 0; j < K; j++, R++)
                rt->tok[R] = t, rt->ex[R] = ord[j], rt->w[R] = c->route_scale * s[t][ord[j]] / den;
        }
    }
    rt->off[n] = R;
    rt->R = R;
    for (int i = 0; i < R; i++) rt->keep[i] = 1, rt->count[rt->ex[i]]++;

    /* GShard: the second slot survives when u < 2 g2, g2 = w2 / (w1 + w2) */
    if (c->router == MOE_ROUTER_TOPK && c->gshard_random && o && o->training && o->u)
        for (int t = 0; t < n; t++) {
            const double g2 = rt->w[2 * t + 1] / (rt->w[2 * t] + rt->w[2 * t + 1]);
            rt->keep[2 * t + 1] = o->u[t] < 2 * g2;
            rt->margin = fmin(rt->margin, fabs(o->u[t] - 2 * g2));
        }
    /* capacity: per expert, of the slots still kept, the first cap in slot
     * order (arrival) or the cap with the highest score (ties: earlier slot) */
    if (c->router != MOE_ROUTER_EXPERT_CHOICE && c->capacity_factor > 0 && o && o->training && n > 0) {
        int cap = (int)ceil((double)c->capacity_factor * n * K / E);
        cap = cap < 1 ? 1 : cap > R ? R : cap;
        for (int e = 0; e < E; e++) {
            int list[SR_MAXR], m = 0;
            double sc[SR_MAXR];
            for (int i = 0; i < R; i++)
                if (rt->ex[i] == e && rt->keep[i]) sc[m] = s[rt->tok[i]][e], list[m++] = i;
            if (m <= cap) continue;
            if (c->drop_policy == MOE_DROP_ARRIVAL) {
                for (int r = cap; r < m; r++) rt->keep[list[r]] = 0;
            } else {
                int *ord = malloc(sizeof(int) * (size_t)m);
                order_desc(sc, m, NULL, ord);
                for (int r = cap; r < m; r++) rt->keep[list[ord[r]]] = 0;
                free(ord);
            }
        }
    }

    /* ---- experts over the kept slots ---- */
    double obj = 0;
    for (int t = 0; t < n; t++) {
        const double *xt = x + (size_t)t * C;
        for (int i = 0; i < C; i++) yt[i] = 0;
        for (int i = rt->off[t]; i < rt->off[t + 1]; i++) {
            if (!rt->keep[i]) continue;
            const int e = rt->ex[i];
            const double *w1 = p + off->w1 + (size_t)e * F * C, *w2 = p + off->w2 + (size_t)e * C * F;
            const double *w3 = c->act == MOE_ACT_SWIGLU ? p + off->w3 + (size_t)e * F * C : NULL;
            for (int f = 0; f < F; f++) {
                double a1 = 0, a3 = 0;
                for (int k = 0; k < C; k++) {
                    a1 += w1[(size_t)f * C + k] * xt[k];
                    if (w3) a3 += w3[(size_t)f * C + k] * xt[k];
                }
                h[f] = c->act == MOE_ACT_RELU   ? (a1 > 0 ? a1 : 0)
                       : c->act == MOE_ACT_GELU ? 0.5 * a1 * (1 + tanh(sqrt(2 / M_PI) * (a1 + 0.044715 * a1 * a1 * a1)))
                                                : a1 / (1 + exp(-a1)) * a3;
            }
            for (int k = 0; k < C; k++) {
                double v = 0;
                for (int f = 0; f < F; f++) v += w2[(size_t)k * F + f] * h[f];
                yt[k] += rt->w[i] * v;
            }
        }
        for (int k = 0; k < C; k++) {
            if (y) y[(size_t)t * C + k] = yt[k];
            if (dy) obj += yt[k] * dy[(size_t)t * C + k];
        }
    }

    /* ---- losses ---- */
    const int S = c->aux_seq_len > 0 && c->aux_coef > 0 ? c->aux_seq_len : n;
    const int nblk = n > 0 ? (n + S - 1) / S : 0;
    double aux = 0;
    for (int b = 0; b < nblk; b++) {
        const int t0 = b * S, t1 = t0 + S < n ? t0 + S : n, r0 = rt->off[t0], r1 = rt->off[t1];
        double a = 0;
        for (int e = 0; e < E; e++) {
            int cnt = 0;
            double P = 0;
            for (int i = r0; i < r1; i++) cnt += rt->ex[i] == e;
            for (int t = t0; t < t1; t++) P += q[t][e] / (t1 - t0);
            a += (r1 > r0 ? (double)cnt / (r1 - r0) : 0.0) * P;
        }
        aux += (double)c->aux_coef * E * a / nblk;
    }
    double zs = 0;
    for (int t = 0; t < n; t++) zs += lse[t] * lse[t];
    rt->aux = aux;
    rt->z = n ? c->z_coef * zs / n : 0;
    double imp[SR_MAXE] = {0}, mean = 0, var = 0;
    for (int i = 0; i < R; i++) imp[rt->ex[i]] += rt->w[i];
    for (int e = 0; e < E; e++) mean += imp[e] / E;
    for (int e = 0; e < E; e++) var += (imp[e] - mean) * (imp[e] - mean) / E;
    rt->imp_loss = c->importance_coef * var / (mean * mean + 1e-10);
    rt->imp_cv = mean > 0 ? sqrt(var) / mean : 0;
    obj += rt->aux + rt->z + rt->imp_loss;
    free(h), free(yt);
    if (!rt_out) free(rt);
    return obj;
}

/* ---- finite differences ------------------------------------------------------------ */

typedef double (*obj_fn)(const void *ctx, const double *p, const double *x);

static const char *param_name(const moe_layer_params *o, size_t i) {
    if (o->ebias != SIZE_MAX && i >= o->ebias) return "ebias";
    if (i < o->w1) return "wg";
    if (i < o->w2) return "w1";
    return o->w3 == SIZE_MAX || i < o->w3 ? "w2" : "w3";
}

/* Worst error of the fp32 backward (g over every parameter, dx over every
 * input element) against central differences of f in double, relative to
 * max(1e-2, |fd|) as in test_layer.c. */
static double fd_worst(obj_fn f, const void *ctx, const moe_layer_params *off, double *p, double *x, size_t nx,
                       const float *g, const float *dx, char *where, size_t wsz) {
    const double h = 1e-6;
    double worst = 0;
    snprintf(where, wsz, "-");
    for (size_t i = 0; i < off->total + nx; i++) {
        const int is_p = i < off->total;
        double *v = is_p ? p + i : x + (i - off->total);
        const double keep = *v;
        *v = keep + h;
        const double up = f(ctx, p, x);
        *v = keep - h;
        const double dn = f(ctx, p, x);
        *v = keep;
        const double fd = (up - dn) / (2 * h), an = is_p ? g[i] : dx[i - off->total];
        const double err = fabs(an - fd) / fmax(1e-2, fabs(fd));
        if (err > worst) {
            worst = err;
            snprintf(where, wsz, "%s[%zu] (backward %.7g, fd %.7g)", is_p ? param_name(off, i) : "x",
                     is_p ? i : i - off->total, an, fd);
        }
    }
    return worst;
}

/* Largest |a_i| over the router block: a check on dwg is only as strong as
 * the router gradient is large. */
static double max_abs_f(const float *a, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs(a[i]));
    return m;
}

/* ---- a layer with random parameters and inputs ------------------------------------------ */

typedef struct {
    moe_layer *l;
    moe_layer_config c;
    moe_layer_params off;
    int n;
    float *x, *y, *dy, *dx;
    double *pd, *xd, *dyd, *u;
    sref_opts o;
} rig;

static void rig_free(rig *r) {
    moe_layer_free(r->l);
    free(r->x), free(r->y), free(r->dy), free(r->dx), free(r->pd), free(r->xd), free(r->dyd), free(r->u);
    memset(r, 0, sizeof *r);
}

typedef int (*rig_accept)(const rig *r, const sref_route *rt);

/* Random parameters (router weights scaled by gain, selection bias ~
 * N(0, bias_std^2) when the layer has one), x and dy; reseeded until every
 * routing decision of the reference has a margin >= min_margin (so the
 * finite-difference steps cannot flip one) and accept() agrees. u holds
 * GShard's draws of a training call with l->calls = 0. */
static int rig_make(rig *r, moe_layer_config c, int n, uint64_t seed, double gain, double bias_std,
                    double min_margin, rig_accept accept) {
    memset(r, 0, sizeof *r);
    r->l = make_layer(&c);
    if (!r->l) return -1;
    r->c = c;
    r->off = moe_layer_param_offsets(r->l);
    r->n = n;
    const size_t nc = (size_t)n * c.d_model;
    r->x = malloc(sizeof(float) * nc), r->y = malloc(sizeof(float) * nc);
    r->dy = malloc(sizeof(float) * nc), r->dx = malloc(sizeof(float) * nc);
    r->pd = malloc(sizeof(double) * r->off.total), r->xd = malloc(sizeof(double) * nc);
    r->dyd = malloc(sizeof(double) * nc), r->u = malloc(sizeof(double) * (size_t)n);
    r->o.training = 1;
    r->o.u = c.gshard_random ? r->u : NULL;
    sref_route *rt = malloc(sizeof *rt);
    for (int attempt = 0; attempt < 500; attempt++, seed += 7919) {
        moe_layer_init(r->l, seed, 1.0f);
        float *p = moe_layer_params_ptr(r->l);
        uint64_t s = seed * 2654435761u + 1;
        for (size_t i = r->off.wg; i < r->off.w1; i++) p[i] *= (float)gain;
        if (r->off.ebias != SIZE_MAX)
            for (int e = 0; e < c.n_experts; e++) p[r->off.ebias + e] = (float)(bias_std * rnd_normal(&s));
        for (size_t i = 0; i < nc; i++) r->x[i] = (float)rnd_normal(&s);
        for (size_t i = 0; i < nc; i++) r->dy[i] = (float)rnd_normal(&s);
        for (size_t i = 0; i < r->off.total; i++) r->pd[i] = p[i];
        for (size_t i = 0; i < nc; i++) r->xd[i] = r->x[i], r->dyd[i] = r->dy[i];
        r->l->calls = 0;
        for (int t = 0; t < n; t++) r->u[t] = moe__router_uniform(r->l, t, 0);
        sref_objective(&c, &r->off, r->pd, r->xd, n, NULL, &r->o, NULL, rt);
        if (rt->margin >= min_margin && (!accept || accept(r, rt))) {
            free(rt);
            return 0;
        }
    }
    free(rt);
    moe_test_fail(__FILE__, __LINE__, "no seed gave a routing margin of %g", min_margin);
    rig_free(r);
    return -1;
}

/* One training forward (the first call: GShard draws as in r->u) against the
 * reference: slots, kept flags, weights, y and the losses. */
static void rig_check_forward(rig *r, const char *tag) {
    r->l->calls = 0;
    int rc = moe_layer_forward(r->l, r->x, r->n, r->y);
    CHECK_MSG(rc == 0, "%s: forward: %s", tag, moe_layer_errmsg(r->l));
    if (rc) return;
    const size_t nc = (size_t)r->n * r->c.d_model;
    double *yr = malloc(sizeof(double) * nc);
    sref_route *rt = malloc(sizeof *rt);
    sref_objective(&r->c, &r->off, r->pd, r->xd, r->n, NULL, &r->o, yr, rt);
    const int *off, *ids;
    const float *w;
    const unsigned char *kept;
    const int R = moe_layer_routing(r->l, &off, &ids, &w, &kept);
    CHECK_MSG(R == rt->R, "%s: %d slots, reference %d", tag, R, rt->R);
    int bad_off = 0, bad_ids = 0, bad_keep = 0;
    double werr = 0, yerr = 0, ymax = 0;
    for (int t = 0; t <= r->n; t++) bad_off += off[t] != rt->off[t];
    for (int i = 0; i < R && i < rt->R; i++) {
        bad_ids += ids[i] != rt->ex[i];
        bad_keep += !kept[i] != !rt->keep[i];
        werr = fmax(werr, fabs(w[i] - rt->w[i]) / fmax(1, fabs(rt->w[i])));
    }
    for (size_t i = 0; i < nc; i++) yerr = fmax(yerr, fabs(r->y[i] - yr[i])), ymax = fmax(ymax, fabs(yr[i]));
    CHECK_MSG(bad_off == 0 && bad_ids == 0 && bad_keep == 0, "%s: slots differ: %d offsets, %d ids, %d kept flags",
              tag, bad_off, bad_ids, bad_keep);
    CHECK_MSG(werr <= 2e-6, "%s: gate weights err %g", tag, werr);
    CHECK_MSG(yerr <= 1e-5 * fmax(1, ymax), "%s: y err %g (max |y| %g)", tag, yerr, ymax);
    const moe_layer_stats *st = moe_layer_get_stats(r->l);
    CHECK_CLOSE(st->aux_loss, rt->aux, 1e-7, 1e-5);
    CHECK_CLOSE(st->z_loss, rt->z, 1e-7, 1e-5);
    CHECK_CLOSE(st->importance_loss, rt->imp_loss, 1e-7, 1e-4);
    CHECK_CLOSE(st->importance_cv, rt->imp_cv, 1e-6, 1e-5);
    for (int e = 0; e < r->c.n_experts; e++) CHECK_EQ_INT(st->expert_count[e], rt->count[e]);
    free(yr), free(rt);
}

typedef struct {
    const rig *r;
} sref_ctx;

static double sref_fd_obj(const void *ctx, const double *p, const double *x) {
    const rig *r = ((const sref_ctx *)ctx)->r;
    return sref_objective(&r->c, &r->off, p, x, r->n, r->dyd, &r->o, NULL, NULL);
}

/* Backward of one training forward (draws as in r->u) against central
 * differences of the reference, over every parameter and input element. */
static double rig_check_gradients(rig *r, const char *tag, double tol) {
    moe_layer_zero_grad(r->l);
    r->l->calls = 0;
    CHECK(moe_layer_forward(r->l, r->x, r->n, r->y) == 0);
    int rc = moe_layer_backward(r->l, r->dy, r->dx);
    CHECK_MSG(rc == 0, "%s: backward: %s", tag, moe_layer_errmsg(r->l));
    char where[160];
    sref_ctx ctx = {r};
    const double worst = fd_worst(sref_fd_obj, &ctx, &r->off, r->pd, r->xd, (size_t)r->n * r->c.d_model,
                                  moe_layer_grads_ptr(r->l), r->dx, where, sizeof where);
    printf("    %-44s fd worst rel err %.2e at %s\n", tag, worst, where);
    CHECK_MSG(worst <= tol, "%s: worst rel err %g at %s", tag, worst, where);
    return worst;
}

static moe_layer_config fd_cfg(moe_score score, int renorm, int E, int K) {
    moe_layer_config c = moe_layer_config_default(6, 7, E, K, 64);
    c.score = score;
    c.renormalize = renorm;
    c.route_scale = score == MOE_SCORE_SIGMOID ? 2.5f : 1.0f;
    c.aux_coef = 0.3f; /* large, so the losses' gradients are visible */
    c.z_coef = 0.2f;
    return c;
}

/* ---- the reference itself ------------------------------------------------------------------ */

/* sref and ref_layer.c agree where both apply (top-k by logit, capacity
 * policies, aux, z), so the schemes' checks below rest on a reference that
 * is itself checked against the existing one. */
TEST(schemes_reference_agrees_with_ref_layer) {
    const moe_act acts[] = {MOE_ACT_RELU, MOE_ACT_GELU, MOE_ACT_SWIGLU};
    double worst = 0;
    uint64_t seed = 41;
    for (int a = 0; a < 3; a++)
        for (int s = 0; s < 2; s++)
            for (int cap = 0; cap < 3; cap++) {
                moe_layer_config c = fd_cfg((moe_score)s, s, 5, 2);
                c.act = acts[a];
                c.capacity_factor = cap ? 0.75f : 0.0f;
                c.drop_policy = cap == 2 ? MOE_DROP_PROBABILITY : MOE_DROP_ARRIVAL;
                rig r;
                if (rig_make(&r, c, 13, seed++, 2.0, 0, 1e-4, NULL)) return;
                const size_t nc = (size_t)13 * c.d_model;
                double *y1 = malloc(sizeof(double) * nc), *y2 = malloc(sizeof(double) * nc), aux, z;
                int ids[13 * 2];
                double w[13 * 2];
                sref_route rt;
                const double o1 = sref_objective(&c, &r.off, r.pd, r.xd, 13, r.dyd, &r.o, y1, &rt);
                const double o2 = ref_layer_objective(&c, &r.off, r.pd, r.xd, 13, r.dyd, y2, ids, w, &aux, &z);
                for (size_t i = 0; i < nc; i++) worst = fmax(worst, fabs(y1[i] - y2[i]));
                for (int i = 0; i < 26; i++) {
                    CHECK_EQ_INT(rt.ex[i], ids[i]);
                    worst = fmax(worst, fabs(rt.w[i] - w[i]));
                }
                worst = fmax(worst, fabs(o1 - o2));
                worst = fmax(worst, fabs(rt.aux - aux) + fabs(rt.z - z));
                free(y1), free(y2);
                rig_free(&r);
            }
    printf("    sref vs ref_layer: max abs diff %.2e\n", worst);
    CHECK_MSG(worst <= 1e-12, "sref and ref_layer differ by %g", worst);
}

/* ---- 1. expert choice ------------------------------------------------------------------- */

static moe_layer_config ec_hand_cfg(void) {
    moe_layer_config c = moe_layer_config_default(3, 5, 3, 1, 6);
    c.router = MOE_ROUTER_EXPERT_CHOICE;
    c.route_scale = 2.0f;
    return c;
}

/* N = 6 tokens, E = 3, K = 1: cap = ceil(6 / 3) = 2 tokens per expert.
 * Logit rows and the softmax scores, a = e^2/(e^2+2), b = 1/(e^2+2),
 * c = e/(2e+1/e), d = (1/e)/(2e+1/e):
 *   t0 [.5,.5,.5] 1/3 1/3 1/3    t3 [2,0,0]  a b b
 *   t1 [2,0,0]  a b b            t4 [2,0,0]  a b b
 *   t2 [1,1,-1] c c d            t5 [-1,1,1] d c c
 * expert 0 ranks a(t1) = a(t3) = a(t4) > c: the tie goes to t1 and t3;
 * expert 1 takes t2 and t5 (c); expert 2 takes t5 (c) and t0 (1/3 > b).
 * Token 4 gets no expert: its output is 0 and dropped_fraction = 1/6. */
static const float ec_hand_x[6 * 3] = {.5f, .5f, .5f, 2, 0, 0, 1, 1, -1, 2, 0, 0, 2, 0, 0, -1, 1, 1};

TEST(ec_hand_case_slots_weights_and_dropped_tokens) {
    moe_layer_config c = ec_hand_cfg();
    moe_layer *l = make_layer(&c);
    if (!l) return;
    identity_router(l, 5);
    float y[6 * 3];
    CHECK(moe_layer_forward(l, ec_hand_x, 6, y) == 0);
    const int *off, *ids;
    const float *w;
    const unsigned char *kept;
    const int R = moe_layer_routing(l, &off, &ids, &w, &kept);
    const double e = M_E, a = e * e / (e * e + 2), cc = e / (2 * e + 1 / e);
    const int off_ref[7] = {0, 1, 2, 3, 4, 4, 6}, ids_ref[6] = {2, 0, 1, 0, 1, 2};
    const double w_ref[6] = {2.0 / 3, 2 * a, 2 * cc, 2 * a, 2 * cc, 2 * cc};
    CHECK_EQ_INT(R, 6);
    for (int t = 0; t <= 6; t++) CHECK_EQ_INT(off[t], off_ref[t]);
    for (int i = 0; i < 6 && i < R; i++) {
        CHECK_EQ_INT(ids[i], ids_ref[i]);
        CHECK_CLOSE(w[i], w_ref[i], 1e-6, 1e-6); /* route_scale * softmax score */
        CHECK(kept[i] == 1);
    }
    const moe_layer_stats *st = moe_layer_get_stats(l);
    CHECK_CLOSE(st->dropped_fraction, 1.0 / 6, 1e-7, 0);
    CHECK_EQ_INT(st->n_slots, 6);
    for (int k = 0; k < 3; k++) CHECK_EQ_INT(st->expert_count[k], 2);
    CHECK(row_is_zero(y, 4, 3));
    for (int t = 0; t < 6; t++)
        if (t != 4) CHECK_MSG(!row_is_zero(y, t, 3), "token %d has an expert but y is 0", t);
    moe_layer_free(l);
}

/* Identical tokens: every expert's top cap is a tie, which the lower token
 * ids win: tokens 0 and 1 get every expert, the others none. */
TEST(ec_ties_go_to_lower_token_id) {
    moe_layer_config c = ec_hand_cfg();
    moe_layer *l = make_layer(&c);
    if (!l) return;
    identity_router(l, 6);
    float x[6 * 3], y[6 * 3];
    for (int i = 0; i < 18; i++) x[i] = (float)(i % 3) * 0.25f; /* [0, .25, .5] for every token */
    CHECK(moe_layer_forward(l, x, 6, y) == 0);
    const int *off, *ids;
    const int R = moe_layer_routing(l, &off, &ids, NULL, NULL);
    CHECK_EQ_INT(R, 6);
    const int off_ref[7] = {0, 3, 6, 6, 6, 6, 6};
    for (int t = 0; t <= 6; t++) CHECK_EQ_INT(off[t], off_ref[t]);
    for (int i = 0; i < R; i++) CHECK_EQ_INT(ids[i], i % 3); /* a token's slots in expert order */
    CHECK_CLOSE(moe_layer_get_stats(l)->dropped_fraction, 4.0 / 6, 1e-7, 0);
    /* a later token that beats the tied ones for expert 0 (logits [2,0,0])
     * takes one of its places; the other still goes to the lowest id of the
     * tie, token 0, and experts 1 and 2 keep tokens 0 and 1 */
    x[15] = 2.0f, x[16] = 0.0f, x[17] = 0.0f;
    CHECK(moe_layer_forward(l, x, 6, y) == 0);
    CHECK_EQ_INT(moe_layer_routing(l, &off, &ids, NULL, NULL), 6);
    const int off_ref2[7] = {0, 3, 5, 5, 5, 5, 6};
    for (int t = 0; t <= 6; t++) CHECK_EQ_INT(off[t], off_ref2[t]);
    moe_layer_free(l);
}

/* Every expert takes exactly cap = ceil(cf N K / E) tokens (perfect balance:
 * load_cv 0, aux = aux_coef), and the slots, weights and y equal the
 * reference, for cf = 0 (factor 1), 1.25 and 0.5, softmax and sigmoid. */
TEST(ec_every_expert_takes_capacity_matches_reference) {
    const float cfs[3] = {0.0f, 1.25f, 0.5f};
    uint64_t seed = 300;
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < 3; i++) {
            moe_layer_config c = fd_cfg((moe_score)s, 0, 8, 2);
            c.router = MOE_ROUTER_EXPERT_CHOICE;
            c.capacity_factor = cfs[i];
            rig r;
            if (rig_make(&r, c, 37, seed++, 2.0, 0, 0, NULL)) return;
            const int cap = (int)ceil((cfs[i] > 0 ? cfs[i] : 1.0) * 37 * 2 / 8);
            char tag[64];
            snprintf(tag, sizeof tag, "ec score %d cf %g", s, cfs[i]);
            rig_check_forward(&r, tag);
            const moe_layer_stats *st = moe_layer_get_stats(r.l);
            CHECK_EQ_INT(st->n_slots, 8 * cap);
            for (int e = 0; e < 8; e++) CHECK_EQ_INT(st->expert_count[e], cap);
            CHECK_CLOSE(st->load_cv, 0, 1e-7, 0);
            CHECK_CLOSE(st->aux_loss, c.aux_coef, 1e-6, 1e-5);
            /* dropped_fraction: tokens no expert took */
            const int *off;
            moe_layer_routing(r.l, &off, NULL, NULL, NULL);
            int none = 0;
            for (int t = 0; t < 37; t++) none += off[t + 1] == off[t];
            CHECK_CLOSE(st->dropped_fraction, none / 37.0, 1e-7, 0);
            rig_free(&r);
        }
}

TEST(ec_gradients_finite_difference) {
    uint64_t seed = 400;
    for (int s = 0; s < 2; s++) {
        moe_layer_config c = fd_cfg((moe_score)s, 0, 4, 2);
        c.router = MOE_ROUTER_EXPERT_CHOICE;
        c.capacity_factor = s ? 0.75f : 0.0f;
        c.act = s ? MOE_ACT_GELU : MOE_ACT_SWIGLU;
        rig r;
        if (rig_make(&r, c, 10, seed++, 2.0, 0, 1e-4, NULL)) return;
        char tag[64];
        snprintf(tag, sizeof tag, "expert choice, score %d", s);
        rig_check_gradients(&r, tag, 1e-3);
        CHECK(max_abs_f(moe_layer_grads_ptr(r.l) + r.off.wg, r.off.w1 - r.off.wg) > 1e-3);
        rig_free(&r);
    }
}

/* Expert choice is not causal: in the hand case, raising token 4's score for
 * expert 0 above tokens 1 and 3 pushes token 3 (the later of the tied pair)
 * out of expert 0, so the output of the earlier token 3 changes (to 0). */
TEST(ec_is_not_causal) {
    moe_layer_config c = ec_hand_cfg();
    moe_layer *l = make_layer(&c);
    if (!l) return;
    identity_router(l, 5);
    float x[18], y0[18], y1[18];
    memcpy(x, ec_hand_x, sizeof x);
    CHECK(moe_layer_forward(l, x, 6, y0) == 0);
    x[4 * 3 + 0] = 3.0f; /* a later token changes */
    CHECK(moe_layer_forward(l, x, 6, y1) == 0);
    CHECK(!row_is_zero(y0, 3, 3));
    CHECK(row_is_zero(y1, 3, 3));
    CHECK(!row_is_zero(y1, 4, 3));
    for (int i = 0; i < 9; i++) CHECK_CLOSE(y1[i], y0[i], 1e-7, 1e-6); /* tokens 0-2 keep their experts */
    moe_layer_free(l);
}

/* ---- 2. forced balance ----------------------------------------------------------------------- */

/* N = 13, K = 2, E = 5: slot i = 2t + j goes to expert i mod 5 with weight
 * 1/2; 26 slots give counts 6, 5, 5, 5, 5. */
TEST(balanced_round_robin_slots_weights_counts) {
    moe_layer_config c = fd_cfg(MOE_SCORE_SOFTMAX, 1, 5, 2);
    c.router = MOE_ROUTER_BALANCED;
    rig r;
    if (rig_make(&r, c, 13, 77, 2.0, 0, 0, NULL)) return;
    rig_check_forward(&r, "balanced");
    const int *off, *ids;
    const float *w;
    const unsigned char *kept;
    const int R = moe_layer_routing(r.l, &off, &ids, &w, &kept);
    CHECK_EQ_INT(R, 26);
    for (int i = 0; i < R; i++) {
        CHECK_EQ_INT(ids[i], i % 5);
        CHECK(w[i] == 0.5f);
        CHECK(kept[i] == 1);
    }
    for (int t = 0; t <= 13; t++) CHECK_EQ_INT(off[t], 2 * t);
    const int *cnt = moe_layer_get_stats(r.l)->expert_count;
    const int cnt_ref[5] = {6, 5, 5, 5, 5};
    for (int e = 0; e < 5; e++) CHECK_EQ_INT(cnt[e], cnt_ref[e]);
    rig_free(&r);
}

/* The round robin ignores the router: with aux_coef = z_coef = 0 its
 * gradient is exactly 0 (also with an importance loss, the weights being
 * constant); with them, the gradient is theirs alone, checked by finite
 * differences. */
TEST(balanced_router_gradient_only_from_aux_and_z) {
    moe_layer_config c = fd_cfg(MOE_SCORE_SOFTMAX, 1, 5, 2);
    c.router = MOE_ROUTER_BALANCED;
    c.aux_coef = 0, c.z_coef = 0, c.importance_coef = 0.5f;
    rig r;
    if (rig_make(&r, c, 9, 78, 2.0, 0, 0, NULL)) return;
    moe_layer_zero_grad(r.l);
    CHECK(moe_layer_forward(r.l, r.x, 9, r.y) == 0);
    CHECK(moe_layer_backward(r.l, r.dy, r.dx) == 0);
    const float *g = moe_layer_grads_ptr(r.l);
    int nonzero = 0;
    for (size_t i = r.off.wg; i < r.off.w1; i++) nonzero += g[i] != 0.0f;
    CHECK_EQ_INT(nonzero, 0);
    CHECK(max_abs_f(g + r.off.w1, r.off.total - r.off.w1) > 1e-3); /* the experts do learn */
    rig_free(&r);

    /* 9 tokens x 2 slots over 5 experts: counts 4,4,4,3,3, so the aux loss
     * has a gradient */
    c = fd_cfg(MOE_SCORE_SIGMOID, 1, 5, 2);
    c.router = MOE_ROUTER_BALANCED;
    if (rig_make(&r, c, 9, 79, 2.0, 0, 0, NULL)) return;
    rig_check_gradients(&r, "balanced, aux + z", 1e-3);
    CHECK(max_abs_f(moe_layer_grads_ptr(r.l) + r.off.wg, r.off.w1 - r.off.wg) > 1e-3);
    rig_free(&r);
}

/* ---- 3. GShard's random second expert ---------------------------------------------------------- */

static moe_layer_config gshard_cfg(int n) {
    moe_layer_config c = moe_layer_config_default(6, 5, 8, 2, n);
    c.gshard_random = 1;
    c.act = MOE_ACT_RELU;
    return c;
}

/* Over 5 training calls of 2000 tokens, the second slot survives with
 * probability min(1, 2 g2): the kept count is within 3 sigma of
 * sum min(1, 2 g2); every decision equals u < 2 g2 for the call's draw u; a
 * dropped slot has no row, the first slot keeps weight g1 (not renormalised
 * to 1); the draws change from call to call. */
TEST(gshard_second_expert_kept_with_probability_min_1_2g2) {
    const int N = 2000;
    moe_layer_config c = gshard_cfg(N);
    moe_layer *l = make_layer(&c);
    if (!l) return;
    moe_layer_init(l, 9, 1.0f);
    float *x = malloc(sizeof(float) * N * 6), *y = malloc(sizeof(float) * N * 6);
    unsigned char *prev = malloc((size_t)N);
    double kept_n = 0, expect = 0, var = 0, partial = 0;
    int bad_rule = 0, bad_row = 0, bad_w1 = 0, same_as_prev = 1;
    uint64_t s = 12345;
    for (int call = 0; call < 5; call++) {
        for (int i = 0; i < N * 6; i++) x[i] = (float)(1.5 * rnd_normal(&s));
        const uint64_t calls = l->calls;
        CHECK(moe_layer_forward(l, x, N, y) == 0);
        CHECK(l->calls == calls + 1);
        const int *ids;
        const float *w;
        const unsigned char *kept;
        CHECK_EQ_INT(moe_layer_routing(l, NULL, &ids, &w, &kept), 2 * N);
        l->calls = calls; /* the draws of this call */
        for (int t = 0; t < N; t++) {
            const float g2f = w[2 * t + 1] / (w[2 * t] + w[2 * t + 1]);
            const double g2 = (double)w[2 * t + 1] / ((double)w[2 * t] + w[2 * t + 1]), pk = fmin(1, 2 * g2);
            const float u = moe__router_uniform(l, t, 0);
            bad_rule += kept[2 * t + 1] != (u < 2.0f * g2f);
            bad_row += !kept[2 * t] || (l->row_of_slot[2 * t + 1] < 0) != !kept[2 * t + 1];
            /* g1 = s1 / (s1 + s2) whatever happens to the second slot */
            const float *st = l->scores + (size_t)t * 8;
            bad_w1 += fabs(w[2 * t] - (double)st[ids[2 * t]] / (st[ids[2 * t]] + st[ids[2 * t + 1]])) > 1e-6;
            kept_n += kept[2 * t + 1];
            expect += pk;
            var += pk * (1 - pk);
            partial += pk < 1;
            if (call > 0 && kept[2 * t + 1] != prev[t]) same_as_prev = 0;
            prev[t] = kept[2 * t + 1];
        }
        l->calls = calls + 1;
        int rows = 0;
        for (int i = 0; i < 2 * N; i++) rows += kept[i];
        CHECK_EQ_INT(l->seg_off[8], rows); /* dropped slots get no row */
    }
    printf("    kept second slots %.0f, expected %.1f +- %.1f (%.0f tokens with p < 1)\n", kept_n, expect, sqrt(var),
           partial);
    CHECK_EQ_INT(bad_rule, 0);
    CHECK_EQ_INT(bad_row, 0);
    CHECK_EQ_INT(bad_w1, 0);
    CHECK(partial > 2000); /* the test has power: many tokens draw */
    CHECK_MSG(fabs(kept_n - expect) <= 3 * sqrt(var), "kept %g, expected %g +- %g", kept_n, expect, sqrt(var));
    CHECK(!same_as_prev);
    free(x), free(y), free(prev);
    moe_layer_free(l);
}

TEST(gshard_eval_never_drops) {
    const int N = 500;
    moe_layer_config c = gshard_cfg(N);
    c.capacity_factor = 0.5f; /* evaluation drops nothing, random or capacity */
    moe_layer *l = make_layer(&c);
    if (!l) return;
    moe_layer_init(l, 10, 1.0f);
    float *x = malloc(sizeof(float) * N * 6), *y = malloc(sizeof(float) * N * 6);
    uint64_t s = 99;
    for (int i = 0; i < N * 6; i++) x[i] = (float)(1.5 * rnd_normal(&s));
    CHECK(moe_layer_forward(l, x, N, y) == 0);
    CHECK(moe_layer_get_stats(l)->dropped_fraction > 0); /* training does drop */
    moe_layer_set_training(l, 0);
    const uint64_t calls = l->calls;
    CHECK(moe_layer_forward(l, x, N, y) == 0);
    CHECK(l->calls == calls); /* evaluation draws nothing */
    const unsigned char *kept;
    const int R = moe_layer_routing(l, NULL, NULL, NULL, &kept);
    int dropped = 0;
    for (int i = 0; i < R; i++) dropped += !kept[i];
    CHECK_EQ_INT(R, 2 * N);
    CHECK_EQ_INT(dropped, 0);
    CHECK_EQ_INT(l->seg_off[8], 2 * N);
    CHECK_CLOSE(moe_layer_get_stats(l)->dropped_fraction, 0, 0, 0);
    free(x), free(y);
    moe_layer_free(l);
}

static int gshard_mixed(const rig *r, const sref_route *rt) {
    int kept = 0;
    for (int t = 0; t < r->n; t++) kept += rt->keep[2 * t + 1];
    return kept >= 2 && kept <= r->n - 2; /* both outcomes present */
}

/* With the draws fixed (l->calls reset to 0 before the forward; the
 * reference takes the same draws), the backward equals finite differences,
 * alone and with a capacity limit. Resetting l->calls reproduces the call
 * bit for bit. */
TEST(gshard_gradients_finite_difference_draws_fixed) {
    uint64_t seed = 600;
    for (int v = 0; v < 3; v++) {
        moe_layer_config c = fd_cfg(v == 1 ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX, v != 1, 4, 2);
        c.gshard_random = 1;
        c.capacity_factor = v == 2 ? 0.75f : 0.0f;
        rig r;
        if (rig_make(&r, c, 12, seed++, 1.0, 0, 1e-4, gshard_mixed)) return;
        char tag[64];
        snprintf(tag, sizeof tag, "gshard score %d renorm %d cf %g", c.score, c.renormalize, c.capacity_factor);
        rig_check_forward(&r, tag);
        rig_check_gradients(&r, tag, 1e-3);
        float *y2 = malloc(sizeof(float) * 12 * 6);
        r.l->calls = 0;
        CHECK(moe_layer_forward(r.l, r.x, 12, y2) == 0);
        CHECK(memcmp(y2, r.y, sizeof(float) * 12 * 6) == 0);
        free(y2);
        rig_free(&r);
    }
}

/* E = 4, K = 2, N = 8, capacity_factor 0.75: cap = ceil(0.75 * 8 * 2 / 4) = 3.
 * Tokens 0-3, logits [8,-6,-20,-20]: g2 = e^-14 / (1 + e^-14), so the second
 * slot (expert 1) is dropped at random (checked on the draws). Tokens 4-7,
 * logits [3,3,-20,-20]: g2 = 1/2 exactly, 2 g2 = 1 > u, always kept.
 * Expert 0 keeps tokens 0-2 (arrival). Expert 1's randomly dropped slots cost
 * no capacity: it keeps tokens 4-6 and drops only token 7. The capacity
 * dropped 5 + 1 of the 16 slots. */
TEST(gshard_random_drop_costs_no_capacity) {
    moe_layer_config c = moe_layer_config_default(4, 3, 4, 2, 8);
    c.gshard_random = 1;
    c.capacity_factor = 0.75f;
    moe_layer *l = make_layer(&c);
    if (!l) return;
    identity_router(l, 3);
    float x[8 * 4], y[8 * 4];
    for (int t = 0; t < 8; t++) {
        const float r0[4] = {8, -6, -20, -20}, r1[4] = {3, 3, -20, -20};
        memcpy(x + 4 * t, t < 4 ? r0 : r1, sizeof r0);
    }
    l->calls = 0;
    for (int t = 0; t < 4; t++) /* premise: the draws drop the tiny second slots */
        CHECK_MSG(moe__router_uniform(l, t, 0) >= 2 * exp(-14.0), "token %d: draw below 2 g2", t);
    CHECK(moe_layer_forward(l, x, 8, y) == 0);
    const int *ids;
    const float *w;
    const unsigned char *kept;
    CHECK_EQ_INT(moe_layer_routing(l, NULL, &ids, &w, &kept), 16);
    const unsigned char kept_ref[16] = {1, 0, 1, 0, 1, 0, 0, 0, 0, 1, 0, 1, 0, 1, 0, 0};
    for (int i = 0; i < 16; i++) {
        CHECK_EQ_INT(ids[i], i % 2);
        CHECK_MSG(kept[i] == kept_ref[i], "slot %d (token %d): kept %d, expected %d", i, i / 2, kept[i], kept_ref[i]);
    }
    CHECK(w[9] == 0.5f); /* token 4's second weight is not renormalised after its first was dropped */
    const moe_layer_stats *st = moe_layer_get_stats(l);
    CHECK_EQ_INT(st->capacity, 3);
    CHECK_EQ_INT(st->expert_count[0], 8); /* counted before any drop */
    CHECK_EQ_INT(st->expert_count[1], 8);
    /* moe.h: "pairs dropped by the capacity limit / (N K)": 6 / 16, the
     * random drops are not capacity drops */
    CHECK_CLOSE(st->dropped_fraction, 6.0 / 16, 1e-7, 0);
    CHECK(row_is_zero(y, 3, 4));
    CHECK(row_is_zero(y, 7, 4));
    for (int t = 0; t < 8; t++)
        if (t != 3 && t != 7) CHECK(!row_is_zero(y, t, 4));
    moe_layer_free(l);
}

/* GShard's rule is defined for top-2 only. After moe_layer_set_top_k(1) a
 * training forward must not apply it to the wrong slots: it either refuses
 * (MOE_EINVAL) or keeps every slot. */
TEST(gshard_rejects_or_ignores_other_top_k) {
    enum { N = 200 };
    moe_layer_config c = gshard_cfg(N);
    c.renormalize = 0; /* top-1 weights vary, so a misapplied rule would drop */
    moe_layer *l = make_layer(&c);
    if (!l) return;
    moe_layer_init(l, 11, 1.0f);
    float *wg = moe_layer_params_ptr(l);
    for (int i = 0; i < 8 * 6; i++) wg[i] *= 4.0f; /* peaked scores: g2 far from 1/2 */
    float x[N * 6], y[N * 6];
    uint64_t s = 5;
    for (int i = 0; i < N * 6; i++) x[i] = (float)(1.5 * rnd_normal(&s));
    CHECK(moe_layer_forward(l, x, N, y) == 0);
    CHECK(moe_layer_set_top_k(l, 1) == 0);
    const int rc = moe_layer_forward(l, x, N, y);
    if (rc == 0) {
        const unsigned char *kept;
        const int R = moe_layer_routing(l, NULL, NULL, NULL, &kept);
        int dropped = 0;
        for (int i = 0; i < R; i++) dropped += !kept[i];
        CHECK_EQ_INT(R, N);
        CHECK_EQ_INT(dropped, 0);
    } else {
        CHECK_EQ_INT(rc, MOE_EINVAL);
        CHECK(strstr(moe_layer_errmsg(l), "gshard") != NULL);
    }
    moe_layer_set_training(l, 0); /* evaluation has no random routing: fine at any k */
    CHECK(moe_layer_forward(l, x, N, y) == 0);
    moe_layer_free(l);
}

/* ---- 4. aux-loss-free bias --------------------------------------------------------------------- */

static moe_layer_config bias_cfg(int E, int K, int n) {
    moe_layer_config c = moe_layer_config_default(E, 4, E, K, n);
    c.score = MOE_SCORE_SIGMOID;
    c.renormalize = 1;
    c.route_scale = 2.5f;
    c.bias_update_rate = 0.125f; /* a power of two: updated biases are exact */
    return c;
}

/* Token 0, logits [2, 1, 0.5, -1]: s = sigmoid = .881 .731 .622 .269 picks
 * experts 0, 1. Bias [0, -0.3, 0, 0.5] gives s + b = .881 .431 .622 .769:
 * experts 0, 3, with weights 2.5 s / (s0 + s3) of the unbiased s.
 * Token 1, logits 0: s = .5, s + b = .5 .2 .5 1: expert 3, then the tie
 * between experts 0 and 2 goes to 0; weights 2.5 * .5 / 1 = 1.25. */
TEST(bias_changes_choice_not_weight_formula) {
    moe_layer_config c = bias_cfg(4, 2, 2);
    moe_layer *l = make_layer(&c);
    if (!l) return;
    identity_router(l, 21);
    const moe_layer_params off = moe_layer_param_offsets(l);
    float *p = moe_layer_params_ptr(l);
    const float x[8] = {2, 1, 0.5f, -1, 0, 0, 0, 0};
    float y[8];
    CHECK(moe_layer_forward(l, x, 2, y) == 0); /* bias 0 (moe_layer_init) */
    const int *ids = moe_layer_topk_ids(l);
    const float *w = moe_layer_topk_weights(l);
    CHECK_EQ_INT(ids[0], 0);
    CHECK_EQ_INT(ids[1], 1);
    const float b[4] = {0, -0.3f, 0, 0.5f};
    memcpy(p + off.ebias, b, sizeof b);
    CHECK(moe_layer_forward(l, x, 2, y) == 0);
    const double s0 = sigm(2), s3 = sigm(-1);
    const int ids_ref[4] = {0, 3, 3, 0};
    const double w_ref[4] = {2.5 * s0 / (s0 + s3), 2.5 * s3 / (s0 + s3), 1.25, 1.25};
    for (int i = 0; i < 4; i++) {
        CHECK_EQ_INT(ids[i], ids_ref[i]);
        CHECK_CLOSE(w[i], w_ref[i], 1e-6, 1e-6);
    }
    /* y against the reference with the same bias */
    double pd[2048], xd[8], yr[8];
    CHECK(off.total <= 2048);
    for (size_t i = 0; i < off.total && i < 2048; i++) pd[i] = p[i];
    for (int i = 0; i < 8; i++) xd[i] = x[i];
    sref_opts o = {NULL, 1};
    sref_objective(&c, &off, pd, xd, 2, NULL, &o, yr, NULL);
    for (int i = 0; i < 8; i++) CHECK_CLOSE(y[i], yr[i], 1e-6, 1e-5);
    moe_layer_free(l);
}

/* Loads [5, 2, 1, 0] (mean 2) move the bias by -g, 0 (load == mean), +g, +g.
 * The loads reset after an update, evaluation calls add nothing, an empty
 * call adds nothing, and the loads of two calls add up: [5,2,1,0] +
 * [0,0,0,8] = [5,2,1,8], mean 4: -g, +g, +g, -g. */
TEST(bias_update_moves_toward_balance) {
    moe_layer_config c = bias_cfg(4, 1, 8);
    moe_layer *l = make_layer(&c);
    if (!l) return;
    identity_router(l, 22);
    const moe_layer_params off = moe_layer_param_offsets(l);
    const float *b = moe_layer_params_ptr(l) + off.ebias;
    const float g = 0.125f;
    float xa[32] = {0}, xb[32] = {0}, y[32];
    const int route_a[8] = {0, 0, 0, 0, 0, 1, 1, 2};
    for (int t = 0; t < 8; t++) xa[4 * t + route_a[t]] = 5.0f, xb[4 * t + 3] = 5.0f;
    CHECK(moe_layer_forward(l, xa, 8, y) == 0);
    for (int t = 0; t < 8; t++) CHECK_EQ_INT(moe_layer_topk_ids(l)[t], route_a[t]);
    CHECK(moe_layer_update_bias(l) == 0);
    const float b1[4] = {-g, 0, g, g};
    for (int e = 0; e < 4; e++) CHECK_MSG(b[e] == b1[e], "expert %d: bias %g, expected %g", e, b[e], b1[e]);
    CHECK(moe_layer_update_bias(l) == 0); /* loads were reset */
    for (int e = 0; e < 4; e++) CHECK(b[e] == b1[e]);
    moe_layer_set_training(l, 0);
    CHECK(moe_layer_forward(l, xa, 8, y) == 0);
    CHECK(moe_layer_update_bias(l) == 0); /* evaluation does not count */
    for (int e = 0; e < 4; e++) CHECK(b[e] == b1[e]);
    moe_layer_set_training(l, 1);
    CHECK(moe_layer_forward(l, xa, 0, y) == 0);
    CHECK(moe_layer_update_bias(l) == 0); /* no load at all: no change */
    for (int e = 0; e < 4; e++) CHECK(b[e] == b1[e]);
    CHECK(moe_layer_forward(l, xa, 8, y) == 0);
    CHECK(moe_layer_forward(l, xb, 8, y) == 0);
    CHECK(moe_layer_update_bias(l) == 0);
    const float b2[4] = {-2 * g, g, 2 * g, 0};
    for (int e = 0; e < 4; e++) CHECK_MSG(b[e] == b2[e], "expert %d: bias %g, expected %g", e, b[e], b2[e]);
    moe_layer_free(l);

    /* without a rate: no ebias block, and the update is a no-op */
    c.bias_update_rate = 0;
    l = make_layer(&c);
    if (!l) return;
    CHECK(moe_layer_param_offsets(l).ebias == SIZE_MAX);
    CHECK(moe_layer_update_bias(l) == 0);
    moe_layer_free(l);
}

/* ebias exists only when bias_update_rate > 0, as the last E floats (the
 * base layout does not move); moe_layer_init zeroes it; the backward leaves
 * its gradient at exactly 0 while the router's is not. */
TEST(bias_zero_gradient_and_param_block) {
    moe_layer_config c = fd_cfg(MOE_SCORE_SIGMOID, 1, 6, 2);
    moe_layer *l0 = make_layer(&c);
    c.bias_update_rate = 1e-3f;
    rig r;
    if (!l0 || rig_make(&r, c, 20, 31, 2.0, 0.1, 0, NULL)) {
        moe_layer_free(l0);
        return;
    }
    const moe_layer_params o0 = moe_layer_param_offsets(l0), o1 = r.off;
    CHECK(o0.ebias == SIZE_MAX);
    CHECK(o1.ebias == o0.total && o1.total == o0.total + 6);
    CHECK(o1.wg == o0.wg && o1.w1 == o0.w1 && o1.w2 == o0.w2 && o1.w3 == o0.w3);
    moe_layer_zero_grad(r.l);
    CHECK(moe_layer_forward(r.l, r.x, 20, r.y) == 0);
    CHECK(moe_layer_backward(r.l, r.dy, r.dx) == 0);
    const float *g = moe_layer_grads_ptr(r.l);
    for (int e = 0; e < 6; e++) CHECK(g[o1.ebias + e] == 0.0f);
    CHECK(max_abs_f(g + o1.wg, o1.w1 - o1.wg) > 1e-3);
    moe_layer_init(r.l, 1, 1.0f);
    for (int e = 0; e < 6; e++) CHECK(moe_layer_params_ptr(r.l)[o1.ebias + e] == 0.0f);
    moe_layer_free(l0);
    rig_free(&r);
}

static int bias_matters(const rig *r, const sref_route *rt) {
    /* at least two tokens route differently without the bias and groups */
    moe_layer_config plain = r->c;
    plain.bias_update_rate = 0, plain.n_groups = 0, plain.topk_groups = 0;
    moe_layer_params off = r->off;
    off.ebias = SIZE_MAX;
    sref_route *p = malloc(sizeof *p);
    sref_objective(&plain, &off, r->pd, r->xd, r->n, NULL, &r->o, NULL, p);
    int differ = 0;
    for (int t = 0; t < r->n; t++) {
        int same = 1;
        for (int j = rt->off[t]; j < rt->off[t + 1]; j++) {
            int found = 0;
            for (int k = p->off[t]; k < p->off[t + 1]; k++) found |= p->ex[k] == rt->ex[j];
            same &= found;
        }
        differ += !same;
    }
    free(p);
    return differ >= 2;
}

/* Sigmoid + bias + groups (DeepSeek-V3 style), with the sequence-wise aux
 * loss and an importance loss: the backward equals finite differences of the
 * reference, the bias included (its derivative is 0). */
TEST(bias_and_groups_gradients_finite_difference) {
    uint64_t seed = 700;
    for (int v = 0; v < 2; v++) {
        moe_layer_config c = fd_cfg(MOE_SCORE_SIGMOID, 1, 8, 2);
        c.bias_update_rate = 1e-3f;
        c.n_groups = v ? 4 : 0;
        c.topk_groups = v ? 2 : 0;
        c.aux_seq_len = v ? 4 : 0;
        c.importance_coef = v ? 0.2f : 0.0f;
        rig r;
        if (rig_make(&r, c, 10, seed++, 2.0, 0.15, 1e-4, bias_matters)) return;
        char tag[64];
        snprintf(tag, sizeof tag, "sigmoid + bias%s", v ? " + groups + seq aux + imp" : "");
        rig_check_forward(&r, tag);
        rig_check_gradients(&r, tag, 1e-3);
        rig_free(&r);
    }
}

/* ---- 5. group-limited routing ------------------------------------------------------------------- */

/* E = 8 in G = 2 groups of 4 (experts 0-3, 4-7), topk_groups 1, K = 2,
 * sigmoid scores; a group's score is the sum of its two best.
 *   A [4,-6,-6,-6 | 1,.9,-6,-6]: group 0 = .982 + .0025 < group 1 = .731 + .711:
 *     experts 4, 5 although expert 0 is the best single one (by max score
 *     group 0 would win; without groups the choice is 0, 4).
 *   B [2,2,2,2 | 3,3,-6,-6]: top-2 sums 1.762 < 1.905: group 1 (the sum over
 *     the whole group, 3.52 > 1.91, would pick group 0).
 *   C [1,1,-6,-6 | 1,1,-6,-6]: equal group scores: the lower group id wins;
 *     inside it, equal scores: the lower expert id first.
 * Weights are 2.5 s / sum of the chosen s. */
TEST(groups_best_expert_in_losing_group_not_chosen) {
    moe_layer_config c = moe_layer_config_default(8, 4, 8, 2, 4);
    c.score = MOE_SCORE_SIGMOID;
    c.route_scale = 2.5f;
    c.n_groups = 2, c.topk_groups = 1;
    const float x[3 * 8] = {4, -6, -6, -6, 1, 0.9f, -6, -6, 2, 2, 2, 2, 3, 3, -6, -6, 1, 1, -6, -6, 1, 1, -6, -6};
    const int ids_ref[6] = {4, 5, 4, 5, 0, 1};
    const double lg_ref[6] = {1, 0.9, 3, 3, 1, 1};
    float y[3 * 8];
    for (int pass = 0; pass < 2; pass++) { /* without and with an (all-zero) bias block */
        c.bias_update_rate = pass ? 1e-3f : 0.0f;
        moe_layer *l = make_layer(&c);
        if (!l) return;
        identity_router(l, 40);
        CHECK(moe_layer_forward(l, x, 3, y) == 0);
        const int *ids = moe_layer_topk_ids(l);
        const float *w = moe_layer_topk_weights(l);
        for (int i = 0; i < 6; i++) {
            CHECK_MSG(ids[i] == ids_ref[i], "pass %d token %d slot %d: expert %d, expected %d", pass, i / 2, i % 2,
                      ids[i], ids_ref[i]);
            const double den = sigm(lg_ref[i & ~1]) + sigm(lg_ref[i | 1]);
            CHECK_CLOSE(w[i], 2.5 * sigm(lg_ref[i]) / den, 1e-6, 1e-6);
        }
        moe_layer_free(l);
    }
    /* the group score uses the selection scores s + b: a bias of +.5 on
     * experts 0 and 1 lifts group 0 of token A to 1.48 + .50 > 1.44 */
    c.bias_update_rate = 1e-3f;
    moe_layer *l = make_layer(&c);
    if (!l) return;
    identity_router(l, 40);
    float *b = moe_layer_params_ptr(l) + moe_layer_param_offsets(l).ebias;
    b[0] = b[1] = 0.5f;
    CHECK(moe_layer_forward(l, x, 1, y) == 0);
    CHECK_EQ_INT(moe_layer_topk_ids(l)[0], 0);
    CHECK_EQ_INT(moe_layer_topk_ids(l)[1], 1);
    CHECK_CLOSE(moe_layer_topk_weights(l)[1], 2.5 * sigm(-6) / (sigm(4) + sigm(-6)), 1e-7, 1e-5);
    moe_layer_free(l);

    /* G = 4 groups of 2, topk_groups 2, K = 3, logits
     * [5,-6 | 1,1 | .8,.8 | .9,-6]: group scores .996, 1.462, 1.379, .713
     * keep groups 1 and 2; the top 3 inside them are 2, 3 (tied: lower id
     * first), then 4 (tied with 5); expert 0, the best, is left out. */
    c = moe_layer_config_default(8, 4, 8, 3, 1);
    c.score = MOE_SCORE_SIGMOID;
    c.n_groups = 4, c.topk_groups = 2;
    l = make_layer(&c);
    if (!l) return;
    identity_router(l, 41);
    const float x2[8] = {5, -6, 1, 1, 0.8f, 0.8f, 0.9f, -6};
    CHECK(moe_layer_forward(l, x2, 1, y) == 0);
    const int ids2[3] = {2, 3, 4};
    for (int j = 0; j < 3; j++) CHECK_EQ_INT(moe_layer_topk_ids(l)[j], ids2[j]);
    moe_layer_free(l);
}

/* The groups kept hold topk_groups * E / n_groups experts; moe_layer_set_top_k
 * may later ask for more (max_top_k). The layer must refuse (at set_top_k or
 * at the forward) rather than route to uninitialised slots. */
TEST(groups_top_k_beyond_kept_groups_rejected) {
    moe_layer_config c = moe_layer_config_default(8, 4, 8, 2, 8);
    c.score = MOE_SCORE_SIGMOID;
    c.n_groups = 4, c.topk_groups = 1; /* 2 experts in the kept group */
    c.max_top_k = 4;
    moe_layer *l = make_layer(&c);
    if (!l) return;
    moe_layer_init(l, 3, 1.0f);
    float x[8 * 8], y[8 * 8];
    uint64_t s = 8;
    for (int i = 0; i < 64; i++) x[i] = (float)rnd_normal(&s);
    CHECK(moe_layer_forward(l, x, 8, y) == 0);
    int rc = moe_layer_set_top_k(l, 4);
    if (rc == 0) rc = moe_layer_forward(l, x, 8, y);
    CHECK_EQ_INT(rc, MOE_EINVAL);
    CHECK(moe_layer_set_top_k(l, 2) == 0); /* back within the groups: fine again */
    CHECK(moe_layer_forward(l, x, 8, y) == 0);
    moe_layer_free(l);
}

/* ---- 6. sequence-wise aux loss ---------------------------------------------------------------- */

/* E = 2, K = 1, softmax, aux_coef 0.5, N = 5 in blocks of 2: [t0 t1] [t2 t3]
 * [t4]. Logits [1,0] [0,2] | [3,0] [1,0] | [0,1] route to 0,1 | 0,0 | 1.
 * With q0(l) = 1 / (1 + e^(l1 - l0)) per block E sum_i f_i P_i is
 *   block 0: f = (1/2, 1/2): P0 + P1 = 1
 *   block 1: f = (1, 0): 2 (q0(3) + q0(1)) / 2
 *   block 2: f = (0, 1): 2 q1(t4)
 * aux = 0.5 * mean of the three; the whole-call value differs. */
TEST(seq_aux_hand_value) {
    moe_layer_config c = moe_layer_config_default(2, 3, 2, 1, 5);
    c.aux_coef = 0.5f;
    c.aux_seq_len = 2;
    moe_layer *l = make_layer(&c);
    if (!l) return;
    identity_router(l, 50);
    const float x[10] = {1, 0, 0, 2, 3, 0, 1, 0, 0, 1};
    float y[10];
    CHECK(moe_layer_forward(l, x, 5, y) == 0);
    const double q01 = sigm(1), q02 = sigm(-2), q03 = sigm(3), q14 = sigm(1);
    const double a0 = 1.0, a1 = 2 * (q03 + q01) / 2, a2 = 2 * q14;
    const double want = 0.5 * (a0 + a1 + a2) / 3;
    CHECK_CLOSE(moe_layer_get_stats(l)->aux_loss, want, 1e-7, 1e-6);
    /* the whole call: f = (3/5, 2/5), P = mean q */
    const double P0 = (q01 + q02 + q03 + q01 + (1 - q14)) / 5;
    const double whole = 0.5 * 2 * (0.6 * P0 + 0.4 * (1 - P0));
    CHECK(fabs(want - whole) > 1e-2);
    CHECK(moe_layer_set_aux_seq_len(l, 5) == 0);
    CHECK(moe_layer_forward(l, x, 5, y) == 0);
    CHECK_CLOSE(moe_layer_get_stats(l)->aux_loss, whole, 1e-7, 1e-6);
    moe_layer_free(l);
}

/* aux_seq_len >= N: one block, the whole-call loss and gradients. */
TEST(seq_aux_equals_whole_call_when_block_covers_call) {
    for (int s = 0; s < 2; s++) {
        moe_layer_config c = fd_cfg((moe_score)s, 1, 6, 2);
        rig a;
        if (rig_make(&a, c, 30, 80 + s, 2.0, 0, 0, NULL)) return;
        const size_t T = a.off.total, nc = (size_t)30 * c.d_model;
        float *g0 = malloc(sizeof(float) * T), *dx0 = malloc(sizeof(float) * nc);
        moe_layer_zero_grad(a.l);
        CHECK(moe_layer_forward(a.l, a.x, 30, a.y) == 0);
        CHECK(moe_layer_backward(a.l, a.dy, dx0) == 0);
        const float aux0 = moe_layer_get_stats(a.l)->aux_loss;
        memcpy(g0, moe_layer_grads_ptr(a.l), sizeof(float) * T);
        const int lens[2] = {30, 64};
        for (int k = 0; k < 2; k++) {
            moe_layer_config cs = c;
            cs.aux_seq_len = lens[k];
            moe_layer *l = make_layer(&cs);
            if (!l) break;
            memcpy(moe_layer_params_ptr(l), moe_layer_params_ptr(a.l), sizeof(float) * T);
            moe_layer_zero_grad(l);
            CHECK(moe_layer_forward(l, a.x, 30, a.y) == 0);
            CHECK(moe_layer_backward(l, a.dy, a.dx) == 0);
            CHECK_CLOSE(moe_layer_get_stats(l)->aux_loss, aux0, 1e-8, 1e-6);
            double d = 0;
            for (size_t i = 0; i < T; i++) d = fmax(d, fabs(moe_layer_grads_ptr(l)[i] - g0[i]));
            for (size_t i = 0; i < nc; i++) d = fmax(d, fabs(a.dx[i] - dx0[i]));
            CHECK_MSG(d <= 1e-6, "aux_seq_len %d: gradients differ by %g", lens[k], d);
            moe_layer_free(l);
        }
        free(g0), free(dx0);
        rig_free(&a);
    }
}

/* The sequence-wise objective written with ref_layer.c: per block, the
 * ref_layer objective with the aux coefficient divided by the number of
 * blocks and no z-loss (its dy term covers the block's tokens), plus the
 * z-loss of the whole call (ref_layer with aux 0 and no dy). */
typedef struct {
    const moe_layer_config *c;
    const moe_layer_params *off;
    int n;
    const double *dy;
} seq_ctx;

static double seq_obj(const void *vctx, const double *p, const double *x) {
    const seq_ctx *s = vctx;
    const int S = s->c->aux_seq_len, C = s->c->d_model, nblk = (s->n + S - 1) / S;
    moe_layer_config cb = *s->c, cz = *s->c;
    cb.aux_coef = s->c->aux_coef / nblk, cb.z_coef = 0, cb.aux_seq_len = 0;
    cz.aux_coef = 0, cz.aux_seq_len = 0;
    double obj = ref_layer_objective(&cz, s->off, p, x, s->n, NULL, NULL, NULL, NULL, NULL, NULL);
    for (int b = 0; b < nblk; b++) {
        const int t0 = b * S, T = t0 + S < s->n ? S : s->n - t0;
        obj += ref_layer_objective(&cb, s->off, p, x + (size_t)t0 * C, T, s->dy + (size_t)t0 * C, NULL, NULL, NULL,
                                   NULL, NULL);
    }
    return obj;
}

TEST(seq_aux_gradients_finite_difference) {
    uint64_t seed = 90;
    for (int s = 0; s < 2; s++) {
        moe_layer_config c = fd_cfg((moe_score)s, 1, 4, 2);
        c.aux_coef = 1.0f; /* the block losses dominate the router gradient */
        c.aux_seq_len = 3; /* 11 tokens: blocks of 3, 3, 3 and 2; 4 blocks keep aux_coef / 4 exact */
        rig r;
        if (rig_make(&r, c, 11, seed++, 2.0, 0, 1e-3, NULL)) return;
        moe_layer_zero_grad(r.l);
        CHECK(moe_layer_forward(r.l, r.x, 11, r.y) == 0);
        CHECK(moe_layer_backward(r.l, r.dy, r.dx) == 0);
        seq_ctx ctx = {&r.c, &r.off, 11, r.dyd};
        /* the value: the objective's aux part, from ref_layer and from sref */
        moe_layer_config cb = c;
        cb.aux_seq_len = 0, cb.z_coef = 0;
        cb.aux_coef = c.aux_coef / 4;
        double aux_ref = 0, a;
        for (int b = 0; b < 4; b++) {
            ref_layer_objective(&cb, &r.off, r.pd, r.xd + b * 3 * 6, b < 3 ? 3 : 2, NULL, NULL, NULL, NULL, &a, NULL);
            aux_ref += a;
        }
        sref_route rt;
        sref_objective(&c, &r.off, r.pd, r.xd, 11, NULL, &r.o, NULL, &rt);
        CHECK_CLOSE(moe_layer_get_stats(r.l)->aux_loss, aux_ref, 1e-7, 1e-5);
        CHECK_CLOSE(rt.aux, aux_ref, 1e-13, 1e-12);
        char where[160];
        const double worst = fd_worst(seq_obj, &ctx, &r.off, r.pd, r.xd, (size_t)11 * c.d_model,
                                      moe_layer_grads_ptr(r.l), r.dx, where, sizeof where);
        printf("    seq aux score %d: fd (ref_layer per block) worst rel err %.2e at %s\n", s, worst, where);
        CHECK_MSG(worst <= 1e-3, "score %d: worst rel err %g at %s", s, worst, where);
        rig_free(&r);
    }
}

/* moe_layer_set_aux_seq_len: only on a layer created with aux_seq_len > 0,
 * and only for blocks that fit the buffers sized at creation. */
TEST(seq_aux_set_len_errors) {
    moe_layer_config c = moe_layer_config_default(4, 4, 4, 2, 64);
    moe_layer *l = make_layer(&c);
    if (!l) return;
    CHECK_EQ_INT(moe_layer_set_aux_seq_len(l, 16), MOE_EINVAL);
    CHECK(strstr(moe_layer_errmsg(l), "set_aux_seq_len") != NULL);
    CHECK_EQ_INT(moe_layer_set_aux_seq_len(l, 0), 0); /* already whole-call */
    moe_layer_free(l);
    c.aux_seq_len = 8; /* 8 blocks at most */
    l = make_layer(&c);
    if (!l) return;
    CHECK_EQ_INT(moe_layer_set_aux_seq_len(l, 4), MOE_EINVAL); /* 16 blocks */
    CHECK_EQ_INT(moe_layer_set_aux_seq_len(l, 0), MOE_EINVAL);
    CHECK_EQ_INT(moe_layer_set_aux_seq_len(l, -3), MOE_EINVAL);
    CHECK_EQ_INT(moe_layer_get_config(l)->aux_seq_len, 8); /* unchanged by the failures */
    CHECK_EQ_INT(moe_layer_set_aux_seq_len(l, 16), 0);
    CHECK_EQ_INT(moe_layer_get_config(l)->aux_seq_len, 16);
    CHECK_EQ_INT(moe_layer_set_aux_seq_len(l, 64), 0);
    moe_layer_free(l);
    c.aux_seq_len = -1;
    int err = 0;
    CHECK(moe_layer_create(&c, &err, NULL, 0) == NULL);
    CHECK_EQ_INT(err, MOE_EINVAL);
    CHECK_EQ_INT(moe_layer_set_aux_seq_len(NULL, 4), MOE_EINVAL);
}

/* ---- 7. importance loss ----------------------------------------------------------------------- */

/* Population CV: all 6 tokens on expert 0 with weight 1 (K = 1,
 * renormalised) give imp = (6,0,0,0), CV^2 = E - 1 = 3. Two tokens on two
 * experts with weights a, b (raw sigmoid scores) give CV^2 = (a-b)^2/(a+b)^2
 * (the sample variance would double it). */
TEST(importance_hand_values_population_cv) {
    moe_layer_config c = moe_layer_config_default(4, 3, 4, 1, 6);
    c.importance_coef = 0.25f;
    moe_layer *l = make_layer(&c);
    if (!l) return;
    identity_router(l, 60);
    float x[24] = {0}, y[24];
    for (int t = 0; t < 6; t++) x[4 * t] = 5.0f;
    CHECK(moe_layer_forward(l, x, 6, y) == 0);
    const moe_layer_stats *st = moe_layer_get_stats(l);
    CHECK_CLOSE(st->importance_loss, 0.25 * 3, 1e-7, 1e-6);
    CHECK_CLOSE(st->importance_cv, sqrt(3.0), 1e-7, 1e-6);
    moe_layer_free(l);

    c = moe_layer_config_default(2, 3, 2, 1, 2);
    c.score = MOE_SCORE_SIGMOID, c.renormalize = 0;
    c.importance_coef = 0.25f;
    l = make_layer(&c);
    if (!l) return;
    identity_router(l, 61);
    const float x2[4] = {2, 0, 0, 0.5f};
    CHECK(moe_layer_forward(l, x2, 2, y) == 0);
    const double a = sigm(2), b = sigm(0.5), cv2 = (a - b) * (a - b) / ((a + b) * (a + b));
    st = moe_layer_get_stats(l);
    CHECK_CLOSE(st->importance_loss, 0.25 * cv2, 1e-8, 1e-5);
    CHECK_CLOSE(st->importance_cv, sqrt(cv2), 1e-7, 1e-5);
    moe_layer_free(l);
}

/* The importance loss written with ref_layer.c: its objective plus
 * w CV(imp)^2 over the gates it reports. */
typedef struct {
    const moe_layer_config *c;
    const moe_layer_params *off;
    int n;
    const double *dy;
    double *stats; /* [2]: loss, cv of the last call */
} imp_ctx;

static double imp_obj(const void *vctx, const double *p, const double *x) {
    const imp_ctx *s = vctx;
    const int E = s->c->n_experts, R = s->n * s->c->top_k;
    int *ids = malloc(sizeof(int) * (size_t)R);
    double *w = malloc(sizeof(double) * (size_t)R), imp[SR_MAXE] = {0}, m = 0, var = 0;
    double obj = ref_layer_objective(s->c, s->off, p, x, s->n, s->dy, NULL, ids, w, NULL, NULL);
    for (int i = 0; i < R; i++) imp[ids[i]] += w[i];
    for (int e = 0; e < E; e++) m += imp[e] / E;
    for (int e = 0; e < E; e++) var += (imp[e] - m) * (imp[e] - m) / E;
    s->stats[0] = s->c->importance_coef * var / (m * m + 1e-10);
    s->stats[1] = sqrt(var) / m;
    free(ids), free(w);
    return obj + s->stats[0];
}

TEST(importance_matches_reference_and_gradients) {
    uint64_t seed = 110;
    for (int v = 0; v < 3; v++) {
        moe_layer_config c = fd_cfg(v == 1 ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX, v == 0, 5, v == 2 ? 1 : 2);
        c.importance_coef = 0.5f;
        rig r;
        if (rig_make(&r, c, 12, seed++, 2.0, 0, 1e-3, NULL)) return;
        char tag[64];
        snprintf(tag, sizeof tag, "importance score %d renorm %d K %d", c.score, c.renormalize, c.top_k);
        rig_check_forward(&r, tag); /* value and cv against sref */
        moe_layer_zero_grad(r.l);
        CHECK(moe_layer_forward(r.l, r.x, 12, r.y) == 0);
        CHECK(moe_layer_backward(r.l, r.dy, r.dx) == 0);
        double st[2];
        imp_ctx ctx = {&r.c, &r.off, 12, r.dyd, st};
        imp_obj(&ctx, r.pd, r.xd);
        CHECK_CLOSE(moe_layer_get_stats(r.l)->importance_loss, st[0], 1e-7, 1e-5);
        CHECK_CLOSE(moe_layer_get_stats(r.l)->importance_cv, st[1], 1e-7, 1e-5);
        CHECK(st[0] > 1e-3); /* a loss worth differentiating */
        char where[160];
        const double worst = fd_worst(imp_obj, &ctx, &r.off, r.pd, r.xd, (size_t)12 * c.d_model,
                                      moe_layer_grads_ptr(r.l), r.dx, where, sizeof where);
        printf("    %-44s fd (ref_layer) worst rel err %.2e at %s\n", tag, worst, where);
        CHECK_MSG(worst <= 1e-3, "%s: worst rel err %g at %s", tag, worst, where);
        rig_free(&r);
    }
}

/* ---- 8. capacity with the slot layout ------------------------------------------------------------ */

/* Switch top-1, E = 3, N = 7, capacity_factor 1: cap = ceil(7/3) = 3.
 * Logits t0 [1,0,0], t1 [3,0,0], t2 [0,2,0], t3 [1,0,0], t4 [3,0,0],
 * t5 [.5,0,0], t6 [0,1,0]: expert 0 gets t0 t1 t3 t4 t5 with p = .576 .909
 * .576 .909 .452, expert 1 gets t2 t6. Arrival keeps t0 t1 t3 (drops t4
 * t5); probability keeps t1 t4, then of the tied t0 and t3 the earlier t0
 * (drops t3 t5). */
TEST(capacity_switch_top1_exact_dropped_slots) {
    const float x[7 * 3] = {1, 0, 0, 3, 0, 0, 0, 2, 0, 1, 0, 0, 3, 0, 0, 0.5f, 0, 0, 0, 1, 0};
    const unsigned char kept_ref[2][7] = {{1, 1, 1, 1, 0, 0, 1}, {1, 1, 1, 0, 1, 0, 1}};
    for (int pol = 0; pol < 2; pol++) {
        moe_layer_config c = moe_layer_config_default(3, 4, 3, 1, 7);
        c.renormalize = 0;
        c.capacity_factor = 1.0f;
        c.drop_policy = (moe_drop_policy)pol;
        moe_layer *l = make_layer(&c);
        if (!l) return;
        identity_router(l, 70);
        float y[21];
        CHECK(moe_layer_forward(l, x, 7, y) == 0);
        const int *off, *ids;
        const float *w;
        const unsigned char *kept;
        CHECK_EQ_INT(moe_layer_routing(l, &off, &ids, &w, &kept), 7);
        const int ids_ref[7] = {0, 0, 1, 0, 0, 0, 1};
        for (int t = 0; t < 7; t++) {
            CHECK_EQ_INT(off[t], t);
            CHECK_EQ_INT(ids[t], ids_ref[t]);
            CHECK_MSG(kept[t] == kept_ref[pol][t], "policy %d token %d: kept %d", pol, t, kept[t]);
            CHECK((l->row_of_slot[t] >= 0) == kept_ref[pol][t]);
        }
        const moe_layer_stats *st = moe_layer_get_stats(l);
        CHECK_EQ_INT(st->capacity, 3);
        CHECK_CLOSE(st->dropped_fraction, 2.0 / 7, 1e-7, 0);
        CHECK_EQ_INT(st->expert_count[0], 5);
        CHECK_EQ_INT(l->kept[0], 3);
        /* y against ref_layer (same capacity rule), dropped rows exactly 0 */
        const moe_layer_params o = moe_layer_param_offsets(l);
        double *pd = malloc(sizeof(double) * o.total), xd[21], yr[21];
        for (size_t i = 0; i < o.total; i++) pd[i] = moe_layer_params_ptr(l)[i];
        for (int i = 0; i < 21; i++) xd[i] = x[i];
        ref_layer_objective(&c, &o, pd, xd, 7, NULL, yr, NULL, NULL, NULL, NULL);
        for (int i = 0; i < 21; i++) CHECK_CLOSE(y[i], yr[i], 1e-6, 1e-5);
        for (int t = 0; t < 7; t++) CHECK(row_is_zero(y, t, 3) == !kept_ref[pol][t]);
        free(pd);
        moe_layer_free(l);
    }
}

typedef struct {
    const moe_layer_config *c;
    const moe_layer_params *off;
    int n;
    const double *dy;
} ref_ctx;

static double ref_obj(const void *vctx, const double *p, const double *x) {
    const ref_ctx *s = vctx;
    return ref_layer_objective(s->c, s->off, p, x, s->n, s->dy, NULL, NULL, NULL, NULL, NULL);
}

static int some_drops(const rig *r, const sref_route *rt) {
    int d = 0;
    for (int i = 0; i < rt->R; i++) d += !rt->keep[i];
    return d >= 2;
}

/* Switch top-1 (raw softmax gate) with capacity, both policies: the slots
 * and y match the references, the backward matches ref_layer's finite
 * differences. */
TEST(capacity_switch_top1_gradients) {
    uint64_t seed = 120;
    for (int pol = 0; pol < 2; pol++)
        for (int k = 0; k < 2; k++) {
            moe_layer_config c = fd_cfg(MOE_SCORE_SOFTMAX, 0, 4, 1);
            c.act = MOE_ACT_RELU;
            c.capacity_factor = k ? 0.5f : 1.0f;
            c.drop_policy = (moe_drop_policy)pol;
            rig r;
            if (rig_make(&r, c, 12, seed++, 2.0, 0, 1e-3, some_drops)) return;
            char tag[64];
            snprintf(tag, sizeof tag, "switch top-1 policy %d cf %g", pol, c.capacity_factor);
            rig_check_forward(&r, tag);
            moe_layer_zero_grad(r.l);
            CHECK(moe_layer_forward(r.l, r.x, 12, r.y) == 0);
            CHECK(moe_layer_backward(r.l, r.dy, r.dx) == 0);
            ref_ctx ctx = {&r.c, &r.off, 12, r.dyd};
            char where[160];
            const double worst = fd_worst(ref_obj, &ctx, &r.off, r.pd, r.xd, (size_t)12 * c.d_model,
                                          moe_layer_grads_ptr(r.l), r.dx, where, sizeof where);
            printf("    %-44s fd (ref_layer) worst rel err %.2e at %s\n", tag, worst, where);
            CHECK_MSG(worst <= 1e-3, "%s: worst rel err %g at %s", tag, worst, where);
            rig_free(&r);
        }
}

/* ---- 9. PyTorch fixtures ----------------------------------------------------------------------- */

typedef struct {
    moe__st_file *f;
    const char *name;
} rfx;

static float *rfx_load(rfx *x, const char *name, size_t n) {
    const moe__st_tensor *t = moe__st_find(x->f, name);
    if (!t) {
        moe_test_fail(__FILE__, __LINE__, "%s: no tensor %s", x->name, name);
        return NULL;
    }
    float *v = malloc(sizeof(float) * (n ? n : 1));
    const int rc = moe__st_read_f32(t, v, n);
    if (rc) {
        moe_test_fail(__FILE__, __LINE__, "%s: tensor %s: %s", x->name, name, moe_strerror(rc));
        free(v);
        return NULL;
    }
    return v;
}

static int rfx_i32(rfx *x, const char *name, int32_t *dst, size_t n) {
    const moe__st_tensor *t = moe__st_find(x->f, name);
    if (!t || t->dtype != MOE__DT_I32 || t->numel != n) {
        moe_test_fail(__FILE__, __LINE__, "%s: tensor %s missing or not I32[%zu]", x->name, name, n);
        return -1;
    }
    memcpy(dst, t->data, sizeof(int32_t) * n);
    return 0;
}

static double rfx_meta(rfx *x, const char *k) {
    const char *v = moe__st_meta(x->f, k);
    if (!v) moe_test_fail(__FILE__, __LINE__, "%s: no metadata %s", x->name, k);
    return v ? strtod(v, NULL) : NAN;
}

/* max |a - b| / max |b|, printed and checked against 1e-4 */
static void rfx_compare(const char *file, const char *what, const float *a, const float *b, size_t n) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) d = fmax(d, fabs((double)a[i] - b[i])), r = fmax(r, fabs((double)b[i]));
    const double rel = d / fmax(1e-6, r);
    printf("    %-30s %-6s max abs err %.3e  rel %.3e\n", file, what, d, rel);
    CHECK_MSG(rel <= 1e-4, "%s %s: rel err %g", file, what, rel);
}

static void check_router_fixture(const char *file) {
    char path[512], msg[256];
    snprintf(path, sizeof path, "%s/%s", moe_test_data_dir(), file);
    rfx x = {NULL, file};
    int rc = moe__st_open(path, &x.f, msg, sizeof msg);
    CHECK_MSG(rc == 0, "%s", msg);
    if (rc) return;
    const int N = (int)rfx_meta(&x, "N"), C = (int)rfx_meta(&x, "C"), F = (int)rfx_meta(&x, "F");
    const int E = (int)rfx_meta(&x, "E"), K = (int)rfx_meta(&x, "K");
    moe_layer_config c = moe_layer_config_default(C, F, E, K, N);
    const char *act = moe__st_meta(x.f, "act"), *score = moe__st_meta(x.f, "score");
    const char *pol = moe__st_meta(x.f, "drop_policy");
    c.act = act && !strcmp(act, "swiglu") ? MOE_ACT_SWIGLU : act && !strcmp(act, "gelu") ? MOE_ACT_GELU : MOE_ACT_RELU;
    c.score = score && !strcmp(score, "sigmoid") ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
    c.drop_policy = pol && !strcmp(pol, "probability") ? MOE_DROP_PROBABILITY : MOE_DROP_ARRIVAL;
    c.renormalize = (int)rfx_meta(&x, "renorm");
    c.route_scale = (float)rfx_meta(&x, "scale");
    c.aux_coef = (float)rfx_meta(&x, "aux_coef");
    c.z_coef = (float)rfx_meta(&x, "z_coef");
    c.n_groups = (int)rfx_meta(&x, "n_groups");
    c.topk_groups = (int)rfx_meta(&x, "topk_groups");
    c.aux_seq_len = (int)rfx_meta(&x, "aux_seq_len");
    c.bias_update_rate = (float)rfx_meta(&x, "bias_rate");
    c.capacity_factor = (float)rfx_meta(&x, "capacity_factor");
    moe_layer *l = make_layer(&c);
    if (!l) {
        moe__st_close(x.f);
        return;
    }
    const moe_layer_params off = moe_layer_param_offsets(l);
    const size_t NC = (size_t)N * C, EFC = (size_t)E * F * C, NK = (size_t)N * K;
    float *p = moe_layer_params_ptr(l);
    const char *pn[5] = {"wg", "w1", "w2", "w3", "ebias"}, *gn[4] = {"dwg", "dw1", "dw2", "dw3"};
    const size_t po[5] = {off.wg, off.w1, off.w2, off.w3, off.ebias};
    const size_t pl[5] = {(size_t)E * C, EFC, EFC, EFC, (size_t)E};
    for (int i = 0; i < 5; i++) {
        if (po[i] == SIZE_MAX) continue;
        float *v = rfx_load(&x, pn[i], pl[i]);
        if (v) memcpy(p + po[i], v, sizeof(float) * pl[i]);
        free(v);
    }
    float *in = rfx_load(&x, "x", NC), *dy = rfx_load(&x, "dy", NC), *yref = rfx_load(&x, "y", NC);
    float *dxref = rfx_load(&x, "dx", NC), *wref = rfx_load(&x, "topk_weights", NK);
    float *aux = rfx_load(&x, "aux_raw", 1), *z = rfx_load(&x, "z_raw", 1);
    float *y = malloc(sizeof(float) * NC), *dx = malloc(sizeof(float) * NC);
    int32_t *idref = malloc(sizeof(int32_t) * NK), *keptref = malloc(sizeof(int32_t) * NK);
    if (!in || !dy || !yref || !dxref || !wref || !aux || !z || rfx_i32(&x, "topk_ids", idref, NK)) goto out;
    const int has_kept = moe__st_find(x.f, "kept") != NULL;
    if (has_kept && rfx_i32(&x, "kept", keptref, NK)) goto out;

    rc = moe_layer_forward(l, in, N, y);
    CHECK_MSG(rc == 0, "%s: forward: %s", file, moe_layer_errmsg(l));
    if (rc) goto out;
    rfx_compare(file, "y", y, yref, NC);
    const int *ids;
    const float *w;
    const unsigned char *kept;
    CHECK_EQ_INT(moe_layer_routing(l, NULL, &ids, &w, &kept), (int)NK);
    int mism = 0, kmism = 0, dropped = 0;
    for (size_t i = 0; i < NK; i++) {
        mism += ids[i] != idref[i];
        kmism += has_kept && kept[i] != keptref[i];
        dropped += !kept[i];
    }
    CHECK_EQ_INT(mism, 0);
    CHECK_EQ_INT(kmism, 0);
    rfx_compare(file, "gates", w, wref, NK);
    const moe_layer_stats *st = moe_layer_get_stats(l);
    CHECK_CLOSE(st->aux_loss, c.aux_coef * aux[0], 1e-7, 1e-5);
    CHECK_CLOSE(st->z_loss, c.z_coef * z[0], 1e-7, 1e-5);
    if (!has_kept) CHECK_EQ_INT(dropped, 0); /* dropless */
    if (has_kept) {
        CHECK(dropped > 0);
        CHECK_EQ_INT(st->capacity, (int)rfx_meta(&x, "capacity"));
        CHECK_CLOSE(st->dropped_fraction, (double)dropped / NK, 1e-7, 0);
    }
    moe_layer_zero_grad(l);
    CHECK(moe_layer_backward(l, dy, dx) == 0);
    rfx_compare(file, "dx", dx, dxref, NC);
    const float *g = moe_layer_grads_ptr(l);
    for (int i = 0; i < 4; i++) {
        if (po[i] == SIZE_MAX) continue;
        float *v = rfx_load(&x, gn[i], pl[i]);
        if (v) rfx_compare(file, gn[i], g + po[i], v, pl[i]);
        free(v);
    }
    if (off.ebias != SIZE_MAX)
        for (int e = 0; e < E; e++) CHECK(g[off.ebias + e] == 0.0f);
out:
    free(in), free(dy), free(yref), free(dxref), free(wref), free(aux), free(z), free(y), free(dx), free(idref),
        free(keptref);
    moe_layer_free(l);
    moe__st_close(x.f);
}

/* Sigmoid scores + selection bias + 4 groups (top-2 sums, 2 kept) + top-3,
 * renormalised x2.5, sequence-wise aux loss over blocks of 6, 6 and 4. */
TEST(router_fixture_deepseek_v3_sigmoid_bias_groups) { check_router_fixture("router_deepseek_v3.safetensors"); }

/* Switch top-1, raw softmax gate, capacity 3 with arrival order: 2 of 12 dropped. */
TEST(router_fixture_switch_top1_capacity) { check_router_fixture("router_switch_capacity.safetensors"); }

/* ---- determinism ------------------------------------------------------------------------------- */

/* The schemes' own parallel parts (expert choice's per-expert selection, the
 * per-thread scratch of biased/grouped top-k, GShard's counter-based draws)
 * give bit-identical results for 1 and 2 threads; 600 tokens span three
 * router chunks. */
TEST(schemes_bitwise_identical_1_and_2_threads) {
    enum { N = 600, C = 24 };
    moe_layer_config base = moe_layer_config_default(C, 20, 8, 2, N);
    moe_layer_config cfgs[3] = {base, base, base};
    cfgs[0].router = MOE_ROUTER_EXPERT_CHOICE, cfgs[0].capacity_factor = 1.25f;
    cfgs[1].score = MOE_SCORE_SIGMOID, cfgs[1].route_scale = 2.5f, cfgs[1].bias_update_rate = 1e-3f;
    cfgs[1].n_groups = 4, cfgs[1].topk_groups = 2, cfgs[1].aux_seq_len = 100, cfgs[1].importance_coef = 0.1f;
    cfgs[2].gshard_random = 1, cfgs[2].capacity_factor = 1.0f;
    float *x = malloc(sizeof(float) * N * C), *dy = malloc(sizeof(float) * N * C);
    uint64_t s = 2024;
    for (int i = 0; i < N * C; i++) x[i] = (float)rnd_normal(&s), dy[i] = (float)rnd_normal(&s);
    for (int k = 0; k < 3; k++) {
        float *res[2][3] = {{NULL}};
        size_t T = 0;
        for (int th = 1; th <= 2; th++) {
            moe_layer_config c = cfgs[k];
            c.n_threads = th;
            moe_layer *l = make_layer(&c);
            if (!l) break;
            moe_layer_init(l, 7, 1.0f);
            T = moe_layer_param_offsets(l).total;
            if (c.bias_update_rate > 0)
                for (int e = 0; e < 8; e++) moe_layer_params_ptr(l)[moe_layer_param_offsets(l).ebias + e] = 0.05f * (e % 3);
            float *y = res[th - 1][0] = malloc(sizeof(float) * N * C), *dx = res[th - 1][1] = malloc(sizeof(float) * N * C);
            moe_layer_zero_grad(l);
            CHECK(moe_layer_forward(l, x, N, y) == 0);
            CHECK(moe_layer_backward(l, dy, dx) == 0);
            res[th - 1][2] = malloc(sizeof(float) * T);
            memcpy(res[th - 1][2], moe_layer_grads_ptr(l), sizeof(float) * T);
            moe_layer_free(l);
        }
        if (res[0][2] && res[1][2]) {
            CHECK_MSG(memcmp(res[0][0], res[1][0], sizeof(float) * N * C) == 0, "config %d: y differs", k);
            CHECK_MSG(memcmp(res[0][1], res[1][1], sizeof(float) * N * C) == 0, "config %d: dx differs", k);
            CHECK_MSG(memcmp(res[0][2], res[1][2], sizeof(float) * T) == 0, "config %d: grads differ", k);
        }
        for (int i = 0; i < 2; i++)
            for (int j = 0; j < 3; j++) free(res[i][j]);
    }
    free(x), free(dy);
}
