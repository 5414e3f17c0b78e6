/* `moe bench layer` and `moe bench sgemm`: time the MoE layer on the issue's
 * shapes and the OpenBLAS sgemm ceiling on this machine. The PyTorch peer is
 * bench/peer_torch.py; bench/run.sh puts both side by side. */
#include "bench.h"

#include "moe.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    const char *name;
    int n, c, f, e, k;
} bench_shape;

static const bench_shape SHAPES[] = {
    {"S1", 4096, 512, 1024, 8, 2},     {"S2", 2048, 1024, 3584, 8, 2},
    {"S3-e8", 8192, 256, 256, 8, 2},   {"S3-e64", 8192, 256, 256, 64, 2},
    {"S3-e512", 8192, 256, 256, 512, 2},
};
#define NSHAPES (int)(sizeof SHAPES / sizeof SHAPES[0])

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void fill_normal(float *v, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        double u1 = ((seed >> 11) + 1.0) / 9007199254740993.0;
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        double u2 = (seed >> 11) / 9007199254740992.0;
        v[i] = (float)(sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2));
    }
}

typedef struct {
    double ms, ms_min, gflops;
    double load_max_over_mean, dropped;
    double route_share; /* (router + dispatch + combine) / forward, median run */
} bench_result;

/* Routing schemes of `--router`: each a recipe on top of the shape's softmax
 * top-k layer (docs/routing.md). */
static const char *const ROUTERS[] = {"topk", "noisy-topk", "switch", "gshard", "expert-choice", "sigmoid-bias",
                                      "hierarchical", "balanced", NULL};

static void apply_router(moe_layer_config *c, const char *router) {
    if (!strcmp(router, "noisy-topk")) { /* Shazeer 2017, the paper's loss weights */
        c->router = MOE_ROUTER_NOISY_TOPK;
        c->importance_coef = c->load_coef = 0.1f;
    } else if (!strcmp(router, "switch")) { /* top-1, raw probability, capacity factor 1.25 */
        c->top_k = 1;
        c->renormalize = 0;
        c->capacity_factor = 1.25f;
    } else if (!strcmp(router, "gshard")) { /* top-2, random second expert, capacity 1.25 */
        c->top_k = 2;
        c->gshard_random = 1;
        c->capacity_factor = 1.25f;
    } else if (!strcmp(router, "expert-choice")) { /* capacity N K / E per expert */
        c->router = MOE_ROUTER_EXPERT_CHOICE;
    } else if (!strcmp(router, "sigmoid-bias")) { /* DeepSeek-V3: sigmoid, bias, 4 groups keep 2 */
        c->score = MOE_SCORE_SIGMOID;
        c->bias_update_rate = 1e-3f;
        c->route_scale = 2.5f;
        if (c->n_experts % 4 == 0 && c->top_k <= c->n_experts / 2) c->n_groups = 4, c->topk_groups = 2;
    } else if (!strcmp(router, "hierarchical")) { /* groups of 4 experts; one group, then k in it */
        c->router = MOE_ROUTER_HIERARCHICAL;
        c->n_groups = c->n_experts >= 8 ? c->n_experts / 4 : 1;
        c->topk_groups = 1;
        c->importance_coef = c->load_coef = 0.1f;
    } else if (!strcmp(router, "balanced")) {
        c->router = MOE_ROUTER_BALANCED;
    }
}

static int run_layer(const bench_shape *s, const char *router, int fwdbwd, int threads, int warmup, int reps,
                     bench_result *out, char *err, size_t errsz) {
    moe_layer_config c = moe_layer_config_default(s->c, s->f, s->e, s->k, s->n);
    c.n_threads = threads;
    apply_router(&c, router);
    int rc;
    moe_layer *l = moe_layer_create(&c, &rc, err, errsz);
    if (!l) return rc;
    moe_layer_init(l, 1234, 1.0f);
    const size_t nc = (size_t)s->n * s->c;
    float *x = malloc(sizeof(float) * nc), *y = malloc(sizeof(float) * nc);
    float *dy = malloc(sizeof(float) * nc), *dx = malloc(sizeof(float) * nc);
    double *t = malloc(sizeof(double) * (size_t)reps), *share = malloc(sizeof(double) * (size_t)reps);
    if (!x || !y || !dy || !dx || !t) {
        rc = MOE_ENOMEM;
        snprintf(err, errsz, "out of memory");
        goto out;
    }
    fill_normal(x, nc, 1);
    fill_normal(dy, nc, 2);
    for (int i = 0; i < warmup + reps; i++) {
        double t0 = now_ms();
        rc = moe_layer_forward(l, x, s->n, y);
        if (!rc && fwdbwd) rc = moe_layer_backward(l, dy, dx);
        if (rc) {
            snprintf(err, errsz, "%s", moe_layer_errmsg(l));
            goto out;
        }
        if (i >= warmup) {
            const moe_layer_stats *st = moe_layer_get_stats(l);
            const double f = st->ms_router + st->ms_dispatch + st->ms_experts + st->ms_combine;
            t[i - warmup] = now_ms() - t0;
            share[i - warmup] = (st->ms_router + st->ms_dispatch + st->ms_combine) / f;
        }
    }
    qsort(t, (size_t)reps, sizeof *t, cmp_double);
    qsort(share, (size_t)reps, sizeof *share, cmp_double);
    out->route_share = share[reps / 2];
    out->dropped = moe_layer_get_stats(l)->dropped_fraction;
    out->ms = t[reps / 2];
    out->ms_min = t[0];
    /* active FLOPs of the pairs computed (after any capacity drops) */
    out->gflops = moe_layer_expert_flops(&c, s->n) * (1.0 - moe_layer_get_stats(l)->dropped_fraction) *
                  (fwdbwd ? 3 : 1) / (out->ms * 1e6);
    out->load_max_over_mean = moe_layer_get_stats(l)->load_max_over_mean;
out:
    free(x), free(y), free(dy), free(dx), free(t), free(share);
    moe_layer_free(l);
    return rc;
}

static void usage_layer(FILE *f) {
    fprintf(f,
            "usage: moe bench layer [--shape NAME]... [--pass fwd|fwdbwd] [--router NAME] [--threads T]\n"
            "                       [--json] [--reps R] [--warmup W]\n"
            "  --shape NAME   S1, S2, S3-e8, S3-e64, S3-e512, or all (default: all)\n"
            "  --pass P       fwd (default) or fwdbwd\n"
            "  --router NAME  topk (default: softmax top-k renormalised), noisy-topk, switch\n"
            "                 (top-1, capacity 1.25), gshard, expert-choice, sigmoid-bias,\n"
            "                 hierarchical, balanced (docs/routing.md)\n"
            "  --threads T    OpenMP threads (default: 2)\n"
            "  --reps R       timed repetitions, median reported (default: 5)\n"
            "  --warmup W     untimed repetitions first (default: 2)\n"
            "  --json         one JSON object per shape: shape, pass, ms, gflops, ...\n"
            "Shapes (tokens, C, F, E, K), SwiGLU, softmax top-k renormalised:\n");
    for (int i = 0; i < NSHAPES; i++)
        fprintf(f, "  %-8s %5d %5d %5d %4d %2d\n", SHAPES[i].name, SHAPES[i].n, SHAPES[i].c, SHAPES[i].f,
                SHAPES[i].e, SHAPES[i].k);
    fprintf(f, "GFLOP/s counts active expert FLOPs: 2*N*K*3*C*F forward, 3x that for fwdbwd.\n");
}

/* Parses a positive int flag value; returns -1 when malformed. */
static int parse_pos(const char *s) {
    char *end;
    long v = strtol(s, &end, 10);
    return (*s && !*end && v > 0 && v < 1 << 20) ? (int)v : -1;
}

int moe_bench_layer_main(int argc, char **argv) {
    int sel[NSHAPES] = {0}, any = 0, fwdbwd = 0, threads = 2, json = 0, reps = 5, warmup = 2;
    const char *router = "topk";
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage_layer(stdout);
            return 0;
        } else if (!strcmp(a, "--json")) {
            json = 1;
        } else if (!v) {
            fprintf(stderr, "moe bench layer: %s needs a value\n", a);
            return 2;
        } else if (!strcmp(a, "--shape")) {
            int found = 0;
            for (int s = 0; s < NSHAPES; s++)
                if (!strcmp(v, "all") || !strcmp(v, SHAPES[s].name)) sel[s] = found = any = 1;
            if (!found) {
                fprintf(stderr, "moe bench layer: unknown shape '%s' (see --help)\n", v);
                return 2;
            }
            i++;
        } else if (!strcmp(a, "--router")) {
            int ok = 0;
            for (int r = 0; ROUTERS[r]; r++) ok |= !strcmp(v, ROUTERS[r]);
            if (!ok) {
                fprintf(stderr, "moe bench layer: unknown router '%s' (see --help)\n", v);
                return 2;
            }
            router = v;
            i++;
        } else if (!strcmp(a, "--pass")) {
            if (strcmp(v, "fwd") && strcmp(v, "fwdbwd")) {
                fprintf(stderr, "moe bench layer: --pass must be fwd or fwdbwd, not '%s'\n", v);
                return 2;
            }
            fwdbwd = !strcmp(v, "fwdbwd");
            i++;
        } else if (!strcmp(a, "--threads") || !strcmp(a, "--reps") || !strcmp(a, "--warmup")) {
            int n = parse_pos(v);
            if (n < 0 && !(n == -1 && !strcmp(a, "--warmup") && !strcmp(v, "0"))) {
                fprintf(stderr, "moe bench layer: %s needs a positive integer, not '%s'\n", a, v);
                return 2;
            }
            if (!strcmp(a, "--threads")) threads = n;
            else if (!strcmp(a, "--reps")) reps = n;
            else warmup = n < 0 ? 0 : n;
            i++;
        } else {
            fprintf(stderr, "moe bench layer: unknown flag '%s' (see --help)\n", a);
            return 2;
        }
    }
    if (!any)
        for (int s = 0; s < NSHAPES; s++) sel[s] = 1;
    if (!json)
        printf("OpenBLAS kernel: %s\n", moe_blas_info());
    if (!json)
        printf("%-8s %-6s %5s %5s %5s %4s %2s %3s %10s %10s %9s %7s\n", "shape", "pass", "N", "C", "F", "E", "K",
               "thr", "ms", "ms_min", "GFLOP/s", "route%");
    for (int s = 0; s < NSHAPES; s++) {
        if (!sel[s]) continue;
        bench_result r = {0};
        char err[256] = "";
        int rc = run_layer(&SHAPES[s], router, fwdbwd, threads, warmup, reps, &r, err, sizeof err);
        if (rc) {
            fprintf(stderr, "moe bench layer: %s: %s (%s)\n", SHAPES[s].name, err, moe_strerror(rc));
            return 1;
        }
        const bench_shape *b = &SHAPES[s];
        if (json)
            printf("{\"shape\":\"%s\",\"pass\":\"%s\",\"ms\":%.3f,\"ms_min\":%.3f,\"gflops\":%.2f,"
                   "\"impl\":\"moe\",\"threads\":%d,\"tokens\":%d,\"d_model\":%d,\"d_ff\":%d,"
                   "\"experts\":%d,\"top_k\":%d,\"load_max_over_mean\":%.3f,\"core\":\"%s\",\"router\":\"%s\","
                   "\"route_share\":%.4f,\"dropped\":%.4f}\n",
                   b->name, fwdbwd ? "fwdbwd" : "fwd", r.ms, r.ms_min, r.gflops, threads, b->n, b->c, b->f,
                   b->e, b->k, r.load_max_over_mean, moe_blas_info(), router, r.route_share, r.dropped);
        else
            printf("%-8s %-6s %5d %5d %5d %4d %2d %3d %10.2f %10.2f %9.1f %6.1f%%\n", b->name,
                   fwdbwd ? "fwdbwd" : "fwd", b->n, b->c, b->f, b->e, !strcmp(router, "switch") ? 1 : b->k, threads,
                   r.ms, r.ms_min, r.gflops, 100 * r.route_share);
        fflush(stdout);
    }
    return 0;
}

/* The fp32 ceiling: OpenBLAS's own threaded sgemm on a large square product. */
int moe_bench_sgemm_main(int argc, char **argv) {
    int threads = 2, n = 2048, reps = 5, json = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("usage: moe bench sgemm [--threads T] [--size N] [--reps R] [--json]\n"
                   "  OpenBLAS sgemm N x N x N with its own T threads (defaults: T 2, N 2048, R 5);\n"
                   "  the fp32 GEMM ceiling the layer's GFLOP/s is compared with.\n");
            return 0;
        } else if (!strcmp(a, "--json")) {
            json = 1;
        } else if (v && (!strcmp(a, "--threads") || !strcmp(a, "--size") || !strcmp(a, "--reps"))) {
            int x = parse_pos(v);
            if (x < 0) {
                fprintf(stderr, "moe bench sgemm: %s needs a positive integer\n", a);
                return 2;
            }
            *(!strcmp(a, "--threads") ? &threads : !strcmp(a, "--size") ? &n : &reps) = x;
            i++;
        } else {
            fprintf(stderr, "moe bench sgemm: unknown flag '%s'\n", a);
            return 2;
        }
    }
    const size_t nn = (size_t)n * n;
    float *a = malloc(sizeof(float) * nn), *b = malloc(sizeof(float) * nn), *c = malloc(sizeof(float) * nn);
    double *t = malloc(sizeof(double) * (size_t)reps);
    if (!a || !b || !c || !t) {
        fprintf(stderr, "moe bench sgemm: out of memory\n");
        return 1;
    }
    fill_normal(a, nn, 3);
    fill_normal(b, nn, 4);
    const int saved = openblas_get_num_threads();
    openblas_set_num_threads(threads);
    for (int i = 0; i < reps + 1; i++) {
        double t0 = now_ms();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a, n, b, n, 0.0f, c, n);
        if (i > 0) t[i - 1] = now_ms() - t0;
    }
    openblas_set_num_threads(saved);
    qsort(t, (size_t)reps, sizeof *t, cmp_double);
    const double gf = 2.0 * n * n * n / (t[reps / 2] * 1e6);
    if (json)
        printf("{\"bench\":\"sgemm\",\"size\":%d,\"threads\":%d,\"ms\":%.3f,\"gflops\":%.2f,\"core\":\"%s\"}\n",
               n, threads, t[reps / 2], gf, moe_blas_info());
    else
        printf("sgemm %dx%dx%d threads %d (OpenBLAS %s): %.2f ms, %.1f GFLOP/s\n", n, n, n, threads,
               moe_blas_info(), t[reps / 2], gf);
    free(a), free(b), free(c), free(t);
    return 0;
}
