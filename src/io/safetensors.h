/* Internal safetensors reader and writer (https://github.com/huggingface/safetensors).
 *
 * File layout: u64 little-endian header length H, H bytes of JSON, then the
 * data area. The JSON object maps tensor names to {"dtype", "shape",
 * "data_offsets": [begin, end]} (offsets relative to the data area) and may
 * hold "__metadata__", an object of string values.
 *
 * The reader treats every file as hostile: all sizes, offsets and counts are
 * checked before use, and any violation is an error with a message naming the
 * file. Tensor data is never copied: moe__st_tensor.data points into the
 * mapping (or the caller's buffer) and may be unaligned. */
#ifndef MOE_IO_SAFETENSORS_H
#define MOE_IO_SAFETENSORS_H

#include "internal.h"

#define MOE__ST_MAX_DIMS 8
/* Reader limits; exceeding one is MOE_ELIMIT. */
#define MOE__ST_MAX_HEADER ((uint64_t)100 << 20)  /* bytes of JSON header */
#define MOE__ST_MAX_TENSORS (1 << 20)
#define MOE__ST_MAX_DIM ((uint64_t)1 << 40)       /* any single dimension */
#define MOE__ST_MAX_INT ((uint64_t)1 << 53)       /* largest JSON integer taken */

typedef enum moe__dtype {
    MOE__DT_F32,
    MOE__DT_F16,
    MOE__DT_BF16,
    MOE__DT_F64,
    MOE__DT_I8,
    MOE__DT_U8,
    MOE__DT_I16,
    MOE__DT_I32,
    MOE__DT_I64,
    MOE__DT_BOOL,
} moe__dtype;
#define MOE__DT_COUNT 10

/* Bytes per element; 0 for a value outside the enum. */
size_t moe__dtype_size(moe__dtype t);
/* Name as written in safetensors headers ("F32", "BF16", ...); "?" when invalid. */
const char *moe__dtype_name(moe__dtype t);

typedef struct moe__st_tensor {
    const char *name;
    moe__dtype dtype;
    int ndim;                         /* 0 for a scalar */
    int64_t shape[MOE__ST_MAX_DIMS];
    size_t numel;
    size_t nbytes;
    const void *data;                 /* possibly unaligned */
} moe__st_tensor;

typedef struct moe__st_file moe__st_file; /* opaque */

/* Maps path read-only and parses it. On failure *out is NULL and err names
 * the file and the problem. */
int moe__st_open(const char *path, moe__st_file **out, char *err, size_t errsz);
/* Parses a caller-owned buffer (not copied; it must outlive the handle).
 * Messages name the file "<memory>". */
int moe__st_open_mem(const void *buf, size_t len, moe__st_file **out, char *err,
                     size_t errsz);
int moe__st_count(const moe__st_file *f);
/* i-th tensor in order of data offsets; NULL when out of range. */
const moe__st_tensor *moe__st_get(const moe__st_file *f, int i);
/* NULL when absent. O(log n). */
const moe__st_tensor *moe__st_find(const moe__st_file *f, const char *name);
/* Value of "__metadata__"[key], or NULL. */
const char *moe__st_meta(const moe__st_file *f, const char *key);
int moe__st_meta_count(const moe__st_file *f);
/* Metadata entries in header order; MOE_EINVAL when i is out of range. */
int moe__st_meta_at(const moe__st_file *f, int i, const char **key, const char **value);
/* Copies a tensor to float32 (F32/F16/BF16/F64 accepted; other dtypes give
 * MOE_EUNSUPPORTED); n must equal numel else MOE_ESHAPE. Safe for unaligned data. */
int moe__st_read_f32(const moe__st_tensor *t, float *dst, size_t n);
void moe__st_close(moe__st_file *f); /* NULL is a no-op */

typedef struct moe__st_out {
    const char *name;
    moe__dtype dtype;
    int ndim;
    int64_t shape[MOE__ST_MAX_DIMS];
    const void *data; /* numel * dtype size bytes; may be NULL when empty */
} moe__st_out;

/* Writes n tensors, in the given order, atomically: a temporary file in the
 * same directory is written, flushed and fsynced, renamed over path, then the
 * directory is fsynced. meta: NULL or key,value string pairs ended by a NULL
 * key. The header is padded with spaces so the data area is 8-byte aligned.
 * On any error before the rename the temporary file is removed and an existing
 * file at path is left untouched. */
int moe__st_write(const char *path, const moe__st_out *tensors, int n,
                  const char *const *meta, char *err, size_t errsz);

#endif
