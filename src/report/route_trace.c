/* The routing trace: one JSON object per token and a header line
 * (docs/audit.md, "Token trace"). */
#include "report/route_stats.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

/* Length of the valid UTF-8 sequence at s[0..n) (RFC 3629: no overlong
 * forms, no surrogates, at most U+10FFFF), or 0 when it is not one. */
static size_t utf8_len(const unsigned char *s, size_t n) {
    const unsigned c = s[0];
    size_t len;
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    else return 0;
    if (len > n || s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return len;
}

int moe__json_bytes(moe__sb *b, const void *sv, size_t n) {
    const unsigned char *s = sv;
    int lossy = 0;
    moe__sb_put(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        const unsigned c = s[i];
        if (c == '"' || c == '\\') {
            moe__sb_printf(b, "\\%c", c);
            i++;
        } else if (c < 0x20 || c == 0x7F) {
            moe__sb_printf(b, "\\u%04x", c);
            lossy |= c == 0; /* cJSON and C strings stop at a NUL */
            i++;
        } else {
            const size_t len = utf8_len(s + i, n - i);
            if (len) {
                moe__sb_put(b, s + i, len);
                i += len;
            } else {
                moe__sb_put(b, "\xEF\xBF\xBD", 3); /* U+FFFD */
                lossy = 1;
                i++;
            }
        }
    }
    moe__sb_put(b, "\"", 1);
    return lossy;
}

void moe__trace_write(moe__sb *b, const moe__trace_tok *t) {
    moe__sb_printf(b, "{\"pos\":%lld,\"token\":%d,\"src\":", t->pos, t->token);
    moe__json_bytes(b, t->src, strnlen(t->src, sizeof t->src));
    if (t->genre[0]) {
        moe__sb_str(b, ",\"genre\":");
        moe__json_bytes(b, t->genre, strnlen(t->genre, sizeof t->genre));
    }
    moe__sb_str(b, ",\"piece\":");
    if (moe__json_bytes(b, t->piece, t->piece_len)) {
        /* the text above is for people; these bytes are the token exactly */
        moe__sb_str(b, ",\"bytes\":\"");
        for (size_t i = 0; i < t->piece_len; i++) moe__sb_printf(b, "%02x", t->piece[i]);
        moe__sb_str(b, "\"");
    }
    moe__sb_str(b, ",\"layers\":[");
    for (int i = 0; i < t->n_layers; i++) {
        moe__sb_printf(b, "%s{\"layer\":%d,\"experts\":[", i ? "," : "", t->layer[i]);
        for (int s = t->off[i]; s < t->off[i + 1]; s++) moe__sb_printf(b, "%s%d", s > t->off[i] ? "," : "", t->ids[s]);
        moe__sb_str(b, "],\"weights\":[");
        /* %.9g: the float comes back bit for bit */
        for (int s = t->off[i]; s < t->off[i + 1]; s++)
            moe__sb_printf(b, "%s%.9g", s > t->off[i] ? "," : "", (double)t->w[s]);
        moe__sb_str(b, "]}");
    }
    moe__sb_str(b, "]}\n");
}

static int hexval(char c) {
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* an integer-valued number within [lo, hi] */
static int get_int(const cJSON *o, const char *key, double lo, double hi, double *v) {
    const cJSON *it = key ? cJSON_GetObjectItemCaseSensitive(o, key) : o;
    if (!cJSON_IsNumber(it) || !isfinite(it->valuedouble) || it->valuedouble != floor(it->valuedouble) ||
        it->valuedouble < lo || it->valuedouble > hi)
        return -1;
    *v = it->valuedouble;
    return 0;
}

static int copy_str(const cJSON *o, const char *key, char *dst, size_t cap, int optional) {
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, key);
    dst[0] = 0;
    if (!it) return optional ? 0 : -1;
    if (!cJSON_IsString(it) || strlen(it->valuestring) >= cap) return -1;
    strcpy(dst, it->valuestring);
    return 0;
}

static int parse_tok(const cJSON *o, moe__trace_tok *t, char *err, size_t errsz) {
    double v;
    if (get_int(o, "pos", 0, 9e15, &v)) return moe__set_err(err, errsz, MOE_EFORMAT, "trace: \"pos\" is not a count");
    t->pos = (long long)v;
    if (get_int(o, "token", 0, 2147483647.0, &v))
        return moe__set_err(err, errsz, MOE_EFORMAT, "trace: \"token\" is not a token id");
    t->token = (int)v;
    if (copy_str(o, "src", t->src, sizeof t->src, 0) || copy_str(o, "genre", t->genre, sizeof t->genre, 1))
        return moe__set_err(err, errsz, MOE_EFORMAT, "trace: \"src\" or \"genre\" is not a short string");
    const cJSON *piece = cJSON_GetObjectItemCaseSensitive(o, "piece"), *bytes = cJSON_GetObjectItemCaseSensitive(o, "bytes");
    if (!cJSON_IsString(piece)) return moe__set_err(err, errsz, MOE_EFORMAT, "trace: \"piece\" is not a string");
    if (bytes) {
        const char *h = cJSON_IsString(bytes) ? bytes->valuestring : NULL;
        const size_t hl = h ? strlen(h) : 1;
        if (hl % 2 || hl / 2 > MOE__TRACE_MAX_PIECE)
            return moe__set_err(err, errsz, MOE_EFORMAT, "trace: \"bytes\" is not hex of at most %d bytes",
                                MOE__TRACE_MAX_PIECE);
        for (size_t i = 0; i < hl / 2; i++) {
            const int hi = hexval(h[2 * i]), lo = hexval(h[2 * i + 1]);
            if (hi < 0 || lo < 0) return moe__set_err(err, errsz, MOE_EFORMAT, "trace: \"bytes\" holds a non-hex digit");
            t->piece[i] = (unsigned char)(hi * 16 + lo);
        }
        t->piece_len = hl / 2;
    } else {
        const size_t pl = strlen(piece->valuestring);
        if (pl > MOE__TRACE_MAX_PIECE)
            return moe__set_err(err, errsz, MOE_ELIMIT, "trace: piece longer than %d bytes", MOE__TRACE_MAX_PIECE);
        memcpy(t->piece, piece->valuestring, pl);
        t->piece_len = pl;
    }
    t->piece[t->piece_len] = 0;
    const cJSON *layers = cJSON_GetObjectItemCaseSensitive(o, "layers");
    if (!cJSON_IsArray(layers)) return moe__set_err(err, errsz, MOE_EFORMAT, "trace: \"layers\" is not an array");
    const int nl = cJSON_GetArraySize(layers);
    if (nl > MOE__TRACE_MAX_LAYERS)
        return moe__set_err(err, errsz, MOE_ELIMIT, "trace: %d layers (at most %d)", nl, MOE__TRACE_MAX_LAYERS);
    int ns = 0, i = 0;
    const cJSON *L;
    t->off[0] = 0;
    cJSON_ArrayForEach(L, layers) {
        const cJSON *ex = cJSON_GetObjectItemCaseSensitive(L, "experts"), *w = cJSON_GetObjectItemCaseSensitive(L, "weights");
        if (get_int(L, "layer", 0, 1e6, &v) || !cJSON_IsArray(ex) || !cJSON_IsArray(w) ||
            cJSON_GetArraySize(ex) != cJSON_GetArraySize(w))
            return moe__set_err(err, errsz, MOE_EFORMAT,
                                "trace: layer entry %d needs \"layer\" and \"experts\"/\"weights\" of one length", i);
        t->layer[i] = (int)v;
        const int k = cJSON_GetArraySize(ex);
        if (k > MOE__TRACE_MAX_SLOTS - ns)
            return moe__set_err(err, errsz, MOE_ELIMIT, "trace: more than %d slots in one token", MOE__TRACE_MAX_SLOTS);
        const cJSON *e = ex->child, *x = w->child;
        for (int s = 0; s < k; s++, e = e->next, x = x->next) {
            if (get_int(e, NULL, 0, 1 << 20, &v) || !cJSON_IsNumber(x) || !isfinite(x->valuedouble))
                return moe__set_err(err, errsz, MOE_EFORMAT, "trace: layer entry %d: bad expert id or weight", i);
            t->ids[ns + s] = (int)v;
            t->w[ns + s] = (float)x->valuedouble;
        }
        ns += k;
        t->off[++i] = ns;
    }
    t->n_layers = nl;
    return 0;
}

int moe__trace_parse(const char *line, size_t len, moe__trace_tok *t, char *err, size_t errsz) {
    memset(t, 0, offsetof(moe__trace_tok, piece));
    t->piece_len = 0, t->n_layers = 0;
    cJSON *o = cJSON_ParseWithLength(line, len);
    if (!cJSON_IsObject(o)) {
        cJSON_Delete(o);
        return moe__set_err(err, errsz, MOE_EFORMAT, "trace: a line is not a JSON object");
    }
    int rc = cJSON_GetObjectItemCaseSensitive(o, "moe_trace") ? 1 : parse_tok(o, t, err, errsz);
    cJSON_Delete(o);
    return rc;
}
