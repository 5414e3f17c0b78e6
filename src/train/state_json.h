/* train_state.json: the run record `moe train` keeps next to each checkpoint
 * (step, tokens, numerics counters, the command line, the corpus, the loss curves), read
 * back by --resume to continue the curves. The file comes from disk, so it is
 * parsed as hostile input: every key's type and range is checked, required
 * keys must be present and appear once, sizes are capped. */
#ifndef MOE_TRAIN_STATE_JSON_H
#define MOE_TRAIN_STATE_JSON_H

#include "internal.h"

/* Caps; exceeding one is MOE_ELIMIT. */
#define MOE__TRAIN_STATE_MAX_BYTES ((size_t)64 << 20) /* the whole file */
#define MOE__TRAIN_STATE_MAX_POINTS (1 << 24)          /* pairs per curve */
#define MOE__TRAIN_STATE_MAX_COMMAND (1 << 16)         /* bytes of "command" */
#define MOE__TRAIN_STATE_MAX_STEP (1 << 30)            /* as the optimizer's step */
#define MOE__TRAIN_STATE_MAX_TOKENS 0x1p62             /* integral, exact in a double */

/* (step, loss) pairs of one curve; grown by moe__train_curve_add. */
typedef struct moe__train_curve {
    double *step, *val; /* [n] */
    int n, cap;
} moe__train_curve;

typedef struct moe__train_state {
    int step;                       /* 0 .. MAX_STEP */
    double tokens;                  /* integral, 0 .. MAX_TOKENS */
    int skipped_steps, loss_spikes; /* 0 .. MAX_STEP; absent in older files: 0 */
    char *command;                  /* NULL when absent; owned after parse */
    char *data;                     /* the run's corpus directory (absolute); NULL when absent */
    moe__train_curve train, val;
} moe__train_state;

/* Appends a pair; MOE_ENOMEM or MOE_ELIMIT (past MAX_POINTS). */
int moe__train_curve_add(moe__train_curve *c, double step, double val);
void moe__train_curve_free(moe__train_curve *c);

/* Parses text[0..n) (not NUL-terminated) into *s, which is zeroed first and
 * on failure holds nothing to free. name labels the messages (the file).
 * Required: "step", "tokens", "train", "val"; optional: "skipped_steps",
 * "loss_spikes", "command", "data" (null counts as absent); other keys are ignored;
 * a known key twice is an error. A curve is an array of [step, loss] pairs,
 * the step an integer in range, the loss finite. */
int moe__train_state_parse(const char *text, size_t n, const char *name, moe__train_state *s, char *err,
                           size_t errsz);
/* Reads dir's train_state.json (the committed one of a checkpoint, see
 * moe__ckpt_path) and parses it. */
int moe__train_state_load(const char *dir, moe__train_state *s, char *err, size_t errsz);
/* The JSON text of s (free with moe__free), NULL when out of memory. Pairs
 * with a non-finite loss are left out: JSON has no NaN. */
char *moe__train_state_json(const moe__train_state *s);
/* Frees what a parse allocated (command, curves); s is zeroed. */
void moe__train_state_free(moe__train_state *s);

#endif
