/*
 * test_serve_tools.c — tool_choice "auto" in kiln serve's wire format
 * (src/serve/api*.c) on known model outputs: <tool_call> blocks at the
 * start of the text become OpenAI tool_calls (several, with the text after
 * them as content) only when each is a call of one of the request's tools
 * valid against its parameters; anything else stays text; the streamed
 * form (one tool_calls delta with the finish) and the hold-back rule
 * while a stream may still turn into calls. A random model never writes
 * such blocks, so the HTTP tests (t_serve_structured.sh) cannot show this.
 */
#include "check.h"
#include "serve/serve.h"
#include "infer/grammar.h"

#include <stdlib.h>
#include <string.h>

static kiln_ctx *ctx;
static kiln_tokenizer *tok;
static kiln_config cfg;
static api_model model;

static const char *body =
    "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":["
    "{\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"parameters\":{\"type\":\"object\","
    "\"properties\":{\"city\":{\"type\":\"string\"},\"unit\":{\"enum\":[\"c\",\"f\"]}},\"required\":[\"city\"]}}},"
    "{\"type\":\"function\",\"function\":{\"name\":\"get_time\",\"parameters\":{\"type\":\"object\","
    "\"properties\":{\"tz\":{\"enum\":[\"UTC\",\"CET\"]}},\"required\":[\"tz\"]}}}]}";

/* The non-streamed response to the request above when the model wrote
 * text (finish "stop"), parsed. */
static json_t *respond(const char *text)
{
    api_req q;
    api_err e;
    CHECK_EQ(api_parse(body, strlen(body), true, &model, &q, &e), 0);
    if (!q.rs) return NULL;
    CHECK(q.tool_auto != NULL && !q.tool_call && q.rs[0]->gram == NULL);
    sreq *r = q.rs[0];
    r->text = strdup(text);
    r->text_len = strlen(text);
    r->finish = "stop";
    r->state = SREQ_DONE;
    char *s = api_response(&q, &model, "chatcmpl-00ff", 1);
    json_t *o = s ? json_loads(s, 0, NULL) : NULL;
    free(s);
    api_req_free(&q);
    return o;
}

static json_t *message(json_t *o) { return json_object_get(json_array_get(json_object_get(o, "choices"), 0), "message"); }
static const char *finish(json_t *o)
{
    return json_string_value(json_object_get(json_array_get(json_object_get(o, "choices"), 0), "finish_reason"));
}

static void test_calls(void)
{
    json_t *o = respond("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>");
    json_t *m = message(o), *tc = json_object_get(m, "tool_calls");
    CHECK(json_is_null(json_object_get(m, "content")));
    CHECK(!strcmp(finish(o), "tool_calls"));
    CHECK_EQ((int)json_array_size(tc), 1);
    json_t *c0 = json_array_get(tc, 0), *fn = json_object_get(c0, "function");
    CHECK(!strcmp(json_string_value(json_object_get(c0, "type")), "function"));
    CHECK(!strncmp(json_string_value(json_object_get(c0, "id")), "call_", 5));
    CHECK(!strcmp(json_string_value(json_object_get(fn, "name")), "get_weather"));
    CHECK(!strcmp(json_string_value(json_object_get(fn, "arguments")), "{\"city\":\"Oslo\"}"));
    json_decref(o);

    /* two calls, then text: the text is the content */
    o = respond("  <tool_call>{\"name\":\"get_time\",\"arguments\":{\"tz\":\"CET\"}}</tool_call>\n"
                "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\", \"unit\": \"c\"}}\n</tool_call>\ndone");
    m = message(o);
    tc = json_object_get(m, "tool_calls");
    CHECK_EQ((int)json_array_size(tc), 2);
    CHECK(!strcmp(json_string_value(json_object_get(json_object_get(json_array_get(tc, 1), "function"), "name")), "get_weather"));
    CHECK(json_is_string(json_object_get(m, "content")) &&
          !strcmp(json_string_value(json_object_get(m, "content")), "done"));
    CHECK(strcmp(json_string_value(json_object_get(json_array_get(tc, 0), "id")),
                 json_string_value(json_object_get(json_array_get(tc, 1), "id"))) != 0);
    json_decref(o);
}

static void test_text(void)
{
    const char *texts[] = {
        "Hello there.",
        /* invalid against the parameters: city is required */
        "<tool_call>{\"name\":\"get_weather\",\"arguments\":{\"unit\":\"c\"}}</tool_call>",
        "<tool_call>{\"name\":\"get_time\",\"arguments\":{\"tz\":\"PST\"}}</tool_call>",
        /* not a tool */
        "<tool_call>{\"name\":\"rm_rf\",\"arguments\":{}}</tool_call>",
        /* not JSON, not closed, arguments not an object */
        "<tool_call>{\"name\":\"get_time\",</tool_call>",
        "<tool_call>{\"name\":\"get_time\",\"arguments\":{\"tz\":\"UTC\"}}",
        "<tool_call>{\"name\":\"get_time\",\"arguments\":\"{\\\"tz\\\":\\\"UTC\\\"}\"}</tool_call>",
        /* calls only at the start */
        "Sure. <tool_call>{\"name\":\"get_time\",\"arguments\":{\"tz\":\"UTC\"}}</tool_call>",
        /* one good call and one bad: all text */
        "<tool_call>{\"name\":\"get_time\",\"arguments\":{\"tz\":\"UTC\"}}</tool_call><tool_call>{}</tool_call>",
    };
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) {
        json_t *o = respond(texts[i]);
        json_t *m = message(o);
        CHECK_MSG(!json_object_get(m, "tool_calls") && !strcmp(finish(o), "stop") &&
                      !strcmp(json_string_value(json_object_get(m, "content")), texts[i]),
                  "%s", texts[i]);
        json_decref(o);
    }
}

static void test_stream(void)
{
    sreq r = {0};
    const char *hold[] = {"", "  ", "<", " <tool_ca", "<tool_call>", "<tool_call>{\"name\""};
    const char *go[] = {"H", "<x", " <tool_cb", "\n\nHello <tool_call>"};
    for (size_t i = 0; i < sizeof hold / sizeof *hold; i++) {
        r.text = (char *)hold[i];
        r.text_len = strlen(hold[i]);
        CHECK_MSG(api_auto_hold(&r), "'%s' should be held", hold[i]);
    }
    for (size_t i = 0; i < sizeof go / sizeof *go; i++) {
        r.text = (char *)go[i];
        r.text_len = strlen(go[i]);
        CHECK_MSG(!api_auto_hold(&r), "'%s' should stream", go[i]);
    }
    /* the finish event carries the calls */
    api_req q;
    api_err e;
    CHECK_EQ(api_parse(body, strlen(body), true, &model, &q, &e), 0);
    const char *t = "<tool_call>{\"name\":\"get_time\",\"arguments\":{\"tz\":\"UTC\"}}</tool_call>";
    q.rs[0]->text = strdup(t);
    q.rs[0]->text_len = strlen(t);
    q.rs[0]->finish = "stop";
    char *ev = api_chunk(&q, 0, &model, "chatcmpl-00ff", 1, "", 0, 0, 0, "stop", false, false);
    CHECK(ev && !strncmp(ev, "data: ", 6));
    json_t *o = ev ? json_loads(ev + 6, 0, NULL) : NULL;
    json_t *ch = json_array_get(json_object_get(o, "choices"), 0);
    json_t *d = json_array_get(json_object_get(json_object_get(ch, "delta"), "tool_calls"), 0);
    CHECK(!strcmp(json_string_value(json_object_get(ch, "finish_reason")), "tool_calls"));
    CHECK_EQ((int)json_integer_value(json_object_get(d, "index")), 0);
    CHECK(!strcmp(json_string_value(json_object_get(json_object_get(d, "function"), "arguments")),
                  "{\"tz\":\"UTC\"}"));
    json_decref(o);
    free(ev);
    api_req_free(&q);
}

int main(void)
{
    ctx = kiln_ctx_new();
    CHECK(kiln_tokenizer_load(ctx, "bytes", &tok) == KILN_OK);
    cfg = kiln_config_default();
    cfg.vocab_size = 257;
    cfg.bos_token_id = -1;
    model = (api_model){.name = "m", .tok = tok, .n_ctx = 4096, .cfg = &cfg, .vocab = 257};
    RUN_TEST(test_calls);
    RUN_TEST(test_text);
    RUN_TEST(test_stream);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
    return TEST_EXIT();
}
