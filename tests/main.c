#include "test.h"

#include <dirent.h>
#include <limits.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_TESTS 1024

static struct {
    const char *name, *file;
    moe_test_fn fn;
} g_tests[MAX_TESTS];
static int g_ntests;
static int g_failed_now, g_skipped_now;

void moe_test_register(const char *name, const char *file, moe_test_fn fn) {
    if (g_ntests < MAX_TESTS) {
        g_tests[g_ntests].name = name;
        g_tests[g_ntests].file = file;
        g_tests[g_ntests].fn = fn;
        g_ntests++;
    }
}

void moe_test_fail(const char *file, int line, const char *fmt, ...) {
    if (g_failed_now < 20) { /* cap the noise of one failing test */
        va_list ap;
        va_start(ap, fmt);
        fprintf(stderr, "    %s:%d: ", file, line);
        vfprintf(stderr, fmt, ap);
        fputc('\n', stderr);
        va_end(ap);
    }
    g_failed_now++;
}

void moe_test_skip(const char *why) {
    g_skipped_now = 1;
    printf("    skipped: %s\n", why);
}

char *moe_test_tmpdir(char *buf, const char *tag) {
    snprintf(buf, 64, "/tmp/moe_%.20s_XXXXXX", tag);
    return mkdtemp(buf);
}

int moe_test_count_entries(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(d);
    return n;
}

const char *moe_test_brown_dir(void) {
    const char *d = getenv("MOE_BROWN_DIR");
    return d && *d ? d : "data/brown";
}

int moe_test_brown_subset(const char *dst) {
    if (mkdir(dst, 0777) != 0) return -1;
    for (int i = 1; i <= 4; i++) {
        char from[600], abs_from[4096], link[600];
        snprintf(from, sizeof from, "%s/ca0%d", moe_test_brown_dir(), i);
        snprintf(link, sizeof link, "%s/ca0%d", dst, i);
        if (!realpath(from, abs_from) || symlink(abs_from, link) != 0) return -1;
    }
    return 0;
}

void moe_test_rmdir(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    char p[1024];
    struct stat st;
    for (struct dirent *e; (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode)) moe_test_rmdir(p);
        else unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

const char *moe_test_data_dir(void) {
    const char *d = getenv("MOE_TEST_DATA");
    return d && *d ? d : "tests/data";
}

static int cmp_tests(const void *a, const void *b) {
    const typeof(g_tests[0]) *x = a, *y = b;
    int c = strcmp(x->file, y->file);
    return c ? c : strcmp(x->name, y->name);
}

/* usage: moe_tests [substring filter] */
int main(int argc, char **argv) {
    const char *filter = argc > 1 ? argv[1] : NULL;
    qsort(g_tests, (size_t)g_ntests, sizeof g_tests[0], cmp_tests);
    int passed = 0, failed = 0, skipped = 0;
    for (int i = 0; i < g_ntests; i++) {
        if (filter && !strstr(g_tests[i].name, filter) && !strstr(g_tests[i].file, filter))
            continue;
        g_failed_now = 0;
        g_skipped_now = 0;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        g_tests[i].fn();
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double ms = (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6;
        const char *status = g_failed_now ? "FAIL" : g_skipped_now ? "skip" : "ok";
        printf("%-4s %-44s %8.1f ms  (%s)\n", status, g_tests[i].name, ms, g_tests[i].file);
        fflush(stdout);
        if (g_failed_now) failed++;
        else if (g_skipped_now) skipped++;
        else passed++;
    }
    if (skipped) printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
    else printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
