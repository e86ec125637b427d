/*
 * test_engine_adapter.c — served LoRA adapters in the inference engine
 * (kiln_engine_add_adapter, kiln_engine_set_slot_adapter; src/infer/
 * engine.c, model/block.c, lora.c model_lora_fwd_rows):
 *  - one engine over the base, three slots (base, adapter 1, adapter 2),
 *    prefilled in one step whose entries interleave the three slots and
 *    then decoded together: every row's logits equal those of an engine
 *    over that adapter merged into the weights (kiln_model_merge_lora) or
 *    over the plain base (<= 1e-4 relative), gpt2 and llama, adapters of
 *    different ranks and targets (fused-slice ones included);
 *  - the adapters changed the logits (the check can fail);
 *  - an adapter's bytes are its A and B only (fp32);
 *  - an adapter for another base is refused naming the tensor.
 */
#include "check.h"
#include "model/model.h"

#include <stdio.h>
#include <unistd.h>

static kiln_config small(kiln_arch a)
{
    kiln_config c = kiln_config_default();
    c.arch = a;
    c.n_layer = 2;
    c.n_embd = 32;
    c.n_head = 4;
    c.n_kv_head = a == KILN_ARCH_LLAMA ? 2 : 4;
    c.n_inner = 48;
    c.vocab_size = 61;
    c.n_ctx = 16;
    c.bos_token_id = c.eos_token_id = -1;
    if (a == KILN_ARCH_LLAMA) {
        c.tie_embeddings = false;
        c.bias = false;
        c.norm_eps = 1e-6f;
    }
    return c;
}

/* The same random base every call. */
static kiln_model *base_of(kiln_ctx *ctx, kiln_config cfg)
{
    kiln_model *m = NULL;
    CHECK(kiln_model_new(ctx, &cfg, &m) == KILN_OK);
    if (!m) return NULL;
    kiln_model_init_random(m, 1234);
    kiln_rng r;
    kiln_rng_seed(&r, 98);
    for (size_t i = 0; i < m->num_params; i++)
        m->params[i] = m->params[i] * 3.0f + 0.05f * kiln_rng_normal(&r);
    return m;
}

/* Writes an adapter (random A and B) over the base to dir and returns
 * the base with it merged. */
static kiln_model *adapter_merged(kiln_ctx *ctx, kiln_config cfg, const char *targets, int rank,
                                  uint64_t seed, const char *dir, size_t *floats)
{
    kiln_model *m = base_of(ctx, cfg);
    if (!m) return NULL;
    unsigned mask = 0;
    CHECK(kiln_lora_parse_targets(ctx, cfg.arch, targets, "targets", &mask) == KILN_OK);
    kiln_lora_opts lo = {.rank = rank, .alpha = 2.0f * rank + 1, .targets = mask, .seed = seed};
    kiln_status s = kiln_model_add_lora(ctx, &m, &lo);
    CHECK_MSG(s == KILN_OK, "%s", kiln_errmsg(ctx));
    if (s) return NULL;
    kiln_rng r;
    kiln_rng_seed(&r, seed);
    *floats = 0;
    for (int l = 0; l < m->L; l++)
        for (int k = 0; k < KILN_LORA_MAX_SLOTS; k++) {
            float *b = m->w.layers[l].lora_b[k];
            if (!b) continue;
            model_lora_slot sl = model_lora_slot_of(&m->cfg, k);
            for (int i = 0; i < sl.out * rank; i++) b[i] = 0.2f * kiln_rng_normal(&r);
            *floats += (size_t)rank * (sl.in + sl.out);
        }
    model_params_touched(m);
    CHECK(kiln_lora_save(ctx, m, dir, "base") == KILN_OK);
    CHECK(kiln_model_merge_lora(ctx, &m) == KILN_OK);
    return m;
}

static double max_rel(const float *a, const float *b, size_t n)
{
    double d = 0, s = 0;
    for (size_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - b[i]));
        s = fmax(s, fabs((double)b[i]));
    }
    return d / fmax(s, 1e-30);
}

enum { NS = 3, TP = 6, ND = 4 };

static void mixed_case(kiln_arch arch)
{
    kiln_ctx *ctx = kiln_ctx_new();
    kiln_set_threads(ctx, 1);
    char dir[] = "/tmp/kiln-engad-XXXXXX", d1[256], d2[256], cmd[300];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(d1, sizeof d1, "%s/a1", dir);
    snprintf(d2, sizeof d2, "%s/a2", dir);
    kiln_config cfg = small(arch);
    size_t f1 = 0, f2 = 0;
    kiln_model *ref[NS] = {base_of(ctx, cfg),
                           adapter_merged(ctx, cfg, "all-linear", 4, 11, d1, &f1),
                           adapter_merged(ctx, cfg, arch == KILN_ARCH_GPT2 ? "c_attn,mlp.c_proj"
                                                                           : "k_proj,up_proj",
                                          2, 12, d2, &f2)};
    if (!ref[0] || !ref[1] || !ref[2]) return;
    kiln_engine_opts eo = kiln_engine_opts_default();
    eo.n_slots = NS;
    eo.chunk = NS * TP;
    kiln_engine *e = NULL, *re[NS] = {0};
    CHECK(kiln_engine_new(ctx, ref[0], &eo, &e) == KILN_OK);
    eo.n_slots = 1;
    for (int i = 0; i < NS; i++) CHECK(kiln_engine_new(ctx, ref[i], &eo, &re[i]) == KILN_OK);
    int id1 = 0, id2 = 0;
    kiln_status s = kiln_engine_add_adapter(ctx, e, d1, &id1);
    CHECK_MSG(s == KILN_OK, "%s", kiln_errmsg(ctx));
    CHECK(kiln_engine_add_adapter(ctx, e, d2, &id2) == KILN_OK);
    CHECK(id1 == 1 && id2 == 2 && kiln_engine_n_adapters(e) == 2);
    CHECK_EQ(kiln_engine_adapter_bytes(e, 1), f1 * 4);
    CHECK_EQ(kiln_engine_adapter_bytes(e, 2), f2 * 4);
    CHECK(kiln_engine_set_slot_adapter(ctx, e, 1, id1) == KILN_OK);
    CHECK(kiln_engine_set_slot_adapter(ctx, e, 2, id2) == KILN_OK);
    CHECK(kiln_engine_set_slot_adapter(ctx, e, 0, 3) != KILN_OK);
    const int V = cfg.vocab_size;
    int32_t tok[NS][TP + ND];
    kiln_rng r;
    kiln_rng_seed(&r, 5);
    for (int i = 0; i < NS; i++)
        for (int t = 0; t < TP + ND; t++) tok[i][t] = (int32_t)(kiln_rng_u64(&r) % (uint64_t)V);
    /* the prefill: one step, entries interleaved across the slots */
    kiln_engine_tok st[NS * TP];
    for (int t = 0; t < TP; t++)
        for (int i = 0; i < NS; i++) st[t * NS + i] = (kiln_engine_tok){i, tok[i][t], true};
    float *lg = malloc((size_t)NS * TP * V * 4), *rl = malloc((size_t)TP * V * 4);
    CHECK(kiln_engine_step(ctx, e, st, NS * TP, lg) == KILN_OK);
    double worst = 0, moved = 0;
    for (int i = 0; i < NS; i++) {
        kiln_engine_tok rt[TP];
        for (int t = 0; t < TP; t++) rt[t] = (kiln_engine_tok){0, tok[i][t], true};
        CHECK(kiln_engine_step(ctx, re[i], rt, TP, rl) == KILN_OK);
        for (int t = 0; t < TP; t++) {
            const float *got = lg + (size_t)(t * NS + i) * V, *want = rl + (size_t)t * V;
            worst = fmax(worst, max_rel(got, want, (size_t)V));
            if (i) moved = fmax(moved, max_rel(got, lg + (size_t)(t * NS) * V, (size_t)V));
        }
    }
    CHECK_MSG(worst <= 1e-4, "prefill: mixed-adapter logits differ by %.3g relative", worst);
    CHECK_MSG(moved > 1e-2, "the adapters changed nothing (%.3g)", moved);
    /* decode: one entry per slot each step, the slots in reverse order */
    double dworst = 0;
    for (int d = 0; d < ND; d++) {
        kiln_engine_tok dt[NS];
        for (int i = 0; i < NS; i++) dt[i] = (kiln_engine_tok){NS - 1 - i, tok[NS - 1 - i][TP + d], true};
        CHECK(kiln_engine_step(ctx, e, dt, NS, lg) == KILN_OK);
        for (int i = 0; i < NS; i++) {
            kiln_engine_tok one = {0, tok[i][TP + d], true};
            CHECK(kiln_engine_step(ctx, re[i], &one, 1, rl) == KILN_OK);
            dworst = fmax(dworst, max_rel(lg + (size_t)(NS - 1 - i) * V, rl, (size_t)V));
        }
    }
    CHECK_MSG(dworst <= 1e-4, "decode: mixed-adapter logits differ by %.3g relative", dworst);
    printf("  %s: prefill %.3g, decode %.3g relative; adapters %zu and %zu bytes\n",
           arch == KILN_ARCH_GPT2 ? "gpt2" : "llama", worst, dworst,
           kiln_engine_adapter_bytes(e, 1), kiln_engine_adapter_bytes(e, 2));
    /* an adapter for another base: refused naming the tensor */
    kiln_config wide = cfg;
    wide.n_embd = 48;
    kiln_model *w = base_of(ctx, wide);
    kiln_engine *we = NULL;
    eo.n_slots = 1;
    CHECK(kiln_engine_new(ctx, w, &eo, &we) == KILN_OK);
    int idw = -1;
    CHECK(kiln_engine_add_adapter(ctx, we, d1, &idw) != KILN_OK);
    CHECK_MSG(strstr(kiln_errmsg(ctx), ".lora_A.weight") && strstr(kiln_errmsg(ctx), "[4, 48]"),
              "%s", kiln_errmsg(ctx));
    CHECK(idw == 0 && kiln_engine_n_adapters(we) == 0);
    kiln_engine_free(we);
    kiln_model_free(w);
    for (int i = 0; i < NS; i++) {
        kiln_engine_free(re[i]);
        kiln_model_free(ref[i]);
    }
    kiln_engine_free(e);
    free(lg);
    free(rl);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
    kiln_ctx_free(ctx);
}

static void test_mixed_gpt2(void) { mixed_case(KILN_ARCH_GPT2); }
static void test_mixed_llama(void) { mixed_case(KILN_ARCH_LLAMA); }

int main(void)
{
    RUN_TEST(test_mixed_gpt2);
    RUN_TEST(test_mixed_llama);
    return TEST_EXIT();
}
