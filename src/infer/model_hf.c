/* Hugging Face model directories for the engine (docs/convert.md):
 * config.json (model_type mixtral, qwen2_moe or olmoe; `moe train`
 * directories are mixtral) and model.safetensors, or shards listed by
 * model.safetensors.index.json. F32/F16/BF16 tensors are mapped, never
 * copied: each expert is its own tensor, so the stacks point at them one by
 * one (moe__wt.mats). HF q/k rows are in rotate_half order, so every arch
 * here runs with rope_neox = 1 and no permutation. */
#include "infer/infer.h"
#include "io/atomic.h"
#include "io/ckpt.h"
#include "io/safetensors.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <string.h>

#define MAX_SHARDS 4096
#define MAX_CONFIG ((size_t)1 << 20)

typedef struct moe__hf_files {
    moe__st_file **st; /* [n] */
    int n;
    const uint8_t **ptrs; /* per-expert matrix pointers of every stack */
    size_t n_ptrs, cap_ptrs;
} moe__hf_files;

void moe__hf_files_free(moe__hf_files *f) {
    if (!f) return;
    for (int i = 0; i < f->n; i++) moe__st_close(f->st[i]);
    moe__free(f->st);
    moe__free(f->ptrs);
    moe__free(f);
}

typedef enum hf_type { HF_MIXTRAL, HF_QWEN2MOE, HF_OLMOE } hf_type;

typedef struct hf_binder {
    moe__imodel *m;
    moe__hf_files *f;
    hf_type type;
    const char *dir;
    int vocab_size; /* config.json's, 0 when it has none */
    size_t n_owned, cap_owned;
    char *err;
    size_t errsz;
} hf_binder;

/* ---- config.json ---------------------------------------------------------------- */

static const cJSON *key(const cJSON *j, const char *k) { return cJSON_GetObjectItemCaseSensitive(j, k); }

/* An integer key in [lo, hi]; def < lo: required. */
static int get_int(hf_binder *b, const cJSON *j, const char *k, int def, int lo, int hi, int *out) {
    const cJSON *v = key(j, k);
    if (!v || cJSON_IsNull(v)) {
        if (def < lo) return moe__set_err(b->err, b->errsz, MOE_EFORMAT, "%s/config.json: key \"%s\" is missing", b->dir, k);
        *out = def;
        return 0;
    }
    /* range first: converting a double outside long long's range is undefined (a fuzzed 1e32) */
    if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi) ||
        v->valuedouble != (double)(int)v->valuedouble)
        return moe__set_err(b->err, b->errsz, MOE_EFORMAT, "%s/config.json: \"%s\" must be an integer in [%d, %d]",
                            b->dir, k, lo, hi);
    *out = (int)v->valuedouble;
    return 0;
}

static int get_num(hf_binder *b, const cJSON *j, const char *k, double def, double *out) {
    const cJSON *v = key(j, k);
    if (!v || cJSON_IsNull(v)) return *out = def, 0;
    if (!cJSON_IsNumber(v) || !(v->valuedouble == v->valuedouble))
        return moe__set_err(b->err, b->errsz, MOE_EFORMAT, "%s/config.json: \"%s\" must be a number", b->dir, k);
    *out = v->valuedouble;
    return 0;
}

static int get_bool(hf_binder *b, const cJSON *j, const char *k, int def, int *out) {
    const cJSON *v = key(j, k);
    if (!v || cJSON_IsNull(v)) return *out = def, 0;
    if (!cJSON_IsBool(v))
        return moe__set_err(b->err, b->errsz, MOE_EFORMAT, "%s/config.json: \"%s\" must be true or false", b->dir, k);
    *out = cJSON_IsTrue(v);
    return 0;
}

/* Settings of our own checkpoints (and HF options) that change what the
 * model computes beyond what the engine does: refused by name. */
static int check_unsupported(hf_binder *b, const cJSON *j, int n_layer) {
#define REFUSE(...) return moe__set_err(b->err, b->errsz, MOE_EUNSUPPORTED, __VA_ARGS__)
    const cJSON *v;
    if ((v = key(j, "scoring_func")) && !(cJSON_IsString(v) && !strcmp(v->valuestring, "softmax")))
        REFUSE("%s/config.json: scoring_func is not \"softmax\"", b->dir);
    if ((v = key(j, "router_type")) && !(cJSON_IsString(v) && !strcmp(v->valuestring, "topk")))
        REFUSE("%s/config.json: router_type is not \"topk\"", b->dir);
    if ((v = key(j, "routed_scaling_factor")) && !(cJSON_IsNumber(v) && v->valuedouble == 1.0))
        REFUSE("%s/config.json: routed_scaling_factor is not 1", b->dir);
    if ((v = key(j, "router_bias_update_rate")) && !(cJSON_IsNumber(v) && v->valuedouble == 0.0))
        REFUSE("%s/config.json: router_bias_update_rate (a selection bias)", b->dir);
    if ((v = key(j, "n_group")) && !(cJSON_IsNumber(v) && v->valuedouble == 0.0))
        REFUSE("%s/config.json: n_group (group-limited routing)", b->dir);
    if ((v = key(j, "rope_scaling")) && !cJSON_IsNull(v)) REFUSE("%s/config.json: rope_scaling", b->dir);
    if ((v = key(j, "partial_rotary_factor")) && !(cJSON_IsNumber(v) && v->valuedouble == 1.0))
        REFUSE("%s/config.json: partial_rotary_factor", b->dir);
    if ((v = key(j, "clip_qkv")) && !cJSON_IsNull(v)) REFUSE("%s/config.json: clip_qkv", b->dir);
    if ((v = key(j, "mlp_only_layers")) && !(cJSON_IsArray(v) && cJSON_GetArraySize(v) == 0))
        REFUSE("%s/config.json: mlp_only_layers (dense layers)", b->dir);
    if ((v = key(j, "decoder_sparse_step")) && !(cJSON_IsNumber(v) && v->valuedouble == 1.0))
        REFUSE("%s/config.json: decoder_sparse_step is not 1 (dense layers)", b->dir);
    if ((v = key(j, "moe_layer_indices")) && !(cJSON_IsArray(v) && cJSON_GetArraySize(v) == n_layer))
        REFUSE("%s/config.json: moe_layer_indices leaves dense layers", b->dir);
    return 0;
#undef REFUSE
}

static int read_config(hf_binder *b) {
    char path[4096];
    char *text;
    size_t len;
    /* a `moe train` checkpoint cut short reads as the committed one */
    int rc = moe__ckpt_path(b->dir, "config.json", path, sizeof path, b->err, b->errsz);
    if (!rc) rc = moe__read_file(path, MAX_CONFIG, &text, &len, b->err, b->errsz);
    if (rc) return rc;
    cJSON *j = cJSON_ParseWithLength(text, len);
    moe__free(text);
    if (!j || !cJSON_IsObject(j)) {
        cJSON_Delete(j);
        return moe__set_err(b->err, b->errsz, MOE_EFORMAT, "%s: not a JSON object", path);
    }
    moe__imodel *m = b->m;
    moe_engine_hparams *h = &m->hp;
    const cJSON *mt = key(j, "model_type");
    const char *type = cJSON_IsString(mt) ? mt->valuestring : "";
    static const struct { const char *name; hf_type t; moe__arch a; double theta; int norm; } types[] = {
        {"mixtral", HF_MIXTRAL, MOE__ARCH_LLAMA, 1e6, 1},
        {"qwen2_moe", HF_QWEN2MOE, MOE__ARCH_QWEN2MOE, 1e4, 0},
        {"olmoe", HF_OLMOE, MOE__ARCH_OLMOE, 1e4, 0}};
    int ti = -1;
    for (int i = 0; i < 3; i++)
        if (!strcmp(type, types[i].name)) ti = i;
    if (ti < 0) {
        rc = moe__set_err(b->err, b->errsz, MOE_EUNSUPPORTED, "%s: model_type \"%s\" (supported: mixtral, qwen2_moe, olmoe)",
                          path, type);
        cJSON_Delete(j);
        return rc;
    }
    b->type = types[ti].t;
    m->arch = types[ti].a, m->rope_neox = 1, m->w_scale = 0;
    snprintf(h->arch, sizeof h->arch, "%s", type);
    const int big = 1 << 20;
    int n_shared = 0, fs = 0, gated = 0, head_dim;
    double eps, theta;
    const char *experts_key = b->type == HF_MIXTRAL ? "num_local_experts" : "num_experts";
    const char *ff_key = b->type == HF_QWEN2MOE ? "moe_intermediate_size" : "intermediate_size";
    if ((rc = get_int(b, j, "hidden_size", -1, 1, big, &h->n_embd)) ||
        (rc = get_int(b, j, "num_hidden_layers", -1, 1, 4096, &h->n_layer)) ||
        (rc = get_int(b, j, "num_attention_heads", -1, 1, big, &h->n_head)) ||
        (rc = get_int(b, j, "num_key_value_heads", h->n_head, 1, big, &h->n_head_kv)) ||
        (rc = get_int(b, j, "head_dim", h->n_embd / h->n_head, 2, big, &head_dim)) ||
        (rc = get_int(b, j, "max_position_embeddings", 4096, 1, 1 << 24, &h->n_ctx_train)) ||
        (rc = get_int(b, j, experts_key, -1, 1, 4096, &h->n_expert)) ||
        (rc = get_int(b, j, "num_experts_per_tok", 2, 1, h->n_expert, &h->n_expert_used)) ||
        (rc = get_int(b, j, ff_key, -1, 1, big, &h->n_ff_exp)) ||
        (rc = get_num(b, j, "rms_norm_eps", 1e-5, &eps)) ||
        (rc = get_num(b, j, "rope_theta", types[ti].theta, &theta)) ||
        (rc = get_bool(b, j, "norm_topk_prob", types[ti].norm, &m->norm_topk)) ||
        (rc = get_int(b, j, "n_shared_experts", 0, 0, 64, &n_shared)) ||
        (rc = get_bool(b, j, "shared_expert_gate", 0, &gated)) ||
        (rc = get_int(b, j, "shared_expert_intermediate_size", 0, 0, big, &fs)) ||
        (rc = get_int(b, j, "vocab_size", 0, 0, INT32_MAX / 2, &b->vocab_size)) ||
        (rc = check_unsupported(b, j, h->n_layer))) {
        cJSON_Delete(j);
        return rc;
    }
    cJSON_Delete(j);
    if (h->n_head % h->n_head_kv || head_dim % 2)
        return moe__set_err(b->err, b->errsz, MOE_EFORMAT, "%s: %d heads over %d kv heads, head_dim %d", path, h->n_head,
                            h->n_head_kv, head_dim);
    h->head_dim = h->n_rot = head_dim;
    h->rms_eps = (float)eps, h->rope_base = (float)theta;
    if (!(eps >= 0) || !(theta > 0))
        return moe__set_err(b->err, b->errsz, MOE_EFORMAT, "%s: rms_norm_eps %g, rope_theta %g", path, eps, theta);
    if (b->type == HF_QWEN2MOE) {
        h->n_ff_shexp = fs;
        if (fs <= 0) return moe__set_err(b->err, b->errsz, MOE_EFORMAT, "%s: shared_expert_intermediate_size is missing", path);
    } else if (b->type == HF_MIXTRAL && n_shared > 0) { /* ours: Qwen2-MoE's shared expert under Mixtral names */
        if (!gated)
            return moe__set_err(b->err, b->errsz, MOE_EUNSUPPORTED,
                                "%s: a shared expert without shared_expert_gate (the engine computes only the gated one)", path);
        h->n_ff_shexp = n_shared * fs;
        m->arch = MOE__ARCH_QWEN2MOE; /* same graph: sigmoid-gated shared expert */
    }
    return 0;
}

/* ---- tensors -------------------------------------------------------------------- */

static int open_files(hf_binder *b) {
    char path[4096];
    moe__hf_files *f = b->f;
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", b->dir);
    char *text;
    size_t len;
    int rc = moe__read_file(path, (size_t)64 << 20, &text, &len, NULL, 0);
    if (rc) { /* no index: one file */
        if (!(f->st = moe__calloc(1, sizeof *f->st))) return moe__set_err(b->err, b->errsz, MOE_ENOMEM, "out of memory");
        rc = moe__ckpt_path(b->dir, "model.safetensors", path, sizeof path, b->err, b->errsz);
        if (!rc) rc = moe__st_open(path, &f->st[0], b->err, b->errsz);
        if (!rc) f->n = 1;
        return rc;
    }
    cJSON *j = cJSON_ParseWithLength(text, len);
    moe__free(text);
    const cJSON *wm = j ? key(j, "weight_map") : NULL;
    if (!cJSON_IsObject(wm)) {
        cJSON_Delete(j);
        return moe__set_err(b->err, b->errsz, MOE_EFORMAT, "%s: no \"weight_map\" object", path);
    }
    /* distinct shard names, in first-seen order */
    const char **names = moe__calloc(MAX_SHARDS, sizeof *names);
    int n = 0;
    rc = names ? 0 : moe__set_err(b->err, b->errsz, MOE_ENOMEM, "out of memory");
    for (const cJSON *e = wm->child; e && !rc; e = e->next) {
        if (!cJSON_IsString(e) || strchr(e->valuestring, '/') || !strcmp(e->valuestring, "..") || !e->valuestring[0]) {
            rc = moe__set_err(b->err, b->errsz, MOE_EFORMAT, "%s: weight_map entry \"%s\" is not a file name in the directory",
                              path, e->string ? e->string : "");
            break;
        }
        int seen = 0;
        for (int i = 0; i < n && !seen; i++) seen = !strcmp(names[i], e->valuestring);
        if (seen) continue;
        if (n == MAX_SHARDS) rc = moe__set_err(b->err, b->errsz, MOE_ELIMIT, "%s: more than %d shards", path, MAX_SHARDS);
        else names[n++] = e->valuestring;
    }
    if (!rc && !(f->st = moe__calloc((size_t)(n ? n : 1), sizeof *f->st)))
        rc = moe__set_err(b->err, b->errsz, MOE_ENOMEM, "out of memory");
    for (int i = 0; i < n && !rc; i++) {
        snprintf(path, sizeof path, "%s/%s", b->dir, names[i]);
        rc = moe__st_open(path, &f->st[i], b->err, b->errsz);
        if (!rc) f->n = i + 1;
    }
    moe__free(names);
    cJSON_Delete(j);
    return rc;
}

static const moe__st_tensor *find(hf_binder *b, const char *name) {
    for (int i = 0; i < b->f->n; i++) {
        const moe__st_tensor *t = moe__st_find(b->f->st[i], name);
        if (t) return t;
    }
    return NULL;
}

static uint32_t ggml_of(moe__dtype d) {
    return d == MOE__DT_F32 ? MOE__GGML_F32 : d == MOE__DT_F16 ? MOE__GGML_F16 : d == MOE__DT_BF16 ? MOE__GGML_BF16 : UINT32_MAX;
}

/* The first element of t that is NaN or Inf (all exponent bits set), or
 * SIZE_MAX. One streaming pass per tensor at load, as moe_model_load does:
 * a model holding NaN computes nothing but NaN, so it is refused by name
 * rather than scored as "PPL = nan". */
static size_t first_nonfinite(const moe__st_tensor *t) {
    const size_t n = t->numel;
    if (t->dtype == MOE__DT_F32) {
        const uint32_t *p = t->data;
        uint32_t any = 0;
        for (size_t i = 0; i < n; i++) any |= (p[i] & 0x7f800000u) == 0x7f800000u;
        if (!any) return SIZE_MAX;
        for (size_t i = 0; i < n; i++)
            if ((p[i] & 0x7f800000u) == 0x7f800000u) return i;
    } else {
        const uint16_t *p = t->data, mask = t->dtype == MOE__DT_F16 ? 0x7c00 : 0x7f80;
        uint16_t any = 0;
        for (size_t i = 0; i < n; i++) any |= (p[i] & mask) == mask;
        if (!any) return SIZE_MAX;
        for (size_t i = 0; i < n; i++)
            if ((p[i] & mask) == mask) return i;
    }
    return SIZE_MAX;
}

/* name with shape [rows][cols] (rows 0: a vector of cols; [1][cols] is
 * accepted for a vector too). NULL when absent and optional. */
static int find_checked(hf_binder *b, const char *name, int rows, int cols, int required, const moe__st_tensor **out) {
    const moe__st_tensor *t = find(b, name);
    *out = t;
    if (!t)
        return required ? moe__set_err(b->err, b->errsz, MOE_ENOTFOUND, "%s: tensor \"%s\" is missing", b->dir, name) : 0;
    int ok = rows ? t->ndim == 2 && t->shape[0] == rows && t->shape[1] == cols
                  : (t->ndim == 1 && t->shape[0] == cols) || (t->ndim == 2 && t->shape[0] == 1 && t->shape[1] == cols);
    if (!ok)
        return moe__set_err(b->err, b->errsz, MOE_ESHAPE, "%s: tensor \"%s\" has shape [%lld, %lld], expected [%d, %d]", b->dir,
                            name, (long long)(t->ndim > 0 ? t->shape[0] : 0), (long long)(t->ndim > 1 ? t->shape[1] : 0),
                            rows ? rows : 1, cols);
    if (ggml_of(t->dtype) == UINT32_MAX)
        return moe__set_err(b->err, b->errsz, MOE_EUNSUPPORTED, "%s: tensor \"%s\" has dtype %s (supported: F32, F16, BF16)",
                            b->dir, name, moe__dtype_name(t->dtype));
    /* the kernels read F32 rows as floats, F16/BF16 as 16-bit words */
    if ((uintptr_t)t->data % moe__dtype_size(t->dtype))
        return moe__set_err(b->err, b->errsz, MOE_EUNSUPPORTED, "%s: tensor \"%s\" is not aligned to its element size",
                            b->dir, name);
    const size_t at = first_nonfinite(t);
    if (at != SIZE_MAX)
        return moe__set_err(b->err, b->errsz, MOE_ENONFINITE, "%s: tensor \"%s\" [%zu][%zu] is NaN or Inf", b->dir, name,
                            rows ? at / (size_t)cols : 0, rows ? at % (size_t)cols : at);
    return 0;
}

static int bind_mat(hf_binder *b, const char *name, int rows, int cols, int required, moe__wt *w) {
    const moe__st_tensor *t;
    memset(w, 0, sizeof *w);
    int rc = find_checked(b, name, rows, cols, required, &t);
    if (rc || !t) return rc;
    w->data = t->data, w->type = ggml_of(t->dtype);
    w->rows = rows, w->cols = cols, w->n_mat = 1;
    w->row_bytes = moe__dtype_size(t->dtype) * (size_t)cols;
    w->mat_bytes = w->row_bytes * (size_t)rows;
    return 0;
}

/* The E tensors of one expert projection (fmt takes the expert index). */
static int bind_experts(hf_binder *b, const char *fmt, int l, int E, int rows, int cols, moe__wt *w) {
    moe__hf_files *f = b->f;
    memset(w, 0, sizeof *w);
    if (f->n_ptrs + (size_t)E > f->cap_ptrs) return moe__set_err(b->err, b->errsz, MOE_ELIMIT, "expert table overflow");
    const uint8_t **mats = f->ptrs + f->n_ptrs;
    f->n_ptrs += (size_t)E;
    for (int e = 0; e < E; e++) {
        char name[160];
        moe__wt one;
        snprintf(name, sizeof name, fmt, l, e);
        int rc = bind_mat(b, name, rows, cols, 1, &one);
        if (rc) return rc;
        if (e && one.type != w->type)
            return moe__set_err(b->err, b->errsz, MOE_EUNSUPPORTED, "%s: tensor \"%s\" mixes dtypes within a layer's experts",
                                b->dir, name);
        if (!e) *w = one;
        mats[e] = one.data;
    }
    w->mats = mats, w->n_mat = E;
    return 0;
}

/* A vector of n floats, converted into the model's arena. */
static int bind_vec(hf_binder *b, const char *name, int n, int required, const float **out) {
    const moe__st_tensor *t;
    *out = NULL;
    int rc = find_checked(b, name, 0, n, required, &t);
    if (rc || !t) return rc;
    if (b->n_owned + (size_t)n > b->cap_owned) return moe__set_err(b->err, b->errsz, MOE_ELIMIT, "vector arena overflow");
    float *dst = b->m->owned + b->n_owned;
    b->n_owned += (size_t)n;
    if ((rc = moe__st_read_f32(t, dst, (size_t)n)))
        return moe__set_err(b->err, b->errsz, rc, "%s: tensor \"%s\": cannot convert", b->dir, name);
    *out = dst;
    return 0;
}

static int bind_all(hf_binder *b) {
    moe__imodel *m = b->m;
    moe_engine_hparams *h = &m->hp;
    const int C = h->n_embd, HD = h->n_head * h->head_dim, GD = h->n_head_kv * h->head_dim;
    const int E = h->n_expert, F = h->n_ff_exp, Fs = h->n_ff_shexp, L = h->n_layer;
    const moe__st_tensor *te = find(b, "model.embed_tokens.weight");
    if (!te) return moe__set_err(b->err, b->errsz, MOE_ENOTFOUND, "%s: tensor \"model.embed_tokens.weight\" is missing", b->dir);
    if (te->ndim != 2 || te->shape[0] <= 0 || te->shape[0] > INT32_MAX / 2)
        return moe__set_err(b->err, b->errsz, MOE_EFORMAT, "%s: model.embed_tokens.weight is not [V][C]", b->dir);
    h->n_vocab = (int)te->shape[0];
    const int V = h->n_vocab;
    if (b->vocab_size && b->vocab_size != V)
        return moe__set_err(b->err, b->errsz, MOE_ESHAPE,
                            "%s: config.json says vocab_size %d, model.embed_tokens.weight has %d rows", b->dir,
                            b->vocab_size, V);
    b->cap_owned = (size_t)C + (size_t)L * (3 * (size_t)C + 2 * (size_t)HD + 4 * (size_t)GD);
    b->f->cap_ptrs = (size_t)L * 3 * (size_t)E;
    if (!(m->owned = moe__malloc(b->cap_owned * sizeof(float))) ||
        !(b->f->ptrs = moe__malloc(b->f->cap_ptrs * sizeof *b->f->ptrs)) ||
        !(m->layers = moe__calloc((size_t)L, sizeof *m->layers)))
        return moe__set_err(b->err, b->errsz, MOE_ENOMEM, "out of memory");
    int rc;
    if ((rc = bind_mat(b, "model.embed_tokens.weight", V, C, 1, &m->tok_embd)) ||
        (rc = bind_vec(b, "model.norm.weight", C, 1, &m->output_norm)) ||
        (rc = bind_mat(b, "lm_head.weight", V, C, 0, &m->output)))
        return rc;
    h->tied_output = m->output.data == NULL;
    if (h->tied_output) m->output = m->tok_embd;
    const int mix = b->type == HF_MIXTRAL;
    const char *moe = mix ? "block_sparse_moe" : "mlp";
    for (int l = 0; l < L; l++) {
        moe__ilayer *y = &m->layers[l];
        char n[160], fg[160], fu[160], fd[160];
#define NM(s) (snprintf(n, sizeof n, "model.layers.%d." s, l), n)
#define MOE_NM(s) (snprintf(n, sizeof n, "model.layers.%d.%s." s, l, moe), n)
        if ((rc = bind_vec(b, NM("input_layernorm.weight"), C, 1, &y->attn_norm)) ||
            (rc = bind_vec(b, NM("post_attention_layernorm.weight"), C, 1, &y->ffn_norm)) ||
            (rc = bind_mat(b, NM("self_attn.q_proj.weight"), HD, C, 1, &y->wq)) ||
            (rc = bind_mat(b, NM("self_attn.k_proj.weight"), GD, C, 1, &y->wk)) ||
            (rc = bind_mat(b, NM("self_attn.v_proj.weight"), GD, C, 1, &y->wv)) ||
            (rc = bind_mat(b, NM("self_attn.o_proj.weight"), C, HD, 1, &y->wo)) ||
            (rc = bind_vec(b, NM("self_attn.q_proj.bias"), HD, 0, &y->bq)) ||
            (rc = bind_vec(b, NM("self_attn.k_proj.bias"), GD, 0, &y->bk)) ||
            (rc = bind_vec(b, NM("self_attn.v_proj.bias"), GD, 0, &y->bv)) ||
            (rc = bind_mat(b, MOE_NM("gate.weight"), E, C, 1, &y->gate_inp)))
            return rc;
        if (b->type == HF_OLMOE &&
            ((rc = bind_vec(b, NM("self_attn.q_norm.weight"), HD, 1, &y->q_norm)) ||
             (rc = bind_vec(b, NM("self_attn.k_norm.weight"), GD, 1, &y->k_norm))))
            return rc;
        /* the expert index is the second %d */
        snprintf(fg, sizeof fg, "model.layers.%%d.%s.experts.%%d.%s.weight", moe, mix ? "w1" : "gate_proj");
        snprintf(fu, sizeof fu, "model.layers.%%d.%s.experts.%%d.%s.weight", moe, mix ? "w3" : "up_proj");
        snprintf(fd, sizeof fd, "model.layers.%%d.%s.experts.%%d.%s.weight", moe, mix ? "w2" : "down_proj");
        if ((rc = bind_experts(b, fg, l, E, F, C, &y->gate_exps)) || (rc = bind_experts(b, fu, l, E, F, C, &y->up_exps)) ||
            (rc = bind_experts(b, fd, l, E, C, F, &y->down_exps)))
            return rc;
        if (Fs > 0 &&
            ((rc = bind_vec(b, MOE_NM("shared_expert_gate.weight"), C, 1, &y->gate_inp_sh)) ||
             (rc = bind_mat(b, MOE_NM("shared_expert.gate_proj.weight"), Fs, C, 1, &y->gate_sh)) ||
             (rc = bind_mat(b, MOE_NM("shared_expert.up_proj.weight"), Fs, C, 1, &y->up_sh)) ||
             (rc = bind_mat(b, MOE_NM("shared_expert.down_proj.weight"), C, Fs, 1, &y->down_sh))))
            return rc;
#undef NM
#undef MOE_NM
        if (y->gate_exps.type != y->up_exps.type || y->gate_exps.type != y->down_exps.type)
            return moe__set_err(b->err, b->errsz, MOE_EUNSUPPORTED, "%s: layer %d mixes expert dtypes", b->dir, l);
    }
    h->expert_type = m->layers[0].gate_exps.type;
    return 0;
}

int moe__imodel_load_hf(const char *dir, moe__imodel **out, char *err, size_t errsz) {
    *out = NULL;
    moe__imodel *m = moe__calloc(1, sizeof *m);
    moe__hf_files *f = moe__calloc(1, sizeof *f);
    if (!m || !f) {
        moe__free(m), moe__free(f);
        return moe__set_err(err, errsz, MOE_ENOMEM, "out of memory");
    }
    m->hf = f;
    hf_binder b = {.m = m, .f = f, .dir = dir, .err = err, .errsz = errsz};
    int rc = read_config(&b);
    if (!rc) rc = open_files(&b);
    if (!rc) rc = bind_all(&b);
    if (rc) {
        moe__imodel_free(m);
        return rc;
    }
    *out = m;
    return 0;
}
