/* moe route's outputs: route.json (every number), report.md (for people),
 * heatmap.svg (layer x expert load) and genre_heatmap.svg (genre x expert).
 * Formulas and thresholds: docs/audit.md. */
#include "route.h"

#include "data/corpus.h"
#include "io/atomic.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Thresholds of the plain-words findings (docs/audit.md). */
#define FIND_MAX_OVER_MEAN 2.0 /* a layer whose busiest expert takes twice the mean load */
#define FIND_NORM_ENTROPY 0.9  /* a layer whose load entropy is under 90% of the even split */
#define FIND_JS 0.05           /* a genre whose routing differs from the rest's by this many bits */
#define MAX_FLAGS_SHOWN 20

static int write_text(const char *dir, const char *name, const char *text, size_t len) {
    char path[4096], err[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    moe__iov part = {text, len};
    if (moe__write_atomic(path, &part, 1, err, sizeof err)) {
        fprintf(stderr, "moe route: %s\n", err);
        return 1;
    }
    return 0;
}

/* Per-layer summary of the load over every genre. */
typedef struct layer_sum {
    double cv, max_over_mean, norm_entropy, importance_cv, router_entropy, dead;
} layer_sum;

static void layer_vectors(const moe__route_acc *a, int g, int l, double *cnt, double *mass) {
    for (int e = 0; e < a->E; e++) {
        cnt[e] = (double)moe__route_count(a, g, l, e);
        if (!mass) continue;
        mass[e] = 0;
        for (int h = 0; h < a->G; h++)
            if (g < 0 || h == g) mass[e] += a->mass[((size_t)h * a->L + l) * a->E + e];
    }
}

/* mean over layers of JS(genre g, genre h), h < 0: g against every other genre */
static double js_mean(const moe__route_acc *a, int g, int h, double *x, double *y) {
    double s = 0;
    for (int l = 0; l < a->L; l++) {
        layer_vectors(a, g, l, x, NULL);
        if (h >= 0) {
            layer_vectors(a, h, l, y, NULL);
        } else {
            layer_vectors(a, -1, l, y, NULL);
            for (int e = 0; e < a->E; e++) y[e] -= x[e];
        }
        s += moe__route_js(x, y, a->E);
    }
    return s / a->L;
}

static cJSON *num_array(const double *v, int n) {
    cJSON *arr = cJSON_CreateArray();
    for (int i = 0; i < n; i++) cJSON_AddItemToArray(arr, cJSON_CreateNumber(isfinite(v[i]) ? v[i] : -1));
    return arr;
}


static int heatmaps(const moe__route_acc *a, const int *lidx, const int *gi, int P, int layer_sel,
                    const char *out) {
    const int L = a->L, E = a->E;
    int rc = 1, l_only = -1;
    if (layer_sel >= 0) {
        for (int l = 0; l < L; l++)
            if (lidx[l] == layer_sel) l_only = l;
        if (l_only < 0) {
            fprintf(stderr, "moe route: --layer %d is not a MoE layer of the model\n", layer_sel);
            return 1;
        }
    }
    const int gc = l_only >= 0 ? E : L * E; /* genre heatmap columns */
    const int R = L > P ? L : P;
    double *v = calloc((size_t)R * gc, sizeof *v);
    char(*rl)[32] = calloc((size_t)R, sizeof *rl), (*cl)[16] = calloc((size_t)gc, sizeof *cl);
    const char **rlp = calloc((size_t)R, sizeof *rlp), **clp = calloc((size_t)gc, sizeof *clp);
    char path[4096], err[512], title[256];
    if (!v || !rl || !cl || !rlp || !clp) goto done;
    /* layer x expert: each cell is the expert's share of the layer's slots */
    double vmax = 0;
    for (int l = 0; l < L; l++) {
        double tot = 0;
        for (int e = 0; e < E; e++) tot += (double)moe__route_count(a, -1, l, e);
        for (int e = 0; e < E; e++) {
            v[(size_t)l * E + e] = tot > 0 ? moe__route_count(a, -1, l, e) / tot : 0;
            vmax = fmax(vmax, v[(size_t)l * E + e]);
        }
        snprintf(rl[l], sizeof rl[l], "layer %d", lidx[l]);
        rlp[l] = rl[l];
    }
    for (int e = 0; e < E; e++) snprintf(cl[e], sizeof cl[e], "%d", e), clp[e] = cl[e];
    snprintf(path, sizeof path, "%s/heatmap.svg", out);
    snprintf(title, sizeof title, "Share of each layer's routed tokens per expert (even split: %.3g)", 1.0 / E);
    if (moe__heatmap_svg(path, title, "expert", rlp, clp, v, L, E, 0, vmax > 0 ? vmax : 1, err, sizeof err)) {
        fprintf(stderr, "moe route: %s\n", err);
        goto done;
    }
    /* genre x expert: each cell is the expert's share of the genre's slots in that layer */
    vmax = 0;
    for (int p = 0; p < P; p++) {
        for (int l = 0; l < L; l++) {
            if (l_only >= 0 && l != l_only) continue;
            const int c0 = l_only >= 0 ? 0 : l * E;
            double tot = 0;
            for (int e = 0; e < E; e++) tot += (double)moe__route_count(a, gi[p], l, e);
            for (int e = 0; e < E; e++) {
                double s = tot > 0 ? moe__route_count(a, gi[p], l, e) / tot : 0;
                v[(size_t)p * gc + c0 + e] = s;
                vmax = fmax(vmax, s);
            }
        }
        rlp[p] = moe_brown_genre_name(gi[p]);
    }
    for (int c = 0; c < gc; c++) {
        const int e = c % E;
        if (l_only >= 0) snprintf(cl[c], sizeof cl[c], "%d", e);
        else if (e == 0) snprintf(cl[c], sizeof cl[c], "L%d", lidx[c / E]);
        else if (e % 4 == 0) snprintf(cl[c], sizeof cl[c], "%d", e);
        else cl[c][0] = 0; /* every label would overlap its neighbours */
        clp[c] = cl[c];
    }
    char xl[160];
    if (l_only >= 0) {
        snprintf(title, sizeof title, "Expert share of each genre's tokens, layer %d", layer_sel);
        snprintf(xl, sizeof xl, "expert");
    } else {
        snprintf(title, sizeof title, "Expert share of each genre's tokens, every MoE layer");
        snprintf(xl, sizeof xl, "expert, layer by layer (L<i>: expert 0 of layer i; %d blocks of %d)", L, E);
    }
    snprintf(path, sizeof path, "%s/genre_heatmap.svg", out);
    if (moe__heatmap_svg(path, title, xl, rlp, clp, v, P, gc, l_only >= 0 ? 0 : E, vmax > 0 ? vmax : 1, err, sizeof err)) {
        fprintf(stderr, "moe route: %s\n", err);
        goto done;
    }
    rc = 0;
done:
    if (rc && !v) fprintf(stderr, "moe route: out of memory\n");
    free(v), free(rl), free(cl), free(rlp), free(clp);
    return rc;
}

int cli_route_report(const moe__route_acc *a, const int *lidx, const char *model_dir, const char *split, int k,
                     int layer_sel, double flag_ratio, int64_t min_count, double seconds, const char *out) {
    const int G = a->G, L = a->L, E = a->E;
    int rc = 1, P = 0, nflags = 0;
    double *x = malloc(sizeof(double) * E), *y = malloc(sizeof(double) * E);
    layer_sum *ls = calloc((size_t)L, sizeof *ls);
    int *gi = malloc(sizeof(int) * G);
    double *loss = calloc((size_t)G, sizeof *loss), *jsr = calloc((size_t)G, sizeof *jsr);
    double *useh = calloc((size_t)G, sizeof *useh), *jsm = calloc((size_t)G * G, sizeof *jsm);
    moe__route_flag *fl = malloc(sizeof *fl * MAX_FLAGS_SHOWN);
    cJSON *root = cJSON_CreateObject();
    moe__sb md = {0};
    char *js_text = NULL;
    if (!x || !y || !ls || !gi || !loss || !jsr || !useh || !jsm || !fl || !root) {
        fprintf(stderr, "moe route: out of memory\n");
        goto done;
    }
    int64_t ntok = 0;
    for (int g = 0; g < G; g++) {
        ntok += a->tokens[g];
        if (a->tokens[g] > 0) gi[P++] = g;
    }
    for (int l = 0; l < L; l++) {
        layer_vectors(a, -1, l, x, y);
        ls[l].cv = moe__route_cv(x, E);
        ls[l].max_over_mean = moe__route_max_over_mean(x, E);
        ls[l].norm_entropy = moe__route_norm_entropy(x, E);
        ls[l].importance_cv = moe__route_cv(y, E);
        ls[l].router_entropy = a->ent_tokens[l] ? a->ent[l] / a->ent_tokens[l] : 0;
        for (int e = 0; e < E; e++) ls[l].dead += x[e] == 0;
    }
    for (int p = 0; p < P; p++) {
        const int g = gi[p];
        loss[g] = a->ce_tokens[g] ? a->ce[g] / a->ce_tokens[g] : NAN;
        jsr[g] = P > 1 ? js_mean(a, g, -1, x, y) : NAN;
        for (int l = 0; l < L; l++) {
            layer_vectors(a, g, l, x, NULL);
            useh[g] += moe__route_norm_entropy(x, E) / L;
        }
        for (int q = 0; q < P; q++) jsm[(size_t)g * G + gi[q]] = js_mean(a, g, gi[q], x, y);
    }
    nflags = moe__route_flags(a, flag_ratio, min_count, fl, MAX_FLAGS_SHOWN);
    if (nflags < 0) {
        fprintf(stderr, "moe route: out of memory\n");
        goto done;
    }

    /* ---- route.json ---- */
    cJSON_AddStringToObject(root, "model", model_dir);
    cJSON_AddStringToObject(root, "split", split);
    cJSON_AddNumberToObject(root, "tokens", (double)ntok);
    cJSON_AddNumberToObject(root, "experts", E);
    cJSON_AddNumberToObject(root, "experts_used", k);
    cJSON *th = cJSON_AddObjectToObject(root, "thresholds");
    cJSON_AddNumberToObject(th, "flag_ratio", flag_ratio);
    cJSON_AddNumberToObject(th, "min_count", (double)min_count);
    cJSON_AddNumberToObject(th, "layer_max_over_mean", FIND_MAX_OVER_MEAN);
    cJSON_AddNumberToObject(th, "layer_norm_entropy", FIND_NORM_ENTROPY);
    cJSON_AddNumberToObject(th, "genre_js", FIND_JS);
    cJSON *jl = cJSON_AddArrayToObject(root, "layers");
    for (int l = 0; l < L; l++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddNumberToObject(o, "layer", lidx[l]);
        layer_vectors(a, -1, l, x, y);
        cJSON_AddItemToObject(o, "counts", num_array(x, E));
        cJSON_AddItemToObject(o, "gate_mass", num_array(y, E));
        cJSON_AddNumberToObject(o, "load_cv", ls[l].cv);
        cJSON_AddNumberToObject(o, "load_max_over_mean", ls[l].max_over_mean);
        cJSON_AddNumberToObject(o, "load_norm_entropy", ls[l].norm_entropy);
        cJSON_AddNumberToObject(o, "gate_mass_cv", ls[l].importance_cv);
        cJSON_AddNumberToObject(o, "router_entropy", ls[l].router_entropy);
        cJSON_AddNumberToObject(o, "router_entropy_norm", E > 1 ? ls[l].router_entropy / log(E) : 0);
        cJSON_AddNumberToObject(o, "unused_experts", ls[l].dead);
        cJSON_AddItemToArray(jl, o);
    }
    cJSON *jg = cJSON_AddArrayToObject(root, "genres");
    for (int p = 0; p < P; p++) {
        const int g = gi[p];
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "genre", moe_brown_genre_name(g));
        cJSON_AddNumberToObject(o, "tokens", (double)a->tokens[g]);
        cJSON_AddNumberToObject(o, "loss", isfinite(loss[g]) ? loss[g] : -1);
        cJSON_AddNumberToObject(o, "perplexity", isfinite(loss[g]) ? exp(loss[g]) : -1);
        cJSON_AddNumberToObject(o, "js_vs_rest", isfinite(jsr[g]) ? jsr[g] : -1);
        cJSON_AddNumberToObject(o, "usage_norm_entropy", useh[g]);
        cJSON *c = cJSON_AddArrayToObject(o, "counts");
        for (int l = 0; l < L; l++) {
            layer_vectors(a, g, l, x, NULL);
            cJSON_AddItemToArray(c, num_array(x, E));
        }
        cJSON_AddItemToArray(jg, o);
    }
    cJSON *jm = cJSON_AddArrayToObject(root, "js_matrix");
    for (int p = 0; p < P; p++) {
        cJSON *row = cJSON_CreateArray();
        for (int q = 0; q < P; q++) cJSON_AddItemToArray(row, cJSON_CreateNumber(jsm[(size_t)gi[p] * G + gi[q]]));
        cJSON_AddItemToArray(jm, row);
    }
    cJSON *jf = cJSON_AddArrayToObject(root, "flags");
    cJSON_AddNumberToObject(root, "flags_total", nflags);
    for (int i = 0; i < nflags && i < MAX_FLAGS_SHOWN; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "genre", moe_brown_genre_name(fl[i].group));
        cJSON_AddNumberToObject(o, "layer", lidx[fl[i].layer]);
        cJSON_AddNumberToObject(o, "expert", fl[i].expert);
        cJSON_AddNumberToObject(o, "count", (double)fl[i].count);
        cJSON_AddNumberToObject(o, "share", fl[i].share);
        cJSON_AddNumberToObject(o, "rest_share", fl[i].rest_share);
        cJSON_AddNumberToObject(o, "ratio", isfinite(fl[i].ratio) ? fl[i].ratio : -1);
        cJSON_AddItemToArray(jf, o);
    }
    js_text = cJSON_Print(root);
    if (!js_text || write_text(out, "route.json", js_text, strlen(js_text))) goto done;

    /* ---- report.md ---- */
    moe__sb_printf(&md, "# Routing audit\n\nModel `%s`, %s split: %lld tokens routed through %d MoE layers of %d "
                        "experts, %d used per token (%.1f s).\n\n## Findings\n\n",
                   model_dir, split, (long long)ntok, L, E, k, seconds);
    int uneven = 0;
    for (int l = 0; l < L; l++) {
        layer_vectors(a, -1, l, x, NULL);
        int busiest = 0;
        for (int e = 1; e < E; e++)
            if (x[e] > x[busiest]) busiest = e;
        if (ls[l].max_over_mean >= FIND_MAX_OVER_MEAN || ls[l].norm_entropy < FIND_NORM_ENTROPY) {
            uneven++;
            moe__sb_printf(&md, "- **Layer %d is unevenly loaded:** expert %d takes %.2f times the mean load; the "
                                "load's entropy is %.3f of an even split (CV %.3f).\n",
                           lidx[l], busiest, ls[l].max_over_mean, ls[l].norm_entropy, ls[l].cv);
        }
        if (ls[l].dead > 0) {
            moe__sb_printf(&md, "- **Layer %d has %.0f unused expert(s):** ", lidx[l], ls[l].dead);
            for (int e = 0, first = 1; e < E; e++)
                if (x[e] == 0) moe__sb_printf(&md, "%s%d", first ? "" : ", ", e), first = 0;
            moe__sb_str(&md, " received no token.\n");
        }
    }
    if (!uneven)
        moe__sb_printf(&md, "- Every layer's load is even by this audit's rule: max/mean below %.1f and load entropy "
                            "at least %.2f of an even split.\n", FIND_MAX_OVER_MEAN, FIND_NORM_ENTROPY);
    if (P > 1) {
        int gmax = gi[0], p1 = 0, q1 = 1, p0 = 0, q0 = 1;
        for (int p = 0; p < P; p++) {
            if (jsr[gi[p]] > jsr[gmax]) gmax = gi[p];
            for (int q = p + 1; q < P; q++) {
                const double v = jsm[(size_t)gi[p] * G + gi[q]];
                if (v > jsm[(size_t)gi[p1] * G + gi[q1]]) p1 = p, q1 = q;
                if (v < jsm[(size_t)gi[p0] * G + gi[q0]]) p0 = p, q0 = q;
            }
        }
        moe__sb_printf(&md, "- **%s** is the genre routed most differently from the rest: Jensen-Shannon divergence "
                            "%.4f bits (mean over layers; 0 = same expert usage, 1 = disjoint)%s.\n",
                       moe_brown_genre_name(gmax), jsr[gmax],
                       jsr[gmax] >= FIND_JS ? ", above this audit's threshold" : ", below this audit's threshold: no "
                                                                                 "genre stands apart");
        moe__sb_printf(&md, "- The most different pair of genres is %s / %s (%.4f bits), the closest %s / %s (%.4f bits).\n",
                       moe_brown_genre_name(gi[p1]), moe_brown_genre_name(gi[q1]), jsm[(size_t)gi[p1] * G + gi[q1]],
                       moe_brown_genre_name(gi[p0]), moe_brown_genre_name(gi[q0]), jsm[(size_t)gi[p0] * G + gi[q0]]);
        int lo = gi[0], hi = gi[0];
        for (int p = 0; p < P; p++) {
            if (loss[gi[p]] < loss[lo]) lo = gi[p];
            if (loss[gi[p]] > loss[hi]) hi = gi[p];
        }
        moe__sb_printf(&md, "- The model predicts %s best (perplexity %.1f) and %s worst (perplexity %.1f).\n",
                       moe_brown_genre_name(lo), exp(loss[lo]), moe_brown_genre_name(hi), exp(loss[hi]));
    }
    if (nflags > 0)
        moe__sb_printf(&md, "- %d (genre, layer, expert) triples pass the flag rule (the expert's share of the genre's "
                            "slots in that layer is at least %.2g times its share of the other genres' slots, over at "
                            "least %lld tokens). The strongest: **%s** gives %.1f%% of its slots (token-expert pairs) in "
                            "layer %d to expert %d, the other genres %.1f%%.\n",
                       nflags, flag_ratio, (long long)min_count, moe_brown_genre_name(fl[0].group), 100 * fl[0].share,
                       lidx[fl[0].layer], fl[0].expert, 100 * fl[0].rest_share);
    else
        moe__sb_printf(&md, "- No expert is used %.2g times more by one genre than by the rest (over at least %lld "
                            "tokens).\n", flag_ratio, (long long)min_count);
    if (P > 0 && ntok / P < 2000)
        moe__sb_printf(&md, "- Caution: about %lld tokens per genre. Divergences computed from few tokens are biased "
                            "upwards and the flags are noisy; run on the whole split for conclusions.\n",
                       (long long)(ntok / P));

    moe__sb_str(&md, "\n## Layers\n\nLoad = tokens routed to each expert (k slots per token). CV = population std/mean of "
                     "the load; entropy normalised by ln E (1 = even); gate-mass CV = CV of the summed gate weights; "
                     "router entropy = mean over tokens of the entropy of the router's scores, in nats and over ln E.\n\n"
                     "| layer | load CV | max/mean | load entropy | gate-mass CV | router entropy (nats) | router "
                     "entropy / ln E | unused experts |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int l = 0; l < L; l++)
        moe__sb_printf(&md, "| %d | %.4f | %.3f | %.4f | %.4f | %.4f | %.4f | %.0f |\n", lidx[l], ls[l].cv,
                       ls[l].max_over_mean, ls[l].norm_entropy, ls[l].importance_cv, ls[l].router_entropy,
                       E > 1 ? ls[l].router_entropy / log(E) : 0, ls[l].dead);
    moe__sb_str(&md, "\n### Tokens per expert\n\n| layer |");
    for (int e = 0; e < E; e++) moe__sb_printf(&md, " %d |", e);
    moe__sb_str(&md, "\n|---:|");
    for (int e = 0; e < E; e++) moe__sb_str(&md, "---:|");
    for (int l = 0; l < L; l++) {
        moe__sb_printf(&md, "\n| %d |", lidx[l]);
        for (int e = 0; e < E; e++) moe__sb_printf(&md, " %lld |", (long long)moe__route_count(a, -1, l, e));
    }
    moe__sb_str(&md, "\n");
    moe__sb_str(&md, "\n![layer x expert load](heatmap.svg)\n\n## Genres\n\nLoss = mean next-token cross-entropy over "
                     "the genre's tokens (nats). JS vs rest = Jensen-Shannon divergence (bits) between the genre's expert "
                     "usage and that of every other genre together, mean over layers. Usage entropy = normalised entropy "
                     "of the genre's own load, mean over layers.\n\n| genre | tokens | loss | perplexity | JS vs rest | "
                     "usage entropy |\n|---|---:|---:|---:|---:|---:|\n");
    for (int p = 0; p < P; p++) {
        const int g = gi[p];
        moe__sb_printf(&md, "| %s | %lld | %.4f | %.2f | %.4f | %.4f |\n", moe_brown_genre_name(g),
                       (long long)a->tokens[g], loss[g], exp(loss[g]), jsr[g], useh[g]);
    }
    moe__sb_str(&md, "\n![genre x expert usage](genre_heatmap.svg)\n\n## Jensen-Shannon divergence between genres\n\n"
                     "Bits, mean over layers.\n\n| |");
    for (int q = 0; q < P; q++) moe__sb_printf(&md, " %s |", moe_brown_genre_name(gi[q]));
    moe__sb_str(&md, "\n|---|");
    for (int q = 0; q < P; q++) moe__sb_str(&md, "---:|");
    moe__sb_str(&md, "\n");
    for (int p = 0; p < P; p++) {
        moe__sb_printf(&md, "| %s |", moe_brown_genre_name(gi[p]));
        for (int q = 0; q < P; q++) moe__sb_printf(&md, " %.3f |", jsm[(size_t)gi[p] * G + gi[q]]);
        moe__sb_str(&md, "\n");
    }
    moe__sb_printf(&md, "\n## Experts one genre uses far more than the rest\n\nA slot is one (token, expert) pair, k per "
                        "token. Rule: the expert's share of the genre's slots in the layer >= %.2g x its share of the other "
                        "genres' slots, and at least %lld of the genre's tokens on it. %d found%s.\n\n",
                   flag_ratio, (long long)min_count, nflags, nflags > MAX_FLAGS_SHOWN ? " (the strongest shown)" : "");
    if (nflags > 0) {
        moe__sb_str(&md, "| genre | layer | expert | tokens | share of genre's slots | share of rest's slots | ratio |\n"
                         "|---|---:|---:|---:|---:|---:|---:|\n");
        for (int i = 0; i < nflags && i < MAX_FLAGS_SHOWN; i++)
            moe__sb_printf(&md, "| %s | %d | %d | %lld | %.2f%% | %.2f%% | %.2f |\n", moe_brown_genre_name(fl[i].group),
                           lidx[fl[i].layer], fl[i].expert, (long long)fl[i].count, 100 * fl[i].share,
                           100 * fl[i].rest_share, fl[i].ratio);
    }
    if (md.oom || write_text(out, "report.md", md.p, md.len)) goto done;
    rc = heatmaps(a, lidx, gi, P, layer_sel, out);
done:
    free(x), free(y), free(ls), free(gi), free(loss), free(jsr), free(useh), free(jsm), free(fl);
    cJSON_Delete(root);
    cJSON_free(js_text);
    moe__sb_free(&md);
    return rc;
}
