/* Directory-level atomic checkpoints (docs/robustness.md).
 *
 * Every file of a checkpoint is first staged as NAME.new (written atomically),
 * then one record, checkpoint.commit (the manifest: step, each file's size and
 * FNV-1a 64 hash), is renamed into place: that rename is the commit point.
 * Afterwards each NAME.new is renamed over NAME and checkpoint.commit becomes
 * checkpoint.json. A kill at any point leaves either the old checkpoint (no
 * commit record: the .new files are ignored and later removed) or the new one
 * (commit record present: readers take NAME.new where it still exists, the
 * next writer finishes the renames). Directories written before this scheme
 * (no manifest) read as before. */
#ifndef MOE_CKPT_H
#define MOE_CKPT_H

#include "io/atomic.h"
#include "moe.h"

#include <stddef.h>

#define MOE__CKPT_MAX_FILES 8
#define MOE__CKPT_MANIFEST "checkpoint.json"
#define MOE__CKPT_COMMIT "checkpoint.commit"

typedef struct moe__ckpt moe__ckpt;

/* Starts a checkpoint of dir: creates the directory, finishes a committed
 * checkpoint a crash interrupted and removes staged files of an uncommitted
 * one. step (>= 0, or -1 when unknown) goes to the manifest. */
int moe__ckpt_begin(const char *dir, int step, moe__ckpt **out, char *err, size_t errsz);
/* The path to write file name (a plain name, no '/') of the checkpoint to,
 * atomically (moe__write_atomic or a writer built on it); NULL when the
 * name is invalid or more than MOE__CKPT_MAX_FILES were staged. */
const char *moe__ckpt_stage(moe__ckpt *c, const char *name, char *path, size_t pathsz);
int moe__ckpt_write(moe__ckpt *c, const char *name, const moe__iov *parts, int nparts, char *err, size_t errsz);
/* Commits and frees c (also on failure: the staged files stay until the next
 * begin removes them, the previous checkpoint stays the current one). */
int moe__ckpt_commit(moe__ckpt *c, char *err, size_t errsz);
/* Frees c without committing. */
void moe__ckpt_abort(moe__ckpt *c);

/* Finishes or discards an interrupted checkpoint in dir (what begin does
 * first); a directory without a commit record only loses stray .new/.tmp files. */
int moe__ckpt_recover(const char *dir, char *err, size_t errsz);
/* The path to read file name of the checkpoint in dir from, without changing
 * the directory: NAME.new when a committed checkpoint's renames were cut
 * short, otherwise NAME. MOE_EFORMAT when the commit record is malformed. */
int moe__ckpt_path(const char *dir, const char *name, char *path, size_t pathsz, char *err, size_t errsz);
/* Checks every file the manifest lists against its size and hash; *step
 * (may be NULL) receives the manifest's step. MOE_ENOTFOUND when dir has no
 * manifest (a directory from before manifests), MOE_EFORMAT naming the first
 * file that does not match. */
int moe__ckpt_verify(const char *dir, int *step, char *err, size_t errsz);

/* Checkpoints of a model, also under expert parallelism (docs/distributed.md):
 * rank 0 alone runs the protocol above and writes every file (c is NULL on
 * the other ranks); every rank calls these functions together, in the same
 * order, because staging gathers the other ranks' experts, and each returns
 * the same error on every rank. Without a communicator they are the plain
 * begin / stage / commit. */
int moe__model_ckpt_begin(const moe_model *m, const char *dir, int step, moe__ckpt **c, char *err, size_t errsz);
/* Commits c when rc (the staging's result) is MOE_OK on every rank, else
 * aborts it; frees c either way. */
int moe__model_ckpt_end(const moe_model *m, moe__ckpt *c, int rc, char *err, size_t errsz);
/* rc, or an error when another rank had one (no-op without a communicator). */
int moe__model_agree(const moe_model *m, int rc, char *err, size_t errsz);
/* Stages file name of c: the model's tensors read from each of nb bases
 * (parameters, optimizer moments), names prefixed; rank 0 writes every
 * rank's experts under their global ids. */
int moe__model_stage_tensors(const moe_model *m, moe__ckpt *c, const char *name, const float *const *bases,
                             const char *const *prefixes, int nb, const char *const *meta, char *err, size_t errsz);
/* Stage the files of a model (config.json, model.safetensors) or of a
 * trainer (those and optimizer.safetensors) into c. */
int moe__model_stage(const moe_model *m, moe__ckpt *c, char *err, size_t errsz);
int moe__trainer_stage(moe_trainer *t, moe__ckpt *c, char *err, size_t errsz);
/* Tests only: when >= 0, the commit stops (returning MOE_EIO, "simulated
 * crash") after that many of its durable operations, leaving the directory
 * as a kill at that point would. */
extern int moe__ckpt_crash_after;

#endif
