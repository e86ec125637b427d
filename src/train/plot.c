/*
 * plot.c — `kiln plot`: a run's metrics.jsonl rendered as a self-contained
 * SVG (training loss, its moving average, and validation loss against the
 * step), readable in any browser.
 */
#include "base/base.h"

#include <stdbool.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

typedef struct series {
    double *x, *y;
    size_t n, cap;
} series;

static int series_push(series *s, double x, double y)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 256;
        double *nx = realloc(s->x, cap * sizeof *nx);
        if (!nx) return -1;
        s->x = nx;
        double *ny = realloc(s->y, cap * sizeof *ny);
        if (!ny) return -1;
        s->y = ny;
        s->cap = cap;
    }
    s->x[s->n] = x;
    s->y[s->n] = y;
    s->n++;
    return 0;
}

static bool plottable(double v) { return isfinite(v) && fabs(v) < 1e100; }

/* A "nice" tick step for a range, about n ticks. */
static double nice_step(double range, int n)
{
    double raw = range / n, mag = pow(10, floor(log10(raw)));
    double f = raw / mag;
    return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * mag;
}

typedef struct sbuf {
    char *p;
    size_t n, cap;
    bool oom;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...)
{
    if (b->oom) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int k = vsnprintf(b->p + b->n, b->cap - b->n, fmt, ap);
        va_end(ap);
        if (k >= 0 && (size_t)k < b->cap - b->n) {
            b->n += (size_t)k;
            return;
        }
        size_t cap = b->cap * 2 + (size_t)k + 64;
        char *np = realloc(b->p, cap);
        if (!np) {
            b->oom = true;
            return;
        }
        b->p = np;
        b->cap = cap;
    }
}

kiln_status kiln_plot_metrics(kiln_ctx *ctx, const char *run_dir,
                              const char *svg_path)
{
    return kiln_plot_metric(ctx, run_dir, "loss", "val_loss", svg_path);
}

kiln_status kiln_plot_metric(kiln_ctx *ctx, const char *run_dir, const char *key,
                             const char *val_key, const char *svg_path)
{
    bool is_loss = !strcmp(key, "loss");
    char *path = file_join(run_dir, "metrics.jsonl");
    char *text = NULL;
    size_t len = 0;
    if (!path) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    kiln_status s = file_read_all(ctx, path, &text, &len);
    if (s) {
        kiln_fail(ctx, s,
                  "cannot read '%s': is '%s' the run directory of a training "
                  "run (its kiln_train_opts.out)?",
                  path, run_dir);
        free(path);
        return s;
    }
    series tr = {0}, va = {0}, ma = {0};
    int lineno = 0;
    for (char *line = text, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next) *next++ = 0;
        lineno++;
        if (!*line) continue;
        json_error_t err;
        json_t *j = json_loads(line, 0, &err);
        if (!j) {
            /* a run killed mid-write can leave a partial last line */
            if (!next || !*next) break;
            s = kiln_fail(ctx, KILN_ERR_FORMAT, "%s:%d: invalid JSON: %s",
                          path, lineno, err.text);
            break;
        }
        json_t *st = json_object_get(j, "step");
        json_t *lo = json_object_get(j, key);
        json_t *vl = val_key ? json_object_get(j, val_key) : NULL;
        double x = json_number_value(st);
        /* a point needs a numeric step; values so large that the axis
         * range overflows would turn every coordinate into NaN */
        if (json_is_number(st) && plottable(x)) {
            if (json_is_number(lo) && plottable(json_number_value(lo)))
                series_push(&tr, x, json_number_value(lo));
            if (json_is_number(vl) && plottable(json_number_value(vl)))
                series_push(&va, x, json_number_value(vl));
        }
        json_decref(j);
    }
    free(text);
    if (!s && tr.n == 0 && va.n == 0)
        s = is_loss ? kiln_fail(ctx, KILN_ERR_FORMAT, "'%s' holds no loss values yet", path)
                    : kiln_fail(ctx, KILN_ERR_FORMAT, "'%s' holds no \"%s\"%s%s%s values yet",
                                path, key, val_key ? " or \"" : "", val_key ? val_key : "",
                                val_key ? "\"" : "");
    if (s) goto done;
    /* moving average of the training loss (window ~ 2% of the run) */
    size_t win = tr.n / 50 + 1;
    double acc = 0;
    for (size_t i = 0; i < tr.n; i++) {
        acc += tr.y[i];
        if (i >= win) acc -= tr.y[i - win];
        size_t k = i + 1 < win ? i + 1 : win;
        series_push(&ma, tr.x[i], acc / (double)k);
    }
    double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
    series *all[2] = {&tr, &va};
    for (int k = 0; k < 2; k++)
        for (size_t i = 0; i < all[k]->n; i++) {
            x0 = fmin(x0, all[k]->x[i]);
            x1 = fmax(x1, all[k]->x[i]);
            y0 = fmin(y0, all[k]->y[i]);
            y1 = fmax(y1, all[k]->y[i]);
        }
    if (x1 <= x0) x1 = x0 + 1;
    if (y1 <= y0) y1 = y0 + 1;
    double ys = nice_step(y1 - y0, 6), xs = nice_step(x1 - x0, 8);
    y0 = floor(y0 / ys) * ys;
    y1 = ceil(y1 / ys) * ys;
    x0 = floor(x0 / xs) * xs;
    x1 = ceil(x1 / xs) * xs;
    const double W = 800, H = 480, L = 70, R = 20, TOP = 40, BOT = 50;
    const double pw = W - L - R, ph = H - TOP - BOT;
#define PX(x) (L + ((x) - x0) / (x1 - x0) * pw)
#define PY(y) (TOP + (1 - ((y) - y0) / (y1 - y0)) * ph)
    sbuf b = {malloc(8192), 0, 8192, false};
    if (!b.p) {
        s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        goto done;
    }
    sb_printf(&b,
              "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" "
              "height=\"%.0f\" viewBox=\"0 0 %.0f %.0f\" "
              "font-family=\"sans-serif\" font-size=\"12\">\n"
              "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n",
              W, H, W, H);
    const char *title = strrchr(run_dir, '/');
    title = title && title[1] ? title + 1 : run_dir;
    sb_printf(&b,
              "<text x=\"%.0f\" y=\"24\" text-anchor=\"middle\" "
              "font-size=\"15\">%s%s%s — %s</text>\n",
              L + pw / 2, key, val_key && !is_loss ? ", " : "",
              val_key && !is_loss ? val_key : "", title);
    for (double y = y0; y <= y1 + ys / 2; y += ys) {
        sb_printf(&b,
                  "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" "
                  "stroke=\"#ddd\"/><text x=\"%.1f\" y=\"%.1f\" "
                  "text-anchor=\"end\">%g</text>\n",
                  L, PY(y), L + pw, PY(y), L - 6, PY(y) + 4,
                  fabs(y) < ys / 1e6 ? 0 : y);
    }
    for (double x = x0; x <= x1 + xs / 2; x += xs) {
        sb_printf(&b,
                  "<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" "
                  "stroke=\"#eee\"/><text x=\"%.1f\" y=\"%.1f\" "
                  "text-anchor=\"middle\">%g</text>\n",
                  PX(x), TOP, PX(x), TOP + ph, PX(x), TOP + ph + 18, x);
    }
    sb_printf(&b,
              "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" "
              "fill=\"none\" stroke=\"#333\"/>\n"
              "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">step</text>\n"
              "<text transform=\"translate(18 %.0f) rotate(-90)\" "
              "text-anchor=\"middle\">%s</text>\n",
              L, TOP, pw, ph, L + pw / 2, H - 10, TOP + ph / 2,
              is_loss ? "cross-entropy (nats/token)" : key);
    series *draw[3] = {&tr, &ma, &va};
    const char *style[3] = {"stroke=\"#9ecae1\" stroke-width=\"1\"",
                            "stroke=\"#08519c\" stroke-width=\"2\"",
                            "stroke=\"#e6550d\" stroke-width=\"2\""};
    for (int k = 0; k < 3; k++) {
        series *sr = draw[k];
        if (sr->n == 0) continue;
        sb_printf(&b, "<polyline fill=\"none\" %s points=\"", style[k]);
        for (size_t i = 0; i < sr->n; i++)
            sb_printf(&b, "%.1f,%.1f ", PX(sr->x[i]), PY(sr->y[i]));
        sb_printf(&b, "\"/>\n");
        if (k == 2)
            for (size_t i = 0; i < sr->n; i++)
                sb_printf(&b,
                          "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" "
                          "fill=\"#e6550d\"/>\n",
                          PX(sr->x[i]), PY(sr->y[i]));
    }
    /* legend */
    const char *names[3] = {"train loss", "train loss (moving avg)",
                            "validation loss"};
    for (int k = 0, row = 0; k < 3; k++) {
        if (draw[k]->n == 0) continue;
        double ly = TOP + 14 + 16 * row++;
        sb_printf(&b,
                  "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\" %s/>"
                  "<text x=\"%.0f\" y=\"%.0f\">%s</text>\n",
                  L + pw - 190, ly, L + pw - 165, ly, style[k], L + pw - 158,
                  ly + 4, names[k]);
    }
    if (va.n)
        sb_printf(&b,
                  "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"end\" "
                  "fill=\"#555\">last val_loss %.4f at step %g</text>\n",
                  L + pw - 8, TOP + ph - 8, va.y[va.n - 1], va.x[va.n - 1]);
    sb_printf(&b, "</svg>\n");
#undef PX
#undef PY
    if (b.oom) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    else s = file_write_atomic(ctx, svg_path, b.p, b.n);
    free(b.p);
done:
    free(tr.x);
    free(tr.y);
    free(va.x);
    free(va.y);
    free(ma.x);
    free(ma.y);
    free(path);
    return s;
}
