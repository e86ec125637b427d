/*
 * backend.c — the backends by name (kernels.h). A new backend (cuda/)
 * adds its constructor here and to kernels.h.
 */
#include "kernels/kernels.h"

#include <stdlib.h>
#include <string.h>

kern_backend *kern_backend_new(const char *name, kiln_dtype dt, kiln_bf16_kernel k)
{
    if (!name) return NULL;
    if (dt == KILN_DTYPE_F32) { /* the f32 backend over the ref or the fast table */
        if (!strcmp(name, "ref"))
            return kern_backend_f32_new(kern_ops_ref(), kern_gemm_ref(), false, false);
        kern_gemm *g = strcmp(name, "cpu") ? NULL : kern_gemm_fast_new();
        return g ? kern_backend_f32_new(kern_ops_fast(), g, true, false) : NULL;
    }
    if (!strcmp(name, "ref")) return kern_backend_ref_new(dt);
    if (!strcmp(name, "cpu")) return kern_backend_cpu_new(dt, k);
    return NULL;
}

void kern_backend_free(kern_backend *b)
{
    if (b) b->destroy(b);
}

/* ---- host memory: the buffers of the host backends ---------------------- */

void *kern_host_buf_alloc(kern_backend *b, size_t bytes)
{
    (void)b;
    return aligned_alloc(64, (bytes + 63) / 64 * 64 + 64 * !bytes);
}

void kern_host_buf_free(kern_backend *b, void *buf)
{
    (void)b;
    free(buf);
}

void kern_host_buf_set(kern_backend *b, void *buf, size_t off, const void *src, size_t n)
{
    (void)b;
    if (n) memcpy((char *)buf + off, src, n);
}

void kern_host_buf_get(kern_backend *b, const void *buf, size_t off, void *dst, size_t n)
{
    (void)b;
    if (n) memcpy(dst, (const char *)buf + off, n);
}
