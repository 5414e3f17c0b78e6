/* Hierarchical MoE (Shazeer et al. 2017, appendix B). Not implemented yet. */
#include "layer/layer_impl.h"

size_t moe__hier_ws_floats(const moe_layer_config *c) { (void)c; return 0; }

int moe__hier_select(moe_layer *l, int n) {
    (void)n;
    return moe__set_err(l->err, sizeof l->err, MOE_EUNSUPPORTED, "hierarchical routing: not implemented yet");
}

void moe__hier_backward(moe_layer *l, const float *x, float *dx) { (void)l, (void)x, (void)dx; }
