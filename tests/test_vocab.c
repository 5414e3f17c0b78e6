/* GGUF tokenizers (src/tokenizer/vocab.h): golden ids from llama.cpp's
 * llama-tokenize for the tiny vocabs in tests/data and for the real shared
 * vocabs (skipped when absent), piece round trips, hostile metadata, invalid
 * input, and the Unicode table. */
#include "io/gguf.h"
#include "test.h"
#include "tokenizer/unicode.h"
#include "tokenizer/vocab.h"
#include "tokenizer/vocab_impl.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *vocab_dir(void) {
    const char *d = getenv("MOE_GGUF_VOCAB_DIR");
    return d && *d ? d : "/work/shared/data";
}

static moe_vocab *open_vocab(const char *path) {
    char err[512] = "";
    moe__gguf *g = NULL;
    moe_vocab *v = NULL;
    int rc = moe__gguf_open(path, &g, err, sizeof err);
    if (!rc) rc = moe_vocab_from_gguf(g, &v, err, sizeof err);
    moe__gguf_close(g);
    CHECK_MSG(rc == 0, "%s: %s", path, err);
    return v;
}

/* Encodes into a malloc'd array (NULL on error; *n = count). */
static int32_t *encode(const moe_vocab *v, const char *s, size_t len, int special, size_t *n, int *rc_out) {
    size_t need = 0;
    int rc = moe_vocab_encode(v, s, len, special, NULL, 0, &need);
    int32_t *ids = NULL;
    if (rc == MOE_ELIMIT || rc == 0) {
        ids = malloc((need + 1) * sizeof *ids);
        rc = moe_vocab_encode(v, s, len, special, ids, need, n);
    }
    if (rc_out) *rc_out = rc;
    if (rc) {
        free(ids);
        return NULL;
    }
    return ids;
}

static int hexval(int c) { return c <= '9' ? c - '0' : (c | 32) - 'a' + 10; }

/* "1 2 3" or "-" into ids; returns the count. */
static size_t parse_ids(char *s, int32_t *ids, size_t cap) {
    size_t n = 0;
    if (!strcmp(s, "-")) return 0;
    for (char *t = strtok(s, " "); t && n < cap; t = strtok(NULL, " ")) ids[n++] = (int32_t)atol(t);
    return n;
}

static void fmt_ids(const int32_t *ids, size_t n, char *buf, size_t cap) {
    size_t p = 0;
    buf[0] = '\0';
    for (size_t i = 0; i < n && p + 12 < cap; i++) p += (size_t)snprintf(buf + p, cap - p, "%s%d", i ? " " : "", ids[i]);
}

/* Checks every case of the golden file's section for vocab `name` (opened
 * from dir); returns the number of cases checked, -1 when the file or the
 * vocab is absent. */
static int check_golden(const char *golden, const char *dir, const char *name) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", moe_test_data_dir(), golden);
    FILE *f = fopen(path, "r");
    CHECK_MSG(f != NULL, "cannot open %s", path);
    if (!f) return -1;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (access(path, R_OK) != 0) {
        fclose(f);
        return -1;
    }
    moe_vocab *v = open_vocab(path);
    if (!v) {
        fclose(f);
        return 0;
    }
    static char line[1 << 16];
    int in = 0, cases = 0, fails = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        if (line[0] == '#') {
            char want[300];
            snprintf(want, sizeof want, "# vocab %s", name);
            in = !strcmp(line, want);
            continue;
        }
        if (!in) continue;
        /* hex text, then ids for (add_special, parse_special) = (1,0) (0,0) (1,1) (0,1) */
        char *col[5];
        col[0] = strtok(line, "\t");
        for (int c = 1; c < 5; c++) col[c] = col[c - 1] ? strtok(NULL, "\t") : NULL;
        if (!col[4]) {
            CHECK_MSG(0, "%s: malformed golden line", golden);
            break;
        }
        const char *hex = col[0];
        char text[4096];
        size_t len = 0;
        if (strcmp(hex, "-"))
            for (size_t i = 0; hex[i] && hex[i + 1] && len < sizeof text; i += 2)
                text[len++] = (char)(hexval(hex[i]) << 4 | hexval(hex[i + 1]));
        for (int c = 0; c < 4; c++) {
            static int32_t want[4096];
            int add_special = c % 2 == 0, parse_special = c >= 2;
            size_t nw = parse_ids(col[c + 1], want, 4096), n = 0, need = 0;
            int rc = moe_vocab_encode_special(v, text, len, add_special, parse_special, NULL, 0, &need);
            int32_t *got = malloc((need + 1) * sizeof *got);
            if (rc == 0 || rc == MOE_ELIMIT) rc = moe_vocab_encode_special(v, text, len, add_special, parse_special, got, need, &n);
            int same = rc == 0 && n == nw && (n == 0 || !memcmp(got, want, n * sizeof *got));
            if (!same && fails++ < 10) {
                char g1[4096], g2[4096];
                fmt_ids(got, rc ? 0 : n, g1, sizeof g1);
                fmt_ids(want, nw, g2, sizeof g2);
                CHECK_MSG(0, "%s, text %s, add_special=%d parse_special=%d: got [%s] (rc %d), llama.cpp [%s]", name, hex,
                          add_special, parse_special, g1, rc, g2);
            }
            free(got);
        }
        cases++;
    }
    fclose(f);
    moe_vocab_free(v);
    return cases;
}

TEST(vocab_golden_tiny) {
    static const char *names[] = {"vocab-tiny-spm.gguf", "vocab-tiny-gpt2.gguf", "vocab-tiny-qwen2.gguf",
                                  "vocab-tiny-llama3.gguf", "vocab-tiny-default.gguf", "vocab-tiny-falcon.gguf",
                                  "vocab-tiny-starcoder.gguf", "vocab-tiny-dsv3.gguf"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        int n = check_golden("vocab-tiny.golden", moe_test_data_dir(), names[i]);
        CHECK_MSG(n >= 100, "%s: %d golden cases", names[i], n);
    }
}

TEST(vocab_golden_real) {
    int n1 = check_golden("vocab-real.golden", vocab_dir(), "vocab-llama-spm.gguf");
    int n2 = check_golden("vocab-real.golden", vocab_dir(), "vocab-gpt-2.gguf");
    if (n1 < 0 && n2 < 0) {
        moe_test_skip("real vocab GGUFs not found (set MOE_GGUF_VOCAB_DIR)");
        return;
    }
    CHECK_MSG(n1 < 0 || n1 >= 100, "llama-spm: %d cases", n1);
    CHECK_MSG(n2 < 0 || n2 >= 100, "gpt-2: %d cases", n2);
}

/* Concatenated pieces of encode(text) give the text back: exactly for GPT-2
 * BPE, after the one leading space for SPM (valid UTF-8 without special
 * tokens). */
static void round_trip(const moe_vocab *v, const char *text, int spm) {
    size_t n = 0, len = strlen(text);
    int32_t *ids = encode(v, text, len, 1, &n, NULL);
    CHECK_MSG(ids != NULL, "encode \"%s\"", text);
    if (!ids) return;
    char out[4096];
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        size_t pl;
        CHECK(moe_vocab_piece(v, ids[i], out + pos, sizeof out - pos, &pl) == 0);
        pos += pl;
    }
    free(ids);
    const char *want = text;
    char buf[4096];
    if (spm && len) {
        snprintf(buf, sizeof buf, " %s", text);
        want = buf;
    }
    CHECK_MSG(pos == strlen(want) && !memcmp(out, want, pos), "round trip of \"%s\": \"%.*s\"", text, (int)pos, out);
}

TEST(vocab_piece_round_trip) {
    static const char *texts[] = {"", "Hello world", "  two  spaces  ", "tabs\tand\nnew\r\nlines\n\n",
                                  "it's 12345 caf\xc3\xa9 na\xc3\xafve", "\xe4\xbd\xa0\xe5\xa5\xbd\xe4\xb8\x96",
                                  "emoji \xf0\x9f\x9a\x80!", "(a+b)*c=d; x->y", "x  <s> </s>",
                                  "a\x01" "b\x7f"};
    char path[1024];
    static const char *names[] = {"vocab-tiny-spm.gguf", "vocab-tiny-gpt2.gguf", "vocab-tiny-qwen2.gguf",
                                  "vocab-tiny-default.gguf"};
    for (size_t k = 0; k < sizeof names / sizeof *names; k++) {
        snprintf(path, sizeof path, "%s/%s", moe_test_data_dir(), names[k]);
        moe_vocab *v = open_vocab(path);
        if (!v) continue;
        for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) round_trip(v, texts[i], k == 0);
        moe_vocab_free(v);
    }
    static const char *real[] = {"vocab-llama-spm.gguf", "vocab-gpt-2.gguf"};
    for (size_t k = 0; k < 2; k++) {
        snprintf(path, sizeof path, "%s/%s", vocab_dir(), real[k]);
        if (access(path, R_OK) != 0) continue;
        moe_vocab *v = open_vocab(path);
        if (!v) continue;
        for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) round_trip(v, texts[i], k == 0);
        moe_vocab_free(v);
    }
}

/* Pieces of single tokens, special ids and the buffer protocol, on the tiny
 * SPM vocab (ids as tools/gen_tiny_vocabs.py lays them out). */
TEST(vocab_pieces_and_specials) {
    char path[1024], buf[64];
    size_t len;
    snprintf(path, sizeof path, "%s/vocab-tiny-spm.gguf", moe_test_data_dir());
    moe_vocab *v = open_vocab(path);
    if (!v) return;
    CHECK_EQ_INT(moe_vocab_bos(v), 1);
    CHECK_EQ_INT(moe_vocab_eos(v), 2);
    CHECK_EQ_INT(moe_vocab_add_bos(v), 1);
    CHECK_EQ_INT(moe_vocab_add_eos(v), 0);
    CHECK(!strcmp(moe_vocab_model(v), "llama"));
    /* control and unknown tokens print nothing; byte tokens their byte */
    CHECK(moe_vocab_piece(v, 1, buf, sizeof buf, &len) == 0 && len == 0);
    CHECK(moe_vocab_piece(v, 0, buf, sizeof buf, &len) == 0 && len == 0);
    CHECK(moe_vocab_piece(v, 3 + 0x41, buf, sizeof buf, &len) == 0 && len == 1 && buf[0] == 'A');
    CHECK(moe_vocab_piece(v, 3 + 0xE9, buf, sizeof buf, &len) == 0 && len == 1 && (unsigned char)buf[0] == 0xE9);
    /* "▁hello" is a normal token: U+2581 prints as a space */
    int32_t id = -1;
    for (int32_t i = 0; i < moe_vocab_n_tokens(v); i++) {
        size_t tl;
        const char *t = moe_vocab_text(v, i, &tl);
        if (tl == 8 && !memcmp(t, "\xe2\x96\x81hello", 8)) id = i;
    }
    CHECK(id > 0);
    CHECK(moe_vocab_piece(v, id, buf, sizeof buf, &len) == 0 && len == 6 && !memcmp(buf, " hello", 6));
    CHECK(moe_vocab_piece(v, id, buf, 3, &len) == MOE_ELIMIT && len == 6);
    CHECK(moe_vocab_piece(v, id, NULL, 0, &len) == MOE_ELIMIT && len == 6);
    CHECK(moe_vocab_piece(v, -1, buf, sizeof buf, &len) == MOE_EINVAL);
    CHECK(moe_vocab_piece(v, moe_vocab_n_tokens(v), buf, sizeof buf, &len) == MOE_EINVAL);
    /* user-defined tokens print their text */
    int32_t ids[8];
    size_t n;
    CHECK(moe_vocab_encode(v, "<|user|>", 8, 0, ids, 8, &n) == 0 && n == 1);
    CHECK(moe_vocab_piece(v, ids[0], buf, sizeof buf, &len) == 0 && len == 8 && !memcmp(buf, "<|user|>", 8));
    /* the id buffer protocol: the count needed, MOE_ELIMIT when short */
    CHECK(moe_vocab_encode(v, "hello", 5, 1, NULL, 0, &n) == MOE_ELIMIT && n == 2);
    CHECK(moe_vocab_encode(v, "hello", 5, 1, ids, 1, &n) == MOE_ELIMIT && n == 2 && ids[0] == 1);
    CHECK(moe_vocab_encode(v, "hello", 5, 1, ids, 2, &n) == 0 && n == 2 && ids[0] == 1 && ids[1] == id);
    CHECK(moe_vocab_encode(v, "", 0, 1, ids, 8, &n) == 0 && n == 1 && ids[0] == 1);
    CHECK(moe_vocab_encode(v, NULL, 0, 0, ids, 8, &n) == 0 && n == 0);
    CHECK(moe_vocab_encode(v, NULL, 3, 0, ids, 8, &n) == MOE_EINVAL);
    moe_vocab_free(v);
}

/* ---- hostile metadata ---------------------------------------------------------- */

enum {
    K_MODEL = 1 << 0, K_PRE = 1 << 1, K_TOKENS = 1 << 2, K_SCORES = 1 << 3, K_TYPES = 1 << 4,
    K_MERGES = 1 << 5, K_BOS = 1 << 6,
};

/* A small valid vocab of model ("llama" or "gpt2"), less the keys in omit. */
static void add_base(moe__gguf_writer *w, const char *model, unsigned omit) {
    static const char *tok[] = {"<unk>", "<s>", "</s>", "a", "b", "ab", "\xe2\x96\x81"};
    static const float score[] = {0, 0, 0, -1, -1, -0.5f, -2};
    static const int32_t type[] = {2, 3, 3, 1, 1, 1, 1};
    static const char *merges[] = {"a b"};
    if (!(omit & K_MODEL)) moe__gguf_writer_add_str(w, "tokenizer.ggml.model", model);
    if (!(omit & K_PRE)) moe__gguf_writer_add_str(w, "tokenizer.ggml.pre", "gpt-2");
    if (!(omit & K_TOKENS)) moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", tok, 7);
    if (!(omit & K_SCORES)) moe__gguf_writer_add_arr(w, "tokenizer.ggml.scores", MOE__GGUF_F32, score, 7);
    if (!(omit & K_TYPES)) moe__gguf_writer_add_arr(w, "tokenizer.ggml.token_type", MOE__GGUF_I32, type, 7);
    if (!(omit & K_MERGES) && !strcmp(model, "gpt2")) moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", merges, 1);
    if (!(omit & K_BOS)) moe__gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", 1);
}

typedef struct bad_case {
    const char *what, *model;
    unsigned omit;
    int code;
    const char *needle; /* in the message */
} bad_case;

static void add_bad(moe__gguf_writer *w, int i) {
    static const char *one[] = {"x"}, *nospace[] = {"ab"}, *unknown[] = {"a c"}, *nocat[] = {"b a"};
    static const char *dup[] = {"a", "b", "a"}, *badbyte[] = {"<unk>", "<0xZZ>"};
    static const uint32_t u32s[7] = {0};
    static const float nan_scores[7] = {0, 0, 0, NAN, 0, 0, 0}, short_scores[3] = {0};
    static const int32_t bytetype[2] = {2, 6};
    switch (i) {
    case 0: break;                                                                     /* no model */
    case 1: moe__gguf_writer_add_str(w, "tokenizer.ggml.model", "bert"); break;
    case 2: moe__gguf_writer_add_str(w, "tokenizer.ggml.pre", "deepseek-llm"); break;
    case 3: moe__gguf_writer_add_arr(w, "tokenizer.ggml.tokens", MOE__GGUF_U32, u32s, 7); break;
    case 4: moe__gguf_writer_add_str(w, "tokenizer.ggml.tokens", "a"); break;
    case 5: moe__gguf_writer_add_arr(w, "tokenizer.ggml.scores", MOE__GGUF_F32, short_scores, 3); break;
    case 6: moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.token_type", one, 1); break;
    case 7: moe__gguf_writer_add_u32(w, "tokenizer.ggml.bos_token_id", 7); break;
    case 8: moe__gguf_writer_add_str(w, "tokenizer.ggml.bos_token_id", "1"); break;
    case 9: moe__gguf_writer_add_u32(w, "tokenizer.ggml.add_bos_token", 1); break;
    case 10: moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", unknown, 1); break;
    case 11: moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", nospace, 1); break;
    case 12: moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", nocat, 1); break;
    case 13: break;                                                                    /* no merges */
    case 14: moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", dup, 3); break;
    case 15:
        moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", badbyte, 2);
        moe__gguf_writer_add_arr(w, "tokenizer.ggml.token_type", MOE__GGUF_I32, bytetype, 2);
        break;
    case 16: moe__gguf_writer_add_arr(w, "tokenizer.ggml.scores", MOE__GGUF_F32, nan_scores, 7); break;
    case 17: moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", one, 0); break;
    case 18: moe__gguf_writer_add_u32(w, "tokenizer.ggml.eos_token_id", 0xFFFFFFFFu); break;
    case 19: moe__gguf_writer_add_i32(w, "tokenizer.ggml.unknown_token_id", -1); break;
    case 20: moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.merges", one, 1); break;
    }
}

TEST(vocab_hostile_metadata) {
    static const bad_case cases[] = {
        {"no model", "llama", K_MODEL, MOE_EFORMAT, "tokenizer.ggml.model"},
        {"model bert", "llama", K_MODEL, MOE_EUNSUPPORTED, "bert"},
        {"pre deepseek-llm", "gpt2", K_PRE, MOE_EUNSUPPORTED, "deepseek-llm"},
        {"tokens of u32", "llama", K_TOKENS, MOE_EFORMAT, "tokenizer.ggml.tokens"},
        {"tokens a string", "llama", K_TOKENS, MOE_EFORMAT, "tokenizer.ggml.tokens"},
        {"scores too short", "llama", K_SCORES, MOE_EFORMAT, "tokenizer.ggml.scores"},
        {"token types of strings", "llama", K_TYPES, MOE_EFORMAT, "tokenizer.ggml.token_type"},
        {"bos out of range", "llama", K_BOS, MOE_EFORMAT, "out of range"},
        {"bos a string", "llama", K_BOS, MOE_EFORMAT, "tokenizer.ggml.bos_token_id"},
        {"add_bos a u32", "llama", 0, MOE_EFORMAT, "tokenizer.ggml.add_bos_token"},
        {"merge of an unknown token", "gpt2", K_MERGES, MOE_EFORMAT, "unknown token"},
        {"merge without space", "gpt2", K_MERGES, MOE_EFORMAT, "no space"},
        {"merge forming no token", "gpt2", K_MERGES, MOE_EFORMAT, "concatenation"},
        {"gpt2 without merges", "gpt2", K_MERGES, MOE_EFORMAT, "tokenizer.ggml.merges"},
        {"duplicate token", "llama", K_TOKENS | K_SCORES | K_TYPES | K_BOS, MOE_EFORMAT, "duplicates"},
        {"byte token not <0xHH>", "llama", K_TOKENS | K_SCORES | K_TYPES | K_BOS, MOE_EFORMAT, "<0xHH>"},
        {"NaN score", "llama", K_SCORES, MOE_EFORMAT, "NaN"},
        {"no tokens", "llama", K_TOKENS | K_SCORES | K_TYPES | K_BOS, MOE_EFORMAT, "tokenizer.ggml.tokens"},
        {"eos out of range", "llama", 0, MOE_EFORMAT, "eos_token_id"},
        {"negative unk id", "llama", 0, MOE_EFORMAT, "unknown_token_id"},
        {"merge of one token", "gpt2", K_MERGES, MOE_EFORMAT, "no space"},
    };
    char dir[128], path[256], err[512];
    if (!moe_test_tmpdir(dir, "vocab")) {
        CHECK_MSG(0, "no temporary directory");
        return;
    }
    snprintf(path, sizeof path, "%s/bad.gguf", dir);
    for (int i = 0; i < (int)(sizeof cases / sizeof *cases); i++) {
        const bad_case *c = &cases[i];
        moe__gguf_writer *w = NULL;
        CHECK(moe__gguf_writer_new(&w) == 0);
        add_base(w, c->model, c->omit);
        add_bad(w, i);
        err[0] = '\0';
        int rc = moe__gguf_writer_write(w, path, err, sizeof err);
        moe__gguf_writer_free(w);
        CHECK_MSG(rc == 0, "%s: write: %s", c->what, err);
        moe__gguf *g = NULL;
        rc = moe__gguf_open(path, &g, err, sizeof err);
        CHECK_MSG(rc == 0, "%s: open: %s", c->what, err);
        if (rc) continue;
        moe_vocab *v = (moe_vocab *)1;
        err[0] = '\0';
        rc = moe_vocab_from_gguf(g, &v, err, sizeof err);
        moe__gguf_close(g);
        CHECK_MSG(rc == c->code, "%s: got %s, want %s [%s]", c->what, moe_err_name(rc), moe_err_name(c->code), err);
        CHECK_MSG(v == NULL, "%s: vocab not NULL on error", c->what);
        CHECK_MSG(strstr(err, path) != NULL, "%s: message does not name the file: %s", c->what, err);
        CHECK_MSG(strstr(err, c->needle) != NULL, "%s: \"%s\" not in: %s", c->what, c->needle, err);
        if (rc == 0) moe_vocab_free(v);
    }
    /* the base vocabs themselves load */
    for (int k = 0; k < 2; k++) {
        moe__gguf_writer *w = NULL;
        moe__gguf_writer_new(&w);
        add_base(w, k ? "gpt2" : "llama", 0);
        CHECK(moe__gguf_writer_write(w, path, err, sizeof err) == 0);
        moe__gguf_writer_free(w);
        moe_vocab *v = open_vocab(path);
        CHECK(v != NULL);
        moe_vocab_free(v);
    }
    moe_test_rmdir(dir);
}

/* llama.cpp's attribute fix-ups by text: "</s>" typed normal is still a
 * control token (no piece, not split out of text); "<|channel|>" typed normal
 * becomes user-defined (split out, printed). */
TEST(vocab_attribute_fixups) {
    static const char *tok[] = {"<unk>", "<s>", "</s>", "a", "<|channel|>", "\xe2\x96\x81"};
    static const int32_t type[] = {2, 3, 1, 1, 1, 1};
    char dir[128], path[256], err[512], buf[32];
    if (!moe_test_tmpdir(dir, "vocab")) return;
    snprintf(path, sizeof path, "%s/fix.gguf", dir);
    moe__gguf_writer *w = NULL;
    moe__gguf_writer_new(&w);
    moe__gguf_writer_add_str(w, "tokenizer.ggml.model", "llama");
    moe__gguf_writer_add_arr_str(w, "tokenizer.ggml.tokens", tok, 6);
    moe__gguf_writer_add_arr(w, "tokenizer.ggml.token_type", MOE__GGUF_I32, type, 6);
    CHECK(moe__gguf_writer_write(w, path, err, sizeof err) == 0);
    moe__gguf_writer_free(w);
    moe_vocab *v = open_vocab(path);
    if (v) {
        size_t len = 99, n;
        CHECK(moe_vocab_piece(v, 2, buf, sizeof buf, &len) == 0 && len == 0);
        CHECK(moe_vocab_piece(v, 3, buf, sizeof buf, &len) == 0 && len == 1 && buf[0] == 'a');
        CHECK(moe_vocab_piece(v, 4, buf, sizeof buf, &len) == 0 && len == 11);
        int32_t ids[8];
        CHECK(moe_vocab_encode(v, "a<|channel|>a", 13, 0, ids, 8, &n) == 0);
        /* ▁a <|channel|> ▁a: a space prefix again after the user-defined token */
        CHECK(n == 5 && ids[0] == 5 && ids[1] == 3 && ids[2] == 4 && ids[3] == 5 && ids[4] == 3);
        moe_vocab_free(v);
    }
    moe_test_rmdir(dir);
}

/* Input llama.cpp cannot tokenize is an error, not a crash or a guess. */
TEST(vocab_invalid_input) {
    char path[1024];
    size_t n;
    int rc;
    int32_t ids[16];
    snprintf(path, sizeof path, "%s/vocab-tiny-gpt2.gguf", moe_test_data_dir());
    moe_vocab *v = open_vocab(path);
    if (v) { /* F7 BF BF BF decodes to 0x1FFFFF: llama.cpp aborts re-encoding it */
        CHECK(moe_vocab_encode(v, "a\xf7\xbf\xbf\xbf" "b", 6, 0, ids, 16, &n) == MOE_EINVAL);
        /* F4 90 80 80 (0x110000) too; F4 8F BF BF (U+10FFFF) is fine */
        CHECK(moe_vocab_encode(v, "\xf4\x90\x80\x80", 4, 0, ids, 16, &n) == MOE_EINVAL);
        CHECK(moe_vocab_encode(v, "\xf4\x8f\xbf\xbf", 4, 0, ids, 16, &n) == 0 && n > 0);
        moe_vocab_free(v);
    }
    /* An SPM vocab without byte tokens cannot fall back. */
    char dir[128], err[512];
    if (!moe_test_tmpdir(dir, "vocab")) return;
    snprintf(path, sizeof path, "%s/nobytes.gguf", dir);
    moe__gguf_writer *w = NULL;
    moe__gguf_writer_new(&w);
    add_base(w, "llama", 0);
    CHECK(moe__gguf_writer_write(w, path, err, sizeof err) == 0);
    moe__gguf_writer_free(w);
    v = open_vocab(path);
    if (v) {
        int32_t *got = encode(v, "ab", 2, 1, &n, &rc);
        CHECK(got != NULL && n == 3 && got[0] == 1 && got[1] == 6 && got[2] == 5); /* <s> ▁ ab */
        free(got);
        CHECK(moe_vocab_encode(v, "abz", 3, 1, ids, 16, &n) == MOE_EINVAL);
        moe_vocab_free(v);
    }
    moe_test_rmdir(dir);
}

/* ---- Unicode ----------------------------------------------------------------------- */

TEST(vocab_unicode_classes) {
    static const struct {
        uint32_t cp;
        unsigned flags;
    } k[] = {
        {'a', MOE__UC_LETTER}, {'Z', MOE__UC_LETTER}, {'7', MOE__UC_NUMBER}, {' ', MOE__UC_SEP | MOE__UC_SPACE},
        {'\n', MOE__UC_CONTROL | MOE__UC_SPACE}, {'\t', MOE__UC_CONTROL | MOE__UC_SPACE}, {0, MOE__UC_CONTROL},
        {'!', MOE__UC_PUNCT}, {'$', MOE__UC_SYMBOL}, {'`', MOE__UC_SYMBOL}, {'_', MOE__UC_PUNCT},
        {0x85, MOE__UC_CONTROL | MOE__UC_SPACE}, {0xA0, MOE__UC_SEP | MOE__UC_SPACE}, {0xE9, MOE__UC_LETTER},
        {0xBD, MOE__UC_NUMBER}, {0x300, MOE__UC_MARK}, {0x378, MOE__UC_UNDEF}, {0x661, MOE__UC_NUMBER},
        {0x2003, MOE__UC_SEP | MOE__UC_SPACE}, {0x200B, MOE__UC_CONTROL}, {0x2581, MOE__UC_SYMBOL},
        {0x3000, MOE__UC_SEP | MOE__UC_SPACE}, {0x4F60, MOE__UC_LETTER}, {0xD800, MOE__UC_CONTROL},
        {0xFFFD, MOE__UC_SYMBOL}, {0x1F642, MOE__UC_SYMBOL}, {0x10FFFF, MOE__UC_UNDEF}, {0x10FFFD, MOE__UC_CONTROL},
        {0x110000, 0}, {0xFFFFFFFF, 0},
    };
    for (size_t i = 0; i < sizeof k / sizeof *k; i++)
        CHECK_MSG(moe__unicode_flags(k[i].cp) == k[i].flags, "U+%04X: flags 0x%x, want 0x%x", k[i].cp,
                  moe__unicode_flags(k[i].cp), k[i].flags);
    /* the table is sorted and starts at 0 */
    CHECK(moe__unicode_range_start[0] == 0);
    for (size_t i = 1; i < moe__unicode_n_ranges; i++)
        if (moe__unicode_range_start[i] <= moe__unicode_range_start[i - 1]) {
            CHECK_MSG(0, "range %zu not sorted", i);
            break;
        }
    /* decoding: llama.cpp's leniency */
    static const struct {
        const char *s;
        size_t len;
        uint32_t cp;
        size_t adv;
    } d[] = {
        {"A", 1, 'A', 1}, {"\xc3\xa9", 2, 0xE9, 2}, {"\xe4\xbd\xa0", 3, 0x4F60, 3}, {"\xf0\x9f\x99\x82", 4, 0x1F642, 4},
        {"\x80", 1, 0xFFFD, 1}, {"\xc3", 1, 0xFFFD, 1}, {"\xc3(", 2, 0xFFFD, 1}, {"\xc0\x80", 2, 0, 2},
        {"\xed\xa0\x80", 3, 0xD800, 3}, {"\xf7\xbf\xbf\xbf", 4, 0x1FFFFF, 4}, {"\xf8\x88\x80\x80\x80", 5, 0xFFFD, 1},
        {"\xff", 1, 0xFFFD, 1}, {"\xe4\xbd", 2, 0xFFFD, 1}, {"\xc3\xc3", 2, 0xFFFD, 1}, {"\xe4\xbd\xe4", 3, 0xFFFD, 1},
    };
    for (size_t i = 0; i < sizeof d / sizeof *d; i++) {
        size_t adv = 0;
        uint32_t cp = moe__utf8_decode((const unsigned char *)d[i].s, d[i].len, &adv);
        CHECK_MSG(cp == d[i].cp && adv == d[i].adv, "case %zu: U+%X/%zu, want U+%X/%zu", i, cp, adv, d[i].cp, d[i].adv);
    }
    unsigned char u[4];
    CHECK(moe__utf8_encode(0x10FFFF, u) == 4 && u[0] == 0xF4 && u[1] == 0x8F && u[2] == 0xBF && u[3] == 0xBF);
    CHECK(moe__utf8_encode(0x110000, u) == 0);
    CHECK(moe__utf8_encode(0x7FF, u) == 2 && u[0] == 0xDF && u[1] == 0xBF);
}

/* GPT-2's byte map, against its definition: printable Latin-1 bytes stand
 * for themselves, the rest take U+0100.. in byte order. */
TEST(vocab_gpt2_byte_map) {
    uint32_t next = 256;
    int seen[400] = {0};
    for (int b = 0; b < 256; b++) {
        int self = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        uint32_t want = self ? (uint32_t)b : next++;
        CHECK_MSG(moe__bpe_byte_cp((unsigned char)b) == want, "byte 0x%02x -> U+%04X, want U+%04X", b,
                  moe__bpe_byte_cp((unsigned char)b), want);
        CHECK_EQ_INT(moe__bpe_cp_byte(want), b);
        if (want < 400) seen[want]++;
    }
    CHECK_EQ_INT(next, 256 + 68);
    for (uint32_t cp = 0; cp < 400; cp++)
        if (!seen[cp]) CHECK_MSG(moe__bpe_cp_byte(cp) == -1, "U+%04X maps to a byte", cp);
}

/* Random byte strings (mostly invalid UTF-8, special-token fragments mixed
 * in): every call returns 0 or MOE_EINVAL, at most a few ids per byte, and
 * GPT-2 BPE text that is ASCII comes back byte for byte from its pieces. */
TEST(vocab_random_bytes) {
    static const char *names[] = {"vocab-tiny-spm.gguf", "vocab-tiny-gpt2.gguf", "vocab-tiny-llama3.gguf",
                                  "vocab-tiny-default.gguf", "vocab-tiny-dsv3.gguf"};
    static const char *frags[] = {"<|user|>", "<s>", "|>", "<|im_start|>", " ", "\n", "'s", "12345", "\xe2\x96\x81"};
    char path[1024], text[64], out[1024];
    uint64_t x = 42;
    for (size_t k = 0; k < sizeof names / sizeof *names; k++) {
        snprintf(path, sizeof path, "%s/%s", moe_test_data_dir(), names[k]);
        moe_vocab *v = open_vocab(path);
        if (!v) continue;
        for (int it = 0; it < 3000; it++) {
            size_t len = 0, n = 0;
            int ascii = it % 3 == 0;
            while (len < 40) {
                x = x * 6364136223846793005ull + 1442695040888963407ull;
                unsigned r = (unsigned)(x >> 33);
                if (r % 5 == 0) {
                    const char *f = frags[r / 5 % (sizeof frags / sizeof *frags)];
                    if (ascii && (unsigned char)f[0] >= 0x80) continue;
                    size_t fl = strlen(f);
                    if (len + fl > 40) break;
                    memcpy(text + len, f, fl);
                    len += fl;
                } else {
                    text[len++] = (char)(ascii ? 32 + r / 7 % 95 : r / 7 % 256);
                }
            }
            int32_t ids[256];
            int rc = moe_vocab_encode_special(v, text, len, it & 1, it & 2, ids, 256, &n);
            CHECK_MSG(rc == 0 || rc == MOE_EINVAL, "%s: rc %d", names[k], rc);
            if (rc) continue;
            CHECK_MSG(n <= 3 * len + 2, "%s: %zu ids for %zu bytes", names[k], n, len);
            if (k == 0 || !ascii || (it & 2)) continue;
            size_t pos = 0, pl;
            for (size_t i = 0; i < n; i++) {
                CHECK(moe_vocab_piece(v, ids[i], out + pos, sizeof out - pos, &pl) == 0);
                pos += pl;
            }
            /* BOS, when added, prints nothing */
            CHECK_MSG(pos == len && !memcmp(out, text, len), "%s: ASCII round trip of %.*s", names[k], (int)len, text);
        }
        moe_vocab_free(v);
    }
}
