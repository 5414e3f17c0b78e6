/* Noisy top-k gating (Shazeer et al. 2017). Not implemented yet. */
#include "layer/layer_impl.h"

size_t moe__noisy_ws_floats(const moe_layer_config *c) { (void)c; return 0; }

int moe__noisy_select(moe_layer *l, int n) {
    (void)n;
    return moe__set_err(l->err, sizeof l->err, MOE_EUNSUPPORTED, "noisy top-k: not implemented yet");
}

void moe__noisy_backward(moe_layer *l, const float *x, float *dx) { (void)l, (void)x, (void)dx; }
