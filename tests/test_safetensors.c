/* safetensors reader/writer: round trips, conversions, and hand-crafted hostile files. */
#include "io/safetensors.h"
#include "test.h"

#include <dirent.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

/* ---- helpers --------------------------------------------------------------- */

static int write_bytes(const char *path, const void *buf, size_t len) {
    FILE *fp = fopen(path, "wb");
    if (!fp) return -1;
    size_t w = len ? fwrite(buf, 1, len, fp) : 0;
    return fclose(fp) == 0 && w == len ? 0 : -1;
}

/* Reads a whole file into a malloc'd buffer (test code: plain malloc is fine). */
static unsigned char *read_bytes(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    unsigned char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, fp) != (size_t)n) {
        free(b);
        b = NULL;
    }
    fclose(fp);
    *len = (size_t)n;
    return b;
}

/* 8-byte little-endian length, the header bytes, then data_len bytes of 0xAB. */
static unsigned char *craft(const char *header, size_t hlen, size_t data_len, size_t *len) {
    *len = 8 + hlen + data_len;
    unsigned char *b = malloc(*len);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    memcpy(b + 8, header, hlen);
    memset(b + 8 + hlen, 0xAB, data_len);
    return b;
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Opens bytes both from a file and from memory; both must fail with code and
 * a message naming the source. */
static void expect_bad_bytes(const char *dir, const char *what, const unsigned char *b,
                             size_t len, int code, const char *needle) {
    char path[256], err[512];
    snprintf(path, sizeof path, "%s/bad.safetensors", dir);
    CHECK_MSG(write_bytes(path, b, len) == 0, "%s: cannot write test file", what);
    for (int mem = 0; mem < 2; mem++) {
        moe__st_file *f = (moe__st_file *)1;
        err[0] = '\0';
        int rc = mem ? moe__st_open_mem(b, len, &f, err, sizeof err)
                     : moe__st_open(path, &f, err, sizeof err);
        CHECK_MSG(rc == code, "%s (%s): got %s, want %s [%s]", what, mem ? "mem" : "file",
                  moe_err_name(rc), moe_err_name(code), err);
        CHECK_MSG(f == NULL, "%s: handle not NULL on error", what);
        CHECK_MSG(strstr(err, mem ? "<memory>" : path) != NULL, "%s: message lacks the name: %s",
                  what, err);
        CHECK_MSG(strlen(err) > strlen(mem ? "<memory>: " : path) + 2, "%s: empty message", what);
        if (needle) CHECK_MSG(strstr(err, needle) != NULL, "%s: \"%s\" not in: %s", what, needle, err);
        if (rc == 0) moe__st_close(f);
    }
    unlink(path);
}

static void expect_bad(const char *dir, const char *what, const char *header, size_t data_len,
                       int code, const char *needle) {
    size_t len;
    unsigned char *b = craft(header, strlen(header), data_len, &len);
    expect_bad_bytes(dir, what, b, len, code, needle);
    free(b);
}

/* Counts live allocations made through the library's hooks, to find leaks
 * without a sanitizer. */
static long g_live;
static void *count_alloc(size_t n, void *ctx) {
    (void)ctx;
    void *p = malloc(n);
    if (p) g_live++;
    return p;
}
static void count_free(void *p, void *ctx) {
    (void)ctx;
    if (p) g_live--;
    free(p);
}

/* ---- tests ----------------------------------------------------------------- */

TEST(st_roundtrip_f32_i32_f16_meta) {
    char dirbuf[64], path[256], err[512] = "";
    const char *dir = moe_test_tmpdir(dirbuf, "st");
    CHECK(dir != NULL);
    if (!dir) return;
    snprintf(path, sizeof path, "%s/m.safetensors", dir);

    float w[6] = {1.5f, -0.0f, 3.0e-40f /* subnormal */, 65504.0f, -1e30f, 0.1f};
    uint32_t nan_bits = 0x7fc01234u; /* NaN payload must survive */
    memcpy(&w[5], &nan_bits, 4);
    int32_t ids[4] = {0, -1, INT32_MAX, INT32_MIN};
    uint16_t h[3] = {0x3c00, 0xc000, 0x7bff};
    float scalar = 42.0f;
    moe__st_out outs[] = {
        {"layers.0.w", MOE__DT_F32, 2, {2, 3}, w},
        {"ids", MOE__DT_I32, 1, {4}, ids},
        {"empty", MOE__DT_F32, 2, {0, 5}, NULL},
        {"half \"quoted\"\n", MOE__DT_F16, 1, {3}, h},
        {"scalar", MOE__DT_F32, 0, {0}, &scalar},
    };
    const char *meta[] = {"format", "pt", "note", "back\\slash \"q\" \t tab", NULL};
    int rc = moe__st_write(path, outs, 5, meta, err, sizeof err);
    CHECK_MSG(rc == 0, "write: %s %s", moe_err_name(rc), err);
    CHECK_EQ_INT(moe_test_count_entries(dir), 1); /* no temp file left behind */

    size_t len = 0;
    unsigned char *raw = read_bytes(path, &len);
    CHECK(raw != NULL && len >= 16);
    if (raw) {
        uint64_t hlen = 0;
        for (int i = 7; i >= 0; i--) hlen = hlen << 8 | raw[i];
        CHECK_EQ_INT(hlen % 8, 0); /* data area 8-aligned */
        CHECK_EQ_INT(len, 8 + hlen + 24 + 16 + 0 + 6 + 4);
        free(raw);
    }

    moe__st_file *f = NULL;
    rc = moe__st_open(path, &f, err, sizeof err);
    CHECK_MSG(rc == 0, "open: %s %s", moe_err_name(rc), err);
    if (rc) { moe_test_rmdir(dir); return; }
    CHECK_EQ_INT(moe__st_count(f), 5);
    for (int i = 0; i < 5; i++) { /* written order == data offset order */
        const moe__st_tensor *t = moe__st_get(f, i);
        CHECK(t && !strcmp(t->name, outs[i].name));
        CHECK(t && t->dtype == outs[i].dtype && t->ndim == outs[i].ndim);
        for (int d = 0; t && d < t->ndim; d++) CHECK_EQ_INT(t->shape[d], outs[i].shape[d]);
        CHECK(moe__st_find(f, outs[i].name) == t);
    }
    CHECK(moe__st_get(f, 5) == NULL && moe__st_get(f, -1) == NULL);
    CHECK(moe__st_find(f, "nope") == NULL);

    const moe__st_tensor *t = moe__st_find(f, "layers.0.w");
    CHECK(t && t->numel == 6 && t->nbytes == 24 && !memcmp(t->data, w, 24));
    CHECK(t && ((uintptr_t)t->data % 8) == 0);
    float back[6];
    CHECK(t && moe__st_read_f32(t, back, 6) == 0 && !memcmp(back, w, 24));
    t = moe__st_find(f, "ids");
    CHECK(t && t->numel == 4 && !memcmp(t->data, ids, 16));
    CHECK(t && moe__st_read_f32(t, back, 4) == MOE_EUNSUPPORTED);
    t = moe__st_find(f, "empty");
    CHECK(t && t->numel == 0 && t->nbytes == 0 && moe__st_read_f32(t, NULL, 0) == 0);
    t = moe__st_find(f, "half \"quoted\"\n");
    CHECK(t && t->nbytes == 6 && !memcmp(t->data, h, 6));
    t = moe__st_find(f, "scalar");
    CHECK(t && t->ndim == 0 && t->numel == 1 && moe__st_read_f32(t, back, 1) == 0 && back[0] == 42.0f);

    CHECK_EQ_INT(moe__st_meta_count(f), 2);
    CHECK(moe__st_meta(f, "format") && !strcmp(moe__st_meta(f, "format"), "pt"));
    CHECK(moe__st_meta(f, "note") && !strcmp(moe__st_meta(f, "note"), meta[3]));
    CHECK(moe__st_meta(f, "missing") == NULL);
    const char *k = NULL, *v = NULL;
    CHECK(moe__st_meta_at(f, 1, &k, &v) == 0 && k && !strcmp(k, "note") && v && !strcmp(v, meta[3]));
    CHECK(moe__st_meta_at(f, 2, &k, &v) == MOE_EINVAL);
    moe__st_close(f);
    moe_test_rmdir(dir);
}

TEST(st_read_f32_conversions) {
    char dirbuf[64], path[256], err[512] = "";
    const char *dir = moe_test_tmpdir(dirbuf, "st");
    CHECK(dir != NULL);
    if (!dir) return;
    snprintf(path, sizeof path, "%s/c.safetensors", dir);
    /* F16: 1, -2, 65504 (max), 2^-24 (smallest subnormal), 2^-14 (smallest normal),
     * -0, 0.5, 1/3 rounded, +inf, NaN */
    uint16_t h[10] = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x0400, 0x8000, 0x3800, 0x3555, 0x7c00, 0x7e00};
    float hv[9] = {1.0f, -2.0f, 65504.0f, 0x1p-24f, 0x1p-14f, -0.0f, 0.5f, 0.333251953125f, INFINITY};
    /* BF16 is the top half of an F32. */
    uint16_t b[5] = {0x3f80, 0xc040, 0x4049, 0x0001, 0xff80};
    float bv[5] = {1.0f, -3.0f, 3.140625f, 0x1p-133f, -INFINITY};
    double d[3] = {0.1, -1e300, 7.0};
    moe__st_out outs[] = {
        {"h", MOE__DT_F16, 1, {10}, h},
        {"b", MOE__DT_BF16, 2, {1, 5}, b},
        {"d", MOE__DT_F64, 1, {3}, d},
    };
    int rc = moe__st_write(path, outs, 3, NULL, err, sizeof err);
    CHECK_MSG(rc == 0, "write: %s", err);
    moe__st_file *f = NULL;
    rc = moe__st_open(path, &f, err, sizeof err);
    CHECK_MSG(rc == 0, "open: %s", err);
    if (rc) { moe_test_rmdir(dir); return; }
    float out[10];
    CHECK(moe__st_read_f32(moe__st_find(f, "h"), out, 10) == 0);
    for (int i = 0; i < 9; i++)
        CHECK_MSG(f32_bits(out[i]) == f32_bits(hv[i]), "f16[%d]: %.9g != %.9g", i, out[i], hv[i]);
    CHECK(isnan(out[9]));
    CHECK(moe__st_read_f32(moe__st_find(f, "b"), out, 5) == 0);
    for (int i = 0; i < 5; i++)
        CHECK_MSG(f32_bits(out[i]) == f32_bits(bv[i]), "bf16[%d]: %.9g != %.9g", i, out[i], bv[i]);
    CHECK(moe__st_read_f32(moe__st_find(f, "d"), out, 3) == 0);
    CHECK(out[0] == 0.1f && isinf(out[1]) && out[1] < 0 && out[2] == 7.0f);
    CHECK_EQ_INT(moe__st_read_f32(moe__st_find(f, "d"), out, 2), MOE_ESHAPE);
    CHECK_EQ_INT(moe__st_read_f32(moe__st_find(f, "d"), NULL, 3), MOE_EINVAL);
    CHECK_EQ_INT(moe__st_read_f32(NULL, out, 3), MOE_EINVAL);
    moe__st_close(f);

    /* An odd header length leaves the data unaligned, as some writers do. */
    char hdr[96] = "{\"x\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}}";
    while (strlen(hdr) % 4 != 1) strcat(hdr, " ");
    size_t len;
    unsigned char *buf = craft(hdr, strlen(hdr), 12, &len);
    float xv[3] = {1.25f, -7.5f, 1e-3f};
    memcpy(buf + len - 12, xv, 12);
    rc = moe__st_open_mem(buf, len, &f, err, sizeof err);
    CHECK_MSG(rc == 0, "open_mem: %s", err);
    if (rc == 0) {
        const moe__st_tensor *t = moe__st_get(f, 0);
        CHECK(((uintptr_t)t->data % 4) != 0);
        CHECK(moe__st_read_f32(t, out, 3) == 0 && !memcmp(out, xv, 12));
        moe__st_close(f);
    }
    free(buf);
    moe_test_rmdir(dir);
}

TEST(st_zero_tensors_and_meta_only) {
    char dirbuf[64], path[256], err[512] = "";
    const char *dir = moe_test_tmpdir(dirbuf, "st");
    CHECK(dir != NULL);
    if (!dir) return;
    snprintf(path, sizeof path, "%s/z.safetensors", dir);
    CHECK(moe__st_write(path, NULL, 0, NULL, err, sizeof err) == 0);
    moe__st_file *f = NULL;
    CHECK(moe__st_open(path, &f, err, sizeof err) == 0);
    CHECK(f && moe__st_count(f) == 0 && moe__st_meta_count(f) == 0 && !moe__st_get(f, 0));
    moe__st_close(f);
    const char *meta[] = {"k", "v", NULL};
    CHECK(moe__st_write(path, NULL, 0, meta, err, sizeof err) == 0);
    f = NULL;
    CHECK(moe__st_open(path, &f, err, sizeof err) == 0);
    CHECK(f && moe__st_count(f) == 0 && moe__st_meta(f, "k") && !strcmp(moe__st_meta(f, "k"), "v"));
    moe__st_close(f);
    /* Empty tensors take no bytes, so they may share an offset with others. */
    const char *hdr = "{\"e1\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]},"
                      "\"a\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                      "\"e2\":{\"dtype\":\"BOOL\",\"shape\":[3,0],\"data_offsets\":[8,8]}}";
    size_t len;
    unsigned char *buf = craft(hdr, strlen(hdr), 8, &len);
    int rc = moe__st_open_mem(buf, len, &f, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc == 0) {
        CHECK_EQ_INT(moe__st_count(f), 3);
        CHECK(!strcmp(moe__st_get(f, 0)->name, "a") && !strcmp(moe__st_get(f, 1)->name, "e1"));
        moe__st_close(f);
    }
    free(buf);
    moe_test_rmdir(dir);
}

TEST(st_rejects_truncated_and_bad_lengths) {
    char dirbuf[64];
    const char *dir = moe_test_tmpdir(dirbuf, "st");
    CHECK(dir != NULL);
    if (!dir) return;
    unsigned char b[64] = {0};
    expect_bad_bytes(dir, "empty file", b, 0, MOE_EFORMAT, "too short");
    expect_bad_bytes(dir, "5-byte file", b, 5, MOE_EFORMAT, "too short");
    b[0] = 100; /* header length 100, file 20 bytes */
    memcpy(b + 8, "{}          ", 12);
    expect_bad_bytes(dir, "header past end", b, 20, MOE_EFORMAT, "header length 100");
    b[0] = 1;
    expect_bad_bytes(dir, "header length 1", b, 20, MOE_EFORMAT, NULL);
    b[0] = 0;
    b[7] = 0x80; /* 2^63 */
    expect_bad_bytes(dir, "header length 2^63", b, 20, MOE_EFORMAT, NULL);
    b[7] = 0;
    b[0] = 12;
    b[9] = '\0'; /* "{\0 ..." */
    expect_bad_bytes(dir, "NUL in header", b, 20, MOE_EFORMAT, "NUL");

    /* Over the header cap: only the length field is read, so a lazily zeroed
     * buffer costs nothing. */
    size_t big = (size_t)MOE__ST_MAX_HEADER + 64;
    unsigned char *z = calloc(1, big);
    uint64_t hl = MOE__ST_MAX_HEADER + 1;
    for (int i = 0; i < 8; i++) z[i] = (unsigned char)(hl >> (8 * i));
    moe__st_file *f = NULL;
    char err[256] = "";
    CHECK_EQ_INT(moe__st_open_mem(z, big, &f, err, sizeof err), MOE_ELIMIT);
    CHECK(f == NULL && strstr(err, "<memory>"));
    free(z);
    CHECK_EQ_INT(moe__st_open_mem(NULL, 0, &f, err, sizeof err), MOE_EFORMAT);
    moe_test_rmdir(dir);
}

TEST(st_rejects_malformed_headers) {
    char dirbuf[64];
    const char *dir = moe_test_tmpdir(dirbuf, "st");
    CHECK(dir != NULL);
    if (!dir) return;
#define T(dt, shape, offs) "{\"dtype\":\"" dt "\",\"shape\":" shape ",\"data_offsets\":" offs "}"
    static const struct {
        const char *what, *hdr;
        size_t data;
        int code;
        const char *needle;
    } cases[] = {
        {"not JSON", "{not json}", 0, MOE_EFORMAT, "not valid JSON"},
        {"array", "[1, 2, 3]", 0, MOE_EFORMAT, "not a JSON object"},
        {"trailing junk", "{}  x", 0, MOE_EFORMAT, "after the JSON"},
        {"entry not object", "{\"a\": 5}", 0, MOE_EFORMAT, "\"a\""},
        {"missing dtype", "{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, MOE_EFORMAT, "dtype"},
        {"unknown dtype", "{\"a\":" T("XYZ", "[1]", "[0,4]") "}", 4, MOE_EFORMAT, "XYZ"},
        {"unsupported dtype", "{\"a\":" T("F8_E4M3", "[1]", "[0,1]") "}", 1, MOE_EUNSUPPORTED, "F8_E4M3"},
        {"negative dim", "{\"a\":" T("F32", "[2,-1]", "[0,4]") "}", 4, MOE_EFORMAT, "negative"},
        {"fractional dim", "{\"a\":" T("F32", "[1.5]", "[0,4]") "}", 4, MOE_EFORMAT, "integer"},
        {"string dim", "{\"a\":" T("F32", "[\"1\"]", "[0,4]") "}", 4, MOE_EFORMAT, "number"},
        {"dim over 2^53", "{\"a\":" T("F32", "[1e300]", "[0,4]") "}", 4, MOE_ELIMIT, "2^53"},
        {"dim over 2^40", "{\"a\":" T("F32", "[1099511627777]", "[0,4]") "}", 4, MOE_ELIMIT, "2^40"},
        {"shape product overflow",
         "{\"a\":" T("F32", "[1099511627776,1099511627776,1099511627776]", "[0,4]") "}", 4,
         MOE_ELIMIT, "overflow"},
        {"nbytes overflow", "{\"a\":" T("F64", "[1099511627776,4194304]", "[0,4]") "}", 4,
         MOE_ELIMIT, "overflow"},
        {"nine dims", "{\"a\":" T("U8", "[1,1,1,1,1,1,1,1,1]", "[0,1]") "}", 1, MOE_ELIMIT, "dimensions"},
        {"shape not array", "{\"a\":" T("F32", "4", "[0,4]") "}", 4, MOE_EFORMAT, "shape"},
        {"offsets out of range", "{\"w1\":" T("F32", "[998]", "[8,4000]") "}", 3000, MOE_EFORMAT,
         "tensor \"w1\": data_offsets [8, 4000] exceed data size 3000"},
        {"offsets size mismatch", "{\"a\":" T("F32", "[2]", "[0,4]") "}", 8, MOE_EFORMAT, "need 8"},
        {"offsets reversed", "{\"a\":" T("F32", "[0]", "[8,4]") "}", 8, MOE_EFORMAT, "reversed"},
        {"offsets three", "{\"a\":" T("F32", "[1]", "[0,4,8]") "}", 8, MOE_EFORMAT, "two"},
        {"offsets one", "{\"a\":" T("F32", "[1]", "[4]") "}", 8, MOE_EFORMAT, "two"},
        {"offsets negative", "{\"a\":" T("F32", "[1]", "[-4,0]") "}", 8, MOE_EFORMAT, "negative"},
        {"overlap", "{\"a\":" T("F32", "[2]", "[0,8]") ",\"b\":" T("F32", "[2]", "[4,12]") "}", 12,
         MOE_EFORMAT, "overlap"},
        {"contained", "{\"a\":" T("U8", "[12]", "[0,12]") ",\"b\":" T("U8", "[2]", "[4,6]") "}", 12,
         MOE_EFORMAT, "overlap"},
        {"duplicate name", "{\"a\":" T("F32", "[1]", "[0,4]") ",\"a\":" T("F32", "[1]", "[4,8]") "}",
         8, MOE_EFORMAT, "duplicate"},
        {"duplicate field", "{\"a\":{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],"
                            "\"data_offsets\":[0,4]}}", 4, MOE_EFORMAT, "duplicate"},
        {"meta non-string", "{\"__metadata__\":{\"ok\":\"x\",\"n\":3}}", 0, MOE_EFORMAT, "\"n\""},
        {"meta not object", "{\"__metadata__\":[\"x\"]}", 0, MOE_EFORMAT, "__metadata__"},
        {"meta twice", "{\"__metadata__\":{},\"__metadata__\":{}}", 0, MOE_EFORMAT, "__metadata__"},
        {"meta dup key", "{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", 0, MOE_EFORMAT, "\"k\""},
        {"deep nesting", "{\"a\":[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]}", 0, MOE_EFORMAT, NULL},
    };
#undef T
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_bad(dir, cases[i].what, cases[i].hdr, cases[i].data, cases[i].code, cases[i].needle);
    moe_test_rmdir(dir);
}

TEST(st_open_missing_file) {
    moe__st_file *f = (moe__st_file *)1;
    char err[256] = "";
    CHECK_EQ_INT(moe__st_open("/nonexistent/moe/x.safetensors", &f, err, sizeof err), MOE_EIO);
    CHECK(f == NULL && strstr(err, "/nonexistent/moe/x.safetensors"));
    CHECK_EQ_INT(moe__st_open("/tmp", &f, err, sizeof err), MOE_EIO); /* a directory */
    CHECK(strstr(err, "regular"));
}

TEST(st_write_errors) {
    char dirbuf[64], path[256], err[512] = "";
    const char *dir = moe_test_tmpdir(dirbuf, "st");
    CHECK(dir != NULL);
    if (!dir) return;
    float x[2] = {1, 2};
    moe__st_out one = {"x", MOE__DT_F32, 1, {2}, x};

    snprintf(path, sizeof path, "%s/no/such/dir/m.safetensors", dir);
    CHECK_EQ_INT(moe__st_write(path, &one, 1, NULL, err, sizeof err), MOE_EIO);
    CHECK_MSG(strstr(err, path) != NULL, "message: %s", err);

    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    moe__st_out dup[2] = {one, one};
    CHECK_EQ_INT(moe__st_write(path, dup, 2, NULL, err, sizeof err), MOE_EINVAL);
    CHECK(strstr(err, "duplicate"));
    moe__st_out bad = one;
    bad.name = "__metadata__";
    CHECK_EQ_INT(moe__st_write(path, &bad, 1, NULL, err, sizeof err), MOE_EINVAL);
    bad = one;
    bad.ndim = 9;
    CHECK_EQ_INT(moe__st_write(path, &bad, 1, NULL, err, sizeof err), MOE_EINVAL);
    bad = one;
    bad.shape[0] = -2;
    CHECK_EQ_INT(moe__st_write(path, &bad, 1, NULL, err, sizeof err), MOE_EINVAL);
    bad = one;
    bad.data = NULL;
    CHECK_EQ_INT(moe__st_write(path, &bad, 1, NULL, err, sizeof err), MOE_EINVAL);
    bad = one;
    bad.dtype = (moe__dtype)77;
    CHECK_EQ_INT(moe__st_write(path, &bad, 1, NULL, err, sizeof err), MOE_EINVAL);
    const char *meta_null[] = {"k", NULL, NULL};
    CHECK_EQ_INT(moe__st_write(path, &one, 1, meta_null, err, sizeof err), MOE_EINVAL);
    const char *meta_dup[] = {"k", "1", "k", "2", NULL};
    CHECK_EQ_INT(moe__st_write(path, &one, 1, meta_dup, err, sizeof err), MOE_EINVAL);
    CHECK_EQ_INT(moe__st_write(path, NULL, 1, NULL, err, sizeof err), MOE_EINVAL);
    CHECK_EQ_INT(moe_test_count_entries(dir), 0); /* nothing created by any failure */
    moe_test_rmdir(dir);
}

TEST(st_write_replaces_existing) {
    char dirbuf[64], path[256], err[512] = "";
    const char *dir = moe_test_tmpdir(dirbuf, "st");
    CHECK(dir != NULL);
    if (!dir) return;
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    CHECK(write_bytes(path, "old contents", 12) == 0);
    int32_t v[3] = {7, 8, 9};
    moe__st_out o = {"v", MOE__DT_I32, 1, {3}, v};
    CHECK(moe__st_write(path, &o, 1, NULL, err, sizeof err) == 0);
    moe__st_file *f = NULL;
    CHECK(moe__st_open(path, &f, err, sizeof err) == 0);
    CHECK(f && moe__st_count(f) == 1 && !memcmp(moe__st_get(f, 0)->data, v, 12));
    /* The open mapping keeps the old inode alive across a second replace. */
    int32_t w[1] = {5};
    moe__st_out o2 = {"w", MOE__DT_I32, 1, {1}, w};
    CHECK(moe__st_write(path, &o2, 1, NULL, err, sizeof err) == 0);
    CHECK(f && !memcmp(moe__st_get(f, 0)->data, v, 12));
    moe__st_close(f);
    f = NULL;
    CHECK(moe__st_open(path, &f, err, sizeof err) == 0);
    CHECK(f && moe__st_find(f, "w") && !moe__st_find(f, "v"));
    moe__st_close(f);
    CHECK_EQ_INT(moe_test_count_entries(dir), 1);
    moe_test_rmdir(dir);
}

/* RLIMIT_FSIZE makes write() fail with EFBIG part-way, like a full disk. */
TEST(st_write_short_write_keeps_old_file) {
    char dirbuf[64], path[256], err[512] = "";
    const char *dir = moe_test_tmpdir(dirbuf, "st");
    CHECK(dir != NULL);
    if (!dir) return;
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    CHECK(write_bytes(path, "old contents", 12) == 0);
    struct rlimit old, lim;
    getrlimit(RLIMIT_FSIZE, &old);
    lim = old;
    lim.rlim_cur = 64 << 10;
    if (old.rlim_cur != RLIM_INFINITY && old.rlim_cur < lim.rlim_cur) lim.rlim_cur = old.rlim_cur;
    void (*prev)(int) = signal(SIGXFSZ, SIG_IGN);
    CHECK(setrlimit(RLIMIT_FSIZE, &lim) == 0);
    size_t n = 1 << 18;
    float *big = calloc(n, sizeof *big);
    moe__st_out o = {"big", MOE__DT_F32, 1, {(int64_t)n}, big};
    int rc = moe__st_write(path, &o, 1, NULL, err, sizeof err);
    setrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, prev);
    free(big);
    CHECK_EQ_INT(rc, MOE_EIO);
    CHECK_MSG(strstr(err, path) != NULL, "message: %s", err);
    size_t len = 0;
    unsigned char *b = read_bytes(path, &len);
    CHECK(b && len == 12 && !memcmp(b, "old contents", 12));
    free(b);
    CHECK_EQ_INT(moe_test_count_entries(dir), 1); /* temp file removed */
    moe_test_rmdir(dir);
}

/* Every error path must free what it allocated: count live allocations. */
TEST(st_no_leaks_on_any_path) {
    char dirbuf[64], path[256], err[512];
    const char *dir = moe_test_tmpdir(dirbuf, "st");
    CHECK(dir != NULL);
    if (!dir) return;
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    moe_set_allocator(&(moe_allocator){count_alloc, count_free, NULL});
    g_live = 0;
    float x[4] = {1, 2, 3, 4};
    moe__st_out outs[2] = {{"a", MOE__DT_F32, 1, {2}, x}, {"b", MOE__DT_F32, 1, {2}, x + 2}};
    const char *meta[] = {"k", "v", "k2", "v2", NULL};
    CHECK(moe__st_write(path, outs, 2, meta, err, sizeof err) == 0);
    moe__st_file *f = NULL;
    CHECK(moe__st_open(path, &f, err, sizeof err) == 0);
    moe__st_close(f);
    outs[1].name = "a";
    CHECK(moe__st_write(path, outs, 2, meta, err, sizeof err) == MOE_EINVAL);
    const char *bad[] = {
        "{\"__metadata__\":{\"k\":\"v\",\"k\":\"w\"}}",
        "{\"__metadata__\":{\"k\":\"v\"},\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
        "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
        "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},\"b\":{\"dtype\":\"Q\"}}",
        "{\"a\":[1,2,{\"x\":3}]}",
        "{\"a\":",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        size_t len;
        unsigned char *b = craft(bad[i], strlen(bad[i]), 8, &len);
        CHECK(moe__st_open_mem(b, len, &f, err, sizeof err) < 0);
        free(b);
    }
    long live = g_live;
    moe_set_allocator(NULL);
    CHECK_EQ_INT(live, 0);
    moe_test_rmdir(dir);
}

/* Random corruptions of a valid file must fail cleanly or parse to something
 * whose tensors are readable; run under ASan this finds out-of-bounds reads. */
TEST(st_fuzz_mutations) {
    char dirbuf[64], path[256], err[512];
    const char *dir = moe_test_tmpdir(dirbuf, "st");
    CHECK(dir != NULL);
    if (!dir) return;
    snprintf(path, sizeof path, "%s/m.safetensors", dir);
    float x[6] = {1, 2, 3, 4, 5, 6};
    uint16_t h[4] = {0x3c00, 1, 2, 3};
    moe__st_out outs[3] = {{"a", MOE__DT_F32, 2, {2, 3}, x},
                           {"bb", MOE__DT_BF16, 1, {4}, h},
                           {"c", MOE__DT_F16, 2, {2, 2}, h}};
    const char *meta[] = {"k", "v", NULL};
    CHECK(moe__st_write(path, outs, 3, meta, err, sizeof err) == 0);
    size_t len = 0;
    unsigned char *orig = read_bytes(path, &len);
    CHECK(orig != NULL);
    if (!orig) { moe_test_rmdir(dir); return; }
    static const char alphabet[] = "{}[]\",:0123456789-.eE \\u";
    moe__rng rng;
    moe__rng_seed(&rng, 1234);
    moe_set_allocator(&(moe_allocator){count_alloc, count_free, NULL});
    g_live = 0;
    int parsed = 0;
    for (int it = 0; it < 4000; it++) {
        /* Exactly n bytes, so ASan sees any read past the (possibly truncated) end. */
        size_t n = moe__rng_u64(&rng) % 8 == 0 ? moe__rng_u64(&rng) % len : len;
        unsigned char *b = malloc(n ? n : 1);
        memcpy(b, orig, n);
        int nmut = 1 + (int)(moe__rng_u64(&rng) % 4);
        for (int m = 0; m < nmut; m++) {
            if (n == 0) break;
            size_t pos = moe__rng_u64(&rng) % n;
            uint64_t r = moe__rng_u64(&rng);
            b[pos] = r & 1 ? (unsigned char)alphabet[(r >> 1) % (sizeof alphabet - 1)]
                           : (unsigned char)(r >> 8);
        }
        moe__st_file *f = NULL;
        if (moe__st_open_mem(b, n, &f, err, sizeof err) == 0) {
            parsed++;
            float tmp[64];
            for (int i = 0; i < moe__st_count(f); i++) {
                const moe__st_tensor *t = moe__st_get(f, i);
                volatile unsigned char sink = 0;
                for (size_t k = 0; k < t->nbytes; k++) sink ^= ((const unsigned char *)t->data)[k];
                (void)sink;
                if (t->numel <= 64) moe__st_read_f32(t, tmp, t->numel);
            }
            moe__st_close(f);
        } else {
            CHECK(f == NULL && strstr(err, "<memory>"));
        }
        free(b);
    }
    long live = g_live;
    moe_set_allocator(NULL);
    CHECK_EQ_INT(live, 0);
    CHECK(parsed > 0); /* some mutations (e.g. in data) leave the file valid */
    free(orig);
    moe_test_rmdir(dir);
}
