/* `moe bench train`: training steps per second of a model on random tokens,
 * the same protocol as bench/peer_train_torch.py (its PyTorch twin). */
#include "bench.h"

#include "moe.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int moe_bench_train_main(int argc, char **argv) {
    const char *preset = "small", *config = NULL;
    int B = 8, T = 256, steps = 10, warmup = 2, threads = 2, json = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("usage: moe bench train [--preset NAME | --config FILE] [--batch B] [--seq T] [--steps S]\n"
                   "                       [--warmup W] [--threads T] [--json]\n"
                   "  defaults: preset small, batch 8, seq 256, steps 10, warmup 2, threads 2.\n"
                   "  Times forward + backward + AdamW on random tokens; median ms/step, tokens/s,\n"
                   "  peak resident memory, the MoE layers' phases (forward + backward, summed over\n"
                   "  layers, mean over the timed steps) and the all-to-all share of them.\n"
                   "  Under mpirun (an MPI build: mpirun -np P build-mpi/moe bench train) the\n"
                   "  experts are spread over P ranks, batch is per rank (global batch P x batch)\n"
                   "  and rank 0 reports.\n");
            return 0;
        } else if (!strcmp(a, "--json")) {
            json = 1;
        } else if (v && !strcmp(a, "--preset")) {
            preset = v, i++;
        } else if (v && !strcmp(a, "--config")) {
            config = v, i++;
        } else if (v && (!strcmp(a, "--batch") || !strcmp(a, "--seq") || !strcmp(a, "--steps") ||
                         !strcmp(a, "--warmup") || !strcmp(a, "--threads"))) {
            int x = atoi(v);
            if (x < (strcmp(a, "--warmup") ? 1 : 0)) {
                fprintf(stderr, "moe bench train: %s needs a positive integer\n", a);
                return 2;
            }
            *(!strcmp(a, "--batch") ? &B : !strcmp(a, "--seq") ? &T : !strcmp(a, "--steps") ? &steps
              : !strcmp(a, "--warmup") ? &warmup : &threads) = x;
            i++;
        } else {
            fprintf(stderr, "moe bench train: unknown flag '%s'\n", a);
            return 2;
        }
    }
    moe_model_config c;
    char err[512];
    int rc = config ? moe_model_config_load(config, &c, err, sizeof err) : moe_model_preset(preset, &c);
    if (rc) {
        fprintf(stderr, "moe bench train: %s\n", config ? err : "unknown preset");
        return 2;
    }
    if (T > c.max_position_embeddings) T = c.max_position_embeddings;
    moe_set_num_threads(threads);
    moe_model *m = moe_model_create(&c, B, T, 1, threads, &rc, err, sizeof err);
    if (!m) {
        fprintf(stderr, "moe bench train: %s\n", err);
        return 1;
    }
    moe_model_init(m, 1);
    const size_t ntok = (size_t)B * T * 64;
    int32_t *data = malloc(sizeof(int32_t) * (ntok + 1));
    uint64_t s = 1;
    for (size_t i = 0; i <= ntok; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        data[i] = (int32_t)((s >> 33) % (uint64_t)c.vocab_size);
    }
    moe_train_config tc;
    memset(&tc, 0, sizeof tc);
    tc.batch = B, tc.seq = T, tc.grad_accum = 1, tc.seed = 1, tc.n_threads = threads;
    tc.opt = moe_adamw_config_default();
    moe_trainer *t = moe_trainer_create(m, &tc, data, ntok + 1, NULL, 0, &rc, err, sizeof err);
    if (!t) {
        fprintf(stderr, "moe bench train: %s\n", err);
        return 1;
    }
    double *ms = malloc(sizeof(double) * steps);
    /* MoE layers, fwd + bwd, summed over layers and timed steps: all-to-all,
     * expert compute, the rest (route, dispatch, combine and their mirrors) */
    double ph_a2a = 0, ph_exp = 0, ph_rest = 0;
    const int ranks = moe_dist_size(moe_get_dist());
    for (int i = 0; i < warmup + steps; i++) {
        double t0 = now_ms();
        moe_train_step_info si;
        if (moe_trainer_step(t, &si)) {
            fprintf(stderr, "moe bench train: %s\n", moe_trainer_errmsg(t));
            return 1;
        }
        if (i < warmup) continue;
        ms[i - warmup] = now_ms() - t0;
        for (int l = 0; l < c.num_hidden_layers; l++) {
            const moe_layer_stats *st = moe_model_layer_stats(m, l);
            if (!st) continue;
            ph_a2a += st->ms_alltoall + st->ms_bwd_alltoall;
            ph_exp += st->ms_experts + st->ms_bwd_experts;
            ph_rest += st->ms_router + st->ms_dispatch + st->ms_combine + st->ms_bwd_combine + st->ms_bwd_dispatch +
                       st->ms_bwd_router;
        }
    }
    ph_a2a /= steps, ph_exp /= steps, ph_rest /= steps;
    const double ph_moe = ph_a2a + ph_exp + ph_rest, a2a_share = ph_moe > 0 ? ph_a2a / ph_moe : 0;
    qsort(ms, (size_t)steps, sizeof *ms, cmp_d);
    const double med = ms[steps / 2], tps = (double)ranks * B * T / (med / 1e3);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    if (json)
        printf("{\"impl\":\"moe\",\"tokens_per_s\":%.1f,\"ms_per_step\":%.2f,\"params\":%zu,\"peak_rss_mb\":%.1f,"
               "\"batch\":%d,\"seq\":%d,\"threads\":%d,\"core\":\"%s\",\"ranks\":%d,\"moe_ms\":%.2f,"
               "\"moe_experts_ms\":%.2f,\"moe_alltoall_ms\":%.2f,\"alltoall_share_moe\":%.4f,"
               "\"alltoall_share_step\":%.4f}\n",
               tps, med, moe_model_n_params(m), ru.ru_maxrss / 1024.0, B, T, threads, moe_blas_info(), ranks, ph_moe,
               ph_exp, ph_a2a, a2a_share, ph_a2a / med);
    else {
        printf("train step %s: batch %d x %d, %d threads, %d rank%s: %.1f ms/step, %.0f tokens/s, %zu params, "
               "peak RSS %.0f MB (rank 0)\n",
               config ? config : preset, B, T, threads, ranks, ranks > 1 ? "s" : "", med, tps, moe_model_n_params(m),
               ru.ru_maxrss / 1024.0);
        if (ph_moe > 0)
            printf("  MoE layers fwd+bwd per step: %.1f ms (experts %.1f, all-to-all %.1f, rest %.1f); all-to-all "
                   "%.1f%% of the MoE layers, %.1f%% of the step\n",
                   ph_moe, ph_exp, ph_a2a, ph_rest, 100 * a2a_share, 100 * ph_a2a / med);
    }
    free(ms), free(data);
    moe_trainer_free(t);
    moe_model_free(m);
    return 0;
}
