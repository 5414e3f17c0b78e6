/* The checkpoint commit protocol's records (src/io/ckpt.c): the manifest
 * checkpoint.json and the commit record checkpoint.commit, which every
 * checkpoint reader goes through (moe__ckpt_path) and `moe info --verify`
 * checks files against (moe__ckpt_verify). The input is the record, then
 * MOE_FUZZ_SEP and the contents of config.json, the one file a record may
 * list that is present (so that the size/hash comparison is reached); the
 * input's size parity picks which of the two record names it is written as.
 * The records are removed afterwards: the gcc test build runs every target
 * in one scratch directory, and a record left there would redirect the
 * checkpoint target's reads. recover is not driven: it renames files. */
#include "fuzz.h"
#include "io/ckpt.h"
#include "moe.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>


static void remove_in(const char *dir, const char *name) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    unlink(path);
}

MOE_FUZZ_TARGET(ckpt_manifest) {
    const uint8_t *part[2];
    size_t len[2];
    moe_fuzz_split(data, size, 2, part, len);
    const char *dir = moe_fuzz_tmpdir();
    const char *name = size & 1 ? MOE__CKPT_COMMIT : MOE__CKPT_MANIFEST;
    if (!moe_fuzz_write(0, name, part[0], len[0]) || !moe_fuzz_write(1, "config.json", part[1], len[1])) return -1;
    char err[256], path[1024];
    int step = -2, rc = moe__ckpt_verify(dir, &step, err, sizeof err);
    if (rc == 0 && (step < -1 || step > 1 << 30)) moe_fuzz_trap("ckpt_manifest: accepted step out of range");
    int rc2 = moe__ckpt_path(dir, "config.json", path, sizeof path, err, sizeof err);
    if (rc2 == 0 && strncmp(path, dir, strlen(dir))) moe_fuzz_trap("ckpt_manifest: path outside the directory");
    remove_in(dir, MOE__CKPT_MANIFEST);
    remove_in(dir, MOE__CKPT_COMMIT);
    return rc ? rc : rc2;
}
