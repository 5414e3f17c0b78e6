/* Token shards: one split of a corpus encoded into one token stream.
 *
 * Each document contributes its tokens followed by EOS (vocab_size - 1);
 * doc_off[i] is where document i starts and doc_genre[i] its genre.
 *
 * File (all integers little-endian):
 *   "MOESHRD1"  8 bytes magic
 *   u32 version (1), u32 vocab_size, u64 n_tokens, u32 n_docs
 *   n_docs x (u64 offset, u32 genre)
 *   n_tokens x u32 token
 * The size must be exactly 28 + 12 n_docs + 4 n_tokens bytes. */
#ifndef MOE_DATA_SHARD_H
#define MOE_DATA_SHARD_H

#include "data/corpus.h"
#include "tokenizer/tokenizer.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_SHARD_MAGIC "MOESHRD1"
#define MOE_SHARD_VERSION 1
#define MOE_SHARD_HEADER_BYTES 28
#define MOE_SHARD_MAX_VOCAB (1 << 20)
#define MOE_SHARD_MAX_TOKENS ((uint64_t)1 << 32) /* 16 GiB of tokens, read whole into memory */

typedef struct moe_shard {
    int32_t *tokens;
    size_t n_tokens;
    int n_docs;
    size_t *doc_off; /* [n_docs], strictly increasing, doc_off[0] == 0 */
    int *doc_genre;  /* [n_docs] */
    int vocab_size;
} moe_shard;

/* Encodes the documents of one split (want_val: 1 validation, 0 train; see
 * moe_corpus_is_val) in document order. Parallel (OpenMP) across documents;
 * the result does not depend on the thread count. MOE_EINVAL when the split is
 * empty. */
int moe_shard_build(const moe_corpus *c, const moe_tokenizer *t, int want_val, moe_shard **out,
                    char *err, size_t errsz);

/* Atomic write (temporary file, fsync, rename). */
int moe_shard_save(const moe_shard *s, const char *path, char *err, size_t errsz);

/* Hostile-input safe: magic, version (else MOE_EUNSUPPORTED), vocab_size in
 * [1, MOE_SHARD_MAX_VOCAB], the exact file size, offsets (first 0, strictly
 * increasing, < n_tokens), genres < 15, tokens < vocab_size, and each document
 * ending with EOS; violations are MOE_EFORMAT (MOE_ELIMIT for a too large
 * vocab_size) with a message naming the file and the field. */
int moe_shard_load(const char *path, moe_shard **out, char *err, size_t errsz);
void moe_shard_free(moe_shard *s); /* NULL is a no-op */

/* Number of tokens of document i (its EOS included). */
size_t moe_shard_doc_len(const moe_shard *s, int i);

#ifdef __cplusplus
}
#endif
#endif /* MOE_DATA_SHARD_H */
