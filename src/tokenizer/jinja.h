/*
 * jinja.h — the subset of Jinja2 that Hugging Face chat templates use
 * (tokenizer_config.json "chat_template"), parsed once and rendered per
 * conversation. Private to tokenizer/; the contract of what is supported
 * is at the top of jinja.c.
 */
#ifndef KILN_JINJA_H
#define KILN_JINJA_H

#include "base/base.h"

typedef struct jinja_tmpl jinja_tmpl;

/* Parses src (len bytes). Errors (KILN_ERR_FORMAT) name what is wrong
 * with its line and column in the template ("chat template line 3 col 7:
 * unknown filter 'foo'"). Free with jinja_free. */
kiln_status jinja_parse(kiln_ctx *ctx, const char *src, size_t len, jinja_tmpl **out);
void jinja_free(jinja_tmpl *t);

/* Renders the template with the variables messages (a list of {role,
 * content}), add_generation_prompt, bos_token and eos_token (NULL: ""),
 * as transformers' apply_chat_template does (trim_blocks and lstrip_blocks
 * on). *out is malloc'ed and NUL-terminated, *len its length. Errors:
 * raise_exception('msg') (KILN_ERR_INVALID_ARG, "chat template raised
 * an error: msg"), a type error at run time (KILN_ERR_FORMAT, with
 * line and column). */
kiln_status jinja_render(kiln_ctx *ctx, const jinja_tmpl *t, const kiln_chat_msg *msgs, int n,
                         bool add_generation_prompt, const char *bos, const char *eos,
                         char **out, size_t *len);

#endif /* KILN_JINJA_H */
