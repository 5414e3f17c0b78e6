/* Byte-level BPE tokenizer (GPT-2 style), trained on raw bytes.
 *
 * Ids: 0..255 are the 256 bytes; 256..256+M-1 are the M merges in rank order
 * (merge r joins its pair into id 256+r); the last id, vocab_size-1 = 256+M, is
 * the special <|endoftext|> (EOS). Encode never produces EOS from text (the
 * string "<|endoftext|>" in text is encoded as ordinary bytes); callers insert
 * it. Decode of EOS yields no bytes.
 *
 * Pre-tokenisation splits text into chunks and merges never cross a chunk
 * boundary. Byte classes: whitespace (space \t \n \r \v \f), letters (ASCII
 * letters and every byte >= 0x80, so UTF-8 sequences stay together), digits,
 * and other. A chunk is
 *   - an optional single leading space followed by a run of letters, or of
 *     digits, or of other bytes, or
 *   - a run of whitespace; when such a run of two or more bytes ends with a
 *     space directly before a non-space byte, that last space is left to
 *     start the next chunk.
 * Chunks are cut after MOE_TOKENIZER_MAX_CHUNK bytes, so no token is longer.
 *
 * Encode applies, within each chunk, the lowest-rank merge present (all its
 * non-overlapping occurrences, left to right) until none applies. Round trip:
 * decode(encode(s)) == s for every byte string s.
 *
 * tokenizer.json: {"type":"moe-byte-bpe","version":1,"vocab_size":N,
 * "merges":[[a,b],...],"special":{"<|endoftext|>":N-1}}, with N-257 merges
 * each referring only to earlier ids (see docs/data.md).
 *
 * All functions return 0 or a negative MOE_E* code; functions taking err/errsz
 * write a message there (naming the file where there is one). */
#ifndef MOE_TOKENIZER_H
#define MOE_TOKENIZER_H

#include "moe.h" /* error codes */

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_TOKENIZER_MAX_VOCAB (1 << 20)          /* largest vocab_size accepted */
#define MOE_TOKENIZER_MAX_FILE ((size_t)64 << 20)  /* largest tokenizer.json read */
#define MOE_TOKENIZER_MAX_CHUNK 64                 /* bytes per pre-token chunk */
#define MOE_TOKENIZER_EOS_TEXT "<|endoftext|>"

typedef struct moe_tokenizer moe_tokenizer;

/* Trains on n_texts texts (texts[i] has lens[i] bytes, any bytes). vocab_size
 * in [257, MOE_TOKENIZER_MAX_VOCAB] counts the 256 bytes, the merges and EOS.
 * Each step merges the most frequent adjacent pair (ties: the smallest
 * (left id, right id)); a pair must occur at least once. If the texts run out
 * of pairs first, the tokenizer has fewer merges: check
 * moe_tokenizer_vocab_size(). Deterministic. */
int moe_tokenizer_train(const char *const *texts, const size_t *lens, size_t n_texts,
                        int vocab_size, moe_tokenizer **out, char *err, size_t errsz);

/* Encodes len bytes of text (NULL allowed when len == 0). Writes at most cap
 * ids (ids may be NULL when cap == 0); *n_out receives the number of ids the
 * whole text needs. Returns MOE_ELIMIT when cap is too small. The count never
 * exceeds len. Thread-safe (the tokenizer is read-only). */
int moe_tokenizer_encode(const moe_tokenizer *t, const char *text, size_t len, int32_t *ids,
                         size_t cap, size_t *n_out);

/* Decodes n ids into bytes. *len_out receives the number of bytes needed;
 * returns MOE_ELIMIT when cap is smaller (out may be NULL when cap == 0). A NUL
 * is appended when cap leaves room for it (not counted in *len_out). EOS
 * yields no bytes; an id outside [0, vocab_size) is MOE_EINVAL. */
int moe_tokenizer_decode(const moe_tokenizer *t, const int32_t *ids, size_t n, char *out,
                         size_t cap, size_t *len_out);

/* Writes tokenizer.json atomically (temporary file, fsync, rename). */
int moe_tokenizer_save(const moe_tokenizer *t, const char *path, char *err, size_t errsz);

/* Reads a tokenizer.json, treating it as hostile: file size <= MOE_TOKENIZER_MAX_FILE
 * and vocab_size <= MOE_TOKENIZER_MAX_VOCAB (else MOE_ELIMIT), exact merge count,
 * integer ids referring to earlier ids only, no duplicate merges, token length
 * <= MOE_TOKENIZER_MAX_CHUNK, EOS == vocab_size-1 (else MOE_EFORMAT). Missing file:
 * MOE_ENOTFOUND. */
int moe_tokenizer_load(const char *path, moe_tokenizer **out, char *err, size_t errsz);

int moe_tokenizer_vocab_size(const moe_tokenizer *t);
int moe_tokenizer_eos(const moe_tokenizer *t); /* vocab_size - 1 */
int moe_tokenizer_n_merges(const moe_tokenizer *t);
/* Merge r (0-based rank) joins ids (*a, *b) into id 256 + r. MOE_EINVAL if out of range. */
int moe_tokenizer_merge(const moe_tokenizer *t, int r, int32_t *a, int32_t *b);
/* Raw bytes of token id (not NUL-terminated; *len receives the count). For EOS:
 * the text "<|endoftext|>" (for display; decode yields nothing). NULL for an
 * invalid id. */
const char *moe_tokenizer_piece(const moe_tokenizer *t, int id, size_t *len);
void moe_tokenizer_free(moe_tokenizer *t); /* NULL is a no-op */

/* ---- internal, exposed for tests ---------------------------------------- */

/* End (exclusive) of the pre-token chunk starting at pos (< len). */
size_t moe__bpe_chunk_end(const unsigned char *s, size_t len, size_t pos);

#ifdef __cplusplus
}
#endif
#endif /* MOE_TOKENIZER_H */
