/*
 * jinja.c — a small Jinja2 interpreter for chat templates: the subset that
 * real Hugging Face templates (ChatML/Qwen, Llama 2/3, Mistral, Zephyr,
 * Gemma, Phi) use, with transformers' environment settings (trim_blocks
 * and lstrip_blocks on).
 *
 * Supported:
 *   {{ expr }}  {% if %}/{% elif %}/{% else %}/{% endif %}
 *   {% for x in expr [if cond] %} ... [{% else %}] {% endfor %} with
 *   loop.index, loop.index0, loop.first, loop.last, loop.length
 *   {% set name = expr %}, {% set ns.attr = expr %} (namespace(...))
 *   {# comments #}, whitespace control {%- -%} {{- -}} {#- -#}
 *   literals: 'str' "str" (\n \t \\ \' \" escapes), numbers, true/false/
 *   none (any case), [lists]
 *   operators: + - * / % ~ == != < > <= >= in, not in, and, or, not,
 *   a if c else b, x is [not] defined|undefined|none|string|number|
 *   mapping|iterable|sequence|true|false
 *   access: m.role, m['role'], xs[i] (negative i), xs[a:b] slices
 *   filters: trim, length, upper, lower, string, first, last,
 *   default(v), tojson (strings and numbers)
 *   calls: raise_exception(msg), namespace(k=v, ...), and the string
 *   methods strip(), lstrip(), rstrip(), upper(), lower(),
 *   startswith(s), endswith(s)
 * Anything else (macros, other filters, call blocks) is a parse error
 * naming it with its line and column.
 *
 * This file parses (segments with whitespace control, expressions,
 * statements; jinja_int.h holds the tree); jinja_render.c renders. Values
 * live in an arena freed after each render; the parsed template in
 * another, freed by jinja_free. A little over 800 lines: the segmenter,
 * the expression grammar (one function per precedence level, as the
 * Jinja2 grammar reads) and the statements share the parser state, and
 * split in two they would each need it in a header.
 */
#include "tokenizer/jinja_int.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

void *ja_alloc(jarena *a, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    if (!a->head || a->head->used + n > a->head->cap) {
        size_t cap = n > 16384 ? n : 16384;
        achunk *c = malloc(sizeof *c + cap);
        if (!c) {
            a->oom = true;
            return NULL;
        }
        c->next = a->head;
        c->used = 0;
        c->cap = cap;
        a->head = c;
    }
    void *p = a->head->data + a->head->used;
    a->head->used += n;
    memset(p, 0, n);
    return p;
}

void ja_free(jarena *a)
{
    for (achunk *c = a->head, *n; c; c = n) {
        n = c->next;
        free(c);
    }
    a->head = NULL;
}


kiln_status ja_vfail(kiln_ctx *ctx, kiln_status *err, const char *src, size_t pos,
                     const char *fmt, va_list ap)
{
    if (*err) return *err;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    int line, col;
    ja_line_col(src, pos, &line, &col);
    *err = kiln_fail(ctx, KILN_ERR_FORMAT, "chat template line %d col %d: %s", line, col, msg);
    return *err;
}

void ja_line_col(const char *s, size_t pos, int *line, int *col)
{
    *line = 1;
    *col = 1;
    for (size_t i = 0; i < pos && s[i]; i++) {
        if (s[i] == '\n') {
            (*line)++;
            *col = 1;
        } else {
            (*col)++;
        }
    }
}


char *ja_strdup(jarena *a, const char *s, size_t n)
{
    char *d = ja_alloc(a, n + 1);
    if (d) memcpy(d, s, n);
    return d;
}

typedef struct parser {
    kiln_ctx *ctx;
    jinja_tmpl *t;
    const char *s; /* the whole source */
    /* segments */
    struct seg {
        int kind; /* 0 text, 1 expr {{ }}, 2 stmt {% %} */
        size_t a, b; /* content [a, b) */
        size_t pos;  /* where the tag starts */
    } *seg;
    int nseg, iseg;
    /* expression tokens within the current tag */
    size_t p, end;
    kiln_status err;
} parser;

static kiln_status perr(parser *P, size_t pos, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static kiln_status perr(parser *P, size_t pos, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kiln_status s = ja_vfail(P->ctx, &P->err, P->s, pos, fmt, ap);
    va_end(ap);
    return s;
}

static node *nnew(parser *P, int kind, size_t pos)
{
    node *n = ja_alloc(&P->t->a, sizeof *n);
    if (!n) {
        if (!P->err) P->err = kiln_fail(P->ctx, KILN_ERR_NOMEM, "out of memory parsing a chat template");
        return NULL;
    }
    n->kind = kind;
    n->pos = pos;
    return n;
}


/* Cuts the source into text and tags, applying whitespace control,
 * trim_blocks and lstrip_blocks. Text segments keep [a, b) into src. */
static kiln_status segment(parser *P)
{
    const char *s = P->s;
    size_t n = P->t->len, i = 0, text_a = 0;
    int cap = 64;
    P->seg = malloc((size_t)cap * sizeof *P->seg);
    if (!P->seg) return kiln_fail(P->ctx, KILN_ERR_NOMEM, "out of memory");
    bool trim_next_ws = false, trim_next_nl = false;
    while (i <= n) {
        bool tag = i + 1 < n && s[i] == '{' && (s[i + 1] == '{' || s[i + 1] == '%' || s[i + 1] == '#');
        if (!tag && i < n) {
            i++;
            continue;
        }
        /* the text [text_a, i) */
        size_t ta = text_a, tb = i;
        if (trim_next_ws)
            while (ta < tb && (s[ta] == ' ' || s[ta] == '\t' || s[ta] == '\n' || s[ta] == '\r')) ta++;
        else if (trim_next_nl && ta < tb && s[ta] == '\n')
            ta++;
        else if (trim_next_nl && ta + 1 < tb && s[ta] == '\r' && s[ta + 1] == '\n')
            ta += 2;
        if (tag) {
            char open = s[i + 1];
            bool minus = i + 2 < n && s[i + 2] == '-';
            if (minus) {
                while (tb > ta && (s[tb - 1] == ' ' || s[tb - 1] == '\t' || s[tb - 1] == '\n' ||
                                   s[tb - 1] == '\r'))
                    tb--;
            } else if (open != '{') { /* lstrip_blocks */
                size_t k = tb;
                while (k > ta && (s[k - 1] == ' ' || s[k - 1] == '\t')) k--;
                if (k == 0 || s[k - 1] == '\n') tb = k;
            }
        }
        if (tb > ta) {
            if (P->nseg + 2 > cap) {
                cap *= 2;
                void *ns = realloc(P->seg, (size_t)cap * sizeof *P->seg);
                if (!ns) return kiln_fail(P->ctx, KILN_ERR_NOMEM, "out of memory");
                P->seg = ns;
            }
            P->seg[P->nseg++] = (struct seg){0, ta, tb, ta};
        }
        if (!tag) break;
        char open = s[i + 1];
        char close = open == '{' ? '}' : open;
        size_t a = i + 2 + (i + 2 < n && (s[i + 2] == '-' || s[i + 2] == '+'));
        /* find the close, skipping string literals */
        size_t j = a;
        char q = 0;
        while (j + 1 < n) {
            if (q) {
                if (s[j] == '\\') j++;
                else if (s[j] == q) q = 0;
            } else if (open != '#' && (s[j] == '\'' || s[j] == '"')) {
                q = s[j];
            } else if (s[j] == close && s[j + 1] == '}') {
                break;
            }
            j++;
        }
        if (j + 1 >= n)
            return perr(P, i, "unclosed '{%c' (no '%c}' before the end of the template)", open, close);
        size_t b = j;
        bool rminus = b > a && s[b - 1] == '-';
        if (rminus) b--;
        if (open != '#') {
            if (P->nseg + 2 > cap) {
                cap *= 2;
                void *ns = realloc(P->seg, (size_t)cap * sizeof *P->seg);
                if (!ns) return kiln_fail(P->ctx, KILN_ERR_NOMEM, "out of memory");
                P->seg = ns;
            }
            P->seg[P->nseg++] = (struct seg){open == '{' ? 1 : 2, a, b, i};
        }
        trim_next_ws = rminus;
        trim_next_nl = !rminus && open != '{';
        i = j + 2;
        text_a = i;
    }
    return KILN_OK;
}

/* ---- expression tokens ---------------------------------------------- */

static void skip_ws(parser *P)
{
    while (P->p < P->end && (P->s[P->p] == ' ' || P->s[P->p] == '\t' || P->s[P->p] == '\n' ||
                             P->s[P->p] == '\r'))
        P->p++;
}

static bool is_id(char c, bool first)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
           (!first && c >= '0' && c <= '9');
}

/* The next word (identifier) without consuming it; its length or 0. */
static size_t peek_word(parser *P, const char **w)
{
    skip_ws(P);
    size_t k = P->p;
    if (k < P->end && is_id(P->s[k], true))
        while (k < P->end && is_id(P->s[k], false)) k++;
    *w = P->s + P->p;
    return k - P->p;
}

static bool word_is(parser *P, const char *kw)
{
    const char *w;
    size_t n = peek_word(P, &w);
    return n == strlen(kw) && !memcmp(w, kw, n);
}

static bool accept_word(parser *P, const char *kw)
{
    if (!word_is(P, kw)) return false;
    P->p += strlen(kw);
    return true;
}

static bool accept(parser *P, const char *op)
{
    skip_ws(P);
    size_t n = strlen(op);
    if (P->p + n > P->end || memcmp(P->s + P->p, op, n)) return false;
    /* "=" is not the start of "==", "<" not of "<=" */
    if (n == 1 && P->p + 1 < P->end && P->s[P->p + 1] == '=' && strchr("=<>!", op[0])) return false;
    if (n == 1 && op[0] == '/' && P->p + 1 < P->end && P->s[P->p + 1] == '/') return false;
    P->p += n;
    return true;
}

static const char *expect_name(parser *P)
{
    const char *w;
    size_t n = peek_word(P, &w);
    if (!n) {
        perr(P, P->p, "expected a name");
        return NULL;
    }
    P->p += n;
    return ja_strdup(&P->t->a, w, n);
}

static node *parse_expr(parser *P);

static node *parse_primary(parser *P)
{
    skip_ws(P);
    size_t pos = P->p;
    if (P->p >= P->end) {
        perr(P, pos, "expected an expression");
        return NULL;
    }
    char c = P->s[P->p];
    if (c == '\'' || c == '"') {
        size_t cap = 16, n = 0;
        char *buf = malloc(cap);
        P->p++;
        while (buf && P->p < P->end && P->s[P->p] != c) {
            char ch = P->s[P->p++];
            if (ch == '\\' && P->p < P->end) {
                char e = P->s[P->p++];
                ch = e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
            }
            if (n + 1 >= cap) {
                char *nb = realloc(buf, cap *= 2);
                if (!nb) free(buf);
                buf = nb;
            }
            if (buf) buf[n++] = ch;
        }
        if (!buf) {
            P->err = kiln_fail(P->ctx, KILN_ERR_NOMEM, "out of memory");
            return NULL;
        }
        if (P->p >= P->end) {
            free(buf);
            perr(P, pos, "unterminated string literal");
            return NULL;
        }
        P->p++;
        node *e = nnew(P, E_LIT, pos);
        if (e) e->lit = (jv){.t = JV_STR, .s = ja_strdup(&P->t->a, buf, n), .len = n};
        free(buf);
        return e;
    }
    if (c >= '0' && c <= '9') {
        char *endp;
        double v = strtod(P->s + P->p, &endp);
        P->p = (size_t)(endp - P->s);
        node *e = nnew(P, E_LIT, pos);
        if (e) e->lit = (jv){.t = JV_NUM, .n = v};
        return e;
    }
    if (accept(P, "(")) {
        node *e = parse_expr(P);
        if (e && !accept(P, ")")) perr(P, P->p, "expected ')'");
        return e;
    }
    if (accept(P, "[")) {
        node *e = nnew(P, E_LIST, pos);
        node *items[256];
        int k = 0;
        if (!accept(P, "]")) {
            do {
                if (k == 256) {
                    perr(P, P->p, "list literal longer than 256 items");
                    return NULL;
                }
                if (!(items[k++] = parse_expr(P))) return NULL;
            } while (accept(P, ","));
            if (!accept(P, "]")) {
                perr(P, P->p, "expected ']'");
                return NULL;
            }
        }
        if (!e) return NULL;
        e->args = ja_alloc(&P->t->a, (size_t)(k + 1) * sizeof *e->args);
        if (e->args) memcpy(e->args, items, (size_t)k * sizeof *items);
        e->nargs = k;
        return e;
    }
    const char *w;
    size_t n = peek_word(P, &w);
    if (!n) {
        perr(P, pos, "unexpected '%c'", c);
        return NULL;
    }
    P->p += n;
    node *e = nnew(P, E_LIT, pos);
    if (!e) return NULL;
#define KW(k) (n == strlen(k) && !memcmp(w, k, n))
    if (KW("true") || KW("True")) e->lit = (jv){.t = JV_BOOL, .b = true};
    else if (KW("false") || KW("False")) e->lit = (jv){.t = JV_BOOL, .b = false};
    else if (KW("none") || KW("None")) e->lit = (jv){.t = JV_NONE};
    else {
        e->kind = E_NAME;
        e->name = ja_strdup(&P->t->a, w, n);
    }
#undef KW
    return e;
}

/* Call arguments after '(' up to ')': positional or name=value. */
static bool parse_args(parser *P, node *call)
{
    node *items[16];
    const char *names[16];
    int k = 0;
    if (!accept(P, ")")) {
        do {
            if (k == 16) {
                perr(P, P->p, "more than 16 arguments");
                return false;
            }
            names[k] = NULL;
            size_t save = P->p;
            const char *w;
            size_t n = peek_word(P, &w);
            if (n) {
                P->p += n;
                if (accept(P, "=")) names[k] = ja_strdup(&P->t->a, w, n);
                else P->p = save;
            }
            if (!(items[k++] = parse_expr(P))) return false;
        } while (accept(P, ","));
        if (!accept(P, ")")) {
            perr(P, P->p, "expected ')'");
            return false;
        }
    }
    call->args = ja_alloc(&P->t->a, (size_t)(k + 1) * sizeof *call->args);
    call->argn = ja_alloc(&P->t->a, (size_t)(k + 1) * sizeof *call->argn);
    if (!call->args || !call->argn) return false;
    memcpy(call->args, items, (size_t)k * sizeof *items);
    memcpy(call->argn, names, (size_t)k * sizeof *names);
    call->nargs = k;
    return true;
}

static const char *const FILTERS[] = {"trim", "length", "upper", "lower", "string", "first",
                                      "last", "default", "tojson", "count", NULL};
static const char *const TESTS[] = {"defined", "undefined", "none", "string", "number",
                                    "mapping", "iterable", "sequence", "true", "false", NULL};

static bool in_list(const char *const *l, const char *w)
{
    for (; *l; l++)
        if (!strcmp(*l, w)) return true;
    return false;
}

static node *parse_postfix(parser *P)
{
    node *e = parse_primary(P);
    while (e && !P->err) {
        size_t pos = P->p;
        if (accept(P, ".")) {
            node *x = nnew(P, E_ATTR, pos);
            if (!x) return NULL;
            x->a = e;
            x->name = expect_name(P);
            e = x;
        } else if (accept(P, "[")) {
            node *x = nnew(P, E_INDEX, pos);
            if (!x) return NULL;
            x->a = e;
            if (!accept(P, ":")) {
                x->b = parse_expr(P);
                if (accept(P, ":")) x->kind = E_SLICE;
            } else {
                x->kind = E_SLICE;
            }
            if (x->kind == E_SLICE) {
                skip_ws(P);
                if (P->p < P->end && P->s[P->p] != ']') x->c = parse_expr(P);
            }
            if (!accept(P, "]")) {
                perr(P, P->p, "expected ']'");
                return NULL;
            }
            e = x;
        } else if (accept(P, "(")) {
            node *x = nnew(P, E_CALL, pos);
            if (!x) return NULL;
            x->a = e;
            if (!parse_args(P, x)) return NULL;
            e = x;
        } else {
            break;
        }
    }
    return e;
}

static node *parse_filtered(parser *P)
{
    node *e = parse_postfix(P);
    while (e && !P->err) {
        size_t pos = P->p;
        if (accept(P, "|")) {
            skip_ws(P);
            size_t fpos = P->p;
            node *x = nnew(P, E_FILTER, pos);
            if (!x) return NULL;
            x->a = e;
            if (!(x->name = expect_name(P))) return NULL;
            if (!in_list(FILTERS, x->name)) {
                perr(P, fpos, "unknown filter '%s' (kiln's chat templates know trim, length, "
                              "upper, lower, string, first, last, default, tojson)", x->name);
                return NULL;
            }
            if (accept(P, "(") && !parse_args(P, x)) return NULL;
            e = x;
        } else if (word_is(P, "is")) {
            accept_word(P, "is");
            node *x = nnew(P, E_TEST, pos);
            if (!x) return NULL;
            x->a = e;
            x->neg = accept_word(P, "not");
            skip_ws(P);
            size_t tpos = P->p;
            if (!(x->name = expect_name(P))) return NULL;
            if (!in_list(TESTS, x->name)) {
                perr(P, tpos, "unknown test 'is %s'", x->name);
                return NULL;
            }
            e = x;
        } else {
            break;
        }
    }
    return e;
}

static node *parse_unary(parser *P)
{
    size_t pos = P->p;
    if (accept(P, "-")) {
        node *x = nnew(P, E_NEG, pos);
        if (x) x->a = parse_unary(P);
        return x;
    }
    return parse_filtered(P);
}

static node *bin(parser *P, int op, size_t pos, node *a, node *b)
{
    node *x = nnew(P, E_BIN, pos);
    if (x) {
        x->op = op;
        x->a = a;
        x->b = b;
    }
    return (a && b) ? x : NULL;
}

static node *parse_mul(parser *P)
{
    node *e = parse_unary(P);
    for (;;) {
        size_t pos = P->p;
        if (accept(P, "*")) e = bin(P, '*', pos, e, parse_unary(P));
        else if (accept(P, "//")) e = bin(P, OP_FLOORDIV, pos, e, parse_unary(P));
        else if (accept(P, "/")) e = bin(P, '/', pos, e, parse_unary(P));
        else if (accept(P, "%")) e = bin(P, '%', pos, e, parse_unary(P));
        else return e;
    }
}

static node *parse_concat(parser *P)
{
    node *e = parse_mul(P);
    size_t pos = P->p;
    while (accept(P, "~")) {
        e = bin(P, '~', pos, e, parse_mul(P));
        pos = P->p;
    }
    return e;
}

static node *parse_add(parser *P)
{
    node *e = parse_concat(P);
    for (;;) {
        size_t pos = P->p;
        if (accept(P, "+")) e = bin(P, '+', pos, e, parse_concat(P));
        else if (accept(P, "-")) e = bin(P, '-', pos, e, parse_concat(P));
        else return e;
    }
}

static node *parse_cmp(parser *P)
{
    node *e = parse_add(P);
    for (;;) {
        size_t pos = P->p;
        int op = 0;
        bool neg = false;
        if (accept(P, "==")) op = OP_EQ;
        else if (accept(P, "!=")) op = OP_NE;
        else if (accept(P, "<=")) op = OP_LE;
        else if (accept(P, ">=")) op = OP_GE;
        else if (accept(P, "<")) op = '<';
        else if (accept(P, ">")) op = '>';
        else if (accept_word(P, "in")) op = OP_IN;
        else if (word_is(P, "not")) {
            size_t save = P->p;
            accept_word(P, "not");
            if (accept_word(P, "in")) {
                op = OP_IN;
                neg = true;
            } else {
                P->p = save;
            }
        }
        if (!op) return e;
        e = bin(P, op, pos, e, parse_add(P));
        if (e) e->neg = neg;
    }
}

static node *parse_not(parser *P)
{
    size_t pos = P->p;
    if (accept_word(P, "not")) {
        node *x = nnew(P, E_NOT, pos);
        if (x) x->a = parse_not(P);
        return x && x->a ? x : NULL;
    }
    return parse_cmp(P);
}

/* left-associative `sub (word sub)*` as nodes of kind (and, or) */
static node *parse_logic(parser *P, const char *word, int kind, node *(*sub)(parser *))
{
    node *e = sub(P);
    size_t pos = P->p;
    while (e && accept_word(P, word)) {
        node *x = nnew(P, kind, pos);
        if (!x) return NULL;
        x->a = e;
        x->b = sub(P);
        e = x->b ? x : NULL;
        pos = P->p;
    }
    return e;
}

static node *parse_and(parser *P) { return parse_logic(P, "and", E_AND, parse_not); }
static node *parse_or(parser *P) { return parse_logic(P, "or", E_OR, parse_and); }

static node *parse_expr(parser *P)
{
    node *e = parse_or(P);
    size_t pos = P->p;
    if (e && accept_word(P, "if")) {
        node *x = nnew(P, E_COND, pos);
        if (!x) return NULL;
        x->b = e;              /* value when true */
        x->a = parse_or(P);    /* condition */
        if (accept_word(P, "else")) x->c = parse_or(P);
        return x->a ? x : NULL;
    }
    return e;
}

/* ---- statements -------------------------------------------------------- */

/* Parses statements until a {% word %} in stops (or the end when stops is
 * NULL); *stop gets the word found (its segment is consumed, P->p is
 * after the word). */
static node *parse_block(parser *P, const char *const *stops, const char **stop);

static bool end_of_tag(parser *P)
{
    skip_ws(P);
    if (P->p != P->end) {
        perr(P, P->p, "unexpected '%.*s' in a tag", (int)KILN_MIN(P->end - P->p, (size_t)20),
             P->s + P->p);
        return false;
    }
    return true;
}

static node *parse_stmt(parser *P, const char *w, size_t wn, size_t pos)
{
    static const char *const if_stops[] = {"elif", "else", "endif", NULL};
    static const char *const for_stops[] = {"else", "endfor", NULL};
    static const char *const endif[] = {"endif", NULL};
    static const char *const endfor[] = {"endfor", NULL};
    const char *stop = NULL;
    if ((wn == 2 && !memcmp(w, "if", 2)) || (wn == 4 && !memcmp(w, "elif", 4))) {
        node *n = nnew(P, N_IF, pos);
        if (!n || !(n->a = parse_expr(P)) || !end_of_tag(P)) return NULL;
        n->body = parse_block(P, if_stops, &stop);
        if (P->err) return NULL;
        if (!stop) {
            perr(P, pos, "'{%% if %%}' is never closed by '{%% endif %%}'");
            return NULL;
        }
        if (!strcmp(stop, "elif")) {
            n->els = parse_stmt(P, "elif", 4, P->p);
        } else if (!strcmp(stop, "else")) {
            if (!end_of_tag(P)) return NULL;
            n->els = parse_block(P, endif, &stop);
            if (!P->err && !stop) perr(P, pos, "'{%% if %%}' is never closed by '{%% endif %%}'");
        } else if (!end_of_tag(P)) {
            return NULL;
        }
        return P->err ? NULL : n;
    }
    if (wn == 3 && !memcmp(w, "for", 3)) {
        node *n = nnew(P, N_FOR, pos);
        if (!n || !(n->name = expect_name(P))) return NULL;
        if (accept(P, ",")) {
            perr(P, P->p, "'for a, b in ...' (unpacking) is not supported");
            return NULL;
        }
        if (!accept_word(P, "in")) {
            perr(P, P->p, "expected 'in' in '{%% for %%}'");
            return NULL;
        }
        if (!(n->a = parse_or(P))) return NULL;
        if (accept_word(P, "if") && !(n->b = parse_or(P))) return NULL;
        if (!end_of_tag(P)) return NULL;
        n->body = parse_block(P, for_stops, &stop);
        if (!P->err && stop && !strcmp(stop, "else")) {
            if (!end_of_tag(P)) return NULL;
            n->els = parse_block(P, endfor, &stop);
        }
        if (!P->err && !stop) perr(P, pos, "'{%% for %%}' is never closed by '{%% endfor %%}'");
        if (!P->err) end_of_tag(P);
        return P->err ? NULL : n;
    }
    if (wn == 3 && !memcmp(w, "set", 3)) {
        node *n = nnew(P, N_SET, pos);
        if (!n || !(n->name = expect_name(P))) return NULL;
        if (accept(P, ".") && !(n->attr = expect_name(P))) return NULL;
        if (!accept(P, "=")) {
            perr(P, P->p, "expected '=' in '{%% set %%}' (block sets are not supported)");
            return NULL;
        }
        if (!(n->a = parse_expr(P)) || !end_of_tag(P)) return NULL;
        return n;
    }
    perr(P, pos, "unknown tag '{%% %.*s %%}'", (int)wn, w);
    return NULL;
}

static node *parse_block(parser *P, const char *const *stops, const char **stop)
{
    node *head = NULL, **tail = &head;
    *stop = NULL;
    while (P->iseg < P->nseg && !P->err) {
        struct seg *g = &P->seg[P->iseg++];
        node *n = NULL;
        if (g->kind == 0) {
            n = nnew(P, N_TEXT, g->pos);
            if (n) n->lit = (jv){.t = JV_STR, .s = P->s + g->a, .len = g->b - g->a};
        } else {
            P->p = g->a;
            P->end = g->b;
            if (g->kind == 1) {
                n = nnew(P, N_OUT, g->pos);
                if (n && (n->a = parse_expr(P))) end_of_tag(P);
            } else {
                const char *w;
                size_t wn = peek_word(P, &w);
                size_t wpos = P->p;
                if (!wn) {
                    perr(P, g->pos, "expected a tag name after '{%%'");
                    return NULL;
                }
                for (const char *const *s = stops; s && *s; s++)
                    if (wn == strlen(*s) && !memcmp(w, *s, wn)) {
                        P->p += wn;
                        *stop = *s;
                        return head;
                    }
                static const char *const closers[] = {"endif", "endfor", "elif", "else", NULL};
                for (const char *const *s = closers; *s; s++)
                    if (wn == strlen(*s) && !memcmp(w, *s, wn)) {
                        perr(P, g->pos, "'{%% %s %%}' without an open block it closes", *s);
                        return NULL;
                    }
                P->p += wn;
                n = parse_stmt(P, w, wn, wpos);
            }
        }
        if (P->err || !n) return NULL;
        *tail = n;
        tail = &n->next;
    }
    return head;
}

kiln_status jinja_parse(kiln_ctx *ctx, const char *src, size_t len, jinja_tmpl **out)
{
    *out = NULL;
    jinja_tmpl *t = calloc(1, sizeof *t);
    if (!t) return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    t->len = len;
    t->src = malloc(len + 1);
    if (!t->src) {
        free(t);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    memcpy(t->src, src, len);
    t->src[len] = 0;
    parser P = {.ctx = ctx, .t = t, .s = t->src};
    kiln_status s = segment(&P);
    const char *stop;
    if (!s) {
        t->root = parse_block(&P, NULL, &stop);
        s = P.err;
    }
    free(P.seg);
    if (s) {
        jinja_free(t);
        return s;
    }
    *out = t;
    return KILN_OK;
}

void jinja_free(jinja_tmpl *t)
{
    if (!t) return;
    ja_free(&t->a);
    free(t->src);
    free(t);
}

