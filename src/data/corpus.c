/* Brown corpus loader: directory scan, text validation, tag stripping and
 * light detokenisation, and the train/validation split. */
#include "data/corpus.h"
#include "strbuf.h"

#include "internal.h"
#include "io/atomic.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

static const char k_genre_letters[] = "abcdefghjklmnpr";
static const char *const k_genre_names[] = {
    "news",    "editorial", "reviews",         "religion",  "hobbies",
    "lore",    "belles_lettres", "government", "learned",   "fiction",
    "mystery", "science_fiction", "adventure", "romance",   "humor",
};
#define N_GENRES ((int)(sizeof k_genre_names / sizeof k_genre_names[0]))
#define MAX_FILES (N_GENRES * 100) /* c<letter><two digits> */

int moe_brown_genre_count(void) { return N_GENRES; }

const char *moe_brown_genre_name(int g) {
    return g >= 0 && g < N_GENRES ? k_genre_names[g] : NULL;
}

int moe_brown_genre_of_letter(char letter) {
    const char *p = letter ? strchr(k_genre_letters, letter) : NULL;
    return p ? (int)(p - k_genre_letters) : -1;
}

void moe_corpus_free(moe_corpus *c) {
    if (!c) return;
    for (int i = 0; i < c->n_docs; i++) moe__free(c->docs[i].text);
    moe__free(c->docs);
    moe__free(c);
}

int moe_corpus_is_val(const moe_corpus *c, int doc) {
    if (!c || !c->docs || doc < 0 || doc >= c->n_docs) return MOE_EINVAL;
    const moe_doc *d = &c->docs[doc];
    int rank = 0, n_g = 0;
    for (int k = 0; k < c->n_docs; k++) {
        if (c->docs[k].genre != d->genre) continue;
        n_g++;
        if (strncmp(c->docs[k].id, d->id, sizeof d->id) < 0) rank++;
    }
    if (rank % 10 == 9) return 1;
    return n_g >= 2 && n_g < 10 && rank == n_g - 1;
}

/* ---- text checks ----------------------------------------------------------- */

/* 0 when s is UTF-8 text; else -1 with the offending offset and a reason. */
static int check_text(const unsigned char *s, size_t n, size_t *bad, const char **why) {
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        if (c < 0x80) {
            if ((c < 0x20 && c != '\t' && c != '\n' && c != '\r' && c != '\v' && c != '\f') ||
                c == 0x7f) {
                *bad = i;
                *why = c == 0 ? "NUL byte (not a text file)" : "control byte (not a text file)";
                return -1;
            }
            i++;
            continue;
        }
        size_t need;
        unsigned lo = 0x80, hi = 0xBF; /* allowed range of the first continuation byte */
        if (c >= 0xC2 && c <= 0xDF) need = 1;
        else if (c == 0xE0) need = 2, lo = 0xA0;
        else if (c >= 0xE1 && c <= 0xEC) need = 2;
        else if (c == 0xED) need = 2, hi = 0x9F; /* no surrogates */
        else if (c >= 0xEE && c <= 0xEF) need = 2;
        else if (c == 0xF0) need = 3, lo = 0x90;
        else if (c >= 0xF1 && c <= 0xF3) need = 3;
        else if (c == 0xF4) need = 3, hi = 0x8F;
        else {
            *bad = i;
            *why = "invalid UTF-8 lead byte";
            return -1;
        }
        if (n - i <= need) {
            *bad = i;
            *why = "truncated UTF-8 sequence";
            return -1;
        }
        for (size_t k = 1; k <= need; k++) {
            unsigned b = s[i + k];
            unsigned l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
            if (b < l || b > h) {
                *bad = i + k;
                *why = "invalid UTF-8 continuation byte";
                return -1;
            }
        }
        i += need + 1;
    }
    return 0;
}

/* ---- cleaning -------------------------------------------------------------- */

static int is_ws(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\v' || c == '\f'; }

static int word_is(const char *w, size_t n, const char *lit) {
    return strlen(lit) == n && !memcmp(w, lit, n);
}

/* Words written without a space before them. */
static int attaches_left(const char *w, size_t n) {
    if (word_is(w, n, "''") || word_is(w, n, ")") || word_is(w, n, "]") || word_is(w, n, "}"))
        return 1;
    if (n == 3 && !strncasecmp(w, "n't", 3)) return 1;
    if (n == 2 && !strncasecmp(w, "'s", 2)) return 1;
    for (size_t i = 0; i < n; i++)
        if (!strchr(".,;:?!", w[i])) return 0;
    return n > 0;
}

/* A tag marks a headline when it carries the -hl suffix (e.g. nn-hl, nn-tl-hl). */
static int tag_is_headline(const char *t, size_t n) {
    for (size_t i = 0; i + 3 <= n; i++)
        if (t[i] == '-' && t[i + 1] == 'h' && t[i + 2] == 'l' && (i + 3 == n || t[i + 3] == '-'))
            return 1;
    return 0;
}

int moe_corpus_clean_brown(const char *name, const char *src, size_t len, char **text,
                           size_t *text_len, char *err, size_t errsz) {
    if (text) *text = NULL;
    if (text_len) *text_len = 0;
    if (!name || (!src && len) || !text || !text_len)
        return moe__set_err(err, errsz, MOE_EINVAL, "moe_corpus_clean_brown: invalid arguments");
    size_t bad;
    const char *why;
    if (check_text((const unsigned char *)src, len, &bad, &why))
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: byte 0x%02x at offset %zu: %s", name,
                            (unsigned char)src[bad], bad, why);
    moe__sb o = {0};
    int pending_blank = 0, prev_headline = 0, no_space_next = 0, open_single = 0;
    size_t line_no = 0;
    for (size_t ls = 0; ls < len;) {
        size_t le = ls;
        while (le < len && src[le] != '\n') le++;
        line_no++;
        /* Pass 1: count tokens and headline tags; every token needs a tag. */
        int n_tok = 0, n_hl = 0;
        for (size_t i = ls; i < le;) {
            while (i < le && is_ws(src[i])) i++;
            if (i >= le) break;
            size_t j = i, slash = SIZE_MAX;
            for (; j < le && !is_ws(src[j]); j++)
                if (src[j] == '/') slash = j;
            if (slash == SIZE_MAX) {
                moe__free(o.p);
                return moe__set_err(err, errsz, MOE_EFORMAT,
                                    "%s:%zu: token \"%.*s\" has no /tag", name, line_no,
                                    (int)(j - i > 40 ? 40 : j - i), src + i);
            }
            n_tok++;
            n_hl += tag_is_headline(src + slash + 1, j - slash - 1);
            i = j;
        }
        if (n_tok == 0) { /* blank line: paragraph break */
            pending_blank = 1;
            ls = le + 1;
            continue;
        }
        int headline = n_hl > 0 && 2 * n_hl >= n_tok;
        int para_break = pending_blank || headline || prev_headline;
        if (para_break) open_single = 0;
        int first = 1, emitted = 0;
        /* Pass 2: emit the words. */
        for (size_t i = ls; i < le;) {
            while (i < le && is_ws(src[i])) i++;
            if (i >= le) break;
            size_t j = i, slash = i;
            for (; j < le && !is_ws(src[j]); j++)
                if (src[j] == '/') slash = j;
            const char *w = src + i;
            size_t wn = slash - i;
            i = j;
            if (wn == 0) continue; /* "/tag": nothing to write */
            int opens = 0, attach;
            if (word_is(w, wn, "``")) {
                w = "\"", wn = 1, opens = 1, attach = 0;
            } else if (word_is(w, wn, "''")) {
                w = "\"", wn = 1, attach = 1;
            } else if (word_is(w, wn, "'")) {
                /* Standalone ' is (nearly always) a single quote: alternate open and
                 * close within a paragraph; at a line start or after an opening
                 * token it opens. */
                opens = first || no_space_next || !open_single;
                attach = !opens;
                open_single = opens;
            } else {
                opens = word_is(w, wn, "(") || word_is(w, wn, "[") || word_is(w, wn, "{");
                attach = attaches_left(w, wn);
            }
            if (o.len > 0) {
                if (para_break) moe__sb_put(&o, "\n\n", 2);
                else if (!attach && !no_space_next) moe__sb_put(&o, " ", 1);
            }
            moe__sb_put(&o, w, wn);
            para_break = 0;
            no_space_next = opens;
            first = 0;
            emitted = 1;
        }
        if (emitted) {
            pending_blank = 0;
            prev_headline = headline;
        }
        ls = le + 1;
    }
    if (o.oom) {
        moe__free(o.p);
        return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", name);
    }
    if (o.len == 0) {
        moe__free(o.p);
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: no words (empty document)", name);
    }
    *text = o.p;
    *text_len = o.len;
    return 0;
}

/* ---- loader ---------------------------------------------------------------- */

static int brown_name(const char *s) {
    return strlen(s) == 4 && s[0] == 'c' && moe_brown_genre_of_letter(s[1]) >= 0 &&
           s[2] >= '0' && s[2] <= '9' && s[3] >= '0' && s[3] <= '9';
}

static int cmp_names(const void *a, const void *b) { return strcmp(a, b); }

int moe_corpus_load_brown(const char *dir, moe_corpus **out, char *err, size_t errsz) {
    if (out) *out = NULL;
    if (!dir || !out)
        return moe__set_err(err, errsz, MOE_EINVAL, "moe_corpus_load_brown: invalid arguments");
    DIR *d = opendir(dir);
    if (!d) {
        int e = errno;
        return moe__set_err(err, errsz, e == ENOENT || e == ENOTDIR ? MOE_ENOTFOUND : MOE_EIO,
                            "%s: cannot open corpus directory: %s", dir, strerror(e));
    }
    char(*names)[8] = moe__malloc(MAX_FILES * sizeof *names);
    if (!names) {
        closedir(d);
        return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", dir);
    }
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (brown_name(e->d_name) && n < MAX_FILES) memcpy(names[n++], e->d_name, 5);
    closedir(d);
    if (n == 0) {
        moe__free(names);
        return moe__set_err(err, errsz, MOE_ENOTFOUND,
                            "%s: no Brown corpus files (c<genre><nn>, e.g. ca01) in this "
                            "directory (run scripts/fetch-brown.sh)",
                            dir);
    }
    qsort(names, (size_t)n, sizeof *names, cmp_names);

    int rc = 0;
    moe_corpus *c = moe__calloc(1, sizeof *c);
    size_t plen = strlen(dir) + 8;
    char *path = moe__malloc(plen);
    if (c) c->docs = moe__calloc((size_t)n, sizeof *c->docs);
    if (!c || !path || !c->docs) {
        rc = moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", dir);
        goto done;
    }
    for (int i = 0; i < n && !rc; i++) {
        snprintf(path, plen, "%s/%s", dir, names[i]);
        char *raw = NULL;
        size_t raw_len = 0;
        if (access(path, F_OK) != 0 && errno == ENOENT) { /* e.g. a dangling link */
            rc = moe__set_err(err, errsz, MOE_ENOTFOUND, "%s: no such file", path);
            break;
        }
        rc = moe__read_file(path, MOE_CORPUS_MAX_FILE, &raw, &raw_len, err, errsz);
        if (rc) break;
        moe_doc *doc = &c->docs[c->n_docs];
        rc = moe_corpus_clean_brown(path, raw, raw_len, &doc->text, &doc->len, err, errsz);
        moe__free(raw);
        if (rc) break;
        memcpy(doc->id, names[i], 5);
        doc->genre = moe_brown_genre_of_letter(names[i][1]);
        c->n_docs++;
    }
done:
    moe__free(path);
    moe__free(names);
    if (rc) {
        moe_corpus_free(c);
        return rc;
    }
    *out = c;
    return 0;
}
