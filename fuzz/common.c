#define _GNU_SOURCE /* memmem */
/* Shared by the fuzz targets: the name registry (non-libFuzzer builds) and the
 * scratch files of the parsers that only read paths. */
#include "fuzz.h"

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_TARGETS 64

static struct {
    const char *name;
    moe_fuzz_fn fn;
} g_targets[MAX_TARGETS];
static int g_n;

void moe_fuzz_register(const char *name, moe_fuzz_fn fn) {
    if (g_n < MAX_TARGETS) g_targets[g_n].name = name, g_targets[g_n].fn = fn, g_n++;
}

int moe_fuzz_count(void) { return g_n; }
const char *moe_fuzz_name(int i) { return i >= 0 && i < g_n ? g_targets[i].name : NULL; }

moe_fuzz_fn moe_fuzz_find(const char *name) {
    for (int i = 0; i < g_n; i++)
        if (!strcmp(g_targets[i].name, name)) return g_targets[i].fn;
    return NULL;
}

void moe_fuzz_trap(const char *what) {
    fprintf(stderr, "fuzz invariant failed: %s\n", what);
    abort();
}

void moe_fuzz_split(const uint8_t *data, size_t size, int n, const uint8_t **part, size_t *len) {
    const size_t seplen = sizeof MOE_FUZZ_SEP - 1;
    const uint8_t *p = data, *end = data + size;
    for (int i = 0; i < n; i++) {
        const uint8_t *q = i + 1 < n ? memmem(p, (size_t)(end - p), MOE_FUZZ_SEP, seplen) : NULL;
        part[i] = p;
        len[i] = q ? (size_t)(q - p) : (size_t)(end - p);
        p = q ? q + seplen : end;
    }
}

static char g_dir[128];

static void remove_tmpdir(void) {
    DIR *d = opendir(g_dir);
    if (!d) return;
    char p[512];
    for (struct dirent *e; (e = readdir(d));) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        snprintf(p, sizeof p, "%s/%s", g_dir, e->d_name);
        unlink(p);
    }
    closedir(d);
    rmdir(g_dir);
}

const char *moe_fuzz_tmpdir(void) {
    if (g_dir[0]) return g_dir;
    struct stat st;
    const char *base = stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) ? "/dev/shm" : "/tmp";
    snprintf(g_dir, sizeof g_dir, "%s/moe_fuzz_%ld_XXXXXX", base, (long)getpid());
    if (!mkdtemp(g_dir)) {
        perror("moe_fuzz_tmpdir");
        abort();
    }
    atexit(remove_tmpdir);
    return g_dir;
}

const char *moe_fuzz_write(int slot, const char *name, const uint8_t *data, size_t size) {
    static char paths[8][256];
    if (slot < 0 || slot >= 8) return NULL;
    snprintf(paths[slot], sizeof paths[slot], "%s/%s", moe_fuzz_tmpdir(), name);
    int fd = open(paths[slot], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return NULL;
    size_t done = 0;
    while (done < size) {
        ssize_t w = write(fd, data + done, size - done);
        if (w <= 0) break;
        done += (size_t)w;
    }
    close(fd);
    return done == size ? paths[slot] : NULL;
}
