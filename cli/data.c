#include "cli.h"

#include "data/corpus.h"
#include "data/shard.h"
#include "tokenizer/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

double cli_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void cli_data_free(cli_data *d) {
    moe_shard_free(d->train);
    moe_shard_free(d->val);
    moe_tokenizer_free(d->tok);
    memset(d, 0, sizeof *d);
}

int cli_data_load(const char *dir, const char *tok_path, int vocab, int quiet, cli_data *d) {
    memset(d, 0, sizeof *d);
    char err[512];
    moe_corpus *c = NULL;
    double t0 = cli_now();
    int rc = moe_corpus_load_brown(dir, &c, err, sizeof err);
    if (rc) {
        fprintf(stderr, "moe: %s\n  (fetch the corpus with `make data`)\n", err);
        return rc;
    }
    if (tok_path) {
        rc = moe_tokenizer_load(tok_path, &d->tok, err, sizeof err);
    } else {
        /* the tokenizer learns from the train split only */
        const char **texts = calloc((size_t)c->n_docs, sizeof *texts);
        size_t *lens = calloc((size_t)c->n_docs, sizeof *lens), n = 0;
        for (int i = 0; texts && lens && i < c->n_docs; i++)
            if (!moe_corpus_is_val(c, i)) texts[n] = c->docs[i].text, lens[n++] = c->docs[i].len;
        rc = texts && lens ? moe_tokenizer_train(texts, lens, n, vocab, &d->tok, err, sizeof err) : MOE_ENOMEM;
        free(texts), free(lens);
    }
    if (!rc) rc = moe_shard_build(c, d->tok, 0, &d->train, err, sizeof err);
    if (!rc) rc = moe_shard_build(c, d->tok, 1, &d->val, err, sizeof err);
    if (rc) {
        fprintf(stderr, "moe: %s\n", err);
        moe_corpus_free(c);
        cli_data_free(d);
        return rc;
    }
    if (!quiet)
        fprintf(stderr, "data: %d documents, %zu train / %zu val tokens, vocab %d (%s, %.1f s)\n", c->n_docs,
                d->train->n_tokens, d->val->n_tokens, moe_tokenizer_vocab_size(d->tok),
                tok_path ? "tokenizer loaded" : "tokenizer trained", cli_now() - t0);
    moe_corpus_free(c);
    return MOE_OK;
}

static void human(double v, char *buf, size_t n) {
    if (v >= 1e9) snprintf(buf, n, "%.2fB", v / 1e9);
    else if (v >= 1e6) snprintf(buf, n, "%.2fM", v / 1e6);
    else if (v >= 1e3) snprintf(buf, n, "%.1fK", v / 1e3);
    else snprintf(buf, n, "%.0f", v);
}

void cli_print_card(const moe_model_config *c, int ctx, int json) {
    moe_model_costs k = moe_model_config_costs(c, ctx);
    const int nmoe = moe_model_n_moe_layers(c);
    if (json) {
        printf("{\"total_params\": %.0f, \"active_params\": %.0f, \"expert_params\": %.0f, \"embedding_params\": %.0f, "
               "\"experts\": %d, \"experts_per_token\": %d, \"shared_experts\": %d, \"moe_layers\": %d, \"layers\": %d, "
               "\"hidden_size\": %d, \"context_length\": %d, \"vocab_size\": %d, \"weight_bytes_f32\": %.0f, "
               "\"flops_per_token\": %.0f, \"active_fraction\": %.4f}\n",
               k.total_params, k.active_params, k.expert_params, k.embedding_params, c->num_local_experts,
               nmoe ? c->num_experts_per_tok : 0, c->n_shared_experts, nmoe, c->num_hidden_layers, c->hidden_size,
               c->max_position_embeddings, c->vocab_size, k.weight_bytes_f32, k.flops_per_token,
               k.active_params / k.total_params);
        return;
    }
    char tot[32], act[32], mem[32], fl[32];
    human(k.total_params, tot, sizeof tot);
    human(k.active_params, act, sizeof act);
    human(k.weight_bytes_f32, mem, sizeof mem);
    human(k.flops_per_token, fl, sizeof fl);
    printf("model card\n");
    printf("  parameters       %s total, %s active per token (%.0f%%)\n", tot, act, 100 * k.active_params / k.total_params);
    if (nmoe)
        printf("  experts          %d per MoE layer, top-%d routed, %d shared; %d of %d layers MoE\n", c->num_local_experts,
               c->num_experts_per_tok, c->n_shared_experts, nmoe, c->num_hidden_layers);
    else
        printf("  experts          none (dense)\n");
    printf("  shape            %d layers, hidden %d, %d heads (%d kv), head dim %d, expert hidden %d\n",
           c->num_hidden_layers, c->hidden_size, c->num_attention_heads, c->num_key_value_heads, c->head_dim,
           nmoe ? c->intermediate_size : c->dense_intermediate_size);
    printf("  context          %d tokens, vocab %d\n", c->max_position_embeddings, c->vocab_size);
    printf("  weights          %sB in f32\n", mem);
    printf("  compute          %sFLOP per token (forward, context %d)\n", fl, ctx);
}
