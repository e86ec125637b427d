/*
 * fuzz_jinja.c — libFuzzer harness for chat templates: any byte string is
 * refused with a message naming a line and column, or parses; a parsed
 * template renders a fixed conversation (with and without the generation
 * prompt) to text or to an error message, never a crash or a read past
 * the source.
 */
#include "tokenizer/jinja.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_set_log_level(ctx, KILN_LOG_ERROR);
    jinja_tmpl *t = NULL;
    if (jinja_parse(ctx, (const char *)data, size, &t) == KILN_OK) {
        static const kiln_chat_msg m[] = {{"system", "be brief", 0},
                                          {"user", " hello ", 0},
                                          {"assistant", "hi", 0},
                                          {"user", "x", 0}};
        for (int g = 0; g < 2; g++) {
            char *out = NULL;
            size_t len = 0;
            if (jinja_render(ctx, t, m, 4, g, "<s>", "</s>", &out, &len) == KILN_OK)
                KILN_ASSERT(out && strlen(out) <= len);
            else
                KILN_ASSERT(*kiln_errmsg(ctx));
            free(out);
        }
        jinja_free(t);
    } else {
        KILN_ASSERT(strstr(kiln_errmsg(ctx), "chat template line ") ||
                    strstr(kiln_errmsg(ctx), "out of memory"));
    }
    kiln_ctx_free(ctx);
    return 0;
}
