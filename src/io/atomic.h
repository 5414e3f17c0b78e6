/* Atomic file replacement: every writer of the project goes through here, so a
 * crash or a full disk never leaves a half-written file under the final name. */
#ifndef MOE_ATOMIC_H
#define MOE_ATOMIC_H

#include <stddef.h>

typedef struct moe__iov {
    const void *data;
    size_t len;
} moe__iov;

/* Writes the parts, in order, to a temporary file beside path, fsyncs it,
 * renames it over path and fsyncs the directory. On any failure (short write,
 * ENOSPC, ...) the temporary file is removed, path is untouched, and err names
 * the file and the cause (MOE_EIO). */
int moe__write_atomic(const char *path, const moe__iov *parts, int nparts, char *err, size_t errsz);

/* Writes a string builder's text atomically and frees it, also on failure;
 * a builder that ran out of memory is MOE_ENOMEM (the text is incomplete). */
struct moe__sb;
int moe__write_sb_atomic(const char *path, struct moe__sb *b, char *err, size_t errsz);

/* Reads a whole regular file of at most max_bytes into a NUL-terminated
 * buffer (free with moe__free). MOE_EIO / MOE_ELIMIT with a message. */
int moe__read_file(const char *path, size_t max_bytes, char **out, size_t *len, char *err, size_t errsz);

/* Maps a whole regular file read-only (FIFOs and directories are refused,
 * never waited on). *base is NULL for an empty file. The mapping assumes
 * nobody truncates the file while it is mapped (SIGBUS); the project's
 * writers replace files by rename, which is safe. MOE_EIO / MOE_ELIMIT with a
 * message naming the file. Release with moe__unmap_file. */
int moe__map_file(const char *path, const void **base, size_t *size, char *err, size_t errsz);
void moe__unmap_file(const void *base, size_t size);

#endif
