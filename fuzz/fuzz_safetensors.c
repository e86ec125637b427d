/*
 * fuzz_safetensors.c — libFuzzer harness for the safetensors reader: any
 * byte string is either rejected with a message or parsed into tensors
 * whose byte ranges lie inside the buffer; every float tensor of an
 * accepted file is then converted to fp32 (touching every byte).
 */
#include "io/safetensors.h"

#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kiln_ctx *ctx = kiln_ctx_new();
    st_file f;
    if (st_parse(ctx, data, size, "fuzz", &f) == KILN_OK) {
        for (int i = 0; i < f.n_tensors; i++) {
            const st_tensor *t = &f.tensors[i];
            KILN_ASSERT(t->begin <= t->end && t->end <= f.data_size);
            KILN_ASSERT(t->end - t->begin == dtype_row_bytes(t->dtype, (int64_t)t->numel));
            float *dst = malloc(t->numel * sizeof(float) + 1);
            if (dst) st_read_f32(ctx, &f, t, "fuzz", dst);
            free(dst);
        }
        st_close(&f);
    }
    kiln_ctx_free(ctx);
    return 0;
}
