/* moe_convert_model_to_gguf: a tiny trained-format model (Mixtral layout and
 * Qwen2-MoE gated shared expert) exported to GGUF, loaded by the inference
 * engine, gives the training model's logits; the tokenizer metadata encodes
 * as our tokenizer; the q/k permutation on a hand case; refusals and hostile
 * checkpoints. */
#include "io/convert.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "moe.h"
#include "test.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/vocab.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define T_TOK 10

static const char k_text[] =
    "the cat sat on the mat and the dog sat on the log while the other cat ran to the mat "
    "then the dog ran on and on to the log and sat there 1961 or 1962 times, the end";

/* Hand case: one head, D = 4, one column: HF rows (x0 x1 | x2 x3) pair
 * (0,2) and (1,3); llama.cpp wants them adjacent: 0 2 1 3. */
TEST(convert_permute_qk_hand) {
    const float src[8] = {0, 1, 2, 3, 10, 11, 12, 13}; /* 2 heads, D 4 */
    float dst[8], back[8];
    moe__permute_qk(src, dst, 2, 4, 1, 0);
    const float want[8] = {0, 2, 1, 3, 10, 12, 11, 13};
    for (int i = 0; i < 8; i++) CHECK_MSG(dst[i] == want[i], "row %d: %g, want %g", i, dst[i], want[i]);
    moe__permute_qk(dst, back, 2, 4, 1, 1);
    for (int i = 0; i < 8; i++) CHECK(back[i] == src[i]);
    /* rows move whole: 2 columns */
    const float s2[8] = {0, 100, 1, 101, 2, 102, 3, 103};
    float d2[8];
    moe__permute_qk(s2, d2, 1, 4, 2, 0);
    const float w2[8] = {0, 100, 2, 102, 1, 101, 3, 103};
    for (int i = 0; i < 8; i++) CHECK(d2[i] == w2[i]);
}

/* A model directory like `moe train` writes: config, random weights (scaled
 * up so routing and attention are far from uniform), tokenizer.json. */
static moe_model *make_dir(const char *dir, moe_model_config *c, uint64_t seed) {
    char err[512], path[256];
    moe_tokenizer *tok = NULL;
    const char *texts[1] = {k_text};
    size_t lens[1] = {sizeof k_text - 1};
    CHECK_EQ_INT(moe_tokenizer_train(texts, lens, 1, 300, &tok, err, sizeof err), 0);
    if (!tok) return NULL;
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    CHECK_EQ_INT(moe_tokenizer_save(tok, path, err, sizeof err), 0);
    c->vocab_size = moe_tokenizer_vocab_size(tok) + 3; /* padding ids past the tokenizer */
    moe_tokenizer_free(tok);
    int rc;
    moe_model *m = moe_model_create(c, 1, T_TOK, 0, 1, &rc, err, sizeof err);
    CHECK_MSG(m != NULL, "create: %s", err);
    if (!m) return NULL;
    moe_model_init(m, seed);
    float *p = moe_model_params(m);
    for (int t = 0; t < moe_model_n_tensors(m); t++) { /* matrices to std 0.1: routing and attention far from uniform */
        const moe_param_info *pi = moe_model_tensor(m, t);
        for (size_t i = 0; pi->ndim > 1 && i < pi->numel; i++) p[pi->offset + i] *= 5.0f;
    }
    CHECK_EQ_INT(moe_model_save(m, dir, err, sizeof err), 0);
    return m;
}

static const int32_t k_ids[T_TOK] = {3, 116, 259, 32, 7, 260, 99, 101, 261, 45};

/* Relative logit error over all T_TOK positions: max |engine - model| /
 * max |model| (rms = 0), or the RMS of the difference over the RMS of the
 * model's logits (rms = 1: for lossy types, where a near-tie in routing may
 * flip one token's expert and a maximum would measure only that token). */
static double gguf_vs_model(moe_model *m, const char *gguf, int rms, uint32_t want_type) {
    char err[512];
    moe_engine *e = NULL;
    moe_engine_params ep = moe_engine_params_default();
    ep.n_threads = 1, ep.n_ctx = 16, ep.kv_f16_k = ep.kv_f16_v = 0; /* F32 cache: compared with the float model */
    int rc = moe_engine_load(gguf, &ep, &e, err, sizeof err);
    CHECK_MSG(rc == 0, "engine load: %s", err);
    if (rc) return 1e30;
    const int V = moe_model_get_config(m)->vocab_size;
    CHECK_EQ_INT(moe_engine_get_hparams(e)->n_vocab, V);
    CHECK_EQ_INT(moe_engine_get_hparams(e)->expert_type, want_type);
    float *lg = malloc(sizeof(float) * T_TOK * V);
    CHECK_EQ_INT(moe_engine_eval(e, k_ids, T_TOK, lg, 1), 0);
    CHECK_EQ_INT(moe_model_forward(m, k_ids, NULL, 1, T_TOK, NULL), 0);
    const float *ref = moe_model_logits(m);
    double md = 0, mr = 0;
    for (int i = 0; i < T_TOK * V; i++) {
        const double d = (double)lg[i] - ref[i];
        md = rms ? md + d * d : fmax(md, fabs(d));
        mr = rms ? mr + (double)ref[i] * ref[i] : fmax(mr, fabs(ref[i]));
    }
    free(lg);
    moe_engine_free(e);
    return rms ? sqrt(md / mr) : md / mr;
}

static void check_roundtrip(moe_model_config *c, const char *arch, uint64_t seed) {
    char dir[128], gguf[256], err[512];
    if (!moe_test_tmpdir(dir, "convert")) return;
    moe_model *m = make_dir(dir, c, seed);
    static const struct { moe_convert_type t; uint32_t ggml; double tol; const char *name; } types[] = {
        /* f32: only summation order differs (max error). Lossy types, RMS
         * error: the weights' relative RMS rounding error is ~2.8e-4 (f16),
         * ~4.8e-3 (q8_0: step max/127 of 32 normal values) and ~7.6e-2
         * (q4_0: step max/8), and Q8_0/Q4_0 also quantize the activations;
         * these models amplify it ~2.5x (measured with f16: 6-7e-4, q8_0
         * ~2%, q4_0 ~0.25-0.36). A wrong layout would give errors ~1. */
        {MOE_CONVERT_F32, MOE__GGML_F32, 1e-5, "f32"}, {MOE_CONVERT_F16, MOE__GGML_F16, 2e-3, "f16"},
        {MOE_CONVERT_Q8_0, MOE__GGML_Q8_0, 4e-2, "q8_0"}, {MOE_CONVERT_Q4_0, MOE__GGML_Q4_0, 5e-1, "q4_0"}};
    for (int i = 0; m && i < 4; i++) {
        snprintf(gguf, sizeof gguf, "%s/out-%s.gguf", dir, types[i].name);
        int rc = moe_convert_model_to_gguf(dir, gguf, types[i].t, err, sizeof err);
        CHECK_MSG(rc == 0, "%s %s: %s", arch, types[i].name, err);
        if (rc) continue;
        moe__gguf *g = NULL;
        const char *a = "";
        CHECK_EQ_INT(moe__gguf_open(gguf, &g, err, sizeof err), 0);
        if (g) moe__gguf_get_str(g, "general.architecture", &a, NULL, err, sizeof err);
        CHECK_MSG(!strcmp(a, arch), "arch %s, want %s", a, arch);
        moe__gguf_close(g);
        const double rel = gguf_vs_model(m, gguf, i > 0, types[i].ggml);
        CHECK_MSG(rel <= types[i].tol, "%s %s: relative logit error %.3g > %.3g", arch, types[i].name, rel,
                  types[i].tol);
        /* the lossy types must actually be lossy: a file quietly written in
         * F32 would pass the bound above */
        if (i > 0) CHECK_MSG(rel > 1e-7, "%s %s: error %.3g, is the type applied?", arch, types[i].name, rel);
    }
    moe_model_free(m);
    moe_test_rmdir(dir);
}

TEST(convert_mixtral_gguf_logits_match_model) {
    moe_model_config c;
    CHECK_EQ_INT(moe_model_preset("tiny", &c), 0);
    check_roundtrip(&c, "llama", 7);
    CHECK_EQ_INT(moe_model_preset("tiny", &c), 0);
    c.tie_word_embeddings = 1, c.num_key_value_heads = c.num_attention_heads; /* tied, no GQA */
    check_roundtrip(&c, "llama", 8);
}

TEST(convert_qwen2moe_shared_gate_logits_match_model) {
    moe_model_config c;
    CHECK_EQ_INT(moe_model_preset("tiny", &c), 0);
    c.n_shared_experts = 1, c.shared_expert_intermediate_size = 64, c.shared_expert_gate = 1;
    c.norm_topk_prob = 0;
    check_roundtrip(&c, "qwen2moe", 9);
}

/* The GGUF tokenizer metadata, read back by our GGUF tokenizer (same ids as
 * llama.cpp's), encodes text without newlines or contractions exactly as
 * the trainer's tokenizer does. */
TEST(convert_tokenizer_metadata_encodes_like_ours) {
    char dir[128], gguf[256], path[256], err[512];
    if (!moe_test_tmpdir(dir, "convtok")) return;
    moe_model_config c;
    CHECK_EQ_INT(moe_model_preset("tiny", &c), 0);
    moe_model *m = make_dir(dir, &c, 3);
    snprintf(gguf, sizeof gguf, "%s/t.gguf", dir);
    CHECK_EQ_INT(moe_convert_model_to_gguf(dir, gguf, MOE_CONVERT_F32, err, sizeof err), 0);
    moe__gguf *g = NULL;
    moe_vocab *v = NULL;
    moe_tokenizer *tok = NULL;
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    CHECK_EQ_INT(moe_tokenizer_load(path, &tok, err, sizeof err), 0);
    CHECK_EQ_INT(moe__gguf_open(gguf, &g, err, sizeof err), 0);
    if (g) CHECK_MSG(moe_vocab_from_gguf(g, &v, err, sizeof err) == 0, "vocab: %s", err);
    if (v && tok) {
        CHECK_EQ_INT(moe_vocab_n_tokens(v), c.vocab_size);
        CHECK_EQ_INT(moe_vocab_eos(v), moe_tokenizer_eos(tok));
        CHECK_EQ_INT(moe_vocab_add_bos(v), 0);
        const char *samples[] = {k_text, "the dog, the cat; 1961 times!", "  cat  sat", "zebra \xc3\xa9t\xc3\xa9 ran"};
        for (int s = 0; s < 4; s++) {
            int32_t a[512], b[512];
            size_t na = 0, nb = 0, len = strlen(samples[s]);
            CHECK_EQ_INT(moe_tokenizer_encode(tok, samples[s], len, a, 512, &na), 0);
            CHECK_EQ_INT(moe_vocab_encode(v, samples[s], len, 0, b, 512, &nb), 0);
            CHECK_MSG(na == nb && !memcmp(a, b, na * sizeof *a), "sample %d: %zu ids vs %zu from the GGUF vocab", s,
                      na, nb);
            if (s == 0) CHECK_MSG(na < len / 2, "%zu ids for %zu bytes: the merges are not used", na, len);
        }
    }
    moe_vocab_free(v);
    moe__gguf_close(g);
    moe_tokenizer_free(tok);
    moe_model_free(m);
    moe_test_rmdir(dir);
}

/* Rewrites dir/model.safetensors without tensor name (cols 0) or with its
 * last dimension cut to cols. */
static void edit_tensor(const char *dir, const char *name, int cols) {
    char path[256], err[512];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    moe__st_file *f = NULL;
    CHECK_EQ_INT(moe__st_open(path, &f, err, sizeof err), 0);
    if (!f) return;
    const int n = moe__st_count(f);
    moe__st_out *o = calloc((size_t)n, sizeof *o);
    int k = 0;
    for (int i = 0; i < n; i++) {
        const moe__st_tensor *t = moe__st_get(f, i);
        if (!strcmp(t->name, name) && !cols) continue;
        o[k].name = t->name, o[k].dtype = t->dtype, o[k].ndim = t->ndim, o[k].data = t->data;
        memcpy(o[k].shape, t->shape, sizeof o[k].shape);
        if (!strcmp(t->name, name)) o[k].shape[t->ndim - 1] = cols;
        k++;
    }
    CHECK_EQ_INT(k, cols ? n : n - 1);
    CHECK_EQ_INT(moe__st_write(path, o, k, NULL, err, sizeof err), 0);
    free(o);
    moe__st_close(f);
}

/* Converts dir; expects code want with msg_part in the message, and the
 * pre-existing output file left as it was. */
static void expect_refusal(const char *dir, int want, const char *msg_part) {
    char out[256], err[512] = "", buf[16] = "";
    snprintf(out, sizeof out, "%s/out.gguf", dir);
    FILE *f = fopen(out, "w");
    if (f) fputs("keep", f), fclose(f);
    const int rc = moe_convert_model_to_gguf(dir, out, MOE_CONVERT_F32, err, sizeof err);
    CHECK_MSG(rc == want, "got %s (%s), want %s", moe_strerror(rc), err, moe_strerror(want));
    CHECK_MSG(strstr(err, msg_part) != NULL, "message \"%s\" lacks \"%s\"", err, msg_part);
    f = fopen(out, "r");
    if (f) {
        CHECK(fgets(buf, sizeof buf, f) != NULL);
        fclose(f);
    }
    CHECK_MSG(!strcmp(buf, "keep"), "the existing output was replaced");
}

static void refusal_case(void (*edit)(moe_model_config *), int want, const char *msg_part) {
    char dir[128];
    if (!moe_test_tmpdir(dir, "convref")) return;
    moe_model_config c;
    CHECK_EQ_INT(moe_model_preset("tiny", &c), 0);
    edit(&c);
    moe_model_free(make_dir(dir, &c, 1));
    expect_refusal(dir, want, msg_part);
    moe_test_rmdir(dir);
}

static void edit_dense_layer(moe_model_config *c) { c->is_moe_layer[1] = 0; }
static void edit_ungated_shared(moe_model_config *c) { c->n_shared_experts = 1, c->shared_expert_intermediate_size = 32; }
static void edit_no_renorm(moe_model_config *c) { c->norm_topk_prob = 0; }
static void edit_gated_renorm(moe_model_config *c) {
    c->n_shared_experts = 1, c->shared_expert_intermediate_size = 32, c->shared_expert_gate = 1;
}
static void edit_sigmoid(moe_model_config *c) { c->scoring_func = MOE_SCORE_SIGMOID; }
static void edit_bias(moe_model_config *c) { c->router_bias_update_rate = 1e-3f; }

TEST(convert_refuses_what_llama_cpp_cannot_compute) {
    refusal_case(edit_dense_layer, MOE_EUNSUPPORTED, "layer 1 is dense");
    refusal_case(edit_ungated_shared, MOE_EUNSUPPORTED, "shared_expert_gate");
    refusal_case(edit_no_renorm, MOE_EUNSUPPORTED, "norm_topk_prob");
    refusal_case(edit_gated_renorm, MOE_EUNSUPPORTED, "norm_topk_prob");
    refusal_case(edit_sigmoid, MOE_EUNSUPPORTED, "scoring_func");
    refusal_case(edit_bias, MOE_EUNSUPPORTED, "router_bias_update_rate");
}

TEST(convert_hostile_model_directories) {
    char dir[128], path[256], err[512];
    if (!moe_test_tmpdir(dir, "convbad")) return;
    moe_model_config c;
    CHECK_EQ_INT(moe_model_preset("tiny", &c), 0);
    moe_model_free(make_dir(dir, &c, 2));
    /* a missing expert */
    edit_tensor(dir, "model.layers.1.block_sparse_moe.experts.3.w2.weight", 0);
    expect_refusal(dir, MOE_ENOTFOUND, "experts.3.w2.weight");
    /* a router of the right rows but too few columns */
    moe_model_free(make_dir(dir, &c, 2));
    edit_tensor(dir, "model.layers.0.block_sparse_moe.gate.weight", 32);
    expect_refusal(dir, MOE_ESHAPE, "gate.weight");
    /* a config that disagrees with the tensors' shapes */
    moe_model_free(make_dir(dir, &c, 2));
    moe_model_config c2 = c;
    c2.intermediate_size = 64;
    snprintf(path, sizeof path, "%s/config.json", dir);
    CHECK_EQ_INT(moe_model_config_save(&c2, path, err, sizeof err), 0);
    expect_refusal(dir, MOE_ESHAPE, "experts.0.w1.weight");
    /* a config that is not JSON */
    FILE *f = fopen(path, "w");
    if (f) fputs("{\"hidden_size\": 64,", f), fclose(f);
    expect_refusal(dir, MOE_EFORMAT, "config.json");
    /* no tokenizer */
    CHECK_EQ_INT(moe_model_config_save(&c, path, err, sizeof err), 0);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    unlink(path);
    expect_refusal(dir, MOE_ENOTFOUND, "tokenizer.json");
    moe_test_rmdir(dir);
}
