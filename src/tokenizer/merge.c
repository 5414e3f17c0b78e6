/* Scratch state of the symbol-merging loops (spm.c, gpt2.c): symbol array,
 * a binary min-heap of candidate merges ordered by (key, left), text buffer. */
#include "tokenizer/vocab_impl.h"

#include "tokenizer/unicode.h"

#include <string.h>

void moe__work_free(moe__work *w) {
    moe__free(w->sym);
    moe__free(w->heap);
    moe__free(w->buf);
    memset(w, 0, sizeof *w);
}

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t nc = *cap ? *cap : 64;
    while (nc < need) {
        if (nc > SIZE_MAX / 2 / elem) return MOE_ENOMEM;
        nc *= 2;
    }
    void *q = moe__malloc(nc * elem);
    if (!q) return MOE_ENOMEM;
    if (*cap) memcpy(q, *p, *cap * elem);
    moe__free(*p);
    *p = q;
    *cap = nc;
    return 0;
}

int moe__work_reserve_sym(moe__work *w, size_t n) { return grow((void **)&w->sym, &w->symcap, n, sizeof *w->sym); }
int moe__buf_reserve(moe__work *w, size_t n) { return grow((void **)&w->buf, &w->bufcap, n, 1); }

/* Equal keys pop the leftmost pair first, as llama.cpp's comparators do. */
static int before(const moe__bigram *a, const moe__bigram *b) {
    return a->key < b->key || (a->key == b->key && a->left < b->left);
}

int moe__heap_push(moe__work *w, moe__bigram b) {
    if (grow((void **)&w->heap, &w->heapcap, w->nheap + 1, sizeof *w->heap)) return MOE_ENOMEM;
    size_t i = w->nheap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!before(&b, &w->heap[p])) break;
        w->heap[i] = w->heap[p];
        i = p;
    }
    w->heap[i] = b;
    return 0;
}

moe__bigram moe__heap_pop(moe__work *w) {
    moe__bigram top = w->heap[0], last = w->heap[--w->nheap];
    size_t i = 0, n = w->nheap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && before(&w->heap[c + 1], &w->heap[c])) c++;
        if (!before(&w->heap[c], &last)) break;
        w->heap[i] = w->heap[c];
        i = c;
    }
    if (n) w->heap[i] = last;
    return top;
}

/* Queues the merge of symbols l and r when the vocab has one: SPM looks the
 * joined text up and ranks by the token's score (highest first); BPE looks
 * the pair up in the merges (lowest rank first). */
static int try_pair(const moe_vocab *v, moe__work *w, int32_t l, int32_t r) {
    if (l < 0 || r < 0) return 0;
    const moe__sym *a = &w->sym[l], *b = &w->sym[r];
    moe__bigram g = {0, l, r, a->n + b->n, -1};
    if (v->type == MOE__VOCAB_SPM) {
        g.id = moe__vocab_find(v, (const char *)w->buf + a->start, g.size);
        if (g.id < 0) return 0;
        g.key = -(double)v->score[g.id];
    } else {
        int32_t rank = moe__vocab_merge(v, a->id, b->id, &g.id);
        if (rank < 0) return 0;
        g.key = rank;
    }
    return moe__heap_push(w, g);
}

int moe__merge_symbols(const moe_vocab *v, moe__work *w, size_t len) {
    w->nsym = 0;
    w->nheap = 0;
    if (moe__work_reserve_sym(w, len)) return MOE_ENOMEM;
    for (size_t pos = 0; pos < len;) {
        size_t n = moe__utf8_seq_len(w->buf[pos]);
        if (n > len - pos) n = len - pos;
        int32_t i = (int32_t)w->nsym++;
        w->sym[i] = (moe__sym){i - 1, pos + n == len ? -1 : i + 1, (uint32_t)pos, (uint32_t)n,
                               moe__vocab_find(v, (const char *)w->buf + pos, n)};
        pos += n;
    }
    for (size_t i = 1; i < w->nsym; i++)
        if (try_pair(v, w, (int32_t)i - 1, (int32_t)i)) return MOE_ENOMEM;
    while (w->nheap) {
        moe__bigram g = moe__heap_pop(w);
        moe__sym *a = &w->sym[g.left], *b = &w->sym[g.right];
        /* stale: one side merged away or grown since the pair was queued */
        if (a->n == 0 || b->n == 0 || a->n + b->n != g.size) continue;
        a->n += b->n;
        a->id = g.id;
        b->n = 0;
        a->next = b->next;
        if (b->next >= 0) w->sym[b->next].prev = g.left;
        if (try_pair(v, w, a->prev, g.left) || try_pair(v, w, g.left, a->next)) return MOE_ENOMEM;
    }
    return 0;
}
