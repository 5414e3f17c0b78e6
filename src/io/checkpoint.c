/* Model directories: config.json + model.safetensors under Hugging Face
 * Mixtral names, replaced together as one checkpoint (io/ckpt.h). */
#include "io/ckpt.h"
#include "io/safetensors.h"
#include "model/model_impl.h"
#include "train/numerics.h"

#include <stdio.h>
#include <string.h>

/* config.json and model.safetensors of m, staged into checkpoint c. */
int moe__model_stage(const moe_model *m, moe__ckpt *c, char *err, size_t errsz) {
    char path[4200];
    if (!moe__ckpt_stage(c, "config.json", path, sizeof path))
        return moe__set_err(err, errsz, MOE_EINVAL, "checkpoint: cannot stage config.json");
    int rc = moe_model_config_save(&m->cfg, path, err, errsz);
    if (rc) return rc;
    if (!moe__ckpt_stage(c, "model.safetensors", path, sizeof path))
        return moe__set_err(err, errsz, MOE_EINVAL, "checkpoint: cannot stage model.safetensors");
    moe__st_out *t = moe__calloc((size_t)m->n_tensors, sizeof *t);
    if (!t) return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path);
    for (int i = 0; i < m->n_tensors; i++) {
        const moe_param_info *pi = &m->tensors[i];
        t[i].name = pi->name;
        t[i].dtype = MOE__DT_F32;
        t[i].ndim = pi->ndim;
        for (int d = 0; d < pi->ndim; d++) t[i].shape[d] = pi->shape[d];
        t[i].data = m->params + pi->offset;
    }
    const char *meta[] = {"format", "pt", "producer", "moe", NULL};
    rc = moe__st_write(path, t, m->n_tensors, meta, err, errsz);
    moe__free(t);
    return rc;
}

int moe_model_save(const moe_model *m, const char *dir, char *err, size_t errsz) {
    moe__ckpt *c;
    int rc = moe__ckpt_begin(dir, -1, &c, err, errsz);
    if (rc) return rc;
    if ((rc = moe__model_stage(m, c, err, errsz))) {
        moe__ckpt_abort(c);
        return rc;
    }
    return moe__ckpt_commit(c, err, errsz);
}

int moe_model_load(const char *dir, int max_batch, int max_seq, int want_grads, int n_threads, moe_model **out,
                   char *err, size_t errsz) {
    *out = NULL;
    char path[4200];
    moe_model_config cfg;
    int rc = moe__ckpt_path(dir, "config.json", path, sizeof path, err, errsz);
    if (!rc) rc = moe_model_config_load(path, &cfg, err, errsz);
    if (rc) return rc;
    if (max_seq <= 0 || max_seq > cfg.max_position_embeddings) max_seq = cfg.max_position_embeddings;
    moe_model *m = moe_model_create(&cfg, max_batch, max_seq, want_grads, n_threads, &rc, err, errsz);
    if (!m) return rc;
    moe__st_file *f;
    rc = moe__ckpt_path(dir, "model.safetensors", path, sizeof path, err, errsz);
    if (!rc) rc = moe__st_open(path, &f, err, errsz);
    if (rc) {
        moe_model_free(m);
        return rc;
    }
    for (int i = 0; i < m->n_tensors && !rc; i++) {
        const moe_param_info *pi = &m->tensors[i];
        const moe__st_tensor *t = moe__st_find(f, pi->name);
        if (!t) {
            rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: tensor \"%s\" is missing", path, pi->name);
            break;
        }
        int same = t->ndim == pi->ndim;
        for (int d = 0; same && d < pi->ndim; d++) same = t->shape[d] == pi->shape[d];
        if (!same) {
            rc = moe__set_err(err, errsz, MOE_ESHAPE, "%s: tensor \"%s\" has shape [%lld, %lld], config says [%lld, %lld]",
                              path, pi->name, (long long)t->shape[0], (long long)(t->ndim > 1 ? t->shape[1] : 0),
                              (long long)pi->shape[0], (long long)(pi->ndim > 1 ? pi->shape[1] : 0));
            break;
        }
        rc = moe__st_read_f32(t, m->params + pi->offset, pi->numel);
        if (rc) moe__set_err(err, errsz, rc, "%s: tensor \"%s\": %s dtype cannot be read as float", path, pi->name,
                             moe__dtype_name(t->dtype));
    }
    size_t at;
    const int bad = rc ? -1 : moe__find_nonfinite(m, m->params, 0, &at);
    if (bad >= 0) { /* training from it would only propagate NaN; say where it is */
        char what[320];
        moe__describe_value(m, bad, at, m->params[m->tensors[bad].offset + at], what, sizeof what);
        rc = moe__set_err(err, errsz, MOE_ENONFINITE, "%s: non-finite weight in %s", path, what);
    }
    moe__st_close(f);
    if (rc) {
        moe_model_free(m);
        return rc;
    }
    *out = m;
    return MOE_OK;
}
