/* `moe tokenizer train|encode|decode`: train the byte-level BPE on the Brown
 * corpus and inspect encodings. argv starts after "tokenizer". */
#include "args.h"
#include "cli.h"

#include "data/corpus.h"
#include "data/shard.h"
#include "tokenizer/tokenizer.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void usage_tokenizer(FILE *f) {
    fprintf(f, "usage: moe tokenizer <command> [flags]   (moe tokenizer <command> --help)\n\n"
               "commands:\n"
               "  train    train a byte-level BPE on the train split of the Brown corpus\n"
               "  encode   print the token ids of a text\n"
               "  decode   print the text of token ids\n");
}

/* Bytes and tokens (EOS excluded) of one split; 0 on success. */
static int split_ratio(const moe_corpus *c, const moe_tokenizer *t, int val, size_t *bytes,
                       size_t *tokens, int *docs) {
    char err[512];
    moe_shard *s = NULL;
    int rc = moe_shard_build(c, t, val, &s, err, sizeof err);
    if (rc) {
        fprintf(stderr, "moe tokenizer train: %s\n", err);
        return rc;
    }
    *bytes = 0;
    for (int i = 0; i < c->n_docs; i++)
        if (moe_corpus_is_val(c, i) == val) *bytes += c->docs[i].len;
    *tokens = s->n_tokens - (size_t)s->n_docs;
    *docs = s->n_docs;
    moe_shard_free(s);
    return 0;
}

static int cmd_train(int argc, char **argv) {
    const char *data = "data/brown", *out = NULL;
    int vocab = 4096;
    cli_arg args[] = {
        {"--data", NULL, ARG_STR, &data, "directory of the Brown corpus files (make data)"},
        {"--vocab", NULL, ARG_INT, &vocab, "vocabulary size: 256 bytes + merges + <|endoftext|>", RANGE(257, MOE_TOKENIZER_MAX_VOCAB)},
        {"--out", "-o", ARG_STR, &out, "tokenizer.json to write (required)"},
    };
    int p = cli_parse("moe tokenizer train --data DIR [--vocab N] --out FILE", args,
                      (int)(sizeof args / sizeof args[0]), argc, argv);
    if (p) return p == 1 ? 0 : 2;
    if (!out) {
        fprintf(stderr, "moe tokenizer train: --out FILE is required (see --help)\n");
        return 2;
    }
    if (vocab < 257 || vocab > MOE_TOKENIZER_MAX_VOCAB) {
        fprintf(stderr, "moe tokenizer train: --vocab %d is outside [257, %d]\n", vocab,
                MOE_TOKENIZER_MAX_VOCAB);
        return 2;
    }
    char err[512];
    moe_corpus *c = NULL;
    double t0 = cli_now();
    int rc = moe_corpus_load_brown(data, &c, err, sizeof err);
    if (rc) {
        fprintf(stderr, "moe tokenizer train: %s\n", err);
        if (rc == MOE_ENOTFOUND) fprintf(stderr, "  (fetch the corpus with `make data`)\n");
        return 1;
    }
    double t_load = cli_now() - t0;
    const char **texts = calloc((size_t)c->n_docs, sizeof *texts);
    size_t *lens = calloc((size_t)c->n_docs, sizeof *lens), n = 0;
    if (!texts || !lens) {
        fprintf(stderr, "moe tokenizer train: out of memory\n");
        free(texts), free(lens), moe_corpus_free(c);
        return 1;
    }
    for (int i = 0; i < c->n_docs; i++)
        if (!moe_corpus_is_val(c, i)) texts[n] = c->docs[i].text, lens[n++] = c->docs[i].len;
    moe_tokenizer *t = NULL;
    t0 = cli_now();
    rc = moe_tokenizer_train(texts, lens, n, vocab, &t, err, sizeof err);
    double t_train = cli_now() - t0;
    free(texts), free(lens);
    if (rc) {
        fprintf(stderr, "moe tokenizer train: %s\n", err);
        moe_corpus_free(c);
        return 1;
    }
    rc = moe_tokenizer_save(t, out, err, sizeof err);
    if (rc) {
        fprintf(stderr, "moe tokenizer train: %s\n", err);
        moe_tokenizer_free(t), moe_corpus_free(c);
        return 1;
    }
    printf("corpus     %d documents from %s (loaded in %.2f s)\n", c->n_docs, data, t_load);
    printf("tokenizer  vocab %d (%d merges + 256 bytes + <|endoftext|>), trained in %.2f s\n",
           moe_tokenizer_vocab_size(t), moe_tokenizer_n_merges(t), t_train);
    if (moe_tokenizer_vocab_size(t) < vocab)
        printf("           (the corpus ran out of pairs before vocab %d)\n", vocab);
    for (int val = 0; val <= 1; val++) {
        size_t bytes = 0, tokens = 0;
        int docs = 0;
        t0 = cli_now();
        if (split_ratio(c, t, val, &bytes, &tokens, &docs)) {
            if (val) break; /* an empty validation split is not fatal here */
            moe_tokenizer_free(t), moe_corpus_free(c);
            return 1;
        }
        printf("%-10s %d docs, %zu bytes, %zu tokens: %.3f bytes/token (encoded in %.2f s)\n",
               val ? "val" : "train", docs, bytes, tokens,
               tokens ? (double)bytes / (double)tokens : 0.0, cli_now() - t0);
    }
    printf("saved      %s\n", out);
    moe_tokenizer_free(t);
    moe_corpus_free(c);
    return 0;
}

/* Flags shared by encode and decode: -t FILE, --pieces, positional rest. */
typedef struct inspect_opts {
    const char *tok;
    int pieces;
    int n_pos;
    char **pos;
} inspect_opts;

static int parse_inspect(const char *cmd, int argc, char **argv, inspect_opts *o) {
    memset(o, 0, sizeof *o);
    o->pos = argv;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            if (!strcmp(cmd, "encode"))
                printf("usage: moe tokenizer encode -t FILE [--pieces] TEXT\n\n"
                       "Prints the token ids of TEXT (\"-\" reads standard input) on one line.\n\n");
            else
                printf("usage: moe tokenizer decode -t FILE [--pieces] ID...\n\n"
                       "Writes the bytes of the ids (<|endoftext|> yields nothing).\n\n");
            printf("flags:\n"
                   "  --tokenizer, -t X      tokenizer.json (required; default: (none))\n"
                   "  --pieces               also list each id with its bytes (default: off)\n");
            return 1;
        }
        if (!strcmp(a, "--tokenizer") || !strcmp(a, "-t")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "moe tokenizer %s: %s needs a value\n", cmd, a);
                return 2;
            }
            o->tok = argv[++i];
        } else if (!strcmp(a, "--pieces")) {
            o->pieces = 1;
        } else if (!strcmp(a, "--")) {
            for (i++; i < argc; i++) o->pos[o->n_pos++] = argv[i];
        } else if (a[0] == '-' && a[1] && !(a[1] >= '0' && a[1] <= '9')) {
            fprintf(stderr, "moe tokenizer %s: unknown flag '%s' (see --help)\n", cmd, a);
            return 2;
        } else {
            o->pos[o->n_pos++] = argv[i]; /* argv is reused: positions only move left */
        }
    }
    if (!o->tok) {
        fprintf(stderr, "moe tokenizer %s: -t FILE is required (see --help)\n", cmd);
        return 2;
    }
    return 0;
}

/* Prints a piece with non-printable bytes escaped. */
static void print_piece(const char *p, size_t n) {
    putchar('\'');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == '\n') fputs("\\n", stdout);
        else if (c == '\t') fputs("\\t", stdout);
        else if (c == '\\' || c == '\'') printf("\\%c", c);
        else if (c < 0x20 || c == 0x7f) printf("\\x%02x", c);
        else putchar(c);
    }
    putchar('\'');
}

static char *read_stdin(size_t *len) {
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    while (b) {
        if (n == cap) {
            char *q = realloc(b, cap * 2);
            if (!q) break;
            b = q, cap *= 2;
        }
        size_t r = fread(b + n, 1, cap - n, stdin);
        n += r;
        if (r == 0) {
            if (ferror(stdin)) break;
            *len = n;
            return b;
        }
    }
    free(b);
    return NULL;
}

static int cmd_encode(int argc, char **argv) {
    inspect_opts o;
    int p = parse_inspect("encode", argc, argv, &o);
    if (p) return p == 1 ? 0 : 2;
    if (o.n_pos != 1) {
        fprintf(stderr, "moe tokenizer encode: expected one TEXT argument, got %d (quote it)\n",
                o.n_pos);
        return 2;
    }
    char err[512];
    moe_tokenizer *t = NULL;
    if (moe_tokenizer_load(o.tok, &t, err, sizeof err)) {
        fprintf(stderr, "moe tokenizer encode: %s\n", err);
        return 1;
    }
    char *in = NULL;
    const char *text = o.pos[0];
    size_t len = strlen(text);
    if (!strcmp(text, "-")) {
        in = read_stdin(&len);
        if (!in) {
            fprintf(stderr, "moe tokenizer encode: cannot read standard input\n");
            moe_tokenizer_free(t);
            return 1;
        }
        text = in;
    }
    int32_t *ids = malloc((len ? len : 1) * sizeof *ids); /* never more ids than bytes */
    size_t n = 0;
    int rc = ids ? moe_tokenizer_encode(t, text, len, ids, len, &n) : MOE_ENOMEM;
    if (rc) {
        fprintf(stderr, "moe tokenizer encode: %s\n", moe_strerror(rc));
    } else {
        for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", (int)ids[i]);
        printf("\n");
        if (o.pieces)
            for (size_t i = 0; i < n; i++) {
                size_t pl;
                const char *pc = moe_tokenizer_piece(t, ids[i], &pl);
                printf("%6d  ", (int)ids[i]);
                print_piece(pc, pl);
                printf("\n");
            }
        fprintf(stderr, "%zu bytes -> %zu tokens (%.3f bytes/token)\n", len, n,
                n ? (double)len / (double)n : 0.0);
    }
    free(ids);
    free(in);
    moe_tokenizer_free(t);
    return rc ? 1 : 0;
}

static int cmd_decode(int argc, char **argv) {
    inspect_opts o;
    int p = parse_inspect("decode", argc, argv, &o);
    if (p) return p == 1 ? 0 : 2;
    int32_t *ids = malloc((size_t)(o.n_pos ? o.n_pos : 1) * sizeof *ids);
    if (!ids) {
        fprintf(stderr, "moe tokenizer decode: out of memory\n");
        return 1;
    }
    for (int i = 0; i < o.n_pos; i++) {
        char *end;
        errno = 0;
        long v = strtol(o.pos[i], &end, 10);
        if (!*o.pos[i] || *end || errno || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "moe tokenizer decode: '%s' is not a token id\n", o.pos[i]);
            free(ids);
            return 2;
        }
        ids[i] = (int32_t)v;
    }
    char err[512];
    moe_tokenizer *t = NULL;
    if (moe_tokenizer_load(o.tok, &t, err, sizeof err)) {
        fprintf(stderr, "moe tokenizer decode: %s\n", err);
        free(ids);
        return 1;
    }
    for (int i = 0; i < o.n_pos; i++)
        if (ids[i] >= moe_tokenizer_vocab_size(t)) {
            fprintf(stderr, "moe tokenizer decode: id %d is not below vocab size %d\n",
                    (int)ids[i], moe_tokenizer_vocab_size(t));
            free(ids), moe_tokenizer_free(t);
            return 1;
        }
    size_t len = 0;
    moe_tokenizer_decode(t, ids, (size_t)o.n_pos, NULL, 0, &len);
    char *out = malloc(len + 1);
    int rc = out ? moe_tokenizer_decode(t, ids, (size_t)o.n_pos, out, len + 1, &len) : MOE_ENOMEM;
    if (rc) {
        fprintf(stderr, "moe tokenizer decode: %s\n", moe_strerror(rc));
    } else {
        if (o.pieces)
            for (int i = 0; i < o.n_pos; i++) {
                size_t pl;
                const char *pc = moe_tokenizer_piece(t, ids[i], &pl);
                printf("%6d  ", (int)ids[i]);
                print_piece(pc, pl);
                printf("\n");
            }
        fwrite(out, 1, len, stdout);
        if (isatty(STDOUT_FILENO) || o.pieces) putchar('\n');
    }
    free(out), free(ids), moe_tokenizer_free(t);
    return rc ? 1 : 0;
}

int moe_cli_tokenizer(int argc, char **argv) {
    if (argc < 1 || !strcmp(argv[0], "--help") || !strcmp(argv[0], "-h")) {
        usage_tokenizer(argc < 1 ? stderr : stdout);
        return argc < 1 ? 2 : 0;
    }
    if (!strcmp(argv[0], "train")) return cmd_train(argc - 1, argv + 1);
    if (!strcmp(argv[0], "encode")) return cmd_encode(argc - 1, argv + 1);
    if (!strcmp(argv[0], "decode")) return cmd_decode(argc - 1, argv + 1);
    fprintf(stderr, "moe tokenizer: unknown command '%s' (train, encode, decode)\n", argv[0]);
    return 2;
}
