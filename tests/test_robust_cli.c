/* Robustness of `moe train` itself (docs/robustness.md): SIGKILL at seeded
 * random times while it checkpoints every step never leaves a checkpoint
 * that fails its manifest, does not load, or mixes steps; SIGINT/SIGTERM save
 * and exit 130, a second SIGINT exits at once, still consistent; --on-nan
 * error stops with the cause named, skip drops updates until the limit.
 * MOE_KILLTEST_N sets the number of kills (default 8; bench/killtest.sh runs
 * 100). Needs build/moe and the Brown corpus (4 of its files make the data). */
#include "test.h"

#include "internal.h"
#include "io/ckpt.h"
#include "robust_fixture.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char *MOE_BIN = "build/moe";

typedef struct {
    char base[64], corpus[128], run[128], log[128];
} kt_env;

static int kt_setup(kt_env *e) {
    char src[512];
    snprintf(src, sizeof src, "%s/ca01", moe_test_brown_dir());
    if (access(MOE_BIN, X_OK) != 0 || access(src, R_OK) != 0) {
        moe_test_skip("needs build/moe and the Brown corpus in data/brown");
        return -1;
    }
    if (!moe_test_tmpdir(e->base, "kill")) return -1;
    snprintf(e->corpus, sizeof e->corpus, "%s/corpus", e->base);
    snprintf(e->run, sizeof e->run, "%s/run", e->base);
    snprintf(e->log, sizeof e->log, "%s/log", e->base);
    return moe_test_brown_subset(e->corpus);
}

/* moe train on the small corpus, checkpointing every step, with up to 8
 * extra flags (NULL-terminated); output to log */
static long kt_fsize_limit; /* > 0: the child's RLIMIT_FSIZE, a disk that fills up */

static pid_t kt_spawn_with(const kt_env *e, int resume, const char *steps, const char *const *extra) {
    const pid_t pid = fork();
    if (pid != 0) return pid;
    if (kt_fsize_limit > 0) {
        struct rlimit rl = {(rlim_t)kt_fsize_limit, (rlim_t)kt_fsize_limit};
        signal(SIGXFSZ, SIG_IGN); /* inherited through exec: writes fail with EFBIG instead */
        setrlimit(RLIMIT_FSIZE, &rl);
    }
    int fd = open(e->log, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    if (fd >= 0) dup2(fd, 1), dup2(fd, 2);
    char *argv[40] = {(char *)MOE_BIN, "train", resume ? "--resume" : "--preset", resume ? "--quiet" : "tiny",
                      "--data", (char *)e->corpus, "--out", (char *)e->run, "--steps", (char *)steps,
                      "--batch", "2", "--seq", "32", "--threads", "1", "--ckpt-every", "1", "--eval-every", "0",
                      "--log-every", "1"};
    int n = 22;
    for (int i = 0; extra && extra[i] && i < 8; i++) argv[n++] = (char *)extra[i];
    argv[n] = NULL;
    execv(MOE_BIN, argv);
    _exit(127);
}

static pid_t kt_spawn(const kt_env *e, int resume, const char *steps) { return kt_spawn_with(e, resume, steps, NULL); }

static int kt_wait(pid_t pid) {
    int status;
    if (waitpid(pid, &status, 0) != pid) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0) {}
}

static int json_step(const char *path) {
    char *buf, err[256];
    size_t n;
    if (moe__read_file(path, 1u << 26, &buf, &n, err, sizeof err)) return -1;
    cJSON *o = cJSON_ParseWithLength(buf, n);
    moe__free(buf);
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(o, "step");
    const int step = cJSON_IsNumber(s) ? (int)s->valuedouble : -1;
    cJSON_Delete(o);
    return step;
}

/* The checkpoint in dir is whole: every file matches the manifest, the model
 * loads, and optimizer state and loss history are of the manifest's step.
 * Returns that step, -1 after reporting a failure. */
static int kt_check(const char *dir, const char *when) {
    char err[512], path[700];
    int step = -1;
    int rc = moe__ckpt_verify(dir, &step, err, sizeof err);
    CHECK_MSG(rc == 0, "%s: %s", when, err);
    if (rc) return -1;
    moe_model *m = NULL;
    rc = moe_model_load(dir, 2, 32, 1, 1, &m, err, sizeof err);
    CHECK_MSG(rc == 0, "%s: %s", when, err);
    if (rc) return -1;
    moe_train_config tc;
    memset(&tc, 0, sizeof tc);
    tc.batch = 2, tc.seq = 32, tc.grad_accum = 1, tc.n_threads = 1, tc.opt = moe_adamw_config_default();
    static int32_t toks[64];
    moe_trainer *t = moe_trainer_create(m, &tc, toks, 64, NULL, 0, NULL, err, sizeof err);
    rc = t ? moe_trainer_load_state(t, dir, err, sizeof err) : -1;
    CHECK_MSG(rc == 0, "%s: %s", when, err);
    if (t) CHECK_EQ_INT(moe_trainer_get_step(t), step);
    CHECK_MSG(moe__ckpt_path(dir, "train_state.json", path, sizeof path, err, sizeof err) == 0, "%s", err);
    const int hist = json_step(path);
    CHECK_MSG(hist == step, "%s: train_state.json has step %d, the manifest %d", when, hist, step);
    moe_trainer_free(t);
    moe_model_free(m);
    return rc || hist != step ? -1 : step;
}

TEST(ckpt_kill_moe_train_while_checkpointing) {
    kt_env e;
    if (kt_setup(&e)) return;
    CHECK_EQ_INT(kt_wait(kt_spawn(&e, 0, "2")), 0);
    int last = kt_check(e.run, "first run");
    CHECK_EQ_INT(last, 2);
    const char *env = getenv("MOE_KILLTEST_N");
    const int N = env && atoi(env) > 0 ? atoi(env) : 8;
    uint64_t s = 0x9e3779b97f4a7c15ULL; /* seeded kill times: the same schedule every run */
    int mid = 0, corrupt = 0;
    const double t0 = now_s();
    for (int i = 0; i < N; i++) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;
        const double delay = 0.15 + 0.45 * (double)(s >> 11) / 9007199254740992.0;
        const pid_t pid = kt_spawn(&e, 1, "1000000");
        sleep_s(delay);
        kill(pid, SIGKILL);
        CHECK_EQ_INT(kt_wait(pid), 128 + SIGKILL);
        mid += rb_has_leftovers(e.run);
        char when[64];
        snprintf(when, sizeof when, "kill %d (after %.3f s)", i, delay);
        const int step = kt_check(e.run, when);
        corrupt += step < 0;
        CHECK_MSG(step >= last, "%s: step went back from %d to %d", when, last, step);
        if (step >= 0) last = step;
    }
    printf("    %d SIGKILLs (%d inside a checkpoint write), %d corrupt checkpoints; step reached %d (%.1f s)\n", N, mid,
           corrupt, last, now_s() - t0);
    CHECK_MSG(N < 5 || mid >= 1, "no kill landed inside a checkpoint: the test tested nothing");
    CHECK_MSG(last > 2, "no step was ever saved after the first run");
    moe_test_rmdir(e.base);
}

/* Waits (at most 20 s) until the run has checkpointed past step. */
static int kt_wait_past(const kt_env *e, int step) {
    char path[300];
    snprintf(path, sizeof path, "%s/checkpoint.json", e->run);
    for (int i = 0; i < 2000; i++) {
        if (json_step(path) > step) return 0;
        sleep_s(0.01);
    }
    return -1;
}

static int log_has(const kt_env *e, const char *what) {
    char *buf, err[256];
    size_t n;
    if (moe__read_file(e->log, 1u << 24, &buf, &n, err, sizeof err)) return 0;
    const int found = strstr(buf, what) != NULL;
    moe__free(buf);
    return found;
}

TEST(ckpt_sigint_and_sigterm_save_and_exit_130) {
    kt_env e;
    if (kt_setup(&e)) return;
    CHECK_EQ_INT(kt_wait(kt_spawn(&e, 0, "2")), 0);
    const int sigs[3][2] = {{SIGINT, 0}, {SIGTERM, 0}, {SIGINT, SIGINT}};
    for (int k = 0; k < 3; k++) {
        const int before = kt_check(e.run, "before");
        const pid_t pid = kt_spawn(&e, 1, "1000000");
        CHECK(kt_wait_past(&e, before) == 0); /* training, not loading */
        kill(pid, sigs[k][0]);
        if (sigs[k][1]) kill(pid, sigs[k][1]);
        CHECK_EQ_INT(kt_wait(pid), 130);
        char when[64];
        snprintf(when, sizeof when, "signal case %d", k);
        const int after = kt_check(e.run, when);
        CHECK_MSG(after > before, "%s: step %d -> %d", when, before, after);
        if (!sigs[k][1]) { /* one signal: the final checkpoint is announced */
            CHECK_MSG(log_has(&e, "saved in"), "%s: no 'saved in' in the output", when);
            CHECK(!rb_has_leftovers(e.run));
        }
    }
    moe_test_rmdir(e.base);
}

/* A learning rate of 1e37 blows the weights up to finite but huge values in
 * one step; the next forward overflows. With a checkpoint every step, the
 * checkpoint of step 1 finds it first: the model does not evaluate, so it
 * is not saved, and the run stops naming the largest weight. Without
 * periodic checkpoints the next step fails (error) or is skipped (skip)
 * until the limit, and the final save refuses the diverged model too. */
TEST(robust_cli_on_nan_error_and_skip) {
    kt_env e;
    if (kt_setup(&e)) return;
    const char *err_flags[] = {"--lr", "1e37", "--warmup", "0", NULL};
    CHECK_EQ_INT(kt_wait(kt_spawn_with(&e, 0, "5", err_flags)), 1);
    CHECK_MSG(log_has(&e, "checkpoint at step 1 failed: the model of step 1 does not evaluate") &&
                  log_has(&e, "(no weight is NaN/Inf; the largest is ") && log_has(&e, "e+37)") &&
                  log_has(&e, "holds no checkpoint of this run"),
              "no cause in the output");
    CHECK(!log_has(&e, "update skipped"));
    CHECK(access(e.run, F_OK) != 0 || moe__ckpt_verify(e.run, NULL, NULL, 0) == MOE_ENOTFOUND); /* nothing saved */
    moe_test_rmdir(e.run);
    const char *step_flags[] = {"--lr", "1e37", "--warmup", "0", "--ckpt-every", "0", NULL};
    CHECK_EQ_INT(kt_wait(kt_spawn_with(&e, 0, "5", step_flags)), 1);
    CHECK_MSG(log_has(&e, "moe train: step 1: ") && log_has(&e, "(no weight is NaN/Inf; the largest is ") &&
                  log_has(&e, "does not evaluate"),
              "no cause of the failed step in the output");
    moe_test_rmdir(e.run);
    const char *skip_flags[] = {"--lr", "1e37", "--warmup", "0", "--on-nan", "skip", "--ckpt-every", "0", NULL};
    CHECK_EQ_INT(kt_wait(kt_spawn_with(&e, 0, "5", skip_flags)), 1);
    CHECK_MSG(log_has(&e, "moe train: update skipped (10 so far): step 1: ") &&
                  log_has(&e, "after 10 skipped updates in a row") &&
                  log_has(&e, "10 updates skipped (non-finite)"),
              "skip reports missing");
    moe_test_rmdir(e.run);
    const char *bad[] = {"--on-nan", "ignore", NULL};
    CHECK_EQ_INT(kt_wait(kt_spawn_with(&e, 0, "5", bad)), 2);
    moe_test_rmdir(e.base);
}

/* A disk that fills up: the resumed run's first checkpoint cannot be written
 * (model.safetensors is 2.8 MB, the limit 1 MB); moe train reports the path
 * and cause, stops with status 1, and the previous checkpoint stays whole. */
TEST(robust_cli_full_disk_stops_with_the_previous_checkpoint) {
    kt_env e;
    if (kt_setup(&e)) return;
    CHECK_EQ_INT(kt_wait(kt_spawn(&e, 0, "2")), 0);
    kt_fsize_limit = 1 << 20;
    const int rc = kt_wait(kt_spawn(&e, 1, "10"));
    kt_fsize_limit = 0;
    CHECK_EQ_INT(rc, 1);
    CHECK_MSG(log_has(&e, "checkpoint at step 3 failed: ") && log_has(&e, "model.safetensors") &&
                  log_has(&e, strerror(EFBIG)) && log_has(&e, "holds the checkpoint of step 2"),
              "no full-disk report in the output");
    CHECK_MSG(!log_has(&e, "checkpoint at step 4"), "training went on after the failed checkpoint");
    CHECK_EQ_INT(kt_check(e.run, "after the full disk"), 2);
    CHECK(!rb_has_leftovers(e.run));
    moe_test_rmdir(e.base);
}
