/* Byte-level BPE: pre-tokeniser, trainer (incremental pair counts), encoder,
 * decoder and the tokenizer.json reader (hostile-input safe) and writer. */
#include "tokenizer/tokenizer.h"

#include "internal.h"
#include "io/atomic.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* ---- u64 -> int32 open-addressing map ------------------------------------ */

#define MAP_EMPTY UINT64_MAX /* never a key: pair keys are (a << 32 | b), a, b < 2^31 */

typedef struct u64map {
    uint64_t *keys;
    int32_t *vals;
    size_t mask, n;
} u64map;

static inline uint64_t mix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

static inline uint64_t pair_key(int32_t a, int32_t b) {
    return ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
}

static int map_alloc(u64map *m, size_t cap) { /* cap: a power of two */
    m->keys = moe__malloc(cap * sizeof *m->keys);
    m->vals = moe__malloc(cap * sizeof *m->vals);
    if (!m->keys || !m->vals) {
        moe__free(m->keys);
        moe__free(m->vals);
        m->keys = NULL;
        m->vals = NULL;
        return -1;
    }
    for (size_t i = 0; i < cap; i++) m->keys[i] = MAP_EMPTY;
    m->mask = cap - 1;
    m->n = 0;
    return 0;
}

static int map_init(u64map *m, size_t expect) {
    size_t cap = 16;
    while (cap / 2 < expect) cap *= 2;
    return map_alloc(m, cap);
}

static void map_free(u64map *m) {
    moe__free(m->keys);
    moe__free(m->vals);
    m->keys = NULL;
    m->vals = NULL;
}

static inline int32_t map_get(const u64map *m, uint64_t k) {
    for (size_t i = mix64(k) & m->mask;; i = (i + 1) & m->mask) {
        if (m->keys[i] == k) return m->vals[i];
        if (m->keys[i] == MAP_EMPTY) return -1;
    }
}

static void map_insert_raw(u64map *m, uint64_t k, int32_t v) {
    size_t i = mix64(k) & m->mask;
    while (m->keys[i] != MAP_EMPTY) i = (i + 1) & m->mask;
    m->keys[i] = k;
    m->vals[i] = v;
    m->n++;
}

/* Inserts a key known to be absent; grows to keep the load <= 1/2. */
static int map_put(u64map *m, uint64_t k, int32_t v) {
    if ((m->n + 1) * 2 > m->mask + 1) {
        u64map g;
        if (map_alloc(&g, (m->mask + 1) * 2)) return -1;
        for (size_t i = 0; i <= m->mask; i++)
            if (m->keys[i] != MAP_EMPTY) map_insert_raw(&g, m->keys[i], m->vals[i]);
        map_free(m);
        *m = g;
    }
    map_insert_raw(m, k, v);
    return 0;
}

/* Grows *p (elements of size sz) to hold at least need elements. */
static int grow(void **p, size_t *cap, size_t need, size_t sz) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 16;
    while (c < need) {
        if (c > SIZE_MAX / 2) return -1;
        c *= 2;
    }
    size_t bytes;
    if (moe__mul_size(c, sz, &bytes)) return -1;
    void *q = moe__malloc(bytes);
    if (!q) return -1;
    if (*p && *cap) memcpy(q, *p, *cap * sz);
    moe__free(*p);
    *p = q;
    *cap = c;
    return 0;
}

/* ---- the tokenizer object ------------------------------------------------ */

struct moe_tokenizer {
    int vocab_size; /* 257 + n_merges */
    int n_merges;
    int32_t *merges;      /* [n_merges][2] */
    uint32_t *off;        /* [vocab_size]: piece of id i is bytes[off[i] .. off[i+1]) for i < EOS */
    unsigned char *bytes; /* all pieces */
    u64map rank;          /* pair key -> merge rank */
};

void moe_tokenizer_free(moe_tokenizer *t) {
    if (!t) return;
    moe__free(t->merges);
    moe__free(t->off);
    moe__free(t->bytes);
    map_free(&t->rank);
    moe__free(t);
}

int moe_tokenizer_vocab_size(const moe_tokenizer *t) { return t ? t->vocab_size : 0; }
int moe_tokenizer_eos(const moe_tokenizer *t) { return t ? t->vocab_size - 1 : -1; }
int moe_tokenizer_n_merges(const moe_tokenizer *t) { return t ? t->n_merges : 0; }

int moe_tokenizer_merge(const moe_tokenizer *t, int r, int32_t *a, int32_t *b) {
    if (!t || r < 0 || r >= t->n_merges || !a || !b) return MOE_EINVAL;
    *a = t->merges[2 * r];
    *b = t->merges[2 * r + 1];
    return 0;
}

const char *moe_tokenizer_piece(const moe_tokenizer *t, int id, size_t *len) {
    if (len) *len = 0;
    if (!t || id < 0 || id >= t->vocab_size) return NULL;
    if (id == t->vocab_size - 1) {
        if (len) *len = sizeof MOE_TOKENIZER_EOS_TEXT - 1;
        return MOE_TOKENIZER_EOS_TEXT;
    }
    if (len) *len = t->off[id + 1] - t->off[id];
    return (const char *)t->bytes + t->off[id];
}

/* Builds a tokenizer from merges (taken over: freed on failure too). Checks
 * what the loader needs: ids refer to earlier ids, no duplicates, pieces not
 * longer than a chunk. name labels messages. */
static int tok_build(int32_t *merges, int n_merges, moe_tokenizer **out, const char *name,
                     char *err, size_t errsz) {
    *out = NULL;
    int rc = 0;
    moe_tokenizer *t = moe__calloc(1, sizeof *t);
    if (!t) {
        moe__free(merges);
        return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", name);
    }
    t->merges = merges;
    t->n_merges = n_merges;
    t->vocab_size = 257 + n_merges;
    size_t n_ids = (size_t)256 + (size_t)n_merges; /* ids with bytes (all but EOS) */
    t->off = moe__malloc((n_ids + 1) * sizeof *t->off);
    if (!t->off || map_init(&t->rank, (size_t)n_merges)) {
        rc = moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", name);
        goto fail;
    }
    /* Piece lengths first (into off[i+1]), then prefix sums. */
    t->off[0] = 0;
    for (size_t i = 0; i < 256; i++) t->off[i + 1] = 1;
    for (int r = 0; r < n_merges; r++) {
        int32_t a = merges[2 * r], b = merges[2 * r + 1];
        int32_t id = 256 + r;
        if (a < 0 || b < 0 || a >= id || b >= id) {
            rc = moe__set_err(err, errsz, MOE_EFORMAT,
                              "%s: field \"merges\"[%d]: [%d,%d] refers to an id not defined "
                              "before it (merge %d defines id %d)",
                              name, r, (int)a, (int)b, r, (int)id);
            goto fail;
        }
        uint64_t k = pair_key(a, b);
        if (map_get(&t->rank, k) >= 0) {
            rc = moe__set_err(err, errsz, MOE_EFORMAT,
                              "%s: field \"merges\"[%d]: duplicate merge [%d,%d] (first at %d)",
                              name, r, (int)a, (int)b, (int)map_get(&t->rank, k));
            goto fail;
        }
        uint32_t la = t->off[a + 1], lb = t->off[b + 1]; /* still lengths here */
        if (la + lb > MOE_TOKENIZER_MAX_CHUNK) {
            rc = moe__set_err(err, errsz, MOE_EFORMAT,
                              "%s: field \"merges\"[%d]: token of %u bytes is longer than a "
                              "pre-token chunk (%d bytes)",
                              name, r, (unsigned)(la + lb), MOE_TOKENIZER_MAX_CHUNK);
            goto fail;
        }
        t->off[id + 1] = la + lb;
        if (map_put(&t->rank, k, r)) {
            rc = moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", name);
            goto fail;
        }
    }
    /* Lengths are <= 64 and n_ids <= 2^20, so the sums fit in 32 bits. */
    for (size_t i = 0; i < n_ids; i++) t->off[i + 1] += t->off[i];
    t->bytes = moe__malloc(t->off[n_ids] ? t->off[n_ids] : 1);
    if (!t->bytes) {
        rc = moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", name);
        goto fail;
    }
    for (int i = 0; i < 256; i++) t->bytes[i] = (unsigned char)i;
    for (int r = 0; r < n_merges; r++) {
        int32_t a = merges[2 * r], b = merges[2 * r + 1];
        unsigned char *dst = t->bytes + t->off[256 + r];
        uint32_t la = t->off[a + 1] - t->off[a];
        memcpy(dst, t->bytes + t->off[a], la);
        memcpy(dst + la, t->bytes + t->off[b], t->off[b + 1] - t->off[b]);
    }
    *out = t;
    return 0;
fail:
    moe_tokenizer_free(t);
    return rc;
}

/* ---- pre-tokeniser ------------------------------------------------------- */

enum { C_SPACE = 0, C_LETTER = 1, C_DIGIT = 2, C_OTHER = 3 };

static inline int byte_class(unsigned char c) {
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f') return C_SPACE;
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80) return C_LETTER;
    if (c >= '0' && c <= '9') return C_DIGIT;
    return C_OTHER;
}

size_t moe__bpe_chunk_end(const unsigned char *s, size_t len, size_t i) {
    if (i >= len) return len;
    /* Scanning stops at the chunk limit, so a long run costs O(run), not O(run^2). */
    const size_t max = MOE_TOKENIZER_MAX_CHUNK;
    size_t lim = len - i > max ? i + max : len, j;
    int c = byte_class(s[i]);
    if (s[i] == ' ' && i + 1 < len && byte_class(s[i + 1]) != C_SPACE) {
        int k = byte_class(s[i + 1]); /* " word", " 123", " ?!" */
        j = i + 2;
        while (j < lim && byte_class(s[j]) == k) j++;
    } else if (c == C_SPACE) {
        size_t wlim = len - i > max + 1 ? i + max + 1 : len;
        j = i + 1;
        while (j < wlim && byte_class(s[j]) == C_SPACE) j++;
        if (j < len && byte_class(s[j]) == C_SPACE) {
            j = i + max; /* the run goes on past the limit */
        } else {
            if (j < len && j - i >= 2 && s[j - 1] == ' ') j--; /* leave the space to the word */
            if (j - i > max) j = i + max;
        }
    } else {
        j = i + 1;
        while (j < lim && byte_class(s[j]) == c) j++;
    }
    return j;
}

/* ---- encode / decode ----------------------------------------------------- */

/* BPE on one chunk in place; returns the new length. */
static size_t bpe_chunk(const moe_tokenizer *t, int32_t *s, size_t m) {
    while (m >= 2) {
        int32_t best = INT32_MAX;
        for (size_t k = 0; k + 1 < m; k++) {
            int32_t r = map_get(&t->rank, pair_key(s[k], s[k + 1]));
            if (r >= 0 && r < best) best = r;
        }
        if (best == INT32_MAX) break;
        int32_t a = t->merges[2 * best], b = t->merges[2 * best + 1], z = 256 + best;
        size_t w = 0;
        for (size_t k = 0; k < m;) {
            if (k + 1 < m && s[k] == a && s[k + 1] == b) {
                s[w++] = z;
                k += 2;
            } else {
                s[w++] = s[k++];
            }
        }
        m = w;
    }
    return m;
}

int moe_tokenizer_encode(const moe_tokenizer *t, const char *text, size_t len, int32_t *ids,
                         size_t cap, size_t *n_out) {
    if (n_out) *n_out = 0;
    if (!t || !n_out || (!text && len) || (!ids && cap)) return MOE_EINVAL;
    const unsigned char *s = (const unsigned char *)text;
    int32_t sym[MOE_TOKENIZER_MAX_CHUNK];
    size_t n = 0;
    for (size_t i = 0; i < len;) {
        size_t j = moe__bpe_chunk_end(s, len, i);
        size_t m = j - i;
        for (size_t k = 0; k < m; k++) sym[k] = s[i + k];
        m = bpe_chunk(t, sym, m);
        for (size_t k = 0; k < m; k++, n++)
            if (n < cap) ids[n] = sym[k];
        i = j;
    }
    *n_out = n;
    return n > cap ? MOE_ELIMIT : 0;
}

int moe_tokenizer_decode(const moe_tokenizer *t, const int32_t *ids, size_t n, char *out,
                         size_t cap, size_t *len_out) {
    if (len_out) *len_out = 0;
    if (!t || !len_out || (!ids && n) || (!out && cap)) return MOE_EINVAL;
    int32_t eos = t->vocab_size - 1;
    size_t need = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->vocab_size) return MOE_EINVAL;
        if (id == eos) continue;
        size_t l = t->off[id + 1] - t->off[id];
        if (need + l <= cap) memcpy(out + need, t->bytes + t->off[id], l);
        need += l;
    }
    *len_out = need;
    if (need < cap) out[need] = '\0';
    return need > cap ? MOE_ELIMIT : 0;
}

/* ---- training ------------------------------------------------------------ */

typedef struct tr_word {
    size_t start; /* into tr.sym */
    int32_t len;
    int64_t freq;
} tr_word;

typedef struct tr_pair {
    int32_t a, b;
    int64_t count;
    int32_t *w; /* words that contain (or contained) the pair, no repeats in a row */
    int32_t nw, cw;
    int32_t stamp; /* last merge step that increased it */
} tr_pair;

typedef struct tr_heap_ent {
    int64_t count;
    int32_t a, b, idx;
} tr_heap_ent;

typedef struct tr {
    int32_t *sym;
    tr_word *words;
    size_t n_words;
    tr_pair *pairs;
    size_t n_pairs, cap_pairs;
    u64map pmap;
    tr_heap_ent *heap;
    size_t n_heap, cap_heap;
    int32_t *touched;
    size_t n_touched, cap_touched;
    int32_t step;
    int oom;
} tr;

static inline int heap_before(const tr_heap_ent *x, const tr_heap_ent *y) {
    if (x->count != y->count) return x->count > y->count;
    if (x->a != y->a) return x->a < y->a;
    return x->b < y->b;
}

static void heap_push(tr *c, int32_t idx) {
    if (grow((void **)&c->heap, &c->cap_heap, c->n_heap + 1, sizeof *c->heap)) {
        c->oom = 1;
        return;
    }
    tr_heap_ent e = {c->pairs[idx].count, c->pairs[idx].a, c->pairs[idx].b, idx};
    size_t i = c->n_heap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_before(&e, &c->heap[p])) break;
        c->heap[i] = c->heap[p];
        i = p;
    }
    c->heap[i] = e;
}

static tr_heap_ent heap_pop(tr *c) {
    tr_heap_ent top = c->heap[0], e = c->heap[--c->n_heap];
    size_t n = c->n_heap, i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const tr_heap_ent *best = &e;
        if (l < n && heap_before(&c->heap[l], best)) m = l, best = &c->heap[l];
        if (r < n && heap_before(&c->heap[r], best)) m = r;
        if (m == i) break;
        c->heap[i] = c->heap[m];
        i = m;
    }
    if (n > 0) c->heap[i] = e;
    return top;
}

/* count(a, b) += delta; for an increase, remembers word wi and marks the pair
 * as touched in this step (it is pushed on the heap after the step). */
static void pair_add(tr *c, int32_t a, int32_t b, int64_t delta, int32_t wi) {
    uint64_t k = pair_key(a, b);
    int32_t idx = map_get(&c->pmap, k);
    if (idx < 0) {
        if (c->n_pairs >= (size_t)INT32_MAX ||
            grow((void **)&c->pairs, &c->cap_pairs, c->n_pairs + 1, sizeof *c->pairs) ||
            map_put(&c->pmap, k, (int32_t)c->n_pairs)) {
            c->oom = 1;
            return;
        }
        idx = (int32_t)c->n_pairs++;
        c->pairs[idx] = (tr_pair){a, b, 0, NULL, 0, 0, -1};
    }
    tr_pair *p = &c->pairs[idx];
    p->count += delta;
    if (delta <= 0) return;
    if (p->nw == 0 || p->w[p->nw - 1] != wi) {
        if (p->nw == p->cw) {
            size_t cw = (size_t)p->cw;
            if (p->cw >= INT32_MAX / 2 ||
                grow((void **)&p->w, &cw, (size_t)p->nw + 1, sizeof *p->w)) {
                c->oom = 1;
                return;
            }
            p->cw = (int32_t)cw;
        }
        p->w[p->nw++] = wi;
    }
    if (p->stamp != c->step) {
        p->stamp = c->step;
        if (grow((void **)&c->touched, &c->cap_touched, c->n_touched + 1, sizeof *c->touched)) {
            c->oom = 1;
            return;
        }
        c->touched[c->n_touched++] = idx;
    }
}

/* Unique pre-token chunks and their counts (keys: byte strings). */
typedef struct ch_ent {
    uint64_t hash;
    size_t off; /* into arena */
    uint32_t len;
    int64_t count;
} ch_ent;

typedef struct chmap {
    int32_t *slots; /* -1 empty, else index into ents */
    size_t mask;
    ch_ent *ents;
    size_t n, cap;
    unsigned char *arena;
    size_t alen, acap;
} chmap;

static uint64_t bytes_hash(const unsigned char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 0x100000001b3ULL;
    return mix64(h);
}

static int chmap_slots(chmap *m, size_t cap) {
    int32_t *s = moe__malloc(cap * sizeof *s);
    if (!s) return -1;
    for (size_t i = 0; i < cap; i++) s[i] = -1;
    for (size_t e = 0; e < m->n; e++) {
        size_t i = m->ents[e].hash & (cap - 1);
        while (s[i] >= 0) i = (i + 1) & (cap - 1);
        s[i] = (int32_t)e;
    }
    moe__free(m->slots);
    m->slots = s;
    m->mask = cap - 1;
    return 0;
}

static int chmap_add(chmap *m, const unsigned char *s, size_t n) {
    uint64_t h = bytes_hash(s, n);
    size_t i = h & m->mask;
    for (; m->slots[i] >= 0; i = (i + 1) & m->mask) {
        ch_ent *e = &m->ents[m->slots[i]];
        if (e->hash == h && e->len == n && !memcmp(m->arena + e->off, s, n)) {
            e->count++;
            return 0;
        }
    }
    if (m->n >= (size_t)INT32_MAX - 1) return -1;
    if (grow((void **)&m->ents, &m->cap, m->n + 1, sizeof *m->ents) ||
        grow((void **)&m->arena, &m->acap, m->alen + n, 1))
        return -1;
    memcpy(m->arena + m->alen, s, n);
    m->ents[m->n] = (ch_ent){h, m->alen, (uint32_t)n, 1};
    m->alen += n;
    m->slots[i] = (int32_t)m->n++;
    if (m->n * 2 > m->mask + 1 && chmap_slots(m, (m->mask + 1) * 2)) return -1;
    return 0;
}

static void chmap_free(chmap *m) {
    moe__free(m->slots);
    moe__free(m->ents);
    moe__free(m->arena);
}

static void tr_free(tr *c) {
    for (size_t i = 0; i < c->n_pairs; i++) moe__free(c->pairs[i].w);
    moe__free(c->pairs);
    map_free(&c->pmap);
    moe__free(c->heap);
    moe__free(c->touched);
    moe__free(c->sym);
    moe__free(c->words);
}

/* Pushes the pairs increased in this step (all of them contain the new id). */
static void push_touched(tr *c) {
    for (size_t i = 0; i < c->n_touched && !c->oom; i++)
        if (c->pairs[c->touched[i]].count > 0) heap_push(c, c->touched[i]);
    c->n_touched = 0;
}

/* Applies merge (a, b) -> z to every word that holds the pair. */
static void apply_merge(tr *c, int32_t best, int32_t z) {
    int32_t a = c->pairs[best].a, b = c->pairs[best].b;
    int32_t *list = c->pairs[best].w, nw = c->pairs[best].nw;
    c->pairs[best].w = NULL;
    c->pairs[best].nw = c->pairs[best].cw = 0;
    for (int32_t li = 0; li < nw && !c->oom; li++) {
        int32_t wi = list[li];
        tr_word *w = &c->words[wi];
        int32_t *s = c->sym + w->start;
        int32_t len = w->len;
        int64_t f = w->freq;
        for (int32_t k = 0; k + 1 < len;) {
            if (s[k] != a || s[k + 1] != b) {
                k++;
                continue;
            }
            if (k > 0) {
                pair_add(c, s[k - 1], a, -f, wi);
                pair_add(c, s[k - 1], z, f, wi);
            }
            if (k + 2 < len) {
                pair_add(c, b, s[k + 2], -f, wi);
                pair_add(c, z, s[k + 2], f, wi);
            }
            s[k] = z;
            memmove(s + k + 1, s + k + 2, (size_t)(len - k - 2) * sizeof *s);
            len--;
            k++;
        }
        w->len = len;
    }
    moe__free(list);
    c->pairs[best].count = 0; /* every occurrence was in the list */
}

int moe_tokenizer_train(const char *const *texts, const size_t *lens, size_t n_texts,
                        int vocab_size, moe_tokenizer **out, char *err, size_t errsz) {
    if (out) *out = NULL;
    if (!out || (n_texts && (!texts || !lens)))
        return moe__set_err(err, errsz, MOE_EINVAL, "moe_tokenizer_train: invalid arguments");
    if (vocab_size < 257)
        return moe__set_err(err, errsz, MOE_EINVAL,
                            "moe_tokenizer_train: vocab_size %d < 257 (256 bytes + EOS)",
                            vocab_size);
    if (vocab_size > MOE_TOKENIZER_MAX_VOCAB)
        return moe__set_err(err, errsz, MOE_ELIMIT,
                            "moe_tokenizer_train: vocab_size %d > limit %d", vocab_size,
                            MOE_TOKENIZER_MAX_VOCAB);
    for (size_t i = 0; i < n_texts; i++)
        if (!texts[i] && lens[i])
            return moe__set_err(err, errsz, MOE_EINVAL,
                                "moe_tokenizer_train: text %zu is NULL", i);

    /* 1. Unique chunks of two or more bytes (single bytes hold no pair). */
    chmap cm = {0};
    tr c = {0};
    int32_t *merges = NULL;
    int rc = 0;
    if (chmap_slots(&cm, 1 << 16)) goto oom;
    for (size_t ti = 0; ti < n_texts; ti++) {
        const unsigned char *s = (const unsigned char *)texts[ti];
        for (size_t i = 0, n = lens[ti]; i < n;) {
            size_t j = moe__bpe_chunk_end(s, n, i);
            if (j - i >= 2 && chmap_add(&cm, s + i, j - i)) goto oom;
            i = j;
        }
    }

    /* 2. Words as symbol sequences. */
    c.n_words = cm.n;
    c.words = moe__calloc(cm.n ? cm.n : 1, sizeof *c.words);
    c.sym = moe__calloc(cm.alen ? cm.alen : 1, sizeof *c.sym);
    if (!c.words || !c.sym) goto oom;
    for (size_t e = 0; e < cm.n; e++) {
        c.words[e] = (tr_word){cm.ents[e].off, (int32_t)cm.ents[e].len, cm.ents[e].count};
        for (uint32_t k = 0; k < cm.ents[e].len; k++)
            c.sym[cm.ents[e].off + k] = cm.arena[cm.ents[e].off + k];
    }
    chmap_free(&cm);
    memset(&cm, 0, sizeof cm);

    /* 3. Initial pair counts and where-lists, then the heap. */
    if (map_init(&c.pmap, 1 << 14)) goto oom;
    c.step = 0;
    for (size_t wi = 0; wi < c.n_words && !c.oom; wi++) {
        const tr_word *w = &c.words[wi];
        for (int32_t k = 0; k + 1 < w->len; k++)
            pair_add(&c, c.sym[w->start + k], c.sym[w->start + k + 1], w->freq, (int32_t)wi);
    }
    push_touched(&c);
    if (c.oom) goto oom;

    /* 4. Merges. */
    int target = vocab_size - 257, nm = 0;
    merges = moe__malloc((size_t)(target ? target : 1) * 2 * sizeof *merges);
    if (!merges) goto oom;
    while (nm < target) {
        int32_t best = -1;
        while (c.n_heap > 0) {
            tr_heap_ent e = heap_pop(&c);
            int64_t now = c.pairs[e.idx].count;
            if (now != e.count) { /* stale: counts of old pairs only go down */
                if (now > 0) heap_push(&c, e.idx);
                if (c.oom) goto oom;
                continue;
            }
            if (now > 0) {
                best = e.idx;
                break;
            }
        }
        if (best < 0) break; /* no pair left */
        merges[2 * nm] = c.pairs[best].a;
        merges[2 * nm + 1] = c.pairs[best].b;
        c.step = ++nm;
        apply_merge(&c, best, 256 + nm - 1);
        push_touched(&c);
        if (c.oom) goto oom;
    }
    tr_free(&c);
    return tok_build(merges, nm, out, "moe_tokenizer_train", err, errsz);
oom:
    chmap_free(&cm);
    tr_free(&c);
    moe__free(merges);
    rc = moe__set_err(err, errsz, MOE_ENOMEM, "moe_tokenizer_train: out of memory");
    return rc;
}

/* ---- tokenizer.json ------------------------------------------------------ */

int moe_tokenizer_save(const moe_tokenizer *t, const char *path, char *err, size_t errsz) {
    if (!t || !path)
        return moe__set_err(err, errsz, MOE_EINVAL, "moe_tokenizer_save: invalid arguments");
    size_t cap = 256 + (size_t)t->n_merges * 32, n = 0;
    char *buf = moe__malloc(cap);
    if (!buf) return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path);
    n += (size_t)snprintf(buf + n, cap - n,
                          "{\"type\":\"moe-byte-bpe\",\"version\":1,\"vocab_size\":%d,\n"
                          "\"merges\":[",
                          t->vocab_size);
    for (int r = 0; r < t->n_merges; r++)
        n += (size_t)snprintf(buf + n, cap - n, "%s\n[%d,%d]", r ? "," : "",
                              (int)t->merges[2 * r], (int)t->merges[2 * r + 1]);
    n += (size_t)snprintf(buf + n, cap - n, "],\n\"special\":{\"" MOE_TOKENIZER_EOS_TEXT "\":%d}}\n",
                          t->vocab_size - 1);
    moe__iov part = {buf, n};
    int rc = moe__write_atomic(path, &part, 1, err, errsz);
    moe__free(buf);
    return rc;
}

/* An integer JSON number in [lo, hi]: 0, else -1. */
static int json_int(const cJSON *v, double lo, double hi, long long *out) {
    if (!cJSON_IsNumber(v)) return -1;
    double d = v->valuedouble;
    if (!isfinite(d) || d != floor(d) || d < lo || d > hi) return -1;
    *out = (long long)d;
    return 0;
}

int moe_tokenizer_load(const char *path, moe_tokenizer **out, char *err, size_t errsz) {
    if (out) *out = NULL;
    if (!path || !out)
        return moe__set_err(err, errsz, MOE_EINVAL, "moe_tokenizer_load: invalid arguments");
    char *buf = NULL;
    size_t len = 0;
    if (access(path, F_OK) != 0 && errno == ENOENT)
        return moe__set_err(err, errsz, MOE_ENOTFOUND, "%s: no such file", path);
    int rc = moe__read_file(path, MOE_TOKENIZER_MAX_FILE, &buf, &len, err, errsz);
    if (rc) return rc;
    /* Bound the number of JSON values before cJSON allocates one node each:
     * every value but the first follows a ',' or an opening bracket. */
    size_t seps = 0;
    for (size_t i = 0; i < len; i++) seps += buf[i] == ',' || buf[i] == '[' || buf[i] == '{';
    if (seps > (size_t)3 * MOE_TOKENIZER_MAX_VOCAB + 64) {
        moe__free(buf);
        return moe__set_err(err, errsz, MOE_ELIMIT,
                            "%s: too many JSON values for a vocabulary of at most %d", path,
                            MOE_TOKENIZER_MAX_VOCAB);
    }
    moe__json_oom();
    cJSON *root = cJSON_ParseWithLength(buf, len);
    moe__free(buf);
    if (!root && moe__json_oom()) return moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path);
    if (!root) return moe__set_err(err, errsz, MOE_EFORMAT, "%s: not valid JSON", path);
    int32_t *merges = NULL;
    const cJSON *f_type = NULL, *f_version = NULL, *f_vocab = NULL, *f_merges = NULL,
                *f_special = NULL;
    if (!cJSON_IsObject(root)) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: top level is not a JSON object", path);
        goto done;
    }
    for (const cJSON *it = root->child; it; it = it->next) {
        const cJSON **slot = NULL;
        if (!it->string) continue;
        if (!strcmp(it->string, "type")) slot = &f_type;
        else if (!strcmp(it->string, "version")) slot = &f_version;
        else if (!strcmp(it->string, "vocab_size")) slot = &f_vocab;
        else if (!strcmp(it->string, "merges")) slot = &f_merges;
        else if (!strcmp(it->string, "special")) slot = &f_special;
        else continue; /* unknown fields are ignored */
        if (*slot) {
            rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: duplicate field \"%s\"", path,
                              it->string);
            goto done;
        }
        *slot = it;
    }
    const char *missing = !f_type ? "type" : !f_version ? "version" : !f_vocab ? "vocab_size"
                        : !f_merges ? "merges" : !f_special ? "special" : NULL;
    if (missing) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: missing field \"%s\"", path, missing);
        goto done;
    }
    if (!cJSON_IsString(f_type) || strcmp(f_type->valuestring, "moe-byte-bpe") != 0) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT,
                          "%s: field \"type\" must be \"moe-byte-bpe\"", path);
        goto done;
    }
    long long version, vocab;
    if (json_int(f_version, 0, 1e9, &version)) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT,
                          "%s: field \"version\" is not a non-negative integer", path);
        goto done;
    }
    if (version != 1) {
        rc = moe__set_err(err, errsz, MOE_EUNSUPPORTED,
                          "%s: field \"version\": %lld is not supported (only 1)", path, version);
        goto done;
    }
    if (json_int(f_vocab, -1e18, 1e18, &vocab)) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: field \"vocab_size\" is not an integer",
                          path);
        goto done;
    }
    if (vocab > MOE_TOKENIZER_MAX_VOCAB) {
        rc = moe__set_err(err, errsz, MOE_ELIMIT, "%s: field \"vocab_size\": %lld > limit %d",
                          path, vocab, MOE_TOKENIZER_MAX_VOCAB);
        goto done;
    }
    if (vocab < 257) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT,
                          "%s: field \"vocab_size\": %lld < 257 (256 bytes + EOS)", path, vocab);
        goto done;
    }
    if (!cJSON_IsArray(f_merges)) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT, "%s: field \"merges\" is not an array", path);
        goto done;
    }
    int n_merges = cJSON_GetArraySize(f_merges);
    if (n_merges != vocab - 257) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT,
                          "%s: field \"merges\" has %d entries, vocab_size %lld needs %lld", path,
                          n_merges, vocab, vocab - 257);
        goto done;
    }
    merges = moe__malloc((size_t)(n_merges ? n_merges : 1) * 2 * sizeof *merges);
    if (!merges) {
        rc = moe__set_err(err, errsz, MOE_ENOMEM, "%s: out of memory", path);
        goto done;
    }
    int r = 0;
    for (const cJSON *m = f_merges->child; m; m = m->next, r++) {
        long long a, b;
        if (!cJSON_IsArray(m) || cJSON_GetArraySize(m) != 2 ||
            json_int(m->child, 0, (double)(255 + r), &a) ||
            json_int(m->child->next, 0, (double)(255 + r), &b)) {
            rc = moe__set_err(err, errsz, MOE_EFORMAT,
                              "%s: field \"merges\"[%d]: not a pair of integer ids below %d "
                              "(a merge may refer only to earlier ids)",
                              path, r, 256 + r);
            goto done;
        }
        merges[2 * r] = (int32_t)a;
        merges[2 * r + 1] = (int32_t)b;
    }
    int n_special = 0;
    long long eos = -1;
    if (cJSON_IsObject(f_special))
        for (const cJSON *s = f_special->child; s; s = s->next) n_special++;
    const cJSON *e = n_special == 1 ? f_special->child : NULL;
    if (!e || !e->string || strcmp(e->string, MOE_TOKENIZER_EOS_TEXT) != 0 ||
        json_int(e, 0, 1e18, &eos) || eos != vocab - 1) {
        rc = moe__set_err(err, errsz, MOE_EFORMAT,
                          "%s: field \"special\" must be {\"" MOE_TOKENIZER_EOS_TEXT
                          "\": %lld} (vocab_size - 1)",
                          path, vocab - 1);
        goto done;
    }
    rc = tok_build(merges, n_merges, out, path, err, errsz);
    merges = NULL; /* taken over */
done:
    moe__free(merges);
    cJSON_Delete(root);
    return rc;
}
