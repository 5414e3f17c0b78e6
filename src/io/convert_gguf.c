/* Export of a `moe train` model directory to a GGUF file llama.cpp loads
 * (docs/convert.md): arch "llama" (Mixtral layout) for plain top-k models,
 * "qwen2moe" for the Qwen2-MoE shape (sigmoid-gated shared expert, raw top-k
 * weights). Anything the target architecture cannot compute exactly is
 * refused with a message naming the config key, rather than exported as a
 * file that silently computes a different function. */
#include "io/convert.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"
#include "tokenizer/vocab_impl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void moe__permute_qk(const float *src, float *dst, int n_head, int D, int cols, int inverse) {
    const int half = D / 2;
    for (int h = 0; h < n_head; h++)
        for (int i = 0; i < half; i++)
            for (int j = 0; j < 2; j++) {
                size_t llama_row = (size_t)h * D + 2 * i + j, hf_row = (size_t)h * D + (size_t)j * half + i;
                size_t d = inverse ? hf_row : llama_row, s = inverse ? llama_row : hf_row;
                memcpy(dst + d * cols, src + s * cols, (size_t)cols * sizeof *dst);
            }
}

typedef struct exporter {
    moe__gguf_writer *w;
    const moe__st_file *st;
    const char *st_path;
    uint32_t qtype;
    void **bufs; /* everything handed to the writer: it keeps pointers until write */
    int n_bufs, cap_bufs;
    char *err;
    size_t errsz;
} exporter;

static void *keep(exporter *x, size_t bytes) {
    if (x->n_bufs == x->cap_bufs) {
        int cap = x->cap_bufs ? 2 * x->cap_bufs : 64;
        void **b = moe__malloc((size_t)cap * sizeof *b);
        if (!b) return NULL;
        if (x->n_bufs) memcpy(b, x->bufs, (size_t)x->n_bufs * sizeof *b);
        moe__free(x->bufs);
        x->bufs = b, x->cap_bufs = cap;
    }
    void *p = moe__malloc(bytes ? bytes : 1);
    if (p) x->bufs[x->n_bufs++] = p;
    return p;
}

static int oom(exporter *x) { return moe__set_err(x->err, x->errsz, MOE_ENOMEM, "convert: out of memory"); }

/* Reads checkpoint tensor name, which must have shape rows x cols (cols 0:
 * 1-D of rows), into dst as float. */
static int read_src(exporter *x, const char *name, int rows, int cols, float *dst) {
    const moe__st_tensor *t = moe__st_find(x->st, name);
    if (!t) return moe__set_err(x->err, x->errsz, MOE_ENOTFOUND, "%s: tensor \"%s\" is missing", x->st_path, name);
    int ok = cols ? t->ndim == 2 && t->shape[0] == rows && t->shape[1] == cols : t->ndim == 1 && t->shape[0] == rows;
    if (!ok)
        return moe__set_err(x->err, x->errsz, MOE_ESHAPE, "%s: tensor \"%s\" has shape [%lld%s%lld], config says [%d, %d]",
                            x->st_path, name, (long long)(t->ndim > 0 ? t->shape[0] : 0), t->ndim > 1 ? ", " : " ",
                            (long long)(t->ndim > 1 ? t->shape[1] : 0), rows, cols);
    int rc = moe__st_read_f32(t, dst, t->numel);
    if (rc)
        return moe__set_err(x->err, x->errsz, rc, "%s: tensor \"%s\": dtype %s cannot be read as float", x->st_path,
                            name, moe__dtype_name(t->dtype));
    return 0;
}

/* Adds src [ne[2]][ne[1]][ne[0]] under name, in the export type for
 * matrices (1-D tensors and routers stay F32 as in convert_hf_to_gguf.py;
 * rows that do not fill whole blocks fall back to F16, as there too). */
static int emit(exporter *x, const char *name, const float *src, int n_dims, const int64_t *ne, int keep_f32) {
    size_t n = 1;
    for (int d = 0; d < n_dims; d++) n *= (size_t)ne[d];
    uint32_t type = (n_dims == 1 || keep_f32) ? MOE__GGML_F32 : x->qtype;
    if (!moe__gguf_row_size(type, (size_t)ne[0])) type = MOE__GGML_F16;
    size_t bytes = moe__gguf_row_size(type, n);
    void *dst = keep(x, bytes);
    if (!dst) return oom(x);
    int rc = moe__gguf_quantize(type, src, dst, n);
    if (rc)
        return moe__set_err(x->err, x->errsz, rc, "%s: tensor for \"%s\" cannot be stored as %s (%s)", x->st_path, name,
                            moe__gguf_type_name(type), moe_strerror(rc));
    rc = moe__gguf_writer_add_tensor(x->w, name, type, n_dims, ne, dst, bytes);
    if (rc) return moe__set_err(x->err, x->errsz, rc, "%s", moe__gguf_writer_errmsg(x->w));
    return 0;
}

/* One checkpoint matrix [rows][cols] (or vector when cols == 0) to one GGUF
 * tensor; permute_heads > 0 applies the q/k permutation over that many heads. */
static int copy_tensor(exporter *x, const char *src_name, const char *dst_name, int rows, int cols,
                       int permute_heads, int keep_f32) {
    size_t n = (size_t)rows * (size_t)(cols ? cols : 1);
    float *buf = moe__malloc(2 * n * sizeof *buf); /* [2][n]: read, permuted */
    if (!buf) return oom(x);
    int rc = read_src(x, src_name, rows, cols, buf);
    const float *out = buf;
    if (!rc && permute_heads > 0) {
        moe__permute_qk(buf, buf + n, permute_heads, rows / permute_heads, cols, 0);
        out = buf + n;
    }
    int64_t ne[2] = {cols ? cols : rows, rows};
    if (!rc) rc = emit(x, dst_name, out, cols ? 2 : 1, ne, keep_f32);
    moe__free(buf);
    return rc;
}

/* The E per-expert matrices [rows][cols] of one projection, stacked into
 * one 3-D tensor ne {cols, rows, E} (llama.cpp's *_exps). */
static int stack_experts(exporter *x, int l, const char *proj, const char *dst_name, int E, int rows, int cols) {
    size_t per = (size_t)rows * cols;
    float *buf = moe__malloc((size_t)E * per * sizeof *buf); /* [E][rows][cols] */
    if (!buf) return oom(x);
    int rc = 0;
    char name[128];
    for (int e = 0; e < E && !rc; e++) {
        snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.experts.%d.%s.weight", l, e, proj);
        rc = read_src(x, name, rows, cols, buf + (size_t)e * per);
    }
    int64_t ne[3] = {cols, rows, E};
    if (!rc) rc = emit(x, dst_name, buf, 3, ne, 0);
    moe__free(buf);
    return rc;
}

typedef enum target { TARGET_LLAMA, TARGET_QWEN2MOE } target;

/* Which llama.cpp architecture computes this model exactly, or why none does. */
static int choose_target(const moe_model_config *c, const char *cfg_path, target *out, char *err, size_t errsz) {
#define REFUSE(...) return moe__set_err(err, errsz, MOE_EUNSUPPORTED, __VA_ARGS__)
    if (c->num_local_experts <= 0) REFUSE("%s: a dense model (num_local_experts 0); export is for MoE models", cfg_path);
    for (int l = 0; l < c->num_hidden_layers; l++)
        if (!c->is_moe_layer[l])
            REFUSE("%s: layer %d is dense (moe_layer_indices); llama.cpp's llama and qwen2moe need every layer MoE",
                   cfg_path, l);
    if (c->scoring_func != MOE_SCORE_SOFTMAX) REFUSE("%s: scoring_func is not softmax (llama/qwen2moe gate with softmax)", cfg_path);
    if (c->routed_scaling_factor != 1.0f) REFUSE("%s: routed_scaling_factor %g (only 1 is exported)", cfg_path, c->routed_scaling_factor);
    if (c->router_type != MOE_ROUTER_TOPK)
        REFUSE("%s: router_type is not \"topk\" (llama.cpp routes with plain softmax top-k)", cfg_path);
    if (c->router_bias_update_rate > 0) REFUSE("%s: router_bias_update_rate > 0 (a selection bias llama/qwen2moe lack)", cfg_path);
    if (c->n_group > 0) REFUSE("%s: n_group %d (group-limited routing)", cfg_path, c->n_group);
    if (c->n_shared_experts == 0) {
        if (!c->norm_topk_prob)
            REFUSE("%s: norm_topk_prob false without shared experts: llama.cpp's llama renormalises the top-k weights",
                   cfg_path);
        *out = TARGET_LLAMA;
        return 0;
    }
    if (!c->shared_expert_gate)
        REFUSE("%s: shared experts without shared_expert_gate: no exported llama.cpp architecture adds an ungated "
               "shared expert with standard attention (llama's shexp tensors are loaded but not computed)",
               cfg_path);
    if (c->norm_topk_prob)
        REFUSE("%s: shared_expert_gate with norm_topk_prob true: qwen2moe uses the raw top-k weights", cfg_path);
    *out = TARGET_QWEN2MOE;
    return 0;
#undef REFUSE
}

/* ---- tokenizer ---------------------------------------------------------------- */

typedef struct tokstr {
    char *s;
    size_t len;
    int id;
} tokstr;

static int tokstr_cmp(const void *a, const void *b) {
    const tokstr *x = a, *y = b;
    size_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->s, y->s, n);
    if (c) return c;
    if (x->len != y->len) return x->len < y->len ? -1 : 1;
    return x->id - y->id;
}

/* GPT-2's byte-level text of raw bytes (each byte one code point). */
static char *byte_text(exporter *x, const char *bytes, size_t n, size_t *len) {
    char *s = keep(x, 4 * n + 1);
    if (!s) return NULL;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) k += moe__utf8_encode(moe__bpe_byte_cp((unsigned char)bytes[i]), (unsigned char *)s + k);
    s[k] = 0;
    *len = k;
    return s;
}

/* tokenizer.ggml.* for our byte-level BPE: ids 0..255 bytes, 256.. merges,
 * EOS last; ids past the tokenizer up to the model's V are unused padding.
 * Two merges can spell the same bytes; llama.cpp needs distinct token texts,
 * so a later duplicate gets a placeholder text (type UNUSED): llama.cpp's
 * merges then produce the first id, which has the same bytes. */
static int export_tokenizer(exporter *x, const moe_tokenizer *tok, int V) {
    const int Vt = moe_tokenizer_vocab_size(tok), eos = moe_tokenizer_eos(tok), M = moe_tokenizer_n_merges(tok);
    if (Vt > V)
        return moe__set_err(x->err, x->errsz, MOE_ESHAPE, "tokenizer has %d tokens, the model's vocab_size is %d", Vt, V);
    const char **texts = keep(x, (size_t)V * sizeof *texts);
    int32_t *types = keep(x, (size_t)V * sizeof *types);
    tokstr *sorted = keep(x, (size_t)V * sizeof *sorted);
    const char **merges = keep(x, (size_t)(M ? M : 1) * sizeof *merges);
    if (!texts || !types || !sorted || !merges) return oom(x);
    for (int id = 0; id < V; id++) {
        size_t len = 0;
        if (id < Vt && id != eos) {
            const char *p = moe_tokenizer_piece(tok, id, &len);
            texts[id] = byte_text(x, p, len, &len);
            types[id] = 1; /* LLAMA_TOKEN_TYPE_NORMAL */
        } else {
            char *s = keep(x, 32);
            if (s) len = (size_t)snprintf(s, 32, id == eos ? MOE_TOKENIZER_EOS_TEXT : "<|pad_%d|>", id);
            texts[id] = s;
            types[id] = id == eos ? 3 : 5; /* CONTROL, UNUSED */
        }
        if (!texts[id]) return oom(x);
        sorted[id] = (tokstr){(char *)texts[id], len, id};
    }
    qsort(sorted, (size_t)V, sizeof *sorted, tokstr_cmp);
    for (int i = 1; i < V; i++)
        if (sorted[i].len == sorted[i - 1].len && !memcmp(sorted[i].s, sorted[i - 1].s, sorted[i].len)) {
            char *s = keep(x, 32);
            if (!s) return oom(x);
            snprintf(s, 32, "<|dup_%d|>", sorted[i].id);
            texts[sorted[i].id] = s;
            types[sorted[i].id] = 5;
        }
    for (int r = 0; r < M; r++) {
        int32_t a, b;
        size_t la, lb;
        moe_tokenizer_merge(tok, r, &a, &b);
        const char *pa = moe_tokenizer_piece(tok, a, &la), *pb = moe_tokenizer_piece(tok, b, &lb);
        char *sa = byte_text(x, pa, la, &la), *sb = byte_text(x, pb, lb, &lb), *m = keep(x, la + lb + 2);
        if (!sa || !sb || !m) return oom(x);
        memcpy(m, sa, la);
        m[la] = ' ';
        memcpy(m + la + 1, sb, lb + 1);
        merges[r] = m;
    }
    moe__gguf_writer *w = x->w;
    moe__gguf_writer_add_str(w, "tokenizer.ggml.model", "gpt2");
    moe__gguf_writer_add_str(w, "tokenizer.ggml.pre", "gpt-2");
    moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", texts, (size_t)V);
    moe__gguf_writer_add_arr(w, "tokenizer.ggml.token_type", MOE__GGUF_I32, types, (size_t)V);
    moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", merges, (size_t)M);
    moe__gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)eos);
    moe__gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)eos);
    moe__gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", 0);
    return moe__gguf_writer_add_bool(w, "tokenizer.ggml.add_eos_token", 0);
}

/* ---- model -------------------------------------------------------------------- */

static int export_weights(exporter *x, const moe_model_config *c, target tg) {
    const int C = c->hidden_size, V = c->vocab_size, H = c->num_attention_heads, G = c->num_key_value_heads;
    const int D = c->head_dim, E = c->num_local_experts, F = c->intermediate_size;
    const int Fs = c->n_shared_experts * c->shared_expert_intermediate_size;
    const int permute = tg == TARGET_LLAMA; /* qwen2moe rotates halves, as HF does */
    int rc;
    if ((rc = copy_tensor(x, "model.embed_tokens.weight", "token_embd.weight", V, C, 0, 0)) ||
        (rc = copy_tensor(x, "model.norm.weight", "output_norm.weight", C, 0, 0, 0)))
        return rc;
    /* qwen2moe requires output.weight even when tied */
    if (!c->tie_word_embeddings || tg == TARGET_QWEN2MOE) {
        const char *src = c->tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight";
        if ((rc = copy_tensor(x, src, "output.weight", V, C, 0, 0))) return rc;
    }
    for (int l = 0; l < c->num_hidden_layers; l++) {
        char s[160], d[64];
#define SRC(fmt) (snprintf(s, sizeof s, "model.layers.%d." fmt, l), s)
#define DST(fmt) (snprintf(d, sizeof d, "blk.%d." fmt, l), d)
        if ((rc = copy_tensor(x, SRC("input_layernorm.weight"), DST("attn_norm.weight"), C, 0, 0, 0)) ||
            (rc = copy_tensor(x, SRC("self_attn.q_proj.weight"), DST("attn_q.weight"), H * D, C, permute ? H : 0, 0)) ||
            (rc = copy_tensor(x, SRC("self_attn.k_proj.weight"), DST("attn_k.weight"), G * D, C, permute ? G : 0, 0)) ||
            (rc = copy_tensor(x, SRC("self_attn.v_proj.weight"), DST("attn_v.weight"), G * D, C, 0, 0)) ||
            (rc = copy_tensor(x, SRC("self_attn.o_proj.weight"), DST("attn_output.weight"), C, H * D, 0, 0)) ||
            (rc = copy_tensor(x, SRC("post_attention_layernorm.weight"), DST("ffn_norm.weight"), C, 0, 0, 0)) ||
            (rc = copy_tensor(x, SRC("block_sparse_moe.gate.weight"), DST("ffn_gate_inp.weight"), E, C, 0, 1)) ||
            (rc = stack_experts(x, l, "w1", DST("ffn_gate_exps.weight"), E, F, C)) ||
            (rc = stack_experts(x, l, "w3", DST("ffn_up_exps.weight"), E, F, C)) ||
            (rc = stack_experts(x, l, "w2", DST("ffn_down_exps.weight"), E, C, F)))
            return rc;
        if (tg == TARGET_QWEN2MOE) {
            /* [1][C] in the checkpoint, a vector {C} in llama.cpp */
            float *gw = moe__malloc((size_t)C * sizeof *gw);
            if (!gw) return oom(x);
            rc = read_src(x, SRC("block_sparse_moe.shared_expert_gate.weight"), 1, C, gw);
            int64_t ne[1] = {C};
            if (!rc) rc = emit(x, DST("ffn_gate_inp_shexp.weight"), gw, 1, ne, 1);
            moe__free(gw);
            if (rc ||
                (rc = copy_tensor(x, SRC("block_sparse_moe.shared_expert.gate_proj.weight"), DST("ffn_gate_shexp.weight"), Fs, C, 0, 0)) ||
                (rc = copy_tensor(x, SRC("block_sparse_moe.shared_expert.up_proj.weight"), DST("ffn_up_shexp.weight"), Fs, C, 0, 0)) ||
                (rc = copy_tensor(x, SRC("block_sparse_moe.shared_expert.down_proj.weight"), DST("ffn_down_shexp.weight"), C, Fs, 0, 0)))
                return rc;
        }
#undef SRC
#undef DST
    }
    return 0;
}

static void export_hparams(exporter *x, const moe_model_config *c, target tg) {
    moe__gguf_writer *w = x->w;
    const char *a = tg == TARGET_LLAMA ? "llama" : "qwen2moe";
    char k[96];
#define KEY(s) (snprintf(k, sizeof k, "%s." s, a), k)
    moe__gguf_writer_add_str(w, "general.architecture", a);
    moe__gguf_writer_add_str(w, "general.name", "moe");
    moe__gguf_writer_add_u32(w, KEY("vocab_size"), (uint32_t)c->vocab_size);
    moe__gguf_writer_add_u32(w, KEY("context_length"), (uint32_t)c->max_position_embeddings);
    moe__gguf_writer_add_u32(w, KEY("embedding_length"), (uint32_t)c->hidden_size);
    moe__gguf_writer_add_u32(w, KEY("block_count"), (uint32_t)c->num_hidden_layers);
    moe__gguf_writer_add_u32(w, KEY("feed_forward_length"), (uint32_t)c->intermediate_size);
    moe__gguf_writer_add_u32(w, KEY("attention.head_count"), (uint32_t)c->num_attention_heads);
    moe__gguf_writer_add_u32(w, KEY("attention.head_count_kv"), (uint32_t)c->num_key_value_heads);
    moe__gguf_writer_add_u32(w, KEY("attention.key_length"), (uint32_t)c->head_dim);
    moe__gguf_writer_add_u32(w, KEY("attention.value_length"), (uint32_t)c->head_dim);
    moe__gguf_writer_add_u32(w, KEY("rope.dimension_count"), (uint32_t)c->head_dim);
    moe__gguf_writer_add_f32(w, KEY("rope.freq_base"), c->rope_theta);
    moe__gguf_writer_add_f32(w, KEY("attention.layer_norm_rms_epsilon"), c->rms_norm_eps);
    moe__gguf_writer_add_u32(w, KEY("expert_count"), (uint32_t)c->num_local_experts);
    moe__gguf_writer_add_u32(w, KEY("expert_used_count"), (uint32_t)c->num_experts_per_tok);
    if (tg == TARGET_QWEN2MOE) {
        moe__gguf_writer_add_u32(w, KEY("expert_feed_forward_length"), (uint32_t)c->intermediate_size);
        moe__gguf_writer_add_u32(w, KEY("expert_shared_feed_forward_length"),
                                 (uint32_t)(c->n_shared_experts * c->shared_expert_intermediate_size));
    }
#undef KEY
}

static uint32_t ggml_type_of(moe_convert_type t) {
    switch (t) {
    case MOE_CONVERT_F16: return MOE__GGML_F16;
    case MOE_CONVERT_Q8_0: return MOE__GGML_Q8_0;
    case MOE_CONVERT_Q4_0: return MOE__GGML_Q4_0;
    default: return MOE__GGML_F32;
    }
}

int moe_convert_model_to_gguf(const char *dir, const char *out_path, moe_convert_type type, char *err, size_t errsz) {
    if (!dir || !out_path || (int)type < 0 || type > MOE_CONVERT_Q4_0)
        return moe__set_err(err, errsz, MOE_EINVAL, "convert: bad arguments");
    char cfg_path[4096], st_path[4096], tok_path[4096];
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", dir);
    snprintf(st_path, sizeof st_path, "%s/model.safetensors", dir);
    snprintf(tok_path, sizeof tok_path, "%s/tokenizer.json", dir);
    moe_model_config c;
    target tg = TARGET_LLAMA;
    int rc = moe_model_config_load(cfg_path, &c, err, errsz);
    if (rc || (rc = choose_target(&c, cfg_path, &tg, err, errsz))) return rc;
    moe_tokenizer *tok = NULL;
    moe__st_file *st = NULL;
    exporter x = {.st_path = st_path, .qtype = ggml_type_of(type), .err = err, .errsz = errsz};
    if ((rc = moe_tokenizer_load(tok_path, &tok, err, errsz)) || (rc = moe__st_open(st_path, &st, err, errsz)))
        goto done;
    x.st = st;
    if ((rc = moe__gguf_writer_new(&x.w))) {
        rc = oom(&x);
        goto done;
    }
    export_hparams(&x, &c, tg);
    moe__gguf_writer_add_u32(x.w, "general.file_type", type == MOE_CONVERT_F32 ? 0 : type == MOE_CONVERT_F16 ? 1
                                                      : type == MOE_CONVERT_Q8_0 ? 7 : 2);
    if ((rc = export_tokenizer(&x, tok, c.vocab_size)) || (rc = export_weights(&x, &c, tg))) goto done;
    rc = moe__gguf_writer_write(x.w, out_path, err, errsz);
done:
    moe__gguf_writer_free(x.w);
    for (int i = 0; i < x.n_bufs; i++) moe__free(x.bufs[i]);
    moe__free(x.bufs);
    moe__st_close(st);
    moe_tokenizer_free(tok);
    return rc;
}
