/* Expert parallelism in the single-process build (and P = 1 in any build):
 * the expert-parallel code path with a communicator of one rank must give
 * the plain layer's and model's bits, and unsupported schemes must be
 * refused at creation. The multi-rank tests live in tests/mpi (make test-mpi). */
#include "test.h"

#include <moe.h>

#include <stdlib.h>
#include <string.h>

static void fill(float *v, size_t n, uint64_t s) {
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        v[i] = (float)((s >> 40) * 0x1.0p-24 * 2.0 - 1.0);
    }
}

/* The plain layer and the expert-parallel one on one rank, two steps. */
static void one_rank_alike(moe_dist *d, moe_layer_config c) {
    int err;
    char msg[256];
    moe_layer *a = moe_layer_create(&c, &err, msg, sizeof msg), *b = moe_layer_create_ep(&c, d, &err, msg, sizeof msg);
    CHECK_MSG(a && b, "%s", msg);
    if (!a || !b) return;
    moe_layer_init(a, 3, 1.0f);
    moe_layer_init(b, 3, 1.0f);
    const size_t C = 16, N = 50, total = moe_layer_param_offsets(a).total;
    CHECK_EQ_INT(moe_layer_param_offsets(b).total, total);
    float x[50 * 16], dy[50 * 16], ya[50 * 16], yb[50 * 16], dxa[50 * 16], dxb[50 * 16];
    for (int it = 0; it < 2; it++) {
        fill(x, N * C, 11 + it), fill(dy, N * C, 21 + it);
        CHECK_EQ_INT(moe_layer_forward(a, x, (int)N, ya), 0);
        CHECK_EQ_INT(moe_layer_forward(b, x, (int)N, yb), 0);
        CHECK_EQ_INT(moe_layer_backward(a, dy, dxa), 0);
        CHECK_EQ_INT(moe_layer_backward(b, dy, dxb), 0);
        CHECK(!memcmp(ya, yb, sizeof ya));
        CHECK(!memcmp(dxa, dxb, sizeof dxa));
        CHECK(!memcmp(moe_layer_grads_ptr(a), moe_layer_grads_ptr(b), sizeof(float) * total));
        const moe_layer_stats *sa = moe_layer_get_stats(a), *sb = moe_layer_get_stats(b);
        CHECK(sa->aux_loss == sb->aux_loss && sa->z_loss == sb->z_loss && sa->importance_loss == sb->importance_loss);
        CHECK_EQ_INT(sb->n_tokens, 50);
        CHECK(sa->capacity == sb->capacity && sa->dropped_fraction == sb->dropped_fraction);
        if (c.capacity_factor > 0) CHECK_MSG(sa->dropped_fraction > 0, "no drops at capacity %d", sa->capacity);
        moe_layer_update_bias(a);
        moe_layer_update_bias(b);
        CHECK(!memcmp(moe_layer_params_ptr(a), moe_layer_params_ptr(b), sizeof(float) * total));
    }
    int first, cnt;
    moe_layer_expert_range(b, &first, &cnt);
    CHECK(first == 0 && cnt == 8);
    /* zero tokens: a valid call */
    CHECK_EQ_INT(moe_layer_forward(b, x, 0, yb), 0);
    moe_layer_free(a);
    moe_layer_free(b);
}

TEST(dist_ep_layer_one_rank_is_bit_identical) {
    int err;
    char msg[256];
    if (moe_dist_is_mpi()) return; /* MPI builds: tests/mpi covers P = 1, 2, 4 */
    moe_dist *d = moe_dist_world(&err, msg, sizeof msg);
    CHECK_MSG(d != NULL && moe_dist_size(d) == 1, "%s", msg);
    if (!d) return;
    moe_layer_config c = moe_layer_config_default(16, 24, 8, 2, 50);
    c.importance_coef = 0.05f, c.bias_update_rate = 0.01f, c.n_threads = 1;
    one_rank_alike(d, c);
    /* capacity limits, both drop policies (the expert-parallel drop code) */
    c.capacity_factor = 1.0f;
    one_rank_alike(d, c);
    c.drop_policy = MOE_DROP_PROBABILITY;
    one_rank_alike(d, c);
    c.capacity_factor = 0, c.drop_policy = MOE_DROP_ARRIVAL;

    /* refused under expert parallelism, at creation */
    c.bias_update_rate = 0;
    c.router = MOE_ROUTER_EXPERT_CHOICE; /* the expert-parallel selection on one rank */
    one_rank_alike(d, c);
    c.router = MOE_ROUTER_BALANCED;
    one_rank_alike(d, c);
    c.router = MOE_ROUTER_HIERARCHICAL, c.n_groups = 2, c.topk_groups = 1;
    one_rank_alike(d, c);
    c.load_coef = 0.01f; /* hierarchical's smooth load estimator is not done */
    CHECK(!moe_layer_create_ep(&c, d, &err, msg, sizeof msg) && err == MOE_EUNSUPPORTED);
    c.router = MOE_ROUTER_NOISY_TOPK, c.n_groups = 0, c.topk_groups = 0, c.load_coef = 0.1f; /* noisy top-k's is */
    one_rank_alike(d, c);
    c.router = MOE_ROUTER_TOPK, c.load_coef = 0, c.aux_seq_len = 10; /* the sequence-wise aux loss */
    one_rank_alike(d, c);
    moe_dist_free(d);
}

TEST(dist_ep_model_one_rank_trains_alike) {
    int err;
    char msg[256];
    if (moe_dist_is_mpi()) return;
    moe_dist *d = moe_dist_world(&err, msg, sizeof msg);
    CHECK_MSG(d != NULL && moe_dist_size(d) == 1, "%s", msg);
    if (!d) return;
    moe_model_config c;
    moe_model_preset("tiny", &c);
    c.vocab_size = 32;
    int32_t tok[3000];
    for (int i = 0; i < 3000; i++) tok[i] = (i * 5 + i / 7) % 32;
    moe_model *m[2];
    moe_trainer *t[2];
    moe_train_config tc;
    memset(&tc, 0, sizeof tc);
    tc.batch = 2, tc.seq = 16, tc.grad_accum = 1, tc.eval_batches = 1, tc.seed = 3, tc.n_threads = 1;
    tc.opt = moe_adamw_config_default();
    tc.opt.max_steps = 5;
    for (int k = 0; k < 2; k++) {
        moe_set_dist(k ? d : NULL); /* the second model runs the distributed path */
        m[k] = moe_model_create(&c, 2, 16, 1, 1, &err, msg, sizeof msg);
        moe_set_dist(NULL);
        CHECK_MSG(m[k] != NULL, "%s", msg);
        if (!m[k]) return;
        moe_model_init(m[k], 9);
        t[k] = moe_trainer_create(m[k], &tc, tok, 2500, tok + 2500, 500, &err, msg, sizeof msg);
        CHECK_MSG(t[k] != NULL, "%s", msg);
        if (!t[k]) return;
    }
    for (int s = 0; s < 5; s++) {
        moe_train_step_info i0, i1;
        CHECK_EQ_INT(moe_trainer_step(t[0], &i0), 0);
        CHECK_EQ_INT(moe_trainer_step(t[1], &i1), 0);
        CHECK_MSG(i0.loss == i1.loss, "step %d: loss %.9g vs %.9g", s, i0.loss, i1.loss);
        /* the norm is summed in another order (replicated part, then experts) */
        CHECK_CLOSE(i1.grad_norm, i0.grad_norm, 0, 1e-6);
    }
    const size_t n = moe_model_n_params(m[0]);
    CHECK_EQ_INT(moe_model_n_params(m[1]), n);
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        const double dd = fabs((double)moe_model_params(m[0])[i] - moe_model_params(m[1])[i]);
        if (dd > worst) worst = dd;
    }
    CHECK_MSG(worst < 1e-6, "parameters differ by %g after 5 steps", worst);
    for (int k = 0; k < 2; k++) moe_trainer_free(t[k]), moe_model_free(m[k]);
    moe_dist_free(d);
}
