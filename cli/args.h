/* Table-driven flags: every command lists its flags once, and --help prints
 * them all with their defaults. */
#ifndef MOE_CLI_ARGS_H
#define MOE_CLI_ARGS_H

#include <stdint.h>

typedef enum { ARG_INT, ARG_U64, ARG_FLOAT, ARG_DOUBLE, ARG_STR, ARG_BOOL } arg_type;

typedef struct cli_arg {
    const char *name;  /* "--steps" */
    const char *alias; /* "-n" or NULL */
    arg_type type;
    void *dst;
    const char *help;
} cli_arg;

/* Parses argv (after the command name). Returns 0, 1 when --help was printed,
 * or 2 after printing a usage error. Positional arguments are refused. */
int cli_parse(const char *usage, cli_arg *args, int nargs, int argc, char **argv);

#endif
