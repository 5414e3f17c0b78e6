/* Internal: ggml tensor types, half-precision conversions, and the Q8_0 / Q4_0
 * block quantizations of llama.cpp (docs/gguf.md).
 *
 * Block layouts (little-endian, packed, contiguous along ne[0]):
 *   Q8_0: 34 bytes per 32 values  { fp16 d; int8 qs[32]; }     x_j = qs[j] * d
 *   Q4_0: 18 bytes per 32 values  { fp16 d; uint8 qs[16]; }    x_j      = ((qs[j] & 15) - 8) * d
 *                                                               x_{j+16} = ((qs[j] >> 4) - 8) * d
 * Quantization follows llama.cpp's reference rounding bit for bit:
 *   Q8_0: d = max|x| / 127, q = round-half-away(x / d) (x * (1/d) in float)
 *   Q4_0: m = the element of largest |x| (first one on ties, sign kept),
 *         d = m / -8, q = min(15, trunc(x * (1/d) + 8.5))
 * The scale is stored as fp16 but the codes are computed with the float d.
 *
 * Row pointers may be unaligned: blocks are read and written with memcpy-safe
 * accesses. */
#ifndef MOE_IO_QUANT_H
#define MOE_IO_QUANT_H

#include "internal.h"

/* ggml_type codes as stored in GGUF tensor infos (the ones this library
 * computes with; the reader knows the sizes of the other published types). */
typedef enum moe__ggml_type {
    MOE__GGML_F32 = 0,
    MOE__GGML_F16 = 1,
    MOE__GGML_Q4_0 = 2,
    MOE__GGML_Q8_0 = 8,
    MOE__GGML_BF16 = 30,
} moe__ggml_type;

#define MOE__GGUF_QK 32 /* values per Q8_0 / Q4_0 block */

typedef struct moe__gguf_block_q8_0 {
    uint16_t d;        /* fp16 scale */
    int8_t qs[MOE__GGUF_QK];
} moe__gguf_block_q8_0;

typedef struct moe__gguf_block_q4_0 {
    uint16_t d;        /* fp16 scale */
    uint8_t qs[MOE__GGUF_QK / 2];
} moe__gguf_block_q4_0;

_Static_assert(sizeof(moe__gguf_block_q8_0) == 34, "Q8_0 block must be 34 bytes");
_Static_assert(sizeof(moe__gguf_block_q4_0) == 18, "Q4_0 block must be 18 bytes");

/* How the engine computes with a weight type (infer/kernels.c). */
typedef enum moe__type_engine {
    MOE__TYPE_ENGINE_NONE = 0, /* refused by the engine's loader */
    MOE__TYPE_ENGINE_FLOAT,    /* float rows (F32, F16, BF16) against float activations */
    MOE__TYPE_ENGINE_QUANT,    /* blocks of 32 against Q8_0-quantized activations */
} moe__type_engine;

/* One row per ggml type: everything the library knows of it, so that "which
 * types are supported" is read here and nowhere else. to_float and
 * from_float convert n values (a multiple of blck; src / dst unaligned);
 * NULL where the library cannot (the type is then refused by name).
 * from_float returns the codes of moe__gguf_quantize. */
typedef struct moe__gguf_type_info {
    const char *name; /* "F32", "Q4_K", ... */
    uint32_t blck;    /* values per block */
    uint32_t size;    /* bytes per block */
    void (*to_float)(const void *src, float *dst, size_t n);
    int (*from_float)(const float *src, void *dst, size_t n);
    moe__type_engine engine;
} moe__gguf_type_info;

/* NULL for a code that is not a published ggml type (or was removed). */
const moe__gguf_type_info *moe__gguf_type_info_of(uint32_t type);
/* The names of the types the engine loads, "F32, F16, ..." in type code
 * order: those it computes with and those it converts to F32 at load (for
 * messages that refuse the others). */
void moe__gguf_loadable_type_names(char *buf, size_t n);
/* Name of a ggml type, "?" when unknown. */
const char *moe__gguf_type_name(uint32_t type);
/* Bytes of n values of type; 0 when the type is unknown, n is not a multiple
 * of its block size, or the size overflows. */
size_t moe__gguf_row_size(uint32_t type, size_t n);

/* IEEE half and bfloat16. To-half rounds to nearest even, overflows to inf,
 * keeps NaN a NaN (quiet) and rounds into subnormals correctly. */
float moe__gguf_fp16_to_f32(uint16_t h);
uint16_t moe__gguf_f32_to_fp16(float f);
float moe__gguf_bf16_to_f32(uint16_t h);
uint16_t moe__gguf_f32_to_bf16(float f);

/* n values of type at src (unaligned allowed) to float. MOE_EUNSUPPORTED for
 * types other than F32/F16/BF16/Q8_0/Q4_0, MOE_EINVAL when n is not a
 * multiple of the block size. */
int moe__gguf_dequantize(uint32_t type, const void *src, float *dst, size_t n);

/* n floats to type at dst (moe__gguf_row_size(type, n) bytes). Every value is
 * written even on error. Returns MOE_ENONFINITE when an input is NaN/Inf (in
 * Q8_0/Q4_0 it is then stored as 0 and left out of the block's scale),
 * MOE_ELIMIT when a block's scale overflows
 * fp16 (|x| > 65504*127 in Q8_0, > 65504*8 in Q4_0; the scale becomes inf),
 * MOE_EINVAL / MOE_EUNSUPPORTED as above. */
int moe__gguf_quantize(uint32_t type, const float *src, void *dst, size_t n);
int moe__gguf_quantize_q8_0(const float *src, void *dst, size_t n);
int moe__gguf_quantize_q4_0(const float *src, void *dst, size_t n);

/* Dot products of n values (n a multiple of 32) with activations already
 * quantized to Q8_0, as llama.cpp computes Q8_0 and Q4_0 matmuls:
 *   sum over blocks of (integer dot of the codes) * d_x * d_y.
 * The plain versions use AVX2 (and AVX-512 where compiled for it) and differ
 * from the scalar _ref versions only by float summation order. */
float moe__gguf_vec_dot_q8_0_q8_0(size_t n, const void *x, const void *y);
float moe__gguf_vec_dot_q4_0_q8_0(size_t n, const void *x, const void *y);
float moe__gguf_vec_dot_q8_0_q8_0_ref(size_t n, const void *x, const void *y);
float moe__gguf_vec_dot_q4_0_q8_0_ref(size_t n, const void *x, const void *y);
/* Name of the kernel the plain versions use: "avx512", "avx2" or "scalar". */
const char *moe__gguf_vec_dot_impl(void);

#endif
