/* Line charts as SVG text: axes with rounded ticks, one polyline per series,
 * a legend. Enough for loss curves and the experiments' plots. */
#include "internal.h"
#include "io/atomic.h"
#include "strbuf.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* XML-escapes a label into b */
static void sb_text(moe__sb *b, const char *s) {
    for (; s && *s; s++) {
        switch (*s) {
        case '<': moe__sb_printf(b, "&lt;"); break;
        case '>': moe__sb_printf(b, "&gt;"); break;
        case '&': moe__sb_printf(b, "&amp;"); break;
        case '"': moe__sb_printf(b, "&quot;"); break;
        default: moe__sb_printf(b, "%c", *s);
        }
    }
}

static double nice_step(double range, int target) {
    double raw = range / target, mag = pow(10, floor(log10(raw))), f = raw / mag;
    return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
}

/* Large tick values as 250K, 1.5M rather than 1.5e+06 */
static void tick_label(double v, char *b, size_t n) {
    const double a = fabs(v);
    if (a >= 1e9) snprintf(b, n, "%gG", v / 1e9);
    else if (a >= 1e6) snprintf(b, n, "%gM", v / 1e6);
    else if (a >= 1e4) snprintf(b, n, "%gK", v / 1e3);
    else snprintf(b, n, "%g", v);
}

static const char *COLORS[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"};

int moe_plot_svg(const char *path, const char *title, const char *xlabel, const char *ylabel,
                 const moe_plot_series *s, int ns, int log_x, char *err, size_t errsz) {
    double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
    for (int k = 0; k < ns; k++)
        for (int i = 0; i < s[k].n; i++) {
            double x = log_x ? log10(s[k].x[i]) : s[k].x[i], y = s[k].y[i];
            if (!isfinite(x) || !isfinite(y)) continue;
            x0 = fmin(x0, x), x1 = fmax(x1, x), y0 = fmin(y0, y), y1 = fmax(y1, y);
        }
    if (!(x0 <= x1)) x0 = 0, x1 = 1, y0 = 0, y1 = 1;
    if (x1 == x0) x1 = x0 + 1;
    if (y1 == y0) y1 = y0 + 1;
    const double pad = (y1 - y0) * 0.05, xpad = (x1 - x0) * 0.02; /* markers at the ends stay whole */
    y0 -= pad, y1 += pad;
    x0 -= xpad, x1 += xpad;
    const int W = 720, H = 440, L = 70, R = 20, T = 40, Bm = 55;
    const double pw = W - L - R, ph = H - T - Bm;
#define PX(x) (L + ((x) - x0) / (x1 - x0) * pw)
#define PY(y) (T + (y1 - (y)) / (y1 - y0) * ph)
    moe__sb b = {0};
    moe__sb_printf(&b, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" font-family=\"sans-serif\" "
                  "font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n", W, H);
    moe__sb_printf(&b, "<text x=\"%d\" y=\"22\" font-size=\"15\" text-anchor=\"middle\">", W / 2);
    sb_text(&b, title);
    moe__sb_printf(&b, "</text>\n");
    /* grid and ticks */
    double ys = nice_step(y1 - y0, 6);
    for (double y = ceil(y0 / ys) * ys; y <= y1; y += ys)
        moe__sb_printf(&b, "<line x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/><text x=\"%d\" y=\"%.1f\" "
                      "text-anchor=\"end\">%g</text>\n", L, W - R, PY(y), PY(y), L - 6, PY(y) + 4, y);
    /* log x: ticks at 1, 2, 5 times the powers of ten when the data span
     * fewer than three decades (one tick per decade leaves one or none) */
    const double xs = log_x ? 1 : nice_step(x1 - x0, 8);
    static const double MANT[3] = {1, 2, 5};
    const int nm = log_x && x1 - x0 < 3 ? 3 : 1;
    for (double d = ceil(x0 / xs) * xs - (log_x ? 1 : 0); d <= x1 + 1e-9; d += xs)
        for (int i = 0; i < nm; i++) {
            const double x = log_x ? d + log10(MANT[i]) : d;
            if (x < x0 - 1e-9 || x > x1 + 1e-9) continue;
            char lab[32];
            tick_label(log_x ? pow(10, x) : x, lab, sizeof lab);
            moe__sb_printf(&b, "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%d\" y2=\"%d\" stroke=\"#ddd\"/><text x=\"%.1f\" "
                          "y=\"%d\" text-anchor=\"middle\">%s</text>\n", PX(x), PX(x), T, H - Bm, PX(x), H - Bm + 16, lab);
        }
    moe__sb_printf(&b, "<rect x=\"%d\" y=\"%d\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" stroke=\"#333\"/>\n", L, T, pw, ph);
    moe__sb_printf(&b, "<text x=\"%.0f\" y=\"%d\" text-anchor=\"middle\">", L + pw / 2, H - 12);
    sb_text(&b, xlabel);
    moe__sb_printf(&b, "</text>\n<text x=\"16\" y=\"%.0f\" text-anchor=\"middle\" transform=\"rotate(-90 16 %.0f)\">",
              T + ph / 2, T + ph / 2);
    sb_text(&b, ylabel);
    moe__sb_printf(&b, "</text>\n");
    for (int k = 0; k < ns; k++) {
        const char *col = COLORS[k % 8];
        moe__sb_printf(&b, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.6\" points=\"", col);
        for (int i = 0; i < s[k].n; i++) {
            double x = log_x ? log10(s[k].x[i]) : s[k].x[i], y = s[k].y[i];
            if (isfinite(x) && isfinite(y)) moe__sb_printf(&b, "%.1f,%.1f ", PX(x), PY(y));
        }
        moe__sb_printf(&b, "\"/>\n");
        if (s[k].markers)
            for (int i = 0; i < s[k].n; i++) {
                double x = log_x ? log10(s[k].x[i]) : s[k].x[i], y = s[k].y[i];
                if (isfinite(x) && isfinite(y))
                    moe__sb_printf(&b, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"%s\"/>\n", PX(x), PY(y), col);
            }
        moe__sb_printf(&b, "<rect x=\"%d\" y=\"%d\" width=\"14\" height=\"3\" fill=\"%s\"/><text x=\"%d\" y=\"%d\">",
                  W - R - 190, T + 14 + 18 * k, col, W - R - 170, T + 19 + 18 * k);
        sb_text(&b, s[k].label);
        moe__sb_printf(&b, "</text>\n");
    }
    moe__sb_printf(&b, "</svg>\n");
#undef PX
#undef PY
    return moe__write_sb_atomic(path, &b, err, errsz);
}
