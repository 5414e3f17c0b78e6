/* moe route: the routing audit of a trained model on the Brown corpus
 * (docs/audit.md). Per layer x expert load, per-genre expert usage and loss,
 * divergence between genres, flagged experts, an optional token trace. */
#include "args.h"
#include "cli.h"
#include "io/ckpt.h"
#include "route.h"

#include "data/corpus.h"
#include "data/shard.h"
#include "io/atomic.h"
#include "report/route_stats.h"
#include "tokenizer/tokenizer.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int cli_trace_fill(const moe_model *m, int t, moe__trace_tok *tt) {
    const moe_model_config *c = moe_model_get_config(m);
    int ns = 0;
    tt->n_layers = 0;
    tt->off[0] = 0;
    for (int l = 0; l < c->num_hidden_layers && tt->n_layers < MOE__TRACE_MAX_LAYERS; l++) {
        const int *off, *ids;
        const float *w;
        const unsigned char *kept;
        if (moe_model_layer_routing(m, l, &off, &ids, &w, &kept) < 0) continue; /* dense layer */
        for (int s = off[t]; s < off[t + 1] && ns < MOE__TRACE_MAX_SLOTS; s++)
            if (!kept || kept[s]) tt->ids[ns] = ids[s], tt->w[ns++] = w[s];
        tt->layer[tt->n_layers++] = l;
        tt->off[tt->n_layers] = ns;
    }
    return tt->n_layers;
}

void cli_trace_header(moe__sb *b, const char *model_dir, const moe_model_config *c, int k) {
    moe__sb_str(b, "{\"moe_trace\":1,\"model\":");
    moe__json_bytes(b, model_dir, strlen(model_dir));
    moe__sb_printf(b, ",\"layers\":%d,\"moe_layers\":%d,\"experts\":%d,\"experts_used\":%d}\n", c->num_hidden_layers,
                   moe_model_n_moe_layers(c), c->num_local_experts, k ? k : c->num_experts_per_tok);
}

void cli_trace_piece(const moe_tokenizer *tok, int id, moe__trace_tok *tt) {
    size_t len = 0;
    const char *p = moe_tokenizer_piece(tok, id, &len);
    if (!p) len = 0;
    if (len > MOE__TRACE_MAX_PIECE) len = MOE__TRACE_MAX_PIECE;
    memcpy(tt->piece, p ? p : "", len);
    tt->piece_len = len;
    tt->piece[len] = 0;
}

typedef struct route_run {
    moe_model *m;
    const moe_tokenizer *tok;
    moe__route_acc acc;
    int *moe_layer;        /* [L] model index of each MoE layer */
    int *group;            /* [B*T] */
    moe__sb *trace;        /* NULL: no trace */
    moe__trace_tok *tt;
    const char *split;
} route_run;

/* One forward of b sequences of T tokens, all of genre g, into the accumulators. */
static int run_batch(route_run *r, const int32_t *tok, const int32_t *tgt, int b, int T, int g) {
    if (moe_model_forward(r->m, tok, tgt, b, T, NULL)) {
        fprintf(stderr, "moe route: %s\n", moe_model_errmsg(r->m));
        return 1;
    }
    const int N = b * T;
    for (int n = 0; n < N; n++) r->group[n] = g;
    for (int l = 0; l < r->acc.L; l++) {
        const int *off, *ids;
        const float *w;
        const unsigned char *kept;
        moe_model_layer_routing(r->m, r->moe_layer[l], &off, &ids, &w, &kept);
        const moe_layer_stats *st = moe_model_layer_stats(r->m, r->moe_layer[l]);
        if (moe__route_acc_add(&r->acc, l, N, r->group, off, ids, w, kept, st->router_entropy)) {
            fprintf(stderr, "moe route: layer %d gave an out-of-range routing\n", r->moe_layer[l]);
            return 1;
        }
    }
    const float *ce = moe_model_token_losses(r->m);
    if (ce) moe__route_acc_add_loss(&r->acc, N, r->group, ce);
    for (int n = 0; r->trace && n < N; n++) {
        moe__trace_tok *tt = r->tt;
        tt->pos = n % T, tt->token = tok[n];
        snprintf(tt->src, sizeof tt->src, "%s", r->split);
        snprintf(tt->genre, sizeof tt->genre, "%s", moe_brown_genre_name(g));
        cli_trace_piece(r->tok, tok[n], tt);
        cli_trace_fill(r->m, n, tt);
        moe__trace_write(r->trace, tt);
    }
    return 0;
}

/* The tokens of genre g's documents, in document order (doc EOS included). */
static int32_t *genre_tokens(const moe_shard *s, int g, size_t *n) {
    size_t total = 0;
    for (int i = 0; i < s->n_docs; i++)
        if (s->doc_genre[i] == g) total += moe_shard_doc_len(s, i);
    *n = total;
    int32_t *out = malloc(sizeof(int32_t) * (total ? total : 1));
    if (!out) return NULL;
    size_t k = 0;
    for (int i = 0; i < s->n_docs; i++)
        if (s->doc_genre[i] == g) {
            memcpy(out + k, s->tokens + s->doc_off[i], sizeof(int32_t) * moe_shard_doc_len(s, i));
            k += moe_shard_doc_len(s, i);
        }
    return out;
}

int moe_cli_route(int argc, char **argv) {
    const char *dir = NULL, *data = "data/brown", *split = "val", *trace = NULL, *out = NULL;
    int threads = 2, batch = 8, seq = 0, k = 0, layer_sel = -1;
    uint64_t max_tokens = 0, min_count = 20;
    double flag_ratio = 2.0;
    cli_arg args[] = {
        {"--model", "-m", ARG_STR, &dir, "model directory (required)"},
        {"--data", NULL, ARG_STR, &data, "Brown corpus directory"},
        {"--split", NULL, ARG_STR, &split, "val or train"},
        {"--max-tokens", NULL, ARG_U64, &max_tokens, "tokens to route, shared equally by the genres (0: all)"},
        {"--experts-used", NULL, ARG_INT, &k, "override k, the experts per token (0: as trained)", AT_LEAST(0)},
        {"--trace", NULL, ARG_STR, &trace, "also write the token-level routing trace (JSON lines) to this file"},
        {"--threads", "-t", ARG_INT, &threads, "threads (at most 4 per CPU)", RANGE(1, moe_max_threads())},
        {"--batch", NULL, ARG_INT, &batch, "sequences per forward", RANGE(1, 1 << 16)},
        {"--seq", NULL, ARG_INT, &seq, "tokens per sequence (unset: the context length)", AT_LEAST(2)},
        {"--layer", NULL, ARG_INT, &layer_sel, "model layer of genre_heatmap.svg (-1: every MoE layer side by side)", AT_LEAST(-1)},
        {"--flag-ratio", NULL, ARG_DOUBLE, &flag_ratio, "flag an expert a genre uses this many times more than the rest", ABOVE(0)},
        {"--min-count", NULL, ARG_U64, &min_count, "... over at least this many of the genre's tokens on that expert"},
        {"--out", "-o", ARG_STR, &out, "output directory (required)"},
    };
    int rc = cli_parse("moe route -m MODEL_DIR [--data DIR] [--split val|train] [--max-tokens N] [--experts-used K] "
                       "[--trace FILE] --out DIR",
                       args, sizeof args / sizeof args[0], argc, argv);
    if (rc) return rc == 1 ? 0 : 2;
    if (!dir || !out) {
        fprintf(stderr, "moe route: -m MODEL_DIR and --out DIR are required\n");
        return 2;
    }
    const int want_val = !strcmp(split, "val") ? 1 : !strcmp(split, "train") ? 0 : -1;
    if (want_val < 0 || batch < 1 || !(flag_ratio > 0)) {
        fprintf(stderr, "moe route: --split is val or train, --batch >= 1, --flag-ratio > 0\n");
        return 2;
    }
    if (mkdir(out, 0777) && access(out, W_OK)) {
        fprintf(stderr, "moe route: cannot create the output directory %s\n", out);
        return 1;
    }
    char path[4096], err[512];
    moe__ckpt_path(dir, "tokenizer.json", path, sizeof path, NULL, 0); /* a checkpoint cut short reads as the committed one */
    cli_data d;
    if (cli_data_load(data, path, 0, 0, &d)) return 1;
    const moe_shard *sh = want_val ? d.val : d.train;
    moe_model_config mc;
    moe__ckpt_path(dir, "config.json", path, sizeof path, NULL, 0);
    if (moe_model_config_load(path, &mc, err, sizeof err)) {
        fprintf(stderr, "moe route: %s\n", err);
        cli_data_free(&d);
        return 1;
    }
    if (seq <= 0 || seq > mc.max_position_embeddings) seq = mc.max_position_embeddings;
    moe_model *m = NULL;
    moe_set_num_threads(threads);
    if (moe_model_load(dir, batch, seq, 0, threads, &m, err, sizeof err)) {
        fprintf(stderr, "moe route: %s\n", err);
        cli_data_free(&d);
        return 1;
    }
    const int L = moe_model_n_moe_layers(&mc), E = mc.num_local_experts, G = moe_brown_genre_count();
    if (L <= 0) {
        fprintf(stderr, "moe route: %s has no MoE layer, nothing to audit\n", dir);
        moe_model_free(m), cli_data_free(&d);
        return 2;
    }
    if (k && moe_model_set_experts_used(m, k)) {
        fprintf(stderr, "moe route: %s\n", moe_model_errmsg(m));
        moe_model_free(m), cli_data_free(&d);
        return 2;
    }
    route_run r = {.m = m, .tok = d.tok, .split = split};
    moe__sb tbuf = {0};
    r.moe_layer = calloc((size_t)L, sizeof *r.moe_layer);
    r.group = malloc(sizeof(int) * (size_t)batch * seq);
    r.tt = malloc(sizeof *r.tt);
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)batch * seq), *tgt = malloc(sizeof(int32_t) * (size_t)batch * seq);
    rc = !r.moe_layer || !r.group || !r.tt || !tok || !tgt || moe__route_acc_init(&r.acc, G, L, E);
    if (rc) fprintf(stderr, "moe route: out of memory\n");
    for (int l = 0, i = 0; !rc && l < mc.num_hidden_layers; l++)
        if (moe_model_layer_stats(m, l)) r.moe_layer[i++] = l;
    if (trace) {
        r.trace = &tbuf;
        cli_trace_header(&tbuf, dir, &mc, k);
    }
    /* every genre gets the same share of the budget, so that a small run still sees them all */
    int present = 0;
    for (int g = 0; g < G; g++)
        for (int i = 0; i < sh->n_docs; i++)
            if (sh->doc_genre[i] == g) {
                present++;
                break;
            }
    const size_t budget = max_tokens > 0 ? (size_t)((max_tokens + (uint64_t)present - 1) / (uint64_t)(present ? present : 1)) : SIZE_MAX;
    const double t0 = cli_now();
    for (int g = 0; g < G && !rc; g++) {
        size_t n;
        int32_t *gt = genre_tokens(sh, g, &n);
        if (!gt) {
            rc = 1;
            break;
        }
        const size_t n_in = n > 1 ? (n - 1 < budget ? n - 1 : budget) : 0;
        int b = 0;
        for (size_t p = 0; p < n_in && !rc; p += (size_t)seq) {
            const int T = n_in - p < (size_t)seq ? (int)(n_in - p) : seq;
            if (T < seq) { /* the tail runs alone: every sequence of a forward has one length */
                if (b) rc = run_batch(&r, tok, tgt, b, seq, g), b = 0;
                if (!rc) rc = run_batch(&r, gt + p, gt + p + 1, 1, T, g);
                continue;
            }
            memcpy(tok + (size_t)b * seq, gt + p, sizeof(int32_t) * seq);
            memcpy(tgt + (size_t)b * seq, gt + p + 1, sizeof(int32_t) * seq);
            if (++b == batch) rc = run_batch(&r, tok, tgt, b, seq, g), b = 0;
        }
        if (b && !rc) rc = run_batch(&r, tok, tgt, b, seq, g);
        free(gt);
    }
    const double secs = cli_now() - t0;
    if (!rc && trace) {
        moe__iov part = {tbuf.p, tbuf.len};
        if (tbuf.oom || moe__write_atomic(trace, &part, 1, err, sizeof err)) {
            fprintf(stderr, "moe route: %s\n", tbuf.oom ? "out of memory for the trace" : err);
            rc = 1;
        }
    }
    if (!rc) rc = cli_route_report(&r.acc, r.moe_layer, dir, split, k ? k : mc.num_experts_per_tok, layer_sel,
                                   flag_ratio, (int64_t)min_count, secs, out);
    if (!rc) {
        int64_t ntok = 0;
        for (int g = 0; g < G; g++) ntok += r.acc.tokens[g];
        fprintf(stderr, "routed %lld %s tokens through %d MoE layers in %.1f s; wrote %s/report.md, route.json, "
                        "heatmap.svg, genre_heatmap.svg%s%s\n",
                (long long)ntok, split, L, secs, out, trace ? " and " : "", trace ? trace : "");
    }
    moe__sb_free(&tbuf);
    moe__route_acc_free(&r.acc);
    free(r.moe_layer), free(r.group), free(r.tt), free(tok), free(tgt);
    moe_model_free(m);
    cli_data_free(&d);
    return rc ? 1 : 0;
}
