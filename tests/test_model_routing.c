/* Routing schemes at the model level: config keys, the balancer's bias as a
 * saved tensor, and the refusal to decode with a non-causal router. */
#include "test.h"

#include "moe.h"

#include <stdlib.h>
#include <string.h>

static const char *BASE =
    "{\"vocab_size\": 40, \"hidden_size\": 16, \"intermediate_size\": 12, \"num_hidden_layers\": 2,"
    " \"num_attention_heads\": 2, \"max_position_embeddings\": 8, \"num_local_experts\": 4,"
    " \"num_experts_per_tok\": 2, \"initializer_range\": 0.2";

static int parse(const char *extra, moe_model_config *c, char *err, size_t errsz) {
    char json[1024];
    snprintf(json, sizeof json, "%s%s%s}", BASE, *extra ? ", " : "", extra);
    return moe_model_config_parse(json, strlen(json), "cfg.json", c, err, errsz);
}

TEST(model_routing_config_keys_roundtrip_and_errors) {
    moe_model_config c, d;
    char err[256];
    CHECK_MSG(parse("\"router_type\": \"hierarchical\", \"n_group\": 2, \"topk_group\": 1, "
                    "\"router_importance_loss_coef\": 0.1, \"router_load_loss_coef\": 0.2, \"router_seed\": 9",
                    &c, err, sizeof err) == 0,
              "%s", err);
    CHECK_EQ_INT(c.router_type, MOE_ROUTER_HIERARCHICAL);
    CHECK_EQ_INT(c.n_group, 2);
    CHECK_EQ_INT(c.router_seed, 9);
    char *js = moe_model_config_to_json(&c);
    CHECK(js && moe_model_config_parse(js, strlen(js), "rt", &d, err, sizeof err) == 0);
    CHECK(memcmp(&c, &d, sizeof c) == 0);
    free(js);
    /* bad values name the file and the problem */
    CHECK_EQ_INT(parse("\"router_type\": \"sinkhorn\"", &c, err, sizeof err), MOE_EFORMAT);
    CHECK(strstr(err, "cfg.json") && strstr(err, "router_type"));
    CHECK_EQ_INT(parse("\"router_load_loss_coef\": 0.1", &c, err, sizeof err), MOE_EINVAL); /* needs noise */
    CHECK(strstr(err, "load_coef") != NULL);
    CHECK_EQ_INT(parse("\"n_group\": 3, \"topk_group\": 1", &c, err, sizeof err), MOE_EINVAL); /* 3 does not divide 4 */
    CHECK_EQ_INT(parse("\"shared_expert_gate\": true", &c, err, sizeof err), MOE_EINVAL); /* no shared expert */
    CHECK_EQ_INT(parse("\"gshard_random\": true, \"router_type\": \"expert_choice\"", &c, err, sizeof err), MOE_EINVAL);
}

TEST(model_expert_choice_refuses_decoding) {
    moe_model_config c;
    char err[256];
    CHECK(parse("\"router_type\": \"expert_choice\"", &c, err, sizeof err) == 0);
    int rc;
    moe_model *m = moe_model_create(&c, 2, 8, 1, 2, &rc, err, sizeof err);
    CHECK_MSG(m != NULL, "%s", err);
    if (!m) return;
    moe_model_init(m, 1);
    int32_t tok[16], tgt[16];
    for (int i = 0; i < 16; i++) tok[i] = i % 40, tgt[i] = (i + 1) % 40;
    float loss;
    CHECK(moe_model_forward(m, tok, tgt, 2, 8, &loss) == 0 && moe_model_backward(m) == 0); /* training works */
    CHECK_EQ_INT(moe_model_decode_reset(m), MOE_EUNSUPPORTED);
    CHECK(strstr(moe_model_errmsg(m), "non-causal") != NULL);
    CHECK_EQ_INT(moe_model_decode(m, 1, NULL), MOE_EUNSUPPORTED);
    moe_model_free(m);
}

/* The bias is moved by the balancer only (no gradient, no AdamW), and it is
 * saved and loaded with the weights under DeepSeek-V3's tensor name. */
TEST(model_bias_balancer_state_is_saved) {
    moe_model_config c;
    char err[256], dir[64];
    CHECK(parse("\"scoring_func\": \"sigmoid\", \"router_bias_update_rate\": 0.5", &c, err, sizeof err) == 0);
    int rc;
    moe_model *m = moe_model_create(&c, 2, 8, 1, 2, &rc, err, sizeof err);
    CHECK_MSG(m != NULL, "%s", err);
    if (!m) return;
    moe_model_init(m, 1);
    const moe_param_info *b = moe_model_find_tensor(m, "model.layers.1.block_sparse_moe.gate.e_score_correction_bias");
    CHECK(b != NULL && b->numel == 4 && !b->decay);
    if (!b) return;
    int32_t tok[16], tgt[16];
    for (int i = 0; i < 16; i++) tok[i] = (i * 7) % 40, tgt[i] = (i + 3) % 40;
    float loss;
    moe_model_zero_grad(m);
    CHECK(moe_model_forward(m, tok, tgt, 2, 8, &loss) == 0 && moe_model_backward(m) == 0);
    const float *g = moe_model_grads(m) + b->offset, *p = moe_model_params(m) + b->offset;
    for (int e = 0; e < 4; e++) CHECK(g[e] == 0.0f);
    CHECK(moe_model_update_bias(m) == 0);
    /* loads of 32 slots over 4 experts: each bias moved by exactly +-0.5 or 0,
     * overloaded experts down, underloaded up */
    const int *cnt = moe_model_layer_stats(m, 1)->expert_count;
    float sum = 0;
    for (int e = 0; e < 4; e++) {
        const float want = cnt[e] < 8 ? 0.5f : cnt[e] > 8 ? -0.5f : 0.0f;
        CHECK_MSG(p[e] == want, "expert %d: count %d, bias %g, want %g", e, cnt[e], (double)p[e], (double)want);
        sum += p[e] != 0;
    }
    CHECK(sum > 0); /* the test data is not already balanced */
    float saved[4];
    memcpy(saved, p, sizeof saved);
    CHECK(moe_test_tmpdir(dir, "bias") != NULL);
    CHECK_MSG(moe_model_save(m, dir, err, sizeof err) == 0, "%s", err);
    moe_model_free(m);
    CHECK_MSG(moe_model_load(dir, 2, 8, 0, 2, &m, err, sizeof err) == 0, "%s", err);
    if (m) {
        const moe_param_info *b2 =
            moe_model_find_tensor(m, "model.layers.1.block_sparse_moe.gate.e_score_correction_bias");
        CHECK(b2 && memcmp(moe_model_params(m) + b2->offset, saved, sizeof saved) == 0);
        moe_model_free(m);
    }
    moe_test_rmdir(dir);
}

/* The model card's parameter count includes every scheme's extra gates. */
TEST(model_routing_costs_count_every_tensor) {
    const char *variants[] = {
        "\"router_type\": \"noisy_topk\"",
        "\"router_type\": \"hierarchical\", \"n_group\": 2, \"topk_group\": 1",
        "\"scoring_func\": \"sigmoid\", \"router_bias_update_rate\": 0.001",
        "\"n_shared_experts\": 1, \"shared_expert_intermediate_size\": 8, \"shared_expert_gate\": true",
    };
    for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++) {
        moe_model_config c;
        char err[256];
        CHECK_MSG(parse(variants[i], &c, err, sizeof err) == 0, "%s", err);
        moe_model *m = moe_model_create(&c, 1, 8, 0, 1, NULL, err, sizeof err);
        CHECK_MSG(m != NULL, "%s", err);
        if (!m) continue;
        const moe_model_costs k = moe_model_config_costs(&c, 8);
        CHECK_MSG(k.total_params == (double)moe_model_n_params(m), "%s: card %.0f, model %zu", variants[i],
                  k.total_params, moe_model_n_params(m));
        moe_model_free(m);
    }
}
