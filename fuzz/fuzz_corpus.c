/* Brown corpus files (tagged text): the cleaner that turns one file into a
 * document; the text it returns must be NUL-terminated at its length. */
#include "fuzz.h"
#include "data/corpus.h"
#include "internal.h"

#include <string.h>

MOE_FUZZ_TARGET(corpus) {
    char *text = NULL, err[256];
    size_t len = 0;
    int rc = moe_corpus_clean_brown("ca01", (const char *)data, size, &text, &len, err, sizeof err);
    if (rc) return rc;
    if (!text || strlen(text) != len) moe_fuzz_trap("cleaned text is not NUL-terminated at its length");
    moe__free(text);
    return 0;
}
