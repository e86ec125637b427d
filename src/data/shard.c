/*
 * shard.c — token shard files: the writer `kiln tokenize` streams tokens
 * into, and the memory-mapped reader the loader draws windows from.
 *
 * Layout (docs/formats.md), all little-endian:
 *
 *   offset size  field
 *   0      8     magic "KILNTOK\0"
 *   8      4     version (1)
 *   12     4     bytes per token: 2 (uint16) or 4 (uint32)
 *   16     4     vocab_size
 *   20     4     crc32c of the token bytes
 *   24     8     token count N
 *   32     N*b   tokens
 *
 * The writer streams tokens to a temporary file and commits it (header,
 * fsync, rename) on close, so a crash never leaves a half shard under the
 * final name. The reader checks the magic, version, dtype, that the file
 * size is exactly 32 + N*b (a truncated tail is named as such), the
 * checksum, and that every id is below the declared vocab_size.
 */
#include "base/base.h"

#include <stdlib.h>
#include <string.h>

#define SHARD_MAGIC "KILNTOK"
#define SHARD_VERSION 1u
#define SHARD_HEADER 32u
#define WBUF_TOKENS 65536

struct kiln_shard_writer {
    file_writer fw;
    int vocab_size;
    unsigned tok_bytes;
    uint64_t count;
    uint32_t crc;
    unsigned char *buf; /* WBUF_TOKENS * tok_bytes */
};

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static uint64_t get_u64(const unsigned char *p)
{
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}

static void header_encode(unsigned char h[SHARD_HEADER], unsigned tok_bytes,
                          int vocab, uint32_t crc, uint64_t count)
{
    memset(h, 0, SHARD_HEADER);
    memcpy(h, SHARD_MAGIC, 8); /* includes the NUL */
    put_u32(h + 8, SHARD_VERSION);
    put_u32(h + 12, tok_bytes);
    put_u32(h + 16, (uint32_t)vocab);
    put_u32(h + 20, crc);
    put_u64(h + 24, count);
}

kiln_status kiln_shard_writer_open(kiln_ctx *ctx, const char *path,
                                   int vocab_size, kiln_shard_writer **out)
{
    *out = NULL;
    if (vocab_size <= 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "shard '%s': vocab_size must be positive (got %d)",
                         path, vocab_size);
    kiln_shard_writer *w = kiln_calloc(ctx, 1, sizeof *w);
    if (!w) return KILN_ERR_NOMEM;
    w->vocab_size = vocab_size;
    w->tok_bytes = vocab_size <= 65536 ? 2u : 4u;
    w->buf = kiln_malloc(ctx, (size_t)WBUF_TOKENS * w->tok_bytes);
    if (!w->buf) {
        free(w);
        return KILN_ERR_NOMEM;
    }
    kiln_status s = file_writer_open(ctx, &w->fw, path);
    if (s) {
        free(w->buf);
        free(w);
        return s;
    }
    unsigned char h[SHARD_HEADER];
    header_encode(h, w->tok_bytes, vocab_size, 0, 0); /* patched at close */
    file_writer_write(&w->fw, h, sizeof h);
    *out = w;
    return KILN_OK;
}

kiln_status kiln_shard_writer_append(kiln_ctx *ctx, kiln_shard_writer *w,
                                     const int32_t *ids, size_t n)
{
    while (n > 0) {
        size_t k = n < WBUF_TOKENS ? n : WBUF_TOKENS;
        for (size_t i = 0; i < k; i++) {
            int32_t t = ids[i];
            if (t < 0 || t >= w->vocab_size)
                return kiln_fail(ctx, KILN_ERR_RANGE,
                                 "shard '%s': token id %d at position %llu is "
                                 "outside the vocabulary [0, %d)",
                                 w->fw.final_path, (int)t,
                                 (unsigned long long)(w->count + i),
                                 w->vocab_size);
            unsigned char *p = w->buf + i * w->tok_bytes;
            p[0] = (unsigned char)t;
            p[1] = (unsigned char)(t >> 8);
            if (w->tok_bytes == 4) {
                p[2] = (unsigned char)(t >> 16);
                p[3] = (unsigned char)(t >> 24);
            }
        }
        size_t bytes = k * w->tok_bytes;
        w->crc = crc32c(w->crc, w->buf, bytes);
        file_writer_write(&w->fw, w->buf, bytes);
        w->count += k;
        ids += k;
        n -= k;
    }
    return KILN_OK;
}

kiln_status kiln_shard_writer_close(kiln_ctx *ctx, kiln_shard_writer *w)
{
    if (!w) return KILN_OK;
    unsigned char h[SHARD_HEADER];
    header_encode(h, w->tok_bytes, w->vocab_size, w->crc, w->count);
    if (!w->fw.failed) {
        if (fflush(w->fw.f) != 0 || fseek(w->fw.f, 0, SEEK_SET) != 0 ||
            fwrite(h, 1, sizeof h, w->fw.f) != sizeof h ||
            fseek(w->fw.f, 0, SEEK_END) != 0)
            w->fw.failed = true;
    }
    kiln_status s = file_writer_commit(ctx, &w->fw);
    free(w->buf);
    free(w);
    return s;
}

void kiln_shard_writer_abort(kiln_shard_writer *w)
{
    if (!w) return;
    file_writer_abort(&w->fw);
    free(w->buf);
    free(w);
}

/* ---- reader --------------------------------------------------------- */

struct kiln_shard {
    file_map map;
    unsigned tok_bytes;
    int vocab_size;
    size_t count;
    const unsigned char *tokens;
};

kiln_status kiln_shard_open(kiln_ctx *ctx, const char *path,
                            kiln_shard **out)
{
    *out = NULL;
    kiln_shard *s = kiln_calloc(ctx, 1, sizeof *s);
    if (!s) return KILN_ERR_NOMEM;
    kiln_status st = file_map_open(ctx, path, &s->map);
    if (st) {
        free(s);
        return st;
    }
    const unsigned char *h = s->map.data;
    size_t size = s->map.size;
    const char *why = NULL;
    char detail[160] = "";
    if (size < SHARD_HEADER || memcmp(h, SHARD_MAGIC, 8) != 0) {
        why = "is not a kiln token shard (wrong magic; expected \"KILNTOK\")";
        if (size >= 8 && size < SHARD_HEADER && !memcmp(h, SHARD_MAGIC, 8))
            why = "is truncated inside its 32-byte header";
    } else if (get_u32(h + 8) != SHARD_VERSION) {
        snprintf(detail, sizeof detail,
                 "has format version %u; this kiln reads version %u",
                 get_u32(h + 8), SHARD_VERSION);
    } else if (get_u32(h + 12) != 2 && get_u32(h + 12) != 4) {
        snprintf(detail, sizeof detail,
                 "has an invalid token size of %u bytes (expected 2 or 4)",
                 get_u32(h + 12));
    } else if (get_u32(h + 16) == 0 || get_u32(h + 16) > (1u << 30)) {
        snprintf(detail, sizeof detail, "has an invalid vocab_size %u",
                 get_u32(h + 16));
    } else {
        s->tok_bytes = get_u32(h + 12);
        s->vocab_size = (int)get_u32(h + 16);
        uint64_t n = get_u64(h + 24);
        uint64_t payload = size - SHARD_HEADER;
        if (n > payload / s->tok_bytes || n * s->tok_bytes != payload) {
            if (n <= (UINT64_MAX - SHARD_HEADER) / s->tok_bytes &&
                n * s->tok_bytes > payload)
                snprintf(detail, sizeof detail,
                         "is truncated: header says %llu tokens (%llu bytes) "
                         "but the file holds %llu bytes",
                         (unsigned long long)n,
                         (unsigned long long)(SHARD_HEADER + n * s->tok_bytes),
                         (unsigned long long)size);
            else
                snprintf(detail, sizeof detail,
                         "has %llu trailing bytes after its %llu tokens",
                         (unsigned long long)(payload - n * s->tok_bytes),
                         (unsigned long long)n);
        } else {
            s->count = (size_t)n;
            s->tokens = h + SHARD_HEADER;
            uint32_t crc = crc32c(0, s->tokens, (size_t)payload);
            if (crc != get_u32(h + 20)) {
                snprintf(detail, sizeof detail,
                         "is corrupted: token checksum %08x, header says %08x",
                         crc, get_u32(h + 20));
            } else {
                /* every id must be inside the vocabulary it declares */
                uint32_t mx = 0;
                size_t at = 0;
                for (size_t i = 0; i < s->count; i++) {
                    const unsigned char *q = s->tokens + i * s->tok_bytes;
                    uint32_t v = s->tok_bytes == 2
                                     ? (uint32_t)q[0] | (uint32_t)q[1] << 8
                                     : get_u32(q);
                    if (v > mx) {
                        mx = v;
                        at = i;
                    }
                }
                if (s->count && mx >= (uint32_t)s->vocab_size)
                    snprintf(detail, sizeof detail,
                             "holds token id %u at position %zu, outside its "
                             "vocabulary [0, %d)",
                             mx, at, s->vocab_size);
            }
        }
    }
    if (why || detail[0]) {
        kiln_status e = (detail[0] && strstr(detail, "checksum"))
                            ? KILN_ERR_CHECKSUM
                            : KILN_ERR_FORMAT;
        kiln_fail(ctx, e, "token shard '%s' %s; re-create it with kiln tokenize",
                  path, why ? why : detail);
        kiln_shard_close(s);
        return e;
    }
    *out = s;
    return KILN_OK;
}

void kiln_shard_close(kiln_shard *s)
{
    if (!s) return;
    file_map_close(&s->map);
    free(s);
}

size_t kiln_shard_count(const kiln_shard *s) { return s->count; }
int kiln_shard_vocab_size(const kiln_shard *s) { return s->vocab_size; }

void kiln_shard_read(const kiln_shard *s, size_t start, size_t n,
                     int32_t *out)
{
    KILN_ASSERT(start + n <= s->count);
    const unsigned char *p = s->tokens + start * s->tok_bytes;
    if (s->tok_bytes == 2) {
        for (size_t i = 0; i < n; i++, p += 2)
            out[i] = (int32_t)((uint32_t)p[0] | (uint32_t)p[1] << 8);
    } else {
        for (size_t i = 0; i < n; i++, p += 4) out[i] = (int32_t)get_u32(p);
    }
}
