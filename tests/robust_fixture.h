/* A tiny model, its trainer and data for the robustness tests
 * (tests/test_robust*.c, tests/test_ckpt*.c). */
#ifndef MOE_ROBUST_FIXTURE_H
#define MOE_ROBUST_FIXTURE_H

#include "moe.h"

typedef struct {
    moe_model *m;
    moe_trainer *t;
    int32_t *train, *val;
} rb_fix;

/* Model (2 layers, 4 experts top-2, vocab 40, aux-loss-free bias) initialised with seed 1 and a
 * trainer (batch 2 x 16, seed 7) on a fixed synthetic stream. policy and
 * spike_factor go to the trainer config. 0 on success. */
int rb_fix_create(rb_fix *f, moe_nan_policy policy, float spike_factor);
void rb_fix_free(rb_fix *f);
/* A copy of the parameters (free with free()). */
float *rb_params_copy(moe_model *m);
/* 1 when every byte of the model's parameters equals p. */
int rb_params_equal(moe_model *m, const float *p);
/* Copies every regular file of src into the existing directory dst. */
int rb_copy_dir(const char *src, const char *dst);
/* 1 when dir holds a file whose name ends with .new or contains .tmp. or is
 * checkpoint.commit (an interrupted checkpoint). */
int rb_has_leftovers(const char *dir);

#endif
