/*
 * grammar.c — JSON constrained decoding (see grammar.h): a schema
 * compiled into a graph of nodes, a pushdown parser over bytes (one frame
 * per open value), and the allowed-token set by a depth-first walk of the
 * vocabulary's byte trie that copies the parse state at each edge and
 * prunes a subtree as soon as its prefix is rejected. ~1000 lines: the
 * schema compiler, the byte parser and the trie walk share the node and
 * frame types and are tested as one (tests/test_grammar.c).
 */
#include "infer/grammar.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#define G_DEPTH 32
#define G_WS_MAX 16
#define G_NUM_MAX 24
#define G_PROPS_MAX 64

enum { N_UNION, N_OBJ, N_ARR, N_STR, N_NUM, N_INT, N_LIT, N_TOOL };

typedef struct gnode {
    int kind;
    /* N_OBJ, N_TOOL: listed properties (N_TOOL: "name", "arguments") */
    int n_props;
    char **names;
    size_t *name_len;
    struct gnode **vals;
    uint64_t required;
    struct gnode *free_val; /* N_OBJ without properties: every value's node */
    /* N_ARR */
    struct gnode *items;
    /* N_LIT: the JSON texts allowed */
    int n_lits;
    char **lits;
    size_t *lit_len;
    /* N_UNION: the alternative for each first byte class */
    struct gnode *u_obj, *u_arr, *u_str, *u_num, *u_lit;
    /* N_TOOL: "name" is a literal of the names; arguments by the name chosen */
    struct gnode *t_names;
    struct gnode **t_args;
} gnode;

struct infer_grammar {
    gnode *root;
    gnode **all;         /* every node, for freeing */
    int n_all, cap_all;
};

/* frame kinds and states */
enum { F_ROOT, F_OBJ, F_ARR, F_STR, F_NUM, F_LIT };
enum { R_BEFORE, R_VALUE, R_DONE };
enum { O_FIRST, O_KEY, O_COLON, O_VALUE, O_AFTER, O_NEXT };
enum { A_FIRST, A_VALUE, A_AFTER, A_NEXT };
enum { S_IN, S_ESC, S_U };
enum { M_MINUS, M_ZERO, M_INT, M_DOT, M_FRAC, M_E, M_ESIGN, M_EXP };

typedef struct gframe {
    const gnode *node;
    uint8_t kind, st;
    uint8_t u8;          /* string: UTF-8 continuation bytes still due */
    int8_t tool;         /* N_TOOL: the name chosen (-1 none yet) */
    int16_t cur;         /* object: the property whose value is parsed; key: candidate */
    uint16_t pos;        /* key / literal / number / \u bytes so far */
    uint64_t seen;       /* object: properties present */
} gframe;

struct infer_gstate {
    int depth;
    int ws;              /* the current whitespace run */
    int tool;            /* the name chosen by a finished tool call, -1 */
    gframe f[G_DEPTH];
    /* the trie walk's states, one per byte of depth (lazily allocated) */
    struct infer_gstate *scratch;
    int n_scratch;
};

/* ---- compiling a schema ------------------------------------------------ */

typedef struct comp {
    kiln_ctx *ctx;
    infer_grammar *g;
    char *bad;           /* bad_keyword or NULL */
    gnode *any;          /* the shared "any value" union */
} comp;

static gnode *node_new(comp *c, int kind)
{
    infer_grammar *g = c->g;
    if (g->n_all == g->cap_all) {
        int cap = g->cap_all ? 2 * g->cap_all : 16;
        gnode **p = realloc(g->all, (size_t)cap * sizeof *p);
        if (!p) return NULL;
        g->all = p;
        g->cap_all = cap;
    }
    gnode *n = calloc(1, sizeof *n);
    if (!n) return NULL;
    n->kind = kind;
    g->all[g->n_all++] = n;
    return n;
}

static kiln_status bad_kw(comp *c, const char *kw, const char *fmt, const char *detail)
{
    if (c->bad) snprintf(c->bad, 64, "%s", kw);
    return kiln_fail(c->ctx, KILN_ERR_INVALID_ARG, fmt, kw, detail ? detail : "");
}

static kiln_status nomem(comp *c) { return kiln_fail(c->ctx, KILN_ERR_NOMEM, "out of memory"); }

/* A literal node of the JSON texts of values (n of them). */
static kiln_status lit_node(comp *c, json_t *const *values, int n, gnode **out)
{
    gnode *nd = node_new(c, N_LIT);
    if (!nd) return nomem(c);
    nd->lits = calloc((size_t)(n ? n : 1), sizeof *nd->lits);
    nd->lit_len = calloc((size_t)(n ? n : 1), sizeof *nd->lit_len);
    if (!nd->lits || !nd->lit_len) return nomem(c);
    for (int i = 0; i < n; i++) {
        nd->lits[i] = json_dumps(values[i], JSON_COMPACT | JSON_ENCODE_ANY);
        if (!nd->lits[i]) return nomem(c);
        nd->lit_len[i] = strlen(nd->lits[i]);
        nd->n_lits = i + 1;
    }
    *out = nd;
    return KILN_OK;
}

static kiln_status any_node(comp *c, gnode **out)
{
    if (c->any) {
        *out = c->any;
        return KILN_OK;
    }
    gnode *u = node_new(c, N_UNION);
    gnode *o = node_new(c, N_OBJ), *a = node_new(c, N_ARR), *s = node_new(c, N_STR),
          *num = node_new(c, N_NUM);
    if (!u || !o || !a || !s || !num) return nomem(c);
    json_t *v[3] = {json_true(), json_false(), json_null()};
    kiln_status st = lit_node(c, v, 3, &u->u_lit);
    if (st) return st;
    o->free_val = u;
    a->items = u;
    u->u_obj = o;
    u->u_arr = a;
    u->u_str = s;
    u->u_num = num;
    c->any = u;
    *out = u;
    return KILN_OK;
}

static kiln_status compile(comp *c, json_t *sch, int depth, gnode **out);

/* One type name of sch (its other keywords apply). */
static kiln_status compile_type(comp *c, json_t *sch, const char *type, int depth, gnode **out)
{
    if (!strcmp(type, "string")) {
        *out = node_new(c, N_STR);
    } else if (!strcmp(type, "number")) {
        *out = node_new(c, N_NUM);
    } else if (!strcmp(type, "integer")) {
        *out = node_new(c, N_INT);
    } else if (!strcmp(type, "boolean")) {
        json_t *v[2] = {json_true(), json_false()};
        return lit_node(c, v, 2, out);
    } else if (!strcmp(type, "null")) {
        json_t *v[1] = {json_null()};
        return lit_node(c, v, 1, out);
    } else if (!strcmp(type, "array")) {
        gnode *a = node_new(c, N_ARR);
        if (!a) return nomem(c);
        json_t *it = json_object_get(sch, "items");
        kiln_status st = it ? compile(c, it, depth + 1, &a->items) : any_node(c, &a->items);
        if (st) return st;
        *out = a;
    } else if (!strcmp(type, "object")) {
        gnode *o = node_new(c, N_OBJ);
        if (!o) return nomem(c);
        json_t *props = json_object_get(sch, "properties");
        json_t *addl = json_object_get(sch, "additionalProperties");
        json_t *req = json_object_get(sch, "required");
        if (props && !json_is_object(props))
            return bad_kw(c, "properties", "schema keyword '%s' must be an object%s", NULL);
        if (props && json_object_size(props) > 0) {
            if (addl && !json_is_false(addl))
                return bad_kw(c, "additionalProperties",
                              "schema keyword '%s': only false is supported next to "
                              "'properties'%s", NULL);
            size_t np = json_object_size(props);
            if (np > G_PROPS_MAX)
                return bad_kw(c, "properties", "schema keyword '%s': more than 64 properties%s",
                              NULL);
            o->names = calloc(np, sizeof *o->names);
            o->name_len = calloc(np, sizeof *o->name_len);
            o->vals = calloc(np, sizeof *o->vals);
            if (!o->names || !o->name_len || !o->vals) return nomem(c);
            const char *k;
            json_t *v;
            json_object_foreach(props, k, v) {
                for (const char *p = k; *p; p++)
                    if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20)
                        return bad_kw(c, "properties",
                                      "schema keyword '%s': the property name '%s' has a quote, "
                                      "backslash or control character",
                                      k);
                int i = o->n_props;
                o->names[i] = strdup(k);
                if (!o->names[i]) return nomem(c);
                o->name_len[i] = strlen(k);
                o->n_props = i + 1;
                kiln_status st = compile(c, v, depth + 1, &o->vals[i]);
                if (st) return st;
            }
        } else {
            /* any keys: additionalProperties true, absent or a schema */
            kiln_status st;
            if (addl && json_is_object(addl)) st = compile(c, addl, depth + 1, &o->free_val);
            else if (!addl || json_is_true(addl)) st = any_node(c, &o->free_val);
            else
                return bad_kw(c, "additionalProperties",
                              "schema keyword '%s': false without 'properties' allows only {}"
                              "%s", NULL);
            if (st) return st;
        }
        if (req) {
            size_t i;
            json_t *v;
            if (!json_is_array(req))
                return bad_kw(c, "required", "schema keyword '%s' must be an array of names%s",
                              NULL);
            json_array_foreach(req, i, v) {
                int k = -1;
                for (int j = 0; json_is_string(v) && j < o->n_props; j++)
                    if (!strcmp(o->names[j], json_string_value(v))) k = j;
                if (k < 0)
                    return bad_kw(c, "required",
                                  "schema keyword '%s': %s is not one of 'properties'",
                                  json_is_string(v) ? json_string_value(v) : "an entry");
                o->required |= 1ULL << k;
            }
        }
        *out = o;
    } else {
        return bad_kw(c, "type", "schema keyword '%s': unknown type '%s'", type);
    }
    return *out ? KILN_OK : nomem(c);
}

static kiln_status compile(comp *c, json_t *sch, int depth, gnode **out)
{
    *out = NULL;
    if (depth > G_DEPTH - 2)
        return bad_kw(c, "properties", "the schema nests deeper than 30 levels ('%s')%s", NULL);
    if (json_is_true(sch)) return any_node(c, out);
    if (!json_is_object(sch))
        return kiln_fail(c->ctx, KILN_ERR_INVALID_ARG, "a schema must be a JSON object");
    static const char *const ok[] = {"type",   "properties", "required", "items",
                                     "enum",   "const",      "additionalProperties",
                                     "title",  "description", "default", "examples",
                                     "$schema", "$id",       "$comment", NULL};
    const char *k;
    json_t *v;
    json_object_foreach(sch, k, v) {
        bool known = false;
        for (int i = 0; ok[i]; i++) known |= !strcmp(k, ok[i]);
        if (!known)
            return bad_kw(c, k,
                          "schema keyword '%s' is not supported (supported: type, properties, "
                          "required, additionalProperties, items, enum, const)%s",
                          NULL);
    }
    json_t *en = json_object_get(sch, "enum"), *cn = json_object_get(sch, "const");
    if (en) {
        if (!json_is_array(en) || json_array_size(en) == 0 || json_array_size(en) > 1024)
            return bad_kw(c, "enum", "schema keyword '%s' must be an array of 1 to 1024 values%s",
                          NULL);
        json_t **vals = malloc(json_array_size(en) * sizeof *vals);
        if (!vals) return nomem(c);
        for (size_t i = 0; i < json_array_size(en); i++) vals[i] = json_array_get(en, i);
        kiln_status st = lit_node(c, vals, (int)json_array_size(en), out);
        free(vals);
        return st;
    }
    if (cn) return lit_node(c, &cn, 1, out);
    json_t *ty = json_object_get(sch, "type");
    if (!ty) {
        if (json_object_get(sch, "properties")) return compile_type(c, sch, "object", depth, out);
        if (json_object_get(sch, "items")) return compile_type(c, sch, "array", depth, out);
        return any_node(c, out);
    }
    if (json_is_string(ty)) return compile_type(c, sch, json_string_value(ty), depth, out);
    if (!json_is_array(ty) || json_array_size(ty) == 0)
        return bad_kw(c, "type", "schema keyword '%s' must be a type name or an array of them%s",
                      NULL);
    /* several types: one alternative per first byte (number wins over integer) */
    gnode *u = node_new(c, N_UNION);
    if (!u) return nomem(c);
    json_t *lits[8];
    int nl = 0;
    size_t i;
    json_array_foreach(ty, i, v) {
        const char *t = json_is_string(v) ? json_string_value(v) : "";
        if (nl > 3) break;
        if (!strcmp(t, "boolean")) {
            lits[nl++] = json_true();
            lits[nl++] = json_false();
            continue;
        }
        if (!strcmp(t, "null")) {
            lits[nl++] = json_null();
            continue;
        }
        gnode *alt;
        kiln_status st = compile_type(c, sch, t, depth, &alt);
        if (st) return st;
        if (alt->kind == N_OBJ) u->u_obj = alt;
        else if (alt->kind == N_ARR) u->u_arr = alt;
        else if (alt->kind == N_STR) u->u_str = alt;
        else if (alt->kind == N_NUM || !u->u_num) u->u_num = alt;
        if (nl > 3) break;
    }
    if (nl > 3) return bad_kw(c, "type", "schema keyword '%s' repeats a type%s", NULL);
    if (nl) {
        kiln_status st = lit_node(c, lits, nl, &u->u_lit);
        if (st) return st;
    }
    *out = u;
    return KILN_OK;
}

static kiln_status comp_begin(kiln_ctx *ctx, comp *c, char bad[64])
{
    memset(c, 0, sizeof *c);
    c->ctx = ctx;
    c->bad = bad;
    if (bad) bad[0] = 0;
    c->g = calloc(1, sizeof *c->g);
    return c->g ? KILN_OK : kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
}

kiln_status infer_grammar_json(kiln_ctx *ctx, const char *schema, size_t len,
                               infer_grammar **out, char bad_keyword[64])
{
    *out = NULL;
    comp c;
    kiln_status st = comp_begin(ctx, &c, bad_keyword);
    if (st) return st;
    if (!schema) {
        gnode *any;
        st = any_node(&c, &any);
        c.g->root = any ? any->u_obj : NULL;
    } else {
        json_error_t je;
        json_t *j = json_loadb(schema, len, 0, &je);
        if (!j) st = kiln_fail(ctx, KILN_ERR_INVALID_ARG, "the schema is not JSON: %s", je.text);
        else st = compile(&c, j, 0, &c.g->root);
        json_decref(j);
    }
    if (st) {
        infer_grammar_free(c.g);
        return st;
    }
    *out = c.g;
    return KILN_OK;
}

kiln_status infer_grammar_tool_call(kiln_ctx *ctx, const char *const *names,
                                    const char *const *schemas, int n,
                                    infer_grammar **out, char bad_keyword[64])
{
    *out = NULL;
    if (n < 1 || n > 1024)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "a tool-call grammar needs 1 to 1024 tools");
    comp c;
    kiln_status st = comp_begin(ctx, &c, bad_keyword);
    if (st) return st;
    gnode *t = node_new(&c, N_TOOL);
    json_t **nv = calloc((size_t)n, sizeof *nv);
    if (!t || !nv) {
        free(nv);
        infer_grammar_free(c.g);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    t->n_props = 2;
    t->names = calloc(2, sizeof *t->names);
    t->name_len = calloc(2, sizeof *t->name_len);
    t->t_args = calloc((size_t)n, sizeof *t->t_args);
    if (!t->names || !t->name_len || !t->t_args || !(t->names[0] = strdup("name")) ||
        !(t->names[1] = strdup("arguments")))
        st = nomem(&c);
    t->name_len[0] = 4;
    t->name_len[1] = 9;
    t->required = 3;
    for (int i = 0; !st && i < n; i++) {
        nv[i] = json_string(names[i]);
        if (!nv[i]) st = kiln_fail(ctx, KILN_ERR_INVALID_ARG, "tool name %d is not UTF-8", i);
        else if (!schemas[i]) {
            gnode *any;
            st = any_node(&c, &any);
            if (!st) t->t_args[i] = any->u_obj;
        } else {
            json_error_t je;
            json_t *j = json_loadb(schemas[i], strlen(schemas[i]), 0, &je);
            if (!j) st = kiln_fail(ctx, KILN_ERR_INVALID_ARG, "the schema is not JSON: %s", je.text);
            else st = compile(&c, j, 1, &t->t_args[i]);
            json_decref(j);
        }
    }
    if (!st) st = lit_node(&c, nv, n, &t->t_names);
    for (int i = 0; i < n; i++) json_decref(nv[i]);
    free(nv);
    if (st) {
        infer_grammar_free(c.g);
        return st;
    }
    c.g->root = t;
    *out = c.g;
    return KILN_OK;
}

void infer_grammar_free(infer_grammar *g)
{
    if (!g) return;
    for (int i = 0; i < g->n_all; i++) {
        gnode *n = g->all[i];
        for (int k = 0; n->names && k < n->n_props; k++) free(n->names[k]);
        for (int k = 0; n->lits && k < n->n_lits; k++) free(n->lits[k]);
        free(n->names);
        free(n->name_len);
        free(n->vals);
        free(n->lits);
        free(n->lit_len);
        free(n->t_args);
        free(n);
    }
    free(g->all);
    free(g);
}

/* ---- the parser ------------------------------------------------------------ */

static bool is_ws(uint8_t c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }
static bool is_digit(uint8_t c) { return c >= '0' && c <= '9'; }
static bool is_hex(uint8_t c)
{
    return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static bool ws_ok(infer_gstate *s)
{
    if (s->ws >= G_WS_MAX) return false;
    s->ws++;
    return true;
}

static gframe *push(infer_gstate *s, const gnode *n, int kind, int st)
{
    if (s->depth >= G_DEPTH) return NULL;
    gframe *f = &s->f[s->depth++];
    memset(f, 0, sizeof *f);
    f->node = n;
    f->kind = (uint8_t)kind;
    f->st = (uint8_t)st;
    f->cur = -1;
    f->tool = -1;
    return f;
}

/* A literal candidate of n extending lits[cand][0..pos) with byte c, or -1. */
static int lit_next(const gnode *n, int cand, int pos, uint8_t c)
{
    for (int k = 0; k < n->n_lits; k++)
        if (n->lit_len[k] > (size_t)pos && (uint8_t)n->lits[k][pos] == c &&
            (pos == 0 || !memcmp(n->lits[k], n->lits[cand], (size_t)pos)))
            return k;
    return -1;
}

/* Whether lits[cand][0..pos) is itself one of the literals. */
static bool lit_complete(const gnode *n, int cand, int pos)
{
    for (int k = 0; k < n->n_lits; k++)
        if (n->lit_len[k] == (size_t)pos && !memcmp(n->lits[k], n->lits[cand], (size_t)pos))
            return true;
    return false;
}

/* Whether some literal extends lits[cand][0..pos) at all. */
static bool lit_extends(const gnode *n, int cand, int pos)
{
    for (int k = 0; k < n->n_lits; k++)
        if (n->lit_len[k] > (size_t)pos && !memcmp(n->lits[k], n->lits[cand], (size_t)pos))
            return true;
    return false;
}

/* Starts a value of node n with its first byte c (pushes its frame). */
static bool start_value(infer_gstate *s, const gnode *n, uint8_t c)
{
    if (n->kind == N_UNION) {
        const gnode *alt = c == '{'                      ? n->u_obj
                           : c == '['                    ? n->u_arr
                           : c == '"'                    ? n->u_str
                           : c == '-' || is_digit(c)     ? n->u_num
                                                         : n->u_lit;
        return alt && start_value(s, alt, c);
    }
    gframe *f;
    switch (n->kind) {
    case N_OBJ:
    case N_TOOL:
        return c == '{' && push(s, n, F_OBJ, O_FIRST);
    case N_ARR:
        return c == '[' && push(s, n, F_ARR, A_FIRST);
    case N_STR:
        return c == '"' && push(s, n, F_STR, S_IN);
    case N_NUM:
    case N_INT:
        if (c != '-' && !is_digit(c)) return false;
        if (!(f = push(s, n, F_NUM, c == '-' ? M_MINUS : c == '0' ? M_ZERO : M_INT))) return false;
        f->pos = 1;
        return true;
    case N_LIT: {
        int k = lit_next(n, 0, 0, c);
        if (k < 0 || !(f = push(s, n, F_LIT, 0))) return false;
        f->cur = (int16_t)k;
        f->pos = 1;
        return true;
    }
    }
    return false;
}

/* The node of an object's value for property p (or free keys). */
static const gnode *value_node(const gframe *f)
{
    const gnode *n = f->node;
    if (n->kind == N_TOOL) return f->cur == 0 ? n->t_names : n->t_args[f->tool];
    return n->n_props ? n->vals[f->cur] : n->free_val;
}

/* The top frame's value is complete: pop it and move its parent on. */
static void pop(infer_gstate *s)
{
    gframe *child = &s->f[--s->depth];
    gframe *p = &s->f[s->depth - 1];
    if (child->kind == F_OBJ && child->node->kind == N_TOOL) s->tool = child->tool;
    switch (p->kind) {
    case F_ROOT: p->st = R_DONE; break;
    case F_ARR: p->st = A_AFTER; break;
    case F_OBJ:
        if (p->st == O_KEY) {
            p->st = O_COLON; /* a free key's string */
        } else {
            if (p->node->kind == N_TOOL && p->cur == 0) p->tool = (int8_t)child->cur;
            p->st = O_AFTER;
        }
        break;
    }
}

static bool num_accepting(const gframe *f)
{
    return f->st == M_ZERO || f->st == M_INT || f->st == M_FRAC || f->st == M_EXP;
}

/* One byte. Returns false when c cannot come next. */
static bool feed1(infer_gstate *s, uint8_t c)
{
    bool ws = is_ws(c);
    if (!ws) s->ws = 0;
    for (;;) {
        gframe *f = &s->f[s->depth - 1];
        const gnode *n = f->node;
        switch (f->kind) {
        case F_ROOT:
            /* no whitespace around the root value: the output is the value */
            if (f->st != R_BEFORE || ws) return false;
            if (!start_value(s, n, c)) return false;
            f->st = R_VALUE;
            goto fed;
        case F_STR:
            if (f->st == S_ESC) {
                if (c == 'u') {
                    f->st = S_U;
                    f->pos = 0;
                } else if (strchr("\"\\/bfnrt", c) && c) {
                    f->st = S_IN;
                } else {
                    return false;
                }
            } else if (f->st == S_U) {
                if (!is_hex(c)) return false;
                if (++f->pos == 4) f->st = S_IN;
            } else if (f->u8) {
                if ((c & 0xC0) != 0x80) return false;
                f->u8--;
            } else if (c == '"') {
                pop(s);
            } else if (c == '\\') {
                f->st = S_ESC;
            } else if (c < 0x20) {
                return false;
            } else if (c >= 0x80) {
                if (c >= 0xC2 && c <= 0xDF) f->u8 = 1;
                else if (c >= 0xE0 && c <= 0xEF) f->u8 = 2;
                else if (c >= 0xF0 && c <= 0xF4) f->u8 = 3;
                else return false;
            }
            goto fed;
        case F_NUM: {
            bool integer = n->kind == N_INT;
            int nx = -1;
            if (f->pos < G_NUM_MAX) {
                switch (f->st) {
                case M_MINUS: nx = c == '0' ? M_ZERO : is_digit(c) ? M_INT : -1; break;
                case M_ZERO:
                case M_INT:
                    nx = f->st == M_INT && is_digit(c)           ? M_INT
                         : !integer && c == '.'                 ? M_DOT
                         : !integer && (c == 'e' || c == 'E')   ? M_E
                                                                : -1;
                    break;
                case M_DOT:
                case M_FRAC:
                    nx = is_digit(c)                          ? M_FRAC
                         : f->st == M_FRAC && (c == 'e' || c == 'E') ? M_E
                                                               : -1;
                    break;
                case M_E: nx = c == '+' || c == '-' ? M_ESIGN : is_digit(c) ? M_EXP : -1; break;
                case M_ESIGN:
                case M_EXP: nx = is_digit(c) ? M_EXP : -1; break;
                }
            }
            if (nx >= 0) {
                f->st = (uint8_t)nx;
                f->pos++;
                goto fed;
            }
            if (!num_accepting(f)) return false;
            pop(s); /* the number ended before c: c belongs to the parent */
            continue;
        }
        case F_LIT: {
            int k = lit_next(n, f->cur, f->pos, c);
            if (k >= 0) {
                f->cur = (int16_t)k;
                f->pos++;
                goto fed;
            }
            if (!lit_complete(n, f->cur, f->pos)) return false;
            pop(s);
            continue;
        }
        case F_ARR:
            switch (f->st) {
            case A_FIRST:
            case A_NEXT:
                if (ws) return ws_ok(s);
                if (c == ']' && f->st == A_FIRST) {
                    pop(s);
                    goto fed;
                }
                if (!start_value(s, n->items, c)) return false;
                f->st = A_VALUE; /* until the item's frame pops */
                goto fed;
            case A_AFTER:
                if (ws) return ws_ok(s);
                if (c == ',') {
                    f->st = A_NEXT;
                    goto fed;
                }
                if (c == ']') {
                    pop(s);
                    goto fed;
                }
                return false;
            }
            return false;
        case F_OBJ: {
            bool tool = n->kind == N_TOOL;
            uint64_t all = n->n_props ? (n->n_props == 64 ? ~0ULL : (1ULL << n->n_props) - 1) : 0;
            switch (f->st) {
            case O_FIRST:
            case O_NEXT:
                if (ws) return ws_ok(s);
                if (c == '}' && f->st == O_FIRST && n->required == 0) {
                    pop(s);
                    goto fed;
                }
                if (c != '"') return false;
                f->st = O_KEY;
                f->pos = 0;
                f->cur = -1;
                if (!n->n_props && !tool) {
                    /* a free key: a string frame; its end moves us to O_COLON */
                    if (!push(s, NULL, F_STR, S_IN)) return false;
                }
                goto fed;
            case O_KEY: {
                /* (free keys are parsed by their string frame) */
                /* the key so far is names[cur][0..pos); c extends it to
                 * a property not seen yet (or, '"', ends it at one) */
                int found = -1;
                for (int k = 0; k < n->n_props && found < 0; k++) {
                    if (f->seen & (1ULL << k)) continue;
                    if (tool && k != __builtin_popcountll(f->seen)) continue;
                    if (n->name_len[k] < f->pos ||
                        (f->pos && memcmp(n->names[k], n->names[f->cur], f->pos)))
                        continue;
                    if (c == '"' ? n->name_len[k] == f->pos
                                 : n->name_len[k] > f->pos && (uint8_t)n->names[k][f->pos] == c)
                        found = k;
                }
                if (found >= 0 && c == '"') {
                    f->cur = (int16_t)found;
                    f->seen |= 1ULL << found;
                    f->st = O_COLON;
                    goto fed;
                }
                if (found < 0) return false;
                f->cur = (int16_t)found;
                f->pos++;
                goto fed;
            }
            case O_COLON:
                if (ws) return ws_ok(s);
                if (c != ':') return false;
                f->st = O_VALUE;
                goto fed;
            case O_VALUE:
                if (ws) return ws_ok(s);
                if (!start_value(s, value_node(f), c)) return false;
                goto fed;
            case O_AFTER:
                if (ws) return ws_ok(s);
                if (c == ',' && (!n->n_props || (f->seen & all) != all)) {
                    f->st = O_NEXT;
                    goto fed;
                }
                if (c == '}' && (f->seen & n->required) == n->required) {
                    pop(s);
                    goto fed;
                }
                return false;
            }
            return false;
        }
        }
        return false;
    }
fed:
    /* a literal that nothing extends is complete at once */
    for (;;) {
        gframe *t = &s->f[s->depth - 1];
        if (t->kind == F_LIT && lit_complete(t->node, t->cur, t->pos) &&
            !lit_extends(t->node, t->cur, t->pos)) {
            pop(s);
            continue;
        }
        break;
    }
    return true;
}

infer_gstate *infer_gstate_new(const infer_grammar *g)
{
    infer_gstate *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->depth = 1;
    s->tool = -1;
    s->f[0].node = g->root;
    s->f[0].kind = F_ROOT;
    s->f[0].st = R_BEFORE;
    s->f[0].cur = -1;
    s->f[0].tool = -1;
    return s;
}

void infer_gstate_free(infer_gstate *s)
{
    if (!s) return;
    free(s->scratch);
    free(s);
}

/* Copies the live part of a state (no scratch). */
static void copy_state(infer_gstate *d, const infer_gstate *s)
{
    d->depth = s->depth;
    d->ws = s->ws;
    d->tool = s->tool;
    memcpy(d->f, s->f, (size_t)s->depth * sizeof *s->f);
}

bool infer_gstate_feed(infer_gstate *s, const char *bytes, size_t n)
{
    infer_gstate t;
    copy_state(&t, s);
    for (size_t i = 0; i < n; i++)
        if (!feed1(&t, (uint8_t)bytes[i])) return false;
    copy_state(s, &t);
    return true;
}

bool infer_gstate_accepting(const infer_gstate *s)
{
    infer_gstate t;
    copy_state(&t, s);
    /* a number or literal at the end may stop here */
    while (t.depth > 1) {
        gframe *f = &t.f[t.depth - 1];
        bool done = (f->kind == F_NUM && num_accepting(f)) ||
                    (f->kind == F_LIT && lit_complete(f->node, f->cur, f->pos));
        if (!done) return false;
        pop(&t);
    }
    return t.f[0].st == R_DONE;
}

bool infer_gstate_done(const infer_gstate *s) { return s->depth == 1 && s->f[0].st == R_DONE; }

int infer_gstate_tool(const infer_gstate *s)
{
    for (int i = 0; i < s->depth; i++)
        if (s->f[i].kind == F_OBJ && s->f[i].node->kind == N_TOOL) return s->f[i].tool;
    return s->tool;
}

/* ---- the vocabulary trie ------------------------------------------------------ */

typedef struct tnode {
    int32_t child, next; /* first child, next sibling (-1 none) */
    int32_t tok;         /* first token ending here (-1 none); more via tok_next */
    uint8_t byte;
    uint8_t unsafe;      /* a token in this subtree is not plain string text */
} tnode;

/* Inside a JSON string (no escape or UTF-8 sequence open) every token
 * that is plain string text (no quote, backslash or control byte, whole
 * UTF-8 characters) is allowed: those are listed once, and the walk then
 * visits only subtrees holding another token. */
struct infer_vocab_trie {
    tnode *n;
    int nn, cap;
    int32_t *tok_next;   /* (V) */
    int32_t *plain;      /* the plain-string-text tokens */
    int n_plain;
    int V, max_len;
};

static int trie_child(infer_vocab_trie *t, int at, uint8_t b)
{
    for (int c = t->n[at].child; c >= 0; c = t->n[c].next)
        if (t->n[c].byte == b) return c;
    if (t->nn == t->cap) {
        int cap = t->cap * 2;
        tnode *p = realloc(t->n, (size_t)cap * sizeof *p);
        if (!p) return -1;
        t->n = p;
        t->cap = cap;
    }
    int c = t->nn++;
    t->n[c] = (tnode){-1, t->n[at].child, -1, b, 0};
    t->n[at].child = c;
    return c;
}

/* Whether bytes p[0..n) inside a string leave it open and plain. */
static bool plain_string_text(const char *p, size_t n)
{
    infer_gstate s;
    s.depth = 2;
    s.ws = 0;
    s.tool = -1;
    memset(s.f, 0, 2 * sizeof *s.f);
    s.f[0].kind = F_ROOT;
    s.f[0].st = R_VALUE;
    s.f[1].kind = F_STR;
    s.f[1].st = S_IN;
    for (size_t i = 0; i < n; i++)
        if (!feed1(&s, (uint8_t)p[i]) || s.depth != 2) return false;
    return s.f[1].st == S_IN && s.f[1].u8 == 0;
}

/* Marks nodes whose subtree holds a token that is not plain text. */
static bool mark_unsafe(infer_vocab_trie *t, int at, const uint8_t *plain)
{
    bool u = false;
    for (int32_t id = t->n[at].tok; id >= 0; id = t->tok_next[id]) u |= !plain[id];
    for (int c = t->n[at].child; c >= 0; c = t->n[c].next) u |= mark_unsafe(t, c, plain);
    t->n[at].unsafe = u;
    return u;
}

kiln_status infer_vocab_trie_new(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                 infer_vocab_trie **out)
{
    *out = NULL;
    infer_vocab_trie *t = kiln_calloc(ctx, 1, sizeof *t);
    if (!t) return KILN_ERR_NOMEM;
    t->V = kiln_tokenizer_vocab_size(tok);
    t->cap = 1024;
    t->n = malloc((size_t)t->cap * sizeof *t->n);
    t->tok_next = malloc((size_t)t->V * sizeof *t->tok_next);
    if (!t->n || !t->tok_next) {
        infer_vocab_trie_free(t);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    t->n[0] = (tnode){-1, -1, -1, 0, 0};
    t->nn = 1;
    t->plain = malloc((size_t)t->V * sizeof *t->plain);
    uint8_t *plain = calloc((size_t)t->V, 1);
    if (!t->plain || !plain) {
        free(plain);
        infer_vocab_trie_free(t);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    for (int32_t id = 0; id < t->V; id++) {
        t->tok_next[id] = -1;
        if (kiln_tokenizer_is_special(tok, id)) continue;
        char *p = NULL;
        size_t n = 0;
        kiln_status st = kiln_tokenizer_decode(ctx, tok, &id, 1, &p, &n);
        if (st) {
            free(plain);
            infer_vocab_trie_free(t);
            return st;
        }
        if (n > 256) { /* never allowed: the walk goes 256 bytes deep at most */
            free(p);
            continue;
        }
        int at = 0;
        for (size_t i = 0; i < n && at >= 0; i++) at = trie_child(t, at, (uint8_t)p[i]);
        if (at > 0 && plain_string_text(p, n)) {
            plain[id] = 1;
            t->plain[t->n_plain++] = id;
        }
        free(p);
        if (at < 0) {
            free(plain);
            infer_vocab_trie_free(t);
            return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        }
        if (at == 0) continue; /* no bytes */
        t->tok_next[id] = t->n[at].tok;
        t->n[at].tok = id;
        if ((int)n > t->max_len) t->max_len = (int)n;
    }
    mark_unsafe(t, 0, plain);
    free(plain);
    *out = t;
    return KILN_OK;
}

void infer_vocab_trie_free(infer_vocab_trie *t)
{
    if (!t) return;
    free(t->n);
    free(t->tok_next);
    free(t->plain);
    free(t);
}

int infer_gstate_allowed(infer_gstate *s, const infer_vocab_trie *t, uint8_t *allowed)
{
    if (s->n_scratch < t->max_len + 1) {
        infer_gstate *p = realloc(s->scratch, (size_t)(t->max_len + 1) * sizeof *p);
        if (!p) return 0;
        s->scratch = p;
        s->n_scratch = t->max_len + 1;
    }
    /* depth-first, iterative: stack[d] is the state after d bytes, it[d]
     * the child of that level's node being tried */
    infer_gstate *st = s->scratch;
    int it[260];
    if (t->max_len >= (int)(sizeof it / sizeof *it)) return 0;
    copy_state(&st[0], s);
    /* inside a string: the plain tokens at once, then only the others */
    const gframe *top = &s->f[s->depth - 1];
    bool in_str = top->kind == F_STR && top->st == S_IN && top->u8 == 0;
    if (in_str)
        for (int i = 0; i < t->n_plain; i++) allowed[t->plain[i]] = 1;
    int d = 0;
    it[0] = t->n[0].child;
    while (d >= 0) {
        int c = it[d];
        if (c < 0) {
            d--;
            continue;
        }
        it[d] = t->n[c].next;
        if (in_str && !t->n[c].unsafe) continue;
        copy_state(&st[d + 1], &st[d]);
        if (!feed1(&st[d + 1], t->n[c].byte)) continue;
        for (int32_t id = t->n[c].tok; id >= 0; id = t->tok_next[id]) allowed[id] = 1;
        d++;
        it[d] = t->n[c].child;
    }
    int count = 0;
    for (int i = 0; i < t->V; i++) count += allowed[i];
    return count;
}
