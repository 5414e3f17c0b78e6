/* The GGUF inference engine against an independent double-precision forward
 * (test_infer_ref.c) on tiny random Mixtral, Qwen2-MoE and OLMoE files;
 * batching, threads, k override, sampling, perplexity, hostile files. */
#include "io/quant.h"
#include "moe.h"
#include "test.h"
#include "test_infer_ref.h"

#include <stdlib.h>
#include <string.h>

#define T_MAX 12

/* The KV cache type under test: F32 for the comparisons with the double
 * reference (fp16 K/V rounding, 2^-11 relative, would swamp their 2e-6),
 * both types for the bit-exactness invariances. */
static int g_f16; /* bit 0: K in fp16, bit 1: V */
static moe_engine_params params(void) {
    moe_engine_params p = moe_engine_params_default();
    p.kv_f16_k = g_f16 & 1, p.kv_f16_v = g_f16 >> 1;
    return p;
}

static const int32_t k_tokens[T_MAX] = {1, 17, 5, 66, 0, 23, 23, 42, 9, 60, 31, 2};

/* Writes the model to a fresh temp dir and loads it; NULL on failure (the
 * test is marked failed). */
static moe_engine *load_tiny(const tiny_model *m, char *dir, const moe_engine_params *p) {
    char path[256], err[512];
    if (!moe_test_tmpdir(dir, "infer")) return NULL;
    snprintf(path, sizeof path, "%s/tiny.gguf", dir);
    CHECK_EQ_INT(tiny_write(m, path, NULL, 0), 0);
    moe_engine *e = NULL;
    const moe_engine_params dp = params();
    int rc = moe_engine_load(path, p ? p : &dp, &e, err, sizeof err);
    CHECK_MSG(rc == 0, "load: %s", err);
    return e;
}

/* max |engine - ref| over all positions, relative to max |ref| */
static double compare_all(moe_engine *e, const tiny_model *m, int T, int k) {
    const int V = m->s.V;
    float *lg = malloc(sizeof(float) * T * V);
    double *ref = malloc(sizeof(double) * T * V), md = 0, mr = 0;
    moe_engine_truncate(e, 0);
    CHECK_EQ_INT(moe_engine_eval(e, k_tokens, T, lg, 1), 0);
    tiny_ref_forward(m, k_tokens, T, k, ref);
    for (int i = 0; i < T * V; i++) {
        md = fmax(md, fabs(lg[i] - ref[i]));
        mr = fmax(mr, fabs(ref[i]));
    }
    free(lg), free(ref);
    return md / mr;
}

static void check_arch(int arch, int tied, uint32_t wtype, double tol) {
    tiny_spec s = tiny_default(arch);
    s.tied = tied, s.wtype = wtype;
    tiny_model m;
    tiny_build(&m, &s, 1234 + (uint64_t)arch);
    char dir[128];
    moe_engine *e = load_tiny(&m, dir, NULL);
    if (e) {
        const moe_engine_hparams *h = moe_engine_get_hparams(e);
        CHECK_EQ_INT(h->n_vocab, s.V);
        CHECK_EQ_INT(h->n_expert, s.E);
        CHECK_EQ_INT(h->n_expert_used, s.K);
        CHECK_EQ_INT(h->tied_output, tied);
        CHECK_EQ_INT(h->n_ff_shexp, s.Fs);
        CHECK_EQ_INT(h->expert_type, wtype);
        const double rel = compare_all(e, &m, T_MAX, s.K);
        if (getenv("MOE_TEST_VERBOSE")) fprintf(stderr, "arch %d type %u tied %d: rel %.3g\n", arch, wtype, tied, rel);
        CHECK_MSG(rel <= tol, "arch %d type %u: relative logit error %.3g > %.3g", arch, wtype, rel, tol);
        moe_engine_free(e);
    }
    moe_test_rmdir(dir);
    tiny_free(&m);
}

TEST(infer_mixtral_f32_matches_reference) {
    check_arch(TINY_LLAMA, 0, MOE__GGML_F32, 2e-6);
    check_arch(TINY_LLAMA, 1, MOE__GGML_F32, 2e-6); /* tied: no output.weight */
}

/* The F16 cache (the default) against the same double reference. K and V
 * are rounded to fp16 (relative error up to 2^-11 = 4.9e-4 per value) after
 * RoPE; through the softmax and the remaining layers that leaves logits off
 * by 1.4e-4 to 2.9e-4 of their range on these files, where the F32 cache is at
 * 2e-7. The bound sits between: a cache that dropped or misplaced values
 * would be off by O(1). Each cache type alone must also move the logits:
 * if both stayed bit-identical to F32, the fp16 path would not be in use. */
static void check_f16_cache(int arch, int kv) {
    tiny_spec s = tiny_default(arch);
    tiny_model m;
    tiny_build(&m, &s, 1234 + (uint64_t)arch);
    char dir[128];
    g_f16 = 0;
    moe_engine *e32 = load_tiny(&m, dir, NULL);
    moe_test_rmdir(dir);
    g_f16 = kv;
    moe_engine *e = load_tiny(&m, dir, NULL);
    g_f16 = 0;
    if (e && e32) {
        const int V = s.V;
        float *a = malloc(sizeof(float) * T_MAX * V), *b = malloc(sizeof(float) * T_MAX * V);
        CHECK_EQ_INT(moe_engine_eval(e, k_tokens, T_MAX, a, 1), 0);
        CHECK_EQ_INT(moe_engine_eval(e32, k_tokens, T_MAX, b, 1), 0);
        CHECK_MSG(memcmp(a, b, sizeof(float) * T_MAX * V) != 0, "arch %d kv %d: F16 cache = F32 cache", arch, kv);
        free(a), free(b);
        const double rel = compare_all(e, &m, T_MAX, s.K);
        if (getenv("MOE_TEST_VERBOSE")) fprintf(stderr, "arch %d kv %d: F16 cache rel %.3g\n", arch, kv, rel);
        CHECK_MSG(rel <= 1e-3, "arch %d kv %d: relative logit error %.3g", arch, kv, rel);
    }
    moe_engine_free(e), moe_engine_free(e32);
    moe_test_rmdir(dir);
    tiny_free(&m);
}

TEST(infer_f16_cache_matches_reference) {
    const moe_engine_params d = moe_engine_params_default(); /* llama.cpp's default is the library's */
    CHECK_EQ_INT(d.kv_f16_k, 1);
    CHECK_EQ_INT(d.kv_f16_v, 1);
    tiny_spec s = tiny_default(TINY_LLAMA);
    tiny_model m;
    tiny_build(&m, &s, 5);
    char dir[128], path[256], err[512] = "";
    moe_engine *e = load_tiny(&m, dir, NULL);
    moe_engine_free(e);
    snprintf(path, sizeof path, "%s/tiny.gguf", dir);
    moe_engine_params p = d;
    p.kv_f16_v = 2; /* a flag, not a count */
    e = NULL;
    CHECK(moe_engine_load(path, &p, &e, err, sizeof err) == MOE_EINVAL && !e);
    CHECK_MSG(strstr(err, "kv_f16_v 2") != NULL, "message: %s", err);
    p = d, p.repack = 3; /* 0, 1 or 2 */
    CHECK(moe_engine_load(path, &p, &e, err, sizeof err) == MOE_EINVAL && !e);
    CHECK_MSG(strstr(err, "repack 3") != NULL, "message: %s", err);
    moe_test_rmdir(dir);
    tiny_free(&m);
    check_f16_cache(TINY_LLAMA, 3);
    check_f16_cache(TINY_QWEN2MOE, 3);
    check_f16_cache(TINY_OLMOE, 3);
    check_f16_cache(TINY_LLAMA, 1); /* K only */
    check_f16_cache(TINY_LLAMA, 2); /* V only */
}

TEST(infer_qwen2moe_f32_matches_reference) { check_arch(TINY_QWEN2MOE, 0, MOE__GGML_F32, 2e-6); }
TEST(infer_olmoe_f32_matches_reference) { check_arch(TINY_OLMOE, 0, MOE__GGML_F32, 2e-6); }

/* The reference uses the dequantized weights, so what remains for F16/BF16
 * is float rounding; for Q8_0/Q4_0 it is the activations' Q8_0 rounding
 * (each value off by at most d/2 = max|x|/254 of its block, about 0.4%). */
TEST(infer_quantized_types_within_bounds) {
    check_arch(TINY_LLAMA, 0, MOE__GGML_F16, 2e-6);
    check_arch(TINY_LLAMA, 0, MOE__GGML_BF16, 2e-6);
    check_arch(TINY_LLAMA, 0, MOE__GGML_Q8_0, 2e-2);
    check_arch(TINY_LLAMA, 0, MOE__GGML_Q4_0, 2e-2);
    check_arch(TINY_QWEN2MOE, 1, MOE__GGML_Q8_0, 2e-2);
}

/* A prompt evaluated in one batch, in batches of 5, and token by token gives
 * bit-identical logits, with 1 or 3 threads. */
static void batch_equals_decode(uint32_t wtype) {
    tiny_spec s = tiny_default(TINY_QWEN2MOE);
    s.wtype = wtype;
    tiny_model m;
    tiny_build(&m, &s, 77);
    char dir[128];
    const int V = s.V, T = 40; /* several 16-token tiles of the kernels */
    int32_t toks[40];
    for (int i = 0; i < T; i++) toks[i] = (i * 7 + 3) % V;
    float *a = malloc(sizeof(float) * T * V), *b = malloc(sizeof(float) * T * V), *c = malloc(sizeof(float) * T * V);
    moe_engine_params p = params();
    p.n_threads = 3;
    moe_engine *e = load_tiny(&m, dir, &p);
    if (e) {
        CHECK_EQ_INT(moe_engine_eval(e, toks, T, a, 1), 0);
        CHECK_EQ_INT(moe_engine_n_past(e), T);
        moe_engine_truncate(e, 0);
        for (int t = 0; t < T; t++) CHECK_EQ_INT(moe_engine_eval(e, toks + t, 1, b + (size_t)t * V, 0), 0);
        CHECK(memcmp(a, b, sizeof(float) * T * V) == 0);
        /* truncate then re-feed the tail: the cache before it is reused */
        moe_engine_truncate(e, 7);
        CHECK_EQ_INT(moe_engine_eval(e, toks + 7, T - 7, c + 7 * V, 1), 0);
        CHECK(memcmp(a + 7 * V, c + 7 * V, sizeof(float) * (T - 7) * V) == 0);
        moe_engine_free(e);
        char path[256], err[256];
        snprintf(path, sizeof path, "%s/tiny.gguf", dir);
        p.n_threads = 1, p.n_batch = 5, p.use_mmap = 0;
        CHECK_EQ_INT(moe_engine_load(path, &p, &e, err, sizeof err), 0);
        if (e) {
            CHECK_EQ_INT(moe_engine_eval(e, toks, T, c, 1), 0);
            CHECK(memcmp(a, c, sizeof(float) * T * V) == 0);
            moe_engine_free(e);
        }
        /* with and without the packed copies (moe_engine_params.repack 0, 1, 2), 2
         * threads, tokens first one by one: the same bits; the packing
         * engine has copied its matrices by then (quantized tiny rows pad
         * to whole tiles, so more bytes than the file's), the other none */
        int quant = 0; /* a packed kernel for the type in this build (kernels.c) */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512DQ__)
        quant = wtype == MOE__GGML_Q8_0;
#if defined(__AVX512VBMI__)
        quant |= wtype == MOE__GGML_Q4_0;
#endif
#endif
        for (int repack = 0; repack <= 2; repack++) {
            p.n_threads = 2, p.n_batch = 16, p.use_mmap = 1, p.repack = repack;
            CHECK_EQ_INT(moe_engine_load(path, &p, &e, err, sizeof err), 0);
            if (!e) continue;
            moe_engine_stats st;
            moe_engine_get_stats(e, &st);
            CHECK(st.n_bytes_packed == 0); /* nothing before the first use */
            for (int t = 0; t < 3; t++) CHECK_EQ_INT(moe_engine_eval(e, toks + t, 1, c + (size_t)t * V, 0), 0);
            CHECK_EQ_INT(moe_engine_eval(e, toks + 3, T - 3, c + 3 * V, 1), 0);
            CHECK(memcmp(a, c, sizeof(float) * T * V) == 0);
            moe_engine_get_stats(e, &st);
            /* repack 2 also copies the float matrices every tiny model has (the router's) */
            const int packs = repack == 2 || (repack == 1 && quant);
            CHECK_MSG(packs ? st.n_bytes_packed > 0 : st.n_bytes_packed == 0,
                      "type %u repack %d: %llu bytes packed of %llu", wtype, repack,
                      (unsigned long long)st.n_bytes_packed, (unsigned long long)st.n_bytes);
            moe_engine_free(e);
        }
    }
    free(a), free(b), free(c);
    moe_test_rmdir(dir);
    tiny_free(&m);
}

TEST(infer_batch_equals_decode_bitwise) {
    for (g_f16 = 0; g_f16 < 4; g_f16++) { /* F32, mixed both ways, F16 */
        batch_equals_decode(MOE__GGML_F32);
        batch_equals_decode(MOE__GGML_F16);
        batch_equals_decode(MOE__GGML_Q8_0);
        batch_equals_decode(MOE__GGML_Q4_0);
    }
    g_f16 = 0;
}

TEST(infer_experts_used_override) {
    tiny_spec s = tiny_default(TINY_LLAMA);
    tiny_model m;
    tiny_build(&m, &s, 99);
    char dir[128];
    moe_engine *e = load_tiny(&m, dir, NULL);
    if (e) {
        for (int k = 1; k <= s.E; k++) {
            CHECK_EQ_INT(moe_engine_set_experts_used(e, k), 0);
            const double rel = compare_all(e, &m, 8, k);
            CHECK_MSG(rel <= 2e-6, "k=%d: relative error %.3g", k, rel);
        }
        CHECK(moe_engine_set_experts_used(e, s.E + 1) == MOE_EINVAL);
        CHECK_EQ_INT(moe_engine_set_experts_used(e, 0), 0);
        CHECK_EQ_INT(moe_engine_get_hparams(e)->n_expert_used, s.K);
        moe_engine_free(e);
        /* the load-time parameter does the same */
        char path[256], err[256];
        snprintf(path, sizeof path, "%s/tiny.gguf", dir);
        moe_engine_params p = params();
        p.experts_used = 1;
        CHECK_EQ_INT(moe_engine_load(path, &p, &e, err, sizeof err), 0);
        if (e) {
            CHECK(compare_all(e, &m, 8, 1) <= 2e-6);
            moe_engine_free(e);
        }
        p.experts_used = s.E + 1;
        CHECK(moe_engine_load(path, &p, &e, err, sizeof err) == MOE_EINVAL);
    }
    moe_test_rmdir(dir);
    tiny_free(&m);
}

TEST(infer_sampler) {
    const float lg[6] = {0.5f, 2.0f, -1.0f, 2.0f, 1.9f, -3.0f};
    moe_sampler *s;
    moe_sampler_params p = moe_sampler_params_default();
    p.temp = 0;
    CHECK_EQ_INT(moe_sampler_create(&p, 6, &s), 0);
    CHECK_EQ_INT(moe_sampler_sample(s, lg), 1); /* first of the equal maxima */
    moe_sampler_free(s);
    p.temp = 1.0f, p.top_k = 1; /* top-k 1 is greedy at any temperature */
    CHECK_EQ_INT(moe_sampler_create(&p, 6, &s), 0);
    for (int i = 0; i < 20; i++) CHECK_EQ_INT(moe_sampler_sample(s, lg), 1);
    moe_sampler_free(s);
    /* top-p 0.5: probabilities (temp 1) of 1, 3, 4 are .31 .31 .28: keeps {1, 3} */
    p.top_k = 0, p.top_p = 0.5f, p.seed = 7;
    CHECK_EQ_INT(moe_sampler_create(&p, 6, &s), 0);
    int seen[6] = {0}, seq1[50];
    for (int i = 0; i < 50; i++) seen[seq1[i] = moe_sampler_sample(s, lg)]++;
    CHECK(seen[1] > 10 && seen[3] > 10 && seen[1] + seen[3] == 50);
    moe_sampler_free(s);
    CHECK_EQ_INT(moe_sampler_create(&p, 6, &s), 0); /* same seed, same draws */
    int same = 1;
    for (int i = 0; i < 50; i++) same &= moe_sampler_sample(s, lg) == seq1[i];
    CHECK(same);
    moe_sampler_free(s);
    /* full distribution at temp 0.5: frequencies follow softmax(lg / 0.5) */
    p.top_p = 1.0f, p.temp = 0.5f, p.seed = 3;
    CHECK_EQ_INT(moe_sampler_create(&p, 6, &s), 0);
    int cnt[6] = {0};
    const int n = 20000;
    for (int i = 0; i < n; i++) cnt[moe_sampler_sample(s, lg)]++;
    double z = 0, pr[6];
    for (int i = 0; i < 6; i++) z += pr[i] = exp(lg[i] / 0.5);
    for (int i = 0; i < 6; i++) CHECK_CLOSE((double)cnt[i] / n, pr[i] / z, 0.012, 0);
    moe_sampler_free(s);
}

/* Greedy generation is deterministic and equals the argmax of the
 * reference's logits at every step. */
TEST(infer_greedy_generation_matches_reference) {
    tiny_spec s = tiny_default(TINY_LLAMA);
    tiny_model m;
    tiny_build(&m, &s, 5);
    char dir[128];
    moe_engine *e = load_tiny(&m, dir, NULL);
    if (e) {
        int32_t seq[16] = {1, 40, 3};
        int n = 3;
        float *lg = malloc(sizeof(float) * s.V);
        moe_sampler *sm;
        moe_sampler_params sp = moe_sampler_params_default();
        sp.temp = 0;
        moe_sampler_create(&sp, s.V, &sm);
        CHECK_EQ_INT(moe_engine_eval(e, seq, n, lg, 0), 0);
        while (n < 16) {
            seq[n] = moe_sampler_sample(sm, lg);
            n++;
            if (n < 16) CHECK_EQ_INT(moe_engine_eval(e, seq + n - 1, 1, lg, 0), 0);
        }
        double *ref = malloc(sizeof(double) * 16 * s.V);
        tiny_ref_forward(&m, seq, 16, s.K, ref);
        for (int t = 2; t < 15; t++) {
            int best = 0;
            for (int v = 1; v < s.V; v++)
                if (ref[(size_t)t * s.V + v] > ref[(size_t)t * s.V + best]) best = v;
            CHECK_MSG(best == seq[t + 1], "step %d: engine %d, reference %d", t, seq[t + 1], best);
        }
        free(ref), free(lg);
        moe_sampler_free(sm);
        moe_engine_free(e);
    }
    moe_test_rmdir(dir);
    tiny_free(&m);
}

static void collect(int chunk, int n_chunk, double ppl, void *user) {
    if (chunk < 3 && n_chunk == 3) ((double *)user)[chunk] = ppl;
}

/* llama.cpp's protocol by hand: 3 chunks of 8 (26 tokens: the last 2 are
 * dropped), BOS replaces each chunk's first token, positions 4..6 predict
 * tokens 5..7 of the chunk. */
TEST(infer_perplexity_protocol) {
    tiny_spec s = tiny_default(TINY_OLMOE);
    tiny_model m;
    tiny_build(&m, &s, 11);
    char dir[128];
    moe_engine *e = load_tiny(&m, dir, NULL);
    if (e) {
        int32_t tok[26];
        for (int i = 0; i < 26; i++) tok[i] = (i * 37 + 11) % s.V;
        double ppl, err, chunk[3] = {0};
        CHECK_EQ_INT(moe_engine_perplexity(e, tok, 26, 8, 1, &ppl, &err, collect, chunk), 0);
        double nll = 0, nll2 = 0, *ref = malloc(sizeof(double) * 8 * s.V);
        int cnt = 0;
        for (int c = 0; c < 3; c++) {
            int32_t ch[8];
            memcpy(ch, tok + 8 * c, sizeof ch);
            ch[0] = 1;
            tiny_ref_forward(&m, ch, 8, s.K, ref);
            for (int j = 4; j < 7; j++) {
                const double *l = ref + (size_t)j * s.V;
                double mx = l[0], z = 0;
                for (int v = 0; v < s.V; v++) mx = fmax(mx, l[v]);
                for (int v = 0; v < s.V; v++) z += exp(l[v] - mx);
                const double x = -(l[tok[8 * c + j + 1]] - mx - log(z));
                nll += x, nll2 += x * x, cnt++;
            }
            CHECK_CLOSE(chunk[c], exp(nll / cnt), 0, 1e-5);
        }
        const double mean = nll / cnt;
        CHECK_EQ_INT(cnt, 9);
        CHECK_CLOSE(ppl, exp(mean), 0, 1e-5);
        CHECK_CLOSE(err, sqrt((nll2 / cnt - mean * mean) / (cnt - 1)) * exp(mean), 0, 1e-3);
        CHECK(moe_engine_perplexity(e, tok, 7, 8, 1, &ppl, &err, NULL, NULL) == MOE_EINVAL); /* no whole chunk */
        free(ref);
        moe_engine_free(e);
    }
    moe_test_rmdir(dir);
    tiny_free(&m);
}

static void expect_load_error(const tiny_model *m, const char *skip, int expert_used, int want, const char *needle) {
    char dir[128], path[256], err[512] = "";
    if (!moe_test_tmpdir(dir, "infer_bad")) return;
    snprintf(path, sizeof path, "%s/bad.gguf", dir);
    CHECK_EQ_INT(tiny_write(m, path, skip, expert_used), 0);
    moe_engine *e = NULL;
    const int rc = moe_engine_load(path, NULL, &e, err, sizeof err);
    CHECK_MSG(rc == want && !e, "skip %s: rc %d (%s), want %d", skip ? skip : "-", rc, err, want);
    CHECK_MSG(strstr(err, needle) != NULL, "message '%s' lacks '%s'", err, needle);
    moe_engine_free(e);
    moe_test_rmdir(dir);
}

TEST(infer_hostile_model_files) {
    tiny_spec s = tiny_default(TINY_QWEN2MOE);
    tiny_model m;
    tiny_build(&m, &s, 3);
    expect_load_error(&m, "blk.1.ffn_down_exps.weight", 0, MOE_ENOTFOUND, "blk.1.ffn_down_exps.weight");
    expect_load_error(&m, "blk.0.ffn_up_shexp.weight", 0, MOE_ENOTFOUND, "ffn_up_shexp");
    expect_load_error(&m, "output_norm.weight", 0, MOE_ENOTFOUND, "output_norm");
    expect_load_error(&m, NULL, s.E + 1, MOE_EFORMAT, "expert_used_count");
    /* a wrong shape: the layer-1 router with one expert too few */
    for (int i = 0; i < m.n; i++)
        if (!strcmp(m.t[i].name, "blk.1.ffn_gate_inp.weight")) m.t[i].ne[1] = s.E - 1, m.t[i].nbytes = sizeof(float) * s.C * (s.E - 1);
    expect_load_error(&m, NULL, 0, MOE_ESHAPE, "blk.1.ffn_gate_inp.weight");
    tiny_free(&m);
    /* olmoe has no tied head: output.weight is required */
    s = tiny_default(TINY_OLMOE);
    tiny_build(&m, &s, 4);
    expect_load_error(&m, "output.weight", 0, MOE_ENOTFOUND, "output.weight");
    expect_load_error(&m, "blk.0.attn_k_norm.weight", 0, MOE_ENOTFOUND, "attn_k_norm");
    tiny_free(&m);
    /* tokens outside the vocabulary and a full cache are errors, not crashes */
    s = tiny_default(TINY_LLAMA);
    tiny_build(&m, &s, 4);
    char dir[128];
    moe_engine_params p = params();
    p.n_ctx = 8;
    moe_engine *e = load_tiny(&m, dir, &p);
    if (e) {
        const int32_t bad[2] = {3, s.V};
        CHECK(moe_engine_eval(e, bad, 2, NULL, 0) == MOE_EINVAL);
        CHECK_EQ_INT(moe_engine_n_past(e), 0);
        CHECK(moe_engine_eval(e, k_tokens, 9, NULL, 0) == MOE_ELIMIT);
        CHECK_EQ_INT(moe_engine_eval(e, k_tokens, 8, NULL, 0), 0);
        CHECK(moe_engine_eval(e, k_tokens, 1, NULL, 0) == MOE_ELIMIT);
        moe_engine_free(e);
    }
    moe_test_rmdir(dir);
    tiny_free(&m);
}

/* The committed fixtures tests/data/tiny-*.gguf hold what the spec and seed
 * below generate (MOE_WRITE_TINY=1 rewrites them): the engine run on the
 * committed file matches the reference built from a fresh generation. (Not
 * a byte comparison: the float generation may round differently under other
 * compiler flags, e.g. the ASan build.) */
static void committed(const char *name, int arch, uint32_t wtype, double tol) {
    tiny_spec s = tiny_default(arch);
    s.C = 32, s.H = 4, s.G = arch == TINY_OLMOE ? 4 : 2, s.D = 8, s.n_rot = 8, s.F = 32, s.Fs = arch == TINY_QWEN2MOE ? 32 : 0, s.wtype = wtype;
    tiny_model m;
    tiny_build(&m, &s, 2026);
    char path[512];
    snprintf(path, sizeof path, "%s/%s", moe_test_data_dir(), name);
    if (getenv("MOE_WRITE_TINY")) CHECK_EQ_INT(tiny_write(&m, path, NULL, 0), 0);
    char err[512];
    moe_engine *e = NULL;
    const moe_engine_params p = params();
    CHECK_EQ_INT(moe_engine_load(path, &p, &e, err, sizeof err), 0);
    if (e) {
        const double rel = compare_all(e, &m, T_MAX, s.K);
        CHECK_MSG(rel <= tol, "%s: relative error %.3g", name, rel);
        moe_engine_free(e);
    }
    tiny_free(&m);
}

TEST(infer_committed_tiny_files) {
    committed("tiny-mixtral-f16.gguf", TINY_LLAMA, MOE__GGML_F16, 2e-6);
    committed("tiny-qwen2moe-q8_0.gguf", TINY_QWEN2MOE, MOE__GGML_Q8_0, 2e-2);
    committed("tiny-olmoe-q4_0.gguf", TINY_OLMOE, MOE__GGML_Q4_0, 2e-2);
}

/* Random byte corruption of a model file's header (metadata and tensor
 * infos) and of its data: loading fails cleanly or succeeds, and a loaded
 * model evaluates without crashing (run under ASan by make test-asan). */
TEST(infer_hostile_random_corruption) {
    tiny_spec s = tiny_default(TINY_QWEN2MOE);
    s.C = 32, s.D = 8, s.n_rot = 8, s.F = 32, s.Fs = 32;
    tiny_model m;
    tiny_build(&m, &s, 8);
    char dir[128], path[256], err[512];
    if (!moe_test_tmpdir(dir, "infer_fuzz")) return;
    snprintf(path, sizeof path, "%s/f.gguf", dir);
    CHECK_EQ_INT(tiny_write(&m, path, NULL, 0), 0);
    FILE *f = fopen(path, "rb");
    unsigned char *orig = malloc(1 << 20), *buf = malloc(1 << 20);
    const size_t len = f ? fread(orig, 1, 1 << 20, f) : 0;
    if (f) fclose(f);
    CHECK(len > 4096);
    uint64_t st = 99;
    int loaded = 0, refused = 0;
    for (int it = 0; it < 300 && len > 4096; it++) {
        memcpy(buf, orig, len);
        const int flips = 1 + it % 4;
        for (int k = 0; k < flips; k++) {
            st = st * 6364136223846793005ULL + 1442695040888963407ULL;
            const size_t span = it % 3 ? 3000 : len; /* mostly the header */
            buf[(st >> 33) % span] ^= (unsigned char)(1u << ((st >> 20) & 7));
        }
        f = fopen(path, "wb");
        fwrite(buf, 1, len, f);
        fclose(f);
        moe_engine *e = NULL;
        moe_engine_params p = params();
        p.n_ctx = 16, p.n_threads = 1;
        if (moe_engine_load(path, &p, &e, err, sizeof err) == 0) {
            loaded++;
            const moe_engine_hparams *h = moe_engine_get_hparams(e);
            int32_t t[4] = {0, 1 % h->n_vocab, 2 % h->n_vocab, 3 % h->n_vocab};
            float *lg = malloc(sizeof(float) * 4 * (size_t)h->n_vocab);
            CHECK_EQ_INT(moe_engine_eval(e, t, 4, lg, 1), 0);
            free(lg);
            moe_engine_free(e);
        } else {
            refused++;
            if (getenv("MOE_TEST_VERBOSE") && it < 3) fprintf(stderr, "%s\n", err);
            CHECK(e == NULL && err[0]);
        }
    }
    if (getenv("MOE_TEST_VERBOSE")) fprintf(stderr, "loaded %d refused %d\n", loaded, refused);
    CHECK(loaded > 0 && refused > 0);
    free(orig), free(buf);
    moe_test_rmdir(dir);
    tiny_free(&m);
}

/* llama-quantize writes output.weight as Q6_K even in a "Q4_0" file. The
 * engine has no Q6_K kernel yet; its loader keeps an F32 copy of such a
 * tensor (the type table's to_float) instead of refusing the file. Logits
 * match the double-precision reference of the same values; the copy is never
 * dropped like a file page (repack 2 packs float matrices, and MADV_DONTNEED
 * on the copy would zero it: a tied model reads its embedding rows there). */
TEST(infer_q6_k_output_is_converted_at_load) {
    for (int tied = 0; tied < 2; tied++)
        for (int repack = 0; repack <= 2; repack += 2) {
            tiny_spec s = tiny_default(TINY_LLAMA);
            s.C = 256, s.tied = tied; /* Q6_K rows are whole 256-value super-blocks */
            tiny_model m;
            tiny_build(&m, &s, 99);
            tiny_tensor *t = NULL;
            for (int i = 0; i < m.n; i++)
                if (!strcmp(m.t[i].name, tied ? "token_embd.weight" : "output.weight")) t = &m.t[i];
            CHECK(t != NULL);
            if (!t) return;
            const size_t nb = (size_t)s.V * 210;
            unsigned char *q = malloc(nb);
            float *ref = malloc(sizeof(float) * (size_t)s.V * 256);
            uint64_t r = 5;
            for (size_t i = 0; i < nb; i++) r = r * 6364136223846793005ULL + 1, q[i] = (unsigned char)(r >> 56);
            for (int v = 0; v < s.V; v++) q[210 * v + 208] = 0x00, q[210 * v + 209] = 0x04; /* d = 2^-14: |w| <= 0.25 */
            CHECK_EQ_INT(moe__gguf_dequantize(14, q, ref, (size_t)s.V * 256), 0);
            free(t->bytes), free(t->ref);
            t->bytes = q, t->ref = ref, t->nbytes = nb, t->type = 14;
            char dir[128];
            moe_engine_params p = params();
            p.repack = repack;
            moe_engine *e = load_tiny(&m, dir, &p);
            if (e) {
                const double rel = compare_all(e, &m, T_MAX, s.K);
                CHECK_MSG(rel <= 1e-5, "tied %d repack %d: relative logit error %.3g", tied, repack, rel);
                const double again = compare_all(e, &m, T_MAX, s.K); /* after the first use packed and dropped pages */
                CHECK_MSG(again <= 1e-5, "tied %d repack %d, second pass: %.3g", tied, repack, again);
                moe_engine_free(e);
            }
            moe_test_rmdir(dir);
            tiny_free(&m);
        }
}
