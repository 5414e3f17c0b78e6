/* Named model configurations. "small" is the MoE of the README's main job
 * (about five minutes of training on 2 cores): DeepSeekMoE-style, 16
 * fine-grained routed experts (top-2) plus one always-on shared expert.
 * "small-mixtral" is the Mixtral-style alternative (8 experts of twice the
 * width, top-2, no shared expert). Each "-dense" twin has the same active
 * parameters per token: its FFN is K * F + shared wide, where each MoE token
 * runs K experts of width F and the shared expert. */
#include "internal.h"

#include <string.h>

static const struct preset {
    const char *name;
    int hidden, layers, heads, kv_heads, context, experts, expert_hidden, shared_hidden, dense;
} PRESETS[] = {
    {"tiny", 64, 2, 4, 2, 64, 4, 96, 0, 0},
    {"tiny-dense", 64, 2, 4, 2, 64, 4, 96, 0, 1},
    {"small", 256, 4, 8, 4, 256, 16, 192, 384, 0},
    {"small-dense", 256, 4, 8, 4, 256, 16, 192, 384, 1},
    {"small-mixtral", 256, 4, 8, 4, 256, 8, 384, 0, 0},
};
#define NPRESETS (int)(sizeof PRESETS / sizeof PRESETS[0])

static const char *const NAMES[NPRESETS + 1] = {"tiny", "tiny-dense", "small", "small-dense", "small-mixtral", NULL};

const char *const *moe_model_preset_names(void) { return NAMES; }

int moe_model_preset(const char *name, moe_model_config *c) {
    moe_model_config_defaults(c);
    const struct preset *p = NULL;
    for (int i = 0; i < NPRESETS && !p; i++)
        if (!strcmp(name, PRESETS[i].name)) p = &PRESETS[i];
    if (!p) return MOE_ENOTFOUND;
    c->hidden_size = p->hidden;
    c->num_hidden_layers = p->layers;
    c->num_attention_heads = p->heads;
    c->num_key_value_heads = p->kv_heads;
    c->head_dim = p->hidden / p->heads;
    c->max_position_embeddings = p->context;
    c->num_local_experts = p->dense ? 0 : p->experts;
    c->intermediate_size = p->expert_hidden;
    c->num_experts_per_tok = 2;
    c->dense_intermediate_size = c->num_experts_per_tok * p->expert_hidden + p->shared_hidden;
    if (!p->dense && p->shared_hidden > 0) {
        c->n_shared_experts = 1;
        c->shared_expert_intermediate_size = p->shared_hidden;
    }
    for (int l = 0; l < MOE_MAX_LAYERS; l++) c->is_moe_layer[l] = !p->dense && l < p->layers;
    return MOE_OK;
}
