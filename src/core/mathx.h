/* Vectorisable elementwise math for the hot loops (activations). gcc -O3
 * (with -fno-trapping-math, set in the Makefile)
 * vectorises these inline functions; libm's expf would not vectorise and would
 * cost as much as a GEMM on the R*F activation arrays. */
#ifndef MOE_MATHX_H
#define MOE_MATHX_H

#include <stdint.h>
#include <string.h>

/* exp(x) for float, max relative error ~2e-7 over the clamped range
 * [-87.3, 88.3] (outside it the result saturates at the range ends). Range
 * reduction x = k ln2 + r with a split ln2, then a degree-6 polynomial on
 * |r| <= ln2/2 (Cephes coefficients). */
static inline float moe__exp(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    const float k = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float moe__sigmoid(float x) { return 1.0f / (1.0f + moe__exp(-x)); }

/* tanh via exp, stable for both signs. */
static inline float moe__tanh(float x) {
    const float e = moe__exp(-2.0f * (x < 0.0f ? -x : x));
    const float t = (1.0f - e) / (1.0f + e);
    return x < 0.0f ? -t : t;
}

#define MOE__GELU_A 0.7978845608028654f /* sqrt(2/pi) */
#define MOE__GELU_B 0.044715f

#endif
