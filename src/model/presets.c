/* Named model configurations. "small" is the MoE of the README's main job
 * (about five minutes of training on 2 cores); "small-dense" has the same
 * active parameters per token: its FFN is K * F wide, where each MoE token
 * runs K experts of width F. */
#include "internal.h"

#include <string.h>

static const char *const NAMES[] = {"tiny", "tiny-dense", "small", "small-dense", NULL};

const char *const *moe_model_preset_names(void) { return NAMES; }

int moe_model_preset(const char *name, moe_model_config *c) {
    moe_model_config_defaults(c);
    int dense = 0;
    if (!strcmp(name, "tiny") || !strcmp(name, "tiny-dense")) {
        c->hidden_size = 64;
        c->num_hidden_layers = 2;
        c->num_attention_heads = 4;
        c->num_key_value_heads = 2;
        c->max_position_embeddings = 64;
        c->num_local_experts = 4;
        c->intermediate_size = 96;
        dense = !strcmp(name, "tiny-dense");
    } else if (!strcmp(name, "small") || !strcmp(name, "small-dense")) {
        c->hidden_size = 256;
        c->num_hidden_layers = 4;
        c->num_attention_heads = 8;
        c->num_key_value_heads = 4;
        c->max_position_embeddings = 256;
        c->num_local_experts = 8;
        c->intermediate_size = 384;
        dense = !strcmp(name, "small-dense");
    } else {
        return MOE_ENOTFOUND;
    }
    c->num_experts_per_tok = 2;
    c->head_dim = c->hidden_size / c->num_attention_heads;
    c->dense_intermediate_size = c->num_experts_per_tok * c->intermediate_size;
    if (dense) c->num_local_experts = 0;
    for (int l = 0; l < MOE_MAX_LAYERS; l++) c->is_moe_layer[l] = !dense && l < c->num_hidden_layers;
    return MOE_OK;
}
