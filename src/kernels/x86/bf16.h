/*
 * bf16.h — mixed-precision compute: bf16 / fp16 conversions, CPU feature
 * detection, and matrix products with 16-bit inputs and fp32 accumulation
 * (AMX tiles, AVX512_BF16, portable C), plus the three products of a linear
 * layer built on them.
 *
 * Everything here is internal (prefix mp_). The layout that all fast paths
 * share is the "packed B" panel: the right-hand operand of C = A * B (K x N)
 * is stored as ceil(N/16) panels of 16 columns; panel j holds Kp/2 rows of
 * 16 column pairs (VNNI: B[2k][n], B[2k+1][n] adjacent), Kp = K rounded up
 * to a multiple of 32 and zero padded. One AMX B tile is 16 consecutive
 * 64-byte rows of a panel; one AVX512_BF16 operand is one such row. The
 * left operand A ("packed A") is bf16 in groups of 16 rows, each group a
 * run of 16 x 32 tiles: element (m, k) is at
 *   (m / 16) * 16 * Kp + (k / 32) * 512 + (m % 16) * 32 + k % 32,
 * M padded to a multiple of 32 and K to Kp with zeros, so one AMX A tile
 * is 1 KiB read in order (a row-major A of K = 2048 put every row of a
 * tile in the same L1 set).
 *
 * fp16 compute: an fp16 value x is split exactly into two bf16 values
 * hi = bf16(x), lo = bf16(x - hi) (fp16 has 11 significant bits, hi+lo
 * carry 16), and A*B = Ah*Bh + Ah*Bl + Al*Bh + O(2^-16 |A||B|) runs as one
 * bf16 product over a K three times as long. So fp16 has fp16's rounding
 * and range (values beyond 65504 become inf, which the loss scaler sees)
 * and still runs on AMX.
 */
#ifndef KILN_KERNELS_X86_BF16_H
#define KILN_KERNELS_X86_BF16_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tensor/tensor.h"

/* ---- scalar conversions ------------------------------------------------ */

/* bf16: the tensor layer's f32_to_bf16 / bf16_to_f32 (tensor/tensor.h,
 * inline): one rounding for the whole library. */

/* IEEE binary16 <-> fp32 scalars: the tensor layer's f32_to_f16 and
 * f16_to_f32 (one implementation; F16C is used by the array versions). */

/* ---- array conversions (AVX-512 / F16C when the CPU has them) --------- */

void mp_f32_to_bf16(const float *x, uint16_t *y, size_t n);
void mp_bf16_to_f32(const uint16_t *x, float *y, size_t n);
void mp_f32_to_f16(const float *x, uint16_t *y, size_t n);
void mp_f16_to_f32(const uint16_t *x, float *y, size_t n);
/* y[i] = value of x[i] after a round trip through the type (in place ok). */
void mp_round_bf16(const float *x, float *y, size_t n);
void mp_round_f16(const float *x, float *y, size_t n);

/* ---- CPU features ----------------------------------------------------- */

typedef struct mp_caps {
    bool avx512f;     /* AVX-512 F/BW/VL usable (OS saves the state) */
    bool avx512_bf16; /* VDPBF16PS */
    bool avx512_fp16;
    bool f16c;
    bool amx_bf16;    /* CPU has AMX-TILE + AMX-BF16 */
    bool amx_usable;  /* ...and the kernel granted XTILEDATA to us */
} mp_caps;

/* Detected once (thread-safe); asks the kernel for AMX tile state
 * (arch_prctl ARCH_REQ_XCOMP_PERM) the first time. */
const mp_caps *mp_cpu_caps(void);

typedef enum mp_backend {
    MP_BACKEND_AUTO = 0,   /* the fastest the CPU has */
    MP_BACKEND_REF = 1,    /* portable C */
    MP_BACKEND_AVX512 = 2, /* AVX512_BF16 dot products */
    MP_BACKEND_AMX = 3     /* AMX tiles */
} mp_backend;

/* The backend AUTO resolves to, and whether b can run here. */
mp_backend mp_backend_best(void);
bool mp_backend_available(mp_backend b);
const char *mp_backend_name(mp_backend b);

/* ---- compute dtypes --------------------------------------------------- */

/* The products below take the compute dtype as a kiln_dtype (the one enum,
 * tensor/tensor.h): KILN_DTYPE_BF16 or KILN_DTYPE_F16 (fp16 runs as three
 * bf16 products, see the file comment). */

/* ---- packed operands -------------------------------------------------- */

/* Packed-B size in bf16 elements for a K x N operand under dtype dt (fp16
 * triples K; see the file comment). */
size_t mp_packb_elems(kiln_dtype dt, int K, int N);
/* Packed-A size in bf16 elements for an M x K operand (rows padded to 32). */
size_t mp_packa_elems(kiln_dtype dt, int M, int K);

/* Packs the fp32 operand B (K x N) into panels, rounding to dt (BF16 or
 * F16). trans=false: B[k][n] = src[k*ld + n]; trans=true: B[k][n] =
 * src[n*ld + k] (e.g. a weight W (N, K) for X W^T). dst holds
 * mp_packb_elems() elements. Multithreaded. */
void mp_pack_b(kiln_dtype dt, bool trans, int K, int N, const float *src,
               int ld, uint16_t *dst);
/* Packs the fp32 operand A (M x K) row-major bf16 with K padded (and rows
 * padded to a multiple of 32 with zeros). trans=false: A[m][k] =
 * src[m*ld + k]; trans=true: A[m][k] = src[k*ld + m]. */
void mp_pack_a(kiln_dtype dt, bool trans, int M, int K, const float *src,
               int ld, uint16_t *dst);

/* C (M x N, row stride ldc) = (accumulate ? C : 0) + A * B (+ bias[n] when
 * bias is non-NULL), from packed A (mp_pack_a with the same dt, M, K) and
 * packed B. fp32 accumulation. Multithreaded (OpenMP). */
/* Offset of element (m, k) in a packed A whose packed K is kk. */
static inline size_t mp_packa_off(int kk, int m, int k)
{
    return (size_t)(m / 16) * 16 * (size_t)kk + (size_t)(k / 32) * 512 + (size_t)(m % 16) * 32 +
           (size_t)(k % 32);
}

/* Scratch of the calling thread (amx_bf16.c): slot s, at least bytes
 * long, 64-byte aligned, kept for the thread's later calls (no allocation
 * once warm) and freed when the thread exits; NULL if it cannot be made.
 * One slot per user, so that callers do not overwrite each other. */
enum {
    MP_SCRATCH_GEMM = 0,
    MP_SCRATCH_ATTN_H = 1,
    MP_SCRATCH_ATTN_F = 2,
    MP_SCRATCH_NORM = 3, /* the norms' backward: weight-gradient sums per row block */
    MP_SCRATCH_CE = 4,   /* cross-entropy into packed gradients: 32 rows of V */
    MP_SCRATCH_CE_SUM = 5, /* ... and its loss sums per row block */
    MP_SCRATCH_SLOTS = 6
};
void *mp_thread_scratch(int slot, size_t bytes);

/* The AMX kernel's blocking (amx_bf16.c): macro tiles of MC x NC of C, K
 * in chunks of KC (the partial sums between chunks wait in a per-thread
 * buffer of MC x NC floats). */
enum { MP_AMX_MC = 256, MP_AMX_NC = 256, MP_AMX_KC = 512 };
/* An fp32 output of at least this many bytes that the AMX kernel only
 * writes (no accumulate, epilogue or transposed store) is stored with
 * non-temporal stores when its rows are 64-byte aligned. */
#define MP_AMX_STREAM_BYTES ((size_t)8 << 20)

/* mp_gemm_packed with C stored transposed when transc (element (i, j) of
 * the product at C[j * ldc + i]; no bias then): a weight gradient computed
 * as dY^T X lands in an (in, out) weight as it is. */
void mp_gemm_packed_t(mp_backend be, kiln_dtype dt, int M, int N, int K,
                      const uint16_t *pa, const uint16_t *pb, float *C,
                      int ldc, bool accumulate, const float *bias, bool transc);
void mp_gemm_packed(mp_backend be, kiln_dtype dt, int M, int N, int K,
                    const uint16_t *pa, const uint16_t *pb, float *C,
                    int ldc, bool accumulate, const float *bias);

/* ---- AMX -------------------------------------------------------------- */

/* Whether the AMX kernels can run (CPU + kernel permission). */
bool mp_amx_usable(void);
/* Runs TDPBF16PS on registers only (no memory traffic) for about `secs`
 * seconds on every OpenMP thread and returns the achieved GFLOP/s over
 * wall time: the AMX peak of this machine measured now. The operand tiles
 * hold pseudo-random bf16 values, or zeros (zeros: the unit runs 10-25%
 * faster on them, a speed no product of real data reaches). When per_cpu
 * is non-NULL it receives GFLOP per second of process CPU time (what one
 * core delivers, whatever other load shares the machine). 0 when AMX is
 * not usable. */
double mp_amx_peak_gflops(double secs, bool zeros, double *per_cpu);
/* Loads this thread's tile configuration (8 tiles of 16 rows x 64 bytes,
 * what every AMX kernel here uses); the caller ends with _tile_release. */
void mp_amx_tiles_config(void);

/* ---- attention on AMX (attn_amx.c) ------------------------------------ */

/* Whether the model should run attention on AMX for head size HS and
 * sequence length T: HS a multiple of 32 up to 128, AMX and AVX512_BF16
 * usable, and T at least 3/4 of T rounded up to 32 (the kernels compute
 * whole 32 x 32 blocks; with more padding the fp32 kernel is faster).
 * Otherwise use kernels.h's fp32 ops. The kernels themselves work for
 * any T >= 1 with a supported HS. */
bool mp_attention_amx_ok(int HS, int T);
/* Causal flash attention with GQA, the contract of kernels.h's
 * attention_fwd / attention_bwd (out (B*T, NH*HS), lse (B, NH, T), dqkv
 * (B*T, (NH+2*KVH)*HS) overwritten, scale 1/sqrt(HS), deterministic), but
 * q, k, v read from qkvh, bf16 (B*T, (NH+2*KVH)*HS) plain rows. The
 * products run on AMX with fp32 accumulation; softmax, lse and D =
 * rowsum(dout * out) are fp32; P, dS and dout are rounded to bf16 as
 * product operands (the error of torch.autocast). Needs
 * a supported HS (see above); allocates per-thread scratch of 6 (forward)
 * or 28 (backward) bytes per T * HS, and asserts that it got it. */
void mp_attention_fwd_amx(float *out, float *lse, const uint16_t *qkvh, int B, int T, int NH,
                          int KVH, int HS);
/* mp_attention_fwd_amx with out written only as packed bf16 (the packed
 * A of out (B*T, NH*HS), padding rows zero): bit for bit mp_pack_a of
 * mp_attention_fwd_amx's out, without the fp32 rows. */
void mp_attention_fwd_amx_packed(uint16_t *outp, float *lse, const uint16_t *qkvh, int B, int T,
                                 int NH, int KVH, int HS);
void mp_attention_bwd_amx(float *dqkv, const float *dout, const uint16_t *qkvh,
                          const float *out, const float *lse, int B, int T, int NH, int KVH,
                          int HS);
/* mp_attention_bwd_amx with out read from its packed bf16 copy outp (the
 * packed A of out (B*T, NH*HS), what the bf16 forward stores for the
 * projection) instead of fp32 rows: the same result bit for bit as from
 * out's values widened to fp32, without that copy. The gradient of qkv
 * goes to dqkv as fp32 rows, or (dqkv NULL, o given) written as mp_pack_dy
 * would pack it (pa, pt in the tok form or not, the bias sums per 32 rows
 * in part, NULL: none; np = B * T, op = (NH + 2 KVH) HS), never as fp32
 * rows: for the qkv layer's backward (mp_linear_backward_prepacked). With
 * o, T must be a multiple of 32 (no block spans two sequences). */
typedef struct mp_dy_out {
    uint16_t *pa, *pt;
    bool tok;
    float *part;
    int np, op;
} mp_dy_out;
void mp_attention_bwd_amx_packed(float *dqkv, const mp_dy_out *o, const float *dout,
                                 const uint16_t *qkvh, const uint16_t *outp, const float *lse, int B,
                                 int T, int NH, int KVH, int HS);

/* ---- a linear layer in compute precision ------------------------------ */

/* Compute-dtype copies of one fp32 weight of a linear layer y = x W' + b
 * with x (N, C), y (N, OC), packed for the forward product (B = W', K = C,
 * N = OC) and for the input-gradient product (B = W'^T, K = OC, N = C).
 * W is stored (OC, C) (nn.Linear, in_out = false: W' = W^T) or (C, OC)
 * (HF Conv1D, in_out = true: W' = W). Refreshed once per optimizer step
 * with mp_weight_refresh (or one layout at a time); never per call. */
typedef struct mp_weight {
    kiln_dtype dt;
    int OC, C;
    bool in_out;
    uint16_t *fwd; /* packed W':   K = C,  N = OC */
    uint16_t *bwd; /* packed W'^T: K = OC, N = C  */
} mp_weight;

/* Allocates the packed copies (no conversion yet). Returns false on OOM. */
bool mp_weight_init(mp_weight *w, kiln_dtype dt, int OC, int C, bool in_out);
void mp_weight_free(mp_weight *w);
/* Converts and packs W into both copies / into one of them. */
void mp_weight_refresh(mp_weight *w, const float *W);
void mp_weight_refresh_fwd(mp_weight *w, const float *W);
void mp_weight_refresh_bwd(mp_weight *w, const float *W);
/* Both copies, strip by strip, for an optimizer that updates W in strips
 * of rows (row-major W: (C, OC) when in_out, else (OC, C)): the rows per
 * strip (0: this weight has no strip refresh on this CPU; use
 * mp_weight_refresh), and the packing of rows r0 .. r0 + rows - 1 into both
 * copies, byte for byte what mp_weight_refresh writes there. Single
 * threaded: call it from the optimizer's threads, one strip each. */
int mp_weight_strip_rows(const mp_weight *w);
void mp_weight_refresh_strip(mp_weight *w, const float *W, int r0);

/* Scratch for the activation operands of the products; grows on demand
 * (allocation only happens the first time a shape is seen). */
typedef struct mp_scratch {
    uint16_t *a;
    size_t a_cap;
    uint16_t *b;
    size_t b_cap;
    float *c; /* fp32 result when alpha/beta need a second pass */
    size_t c_cap;
    uint16_t *t; /* packed dy^T of a weight gradient */
    size_t t_cap;
    uint16_t *a2, *t2; /* the MLP backward's inner gradient, both packed forms */
    size_t a2_cap, t2_cap;
    float *part; /* its bias partial sums */
    size_t part_cap;
} mp_scratch;
void mp_scratch_free(mp_scratch *s);

/* y (N, OC) = x (N, C) W^T (+ b). Returns false on OOM. */
bool mp_linear_forward(mp_backend be, mp_scratch *s, const mp_weight *w,
                       const float *x, const float *b, int N, float *y);
/* dx (N, C) (+)= dy (N, OC) W. */
bool mp_linear_backward_x(mp_backend be, mp_scratch *s, const mp_weight *w,
                          const float *dy, int N, float *dx,
                          bool accumulate);
/* dW += the weight gradient in W's layout: (OC, C) += dy^T x, or with
 * in_out (C, OC) += x^T dy. */
bool mp_linear_backward_w(mp_backend be, mp_scratch *s, kiln_dtype dt,
                          bool in_out, const float *dy, const float *x,
                          int N, int OC, int C, float *dW);

/* dW += the weight gradient in W's layout from a packed bf16 activation:
 * xp is the packed A of x (N, C) (act = MP_ACT_NONE), or of the MLP's
 * pre-activation (N, C) / gate|up (N, 2C) with x = act(pre-activation)
 * computed on the way (MP_ACT_GELU / MP_ACT_SWIGLU). Runs as
 * dW' = dy^T x with dy^T packed from fp32 and x packed over tokens
 * (mp_pack_b_tokens), or for in_out weights (but SwiGLU) as dW = x^T dy
 * from x^T packed over tokens (mp_pack_a_tokens) and dy packed over
 * tokens, both stored as they are. bf16 only.
 * Returns false on OOM. */
bool mp_linear_backward_w_packed(mp_backend be, mp_scratch *s, bool in_out,
                                 const float *dy, const uint16_t *xp, int act,
                                 int N, int OC, int C, float *dW);

/* The whole backward of y = x W' + b from a packed bf16 activation (xp,
 * act as in mp_linear_backward_w_packed) and W's bf16 copy w: dW += the
 * weight gradient (dW = it when !dw_acc: dW's old contents are not read;
 * dW NULL: none, a frozen weight), db += the bias gradient (db NULL:
 * none), dx = dy W (overwritten). dy is
 * read once (mp_pack_dy). Returns false on OOM. */
bool mp_linear_backward_packed(mp_backend be, mp_scratch *s, const mp_weight *w,
                               const float *dy, const uint16_t *xp, int act, int N,
                               float *dW, bool dw_acc, float *db, float *dx);
/* The same in parts, for a producer of dy that packs it itself (as
 * mp_attention_bwd_amx_packed does): whether dy's pt is the tok form for
 * w (and act); buffers in s for mp_pack_dy's outputs of an (N, OC) dy
 * (part NULL without bias; false on OOM); and the products from them. */
bool mp_dy_tok(const mp_weight *w, int act);
bool mp_scratch_dy(mp_scratch *s, int N, int OC, bool bias, uint16_t **pa, uint16_t **pt,
                   float **part);
bool mp_linear_backward_prepacked(mp_backend be, mp_scratch *s, const mp_weight *w,
                                  const uint16_t *pa, const uint16_t *pt, const uint16_t *xp,
                                  int act, int N, float *dW, bool dw_acc, float *dx);

/* ---- bf16 activations (bf16_act.c) ------------------------------------ */

enum { MP_ACT_NONE = 0, MP_ACT_GELU = 1, MP_ACT_SWIGLU = 2 };

/* An epilogue: a product C (M, N) that is not stored; each finished
 * 32 x 32 block of C (i0, j0 multiples of 32, over M and N rounded up to
 * 32; entries outside C undefined) goes to mp_epi_block, which writes the
 * packed bf16 operands the next products read, padding included:
 *   MP_EPI_ACT (forward, act NONE or GELU): xp = packed bf16(C),
 *     ap = packed bf16(act(bf16(C))) — what mp_act_pack makes of C;
 *   MP_EPI_DACT (backward, act NONE or GELU): D = C * act'(h) with h the
 *     stored packed pre-activation hp (N columns); pa = packed D (M, N),
 *     pt = packed D^T (N, M), and bpart[(i0 / 32) * rup32(N) + j] = the
 *     sum of D's column j over the block's rows (in order), for a bias
 *     gradient summed over the blocks by mp_epi_bias_sum;
 *   MP_EPI_ROWS: xp = bf16(C) as plain rows (row stride N, M rows);
 *   MP_EPI_RES (fp32, no rounding): out = C + res, both (M, N) with row
 *     stride N (out may be res): a residual add fused into the product,
 *     C including the product's bias. Rows and columns past M, N are
 *     neither read nor written.
 * Rows are rounded to bf16 to nearest even (VCVTNE2PS2BF16 where the CPU
 * has it, which also flushes fp32 subnormals to zero). */
enum { MP_EPI_ACT = 1, MP_EPI_DACT = 2, MP_EPI_ROWS = 3, MP_EPI_RES = 4 };
typedef struct mp_epi {
    int kind, act, M, N;
    uint16_t *xp, *ap;  /* MP_EPI_ACT (xp: MP_EPI_ROWS too) */
    const uint16_t *hp; /* MP_EPI_DACT */
    uint16_t *pa, *pt;
    bool tok; /* MP_EPI_DACT: pt as mp_pack_dy's tok form */
    float *bpart;
    float *out;       /* MP_EPI_RES */
    const float *res;
} mp_epi;
void mp_epi_block(const mp_epi *e, const float blk[32][32], int i0, int j0);
/* db (N) += the column sums in e->bpart, block by block in order. */
void mp_epi_bias_sum(const mp_epi *e, float *db);
/* C = A B (bf16, packed as in mp_gemm_packed, + bias) through epi. On
 * backends without an epilogue (all but AMX) the product goes through
 * scratch first; on AMX any K runs in the kernel (partial sums over K
 * chunks wait in its per-thread buffer, the last chunk goes to epi).
 * Returns false on OOM. */
bool mp_gemm_packed_epi(mp_backend be, mp_scratch *s, int M, int N, int K, const uint16_t *pa,
                        const uint16_t *pb, const float *bias, const mp_epi *epi);
/* The backward of an MLP y = act(x W1' + b1) W2' + b2 (act NONE or GELU)
 * from the packed bf16 x (xp) and pre-activation h (hp), the weights'
 * bf16 copies w1, w2: dW1, dW2 += the weight gradients (= them when
 * !dw_acc; NULL: none), db1, db2 += the bias gradients (NULL: none),
 * dx = the input gradient (overwritten).
 * The gradient of h is never stored in fp32: the product that makes it
 * writes it packed, both ways, through MP_EPI_DACT. Returns false on OOM. */
bool mp_mlp_backward_packed(mp_backend be, mp_scratch *s, const mp_weight *w1,
                            const mp_weight *w2, const float *dy, const uint16_t *xp,
                            const uint16_t *hp, int act, int N, float *dW1, float *db1,
                            float *dW2, float *db2, float *dx, bool dw_acc);

/* out (M, K) fp32 (row stride ldo) <- packed bf16 A. */
void mp_unpack_a(float *out, int ldo, const uint16_t *pa, int M, int K);
/* The MLP's epilogue: x (N, FH) fp32 (FH = F, or 2F = gate|up for
 * SwiGLU) -> xp packed (N, FH) = bf16(x) and ap packed (N, F) =
 * bf16(act(bf16(x))). */
void mp_act_pack(uint16_t *xp, uint16_t *ap, const float *x, int N, int F, int kind);
/* dinp (N, FH) = d act / d x at the stored xp, times dout (N, F). */
void mp_act_bwd(float *dinp, const uint16_t *xp, const float *dout, int N, int F, int kind);
/* Packed B (K = M tokens, N = K columns) of act(X) from packed X (M, K)
 * (M, 2K for SwiGLU), act as in mp_act_pack; MP_ACT_NONE copies. */
void mp_pack_b_tokens(uint16_t *pb, const uint16_t *xp, int M, int K, int kind);
/* db (OC) += column sums of dout (N, OC), fixed order. */
void mp_bias_grad(float *db, const float *dout, int N, int OC);
/* The output gradient dy (N, OC) of a linear layer in both packed forms
 * its backward needs, read once: pa = packed A of dy (M = N, K = OC; the
 * input gradient dy W), pt = packed A of dy^T (M = OC, K = N; the weight
 * gradient dy^T x), and db += the column sums of dy (db NULL: none),
 * summed per 32 rows into part (mp_pack_dy_part_floats(N, OC) floats)
 * and then over the blocks in order. */
size_t mp_pack_dy_part_floats(int N, int OC);
/* tok: pt is instead packed B of dy over tokens (K = N, N = OC), the
 * right operand of the weight gradient x^T dy of an (in, out) weight. */
void mp_pack_dy(uint16_t *pa, uint16_t *pt, bool tok, float *db, float *part, const float *dy,
                int N, int OC);
/* One 32 x 32 block of mp_pack_dy, for a producer that has it at hand:
 * src = dy row n0, column c0 (row stride ld), rows / cols of it valid
 * (the rest taken as zeros), np = rup32(N), op = rup32(OC); bpart (NULL:
 * no bias) = part + (n0 / 32) * op + c0 gets the block's column sums.
 * Every block of the padded (np, op) written once this way gives
 * mp_pack_dy's bytes; then mp_pack_dy_bias adds the sums to db in
 * mp_pack_dy's order. */
void mp_pack_dy_block(uint16_t *pa, uint16_t *pt, bool tok, float *bpart, const float *src,
                      size_t ld, int rows, int cols, int n0, int c0, int np, int op);
void mp_pack_dy_bias(float *db, const float *part, int N, int OC);
/* Packed A of act(X)^T (M = K columns of X, K = M tokens) from X's packed
 * bf16 copy xp (M, K); act NONE or GELU. The left operand of x^T dy. */
void mp_pack_a_tokens(uint16_t *pa, const uint16_t *xp, int M, int K, int act);

/* General product from fp32 operands (packs both every call; for tests,
 * attention products and one-off shapes). C (M, N) (+)= op(A) op(B) where
 * op(A) is M x K (ta: A stored K x M) and op(B) is K x N (tb: B stored
 * N x K). */
bool mp_gemm_f32io(mp_backend be, mp_scratch *s, kiln_dtype dt, bool ta,
                   bool tb, int M, int N, int K, const float *A, int lda,
                   const float *B, int ldb, float *C, int ldc,
                   bool accumulate);
/* The sgemm contract: C = alpha op(A) op(B) + beta C (beta == 0 ignores
 * C's contents). Returns false on OOM. */
bool mp_sgemm(mp_backend be, mp_scratch *s, kiln_dtype dt, bool ta, bool tb,
              int M, int N, int K, float alpha, const float *A, int lda,
              const float *B, int ldb, float beta, float *C, int ldc);

#if defined(__x86_64__)
#include <immintrin.h>
/* 16 floats -> 16 bf16, round to nearest even, NaN kept (quiet): the
 * vector twin of f32_to_bf16. */
__attribute__((target("avx512f"), always_inline)) static inline __m256i mp_f32x16_to_bf16(__m512 x)
{
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __m512i abs = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    __mmask16 nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

/* The two halves of v (16-bit lanes 0..15 = a, 16..31 = b) as pairs
 * a0 b0 a1 b1 ... a15 b15: two rows of K made into one row of VNNI pairs,
 * the layout of packed B and of AMX B tiles. */
__attribute__((target("avx512f,avx512bw"), always_inline)) static inline __m512i mp_pairs16(__m512i v)
{
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                         8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(idx, v);
}

/* In-register transpose of a 16 x 16 fp32 block: r[i] = row i in, col[j]
 * = column j out (unpack, 4-wide shuffles, two 128-bit lane shuffles). */
__attribute__((target("avx512f"), always_inline)) static inline void mp_transpose16(const __m512 r[16],
                                                                     __m512 col[16])
{
    __m512 t[16], u[16], v[16];
    for (int g = 0; g < 4; g++) {
        t[4 * g + 0] = _mm512_unpacklo_ps(r[4 * g], r[4 * g + 1]);
        t[4 * g + 1] = _mm512_unpackhi_ps(r[4 * g], r[4 * g + 1]);
        t[4 * g + 2] = _mm512_unpacklo_ps(r[4 * g + 2], r[4 * g + 3]);
        t[4 * g + 3] = _mm512_unpackhi_ps(r[4 * g + 2], r[4 * g + 3]);
        u[4 * g + 0] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
        u[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], 0xee);
        u[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
        u[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xee);
    }
    for (int j = 0; j < 4; j++) {
        v[j] = _mm512_shuffle_f32x4(u[j], u[j + 4], 0x88);
        v[j + 4] = _mm512_shuffle_f32x4(u[j], u[j + 4], 0xdd);
        v[j + 8] = _mm512_shuffle_f32x4(u[j + 8], u[j + 12], 0x88);
        v[j + 12] = _mm512_shuffle_f32x4(u[j + 8], u[j + 12], 0xdd);
    }
    for (int j = 0; j < 4; j++) {
        col[j] = _mm512_shuffle_f32x4(v[j], v[j + 8], 0x88);
        col[j + 8] = _mm512_shuffle_f32x4(v[j], v[j + 8], 0xdd);
        col[j + 4] = _mm512_shuffle_f32x4(v[j + 4], v[j + 12], 0x88);
        col[j + 12] = _mm512_shuffle_f32x4(v[j + 4], v[j + 12], 0xdd);
    }
}
#endif

#endif /* KILN_KERNELS_X86_BF16_H */
