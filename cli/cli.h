/* The moe CLI's commands and shared helpers. Only cli/ prints and exits. */
#ifndef MOE_CLI_H
#define MOE_CLI_H

#include "moe.h"

int moe_cli_train(int argc, char **argv);
int moe_cli_eval(int argc, char **argv);
int moe_cli_info(int argc, char **argv);
int moe_cli_generate(int argc, char **argv);
int moe_cli_tokenizer(int argc, char **argv);
int moe_cli_plot(int argc, char **argv);
int moe_cli_tokenize(int argc, char **argv);
int moe_cli_route(int argc, char **argv);
int moe_cli_experiment(int argc, char **argv);
int moe_cli_convert(int argc, char **argv); /* cmd_convert.c */
/* GGUF models (cmd_gguf.c): moe generate -m FILE.gguf, moe perplexity. */
int cli_is_gguf_model(int argc, char **argv); /* -m names a file with GGUF magic */
/* 1 after printing "moe CMD: PATH: No such file or directory" when -m names
 * nothing (before the commands guess a directory and look for its files) */
int cli_model_missing(const char *cmd, int argc, char **argv);
/* Prints why text could not be tokenized under v (rc from the encoder, 0
 * when it gave no tokens), naming the file and its tokenizer model. */
struct moe_vocab;
void cli_encode_failed(const char *cmd, const char *path, const struct moe_vocab *v, int rc);
int moe_cli_gguf_generate(int argc, char **argv);
int moe_cli_gguf_info(int argc, char **argv); /* moe info -m FILE.gguf */
int moe_cli_perplexity(int argc, char **argv);
/* -ctk/-ctv values ("f16", "f32") into p; -1 after printing the error */
int cli_kv_types(const char *cmd, const char *ctk, const char *ctv, moe_engine_params *p);
/* moe_engine_params.repack from the flags -nr (0) and --repack-all (2); neither: 1. */
int cli_repack(int no_repack, int repack_all);

/* The Brown corpus tokenized: the tokenizer (trained on the train split
 * unless tokenizer_path names one) and the train/val token streams. */
struct moe_tokenizer;
struct moe_shard;
typedef struct cli_data {
    struct moe_tokenizer *tok;
    struct moe_shard *train, *val;
} cli_data;
int cli_data_load(const char *data_dir, const char *tokenizer_path, int vocab, int quiet, cli_data *d);
void cli_data_free(cli_data *d);

/* Prints the model card (text or JSON) of a configuration. */
void cli_print_card(const moe_model_config *c, int ctx, int json);
double cli_now(void);
/* mkdir -p (defined in cmd_train.c); 0 or -1 with errno */
int cli_mkdir_p(const char *dir);

#endif
