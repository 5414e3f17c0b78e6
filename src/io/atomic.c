#include "io/atomic.h"

#include "internal.h"
#include "strbuf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* fsync of the directory holding path, so the rename itself is durable. */
static int fsync_dir(const char *path) {
    char dir[4096];
    const char *slash = strrchr(path, '/');
    if (!slash) strcpy(dir, ".");
    else if (slash == path) strcpy(dir, "/");
    else {
        size_t n = (size_t)(slash - path);
        if (n >= sizeof dir) return 0; /* absurd path: the data itself is synced */
        memcpy(dir, path, n);
        dir[n] = '\0';
    }
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd), e = errno;
    if (rc && e == EINVAL) rc = 0; /* some filesystems cannot sync directories */
    close(fd);
    errno = e;
    return rc;
}

static int write_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n > 0) {
        ssize_t w = write(fd, c, n > (1u << 30) ? (1u << 30) : n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (w == 0) {
            errno = ENOSPC;
            return -1;
        }
        c += w;
        n -= (size_t)w;
    }
    return 0;
}

int moe__write_atomic(const char *path, const moe__iov *parts, int nparts, char *err, size_t errsz) {
    static _Atomic unsigned seq;
    if (!path || !*path || nparts < 0 || (nparts > 0 && !parts))
        return moe__set_err(err, errsz, MOE_EINVAL, "write: invalid arguments");
    char tmp[4096];
    if (strlen(path) + 40 >= sizeof tmp)
        return moe__set_err(err, errsz, MOE_EINVAL, "%.200s...: path too long", path);
    int fd = -1;
    for (int tries = 0; fd < 0 && tries < 100; tries++) {
        snprintf(tmp, sizeof tmp, "%s.tmp.%ld.%u", path, (long)getpid(), atomic_fetch_add(&seq, 1));
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST) break;
    }
    if (fd < 0)
        return moe__set_err(err, errsz, MOE_EIO, "%s: cannot create temporary file %s: %s", path, tmp,
                            strerror(errno));
    int ok = 1, e = 0;
    for (int i = 0; i < nparts && ok; i++)
        if (parts[i].len && write_all(fd, parts[i].data, parts[i].len) != 0) ok = 0, e = errno;
    if (ok && fsync(fd) != 0) ok = 0, e = errno;
    if (close(fd) != 0 && ok) ok = 0, e = errno;
    if (!ok) {
        unlink(tmp);
        return moe__set_err(err, errsz, MOE_EIO, "%s: writing %s failed: %s", path, tmp, strerror(e));
    }
    if (rename(tmp, path) != 0) {
        e = errno;
        unlink(tmp);
        return moe__set_err(err, errsz, MOE_EIO, "%s: cannot rename %s into place: %s", path, tmp,
                            strerror(e));
    }
    if (fsync_dir(path) != 0)
        return moe__set_err(err, errsz, MOE_EIO, "%s: written, but syncing its directory failed: %s", path,
                            strerror(errno));
    return MOE_OK;
}

int moe__read_file(const char *path, size_t max_bytes, char **out, size_t *len, char *err, size_t errsz) {
    *out = NULL;
    if (len) *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return moe__set_err(err, errsz, MOE_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return moe__set_err(err, errsz, MOE_EIO, "%s: not a regular file", path);
    }
    if ((unsigned long long)st.st_size > max_bytes) {
        close(fd);
        return moe__set_err(err, errsz, MOE_ELIMIT, "%s: %lld bytes, more than the limit of %zu", path,
                            (long long)st.st_size, max_bytes);
    }
    size_t n = (size_t)st.st_size, got = 0;
    char *buf = moe__malloc(n + 1);
    if (!buf) {
        close(fd);
        return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory reading %zu bytes", path, n);
    }
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
    }
    close(fd);
    if (got != n) {
        moe__free(buf);
        return moe__set_err(err, errsz, MOE_EIO, "%s: short read (%zu of %zu bytes)", path, got, n);
    }
    buf[n] = '\0';
    *out = buf;
    if (len) *len = n;
    return MOE_OK;
}

int moe__map_file(const char *path, const void **base, size_t *size, char *err, size_t errsz) {
    *base = NULL;
    *size = 0;
    /* O_NONBLOCK so that a FIFO fails the regular-file check instead of hanging. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return moe__set_err(err, errsz, MOE_EIO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    int rc = MOE_OK;
    if (fstat(fd, &st) != 0) rc = moe__set_err(err, errsz, MOE_EIO, "%s: cannot stat: %s", path, strerror(errno));
    else if (!S_ISREG(st.st_mode)) rc = moe__set_err(err, errsz, MOE_EIO, "%s: not a regular file", path);
    else if ((uintmax_t)st.st_size > SIZE_MAX)
        rc = moe__set_err(err, errsz, MOE_ELIMIT, "%s: file too large to map", path);
    else if (st.st_size > 0) {
        void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) rc = moe__set_err(err, errsz, MOE_EIO, "%s: mmap failed: %s", path, strerror(errno));
        else *base = p, *size = (size_t)st.st_size;
    }
    close(fd);
    return rc;
}

void moe__unmap_file(const void *base, size_t size) {
    if (base) munmap((void *)base, size);
}

int moe__write_sb_atomic(const char *path, moe__sb *b, char *err, size_t errsz) {
    int rc;
    if (b->oom) {
        rc = moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path);
    } else {
        moe__iov part = {b->p, b->len};
        rc = moe__write_atomic(path, &part, 1, err, errsz);
    }
    moe__sb_free(b);
    return rc;
}
