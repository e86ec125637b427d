/*
 * spec.h — speculative decoding's pieces, shared by kiln_generate_spec
 * (spec.c) and the server's scheduler, and the generation loop's hooks
 * they use (gen.c). One sequence's drafting state: the draft's own
 * sampler (the target's settings and penalty history), the distributions
 * q_i its K tokens were drawn from, and the accept/reject rule that turns
 * the target's logits of the K + 1 positions into the tokens of a round.
 */
#ifndef KILN_INFER_SPEC_H
#define KILN_INFER_SPEC_H

#include "infer/sample.h"

/* gen.c: g's sampler, and its options as copied. */
kiln_sampler *infer_gen_sampler(kiln_gen *g);
const kiln_gen_opts *infer_gen_opts(const kiln_gen *g);
/* Like kiln_gen_next, for a token chosen outside (id): records it in g's
 * sampler, reports its log-probabilities from raw (V raw logits; read
 * only when the options ask for logprobs) and runs the ending rules. */
kiln_status infer_gen_push(kiln_ctx *ctx, kiln_gen *g, const float *raw, int32_t id,
                           kiln_gen_token *t);

typedef struct infer_spec {
    int V, K;
    kiln_sampler *ds;  /* the draft's: the target's sampling settings */
    float *q;          /* (K, V) the distributions d[i] were drawn from */
    float *p;          /* (V) the target's, at the position being decided */
    float *raw;        /* (V) the target's raw logits there (logprobs) */
    int32_t *d;        /* (K) the round's drafted tokens */
    int k;             /* how many were drafted this round */
} infer_spec;

/* For sequence g (its sampler's settings; the draft's seed is derived
 * from the target's) drafting at most K tokens a round. */
kiln_status infer_spec_init(kiln_ctx *ctx, infer_spec *sp, kiln_gen *g, int V, int K);
void infer_spec_free(infer_spec *sp);
/* Starts a round: the draft's penalty history becomes g's; k = 0. */
void infer_spec_begin(infer_spec *sp, kiln_gen *g);
/* Drafts the round's next token from the draft's logits (V, overwritten):
 * its distribution under the sampling settings becomes q[k], a token is
 * drawn from it (greedy: the argmax) and recorded in the draft's history;
 * returns it (k grows by one; k < K on entry). */
int32_t infer_spec_draft(infer_spec *sp, float *logits);
/* The token at round position i (0..k) from the target's logits there
 * (V, overwritten; a raw copy is kept in sp->raw): with g's sampler as it
 * stands (the round's tokens before i pushed), the target distribution p;
 * for i < k the drafted d[i] is accepted with probability
 * min(1, p(d)/q(d)), else the token is drawn from max(0, p - q)
 * renormalised and *accepted is false; i == k (every draft accepted)
 * draws the bonus token from p. Random numbers come from g's sampler;
 * none is used where the outcome is certain (greedy). */
int32_t infer_spec_decide(infer_spec *sp, kiln_gen *g, int i, float *logits, bool *accepted);
/* The rule alone on given distributions (tests): accepts x ~ q under p or
 * draws a replacement from the residual; resid is V floats of scratch. */
int32_t infer_spec_accept(kiln_rng *rng, const float *p, const float *q, int32_t x, int V,
                          float *resid, bool *accepted);

#endif /* KILN_INFER_SPEC_H */
