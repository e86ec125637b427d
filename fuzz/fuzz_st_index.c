/*
 * fuzz_st_index.c — libFuzzer harness for sharded safetensors: any byte
 * string written as model.safetensors.index.json beside two valid shards
 * (tensors a, b in s1.safetensors; c in s2.safetensors) is either rejected
 * with a message or opens a set in which every tensor of the shards is
 * found in the file that holds it.
 */
#include "io/safetensors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[64];

static void setup(kiln_ctx *ctx)
{
    snprintf(dir, sizeof dir, "/tmp/kiln-fuzz-idx-XXXXXX");
    KILN_ASSERT(mkdtemp(dir) != NULL);
    float v[4] = {1, 2, 3, 4};
    st_entry e[3] = {{.name = "a", .dtype = KILN_DTYPE_F32, .ndim = 1, .shape = {2}, .data = v},
                     {.name = "b", .dtype = KILN_DTYPE_F32, .ndim = 1, .shape = {2}, .data = v + 2},
                     {.name = "c", .dtype = KILN_DTYPE_F32, .ndim = 2, .shape = {2, 2}, .data = v}};
    char p[128];
    snprintf(p, sizeof p, "%s/s1.safetensors", dir);
    KILN_ASSERT(st_save(ctx, p, e, 2, NULL, 0) == KILN_OK);
    snprintf(p, sizeof p, "%s/s2.safetensors", dir);
    KILN_ASSERT(st_save(ctx, p, e + 2, 1, NULL, 0) == KILN_OK);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kiln_ctx *ctx = kiln_ctx_new();
    if (!dir[0]) setup(ctx);
    char p[128];
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    FILE *f = fopen(p, "wb");
    KILN_ASSERT(f != NULL);
    fwrite(data, 1, size, f);
    fclose(f);
    st_set s;
    if (st_set_open_dir(ctx, dir, &s) == KILN_OK) {
        for (int i = 0; i < s.n_files; i++)
            for (int k = 0; k < s.files[i].n_tensors; k++) {
                int fi = -1;
                const st_tensor *t = st_set_find(&s, s.files[i].tensors[k].name, &fi);
                KILN_ASSERT(t == &s.files[i].tensors[k] && fi == i);
            }
        KILN_ASSERT(st_set_find(&s, "no such tensor", NULL) == NULL);
        st_set_close(&s);
    } else {
        KILN_ASSERT(kiln_errmsg(ctx)[0] != 0);
    }
    kiln_ctx_free(ctx);
    return 0;
}
