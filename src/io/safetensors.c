/* safetensors reader (mmap, hostile-input safe) and atomic writer. */
#include "safetensors.h"
#include "io/atomic.h"
#include "strbuf.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* safetensors data is little-endian and is handed out without byte swapping. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host"
#endif

static const struct { const char *name; size_t size; } k_dtypes[MOE__DT_COUNT] = {
    [MOE__DT_F32] = {"F32", 4}, [MOE__DT_F16] = {"F16", 2}, [MOE__DT_BF16] = {"BF16", 2},
    [MOE__DT_F64] = {"F64", 8}, [MOE__DT_I8] = {"I8", 1},   [MOE__DT_U8] = {"U8", 1},
    [MOE__DT_I16] = {"I16", 2}, [MOE__DT_I32] = {"I32", 4}, [MOE__DT_I64] = {"I64", 8},
    [MOE__DT_BOOL] = {"BOOL", 1},
};

/* Valid safetensors dtypes we cannot represent: such a file is well formed but
 * unsupported, which callers may want to tell apart from corruption. */
static const char *const k_foreign_dtypes[] = {
    "U16", "U32", "U64", "C64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4",
};

size_t moe__dtype_size(moe__dtype t) {
    return (unsigned)t < MOE__DT_COUNT ? k_dtypes[t].size : 0;
}

const char *moe__dtype_name(moe__dtype t) {
    return (unsigned)t < MOE__DT_COUNT ? k_dtypes[t].name : "?";
}

/* ---- reader ---------------------------------------------------------------- */

typedef struct st_entry {
    moe__st_tensor t;
    uint64_t begin, end; /* byte range in the data area */
} st_entry;

struct moe__st_file {
    const unsigned char *base;
    size_t size;
    int mapped;
    st_entry *ents;        /* sorted by data offset */
    int n;
    const st_entry **by_name;
    char **meta;           /* key, value pairs in header order */
    int n_meta;
};

/* Where messages go and what they are prefixed with. */
typedef struct st_ctx {
    const char *label;
    char *err;
    size_t errsz;
} st_ctx;

__attribute__((format(printf, 4, 5)))
static int st_fail(const st_ctx *c, int code, const char *tensor, const char *fmt, ...) {
    if (!c->err || c->errsz == 0) return code;
    /* Names come from the file: cap them so the problem itself stays visible. */
    int k = tensor ? snprintf(c->err, c->errsz, "%s: tensor \"%.128s\": ", c->label, tensor)
                   : snprintf(c->err, c->errsz, "%s: ", c->label);
    if (k >= 0 && (size_t)k < c->errsz) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err + k, c->errsz - (size_t)k, fmt, ap);
        va_end(ap);
    }
    return code;
}

static uint64_t load_le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* JSON numbers arrive as doubles, exact only up to 2^53. Returns NULL and sets
 * *v, or a description of the problem with its code in *code. */
static const char *json_uint(const cJSON *j, uint64_t *v, int *code) {
    *code = MOE_EFORMAT;
    if (!cJSON_IsNumber(j)) return "is not a number";
    double d = j->valuedouble;
    if (!(d >= 0)) return "is negative";
    if (d > (double)MOE__ST_MAX_INT) {
        *code = MOE_ELIMIT;
        return "exceeds 2^53";
    }
    *v = (uint64_t)d;
    if ((double)*v != d) return "is not an integer";
    return NULL;
}

/* Element and byte counts of a shape (dims already in [0, 2^40]); -1 on overflow. */
static int shape_size(const int64_t *shape, int ndim, moe__dtype dt, size_t *numel,
                      size_t *nbytes) {
    size_t n = 1;
    int overflow = 0;
    for (int d = 0; d < ndim; d++) {
        if (shape[d] == 0) { /* makes any product of the others harmless */
            n = 0;
            overflow = 0;
            break;
        }
        overflow |= moe__mul_size(n, (size_t)shape[d], &n) != 0;
    }
    if (overflow || moe__mul_size(n, k_dtypes[dt].size, nbytes)) return -1;
    *numel = n;
    return 0;
}

static int parse_shape(const st_ctx *c, const char *name, const cJSON *shape, st_entry *e) {
    if (!cJSON_IsArray(shape))
        return st_fail(c, MOE_EFORMAT, name, "\"shape\" is missing or not an array");
    int code;
    for (const cJSON *d = shape->child; d; d = d->next) {
        if (e->t.ndim == MOE__ST_MAX_DIMS)
            return st_fail(c, MOE_ELIMIT, name, "shape has more than %d dimensions",
                           MOE__ST_MAX_DIMS);
        uint64_t v = 0;
        const char *why = json_uint(d, &v, &code);
        if (why) return st_fail(c, code, name, "shape[%d] %s", e->t.ndim, why);
        if (v > MOE__ST_MAX_DIM)
            return st_fail(c, MOE_ELIMIT, name, "shape[%d] = %" PRIu64 " exceeds 2^40",
                           e->t.ndim, v);
        e->t.shape[e->t.ndim++] = (int64_t)v;
    }
    if (shape_size(e->t.shape, e->t.ndim, e->t.dtype, &e->t.numel, &e->t.nbytes))
        return st_fail(c, MOE_ELIMIT, name, "shape product overflows");
    return 0;
}

static int parse_entry(const st_ctx *c, const char *name, const cJSON *j, st_entry *e,
                       uint64_t data_size) {
    if (!cJSON_IsObject(j)) return st_fail(c, MOE_EFORMAT, name, "entry is not an object");
    const cJSON *dtype = NULL, *shape = NULL, *offs = NULL;
    for (const cJSON *k = j->child; k; k = k->next) {
        const cJSON **slot = !k->string ? NULL
                           : !strcmp(k->string, "dtype") ? &dtype
                           : !strcmp(k->string, "shape") ? &shape
                           : !strcmp(k->string, "data_offsets") ? &offs : NULL;
        if (!slot) continue; /* unknown keys are ignored, as other readers do */
        if (*slot) return st_fail(c, MOE_EFORMAT, name, "duplicate key \"%s\"", k->string);
        *slot = k;
    }

    if (!cJSON_IsString(dtype))
        return st_fail(c, MOE_EFORMAT, name, "\"dtype\" is missing or not a string");
    int dt = -1;
    for (int i = 0; i < MOE__DT_COUNT && dt < 0; i++)
        if (!strcmp(dtype->valuestring, k_dtypes[i].name)) dt = i;
    if (dt < 0) {
        for (size_t i = 0; i < sizeof k_foreign_dtypes / sizeof *k_foreign_dtypes; i++)
            if (!strcmp(dtype->valuestring, k_foreign_dtypes[i]))
                return st_fail(c, MOE_EUNSUPPORTED, name, "dtype %s is not supported",
                               dtype->valuestring);
        return st_fail(c, MOE_EFORMAT, name, "unknown dtype \"%.32s\"", dtype->valuestring);
    }
    e->t.dtype = (moe__dtype)dt;

    int rc = parse_shape(c, name, shape, e);
    if (rc) return rc;

    if (!cJSON_IsArray(offs) || !offs->child || !offs->child->next || offs->child->next->next)
        return st_fail(c, MOE_EFORMAT, name, "\"data_offsets\" is missing or not two integers");
    int code;
    const char *why = json_uint(offs->child, &e->begin, &code);
    if (!why) why = json_uint(offs->child->next, &e->end, &code);
    if (why) return st_fail(c, code, name, "data_offsets entry %s", why);
    if (e->begin > e->end)
        return st_fail(c, MOE_EFORMAT, name, "data_offsets [%" PRIu64 ", %" PRIu64 "] are reversed",
                       e->begin, e->end);
    if (e->end > data_size)
        return st_fail(c, MOE_EFORMAT, name,
                       "data_offsets [%" PRIu64 ", %" PRIu64 "] exceed data size %" PRIu64,
                       e->begin, e->end, data_size);
    if (e->end - e->begin != e->t.nbytes)
        return st_fail(c, MOE_EFORMAT, name,
                       "data_offsets [%" PRIu64 ", %" PRIu64 "] span %" PRIu64
                       " bytes but shape and dtype %s need %zu",
                       e->begin, e->end, e->end - e->begin, k_dtypes[dt].name, e->t.nbytes);
    return 0;
}

static int cmp_str_ptr(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int parse_meta(const st_ctx *c, moe__st_file *f, const cJSON *m) {
    if (!cJSON_IsObject(m)) return st_fail(c, MOE_EFORMAT, NULL, "__metadata__ is not an object");
    int n = 0;
    for (const cJSON *k = m->child; k; k = k->next, n++)
        if (!k->string || !cJSON_IsString(k))
            return st_fail(c, MOE_EFORMAT, NULL, "__metadata__ value of \"%.128s\" is not a string",
                           k->string ? k->string : "");
    f->meta = moe__calloc(2 * (size_t)n + 1, sizeof *f->meta);
    if (!f->meta) return st_fail(c, MOE_ENOMEM, NULL, "out of memory");
    for (const cJSON *k = m->child; k; k = k->next) {
        char *key = moe__strdup(k->string), *val = key ? moe__strdup(k->valuestring) : NULL;
        f->meta[2 * f->n_meta] = key;
        f->meta[2 * f->n_meta + 1] = val;
        f->n_meta++; /* counted before the check so close() frees a half pair */
        if (!val) return st_fail(c, MOE_ENOMEM, NULL, "out of memory");
    }
    /* Duplicate keys are ambiguous; a sorted copy finds them in O(n log n). */
    const char **keys = moe__calloc((size_t)n + 1, sizeof *keys);
    if (!keys) return st_fail(c, MOE_ENOMEM, NULL, "out of memory");
    for (int i = 0; i < n; i++) keys[i] = f->meta[2 * i];
    qsort(keys, (size_t)n, sizeof *keys, cmp_str_ptr);
    int rc = 0;
    for (int i = 1; i < n && !rc; i++)
        if (!strcmp(keys[i - 1], keys[i]))
            rc = st_fail(c, MOE_EFORMAT, NULL, "duplicate __metadata__ key \"%.128s\"", keys[i]);
    moe__free(keys);
    return rc;
}

static int cmp_offset(const void *a, const void *b) {
    const st_entry *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return strcmp(x->t.name, y->t.name);
}

static int cmp_name(const void *a, const void *b) {
    return strcmp((*(const st_entry *const *)a)->t.name, (*(const st_entry *const *)b)->t.name);
}

/* Sorts the entries and checks what needs them all: unique names and
 * disjoint byte ranges (empty tensors occupy no bytes and may sit anywhere). */
static int index_entries(const st_ctx *c, moe__st_file *f) {
    qsort(f->ents, (size_t)f->n, sizeof *f->ents, cmp_offset);
    f->by_name = moe__calloc((size_t)f->n + 1, sizeof *f->by_name);
    if (!f->by_name) return st_fail(c, MOE_ENOMEM, NULL, "out of memory");
    for (int i = 0; i < f->n; i++) f->by_name[i] = &f->ents[i];
    qsort(f->by_name, (size_t)f->n, sizeof *f->by_name, cmp_name);
    for (int i = 1; i < f->n; i++)
        if (!strcmp(f->by_name[i - 1]->t.name, f->by_name[i]->t.name))
            return st_fail(c, MOE_EFORMAT, f->by_name[i]->t.name, "duplicate tensor name");
    const st_entry *last = NULL; /* the non-empty range reaching furthest so far */
    for (int i = 0; i < f->n; i++) {
        const st_entry *e = &f->ents[i];
        if (e->begin == e->end) continue;
        if (last && e->begin < last->end)
            return st_fail(c, MOE_EFORMAT, e->t.name,
                           "data_offsets [%" PRIu64 ", %" PRIu64 "] overlap tensor \"%.128s\" [%"
                           PRIu64 ", %" PRIu64 "]",
                           e->begin, e->end, last->t.name, last->begin, last->end);
        if (!last || e->end > last->end) last = e;
    }
    return 0;
}

static int parse_json(const st_ctx *c, moe__st_file *f, const cJSON *root,
                      const unsigned char *data, uint64_t data_size) {
    if (!cJSON_IsObject(root)) return st_fail(c, MOE_EFORMAT, NULL, "header is not a JSON object");
    const cJSON *meta = NULL;
    int n = 0;
    for (const cJSON *k = root->child; k; k = k->next) {
        if (!k->string) return st_fail(c, MOE_EFORMAT, NULL, "header entry without a name");
        if (!strcmp(k->string, "__metadata__")) {
            if (meta) return st_fail(c, MOE_EFORMAT, NULL, "duplicate __metadata__");
            meta = k;
        } else if (n++ == MOE__ST_MAX_TENSORS) {
            return st_fail(c, MOE_ELIMIT, NULL, "more than %d tensors", MOE__ST_MAX_TENSORS);
        }
    }
    int rc = meta ? parse_meta(c, f, meta) : 0;
    if (rc) return rc;
    f->ents = moe__calloc((size_t)n + 1, sizeof *f->ents);
    if (!f->ents) return st_fail(c, MOE_ENOMEM, NULL, "out of memory");
    for (const cJSON *k = root->child; k; k = k->next) {
        if (k == meta) continue;
        st_entry *e = &f->ents[f->n++]; /* counted first so close() frees the name */
        if (!(e->t.name = moe__strdup(k->string)))
            return st_fail(c, MOE_ENOMEM, NULL, "out of memory");
        if ((rc = parse_entry(c, k->string, k, e, data_size))) return rc;
        e->t.data = data + e->begin;
    }
    return index_entries(c, f);
}

static int st_parse(moe__st_file *f, const char *label, char *err, size_t errsz) {
    st_ctx c = {label, err, errsz};
    if (f->size < 8)
        return st_fail(&c, MOE_EFORMAT, NULL,
                       "file is %zu bytes, too short for the 8-byte header length", f->size);
    uint64_t hlen = load_le64(f->base);
    if (hlen < 2 || hlen > f->size - 8)
        return st_fail(&c, MOE_EFORMAT, NULL,
                       "header length %" PRIu64 " is outside [2, %zu] (file size %zu)",
                       hlen, f->size - 8, f->size);
    if (hlen > MOE__ST_MAX_HEADER)
        return st_fail(&c, MOE_ELIMIT, NULL, "header length %" PRIu64 " exceeds the %" PRIu64
                       "-byte limit", hlen, MOE__ST_MAX_HEADER);
    const unsigned char *hdr = f->base + 8;
    /* A NUL would silently cut cJSON's strings short (and make names collide). */
    if (memchr(hdr, 0, (size_t)hlen))
        return st_fail(&c, MOE_EFORMAT, NULL, "header contains a NUL byte");
    /* cJSON wants a terminated string; the copy also keeps it inside the header. */
    char *json = moe__malloc((size_t)hlen + 1);
    if (!json) return st_fail(&c, MOE_ENOMEM, NULL, "out of memory (header of %" PRIu64 " bytes)",
                              hlen);
    memcpy(json, hdr, (size_t)hlen);
    json[hlen] = '\0';
    const char *end = NULL;
    moe__json_oom();
    cJSON *root = cJSON_ParseWithLengthOpts(json, (size_t)hlen, &end, 0);
    int rc;
    if (!root && moe__json_oom()) {
        rc = st_fail(&c, MOE_ENOMEM, NULL, "out of memory parsing the header");
    } else if (!root) {
        rc = st_fail(&c, MOE_EFORMAT, NULL, "header is not valid JSON (error near byte %td)",
                     end ? end - json : (ptrdiff_t)0);
    } else {
        /* Writers pad the header with spaces; anything else after the object is junk. */
        while (end < json + hlen && strchr(" \t\r\n", *end)) end++;
        if (end < json + hlen)
            rc = st_fail(&c, MOE_EFORMAT, NULL, "unexpected bytes after the JSON header at byte %td",
                         end - json);
        else
            rc = parse_json(&c, f, root, hdr + hlen, f->size - 8 - hlen);
    }
    cJSON_Delete(root);
    moe__free(json);
    return rc;
}

void moe__st_close(moe__st_file *f) {
    if (!f) return;
    for (int i = 0; i < f->n; i++) moe__free((char *)f->ents[i].t.name);
    for (int i = 0; i < 2 * f->n_meta; i++) moe__free(f->meta[i]);
    moe__free(f->ents);
    moe__free(f->by_name);
    moe__free(f->meta);
    if (f->mapped) moe__unmap_file(f->base, f->size);
    moe__free(f);
}

static int finish_open(moe__st_file *f, const char *label, moe__st_file **out, char *err,
                       size_t errsz) {
    int rc = st_parse(f, label, err, errsz);
    if (rc) {
        moe__st_close(f);
        return rc;
    }
    *out = f;
    return 0;
}

int moe__st_open_mem(const void *buf, size_t len, moe__st_file **out, char *err, size_t errsz) {
    if (!out) return moe__set_err(err, errsz, MOE_EINVAL, "<memory>: out is NULL");
    *out = NULL;
    if (!buf && len) return moe__set_err(err, errsz, MOE_EINVAL, "<memory>: buffer is NULL");
    moe__st_file *f = moe__calloc(1, sizeof *f);
    if (!f) return moe__set_err(err, errsz, MOE_ENOMEM, "<memory>: out of memory");
    f->base = buf;
    f->size = len;
    return finish_open(f, "<memory>", out, err, errsz);
}

int moe__st_open(const char *path, moe__st_file **out, char *err, size_t errsz) {
    if (!out || !path) return moe__set_err(err, errsz, MOE_EINVAL, "moe__st_open: NULL argument");
    *out = NULL;
    const void *base;
    size_t size;
    int rc = moe__map_file(path, &base, &size, err, errsz);
    if (rc) return rc;
    moe__st_file *f = moe__calloc(1, sizeof *f);
    if (!f) {
        moe__unmap_file(base, size);
        return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path);
    }
    f->base = base;
    f->size = size;
    f->mapped = base != NULL;
    return finish_open(f, path, out, err, errsz);
}

int moe__st_count(const moe__st_file *f) { return f ? f->n : 0; }

const moe__st_tensor *moe__st_get(const moe__st_file *f, int i) {
    return f && i >= 0 && i < f->n ? &f->ents[i].t : NULL;
}

const moe__st_tensor *moe__st_find(const moe__st_file *f, const char *name) {
    if (!f || !name) return NULL;
    int lo = 0, hi = f->n;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(f->by_name[mid]->t.name, name);
        if (c == 0) return &f->by_name[mid]->t;
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

const char *moe__st_meta(const moe__st_file *f, const char *key) {
    if (!f || !key) return NULL;
    for (int i = 0; i < f->n_meta; i++)
        if (!strcmp(f->meta[2 * i], key)) return f->meta[2 * i + 1];
    return NULL;
}

int moe__st_meta_count(const moe__st_file *f) { return f ? f->n_meta : 0; }

int moe__st_meta_at(const moe__st_file *f, int i, const char **key, const char **value) {
    if (!f || i < 0 || i >= f->n_meta) return MOE_EINVAL;
    if (key) *key = f->meta[2 * i];
    if (value) *value = f->meta[2 * i + 1];
    return 0;
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | man << 13; /* inf, or NaN keeping its payload */
    } else if (exp) {
        bits = sign | (exp + 112) << 23 | man << 13; /* rebias 15 -> 127 */
    } else {
        float v = (float)man * 0x1p-24f; /* zero or subnormal: exact in float */
        return sign ? -v : v;
    }
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

int moe__st_read_f32(const moe__st_tensor *t, float *dst, size_t n) {
    if (!t || (n && !dst)) return MOE_EINVAL;
    if (n != t->numel) return MOE_ESHAPE;
    if (n == 0) return 0;
    const unsigned char *p = t->data;
    switch (t->dtype) {
    case MOE__DT_F32:
        memcpy(dst, p, n * sizeof(float));
        return 0;
    case MOE__DT_F16:
    case MOE__DT_BF16:
        for (size_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, p + 2 * i, 2);
            if (t->dtype == MOE__DT_F16) {
                dst[i] = half_to_float(h);
            } else {
                uint32_t bits = (uint32_t)h << 16;
                memcpy(&dst[i], &bits, 4);
            }
        }
        return 0;
    case MOE__DT_F64:
        for (size_t i = 0; i < n; i++) {
            double d;
            memcpy(&d, p + 8 * i, 8);
            dst[i] = (float)d;
        }
        return 0;
    default:
        return MOE_EUNSUPPORTED;
    }
}

/* ---- writer ---------------------------------------------------------------- */

static void sb_u64(moe__sb *b, uint64_t v) {
    char t[24];
    moe__sb_put(b, t, (size_t)snprintf(t, sizeof t, "%" PRIu64, v));
}

static void sb_json(moe__sb *b, const char *s) {
    moe__sb_put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        char t[8];
        if (ch == '"' || ch == '\\') {
            t[0] = '\\';
            t[1] = (char)ch;
            moe__sb_put(b, t, 2);
        } else if (ch < 0x20) {
            moe__sb_put(b, t, (size_t)snprintf(t, sizeof t, "\\u%04x", ch));
        } else {
            moe__sb_put(b, (const char *)&ch, 1);
        }
    }
    moe__sb_put(b, "\"", 1);
}

/* Returns 0 with *nbytes set, or a code after writing the message. */
static int out_check(const st_ctx *c, const moe__st_out *o, size_t *nbytes) {
    if (!o->name || !strcmp(o->name, "__metadata__"))
        return st_fail(c, MOE_EINVAL, o->name ? o->name : "(null)", "invalid tensor name");
    if ((unsigned)o->dtype >= MOE__DT_COUNT)
        return st_fail(c, MOE_EINVAL, o->name, "invalid dtype %d", (int)o->dtype);
    if (o->ndim < 0 || o->ndim > MOE__ST_MAX_DIMS)
        return st_fail(c, MOE_EINVAL, o->name, "ndim %d outside [0, %d]", o->ndim, MOE__ST_MAX_DIMS);
    for (int d = 0; d < o->ndim; d++)
        if (o->shape[d] < 0 || (uint64_t)o->shape[d] > MOE__ST_MAX_DIM)
            return st_fail(c, o->shape[d] < 0 ? MOE_EINVAL : MOE_ELIMIT, o->name,
                           "shape[%d] = %" PRId64 " outside [0, 2^40]", d, o->shape[d]);
    size_t numel;
    if (shape_size(o->shape, o->ndim, o->dtype, &numel, nbytes))
        return st_fail(c, MOE_ELIMIT, o->name, "shape product overflows");
    if (*nbytes && !o->data) return st_fail(c, MOE_EINVAL, o->name, "data is NULL");
    return 0;
}

static int build_header(const st_ctx *c, moe__sb *h, const moe__st_out *ts, int n,
                        const char *const *meta) {
    moe__sb_str(h, "{");
    if (meta && meta[0]) {
        moe__sb_str(h, "\"__metadata__\":{");
        for (int i = 0; meta[i]; i += 2) {
            if (!meta[i + 1])
                return st_fail(c, MOE_EINVAL, NULL, "metadata key \"%.128s\" has a NULL value",
                               meta[i]);
            if (i) moe__sb_str(h, ",");
            sb_json(h, meta[i]);
            moe__sb_str(h, ":");
            sb_json(h, meta[i + 1]);
        }
        moe__sb_str(h, "}");
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        const moe__st_out *o = &ts[i];
        size_t nbytes;
        int rc = out_check(c, o, &nbytes);
        if (rc) return rc;
        if (i || (meta && meta[0])) moe__sb_str(h, ",");
        sb_json(h, o->name);
        moe__sb_str(h, ":{\"dtype\":\"");
        moe__sb_str(h, k_dtypes[o->dtype].name);
        moe__sb_str(h, "\",\"shape\":[");
        for (int d = 0; d < o->ndim; d++) {
            if (d) moe__sb_str(h, ",");
            sb_u64(h, (uint64_t)o->shape[d]);
        }
        moe__sb_str(h, "],\"data_offsets\":[");
        sb_u64(h, off);
        moe__sb_str(h, ",");
        if (nbytes > MOE__ST_MAX_INT - off)
            return st_fail(c, MOE_ELIMIT, o->name, "data area exceeds 2^53 bytes");
        off += nbytes;
        sb_u64(h, off);
        moe__sb_str(h, "]}");
    }
    moe__sb_str(h, "}");
    while (h->len % 8) moe__sb_str(h, " "); /* 8 + len is then a multiple of 8 */
    if (h->oom) return st_fail(c, MOE_ENOMEM, NULL, "out of memory");
    if (h->len > MOE__ST_MAX_HEADER)
        return st_fail(c, MOE_ELIMIT, NULL, "header of %zu bytes exceeds the limit", h->len);
    return 0;
}

/* Readers reject duplicates, so the writer must never produce them. */
static int check_unique(const st_ctx *c, const moe__st_out *ts, int n, const char *const *meta) {
    int nm = 0;
    while (meta && meta[2 * nm]) nm++;
    int total = n > nm ? n : nm;
    const char **names = moe__calloc((size_t)total + 1, sizeof *names);
    if (!names) return st_fail(c, MOE_ENOMEM, NULL, "out of memory");
    int rc = 0;
    for (int pass = 0; pass < 2 && !rc; pass++) {
        int cnt = pass ? nm : n;
        for (int i = 0; i < cnt; i++) names[i] = pass ? meta[2 * i] : ts[i].name;
        qsort(names, (size_t)cnt, sizeof *names, cmp_str_ptr);
        for (int i = 1; i < cnt && !rc; i++)
            if (!strcmp(names[i - 1], names[i]))
                rc = st_fail(c, MOE_EINVAL, NULL, "duplicate %s \"%.128s\"",
                             pass ? "metadata key" : "tensor name", names[i]);
    }
    moe__free(names);
    return rc;
}

static int write_file(const st_ctx *c, const char *path, const moe__sb *h, const moe__st_out *ts, int n) {
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)h->len >> (8 * i));
    moe__iov *parts = moe__calloc((size_t)n + 2, sizeof *parts);
    if (!parts) return st_fail(c, MOE_ENOMEM, NULL, "out of memory");
    parts[0] = (moe__iov){len8, 8};
    parts[1] = (moe__iov){h->p, h->len};
    for (int i = 0; i < n; i++) {
        size_t numel, nbytes = 0;
        shape_size(ts[i].shape, ts[i].ndim, ts[i].dtype, &numel, &nbytes); /* checked before */
        parts[i + 2] = (moe__iov){ts[i].data, nbytes};
    }
    int rc = moe__write_atomic(path, parts, n + 2, c->err, c->errsz);
    moe__free(parts);
    return rc;
}

int moe__st_write(const char *path, const moe__st_out *tensors, int n, const char *const *meta,
                  char *err, size_t errsz) {
    if (!path || n < 0 || (n > 0 && !tensors))
        return moe__set_err(err, errsz, MOE_EINVAL, "moe__st_write: invalid arguments");
    st_ctx c = {path, err, errsz};
    if (n > MOE__ST_MAX_TENSORS)
        return st_fail(&c, MOE_ELIMIT, NULL, "more than %d tensors", MOE__ST_MAX_TENSORS);
    moe__sb h = {0};
    int rc = build_header(&c, &h, tensors, n, meta);
    if (!rc) rc = check_unique(&c, tensors, n, meta);
    if (!rc) rc = write_file(&c, path, &h, tensors, n);
    moe__free(h.p);
    return rc;
}
