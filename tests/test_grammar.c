/*
 * test_grammar.c — the JSON constrained-decoding grammar (infer/grammar.h)
 * on known strings: any-object documents accepted whole and byte by byte,
 * malformed ones refused at the first bad byte; a schema's required and
 * listed properties, types, enums, integer vs number, unions with null;
 * the end (accepting vs done, nothing after the root); unsupported
 * keywords refused by name; the tool-call grammar (name, then arguments
 * of that tool's schema); and the allowed-token set over a vocabulary
 * trie equal to feeding every token on its own (bytes and a trained BPE).
 */
#include "check.h"
#include "infer/grammar.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static infer_grammar *compile(const char *schema)
{
    kiln_ctx *ctx = kiln_ctx_new();
    infer_grammar *g = NULL;
    char bad[64];
    kiln_status st = infer_grammar_json(ctx, schema, schema ? strlen(schema) : 0, &g, bad);
    CHECK_MSG(st == KILN_OK, "%s", kiln_errmsg(ctx));
    kiln_ctx_free(ctx);
    return g;
}

/* How many bytes of text the grammar takes before refusing one
 * (strlen(text) when it takes all); done and acc: the end state. */
static size_t run(const infer_grammar *g, const char *text, bool *acc, bool *done)
{
    infer_gstate *s = infer_gstate_new(g);
    size_t i = 0, n = strlen(text);
    while (i < n && infer_gstate_feed(s, text + i, 1)) i++;
    if (acc) *acc = infer_gstate_accepting(s);
    if (done) *done = infer_gstate_done(s);
    infer_gstate_free(s);
    return i;
}

static bool whole(const infer_grammar *g, const char *text)
{
    bool acc, done;
    return run(g, text, &acc, &done) == strlen(text) && acc;
}

static void test_any_object(void)
{
    infer_grammar *g = compile(NULL);
    const char *ok[] = {
        "{}",
        "{\"a\": [1, 2.5e-3, -0, \"x\\u00e9\\n\", true, false, null, {\"b\": {}}]}",
        "{\n  \"k\": \"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\",\n  \"n\": -12.5E+3\n}",
        "{\"\":[]}",
    };
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
        bool acc, done;
        CHECK_MSG(run(g, ok[i], &acc, &done) == strlen(ok[i]) && acc && done, "%s", ok[i]);
    }
    /* the first refused byte */
    struct { const char *text; size_t at; } bad[] = {
        {"[1]", 0},                   /* the root must be an object */
        {"{\"a\" 1}", 5},             /* no colon */
        {"{\"a\":01}", 6},            /* leading zero */
        {"{\"a\":1,}", 7},            /* trailing comma */
        {"{\"a\":\"\x01\"}", 6},      /* control character in a string */
        {"{\"a\":\"\xff\"}", 6},      /* not UTF-8 */
        {"{\"a\":\"\xc3(\"}", 7},     /* a lead byte without its continuation */
        {"{\"a\":\"\\x\"}", 7},       /* bad escape */
        {"{\"a\":tru}", 8},
        {"{\"a\":1} ", 7},            /* nothing after the root value */
        {"{\"a\":1}{", 7},
        {"{a:1}", 1},
        {" {}", 0},                   /* nothing before the root value */
        {"{\"a\":-}", 6},
        {"{\"a\":1.}", 7},
        {"{\"a\":1e}", 7},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        size_t got = run(g, bad[i].text, NULL, NULL);
        CHECK_MSG(got == bad[i].at, "%s: refused at %zu, want %zu", bad[i].text, got, bad[i].at);
    }
    /* a whitespace run is bounded */
    char sp[64] = "{";
    memset(sp + 1, ' ', 40);
    CHECK_EQ(run(g, sp, NULL, NULL), 1 + 16);
    /* every prefix of a valid document is a valid prefix, none accepting */
    bool acc, done;
    run(g, "{\"a\": [1, 2", &acc, &done);
    CHECK(!acc && !done);
    /* numbers are bounded */
    CHECK_EQ(run(g, "{\"a\":1234567890123456789012345678", NULL, NULL), 5 + 24);
    /* deep nesting stops at the frame limit */
    char deep[80];
    memset(deep, '[', sizeof deep);
    memcpy(deep, "{\"a\":", 5);
    deep[79] = 0;
    CHECK(run(g, deep, NULL, NULL) < 40);
    infer_grammar_free(g);
}

static const char *person =
    "{\"type\":\"object\",\"properties\":{"
    "\"name\":{\"type\":\"string\",\"description\":\"who\"},"
    "\"age\":{\"type\":\"integer\"},"
    "\"tags\":{\"type\":\"array\",\"items\":{\"enum\":[\"a\",\"bc\",\"b\"]}},"
    "\"ok\":{\"type\":\"boolean\"},"
    "\"x\":{\"type\":[\"number\",\"null\"]},"
    "\"pet\":{\"type\":\"object\",\"properties\":{\"kind\":{\"const\":\"cat\"}},\"required\":[\"kind\"],"
    "\"additionalProperties\":false},"
    "\"n\":{\"enum\":[1,12,\"1\"]}},"
    "\"required\":[\"name\",\"age\"]}";

static void test_schema(void)
{
    infer_grammar *g = compile(person);
    const char *ok[] = {
        "{\"name\":\"Bo\",\"age\":42}",
        "{\"age\":-1,\"name\":\"\",\"tags\":[\"bc\",\"a\",\"b\"],\"ok\":false,\"x\":null}",
        "{ \"name\" : \"a\" , \"age\" : 0 , \"x\" : 1.5e3, \"pet\": {\"kind\": \"cat\"} }",
        "{\"name\":\"a\",\"age\":1,\"n\":12}",
        "{\"name\":\"a\",\"age\":1,\"n\":1}",
        "{\"name\":\"a\",\"age\":1,\"n\":\"1\",\"tags\":[]}",
    };
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
        bool acc, done;
        CHECK_MSG(run(g, ok[i], &acc, &done) == strlen(ok[i]) && acc && done, "%s", ok[i]);
    }
    struct { const char *text; size_t at; } bad[] = {
        {"{\"name\":\"Bo\"}", 12},                    /* age is required */
        {"{}", 1},                                    /* so are both */
        {"{\"name\":\"Bo\",\"age\":4.2}", 20},        /* an integer */
        {"{\"name\":\"Bo\",\"name\"", 15},            /* each property once */
        {"{\"nam\":1", 5},                            /* not a property */
        {"{\"names\":1", 6},
        {"{\"tags\":[\"c\"]", 10},                    /* not in the enum */
        {"{\"tags\":[\"bcd\"]", 12},
        {"{\"ok\":1", 6},                             /* a boolean */
        {"{\"x\":\"1\"", 5},                          /* number or null */
        {"{\"pet\":{\"kind\":\"dog\"", 16},           /* const */
        {"{\"pet\":{}", 8},                           /* kind required */
        {"{\"pet\":{\"kind\":\"cat\",", 20},          /* nothing else */
        {"{\"n\":2", 5},
        {"{\"n\":123", 7},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        size_t got = run(g, bad[i].text, NULL, NULL);
        CHECK_MSG(got == bad[i].at, "%s: refused at %zu, want %zu", bad[i].text, got, bad[i].at);
    }
    infer_grammar_free(g);

    /* a number at the root may end or go on */
    g = compile("{\"type\":\"number\"}");
    bool acc, done;
    CHECK(run(g, "12", &acc, &done) == 2 && acc && !done);
    CHECK(whole(g, "-3.25e-2"));
    CHECK(!whole(g, "\"3\""));
    infer_grammar_free(g);
    g = compile("{\"enum\":[\"red\",\"green\"]}");
    CHECK(run(g, "\"red\"", &acc, &done) == 5 && acc && done);
    CHECK_EQ(run(g, "\"blue\"", NULL, NULL), 1);
    infer_grammar_free(g);
    g = compile("{\"type\":\"array\",\"items\":{\"type\":\"object\",\"properties\":{\"id\":{\"type\":\"integer\"}},"
                "\"required\":[\"id\"]}}");
    CHECK(whole(g, "[{\"id\":1},{\"id\":2}]"));
    CHECK_EQ(run(g, "[{\"id\":1},{}]", NULL, NULL), 11);
    infer_grammar_free(g);
    /* an object without properties: any keys, values of additionalProperties */
    g = compile("{\"type\":\"object\",\"additionalProperties\":{\"type\":\"integer\"}}");
    CHECK(whole(g, "{\"a\":1,\"b\":-2}"));
    CHECK_EQ(run(g, "{\"a\":\"x\"}", NULL, NULL), 5);
    infer_grammar_free(g);
}

static void refused(const char *schema, const char *keyword)
{
    kiln_ctx *ctx = kiln_ctx_new();
    infer_grammar *g = NULL;
    char bad[64];
    kiln_status st = infer_grammar_json(ctx, schema, strlen(schema), &g, bad);
    CHECK_MSG(st == KILN_ERR_INVALID_ARG && !g && !strcmp(bad, keyword) &&
                  strstr(kiln_errmsg(ctx), keyword),
              "%s: status %d, keyword '%s', message %s", schema, st, bad, kiln_errmsg(ctx));
    kiln_ctx_free(ctx);
}

static void test_unsupported(void)
{
    refused("{\"type\":\"string\",\"pattern\":\"^a\"}", "pattern");
    refused("{\"anyOf\":[{\"type\":\"string\"}]}", "anyOf");
    refused("{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"string\",\"minLength\":1}}}",
            "minLength");
    refused("{\"type\":\"object\",\"properties\":{\"a\":{}},\"required\":[\"b\"]}", "required");
    refused("{\"type\":\"object\",\"properties\":{\"a\":{}},\"additionalProperties\":true}",
            "additionalProperties");
    refused("{\"type\":\"date\"}", "type");
    refused("{\"$ref\":\"#/x\"}", "$ref");
    refused("{\"enum\":[]}", "enum");
}

static void test_tool_call(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    const char *names[] = {"get_weather", "get_time"};
    const char *schemas[] = {
        "{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"}},\"required\":[\"city\"]}",
        "{\"type\":\"object\",\"properties\":{\"tz\":{\"enum\":[\"UTC\",\"CET\"]}}}"};
    infer_grammar *g = NULL;
    CHECK(infer_grammar_tool_call(ctx, names, schemas, 2, &g, NULL) == KILN_OK);
    infer_gstate *s = infer_gstate_new(g);
    const char *t = "{\"name\": \"get_time\", \"arguments\": {\"tz\": \"CET\"}}";
    CHECK(infer_gstate_feed(s, t, strlen(t)));
    CHECK(infer_gstate_done(s) && infer_gstate_tool(s) == 1);
    infer_gstate_free(s);
    s = infer_gstate_new(g);
    CHECK(infer_gstate_feed(s, "{\"name\":\"get_weather\",\"arguments\":", 34));
    CHECK_EQ(infer_gstate_tool(s), 0);
    CHECK(!infer_gstate_feed(s, "{\"tz\"", 5));       /* the other tool's argument */
    CHECK(!infer_gstate_feed(s, "{}", 2));            /* city is required */
    CHECK(infer_gstate_feed(s, "{\"city\":\"Oslo\"}}", 16) && infer_gstate_done(s));
    infer_gstate_free(s);
    CHECK_EQ(run(g, "{\"arguments\":{}", NULL, NULL), 2); /* name comes first */
    CHECK_EQ(run(g, "{\"name\":\"get_date\"", NULL, NULL), 13);
    infer_grammar_free(g);
    kiln_ctx_free(ctx);
}

/* allowed-token sets from the trie == feeding each token alone */
static void same_as_brute_force(const kiln_tokenizer *tok, const infer_grammar *g,
                                const char *prefix, int *n_allowed)
{
    kiln_ctx *ctx = kiln_ctx_new();
    infer_vocab_trie *t = NULL;
    CHECK(infer_vocab_trie_new(ctx, tok, &t) == KILN_OK);
    int V = kiln_tokenizer_vocab_size(tok);
    uint8_t *a = calloc((size_t)V, 1);
    infer_gstate *s = infer_gstate_new(g);
    CHECK(infer_gstate_feed(s, prefix, strlen(prefix)));
    int n = infer_gstate_allowed(s, t, a), want = 0, diff = 0;
    for (int32_t id = 0; id < V; id++) {
        char *p = NULL;
        size_t len = 0;
        CHECK(kiln_tokenizer_decode(ctx, tok, &id, 1, &p, &len) == KILN_OK);
        infer_gstate *c = infer_gstate_new(g);
        infer_gstate_feed(c, prefix, strlen(prefix));
        bool ok = len > 0 && !kiln_tokenizer_is_special(tok, id) && infer_gstate_feed(c, p, len);
        infer_gstate_free(c);
        free(p);
        want += ok;
        diff += ok != (a[id] != 0);
    }
    CHECK_MSG(diff == 0 && n == want, "'%s': %d tokens differ, %d allowed, %d by brute force",
              prefix, diff, n, want);
    *n_allowed = n;
    infer_gstate_free(s);
    free(a);
    infer_vocab_trie_free(t);
    kiln_ctx_free(ctx);
}

static void test_allowed_tokens(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer *bytes = NULL;
    CHECK(kiln_tokenizer_load(ctx, "bytes", &bytes) == KILN_OK);
    infer_grammar *g = compile(person);
    int n;
    /* inside an integer: digits, ',', '}' (both required are there), whitespace */
    same_as_brute_force(bytes, g, "{\"name\":\"Bo\",\"age\":4", &n);
    CHECK_EQ(n, 10 + 2 + 4);
    /* at a key: the first bytes of the properties not yet seen */
    same_as_brute_force(bytes, g, "{\"name\":\"Bo\",\"", &n);
    CHECK_EQ(n, 6); /* a(ge), t(ags), o(k), x, p(et), n */
    same_as_brute_force(bytes, g, "{", &n);
    CHECK_EQ(n, 1 + 4);

    /* a trained BPE whose tokens span several bytes and JSON punctuation */
    char path[] = "/tmp/kiln-test-grammar-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    FILE *f = fdopen(fd, "w");
    for (int i = 0; i < 300; i++)
        fprintf(f, "{\"name\": \"Bo %d\", \"age\": %d, \"tags\": [\"a\", \"bc\"], \"ok\": true}\n", i,
                i * 7);
    fclose(f);
    kiln_tokenizer_train_opts o = kiln_tokenizer_train_opts_default();
    const char *in[] = {path};
    o.inputs = in;
    o.n_inputs = 1;
    o.vocab_size = 400;
    o.threads = 1;
    kiln_tokenizer *bpe = NULL;
    CHECK_MSG(kiln_tokenizer_train(ctx, &o, &bpe, NULL) == KILN_OK, "%s", kiln_errmsg(ctx));
    unlink(path);
    if (bpe) {
        const char *prefixes[] = {"", "{", "{\"", "{\"name\": \"B", "{\"name\": \"Bo 1\", \"age\": 7",
                                  "{\"name\": \"Bo 1\", \"age\": 7, \"tags\": [\"", "{\"ok\": t"};
        for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes; i++)
            same_as_brute_force(bpe, g, prefixes[i], &n);
        infer_grammar *any = compile(NULL);
        same_as_brute_force(bpe, any, "{\"x\": [1, {\"y\": \"z", &n);
        CHECK(n > 200); /* inside a string nearly everything goes */
        infer_grammar_free(any);
    }
    kiln_tokenizer_free(bpe);
    infer_grammar_free(g);
    kiln_tokenizer_free(bytes);
    kiln_ctx_free(ctx);
}

int main(void)
{
    RUN_TEST(test_any_object);
    RUN_TEST(test_schema);
    RUN_TEST(test_unsupported);
    RUN_TEST(test_tool_call);
    RUN_TEST(test_allowed_tokens);
    return TEST_EXIT();
}
