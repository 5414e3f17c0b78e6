/* moe_engine_get_stats against sums over the tensors the test writer put in
 * the file (names and sizes, independent of the loader's bookkeeping). */
#include "io/quant.h"
#include "moe.h"
#include "test.h"
#include "test_infer_ref.h"

#include <stdio.h>
#include <string.h>

static void check_stats(int arch, uint32_t wtype, int tied, int k, int kv) {
    tiny_spec s = tiny_default(arch);
    s.wtype = wtype, s.tied = tied;
    tiny_model m;
    tiny_build(&m, &s, 7);
    char dir[256], path[300], err[512];
    if (!moe_test_tmpdir(dir, "infer_card")) return;
    snprintf(path, sizeof path, "%s/tiny.gguf", dir);
    CHECK_EQ_INT(tiny_write(&m, path, NULL, 0), 0);
    moe_engine_params p = moe_engine_params_default();
    p.n_ctx = 16, p.experts_used = k;
    p.kv_f16_k = kv & 1, p.kv_f16_v = kv >> 1; /* kv: bit 0 K, bit 1 V in fp16 */
    moe_engine *e = NULL;
    CHECK_MSG(moe_engine_load(path, &p, &e, err, sizeof err) == 0, "load: %s", err);
    if (!e) return;
    /* expected: every tensor of the file in the totals; a token reads all of
     * them except E - k of every expert stack and all embedding rows but one
     * (tied: the embedding is the output matrix, read whole) */
    uint64_t np = 0, nb = 0, npa = 0, nba = 0;
    for (int i = 0; i < m.n; i++) {
        const tiny_tensor *t = &m.t[i];
        const uint64_t n = (uint64_t)(t->ne[0] * t->ne[1] * t->ne[2]), b = t->nbytes;
        np += n, nb += b;
        if (strstr(t->name, "_exps.weight")) /* [E][rows][cols] */
            npa += n / s.E * (uint64_t)k, nba += b / s.E * (uint64_t)k;
        else if (!strcmp(t->name, "token_embd.weight") && !tied)
            npa += n / s.V, nba += b / s.V;
        else
            npa += n, nba += b;
    }
    moe_engine_stats st;
    moe_engine_get_stats(e, &st);
    CHECK_EQ_INT(st.n_params, np);
    CHECK_EQ_INT(st.n_bytes, nb);
    CHECK_EQ_INT(st.n_params_active, npa);
    CHECK_EQ_INT(st.n_bytes_active, nba);
    /* per layer and KV head value: 4 bytes each of K and V in F32, 2 in fp16 */
    CHECK_EQ_INT(st.kv_bytes_per_pos, (uint64_t)s.L * s.G * s.D * ((kv & 1 ? 2 : 4) + (kv & 2 ? 2 : 4)));
    moe_engine_free(e);
    tiny_free(&m);
    moe_test_rmdir(dir);
}

TEST(infer_stats_count_the_active_weights) {
    check_stats(TINY_LLAMA, MOE__GGML_F32, 0, 2, 0);     /* F32 cache */
    check_stats(TINY_LLAMA, MOE__GGML_Q4_0, 1, 1, 3);    /* tied head; F16 cache */
    check_stats(TINY_QWEN2MOE, MOE__GGML_Q8_0, 0, 3, 1); /* shared expert, biases; K fp16, V F32 */
    check_stats(TINY_OLMOE, MOE__GGML_F16, 0, 2, 2);     /* q/k norms; K F32, V fp16 */
}
