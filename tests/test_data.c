/* Brown corpus loader (cleaning, hostile files, split rule) and token shards
 * (build, save/load round trip, hostile files). */
#include "data/corpus.h"
#include "data/shard.h"
#include "test.h"
#include "tokenizer/tokenizer.h"

#include <dirent.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- helpers --------------------------------------------------------------- */

static int dt_write(const char *dir, const char *name, const void *buf, size_t n) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *fp = fopen(path, "wb");
    if (!fp) return -1;
    size_t w = n ? fwrite(buf, 1, n, fp) : 0;
    return fclose(fp) == 0 && w == n ? 0 : -1;
}

static int dt_write_str(const char *dir, const char *name, const char *s) {
    return dt_write(dir, name, s, strlen(s));
}

/* Cleans s; returns the text (malloc'd by the library) or NULL with rc set. */
static char *dt_clean(const char *s, int *rc, char *err, size_t errsz) {
    char *text = NULL;
    size_t len = 0;
    *rc = moe_corpus_clean_brown("sample", s, strlen(s), &text, &len, err, errsz);
    if (!*rc && strlen(text) != len) CHECK_MSG(0, "length mismatch");
    return text;
}

/* ---- genres, cleaning ------------------------------------------------------ */

TEST(data_genres) {
    static const char *want[] = {"news",    "editorial",      "reviews",   "religion",
                                 "hobbies", "lore",           "belles_lettres",
                                 "government", "learned",     "fiction",   "mystery",
                                 "science_fiction", "adventure", "romance", "humor"};
    CHECK_EQ_INT(moe_brown_genre_count(), 15);
    for (int g = 0; g < 15; g++) CHECK(!strcmp(moe_brown_genre_name(g), want[g]));
    CHECK(moe_brown_genre_name(15) == NULL);
    CHECK(moe_brown_genre_name(-1) == NULL);
    CHECK_EQ_INT(moe_brown_genre_of_letter('a'), 0);
    CHECK_EQ_INT(moe_brown_genre_of_letter('h'), 7);
    CHECK_EQ_INT(moe_brown_genre_of_letter('j'), 8);
    CHECK_EQ_INT(moe_brown_genre_of_letter('r'), 14);
    CHECK_EQ_INT(moe_brown_genre_of_letter('i'), -1);
    CHECK_EQ_INT(moe_brown_genre_of_letter('o'), -1);
    CHECK_EQ_INT(moe_brown_genre_of_letter('\0'), -1);
}

TEST(data_clean_sample_lines) {
    static const struct { const char *in, *want; } cases[] = {
        {"\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.", "The jury said \"no\"."},
        /* sentences of a paragraph joined by a space, paragraphs by a blank line */
        {"\n\n\tA/at b/nn ./.\nC/at d/nn ./.\n\n\n\tE/at f/nn ./.\n", "A b. C d.\n\nE f."},
        /* punctuation, brackets, contractions */
        {"\t(/( a/x )/) ,/, b/x ;/. c/x :/: d/x ?/. e/x !/. do/do n't/* it/pps 's/bez .../.",
         "(a), b; c: d? e! don't it's..."},
        /* '/' inside words: the tag follows the LAST '/' */
        {"\tand/or/cc 1/2/cd //in x/nn", "and/or 1/2 / x"},
        /* a headline is a paragraph of its own */
        {"\tMerger/nn-hl proposed/vbn-hl\nHowever/wrb ,/, it/pps is/bez ./.\n",
         "Merger proposed\n\nHowever, it is."},
        /* single quotes alternate open/close; quoted quote */
        {"\the/pps said/vbd '/' no/at '/' ./.", "he said 'no'."},
        {"\t``/`` It's/pps+bez '/' See/vb Joe/np '/' ''/'' ,/, he/pps says/vbz ./.",
         "\"It's 'See Joe'\", he says."},
        /* CRLF line ends and a "/tag" token with an empty word */
        {"\tA/at b/nn ./.\r\n\r\n\tC/at /nn d/nn\r\n", "A b.\n\nC d"},
        /* UTF-8 words pass through */
        {"\tna\xc3\xafve/jj caf\xc3\xa9/nn", "na\xc3\xafve caf\xc3\xa9"},
    };
    char err[256];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int rc;
        char *t = dt_clean(cases[i].in, &rc, err, sizeof err);
        CHECK_MSG(rc == 0, "case %zu: %s", i, err);
        if (t)
            CHECK_MSG(!strcmp(t, cases[i].want), "case %zu: got \"%s\" want \"%s\"", i, t,
                      cases[i].want);
        free(t); /* default allocator */
    }
}

TEST(data_clean_hostile) {
    static const struct { const char *in; size_t n; const char *what; } cases[] = {
        {"\tThe/at \0jury/nn", 16, "NUL"},
        {"\tThe/at \xff/nn", 12, "UTF-8"},
        {"\tThe/at caf\xc3/nn", 14, "UTF-8"},            /* truncated sequence */
        {"\tThe/at \xc0\xaf/nn", 13, "UTF-8"},           /* overlong */
        {"\tThe/at \xed\xa0\x80/nn", 14, "UTF-8"},       /* surrogate */
        {"\tThe/at \x1b[0m/nn", 15, "control"},
        {"\tThe/at jury ./.", 16, "no /tag"},
        {"", 0, "no words"},
        {"\n\n  \t\n", 6, "no words"},
        {"\t/at /nn", 8, "no words"},
    };
    char err[256];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *text = (char *)1;
        size_t len = 7;
        err[0] = '\0';
        int rc = moe_corpus_clean_brown("f.txt", cases[i].in, cases[i].n, &text, &len, err,
                                        sizeof err);
        CHECK_MSG(rc == MOE_EFORMAT, "case %zu: %s (%s)", i, moe_err_name(rc), err);
        CHECK(text == NULL && len == 0);
        CHECK_MSG(strstr(err, "f.txt") && strstr(err, cases[i].what),
                  "case %zu: message \"%s\" lacks \"%s\"", i, err, cases[i].what);
    }
    /* the line number of a bad token */
    char *text = NULL;
    size_t len;
    CHECK_EQ_INT(moe_corpus_clean_brown("g", "\ta/b\n\n\tc/d e\n", 13, &text, &len, err,
                                        sizeof err),
                 MOE_EFORMAT);
    CHECK_MSG(strstr(err, "g:3:") != NULL, "%s", err);
    CHECK_EQ_INT(moe_corpus_clean_brown("g", NULL, 3, &text, &len, err, sizeof err),
                 MOE_EINVAL);
}

/* ---- loading a directory ----------------------------------------------------- */

TEST(data_load_dir) {
    char dir[64];
    if (!moe_test_tmpdir(dir, "data")) {
        CHECK_MSG(0, "mkdtemp failed");
        return;
    }
    dt_write_str(dir, "cb01", "\tB/np one/cd ./.\n");
    dt_write_str(dir, "ca02", "\tA/np two/cd ./.\n");
    dt_write_str(dir, "ca01", "\n\n\tA/np one/cd ./.\n\n\n\tNext/ap para/nn ./.\n");
    dt_write_str(dir, "cr09", "\tR/np ./.\n");
    /* ignored: not c<genre><nn> */
    dt_write_str(dir, "README", "not \xff a corpus file");
    dt_write_str(dir, "cats.txt", "ca01 news\n");
    dt_write_str(dir, "ci01", "\xff");
    dt_write_str(dir, "ca1", "\xff");
    dt_write_str(dir, "ca001", "\xff");
    moe_corpus *c = NULL;
    char err[512];
    int rc = moe_corpus_load_brown(dir, &c, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (c) {
        CHECK_EQ_INT(c->n_docs, 4);
        static const char *ids[] = {"ca01", "ca02", "cb01", "cr09"};
        static const int genres[] = {0, 0, 1, 14};
        static const char *texts[] = {"A one.\n\nNext para.", "A two.", "B one.", "R."};
        for (int i = 0; i < 4 && i < c->n_docs; i++) {
            CHECK(!strcmp(c->docs[i].id, ids[i]));
            CHECK_EQ_INT(c->docs[i].genre, genres[i]);
            CHECK_MSG(!strcmp(c->docs[i].text, texts[i]), "doc %d: \"%s\"", i, c->docs[i].text);
            CHECK_EQ_INT(c->docs[i].len, strlen(texts[i]));
        }
    }
    moe_corpus_free(c);
    moe_corpus_free(NULL);
    moe_test_rmdir(dir);
}

TEST(data_load_errors) {
    char dir[64], err[512];
    moe_corpus *c = (moe_corpus *)1;
    CHECK_EQ_INT(moe_corpus_load_brown("/nonexistent/moe/brown", &c, err, sizeof err),
                 MOE_ENOTFOUND);
    CHECK(c == NULL && strstr(err, "/nonexistent/moe/brown"));
    CHECK_EQ_INT(moe_corpus_load_brown(NULL, &c, err, sizeof err), MOE_EINVAL);
    if (!moe_test_tmpdir(dir, "data")) {
        CHECK_MSG(0, "mkdtemp failed");
        return;
    }
    /* no c?? files */
    CHECK_EQ_INT(moe_corpus_load_brown(dir, &c, err, sizeof err), MOE_ENOTFOUND);
    dt_write_str(dir, "README", "hello");
    CHECK_EQ_INT(moe_corpus_load_brown(dir, &c, err, sizeof err), MOE_ENOTFOUND);
    CHECK(strstr(err, "no Brown corpus files") != NULL);

    dt_write_str(dir, "ca01", "\tA/at ./.\n");
    CHECK_EQ_INT(moe_corpus_load_brown(dir, &c, err, sizeof err), 0);
    moe_corpus_free(c);
    c = NULL;

    /* each bad file is named in the message */
    char path[256];
    struct { const char *name; int want; const char *what; } cases[] = {
        {"ca02", MOE_EFORMAT, "NUL"},          /* binary */
        {"ca03", MOE_EIO, "regular"},          /* a directory */
        {"ca04", MOE_ENOTFOUND, "no such"},    /* dangling symlink */
        {"ca05", MOE_ELIMIT, "limit"},         /* over the size cap */
        {"ca06", MOE_EFORMAT, "no words"},     /* empty */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, cases[i].name);
        switch (i) {
        case 0: dt_write(dir, cases[i].name, "\tA/at \0\x01\x02", 10); break;
        case 1: mkdir(path, 0755); break;
        case 2: CHECK(symlink("/nonexistent/moe/target", path) == 0); break;
        case 3: {
            FILE *fp = fopen(path, "wb");
            if (fp) {
                CHECK(ftruncate(fileno(fp), (off_t)MOE_CORPUS_MAX_FILE + 1) == 0);
                fclose(fp);
            }
            break;
        }
        case 4: dt_write_str(dir, cases[i].name, ""); break;
        }
        err[0] = '\0';
        int rc = moe_corpus_load_brown(dir, &c, err, sizeof err);
        CHECK_MSG(rc == cases[i].want, "%s: %s (%s)", cases[i].name, moe_err_name(rc), err);
        CHECK(c == NULL);
        CHECK_MSG(strstr(err, cases[i].name) && strstr(err, cases[i].what),
                  "%s: message \"%s\" lacks \"%s\"", cases[i].name, err, cases[i].what);
        if (i == 1) rmdir(path);
        else unlink(path);
    }
    moe_test_rmdir(dir);
}

/* ---- split rule --------------------------------------------------------------- */

TEST(data_split_rule) {
    /* genre 0: 25 docs, 1: 6 docs, 2: 1 doc, 3: 10 docs, given out of id order */
    moe_doc docs[42];
    int n = 0;
    static const int sizes[4] = {25, 6, 1, 10};
    for (int g = 3; g >= 0; g--)
        for (int k = sizes[g] - 1; k >= 0; k--) {
            memset(&docs[n], 0, sizeof docs[n]);
            snprintf(docs[n].id, sizeof docs[n].id, "c%c%02d", "abcd"[g], (k + 1) % 100);
            docs[n].genre = g;
            n++;
        }
    moe_corpus c = {docs, n};
    int n_val[4] = {0}, n_train[4] = {0};
    for (int i = 0; i < n; i++) {
        int v = moe_corpus_is_val(&c, i);
        CHECK(v == 0 || v == 1);
        int k = atoi(docs[i].id + 2) - 1; /* rank within the genre */
        int g = docs[i].genre;
        int want = k % 10 == 9 || (sizes[g] >= 2 && sizes[g] < 10 && k == sizes[g] - 1);
        CHECK_MSG(v == want, "%s: %d, want %d", docs[i].id, v, want);
        if (v) n_val[g]++;
        else n_train[g]++;
    }
    CHECK_EQ_INT(n_val[0], 2); /* ranks 9, 19 */
    CHECK_EQ_INT(n_val[1], 1); /* the last of 6 */
    CHECK_EQ_INT(n_val[2], 0); /* a single document stays in train */
    CHECK_EQ_INT(n_val[3], 1); /* rank 9 */
    CHECK_EQ_INT(n_train[2], 1);
    CHECK_EQ_INT(moe_corpus_is_val(&c, -1), MOE_EINVAL);
    CHECK_EQ_INT(moe_corpus_is_val(&c, n), MOE_EINVAL);
    CHECK_EQ_INT(moe_corpus_is_val(NULL, 0), MOE_EINVAL);
}

TEST(data_brown_corpus) {
    struct stat st;
    if (stat(moe_test_brown_dir(), &st) != 0) {
        moe_test_skip("data/brown absent (make data)");
        return;
    }
    moe_corpus *c = NULL;
    char err[512];
    int rc = moe_corpus_load_brown(moe_test_brown_dir(), &c, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (!c) return;
    CHECK_EQ_INT(c->n_docs, 500);
    int val[15] = {0}, train[15] = {0}, n_val = 0;
    size_t bytes = 0;
    for (int i = 0; i < c->n_docs; i++) {
        if (i) CHECK(strcmp(c->docs[i - 1].id, c->docs[i].id) < 0);
        int v = moe_corpus_is_val(c, i);
        if (v) val[c->docs[i].genre]++, n_val++;
        else train[c->docs[i].genre]++;
        bytes += c->docs[i].len;
        CHECK(strlen(c->docs[i].text) == c->docs[i].len);
    }
    for (int g = 0; g < 15; g++)
        CHECK_MSG(val[g] > 0 && train[g] > 0, "genre %s: %d train, %d val",
                  moe_brown_genre_name(g), train[g], val[g]);
    CHECK_EQ_INT(n_val, 43);
    CHECK(bytes > 5000000 && bytes < 7000000);
    CHECK(!strncmp(c->docs[0].text,
                   "The Fulton County Grand Jury said Friday an investigation of Atlanta's "
                   "recent primary election produced \"no evidence\" that any irregularities "
                   "took place.\n\nThe jury further said",
                   150));
    moe_corpus_free(c);
}

/* ---- shards ------------------------------------------------------------------- */

/* A hand-made corpus of 24 documents over 3 genres (every 10th is validation). */
static moe_corpus *dt_small_corpus(void) {
    moe_corpus *c = calloc(1, sizeof *c);
    c->docs = calloc(24, sizeof *c->docs);
    static const char *words[] = {"the", "jury", "said", "no", "evidence", "of", "fraud",
                                  "was", "found", "in", "Atlanta", "city", "election"};
    uint64_t h = 7;
    for (int i = 0; i < 24; i++) {
        moe_doc *d = &c->docs[i];
        d->genre = i < 12 ? 0 : i < 20 ? 4 : 14;
        int k = i < 12 ? i + 1 : i < 20 ? i - 11 : i - 19;
        snprintf(d->id, sizeof d->id, "c%c%02d", "ae r"[i < 12 ? 0 : i < 20 ? 1 : 3],
                 (k % 100 + 100) % 100);
        d->text = malloc(2000);
        size_t n = 0;
        int nw = 20 + i * 7;
        for (int w = 0; w < nw; w++) {
            h = h * 6364136223846793005ULL + 1442695040888963407ULL;
            n += (size_t)sprintf(d->text + n, "%s%s", w ? " " : "", words[(h >> 33) % 13]);
        }
        d->text[n++] = '.';
        d->text[n] = '\0';
        d->len = n;
    }
    c->n_docs = 24;
    return c;
}

static void dt_free_small(moe_corpus *c) {
    for (int i = 0; i < c->n_docs; i++) free(c->docs[i].text);
    free(c->docs);
    free(c);
}

static int dt_same_shard(const moe_shard *a, const moe_shard *b) {
    if (a->n_tokens != b->n_tokens || a->n_docs != b->n_docs || a->vocab_size != b->vocab_size)
        return 0;
    for (int i = 0; i < a->n_docs; i++)
        if (a->doc_off[i] != b->doc_off[i] || a->doc_genre[i] != b->doc_genre[i]) return 0;
    return !memcmp(a->tokens, b->tokens, a->n_tokens * sizeof *a->tokens);
}

TEST(data_shard_roundtrip) {
    moe_corpus *c = dt_small_corpus();
    const char *texts[24];
    size_t lens[24];
    for (int i = 0; i < 24; i++) texts[i] = c->docs[i].text, lens[i] = c->docs[i].len;
    char err[512], dir[64], path[128];
    moe_tokenizer *t = NULL;
    CHECK_EQ_INT(moe_tokenizer_train(texts, lens, 24, 300, &t, err, sizeof err), 0);
    if (!t || !moe_test_tmpdir(dir, "data")) {
        moe_tokenizer_free(t);
        dt_free_small(c);
        return;
    }
    for (int want_val = 0; want_val <= 1; want_val++) {
        moe_shard *s = NULL, *u = NULL, *one = NULL;
        CHECK_EQ_INT(moe_shard_build(c, t, want_val, &s, err, sizeof err), 0);
        if (!s) continue;
        /* split: genre a has 12 docs (rank 9 -> val), e 8 (last -> val), r 4 (last -> val) */
        CHECK_EQ_INT(s->n_docs, want_val ? 3 : 21);
        CHECK_EQ_INT(s->vocab_size, 300);
        int32_t eos = moe_tokenizer_eos(t);
        int k = 0;
        for (int i = 0; i < c->n_docs; i++) {
            if (moe_corpus_is_val(c, i) != want_val) continue;
            size_t len = moe_shard_doc_len(s, k);
            CHECK(len >= 2 && s->tokens[s->doc_off[k] + len - 1] == eos);
            CHECK_EQ_INT(s->doc_genre[k], c->docs[i].genre);
            char buf[4000];
            size_t m = 0;
            CHECK_EQ_INT(moe_tokenizer_decode(t, s->tokens + s->doc_off[k], len, buf, sizeof buf,
                                              &m),
                         0);
            CHECK(m == c->docs[i].len && !memcmp(buf, c->docs[i].text, m));
            k++;
        }
        CHECK_EQ_INT(k, s->n_docs);
        CHECK_EQ_INT(s->doc_off[0], 0);
        /* same result with one thread */
        int nt = omp_get_max_threads();
        omp_set_num_threads(1);
        CHECK_EQ_INT(moe_shard_build(c, t, want_val, &one, err, sizeof err), 0);
        omp_set_num_threads(nt);
        if (one) CHECK(dt_same_shard(s, one));
        /* save / load */
        snprintf(path, sizeof path, "%s/%s.bin", dir, want_val ? "val" : "train");
        CHECK_EQ_INT(moe_shard_save(s, path, err, sizeof err), 0);
        CHECK_EQ_INT(moe_shard_load(path, &u, err, sizeof err), 0);
        if (u) CHECK(dt_same_shard(s, u));
        struct stat st;
        CHECK(stat(path, &st) == 0 &&
              (size_t)st.st_size == 28 + 12 * (size_t)s->n_docs + 4 * s->n_tokens);
        moe_shard_free(s);
        moe_shard_free(u);
        moe_shard_free(one);
    }
    /* an empty split is an error */
    for (int i = 20; i < 24; i++) c->docs[i].genre = 14;
    moe_corpus one_doc = {c->docs + 23, 1};
    moe_shard *s = NULL;
    CHECK_EQ_INT(moe_shard_build(&one_doc, t, 1, &s, err, sizeof err), MOE_EINVAL);
    CHECK(s == NULL);
    moe_shard_free(NULL);
    moe_tokenizer_free(t);
    dt_free_small(c);
    moe_test_rmdir(dir);
}

/* Builds shard bytes: header, table, tokens. */
__attribute__((noinline)) static size_t dt_shard_bytes(unsigned char *b, const char *magic, uint32_t version,
                             uint32_t vocab, uint64_t n_tokens, uint32_t n_docs,
                             const uint64_t *off, const uint32_t *genre, int n_tab,
                             const uint32_t *tok, int n_tok) {
    size_t n = 0;
    memcpy(b, magic, 8);
    n = 8;
#define PUT(v, w)                                                                          \
    do {                                                                                   \
        for (int i_ = 0; i_ < (w); i_++) b[n++] = (unsigned char)((uint64_t)(v) >> (8 * i_)); \
    } while (0)
    PUT(version, 4);
    PUT(vocab, 4);
    PUT(n_tokens, 8);
    PUT(n_docs, 4);
    for (int i = 0; i < n_tab; i++) {
        PUT(off[i], 8);
        PUT(genre[i], 4);
    }
    for (int i = 0; i < n_tok; i++) PUT(tok[i], 4);
#undef PUT
    return n;
}

TEST(data_shard_hostile) {
    char dir[64], err[512], path[128];
    if (!moe_test_tmpdir(dir, "data")) {
        CHECK_MSG(0, "mkdtemp failed");
        return;
    }
    snprintf(path, sizeof path, "%s/s.bin", dir);
    unsigned char b[512];
    /* valid: vocab 10 (EOS 9), 2 docs: [1 2 9] [3 9] */
    uint64_t off[2] = {0, 3};
    uint32_t genre[2] = {0, 14}, tok[5] = {1, 2, 9, 3, 9};
    size_t n = dt_shard_bytes(b, "MOESHRD1", 1, 10, 5, 2, off, genre, 2, tok, 5);
    dt_write(dir, "s.bin", b, n);
    moe_shard *s = NULL;
    CHECK_EQ_INT(moe_shard_load(path, &s, err, sizeof err), 0);
    if (s) {
        CHECK(s->n_tokens == 5 && s->n_docs == 2 && s->vocab_size == 10);
        CHECK(s->doc_off[1] == 3 && s->doc_genre[1] == 14 && s->tokens[3] == 3);
        CHECK_EQ_INT(moe_shard_doc_len(s, 0), 3);
        CHECK_EQ_INT(moe_shard_doc_len(s, 1), 2);
    }
    moe_shard_free(s);

    struct {
        const char *magic;
        uint32_t version, vocab;
        uint64_t n_tokens;
        uint32_t n_docs;
        uint64_t off1;
        uint32_t genre1, tok0, tok2;
        int n_tok;   /* tokens actually written */
        int want;
        const char *what;
    } cases[] = {
        {"MOESHRD2", 1, 10, 5, 2, 3, 14, 1, 9, 5, MOE_EFORMAT, "magic"},
        {"MOESHRD1", 2, 10, 5, 2, 3, 14, 1, 9, 5, MOE_EUNSUPPORTED, "version"},
        {"MOESHRD1", 1, 0, 5, 2, 3, 14, 1, 9, 5, MOE_EFORMAT, "vocab_size"},
        {"MOESHRD1", 1, (1u << 20) + 1, 5, 2, 3, 14, 1, 9, 5, MOE_ELIMIT, "vocab_size"},
        {"MOESHRD1", 1, 10, 5, 2, 3, 14, 1, 9, 4, MOE_EFORMAT, "n_tokens"},  /* truncated */
        {"MOESHRD1", 1, 10, 6, 2, 3, 14, 1, 9, 5, MOE_EFORMAT, "n_tokens"},  /* count lies */
        {"MOESHRD1", 1, 10, UINT64_MAX / 2, 2, 3, 14, 1, 9, 5, MOE_EFORMAT, "n_tokens"},
        {"MOESHRD1", 1, 10, 5, 0xFFFFFFFFu, 3, 14, 1, 9, 5, MOE_EFORMAT, "n_docs"},
        {"MOESHRD1", 1, 10, 5, 2, 0, 14, 1, 9, 5, MOE_EFORMAT, "doc_offset"}, /* not increasing */
        {"MOESHRD1", 1, 10, 5, 2, 5, 14, 1, 9, 5, MOE_EFORMAT, "doc_offset"}, /* == n_tokens */
        {"MOESHRD1", 1, 10, 5, 2, 1ull << 62, 14, 1, 9, 5, MOE_EFORMAT, "doc_offset"},
        {"MOESHRD1", 1, 10, 5, 2, 3, 15, 1, 9, 5, MOE_EFORMAT, "doc_genre"},
        {"MOESHRD1", 1, 10, 5, 2, 3, 14, 10, 9, 5, MOE_EFORMAT, "tokens"},    /* >= vocab */
        {"MOESHRD1", 1, 10, 5, 2, 3, 14, 0xFFFFFFFFu, 9, 5, MOE_EFORMAT, "tokens"},
        {"MOESHRD1", 1, 10, 5, 2, 3, 14, 1, 8, 5, MOE_EFORMAT, "EOS"},        /* doc 0 unended */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint64_t o[2] = {0, cases[i].off1};
        uint32_t g[2] = {0, cases[i].genre1};
        uint32_t t[5] = {cases[i].tok0, 2, cases[i].tok2, 3, 9};
        n = dt_shard_bytes(b, cases[i].magic, cases[i].version, cases[i].vocab,
                           cases[i].n_tokens, cases[i].n_docs, o, g, 2, t, cases[i].n_tok);
        dt_write(dir, "s.bin", b, n);
        s = (moe_shard *)1;
        err[0] = '\0';
        int rc = moe_shard_load(path, &s, err, sizeof err);
        CHECK_MSG(rc == cases[i].want, "case %zu: %s, want %s (%s)", i, moe_err_name(rc),
                  moe_err_name(cases[i].want), err);
        CHECK(s == NULL);
        CHECK_MSG(strstr(err, "s.bin") && strstr(err, cases[i].what),
                  "case %zu: message \"%s\" lacks \"%s\"", i, err, cases[i].what);
    }
    /* last document without EOS, empty and short files, missing file */
    uint32_t t2[5] = {1, 2, 9, 3, 4};
    n = dt_shard_bytes(b, "MOESHRD1", 1, 10, 5, 2, off, genre, 2, t2, 5);
    dt_write(dir, "s.bin", b, n);
    CHECK_EQ_INT(moe_shard_load(path, &s, err, sizeof err), MOE_EFORMAT);
    dt_write(dir, "s.bin", "", 0);
    CHECK_EQ_INT(moe_shard_load(path, &s, err, sizeof err), MOE_EFORMAT);
    dt_write(dir, "s.bin", "MOESHRD1\1\0\0\0", 12);
    CHECK_EQ_INT(moe_shard_load(path, &s, err, sizeof err), MOE_EFORMAT);
    /* tokens but no documents */
    n = dt_shard_bytes(b, "MOESHRD1", 1, 10, 1, 0, NULL, NULL, 0, tok + 2, 1);
    dt_write(dir, "s.bin", b, n);
    CHECK_EQ_INT(moe_shard_load(path, &s, err, sizeof err), MOE_EFORMAT);
    /* an empty shard is well formed */
    n = dt_shard_bytes(b, "MOESHRD1", 1, 10, 0, 0, NULL, NULL, 0, NULL, 0);
    dt_write(dir, "s.bin", b, n);
    CHECK_EQ_INT(moe_shard_load(path, &s, err, sizeof err), 0);
    moe_shard_free(s);
    s = NULL;
    snprintf(path, sizeof path, "%s/missing.bin", dir);
    CHECK_EQ_INT(moe_shard_load(path, &s, err, sizeof err), MOE_ENOTFOUND);
    CHECK_EQ_INT(moe_shard_load(dir, &s, err, sizeof err), MOE_EIO);
    /* saving an inconsistent shard is refused */
    int32_t bad_tok[2] = {1, 5};
    size_t bad_off[1] = {0};
    int bad_genre[1] = {0};
    moe_shard bad = {bad_tok, 2, 1, bad_off, bad_genre, 10};
    snprintf(path, sizeof path, "%s/bad.bin", dir);
    CHECK_EQ_INT(moe_shard_save(&bad, path, err, sizeof err), MOE_EINVAL);
    CHECK(access(path, F_OK) != 0);
    moe_test_rmdir(dir);
}

TEST(data_shard_brown) {
    struct stat st;
    if (stat(moe_test_brown_dir(), &st) != 0) {
        moe_test_skip("data/brown absent (make data)");
        return;
    }
    moe_corpus *c = NULL;
    char err[512];
    CHECK_EQ_INT(moe_corpus_load_brown(moe_test_brown_dir(), &c, err, sizeof err), 0);
    if (!c) return;
    const char **texts = malloc((size_t)c->n_docs * sizeof *texts);
    size_t *lens = malloc((size_t)c->n_docs * sizeof *lens), n = 0;
    for (int i = 0; i < c->n_docs; i++)
        if (!moe_corpus_is_val(c, i)) texts[n] = c->docs[i].text, lens[n++] = c->docs[i].len;
    moe_tokenizer *t = NULL;
    CHECK_EQ_INT(moe_tokenizer_train(texts, lens, n, 1024, &t, err, sizeof err), 0);
    moe_shard *tr = NULL, *va = NULL;
    if (t) {
        CHECK_EQ_INT(moe_shard_build(c, t, 0, &tr, err, sizeof err), 0);
        CHECK_EQ_INT(moe_shard_build(c, t, 1, &va, err, sizeof err), 0);
    }
    if (tr && va) {
        CHECK_EQ_INT(tr->n_docs, 457);
        CHECK_EQ_INT(va->n_docs, 43);
        int seen[15] = {0};
        for (int i = 0; i < va->n_docs; i++) seen[va->doc_genre[i]] = 1;
        for (int g = 0; g < 15; g++) CHECK(seen[g]);
        CHECK(tr->n_tokens > 10 * va->n_tokens / 2);
    }
    moe_shard_free(tr);
    moe_shard_free(va);
    moe_tokenizer_free(t);
    free(texts);
    free(lens);
    moe_corpus_free(c);
}

/* ---- allocation failures ------------------------------------------------------ */

static long dt_fail_at = -1, dt_allocs;
static void *dt_alloc(size_t n, void *ctx) {
    (void)ctx;
    long k = __atomic_fetch_add(&dt_allocs, 1, __ATOMIC_RELAXED);
    return k == dt_fail_at ? NULL : malloc(n);
}
static void dt_free(void *p, void *ctx) {
    (void)ctx;
    free(p);
}

/* Every allocation of the corpus loader, the trainer, the tokenizer loader and
 * the shard builder fails once in turn: each call must return MOE_ENOMEM (or
 * succeed) and leak nothing (checked under ASan). */
TEST(data_alloc_failures) {
    char dir[64], err[512], path[160];
    if (!moe_test_tmpdir(dir, "data")) {
        CHECK_MSG(0, "mkdtemp failed");
        return;
    }
    dt_write_str(dir, "ca01", "\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\n\n\tIt/pps is/bez ./.\n");
    dt_write_str(dir, "ca02", "\tA/at second/od document/nn ./.\n");
    snprintf(path, sizeof path, "%s/tok.json", dir);
    moe_allocator a = {dt_alloc, dt_free, NULL};
    int saw_nomem = 0;
    for (int stage = 0; stage < 4; stage++) {
        for (long k = 0;; k++) {
            moe_corpus *c = NULL;
            moe_tokenizer *t = NULL;
            moe_shard *s = NULL;
            /* set-up outside the sweep: the earlier stages without failures */
            int rc = moe_corpus_load_brown(dir, &c, err, sizeof err);
            const char *texts[2] = {c ? c->docs[0].text : "", c ? c->docs[1].text : ""};
            size_t lens[2] = {c ? c->docs[0].len : 0, c ? c->docs[1].len : 0};
            if (!rc && stage >= 2) rc = moe_tokenizer_train(texts, lens, 2, 280, &t, err, sizeof err);
            if (!rc && stage == 2) rc = moe_tokenizer_save(t, path, err, sizeof err);
            if (rc) {
                CHECK_MSG(0, "set-up failed: %s", err);
                moe_corpus_free(c);
                moe_tokenizer_free(t);
                break;
            }
            if (stage == 0) moe_corpus_free(c), c = NULL;
            if (stage == 2) moe_tokenizer_free(t), t = NULL;
            dt_allocs = 0;
            dt_fail_at = k;
            moe_set_allocator(&a);
            moe_corpus *c2 = NULL;
            moe_tokenizer *t2 = NULL;
            switch (stage) {
            case 0: rc = moe_corpus_load_brown(dir, &c2, err, sizeof err); break;
            case 1: rc = moe_tokenizer_train(texts, lens, 2, 280, &t2, err, sizeof err); break;
            case 2: rc = moe_tokenizer_load(path, &t2, err, sizeof err); break;
            case 3: rc = moe_shard_build(c, t, 0, &s, err, sizeof err); break;
            }
            long used = dt_allocs;
            moe_set_allocator(NULL);
            dt_fail_at = -1;
            CHECK_MSG(rc == 0 || rc == MOE_ENOMEM, "stage %d, failing allocation %ld: %s (%s)",
                      stage, k, moe_err_name(rc), err);
            if (rc == MOE_ENOMEM) {
                saw_nomem = 1;
                CHECK(c2 == NULL && t2 == NULL && s == NULL);
            }
            /* objects made with the failing hooks are freed with them */
            moe_set_allocator(&a);
            moe_corpus_free(c2);
            moe_tokenizer_free(t2);
            moe_shard_free(s);
            moe_set_allocator(NULL);
            moe_corpus_free(c);
            moe_tokenizer_free(t);
            if (rc == 0 && k >= used) break; /* every allocation has failed once */
            if (k > 100000) {
                CHECK_MSG(0, "stage %d: no end", stage);
                break;
            }
        }
    }
    CHECK(saw_nomem);
    moe_test_rmdir(dir);
}

/* Random corruptions of a valid shard and random tagged text: errors, never crashes. */
TEST(data_fuzz) {
    char dir[64], err[512], path[128];
    if (!moe_test_tmpdir(dir, "data")) {
        CHECK_MSG(0, "mkdtemp failed");
        return;
    }
    snprintf(path, sizeof path, "%s/s.bin", dir);
    unsigned char orig[256], b[256];
    uint64_t off[3] = {0, 3, 5};
    uint32_t genre[3] = {0, 14, 3}, tok[7] = {1, 2, 9, 3, 9, 0, 9};
    size_t n = dt_shard_bytes(orig, "MOESHRD1", 1, 10, 7, 3, off, genre, 3, tok, 7);
    uint64_t h = 5;
    int ok = 0;
    for (int trial = 0; trial < 500; trial++) {
        memcpy(b, orig, n);
        size_t m = n;
        h = h * 6364136223846793005ULL + 1442695040888963407ULL;
        size_t at = (h >> 33) % n;
        if (trial % 4 == 3) m = at;
        else b[at] ^= (unsigned char)(1u << ((h >> 20) % 8));
        dt_write(dir, "s.bin", b, m);
        moe_shard *s = NULL;
        int rc = moe_shard_load(path, &s, err, sizeof err);
        if (rc == 0) {
            ok++;
            CHECK(s->n_docs >= 1 && s->doc_off[0] == 0 && s->tokens[s->n_tokens - 1] == s->vocab_size - 1);
            for (size_t k = 0; k < s->n_tokens; k++) CHECK(s->tokens[k] < s->vocab_size);
        } else {
            CHECK(s == NULL && strstr(err, "s.bin"));
        }
        moe_shard_free(s);
    }
    CHECK(ok < 500);
    /* random tagged-ish text */
    static const char pieces[] = "ab/ \t\n`'()./,\xc3\xa9\xff\0-hl";
    char text[600];
    for (int trial = 0; trial < 500; trial++) {
        size_t m = 0, len = (size_t)(trial % 600);
        for (; m < len; m++) {
            h = h * 6364136223846793005ULL + 1442695040888963407ULL;
            text[m] = pieces[(h >> 33) % (sizeof pieces - 1)];
        }
        char *out = NULL;
        size_t out_len = 0;
        int rc = moe_corpus_clean_brown("fuzz", text, m, &out, &out_len, err, sizeof err);
        if (rc == 0) CHECK(out && strlen(out) == out_len && out_len > 0);
        else CHECK(rc == MOE_EFORMAT && out == NULL);
        free(out);
    }
    moe_test_rmdir(dir);
}
