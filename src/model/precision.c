/*
 * precision.c — the model's compute precision: installs the cpu backend
 * for bf16 / fp16 (kernels.h's kern_backend: its op table and GEMM) or
 * the fp32 fast kernels (AUTO is decided in precision_auto.c). Master weights stay fp32 in the parameter block;
 * the backend keeps its prepared copies current (a new weight epoch at
 * the start of every forward pass).
 */
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
    return kern_cpu_bf16() ? KILN_PRECISION_BF16 : KILN_PRECISION_FP32;
}

void kiln_precision_describe(char *buf, size_t cap)
{
    char cpu[256];
    kern_cpu_describe(cpu, sizeof cpu);
    snprintf(buf, cap, "%s; auto by the table alone = %s", cpu,
             kiln_precision_name(kiln_precision_resolve(KILN_PRECISION_AUTO)));
}

/* The compute dtype of the model's backend (none: the fp32 kernels). */
kiln_precision kiln_model_precision(const kiln_model *m)
{
    if (!m->be) return KILN_PRECISION_FP32;
    return m->be->dtype == KILN_DTYPE_F16 ? KILN_PRECISION_FP16 : KILN_PRECISION_BF16;
}

int kiln_bf16_kernel_parse(const char *name)
{
    if (!name) return -1;
    if (!strcmp(name, "auto")) return KILN_BF16_KERNEL_AUTO;
    if (!strcmp(name, "ref")) return KILN_BF16_KERNEL_REF;
    if (!strcmp(name, "avx512")) return KILN_BF16_KERNEL_AVX512;
    if (!strcmp(name, "amx")) return KILN_BF16_KERNEL_AMX;
    return -1;
}

const char *kiln_bf16_kernel_name(kiln_bf16_kernel k)
{
    switch (k) {
    case KILN_BF16_KERNEL_AUTO: return "auto";
    case KILN_BF16_KERNEL_REF: return "ref";
    case KILN_BF16_KERNEL_AVX512: return "avx512";
    case KILN_BF16_KERNEL_AMX: return "amx";
    }
    return "?";
}

kiln_precision_opts kiln_precision_opts_default(void)
{
    return (kiln_precision_opts){.precision = KILN_PRECISION_AUTO,
                                 .bf16_kernel = KILN_BF16_KERNEL_AUTO,
                                 .bf16_acts = true};
}

/* Installs the kernels of precision p (resolved) with m's kernel choice,
 * rebuilding the mixed-precision GEMM when the precision or the kernel
 * asked for changed. */
static kiln_status apply(kiln_ctx *ctx, kiln_model *m, kiln_precision p, bool kernel_changed)
{
    if (p == kiln_model_precision(m) && !kernel_changed) return KILN_OK;
    if (p == KILN_PRECISION_FP32) {
        model_use_ref_kernels(m, false);
        return KILN_OK;
    }
    kern_backend *be = kern_backend_new(
        "cpu", p == KILN_PRECISION_BF16 ? KILN_DTYPE_BF16 : KILN_DTYPE_F16, m->bf16_kernel);
    if (!be)
        return kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory setting up %s kernels",
                         kiln_precision_name(p));
    model_use_backend(m, be);
    return KILN_OK;
}

static bool precision_ok(kiln_precision p)
{
    return p == KILN_PRECISION_FP32 || p == KILN_PRECISION_BF16 || p == KILN_PRECISION_FP16 ||
           p == KILN_PRECISION_AUTO;
}

kiln_status kiln_model_set_precision(kiln_ctx *ctx, kiln_model *m, kiln_precision p)
{
    if (!precision_ok(p))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "precision %d is not one of fp32, bf16, fp16, auto", (int)p);
    if (p == KILN_PRECISION_AUTO) p = kiln_precision_auto(ctx, m->bf16_kernel, NULL);
    return apply(ctx, m, p, false);
}

kiln_status kiln_model_set_precision_opts(kiln_ctx *ctx, kiln_model *m,
                                          const kiln_precision_opts *o)
{
    if (!precision_ok(o->precision))
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_precision_opts.precision = %d is not one of "
                         "KILN_PRECISION_FP32, _BF16, _FP16, _AUTO",
                         (int)o->precision);
    if (o->bf16_kernel < KILN_BF16_KERNEL_AUTO || o->bf16_kernel > KILN_BF16_KERNEL_AMX)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "kiln_precision_opts.bf16_kernel = %d is not one of "
                         "KILN_BF16_KERNEL_AUTO, _REF, _AVX512, _AMX",
                         (int)o->bf16_kernel);
    bool changed = o->bf16_kernel != m->bf16_kernel;
    kiln_bf16_kernel keep = m->bf16_kernel;
    m->bf16_kernel = o->bf16_kernel;
    kiln_precision p = o->precision;
    if (p == KILN_PRECISION_AUTO) p = kiln_precision_auto(ctx, o->bf16_kernel, NULL);
    kiln_status s = apply(ctx, m, p, changed);
    if (s) {
        m->bf16_kernel = keep;
        return s;
    }
    m->bf16_f32_acts = !o->bf16_acts;
    return KILN_OK;
}

kiln_precision_opts kiln_model_precision_opts(const kiln_model *m)
{
    kiln_precision p = kiln_model_precision(m);
    return (kiln_precision_opts){
        .precision = p,
        .bf16_kernel = p == KILN_PRECISION_FP32 ? KILN_BF16_KERNEL_AUTO
                                                : kern_backend_kernel(m->be),
        .bf16_acts = !m->bf16_f32_acts};
}
