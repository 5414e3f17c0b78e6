/* GGUF MoE model binding: architecture detection, hyperparameters from the
 * "<arch>.*" keys and every tensor's name, type and shape checked against
 * them (llama.cpp's tensor table for llama/Mixtral, qwen2moe and olmoe). */
#include "infer/infer.h"
#include "io/atomic.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#define MAX_LAYERS 4096
#define MAX_DIM (1 << 20)

typedef struct binder {
    const moe__gguf *g;
    char *err;
    size_t errsz;
    float *owned; /* next free float of the 1-D arena (NULL while sizing) */
    size_t n_owned;
    size_t n_converted; /* floats of F32 copies of tensors without kernels (sizing pass) */
} binder;

/* the type table's word (io/quant.c): a type with kernels, or one the table
 * can convert to float (the loader keeps an F32 copy of those tensors) */
static int computable(uint32_t type) {
    const moe__gguf_type_info *t = moe__gguf_type_info_of(type);
    return t && (t->engine != MOE__TYPE_ENGINE_NONE || t->to_float);
}

/* Checks name's ne against want[0..nd) (ggml order) and its type. NULL and 0
 * when absent and optional. */
static int find_checked(binder *b, const char *name, int nd, const int64_t *want, int required,
                        const moe__gguf_tensor **out) {
    const moe__gguf_tensor *t = moe__gguf_find_tensor(b->g, name);
    *out = t;
    if (!t)
        return required ? moe__set_err(b->err, b->errsz, MOE_ENOTFOUND, "%s: tensor '%s' is missing",
                                       moe__gguf_label(b->g), name)
                        : 0;
    int ok = 1;
    for (int d = 0; d < MOE__GGUF_MAX_DIMS; d++) ok &= t->ne[d] == (d < nd ? want[d] : 1);
    if (!ok) {
        char got[96], exp[96];
        int n = 0, m = 0;
        for (int d = 0; d < MOE__GGUF_MAX_DIMS && n < 90; d++)
            n += snprintf(got + n, sizeof got - n, "%s%lld", d ? ", " : "", (long long)t->ne[d]);
        for (int d = 0; d < MOE__GGUF_MAX_DIMS && m < 90; d++)
            m += snprintf(exp + m, sizeof exp - m, "%s%lld", d ? ", " : "", (long long)(d < nd ? want[d] : 1));
        return moe__set_err(b->err, b->errsz, MOE_ESHAPE, "%s: tensor '%s' has ne {%s}, expected {%s}",
                            moe__gguf_label(b->g), name, got, exp);
    }
    if (!computable(t->type)) {
        char names[128];
        moe__gguf_loadable_type_names(names, sizeof names);
        return moe__set_err(b->err, b->errsz, MOE_EUNSUPPORTED, "%s: tensor '%s' has type %s (supported: %s)",
                            moe__gguf_label(b->g), name, moe__gguf_type_name(t->type), names);
    }
    return 0;
}

/* n values of tensor t as float in the arena: *dst on the binding pass, NULL
 * (counted only) on the sizing pass. */
static int arena_convert(binder *b, const moe__gguf_tensor *t, const char *name, size_t n, float **dst) {
    *dst = NULL;
    if (b->owned) {
        *dst = b->owned + b->n_owned;
        int rc = moe__gguf_dequantize(t->type, t->data, *dst, n);
        if (rc)
            return moe__set_err(b->err, b->errsz, rc, "%s: tensor '%s': cannot convert %s", moe__gguf_label(b->g), name,
                                moe__gguf_type_name(t->type));
    }
    b->n_owned += n;
    return 0;
}

/* A matrix (n_mat == 1) or stack [n_mat][rows][cols]. */
static int bind_wt(binder *b, const char *name, int rows, int cols, int n_mat, int required, moe__wt *w) {
    int64_t want[3] = {cols, rows, n_mat};
    const moe__gguf_tensor *t;
    memset(w, 0, sizeof *w);
    int rc = find_checked(b, name, n_mat > 1 ? 3 : 2, want, required, &t);
    if (rc || !t) return rc;
    const moe__gguf_type_info *ti = moe__gguf_type_info_of(t->type);
    if (ti && ti->engine == MOE__TYPE_ENGINE_NONE) { /* no kernel: F32 in the arena (find_checked saw to_float) */
        size_t n;
        if (moe__mul_size((size_t)rows * (size_t)cols, (size_t)n_mat, &n) || n > SIZE_MAX / sizeof(float) - b->n_owned)
            return moe__set_err(b->err, b->errsz, MOE_ELIMIT, "%s: tensor '%s' is too large to convert",
                                moe__gguf_label(b->g), name);
        float *dst;
        if ((rc = arena_convert(b, t, name, n, &dst))) return rc;
        if (dst) w->data = (const uint8_t *)dst;
        else b->n_converted += n;
        w->type = MOE__GGML_F32, w->converted = 1;
        w->rows = rows, w->cols = cols, w->n_mat = n_mat;
        w->row_bytes = sizeof(float) * (size_t)cols, w->mat_bytes = w->row_bytes * (size_t)rows;
        return 0;
    }
    w->data = t->data;
    w->type = t->type;
    w->rows = rows, w->cols = cols, w->n_mat = n_mat;
    w->row_bytes = moe__gguf_row_size(t->type, (size_t)cols);
    w->mat_bytes = w->row_bytes * (size_t)rows; /* <= t->nbytes, checked by the reader */
    if (!w->row_bytes)
        return moe__set_err(b->err, b->errsz, MOE_EFORMAT, "%s: tensor '%s': %d columns do not fit type %s",
                            moe__gguf_label(b->g), name, cols, moe__gguf_type_name(t->type));
    return 0;
}

/* A 1-D tensor of n values, converted to float in the arena (sizing pass:
 * counted only). */
static int bind_vec(binder *b, const char *name, int n, int required, const float **out) {
    int64_t want[1] = {n};
    const moe__gguf_tensor *t;
    *out = NULL;
    int rc = find_checked(b, name, 1, want, required, &t);
    if (rc || !t) return rc;
    float *dst;
    if ((rc = arena_convert(b, t, name, (size_t)n, &dst))) return rc;
    *out = dst ? dst : (const float *)(uintptr_t)1; /* sizing pass: present, resolved in the second */
    return 0;
}

static int get_dim(const moe__gguf *g, const char *arch, const char *suffix, int def, int *out, char *err,
                   size_t errsz) {
    char key[128];
    uint32_t v;
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    int rc = moe__gguf_get_u32(g, key, &v, err, errsz);
    if (rc == MOE_ENOTFOUND && def >= 0) v = (uint32_t)def, rc = 0;
    else if (rc == MOE_ENOTFOUND)
        return moe__set_err(err, errsz, rc, "%s: metadata key '%s' is missing", moe__gguf_label(g), key);
    if (rc) return rc;
    if (v > MAX_DIM)
        return moe__set_err(err, errsz, MOE_ELIMIT, "%s: %s = %u exceeds %d", moe__gguf_label(g), key, v, MAX_DIM);
    *out = (int)v;
    return 0;
}

static int get_float(const moe__gguf *g, const char *arch, const char *suffix, float def, float *out, char *err,
                     size_t errsz) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    int rc = moe__gguf_get_f32(g, key, out, err, errsz);
    if (rc == MOE_ENOTFOUND) *out = def, rc = 0;
    return rc;
}

static int read_hparams(moe__imodel *m, char *err, size_t errsz) {
    const moe__gguf *g = m->g;
    const char *arch, *L = moe__gguf_label(g);
    int rc = moe__gguf_get_str(g, "general.architecture", &arch, NULL, err, errsz);
    if (rc == MOE_ENOTFOUND) return moe__set_err(err, errsz, MOE_EFORMAT, "%s: no general.architecture", L);
    if (rc) return rc;
    static const struct { const char *name; moe__arch a; int neox, norm; } archs[] = {
        {"llama", MOE__ARCH_LLAMA, 0, 1}, {"qwen2moe", MOE__ARCH_QWEN2MOE, 1, 0}, {"olmoe", MOE__ARCH_OLMOE, 1, 0}};
    int found = -1;
    for (int i = 0; i < 3; i++)
        if (!strcmp(arch, archs[i].name)) found = i;
    if (found < 0)
        return moe__set_err(err, errsz, MOE_EUNSUPPORTED, "%s: architecture '%s' (supported: llama with experts, qwen2moe, olmoe)",
                            L, arch);
    m->arch = archs[found].a, m->rope_neox = archs[found].neox, m->norm_topk = archs[found].norm;
    moe_engine_hparams *h = &m->hp;
    snprintf(h->arch, sizeof h->arch, "%s", arch);
    int ff = 0, key_len, val_len;
    if ((rc = get_dim(g, arch, "embedding_length", -1, &h->n_embd, err, errsz)) ||
        (rc = get_dim(g, arch, "block_count", -1, &h->n_layer, err, errsz)) ||
        (rc = get_dim(g, arch, "attention.head_count", -1, &h->n_head, err, errsz)) ||
        (rc = get_dim(g, arch, "attention.head_count_kv", h->n_head, &h->n_head_kv, err, errsz)) ||
        (rc = get_dim(g, arch, "context_length", 4096, &h->n_ctx_train, err, errsz)) ||
        (rc = get_dim(g, arch, "expert_count", 0, &h->n_expert, err, errsz)) ||
        (rc = get_dim(g, arch, "expert_used_count", 0, &h->n_expert_used, err, errsz)) ||
        (rc = get_dim(g, arch, "feed_forward_length", 0, &ff, err, errsz)))
        return rc;
    if (h->n_embd <= 0 || h->n_layer <= 0 || h->n_layer > MAX_LAYERS || h->n_head <= 0 || h->n_head_kv <= 0 ||
        h->n_head % h->n_head_kv)
        return moe__set_err(err, errsz, MOE_EFORMAT,
                            "%s: bad dimensions (embedding %d, layers %d, heads %d, kv heads %d)", L, h->n_embd,
                            h->n_layer, h->n_head, h->n_head_kv);
    if ((rc = get_dim(g, arch, "attention.key_length", h->n_embd / h->n_head, &key_len, err, errsz)) ||
        (rc = get_dim(g, arch, "attention.value_length", h->n_embd / h->n_head, &val_len, err, errsz)) ||
        (rc = get_dim(g, arch, "rope.dimension_count", key_len, &h->n_rot, err, errsz)))
        return rc;
    h->head_dim = key_len;
    if (key_len <= 0 || val_len != key_len || h->n_rot <= 0 || h->n_rot > key_len || h->n_rot % 2)
        return moe__set_err(err, errsz, MOE_EUNSUPPORTED, "%s: head size %d/%d, rope dimensions %d", L, key_len,
                            val_len, h->n_rot);
    if (h->n_expert <= 0)
        return moe__set_err(err, errsz, MOE_EUNSUPPORTED, "%s: %s.expert_count is 0 (a dense model, not MoE)", L, arch);
    if (h->n_expert_used <= 0 || h->n_expert_used > h->n_expert)
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: %s.expert_used_count = %d with %d experts", L, arch,
                            h->n_expert_used, h->n_expert);
    h->n_ff_exp = ff, h->n_ff_shexp = 0;
    if (m->arch == MOE__ARCH_QWEN2MOE) { /* llama.cpp's fallbacks when the expert keys are absent */
        if ((rc = get_dim(g, arch, "expert_feed_forward_length", ff / h->n_expert_used, &h->n_ff_exp, err, errsz)) ||
            (rc = get_dim(g, arch, "expert_shared_feed_forward_length", ff, &h->n_ff_shexp, err, errsz)))
            return rc;
    }
    if (h->n_ff_exp <= 0 || (m->arch == MOE__ARCH_QWEN2MOE && h->n_ff_shexp <= 0))
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: expert feed-forward length %d, shared %d", L, h->n_ff_exp,
                            h->n_ff_shexp);
    if ((rc = get_float(g, arch, "attention.layer_norm_rms_epsilon", 1e-5f, &h->rms_eps, err, errsz)) ||
        (rc = get_float(g, arch, "rope.freq_base", 10000.0f, &h->rope_base, err, errsz)) ||
        (rc = get_float(g, arch, "expert_weights_scale", 0.0f, &m->w_scale, err, errsz)))
        return rc;
    if (!(h->rms_eps >= 0) || !(h->rope_base > 0))
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: rms epsilon %g, rope base %g", L, h->rms_eps, h->rope_base);
    return 0;
}

/* Both passes: sizing (b->owned NULL) and binding. */
static int bind_all(moe__imodel *m, binder *b) {
    moe_engine_hparams *h = &m->hp;
    const int C = h->n_embd, HD = h->n_head * h->head_dim, GD = h->n_head_kv * h->head_dim;
    const int E = h->n_expert, F = h->n_ff_exp, Fs = h->n_ff_shexp;
    const moe__gguf_tensor *te = moe__gguf_find_tensor(b->g, "token_embd.weight");
    if (!te) return moe__set_err(b->err, b->errsz, MOE_ENOTFOUND, "%s: tensor 'token_embd.weight' is missing", moe__gguf_label(b->g));
    if (te->ne[1] <= 0 || te->ne[1] > INT32_MAX / 2)
        return moe__set_err(b->err, b->errsz, MOE_EFORMAT, "%s: token_embd.weight has %lld rows", moe__gguf_label(b->g),
                            (long long)te->ne[1]);
    h->n_vocab = (int)te->ne[1];
    const int V = h->n_vocab;
    int rc;
    if ((rc = bind_wt(b, "token_embd.weight", V, C, 1, 1, &m->tok_embd)) ||
        (rc = bind_vec(b, "output_norm.weight", C, 1, &m->output_norm)) ||
        (rc = bind_wt(b, "output.weight", V, C, 1, m->arch == MOE__ARCH_OLMOE, &m->output)))
        return rc;
    h->tied_output = m->output.data == NULL;
    if (h->tied_output) m->output = m->tok_embd;
    for (int l = 0; l < h->n_layer; l++) {
        moe__ilayer *y = &m->layers[l];
        char n[96];
#define NM(s) (snprintf(n, sizeof n, "blk.%d." s, l), n)
        if ((rc = bind_vec(b, NM("attn_norm.weight"), C, 1, &y->attn_norm)) ||
            (rc = bind_vec(b, NM("ffn_norm.weight"), C, 1, &y->ffn_norm)) ||
            (rc = bind_wt(b, NM("attn_q.weight"), HD, C, 1, 1, &y->wq)) ||
            (rc = bind_wt(b, NM("attn_k.weight"), GD, C, 1, 1, &y->wk)) ||
            (rc = bind_wt(b, NM("attn_v.weight"), GD, C, 1, 1, &y->wv)) ||
            (rc = bind_wt(b, NM("attn_output.weight"), C, HD, 1, 1, &y->wo)) ||
            (rc = bind_vec(b, NM("attn_q.bias"), HD, 0, &y->bq)) ||
            (rc = bind_vec(b, NM("attn_k.bias"), GD, 0, &y->bk)) ||
            (rc = bind_vec(b, NM("attn_v.bias"), GD, 0, &y->bv)) ||
            (rc = bind_vec(b, NM("attn_output.bias"), C, 0, &y->bo)) ||
            (rc = bind_wt(b, NM("ffn_gate_inp.weight"), E, C, 1, 1, &y->gate_inp)) ||
            (rc = bind_wt(b, NM("ffn_gate_exps.weight"), F, C, E, 1, &y->gate_exps)) ||
            (rc = bind_wt(b, NM("ffn_up_exps.weight"), F, C, E, 1, &y->up_exps)) ||
            (rc = bind_wt(b, NM("ffn_down_exps.weight"), C, F, E, 1, &y->down_exps)))
            return rc;
        if (m->arch == MOE__ARCH_OLMOE &&
            ((rc = bind_vec(b, NM("attn_q_norm.weight"), HD, 1, &y->q_norm)) ||
             (rc = bind_vec(b, NM("attn_k_norm.weight"), GD, 1, &y->k_norm))))
            return rc;
        if (m->arch == MOE__ARCH_QWEN2MOE &&
            ((rc = bind_vec(b, NM("ffn_gate_inp_shexp.weight"), C, 1, &y->gate_inp_sh)) ||
             (rc = bind_wt(b, NM("ffn_gate_shexp.weight"), Fs, C, 1, 1, &y->gate_sh)) ||
             (rc = bind_wt(b, NM("ffn_up_shexp.weight"), Fs, C, 1, 1, &y->up_sh)) ||
             (rc = bind_wt(b, NM("ffn_down_shexp.weight"), C, Fs, 1, 1, &y->down_sh))))
            return rc;
#undef NM
        if (y->gate_exps.type != y->up_exps.type || y->gate_exps.type != y->down_exps.type)
            return moe__set_err(b->err, b->errsz, MOE_EUNSUPPORTED, "%s: layer %d mixes expert types %s/%s/%s",
                                moe__gguf_label(b->g), l, moe__gguf_type_name(y->gate_exps.type),
                                moe__gguf_type_name(y->up_exps.type), moe__gguf_type_name(y->down_exps.type));
    }
    h->expert_type = m->layers[0].gate_exps.type;
    return 0;
}

/* F32 copies of tensors whose type has no kernel yet (a Q4_K_M file's
 * experts) can be several times the file: refused with the figures when they
 * would take more than half of this machine's memory, rather than letting the
 * conversion run the machine out of memory. */
static int check_converted(const binder *b, char *err, size_t errsz) {
    const long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    const double need = (double)b->n_converted * sizeof(float), have = (double)pages * (double)psz;
    if (!b->n_converted || pages <= 0 || psz <= 0 || need <= 0.5 * have) return MOE_OK;
    return moe__set_err(err, errsz, MOE_ENOMEM,
                        "%s: its tensors of types without a kernel yet would need %.1f GiB as F32 copies, more than "
                        "half of this machine's %.1f GiB",
                        moe__gguf_label(b->g), need / 1073741824.0, have / 1073741824.0);
}

int moe__imodel_load(const char *path, int use_mmap, moe__imodel **out, char *err, size_t errsz) {
    *out = NULL;
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) return moe__imodel_load_hf(path, out, err, errsz);
    moe__imodel *m = moe__calloc(1, sizeof *m);
    if (!m) return moe__set_err(err, errsz, MOE_ENOMEM, "out of memory");
    int rc;
    if (use_mmap) {
        rc = moe__gguf_open(path, &m->g, err, errsz);
        m->file_mapped = 1;
    } else {
        size_t len;
        char *buf;
        rc = moe__read_file(path, SIZE_MAX - 1, &buf, &len, err, errsz);
        if (!rc) {
            m->file_buf = buf;
            rc = moe__gguf_open_mem(buf, len, &m->g, err, errsz);
        }
    }
    if (!rc) rc = read_hparams(m, err, errsz);
    if (!rc && !(m->layers = moe__calloc((size_t)m->hp.n_layer, sizeof *m->layers)))
        rc = moe__set_err(err, errsz, MOE_ENOMEM, "out of memory");
    binder b = {.g = m->g, .err = err, .errsz = errsz};
    if (!rc) rc = bind_all(m, &b); /* sizing pass: checks everything, counts the floats */
    if (!rc) rc = check_converted(&b, err, errsz);
    if (!rc && !(m->owned = moe__malloc((b.n_owned ? b.n_owned : 1) * sizeof(float))))
        rc = moe__set_err(err, errsz, MOE_ENOMEM, "out of memory");
    if (!rc) {
        b.owned = m->owned, b.n_owned = 0;
        rc = bind_all(m, &b);
    }
    if (rc) {
        moe__imodel_free(m);
        return rc;
    }
    *out = m;
    return 0;
}

void moe__imodel_free(moe__imodel *m) {
    if (!m) return;
    moe__gguf_close(m->g);
    moe__hf_files_free(m->hf);
    moe__free(m->file_buf);
    moe__free(m->layers);
    moe__free(m->owned);
    moe__free(m);
}
