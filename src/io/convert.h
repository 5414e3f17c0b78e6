/* Internal: model conversions (docs/convert.md). The public entry points are
 * moe_convert_* in moe.h; this header holds what convert*.c share. */
#ifndef MOE_IO_CONVERT_H
#define MOE_IO_CONVERT_H

#include "internal.h"

/* Permutes the rows of a q or k projection W [n_head][D][cols] from Hugging
 * Face rotate_half order (pairs i, i + D/2) to llama.cpp's adjacent pairs
 * (2i, 2i+1), as convert_hf_to_gguf.py's LlamaModel.permute does:
 * dst row h*D + 2i + j = src row h*D + j*D/2 + i. inverse != 0 undoes it.
 * D must be even; src and dst must not overlap. */
void moe__permute_qk(const float *src, float *dst, int n_head, int D, int cols, int inverse);

#endif
