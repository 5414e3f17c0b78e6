/* Internals of the GGUF tokenizers shared by vocab.c (loading, lookups,
 * encode driver), spm.c and gpt2.c. */
#ifndef MOE_TOKENIZER_VOCAB_IMPL_H
#define MOE_TOKENIZER_VOCAB_IMPL_H

#include "internal.h"
#include "tokenizer/vocab.h"

/* llama.cpp's token attributes (bit flags), from tokenizer.ggml.token_type. */
enum {
    MOE__TOK_UNKNOWN = 1 << 0,
    MOE__TOK_UNUSED = 1 << 1,
    MOE__TOK_NORMAL = 1 << 2,
    MOE__TOK_CONTROL = 1 << 3,
    MOE__TOK_USER = 1 << 4,
    MOE__TOK_BYTE = 1 << 5,
};

typedef enum { MOE__VOCAB_SPM, MOE__VOCAB_BPE } moe__vocab_type;

/* One step of a BPE pre-tokenizer; the steps run in order, each one splitting
 * every piece the previous steps produced (llama.cpp's regex_exprs). */
typedef enum {
    MOE__PRE_END = 0,
    MOE__PRE_GPT2,        /* 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S) */
    MOE__PRE_QWEN2,       /* llama3-style with \p{N} (one digit) */
    MOE__PRE_LLAMA3,      /* llama3-style with \p{N}{1,3} */
    MOE__PRE_QWEN35,      /* qwen2 with marks joining letter runs */
    MOE__PRE_PUNCT_RUNS,  /* [\p{P}\$\+<=>\^~\|]+ */
    MOE__PRE_PUNCT_RUNS_BT, /* [\p{P}\$\+<=>\^~\|`]+ (falcon) */
    MOE__PRE_NUM_RUNS,    /* \p{N}+ */
    MOE__PRE_NUM_SINGLE,  /* \p{N} */
    MOE__PRE_DIGITS3,     /* [0-9][0-9][0-9] */
    MOE__PRE_NUM_1_3,     /* \p{N}{1,3} */
    MOE__PRE_HAN_KANA,    /* [一-龥぀-ゟ゠-ヿ]+ */
    MOE__PRE_DSV3,        /* deepseek-v3's main regex (gpt2.c) */
} moe__pre_step;
#define MOE__PRE_MAX_STEPS 4

struct moe_vocab {
    moe__vocab_type type;
    int32_t n;               /* tokens */
    char *blob;              /* token texts, each NUL-terminated */
    size_t *off;             /* [n+1] offsets into blob (text i: off[i] .. off[i+1]-1) */
    float *score;            /* [n] */
    uint16_t *attr;          /* [n] MOE__TOK_* */
    int32_t *hash;           /* [hcap] token ids by text (-1 empty) */
    size_t hcap;
    uint64_t *mkey;          /* [mcap] merge (left id << 32 | right id), UINT64_MAX empty */
    int32_t *mrank;          /* [mcap] */
    int32_t *mres;           /* [mcap] the token the merge forms */
    size_t mcap;
    int32_t *special;        /* [n_special] control, user-defined and unknown tokens, longest first */
    int32_t n_special;
    int32_t byte_tok[256];   /* SPM: <0xXX> (or the 1-byte token), -1 when absent */
    int32_t bos, eos, unk, pad;
    int add_bos, add_eos, add_space_prefix, ignore_merges;
    moe__pre_step pre[MOE__PRE_MAX_STEPS];
    char model[16], pre_name[64];
};

/* Token id of a text, -1 when none. */
int32_t moe__vocab_find(const moe_vocab *v, const char *s, size_t len);
/* Rank of the merge (a, b) and the token it forms (*result), -1 when none. */
int32_t moe__vocab_merge(const moe_vocab *v, int32_t a, int32_t b, int32_t *result);
static inline const char *moe__vocab_str(const moe_vocab *v, int32_t id, size_t *len) {
    *len = v->off[id + 1] - v->off[id] - 1;
    return v->blob + v->off[id];
}

/* A growable id list (the encode output). Appends past cap are counted, not
 * stored. */
typedef struct moe__idbuf {
    int32_t *ids;
    size_t cap, n;
} moe__idbuf;
static inline void moe__idbuf_push(moe__idbuf *b, int32_t id) {
    if (b->n < b->cap) b->ids[b->n] = id;
    b->n++;
}

/* Symbol merging shared by SPM and BPE: a doubly linked list of byte ranges
 * of the text and a binary heap of candidate merges. */
typedef struct moe__sym {
    int32_t prev, next;
    uint32_t start, n; /* bytes of the text; n == 0 once merged away */
    int32_t id;        /* token of the range, -1 when none */
} moe__sym;
typedef struct moe__bigram {
    double key;        /* smaller pops first: BPE rank, SPM -score */
    int32_t left, right;
    uint32_t size;     /* bytes of both symbols when queued (staleness check) */
    int32_t id;        /* token the merge forms */
} moe__bigram;
typedef struct moe__work {
    moe__sym *sym;
    size_t nsym, symcap;
    moe__bigram *heap;
    size_t nheap, heapcap;
    unsigned char *buf; /* scratch text */
    size_t buflen, bufcap;
} moe__work;
void moe__work_free(moe__work *w);
int moe__work_reserve_sym(moe__work *w, size_t n);
int moe__heap_push(moe__work *w, moe__bigram b);
moe__bigram moe__heap_pop(moe__work *w);
int moe__buf_reserve(moe__work *w, size_t n);

/* Splits w->buf[0..len) into UTF-8 sized symbols (llama.cpp's lead-byte
 * rule, clipped at the end) and merges them until no queued merge applies:
 * SPM by token score, BPE by merge rank; ties go to the leftmost pair. The
 * live symbols form the list from w->sym[0] along next. */
int moe__merge_symbols(const moe_vocab *v, moe__work *w, size_t len);

/* Encodes one raw-text fragment (no user-defined tokens inside). */
int moe__spm_fragment(const moe_vocab *v, moe__work *w, const char *text, size_t len,
                      int space_prefix, moe__idbuf *out);
int moe__bpe_fragment(const moe_vocab *v, moe__work *w, const char *text, size_t len,
                      moe__idbuf *out);
/* The byte <-> code point map of GPT-2's byte-level BPE. */
uint32_t moe__bpe_byte_cp(unsigned char b);
int moe__bpe_cp_byte(uint32_t cp); /* -1 when cp is no byte's */
/* Selects the pre-tokenizer steps and flags of a tokenizer.ggml.pre name;
 * MOE_EUNSUPPORTED when unknown. */
int moe__bpe_select_pre(moe_vocab *v, const char *name);

#endif
