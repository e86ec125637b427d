/*
 * fuzz_jsonl.c — libFuzzer harness for the JSONL dataset loaders: any file
 * is loaded as SFT, preference and prompt data (bytes tokenizer, with and
 * without max_len) and either rejected with a message or yields examples
 * whose ids are in the vocabulary; SFT data is also packed and the packed
 * rows checked (targets in range, documents contiguous). The same bytes go
 * through kiln_jsonl_get_string.
 */
#include "kiln.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_ids(const int32_t *ids, size_t n, int V)
{
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= V) abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_set_log_level(ctx, (kiln_log_level)-1); /* quiet */
    kiln_tokenizer *tok;
    if (kiln_tokenizer_load(ctx, "bytes", &tok)) abort();
    char path[] = "/tmp/kiln-fuzz-jsonl-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) abort();
    if (size && write(fd, data, size) != (ssize_t)size) abort();
    close(fd);
    for (int kind = 0; kind < 3; kind++)
        for (int ml = 0; ml < 2; ml++) {
            kiln_dataset_opts o = kiln_dataset_opts_default();
            o.skip_bad = ml == 1;
            o.max_len = ml ? 24 : 0;
            kiln_dataset *ds = NULL;
            if (kiln_dataset_load(ctx, tok, path, (kiln_dataset_kind)kind, &o, &ds)) continue;
            for (size_t i = 0; i < kiln_dataset_count(ds); i++) {
                kiln_example ex;
                kiln_dataset_get(ds, i, &ex);
                check_ids(ex.ids, ex.n, 257);
                check_ids(ex.chosen, ex.n_chosen, 257);
                check_ids(ex.rejected, ex.n_rejected, 257);
                if (o.max_len && ex.n + ex.n_chosen > 24) abort();
            }
            kiln_packed *pk;
            if (kind == KILN_DATASET_SFT && kiln_dataset_pack(ctx, ds, 16, &pk) == KILN_OK) {
                for (int64_t c = 0; c < pk->rows * pk->T; c++) {
                    if (pk->targets[c] < -1 || pk->targets[c] >= 257) abort();
                    if (pk->doc[c] < 0 && pk->targets[c] != -1) abort();
                }
                kiln_packed_free(pk);
            }
            kiln_dataset_free(ds);
        }
    char *s;
    size_t n;
    if (kiln_jsonl_get_string(ctx, (const char *)data, size, "text", &s, &n) == KILN_OK) free(s);
    unlink(path);
    kiln_tokenizer_free(tok);
    kiln_ctx_free(ctx);
    return 0;
}
