/*
 * jinja_render.c — renders a parsed chat template (jinja.c) for a
 * conversation: expression evaluation, filters, tests, the few functions
 * and string methods templates call, {% for %} with its loop variable,
 * {% set %} (namespaces included), output. Values live in an arena freed
 * when the render ends.
 */
#include "tokenizer/jinja_int.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---- rendering ------------------------------------------------------- */

typedef struct var {
    const char *name;
    jv v;
    struct var *next;
} var;

typedef struct rstate {
    kiln_ctx *ctx;
    const jinja_tmpl *t;
    jarena a;
    var *vars;
    char *out;
    size_t len, cap;
    kiln_status err;
} rstate;

static kiln_status rerr(rstate *R, size_t pos, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static kiln_status rerr(rstate *R, size_t pos, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kiln_status s = ja_vfail(R->ctx, &R->err, R->t->src, pos, fmt, ap);
    va_end(ap);
    return s;
}

static void emit(rstate *R, const char *s, size_t n)
{
    if (R->err) return;
    if (R->len + n + 1 > R->cap) {
        size_t cap = R->cap ? R->cap : 256;
        while (cap < R->len + n + 1) cap *= 2;
        char *o = realloc(R->out, cap);
        if (!o) {
            R->err = kiln_fail(R->ctx, KILN_ERR_NOMEM, "out of memory rendering a chat template");
            return;
        }
        R->out = o;
        R->cap = cap;
    }
    memcpy(R->out + R->len, s, n);
    R->len += n;
    R->out[R->len] = 0;
}

static jv jstr(rstate *R, const char *s, size_t n)
{
    return (jv){.t = JV_STR, .s = ja_strdup(&R->a, s, n), .len = n};
}

static bool truthy(jv v)
{
    switch (v.t) {
    case JV_BOOL: return v.b;
    case JV_NUM: return v.n != 0;
    case JV_STR: return v.len > 0;
    case JV_LIST: return v.l->n > 0;
    case JV_DICT: return v.d->n > 0;
    default: return false;
    }
}

/* Text of a value as {{ }} prints it. */
static jv to_str(rstate *R, jv v)
{
    char buf[64];
    switch (v.t) {
    case JV_STR: return v;
    case JV_UNDEF: return (jv){.t = JV_STR, .s = "", .len = 0};
    case JV_NONE: return (jv){.t = JV_STR, .s = "None", .len = 4};
    case JV_BOOL: return v.b ? (jv){.t = JV_STR, .s = "True", .len = 4}
                             : (jv){.t = JV_STR, .s = "False", .len = 5};
    case JV_NUM:
        if (v.n == floor(v.n) && fabs(v.n) < 1e15) snprintf(buf, sizeof buf, "%lld", (long long)v.n);
        else snprintf(buf, sizeof buf, "%g", v.n);
        return jstr(R, buf, strlen(buf));
    default: return (jv){.t = JV_STR, .s = v.t == JV_LIST ? "[...]" : "{...}", .len = 5};
    }
}

static const char *type_name(jv v)
{
    static const char *const n[] = {"undefined", "none", "boolean", "number", "string", "list", "mapping"};
    return n[v.t];
}

static bool jv_eq(jv a, jv b)
{
    if (a.t == JV_STR && b.t == JV_STR) return a.len == b.len && !memcmp(a.s, b.s, a.len);
    if ((a.t == JV_NUM || a.t == JV_BOOL) && (b.t == JV_NUM || b.t == JV_BOOL))
        return (a.t == JV_NUM ? a.n : a.b) == (b.t == JV_NUM ? b.n : b.b);
    if (a.t != b.t) return false;
    if (a.t == JV_NONE || a.t == JV_UNDEF) return true;
    if (a.t == JV_LIST) return a.l == b.l;
    return a.d == b.d;
}

static jv dict_get(jv d, const char *k, size_t kn)
{
    for (size_t i = 0; i < d.d->n; i++)
        if (strlen(d.d->k[i]) == kn && !memcmp(d.d->k[i], k, kn)) return d.d->v[i];
    return (jv){.t = JV_UNDEF};
}

static bool dict_set(rstate *R, jdict *d, const char *k, jv v)
{
    for (size_t i = 0; i < d->n; i++)
        if (!strcmp(d->k[i], k)) {
            d->v[i] = v;
            return true;
        }
    if (d->n == d->cap) {
        size_t cap = d->cap ? 2 * d->cap : 8;
        const char **nk = ja_alloc(&R->a, cap * sizeof *nk);
        jv *nv = ja_alloc(&R->a, cap * sizeof *nv);
        if (!nk || !nv) return false;
        if (d->n) {
            memcpy(nk, d->k, d->n * sizeof *nk);
            memcpy(nv, d->v, d->n * sizeof *nv);
        }
        d->k = nk;
        d->v = nv;
        d->cap = cap;
    }
    d->k[d->n] = k;
    d->v[d->n++] = v;
    return true;
}

static jv lookup(rstate *R, const char *name)
{
    for (var *v = R->vars; v; v = v->next)
        if (!strcmp(v->name, name)) return v->v;
    return (jv){.t = JV_UNDEF};
}

static void bind(rstate *R, const char *name, jv v)
{
    var *x = ja_alloc(&R->a, sizeof *x);
    if (!x) {
        R->err = kiln_fail(R->ctx, KILN_ERR_NOMEM, "out of memory");
        return;
    }
    x->name = name;
    x->v = v;
    x->next = R->vars;
    R->vars = x;
}

static jv eval(rstate *R, const node *e);

static jv strip_str(rstate *R, jv s, bool left, bool right)
{
    size_t a = 0, b = s.len;
    while (left && a < b && strchr(" \t\n\r\f\v", s.s[a])) a++;
    while (right && b > a && strchr(" \t\n\r\f\v", s.s[b - 1])) b--;
    (void)R;
    return (jv){.t = JV_STR, .s = s.s + a, .len = b - a};
}

static jv case_str(rstate *R, jv s, bool up)
{
    char *d = ja_alloc(&R->a, s.len + 1);
    if (!d) return (jv){.t = JV_UNDEF};
    for (size_t i = 0; i < s.len; i++) {
        char c = s.s[i];
        d[i] = up ? (c >= 'a' && c <= 'z' ? (char)(c - 32) : c)
                  : (c >= 'A' && c <= 'Z' ? (char)(c + 32) : c);
    }
    return (jv){.t = JV_STR, .s = d, .len = s.len};
}

static jv tojson(rstate *R, jv v)
{
    if (v.t != JV_STR) return to_str(R, v);
    char *d = ja_alloc(&R->a, 6 * v.len + 3);
    if (!d) return (jv){.t = JV_UNDEF};
    size_t n = 0;
    d[n++] = '"';
    for (size_t i = 0; i < v.len; i++) {
        unsigned char c = (unsigned char)v.s[i];
        if (c == '"' || c == '\\') { d[n++] = '\\'; d[n++] = (char)c; }
        else if (c == '\n') { d[n++] = '\\'; d[n++] = 'n'; }
        else if (c == '\t') { d[n++] = '\\'; d[n++] = 't'; }
        else if (c == '\r') { d[n++] = '\\'; d[n++] = 'r'; }
        else if (c < 0x20) n += (size_t)sprintf(d + n, "\\u%04x", c);
        else d[n++] = (char)c;
    }
    d[n++] = '"';
    return (jv){.t = JV_STR, .s = d, .len = n};
}

static jv filter(rstate *R, const node *e, jv v)
{
    const char *f = e->name;
    if (!strcmp(f, "default"))
        return v.t == JV_UNDEF ? (e->nargs ? eval(R, e->args[0]) : (jv){.t = JV_STR, .s = ""}) : v;
    if (!strcmp(f, "string")) return to_str(R, v);
    if (!strcmp(f, "tojson")) return tojson(R, v);
    if (!strcmp(f, "length") || !strcmp(f, "count")) {
        if (v.t == JV_STR) return (jv){.t = JV_NUM, .n = (double)v.len};
        if (v.t == JV_LIST) return (jv){.t = JV_NUM, .n = (double)v.l->n};
        if (v.t == JV_DICT) return (jv){.t = JV_NUM, .n = (double)v.d->n};
    } else if (!strcmp(f, "first") || !strcmp(f, "last")) {
        if (v.t == JV_LIST)
            return v.l->n ? v.l->v[f[0] == 'f' ? 0 : v.l->n - 1] : (jv){.t = JV_UNDEF};
        if (v.t == JV_STR && v.len)
            return (jv){.t = JV_STR, .s = v.s + (f[0] == 'f' ? 0 : v.len - 1), .len = 1};
    } else if (v.t == JV_STR) {
        if (!strcmp(f, "trim")) return strip_str(R, v, true, true);
        if (!strcmp(f, "upper")) return case_str(R, v, true);
        if (!strcmp(f, "lower")) return case_str(R, v, false);
    }
    rerr(R, e->pos, "filter '%s' cannot take a %s", f, type_name(v));
    return (jv){.t = JV_UNDEF};
}

static jv call(rstate *R, const node *e)
{
    const node *f = e->a;
    jv args[16];
    for (int i = 0; i < e->nargs; i++) args[i] = eval(R, e->args[i]);
    if (R->err) return (jv){.t = JV_UNDEF};
    if (f->kind == E_NAME && !strcmp(f->name, "raise_exception")) {
        jv m = e->nargs ? to_str(R, args[0]) : (jv){.t = JV_STR, .s = "", .len = 0};
        int line, col;
        ja_line_col(R->t->src, e->pos, &line, &col);
        R->err = kiln_fail(R->ctx, KILN_ERR_INVALID_ARG,
                           "chat template raised an error: %.*s (raise_exception at line %d "
                           "col %d)", (int)KILN_MIN(m.len, (size_t)400), m.s, line, col);
        return (jv){.t = JV_UNDEF};
    }
    if (f->kind == E_NAME && !strcmp(f->name, "namespace")) {
        jdict *d = ja_alloc(&R->a, sizeof *d);
        if (!d) return (jv){.t = JV_UNDEF};
        for (int i = 0; i < e->nargs; i++) {
            if (!e->argn[i]) {
                rerr(R, e->pos, "namespace() takes name=value arguments");
                return (jv){.t = JV_UNDEF};
            }
            dict_set(R, d, e->argn[i], args[i]);
        }
        return (jv){.t = JV_DICT, .d = d};
    }
    if (f->kind == E_ATTR) {
        jv self = eval(R, f->a);
        const char *m = f->name;
        if (R->err) return (jv){.t = JV_UNDEF};
        if (self.t == JV_STR) {
            if (!strcmp(m, "strip")) return strip_str(R, self, true, true);
            if (!strcmp(m, "lstrip")) return strip_str(R, self, true, false);
            if (!strcmp(m, "rstrip")) return strip_str(R, self, false, true);
            if (!strcmp(m, "upper")) return case_str(R, self, true);
            if (!strcmp(m, "lower")) return case_str(R, self, false);
            if ((!strcmp(m, "startswith") || !strcmp(m, "endswith")) && e->nargs == 1 &&
                args[0].t == JV_STR) {
                jv x = args[0];
                bool ok = x.len <= self.len &&
                          !memcmp(m[0] == 's' ? self.s : self.s + self.len - x.len, x.s, x.len);
                return (jv){.t = JV_BOOL, .b = ok};
            }
        }
        rerr(R, e->pos, "unknown method '%s' of a %s", m, type_name(self));
        return (jv){.t = JV_UNDEF};
    }
    rerr(R, e->pos, "unknown function '%s'", f->kind == E_NAME ? f->name : "(expression)");
    return (jv){.t = JV_UNDEF};
}

static jv index_of(rstate *R, const node *e, jv v, jv k)
{
    if (v.t == JV_DICT && k.t == JV_STR) return dict_get(v, k.s, k.len);
    if ((v.t == JV_LIST || v.t == JV_STR) && k.t == JV_NUM) {
        long long n = v.t == JV_LIST ? (long long)v.l->n : (long long)v.len;
        long long i = (long long)k.n;
        if (i < 0) i += n;
        if (i < 0 || i >= n) return (jv){.t = JV_UNDEF};
        return v.t == JV_LIST ? v.l->v[i] : (jv){.t = JV_STR, .s = v.s + i, .len = 1};
    }
    if (v.t == JV_UNDEF) return v;
    rerr(R, e->pos, "cannot index a %s with a %s", type_name(v), type_name(k));
    return (jv){.t = JV_UNDEF};
}

static jv slice(rstate *R, const node *e, jv v)
{
    jv a = e->b ? eval(R, e->b) : (jv){.t = JV_NONE};
    jv b = e->c ? eval(R, e->c) : (jv){.t = JV_NONE};
    if (R->err) return (jv){.t = JV_UNDEF};
    if (v.t != JV_LIST && v.t != JV_STR) {
        rerr(R, e->pos, "cannot slice a %s", type_name(v));
        return (jv){.t = JV_UNDEF};
    }
    long long n = v.t == JV_LIST ? (long long)v.l->n : (long long)v.len;
    long long i = a.t == JV_NUM ? (long long)a.n : 0, j = b.t == JV_NUM ? (long long)b.n : n;
    if (i < 0) i += n;
    if (j < 0) j += n;
    i = i < 0 ? 0 : i > n ? n : i;
    j = j < i ? i : j > n ? n : j;
    if (v.t == JV_STR) return (jv){.t = JV_STR, .s = v.s + i, .len = (size_t)(j - i)};
    jlist *l = ja_alloc(&R->a, sizeof *l);
    if (!l) return (jv){.t = JV_UNDEF};
    l->n = (size_t)(j - i);
    l->v = v.l->v + i;
    return (jv){.t = JV_LIST, .l = l};
}

static int cmp_vals(rstate *R, const node *e, jv a, jv b)
{
    if (a.t == JV_NUM && b.t == JV_NUM) return (a.n > b.n) - (a.n < b.n);
    if (a.t == JV_STR && b.t == JV_STR) {
        int c = memcmp(a.s, b.s, KILN_MIN(a.len, b.len));
        return c ? c : (a.len > b.len) - (a.len < b.len);
    }
    rerr(R, e->pos, "cannot compare a %s with a %s", type_name(a), type_name(b));
    return 0;
}

static jv binop(rstate *R, const node *e)
{
    jv a = eval(R, e->a), b = eval(R, e->b);
    if (R->err) return (jv){.t = JV_UNDEF};
    switch (e->op) {
    case OP_EQ: return (jv){.t = JV_BOOL, .b = jv_eq(a, b)};
    case OP_NE: return (jv){.t = JV_BOOL, .b = !jv_eq(a, b)};
    case '<': return (jv){.t = JV_BOOL, .b = cmp_vals(R, e, a, b) < 0};
    case '>': return (jv){.t = JV_BOOL, .b = cmp_vals(R, e, a, b) > 0};
    case OP_LE: return (jv){.t = JV_BOOL, .b = cmp_vals(R, e, a, b) <= 0};
    case OP_GE: return (jv){.t = JV_BOOL, .b = cmp_vals(R, e, a, b) >= 0};
    case OP_IN: {
        bool found = false;
        if (b.t == JV_STR && a.t == JV_STR)
            found = a.len == 0 || (a.len <= b.len && memmem(b.s, b.len, a.s, a.len) != NULL);
        else if (b.t == JV_LIST)
            for (size_t i = 0; i < b.l->n && !found; i++) found = jv_eq(a, b.l->v[i]);
        else if (b.t == JV_DICT && a.t == JV_STR)
            found = dict_get(b, a.s, a.len).t != JV_UNDEF;
        else if (b.t != JV_UNDEF) {
            rerr(R, e->pos, "'in' cannot look inside a %s", type_name(b));
            return (jv){.t = JV_UNDEF};
        }
        return (jv){.t = JV_BOOL, .b = found != e->neg};
    }
    case '~': {
        jv x = to_str(R, a), y = to_str(R, b);
        char *d = ja_alloc(&R->a, x.len + y.len + 1);
        if (!d) return (jv){.t = JV_UNDEF};
        memcpy(d, x.s, x.len);
        memcpy(d + x.len, y.s, y.len);
        return (jv){.t = JV_STR, .s = d, .len = x.len + y.len};
    }
    case '+':
        if (a.t == JV_STR && b.t == JV_STR) {
            char *d = ja_alloc(&R->a, a.len + b.len + 1);
            if (!d) return (jv){.t = JV_UNDEF};
            memcpy(d, a.s, a.len);
            memcpy(d + a.len, b.s, b.len);
            return (jv){.t = JV_STR, .s = d, .len = a.len + b.len};
        }
        if (a.t == JV_LIST && b.t == JV_LIST) {
            jlist *l = ja_alloc(&R->a, sizeof *l);
            if (!l || !(l->v = ja_alloc(&R->a, (a.l->n + b.l->n + 1) * sizeof *l->v)))
                return (jv){.t = JV_UNDEF};
            memcpy(l->v, a.l->v, a.l->n * sizeof *l->v);
            memcpy(l->v + a.l->n, b.l->v, b.l->n * sizeof *l->v);
            l->n = a.l->n + b.l->n;
            return (jv){.t = JV_LIST, .l = l};
        }
        __attribute__((fallthrough)); /* numbers */
    default:
        if (a.t != JV_NUM || b.t != JV_NUM) {
            const char *ops = e->op == '+' ? "+" : e->op == '-' ? "-" : e->op == '*' ? "*" :
                              e->op == '/' ? "/" : e->op == '%' ? "%" : "//";
            rerr(R, e->pos, "'%s' cannot combine a %s and a %s", ops, type_name(a), type_name(b));
            return (jv){.t = JV_UNDEF};
        }
        double r = 0;
        switch (e->op) {
        case '+': r = a.n + b.n; break;
        case '-': r = a.n - b.n; break;
        case '*': r = a.n * b.n; break;
        case '/': r = a.n / b.n; break;
        case OP_FLOORDIV: r = floor(a.n / b.n); break;
        case '%': r = b.n != 0 ? a.n - b.n * floor(a.n / b.n) : NAN; break;
        }
        if (!isfinite(r)) {
            rerr(R, e->pos, "division by zero");
            return (jv){.t = JV_UNDEF};
        }
        return (jv){.t = JV_NUM, .n = r};
    }
}

static bool test_is(const char *t, jv v)
{
    if (!strcmp(t, "defined")) return v.t != JV_UNDEF;
    if (!strcmp(t, "undefined")) return v.t == JV_UNDEF;
    if (!strcmp(t, "none")) return v.t == JV_NONE;
    if (!strcmp(t, "string")) return v.t == JV_STR;
    if (!strcmp(t, "number")) return v.t == JV_NUM;
    if (!strcmp(t, "mapping")) return v.t == JV_DICT;
    if (!strcmp(t, "true")) return v.t == JV_BOOL && v.b;
    if (!strcmp(t, "false")) return v.t == JV_BOOL && !v.b;
    /* iterable, sequence */
    return v.t == JV_LIST || v.t == JV_STR || (t[0] == 'i' && v.t == JV_DICT);
}

static jv eval(rstate *R, const node *e)
{
    if (R->err) return (jv){.t = JV_UNDEF};
    switch (e->kind) {
    case E_LIT: return e->lit;
    case E_NAME: return lookup(R, e->name);
    case E_ATTR: {
        jv v = eval(R, e->a);
        if (v.t == JV_DICT) return dict_get(v, e->name, strlen(e->name));
        if (v.t == JV_UNDEF || v.t == JV_NONE) {
            if (v.t == JV_NONE) rerr(R, e->pos, "none has no attribute '%s'", e->name);
            return (jv){.t = JV_UNDEF};
        }
        return (jv){.t = JV_UNDEF};
    }
    case E_INDEX: {
        jv v = eval(R, e->a), k = eval(R, e->b);
        return R->err ? v : index_of(R, e, v, k);
    }
    case E_SLICE: return slice(R, e, eval(R, e->a));
    case E_CALL: return call(R, e);
    case E_FILTER: return filter(R, e, eval(R, e->a));
    case E_TEST: {
        jv v = eval(R, e->a);
        return (jv){.t = JV_BOOL, .b = test_is(e->name, v) != e->neg};
    }
    case E_BIN: return binop(R, e);
    case E_AND: {
        jv a = eval(R, e->a);
        return truthy(a) ? eval(R, e->b) : a;
    }
    case E_OR: {
        jv a = eval(R, e->a);
        return truthy(a) ? a : eval(R, e->b);
    }
    case E_NOT: return (jv){.t = JV_BOOL, .b = !truthy(eval(R, e->a))};
    case E_NEG: {
        jv v = eval(R, e->a);
        if (v.t != JV_NUM) {
            rerr(R, e->pos, "cannot negate a %s", type_name(v));
            return (jv){.t = JV_UNDEF};
        }
        return (jv){.t = JV_NUM, .n = -v.n};
    }
    case E_COND:
        if (truthy(eval(R, e->a))) return eval(R, e->b);
        return e->c ? eval(R, e->c) : (jv){.t = JV_STR, .s = "", .len = 0};
    case E_LIST: {
        jlist *l = ja_alloc(&R->a, sizeof *l);
        if (!l || !(l->v = ja_alloc(&R->a, (size_t)(e->nargs + 1) * sizeof *l->v)))
            return (jv){.t = JV_UNDEF};
        for (int i = 0; i < e->nargs; i++) l->v[i] = eval(R, e->args[i]);
        l->n = (size_t)e->nargs;
        return (jv){.t = JV_LIST, .l = l};
    }
    }
    return (jv){.t = JV_UNDEF};
}

static void exec(rstate *R, const node *n);

static void exec_for(rstate *R, const node *n)
{
    jv it = eval(R, n->a);
    if (R->err) return;
    if (it.t != JV_LIST && it.t != JV_UNDEF) {
        rerr(R, n->pos, "'{%% for %%}' needs a list, got a %s", type_name(it));
        return;
    }
    var *saved = R->vars;
    /* the items that pass the filter */
    size_t cnt = it.t == JV_LIST ? it.l->n : 0, m = 0;
    jv *items = ja_alloc(&R->a, (cnt + 1) * sizeof *items);
    if (!items) return;
    for (size_t i = 0; i < cnt && !R->err; i++) {
        if (n->b) {
            bind(R, n->name, it.l->v[i]);
            bool keep = truthy(eval(R, n->b));
            R->vars = saved;
            if (!keep) continue;
        }
        items[m++] = it.l->v[i];
    }
    for (size_t i = 0; i < m && !R->err; i++) {
        jdict *ld = ja_alloc(&R->a, sizeof *ld);
        if (!ld) return;
        dict_set(R, ld, "index0", (jv){.t = JV_NUM, .n = (double)i});
        dict_set(R, ld, "index", (jv){.t = JV_NUM, .n = (double)i + 1});
        dict_set(R, ld, "first", (jv){.t = JV_BOOL, .b = i == 0});
        dict_set(R, ld, "last", (jv){.t = JV_BOOL, .b = i + 1 == m});
        dict_set(R, ld, "length", (jv){.t = JV_NUM, .n = (double)m});
        dict_set(R, ld, "revindex0", (jv){.t = JV_NUM, .n = (double)(m - i - 1)});
        dict_set(R, ld, "revindex", (jv){.t = JV_NUM, .n = (double)(m - i)});
        bind(R, "loop", (jv){.t = JV_DICT, .d = ld});
        bind(R, n->name, items[i]);
        exec(R, n->body);
        /* {% set %} inside a loop does not leak out (Jinja scoping);
         * namespace attributes do (they are shared dicts) */
        R->vars = saved;
    }
    if (m == 0 && n->els) exec(R, n->els);
}

static void exec(rstate *R, const node *n)
{
    for (; n && !R->err; n = n->next) {
        switch (n->kind) {
        case N_TEXT: emit(R, n->lit.s, n->lit.len); break;
        case N_OUT: {
            jv v = to_str(R, eval(R, n->a));
            if (!R->err) emit(R, v.s, v.len);
            break;
        }
        case N_IF: {
            bool c = truthy(eval(R, n->a));
            if (R->err) return;
            exec(R, c ? n->body : n->els);
            break;
        }
        case N_FOR: exec_for(R, n); break;
        case N_SET: {
            jv v = eval(R, n->a);
            if (R->err) return;
            if (n->attr) {
                jv ns = lookup(R, n->name);
                if (ns.t != JV_DICT) {
                    rerr(R, n->pos, "'{%% set %s.%s %%}': '%s' is not a namespace", n->name,
                         n->attr, n->name);
                    return;
                }
                dict_set(R, ns.d, n->attr, v);
            } else {
                bind(R, n->name, v);
            }
            break;
        }
        }
    }
}

kiln_status jinja_render(kiln_ctx *ctx, const jinja_tmpl *t, const kiln_chat_msg *msgs, int n,
                         bool add_generation_prompt, const char *bos, const char *eos,
                         char **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    rstate R = {.ctx = ctx, .t = t};
    jlist *l = ja_alloc(&R.a, sizeof *l);
    if (l) l->v = ja_alloc(&R.a, (size_t)(n + 1) * sizeof *l->v);
    for (int i = 0; l && l->v && i < n; i++) {
        jdict *d = ja_alloc(&R.a, sizeof *d);
        if (!d) break;
        const char *c = msgs[i].content ? msgs[i].content : "";
        size_t cl = msgs[i].content_len ? msgs[i].content_len : strlen(c);
        const char *r = msgs[i].role ? msgs[i].role : "";
        dict_set(&R, d, "role", (jv){.t = JV_STR, .s = r, .len = strlen(r)});
        dict_set(&R, d, "content", (jv){.t = JV_STR, .s = c, .len = cl});
        l->v[i] = (jv){.t = JV_DICT, .d = d};
        l->n = (size_t)i + 1;
    }
    if (R.a.oom || !l || !l->v) {
        ja_free(&R.a);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory rendering a chat template");
    }
    bind(&R, "messages", (jv){.t = JV_LIST, .l = l});
    bind(&R, "add_generation_prompt", (jv){.t = JV_BOOL, .b = add_generation_prompt});
    bind(&R, "bos_token", (jv){.t = JV_STR, .s = bos ? bos : "", .len = bos ? strlen(bos) : 0});
    bind(&R, "eos_token", (jv){.t = JV_STR, .s = eos ? eos : "", .len = eos ? strlen(eos) : 0});
    exec(&R, t->root);
    if (!R.err && R.a.oom) R.err = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory rendering a chat template");
    if (!R.err && !R.out) emit(&R, "", 0);
    ja_free(&R.a);
    if (R.err) {
        free(R.out);
        return R.err;
    }
    *out = R.out;
    *len = R.len;
    return KILN_OK;
}
