/* Runs inputs through a fuzz target without libFuzzer (gcc build), e.g. to
 * reproduce a crash under gdb or valgrind:
 *     build/fuzz_replay TARGET FILE|DIR...
 * Prints each input's code; exits 0 unless an input could not be read. */
#include "fuzz.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int run_file(moe_fuzz_fn fn, const char *path) {
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        fprintf(stderr, "%s: cannot open\n", path);
        return 1;
    }
    size_t cap = 1 << 16, n = 0;
    unsigned char *buf = malloc(cap);
    for (size_t r; buf && (r = fread(buf + n, 1, cap - n, fp)) > 0;) {
        n += r;
        if (n == cap) buf = realloc(buf, cap *= 2);
    }
    fclose(fp);
    if (!buf) {
        fprintf(stderr, "%s: out of memory\n", path);
        return 1;
    }
    int rc = fn(buf, n);
    printf("%s: %zu bytes: %d\n", path, n, rc);
    free(buf);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s TARGET FILE|DIR...\ntargets:", argv[0]);
        for (int i = 0; i < moe_fuzz_count(); i++) fprintf(stderr, " %s", moe_fuzz_name(i));
        fputc('\n', stderr);
        return 2;
    }
    moe_fuzz_fn fn = moe_fuzz_find(argv[1]);
    if (!fn) {
        fprintf(stderr, "unknown target %s\n", argv[1]);
        return 2;
    }
    int bad = 0;
    for (int a = 2; a < argc; a++) {
        struct stat st;
        if (stat(argv[a], &st) == 0 && S_ISDIR(st.st_mode)) {
            struct dirent **names;
            int n = scandir(argv[a], &names, NULL, alphasort);
            for (int i = 0; i < n; i++) {
                if (names[i]->d_name[0] != '.') {
                    char p[4096];
                    snprintf(p, sizeof p, "%s/%s", argv[a], names[i]->d_name);
                    bad |= run_file(fn, p);
                }
                free(names[i]);
            }
            free(names);
        } else
            bad |= run_file(fn, argv[a]);
    }
    return bad;
}
