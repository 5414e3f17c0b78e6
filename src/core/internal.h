/* Internal helpers shared by the library's modules (moe__ prefix). */
#ifndef MOE_INTERNAL_H
#define MOE_INTERNAL_H

#include "moe.h"
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* Allocation through the user's hooks. moe__calloc checks n*size overflow. */
void *moe__malloc(size_t size);
void *moe__calloc(size_t n, size_t size);
void moe__free(void *p);
/* 64-byte aligned allocation (for SIMD/BLAS buffers); free with moe__afree. */
void *moe__aligned_alloc(size_t size);
void moe__afree(void *p);
char *moe__strdup(const char *s);
/* cJSON reports running out of memory as a parse failure; its hooks (see
 * moe_set_allocator) remember it. Returns whether a JSON allocation failed
 * since the last call, and clears that: call it before and after a parse. */
int moe__json_oom(void);
/* Adds item to parent (under key, or appended when key is NULL); any failure,
 * a NULL item from a create that ran out of memory included, clears *ok and
 * frees the item, so a JSON writer checks once, at the end, for all its adds
 * (src/model/config.c). */
struct cJSON;
void moe__json_add(int *ok, struct cJSON *parent, const char *key, struct cJSON *item);

/* Overflow-safe size arithmetic: return 0 on success, -1 on overflow. */
static inline int moe__mul_size(size_t a, size_t b, size_t *out) {
    if (a != 0 && b > SIZE_MAX / a) return -1;
    *out = a * b;
    return 0;
}
static inline int moe__add_size(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) return -1;
    *out = a + b;
    return 0;
}

/* printf into a fixed message buffer (always NUL-terminated); returns err. */
int moe__set_err(char *buf, size_t size, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Resolved thread count: n > 0 as is, else the library default. */
int moe__threads(int n);
/* Elements of work below which a parallel region runs on the calling thread
 * alone (an OpenMP `if` clause): waking a team costs more than the work, and
 * on a busy machine a barrier waits for a descheduled teammate's turn. */
#define MOE__PAR_MIN 32768
/* MOE_EINVAL naming what when n is not 0..moe_max_threads() */
int moe__check_threads(int n, const char *what, char *err, size_t errsz);
/* Makes BLAS single-threaded (the library parallelises with OpenMP around it). */
void moe__blas_single_thread(void);

/* Checks a layer configuration (what moe_layer_create checks). */
int moe__layer_config_check(const moe_layer_config *c, char *err, size_t n);
/* The configuration of the MoE layer `layer` of a model sized for max_tokens
 * tokens (training or inference). */
moe_layer_config moe__model_layer_config(const moe_model_config *c, int layer, int max_tokens, int training);

/* The live configuration of an optimizer (its schedule may be resized). */
moe_adamw_config *moe__adamw_config(moe_adamw *o);
int moe__adamw_step_norm(moe_adamw *o, float *p, float *g, const moe_param_info *t, int nt, double norm,
                         float *gnorm_out);

/* Deterministic RNG: splitmix64 seeding a xoshiro256** stream. */
typedef struct moe__rng { uint64_t s[4]; } moe__rng;
void moe__rng_seed(moe__rng *r, uint64_t seed);
uint64_t moe__rng_u64(moe__rng *r);
double moe__rng_uniform(moe__rng *r); /* [0, 1) */
double moe__rng_normal(moe__rng *r);  /* N(0, 1), Box-Muller */

#endif
