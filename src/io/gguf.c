/* GGUF reader (mmap, hostile-input safe) and atomic writer. */
#include "io/gguf.h"
#include "io/atomic.h"
#include "strbuf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "gguf.c assumes a little-endian host"
#endif

static const struct { const char *name; size_t size; } k_vtypes[MOE__GGUF_VTYPE_COUNT] = {
    [MOE__GGUF_U8] = {"u8", 1},          [MOE__GGUF_I8] = {"i8", 1},
    [MOE__GGUF_U16] = {"u16", 2},        [MOE__GGUF_I16] = {"i16", 2},
    [MOE__GGUF_U32] = {"u32", 4},        [MOE__GGUF_I32] = {"i32", 4},
    [MOE__GGUF_F32] = {"f32", 4},        [MOE__GGUF_BOOL] = {"bool", 1},
    [MOE__GGUF_STRING] = {"string", 0},  [MOE__GGUF_ARRAY] = {"array", 0},
    [MOE__GGUF_U64] = {"u64", 8},        [MOE__GGUF_I64] = {"i64", 8},
    [MOE__GGUF_F64] = {"f64", 8},
};

const char *moe__gguf_vtype_name(int t) {
    return t >= 0 && t < MOE__GGUF_VTYPE_COUNT ? k_vtypes[t].name : "?";
}

size_t moe__gguf_vtype_size(int t) {
    return t >= 0 && t < MOE__GGUF_VTYPE_COUNT ? k_vtypes[t].size : 0;
}

static int vtype_is_int(int t) {
    return t == MOE__GGUF_U8 || t == MOE__GGUF_I8 || t == MOE__GGUF_U16 || t == MOE__GGUF_I16 ||
           t == MOE__GGUF_U32 || t == MOE__GGUF_I32 || t == MOE__GGUF_U64 || t == MOE__GGUF_I64;
}

static int vtype_is_signed(int t) {
    return t == MOE__GGUF_I8 || t == MOE__GGUF_I16 || t == MOE__GGUF_I32 || t == MOE__GGUF_I64;
}

static uint64_t load_le(const unsigned char *p, size_t n) {
    uint64_t v = 0;
    for (size_t i = n; i-- > 0;) v = v << 8 | p[i];
    return v;
}

/* A fixed-size element at p (little-endian, any alignment) as a widened value. */
static void decode_scalar(int t, const unsigned char *p, moe__gguf_value *v) {
    memset(v, 0, sizeof *v);
    v->type = (moe__gguf_vtype)t;
    uint64_t raw = load_le(p, k_vtypes[t].size);
    switch (t) {
    case MOE__GGUF_I8: v->i = (int8_t)raw; break;
    case MOE__GGUF_I16: v->i = (int16_t)raw; break;
    case MOE__GGUF_I32: v->i = (int32_t)raw; break;
    case MOE__GGUF_I64: v->i = (int64_t)raw; break;
    case MOE__GGUF_F32: {
        uint32_t b = (uint32_t)raw;
        float f;
        memcpy(&f, &b, 4);
        v->f = f;
        break;
    }
    case MOE__GGUF_F64: memcpy(&v->f, &raw, 8); break;
    default: v->u = raw; break; /* unsigned and bool */
    }
}

int moe__gguf_arr_get(const moe__gguf_value *v, size_t i, moe__gguf_value *out) {
    if (!v || !out || v->type != MOE__GGUF_ARRAY || i >= v->arr.n) return MOE_EINVAL;
    int t = v->arr.type;
    if (t == MOE__GGUF_STRING) {
        memset(out, 0, sizeof *out);
        out->type = MOE__GGUF_STRING;
        out->str = ((const moe__gguf_str *)v->arr.data)[i];
    } else if (t == MOE__GGUF_ARRAY) {
        *out = ((const moe__gguf_value *)v->arr.data)[i];
    } else if (moe__gguf_vtype_size(t)) {
        decode_scalar(t, (const unsigned char *)v->arr.data + i * k_vtypes[t].size, out);
    } else {
        return MOE_EINVAL;
    }
    return 0;
}

/* ---- reader state ---------------------------------------------------------- */

typedef struct arena_chunk {
    struct arena_chunk *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
} arena_chunk;

typedef struct gguf_kv {
    moe__gguf_str key;
    moe__gguf_value v;
} gguf_kv;

struct moe__gguf {
    const unsigned char *base;
    size_t size;
    int mapped;
    char *label;
    uint32_t version, alignment;
    size_t data_offset;
    gguf_kv *kvs;
    size_t n_kv;
    uint32_t *kv_by_key;     /* indices sorted by key */
    moe__gguf_tensor *tensors;
    size_t n_tensors;
    uint32_t *t_by_name;     /* indices sorted by name */
    arena_chunk *arena;
    size_t meta_bytes;       /* arena bytes handed out, against MOE__GGUF_MAX_META_BYTES */
};

typedef struct pctx {
    moe__gguf *g;
    const char *label;
    char *err;
    size_t errsz;
    size_t pos;
    char where[192]; /* the item being parsed, e.g. kv[3] "general.name" */
} pctx;

__attribute__((format(printf, 3, 4)))
static int fail(pctx *c, int code, const char *fmt, ...) {
    if (!c->err || c->errsz == 0) return code;
    int k = c->where[0] ? snprintf(c->err, c->errsz, "%s: %s: ", c->label, c->where)
                        : snprintf(c->err, c->errsz, "%s: ", c->label);
    if (k >= 0 && (size_t)k < c->errsz) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err + k, c->errsz - (size_t)k, fmt, ap);
        va_end(ap);
    }
    return code;
}

static size_t left(const pctx *c) { return c->g->size - c->pos; }

static int need(pctx *c, size_t n, const char *field) {
    if (left(c) >= n) return 0;
    return fail(c, MOE_EFORMAT, "truncated: %s needs %zu bytes at offset %zu but the file ends at %zu",
                field, n, c->pos, c->g->size);
}

static int rd_u32(pctx *c, uint32_t *v, const char *field) {
    int rc = need(c, 4, field);
    if (rc) return rc;
    *v = (uint32_t)load_le(c->g->base + c->pos, 4);
    c->pos += 4;
    return 0;
}

static int rd_u64(pctx *c, uint64_t *v, const char *field) {
    int rc = need(c, 8, field);
    if (rc) return rc;
    *v = load_le(c->g->base + c->pos, 8);
    c->pos += 8;
    return 0;
}

static int arena_alloc(pctx *c, size_t n, void **out) {
    moe__gguf *g = c->g;
    n = (n + 15) & ~(size_t)15; /* n is bounded by the file size, far from SIZE_MAX */
    if (n > MOE__GGUF_MAX_META_BYTES - g->meta_bytes)
        return fail(c, MOE_ELIMIT, "parsed metadata exceeds the limit of %zu bytes",
                    MOE__GGUF_MAX_META_BYTES);
    arena_chunk *a = g->arena;
    if (!a || a->cap - a->used < n) {
        /* Chunks grow from 16 KiB to 1 MiB, so small files stay cheap to open. */
        size_t cap = a ? 2 * a->cap : (size_t)16 << 10;
        if (cap > ((size_t)1 << 20)) cap = (size_t)1 << 20;
        if (cap < n) cap = n;
        a = moe__malloc(sizeof *a + cap);
        if (!a) return fail(c, MOE_ENOMEM, "out of memory (%zu bytes of metadata)", cap);
        a->next = g->arena;
        a->used = 0;
        a->cap = cap;
        g->arena = a;
    }
    *out = a->data + a->used;
    a->used += n;
    g->meta_bytes += n;
    return 0;
}

/* A string into the arena. name_cap > 0: a key or tensor name, limited to
 * name_cap bytes and free of NUL bytes. */
static int rd_str(pctx *c, moe__gguf_str *s, const char *field, size_t name_cap) {
    uint64_t len;
    size_t at = c->pos;
    int rc = rd_u64(c, &len, field);
    if (rc) return rc;
    if (name_cap && len > name_cap)
        return fail(c, MOE_ELIMIT, "%s length %" PRIu64 " (at offset %zu) exceeds the limit of %zu bytes",
                    field, len, at, name_cap);
    if (len > MOE__GGUF_MAX_STRING)
        return fail(c, MOE_ELIMIT, "%s length %" PRIu64 " (at offset %zu) exceeds the limit of %" PRIu64
                    " bytes", field, len, at, MOE__GGUF_MAX_STRING);
    if (len > left(c))
        return fail(c, MOE_EFORMAT, "%s length %" PRIu64 " (at offset %zu) exceeds the %zu bytes left in the file",
                    field, len, at, left(c));
    const unsigned char *p = c->g->base + c->pos;
    if (name_cap && memchr(p, 0, (size_t)len))
        return fail(c, MOE_EFORMAT, "%s contains a NUL byte", field);
    void *mem;
    if ((rc = arena_alloc(c, (size_t)len + 1, &mem))) return rc;
    memcpy(mem, p, (size_t)len);
    ((char *)mem)[len] = '\0';
    s->s = mem;
    s->len = (size_t)len;
    c->pos += (size_t)len;
    return 0;
}

/* Fewest bytes one element of type t occupies in a file. */
static size_t min_elem_size(int t) {
    if (t == MOE__GGUF_STRING) return 8;
    if (t == MOE__GGUF_ARRAY) return 12;
    return k_vtypes[t].size;
}

static int parse_value(pctx *c, int type, moe__gguf_value *v, int depth);

static int parse_array(pctx *c, moe__gguf_value *v, int depth) {
    if (depth >= MOE__GGUF_MAX_DEPTH)
        return fail(c, MOE_ELIMIT, "arrays nested deeper than the limit of %d", MOE__GGUF_MAX_DEPTH);
    uint32_t et;
    uint64_t n;
    size_t at = c->pos;
    int rc = rd_u32(c, &et, "array element type");
    if (rc) return rc;
    if (et >= MOE__GGUF_VTYPE_COUNT)
        return fail(c, MOE_EFORMAT, "unknown array element type %" PRIu32 " at offset %zu", et, at);
    if ((rc = rd_u64(c, &n, "array length"))) return rc;
    size_t esz = min_elem_size((int)et);
    if (n > left(c) / esz)
        return fail(c, MOE_EFORMAT,
                    "array of %" PRIu64 " %s elements (at offset %zu) needs at least %zu bytes each, but only %zu"
                    " bytes are left in the file", n, k_vtypes[et].name, at, esz, left(c));
    v->arr.type = (moe__gguf_vtype)et;
    v->arr.n = (size_t)n;
    v->arr.data = NULL;
    if (et == MOE__GGUF_STRING) {
        moe__gguf_str *items;
        if ((rc = arena_alloc(c, (size_t)n * sizeof *items, (void **)&items))) return rc;
        v->arr.data = items;
        char field[64];
        for (size_t i = 0; i < (size_t)n; i++) {
            snprintf(field, sizeof field, "string element %zu", i);
            if ((rc = rd_str(c, &items[i], field, 0))) return rc;
        }
    } else if (et == MOE__GGUF_ARRAY) {
        moe__gguf_value *items;
        if ((rc = arena_alloc(c, (size_t)n * sizeof *items, (void **)&items))) return rc;
        memset(items, 0, (size_t)n * sizeof *items);
        v->arr.data = items;
        for (size_t i = 0; i < (size_t)n; i++)
            if ((rc = parse_value(c, MOE__GGUF_ARRAY, &items[i], depth + 1))) return rc;
    } else {
        const unsigned char *p = c->g->base + c->pos;
        if (et == MOE__GGUF_BOOL)
            for (size_t i = 0; i < (size_t)n; i++)
                if (p[i] > 1)
                    return fail(c, MOE_EFORMAT, "bool element %zu is %u, not 0 or 1", i, p[i]);
        v->arr.data = p;
        c->pos += (size_t)n * esz;
    }
    return 0;
}

static int parse_value(pctx *c, int type, moe__gguf_value *v, int depth) {
    v->type = (moe__gguf_vtype)type;
    if (type == MOE__GGUF_STRING) return rd_str(c, &v->str, "string", 0);
    if (type == MOE__GGUF_ARRAY) return parse_array(c, v, depth);
    size_t sz = k_vtypes[type].size;
    int rc = need(c, sz, "value");
    if (rc) return rc;
    const unsigned char *p = c->g->base + c->pos;
    if (type == MOE__GGUF_BOOL && p[0] > 1)
        return fail(c, MOE_EFORMAT, "bool value %u (at offset %zu) is not 0 or 1", p[0], c->pos);
    decode_scalar(type, p, v);
    c->pos += sz;
    return 0;
}

/* ---- sorting and lookup ------------------------------------------------------ */

/* qsort has no context argument; the tables being sorted are reached through
 * this per-thread pointer. */
static _Thread_local const moe__gguf *t_sort_g;

static int cmp_kv(const void *a, const void *b) {
    const gguf_kv *k = t_sort_g->kvs;
    return strcmp(k[*(const uint32_t *)a].key.s, k[*(const uint32_t *)b].key.s);
}

static int cmp_tname(const void *a, const void *b) {
    const moe__gguf_tensor *t = t_sort_g->tensors;
    return strcmp(t[*(const uint32_t *)a].name, t[*(const uint32_t *)b].name);
}

static int cmp_toff(const void *a, const void *b) {
    const moe__gguf_tensor *t = t_sort_g->tensors;
    const moe__gguf_tensor *x = &t[*(const uint32_t *)a], *y = &t[*(const uint32_t *)b];
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

static uint32_t *sorted_index(size_t n, int (*cmp)(const void *, const void *), const moe__gguf *g) {
    uint32_t *idx = moe__calloc(n + 1, sizeof *idx);
    if (!idx) return NULL;
    for (size_t i = 0; i < n; i++) idx[i] = (uint32_t)i;
    t_sort_g = g;
    qsort(idx, n, sizeof *idx, cmp);
    t_sort_g = NULL;
    return idx;
}

/* ---- parsing ----------------------------------------------------------------- */

static int parse_header(pctx *c, uint64_t *n_tensors, uint64_t *n_kv) {
    moe__gguf *g = c->g;
    if (g->size < 4)
        return fail(c, MOE_EFORMAT, "file is %zu bytes, too short for the GGUF magic", g->size);
    uint32_t magic = (uint32_t)load_le(g->base, 4);
    if (magic != MOE__GGUF_MAGIC) {
        char shown[5];
        for (int i = 0; i < 4; i++) shown[i] = g->base[i] >= 0x20 && g->base[i] < 0x7f ? (char)g->base[i] : '.';
        shown[4] = '\0';
        return fail(c, MOE_EFORMAT, "bad magic 0x%08" PRIx32 " (\"%s\"), expected \"GGUF\"", magic, shown);
    }
    c->pos = 4;
    uint32_t ver;
    int rc = rd_u32(c, &ver, "version");
    if (rc) return rc;
    if (ver == 0x02000000u || ver == 0x03000000u)
        return fail(c, MOE_EUNSUPPORTED, "big-endian GGUF (version field 0x%08" PRIx32 ") is not supported", ver);
    if (ver == 1)
        return fail(c, MOE_EUNSUPPORTED, "GGUF version 1 (32-bit counts) is not supported; versions 2 and 3 are");
    if (ver == 0)
        return fail(c, MOE_EFORMAT, "version 0 is invalid");
    if (ver > 3)
        return fail(c, MOE_EUNSUPPORTED, "GGUF version %" PRIu32 " is newer than the supported 2 and 3", ver);
    g->version = ver;
    if ((rc = rd_u64(c, n_tensors, "tensor_count")) || (rc = rd_u64(c, n_kv, "metadata_kv_count")))
        return rc;
    if (*n_tensors > MOE__GGUF_MAX_TENSORS)
        return fail(c, MOE_ELIMIT, "tensor_count %" PRIu64 " exceeds the limit of %u", *n_tensors,
                    MOE__GGUF_MAX_TENSORS);
    if (*n_kv > MOE__GGUF_MAX_KV)
        return fail(c, MOE_ELIMIT, "metadata_kv_count %" PRIu64 " exceeds the limit of %u", *n_kv,
                    MOE__GGUF_MAX_KV);
    /* The smallest entries (empty key + u8 value: 13 bytes; empty name, 0 dims:
     * 24 bytes) bound what the rest of the file can hold. */
    if (*n_kv * 13 + *n_tensors * 24 > left(c))
        return fail(c, MOE_EFORMAT,
                    "metadata_kv_count %" PRIu64 " and tensor_count %" PRIu64
                    " need at least %" PRIu64 " bytes, but only %zu are left in the file",
                    *n_kv, *n_tensors, *n_kv * 13 + *n_tensors * 24, left(c));
    return 0;
}

static int parse_kvs(pctx *c, size_t n) {
    moe__gguf *g = c->g;
    g->kvs = moe__calloc(n + 1, sizeof *g->kvs);
    if (!g->kvs) return fail(c, MOE_ENOMEM, "out of memory (%zu metadata entries)", n);
    for (size_t i = 0; i < n; i++) {
        gguf_kv *kv = &g->kvs[i];
        snprintf(c->where, sizeof c->where, "kv[%zu]", i);
        int rc = rd_str(c, &kv->key, "key", MOE__GGUF_MAX_KEY);
        if (rc) return rc;
        snprintf(c->where, sizeof c->where, "kv[%zu] \"%.100s\"", i, kv->key.s);
        uint32_t type;
        size_t at = c->pos;
        if ((rc = rd_u32(c, &type, "value type"))) return rc;
        if (type >= MOE__GGUF_VTYPE_COUNT)
            return fail(c, MOE_EFORMAT, "unknown value type %" PRIu32 " at offset %zu", type, at);
        if ((rc = parse_value(c, (int)type, &kv->v, 0))) return rc;
        g->n_kv = i + 1;
    }
    c->where[0] = '\0';
    g->kv_by_key = sorted_index(n, cmp_kv, g);
    if (!g->kv_by_key) return fail(c, MOE_ENOMEM, "out of memory");
    for (size_t i = 1; i < n; i++)
        if (!strcmp(g->kvs[g->kv_by_key[i - 1]].key.s, g->kvs[g->kv_by_key[i]].key.s))
            return fail(c, MOE_EFORMAT, "duplicate metadata key \"%.100s\"", g->kvs[g->kv_by_key[i]].key.s);

    g->alignment = MOE__GGUF_DEFAULT_ALIGNMENT;
    const moe__gguf_value *al = moe__gguf_find(g, "general.alignment");
    if (al) {
        snprintf(c->where, sizeof c->where, "kv \"general.alignment\"");
        if (al->type != MOE__GGUF_U32)
            return fail(c, MOE_EFORMAT, "is %s, must be u32", k_vtypes[al->type].name);
        if (al->u == 0 || (al->u & (al->u - 1)))
            return fail(c, MOE_EFORMAT, "%" PRIu64 " is not a power of two", al->u);
        if (al->u > MOE__GGUF_MAX_ALIGNMENT)
            return fail(c, MOE_ELIMIT, "%" PRIu64 " exceeds the limit of %u", al->u, MOE__GGUF_MAX_ALIGNMENT);
        g->alignment = (uint32_t)al->u;
        c->where[0] = '\0';
    }
    return 0;
}

static int parse_tensor_info(pctx *c, size_t i, moe__gguf_tensor *t) {
    moe__gguf_str name;
    snprintf(c->where, sizeof c->where, "tensor_info[%zu]", i);
    int rc = rd_str(c, &name, "name", MOE__GGUF_MAX_NAME);
    if (rc) return rc;
    t->name = name.s;
    snprintf(c->where, sizeof c->where, "tensor \"%s\"", name.s);
    uint32_t nd;
    if ((rc = rd_u32(c, &nd, "n_dims"))) return rc;
    if (nd > MOE__GGUF_MAX_DIMS)
        return fail(c, MOE_ELIMIT, "n_dims %" PRIu32 " exceeds the limit of %d", nd, MOE__GGUF_MAX_DIMS);
    t->n_dims = (int)nd;
    for (int d = 0; d < MOE__GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    uint64_t nelem = 1;
    int zero = 0, overflow = 0;
    for (int d = 0; d < (int)nd; d++) {
        uint64_t ne;
        if ((rc = rd_u64(c, &ne, "ne"))) return rc;
        if (ne > (uint64_t)INT64_MAX)
            return fail(c, MOE_ELIMIT, "ne[%d] = %" PRIu64 " exceeds 2^63 - 1", d, ne);
        t->ne[d] = (int64_t)ne;
        if (ne == 0) zero = 1;
        else if (nelem > (uint64_t)INT64_MAX / ne) overflow = 1;
        else nelem *= ne;
    }
    if (zero) nelem = 0;
    else if (overflow)
        return fail(c, MOE_ELIMIT, "element count %" PRId64 " x %" PRId64 " x %" PRId64 " x %" PRId64
                    " overflows 2^63", t->ne[0], t->ne[1], t->ne[2], t->ne[3]);
    uint32_t type;
    size_t at = c->pos;
    if ((rc = rd_u32(c, &type, "type"))) return rc;
    t->type = type;
    const moe__gguf_type_info *ti = moe__gguf_type_info_of(type);
    if (!ti) return fail(c, MOE_EUNSUPPORTED, "unknown ggml type %" PRIu32 " at offset %zu", type, at);
    if (t->ne[0] % ti->blck)
        return fail(c, MOE_EFORMAT, "ne[0] = %" PRId64 " is not a multiple of the %s block size %" PRIu32,
                    t->ne[0], ti->name, ti->blck);
    /* nelem < 2^63 fits size_t on the 64-bit hosts this builds for (checked below otherwise). */
    if (nelem > SIZE_MAX || moe__mul_size((size_t)nelem / ti->blck, ti->size, &t->nbytes))
        return fail(c, MOE_ELIMIT, "%" PRIu64 " elements of %s overflow the byte count", nelem, ti->name);
    t->nelem = (size_t)nelem;
    if ((rc = rd_u64(c, &t->offset, "offset"))) return rc;
    if (t->offset % c->g->alignment)
        return fail(c, MOE_EFORMAT, "offset %" PRIu64 " is not a multiple of the alignment %" PRIu32,
                    t->offset, c->g->alignment);
    return 0;
}

static int parse_tensors(pctx *c, size_t n) {
    moe__gguf *g = c->g;
    g->tensors = moe__calloc(n + 1, sizeof *g->tensors);
    if (!g->tensors) return fail(c, MOE_ENOMEM, "out of memory (%zu tensors)", n);
    for (size_t i = 0; i < n; i++) {
        int rc = parse_tensor_info(c, i, &g->tensors[i]);
        if (rc) return rc;
        g->n_tensors = i + 1;
    }
    c->where[0] = '\0';
    /* Data section: the end of the tensor infos rounded up to the alignment. A
     * file without tensors may end before that padding. */
    size_t pad = (g->alignment - c->pos % g->alignment) % g->alignment;
    if (n == 0) {
        g->data_offset = pad <= left(c) ? c->pos + pad : g->size;
        return 0;
    }
    if (pad > left(c))
        return fail(c, MOE_EFORMAT, "data section would start at offset %zu, past the end of the file (%zu bytes)",
                    c->pos + pad, g->size);
    g->data_offset = c->pos + pad;
    size_t data_size = g->size - g->data_offset;
    for (size_t i = 0; i < n; i++) {
        moe__gguf_tensor *t = &g->tensors[i];
        if (t->offset > data_size || t->nbytes > data_size - t->offset) {
            snprintf(c->where, sizeof c->where, "tensor \"%s\"", t->name);
            return fail(c, MOE_EFORMAT,
                        "data of %zu bytes at offset %" PRIu64 " lies outside the data section of %zu bytes"
                        " (which starts at file offset %zu)", t->nbytes, t->offset, data_size, g->data_offset);
        }
        t->data = g->base + g->data_offset + t->offset;
    }
    g->t_by_name = sorted_index(n, cmp_tname, g);
    if (!g->t_by_name) return fail(c, MOE_ENOMEM, "out of memory");
    for (size_t i = 1; i < n; i++)
        if (!strcmp(g->tensors[g->t_by_name[i - 1]].name, g->tensors[g->t_by_name[i]].name))
            return fail(c, MOE_EFORMAT, "duplicate tensor name \"%s\"", g->tensors[g->t_by_name[i]].name);
    /* No two tensors may share bytes (empty tensors occupy none). */
    uint32_t *by_off = sorted_index(n, cmp_toff, g);
    if (!by_off) return fail(c, MOE_ENOMEM, "out of memory");
    const moe__gguf_tensor *last = NULL; /* the non-empty range reaching furthest so far */
    int rc = 0;
    for (size_t i = 0; i < n && !rc; i++) {
        const moe__gguf_tensor *t = &g->tensors[by_off[i]];
        if (!t->nbytes) continue;
        if (last && t->offset < last->offset + last->nbytes) {
            snprintf(c->where, sizeof c->where, "tensor \"%s\"", t->name);
            rc = fail(c, MOE_EFORMAT, "data [%" PRIu64 ", %" PRIu64 ") overlaps tensor \"%s\" [%" PRIu64 ", %" PRIu64 ")",
                      t->offset, t->offset + t->nbytes, last->name, last->offset, last->offset + last->nbytes);
        }
        if (!last || t->offset + t->nbytes > last->offset + last->nbytes) last = t;
    }
    moe__free(by_off);
    return rc;
}

static int gguf_parse(moe__gguf *g, char *err, size_t errsz) {
    pctx c = {.g = g, .label = g->label, .err = err, .errsz = errsz};
    uint64_t nt = 0, nkv = 0;
    int rc = parse_header(&c, &nt, &nkv);
    if (!rc) rc = parse_kvs(&c, (size_t)nkv);
    if (!rc) rc = parse_tensors(&c, (size_t)nt);
    return rc;
}

void moe__gguf_close(moe__gguf *g) {
    if (!g) return;
    for (arena_chunk *a = g->arena, *next; a; a = next) {
        next = a->next;
        moe__free(a);
    }
    moe__free(g->kvs);
    moe__free(g->kv_by_key);
    moe__free(g->tensors);
    moe__free(g->t_by_name);
    if (g->mapped) moe__unmap_file(g->base, g->size);
    moe__free(g->label);
    moe__free(g);
}

static int finish_open(moe__gguf *g, moe__gguf **out, char *err, size_t errsz) {
    int rc = gguf_parse(g, err, errsz);
    if (rc) {
        moe__gguf_close(g);
        return rc;
    }
    *out = g;
    return 0;
}

int moe__gguf_open_mem(const void *buf, size_t len, moe__gguf **out, char *err, size_t errsz) {
    if (!out) return moe__set_err(err, errsz, MOE_EINVAL, "<memory>: out is NULL");
    *out = NULL;
    if (!buf && len) return moe__set_err(err, errsz, MOE_EINVAL, "<memory>: buffer is NULL");
    moe__gguf *g = moe__calloc(1, sizeof *g);
    if (g) g->label = moe__strdup("<memory>");
    if (!g || !g->label) {
        moe__free(g);
        return moe__set_err(err, errsz, MOE_ENOMEM, "<memory>: out of memory");
    }
    g->base = buf;
    g->size = len;
    return finish_open(g, out, err, errsz);
}

int moe__gguf_open(const char *path, moe__gguf **out, char *err, size_t errsz) {
    if (!out || !path) return moe__set_err(err, errsz, MOE_EINVAL, "moe__gguf_open: NULL argument");
    *out = NULL;
    const void *base;
    size_t size;
    int rc = moe__map_file(path, &base, &size, err, errsz);
    if (rc) return rc;
    moe__gguf *g = moe__calloc(1, sizeof *g);
    if (g) g->label = moe__strdup(path);
    if (!g || !g->label) {
        moe__unmap_file(base, size);
        moe__free(g);
        return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path);
    }
    g->base = base;
    g->size = size;
    g->mapped = base != NULL;
    return finish_open(g, out, err, errsz);
}

/* ---- accessors --------------------------------------------------------------- */

uint32_t moe__gguf_version(const moe__gguf *g) { return g ? g->version : 0; }
uint32_t moe__gguf_alignment(const moe__gguf *g) { return g ? g->alignment : 0; }
uint64_t moe__gguf_data_offset(const moe__gguf *g) { return g ? g->data_offset : 0; }
const char *moe__gguf_label(const moe__gguf *g) { return g ? g->label : ""; }
size_t moe__gguf_n_kv(const moe__gguf *g) { return g ? g->n_kv : 0; }
size_t moe__gguf_n_tensors(const moe__gguf *g) { return g ? g->n_tensors : 0; }

int moe__gguf_kv_at(const moe__gguf *g, size_t i, const char **key, const moe__gguf_value **v) {
    if (!g || i >= g->n_kv) return MOE_EINVAL;
    if (key) *key = g->kvs[i].key.s;
    if (v) *v = &g->kvs[i].v;
    return 0;
}

const moe__gguf_value *moe__gguf_find(const moe__gguf *g, const char *key) {
    if (!g || !key || !g->kv_by_key) return NULL;
    size_t lo = 0, hi = g->n_kv;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const gguf_kv *kv = &g->kvs[g->kv_by_key[mid]];
        int c = strcmp(kv->key.s, key);
        if (c == 0) return &kv->v;
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

const moe__gguf_tensor *moe__gguf_tensor_at(const moe__gguf *g, size_t i) {
    return g && i < g->n_tensors ? &g->tensors[i] : NULL;
}

const moe__gguf_tensor *moe__gguf_find_tensor(const moe__gguf *g, const char *name) {
    if (!g || !name || !g->t_by_name) return NULL;
    size_t lo = 0, hi = g->n_tensors;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const moe__gguf_tensor *t = &g->tensors[g->t_by_name[mid]];
        int c = strcmp(t->name, name);
        if (c == 0) return t;
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

/* Looks key up; on failure writes "label: key "k": ..." and returns the code. */
static int lookup(const moe__gguf *g, const char *key, const moe__gguf_value **v, char *err, size_t errsz) {
    if (!g || !key) return moe__set_err(err, errsz, MOE_EINVAL, "gguf: NULL argument");
    *v = moe__gguf_find(g, key);
    if (!*v) return moe__set_err(err, errsz, MOE_ENOTFOUND, "%s: key \"%.200s\": not found", g->label, key);
    return 0;
}

static int wrong_type(const moe__gguf *g, const char *key, const moe__gguf_value *v, const char *want,
                      char *err, size_t errsz) {
    if (v->type == MOE__GGUF_ARRAY)
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: key \"%.200s\": is an array of %s, expected %s",
                            g->label, key, moe__gguf_vtype_name(v->arr.type), want);
    return moe__set_err(err, errsz, MOE_EFORMAT, "%s: key \"%.200s\": is %s, expected %s", g->label, key,
                        moe__gguf_vtype_name(v->type), want);
}

/* An integer value within [lo, hi] (signed view) or [0, uhi] (unsigned view). */
static int int_in_range(const moe__gguf_value *v, int64_t lo, int64_t hi, uint64_t uhi, int want_signed,
                        int64_t *si, uint64_t *ui) {
    if (vtype_is_signed(v->type)) {
        if (want_signed) {
            if (v->i < lo || v->i > hi) return 0;
            *si = v->i;
        } else {
            if (v->i < 0 || (uint64_t)v->i > uhi) return 0;
            *ui = (uint64_t)v->i;
        }
    } else {
        if (want_signed) {
            if (v->u > (uint64_t)hi) return 0;
            *si = (int64_t)v->u;
        } else {
            if (v->u > uhi) return 0;
            *ui = v->u;
        }
    }
    return 1;
}

static int get_int(const moe__gguf *g, const char *key, int want_signed, int64_t lo, int64_t hi,
                   uint64_t uhi, const char *tname, int64_t *si, uint64_t *ui, char *err, size_t errsz) {
    const moe__gguf_value *v = NULL;
    int rc = lookup(g, key, &v, err, errsz);
    if (rc) return rc;
    if (!vtype_is_int(v->type)) return wrong_type(g, key, v, "an integer", err, errsz);
    if (!int_in_range(v, lo, hi, uhi, want_signed, si, ui)) {
        if (vtype_is_signed(v->type))
            return moe__set_err(err, errsz, MOE_EFORMAT, "%s: key \"%.200s\": %s value %" PRId64
                                " does not fit %s", g->label, key, moe__gguf_vtype_name(v->type), v->i, tname);
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: key \"%.200s\": %s value %" PRIu64 " does not fit %s",
                            g->label, key, moe__gguf_vtype_name(v->type), v->u, tname);
    }
    return 0;
}

int moe__gguf_get_u32(const moe__gguf *g, const char *key, uint32_t *out, char *err, size_t errsz) {
    uint64_t u = 0;
    int rc = get_int(g, key, 0, 0, 0, UINT32_MAX, "u32", NULL, &u, err, errsz);
    if (!rc && out) *out = (uint32_t)u;
    return rc;
}

int moe__gguf_get_i32(const moe__gguf *g, const char *key, int32_t *out, char *err, size_t errsz) {
    int64_t i = 0;
    int rc = get_int(g, key, 1, INT32_MIN, INT32_MAX, 0, "i32", &i, NULL, err, errsz);
    if (!rc && out) *out = (int32_t)i;
    return rc;
}

int moe__gguf_get_u64(const moe__gguf *g, const char *key, uint64_t *out, char *err, size_t errsz) {
    uint64_t u = 0;
    int rc = get_int(g, key, 0, 0, 0, UINT64_MAX, "u64", NULL, &u, err, errsz);
    if (!rc && out) *out = u;
    return rc;
}

int moe__gguf_get_i64(const moe__gguf *g, const char *key, int64_t *out, char *err, size_t errsz) {
    int64_t i = 0;
    int rc = get_int(g, key, 1, INT64_MIN, INT64_MAX, 0, "i64", &i, NULL, err, errsz);
    if (!rc && out) *out = i;
    return rc;
}

int moe__gguf_get_f64(const moe__gguf *g, const char *key, double *out, char *err, size_t errsz) {
    const moe__gguf_value *v = NULL;
    int rc = lookup(g, key, &v, err, errsz);
    if (rc) return rc;
    if (v->type != MOE__GGUF_F32 && v->type != MOE__GGUF_F64)
        return wrong_type(g, key, v, "f32 or f64", err, errsz);
    if (out) *out = v->f;
    return 0;
}

int moe__gguf_get_f32(const moe__gguf *g, const char *key, float *out, char *err, size_t errsz) {
    double d = 0;
    int rc = moe__gguf_get_f64(g, key, &d, err, errsz);
    if (rc) return rc;
    if (isfinite(d) && fabs(d) > 3.4028234663852886e38)
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: key \"%.200s\": f64 value %g does not fit f32",
                            g->label, key, d);
    if (out) *out = (float)d;
    return 0;
}

int moe__gguf_get_bool(const moe__gguf *g, const char *key, int *out, char *err, size_t errsz) {
    const moe__gguf_value *v = NULL;
    int rc = lookup(g, key, &v, err, errsz);
    if (rc) return rc;
    if (v->type != MOE__GGUF_BOOL) return wrong_type(g, key, v, "bool", err, errsz);
    if (out) *out = (int)v->u;
    return 0;
}

int moe__gguf_get_str(const moe__gguf *g, const char *key, const char **s, size_t *len, char *err,
                      size_t errsz) {
    const moe__gguf_value *v = NULL;
    int rc = lookup(g, key, &v, err, errsz);
    if (rc) return rc;
    if (v->type != MOE__GGUF_STRING) return wrong_type(g, key, v, "string", err, errsz);
    if (s) *s = v->str.s;
    if (len) *len = v->str.len;
    return 0;
}

int moe__gguf_get_arr_info(const moe__gguf *g, const char *key, moe__gguf_vtype *elem, size_t *n,
                           char *err, size_t errsz) {
    const moe__gguf_value *v = NULL;
    int rc = lookup(g, key, &v, err, errsz);
    if (rc) return rc;
    if (v->type != MOE__GGUF_ARRAY) return wrong_type(g, key, v, "an array", err, errsz);
    if (elem) *elem = v->arr.type;
    if (n) *n = v->arr.n;
    return 0;
}

int moe__gguf_get_arr_str(const moe__gguf *g, const char *key, const moe__gguf_str **items, size_t *n,
                          char *err, size_t errsz) {
    const moe__gguf_value *v = NULL;
    int rc = lookup(g, key, &v, err, errsz);
    if (rc) return rc;
    if (v->type != MOE__GGUF_ARRAY || v->arr.type != MOE__GGUF_STRING)
        return wrong_type(g, key, v, "an array of string", err, errsz);
    if (items) *items = v->arr.data;
    if (n) *n = v->arr.n;
    return 0;
}

/* Shared part of the numeric array getters: the array, checked for length. */
static int get_arr_n(const moe__gguf *g, const char *key, size_t n, int want_float, const moe__gguf_value **out,
                     char *err, size_t errsz) {
    const moe__gguf_value *v = NULL;
    int rc = lookup(g, key, &v, err, errsz);
    if (rc) return rc;
    int ok = v->type == MOE__GGUF_ARRAY &&
             (want_float ? v->arr.type == MOE__GGUF_F32 || v->arr.type == MOE__GGUF_F64 : vtype_is_int(v->arr.type));
    if (!ok) return wrong_type(g, key, v, want_float ? "an array of f32 or f64" : "an array of integers", err, errsz);
    if (v->arr.n != n)
        return moe__set_err(err, errsz, MOE_ESHAPE, "%s: key \"%.200s\": array has %zu elements, caller expects %zu",
                            g->label, key, v->arr.n, n);
    *out = v;
    return 0;
}

int moe__gguf_get_arr_f32(const moe__gguf *g, const char *key, float *dst, size_t n, char *err, size_t errsz) {
    const moe__gguf_value *v = NULL;
    int rc = get_arr_n(g, key, n, 1, &v, err, errsz);
    if (rc) return rc;
    if (n && !dst) return moe__set_err(err, errsz, MOE_EINVAL, "%s: key \"%.200s\": dst is NULL", g->label, key);
    if (v->arr.type == MOE__GGUF_F32) {
        memcpy(dst, v->arr.data, n * sizeof(float));
    } else {
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, (const unsigned char *)v->arr.data + 8 * i, 8);
            dst[i] = (float)d;
        }
    }
    return 0;
}

static int get_arr_int(const moe__gguf *g, const char *key, int32_t *d32, int64_t *d64, size_t n, char *err,
                       size_t errsz) {
    const moe__gguf_value *v = NULL;
    int rc = get_arr_n(g, key, n, 0, &v, err, errsz);
    if (rc) return rc;
    if (n && !d32 && !d64)
        return moe__set_err(err, errsz, MOE_EINVAL, "%s: key \"%.200s\": dst is NULL", g->label, key);
    int64_t lo = d32 ? INT32_MIN : INT64_MIN, hi = d32 ? INT32_MAX : INT64_MAX;
    for (size_t i = 0; i < n; i++) {
        moe__gguf_value e;
        int64_t x = 0;
        moe__gguf_arr_get(v, i, &e);
        if (!int_in_range(&e, lo, hi, 0, 1, &x, NULL))
            return moe__set_err(err, errsz, MOE_EFORMAT, "%s: key \"%.200s\": element %zu does not fit %s",
                                g->label, key, i, d32 ? "i32" : "i64");
        if (d32) d32[i] = (int32_t)x;
        else d64[i] = x;
    }
    return 0;
}

int moe__gguf_get_arr_i32(const moe__gguf *g, const char *key, int32_t *dst, size_t n, char *err, size_t errsz) {
    if (!dst && n) return moe__set_err(err, errsz, MOE_EINVAL, "gguf: dst is NULL");
    return get_arr_int(g, key, dst, NULL, n, err, errsz);
}

int moe__gguf_get_arr_i64(const moe__gguf *g, const char *key, int64_t *dst, size_t n, char *err, size_t errsz) {
    if (!dst && n) return moe__set_err(err, errsz, MOE_EINVAL, "gguf: dst is NULL");
    return get_arr_int(g, key, NULL, dst, n, err, errsz);
}

int moe__gguf_tensor_f32(const moe__gguf *g, const moe__gguf_tensor *t, float *dst, size_t n, char *err,
                         size_t errsz) {
    const char *label = g ? g->label : "gguf";
    if (!t || (n && !dst)) return moe__set_err(err, errsz, MOE_EINVAL, "%s: NULL argument", label);
    if (n != t->nelem)
        return moe__set_err(err, errsz, MOE_ESHAPE, "%s: tensor \"%s\": has %zu elements, caller expects %zu",
                            label, t->name, t->nelem, n);
    int rc = moe__gguf_dequantize(t->type, t->data, dst, n);
    if (rc == MOE_EUNSUPPORTED)
        return moe__set_err(err, errsz, rc, "%s: tensor \"%s\": type %s cannot be converted to f32 (supported:"
                            " F32, F16, BF16, Q8_0, Q4_0)", label, t->name, moe__gguf_type_name(t->type));
    if (rc) return moe__set_err(err, errsz, rc, "%s: tensor \"%s\": conversion failed", label, t->name);
    return 0;
}

/* ---- writer ------------------------------------------------------------------ */

typedef struct wtensor {
    char *name;
    uint32_t type;
    int n_dims;
    int64_t ne[MOE__GGUF_MAX_DIMS];
    const void *data;
    size_t nbytes;
} wtensor;

struct moe__gguf_writer {
    moe__sb kv;         /* serialized metadata entries */
    size_t n_kv;
    char **keys;        /* for the duplicate check */
    size_t keys_cap;
    wtensor *t;
    size_t n_t, t_cap;
    uint32_t alignment;
    int rc;             /* first error (sticky) */
    char err[384];
};

int moe__gguf_writer_new(moe__gguf_writer **out) {
    if (!out) return MOE_EINVAL;
    *out = moe__calloc(1, sizeof **out);
    if (!*out) return MOE_ENOMEM;
    (*out)->alignment = MOE__GGUF_DEFAULT_ALIGNMENT;
    return 0;
}

void moe__gguf_writer_free(moe__gguf_writer *w) {
    if (!w) return;
    moe__sb_free(&w->kv);
    for (size_t i = 0; i < w->n_kv; i++) moe__free(w->keys[i]);
    moe__free(w->keys);
    for (size_t i = 0; i < w->n_t; i++) moe__free(w->t[i].name);
    moe__free(w->t);
    moe__free(w);
}

const char *moe__gguf_writer_errmsg(const moe__gguf_writer *w) { return w ? w->err : ""; }

__attribute__((format(printf, 3, 4)))
static int wfail(moe__gguf_writer *w, int code, const char *fmt, ...) {
    if (!w->rc) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(w->err, sizeof w->err, fmt, ap);
        va_end(ap);
        w->rc = code;
    }
    return code;
}

static void put_u32(moe__sb *b, uint32_t v) {
    unsigned char t[4];
    for (int i = 0; i < 4; i++) t[i] = (unsigned char)(v >> (8 * i));
    moe__sb_put(b, t, 4);
}

static void put_u64(moe__sb *b, uint64_t v) {
    unsigned char t[8];
    for (int i = 0; i < 8; i++) t[i] = (unsigned char)(v >> (8 * i));
    moe__sb_put(b, t, 8);
}

static void put_str(moe__sb *b, const char *s, size_t len) {
    put_u64(b, len);
    moe__sb_put(b, s, len);
}

/* Appends the value (without its type code) after checking it; 0 or a code
 * with the message in w. */
static int put_value(moe__gguf_writer *w, moe__sb *b, const char *key, const moe__gguf_value *v, int depth) {
    int t = v->type;
    if (t < 0 || t >= MOE__GGUF_VTYPE_COUNT)
        return wfail(w, MOE_EINVAL, "key \"%.200s\": invalid value type %d", key, t);
    switch (t) {
    case MOE__GGUF_STRING:
        if (!v->str.s && v->str.len) return wfail(w, MOE_EINVAL, "key \"%.200s\": string is NULL", key);
        if (v->str.len > MOE__GGUF_MAX_STRING)
            return wfail(w, MOE_ELIMIT, "key \"%.200s\": string of %zu bytes exceeds the limit of %" PRIu64,
                         key, v->str.len, MOE__GGUF_MAX_STRING);
        put_str(b, v->str.s, v->str.len);
        return 0;
    case MOE__GGUF_ARRAY: {
        int et = v->arr.type;
        if (depth >= MOE__GGUF_MAX_DEPTH)
            return wfail(w, MOE_ELIMIT, "key \"%.200s\": arrays nested deeper than %d", key, MOE__GGUF_MAX_DEPTH);
        if (et < 0 || et >= MOE__GGUF_VTYPE_COUNT)
            return wfail(w, MOE_EINVAL, "key \"%.200s\": invalid array element type %d", key, et);
        if (v->arr.n && !v->arr.data) return wfail(w, MOE_EINVAL, "key \"%.200s\": array data is NULL", key);
        put_u32(b, (uint32_t)et);
        put_u64(b, v->arr.n);
        if (et == MOE__GGUF_STRING || et == MOE__GGUF_ARRAY) {
            for (size_t i = 0; i < v->arr.n; i++) {
                moe__gguf_value e;
                moe__gguf_arr_get(v, i, &e);
                int rc = put_value(w, b, key, &e, depth + 1);
                if (rc) return rc;
            }
        } else {
            size_t bytes;
            if (moe__mul_size(v->arr.n, k_vtypes[et].size, &bytes))
                return wfail(w, MOE_ELIMIT, "key \"%.200s\": array too large", key);
            if (et == MOE__GGUF_BOOL)
                for (size_t i = 0; i < v->arr.n; i++)
                    if (((const unsigned char *)v->arr.data)[i] > 1)
                        return wfail(w, MOE_EINVAL, "key \"%.200s\": bool element %zu is not 0 or 1", key, i);
            moe__sb_put(b, v->arr.data, bytes); /* native little-endian = file layout */
        }
        return 0;
    }
    default: {
        /* A scalar: narrow the widened value back, refusing what does not fit. */
        uint64_t raw = 0;
        int fits = 1;
        switch (t) {
        case MOE__GGUF_U8: fits = v->u <= UINT8_MAX; raw = v->u; break;
        case MOE__GGUF_U16: fits = v->u <= UINT16_MAX; raw = v->u; break;
        case MOE__GGUF_U32: fits = v->u <= UINT32_MAX; raw = v->u; break;
        case MOE__GGUF_U64: raw = v->u; break;
        case MOE__GGUF_BOOL: fits = v->u <= 1; raw = v->u; break;
        case MOE__GGUF_I8: fits = v->i >= INT8_MIN && v->i <= INT8_MAX; raw = (uint64_t)v->i; break;
        case MOE__GGUF_I16: fits = v->i >= INT16_MIN && v->i <= INT16_MAX; raw = (uint64_t)v->i; break;
        case MOE__GGUF_I32: fits = v->i >= INT32_MIN && v->i <= INT32_MAX; raw = (uint64_t)v->i; break;
        case MOE__GGUF_I64: raw = (uint64_t)v->i; break;
        case MOE__GGUF_F32: {
            float f = (float)v->f;
            uint32_t u;
            memcpy(&u, &f, 4);
            raw = u;
            break;
        }
        case MOE__GGUF_F64: memcpy(&raw, &v->f, 8); break;
        }
        if (!fits) return wfail(w, MOE_EINVAL, "key \"%.200s\": value does not fit %s", key, k_vtypes[t].name);
        unsigned char tmp[8];
        for (int i = 0; i < 8; i++) tmp[i] = (unsigned char)(raw >> (8 * i));
        moe__sb_put(b, tmp, k_vtypes[t].size);
        return 0;
    }
    }
}

int moe__gguf_writer_add(moe__gguf_writer *w, const char *key, const moe__gguf_value *v) {
    if (!w) return MOE_EINVAL;
    if (w->rc) return w->rc;
    if (!key || !v) return wfail(w, MOE_EINVAL, "add: NULL key or value");
    size_t klen = strlen(key);
    if (klen > MOE__GGUF_MAX_KEY)
        return wfail(w, MOE_ELIMIT, "key \"%.100s...\": %zu bytes exceed the limit of %u", key, klen,
                     MOE__GGUF_MAX_KEY);
    if (w->n_kv >= MOE__GGUF_MAX_KV)
        return wfail(w, MOE_ELIMIT, "key \"%.200s\": more than %u metadata entries", key, MOE__GGUF_MAX_KV);
    if (!strcmp(key, "general.alignment")) {
        if (v->type != MOE__GGUF_U32)
            return wfail(w, MOE_EINVAL, "key \"general.alignment\": must be u32, not %s",
                         moe__gguf_vtype_name(v->type));
        if (v->u == 0 || (v->u & (v->u - 1)) || v->u > MOE__GGUF_MAX_ALIGNMENT)
            return wfail(w, MOE_EINVAL, "key \"general.alignment\": %" PRIu64 " is not a power of two <= %u",
                         v->u, MOE__GGUF_MAX_ALIGNMENT);
    }
    if (w->n_kv == w->keys_cap) {
        size_t cap = w->keys_cap ? 2 * w->keys_cap : 16;
        char **k = moe__calloc(cap, sizeof *k);
        if (!k) return wfail(w, MOE_ENOMEM, "out of memory");
        if (w->n_kv) memcpy(k, w->keys, w->n_kv * sizeof *k);
        moe__free(w->keys);
        w->keys = k;
        w->keys_cap = cap;
    }
    size_t mark = w->kv.len;
    put_str(&w->kv, key, klen);
    put_u32(&w->kv, (uint32_t)v->type);
    int rc = put_value(w, &w->kv, key, v, 0);
    if (rc) {
        w->kv.len = mark; /* drop the partial entry */
        return rc;
    }
    if (w->kv.oom) return wfail(w, MOE_ENOMEM, "key \"%.200s\": out of memory", key);
    if (!(w->keys[w->n_kv] = moe__strdup(key))) return wfail(w, MOE_ENOMEM, "out of memory");
    w->n_kv++;
    if (!strcmp(key, "general.alignment")) w->alignment = (uint32_t)v->u;
    return 0;
}

#define SCALAR_ADDER(fn, T, vt, field)                                                  \
    int fn(moe__gguf_writer *w, const char *key, T x) {                                  \
        moe__gguf_value v;                                                               \
        memset(&v, 0, sizeof v);                                                         \
        v.type = vt;                                                                     \
        v.field = x;                                                                     \
        return moe__gguf_writer_add(w, key, &v);                                         \
    }
SCALAR_ADDER(moe__gguf_writer_add_u8, uint8_t, MOE__GGUF_U8, u)
SCALAR_ADDER(moe__gguf_writer_add_i8, int8_t, MOE__GGUF_I8, i)
SCALAR_ADDER(moe__gguf_writer_add_u16, uint16_t, MOE__GGUF_U16, u)
SCALAR_ADDER(moe__gguf_writer_add_i16, int16_t, MOE__GGUF_I16, i)
SCALAR_ADDER(moe__gguf_writer_add_u32, uint32_t, MOE__GGUF_U32, u)
SCALAR_ADDER(moe__gguf_writer_add_i32, int32_t, MOE__GGUF_I32, i)
SCALAR_ADDER(moe__gguf_writer_add_u64, uint64_t, MOE__GGUF_U64, u)
SCALAR_ADDER(moe__gguf_writer_add_i64, int64_t, MOE__GGUF_I64, i)
SCALAR_ADDER(moe__gguf_writer_add_f32, float, MOE__GGUF_F32, f)
SCALAR_ADDER(moe__gguf_writer_add_f64, double, MOE__GGUF_F64, f)
#undef SCALAR_ADDER

int moe__gguf_writer_add_bool(moe__gguf_writer *w, const char *key, int x) {
    moe__gguf_value v;
    memset(&v, 0, sizeof v);
    v.type = MOE__GGUF_BOOL;
    v.u = x != 0;
    return moe__gguf_writer_add(w, key, &v);
}

int moe__gguf_writer_add_str(moe__gguf_writer *w, const char *key, const char *s) {
    moe__gguf_value v;
    memset(&v, 0, sizeof v);
    v.type = MOE__GGUF_STRING;
    v.str.s = s;
    v.str.len = s ? strlen(s) : 0;
    if (!s && w && !w->rc) return wfail(w, MOE_EINVAL, "key \"%.200s\": string is NULL", key ? key : "");
    return moe__gguf_writer_add(w, key, &v);
}

int moe__gguf_writer_add_arr(moe__gguf_writer *w, const char *key, moe__gguf_vtype elem, const void *data,
                             size_t n) {
    if (w && !w->rc && !moe__gguf_vtype_size(elem))
        return wfail(w, MOE_EINVAL, "key \"%.200s\": add_arr takes fixed-size element types, not %s",
                     key ? key : "", moe__gguf_vtype_name(elem));
    moe__gguf_value v;
    memset(&v, 0, sizeof v);
    v.type = MOE__GGUF_ARRAY;
    v.arr.type = elem;
    v.arr.n = n;
    v.arr.data = data;
    return moe__gguf_writer_add(w, key, &v);
}

int moe__gguf_writer_add_arr_str(moe__gguf_writer *w, const char *key, const char *const *s, size_t n) {
    if (!w) return MOE_EINVAL;
    if (w->rc) return w->rc;
    if (n && !s) return wfail(w, MOE_EINVAL, "key \"%.200s\": strings are NULL", key ? key : "");
    moe__gguf_str *items = moe__calloc(n + 1, sizeof *items);
    if (!items) return wfail(w, MOE_ENOMEM, "key \"%.200s\": out of memory", key ? key : "");
    for (size_t i = 0; i < n; i++) {
        if (!s[i]) {
            moe__free(items);
            return wfail(w, MOE_EINVAL, "key \"%.200s\": string %zu is NULL", key ? key : "", i);
        }
        items[i].s = s[i];
        items[i].len = strlen(s[i]);
    }
    moe__gguf_value v;
    memset(&v, 0, sizeof v);
    v.type = MOE__GGUF_ARRAY;
    v.arr.type = MOE__GGUF_STRING;
    v.arr.n = n;
    v.arr.data = items;
    int rc = moe__gguf_writer_add(w, key, &v);
    moe__free(items);
    return rc;
}

int moe__gguf_writer_add_tensor(moe__gguf_writer *w, const char *name, uint32_t type, int n_dims,
                                const int64_t *ne, const void *data, size_t nbytes) {
    if (!w) return MOE_EINVAL;
    if (w->rc) return w->rc;
    if (!name) return wfail(w, MOE_EINVAL, "add_tensor: name is NULL");
    size_t len = strlen(name);
    if (len == 0 || len > MOE__GGUF_MAX_NAME)
        return wfail(w, len ? MOE_ELIMIT : MOE_EINVAL, "tensor \"%.100s\": name of %zu bytes is outside [1, %u]",
                     name, len, MOE__GGUF_MAX_NAME);
    if (w->n_t >= MOE__GGUF_MAX_TENSORS)
        return wfail(w, MOE_ELIMIT, "tensor \"%s\": more than %u tensors", name, MOE__GGUF_MAX_TENSORS);
    const moe__gguf_type_info *ti = moe__gguf_type_info_of(type);
    if (!ti) return wfail(w, MOE_EINVAL, "tensor \"%s\": unknown ggml type %" PRIu32, name, type);
    if (n_dims < 1 || n_dims > MOE__GGUF_MAX_DIMS || !ne)
        return wfail(w, MOE_EINVAL, "tensor \"%s\": n_dims %d outside [1, %d]", name, n_dims, MOE__GGUF_MAX_DIMS);
    wtensor t = {.type = type, .n_dims = n_dims, .data = data, .nbytes = nbytes};
    size_t nelem = 1;
    int zero = 0, overflow = 0;
    for (int d = 0; d < MOE__GGUF_MAX_DIMS; d++) {
        t.ne[d] = d < n_dims ? ne[d] : 1;
        if (t.ne[d] < 0) return wfail(w, MOE_EINVAL, "tensor \"%s\": ne[%d] = %" PRId64 " is negative", name, d, t.ne[d]);
        if (t.ne[d] == 0) zero = 1;
        else if (!overflow && (moe__mul_size(nelem, (size_t)t.ne[d], &nelem) || nelem > (size_t)INT64_MAX))
            overflow = 1;
    }
    if (zero) nelem = 0;
    else if (overflow) return wfail(w, MOE_ELIMIT, "tensor \"%s\": element count overflows", name);
    if (t.ne[0] % ti->blck)
        return wfail(w, MOE_EINVAL, "tensor \"%s\": ne[0] = %" PRId64 " is not a multiple of the %s block size %" PRIu32,
                     name, t.ne[0], ti->name, ti->blck);
    size_t want;
    if (moe__mul_size(nelem / ti->blck, ti->size, &want))
        return wfail(w, MOE_ELIMIT, "tensor \"%s\": byte count overflows", name);
    if (nbytes != want)
        return wfail(w, MOE_EINVAL, "tensor \"%s\": %zu bytes given, %zu x %s needs %zu", name, nbytes, nelem,
                     ti->name, want);
    if (nbytes && !data) return wfail(w, MOE_EINVAL, "tensor \"%s\": data is NULL", name);
    if (w->n_t == w->t_cap) {
        size_t cap = w->t_cap ? 2 * w->t_cap : 16;
        wtensor *nt = moe__calloc(cap, sizeof *nt);
        if (!nt) return wfail(w, MOE_ENOMEM, "out of memory");
        if (w->n_t) memcpy(nt, w->t, w->n_t * sizeof *nt);
        moe__free(w->t);
        w->t = nt;
        w->t_cap = cap;
    }
    if (!(t.name = moe__strdup(name))) return wfail(w, MOE_ENOMEM, "out of memory");
    w->t[w->n_t++] = t;
    return 0;
}

static int cmp_cstr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Finds a repeated string among n; returns it or NULL. */
static const char *find_dup(char **names, size_t n, int *oom) {
    *oom = 0;
    if (n < 2) return NULL;
    char **s = moe__calloc(n, sizeof *s);
    if (!s) {
        *oom = 1;
        return NULL;
    }
    memcpy(s, names, n * sizeof *s);
    qsort(s, n, sizeof *s, cmp_cstr);
    const char *dup = NULL;
    for (size_t i = 1; i < n && !dup; i++)
        if (!strcmp(s[i - 1], s[i])) dup = s[i];
    moe__free(s);
    return dup;
}

int moe__gguf_writer_write(moe__gguf_writer *w, const char *path, char *err, size_t errsz) {
    if (!w || !path) return moe__set_err(err, errsz, MOE_EINVAL, "gguf write: NULL argument");
    if (w->rc) return moe__set_err(err, errsz, w->rc, "%s: %s", path, w->err);
    int oom;
    const char *dup = find_dup(w->keys, w->n_kv, &oom);
    if (dup) return moe__set_err(err, errsz, MOE_EINVAL, "%s: duplicate metadata key \"%.200s\"", path, dup);
    char **names = oom ? NULL : moe__calloc(w->n_t + 1, sizeof *names);
    if (!names) return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path);
    for (size_t i = 0; i < w->n_t; i++) names[i] = w->t[i].name;
    dup = find_dup(names, w->n_t, &oom);
    moe__free(names);
    if (oom) return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path);
    if (dup) return moe__set_err(err, errsz, MOE_EINVAL, "%s: duplicate tensor name \"%s\"", path, dup);

    const size_t al = w->alignment;
    moe__sb h = {0};
    put_u32(&h, MOE__GGUF_MAGIC);
    put_u32(&h, MOE__GGUF_VERSION);
    put_u64(&h, w->n_t);
    put_u64(&h, w->n_kv);
    moe__sb_put(&h, w->kv.p, w->kv.len);
    uint64_t off = 0;
    for (size_t i = 0; i < w->n_t; i++) {
        const wtensor *t = &w->t[i];
        put_str(&h, t->name, strlen(t->name));
        put_u32(&h, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims; d++) put_u64(&h, (uint64_t)t->ne[d]);
        put_u32(&h, t->type);
        put_u64(&h, off);
        uint64_t padded = t->nbytes + (al - t->nbytes % al) % al;
        if (padded < t->nbytes || off > UINT64_MAX - padded) {
            moe__sb_free(&h);
            return moe__set_err(err, errsz, MOE_ELIMIT, "%s: data section exceeds 2^64 bytes", path);
        }
        off += padded;
    }
    /* Zero bytes for the padding: header to the data section, each tensor to the next. */
    static const unsigned char zeros_small[64];
    unsigned char *zeros = al > sizeof zeros_small ? moe__calloc(al, 1) : NULL;
    const unsigned char *zp = al > sizeof zeros_small ? zeros : zeros_small;
    size_t nparts = 1 + 2 * w->n_t;
    moe__iov *iov = moe__calloc(nparts, sizeof *iov);
    if (zp) moe__sb_put(&h, zp, (al - h.len % al) % al);
    if (h.oom || !iov || !zp) {
        moe__sb_free(&h);
        moe__free(zeros);
        moe__free(iov);
        return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path);
    }
    iov[0] = (moe__iov){h.p, h.len};
    for (size_t i = 0; i < w->n_t; i++) {
        const wtensor *t = &w->t[i];
        iov[1 + 2 * i] = (moe__iov){t->data, t->nbytes};
        iov[2 + 2 * i] = (moe__iov){zp, (al - t->nbytes % al) % al};
    }
    int rc = moe__write_atomic(path, iov, (int)nparts, err, errsz);
    moe__sb_free(&h);
    moe__free(zeros);
    moe__free(iov);
    return rc;
}
