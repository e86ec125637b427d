/*
 * attn_fast.c — the fast table's attention (kern_ops_fast): a tiled flash
 * attention, forward and backward, on its own register-blocked FMA
 * micro-kernel; OpenMP over (batch, head, query block), deterministic for
 * any thread count. Compiled without AVX-512 the same code runs its scalar
 * paths. The rest of the table is in ops_fast.c.
 */
#include "base/base.h"
#include "kernels/kernels.h"
#include "kernels/x86/simd.h"
#include "kernels/x86/bf16.h" /* mp_transpose16 */

#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- attention --------------------------------------------------------- */

/* Flash attention (FlashAttention-2 schedule) on per-thread tiles: query
 * blocks of AB rows against key blocks of AB columns, blocks above the
 * diagonal skipped and the diagonal block computed in 16-wide strips (only
 * the causal triangle, to a vector's granularity), an online softmax in the
 * forward and the probabilities recomputed from q, k and the saved
 * log-sum-exp in the backward. No (T, T) matrix exists anywhere. Every
 * small product runs on att_mm, a register-blocked FMA kernel (4 rows x 64
 * columns) whose A operand has arbitrary row and column strides, so the
 * transposed products (P^T dO, dS^T Q, the scores as K Q^T) need no
 * transposed copies; K and V are transposed once per key block (backward)
 * and Q once per query block (forward), and the other operand rows (S
 * floats apart in qkv, each on its own page) are copied into contiguous
 * tiles. The tiles live on each thread's stack (~145 KB forward, ~270 KB
 * backward at AHS_MAX). Head sizes above AHS_MAX fall back to the
 * reference kernels. */

#ifndef AB
#define AB 64 /* rows of a query block = columns of a key block */
#endif
#define AHS_MAX 128 /* largest head size with stack tiles */
#define ANEG -1e30f /* "no score yet": finite, so exp(ANEG - ANEG) = 1 */

#ifdef __AVX512F__
/* C (RB, 16*NV) (+)= A (RB, k) B (k, 16*NV), A(r, p) = A[r*ars + p*aks];
 * the last vector of each row uses mask lm. */
static inline __attribute__((always_inline)) void
att_mk(int RB, int NV, __mmask16 lm, int k, const float *A, size_t ars,
       size_t aks, const float *B, int ldb, float *C, int ldc, bool acc)
{
    __m512 c[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            c[r][v] = !acc ? _mm512_setzero_ps()
                      : v == NV - 1 ? _mm512_maskz_loadu_ps(lm, C + (size_t)r * ldc + 16 * v)
                                    : _mm512_loadu_ps(C + (size_t)r * ldc + 16 * v);
    for (int p = 0; p < k; p++) {
        __m512 b[4];
        const float *bp = B + (size_t)p * ldb, *ap = A + (size_t)p * aks;
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
            b[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(lm, bp + 16 * v) : _mm512_loadu_ps(bp + 16 * v);
#pragma GCC unroll 4
        for (int r = 0; r < RB; r++) {
            __m512 a = _mm512_set1_ps(ap[r * ars]);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) c[r][v] = _mm512_fmadd_ps(a, b[v], c[r][v]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            if (v == NV - 1) _mm512_mask_storeu_ps(C + (size_t)r * ldc + 16 * v, lm, c[r][v]);
            else _mm512_storeu_ps(C + (size_t)r * ldc + 16 * v, c[r][v]);
        }
}

#define ATT_MK_NV(RB)                                                            \
    switch (nv) {                                                                \
    case 4: att_mk(RB, 4, lm, k, Ai, ars, aks, Bj, ldb, Ci, ldc, acc); break;    \
    case 3: att_mk(RB, 3, lm, k, Ai, ars, aks, Bj, ldb, Ci, ldc, acc); break;    \
    case 2: att_mk(RB, 2, lm, k, Ai, ars, aks, Bj, ldb, Ci, ldc, acc); break;    \
    default: att_mk(RB, 1, lm, k, Ai, ars, aks, Bj, ldb, Ci, ldc, acc); break;   \
    }
#endif

/* C (m, n) (+)= A (m, k) B (k, n) with A(i, p) = A[i*ars + p*aks], B and C
 * row-major with row strides ldb, ldc (acc: add to C, else overwrite).
 * m, n or k <= 0: nothing (k <= 0 with !acc zeroes C). */
static void att_mm(int m, int n, int k, const float *A, size_t ars, size_t aks,
                   const float *B, int ldb, float *C, int ldc, bool acc)
{
    if (k < 0) k = 0;
#ifdef __AVX512F__
    for (int j = 0; j < n; j += 64) {
        int w = n - j < 64 ? n - j : 64, nv = (w + 15) / 16;
        __mmask16 lm = w % 16 ? vtail(w % 16) : (__mmask16)0xFFFF;
        const float *Bj = B + j;
        int i = 0;
        for (; i + 4 <= m; i += 4) {
            const float *Ai = A + i * ars;
            float *Ci = C + (size_t)i * ldc + j;
            ATT_MK_NV(4)
        }
        const float *Ai = A + i * ars;
        float *Ci = C + (size_t)i * ldc + j;
        switch (m - i) {
        case 3: ATT_MK_NV(3) break;
        case 2: ATT_MK_NV(2) break;
        case 1: ATT_MK_NV(1) break;
        default: break;
        }
    }
#else
    for (int i = 0; i < m; i++) {
        float *c = C + (size_t)i * ldc;
        if (!acc)
            for (int j = 0; j < n; j++) c[j] = 0.0f;
        for (int p = 0; p < k; p++) {
            float a = A[i * ars + p * aks];
            const float *b = B + (size_t)p * ldb;
#pragma omp simd
            for (int j = 0; j < n; j++) c[j] += a * b[j];
        }
    }
#endif
}

#ifdef __AVX512F__
/* dst (16 x 16, row stride ld) = the transpose of src (row stride ls). */
static inline void tr16(float *dst, size_t ld, const float *src, size_t ls)
{
    __m512 r[16], c[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * ls);
    mp_transpose16(r, c);
    for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + i * ld, c[i]);
}
#endif

/* dst[d * AB + c] = src[c * ld + d] for rows c < nc, d < HS; columns
 * nc..AB-1 zeroed. */
static void att_load_t(float *dst, const float *src, int ld, int nc, int HS)
{
    for (int d = 0; d < HS; d++)
        for (int c = nc; c < AB; c++) dst[d * AB + c] = 0.0f;
    int c0 = 0;
#ifdef __AVX512F__
    int h16 = HS & ~15;
    for (; c0 + 16 <= nc; c0 += 16) {
        for (int d0 = 0; d0 < h16; d0 += 16)
            tr16(dst + d0 * AB + c0, AB, src + (size_t)c0 * ld + d0, (size_t)ld);
        for (int c = c0; c < c0 + 16; c++)
            for (int d = h16; d < HS; d++) dst[d * AB + c] = src[(size_t)c * ld + d];
    }
#endif
    for (int c = c0; c < nc; c++) {
        const float *s = src + (size_t)c * ld;
        for (int d = 0; d < HS; d++) dst[d * AB + c] = s[d];
    }
}

/* dst (n, HS) contiguous = rows of src (row stride ld): the B operands of
 * att_mm stay in L1 instead of striding through qkv. */
static void att_copy_rows(float *dst, const float *src, int ld, int n, int HS)
{
#ifdef __AVX512F__
    __mmask16 lm = HS % 16 ? vtail(HS % 16) : (__mmask16)0xFFFF;
    int h16 = (HS - 1) & ~15; /* start of the last (maybe partial) vector */
    for (int r = 0; r < n; r++) {
        const float *s = src + (size_t)r * ld;
        float *d = dst + (size_t)r * HS;
        for (int e = 0; e < h16; e += 16) _mm512_storeu_ps(d + e, _mm512_loadu_ps(s + e));
        _mm512_mask_storeu_ps(d + h16, lm, _mm512_maskz_loadu_ps(lm, s + h16));
    }
#else
    for (int r = 0; r < n; r++)
        memcpy(dst + (size_t)r * HS, src + (size_t)r * ld, (size_t)HS * sizeof(float));
#endif
}

/* Prefetches rows [0, n) (row stride ld, HS floats each) of src into L2:
 * the next block's operands load while this block computes. */
static void att_prefetch_rows(const float *src, int ld, int n, int HS)
{
    for (int r = 0; r < n; r++)
        for (int e = 0; e < HS; e += 16) __builtin_prefetch(src + (size_t)r * ld + e, 0, 2);
}


/* One query block [i0, i0 + nr) of head (b, h). Scores are kept
 * transposed, st[c * AB + r] (key c, query r), so the softmax statistics
 * of 16 queries sit in one vector. */
static void flash_fwd_block(float *out, float *lse, const float *qkv, int T,
                            int NH, int KVH, int HS, int b, int h, int i0)
{
    _Alignas(64) float qt[AHS_MAX * AB], st[AB * AB], ot[AB * AHS_MAX], vt[AB * AHS_MAX];
    _Alignas(64) float kc[AB * AHS_MAX];
    _Alignas(64) float mrow[AB], lrow[AB], alpha[AB];
    int S = (NH + 2 * KVH) * HS, OC = NH * HS, kh = h / (NH / KVH);
    int nr = T - i0 < AB ? T - i0 : AB, jend = i0 + nr;
    float scale = 1.0f / sqrtf((float)HS);
    const float *q = qkv + ((size_t)b * T + i0) * S + h * HS;
    const float *kb = qkv + (size_t)b * T * S + (NH + kh) * HS;
    const float *vb = qkv + (size_t)b * T * S + (NH + KVH + kh) * HS;
    att_load_t(qt, q, S, nr, HS);
    for (int r = 0; r < AB; r++) {
        mrow[r] = ANEG;
        lrow[r] = 0.0f;
    }
    memset(ot, 0, (size_t)nr * HS * sizeof(float));
    for (int j0 = 0; j0 < jend; j0 += AB) {
        int nc = jend - j0 < AB ? jend - j0 : AB;
        const float *kj = kc, *vj = vb + (size_t)j0 * S;
        att_copy_rows(kc, kb + (size_t)j0 * S, S, nc, HS);
        if (j0 + AB < jend) { /* the next key block */
            int nn = jend - j0 - AB < AB ? jend - j0 - AB : AB;
            att_prefetch_rows(kb + (size_t)(j0 + AB) * S, S, nn, HS);
            att_prefetch_rows(vb + (size_t)(j0 + AB) * S, S, nn, HS);
        } else if (i0 >= AB) { /* the next task's queries (head-major order) */
            att_prefetch_rows(q - (size_t)AB * S, S, AB, HS);
        }
        bool diag = j0 + nc - 1 > i0; /* some key is after some query */
        /* st = K_j Q_i^T (keys x queries); on the diagonal per strip of 16
         * keys, from the first vector of queries that can see them */
        if (!diag) {
            att_mm(nc, AB, HS, kj, (size_t)HS, 1, qt, AB, st, AB, false);
        } else {
            for (int c0 = 0; c0 < nc; c0 += 16) {
                int mc = nc - c0 < 16 ? nc - c0 : 16, rs = j0 + c0 - i0;
                rs = rs < 0 ? 0 : rs & ~15;
                att_mm(mc, AB - rs, HS, kj + (size_t)c0 * HS, (size_t)HS, 1, qt + rs, AB,
                       st + c0 * AB + rs, AB, false);
            }
        }
        /* online softmax over the keys (down the columns of st) */
#ifdef __AVX512F__
        __m512 vs = _mm512_set1_ps(scale);
        for (int v = 0; v < AB / 16; v++) {
            if (16 * v >= nr) break;
            int hi = nr - 16 * v > 16 ? 16 : nr - 16 * v;
            __m512 mo = _mm512_load_ps(mrow + 16 * v), mx = mo, sum = _mm512_setzero_ps();
            for (int c = 0; c < nc; c++) {
                int lo = j0 + c - i0 - 16 * v;
                if (lo >= hi) break;
                __mmask16 mk = vtail(hi) & (__mmask16)~vtail(lo < 0 ? 0 : lo);
                mx = _mm512_mask_max_ps(mx, mk, mx, _mm512_mul_ps(_mm512_loadu_ps(st + c * AB + 16 * v), vs));
            }
            for (int c = 0; c < nc; c++) {
                int lo = j0 + c - i0 - 16 * v;
                float *sp = st + c * AB + 16 * v;
                if (lo >= hi) {
                    _mm512_storeu_ps(sp, _mm512_setzero_ps());
                    continue;
                }
                __mmask16 mk = vtail(hi) & (__mmask16)~vtail(lo < 0 ? 0 : lo);
                __m512 e = _mm512_maskz_mov_ps(mk, vexp(_mm512_fmsub_ps(_mm512_loadu_ps(sp), vs, mx)));
                _mm512_storeu_ps(sp, e);
                sum = _mm512_add_ps(sum, e);
            }
            __m512 al = vexp(_mm512_sub_ps(mo, mx));
            _mm512_store_ps(alpha + 16 * v, al);
            _mm512_store_ps(mrow + 16 * v, mx);
            _mm512_store_ps(lrow + 16 * v, _mm512_fmadd_ps(_mm512_load_ps(lrow + 16 * v), al, sum));
        }
#else
        for (int r = 0; r < nr; r++) {
            float mx = mrow[r], sum = 0.0f;
            int lim = i0 + r - j0 + 1;
            lim = lim > nc ? nc : lim;
            for (int c = 0; c < lim; c++) mx = fmaxf(mx, st[c * AB + r] * scale);
            for (int c = 0; c < nc; c++) {
                float e = c < lim ? expf(st[c * AB + r] * scale - mx) : 0.0f;
                st[c * AB + r] = e;
                sum += e;
            }
            alpha[r] = expf(mrow[r] - mx);
            mrow[r] = mx;
            lrow[r] = lrow[r] * alpha[r] + sum;
        }
#endif
        for (int r = 0; r < nr; r++) {
            float a = alpha[r], *o = ot + r * HS;
            if (a != 1.0f) {
#pragma omp simd
                for (int d = 0; d < HS; d++) o[d] *= a;
            }
        }
        /* ot += P V_j, P(r, c) = st[c * AB + r]; on the diagonal per strip
         * of 16 queries, up to the last key they see */
        if (!diag) {
            att_copy_rows(vt, vj, S, nc, HS);
            att_mm(nr, HS, nc, st, 1, AB, vt, HS, ot, HS, true);
        } else {
            att_copy_rows(vt, vj, S, nc, HS);
            for (int r0 = 0; r0 < nr; r0 += 16) {
                int mr = nr - r0 < 16 ? nr - r0 : 16, nk = i0 + r0 + mr - j0;
                nk = nk > nc ? nc : nk;
                att_mm(mr, HS, nk, st + r0, 1, AB, vt, HS, ot + r0 * HS, HS, true);
            }
        }
    }
    for (int r = 0; r < nr; r++) {
        float inv = 1.0f / lrow[r], *o = out + ((size_t)b * T + i0 + r) * OC + h * HS;
#pragma omp simd
        for (int d = 0; d < HS; d++) o[d] = ot[r * HS + d] * inv;
        lse[((size_t)b * NH + h) * T + i0 + r] = mrow[r] + logf(lrow[r]);
    }
}

void kern_fast_attention_fwd(kern_gemm *g, float *out, float *lse,
                               const float *qkv, int B, int T, int NH, int KVH,
                               int HS)
{
    if (HS > AHS_MAX) {
        kern_ops_ref()->attention_fwd(g, out, lse, qkv, B, T, NH, KVH, HS);
        return;
    }
    int nb = (T + AB - 1) / AB;
    /* tasks (b, h, query block), the blocks of one head consecutive (its
     * k and v stay in L2), the longest (last) block first */
#pragma omp parallel for schedule(dynamic, 1)
    for (int task = 0; task < B * NH * nb; task++) {
        int i = nb - 1 - task % nb, bh = task / nb;
        flash_fwd_block(out, lse, qkv, T, NH, KVH, HS, bh / NH, bh % NH, i * AB);
    }
}

#define ATT_DMAX 4096 /* rows of D = rowsum(dO * O) cached per backward task */

/* D[r] = dot(d row r, o row r) for r < n (row strides ldd, ldo). */
static void att_rowdot(float *D, const float *d, int ldd, const float *o, int ldo, int n,
                       int HS)
{
    for (int r = 0; r < n; r++) {
        const float *dr = d + (size_t)r * ldd, *orow = o + (size_t)r * ldo;
        float s = 0.0f;
        int e = 0;
#ifdef __AVX512F__
        __m512 acc = _mm512_setzero_ps();
        for (; e + 16 <= HS; e += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(dr + e), _mm512_loadu_ps(orow + e), acc);
        s = _mm512_reduce_add_ps(acc);
#endif
        for (; e < HS; e++) s += dr[e] * orow[e];
        D[r] = s;
    }
}

typedef struct att_bwd_tiles {
    _Alignas(64) float kt[AHS_MAX * AB], vt[AHS_MAX * AB];
    _Alignas(64) float dk[AB * AHS_MAX], dv[AB * AHS_MAX];
    _Alignas(64) float p[AB * AB], ds[AB * AB];
    _Alignas(64) float kc[AB * AHS_MAX], qc[AB * AHS_MAX], dc[AB * AHS_MAX];
    float D[AB];
    float Dc[ATT_DMAX]; /* D of every row of the group's heads, when it fits */
} att_bwd_tiles;

/* All of kv head kh of batch row b: key blocks outer, then the query heads
 * of the group and the query blocks at or below the diagonal, in order.
 * Tiles p and ds are (queries x keys). */
static void flash_bwd_kv(att_bwd_tiles *w, float *dqkv, const float *dout,
                         const float *qkv, const float *out, const float *lse,
                         int T, int NH, int KVH, int HS, int b, int kh)
{
    int S = (NH + 2 * KVH) * HS, OC = NH * HS, grp = NH / KVH;
    float scale = 1.0f / sqrtf((float)HS);
    const float *base = qkv + (size_t)b * T * S;
    float *dbase = dqkv + (size_t)b * T * S;
    const float *kb = base + (NH + kh) * HS, *vb = base + (NH + KVH + kh) * HS;
    /* D of all the task's rows once (else per block pair) */
    bool dcache = (size_t)grp * T <= ATT_DMAX;
    if (dcache)
        for (int g = 0; g < grp; g++)
            att_rowdot(w->Dc + (size_t)g * T, dout + (size_t)b * T * OC + (kh * grp + g) * HS, OC,
                       out + (size_t)b * T * OC + (kh * grp + g) * HS, OC, T, HS);
    /* dq needs no zeroing: the first key block (j0 = 0) reaches every
     * query row and overwrites it (every product there has k >= 1) */
    for (int j0 = 0; j0 < T; j0 += AB) {
        bool dq_acc = j0 > 0;
        int nc = T - j0 < AB ? T - j0 : AB;
        const float *kj = w->kc;
        att_copy_rows(w->kc, kb + (size_t)j0 * S, S, nc, HS);
        att_load_t(w->kt, kj, HS, nc, HS);
        att_load_t(w->vt, vb + (size_t)j0 * S, S, nc, HS);
        memset(w->dk, 0, (size_t)nc * HS * sizeof(float));
        memset(w->dv, 0, (size_t)nc * HS * sizeof(float));
        for (int h = kh * grp; h < (kh + 1) * grp; h++) {
            const float *lh = lse + ((size_t)b * NH + h) * T;
            for (int i0 = j0 / AB * AB; i0 < T; i0 += AB) {
                int nr = T - i0 < AB ? T - i0 : AB;
                bool diag = j0 + nc - 1 > i0;
                float *dq = dbase + (size_t)i0 * S + h * HS;
                const float *o = out + ((size_t)b * T + i0) * OC + h * HS;
                const float *q = w->qc, *d = w->dc;
                att_copy_rows(w->qc, base + (size_t)i0 * S + h * HS, S, nr, HS);
                if (i0 + AB < T) { /* the next query block of this head */
                    int nn = T - i0 - AB < AB ? T - i0 - AB : AB;
                    att_prefetch_rows(base + (size_t)(i0 + AB) * S + h * HS, S, nn, HS);
                    att_prefetch_rows(dout + ((size_t)b * T + i0 + AB) * OC + h * HS, OC, nn, HS);
                    att_prefetch_rows(o + (size_t)AB * OC, OC, nn, HS);
                }
                att_copy_rows(w->dc, dout + ((size_t)b * T + i0) * OC + h * HS, OC, nr, HS);
                const float *Dv = w->Dc + (size_t)(h - kh * grp) * T + i0;
                if (!dcache) {
                    att_rowdot(w->D, d, HS, o, OC, nr, HS);
                    Dv = w->D;
                }
                /* S = Q K^T, dP = dO V^T (the diagonal per strip of 16
                 * queries, up to the last key they see) */
                if (!diag) {
                    att_mm(nr, AB, HS, q, (size_t)HS, 1, w->kt, AB, w->p, AB, false);
                    att_mm(nr, AB, HS, d, (size_t)HS, 1, w->vt, AB, w->ds, AB, false);
                } else {
                    for (int r0 = 0; r0 < nr; r0 += 16) {
                        int mr = nr - r0 < 16 ? nr - r0 : 16, kc = i0 + r0 + mr - j0;
                        kc = kc > nc ? nc : kc;
                        att_mm(mr, kc, HS, q + (size_t)r0 * HS, (size_t)HS, 1, w->kt, AB,
                               w->p + r0 * AB, AB, false);
                        att_mm(mr, kc, HS, d + (size_t)r0 * HS, (size_t)HS, 1, w->vt, AB,
                               w->ds + r0 * AB, AB, false);
                    }
                }
                /* P = exp(scale S - lse), dS = P (dP - D) scale; zero past
                 * the causal limit (entries there were not computed) */
                for (int r = 0; r < nr; r++) {
                    float *p = w->p + r * AB, *ds = w->ds + r * AB;
                    int lim = i0 + r - j0 + 1;
                    lim = lim > nc ? nc : lim < 0 ? 0 : lim;
                    float Dr = Dv[r], l = lh[i0 + r];
#ifdef __AVX512F__
                    __m512 vs = _mm512_set1_ps(scale), vl = _mm512_set1_ps(l), vD = _mm512_set1_ps(Dr);
                    for (int v = 0; v < AB / 16; v++) {
                        int n = lim - 16 * v;
                        __mmask16 mk = n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : vtail(n);
                        __m512 e = _mm512_maskz_mov_ps(
                            mk, vexp(_mm512_fmsub_ps(_mm512_loadu_ps(p + 16 * v), vs, vl)));
                        __m512 g = _mm512_mul_ps(_mm512_mul_ps(e, vs),
                                                 _mm512_sub_ps(_mm512_loadu_ps(ds + 16 * v), vD));
                        _mm512_storeu_ps(p + 16 * v, e);
                        _mm512_storeu_ps(ds + 16 * v, _mm512_maskz_mov_ps(mk, g));
                    }
#else
                    for (int c = 0; c < AB; c++) {
                        float e = c < lim ? expf(p[c] * scale - l) : 0.0f;
                        ds[c] = c < lim ? e * (ds[c] - Dr) * scale : 0.0f;
                        p[c] = e;
                    }
#endif
                }
                /* dV += P^T dO, dK += dS^T Q (the diagonal per strip of 16
                 * keys, from the first query that sees them); dQ += dS K */
                if (!diag) {
                    att_mm(nc, HS, nr, w->p, 1, AB, d, HS, w->dv, HS, true);
                    att_mm(nc, HS, nr, w->ds, 1, AB, q, HS, w->dk, HS, true);
                    att_mm(nr, HS, nc, w->ds, AB, 1, kj, HS, dq, S, dq_acc);
                } else {
                    for (int c0 = 0; c0 < nc; c0 += 16) {
                        int mc = nc - c0 < 16 ? nc - c0 : 16, rs = j0 + c0 - i0;
                        rs = rs < 0 ? 0 : rs;
                        att_mm(mc, HS, nr - rs, w->p + rs * AB + c0, 1, AB, d + (size_t)rs * HS, HS,
                               w->dv + c0 * HS, HS, true);
                        att_mm(mc, HS, nr - rs, w->ds + rs * AB + c0, 1, AB, q + (size_t)rs * HS, HS,
                               w->dk + c0 * HS, HS, true);
                    }
                    for (int r0 = 0; r0 < nr; r0 += 16) {
                        int mr = nr - r0 < 16 ? nr - r0 : 16, kc = i0 + r0 + mr - j0;
                        kc = kc > nc ? nc : kc;
                        att_mm(mr, HS, kc, w->ds + r0 * AB, AB, 1, kj, HS, dq + (size_t)r0 * S, S,
                               dq_acc);
                    }
                }
            }
        }
        for (int c = 0; c < nc; c++) {
            memcpy(dbase + (size_t)(j0 + c) * S + (NH + kh) * HS, w->dk + c * HS,
                   (size_t)HS * sizeof(float));
            memcpy(dbase + (size_t)(j0 + c) * S + (NH + KVH + kh) * HS, w->dv + c * HS,
                   (size_t)HS * sizeof(float));
        }
    }
}

void kern_fast_attention_bwd(kern_gemm *g, float *dqkv, const float *dout,
                               const float *qkv, const float *out,
                               const float *lse, int B, int T, int NH, int KVH,
                               int HS)
{
    if (HS > AHS_MAX) {
        kern_ops_ref()->attention_bwd(g, dqkv, dout, qkv, out, lse, B, T, NH, KVH, HS);
        return;
    }
    /* One task per (batch, kv head): the query heads sharing a kv head
     * accumulate into its dk/dv in a fixed order. */
#pragma omp parallel for schedule(dynamic, 1)
    for (int bk = 0; bk < B * KVH; bk++) {
        att_bwd_tiles w;
        flash_bwd_kv(&w, dqkv, dout, qkv, out, lse, T, NH, KVH, HS, bk / KVH, bk % KVH);
    }
}

