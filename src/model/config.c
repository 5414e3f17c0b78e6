/* config.json of a model: Hugging Face Mixtral keys (docs/model.md), read as
 * hostile input (every key type- and range-checked, errors name the file and
 * the key), written atomically. */
#include "internal.h"
#include "io/atomic.h"

#include <cjson/cJSON.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_CONFIG_BYTES (1 << 20)
#define MAX_DIM (1 << 16)
#define MAX_VOCAB (1 << 22)
/* Whole-model caps: without them a few hundred bytes of config.json within
 * every per-key range (65536 experts x 256 layers) make a loader build a table
 * of 50 million tensors (7.6 GB) before it reads a byte of weights. A model
 * past either cap could not be stored as safetensors (1 << 20 tensors) or
 * held in memory anyway. */
#define MAX_MODEL_TENSORS (1 << 20)
#define MAX_MODEL_PARAMS ((double)(1ULL << 40))

void moe_model_config_defaults(moe_model_config *c) {
    memset(c, 0, sizeof *c);
    c->vocab_size = 4096;
    c->rope_theta = 10000.0f;
    c->rms_norm_eps = 1e-5f;
    c->num_experts_per_tok = 2;
    c->norm_topk_prob = 1;
    c->scoring_func = MOE_SCORE_SOFTMAX;
    c->routed_scaling_factor = 1.0f;
    c->router_aux_loss_coef = 0.01f;
    c->router_z_loss_coef = 0.001f;
    c->initializer_range = 0.02f;
    /* 0 below means "derive" (see finish()) */
    c->num_key_value_heads = 0;
    c->head_dim = 0;
    c->dense_intermediate_size = 0;
    c->shared_expert_intermediate_size = 0;
    for (int l = 0; l < MOE_MAX_LAYERS; l++) c->is_moe_layer[l] = 1;
}

int moe_model_n_moe_layers(const moe_model_config *c) {
    if (c->num_local_experts <= 0) return 0;
    int n = 0;
    for (int l = 0; l < c->num_hidden_layers && l < MOE_MAX_LAYERS; l++) n += c->is_moe_layer[l] != 0;
    return n;
}

/* Fills the derived defaults (head_dim, kv heads, dense/shared FFN sizes). */
static void finish(moe_model_config *c) {
    if (c->num_key_value_heads == 0) c->num_key_value_heads = c->num_attention_heads;
    if (c->head_dim == 0 && c->num_attention_heads > 0) c->head_dim = c->hidden_size / c->num_attention_heads;
    if (c->dense_intermediate_size == 0) { /* K F, in 64 bits: the factors are not range-checked yet */
        const long long kf = (long long)c->num_experts_per_tok * c->intermediate_size;
        c->dense_intermediate_size = c->num_local_experts <= 0 ? c->intermediate_size
                                     : kf > INT_MAX              ? INT_MAX
                                     : kf < INT_MIN              ? INT_MIN
                                                                 : (int)kf;
    }
    if (c->shared_expert_intermediate_size == 0) c->shared_expert_intermediate_size = c->intermediate_size;
    /* flags past the last layer carry no meaning: keep them 0 so configs compare */
    for (int l = 0; l < MOE_MAX_LAYERS; l++)
        if (c->num_local_experts == 0 || l >= c->num_hidden_layers) c->is_moe_layer[l] = 0;
}

int moe_model_config_check(const moe_model_config *c, char *err, size_t n) {
#define RANGE(field, lo, hi)                                                                        \
    if (c->field < (lo) || c->field > (hi))                                                         \
        return moe__set_err(err, n, MOE_EINVAL, "config: %s = %d: must be in [%d, %d]", #field,      \
                            (int)c->field, (int)(lo), (int)(hi));
    RANGE(vocab_size, 2, MAX_VOCAB)
    RANGE(hidden_size, 1, MAX_DIM)
    RANGE(num_hidden_layers, 1, MOE_MAX_LAYERS)
    RANGE(num_attention_heads, 1, 1024)
    RANGE(num_key_value_heads, 1, c->num_attention_heads)
    RANGE(head_dim, 2, 1024)
    RANGE(max_position_embeddings, 1, 1 << 20)
    RANGE(num_local_experts, 0, 1 << 16)
    if (c->num_local_experts > 0) { /* before the dense size derived from them */
        RANGE(intermediate_size, 1, 1 << 20)
        RANGE(num_experts_per_tok, 1, c->num_local_experts)
    }
    RANGE(dense_intermediate_size, 1, 1 << 20)
    RANGE(n_shared_experts, 0, 64)
    RANGE(tie_word_embeddings, 0, 1)
    RANGE(norm_topk_prob, 0, 1)
    RANGE(shared_expert_gate, 0, 1)
    RANGE(gshard_random, 0, 1)
    RANGE(seq_aux, 0, 1)
    RANGE(n_group, 0, 1 << 16)
    RANGE(topk_group, 0, 1 << 16)
    if (c->n_shared_experts > 0) {
        RANGE(shared_expert_intermediate_size, 1, 1 << 20)
    }
#undef RANGE
    if (c->num_attention_heads % c->num_key_value_heads != 0)
        return moe__set_err(err, n, MOE_EINVAL,
                            "config: num_attention_heads = %d is not a multiple of num_key_value_heads = %d",
                            c->num_attention_heads, c->num_key_value_heads);
    if (c->head_dim % 2 != 0)
        return moe__set_err(err, n, MOE_EINVAL, "config: head_dim = %d must be even (RoPE pairs)", c->head_dim);
    if ((unsigned)c->scoring_func > MOE_SCORE_SIGMOID)
        return moe__set_err(err, n, MOE_EINVAL, "config: unknown scoring_func");
    const float fl[] = {c->rope_theta, c->rms_norm_eps, c->routed_scaling_factor, c->initializer_range};
    const char *fn[] = {"rope_theta", "rms_norm_eps", "routed_scaling_factor", "initializer_range"};
    for (int i = 0; i < 4; i++)
        if (!isfinite(fl[i]) || fl[i] <= 0)
            return moe__set_err(err, n, MOE_EINVAL, "config: %s = %g: must be finite and > 0", fn[i], (double)fl[i]);
    if (!isfinite(c->capacity_factor) || c->capacity_factor < 0)
        return moe__set_err(err, n, MOE_EINVAL, "config: capacity_factor must be finite and >= 0 (0: dropless)");
    if (!isfinite(c->router_aux_loss_coef) || c->router_aux_loss_coef < 0 || !isfinite(c->router_z_loss_coef) ||
        c->router_z_loss_coef < 0)
        return moe__set_err(err, n, MOE_EINVAL, "config: router loss coefficients must be finite and >= 0");
    if (c->shared_expert_gate && c->n_shared_experts == 0)
        return moe__set_err(err, n, MOE_EINVAL, "config: shared_expert_gate needs n_shared_experts > 0");
    /* an upper bound of the model's tensor table (model.c build_table) */
    double tensors = 3;
    for (int l = 0; l < c->num_hidden_layers; l++)
        tensors += 6 + (c->num_local_experts > 0 && c->is_moe_layer[l] ? 3.0 * c->num_local_experts + 9 : 3);
    if (tensors > MAX_MODEL_TENSORS)
        return moe__set_err(err, n, MOE_ELIMIT,
                            "config: num_local_experts = %d over %d MoE layers: %.0f tensors, more than the limit "
                            "of %d", c->num_local_experts, moe_model_n_moe_layers(c), tensors, MAX_MODEL_TENSORS);
    const double params = moe_model_config_costs(c, 1).total_params;
    if (params > MAX_MODEL_PARAMS)
        return moe__set_err(err, n, MOE_ELIMIT, "config: %.4g parameters, more than the limit of %.4g", params,
                            MAX_MODEL_PARAMS);
    if (c->num_local_experts > 0) {
        /* the routing keys are checked where they are used: by the layer */
        char lerr[200];
        moe_layer_config lc = moe__model_layer_config(c, 0, 1, 1);
        int rc = moe__layer_config_check(&lc, lerr, sizeof lerr);
        if (rc) return moe__set_err(err, n, rc, "config: routing: %s", lerr);
    }
    return MOE_OK;
}

static const char *const ROUTER_NAMES[] = {"topk", "noisy_topk", "expert_choice", "hierarchical", "balanced"};

const char *moe_router_name(moe_router_type r) {
    return (unsigned)r < sizeof ROUTER_NAMES / sizeof ROUTER_NAMES[0] ? ROUTER_NAMES[r] : "unknown";
}

int moe_router_from_name(const char *name) {
    for (int i = 0; name && i < (int)(sizeof ROUTER_NAMES / sizeof ROUTER_NAMES[0]); i++)
        if (!strcmp(name, ROUTER_NAMES[i])) return i;
    return -1;
}

moe_layer_config moe__model_layer_config(const moe_model_config *c, int layer, int max_tokens, int training) {
    moe_layer_config lc = moe_layer_config_default(c->hidden_size, c->intermediate_size, c->num_local_experts,
                                                   c->num_experts_per_tok, max_tokens);
    const int n_moe = moe_model_n_moe_layers(c) > 0 ? moe_model_n_moe_layers(c) : 1;
    lc.score = c->scoring_func;
    lc.renormalize = c->norm_topk_prob;
    lc.route_scale = c->routed_scaling_factor;
    /* the losses are per layer; their sum over layers carries the coefficient */
    lc.aux_coef = c->router_aux_loss_coef / (float)n_moe;
    lc.z_coef = c->router_z_loss_coef / (float)n_moe;
    lc.importance_coef = c->router_importance_loss_coef / (float)n_moe;
    lc.load_coef = c->router_load_loss_coef / (float)n_moe;
    lc.max_top_k = training ? 0 : c->num_local_experts; /* inference may raise k */
    if (c->router_type == MOE_ROUTER_HIERARCHICAL) lc.max_top_k = 0; /* k is tied to the groups */
    lc.capacity_factor = c->capacity_factor;
    lc.drop_policy = c->drop_policy;
    lc.router = c->router_type;
    lc.gshard_random = c->gshard_random;
    lc.bias_update_rate = c->router_bias_update_rate;
    lc.n_groups = c->n_group;
    lc.topk_groups = c->topk_group;
    lc.aux_seq_len = c->seq_aux ? 1 : 0; /* blocks of 1..T: the model sets T per call */
    lc.seed = c->router_seed + (uint64_t)layer;
    return lc;
}

/* ---- JSON in ---------------------------------------------------------------- */

typedef struct {
    const char *name;
    char *err;
    size_t errsz;
} ctx;

static int get_int(const ctx *x, const cJSON *root, const char *key, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v || cJSON_IsNull(v)) return MOE_OK;
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || fabs(v->valuedouble) > 2147483647.0)
        return moe__set_err(x->err, x->errsz, MOE_EFORMAT, "%s: \"%s\" must be an integer", x->name, key);
    *out = (int)v->valuedouble;
    return MOE_OK;
}

static int get_float(const ctx *x, const cJSON *root, const char *key, float *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v || cJSON_IsNull(v)) return MOE_OK;
    if (!cJSON_IsNumber(v) || !isfinite(v->valuedouble) || fabs(v->valuedouble) > 3e38)
        return moe__set_err(x->err, x->errsz, MOE_EFORMAT, "%s: \"%s\" must be a finite number", x->name, key);
    *out = (float)v->valuedouble;
    return MOE_OK;
}

static int get_bool(const ctx *x, const cJSON *root, const char *key, int *out) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!v || cJSON_IsNull(v)) return MOE_OK;
    if (!cJSON_IsBool(v))
        return moe__set_err(x->err, x->errsz, MOE_EFORMAT, "%s: \"%s\" must be true or false", x->name, key);
    *out = cJSON_IsTrue(v);
    return MOE_OK;
}

int moe_model_config_parse(const char *json, size_t len, const char *name, moe_model_config *c, char *err,
                           size_t errsz) {
    ctx x = {name ? name : "config", err, errsz};
    moe_model_config_defaults(c);
    if (len > MAX_CONFIG_BYTES)
        return moe__set_err(err, errsz, MOE_ELIMIT, "%s: %zu bytes, more than %d", x.name, len, MAX_CONFIG_BYTES);
    moe__json_oom();
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root && moe__json_oom()) return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", x.name);
    if (!root) return moe__set_err(err, errsz, MOE_EFORMAT, "%s: not valid JSON", x.name);
    int rc = MOE_OK;
    if (!cJSON_IsObject(root)) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: the top level must be a JSON object", x.name);
        goto out;
    }
    struct {
        const char *key;
        int *field;
    } ints[] = {
        {"vocab_size", &c->vocab_size},
        {"hidden_size", &c->hidden_size},
        {"intermediate_size", &c->intermediate_size},
        {"num_hidden_layers", &c->num_hidden_layers},
        {"num_attention_heads", &c->num_attention_heads},
        {"num_key_value_heads", &c->num_key_value_heads},
        {"head_dim", &c->head_dim},
        {"max_position_embeddings", &c->max_position_embeddings},
        {"num_local_experts", &c->num_local_experts},
        {"num_experts_per_tok", &c->num_experts_per_tok},
        {"dense_intermediate_size", &c->dense_intermediate_size},
        {"n_shared_experts", &c->n_shared_experts},
        {"shared_expert_intermediate_size", &c->shared_expert_intermediate_size},
        {"n_group", &c->n_group},
        {"topk_group", &c->topk_group},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0] && !rc; i++) rc = get_int(&x, root, ints[i].key, ints[i].field);
    struct {
        const char *key;
        float *field;
    } fls[] = {
        {"rope_theta", &c->rope_theta},
        {"rms_norm_eps", &c->rms_norm_eps},
        {"routed_scaling_factor", &c->routed_scaling_factor},
        {"router_aux_loss_coef", &c->router_aux_loss_coef},
        {"router_z_loss_coef", &c->router_z_loss_coef},
        {"initializer_range", &c->initializer_range},
        {"capacity_factor", &c->capacity_factor},
        {"router_importance_loss_coef", &c->router_importance_loss_coef},
        {"router_load_loss_coef", &c->router_load_loss_coef},
        {"router_bias_update_rate", &c->router_bias_update_rate},
    };
    for (size_t i = 0; i < sizeof fls / sizeof fls[0] && !rc; i++) rc = get_float(&x, root, fls[i].key, fls[i].field);
    if (!rc) rc = get_bool(&x, root, "tie_word_embeddings", &c->tie_word_embeddings);
    if (!rc) rc = get_bool(&x, root, "norm_topk_prob", &c->norm_topk_prob);
    if (!rc) rc = get_bool(&x, root, "shared_expert_gate", &c->shared_expert_gate);
    if (!rc) rc = get_bool(&x, root, "gshard_random", &c->gshard_random);
    if (!rc) rc = get_bool(&x, root, "seq_aux", &c->seq_aux);
    if (rc) goto out;
    int seed = 0;
    if ((rc = get_int(&x, root, "router_seed", &seed))) goto out;
    if (seed < 0) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: \"router_seed\" must be >= 0", x.name);
        goto out;
    }
    c->router_seed = (uint64_t)seed;
    const cJSON *rt = cJSON_GetObjectItemCaseSensitive(root, "router_type");
    if (rt && !cJSON_IsNull(rt)) {
        const int r = cJSON_IsString(rt) ? moe_router_from_name(rt->valuestring) : -1;
        if (r < 0) {
            rc = moe__set_err(err, errsz, MOE_EFORMAT,
                              "%s: \"router_type\" must be one of \"topk\", \"noisy_topk\", \"expert_choice\", "
                              "\"hierarchical\", \"balanced\"",
                              x.name);
            goto out;
        }
        c->router_type = (moe_router_type)r;
    }

    const cJSON *sf = cJSON_GetObjectItemCaseSensitive(root, "scoring_func");
    if (sf && !cJSON_IsNull(sf)) {
        if (cJSON_IsString(sf) && !strcmp(sf->valuestring, "softmax")) c->scoring_func = MOE_SCORE_SOFTMAX;
        else if (cJSON_IsString(sf) && !strcmp(sf->valuestring, "sigmoid")) c->scoring_func = MOE_SCORE_SIGMOID;
        else {
            rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: \"scoring_func\" must be \"softmax\" or \"sigmoid\"",
                              x.name);
            goto out;
        }
    }
    const cJSON *dp = cJSON_GetObjectItemCaseSensitive(root, "drop_policy");
    if (dp && !cJSON_IsNull(dp)) {
        if (cJSON_IsString(dp) && !strcmp(dp->valuestring, "arrival")) c->drop_policy = MOE_DROP_ARRIVAL;
        else if (cJSON_IsString(dp) && !strcmp(dp->valuestring, "probability")) c->drop_policy = MOE_DROP_PROBABILITY;
        else {
            rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: \"drop_policy\" must be \"arrival\" or \"probability\"",
                              x.name);
            goto out;
        }
    }
    const cJSON *idx = cJSON_GetObjectItemCaseSensitive(root, "moe_layer_indices");
    if (idx && !cJSON_IsNull(idx)) {
        if (!cJSON_IsArray(idx)) {
            rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: \"moe_layer_indices\" must be an array", x.name);
            goto out;
        }
        memset(c->is_moe_layer, 0, sizeof c->is_moe_layer);
        const cJSON *it;
        cJSON_ArrayForEach(it, idx) {
            if (!cJSON_IsNumber(it) || it->valuedouble != floor(it->valuedouble) || it->valuedouble < 0 ||
                it->valuedouble >= MOE_MAX_LAYERS || it->valuedouble >= c->num_hidden_layers) {
                rc = moe__set_err(err, errsz, MOE_EFORMAT,
                                  "%s: \"moe_layer_indices\" holds %g, not a layer index in [0, %d)", x.name,
                                  cJSON_IsNumber(it) ? it->valuedouble : NAN, c->num_hidden_layers);
                goto out;
            }
            c->is_moe_layer[(int)it->valuedouble] = 1;
        }
    }
    finish(c);
    rc = moe_model_config_check(c, err, errsz);
    if (rc) {
        /* prefix the file name to the range message */
        char tmp[256];
        snprintf(tmp, sizeof tmp, "%s", err ? err : "");
        moe__set_err(err, errsz, rc, "%s: %s", x.name, tmp);
    }
out:
    cJSON_Delete(root);
    return rc;
}

int moe_model_config_load(const char *path, moe_model_config *c, char *err, size_t errsz) {
    char *buf;
    size_t len;
    int rc = moe__read_file(path, MAX_CONFIG_BYTES, &buf, &len, err, errsz);
    if (rc) return rc;
    rc = moe_model_config_parse(buf, len, path, c, err, errsz);
    moe__free(buf);
    return rc;
}

/* ---- JSON out ---------------------------------------------------------------- */

void moe__json_add(int *ok, cJSON *parent, const char *key, cJSON *item) {
    if (!item || !parent || !(key ? cJSON_AddItemToObject(parent, key, item) : cJSON_AddItemToArray(parent, item))) {
        cJSON_Delete(item);
        *ok = 0;
    }
}

char *moe_model_config_to_json(const moe_model_config *c) {
    cJSON *o = cJSON_CreateObject();
    if (!o) return NULL;
    int ok = 1;
#define NUM(key, v) moe__json_add(&ok, o, key, cJSON_CreateNumber((double)(v)))
#define STR(key, v) moe__json_add(&ok, o, key, cJSON_CreateString(v))
#define BOOL(key, v) moe__json_add(&ok, o, key, cJSON_CreateBool(v))
    cJSON *arch = cJSON_CreateArray();
    moe__json_add(&ok, arch, NULL, cJSON_CreateString("MixtralForCausalLM"));
    moe__json_add(&ok, o, "architectures", arch);
    STR("model_type", "mixtral");
    NUM("vocab_size", c->vocab_size);
    NUM("hidden_size", c->hidden_size);
    NUM("intermediate_size", c->intermediate_size);
    NUM("num_hidden_layers", c->num_hidden_layers);
    NUM("num_attention_heads", c->num_attention_heads);
    NUM("num_key_value_heads", c->num_key_value_heads);
    NUM("head_dim", c->head_dim);
    NUM("max_position_embeddings", c->max_position_embeddings);
    NUM("rope_theta", c->rope_theta);
    NUM("rms_norm_eps", c->rms_norm_eps);
    BOOL("tie_word_embeddings", c->tie_word_embeddings);
    NUM("num_local_experts", c->num_local_experts);
    NUM("num_experts_per_tok", c->num_experts_per_tok);
    BOOL("norm_topk_prob", c->norm_topk_prob);
    STR("scoring_func", c->scoring_func == MOE_SCORE_SIGMOID ? "sigmoid" : "softmax");
    NUM("routed_scaling_factor", c->routed_scaling_factor);
    NUM("router_aux_loss_coef", c->router_aux_loss_coef);
    NUM("router_z_loss_coef", c->router_z_loss_coef);
    NUM("capacity_factor", c->capacity_factor);
    STR("drop_policy", c->drop_policy == MOE_DROP_PROBABILITY ? "probability" : "arrival");
    cJSON *idx = cJSON_CreateArray();
    for (int l = 0; idx && l < c->num_hidden_layers && l < MOE_MAX_LAYERS; l++)
        if (c->num_local_experts > 0 && c->is_moe_layer[l]) moe__json_add(&ok, idx, NULL, cJSON_CreateNumber(l));
    moe__json_add(&ok, o, "moe_layer_indices", idx);
    NUM("dense_intermediate_size", c->dense_intermediate_size);
    NUM("n_shared_experts", c->n_shared_experts);
    NUM("shared_expert_intermediate_size", c->shared_expert_intermediate_size);
    BOOL("shared_expert_gate", c->shared_expert_gate);
    STR("router_type", moe_router_name(c->router_type));
    BOOL("gshard_random", c->gshard_random);
    NUM("router_importance_loss_coef", c->router_importance_loss_coef);
    NUM("router_load_loss_coef", c->router_load_loss_coef);
    NUM("router_bias_update_rate", c->router_bias_update_rate);
    NUM("n_group", c->n_group);
    NUM("topk_group", c->topk_group);
    BOOL("seq_aux", c->seq_aux);
    NUM("router_seed", c->router_seed);
    NUM("initializer_range", c->initializer_range);
    STR("hidden_act", "silu");
    STR("torch_dtype", "float32");
#undef NUM
#undef STR
#undef BOOL
    char *js = ok ? cJSON_Print(o) : NULL;
    cJSON_Delete(o);
    /* the caller frees with free(), so the text leaves the library's hooks */
    char *s = js ? strdup(js) : NULL;
    cJSON_free(js);
    return s;
}

int moe_model_config_save(const moe_model_config *c, const char *path, char *err, size_t errsz) {
    char *s = moe_model_config_to_json(c);
    if (!s) return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path);
    moe__iov parts[2] = {{s, strlen(s)}, {"\n", 1}};
    int rc = moe__write_atomic(path, parts, 2, err, errsz);
    free(s);
    return rc;
}

/* ---- costs -------------------------------------------------------------------- */

moe_model_costs moe_model_config_costs(const moe_model_config *c, int n_ctx) {
    moe_model_costs k;
    memset(&k, 0, sizeof k);
    const double C = c->hidden_size, V = c->vocab_size, D = c->head_dim, H = c->num_attention_heads,
                 G = c->num_key_value_heads, F = c->intermediate_size, E = c->num_local_experts,
                 K = c->num_experts_per_tok, Fd = c->dense_intermediate_size,
                 Fs = (double)c->n_shared_experts * c->shared_expert_intermediate_size;
    const double attn = C * H * D * 2 + C * G * D * 2; /* q, o and k, v */
    double total = V * C + C;                       /* embedding, final norm */
    double active_mm = 0;                           /* matmul params a token multiplies through */
    if (!c->tie_word_embeddings) total += V * C;
    active_mm += V * C; /* lm_head (or the tied embedding used as one) */
    double flops_attn = 0;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        total += attn + 2 * C;
        active_mm += attn;
        flops_attn += 2.0 * 2.0 * H * D * (n_ctx / 2.0); /* q·k and p·v over ctx/2 positions */
        if (c->num_local_experts > 0 && c->is_moe_layer[l]) {
            /* the router and its scheme's extra gates run for every token */
            const int noisy = c->router_type == MOE_ROUTER_NOISY_TOPK || c->router_type == MOE_ROUTER_HIERARCHICAL;
            const double Gg = c->n_group > 0 ? c->n_group : 1;
            const double gates = E * C * (noisy ? 2 : 1) + (c->router_type == MOE_ROUTER_HIERARCHICAL ? 2 * Gg * C : 0) +
                                 (c->shared_expert_gate ? C : 0);
            total += gates + E * 3 * C * F + 3 * C * Fs + (c->router_bias_update_rate > 0 ? E : 0);
            k.expert_params += E * 3 * C * F;
            active_mm += gates + K * 3 * C * F + 3 * C * Fs;
        } else {
            total += 3 * C * Fd;
            active_mm += 3 * C * Fd;
        }
    }
    k.total_params = total;
    k.embedding_params = c->tie_word_embeddings ? V * C : 2 * V * C;
    /* active = everything except experts a token skips */
    k.active_params = total - (k.expert_params - k.expert_params * (E > 0 ? K / E : 0));
    k.flops_per_token = 2.0 * active_mm + flops_attn;
    k.weight_bytes_f32 = 4.0 * total;
    return k;
}
