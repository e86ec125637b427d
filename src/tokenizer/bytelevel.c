/*
 * bytelevel.c — GPT-2's reversible mapping between the 256 byte values and
 * 256 printable Unicode characters ("bytes_to_unicode"), which byte-level
 * vocabularies (encoder.json, tokenizer.json) use to spell token bytes.
 * Printable Latin-1 bytes stand for themselves; the other 68 bytes map, in
 * order, to U+0100 and up (so the space 0x20 is U+0120 'Ġ').
 */
#include "tokenizer/tok_internal.h"

#include <stdlib.h>
#include <string.h>

static bool printable(unsigned b)
{
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) ||
           (b >= 0xAE && b <= 0xFF);
}

uint32_t tok_byte_to_cp(uint8_t b)
{
    if (printable(b)) return b;
    unsigned n = 0;
    for (unsigned x = 0; x < b; x++)
        if (!printable(x)) n++;
    return 256 + n;
}

int tok_cp_to_byte(uint32_t cp)
{
    if (cp < 256) return printable(cp) ? (int)cp : -1;
    if (cp >= 256 + 68) return -1;
    unsigned n = cp - 256;
    for (unsigned x = 0; x < 256; x++)
        if (!printable(x) && n-- == 0) return (int)x;
    return -1;
}

static size_t put_utf8(char *o, uint32_t cp)
{
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    o[0] = (char)(0xC0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3F));
    return 2; /* byte-level code points are all < 0x800 */
}

char *tok_bytes_to_bl(const void *bytes, size_t len, size_t *out_len)
{
    static __thread uint32_t map[256];
    static __thread bool ready;
    if (!ready) {
        for (int b = 0; b < 256; b++) map[b] = tok_byte_to_cp((uint8_t)b);
        ready = true;
    }
    char *o = malloc(2 * len + 1);
    if (!o) return NULL;
    size_t k = 0;
    const unsigned char *p = bytes;
    for (size_t i = 0; i < len; i++) k += put_utf8(o + k, map[p[i]]);
    o[k] = 0;
    if (out_len) *out_len = k;
    return o;
}

bool tok_bl_to_bytes(const char *s, size_t len, char **out, size_t *out_len)
{
    char *o = malloc(len + 1);
    if (!o) return false;
    const unsigned char *p = (const unsigned char *)s;
    size_t k = 0, i = 0;
    while (i < len) {
        uint32_t cp;
        if (p[i] < 0x80) cp = p[i++];
        else if ((p[i] & 0xE0) == 0xC0 && i + 1 < len && (p[i + 1] & 0xC0) == 0x80) {
            cp = ((uint32_t)(p[i] & 0x1F) << 6) | (p[i + 1] & 0x3F);
            i += 2;
        } else {
            free(o);
            return false;
        }
        int b = tok_cp_to_byte(cp);
        if (b < 0) { free(o); return false; }
        o[k++] = (char)b;
    }
    o[k] = 0;
    *out = o;
    *out_len = k;
    return true;
}
