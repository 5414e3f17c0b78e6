/* The moe command-line tool. Only cli/ prints and exits. */
#include "../bench/bench.h"
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void usage(FILE *f) {
    fprintf(f, "moe %s: sparse Mixture-of-Experts in C\n\n"
               "usage: moe <command> [flags]   (moe <command> --help for its flags)\n\n"
               "commands:\n"
               "  train         train a MoE language model on the Brown corpus (the main job)\n"
               "  eval          validation loss and perplexity of a trained model\n"
               "  generate      generate text with a trained model or a GGUF MoE model (KV cache)\n"
               "  perplexity    perplexity of a GGUF model on a text (llama.cpp's protocol)\n"
               "  convert       export a trained model as GGUF (llama.cpp), import GGUF / Hugging Face\n"
               "  info          model card: total vs active parameters, memory, FLOPs per token\n"
               "  tokenizer     train / inspect the byte-level BPE tokenizer\n"
               "  tokenize      token ids of a text under a GGUF file's tokenizer (as llama-tokenize)\n"
               "  plot          loss curves of several runs in one SVG\n"
               "  route         routing audit: expert load per layer and per genre, trace\n"
               "  experiment    capacity (dense vs 4..64 experts) and balancing ablation tables\n"
               "  bench layer   time the MoE layer (forward, forward+backward) on fixed shapes\n"
               "  bench sgemm   time OpenBLAS sgemm, the fp32 ceiling of this machine\n"
               "  bench train   time training steps of a model (vs bench/peer_train_torch.py)\n"
               "  bench small-gemm  the experts' in-place few-row kernel vs OpenBLAS\n"
               "  bench bandwidth   streaming read bandwidth (the ceiling of decoding)\n"
               "  bench engine  a GGUF model's prompt and decode speed, llama-bench's protocol\n"
               "  version       print the version\n",
            moe_version());
}

static int cmd_bench(int argc, char **argv) {
    if (argc < 1 || !strcmp(argv[0], "--help") || !strcmp(argv[0], "-h")) {
        printf("usage: moe bench layer|sgemm|train|small-gemm|bandwidth|engine [flags]   (moe bench layer --help)\n");
        return argc < 1 ? 2 : 0;
    }
    if (!strcmp(argv[0], "layer")) return moe_bench_layer_main(argc - 1, argv + 1);
    if (!strcmp(argv[0], "sgemm")) return moe_bench_sgemm_main(argc - 1, argv + 1);
    if (!strcmp(argv[0], "train")) return moe_bench_train_main(argc - 1, argv + 1);
    if (!strcmp(argv[0], "small-gemm")) return moe_bench_small_gemm_main(argc - 1, argv + 1);
    if (!strcmp(argv[0], "bandwidth")) return moe_bench_bandwidth_main(argc - 1, argv + 1);
    if (!strcmp(argv[0], "engine")) return moe_bench_engine_main(argc - 1, argv + 1);
    fprintf(stderr, "moe bench: unknown benchmark '%s' (layer, sgemm, train, small-gemm, bandwidth, engine)\n", argv[0]);
    return 2;
}

/* The spin count of libgomp's waits by default: after ~10000 spins (tens of
 * microseconds) a waiting thread sleeps instead of burning the timeslice a
 * descheduled teammate needs. libgomp's own default spins ~100x longer; with
 * another CPU-bound process per core that cost `moe generate -m DIR` 98% of
 * its speed (233 -> 5.1 tokens/s; bench/busy_machine.sh). */
#define MOE_GOMP_SPINCOUNT "10000"

/* OpenBLAS and libgomp read their settings when they are loaded, before
 * main: the CLI puts its defaults in the environment and restarts itself
 * once (a faster OpenBLAS kernel when moe_blas_coretype_hint says so; the
 * spin count above unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is set by the
 * user). MOE_NO_REEXEC=1 opts out; on failure, go on as we are. */
static void set_runtime_env(char **argv) {
    if (getenv("MOE_NO_REEXEC")) return;
    const char *hint = moe_blas_coretype_hint();
    const int blas = hint && setenv("OPENBLAS_CORETYPE", hint, 1) == 0;
    const int gomp = !getenv("OMP_WAIT_POLICY") && !getenv("GOMP_SPINCOUNT") &&
                     setenv("GOMP_SPINCOUNT", MOE_GOMP_SPINCOUNT, 1) == 0;
    if (!blas && !gomp) return;
    execv("/proc/self/exe", argv); /* both are set now: the restarted process goes straight on */
    if (blas) unsetenv("OPENBLAS_CORETYPE");
    if (gomp) unsetenv("GOMP_SPINCOUNT");
}

/* Under mpirun (an MPI build), the commands run expert-parallel on the world
 * communicator (docs/distributed.md); only rank 0 writes to stdout. */
static moe_dist *start_dist(void) {
    if (!moe_dist_is_mpi() || !(getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE"))) return NULL;
    char msg[256];
    int err;
    moe_dist *d = moe_dist_world(&err, msg, sizeof msg);
    if (!d) {
        fprintf(stderr, "moe: %s\n", msg);
        exit(1);
    }
    moe_set_dist(d);
    if (moe_dist_rank(d) != 0 && !freopen("/dev/null", "w", stdout)) exit(1);
    return d;
}

static int run_command(int argc, char **argv);

int main(int argc, char **argv) {
    set_runtime_env(argv);
    moe_dist *d = start_dist();
    const int rc = run_command(argc, argv);
    moe_dist_free(d);
    return rc;
}

static int run_command(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "version") || !strcmp(argv[1], "--version")) {
        printf("moe %s\n", moe_version());
        return 0;
    }
    if (!strcmp(argv[1], "bench")) return cmd_bench(argc - 2, argv + 2);
    static const struct {
        const char *name;
        int (*fn)(int, char **);
    } cmds[] = {{"train", moe_cli_train}, {"eval", moe_cli_eval}, {"generate", moe_cli_generate},
                {"info", moe_cli_info}, {"tokenizer", moe_cli_tokenizer}, {"plot", moe_cli_plot},
                {"tokenize", moe_cli_tokenize}, {"route", moe_cli_route}, {"experiment", moe_cli_experiment},
                {"perplexity", moe_cli_perplexity}, {"convert", moe_cli_convert}};
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (!strcmp(argv[1], cmds[i].name)) return cmds[i].fn(argc - 2, argv + 2);
    fprintf(stderr, "moe: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
