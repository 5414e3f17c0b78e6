/* Token shards: parallel build, binary save (atomic) and hostile-safe load. */
#include "data/shard.h"

#include "internal.h"
#include "io/atomic.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

void moe_shard_free(moe_shard *s) {
    if (!s) return;
    moe__free(s->tokens);
    moe__free(s->doc_off);
    moe__free(s->doc_genre);
    moe__free(s);
}

size_t moe_shard_doc_len(const moe_shard *s, int i) {
    if (!s || i < 0 || i >= s->n_docs) return 0;
    size_t end = i + 1 < s->n_docs ? s->doc_off[i + 1] : s->n_tokens;
    return end - s->doc_off[i];
}

static moe_shard *shard_alloc(size_t n_tokens, int n_docs) {
    moe_shard *s = moe__calloc(1, sizeof *s);
    if (!s) return NULL;
    s->tokens = moe__calloc(n_tokens ? n_tokens : 1, sizeof *s->tokens);
    s->doc_off = moe__calloc(n_docs ? (size_t)n_docs : 1, sizeof *s->doc_off);
    s->doc_genre = moe__calloc(n_docs ? (size_t)n_docs : 1, sizeof *s->doc_genre);
    if (!s->tokens || !s->doc_off || !s->doc_genre) {
        moe_shard_free(s);
        return NULL;
    }
    s->n_tokens = n_tokens;
    s->n_docs = n_docs;
    return s;
}

int moe_shard_build(const moe_corpus *c, const moe_tokenizer *t, int want_val, moe_shard **out,
                    char *err, size_t errsz) {
    if (out) *out = NULL;
    if (!c || !t || !out || (c->n_docs > 0 && !c->docs) || c->n_docs < 0)
        return moe__set_err(err, errsz, MOE_EINVAL, "moe_shard_build: invalid arguments");
    want_val = want_val != 0;
    const char *split = want_val ? "validation" : "train";
    int n_sel = 0;
    int *sel = moe__malloc((size_t)(c->n_docs ? c->n_docs : 1) * sizeof *sel);
    if (!sel) return moe__set_err(err, errsz, MOE_ENOMEM, "moe_shard_build: out of memory");
    for (int i = 0; i < c->n_docs; i++)
        if (moe_corpus_is_val(c, i) == want_val) sel[n_sel++] = i;
    if (n_sel == 0) {
        moe__free(sel);
        return moe__set_err(err, errsz, MOE_EINVAL, "moe_shard_build: the %s split is empty",
                            split);
    }
    for (int k = 0; k < n_sel; k++) {
        const moe_doc *d = &c->docs[sel[k]];
        if ((!d->text && d->len) || d->genre < 0 || d->genre >= moe_brown_genre_count()) {
            moe__free(sel);
            return moe__set_err(err, errsz, MOE_EINVAL,
                                "moe_shard_build: document %d (%.8s) is invalid", sel[k], d->id);
        }
    }
    int32_t **bufs = moe__calloc((size_t)n_sel, sizeof *bufs);
    size_t *counts = moe__calloc((size_t)n_sel, sizeof *counts);
    int *rcs = moe__calloc((size_t)n_sel, sizeof *rcs);
    int rc = 0;
    moe_shard *s = NULL;
    if (!bufs || !counts || !rcs) {
        rc = moe__set_err(err, errsz, MOE_ENOMEM, "moe_shard_build: out of memory");
        goto done;
    }
    /* A document never needs more tokens than bytes. */
#pragma omp parallel for schedule(dynamic, 1)
    for (int k = 0; k < n_sel; k++) {
        const moe_doc *d = &c->docs[sel[k]];
        bufs[k] = moe__malloc((d->len ? d->len : 1) * sizeof **bufs);
        if (!bufs[k]) rcs[k] = MOE_ENOMEM;
        else rcs[k] = moe_tokenizer_encode(t, d->text, d->len, bufs[k], d->len, &counts[k]);
    }
    size_t total = 0;
    for (int k = 0; k < n_sel && !rc; k++) {
        if (rcs[k])
            rc = moe__set_err(err, errsz, rcs[k], "moe_shard_build: encoding document %.8s: %s",
                              c->docs[sel[k]].id, moe_strerror(rcs[k]));
        else if (moe__add_size(total, counts[k], &total) || moe__add_size(total, 1, &total))
            rc = moe__set_err(err, errsz, MOE_ELIMIT, "moe_shard_build: too many tokens");
    }
    if (rc) goto done;
    s = shard_alloc(total, n_sel);
    if (!s) {
        rc = moe__set_err(err, errsz, MOE_ENOMEM, "moe_shard_build: out of memory");
        goto done;
    }
    s->vocab_size = moe_tokenizer_vocab_size(t);
    int32_t eos = moe_tokenizer_eos(t);
    size_t pos = 0;
    for (int k = 0; k < n_sel; k++) {
        s->doc_off[k] = pos;
        s->doc_genre[k] = c->docs[sel[k]].genre;
        if (counts[k]) memcpy(s->tokens + pos, bufs[k], counts[k] * sizeof *s->tokens);
        pos += counts[k];
        s->tokens[pos++] = eos;
    }
done:
    if (bufs)
        for (int k = 0; k < n_sel; k++) moe__free(bufs[k]);
    moe__free(bufs);
    moe__free(counts);
    moe__free(rcs);
    moe__free(sel);
    if (rc) {
        moe_shard_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

/* ---- little-endian helpers ------------------------------------------------- */

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get_u32(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}
static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define HOST_LE 1
#else
#define HOST_LE 0
#endif

/* Checks a shard in memory (also used before saving). */
static int shard_check(const moe_shard *s, const char *name, char *err, size_t errsz) {
    if (s->vocab_size < 1)
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: field vocab_size: %d < 1", name,
                            s->vocab_size);
    if (s->vocab_size > MOE_SHARD_MAX_VOCAB)
        return moe__set_err(err, errsz, MOE_ELIMIT, "%s: field vocab_size: %d > limit %d", name,
                            s->vocab_size, MOE_SHARD_MAX_VOCAB);
    if (s->n_docs < 0 || (s->n_docs == 0) != (s->n_tokens == 0))
        return moe__set_err(err, errsz, MOE_EFORMAT,
                            "%s: field n_docs: %d documents for %zu tokens", name, s->n_docs,
                            s->n_tokens);
    int32_t eos = s->vocab_size - 1;
    for (int i = 0; i < s->n_docs; i++) {
        size_t off = s->doc_off[i];
        if (i == 0 ? off != 0 : off <= s->doc_off[i - 1])
            return moe__set_err(err, errsz, MOE_EFORMAT,
                                "%s: field doc_offset[%d]: %zu is not %s", name, i, off,
                                i == 0 ? "0" : "greater than the previous offset");
        if (off >= s->n_tokens)
            return moe__set_err(err, errsz, MOE_EFORMAT,
                                "%s: field doc_offset[%d]: %zu >= n_tokens %zu", name, i, off,
                                s->n_tokens);
        if (s->doc_genre[i] < 0 || s->doc_genre[i] >= moe_brown_genre_count())
            return moe__set_err(err, errsz, MOE_EFORMAT,
                                "%s: field doc_genre[%d]: %d is not below %d", name, i,
                                s->doc_genre[i], moe_brown_genre_count());
        if (i > 0 && s->tokens[off - 1] != eos)
            return moe__set_err(err, errsz, MOE_EFORMAT,
                                "%s: field tokens: document %d does not end with EOS (%d)", name,
                                i - 1, (int)eos);
    }
    for (size_t k = 0; k < s->n_tokens; k++)
        if (s->tokens[k] < 0 || s->tokens[k] >= s->vocab_size)
            return moe__set_err(err, errsz, MOE_EFORMAT,
                                "%s: field tokens[%zu]: %ld is not below vocab_size %d", name, k,
                                (long)(uint32_t)s->tokens[k], s->vocab_size);
    if (s->n_tokens > 0 && s->tokens[s->n_tokens - 1] != eos)
        return moe__set_err(err, errsz, MOE_EFORMAT,
                            "%s: field tokens: document %d does not end with EOS (%d)", name,
                            s->n_docs - 1, (int)eos);
    return 0;
}

int moe_shard_save(const moe_shard *s, const char *path, char *err, size_t errsz) {
    if (!s || !path || (s->n_tokens && !s->tokens) || (s->n_docs > 0 && (!s->doc_off ||
                                                                          !s->doc_genre)))
        return moe__set_err(err, errsz, MOE_EINVAL, "moe_shard_save: invalid arguments");
    int rc = shard_check(s, path, err, errsz);
    if (rc) return rc == MOE_EFORMAT ? MOE_EINVAL : rc; /* the caller's shard is wrong */
    if (s->n_tokens > (size_t)UINT64_MAX / 4 || (uint64_t)s->n_docs > UINT32_MAX)
        return moe__set_err(err, errsz, MOE_ELIMIT, "%s: shard too large", path);
    unsigned char head[MOE_SHARD_HEADER_BYTES];
    memcpy(head, MOE_SHARD_MAGIC, 8);
    put_u32(head + 8, MOE_SHARD_VERSION);
    put_u32(head + 12, (uint32_t)s->vocab_size);
    put_u64(head + 16, (uint64_t)s->n_tokens);
    put_u32(head + 24, (uint32_t)s->n_docs);
    size_t tab_len = (size_t)s->n_docs * 12, tok_len;
    if (moe__mul_size(s->n_tokens, 4, &tok_len))
        return moe__set_err(err, errsz, MOE_ELIMIT, "%s: shard too large", path);
    unsigned char *tab = moe__malloc(tab_len ? tab_len : 1);
    unsigned char *tok = HOST_LE ? NULL : moe__malloc(tok_len ? tok_len : 1);
    if (!tab || (!HOST_LE && !tok)) {
        moe__free(tab);
        moe__free(tok);
        return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path);
    }
    for (int i = 0; i < s->n_docs; i++) {
        put_u64(tab + 12 * (size_t)i, (uint64_t)s->doc_off[i]);
        put_u32(tab + 12 * (size_t)i + 8, (uint32_t)s->doc_genre[i]);
    }
    if (!HOST_LE)
        for (size_t k = 0; k < s->n_tokens; k++) put_u32(tok + 4 * k, (uint32_t)s->tokens[k]);
    moe__iov parts[3] = {{head, sizeof head},
                         {tab, tab_len},
                         {HOST_LE ? (const void *)s->tokens : tok, tok_len}};
    rc = moe__write_atomic(path, parts, 3, err, errsz);
    moe__free(tab);
    moe__free(tok);
    return rc;
}

/* Reads exactly n bytes; 0 on success. */
static int read_exact(int fd, void *buf, size_t n) {
    unsigned char *p = buf;
    while (n > 0) {
        ssize_t r = read(fd, p, n > ((size_t)1 << 30) ? ((size_t)1 << 30) : n);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) {
            errno = 0;
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

int moe_shard_load(const char *path, moe_shard **out, char *err, size_t errsz) {
    if (out) *out = NULL;
    if (!path || !out)
        return moe__set_err(err, errsz, MOE_EINVAL, "moe_shard_load: invalid arguments");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return moe__set_err(err, errsz, e == ENOENT ? MOE_ENOTFOUND : MOE_EIO,
                            "%s: cannot open: %s", path, strerror(e));
    }
    int rc = 0;
    moe_shard *s = NULL;
    unsigned char *tab = NULL;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        rc = moe__set_err(err, errsz, MOE_EIO, "%s: not a readable regular file", path);
        goto done;
    }
    uint64_t fsize = (uint64_t)st.st_size;
    unsigned char head[MOE_SHARD_HEADER_BYTES];
    if (fsize < sizeof head) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT,
                          "%s: truncated header (%llu bytes, need %d)", path,
                          (unsigned long long)fsize, MOE_SHARD_HEADER_BYTES);
        goto done;
    }
    if (read_exact(fd, head, sizeof head)) {
        rc = moe__set_err(err, errsz, MOE_EIO, "%s: read failed", path);
        goto done;
    }
    if (memcmp(head, MOE_SHARD_MAGIC, 8) != 0) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: field magic: not a moe shard (%s)",
                          path, MOE_SHARD_MAGIC);
        goto done;
    }
    uint32_t version = get_u32(head + 8), vocab = get_u32(head + 12),
             n_docs = get_u32(head + 24);
    uint64_t n_tokens = get_u64(head + 16);
    if (version != MOE_SHARD_VERSION) {
        rc = moe__set_err(err, errsz, MOE_EUNSUPPORTED,
                          "%s: field version: %u is not supported (only %d)", path, version,
                          MOE_SHARD_VERSION);
        goto done;
    }
    if (vocab > MOE_SHARD_MAX_VOCAB) {
        rc = moe__set_err(err, errsz, MOE_ELIMIT, "%s: field vocab_size: %u > limit %d", path,
                          vocab, MOE_SHARD_MAX_VOCAB);
        goto done;
    }
    if (vocab < 1) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: field vocab_size: 0", path);
        goto done;
    }
    /* The size must be 28 + 12 n_docs + 4 n_tokens exactly (checked for overflow). */
    uint64_t rest = fsize - sizeof head, tab_len = (uint64_t)n_docs * 12;
    if (tab_len > rest || n_tokens > (rest - tab_len) / 4 ||
        (rest - tab_len) != n_tokens * 4) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT,
                          "%s: field n_tokens/n_docs: %llu tokens and %u documents need %s "
                          "bytes, the file has %llu",
                          path, (unsigned long long)n_tokens, n_docs,
                          tab_len > rest || n_tokens > (rest - tab_len) / 4 ? "more" : "other",
                          (unsigned long long)fsize);
        goto done;
    }
    /* a count that lies is the size check's; this one is a real, too large shard */
    if (n_tokens > MOE_SHARD_MAX_TOKENS) {
        rc = moe__set_err(err, errsz, MOE_ELIMIT, "%s: field n_tokens: %llu > limit %llu", path,
                          (unsigned long long)n_tokens, (unsigned long long)MOE_SHARD_MAX_TOKENS);
        goto done;
    }
    if (n_docs > INT32_MAX || n_tokens > SIZE_MAX / 4) {
        rc = moe__set_err(err, errsz, MOE_ELIMIT, "%s: shard too large", path);
        goto done;
    }
    s = shard_alloc((size_t)n_tokens, (int)n_docs);
    tab = moe__malloc(tab_len ? (size_t)tab_len : 1);
    if (!s || !tab) {
        rc = moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path);
        goto done;
    }
    s->vocab_size = (int)vocab;
    if (read_exact(fd, tab, (size_t)tab_len) ||
        read_exact(fd, s->tokens, (size_t)n_tokens * 4)) {
        rc = moe__set_err(err, errsz, MOE_EIO, "%s: read failed (file changed?)", path);
        goto done;
    }
    for (uint32_t i = 0; i < n_docs; i++) {
        uint64_t off = get_u64(tab + 12 * (size_t)i);
        uint32_t g = get_u32(tab + 12 * (size_t)i + 8);
        if (off >= n_tokens) {
            rc = moe__set_err(err, errsz, MOE_EFORMAT,
                              "%s: field doc_offset[%u]: %llu >= n_tokens %llu", path, i,
                              (unsigned long long)off, (unsigned long long)n_tokens);
            goto done;
        }
        if (g >= (uint32_t)moe_brown_genre_count()) {
            rc = moe__set_err(err, errsz, MOE_EFORMAT,
                              "%s: field doc_genre[%u]: %u is not below %d", path, i, g,
                              moe_brown_genre_count());
            goto done;
        }
        s->doc_off[i] = (size_t)off;
        s->doc_genre[i] = (int)g;
    }
    if (!HOST_LE)
        for (size_t k = 0; k < s->n_tokens; k++)
            s->tokens[k] = (int32_t)get_u32((const unsigned char *)&s->tokens[k]);
    /* Tokens are u32 in the file: a value >= 2^31 reads as negative and fails the check. */
    rc = shard_check(s, path, err, errsz);
done:
    close(fd);
    moe__free(tab);
    if (rc) {
        moe_shard_free(s);
        return rc;
    }
    *out = s;
    return 0;
}
