/* Internal GGUF (v3, also v2) reader and writer: llama.cpp's model file format.
 * Byte layout, limits and error behaviour: docs/gguf.md.
 *
 * File layout (little-endian):
 *   u32 magic "GGUF", u32 version, u64 tensor_count, u64 kv_count,
 *   kv[kv_count]          = string key, u32 value type, value
 *   tensor_info[count]    = string name, u32 n_dims, u64 ne[n_dims], u32 ggml type,
 *                           u64 offset (relative to the data section)
 *   zero padding to the alignment (general.alignment, default 32), then the data
 *   section; every tensor's offset is a multiple of the alignment.
 *   string = u64 length + bytes (no NUL).
 *
 * The reader treats every file as hostile: each count, length, offset and size
 * is checked, with overflow-safe arithmetic, against the file size and the
 * limits below before it is used; a violation is an error whose message names
 * the file, the field and the problem. Tensor data is never copied: it points
 * into the read-only mapping (or the caller's buffer). Keys, tensor names and
 * string values are copied and NUL-terminated. */
#ifndef MOE_IO_GGUF_H
#define MOE_IO_GGUF_H

#include "internal.h"
#include "io/quant.h"

#define MOE__GGUF_MAGIC 0x46554747u /* "GGUF" read as a little-endian u32 */
#define MOE__GGUF_VERSION 3         /* written; 2 and 3 are read */
#define MOE__GGUF_DEFAULT_ALIGNMENT 32
#define MOE__GGUF_MAX_DIMS 4

/* Limits of reader and writer alike; exceeding one is MOE_ELIMIT (the writer
 * refuses to produce a file its reader, or llama.cpp, would refuse). */
#define MOE__GGUF_MAX_TENSORS (1u << 20)
#define MOE__GGUF_MAX_KV (1u << 20)
#define MOE__GGUF_MAX_STRING ((uint64_t)1 << 30) /* bytes of one string */
#define MOE__GGUF_MAX_KEY 65535u                 /* bytes of one key */
#define MOE__GGUF_MAX_NAME 63u       /* bytes of a tensor name (ggml: GGML_MAX_NAME - 1) */
#define MOE__GGUF_MAX_DEPTH 8        /* arrays nested in arrays */
#define MOE__GGUF_MAX_ALIGNMENT 65536u
/* Memory for parsed metadata (string copies, string tables, nested arrays). */
#define MOE__GGUF_MAX_META_BYTES ((size_t)1 << 30)

/* Value types of metadata (GGUF's gguf_type codes). */
typedef enum moe__gguf_vtype {
    MOE__GGUF_U8 = 0,
    MOE__GGUF_I8 = 1,
    MOE__GGUF_U16 = 2,
    MOE__GGUF_I16 = 3,
    MOE__GGUF_U32 = 4,
    MOE__GGUF_I32 = 5,
    MOE__GGUF_F32 = 6,
    MOE__GGUF_BOOL = 7,
    MOE__GGUF_STRING = 8,
    MOE__GGUF_ARRAY = 9,
    MOE__GGUF_U64 = 10,
    MOE__GGUF_I64 = 11,
    MOE__GGUF_F64 = 12,
} moe__gguf_vtype;
#define MOE__GGUF_VTYPE_COUNT 13

/* "u8", "string", ...; "?" when invalid. */
const char *moe__gguf_vtype_name(int t);
/* Bytes of a fixed-size value type; 0 for string, array and invalid codes. */
size_t moe__gguf_vtype_size(int t);

/* A string: s is NUL-terminated; len excludes the NUL. Values may hold NUL
 * bytes (then strlen(s) < len); keys and tensor names never do. */
typedef struct moe__gguf_str {
    const char *s;
    size_t len;
} moe__gguf_str;

/* A metadata value. Scalars are widened: unsigned integers and BOOL (0/1) in
 * u, signed integers in i, F32 (exactly) and F64 in f. */
typedef struct moe__gguf_value {
    moe__gguf_vtype type;
    union {
        uint64_t u;
        int64_t i;
        double f;
        moe__gguf_str str;
        struct {
            moe__gguf_vtype type; /* element type */
            size_t n;
            /* fixed-size elements: n packed little-endian values (possibly
             *   unaligned; BOOL as one byte 0/1);
             * STRING: const moe__gguf_str[n]; ARRAY: const moe__gguf_value[n] */
            const void *data;
        } arr;
    };
} moe__gguf_value;

/* Element i of an array value, as a scalar/string/array value. MOE_EINVAL when
 * v is not an array or i is out of range. */
int moe__gguf_arr_get(const moe__gguf_value *v, size_t i, moe__gguf_value *out);

/* A tensor. ne is in ggml order: ne[0] is the fastest-varying dimension (the
 * row length), so a row-major C array W[rows][cols] has ne = {cols, rows}.
 * Unused dimensions are 1. data is aligned to the file's alignment when the
 * mapping (or the caller's buffer) is. */
typedef struct moe__gguf_tensor {
    const char *name;
    uint32_t type;             /* ggml type code (moe__ggml_type for the computed ones) */
    int n_dims;                /* 0..4 as stored */
    int64_t ne[MOE__GGUF_MAX_DIMS];
    uint64_t offset;           /* in the data section */
    size_t nelem, nbytes;
    const void *data;
} moe__gguf_tensor;

/* ---- reader ------------------------------------------------------------------ */

typedef struct moe__gguf moe__gguf; /* opaque */

/* Maps path read-only and parses it. On failure *out is NULL, err names the
 * file, the field and the problem, and the code is MOE_EIO (cannot open/map),
 * MOE_EFORMAT (malformed), MOE_ELIMIT (a limit above), MOE_EUNSUPPORTED
 * (version 1, big-endian files, unknown ggml types) or MOE_ENOMEM. */
int moe__gguf_open(const char *path, moe__gguf **out, char *err, size_t errsz);
/* Parses a caller-owned buffer (not copied; it must outlive the handle).
 * Messages name the file "<memory>". */
int moe__gguf_open_mem(const void *buf, size_t len, moe__gguf **out, char *err, size_t errsz);
void moe__gguf_close(moe__gguf *g); /* NULL is a no-op */

uint32_t moe__gguf_version(const moe__gguf *g);
uint32_t moe__gguf_alignment(const moe__gguf *g);
uint64_t moe__gguf_data_offset(const moe__gguf *g); /* file offset of the data section */
const char *moe__gguf_label(const moe__gguf *g);    /* the path, or "<memory>" */

/* Metadata in file order. */
size_t moe__gguf_n_kv(const moe__gguf *g);
/* MOE_EINVAL when i is out of range. */
int moe__gguf_kv_at(const moe__gguf *g, size_t i, const char **key, const moe__gguf_value **v);
/* NULL when absent. O(log n). */
const moe__gguf_value *moe__gguf_find(const moe__gguf *g, const char *key);

/* Typed getters. All return 0, MOE_ENOTFOUND when the key is absent, or
 * MOE_EFORMAT when its type does not fit (message: file, key, found type).
 * Integer getters take any integer type whose value fits the target; float
 * getters take F32 or F64; bool takes BOOL only; strings take STRING only. */
int moe__gguf_get_u32(const moe__gguf *g, const char *key, uint32_t *out, char *err, size_t errsz);
int moe__gguf_get_i32(const moe__gguf *g, const char *key, int32_t *out, char *err, size_t errsz);
int moe__gguf_get_u64(const moe__gguf *g, const char *key, uint64_t *out, char *err, size_t errsz);
int moe__gguf_get_i64(const moe__gguf *g, const char *key, int64_t *out, char *err, size_t errsz);
int moe__gguf_get_f32(const moe__gguf *g, const char *key, float *out, char *err, size_t errsz);
int moe__gguf_get_f64(const moe__gguf *g, const char *key, double *out, char *err, size_t errsz);
int moe__gguf_get_bool(const moe__gguf *g, const char *key, int *out, char *err, size_t errsz);
/* *s stays valid until close; len may be NULL. */
int moe__gguf_get_str(const moe__gguf *g, const char *key, const char **s, size_t *len, char *err,
                      size_t errsz);
/* Element type and length of an array (MOE_EFORMAT when not an array). */
int moe__gguf_get_arr_info(const moe__gguf *g, const char *key, moe__gguf_vtype *elem, size_t *n,
                           char *err, size_t errsz);
/* Array of strings, zero-copy: items[0..n) stay valid until close. */
int moe__gguf_get_arr_str(const moe__gguf *g, const char *key, const moe__gguf_str **items,
                          size_t *n, char *err, size_t errsz);
/* Copies a numeric array, converted: n must equal its length (MOE_ESHAPE
 * otherwise). f32 takes F32/F64 elements; i32/i64 take integer elements that
 * fit. */
int moe__gguf_get_arr_f32(const moe__gguf *g, const char *key, float *dst, size_t n, char *err,
                          size_t errsz);
int moe__gguf_get_arr_i32(const moe__gguf *g, const char *key, int32_t *dst, size_t n, char *err,
                          size_t errsz);
int moe__gguf_get_arr_i64(const moe__gguf *g, const char *key, int64_t *dst, size_t n, char *err,
                          size_t errsz);

/* Tensors in file order. */
size_t moe__gguf_n_tensors(const moe__gguf *g);
const moe__gguf_tensor *moe__gguf_tensor_at(const moe__gguf *g, size_t i); /* NULL when out of range */
const moe__gguf_tensor *moe__gguf_find_tensor(const moe__gguf *g, const char *name); /* O(log n) */
/* Converts a whole tensor to float (F32/F16/BF16/Q8_0/Q4_0; others give
 * MOE_EUNSUPPORTED); n must equal t->nelem (MOE_ESHAPE). */
int moe__gguf_tensor_f32(const moe__gguf *g, const moe__gguf_tensor *t, float *dst, size_t n,
                         char *err, size_t errsz);

/* ---- writer ------------------------------------------------------------------ */

typedef struct moe__gguf_writer moe__gguf_writer; /* opaque */

int moe__gguf_writer_new(moe__gguf_writer **out); /* MOE_ENOMEM */
void moe__gguf_writer_free(moe__gguf_writer *w);  /* NULL is a no-op */

/* Adds a metadata entry (written in the order added). The value is copied
 * (arrays deeply). Errors are sticky: the first one is remembered and
 * returned again, with its message, by moe__gguf_writer_write; later adds
 * are no-ops. Duplicate keys are reported by write (MOE_EINVAL).
 * "general.alignment" must be a U32 power of two <= MOE__GGUF_MAX_ALIGNMENT;
 * it sets the alignment of the file. */
int moe__gguf_writer_add(moe__gguf_writer *w, const char *key, const moe__gguf_value *v);
int moe__gguf_writer_add_u8(moe__gguf_writer *w, const char *key, uint8_t v);
int moe__gguf_writer_add_i8(moe__gguf_writer *w, const char *key, int8_t v);
int moe__gguf_writer_add_u16(moe__gguf_writer *w, const char *key, uint16_t v);
int moe__gguf_writer_add_i16(moe__gguf_writer *w, const char *key, int16_t v);
int moe__gguf_writer_add_u32(moe__gguf_writer *w, const char *key, uint32_t v);
int moe__gguf_writer_add_i32(moe__gguf_writer *w, const char *key, int32_t v);
int moe__gguf_writer_add_u64(moe__gguf_writer *w, const char *key, uint64_t v);
int moe__gguf_writer_add_i64(moe__gguf_writer *w, const char *key, int64_t v);
int moe__gguf_writer_add_f32(moe__gguf_writer *w, const char *key, float v);
int moe__gguf_writer_add_f64(moe__gguf_writer *w, const char *key, double v);
int moe__gguf_writer_add_bool(moe__gguf_writer *w, const char *key, int v);
int moe__gguf_writer_add_str(moe__gguf_writer *w, const char *key, const char *s);
/* Array of a fixed-size type from a native C array (uint8_t ... double; BOOL
 * as uint8_t 0/1). */
int moe__gguf_writer_add_arr(moe__gguf_writer *w, const char *key, moe__gguf_vtype elem,
                             const void *data, size_t n);
int moe__gguf_writer_add_arr_str(moe__gguf_writer *w, const char *key, const char *const *s,
                                 size_t n);

/* Adds a tensor (written in the order added, at cumulative aligned offsets,
 * as ggml does). n_dims 1..4, ne in ggml order; ne[0] a multiple of the
 * type's block size; nbytes must equal moe__gguf_row_size(type, nelem). The
 * data is not copied: it must stay valid until write. Names are 1..63 bytes. */
int moe__gguf_writer_add_tensor(moe__gguf_writer *w, const char *name, uint32_t type, int n_dims,
                                const int64_t *ne, const void *data, size_t nbytes);

/* Writes GGUF v3 atomically (temporary file, fsync, rename, directory fsync;
 * see io/atomic.h): on failure an existing file at path is untouched. */
int moe__gguf_writer_write(moe__gguf_writer *w, const char *path, char *err, size_t errsz);
/* Message of the first add error ("" when none). */
const char *moe__gguf_writer_errmsg(const moe__gguf_writer *w);

#endif
