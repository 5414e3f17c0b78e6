/* Byte-level BPE: pre-tokeniser, training (hand-computed merges and a naive
 * reference), round trips, save/load, hostile tokenizer files, compression. */
#include "data/corpus.h"
#include "test.h"
#include "tokenizer/tokenizer.h"

#include <dirent.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- helpers --------------------------------------------------------------- */

static int tk_write(const char *path, const char *s) {
    FILE *fp = fopen(path, "wb");
    if (!fp) return -1;
    size_t n = strlen(s);
    size_t w = n ? fwrite(s, 1, n, fp) : 0;
    return fclose(fp) == 0 && w == n ? 0 : -1;
}

static uint64_t tk_rng = 0x9E3779B97F4A7C15ULL;
static uint32_t tk_rand(void) { /* xorshift64* */
    tk_rng ^= tk_rng >> 12;
    tk_rng ^= tk_rng << 25;
    tk_rng ^= tk_rng >> 27;
    return (uint32_t)((tk_rng * 0x2545F4914F6CDD1DULL) >> 32);
}

/* Trains on one NUL-terminated text. */
static moe_tokenizer *tk_train1(const char *text, int vocab) {
    const char *texts[1] = {text};
    size_t lens[1] = {strlen(text)};
    moe_tokenizer *t = NULL;
    char err[256];
    int rc = moe_tokenizer_train(texts, lens, 1, vocab, &t, err, sizeof err);
    CHECK_MSG(rc == 0, "train: %s", err);
    return t;
}

/* decode(encode(s)) == s, and the id count never exceeds the byte count. */
static int tk_roundtrip(const moe_tokenizer *t, const char *s, size_t n) {
    int32_t *ids = malloc((n + 1) * sizeof *ids);
    char *back = malloc(n + 1);
    size_t k = 0, m = 0;
    int ok = ids && back && moe_tokenizer_encode(t, s, n, ids, n, &k) == 0 && k <= n &&
             moe_tokenizer_decode(t, ids, k, back, n + 1, &m) == 0 && m == n &&
             (n == 0 || !memcmp(back, s, n));
    for (size_t i = 0; ok && i < k; i++)
        ok = ids[i] >= 0 && ids[i] < moe_tokenizer_eos(t);
    free(ids);
    free(back);
    return ok;
}

/* Pseudo-English: words drawn with a Zipf-like law from a fixed made-up
 * vocabulary, sentences with punctuation, paragraphs. */
static char *tk_synthetic(size_t bytes, uint64_t seed) {
    static const char *syl[] = {"ka", "to", "re", "mi", "lan", "dor", "the", "ing", "es",
                                "al",  "por", "vi", "sun", "ed", "ter", "on", "qu", "is"};
    char words[300][16];
    for (int w = 0; w < 300; w++) {
        uint64_t h = (uint64_t)w * 0x9E3779B97F4A7C15ULL + 7;
        int ns = 1 + (int)(h >> 60) % 3, len = 0;
        for (int s = 0; s < ns; s++) {
            const char *p = syl[(h >> (8 * s + 8)) % 18];
            memcpy(words[w] + len, p, strlen(p));
            len += (int)strlen(p);
        }
        words[w][len] = '\0';
    }
    tk_rng = seed;
    char *out = malloc(bytes + 64);
    size_t n = 0;
    int in_sentence = 0;
    while (n < bytes) {
        /* Zipf-ish: index = 300^u - 1 */
        double u = (tk_rand() & 0xFFFFFF) / (double)0x1000000;
        int w = (int)(exp(u * log(300.0))) - 1;
        if (w < 0) w = 0;
        if (w > 299) w = 299;
        const char *word = words[w];
        if (!in_sentence) {
            if (n) out[n++] = ' ';
            out[n++] = (char)(word[0] - 'a' + 'A');
            word++;
            in_sentence = 1;
        } else {
            out[n++] = ' ';
        }
        size_t l = strlen(word);
        memcpy(out + n, word, l);
        n += l;
        uint32_t r = tk_rand() % 100;
        if (r < 8) out[n++] = ',';
        else if (r < 16) {
            out[n++] = '.';
            in_sentence = 0;
            if (tk_rand() % 5 == 0) out[n++] = '\n', out[n++] = '\n';
        }
    }
    out[n] = '\0';
    return out;
}

/* ---- pre-tokeniser --------------------------------------------------------- */

/* Chunks of s joined with '|'. */
static void tk_chunks(const char *s, char *out) {
    size_t n = strlen(s), o = 0;
    for (size_t i = 0; i < n;) {
        size_t j = moe__bpe_chunk_end((const unsigned char *)s, n, i);
        if (i) out[o++] = '|';
        memcpy(out + o, s + i, j - i);
        o += j - i;
        i = j;
    }
    out[o] = '\0';
}

/* 0 whitespace, 1 letter (ASCII or >= 0x80), 2 digit, 3 other */
static int tk_class(unsigned char c) {
    if (strchr(" \t\n\r\v\f", c) && c) return 0;
    if ((c | 32) >= 'a' && (c | 32) <= 'z') return 1;
    if (c >= 0x80) return 1;
    if (c >= '0' && c <= '9') return 2;
    return 3;
}

TEST(tokenizer_pretokenize) {
    static const struct { const char *in, *want; } cases[] = {
        {"Hello world", "Hello| world"},
        {"a  b", "a| | b"},
        {"x\n\ny", "x|\n\n|y"},
        {"x\n y", "x|\n| y"},
        {"it's 42!!", "it|'|s| 42|!!"},
        {" \t x", " \t| x"},
        {"a   ", "a|   "},
        {"caf\xc3\xa9 au lait", "caf\xc3\xa9| au| lait"},
        {"x=1+22;", "x|=|1|+|22|;"},
        {" (hi)", " (|hi|)"},
        {"", ""},
    };
    char out[256];
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tk_chunks(cases[i].in, out);
        CHECK_MSG(!strcmp(out, cases[i].want), "case %zu: got \"%s\" want \"%s\"", i, out,
                  cases[i].want);
    }
    /* Against a direct transcription of the rules (scan the whole run, then cut). */
    tk_rng = 99;
    unsigned char r[400];
    for (int trial = 0; trial < 300; trial++) {
        size_t n = tk_rand() % sizeof r;
        for (size_t i = 0; i < n; i++) {
            uint32_t x = tk_rand() % 100;
            r[i] = x < 50 ? ' ' : x < 60 ? '\n' : x < 80 ? 'a' : x < 85 ? '7' : x < 90 ? '!' : 0xC3;
        }
        for (size_t i = 0; i < n;) {
            size_t j = moe__bpe_chunk_end(r, n, i), e;
            int c0 = tk_class(r[i]);
            if (r[i] == ' ' && i + 1 < n && tk_class(r[i + 1]) != 0) {
                for (e = i + 2; e < n && tk_class(r[e]) == tk_class(r[i + 1]); e++) {}
            } else if (c0 == 0) {
                for (e = i + 1; e < n && tk_class(r[e]) == 0; e++) {}
                if (e < n && e - i >= 2 && r[e - 1] == ' ') e--;
            } else {
                for (e = i + 1; e < n && tk_class(r[e]) == c0; e++) {}
            }
            if (e - i > MOE_TOKENIZER_MAX_CHUNK) e = i + MOE_TOKENIZER_MAX_CHUNK;
            if (j != e) {
                CHECK_MSG(0, "trial %d at %zu: chunk end %zu, want %zu", trial, i, j, e);
                trial = 1 << 30;
                break;
            }
            i = j;
        }
    }
    /* Long runs are cut at MOE_TOKENIZER_MAX_CHUNK bytes. */
    char run[200];
    memset(run, 'a', 150);
    CHECK_EQ_INT(moe__bpe_chunk_end((const unsigned char *)run, 150, 0), MOE_TOKENIZER_MAX_CHUNK);
    CHECK_EQ_INT(moe__bpe_chunk_end((const unsigned char *)run, 150, 128), 150);
}

/* ---- training -------------------------------------------------------------- */

static void tk_check_merges(const moe_tokenizer *t, const int32_t (*want)[2], int n) {
    CHECK_EQ_INT(moe_tokenizer_n_merges(t), n);
    for (int r = 0; r < n && r < moe_tokenizer_n_merges(t); r++) {
        int32_t a = -1, b = -1;
        CHECK_EQ_INT(moe_tokenizer_merge(t, r, &a, &b), 0);
        CHECK_MSG(a == want[r][0] && b == want[r][1], "merge %d: [%d,%d], want [%d,%d]", r,
                  (int)a, (int)b, (int)want[r][0], (int)want[r][1]);
    }
}

TEST(tokenizer_train_first_merges) {
    /* Chunks "aaab", " aab", " ab". Pair counts: (a,a) 3, (a,b) 3, ( ,a) 2: the
     * tie goes to the smaller pair (97,97) -> 256. Then "aaab" = [256 a b],
     * " aab" = [_ 256 b], " ab" = [_ a b]: (a,b) 2 -> 257. Then every pair
     * occurs once: the smallest, (32,256), -> 258. */
    moe_tokenizer *t = tk_train1("aaab aab ab", 260);
    if (!t) return;
    static const int32_t want[3][2] = {{97, 97}, {97, 98}, {32, 256}};
    tk_check_merges(t, want, 3);
    CHECK_EQ_INT(moe_tokenizer_vocab_size(t), 260);
    CHECK_EQ_INT(moe_tokenizer_eos(t), 259);
    size_t len = 0;
    const char *p = moe_tokenizer_piece(t, 258, &len);
    CHECK(p && len == 3 && !memcmp(p, " aa", 3));
    int32_t ids[16];
    size_t n = 0;
    CHECK_EQ_INT(moe_tokenizer_encode(t, "aaab aab ab", 11, ids, 16, &n), 0);
    /* "aaab" -> [256 257]; " aab" -> [258 b]; " ab" -> [_ 257] */
    static const int32_t want_ids[] = {256, 257, 258, 98, 32, 257};
    CHECK_EQ_INT(n, 6);
    for (size_t i = 0; i < n && i < 6; i++) CHECK_EQ_INT(ids[i], want_ids[i]);
    moe_tokenizer_free(t);

    /* Overlapping pairs: "aaaa" has (a,a) three times but merges into two. */
    t = tk_train1("aaaa", 300);
    if (!t) return;
    static const int32_t want2[2][2] = {{97, 97}, {256, 256}};
    tk_check_merges(t, want2, 2); /* then no pair is left: vocab shrinks */
    CHECK_EQ_INT(moe_tokenizer_vocab_size(t), 259);
    CHECK_EQ_INT(moe_tokenizer_encode(t, "aaaaa", 5, ids, 16, &n), 0);
    CHECK_EQ_INT(n, 2);
    CHECK_EQ_INT(ids[0], 257);
    CHECK_EQ_INT(ids[1], 97);
    moe_tokenizer_free(t);
}

/* Naive BPE with a full recount per merge, for cross-checking. */
static int tk_naive(const char *const *texts, const size_t *lens, int nt, int n_merges,
                    int32_t (*out)[2]) {
    /* every chunk as its own word (duplicates are fine: counts add up) */
    int32_t *sym = malloc(200000 * sizeof *sym);
    int *wstart = malloc(50000 * sizeof *wstart), *wlen = malloc(50000 * sizeof *wlen);
    int nw = 0, ns = 0;
    for (int ti = 0; ti < nt; ti++)
        for (size_t i = 0; i < lens[ti];) {
            size_t j = moe__bpe_chunk_end((const unsigned char *)texts[ti], lens[ti], i);
            wstart[nw] = ns;
            wlen[nw] = (int)(j - i);
            for (size_t k = i; k < j; k++) sym[ns++] = (unsigned char)texts[ti][k];
            nw++;
            i = j;
        }
    int done = 0;
    int64_t *cnt = malloc(sizeof(int64_t) * 512 * 512);
    for (; done < n_merges; done++) {
        int V = 256 + done;
        memset(cnt, 0, sizeof(int64_t) * 512 * 512);
        for (int w = 0; w < nw; w++)
            for (int k = 0; k + 1 < wlen[w]; k++)
                cnt[sym[wstart[w] + k] * 512 + sym[wstart[w] + k + 1]]++;
        int64_t best = 0;
        int ba = -1, bb = -1;
        for (int a = 0; a < V; a++)
            for (int b = 0; b < V; b++)
                if (cnt[a * 512 + b] > best) best = cnt[a * 512 + b], ba = a, bb = b;
        if (best == 0) break;
        out[done][0] = ba;
        out[done][1] = bb;
        for (int w = 0; w < nw; w++) {
            int32_t *s = sym + wstart[w];
            int o = 0;
            for (int k = 0; k < wlen[w];) {
                if (k + 1 < wlen[w] && s[k] == ba && s[k + 1] == bb) s[o++] = V, k += 2;
                else s[o++] = s[k++];
            }
            wlen[w] = o;
        }
    }
    free(cnt);
    free(sym);
    free(wstart);
    free(wlen);
    return done;
}

TEST(tokenizer_train_matches_naive) {
    /* Small alphabets force many ties and overlapping pairs. */
    static const char alpha[] = "aab  b\nc.";
    for (int trial = 0; trial < 6; trial++) {
        tk_rng = 1000 + (uint64_t)trial;
        char texts_buf[3][1500];
        const char *texts[3];
        size_t lens[3];
        for (int ti = 0; ti < 3; ti++) {
            size_t n = 200 + tk_rand() % 1200;
            for (size_t i = 0; i < n; i++)
                texts_buf[ti][i] = trial % 2 ? alpha[tk_rand() % (sizeof alpha - 1)]
                                             : (char)('a' + tk_rand() % 3);
            texts[ti] = texts_buf[ti];
            lens[ti] = n;
        }
        int32_t want[200][2];
        int nw = tk_naive(texts, lens, 3, 200, want);
        moe_tokenizer *t = NULL;
        char err[256];
        CHECK_EQ_INT(moe_tokenizer_train(texts, lens, 3, 257 + 200, &t, err, sizeof err), 0);
        if (!t) continue;
        CHECK_MSG(moe_tokenizer_n_merges(t) == nw, "trial %d: %d merges, naive %d", trial,
                  moe_tokenizer_n_merges(t), nw);
        for (int r = 0; r < nw && r < moe_tokenizer_n_merges(t); r++) {
            int32_t a, b;
            moe_tokenizer_merge(t, r, &a, &b);
            if (a != want[r][0] || b != want[r][1]) {
                CHECK_MSG(0, "trial %d merge %d: [%d,%d], naive [%d,%d]", trial, r, (int)a,
                          (int)b, (int)want[r][0], (int)want[r][1]);
                break;
            }
        }
        for (int ti = 0; ti < 3; ti++) CHECK(tk_roundtrip(t, texts[ti], lens[ti]));
        moe_tokenizer_free(t);
    }
}

TEST(tokenizer_train_deterministic) {
    char *a = tk_synthetic(20000, 1), *b = tk_synthetic(20000, 2), *c = tk_synthetic(5000, 3);
    const char *t1[3] = {a, b, c}, *t2[3] = {c, a, b};
    size_t l1[3] = {strlen(a), strlen(b), strlen(c)}, l2[3] = {l1[2], l1[0], l1[1]};
    moe_tokenizer *x = NULL, *y = NULL;
    char err[256];
    CHECK_EQ_INT(moe_tokenizer_train(t1, l1, 3, 700, &x, err, sizeof err), 0);
    CHECK_EQ_INT(moe_tokenizer_train(t2, l2, 3, 700, &y, err, sizeof err), 0);
    if (x && y) {
        CHECK_EQ_INT(moe_tokenizer_n_merges(x), moe_tokenizer_n_merges(y));
        int same = 1;
        for (int r = 0; r < moe_tokenizer_n_merges(x) && same; r++) {
            int32_t a1, b1, a2, b2;
            moe_tokenizer_merge(x, r, &a1, &b1);
            moe_tokenizer_merge(y, r, &a2, &b2);
            same = a1 == a2 && b1 == b2;
        }
        CHECK_MSG(same, "text order changed the merges");
    }
    moe_tokenizer_free(x);
    moe_tokenizer_free(y);
    free(a), free(b), free(c);
}

TEST(tokenizer_train_args) {
    moe_tokenizer *t = (moe_tokenizer *)1;
    char err[256];
    const char *texts[1] = {"abc"};
    size_t lens[1] = {3};
    CHECK_EQ_INT(moe_tokenizer_train(texts, lens, 1, 256, &t, err, sizeof err), MOE_EINVAL);
    CHECK(t == NULL);
    CHECK_EQ_INT(moe_tokenizer_train(texts, lens, 1, MOE_TOKENIZER_MAX_VOCAB + 1, &t, err,
                                     sizeof err),
                 MOE_ELIMIT);
    CHECK_EQ_INT(moe_tokenizer_train(texts, lens, 1, 300, NULL, err, sizeof err), MOE_EINVAL);
    CHECK_EQ_INT(moe_tokenizer_train(NULL, lens, 1, 300, &t, err, sizeof err), MOE_EINVAL);
    /* No text: only the bytes and EOS. */
    CHECK_EQ_INT(moe_tokenizer_train(NULL, NULL, 0, 300, &t, err, sizeof err), 0);
    CHECK_EQ_INT(moe_tokenizer_vocab_size(t), 257);
    CHECK(tk_roundtrip(t, "hello", 5));
    int32_t ids[4];
    size_t n;
    CHECK_EQ_INT(moe_tokenizer_encode(NULL, "a", 1, ids, 4, &n), MOE_EINVAL);
    CHECK_EQ_INT(moe_tokenizer_encode(t, NULL, 1, ids, 4, &n), MOE_EINVAL);
    CHECK_EQ_INT(moe_tokenizer_encode(t, "a", 1, NULL, 4, &n), MOE_EINVAL);
    CHECK_EQ_INT(moe_tokenizer_encode(t, NULL, 0, NULL, 0, &n), 0);
    CHECK_EQ_INT(n, 0);
    moe_tokenizer_free(t);
    moe_tokenizer_free(NULL);
}

/* ---- encode / decode ------------------------------------------------------- */

TEST(tokenizer_roundtrip_random_bytes) {
    char *text = tk_synthetic(60000, 7);
    moe_tokenizer *t = tk_train1(text, 1000);
    free(text);
    if (!t) return;
    tk_rng = 42;
    char buf[5000];
    int bad = 0;
    for (int trial = 0; trial < 400 && !bad; trial++) {
        size_t n = trial == 0 ? 0 : tk_rand() % sizeof buf;
        int mode = trial % 5;
        for (size_t i = 0; i < n; i++) {
            uint32_t r = tk_rand();
            switch (mode) {
            case 0: buf[i] = (char)r; break;                             /* any byte, NUL too */
            case 1: buf[i] = " \t\n"[r % 3]; break;                      /* whitespace runs */
            case 2: buf[i] = r % 7 ? ' ' : (char)('a' + r % 26); break; /* long space runs */
            case 3: buf[i] = (char)(0x80 | (r & 0x7f)); break;           /* invalid UTF-8 */
            default: buf[i] = "ab \0\xff\xc3\xa9."[r % 8]; break;
            }
        }
        if (!tk_roundtrip(t, buf, n)) {
            CHECK_MSG(0, "round trip failed: trial %d, mode %d, %zu bytes", trial, mode, n);
            bad = 1;
        }
    }
    /* A megabyte of spaces and one of a single letter. */
    size_t big = 1 << 20;
    char *s = malloc(big);
    memset(s, ' ', big);
    CHECK(tk_roundtrip(t, s, big));
    memset(s, 'a', big);
    CHECK(tk_roundtrip(t, s, big));
    free(s);
    moe_tokenizer_free(t);
}

TEST(tokenizer_roundtrip_text_and_limits) {
    char *text = tk_synthetic(60000, 11);
    moe_tokenizer *t = tk_train1(text, 600);
    if (!t) {
        free(text);
        return;
    }
    const char *samples[] = {
        "The jury said \"no\".",
        "  leading spaces, trailing spaces  ",
        "tabs\tand\nnewlines\r\n\n\nend",
        "UTF-8: na\xc3\xafve caf\xc3\xa9 \xe2\x80\x94 \xf0\x9f\x98\x80!",
        "<|endoftext|>",
        "1234567890 3.14159 x=y+z",
    };
    for (size_t i = 0; i < sizeof samples / sizeof samples[0]; i++)
        CHECK_MSG(tk_roundtrip(t, samples[i], strlen(samples[i])), "sample %zu", i);
    CHECK(tk_roundtrip(t, text, strlen(text)));

    /* cap too small: MOE_ELIMIT with the needed count; ids[0..cap) still filled */
    const char *s = samples[0];
    size_t len = strlen(s), need = 0, n2 = 0;
    CHECK_EQ_INT(moe_tokenizer_encode(t, s, len, NULL, 0, &need), MOE_ELIMIT);
    CHECK(need > 1 && need <= len);
    int32_t full[64], part[64];
    CHECK_EQ_INT(moe_tokenizer_encode(t, s, len, full, 64, &n2), 0);
    CHECK_EQ_INT(n2, need);
    CHECK_EQ_INT(moe_tokenizer_encode(t, s, len, part, need - 1, &n2), MOE_ELIMIT);
    CHECK_EQ_INT(n2, need);
    CHECK(!memcmp(full, part, (need - 1) * sizeof *part));

    /* decode: cap too small, NUL appended when room, EOS yields nothing */
    char out[64];
    size_t m = 0;
    CHECK_EQ_INT(moe_tokenizer_decode(t, full, need, out, 5, &m), MOE_ELIMIT);
    CHECK_EQ_INT(m, len);
    memset(out, 'x', sizeof out);
    CHECK_EQ_INT(moe_tokenizer_decode(t, full, need, out, sizeof out, &m), 0);
    CHECK(m == len && out[len] == '\0' && !strcmp(out, s));
    int32_t eos = moe_tokenizer_eos(t);
    int32_t with_eos[3] = {'h', eos, 'i'};
    CHECK_EQ_INT(moe_tokenizer_decode(t, with_eos, 3, out, sizeof out, &m), 0);
    CHECK(m == 2 && !memcmp(out, "hi", 2));
    size_t pl = 0;
    const char *piece = moe_tokenizer_piece(t, eos, &pl);
    CHECK(piece && pl == 13 && !memcmp(piece, "<|endoftext|>", 13));
    CHECK(moe_tokenizer_piece(t, eos + 1, &pl) == NULL);
    CHECK(moe_tokenizer_piece(t, -1, &pl) == NULL);
    int32_t bad_ids[2] = {'a', eos + 1};
    CHECK_EQ_INT(moe_tokenizer_decode(t, bad_ids, 2, out, sizeof out, &m), MOE_EINVAL);
    bad_ids[1] = -5;
    CHECK_EQ_INT(moe_tokenizer_decode(t, bad_ids, 2, out, sizeof out, &m), MOE_EINVAL);

    /* encode never produces EOS, even from its text */
    int32_t ids[64];
    size_t n = 0;
    CHECK_EQ_INT(moe_tokenizer_encode(t, "<|endoftext|>", 13, ids, 64, &n), 0);
    for (size_t i = 0; i < n; i++) CHECK(ids[i] != eos);
    free(text);
    moe_tokenizer_free(t);
}

TEST(tokenizer_compression_synthetic) {
    char *train = tk_synthetic(400000, 21), *held = tk_synthetic(100000, 22);
    moe_tokenizer *t = tk_train1(train, 512);
    if (t) {
        CHECK_EQ_INT(moe_tokenizer_vocab_size(t), 512);
        size_t len = strlen(held), n = 0;
        int32_t *ids = malloc(len * sizeof *ids);
        CHECK_EQ_INT(moe_tokenizer_encode(t, held, len, ids, len, &n), 0);
        double ratio = (double)len / (double)n;
        CHECK_MSG(ratio > 2.0, "held-out compression %.3f bytes/token <= 2", ratio);
        CHECK(tk_roundtrip(t, held, len));
        free(ids);
    }
    moe_tokenizer_free(t);
    free(train);
    free(held);
}

/* ---- save / load ----------------------------------------------------------- */

TEST(tokenizer_save_load_roundtrip) {
    char dir[64];
    if (!moe_test_tmpdir(dir, "tok")) {
        CHECK_MSG(0, "mkdtemp failed");
        return;
    }
    char *text = tk_synthetic(50000, 31);
    moe_tokenizer *t = tk_train1(text, 900), *u = NULL;
    char path[128], err[512];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    if (t) {
        CHECK_EQ_INT(moe_tokenizer_save(t, path, err, sizeof err), 0);
        CHECK_EQ_INT(moe_test_count_entries(dir), 1); /* no temporary file left */
        CHECK_EQ_INT(moe_tokenizer_load(path, &u, err, sizeof err), 0);
    }
    if (t && u) {
        int vs = moe_tokenizer_vocab_size(t);
        CHECK(vs > 600);
        CHECK_EQ_INT(moe_tokenizer_vocab_size(u), vs);
        CHECK_EQ_INT(moe_tokenizer_eos(u), vs - 1);
        for (int id = 0; id < vs; id++) {
            size_t l1, l2;
            const char *p1 = moe_tokenizer_piece(t, id, &l1), *p2 = moe_tokenizer_piece(u, id, &l2);
            if (!p1 || !p2 || l1 != l2 || memcmp(p1, p2, l1)) {
                CHECK_MSG(0, "piece %d differs", id);
                break;
            }
        }
        tk_rng = 5;
        char buf[3000];
        int32_t a[3000], b[3000];
        for (int trial = 0; trial < 50; trial++) {
            size_t n = tk_rand() % sizeof buf, na, nb;
            for (size_t i = 0; i < n; i++)
                buf[i] = trial % 2 ? (char)tk_rand() : text[(tk_rand() % 40000) + i % 50];
            CHECK_EQ_INT(moe_tokenizer_encode(t, buf, n, a, 3000, &na), 0);
            CHECK_EQ_INT(moe_tokenizer_encode(u, buf, n, b, 3000, &nb), 0);
            CHECK(na == nb && !memcmp(a, b, na * sizeof *a));
        }
        /* saving again over the file replaces it */
        CHECK_EQ_INT(moe_tokenizer_save(u, path, err, sizeof err), 0);
        CHECK_EQ_INT(moe_test_count_entries(dir), 1);
    }
    moe_tokenizer_free(t);
    moe_tokenizer_free(u);
    free(text);
    moe_test_rmdir(dir);
}

/* Writes s to dir/name and loads it; returns the code, err gets the message. */
static int tk_load_str(const char *dir, const char *s, char *err, size_t errsz) {
    char path[128];
    snprintf(path, sizeof path, "%s/t.json", dir);
    if (tk_write(path, s)) return 999;
    moe_tokenizer *t = (moe_tokenizer *)1;
    int rc = moe_tokenizer_load(path, &t, err, errsz);
    if (rc) CHECK(t == NULL);
    moe_tokenizer_free(rc ? NULL : t);
    return rc;
}

TEST(tokenizer_load_hostile) {
    char dir[64];
    if (!moe_test_tmpdir(dir, "tok")) {
        CHECK_MSG(0, "mkdtemp failed");
        return;
    }
    char err[512];
    const char *sp = "\"special\":{\"<|endoftext|>\":";
    char ok[512];
    snprintf(ok, sizeof ok,
             "{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":259,"
             "\"merges\":[[97,98],[256,99]],%s258}}",
             sp);
    CHECK_EQ_INT(tk_load_str(dir, ok, err, sizeof err), 0);

    static const struct { const char *json; int want; const char *field; } cases[] = {
        {"", MOE_EFORMAT, "JSON"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":259,\"merges\":[[97,98],[2",
         MOE_EFORMAT, "JSON"}, /* truncated */
        {"[]", MOE_EFORMAT, "object"},
        {"{\"type\":\"gpt2\",\"version\":1,\"vocab_size\":257,\"merges\":[],"
         "\"special\":{\"<|endoftext|>\":256}}", MOE_EFORMAT, "type"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":2,\"vocab_size\":257,\"merges\":[],"
         "\"special\":{\"<|endoftext|>\":256}}", MOE_EUNSUPPORTED, "version"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"merges\":[],"
         "\"special\":{\"<|endoftext|>\":256}}", MOE_EFORMAT, "vocab_size"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":2000000,\"merges\":[],"
         "\"special\":{\"<|endoftext|>\":1999999}}", MOE_ELIMIT, "vocab_size"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":1e300,\"merges\":[],"
         "\"special\":{\"<|endoftext|>\":1}}", MOE_EFORMAT, "vocab_size"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":100,\"merges\":[],"
         "\"special\":{\"<|endoftext|>\":99}}", MOE_EFORMAT, "vocab_size"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":260,"
         "\"merges\":[[97,98],[256,99]],\"special\":{\"<|endoftext|>\":259}}", MOE_EFORMAT,
         "merges"}, /* wrong count */
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":259,"
         "\"merges\":[[97,98],[257,99]],\"special\":{\"<|endoftext|>\":258}}", MOE_EFORMAT,
         "merges"}, /* refers to its own (later) id */
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":258,"
         "\"merges\":[[97,300]],\"special\":{\"<|endoftext|>\":257}}", MOE_EFORMAT, "merges"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":258,"
         "\"merges\":[[-1,3]],\"special\":{\"<|endoftext|>\":257}}", MOE_EFORMAT, "merges"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":258,"
         "\"merges\":[[97.5,3]],\"special\":{\"<|endoftext|>\":257}}", MOE_EFORMAT, "merges"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":258,"
         "\"merges\":[[\"a\",\"b\"]],\"special\":{\"<|endoftext|>\":257}}", MOE_EFORMAT,
         "merges"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":258,"
         "\"merges\":[[97,98,99]],\"special\":{\"<|endoftext|>\":257}}", MOE_EFORMAT, "merges"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":259,"
         "\"merges\":[[97,98],[97,98]],\"special\":{\"<|endoftext|>\":258}}", MOE_EFORMAT,
         "duplicate"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":258,"
         "\"merges\":{\"a\":1},\"special\":{\"<|endoftext|>\":257}}", MOE_EFORMAT, "merges"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":257,\"merges\":[]}",
         MOE_EFORMAT, "special"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":257,\"merges\":[],"
         "\"special\":{\"<|endoftext|>\":3}}", MOE_EFORMAT, "special"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":257,\"merges\":[],"
         "\"special\":{\"<|endoftext|>\":256,\"<|pad|>\":257}}", MOE_EFORMAT, "special"},
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"version\":1,\"vocab_size\":257,"
         "\"merges\":[],\"special\":{\"<|endoftext|>\":256}}", MOE_EFORMAT, "duplicate"},
        /* doubling chain: 2, 4, ..., 128 bytes > MOE_TOKENIZER_MAX_CHUNK */
        {"{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":264,\"merges\":[[97,97],"
         "[256,256],[257,257],[258,258],[259,259],[260,260],[261,261]],"
         "\"special\":{\"<|endoftext|>\":263}}", MOE_EFORMAT, "merges"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        err[0] = '\0';
        int rc = tk_load_str(dir, cases[i].json, err, sizeof err);
        CHECK_MSG(rc == cases[i].want, "case %zu: %s, want %s (%s)", i, moe_err_name(rc),
                  moe_err_name(cases[i].want), err);
        CHECK_MSG(strstr(err, "t.json") && strstr(err, cases[i].field),
                  "case %zu: message \"%s\" lacks the file or \"%s\"", i, err, cases[i].field);
    }
    /* the 64-byte chain is still accepted */
    CHECK_EQ_INT(tk_load_str(dir,
                             "{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":263,"
                             "\"merges\":[[97,97],[256,256],[257,257],[258,258],[259,259],"
                             "[260,260]],\"special\":{\"<|endoftext|>\":262}}",
                             err, sizeof err),
                 0);

    /* missing file, a directory, a file over the size cap (sparse) */
    char path[128];
    moe_tokenizer *t = NULL;
    snprintf(path, sizeof path, "%s/missing.json", dir);
    CHECK_EQ_INT(moe_tokenizer_load(path, &t, err, sizeof err), MOE_ENOTFOUND);
    CHECK(strstr(err, "missing.json") != NULL);
    CHECK_EQ_INT(moe_tokenizer_load(dir, &t, err, sizeof err), MOE_EIO);
    snprintf(path, sizeof path, "%s/big.json", dir);
    FILE *fp = fopen(path, "wb");
    if (fp) {
        CHECK(ftruncate(fileno(fp), (off_t)MOE_TOKENIZER_MAX_FILE + 1) == 0);
        fclose(fp);
        CHECK_EQ_INT(moe_tokenizer_load(path, &t, err, sizeof err), MOE_ELIMIT);
    }
    CHECK(t == NULL);
    CHECK_EQ_INT(moe_tokenizer_load(NULL, &t, err, sizeof err), MOE_EINVAL);
    moe_test_rmdir(dir);
}

/* ---- the real corpus (skipped when data/brown is absent) -------------------- */

TEST(tokenizer_brown_4096) {
    const char *dir = moe_test_brown_dir();
    struct stat st;
    if (stat(dir, &st) != 0) {
        moe_test_skip("data/brown absent (make data)");
        return;
    }
    char err[512];
    moe_corpus *c = NULL;
    int rc = moe_corpus_load_brown(dir, &c, err, sizeof err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc) return;
    const char **texts = malloc((size_t)c->n_docs * sizeof *texts);
    size_t *lens = malloc((size_t)c->n_docs * sizeof *lens), n = 0;
    for (int i = 0; i < c->n_docs; i++)
        if (!moe_corpus_is_val(c, i)) texts[n] = c->docs[i].text, lens[n++] = c->docs[i].len;
    moe_tokenizer *t = NULL;
    CHECK_EQ_INT(moe_tokenizer_train(texts, lens, n, 4096, &t, err, sizeof err), 0);
    if (t) {
        CHECK_EQ_INT(moe_tokenizer_vocab_size(t), 4096);
        size_t bytes = 0, tokens = 0;
        for (int i = 0; i < c->n_docs; i++) {
            if (!moe_corpus_is_val(c, i)) continue;
            size_t k = 0;
            moe_tokenizer_encode(t, c->docs[i].text, c->docs[i].len, NULL, 0, &k);
            bytes += c->docs[i].len;
            tokens += k;
            CHECK(tk_roundtrip(t, c->docs[i].text, c->docs[i].len));
        }
        double ratio = (double)bytes / (double)tokens;
        CHECK_MSG(ratio > 3.0, "validation compression %.3f bytes/token", ratio);
    }
    moe_tokenizer_free(t);
    free(texts);
    free(lens);
    moe_corpus_free(c);
}

/* Random corruptions of a valid file: the loader returns an error or a
 * tokenizer that still round-trips; it never crashes (run under ASan). */
TEST(tokenizer_load_fuzz) {
    char dir[64], err[512], path[128];
    if (!moe_test_tmpdir(dir, "tok")) {
        CHECK_MSG(0, "mkdtemp failed");
        return;
    }
    snprintf(path, sizeof path, "%s/t.json", dir);
    char *text = tk_synthetic(8000, 77);
    moe_tokenizer *t = tk_train1(text, 320);
    free(text);
    if (!t || moe_tokenizer_save(t, path, err, sizeof err)) {
        moe_tokenizer_free(t);
        moe_test_rmdir(dir);
        return;
    }
    moe_tokenizer_free(t);
    FILE *fp = fopen(path, "rb");
    char orig[8192], buf[8192];
    size_t n = fread(orig, 1, sizeof orig, fp);
    fclose(fp);
    tk_rng = 123;
    static const char alphabet[] = "[]{},:\"0123456789-.e ";
    int loaded = 0;
    for (int trial = 0; trial < 400; trial++) {
        memcpy(buf, orig, n);
        size_t m = n;
        int edits = 1 + (int)(tk_rand() % 3);
        for (int e = 0; e < edits; e++) {
            size_t at = tk_rand() % m;
            switch (tk_rand() % 3) {
            case 0: buf[at] = alphabet[tk_rand() % (sizeof alphabet - 1)]; break;
            case 1: m = at; break;                         /* truncate */
            default: buf[at] = (char)tk_rand(); break;     /* any byte */
            }
            if (m == 0) break;
        }
        fp = fopen(path, "wb");
        fwrite(buf, 1, m, fp);
        fclose(fp);
        moe_tokenizer *u = NULL;
        int rc = moe_tokenizer_load(path, &u, err, sizeof err);
        if (rc == 0) {
            loaded++;
            CHECK(tk_roundtrip(u, "The quick brown fox, 1234!", 26));
        } else {
            CHECK(u == NULL && strstr(err, "t.json"));
        }
        moe_tokenizer_free(u);
    }
    CHECK(loaded < 400);
    moe_test_rmdir(dir);
}
