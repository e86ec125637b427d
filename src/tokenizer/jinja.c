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
 * Values live in an jarena freed after each render; the parsed template
 * in another, freed by jinja_free.
 */
#include "tokenizer/jinja.h"

#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

/* ---- jarena ------------------------------------------------------------ */

typedef struct achunk {
    struct achunk *next;
    size_t used, cap;
    _Alignas(16) char data[];
} achunk;

typedef struct jarena {
    achunk *head;
    bool oom;
} jarena;

static void *aalloc(jarena *a, size_t n)
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

static void afree(jarena *a)
{
    for (achunk *c = a->head, *n; c; c = n) {
        n = c->next;
        free(c);
    }
    a->head = NULL;
}

/* ---- values ------------------------------------------------------------ */

enum { JV_UNDEF, JV_NONE, JV_BOOL, JV_NUM, JV_STR, JV_LIST, JV_DICT };

typedef struct jlist jlist;
typedef struct jdict jdict;
typedef struct jv {
    int t;
    bool b;
    double n;
    const char *s;
    size_t len;
    jlist *l;
    jdict *d;
} jv;
struct jlist {
    size_t n;
    jv *v;
};
struct jdict {
    size_t n, cap;
    const char **k;
    jv *v;
};

/* ---- the parsed template ---------------------------------------------- */

enum {
    N_TEXT, N_OUT, N_IF, N_FOR, N_SET,
    E_LIT, E_NAME, E_ATTR, E_INDEX, E_SLICE, E_CALL, E_FILTER, E_TEST, E_BIN, E_AND, E_OR,
    E_NOT, E_NEG, E_COND, E_LIST
};

typedef struct node node;
struct node {
    int kind;
    int op;           /* E_BIN: the operator's first char, or a code below */
    size_t pos;       /* offset in the source, for messages */
    jv lit;           /* E_LIT, N_TEXT (a string) */
    const char *name; /* E_NAME, E_ATTR, E_FILTER, E_TEST, N_FOR var, N_SET target */
    const char *attr; /* N_SET ns.attr */
    node *a, *b, *c;  /* operands; N_IF cond; N_FOR iterable (a), filter (b) */
    node **args;      /* E_CALL, E_FILTER, E_LIST */
    const char **argn;/* keyword names (namespace) */
    int nargs;
    bool neg;         /* E_TEST: is not; E_BIN 'in': not in */
    node *body, *els; /* statement lists */
    node *next;
};

enum { OP_EQ = 256, OP_NE, OP_LE, OP_GE, OP_IN, OP_FLOORDIV };

struct jinja_tmpl {
    jarena a;
    char *src;
    size_t len;
    node *root;
};

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

static void line_col(const char *s, size_t pos, int *line, int *col)
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

static kiln_status perr(parser *P, size_t pos, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static kiln_status perr(parser *P, size_t pos, const char *fmt, ...)
{
    if (P->err) return P->err;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    int line, col;
    line_col(P->s, pos, &line, &col);
    P->err = kiln_fail(P->ctx, KILN_ERR_FORMAT, "chat template line %d col %d: %s", line, col, msg);
    return P->err;
}

static node *nnew(parser *P, int kind, size_t pos)
{
    node *n = aalloc(&P->t->a, sizeof *n);
    if (!n) {
        if (!P->err) P->err = kiln_fail(P->ctx, KILN_ERR_NOMEM, "out of memory parsing a chat template");
        return NULL;
    }
    n->kind = kind;
    n->pos = pos;
    return n;
}

static char *sdup(jarena *a, const char *s, size_t n)
{
    char *d = aalloc(a, n + 1);
    if (d) memcpy(d, s, n);
    return d;
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
    return sdup(&P->t->a, w, n);
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
        if (e) e->lit = (jv){.t = JV_STR, .s = sdup(&P->t->a, buf, n), .len = n};
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
        e->args = aalloc(&P->t->a, (size_t)(k + 1) * sizeof *e->args);
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
        e->name = sdup(&P->t->a, w, n);
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
                if (accept(P, "=")) names[k] = sdup(&P->t->a, w, n);
                else P->p = save;
            }
            if (!(items[k++] = parse_expr(P))) return false;
        } while (accept(P, ","));
        if (!accept(P, ")")) {
            perr(P, P->p, "expected ')'");
            return false;
        }
    }
    call->args = aalloc(&P->t->a, (size_t)(k + 1) * sizeof *call->args);
    call->argn = aalloc(&P->t->a, (size_t)(k + 1) * sizeof *call->argn);
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

static node *parse_and(parser *P)
{
    node *e = parse_not(P);
    size_t pos = P->p;
    while (e && accept_word(P, "and")) {
        node *x = nnew(P, E_AND, pos);
        if (!x) return NULL;
        x->a = e;
        x->b = parse_not(P);
        e = x->b ? x : NULL;
        pos = P->p;
    }
    return e;
}

static node *parse_or(parser *P)
{
    node *e = parse_and(P);
    size_t pos = P->p;
    while (e && accept_word(P, "or")) {
        node *x = nnew(P, E_OR, pos);
        if (!x) return NULL;
        x->a = e;
        x->b = parse_and(P);
        e = x->b ? x : NULL;
        pos = P->p;
    }
    return e;
}

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
    afree(&t->a);
    free(t->src);
    free(t);
}

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
    if (R->err) return R->err;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    int line, col;
    line_col(R->t->src, pos, &line, &col);
    R->err = kiln_fail(R->ctx, KILN_ERR_FORMAT, "chat template line %d col %d: %s", line, col, msg);
    return R->err;
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
    return (jv){.t = JV_STR, .s = sdup(&R->a, s, n), .len = n};
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
        const char **nk = aalloc(&R->a, cap * sizeof *nk);
        jv *nv = aalloc(&R->a, cap * sizeof *nv);
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
    var *x = aalloc(&R->a, sizeof *x);
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
    char *d = aalloc(&R->a, s.len + 1);
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
    char *d = aalloc(&R->a, 6 * v.len + 3);
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
        line_col(R->t->src, e->pos, &line, &col);
        R->err = kiln_fail(R->ctx, KILN_ERR_INVALID_ARG,
                           "chat template raised an error: %.*s (raise_exception at line %d "
                           "col %d)", (int)KILN_MIN(m.len, (size_t)400), m.s, line, col);
        return (jv){.t = JV_UNDEF};
    }
    if (f->kind == E_NAME && !strcmp(f->name, "namespace")) {
        jdict *d = aalloc(&R->a, sizeof *d);
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
    jlist *l = aalloc(&R->a, sizeof *l);
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
        char *d = aalloc(&R->a, x.len + y.len + 1);
        if (!d) return (jv){.t = JV_UNDEF};
        memcpy(d, x.s, x.len);
        memcpy(d + x.len, y.s, y.len);
        return (jv){.t = JV_STR, .s = d, .len = x.len + y.len};
    }
    case '+':
        if (a.t == JV_STR && b.t == JV_STR) {
            char *d = aalloc(&R->a, a.len + b.len + 1);
            if (!d) return (jv){.t = JV_UNDEF};
            memcpy(d, a.s, a.len);
            memcpy(d + a.len, b.s, b.len);
            return (jv){.t = JV_STR, .s = d, .len = a.len + b.len};
        }
        if (a.t == JV_LIST && b.t == JV_LIST) {
            jlist *l = aalloc(&R->a, sizeof *l);
            if (!l || !(l->v = aalloc(&R->a, (a.l->n + b.l->n + 1) * sizeof *l->v)))
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
        jlist *l = aalloc(&R->a, sizeof *l);
        if (!l || !(l->v = aalloc(&R->a, (size_t)(e->nargs + 1) * sizeof *l->v)))
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
    jv *items = aalloc(&R->a, (cnt + 1) * sizeof *items);
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
        jdict *ld = aalloc(&R->a, sizeof *ld);
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
    jlist *l = aalloc(&R.a, sizeof *l);
    if (l) l->v = aalloc(&R.a, (size_t)(n + 1) * sizeof *l->v);
    for (int i = 0; l && l->v && i < n; i++) {
        jdict *d = aalloc(&R.a, sizeof *d);
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
        afree(&R.a);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory rendering a chat template");
    }
    bind(&R, "messages", (jv){.t = JV_LIST, .l = l});
    bind(&R, "add_generation_prompt", (jv){.t = JV_BOOL, .b = add_generation_prompt});
    bind(&R, "bos_token", (jv){.t = JV_STR, .s = bos ? bos : "", .len = bos ? strlen(bos) : 0});
    bind(&R, "eos_token", (jv){.t = JV_STR, .s = eos ? eos : "", .len = eos ? strlen(eos) : 0});
    exec(&R, t->root);
    if (!R.err && R.a.oom) R.err = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory rendering a chat template");
    if (!R.err && !R.out) emit(&R, "", 0);
    afree(&R.a);
    if (R.err) {
        free(R.out);
        return R.err;
    }
    *out = R.out;
    *len = R.len;
    return KILN_OK;
}
