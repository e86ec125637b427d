/*
 * tok_json.c — tokenizer files: Hugging Face tokenizer.json (model type
 * BPE with a byte-level pre-tokenizer, added/special tokens) in both
 * directions, and GPT-2's encoder.json + vocab.bpe.
 *
 * Parts of a tokenizer.json that kiln does not interpret (the normalizer:
 * null, or NFC as Qwen2's, applied by bpe.c; decoder, truncation,
 * padding, model options) are kept and written back unchanged, so a
 * load/save round trip preserves the file's meaning. The post_processor
 * is kept so too, and its "single" template read (parse_post): the ids
 * Hugging Face adds around a text with add_special_tokens=True (Llama 3's
 * <|begin_of_text|>; kiln_tokenizer_encode_add_special, kiln_prompt_ids). What
 * kiln cannot honour exactly (another normalizer, a
 * non-byte-level model, byte fallback, subword prefixes) is rejected with a
 * message naming the field, never silently approximated.
 */
#include "tokenizer/tok_internal.h"

#include <stdlib.h>
#include <string.h>

#define MAX_VOCAB (1 << 24)

static char *bl_quote(const char *s)
{
    static __thread char q[80];
    size_t n = strlen(s);
    snprintf(q, sizeof q, "%.*s%s", (int)(n > 60 ? 60 : n), s, n > 60 ? "..." : "");
    return q;
}

/* Resolves one side of a merge (a byte-level string) to its id. */
static kiln_status merge_side(kiln_ctx *ctx, const kiln_tokenizer *t,
                              const char *s, size_t n, const char *what,
                              size_t idx, int32_t *id)
{
    char *raw;
    size_t rn;
    if (!tok_bl_to_bytes(s, n, &raw, &rn))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: merge %zu: \"%s\" is not a byte-level token", what,
                         idx, bl_quote(s));
    *id = rn ? tok_lookup(t, raw, rn) : -1;
    free(raw);
    if (*id < 0)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: merge %zu refers to \"%s\", which is not in the "
                         "vocabulary", what, idx, bl_quote(s));
    return KILN_OK;
}

static kiln_status parse_merges(kiln_ctx *ctx, kiln_tokenizer *t,
                                const json_t *merges, const char *what)
{
    size_t n = json_array_size(merges);
    int32_t *L = malloc((n + 1) * sizeof *L), *R = malloc((n + 1) * sizeof *R);
    if (!L || !R) {
        free(L);
        free(R);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    kiln_status s = KILN_OK;
    for (size_t i = 0; i < n && !s; i++) {
        const json_t *m = json_array_get(merges, i);
        const char *a, *b;
        size_t an, bn;
        if (json_is_string(m)) {
            const char *str = json_string_value(m);
            const char *sp = strchr(str, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                s = kiln_fail(ctx, KILN_ERR_FORMAT,
                              "%s: model.merges[%zu] \"%s\" is not two tokens "
                              "separated by one space", what, i, bl_quote(str));
                break;
            }
            a = str;
            an = (size_t)(sp - str);
            b = sp + 1;
            bn = strlen(b);
        } else if (json_is_array(m) && json_array_size(m) == 2 &&
                   json_is_string(json_array_get(m, 0)) &&
                   json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            an = json_string_length(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            bn = json_string_length(json_array_get(m, 1));
        } else {
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: model.merges[%zu] must be a string \"a b\" or a "
                          "pair [\"a\", \"b\"]", what, i);
            break;
        }
        s = merge_side(ctx, t, a, an, what, i, &L[i]);
        if (!s) s = merge_side(ctx, t, b, bn, what, i, &R[i]);
    }
    if (s) {
        free(L);
        free(R);
        return s;
    }
    return tok_set_merges(ctx, t, (int32_t)n, L, R, what);
}

static kiln_status parse_pre(kiln_ctx *ctx, kiln_tokenizer *t,
                             const json_t *pre, const char *what)
{
    const char *type = json_string_value(json_object_get(pre, "type"));
    if (type && !strcmp(type, "ByteLevel")) {
        json_t *ur = json_object_get(pre, "use_regex");
        if (ur && json_is_false(ur))
            return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                             "%s: pre_tokenizer ByteLevel with use_regex false "
                             "and no Split is not supported", what);
        t->add_prefix_space = json_is_true(json_object_get(pre, "add_prefix_space"));
        t->pre = TOK_PRE_BYTELEVEL;
        return tok_set_pattern(ctx, t, TOK_PATTERN_HF_GPT2);
    }
    if (type && !strcmp(type, "Sequence")) {
        const json_t *l = json_object_get(pre, "pretokenizers");
        const json_t *sp = json_array_get(l, 0), *bl = json_array_get(l, 1);
        const char *t0 = json_string_value(json_object_get(sp, "type"));
        const char *t1 = json_string_value(json_object_get(bl, "type"));
        const char *beh = json_string_value(json_object_get(sp, "behavior"));
        const char *rx = json_string_value(
            json_object_get(json_object_get(sp, "pattern"), "Regex"));
        if (json_array_size(l) == 2 && t0 && !strcmp(t0, "Split") && t1 &&
            !strcmp(t1, "ByteLevel") && rx && beh && !strcmp(beh, "Isolated") &&
            !json_is_true(json_object_get(sp, "invert")) &&
            json_is_false(json_object_get(bl, "use_regex"))) {
            t->add_prefix_space = json_is_true(json_object_get(bl, "add_prefix_space"));
            t->pre = TOK_PRE_SPLIT;
            kiln_status s = tok_set_pattern(ctx, t, rx);
            if (s)
                return kiln_fail(ctx, s, "%s: pre_tokenizer Split pattern: %s", what,
                                 kiln_errmsg(ctx));
            return KILN_OK;
        }
    }
    return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                     "%s: pre_tokenizer must be ByteLevel, or a Sequence of "
                     "Split(Regex, Isolated) and ByteLevel(use_regex false) "
                     "(the GPT-2 and Llama-3 layouts); kiln supports byte-level BPE "
                     "only", what);
}

/* The id of special token `name` of a TemplateProcessing: its entry in
 * "special_tokens" (one id), else the vocabulary's special or added token
 * of that text. */
static kiln_status post_id(kiln_ctx *ctx, const kiln_tokenizer *t, const json_t *specials,
                           const char *name, const char *what, int32_t *id)
{
    const json_t *e = json_object_get(specials, name);
    if (e) {
        const json_t *ids = json_object_get(e, "ids");
        if (!json_is_array(ids) || json_array_size(ids) != 1 ||
            !json_is_integer(json_array_get(ids, 0)))
            return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                             "%s: post_processor.special_tokens[\"%s\"].ids must be one "
                             "integer id", what, bl_quote(name));
        json_int_t v = json_integer_value(json_array_get(ids, 0));
        if (v < 0 || v >= t->n_vocab)
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: post_processor.special_tokens[\"%s\"] id %lld is outside "
                             "the vocabulary of %d", what, bl_quote(name), (long long)v,
                             t->n_vocab);
        *id = (int32_t)v;
        return KILN_OK;
    }
    *id = kiln_tokenizer_special_id(t, name);
    if (*id < 0)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: post_processor: special token \"%s\" is neither in its "
                         "special_tokens nor an added token", what, bl_quote(name));
    return KILN_OK;
}

static kiln_status post_push(kiln_ctx *ctx, kiln_tokenizer *t, bool after, int32_t id,
                             const char *what)
{
    int *n = after ? &t->n_post_suf : &t->n_post_pre;
    if (*n == TOK_POST_MAX)
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                         "%s: post_processor adds more than %d tokens on one side", what,
                         TOK_POST_MAX);
    (after ? t->post_suf : t->post_pre)[(*n)++] = id;
    return KILN_OK;
}

/* One post-processor (Hugging Face tokenizers' processors): ByteLevel
 * changes offsets only; TemplateProcessing's "single" is SpecialToken and
 * Sequence "A" items; BertProcessing / RobertaProcessing add cls before
 * and sep after; Sequence applies its processors in order. */
static kiln_status parse_post(kiln_ctx *ctx, kiln_tokenizer *t, const json_t *pp,
                              const char *what, int depth)
{
    if (!pp || json_is_null(pp)) return KILN_OK;
    const char *type = json_string_value(json_object_get(pp, "type"));
    if (!type)
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: post_processor has no \"type\"", what);
    if (!strcmp(type, "ByteLevel")) return KILN_OK;
    if (!strcmp(type, "Sequence") && depth == 0) {
        const json_t *list = json_object_get(pp, "processors");
        if (!json_is_array(list))
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: post_processor Sequence has no \"processors\" list", what);
        for (size_t i = 0; i < json_array_size(list); i++) {
            kiln_status s = parse_post(ctx, t, json_array_get(list, i), what, 1);
            if (s) return s;
        }
        return KILN_OK;
    }
    kiln_status s;
    if (!strcmp(type, "BertProcessing") || !strcmp(type, "RobertaProcessing")) {
        const json_t *cls = json_object_get(pp, "cls"), *sep = json_object_get(pp, "sep");
        const json_t *ci = json_array_get(cls, 1), *si = json_array_get(sep, 1);
        if (!json_is_integer(ci) || !json_is_integer(si) ||
            json_integer_value(ci) < 0 || json_integer_value(ci) >= t->n_vocab ||
            json_integer_value(si) < 0 || json_integer_value(si) >= t->n_vocab)
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: post_processor %s: \"cls\" and \"sep\" must be [token, id] "
                             "with an id in the vocabulary", what, type);
        t->has_post = true;
        if ((s = post_push(ctx, t, false, (int32_t)json_integer_value(ci), what)) ||
            (s = post_push(ctx, t, true, (int32_t)json_integer_value(si), what)))
            return s;
        return KILN_OK;
    }
    if (strcmp(type, "TemplateProcessing"))
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                         "%s: post_processor.type \"%s\" is not supported (kiln reads "
                         "ByteLevel, TemplateProcessing, BertProcessing, RobertaProcessing "
                         "and a Sequence of them)", what, bl_quote(type));
    const json_t *single = json_object_get(pp, "single");
    const json_t *specials = json_object_get(pp, "special_tokens");
    if (!json_is_array(single))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: post_processor TemplateProcessing has no \"single\" list", what);
    t->has_post = true;
    bool seen_a = false;
    for (size_t i = 0; i < json_array_size(single); i++) {
        const json_t *it = json_array_get(single, i);
        const json_t *sp = json_object_get(it, "SpecialToken");
        const json_t *sq = json_object_get(it, "Sequence");
        const char *id = json_string_value(json_object_get(sp ? sp : sq, "id"));
        if (!id || (sq && (strcmp(id, "A") || seen_a)))
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: post_processor.single[%zu] must be {\"SpecialToken\": "
                             "{\"id\": TOKEN}} or the one {\"Sequence\": {\"id\": \"A\"}}",
                             what, i);
        if (sq) {
            seen_a = true;
            continue;
        }
        int32_t v = -1;
        if ((s = post_id(ctx, t, specials, id, what, &v)) ||
            (s = post_push(ctx, t, seen_a, v, what)))
            return s;
    }
    if (!seen_a)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: post_processor.single has no {\"Sequence\": {\"id\": \"A\"}}",
                         what);
    return KILN_OK;
}

kiln_status tok_load_hf_json(kiln_ctx *ctx, const json_t *root, const char *what,
                             kiln_tokenizer **out)
{
    *out = NULL;
    if (!json_is_object(root))
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: not a JSON object", what);
    const json_t *model = json_object_get(root, "model");
    if (!json_is_object(model))
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: required field \"model\" is missing", what);
    const char *mtype = json_string_value(json_object_get(model, "type"));
    if (mtype && strcmp(mtype, "BPE") != 0)
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                         "%s: model.type is \"%s\"; kiln supports byte-level BPE "
                         "tokenizers only", what, mtype);
    if (json_is_true(json_object_get(model, "byte_fallback")))
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                         "%s: model.byte_fallback is true (a SentencePiece-style "
                         "BPE); kiln supports byte-level BPE only", what);
    static const char *strs[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        const char *v = json_string_value(json_object_get(model, strs[i]));
        if (v && *v)
            return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                             "%s: model.%s \"%s\" is not supported (byte-level BPE "
                             "has none)", what, strs[i], v);
    }
    const json_t *norm = json_object_get(root, "normalizer");
    bool nfc = false;
    if (norm && !json_is_null(norm)) {
        const char *nt = json_string_value(json_object_get(norm, "type"));
        if (!nt || strcmp(nt, "NFC"))
            return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                             "%s: normalizer \"%s\" is not supported; kiln supports "
                             "byte-level BPE without a normalizer (null) or with NFC "
                             "(Qwen2's)", what, nt ? nt : "(no type)");
        if (!tok_nfc_available())
            return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                             "%s: normalizer NFC needs Unicode tables this build lacks "
                             "(rebuild kiln with ICU: apt-get install libicu-dev)", what);
        nfc = true;
    }
    const json_t *vocab = json_object_get(model, "vocab");
    const json_t *merges = json_object_get(model, "merges");
    if (!json_is_object(vocab))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: required field \"model.vocab\" is missing or not an object", what);
    if (!json_is_array(merges))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: required field \"model.merges\" is missing or not an array", what);
    const json_t *added = json_object_get(root, "added_tokens");
    if (added && !json_is_null(added) && !json_is_array(added))
        return kiln_fail(ctx, KILN_ERR_FORMAT, "%s: \"added_tokens\" must be an array", what);

    /* id space */
    int64_t maxid = -1;
    const char *key;
    json_t *v;
    json_object_foreach((json_t *)vocab, key, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) >= MAX_VOCAB)
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: model.vocab[\"%s\"] must be an id in 0..%d", what,
                             bl_quote(key), MAX_VOCAB - 1);
        if (json_integer_value(v) > maxid) maxid = json_integer_value(v);
    }
    size_t ai;
    json_array_foreach(added, ai, v) {
        const json_t *id = json_object_get(v, "id");
        const json_t *c = json_object_get(v, "content");
        if (!json_is_integer(id) || json_integer_value(id) < 0 ||
            json_integer_value(id) >= MAX_VOCAB || !json_is_string(c) ||
            json_string_length(c) == 0)
            return kiln_fail(ctx, KILN_ERR_FORMAT,
                             "%s: added_tokens[%zu] needs an \"id\" in 0..%d and a "
                             "non-empty \"content\"", what, ai, MAX_VOCAB - 1);
        if (json_integer_value(id) > maxid) maxid = json_integer_value(id);
    }
    kiln_tokenizer *t = tok_new(ctx, (int32_t)(maxid + 1));
    if (!t) return KILN_ERR_NOMEM;
    kiln_status s = KILN_OK;
    t->name = strdup(what);
    t->nfc = nfc;
    /* added tokens first: their content is literal text */
    json_array_foreach(added, ai, v) {
        int32_t id = (int32_t)json_integer_value(json_object_get(v, "id"));
        const json_t *c = json_object_get(v, "content");
        if (!(t->flags[id] & TOKF_HOLE)) {
            s = kiln_fail(ctx, KILN_ERR_FORMAT, "%s: added_tokens: id %d appears twice",
                          what, id);
            break;
        }
        bool special = json_is_true(json_object_get(v, "special"));
        const json_t *inv = json_object_get(vocab, json_string_value(c));
        uint8_t fl = (uint8_t)((special ? TOKF_SPECIAL : TOKF_ADDED) |
                               (inv ? 0 : TOKF_NOTVOCAB));
        if (inv && json_integer_value(inv) != id) {
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: added token \"%s\" has id %d but model.vocab gives it %d",
                          what, bl_quote(json_string_value(c)), id,
                          (int)json_integer_value(inv));
            break;
        }
        s = tok_set(ctx, t, id, json_string_value(c), json_string_length(c), fl);
        if (s) break;
    }
    if (!s)
        json_object_foreach((json_t *)vocab, key, v) {
            int32_t id = (int32_t)json_integer_value(v);
            if (!(t->flags[id] & TOKF_HOLE)) {
                if (t->flags[id] & (TOKF_SPECIAL | TOKF_ADDED)) {
                    size_t kl = strlen(key);
                    if (kl == t->len[id] && !memcmp(key, t->blob + t->off[id], kl)) continue;
                }
                s = kiln_fail(ctx, KILN_ERR_FORMAT,
                              "%s: id %d is given to two tokens (one is \"%s\"); "
                              "every id must name exactly one token", what, id,
                              bl_quote(key));
                break;
            }
            char *raw;
            size_t rn;
            if (!tok_bl_to_bytes(key, strlen(key), &raw, &rn) || rn == 0) {
                s = kiln_fail(ctx, KILN_ERR_FORMAT,
                              "%s: model.vocab token \"%s\" (id %d) is not a byte-level "
                              "token; kiln supports byte-level BPE only", what,
                              bl_quote(key), id);
                break;
            }
            s = tok_set(ctx, t, id, raw, rn, 0);
            free(raw);
            if (s) break;
        }
    if (!s) {
        const json_t *pre = json_object_get(root, "pre_tokenizer");
        if (!pre || json_is_null(pre))
            s = kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                          "%s: pre_tokenizer is null; kiln supports byte-level BPE "
                          "(pre_tokenizer ByteLevel)", what);
        else s = parse_pre(ctx, t, pre, what);
    }
    if (!s) {
        t->ignore_merges = json_is_true(json_object_get(model, "ignore_merges"));
        s = tok_finish_vocab(ctx, t, what);
    }
    if (!s) s = parse_merges(ctx, t, merges, what);
    if (!s) s = parse_post(ctx, t, json_object_get(root, "post_processor"), what, 0);
    if (!s) {
        /* keep the rest for saving */
        t->hf_extra = json_deep_copy(root);
        if (!t->hf_extra) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        else {
            json_object_del(t->hf_extra, "added_tokens");
            json_t *m = json_object_get(t->hf_extra, "model");
            json_object_del(m, "vocab");
            json_object_del(m, "merges");
        }
    }
    if (s) {
        kiln_tokenizer_free(t);
        return s;
    }
    *out = t;
    return KILN_OK;
}

kiln_status tok_load_hf(kiln_ctx *ctx, const char *path, kiln_tokenizer **out)
{
    json_t *root;
    *out = NULL;
    kiln_status s = js_load_file(ctx, path, &root);
    if (s) return s;
    s = tok_load_hf_json(ctx, root, path, out);
    json_decref(root);
    return s;
}

kiln_status tok_load_gpt2(kiln_ctx *ctx, const char *dir, kiln_tokenizer **out)
{
    *out = NULL;
    char *ej = file_join(dir, "encoder.json"), *vb = file_join(dir, "vocab.bpe");
    json_t *enc = NULL;
    char *bpe = NULL;
    size_t bpe_len = 0;
    kiln_tokenizer *t = NULL;
    kiln_status s = (ej && vb) ? KILN_OK : kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    if (!s) s = js_load_file(ctx, ej, &enc);
    if (!s && !json_is_object(enc))
        s = kiln_fail(ctx, KILN_ERR_FORMAT, "%s: expected an object of token -> id", ej);
    if (!s) s = file_read_all(ctx, vb, &bpe, &bpe_len);
    int64_t maxid = -1;
    const char *key;
    json_t *v;
    if (!s)
        json_object_foreach(enc, key, v) {
            if (!json_is_integer(v) || json_integer_value(v) < 0 ||
                json_integer_value(v) >= MAX_VOCAB) {
                s = kiln_fail(ctx, KILN_ERR_FORMAT, "%s: \"%s\" must map to an id in 0..%d",
                              ej, bl_quote(key), MAX_VOCAB - 1);
                break;
            }
            if (json_integer_value(v) > maxid) maxid = json_integer_value(v);
        }
    if (!s && !(t = tok_new(ctx, (int32_t)(maxid + 1)))) s = KILN_ERR_NOMEM;
    if (!s) {
        t->name = strdup(dir);
        json_object_foreach(enc, key, v) {
            int32_t id = (int32_t)json_integer_value(v);
            if (!(t->flags[id] & TOKF_HOLE)) {
                s = kiln_fail(ctx, KILN_ERR_FORMAT,
                              "%s: id %d is given to two tokens (one is \"%s\")", ej,
                              id, bl_quote(key));
                break;
            }
            char *raw;
            size_t rn;
            if (!strcmp(key, "<|endoftext|>")) {
                s = tok_set(ctx, t, id, key, strlen(key), TOKF_SPECIAL);
                t->eot = id;
            } else if (!tok_bl_to_bytes(key, strlen(key), &raw, &rn) || rn == 0) {
                s = kiln_fail(ctx, KILN_ERR_FORMAT,
                              "%s: \"%s\" (id %d) is not a byte-level token", ej,
                              bl_quote(key), id);
            } else {
                s = tok_set(ctx, t, id, raw, rn, 0);
                free(raw);
            }
            if (s) break;
        }
    }
    if (!s) s = tok_finish_vocab(ctx, t, ej);
    if (!s) {
        t->pre = TOK_PRE_BYTELEVEL;
        s = tok_set_pattern(ctx, t, TOK_PATTERN_HF_GPT2);
    }
    if (!s) {
        /* vocab.bpe: "#version" line, then "a b" per line in rank order */
        size_t cap = 1024, n = 0, lineno = 0;
        int32_t *L = malloc(cap * sizeof *L), *R = malloc(cap * sizeof *R);
        char *p = bpe, *end = bpe + bpe_len;
        while (!s && p < end) {
            char *nl = memchr(p, '\n', (size_t)(end - p));
            char *le = nl ? nl : end;
            lineno++;
            size_t ll = (size_t)(le - p);
            if (ll && p[ll - 1] == '\r') ll--;
            if (ll == 0 || (lineno == 1 && p[0] == '#')) {
                p = le + 1;
                continue;
            }
            char *sp = memchr(p, ' ', ll);
            if (!sp || memchr(sp + 1, ' ', ll - (size_t)(sp - p) - 1)) {
                s = kiln_fail(ctx, KILN_ERR_FORMAT,
                              "%s:%zu: expected two tokens separated by one space", vb,
                              lineno);
                break;
            }
            if (n == cap) {
                cap *= 2;
                int32_t *nL = realloc(L, cap * sizeof *L), *nR = realloc(R, cap * sizeof *R);
                if (nL) L = nL;
                if (nR) R = nR;
                if (!nL || !nR) { s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory"); break; }
            }
            if (!L || !R) { s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory"); break; }
            char what[64];
            snprintf(what, sizeof what, "%s", vb);
            s = merge_side(ctx, t, p, (size_t)(sp - p), vb, lineno, &L[n]);
            if (!s) s = merge_side(ctx, t, sp + 1, (size_t)(p + ll - sp - 1), vb, lineno, &R[n]);
            n++;
            p = le + 1;
        }
        if (s) {
            free(L);
            free(R);
        } else {
            s = tok_set_merges(ctx, t, (int32_t)n, L, R, vb);
        }
    }
    json_decref(enc);
    free(bpe);
    free(ej);
    free(vb);
    if (s) {
        kiln_tokenizer_free(t);
        return s;
    }
    *out = t;
    return KILN_OK;
}

static json_t *bl_string(const kiln_tokenizer *t, int32_t id)
{
    size_t n;
    char *s = tok_bytes_to_bl(t->blob + t->off[id], t->len[id], &n);
    if (!s) return NULL;
    json_t *j = json_stringn(s, n);
    free(s);
    return j;
}

json_t *tok_to_hf_json(const kiln_tokenizer *t)
{
    json_t *root = json_object();
    json_t *added = json_array(), *vocab = json_object(), *merges = json_array();
    if (!root || !added || !vocab || !merges) goto fail;
    json_object_set_new(root, "version", json_string("1.0"));
    json_object_set_new(root, "truncation", json_null());
    json_object_set_new(root, "padding", json_null());
    json_object_set(root, "added_tokens", added);
    json_object_set_new(root, "normalizer",
                        t->nfc ? json_pack("{s:s}", "type", "NFC") : json_null());
    if (t->pre == TOK_PRE_SPLIT) {
        json_t *pre = json_pack(
            "{s:s, s:[{s:s, s:{s:s}, s:s, s:b}, {s:s, s:b, s:b, s:b}]}", "type",
            "Sequence", "pretokenizers", "type", "Split", "pattern", "Regex",
            t->pattern, "behavior", "Isolated", "invert", 0, "type", "ByteLevel",
            "add_prefix_space", (int)t->add_prefix_space, "trim_offsets", 1,
            "use_regex", 0);
        json_object_set_new(root, "pre_tokenizer", pre);
    } else {
        json_object_set_new(root, "pre_tokenizer",
                            json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel",
                                      "add_prefix_space", (int)t->add_prefix_space,
                                      "trim_offsets", 1, "use_regex", 1));
    }
    json_object_set_new(root, "post_processor",
                        json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel",
                                  "add_prefix_space", 1, "trim_offsets", 0,
                                  "use_regex", 1));
    json_object_set_new(root, "decoder",
                        json_pack("{s:s, s:b, s:b, s:b}", "type", "ByteLevel",
                                  "add_prefix_space", 1, "trim_offsets", 1,
                                  "use_regex", 1));
    json_t *model = json_pack("{s:s, s:n, s:n, s:s, s:s, s:b, s:b, s:b}", "type", "BPE",
                              "dropout", "unk_token", "continuing_subword_prefix", "",
                              "end_of_word_suffix", "", "fuse_unk", 0, "byte_fallback",
                              0, "ignore_merges", (int)t->ignore_merges);
    if (!model) goto fail;
    json_object_set_new(root, "model", model);
    /* kept parts of the file this tokenizer was loaded from win */
    if (t->hf_extra) {
        const char *k;
        json_t *v;
        json_object_foreach(t->hf_extra, k, v) {
            if (!strcmp(k, "model")) {
                const char *mk;
                json_t *mv;
                json_object_foreach(v, mk, mv) json_object_set(model, mk, mv);
            } else {
                json_object_set(root, k, v);
            }
        }
    }
    for (int32_t id = 0; id < t->n_vocab; id++) {
        uint8_t f = t->flags[id];
        if (f & TOKF_HOLE) continue;
        if (f & (TOKF_SPECIAL | TOKF_ADDED)) {
            json_t *c = json_stringn(t->blob + t->off[id], t->len[id]);
            if (!c) goto fail; /* special content must be valid UTF-8 */
            json_array_append_new(
                added, json_pack("{s:i, s:O, s:b, s:b, s:b, s:b, s:b}", "id", (int)id,
                                 "content", c, "single_word", 0, "lstrip", 0, "rstrip",
                                 0, "normalized", !(f & TOKF_SPECIAL), "special",
                                 (f & TOKF_SPECIAL) != 0));
            if (!(f & TOKF_NOTVOCAB))
                json_object_set_new(vocab, json_string_value(c), json_integer(id));
            json_decref(c);
            continue;
        }
        json_t *k = bl_string(t, id);
        if (!k) goto fail;
        json_object_set_new(vocab, json_string_value(k), json_integer(id));
        json_decref(k);
    }
    for (int32_t r = 0; r < t->n_merges; r++) {
        json_t *a = bl_string(t, t->m_left[r]), *b = bl_string(t, t->m_right[r]);
        if (!a || !b) goto fail;
        size_t la = json_string_length(a), lb = json_string_length(b);
        char *m = malloc(la + lb + 2);
        if (!m) goto fail;
        memcpy(m, json_string_value(a), la);
        m[la] = ' ';
        memcpy(m + la + 1, json_string_value(b), lb + 1);
        json_array_append_new(merges, json_stringn(m, la + lb + 1));
        free(m);
        json_decref(a);
        json_decref(b);
    }
    json_object_set(model, "vocab", vocab);
    json_object_set(model, "merges", merges);
    json_decref(added);
    json_decref(vocab);
    json_decref(merges);
    return root;
fail:
    json_decref(root);
    json_decref(added);
    json_decref(vocab);
    json_decref(merges);
    return NULL;
}

int kiln_tokenizer_post_ids(const kiln_tokenizer *tok, bool after, const int32_t **ids)
{
    if (!tok->has_post) {
        *ids = NULL;
        return -1;
    }
    *ids = after ? tok->post_suf : tok->post_pre;
    return after ? tok->n_post_suf : tok->n_post_pre;
}

kiln_status kiln_tokenizer_encode_add_special(kiln_ctx *ctx, const kiln_tokenizer *tok,
                                              const char *text, size_t len, int32_t **ids,
                                              size_t *n)
{
    int32_t *body;
    size_t nb;
    kiln_status s = kiln_tokenizer_encode(ctx, tok, text, len, &body, &nb);
    if (s) return s;
    size_t pre = (size_t)tok->n_post_pre, suf = (size_t)tok->n_post_suf;
    int32_t *all = malloc((pre + nb + suf + 1) * sizeof *all);
    if (!all) {
        free(body);
        *ids = NULL;
        *n = 0;
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    memcpy(all, tok->post_pre, pre * sizeof *all);
    memcpy(all + pre, body, nb * sizeof *all);
    memcpy(all + pre + nb, tok->post_suf, suf * sizeof *all);
    free(body);
    *ids = all;
    *n = pre + nb + suf;
    return KILN_OK;
}
