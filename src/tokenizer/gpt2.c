/* GPT-2 style byte-level BPE (tokenizer.ggml.model = gpt2), as llama.cpp's
 * llm_tokenizer_bpe: the text is decoded to code points, split into words by
 * the pre-tokenizer steps of tokenizer.ggml.pre (llama.cpp's regexes, written
 * out as scanners), each word's UTF-8 bytes are mapped to GPT-2's printable
 * code points, and merges are applied by rank within each word. */
#include "tokenizer/vocab_impl.h"

#include "tokenizer/unicode.h"

#include <string.h>

/* ---- GPT-2's byte <-> code point map ------------------------------------------ */

/* Printable Latin-1 bytes stand for themselves; the other 68 bytes map, in
 * byte order, to U+0100.. */
static int byte_is_self(unsigned b) { return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE; }

/* The others, in byte order: 0x00-0x20 (33), 0x7F-0xA0 (34), 0xAD. */
uint32_t moe__bpe_byte_cp(unsigned char b) {
    if (byte_is_self(b)) return b;
    return b <= 0x20 ? 256u + b : b <= 0xA0 ? 256u + 33 + (b - 0x7Fu) : 256u + 67;
}

int moe__bpe_cp_byte(uint32_t cp) {
    if (cp < 256) return byte_is_self(cp) ? (int)cp : -1;
    if (cp < 256 + 33) return (int)(cp - 256);
    if (cp < 256 + 67) return (int)(cp - 256 - 33 + 0x7F);
    return cp == 256 + 67 ? 0xAD : -1;
}

/* ---- pre-tokenizer names -------------------------------------------------------- */

typedef struct pre_def {
    const char *names; /* '|'-separated tokenizer.ggml.pre values */
    moe__pre_step steps[MOE__PRE_MAX_STEPS];
    int ignore_merges, add_bos;
} pre_def;

/* The values llama.cpp maps to each regex set, less those it gives other
 * behaviour this code lacks (token attributes by model name, ...). */
static const pre_def k_pre[] = {
    {"|default", {MOE__PRE_PUNCT_RUNS, MOE__PRE_GPT2, MOE__PRE_NUM_RUNS, MOE__PRE_DIGITS3}, 0, 0},
    {"gpt-2|phi-2|mpt|olmo|jais|trillion|granite-docling|exaone4|jina-es|jina-de|gigachat|a.x-4.0|mellum|"
     "jina-v1-en|roberta-bpe",
     {MOE__PRE_GPT2}, 0, 0},
    {"qwen2|deepseek-r1-qwen|kormo|f2llmv2|megrez|stablelm2|hunyuan|solar-open", {MOE__PRE_QWEN2}, 0, 0},
    {"qwen35", {MOE__PRE_QWEN35}, 0, 0},
    {"llama3|llama-v3|llama-bpe|falcon3|falcon-h1|pixtral|midm-2.0|lfm2|jina-v5-nano", {MOE__PRE_LLAMA3}, 1, 1},
    {"dbrx|smaug-bpe", {MOE__PRE_LLAMA3}, 0, 0},
    {"starcoder|refact|command-r|smollm|codeshell|exaone|minerva-7b|mellum2", {MOE__PRE_NUM_SINGLE, MOE__PRE_GPT2}, 0, 0},
    {"falcon", {MOE__PRE_PUNCT_RUNS_BT, MOE__PRE_GPT2, MOE__PRE_DIGITS3}, 0, 0},
    {"deepseek-v3|hunyuan-dense|joyai-llm", {MOE__PRE_NUM_1_3, MOE__PRE_HAN_KANA, MOE__PRE_DSV3}, 0, 0},
};

static int name_in(const char *list, const char *name) {
    size_t n = strlen(name);
    for (const char *p = list;;) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && !memcmp(p, name, n)) return 1;
        if (!bar) return 0;
        p = bar + 1;
    }
}

int moe__bpe_select_pre(moe_vocab *v, const char *name) {
    for (size_t i = 0; i < sizeof k_pre / sizeof *k_pre; i++) {
        if (!name_in(k_pre[i].names, name)) continue;
        memcpy(v->pre, k_pre[i].steps, sizeof v->pre);
        v->ignore_merges = k_pre[i].ignore_merges;
        v->add_bos = k_pre[i].add_bos;
        return 0;
    }
    return MOE_EUNSUPPORTED;
}

/* ---- pre-tokenizer steps ------------------------------------------------------ */

#define OOR 0xFFFFFFFFu /* "no code point": outside the piece being split */

typedef struct split {
    const uint32_t *cp;  /* [ncp] */
    const uint16_t *fl;  /* [ncp] moe__unicode_flags */
    size_t a, b;         /* the piece being split: [a, b) */
    size_t prev;         /* end of the last word emitted */
    size_t *out, nout;   /* word lengths (code points) */
} split;

static uint32_t cp_at(const split *s, size_t p) { return p >= s->a && p < s->b ? s->cp[p] : OOR; }
static unsigned fl_at(const split *s, size_t p) { return p >= s->a && p < s->b ? s->fl[p] : 0; }
/* Emits [prev, end) as a word (nothing when empty); returns its length. */
static size_t word(split *s, size_t end) {
    size_t n = end - s->prev;
    if (n) s->out[s->nout++] = n;
    s->prev = end;
    return n;
}
static uint32_t ascii_lower(uint32_t c) { return c >= 'A' && c <= 'Z' ? c + 32 : c; }

/* Length of a contraction ('s 't 're 've 'm 'll 'd) at p, 0 when none;
 * fold: ASCII case-insensitive (no other code point lower-cases to these
 * letters; tools/gen_unicode_tables.py checks it). */
static size_t contraction(const split *s, size_t p, int fold) {
    if (cp_at(s, p) != '\'' || p + 1 >= s->b) return 0;
    uint32_t c1 = cp_at(s, p + 1);
    if (fold) c1 = ascii_lower(c1);
    if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
    if (p + 2 >= s->b) return 0;
    uint32_t c2 = cp_at(s, p + 2);
    if (fold) c2 = ascii_lower(c2);
    if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return 3;
    return 0;
}

/* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ */
/* The whitespace alternatives the GPT-2 and Llama-3 patterns end with, for a
 * run of nws spaces at pos: '\s+(?!\S)' leaves one space to the next word,
 * '\s+' takes a run that ends the piece, and a character no alternative took
 * is a word of its own. Returns the new position. */
static size_t ws_word(split *s, size_t pos, size_t nws) {
    if (nws > 1 && cp_at(s, pos + nws) != OOR) pos += nws - 1;
    else if (nws > 0) pos += nws;
    else pos++;
    word(s, pos);
    return pos;
}

static void step_gpt2(split *s) {
    const unsigned LNS = MOE__UC_LETTER | MOE__UC_NUMBER | MOE__UC_SPACE;
    for (size_t pos = s->a; pos < s->b;) {
        uint32_t c = cp_at(s, pos);
        size_t k = contraction(s, pos, 0);
        if (k) {
            pos += word(s, pos + k);
            continue;
        }
        unsigned f2 = c == ' ' ? fl_at(s, pos + 1) : fl_at(s, pos);
        unsigned cls = f2 & MOE__UC_LETTER ? MOE__UC_LETTER : f2 & MOE__UC_NUMBER ? MOE__UC_NUMBER : 0;
        if (cls) { /* ' ?\p{L}+' or ' ?\p{N}+' */
            pos += c == ' ';
            while (fl_at(s, pos) & cls) pos++;
            word(s, pos);
            continue;
        }
        if (!(f2 & LNS) && f2) { /* ' ?[^\s\p{L}\p{N}]+' */
            pos += c == ' ';
            while (!(fl_at(s, pos) & LNS) && fl_at(s, pos)) pos++;
            word(s, pos);
            continue;
        }
        size_t nws = 0;
        while (fl_at(s, pos + nws) & MOE__UC_SPACE) nws++;
        pos = ws_word(s, pos, nws);
    }
}

/* (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,D}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 * with D = max_digits (qwen2: 1, llama3: 3); marks: \p{M} joins \p{L} (qwen35). */
static void step_llama3(split *s, size_t max_digits, int marks) {
    const unsigned L = MOE__UC_LETTER | (marks ? MOE__UC_MARK : 0);
    const unsigned LNS = L | MOE__UC_NUMBER | MOE__UC_SPACE;
    for (size_t pos = s->a; pos < s->b;) {
        uint32_t c = cp_at(s, pos);
        unsigned f = fl_at(s, pos);
        size_t k = contraction(s, pos, 1);
        if (k) {
            pos += word(s, pos + k);
            continue;
        }
        if (!(c == '\r' || c == '\n' || (f & MOE__UC_NUMBER)) && ((f & L) || (fl_at(s, pos + 1) & L))) {
            pos++; /* the optional non-letter prefix, or the first letter */
            while (fl_at(s, pos) & L) pos++;
            word(s, pos);
            continue;
        }
        if (f & MOE__UC_NUMBER) {
            size_t ini = pos;
            while (fl_at(s, pos) & MOE__UC_NUMBER) {
                if (++pos - ini >= max_digits) {
                    word(s, pos);
                    ini = pos;
                }
            }
            word(s, pos);
            continue;
        }
        unsigned f2 = c == ' ' ? fl_at(s, pos + 1) : f;
        if (!(f2 & LNS) && f) { /* ' ?[^\s\p{L}\p{N}]+[\r\n]*' (llama.cpp tests f, not f2, for "any class") */
            pos += c == ' ';
            while (!(fl_at(s, pos) & LNS) && fl_at(s, pos)) pos++;
            while (cp_at(s, pos) == '\r' || cp_at(s, pos) == '\n') pos++;
            word(s, pos);
            continue;
        }
        size_t nws = 0, last_rn = 0;
        while (fl_at(s, pos + nws) & MOE__UC_SPACE) {
            uint32_t c2 = cp_at(s, pos + nws);
            if (c2 == '\r' || c2 == '\n') last_rn = pos + nws + 1;
            nws++;
        }
        if (last_rn > 0) { /* '\s*[\r\n]+' */
            pos = last_rn;
            word(s, pos);
        } else {
            pos = ws_word(s, pos, nws);
        }
    }
}

/* Character classes of the steps llama.cpp runs through std::regex on its
 * "collapsed" text (ASCII as is, other code points by category, non-ASCII
 * white space never matching). */
static int in_class(moe__pre_step st, uint32_t c, unsigned f) {
    int ascii = c < 128;
    switch (st) {
    case MOE__PRE_PUNCT_RUNS: /* [\p{P}\$\+<=>\^~\|]: ASCII punctuation and symbols but ` */
    case MOE__PRE_PUNCT_RUNS_BT:
        if (ascii) return c > 0x20 && c < 0x7F && !(c >= '0' && c <= '9') && !((c | 32) >= 'a' && (c | 32) <= 'z') &&
                          (c != '`' || st == MOE__PRE_PUNCT_RUNS_BT);
        return (f & MOE__UC_PUNCT) && !(f & MOE__UC_SPACE);
    case MOE__PRE_NUM_RUNS:
    case MOE__PRE_NUM_SINGLE:
    case MOE__PRE_NUM_1_3:
        if (ascii) return c >= '0' && c <= '9';
        return (f & MOE__UC_NUMBER) && !(f & MOE__UC_SPACE);
    case MOE__PRE_DIGITS3: return c >= '0' && c <= '9';
    case MOE__PRE_HAN_KANA: return (c >= 0x4E00 && c <= 0x9FA5) || (c >= 0x3040 && c <= 0x30FF);
    default: return 0;
    }
}

/* Matches of a character-class regex become words, and so do the gaps
 * between them: runs ('[...]+'), single characters ('\p{N}') or three ASCII
 * digits ('[0-9][0-9][0-9]', leftmost, not overlapping). */
static void step_class(split *s, moe__pre_step st) {
    for (size_t pos = s->a; pos < s->b;) {
        if (!in_class(st, s->cp[pos], s->fl[pos])) {
            pos++;
            continue;
        }
        size_t end = pos + 1;
        if (st == MOE__PRE_DIGITS3) {
            if (pos + 3 > s->b || !in_class(st, s->cp[pos + 1], 0) || !in_class(st, s->cp[pos + 2], 0)) {
                pos++;
                continue;
            }
            end = pos + 3;
        } else if (st != MOE__PRE_NUM_SINGLE) {
            size_t max = st == MOE__PRE_NUM_1_3 ? 3 : SIZE_MAX;
            while (end < s->b && end - pos < max && in_class(st, s->cp[end], s->fl[end])) end++;
        }
        word(s, pos); /* the gap */
        word(s, end);
        pos = end;
    }
    word(s, s->b);
}

/* deepseek-v3's third regex, which llama.cpp runs through std::regex on its
 * collapsed text (ASCII as is; other code points by category, non-ASCII
 * white space as \v):
 *   [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+ | [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+
 *   | ?[\p{P}\p{S}]+[\r\n]* | \s*[\r\n]+ | \s+(?!\S) | \s+
 * Alternatives are tried in order at the leftmost position where one
 * matches. In the collapsed classes \p{P} and \p{S} cover only the ASCII
 * characters llama.cpp lists for them ('~' is in neither). */
enum { C_L = 1, C_M = 2, C_P = 4, C_S = 8, C_SPACE = 16, C_ASCII_LETTER = 32, C_ASCII_PUNCT = 64, C_CRLF = 128 };
static unsigned dsv3_class(uint32_t c, unsigned f) {
    if (c < 128) {
        unsigned k = 0;
        int letter = (c | 32) >= 'a' && (c | 32) <= 'z';
        if (letter) k |= C_L | C_ASCII_LETTER;
        if (c > 0x20 && c < 0x7F && !letter && !(c >= '0' && c <= '9')) {
            k |= C_ASCII_PUNCT;
            k |= strchr("$+<=>^`|", (int)c) ? C_S : c == '~' ? 0 : C_P;
        }
        if (c == ' ' || (c >= '\t' && c <= '\r')) k |= C_SPACE;
        if (c == '\r' || c == '\n') k |= C_CRLF;
        return k;
    }
    if (f & MOE__UC_SPACE) return C_SPACE;
    return f & MOE__UC_LETTER ? C_L : f & MOE__UC_MARK ? C_M : f & MOE__UC_PUNCT ? C_P : f & MOE__UC_SYMBOL ? C_S : 0;
}

/* End of the match at p, 0 when no alternative matches there. */
static size_t dsv3_match(const split *s, size_t p) {
    size_t b = s->b;
#define K(i) ((i) < b ? dsv3_class(s->cp[i], s->fl[i]) : 0u)
    unsigned k0 = K(p);
    if ((k0 & C_ASCII_PUNCT) && (K(p + 1) & C_ASCII_LETTER)) {
        size_t e = p + 1;
        while (K(e) & C_ASCII_LETTER) e++;
        return e;
    }
    size_t q = p + (!(k0 & (C_CRLF | C_L | C_P | C_S)) && (K(p + 1) & (C_L | C_M))); /* the optional prefix */
    if (K(q) & (C_L | C_M)) {
        while (K(q) & (C_L | C_M)) q++;
        return q;
    }
    q = p + (s->cp[p] == ' ' && (K(p + 1) & (C_P | C_S)));
    if (K(q) & (C_P | C_S)) {
        while (K(q) & (C_P | C_S)) q++;
        while (K(q) & C_CRLF) q++;
        return q;
    }
    size_t e = p, last_crlf = 0;
    while (K(e) & C_SPACE) {
        if (K(e) & C_CRLF) last_crlf = e + 1;
        e++;
    }
#undef K
    if (last_crlf) return last_crlf;
    if (e == p) return 0;
    return e < b && e - p > 1 ? e - 1 : e; /* \s+(?!\S) leaves the last space; at the end, or one space: \s+ */
}

static void step_dsv3(split *s) {
    for (size_t pos = s->a; pos < s->b;) {
        size_t e = dsv3_match(s, pos);
        if (!e) {
            pos++;
            continue;
        }
        word(s, pos); /* the gap */
        word(s, e);
        pos = e;
    }
    word(s, s->b);
}

/* ---- encoding -------------------------------------------------------------------- */

typedef struct bpe_scratch {
    uint32_t *cp;
    uint16_t *fl;
    size_t *len[2];
} bpe_scratch;

static void scratch_free(bpe_scratch *t) {
    moe__free(t->cp);
    moe__free(t->fl);
    moe__free(t->len[0]);
    moe__free(t->len[1]);
}

/* Byte-encodes one word (code points [p, p+n)) into w->buf and merges it. */
static int encode_word(const moe_vocab *v, moe__work *w, const uint32_t *cp, size_t n, moe__idbuf *out) {
    size_t need;
    if (moe__mul_size(n, 8, &need) || moe__buf_reserve(w, need)) return MOE_ENOMEM;
    size_t len = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char u[4];
        size_t k = moe__utf8_encode(cp[i], u);
        for (size_t j = 0; j < k; j++) len += moe__utf8_encode(moe__bpe_byte_cp(u[j]), w->buf + len);
    }
    if (v->ignore_merges) { /* a word that is a token is taken whole */
        int32_t id = moe__vocab_find(v, (const char *)w->buf, len);
        if (id >= 0) {
            moe__idbuf_push(out, id);
            return 0;
        }
    }
    int rc = moe__merge_symbols(v, w, len);
    if (rc) return rc;
    for (int32_t i = 0; i >= 0 && len; i = w->sym[i].next) {
        const moe__sym *s = &w->sym[i];
        if (s->id >= 0) {
            moe__idbuf_push(out, s->id);
            continue;
        }
        /* No token: llama.cpp looks each byte up as a one-byte token and
         * drops the bytes that are none. */
        for (uint32_t k = 0; k < s->n; k++) {
            int32_t id = moe__vocab_find(v, (const char *)w->buf + s->start + k, 1);
            if (id >= 0) moe__idbuf_push(out, id);
        }
    }
    return 0;
}

int moe__bpe_fragment(const moe_vocab *v, moe__work *w, const char *text, size_t len, moe__idbuf *out) {
    bpe_scratch t = {0};
    int rc = MOE_ENOMEM;
    t.cp = moe__calloc(len + 1, sizeof *t.cp);
    t.fl = moe__calloc(len + 1, sizeof *t.fl);
    t.len[0] = moe__calloc(len + 1, sizeof(size_t));
    t.len[1] = moe__calloc(len + 1, sizeof(size_t));
    if (!t.cp || !t.fl || !t.len[0] || !t.len[1]) goto done;
    size_t ncp = 0;
    for (size_t p = 0, adv; p < len; p += adv) {
        uint32_t c = moe__utf8_decode((const unsigned char *)text + p, len - p, &adv);
        if (c >= MOE__UC_MAX) { /* llama.cpp aborts re-encoding it */
            rc = MOE_EINVAL;
            goto done;
        }
        t.fl[ncp] = (uint16_t)moe__unicode_flags(c);
        t.cp[ncp++] = c;
    }
    /* Pieces as lengths in code points; each step splits every piece. */
    size_t *pieces = t.len[0], np = 0;
    if (ncp) pieces[np++] = ncp;
    for (int k = 0; k < MOE__PRE_MAX_STEPS && v->pre[k] != MOE__PRE_END; k++) {
        split s = {t.cp, t.fl, 0, 0, 0, t.len[(k + 1) & 1], 0};
        for (size_t i = 0, start = 0; i < np; start += pieces[i++]) {
            s.a = s.prev = start;
            s.b = start + pieces[i];
            switch (v->pre[k]) {
            case MOE__PRE_GPT2: step_gpt2(&s); break;
            case MOE__PRE_QWEN2: step_llama3(&s, 1, 0); break;
            case MOE__PRE_LLAMA3: step_llama3(&s, 3, 0); break;
            case MOE__PRE_QWEN35: step_llama3(&s, 1, 1); break;
            case MOE__PRE_DSV3: step_dsv3(&s); break;
            default: step_class(&s, v->pre[k]); break;
            }
        }
        pieces = s.out;
        np = s.nout;
    }
    rc = 0;
    for (size_t i = 0, start = 0; i < np && !rc; start += pieces[i++]) rc = encode_word(v, w, t.cp + start, pieces[i], out);
done:
    scratch_free(&t);
    return rc;
}
