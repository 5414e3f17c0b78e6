/* Nothing the user owns is lost (issue 15): each defect a hostile-user probe
 * found, driven through build/moe as a user would, and where the library
 * carries the promise, through the library too. Each test failed on the code
 * before the fix. Needs build/moe; the training cases need the Brown corpus
 * (4 of its files make the data). */
#include "test.h"

#include "internal.h"
#include "io/atomic.h"
#include "io/ckpt.h"
#include "io/gguf.h"
#include "io/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MOE_BIN "build/moe"

typedef struct {
    char base[64], corpus[128], run[128], log[128];
} cs_env;

/* A scratch directory with a 4-file corpus; -1 (skipped) without build/moe
 * or, when corpus is set, the Brown corpus. */
static int cs_setup(cs_env *e, int corpus) {
    char first[512];
    snprintf(first, sizeof first, "%s/ca01", moe_test_brown_dir());
    if (access(MOE_BIN, X_OK) != 0 || (corpus && access(first, R_OK) != 0)) {
        moe_test_skip("needs build/moe and the Brown corpus in data/brown");
        return -1;
    }
    if (!moe_test_tmpdir(e->base, "safety")) return -1;
    snprintf(e->corpus, sizeof e->corpus, "%s/corpus", e->base);
    snprintf(e->run, sizeof e->run, "%s/run", e->base);
    snprintf(e->log, sizeof e->log, "%s/log", e->base);
    return corpus ? moe_test_brown_subset(e->corpus) : 0;
}

/* Starts build/moe with argv (NULL-terminated, without the program) from the
 * current directory, output to e->log; cs_wait gives the exit status, 128 +
 * the signal. */
static pid_t cs_spawn(const cs_env *e, const char *const *argv) {
    const pid_t pid = fork();
    if (pid != 0) return pid;
    int fd = open(e->log, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    if (fd >= 0) dup2(fd, 1), dup2(fd, 2);
    alarm(60); /* kept across exec: a command that never ends (--steps -1 did) fails the test */
    char *args[64] = {MOE_BIN};
    for (int i = 0; argv[i] && i < 62; i++) args[i + 1] = (char *)argv[i];
    execv(MOE_BIN, args);
    _exit(127);
}

static int cs_wait(pid_t pid) {
    int status;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static int cs_run(const cs_env *e, const char *const *argv) { return cs_wait(cs_spawn(e, argv)); }

static int log_has(const cs_env *e, const char *what) {
    char *buf, err[256];
    size_t n;
    if (moe__read_file(e->log, 1u << 24, &buf, &n, err, sizeof err)) return 0;
    const int found = strstr(buf, what) != NULL;
    moe__free(buf);
    return found;
}

/* The output, for a failure message (a static buffer). */
static const char *log_text(const cs_env *e) {
    static char text[1200];
    char *buf, err[256];
    size_t n;
    text[0] = '\0';
    if (moe__read_file(e->log, 1u << 24, &buf, &n, err, sizeof err)) return text;
    snprintf(text, sizeof text, "%.*s", (int)(n < sizeof text - 1 ? n : sizeof text - 1),
             buf + (n > sizeof text - 1 ? n - (sizeof text - 1) : 0));
    moe__free(buf);
    return text;
}

/* moe train --preset tiny on the corpus into dir: steps, then up to 8 more
 * flags. */
static int cs_train(const cs_env *e, const char *dir, const char *steps, const char *const *extra) {
    const char *argv[40] = {"train", "--preset", "tiny", "--data", e->corpus, "--out", dir, "--steps", steps,
                            "--batch", "2", "--seq", "32", "--threads", "1", "--eval-every", "0", "--log-every", "1"};
    int n = 19;
    for (int i = 0; extra && extra[i] && i < 8; i++) argv[n++] = extra[i];
    argv[n] = NULL;
    return cs_run(e, argv);
}

static int manifest_step(const char *dir) {
    int step = -1;
    return moe__ckpt_verify(dir, &step, NULL, 0) ? -1 : step;
}

/* 64-bit FNV-1a of a file's bytes, 0 when it cannot be read */
static uint64_t file_hash(const char *dir, const char *name) {
    char path[300], *buf, err[256];
    size_t n;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (moe__read_file(path, 1u << 28, &buf, &n, err, sizeof err)) return 0;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)buf[i]) * 0x100000001b3ULL;
    moe__free(buf);
    return h;
}

static int write_text(const char *dir, const char *name, const char *text) {
    char path[300], err[256];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    moe__iov part = {text, strlen(text)};
    return moe__write_atomic(path, &part, 1, err, sizeof err);
}

static int exists_in(const char *dir, const char *name) {
    char path[300];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return access(path, F_OK) == 0;
}

/* ---- 1. a divergence keeps the last good checkpoint -------------------------- */

/* --resume with --lr 1e10: the first step makes the weights huge but finite,
 * the next forward overflows. Neither the failing step's exit save nor a
 * periodic checkpoint may replace the good checkpoint of step 2: the model
 * would not evaluate (before the fix: saved, then `moe eval` failed). */
TEST(safety_divergence_keeps_the_last_good_checkpoint) {
    cs_env e;
    if (cs_setup(&e, 1)) return;
    CHECK_EQ_INT(cs_train(&e, e.run, "2", NULL), 0);
    CHECK_EQ_INT(manifest_step(e.run), 2);
    const uint64_t model = file_hash(e.run, "model.safetensors"), opt = file_hash(e.run, "optimizer.safetensors");
    const char *every[][4] = {{"--ckpt-every", "500", NULL}, {"--ckpt-every", "1", NULL}};
    for (int k = 0; k < 2; k++) {
        const char *argv[] = {"train", "--resume", "--out", e.run, "--steps", "40", "--lr", "1e10", "--threads", "1",
                              "--batch", "2", "--seq", "32", every[k][0], every[k][1], NULL};
        CHECK_EQ_INT(cs_run(&e, argv), 1);
        CHECK_MSG(log_has(&e, "does not evaluate") && log_has(&e, "holds the checkpoint of step 2"), "case %d: %s", k,
                  log_text(&e));
        CHECK_EQ_INT(manifest_step(e.run), 2);
        CHECK(file_hash(e.run, "model.safetensors") == model && file_hash(e.run, "optimizer.safetensors") == opt);
        const char *eval[] = {"eval", "-m", e.run, "--data", e.corpus, "--batches", "1", "--threads", "1", NULL};
        CHECK_MSG(cs_run(&e, eval) == 0 && log_has(&e, "val loss "), "eval after case %d: %s", k, log_text(&e));
    }
    moe_test_rmdir(e.base);
}

/* ---- 2. recovery touches only its own files ------------------------------------ */

TEST(safety_recovery_leaves_other_files_alone) {
    cs_env e;
    if (cs_setup(&e, 1)) return;
    mkdir(e.run, 0777);
    /* the user's files, named like leftovers; and leftovers of our own */
    CHECK(write_text(e.run, "notes.new", "x") == 0 && write_text(e.run, "report.tmp.1.2", "y") == 0);
    CHECK(write_text(e.run, "model.safetensors.new.tmp.99.1", "z") == 0 && write_text(e.run, "config.json.new", "{") == 0);
    CHECK_EQ_INT(cs_train(&e, e.run, "2", NULL), 0);
    CHECK(exists_in(e.run, "notes.new") && exists_in(e.run, "report.tmp.1.2"));
    CHECK(!exists_in(e.run, "model.safetensors.new.tmp.99.1") && !exists_in(e.run, "config.json.new"));
    CHECK_EQ_INT(manifest_step(e.run), 2);
    /* the library's recovery, directly, with a manifest present */
    CHECK(write_text(e.run, "diary.tmp.3.4", "w") == 0 && write_text(e.run, "train_state.json.tmp.3.4", "v") == 0);
    char err[256];
    CHECK(moe__ckpt_recover(e.run, err, sizeof err) == 0);
    CHECK(exists_in(e.run, "diary.tmp.3.4") && exists_in(e.run, "notes.new"));
    CHECK(!exists_in(e.run, "train_state.json.tmp.3.4"));
    moe_test_rmdir(e.base);
}

/* ---- 3. a trained model is not replaced without --force -------------------- */

TEST(safety_new_run_refuses_to_replace_a_trained_model) {
    cs_env e;
    if (cs_setup(&e, 1)) return;
    CHECK_EQ_INT(cs_train(&e, e.run, "2", NULL), 0);
    const uint64_t model = file_hash(e.run, "model.safetensors");
    const char *other[] = {"--experts", "8", NULL};
    CHECK_EQ_INT(cs_train(&e, e.run, "1", other), 2);
    CHECK_MSG(log_has(&e, "already holds a trained model") && log_has(&e, "--resume") && log_has(&e, "--force"), "%s",
              log_text(&e));
    CHECK(file_hash(e.run, "model.safetensors") == model && manifest_step(e.run) == 2);
    const char *both[] = {"--force", "--resume", NULL};
    CHECK_EQ_INT(cs_train(&e, e.run, "1", both), 2);
    const char *force[] = {"--force", "--experts", "8", NULL};
    CHECK_EQ_INT(cs_train(&e, e.run, "1", force), 0);
    CHECK_EQ_INT(manifest_step(e.run), 1);
    CHECK(file_hash(e.run, "model.safetensors") != model);
    moe_test_rmdir(e.base);
}

/* ---- 4. one trainer per directory ------------------------------------------------ */

static void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0) {}
}

TEST(safety_second_trainer_is_refused_at_once) {
    cs_env e;
    if (cs_setup(&e, 1)) return;
    CHECK_EQ_INT(cs_train(&e, e.run, "2", NULL), 0);
    const uint64_t model = file_hash(e.run, "model.safetensors");
    /* a lock held by this process: another moe train must give up at once */
    char path[300];
    snprintf(path, sizeof path, "%s/train.lock", e.run);
    int fd = open(path, O_RDWR | O_CREAT, 0666);
    CHECK(fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) == 0);
    const char *resume[] = {"train", "--resume", "--out", e.run, "--steps", "4", "--threads", "1", "--batch", "2",
                            "--seq", "32", NULL};
    CHECK_EQ_INT(cs_run(&e, resume), 1);
    CHECK_MSG(log_has(&e, "is in use by another moe train"), "%s", log_text(&e));
    const char *force[] = {"--force", NULL};
    CHECK_EQ_INT(cs_train(&e, e.run, "1", force), 1);
    CHECK(file_hash(e.run, "model.safetensors") == model && manifest_step(e.run) == 2);
    close(fd); /* released: the same command now runs */
    CHECK_EQ_INT(cs_run(&e, resume), 0);
    CHECK_EQ_INT(manifest_step(e.run), 4);
    /* two real trainers: the second is refused while the first runs, and the
     * first goes on to its own end */
    const char *long_run[] = {"train", "--resume", "--out", e.run, "--steps", "1000000", "--threads", "1", "--batch",
                              "2", "--seq", "32", "--ckpt-every", "1", "--quiet", NULL};
    const pid_t first = cs_spawn(&e, long_run);
    for (int i = 0; i < 500 && manifest_step(e.run) <= 4; i++) sleep_s(0.01);
    cs_env e2 = e;
    snprintf(e2.log, sizeof e2.log, "%s/log2", e.base);
    CHECK_EQ_INT(cs_run(&e2, resume), 1);
    CHECK_MSG(log_has(&e2, "is in use by another moe train (pid "), "%s", log_text(&e2));
    kill(first, SIGTERM);
    CHECK_EQ_INT(cs_wait(first), 130);
    CHECK(manifest_step(e.run) > 4);
    moe_test_rmdir(e.base);
}

/* ---- 5, 6, 8. flags out of range are refused with the range ------------------ */

TEST(safety_flags_out_of_range_are_refused) {
    cs_env e;
    if (cs_setup(&e, 0)) return;
    char gguf[512];
    snprintf(gguf, sizeof gguf, "%s/tiny-mixtral-f16.gguf", moe_test_data_dir());
    static const struct {
        const char *cmd, *flag, *value;
    } cases[] = {
        {"train", "--threads", "100000"}, {"train", "--steps", "-1"},      {"train", "--steps", "0"},
        {"train", "--minutes", "-2"},     {"train", "--lr", "-1"},         {"train", "--lr", "1e39"},
        {"train", "--capacity-factor", "-1"}, {"train", "--aux-coef", "-0.5"}, {"train", "--warmup", "-1"},
        {"train", "--grad-clip", "-1"},   {"train", "--weight-decay", "-1"}, {"train", "--min-lr-ratio", "5"},
        {"train", "--seq", "-1"},         {"train", "--experts", "0"},     {"train", "--batch", "0"},
        {"generate", "-t", "100000"},     {"generate", "--temp", "-1"},    {"generate", "--top-p", "2"},
        {"generate", "-n", "-2"},         {"perplexity", "-t", "100000"},  {"eval", "--threads", "100000"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *cmd = cases[i].cmd, *argv[10] = {cmd, "-m", gguf, cases[i].flag, cases[i].value, NULL};
        if (!strcmp(cmd, "train")) argv[1] = "--preset", argv[2] = "tiny", argv[5] = "--out", argv[6] = e.run;
        if (!strcmp(cmd, "eval")) argv[2] = e.base; /* a directory that exists: the flag is what is wrong */
        if (!strcmp(cmd, "generate")) argv[5] = "--prompt-ids", argv[6] = "1,2";
        if (!strcmp(cmd, "perplexity")) argv[5] = "-f", argv[6] = gguf;
        const int rc = cs_run(&e, argv);
        CHECK_MSG(rc == 2 && (log_has(&e, "out of range") || log_has(&e, "a float flag holds at most")) &&
                      log_has(&e, cases[i].flag),
                  "moe %s %s %s: exit %d: %s", cmd, cases[i].flag, cases[i].value, rc, log_text(&e));
    }
    CHECK_MSG(access(e.run, F_OK) != 0, "a refused command created %s", e.run);
    /* the help states what unset means and agrees with the refusals */
    const char *help[] = {"train", "--help", NULL};
    CHECK_EQ_INT(cs_run(&e, help), 0);
    CHECK_MSG(log_has(&e, "unset: 1000") && log_has(&e, "1 or more"), "%s", log_text(&e));
    moe_test_rmdir(e.base);
}

/* The library refuses what the CLI refuses (a program using it directly must
 * not reach libgomp with 100000 threads either). */
TEST(safety_library_refuses_thread_counts_past_the_cap) {
    char path[512], err[512];
    snprintf(path, sizeof path, "%s/tiny-mixtral-f16.gguf", moe_test_data_dir());
    moe_engine_params p = moe_engine_params_default();
    p.n_threads = 100000;
    moe_engine *eng = NULL;
    CHECK_EQ_INT(moe_engine_load(path, &p, &eng, err, sizeof err), MOE_EINVAL);
    CHECK_MSG(strstr(err, "100000 threads"), "%s", err);
    moe_model_config c;
    CHECK(moe_model_preset("tiny", &c) == 0);
    int rc = 0;
    moe_model *m = moe_model_create(&c, 1, 8, 0, 100000, &rc, err, sizeof err);
    CHECK(m == NULL && rc == MOE_EINVAL);
    m = moe_model_create(&c, 1, 8, 0, moe_max_threads(), &rc, err, sizeof err);
    CHECK_MSG(m != NULL, "%s", err);
    moe_model_free(m);
    CHECK(moe_max_threads() >= 4);
    /* the optimizer settings the CLI refuses, refused by the trainer too */
    m = moe_model_create(&c, 2, 8, 1, 1, &rc, err, sizeof err);
    static int32_t toks[64];
    const float bad_opt[][4] = {{-1, 0, 0, 0}, {1e-3f, 1, 0, 0}, {1e-3f, 0, -1, 0}, {1e-3f, 0, 0, -1}, {INFINITY, 0, 0, 0}};
    for (int i = 0; m && i < 5; i++) {
        moe_train_config tc;
        memset(&tc, 0, sizeof tc);
        tc.batch = 2, tc.seq = 8, tc.grad_accum = 1, tc.n_threads = 1, tc.opt = moe_adamw_config_default();
        tc.opt.lr = bad_opt[i][0], tc.opt.min_lr = bad_opt[i][1], tc.opt.weight_decay = bad_opt[i][2],
        tc.opt.grad_clip = bad_opt[i][3];
        moe_trainer *t = moe_trainer_create(m, &tc, toks, 64, NULL, 0, &rc, err, sizeof err);
        CHECK_MSG(t == NULL && rc == MOE_EINVAL, "case %d: %s", i, err);
        moe_trainer_free(t);
    }
    moe_model_free(m);
    moe_sampler *s = NULL;
    const moe_sampler_params bad[] = {{.temp = -1, .top_p = 1}, {.temp = 1, .top_p = 2}, {.temp = NAN, .top_p = 1}};
    for (int i = 0; i < 3; i++) CHECK_EQ_INT(moe_sampler_create(&bad[i], 10, &s), MOE_EINVAL);
}

/* ---- 7. moe perplexity -m DIR goes through the checked loader ---------------- */

/* The engine on a train directory: a committed checkpoint whose renames a
 * crash cut short is read as the new one (here: an lm_head of zeros, so the
 * perplexity is exactly the vocabulary size); NaN weights and a vocab_size
 * that contradicts the tensors are refused, naming them. */
TEST(safety_engine_reads_train_directories_like_the_trainer) {
    cs_env e;
    if (cs_setup(&e, 1)) return;
    CHECK_EQ_INT(cs_train(&e, e.run, "2", NULL), 0);
    char err[512];
    moe_model *m = NULL;
    CHECK(moe_model_load(e.run, 1, 32, 0, 1, &m, err, sizeof err) == 0);
    if (!m) return;
    const int V = moe_model_get_config(m)->vocab_size;
    for (int i = 0; i < moe_model_n_tensors(m); i++) {
        const moe_param_info *pi = moe_model_tensor(m, i);
        if (!strcmp(pi->name, "lm_head.weight")) memset(moe_model_params(m) + pi->offset, 0, pi->numel * sizeof(float));
    }
    moe__ckpt_crash_after = 1; /* stop right after the commit point */
    CHECK_EQ_INT(moe_model_save(m, e.run, err, sizeof err), MOE_EIO);
    moe__ckpt_crash_after = -1;
    CHECK(exists_in(e.run, MOE__CKPT_COMMIT) && exists_in(e.run, "model.safetensors.new"));
    int32_t ids[64];
    for (int i = 0; i < 64; i++) ids[i] = (i * 37) % V;
    moe_engine_params p = moe_engine_params_default();
    p.n_ctx = 32, p.n_threads = 1;
    moe_engine *eng = NULL;
    CHECK_MSG(moe_engine_load(e.run, &p, &eng, err, sizeof err) == 0, "%s", err);
    double ppl = 0, ppl_err = 0;
    if (eng) CHECK(moe_engine_perplexity(eng, ids, 64, 32, -1, &ppl, &ppl_err, NULL, NULL) == 0);
    CHECK_CLOSE(ppl, V, 1e-3, 1e-5); /* the new lm_head: uniform logits */
    moe_engine_free(eng);
    CHECK(moe__ckpt_recover(e.run, err, sizeof err) == 0); /* finish the renames */
    /* NaN weights, written past the checked saver */
    const int n = moe_model_n_tensors(m);
    moe__st_out *t = calloc((size_t)n, sizeof *t);
    for (int i = 0; t && i < n; i++) {
        const moe_param_info *pi = moe_model_tensor(m, i);
        t[i].name = pi->name, t[i].dtype = MOE__DT_F32, t[i].ndim = pi->ndim;
        for (int d = 0; d < pi->ndim; d++) t[i].shape[d] = pi->shape[d];
        t[i].data = moe_model_params(m) + pi->offset;
        if (strstr(pi->name, "layers.1.self_attn.o_proj")) moe_model_params(m)[pi->offset + 5] = NAN;
    }
    char path[300];
    snprintf(path, sizeof path, "%s/model.safetensors", e.run);
    CHECK(t && moe__st_write(path, t, n, NULL, err, sizeof err) == 0);
    free(t);
    CHECK_EQ_INT(moe_engine_load(e.run, &p, &eng, err, sizeof err), MOE_ENONFINITE);
    CHECK_MSG(strstr(err, "model.layers.1.self_attn.o_proj.weight") && strstr(err, "NaN"), "%s", err);
    const char *ppl_cmd[] = {"perplexity", "-m", e.run, "--ids-file", path, "-c", "32", NULL}; /* any file: refused first */
    CHECK(cs_run(&e, ppl_cmd) != 0 && !log_has(&e, "PPL = nan"));
    /* a config.json whose vocab_size is not the tensors' */
    moe_model_config c = *moe_model_get_config(m);
    c.vocab_size = V + 7;
    snprintf(path, sizeof path, "%s/config.json", e.run);
    CHECK(moe_model_config_save(&c, path, err, sizeof err) == 0);
    CHECK_EQ_INT(moe_engine_load(e.run, &p, &eng, err, sizeof err), MOE_ESHAPE);
    CHECK_MSG(strstr(err, "vocab_size") && strstr(err, "config.json"), "%s", err);
    moe_model_free(m);
    moe_test_rmdir(e.base);
}

/* ---- 9, 10. messages that say what happened ------------------------------------- */

TEST(safety_messages_name_the_real_problem) {
    cs_env e;
    if (cs_setup(&e, 1)) return;
    char gguf[512];
    snprintf(gguf, sizeof gguf, "%s/tiny-mixtral-f16.gguf", moe_test_data_dir());
    /* -n -1 is llama.cpp's "until the end": it generates, to the context */
    const char *gen_all[] = {"generate", "-m", gguf, "--prompt-ids", "1,2", "-n", "-1", "--temp", "0", "-t", "1", NULL};
    CHECK_MSG(cs_run(&e, gen_all) == 0 && log_has(&e, "tokens at"), "%s", log_text(&e));
    /* a path that does not exist is named as such */
    const char *missing[] = {"generate", "-m", "nonexist.gguf", "-p", "hi", "-n", "2", NULL};
    CHECK_EQ_INT(cs_run(&e, missing), 1);
    CHECK_MSG(log_has(&e, "nonexist.gguf: No such file") && !log_has(&e, "tokenizer.json"), "%s", log_text(&e));
    /* a context past the trained one warns (tiny-mixtral: 64 positions) */
    const char *long_ctx[] = {"generate", "-m", gguf, "--prompt-ids", "1,2", "-n", "1", "-c", "200", "-t", "1", NULL};
    CHECK_EQ_INT(cs_run(&e, long_ctx), 0);
    CHECK_MSG(log_has(&e, "warning: -c 200 is more than the 64 positions"), "%s", log_text(&e));
    const char *short_ctx[] = {"generate", "-m", gguf, "--prompt-ids", "1,2", "-n", "1", "-c", "64", "-t", "1", NULL};
    CHECK_EQ_INT(cs_run(&e, short_ctx), 0);
    CHECK(!log_has(&e, "warning"));
    /* hierarchical routing without groups names the flag */
    const char *hier[] = {"--router", "hierarchical", NULL};
    CHECK_EQ_INT(cs_train(&e, e.run, "1", hier), 2);
    CHECK_MSG(log_has(&e, "--router hierarchical needs --groups"), "%s", log_text(&e));
    /* progress before the first evaluation says "val -", never "val nan" */
    CHECK_EQ_INT(cs_train(&e, e.run, "3", NULL), 0);
    CHECK_MSG(log_has(&e, "val -") && !log_has(&e, "nan"), "%s", log_text(&e));
    /* --resume remembers the corpus the run was started on, whatever the
     * current directory holds */
    char cwd[4096], out_abs[4096], bin[4096];
    CHECK(getcwd(cwd, sizeof cwd) && realpath(e.run, out_abs) && realpath(MOE_BIN, bin));
    const pid_t pid = fork();
    if (pid == 0) {
        int fd = open(e.log, O_WRONLY | O_CREAT | O_TRUNC, 0666);
        if (fd >= 0) dup2(fd, 1), dup2(fd, 2);
        if (chdir(e.base) != 0) _exit(126); /* no data/brown here */
        alarm(60);
        execl(bin, bin, "train", "--resume", "--out", out_abs, "--steps", "4", "--threads", "1", "--batch", "2", "--seq",
              "32", (char *)NULL);
        _exit(127);
    }
    CHECK_MSG(cs_wait(pid) == 0 && log_has(&e, "data: 4 documents"), "%s", log_text(&e));
    CHECK_EQ_INT(manifest_step(e.run), 4);
    moe_test_rmdir(e.base);
}

/* A vocabulary declared with the wrong tokenizer.ggml.model: the message
 * names the file and the model instead of "invalid argument". */
TEST(safety_wrong_tokenizer_model_is_named) {
    cs_env e;
    if (cs_setup(&e, 0)) return;
    static const char *tok[] = {"<unk>", "<s>", "</s>", "a", "b", "ab", "\xe2\x96\x81"};
    static const char *merges[] = {"a b"};
    const char *models[] = {"llama", "gpt2"};
    for (int k = 0; k < 2; k++) {
        char path[200], err[256];
        snprintf(path, sizeof path, "%s/%s.gguf", e.base, models[k]);
        moe__gguf_writer *w = NULL;
        CHECK(moe__gguf_writer_new(&w) == 0);
        moe__gguf_writer_add_str(w, "general.architecture", "llama");
        moe__gguf_writer_add_str(w, "tokenizer.ggml.model", models[k]);
        moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", tok, 7);
        moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", merges, 1);
        CHECK(moe__gguf_writer_write(w, path, err, sizeof err) == 0);
        moe__gguf_writer_free(w);
        const char *argv[] = {"tokenize", "-m", path, "-p", "hi there", NULL};
        const char *gen[] = {"generate", "-m", path, "-p", "hi there", "-n", "1", NULL};
        const int rc = cs_run(&e, k == 0 ? argv : gen);
        CHECK_MSG(rc == 1 && log_has(&e, path) && log_has(&e, "tokenizer.ggml.model") && log_has(&e, models[k]) &&
                      !log_has(&e, "invalid argument"),
                  "%s: %s", models[k], log_text(&e));
    }
    moe_test_rmdir(e.base);
}

/* ---- the first README command installs no Python -------------------------------- */

/* scripts/install-deps.sh against stand-ins for dpkg-query (nothing
 * installed) and apt-get (records its arguments): --main, what `make demo`
 * runs, asks for no Python package; --python asks for them. */
TEST(safety_demo_dependencies_have_no_python) {
    cs_env e;
    if (cs_setup(&e, 0) || access("scripts/install-deps.sh", R_OK) != 0) return;
    char bin[128], cmd[1024], apt[160];
    snprintf(bin, sizeof bin, "%s/bin", e.base);
    snprintf(apt, sizeof apt, "%s/apt.log", e.base);
    mkdir(bin, 0777);
    snprintf(cmd, sizeof cmd, "%s/dpkg-query", bin);
    FILE *f = fopen(cmd, "w");
    if (f) fputs("#!/bin/sh\nexit 1\n", f), fclose(f);
    chmod(cmd, 0755);
    snprintf(cmd, sizeof cmd, "%s/apt-get", bin);
    f = fopen(cmd, "w");
    if (f) fprintf(f, "#!/bin/sh\necho \"$@\" >> %s\n", apt), fclose(f);
    chmod(cmd, 0755);
    snprintf(cmd, sizeof cmd, "%s/sudo", bin);
    f = fopen(cmd, "w");
    if (f) fputs("#!/bin/sh\nexec \"$@\"\n", f), fclose(f);
    chmod(cmd, 0755);
    const char *modes[] = {"--main", "--python"};
    for (int k = 0; k < 2; k++) {
        unlink(apt);
        snprintf(cmd, sizeof cmd, "PATH=%s:$PATH bash scripts/install-deps.sh %s > %s/deps.log 2>&1", bin, modes[k],
                 e.base);
        CHECK_EQ_INT(system(cmd), 0);
        char *log = NULL, err[256];
        size_t n;
        CHECK(moe__read_file(apt, 1 << 20, &log, &n, err, sizeof err) == 0);
        const int py = log && strstr(log, "python3-torch") != NULL;
        CHECK_MSG(k == 0 ? !py && strstr(log, "libopenblas-dev") : py, "%s: %s", modes[k], log ? log : "");
        moe__free(log);
    }
    /* and `make demo` is the --main install */
    snprintf(cmd, sizeof cmd, "make -n demo 2>/dev/null | grep -q 'install-deps.sh --main'");
    CHECK_EQ_INT(system(cmd), 0);
    moe_test_rmdir(e.base);
}
