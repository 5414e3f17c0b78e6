/* moe train: the main job. Data -> tokenizer -> model -> AdamW steps with
 * periodic evaluation and checkpoints -> model card, loss curve (SVG). */
#include "args.h"
#include "cli.h"

#include "data/shard.h"
#include "internal.h"
#include "io/atomic.h"
#include "io/ckpt.h"
#include "tokenizer/tokenizer.h"
#include "train/state_json.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

/* SIGINT/SIGTERM: the first asks the loop to stop after the current step and
 * save; a second one exits at once. Either is safe at any point: checkpoints
 * are replaced as a whole (docs/robustness.md). */
static volatile sig_atomic_t g_stop;
static void on_stop_signal(int sig) {
    if (g_stop) _exit(130);
    g_stop = sig;
}

static void install_stop_handlers(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sa.sa_flags = SA_RESTART; /* a checkpoint write in progress carries on */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

/* The MoE layers' forward and backward phases of the last micro-batch,
 * summed over layers (all-to-all: expert parallelism only), or "" for a
 * dense model. The backward's route/dispatch/combine mirrors are one figure:
 * the line stays short and the all-to-all and experts are what EP changes. */
static void phase_times(const moe_model *m, char *buf, size_t n) {
    double r = 0, a = 0, e = 0, c = 0, ba = 0, be = 0, bo = 0;
    int any = 0;
    for (int i = 0; i < moe_model_get_config(m)->num_hidden_layers; i++) {
        const moe_layer_stats *st = moe_model_layer_stats(m, i);
        if (!st) continue;
        any = 1;
        r += st->ms_router + st->ms_dispatch, a += st->ms_alltoall, e += st->ms_experts, c += st->ms_combine;
        ba += st->ms_bwd_alltoall, be += st->ms_bwd_experts;
        bo += st->ms_bwd_combine + st->ms_bwd_dispatch + st->ms_bwd_router;
    }
    if (any)
        snprintf(buf, n, " | fwd ms route %.1f a2a %.1f experts %.1f combine %.1f | bwd a2a %.1f experts %.1f rest %.1f",
                 r, a, e, c, ba, be, bo);
    else buf[0] = '\0';
}

/* The loss curves; out of memory ends the command (there is nothing to
 * save a curve into). */
static void series_add(moe__train_curve *s, double x, double y) {
    if (moe__train_curve_add(s, x, y)) {
        fprintf(stderr, "moe: out of memory (or more than %d points of a loss curve)\n", MOE__TRAIN_STATE_MAX_POINTS);
        exit(1);
    }
}

/* The run record of a run being resumed (its loss curves and corpus), read
 * once. A missing file gives an empty record; so does a malformed one, after
 * a warning (the model and optimizer state are what a resume needs: the
 * record is only the plot and the default --data). */
static void run_record_load(const char *dir, moe__train_state *s) {
    char err[512];
    int rc = moe__train_state_load(dir, s, err, sizeof err); /* zeroes s on failure */
    if (rc && rc != MOE_EIO && rc != MOE_ENOTFOUND) fprintf(stderr, "moe train: %s; the loss curves start afresh\n", err);
}

/* What a checkpoint of the run holds besides the trainer's state. */
typedef struct {
    moe_trainer *tr;
    const moe_model *m;
    const moe_tokenizer *tok;
    const char *dir, *data; /* data: the corpus, absolute, for --resume */
    char *cmdline;
    moe__train_curve *hist_tr, *hist_va;
    int saved_step; /* the step of the checkpoint DIR holds; -1: none yet */
} run_ckpt;

static void fmt_loss(double v, char *b, size_t n) {
    if (isfinite(v)) snprintf(b, n, "%.4f", v);
    else snprintf(b, n, "-");
}

/* Validation loss at this step: the one just measured, else a fresh one
 * (added to the curve). MOE_ENONFINITE when it is not finite. Under mpirun
 * every rank evaluates (a collective) and the ranks agree on the result. */
static int checked_val_loss(run_ckpt *r, int step, float *out, char *err, size_t errsz) {
    moe__train_curve *va = r->hist_va;
    float vl = NAN;
    int rc = MOE_OK;
    if (va->n > 0 && va->step[va->n - 1] == step) vl = (float)va->val[va->n - 1];
    else if ((rc = moe_trainer_eval(r->tr, &vl))) snprintf(err, errsz, "%s", moe_trainer_errmsg(r->tr));
    else if (isfinite(vl)) series_add(va, step, vl);
    if (!rc && !isfinite(vl)) rc = moe__set_err(err, errsz, MOE_ENONFINITE, "the validation loss is %g", (double)vl);
    rc = moe__model_agree(r->m, rc, err, errsz);
    if (rc) {
        char why[400];
        snprintf(why, sizeof why, "%s", err);
        moe__set_err(err, errsz, rc, "the model of step %d does not evaluate (%s): not saved", step, why);
    }
    *out = vl;
    return rc;
}

/* One checkpoint: tokenizer, model, optimizer state and the run record of the
 * same step, replaced together. Only a model that evaluates replaces the
 * previous checkpoint: the library refuses non-finite weights and moments,
 * and a finite validation loss is required (a diverged model can have finite
 * weights that overflow in the forward pass). Under mpirun every rank calls
 * it (the experts are gathered) and gets the same result; rank 0 writes. */
static int save_checkpoint(run_ckpt *r, int step, double tokens, int n_skipped, int n_spikes, char *err, size_t errsz) {
    float vl;
    int rc = checked_val_loss(r, step, &vl, err, errsz);
    if (rc) return rc;
    const moe__train_state st = {.step = step, .tokens = tokens, .skipped_steps = n_skipped, .loss_spikes = n_spikes,
                                 .command = r->cmdline, .data = (char *)r->data, .train = *r->hist_tr,
                                 .val = *r->hist_va};
    moe__ckpt *c;
    if ((rc = moe__model_ckpt_begin(r->m, r->dir, step, &c, err, errsz))) return rc;
    rc = moe__trainer_stage(r->tr, c, err, errsz);
    if (!rc && c) { /* rank 0: the files only it writes */
        char path[4200];
        char *js = moe__train_state_json(&st);
        moe__iov part = {js, js ? strlen(js) : 0};
        if (!js) rc = moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", r->dir);
        if (!rc) rc = moe__ckpt_write(c, "train_state.json", &part, 1, err, errsz);
        if (!rc && !moe__ckpt_stage(c, "tokenizer.json", path, sizeof path))
            rc = moe__set_err(err, errsz, MOE_EINVAL, "checkpoint: cannot stage tokenizer.json");
        if (!rc) rc = moe_tokenizer_save(r->tok, path, err, errsz);
        moe__free(js);
    }
    rc = moe__model_ckpt_end(r->m, c, rc, err, errsz);
    if (!rc) r->saved_step = step;
    return rc;
}

/* "DIR holds the checkpoint of step S" / "DIR holds no checkpoint" */
static void print_holds(const run_ckpt *r) {
    if (r->saved_step >= 0) fprintf(stderr, "moe train: %s holds the checkpoint of step %d\n", r->dir, r->saved_step);
    else fprintf(stderr, "moe train: %s holds no checkpoint of this run\n", r->dir);
}

/* One trainer per run directory: an exclusive flock on DIR/train.lock for
 * the whole run. The kernel drops it when the process ends, however it ends
 * (SIGKILL included), so a crash never leaves the directory locked. The
 * holder's pid is written into the file for the loser's message. Returns the
 * descriptor (kept open until exit) or -1 after printing why. */
static int lock_run_dir(const char *dir) {
    char path[4200], pid[32] = "";
    if (snprintf(path, sizeof path, "%s/train.lock", dir) >= (int)sizeof path) {
        fprintf(stderr, "moe train: %s: path too long\n", dir);
        return -1;
    }
    const int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0666);
    if (fd < 0) {
        fprintf(stderr, "moe train: cannot create the lock %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        const int e = errno;
        const ssize_t n = pread(fd, pid, sizeof pid - 1, 0);
        pid[n > 0 ? n : 0] = '\0';
        pid[strcspn(pid, "\n")] = '\0';
        if (e == EWOULDBLOCK)
            fprintf(stderr, "moe train: %s is in use by another moe train%s%s%s; wait for it to finish or give another "
                            "--out\n", dir, pid[0] ? " (pid " : "", pid, pid[0] ? ")" : "");
        else fprintf(stderr, "moe train: cannot lock %s: %s\n", path, strerror(e));
        close(fd);
        return -1;
    }
    snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (ftruncate(fd, 0) == 0 && pwrite(fd, pid, strlen(pid), 0) < 0) { /* only the message uses it */
    }
    return fd;
}

/* The lock, taken by rank 0 (the one writer) for every rank: -1 when any
 * rank must stop; otherwise the descriptor (-2 on the other ranks). */
static int lock_for_run(const char *dir, int root, moe_dist *dist) {
    const int fd = root ? lock_run_dir(dir) : -2;
    if (moe_dist_any(dist, fd == -1)) {
        if (fd >= 0) close(fd);
        return -1;
    }
    return fd;
}

/* The files of a trained model in dir (a checkpoint's or one being
 * committed), or NULL: a new run there would replace them. tokenizer.json
 * counts: a run writes it only with a checkpoint, so one found here is a
 * model's or the user's own. */
static const char *existing_model_file(const char *dir) {
    static const char *const names[] = {MOE__CKPT_MANIFEST, MOE__CKPT_COMMIT, "model.safetensors", "config.json",
                                        "optimizer.safetensors", "train_state.json", "tokenizer.json"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char path[4200];
        struct stat st;
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        if (lstat(path, &st) == 0) return names[i];
    }
    return NULL;
}

/* mkdir -p: the output directory and its parents */
int cli_mkdir_p(const char *dir) {
    char p[4096];
    if (snprintf(p, sizeof p, "%s", dir) >= (int)sizeof p) return -1;
    for (char *s = p + 1; *s; s++)
        if (*s == '/') {
            *s = '\0';
            if (mkdir(p, 0777) != 0 && errno != EEXIST) return -1;
            *s = '/';
        }
    return mkdir(p, 0777) != 0 && errno != EEXIST ? -1 : 0;
}

static void fmt_time(double s, char *b, size_t n) {
    if (!isfinite(s) || s < 0) snprintf(b, n, "--:--");
    else if (s >= 3600) snprintf(b, n, "%d:%02d:%02d", (int)s / 3600, (int)s / 60 % 60, (int)s % 60);
    else snprintf(b, n, "%d:%02d", (int)s / 60, (int)s % 60);
}

int moe_cli_train(int argc, char **argv) {
    const char *preset = NULL, *config = NULL, *out = NULL, *data = "data/brown";
    int steps = 0, threads = 2, batch = 8, seq = 0, accum = 1, eval_every = 100, eval_batches = 8,
        warmup = -1, resume = 0, force = 0, sched_steps = 0, ckpt_every = 500, log_every = 10, quiet = 0;
    double minutes = 0;
    uint64_t seed = 1234;
    float lr = 3e-3f, wd = 0.1f, clip = 1.0f, min_lr_ratio = 0.1f, spike_factor = 2.0f;
    const char *on_nan = "error";
    /* model overrides: applied when given (cli_given), else the preset's / config's value */
    const char *router = NULL;
    int experts = 0, top_k = 0, groups = 0, topk_groups = 0, seq_aux = 0, gshard = 0;
    float cap = -1, aux_coef = -1, z_coef = -1, imp_coef = -1, load_coef = -1, bias_rate = -1;
    const int most = moe_max_threads();
    cli_arg args[] = {
        {"--preset", NULL, ARG_STR, &preset, "model preset: tiny, tiny-dense, small, small-dense, small-mixtral"},
        {"--config", NULL, ARG_STR, &config, "model config.json (Hugging Face Mixtral keys) instead of a preset"},
        {"--out", "-o", ARG_STR, &out, "output model directory (required)"},
        {"--data", NULL, ARG_STR, &data, "Brown corpus directory (make data; --resume: the run's)"},
        {"--steps", NULL, ARG_INT, &steps, "optimizer steps (unset: 1000, or as many as --minutes allows)", AT_LEAST(1)},
        {"--minutes", NULL, ARG_DOUBLE, &minutes, "wall-clock budget in minutes (unset: no time limit)", ABOVE(0)},
        {"--seed", NULL, ARG_U64, &seed, "seed of init and data sampling"},
        {"--threads", "-t", ARG_INT, &threads, "threads (at most 4 per CPU)", RANGE(1, most)},
        {"--batch", NULL, ARG_INT, &batch, "sequences per micro-batch (per rank under mpirun)", RANGE(1, 1 << 16)},
        {"--seq", NULL, ARG_INT, &seq, "tokens per sequence (unset: the context length)", AT_LEAST(2)},
        {"--accum", NULL, ARG_INT, &accum, "micro-batches per step (gradient accumulation)", RANGE(1, 1 << 16)},
        {"--lr", NULL, ARG_FLOAT, &lr, "peak learning rate", ABOVE(0)},
        {"--min-lr-ratio", NULL, ARG_FLOAT, &min_lr_ratio, "final lr of the cosine, as a fraction of --lr", RANGE(0, 1)},
        {"--warmup", NULL, ARG_INT, &warmup, "warm-up steps (unset: 5% of the schedule)", AT_LEAST(0)},
        {"--schedule-steps", NULL, ARG_INT, &sched_steps, "length of the cosine (unset: --steps, or an estimate from --minutes)", AT_LEAST(1)},
        {"--weight-decay", NULL, ARG_FLOAT, &wd, "AdamW weight decay (matrices only)", AT_LEAST(0)},
        {"--grad-clip", NULL, ARG_FLOAT, &clip, "global gradient-norm clip (0: off)", AT_LEAST(0)},
        {"--eval-every", NULL, ARG_INT, &eval_every, "steps between validation runs (0: only at the end)", AT_LEAST(0)},
        {"--eval-batches", NULL, ARG_INT, &eval_batches, "micro-batches per validation run", RANGE(1, 1 << 20)},
        {"--ckpt-every", NULL, ARG_INT, &ckpt_every, "steps between checkpoints (0: only at the end)", AT_LEAST(0)},
        {"--log-every", NULL, ARG_INT, &log_every, "steps between progress lines when not on a terminal", AT_LEAST(1)},
        {"--resume", NULL, ARG_BOOL, &resume, "continue the run saved in --out (bit-exact)"},
        {"--force", NULL, ARG_BOOL, &force, "start a new run in --out even though it holds a trained model (replaced)"},
        {"--on-nan", NULL, ARG_STR, &on_nan, "NaN/Inf loss, gradients or weights: error (stop, naming the tensor) or skip (drop the update)"},
        {"--spike-factor", NULL, ARG_FLOAT, &spike_factor, "report a loss above this x its running mean (0: off)", AT_LEAST(0)},
        {"--quiet", "-q", ARG_BOOL, &quiet, "only the summary"},
        {"--router", NULL, ARG_STR, &router, "routing: topk, noisy_topk, expert_choice, hierarchical, balanced (docs/routing.md)"},
        {"--experts", NULL, ARG_INT, &experts, "experts per MoE layer (unset: the model's)", AT_LEAST(1)},
        {"--top-k", NULL, ARG_INT, &top_k, "experts per token (unset: the model's)", AT_LEAST(1)},
        {"--capacity-factor", NULL, ARG_FLOAT, &cap, "expert capacity factor, 0 = dropless (unset: the model's)", AT_LEAST(0)},
        {"--aux-coef", NULL, ARG_FLOAT, &aux_coef, "Switch load-balancing loss coefficient (unset: the model's)", AT_LEAST(0)},
        {"--z-coef", NULL, ARG_FLOAT, &z_coef, "router z-loss coefficient (unset: the model's)", AT_LEAST(0)},
        {"--importance-coef", NULL, ARG_FLOAT, &imp_coef, "Shazeer importance loss coefficient (unset: the model's)", AT_LEAST(0)},
        {"--load-coef", NULL, ARG_FLOAT, &load_coef, "Shazeer load loss coefficient, noisy routers (unset: the model's)", AT_LEAST(0)},
        {"--bias-rate", NULL, ARG_FLOAT, &bias_rate, "aux-loss-free bias update rate gamma, 0 = off (unset: the model's)", AT_LEAST(0)},
        {"--groups", NULL, ARG_INT, &groups, "expert groups: group-limited top-k or hierarchical (unset: the model's)", AT_LEAST(1)},
        {"--topk-groups", NULL, ARG_INT, &topk_groups, "groups kept per token (unset: the model's)", AT_LEAST(1)},
        {"--seq-aux", NULL, ARG_BOOL, &seq_aux, "aux loss per sequence (DeepSeek), not per batch"},
        {"--gshard-random", NULL, ARG_BOOL, &gshard, "top-2: keep the second expert with probability 2 g2 (GShard)"},
    };
    const int nargs = sizeof args / sizeof args[0];
#define GIVEN(flag) cli_given(args, nargs, flag)
    int rc = cli_parse("moe train [--preset NAME | --config FILE] [--steps N | --minutes M] [--seed S] [--threads T] --out DIR",
                       args, nargs, argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (!out) {
        fprintf(stderr, "moe train: --out DIR is required (see --help)\n");
        return 2;
    }
    if (!GIVEN("--steps") && !GIVEN("--minutes")) steps = 1000;
    if (strcmp(on_nan, "error") && strcmp(on_nan, "skip")) {
        fprintf(stderr, "moe train: --on-nan must be error or skip, not '%s'\n", on_nan);
        return 2;
    }
    if (resume && force) {
        fprintf(stderr, "moe train: give --resume (continue the run in %s) or --force (replace it), not both\n", out);
        return 2;
    }
    /* expert parallelism (mpirun): --batch is per rank; ranks must agree on
     * when to stop, so the run is counted in steps */
    moe_dist *dist = moe_get_dist();
    const int ranks = moe_dist_size(dist), root = moe_dist_rank(dist) == 0;
    if (ranks > 1 && minutes > 0) {
        fprintf(stderr, "moe train: under mpirun give --steps (--minutes would stop the ranks at different steps)\n");
        return 2;
    }
    if (!root) quiet = 1;
    if (!!preset + !!config + resume > 1) {
        fprintf(stderr, "moe train: give one of --preset, --config, --resume\n");
        return 2;
    }
    char err[512], path[4200];
    moe_model_config cfg;
    int lock_fd = -1;
    if (resume) {
        struct stat st;
        if (stat(out, &st) != 0 || !S_ISDIR(st.st_mode)) {
            fprintf(stderr, "moe train: --resume: %s is not a run directory (%s)\n", out, strerror(errno ? errno : ENOTDIR));
            return 2;
        }
        if ((lock_fd = lock_for_run(out, root, dist)) == -1) return 1;
        /* a checkpoint a crash interrupted is finished or discarded first */
        rc = root ? moe__ckpt_recover(out, err, sizeof err) : MOE_OK; /* one writer: rank 0 */
        if (moe_dist_any(dist, rc != 0) && !rc) /* and the others read after it */
            rc = MOE_EIO, snprintf(err, sizeof err, "%s: rank 0 could not recover the checkpoint", out);
        if (!rc) rc = moe__ckpt_path(out, "config.json", path, sizeof path, err, sizeof err);
        if (!rc) rc = moe_model_config_load(path, &cfg, err, sizeof err);
    } else if (config) {
        rc = moe_model_config_load(config, &cfg, err, sizeof err);
    } else {
        rc = moe_model_preset(preset ? preset : "small", &cfg);
        if (rc) snprintf(err, sizeof err, "unknown preset '%s' (tiny, tiny-dense, small, small-dense, small-mixtral)", preset);
    }
    if (rc) {
        fprintf(stderr, "moe train: %s\n", err);
        return rc == MOE_ENOTFOUND ? 2 : 1;
    }
    if (!resume) {
        if (router) {
            const int r = moe_router_from_name(router);
            if (r < 0) {
                fprintf(stderr, "moe train: unknown router '%s' (topk, noisy_topk, expert_choice, hierarchical, balanced)\n",
                        router);
                return 2;
            }
            cfg.router_type = (moe_router_type)r;
        }
        if (GIVEN("--experts")) cfg.num_local_experts = experts;
        if (GIVEN("--top-k")) cfg.num_experts_per_tok = top_k;
        if (GIVEN("--capacity-factor")) cfg.capacity_factor = cap;
        if (GIVEN("--aux-coef")) cfg.router_aux_loss_coef = aux_coef;
        if (GIVEN("--z-coef")) cfg.router_z_loss_coef = z_coef;
        if (GIVEN("--importance-coef")) cfg.router_importance_loss_coef = imp_coef;
        if (GIVEN("--load-coef")) cfg.router_load_loss_coef = load_coef;
        if (GIVEN("--bias-rate")) cfg.router_bias_update_rate = bias_rate;
        if (GIVEN("--groups")) cfg.n_group = groups;
        if (GIVEN("--topk-groups")) cfg.topk_group = topk_groups;
        if (seq_aux) cfg.seq_aux = 1;
        if (gshard) cfg.gshard_random = 1;
        /* the config check would say "n_groups = 0 must divide ...": name the flag instead */
        if (cfg.router_type == MOE_ROUTER_HIERARCHICAL && cfg.n_group <= 0) {
            fprintf(stderr, "moe train: --router hierarchical needs --groups G (G divides the %d experts; the router "
                            "picks a group, then experts inside it)\n", cfg.num_local_experts);
            return 2;
        }
        if ((rc = moe_model_config_check(&cfg, err, sizeof err))) {
            fprintf(stderr, "moe train: %s\n", err);
            return 2;
        }
    } else {
        static const char *const model_flags[] = {"--router", "--experts", "--top-k", "--capacity-factor", "--aux-coef",
                                                  "--z-coef", "--importance-coef", "--load-coef", "--bias-rate",
                                                  "--groups", "--topk-groups", "--seq-aux", "--gshard-random"};
        for (size_t i = 0; i < sizeof model_flags / sizeof model_flags[0]; i++)
            if (GIVEN(model_flags[i])) {
                fprintf(stderr, "moe train: --resume keeps the saved model's configuration; drop %s\n", model_flags[i]);
                return 2;
            }
    }
    if (seq > cfg.max_position_embeddings) {
        fprintf(stderr, "moe train: --seq %d is longer than the model's context (max_position_embeddings %d)\n", seq,
                cfg.max_position_embeddings);
        return 2;
    }
    if (!resume) {
        if (cli_mkdir_p(out) != 0 || access(out, W_OK) != 0) {
            fprintf(stderr, "moe train: cannot create %s: %s\n", out, strerror(errno));
            return 1;
        }
        if ((lock_fd = lock_for_run(out, root, dist)) == -1) return 1;
        /* a new run replaces a trained model only when asked to */
        const char *had = root && !force ? existing_model_file(out) : NULL;
        if (moe_dist_any(dist, had != NULL)) {
            if (had)
                fprintf(stderr, "moe train: %s already holds a trained model (%s); --resume continues it, --force "
                                "replaces it with a new run\n", out, had);
            return 2;
        }
    }
    install_stop_handlers(); /* from here on a signal ends in a saved checkpoint */

    /* --resume: the corpus the run was started on, unless --data says otherwise */
    moe__train_state prev = {0};
    if (resume) run_record_load(out, &prev);
    if (resume && !GIVEN("--data") && prev.data) data = prev.data;
    char data_abs[PATH_MAX];
    if (!realpath(data, data_abs)) snprintf(data_abs, sizeof data_abs, "%s", data);
    cli_data d;
    snprintf(path, sizeof path, "%s/tokenizer.json", out);
    if (cli_data_load(data, resume ? path : NULL, cfg.vocab_size, quiet, &d)) return 1;
    cfg.vocab_size = moe_tokenizer_vocab_size(d.tok);
    if (seq <= 0) seq = cfg.max_position_embeddings;
    moe_set_num_threads(threads);

    moe_model *m = NULL;
    if (resume) {
        rc = moe_model_load(out, batch, seq, 1, threads, &m, err, sizeof err);
    } else {
        m = moe_model_create(&cfg, batch, seq, 1, threads, &rc, err, sizeof err);
        if (m) moe_model_init(m, seed);
    }
    if (!m) {
        fprintf(stderr, "moe train: %s\n", err);
        cli_data_free(&d);
        return 1;
    }
    if (!quiet) {
        cli_print_card(&cfg, seq, 0);
        fflush(stdout);
    }

    moe_train_config tc;
    memset(&tc, 0, sizeof tc);
    tc.batch = batch, tc.seq = seq, tc.grad_accum = accum, tc.eval_batches = eval_batches, tc.seed = seed;
    tc.n_threads = threads;
    tc.nan_policy = strcmp(on_nan, "skip") ? MOE_NAN_ERROR : MOE_NAN_SKIP;
    tc.spike_factor = spike_factor > 0 ? spike_factor : -1;
    tc.opt = moe_adamw_config_default();
    tc.opt.lr = lr, tc.opt.min_lr = lr * min_lr_ratio, tc.opt.weight_decay = wd, tc.opt.grad_clip = clip;
    /* The schedule's length: the steps asked for, or a guess from the time
     * budget refined after the first steps (see below). */
    tc.opt.max_steps = sched_steps > 0 ? sched_steps : steps;
    tc.opt.warmup_steps = GIVEN("--warmup") ? warmup : (tc.opt.max_steps > 0 ? tc.opt.max_steps / 20 : 50);
    moe_trainer *tr = moe_trainer_create(m, &tc, d.train->tokens, d.train->n_tokens, d.val->tokens, d.val->n_tokens, &rc,
                                         err, sizeof err);
    if (!tr) {
        fprintf(stderr, "moe train: %s\n", err);
        moe_model_free(m);
        cli_data_free(&d);
        return 1;
    }
    moe__train_curve hist_tr = {0}, hist_va = {0};
    if (resume) {
        rc = moe_trainer_load_state(tr, out, err, sizeof err);
        if (rc) {
            fprintf(stderr, "moe train: --resume: %s\n", err);
            return 1;
        }
        hist_tr = prev.train, hist_va = prev.val; /* the curves go on */
        prev.train = prev.val = (moe__train_curve){0};
        if (!quiet) fprintf(stderr, "resuming at step %d\n", moe_trainer_get_step(tr));
    }
    /* tokenizer.json is written with each checkpoint, in its transaction:
     * the directory never pairs a new tokenizer with an older model */
    char cmdline[1024] = "moe train";
    for (int i = 0; i < argc; i++) {
        strncat(cmdline, " ", sizeof cmdline - strlen(cmdline) - 1);
        strncat(cmdline, argv[i], sizeof cmdline - strlen(cmdline) - 1);
    }
    run_ckpt rk = {.tr = tr, .m = m, .tok = d.tok, .dir = out, .data = data_abs, .cmdline = cmdline,
                   .hist_tr = &hist_tr, .hist_va = &hist_va, .saved_step = resume ? moe_trainer_get_step(tr) : -1};

    const int tty = isatty(STDERR_FILENO) && !quiet;
    const double t0 = cli_now();
    double last_val = NAN, tokens = 0;
    const double tok_per_step = (double)batch * seq * accum * ranks;
    int step = moe_trainer_get_step(tr), start = step, failed = 0, n_skipped = 0, n_spikes = 0;
    const int target = steps > 0 ? steps : 1 << 30;
    /* under mpirun the failure and skip notes name what each rank saw (its
     * own experts), so every rank prints them */
    char who[32] = "";
    if (ranks > 1) snprintf(who, sizeof who, "rank %d: ", moe_dist_rank(dist));
    while (step < target && !moe_dist_any(dist, g_stop)) {
        const double el = cli_now() - t0;
        if (minutes > 0 && el >= minutes * 60) break;
        moe_train_step_info si;
        rc = moe_trainer_step(tr, &si);
        if (rc) {
            fprintf(stderr, "\nmoe train: %s%s\n", who, moe_trainer_errmsg(tr));
            failed = 1;
            break;
        }
        n_skipped = si.n_skipped, n_spikes = si.n_spikes;
        if (si.skipped) {
            fprintf(stderr, "%smoe train: %supdate skipped (%d so far): %s\n", tty ? "\n" : "", who, si.n_skipped,
                    moe_trainer_errmsg(tr));
            continue;
        }
        if (si.spike && root) /* the loss is the global batch's: the same on every rank */
            fprintf(stderr, "%smoe train: step %d: loss spike %.4f, %.1fx the running mean %.4f\n", tty ? "\n" : "",
                    si.step, si.loss, si.loss / si.loss_ema, si.loss_ema);
        step = si.step;
        tokens = si.tokens;
        series_add(&hist_tr, step, si.loss);
        const double elapsed = cli_now() - t0, tps = (step - start) * tok_per_step / elapsed;
        if (minutes > 0 && sched_steps <= 0 && steps == 0 && step == start + 5) {
            /* time budget: size the cosine from the measured speed */
            int est = start + (int)(minutes * 60 / (elapsed / (step - start)));
            if (est > step) moe_trainer_set_schedule(tr, est, GIVEN("--warmup") ? warmup : est / 20);
        }
        if (eval_every > 0 && step % eval_every == 0) {
            float vl;
            if (!moe_trainer_eval(tr, &vl)) {
                last_val = vl;
                series_add(&hist_va, step, vl);
            }
        }
        if (ckpt_every > 0 && step % ckpt_every == 0) {
            if (save_checkpoint(&rk, step, si.tokens, n_skipped, n_spikes, err, sizeof err)) {
                /* a full disk fails every later checkpoint too, and a model that no
                 * longer evaluates has diverged: stop rather than train unsaved (the
                 * save's result is the same on every rank, so all of them stop) */
                if (root) {
                    fprintf(stderr, "\nmoe train: checkpoint at step %d failed: %s\nmoe train: stopping\n", step, err);
                    print_holds(&rk);
                }
                failed = 2;
                break;
            }
            const moe__train_curve *va = &hist_va;
            if (va->n > 0 && va->step[va->n - 1] == step) last_val = va->val[va->n - 1]; /* the save's check */
        }
        double eta = steps > 0 ? (target - step) * elapsed / (step - start) : minutes * 60 - elapsed;
        char etas[32];
        fmt_time(eta, etas, sizeof etas);
        char vals[32]; /* "-" before the first evaluation */
        fmt_loss(last_val, vals, sizeof vals);
        if (tty) {
            const int width = 24;
            double frac = steps > 0 ? (double)step / target : elapsed / (minutes * 60);
            int fill = (int)(frac * width);
            fprintf(stderr, "\r[%.*s%*s] step %d  loss %.4f  val %s  %.0f tok/s  ETA %s   ", fill,
                    "========================", width - fill, "", step, si.loss, vals, tps, etas);
        } else if (!quiet && (step % log_every == 0 || step == start + 1)) {
            char ph[192];
            phase_times(m, ph, sizeof ph);
            fprintf(stderr, "step %d loss %.4f (ce %.4f aux %.4f) val %s lr %.2e gnorm %.3f %.0f tok/s ETA %s%s\n", step,
                    si.loss, si.ce, si.aux, vals, si.lr, si.grad_norm, tps, etas, ph);
        }
    }
    if (tty) fputc('\n', stderr);
    /* the final evaluation and save are collectives: the ranks agree on a
     * signal that reached only some of them, or came after the last check */
    const int stopped = moe_dist_any(dist, g_stop);
    if (stopped && root)
        fprintf(stderr, "moe train: %s at step %d: saving the checkpoint (again to quit at once)\n",
                g_stop == SIGTERM ? "terminated" : "interrupted", step);
    const double train_s = cli_now() - t0;
    /* After a failed checkpoint the last good one stays. Otherwise (the end,
     * a signal, a failed step: the trainer left the state from before it)
     * the state is saved if it evaluates; the save measures the validation
     * loss when this step has none yet. */
    int save_rc = failed == 2 ? 1 : save_checkpoint(&rk, step, tokens, n_skipped, n_spikes, err, sizeof err);
    if (save_rc && failed != 2 && root) {
        fprintf(stderr, "moe train: checkpoint: %s\n", err);
        print_holds(&rk);
    }
    if (!save_rc && failed && root)
        fprintf(stderr, "moe train: saved the state from before the failed step (step %d) in %s\n", step, out);
    if (stopped && !save_rc && root)
        fprintf(stderr, "moe train: checkpoint of step %d saved in %s (--resume to continue)\n", step, out);
    const float vl = hist_va.n > 0 && hist_va.step[hist_va.n - 1] == step ? (float)hist_va.val[hist_va.n - 1] : NAN;
    moe_plot_series ps[2] = {{"train loss", hist_tr.step, hist_tr.val, hist_tr.n, 0},
                             {"val loss", hist_va.step, hist_va.val, hist_va.n, 1}};
    snprintf(path, sizeof path, "%s/loss.svg", out);
    if (root && moe_plot_svg(path, "moe train: loss", "step", "cross-entropy (nats/token)", ps, 2, 0, err, sizeof err))
        fprintf(stderr, "moe train: %s\n", err);
    char vls[32], ppls[32];
    fmt_loss(vl, vls, sizeof vls);
    if (isfinite(vl)) snprintf(ppls, sizeof ppls, "%.2f", exp(vl));
    else snprintf(ppls, sizeof ppls, "-");
    printf("trained %d steps in %.1f s (%.0f tokens/s); val loss %s, perplexity %s\n", step - start, train_s,
           step > start ? (step - start) * tok_per_step / train_s : 0.0, vls, ppls);
    if (n_skipped || n_spikes) printf("numerics: %d updates skipped (non-finite), %d loss spikes\n", n_skipped, n_spikes);
    if (!save_rc)
        printf("saved %s (config.json, model.safetensors, tokenizer.json, optimizer.safetensors, loss.svg)\n", out);
    moe__train_curve_free(&hist_tr), moe__train_curve_free(&hist_va);
    moe__train_state_free(&prev);
    moe_trainer_free(tr);
    moe_model_free(m);
    cli_data_free(&d);
    if (lock_fd >= 0) close(lock_fd); /* releases the run directory */
    return failed || save_rc ? 1 : stopped ? 130 : 0;
}
