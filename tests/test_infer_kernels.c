/* The engine's matmul kernels (src/infer/kernels.c) against double-precision
 * sums of the integer block codes: Q8_0/Q4_0 weights (edge codes -128, 127,
 * nibbles 0 and 15) times Q8_0 activations, odd row and block counts; plus
 * the invariances the engine relies on: a token's result is the same alone
 * or in a batch, and whatever row range a thread is given. */
#include "infer/infer.h"
#include "test.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static uint64_t g_rng;
static uint32_t rnd(void) {
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(g_rng >> 33);
}

/* A fp16 scale: 1.0 (exact mode) or one in [2^-7, 2). */
static uint16_t rnd_scale(int exact) {
    return moe__gguf_f32_to_fp16(exact ? 1.0f : ldexpf(1.0f + (float)(rnd() % 1000) / 1000.0f, -(int)(rnd() % 8)));
}

/* n bytes that end where an unreadable page begins: a kernel reading one
 * byte past a matrix (the masked loads of a partial last block group)
 * crashes the test. One at a time. */
static void *g_map;
static size_t g_map_len;
static uint8_t *guard_alloc(size_t n) {
    const size_t pg = (size_t)sysconf(_SC_PAGESIZE), span = (n + pg - 1) / pg * pg;
    g_map_len = span + pg;
    g_map = mmap(NULL, g_map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g_map == MAP_FAILED || mprotect((uint8_t *)g_map + span, pg, PROT_NONE)) abort();
    return (uint8_t *)g_map + span - n;
}
static void guard_free(void) { munmap(g_map, g_map_len); }

/* Q8_0 or Q4_0 weight rows [R][nb blocks], ending at an unreadable page; the
 * first row of the first block holds the extreme codes. */
static size_t make_w(int q4, int R, int nb, int exact, uint8_t **out) {
    const size_t bs = q4 ? sizeof(moe__gguf_block_q4_0) : sizeof(moe__gguf_block_q8_0), rb = bs * nb;
    uint8_t *w = guard_alloc(rb * R);
    for (int r = 0; r < R; r++)
        for (int b = 0; b < nb; b++) {
            uint8_t *blk = w + r * rb + b * bs;
            const uint16_t d = rnd_scale(exact);
            memcpy(blk, &d, 2);
            for (size_t j = 2; j < bs; j++) blk[j] = (uint8_t)rnd();
            if (r == 0 && b == 0 && !q4) blk[2] = 0x80, blk[3] = 127, blk[4] = 0x80; /* -128, 127 */
            if (r == 0 && b == 0 && q4) blk[2] = 0x0f, blk[3] = 0xf0, blk[4] = 0x00, blk[5] = 0xff;
        }
    *out = w;
    return rb;
}

/* Q8_0 activation rows [T][nb blocks], codes in [-127, 127] as our quantizer
 * writes them; extremes in row 0. */
static uint8_t *make_x(int T, int nb, int exact) {
    const size_t bs = sizeof(moe__gguf_block_q8_0);
    uint8_t *x = malloc(bs * nb * T);
    for (int t = 0; t < T; t++)
        for (int b = 0; b < nb; b++) {
            uint8_t *blk = x + (t * nb + b) * bs;
            const uint16_t d = rnd_scale(exact);
            memcpy(blk, &d, 2);
            for (int j = 0; j < 32; j++) blk[2 + j] = (uint8_t)(int8_t)((int)(rnd() % 255) - 127);
            if (t == 0 && b == 0) blk[2] = (uint8_t)(int8_t)-127, blk[3] = 127, blk[4] = (uint8_t)(int8_t)-127;
        }
    return x;
}

static int wcode(int q4, const uint8_t *blk, int j) {
    if (!q4) return (int8_t)blk[2 + j];
    return (j < 16 ? blk[2 + j] & 15 : blk[2 + j - 16] >> 4) - 8;
}

static double fp16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return moe__gguf_fp16_to_f32(h);
}

/* which types have a packed kernel in this build (kernels.c) */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512DQ__)
#define PACKED_Q8 1
#if defined(__AVX512VBMI__)
#define PACKED_Q4 1
#endif
#endif
#ifndef PACKED_Q8
#define PACKED_Q8 0
#endif
#ifndef PACKED_Q4
#define PACKED_Q4 0
#endif

/* The packed layout (moe__wt_pack_rows): y again, bit for bit, packed and
 * multiplied in thread chunks of 1..3 threads, batch and one token at a
 * time; the buffer starts as garbage, so a byte the kernel reads but the
 * packer did not write shows. */
static void check_packed(const moe__wt *mw, const uint8_t *x, int T, const float *y, void *sc) {
    const int R = mw->rows, nb = mw->cols / 32;
    const size_t pb = moe__wt_packed_bytes(mw), xrb = 34 * (size_t)nb;
    CHECK_MSG((pb > 0) == (mw->type == MOE__GGML_Q4_0 ? PACKED_Q4 : PACKED_Q8), "type %u: packed bytes %zu", mw->type,
              pb);
    if (!pb) return;
    CHECK_EQ_INT((int)(pb % 64), 0);
    uint8_t *pk = aligned_alloc(64, pb);
    float *yp = malloc(sizeof(float) * T * R);
    for (int nth = 1; nth <= 3; nth++) {
        memset(pk, 0xa5, pb), memset(yp, 0, sizeof(float) * T * R);
        for (int ith = 0; ith < nth; ith++) {
            int lo, hi;
            moe__split(R, 4, ith, nth, &lo, &hi);
            moe__wt_pack_rows(mw, 0, pk, lo, hi);
            moe__wt_matmul_rows(mw, 0, NULL, x, T, yp, R, lo, hi, sc, mw->cols, pk);
        }
        CHECK_MSG(memcmp(yp, y, sizeof(float) * T * R) == 0, "type %u R %d nb %d T %d: packed differs", mw->type, R,
                  nb, T);
        for (int t = 0; t < T && t < 3; t++) {
            moe__wt_matmul_rows(mw, 0, NULL, x + t * xrb, 1, yp, R, 0, R, sc, mw->cols, pk);
            CHECK(memcmp(yp, y + (size_t)t * R, sizeof(float) * R) == 0);
        }
    }
    free(pk), free(yp);
}

static void check_quant(int q4, int R, int nb, int T, int exact) {
    uint8_t *w, *x = make_x(T, nb, exact);
    const size_t rb = make_w(q4, R, nb, exact, &w), wbs = q4 ? 18 : 34, xrb = 34 * (size_t)nb;
    const moe__wt mw = {.data = w, .type = q4 ? MOE__GGML_Q4_0 : MOE__GGML_Q8_0, .rows = R, .cols = 32 * nb,
                        .n_mat = 1, .row_bytes = rb, .mat_bytes = rb * R};
    float *y = malloc(sizeof(float) * T * R), *y1 = malloc(sizeof(float) * R), *yp = malloc(sizeof(float) * T * R);
    void *sc = aligned_alloc(64, moe__wt_scratch_bytes(32 * nb));
    moe__wt_matmul_rows(&mw, 0, NULL, x, T, y, R, 0, R, sc, 32 * nb, NULL);
    for (int t = 0; t < T; t++)
        for (int r = 0; r < R; r++) {
            double ref = 0, mag = 0;
            for (int b = 0; b < nb; b++) {
                const uint8_t *wb = w + r * rb + b * wbs, *xb = x + t * xrb + b * 34;
                long dot = 0, adot = 0; /* the kernel's partial sums are bounded by adot's */
                for (int j = 0; j < 32; j++) {
                    dot += (long)wcode(q4, wb, j) * (int8_t)xb[2 + j];
                    adot += labs((long)wcode(q4, wb, j) * (int8_t)xb[2 + j]);
                }
                ref += (double)dot * fp16(wb) * fp16(xb);
                mag += fabs((double)adot * fp16(wb) * fp16(xb));
            }
            const double got = y[t * R + r];
            if (exact) /* integer sums below 2^24: the float result is exact */
                CHECK_MSG(got == ref, "q4 %d R %d nb %d: y[%d][%d] = %.1f, want %.1f", q4, R, nb, t, r, got, ref);
            else
                CHECK_MSG(fabs(got - ref) <= 1e-6 * mag + 1e-30, "q4 %d nb %d: y[%d][%d] = %.9g, want %.9g", q4, nb,
                          t, r, got, ref);
        }
    /* one token at a time, bit-identical to the batch */
    for (int t = 0; t < T; t++) {
        moe__wt_matmul_rows(&mw, 0, NULL, x + t * xrb, 1, y1, R, 0, R, sc, 32 * nb, NULL);
        CHECK(memcmp(y1, y + t * R, sizeof(float) * R) == 0);
    }
    /* rows split at an odd boundary and in thread chunks, bit-identical */
    memset(yp, 0, sizeof(float) * T * R);
    const int cut = R / 2 | 1;
    moe__wt_matmul_rows(&mw, 0, NULL, x, T, yp, R, 0, cut < R ? cut : R, sc, 32 * nb, NULL);
    if (cut < R) moe__wt_matmul_rows(&mw, 0, NULL, x, T, yp, R, cut, R, sc, 32 * nb, NULL);
    CHECK(memcmp(yp, y, sizeof(float) * T * R) == 0);
    for (int nth = 2; nth <= 3; nth++) {
        memset(yp, 0, sizeof(float) * T * R);
        for (int ith = 0; ith < nth; ith++) {
            int lo, hi;
            moe__split(R, 4, ith, nth, &lo, &hi);
            moe__wt_matmul_rows(&mw, 0, NULL, x, T, yp, R, lo, hi, sc, 32 * nb, NULL);
        }
        CHECK(memcmp(yp, y, sizeof(float) * T * R) == 0);
    }
    check_packed(&mw, x, T, y, sc);
    guard_free();
    free(x), free(y), free(y1), free(yp), free(sc);
}

TEST(infer_kernel_quant_exact_integer_sums) {
    g_rng = 11;
    /* block counts leaving every partial last group (pairs; Q4_0 fours) */
    const int rows[] = {1, 4, 7, 13}, nbs[] = {1, 2, 3, 5, 6, 7};
    for (int q4 = 0; q4 < 2; q4++)
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 6; j++) check_quant(q4, rows[i], nbs[j], 6, 1);
}

TEST(infer_kernel_quant_scaled_vs_double) {
    g_rng = 12;
    const int rows[] = {3, 9}, nbs[] = {1, 3, 8};
    for (int q4 = 0; q4 < 2; q4++)
        for (int i = 0; i < 2; i++)
            for (int j = 0; j < 3; j++) check_quant(q4, rows[i], nbs[j], 5, 0);
}

/* More tokens than a tile of 16 and more rows than one L2 chunk (the
 * prompt path: rows in chunks of 256 KiB, each re-read per token tile). */
TEST(infer_kernel_quant_prompt_chunks) {
    g_rng = 14;
    for (int q4 = 0; q4 < 2; q4++) check_quant(q4, 1001, 16, 21, 0);
}

/* F32 and F16 rows: against double, and the same batch/partition identities. */
TEST(infer_kernel_float_types) {
    g_rng = 13;
    const int R = 11, cols = 37, T = 6; /* cols: a masked tail */
    float *wf = malloc(sizeof(float) * R * cols), *x = malloc(sizeof(float) * T * cols);
    uint16_t *wh = malloc(2 * R * cols);
    for (int i = 0; i < R * cols; i++) {
        wh[i] = moe__gguf_f32_to_fp16((float)((int)(rnd() % 2001) - 1000) / 997.0f);
        wf[i] = moe__gguf_fp16_to_f32(wh[i]);
    }
    for (int i = 0; i < T * cols; i++) x[i] = (float)((int)(rnd() % 2001) - 1000) / 311.0f;
    void *wbuf = aligned_alloc(64, moe__wt_scratch_bytes(40));
    float *y = malloc(sizeof(float) * T * R), *y2 = malloc(sizeof(float) * T * R);
    for (int f16 = 0; f16 < 2; f16++) {
        const moe__wt mw = {.data = f16 ? (const uint8_t *)wh : (const uint8_t *)wf,
                            .type = f16 ? MOE__GGML_F16 : MOE__GGML_F32, .rows = R, .cols = cols, .n_mat = 1,
                            .row_bytes = (size_t)cols * (f16 ? 2 : 4), .mat_bytes = (size_t)R * cols * (f16 ? 2 : 4)};
        moe__wt_matmul_rows(&mw, 0, x, NULL, T, y, R, 0, R, wbuf, 40, NULL);
        for (int t = 0; t < T; t++)
            for (int r = 0; r < R; r++) {
                double ref = 0, mag = 0;
                for (int c = 0; c < cols; c++) {
                    ref += (double)wf[r * cols + c] * x[t * cols + c];
                    mag += fabs((double)wf[r * cols + c] * x[t * cols + c]);
                }
                CHECK_MSG(fabs(y[t * R + r] - ref) <= 1e-6 * mag, "f16 %d y[%d][%d] = %.9g want %.9g", f16, t, r,
                          y[t * R + r], ref);
            }
        for (int t = 0; t < T; t++) {
            moe__wt_matmul_rows(&mw, 0, x + t * cols, NULL, 1, y2, R, 0, R, wbuf, 40, NULL);
            CHECK(memcmp(y2, y + t * R, sizeof(float) * R) == 0);
        }
        memset(y2, 0, sizeof(float) * T * R);
        moe__wt_matmul_rows(&mw, 0, x, NULL, T, y2, R, 0, 5, wbuf, 40, NULL);
        moe__wt_matmul_rows(&mw, 0, x, NULL, T, y2, R, 5, R, wbuf, 40, NULL);
        CHECK(memcmp(y2, y, sizeof(float) * T * R) == 0);
        /* the packed copy (the file's layout, in the engine's huge pages): the same bits */
        const size_t pb = moe__wt_packed_bytes(&mw);
        CHECK(pb >= (size_t)R * mw.row_bytes);
        uint8_t *pk = aligned_alloc(64, pb);
        memset(pk, 0xa5, pb), memset(y2, 0, sizeof(float) * T * R);
        moe__wt_pack_rows(&mw, 0, pk, 0, 8), moe__wt_pack_rows(&mw, 0, pk, 8, R);
        moe__wt_matmul_rows(&mw, 0, x, NULL, T, y2, R, 0, 8, wbuf, 40, pk);
        moe__wt_matmul_rows(&mw, 0, x, NULL, T, y2, R, 8, R, wbuf, 40, pk);
        CHECK(memcmp(y2, y, sizeof(float) * T * R) == 0);
        free(pk);
    }
    free(wf), free(x), free(wh), free(wbuf), free(y), free(y2);
}

TEST(infer_kernel_split) {
    int lo, hi, seen = 0;
    for (int ith = 0; ith < 3; ith++) { /* 13 rows, 3 threads, align 4: chunks of 8, the rest, none */
        moe__split(13, 4, ith, 3, &lo, &hi);
        CHECK_EQ_INT(lo, ith == 0 ? 0 : ith == 1 ? 8 : 13);
        CHECK_EQ_INT(hi, ith == 0 ? 8 : 13);
        seen += hi - lo;
    }
    CHECK_EQ_INT(seen, 13);
    moe__split(10, 1, 2, 3, &lo, &hi);
    CHECK_EQ_INT(lo, 8);
    CHECK_EQ_INT(hi, 10);
}

/* silu(g) * u against double over the whole useful range, a non-multiple of
 * 16 elements (the scalar tail), extremes and NaN. */
TEST(infer_kernel_swiglu) {
    enum { n = 4003 };
    float *g = malloc(sizeof(float) * n), *u = malloc(sizeof(float) * n), *g0 = malloc(sizeof(float) * n);
    for (int i = 0; i < n; i++) {
        g0[i] = -90.0f + 180.0f * (float)i / (n - 1) + (float)(i % 7) * 1e-3f;
        u[i] = (float)((int)(i % 13) - 6) / 3.0f;
    }
    const float ext[] = {1e30f, -1e30f, 88.5f, -88.5f, 0.0f, -0.0f, 103.0f, -103.0f, 20.0f, -20.0f};
    for (int i = 0; i < 10; i++) g0[100 + i] = ext[i], u[100 + i] = 1.5f;
    memcpy(g, g0, sizeof(float) * n);
    moe__swiglu(g, u, n);
    for (int i = 0; i < n; i++) {
        const double x = g0[i], want = x / (1.0 + exp(-x)) * u[i];
        /* below -88.7, e^-x overflows float and silu is 0, as with expf */
        CHECK_MSG(fabs(g[i] - want) <= 1e-6 * fabs(want) + 1e-35, "silu(%g) * %g = %.9g, want %.9g", x, u[i], g[i],
                  want);
    }
    g[0] = NAN;
    moe__swiglu(g, u, 16);
    CHECK(isnan(g[0]));
    /* the softmax's e^(x - max): 2 ulp of float (1.2e-7 each) */
    memcpy(g, g0, sizeof(float) * n);
    moe__exp_shift(g, 1001, 3.0f);
    for (int i = 0; i < 1001; i++) {
        const float d = g0[i] - 3.0f; /* the float difference is the argument */
        const double want = exp((double)d);
        if (want > 3.4e38) CHECK_MSG(isinf(g[i]), "e^%g = %g, want inf", d, g[i]);
        else CHECK_MSG(fabs(g[i] - want) <= 2.5e-7 * want + 1e-37, "e^%g = %.9g, want %.9g", d, g[i], want);
    }
    free(g), free(u), free(g0);
}

/* The engine's activation quantization writes the same bytes as
 * moe__gguf_quantize_q8_0 (llama.cpp's reference rounding): random
 * magnitudes, exact .5 ties (a block with max 127 has scale 1), zero blocks,
 * a subnormal maximum (1/d overflows), and rows with inf/NaN. */
TEST(infer_kernel_quantize_matches_reference) {
    g_rng = 14;
    enum { cols = 96, T = 12 };
    const size_t qrow = moe__qrow_bytes(cols);
    float *x = malloc(sizeof(float) * T * cols);
    uint8_t *a = malloc(qrow * T), *b = malloc(qrow * T);
    for (int rep = 0; rep < 20; rep++) {
        for (int i = 0; i < T * cols; i++)
            x[i] = ldexpf((float)((int)(rnd() % 20001) - 10000) / 10000.0f, (int)(rnd() % 60) - 30);
        for (int j = 0; j < 32; j++) x[j] = j == 5 ? 127.0f : (float)((int)(rnd() % 253) - 126) + 0.5f; /* ties */
        for (int j = 32; j < 64; j++) x[j] = 0.0f;
        for (int j = 64; j < 96; j++) x[j] = j == 64 ? 1e-40f : j % 3 ? 0.0f : -3e-41f; /* subnormal max */
        for (int j = 0; j < cols; j++) x[cols + j] = (float)j - 40.0f;                 /* row 1: scale 56/127 */
        x[2 * cols + 7] = INFINITY, x[3 * cols + 40] = NAN, x[4 * cols + 90] = -INFINITY;
        for (int j = 0; j < cols; j++) x[5 * cols + j] = (j % 2 ? 1e30f : -2e29f); /* the fp16 scale overflows */
        memset(a, 0x55, qrow * T), memset(b, 0xaa, qrow * T);
        moe__quantize_rows(x, cols, 0, T, a);
        for (int t = 0; t < T; t++) moe__gguf_quantize_q8_0(x + t * cols, b + t * qrow, cols);
        for (int t = 0; t < T; t++) CHECK_MSG(memcmp(a + t * qrow, b + t * qrow, qrow) == 0, "rep %d row %d", rep, t);
    }
    free(x), free(a), free(b);
}

/* Attention's helpers: four dots in one pass equal moe__dot_f32 bit for bit;
 * the weighted row sum against double, for widths with masked tails and more
 * than one 64-column chunk. */
TEST(infer_kernel_attention_helpers) {
    g_rng = 15;
    const int widths[] = {5, 37, 64, 80, 128};
    float *a = malloc(sizeof(float) * 40 * 140), *b = malloc(sizeof(float) * 140), *o = malloc(sizeof(float) * 140);
    float p[40];
    for (int i = 0; i < 40 * 140; i++) a[i] = (float)((int)(rnd() % 2001) - 1000) / 777.0f;
    for (int i = 0; i < 140; i++) b[i] = (float)((int)(rnd() % 2001) - 1000) / 555.0f;
    for (int j = 0; j < 40; j++) p[j] = (float)(rnd() % 1000) / 1000.0f;
    for (int wi = 0; wi < 5; wi++) {
        const int n = widths[wi];
        float d4[4];
        moe__dot4_f32(a + 3, 140, b, n, d4);
        for (int k = 0; k < 4; k++) {
            const float d1 = moe__dot_f32(a + 3 + k * 140, b, n);
            CHECK_MSG(memcmp(&d1, &d4[k], sizeof d1) == 0, "n %d row %d: %.9g vs %.9g", n, k, d4[k], d1);
        }
        for (int i = 0; i < 140; i++) o[i] = -7.0f;
        moe__axpy_rows(p, a + 1, 140, 40, n, o);
        for (int d = 0; d < n; d++) {
            double want = 0, mag = 0;
            for (int j = 0; j < 40; j++) want += (double)p[j] * a[j * 140 + 1 + d], mag += fabs((double)p[j] * a[j * 140 + 1 + d]);
            CHECK_MSG(fabs(o[d] - want) <= 1e-6 * mag, "n %d: o[%d] = %.9g, want %.9g", n, d, o[d], want);
        }
        CHECK(n == 140 || o[n] == -7.0f); /* nothing written past n */
    }
    free(a), free(b), free(o);
}

/* The F16 KV cache's kernels on fp16 rows (rounded by the library's
 * reference converter) are bit-identical to the float kernels on the same
 * rows widened, so the F16 cache changes only what is stored; and they agree
 * with double sums. Widths with masked tails, one and several 64-column
 * chunks. */
TEST(infer_kernel_f16_attention_helpers) {
    g_rng = 16;
    enum { R = 40, S = 140 };
    const int widths[] = {5, 16, 37, 64, 80, 128};
    uint16_t *ah = malloc(2 * R * S);
    float *a = malloc(sizeof(float) * R * S), *b = malloc(sizeof(float) * S);
    float *o = malloc(sizeof(float) * S), *o32 = malloc(sizeof(float) * S), p[R];
    for (int i = 0; i < R * S; i++) {
        ah[i] = moe__gguf_f32_to_fp16((float)((int)(rnd() % 20001) - 10000) / 777.0f);
        a[i] = moe__gguf_fp16_to_f32(ah[i]);
    }
    for (int i = 0; i < S; i++) b[i] = (float)((int)(rnd() % 2001) - 1000) / 555.0f;
    for (int j = 0; j < R; j++) p[j] = (float)(rnd() % 1000) / 1000.0f;
    for (int wi = 0; wi < 6; wi++) {
        const int n = widths[wi];
        float d4[4], d4f[4];
        moe__dot4_f16(ah + 3, S, b, n, d4);
        moe__dot4_f32(a + 3, S, b, n, d4f);
        for (int k = 0; k < 4; k++) {
            const float d1 = moe__dot_f16(ah + 3 + k * S, b, n), d1f = moe__dot_f32(a + 3 + k * S, b, n);
            CHECK_MSG(memcmp(&d1, &d1f, sizeof d1) == 0, "n %d row %d: dot %.9g vs float %.9g", n, k, d1, d1f);
            CHECK_MSG(memcmp(&d4[k], &d4f[k], sizeof d1) == 0, "n %d row %d: dot4 %.9g vs float %.9g", n, k, d4[k],
                      d4f[k]);
            double want = 0, mag = 0;
            for (int i = 0; i < n; i++) {
                want += (double)a[3 + k * S + i] * b[i];
                mag += fabs((double)a[3 + k * S + i] * b[i]);
            }
            CHECK_MSG(fabs(d1 - want) <= 1e-6 * mag, "n %d row %d: dot %.9g, want %.9g", n, k, d1, want);
        }
        for (int i = 0; i < S; i++) o[i] = o32[i] = -7.0f;
        moe__axpy_rows_f16(p, ah + 1, S, R, n, o);
        moe__axpy_rows(p, a + 1, S, R, n, o32);
        CHECK_MSG(memcmp(o, o32, sizeof(float) * S) == 0, "n %d: axpy differs from the float kernel", n);
        for (int d = 0; d < n; d++) {
            double want = 0, mag = 0;
            for (int j = 0; j < R; j++) want += (double)p[j] * a[j * S + 1 + d], mag += fabs((double)p[j] * a[j * S + 1 + d]);
            CHECK_MSG(fabs(o[d] - want) <= 1e-6 * mag, "n %d: o[%d] = %.9g, want %.9g", n, d, o[d], want);
        }
        CHECK(n == S || o[n] == -7.0f); /* nothing written past n */
    }
    free(ah), free(a), free(b), free(o), free(o32);
}

/* The cache store rounds as moe__gguf_f32_to_fp16 (round to nearest even),
 * bit for bit, over every exponent (fp16 subnormals, overflow to inf),
 * exact ties between two fp16 values (either parity), signs, inf and NaN,
 * with a row length that leaves a scalar tail. */
TEST(infer_kernel_f16_store_rounding) {
    g_rng = 17;
    enum { n = 4099 };
    float *x = malloc(sizeof(float) * n);
    uint16_t *got = malloc(2 * n);
    for (int i = 0; i < n; i++) {
        uint32_t u;
        if (i % 4 == 0) { /* halfway between fp16 h and its successor */
            const uint16_t h = (uint16_t)(rnd() % 0x7bff);
            const float lo = moe__gguf_fp16_to_f32(h), hi = moe__gguf_fp16_to_f32((uint16_t)(h + 1));
            x[i] = (float)(((double)lo + hi) / 2) * (rnd() % 2 ? -1.0f : 1.0f);
            continue;
        }
        /* random bits with exponents from 2^-30 to 2^20 */
        u = (rnd() & 0x807fffffu) | (uint32_t)(97 + rnd() % 51) << 23;
        memcpy(&x[i], &u, 4);
    }
    const float special[] = {INFINITY, -INFINITY, NAN, 65504.0f, 65519.0f, 65520.0f, -65520.0f, 0.0f, -0.0f,
                             5.9604645e-8f, 2.9802322e-8f, 2.9802326e-8f, 6.1035156e-5f, 1e-45f};
    for (int i = 0; i < 14; i++) x[100 + i] = special[i];
    moe__f32_to_f16_row(x, got, n);
    for (int i = 0; i < n; i++) {
        const uint16_t want = moe__gguf_f32_to_fp16(x[i]);
        CHECK_MSG(got[i] == want, "x[%d] = %.9g: 0x%04x, want 0x%04x", i, x[i], got[i], want);
    }
    /* ties round to the even neighbour: 1 + 2^-11 -> 1, 1 + 3 * 2^-11 -> 1 + 2^-9 */
    const float t[2] = {1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f};
    moe__f32_to_f16_row(t, got, 2);
    CHECK_EQ_INT(got[0], 0x3c00);
    CHECK_EQ_INT(got[1], 0x3c02);
    free(x), free(got);
}
