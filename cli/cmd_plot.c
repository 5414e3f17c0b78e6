/* moe plot: the loss curves of several runs (their train_state.json) in one
 * SVG, e.g. the MoE model against its dense baseline. */
#include "args.h"
#include "cli.h"
#include "io/ckpt.h"
#include "internal.h"
#include "io/atomic.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    double *x, *y;
    int n;
    char label[160];
} curve;

/* Reads the "val" (or "train") pairs of dir/train_state.json into c. */
static int read_curve(const char *dir, const char *key, int x_tokens, curve *c) {
    char path[4096], err[512], *buf;
    size_t n;
    moe__ckpt_path(dir, "train_state.json", path, sizeof path, NULL, 0); /* a checkpoint cut short reads as the committed one */
    if (moe__read_file(path, 64u << 20, &buf, &n, err, sizeof err)) {
        fprintf(stderr, "moe plot: %s\n", err);
        return 1;
    }
    cJSON *root = cJSON_ParseWithLength(buf, n);
    moe__free(buf);
    const cJSON *arr = root ? cJSON_GetObjectItemCaseSensitive(root, key) : NULL;
    const cJSON *steps = root ? cJSON_GetObjectItemCaseSensitive(root, "step") : NULL;
    const cJSON *toks = root ? cJSON_GetObjectItemCaseSensitive(root, "tokens") : NULL;
    if (!cJSON_IsArray(arr)) {
        fprintf(stderr, "moe plot: %s: no \"%s\" curve\n", path, key);
        cJSON_Delete(root);
        return 1;
    }
    /* tokens per step, to put runs of different batch sizes on one axis */
    const double tps = cJSON_IsNumber(steps) && cJSON_IsNumber(toks) && steps->valuedouble > 0
                           ? toks->valuedouble / steps->valuedouble : 1;
    int m = cJSON_GetArraySize(arr);
    c->x = calloc((size_t)m + 1, sizeof(double));
    c->y = calloc((size_t)m + 1, sizeof(double));
    c->n = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, arr) {
        const cJSON *a = cJSON_GetArrayItem(it, 0), *b = cJSON_GetArrayItem(it, 1);
        if (cJSON_IsNumber(a) && cJSON_IsNumber(b)) {
            c->x[c->n] = x_tokens ? a->valuedouble * tps / 1e6 : a->valuedouble;
            c->y[c->n++] = b->valuedouble;
        }
    }
    const char *slash = strrchr(dir, '/');
    snprintf(c->label, sizeof c->label, "%s (%s)", slash && slash[1] ? slash + 1 : dir, key);
    cJSON_Delete(root);
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
