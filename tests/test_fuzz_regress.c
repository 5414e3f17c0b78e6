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
    static const char *const expected[] = {"gguf",  "safetensors", "config",     "tokenizer", "shard",
                                           "checkpoint", "corpus", "vocab", "gguf_model", "hf_dir",
                                           "ckpt_manifest"};
    for (int i = 0; i < 11; i++)
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

/* ---- limits ----------------------------------------------------------------- */

#include "data/shard.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "tokenizer/tokenizer.h"

/* Opens path with the loader of kind; returns the code, message in err. */
static int open_kind(const char *kind, const char *path, char *err, size_t errsz) {
    int rc = MOE_EINVAL;
    if (!strcmp(kind, "config")) {
        moe_model_config c;
        rc = moe_model_config_load(path, &c, err, errsz);
    } else if (!strcmp(kind, "gguf")) {
        moe__gguf *gg;
        if (!(rc = moe__gguf_open(path, &gg, err, errsz))) moe__gguf_close(gg);
    } else if (!strcmp(kind, "safetensors")) {
        moe__st_file *f;
        if (!(rc = moe__st_open(path, &f, err, errsz))) moe__st_close(f);
    } else if (!strcmp(kind, "tokenizer")) {
        moe_tokenizer *t;
        if (!(rc = moe_tokenizer_load(path, &t, err, errsz))) moe_tokenizer_free(t);
    } else if (!strcmp(kind, "shard")) {
        moe_shard *s;
        if (!(rc = moe_shard_load(path, &s, err, errsz))) moe_shard_free(s);
    }
    return rc;
}

/* Every cap is MOE_ELIMIT with a message naming the file, the field and the
 * limit (docs/security.md lists them). */
TEST(limits_name_file_field_and_limit) {
    static const struct {
        const char *kind, *file, *field, *limit;
    } cases[] = {
        {"config", "limit-tensor-count.json", "num_local_experts", "1048576"},
        {"config", "limit-param-count.json", "parameters", "1.1e+12"},
        {"gguf", "limit-tensor-count.gguf", "tensor_count", "1048576"},
        {"gguf", "limit-kv-count.gguf", "metadata_kv_count", "1048576"},
        {"gguf", "limit-n-dims.gguf", "n_dims", "limit of 4"},
        {"gguf", "nested-arrays.gguf", "nested", "limit of 8"},
        {"safetensors", "shape-overflow.safetensors", "\"x\"", "overflow"},
        {"tokenizer", "limit-vocab.json", "vocab_size", "1048576"},
        {"shard", "limit-vocab.bin", "vocab_size", "1048576"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char path[512], err[512] = "";
        snprintf(path, sizeof path, "%s/fuzz/%s/%s", moe_test_data_dir(), cases[i].kind, cases[i].file);
        int rc = open_kind(cases[i].kind, path, err, sizeof err);
        CHECK_MSG(rc == MOE_ELIMIT, "%s: %s, expected MOE_ELIMIT (%s)", path, moe_err_name(rc), err);
        CHECK_MSG(strstr(err, cases[i].file) && strstr(err, cases[i].field) && strstr(err, cases[i].limit),
                  "%s: the message does not name the file, %s and %s: %s", path, cases[i].field, cases[i].limit,
                  err);
    }
}

/* A shard of 2^32 + 1 tokens whose size is right (a sparse 16 GiB file, so
 * only the header is written): past MOE_SHARD_MAX_TOKENS, refused before any
 * allocation. A count that does not match the size stays MOE_EFORMAT. */
TEST(limits_shard_n_tokens) {
    char dir[64], path[128], err[512] = "";
    if (!moe_test_tmpdir(dir, "shardcap")) {
        CHECK_MSG(0, "mkdtemp failed");
        return;
    }
    snprintf(path, sizeof path, "%s/big.shard", dir);
    const uint64_t n = MOE_SHARD_MAX_TOKENS + 1;
    unsigned char h[40] = "MOESHRD1";
    const uint32_t version = 1, vocab = 10, docs = 1;
    memcpy(h + 8, &version, 4), memcpy(h + 12, &vocab, 4), memcpy(h + 16, &n, 8), memcpy(h + 24, &docs, 4);
    memset(h + 28, 0, 12); /* doc 0 at offset 0, genre 0 */
    FILE *fp = fopen(path, "wb");
    int ok = fp && fwrite(h, 1, sizeof h, fp) == sizeof h && fseeko(fp, (off_t)(40 + 4 * n - 1), SEEK_SET) == 0 &&
             fputc(0, fp) == 0;
    if (fp && fclose(fp)) ok = 0;
    if (!ok) {
        moe_test_skip("cannot write a sparse 16 GiB file here");
    } else {
        moe_shard *s = NULL;
        int rc = moe_shard_load(path, &s, err, sizeof err);
        CHECK_MSG(rc == MOE_ELIMIT, "%s (%s)", moe_err_name(rc), err);
        CHECK_MSG(strstr(err, path) && strstr(err, "n_tokens") && strstr(err, "4294967296"), "message: %s", err);
        CHECK(s == NULL);
        moe_shard_free(s);
    }
    moe_test_rmdir(dir);
}
