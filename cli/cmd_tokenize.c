/* moe tokenize: token ids of a text under the tokenizer of a GGUF file, as
 * llama.cpp's llama-tokenize prints them (to compare the two). */
#include "args.h"
#include "cli.h"
#include "internal.h"
#include "io/atomic.h"
#include "io/gguf.h"
#include "tokenizer/vocab.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TEXT ((size_t)256 << 20)

int moe_cli_tokenize(int argc, char **argv) {
    const char *model = NULL, *prompt = NULL, *file = NULL;
    int ids_only = 0, no_bos = 0, count = 0, parse_special = 0;
    cli_arg args[] = {
        {"--model", "-m", ARG_STR, &model, "GGUF file whose tokenizer.* metadata to use (required)"},
        {"--prompt", "-p", ARG_STR, &prompt, "text to tokenize, taken verbatim (no escape processing)"},
        {"--file", "-f", ARG_STR, &file, "read the text from this file instead, verbatim"},
        {"--ids", NULL, ARG_BOOL, &ids_only, "print only the ids, as [1, 2, 3]"},
        {"--no-bos", NULL, ARG_BOOL, &no_bos, "add no BOS/EOS even when the vocab asks for them"},
        {"--parse-special", NULL, ARG_BOOL, &parse_special,
         "turn control-token texts (<|im_start|>, </s>, ...) into those tokens (llama-tokenize's default)"},
        {"--show-count", NULL, ARG_BOOL, &count, "print the number of tokens"},
    };
    int rc = cli_parse("moe tokenize -m FILE.gguf (-p TEXT | -f FILE) [--ids] [--no-bos] [--parse-special]", args,
                       sizeof args / sizeof args[0], argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (!model || (!prompt && !file)) {
        fprintf(stderr, "moe tokenize: give -m FILE.gguf and -p TEXT or -f FILE\n");
        return 2;
    }
    char err[1024];
    char *text = NULL;
    size_t len = 0;
    if (file) {
        if (moe__read_file(file, MAX_TEXT, &text, &len, err, sizeof err)) {
            fprintf(stderr, "moe tokenize: %s\n", err);
            return 1;
        }
    } else {
        len = strlen(prompt);
    }
    moe__gguf *g = NULL;
    moe_vocab *v = NULL;
    int32_t *ids = NULL;
    rc = moe__gguf_open(model, &g, err, sizeof err);
    if (!rc) rc = moe_vocab_from_gguf(g, &v, err, sizeof err);
    moe__gguf_close(g);
    if (rc) {
        fprintf(stderr, "moe tokenize: %s\n", err);
        moe__free(text);
        return 1;
    }
    const char *t = file ? text : prompt;
    size_t n = 0;
    rc = moe_vocab_encode_special(v, t, len, !no_bos, parse_special, NULL, 0, &n);
    if (rc == MOE_ELIMIT) {
        ids = malloc((n ? n : 1) * sizeof *ids);
        rc = ids ? moe_vocab_encode_special(v, t, len, !no_bos, parse_special, ids, n, &n) : MOE_ENOMEM;
    }
    if (rc) {
        cli_encode_failed("tokenize", model, v, rc);
    } else if (ids_only) {
        printf("[");
        for (size_t i = 0; i < n; i++) printf("%s%d", i ? ", " : "", ids[i]);
        printf("]\n");
    } else {
        char piece[1024];
        for (size_t i = 0; i < n; i++) {
            size_t pl;
            int prc = moe_vocab_piece(v, ids[i], piece, sizeof piece, &pl);
            printf("%6d -> '%.*s'\n", ids[i], prc ? 0 : (int)pl, piece);
        }
    }
    if (!rc && count) printf("Total number of tokens: %zu\n", n);
    free(ids);
    moe_vocab_free(v);
    moe__free(text);
    return rc ? 1 : 0;
}
