/*
 * block.c — one transformer layer's forward, the one every caller runs:
 * the training pass of every precision (pass.c: the whole batch,
 * activations kept for the backward) and the inference engine
 * (infer/engine.c: a step of prefill or decode entries, scratch reused
 * layer after layer).
 *
 *   ln1  = norm(inp)                      LayerNorm (gpt2) / RMSNorm (llama)
 *   qkv  = ln1 Wqkv' + bqkv
 *   atty = attend(qkv)                    the caller's attention (rope
 *                                         included): flash over the batch,
 *                                         or against the KV cache
 *   res2 = inp + (atty Wproj' + bproj)
 *   ln2  = norm(res2)
 *   fch  = ln2 Wfc' + bfc                 gpt2 (n, F); llama (n, 2F) gate|up
 *   fca  = gelu(fch) / swiglu(fch)
 *   res3 = res2 + (fca Wfcproj' + bfcproj)
 *
 * Every op is the run's backend's activation op (kernels.h kern_mp_ops):
 * the inputs of products are kern_act in the backend's compute dtype and
 * layout — fp32 rows on the f32 backend (fp32 training, fp16 and bf16
 * with fp32 activations, and the engine, whose f32 backend streams typed
 * weights), bf16 in the cpu backend's packed layout for bf16 training —
 * and the residual adds and GELU are the products' output forms. The
 * residual stream, norm statistics and the attention's softmax stay fp32.
 * Training and the engine call the same ops in the same order, so an fp32
 * prefill of a fresh sequence in one chunk equals the training forward of
 * it bit for bit (tests/test_infer.c test_engine_equals_forward); the one
 * difference is the f32 backend's product: training's always multiplies
 * through the GEMM (matmul_fwd: its result for a row does not depend on
 * how a batch is split, which the N-ranks-vs-1 tests need), the engine's
 * through the typed linear (which streams the weights for decode-sized
 * steps and takes quantized types).
 *
 * LoRA adapters (model_run.lora, lora.c: the training pass; or
 * model_run.groups: the engine's served adapters, each on its own rows of
 * the step over the one shared base) add (alpha/r) B A x to a product's fp32
 * output: the product is then stored as fp32 (qkv, the SwiGLU/GELU input)
 * and its output form (rows, GELU) applied after the adapters, or the
 * adapters add onto the residual sum (proj, fcproj).
 */
#include "model/model.h"

/* The block's own profiling (the engine has no model to account to). */
#define BP(id, stmt)                                                        \
    do {                                                                    \
        kiln_model *pm_ = r->prof;                                          \
        double t0_ = pm_ && pm_->profile ? model_prof_now(pm_) : 0;         \
        stmt;                                                               \
        if (pm_ && pm_->profile) pm_->prof[MODEL_PROF_##id] += model_prof_now(pm_) - t0_; \
    } while (0)

static void norm(const model_run *r, kern_act *out, float *mean, float *rstd, const float *inp,
                 const float *w, const float *b, int n)
{
    const model_shape *s = r->s;
    r->be->mp.norm_fwd(r->be, out, mean, rstd, inp, w, b, n, s->C, s->eps,
                       s->arch != KILN_ARCH_GPT2);
}

static bool lin(const model_run *r, const kern_out *o, const kern_act *x, kern_weight *w,
                const float *b, int n)
{
    bool ok;
    BP(MATMUL_FWD, ok = r->be->mp.linear_fwd(r->be, o, x, w, b, n));
    return ok;
}

/* lora_add of the engine's adapters: each group's adapter on its rows. */
static void lora_add_groups(const model_run *r, int l, int lin, const kern_act *x, int in,
                            float *y, int ldy, int n)
{
    BP(MATMUL_FWD, r->be->mp.act_unpack(r->be, r->xu, x, n, in);
       for (int g = 0; g < r->n_groups; g++) {
           const model_lora_group *gr = &r->groups[g];
           size_t at = (size_t)l * KILN_LORA_MAX_SLOTS;
           if (!model_lora_has(&gr->ad->cfg, lin)) continue;
           model_lora_fwd_rows(gr->lr, lin, gr->ad->a + at, gr->ad->b + at, r->xu, in, y, ldy,
                               gr->rows, gr->n);
       });
}

/* Adds layer l's adapters on product lin (lora.c) to its fp32 output y
 * (n, ldy), from the product's input x (n, in) unpacked to fp32. */
static void lora_add(const model_run *r, int l, int lin, const model_blk_w *w,
                     const kern_act *x, int in, float *y, int ldy, int n)
{
    if (r->n_groups) {
        lora_add_groups(r, l, lin, x, in, y, ldy, n);
        return;
    }
    const model_lora *lr = r->lora;
    BP(MATMUL_FWD, r->be->mp.act_unpack(r->be, lr->xu, x, n, in);
       model_lora_fwd(lr, l, lin, w->lora_a, w->lora_b, lr->xu, y, ldy, n));
}

static bool has(const model_run *r, int lin)
{
    for (int g = 0; g < r->n_groups; g++)
        if (model_lora_has(&r->groups[g].ad->cfg, lin)) return true;
    return r->lora && model_lora_has(r->lora->cfg, lin);
}

bool model_block_fwd(const model_run *r, int l, const model_blk_w *w, int n, const model_blk *io)
{
    kern_backend *be = r->be;
    const model_shape *s = r->s;
    bool gelu = s->arch == KILN_ARCH_GPT2;
    BP(NORM, norm(r, io->ln1p, io->ln1_mean, io->ln1_rstd, io->inp, w->ln1_w, w->ln1_b, n));
    if (has(r, 0)) { /* the adapters add to the fp32 product, then to rows */
        kern_out oq = {.kind = KERN_OUT_F32, .y = io->qkv};
        if (!lin(r, &oq, io->ln1p, w->qkv, w->qkv_b, n)) return false;
        lora_add(r, l, 0, w, io->ln1p, s->C, io->qkv, s->QKV, n);
        if (r->qkv_rows) BP(OTHER, be->mp.to_rows(be, io->qkvh, io->qkv, (size_t)n * s->QKV));
    } else {
        kern_out oq = r->qkv_rows ? (kern_out){.kind = KERN_OUT_ROWS, .rows = io->qkvh}
                                  : (kern_out){.kind = KERN_OUT_F32, .y = io->qkv};
        if (!lin(r, &oq, io->ln1p, w->qkv, w->qkv_b, n)) return false;
    }
    r->attend(r->ud, l, io); /* times itself */
    kern_out op = {.kind = KERN_OUT_RES, .y = io->res2, .res = io->inp};
    if (!lin(r, &op, io->attyp, w->proj, w->proj_b, n)) return false;
    if (has(r, 1)) lora_add(r, l, 1, w, io->attyp, s->NH * s->HS, io->res2, s->C, n);
    BP(NORM, norm(r, io->ln2p, io->ln2_mean, io->ln2_rstd, io->res2, w->ln2_w, w->ln2_b, n));
    if (gelu && !has(r, 2)) { /* the fc output goes from the product to fchp and actp */
        kern_out of = {.kind = KERN_OUT_GELU, .hp = io->fchp, .ap = io->actp};
        if (!lin(r, &of, io->ln2p, w->fc, w->fc_b, n)) return false;
    } else {
        int FH = gelu ? s->F : 2 * s->F;
        kern_out of = {.kind = KERN_OUT_F32, .y = io->tmp};
        if (!lin(r, &of, io->ln2p, w->fc, w->fc_b, n)) return false;
        if (has(r, 2)) lora_add(r, l, 2, w, io->ln2p, s->C, io->tmp, FH, n);
        BP(ACT, be->mp.act_fwd(be, io->fchp, io->actp, io->tmp, n, s->F,
                               gelu ? KERN_ACT_GELU : KERN_ACT_SWIGLU));
    }
    kern_out oo = {.kind = KERN_OUT_RES, .y = io->res3, .res = io->res2};
    if (!lin(r, &oo, io->actp, w->fcproj, w->fcproj_b, n)) return false;
    if (has(r, 3)) lora_add(r, l, 3, w, io->actp, s->F, io->res3, s->C, n);
    return true;
}

void model_final_norm(const model_run *r, kern_act *out, float *mean, float *rstd,
                      const float *inp, const float *w, const float *b, int n)
{
    BP(NORM, norm(r, out, mean, rstd, inp, w, b, n));
}

model_shape model_shape_of(const kiln_model *m)
{
    return (model_shape){.arch = m->cfg.arch, .C = m->C, .F = m->F, .QKV = m->QKV, .NH = m->NH,
                         .KVH = m->KVH, .HS = m->HS, .eps = m->cfg.norm_eps};
}

model_blk_src model_blk_weights(const kiln_model *m, int l)
{
    const model_layer *w = &m->w.layers[l];
    bool gpt2 = m->cfg.arch == KILN_ARCH_GPT2;
    kern_wlayout lay = gpt2 ? KERN_W_IN_OUT : KERN_W_OUT_IN;
    int FH = gpt2 ? m->F : 2 * m->F;
#define WT(p, R, K) ((kern_wt){KILN_DTYPE_F32, lay, (R), (K), (p)})
    return (model_blk_src){.ln1_w = w->ln1_w, .ln1_b = w->ln1_b, .ln2_w = w->ln2_w,
                         .ln2_b = w->ln2_b, .qkv = WT(w->qkv_w, m->QKV, m->C),
                         .proj = WT(w->proj_w, m->C, m->NH * m->HS),
                         .fc = WT(w->fc_w, FH, m->C), .fcproj = WT(w->fcproj_w, m->C, m->F),
                         .qkv_b = w->qkv_b, .proj_b = w->proj_b, .fc_b = w->fc_b,
                         .fcproj_b = w->fcproj_b};
#undef WT
}
