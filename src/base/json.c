/*
 * json.c — typed access to jansson values with error messages that name
 * the source file and the field, and atomic saving of JSON files.
 */
#include "base.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

kiln_status js_load_buf(kiln_ctx *ctx, const char *buf, size_t len,
                        const char *what, json_t **out)
{
    json_error_t err;
    *out = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &err);
    if (!*out)
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: invalid JSON at line %d column %d: %s", what,
                         err.line, err.column, err.text);
    return KILN_OK;
}

kiln_status js_load_file(kiln_ctx *ctx, const char *path, json_t **out)
{
    char *buf;
    size_t len;
    *out = NULL;
    kiln_status s = file_read_all(ctx, path, &buf, &len);
    if (s) return s;
    s = js_load_buf(ctx, buf, len, path, out);
    free(buf);
    return s;
}

static kiln_status missing(kiln_ctx *ctx, const char *key, const char *what)
{
    return kiln_fail(ctx, KILN_ERR_FORMAT,
                     "%s: required field \"%s\" is missing", what, key);
}

kiln_status js_get_int(kiln_ctx *ctx, const json_t *obj, const char *key,
                       const char *what, bool required, int64_t *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return required ? missing(ctx, key, what) : KILN_OK;
    if (json_is_integer(v)) {
        *out = (int64_t)json_integer_value(v);
        return KILN_OK;
    }
    if (json_is_real(v)) {
        double d = json_real_value(v);
        if (d == floor(d) && fabs(d) < 9e15) {
            *out = (int64_t)d;
            return KILN_OK;
        }
    }
    return kiln_fail(ctx, KILN_ERR_FORMAT,
                     "%s: field \"%s\" must be an integer", what, key);
}

kiln_status js_get_double(kiln_ctx *ctx, const json_t *obj, const char *key,
                          const char *what, bool required, double *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return required ? missing(ctx, key, what) : KILN_OK;
    if (!json_is_number(v))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: field \"%s\" must be a number", what, key);
    *out = json_number_value(v);
    return KILN_OK;
}

kiln_status js_get_bool(kiln_ctx *ctx, const json_t *obj, const char *key,
                        const char *what, bool required, bool *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return required ? missing(ctx, key, what) : KILN_OK;
    if (!json_is_boolean(v))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: field \"%s\" must be true or false", what, key);
    *out = json_is_true(v);
    return KILN_OK;
}

kiln_status js_get_str(kiln_ctx *ctx, const json_t *obj, const char *key,
                       const char *what, bool required, const char **out)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) return required ? missing(ctx, key, what) : KILN_OK;
    if (!json_is_string(v))
        return kiln_fail(ctx, KILN_ERR_FORMAT,
                         "%s: field \"%s\" must be a string", what, key);
    *out = json_string_value(v);
    return KILN_OK;
}

kiln_status js_save_file(kiln_ctx *ctx, const char *path, const json_t *v)
{
    char *s = json_dumps(v, JSON_INDENT(2) | JSON_PRESERVE_ORDER |
                                JSON_REAL_PRECISION(17));
    if (!s) return kiln_fail(ctx, KILN_ERR_NOMEM, "cannot serialise JSON for '%s'", path);
    size_t n = strlen(s);
    char *t = realloc(s, n + 2);
    if (!t) {
        free(s);
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
    }
    t[n] = '\n';
    t[n + 1] = 0;
    kiln_status st = file_write_atomic(ctx, path, t, n + 1);
    free(t);
    return st;
}
