/* ggml type table, fp16/bf16 conversions, Q8_0/Q4_0 (de)quantization and the
 * quantized dot products (scalar reference + AVX2 / AVX-512 versions). */
#include "io/quant.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "quant.c assumes a little-endian host"
#endif

/* ---- type table ------------------------------------------------------------ */

#define QKK 256 /* super-block of the K- and IQ-quants */

static void to_float_f32(const void *src, float *dst, size_t n);
static void to_float_f16(const void *src, float *dst, size_t n);
static void to_float_bf16(const void *src, float *dst, size_t n);
static void to_float_q8_0(const void *src, float *dst, size_t n);
static void to_float_q4_0(const void *src, float *dst, size_t n);
static void to_float_q6_k(const void *src, float *dst, size_t n);
static void to_float_q4_k(const void *src, float *dst, size_t n);
static int from_float_f32(const float *src, void *dst, size_t n);
static int from_float_f16(const float *src, void *dst, size_t n);
static int from_float_bf16(const float *src, void *dst, size_t n);

#define FLOAT_ROW(f) to_float_##f, from_float_##f, MOE__TYPE_ENGINE_FLOAT
#define QUANT_ROW(f) to_float_##f, moe__gguf_quantize_##f, MOE__TYPE_ENGINE_QUANT

/* Block sizes and bytes per block of the published ggml types (gguf-py
 * constants.py GGML_QUANT_SIZES; MXFP4 from ggml-common.h). Codes 4, 5 and
 * 31..33, 36..38 were removed from ggml and stay unknown. */
static const moe__gguf_type_info k_types[] = {
    [0] = {"F32", 1, 4, FLOAT_ROW(f32)},
    [1] = {"F16", 1, 2, FLOAT_ROW(f16)},
    [2] = {"Q4_0", 32, 18, QUANT_ROW(q4_0)},
    [3] = {"Q4_1", 32, 20},
    [6] = {"Q5_0", 32, 22},
    [7] = {"Q5_1", 32, 24},
    [8] = {"Q8_0", 32, 34, QUANT_ROW(q8_0)},
    [9] = {"Q8_1", 32, 36},
    [10] = {"Q2_K", QKK, 2 + 2 + QKK / 16 + QKK / 4},
    [11] = {"Q3_K", QKK, 2 + QKK / 4 + QKK / 8 + 12},
    [12] = {"Q4_K", QKK, 2 + 2 + QKK / 2 + 12, to_float_q4_k}, /* no kernel yet: engine NONE */
    [13] = {"Q5_K", QKK, 2 + 2 + QKK / 2 + QKK / 8 + 12},
    [14] = {"Q6_K", QKK, 2 + QKK / 2 + QKK / 4 + QKK / 16, to_float_q6_k}, /* no kernel yet: engine NONE */
    [15] = {"Q8_K", QKK, 4 + QKK + QKK / 8},
    [16] = {"IQ2_XXS", QKK, 2 + QKK / 4},
    [17] = {"IQ2_XS", QKK, 2 + QKK / 4 + QKK / 32},
    [18] = {"IQ3_XXS", QKK, 2 + QKK / 4 + QKK / 8},
    [19] = {"IQ1_S", QKK, 2 + QKK / 8 + QKK / 16},
    [20] = {"IQ4_NL", 32, 18},
    [21] = {"IQ3_S", QKK, 2 + QKK / 4 + QKK / 8 + QKK / 32 + 4},
    [22] = {"IQ2_S", QKK, 2 + QKK / 4 + QKK / 16},
    [23] = {"IQ4_XS", QKK, 2 + 2 + QKK / 2 + QKK / 64},
    [24] = {"I8", 1, 1},
    [25] = {"I16", 1, 2},
    [26] = {"I32", 1, 4},
    [27] = {"I64", 1, 8},
    [28] = {"F64", 1, 8},
    [29] = {"IQ1_M", QKK, QKK / 8 + QKK / 16 + QKK / 32},
    [30] = {"BF16", 1, 2, FLOAT_ROW(bf16)},
    [34] = {"TQ1_0", QKK, 2 + 4 * 13},
    [35] = {"TQ2_0", QKK, 2 + 64},
    [39] = {"MXFP4", 32, 1 + 16},
};
#undef FLOAT_ROW
#undef QUANT_ROW

const moe__gguf_type_info *moe__gguf_type_info_of(uint32_t type) {
    if (type >= sizeof k_types / sizeof *k_types || !k_types[type].name) return NULL;
    return &k_types[type];
}

const char *moe__gguf_type_name(uint32_t type) {
    const moe__gguf_type_info *t = moe__gguf_type_info_of(type);
    return t ? t->name : "?";
}

void moe__gguf_loadable_type_names(char *buf, size_t n) {
    size_t len = 0;
    if (n) buf[0] = '\0';
    for (size_t i = 0; i < sizeof k_types / sizeof *k_types; i++)
        if (k_types[i].name && (k_types[i].engine != MOE__TYPE_ENGINE_NONE || k_types[i].to_float) && len < n)
            len += (size_t)snprintf(buf + len, n - len, "%s%s", len ? ", " : "", k_types[i].name);
}

size_t moe__gguf_row_size(uint32_t type, size_t n) {
    const moe__gguf_type_info *t = moe__gguf_type_info_of(type);
    size_t r;
    if (!t || n % t->blck || moe__mul_size(n / t->blck, t->size, &r)) return 0;
    return r;
}

/* ---- half precision -------------------------------------------------------- */

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float moe__gguf_fp16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) /* inf, or NaN: payload kept, made quiet as the F16C unit does */
        return bits_f32(sign | 0x7f800000u | (man ? 0x400000u | man << 13 : 0));
    if (exp) return bits_f32(sign | (exp + 112) << 23 | man << 13); /* rebias 15 -> 127 */
    float v = (float)man * 0x1p-24f; /* zero or subnormal: exact */
    return sign ? -v : v;
}

uint16_t moe__gguf_f32_to_fp16(float f) {
    uint32_t x = f32_bits(f), ax = x & 0x7fffffffu;
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    if (ax > 0x7f800000u) /* NaN: quiet, top payload bits kept */
        return (uint16_t)(sign | 0x7e00 | ((ax >> 13) & 0x3ff));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* >= 65520 rounds to inf */
    if (ax < 0x38800000u) { /* below 2^-14: a subnormal half (or zero) */
        /* ax * 2^24 is exact; rintf rounds to nearest even in the default mode.
         * 1024 (= 2^-14) comes out as the smallest normal, which is right. */
        float v = rintf(bits_f32(ax) * 0x1p24f);
        return (uint16_t)(sign | (uint16_t)v);
    }
    /* Normal: drop 13 mantissa bits with round-to-nearest-even; a carry moves
     * into the exponent, which is the correct result. */
    uint32_t r = ax - 0x38000000u + 0xfffu + ((ax >> 13) & 1);
    return (uint16_t)(sign | (r >> 13));
}

float moe__gguf_bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

uint16_t moe__gguf_f32_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

static uint16_t load_u16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }

static void store_u16(unsigned char *p, uint16_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

/* ---- dequantization -------------------------------------------------------- */

static void to_float_f32(const void *src, float *dst, size_t n) { memcpy(dst, src, n * sizeof(float)); }

static void to_float_f16(const void *src, float *dst, size_t n) {
    const unsigned char *p = src;
    size_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * i))));
#endif
    for (; i < n; i++) dst[i] = moe__gguf_fp16_to_f32(load_u16(p + 2 * i));
}

static void to_float_bf16(const void *src, float *dst, size_t n) {
    const unsigned char *p = src;
    for (size_t i = 0; i < n; i++) dst[i] = moe__gguf_bf16_to_f32(load_u16(p + 2 * i));
}

static void to_float_q8_0(const void *src, float *dst, size_t n) {
    const unsigned char *p = src;
    for (size_t b = 0; b < n / MOE__GGUF_QK; b++, p += sizeof(moe__gguf_block_q8_0)) {
        float d = moe__gguf_fp16_to_f32(load_u16(p));
        const int8_t *qs = (const int8_t *)(p + 2);
        for (int j = 0; j < MOE__GGUF_QK; j++) dst[b * MOE__GGUF_QK + (size_t)j] = (float)qs[j] * d;
    }
}

static void to_float_q4_0(const void *src, float *dst, size_t n) {
    const unsigned char *p = src;
    for (size_t b = 0; b < n / MOE__GGUF_QK; b++, p += sizeof(moe__gguf_block_q4_0)) {
        float d = moe__gguf_fp16_to_f32(load_u16(p));
        const unsigned char *qs = p + 2;
        float *y = dst + b * MOE__GGUF_QK;
        for (int j = 0; j < MOE__GGUF_QK / 2; j++) {
            y[j] = (float)((qs[j] & 15) - 8) * d;
            y[j + MOE__GGUF_QK / 2] = (float)((qs[j] >> 4) - 8) * d;
        }
    }
}

/* Q6_K, 210 bytes per 256 values: ql[128] (low 4 bits), qh[64] (high 2 bits),
 * int8 scales[16] (one per 16 values), fp16 d last. Each half of 128 values
 * takes 64 bytes of ql and 32 of qh: value 32g + l (g = 0..3, l = 0..31) has
 * its low nibble in ql[l + 32 (g & 1)] (low nibble for g < 2, high for g >= 2)
 * and its high bits at (qh[l] >> 2g) & 3; x = d * scale * (q - 32), in that
 * order (llama.cpp's dequantize_row_q6_K, bit for bit). */
static void to_float_q6_k(const void *src, float *dst, size_t n) {
    const unsigned char *p = src;
    for (size_t b = 0; b < n / QKK; b++, p += 2 + QKK / 2 + QKK / 4 + QKK / 16) {
        const unsigned char *ql = p, *qh = p + QKK / 2;
        const int8_t *sc = (const int8_t *)(p + QKK / 2 + QKK / 4);
        const float d = moe__gguf_fp16_to_f32(load_u16(p + QKK / 2 + QKK / 4 + QKK / 16));
        float *y = dst + b * QKK;
        for (int half = 0; half < 2; half++, ql += 64, qh += 32, sc += 8, y += 128)
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = (int)((ql[l] & 15) | ((qh[l] >> 0 & 3) << 4)) - 32;
                const int q2 = (int)((ql[l + 32] & 15) | ((qh[l] >> 2 & 3) << 4)) - 32;
                const int q3 = (int)((ql[l] >> 4) | ((qh[l] >> 4 & 3) << 4)) - 32;
                const int q4 = (int)((ql[l + 32] >> 4) | ((qh[l] >> 6 & 3) << 4)) - 32;
                y[l] = d * (float)sc[is] * (float)q1;
                y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                y[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
    }
}

int moe__gguf_dequantize(uint32_t type, const void *src, float *dst, size_t n) {
    const moe__gguf_type_info *t = moe__gguf_type_info_of(type);
    if (!t || !t->to_float) return MOE_EUNSUPPORTED;
    if (n % t->blck) return MOE_EINVAL;
    if (n == 0) return 0;
    if (!src || !dst) return MOE_EINVAL;
    t->to_float(src, dst, n);
    return 0;
}

/* ---- quantization ---------------------------------------------------------- */

/* The reference computes x*id and then adds 8.5 with two roundings; a fused
 * multiply-add would change a few codes, so contraction is off here. */
#if defined(__GNUC__) && !defined(__clang__)
#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define NO_CONTRACT
#endif

NO_CONTRACT int moe__gguf_quantize_q8_0(const float *src, void *dst, size_t n) {
    if (n % MOE__GGUF_QK) return MOE_EINVAL;
    if (n && (!src || !dst)) return MOE_EINVAL;
    int rc = 0;
    unsigned char *out = dst;
    for (size_t b = 0; b < n / MOE__GGUF_QK; b++, out += sizeof(moe__gguf_block_q8_0)) {
        const float *x = src + b * MOE__GGUF_QK;
        float amax = 0.0f;
        for (int j = 0; j < MOE__GGUF_QK; j++) {
            if (!isfinite(x[j])) {
                rc = MOE_ENONFINITE;
                continue;
            }
            float a = fabsf(x[j]);
            if (a > amax) amax = a;
        }
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t dh = moe__gguf_f32_to_fp16(d);
        if ((dh & 0x7fff) == 0x7c00 && !rc) rc = MOE_ELIMIT;
        store_u16(out, dh);
        int8_t *qs = (int8_t *)(out + 2);
        for (int j = 0; j < MOE__GGUF_QK; j++) {
            /* Same codes as (int8_t)roundf(x*id) wherever that is defined; NaN
             * (a non-finite input, or 0*inf for a subnormal scale) gives 0. */
            float r = isfinite(x[j]) ? roundf(x[j] * id) : 0.0f;
            qs[j] = (int8_t)(r >= 127.0f ? 127 : r <= -127.0f ? -127 : r == r ? (int)r : 0);
        }
    }
    return rc;
}

NO_CONTRACT int moe__gguf_quantize_q4_0(const float *src, void *dst, size_t n) {
    if (n % MOE__GGUF_QK) return MOE_EINVAL;
    if (n && (!src || !dst)) return MOE_EINVAL;
    int rc = 0;
    unsigned char *out = dst;
    for (size_t b = 0; b < n / MOE__GGUF_QK; b++, out += sizeof(moe__gguf_block_q4_0)) {
        const float *x = src + b * MOE__GGUF_QK;
        float amax = 0.0f, max = 0.0f; /* max: the first element of largest magnitude */
        for (int j = 0; j < MOE__GGUF_QK; j++) {
            if (!isfinite(x[j])) {
                rc = MOE_ENONFINITE;
                continue;
            }
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        }
        float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        uint16_t dh = moe__gguf_f32_to_fp16(d);
        if ((dh & 0x7fff) == 0x7c00 && !rc) rc = MOE_ELIMIT;
        store_u16(out, dh);
        unsigned char q[MOE__GGUF_QK];
        for (int j = 0; j < MOE__GGUF_QK; j++) {
            /* min(15, (int8_t)(x*id + 8.5)): the sum lies in [0.5, 16.5] for
             * finite inputs, so truncation is a floor; NaN gives code 8 (zero). */
            float t = x[j] * id;
            t = t + 8.5f;
            q[j] = !isfinite(x[j]) || t != t ? 8 : t >= 15.0f ? 15 : t > 0.0f ? (unsigned char)t : 0;
        }
        for (int j = 0; j < MOE__GGUF_QK / 2; j++)
            out[2 + j] = (unsigned char)(q[j] | q[j + MOE__GGUF_QK / 2] << 4);
    }
    return rc;
}

static int from_float_f32(const float *src, void *dst, size_t n) {
    int rc = 0;
    if (n) memcpy(dst, src, n * sizeof(float));
    for (size_t i = 0; i < n && !rc; i++)
        if (!isfinite(src[i])) rc = MOE_ENONFINITE;
    return rc;
}

/* F16 / BF16: inf is the code of both an overflow (MOE_ELIMIT) and an
 * infinite input (MOE_ENONFINITE). */
static int from_float_half(const float *src, unsigned char *p, size_t n, int bf16) {
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        const uint16_t h = bf16 ? moe__gguf_f32_to_bf16(src[i]) : moe__gguf_f32_to_fp16(src[i]);
        store_u16(p + 2 * i, h);
        if (!rc && !isfinite(src[i])) rc = MOE_ENONFINITE;
        else if (!rc && (h & 0x7fff) == (bf16 ? 0x7f80 : 0x7c00)) rc = MOE_ELIMIT;
    }
    return rc;
}

static int from_float_f16(const float *src, void *dst, size_t n) { return from_float_half(src, dst, n, 0); }
static int from_float_bf16(const float *src, void *dst, size_t n) { return from_float_half(src, dst, n, 1); }

/* Q4_K, 144 bytes per 256 values: fp16 d, fp16 dmin, 12 bytes of 6-bit
 * scales and mins of the 8 sub-blocks of 32 (get_scale_min_k4 below), 128
 * bytes of 4-bit codes: values 64c .. 64c + 31 are the low nibbles of
 * qs[32c ..], 64c + 32 .. the high ones. x = (d * sc) * q - dmin * mn with two
 * roundings, as llama.cpp's dequantize_row_q4_K reads in C; a build of it
 * that contracts the last step into an FMA differs in the last bit, so this
 * file pins the uncontracted form (every build of ours gives the same bits). */
static void scale_min_k4(int j, const unsigned char *k, int *sc, int *mn) {
    if (j < 4) {
        *sc = k[j] & 63, *mn = k[j + 4] & 63;
    } else {
        *sc = (k[j + 4] & 15) | (k[j - 4] >> 6) << 4;
        *mn = (k[j + 4] >> 4) | (k[j] >> 6) << 4;
    }
}

NO_CONTRACT static void to_float_q4_k(const void *src, float *dst, size_t n) {
    const unsigned char *p = src;
    for (size_t b = 0; b < n / QKK; b++, p += 4 + 12 + QKK / 2) {
        const float d = moe__gguf_fp16_to_f32(load_u16(p)), dmin = moe__gguf_fp16_to_f32(load_u16(p + 2));
        const unsigned char *k = p + 4, *qs = p + 16;
        float *y = dst + b * QKK;
        for (int c = 0; c < 4; c++, qs += 32, y += 64) {
            int sc, mn;
            scale_min_k4(2 * c, k, &sc, &mn);
            const float d1 = d * (float)sc, m1 = dmin * (float)mn;
            scale_min_k4(2 * c + 1, k, &sc, &mn);
            const float d2 = d * (float)sc, m2 = dmin * (float)mn;
            for (int l = 0; l < 32; l++) y[l] = d1 * (float)(qs[l] & 15) - m1;
            for (int l = 0; l < 32; l++) y[l + 32] = d2 * (float)(qs[l] >> 4) - m2;
        }
    }
}

int moe__gguf_quantize(uint32_t type, const float *src, void *dst, size_t n) {
    const moe__gguf_type_info *t = moe__gguf_type_info_of(type);
    if (!t || !t->from_float) return MOE_EUNSUPPORTED;
    if (n % t->blck || (n && (!src || !dst))) return MOE_EINVAL;
    return t->from_float(src, dst, n);
}

/* ---- dot products ---------------------------------------------------------- */

float moe__gguf_vec_dot_q8_0_q8_0_ref(size_t n, const void *x, const void *y) {
    const unsigned char *px = x, *py = y;
    float sum = 0.0f;
    for (size_t b = 0; b < n / MOE__GGUF_QK; b++) {
        const int8_t *qx = (const int8_t *)(px + 2), *qy = (const int8_t *)(py + 2);
        int sumi = 0;
        for (int j = 0; j < MOE__GGUF_QK; j++) sumi += qx[j] * qy[j];
        sum += (float)sumi * (moe__gguf_fp16_to_f32(load_u16(px)) * moe__gguf_fp16_to_f32(load_u16(py)));
        px += sizeof(moe__gguf_block_q8_0);
        py += sizeof(moe__gguf_block_q8_0);
    }
    return sum;
}

float moe__gguf_vec_dot_q4_0_q8_0_ref(size_t n, const void *x, const void *y) {
    const unsigned char *px = x, *py = y;
    float sum = 0.0f;
    for (size_t b = 0; b < n / MOE__GGUF_QK; b++) {
        const unsigned char *qx = px + 2;
        const int8_t *qy = (const int8_t *)(py + 2);
        int sumi = 0;
        for (int j = 0; j < MOE__GGUF_QK / 2; j++)
            sumi += ((qx[j] & 15) - 8) * qy[j] + ((qx[j] >> 4) - 8) * qy[j + MOE__GGUF_QK / 2];
        sum += (float)sumi * (moe__gguf_fp16_to_f32(load_u16(px)) * moe__gguf_fp16_to_f32(load_u16(py)));
        px += sizeof(moe__gguf_block_q4_0);
        py += sizeof(moe__gguf_block_q8_0);
    }
    return sum;
}

/* The SIMD versions widen the codes to int16 and use madd (pairwise products
 * summed into int32), which is exact for every int8 code, -128 included; the
 * sign trick of maddubs is not. Per-lane integer sums are below 2^24, so they
 * convert to float exactly; only the float accumulation order differs from
 * the reference. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define VEC_DOT_IMPL "avx512"

static float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }

float moe__gguf_vec_dot_q8_0_q8_0(size_t n, const void *x, const void *y) {
    const unsigned char *px = x, *py = y;
    __m512 acc = _mm512_setzero_ps();
    for (size_t b = 0; b < n / MOE__GGUF_QK; b++) {
        __m512i qx = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(px + 2)));
        __m512i qy = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(py + 2)));
        __m512 s = _mm512_cvtepi32_ps(_mm512_madd_epi16(qx, qy));
        float d = moe__gguf_fp16_to_f32(load_u16(px)) * moe__gguf_fp16_to_f32(load_u16(py));
        acc = _mm512_fmadd_ps(s, _mm512_set1_ps(d), acc);
        px += sizeof(moe__gguf_block_q8_0);
        py += sizeof(moe__gguf_block_q8_0);
    }
    return hsum512(acc);
}

float moe__gguf_vec_dot_q4_0_q8_0(size_t n, const void *x, const void *y) {
    const unsigned char *px = x, *py = y;
    const __m128i m4 = _mm_set1_epi8(15);
    const __m512i eight = _mm512_set1_epi16(8);
    __m512 acc = _mm512_setzero_ps();
    for (size_t b = 0; b < n / MOE__GGUF_QK; b++) {
        __m128i q = _mm_loadu_si128((const __m128i *)(px + 2));
        __m256i nib = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m4), _mm_and_si128(q, m4));
        __m512i qx = _mm512_sub_epi16(_mm512_cvtepu8_epi16(nib), eight);
        __m512i qy = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(py + 2)));
        __m512 s = _mm512_cvtepi32_ps(_mm512_madd_epi16(qx, qy));
        float d = moe__gguf_fp16_to_f32(load_u16(px)) * moe__gguf_fp16_to_f32(load_u16(py));
        acc = _mm512_fmadd_ps(s, _mm512_set1_ps(d), acc);
        px += sizeof(moe__gguf_block_q4_0);
        py += sizeof(moe__gguf_block_q8_0);
    }
    return hsum512(acc);
}

#elif defined(__AVX2__) && defined(__FMA__)
#define VEC_DOT_IMPL "avx2"

static float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static __m256i madd_i8(__m128i a_lo, __m128i a_hi, const unsigned char *y) {
    __m256i y0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)y));
    __m256i y1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(y + 16)));
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_cvtepi8_epi16(a_lo), y0),
                            _mm256_madd_epi16(_mm256_cvtepi8_epi16(a_hi), y1));
}

float moe__gguf_vec_dot_q8_0_q8_0(size_t n, const void *x, const void *y) {
    const unsigned char *px = x, *py = y;
    __m256 acc = _mm256_setzero_ps();
    for (size_t b = 0; b < n / MOE__GGUF_QK; b++) {
        __m256i s = madd_i8(_mm_loadu_si128((const __m128i *)(px + 2)),
                            _mm_loadu_si128((const __m128i *)(px + 18)), py + 2);
        float d = moe__gguf_fp16_to_f32(load_u16(px)) * moe__gguf_fp16_to_f32(load_u16(py));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d), acc);
        px += sizeof(moe__gguf_block_q8_0);
        py += sizeof(moe__gguf_block_q8_0);
    }
    return hsum256(acc);
}

float moe__gguf_vec_dot_q4_0_q8_0(size_t n, const void *x, const void *y) {
    const unsigned char *px = x, *py = y;
    const __m128i m4 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    __m256 acc = _mm256_setzero_ps();
    for (size_t b = 0; b < n / MOE__GGUF_QK; b++) {
        __m128i q = _mm_loadu_si128((const __m128i *)(px + 2));
        __m128i lo = _mm_sub_epi8(_mm_and_si128(q, m4), eight);
        __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(q, 4), m4), eight);
        __m256i s = madd_i8(lo, hi, py + 2);
        float d = moe__gguf_fp16_to_f32(load_u16(px)) * moe__gguf_fp16_to_f32(load_u16(py));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d), acc);
        px += sizeof(moe__gguf_block_q4_0);
        py += sizeof(moe__gguf_block_q8_0);
    }
    return hsum256(acc);
}

#else
#define VEC_DOT_IMPL "scalar"

float moe__gguf_vec_dot_q8_0_q8_0(size_t n, const void *x, const void *y) {
    return moe__gguf_vec_dot_q8_0_q8_0_ref(n, x, y);
}

float moe__gguf_vec_dot_q4_0_q8_0(size_t n, const void *x, const void *y) {
    return moe__gguf_vec_dot_q4_0_q8_0_ref(n, x, y);
}
#endif

const char *moe__gguf_vec_dot_impl(void) { return VEC_DOT_IMPL; }
