/* moe plot: the loss curves of several runs (their train_state.json) in one
 * SVG, e.g. the MoE model against its dense baseline. */
#include "args.h"
#include "cli.h"
#include "internal.h"
#include "train/state_json.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    double *x, *y;
    int n;
    char label[160];
} curve;

/* Reads the "val" (or "train") pairs of dir/train_state.json into c (the
 * library's checked parser, the one --resume uses). */
static int read_curve(const char *dir, const char *key, int x_tokens, curve *c) {
    char err[4200];
    moe__train_state st;
    if (moe__train_state_load(dir, &st, err, sizeof err)) {
        fprintf(stderr, "moe plot: %s\n", err);
        return 1;
    }
    const moe__train_curve *k = strcmp(key, "train") ? &st.val : &st.train;
    /* tokens per step, to put runs of different batch sizes on one axis */
    const double tps = st.step > 0 ? st.tokens / st.step : 1;
    c->x = calloc((size_t)k->n + 1, sizeof(double));
    c->y = calloc((size_t)k->n + 1, sizeof(double));
    if (!c->x || !c->y) {
        fprintf(stderr, "moe plot: out of memory\n");
        moe__train_state_free(&st);
        return 1;
    }
    for (int i = 0; i < k->n; i++) c->x[i] = x_tokens ? k->step[i] * tps / 1e6 : k->step[i], c->y[i] = k->val[i];
    c->n = k->n;
    const char *slash = strrchr(dir, '/');
    snprintf(c->label, sizeof c->label, "%s (%s)", slash && slash[1] ? slash + 1 : dir, key);
    moe__train_state_free(&st);
    return 0;
}

int moe_cli_plot(int argc, char **argv) {
    const char *out = "loss.svg", *title = "validation loss";
    int train = 0, by_step = 0, i0 = 0;
    /* run directories come first, then flags */
    while (i0 < argc && argv[i0][0] != '-') i0++;
    cli_arg args[] = {
        {"--out", "-o", ARG_STR, &out, "output SVG file"},
        {"--title", NULL, ARG_STR, &title, "chart title"},
        {"--train", NULL, ARG_BOOL, &train, "also plot the training loss"},
        {"--by-step", NULL, ARG_BOOL, &by_step, "x axis in steps instead of millions of tokens"},
    };
    int rc = cli_parse("moe plot RUN_DIR... [--out FILE] [--train] [--by-step]", args, sizeof args / sizeof args[0],
                       argc - i0, argv + i0);
    if (rc) return rc == 1 ? 0 : 2;
    if (i0 == 0) {
        fprintf(stderr, "moe plot: give at least one run directory\n");
        return 2;
    }
    curve *c = calloc((size_t)i0 * 2, sizeof *c);
    moe_plot_series *s = calloc((size_t)i0 * 2, sizeof *s);
    int n = 0;
    for (int i = 0; i < i0; i++) {
        if (read_curve(argv[i], "val", !by_step, &c[n])) return 1;
        s[n] = (moe_plot_series){c[n].label, c[n].x, c[n].y, c[n].n, 1};
        n++;
        if (train) {
            if (read_curve(argv[i], "train", !by_step, &c[n])) return 1;
            s[n] = (moe_plot_series){c[n].label, c[n].x, c[n].y, c[n].n, 0};
            n++;
        }
    }
    char err[512];
    rc = moe_plot_svg(out, title, by_step ? "step" : "tokens seen (millions)", "cross-entropy (nats/token)", s, n, 0,
                      err, sizeof err);
    if (rc) fprintf(stderr, "moe plot: %s\n", err);
    else printf("wrote %s\n", out);
    for (int i = 0; i < n; i++) free(c[i].x), free(c[i].y);
    free(c), free(s);
    return rc ? 1 : 0;
}
