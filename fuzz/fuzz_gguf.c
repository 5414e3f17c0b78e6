/* GGUF: the header, every metadata value (nested arrays included) through the
 * typed getters, the tensor table, and the conversion of small tensors to
 * float (the quantized block decoders read the mapped bytes). */
#include "fuzz.h"
#include "io/gguf.h"

#include <stdlib.h>

#define MAX_CONVERT (1u << 16) /* elements converted per tensor */

static void walk_value(const moe__gguf_value *v, int depth) {
    if (v->type != MOE__GGUF_ARRAY || depth > MOE__GGUF_MAX_DEPTH) return;
    size_t n = v->arr.n < 64 ? v->arr.n : 64;
    for (size_t i = 0; i < n; i++) {
        moe__gguf_value e;
        if (moe__gguf_arr_get(v, i, &e) == 0) walk_value(&e, depth + 1);
    }
    if (v->arr.n) { /* the last element too: bounds of the packed data */
        moe__gguf_value e;
        (void)moe__gguf_arr_get(v, v->arr.n - 1, &e);
    }
}

MOE_FUZZ_TARGET(gguf) {
    moe__gguf *g;
    char err[256];
    int rc = moe__gguf_open_mem(data, size, &g, err, sizeof err);
    if (rc) return rc;
    for (size_t i = 0; i < moe__gguf_n_kv(g); i++) {
        const char *key;
        const moe__gguf_value *v;
        if (moe__gguf_kv_at(g, i, &key, &v)) moe_fuzz_trap("kv_at in range failed");
        if (moe__gguf_find(g, key) == NULL) moe_fuzz_trap("a key is not found by name");
        walk_value(v, 0);
        uint64_t u;
        int64_t s;
        double d;
        float f;
        int b;
        const char *str;
        size_t len;
        (void)moe__gguf_get_u64(g, key, &u, err, sizeof err);
        (void)moe__gguf_get_i64(g, key, &s, err, sizeof err);
        (void)moe__gguf_get_f64(g, key, &d, err, sizeof err);
        (void)moe__gguf_get_f32(g, key, &f, err, sizeof err);
        (void)moe__gguf_get_bool(g, key, &b, err, sizeof err);
        (void)moe__gguf_get_str(g, key, &str, &len, err, sizeof err);
        moe__gguf_vtype et;
        size_t n;
        if (moe__gguf_get_arr_info(g, key, &et, &n, err, sizeof err) == 0 && n <= 4096) {
            const moe__gguf_str *items;
            (void)moe__gguf_get_arr_str(g, key, &items, &n, err, sizeof err);
            float *fb = malloc((n ? n : 1) * sizeof(int64_t));
            if (fb) {
                (void)moe__gguf_get_arr_f32(g, key, fb, n, err, sizeof err);
                (void)moe__gguf_get_arr_i32(g, key, (int32_t *)fb, n, err, sizeof err);
                (void)moe__gguf_get_arr_i64(g, key, (int64_t *)fb, n, err, sizeof err);
                free(fb);
            }
        }
    }
    for (size_t i = 0; i < moe__gguf_n_tensors(g); i++) {
        const moe__gguf_tensor *t = moe__gguf_tensor_at(g, i);
        if (!t) moe_fuzz_trap("tensor_at in range returned NULL");
        if (moe__gguf_find_tensor(g, t->name) != t) moe_fuzz_trap("a tensor is not found by name");
        if (t->nelem == 0 || t->nelem > MAX_CONVERT) continue;
        float *dst = malloc(t->nelem * sizeof *dst);
        if (!dst) continue;
        (void)moe__gguf_tensor_f32(g, t, dst, t->nelem, err, sizeof err);
        free(dst);
    }
    moe__gguf_close(g);
    return 0;
}
