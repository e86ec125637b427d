/*
 * block.c — one transformer layer's forward, shared by the training
 * forward (forward.c: the whole batch, activations kept for the backward)
 * and the inference engine (infer/engine.c: a step of prefill or decode
 * entries, scratch reused layer after layer).
 *
 *   ln1  = norm(inp)                      LayerNorm (gpt2) / RMSNorm (llama)
 *   qkv  = ln1 Wqkv' + bqkv
 *   atty = attend(qkv)                    the caller's attention (rope
 *                                         included): flash over the batch,
 *                                         or against the KV cache
 *   res2 = (atty Wproj' + bproj) + inp
 *   ln2  = norm(res2)
 *   fch  = ln2 Wfc' + bfc                 gpt2 (n, F); llama (n, 2F) gate|up
 *   fca  = gelu(fch) / swiglu(fch)
 *   res3 = (fca Wfcproj' + bfcproj) + res2
 *
 * Every op is the backend's (m->ops / the engine's table), in the same
 * order with the same arguments, so the two callers compute the same bits
 * where they run the same kernels: fp32 prefill of a fresh sequence in one
 * chunk equals the training forward of it bit for bit (tests/test_infer.c
 * test_engine_equals_forward). The only difference is the linear layer:
 * training always multiplies through the GEMM (matmul_fwd: its result for
 * a row does not depend on how a batch is split, which the N-ranks-vs-1
 * tests need), inference through the backend's typed linear (which
 * streams the weights for decode-sized steps and takes quantized types).
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

static void lin(const model_run *r, float *Y, const float *X, int n, const kern_wt *W,
                const float *b)
{
    if (r->infer) r->k->linear(r->g, Y, X, n, W, b);
    else r->k->matmul_fwd(r->g, Y, X, W->data, b, n, W->cols, W->rows, W->lay);
}

static void norm(const model_run *r, float *out, float *mean, float *rstd, const float *inp,
                 const float *w, const float *b, int n)
{
    const model_shape *s = r->s;
    if (s->arch == KILN_ARCH_GPT2) r->k->layernorm_fwd(out, mean, rstd, inp, w, b, n, s->C, s->eps);
    else r->k->rmsnorm_fwd(out, rstd, inp, w, n, s->C, s->eps);
}

void model_block_fwd(const model_run *r, int l, const model_blk_w *w, int n, const model_blk *io)
{
    const kern_ops *k = r->k;
    const model_shape *s = r->s;
    const size_t nc = (size_t)n * s->C;
    BP(NORM, norm(r, io->ln1, io->ln1_mean, io->ln1_rstd, io->inp, w->ln1_w, w->ln1_b, n));
    BP(MATMUL_FWD, lin(r, io->qkv, io->ln1, n, &w->qkv, w->qkv_b));
    r->attend(r->ud, l, io->qkv, io->atty); /* times itself (rope: OTHER) */
    BP(MATMUL_FWD, lin(r, io->res2, io->atty, n, &w->proj, w->proj_b));
    BP(OTHER, k->add(io->res2, io->res2, io->inp, nc));
    BP(NORM, norm(r, io->ln2, io->ln2_mean, io->ln2_rstd, io->res2, w->ln2_w, w->ln2_b, n));
    BP(MATMUL_FWD, lin(r, io->fch, io->ln2, n, &w->fc, w->fc_b));
    if (s->arch == KILN_ARCH_GPT2) BP(ACT, k->gelu_fwd(io->fca, io->fch, (size_t)n * s->F));
    else BP(ACT, k->swiglu_fwd(io->fca, io->fch, n, s->F));
    BP(MATMUL_FWD, lin(r, io->res3, io->fca, n, &w->fcproj, w->fcproj_b));
    BP(OTHER, k->add(io->res3, io->res3, io->res2, nc));
}

void model_final_norm(const model_run *r, float *out, float *mean, float *rstd, const float *inp,
                      const float *w, const float *b, int n)
{
    BP(NORM, norm(r, out, mean, rstd, inp, w, b, n));
}

model_shape model_shape_of(const kiln_model *m)
{
    return (model_shape){.arch = m->cfg.arch, .C = m->C, .F = m->F, .QKV = m->QKV, .NH = m->NH,
                         .KVH = m->KVH, .HS = m->HS, .eps = m->cfg.norm_eps};
}

model_blk_w model_blk_weights(const kiln_model *m, int l)
{
    const model_layer *w = &m->w.layers[l];
    bool gpt2 = m->cfg.arch == KILN_ARCH_GPT2;
    kern_wlayout lay = gpt2 ? KERN_W_IN_OUT : KERN_W_OUT_IN;
    int FH = gpt2 ? m->F : 2 * m->F;
#define WT(p, R, K) ((kern_wt){KILN_DTYPE_F32, lay, (R), (K), (p)})
    return (model_blk_w){.ln1_w = w->ln1_w, .ln1_b = w->ln1_b, .ln2_w = w->ln2_w,
                         .ln2_b = w->ln2_b, .qkv = WT(w->qkv_w, m->QKV, m->C),
                         .proj = WT(w->proj_w, m->C, m->NH * m->HS),
                         .fc = WT(w->fc_w, FH, m->C), .fcproj = WT(w->fcproj_w, m->C, m->F),
                         .qkv_b = w->qkv_b, .proj_b = w->proj_b, .fc_b = w->fc_b,
                         .fcproj_b = w->fcproj_b};
#undef WT
}
