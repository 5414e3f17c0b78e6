#include "args.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void print_default(const cli_arg *a) {
    switch (a->type) {
    case ARG_INT: printf("%d", *(int *)a->dst); break;
    case ARG_U64: printf("%llu", (unsigned long long)*(uint64_t *)a->dst); break;
    case ARG_FLOAT: printf("%g", (double)*(float *)a->dst); break;
    case ARG_DOUBLE: printf("%g", *(double *)a->dst); break;
    case ARG_STR: printf("%s", *(const char **)a->dst ? *(const char **)a->dst : "(none)"); break;
    case ARG_BOOL: printf("%s", *(int *)a->dst ? "on" : "off"); break;
    }
}

static void usage(const char *u, const cli_arg *args, int n) {
    printf("usage: %s\n\nflags:\n", u);
    for (int i = 0; i < n; i++) {
        char left[64];
        snprintf(left, sizeof left, "%s%s%s%s", args[i].name, args[i].alias ? ", " : "", args[i].alias ? args[i].alias : "",
                 args[i].type == ARG_BOOL ? "" : " X");
        printf("  %-22s %s (default: ", left, args[i].help);
        print_default(&args[i]);
        printf(")\n");
    }
}

int cli_parse(const char *u, cli_arg *args, int n, int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        const char *s = argv[i];
        if (!strcmp(s, "--help") || !strcmp(s, "-h")) {
            usage(u, args, n);
            return 1;
        }
        const cli_arg *a = NULL;
        for (int k = 0; k < n && !a; k++)
            if (!strcmp(s, args[k].name) || (args[k].alias && !strcmp(s, args[k].alias))) a = &args[k];
        if (!a) {
            fprintf(stderr, "unknown flag '%s' (see --help)\n", s);
            return 2;
        }
        if (a->type == ARG_BOOL) {
            *(int *)a->dst = 1;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "%s needs a value\n", s);
            return 2;
        }
        const char *v = argv[++i];
        char *end = NULL;
        errno = 0;
        switch (a->type) {
        case ARG_INT: {
            long x = strtol(v, &end, 10);
            if (*v && !*end && !errno && x >= -2147483647L && x <= 2147483647L) *(int *)a->dst = (int)x;
            else end = NULL;
            break;
        }
        case ARG_U64: {
            unsigned long long x = strtoull(v, &end, 10);
            if (*v && !*end && !errno && v[0] != '-') *(uint64_t *)a->dst = x;
            else end = NULL;
            break;
        }
        case ARG_FLOAT:
        case ARG_DOUBLE: {
            double x = strtod(v, &end);
            if (*v && !*end && !errno && isfinite(x)) {
                if (a->type == ARG_FLOAT) *(float *)a->dst = (float)x;
                else *(double *)a->dst = x;
            } else
                end = NULL;
            break;
        }
        case ARG_STR: *(const char **)a->dst = v; break;
        case ARG_BOOL: break;
        }
        if (a->type != ARG_STR && !end) {
            fprintf(stderr, "%s: '%s' is not a valid %s\n", s, v,
                    a->type == ARG_INT || a->type == ARG_U64 ? "integer" : "number");
            return 2;
        }
    }
    return 0;
}
