/* Import of a GGUF MoE model (llama/Mixtral, qwen2moe) into a model
 * directory our trainer loads (docs/convert.md): the hyperparameters become
 * config.json, the tensors are dequantized to F32 under Hugging Face Mixtral
 * names (q/k rows of arch llama permuted back to rotate_half order), and a
 * gpt2 vocabulary built of GPT-2 byte tokens plus merges becomes our
 * tokenizer.json. What our model cannot compute (attention biases, q/k norm,
 * partial RoPE, expert weight scaling, dense layers) is MOE_EUNSUPPORTED. */
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
    const moe__gguf *g;
    const char *L; /* the file, for messages */
    int llama;     /* arch llama: q/k in adjacent-pair order */
    char *err;
    size_t errsz;
} importer;

static int u32_key(importer *x, const char *arch, const char *suffix, int def, int *out) {
    char key[128];
    uint32_t v;
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    int rc = moe__gguf_get_u32(x->g, key, &v, x->err, x->errsz);
    if (rc == MOE_ENOTFOUND && def >= 0) v = (uint32_t)def, rc = 0;
    else if (rc == MOE_ENOTFOUND) return moe__set_err(x->err, x->errsz, rc, "%s: metadata key '%s' is missing", x->L, key);
    if (rc) return rc;
    if (v > (1u << 24)) return moe__set_err(x->err, x->errsz, MOE_ELIMIT, "%s: %s = %u is too large", x->L, key, v);
    *out = (int)v;
    return 0;
}

static int f32_key(importer *x, const char *arch, const char *suffix, float def, float *out) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    int rc = moe__gguf_get_f32(x->g, key, out, x->err, x->errsz);
    if (rc == MOE_ENOTFOUND) *out = def, rc = 0;
    return rc;
}

static int read_config(importer *x, moe_model_config *c) {
    const char *arch;
    int rc = moe__gguf_get_str(x->g, "general.architecture", &arch, NULL, x->err, x->errsz);
    if (rc) return rc == MOE_ENOTFOUND ? moe__set_err(x->err, x->errsz, MOE_EFORMAT, "%s: no general.architecture", x->L) : rc;
    const int qwen = !strcmp(arch, "qwen2moe");
    x->llama = !strcmp(arch, "llama");
    if (!x->llama && !qwen)
        return moe__set_err(x->err, x->errsz, MOE_EUNSUPPORTED, "%s: architecture '%s' (importable: llama with experts, qwen2moe%s)",
                            x->L, arch, !strcmp(arch, "olmoe") ? "; olmoe's q/k norm has no place in our model" : "");
    moe_model_config_defaults(c);
    int key_len, n_rot, ff, fs = 0;
    float w_scale;
    if ((rc = u32_key(x, arch, "embedding_length", -1, &c->hidden_size)) ||
        (rc = u32_key(x, arch, "block_count", -1, &c->num_hidden_layers)) ||
        (rc = u32_key(x, arch, "attention.head_count", -1, &c->num_attention_heads)) ||
        (rc = u32_key(x, arch, "attention.head_count_kv", c->num_attention_heads, &c->num_key_value_heads)) ||
        (rc = u32_key(x, arch, "context_length", 4096, &c->max_position_embeddings)) ||
        (rc = u32_key(x, arch, "expert_count", 0, &c->num_local_experts)) ||
        (rc = u32_key(x, arch, "expert_used_count", 0, &c->num_experts_per_tok)) ||
        (rc = u32_key(x, arch, "feed_forward_length", 0, &ff)))
        return rc;
    if (c->num_attention_heads <= 0 || c->hidden_size <= 0)
        return moe__set_err(x->err, x->errsz, MOE_EFORMAT, "%s: %d heads, embedding %d", x->L, c->num_attention_heads,
                            c->hidden_size);
    if ((rc = u32_key(x, arch, "attention.key_length", c->hidden_size / c->num_attention_heads, &key_len)) ||
        (rc = u32_key(x, arch, "rope.dimension_count", key_len, &n_rot)) ||
        (rc = f32_key(x, arch, "rope.freq_base", 10000.0f, &c->rope_theta)) ||
        (rc = f32_key(x, arch, "attention.layer_norm_rms_epsilon", 1e-5f, &c->rms_norm_eps)) ||
        (rc = f32_key(x, arch, "expert_weights_scale", 0.0f, &w_scale)))
        return rc;
    if (n_rot != key_len)
        return moe__set_err(x->err, x->errsz, MOE_EUNSUPPORTED, "%s: RoPE on %d of %d head dimensions (ours rotates all)",
                            x->L, n_rot, key_len);
    if (w_scale != 0.0f && w_scale != 1.0f)
        return moe__set_err(x->err, x->errsz, MOE_EUNSUPPORTED, "%s: expert_weights_scale %g", x->L, w_scale);
    if (c->num_local_experts <= 0)
        return moe__set_err(x->err, x->errsz, MOE_EUNSUPPORTED, "%s: %s.expert_count is 0 (a dense model)", x->L, arch);
    c->head_dim = key_len;
    c->intermediate_size = ff;
    if (qwen) {
        if ((rc = u32_key(x, arch, "expert_feed_forward_length", c->num_experts_per_tok ? ff / c->num_experts_per_tok : 0,
                          &c->intermediate_size)) ||
            (rc = u32_key(x, arch, "expert_shared_feed_forward_length", ff, &fs)))
            return rc;
        c->n_shared_experts = 1, c->shared_expert_intermediate_size = fs, c->shared_expert_gate = 1;
        c->norm_topk_prob = 0; /* qwen2moe uses the raw top-k weights */
    }
    const moe__gguf_tensor *te = moe__gguf_find_tensor(x->g, "token_embd.weight");
    if (!te) return moe__set_err(x->err, x->errsz, MOE_ENOTFOUND, "%s: tensor 'token_embd.weight' is missing", x->L);
    if (te->ne[1] <= 0 || te->ne[1] > MOE_TOKENIZER_MAX_VOCAB)
        return moe__set_err(x->err, x->errsz, MOE_EFORMAT, "%s: token_embd.weight has %lld rows", x->L, (long long)te->ne[1]);
    c->vocab_size = (int)te->ne[1];
    c->tie_word_embeddings = moe__gguf_find_tensor(x->g, "output.weight") == NULL;
    if (c->num_hidden_layers > MOE_MAX_LAYERS)
        return moe__set_err(x->err, x->errsz, MOE_ELIMIT, "%s: %d layers (at most %d)", x->L, c->num_hidden_layers, MOE_MAX_LAYERS);
    for (int l = 0; l < c->num_hidden_layers; l++) c->is_moe_layer[l] = 1;
    c->dense_intermediate_size = c->num_experts_per_tok * c->intermediate_size;
    /* attention biases and q/k norms: tensors our model has no place for */
    static const char *const extra[] = {"attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias",
                                        "attn_q_norm.weight", "attn_k_norm.weight"};
    for (int l = 0; l < c->num_hidden_layers; l++)
        for (int i = 0; i < 6; i++) {
            char n[96];
            snprintf(n, sizeof n, "blk.%d.%s", l, extra[i]);
            if (moe__gguf_find_tensor(x->g, n))
                return moe__set_err(x->err, x->errsz, MOE_EUNSUPPORTED, "%s: tensor '%s' (%s) has no place in our model",
                                    x->L, n, i < 4 ? "attention bias" : "q/k norm");
        }
    char msg[256];
    if ((rc = moe_model_config_check(c, msg, sizeof msg)))
        return moe__set_err(x->err, x->errsz, rc, "%s: the hyperparameters do not make a valid model: %s", x->L, msg);
    return 0;
}

/* GGUF tensor name, which must have ne == want[0..nd), converted to float
 * in a new buffer (*out, free with moe__free). */
static int load_f32(importer *x, const char *name, int nd, const int64_t *want, float **out) {
    *out = NULL;
    const moe__gguf_tensor *t = moe__gguf_find_tensor(x->g, name);
    if (!t) return moe__set_err(x->err, x->errsz, MOE_ENOTFOUND, "%s: tensor '%s' is missing", x->L, name);
    int ok = 1;
    size_t n = 1;
    for (int d = 0; d < MOE__GGUF_MAX_DIMS; d++) {
        ok &= t->ne[d] == (d < nd ? want[d] : 1);
        if (d < nd) n *= (size_t)want[d];
    }
    if (!ok)
        return moe__set_err(x->err, x->errsz, MOE_ESHAPE, "%s: tensor '%s' has ne {%lld, %lld, %lld}, expected {%lld, %lld, %lld}",
                            x->L, name, (long long)t->ne[0], (long long)t->ne[1], (long long)t->ne[2], (long long)want[0],
                            (long long)(nd > 1 ? want[1] : 1), (long long)(nd > 2 ? want[2] : 1));
    float *buf = moe__malloc(n * sizeof *buf);
    if (!buf) return moe__set_err(x->err, x->errsz, MOE_ENOMEM, "%s: out of memory", x->L);
    int rc = moe__gguf_tensor_f32(x->g, t, buf, n, x->err, x->errsz);
    if (rc) {
        moe__free(buf);
        return rc;
    }
    *out = buf;
    return 0;
}

/* Fills parameter dst_name of m from GGUF tensor src_name (a matrix
 * [rows][cols], or a vector when cols == 0); permute_heads > 0 undoes the
 * q/k permutation. */
static int fill(importer *x, moe_model *m, const char *dst_name, const char *src_name, int rows, int cols,
                int permute_heads) {
    const moe_param_info *pi = moe_model_find_tensor(m, dst_name);
    if (!pi) return moe__set_err(x->err, x->errsz, MOE_EINVAL, "convert: model has no parameter %s", dst_name);
    int64_t want[2] = {cols ? cols : rows, rows};
    float *buf;
    int rc = load_f32(x, src_name, cols ? 2 : 1, want, &buf);
    if (rc) return rc;
    float *dst = moe_model_params(m) + pi->offset;
    if (permute_heads > 0) moe__permute_qk(buf, dst, permute_heads, rows / permute_heads, cols, 1);
    else memcpy(dst, buf, pi->numel * sizeof *dst);
    moe__free(buf);
    return 0;
}

/* Expert e's slice of a stacked *_exps tensor ne {cols, rows, E}. */
static int fill_experts(importer *x, moe_model *m, int l, const char *proj, const char *src_name, int E, int rows, int cols) {
    int64_t want[3] = {cols, rows, E};
    float *buf;
    int rc = load_f32(x, src_name, 3, want, &buf);
    if (rc) return rc;
    char name[128];
    for (int e = 0; e < E && !rc; e++) {
        snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%d.%s.weight", l, e, proj);
        const moe_param_info *pi = moe_model_find_tensor(m, name);
        if (!pi) rc = moe__set_err(x->err, x->errsz, MOE_EINVAL, "convert: model has no parameter %s", name);
        else memcpy(moe_model_params(m) + pi->offset, buf + (size_t)e * rows * cols, pi->numel * sizeof(float));
    }
    moe__free(buf);
    return rc;
}

static int fill_all(importer *x, moe_model *m, const moe_model_config *c) {
    const int C = c->hidden_size, V = c->vocab_size, H = c->num_attention_heads, G = c->num_key_value_heads;
    const int D = c->head_dim, E = c->num_local_experts, F = c->intermediate_size;
    const int Fs = c->shared_expert_intermediate_size;
    int rc;
    if ((rc = fill(x, m, "model.embed_tokens.weight", "token_embd.weight", V, C, 0)) ||
        (rc = fill(x, m, "model.norm.weight", "output_norm.weight", C, 0, 0)) ||
        (!c->tie_word_embeddings && (rc = fill(x, m, "lm_head.weight", "output.weight", V, C, 0))))
        return rc;
    for (int l = 0; l < c->num_hidden_layers; l++) {
        char s[96], d[160];
#define SRC(fmt) (snprintf(s, sizeof s, "blk.%d." fmt, l), s)
#define DST(fmt) (snprintf(d, sizeof d, "model.layers.%d." fmt, l), d)
        if ((rc = fill(x, m, DST("input_layernorm.weight"), SRC("attn_norm.weight"), C, 0, 0)) ||
            (rc = fill(x, m, DST("self_attn.q_proj.weight"), SRC("attn_q.weight"), H * D, C, x->llama ? H : 0)) ||
            (rc = fill(x, m, DST("self_attn.k_proj.weight"), SRC("attn_k.weight"), G * D, C, x->llama ? G : 0)) ||
            (rc = fill(x, m, DST("self_attn.v_proj.weight"), SRC("attn_v.weight"), G * D, C, 0)) ||
            (rc = fill(x, m, DST("self_attn.o_proj.weight"), SRC("attn_output.weight"), C, H * D, 0)) ||
            (rc = fill(x, m, DST("post_attention_layernorm.weight"), SRC("ffn_norm.weight"), C, 0, 0)) ||
            (rc = fill(x, m, DST("block_sparse_moe.gate.weight"), SRC("ffn_gate_inp.weight"), E, C, 0)) ||
            (rc = fill_experts(x, m, l, "w1", SRC("ffn_gate_exps.weight"), E, F, C)) ||
            (rc = fill_experts(x, m, l, "w3", SRC("ffn_up_exps.weight"), E, F, C)) ||
            (rc = fill_experts(x, m, l, "w2", SRC("ffn_down_exps.weight"), E, C, F)))
            return rc;
        if (c->shared_expert_gate &&
            ((rc = fill(x, m, DST("block_sparse_moe.shared_expert_gate.weight"), SRC("ffn_gate_inp_shexp.weight"), C, 0, 0)) ||
             (rc = fill(x, m, DST("block_sparse_moe.shared_expert.gate_proj.weight"), SRC("ffn_gate_shexp.weight"), Fs, C, 0)) ||
             (rc = fill(x, m, DST("block_sparse_moe.shared_expert.up_proj.weight"), SRC("ffn_up_shexp.weight"), Fs, C, 0)) ||
             (rc = fill(x, m, DST("block_sparse_moe.shared_expert.down_proj.weight"), SRC("ffn_down_shexp.weight"), C, Fs, 0))))
            return rc;
#undef SRC
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

int moe_convert_gguf_to_model(const char *gguf_path, const char *dir, int *has_tokenizer, char *err, size_t errsz) {
    if (has_tokenizer) *has_tokenizer = 0;
    if (!gguf_path || !dir) return moe__set_err(err, errsz, MOE_EINVAL, "convert: bad arguments");
    moe__gguf *g = NULL;
    int rc = moe__gguf_open(gguf_path, &g, err, errsz);
    if (rc) return rc;
    importer x = {.g = g, .L = moe__gguf_label(g), .err = err, .errsz = errsz};
    moe_model_config c;
    moe_model *m = NULL;
    int tok = 0;
    if ((rc = read_config(&x, &c))) goto done;
    m = moe_model_create(&c, 1, 1, 0, 1, &rc, err, errsz);
    if (!m) goto done;
    if ((rc = fill_all(&x, m, &c)) || (rc = moe_model_save(m, dir, err, errsz))) goto done;
    rc = import_tokenizer(&x, dir, &tok);
    if (has_tokenizer) *has_tokenizer = tok;
done:
    moe_model_free(m);
    moe__gguf_close(g);
    return rc;
}
