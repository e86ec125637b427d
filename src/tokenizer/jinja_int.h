/*
 * jinja_int.h — what the chat-template parser (jinja.c) and renderer
 * (jinja_render.c) share: the arena, the values, the parsed tree. Private
 * to tokenizer/.
 */
#ifndef KILN_JINJA_INT_H
#define KILN_JINJA_INT_H

#include "tokenizer/jinja.h"

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

/* n zeroed bytes from the arena (16-aligned); NULL and a->oom when out of
 * memory. Everything is freed at once by ja_free. */
void *ja_alloc(jarena *a, size_t n);
void ja_free(jarena *a);
/* A NUL-terminated copy of s[0..n) in the arena (NULL when out of memory). */
char *ja_strdup(jarena *a, const char *s, size_t n);
/* The 1-based line and column of offset pos in s. */
void ja_line_col(const char *s, size_t pos, int *line, int *col);
/* Records the template's first error: *err (when still KILN_OK) becomes
 * KILN_ERR_FORMAT on ctx with "chat template line L col C: <fmt>", the
 * position pos of src; returns *err. The parser's and the renderer's. */
kiln_status ja_vfail(kiln_ctx *ctx, kiln_status *err, const char *src, size_t pos,
                     const char *fmt, va_list ap) __attribute__((format(printf, 5, 0)));

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

#endif /* KILN_JINJA_INT_H */
