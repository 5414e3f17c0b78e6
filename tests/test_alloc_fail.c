/* Allocation-failure injection: a test allocator (moe_set_allocator) fails
 * the n-th allocation, for every n from 1 to the number of allocations a
 * path makes. Each init/load path must then return MOE_ENOMEM (not a
 * misleading format error) and free
 * everything it took: the allocator's own count of live blocks returns to
 * zero (so this works without LeakSanitizer; under make test-asan, ASan also
 * checks every error path's frees). cJSON's allocations go through the same
 * hooks, so the JSON parsers are covered too. */
#include "test.h"

#include "data/corpus.h"
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

static struct {
    long calls;   /* allocation attempts since arm() */
    long fail_at; /* 1-based attempt to fail; 0 = none */
    long live;    /* blocks handed out and not yet freed */
    long failed;  /* attempts refused */
} g;

static void *fail_alloc(size_t size, void *ctx) {
    (void)ctx;
    if (++g.calls == g.fail_at) {
        g.failed++;
        return NULL;
    }
    void *p = malloc(size);
    if (p) g.live++;
    return p;
}

static void fail_free(void *p, void *ctx) {
    (void)ctx;
    g.live--;
    free(p);
}

static void arm(long fail_at) {
    g.calls = 0, g.fail_at = fail_at, g.live = 0, g.failed = 0;
    const moe_allocator a = {fail_alloc, fail_free, NULL};
    moe_set_allocator(&a);
}

static void disarm(void) { moe_set_allocator(NULL); }

/* A path: makes an object (or several), frees everything, returns the code. */
typedef int (*path_fn)(void *ctx);

/* Runs fn once unhindered (it must succeed), then once per allocation it made
 * with that allocation failing. Returns the allocation count. */
static long sweep(const char *what, path_fn fn, void *ctx) {
    arm(0);
    int rc = fn(ctx);
    long total = g.calls, live = g.live;
    disarm();
    CHECK_MSG(rc == 0, "%s: fails without injection: %d", what, rc);
    CHECK_MSG(live == 0, "%s: %ld blocks leaked without injection", what, live);
    CHECK_MSG(total > 0, "%s: makes no allocation", what);
    int bad = 0;
    for (long n = 1; n <= total && bad < 3; n++) {
        arm(n);
        rc = fn(ctx);
        live = g.live;
        long failed = g.failed;
        disarm();
        if (failed != 1) continue; /* fewer calls this time: nothing to check */
        if (rc != MOE_ENOMEM) {
            CHECK_MSG(0, "%s: allocation %ld of %ld failed but the code is %s", what, n, total, moe_err_name(rc));
            bad++;
        }
        if (live != 0) {
            CHECK_MSG(0, "%s: allocation %ld of %ld failed: %ld blocks leaked", what, n, total, live);
            bad++;
        }
    }
    return total;
}

/* ---- fixtures, written with the default allocator ------------------------- */

static char g_dir[64];
static char p_gguf[128], p_st[128], p_tok[128], p_shard[128], p_cfg[128], p_ckpt[128], p_corpus[128];

static const char *TEXT = "The jury said the election was conducted well.\n\nIt is done, 42 times.";

static const char *CONFIG_JSON =
    "{\"vocab_size\": 270, \"hidden_size\": 8, \"intermediate_size\": 8, \"num_hidden_layers\": 2,"
    " \"num_attention_heads\": 2, \"num_key_value_heads\": 1, \"head_dim\": 4, \"max_position_embeddings\": 8,"
    " \"num_local_experts\": 4, \"num_experts_per_tok\": 2, \"n_shared_experts\": 1,"
    " \"shared_expert_intermediate_size\": 8, \"dense_intermediate_size\": 8, \"moe_layer_indices\": [1]}";

static int write_text(const char *path, const char *s) {
    FILE *fp = fopen(path, "w");
    if (!fp) return -1;
    fputs(s, fp);
    return fclose(fp);
}

static void cleanup(void) { moe_test_rmdir(g_dir); }

static int setup(void) {
    if (g_dir[0]) return 0;
    if (!moe_test_tmpdir(g_dir, "allocfail")) return -1;
    atexit(cleanup);
    char err[256];
    snprintf(p_gguf, sizeof p_gguf, "%s/a.gguf", g_dir);
    snprintf(p_st, sizeof p_st, "%s/a.safetensors", g_dir);
    snprintf(p_tok, sizeof p_tok, "%s/tokenizer.json", g_dir);
    snprintf(p_shard, sizeof p_shard, "%s/a.shard", g_dir);
    snprintf(p_cfg, sizeof p_cfg, "%s/config.json", g_dir);
    snprintf(p_ckpt, sizeof p_ckpt, "%s/ckpt", g_dir);
    snprintf(p_corpus, sizeof p_corpus, "%s/brown", g_dir);

    moe__gguf_writer *w;
    if (moe__gguf_writer_new(&w)) return -1;
    const char *toks[] = {"a", "b", "c"};
    const float f[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    const int64_t ne[2] = {4, 2};
    moe__gguf_writer_add_str(w, "general.architecture", "llama");
    moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", toks, 3);
    moe__gguf_writer_add_arr(w, "a.f32", MOE__GGUF_F32, f, 8);
    moe__gguf_writer_add_tensor(w, "t", MOE__GGML_F32, 2, ne, f, sizeof f);
    moe__gguf_writer_add_tensor(w, "u", MOE__GGML_F32, 1, ne, f, 16);
    int rc = moe__gguf_writer_write(w, p_gguf, err, sizeof err);
    moe__gguf_writer_free(w);
    if (rc) return rc;

    moe__st_out t[2] = {{"x", MOE__DT_F32, 2, {2, 4}, f}, {"y", MOE__DT_F32, 1, {3}, f}};
    const char *meta[] = {"format", "pt", "k", "v", NULL};
    if ((rc = moe__st_write(p_st, t, 2, meta, err, sizeof err))) return rc;

    moe_tokenizer *tok;
    const char *texts[1] = {TEXT};
    size_t lens[1] = {strlen(TEXT)};
    if ((rc = moe_tokenizer_train(texts, lens, 1, 270, &tok, err, sizeof err))) return rc;
    if ((rc = moe_tokenizer_save(tok, p_tok, err, sizeof err))) return rc;
    moe_doc docs[2] = {{"ca01", 0, (char *)TEXT, strlen(TEXT)}, {"ca02", 0, (char *)"Short.", 6}};
    moe_corpus corpus = {docs, 2};
    moe_shard *sh;
    if ((rc = moe_shard_build(&corpus, tok, 0, &sh, err, sizeof err))) return rc;
    rc = moe_shard_save(sh, p_shard, err, sizeof err);
    moe_shard_free(sh);
    if (rc) return rc;

    if (write_text(p_cfg, CONFIG_JSON)) return -1;
    moe_model_config c;
    if ((rc = moe_model_config_parse(CONFIG_JSON, strlen(CONFIG_JSON), "cfg", &c, err, sizeof err))) return rc;
    c.vocab_size = moe_tokenizer_vocab_size(tok);
    moe_model *m = moe_model_create(&c, 1, 4, 1, 1, &rc, err, sizeof err);
    if (!m) return rc;
    moe_model_init(m, 3);
    moe_train_config tc = {.batch = 1, .seq = 2, .grad_accum = 1, .eval_batches = 1, .seed = 1, .n_threads = 1,
                           .opt = moe_adamw_config_default()};
    static const int32_t stream[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    moe_trainer *tr = moe_trainer_create(m, &tc, stream, 8, NULL, 0, &rc, err, sizeof err);
    if (!tr) return rc;
    rc = moe_trainer_save(tr, p_ckpt, err, sizeof err);
    moe_trainer_free(tr);
    moe_model_free(m);
    moe_tokenizer_free(tok);
    if (rc) return rc;

    mkdir(p_corpus, 0777);
    char p[256];
    snprintf(p, sizeof p, "%s/ca01", p_corpus);
    if (write_text(p, "\tThe/at jury/nn said/vbd ./.\n\n\tIt/pps is/bez ./.\n")) return -1;
    snprintf(p, sizeof p, "%s/cb02", p_corpus);
    return write_text(p, "\tA/at word/nn ./.\n");
}

/* ---- paths ---------------------------------------------------------------- */

static int path_config_parse(void *ctx) {
    moe_model_config c;
    char err[256];
    return moe_model_config_parse(CONFIG_JSON, strlen(CONFIG_JSON), "cfg", &c, err, sizeof err);
}

static int path_config_load(void *ctx) {
    moe_model_config c;
    char err[256];
    return moe_model_config_load(p_cfg, &c, err, sizeof err);
}

/* The writer: every cJSON node and the printed text come from the hooks (the
 * final copy, which the caller frees with free(), does not); a failed one is
 * a NULL, never a text with a key missing. */
static int path_config_to_json(void *ctx) {
    moe_model_config c;
    char err[256];
    int rc = moe_model_config_parse(CONFIG_JSON, strlen(CONFIG_JSON), "cfg", &c, err, sizeof err);
    if (rc) return rc;
    char *js = moe_model_config_to_json(&c);
    if (!js) return MOE_ENOMEM;
    moe_model_config back;
    rc = moe_model_config_parse(js, strlen(js), "to_json", &back, err, sizeof err);
    char *js2 = rc ? NULL : moe_model_config_to_json(&back);
    if (!rc && !js2) rc = MOE_ENOMEM;
    if (!rc && strcmp(js, js2)) rc = MOE_EFORMAT; /* a key went missing: the default came back */
    free(js), free(js2);
    return rc;
}

/* train_state.json: the parser (cJSON tree, command, growing curves) and the writer. */
static int path_train_state_json(void *ctx) {
    static const char *TS = "{\"step\": 3, \"tokens\": 96, \"skipped_steps\": 0, \"loss_spikes\": 0,"
                            " \"command\": \"moe train\", \"train\": [[1, 5.5], [2, 5.25], [3, 5]], \"val\": [[3, 5.1]]}";
    moe__train_state s;
    char err[256];
    int rc = moe__train_state_parse(TS, strlen(TS), "ts", &s, err, sizeof err);
    if (rc) return rc;
    char *js = moe__train_state_json(&s);
    moe__train_state_free(&s);
    if (!js) return MOE_ENOMEM;
    moe__free(js);
    return 0;
}

static int path_gguf(void *ctx) {
    moe__gguf *gg;
    char err[256];
    int rc = moe__gguf_open(p_gguf, &gg, err, sizeof err);
    if (rc) return rc;
    float dst[8];
    rc = moe__gguf_tensor_f32(gg, moe__gguf_find_tensor(gg, "t"), dst, 8, err, sizeof err);
    moe__gguf_close(gg);
    return rc;
}

static int path_safetensors(void *ctx) {
    moe__st_file *f;
    char err[256];
    int rc = moe__st_open(p_st, &f, err, sizeof err);
    moe__st_close(f);
    return rc;
}

static int path_tokenizer(void *ctx) {
    moe_tokenizer *t;
    char err[256];
    int rc = moe_tokenizer_load(p_tok, &t, err, sizeof err);
    moe_tokenizer_free(t);
    return rc;
}

static int path_shard(void *ctx) {
    moe_shard *s;
    char err[256];
    int rc = moe_shard_load(p_shard, &s, err, sizeof err);
    moe_shard_free(s);
    return rc;
}

static int path_corpus(void *ctx) {
    moe_corpus *c;
    char err[256];
    int rc = moe_corpus_load_brown(p_corpus, &c, err, sizeof err);
    moe_corpus_free(c);
    return rc;
}

static int path_layer(void *ctx) {
    moe_layer_config cfg = moe_layer_config_default(16, 24, 4, 2, 32);
    cfg.act = MOE_ACT_SWIGLU;
    int rc = 0;
    char err[256];
    moe_layer *l = moe_layer_create(&cfg, &rc, err, sizeof err);
    if (!l) return rc < 0 ? rc : MOE_ENOMEM + 1000; /* a NULL without a code fails the CHECK */
    moe_layer_free(l);
    return 0;
}

static int path_model_create(void *ctx) {
    moe_model_config c;
    char err[256];
    int rc = moe_model_config_parse(CONFIG_JSON, strlen(CONFIG_JSON), "cfg", &c, err, sizeof err);
    if (rc) return rc;
    moe_model *m = moe_model_create(&c, 1, 4, *(int *)ctx, 1, &rc, err, sizeof err);
    if (!m) return rc < 0 ? rc : 1;
    moe_model_free(m);
    return 0;
}

static int path_model_load(void *ctx) {
    moe_model *m;
    char err[256];
    int rc = moe_model_load(p_ckpt, 1, 4, 0, 1, &m, err, sizeof err);
    moe_model_free(m);
    return rc;
}

/* Train-state init: the trainer (its AdamW state) and the resume of its state. */
static int path_train_state(void *ctx) {
    moe_model *m;
    char err[256];
    int rc = moe_model_load(p_ckpt, 1, 4, 1, 1, &m, err, sizeof err);
    if (rc) return rc;
    moe_train_config tc = {.batch = 1, .seq = 2, .grad_accum = 1, .eval_batches = 1, .seed = 1, .n_threads = 1,
                           .opt = moe_adamw_config_default()};
    static const int32_t stream[8] = {0, 1, 2, 3, 4, 5, 6, 7};
    moe_trainer *tr = moe_trainer_create(m, &tc, stream, 8, stream, 8, &rc, err, sizeof err);
    if (tr) {
        rc = moe_trainer_load_state(tr, p_ckpt, err, sizeof err);
        moe_trainer_free(tr);
    } else if (rc >= 0)
        rc = 1;
    moe_model_free(m);
    return rc;
}

static int path_adamw(void *ctx) {
    moe_adamw_config c = moe_adamw_config_default();
    int rc = 0;
    moe_adamw *o = moe_adamw_create(1000, &c, 1, &rc);
    if (!o) return rc < 0 ? rc : 1;
    moe_adamw_free(o);
    return 0;
}

/* ---- tests ---------------------------------------------------------------- */

#define SWEEP(name, fn, ctx)                                                      \
    TEST(alloc_fail_##name) {                                                    \
        if (setup()) {                                                           \
            CHECK_MSG(0, "fixture files could not be written");                 \
            return;                                                              \
        }                                                                        \
        long n = sweep(#name, fn, ctx);                                          \
        printf("    %s: %ld allocations, each failed once\n", #name, n);       \
    }

static int g_no = 0, g_yes = 1;
SWEEP(config_parse, path_config_parse, NULL)
SWEEP(config_load, path_config_load, NULL)
SWEEP(config_to_json, path_config_to_json, NULL)
SWEEP(train_state_json, path_train_state_json, NULL)
SWEEP(gguf_open, path_gguf, NULL)
SWEEP(safetensors_open, path_safetensors, NULL)
SWEEP(tokenizer_load, path_tokenizer, NULL)
SWEEP(shard_load, path_shard, NULL)
SWEEP(corpus_load, path_corpus, NULL)
SWEEP(layer_create, path_layer, NULL)
SWEEP(model_create, path_model_create, &g_no)
SWEEP(model_create_grads, path_model_create, &g_yes)
SWEEP(model_load, path_model_load, NULL)
SWEEP(train_state, path_train_state, NULL)
SWEEP(adamw_create, path_adamw, NULL)

/* The injector itself: an unhindered run counts, and failing allocation 1 of
 * a path that makes several is seen by the path (so the sweeps above cannot
 * pass vacuously). */
TEST(alloc_fail_injector_works) {
    if (setup()) return;
    arm(0);
    int rc = path_safetensors(NULL);
    long calls = g.calls;
    disarm();
    CHECK_EQ_INT(rc, 0);
    CHECK(calls >= 2);
    arm(1);
    rc = path_safetensors(NULL);
    long failed = g.failed;
    disarm();
    CHECK_EQ_INT(failed, 1);
    CHECK_EQ_INT(rc, MOE_ENOMEM);
}

