/* The whole model against its PyTorch twin (tools/gen_model_fixture.py): the
 * same weights give the same logits, loss and every gradient, and 10 AdamW
 * steps give the same losses. Plus config parsing, costs, determinism,
 * KV-cache decoding and bad input. */
#include "io/safetensors.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static double rel_err(const float *a, const float *b, size_t n, double *maxref) {
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        r = fmax(r, fabs((double)b[i]));
    }
    if (maxref) *maxref = r;
    return d / fmax(r, 1e-12);
}

typedef struct {
    moe__st_file *f;
    moe_model *m;
    moe_model_config cfg;
    int B, T;
    int32_t *in, *tg;
} twin;

static int twin_open(twin *w, const char *file) {
    memset(w, 0, sizeof *w);
    char path[512], msg[256];
    snprintf(path, sizeof path, "%s/%s", moe_test_data_dir(), file);
    int rc = moe__st_open(path, &w->f, msg, sizeof msg);
    CHECK_MSG(rc == 0, "%s", msg);
    if (rc) return rc;
    const char *cj = moe__st_meta(w->f, "config");
    CHECK(cj != NULL);
    if (!cj) return -1;
    rc = moe_model_config_parse(cj, strlen(cj), file, &w->cfg, msg, sizeof msg);
    CHECK_MSG(rc == 0, "config: %s", msg);
    const moe__st_tensor *tok = moe__st_find(w->f, "tokens");
    CHECK(tok && tok->dtype == MOE__DT_I32 && tok->ndim == 2);
    if (rc || !tok) return -1;
    w->B = (int)tok->shape[0], w->T = (int)tok->shape[1] - 1;
    w->in = malloc(sizeof(int32_t) * w->B * w->T), w->tg = malloc(sizeof(int32_t) * w->B * w->T);
    for (int b = 0; b < w->B; b++)
        for (int t = 0; t < w->T; t++) {
            memcpy(&w->in[b * w->T + t], (const char *)tok->data + 4 * ((size_t)b * (w->T + 1) + t), 4);
            memcpy(&w->tg[b * w->T + t], (const char *)tok->data + 4 * ((size_t)b * (w->T + 1) + t + 1), 4);
        }
    w->m = moe_model_create(&w->cfg, w->B, w->T, 1, 0, &rc, msg, sizeof msg);
    CHECK_MSG(w->m != NULL, "create: %s", msg);
    if (!w->m) return -1;
    /* every tensor of the model comes from the fixture, by name */
    float *p = moe_model_params(w->m);
    int missing = 0;
    for (int i = 0; i < moe_model_n_tensors(w->m); i++) {
        const moe_param_info *pi = moe_model_tensor(w->m, i);
        if (w->cfg.tie_word_embeddings && !strcmp(pi->name, "lm_head.weight")) continue;
        const moe__st_tensor *t = moe__st_find(w->f, pi->name);
        if (!t || moe__st_read_f32(t, p + pi->offset, pi->numel) != 0) {
            if (missing++ < 5) moe_test_fail(__FILE__, __LINE__, "%s: tensor %s missing or wrong size", file, pi->name);
        }
    }
    return missing ? -1 : 0;
}

static void twin_close(twin *w) {
    moe_model_free(w->m);
    moe__st_close(w->f);
    free(w->in), free(w->tg);
}

static float fixture_scalar(twin *w, const char *name) {
    const moe__st_tensor *t = moe__st_find(w->f, name);
    float v = NAN;
    if (t) moe__st_read_f32(t, &v, 1);
    return v;
}

static void check_twin(const char *file) {
    twin w;
    if (twin_open(&w, file)) {
        twin_close(&w);
        return;
    }
    const int N = w.B * w.T, V = w.cfg.vocab_size;
    float loss;
    int rc = moe_model_forward(w.m, w.in, w.tg, w.B, w.T, &loss);
    CHECK_MSG(rc == 0, "forward: %s", moe_model_errmsg(w.m));
    float *lref = malloc(sizeof(float) * (size_t)N * V);
    const moe__st_tensor *lt = moe__st_find(w.f, "logits");
    CHECK(lt && moe__st_read_f32(lt, lref, (size_t)N * V) == 0);
    double e = rel_err(moe_model_logits(w.m), lref, (size_t)N * V, NULL);
    printf("    %-28s logits rel err %.2e, loss %.6f vs %.6f\n", file, e, loss, fixture_scalar(&w, "loss"));
    CHECK_MSG(e < 1e-5, "logits rel err %g", e);
    CHECK_CLOSE(loss, fixture_scalar(&w, "loss"), 1e-6, 1e-5);
    float ce, aux;
    moe_model_last_losses(w.m, &ce, &aux);
    CHECK_CLOSE(ce, fixture_scalar(&w, "ce"), 1e-6, 1e-5);
    CHECK_CLOSE(aux, fixture_scalar(&w, "aux"), 1e-7, 1e-4);

    moe_model_zero_grad(w.m);
    rc = moe_model_backward(w.m);
    CHECK_MSG(rc == 0, "backward: %s", moe_model_errmsg(w.m));
    const float *g = moe_model_grads(w.m);
    double worst = 0;
    const char *worst_name = "";
    for (int i = 0; i < moe_model_n_tensors(w.m); i++) {
        const moe_param_info *pi = moe_model_tensor(w.m, i);
        if (w.cfg.tie_word_embeddings && !strcmp(pi->name, "lm_head.weight")) continue;
        char name[128];
        snprintf(name, sizeof name, "grad.%s", pi->name);
        const moe__st_tensor *t = moe__st_find(w.f, name);
        CHECK_MSG(t != NULL, "%s: no %s", file, name);
        if (!t) continue;
        float *ref = malloc(sizeof(float) * pi->numel);
        moe__st_read_f32(t, ref, pi->numel);
        double mr, ge = rel_err(g + pi->offset, ref, pi->numel, &mr);
        if (mr < 1e-7) ge = 0; /* an all-zero gradient (unused expert): compare absolutely */
        if (ge > worst) worst = ge, worst_name = pi->name;
        CHECK_MSG(ge < 1e-4, "%s: %s rel err %g (max |g| %g)", file, pi->name, ge, mr);
        free(ref);
    }
    printf("    %-28s worst gradient rel err %.2e (%s)\n", file, worst, worst_name);
    free(lref);

    /* 10 AdamW steps on the same batch */
    moe_adamw_config oc = moe_adamw_config_default();
    oc.lr = 1e-2f, oc.min_lr = 1e-2f, oc.beta1 = 0.9f, oc.beta2 = 0.95f, oc.eps = 1e-8f, oc.weight_decay = 0.1f;
    oc.grad_clip = 1.0f, oc.warmup_steps = 0, oc.max_steps = 0;
    moe_adamw *o = moe_adamw_create(moe_model_n_params(w.m), &oc, 0, &rc);
    const moe__st_tensor *al = moe__st_find(w.f, "adamw_losses"), *an = moe__st_find(w.f, "adamw_gradnorm");
    float ref_l[10], ref_n[10];
    CHECK(al && an && moe__st_read_f32(al, ref_l, 10) == 0 && moe__st_read_f32(an, ref_n, 10) == 0);
    double worst_l = 0;
    for (int s = 0; s < 10 && o && al && an; s++) {
        float gn;
        moe_model_zero_grad(w.m);
        CHECK(moe_model_forward(w.m, w.in, w.tg, w.B, w.T, &loss) == 0);
        CHECK(moe_model_backward(w.m) == 0);
        CHECK(moe_adamw_step(o, moe_model_params(w.m), moe_model_grads(w.m), moe_model_tensor(w.m, 0),
                             moe_model_n_tensors(w.m), &gn) == 0);
        worst_l = fmax(worst_l, fabs(loss - ref_l[s]) / fabs(ref_l[s]));
        CHECK_MSG(fabs(loss - ref_l[s]) <= 1e-4 * fabs(ref_l[s]) + 1e-5, "%s: AdamW step %d loss %.7f vs %.7f", file,
                  s, loss, ref_l[s]);
        CHECK_MSG(fabs(gn - ref_n[s]) <= 1e-3 * ref_n[s] + 1e-6, "%s: step %d grad norm %.6f vs %.6f", file, s, gn,
                  ref_n[s]);
    }
    printf("    %-28s 10 AdamW steps: loss %.5f -> %.5f, worst rel err %.2e\n", file, ref_l[0], ref_l[9], worst_l);
    moe_adamw_free(o);
    twin_close(&w);
}

TEST(model_matches_pytorch_twin_moe) { check_twin("model_tiny_moe.safetensors"); }
TEST(model_matches_pytorch_twin_mixed_tied) { check_twin("model_tiny_mixed.safetensors"); }
TEST(model_matches_pytorch_twin_qwen_gate) { check_twin("model_tiny_qwen.safetensors"); }

/* ---- config ------------------------------------------------------------------- */

static const char *TINY =
    "{\"vocab_size\": 50, \"hidden_size\": 24, \"intermediate_size\": 16, \"num_hidden_layers\": 2,"
    " \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"max_position_embeddings\": 12,"
    " \"num_local_experts\": 4, \"num_experts_per_tok\": 2}";

TEST(model_config_parse_defaults_and_roundtrip) {
    moe_model_config c, d;
    char msg[256];
    CHECK(moe_model_config_parse(TINY, strlen(TINY), "tiny", &c, msg, sizeof msg) == 0);
    CHECK_EQ_INT(c.head_dim, 6);
    CHECK_EQ_INT(c.dense_intermediate_size, 32); /* K * F: equal active params */
    CHECK_EQ_INT(moe_model_n_moe_layers(&c), 2);
    CHECK_CLOSE(c.rope_theta, 10000, 0, 0);
    char *js = moe_model_config_to_json(&c);
    CHECK(moe_model_config_parse(js, strlen(js), "rt", &d, msg, sizeof msg) == 0);
    free(js);
    CHECK(memcmp(&c, &d, sizeof c) == 0);
}

TEST(model_config_rejects_bad_json) {
    moe_model_config c;
    char msg[256];
    const char *bad[] = {"[1,2]", "{\"hidden_size\": \"big\"}", "{\"hidden_size\": 1.5}",
                         "{\"vocab_size\": 50, \"hidden_size\": 24, \"num_hidden_layers\": 1, \"num_attention_heads\": 5,"
                         " \"max_position_embeddings\": 8}",
                         "{\"vocab_size\": 50, \"hidden_size\": 24, \"num_hidden_layers\": 1, \"num_attention_heads\": 4,"
                         " \"num_key_value_heads\": 3, \"max_position_embeddings\": 8}",
                         "{\"moe_layer_indices\": [7], \"num_hidden_layers\": 2}", "{\"scoring_func\": \"relu\"}",
                         "{\"tie_word_embeddings\": 1}", "not json", "{\"num_local_experts\": 4, \"num_experts_per_tok\": 9,"
                         " \"vocab_size\": 50, \"hidden_size\": 24, \"intermediate_size\": 8, \"num_hidden_layers\": 1,"
                         " \"num_attention_heads\": 4, \"max_position_embeddings\": 8}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = moe_model_config_parse(bad[i], strlen(bad[i]), "bad.json", &c, msg, sizeof msg);
        CHECK_MSG(rc < 0, "accepted: %s", bad[i]);
        CHECK_MSG(strstr(msg, "bad.json") != NULL, "message without the file name: %s", msg);
    }
}

TEST(model_costs_active_vs_total) {
    moe_model_config c;
    char msg[256];
    CHECK(moe_model_config_parse(TINY, strlen(TINY), "tiny", &c, msg, sizeof msg) == 0);
    moe_model_costs k = moe_model_config_costs(&c, 12);
    /* per layer: attn 4*24*24 + ... computed by hand */
    const double attn = 24.0 * 24 * 2 + 24.0 * 12 * 2, moe = 4.0 * 24 + 4.0 * 3 * 24 * 16;
    const double total = 50.0 * 24 * 2 + 24 + 2 * (attn + 2 * 24 + moe);
    CHECK_CLOSE(k.total_params, total, 0, 1e-12);
    CHECK_CLOSE(k.active_params, total - 2 * (2.0 * 3 * 24 * 16), 0, 1e-12); /* 2 of 4 experts idle */
    moe_model *m = moe_model_create(&c, 1, 12, 0, 1, NULL, msg, sizeof msg);
    CHECK(m != NULL);
    if (m) CHECK_CLOSE((double)moe_model_n_params(m), total, 0, 0);
    moe_model_free(m);
}

/* ---- behaviour ------------------------------------------------------------------ */

TEST(model_bitwise_identical_1_and_2_threads) {
    moe_model_config c;
    char msg[256];
    CHECK(moe_model_config_parse(TINY, strlen(TINY), "tiny", &c, msg, sizeof msg) == 0);
    int32_t tok[3 * 12], tg[3 * 12];
    for (int i = 0; i < 36; i++) tok[i] = (i * 7 + 3) % 50, tg[i] = (i * 11 + 5) % 50;
    float *g[2] = {NULL, NULL}, loss[2];
    size_t n = 0;
    for (int th = 1; th <= 2; th++) {
        moe_model *m = moe_model_create(&c, 3, 12, 1, th, NULL, msg, sizeof msg);
        CHECK(m != NULL);
        if (!m) return;
        moe_model_init(m, 5);
        moe_model_zero_grad(m);
        CHECK(moe_model_forward(m, tok, tg, 3, 12, &loss[th - 1]) == 0);
        CHECK(moe_model_backward(m) == 0);
        n = moe_model_n_params(m);
        g[th - 1] = malloc(sizeof(float) * n);
        memcpy(g[th - 1], moe_model_grads(m), sizeof(float) * n);
        moe_model_free(m);
    }
    CHECK(memcmp(&loss[0], &loss[1], sizeof(float)) == 0);
    CHECK_MSG(memcmp(g[0], g[1], sizeof(float) * n) == 0, "gradients differ between 1 and 2 threads");
    free(g[0]), free(g[1]);
}

/* Decoding token by token with the KV cache gives the logits of the full
 * forward at every position. */
TEST(model_kv_cache_decode_matches_forward) {
    moe_model_config c;
    char msg[256];
    CHECK(moe_model_config_parse(TINY, strlen(TINY), "tiny", &c, msg, sizeof msg) == 0);
    c.n_shared_experts = 1;
    moe_model *m = moe_model_create(&c, 1, 12, 0, 2, NULL, msg, sizeof msg);
    CHECK_MSG(m != NULL, "%s", msg);
    if (!m) return;
    moe_model_init(m, 9);
    int32_t tok[10];
    for (int i = 0; i < 10; i++) tok[i] = (i * 13 + 1) % 50;
    CHECK(moe_model_forward(m, tok, NULL, 1, 10, NULL) == 0);
    float *full = malloc(sizeof(float) * 10 * 50);
    memcpy(full, moe_model_logits(m), sizeof(float) * 10 * 50);
    moe_model_decode_reset(m);
    double worst = 0;
    for (int t = 0; t < 10; t++) {
        const float *lg;
        CHECK(moe_model_decode(m, tok[t], &lg) == 0);
        worst = fmax(worst, rel_err(lg, full + t * 50, 50, NULL));
    }
    CHECK_MSG(worst < 1e-5, "decode vs forward rel err %g", worst);
    free(full);
    moe_model_free(m);
}

TEST(model_rejects_bad_tokens_and_shapes) {
    moe_model_config c;
    char msg[256];
    CHECK(moe_model_config_parse(TINY, strlen(TINY), "tiny", &c, msg, sizeof msg) == 0);
    moe_model *m = moe_model_create(&c, 2, 8, 1, 1, NULL, msg, sizeof msg);
    if (!m) return;
    moe_model_init(m, 1);
    int32_t tok[16] = {0}, tg[16] = {0};
    float loss;
    CHECK_EQ_INT(moe_model_backward(m), MOE_ESTATE);
    CHECK_EQ_INT(moe_model_forward(m, tok, tg, 3, 8, &loss), MOE_ESHAPE);
    CHECK_EQ_INT(moe_model_forward(m, tok, tg, 2, 9, &loss), MOE_ESHAPE);
    tok[5] = 50;
    CHECK_EQ_INT(moe_model_forward(m, tok, tg, 2, 8, &loss), MOE_EINVAL);
    CHECK(strstr(moe_model_errmsg(m), "token 50") != NULL);
    tok[5] = 1, tg[3] = -1;
    CHECK_EQ_INT(moe_model_forward(m, tok, tg, 2, 8, &loss), MOE_EINVAL);
    tg[3] = 2;
    CHECK_EQ_INT(moe_model_forward(m, tok, tg, 2, 8, &loss), 0);
    CHECK(isfinite(loss) && loss > 0);
    CHECK(moe_model_create(&c, 1, 13, 1, 1, NULL, msg, sizeof msg) == NULL); /* > max_position_embeddings */
    moe_model_free(m);
}
