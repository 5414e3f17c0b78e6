/* Heatmaps as SVG text (rows x columns of coloured cells, a legend). */
#include "io/atomic.h"
#include "report/route_stats.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static void xml_text(moe__sb *b, const char *s) {
    for (; s && *s; s++) {
        switch (*s) {
        case '<': moe__sb_str(b, "&lt;"); break;
        case '>': moe__sb_str(b, "&gt;"); break;
        case '&': moe__sb_str(b, "&amp;"); break;
        case '"': moe__sb_str(b, "&quot;"); break;
        default: moe__sb_put(b, s, 1);
        }
    }
}

/* white (0) to dark blue (1): linear in each channel, so equal steps of the
 * value read as equal steps of darkness */
static void colour(double f, char out[8]) {
    f = f < 0 ? 0 : f > 1 ? 1 : f;
    const int r = (int)lround(255 + f * (8 - 255)), g = (int)lround(255 + f * (48 - 255)), bl = (int)lround(255 + f * (107 - 255));
    snprintf(out, 8, "#%02x%02x%02x", r, g, bl);
}

int moe__heatmap_svg(const char *path, const char *title, const char *xlabel, const char *const *row_labels,
                     const char *const *col_labels, const double *v, int R, int C, int col_group, double vmax,
                     char *err, size_t errsz) {
    if (R <= 0 || C <= 0 || R > 4096 || C > 4096 || !(vmax > 0))
        return moe__set_err(err, errsz, MOE_EINVAL, "%s: heatmap of %d x %d cells, scale %g", path, R, C, vmax);
    const int cw = C <= 16 ? 36 : C <= 64 ? 14 : 6, ch = 22, L = 120, T = 50, legend = 90;
    const int W = L + C * cw + legend + 20, H = T + R * ch + 60;
    const int label_every = cw >= 14 ? 1 : 8;
    moe__sb b = {0};
    moe__sb_printf(&b, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" "
                       "font-size=\"11\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H);
    moe__sb_printf(&b, "<text x=\"%d\" y=\"22\" font-size=\"14\" text-anchor=\"middle\">", W / 2);
    xml_text(&b, title);
    moe__sb_str(&b, "</text>\n");
    char col[8];
    for (int r = 0; r < R; r++) {
        moe__sb_printf(&b, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">", L - 6, T + r * ch + ch / 2 + 4);
        xml_text(&b, row_labels[r]);
        moe__sb_str(&b, "</text>\n");
        for (int c = 0; c < C; c++) {
            const double x = v[(size_t)r * C + c];
            colour(x / vmax, col);
            moe__sb_printf(&b, "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"%s\" stroke=\"#eee\"><title>",
                           L + c * cw, T + r * ch, cw, ch, col);
            xml_text(&b, row_labels[r]);
            moe__sb_str(&b, ", ");
            xml_text(&b, col_labels[c]);
            moe__sb_printf(&b, ": %.4g</title></rect>\n", x);
        }
    }
    for (int c = col_group; col_group > 0 && c < C; c += col_group)
        moe__sb_printf(&b, "<line x1=\"%d\" x2=\"%d\" y1=\"%d\" y2=\"%d\" stroke=\"#333\" stroke-width=\"2\"/>\n",
                       L + c * cw, L + c * cw, T - 4, T + R * ch + 4);
    for (int c = 0; c < C; c += label_every) {
        moe__sb_printf(&b, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">", L + (c + 0.5) * cw, T + R * ch + 14);
        xml_text(&b, col_labels[c]);
        moe__sb_str(&b, "</text>\n");
    }
    moe__sb_printf(&b, "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">", L + C * cw / 2.0, T + R * ch + 34);
    xml_text(&b, xlabel);
    moe__sb_str(&b, "</text>\n");
    /* legend: ten steps from vmax (top) to 0 */
    const int lx = L + C * cw + 20, lh = R * ch > 100 ? R * ch : 100, steps = 10;
    for (int i = 0; i < steps; i++) {
        colour(1.0 - (i + 0.5) / steps, col);
        moe__sb_printf(&b, "<rect x=\"%d\" y=\"%.1f\" width=\"16\" height=\"%.1f\" fill=\"%s\"/>\n", lx,
                       T + (double)i * lh / steps, (double)lh / steps + 0.5, col);
    }
    moe__sb_printf(&b, "<rect x=\"%d\" y=\"%d\" width=\"16\" height=\"%d\" fill=\"none\" stroke=\"#888\"/>\n", lx, T, lh);
    for (int i = 0; i <= 2; i++)
        moe__sb_printf(&b, "<text x=\"%d\" y=\"%.1f\">%.3g</text>\n", lx + 20, T + lh * (1 - i / 2.0) + 4, vmax * i / 2);
    moe__sb_str(&b, "</svg>\n");
    return moe__write_sb_atomic(path, &b, err, errsz);
}
