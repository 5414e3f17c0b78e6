/* The routing audit (docs/audit.md): per layer x expert load, per group
 * (Brown genre) expert usage, the statistics that summarise them, and the
 * token-level routing trace (JSON lines).
 *
 * Keys: G groups (genres), L MoE layers (counted 0..L-1 in model order), E
 * experts. Counts are int64 so that whole-corpus runs never saturate; every
 * statistic is computed in double, in a fixed order. */
#ifndef MOE_REPORT_ROUTE_STATS_H
#define MOE_REPORT_ROUTE_STATS_H

#include "internal.h"
#include "strbuf.h"

#include <stddef.h>
#include <stdint.h>

typedef struct moe__route_acc {
    int G, L, E;
    int64_t *count;     /* [G][L][E] kept (token, expert) slots */
    double *mass;       /* [G][L][E] summed gate weight of those slots */
    double *ent;        /* [L] sum over tokens of the router entropy (nats) */
    int64_t *ent_tokens;/* [L] tokens behind ent */
    int64_t *tokens;    /* [G] tokens routed (counted once, in layer 0) */
    double *ce;         /* [G] summed token cross-entropy (nats) */
    int64_t *ce_tokens; /* [G] tokens behind ce */
} moe__route_acc;

/* MOE_EINVAL for a non-positive size, MOE_ENOMEM. */
int moe__route_acc_init(moe__route_acc *a, int G, int L, int E);
void moe__route_acc_free(moe__route_acc *a);

/* Adds one forward's routing of MoE layer l for n tokens: group[n] is each
 * token's group; tok_off [n+1], ids [R], w [R], kept [R] (NULL: all kept) as
 * moe_layer_routing gives them. entropy_mean is the layer's mean router
 * entropy over these n tokens (moe_layer_stats.router_entropy). MOE_EINVAL
 * for an out-of-range group, layer or expert id. */
int moe__route_acc_add(moe__route_acc *a, int l, int n, const int *group, const int *tok_off, const int *ids,
                       const float *w, const unsigned char *kept, double entropy_mean);
/* Adds n token losses ce[n] (nats) to their groups. */
int moe__route_acc_add_loss(moe__route_acc *a, int n, const int *group, const float *ce);

/* Count of slots of (layer l, expert e) summed over every group (g < 0) or of
 * group g only. */
int64_t moe__route_count(const moe__route_acc *a, int g, int l, int e);

/* ---- statistics of a vector x[n] of non-negative loads -------------------- */
/* std/mean with the population std (divide by n), as docs/routing.md; 0 when
 * the mean is 0. */
double moe__route_cv(const double *x, int n);
/* max/mean; 0 when the mean is 0. */
double moe__route_max_over_mean(const double *x, int n);
/* Entropy of p = x/sum(x) divided by ln(n): 1 = perfectly even, 0 = one
 * expert takes everything. 0 for an empty vector, 1 when n == 1. */
double moe__route_norm_entropy(const double *x, int n);
/* Jensen-Shannon divergence (log base 2, so in [0, 1]) between the
 * distributions x/sum(x) and y/sum(y); NAN when a sum is 0. */
double moe__route_js(const double *x, const double *y, int n);

/* ---- experts that one group uses far more than the rest -------------------- */
typedef struct moe__route_flag {
    int group, layer, expert;
    int64_t count;     /* slots of the group on this expert */
    double share;      /* count / slots of the group in the layer */
    double rest_share; /* the same for every other group together */
    double ratio;      /* share / rest_share (INFINITY when rest_share is 0) */
} moe__route_flag;
/* Every (group, layer, expert) with ratio >= min_ratio and count >=
 * min_count, sorted by ratio (descending; ties by group, layer, expert).
 * Writes at most max_out flags and returns how many there are in all
 * (negative on error). Groups with no tokens, or when the other groups have
 * none, are never flagged. */
int moe__route_flags(const moe__route_acc *a, double min_ratio, int64_t min_count, moe__route_flag *out, int max_out);

/* ---- the token trace: one JSON object per line ---------------------------- */
#define MOE__TRACE_MAX_LAYERS 256
#define MOE__TRACE_MAX_SLOTS 4096 /* over all layers of one token */
#define MOE__TRACE_MAX_PIECE 1024 /* bytes */

typedef struct moe__trace_tok {
    long long pos;                 /* position in its sequence */
    int token;                     /* token id */
    char src[16];                  /* "prompt", "gen", "val", "train" */
    char genre[24];                /* "" when none */
    unsigned char piece[MOE__TRACE_MAX_PIECE + 1]; /* the token's bytes (NUL added) */
    size_t piece_len;
    int n_layers;
    int layer[MOE__TRACE_MAX_LAYERS];    /* model layer index */
    int off[MOE__TRACE_MAX_LAYERS + 1];  /* layer i owns slots [off[i], off[i+1]) */
    int ids[MOE__TRACE_MAX_SLOTS];       /* expert of each slot, decreasing weight */
    float w[MOE__TRACE_MAX_SLOTS];       /* gate weight of each slot */
} moe__trace_tok;

/* Appends the JSON string of bytes s[n] (quotes included): valid UTF-8 is
 * kept, '"' '\\' and control bytes are escaped, each byte of an invalid
 * sequence becomes U+FFFD. Returns 1 when the text does not give back the
 * bytes exactly (an invalid byte or a NUL), else 0. */
int moe__json_bytes(moe__sb *b, const void *s, size_t n);
/* Appends one line (with '\n') for t. */
void moe__trace_write(moe__sb *b, const moe__trace_tok *t);
/* Parses one line (len bytes, no NUL needed). Returns 0 for a token line,
 * 1 for the header line ({"moe_trace": ...}), MOE_EFORMAT/MOE_ELIMIT with a
 * message naming the problem; hostile input never crashes. */
int moe__trace_parse(const char *line, size_t len, moe__trace_tok *t, char *err, size_t errsz);

/* ---- a heatmap as SVG ----------------------------------------------------- */
/* v [R][C] in [0, vmax] (vmax > 0) drawn white -> dark blue, with row and
 * column labels, a title and a colour legend; a dark line every col_group
 * columns when col_group > 0 (blocks of layers); written atomically. */
int moe__heatmap_svg(const char *path, const char *title, const char *xlabel, const char *const *row_labels,
                     const char *const *col_labels, const double *v, int R, int C, int col_group, double vmax,
                     char *err, size_t errsz);

#endif
