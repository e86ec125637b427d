/*
 * tok_gguf.c — a kiln tokenizer as GGUF metadata and back (contract in
 * tok_gguf.h). Every kiln tokenizer is a byte-level BPE, which is what
 * llama.cpp calls tokenizer.ggml.model "gpt2":
 *   tokens      ordinary tokens as their byte-level strings (GPT-2's
 *               bytes_to_unicode), special and added tokens as their text,
 *               ids without a token (holes, and the rows of a model's
 *               vocabulary past the tokenizer's) as "<|kiln_unused_ID|>"
 *   token_type  1 normal, 3 control (special), 4 user-defined (added,
 *               matched in text), 5 unused (no token)
 *   merges      "left right" in byte-level strings, in rank order
 *   pre         "gpt-2", "llama-bpe" or "qwen2": the pre-tokenizer regex
 *               llama.cpp applies (kiln.tokenizer.pattern keeps kiln's own
 *               spelling); qwen2 also gets Qwen2's NFC normalizer back
 *   chat_template  the tokenizer's own Jinja template (read back with
 *               bos/eos_token from the bos/eos ids), else ChatML when the
 *               vocabulary has its specials
 */
#include "tokenizer/tok_gguf.h"
#include "tokenizer/tok_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHATML_TEMPLATE                                                              \
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "     \
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if "                  \
    "add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"

enum { TT_NORMAL = 1, TT_UNKNOWN = 2, TT_CONTROL = 3, TT_USER = 4, TT_UNUSED = 5, TT_BYTE = 6 };

/* llama.cpp's name for kiln's pattern, or NULL. */
static const char *pre_name(const kiln_tokenizer *t)
{
    if (t->pre == TOK_PRE_NONE || !t->pattern) return "gpt-2"; /* no merges: any split */
    if (!strcmp(t->pattern, TOK_PATTERN_GPT2) || !strcmp(t->pattern, TOK_PATTERN_HF_GPT2))
        return "gpt-2";
    if (!strcmp(t->pattern, TOK_PATTERN_LLAMA3)) return "llama-bpe";
    if (!strcmp(t->pattern, TOK_PATTERN_QWEN2)) return "qwen2";
    return NULL;
}

kiln_status tok_gguf_write(kiln_ctx *ctx, const kiln_tokenizer *t, gguf_writer *w,
                           const tok_gguf_ids *ids)
{
    const char *pre = pre_name(t);
    if (!pre || (t->add_prefix_space && t->n_merges))
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                         "tokenizer %s: its pre-tokenization (%s%s) is not one llama.cpp "
                         "reproduces; GGUF export supports the GPT-2, Llama 3 and Qwen2 patterns "
                         "without add_prefix_space", t->name ? t->name : "",
                         t->pattern ? t->pattern : "no pattern",
                         t->add_prefix_space ? ", add_prefix_space" : "");
    int32_t n = ids->n_vocab > t->n_vocab ? ids->n_vocab : t->n_vocab;
    char **s = calloc((size_t)n + 1, sizeof *s);
    size_t *lens = calloc((size_t)n + 1, sizeof *lens);
    int32_t *types = calloc((size_t)n + 1, sizeof *types);
    kiln_status st = KILN_OK;
    if (!s || !lens || !types) st = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    for (int32_t id = 0; id < n && !st; id++) {
        uint8_t f = id < t->n_vocab ? t->flags[id] : TOKF_HOLE;
        const char *p = id < t->n_vocab ? t->blob + t->off[id] : NULL;
        if (f & TOKF_HOLE) {
            char buf[48];
            snprintf(buf, sizeof buf, "<|kiln_unused_%d|>", id);
            s[id] = strdup(buf);
            lens[id] = s[id] ? strlen(s[id]) : 0;
            types[id] = TT_UNUSED;
        } else if (f & (TOKF_SPECIAL | TOKF_ADDED)) {
            s[id] = malloc(t->len[id] + 1);
            if (s[id]) memcpy(s[id], p, t->len[id]);
            lens[id] = t->len[id];
            types[id] = (f & TOKF_SPECIAL) ? TT_CONTROL : TT_USER;
        } else {
            s[id] = tok_bytes_to_bl(p, t->len[id], &lens[id]);
            types[id] = TT_NORMAL;
        }
        if (!s[id]) st = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    char **mg = NULL;
    if (!st && !(mg = calloc((size_t)t->n_merges + 1, sizeof *mg)))
        st = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    for (int32_t i = 0; i < t->n_merges && !st; i++) {
        int32_t a = t->m_left[i], b = t->m_right[i];
        size_t la = lens[a], lb = lens[b];
        mg[i] = malloc(la + lb + 2);
        if (!mg[i]) {
            st = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
            break;
        }
        memcpy(mg[i], s[a], la);
        mg[i][la] = ' ';
        memcpy(mg[i] + la + 1, s[b], lb);
        mg[i][la + 1 + lb] = 0;
    }
    if (!st) {
        int32_t eot = t->eot >= 0 ? t->eot : 0;
        gguf_w_str(w, "tokenizer.ggml.model", "gpt2");
        gguf_w_str(w, "tokenizer.ggml.pre", pre);
        gguf_w_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)s, lens, (uint64_t)n);
        gguf_w_arr(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, (uint64_t)n);
        gguf_w_arr_str(w, "tokenizer.ggml.merges", (const char *const *)mg, NULL,
                       (uint64_t)t->n_merges);
        gguf_w_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)(ids->bos >= 0 ? ids->bos : eot));
        gguf_w_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)(ids->eos >= 0 ? ids->eos : eot));
        gguf_w_u32(w, "tokenizer.ggml.padding_token_id",
                   (uint32_t)(ids->pad >= 0 ? ids->pad : eot));
        gguf_w_bool(w, "tokenizer.ggml.add_bos_token", ids->add_bos);
        gguf_w_bool(w, "tokenizer.ggml.add_eos_token", false);
        gguf_w_str(w, "kiln.tokenizer.pattern",
                   t->pre == TOK_PRE_NONE || !t->pattern ? "" : t->pattern);
        /* the model's own template; ChatML when its specials are there */
        if (t->chat_src)
            gguf_w_str(w, "tokenizer.chat_template", t->chat_src);
        else if (kiln_tokenizer_special_id(t, "<|im_start|>") >= 0 &&
                 kiln_tokenizer_special_id(t, "<|im_end|>") >= 0)
            gguf_w_str(w, "tokenizer.chat_template", CHATML_TEMPLATE);
    }
    for (int32_t id = 0; s && id < n; id++) free(s[id]);
    for (int32_t i = 0; mg && i < t->n_merges; i++) free(mg[i]);
    free(s);
    free(lens);
    free(types);
    free(mg);
    return st;
}

/* ---- reading ------------------------------------------------------------ */

#define GGUF_MAX_VOCAB (1 << 24)

static void quote(char *q, size_t cap, const char *p, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n && k + 5 < cap; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 32 && c < 127 && c != '"') q[k++] = (char)c;
        else k += (size_t)snprintf(q + k, cap - k, "\\x%02x", c);
    }
    q[k] = 0;
}

static kiln_status read_merges(kiln_ctx *ctx, kiln_tokenizer *t, const gguf_kv *mk,
                               const char *what)
{
    const char **mp = NULL;
    size_t *ml = NULL;
    kiln_status s = gguf_arr_strs(ctx, mk, &mp, &ml);
    if (s) return s;
    int32_t n = (int32_t)mk->n;
    int32_t *L = malloc(((size_t)n + 1) * sizeof *L), *R = malloc(((size_t)n + 1) * sizeof *R);
    if (!L || !R) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    for (int32_t i = 0; i < n && !s; i++) {
        const char *p = mp[i];
        size_t len = ml[i];
        const char *sp = len > 1 ? memchr(p + 1, ' ', len - 1) : NULL;
        char q[96];
        if (!sp) {
            quote(q, sizeof q, p, len);
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: tokenizer.ggml.merges[%d] = \"%s\" is not \"left right\"",
                          what, i, q);
            break;
        }
        int32_t id[2];
        const char *part[2] = {p, sp + 1};
        size_t plen[2] = {(size_t)(sp - p), len - (size_t)(sp - p) - 1};
        for (int k = 0; k < 2 && !s; k++) {
            char *raw;
            size_t rn;
            id[k] = -1;
            if (tok_bl_to_bytes(part[k], plen[k], &raw, &rn)) {
                id[k] = rn ? tok_lookup(t, raw, rn) : -1;
                free(raw);
            }
            if (id[k] < 0) {
                quote(q, sizeof q, p, len);
                s = kiln_fail(ctx, KILN_ERR_FORMAT,
                              "%s: tokenizer.ggml.merges[%d] = \"%s\": its %s part is not a "
                              "token of tokenizer.ggml.tokens", what, i, q,
                              k ? "right" : "left");
            }
        }
        if (!s) {
            L[i] = id[0];
            R[i] = id[1];
        }
    }
    free(mp);
    free(ml);
    if (s) {
        free(L);
        free(R);
        return s;
    }
    return tok_set_merges(ctx, t, n, L, R, what);
}

/* The text of special token id (tokenizer.ggml.KEY_token_id) as a
 * malloc'ed string, or NULL when the key is absent or names no token. */
static char *token_text(kiln_ctx *ctx, const gguf_file *f, const char *what,
                        const kiln_tokenizer *t, const char *key)
{
    int64_t id = -1;
    if (gguf_get_int(ctx, f, what, key, false, &id) || id < 0 || id >= t->n_vocab ||
        (t->flags[id] & TOKF_HOLE))
        return NULL;
    char *s = malloc((size_t)t->len[id] + 1);
    if (s) {
        memcpy(s, t->blob + t->off[id], t->len[id]);
        s[t->len[id]] = 0;
    }
    return s;
}

/* tokenizer.chat_template (llama.cpp's key, HF's Jinja text) becomes the
 * tokenizer's chat template, with bos_token / eos_token the texts of
 * tokenizer.ggml.bos_token_id / eos_token_id. A template kiln cannot parse
 * is an error naming the key. */
static kiln_status read_chat_template(kiln_ctx *ctx, const gguf_file *f, const char *what,
                                      kiln_tokenizer *t)
{
    const char *src;
    size_t n = 0;
    kiln_status s = gguf_get_str(ctx, f, what, "tokenizer.chat_template", false, &src, &n);
    if (s || !n) return s;
    char *tmpl = malloc(n + 1);
    char *bos = token_text(ctx, f, what, t, "tokenizer.ggml.bos_token_id");
    char *eos = token_text(ctx, f, what, t, "tokenizer.ggml.eos_token_id");
    if (!tmpl) {
        s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    } else {
        memcpy(tmpl, src, n);
        tmpl[n] = 0;
        if (strlen(tmpl) != n)
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: metadata key \"tokenizer.chat_template\" holds a NUL byte", what);
        else if ((s = kiln_tokenizer_set_chat_template(ctx, t, tmpl, bos, eos)))
            kiln_fail(ctx, s, "%s: metadata key \"tokenizer.chat_template\": %s", what,
                      kiln_errmsg(ctx));
    }
    free(tmpl);
    free(bos);
    free(eos);
    return s;
}

kiln_status tok_gguf_read(kiln_ctx *ctx, const gguf_file *f, const char *what,
                          kiln_tokenizer **out)
{
    *out = NULL;
    const char *model, *pre = "gpt-2", *pat = NULL;
    size_t model_n, pre_n = 5, pat_n = 0;
    const gguf_kv *tk, *tt, *mk;
    kiln_status s = gguf_get_str(ctx, f, what, "tokenizer.ggml.model", true, &model, &model_n);
    if (s) return s;
    if (!(model_n == 4 && !memcmp(model, "gpt2", 4)))
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                         "%s: metadata key \"tokenizer.ggml.model\" = \"%.*s\" is not "
                         "supported (kiln reads byte-level BPE vocabularies: \"gpt2\")", what,
                         (int)(model_n > 32 ? 32 : model_n), model);
    if ((s = gguf_get_str(ctx, f, what, "tokenizer.ggml.pre", false, &pre, &pre_n)) ||
        (s = gguf_get_str(ctx, f, what, "kiln.tokenizer.pattern", false, &pat, &pat_n)) ||
        (s = gguf_get_arr(ctx, f, what, "tokenizer.ggml.tokens", true, GGUF_TYPE_STRING, &tk)) ||
        (s = gguf_get_arr(ctx, f, what, "tokenizer.ggml.token_type", false, GGUF_TYPE_INT64,
                          &tt)) ||
        (s = gguf_get_arr(ctx, f, what, "tokenizer.ggml.merges", false, GGUF_TYPE_STRING, &mk)))
        return s;
    const char *pattern = NULL;
    tok_pre kind = TOK_PRE_BYTELEVEL;
    char prebuf[40];
    snprintf(prebuf, sizeof prebuf, "%.*s", (int)(pre_n > 32 ? 32 : pre_n), pre);
    if (!strcmp(prebuf, "gpt-2") || !strcmp(prebuf, "gpt2")) {
        pattern = TOK_PATTERN_HF_GPT2;
    } else if (!strcmp(prebuf, "llama-bpe") || !strcmp(prebuf, "llama3") ||
               !strcmp(prebuf, "llama-v3")) {
        pattern = TOK_PATTERN_LLAMA3;
        kind = TOK_PRE_SPLIT;
    } else if (!strcmp(prebuf, "qwen2")) {
        pattern = TOK_PATTERN_QWEN2;
        kind = TOK_PRE_SPLIT;
    } else {
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED,
                         "%s: metadata key \"tokenizer.ggml.pre\" = \"%s\" is not supported "
                         "(kiln knows \"gpt-2\", \"llama-bpe\" and \"qwen2\")", what, prebuf);
    }
    if (tk->n == 0 || tk->n > GGUF_MAX_VOCAB)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: metadata key \"tokenizer.ggml.tokens\" has %llu tokens (1 to %d)",
                         what, (unsigned long long)tk->n, GGUF_MAX_VOCAB);
    if (tt && tt->n != tk->n)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: metadata key \"tokenizer.ggml.token_type\" has %llu entries for "
                         "%llu tokens", what, (unsigned long long)tt->n,
                         (unsigned long long)tk->n);
    const char **tp = NULL;
    size_t *tl = NULL;
    if ((s = gguf_arr_strs(ctx, tk, &tp, &tl))) return s;
    int32_t n = (int32_t)tk->n;
    kiln_tokenizer *t = tok_new(ctx, n);
    if (!t) s = KILN_ERR_NOMEM;
    if (!s) t->name = strdup(what);
    for (int32_t id = 0; id < n && !s; id++) {
        int64_t ty = tt ? gguf_arr_int(tt, (uint64_t)id) : TT_NORMAL;
        char q[96];
        if (ty == TT_UNUSED) continue;
        if (tl[id] == 0) {
            s = kiln_fail(ctx, KILN_ERR_FORMAT, "%s: tokenizer.ggml.tokens[%d] is empty", what,
                          id);
        } else if (ty == TT_CONTROL || ty == TT_UNKNOWN || ty == TT_USER) {
            s = tok_set(ctx, t, id, tp[id], tl[id],
                        ty == TT_USER ? TOKF_ADDED | TOKF_NOTVOCAB : TOKF_SPECIAL);
        } else if (ty == TT_NORMAL || ty == TT_BYTE) {
            char *raw;
            size_t rn;
            if (!tok_bl_to_bytes(tp[id], tl[id], &raw, &rn)) {
                quote(q, sizeof q, tp[id], tl[id]);
                s = kiln_fail(ctx, KILN_ERR_FORMAT,
                              "%s: tokenizer.ggml.tokens[%d] = \"%s\" is not a byte-level "
                              "token (GPT-2's byte-to-unicode alphabet)", what, id, q);
            } else {
                s = tok_set(ctx, t, id, raw, rn, 0);
                free(raw);
            }
        } else {
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: tokenizer.ggml.token_type[%d] = %lld is not a token type "
                          "(1..6)", what, id, (long long)ty);
        }
    }
    free(tp);
    free(tl);
    if (!s) s = tok_finish_vocab(ctx, t, what);
    if (!s && t->eot < 0) {
        int64_t eos = -1;
        s = gguf_get_int(ctx, f, what, "tokenizer.ggml.eos_token_id", false, &eos);
        if (!s && eos >= 0 && eos < n) t->eot = (int32_t)eos;
    }
    if (!s) {
        bool bytes_only = !mk || mk->n == 0;
        if (pat && pat_n == 0 && bytes_only) {
            t->pre = TOK_PRE_NONE;
        } else {
            char *own = NULL;
            if (pat && pat_n) {
                own = malloc(pat_n + 1);
                if (own) {
                    memcpy(own, pat, pat_n);
                    own[pat_n] = 0;
                }
            }
            /* kiln's own spelling only when it means what pre says */
            if (own && (!strcmp(own, TOK_PATTERN_GPT2) || !strcmp(own, TOK_PATTERN_HF_GPT2)) &&
                kind == TOK_PRE_BYTELEVEL)
                pattern = !strcmp(own, TOK_PATTERN_GPT2) ? TOK_PATTERN_GPT2 : TOK_PATTERN_HF_GPT2;
            free(own);
            t->pre = kind;
            s = tok_set_pattern(ctx, t, pattern);
            /* Qwen2's tokenizer.json normalizes to NFC (llama.cpp skips it) */
            t->nfc = !strcmp(pattern, TOK_PATTERN_QWEN2) && tok_nfc_available();
        }
    }
    if (!s) {
        if (mk) s = read_merges(ctx, t, mk, what);
        else s = tok_set_merges(ctx, t, 0, NULL, NULL, what);
    }
    if (!s) s = read_chat_template(ctx, f, what, t);
    if (s) {
        kiln_tokenizer_free(t);
        return s;
    }
    *out = t;
    return KILN_OK;
}
