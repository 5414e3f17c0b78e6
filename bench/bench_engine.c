/* `moe bench engine`: llama-bench's protocol on a GGUF model, so the two
 * tables compare line by line (bench/engine_vs_llama.sh runs both):
 *   pp N: N random tokens evaluated as one batch from an empty cache;
 *   tg N: N tokens evaluated one at a time from an empty cache;
 * one untimed warm-up of each, then r timed repetitions; t/s is the mean of
 * the repetitions' rates, +- their standard deviation. tg also reports the
 * weight and cache bytes a token read and the rate they were read at (the
 * figure to hold against `moe bench bandwidth`). */
#include "bench.h"

#include "../cli/args.h"
#include "../cli/cli.h"
#include "internal.h"
#include "io/quant.h"
#include "moe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* seconds for one repetition; tokens from a fixed LCG (llama-bench uses rand()) */
static int run_once(moe_engine *e, int n, int batch, uint64_t *rng, int32_t *tok, float *logits, double *sec) {
    const int V = moe_engine_get_hparams(e)->n_vocab;
    for (int i = 0; i < n; i++) {
        *rng = *rng * 6364136223846793005ULL + 1442695040888963407ULL;
        tok[i] = (int32_t)((*rng >> 33) % (uint64_t)V);
    }
    moe_engine_truncate(e, 0);
    const double t0 = now_s();
    for (int i = 0; i < n; i += batch) {
        const int rc = moe_engine_eval(e, tok + i, n - i < batch ? n - i : batch, logits, 0);
        if (rc) return rc;
    }
    *sec = now_s() - t0;
    return 0;
}

int moe_bench_engine_main(int argc, char **argv) {
    const char *path = NULL, *ctk = "f16", *ctv = "f16";
    int pp = 128, tg = 64, reps = 5, threads = 2, k = 0, no_repack = 0, repack_all = 0;
    cli_arg args[] = {
        {"--model", "-m", ARG_STR, &path, "GGUF model file (required)"},
        {"--n-prompt", "-p", ARG_INT, &pp, "prompt tokens, one batch (0: skip)", RANGE(0, 1 << 16)},
        {"--n-gen", "-n", ARG_INT, &tg, "generated tokens, one at a time (0: skip)", RANGE(0, 1 << 24)},
        {"--repetitions", "-r", ARG_INT, &reps, "timed repetitions of each test", AT_LEAST(1)},
        {"--threads", "-t", ARG_INT, &threads, "threads (at most 4 per CPU)", RANGE(1, moe_max_threads())},
        {"--experts-used", NULL, ARG_INT, &k, "k, experts per token (0: the file's)", AT_LEAST(0)},
        {"--cache-type-k", "-ctk", ARG_STR, &ctk, "KV cache type of K: f16 (llama.cpp's default) or f32"},
        {"--cache-type-v", "-ctv", ARG_STR, &ctv, "KV cache type of V: f16 or f32"},
        {"--no-repack", "-nr", ARG_BOOL, &no_repack, "run Q8_0/Q4_0 weights in the file's layout (no packed copy)"},
        {"--repack-all", NULL, ARG_BOOL, &repack_all, "copy float weights into huge pages too (first use copies them all)"},
    };
    int rc = cli_parse("moe bench engine -m FILE.gguf [-p 128] [-n 64] [-r 5] [-t 2]", args,
                       sizeof args / sizeof args[0], argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (!path || pp < 0 || tg < 0 || reps < 1 || threads < 1) {
        fprintf(stderr, "moe bench engine: -m FILE.gguf is required; -p, -n >= 0, -r, -t >= 1\n");
        return 2;
    }
    moe_engine_params p = moe_engine_params_default();
    p.n_ctx = (pp > tg ? pp : tg) + 1, p.n_batch = pp > 0 ? pp : 1, p.n_threads = threads, p.experts_used = k;
    p.repack = cli_repack(no_repack, repack_all);
    if (cli_kv_types("bench engine", ctk, ctv, &p)) return 2;
    char err[512];
    moe_engine *e;
    if ((rc = moe_engine_load(path, &p, &e, err, sizeof err))) {
        fprintf(stderr, "moe bench engine: %s (%s)\n", err, moe_err_name(rc));
        return 1;
    }
    const moe_engine_hparams *h = moe_engine_get_hparams(e);
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)(pp > tg ? pp : tg) + 4);
    float *logits = malloc(sizeof(float) * (size_t)h->n_vocab);
    if (!tok || !logits) {
        fprintf(stderr, "moe bench engine: out of memory\n");
        free(tok), free(logits), moe_engine_free(e);
        return 1;
    }
    printf("| model | size | params | threads | test | t/s | weights+KV read per token | GB/s |\n");
    printf("|---|---:|---:|---:|---|---:|---:|---:|\n");
    uint64_t rng = 1234;
    const struct { const char *name; int n, batch; } tests[2] = {{"pp", pp, pp}, {"tg", tg, 1}};
    for (int ti = 0; ti < 2 && !rc; ti++) {
        const int n = tests[ti].n;
        if (!n) continue;
        double sec, sum = 0, sum2 = 0;
        rc = run_once(e, n, tests[ti].batch, &rng, tok, logits, &sec); /* warm-up: page in, caches */
        for (int r = 0; r < reps && !rc; r++) {
            rc = run_once(e, n, tests[ti].batch, &rng, tok, logits, &sec);
            const double tps = n / sec;
            sum += tps, sum2 += tps * tps;
        }
        if (rc) break;
        const double mean = sum / reps, sd = reps > 1 ? sqrt(fmax(0, (sum2 - reps * mean * mean) / (reps - 1))) : 0;
        printf("| %s %s | %.1f MiB | %.1f M | %d | %s%d | %.2f ± %.2f |", h->arch, moe__gguf_type_name(h->expert_type),
               st.n_bytes / 1048576.0, st.n_params / 1e6, threads, tests[ti].name, n, mean, sd);
        if (tests[ti].batch == 1) { /* a token at position i reads i + 1 cached positions */
            const double bytes = (double)st.n_bytes_active + st.kv_bytes_per_pos * (n + 1) / 2.0;
            printf(" %.1f MiB | %.2f |\n", bytes / 1048576.0, bytes * mean / 1e9);
        } else {
            printf(" | |\n");
        }
        fflush(stdout);
    }
    if (rc) fprintf(stderr, "moe bench engine: %s\n", moe_engine_errmsg(e));
    free(tok), free(logits);
    moe_engine_free(e);
    return rc ? 1 : 0;
}
