/*
 * normalize.c — the Unicode normalization a tokenizer.json may ask for
 * before pre-tokenization. Qwen2's tokenizers set {"type": "NFC"}; NFC
 * needs the Unicode composition tables, which ICU (libicu-dev, detected
 * by the build) provides. Without ICU, tok_nfc_available() is false and
 * loading such a tokenizer is refused (tok_json.c), never approximated.
 */
#include "tokenizer/tok_internal.h"

#include <stdlib.h>
#include <string.h>

#ifdef KILN_HAVE_ICU
#include <unicode/unorm2.h>
#include <unicode/ustring.h>

bool tok_nfc_available(void) { return true; }

bool tok_nfc(const char *text, size_t len, char **out, size_t *out_len)
{
    *out = NULL;
    *out_len = 0;
    size_t i = 0;
    while (i < len && !((unsigned char)text[i] & 0x80)) i++;
    if (i == len || len > (size_t)INT32_MAX / 2) return true; /* ASCII: NFC already */
    UErrorCode e = U_ZERO_ERROR;
    const UNormalizer2 *nfc = unorm2_getNFCInstance(&e);
    if (U_FAILURE(e)) return true;
    int32_t n16 = 0;
    u_strFromUTF8(NULL, 0, &n16, text, (int32_t)len, &e);
    if (e != U_BUFFER_OVERFLOW_ERROR && U_FAILURE(e)) return true; /* invalid UTF-8 */
    e = U_ZERO_ERROR;
    UChar *src = malloc(((size_t)n16 + 1) * sizeof(UChar));
    if (!src) return false;
    u_strFromUTF8(src, n16 + 1, NULL, text, (int32_t)len, &e);
    bool ok = true;
    if (U_SUCCESS(e) && !unorm2_isNormalized(nfc, src, n16, &e) && U_SUCCESS(e)) {
        /* composition never lengthens UTF-16 by more than 3x (UAX #15) */
        int32_t cap = 3 * n16 + 1;
        UChar *dst = malloc((size_t)cap * sizeof(UChar));
        char *u8 = NULL;
        int32_t n = dst ? unorm2_normalize(nfc, src, n16, dst, cap, &e) : 0;
        int32_t n8 = 0;
        if (dst && U_SUCCESS(e)) {
            u_strToUTF8(NULL, 0, &n8, dst, n, &e);
            e = U_ZERO_ERROR;
            u8 = malloc((size_t)n8 + 1);
            if (u8) u_strToUTF8(u8, n8 + 1, NULL, dst, n, &e);
        }
        ok = dst && (U_FAILURE(e) || u8);
        if (u8 && U_SUCCESS(e)) {
            *out = u8;
            *out_len = (size_t)n8;
        } else {
            free(u8);
        }
        free(dst);
    }
    free(src);
    return ok;
}
#else
bool tok_nfc_available(void) { return false; }

bool tok_nfc(const char *text, size_t len, char **out, size_t *out_len)
{
    (void)text;
    (void)len;
    *out = NULL;
    *out_len = 0;
    return true;
}
#endif
