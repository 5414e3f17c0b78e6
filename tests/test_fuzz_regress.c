/* Replays the committed fuzz inputs (tests/data/fuzz/<target>/) through the
 * fuzz targets (fuzz/fuzz_<target>.c, compiled into the tests with gcc): the
 * crashes found by fuzzing and hand-made hostile files for the limits. Each
 * must be rejected (a negative code; files named ok-* must be accepted),
 * leave no live allocation behind, and never ask for a block larger than
 * MAX_BLOCK: a loader's memory must follow the file's size, not what its
 * header claims. Under make test-asan the same run checks memory errors. */
#include "../fuzz/fuzz.h"
#include "test.h"

#include "moe.h"

#include <dirent.h>
#include <stdlib.h>
#include <string.h>

#define MAX_BLOCK ((size_t)256 << 20)

static struct {
    long live, oversize;
    size_t biggest;
} g;

static void *rg_alloc(size_t size, void *ctx) {
    (void)ctx;
    if (size > MAX_BLOCK) {
        g.oversize++;
        if (size > g.biggest) g.biggest = size;
        return NULL;
    }
    void *p = malloc(size);
    if (p) g.live++;
    return p;
}

static void rg_free(void *p, void *ctx) {
    (void)ctx;
    g.live--;
    free(p);
}

static unsigned char *slurp(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    size_t cap = 1 << 16;
    unsigned char *b = malloc(cap);
    *n = 0;
    for (size_t r; b && (r = fread(b + *n, 1, cap - *n, fp)) > 0;) {
        *n += r;
        if (*n == cap) b = realloc(b, cap *= 2);
    }
    fclose(fp);
    return b;
}

/* Runs every file of dir through fn; returns how many ran. */
static int replay_dir(const char *target, moe_fuzz_fn fn, const char *dir) {
    struct dirent **names;
    int n = scandir(dir, &names, NULL, alphasort), ran = 0;
    for (int i = 0; i < n; i++) {
        const char *f = names[i]->d_name;
        if (f[0] != '.') {
            char path[1024];
            snprintf(path, sizeof path, "%s/%s", dir, f);
            size_t len;
            unsigned char *buf = slurp(path, &len);
            CHECK_MSG(buf != NULL, "%s: cannot read", path);
            if (buf) {
                g.live = g.oversize = 0, g.biggest = 0;
                const moe_allocator a = {rg_alloc, rg_free, NULL};
                moe_set_allocator(&a);
                int rc = fn(buf, len);
                moe_set_allocator(NULL);
                const int want_ok = !strncmp(f, "ok-", 3);
                CHECK_MSG(want_ok ? rc == 0 : rc < 0, "%s/%s: code %d (%s), expected %s", target, f, rc,
                          moe_err_name(rc), want_ok ? "0" : "a rejection");
                CHECK_MSG(g.live == 0, "%s/%s: %ld allocations leaked", target, f, g.live);
                CHECK_MSG(g.oversize == 0, "%s/%s: asked for %zu bytes at once (limit %zu)", target, f, g.biggest,
                          MAX_BLOCK);
                free(buf);
                ran++;
            }
        }
        free(names[i]);
    }
    if (n >= 0) free(names);
    return ran;
}

TEST(fuzz_regressions_replay) {
    static const char *const expected[] = {"gguf", "safetensors", "config", "tokenizer", "shard", "checkpoint"};
    for (int i = 0; i < 6; i++)
        CHECK_MSG(moe_fuzz_find(expected[i]) != NULL, "fuzz target %s is not registered", expected[i]);
    int total = 0;
    for (int i = 0; i < moe_fuzz_count(); i++) {
        char dir[512];
        snprintf(dir, sizeof dir, "%s/fuzz/%s", moe_test_data_dir(), moe_fuzz_name(i));
        int n = replay_dir(moe_fuzz_name(i), moe_fuzz_find(moe_fuzz_name(i)), dir);
        printf("    %s: %d inputs\n", moe_fuzz_name(i), n);
        total += n;
    }
    CHECK(total > 0);
}
