/* The experiments (docs/experiments.md): the capacity family's parameter
 * accounting against hand-derived formulas, the balancing methods' settings,
 * the routing summary on hand-made counts, one in-process run on a
 * synthetic token stream, and both `moe experiment` commands end to end in
 * their CI size (Brown and build/moe needed; skipped without them). */
#include "test.h"

#include "moe.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const int FAMILY[] = {0, 4, 8, 16, 32, 64};

/* The family differs only in the FFN: per layer, dense has 3 C (K F) weights;
 * an E-expert layer has the router E C plus E experts of 3 C F, of which a
 * token runs K. So total(E) - total(dense) = L (E C + (E - K) 3 C F) and
 * active(E) - active(dense) = L E C exactly. */
TEST(experiment_family_equal_active_params) {
    const char *const *bases = moe_experiment_bases();
    int nb = 0;
    for (; bases[nb]; nb++) {
        moe_model_config d;
        CHECK_EQ_INT(moe_experiment_model(bases[nb], 0, &d), 0);
        d.vocab_size = 1000;
        char err[256];
        CHECK_MSG(moe_model_config_check(&d, err, sizeof err) == 0, "%s", err);
        CHECK_EQ_INT(d.num_local_experts, 0);
        CHECK_EQ_INT(moe_model_n_moe_layers(&d), 0);
        const double L = d.num_hidden_layers, C = d.hidden_size, F = d.intermediate_size, K = 2;
        /* the dense FFN runs what an MoE token runs: K experts and the shared one */
        const int S = d.n_shared_experts * d.shared_expert_intermediate_size;
        CHECK_EQ_INT(d.dense_intermediate_size, 2 * d.intermediate_size + S);
        CHECK_EQ_INT(S, !strcmp(bases[nb], "exper") ? 384 : 0); /* exper keeps small's shared expert */
        const moe_model_costs kd = moe_model_config_costs(&d, 64);
        CHECK_CLOSE(kd.active_params, kd.total_params, 0, 0);
        double prev_total = kd.total_params;
        for (size_t i = 1; i < sizeof FAMILY / sizeof FAMILY[0]; i++) {
            moe_model_config c;
            const int E = FAMILY[i];
            CHECK_EQ_INT(moe_experiment_model(bases[nb], E, &c), 0);
            c.vocab_size = 1000;
            CHECK_MSG(moe_model_config_check(&c, err, sizeof err) == 0, "%s", err);
            CHECK_EQ_INT(c.num_local_experts, E);
            CHECK_EQ_INT(c.num_experts_per_tok, 2);
            CHECK_EQ_INT(c.n_shared_experts * c.shared_expert_intermediate_size, S);
            CHECK_EQ_INT(moe_model_n_moe_layers(&c), c.num_hidden_layers);
            const moe_model_costs k = moe_model_config_costs(&c, 64);
            CHECK_CLOSE(k.total_params - kd.total_params, L * (E * C + (E - K) * 3 * C * F), 0, 0);
            CHECK_CLOSE(k.active_params - kd.active_params, L * E * C, 0, 0);
            /* the router is a small share of the active parameters */
            CHECK(k.active_params / kd.active_params < 1.05);
            CHECK(k.total_params > prev_total);
            prev_total = k.total_params;
        }
    }
    CHECK(nb >= 2);
    moe_model_config c;
    CHECK_EQ_INT(moe_experiment_model("nope", 4, &c), MOE_ENOTFOUND);
    CHECK_EQ_INT(moe_experiment_model(NULL, 4, &c), MOE_ENOTFOUND);
    CHECK_EQ_INT(moe_experiment_model("tiny", -1, &c), MOE_EINVAL);
}

TEST(experiment_balance_methods) {
    static const struct {
        const char *name;
        moe_router_type router;
        moe_score score;
        float aux, z, imp, load, bias;
    } want[] = {
        {"none", MOE_ROUTER_NOISY_TOPK, MOE_SCORE_SOFTMAX, 0, 0, 0, 0, 0},
        {"importance", MOE_ROUTER_NOISY_TOPK, MOE_SCORE_SOFTMAX, 0, 0, 0.2f, 0, 0},
        {"load", MOE_ROUTER_NOISY_TOPK, MOE_SCORE_SOFTMAX, 0, 0, 0, 0.2f, 0},
        {"importance+load", MOE_ROUTER_NOISY_TOPK, MOE_SCORE_SOFTMAX, 0, 0, 0.1f, 0.1f, 0},
        {"none-topk", MOE_ROUTER_TOPK, MOE_SCORE_SOFTMAX, 0, 0, 0, 0, 0},
        {"switch", MOE_ROUTER_TOPK, MOE_SCORE_SOFTMAX, 0.01f, 0, 0, 0, 0},
        {"z-loss", MOE_ROUTER_TOPK, MOE_SCORE_SOFTMAX, 0, 0.001f, 0, 0, 0},
        {"loss-free", MOE_ROUTER_TOPK, MOE_SCORE_SIGMOID, 0, 0, 0, 0, 1e-3f},
    };
    const char *const *names = moe_experiment_balance_methods();
    int n = 0;
    while (names[n]) n++;
    CHECK_EQ_INT(n, (int)(sizeof want / sizeof want[0]));
    for (int i = 0; i < n && i < (int)(sizeof want / sizeof want[0]); i++) {
        CHECK(!strcmp(names[i], want[i].name));
        moe_model_config c;
        moe_experiment_model("tiny", 8, &c);
        /* start from everything switched on: the method must reset it */
        c.router_type = MOE_ROUTER_HIERARCHICAL;
        c.scoring_func = MOE_SCORE_SIGMOID;
        c.router_aux_loss_coef = c.router_z_loss_coef = c.router_importance_loss_coef = c.router_load_loss_coef = 9;
        c.router_bias_update_rate = 9;
        c.gshard_random = 1;
        CHECK_EQ_INT(moe_experiment_balance_method(want[i].name, &c), 0);
        CHECK_MSG(c.router_type == want[i].router && c.scoring_func == want[i].score, "%s: router %d score %d",
                  want[i].name, c.router_type, c.scoring_func);
        CHECK_CLOSE(c.router_aux_loss_coef, want[i].aux, 0, 0);
        CHECK_CLOSE(c.router_z_loss_coef, want[i].z, 0, 0);
        CHECK_CLOSE(c.router_importance_loss_coef, want[i].imp, 0, 0);
        CHECK_CLOSE(c.router_load_loss_coef, want[i].load, 0, 0);
        CHECK_CLOSE(c.router_bias_update_rate, want[i].bias, 0, 0);
        CHECK_EQ_INT(c.gshard_random, 0);
        char err[256];
        c.vocab_size = 1000;
        CHECK_MSG(moe_model_config_check(&c, err, sizeof err) == 0, "%s: %s", want[i].name, err);
    }
    moe_model_config c;
    moe_experiment_model("tiny", 8, &c);
    CHECK_EQ_INT(moe_experiment_balance_method("importance+loads", &c), MOE_ENOTFOUND);
    CHECK_EQ_INT(moe_experiment_balance_method(NULL, &c), MOE_ENOTFOUND);
}

/* Hand-made counts. Sample 1: E = 4, R = 8 pairs, counts {6,1,1,0};
 * capacity ceil(1.25 * 8 / 4) = 3, so 6 - 3 = 3 pairs overflow: 3/8.
 * Sample 2: counts {2,2,2,2}: nothing overflows. With factor 1.0 the
 * capacity of sample 1 is 2: 4/8 overflow. */
TEST(experiment_routing_summary_hand_values) {
    int c1[4] = {6, 1, 1, 0}, c2[4] = {2, 2, 2, 2};
    moe_layer_stats s1, s2;
    memset(&s1, 0, sizeof s1), memset(&s2, 0, sizeof s2);
    s1.n_slots = s2.n_slots = 8;
    s1.expert_count = c1, s2.expert_count = c2;
    s1.importance_cv = 0.2f, s2.importance_cv = 0.4f;
    s1.load_cv = 1.0f, s2.load_cv = 0.0f;
    s1.load_max_over_mean = 3.0f, s2.load_max_over_mean = 1.0f;
    s1.dropped_fraction = 0.25f, s2.dropped_fraction = 0.0f;
    moe_routing_summary r;
    memset(&r, 0, sizeof r);
    moe_routing_summary_add(&r, &s1, 4);
    CHECK_EQ_INT(r.n, 1);
    CHECK_CLOSE(r.overflow, 3.0 / 8, 1e-12, 0);
    moe_routing_summary_add(&r, &s2, 4);
    CHECK_EQ_INT(r.n, 2);
    CHECK_CLOSE(r.overflow, 3.0 / 16, 1e-12, 0);
    CHECK_CLOSE(r.importance_cv, 0.3, 1e-7, 0);
    CHECK_CLOSE(r.load_cv, 0.5, 1e-7, 0);
    CHECK_CLOSE(r.max_over_mean, 2.0, 1e-7, 0);
    CHECK_CLOSE(r.dropped_fraction, 0.125, 1e-7, 0);
    moe_routing_summary q;
    memset(&q, 0, sizeof q);
    q.ref_capacity_factor = 1.0f;
    moe_routing_summary_add(&q, &s1, 4);
    CHECK_CLOSE(q.overflow, 4.0 / 8, 1e-12, 0);
}

/* A learnable synthetic stream: token i+1 = (3 token_i + 1) mod V with a
 * little noise, so a model that learns anything beats the uniform ln V. */
static int32_t *synth(size_t n, int V, uint64_t seed) {
    int32_t *t = malloc(n * sizeof *t);
    uint64_t s = seed;
    t[0] = 1;
    for (size_t i = 1; i < n; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        t[i] = (s >> 60) == 0 ? (int32_t)((s >> 33) % V) : (3 * t[i - 1] + 1) % V;
    }
    return t;
}

TEST(experiment_run_in_process) {
    const int V = 64;
    const size_t NT = 20000, NV = 4000;
    int32_t *tr = synth(NT, V, 1), *va = synth(NV, V, 2);
    moe_experiment_opts o;
    memset(&o, 0, sizeof o);
    o.train.batch = 4, o.train.seq = 32, o.train.grad_accum = 2, o.train.eval_batches = 4, o.train.seed = 7;
    o.train.n_threads = 2;
    o.train.opt = moe_adamw_config_default();
    o.train.opt.max_steps = 20, o.train.opt.warmup_steps = 2;
    o.steps = 20, o.stats_steps = 5;
    char dir[64], err[512];
    CHECK(moe_test_tmpdir(dir, "exper") != NULL);
    moe_experiment_result r[3];
    for (int i = 0; i < 3; i++) {
        moe_model_config c;
        moe_experiment_model("tiny", i == 0 ? 0 : 8, &c);
        c.vocab_size = V;
        o.save_dir = i == 1 ? dir : NULL;
        int rc = moe_experiment_run(&c, &o, tr, NT, va, NV, &r[i], err, sizeof err);
        CHECK_MSG(rc == 0, "%s", err);
        if (rc) goto out;
        CHECK(isfinite(r[i].val_loss));
        printf("    E=%d: val loss %.3f (ln V %.3f)\n", i ? 8 : 0, r[i].val_loss, log(V));
        CHECK_MSG(r[i].val_loss < logf((float)V) - 0.5f, "val loss %.3f vs ln V %.3f", r[i].val_loss, log(V));
        CHECK_CLOSE(r[i].tokens, 20.0 * 4 * 32 * 2, 0, 0);
        CHECK(r[i].train_seconds > 0 && r[i].tokens_per_s > 0);
        CHECK(isfinite(r[i].train_loss) && r[i].train_loss > 0);
        const moe_model_costs k = moe_model_config_costs(&c, 32);
        CHECK_CLOSE(r[i].costs.total_params, k.total_params, 0, 0);
        /* stats: the last 5 steps x 2 MoE layers; none for dense */
        CHECK_EQ_INT(r[i].routing.n, i == 0 ? 0 : 5 * 2);
        if (i) {
            CHECK(r[i].routing.max_over_mean >= 1.0 && r[i].routing.max_over_mean <= 8.0);
            CHECK(r[i].routing.load_cv > 0 && r[i].routing.overflow >= 0 && r[i].routing.overflow < 1);
            CHECK_CLOSE(r[i].routing.dropped_fraction, 0, 0, 0); /* dropless */
        }
    }
    /* same seed, same data: bit-identical */
    CHECK(r[1].val_loss == r[2].val_loss && r[1].train_loss == r[2].train_loss);
    /* the saved model reloads and is the one trained */
    moe_model *m = NULL;
    int rc = moe_model_load(dir, 1, 32, 0, 1, &m, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (m) CHECK_EQ_INT(moe_model_get_config(m)->num_local_experts, 8);
    moe_model_free(m);
    o.steps = 0;
    moe_model_config c;
    moe_experiment_model("tiny", 8, &c);
    c.vocab_size = V;
    CHECK_EQ_INT(moe_experiment_run(&c, &o, tr, NT, va, NV, &r[0], err, sizeof err), MOE_EINVAL);
out:
    moe_test_rmdir(dir);
    free(tr), free(va);
}

/* ---- the CLI, end to end ---------------------------------------------------------- */

static cJSON *load_json(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    static char buf[1 << 20];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    return cJSON_Parse(buf);
}

static double num(const cJSON *row, const char *key) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(row, key);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

static int is_svg(const char *path) {
    FILE *f = fopen(path, "rb");
    char head[8] = {0};
    if (!f) return 0;
    size_t n = fread(head, 1, 4, f);
    fclose(f);
    return n == 4 && !memcmp(head, "<svg", 4);
}

static const char *const KEYS[] = {"experts", "total_params", "active_params", "flops_per_token", "tokens_per_s",
                                   "train_loss", "val_loss", "val_perplexity", "cv_importance", "cv_load",
                                   "max_over_mean_load", "dropped_fraction", "overflow_at_ref_capacity", "router"};

/* the CLI under test: build/moe, or $MOE_CLI (e.g. a mutated build) */
static const char *cli_path(void) {
    const char *p = getenv("MOE_CLI");
    return p && *p ? p : "./build/moe";
}

static int cli_ready(void) {
    if (access(cli_path(), X_OK) != 0) {
        moe_test_skip("no build/moe (make all)");
        return 0;
    }
    if (access("data/brown", R_OK) != 0) {
        moe_test_skip("no Brown corpus in data/brown (make data)");
        return 0;
    }
    return 1;
}

TEST(experiment_cli_capacity_quick_tiny) {
    if (!cli_ready()) return;
    char dir[64], cmd[512], path[256];
    CHECK(moe_test_tmpdir(dir, "expcap") != NULL);
    snprintf(cmd, sizeof cmd,
             "%s experiment capacity --quick --preset-base tiny --vocab 512 --eval-batches 4 --quiet "
             "--out %s > %s/stdout.txt 2>&1",
             cli_path(), dir, dir);
    int rc = system(cmd);
    CHECK_MSG(rc == 0, "%s: exit %d", cmd, rc);
    snprintf(path, sizeof path, "%s/capacity.json", dir);
    cJSON *j = load_json(path);
    CHECK_MSG(j != NULL, "%s does not parse", path);
    const cJSON *rows = j ? cJSON_GetObjectItemCaseSensitive(j, "rows") : NULL;
    CHECK_EQ_INT(cJSON_GetArraySize(rows), 6); /* dense + E = 4, 8, 16, 32, 64 */
    const cJSON *dense = cJSON_GetArrayItem(rows, 0), *row;
    const double C = 64, L = 2, dense_active = num(dense, "active_params");
    double prev_total = 0;
    int i = 0;
    cJSON_ArrayForEach(row, rows) {
        for (size_t k = 0; k < sizeof KEYS / sizeof KEYS[0]; k++)
            CHECK_MSG(cJSON_GetObjectItemCaseSensitive(row, KEYS[k]) != NULL, "row %d lacks \"%s\"", i, KEYS[k]);
        const double E = num(row, "experts");
        CHECK_CLOSE(E, FAMILY[i], 0, 0);
        /* equal active parameters but for the router: E C per layer */
        CHECK_CLOSE(num(row, "active_params") - dense_active, L * E * C, 0, 0);
        CHECK(num(row, "total_params") > prev_total);
        prev_total = num(row, "total_params");
        CHECK(isfinite(num(row, "val_perplexity")) && num(row, "val_perplexity") > 1);
        CHECK_CLOSE(num(row, "val_perplexity"), exp(num(row, "val_loss")), 0, 1e-9);
        CHECK(num(row, "tokens_per_s") > 0);
        if (i > 0) CHECK(num(row, "max_over_mean_load") >= 1);
        i++;
    }
    cJSON_Delete(j);
    snprintf(path, sizeof path, "%s/capacity_ppl.svg", dir);
    CHECK_MSG(is_svg(path), "%s", path);
    snprintf(path, sizeof path, "%s/capacity_speed.svg", dir);
    CHECK_MSG(is_svg(path), "%s", path);
    snprintf(path, sizeof path, "%s/capacity.md", dir);
    CHECK(access(path, R_OK) == 0);
    moe_test_rmdir(dir);
}

TEST(experiment_cli_balance_quick_tiny) {
    if (!cli_ready()) return;
    char dir[64], cmd[512], path[256];
    CHECK(moe_test_tmpdir(dir, "expbal") != NULL);
    /* capacity on, so the dropped column has values */
    snprintf(cmd, sizeof cmd,
             "%s experiment balance --quick --preset-base tiny --vocab 512 --eval-batches 4 --quiet "
             "--capacity-factor 1.0 --out %s > %s/stdout.txt 2>&1",
             cli_path(), dir, dir);
    int rc = system(cmd);
    CHECK_MSG(rc == 0, "%s: exit %d", cmd, rc);
    snprintf(path, sizeof path, "%s/balance.json", dir);
    cJSON *j = load_json(path);
    CHECK_MSG(j != NULL, "%s does not parse", path);
    const cJSON *rows = j ? cJSON_GetObjectItemCaseSensitive(j, "rows") : NULL, *row;
    const char *const *methods = moe_experiment_balance_methods();
    int i = 0, any_drop = 0;
    cJSON_ArrayForEach(row, rows) {
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(row, "method");
        CHECK_MSG(cJSON_IsString(m) && methods[i] && !strcmp(m->valuestring, methods[i]), "row %d", i);
        for (size_t k = 0; k < sizeof KEYS / sizeof KEYS[0]; k++)
            CHECK_MSG(cJSON_GetObjectItemCaseSensitive(row, KEYS[k]) != NULL, "row %d lacks \"%s\"", i, KEYS[k]);
        CHECK(isfinite(num(row, "val_perplexity")));
        CHECK(num(row, "max_over_mean_load") >= 1 && num(row, "cv_load") >= 0 && num(row, "cv_importance") >= 0);
        const double d = num(row, "dropped_fraction"), o = num(row, "overflow_at_ref_capacity");
        CHECK(d >= 0 && d < 1 && o >= 0 && o < 1);
        /* the same counts, a smaller capacity (1.0 < 1.25): at least as many drops */
        CHECK_MSG(d >= o - 1e-9, "%s: dropped %g < overflow %g", methods[i] ? methods[i] : "?", d, o);
        any_drop |= d > 0;
        i++;
    }
    CHECK_EQ_INT(i, 8);
    CHECK(any_drop);
    cJSON_Delete(j);
    moe_test_rmdir(dir);
}

/* Log-x axes label 1-2-5 ticks with K/M suffixes when the data span under
 * three decades (a tick per decade would leave one label or none). */
static int svg_has(const char *path, const char *needle) {
    static char buf[1 << 16];
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    return strstr(buf, needle) != NULL;
}

TEST(experiment_plot_log_x_ticks) {
    char dir[64], path[128], err[256];
    CHECK(moe_test_tmpdir(dir, "plot") != NULL);
    snprintf(path, sizeof path, "%s/p.svg", dir);
    const double e[5] = {4, 8, 16, 32, 64}, p[5] = {230e3, 450e3, 900e3, 1.3e6, 2.5e6}, y[5] = {0.5, 0.4, 0.3, 0.2, 0.1}; /* y ticks must not look like x ticks */
    moe_plot_series s = {"s", e, y, 5, 1};
    CHECK_EQ_INT(moe_plot_svg(path, "t", "x", "y", &s, 1, 1, err, sizeof err), 0);
    CHECK(svg_has(path, ">5</text>") && svg_has(path, ">10</text>") && svg_has(path, ">20</text>") &&
          svg_has(path, ">50</text>"));
    CHECK(!svg_has(path, ">2</text>") && !svg_has(path, ">100</text>")); /* outside the data */
    s.x = p;
    CHECK_EQ_INT(moe_plot_svg(path, "t", "x", "y", &s, 1, 1, err, sizeof err), 0);
    CHECK(svg_has(path, ">500K</text>") && svg_has(path, ">1M</text>") && svg_has(path, ">2M</text>"));
    CHECK(!svg_has(path, "e+0"));
    moe_test_rmdir(dir);
}
