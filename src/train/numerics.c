#include "train/numerics.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

int moe__find_nonfinite(const moe_model *m, const float *arr, int backward, size_t *at) {
    const int n = moe_model_n_tensors(m);
    for (int k = 0; k < n; k++) {
        const moe_param_info *pi = moe_model_tensor(m, backward ? n - 1 - k : k);
        const float *p = arr + pi->offset;
        for (size_t j = 0; j < pi->numel; j++)
            if (!isfinite(p[j])) {
                if (at) *at = j;
                return backward ? n - 1 - k : k;
            }
    }
    return -1;
}

int moe__find_largest(const moe_model *m, const float *arr, size_t *at) {
    int best = -1;
    float big = -1;
    for (int k = 0; k < moe_model_n_tensors(m); k++) {
        const moe_param_info *pi = moe_model_tensor(m, k);
        const float *p = arr + pi->offset;
        for (size_t j = 0; j < pi->numel; j++)
            if (fabsf(p[j]) > big) big = fabsf(p[j]), best = k, *at = j;
    }
    return best;
}

void moe__describe_value(const moe_model *m, int i, size_t at, float v, char *buf, size_t n) {
    const moe_param_info *pi = moe_model_tensor(m, i);
    int layer = -1, used = 0;
    char shortname[96];
    const char *s = pi->name;
    if (sscanf(s, "model.layers.%d.%n", &layer, &used) == 1 && used > 0) s += used;
    else layer = -1, s = !strncmp(s, "model.", 6) ? s + 6 : s;
    if (!strncmp(s, "block_sparse_moe.", 17)) s += 17;
    snprintf(shortname, sizeof shortname, "%s", s);
    const size_t L = strlen(shortname);
    if (L > 7 && !strcmp(shortname + L - 7, ".weight")) shortname[L - 7] = '\0';
    char idx[64];
    if (pi->ndim == 2) snprintf(idx, sizeof idx, "[%zu][%zu]", at / (size_t)pi->shape[1], at % (size_t)pi->shape[1]);
    else if (pi->ndim == 3)
        snprintf(idx, sizeof idx, "[%zu][%zu][%zu]", at / (size_t)(pi->shape[1] * pi->shape[2]),
                 at / (size_t)pi->shape[2] % (size_t)pi->shape[1], at % (size_t)pi->shape[2]);
    else snprintf(idx, sizeof idx, "[%zu]", at);
    if (layer >= 0) snprintf(buf, n, "layer %d %s (%s) %s = %g", layer, shortname, pi->name, idx, (double)v);
    else snprintf(buf, n, "%s (%s) %s = %g", shortname, pi->name, idx, (double)v);
}
