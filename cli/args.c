#include "args.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static double value_of(const cli_arg *a) {
    switch (a->type) {
    case ARG_INT: return *(int *)a->dst;
    case ARG_U64: return (double)*(uint64_t *)a->dst;
    case ARG_FLOAT: return *(float *)a->dst;
    case ARG_DOUBLE: return *(double *)a->dst;
    default: return 0;
    }
}

static int in_range(const cli_arg *a, double x) {
    switch (a->range) {
    case ARG_CLOSED: return x >= a->lo && x <= a->hi;
    case ARG_OPEN_LO: return x > a->lo && x <= a->hi;
    default: return 1;
    }
}

/* "[0, 1]", "(0, inf)", "1 or more" */
static void range_text(const cli_arg *a, char *buf, size_t n) {
    const int integer = a->type == ARG_INT || a->type == ARG_U64;
    if (a->range == ARG_CLOSED && isinf(a->hi)) {
        snprintf(buf, n, "%g or more", a->lo);
    } else if (a->range == ARG_OPEN_LO && isinf(a->hi)) {
        snprintf(buf, n, integer ? "more than %g" : "above %g", a->lo);
    } else if (integer) {
        snprintf(buf, n, "%g..%g", a->range == ARG_OPEN_LO ? a->lo + 1 : a->lo, a->hi);
    } else {
        snprintf(buf, n, "%s%g, %g]", a->range == ARG_OPEN_LO ? "(" : "[", a->lo, a->hi);
    }
}

static void print_default(const cli_arg *a) {
    if (a->range != ARG_ANY && !in_range(a, value_of(a))) { /* a sentinel: the help says what unset means */
        printf("unset");
        return;
    }
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
        char left[64], range[64] = "";
        snprintf(left, sizeof left, "%s%s%s%s", args[i].name, args[i].alias ? ", " : "", args[i].alias ? args[i].alias : "",
                 args[i].type == ARG_BOOL ? "" : " X");
        if (args[i].range != ARG_ANY) {
            char r[48];
            range_text(&args[i], r, sizeof r);
            snprintf(range, sizeof range, "; %s", r);
        }
        printf("  %-22s %s (default: ", left, args[i].help);
        print_default(&args[i]);
        printf("%s)\n", range);
    }
}

int cli_given(const cli_arg *args, int n, const char *name) {
    for (int i = 0; i < n; i++)
        if (!strcmp(args[i].name, name)) return args[i].given;
    return 0;
}

int cli_parse(const char *u, cli_arg *args, int n, int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        const char *s = argv[i];
        if (!strcmp(s, "--help") || !strcmp(s, "-h")) {
            usage(u, args, n);
            return 1;
        }
        cli_arg *a = NULL;
        for (int k = 0; k < n && !a; k++)
            if (!strcmp(s, args[k].name) || (args[k].alias && !strcmp(s, args[k].alias))) a = &args[k];
        if (!a) {
            fprintf(stderr, "unknown flag '%s' (see --help)\n", s);
            return 2;
        }
        a->given = 1;
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
        double x = 0;
        errno = 0;
        switch (a->type) {
        case ARG_INT: {
            long l = strtol(v, &end, 10);
            if (*v && !*end && !errno && l >= -2147483647L && l <= 2147483647L) x = (double)l;
            else end = NULL;
            break;
        }
        case ARG_U64: {
            unsigned long long l = strtoull(v, &end, 10);
            if (*v && !*end && !errno && v[0] != '-') x = (double)l;
            else end = NULL;
            break;
        }
        case ARG_FLOAT:
        case ARG_DOUBLE:
            x = strtod(v, &end);
            /* a float flag must survive the conversion: 1e39 would become inf */
            if (!*v || *end || errno || !isfinite(x) || (a->type == ARG_FLOAT && fabs(x) > FLT_MAX)) end = NULL;
            break;
        case ARG_STR: *(const char **)a->dst = v; continue;
        case ARG_BOOL: break;
        }
        if (!end && a->type == ARG_FLOAT && errno == 0 && isfinite(x) && fabs(x) > FLT_MAX) {
            fprintf(stderr, "%s %s: out of range; a float flag holds at most %g\n", s, v, (double)FLT_MAX);
            return 2;
        }
        if (!end) {
            fprintf(stderr, "%s: '%s' is not a valid %s\n", s, v,
                    a->type == ARG_INT || a->type == ARG_U64 ? "integer" : "number");
            return 2;
        }
        if (!in_range(a, x)) {
            char r[48];
            range_text(a, r, sizeof r);
            fprintf(stderr, "%s %s: out of range; %s takes %s\n", s, v, a->name, r);
            return 2;
        }
        switch (a->type) {
        case ARG_INT: *(int *)a->dst = (int)x; break;
        case ARG_U64: *(uint64_t *)a->dst = strtoull(v, NULL, 10); break; /* exact beyond 2^53 */
        case ARG_FLOAT: *(float *)a->dst = (float)x; break;
        case ARG_DOUBLE: *(double *)a->dst = x; break;
        default: break;
        }
    }
    return 0;
}
