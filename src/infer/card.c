/* What a decoded token costs in weights: the totals of the loaded model and
 * the part one token reads (the transparency figures of `moe info` and the
 * bandwidth line of `moe generate`). Sizes are as stored, so a Q4_0 expert
 * counts 18 bytes per 32 weights. */
#include "infer/infer.h"

/* a matrix stack: every matrix in the totals, `used` of them in the active part */
static void add_wt(moe_engine_stats *s, const moe__wt *w, int used) {
    if (!w->rows) return; /* absent (no shared expert) */
    const uint64_t n = (uint64_t)w->rows * (uint64_t)w->cols, b = (uint64_t)w->rows * w->row_bytes;
    s->n_params += n * (uint64_t)w->n_mat, s->n_bytes += b * (uint64_t)w->n_mat;
    s->n_params_active += n * (uint64_t)used, s->n_bytes_active += b * (uint64_t)used;
}

/* a 1-D float tensor (norms, biases), read by every token */
static void add_vec(moe_engine_stats *s, const float *v, int n) {
    if (!v) return;
    s->n_params += (uint64_t)n, s->n_params_active += (uint64_t)n;
    s->n_bytes += (uint64_t)n * sizeof(float), s->n_bytes_active += (uint64_t)n * sizeof(float);
}

void moe__imodel_stats(const moe__imodel *m, int k, int kv_elem_bytes, moe_engine_stats *s) {
    const moe_engine_hparams *h = &m->hp;
    const int C = h->n_embd, HD = h->n_head * h->head_dim, GD = h->n_head_kv * h->head_dim;
    *s = (moe_engine_stats){0};
    for (int l = 0; l < h->n_layer; l++) {
        const moe__ilayer *y = &m->layers[l];
        add_vec(s, y->attn_norm, C), add_vec(s, y->ffn_norm, C);
        add_vec(s, y->q_norm, HD), add_vec(s, y->k_norm, GD);
        add_vec(s, y->bq, HD), add_vec(s, y->bk, GD), add_vec(s, y->bv, GD), add_vec(s, y->bo, C);
        add_wt(s, &y->wq, 1), add_wt(s, &y->wk, 1), add_wt(s, &y->wv, 1), add_wt(s, &y->wo, 1);
        add_wt(s, &y->gate_inp, 1);
        add_wt(s, &y->gate_exps, k), add_wt(s, &y->up_exps, k), add_wt(s, &y->down_exps, k);
        add_vec(s, y->gate_inp_sh, C);
        add_wt(s, &y->gate_sh, 1), add_wt(s, &y->up_sh, 1), add_wt(s, &y->down_sh, 1);
    }
    add_vec(s, m->output_norm, C);
    /* the LM head is read whole; the embedding gives one row per token (a
     * row of the head itself when the two are tied: counted once) */
    add_wt(s, &m->output, 1);
    if (!h->tied_output) {
        const uint64_t V = (uint64_t)h->n_vocab;
        s->n_params += V * (uint64_t)C, s->n_bytes += V * m->tok_embd.row_bytes;
        s->n_params_active += (uint64_t)C, s->n_bytes_active += m->tok_embd.row_bytes;
    }
    s->kv_bytes_per_pos = (uint64_t)h->n_layer * (uint64_t)GD * (uint64_t)kv_elem_bytes;
}
