/* Tokenizers described by GGUF metadata (tokenizer.ggml.*), producing the
 * same token ids as llama.cpp's llama_tokenize(text, add_special,
 * parse_special = false). Algorithms, supported models/pre-tokenizers and
 * deviations: docs/tokenizers.md.
 *
 *   llama  SentencePiece-style: whole-text bigram merging by token score,
 *          spaces escaped as U+2581, optional leading space, byte fallback
 *          to <0xXX> tokens.
 *   gpt2   byte-level BPE: pre-tokenizer chosen by tokenizer.ggml.pre
 *          (default, gpt-2 family, qwen2 family, llama3 family, ...), bytes
 *          mapped to printable code points, merges applied by rank.
 *
 * A vocab is read-only after creation: every function may be called from
 * several threads at once. All functions return 0 or a negative MOE_E* code. */
#ifndef MOE_TOKENIZER_VOCAB_H
#define MOE_TOKENIZER_VOCAB_H

#include "moe.h"

#include <stddef.h>
#include <stdint.h>

typedef struct moe_vocab moe_vocab;
struct moe__gguf;

/* Builds the tokenizer described by a parsed GGUF's tokenizer.* metadata
 * (tokenizer.ggml.model llama or gpt2; tokens, scores, token_type, merges,
 * bos/eos/unk/pad ids, add_bos_token, add_eos_token, add_space_prefix,
 * tokenizer.ggml.pre). Hostile-input checks (MOE_EFORMAT, message naming the
 * file and the key); MOE_EUNSUPPORTED for models/pre-tokenizers not
 * implemented (never silently wrong). The vocab copies what it needs: g may
 * be closed afterwards. */
int moe_vocab_from_gguf(const struct moe__gguf *g, moe_vocab **out, char *err, size_t errsz);
void moe_vocab_free(moe_vocab *v); /* NULL is a no-op */
int moe_vocab_n_tokens(const moe_vocab *v);
int moe_vocab_bos(const moe_vocab *v);     /* -1 when none */
int moe_vocab_eos(const moe_vocab *v);     /* -1 when none */
int moe_vocab_add_bos(const moe_vocab *v); /* 1 when encode(add_special=1) prepends BOS */
int moe_vocab_add_eos(const moe_vocab *v); /* 1 when encode(add_special=1) appends EOS */
/* "llama" or "gpt2"; the pre-tokenizer name as stored ("" when absent). */
const char *moe_vocab_model(const moe_vocab *v);
const char *moe_vocab_pre(const moe_vocab *v);
/* Stored text of a token (NUL-terminated, *len bytes), NULL when out of range. */
const char *moe_vocab_text(const moe_vocab *v, int32_t id, size_t *len);

/* Same ids as llama.cpp's llama_tokenize(text, add_special, parse_special =
 * false). Writes at most cap ids (ids may be NULL when cap == 0); *n_out =
 * ids needed; MOE_ELIMIT when cap is too small. MOE_EINVAL for gpt2 input
 * whose UTF-8 decodes above U+10FFFF (llama.cpp aborts on it) and for SPM
 * text needing a byte token the vocab lacks (llama.cpp throws). */
int moe_vocab_encode(const moe_vocab *v, const char *text, size_t len, int add_special,
                     int32_t *ids, size_t cap, size_t *n_out);
/* As moe_vocab_encode, with llama_tokenize's parse_special: when set,
 * control and unknown token texts in the input (e.g. "<|im_start|>",
 * "</s>") become those tokens too, as chat templates need. */
int moe_vocab_encode_special(const moe_vocab *v, const char *text, size_t len, int add_special,
                             int parse_special, int32_t *ids, size_t cap, size_t *n_out);
/* Bytes that id contributes to the output text, as llama.cpp's
 * token_to_piece(special = false) (SPM: ▁ → space, <0xXX> → that byte; GPT-2:
 * byte-decoded; control/unknown tokens: nothing). Writes at most cap bytes
 * (no NUL); *len_out = bytes needed; MOE_ELIMIT when cap is too small,
 * MOE_EINVAL for an id out of range. */
int moe_vocab_piece(const moe_vocab *v, int32_t id, char *buf, size_t cap, size_t *len_out);

#endif
