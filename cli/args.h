/* Table-driven flags: every command lists its flags once, each with its valid
 * range, and --help prints them all with their ranges and defaults. */
#ifndef MOE_CLI_ARGS_H
#define MOE_CLI_ARGS_H

#include <math.h>
#include <stdint.h>

typedef enum { ARG_INT, ARG_U64, ARG_FLOAT, ARG_DOUBLE, ARG_STR, ARG_BOOL } arg_type;

/* The valid values of a numeric flag. A row without a range accepts any
 * value of its type; a default outside the range means "unset" (e.g. -1: the
 * model's value) and can only be had by leaving the flag out. */
typedef enum {
    ARG_ANY = 0,
    ARG_CLOSED,  /* lo <= x <= hi */
    ARG_OPEN_LO, /* lo <  x <= hi */
} arg_range;

typedef struct cli_arg {
    const char *name;  /* "--steps" */
    const char *alias; /* "-n" or NULL */
    arg_type type;
    void *dst;
    const char *help;
    arg_range range;
    double lo, hi;
    int given; /* set by cli_parse: the flag was on the command line */
} cli_arg;

/* Range initializers for a row: {"--lr", NULL, ARG_FLOAT, &lr, "...", ABOVE(0)} */
#define RANGE(a, b) ARG_CLOSED, (a), (b)
#define ABOVE(a) ARG_OPEN_LO, (a), INFINITY
#define AT_LEAST(a) ARG_CLOSED, (a), INFINITY

/* Parses argv (after the command name). Returns 0, 1 when --help was printed,
 * or 2 after printing a usage error (an unknown flag, a value that does not
 * parse, or one outside the flag's range, which the message states). */
int cli_parse(const char *usage, cli_arg *args, int nargs, int argc, char **argv);
/* Whether flag name (the long name) was on the command line. */
int cli_given(const cli_arg *args, int nargs, const char *name);

#endif
