/* Checkpoint protocol (src/io/ckpt.c, docs/robustness.md): a crash after any
 * durable operation of a save leaves exactly the old or the new checkpoint,
 * as seen by the loaders and by the manifest; mixed files are detected; a
 * full disk fails the save with the path and cause and keeps the previous
 * checkpoint; directories from before manifests still load. */
#include "test.h"

#include "internal.h"
#include "io/ckpt.h"
#include "robust_fixture.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* What a reader of dir sees: the manifest's step (verified against every
 * file), the model it loads and the trainer state's step. */
static int seen_step(const char *dir, const float *p1, const float *p2, int *which_params) {
    char err[512];
    int step = -2;
    int rc = moe__ckpt_verify(dir, &step, err, sizeof err);
    CHECK_MSG(rc == 0, "verify: %s", err);
    moe_model *m = NULL;
    rc = moe_model_load(dir, 2, 16, 1, 1, &m, err, sizeof err);
    CHECK_MSG(rc == 0, "load: %s", err);
    *which_params = !m ? 0 : rb_params_equal(m, p1) ? 1 : rb_params_equal(m, p2) ? 2 : 0;
    rb_fix f;
    CHECK(rb_fix_create(&f, MOE_NAN_ERROR, 0) == 0);
    rc = moe_trainer_load_state(f.t, dir, err, sizeof err);
    CHECK_MSG(rc == 0, "load_state: %s", err);
    const int st = moe_trainer_get_step(f.t);
    CHECK_EQ_INT(st, step);
    rb_fix_free(&f);
    moe_model_free(m);
    return step;
}

TEST(ckpt_crash_after_each_operation_leaves_old_or_new) {
    char base[64], ref[600], dir[600], err[512];
    if (!moe_test_tmpdir(base, "ckpt")) return;
    snprintf(ref, sizeof ref, "%s/ref", base);
    rb_fix f;
    CHECK(rb_fix_create(&f, MOE_NAN_ERROR, 0) == 0);
    moe_train_step_info si;
    CHECK(moe_trainer_step(f.t, &si) == 0);
    CHECK(moe_trainer_save(f.t, ref, err, sizeof err) == 0); /* the old checkpoint: step 1 */
    float *p1 = rb_params_copy(f.m);
    CHECK(moe_trainer_step(f.t, &si) == 0);
    float *p2 = rb_params_copy(f.m);
    /* commit of 3 files: 0 = staged only, 1 = commit record written, 2..4 =
     * after each rename, 5 = never (complete) */
    for (int h = 0; h <= 5; h++) {
        snprintf(dir, sizeof dir, "%s/d%d", base, h);
        CHECK(mkdir(dir, 0777) == 0 && rb_copy_dir(ref, dir) == 0);
        moe__ckpt_crash_after = h;
        const int rc = moe_trainer_save(f.t, dir, err, sizeof err);
        moe__ckpt_crash_after = -1;
        CHECK_EQ_INT(rc, h < 5 ? MOE_EIO : MOE_OK);
        CHECK_EQ_INT(rb_has_leftovers(dir), h < 5);
        int which;
        const int want = h == 0 ? 1 : 2;
        CHECK_EQ_INT(seen_step(dir, p1, p2, &which), want);
        CHECK_EQ_INT(which, want);
        /* the next writer (or --resume) finishes or discards it */
        CHECK_MSG(moe__ckpt_recover(dir, err, sizeof err) == 0, "%s", err);
        CHECK(!rb_has_leftovers(dir));
        CHECK_EQ_INT(seen_step(dir, p1, p2, &which), want);
        CHECK_EQ_INT(which, want);
    }
    free(p1), free(p2);
    rb_fix_free(&f);
    moe_test_rmdir(base);
}

TEST(ckpt_verify_detects_files_of_different_checkpoints) {
    char base[64], a[600], b[600], err[512], from[700], to[700];
    if (!moe_test_tmpdir(base, "ckpt")) return;
    snprintf(a, sizeof a, "%s/a", base), snprintf(b, sizeof b, "%s/b", base);
    rb_fix f;
    CHECK(rb_fix_create(&f, MOE_NAN_ERROR, 0) == 0);
    moe_train_step_info si;
    CHECK(moe_trainer_step(f.t, &si) == 0);
    CHECK(moe_trainer_save(f.t, a, err, sizeof err) == 0);
    CHECK(moe_trainer_step(f.t, &si) == 0);
    CHECK(moe_trainer_save(f.t, b, err, sizeof err) == 0);
    int step = -1;
    CHECK(moe__ckpt_verify(b, &step, err, sizeof err) == 0);
    CHECK_EQ_INT(step, 2);
    /* what a non-atomic directory could show after a kill: new model, old optimizer */
    snprintf(from, sizeof from, "%s/optimizer.safetensors", a);
    snprintf(to, sizeof to, "%s/optimizer.safetensors", b);
    char *buf;
    size_t n;
    CHECK(moe__read_file(from, 1u << 30, &buf, &n, err, sizeof err) == 0);
    moe__iov part = {buf, n};
    CHECK(moe__write_atomic(to, &part, 1, err, sizeof err) == 0);
    moe__free(buf);
    CHECK_EQ_INT(moe__ckpt_verify(b, &step, err, sizeof err), MOE_EFORMAT);
    CHECK_MSG(strstr(err, "optimizer.safetensors") != NULL, "%s", err);
    rb_fix_free(&f);
    moe_test_rmdir(base);
}

TEST(ckpt_dir_without_manifest_loads_and_bad_commit_record_is_an_error) {
    char base[64], err[512], path[700];
    if (!moe_test_tmpdir(base, "ckpt")) return;
    rb_fix f;
    CHECK(rb_fix_create(&f, MOE_NAN_ERROR, 0) == 0);
    CHECK(moe_model_save(f.m, base, err, sizeof err) == 0);
    snprintf(path, sizeof path, "%s/checkpoint.json", base);
    CHECK(unlink(path) == 0); /* as written before manifests existed */
    CHECK_EQ_INT(moe__ckpt_verify(base, NULL, err, sizeof err), MOE_ENOTFOUND);
    moe_model *m = NULL;
    CHECK_MSG(moe_model_load(base, 2, 16, 0, 1, &m, err, sizeof err) == 0, "%s", err);
    CHECK(m && rb_params_equal(m, moe_model_params(f.m)));
    moe_model_free(m);
    /* hostile commit records: an error naming the file, never a crash */
    const char *bad[] = {"", "{", "[]", "{\"format\": \"moe-checkpoint\", \"step\": 1, \"files\": [{\"name\": \"../x\", "
                         "\"bytes\": \"1\", \"fnv1a64\": \"0\"}]}",
                         "{\"format\": \"moe-checkpoint\", \"step\": 1e30, \"files\": []}",
                         "{\"format\": \"moe-checkpoint\", \"step\": 1, \"files\": [{\"name\": \"config.json\", "
                         "\"bytes\": \"-1\", \"fnv1a64\": \"0\"}]}"};
    snprintf(path, sizeof path, "%s/checkpoint.commit", base);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        moe__iov part = {bad[i], strlen(bad[i])};
        CHECK(moe__write_atomic(path, &part, 1, err, sizeof err) == 0);
        m = NULL;
        const int rc = moe_model_load(base, 2, 16, 0, 1, &m, err, sizeof err);
        CHECK_MSG(rc == MOE_EFORMAT && strstr(err, "checkpoint.commit"), "record %zu: rc %d: %s", i, rc, err);
        moe_model_free(m);
    }
    rb_fix_free(&f);
    moe_test_rmdir(base);
}

/* A file size limit makes every write past it fail (EFBIG) as a full disk
 * does (ENOSPC); both take the same checked path in io/atomic.c. */
TEST(ckpt_disk_full_is_reported_and_keeps_the_previous_checkpoint) {
    char base[64], err[512];
    if (!moe_test_tmpdir(base, "ckpt")) return;
    rb_fix f;
    CHECK(rb_fix_create(&f, MOE_NAN_ERROR, 0) == 0);
    moe_train_step_info si;
    CHECK(moe_trainer_step(f.t, &si) == 0);
    CHECK(moe_trainer_save(f.t, base, err, sizeof err) == 0);
    float *p1 = rb_params_copy(f.m);
    CHECK(moe_trainer_step(f.t, &si) == 0);
    int pfd[2];
    CHECK(pipe(pfd) == 0);
    const pid_t pid = fork();
    if (pid == 0) {
        close(pfd[0]);
        signal(SIGXFSZ, SIG_IGN);
        struct rlimit rl = {16384, 16384}; /* config.json fits, model.safetensors does not */
        setrlimit(RLIMIT_FSIZE, &rl);
        const int rc = moe_trainer_save(f.t, base, err, sizeof err);
        dprintf(pfd[1], "%d %s", rc, err);
        _exit(0);
    }
    close(pfd[1]);
    char msg[600] = "";
    ssize_t n = 0, r;
    while ((r = read(pfd[0], msg + n, sizeof msg - 1 - (size_t)n)) > 0) n += r;
    msg[n > 0 ? n : 0] = '\0';
    close(pfd[0]);
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    CHECK_MSG(atoi(msg) == MOE_EIO, "child: %s", msg);
    CHECK_MSG(strstr(msg, "model.safetensors") && strstr(msg, strerror(EFBIG)), "message: %s", msg);
    CHECK(!rb_has_leftovers(base)); /* the staged config.json.new went too */
    int which;
    CHECK_EQ_INT(seen_step(base, p1, p1, &which), 1);
    CHECK_EQ_INT(which, 1);
    free(p1);
    rb_fix_free(&f);
    moe_test_rmdir(base);
}

TEST(ckpt_recover_removes_only_leftovers) {
    char base[64], err[512], path[700];
    if (!moe_test_tmpdir(base, "ckpt")) return;
    const char *gone[] = {"model.safetensors.new", "model.safetensors.tmp.123.4", "checkpoint.commit.tmp.9.0"};
    const char *kept[] = {"notes.tmp.txt", "run.tmp.1", "x.tmp.1.2.bak", "newer", "README"};
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < (k ? 5 : 3); i++) {
            snprintf(path, sizeof path, "%s/%s", base, k ? kept[i] : gone[i]);
            moe__iov part = {"x", 1};
            CHECK(moe__write_atomic(path, &part, 1, err, sizeof err) == 0);
        }
    CHECK_MSG(moe__ckpt_recover(base, err, sizeof err) == 0, "%s", err);
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < (k ? 5 : 3); i++) {
            snprintf(path, sizeof path, "%s/%s", base, k ? kept[i] : gone[i]);
            CHECK_MSG((access(path, F_OK) == 0) == k, "%s", path);
        }
    moe_test_rmdir(base);
}
