/*
 * test_jinja.c — chat templates: well-known Hugging Face templates
 * (Qwen2/ChatML, Llama 3, Zephyr, Llama 2/Mistral with a system branch and
 * raise_exception, Gemma) rendered against hand-written expected strings; bad
 * templates refused with line and column; the loss mask following each
 * assistant message's rendered span; tokenizer_config.json read beside
 * tokenizer.json.
 */
#include "check.h"
#include "kiln.h"
#include "testdata.h"
#include "tokenizer/jinja.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static const char *QWEN2 =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

static const char *LLAMA3 =
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}";

static const char *ZEPHYR =
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}";

static const char *LLAMA2 =
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}";

static const char *GEMMA =
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}";

/* Renders src with msgs; returns the malloc'ed text or NULL (message in
 * ctx). */
static char *render(kiln_ctx *ctx, const char *src, const kiln_chat_msg *m, int n, bool gen,
                    const char *bos, const char *eos)
{
    jinja_tmpl *t = NULL;
    kiln_status s = jinja_parse(ctx, src, strlen(src), &t);
    if (s) return NULL;
    char *out = NULL;
    size_t len = 0;
    s = jinja_render(ctx, t, m, n, gen, bos, eos, &out, &len);
    jinja_free(t);
    if (!s) CHECK_EQ(len, strlen(out));
    return s ? NULL : out;
}

static void expect(const char *src, const kiln_chat_msg *m, int n, bool gen, const char *bos,
                   const char *eos, const char *want)
{
    kiln_ctx *ctx = kiln_ctx_new();
    char *got = render(ctx, src, m, n, gen, bos, eos);
    CHECK_MSG(got, "%s", kiln_errmsg(ctx));
    if (got) CHECK_STREQ(got, want);
    free(got);
    kiln_ctx_free(ctx);
}

static void expect_err(const char *src, const kiln_chat_msg *m, int n, const char *needle)
{
    kiln_ctx *ctx = kiln_ctx_new();
    char *got = render(ctx, src, m, n, false, "", "");
    CHECK_MSG(!got, "rendered '%s'", got ? got : "");
    CHECK_MSG(strstr(kiln_errmsg(ctx), needle), "message '%s' lacks '%s'", kiln_errmsg(ctx),
              needle);
    free(got);
    kiln_ctx_free(ctx);
}

static const kiln_chat_msg SUA[] = {
    {"system", "S", 0}, {"user", "U", 0}, {"assistant", "A", 0}};
static const kiln_chat_msg UA[] = {{"user", " hi ", 0}, {"assistant", "yo", 0}};

static void test_qwen2(void)
{
    expect(QWEN2, SUA, 3, false, NULL, NULL,
           "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
           "<|im_start|>assistant\nA<|im_end|>\n");
    /* no system message: the default one; the generation prompt */
    expect(QWEN2, SUA + 1, 1, true, NULL, NULL,
           "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
           "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n");
}

static void test_llama3(void)
{
    expect(LLAMA3, UA, 2, false, "<|begin_of_text|>", "<|eot_id|>",
           "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>");
    expect(LLAMA3, UA, 1, true, "<B>", "",
           "<B><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
           "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

static void test_zephyr(void)
{
    /* trim_blocks and lstrip_blocks: the block tags leave no newlines */
    expect(ZEPHYR, SUA, 3, false, "<s>", "</s>",
           "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\nA</s>\n");
    expect(ZEPHYR, SUA + 1, 1, true, "<s>", "</s>", "<|user|>\nU</s>\n<|assistant|>\n");
}

static void test_llama2_system_and_raise(void)
{
    const kiln_chat_msg m[] = {{"system", "SYS", 0}, {"user", "hi", 0},
                               {"assistant", " yo ", 0}, {"user", "more", 0}};
    expect(LLAMA2, m, 4, false, "<s>", "</s>",
           "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nhi [/INST] yo </s><s>[INST] more [/INST]");
    expect(LLAMA2, m + 1, 2, false, "<s>", "</s>", "<s>[INST] hi [/INST] yo </s>");
    const kiln_chat_msg bad[] = {{"user", "a", 0}, {"user", "b", 0}};
    expect_err(LLAMA2, bad, 2,
               "chat template raised an error: Conversation roles must alternate "
               "user/assistant/user/assistant/...");
}

static void test_gemma(void)
{
    expect(GEMMA, UA, 2, false, "<bos>", "<eos>",
           "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nyo<end_of_turn>\n");
    expect(GEMMA, UA, 1, true, "<bos>", "<eos>",
           "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n");
    expect_err(GEMMA, SUA, 3, "chat template raised an error: System role not supported");
}

static void test_expressions(void)
{
    const kiln_chat_msg m[] = {{"user", "Hello", 0}, {"assistant", "x", 0}};
    expect("{{ messages | length }}|{{ messages[-1].role }}|{{ 'a' ~ (1 + 2) }}|"
           "{{ 7 // 2 }}{{ 7 % 3 }}|{{ 'ell' in messages[0].content }}|"
           "{{ messages[0].content[1:3] }}|{{ foo is defined }}{{ messages is not none }}|"
           "{{ 'y' if not foo else 'n' }}|{{ (messages | first).content | upper }}|"
           "{% set ns = namespace(n=0) %}{% for x in messages if x.role != 'user' %}"
           "{% set ns.n = ns.n + loop.length %}{% endfor %}{{ ns.n }}|"
           "{%- if false %}no{% elif 1 < 2 and 'b' >= 'a' %}yes{% else %}no{% endif -%}  |"
           "{# a comment #}{{ ' t '.strip() ~ 'z'.startswith('z') }}|{{ undefined_var }}|"
           "{{ '\"q\"' | tojson }}",
           m, 2, false, "", "",
           "2|assistant|a3|31|True|el|FalseTrue|y|HELLO|1|yes|tTrue||\"\\\"q\\\"\"");
    /* whitespace control on both sides, and loop.first / loop.last */
    expect("{% for m in messages -%}\n   [{{ loop.index }}{{ '^' if loop.first }}"
           "{{ '$' if loop.last }}]   \n  {%- endfor %}",
           m, 2, false, "", "", "[1^][2$]");
}

static void test_bad_templates(void)
{
    const kiln_chat_msg m[] = {{"user", "a", 0}};
    expect_err("{% for m in messages %}{{ m.content }}", m, 1,
               "line 1 col 4: '{% for %}' is never closed by '{% endfor %}'");
    expect_err("x\n  {{ m.content | bogus }}", m, 1, "line 2 col 18: unknown filter 'bogus'");
    expect_err("ok {{ messages[0]", m, 1, "line 1 col 4: unclosed '{{'");
    expect_err("{% if x %}a{% endfor %}", m, 1, "'{% endfor %}' without an open block");
    expect_err("{% macro f() %}{% endmacro %}", m, 1, "line 1 col 4: unknown tag '{% macro %}'");
    expect_err("{{ 'unterminated }}", m, 1, "line 1 col 1: unclosed '{{'");
    expect_err("{{ messages + 1 }}", m, 1, "line 1 col 13: '+' cannot combine a list and a number");
    expect_err("{{ messages[0].content.bogus() }}", m, 1, "unknown method 'bogus' of a string");
}

/* The bytes of the masked ids (bytes tokenizer: id = byte). */
static void masked_text(const int32_t *ids, const uint8_t *mask, size_t n, char *out, size_t cap)
{
    size_t k = 0;
    for (size_t i = 0; i < n && k + 1 < cap; i++)
        if (mask[i]) out[k++] = ids[i] < 256 ? (char)ids[i] : '#';
    out[k] = 0;
}

static void test_mask_follows_template(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer *tok;
    CHECK_EQ(kiln_tokenizer_load(ctx, "bytes", &tok), KILN_OK);
    CHECK(kiln_tokenizer_chat_template(tok) == NULL);
    const kiln_chat_msg m[] = {{"user", "hi", 0}, {"assistant", "yo", 0},
                               {"user", "more", 0}, {"assistant", "ok", 0}};
    int32_t *ids;
    uint8_t *mask;
    size_t n;
    char got[256];
    struct {
        const char *tmpl, *want;
    } cases[] = {
        /* the turn's end marker is learned, the newline after it is not */
        {ZEPHYR, "yo</s>ok</s>"},
        {LLAMA3, "yo<|eot_id|>ok<|eot_id|>"},
        {QWEN2, "yo<|im_end|>ok<|im_end|>"},
        {GEMMA, "yo<end_of_turn>ok<end_of_turn>"},
        /* the generation prompt is not what the turn renders as: the
         * content alone, found in the text */
        {"{% for m in messages %}<{{ m.role }}>{{ m.content }};{% endfor %}"
         "{% if add_generation_prompt %}<ASSISTANT>{% endif %}", "yook"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        CHECK_EQ(kiln_tokenizer_set_chat_template(ctx, tok, cases[c].tmpl, "<s>", "</s>"), KILN_OK);
        CHECK_EQ(kiln_chat_render(ctx, tok, m, 4, false, &ids, &mask, &n), KILN_OK);
        masked_text(ids, mask, n, got, sizeof got);
        CHECK_STREQ(got, cases[c].want);
        free(ids);
        free(mask);
    }
    /* a template that raises fails the render with its message */
    CHECK_EQ(kiln_tokenizer_set_chat_template(ctx, tok, LLAMA2, "<s>", "</s>"), KILN_OK);
    const kiln_chat_msg bad[] = {{"assistant", "a", 0}};
    CHECK_EQ(kiln_chat_render(ctx, tok, bad, 1, false, &ids, &mask, &n), KILN_ERR_INVALID_ARG);
    CHECK(strstr(kiln_errmsg(ctx), "Conversation roles must alternate") != NULL);
    /* a template that does not parse is refused, the old one stays */
    CHECK_EQ(kiln_tokenizer_set_chat_template(ctx, tok, "{% if %}", NULL, NULL), KILN_ERR_FORMAT);
    CHECK(strstr(kiln_errmsg(ctx), "line 1 col 7: expected an expression") != NULL);
    CHECK_STREQ(kiln_tokenizer_chat_template(tok), LLAMA2);
    CHECK_EQ(kiln_tokenizer_set_chat_template(ctx, tok, NULL, NULL, NULL), KILN_OK);
    CHECK(kiln_tokenizer_chat_template(tok) == NULL);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    fputs(text, f);
    fclose(f);
}

static void test_tokenizer_config(void)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_tokenizer *tok;
    CHECK_EQ(kiln_tokenizer_load(ctx, "bytes", &tok), KILN_OK);
    mkdir(P("m"), 0777);
    CHECK_EQ(kiln_tokenizer_save(ctx, tok, P("m/tokenizer.json")), KILN_OK);
    kiln_tokenizer_free(tok);
    /* a list of named templates; eos_token as an AddedToken object */
    write_file(P("m/tokenizer_config.json"),
               "{\"bos_token\": \"<s>\", \"eos_token\": {\"content\": \"</s>\"},\n"
               " \"chat_template\": [{\"name\": \"tool_use\", \"template\": \"T\"},\n"
               "   {\"name\": \"default\", \"template\": \"{{ bos_token }}{% for m in messages %}"
               "{{ m.content + eos_token }}{% endfor %}\"}]}\n");
    CHECK_EQ(kiln_tokenizer_load(ctx, P("m"), &tok), KILN_OK);
    const kiln_chat_msg m[] = {{"user", "q", 0}, {"assistant", "a", 0}};
    int32_t *ids;
    uint8_t *mask;
    size_t n;
    CHECK_EQ(kiln_chat_render(ctx, tok, m, 2, false, &ids, &mask, &n), KILN_OK);
    CHECK_EQ(n, strlen("<s>q</s>a</s>"));
    char got[64];
    for (size_t i = 0; i < n && i < 63; i++) got[i] = (char)ids[i];
    got[n < 63 ? n : 63] = 0;
    CHECK_STREQ(got, "<s>q</s>a</s>");
    masked_text(ids, mask, n, got, sizeof got);
    CHECK_STREQ(got, "a</s>");
    free(ids);
    free(mask);
    kiln_tokenizer_free(tok);
    /* through a tokenizer.json path too; a broken template names the file */
    write_file(P("m/tokenizer_config.json"), "{\"chat_template\": \"{{ x | nope }}\"}");
    CHECK_EQ(kiln_tokenizer_load(ctx, P("m/tokenizer.json"), &tok), KILN_ERR_FORMAT);
    CHECK_MSG(strstr(kiln_errmsg(ctx), "tokenizer_config.json: \"chat_template\": chat template "
                                       "line 1 col 8: unknown filter 'nope'"),
              "%s", kiln_errmsg(ctx));
    /* an SFT dataset's loss mask follows the template */
    write_file(P("m/tokenizer_config.json"),
               "{\"eos_token\": \"</s>\", \"chat_template\": \"{% for m in messages %}"
               "<{{ m.role }}>{{ m.content }}{{ eos_token }}\\n{% endfor %}\"}");
    CHECK_EQ(kiln_tokenizer_load(ctx, P("m"), &tok), KILN_OK);
    write_file(P("d.jsonl"), "{\"messages\":[{\"role\":\"user\",\"content\":\"hello\"},"
                             "{\"role\":\"assistant\",\"content\":\"abc\"}]}\n");
    kiln_dataset *ds = NULL;
    kiln_dataset_opts o = kiln_dataset_opts_default();
    CHECK_EQ(kiln_dataset_load(ctx, tok, P("d.jsonl"), KILN_DATASET_SFT, &o, &ds), KILN_OK);
    if (ds) {
        kiln_dataset_stats st;
        kiln_dataset_get_stats(ds, &st);
        CHECK_EQ(st.tokens, (long long)strlen("<user>hello</s>\n<assistant>abc</s>\n"));
        CHECK_EQ(st.loss_tokens, (long long)strlen("abc</s>"));
    }
    kiln_dataset_free(ds);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
}

int main(void)
{
    const char *base = getenv("KILN_TMP");
    snprintf(test_tmp, sizeof test_tmp, "%s/test_jinja.XXXXXX", base ? base : "/tmp");
    if (!mkdtemp(test_tmp)) return 1;
    RUN_TEST(test_qwen2);
    RUN_TEST(test_llama3);
    RUN_TEST(test_zephyr);
    RUN_TEST(test_llama2_system_and_raise);
    RUN_TEST(test_gemma);
    RUN_TEST(test_expressions);
    RUN_TEST(test_bad_templates);
    RUN_TEST(test_mask_follows_template);
    RUN_TEST(test_tokenizer_config);
    if (!getenv("KILN_KEEP_TMP")) {
        char cmd[600];
        snprintf(cmd, sizeof cmd, "rm -rf %s", test_tmp);
        if (system(cmd) != 0) return 1;
    }
    return TEST_EXIT();
}
