/* moe_convert_to_model_dir: a model exported to GGUF and imported back is
 * the same model (bit-identical logits from F32 files: the q/k permutation is
 * undone exactly), tokenizer.json included; quantized files import as their
 * dequantized weights; GGUF features our model lacks are refused. */
#include "io/gguf.h"
#include "moe.h"
#include "test.h"
#include "test_infer_ref.h"
#include "tokenizer/tokenizer.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define T_TOK 9

static const char k_text[] = "the cat sat on the mat and the dog sat on the log; the cat ran to the dog 1961 times";
static const int32_t k_ids[T_TOK] = {3, 116, 259, 32, 7, 260, 99, 101, 45};

/* dir/src: a random model with a trained tokenizer. */
static moe_model *make_src(const char *dir, moe_model_config *c, uint64_t seed) {
    char err[512], path[256];
    moe_tokenizer *tok = NULL;
    const char *texts[1] = {k_text};
    size_t lens[1] = {sizeof k_text - 1};
    CHECK_EQ_INT(moe_tokenizer_train(texts, lens, 1, 290, &tok, err, sizeof err), 0);
    if (!tok) return NULL;
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    CHECK_EQ_INT(moe_tokenizer_save(tok, path, err, sizeof err), 0);
    c->vocab_size = moe_tokenizer_vocab_size(tok);
    moe_tokenizer_free(tok);
    int rc;
    moe_model *m = moe_model_create(c, 1, T_TOK, 0, 1, &rc, err, sizeof err);
    if (!m) return NULL;
    moe_model_init(m, seed);
    float *p = moe_model_params(m);
    for (int t = 0; t < moe_model_n_tensors(m); t++) { /* matrices to std 0.1: routing far from uniform */
        const moe_param_info *pi = moe_model_tensor(m, t);
        for (size_t i = 0; pi->ndim > 1 && i < pi->numel; i++) p[pi->offset + i] *= 5.0f;
    }
    CHECK_EQ_INT(moe_model_save(m, dir, err, sizeof err), 0);
    return m;
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *b = malloc(1 << 20);
    *len = fread(b, 1, 1 << 20, f);
    fclose(f);
    return b;
}

/* exported as type, imported: logits within tol (0: bit-identical) of the
 * source model's on the same tokens. */
static void roundtrip(moe_model_config *c, moe_convert_type type, double tol, uint64_t seed) {
    char dir[128], back[160], gguf[160], path[256], path2[256], err[512];
    if (!moe_test_tmpdir(dir, "import")) return;
    moe_model *m = make_src(dir, c, seed);
    if (!m) return;
    snprintf(gguf, sizeof gguf, "%s/m.gguf", dir);
    snprintf(back, sizeof back, "%s/back", dir);
    CHECK_EQ_INT(moe_convert_model_to_gguf(dir, gguf, type, err, sizeof err), 0);
    int has_tok = 0;
    int rc = moe_convert_to_model_dir(gguf, back, &has_tok, err, sizeof err);
    CHECK_MSG(rc == 0, "import: %s", err);
    CHECK_EQ_INT(has_tok, 1);
    moe_model *m2 = NULL;
    if (!rc) CHECK_MSG(moe_model_load(back, 1, T_TOK, 0, 1, &m2, err, sizeof err) == 0, "load: %s", err);
    if (m2) {
        const moe_model_config *c2 = moe_model_get_config(m2);
        CHECK_EQ_INT(c2->shared_expert_gate, c->shared_expert_gate);
        CHECK_EQ_INT(c2->norm_topk_prob, c->norm_topk_prob);
        CHECK_EQ_INT(c2->tie_word_embeddings, c->tie_word_embeddings);
        CHECK_EQ_INT(c2->num_key_value_heads, c->num_key_value_heads);
        CHECK_EQ_INT(moe_model_forward(m, k_ids, NULL, 1, T_TOK, NULL), 0);
        CHECK_EQ_INT(moe_model_forward(m2, k_ids, NULL, 1, T_TOK, NULL), 0);
        const float *a = moe_model_logits(m), *b = moe_model_logits(m2);
        double md = 0, mr = 0;
        for (int i = 0; i < T_TOK * c->vocab_size; i++) {
            const double d = (double)a[i] - b[i];
            md = tol > 0 ? md + d * d : fmax(md, fabs(d));
            mr = tol > 0 ? mr + (double)a[i] * a[i] : fmax(mr, fabs(a[i]));
        }
        const double rel = tol > 0 ? sqrt(md / mr) : md;
        CHECK_MSG(rel <= tol, "imported model's logits differ: %.3g > %.3g", rel, tol);
        if (tol > 0) CHECK_MSG(rel > 0, "a lossy type imported without loss: is the type applied?");
    }
    /* the tokenizer comes back byte for byte */
    size_t l1 = 0, l2 = 0;
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    snprintf(path2, sizeof path2, "%s/tokenizer.json", back);
    char *t1 = slurp(path, &l1), *t2 = slurp(path2, &l2);
    CHECK(t1 && t2 && l1 == l2 && !memcmp(t1, t2, l1));
    free(t1), free(t2);
    moe_model_free(m2);
    moe_model_free(m);
    moe_test_rmdir(dir);
}

TEST(convert_import_roundtrip_exact_f32) {
    moe_model_config c;
    CHECK_EQ_INT(moe_model_preset("tiny", &c), 0);
    roundtrip(&c, MOE_CONVERT_F32, 0, 11); /* llama, GQA: q/k permuted and back */
    CHECK_EQ_INT(moe_model_preset("tiny", &c), 0);
    c.tie_word_embeddings = 1;
    roundtrip(&c, MOE_CONVERT_F32, 0, 12);
    CHECK_EQ_INT(moe_model_preset("tiny", &c), 0);
    c.n_shared_experts = 1, c.shared_expert_intermediate_size = 64, c.shared_expert_gate = 1, c.norm_topk_prob = 0;
    roundtrip(&c, MOE_CONVERT_F32, 0, 13); /* qwen2moe */
}

/* A foreign qwen2moe file (no tokenizer, no biases): the imported model
 * computes what the engine computes from the file. */
TEST(convert_import_foreign_qwen2moe) {
    char dir[128], gguf[160], back[160], err[512];
    if (!moe_test_tmpdir(dir, "importq")) return;
    tiny_spec s = tiny_default(TINY_QWEN2MOE);
    s.bias = 0;
    tiny_model tm;
    tiny_build(&tm, &s, 78);
    snprintf(gguf, sizeof gguf, "%s/q.gguf", dir);
    snprintf(back, sizeof back, "%s/back", dir);
    CHECK_EQ_INT(tiny_write(&tm, gguf, NULL, 0), 0);
    int has_tok = -1;
    CHECK_MSG(moe_convert_to_model_dir(gguf, back, &has_tok, err, sizeof err) == 0, "import: %s", err);
    CHECK_EQ_INT(has_tok, 0);
    moe_model *m = NULL;
    moe_engine *e = NULL;
    moe_engine_params ep = moe_engine_params_default();
    ep.n_threads = 1, ep.n_ctx = 16, ep.kv_f16_k = ep.kv_f16_v = 0; /* F32 cache: compared with the float model */
    CHECK_MSG(moe_model_load(back, 1, T_TOK, 0, 1, &m, err, sizeof err) == 0, "load: %s", err);
    CHECK_EQ_INT(moe_engine_load(gguf, &ep, &e, err, sizeof err), 0);
    if (m && e) {
        CHECK_EQ_INT(moe_model_get_config(m)->shared_expert_intermediate_size, s.Fs);
        float *lg = malloc(sizeof(float) * T_TOK * s.V);
        int32_t ids[T_TOK];
        for (int i = 0; i < T_TOK; i++) ids[i] = k_ids[i] % s.V;
        CHECK_EQ_INT(moe_engine_eval(e, ids, T_TOK, lg, 1), 0);
        CHECK_EQ_INT(moe_model_forward(m, ids, NULL, 1, T_TOK, NULL), 0);
        const float *ref = moe_model_logits(m);
        double md = 0, mr = 0;
        for (int i = 0; i < T_TOK * s.V; i++) md = fmax(md, fabs((double)lg[i] - ref[i])), mr = fmax(mr, fabs(ref[i]));
        CHECK_MSG(md / mr < 1e-5, "imported qwen2moe vs engine: %.3g", md / mr);
        free(lg);
    }
    moe_engine_free(e);
    moe_model_free(m);
    tiny_free(&tm);
    moe_test_rmdir(dir);
}

TEST(convert_import_roundtrip_q8_0) {
    moe_model_config c;
    CHECK_EQ_INT(moe_model_preset("tiny", &c), 0);
    /* weights only (no activation quantization here): ~4.8e-3 relative RMS
     * rounding, amplified ~2.5x by these models (test_convert.c) */
    roundtrip(&c, MOE_CONVERT_Q8_0, 3e-2, 14);
}

/* Copies src to dst changing the architecture and adding a tensor, to make
 * GGUF files our model cannot represent. */
static void rewrite(const char *src, const char *dst, const char *arch, const char *extra, int64_t extra_n) {
    char err[512];
    moe__gguf *g = NULL;
    moe__gguf_writer *w = NULL;
    CHECK_EQ_INT(moe__gguf_open(src, &g, err, sizeof err), 0);
    CHECK_EQ_INT(moe__gguf_writer_new(&w), 0);
    if (!g || !w) return;
    for (size_t i = 0; i < moe__gguf_n_kv(g); i++) {
        const char *key;
        const moe__gguf_value *v;
        moe__gguf_kv_at(g, i, &key, &v);
        if (!strcmp(key, "general.architecture")) moe__gguf_writer_add_str(w, key, arch);
        else moe__gguf_writer_add(w, key, v);
    }
    for (size_t i = 0; i < moe__gguf_n_tensors(g); i++) {
        const moe__gguf_tensor *t = moe__gguf_tensor_at(g, i);
        moe__gguf_writer_add_tensor(w, t->name, t->type, t->n_dims, t->ne, t->data, t->nbytes);
    }
    float *zeros = calloc((size_t)(extra_n ? extra_n : 1), sizeof *zeros);
    if (extra) moe__gguf_writer_add_tensor(w, extra, MOE__GGML_F32, 1, &extra_n, zeros, (size_t)extra_n * sizeof *zeros);
    CHECK_MSG(moe__gguf_writer_write(w, dst, err, sizeof err) == 0, "rewrite: %s", err);
    free(zeros);
    moe__gguf_writer_free(w);
    moe__gguf_close(g);
}

TEST(convert_import_refuses_what_our_model_lacks) {
    char dir[128], gguf[160], bad[160], back[160], err[512];
    if (!moe_test_tmpdir(dir, "importbad")) return;
    moe_model_config c;
    CHECK_EQ_INT(moe_model_preset("tiny", &c), 0);
    moe_model_free(make_src(dir, &c, 15));
    snprintf(gguf, sizeof gguf, "%s/m.gguf", dir);
    snprintf(bad, sizeof bad, "%s/bad.gguf", dir);
    snprintf(back, sizeof back, "%s/back", dir);
    CHECK_EQ_INT(moe_convert_model_to_gguf(dir, gguf, MOE_CONVERT_F32, err, sizeof err), 0);
    static const struct { const char *arch, *extra; int64_t n; int want; const char *msg; } cases[] = {
        {"llama", "blk.1.attn_q.bias", 64, MOE_EUNSUPPORTED, "attention bias"},
        {"gpt2", NULL, 0, MOE_EUNSUPPORTED, "gpt2"},
        {"qwen2moe", NULL, 0, MOE_ENOTFOUND, "qwen2moe.embedding_length"}, /* llama keys under qwen2moe */
    };
    for (int i = 0; i < 3; i++) {
        rewrite(gguf, bad, cases[i].arch, cases[i].extra, cases[i].n);
        err[0] = 0;
        const int rc = moe_convert_to_model_dir(bad, back, NULL, err, sizeof err);
        CHECK_MSG(rc == cases[i].want, "case %d: %s (%s)", i, moe_strerror(rc), err);
        CHECK_MSG(strstr(err, cases[i].msg) != NULL, "case %d: message \"%s\" lacks \"%s\"", i, err, cases[i].msg);
    }
    /* foreign files: olmoe's q/k norms, qwen2moe's attention biases */
    for (int arch = TINY_QWEN2MOE; arch <= TINY_OLMOE; arch++) {
        tiny_spec s = tiny_default(arch);
        tiny_model tm;
        tiny_build(&tm, &s, 77);
        CHECK_EQ_INT(tiny_write(&tm, bad, NULL, 0), 0);
        err[0] = 0;
        CHECK_EQ_INT(moe_convert_to_model_dir(bad, back, NULL, err, sizeof err), MOE_EUNSUPPORTED);
        CHECK_MSG(strstr(err, arch == TINY_OLMOE ? "q/k norms" : "attention biases") != NULL, "%s", err);
        tiny_free(&tm);
    }
    /* a truncated file */
    FILE *f = fopen(gguf, "r+b");
    if (f) {
        fseek(f, 0, SEEK_END);
        long n = ftell(f);
        fclose(f);
        CHECK(truncate(gguf, n / 2) == 0);
    }
    CHECK(moe_convert_to_model_dir(gguf, back, NULL, err, sizeof err) < 0);
    moe_test_rmdir(dir);
}
