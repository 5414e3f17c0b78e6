/* Perplexity as llama.cpp's llama-perplexity computes it, so numbers compare
 * one to one: fixed chunks, BOS at each chunk start, the second half scored. */
#include "internal.h"

#include <math.h>

int moe_engine_perplexity(moe_engine *e, const int32_t *tokens, size_t n, int n_ctx, int bos, double *ppl,
                          double *ppl_err, moe_ppl_chunk_fn on_chunk, void *user) {
    const moe_engine_hparams *h = moe_engine_get_hparams(e);
    if (n_ctx < 4 || n_ctx > h->n_ctx || n < (size_t)n_ctx) return MOE_EINVAL;
    const size_t n_chunk = n / (size_t)n_ctx, V = (size_t)h->n_vocab;
    const int first = n_ctx / 2;
    float *logits = moe__malloc(sizeof(float) * (size_t)n_ctx * V);
    int32_t *chunk = moe__malloc(sizeof(int32_t) * (size_t)n_ctx);
    if (!logits || !chunk) {
        moe__free(logits), moe__free(chunk);
        return MOE_ENOMEM;
    }
    double nll = 0, nll2 = 0;
    size_t count = 0;
    int rc = 0;
    for (size_t c = 0; c < n_chunk && !rc; c++) {
        const int32_t *src = tokens + c * (size_t)n_ctx;
        for (int j = 0; j < n_ctx; j++) chunk[j] = src[j];
        if (bos >= 0) chunk[0] = bos;
        moe_engine_truncate(e, 0);
        if ((rc = moe_engine_eval(e, chunk, n_ctx, logits, 1))) break;
        for (int j = first; j < n_ctx - 1; j++) {
            const float *l = logits + (size_t)j * V;
            float mx = l[0];
            for (size_t v = 1; v < V; v++) mx = l[v] > mx ? l[v] : mx;
            double se = 0;
            for (size_t v = 0; v < V; v++) se += expf(l[v] - mx);
            const double x = -((double)l[src[j + 1]] - mx - log(se)); /* scored: the original token */
            nll += x, nll2 += x * x, count++;
        }
        if (on_chunk) on_chunk((int)c, (int)n_chunk, exp(nll / (double)count), user);
    }
    if (!rc) {
        const double mean = nll / (double)count, var = nll2 / (double)count - mean * mean;
        *ppl = exp(mean);
        *ppl_err = var > 0 && count > 1 ? sqrt(var / (double)(count - 1)) * *ppl : 0;
    }
    moe__free(logits), moe__free(chunk);
    return rc;
}
