/* Training machinery: checkpoints round-trip, resume is bit-exact (10 + 10
 * steps == 20 steps), accumulation equals a bigger batch, the schedule, and
 * learning on a synthetic task. */
#include "test.h"

#include "moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *TINY =
    "{\"vocab_size\": 40, \"hidden_size\": 32, \"intermediate_size\": 24, \"num_hidden_layers\": 2,"
    " \"num_attention_heads\": 4, \"num_key_value_heads\": 2, \"max_position_embeddings\": 16,"
    " \"num_local_experts\": 4, \"num_experts_per_tok\": 2, \"initializer_range\": 0.1}";

/* A learnable stream: a noisy repeating pattern over 40 symbols. */
static int32_t *make_stream(size_t n, uint64_t seed) {
    int32_t *s = malloc(sizeof(int32_t) * n);
    for (size_t i = 0; i < n; i++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        s[i] = (seed >> 60) < 2 ? (int32_t)((seed >> 33) % 40) : (int32_t)((i * 7 + i / 13) % 40);
    }
    return s;
}

/* TINY with routing keys added (extra: `"key": value, ...` or "") */
static const char *g_extra = "";

static moe_model *tiny_model(moe_model_config *c, uint64_t seed) {
    char msg[256], json[1024];
    snprintf(json, sizeof json, "%.*s%s%s}", (int)strlen(TINY) - 1, TINY, *g_extra ? ", " : "", g_extra);
    if (moe_model_config_parse(json, strlen(json), "tiny", c, msg, sizeof msg)) {
        fprintf(stderr, "    config: %s\n", msg);
        return NULL;
    }
    moe_model *m = moe_model_create(c, 4, 16, 1, 2, NULL, msg, sizeof msg);
    if (m) moe_model_init(m, seed);
    return m;
}

static moe_train_config tiny_train(void) {
    moe_train_config tc;
    memset(&tc, 0, sizeof tc);
    tc.batch = 4, tc.seq = 16, tc.grad_accum = 1, tc.eval_batches = 2, tc.seed = 7, tc.n_threads = 2;
    tc.opt = moe_adamw_config_default();
    tc.opt.lr = 1e-2f, tc.opt.min_lr = 1e-3f, tc.opt.warmup_steps = 3, tc.opt.max_steps = 20;
    return tc;
}

static char *tmpdir(void) {
    static char d[64];
    return moe_test_tmpdir(d, "train");
}

static void check_resume(void) {
    moe_model_config c;
    int32_t *tr = make_stream(4000, 1), *va = make_stream(1000, 2);
    moe_train_config tc = tiny_train();
    float full[20], split[20];
    moe_model *m = tiny_model(&c, 3);
    moe_trainer *t = moe_trainer_create(m, &tc, tr, 4000, va, 1000, NULL, NULL, 0);
    CHECK(t != NULL);
    for (int s = 0; s < 20 && t; s++) {
        moe_train_step_info si;
        CHECK(moe_trainer_step(t, &si) == 0);
        full[s] = si.loss;
    }
    moe_trainer_free(t);
    moe_model_free(m);

    char *dir = tmpdir(), err[256];
    m = tiny_model(&c, 3);
    t = moe_trainer_create(m, &tc, tr, 4000, va, 1000, NULL, NULL, 0);
    for (int s = 0; s < 10 && t; s++) {
        moe_train_step_info si;
        CHECK(moe_trainer_step(t, &si) == 0);
        split[s] = si.loss;
    }
    CHECK_MSG(moe_trainer_save(t, dir, err, sizeof err) == 0, "%s", err);
    moe_trainer_free(t);
    moe_model_free(m);
    /* a fresh process would do exactly this */
    CHECK_MSG(moe_model_load(dir, 4, 16, 1, 2, &m, err, sizeof err) == 0, "%s", err);
    t = m ? moe_trainer_create(m, &tc, tr, 4000, va, 1000, NULL, NULL, 0) : NULL;
    CHECK(t && moe_trainer_load_state(t, dir, err, sizeof err) == 0);
    CHECK_EQ_INT(t ? moe_trainer_get_step(t) : -1, 10);
    for (int s = 10; s < 20 && t; s++) {
        moe_train_step_info si;
        CHECK(moe_trainer_step(t, &si) == 0);
        split[s] = si.loss;
    }
    CHECK_MSG(memcmp(full, split, sizeof full) == 0, "losses differ: step 19 %.9g vs %.9g", full[19], split[19]);
    CHECK_MSG(full[19] < full[0] - 0.3f, "no learning: %.4f -> %.4f", full[0], full[19]);
    printf("    20 steps: loss %.4f -> %.4f, resumed run identical (%s)\n", full[0], full[19],
           *g_extra ? g_extra : "softmax top-k");
    moe_trainer_free(t);
    moe_model_free(m);
    moe_test_rmdir(dir);
    free(tr), free(va);
}

/* Also with routing noise, random routing and the balancer's bias: their
 * state (the noise counter, the bias) must come back from the checkpoint. */
TEST(train_resume_is_bit_exact) {
    const char *variants[] = {
        "",
        "\"router_type\": \"noisy_topk\", \"router_importance_loss_coef\": 0.1, \"router_load_loss_coef\": 0.1",
        "\"scoring_func\": \"sigmoid\", \"router_bias_update_rate\": 0.01, \"n_group\": 2, \"topk_group\": 1, "
        "\"seq_aux\": true, \"gshard_random\": true, \"capacity_factor\": 1.0",
        "\"router_type\": \"hierarchical\", \"n_group\": 2, \"topk_group\": 1, \"router_load_loss_coef\": 0.1",
    };
    for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++) {
        g_extra = variants[i];
        check_resume();
    }
    g_extra = "";
}

TEST(checkpoint_roundtrip_same_logits) {
    moe_model_config c;
    char *dir = tmpdir(), err[256];
    moe_model *a = tiny_model(&c, 11), *b = NULL;
    CHECK(a != NULL);
    if (!a) return;
    CHECK_MSG(moe_model_save(a, dir, err, sizeof err) == 0, "%s", err);
    CHECK_MSG(moe_model_load(dir, 2, 8, 0, 1, &b, err, sizeof err) == 0, "%s", err);
    if (b) {
        int32_t tok[16];
        for (int i = 0; i < 16; i++) tok[i] = (i * 5) % 40;
        CHECK(moe_model_forward(a, tok, NULL, 2, 8, NULL) == 0);
        CHECK(moe_model_forward(b, tok, NULL, 2, 8, NULL) == 0);
        CHECK(memcmp(moe_model_logits(a), moe_model_logits(b), sizeof(float) * 16 * 40) == 0);
    }
    /* a checkpoint whose config disagrees with its weights is refused */
    char path[512];
    snprintf(path, sizeof path, "%s/config.json", dir);
    c.hidden_size = 40, c.head_dim = 10;
    CHECK(moe_model_config_save(&c, path, err, sizeof err) == 0);
    moe_model *bad = NULL;
    int rc = moe_model_load(dir, 1, 8, 0, 1, &bad, err, sizeof err);
    CHECK_EQ_INT(rc, MOE_ESHAPE);
    CHECK(strstr(err, "model.safetensors") != NULL);
    CHECK(bad == NULL);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    unlink(path);
    CHECK(moe_model_load(dir, 1, 8, 0, 1, &bad, err, sizeof err) == MOE_EIO);
    moe_model_free(a);
    moe_model_free(b);
    moe_test_rmdir(dir);
}

/* Gradients of 2 accumulated micro-batches of 2 sequences equal those of one
 * batch of 4 (same windows). The routers' aux losses are per micro-batch
 * statistics, so they are switched off here; parameters are not compared
 * because Adam's first step is about +-lr whatever the gradient's size. */
TEST(train_accumulation_equals_larger_batch) {
    moe_model_config c;
    char msg[256];
    int32_t *tr = make_stream(4000, 5);
    CHECK(moe_model_config_parse(TINY, strlen(TINY), "tiny", &c, msg, sizeof msg) == 0);
    c.router_aux_loss_coef = 0, c.router_z_loss_coef = 0;
    moe_train_config a = tiny_train(), b = tiny_train();
    a.batch = 4, a.grad_accum = 1;
    b.batch = 2, b.grad_accum = 2;
    moe_model *ma = moe_model_create(&c, 4, 16, 1, 2, NULL, msg, sizeof msg);
    moe_model *mb = moe_model_create(&c, 4, 16, 1, 2, NULL, msg, sizeof msg);
    CHECK(ma && mb);
    if (!ma || !mb) return;
    moe_model_init(ma, 4), moe_model_init(mb, 4);
    moe_trainer *ta = moe_trainer_create(ma, &a, tr, 4000, NULL, 0, NULL, NULL, 0);
    moe_trainer *tb = moe_trainer_create(mb, &b, tr, 4000, NULL, 0, NULL, NULL, 0);
    CHECK(ta && tb);
    moe_train_step_info sa, sb;
    CHECK(moe_trainer_step(ta, &sa) == 0 && moe_trainer_step(tb, &sb) == 0);
    CHECK_CLOSE(sa.ce, sb.ce, 1e-6, 1e-5);
    CHECK_CLOSE(sa.grad_norm, sb.grad_norm, 1e-7, 1e-5);
    double d = 0, r = 0;
    const float *ga = moe_model_grads(ma), *gb = moe_model_grads(mb);
    for (size_t i = 0; i < moe_model_n_params(ma); i++) d = fmax(d, fabs(ga[i] - gb[i])), r = fmax(r, fabs(ga[i]));
    CHECK_MSG(d < 1e-5 * r, "gradients differ by %g (max %g)", d, r);
    moe_trainer_free(ta), moe_trainer_free(tb);
    moe_model_free(ma), moe_model_free(mb);
    free(tr);
}

TEST(adamw_schedule_warmup_cosine) {
    moe_adamw_config c = moe_adamw_config_default();
    c.lr = 1.0f, c.min_lr = 0.1f, c.warmup_steps = 10, c.max_steps = 110;
    CHECK_CLOSE(moe_adamw_lr(&c, 0), 0.1, 1e-7, 0);
    CHECK_CLOSE(moe_adamw_lr(&c, 9), 1.0, 1e-7, 0);
    CHECK_CLOSE(moe_adamw_lr(&c, 10), 1.0, 1e-7, 0);
    CHECK_CLOSE(moe_adamw_lr(&c, 60), 0.55, 1e-6, 0);
    CHECK_CLOSE(moe_adamw_lr(&c, 110), 0.1, 1e-7, 0);
    CHECK_CLOSE(moe_adamw_lr(&c, 500), 0.1, 1e-7, 0);
}
