/* Model directories: config.json + model.safetensors under Hugging Face
 * Mixtral names. Each file is replaced atomically. */
#include "io/safetensors.h"
#include "dist/dist.h"
#include "model/model_impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static int ensure_dir(const char *dir, char *err, size_t errsz) {
    if (mkdir(dir, 0777) == 0 || errno == EEXIST) {
        struct stat st;
        if (stat(dir, &st) == 0 && S_ISDIR(st.st_mode)) return MOE_OK;
    }
    return moe__set_err(err, errsz, MOE_EIO, "%s: cannot create directory: %s", dir, strerror(errno));
}

/* Under expert parallelism every rank's error becomes every rank's: rank 0
 * writes, the others only send their experts. */
static int agree(const moe_model *m, int rc, char *err, size_t errsz) {
    if (!m->dist) return rc;
    int v = -rc;
    if (moe__dist_allreduce_max_int(m->dist, &v, 1))
        return moe__set_err(err, errsz, MOE_EIO, "checkpoint: %s", moe_dist_errmsg(m->dist));
    if (v > 0 && !rc) return moe__set_err(err, errsz, -v, "checkpoint: rank 0 failed (%s)", moe_strerror(-v));
    return rc;
}

int moe__ckpt_write(const moe_model *m, const float *const *bases, const char *const *prefixes, int nb,
                    const char *path, const char *const *meta, char *err, size_t errsz) {
    const int P = m->dist ? moe_dist_size(m->dist) : 1, root = !m->dist || moe_dist_rank(m->dist) == 0;
    const int E = m->cfg.num_local_experts, El = m->e_local, C = m->cfg.hidden_size, F = m->cfg.intermediate_size;
    const size_t FC = (size_t)F * C;
    const size_t per_base = (size_t)m->n_tensors + (size_t)(P - 1) * 3 * El * MOE_MAX_LAYERS;
    moe__st_out *t = moe__calloc(per_base * (size_t)nb, sizeof *t);
    char *names = moe__calloc(per_base * (size_t)nb, 112);
    /* every rank's expert blocks on rank 0: [nb][layer][P][span] */
    size_t span = 0, nspan = 0;
    for (int i = 0; i < m->cfg.num_hidden_layers; i++)
        if (m->layers[i].moe) {
            const moe_layer_params o = moe_layer_param_offsets(m->layers[i].moe);
            span = (o.w3 != SIZE_MAX ? o.w3 : o.w2) + (o.w2 - o.w1) - o.w1;
            nspan++;
        }
    float *gath = P > 1 && root && nspan ? moe__aligned_alloc(sizeof(float) * span * nspan * P * (size_t)nb) : NULL;
    int rc = !t || !names || (P > 1 && root && nspan && !gath)
                 ? moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path) : MOE_OK;
    rc = agree(m, rc, err, errsz);
    int n = 0;
    for (int b = 0; b < nb && !rc; b++) {
        size_t layer_k = 0;
        for (int i = 0; i < m->n_tensors; i++) {
            const moe_param_info *pi = &m->tensors[i];
            const char *ex = strstr(pi->name, ".experts.");
            if (ex && P > 1) {
                int layer;
                if (atoi(ex + 9) != m->e_first || !strstr(ex, ".w1.") || sscanf(pi->name, "model.layers.%d.", &layer) != 1)
                    continue; /* the layer's experts go out together, at its first */
                const moe_layer_params o = moe_layer_param_offsets(m->layers[layer].moe);
                float *g = gath ? gath + ((size_t)b * nspan + layer_k) * span * P : NULL;
                layer_k++;
                if (moe__dist_gather_f32(m->dist, bases[b] + m->layers[layer].moe_off + o.w1, span, g, 0)) {
                    rc = moe__set_err(err, errsz, MOE_EIO, "%s: gathering experts: %s", path, moe_dist_errmsg(m->dist));
                    break;
                }
                if (!root) continue;
                const int nk = o.w3 != SIZE_MAX ? 3 : 2;
                const char *w[3] = {"w1", "w2", "w3"};
                for (int k = 0; k < nk; k++)
                    for (int e = 0; e < E; e++) {
                        char *nm = names + (size_t)n * 112;
                        snprintf(nm, 112, "%smodel.layers.%d.block_sparse_moe.experts.%d.%s.weight", prefixes[b], layer,
                                 e, w[k]);
                        t[n] = (moe__st_out){nm, MOE__DT_F32, 2, {k == 1 ? C : F, k == 1 ? F : C, 0, 0},
                                             g + (size_t)(e / El) * span + ((size_t)k * El + e % El) * FC};
                        n++;
                    }
                continue;
            }
            char *nm = names + (size_t)n * 112;
            snprintf(nm, 112, "%s%s", prefixes[b], pi->name);
            t[n].name = nm;
            t[n].dtype = MOE__DT_F32;
            t[n].ndim = pi->ndim;
            for (int d = 0; d < pi->ndim; d++) t[n].shape[d] = pi->shape[d];
            t[n].data = bases[b] + pi->offset;
            n++;
        }
    }
    if (!rc && root) rc = moe__st_write(path, t, n, meta, err, errsz);
    moe__free(t);
    moe__free(names);
    moe__afree(gath);
    return agree(m, rc, err, errsz);
}

int moe_model_save(const moe_model *m, const char *dir, char *err, size_t errsz) {
    char path[4096];
    const int root = !m->dist || moe_dist_rank(m->dist) == 0;
    int rc = root ? ensure_dir(dir, err, errsz) : MOE_OK;
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (!rc && root) rc = moe_model_config_save(&m->cfg, path, err, errsz);
    if ((rc = agree(m, rc, err, errsz))) return rc;
    const char *meta[] = {"format", "pt", "producer", "moe", NULL};
    const float *bases[1] = {m->params};
    const char *prefixes[1] = {""};
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    return moe__ckpt_write(m, bases, prefixes, 1, path, meta, err, errsz);
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
    moe_model *m = moe_model_create(&cfg, max_batch, max_seq, want_grads, n_threads, &rc, err, errsz);
    if (!m) return rc;
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    moe__st_file *f;
    rc = moe__st_open(path, &f, err, errsz);
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
    moe__st_close(f);
    if (rc) {
        moe_model_free(m);
        return rc;
    }
    *out = m;
    return MOE_OK;
}
