/* Writes seed inputs for every fuzz target with the project's own writers, so
 * the fuzzers start from valid files of every feature:
 *     build/fuzz_seed DIR    ->  DIR/<target>/seed-*
 * fuzz/seed.sh adds the committed files of tests/data. */
#include "data/shard.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "moe.h"
#include "tokenizer/tokenizer.h"
#include "train/state_json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char g_out[1024];

static void die(const char *what, const char *err) {
    fprintf(stderr, "fuzz_seed: %s: %s\n", what, err);
    exit(1);
}

static const char *path_of(const char *target, const char *name) {
    static char p[2048];
    snprintf(p, sizeof p, "%s/%s", g_out, target);
    mkdir(p, 0777);
    snprintf(p, sizeof p, "%s/%s/%s", g_out, target, name);
    return p;
}

static unsigned char *slurp(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    if (!fp) die(path, "cannot open");
    fseek(fp, 0, SEEK_END);
    *n = (size_t)ftell(fp);
    fseek(fp, 0, SEEK_SET);
    unsigned char *b = malloc(*n + 1);
    if (!b || fread(b, 1, *n, fp) != *n) die(path, "cannot read");
    fclose(fp);
    return b;
}

static void seed_gguf(void) {
    char err[256];
    moe__gguf_writer *w;
    if (moe__gguf_writer_new(&w)) die("gguf", "out of memory");
    moe__gguf_writer_add_str(w, "general.architecture", "llama");
    moe__gguf_writer_add_u32(w, "general.alignment", 64);
    moe__gguf_writer_add_u8(w, "a.u8", 200);
    moe__gguf_writer_add_i8(w, "a.i8", -5);
    moe__gguf_writer_add_u16(w, "a.u16", 60000);
    moe__gguf_writer_add_i16(w, "a.i16", -300);
    moe__gguf_writer_add_i32(w, "a.i32", -70000);
    moe__gguf_writer_add_u64(w, "a.u64", 1ull << 40);
    moe__gguf_writer_add_i64(w, "a.i64", -(1ll << 40));
    moe__gguf_writer_add_f32(w, "a.f32", 1.5f);
    moe__gguf_writer_add_f64(w, "a.f64", -2.25);
    moe__gguf_writer_add_bool(w, "a.bool", 1);
    const float fa[4] = {1, 2, 3, 4};
    const int32_t ia[3] = {-1, 0, 7};
    moe__gguf_writer_add_arr(w, "a.arr_f32", MOE__GGUF_F32, fa, 4);
    moe__gguf_writer_add_arr(w, "a.arr_i32", MOE__GGUF_I32, ia, 3);
    const char *toks[] = {"<s>", "</s>", "hello", " world"};
    moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", toks, 4);
    static float f32[64];
    for (int i = 0; i < 64; i++) f32[i] = (float)(i - 32) / 7.0f;
    static unsigned char q8[64], q4[64], f16[128], bf16[128];
    const int64_t ne[2] = {32, 2}, ne1[1] = {64};
    moe__gguf_quantize(MOE__GGML_Q8_0, f32, q8, 64);
    moe__gguf_quantize(MOE__GGML_Q4_0, f32, q4, 64);
    moe__gguf_quantize(MOE__GGML_F16, f32, f16, 64);
    moe__gguf_quantize(MOE__GGML_BF16, f32, bf16, 64);
    moe__gguf_writer_add_tensor(w, "t.f32", MOE__GGML_F32, 2, ne, f32, moe__gguf_row_size(MOE__GGML_F32, 64));
    moe__gguf_writer_add_tensor(w, "t.f16", MOE__GGML_F16, 1, ne1, f16, moe__gguf_row_size(MOE__GGML_F16, 64));
    moe__gguf_writer_add_tensor(w, "t.bf16", MOE__GGML_BF16, 1, ne1, bf16, moe__gguf_row_size(MOE__GGML_BF16, 64));
    moe__gguf_writer_add_tensor(w, "t.q8_0", MOE__GGML_Q8_0, 2, ne, q8, moe__gguf_row_size(MOE__GGML_Q8_0, 64));
    moe__gguf_writer_add_tensor(w, "t.q4_0", MOE__GGML_Q4_0, 2, ne, q4, moe__gguf_row_size(MOE__GGML_Q4_0, 64));
    if (moe__gguf_writer_write(w, path_of("gguf", "seed-all-types.gguf"), err, sizeof err)) die("gguf", err);
    moe__gguf_writer_free(w);
    /* a minimal one: no tensors, one key */
    if (moe__gguf_writer_new(&w)) die("gguf", "out of memory");
    moe__gguf_writer_add_str(w, "general.name", "x");
    if (moe__gguf_writer_write(w, path_of("gguf", "seed-min.gguf"), err, sizeof err)) die("gguf", err);
    moe__gguf_writer_free(w);
}

static void seed_safetensors(void) {
    char err[256];
    static const float f[6] = {1, -2, 3.5f, 0, 1e-3f, 7};
    static const double d[2] = {1.25, -8};
    static const unsigned char h[4] = {0, 0x3c, 0x80, 0x3f}; /* F16 1.0, BF16 1.0 */
    moe__st_out t[4] = {
        {"a", MOE__DT_F32, 2, {2, 3}, f},
        {"b.f64", MOE__DT_F64, 1, {2}, d},
        {"c.f16", MOE__DT_F16, 1, {2}, h},
        {"d.bf16", MOE__DT_BF16, 0, {0}, h + 2},
    };
    const char *meta[] = {"format", "pt", "step", "3", NULL};
    if (moe__st_write(path_of("safetensors", "seed-mixed.safetensors"), t, 4, meta, err, sizeof err))
        die("safetensors", err);
}

static moe_model_config tiny_config(int vocab) {
    moe_model_config c;
    moe_model_config_defaults(&c);
    c.vocab_size = vocab, c.hidden_size = 8, c.intermediate_size = 8, c.num_hidden_layers = 2;
    c.num_attention_heads = 2, c.num_key_value_heads = 1, c.head_dim = 4, c.max_position_embeddings = 16;
    c.num_local_experts = 4, c.num_experts_per_tok = 2, c.dense_intermediate_size = 8;
    c.n_shared_experts = 1, c.shared_expert_intermediate_size = 8;
    for (int l = 0; l < MOE_MAX_LAYERS; l++) c.is_moe_layer[l] = l == 1;
    return c;
}

static void seed_config(void) {
    char err[256], name[64];
    for (const char *const *p = moe_model_preset_names(); *p; p++) {
        moe_model_config c;
        moe_model_preset(*p, &c);
        snprintf(name, sizeof name, "seed-%s.json", *p);
        if (moe_model_config_save(&c, path_of("config", name), err, sizeof err)) die("config", err);
    }
    static const char *const routers[] = {"noisy_topk", "expert_choice", "hierarchical", "balanced"};
    for (int i = 0; i < 4; i++) {
        moe_model_config c = tiny_config(300);
        c.router_type = moe_router_from_name(routers[i]);
        if (i == 2) c.n_group = 2, c.topk_group = 1;
        if (i == 0) c.scoring_func = MOE_SCORE_SIGMOID, c.router_bias_update_rate = 1e-3f;
        snprintf(name, sizeof name, "seed-%s.json", routers[i]);
        if (moe_model_config_check(&c, err, sizeof err) == 0 &&
            moe_model_config_save(&c, path_of("config", name), err, sizeof err))
            die("config", err);
    }
}

static const char *TEXT = "The jury said the city's election was conducted well; 42 voters, 17 clerks.\n\n"
                          "\xc3\xa9t\xc3\xa9 -- ``quoted'' text   with  spaces\tand tabs.";

static moe_tokenizer *tiny_tokenizer(int vocab) {
    char err[256];
    moe_tokenizer *t;
    const char *texts[1] = {TEXT};
    size_t lens[1] = {strlen(TEXT)};
    if (moe_tokenizer_train(texts, lens, 1, vocab, &t, err, sizeof err)) die("tokenizer", err);
    return t;
}

static void seed_tokenizer(void) {
    char err[256];
    moe_tokenizer *t = tiny_tokenizer(300);
    if (moe_tokenizer_save(t, path_of("tokenizer", "seed-300.json"), err, sizeof err)) die("tokenizer", err);
    moe_tokenizer_free(t);
    t = tiny_tokenizer(257);
    if (moe_tokenizer_save(t, path_of("tokenizer", "seed-257.json"), err, sizeof err)) die("tokenizer", err);
    moe_tokenizer_free(t);
}

static void seed_shard(void) {
    char err[256];
    moe_tokenizer *t = tiny_tokenizer(280);
    moe_doc docs[3] = {{"ca01", 0, (char *)TEXT, strlen(TEXT)},
                       {"ca02", 0, (char *)"Short one.", 10},
                       {"cb01", 1, (char *)"Another genre, same words.", 26}};
    moe_corpus c = {docs, 3};
    moe_shard *s;
    for (int val = 0; val < 2; val++) {
        if (moe_shard_build(&c, t, val, &s, err, sizeof err)) die("shard", err);
        if (moe_shard_save(s, path_of("shard", val ? "seed-val.bin" : "seed-train.bin"), err, sizeof err))
            die("shard", err);
        moe_shard_free(s);
    }
    moe_tokenizer_free(t);
}

static void seed_checkpoint(void) {
    char err[256], dir[1100];
    snprintf(dir, sizeof dir, "%s/.ckpt", g_out);
    moe_tokenizer *tok = tiny_tokenizer(270);
    moe_model_config c = tiny_config(moe_tokenizer_vocab_size(tok));
    int rc;
    moe_model *m = moe_model_create(&c, 1, 4, 1, 1, &rc, err, sizeof err);
    if (!m) die("checkpoint", err);
    moe_model_init(m, 1);
    moe_train_config tc = {.batch = 1, .seq = 2, .grad_accum = 1, .eval_batches = 1, .seed = 1, .n_threads = 1,
                           .opt = moe_adamw_config_default()};
    static const int32_t toks[8] = {0, 1, 0, 1, 0, 1, 0, 1};
    moe_trainer *tr = moe_trainer_create(m, &tc, toks, 8, NULL, 0, &rc, err, sizeof err);
    if (!tr || moe_trainer_save(tr, dir, err, sizeof err)) die("checkpoint", err);
    char p[1200];
    snprintf(p, sizeof p, "%s/tokenizer.json", dir);
    if (moe_tokenizer_save(tok, p, err, sizeof err)) die("checkpoint", err);
    static const char *const files[] = {"config.json", "model.safetensors", "optimizer.safetensors",
                                        "tokenizer.json"};
    FILE *out = fopen(path_of("checkpoint", "seed-tiny.ckpt"), "wb");
    if (!out) die("checkpoint", "cannot write");
    for (int i = 0; i < 4; i++) {
        size_t n;
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        unsigned char *b = slurp(p, &n);
        if (i) fputs("\n--moe-file--\n", out);
        fwrite(b, 1, n, out);
        free(b);
        remove(p);
    }
    fclose(out);
    rmdir(dir);
    moe_trainer_free(tr);
    moe_model_free(m);
    moe_tokenizer_free(tok);
}

/* hf_dir: a `moe train` model directory, which the engine reads as a Hugging
 * Face mixtral one when every layer is MoE and there is no shared expert
 * (model_hf.c refuses the others); config.json and model.safetensors joined
 * as fuzz/fuzz_hf_dir.c splits them. seed.sh derives the sharded seed. */
static void seed_hf_dir(void) {
    char err[256], dir[1100], p[1200];
    snprintf(dir, sizeof dir, "%s/.hf", g_out);
    moe_model_config c = tiny_config(40);
    c.n_shared_experts = 0, c.shared_expert_intermediate_size = 0;
    for (int l = 0; l < MOE_MAX_LAYERS; l++) c.is_moe_layer[l] = 1;
    int rc;
    moe_model *m = moe_model_create(&c, 1, 4, 0, 1, &rc, err, sizeof err);
    if (!m || moe_model_init(m, 1) || moe_model_save(m, dir, err, sizeof err)) die("hf_dir", err);
    FILE *out = fopen(path_of("hf_dir", "seed-tiny.hf"), "wb");
    if (!out) die("hf_dir", "cannot write");
    static const char *const files[] = {"config.json", "model.safetensors", "checkpoint.json"};
    unsigned char *b[3];
    size_t n[3];
    for (int i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        b[i] = slurp(p, &n[i]);
        remove(p);
    }
    fwrite(b[0], 1, n[0], out);
    fputs("\n--moe-file--\n", out);
    fwrite(b[1], 1, n[1], out);
    fclose(out);
    /* the manifest moe_model_save wrote seeds ckpt_manifest: the record, then the config.json it hashes */
    out = fopen(path_of("ckpt_manifest", "seed-manifest"), "wb");
    if (!out) die("ckpt_manifest", "cannot write");
    fwrite(b[2], 1, n[2], out);
    fputs("\n--moe-file--\n", out);
    fwrite(b[0], 1, n[0], out);
    fclose(out);
    for (int i = 0; i < 3; i++) free(b[i]);
    rmdir(dir);
    moe_model_free(m);
}

static void seed_corpus(void) {
    static const char *const files[] = {
        "\n\n\tThe/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl said/vbd Friday/nr an/at\n"
        "investigation/nn of/in ``/`` irregularities/nns ''/'' took/vbd place/nn ./.\n\n"
        "\tIt/pps did/dod n't/* say/vb ,/, (/( however/rb )/) ;/. 's/$ '/' quoted/vbn '/' !/.\n",
        "\tHEADLINE/nn-hl news/nn-hl\n\n\tA/at word/nn ./.\n",
    };
    for (int i = 0; i < 2; i++) {
        FILE *fp = fopen(path_of("corpus", i ? "seed-headline" : "seed-ca01"), "w");
        if (!fp) die("corpus", "cannot write");
        fputs(files[i], fp);
        fclose(fp);
    }
}

/* train_state: what `moe train` writes (the library's writer, with curves
 * and a command that needs escapes), and the shape of files from before the
 * numerics counters. */
static void seed_train_state(void) {
    moe__train_state s = {.step = 40, .tokens = 5120, .skipped_steps = 2, .loss_spikes = 1,
                          .command = "moe train --out \"runs/a b\"\t--steps 40"};
    for (int i = 1; i <= 40; i++)
        if (moe__train_curve_add(&s.train, i, 6.0 / (1 + 0.1 * i)) ||
            (i % 10 == 0 && moe__train_curve_add(&s.val, i, 6.2 / (1 + 0.1 * i))))
            die("train_state", "out of memory");
    char *js = moe__train_state_json(&s);
    FILE *fp = fopen(path_of("train_state", "seed-run.json"), "w");
    if (!js || !fp) die("train_state", "cannot write");
    fputs(js, fp);
    fclose(fp);
    moe__free(js);
    moe__train_curve_free(&s.train), moe__train_curve_free(&s.val);
    fp = fopen(path_of("train_state", "seed-old.json"), "w");
    if (!fp) die("train_state", "cannot write");
    fputs("{\"step\": 2, \"tokens\": 64, \"train\": [[1, 5.5], [2, 5.4]], \"val\": [[2, 5.45]]}", fp);
    fclose(fp);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
        return 2;
    }
    snprintf(g_out, sizeof g_out, "%s", argv[1]);
    mkdir(g_out, 0777);
    seed_gguf();
    seed_safetensors();
    seed_config();
    seed_tokenizer();
    seed_shard();
    seed_checkpoint();
    seed_hf_dir();
    seed_corpus();
    seed_train_state();
    return 0;
}
