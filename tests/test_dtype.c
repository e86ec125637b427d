/*
 * test_dtype.c — the one dtype enum and its traits (src/tensor/): the
 * enum's values against GGUF's type numbers, block sizes and bytes against
 * ggml's block structs, names, row sizes; bf16/fp16 rounding against an
 * independent computation in double (nearest candidate, ties to even,
 * NaN, overflow) and, through /usr/bin/python3, against numpy's float16
 * and PyTorch's bfloat16; Q8_0, Q4_0, Q4_K and Q6_K against hand-computed
 * blocks (known bytes -> known values, known values -> known bytes),
 * error bounds of the reference quantizers on random data, and
 * dequantization of random blocks against an independent numpy
 * transcription of the GGUF layouts (scripts/dtype_ref.py, written from
 * the format description, not from kiln's code).
 */
#include "check.h"
#include "tensor/tensor.h"

#include <stdint.h>
#include <stdio.h>
#include <unistd.h>

#define PY "/usr/bin/python3"

static const char *root(void)
{
    const char *r = getenv("KILN_ROOT");
    return r ? r : ".";
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd32(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state >> 16);
}
/* Roughly normal, scale s. */
static float rnd_normal(float s)
{
    float a = 0;
    for (int i = 0; i < 4; i++) a += (float)(rnd32() & 0xffffff) / 16777216.0f - 0.5f;
    return a * s * 1.7f;
}

static float u2f(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static uint32_t f2u(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* ---- the enum and the table ------------------------------------------- */

static void test_enum_is_gguf(void)
{
    /* GGUF's tensor type numbers (ggml.h, enum ggml_type). */
    CHECK_EQ(KILN_DTYPE_F32, 0);
    CHECK_EQ(KILN_DTYPE_F16, 1);
    CHECK_EQ(KILN_DTYPE_Q4_0, 2);
    CHECK_EQ(KILN_DTYPE_Q4_1, 3);
    CHECK_EQ(KILN_DTYPE_Q5_0, 6);
    CHECK_EQ(KILN_DTYPE_Q5_1, 7);
    CHECK_EQ(KILN_DTYPE_Q8_0, 8);
    CHECK_EQ(KILN_DTYPE_Q8_1, 9);
    CHECK_EQ(KILN_DTYPE_Q2_K, 10);
    CHECK_EQ(KILN_DTYPE_Q3_K, 11);
    CHECK_EQ(KILN_DTYPE_Q4_K, 12);
    CHECK_EQ(KILN_DTYPE_Q5_K, 13);
    CHECK_EQ(KILN_DTYPE_Q6_K, 14);
    CHECK_EQ(KILN_DTYPE_Q8_K, 15);
    CHECK_EQ(KILN_DTYPE_I8, 24);
    CHECK_EQ(KILN_DTYPE_I16, 25);
    CHECK_EQ(KILN_DTYPE_I32, 26);
    CHECK_EQ(KILN_DTYPE_I64, 27);
    CHECK_EQ(KILN_DTYPE_F64, 28);
    CHECK_EQ(KILN_DTYPE_BF16, 30);
    /* the safetensors-only types live where GGUF never goes */
    CHECK(KILN_DTYPE_U8 >= 1000 && KILN_DTYPE_BOOL >= 1000 && KILN_DTYPE_U16 >= 1000 &&
          KILN_DTYPE_U32 >= 1000 && KILN_DTYPE_U64 >= 1000);
}

static void test_traits_table(void)
{
    /* {type, GGUF name, safetensors name, block, bytes per block} from
     * ggml's type_traits and block structs (sizeof block_q4_K == 144 ...)
     * and the safetensors spec's dtype strings. */
    static const struct {
        kiln_dtype t;
        const char *name, *st;
        int64_t block;
        size_t bytes;
    } want[] = {
        {KILN_DTYPE_F32, "f32", "F32", 1, 4},      {KILN_DTYPE_F16, "f16", "F16", 1, 2},
        {KILN_DTYPE_Q4_0, "q4_0", NULL, 32, 18},   {KILN_DTYPE_Q4_1, "q4_1", NULL, 32, 20},
        {KILN_DTYPE_Q5_0, "q5_0", NULL, 32, 22},   {KILN_DTYPE_Q5_1, "q5_1", NULL, 32, 24},
        {KILN_DTYPE_Q8_0, "q8_0", NULL, 32, 34},   {KILN_DTYPE_Q8_1, "q8_1", NULL, 32, 36},
        {KILN_DTYPE_Q2_K, "q2_K", NULL, 256, 84},  {KILN_DTYPE_Q3_K, "q3_K", NULL, 256, 110},
        {KILN_DTYPE_Q4_K, "q4_K", NULL, 256, 144}, {KILN_DTYPE_Q5_K, "q5_K", NULL, 256, 176},
        {KILN_DTYPE_Q6_K, "q6_K", NULL, 256, 210}, {KILN_DTYPE_Q8_K, "q8_K", NULL, 256, 292},
        {KILN_DTYPE_I8, "i8", "I8", 1, 1},         {KILN_DTYPE_I16, "i16", "I16", 1, 2},
        {KILN_DTYPE_I32, "i32", "I32", 1, 4},      {KILN_DTYPE_I64, "i64", "I64", 1, 8},
        {KILN_DTYPE_F64, "f64", "F64", 1, 8},      {KILN_DTYPE_BF16, "bf16", "BF16", 1, 2},
        {KILN_DTYPE_U8, "u8", "U8", 1, 1},         {KILN_DTYPE_BOOL, "bool", "BOOL", 1, 1},
        {KILN_DTYPE_U16, "u16", "U16", 1, 2},      {KILN_DTYPE_U32, "u32", "U32", 1, 4},
        {KILN_DTYPE_U64, "u64", "U64", 1, 8},
    };
    int nw = (int)(sizeof want / sizeof want[0]);
    CHECK_EQ(dtype_count(), nw);
    for (int i = 0; i < nw; i++) {
        const dtype_traits *tr = dtype_traits_of(want[i].t);
        CHECK_MSG(tr != NULL, "no traits for %d", (int)want[i].t);
        if (!tr) continue;
        CHECK_EQ(tr->type, want[i].t);
        CHECK_EQ(dtype_list[i], want[i].t);
        CHECK_STREQ(tr->name, want[i].name);
        CHECK_STREQ(kiln_dtype_name(want[i].t), want[i].name);
        CHECK(kiln_dtype_valid((int)want[i].t));
        if (want[i].st) {
            CHECK_STREQ(tr->st_name, want[i].st);
            CHECK_EQ(dtype_from_st_name(want[i].st), want[i].t);
        } else {
            CHECK(tr->st_name == NULL);
        }
        CHECK_EQ(tr->block, want[i].block);
        CHECK_EQ(tr->block_bytes, want[i].bytes);
        CHECK_EQ(tr->quantized, want[i].block > 1);
        CHECK_EQ(dtype_row_bytes(want[i].t, 4096), (size_t)(4096 / want[i].block) * want[i].bytes);
    }
    /* what is not a dtype */
    for (int t = 0; t < 1100; t++) {
        bool known = false;
        for (int i = 0; i < nw; i++) known |= (int)want[i].t == t;
        CHECK_EQ(kiln_dtype_valid(t), known);
    }
    CHECK(!kiln_dtype_valid(-1));
    CHECK_STREQ(kiln_dtype_name((kiln_dtype)16), "?");
    CHECK_EQ(dtype_from_st_name("Q4_0"), -1);
    CHECK_EQ(dtype_from_st_name("f32"), -1); /* safetensors spells it F32 */
    CHECK_EQ(dtype_row_bytes(KILN_DTYPE_Q4_K, 255), (size_t)-1);
    CHECK_EQ(dtype_row_bytes(KILN_DTYPE_Q8_0, 64), 68);
    CHECK_EQ(dtype_row_bytes(KILN_DTYPE_F32, -1), (size_t)-1);
    CHECK_EQ(dtype_row_bytes(KILN_DTYPE_F32, INT64_MAX), (size_t)-1);
    CHECK_EQ(dtype_row_bytes((kiln_dtype)5, 32), (size_t)-1);
}

/* ---- bf16 / fp16 rounding against an independent computation --------- */

/* Value of a bf16 pattern in double, with the overflow pattern 0x7f80
 * standing for 2^128 (where IEEE rounding measures the distance to). */
static double bf16_val(uint32_t h)
{
    double m = ldexp(1.0, 128);
    uint32_t e = (h >> 7) & 0xff, f = h & 0x7f;
    double v = e == 0 ? ldexp((double)f, -133) : e == 255 ? m : ldexp(128.0 + f, (int)e - 134);
    return (h & 0x8000) ? -v : v;
}

/* bf16 nearest to the finite float x, ties to even, by comparing the two
 * neighbours' distances in double (no bit tricks). */
static uint16_t bf16_nearest(float x)
{
    uint32_t u = f2u(x);
    uint32_t lo = u >> 16, hi = lo + 1; /* magnitudes around |x| */
    double dx = fabs((double)x), dl = fabs(bf16_val(lo & 0x7fff)), dh = fabs(bf16_val(hi & 0x7fff));
    uint32_t r;
    if (dx - dl < dh - dx) r = lo;
    else if (dx - dl > dh - dx) r = hi;
    else r = (lo & 1) ? hi : lo;
    return (uint16_t)r;
}

static double f16_val(uint16_t h)
{
    uint32_t e = (h >> 10) & 0x1f, f = h & 0x3ff;
    double v = e == 0 ? ldexp((double)f, -24) : e == 31 ? ldexp(1.0, 16) : ldexp(1024.0 + f, (int)e - 25);
    return (h & 0x8000) ? -v : v;
}

static uint16_t f16_nearest(float x)
{
    /* scan the 32768 magnitudes (bisection on the ordered patterns) */
    double ax = fabs((double)x);
    uint32_t lo = 0, hi = 0x7c00; /* f16_val(0x7c00) = 2^16: the overflow point */
    while (hi - lo > 1) {
        uint32_t mid = (lo + hi) / 2;
        if (f16_val((uint16_t)mid) <= ax) lo = mid;
        else hi = mid;
    }
    if (f16_val((uint16_t)hi) <= ax) lo = hi;
    double dl = ax - f16_val((uint16_t)lo), dh = f16_val((uint16_t)(lo + 1)) - ax;
    uint32_t r = lo >= 0x7c00 ? 0x7c00 : dl < dh ? lo : dl > dh ? lo + 1 : (lo & 1) ? lo + 1 : lo;
    if (r > 0x7c00) r = 0x7c00;
    return (uint16_t)(r | ((f2u(x) >> 16) & 0x8000));
}

static uint32_t edge_or_random(int i)
{
    static const uint32_t edges[] = {
        0x00000000, 0x80000000, 0x3f800000, 0x3f808000, 0x3f818000, 0x3f80ffff, 0x3f807fff,
        0x7f7fffff, 0x7f7f8000, 0x7f7f7fff, 0xff7fffff, 0x7f800000, 0xff800000, 0x00000001,
        0x00008000, 0x00018000, 0x007fffff, 0x00800000, 0x477fe000, 0x477ff000, 0x477fefff,
        0x33000000, 0x33000001, 0x387fc000, 0x38800000, 0x38000000, 0x3a800000, 0xc7800000,
        0x477fffff, 0x387fe000, 0x33800000, 0x33c00000, 0x34000000,
    };
    int ne = (int)(sizeof edges / sizeof edges[0]);
    if (i < ne) return edges[i];
    uint32_t u = rnd32();
    /* half of them near the interesting exponents (fp16's range, ties) */
    if (i & 1) u = (u & 0x80ffffff) | ((uint32_t)(100 + (rnd32() % 60)) << 23);
    if ((i & 6) == 2) u = (u & ~0xffffu) | 0x8000u; /* exact bf16 tie */
    if ((i & 6) == 4) u = (u & ~0x1fffu) | 0x1000u; /* exact fp16 tie (normal range) */
    return u;
}

static void test_bf16_rounding(void)
{
    long bad = 0;
    for (int i = 0; i < 400000; i++) {
        uint32_t u = edge_or_random(i);
        float x = u2f(u);
        uint16_t h = f32_to_bf16(x);
        if (x != x) {
            /* NaN stays NaN, quiet, sign kept */
            bool ok = (h & 0x7f80) == 0x7f80 && (h & 0x7f) && (h & 0x40) && (h >> 15) == (u >> 31);
            if (!ok && bad++ < 5) fprintf(stderr, "  NaN %08x -> %04x\n", u, h);
            continue;
        }
        uint16_t want = (uint16_t)((isinf(x) ? 0x7f80 : bf16_nearest(x)) | ((u >> 16) & 0x8000));
        if (h != want && bad++ < 5) fprintf(stderr, "  bf16(%08x) = %04x, want %04x\n", u, h, want);
        /* and back: exact widening */
        if (f2u(bf16_to_f32(h)) != (uint32_t)h << 16 && bad++ < 5) fprintf(stderr, "  widen %04x\n", h);
    }
    CHECK_EQ(bad, 0);
    CHECK_EQ(f32_to_bf16(u2f(0x7f7fffff)), 0x7f80); /* overflow -> inf */
    CHECK_EQ(f32_to_bf16(1.0f + 1.0f / 256), 0x3f80); /* tie to even (down) */
    CHECK_EQ(f32_to_bf16(1.0f + 3.0f / 256), 0x3f82); /* tie to even (up) */
    CHECK_EQ(f32_to_bf16(u2f(0xffc00001)), 0xffc0);
    CHECK_EQ(f32_to_bf16(u2f(0x7f800001)), 0x7fc0); /* signalling -> quiet */
    /* the bulk form gives the scalar's bits */
    float xs[37];
    uint16_t a[37];
    for (int i = 0; i < 37; i++) xs[i] = u2f(edge_or_random(i));
    f32_to_bf16_n(a, xs, 37);
    for (int i = 0; i < 37; i++) CHECK_EQ(a[i], f32_to_bf16(xs[i]));
}

static void test_f16_rounding(void)
{
    long bad = 0;
    /* every fp16 pattern widens to its value */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = f16_to_f32((uint16_t)h);
        uint32_t e = (h >> 10) & 0x1f;
        if (e == 31) {
            bool ok = (h & 0x3ff) ? f != f : isinf(f) && (signbit(f) != 0) == ((h >> 15) != 0);
            if (!ok && bad++ < 5) fprintf(stderr, "  f16 %04x -> %g\n", h, f);
        } else if ((double)f != f16_val((uint16_t)h) && bad++ < 5) {
            fprintf(stderr, "  f16 %04x -> %.9g, want %.9g\n", h, f, f16_val((uint16_t)h));
        }
    }
    for (int i = 0; i < 200000; i++) {
        uint32_t u = edge_or_random(i);
        float x = u2f(u);
        uint16_t h = f32_to_f16(x);
        if (x != x) {
            bool ok = (h & 0x7c00) == 0x7c00 && (h & 0x3ff) && (h & 0x200);
            if (!ok && bad++ < 5) fprintf(stderr, "  NaN %08x -> %04x\n", u, h);
            continue;
        }
        uint16_t want = isinf(x) ? (uint16_t)(0x7c00 | ((u >> 16) & 0x8000)) : f16_nearest(x);
        if (h != want && bad++ < 5) fprintf(stderr, "  f16(%08x) = %04x, want %04x\n", u, h, want);
    }
    CHECK_EQ(bad, 0);
    CHECK_EQ(f32_to_f16(65504.0f), 0x7bff);
    CHECK_EQ(f32_to_f16(65520.0f), 0x7c00); /* halfway to 2^16: to inf */
    CHECK_EQ(f32_to_f16(u2f(0x33000000)), 0x0000); /* half the smallest subnormal: even */
    CHECK_EQ(f32_to_f16(u2f(0x33000001)), 0x0001);
}

/* ---- quantized types: known answers ----------------------------------- */

static void test_q8_0_known(void)
{
    /* bytes -> values: d = 2.0 (fp16 0x4000), q[j] = j - 16 */
    uint8_t b[34] = {0x00, 0x40};
    for (int j = 0; j < 32; j++) b[2 + j] = (uint8_t)(int8_t)(j - 16);
    float y[32];
    dtype_traits_of(KILN_DTYPE_Q8_0)->to_float(b, y, 32);
    for (int j = 0; j < 32; j++) CHECK_EQ(y[j], 2.0f * (j - 16));
    /* values -> bytes: max |x| = 127 gives d = 1 (0x3c00), q = round(x)
     * (half away from zero, as roundf and ggml do) */
    float x[32];
    for (int j = 0; j < 32; j++) x[j] = (float)(j * 7 - 100) + (j % 3 == 0 ? 0.5f : 0.25f);
    x[31] = -127.0f;
    uint8_t q[34];
    dtype_traits_of(KILN_DTYPE_Q8_0)->from_float(x, q, 32);
    CHECK_EQ(q[0], 0x00);
    CHECK_EQ(q[1], 0x3c);
    for (int j = 0; j < 31; j++) {
        int want = (j * 7 - 100) + (j % 3 == 0 ? ((j * 7 - 100) >= 0 ? 1 : 0) : 0);
        CHECK_EQ((int8_t)q[2 + j], want);
    }
    CHECK_EQ((int8_t)q[33], -127);
    /* all zero: d = 0, q = 0 */
    memset(x, 0, sizeof x);
    dtype_traits_of(KILN_DTYPE_Q8_0)->from_float(x, q, 32);
    for (int j = 0; j < 34; j++) CHECK_EQ(q[j], 0);
}

static void test_q4_0_known(void)
{
    /* bytes -> values: d = 0.5 (0x3800); qs[j] = j | (15 - j) << 4, so
     * element j (low nibble) is (j - 8) / 2 and element j + 16 (high) is
     * (7 - j) / 2 */
    uint8_t b[18] = {0x00, 0x38};
    for (int j = 0; j < 16; j++) b[2 + j] = (uint8_t)(j | ((15 - j) << 4));
    float y[32];
    dtype_traits_of(KILN_DTYPE_Q4_0)->to_float(b, y, 32);
    for (int j = 0; j < 16; j++) {
        CHECK_EQ(y[j], 0.5f * (float)(j - 8));
        CHECK_EQ(y[j + 16], 0.5f * (float)(7 - j));
    }
    /* values -> bytes: the largest magnitude is -8, so d = -8 / -8 = 1 and
     * q = x + 8; the same pattern comes back */
    float x[32];
    for (int j = 0; j < 16; j++) {
        x[j] = (float)(j - 8);
        x[j + 16] = (float)(7 - j);
    }
    uint8_t q[18];
    dtype_traits_of(KILN_DTYPE_Q4_0)->from_float(x, q, 32);
    CHECK_EQ(q[0], 0x00);
    CHECK_EQ(q[1], 0x3c);
    for (int j = 0; j < 16; j++) CHECK_EQ(q[2 + j], (uint8_t)(j | ((15 - j) << 4)));
    /* a positive maximum makes d negative: x = 8 at element 3 -> d = -1,
     * q(8) = 0; x = -7 -> q = 15 */
    memset(x, 0, sizeof x);
    x[3] = 8.0f;
    x[20] = -7.0f;
    dtype_traits_of(KILN_DTYPE_Q4_0)->from_float(x, q, 32);
    CHECK_EQ(q[0], 0x00);
    CHECK_EQ(q[1], 0xbc); /* -1.0 */
    CHECK_EQ(q[2 + 3] & 0x0f, 0);
    CHECK_EQ(q[2 + 4] >> 4, 15);
    CHECK_EQ(q[2 + 0], 0x88); /* zeros are 8 */
}

/* Packs Q4_K's eight 6-bit (scale, min) pairs as the format describes. */
static void pack_k4(uint8_t s[12], const int sc[8], const int m[8])
{
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        s[j + 4] = (uint8_t)((m[j] & 63) | ((m[j + 4] >> 4) << 6));
        s[j + 8] = (uint8_t)((sc[j + 4] & 15) | ((m[j + 4] & 15) << 4));
    }
}

static void test_q4_k_known(void)
{
    /* d = 1 (0x3c00), dmin = 0.5 (0x3800), sub-block scales and mins
     * with values >= 16 in the upper four (their top bits live elsewhere) */
    const int sc[8] = {1, 2, 3, 4, 17, 33, 63, 5}, m[8] = {0, 2, 4, 6, 40, 1, 20, 63};
    uint8_t b[144] = {0x00, 0x3c, 0x00, 0x38};
    pack_k4(b + 4, sc, m);
    for (int i = 0; i < 128; i++) b[16 + i] = (uint8_t)((i & 15) | ((15 - (i & 15)) << 4));
    float y[256];
    dtype_traits_of(KILN_DTYPE_Q4_K)->to_float(b, y, 256);
    /* element e: chunk c = e / 64, r = e % 64; r < 32: low nibble of
     * qs[32c + r], sub-block 2c; else high nibble of qs[32c + r - 32],
     * sub-block 2c + 1 */
    for (int e = 0; e < 256; e++) {
        int c = e / 64, r = e % 64, sb = 2 * c + (r >= 32), l = r % 32;
        int byte = (32 * c + l) & 15;
        int qv = r < 32 ? byte : 15 - byte;
        float want = 1.0f * (float)sc[sb] * (float)qv - 0.5f * (float)m[sb];
        if (y[e] != want) {
            CHECK_MSG(y[e] == want, "q4_K element %d: %g, want %g", e, y[e], want);
            break;
        }
    }
    /* two by hand: element 200 = chunk 3, r 8: low nibble of qs[104] (= 8),
     * sub-block 6 (sc 63, m 20): 63 * 8 - 0.5 * 20 = 494; element 100 =
     * chunk 1, r 36: high nibble of qs[36] (15 - 4 = 11), sub-block 3
     * (sc 4, m 6): 44 - 3 = 41 */
    CHECK_EQ(y[200], 494.0f);
    CHECK_EQ(y[100], 41.0f);
}

static void test_q6_k_known(void)
{
    /* d = 0.25 (0x3400); scales[g] = g - 8 (signed); level (q - 32) of
     * element e = (e % 64) - 32 */
    uint8_t b[210] = {0};
    int lv[256];
    for (int e = 0; e < 256; e++) lv[e] = e % 64;
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const int *L = lv + 128 * h;
            b[64 * h + l] = (uint8_t)((L[l] & 15) | ((L[l + 64] & 15) << 4));
            b[64 * h + 32 + l] = (uint8_t)((L[l + 32] & 15) | ((L[l + 96] & 15) << 4));
            b[128 + 32 * h + l] = (uint8_t)((L[l] >> 4) | ((L[l + 32] >> 4) << 2) |
                                            ((L[l + 64] >> 4) << 4) | ((L[l + 96] >> 4) << 6));
        }
    for (int g = 0; g < 16; g++) b[192 + g] = (uint8_t)(int8_t)(g - 8);
    b[208] = 0x00;
    b[209] = 0x34;
    float y[256];
    dtype_traits_of(KILN_DTYPE_Q6_K)->to_float(b, y, 256);
    for (int e = 0; e < 256; e++) {
        float want = 0.25f * (float)(e / 16 - 8) * (float)(e % 64 - 32);
        if (y[e] != want) {
            CHECK_MSG(y[e] == want, "q6_K element %d: %g, want %g", e, y[e], want);
            break;
        }
    }
    /* by hand: element 170: group 10 (scale 2), level 170 % 64 - 32 = 10:
     * 0.25 * 2 * 10 = 5 */
    CHECK_EQ(y[170], 5.0f);
}

/* ---- quantizers: error bounds on random data -------------------------- */

static void rand_row(float *x, int n, float s)
{
    for (int i = 0; i < n; i++) x[i] = rnd_normal(s);
    /* an outlier now and then, and some exact zeros */
    x[rnd32() % (unsigned)n] *= 6.0f;
    x[rnd32() % (unsigned)n] = 0.0f;
}

static void test_q8_0_error(void)
{
    enum { N = 32 * 64 };
    static float x[N], y[N];
    static uint8_t q[N / 32 * 34];
    const dtype_traits *tr = dtype_traits_of(KILN_DTYPE_Q8_0);
    for (int rep = 0; rep < 8; rep++) {
        rand_row(x, N, rep ? 0.02f * (float)rep : 1e-3f);
        tr->from_float(x, q, N);
        tr->to_float(q, y, N);
        for (int i = 0; i < N / 32; i++) {
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[32 * i + j]));
            double d = amax / 127.0, d16 = f16_to_f32((uint16_t)(q[34 * i] | q[34 * i + 1] << 8));
            /* half a step, plus what storing d in fp16 moved the levels */
            double bound = 0.5 * d + 127 * fabs(d - d16) + 1e-12;
            for (int j = 0; j < 32; j++) {
                double e = fabs((double)x[32 * i + j] - y[32 * i + j]);
                if (!(e <= bound)) {
                    CHECK_MSG(e <= bound, "q8_0 block %d element %d: |err| %g > %g", i, j, e, bound);
                    return;
                }
            }
        }
    }
}

static void test_q4_0_error(void)
{
    enum { N = 32 * 64 };
    static float x[N], y[N];
    static uint8_t q[N / 32 * 18];
    const dtype_traits *tr = dtype_traits_of(KILN_DTYPE_Q4_0);
    for (int rep = 0; rep < 8; rep++) {
        rand_row(x, N, 0.05f * (float)(rep + 1));
        tr->from_float(x, q, N);
        tr->to_float(q, y, N);
        for (int i = 0; i < N / 32; i++) {
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[32 * i + j]));
            double d = amax / 8.0, d16 = fabs(f16_to_f32((uint16_t)(q[18 * i] | q[18 * i + 1] << 8)));
            for (int j = 0; j < 32; j++) {
                double xv = x[32 * i + j], e = fabs(xv - y[32 * i + j]);
                /* half a step, a whole one where level 16 was cut to 15
                 * (values on the other side of the maximum's sign) */
                double bound = (fabs(xv) > 7.5 * d ? 1.0 : 0.5) * d + 8 * fabs(d - d16) + 1e-12;
                if (!(e <= bound)) {
                    CHECK_MSG(e <= bound, "q4_0 block %d element %d: |err| %g > %g", i, j, e, bound);
                    return;
                }
            }
        }
    }
}

/* Root-mean-square error of the round trip relative to the rms of x,
 * over many super-blocks of normal data with outliers; and the largest
 * error relative to the super-block's largest |x|. */
static void k_error(kiln_dtype t, double max_rel_rms, double max_rel_abs)
{
    enum { N = 256 * 48 };
    static float x[N], y[N];
    static uint8_t q[N / 256 * 210 + 64];
    const dtype_traits *tr = dtype_traits_of(t);
    double se = 0, sx = 0, worst = 0;
    for (int rep = 0; rep < 4; rep++) {
        rand_row(x, N, 0.03f * (float)(rep + 1));
        if (rep == 3)
            for (int i = 0; i < N; i++) x[i] = fabsf(x[i]) + 0.01f; /* all positive (min 0 unused) */
        tr->from_float(x, q, N);
        tr->to_float(q, y, N);
        for (int i = 0; i < N / 256; i++) {
            double amax = 0;
            for (int j = 0; j < 256; j++) amax = fmax(amax, fabs(x[256 * i + j]));
            for (int j = 0; j < 256; j++) {
                double e = (double)x[256 * i + j] - y[256 * i + j];
                se += e * e;
                sx += (double)x[256 * i + j] * x[256 * i + j];
                worst = check_max(worst, fabs(e) / amax);
            }
        }
    }
    double rel = sqrt(se / sx);
    CHECK_MSG(rel <= max_rel_rms, "%s: relative rms error %g > %g", kiln_dtype_name(t), rel,
              max_rel_rms);
    CHECK_MSG(worst <= max_rel_abs, "%s: largest error %g of max|x| > %g", kiln_dtype_name(t),
              worst, max_rel_abs);
}

/* 4 bits with a fitted min: ~1/15 of a sub-block's range per step; 6 bits
 * in groups of 16: ~1/63. The quantizers reach rms 0.054 and 0.017,
 * largest 0.078 and 0.016 of max|x| on this (fixed-seed) data; the bounds
 * leave some room, not a factor. */
static void test_q4_k_error(void) { k_error(KILN_DTYPE_Q4_K, 0.07, 0.10); }
static void test_q6_k_error(void) { k_error(KILN_DTYPE_Q6_K, 0.021, 0.022); }

static void test_quant_zeros(void)
{
    static const kiln_dtype ts[] = {KILN_DTYPE_Q8_0, KILN_DTYPE_Q4_0, KILN_DTYPE_Q4_K,
                                    KILN_DTYPE_Q6_K};
    float x[256] = {0}, y[256];
    uint8_t q[512]; /* 256 elements are 272 bytes in Q8_0: room, and a margin checked */
    for (int k = 0; k < 4; k++) {
        const dtype_traits *tr = dtype_traits_of(ts[k]);
        size_t bytes = (size_t)(256 / tr->block) * tr->block_bytes;
        CHECK(bytes <= sizeof q);
        if (bytes > sizeof q) continue;
        memset(q, 0xab, sizeof q);
        tr->from_float(x, q, 256);
        tr->to_float(q, y, 256);
        for (int i = 0; i < 256; i++) CHECK_MSG(y[i] == 0.0f, "%s: zeros -> %g", tr->name, y[i]);
        /* the quantizer wrote its row and nothing past it */
        size_t past = 0;
        for (size_t i = bytes; i < sizeof q; i++) past += q[i] != 0xab;
        CHECK_MSG(past == 0, "%s: %zu bytes written past the %zu-byte row", tr->name, past, bytes);
    }
}

/* ---- against numpy / PyTorch (scripts/dtype_ref.py) ------------------- */

static bool have_numpy(void)
{
    return access(PY, X_OK) == 0 && system(PY " -c 'import numpy' >/dev/null 2>&1") == 0;
}

static bool write_file(const char *dir, const char *name, const void *p, size_t n)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f) return false;
    bool ok = fwrite(p, 1, n, f) == n;
    return fclose(f) == 0 && ok;
}

/* A random block of type t whose fp16 scale fields hold finite values of
 * moderate size (every other byte random). */
static void rand_block(kiln_dtype t, uint8_t *b)
{
    const dtype_traits *tr = dtype_traits_of(t);
    for (size_t i = 0; i < tr->block_bytes; i++) b[i] = (uint8_t)rnd32();
    uint16_t h;
#define F16_AT(off)                                                                  \
    do {                                                                             \
        h = f32_to_f16(rnd_normal(0.05f));                                           \
        memcpy(b + (off), &h, 2);                                                    \
    } while (0)
    switch (t) {
    case KILN_DTYPE_Q8_0:
    case KILN_DTYPE_Q4_0: F16_AT(0); break;
    case KILN_DTYPE_Q4_K: F16_AT(0); F16_AT(2); break;
    case KILN_DTYPE_Q6_K: F16_AT(208); break;
    default: break;
    }
#undef F16_AT
}

static void test_vs_numpy(void)
{
    if (!have_numpy()) SKIP("/usr/bin/python3 has no numpy (apt-get install python3-numpy)");
    char dir[] = "/tmp/kiln-dtype-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    /* float conversions: random and edge fp32 patterns, kiln's bf16 and
     * fp16 bits of each */
    enum { NF = 1 << 16 };
    static uint32_t fx[NF];
    static uint16_t fb[NF], fh[NF];
    for (int i = 0; i < NF; i++) fx[i] = edge_or_random(i);
    for (int i = 0; i < NF; i++) {
        fb[i] = f32_to_bf16(u2f(fx[i]));
        fh[i] = f32_to_f16(u2f(fx[i]));
    }
    bool ok = write_file(dir, "f32.bin", fx, sizeof fx) && write_file(dir, "bf16.bin", fb, sizeof fb) &&
              write_file(dir, "f16.bin", fh, sizeof fh);
    /* quantized: random blocks and kiln's values of them; random rows and
     * kiln's Q8_0 / Q4_0 bytes of them */
    static const kiln_dtype ts[] = {KILN_DTYPE_Q8_0, KILN_DTYPE_Q4_0, KILN_DTYPE_Q4_K,
                                    KILN_DTYPE_Q6_K};
    enum { NB = 64 };
    static uint8_t blk[NB * 256];
    static float val[NB * 256];
    for (int k = 0; k < 4; k++) {
        const dtype_traits *tr = dtype_traits_of(ts[k]);
        for (int i = 0; i < NB; i++) rand_block(ts[k], blk + (size_t)i * tr->block_bytes);
        tr->to_float(blk, val, NB * tr->block);
        char nm[64];
        snprintf(nm, sizeof nm, "%s.blocks", tr->name);
        ok = ok && write_file(dir, nm, blk, NB * tr->block_bytes);
        snprintf(nm, sizeof nm, "%s.values", tr->name);
        ok = ok && write_file(dir, nm, val, (size_t)(NB * tr->block) * 4);
    }
    static float row[32 * NB];
    static uint8_t q[34 * NB];
    rand_row(row, 32 * NB, 0.1f);
    row[5] = 0.5f; /* some exact halves for the rounding rules */
    row[6] = -0.5f;
    ok = ok && write_file(dir, "row.f32", row, sizeof row);
    dtype_traits_of(KILN_DTYPE_Q8_0)->from_float(row, q, 32 * NB);
    ok = ok && write_file(dir, "row.q8_0", q, 34 * NB);
    dtype_traits_of(KILN_DTYPE_Q4_0)->from_float(row, q, 32 * NB);
    ok = ok && write_file(dir, "row.q4_0", q, 18 * NB);
    CHECK(ok);
    char cmd[1024];
    snprintf(cmd, sizeof cmd, PY " '%s/scripts/dtype_ref.py' '%s' > '%s/log' 2>&1", root(), dir, dir);
    int rc = system(cmd);
    snprintf(cmd, sizeof cmd, "%s/log", dir);
    FILE *f = fopen(cmd, "r");
    char line[512];
    int oks = 0;
    while (f && fgets(line, sizeof line, f)) {
        if (!strncmp(line, "ok ", 3)) oks++;
        else fprintf(stderr, "  [dtype_ref] %s", line);
    }
    if (f) fclose(f);
    CHECK_MSG(rc == 0, "scripts/dtype_ref.py exited %d (lines above)", rc);
    CHECK_MSG(oks == 10, "dtype_ref.py: %d comparisons passed, want 10", oks);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "  could not remove %s\n", dir);
}

int main(void)
{
    RUN_TEST(test_enum_is_gguf);
    RUN_TEST(test_traits_table);
    RUN_TEST(test_bf16_rounding);
    RUN_TEST(test_f16_rounding);
    RUN_TEST(test_q8_0_known);
    RUN_TEST(test_q4_0_known);
    RUN_TEST(test_q4_k_known);
    RUN_TEST(test_q6_k_known);
    RUN_TEST(test_q8_0_error);
    RUN_TEST(test_q4_0_error);
    RUN_TEST(test_q4_k_error);
    RUN_TEST(test_q6_k_error);
    RUN_TEST(test_quant_zeros);
    RUN_TEST(test_vs_numpy);
    return TEST_EXIT();
}
