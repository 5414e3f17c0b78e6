/* The Brown corpus (NLTK "Form C" tagged files c<genre><nn>) as cleaned documents.
 *
 * Loading reads every file named c<genre letter><two digits> in a directory
 * (genre letters a b c d e f g h j k l m n p r, other names are ignored), in id
 * order, and turns its tagged text into plain text (see docs/data.md):
 *   - tokens are word/tag separated by whitespace; the tag is what follows the
 *     LAST '/' and is dropped; a token without '/' is a format error;
 *   - `` and '' become "; no space before . , ; : ? ! ) ] } '' n't 's, no
 *     space after ( [ { ``; a standalone ' is a single quote that alternates
 *     between opening (no space after) and closing (no space before) within a
 *     paragraph, and opens at a line start or after an opening token;
 *   - each line is a sentence (its leading tab is dropped): sentences of a
 *     paragraph are joined by a space; paragraphs (runs of non-blank lines)
 *     are joined by "\n\n"; a headline line (at least half of its tags carry
 *     -hl) is a paragraph of its own.
 * Files are hostile input: each must be a regular file of at most
 * MOE_CORPUS_MAX_FILE bytes holding valid UTF-8 text (no NUL or control bytes
 * other than \t \n \r \v \f) with at least one word; any violation is an error
 * whose message names the file (and line) and the problem. */
#ifndef MOE_DATA_CORPUS_H
#define MOE_DATA_CORPUS_H

#include "moe.h" /* error codes */

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define MOE_CORPUS_MAX_FILE ((size_t)16 << 20) /* bytes per corpus file */

typedef struct moe_doc {
    char id[8];  /* file name, e.g. "ca01" */
    int genre;   /* 0 .. moe_brown_genre_count()-1 */
    char *text;  /* cleaned text, NUL-terminated */
    size_t len;  /* bytes of text, without the NUL */
} moe_doc;

typedef struct moe_corpus {
    moe_doc *docs; /* in id order */
    int n_docs;
} moe_corpus;

/* Errors: MOE_EINVAL (NULL arguments), MOE_ENOTFOUND (no such directory, or no
 * c<genre><nn> file in it), MOE_EIO (unreadable, not a regular file),
 * MOE_ELIMIT (file larger than MOE_CORPUS_MAX_FILE), MOE_EFORMAT (not UTF-8
 * text, a token without a tag, no words), MOE_ENOMEM. *out is NULL on failure. */
int moe_corpus_load_brown(const char *dir, moe_corpus **out, char *err, size_t errsz);
void moe_corpus_free(moe_corpus *c); /* NULL is a no-op */

/* Cleans one file's tagged text (len bytes) into a moe__malloc'd NUL-terminated
 * string; name labels messages. Exposed for tests. */
int moe_corpus_clean_brown(const char *name, const char *src, size_t len, char **text,
                           size_t *text_len, char *err, size_t errsz);

int moe_brown_genre_count(void); /* 15 */
/* NLTK category name of genre g ("news", ..., "humor"); NULL when out of range. */
const char *moe_brown_genre_name(int g);
/* Genre of a file-name letter ('a' -> 0 news, ..., 'r' -> 14 humor); -1 if none. */
int moe_brown_genre_of_letter(char letter);

/* Train/validation split by document: within each genre, documents in id order,
 * the i-th (0-based) is validation when i % 10 == 9; a genre with 2..9
 * documents (no i == 9) gives its last one to validation, so every genre with
 * two or more documents is in both splits. Returns 1 for validation, 0 for
 * train, MOE_EINVAL for a bad index. O(n_docs). */
int moe_corpus_is_val(const moe_corpus *c, int doc);

#ifdef __cplusplus
}
#endif
#endif /* MOE_DATA_CORPUS_H */
