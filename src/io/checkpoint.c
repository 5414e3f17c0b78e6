/* Model directories: config.json + model.safetensors under Hugging Face
 * Mixtral names. Each file is replaced atomically. */
#include "io/safetensors.h"
#include "model/model_impl.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

static int ensure_dir(const char *dir, char *err, size_t errsz) {
    if (mkdir(dir, 0777) == 0 || errno == EEXIST) {
        struct stat st;
        if (stat(dir, &st) == 0 && S_ISDIR(st.st_mode)) return MOE_OK;
    }
    return moe__set_err(err, errsz, MOE_EIO, "%s: cannot create directory: %s", dir, strerror(errno));
}

int moe_model_save(const moe_model *m, const char *dir, char *err, size_t errsz) {
    char path[4096];
    int rc = ensure_dir(dir, err, errsz);
    if (rc) return rc;
    snprintf(path, sizeof path, "%s/config.json", dir);
    if ((rc = moe_model_config_save(&m->cfg, path, err, errsz))) return rc;
    moe__st_out *t = moe__calloc((size_t)m->n_tensors, sizeof *t);
    if (!t) return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", dir);
    for (int i = 0; i < m->n_tensors; i++) {
        const moe_param_info *pi = &m->tensors[i];
        t[i].name = pi->name;
        t[i].dtype = MOE__DT_F32;
        t[i].ndim = pi->ndim;
        for (int d = 0; d < pi->ndim; d++) t[i].shape[d] = pi->shape[d];
        t[i].data = m->params + pi->offset;
    }
    const char *meta[] = {"format", "pt", "producer", "moe", NULL};
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    rc = moe__st_write(path, t, m->n_tensors, meta, err, errsz);
    moe__free(t);
    return rc;
}

int moe_model_load(const char *dir, int max_batch, int max_seq, int want_grads, int n_threads, moe_model **out,
                   char *err, size_t errsz) {
    *out = NULL;
    char path[4096];
    moe_model_config cfg;
    snprintf(path, sizeof path, "%s/config.json", dir);
    int rc = moe_model_config_load(path, &cfg, err, errsz);
    if (rc) return rc;
    if (max_seq <= 0 || max_seq > cfg.max_position_embeddings) max_seq = cfg.max_position_embeddings;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    moe__st_file *f;
    rc = moe__st_open(path, &f, err, errsz);
    if (rc) return rc;
    /* The weights must be there before the model's memory is: a small config
     * can declare billions of parameters. 2 bytes: F16/BF16, the narrowest. */
    double have = 0, need = 2 * moe_model_config_costs(&cfg, 1).total_params;
    for (int i = 0; i < moe__st_count(f); i++) have += (double)moe__st_get(f, i)->nbytes;
    if (have < need) {
        moe__st_close(f);
        return moe__set_err(err, errsz, MOE_EFORMAT,
                            "%s: %.0f bytes of tensors cannot hold the %.0f parameters of config.json", path, have,
                            need / 2);
    }
    moe_model *m = moe_model_create(&cfg, max_batch, max_seq, want_grads, n_threads, &rc, err, errsz);
    if (!m) {
        moe__st_close(f);
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
    moe__st_close(f);
    if (rc) {
        moe_model_free(m);
        return rc;
    }
    *out = m;
    return MOE_OK;
}
