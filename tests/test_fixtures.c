/* The layer against PyTorch: fixtures written by tools/gen_layer_fixtures.py
 * (a Hugging Face Mixtral-style block, computed in float64 from fp32 inputs)
 * hold inputs, parameters, outputs, routing, losses and every gradient. */
#include "io/safetensors.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    moe__st_file *f;
    const char *path;
} fx;

static float *load(fx *x, const char *name, size_t n) {
    const moe__st_tensor *t = moe__st_find(x->f, name);
    if (!t) {
        moe_test_fail(__FILE__, __LINE__, "%s: no tensor %s", x->path, name);
        return NULL;
    }
    float *v = malloc(sizeof(float) * (n ? n : 1));
    int rc = moe__st_read_f32(t, v, n);
    if (rc) {
        moe_test_fail(__FILE__, __LINE__, "%s: tensor %s: %s", x->path, name, moe_strerror(rc));
        free(v);
        return NULL;
    }
    return v;
}

static int meta_int(fx *x, const char *k) {
    const char *v = moe__st_meta(x->f, k);
    return v ? atoi(v) : -1;
}
static float meta_float(fx *x, const char *k) {
    const char *v = moe__st_meta(x->f, k);
    return v ? strtof(v, NULL) : NAN;
}

/* max |a-b| / max(1e-6, max |b|), printed, checked against tol */
static void compare(const char *file, const char *what, const float *a, const float *b, size_t n, double tol) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        r = fmax(r, fabs((double)b[i]));
    }
    const double rel = d / fmax(1e-6, r);
    printf("    %-32s %-6s max abs err %.3e  rel %.3e\n", file, what, d, rel);
    CHECK_MSG(rel <= tol, "%s %s: rel err %g > %g", file, what, rel, tol);
}

static void check_fixture(const char *name) {
    char path[512], msg[256];
    snprintf(path, sizeof path, "%s/%s", moe_test_data_dir(), name);
    fx x = {NULL, name};
    int rc = moe__st_open(path, &x.f, msg, sizeof msg);
    CHECK_MSG(rc == 0, "%s", msg);
    if (rc) return;
    const int N = meta_int(&x, "N"), C = meta_int(&x, "C"), F = meta_int(&x, "F");
    const int E = meta_int(&x, "E"), K = meta_int(&x, "K");
    moe_layer_config c = moe_layer_config_default(C, F, E, K, N);
    const char *act = moe__st_meta(x.f, "act"), *score = moe__st_meta(x.f, "score");
    c.act = !strcmp(act, "swiglu") ? MOE_ACT_SWIGLU : !strcmp(act, "gelu") ? MOE_ACT_GELU : MOE_ACT_RELU;
    c.score = !strcmp(score, "sigmoid") ? MOE_SCORE_SIGMOID : MOE_SCORE_SOFTMAX;
    c.renormalize = meta_int(&x, "renorm");
    c.route_scale = meta_float(&x, "scale");
    c.aux_coef = meta_float(&x, "aux_coef");
    c.z_coef = meta_float(&x, "z_coef");
    moe_layer *l = moe_layer_create(&c, &rc, msg, sizeof msg);
    CHECK_MSG(l != NULL, "%s: %s", name, msg);
    if (!l) goto out;

    const moe_layer_params off = moe_layer_param_offsets(l);
    const size_t NC = (size_t)N * C, EFC = (size_t)E * F * C;
    float *p = moe_layer_params_ptr(l);
    const char *pnames[] = {"wg", "w1", "w2", "w3"};
    const size_t poff[] = {off.wg, off.w1, off.w2, off.w3}, plen[] = {(size_t)E * C, EFC, EFC, EFC};
    for (int i = 0; i < (c.act == MOE_ACT_SWIGLU ? 4 : 3); i++) {
        float *v = load(&x, pnames[i], plen[i]);
        if (v) memcpy(p + poff[i], v, sizeof(float) * plen[i]);
        free(v);
    }
    float *in = load(&x, "x", NC), *dy = load(&x, "dy", NC), *yref = load(&x, "y", NC);
    float *dxref = load(&x, "dx", NC), *wref = load(&x, "topk_weights", (size_t)N * K);
    float *aux = load(&x, "aux_raw", 1), *z = load(&x, "z_raw", 1);
    float *y = malloc(sizeof(float) * NC), *dx = malloc(sizeof(float) * NC);
    if (!in || !dy || !yref || !dxref || !wref || !aux || !z) goto out_free;

    rc = moe_layer_forward(l, in, N, y);
    CHECK_MSG(rc == 0, "%s: forward: %s", name, moe_layer_errmsg(l));
    compare(name, "y", y, yref, NC, 1e-5);
    compare(name, "gates", moe_layer_topk_weights(l), wref, (size_t)N * K, 1e-5);
    const moe__st_tensor *ids = moe__st_find(x.f, "topk_ids");
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
    const moe_layer_stats *st = moe_layer_get_stats(l);
    CHECK_CLOSE(st->aux_loss, c.aux_coef * aux[0], 1e-7, 1e-5);
    CHECK_CLOSE(st->z_loss, c.z_coef * z[0], 1e-7, 1e-5);

    moe_layer_zero_grad(l);
    rc = moe_layer_backward(l, dy, dx);
    CHECK(rc == 0);
    compare(name, "dx", dx, dxref, NC, 1e-5);
    const char *gnames[] = {"dwg", "dw1", "dw2", "dw3"};
    const float *g = moe_layer_grads_ptr(l);
    for (int i = 0; i < (c.act == MOE_ACT_SWIGLU ? 4 : 3); i++) {
        float *v = load(&x, gnames[i], plen[i]);
        if (v) compare(name, gnames[i], g + poff[i], v, plen[i], 1e-5);
        free(v);
    }
out_free:
    free(in), free(dy), free(yref), free(dxref), free(wref), free(aux), free(z), free(y), free(dx);
out:
    moe_layer_free(l);
    moe__st_close(x.f);
}

TEST(pytorch_fixture_mixtral) { check_fixture("layer_mixtral.safetensors"); }
TEST(pytorch_fixture_qwen_norenorm) { check_fixture("layer_qwen_norenorm.safetensors"); }
TEST(pytorch_fixture_sigmoid_gelu) { check_fixture("layer_sigmoid_gelu.safetensors"); }
TEST(pytorch_fixture_relu_top1) { check_fixture("layer_relu_top1.safetensors"); }
