/* Token sampling: greedy, or top-k -> top-p -> temperature -> seeded draw,
 * the order of llama.cpp's default sampler chain. */
#include "internal.h"

#include <math.h>
#include <stdlib.h>

struct moe_sampler {
    moe_sampler_params p;
    int V;
    moe__rng rng;
    struct cand { float logit; int id; } *c; /* [V] sorted by logit, descending */
    float *pr;                                /* [V] their probabilities */
};

moe_sampler_params moe_sampler_params_default(void) {
    moe_sampler_params p = {.temp = 0.8f, .top_k = 40, .top_p = 0.95f, .seed = 42};
    return p;
}

int moe_sampler_create(const moe_sampler_params *p, int n_vocab, moe_sampler **out) {
    *out = NULL;
    /* top_p is a probability mass; a negative temperature would invert the
     * distribution (each comparison is false for NaN) */
    if (!p || n_vocab <= 0 || p->top_k < 0 || !(p->top_p >= 0 && p->top_p <= 1) || !(p->temp >= 0 && p->temp <= 1e30f))
        return MOE_EINVAL;
    moe_sampler *s = moe__calloc(1, sizeof *s);
    if (!s) return MOE_ENOMEM;
    s->p = *p, s->V = n_vocab;
    s->c = moe__malloc(sizeof *s->c * (size_t)n_vocab);
    s->pr = moe__malloc(sizeof(float) * (size_t)n_vocab);
    if (!s->c || !s->pr) {
        moe_sampler_free(s);
        return MOE_ENOMEM;
    }
    moe__rng_seed(&s->rng, p->seed);
    *out = s;
    return 0;
}

void moe_sampler_free(moe_sampler *s) {
    if (!s) return;
    moe__free(s->c), moe__free(s->pr), moe__free(s);
}

static int by_logit_desc(const void *a, const void *b) {
    const struct cand *x = a, *y = b;
    return x->logit > y->logit ? -1 : x->logit < y->logit ? 1 : (x->id > y->id) - (x->id < y->id);
}

/* probabilities of the first n candidates at temperature t (n >= 1) */
static void softmax_top(moe_sampler *s, int n, float t) {
    const float mx = s->c[0].logit;
    double sum = 0;
    for (int i = 0; i < n; i++) sum += s->pr[i] = expf((s->c[i].logit - mx) / t);
    for (int i = 0; i < n; i++) s->pr[i] = (float)(s->pr[i] / sum);
}

int32_t moe_sampler_sample(moe_sampler *s, const float *logits) {
    const int V = s->V;
    if (!(s->p.temp > 0)) {
        int best = 0;
        for (int i = 1; i < V; i++)
            if (logits[i] > logits[best]) best = i;
        return best;
    }
    for (int i = 0; i < V; i++) s->c[i].logit = logits[i], s->c[i].id = i;
    qsort(s->c, (size_t)V, sizeof *s->c, by_logit_desc);
    int n = s->p.top_k > 0 && s->p.top_k < V ? s->p.top_k : V;
    if (s->p.top_p < 1.0f) {
        softmax_top(s, n, 1.0f);
        double cum = 0;
        for (int i = 0; i < n; i++) { /* keep the smallest prefix reaching top_p */
            cum += s->pr[i];
            if (cum >= s->p.top_p) {
                n = i + 1;
                break;
            }
        }
    }
    softmax_top(s, n, s->p.temp);
    const double u = moe__rng_uniform(&s->rng);
    double cum = 0;
    for (int i = 0; i < n; i++) {
        cum += s->pr[i];
        if (u < cum) return s->c[i].id;
    }
    return s->c[n - 1].id;
}
