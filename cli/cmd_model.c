/* moe eval, moe info, moe generate: use a trained model directory. */
#include "args.h"
#include "cli.h"
#include "io/ckpt.h"
#include "route.h"

#include "data/shard.h"
#include "io/atomic.h"
#include "tokenizer/tokenizer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static moe_model *load_model(const char *dir, int batch, int seq, int threads) {
    char err[512];
    moe_model *m = NULL;
    moe_set_num_threads(threads);
    int rc = moe_model_load(dir, batch, seq, 0, threads, &m, err, sizeof err);
    if (rc) fprintf(stderr, "moe: %s\n", err);
    return m;
}

int moe_cli_eval(int argc, char **argv) {
    if (cli_model_missing("eval", argc, argv)) return 1;
    const char *dir = NULL, *data = "data/brown";
    int threads = 2, batch = 8, seq = 0, batches = 0, k = 0, json = 0;
    cli_arg args[] = {
        {"--model", "-m", ARG_STR, &dir, "model directory (required)"},
        {"--data", NULL, ARG_STR, &data, "Brown corpus directory"},
        {"--threads", "-t", ARG_INT, &threads, "threads (at most 4 per CPU)", RANGE(1, moe_max_threads())},
        {"--batch", NULL, ARG_INT, &batch, "sequences per batch", RANGE(1, 1 << 16)},
        {"--seq", NULL, ARG_INT, &seq, "tokens per sequence (unset: the context length)", AT_LEAST(2)},
        {"--batches", NULL, ARG_INT, &batches, "batches to evaluate (unset: the whole validation split)", AT_LEAST(1)},
        {"--experts-used", NULL, ARG_INT, &k, "override k, the experts per token (0: as trained)", AT_LEAST(0)},
        {"--json", NULL, ARG_BOOL, &json, "print one JSON object"},
    };
    int rc = cli_parse("moe eval -m DIR [--experts-used K] [--json]", args, sizeof args / sizeof args[0], argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (!dir) {
        fprintf(stderr, "moe eval: -m DIR is required\n");
        return 2;
    }
    char path[4096];
    moe__ckpt_path(dir, "tokenizer.json", path, sizeof path, NULL, 0); /* a checkpoint cut short reads as the committed one */
    cli_data d;
    if (cli_data_load(data, path, 0, json, &d)) return 1;
    moe_model *m = load_model(dir, batch, seq, threads);
    if (!m) {
        cli_data_free(&d);
        return 1;
    }
    const moe_model_config *c = moe_model_get_config(m);
    if (seq > c->max_position_embeddings) {
        fprintf(stderr, "moe eval: --seq %d is longer than the model's context (max_position_embeddings %d)\n", seq,
                c->max_position_embeddings);
        moe_model_free(m);
        cli_data_free(&d);
        return 2;
    }
    if (seq <= 0) seq = c->max_position_embeddings;
    if (k && moe_model_set_experts_used(m, k)) {
        fprintf(stderr, "moe eval: %s\n", moe_model_errmsg(m));
        return 2;
    }
    /* non-overlapping windows over the whole validation stream */
    const size_t nwin = (d.val->n_tokens - 1) / (size_t)seq;
    const size_t nb = batches > 0 && (size_t)batches * batch < nwin ? (size_t)batches : nwin / (size_t)batch;
    int32_t *tok = malloc(sizeof(int32_t) * batch * seq), *tg = malloc(sizeof(int32_t) * batch * seq);
    double sum = 0, t0 = cli_now();
    for (size_t b = 0; b < nb && tok && tg; b++) {
        for (int s = 0; s < batch; s++) {
            const size_t off = (b * batch + s) * (size_t)seq;
            memcpy(tok + (size_t)s * seq, d.val->tokens + off, sizeof(int32_t) * seq);
            memcpy(tg + (size_t)s * seq, d.val->tokens + off + 1, sizeof(int32_t) * seq);
        }
        float ce;
        if (moe_model_forward(m, tok, tg, batch, seq, NULL)) {
            fprintf(stderr, "moe eval: %s\n", moe_model_errmsg(m));
            return 1;
        }
        moe_model_last_losses(m, &ce, NULL);
        sum += ce;
    }
    const double loss = nb ? sum / nb : NAN, ntok = (double)nb * batch * seq;
    const int kk = k ? k : c->num_experts_per_tok;
    if (json)
        printf("{\"val_loss\": %.6f, \"perplexity\": %.4f, \"tokens\": %.0f, \"experts_used\": %d, \"seconds\": %.2f}\n",
               loss, exp(loss), ntok, c->num_local_experts ? kk : 0, cli_now() - t0);
    else
        printf("val loss %.4f nats/token, perplexity %.2f over %.0f tokens (experts used per token: %d) in %.1f s\n", loss,
               exp(loss), ntok, c->num_local_experts ? kk : 0, cli_now() - t0);
    free(tok), free(tg);
    moe_model_free(m);
    cli_data_free(&d);
    return 0;
}

/* moe info --system: what this machine and build give the engine, and the
 * threading settings in effect (the CLI's GOMP_SPINCOUNT default included). */
static int print_system(void) {
    static const char *const feats[] = {"sse4.2", "avx",      "avx2",     "fma",       "f16c",
                                        "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vnni",
                                        "avx512vbmi"};
    __builtin_cpu_init();
    printf("cpu features      ");
    for (size_t i = 0; i < sizeof feats / sizeof feats[0]; i++) {
        int has = 0;
        /* __builtin_cpu_supports takes a literal: one row per name */
#define F(name) if (!strcmp(feats[i], name)) has = __builtin_cpu_supports(name);
        F("sse4.2") F("avx") F("avx2") F("fma") F("f16c") F("avx512f") F("avx512bw") F("avx512dq") F("avx512vl")
        F("avx512vnni") F("avx512vbmi")
#undef F
        printf("%s%s", has ? feats[i] : "", has ? " " : "");
    }
    printf("\nengine kernels    %s\n", moe_kernel_set());
    printf("openblas kernel   %s\n", moe_blas_info());
    printf("threads           %d by default, at most %d (4 per CPU)\n", moe_get_num_threads(), moe_max_threads());
    const char *wp = getenv("OMP_WAIT_POLICY"), *sc = getenv("GOMP_SPINCOUNT");
    printf("openmp waits      OMP_WAIT_POLICY=%s GOMP_SPINCOUNT=%s\n", wp ? wp : "(unset)", sc ? sc : "(unset: libgomp's)");
    return 0;
}

int moe_cli_info(int argc, char **argv) {
    for (int i = 0; i < argc; i++) /* before the -m checks: it needs no model */
        if (!strcmp(argv[i], "--system")) return print_system();
    if (cli_model_missing("info", argc, argv)) return 1;
    if (cli_is_gguf_model(argc, argv)) return moe_cli_gguf_info(argc, argv);
    const char *dir = NULL, *preset = NULL, *config = NULL;
    int json = 0, ctx = 0, print_config = 0, sys = 0;
    cli_arg args[] = {
        {"--model", "-m", ARG_STR, &dir, "model directory (a GGUF file: its card, see moe info -m FILE.gguf --help)"},
        {"--print-config", NULL, ARG_BOOL, &print_config, "print the config.json instead of the card"},
        {"--preset", NULL, ARG_STR, &preset, "or a preset (tiny, tiny-dense, small, small-dense, small-mixtral)"},
        {"--config", NULL, ARG_STR, &config, "or a config.json"},
        {"--ctx", NULL, ARG_INT, &ctx, "context for the FLOPs per token (0: the model's)", RANGE(0, 1 << 24)},
        {"--json", NULL, ARG_BOOL, &json, "print one JSON object"},
        {"--system", NULL, ARG_BOOL, &sys, "print this machine's CPU features, the kernels and threading in effect"},
    };
    int rc = cli_parse("moe info -m DIR [--json] | --system", args, sizeof args / sizeof args[0], argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    moe_model_config c;
    char err[512], path[4096];
    if (dir) {
        moe__ckpt_path(dir, "config.json", path, sizeof path, NULL, 0);
        rc = moe_model_config_load(path, &c, err, sizeof err);
    } else if (config) {
        rc = moe_model_config_load(config, &c, err, sizeof err);
    } else if (preset) {
        rc = moe_model_preset(preset, &c);
        snprintf(err, sizeof err, "unknown preset '%s'", preset);
    } else {
        fprintf(stderr, "moe info: give -m DIR, --preset NAME or --config FILE\n");
        return 2;
    }
    if (rc) {
        fprintf(stderr, "moe info: %s\n", err);
        return 1;
    }
    if (print_config) {
        char *js = moe_model_config_to_json(&c);
        if (!js) return 1;
        puts(js);
        free(js);
        return 0;
    }
    cli_print_card(&c, ctx > 0 ? ctx : c.max_position_embeddings, json);
    return 0;
}

/* --routing-log: one trace line for the token just fed to the decoder */
static void log_routing(moe__sb *b, const moe_model *m, const moe_tokenizer *tok, moe__trace_tok *tt, long long pos,
                        int id, const char *src) {
    if (!b) return;
    tt->pos = pos, tt->token = id, tt->genre[0] = 0;
    snprintf(tt->src, sizeof tt->src, "%s", src);
    cli_trace_piece(tok, id, tt);
    cli_trace_fill(m, 0, tt);
    moe__trace_write(b, tt);
}

int moe_cli_generate(int argc, char **argv) {
    if (cli_model_missing("generate", argc, argv)) return 1;
    if (cli_is_gguf_model(argc, argv)) return moe_cli_gguf_generate(argc, argv);
    const char *dir = NULL, *prompt = "", *routing_log = NULL;
    int n = 64, threads = 2, top_k = 0, k = 0;
    float temp = 0.8f, top_p = 0.95f;
    uint64_t seed = 42;
    cli_arg args[] = {
        {"--model", "-m", ARG_STR, &dir, "model directory (required)"},
        {"--prompt", "-p", ARG_STR, &prompt, "prompt text"},
        {"--n-predict", "-n", ARG_INT, &n, "tokens to generate (-1: until end of text or a full context)", AT_LEAST(-1)},
        {"--temp", NULL, ARG_FLOAT, &temp, "temperature (0: greedy, deterministic)", AT_LEAST(0)},
        {"--top-k", NULL, ARG_INT, &top_k, "keep the k most likely tokens (0: all)", AT_LEAST(0)},
        {"--top-p", NULL, ARG_FLOAT, &top_p, "nucleus sampling mass (1: off)", RANGE(0, 1)},
        {"--seed", NULL, ARG_U64, &seed, "sampling seed"},
        {"--threads", "-t", ARG_INT, &threads, "threads (at most 4 per CPU)", RANGE(1, moe_max_threads())},
        {"--experts-used", NULL, ARG_INT, &k, "override k, the experts per token (0: as trained)", AT_LEAST(0)},
        {"--routing-log", NULL, ARG_STR, &routing_log, "write each token's experts and gate weights (JSON lines) here"},
    };
    int rc = cli_parse("moe generate -m DIR -p TEXT -n N [--temp T --top-p P --seed S]", args,
                       sizeof args / sizeof args[0], argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (!dir) {
        fprintf(stderr, "moe generate: -m DIR is required\n");
        return 2;
    }
    char err[512], path[4096];
    moe_tokenizer *tok;
    moe__ckpt_path(dir, "tokenizer.json", path, sizeof path, NULL, 0);
    if (moe_tokenizer_load(path, &tok, err, sizeof err)) {
        fprintf(stderr, "moe generate: %s\n", err);
        return 1;
    }
    moe_model *m = load_model(dir, 1, 0, threads);
    if (!m) return 1;
    if (k && moe_model_set_experts_used(m, k)) {
        fprintf(stderr, "moe generate: %s\n", moe_model_errmsg(m));
        return 2;
    }
    if (moe_model_decode_reset(m)) { /* e.g. expert choice: non-causal */
        fprintf(stderr, "moe generate: %s\n", moe_model_errmsg(m));
        moe_model_free(m);
        moe_tokenizer_free(tok);
        return 1;
    }
    const int V = moe_model_get_config(m)->vocab_size, ctx = moe_model_get_config(m)->max_position_embeddings;
    size_t plen = strlen(prompt), np = 0;
    int32_t *ids = malloc(sizeof(int32_t) * (plen + 2));
    moe_tokenizer_encode(tok, prompt, plen, ids + 1, plen + 1, &np);
    ids[0] = moe_tokenizer_eos(tok); /* documents start after an end-of-text */
    np += 1;
    if ((int)np > ctx) {
        fprintf(stderr, "moe generate: the prompt is %zu tokens, the context %d\n", np, ctx);
        return 2;
    }
    if (n < 0 || n > ctx - (int)np) n = ctx - (int)np; /* -1: until end of text or a full context */
    /* the library's sampler (top-k -> top-p -> temperature, llama.cpp's
     * order), the one the GGUF engine's generate uses */
    moe_sampler_params sp = {.temp = temp, .top_k = top_k, .top_p = top_p, .seed = seed};
    moe_sampler *smp = NULL;
    if (moe_sampler_create(&sp, V, &smp)) {
        fprintf(stderr, "moe generate: bad sampling parameters (--temp %g --top-k %d --top-p %g)\n", temp, top_k,
                top_p);
        free(ids);
        moe_model_free(m);
        moe_tokenizer_free(tok);
        return 2;
    }
    const float *logits = NULL;
    moe_model_decode_reset(m);
    moe__sb rlog = {0};
    moe__trace_tok *tt = routing_log ? malloc(sizeof *tt) : NULL;
    if (tt) cli_trace_header(&rlog, dir, moe_model_get_config(m), k);
    moe__sb *lb = tt ? &rlog : NULL;
    fputs(prompt, stdout);
    double t0 = cli_now();
    for (size_t i = 0; i < np && !rc; i++) {
        rc = moe_model_decode(m, ids[i], &logits);
        if (!rc) log_routing(lb, m, tok, tt, (long long)i, ids[i], "prompt");
    }
    double t1 = cli_now();
    int made = 0;
    for (; made < n && !rc; made++) {
        int32_t next = moe_sampler_sample(smp, logits);
        if (next == moe_tokenizer_eos(tok)) break;
        size_t len;
        const char *piece = moe_tokenizer_piece(tok, next, &len);
        fwrite(piece, 1, len, stdout);
        fflush(stdout);
        rc = moe_model_decode(m, next, &logits);
        if (!rc) log_routing(lb, m, tok, tt, (long long)np + made, next, "gen");
    }
    if (rc) fprintf(stderr, "\nmoe generate: %s\n", moe_model_errmsg(m));
    fprintf(stderr, "\n[prompt %zu tokens in %.2f s; %d tokens at %.1f tokens/s]\n", np, t1 - t0, made,
            made / (cli_now() - t1));
    if (routing_log) {
        moe__iov part = {rlog.p, rlog.len};
        if (!tt || rlog.oom || moe__write_atomic(routing_log, &part, 1, err, sizeof err)) {
            fprintf(stderr, "moe generate: %s\n", tt && !rlog.oom ? err : "out of memory for the routing log");
            rc = rc ? rc : 1;
        }
    }
    moe__sb_free(&rlog);
    free(tt);
    moe_sampler_free(smp);
    free(ids);
    moe_model_free(m);
    moe_tokenizer_free(tok);
    return rc ? 1 : 0;
}
