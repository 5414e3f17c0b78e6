/* safetensors: the header JSON, the tensor table, the metadata, and the
 * conversion of small tensors to float. */
#include "fuzz.h"
#include "io/safetensors.h"

#include <stdlib.h>
#include <string.h>

#define MAX_CONVERT (1u << 16)

MOE_FUZZ_TARGET(safetensors) {
    moe__st_file *f;
    char err[256];
    int rc = moe__st_open_mem(data, size, &f, err, sizeof err);
    if (rc) return rc;
    for (int i = 0; i < moe__st_count(f); i++) {
        const moe__st_tensor *t = moe__st_get(f, i);
        if (!t) moe_fuzz_trap("st_get in range returned NULL");
        if (moe__st_find(f, t->name) != t) moe_fuzz_trap("a tensor is not found by name");
        if (t->numel > MAX_CONVERT) continue;
        float *dst = malloc((t->numel ? t->numel : 1) * sizeof *dst);
        if (!dst) continue;
        (void)moe__st_read_f32(t, dst, t->numel);
        free(dst);
    }
    for (int i = 0; i < moe__st_meta_count(f); i++) {
        const char *k, *v;
        if (moe__st_meta_at(f, i, &k, &v)) moe_fuzz_trap("meta_at in range failed");
        const char *w = moe__st_meta(f, k);
        if (!w || strcmp(w, v)) moe_fuzz_trap("a metadata key is not found by name");
    }
    moe__st_close(f);
    return 0;
}
