/* moe generate -m FILE.gguf and moe perplexity: the GGUF inference engine with
 * llama.cpp's flags where they overlap (llama-completion, llama-perplexity). */
#include "args.h"
#include "cli.h"
#include "internal.h"
#include "io/atomic.h"
#include "io/ckpt.h"
#include "io/gguf.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/vocab.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <string.h>

int cli_is_gguf_model(int argc, char **argv) {
    const char *path = NULL;
    for (int i = 0; i + 1 < argc; i++)
        if (!strcmp(argv[i], "-m") || !strcmp(argv[i], "--model")) path = argv[i + 1];
    FILE *f = path ? fopen(path, "rb") : NULL;
    char magic[4] = {0};
    const int ok = f && fread(magic, 1, 4, f) == 4 && !memcmp(magic, "GGUF", 4);
    if (f) fclose(f);
    return ok;
}

int cli_model_missing(const char *cmd, int argc, char **argv) {
    const char *path = NULL;
    for (int i = 0; i + 1 < argc; i++)
        if (!strcmp(argv[i], "-m") || !strcmp(argv[i], "--model")) path = argv[i + 1];
    struct stat st;
    if (!path || stat(path, &st) == 0) return 0;
    fprintf(stderr, "moe %s: %s: %s\n", cmd, path, strerror(errno));
    return 1;
}

void cli_encode_failed(const char *cmd, const char *path, const moe_vocab *v, int rc) {
    if (rc == MOE_EINVAL) /* the one code the encoder returns for its input (vocab.h) */
        fprintf(stderr, "moe %s: %s: cannot tokenize the text under tokenizer.ggml.model \"%s\" (pre \"%s\"): it needs "
                        "a byte token the vocabulary lacks, or is not valid UTF-8; is the file's tokenizer model the right "
                        "one?\n", cmd, path, moe_vocab_model(v), moe_vocab_pre(v));
    else if (rc)
        fprintf(stderr, "moe %s: %s: cannot tokenize: %s\n", cmd, path, moe_strerror(rc));
    else
        fprintf(stderr, "moe %s: %s: the text gives no tokens under tokenizer.ggml.model \"%s\" (the vocabulary has "
                        "none of its bytes; is the file's tokenizer model the right one?)\n", cmd, path,
                moe_vocab_model(v));
}

#define MAX_TEXT ((size_t)1 << 31)

/* The tokenizer of the model file (a second, read-only mapping of it). */
static moe_vocab *load_vocab(const char *cmd, const char *path) {
    char err[1024];
    moe__gguf *g = NULL;
    moe_vocab *v = NULL;
    int rc = moe__gguf_open(path, &g, err, sizeof err);
    if (!rc) rc = moe_vocab_from_gguf(g, &v, err, sizeof err);
    moe__gguf_close(g);
    if (rc) fprintf(stderr, "moe %s: %s\n", cmd, err);
    return v;
}

/* text -> ids with the special tokens the vocab adds (BOS), as llama.cpp's
 * common_tokenize(text, add_special = true). */
static int encode(const moe_vocab *v, const char *text, size_t len, int32_t **ids, size_t *n) {
    size_t need = 0;
    int rc = moe_vocab_encode(v, text, len, 1, NULL, 0, &need);
    if (rc && rc != MOE_ELIMIT) return rc;
    *ids = malloc((need ? need : 1) * sizeof **ids);
    if (!*ids) return MOE_ENOMEM;
    return moe_vocab_encode(v, text, len, 1, *ids, need, n);
}

static void print_piece(const moe_vocab *v, int32_t id) {
    char buf[256];
    size_t len;
    if (!moe_vocab_piece(v, id, buf, sizeof buf, &len)) fwrite(buf, 1, len, stdout);
}

/* "1,2,3" -> ids (debugging input: bypasses the tokenizer). */
static int parse_ids(const char *s, int32_t **out, size_t *n) {
    size_t cap = 16, k = 0;
    int32_t *ids = malloc(sizeof(int32_t) * cap);
    while (ids && *s) {
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (end == s || errno || v < 0 || v > INT32_MAX) break;
        if (k == cap) {
            int32_t *p = realloc(ids, sizeof(int32_t) * (cap *= 2));
            if (!p) break;
            ids = p;
        }
        ids[k++] = (int32_t)v;
        s = end;
        while (*s == ',' || *s == ' ' || *s == '\n' || *s == '\t' || *s == '\r') s++;
    }
    if (!ids || *s || !k) {
        free(ids);
        return -1;
    }
    *out = ids, *n = k;
    return 0;
}

int cli_kv_types(const char *cmd, const char *ctk, const char *ctv, moe_engine_params *p) {
    const char *v[2] = {ctk, ctv}, *flag[2] = {"--cache-type-k", "--cache-type-v"};
    int *dst[2] = {&p->kv_f16_k, &p->kv_f16_v};
    for (int i = 0; i < 2; i++) {
        if (strcmp(v[i], "f16") && strcmp(v[i], "f32")) {
            fprintf(stderr, "moe %s: %s '%s': the KV cache types are f16 and f32\n", cmd, flag[i], v[i]);
            return -1;
        }
        *dst[i] = !strcmp(v[i], "f16");
    }
    return 0;
}

/* moe_engine_params.repack from -nr / --repack-all */
int cli_repack(int no_repack, int repack_all) { return no_repack ? 0 : repack_all ? 2 : 1; }

static moe_engine *open_engine(const char *cmd, const char *path, int ctx, int batch, int threads, int k,
                               int no_mmap, int repack, const char *ctk, const char *ctv) {
    moe_engine_params p = moe_engine_params_default();
    p.n_ctx = ctx, p.n_batch = batch, p.n_threads = threads, p.experts_used = k, p.use_mmap = !no_mmap;
    p.repack = repack;
    if (cli_kv_types(cmd, ctk, ctv, &p)) return NULL;
    char err[512];
    moe_engine *e;
    int rc = moe_engine_load(path, &p, &e, err, sizeof err);
    if (rc) {
        fprintf(stderr, "moe %s: %s (%s)\n", cmd, err, moe_err_name(rc));
        return NULL;
    }
    const moe_engine_hparams *h = moe_engine_get_hparams(e);
    /* under mpirun (expert parallelism) rank 0 reports; every rank reports its errors */
    const int ranks = moe_dist_size(moe_get_dist());
    if (h->n_ctx_train > 0 && h->n_ctx > h->n_ctx_train && moe_dist_rank(moe_get_dist()) == 0)
        fprintf(stderr, "moe %s: warning: -c %d is more than the %d positions the model was trained on: past them the "
                        "output degrades, and each token attends to the whole context (prompt time grows with its "
                        "square)\n", cmd, h->n_ctx, h->n_ctx_train);
    if (moe_dist_rank(moe_get_dist()) == 0)
        fprintf(stderr, "moe %s: %s: arch %s, %d layers, C %d, %d experts (k %d), F %d%s, vocab %d, %s experts, ctx %d (K %s, V %s)%s\n",
                cmd, path, h->arch, h->n_layer, h->n_embd, h->n_expert, k ? k : h->n_expert_used, h->n_ff_exp,
                h->n_ff_shexp ? " + shared" : "", h->n_vocab, moe__gguf_type_name(h->expert_type), h->n_ctx, ctk, ctv,
                ranks > 1 ? ", experts spread over the ranks" : "");
    return e;
}

int moe_cli_gguf_generate(int argc, char **argv) {
    const char *path = NULL, *prompt = NULL, *ids_arg = NULL, *ctk = "f16", *ctv = "f16";
    int n = 64, threads = 0, ctx = 0, k = 0, top_k = 40, no_mmap = 0, no_repack = 0, repack_all = 0, batch = 512;
    float temp = 0.8f, top_p = 0.95f;
    uint64_t seed = 42;
    cli_arg args[] = {
        {"--model", "-m", ARG_STR, &path, "GGUF model file (required)"},
        {"--prompt", "-p", ARG_STR, &prompt, "prompt text (tokenized with the model's tokenizer, BOS added)"},
        {"--prompt-ids", NULL, ARG_STR, &ids_arg, "prompt as token ids \"1,2,3\" (debugging)"},
        {"--n-predict", "-n", ARG_INT, &n, "tokens to generate (-1: until end of text or a full context)", AT_LEAST(-1)},
        {"--temp", NULL, ARG_FLOAT, &temp, "temperature (0: greedy, deterministic)", AT_LEAST(0)},
        {"--top-k", NULL, ARG_INT, &top_k, "keep the k most likely tokens (0: all)", AT_LEAST(0)},
        {"--top-p", NULL, ARG_FLOAT, &top_p, "nucleus sampling mass (1: off)", RANGE(0, 1)},
        {"--seed", "-s", ARG_U64, &seed, "sampling seed"},
        {"--threads", "-t", ARG_INT, &threads, "threads (0: all cores; at most 4 per CPU)", RANGE(0, moe_max_threads())},
        {"--ctx-size", "-c", ARG_INT, &ctx, "context (KV cache) size (0: the model's, at most 4096)", RANGE(0, 1 << 24)},
        {"--batch-size", "-b", ARG_INT, &batch, "prompt tokens per forward pass", RANGE(1, 1 << 16)},
        {"--experts-used", NULL, ARG_INT, &k, "override k, the experts per token (0: the file's)", AT_LEAST(0)},
        {"--no-mmap", NULL, ARG_BOOL, &no_mmap, "read the whole file instead of mapping it"},
        {"--no-repack", "-nr", ARG_BOOL, &no_repack, "run Q8_0/Q4_0 weights in the file's layout (no packed copy)"},
        {"--repack-all", NULL, ARG_BOOL, &repack_all, "copy float weights into huge pages too (first use copies them all)"},
        {"--cache-type-k", "-ctk", ARG_STR, &ctk, "KV cache type of K: f16 (llama.cpp's default) or f32"},
        {"--cache-type-v", "-ctv", ARG_STR, &ctv, "KV cache type of V: f16 or f32"},
    };
    int rc = cli_parse("moe generate -m FILE.gguf (-p TEXT | --prompt-ids 1,2,3) [-n N] [--temp T] [-t THREADS]",
                       args, sizeof args / sizeof args[0], argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (!path || (!prompt && !ids_arg)) {
        fprintf(stderr, "moe generate: -m FILE.gguf and -p TEXT or --prompt-ids are required\n");
        return 2;
    }
    if (n < 0) n = INT_MAX; /* llama.cpp's -n -1: until end of text or the context is full */
    if (cli_kv_types("generate", ctk, ctv, &(moe_engine_params){0})) return 2;
    int32_t *ids = NULL;
    size_t np = 0;
    moe_vocab *voc = NULL;
    if (ids_arg && parse_ids(ids_arg, &ids, &np)) {
        fprintf(stderr, "moe generate: --prompt-ids: expected comma-separated token ids\n");
        return 2;
    }
    if (!ids_arg) {
        if (!(voc = load_vocab("generate", path))) return 1;
        if ((rc = encode(voc, prompt, strlen(prompt), &ids, &np)) || !np) {
            cli_encode_failed("generate", path, voc, rc);
            moe_vocab_free(voc);
            free(ids);
            return 1;
        }
    }
    moe_engine *e = open_engine("generate", path, ctx, batch, threads, k, no_mmap, cli_repack(no_repack, repack_all), ctk, ctv);
    if (!e) return free(ids), moe_vocab_free(voc), 1;
    const moe_engine_hparams *h = moe_engine_get_hparams(e);
    moe_sampler_params sp = {.temp = temp, .top_k = top_k, .top_p = top_p, .seed = seed};
    moe_sampler *sm = NULL;
    float *logits = malloc(sizeof(float) * h->n_vocab);
    if (!logits || moe_sampler_create(&sp, h->n_vocab, &sm)) {
        fprintf(stderr, "moe generate: bad sampling parameters\n");
        rc = 2;
    }
    if ((int)np > h->n_ctx) {
        fprintf(stderr, "moe generate: the prompt is %zu tokens, the context %d\n", np, h->n_ctx);
        rc = 2;
    }
    double t0 = cli_now(), t1 = t0;
    int made = 0;
    if (!rc) {
        if (voc) fputs(prompt, stdout);
        fflush(stdout);
        rc = moe_engine_eval(e, ids, (int)np, logits, 0);
        t1 = cli_now();
        for (; !rc && made < n && moe_engine_n_past(e) < h->n_ctx; made++) {
            const int32_t next = moe_sampler_sample(sm, logits);
            if (voc && next == moe_vocab_eos(voc)) break;
            if (voc) print_piece(voc, next);
            else printf("%s%d", made ? "," : "", next);
            fflush(stdout);
            rc = moe_engine_eval(e, &next, 1, logits, 0);
        }
        printf("\n");
        if (rc) fprintf(stderr, "moe generate: %s\n", moe_engine_errmsg(e)), rc = 1;
    }
    if (!rc && moe_dist_rank(moe_get_dist()) == 0) {
        /* the bytes a decoded token reads: its active weights plus, on
         * average, half of the cache it ended with (compare with moe bench
         * bandwidth) */
        const double td = cli_now() - t1 + 1e-12;
        moe_engine_stats st;
        moe_engine_get_stats(e, &st);
        const double per_tok = (double)st.n_bytes_active + st.kv_bytes_per_pos * (np + made / 2.0);
        fprintf(stderr, "[prompt %zu tokens in %.3f s (%.1f t/s); %d tokens at %.2f t/s; %.1f MiB read per token, %.2f GB/s; "
                        "%.1f MiB of weights repacked]\n",
                np, t1 - t0, np / (t1 - t0 + 1e-12), made, made / td, per_tok / 1048576.0, made * per_tok / td / 1e9,
                st.n_bytes_packed / 1048576.0);
    }
    moe_sampler_free(sm);
    moe_vocab_free(voc);
    free(logits), free(ids);
    moe_engine_free(e);
    return rc;
}

/* moe info -m FILE.gguf: the file's card (total vs active weights). */
int moe_cli_gguf_info(int argc, char **argv) {
    const char *path = NULL, *ctk = "f16", *ctv = "f16";
    int json = 0, k = 0, ctx = 0;
    cli_arg args[] = {
        {"--model", "-m", ARG_STR, &path, "GGUF model file"},
        {"--experts-used", NULL, ARG_INT, &k, "k, experts per token (0: the file's)", AT_LEAST(0)},
        {"--ctx", NULL, ARG_INT, &ctx, "context for the KV cache figures (0: the file's, at most 4096)", RANGE(0, 1 << 24)},
        {"--json", NULL, ARG_BOOL, &json, "print one JSON object"},
        {"--cache-type-k", "-ctk", ARG_STR, &ctk, "KV cache type of K: f16 (llama.cpp's default) or f32"},
        {"--cache-type-v", "-ctv", ARG_STR, &ctv, "KV cache type of V: f16 or f32"},
    };
    int rc = cli_parse("moe info -m FILE.gguf [--experts-used K] [--json]", args, sizeof args / sizeof args[0], argc,
                       argv);
    if (rc) return rc == 1 ? 0 : 2;
    moe_engine *e = open_engine("info", path, ctx, 1, 1, k, 0, 0, ctk, ctv);
    if (!e) return 1;
    const moe_engine_hparams *h = moe_engine_get_hparams(e);
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    const double kv_ctx = (double)st.kv_bytes_per_pos * h->n_ctx;
    if (json) {
        /* the keys of moe info --json for trained models where they overlap */
        printf("{\"arch\": \"%s\", \"total_params\": %llu, \"active_params\": %llu, \"weight_bytes\": %llu, "
               "\"weight_bytes_active\": %llu, \"kv_bytes_per_pos\": %llu, \"context_length\": %d, \"experts\": %d, "
               "\"experts_per_token\": %d, \"layers\": %d, \"hidden_size\": %d, \"vocab_size\": %d, "
               "\"active_fraction\": %.4f}\n",
               h->arch, (unsigned long long)st.n_params, (unsigned long long)st.n_params_active,
               (unsigned long long)st.n_bytes, (unsigned long long)st.n_bytes_active,
               (unsigned long long)st.kv_bytes_per_pos, h->n_ctx, h->n_expert, k ? k : h->n_expert_used, h->n_layer,
               h->n_embd, h->n_vocab, (double)st.n_params_active / (double)st.n_params);
    } else {
        printf("parameters        %12.2f M total, %.2f M active per token (%.1f%%)\n", st.n_params / 1e6,
               st.n_params_active / 1e6, 100.0 * st.n_params_active / (double)st.n_params);
        printf("weights           %12.1f MiB total, %.1f MiB read per token\n", st.n_bytes / 1048576.0,
               st.n_bytes_active / 1048576.0);
        printf("KV cache          %12.1f KiB per position, %.1f MiB at n_ctx %d\n", st.kv_bytes_per_pos / 1024.0,
               kv_ctx / 1048576.0, h->n_ctx);
    }
    moe_engine_free(e);
    return 0;
}

static void print_chunk(int chunk, int n_chunk, double ppl, void *user) {
    printf("[%d]%.4f,", chunk + 1, ppl);
    fflush(stdout);
}

static int is_dir(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

/* A `moe train` directory: its own byte-level BPE (tokenizer.json); a
 * chunk starts with the end-of-text id, as its training documents do. */
static int encode_own(const char *dir, const char *file, int32_t **ids, size_t *n, int *bos) {
    char path[4096], err[512];
    moe_tokenizer *tok = NULL;
    char *text = NULL;
    size_t len = 0;
    int rc = moe__ckpt_path(dir, "tokenizer.json", path, sizeof path, err, sizeof err);
    if (!rc) rc = moe_tokenizer_load(path, &tok, err, sizeof err);
    if (!rc) rc = moe__read_file(file, MAX_TEXT, &text, &len, err, sizeof err);
    if (!rc && !(*ids = malloc(sizeof(int32_t) * (len + 1))))
        rc = MOE_ENOMEM, snprintf(err, sizeof err, "out of memory");
    if (!rc && (rc = moe_tokenizer_encode(tok, text, len, *ids, len + 1, n)))
        snprintf(err, sizeof err, "%s: cannot tokenize: %s", file, moe_strerror(rc));
    if (!rc) *bos = moe_tokenizer_eos(tok);
    if (rc) fprintf(stderr, "moe perplexity: %s\n", err);
    moe__free(text);
    moe_tokenizer_free(tok);
    return rc;
}

int moe_cli_perplexity(int argc, char **argv) {
    if (cli_model_missing("perplexity", argc, argv)) return 1;
    const char *path = NULL, *file = NULL, *ids_file = NULL, *ctk = "f16", *ctv = "f16";
    int ctx = 512, batch = 2048, threads = 0, k = 0, chunks = -1, no_mmap = 0, no_repack = 0, repack_all = 0, bos = -1;
    cli_arg args[] = {
        {"--model", "-m", ARG_STR, &path, "GGUF model file or model directory (a `moe train` run: its tokenizer) (required)"},
        {"--file", "-f", ARG_STR, &file, "text file to score (tokenized with the model's tokenizer)"},
        {"--ids-file", NULL, ARG_STR, &ids_file, "pre-tokenized input: comma-separated ids (debugging)"},
        {"--bos", NULL, ARG_INT, &bos, "with --ids-file: BOS id put at each chunk start (-1: none)", AT_LEAST(-1)},
        {"--ctx-size", "-c", ARG_INT, &ctx, "tokens per chunk (the second half is scored)", RANGE(4, 1 << 24)},
        {"--batch-size", "-b", ARG_INT, &batch, "tokens per forward pass (capped at the chunk)", RANGE(1, 1 << 16)},
        {"--chunks", NULL, ARG_INT, &chunks, "score at most this many chunks (-1: all)", AT_LEAST(-1)},
        {"--threads", "-t", ARG_INT, &threads, "threads (0: all cores; at most 4 per CPU)", RANGE(0, moe_max_threads())},
        {"--experts-used", NULL, ARG_INT, &k, "override k, the experts per token (0: the file's)", AT_LEAST(0)},
        {"--no-mmap", NULL, ARG_BOOL, &no_mmap, "read the whole file instead of mapping it"},
        {"--no-repack", "-nr", ARG_BOOL, &no_repack, "run Q8_0/Q4_0 weights in the file's layout (no packed copy)"},
        {"--repack-all", NULL, ARG_BOOL, &repack_all, "copy float weights into huge pages too (first use copies them all)"},
        {"--cache-type-k", "-ctk", ARG_STR, &ctk, "KV cache type of K: f16 (llama.cpp's default) or f32"},
        {"--cache-type-v", "-ctv", ARG_STR, &ctv, "KV cache type of V: f16 or f32"},
    };
    int rc = cli_parse("moe perplexity -m FILE.gguf|DIR -f TEXT [-c N_CTX] [-b BATCH] [-t THREADS]", args,
                       sizeof args / sizeof args[0], argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (!path || (!file && !ids_file) || ctx < 4) {
        fprintf(stderr, "moe perplexity: -m FILE.gguf|DIR, -f TEXT (or --ids-file) and -c >= 4 are required\n");
        return 2;
    }
    if (cli_kv_types("perplexity", ctk, ctv, &(moe_engine_params){0})) return 2; /* before the tokenizing */
    size_t len, n = 0;
    char *text = NULL, err[1024];
    int32_t *ids = NULL;
    if (ids_file) {
        if (moe__read_file(ids_file, MAX_TEXT, &text, &len, err, sizeof err) || parse_ids(text, &ids, &n)) {
            fprintf(stderr, "moe perplexity: %s: cannot read comma-separated token ids\n", ids_file);
            moe__free(text);
            return 1;
        }
        moe__free(text);
    } else if (is_dir(path)) {
        rc = encode_own(path, file, &ids, &n, &bos);
        if (rc) return free(ids), 1;
        fprintf(stderr, "perplexity: tokenized %s: %zu tokens\n", file, n);
    } else {
        moe_vocab *voc = load_vocab("perplexity", path);
        if (!voc) return 1;
        if ((rc = moe__read_file(file, MAX_TEXT, &text, &len, err, sizeof err))) {
            fprintf(stderr, "moe perplexity: %s\n", err);
        } else if ((rc = encode(voc, text, len, &ids, &n))) {
            cli_encode_failed("perplexity", path, voc, rc);
        }
        bos = moe_vocab_add_bos(voc) ? moe_vocab_bos(voc) : -1;
        moe__free(text);
        moe_vocab_free(voc);
        if (rc) return free(ids), 1;
        fprintf(stderr, "perplexity: tokenized %s: %zu tokens\n", file, n);
    }
    if (n < 2 * (size_t)ctx) {
        fprintf(stderr, "moe perplexity: you need at least %d tokens for a context of %d; the input has %zu\n",
                2 * ctx, ctx, n);
        free(ids);
        return 1;
    }
    if (chunks > 0 && (size_t)chunks * ctx < n) n = (size_t)chunks * ctx;
    moe_engine *e = open_engine("perplexity", path, ctx, batch < ctx ? batch : ctx, threads, k, no_mmap, cli_repack(no_repack, repack_all), ctk, ctv);
    if (!e) return free(ids), 1;
    const int root = moe_dist_rank(moe_get_dist()) == 0;
    if (root) fprintf(stderr, "perplexity: calculating perplexity over %zu chunks, n_ctx=%d\n", n / ctx, ctx);
    double ppl = 0, ppl_err = 0, t0 = cli_now();
    rc = moe_engine_perplexity(e, ids, n, ctx, bos, &ppl, &ppl_err, print_chunk, NULL);
    printf("\n");
    if (rc) {
        fprintf(stderr, "moe perplexity: %s: %s\n", moe_strerror(rc), moe_engine_errmsg(e));
    } else {
        printf("Final estimate: PPL = %.4f +/- %.5f\n", ppl, ppl_err);
        if (root) fprintf(stderr, "[%zu tokens in %.2f s]\n", n / ctx * ctx, cli_now() - t0);
    }
    free(ids);
    moe_engine_free(e);
    return rc ? 1 : 0;
}
