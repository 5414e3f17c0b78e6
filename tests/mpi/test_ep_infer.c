/* The inference engine expert-parallel (GGUF and Hugging Face models) against
 * the same engine in one process: every rank loads the model twice, once
 * without a communicator (the oracle: the single-process engine, itself
 * tested against an independent double-precision forward) and once with the
 * experts spread over the P ranks, and compares logits bit for bit: a batch,
 * small batches, token-by-token decoding, a larger k than the file's, and
 * llama.cpp's perplexity. A load that fails on one rank fails on every rank. */
#include "mpi_test.h"

#include <moe.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NT 32

static moe_engine *load(moe_dist *d, const char *path, int n_batch) {
    moe_set_dist(d);
    moe_engine_params p = moe_engine_params_default();
    p.n_ctx = 64, p.n_batch = n_batch, p.n_threads = 1;
    moe_engine *e = NULL;
    char err[512];
    const int rc = moe_engine_load(path, &p, &e, err, sizeof err);
    moe_set_dist(NULL);
    MT_CHECK(rc == 0 && e, "%s: load (%s): %s", path, d ? "ep" : "one process", err);
    return e;
}

/* values of got [n] that differ in any bit from want */
static long bit_diffs(const float *got, const float *want, size_t n) {
    long b = 0;
    for (size_t i = 0; i < n; i++) b += memcmp(got + i, want + i, sizeof(float)) != 0;
    return b;
}

static void one_file(moe_dist *d, const char *path) {
    moe_engine *ref = load(NULL, path, 0), *ep = load(d, path, 0), *ep5 = load(d, path, 5);
    if (!ref || !ep || !ep5) goto done;
    const moe_engine_hparams *h = moe_engine_get_hparams(ref);
    const int V = h->n_vocab;
    int32_t tok[NT];
    uint64_t s = 99;
    for (int i = 0; i < NT; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        tok[i] = (int32_t)((s >> 33) % (uint64_t)V);
    }
    float *lr = malloc(sizeof(float) * NT * V), *le = malloc(sizeof(float) * NT * V);
    /* one batch of NT tokens, every position's logits */
    int rc = moe_engine_eval(ref, tok, NT, lr, 1);
    MT_CHECK(rc == 0, "%s: ref eval: %s", path, moe_engine_errmsg(ref));
    rc = moe_engine_eval(ep, tok, NT, le, 1);
    MT_CHECK(rc == 0, "%s: ep eval: %s", path, moe_engine_errmsg(ep));
    long b = bit_diffs(le, lr, (size_t)NT * V);
    MT_CHECK(b == 0, "%s: batch of %d: %ld logits differ from one process", path, NT, b);
    /* batches of 5, then decoding one token at a time */
    memset(le, 0, sizeof(float) * NT * V);
    rc = moe_engine_eval(ep5, tok, 20, le, 1);
    for (int i = 20; i < NT && !rc; i++) rc = moe_engine_eval(ep5, tok + i, 1, le + (size_t)i * V, 0);
    MT_CHECK(rc == 0, "%s: ep batches of 5 / decode: %s", path, moe_engine_errmsg(ep5));
    b = bit_diffs(le, lr, (size_t)NT * V);
    MT_CHECK(b == 0, "%s: batches of 5 and decode: %ld logits differ", path, b);
    /* a larger k grows the exchange buffers */
    const int k = h->n_expert_used + 1 <= h->n_expert ? h->n_expert_used + 1 : h->n_expert;
    MT_CHECK(moe_engine_set_experts_used(ref, k) == 0 && moe_engine_set_experts_used(ep, k) == 0, "%s: k %d", path,
             k);
    moe_engine_truncate(ref, 0), moe_engine_truncate(ep, 0);
    rc = moe_engine_eval(ref, tok, NT, lr, 1);
    rc |= moe_engine_eval(ep, tok, NT, le, 1);
    MT_CHECK(rc == 0, "%s: k = %d eval: %s", path, k, moe_engine_errmsg(ep));
    b = bit_diffs(le, lr, (size_t)NT * V);
    MT_CHECK(b == 0, "%s: k = %d: %ld logits differ", path, k, b);
    moe_engine_set_experts_used(ref, 0), moe_engine_set_experts_used(ep, 0);
    /* llama.cpp's perplexity protocol: 4 chunks of 8 */
    double pr = 0, pe = 1, er = 0, ee = 1;
    rc = moe_engine_perplexity(ref, tok, NT, 8, 1, &pr, &er, NULL, NULL);
    rc |= moe_engine_perplexity(ep, tok, NT, 8, 1, &pe, &ee, NULL, NULL);
    MT_CHECK(rc == 0 && pe == pr && ee == er && pr > 1, "%s: perplexity %.17g +- %g vs one process %.17g +- %g", path,
             pe, ee, pr, er);
    if (mt_rank == 0) printf("engine P=%d %-28s bit-identical logits, PPL %.6f (one process %.6f)\n", mt_size,
                             strrchr(path, '/') + 1, pe, pr);
    free(lr), free(le);
done:
    moe_engine_free(ref), moe_engine_free(ep), moe_engine_free(ep5);
}

/* A model directory as `moe train` writes it (config.json + safetensors,
 * through the engine's Hugging Face loader): the tiny preset, written by rank
 * 0 from one process's model, read by every rank. */
static void own_checkpoint(moe_dist *d) {
    char dir[] = "/tmp/moe_ep_infer_XXXXXX";
    int ok = 1;
    if (mt_rank == 0) {
        ok = mkdtemp(dir) != NULL;
        moe_model_config c;
        int err = moe_model_preset("tiny", &c);
        char msg[512] = "";
        moe_model *m = ok && !err ? moe_model_create(&c, 1, 16, 0, 1, &err, msg, sizeof msg) : NULL;
        ok = m && moe_model_init(m, 5) == 0 && moe_model_save(m, dir, msg, sizeof msg) == 0;
        MT_CHECK(ok, "writing the tiny model to %s: %s", dir, msg);
        moe_model_free(m);
    }
    MPI_Bcast(dir, (int)sizeof dir, MPI_CHAR, 0, MPI_COMM_WORLD);
    MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (ok) one_file(d, dir);
    MPI_Barrier(MPI_COMM_WORLD);
    if (mt_rank == 0 && ok) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
        MT_CHECK(system(cmd) == 0, "%s", cmd);
    }
}

void mt_infer_tests(moe_dist *d) {
    one_file(d, "tests/data/tiny-mixtral-f16.gguf");   /* F16, llama/Mixtral */
    one_file(d, "tests/data/tiny-qwen2moe-q8_0.gguf"); /* Q8_0, shared expert */
    one_file(d, "tests/data/tiny-olmoe-q4_0.gguf");    /* Q4_0, q/k norms */
    own_checkpoint(d);
    /* the file missing on the last rank only: every rank fails the load, none
     * is left waiting in the first exchange */
    if (mt_size > 1) {
        const char *path = mt_rank == mt_size - 1 ? "tests/data/no-such-model.gguf" : "tests/data/tiny-mixtral-f16.gguf";
        moe_set_dist(d);
        moe_engine *e = NULL;
        char err[512];
        const int rc = moe_engine_load(path, NULL, &e, err, sizeof err);
        moe_set_dist(NULL);
        MT_CHECK(rc != 0 && !e, "a load failing on rank %d: rank %d returned %d", mt_size - 1, mt_rank, rc);
        if (mt_rank != mt_size - 1)
            MT_CHECK(strstr(err, "another rank") != NULL, "the error names another rank: %s", err);
        moe_engine_free(e);
    }
}
