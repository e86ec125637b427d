/*
 * bf16_convert.c — fp32 <-> bf16 array conversions (round to nearest even,
 * NaN kept quiet, denormals kept: the same bits as the scalar
 * f32_to_bf16 of tensor/tensor.h on every path), CPU feature detection and backend
 * names for the mixed-precision kernels.
 */
#include "kernels/x86/bf16.h"
#include "kernels/kernels.h" /* kern_cpu_avx512 */

#include <pthread.h>
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define MP_X86 1
#endif

/* ---- CPU features ----------------------------------------------------- */

static mp_caps g_caps;
static pthread_once_t g_caps_once = PTHREAD_ONCE_INIT;

#if MP_X86
static uint64_t xgetbv0(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

static void caps_detect(void)
{
    memset(&g_caps, 0, sizeof g_caps);
#if MP_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return;
    bool osxsave = (c >> 27) & 1;
    bool f16c = (c >> 29) & 1;
    uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    bool ymm_ok = (xcr0 & 0x6) == 0x6;
    bool zmm_ok = ymm_ok && (xcr0 & 0xe0) == 0xe0;
    g_caps.f16c = f16c && ymm_ok;
    if (__get_cpuid_max(0, NULL) < 7) return;
    __cpuid_count(7, 0, a, b, c, d);
    bool avx512f = (b >> 16) & 1, avx512bw = (b >> 30) & 1,
         avx512vl = (b >> 31) & 1;
    g_caps.avx512f = zmm_ok && avx512f && avx512bw && avx512vl;
    g_caps.avx512_fp16 = g_caps.avx512f && ((d >> 23) & 1);
    bool amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
    g_caps.amx_bf16 = amx_bf16 && amx_tile;
    unsigned a1, b1, c1, d1;
    __cpuid_count(7, 1, a1, b1, c1, d1);
    g_caps.avx512_bf16 = g_caps.avx512f && ((a1 >> 5) & 1);
    if (g_caps.amx_bf16 && g_caps.avx512f) {
        /* Linux >= 5.16 hands out the 8 KiB tile state only on request. */
        enum { ARCH_GET_XCOMP_PERM = 0x1022, ARCH_REQ_XCOMP_PERM = 0x1023,
               XFEATURE_XTILEDATA = 18 };
        unsigned long bits = 0;
        if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 &&
            syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &bits) == 0 &&
            (bits & (1ul << XFEATURE_XTILEDATA)))
            g_caps.amx_usable = true;
    }
#endif
}

const mp_caps *mp_cpu_caps(void)
{
    pthread_once(&g_caps_once, caps_detect);
    return &g_caps;
}

bool mp_amx_usable(void) { return mp_cpu_caps()->amx_usable; }

bool kern_cpu_avx512(void) { return mp_cpu_caps()->avx512f; }

bool mp_backend_available(mp_backend b)
{
    const mp_caps *c = mp_cpu_caps();
    switch (b) {
    case MP_BACKEND_AUTO:
    case MP_BACKEND_REF: return true;
    case MP_BACKEND_AVX512: return c->avx512_bf16;
    case MP_BACKEND_AMX: return c->amx_usable;
    }
    return false;
}

mp_backend mp_backend_best(void)
{
    if (mp_backend_available(MP_BACKEND_AMX)) return MP_BACKEND_AMX;
    if (mp_backend_available(MP_BACKEND_AVX512)) return MP_BACKEND_AVX512;
    return MP_BACKEND_REF;
}

const char *mp_backend_name(mp_backend b)
{
    switch (b) {
    case MP_BACKEND_AUTO: return "auto";
    case MP_BACKEND_REF: return "ref";
    case MP_BACKEND_AVX512: return "avx512_bf16";
    case MP_BACKEND_AMX: return "amx_bf16";
    }
    return "?";
}

/* ---- fp32 <-> bf16 arrays --------------------------------------------- */

#if MP_X86
#define cvt16_f32_bf16 mp_f32x16_to_bf16

__attribute__((target("avx512f,avx512bw,avx512vl")))
static void f32_to_bf16_avx512(const float *x, uint16_t *y, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(y + i), cvt16_f32_bf16(_mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        __m256i v = cvt16_f32_bf16(_mm512_maskz_loadu_ps(m, x + i));
        _mm256_mask_storeu_epi16(y + i, m, v);
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
static void bf16_to_f32_avx512(const uint16_t *x, float *y, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + i)));
        _mm512_storeu_ps(y + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
    for (; i < n; i++) y[i] = bf16_to_f32(x[i]);
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
static void round_bf16_avx512(const float *x, float *y, size_t n)
{
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i v = _mm512_cvtepu16_epi32(cvt16_f32_bf16(_mm512_loadu_ps(x + i)));
        _mm512_storeu_ps(y + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
    for (; i < n; i++) y[i] = bf16_to_f32(f32_to_bf16(x[i]));
}
#endif

void mp_f32_to_bf16(const float *x, uint16_t *y, size_t n)
{
#if MP_X86
    if (mp_cpu_caps()->avx512f) { f32_to_bf16_avx512(x, y, n); return; }
#endif
    for (size_t i = 0; i < n; i++) y[i] = f32_to_bf16(x[i]);
}

void mp_bf16_to_f32(const uint16_t *x, float *y, size_t n)
{
#if MP_X86
    if (mp_cpu_caps()->avx512f) { bf16_to_f32_avx512(x, y, n); return; }
#endif
    for (size_t i = 0; i < n; i++) y[i] = bf16_to_f32(x[i]);
}

void mp_round_bf16(const float *x, float *y, size_t n)
{
#if MP_X86
    if (mp_cpu_caps()->avx512f) { round_bf16_avx512(x, y, n); return; }
#endif
    for (size_t i = 0; i < n; i++) y[i] = bf16_to_f32(f32_to_bf16(x[i]));
}
