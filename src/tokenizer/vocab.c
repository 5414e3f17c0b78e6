/* GGUF tokenizers: loading tokenizer.ggml.* metadata (hostile-input checks),
 * token and merge lookups, the encode driver (special tokens split out
 * first, BOS/EOS) and token pieces. The SPM and BPE algorithms are in spm.c
 * and gpt2.c. */
#define _GNU_SOURCE /* memmem */
#include "tokenizer/vocab_impl.h"

#include "io/gguf.h"
#include "tokenizer/unicode.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TOKENS (1 << 24) /* tokens in a vocab (the largest real ones hold ~260k) */

/* llama.cpp's token types (tokenizer.ggml.token_type values). */
enum { TT_UNDEFINED, TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER, TT_UNUSED, TT_BYTE };

static uint64_t hash_bytes(const char *s, size_t len) {
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < len; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}
static uint64_t hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

int32_t moe__vocab_find(const moe_vocab *v, const char *s, size_t len) {
    size_t mask = v->hcap - 1;
    for (size_t i = hash_bytes(s, len) & mask;; i = (i + 1) & mask) {
        int32_t id = v->hash[i];
        if (id < 0) return -1;
        size_t tl;
        const char *t = moe__vocab_str(v, id, &tl);
        if (tl == len && memcmp(t, s, len) == 0) return id;
    }
}

int32_t moe__vocab_merge(const moe_vocab *v, int32_t a, int32_t b, int32_t *result) {
    if (!v->mcap || a < 0 || b < 0) return -1;
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    size_t mask = v->mcap - 1;
    for (size_t i = hash_u64(key) & mask;; i = (i + 1) & mask) {
        if (v->mkey[i] == UINT64_MAX) return -1;
        if (v->mkey[i] == key) {
            *result = v->mres[i];
            return v->mrank[i];
        }
    }
}

static size_t pow2_at_least(size_t n) {
    size_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

void moe_vocab_free(moe_vocab *v) {
    if (!v) return;
    moe__free(v->blob);
    moe__free(v->off);
    moe__free(v->score);
    moe__free(v->attr);
    moe__free(v->hash);
    moe__free(v->mkey);
    moe__free(v->mrank);
    moe__free(v->mres);
    moe__free(v->special);
    moe__free(v);
}

/* ---- loading ----------------------------------------------------------------- */

/* Texts llama.cpp marks as control tokens whatever the file says (its
 * end-of-generation and fill-in-the-middle detection by text). */
static const char *const k_control_texts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\xef\xbd\x9c" "end\xe2\x96\x81" "of\xe2\x96\x81" "sentence\xef\xbd\x9c>", "[e~[",
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "begin\xef\xbd\x9c>",
    "<PRE>", "\xe2\x96\x81<PRE>", "<|code_prefix|>", "<|prefix|>",
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "hole\xef\xbd\x9c>",
    "<SUF>", "\xe2\x96\x81<SUF>", "<|code_suffix|>", "<|suffix|>",
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\xef\xbd\x9c" "fim\xe2\x96\x81" "end\xef\xbd\x9c>",
    "<MID>", "\xe2\x96\x81<MID>", "<|code_middle|>", "<|middle|>",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>", "<|file_sep|>",
};
/* Texts llama.cpp always treats as user-defined (gpt-oss). */
static const char *const k_user_texts[] = {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"};

static int32_t find_cstr(const moe_vocab *v, const char *s) { return moe__vocab_find(v, s, strlen(s)); }

/* llama.cpp's attribute fix-ups by token text (see k_control_texts). */
static void fix_attrs(moe_vocab *v) {
    for (size_t i = 0; i < sizeof k_control_texts / sizeof *k_control_texts; i++) {
        int32_t id = find_cstr(v, k_control_texts[i]);
        if (id >= 0) v->attr[id] |= MOE__TOK_CONTROL;
    }
    for (size_t i = 0; i < sizeof k_user_texts / sizeof *k_user_texts; i++) {
        int32_t id = find_cstr(v, k_user_texts[i]);
        if (id >= 0) v->attr[id] = MOE__TOK_USER;
    }
    /* o200k_harmony / solar-open: <|end|> is no end of generation there. */
    int32_t end = find_cstr(v, "<|end|>");
    int has_call = find_cstr(v, "<|call|>") >= 0 || find_cstr(v, "<|calls|>") >= 0;
    if (end >= 0 && has_call && (find_cstr(v, "<|return|>") >= 0 || find_cstr(v, "<|flush|>") >= 0))
        v->attr[end] = MOE__TOK_USER;
    /* gemma4 / paddleocr: </s> is an ordinary token when <|tool_response> exists. */
    int32_t s = find_cstr(v, "</s>");
    if (s >= 0 && find_cstr(v, "<|tool_response>") >= 0) v->attr[s] = MOE__TOK_NORMAL;
}

static int attr_of_type(int32_t t) {
    switch (t) {
    case TT_NORMAL: return MOE__TOK_NORMAL;
    case TT_UNKNOWN: return MOE__TOK_UNKNOWN;
    case TT_CONTROL: return MOE__TOK_CONTROL;
    case TT_USER: return MOE__TOK_USER;
    case TT_UNUSED: return MOE__TOK_UNUSED;
    case TT_BYTE: return MOE__TOK_BYTE;
    default: return 0; /* undefined: no piece, never split out */
    }
}

static int hexval(char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}
/* The byte of a "<0xHH>" text, -1 when it has another form. */
static int byte_text_value(const char *s, size_t len) {
    if (len != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int hi = hexval(s[3]), lo = hexval(s[4]);
    return hi < 0 || lo < 0 ? -1 : hi << 4 | lo;
}

/* Reads an optional numeric array of at least n elements (only the first n
 * are used, as llama.cpp does). *present = 0 when the key is absent. */
static int read_arr(const moe__gguf *g, const char *key, int is_float, void *dst, size_t n, int *present,
                    char *err, size_t errsz) {
    moe__gguf_vtype et;
    size_t len;
    *present = 0;
    int rc = moe__gguf_get_arr_info(g, key, &et, &len, err, errsz);
    if (rc == MOE_ENOTFOUND) return 0;
    if (rc) return rc;
    if (len < n)
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: %s has %zu entries, fewer than the %zu tokens",
                            moe__gguf_label(g), key, len, n);
    void *tmp = moe__calloc(len, 4);
    if (!tmp) return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory reading %s", moe__gguf_label(g), key);
    rc = is_float ? moe__gguf_get_arr_f32(g, key, tmp, len, err, errsz)
                  : moe__gguf_get_arr_i32(g, key, tmp, len, err, errsz);
    if (rc == 0) {
        memcpy(dst, tmp, n * 4);
        *present = 1;
    }
    moe__free(tmp);
    return rc;
}

/* An optional special token id: absent keeps *id; present must be in range. */
static int read_special(const moe__gguf *g, const char *key, int32_t n, int32_t *id, char *err, size_t errsz) {
    uint32_t u;
    int rc = moe__gguf_get_u32(g, key, &u, err, errsz);
    if (rc == MOE_ENOTFOUND) return 0;
    if (rc) return rc;
    if (u >= (uint32_t)n)
        return moe__set_err(err, errsz, MOE_EFORMAT, "%s: %s = %u is out of range (vocab of %d tokens)",
                            moe__gguf_label(g), key, u, n);
    *id = (int32_t)u;
    return 0;
}
static int read_flag(const moe__gguf *g, const char *key, int *flag, char *err, size_t errsz) {
    int b, rc = moe__gguf_get_bool(g, key, &b, err, errsz);
    if (rc == MOE_ENOTFOUND) return 0;
    if (rc == 0) *flag = b;
    return rc;
}

static int load_tokens(moe_vocab *v, const moe__gguf *g, char *err, size_t errsz) {
    const char *file = moe__gguf_label(g);
    const moe__gguf_str *tok;
    size_t n;
    int rc = moe__gguf_get_arr_str(g, "tokenizer.ggml.tokens", &tok, &n, err, errsz);
    if (rc == MOE_ENOTFOUND) return moe__set_err(err, errsz, MOE_EFORMAT, "%s: no tokenizer.ggml.tokens", file);
    if (rc) return rc;
    if (n == 0 || n > MAX_TOKENS)
        return moe__set_err(err, errsz, n ? MOE_ELIMIT : MOE_EFORMAT, "%s: tokenizer.ggml.tokens holds %zu tokens (1..%d)",
                            file, n, MAX_TOKENS);
    v->n = (int32_t)n;
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        size_t len = tok[i].len ? tok[i].len : 32; /* "[EMPTY_i]" */
        if (moe__add_size(total, len + 1, &total))
            return moe__set_err(err, errsz, MOE_ELIMIT, "%s: token texts too large", file);
    }
    v->off = moe__calloc(n + 1, sizeof *v->off);
    v->blob = moe__malloc(total);
    v->score = moe__calloc(n, sizeof *v->score);
    v->attr = moe__calloc(n, sizeof *v->attr);
    v->hcap = pow2_at_least(2 * n);
    v->hash = moe__malloc(v->hcap * sizeof *v->hash);
    int32_t *types = moe__calloc(n, sizeof *types);
    if (!v->off || !v->blob || !v->score || !v->attr || !v->hash || !types) {
        moe__free(types);
        return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory for %zu tokens", file, n);
    }
    int has_scores, has_types;
    rc = read_arr(g, "tokenizer.ggml.scores", 1, v->score, n, &has_scores, err, errsz);
    if (!rc) rc = read_arr(g, "tokenizer.ggml.token_type", 0, types, n, &has_types, err, errsz);
    size_t pos = 0;
    memset(v->hash, 0xff, v->hcap * sizeof *v->hash);
    for (size_t i = 0; i < n && !rc; i++) {
        v->off[i] = pos;
        if (tok[i].len) {
            memcpy(v->blob + pos, tok[i].s, tok[i].len);
            pos += tok[i].len;
        } else { /* llama.cpp renames empty tokens */
            pos += (size_t)snprintf(v->blob + pos, 32, "[EMPTY_%zu]", i);
        }
        v->blob[pos++] = '\0';
        v->off[i + 1] = pos;
        if (isnan(v->score[i])) rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: tokenizer.ggml.scores[%zu] is NaN", file, i);
        v->attr[i] = (uint16_t)(has_types ? attr_of_type(types[i]) : MOE__TOK_NORMAL);
        size_t len;
        const char *s = moe__vocab_str(v, (int32_t)i, &len);
        if (!rc && moe__vocab_find(v, s, len) >= 0)
            rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: tokenizer.ggml.tokens[%zu] duplicates token %d", file, i,
                              moe__vocab_find(v, s, len));
        if (!rc && (v->attr[i] & MOE__TOK_BYTE) && byte_text_value(s, len) < 0)
            rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: byte token %zu is not of the form <0xHH>", file, i);
        if (!rc) {
            size_t mask = v->hcap - 1, h = hash_bytes(s, len) & mask;
            while (v->hash[h] >= 0) h = (h + 1) & mask;
            v->hash[h] = (int32_t)i;
        }
    }
    moe__free(types);
    return rc;
}

/* tokenizer.ggml.merges: "left right" (the space searched from the second
 * byte on, as llama.cpp does); both sides and their concatenation must be
 * tokens. The first of duplicate merges keeps its rank. */
static int load_merges(moe_vocab *v, const moe__gguf *g, char *err, size_t errsz) {
    const char *file = moe__gguf_label(g);
    const moe__gguf_str *m;
    size_t n;
    int rc = moe__gguf_get_arr_str(g, "tokenizer.ggml.merges", &m, &n, err, errsz);
    if (rc == MOE_ENOTFOUND) return moe__set_err(err, errsz, MOE_EFORMAT, "%s: no tokenizer.ggml.merges", file);
    if (rc) return rc;
    if (n > (size_t)INT32_MAX) return moe__set_err(err, errsz, MOE_ELIMIT, "%s: %zu merges", file, n);
    v->mcap = pow2_at_least(2 * n);
    v->mkey = moe__malloc(v->mcap * sizeof *v->mkey);
    v->mrank = moe__malloc(v->mcap * sizeof *v->mrank);
    v->mres = moe__malloc(v->mcap * sizeof *v->mres);
    char *cat = moe__malloc(1);
    size_t catcap = 1;
    if (!v->mkey || !v->mrank || !v->mres || !cat) {
        moe__free(cat);
        return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory for %zu merges", file, n);
    }
    memset(v->mkey, 0xff, v->mcap * sizeof *v->mkey);
    for (size_t r = 0; r < n && !rc; r++) {
        const char *s = m[r].s, *sp = m[r].len > 1 ? memchr(s + 1, ' ', m[r].len - 1) : NULL;
        if (!sp) {
            rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: tokenizer.ggml.merges[%zu] has no space", file, r);
            break;
        }
        size_t la = (size_t)(sp - s), lb = m[r].len - la - 1;
        int32_t a = moe__vocab_find(v, s, la), b = moe__vocab_find(v, sp + 1, lb);
        if (la + lb > catcap) {
            moe__free(cat);
            catcap = la + lb;
            cat = moe__malloc(catcap);
            if (!cat) return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", file);
        }
        memcpy(cat, s, la);
        memcpy(cat + la, sp + 1, lb);
        int32_t ab = a >= 0 && b >= 0 ? moe__vocab_find(v, cat, la + lb) : -1;
        if (ab < 0) {
            rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: tokenizer.ggml.merges[%zu] \"%.*s\" names %s", file, r,
                              (int)(m[r].len > 80 ? 80 : m[r].len), s,
                              a < 0 || b < 0 ? "an unknown token" : "a pair whose concatenation is no token");
            break;
        }
        uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
        size_t mask = v->mcap - 1, h = hash_u64(key) & mask;
        while (v->mkey[h] != UINT64_MAX && v->mkey[h] != key) h = (h + 1) & mask;
        if (v->mkey[h] == UINT64_MAX) {
            v->mkey[h] = key;
            v->mrank[h] = (int32_t)r;
            v->mres[h] = ab;
        }
    }
    moe__free(cat);
    return rc;
}

/* Longer first, then smaller id: a total order, so the split is deterministic. */
static int special_before(const moe_vocab *v, int32_t a, int32_t b) {
    size_t la, lb;
    moe__vocab_str(v, a, &la);
    moe__vocab_str(v, b, &lb);
    return la != lb ? la > lb : a < b;
}

/* Tokens split out of the text before tokenizing, longest first; ties by id
 * (llama.cpp's sort leaves their order unspecified). User-defined ones always
 * are, control and unknown ones only with parse_special. */
static int is_special(unsigned attr) { return (attr & (MOE__TOK_CONTROL | MOE__TOK_USER | MOE__TOK_UNKNOWN)) != 0; }

static int build_special_list(moe_vocab *v) {
    int32_t n = 0;
    for (int32_t i = 0; i < v->n; i++) n += is_special(v->attr[i]);
    v->special = moe__calloc((size_t)n + 1, sizeof *v->special);
    if (!v->special) return MOE_ENOMEM;
    for (int32_t i = 0; i < v->n; i++)
        if (is_special(v->attr[i])) v->special[v->n_special++] = i;
    int32_t *u = v->special;
    for (int32_t i = 1; i < n; i++) { /* insertion sort: few special tokens */
        int32_t x = u[i], j = i;
        while (j > 0 && special_before(v, x, u[j - 1])) {
            u[j] = u[j - 1];
            j--;
        }
        u[j] = x;
    }
    return 0;
}

int moe_vocab_from_gguf(const moe__gguf *g, moe_vocab **out, char *err, size_t errsz) {
    if (!out) return MOE_EINVAL;
    *out = NULL;
    if (!g) return moe__set_err(err, errsz, MOE_EINVAL, "no GGUF");
    const char *file = moe__gguf_label(g);
    moe_vocab *v = moe__calloc(1, sizeof *v);
    if (!v) return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", file);
    const char *model, *pre = "";
    size_t mlen, plen = 0;
    int rc = moe__gguf_get_str(g, "tokenizer.ggml.model", &model, &mlen, err, errsz);
    if (rc == MOE_ENOTFOUND) rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: no tokenizer.ggml.model", file);
    if (!rc) {
        rc = moe__gguf_get_str(g, "tokenizer.ggml.pre", &pre, &plen, err, errsz);
        if (rc == MOE_ENOTFOUND) {
            pre = "";
            plen = 0;
            rc = 0;
        }
    }
    if (!rc && (plen >= sizeof v->pre_name || memchr(pre, '\0', plen)))
        rc = moe__set_err(err, errsz, MOE_EUNSUPPORTED, "%s: unknown tokenizer.ggml.pre (%zu bytes)", file, plen);
    if (!rc) {
        memcpy(v->pre_name, pre, plen);
        if (mlen == 5 && !memcmp(model, "llama", 5)) {
            v->type = MOE__VOCAB_SPM;
            v->bos = 1, v->eos = 2, v->unk = 0, v->pad = -1;
            v->add_space_prefix = 1, v->add_bos = 1;
        } else if (mlen == 4 && !memcmp(model, "gpt2", 4)) {
            v->type = MOE__VOCAB_BPE;
            v->bos = 11, v->eos = 11, v->unk = -1, v->pad = -1;
            rc = moe__bpe_select_pre(v, v->pre_name);
            if (rc) moe__set_err(err, errsz, rc, "%s: tokenizer.ggml.pre \"%s\" is not supported (docs/tokenizers.md)",
                                 file, v->pre_name);
        } else {
            rc = moe__set_err(err, errsz, MOE_EUNSUPPORTED, "%s: tokenizer.ggml.model \"%.*s\" is not supported (llama, gpt2)",
                              file, (int)(mlen > 40 ? 40 : mlen), model);
        }
        snprintf(v->model, sizeof v->model, "%s", v->type == MOE__VOCAB_SPM ? "llama" : "gpt2");
    }
    if (!rc) rc = read_flag(g, "tokenizer.ggml.add_space_prefix", &v->add_space_prefix, err, errsz);
    if (!rc) rc = load_tokens(v, g, err, errsz);
    if (!rc && v->type == MOE__VOCAB_BPE) rc = load_merges(v, g, err, errsz);
    if (!rc) {
        int32_t *ids[] = {&v->bos, &v->eos, &v->unk, &v->pad};
        static const char *const keys[] = {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                           "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id"};
        for (int i = 0; i < 4 && !rc; i++) {
            if (*ids[i] >= v->n) *ids[i] = -1; /* a default beyond a small vocab: none */
            rc = read_special(g, keys[i], v->n, ids[i], err, errsz);
        }
    }
    if (!rc) rc = read_flag(g, "tokenizer.ggml.add_bos_token", &v->add_bos, err, errsz);
    if (!rc) rc = read_flag(g, "tokenizer.ggml.add_eos_token", &v->add_eos, err, errsz);
    if (!rc && ((v->add_bos && v->bos < 0) || (v->add_eos && v->eos < 0)))
        rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: the vocab adds a %s token but has none", file,
                          v->add_bos && v->bos < 0 ? "BOS" : "EOS");
    if (!rc) {
        fix_attrs(v);
        if (build_special_list(v)) rc = moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", file);
    }
    if (!rc && v->type == MOE__VOCAB_SPM) {
        for (int b = 0; b < 256; b++) {
            char hex[7];
            snprintf(hex, sizeof hex, "<0x%02X>", b);
            int32_t id = find_cstr(v, hex);
            char one = (char)b;
            v->byte_tok[b] = id >= 0 ? id : moe__vocab_find(v, &one, 1);
        }
    }
    if (!rc && v->type == MOE__VOCAB_BPE) {
        /* llama.cpp cannot even load a token decoding above U+10FFFF (its
         * piece cache re-encodes every code point). */
        for (int32_t i = 0; i < v->n && !rc; i++) {
            size_t len, adv;
            const unsigned char *s = (const unsigned char *)moe__vocab_str(v, i, &len);
            for (size_t p = 0; p < len && !rc; p += adv)
                if (moe__utf8_decode(s + p, len - p, &adv) >= MOE__UC_MAX)
                    rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: token %d holds a code point above U+10FFFF", file, i);
        }
    }
    if (rc) {
        moe_vocab_free(v);
        return rc;
    }
    *out = v;
    return 0;
}

/* ---- queries -------------------------------------------------------------------- */

int moe_vocab_n_tokens(const moe_vocab *v) { return v ? v->n : 0; }
int moe_vocab_bos(const moe_vocab *v) { return v ? v->bos : -1; }
int moe_vocab_eos(const moe_vocab *v) { return v ? v->eos : -1; }
int moe_vocab_add_bos(const moe_vocab *v) { return v ? v->add_bos : 0; }
int moe_vocab_add_eos(const moe_vocab *v) { return v ? v->add_eos : 0; }
const char *moe_vocab_model(const moe_vocab *v) { return v ? v->model : ""; }
const char *moe_vocab_pre(const moe_vocab *v) { return v ? v->pre_name : ""; }
const char *moe_vocab_text(const moe_vocab *v, int32_t id, size_t *len) {
    size_t l = 0;
    const char *s = v && id >= 0 && id < v->n ? moe__vocab_str(v, id, &l) : NULL;
    if (len) *len = l;
    return s;
}

/* ---- encode --------------------------------------------------------------------- */

typedef struct frag {
    size_t start, len;
    int32_t id; /* -1: raw text */
} frag;

/* Splits text at the special tokens (see build_special_list), longest first,
 * each splitting the raw pieces the longer ones left (leftmost,
 * non-overlapping occurrences). */
static int partition(const moe_vocab *v, const char *text, size_t len, int parse_special, frag **out, size_t *nout) {
    size_t cap = 16, n = 0;
    frag *f = moe__malloc(cap * sizeof *f);
    if (!f) return MOE_ENOMEM;
    if (len) f[n++] = (frag){0, len, -1};
    for (int32_t u = 0; u < v->n_special && n; u++) {
        int32_t id = v->special[u];
        if (!parse_special && (v->attr[id] & (MOE__TOK_CONTROL | MOE__TOK_UNKNOWN))) continue;
        size_t tl;
        const char *t = moe__vocab_str(v, id, &tl);
        for (size_t i = 0; i < n; i++) {
            if (f[i].id >= 0 || f[i].len < tl) continue;
            const char *base = text + f[i].start;
            const char *hit = memmem(base, f[i].len, t, tl);
            if (!hit) continue;
            size_t left = (size_t)(hit - base), rest = f[i].len - left - tl;
            size_t add = (left > 0) + 1 + (rest > 0) - 1;
            if (n + add > cap) {
                size_t nc = (n + add) * 2;
                frag *g = moe__malloc(nc * sizeof *g);
                if (!g) {
                    moe__free(f);
                    return MOE_ENOMEM;
                }
                memcpy(g, f, n * sizeof *f);
                moe__free(f);
                f = g;
                cap = nc;
            }
            frag orig = f[i];
            memmove(f + i + 1 + add, f + i + 1, (n - i - 1) * sizeof *f);
            size_t k = i;
            if (left) f[k++] = (frag){orig.start, left, -1};
            f[k++] = (frag){orig.start + left, tl, id};
            if (rest) f[k] = (frag){orig.start + left + tl, rest, -1};
            n += add;
            i = k - 1; /* the remainder (if any) is looked at next */
        }
    }
    *out = f;
    *nout = n;
    return 0;
}

int moe_vocab_encode(const moe_vocab *v, const char *text, size_t len, int add_special, int32_t *ids,
                     size_t cap, size_t *n_out) {
    return moe_vocab_encode_special(v, text, len, add_special, 0, ids, cap, n_out);
}

int moe_vocab_encode_special(const moe_vocab *v, const char *text, size_t len, int add_special, int parse_special,
                             int32_t *ids, size_t cap, size_t *n_out) {
    if (n_out) *n_out = 0;
    if (!v || !n_out || (!text && len) || (!ids && cap)) return MOE_EINVAL;
    moe__idbuf out = {ids, cap, 0};
    moe__work w = {0};
    frag *f = NULL;
    size_t nf = 0;
    int rc = partition(v, text, len, parse_special, &f, &nf);
    if (rc) return rc;
    if (add_special && v->add_bos) moe__idbuf_push(&out, v->bos);
    int prev_special = 1; /* SPM: a leading space before the text and after special tokens */
    for (size_t i = 0; i < nf && !rc; i++) {
        if (f[i].id >= 0) {
            moe__idbuf_push(&out, f[i].id);
            prev_special = 1;
            continue;
        }
        if (v->type == MOE__VOCAB_SPM)
            rc = moe__spm_fragment(v, &w, text + f[i].start, f[i].len, v->add_space_prefix && prev_special, &out);
        else
            rc = moe__bpe_fragment(v, &w, text + f[i].start, f[i].len, &out);
        prev_special = 0;
    }
    if (add_special && v->add_eos) moe__idbuf_push(&out, v->eos);
    moe__free(f);
    moe__work_free(&w);
    if (rc) return rc;
    *n_out = out.n;
    return out.n > cap ? MOE_ELIMIT : 0;
}

/* ---- pieces --------------------------------------------------------------------- */

static int emit(char *buf, size_t cap, size_t *pos, const void *s, size_t n) {
    if (*pos + n <= cap && n) memcpy(buf + *pos, s, n);
    *pos += n;
    return 0;
}

int moe_vocab_piece(const moe_vocab *v, int32_t id, char *buf, size_t cap, size_t *len_out) {
    if (len_out) *len_out = 0;
    if (!v || !len_out || (!buf && cap)) return MOE_EINVAL;
    if (id < 0 || id >= v->n) return MOE_EINVAL;
    unsigned a = v->attr[id];
    size_t len, pos = 0;
    const char *s = moe__vocab_str(v, id, &len);
    if (a & (MOE__TOK_CONTROL | MOE__TOK_UNKNOWN)) {
        /* nothing: special tokens print only with special = true */
    } else if (a & MOE__TOK_USER) {
        emit(buf, cap, &pos, s, len);
    } else if (a & MOE__TOK_NORMAL) {
        if (v->type == MOE__VOCAB_SPM) {
            for (size_t i = 0; i < len; i++) {
                if (i + 2 < len && !memcmp(s + i, "\xe2\x96\x81", 3)) {
                    emit(buf, cap, &pos, " ", 1);
                    i += 2;
                } else {
                    emit(buf, cap, &pos, s + i, 1);
                }
            }
        } else {
            const unsigned char *u = (const unsigned char *)s;
            for (size_t i = 0, adv; i < len; i += adv) {
                uint32_t cp = moe__utf8_decode(u + i, len - i, &adv);
                int b = moe__bpe_cp_byte(cp);
                if (b >= 0) {
                    unsigned char c = (unsigned char)b;
                    emit(buf, cap, &pos, &c, 1);
                } else { /* llama.cpp's marker for a code point no byte maps to */
                    unsigned char enc[4];
                    size_t ne = moe__utf8_encode(cp, enc);
                    char hex[3];
                    emit(buf, cap, &pos, "[UNK_BYTE_0x", 12);
                    for (size_t k = 0; k < ne; k++) {
                        snprintf(hex, sizeof hex, "%02x", enc[k]);
                        emit(buf, cap, &pos, hex, 2);
                    }
                    emit(buf, cap, &pos, s, len);
                    emit(buf, cap, &pos, "]", 1);
                }
            }
        }
    } else if (a & MOE__TOK_BYTE) {
        unsigned char c = (unsigned char)byte_text_value(s, len);
        emit(buf, cap, &pos, &c, 1);
    }
    *len_out = pos;
    return pos > cap ? MOE_ELIMIT : 0;
}
