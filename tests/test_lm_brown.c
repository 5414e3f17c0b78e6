/* The language model learns real text: 60 seconds of training on the Brown
 * corpus (and at least 150 steps of 16 x 64 tokens, so a busy machine makes
 * the test slower, not red) bring the validation loss clearly below the
 * unigram entropy of the data (what a model that ignores context can reach
 * at best). Needs the corpus (`make data`); skips cleanly without it. */
#include "test.h"

#include "data/corpus.h"
#include "data/shard.h"
#include "moe.h"
#include "tokenizer/tokenizer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

TEST(lm_brown_60s_beats_unigram_entropy) {
    const char *dir = moe_test_brown_dir();
    if (access(dir, R_OK) != 0) {
        moe_test_skip("no Brown corpus in data/brown (make data)");
        return;
    }
    char err[512];
    moe_corpus *c = NULL;
    moe_tokenizer *tok = NULL;
    moe_shard *tr = NULL, *va = NULL;
    int rc = moe_corpus_load_brown(dir, &c, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc) return;
    const char **texts = calloc((size_t)c->n_docs, sizeof *texts);
    size_t *lens = calloc((size_t)c->n_docs, sizeof *lens), n = 0;
    for (int i = 0; i < c->n_docs; i++)
        if (!moe_corpus_is_val(c, i)) texts[n] = c->docs[i].text, lens[n++] = c->docs[i].len;
    rc = moe_tokenizer_train(texts, lens, n, 1024, &tok, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (!rc) rc = moe_shard_build(c, tok, 0, &tr, err, sizeof err);
    if (!rc) rc = moe_shard_build(c, tok, 1, &va, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    free(texts), free(lens);
    if (rc) goto out;

    /* unigram cross-entropy of val under the train distribution (add-one) */
    const int V = moe_tokenizer_vocab_size(tok);
    double *cnt = calloc((size_t)V, sizeof *cnt), h = 0;
    for (size_t i = 0; i < tr->n_tokens; i++) cnt[tr->tokens[i]] += 1;
    for (size_t i = 0; i < va->n_tokens; i++) h -= log((cnt[va->tokens[i]] + 1) / (tr->n_tokens + (double)V));
    h /= va->n_tokens;
    free(cnt);

    moe_model_config cfg;
    moe_model_preset("tiny", &cfg);
    cfg.vocab_size = V;
    moe_model *m = moe_model_create(&cfg, 16, 64, 1, 2, &rc, err, sizeof err);
    CHECK_MSG(m != NULL, "%s", err);
    if (!m) goto out;
    moe_model_init(m, 1);
    moe_train_config tc;
    memset(&tc, 0, sizeof tc);
    tc.batch = 16, tc.seq = 64, tc.grad_accum = 1, tc.eval_batches = 16, tc.seed = 1, tc.n_threads = 2;
    tc.opt = moe_adamw_config_default();
    tc.opt.lr = 3e-3f, tc.opt.min_lr = 3e-4f, tc.opt.warmup_steps = 30, tc.opt.max_steps = 0;
    moe_trainer *t = moe_trainer_create(m, &tc, tr->tokens, tr->n_tokens, va->tokens, va->n_tokens, &rc, err, sizeof err);
    CHECK_MSG(t != NULL, "%s", err);
    float v0 = NAN, v1 = NAN;
    if (t) {
        moe_trainer_eval(t, &v0);
        const double t0 = now_s();
        int steps = 0;
        while (steps < 150 || now_s() - t0 < 60.0) {
            moe_train_step_info si;
            rc = moe_trainer_step(t, &si);
            CHECK_MSG(rc == 0, "%s", moe_trainer_errmsg(t));
            if (rc) break;
            steps++;
        }
        CHECK(moe_trainer_eval(t, &v1) == 0);
        printf("    %d steps in %.0f s: val loss %.3f -> %.3f nats/token; unigram entropy %.3f\n", steps, now_s() - t0,
               v0, v1, h);
        CHECK_MSG(v1 < h - 0.5, "val loss %.3f not clearly below the unigram entropy %.3f", v1, h);
    }
    moe_trainer_free(t);
    moe_model_free(m);
out:
    moe_shard_free(tr), moe_shard_free(va);
    moe_tokenizer_free(tok);
    moe_corpus_free(c);
}
