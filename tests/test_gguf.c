/* GGUF reader/writer and Q8_0/Q4_0 quantization: round trips, real vocabulary
 * files, hand-crafted hostile files, error bounds and dot products. */
#include "io/gguf.h"
#include "io/quant.h"
#include "test.h"

#include <float.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

/* ---- helpers --------------------------------------------------------------- */

/* A growable byte buffer for hand-made files (test code: plain malloc). */
typedef struct buf {
    unsigned char *p;
    size_t len, cap;
} buf;

static void b_put(buf *b, const void *s, size_t n) {
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
    }
    if (n) memcpy(b->p + b->len, s, n);
    b->len += n;
}
static void b_u8(buf *b, uint8_t v) { b_put(b, &v, 1); }
static void b_u32(buf *b, uint32_t v) { b_put(b, &v, 4); }
static void b_u64(buf *b, uint64_t v) { b_put(b, &v, 8); }
static void b_strn(buf *b, const char *s, size_t n) {
    b_u64(b, n);
    b_put(b, s, n);
}
static void b_str(buf *b, const char *s) { b_strn(b, s, strlen(s)); }
static void b_pad(buf *b, size_t al) {
    while (b->len % al) b_u8(b, 0);
}
static void b_fill(buf *b, unsigned char c, size_t n) {
    while (n--) b_u8(b, c);
}
static void b_hdr(buf *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    b_put(b, "GGUF", 4);
    b_u32(b, version);
    b_u64(b, n_tensors);
    b_u64(b, n_kv);
}
/* A tensor info with up to 4 dims. */
static void b_tinfo(buf *b, const char *name, uint32_t nd, const uint64_t *ne, uint32_t type, uint64_t off) {
    b_str(b, name);
    b_u32(b, nd);
    for (uint32_t d = 0; d < nd; d++) b_u64(b, ne[d]);
    b_u32(b, type);
    b_u64(b, off);
}

static int write_bytes(const char *path, const void *p, size_t n) {
    FILE *fp = fopen(path, "wb");
    if (!fp) return -1;
    size_t w = n ? fwrite(p, 1, n, fp) : 0;
    return fclose(fp) == 0 && w == n ? 0 : -1;
}

/* Counts live allocations made through the library's hooks (leaks on error paths). */
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
static const moe_allocator k_counting = {count_alloc, count_free, NULL};

/* Parses the bytes from memory (and, when dir is set, from a file); both must
 * fail with code, a NULL handle and a message naming the source and holding
 * needle. */
static void expect_bad(const char *dir, const char *what, const buf *b, int code, const char *needle) {
    char path[256], err[512];
    for (int file = 0; file < (dir ? 2 : 1); file++) {
        if (file) {
            snprintf(path, sizeof path, "%s/bad.gguf", dir);
            CHECK_MSG(write_bytes(path, b->p, b->len) == 0, "%s: cannot write", what);
        }
        moe__gguf *g = (moe__gguf *)1;
        err[0] = '\0';
        int rc = file ? moe__gguf_open(path, &g, err, sizeof err) : moe__gguf_open_mem(b->p, b->len, &g, err, sizeof err);
        const char *label = file ? path : "<memory>";
        CHECK_MSG(rc == code, "%s: got %s, want %s [%s]", what, moe_err_name(rc), moe_err_name(code), err);
        if (rc == 0) {
            moe__gguf_close(g);
            if (file) unlink(path);
            continue;
        }
        CHECK_MSG(g == NULL, "%s: handle not NULL on error", what);
        CHECK_MSG(strncmp(err, label, strlen(label)) == 0, "%s: message does not start with the file: %s", what, err);
        if (needle) CHECK_MSG(strstr(err, needle) != NULL, "%s: \"%s\" not in: %s", what, needle, err);
        if (file) unlink(path);
    }
}

static float rnd_normal(moe__rng *r) { return (float)moe__rng_normal(r); }

/* ---- half precision -------------------------------------------------------- */

TEST(gguf_fp16_bf16_conversions) {
    /* Every half converts to float and back unchanged (NaNs stay NaN). */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = moe__gguf_fp16_to_f32((uint16_t)h);
        int nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        if (nan) {
            CHECK_MSG(f != f, "half 0x%04x should be NaN", h);
            CHECK_MSG((moe__gguf_f32_to_fp16(f) & 0x7e00) == 0x7e00, "NaN 0x%04x not kept", h);
        } else {
            CHECK_MSG(moe__gguf_f32_to_fp16(f) == h, "half 0x%04x -> %g -> 0x%04x", h, f, moe__gguf_f32_to_fp16(f));
        }
#if defined(__F16C__)
        float hw = _cvtsh_ss((unsigned short)h);
        uint32_t a, bb;
        memcpy(&a, &f, 4);
        memcpy(&bb, &hw, 4);
        CHECK_MSG(a == bb, "half 0x%04x: 0x%08x vs F16C 0x%08x", h, a, bb);
#endif
    }
    /* Rounding: ties to even, overflow to inf, into subnormals. */
    CHECK_EQ_INT(moe__gguf_f32_to_fp16(1.0f), 0x3c00);
    CHECK_EQ_INT(moe__gguf_f32_to_fp16(1.0f + 0x1p-11f), 0x3c00);           /* tie -> even */
    CHECK_EQ_INT(moe__gguf_f32_to_fp16(1.0f + 3 * 0x1p-11f), 0x3c02);       /* tie -> even (up) */
    CHECK_EQ_INT(moe__gguf_f32_to_fp16(65504.0f), 0x7bff);
    CHECK_EQ_INT(moe__gguf_f32_to_fp16(65519.99f), 0x7bff);
    CHECK_EQ_INT(moe__gguf_f32_to_fp16(65520.0f), 0x7c00);
    CHECK_EQ_INT(moe__gguf_f32_to_fp16(-1e30f), 0xfc00);
    CHECK_EQ_INT(moe__gguf_f32_to_fp16(0x1p-24f), 0x0001);
    CHECK_EQ_INT(moe__gguf_f32_to_fp16(0x1p-25f), 0x0000);                  /* tie -> even (zero) */
    CHECK_EQ_INT(moe__gguf_f32_to_fp16(0x1.8p-24f), 0x0002);                /* tie -> even (two) */
    CHECK_EQ_INT(moe__gguf_f32_to_fp16(-0.0f), 0x8000);
#if defined(__F16C__)
    /* Random float bit patterns against the hardware converter (round to nearest even). */
    moe__rng r;
    moe__rng_seed(&r, 7);
    for (int i = 0; i < 2000000; i++) {
        uint32_t u = (uint32_t)moe__rng_u64(&r);
        if (i & 1) u = (u & 0x8fffffffu) | 0x30000000u; /* bias toward the half range */
        float f;
        memcpy(&f, &u, 4);
        uint16_t mine = moe__gguf_f32_to_fp16(f), hw = (uint16_t)_cvtss_sh(f, 0);
        int both_nan = (mine & 0x7c00) == 0x7c00 && (mine & 0x3ff) && (hw & 0x7c00) == 0x7c00 && (hw & 0x3ff);
        if (!both_nan && mine != hw) {
            CHECK_MSG(0, "float 0x%08x: 0x%04x vs F16C 0x%04x", u, mine, hw);
            break;
        }
    }
#endif
    /* bfloat16: top 16 bits, round to nearest even. */
    CHECK_EQ_INT(moe__gguf_f32_to_bf16(1.0f), 0x3f80);
    CHECK(moe__gguf_bf16_to_f32(0x3f80) == 1.0f);
    CHECK_EQ_INT(moe__gguf_f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);            /* tie -> even */
    CHECK_EQ_INT(moe__gguf_f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);
    CHECK_EQ_INT(moe__gguf_f32_to_bf16(3.4e38f), 0x7f80);                   /* rounds up to inf */
    CHECK(moe__gguf_bf16_to_f32(moe__gguf_f32_to_bf16(NAN)) != moe__gguf_bf16_to_f32(moe__gguf_f32_to_bf16(NAN)));
    for (uint32_t h = 0; h < 65536; h++) {
        if ((h & 0x7f80) == 0x7f80 && (h & 0x7f)) continue;
        CHECK_MSG(moe__gguf_f32_to_bf16(moe__gguf_bf16_to_f32((uint16_t)h)) == h, "bf16 0x%04x", h);
    }
}

/* ---- round trip ------------------------------------------------------------ */

typedef struct rt_data {
    float f32[15];
    uint16_t f16[7], bf16[16];
    unsigned char q8[2 * 3 * 34], q4[4 * 18], q4k[144];
    float q8_src[64 * 3], q4_src[32 * 4];
} rt_data;

static void rt_fill(rt_data *d) {
    moe__rng r;
    moe__rng_seed(&r, 42);
    for (int i = 0; i < 15; i++) d->f32[i] = rnd_normal(&r);
    d->f32[3] = -0.0f;
    for (int i = 0; i < 7; i++) d->f16[i] = moe__gguf_f32_to_fp16(rnd_normal(&r));
    for (int i = 0; i < 16; i++) d->bf16[i] = moe__gguf_f32_to_bf16(rnd_normal(&r));
    for (int i = 0; i < 64 * 3; i++) d->q8_src[i] = rnd_normal(&r);
    for (int i = 0; i < 32 * 4; i++) d->q4_src[i] = rnd_normal(&r);
    CHECK(moe__gguf_quantize(MOE__GGML_Q8_0, d->q8_src, d->q8, 64 * 3) == 0);
    CHECK(moe__gguf_quantize(MOE__GGML_Q4_0, d->q4_src, d->q4, 32 * 4) == 0);
    for (int i = 0; i < 144; i++) d->q4k[i] = (unsigned char)(i * 7);
}

/* Adds one KV of every type, arrays of every element type and nested arrays. */
static void rt_add_kvs(moe__gguf_writer *w) {
    moe__gguf_writer_add_str(w, "general.architecture", "llama");
    moe__gguf_writer_add_u8(w, "t.u8", 255);
    moe__gguf_writer_add_i8(w, "t.i8", -128);
    moe__gguf_writer_add_u16(w, "t.u16", 65535);
    moe__gguf_writer_add_i16(w, "t.i16", -32768);
    moe__gguf_writer_add_u32(w, "t.u32", 4294967295u);
    moe__gguf_writer_add_i32(w, "t.i32", INT32_MIN);
    moe__gguf_writer_add_f32(w, "t.f32", 3.14159274f);
    moe__gguf_writer_add_bool(w, "t.bool", 1);
    moe__gguf_writer_add_bool(w, "t.false", 0);
    moe__gguf_writer_add_str(w, "t.str", "h\xc3\xa9llo world");
    moe__gguf_writer_add_str(w, "t.empty", "");
    moe__gguf_writer_add_u64(w, "t.u64", UINT64_MAX);
    moe__gguf_writer_add_i64(w, "t.i64", INT64_MIN);
    moe__gguf_writer_add_f64(w, "t.f64", 1e300);
    moe__gguf_value nul = {.type = MOE__GGUF_STRING, .str = {"a\0b", 3}};
    moe__gguf_writer_add(w, "t.nul", &nul);

    static const uint8_t au8[] = {0, 1, 255};
    static const int8_t ai8[] = {-128, 0, 127};
    static const uint16_t au16[] = {0, 65535};
    static const int16_t ai16[] = {-32768, 32767, -1};
    static const uint32_t au32[] = {1, 2, 4294967295u};
    static const int32_t ai32[] = {INT32_MIN, -1, 0, INT32_MAX};
    static const float af32[] = {0.5f, -2.0f, 1e-30f};
    static const uint8_t abool[] = {1, 0, 1, 1};
    static const uint64_t au64[] = {UINT64_MAX, 0};
    static const int64_t ai64[] = {INT64_MIN, INT64_MAX};
    static const double af64[] = {1e-300, -0.0};
    moe__gguf_writer_add_arr(w, "a.u8", MOE__GGUF_U8, au8, 3);
    moe__gguf_writer_add_arr(w, "a.i8", MOE__GGUF_I8, ai8, 3);
    moe__gguf_writer_add_arr(w, "a.u16", MOE__GGUF_U16, au16, 2);
    moe__gguf_writer_add_arr(w, "a.i16", MOE__GGUF_I16, ai16, 3);
    moe__gguf_writer_add_arr(w, "a.u32", MOE__GGUF_U32, au32, 3);
    moe__gguf_writer_add_arr(w, "a.i32", MOE__GGUF_I32, ai32, 4);
    moe__gguf_writer_add_arr(w, "a.f32", MOE__GGUF_F32, af32, 3);
    moe__gguf_writer_add_arr(w, "a.bool", MOE__GGUF_BOOL, abool, 4);
    moe__gguf_writer_add_arr(w, "a.u64", MOE__GGUF_U64, au64, 2);
    moe__gguf_writer_add_arr(w, "a.i64", MOE__GGUF_I64, ai64, 2);
    moe__gguf_writer_add_arr(w, "a.f64", MOE__GGUF_F64, af64, 2);
    moe__gguf_writer_add_arr(w, "a.empty", MOE__GGUF_U8, NULL, 0);
    const char *strs[] = {"<unk>", "", "\xe2\x96\x81the"};
    moe__gguf_writer_add_arr_str(w, "a.str", strs, 3);

    /* [[1, 2, 3], ["x", "yz"], [], [[7]]] */
    static const int32_t in1[] = {1, 2, 3}, in7[] = {7};
    static const moe__gguf_str in2[] = {{"x", 1}, {"yz", 2}};
    moe__gguf_value deep[1] = {{.type = MOE__GGUF_ARRAY, .arr = {MOE__GGUF_I32, 1, in7}}};
    moe__gguf_value kids[4] = {
        {.type = MOE__GGUF_ARRAY, .arr = {MOE__GGUF_I32, 3, in1}},
        {.type = MOE__GGUF_ARRAY, .arr = {MOE__GGUF_STRING, 2, in2}},
        {.type = MOE__GGUF_ARRAY, .arr = {MOE__GGUF_F64, 0, NULL}},
        {.type = MOE__GGUF_ARRAY, .arr = {MOE__GGUF_ARRAY, 1, deep}},
    };
    moe__gguf_value nested = {.type = MOE__GGUF_ARRAY, .arr = {MOE__GGUF_ARRAY, 4, kids}};
    moe__gguf_writer_add(w, "a.nested", &nested);
}

static void rt_add_tensors(moe__gguf_writer *w, const rt_data *d) {
    moe__gguf_writer_add_tensor(w, "f32", MOE__GGML_F32, 2, (const int64_t[]){5, 3}, d->f32, sizeof d->f32);
    moe__gguf_writer_add_tensor(w, "f16", MOE__GGML_F16, 1, (const int64_t[]){7}, d->f16, sizeof d->f16);
    moe__gguf_writer_add_tensor(w, "bf16", MOE__GGML_BF16, 3, (const int64_t[]){4, 2, 2}, d->bf16, sizeof d->bf16);
    moe__gguf_writer_add_tensor(w, "blk.0.ffn_up_exps.weight", MOE__GGML_Q8_0, 2, (const int64_t[]){64, 3}, d->q8,
                                sizeof d->q8);
    moe__gguf_writer_add_tensor(w, "q4", MOE__GGML_Q4_0, 4, (const int64_t[]){32, 2, 1, 2}, d->q4, sizeof d->q4);
    moe__gguf_writer_add_tensor(w, "q4k", 12 /* Q4_K */, 1, (const int64_t[]){256}, d->q4k, sizeof d->q4k);
    moe__gguf_writer_add_tensor(w, "empty", MOE__GGML_F32, 2, (const int64_t[]){0, 4}, NULL, 0);
}

static void rt_check_kvs(const moe__gguf *g) {
    char err[256];
    uint32_t u32 = 0;
    int32_t i32 = 0;
    uint64_t u64 = 0;
    int64_t i64 = 0;
    float f = 0;
    double dd = 0;
    int b = -1;
    const char *s = NULL;
    size_t len = 0;
    CHECK(moe__gguf_get_u32(g, "t.u8", &u32, err, sizeof err) == 0 && u32 == 255);
    CHECK(moe__gguf_get_i32(g, "t.i8", &i32, err, sizeof err) == 0 && i32 == -128);
    CHECK(moe__gguf_get_u32(g, "t.u16", &u32, err, sizeof err) == 0 && u32 == 65535);
    CHECK(moe__gguf_get_i32(g, "t.i16", &i32, err, sizeof err) == 0 && i32 == -32768);
    CHECK(moe__gguf_get_u32(g, "t.u32", &u32, err, sizeof err) == 0 && u32 == 4294967295u);
    CHECK(moe__gguf_get_i32(g, "t.i32", &i32, err, sizeof err) == 0 && i32 == INT32_MIN);
    CHECK(moe__gguf_get_f32(g, "t.f32", &f, err, sizeof err) == 0 && f == 3.14159274f);
    CHECK(moe__gguf_get_bool(g, "t.bool", &b, err, sizeof err) == 0 && b == 1);
    CHECK(moe__gguf_get_bool(g, "t.false", &b, err, sizeof err) == 0 && b == 0);
    CHECK(moe__gguf_get_str(g, "t.str", &s, &len, err, sizeof err) == 0 && !strcmp(s, "h\xc3\xa9llo world") && len == 12);
    CHECK(moe__gguf_get_str(g, "t.empty", &s, &len, err, sizeof err) == 0 && !strcmp(s, "") && len == 0);
    CHECK(moe__gguf_get_u64(g, "t.u64", &u64, err, sizeof err) == 0 && u64 == UINT64_MAX);
    CHECK(moe__gguf_get_i64(g, "t.i64", &i64, err, sizeof err) == 0 && i64 == INT64_MIN);
    CHECK(moe__gguf_get_f64(g, "t.f64", &dd, err, sizeof err) == 0 && dd == 1e300);
    CHECK(moe__gguf_get_str(g, "t.nul", &s, &len, err, sizeof err) == 0 && len == 3 && !memcmp(s, "a\0b", 4));
    /* Exact types as stored. */
    static const struct { const char *k; moe__gguf_vtype t; } types[] = {
        {"t.u8", MOE__GGUF_U8},   {"t.i8", MOE__GGUF_I8},   {"t.u16", MOE__GGUF_U16}, {"t.i16", MOE__GGUF_I16},
        {"t.u32", MOE__GGUF_U32}, {"t.i32", MOE__GGUF_I32}, {"t.f32", MOE__GGUF_F32}, {"t.bool", MOE__GGUF_BOOL},
        {"t.str", MOE__GGUF_STRING}, {"t.u64", MOE__GGUF_U64}, {"t.i64", MOE__GGUF_I64},
        {"t.f64", MOE__GGUF_F64}, {"a.u8", MOE__GGUF_ARRAY},
    };
    for (size_t i = 0; i < sizeof types / sizeof *types; i++) {
        const moe__gguf_value *v = moe__gguf_find(g, types[i].k);
        CHECK_MSG(v && v->type == types[i].t, "type of %s", types[i].k);
    }
    /* Getter type and range errors. */
    err[0] = '\0';
    CHECK_EQ_INT(moe__gguf_get_u32(g, "t.i8", &u32, err, sizeof err), MOE_EFORMAT);
    CHECK_MSG(strstr(err, "t.i8") && strstr(err, "does not fit u32"), "%s", err);
    CHECK_EQ_INT(moe__gguf_get_i32(g, "t.u32", &i32, err, sizeof err), MOE_EFORMAT);
    CHECK_EQ_INT(moe__gguf_get_u32(g, "t.u64", &u32, err, sizeof err), MOE_EFORMAT);
    CHECK_EQ_INT(moe__gguf_get_i64(g, "t.u64", &i64, err, sizeof err), MOE_EFORMAT);
    CHECK_EQ_INT(moe__gguf_get_str(g, "t.u32", &s, NULL, err, sizeof err), MOE_EFORMAT);
    CHECK_MSG(strstr(err, "is u32, expected string"), "%s", err);
    CHECK_EQ_INT(moe__gguf_get_u32(g, "t.f32", &u32, err, sizeof err), MOE_EFORMAT);
    CHECK_EQ_INT(moe__gguf_get_bool(g, "t.u8", &b, err, sizeof err), MOE_EFORMAT);
    CHECK_EQ_INT(moe__gguf_get_f32(g, "t.f64", &f, err, sizeof err), MOE_EFORMAT);
    CHECK_EQ_INT(moe__gguf_get_u32(g, "a.u8", &u32, err, sizeof err), MOE_EFORMAT);
    CHECK_MSG(strstr(err, "array of u8"), "%s", err);
    CHECK_EQ_INT(moe__gguf_get_u32(g, "no.such.key", &u32, err, sizeof err), MOE_ENOTFOUND);
    CHECK_MSG(strstr(err, "no.such.key") && strstr(err, "not found"), "%s", err);
    CHECK(moe__gguf_find(g, "no.such.key") == NULL);

    /* Arrays. */
    moe__gguf_vtype et;
    size_t n = 0;
    CHECK(moe__gguf_get_arr_info(g, "a.i16", &et, &n, err, sizeof err) == 0 && et == MOE__GGUF_I16 && n == 3);
    int32_t i32s[4];
    CHECK(moe__gguf_get_arr_i32(g, "a.i32", i32s, 4, err, sizeof err) == 0);
    CHECK(i32s[0] == INT32_MIN && i32s[1] == -1 && i32s[2] == 0 && i32s[3] == INT32_MAX);
    CHECK(moe__gguf_get_arr_i32(g, "a.i16", i32s, 3, err, sizeof err) == 0 && i32s[0] == -32768 && i32s[2] == -1);
    CHECK(moe__gguf_get_arr_i32(g, "a.u8", i32s, 3, err, sizeof err) == 0 && i32s[2] == 255);
    CHECK_EQ_INT(moe__gguf_get_arr_i32(g, "a.u32", i32s, 3, err, sizeof err), MOE_EFORMAT); /* 2^32-1 */
    CHECK_EQ_INT(moe__gguf_get_arr_i32(g, "a.i32", i32s, 3, err, sizeof err), MOE_ESHAPE);
    CHECK_EQ_INT(moe__gguf_get_arr_i32(g, "a.f32", i32s, 3, err, sizeof err), MOE_EFORMAT);
    int64_t i64s[2];
    CHECK(moe__gguf_get_arr_i64(g, "a.i64", i64s, 2, err, sizeof err) == 0 && i64s[0] == INT64_MIN && i64s[1] == INT64_MAX);
    CHECK_EQ_INT(moe__gguf_get_arr_i64(g, "a.u64", i64s, 2, err, sizeof err), MOE_EFORMAT);
    float fs[3];
    CHECK(moe__gguf_get_arr_f32(g, "a.f32", fs, 3, err, sizeof err) == 0 && fs[0] == 0.5f && fs[1] == -2.0f && fs[2] == 1e-30f);
    CHECK(moe__gguf_get_arr_f32(g, "a.f64", fs, 2, err, sizeof err) == 0 && fs[0] == (float)1e-300 && fs[1] == 0.0f);
    const moe__gguf_value *v = moe__gguf_find(g, "a.u16");
    moe__gguf_value e;
    CHECK(v && moe__gguf_arr_get(v, 1, &e) == 0 && e.type == MOE__GGUF_U16 && e.u == 65535);
    CHECK(moe__gguf_arr_get(v, 2, &e) == MOE_EINVAL);
    v = moe__gguf_find(g, "a.u64");
    CHECK(v && moe__gguf_arr_get(v, 0, &e) == 0 && e.u == UINT64_MAX);
    v = moe__gguf_find(g, "a.i8");
    CHECK(v && moe__gguf_arr_get(v, 0, &e) == 0 && e.type == MOE__GGUF_I8 && e.i == -128);
    v = moe__gguf_find(g, "a.bool");
    CHECK(v && v->arr.type == MOE__GGUF_BOOL && v->arr.n == 4 && moe__gguf_arr_get(v, 1, &e) == 0 && e.u == 0);
    v = moe__gguf_find(g, "a.f64");
    CHECK(v && moe__gguf_arr_get(v, 1, &e) == 0 && e.f == 0.0 && signbit(e.f));
    CHECK(moe__gguf_get_arr_info(g, "a.empty", &et, &n, err, sizeof err) == 0 && et == MOE__GGUF_U8 && n == 0);
    const moe__gguf_str *items = NULL;
    CHECK(moe__gguf_get_arr_str(g, "a.str", &items, &n, err, sizeof err) == 0 && n == 3);
    if (items && n == 3)
        CHECK(!strcmp(items[0].s, "<unk>") && items[1].len == 0 && !strcmp(items[2].s, "\xe2\x96\x81the"));
    CHECK_EQ_INT(moe__gguf_get_arr_str(g, "a.u8", &items, &n, err, sizeof err), MOE_EFORMAT);

    v = moe__gguf_find(g, "a.nested");
    CHECK(v && v->type == MOE__GGUF_ARRAY && v->arr.type == MOE__GGUF_ARRAY && v->arr.n == 4);
    if (v && v->arr.n == 4) {
        moe__gguf_value k0, k1, k2, k3, x;
        moe__gguf_arr_get(v, 0, &k0);
        moe__gguf_arr_get(v, 1, &k1);
        moe__gguf_arr_get(v, 2, &k2);
        moe__gguf_arr_get(v, 3, &k3);
        CHECK(k0.arr.type == MOE__GGUF_I32 && k0.arr.n == 3 && moe__gguf_arr_get(&k0, 2, &x) == 0 && x.i == 3);
        CHECK(k1.arr.type == MOE__GGUF_STRING && k1.arr.n == 2 && moe__gguf_arr_get(&k1, 1, &x) == 0 &&
              x.type == MOE__GGUF_STRING && !strcmp(x.str.s, "yz"));
        CHECK(k2.arr.type == MOE__GGUF_F64 && k2.arr.n == 0);
        CHECK(k3.arr.type == MOE__GGUF_ARRAY && k3.arr.n == 1 && moe__gguf_arr_get(&k3, 0, &x) == 0 &&
              x.arr.type == MOE__GGUF_I32 && x.arr.n == 1);
        moe__gguf_value y;
        CHECK(moe__gguf_arr_get(&x, 0, &y) == 0 && y.i == 7);
    }
}

static void rt_check_tensors(const moe__gguf *g, const rt_data *d, uint32_t align, size_t file_size) {
    CHECK_EQ_INT(moe__gguf_n_tensors(g), 7);
    CHECK_EQ_INT(moe__gguf_alignment(g), align);
    CHECK_EQ_INT(moe__gguf_data_offset(g) % align, 0);
    static const struct { const char *name; uint32_t type; int nd; int64_t ne[4]; size_t nbytes; } want[] = {
        {"f32", MOE__GGML_F32, 2, {5, 3, 1, 1}, 60},
        {"f16", MOE__GGML_F16, 1, {7, 1, 1, 1}, 14},
        {"bf16", MOE__GGML_BF16, 3, {4, 2, 2, 1}, 32},
        {"blk.0.ffn_up_exps.weight", MOE__GGML_Q8_0, 2, {64, 3, 1, 1}, 6 * 34},
        {"q4", MOE__GGML_Q4_0, 4, {32, 2, 1, 2}, 4 * 18},
        {"q4k", 12, 1, {256, 1, 1, 1}, 144},
        {"empty", MOE__GGML_F32, 2, {0, 4, 1, 1}, 0},
    };
    const void *src[] = {d->f32, d->f16, d->bf16, d->q8, d->q4, d->q4k, NULL};
    uint64_t off = 0;
    for (size_t i = 0; i < 7; i++) {
        const moe__gguf_tensor *t = moe__gguf_tensor_at(g, i);
        CHECK(t != NULL);
        if (!t) return;
        CHECK_MSG(!strcmp(t->name, want[i].name), "tensor %zu is %s", i, t->name);
        CHECK(moe__gguf_find_tensor(g, want[i].name) == t);
        CHECK_EQ_INT(t->type, want[i].type);
        CHECK_EQ_INT(t->n_dims, want[i].nd);
        for (int k = 0; k < 4; k++) CHECK_EQ_INT(t->ne[k], want[i].ne[k]);
        CHECK_EQ_INT(t->nbytes, want[i].nbytes);
        CHECK_EQ_INT(t->offset, off); /* cumulative, padded: what llama.cpp requires */
        CHECK_MSG((uintptr_t)t->data % align == 0, "tensor %s data not aligned to %u", t->name, align);
        if (src[i]) CHECK_MSG(memcmp(t->data, src[i], t->nbytes) == 0, "tensor %s data differs", t->name);
        off += (t->nbytes + align - 1) / align * align;
    }
    CHECK_EQ_INT(moe__gguf_data_offset(g) + off, file_size);
    CHECK(moe__gguf_find_tensor(g, "nope") == NULL);
    CHECK(moe__gguf_tensor_at(g, 7) == NULL);

    /* Conversion to float of every supported type. */
    char err[256];
    float buf_f[192], ref[192];
    const moe__gguf_tensor *t = moe__gguf_find_tensor(g, "f32");
    CHECK(t && moe__gguf_tensor_f32(g, t, buf_f, 15, err, sizeof err) == 0 && !memcmp(buf_f, d->f32, 60));
    t = moe__gguf_find_tensor(g, "f16");
    CHECK(t && moe__gguf_tensor_f32(g, t, buf_f, 7, err, sizeof err) == 0);
    for (int i = 0; i < 7; i++) CHECK(buf_f[i] == moe__gguf_fp16_to_f32(d->f16[i]));
    t = moe__gguf_find_tensor(g, "bf16");
    CHECK(t && moe__gguf_tensor_f32(g, t, buf_f, 16, err, sizeof err) == 0);
    for (int i = 0; i < 16; i++) CHECK(buf_f[i] == moe__gguf_bf16_to_f32(d->bf16[i]));
    t = moe__gguf_find_tensor(g, "blk.0.ffn_up_exps.weight");
    CHECK(t && moe__gguf_tensor_f32(g, t, buf_f, 192, err, sizeof err) == 0);
    CHECK(moe__gguf_dequantize(MOE__GGML_Q8_0, d->q8, ref, 192) == 0 && !memcmp(buf_f, ref, sizeof ref));
    for (int i = 0; i < 192; i++) CHECK_CLOSE(buf_f[i], d->q8_src[i], 0.05, 0.0);
    t = moe__gguf_find_tensor(g, "q4");
    CHECK(t && moe__gguf_tensor_f32(g, t, buf_f, 128, err, sizeof err) == 0);
    for (int i = 0; i < 128; i++) CHECK_CLOSE(buf_f[i], d->q4_src[i], 0.5, 0.0);
    CHECK_EQ_INT(moe__gguf_tensor_f32(g, t, buf_f, 127, err, sizeof err), MOE_ESHAPE);
    t = moe__gguf_find_tensor(g, "q4k");
    CHECK(t != NULL);
    float big[256], q4k_want[256];
    /* Q4_K has a converter now (the type table): the same values as it gives */
    CHECK_EQ_INT(moe__gguf_tensor_f32(g, t, big, 256, err, sizeof err), 0);
    CHECK(moe__gguf_dequantize(12, d->q4k, q4k_want, 256) == 0 && !memcmp(big, q4k_want, sizeof q4k_want));
}

TEST(gguf_roundtrip_every_kv_and_tensor_type) {
    char dirbuf[64], path[256], err[512] = "";
    const char *dir = moe_test_tmpdir(dirbuf, "gguf");
    CHECK(dir != NULL);
    if (!dir) return;
    static rt_data d;
    rt_fill(&d);
    for (int variant = 0; variant < 2; variant++) { /* default alignment, then 64 */
        uint32_t align = variant ? 64 : 32;
        snprintf(path, sizeof path, "%s/rt%d.gguf", dir, variant);
        moe__gguf_writer *w = NULL;
        CHECK(moe__gguf_writer_new(&w) == 0);
        if (!w) break;
        if (variant) moe__gguf_writer_add_u32(w, "general.alignment", 64);
        rt_add_kvs(w);
        rt_add_tensors(w, &d);
        CHECK_MSG(moe__gguf_writer_errmsg(w)[0] == '\0', "writer: %s", moe__gguf_writer_errmsg(w));
        int rc = moe__gguf_writer_write(w, path, err, sizeof err);
        CHECK_MSG(rc == 0, "write: %s", err);
        moe__gguf_writer_free(w);
        CHECK_EQ_INT(moe_test_count_entries(dir), variant + 1); /* no temporary left */

        struct stat st;
        CHECK(stat(path, &st) == 0);
        moe__gguf *g = NULL;
        rc = moe__gguf_open(path, &g, err, sizeof err);
        CHECK_MSG(rc == 0, "open: %s", err);
        if (rc) continue;
        CHECK_EQ_INT(moe__gguf_version(g), 3);
        CHECK_EQ_INT(moe__gguf_n_kv(g), 30 + variant);
        const char *k0 = NULL;
        CHECK(moe__gguf_kv_at(g, 0, &k0, NULL) == 0 && !strcmp(k0, variant ? "general.alignment" : "general.architecture"));
        CHECK(moe__gguf_kv_at(g, 99, &k0, NULL) == MOE_EINVAL);
        rt_check_kvs(g);
        rt_check_tensors(g, &d, align, (size_t)st.st_size);
        moe__gguf_close(g);

        /* The same bytes parse identically from memory. */
        FILE *fp = fopen(path, "rb");
        unsigned char *mem = malloc((size_t)st.st_size + 64);
        /* align the copy so the data pointers are aligned too */
        unsigned char *al = (unsigned char *)(((uintptr_t)mem + 63) & ~(uintptr_t)63);
        CHECK(fp && fread(al, 1, (size_t)st.st_size, fp) == (size_t)st.st_size);
        if (fp) fclose(fp);
        rc = moe__gguf_open_mem(al, (size_t)st.st_size, &g, err, sizeof err);
        CHECK_MSG(rc == 0, "open_mem: %s", err);
        if (!rc) {
            rt_check_kvs(g);
            rt_check_tensors(g, &d, align, (size_t)st.st_size);
            CHECK(!strcmp(moe__gguf_label(g), "<memory>"));
            moe__gguf_close(g);
        }
        free(mem);
    }
    moe_test_rmdir(dir);
}

/* ---- real files -------------------------------------------------------------- */

static const char *vocab_dir(void) {
    const char *d = getenv("MOE_GGUF_VOCAB_DIR");
    return d && *d ? d : "/work/shared/data";
}

/* Re-writes every KV of g through the writer and checks the copy reads back
 * with the same keys, types and values. */
static void copy_all_kvs(const moe__gguf *g, const char *dir) {
    char path[256], err[512] = "";
    snprintf(path, sizeof path, "%s/copy.gguf", dir);
    moe__gguf_writer *w = NULL;
    CHECK(moe__gguf_writer_new(&w) == 0);
    if (!w) return;
    for (size_t i = 0; i < moe__gguf_n_kv(g); i++) {
        const char *k;
        const moe__gguf_value *v;
        moe__gguf_kv_at(g, i, &k, &v);
        moe__gguf_writer_add(w, k, v);
    }
    int rc = moe__gguf_writer_write(w, path, err, sizeof err);
    CHECK_MSG(rc == 0, "copy write: %s", err);
    moe__gguf_writer_free(w);
    moe__gguf *c = NULL;
    rc = moe__gguf_open(path, &c, err, sizeof err);
    CHECK_MSG(rc == 0, "copy open: %s", err);
    if (rc) return;
    CHECK_EQ_INT(moe__gguf_n_kv(c), moe__gguf_n_kv(g));
    for (size_t i = 0; i < moe__gguf_n_kv(g) && i < moe__gguf_n_kv(c); i++) {
        const char *k1, *k2;
        const moe__gguf_value *a, *b;
        moe__gguf_kv_at(g, i, &k1, &a);
        moe__gguf_kv_at(c, i, &k2, &b);
        CHECK_MSG(!strcmp(k1, k2) && a->type == b->type, "kv %zu: %s vs %s", i, k1, k2);
        if (a->type != b->type) continue;
        if (a->type == MOE__GGUF_STRING) {
            CHECK(a->str.len == b->str.len && !memcmp(a->str.s, b->str.s, a->str.len));
        } else if (a->type == MOE__GGUF_ARRAY) {
            CHECK(a->arr.type == b->arr.type && a->arr.n == b->arr.n);
            if (a->arr.type != b->arr.type || a->arr.n != b->arr.n) continue;
            for (size_t j = 0; j < a->arr.n; j++) {
                moe__gguf_value x, y;
                moe__gguf_arr_get(a, j, &x);
                moe__gguf_arr_get(b, j, &y);
                int same = x.type == MOE__GGUF_STRING ? x.str.len == y.str.len && !memcmp(x.str.s, y.str.s, x.str.len)
                                                      : !memcmp(&x.u, &y.u, 8);
                if (!same) {
                    CHECK_MSG(0, "%s[%zu] differs", k1, j);
                    break;
                }
            }
        } else {
            CHECK_MSG(!memcmp(&a->u, &b->u, 8), "%s differs", k1);
        }
    }
    moe__gguf_close(c);
}

TEST(gguf_real_vocab_llama_spm) {
    char path[512], err[512] = "";
    snprintf(path, sizeof path, "%s/vocab-llama-spm.gguf", vocab_dir());
    if (access(path, R_OK) != 0) {
        moe_test_skip("vocab-llama-spm.gguf not found (set MOE_GGUF_VOCAB_DIR)");
        return;
    }
    moe__gguf *g = NULL;
    int rc = moe__gguf_open(path, &g, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc) return;
    const char *s = NULL;
    CHECK(moe__gguf_get_str(g, "tokenizer.ggml.model", &s, NULL, err, sizeof err) == 0 && !strcmp(s, "llama"));
    CHECK(moe__gguf_get_str(g, "general.architecture", &s, NULL, err, sizeof err) == 0 && !strcmp(s, "llama"));
    CHECK_EQ_INT(moe__gguf_version(g), 3);
    CHECK_EQ_INT(moe__gguf_n_tensors(g), 0);
    const moe__gguf_str *tok = NULL;
    size_t n = 0;
    CHECK(moe__gguf_get_arr_str(g, "tokenizer.ggml.tokens", &tok, &n, err, sizeof err) == 0);
    CHECK_EQ_INT(n, 32000);
    if (n == 32000) {
        CHECK(!strcmp(tok[0].s, "<unk>") && !strcmp(tok[1].s, "<s>") && !strcmp(tok[2].s, "</s>"));
        CHECK(!strcmp(tok[3].s, "<0x00>")); /* byte fallback pieces follow the specials */
    }
    float *scores = malloc(32000 * sizeof *scores);
    int32_t *types = malloc(32000 * sizeof *types);
    CHECK(moe__gguf_get_arr_f32(g, "tokenizer.ggml.scores", scores, 32000, err, sizeof err) == 0);
    CHECK(moe__gguf_get_arr_i32(g, "tokenizer.ggml.token_type", types, 32000, err, sizeof err) == 0);
    CHECK(types[0] == 2 && types[1] == 3 && types[2] == 3 && types[3] == 6); /* unknown, control, control, byte */
    free(scores);
    free(types);
    uint32_t bos = 0, eos = 0, vocab = 0;
    CHECK(moe__gguf_get_u32(g, "tokenizer.ggml.bos_token_id", &bos, err, sizeof err) == 0 && bos == 1);
    CHECK(moe__gguf_get_u32(g, "tokenizer.ggml.eos_token_id", &eos, err, sizeof err) == 0 && eos == 2);
    CHECK(moe__gguf_get_u32(g, "llama.vocab_size", &vocab, err, sizeof err) == 0 && vocab == 32000);
    int add_bos = 0;
    CHECK(moe__gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &add_bos, err, sizeof err) == 0 && add_bos == 1);
    float eps = 0;
    CHECK(moe__gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &eps, err, sizeof err) == 0 && eps == 1e-5f);
    char dirbuf[64];
    const char *dir = moe_test_tmpdir(dirbuf, "gguf");
    if (dir) {
        copy_all_kvs(g, dir);
        moe_test_rmdir(dir);
    }
    moe__gguf_close(g);
}

TEST(gguf_real_vocab_gpt2) {
    char path[512], err[512] = "";
    snprintf(path, sizeof path, "%s/vocab-gpt-2.gguf", vocab_dir());
    if (access(path, R_OK) != 0) {
        moe_test_skip("vocab-gpt-2.gguf not found (set MOE_GGUF_VOCAB_DIR)");
        return;
    }
    moe__gguf *g = NULL;
    int rc = moe__gguf_open(path, &g, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc) return;
    const char *s = NULL;
    CHECK(moe__gguf_get_str(g, "tokenizer.ggml.model", &s, NULL, err, sizeof err) == 0 && !strcmp(s, "gpt2"));
    const moe__gguf_str *tok = NULL, *merges = NULL;
    size_t n = 0, nm = 0;
    CHECK(moe__gguf_get_arr_str(g, "tokenizer.ggml.tokens", &tok, &n, err, sizeof err) == 0 && n == 50257);
    CHECK(moe__gguf_get_arr_str(g, "tokenizer.ggml.merges", &merges, &nm, err, sizeof err) == 0 && nm == 50000);
    if (n == 50257) CHECK(!strcmp(tok[0].s, "!") && !strcmp(tok[50256].s, "<|endoftext|>"));
    if (nm == 50000) CHECK(!strcmp(merges[0].s, "\xc4\xa0 t")); /* "Ġ t" */
    uint32_t eos = 0;
    CHECK(moe__gguf_get_u32(g, "tokenizer.ggml.eos_token_id", &eos, err, sizeof err) == 0 && eos == 50256);
    char dirbuf[64];
    const char *dir = moe_test_tmpdir(dirbuf, "gguf");
    if (dir) {
        copy_all_kvs(g, dir);
        moe_test_rmdir(dir);
    }
    moe__gguf_close(g);
}

/* ---- hostile input ----------------------------------------------------------- */

/* A small valid file: a few KVs (string, array of strings, nested array) and
 * three tensors; *need is the length every valid prefix must reach. */
static void small_valid(buf *b, size_t *need) {
    b_hdr(b, 3, 3, 4);
    b_str(b, "general.architecture");
    b_u32(b, MOE__GGUF_STRING);
    b_str(b, "llama");
    b_str(b, "tok");
    b_u32(b, MOE__GGUF_ARRAY);
    b_u32(b, MOE__GGUF_STRING);
    b_u64(b, 2);
    b_str(b, "a");
    b_str(b, "bc");
    b_str(b, "nest");
    b_u32(b, MOE__GGUF_ARRAY);
    b_u32(b, MOE__GGUF_ARRAY);
    b_u64(b, 1);
    b_u32(b, MOE__GGUF_F32);
    b_u64(b, 2);
    b_put(b, (float[]){1.0f, 2.0f}, 8);
    b_str(b, "flag");
    b_u32(b, MOE__GGUF_BOOL);
    b_u8(b, 1);
    b_tinfo(b, "a", 2, (const uint64_t[]){32, 2}, MOE__GGML_Q8_0, 0);           /* 68 bytes -> 96 */
    b_tinfo(b, "b", 1, (const uint64_t[]){3}, MOE__GGML_F16, 96);               /* 6 bytes -> 32 */
    b_tinfo(b, "c", 1, (const uint64_t[]){8}, MOE__GGML_F32, 128);              /* 32 bytes */
    b_pad(b, 32);
    b_fill(b, 0x11, 68);
    b_pad(b, 32);
    b_fill(b, 0x22, 6);
    b_pad(b, 32);
    b_fill(b, 0x33, 32);
    *need = b->len;
}

TEST(gguf_hostile_truncated_prefixes) {
    buf b = {0};
    size_t need;
    small_valid(&b, &need);
    char err[512];
    moe_set_allocator(&k_counting);
    g_live = 0;
    moe__gguf *g = NULL;
    int rc = moe__gguf_open_mem(b.p, b.len, &g, err, sizeof err);
    CHECK_MSG(rc == 0, "valid file rejected: %s", err);
    if (!rc) {
        CHECK_EQ_INT(moe__gguf_n_tensors(g), 3);
        moe__gguf_close(g);
    }
    /* Every prefix is an error (no crash, no leak), named and described. */
    int n_format = 0;
    for (size_t len = 0; len < need; len++) {
        /* a fresh heap copy of exactly len bytes, so ASan sees any over-read */
        unsigned char *p = malloc(len ? len : 1);
        memcpy(p, b.p, len);
        g = (moe__gguf *)1;
        err[0] = '\0';
        rc = moe__gguf_open_mem(p, len, &g, err, sizeof err);
        CHECK_MSG(rc == MOE_EFORMAT, "prefix %zu: %s [%s]", len, moe_err_name(rc), err);
        CHECK_MSG(g == NULL, "prefix %zu: handle set", len);
        CHECK_MSG(!strncmp(err, "<memory>: ", 10) && strlen(err) > 20, "prefix %zu: message %s", len, err);
        n_format += rc == MOE_EFORMAT;
        free(p);
        if (rc == 0) moe__gguf_close(g);
    }
    CHECK_EQ_INT(n_format, need);
    CHECK_MSG(g_live == 0, "%ld allocations leaked on error paths", g_live);
    moe_set_allocator(NULL);

    /* The same through files, for a sample of prefixes. */
    char dirbuf[64], path[256];
    const char *dir = moe_test_tmpdir(dirbuf, "gguf");
    CHECK(dir != NULL);
    if (dir) {
        snprintf(path, sizeof path, "%s/t.gguf", dir);
        for (size_t len = 0; len < need; len += 13) {
            CHECK(write_bytes(path, b.p, len) == 0);
            g = NULL;
            rc = moe__gguf_open(path, &g, err, sizeof err);
            CHECK_MSG(rc == MOE_EFORMAT && g == NULL && strstr(err, path), "file prefix %zu: %s", len, err);
        }
        /* Some messages, spot-checked. */
        CHECK(write_bytes(path, b.p, 2) == 0);
        moe__gguf_open(path, &g, err, sizeof err);
        CHECK_MSG(strstr(err, "too short for the GGUF magic"), "%s", err);
        CHECK(write_bytes(path, b.p, 20) == 0);
        moe__gguf_open(path, &g, err, sizeof err);
        CHECK_MSG(strstr(err, "metadata_kv_count") && strstr(err, "truncated"), "%s", err);
        CHECK(write_bytes(path, b.p, need - 1) == 0);
        moe__gguf_open(path, &g, err, sizeof err);
        CHECK_MSG(strstr(err, "tensor \"c\"") && strstr(err, "outside the data section"), "%s", err);
        /* Not a regular file / missing. */
        CHECK_EQ_INT(moe__gguf_open(dir, &g, err, sizeof err), MOE_EIO);
        CHECK_EQ_INT(moe__gguf_open("/nonexistent/x.gguf", &g, err, sizeof err), MOE_EIO);
        CHECK_MSG(strstr(err, "/nonexistent/x.gguf"), "%s", err);
        moe_test_rmdir(dir);
    }
    free(b.p);
}

/* One-KV file: key, type, then the value bytes from v. */
static void one_kv(buf *b, const char *key, uint32_t type, const void *v, size_t vlen) {
    b_hdr(b, 3, 0, 1);
    b_str(b, key);
    b_u32(b, type);
    b_put(b, v, vlen);
}

/* One-tensor file with 64 bytes of data after the header padding. */
static void one_tensor(buf *b, const char *name, uint32_t nd, const uint64_t *ne, uint32_t type, uint64_t off) {
    b_hdr(b, 3, 1, 0);
    b_tinfo(b, name, nd, ne, type, off);
    b_pad(b, 32);
    b_fill(b, 0x5a, 64);
}

TEST(gguf_hostile_fields) {
    char dirbuf[64];
    const char *dir = moe_test_tmpdir(dirbuf, "gguf");
    CHECK(dir != NULL);
    buf b = {0};
#define RESET() (b.len = 0)

    /* magic and version */
    RESET(); b_put(&b, "GGUG", 4); b_u32(&b, 3); b_u64(&b, 0); b_u64(&b, 0);
    expect_bad(dir, "bad magic", &b, MOE_EFORMAT, "bad magic");
    RESET(); b_hdr(&b, 0, 0, 0);
    expect_bad(NULL, "version 0", &b, MOE_EFORMAT, "version 0");
    RESET(); b_hdr(&b, 1, 0, 0);
    expect_bad(NULL, "version 1", &b, MOE_EUNSUPPORTED, "version 1");
    RESET(); b_hdr(&b, 4, 0, 0);
    expect_bad(NULL, "version 4", &b, MOE_EUNSUPPORTED, "version 4");
    RESET(); b_hdr(&b, 0x03000000u, 0, 0);
    expect_bad(NULL, "big-endian", &b, MOE_EUNSUPPORTED, "big-endian");
    RESET(); b_hdr(&b, 2, 0, 0);
    expect_bad(NULL, "version 2 is fine", &b, 0, NULL);

    /* counts */
    RESET(); b_hdr(&b, 3, UINT64_MAX, 0);
    expect_bad(dir, "tensor_count 2^64-1", &b, MOE_ELIMIT, "tensor_count 18446744073709551615 exceeds the limit of 1048576");
    RESET(); b_hdr(&b, 3, (1u << 20) + 1, 0);
    expect_bad(NULL, "tensor_count 2^20+1", &b, MOE_ELIMIT, "tensor_count");
    RESET(); b_hdr(&b, 3, 0, (uint64_t)1 << 62);
    expect_bad(NULL, "kv_count 2^62", &b, MOE_ELIMIT, "metadata_kv_count");
    RESET(); b_hdr(&b, 3, 1000, 0); b_fill(&b, 0, 100);
    expect_bad(NULL, "tensor_count beyond file", &b, MOE_EFORMAT, "only 100 are left");
    RESET(); b_hdr(&b, 3, 0, 1u << 20);
    expect_bad(NULL, "kv_count beyond file", &b, MOE_EFORMAT, "metadata_kv_count 1048576");

    /* keys */
    RESET(); b_hdr(&b, 3, 0, 1); b_u64(&b, UINT64_MAX); b_fill(&b, 0, 16);
    expect_bad(dir, "key length 2^64-1", &b, MOE_ELIMIT, "kv[0]: key length 18446744073709551615");
    RESET(); b_hdr(&b, 3, 0, 1); b_u64(&b, 70000); b_fill(&b, 'k', 70000); b_u32(&b, 0); b_u8(&b, 0);
    expect_bad(NULL, "key longer than 65535", &b, MOE_ELIMIT, "limit of 65535");
    RESET(); b_hdr(&b, 3, 0, 1); b_u64(&b, 100); b_put(&b, "abc", 3); b_fill(&b, 0, 10);
    expect_bad(NULL, "key past end", &b, MOE_EFORMAT, "key length 100");
    RESET(); b_hdr(&b, 3, 0, 1); b_strn(&b, "a\0b", 3); b_u32(&b, 0); b_u8(&b, 0);
    expect_bad(NULL, "NUL in key", &b, MOE_EFORMAT, "NUL");
    RESET(); b_hdr(&b, 3, 0, 2); b_str(&b, "k"); b_u32(&b, 0); b_u8(&b, 1); b_str(&b, "k"); b_u32(&b, 4); b_u32(&b, 2);
    expect_bad(dir, "duplicate key", &b, MOE_EFORMAT, "duplicate metadata key \"k\"");

    /* values */
    RESET(); one_kv(&b, "x.type", 13, "\0\0\0\0", 4);
    expect_bad(NULL, "value type 13", &b, MOE_EFORMAT, "kv[0] \"x.type\": unknown value type 13");
    RESET(); one_kv(&b, "x.u64", MOE__GGUF_U64, "\1\2\3\4", 4);
    expect_bad(NULL, "truncated u64", &b, MOE_EFORMAT, "x.u64");
    RESET(); one_kv(&b, "x.bool", MOE__GGUF_BOOL, "\2", 1);
    expect_bad(NULL, "bool 2", &b, MOE_EFORMAT, "not 0 or 1");
    {
        uint64_t huge = (uint64_t)1 << 62;
        RESET(); one_kv(&b, "x.s", MOE__GGUF_STRING, &huge, 8);
        expect_bad(dir, "string 2^62", &b, MOE_ELIMIT, "kv[0] \"x.s\": string length 4611686018427387904");
        uint64_t past = 1000;
        RESET(); one_kv(&b, "x.s", MOE__GGUF_STRING, &past, 8); b_fill(&b, 'x', 999);
        expect_bad(NULL, "string past end", &b, MOE_EFORMAT, "exceeds the 999 bytes left");
    }
    {
        unsigned char arr[12];
        uint32_t et = MOE__GGUF_U32;
        uint64_t n = (uint64_t)1 << 61;
        memcpy(arr, &et, 4);
        memcpy(arr + 4, &n, 8);
        RESET(); one_kv(&b, "x.a", MOE__GGUF_ARRAY, arr, 12); b_fill(&b, 0, 64);
        expect_bad(dir, "array 2^61 u32", &b, MOE_EFORMAT, "array of 2305843009213693952 u32 elements");
        n = UINT64_MAX;
        et = MOE__GGUF_STRING;
        memcpy(arr, &et, 4);
        memcpy(arr + 4, &n, 8);
        RESET(); one_kv(&b, "x.a", MOE__GGUF_ARRAY, arr, 12);
        expect_bad(NULL, "array 2^64-1 strings", &b, MOE_EFORMAT, "x.a");
        et = 99;
        memcpy(arr, &et, 4);
        RESET(); one_kv(&b, "x.a", MOE__GGUF_ARRAY, arr, 12);
        expect_bad(NULL, "array element type 99", &b, MOE_EFORMAT, "unknown array element type 99");
        et = MOE__GGUF_BOOL;
        n = 3;
        memcpy(arr, &et, 4);
        memcpy(arr + 4, &n, 8);
        RESET(); one_kv(&b, "x.a", MOE__GGUF_ARRAY, arr, 12); b_put(&b, "\1\0\7", 3);
        expect_bad(NULL, "bool array element 7", &b, MOE_EFORMAT, "bool element 2 is 7");
        /* string array whose second element runs past the end */
        et = MOE__GGUF_STRING;
        n = 2;
        memcpy(arr, &et, 4);
        memcpy(arr + 4, &n, 8);
        RESET(); one_kv(&b, "x.a", MOE__GGUF_ARRAY, arr, 12); b_str(&b, "ok"); b_u64(&b, 50); b_fill(&b, 'z', 9);
        expect_bad(NULL, "string element past end", &b, MOE_EFORMAT, "string element 1 length 50");
    }
    /* nesting: 8 levels parse, 9 do not */
    for (int depth = 8; depth <= 9; depth++) {
        RESET(); b_hdr(&b, 3, 0, 1); b_str(&b, "deep"); b_u32(&b, MOE__GGUF_ARRAY);
        for (int i = 0; i < depth - 1; i++) {
            b_u32(&b, MOE__GGUF_ARRAY);
            b_u64(&b, 1);
        }
        b_u32(&b, MOE__GGUF_U8);
        b_u64(&b, 1);
        b_u8(&b, 9);
        if (depth == 8) expect_bad(NULL, "8 nested arrays", &b, 0, NULL);
        else expect_bad(NULL, "9 nested arrays", &b, MOE_ELIMIT, "nested deeper than the limit of 8");
    }

    /* alignment */
    {
        uint64_t a64 = 64;
        RESET(); one_kv(&b, "general.alignment", MOE__GGUF_U64, &a64, 8);
        expect_bad(NULL, "alignment u64", &b, MOE_EFORMAT, "general.alignment\": is u64, must be u32");
        uint32_t a = 48;
        RESET(); one_kv(&b, "general.alignment", MOE__GGUF_U32, &a, 4);
        expect_bad(NULL, "alignment 48", &b, MOE_EFORMAT, "48 is not a power of two");
        a = 0;
        RESET(); one_kv(&b, "general.alignment", MOE__GGUF_U32, &a, 4);
        expect_bad(NULL, "alignment 0", &b, MOE_EFORMAT, "0 is not a power of two");
        a = 1u << 20;
        RESET(); one_kv(&b, "general.alignment", MOE__GGUF_U32, &a, 4);
        expect_bad(NULL, "alignment 2^20", &b, MOE_ELIMIT, "exceeds the limit of 65536");
        /* alignment 8: an offset of 8 is fine then */
        a = 8;
        RESET(); b_hdr(&b, 3, 1, 1); b_str(&b, "general.alignment"); b_u32(&b, MOE__GGUF_U32); b_u32(&b, a);
        b_tinfo(&b, "t", 1, (const uint64_t[]){2}, MOE__GGML_F32, 8); b_pad(&b, 8); b_fill(&b, 0, 16);
        expect_bad(NULL, "alignment 8", &b, 0, NULL);
    }

    /* tensor infos */
    RESET(); one_tensor(&b, "w", 1, (const uint64_t[]){8}, MOE__GGML_F32, 0);
    expect_bad(dir, "valid one-tensor file", &b, 0, NULL);
    RESET(); one_tensor(&b, "0123456789012345678901234567890123456789012345678901234567890123", 1,
                        (const uint64_t[]){8}, MOE__GGML_F32, 0);
    expect_bad(NULL, "name of 64 bytes", &b, MOE_ELIMIT, "tensor_info[0]: name length 64");
    RESET(); b_hdr(&b, 3, 1, 0); b_strn(&b, "w\0x", 3); b_u32(&b, 1); b_u64(&b, 8); b_u32(&b, 0); b_u64(&b, 0);
    b_pad(&b, 32); b_fill(&b, 0, 32);
    expect_bad(NULL, "NUL in name", &b, MOE_EFORMAT, "name contains a NUL byte");
    RESET(); one_tensor(&b, "w", 5, (const uint64_t[]){1, 1, 1, 1, 1}, MOE__GGML_F32, 0);
    expect_bad(dir, "n_dims 5", &b, MOE_ELIMIT, "tensor \"w\": n_dims 5 exceeds the limit of 4");
    RESET(); one_tensor(&b, "w", 2, (const uint64_t[]){(uint64_t)1 << 62, (uint64_t)1 << 62}, MOE__GGML_F32, 0);
    expect_bad(dir, "dims product overflow", &b, MOE_ELIMIT, "overflows");
    RESET(); one_tensor(&b, "w", 1, (const uint64_t[]){(uint64_t)1 << 63}, MOE__GGML_F32, 0);
    expect_bad(NULL, "ne 2^63", &b, MOE_ELIMIT, "ne[0] = 9223372036854775808");
    RESET(); one_tensor(&b, "w", 1, (const uint64_t[]){(uint64_t)1 << 62}, MOE__GGML_F32, 0);
    expect_bad(NULL, "bytes overflow", &b, MOE_ELIMIT, "overflow the byte count");
    RESET(); one_tensor(&b, "w", 2, (const uint64_t[]){0, (uint64_t)1 << 62}, MOE__GGML_F32, 0);
    expect_bad(NULL, "zero dim makes huge dims harmless", &b, 0, NULL);
    RESET(); one_tensor(&b, "w", 1, (const uint64_t[]){32}, 4 /* removed Q4_2 */, 0);
    expect_bad(NULL, "ggml type 4", &b, MOE_EUNSUPPORTED, "unknown ggml type 4");
    RESET(); one_tensor(&b, "w", 1, (const uint64_t[]){32}, 1000, 0);
    expect_bad(NULL, "ggml type 1000", &b, MOE_EUNSUPPORTED, "unknown ggml type 1000");
    RESET(); one_tensor(&b, "w", 1, (const uint64_t[]){48}, MOE__GGML_Q8_0, 0);
    expect_bad(dir, "ne[0] not a multiple of 32", &b, MOE_EFORMAT, "not a multiple of the Q8_0 block size 32");
    RESET(); one_tensor(&b, "w", 1, (const uint64_t[]){4}, MOE__GGML_F32, 4);
    expect_bad(dir, "misaligned offset", &b, MOE_EFORMAT, "offset 4 is not a multiple of the alignment 32");
    RESET(); one_tensor(&b, "w", 1, (const uint64_t[]){4}, MOE__GGML_F32, (uint64_t)1 << 63);
    expect_bad(NULL, "offset 2^63", &b, MOE_EFORMAT, "outside the data section of 64 bytes");
    RESET(); one_tensor(&b, "w", 1, (const uint64_t[]){4}, MOE__GGML_F32, UINT64_MAX - 31);
    expect_bad(NULL, "offset 2^64-32 (offset + size wraps)", &b, MOE_EFORMAT, "outside the data section");
    RESET(); one_tensor(&b, "w", 1, (const uint64_t[]){8}, MOE__GGML_F32, 64);
    expect_bad(NULL, "offset at the end, nonempty", &b, MOE_EFORMAT, "outside the data section");
    RESET(); one_tensor(&b, "w", 1, (const uint64_t[]){17}, MOE__GGML_F32, 0);
    expect_bad(dir, "data one float too long", &b, MOE_EFORMAT, "tensor \"w\": data of 68 bytes at offset 0 lies");
    RESET(); one_tensor(&b, "w", 1, (const uint64_t[]){0}, MOE__GGML_F32, 64);
    expect_bad(NULL, "empty tensor at the end", &b, 0, NULL);
    RESET(); b_hdr(&b, 3, 1, 0); b_tinfo(&b, "w", 1, (const uint64_t[]){8}, MOE__GGML_F32, 0);
    expect_bad(NULL, "no data section", &b, MOE_EFORMAT, "past the end of the file");
    RESET(); b_hdr(&b, 3, 2, 0);
    b_tinfo(&b, "w", 1, (const uint64_t[]){8}, MOE__GGML_F32, 0);
    b_tinfo(&b, "w", 1, (const uint64_t[]){8}, MOE__GGML_F32, 32);
    b_pad(&b, 32); b_fill(&b, 0, 64);
    expect_bad(dir, "duplicate tensor names", &b, MOE_EFORMAT, "duplicate tensor name \"w\"");
    RESET(); b_hdr(&b, 3, 2, 0);
    b_tinfo(&b, "a", 1, (const uint64_t[]){16}, MOE__GGML_F32, 0);
    b_tinfo(&b, "b", 1, (const uint64_t[]){8}, MOE__GGML_F32, 32);
    b_pad(&b, 32); b_fill(&b, 0, 64);
    expect_bad(dir, "overlapping tensors", &b, MOE_EFORMAT, "overlaps tensor \"a\"");
    RESET(); b_hdr(&b, 3, 2, 0);
    b_tinfo(&b, "a", 1, (const uint64_t[]){8}, MOE__GGML_F32, 32);
    b_tinfo(&b, "b", 1, (const uint64_t[]){8}, MOE__GGML_F32, 0);
    b_pad(&b, 32); b_fill(&b, 0, 64);
    expect_bad(NULL, "out-of-order tensors (allowed)", &b, 0, NULL);
#undef RESET
    free(b.p);
    if (dir) moe_test_rmdir(dir);
}

/* Random bytes, and random single-byte corruptions of a valid file: never a
 * crash, a handle only on success, a message on failure. */
TEST(gguf_hostile_random_corruption) {
    buf b = {0};
    size_t need;
    small_valid(&b, &need);
    moe__rng r;
    moe__rng_seed(&r, 99);
    unsigned char *p = malloc(b.len);
    char err[512];
    int n_ok = 0, n_err = 0;
    for (int it = 0; it < 20000; it++) {
        memcpy(p, b.p, b.len);
        int flips = 1 + (int)(moe__rng_u64(&r) % 3);
        for (int k = 0; k < flips; k++) {
            size_t at = (size_t)(moe__rng_u64(&r) % need);
            uint64_t kind = moe__rng_u64(&r) % 4;
            p[at] = kind == 0 ? 0xff : kind == 1 ? 0 : kind == 2 ? (unsigned char)(p[at] ^ (1u << (moe__rng_u64(&r) % 8)))
                                                               : (unsigned char)moe__rng_u64(&r);
        }
        moe__gguf *g = NULL;
        err[0] = '\0';
        int rc = moe__gguf_open_mem(p, b.len, &g, err, sizeof err);
        if (rc == 0) {
            n_ok++;
            CHECK(g != NULL);
            /* whatever parsed must be self-consistent */
            for (size_t i = 0; i < moe__gguf_n_tensors(g); i++) {
                const moe__gguf_tensor *t = moe__gguf_tensor_at(g, i);
                CHECK((const unsigned char *)t->data >= p && (const unsigned char *)t->data + t->nbytes <= p + b.len);
            }
            moe__gguf_close(g);
        } else {
            n_err++;
            CHECK(g == NULL);
            CHECK(rc == MOE_EFORMAT || rc == MOE_ELIMIT || rc == MOE_EUNSUPPORTED);
            CHECK_MSG(!strncmp(err, "<memory>: ", 10) && strlen(err) > 20, "rc %d, message %s", rc, err);
        }
    }
    CHECK(n_err > 1000);
    printf("    20000 corrupted files: %d parsed, %d rejected\n", n_ok, n_err);
    free(p);
    free(b.p);
}

/* ---- writer errors ----------------------------------------------------------- */

TEST(gguf_writer_rejects_bad_input) {
    char dirbuf[64], path[256], err[512];
    const char *dir = moe_test_tmpdir(dirbuf, "gguf");
    CHECK(dir != NULL);
    if (!dir) return;
    snprintf(path, sizeof path, "%s/w.gguf", dir);
    float data[64] = {0};
    static const struct { const char *what; int code; const char *needle; } cases[] = {
        {"long name", MOE_ELIMIT, "name of 64 bytes"},
        {"bad nbytes", MOE_EINVAL, "needs 256"},
        {"ne[0] not a block multiple", MOE_EINVAL, "not a multiple"},
        {"n_dims 5", MOE_EINVAL, "n_dims 5"},
        {"negative ne", MOE_EINVAL, "negative"},
        {"unknown type", MOE_EINVAL, "unknown ggml type"},
        {"NULL data", MOE_EINVAL, "data is NULL"},
        {"alignment 48", MOE_EINVAL, "power of two"},
        {"alignment as u64", MOE_EINVAL, "must be u32"},
        {"u8 value 300", MOE_EINVAL, "does not fit u8"},
        {"bool array element 2", MOE_EINVAL, "bool element 1"},
        {"string array as add_arr", MOE_EINVAL, "fixed-size"},
        {"too deep", MOE_ELIMIT, "nested deeper"},
        {"duplicate key", MOE_EINVAL, "duplicate metadata key \"k\""},
        {"duplicate tensor", MOE_EINVAL, "duplicate tensor name \"t\""},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        moe__gguf_writer *w = NULL;
        CHECK(moe__gguf_writer_new(&w) == 0);
        if (!w) break;
        int rc = 0;
        moe__gguf_value v = {0};
        moe__gguf_value chain[10];
        switch (c) {
        case 0: rc = moe__gguf_writer_add_tensor(w, "0123456789012345678901234567890123456789012345678901234567890123",
                                                 MOE__GGML_F32, 1, (const int64_t[]){4}, data, 16); break;
        case 1: rc = moe__gguf_writer_add_tensor(w, "t", MOE__GGML_F32, 1, (const int64_t[]){64}, data, 255); break;
        case 2: rc = moe__gguf_writer_add_tensor(w, "t", MOE__GGML_Q4_0, 1, (const int64_t[]){48}, data, 27); break;
        case 3: rc = moe__gguf_writer_add_tensor(w, "t", MOE__GGML_F32, 5, (const int64_t[]){1, 1, 1, 1, 1}, data, 4); break;
        case 4: rc = moe__gguf_writer_add_tensor(w, "t", MOE__GGML_F32, 2, (const int64_t[]){4, -1}, data, 16); break;
        case 5: rc = moe__gguf_writer_add_tensor(w, "t", 31, 1, (const int64_t[]){4}, data, 16); break;
        case 6: rc = moe__gguf_writer_add_tensor(w, "t", MOE__GGML_F32, 1, (const int64_t[]){4}, NULL, 16); break;
        case 7: rc = moe__gguf_writer_add_u32(w, "general.alignment", 48); break;
        case 8: rc = moe__gguf_writer_add_u64(w, "general.alignment", 64); break;
        case 9: v.type = MOE__GGUF_U8; v.u = 300; rc = moe__gguf_writer_add(w, "k", &v); break;
        case 10: rc = moe__gguf_writer_add_arr(w, "k", MOE__GGUF_BOOL, (const uint8_t[]){1, 2}, 2); break;
        case 11: rc = moe__gguf_writer_add_arr(w, "k", MOE__GGUF_STRING, data, 1); break;
        case 12:
            /* 9 nested arrays: chain[0] holds chain[1] ... chain[8] holds u8s */
            for (int i = 0; i < 9; i++) {
                chain[i].type = MOE__GGUF_ARRAY;
                chain[i].arr.type = i < 8 ? MOE__GGUF_ARRAY : MOE__GGUF_U8;
                chain[i].arr.n = 1;
                chain[i].arr.data = i < 8 ? (const void *)&chain[i + 1] : (const void *)"x";
            }
            rc = moe__gguf_writer_add(w, "k", &chain[0]);
            break;
        case 13:
            moe__gguf_writer_add_u32(w, "k", 1);
            rc = moe__gguf_writer_add_u32(w, "k", 2); /* found at write */
            break;
        case 14:
            moe__gguf_writer_add_tensor(w, "t", MOE__GGML_F32, 1, (const int64_t[]){4}, data, 16);
            rc = moe__gguf_writer_add_tensor(w, "t", MOE__GGML_F32, 1, (const int64_t[]){4}, data, 16);
            break;
        }
        if (c < 13) {
            CHECK_MSG(rc == cases[c].code, "%s: add gave %s", cases[c].what, moe_err_name(rc));
            /* sticky: later adds are refused with the same code */
            CHECK_MSG(moe__gguf_writer_add_u32(w, "later", 1) == cases[c].code, "%s: not sticky", cases[c].what);
        } else {
            CHECK_MSG(rc == 0, "%s: add gave %s", cases[c].what, moe_err_name(rc));
        }
        /* an existing file at path stays untouched */
        CHECK(write_bytes(path, "old", 3) == 0);
        err[0] = '\0';
        rc = moe__gguf_writer_write(w, path, err, sizeof err);
        CHECK_MSG(rc == cases[c].code, "%s: write gave %s [%s]", cases[c].what, moe_err_name(rc), err);
        CHECK_MSG(strstr(err, path) && strstr(err, cases[c].needle), "%s: message %s", cases[c].what, err);
        struct stat st;
        CHECK(stat(path, &st) == 0 && st.st_size == 3);
        moe__gguf_writer_free(w);
    }
    CHECK_EQ_INT(moe_test_count_entries(dir), 1);

    /* I/O failure: a missing directory. */
    moe__gguf_writer *w = NULL;
    CHECK(moe__gguf_writer_new(&w) == 0);
    moe__gguf_writer_add_str(w, "general.architecture", "x");
    snprintf(path, sizeof path, "%s/missing/w.gguf", dir);
    CHECK_EQ_INT(moe__gguf_writer_write(w, path, err, sizeof err), MOE_EIO);
    CHECK_MSG(strstr(err, path), "%s", err);
    moe__gguf_writer_free(w);

    /* An empty writer produces a valid empty file. */
    CHECK(moe__gguf_writer_new(&w) == 0);
    snprintf(path, sizeof path, "%s/empty.gguf", dir);
    CHECK(moe__gguf_writer_write(w, path, err, sizeof err) == 0);
    moe__gguf_writer_free(w);
    moe__gguf *g = NULL;
    CHECK(moe__gguf_open(path, &g, err, sizeof err) == 0);
    CHECK(moe__gguf_n_kv(g) == 0 && moe__gguf_n_tensors(g) == 0);
    moe__gguf_close(g);
    moe_test_rmdir(dir);
}

/* ---- quantization ------------------------------------------------------------ */

TEST(gguf_quant_golden_blocks) {
    /* x_j = j - 16: Q8_0 d = 16/127 and codes round(x / d); Q4_0 takes the
     * first largest magnitude (-16), d = 2, codes trunc(x/2 + 8.5) clamped to 15. */
    float x[32];
    for (int j = 0; j < 32; j++) x[j] = (float)(j - 16);
    moe__gguf_block_q8_0 q8;
    moe__gguf_block_q4_0 q4;
    CHECK(moe__gguf_quantize_q8_0(x, &q8, 32) == 0);
    CHECK_EQ_INT(q8.d, 0x3008); /* fp16(16/127) = 0.1259765625 */
    for (int j = 0; j < 32; j++) {
        if (j == 8 || j == 24) continue; /* exact ties in real arithmetic: see below */
        double t = (j - 16) * 127.0 / 16.0;
        int want = (int)(t < 0 ? -floor(-t + 0.5) : floor(t + 0.5));
        CHECK_MSG(q8.qs[j] == want, "q8 code %d: %d vs %d", j, q8.qs[j], want);
    }
    /* Ties round half away from zero (roundf), not to even: with amax = 127
     * the scale is exactly 1. */
    float t8[32] = {127.0f, 2.5f, -2.5f, 0.5f, -0.5f, 1.5f, -126.5f};
    CHECK(moe__gguf_quantize_q8_0(t8, &q8, 32) == 0);
    CHECK_EQ_INT(q8.d, 0x3c00);
    CHECK(q8.qs[0] == 127 && q8.qs[1] == 3 && q8.qs[2] == -3 && q8.qs[3] == 1 && q8.qs[4] == -1 &&
          q8.qs[5] == 2 && q8.qs[6] == -127 && q8.qs[7] == 0);
    CHECK(moe__gguf_quantize_q4_0(x, &q4, 32) == 0);
    CHECK_EQ_INT(q4.d, 0x4000); /* 2.0 */
    for (int j = 0; j < 16; j++) {
        int lo = q4.qs[j] & 15, hi = q4.qs[j] >> 4;
        int want_lo = (j + 1) / 2, want_hi = (j + 16 + 1) / 2 > 15 ? 15 : (j + 16 + 1) / 2;
        CHECK_MSG(lo == want_lo && hi == want_hi, "q4 byte %d: %d,%d vs %d,%d", j, lo, hi, want_lo, want_hi);
    }
    float y[32];
    CHECK(moe__gguf_dequantize(MOE__GGML_Q4_0, &q4, y, 32) == 0);
    CHECK(y[0] == -16.0f && y[1] == -14.0f && y[31] == 14.0f); /* 15 clamps to code 15 = 14 */
    /* A block of zeros, and a block whose largest magnitude is positive. */
    float z[32] = {0};
    CHECK(moe__gguf_quantize_q8_0(z, &q8, 32) == 0 && q8.d == 0);
    /* d = 0 / -8 is -0 (stored 0x8000, as llama.cpp does); every code is 8 */
    CHECK(moe__gguf_quantize_q4_0(z, &q4, 32) == 0 && (q4.d & 0x7fff) == 0 && q4.qs[0] == 0x88);
    z[5] = 3.0f;
    CHECK(moe__gguf_quantize_q4_0(z, &q4, 32) == 0);
    CHECK(moe__gguf_dequantize(MOE__GGML_Q4_0, &q4, y, 32) == 0 && y[5] == 3.0f && y[0] == 0.0f);
    /* Non-finite inputs are reported, stored as zero and kept out of the scale. */
    z[7] = NAN;
    z[9] = -INFINITY;
    CHECK_EQ_INT(moe__gguf_quantize_q8_0(z, &q8, 32), MOE_ENONFINITE);
    CHECK(q8.qs[7] == 0 && q8.qs[9] == 0 && q8.qs[5] == 127);
    CHECK_EQ_INT(moe__gguf_quantize_q4_0(z, &q4, 32), MOE_ENONFINITE);
    CHECK(moe__gguf_dequantize(MOE__GGML_Q4_0, &q4, y, 32) == 0 && y[7] == 0.0f && y[9] == 0.0f && y[5] == 3.0f);
    /* Scales beyond fp16. */
    z[7] = 1e9f;
    z[9] = 0.0f;
    CHECK_EQ_INT(moe__gguf_quantize_q8_0(z, &q8, 32), MOE_ELIMIT);
    CHECK_EQ_INT(moe__gguf_quantize_q4_0(z, &q4, 32), MOE_ELIMIT);
    /* Argument errors. */
    CHECK_EQ_INT(moe__gguf_quantize(MOE__GGML_Q8_0, x, &q8, 31), MOE_EINVAL);
    CHECK_EQ_INT(moe__gguf_dequantize(MOE__GGML_Q4_0, &q4, y, 16), MOE_EINVAL);
    CHECK_EQ_INT(moe__gguf_quantize(12 /* Q4_K */, x, &q8, 256), MOE_EUNSUPPORTED);
    CHECK_EQ_INT(moe__gguf_dequantize(13 /* Q5_K: no converter */, &q8, y, 256), MOE_EUNSUPPORTED);
    CHECK_EQ_INT(moe__gguf_row_size(MOE__GGML_Q8_0, 64), 68);
    CHECK_EQ_INT(moe__gguf_row_size(MOE__GGML_Q4_0, 64), 36);
    CHECK_EQ_INT(moe__gguf_row_size(MOE__GGML_Q4_0, 65), 0);
    CHECK_EQ_INT(moe__gguf_row_size(14 /* Q6_K */, 256), 210);
    CHECK(!strcmp(moe__gguf_type_name(30), "BF16") && !strcmp(moe__gguf_type_name(4), "?"));
}

/* Random blocks at several scales (and with outliers): the codes are the
 * nearest to x / d for the float d the reference uses, so the error against
 * the stored fp16 scale is at most d/2 plus |q| times the scale's rounding. */
TEST(gguf_quant_q8_0_q4_0_error_bounds) {
    enum { NB = 4096, N = NB * 32 };
    float *x = malloc(N * sizeof *x), *y = malloc(N * sizeof *y), *y2 = malloc(N * sizeof *y2);
    unsigned char *q8 = malloc(NB * 34), *q4 = malloc(NB * 18);
    moe__rng r;
    moe__rng_seed(&r, 1234);
    for (int i = 0; i < N; i++) {
        /* 1e-2 .. 1e3 by block: scales stay normal fp16 numbers (tiny blocks get
         * subnormal scales and coarser steps, as in llama.cpp) */
        double scale = pow(10.0, (double)((i / 32) % 6) - 2);
        x[i] = (float)(moe__rng_normal(&r) * scale);
        if (moe__rng_u64(&r) % 97 == 0) x[i] *= 20.0f; /* outliers */
    }
    CHECK(moe__gguf_quantize(MOE__GGML_Q8_0, x, q8, N) == 0);
    CHECK(moe__gguf_quantize(MOE__GGML_Q4_0, x, q4, N) == 0);
    CHECK(moe__gguf_dequantize(MOE__GGML_Q8_0, q8, y, N) == 0);
    CHECK(moe__gguf_dequantize(MOE__GGML_Q4_0, q4, y2, N) == 0);
    double worst8 = 0, worst4 = 0, worst4_clamp = 0, se8 = 0, se4 = 0, sx = 0;
    int clamped = 0;
    for (int b = 0; b < NB; b++) {
        const float *xb = x + b * 32;
        float amax = 0, max = 0;
        for (int j = 0; j < 32; j++)
            if (fabsf(xb[j]) > amax) amax = fabsf(xb[j]), max = xb[j];
        /* Q8_0 */
        double d = amax / 127.0f, d16 = moe__gguf_fp16_to_f32((uint16_t)(q8[b * 34] | q8[b * 34 + 1] << 8));
        for (int j = 0; j < 32; j++) {
            int q = ((const int8_t *)(q8 + b * 34 + 2))[j];
            double e = fabs((double)xb[j] - y[b * 32 + j]);
            double bound = d / 2 + fabs(q * (d16 - d)) + 1e-4 * d;
            CHECK_MSG(e <= bound, "q8 block %d elem %d: err %g > %g", b, j, e, bound);
            CHECK_MSG(fabs(xb[j] / d - q) <= 0.5 + 1e-4, "q8 block %d elem %d: code %d for %g", b, j, q, xb[j] / d);
            worst8 = fmax(worst8, e / d16);
            se8 += e * e;
            sx += (double)xb[j] * xb[j];
        }
        /* Q4_0: d = max / -8 (signed); code 15 may clamp by one step */
        double d4 = max / -8.0f, d416 = moe__gguf_fp16_to_f32((uint16_t)(q4[b * 18] | q4[b * 18 + 1] << 8));
        for (int j = 0; j < 32; j++) {
            unsigned char byte = q4[b * 18 + 2 + (j & 15)];
            int q = (j < 16 ? byte & 15 : byte >> 4) - 8;
            double e = fabs((double)xb[j] - y2[b * 32 + j]);
            double slack = fabs(q * (d416 - d4)) + 1e-4 * fabs(d4);
            if (q == 7) {
                CHECK_MSG(e <= fabs(d4) + slack, "q4 block %d elem %d: clamped err %g", b, j, e);
                if (e > fabs(d4) / 2 + slack) clamped++, worst4_clamp = fmax(worst4_clamp, e / fabs(d416));
                else worst4 = fmax(worst4, e / fabs(d416));
            } else {
                CHECK_MSG(e <= fabs(d4) / 2 + slack, "q4 block %d elem %d: err %g > %g", b, j, e, fabs(d4) / 2 + slack);
                worst4 = fmax(worst4, e / fabs(d416));
            }
            se4 += e * e;
        }
        /* the element of largest magnitude comes back as -8 d16 */
        for (int j = 0; j < 32; j++)
            if (xb[j] == max) CHECK_CLOSE(y2[b * 32 + j], max, fabs(d4) * 8 * 0x1p-11, 0);
    }
    printf("    Q8_0: max |err|/d %.4f, rel RMS err %.3e | Q4_0: max |err|/|d| %.4f (unclamped), "
           "%.4f at code 15 (%d elems), rel RMS err %.3e\n",
           worst8, sqrt(se8 / sx), worst4, worst4_clamp, clamped, sqrt(se4 / sx));
    CHECK(worst8 < 0.57 && worst4 < 0.51);
    free(x);
    free(y);
    free(y2);
    free(q8);
    free(q4);
}

TEST(gguf_quant_f16_bf16_f32_rows) {
    float x[64], y[64];
    uint16_t h[64];
    moe__rng r;
    moe__rng_seed(&r, 5);
    for (int i = 0; i < 64; i++) x[i] = rnd_normal(&r) * 100.0f;
    CHECK(moe__gguf_quantize(MOE__GGML_F16, x, h, 64) == 0);
    CHECK(moe__gguf_dequantize(MOE__GGML_F16, h, y, 64) == 0);
    for (int i = 0; i < 64; i++) CHECK_CLOSE(y[i], x[i], 0, 0x1p-11);
    /* unaligned source (odd address) */
    unsigned char raw[2 * 64 + 1];
    memcpy(raw + 1, h, sizeof h);
    float y2[64];
    CHECK(moe__gguf_dequantize(MOE__GGML_F16, raw + 1, y2, 63) == 0 && !memcmp(y, y2, 63 * sizeof(float)));
    CHECK(moe__gguf_quantize(MOE__GGML_BF16, x, h, 64) == 0);
    CHECK(moe__gguf_dequantize(MOE__GGML_BF16, h, y, 64) == 0);
    for (int i = 0; i < 64; i++) CHECK_CLOSE(y[i], x[i], 0, 0x1p-8);
    CHECK(moe__gguf_quantize(MOE__GGML_F32, x, y, 64) == 0 && !memcmp(x, y, sizeof x));
    x[3] = 1e6f;
    CHECK_EQ_INT(moe__gguf_quantize(MOE__GGML_F16, x, h, 64), MOE_ELIMIT);
    CHECK_EQ_INT(h[3], 0x7c00);
    x[3] = NAN;
    CHECK_EQ_INT(moe__gguf_quantize(MOE__GGML_BF16, x, h, 64), MOE_ENONFINITE);
    CHECK_EQ_INT(moe__gguf_quantize(MOE__GGML_F32, x, y, 64), MOE_ENONFINITE);
}

/* Sum of |x_i y_i| over the dequantized values, and the dot in double. */
static void dot_ref(uint32_t wt, const void *w, const void *yq, size_t n, double *dot, double *mag) {
    float *a = malloc(n * sizeof *a), *b = malloc(n * sizeof *b);
    moe__gguf_dequantize(wt, w, a, n);
    moe__gguf_dequantize(MOE__GGML_Q8_0, yq, b, n);
    *dot = 0;
    *mag = 0;
    for (size_t i = 0; i < n; i++) {
        *dot += (double)a[i] * b[i];
        *mag += fabs((double)a[i] * b[i]);
    }
    free(a);
    free(b);
}

TEST(gguf_quant_vec_dot_vs_double) {
    static const size_t sizes[] = {32, 64, 96, 224, 1024, 4096, 14336};
    moe__rng r;
    moe__rng_seed(&r, 77);
    double worst_rel = 0, worst_simd = 0, qerr8 = 0, qerr4 = 0;
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        size_t n = sizes[s], nb = n / 32;
        float *w = malloc(n * sizeof *w), *x = malloc(n * sizeof *x);
        unsigned char *w8 = malloc(nb * 34), *w4 = malloc(nb * 18), *x8 = malloc(nb * 34);
        for (int rep = 0; rep < 4; rep++) {
            double exact = 0, wn = 0, xn = 0;
            for (size_t i = 0; i < n; i++) {
                w[i] = rnd_normal(&r) * 0.02f;
                x[i] = rnd_normal(&r) * (rep == 3 ? 1000.0f : 1.0f);
                exact += (double)w[i] * x[i];
                wn += (double)w[i] * w[i];
                xn += (double)x[i] * x[i];
            }
            CHECK(moe__gguf_quantize_q8_0(w, w8, n) == 0);
            CHECK(moe__gguf_quantize_q4_0(w, w4, n) == 0);
            CHECK(moe__gguf_quantize_q8_0(x, x8, n) == 0);
            for (int kind = 0; kind < 2; kind++) {
                const void *wq = kind ? (const void *)w4 : (const void *)w8;
                uint32_t wt = kind ? MOE__GGML_Q4_0 : MOE__GGML_Q8_0;
                double ref, mag;
                dot_ref(wt, wq, x8, n, &ref, &mag);
                float fast = kind ? moe__gguf_vec_dot_q4_0_q8_0(n, wq, x8) : moe__gguf_vec_dot_q8_0_q8_0(n, wq, x8);
                float slow = kind ? moe__gguf_vec_dot_q4_0_q8_0_ref(n, wq, x8) : moe__gguf_vec_dot_q8_0_q8_0_ref(n, wq, x8);
                /* fp32 accumulation over nb blocks (plus the d_x*d_y product) */
                double tol = (double)(nb + 8) * FLT_EPSILON * mag + 1e-30;
                CHECK_MSG(fabs(slow - ref) <= tol, "n %zu kind %d: scalar %.9g vs double %.9g", n, kind, slow, ref);
                CHECK_MSG(fabs(fast - ref) <= tol, "n %zu kind %d: simd %.9g vs double %.9g", n, kind, fast, ref);
                CHECK_MSG(fabs(fast - slow) <= tol, "n %zu kind %d: simd %.9g vs scalar %.9g", n, kind, fast, slow);
                worst_rel = fmax(worst_rel, fabs(slow - ref) / mag);
                worst_simd = fmax(worst_simd, fabs(fast - slow) / mag);
                /* quantization error of the whole dot, against the float inputs */
                double qe = fabs(ref - exact) / sqrt(wn * xn);
                if (kind) qerr4 = fmax(qerr4, qe);
                else qerr8 = fmax(qerr8, qe);
            }
        }
        free(w);
        free(x);
        free(w8);
        free(w4);
        free(x8);
    }
    /* Hostile codes (-128 is never produced by the quantizer): SIMD == scalar. */
    unsigned char a[34 * 4], c[34 * 4];
    for (int b = 0; b < 4; b++) {
        a[34 * b] = 0x00, a[34 * b + 1] = 0x3c; /* d = 1 */
        c[34 * b] = 0x00, c[34 * b + 1] = 0x38; /* d = 0.5 */
        for (int j = 0; j < 32; j++) a[34 * b + 2 + j] = c[34 * b + 2 + j] = 0x80;
    }
    CHECK(moe__gguf_vec_dot_q8_0_q8_0(128, a, c) == 128.0f * 128 * 128 * 0.5f);
    CHECK(moe__gguf_vec_dot_q8_0_q8_0_ref(128, a, c) == 128.0f * 128 * 128 * 0.5f);
    unsigned char q4b[18 * 4];
    for (int b = 0; b < 4; b++) {
        q4b[18 * b] = 0x00, q4b[18 * b + 1] = 0x3c;
        for (int j = 0; j < 16; j++) q4b[18 * b + 2 + j] = 0x0f; /* low 15 (+7), high 0 (-8) */
    }
    float want = 4 * (16 * 7 * -128 + 16 * -8 * -128) * 0.5f;
    CHECK(moe__gguf_vec_dot_q4_0_q8_0(128, q4b, c) == want);
    CHECK(moe__gguf_vec_dot_q4_0_q8_0_ref(128, q4b, c) == want);
    printf("    vec_dot (%s): max |scalar - double| / sum|terms| %.2e, |simd - scalar| %.2e; "
           "dot quantization error / (|w||x|): Q8_0xQ8_0 %.2e, Q4_0xQ8_0 %.2e\n",
           moe__gguf_vec_dot_impl(), worst_rel, worst_simd, qerr8, qerr4);
}

/* The type table is the one place that says what the library can do with a
 * ggml type: every row the engine computes with converts both ways and
 * round-trips within its precision; every other row is refused by the
 * converters by name (MOE_EUNSUPPORTED, never a wrong conversion); the
 * engine's list of supported types is read from the table. */
TEST(gguf_type_table_is_the_one_source) {
    char names[128];
    moe__gguf_loadable_type_names(names, sizeof names);
    CHECK_MSG(!strcmp(names, "F32, F16, Q4_0, Q8_0, Q4_K, Q6_K, BF16"), "%s", names);
    float x[64], y[64];
    unsigned char tb[64 * 4];
    for (int i = 0; i < 64; i++) x[i] = sinf(0.37f * (float)i) * (1.0f + (float)(i % 5));
    int n_engine = 0, n_named = 0;
    for (uint32_t type = 0; type < 64; type++) {
        const moe__gguf_type_info *t = moe__gguf_type_info_of(type);
        if (!t) {
            CHECK_EQ_INT(moe__gguf_dequantize(type, tb, y, 32), MOE_EUNSUPPORTED);
            continue;
        }
        n_named++;
        CHECK_MSG(t->blck > 0 && t->size > 0 && !strcmp(moe__gguf_type_name(type), t->name), "type %u", type);
        if (t->engine == MOE__TYPE_ENGINE_NONE) {
            if (!t->to_float) CHECK_EQ_INT(moe__gguf_dequantize(type, tb, y, t->blck), MOE_EUNSUPPORTED);
            if (!t->from_float) CHECK_EQ_INT(moe__gguf_quantize(type, x, tb, t->blck), MOE_EUNSUPPORTED);
            continue;
        }
        n_engine++;
        CHECK_MSG(t->to_float && t->from_float && 64 % t->blck == 0 && moe__gguf_row_size(type, 64) <= sizeof tb,
                  "%s", t->name);
        CHECK_EQ_INT(moe__gguf_quantize(type, x, tb, 64), 0);
        CHECK_EQ_INT(moe__gguf_dequantize(type, tb, y, 64), 0);
        /* |x| <= 6. The coarsest row, Q4_0: codes -8..7 of d = max / -8, so a value
         * at the other end clips by up to one step, amax / 8; halves: 2^-8 relative */
        const float tol = t->engine == MOE__TYPE_ENGINE_QUANT ? 6.0f / 8 * 1.0001f : 6.0f / 256;
        float worst = 0;
        for (int i = 0; i < 64; i++) worst = fmaxf(worst, fabsf(y[i] - x[i]));
        CHECK_MSG(worst <= tol, "%s: round trip error %g", t->name, (double)worst);
    }
    CHECK_EQ_INT(n_engine, 5);
    CHECK(n_named > 30); /* every published type is known by size, computable or not */
}

/* Q6_K to float (shared/docs/quant-types.md): element e of a 210-byte block
 * is q = low4 | high2 << 4 with h = e / 128, r = e % 128, g = r / 32,
 * l = r % 32, low4 from ql[64h + 32 (g & 1) + l] (low nibble for g < 2),
 * high2 = (qh[32h + l] >> 2g) & 3; x = d * scales[e / 16] * (q - 32). This
 * reference follows that description element by element; the library's
 * converter follows llama.cpp's loop. Equal bit for bit, and within half an
 * ulp of the exact double product. */
static float q6k_ref(const unsigned char *blk, int e, double *exact, double *bound) {
    const int h = e / 128, r = e % 128, g = r / 32, l = r % 32;
    const unsigned char lb = blk[64 * h + 32 * (g & 1) + l];
    const int low4 = g < 2 ? lb & 15 : lb >> 4, high2 = (blk[128 + 32 * h + l] >> (2 * g)) & 3;
    const int q = (low4 | high2 << 4) - 32;
    const int8_t sc = (int8_t)blk[192 + e / 16];
    const float d = moe__gguf_fp16_to_f32((uint16_t)(blk[208] | blk[209] << 8));
    *exact = (double)d * sc * q;
    *bound = fabs(*exact) * 0x1p-24; /* d * scale is exact in float (11 + 8 bits); the product with q rounds once */
    return d * (float)sc * (float)q;
}

/* Blocks of a K-quant type: the library's converter against an element
 * reference, bit for bit and within the reference's bound of the exact
 * value; the mismatches (the first three reported). */
typedef float (*k_ref_fn)(const unsigned char *blk, int e, double *exact, double *bound);
static int k_mismatches(uint32_t type, const unsigned char *blk, int nblk, k_ref_fn ref) {
    const size_t bs = moe__gguf_type_info_of(type)->size;
    float *y = malloc(sizeof(float) * 256 * (size_t)nblk);
    int bad = 0;
    CHECK(y && moe__gguf_dequantize(type, blk, y, 256 * (size_t)nblk) == 0);
    for (int b = 0; y && b < nblk; b++)
        for (int e = 0; e < 256; e++) {
            double exact, bound;
            const float r = ref(blk + bs * b, e, &exact, &bound), v = y[256 * b + e];
            if ((memcmp(&r, &v, sizeof v) || fabs((double)v - exact) > bound) && bad++ < 3)
                CHECK_MSG(0, "%s block %d [%d] = %.9g, reference %.9g, exact %.17g", moe__gguf_type_name(type), b, e,
                          (double)v, (double)r, exact);
        }
    free(y);
    return bad;
}

TEST(gguf_q6_k_dequantizes_as_the_reference_formula) {
    const moe__gguf_type_info *t = moe__gguf_type_info_of(14);
    CHECK(t && !strcmp(t->name, "Q6_K") && t->blck == 256 && t->size == 210 && t->to_float);
    unsigned char blk[4 * 210];
    float y[4 * 256];
    uint64_t s = 777;
    for (size_t i = 0; i < sizeof blk; i++) s = s * 6364136223846793005ULL + 1442695040888963407ULL, blk[i] = (unsigned char)(s >> 56);
    const uint16_t ds[4] = {0x3c00, 0x1234, 0x0001 /* subnormal */, 0x7bff /* 65504 */};
    for (int b = 0; b < 4; b++) blk[210 * b + 208] = (unsigned char)ds[b], blk[210 * b + 209] = (unsigned char)(ds[b] >> 8);
    CHECK_EQ_INT(k_mismatches(14, blk, 4, q6k_ref), 0);
    /* hand-made blocks: all zero; every code at its maximum (63 -> +31) with
     * scale 127; every code 0 (-> -32) with scale -128; d = 1 */
    unsigned char z[210] = {0};
    CHECK_EQ_INT(moe__gguf_dequantize(14, z, y, 256), 0);
    for (int e = 0; e < 256; e++) CHECK_MSG(y[e] == 0, "zero [%d] = %g", e, (double)y[e]);
    unsigned char hi[210], lo[210];
    memset(hi, 0xff, 192), memset(hi + 192, 127, 16), hi[208] = 0x00, hi[209] = 0x3c;
    memset(lo, 0x00, 192), memset(lo + 192, 0x80, 16), lo[208] = 0x00, lo[209] = 0x3c;
    CHECK_EQ_INT(moe__gguf_dequantize(14, hi, y, 256), 0);
    for (int e = 0; e < 256; e++) CHECK_MSG(y[e] == 127.0f * 31.0f, "max [%d] = %g", e, (double)y[e]);
    CHECK_EQ_INT(moe__gguf_dequantize(14, lo, y, 256), 0);
    for (int e = 0; e < 256; e++) CHECK_MSG(y[e] == 4096.0f, "min [%d] = %g", e, (double)y[e]);
    /* rows that are not whole super-blocks; no encoder and no engine kernel yet */
    CHECK_EQ_INT(moe__gguf_dequantize(14, blk, y, 255), MOE_EINVAL);
    CHECK_EQ_INT(moe__gguf_quantize(14, y, blk, 256), MOE_EUNSUPPORTED);
    CHECK(t->engine == MOE__TYPE_ENGINE_NONE);
}

/* Q4_K to float (shared/docs/quant-types.md): element e of a 144-byte block
 * is q = nibble of qs[32 (e / 64) + e % 32] (low for e % 64 < 32), in
 * sub-block s = e / 32 with the 6-bit scale and min of get_scale_min_k4, and
 * x = (d * sc) * q - dmin * mn, two roundings (the volatile keeps this file's
 * FMA contraction out of the reference). Equal bit for bit to the library's
 * loop, within an ulp-scale bound of the exact double value. */
static float q4k_ref(const unsigned char *blk, int e, double *exact, double *bound) {
    const unsigned char *k = blk + 4, *qs = blk + 16;
    const int s = e / 32, c = e / 64, w = e % 64;
    const int q = w < 32 ? qs[32 * c + w % 32] & 15 : qs[32 * c + w % 32] >> 4;
    const int sc = s < 4 ? k[s] & 63 : (k[s + 4] & 15) | (k[s - 4] >> 6) << 4;
    const int mn = s < 4 ? k[s + 4] & 63 : (k[s + 4] >> 4) | (k[s] >> 6) << 4;
    const float d = moe__gguf_fp16_to_f32((uint16_t)(blk[0] | blk[1] << 8));
    const float dmin = moe__gguf_fp16_to_f32((uint16_t)(blk[2] | blk[3] << 8));
    *exact = (double)d * sc * q - (double)dmin * mn;
    volatile float a = d * (float)sc * (float)q, m = dmin * (float)mn;
    const float r = a - m;
    *bound = (fabs(*exact) + fabs((double)r)) * 0x1p-23 + 1e-40; /* d * sc, dmin * mn exact; two roundings after */
    return r;
}

TEST(gguf_q4_k_dequantizes_as_the_reference_formula) {
    const moe__gguf_type_info *t = moe__gguf_type_info_of(12);
    CHECK(t && !strcmp(t->name, "Q4_K") && t->blck == 256 && t->size == 144 && t->to_float);
    unsigned char blk[3 * 144];
    float y[3 * 256];
    uint64_t s = 4242;
    for (size_t i = 0; i < sizeof blk; i++) s = s * 6364136223846793005ULL + 1442695040888963407ULL, blk[i] = (unsigned char)(s >> 56);
    const uint16_t d[3][2] = {{0x3c00, 0x3800}, {0x1234, 0x0567}, {0x0001, 0x7bff}}; /* (d, dmin) */
    for (int b = 0; b < 3; b++)
        for (int j = 0; j < 2; j++) blk[144 * b + 2 * j] = (unsigned char)d[b][j], blk[144 * b + 2 * j + 1] = (unsigned char)(d[b][j] >> 8);
    CHECK_EQ_INT(k_mismatches(12, blk, 3, q4k_ref), 0);
    /* hand-made: all zero; codes 15 with scale and min 63 in every sub-block
     * (d = 1, dmin = 0.5): 63 * 15 - 0.5 * 63 = 913.5 */
    unsigned char z[144] = {0}, hi[144];
    CHECK_EQ_INT(moe__gguf_dequantize(12, z, y, 256), 0);
    for (int e = 0; e < 256; e++) CHECK_MSG(y[e] == 0, "zero [%d] = %g", e, (double)y[e]);
    memset(hi, 0xff, sizeof hi);
    hi[0] = 0x00, hi[1] = 0x3c, hi[2] = 0x00, hi[3] = 0x38;
    CHECK_EQ_INT(moe__gguf_dequantize(12, hi, y, 256), 0);
    for (int e = 0; e < 256; e++) CHECK_MSG(y[e] == 913.5f, "max [%d] = %g", e, (double)y[e]);
    CHECK_EQ_INT(moe__gguf_dequantize(12, blk, y, 300), MOE_EINVAL);
    CHECK(t->engine == MOE__TYPE_ENGINE_NONE && !t->from_float);
}
