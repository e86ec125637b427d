/*
 * jsonl.c — reading JSON Lines: one JSON object per line, addressed by
 * line number in every error so a user can fix their file.
 */
#include "base/base.h"

#include <stdlib.h>
#include <string.h>

kiln_status kiln_jsonl_get_string(kiln_ctx *ctx, const char *line, size_t len,
                                  const char *field, char **out, size_t *out_len)
{
    *out = NULL;
    if (out_len) *out_len = 0;
    json_error_t err;
    json_t *v = json_loadb(line, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &err);
    if (!v)
        return kiln_fail(ctx, KILN_ERR_FORMAT, "invalid JSON at column %d: %s",
                         err.column, err.text);
    kiln_status s = KILN_OK;
    const json_t *f = json_object_get(v, field);
    if (!json_is_object(v))
        s = kiln_fail(ctx, KILN_ERR_FORMAT, "expected a JSON object with a \"%s\" field",
                      field);
    else if (!f)
        s = kiln_fail(ctx, KILN_ERR_FORMAT, "field \"%s\" is missing", field);
    else if (!json_is_string(f))
        s = kiln_fail(ctx, KILN_ERR_FORMAT, "field \"%s\" must be a string", field);
    else {
        size_t n = json_string_length(f);
        char *o = malloc(n + 1);
        if (!o) s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        else {
            memcpy(o, json_string_value(f), n);
            o[n] = 0;
            *out = o;
            if (out_len) *out_len = n;
        }
    }
    json_decref(v);
    return s;
}
