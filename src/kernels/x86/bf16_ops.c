/*
 * bf16_ops.c — mixed precision behind the model's kernel interface
 * (kernels.h): a kern_gemm whose products run in bf16 or fp16 with fp32
 * accumulation (AMX / AVX512_BF16 / portable, bf16.h), and a kern_ops table
 * that is the fast table with the linear layers replaced by versions that
 * keep the compute-dtype copies of every weight packed in a cache.
 *
 * Weight cache: keyed by the weight's address, one mp_weight per linear
 * layer, each of its two layouts repacked at most once per epoch. The model
 * calls g->invalidate (a new epoch) at the start of every forward pass,
 * so after an optimizer step the next forward repacks each weight once for
 * the forward product and the backward pass packs the transposed layout
 * once: never per call. An optimizer that has just written both copies
 * itself (kiln_model_adamw_step, strip by strip as it updates W) marks them
 * fresh for the next epoch instead (mp_kern_weight_fresh), and any other
 * write to the parameters goes through an invalidate first (model.c), so
 * a mark never outlives the values it was made from. Products too small to pay for packing (decode
 * steps, M < 16) go to the fp32 fast GEMM.
 */
#include "kernels/x86/bf16_ops.h"

#include "base/base.h"
#include "kernels/x86/bf16.h"

#include <stdlib.h>
#include <string.h>

#define MP_MAGIC 0x6d707831u /* "mpx1" */

typedef struct wentry {
    const float *w;
    int OC, C;
    bool in_out;
    mp_weight pw;
    uint64_t fwd_epoch, bwd_epoch; /* epoch + 1 of the last repack; 0 = never */
} wentry;

typedef struct mp_state {
    uint32_t magic;
    kern_backend backend; /* the cpu backend of this GEMM (backend_cpu.c fills it) */
    kiln_dtype dt;
    mp_backend be;
    kern_ops ops;       /* fast ops with matmul_fwd/bwd replaced */
    kern_gemm *fp32;    /* for products too small to pack */
    mp_scratch scratch;
    wentry **cache; /* each entry on its own: handles (kern_weight) stay put */
    int n_cache, cap_cache;
    size_t cache_bytes;
    uint64_t epoch;   /* bumped by invalidate (start of every forward) */
    uint64_t repacks; /* layouts packed from the fp32 weights, ever */
} mp_state;

static mp_state *state_of(kern_gemm *g)
{
    mp_state *st = g ? g->state : NULL;
    KILN_ASSERT(st && st->magic == MP_MAGIC);
    return st;
}

static bool small(int M, int N, int K) { return M < 16 || N < 16 || K < 16; }

static void mp_gemm_fn(kern_gemm *g, bool ta, bool tb, int M, int N, int K, float alpha,
                       const float *A, int lda, const float *B, int ldb, float beta, float *C,
                       int ldc)
{
    mp_state *st = state_of(g);
    if (small(M, N, K) ||
        !mp_sgemm(st->be, &st->scratch, st->dt, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta,
                  C, ldc))
        st->fp32->gemm(st->fp32, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

/* The cache entry of weight w, created on first sight. NULL on OOM. */
static wentry *lookup(mp_state *st, const float *w, int OC, int C, bool in_out)
{
    for (int i = 0; i < st->n_cache; i++) {
        wentry *e = st->cache[i];
        if (e->w == w && e->OC == OC && e->C == C && e->in_out == in_out) return e;
    }
    if (st->n_cache == st->cap_cache) {
        int cap = st->cap_cache ? 2 * st->cap_cache : 64;
        wentry **n = realloc(st->cache, sizeof *n * (size_t)cap);
        if (!n) return NULL;
        st->cache = n;
        st->cap_cache = cap;
    }
    wentry *e = calloc(1, sizeof *e);
    if (!e) return NULL;
    if (!mp_weight_init(&e->pw, st->dt, OC, C, in_out)) {
        free(e);
        return NULL;
    }
    st->cache[st->n_cache] = e;
    e->w = w;
    e->OC = OC;
    e->C = C;
    e->in_out = in_out;
    st->n_cache++;
    st->cache_bytes += (mp_packb_elems(st->dt, C, OC) + mp_packb_elems(st->dt, OC, C)) * 2;
    return e;
}

static void mp_matmul_fwd(kern_gemm *g, float *out, const float *inp, const float *w,
                          const float *b, int N, int C, int OC, kern_wlayout lay)
{
    mp_state *st = state_of(g);
    wentry *e = small(N, OC, C) ? NULL : lookup(st, w, OC, C, lay == KERN_W_IN_OUT);
    if (!e) {
        kern_matmul_fwd_gemm(st->fp32, out, inp, w, b, N, C, OC, lay);
        return;
    }
    if (e->fwd_epoch != st->epoch + 1) {
        mp_weight_refresh_fwd(&e->pw, w);
        st->repacks++;
        e->fwd_epoch = st->epoch + 1;
    }
    if (!mp_linear_forward(st->be, &st->scratch, &e->pw, inp, b, N, out))
        kern_matmul_fwd_gemm(st->fp32, out, inp, w, b, N, C, OC, lay);
}

static void mp_matmul_bwd(kern_gemm *g, float *dinp, float *dw, float *db, const float *dout,
                          const float *inp, const float *w, int N, int C, int OC,
                          kern_wlayout lay, bool dinp_acc)
{
    mp_state *st = state_of(g);
    bool io = lay == KERN_W_IN_OUT;
    wentry *e = small(N, OC, C) ? NULL : lookup(st, w, OC, C, io);
    if (!e) {
        kern_matmul_bwd_gemm(st->fp32, dinp, dw, db, dout, inp, w, N, C, OC, lay, dinp_acc);
        return;
    }
    if (db) mp_bias_grad(db, dout, N, OC);
    if (dw && !mp_linear_backward_w(st->be, &st->scratch, st->dt, io, dout, inp, N, OC, C, dw))
        kern_matmul_bwd_gemm(st->fp32, NULL, dw, NULL, dout, inp, w, N, C, OC, lay, dinp_acc);
    if (dinp) {
        if (e->bwd_epoch != st->epoch + 1) {
            mp_weight_refresh_bwd(&e->pw, w);
            st->repacks++;
            e->bwd_epoch = st->epoch + 1;
        }
        if (!mp_linear_backward_x(st->be, &st->scratch, &e->pw, dout, N, dinp, dinp_acc))
            kern_matmul_bwd_gemm(st->fp32, dinp, NULL, NULL, dout, inp, w, N, C, OC, lay,
                                 dinp_acc);
    }
}

static void mp_invalidate(kern_gemm *g) { state_of(g)->epoch++; }

static void mp_destroy(kern_gemm *g)
{
    if (!g) return;
    mp_state *st = g->state;
    if (st) {
        for (int i = 0; i < st->n_cache; i++) {
            mp_weight_free(&st->cache[i]->pw);
            free(st->cache[i]);
        }
        free(st->cache);
        mp_scratch_free(&st->scratch);
        kern_gemm_free(st->fp32);
        free(st);
    }
    free(g);
}

kern_gemm *mp_kern_gemm_new(kiln_dtype dt, mp_backend be)
{
    KILN_ASSERT(dt == KILN_DTYPE_BF16 || dt == KILN_DTYPE_F16);
    kern_gemm *g = calloc(1, sizeof *g);
    mp_state *st = calloc(1, sizeof *st);
    kern_gemm *f = kern_gemm_fast_new();
    if (!g || !st || !f) {
        free(g), free(st), kern_gemm_free(f);
        return NULL;
    }
    st->magic = MP_MAGIC;
    st->dt = dt;
    st->be = be == MP_BACKEND_AUTO || !mp_backend_available(be) ? mp_backend_best() : be;
    st->fp32 = f;
    st->ops = *kern_ops_fast();
    st->ops.name = dt == KILN_DTYPE_BF16 ? "bf16" : "fp16";
    st->ops.matmul_fwd = mp_matmul_fwd;
    st->ops.matmul_bwd = mp_matmul_bwd;
    g->name = st->be == MP_BACKEND_AMX ? (dt == KILN_DTYPE_BF16 ? "amx_bf16" : "amx_fp16")
              : st->be == MP_BACKEND_AVX512 ? (dt == KILN_DTYPE_BF16 ? "avx512_bf16" : "avx512_fp16")
                                            : (dt == KILN_DTYPE_BF16 ? "ref_bf16" : "ref_fp16");
    g->gemm = mp_gemm_fn;
    g->destroy = mp_destroy;
    g->invalidate = mp_invalidate;
    g->state = st;
    return g;
}

const kern_ops *mp_kern_ops(kern_gemm *g) { return &state_of(g)->ops; }

kiln_dtype mp_kern_dtype(kern_gemm *g) { return state_of(g)->dt; }
mp_backend mp_kern_backend(kern_gemm *g) { return state_of(g)->be; }
mp_scratch *mp_kern_scratch(kern_gemm *g) { return &state_of(g)->scratch; }

/* e's copy in the forward (bwd false) or input-gradient layout, repacked
 * if it is not current in this epoch. */
static const mp_weight *current(mp_state *st, wentry *e, bool bwd)
{
    uint64_t *ep = bwd ? &e->bwd_epoch : &e->fwd_epoch;
    if (*ep != st->epoch + 1) {
        if (bwd) mp_weight_refresh_bwd(&e->pw, e->w);
        else mp_weight_refresh_fwd(&e->pw, e->w);
        st->repacks++;
        *ep = st->epoch + 1;
    }
    return &e->pw;
}

const mp_weight *mp_kern_weight(kern_gemm *g, const float *w, int OC, int C, bool in_out,
                                bool bwd)
{
    mp_state *st = state_of(g);
    wentry *e = lookup(st, w, OC, C, in_out);
    return e ? current(st, e, bwd) : NULL;
}

mp_weight *mp_kern_weight_entry(kern_gemm *g, const float *w, int OC, int C, bool in_out)
{
    wentry *e = lookup(state_of(g), w, OC, C, in_out);
    return e ? &e->pw : NULL;
}

void mp_kern_weight_fresh(kern_gemm *g, const float *w, int OC, int C, bool in_out)
{
    mp_state *st = state_of(g);
    wentry *e = lookup(st, w, OC, C, in_out);
    /* valid in the next epoch: the one the next forward starts */
    if (e) e->fwd_epoch = e->bwd_epoch = st->epoch + 2;
}

/* ---- the weights of the cpu backend (kernels.h's kern_backend) ---------
 * A kern_weight of the cpu backend is its cache entry (a wentry). */

kern_backend *mp_kern_backend_of(kern_gemm *g) { return &state_of(g)->backend; }

static kern_weight *cpu_weight_prepare(kern_backend *b, const float *w, int OC, int C,
                                       kern_wlayout lay)
{
    return (kern_weight *)lookup(state_of(b->gemm), w, OC, C, lay == KERN_W_IN_OUT);
}

static int cpu_weight_refresh_rows(const kern_backend *b, const kern_weight *w)
{
    (void)b;
    return mp_weight_strip_rows(&((const wentry *)w)->pw);
}

static void cpu_weight_refresh(kern_backend *b, kern_weight *w, int r0)
{
    (void)b;
    wentry *e = (wentry *)w;
    mp_weight_refresh_strip(&e->pw, e->w, r0);
}

static void cpu_weight_fresh(kern_backend *b, kern_weight *w)
{
    mp_state *st = state_of(b->gemm);
    wentry *e = (wentry *)w;
    /* valid in the next epoch: the one the next forward starts */
    e->fwd_epoch = e->bwd_epoch = st->epoch + 2;
}

static void cpu_weight_keep(kern_backend *b, kern_weight *w)
{
    mp_state *st = state_of(b->gemm);
    wentry *e = (wentry *)w;
    /* a layout current in this epoch stays so in the next */
    if (e->fwd_epoch == st->epoch + 1) e->fwd_epoch = st->epoch + 2;
    if (e->bwd_epoch == st->epoch + 1) e->bwd_epoch = st->epoch + 2;
}

const mp_weight *mp_kern_weight_current(kern_backend *b, kern_weight *w, bool bwd)
{
    return current(state_of(b->gemm), (wentry *)w, bwd);
}

void mp_kern_backend_weights(kern_backend *b)
{
    b->weight_prepare = cpu_weight_prepare;
    b->weight_refresh_rows = cpu_weight_refresh_rows;
    b->weight_refresh = cpu_weight_refresh;
    b->weight_fresh = cpu_weight_fresh;
    b->weight_keep = cpu_weight_keep;
}

size_t mp_kern_cache_bytes(kern_gemm *g) { return state_of(g)->cache_bytes; }
uint64_t mp_kern_repacks(kern_gemm *g) { return state_of(g)->repacks; }
