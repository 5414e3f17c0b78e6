/* Finding and naming non-finite values in a model's parameter-shaped arrays
 * (weights on load, gradients after a bad step). */
#ifndef MOE_NUMERICS_H
#define MOE_NUMERICS_H

#include "moe.h"

#include <stddef.h>

/* Index in the model's tensor table of the first tensor whose slice of arr
 * (laid out like the parameters) holds a NaN or Inf, scanning the table
 * forward, or backward (the order in which backprop produces gradients, so
 * the first bad gradient is the one closest to the loss); -1 when all are
 * finite. *at receives the flat index inside that tensor. */
int moe__find_nonfinite(const moe_model *m, const float *arr, int backward, size_t *at);

/* Tensor index of the largest |value| of arr (all finite), *at inside it:
 * when a forward overflows without any NaN weight, the likeliest culprit. */
int moe__find_largest(const moe_model *m, const float *arr, size_t *at);

/* "layer 2 experts.0.w1 (model.layers.2.block_sparse_moe.experts.0.w1.weight)
 * [1][3] = nan" for tensor i of m and the flat index at inside it. */
void moe__describe_value(const moe_model *m, int i, size_t at, float v, char *buf, size_t n);

#endif
