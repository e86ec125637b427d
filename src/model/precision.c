/*
 * precision.c — the model's compute precision: swaps the model's kernel
 * table and GEMM for the mixed-precision ones (kernels/x86/bf16_ops.c) or
 * back to the fp32 fast ones. Master weights stay fp32 in the parameter
 * block; the bf16/fp16 GEMM caches packed copies and refreshes them when
 * the model starts a forward pass.
 */
#include "kernels/x86/bf16_ops.h"
#include "model/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int kiln_precision_parse(const char *name)
{
    if (!name) return -1;
    if (!strcmp(name, "fp32") || !strcmp(name, "f32") || !strcmp(name, "float32"))
        return KILN_PRECISION_FP32;
    if (!strcmp(name, "bf16") || !strcmp(name, "bfloat16")) return KILN_PRECISION_BF16;
    if (!strcmp(name, "fp16") || !strcmp(name, "f16") || !strcmp(name, "float16"))
        return KILN_PRECISION_FP16;
    if (!strcmp(name, "auto")) return KILN_PRECISION_AUTO;
    return -1;
}

const char *kiln_precision_name(kiln_precision p)
{
    switch (p) {
    case KILN_PRECISION_FP32: return "fp32";
    case KILN_PRECISION_BF16: return "bf16";
    case KILN_PRECISION_FP16: return "fp16";
    case KILN_PRECISION_AUTO: return "auto";
    }
    return "?";
}

kiln_precision kiln_precision_resolve(kiln_precision p)
{
    if (p != KILN_PRECISION_AUTO) return p;
    const mp_caps *c = mp_cpu_caps();
    return c->amx_usable || c->avx512_bf16 ? KILN_PRECISION_BF16 : KILN_PRECISION_FP32;
}

void kiln_precision_describe(char *buf, size_t cap)
{
    const mp_caps *c = mp_cpu_caps();
    snprintf(buf, cap,
             "cpu: amx_bf16=%s avx512_bf16=%s f16c=%s; bf16/fp16 products on %s; auto = %s",
             c->amx_bf16 ? (c->amx_usable ? "yes" : "yes (kernel refused tile state)") : "no",
             c->avx512_bf16 ? "yes" : "no", c->f16c ? "yes" : "no",
             mp_backend_name(mp_backend_best()),
             kiln_precision_name(kiln_precision_resolve(KILN_PRECISION_AUTO)));
}

kiln_precision kiln_model_precision(const kiln_model *m)
{
    const char *n = m->ops ? m->ops->name : "";
    if (!strcmp(n, "bf16")) return KILN_PRECISION_BF16;
    if (!strcmp(n, "fp16")) return KILN_PRECISION_FP16;
    return KILN_PRECISION_FP32;
}

kiln_status kiln_model_set_precision(kiln_ctx *ctx, kiln_model *m, kiln_precision p)
{
    p = kiln_precision_resolve(p);
    if (p == kiln_model_precision(m)) return KILN_OK;
    if (p == KILN_PRECISION_FP32) {
        model_use_ref_kernels(m, false);
        return KILN_OK;
    }
    if (p != KILN_PRECISION_BF16 && p != KILN_PRECISION_FP16)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "precision %d is not one of fp32, bf16, fp16, auto", (int)p);
    /* KILN_BF16_KERNEL=amx|avx512|ref picks the kernel (tests of the
     * fallbacks; an unavailable one falls back to the best there is). */
    mp_backend be = MP_BACKEND_AUTO;
    const char *k = getenv("KILN_BF16_KERNEL");
    if (k && !strcmp(k, "amx")) be = MP_BACKEND_AMX;
    else if (k && !strcmp(k, "avx512")) be = MP_BACKEND_AVX512;
    else if (k && !strcmp(k, "ref")) be = MP_BACKEND_REF;
    kern_gemm *g = mp_kern_gemm_new(p == KILN_PRECISION_BF16 ? MP_BF16 : MP_F16, be);
    if (!g)
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory setting up %s kernels",
                         kiln_precision_name(p));
    kern_gemm_free(m->gemm);
    m->gemm = g;
    m->ops = mp_kern_ops(g);
    return KILN_OK;
}
