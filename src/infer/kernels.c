/* Matrix-times-activations kernels per weight type. The caller's threads
 * split the output rows (each weight row is read once and dotted with every
 * token), so at decode all threads stream the same expert, and every output
 * element is one dot product in a fixed order: results are independent of
 * the thread count, of the row partition and of the batch the token arrived
 * in. No kernel opens a parallel region: the engine runs one per forward. */
#include "infer/infer.h"

#include <math.h>
#include <string.h>

#define ROW_BLOCK 16 /* output rows per work item */
#define TOK_BLOCK 16 /* tokens per tile inside a work item */

#if defined(__AVX512F__)
#include <immintrin.h>

/* 16 lanes of a row that is float or fp16 (the F16 KV cache); fp16 widens
 * exactly, so an F16 row behaves as the float row of its rounded values. m
 * masks a partial tail (a copy, not a masked 16-bit load: that would need
 * AVX-512BW). */
static inline __attribute__((always_inline)) __m512 load16(const void *p, size_t i, int f16, __mmask16 m) {
    if (!f16) return _mm512_maskz_loadu_ps(m, (const float *)p + i);
    if (m == (__mmask16)0xffff) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
    uint16_t tmp[16] = {0};
    memcpy(tmp, (const uint16_t *)p + i, 2 * (size_t)__builtin_popcount(m));
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)tmp));
}

/* One 16-lane accumulator, the tail by a masked load: moe__dot_f32 and the
 * 4x4 tile below run the same per-lane fused multiply-adds and the same final
 * reduction, so a product is bit-identical whichever of them computed it. */
static inline __attribute__((always_inline)) float dot_any(const void *a, int f16, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(load16(a, (size_t)i, f16, 0xffff), _mm512_loadu_ps(b + i), acc);
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(load16(a, (size_t)i, f16, m), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}
float moe__dot_f32(const float *a, const float *b, int n) { return dot_any(a, 0, b, n); }
float moe__dot_f16(const uint16_t *a, const float *b, int n) { return dot_any(a, 1, b, n); }

/* y[0..3] = the horizontal sums of a, b, c, d, each bit-identical to
 * _mm512_reduce_add_ps (GCC pairs lanes i and i+8, then i+4, i+2, i+1; IEEE
 * addition is commutative, so only the pairing matters), in about a third of
 * the instructions of four separate reductions: the reductions were a
 * quarter of the work of a 512-column dot. */
static inline void hsum4_store(__m512 a, __m512 b, __m512 c, __m512 d, float *y) {
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(c, d, _MM_SHUFFLE(3, 2, 3, 2)));
    /* quarters now: [a i, a i+4 | b i, b i+4] and the same for c, d */
    __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(ab, cd, _MM_SHUFFLE(3, 1, 3, 1)));
    v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1)));
    _mm_storeu_ps(y, _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), v)));
}

/* y[t][r] (row stride ldy) = dot(w[r], x[t]) for r, t < 4: each loaded
 * vector serves four products, a quarter of the loads of separate dots. */
static void dot_4x4(const float *w, size_t ws, const float *x, size_t xs, int n, float *y, int ldy) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < 4; t++) acc[r][t] = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 wv[4], xv[4];
        for (int r = 0; r < 4; r++) wv[r] = _mm512_loadu_ps(w + r * ws + i);
        for (int t = 0; t < 4; t++) xv[t] = _mm512_loadu_ps(x + t * xs + i);
        for (int r = 0; r < 4; r++)
            for (int t = 0; t < 4; t++) acc[r][t] = _mm512_fmadd_ps(wv[r], xv[t], acc[r][t]);
    }
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        __m512 wv[4], xv[4];
        for (int r = 0; r < 4; r++) wv[r] = _mm512_maskz_loadu_ps(m, w + r * ws + i);
        for (int t = 0; t < 4; t++) xv[t] = _mm512_maskz_loadu_ps(m, x + t * xs + i);
        for (int r = 0; r < 4; r++)
            for (int t = 0; t < 4; t++) acc[r][t] = _mm512_fmadd_ps(wv[r], xv[t], acc[r][t]);
    }
    for (int t = 0; t < 4; t++) hsum4_store(acc[0][t], acc[1][t], acc[2][t], acc[3][t], y + (size_t)t * ldy);
}
/* a, as: rows of float, or of fp16 when f16 (as counts elements either way) */
static inline __attribute__((always_inline)) void dot4_any(const void *a, int f16, size_t as, const float *b, int n,
                                                           float *out) {
    const size_t es = f16 ? 2 : 4;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 bv = _mm512_loadu_ps(b + i);
        for (int k = 0; k < 4; k++)
            acc[k] = _mm512_fmadd_ps(load16((const char *)a + k * as * es, (size_t)i, f16, 0xffff), bv, acc[k]);
    }
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        const __m512 bv = _mm512_maskz_loadu_ps(m, b + i);
        for (int k = 0; k < 4; k++)
            acc[k] = _mm512_fmadd_ps(load16((const char *)a + k * as * es, (size_t)i, f16, m), bv, acc[k]);
    }
    hsum4_store(acc[0], acc[1], acc[2], acc[3], out);
}
void moe__dot4_f32(const float *a, size_t as, const float *b, int n, float *out) { dot4_any(a, 0, as, b, n, out); }
void moe__dot4_f16(const uint16_t *a, size_t as, const float *b, int n, float *out) { dot4_any(a, 1, as, b, n, out); }

static inline __attribute__((always_inline)) void axpy_any(const float *p, const void *v, int f16, size_t vs, int m,
                                                           int n, float *o) {
    const size_t es = f16 ? 2 : 4;
    for (int d0 = 0; d0 < n; d0 += 64) { /* 64 columns in four registers across all m rows */
        __mmask16 mk[4];
        __m512 acc[4];
        for (int k = 0; k < 4; k++) {
            const int left = n - d0 - 16 * k;
            mk[k] = left >= 16 ? (__mmask16)0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
            acc[k] = _mm512_setzero_ps();
        }
        for (int j = 0; j < m; j++) {
            const __m512 pj = _mm512_set1_ps(p[j]);
            const char *vr = (const char *)v + ((size_t)j * vs + (size_t)d0) * es;
            for (int k = 0; k < 4; k++)
                if (mk[k]) acc[k] = _mm512_fmadd_ps(pj, load16(vr, (size_t)(16 * k), f16, mk[k]), acc[k]);
        }
        for (int k = 0; k < 4; k++) _mm512_mask_storeu_ps(o + d0 + 16 * k, mk[k], acc[k]);
    }
}
void moe__axpy_rows(const float *p, const float *v, size_t vs, int m, int n, float *o) { axpy_any(p, v, 0, vs, m, n, o); }
void moe__axpy_rows_f16(const float *p, const uint16_t *v, size_t vs, int m, int n, float *o) {
    axpy_any(p, v, 1, vs, m, n, o);
}

void moe__f32_to_f16_row(const float *x, uint16_t *y, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(y + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++) y[i] = moe__gguf_f32_to_fp16(x[i]); /* the same bits as the F16C unit (tested) */
}
#else
/* cnt <= 16 values of a float or fp16 row from i, widened into w: both row
 * types then run the very same float expressions, so the compiler cannot
 * contract or vectorize one differently from the other and F16 stays bit
 * for bit the float kernel on the widened row */
static inline void widen(const void *p, size_t i, int f16, int cnt, float *w) {
    for (int j = 0; j < cnt; j++)
        w[j] = f16 ? moe__gguf_fp16_to_f32(((const uint16_t *)p)[i + j]) : ((const float *)p)[i + j];
}

static inline float dot_any(const void *a, int f16, const float *b, int n) {
    /* 16 independent partial sums so the compiler vectorises the loop; the
     * order is fixed by n alone. */
    float acc[16] = {0}, w[16];
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        widen(a, (size_t)i, f16, 16, w);
        for (int j = 0; j < 16; j++) acc[j] += w[j] * b[i + j];
    }
    float s = 0;
    widen(a, (size_t)i, f16, n - i, w);
    for (int j = 0; i + j < n; j++) s += w[j] * b[i + j];
    for (int j = 0; j < 16; j += 2) s += acc[j] + acc[j + 1];
    return s;
}
float moe__dot_f32(const float *a, const float *b, int n) { return dot_any(a, 0, b, n); }
float moe__dot_f16(const uint16_t *a, const float *b, int n) { return dot_any(a, 1, b, n); }

void moe__dot4_f32(const float *a, size_t as, const float *b, int n, float *out) {
    for (int k = 0; k < 4; k++) out[k] = moe__dot_f32(a + k * as, b, n);
}
void moe__dot4_f16(const uint16_t *a, size_t as, const float *b, int n, float *out) {
    for (int k = 0; k < 4; k++) out[k] = moe__dot_f16(a + k * as, b, n);
}

static inline void axpy_any(const float *p, const void *v, int f16, size_t vs, int m, int n, float *o) {
    memset(o, 0, sizeof(float) * n);
    float w[16];
    for (int j = 0; j < m; j++)
        for (int d0 = 0; d0 < n; d0 += 16) {
            const int cnt = n - d0 < 16 ? n - d0 : 16;
            widen(v, (size_t)j * vs + (size_t)d0, f16, cnt, w);
            for (int d = 0; d < cnt; d++) o[d0 + d] += p[j] * w[d];
        }
}
void moe__axpy_rows(const float *p, const float *v, size_t vs, int m, int n, float *o) { axpy_any(p, v, 0, vs, m, n, o); }
void moe__axpy_rows_f16(const float *p, const uint16_t *v, size_t vs, int m, int n, float *o) {
    axpy_any(p, v, 1, vs, m, n, o);
}

void moe__f32_to_f16_row(const float *x, uint16_t *y, int n) {
    for (int i = 0; i < n; i++) y[i] = moe__gguf_f32_to_fp16(x[i]);
}
#endif

/* y[t][r] = dot(w[r], x[t]) for r < nr, t0 <= t < t1 (w rows of stride ws). */
static void float_tile(const float *w, size_t ws, int nr, const float *x, int cols, int t0, int t1, float *y,
                       int ldy) {
    int r = 0;
#if defined(__AVX512F__)
    for (; r + 4 <= nr; r += 4) {
        int t = t0;
        for (; t + 4 <= t1; t += 4)
            dot_4x4(w + (size_t)r * ws, ws, x + (size_t)t * cols, (size_t)cols, cols, y + (size_t)t * ldy + r, ldy);
        for (; t < t1; t++)
            for (int i = 0; i < 4; i++)
                y[(size_t)t * ldy + r + i] = moe__dot_f32(w + (size_t)(r + i) * ws, x + (size_t)t * cols, cols);
    }
#endif
    for (; r < nr; r++)
        for (int t = t0; t < t1; t++) y[(size_t)t * ldy + r] = moe__dot_f32(w + (size_t)r * ws, x + (size_t)t * cols, cols);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512DQ__)
#define QUANT_TILES 1
/* Q8_0/Q4_0 weights against Q8_0 activations, llama.cpp's block dot with
 * AVX-512 VNNI: one register holds two blocks and vpdpbusd multiplies 64
 * unsigned weight bytes by 64 signed activation bytes, four products per
 * int32 lane. The weights are made unsigned by an offset c (Q8_0: w + 128,
 * Q4_0: the raw nibble, i.e. (w - 8) + 8) and the accumulator starts at
 * -c * (the lane's sum of activations), so every lane holds the exact integer
 * sum of its four (w * x) products: no sign trick, so -128 weights are
 * exact (activations from our quantizer lie in [-127, 127], but any int8
 * works). Lanes are converted to float and accumulated with the product of
 * the two fp16 scales. A tile of up to 4 rows x 4 tokens loads each block
 * once for all its products, and every product runs the same per-lane
 * operations whatever the tile size, so a token's result does not depend
 * on the batch it came in.
 *
 * Lane layout: [block b | block b+1], 8 int32 lanes each, for both types
 * (Q4_0 nibbles are unpacked into the values' order). */
static inline float block_scale(const uint8_t *b) {
    uint16_t h;
    memcpy(&h, b, sizeof h);
    return _cvtsh_ss(h); /* F16C inline: exact, as moe__gguf_fp16_to_f32 */
}

/* Blocks b and b+1 (two = 0: b only, the rest zero) of a weight row as
 * unsigned bytes in the layout above. */
static inline __m512i load_w(int q4, const uint8_t *blk, int two) {
    if (!q4) {
        const __m256i lo = _mm256_loadu_si256((const __m256i *)(blk + 2));
        /* a missing block b+1 meets zero activations: its bytes do not matter */
        const __m256i hi = two ? _mm256_loadu_si256((const __m256i *)(blk + 34 + 2)) : _mm256_setzero_si256();
        return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_set1_epi8(-128));
    }
    const __m128i a = _mm_loadu_si128((const __m128i *)(blk + 2));
    const __m128i b = two ? _mm_loadu_si128((const __m128i *)(blk + 18 + 2)) : _mm_setzero_si128();
    const __m512i v = _mm512_castsi256_si512(_mm256_set_m128i(b, a));
    /* quarters [qs b, qs b, qs b+1, qs b+1], the odd ones shifted by 4: low nibbles are values 0..15
     * of a block, high nibbles 16..31, so this is the activations' own order */
    const __m512i sh = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0, 0, 0x0004000400040004,
                                        0x0004000400040004, 0, 0);
    const __m512i z = _mm512_shuffle_i64x2(v, v, _MM_SHUFFLE(1, 1, 0, 0));
    return _mm512_and_si512(_mm512_srlv_epi16(z, sh), _mm512_set1_epi8(15));
}

/* Activation blocks b, b+1 (Q8_0, 34 bytes each). */
static inline __m512i load_x(const uint8_t *blk, int two) {
    const __m256i lo = _mm256_loadu_si256((const __m256i *)(blk + 2));
    const __m256i hi = two ? _mm256_loadu_si256((const __m256i *)(blk + 34 + 2)) : _mm256_setzero_si256();
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}

/* The two blocks' scales over the lanes of their products: [d b x 8, d b+1 x 8]. */
static inline __m512 load_d(const uint8_t *blk, size_t bs, int two) {
    const float d0 = block_scale(blk), d1 = two ? block_scale(blk + bs) : 0.0f;
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(d0)), _mm256_set1_ps(d1), 1);
}

/* One pair of activation blocks, ready for the tile (expand_x). */
typedef struct xpair {
    __m512i x, corr;
    __m512 d;
} xpair;
_Static_assert(sizeof(xpair) == 192, "moe__wt_scratch_bytes counts 192 bytes per pair");


#define Q4_GROUP_BYTES 256 /* sizeof(q4_group) */

#ifndef PF_ROWS
#define PF_ROWS 16 /* rows ahead: 4 left decode waiting on memory (t1 CPU time Q4_0 -28%, Q8_0 -25% vs 4) */
#endif
/* y[t][r] = dot(w row r, xq row t), r < R, t < T (both <= 4); nb blocks.
 * Row r + PF_ROWS is prefetched for r < npf (the rows that exist), so no
 * address past the matrix is ever formed. */
static inline __attribute__((always_inline)) void quant_tile(int q4, const uint8_t *w, size_t wrb, int R,
                                                             const xpair *xp, int np, int T, int nb, float *y,
                                                             int ldy, int npf) {
    const size_t wbs = q4 ? sizeof(moe__gguf_block_q4_0) : sizeof(moe__gguf_block_q8_0);
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b += 2) {
        const int two = b + 1 < nb;
        __m512i wv[4], xv[4], corr[4];
        __m512 dw[4], dx[4];
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = w + r * wrb + b * wbs;
            wv[r] = load_w(q4, blk, two), dw[r] = load_d(blk, wbs, two);
            /* the next 4-row tile: the loads above stalled on memory at decode */
            if (r < npf) {
                _mm_prefetch((const char *)(blk + PF_ROWS * wrb), _MM_HINT_T0);
                /* a Q8_0 pair is 68 bytes: one line per pair would skip a line now and then */
                if (!q4 && two) _mm_prefetch((const char *)(blk + PF_ROWS * wrb + 64), _MM_HINT_T0);
            }
        }
        for (int t = 0; t < T; t++) {
            const xpair *x = xp + (size_t)t * np + b / 2;
            xv[t] = x->x, corr[t] = x->corr, dx[t] = x->d;
        }
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++)
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr[t], wv[r], xv[t])),
                                            _mm512_mul_ps(dw[r], dx[t]), acc[r][t]);
    }
    if (R == 4)
        for (int t = 0; t < T; t++) hsum4_store(acc[0][t], acc[1][t], acc[2][t], acc[3][t], y + (size_t)t * ldy);
    else
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) y[(size_t)t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

/* The activation side of the tile for tokens [0, nt) of xq (Q8_0 rows of
 * xrb bytes): per pair of blocks the codes, the accumulator start
 * -c * (lane sums of the codes) for the weight type's offset c, and the
 * scales, computed once per call instead of once per 4-row tile (17% of a
 * decode token's instructions). */
static void expand_x(int q4, const uint8_t *xq, size_t xrb, int nt, int nb, xpair *out) {
    const int np = (nb + 1) / 2;
    const __m512i ones = _mm512_set1_epi8(1);
    for (int t = 0; t < nt; t++)
        for (int p = 0; p < np; p++) {
            const uint8_t *blk = xq + (size_t)t * xrb + (size_t)p * 2 * sizeof(moe__gguf_block_q8_0);
            const int two = 2 * p + 1 < nb;
            xpair *o = out + (size_t)t * np + p;
            o->x = load_x(blk, two);
            o->d = load_d(blk, sizeof(moe__gguf_block_q8_0), two);
            const __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, o->x);
            o->corr = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum, q4 ? 3 : 7));
        }
}
#endif

#if defined(__AVX512VBMI__)
#define Q4_GROUPS 1
/* Q4_0 in groups of four blocks (72 bytes of a weight row): the 64 code bytes
 * gathered by one two-source byte permute, the four scales by one byte
 * permute, the low and high nibbles against activations laid out to match
 * (q4_group), two vpdpbusd per group. Half the permutes per block of the
 * pair layout, which left Q4_0 decode short of the read bandwidth. The
 * offset scheme is the pair tiles': raw nibbles (code + 8), the accumulator
 * starting at -8 x the lane's activation sum, so every lane is exact. */
typedef struct q4_group {
    int8_t lo[64];    /* blocks k = 0..3: values 0..15 of block k at 16k */
    int8_t hi[64];    /* values 16..31 of block k at 16k */
    int32_t corr[16]; /* lane L: -8 x the sum of the 8 codes lane L multiplies */
    float d[16];      /* lane L: scale of block L / 4 */
} q4_group;
_Static_assert(sizeof(q4_group) == Q4_GROUP_BYTES, "moe__wt_scratch_bytes: 256 bytes per 4 blocks fit in 2 pairs");

/* Code byte i of a group is byte 18 (i / 16) + 2 + i % 16 of its 72 (the last
 * block from the second load at +8: 64 + that - 8); scale word L the fp16 at
 * byte 18 (L / 4). Two loads at +0 and +8 end at the group's last byte. */
static const uint8_t k_q4_codes[64] = {
    2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49,
    50, 51, 52, 53, 112, 113, 114, 115, 116, 117, 118, 119, 120, 121, 122, 123, 124, 125, 126, 127};
static const uint8_t k_q4_scales[64] = {0,  1,  0,  1,  0,  1,  0,  1,  18, 19, 18, 19, 18, 19, 18, 19,
                                        36, 37, 36, 37, 36, 37, 36, 37, 54, 55, 54, 55, 54, 55, 54, 55};

static void expand_q4(const uint8_t *xq, size_t xrb, int nt, int nb, void *dst) {
    q4_group *out = dst;
    const int ng = (nb + 3) / 4;
    memset(out, 0, sizeof *out * (size_t)nt * ng); /* blocks past the row: zero codes and scales */
    for (int t = 0; t < nt; t++)
        for (int b = 0; b < nb; b++) {
            const moe__gguf_block_q8_0 *blk =
                (const moe__gguf_block_q8_0 *)(const void *)(xq + (size_t)t * xrb + (size_t)b * sizeof *blk);
            q4_group *g = out + (size_t)t * ng + b / 4;
            const int k = b % 4;
            const float d = block_scale((const uint8_t *)blk);
            memcpy(g->lo + 16 * k, blk->qs, 16);
            memcpy(g->hi + 16 * k, blk->qs + 16, 16);
            for (int j = 0; j < 4; j++) {
                int sum = 0;
                for (int i = 0; i < 4; i++) sum += blk->qs[4 * j + i] + blk->qs[16 + 4 * j + i];
                g->corr[4 * k + j] = -8 * sum, g->d[4 * k + j] = d;
            }
        }
}

/* y[t][r] = W row r . x token t for r < R, t < T (both <= 4); ng groups, the
 * last with `tail` blocks (0: full) read by masked loads, so nothing past the
 * matrix is read. npf rows PF_ROWS ahead exist and are prefetched. */
static inline __attribute__((always_inline)) void q4_tile(const uint8_t *w, size_t wrb, int R, const q4_group *xg,
                                                          int ng, int T, int tail, float *y, int ldy, int npf) {
    const __m512i m4 = _mm512_set1_epi8(15), pc = _mm512_loadu_si512(k_q4_codes), ps = _mm512_loadu_si512(k_q4_scales);
    __m512 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m512i lo[4], hi[4];
        __m512 sc[4];
        for (int r = 0; r < R; r++) {
            const uint8_t *p = w + r * wrb + (size_t)g * 72;
            __m512i a, b;
            if (g + 1 < ng || !tail) {
                a = _mm512_loadu_si512(p), b = _mm512_loadu_si512(p + 8);
            } else { /* the row ends inside the group */
                a = _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, 18 * tail), p);
                b = _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, 18 * tail - 8), p + 8);
            }
            const __m512i codes = _mm512_permutex2var_epi8(a, pc, b);
            sc[r] = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi8(ps, a)));
            lo[r] = _mm512_and_si512(codes, m4);
            hi[r] = _mm512_and_si512(_mm512_srli_epi16(codes, 4), m4);
            if (r < npf) _mm_prefetch((const char *)(p + PF_ROWS * wrb), _MM_HINT_T0);
        }
        for (int t = 0; t < T; t++) {
            const q4_group *x = xg + (size_t)t * ng + g;
            const __m512i xl = _mm512_load_si512(x->lo), xh = _mm512_load_si512(x->hi);
            const __m512i corr = _mm512_load_si512(x->corr);
            const __m512 dx = _mm512_load_ps(x->d);
            for (int r = 0; r < R; r++) {
                const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(corr, lo[r], xl), hi[r], xh);
                acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(sc[r], dx), acc[r][t]);
            }
        }
    }
    if (R == 4)
        for (int t = 0; t < T; t++) hsum4_store(acc[0][t], acc[1][t], acc[2][t], acc[3][t], y + (size_t)t * ldy);
    else
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) y[(size_t)t * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

#endif

#ifdef QUANT_TILES
/* ---- packed quantized weights ----------------------------------------------
 * The file's blocks keep each fp16 scale beside its codes (18 or 34 bytes),
 * so the tiles above load across cache lines and rearrange every block with
 * byte permutes; at decode that streamed about 20 GB/s a thread where a
 * plain read does 40. moe__wt_pack_rows copies a matrix into tiles of 4 rows
 * (64-byte aligned, padded to 64 bytes):
 *   codes  [ng groups][4 rows][64 bytes]   one aligned vector per row and group
 *   scales [ng][4 rows][G blocks] fp16
 * Q4_0: a group is G = 4 blocks, the 16 code bytes of block k at 16k (the
 * order of q4_group's activations). Q8_0: G = 2 blocks, codes + 128 (the
 * pair tiles' unsigned form). Blocks past the row and rows past the matrix
 * are zero codes with zero scales. The integer products, the lanes and the
 * float operations are those of the unpacked tiles, so a result never
 * depends on which layout computed it. */
static int pk_group_blocks(const moe__wt *w) {
#ifdef Q4_GROUPS
    if (w->type == MOE__GGML_Q4_0) return 4;
#endif
    return w->type == MOE__GGML_Q8_0 ? 2 : 0;
}

static size_t pk_tile_bytes(const moe__wt *w, int G) {
    const size_t ng = ((size_t)w->cols / MOE__GGUF_QK + G - 1) / G;
    return (ng * (256 + 8 * (size_t)G) + 63) / 64 * 64;
}

static void pack_quant(const moe__wt *w, int mat, uint8_t *dst, int r_lo, int r_hi) {
    const int G = pk_group_blocks(w), nb = w->cols / MOE__GGUF_QK, q4 = G == 4;
    const size_t tb = pk_tile_bytes(w, G), ng = (size_t)(nb + G - 1) / G, bs = q4 ? 18 : 34;
    const uint8_t *src = moe__wt_mat(w, mat);
    for (int t = r_lo / 4; t < (r_hi + 3) / 4; t++) {
        uint8_t *tile = dst + (size_t)t * tb, *sc = tile + ng * 256;
        memset(tile, 0, tb);
        for (int r = 0; r < 4 && 4 * t + r < w->rows; r++) {
            const uint8_t *row = src + (size_t)(4 * t + r) * w->row_bytes;
            for (int b = 0; b < nb; b++) {
                const uint8_t *blk = row + (size_t)b * bs;
                uint8_t *c = tile + (size_t)(b / G) * 256 + 64 * r + (q4 ? 16 : 32) * (b % G);
                if (q4) memcpy(c, blk + 2, 16);
                else
                    for (int i = 0; i < 32; i++) c[i] = blk[2 + i] ^ 0x80;
                memcpy(sc + (((size_t)(b / G) * 4 + r) * G + b % G) * 2, blk, 2);
            }
        }
    }
}

#ifndef PK_AHEAD
#define PK_AHEAD 8192 /* bytes: prefetch distance down the packed stream (4 KiB -15%, 16 KiB -5% at decode) */
#endif
/* y[t][r] for the tile's rows r < R and tokens t < T <= 4 over ng groups of
 * activations xt (q4_group or xpair, tok_bytes apart). Lines up to pf_end
 * are prefetched PK_AHEAD bytes ahead (as integers: no pointer past the
 * buffer is formed). */
static inline __attribute__((always_inline)) void pk_tile(int q4, const uint8_t *tile, int ng, const uint8_t *xt,
                                                          size_t tok_bytes, int T, int R, float *y, int ldy,
                                                          uintptr_t pf_end) {
    const int G = q4 ? 4 : 2;
    const uint16_t *scales = (const uint16_t *)(const void *)(tile + (size_t)ng * 256);
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512i idx[4]; /* lane L of row r: scale (r, L / (16 / G)) */
    for (int r = 0; r < 4; r++)
        idx[r] = q4 ? _mm512_set_epi32(4 * r + 3, 4 * r + 3, 4 * r + 3, 4 * r + 3, 4 * r + 2, 4 * r + 2, 4 * r + 2,
                                       4 * r + 2, 4 * r + 1, 4 * r + 1, 4 * r + 1, 4 * r + 1, 4 * r, 4 * r, 4 * r, 4 * r)
                    : _mm512_set_epi32(2 * r + 1, 2 * r + 1, 2 * r + 1, 2 * r + 1, 2 * r + 1, 2 * r + 1, 2 * r + 1,
                                       2 * r + 1, 2 * r, 2 * r, 2 * r, 2 * r, 2 * r, 2 * r, 2 * r, 2 * r);
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        const uint16_t *sg = scales + (size_t)g * 4 * G;
        const __m512 s = q4 ? _mm512_cvtph_ps(_mm256_load_si256((const __m256i *)(const void *)sg))
                            : _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_load_si128((const __m128i *)(const void *)sg)));
        if ((uintptr_t)sg + PK_AHEAD < pf_end) _mm_prefetch((const char *)((uintptr_t)sg + PK_AHEAD), _MM_HINT_T0);
        __m512i lo[4], hi[4];
        __m512 dw[4];
        for (int r = 0; r < 4; r++) {
            const uint8_t *p = tile + (size_t)g * 256 + 64 * r;
            const __m512i v = _mm512_load_si512(p);
            if ((uintptr_t)p + PK_AHEAD < pf_end) _mm_prefetch((const char *)((uintptr_t)p + PK_AHEAD), _MM_HINT_T0);
            lo[r] = q4 ? _mm512_and_si512(v, m4) : v;
            hi[r] = q4 ? _mm512_and_si512(_mm512_srli_epi16(v, 4), m4) : v;
            dw[r] = _mm512_permutexvar_ps(idx[r], s);
        }
        for (int t = 0; t < T; t++) {
            const uint8_t *xp = xt + (size_t)t * tok_bytes;
#ifdef Q4_GROUPS
            if (q4) {
                const q4_group *x = (const q4_group *)(const void *)xp + g;
                const __m512i xl = _mm512_load_si512(x->lo), xh = _mm512_load_si512(x->hi);
                const __m512i corr = _mm512_load_si512(x->corr);
                const __m512 dx = _mm512_load_ps(x->d);
                for (int r = 0; r < 4; r++) {
                    const __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(corr, lo[r], xl), hi[r], xh);
                    acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(dw[r], dx), acc[r][t]);
                }
                continue;
            }
#endif
            {
                const xpair *x = (const xpair *)(const void *)xp + g;
                for (int r = 0; r < 4; r++)
                    acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(x->corr, lo[r], x->x)),
                                                _mm512_mul_ps(dw[r], x->d), acc[r][t]);
            }
        }
    }
    for (int t = 0; t < T; t++) {
        float v[4];
        hsum4_store(acc[0][t], acc[1][t], acc[2][t], acc[3][t], v); /* bit for bit _mm512_reduce_add_ps */
        for (int r = 0; r < R; r++) y[(size_t)t * ldy + r] = v[r];
    }
}

/* Rows [0, nr) (tile-aligned, starting at tile) x tokens [0, nt): 4 x 4
 * tiles of tokens, the edges smaller. */
static void pk_rows(int q4, const uint8_t *tile, size_t tb, int nr, const uint8_t *x, size_t tok_bytes, int nt, int ng,
                    float *y, int ldy, uintptr_t pf_end) {
    for (int r = 0; r < nr; r += 4, tile += tb) {
        const int R = nr - r < 4 ? nr - r : 4;
        for (int t = 0; t < nt; t += 4) {
            const int T = nt - t < 4 ? nt - t : 4;
            const uint8_t *xt = x + (size_t)t * tok_bytes;
            float *yt = y + (size_t)t * ldy + r;
#ifdef Q4_GROUPS
            if (q4) {
                if (T == 4) pk_tile(1, tile, ng, xt, tok_bytes, 4, R, yt, ldy, pf_end);
                else if (T == 1) pk_tile(1, tile, ng, xt, tok_bytes, 1, R, yt, ldy, pf_end); /* decode */
                else pk_tile(1, tile, ng, xt, tok_bytes, T, R, yt, ldy, pf_end);
                continue;
            }
#endif
            {
                if (T == 4) pk_tile(0, tile, ng, xt, tok_bytes, 4, R, yt, ldy, pf_end);
                else if (T == 1) pk_tile(0, tile, ng, xt, tok_bytes, 1, R, yt, ldy, pf_end);
                else pk_tile(0, tile, ng, xt, tok_bytes, T, R, yt, ldy, pf_end);
            }
        }
    }
}
#endif

/* Float matrices keep the file's layout in their copy (the engine makes
 * one with repack 2), which only moves them into huge pages: on the 489M
 * F32 file decode 11-21% and prompts 16-20% faster (same binary, same
 * window). */
size_t moe__wt_packed_bytes(const moe__wt *w) {
    if (!moe__wt_quant(w)) return ((size_t)w->rows * w->row_bytes + 63) / 64 * 64;
#ifdef QUANT_TILES
    const int G = pk_group_blocks(w);
    return G ? ((size_t)w->rows + 3) / 4 * pk_tile_bytes(w, G) : 0;
#else
    return 0;
#endif
}

void moe__wt_pack_rows(const moe__wt *w, int mat, uint8_t *dst, int r_lo, int r_hi) {
    if (!moe__wt_quant(w)) {
        memcpy(dst + (size_t)r_lo * w->row_bytes, moe__wt_mat(w, mat) + (size_t)r_lo * w->row_bytes,
               (size_t)(r_hi - r_lo) * w->row_bytes);
        return;
    }
#ifdef QUANT_TILES
    pack_quant(w, mat, dst, r_lo, r_hi);
#endif
}

#if defined(__AVX512F__)
/* e^x for 16 lanes: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two so
 * n ln2 is exact), e^r by its Taylor series to r^7 (truncation below 1e-8
 * relative), times 2^n by vscalefps, which also gives inf / 0 past the
 * float range. Within 2 ulp of expf; the libm call per element was a tenth
 * of a quantized prompt. */
static inline __m512 exp16(__m512 x) {
    /* past these e^x is 0 or inf anyway; the operand order keeps a NaN */
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(89.0f), x));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x); /* ln2 high part: 16 bits */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);      /* the rest of ln2 */
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}
#endif

void moe__swiglu(float *g, const float *u, size_t n) {
    size_t i = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(g + i);
        const __m512 sg = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(sg, _mm512_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

void moe__exp_shift(float *x, int n, float m) {
    int i = 0;
#if defined(__AVX512F__)
    const __m512 mv = _mm512_set1_ps(m);
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, exp16(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv)));
#endif
    for (; i < n; i++) x[i] = expf(x[i] - m);
}

void moe__wt_row(const moe__wt *w, int mat, int r, float *out) {
    const uint8_t *p = moe__wt_mat(w, mat) + (size_t)r * w->row_bytes;
    moe__gguf_dequantize(w->type, p, out, (size_t)w->cols); /* types checked at load */
}

void moe__split(int n, int align, int ith, int nth, int *lo, int *hi) {
    int chunk = (n + nth - 1) / nth;
    chunk = (chunk + align - 1) / align * align;
    const long a = (long)ith * chunk, b = a + chunk;
    *lo = a < n ? (int)a : n;
    *hi = b < n ? (int)b : n;
}

size_t moe__wt_scratch_bytes(int max_cols) {
    const size_t widen = (size_t)ROW_BLOCK * max_cols * sizeof(float);
    const size_t pairs = (size_t)TOK_BLOCK * ((max_cols / MOE__GGUF_QK + 1) / 2 + 1) * 192;
    return ((widen > pairs ? widen : pairs) + 63) / 64 * 64;
}

size_t moe__qrow_bytes(int cols) { return moe__gguf_row_size(MOE__GGML_Q8_0, (size_t)cols); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
/* moe__gguf_quantize_q8_0 for a row of finite values, 16 lanes at a time,
 * with the same codes and scales: d = amax / 127 and x * (1/d) in float as
 * there, the fp16 scale by the F16C unit (round to nearest even, as
 * moe__gguf_f32_to_fp16), and roundf's half-away-from-zero rounding as trunc
 * plus one step away from zero when the (exact) fraction is at least 1/2.
 * Returns 0 when a value is not finite: the caller then takes the scalar
 * path, which defines what such rows become. Was 4% of a Q4_0 prompt. */
static int quantize_row_fast(const float *x, uint8_t *out, int n) {
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    for (int b = 0; b < n / 32; b++, x += 32, out += sizeof(moe__gguf_block_q8_0)) {
        const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
        const __m512 a0 = _mm512_and_ps(v0, absmask), a1 = _mm512_and_ps(v1, absmask);
        const __m512 inf = _mm512_set1_ps(INFINITY);
        /* !(a < inf) holds for inf and NaN */
        if (_mm512_cmp_ps_mask(a0, inf, _CMP_NLT_UQ) | _mm512_cmp_ps_mask(a1, inf, _CMP_NLT_UQ)) return 0;
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
        const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        const uint16_t dh = (uint16_t)_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT);
        memcpy(out, &dh, 2);
        const __m512 vid = _mm512_set1_ps(id), half = _mm512_set1_ps(0.5f), lim = _mm512_set1_ps(127.0f);
        __m128i codes[2];
        for (int h = 0; h < 2; h++) {
            const __m512 v = _mm512_mul_ps(h ? v1 : v0, vid);
            const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            const __mmask16 up = _mm512_cmp_ps_mask(_mm512_and_ps(_mm512_sub_ps(v, t), absmask), half, _CMP_GE_OQ);
            /* one step away from zero: +1 with the sign of v */
            const __m512 step = _mm512_or_ps(_mm512_set1_ps(1.0f), _mm512_andnot_ps(absmask, v));
            __m512 r = _mm512_mask_add_ps(t, up, t, step);
            r = _mm512_max_ps(_mm512_min_ps(r, lim), _mm512_sub_ps(_mm512_setzero_ps(), lim));
            /* 0 * inf (a subnormal scale's 1/d overflows) is NaN: code 0, as the reference */
            r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), r);
            codes[h] = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r));
        }
        _mm_storeu_si128((__m128i *)(out + 2), codes[0]);
        _mm_storeu_si128((__m128i *)(out + 18), codes[1]);
    }
    return 1;
}
#endif

void moe__quantize_rows(const float *x, int cols, int t0, int t1, uint8_t *q) {
    const size_t qrow = moe__qrow_bytes(cols);
    for (int t = t0; t < t1; t++) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
        if (quantize_row_fast(x + (size_t)t * cols, q + (size_t)t * qrow, cols)) continue;
#endif
        moe__gguf_quantize_q8_0(x + (size_t)t * cols, q + (size_t)t * qrow, (size_t)cols);
    }
}

#ifdef QUANT_TILES
/* Rows [0, nr) x tokens [0, nt) of expanded activations (tok_bytes per
 * token) in 4 x 4 tiles, the edges in smaller ones: the pair tiles, or with
 * q4g the Q4_0 four-block groups. */
static inline __attribute__((always_inline)) void tile(int q4, int q4g, const uint8_t *w, size_t wrb, int R,
                                                       const uint8_t *xt, size_t tok_bytes, int T, int nb, float *y,
                                                       int ldy, int npf) {
#ifdef Q4_GROUPS
    if (q4g) {
        q4_tile(w, wrb, R, (const q4_group *)(const void *)xt, (int)(tok_bytes / sizeof(q4_group)), T, nb % 4, y, ldy,
                npf);
        return;
    }
#endif
    quant_tile(q4, w, wrb, R, (const xpair *)(const void *)xt, (int)(tok_bytes / sizeof(xpair)), T, nb, y, ldy, npf);
}

static void quant_rows(int q4, int q4g, const uint8_t *w, size_t wrb, int nr, const uint8_t *x, size_t tok_bytes,
                       int nt, int nb, float *y, int ldy) {
    for (int r = 0; r < nr; r += 4) {
        const int R = nr - r < 4 ? nr - r : 4;
        const int left = nr - r - PF_ROWS, npf = left < 0 ? 0 : left < 4 ? left : 4;
        for (int t = 0; t < nt; t += 4) {
            const int T = nt - t < 4 ? nt - t : 4;
            const uint8_t *wr = w + (size_t)r * wrb, *xt = x + (size_t)t * tok_bytes;
            float *yt = y + (size_t)t * ldy + r;
            if (R == 4 && T == 4) tile(q4, q4g, wr, wrb, 4, xt, tok_bytes, 4, nb, yt, ldy, npf);
            else if (R == 4 && T == 1) tile(q4, q4g, wr, wrb, 4, xt, tok_bytes, 1, nb, yt, ldy, npf); /* decode */
            else tile(q4, q4g, wr, wrb, R, xt, tok_bytes, T, nb, yt, ldy, npf);
        }
    }
}
#endif

void moe__wt_matmul_rows(const moe__wt *w, int mat, const float *x, const uint8_t *xq, int N, float *y, int ldy,
                         int r_lo, int r_hi, void *scratch, int max_cols, const uint8_t *pk) {
    const int cols = w->cols;
    const int quant = moe__wt_quant(w);
    const size_t qrow = moe__qrow_bytes(cols);
    const uint8_t *base = !quant && pk ? pk : moe__wt_mat(w, mat); /* a float copy has the file's layout */
#ifdef QUANT_TILES
    if (quant) {
        /* a tile of tokens expanded once, then one pass down the thread's rows (at decode the
         * prefetch runs ahead across row blocks) */
        const int q4 = w->type == MOE__GGML_Q4_0, nb = cols / MOE__GGUF_QK, np = (nb + 1) / 2;
#ifdef Q4_GROUPS
        const int q4g = q4; /* Q4_0 in four-block groups */
#else
        const int q4g = 0;
#endif
        const size_t tok_bytes = q4g ? (size_t)(nb + 3) / 4 * Q4_GROUP_BYTES : (size_t)np * sizeof(xpair);
        /* a packed copy of rows [r_lo, r_hi) (r_lo a multiple of 4): its tiles, the stream's end */
        if (pk && q4 && !q4g) pk = NULL; /* no packed Q4_0 kernel without the group tiles */
        const size_t tb = pk ? pk_tile_bytes(w, pk_group_blocks(w)) : 0;
        const uintptr_t pf_end = pk ? (uintptr_t)pk + (size_t)(r_hi + 3) / 4 * tb : 0;
        /* several token tiles: rows in chunks of about 256 KB (L2), each re-read per tile */
        size_t rc = N <= TOK_BLOCK ? (size_t)(r_hi - r_lo) : ((size_t)1 << 18) / w->row_bytes / 4 * 4;
        if (rc < 4) rc = 4;
        for (int c0 = r_lo; c0 < r_hi; c0 += (int)rc) {
            const int nr = (size_t)(r_hi - c0) < rc ? r_hi - c0 : (int)rc;
            for (int t0 = 0; t0 < N; t0 += TOK_BLOCK) {
                const int nt = N - t0 < TOK_BLOCK ? N - t0 : TOK_BLOCK;
#ifdef Q4_GROUPS
                if (q4g) expand_q4(xq + (size_t)t0 * qrow, qrow, nt, nb, scratch);
                else
#endif
                    expand_x(q4, xq + (size_t)t0 * qrow, qrow, nt, nb, (xpair *)scratch);
                if (pk)
                    pk_rows(q4, pk + (size_t)c0 / 4 * tb, tb, nr, (const uint8_t *)scratch, tok_bytes, nt,
                            q4 ? (nb + 3) / 4 : np, y + (size_t)t0 * ldy + c0, ldy, pf_end);
                else
                    quant_rows(q4, q4g, base + (size_t)c0 * w->row_bytes, w->row_bytes, nr, (const uint8_t *)scratch,
                               tok_bytes, nt, nb, y + (size_t)t0 * ldy + c0, ldy);
            }
        }
        return;
    }
#endif
    for (int r0 = r_lo; r0 < r_hi; r0 += ROW_BLOCK) {
        const int nr = r_hi - r0 < ROW_BLOCK ? r_hi - r0 : ROW_BLOCK;
        const uint8_t *wb = base + (size_t)r0 * w->row_bytes;
        const float *wf = (const float *)(const void *)wb; /* F32 rows, contiguous */
        size_t wstride = (size_t)cols;
        if (w->type == MOE__GGML_F16 || w->type == MOE__GGML_BF16) { /* widen the block once for all tokens */
            for (int r = 0; r < nr; r++)
                moe__gguf_dequantize(w->type, wb + (size_t)r * w->row_bytes, (float *)scratch + (size_t)r * max_cols,
                                     (size_t)cols);
            wf = (const float *)scratch, wstride = (size_t)max_cols;
        }
        /* token tiles keep the block's rows and a tile of activations in cache */
        for (int t0 = 0; t0 < N; t0 += TOK_BLOCK) {
            const int t1 = N - t0 < TOK_BLOCK ? N : t0 + TOK_BLOCK;
            if (!quant) {
                float_tile(wf, wstride, nr, x, cols, t0, t1, y + r0, ldy);
                continue;
            }
#ifndef QUANT_TILES
            for (int r = 0; r < nr; r++) {
                const uint8_t *wr = wb + (size_t)r * w->row_bytes;
                float *yr = y + r0 + r;
                for (int t = t0; t < t1; t++)
                    yr[(size_t)t * ldy] = w->type == MOE__GGML_Q8_0
                                              ? moe__gguf_vec_dot_q8_0_q8_0((size_t)cols, wr, xq + (size_t)t * qrow)
                                              : moe__gguf_vec_dot_q4_0_q8_0((size_t)cols, wr, xq + (size_t)t * qrow);
            }
#endif
        }
    }
}

/* The kernel set this build compiled (a compile-time choice until the
 * per-ISA kernel files of issue "One engine for every CPU" land). */
const char *moe_kernel_set(void) {
#if defined(QUANT_TILES) && defined(Q4_GROUPS)
    return "avx512-vnni-vbmi: AVX-512 float tiles, VNNI Q8_0/Q4_0 tiles, VBMI Q4_0 groups";
#elif defined(QUANT_TILES)
    return "avx512-vnni: AVX-512 float tiles, VNNI Q8_0/Q4_0 tiles";
#elif defined(__AVX512F__)
    return "avx512: AVX-512 float kernels, generic C quantized dot products";
#elif defined(__AVX2__)
    return "generic C compiled for AVX2 (compiler-vectorized; no hand-written AVX2 kernels yet)";
#else
    return "generic C";
#endif
}
