/* Model directories: config.json + model.safetensors under Hugging Face
 * Mixtral names, replaced together as one checkpoint (io/ckpt.h). Under
 * expert parallelism rank 0 runs the checkpoint and writes every rank's
 * experts, gathered by global id (docs/distributed.md). */
#include "io/ckpt.h"
#include "io/safetensors.h"
#include "dist/dist.h"
#include "model/model_impl.h"
#include "train/numerics.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int is_root(const moe_model *m) { return !m->dist || moe_dist_rank(m->dist) == 0; }

/* Under expert parallelism only rank 0 touches the directory; any rank's
 * error becomes every rank's, so all of them leave a checkpoint at the same
 * collective (none waits in a gather the others skipped). */
int moe__model_agree(const moe_model *m, int rc, char *err, size_t errsz) {
    if (!m->dist) return rc;
    int v = -rc; /* error codes are negative: the largest -rc wins */
    if (moe__dist_allreduce_max_int(m->dist, &v, 1))
        return moe__set_err(err, errsz, MOE_EIO, "expert parallelism: %s", moe_dist_errmsg(m->dist));
    if (v > 0 && !rc) return moe__set_err(err, errsz, -v, "another rank failed (%s)", moe_strerror(-v));
    return rc;
}

int moe__model_ckpt_begin(const moe_model *m, const char *dir, int step, moe__ckpt **c, char *err, size_t errsz) {
    *c = NULL;
    const int rc = is_root(m) ? moe__ckpt_begin(dir, step, c, err, errsz) : MOE_OK;
    return moe__model_agree(m, rc, err, errsz);
}

int moe__model_ckpt_end(const moe_model *m, moe__ckpt *c, int rc, char *err, size_t errsz) {
    if ((rc = moe__model_agree(m, rc, err, errsz))) {
        moe__ckpt_abort(c); /* rank 0 deletes what it staged; NULL elsewhere */
        return rc;
    }
    if (c) rc = moe__ckpt_commit(c, err, errsz);
    return moe__model_agree(m, rc, err, errsz);
}

int moe__model_stage_tensors(const moe_model *m, moe__ckpt *c, const char *name, const float *const *bases,
                             const char *const *prefixes, int nb, const char *const *meta, char *err, size_t errsz) {
    const int P = m->dist ? moe_dist_size(m->dist) : 1, root = is_root(m);
    const int E = m->cfg.num_local_experts, El = m->e_local, C = m->cfg.hidden_size, F = m->cfg.intermediate_size;
    const size_t FC = (size_t)F * C;
    const size_t per_base = (size_t)m->n_tensors + (size_t)(P - 1) * 3 * El * MOE_MAX_LAYERS;
    char path[4200] = "";
    /* A diverged run must not replace a good checkpoint with one that no
     * loader accepts: each rank checks its own share before anything is
     * staged, and a refusal leaves the previous checkpoint the current one. */
    int rc = MOE_OK;
    for (int b = 0; b < nb && !rc; b++) {
        size_t at;
        const int bad = moe__find_nonfinite(m, bases[b], 0, &at);
        if (bad < 0) continue;
        char what[320];
        moe__describe_value(m, bad, at, bases[b][m->tensors[bad].offset + at], what, sizeof what);
        rc = moe__set_err(err, errsz, MOE_ENONFINITE, "%s not saved: non-finite %s%s in %s", name,
                          prefixes[b][0] ? "optimizer moment " : "weight", prefixes[b], what);
    }
    if (!rc && root && !moe__ckpt_stage(c, name, path, sizeof path))
        rc = moe__set_err(err, errsz, MOE_EINVAL, "checkpoint: cannot stage %s", name);
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
    if (!rc && (!t || !names || (P > 1 && root && nspan && !gath)))
        rc = moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path[0] ? path : name);
    rc = moe__model_agree(m, rc, err, errsz); /* every rank gathers, or none */
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
                    rc = moe__set_err(err, errsz, MOE_EIO, "%s: gathering experts: %s", name, moe_dist_errmsg(m->dist));
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
    return moe__model_agree(m, rc, err, errsz);
}

int moe__model_stage(const moe_model *m, moe__ckpt *c, char *err, size_t errsz) {
    char path[4200];
    int rc = MOE_OK;
    if (is_root(m))
        rc = moe__ckpt_stage(c, "config.json", path, sizeof path)
                 ? moe_model_config_save(&m->cfg, path, err, errsz)
                 : moe__set_err(err, errsz, MOE_EINVAL, "checkpoint: cannot stage config.json");
    if ((rc = moe__model_agree(m, rc, err, errsz))) return rc;
    const char *meta[] = {"format", "pt", "producer", "moe", NULL};
    const float *bases[1] = {m->params};
    const char *prefixes[1] = {""};
    return moe__model_stage_tensors(m, c, "model.safetensors", bases, prefixes, 1, meta, err, errsz);
}

int moe_model_save(const moe_model *m, const char *dir, char *err, size_t errsz) {
    moe__ckpt *c;
    int rc = moe__model_ckpt_begin(m, dir, -1, &c, err, errsz);
    if (rc) return rc;
    return moe__model_ckpt_end(m, c, moe__model_stage(m, c, err, errsz), err, errsz);
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
    moe__st_file *f = NULL;
    rc = moe__ckpt_path(dir, "model.safetensors", path, sizeof path, err, errsz);
    if (!rc) rc = moe__st_open(path, &f, err, errsz);
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
    size_t at;
    const int bad = rc ? -1 : moe__find_nonfinite(m, m->params, 0, &at);
    if (bad >= 0) { /* training from it would only propagate NaN; say where it is */
        char what[320];
        moe__describe_value(m, bad, at, m->params[m->tensors[bad].offset + at], what, sizeof what);
        rc = moe__set_err(err, errsz, MOE_ENONFINITE, "%s: non-finite weight in %s", path, what);
    }
    moe__st_close(f);
    /* expert parallelism: each rank reads its own experts, so one rank can
     * fail (a NaN expert) where the others do not; all must fail together */
    rc = moe__model_agree(m, rc, err, errsz);
    if (rc) {
        moe_model_free(m);
        return rc;
    }
    *out = m;
    return MOE_OK;
}
