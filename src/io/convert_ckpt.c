/* Import of a MoE model the engine loads (a GGUF file: llama/Mixtral or
 * qwen2moe; a Hugging Face Mixtral directory) into a model directory our
 * trainer loads (docs/convert.md). The source is opened by the engine's own
 * loader (moe__imodel: every key, name, type and shape checked there), then
 * its hyperparameters become config.json and its weights are dequantized
 * row by row to F32 under Hugging Face Mixtral names, the q/k rows of
 * adjacent-pair RoPE files permuted back to rotate_half order. A gpt2
 * vocabulary of ours in substance becomes tokenizer.json. What our model
 * cannot compute (attention biases, q/k norms, partial RoPE, expert weight
 * scaling) is MOE_EUNSUPPORTED. */
#include "infer/infer.h"
#include "io/atomic.h"
#include "io/convert.h"
#include "io/gguf.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"
#include "tokenizer/vocab_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct importer {
    const moe__imodel *im;
    const moe__gguf *g; /* NULL for a directory */
    const char *L;      /* the source, for messages */
    char *err;
    size_t errsz;
} importer;

static int to_config(importer *x, moe_model_config *c) {
    const moe__imodel *im = x->im;
    const moe_engine_hparams *h = &im->hp;
#define REFUSE(...) return moe__set_err(x->err, x->errsz, MOE_EUNSUPPORTED, __VA_ARGS__)
    if (h->n_rot != h->head_dim) REFUSE("%s: RoPE on %d of %d head dimensions (ours rotates all)", x->L, h->n_rot, h->head_dim);
    if (im->w_scale != 0.0f && im->w_scale != 1.0f) REFUSE("%s: expert_weights_scale %g", x->L, im->w_scale);
    if (h->n_layer > MOE_MAX_LAYERS) REFUSE("%s: %d layers (at most %d)", x->L, h->n_layer, MOE_MAX_LAYERS);
    for (int l = 0; l < h->n_layer; l++) {
        const moe__ilayer *y = &im->layers[l];
        if (y->bq || y->bk || y->bv || y->bo) REFUSE("%s: layer %d has attention biases (our model has none)", x->L, l);
        if (y->q_norm || y->k_norm) REFUSE("%s: layer %d has q/k norms (%s; our model has none)", x->L, l, h->arch);
    }
#undef REFUSE
    moe_model_config_defaults(c);
    c->vocab_size = h->n_vocab, c->hidden_size = h->n_embd, c->num_hidden_layers = h->n_layer;
    c->num_attention_heads = h->n_head, c->num_key_value_heads = h->n_head_kv, c->head_dim = h->head_dim;
    c->max_position_embeddings = h->n_ctx_train, c->rope_theta = h->rope_base, c->rms_norm_eps = h->rms_eps;
    c->tie_word_embeddings = h->tied_output;
    c->num_local_experts = h->n_expert, c->num_experts_per_tok = h->n_expert_used, c->intermediate_size = h->n_ff_exp;
    c->norm_topk_prob = im->norm_topk;
    c->dense_intermediate_size = h->n_expert_used * h->n_ff_exp;
    for (int l = 0; l < h->n_layer; l++) c->is_moe_layer[l] = 1;
    if (h->n_ff_shexp > 0) /* the engine's shared expert is always sigmoid-gated */
        c->n_shared_experts = 1, c->shared_expert_intermediate_size = h->n_ff_shexp, c->shared_expert_gate = 1;
    char msg[256];
    int rc = moe_model_config_check(c, msg, sizeof msg);
    if (rc) return moe__set_err(x->err, x->errsz, rc, "%s: the hyperparameters do not make a valid model: %s", x->L, msg);
    return 0;
}

static float *param(moe_model *m, const char *name, size_t numel, importer *x, int *rc) {
    const moe_param_info *pi = moe_model_find_tensor(m, name);
    if (!pi || pi->numel != numel) {
        *rc = moe__set_err(x->err, x->errsz, MOE_EINVAL, "convert: model parameter %s is missing or mis-sized", name);
        return NULL;
    }
    return moe_model_params(m) + pi->offset;
}

/* Matrix mat of w into parameter name, q/k rows permuted back over
 * permute_heads heads (0: as is). */
static int fill_mat(importer *x, moe_model *m, const char *name, const moe__wt *w, int mat, int permute_heads) {
    int rc = 0;
    const size_t n = (size_t)w->rows * w->cols;
    float *dst = param(m, name, n, x, &rc);
    if (!dst) return rc;
    float *tmp = permute_heads ? moe__malloc(n * sizeof *tmp) : dst;
    if (!tmp) return moe__set_err(x->err, x->errsz, MOE_ENOMEM, "%s: out of memory", x->L);
    for (int r = 0; r < w->rows; r++) moe__wt_row(w, mat, r, tmp + (size_t)r * w->cols);
    if (permute_heads) {
        moe__permute_qk(tmp, dst, permute_heads, w->rows / permute_heads, w->cols, 1);
        moe__free(tmp);
    }
    return 0;
}

static int fill_vec(importer *x, moe_model *m, const char *name, const float *v, int n) {
    int rc = 0;
    float *dst = param(m, name, (size_t)n, x, &rc);
    if (dst) memcpy(dst, v, (size_t)n * sizeof *dst);
    return rc;
}

static int fill_all(importer *x, moe_model *m, const moe_model_config *c) {
    const moe__imodel *im = x->im;
    const int C = c->hidden_size, E = c->num_local_experts;
    const int qh = im->rope_neox ? 0 : c->num_attention_heads, kh = im->rope_neox ? 0 : c->num_key_value_heads;
    int rc;
    if ((rc = fill_mat(x, m, "model.embed_tokens.weight", &im->tok_embd, 0, 0)) ||
        (rc = fill_vec(x, m, "model.norm.weight", im->output_norm, C)) ||
        (!c->tie_word_embeddings && (rc = fill_mat(x, m, "lm_head.weight", &im->output, 0, 0))))
        return rc;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        const moe__ilayer *y = &im->layers[l];
        char d[160];
#define DST(fmt) (snprintf(d, sizeof d, "model.layers.%d." fmt, l), d)
        if ((rc = fill_vec(x, m, DST("input_layernorm.weight"), y->attn_norm, C)) ||
            (rc = fill_vec(x, m, DST("post_attention_layernorm.weight"), y->ffn_norm, C)) ||
            (rc = fill_mat(x, m, DST("self_attn.q_proj.weight"), &y->wq, 0, qh)) ||
            (rc = fill_mat(x, m, DST("self_attn.k_proj.weight"), &y->wk, 0, kh)) ||
            (rc = fill_mat(x, m, DST("self_attn.v_proj.weight"), &y->wv, 0, 0)) ||
            (rc = fill_mat(x, m, DST("self_attn.o_proj.weight"), &y->wo, 0, 0)) ||
            (rc = fill_mat(x, m, DST("block_sparse_moe.gate.weight"), &y->gate_inp, 0, 0)))
            return rc;
        for (int e = 0; e < E; e++) {
            char n1[160], n2[160], n3[160];
            snprintf(n1, sizeof n1, "model.layers.%d.block_sparse_moe.experts.%d.w1.weight", l, e);
            snprintf(n2, sizeof n2, "model.layers.%d.block_sparse_moe.experts.%d.w2.weight", l, e);
            snprintf(n3, sizeof n3, "model.layers.%d.block_sparse_moe.experts.%d.w3.weight", l, e);
            if ((rc = fill_mat(x, m, n1, &y->gate_exps, e, 0)) || (rc = fill_mat(x, m, n3, &y->up_exps, e, 0)) ||
                (rc = fill_mat(x, m, n2, &y->down_exps, e, 0)))
                return rc;
        }
        if (c->shared_expert_gate &&
            ((rc = fill_vec(x, m, DST("block_sparse_moe.shared_expert_gate.weight"), y->gate_inp_sh, C)) ||
             (rc = fill_mat(x, m, DST("block_sparse_moe.shared_expert.gate_proj.weight"), &y->gate_sh, 0, 0)) ||
             (rc = fill_mat(x, m, DST("block_sparse_moe.shared_expert.up_proj.weight"), &y->up_sh, 0, 0)) ||
             (rc = fill_mat(x, m, DST("block_sparse_moe.shared_expert.down_proj.weight"), &y->down_sh, 0, 0))))
            return rc;
#undef DST
    }
    return 0;
}

/* ---- tokenizer ------------------------------------------------------------------ */

/* Our tokenizer.json from a gpt2 vocabulary when it is one of ours in
 * substance: tokens 0..255 are GPT-2's byte texts in byte order, merge r
 * spells token 256 + r, and token 256 + M is <|endoftext|>. *written = 0
 * (and 0 returned) when it is not: the model is still imported. */
static int import_tokenizer(importer *x, const char *dir, int *written) {
    *written = 0;
    const char *model;
    const moe__gguf_str *tokens, *merges;
    size_t n_tok, n_merge;
    if (moe__gguf_get_str(x->g, "tokenizer.ggml.model", &model, NULL, NULL, 0) || strcmp(model, "gpt2") ||
        moe__gguf_get_arr_str(x->g, "tokenizer.ggml.tokens", &tokens, &n_tok, NULL, 0) ||
        moe__gguf_get_arr_str(x->g, "tokenizer.ggml.merges", &merges, &n_merge, NULL, 0) || n_tok < 257 + n_merge)
        return 0;
    unsigned char bt[8];
    for (int b = 0; b < 256; b++) {
        size_t k = moe__utf8_encode(moe__bpe_byte_cp((unsigned char)b), bt);
        if (tokens[b].len != k || memcmp(tokens[b].s, bt, k)) return 0;
    }
    const size_t M = n_merge;
    if (strcmp(tokens[256 + M].s, MOE_TOKENIZER_EOS_TEXT)) return 0;
    size_t cap = 64 + M * 24;
    char *json = moe__malloc(cap);
    if (!json) return moe__set_err(x->err, x->errsz, MOE_ENOMEM, "%s: out of memory", x->L);
    size_t len = (size_t)snprintf(json, cap, "{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":%zu,\n\"merges\":[", 257 + M);
    int ok = 1;
    for (size_t r = 0; r < M && ok; r++) {
        const char *sp = memchr(merges[r].s + (merges[r].len > 0), ' ', merges[r].len ? merges[r].len - 1 : 0);
        ok = sp != NULL;
        if (!ok) break;
        size_t la = (size_t)(sp - merges[r].s), lb = merges[r].len - la - 1;
        long a = -1, b = -1;
        for (size_t id = 0; id < 256 + r && (a < 0 || b < 0); id++) { /* first id of each text, as llama.cpp's map */
            if (a < 0 && tokens[id].len == la && !memcmp(tokens[id].s, merges[r].s, la)) a = (long)id;
            if (b < 0 && tokens[id].len == lb && !memcmp(tokens[id].s, sp + 1, lb)) b = (long)id;
        }
        const moe__gguf_str *t = &tokens[256 + r];
        /* the merged token is either the concatenation or our duplicate placeholder */
        ok = a >= 0 && b >= 0 &&
             ((t->len == la + lb && !memcmp(t->s, merges[r].s, la) && !memcmp(t->s + la, sp + 1, lb)) ||
              !strncmp(t->s, "<|dup_", 6));
        len += (size_t)snprintf(json + len, cap - len, "%s[%ld,%ld]", r ? ",\n" : "\n", a, b);
    }
    int rc = 0;
    if (ok) {
        len += (size_t)snprintf(json + len, cap - len, "],\n\"special\":{\"%s\":%zu}}\n", MOE_TOKENIZER_EOS_TEXT, 256 + M);
        char path[4096];
        snprintf(path, sizeof path, "%s/tokenizer.json", dir);
        moe__iov part = {json, len};
        rc = moe__write_atomic(path, &part, 1, x->err, x->errsz);
        moe_tokenizer *tok = NULL;
        /* the file must be one our loader accepts; otherwise remove it */
        if (!rc && moe_tokenizer_load(path, &tok, NULL, 0) == 0) *written = 1;
        else if (!rc) remove(path);
        moe_tokenizer_free(tok);
    }
    moe__free(json);
    return rc;
}

/* A directory source: its tokenizer.json, when it is one of ours, is copied. */
static int copy_tokenizer(const char *src, const char *dir, int *written, char *err, size_t errsz) {
    char path[4096];
    moe_tokenizer *tok = NULL;
    *written = 0;
    snprintf(path, sizeof path, "%s/tokenizer.json", src);
    if (moe_tokenizer_load(path, &tok, NULL, 0)) return 0;
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    int rc = moe_tokenizer_save(tok, path, err, errsz);
    moe_tokenizer_free(tok);
    *written = rc == 0;
    return rc;
}

int moe_convert_to_model_dir(const char *src, const char *dir, int *has_tokenizer, char *err, size_t errsz) {
    if (has_tokenizer) *has_tokenizer = 0;
    if (!src || !dir) return moe__set_err(err, errsz, MOE_EINVAL, "convert: bad arguments");
    moe__imodel *im = NULL;
    int rc = moe__imodel_load(src, 1, &im, err, errsz);
    if (rc) return rc;
    importer x = {.im = im, .g = im->g, .L = src, .err = err, .errsz = errsz};
    moe_model_config c;
    moe_model *m = NULL;
    int tok = 0;
    if ((rc = to_config(&x, &c))) goto done;
    m = moe_model_create(&c, 1, 1, 0, 1, &rc, err, errsz);
    if (!m) goto done;
    if ((rc = fill_all(&x, m, &c)) || (rc = moe_model_save(m, dir, err, errsz))) goto done;
    rc = x.g ? import_tokenizer(&x, dir, &tok) : copy_tokenizer(src, dir, &tok, err, errsz);
    if (has_tokenizer) *has_tokenizer = tok;
done:
    moe_model_free(m);
    moe__imodel_free(im);
    return rc;
}
