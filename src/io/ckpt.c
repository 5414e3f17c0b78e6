/* Directory-level atomic checkpoints: stage, commit record, roll forward
 * (protocol and crash analysis in docs/robustness.md). */
#include "io/ckpt.h"

#include "internal.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int moe__ckpt_crash_after = -1;

#define NAME_MAX_LEN 64

typedef struct {
    char name[NAME_MAX_LEN];
    uint64_t bytes, hash;
} entry;

typedef struct {
    int step, n;
    entry e[MOE__CKPT_MAX_FILES];
} manifest;

struct moe__ckpt {
    char dir[4096];
    manifest man;
    int ops; /* durable operations done by commit, for the crash hook */
};

static int valid_name(const char *s) {
    const size_t n = strlen(s);
    return n > 0 && n < NAME_MAX_LEN - 8 && !strchr(s, '/') && strcmp(s, ".") && strcmp(s, "..");
}

static int join(char *out, size_t n, const char *dir, const char *name, const char *suffix) {
    return snprintf(out, n, "%s/%s%s", dir, name, suffix) < (int)n ? 0 : -1;
}

static int exists(const char *path) {
    struct stat st;
    return lstat(path, &st) == 0;
}

static int sync_dir(const char *dir, char *err, size_t errsz) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return moe__set_err(err, errsz, MOE_EIO, "%s: cannot open directory: %s", dir, strerror(errno));
    int rc = fsync(fd), e = errno;
    close(fd);
    if (rc && e != EINVAL) /* EINVAL: the filesystem cannot sync directories */
        return moe__set_err(err, errsz, MOE_EIO, "%s: fsync of the directory failed: %s", dir, strerror(e));
    return MOE_OK;
}

static int do_rename(const char *from, const char *to, char *err, size_t errsz) {
    if (rename(from, to) == 0) return MOE_OK;
    return moe__set_err(err, errsz, MOE_EIO, "cannot rename %s to %s: %s", from, to, strerror(errno));
}

/* 64-bit FNV-1a: detects a file that is not the one the manifest describes
 * (not an adversary); a mapped read of data the page cache usually holds. */
static int hash_file(const char *path, uint64_t *bytes, uint64_t *hash, char *err, size_t errsz) {
    const void *base;
    size_t size;
    int rc = moe__map_file(path, &base, &size, err, errsz);
    if (rc) return rc;
    uint64_t h = 0xcbf29ce484222325ULL;
    const unsigned char *p = base;
    for (size_t i = 0; i < size; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    moe__unmap_file(base, size);
    *bytes = size, *hash = h;
    return MOE_OK;
}

/* ---- manifest ------------------------------------------------------------------ */

static char *manifest_json(const manifest *m) {
    cJSON *o = cJSON_CreateObject(), *files = cJSON_CreateArray();
    cJSON_AddStringToObject(o, "format", "moe-checkpoint");
    cJSON_AddNumberToObject(o, "version", 1);
    cJSON_AddNumberToObject(o, "step", m->step);
    for (int i = 0; i < m->n; i++) {
        char h[24], b[24];
        snprintf(h, sizeof h, "%016" PRIx64, m->e[i].hash);
        snprintf(b, sizeof b, "%" PRIu64, m->e[i].bytes);
        cJSON *f = cJSON_CreateObject();
        cJSON_AddStringToObject(f, "name", m->e[i].name);
        cJSON_AddStringToObject(f, "bytes", b); /* strings: exact beyond 2^53 */
        cJSON_AddStringToObject(f, "fnv1a64", h);
        cJSON_AddItemToArray(files, f);
    }
    cJSON_AddItemToObject(o, "files", files);
    char *s = cJSON_Print(o);
    cJSON_Delete(o);
    return s;
}

static int parse_u64(const cJSON *v, int base, uint64_t *out) {
    if (!cJSON_IsString(v) || !*v->valuestring || strlen(v->valuestring) > 20) return -1;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v->valuestring, &end, base);
    if (*end || errno || v->valuestring[0] == '-') return -1;
    *out = x;
    return 0;
}

/* Hostile input: the record may be anything a crash or a person left. */
static int manifest_read(const char *path, manifest *m, char *err, size_t errsz) {
    char *buf;
    size_t len;
    int rc = moe__read_file(path, 1u << 20, &buf, &len, err, errsz);
    if (rc) return rc;
    cJSON *o = cJSON_ParseWithLength(buf, len);
    moe__free(buf);
    memset(m, 0, sizeof *m);
    const cJSON *step = cJSON_GetObjectItemCaseSensitive(o, "step");
    const cJSON *files = cJSON_GetObjectItemCaseSensitive(o, "files"), *f;
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(o, "format");
    const char *why = NULL;
    if (!o) why = "not JSON";
    else if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, "moe-checkpoint")) why = "\"format\" is not \"moe-checkpoint\"";
    else if (!cJSON_IsNumber(step) || step->valuedouble < -1 || step->valuedouble > 1 << 30 ||
             step->valuedouble != (int)step->valuedouble)
        why = "\"step\" missing or out of range";
    else if (!cJSON_IsArray(files) || cJSON_GetArraySize(files) > MOE__CKPT_MAX_FILES)
        why = "\"files\" missing or too long";
    if (!why) {
        m->step = (int)step->valuedouble;
        cJSON_ArrayForEach(f, files) {
            const cJSON *nm = cJSON_GetObjectItemCaseSensitive(f, "name");
            entry *e = &m->e[m->n];
            if (!cJSON_IsString(nm) || !valid_name(nm->valuestring)) why = "a file name is missing or not a plain name";
            else if (parse_u64(cJSON_GetObjectItemCaseSensitive(f, "bytes"), 10, &e->bytes) ||
                     parse_u64(cJSON_GetObjectItemCaseSensitive(f, "fnv1a64"), 16, &e->hash))
                why = "a file's \"bytes\" or \"fnv1a64\" is malformed";
            if (why) break;
            snprintf(e->name, sizeof e->name, "%s", nm->valuestring);
            m->n++;
        }
    }
    cJSON_Delete(o);
    return why ? moe__set_err(err, errsz, MOE_EFORMAT, "%s: %s", path, why) : MOE_OK;
}

/* The commit record when there is one (*committed = 1), else the manifest;
 * MOE_ENOTFOUND when neither exists. */
static int current_manifest(const char *dir, manifest *m, int *committed, char *err, size_t errsz) {
    char path[4200];
    *committed = 0;
    if (join(path, sizeof path, dir, MOE__CKPT_COMMIT, "")) return moe__set_err(err, errsz, MOE_EINVAL, "%s: path too long", dir);
    if (exists(path)) {
        *committed = 1;
        return manifest_read(path, m, err, errsz);
    }
    join(path, sizeof path, dir, MOE__CKPT_MANIFEST, "");
    if (!exists(path)) return moe__set_err(err, errsz, MOE_ENOTFOUND, "%s: no %s", dir, MOE__CKPT_MANIFEST);
    return manifest_read(path, m, err, errsz);
}

/* ---- readers ----------------------------------------------------------------- */

int moe__ckpt_path(const char *dir, const char *name, char *path, size_t pathsz, char *err, size_t errsz) {
    if (join(path, pathsz, dir, name, "")) return moe__set_err(err, errsz, MOE_EINVAL, "%s: path too long", dir);
    char cpath[4200];
    if (join(cpath, sizeof cpath, dir, MOE__CKPT_COMMIT, "") || !exists(cpath)) return MOE_OK;
    manifest m;
    int rc = manifest_read(cpath, &m, err, errsz);
    if (rc) return rc;
    for (int i = 0; i < m.n; i++)
        if (!strcmp(m.e[i].name, name)) {
            char staged[4200];
            if (!join(staged, sizeof staged, dir, name, ".new") && exists(staged)) {
                if (snprintf(path, pathsz, "%s", staged) >= (int)pathsz)
                    return moe__set_err(err, errsz, MOE_EINVAL, "%s: path too long", dir);
            }
            break;
        }
    return MOE_OK;
}

int moe__ckpt_verify(const char *dir, int *step, char *err, size_t errsz) {
    manifest m;
    int committed, rc = current_manifest(dir, &m, &committed, err, errsz);
    if (rc) return rc;
    for (int i = 0; i < m.n; i++) {
        char path[4200];
        uint64_t bytes, hash;
        if ((rc = moe__ckpt_path(dir, m.e[i].name, path, sizeof path, err, errsz))) return rc;
        if ((rc = hash_file(path, &bytes, &hash, err, errsz))) return rc;
        if (bytes != m.e[i].bytes || hash != m.e[i].hash)
            return moe__set_err(err, errsz, MOE_EFORMAT,
                                "%s: %" PRIu64 " bytes, hash %016" PRIx64 "; the manifest of step %d says %" PRIu64
                                " bytes, hash %016" PRIx64 " (a file from another checkpoint?)",
                                path, bytes, hash, m.step, m.e[i].bytes, m.e[i].hash);
    }
    if (step) *step = m.step;
    return MOE_OK;
}

/* ---- writers ----------------------------------------------------------------- */

static int digits(const char *s, const char **end) {
    const char *p = s;
    while (*p >= '0' && *p <= '9') p++;
    *end = p;
    return p > s;
}

/* The files of a run directory that checkpoints and moe train write: only
 * their staged copies and temporaries are ever removed by recovery, together
 * with those of any name the manifest lists. A user's notes.new or
 * report.tmp.1.2 in the same directory is never touched. */
static const char *const OWN_NAMES[] = {MOE__CKPT_MANIFEST, MOE__CKPT_COMMIT, "config.json", "model.safetensors",
                                        "optimizer.safetensors", "train_state.json", "tokenizer.json", "loss.svg"};

/* s without the suffix of an atomic write's temporary (".tmp.PID.SEQ") in
 * base (n bytes); 0 when s has no such suffix. */
static int strip_tmp(const char *s, char *base, size_t n) {
    const char *t = NULL, *e;
    for (const char *p = strstr(s, ".tmp."); p; p = strstr(p + 1, ".tmp.")) t = p;
    if (!t || t == s || !digits(t + 5, &e) || *e != '.' || !digits(e + 1, &e) || *e) return 0;
    return snprintf(base, n, "%.*s", (int)(t - s), s) < (int)n;
}

static int is_own_name(const char *s, const manifest *m) {
    for (size_t i = 0; i < sizeof OWN_NAMES / sizeof OWN_NAMES[0]; i++)
        if (!strcmp(s, OWN_NAMES[i])) return 1;
    for (int i = 0; m && i < m->n; i++)
        if (!strcmp(s, m->e[i].name)) return 1;
    return 0;
}

/* Leftovers of our own writes: NAME.new (a staged file of an uncommitted
 * checkpoint), NAME.tmp.PID.SEQ and NAME.new.tmp.PID.SEQ (temporaries of
 * killed atomic writes, io/atomic.c), NAME one of ours. */
static int is_leftover(const char *s, const manifest *m) {
    char base[NAME_MAX_LEN + 32];
    if (!strip_tmp(s, base, sizeof base) && snprintf(base, sizeof base, "%s", s) >= (int)sizeof base) return 0;
    const size_t n = strlen(base);
    if (n > 4 && !strcmp(base + n - 4, ".new")) base[n - 4] = '\0';
    else if (!strcmp(base, s)) return 0; /* neither staged nor a temporary: a real file */
    return is_own_name(base, m);
}

int moe__ckpt_recover(const char *dir, char *err, size_t errsz) {
    manifest m;
    int committed, rc = current_manifest(dir, &m, &committed, err, errsz);
    if (rc == MOE_ENOTFOUND) rc = MOE_OK, m.n = 0;
    if (rc) return rc;
    char from[4200], to[4200];
    if (committed) { /* roll forward: the commit record says the new files are complete */
        for (int i = 0; i < m.n && !rc; i++) {
            join(from, sizeof from, dir, m.e[i].name, ".new");
            join(to, sizeof to, dir, m.e[i].name, "");
            if (exists(from)) rc = do_rename(from, to, err, errsz);
        }
        if (!rc) rc = sync_dir(dir, err, errsz);
        join(from, sizeof from, dir, MOE__CKPT_COMMIT, "");
        join(to, sizeof to, dir, MOE__CKPT_MANIFEST, "");
        if (!rc) rc = do_rename(from, to, err, errsz);
        if (!rc) rc = sync_dir(dir, err, errsz);
        if (rc) return rc;
    }
    DIR *d = opendir(dir);
    if (!d) return errno == ENOENT ? MOE_OK : moe__set_err(err, errsz, MOE_EIO, "%s: cannot list: %s", dir, strerror(errno));
    for (struct dirent *e; (e = readdir(d));)
        if (is_leftover(e->d_name, &m) && !join(from, sizeof from, dir, e->d_name, "")) unlink(from);
    closedir(d);
    return MOE_OK;
}

int moe__ckpt_begin(const char *dir, int step, moe__ckpt **out, char *err, size_t errsz) {
    *out = NULL;
    if (strlen(dir) + NAME_MAX_LEN + 16 >= sizeof((moe__ckpt *)0)->dir)
        return moe__set_err(err, errsz, MOE_EINVAL, "%.200s...: path too long", dir);
    if (mkdir(dir, 0777) != 0 && errno != EEXIST)
        return moe__set_err(err, errsz, MOE_EIO, "%s: cannot create directory: %s", dir, strerror(errno));
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return moe__set_err(err, errsz, MOE_EIO, "%s: not a directory", dir);
    int rc = moe__ckpt_recover(dir, err, errsz);
    if (rc) return rc;
    moe__ckpt *c = moe__calloc(1, sizeof *c);
    if (!c) return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", dir);
    snprintf(c->dir, sizeof c->dir, "%s", dir);
    c->man.step = step < 0 ? -1 : step;
    *out = c;
    return MOE_OK;
}

const char *moe__ckpt_stage(moe__ckpt *c, const char *name, char *path, size_t pathsz) {
    if (!c || !valid_name(name) || c->man.n >= MOE__CKPT_MAX_FILES || join(path, pathsz, c->dir, name, ".new"))
        return NULL;
    for (int i = 0; i < c->man.n; i++)
        if (!strcmp(c->man.e[i].name, name)) return path; /* staged again: rewritten */
    snprintf(c->man.e[c->man.n++].name, NAME_MAX_LEN, "%s", name);
    return path;
}

int moe__ckpt_write(moe__ckpt *c, const char *name, const moe__iov *parts, int nparts, char *err, size_t errsz) {
    char path[4200];
    if (!moe__ckpt_stage(c, name, path, sizeof path))
        return moe__set_err(err, errsz, MOE_EINVAL, "checkpoint: cannot stage \"%s\"", name);
    return moe__write_atomic(path, parts, nparts, err, errsz);
}

/* Before the commit point the staged files are only garbage (and, after a
 * full disk, space the previous checkpoint may need). */
static void unlink_staged(const moe__ckpt *c) {
    char path[4200];
    for (int i = 0; i < c->man.n; i++)
        if (!join(path, sizeof path, c->dir, c->man.e[i].name, ".new")) unlink(path);
}

void moe__ckpt_abort(moe__ckpt *c) {
    if (!c) return;
    unlink_staged(c);
    moe__free(c);
}

static int crash_here(moe__ckpt *c) { return moe__ckpt_crash_after >= 0 && c->ops++ == moe__ckpt_crash_after; }

int moe__ckpt_commit(moe__ckpt *c, char *err, size_t errsz) {
    char from[4200], to[4200];
    join(to, sizeof to, c->dir, MOE__CKPT_COMMIT, "");
    int rc = MOE_OK;
    for (int i = 0; i < c->man.n && !rc; i++) {
        join(from, sizeof from, c->dir, c->man.e[i].name, ".new");
        rc = hash_file(from, &c->man.e[i].bytes, &c->man.e[i].hash, err, errsz);
    }
    char *json = rc ? NULL : manifest_json(&c->man);
    if (!rc && !json) rc = moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", c->dir);
    if (!rc && crash_here(c)) goto crashed;
    if (!rc) { /* the commit point */
        moe__iov part = {json, strlen(json)};
        rc = moe__write_atomic(to, &part, 1, err, errsz);
    }
    free(json);
    json = NULL;
    if (rc && !exists(to)) { /* not committed: the previous checkpoint stays */
        moe__ckpt_abort(c);
        return rc;
    }
    if (!rc && crash_here(c)) goto crashed;
    for (int i = 0; i < c->man.n && !rc; i++) {
        join(from, sizeof from, c->dir, c->man.e[i].name, ".new");
        join(to, sizeof to, c->dir, c->man.e[i].name, "");
        rc = do_rename(from, to, err, errsz);
        if (!rc && crash_here(c)) goto crashed;
    }
    if (!rc) rc = sync_dir(c->dir, err, errsz);
    join(from, sizeof from, c->dir, MOE__CKPT_COMMIT, "");
    join(to, sizeof to, c->dir, MOE__CKPT_MANIFEST, "");
    if (!rc) rc = do_rename(from, to, err, errsz);
    if (!rc) rc = sync_dir(c->dir, err, errsz);
    moe__free(c);
    return rc;
crashed:
    free(json);
    moe__free(c);
    return moe__set_err(err, errsz, MOE_EIO, "checkpoint: simulated crash (test hook)");
}
