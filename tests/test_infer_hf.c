/* The engine on Hugging Face directories (config.json + safetensors, one
 * tensor per expert, q/k in rotate_half order): the tiny random models of
 * test_infer_ref.c written both ways give the same logits from the
 * directory as from the GGUF file and as the double reference; shards,
 * F16/BF16 tensors, our own checkpoints (moe_model) and hostile directories. */
#include "io/convert.h"
#include "io/quant.h"
#include "io/safetensors.h"
#include "moe.h"
#include "test.h"
#include "test_infer_ref.h"

#include <stdlib.h>
#include <string.h>

#define T_MAX 11
static const int32_t k_tok[T_MAX] = {1, 17, 5, 66, 0, 23, 23, 42, 9, 60, 31};

typedef struct hf_out {
    moe__st_out t[128];
    void *own[128];
    int n, n_own;
} hf_out;

/* Adds a tensor of values x (n floats; the tensor's ref) as dtype. */
static void put(hf_out *o, const char *name, const float *x, int ndim, int64_t d0, int64_t d1, moe__dtype dt) {
    char *nm = strdup(name);
    size_t n = (size_t)(d0 * (ndim > 1 ? d1 : 1));
    void *data;
    if (dt == MOE__DT_F32) {
        data = malloc(n * 4);
        memcpy(data, x, n * 4);
    } else {
        uint16_t *h = malloc(n * 2);
        for (size_t i = 0; i < n; i++) h[i] = dt == MOE__DT_F16 ? moe__gguf_f32_to_fp16(x[i]) : moe__gguf_f32_to_bf16(x[i]);
        data = h;
    }
    o->own[o->n_own++] = nm;
    o->own[o->n_own++] = data;
    moe__st_out *t = &o->t[o->n++];
    memset(t, 0, sizeof *t);
    t->name = nm, t->dtype = dt, t->ndim = ndim, t->shape[0] = d0, t->shape[1] = d1, t->data = data;
}

/* The HF layout of a tiny GGUF model. Matrices in mdt (vectors F32). */
static void to_hf(const tiny_model *m, hf_out *o, moe__dtype mdt, const char *skip) {
    const tiny_spec *s = &m->s;
    const int mix = s->arch == TINY_LLAMA, HD = s->H * s->D, GD = s->G * s->D;
    const char *moe = mix ? "block_sparse_moe" : "mlp";
    char n[160];
    memset(o, 0, sizeof *o);
    put(o, "model.embed_tokens.weight", tiny_get(m, "token_embd.weight"), 2, s->V, s->C, mdt);
    put(o, "model.norm.weight", tiny_get(m, "output_norm.weight"), 1, s->C, 0, MOE__DT_F32);
    if (!s->tied) put(o, "lm_head.weight", tiny_get(m, "output.weight"), 2, s->V, s->C, mdt);
    for (int l = 0; l < s->L; l++) {
        char g[64];
#define G(x) (snprintf(g, sizeof g, "blk.%d." x, l), tiny_get(m, g))
#define N(x) (snprintf(n, sizeof n, "model.layers.%d." x, l), n)
#define M(x) (snprintf(n, sizeof n, "model.layers.%d.%s." x, l, moe), n)
        put(o, N("input_layernorm.weight"), G("attn_norm.weight"), 1, s->C, 0, MOE__DT_F32);
        put(o, N("post_attention_layernorm.weight"), G("ffn_norm.weight"), 1, s->C, 0, MOE__DT_F32);
        float *q = malloc(sizeof(float) * HD * s->C), *k = malloc(sizeof(float) * GD * s->C);
        if (mix) { /* the GGUF holds llama.cpp's adjacent-pair rows: back to rotate_half */
            moe__permute_qk(G("attn_q.weight"), q, s->H, s->D, s->C, 1);
            moe__permute_qk(G("attn_k.weight"), k, s->G, s->D, s->C, 1);
        } else {
            memcpy(q, G("attn_q.weight"), sizeof(float) * HD * s->C);
            memcpy(k, G("attn_k.weight"), sizeof(float) * GD * s->C);
        }
        put(o, N("self_attn.q_proj.weight"), q, 2, HD, s->C, mdt);
        put(o, N("self_attn.k_proj.weight"), k, 2, GD, s->C, mdt);
        free(q), free(k);
        put(o, N("self_attn.v_proj.weight"), G("attn_v.weight"), 2, GD, s->C, mdt);
        put(o, N("self_attn.o_proj.weight"), G("attn_output.weight"), 2, s->C, HD, mdt);
        if (s->bias) {
            put(o, N("self_attn.q_proj.bias"), G("attn_q.bias"), 1, HD, 0, MOE__DT_F32);
            put(o, N("self_attn.k_proj.bias"), G("attn_k.bias"), 1, GD, 0, MOE__DT_F32);
            put(o, N("self_attn.v_proj.bias"), G("attn_v.bias"), 1, GD, 0, MOE__DT_F32);
        }
        if (s->arch == TINY_OLMOE) {
            put(o, N("self_attn.q_norm.weight"), G("attn_q_norm.weight"), 1, HD, 0, MOE__DT_F32);
            put(o, N("self_attn.k_norm.weight"), G("attn_k_norm.weight"), 1, GD, 0, MOE__DT_F32);
        }
        put(o, M("gate.weight"), G("ffn_gate_inp.weight"), 2, s->E, s->C, MOE__DT_F32);
        static const char *gguf[3] = {"ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight"};
        static const char *hfm[3] = {"w1", "w3", "w2"}, *hfq[3] = {"gate_proj", "up_proj", "down_proj"};
        for (int p = 0; p < 3; p++) {
            snprintf(g, sizeof g, "blk.%d.%s", l, gguf[p]);
            const float *w = tiny_get(m, g);
            const int rows = p == 2 ? s->C : s->F, cols = p == 2 ? s->F : s->C;
            for (int e = 0; e < s->E; e++) {
                snprintf(n, sizeof n, "model.layers.%d.%s.experts.%d.%s.weight", l, moe, e, mix ? hfm[p] : hfq[p]);
                if (skip && !strcmp(skip, n)) continue;
                put(o, n, w + (size_t)e * rows * cols, 2, rows, cols, mdt);
            }
        }
        if (s->Fs) {
            put(o, M("shared_expert_gate.weight"), G("ffn_gate_inp_shexp.weight"), 2, 1, s->C, MOE__DT_F32);
            put(o, M("shared_expert.gate_proj.weight"), G("ffn_gate_shexp.weight"), 2, s->Fs, s->C, mdt);
            put(o, M("shared_expert.up_proj.weight"), G("ffn_up_shexp.weight"), 2, s->Fs, s->C, mdt);
            put(o, M("shared_expert.down_proj.weight"), G("ffn_down_shexp.weight"), 2, s->C, s->Fs, mdt);
        }
#undef G
#undef N
#undef M
    }
}

static void hf_free(hf_out *o) {
    for (int i = 0; i < o->n_own; i++) free(o->own[i]);
}

/* extra: keys put first, so that they override (cJSON finds the first). */
static void write_config(const char *dir, const tiny_spec *s, const char *extra) {
    char path[256];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) return;
    static const char *types[] = {"mixtral", "qwen2_moe", "olmoe"};
    fprintf(f,
            "{%s\"model_type\": \"%s\", \"hidden_size\": %d, \"num_hidden_layers\": %d, \"num_attention_heads\": %d,"
            " \"num_key_value_heads\": %d, \"head_dim\": %d, \"max_position_embeddings\": 64, \"rms_norm_eps\": %.9g,"
            " \"rope_theta\": %.9g, \"%s\": %d, \"num_experts_per_tok\": %d, \"%s\": %d, \"intermediate_size\": %d,"
            " \"shared_expert_intermediate_size\": %d, \"tie_word_embeddings\": %s}\n",
            extra ? extra : "", types[s->arch], s->C, s->L, s->H, s->G, s->D, s->eps, s->rope_base,
            s->arch == TINY_LLAMA ? "num_local_experts" : "num_experts", s->E, s->K,
            s->arch == TINY_QWEN2MOE ? "moe_intermediate_size" : "intermediate_size", s->F,
            s->arch == TINY_QWEN2MOE ? 5555 : s->F, s->Fs, s->tied ? "true" : "false");
    fclose(f);
}

/* shards > 1: the tensors dealt round-robin into that many files plus the index. */
static int write_hf(const char *dir, const tiny_model *m, moe__dtype mdt, int shards, const char *skip, const char *extra) {
    char path[256], err[512];
    hf_out o;
    to_hf(m, &o, mdt, skip);
    write_config(dir, &m->s, extra);
    int rc = 0;
    if (shards <= 1) {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        rc = moe__st_write(path, o.t, o.n, NULL, err, sizeof err);
    } else {
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
        FILE *f = fopen(path, "w");
        fprintf(f, "{\"metadata\": {}, \"weight_map\": {");
        for (int i = 0; i < o.n; i++)
            fprintf(f, "%s\"%s\": \"model-%05d-of-%05d.safetensors\"", i ? ", " : "", o.t[i].name, i % shards + 1, shards);
        fprintf(f, "}}\n");
        fclose(f);
        for (int sh = 0; sh < shards && !rc; sh++) {
            moe__st_out part[128];
            int k = 0;
            for (int i = sh; i < o.n; i += shards) part[k++] = o.t[i];
            snprintf(path, sizeof path, "%s/model-%05d-of-%05d.safetensors", dir, sh + 1, shards);
            rc = moe__st_write(path, part, k, NULL, err, sizeof err);
        }
    }
    CHECK_MSG(rc == 0, "write_hf: %s", err);
    hf_free(&o);
    return rc;
}

/* Max relative difference of the directory's logits from the GGUF's, and
 * (via *ref_rel) from the double reference. */
static double hf_vs_gguf(const char *dir, const tiny_model *m, double *ref_rel) {
    char gguf[256], err[512];
    snprintf(gguf, sizeof gguf, "%s/tiny.gguf", dir);
    CHECK_EQ_INT(tiny_write(m, gguf, NULL, 0), 0);
    moe_engine_params p = moe_engine_params_default();
    /* F32 cache: the two rope pairings give K values that differ in the last
     * float bits, which fp16 rounding can blow up to 2^-11 */
    p.n_threads = 1, p.n_ctx = 16, p.kv_f16_k = p.kv_f16_v = 0;
    moe_engine *a = NULL, *b = NULL;
    int rc = moe_engine_load(dir, &p, &a, err, sizeof err);
    CHECK_MSG(rc == 0, "hf load: %s", err);
    CHECK_EQ_INT(moe_engine_load(gguf, &p, &b, err, sizeof err), 0);
    if (!a || !b) {
        moe_engine_free(a), moe_engine_free(b);
        return 1e30;
    }
    const int V = m->s.V;
    CHECK_EQ_INT(moe_engine_get_hparams(a)->n_vocab, V);
    CHECK_EQ_INT(moe_engine_get_hparams(a)->tied_output, m->s.tied);
    CHECK_EQ_INT(moe_engine_get_hparams(a)->n_ff_shexp, m->s.Fs);
    float *la = malloc(sizeof(float) * T_MAX * V), *lb = malloc(sizeof(float) * T_MAX * V);
    double *ref = malloc(sizeof(double) * T_MAX * V), md = 0, mr = 0, mf = 0;
    CHECK_EQ_INT(moe_engine_eval(a, k_tok, T_MAX, la, 1), 0);
    CHECK_EQ_INT(moe_engine_eval(b, k_tok, T_MAX, lb, 1), 0);
    tiny_ref_forward(m, k_tok, T_MAX, m->s.K, ref);
    for (int i = 0; i < T_MAX * V; i++) {
        md = fmax(md, fabs((double)la[i] - lb[i]));
        mf = fmax(mf, fabs((double)la[i] - ref[i]));
        mr = fmax(mr, fabs(ref[i]));
    }
    *ref_rel = mf / mr;
    free(la), free(lb), free(ref);
    moe_engine_free(a), moe_engine_free(b);
    return md / mr;
}

static void check_arch(int arch, int tied, moe__dtype mdt, uint32_t wtype, int shards) {
    tiny_spec s = tiny_default(arch);
    s.tied = tied, s.wtype = wtype; /* F16/BF16 refs: the values the HF file holds exactly */
    tiny_model m;
    tiny_build(&m, &s, 4321 + (uint64_t)arch);
    char dir[128];
    if (!moe_test_tmpdir(dir, "inferhf")) return;
    if (write_hf(dir, &m, mdt, shards, NULL, NULL) == 0) {
        double ref_rel, rel = hf_vs_gguf(dir, &m, &ref_rel);
        /* same weights; only the rope pairing (halves vs permuted adjacent pairs)
         * changes the order of the q.k sums */
        CHECK_MSG(rel < 1e-5, "arch %d tied %d dtype %d shards %d: HF vs GGUF %.3g", arch, tied, mdt, shards, rel);
        CHECK_MSG(ref_rel < 1e-4, "arch %d: HF vs double reference %.3g", arch, ref_rel);
    }
    tiny_free(&m);
    moe_test_rmdir(dir);
}

TEST(infer_hf_mixtral_matches_gguf_and_reference) {
    check_arch(TINY_LLAMA, 0, MOE__DT_F32, MOE__GGML_F32, 1);
    check_arch(TINY_LLAMA, 1, MOE__DT_F32, MOE__GGML_F32, 3); /* tied, sharded */
    check_arch(TINY_LLAMA, 0, MOE__DT_BF16, MOE__GGML_BF16, 1);
}

TEST(infer_hf_qwen2moe_matches_gguf_and_reference) {
    check_arch(TINY_QWEN2MOE, 0, MOE__DT_F32, MOE__GGML_F32, 1);
    check_arch(TINY_QWEN2MOE, 0, MOE__DT_F16, MOE__GGML_F16, 2);
}

TEST(infer_hf_olmoe_matches_gguf_and_reference) {
    check_arch(TINY_OLMOE, 0, MOE__DT_F32, MOE__GGML_F32, 1);
}

/* Our own `moe train` directory: the engine's logits equal moe_model_forward's. */
TEST(infer_hf_loads_our_checkpoints) {
    char dir[128], err[512];
    if (!moe_test_tmpdir(dir, "inferck")) return;
    for (int shared = 0; shared < 2; shared++) {
        moe_model_config c;
        CHECK_EQ_INT(moe_model_preset("tiny", &c), 0);
        c.vocab_size = 97;
        if (shared) c.n_shared_experts = 1, c.shared_expert_intermediate_size = 48, c.shared_expert_gate = 1;
        int rc;
        moe_model *m = moe_model_create(&c, 1, T_MAX, 0, 1, &rc, err, sizeof err);
        if (!m) continue;
        moe_model_init(m, 5 + shared);
        float *p = moe_model_params(m);
        for (int t = 0; t < moe_model_n_tensors(m); t++) {
            const moe_param_info *pi = moe_model_tensor(m, t);
            for (size_t i = 0; pi->ndim > 1 && i < pi->numel; i++) p[pi->offset + i] *= 5.0f;
        }
        CHECK_EQ_INT(moe_model_save(m, dir, err, sizeof err), 0);
        moe_engine_params ep = moe_engine_params_default();
        ep.n_threads = 1, ep.n_ctx = 16, ep.kv_f16_k = ep.kv_f16_v = 0; /* the model's float attention */
        moe_engine *e = NULL;
        CHECK_MSG(moe_engine_load(dir, &ep, &e, err, sizeof err) == 0, "load: %s", err);
        if (e) {
            float *lg = malloc(sizeof(float) * T_MAX * c.vocab_size);
            CHECK_EQ_INT(moe_engine_eval(e, k_tok, T_MAX, lg, 1), 0);
            CHECK_EQ_INT(moe_model_forward(m, k_tok, NULL, 1, T_MAX, NULL), 0);
            const float *ref = moe_model_logits(m);
            double md = 0, mr = 0;
            for (int i = 0; i < T_MAX * c.vocab_size; i++) {
                md = fmax(md, fabs((double)lg[i] - ref[i]));
                mr = fmax(mr, fabs(ref[i]));
            }
            CHECK_MSG(md / mr < 1e-5, "shared %d: engine vs model %.3g", shared, md / mr);
            free(lg);
            moe_engine_free(e);
        }
        moe_model_free(m);
    }
    /* an ungated shared expert is refused, not silently dropped */
    moe_model_config c;
    CHECK_EQ_INT(moe_model_preset("tiny", &c), 0);
    c.vocab_size = 97, c.n_shared_experts = 1, c.shared_expert_intermediate_size = 48;
    int rc;
    moe_model *m = moe_model_create(&c, 1, 4, 0, 1, &rc, err, sizeof err);
    if (m) CHECK_EQ_INT(moe_model_save(m, dir, err, sizeof err), 0);
    moe_engine *e = NULL;
    CHECK_EQ_INT(moe_engine_load(dir, NULL, &e, err, sizeof err), MOE_EUNSUPPORTED);
    CHECK(strstr(err, "shared_expert_gate") != NULL);
    moe_model_free(m);
    moe_test_rmdir(dir);
}

TEST(infer_hf_hostile_directories) {
    tiny_spec s = tiny_default(TINY_LLAMA);
    tiny_model m;
    tiny_build(&m, &s, 99);
    char dir[128], path[256], err[512];
    if (!moe_test_tmpdir(dir, "inferhfbad")) return;
    moe_engine *e = NULL;
    /* a missing expert */
    write_hf(dir, &m, MOE__DT_F32, 1, "model.layers.1.block_sparse_moe.experts.2.w3.weight", NULL);
    CHECK_EQ_INT(moe_engine_load(dir, NULL, &e, err, sizeof err), MOE_ENOTFOUND);
    CHECK(strstr(err, "experts.2.w3.weight") != NULL);
    /* config and tensors disagree */
    write_hf(dir, &m, MOE__DT_F32, 1, NULL, "\"num_key_value_heads\": 4, ");
    CHECK_EQ_INT(moe_engine_load(dir, NULL, &e, err, sizeof err), MOE_ESHAPE);
    CHECK(strstr(err, "k_proj") != NULL);
    /* unknown model type, routing we do not compute, broken JSON */
    write_hf(dir, &m, MOE__DT_F32, 1, NULL, "\"model_type\": \"llama\", ");
    CHECK_EQ_INT(moe_engine_load(dir, NULL, &e, err, sizeof err), MOE_EUNSUPPORTED);
    write_hf(dir, &m, MOE__DT_F32, 1, NULL, "\"scoring_func\": \"sigmoid\", ");
    CHECK_EQ_INT(moe_engine_load(dir, NULL, &e, err, sizeof err), MOE_EUNSUPPORTED);
    write_hf(dir, &m, MOE__DT_F32, 1, NULL, "\"num_experts_per_tok\": 9, ");
    CHECK_EQ_INT(moe_engine_load(dir, NULL, &e, err, sizeof err), MOE_EFORMAT);
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    if (f) fputs("{\"model_type\": \"mixtral\", ", f), fclose(f);
    CHECK_EQ_INT(moe_engine_load(dir, NULL, &e, err, sizeof err), MOE_EFORMAT);
    /* an index naming a file outside the directory */
    write_hf(dir, &m, MOE__DT_F32, 2, NULL, NULL);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    f = fopen(path, "w");
    if (f) fputs("{\"weight_map\": {\"model.norm.weight\": \"../escape.safetensors\"}}", f), fclose(f);
    CHECK_EQ_INT(moe_engine_load(dir, NULL, &e, err, sizeof err), MOE_EFORMAT);
    CHECK(e == NULL);
    tiny_free(&m);
    moe_test_rmdir(dir);
}

/* moe convert DIR --out DIR2: a Hugging Face Mixtral directory imported as
 * our checkpoint computes what the engine computes from the directory. */
TEST(infer_hf_import_to_checkpoint) {
    tiny_spec s = tiny_default(TINY_LLAMA);
    tiny_model tm;
    tiny_build(&tm, &s, 123);
    char dir[128], back[160], err[512];
    if (!moe_test_tmpdir(dir, "hfimport")) return;
    snprintf(back, sizeof back, "%s/back", dir);
    write_hf(dir, &tm, MOE__DT_BF16, 2, NULL, NULL);
    int has_tok = -1;
    CHECK_MSG(moe_convert_to_model_dir(dir, back, &has_tok, err, sizeof err) == 0, "import: %s", err);
    CHECK_EQ_INT(has_tok, 0);
    moe_model *m = NULL;
    moe_engine *e = NULL;
    moe_engine_params ep = moe_engine_params_default();
    ep.n_threads = 1, ep.n_ctx = 16, ep.kv_f16_k = ep.kv_f16_v = 0; /* the model's float attention */
    CHECK_MSG(moe_model_load(back, 1, T_MAX, 0, 1, &m, err, sizeof err) == 0, "load: %s", err);
    CHECK_EQ_INT(moe_engine_load(dir, &ep, &e, err, sizeof err), 0);
    if (m && e) {
        float *lg = malloc(sizeof(float) * T_MAX * s.V);
        CHECK_EQ_INT(moe_engine_eval(e, k_tok, T_MAX, lg, 1), 0);
        CHECK_EQ_INT(moe_model_forward(m, k_tok, NULL, 1, T_MAX, NULL), 0);
        const float *ref = moe_model_logits(m);
        double md = 0, mr = 0;
        for (int i = 0; i < T_MAX * s.V; i++) md = fmax(md, fabs((double)lg[i] - ref[i])), mr = fmax(mr, fabs(ref[i]));
        CHECK_MSG(md / mr < 1e-5, "imported HF mixtral vs engine: %.3g", md / mr);
        free(lg);
    }
    moe_engine_free(e);
    moe_model_free(m);
    tiny_free(&tm);
    moe_test_rmdir(dir);
}
