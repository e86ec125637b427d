/*
 * fuzz_shard.c — libFuzzer harness for the token-shard reader: any byte
 * string written to a file is either refused with a message naming it or
 * opened as a shard whose every token can be read and lies inside the
 * declared vocabulary.
 */
#include "kiln.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char path[64];
    snprintf(path, sizeof path, "/tmp/kiln_fuzz_shard.%ld.bin", (long)getpid());
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    if (size) fwrite(data, 1, size, f);
    fclose(f);
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_shard *s = NULL;
    if (kiln_shard_open(ctx, path, &s) == KILN_OK) {
        size_t n = kiln_shard_count(s);
        int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
        if (ids) {
            kiln_shard_read(s, 0, n, ids);
            for (size_t i = 0; i < n; i++)
                if (ids[i] < 0 || ids[i] >= kiln_shard_vocab_size(s)) abort();
            free(ids);
        }
        kiln_shard_close(s);
    } else if (!*kiln_errmsg(ctx)) {
        abort(); /* a refusal always says why */
    }
    kiln_ctx_free(ctx);
    unlink(path);
    return 0;
}
