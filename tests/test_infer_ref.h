/* Tiny random GGUF MoE models written with the project's writer, and an
 * independent double-precision forward of them (llama.cpp's conventions
 * written out directly: full recompute per position, no cache, no batching). */
#ifndef MOE_TEST_INFER_REF_H
#define MOE_TEST_INFER_REF_H

#include <stddef.h>
#include <stdint.h>

enum { TINY_LLAMA = 0, TINY_QWEN2MOE = 1, TINY_OLMOE = 2 };

typedef struct tiny_spec {
    int arch;
    int V, C, L, H, G, D, n_rot, E, K, F, Fs;
    int tied, bias;
    uint32_t wtype; /* ggml type of the attention, expert and output matrices */
    float rope_base, eps;
} tiny_spec;

/* A Mixtral-layout default (E=4, k=2, GQA 4/2), then tweak. */
tiny_spec tiny_default(int arch);

typedef struct tiny_tensor {
    char name[64];
    int nd;
    int64_t ne[3];
    uint32_t type;
    float *ref;  /* the values the file holds, as float (dequantized) */
    void *bytes; /* the encoded data */
    size_t nbytes;
} tiny_tensor;

typedef struct tiny_model {
    tiny_spec s;
    tiny_tensor *t;
    int n;
} tiny_model;

/* Random weights (seeded), encoded in s.wtype where the engine allows it. */
void tiny_build(tiny_model *m, const tiny_spec *s, uint64_t seed);
/* Writes the GGUF; skip: a tensor name left out; expert_used: written value
 * (<= 0: s.K). Returns 0 or the writer's error. */
int tiny_write(const tiny_model *m, const char *path, const char *skip, int expert_used);
void tiny_free(tiny_model *m);
const float *tiny_get(const tiny_model *m, const char *name); /* NULL when absent */

/* Reference logits out [T][V] for tokens [T] with k experts per token. */
void tiny_ref_forward(const tiny_model *m, const int32_t *tokens, int T, int k, double *out);

#endif
