/* `moe info --system` and the CLI's OpenMP wait default (docs/inference.md,
 * "On a busy machine"): the CLI runs with GOMP_SPINCOUNT=10000 unless the
 * user set OMP_WAIT_POLICY or GOMP_SPINCOUNT (then theirs stands) or opted
 * out with MOE_NO_REEXEC=1. Each case runs build/moe with an explicit
 * environment and reads the report. Needs build/moe. */
#include "test.h"

#include "internal.h"
#include "io/atomic.h"
#include "moe.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* The output of `build/moe info --system` under env (NULL-terminated), in
 * out (n bytes); the exit status. */
static int system_report(char *const env[], const char *log, char *out, size_t n) {
    const pid_t pid = fork();
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0666);
        if (fd >= 0) dup2(fd, 1), dup2(fd, 2);
        alarm(30);
        char *argv[] = {"build/moe", "info", "--system", NULL};
        execve(argv[0], argv, env);
        _exit(127);
    }
    int status;
    if (pid < 0 || waitpid(pid, &status, 0) != pid) return -1;
    char *buf, err[256];
    size_t len;
    out[0] = '\0';
    if (!moe__read_file(log, 1 << 20, &buf, &len, err, sizeof err)) {
        snprintf(out, n, "%.*s", (int)len, buf);
        moe__free(buf);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

TEST(cli_system_report_and_openmp_wait_default) {
    if (access("build/moe", X_OK) != 0) {
        moe_test_skip("needs build/moe");
        return;
    }
    char dir[64], log[128], out[4096], most[64];
    if (!moe_test_tmpdir(dir, "system")) return;
    snprintf(log, sizeof log, "%s/log", dir);
    static const struct {
        char *env[3];
        const char *want, *not_want;
    } cases[] = {
        {{NULL}, "GOMP_SPINCOUNT=10000", "GOMP_SPINCOUNT=(unset"},
        {{"GOMP_SPINCOUNT=123", NULL}, "GOMP_SPINCOUNT=123", "10000"},
        {{"OMP_WAIT_POLICY=passive", NULL}, "OMP_WAIT_POLICY=passive GOMP_SPINCOUNT=(unset", "10000"},
        {{"MOE_NO_REEXEC=1", NULL}, "GOMP_SPINCOUNT=(unset: libgomp's)", "10000"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const int rc = system_report((char *const *)cases[i].env, log, out, sizeof out);
        CHECK_MSG(rc == 0 && strstr(out, cases[i].want) && !strstr(out, cases[i].not_want), "case %zu: exit %d: %s", i,
                  rc, out);
    }
    /* the report's other lines: the build's kernel set and the thread cap */
    snprintf(most, sizeof most, "at most %d (4 per CPU)", moe_max_threads());
    CHECK_MSG(strstr(out, moe_kernel_set()) && strstr(out, most) && strstr(out, "cpu features"), "%s", out);
    moe_test_rmdir(dir);
}
