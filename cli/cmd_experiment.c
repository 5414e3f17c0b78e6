/* moe experiment capacity|balance (docs/experiments.md): trains a list of
 * models on the same Brown tokens with the same seed, schedule and batch,
 * and tabulates what Shazeer et al. 2017 report in Tables 7 (capacity) and
 * 6 (balancing). The runs themselves are moe_experiment_run; this file
 * chooses them, prints progress and writes the table (text, markdown,
 * JSON) and the plots. */
#include "args.h"
#include "cli.h"

#include "data/shard.h"
#include "internal.h"
#include "io/atomic.h"
#include "tokenizer/tokenizer.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

enum { CAPACITY, BALANCE };
static const char *const KIND_NAME[] = {"capacity", "balance"};

#define MAX_RUNS 16

typedef struct run {
    char name[48];
    int experts;        /* 0: dense */
    const char *method; /* balance only */
    moe_model_config cfg;
    moe_experiment_result res;
} run;

/* The budget of each mode: steps of batch x seq x accum tokens. "exper"'s
 * default is ~1 epoch of Brown per model (the regime where the extra
 * parameters pay, README), ~30 minutes for six models on 2 cores; --quick is
 * a tenth; "tiny" is the CI size. 4,096 tokens per optimizer step: AdamW, the
 * gradient zeroing and the clipping norm each sweep every parameter once per
 * step, and E = 64 has ~5x the parameters of E = 4, so steps must be big
 * enough to keep that per-step cost small next to the per-token work, yet
 * numerous enough to train (a 60-step probe at 8,192 tokens per step was
 * still at the unigram stage: docs/experiments.md). */
typedef struct budget {
    const char *base;
    int batch, seq, accum, steps, quick_steps;
} budget;
static const budget BUDGETS[] = {
    {"exper", 16, 256, 1, 360, 36},
    {"tiny", 8, 64, 1, 300, 12},
};

/* ---- the table's columns: one list serves the text table, markdown and JSON ---- */

typedef struct column {
    const char *head, *key;
    int kinds;                 /* bit mask of the experiments showing it */
    double (*get)(const run *);
    const char *fmt;           /* printf of the value in tables */
} column;

static double c_experts(const run *r) { return r->experts; }
static double c_total(const run *r) { return r->res.costs.total_params; }
static double c_active(const run *r) { return r->res.costs.active_params; }
static double c_flops(const run *r) { return r->res.costs.flops_per_token; }
static double c_tps(const run *r) { return r->res.tokens_per_s; }
static double c_train(const run *r) { return r->res.train_loss; }
static double c_val(const run *r) { return r->res.val_loss; }
static double c_ppl(const run *r) { return exp(r->res.val_loss); }
static double c_icv(const run *r) { return r->res.routing.n ? r->res.routing.importance_cv : NAN; }
static double c_lcv(const run *r) { return r->res.routing.n ? r->res.routing.load_cv : NAN; }
static double c_mxm(const run *r) { return r->res.routing.n ? r->res.routing.max_over_mean : NAN; }
static double c_drop(const run *r) { return r->cfg.capacity_factor > 0 ? r->res.routing.dropped_fraction : NAN; }
static double c_over(const run *r) { return r->res.routing.n ? r->res.routing.overflow : NAN; }

#define CAP (1 << CAPACITY)
#define BAL (1 << BALANCE)
static const column COLS[] = {
    {"experts", "experts", CAP | BAL, c_experts, "%.0f"},
    {"total params", "total_params", CAP, c_total, "%.0f"},
    {"active params", "active_params", CAP, c_active, "%.0f"},
    {"FLOPs/token", "flops_per_token", CAP, c_flops, "%.4g"},
    {"train tok/s", "tokens_per_s", CAP | BAL, c_tps, "%.0f"},
    {"train CE", "train_loss", CAP | BAL, c_train, "%.4f"},
    {"val CE", "val_loss", CAP | BAL, c_val, "%.4f"},
    {"val ppl", "val_perplexity", CAP | BAL, c_ppl, "%.2f"},
    {"CV(importance)", "cv_importance", BAL, c_icv, "%.3f"},
    {"CV(load)", "cv_load", CAP | BAL, c_lcv, "%.3f"},
    {"max/mean load", "max_over_mean_load", CAP | BAL, c_mxm, "%.2f"},
    {"dropped", "dropped_fraction", BAL, c_drop, "%.4f"},
    {"overflow@CF", "overflow_at_ref_capacity", BAL, c_over, "%.4f"},
};
#define NCOLS (int)(sizeof COLS / sizeof COLS[0])

static void cell(char *b, size_t n, const column *c, const run *r) {
    const double v = c->get(r);
    if (isnan(v)) snprintf(b, n, "-");
    else snprintf(b, n, c->fmt, v);
}

static void print_table(FILE *f, int kind, const run *runs, int n, int markdown) {
    fprintf(f, markdown ? "| %s |" : "%-18s", kind == CAPACITY ? "model" : "method");
    for (int c = 0; c < NCOLS; c++)
        if (COLS[c].kinds & (1 << kind)) fprintf(f, markdown ? " %s |" : " %14s", COLS[c].head);
    fputc('\n', f);
    if (markdown) {
        fprintf(f, "|---|");
        for (int c = 0; c < NCOLS; c++)
            if (COLS[c].kinds & (1 << kind)) fprintf(f, "---:|");
        fputc('\n', f);
    }
    for (int i = 0; i < n; i++) {
        fprintf(f, markdown ? "| %s |" : "%-18s", runs[i].name);
        for (int c = 0; c < NCOLS; c++) {
            if (!(COLS[c].kinds & (1 << kind))) continue;
            char b[64];
            cell(b, sizeof b, &COLS[c], &runs[i]);
            fprintf(f, markdown ? " %s |" : " %14s", b);
        }
        fputc('\n', f);
    }
}

/* ---- outputs ---------------------------------------------------------------------- */

static int write_text(const char *path, const char *text) {
    char err[512];
    moe__iov part = {text, strlen(text)};
    int rc = moe__write_atomic(path, &part, 1, err, sizeof err);
    if (rc) fprintf(stderr, "moe experiment: %s\n", err);
    return rc;
}

/* The markdown table plus the protocol, so the file stands alone. */
static int write_markdown(const char *path, int kind, const run *runs, int n, const char *protocol) {
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) return MOE_ENOMEM;
    fprintf(f, "# moe experiment %s\n\n%s\n\n", KIND_NAME[kind], protocol);
    print_table(f, kind, runs, n, 1);
    fclose(f);
    int rc = buf ? write_text(path, buf) : MOE_ENOMEM;
    free(buf);
    return rc;
}

static cJSON *json_report(int kind, const run *runs, int n, const char *protocol, const char *cmdline,
                          const moe_train_config *tc, int steps, int quick, const char *base) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "experiment", KIND_NAME[kind]);
    cJSON_AddStringToObject(o, "base", base);
    cJSON_AddStringToObject(o, "mode", quick ? "quick" : "default");
    cJSON_AddStringToObject(o, "command", cmdline);
    cJSON_AddStringToObject(o, "protocol", protocol);
    cJSON *t = cJSON_AddObjectToObject(o, "training");
    cJSON_AddNumberToObject(t, "batch", tc->batch);
    cJSON_AddNumberToObject(t, "seq", tc->seq);
    cJSON_AddNumberToObject(t, "accum", tc->grad_accum);
    cJSON_AddNumberToObject(t, "steps", steps);
    cJSON_AddNumberToObject(t, "tokens", (double)steps * tc->batch * tc->seq * tc->grad_accum);
    cJSON_AddNumberToObject(t, "lr", tc->opt.lr);
    cJSON_AddNumberToObject(t, "seed", (double)tc->seed);
    cJSON_AddNumberToObject(t, "threads", tc->n_threads);
    cJSON_AddNumberToObject(t, "eval_batches", tc->eval_batches);
    cJSON *rows = cJSON_AddArrayToObject(o, "rows");
    for (int i = 0; i < n; i++) {
        cJSON *r = cJSON_CreateObject();
        cJSON_AddStringToObject(r, kind == CAPACITY ? "model" : "method", runs[i].name);
        cJSON_AddStringToObject(r, "router", moe_router_name(runs[i].cfg.router_type));
        for (int c = 0; c < NCOLS; c++) {
            const double v = COLS[c].get(&runs[i]);
            /* every row has every key: null where a value does not apply */
            if (isnan(v) || isinf(v)) cJSON_AddNullToObject(r, COLS[c].key);
            else cJSON_AddNumberToObject(r, COLS[c].key, v);
        }
        cJSON_AddNumberToObject(r, "train_seconds", runs[i].res.train_seconds);
        cJSON_AddNumberToObject(r, "tokens", runs[i].res.tokens);
        cJSON_AddItemToArray(rows, r);
    }
    return o;
}

/* Capacity plots: val perplexity against total parameters (log x), and
 * training tokens/s against the number of experts (log x; dense at x = 1). */
static int write_plots(const char *dir, const run *runs, int n) {
    double px[MAX_RUNS], py[MAX_RUNS], ex[MAX_RUNS], ey[MAX_RUNS], dx[1], dy[1], tx[1], ty[1];
    int m = 0, d = 0;
    for (int i = 0; i < n; i++) {
        if (runs[i].experts > 0) {
            px[m] = c_total(&runs[i]), py[m] = c_ppl(&runs[i]);
            ex[m] = runs[i].experts, ey[m++] = c_tps(&runs[i]);
        } else if (!d) {
            dx[0] = c_total(&runs[i]), dy[0] = c_ppl(&runs[i]), tx[0] = 1, ty[0] = c_tps(&runs[i]), d = 1;
        }
    }
    char path[4096], err[512];
    moe_plot_series s1[2] = {{"MoE, top-2 (E = 4 ... 64)", px, py, m, 1}, {"dense, same active params", dx, dy, d, 1}};
    snprintf(path, sizeof path, "%s/capacity_ppl.svg", dir);
    int rc = moe_plot_svg(path, "val perplexity vs total parameters (equal active parameters)", "total parameters",
                          "val perplexity", s1, 2, 1, err, sizeof err);
    if (!rc) {
        moe_plot_series s2[2] = {{"MoE, top-2", ex, ey, m, 1}, {"dense (plotted at x = 1)", tx, ty, d, 1}};
        snprintf(path, sizeof path, "%s/capacity_speed.svg", dir);
        rc = moe_plot_svg(path, "training speed vs number of experts", "experts", "training tokens/s", s2, 2, 1, err,
                          sizeof err);
    }
    if (rc) fprintf(stderr, "moe experiment: %s\n", err);
    return rc;
}

/* ---- progress ---------------------------------------------------------------------- */

typedef struct progress {
    const char *name;
    int idx, n_runs, steps, quiet, tty;
} progress;

static void on_step(void *ctx, const moe_train_step_info *si) {
    const progress *p = ctx;
    if (p->quiet) return;
    const int every = p->steps >= 10 ? p->steps / 10 : 1;
    if (p->tty)
        fprintf(stderr, "\r[%d/%d] %-16s step %d/%d  loss %.4f   ", p->idx + 1, p->n_runs, p->name, si->step, p->steps,
                si->loss);
    else if (si->step % every == 0 || si->step == p->steps)
        fprintf(stderr, "[%d/%d] %s step %d/%d loss %.4f (ce %.4f)\n", p->idx + 1, p->n_runs, p->name, si->step,
                p->steps, si->loss, si->ce);
}

/* "4,8,16" -> values; returns the count or -1 */
static int parse_list(const char *s, int *v, int max) {
    int n = 0;
    while (s && *s) {
        char *end;
        errno = 0;
        long x = strtol(s, &end, 10);
        if (end == s || errno || x < 1 || x > 4096 || n == max || (*end && *end != ',')) return -1;
        v[n++] = (int)x;
        s = *end ? end + 1 : end;
    }
    return n;
}

/* ---- the command ------------------------------------------------------------------- */

static int experiment(int kind, int argc, char **argv) {
    const char *base = "exper", *out = NULL, *json = NULL, *data = "data/brown", *experts_s =
        kind == CAPACITY ? "4,8,16,32,64" : "16", *methods_s = NULL;
    int quick = 0, steps = 0, threads = 2, batch = 0, seq = 0, accum = 0, eval_batches = 16, vocab = 4096, keep = 0,
        quiet = 0, stats_steps = 0, no_dense = 0;
    double tokens = 0;
    uint64_t seed = 1234;
    float lr = 3e-3f, cap = 0, ref_cap = 1.25f, aux_coef = -1;
    cli_arg args[] = {
        {"--out", "-o", ARG_STR, &out, "output directory (required)"},
        {"--quick", NULL, ARG_BOOL, &quick, "a tenth of the default budget (~3 minutes on 2 cores for 'exper')"},
        {"--preset-base", NULL, ARG_STR, &base, "model family: exper (default budget) or tiny (CI)"},
        {"--experts", NULL, ARG_STR, &experts_s, "capacity: comma-separated E list; balance: one E"},
        {"--methods", NULL, ARG_STR, &methods_s,
         "balance: comma-separated methods (none, importance, load, importance+load, none-topk, switch, z-loss, "
         "loss-free; default: all)"},
        {"--no-dense", NULL, ARG_BOOL, &no_dense, "capacity: skip the dense baseline"},
        {"--tokens", NULL, ARG_DOUBLE, &tokens, "training tokens per model (0: the mode's budget)", AT_LEAST(0)},
        {"--steps", NULL, ARG_INT, &steps, "optimizer steps per model (0: from --tokens or the mode's budget: exper 360, quick 36; tiny 300, quick 12)", AT_LEAST(0)},
        {"--batch", NULL, ARG_INT, &batch, "sequences per micro-batch (0: the base's, exper 16, tiny 8)", RANGE(0, 1 << 16)},
        {"--seq", NULL, ARG_INT, &seq, "tokens per sequence (0: the base's, exper 256, tiny 64)", AT_LEAST(0)},
        {"--accum", NULL, ARG_INT, &accum, "micro-batches per optimizer step (0: the base's, exper 1, tiny 1)", RANGE(0, 1 << 16)},
        {"--lr", NULL, ARG_FLOAT, &lr, "peak learning rate (5% warm-up, cosine to a tenth)", ABOVE(0)},
        {"--capacity-factor", NULL, ARG_FLOAT, &cap, "expert capacity factor in training, 0 = dropless", AT_LEAST(0)},
        {"--aux-coef", NULL, ARG_FLOAT, &aux_coef, "capacity: Switch aux loss coefficient of the MoE models (unset: 0.01)", AT_LEAST(0)},
        {"--ref-capacity", NULL, ARG_FLOAT, &ref_cap, "capacity factor of the overflow column", AT_LEAST(0)},
        {"--stats-steps", NULL, ARG_INT, &stats_steps, "routing stats over the last N steps (0: the last fifth)", AT_LEAST(0)},
        {"--eval-batches", NULL, ARG_INT, &eval_batches, "validation micro-batches (fixed windows)", RANGE(1, 1 << 20)},
        {"--threads", "-t", ARG_INT, &threads, "threads (at most 4 per CPU)", RANGE(1, moe_max_threads())},
        {"--seed", NULL, ARG_U64, &seed, "seed of init and data sampling (the same for every model)"},
        {"--json", NULL, ARG_STR, &json, "also write the JSON report to FILE ('-': stdout)"},
        {"--data", NULL, ARG_STR, &data, "Brown corpus directory (make data)"},
        {"--vocab", NULL, ARG_INT, &vocab, "tokenizer vocabulary size", RANGE(257, MOE_TOKENIZER_MAX_VOCAB)},
        {"--keep-models", NULL, ARG_BOOL, &keep, "save each model under DIR/models/NAME"},
        {"--quiet", "-q", ARG_BOOL, &quiet, "no progress lines"},
    };
    char usage[160];
    snprintf(usage, sizeof usage, "moe experiment %s [--quick] [--preset-base exper|tiny] [--tokens N | --steps N] --out DIR",
             KIND_NAME[kind]);
    int rc = cli_parse(usage, args, sizeof args / sizeof args[0], argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (!out) {
        fprintf(stderr, "moe experiment: --out DIR is required (see --help)\n");
        return 2;
    }
    const budget *bud = NULL;
    for (size_t i = 0; i < sizeof BUDGETS / sizeof BUDGETS[0] && !bud; i++)
        if (!strcmp(base, BUDGETS[i].base)) bud = &BUDGETS[i];
    if (!bud) {
        fprintf(stderr, "moe experiment: unknown --preset-base '%s' (exper, tiny)\n", base);
        return 2;
    }
    if (!batch) batch = bud->batch;
    if (!seq) seq = bud->seq;
    if (!accum) accum = bud->accum;
    const double tok_per_step = (double)batch * seq * accum;
    if (batch < 1 || seq < 2 || accum < 1 || steps < 0 || tokens < 0 || threads < 1 || eval_batches < 1 ||
        stats_steps < 0 || cap < 0 || ref_cap <= 0) {
        fprintf(stderr, "moe experiment: --batch, --seq, --accum, --threads, --eval-batches must be positive, "
                        "--steps, --tokens, --stats-steps, --capacity-factor non-negative, --ref-capacity positive\n");
        return 2;
    }
    if (steps > 0 && tokens > 0) {
        fprintf(stderr, "moe experiment: give --tokens or --steps, not both\n");
        return 2;
    }
    if (!steps) steps = tokens > 0 ? (int)ceil(tokens / tok_per_step) : quick ? bud->quick_steps : bud->steps;

    /* the runs */
    run *runs = calloc(MAX_RUNS, sizeof *runs);
    int n = 0, ev[MAX_RUNS];
    const int ne = parse_list(experts_s, ev, MAX_RUNS - 1);
    if (!runs || ne < 1 || (kind == BALANCE && ne != 1)) {
        fprintf(stderr, "moe experiment: --experts '%s': %s\n", experts_s,
                kind == CAPACITY ? "give 1 to 15 comma-separated counts" : "give one expert count");
        free(runs);
        return 2;
    }
    switch (kind) {
    case CAPACITY:
        for (int i = no_dense ? 0 : -1; i < ne; i++) {
            run *r = &runs[n++];
            r->experts = i < 0 ? 0 : ev[i];
            moe_experiment_model(base, r->experts, &r->cfg);
            if (aux_coef >= 0) r->cfg.router_aux_loss_coef = aux_coef;
            if (r->experts) snprintf(r->name, sizeof r->name, "moe-%d", r->experts);
            else snprintf(r->name, sizeof r->name, "dense");
        }
        break;
    case BALANCE: {
        const char *const *all = moe_experiment_balance_methods();
        char list[512];
        snprintf(list, sizeof list, "%s", methods_s ? methods_s : "");
        for (int i = 0; !methods_s && all[i]; i++) /* default: every method */
            snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? "," : "", all[i]);
        for (char *save = NULL, *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
            int k = -1;
            for (int i = 0; all[i] && k < 0; i++)
                if (!strcmp(tok, all[i])) k = i;
            if (k < 0 || n == MAX_RUNS) {
                fprintf(stderr, "moe experiment: --methods: unknown or too many: '%s'\n", tok);
                free(runs);
                return 2;
            }
            run *r = &runs[n++];
            r->experts = ev[0];
            r->method = all[k];
            moe_experiment_model(base, r->experts, &r->cfg);
            moe_experiment_balance_method(r->method, &r->cfg);
            snprintf(r->name, sizeof r->name, "%s", r->method);
        }
        break;
    }
    }
    if (cli_mkdir_p(out) != 0 || access(out, W_OK) != 0) {
        fprintf(stderr, "moe experiment: cannot create %s: %s\n", out, strerror(errno));
        free(runs);
        return 1;
    }
    cli_data d;
    if (cli_data_load(data, NULL, vocab, quiet, &d)) {
        free(runs);
        return 1;
    }
    char err[512], path[4200]; /* room for a model directory and a file name */
    for (int i = 0; i < n; i++) {
        runs[i].cfg.vocab_size = moe_tokenizer_vocab_size(d.tok);
        runs[i].cfg.capacity_factor = cap;
        if (seq > runs[i].cfg.max_position_embeddings) {
            fprintf(stderr, "moe experiment: --seq %d exceeds the context of %d\n", seq,
                    runs[i].cfg.max_position_embeddings);
            rc = 2;
            goto done;
        }
        if ((rc = moe_model_config_check(&runs[i].cfg, err, sizeof err))) {
            fprintf(stderr, "moe experiment: %s: %s\n", runs[i].name, err);
            goto done;
        }
    }
    moe_set_num_threads(threads);

    moe_experiment_opts o;
    memset(&o, 0, sizeof o);
    o.train.batch = batch, o.train.seq = seq, o.train.grad_accum = accum, o.train.eval_batches = eval_batches;
    o.train.seed = seed, o.train.n_threads = threads;
    o.train.opt = moe_adamw_config_default();
    o.train.opt.lr = lr, o.train.opt.min_lr = lr / 10;
    o.train.opt.max_steps = steps, o.train.opt.warmup_steps = steps / 20;
    o.steps = steps, o.stats_steps = stats_steps, o.ref_capacity_factor = ref_cap;
    o.progress = on_step;
    const int n_stats = stats_steps > 0 ? (stats_steps < steps ? stats_steps : steps) : (steps / 5 > 0 ? steps / 5 : 1);
    char protocol[1024];
    snprintf(protocol, sizeof protocol,
             "Base `%s`, %s budget: every model trains %d steps of %d x %d tokens x %d micro-batches (%.0f tokens, "
             "%.2f epochs of Brown's train split), seed %llu, AdamW lr %g with 5%% warm-up and cosine to a tenth, "
             "%d threads. Val CE: mean over %d fixed batches of the val split. Tokens/s: wall time inside the "
             "training steps only. Routing statistics: training-mode counts of the last micro-batch of each of the "
             "last %d steps, averaged over steps and MoE layers; capacity factor %g (0 = dropless); overflow = the "
             "fraction of pairs a capacity factor of %g would drop.",
             base, quick ? "quick" : "default", steps, batch, seq, accum, steps * tok_per_step,
             steps * tok_per_step / (double)d.train->n_tokens, (unsigned long long)seed, (double)lr, threads,
             eval_batches, n_stats, (double)cap, (double)ref_cap);
    if (!quiet) fprintf(stderr, "%s\n", protocol);

    progress pg = {0};
    pg.n_runs = n, pg.steps = steps, pg.quiet = quiet, pg.tty = isatty(STDERR_FILENO);
    o.progress_ctx = &pg;
    for (int i = 0; i < n; i++) {
        pg.name = runs[i].name, pg.idx = i;
        char model_dir[4096];
        o.save_dir = NULL;
        if (keep) {
            snprintf(model_dir, sizeof model_dir, "%s/models/%s", out, runs[i].name);
            snprintf(path, sizeof path, "%s/tokenizer.json", model_dir);
            if (cli_mkdir_p(model_dir) != 0 || moe_tokenizer_save(d.tok, path, err, sizeof err)) {
                fprintf(stderr, "moe experiment: cannot write %s\n", model_dir);
                rc = 1;
                goto done;
            }
            o.save_dir = model_dir;
        }
        rc = moe_experiment_run(&runs[i].cfg, &o, d.train->tokens, d.train->n_tokens, d.val->tokens, d.val->n_tokens,
                                &runs[i].res, err, sizeof err);
        if (pg.tty && !quiet) fputc('\n', stderr);
        if (rc) {
            fprintf(stderr, "moe experiment: %s: %s\n", runs[i].name, err);
            goto done;
        }
        if (!quiet)
            fprintf(stderr, "[%d/%d] %s: val CE %.4f (ppl %.2f), %.0f tokens/s\n", i + 1, n, runs[i].name,
                    runs[i].res.val_loss, exp(runs[i].res.val_loss), runs[i].res.tokens_per_s);
    }

    char cmdline[1024];
    snprintf(cmdline, sizeof cmdline, "moe experiment %s", KIND_NAME[kind]);
    for (int i = 0; i < argc; i++) {
        strncat(cmdline, " ", sizeof cmdline - strlen(cmdline) - 1);
        strncat(cmdline, argv[i], sizeof cmdline - strlen(cmdline) - 1);
    }
    const int json_stdout = json && !strcmp(json, "-"); /* then stdout holds only the JSON */
    if (!json_stdout) print_table(stdout, kind, runs, n, 0);
    cJSON *js = json_report(kind, runs, n, protocol, cmdline, &o.train, steps, quick, base);
    char *text = js ? cJSON_Print(js) : NULL;
    cJSON_Delete(js);
    if (!text) {
        fprintf(stderr, "moe experiment: out of memory\n");
        rc = 1;
        goto done;
    }
    snprintf(path, sizeof path, "%s/%s.json", out, KIND_NAME[kind]);
    rc = write_text(path, text);
    if (!rc && json_stdout) printf("%s\n", text);
    else if (!rc && json) rc = write_text(json, text);
    free(text);
    snprintf(path, sizeof path, "%s/%s.md", out, KIND_NAME[kind]);
    if (!rc) rc = write_markdown(path, kind, runs, n, protocol);
    if (!rc && kind == CAPACITY) rc = write_plots(out, runs, n);
    if (!rc && !json_stdout)
        printf("wrote %s/%s.json, %s/%s.md%s\n", out, KIND_NAME[kind], out, KIND_NAME[kind],
               kind == CAPACITY ? ", capacity_ppl.svg, capacity_speed.svg" : "");
    rc = rc ? 1 : 0;
done:
    cli_data_free(&d);
    free(runs);
    return rc;
}

int moe_cli_experiment(int argc, char **argv) {
    if (argc >= 1 && !strcmp(argv[0], "capacity")) return experiment(CAPACITY, argc - 1, argv + 1);
    if (argc >= 1 && !strcmp(argv[0], "balance")) return experiment(BALANCE, argc - 1, argv + 1);
    const int help = argc >= 1 && (!strcmp(argv[0], "--help") || !strcmp(argv[0], "-h"));
    fprintf(help ? stdout : stderr,
            "usage: moe experiment capacity|balance [flags]   (moe experiment capacity --help)\n"
            "  capacity  dense vs MoE with E = 4..64 experts at equal active parameters (Shazeer et al. Table 7)\n"
            "  balance   one MoE trained with each load-balancing method (Shazeer et al. Table 6)\n");
    return help ? 0 : 2;
}
