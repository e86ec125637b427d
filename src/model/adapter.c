/*
 * adapter.c — LoRA adapters as PEFT directories: adapter_config.json and
 * adapter_model.safetensors, the tensors named as PEFT's get_peft_model_
 * state_dict saves them: "base_model.model." + the module's path + ".lora_A
 * .weight" (r, in) / ".lora_B.weight" (out, r), e.g.
 * base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (llama),
 * base_model.model.transformer.h.0.attn.c_attn.lora_A.weight (gpt2, whose
 * Conv1D base PEFT marks fan_in_fan_out: the adapter's shapes are the same,
 * only merging transposes). Read back, each tensor's name and shape is
 * checked against the base model.
 */
#include "io/safetensors.h"
#include "model/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PEFT_PREFIX "base_model.model."

/* target_modules: leaf names, except gpt2's c_proj when only one of its
 * two is targeted (the leaf would match both in PEFT). */
static json_t *targets_json(const kiln_config *c)
{
    json_t *a = json_array();
    if (!a) return NULL;
    int ns = kiln_lora_num_slots(c->arch);
    for (int s = 0; s < ns; s++) {
        if (!(c->lora_targets >> s & 1)) continue;
        const char *name = kiln_lora_slot_name(c->arch, s), *leaf = strrchr(name, '.') + 1;
        bool both_cproj = c->arch == KILN_ARCH_GPT2 && (c->lora_targets & 0xA) == 0xA;
        if (c->arch == KILN_ARCH_GPT2 && !strcmp(leaf, "c_proj")) {
            if (both_cproj && s == 3) continue; /* "c_proj" written once */
            json_array_append_new(a, json_string(both_cproj ? leaf : name));
        } else {
            json_array_append_new(a, json_string(leaf));
        }
    }
    return a;
}

/* A float as the shortest decimal that reads back to it (0.05, not
 * 0.05000000074505806). */
static double short_real(float v)
{
    char b[32];
    for (int p = 6; p < 10; p++) {
        snprintf(b, sizeof b, "%.*g", p, (double)v);
        if ((float)strtod(b, NULL) == v) break;
    }
    return strtod(b, NULL);
}

kiln_status kiln_lora_save(kiln_ctx *ctx, const kiln_model *m, const char *dir,
                           const char *base_model)
{
    const kiln_config *c = &m->cfg;
    if (c->lora_rank <= 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG, "the model has no LoRA adapters to save");
    kiln_status s = file_mkdirs(ctx, dir);
    if (s) return s;
    int n = 0;
    for (int i = 0; i < m->n_tensors; i++)
        if (strstr(m->tensors[i].name, ".lora_")) n++;
    st_entry *e = calloc((size_t)n, sizeof *e);
    char **names = calloc((size_t)n, sizeof *names);
    char *wpath = file_join(dir, "adapter_model.safetensors");
    char *cpath = file_join(dir, "adapter_config.json");
    json_t *o = json_object();
    json_t *tg = targets_json(c);
    if (!e || !names || !wpath || !cpath || !o || !tg) {
        s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        goto done;
    }
    int k = 0;
    for (int i = 0; i < m->n_tensors; i++) {
        const kiln_tensor_info *t = &m->tensors[i];
        if (!strstr(t->name, ".lora_")) continue;
        size_t len = strlen(PEFT_PREFIX) + strlen(t->name) + 1;
        names[k] = malloc(len);
        if (!names[k]) {
            s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
            goto done;
        }
        snprintf(names[k], len, PEFT_PREFIX "%s", t->name);
        e[k] = (st_entry){.name = names[k], .dtype = KILN_DTYPE_F32, .ndim = 2,
                          .shape = {t->shape[0], t->shape[1]}, .data = m->params + t->offset};
        k++;
    }
    if ((s = st_save(ctx, wpath, e, n, NULL, 0))) goto done;
    json_object_set_new(o, "peft_type", json_string("LORA"));
    json_object_set_new(o, "task_type", json_string("CAUSAL_LM"));
    json_object_set_new(o, "base_model_name_or_path",
                        base_model ? json_string(base_model) : json_null());
    json_object_set_new(o, "r", json_integer(c->lora_rank));
    json_object_set_new(o, "lora_alpha", json_real(short_real(c->lora_alpha)));
    json_object_set_new(o, "lora_dropout", json_real(short_real(c->lora_dropout)));
    json_object_set_new(o, "target_modules", tg);
    tg = NULL;
    json_object_set_new(o, "bias", json_string("none"));
    json_object_set_new(o, "fan_in_fan_out", json_boolean(c->arch == KILN_ARCH_GPT2));
    json_object_set_new(o, "inference_mode", json_true());
    json_object_set_new(o, "init_lora_weights", json_true());
    json_object_set_new(o, "use_rslora", json_false());
    json_object_set_new(o, "use_dora", json_false());
    json_object_set_new(o, "modules_to_save", json_null());
    json_object_set_new(o, "layers_to_transform", json_null());
    json_object_set_new(o, "rank_pattern", json_object());
    json_object_set_new(o, "alpha_pattern", json_object());
    s = js_save_file(ctx, cpath, o);
done:
    if (names)
        for (int i = 0; i < n; i++) free(names[i]);
    free(names);
    free(e);
    free(wpath);
    free(cpath);
    json_decref(o);
    json_decref(tg);
    return s;
}

/* The settings of adapter_config.json that kiln cannot honour, refused
 * naming the key. */
static kiln_status check_config(kiln_ctx *ctx, const json_t *o, const char *what)
{
    const char *pt = NULL;
    kiln_status s = js_get_str(ctx, o, "peft_type", what, true, &pt);
    if (s) return s;
    if (strcmp(pt, "LORA"))
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED, "%s: \"peft_type\" = \"%s\": kiln reads "
                         "LORA adapters only", what, pt);
    const char *bias = "none";
    if ((s = js_get_str(ctx, o, "bias", what, false, &bias))) return s;
    if (strcmp(bias, "none"))
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED, "%s: \"bias\" = \"%s\" is not supported "
                         "(adapters with trained biases; kiln reads bias \"none\")", what, bias);
    const char *flags[] = {"use_rslora", "use_dora"};
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(o, flags[i]);
        if (v && json_is_true(v))
            return kiln_fail(ctx, KILN_ERR_UNSUPPORTED, "%s: \"%s\" = true is not supported "
                             "(plain LoRA only)", what, flags[i]);
    }
    const char *lists[] = {"rank_pattern", "alpha_pattern"};
    for (int i = 0; i < 2; i++) {
        json_t *v = json_object_get(o, lists[i]);
        if (v && json_is_object(v) && json_object_size(v) > 0)
            return kiln_fail(ctx, KILN_ERR_UNSUPPORTED, "%s: \"%s\" (per-module ranks or "
                             "alphas) is not supported", what, lists[i]);
    }
    json_t *v = json_object_get(o, "modules_to_save");
    if (v && json_is_array(v) && json_array_size(v) > 0)
        return kiln_fail(ctx, KILN_ERR_UNSUPPORTED, "%s: \"modules_to_save\" is not supported "
                         "(fully trained extra modules)", what);
    return KILN_OK;
}

/* The slot of PEFT tensor name in layer *layer (A or B in *is_b), or -1. */
static int slot_of(const kiln_config *c, const char *name, int *layer, bool *is_b)
{
    const char *pre = c->arch == KILN_ARCH_GPT2 ? PEFT_PREFIX "transformer.h."
                                                : PEFT_PREFIX "model.layers.";
    size_t pl = strlen(pre);
    if (strncmp(name, pre, pl)) return -1;
    char *end;
    long l = strtol(name + pl, &end, 10);
    if (end == name + pl || *end != '.' || l < 0 || l >= c->n_layer) return -1;
    for (int s = 0; s < kiln_lora_num_slots(c->arch); s++) {
        const char *mod = kiln_lora_slot_name(c->arch, s);
        size_t ml = strlen(mod);
        if (strncmp(end + 1, mod, ml)) continue;
        const char *tail = end + 1 + ml;
        if (!strcmp(tail, ".lora_A.weight") || !strcmp(tail, ".lora_B.weight")) {
            *layer = (int)l;
            *is_b = tail[6] == 'B';
            return s;
        }
    }
    return -1;
}

/* Opens PEFT adapter directory dir for base config c: its settings
 * (adapter_config.json) and its tensors, every name and shape checked
 * against the base (an adapter for another base is refused naming the
 * tensor). *f open on success (the caller closes it); *wpath malloc'ed. */
static kiln_status open_adapter(kiln_ctx *ctx, const kiln_config *c, const char *dir,
                                kiln_lora_opts *lo, st_file *f, char **wpath_out)
{
    char *cpath = file_join(dir, "adapter_config.json");
    char *wpath = file_join(dir, "adapter_model.safetensors");
    json_t *o = NULL;
    bool opened = false;
    kiln_status s = KILN_OK;
    if (!cpath || !wpath) {
        s = kiln_fail(ctx, KILN_ERR_NOMEM, "out of memory");
        goto done;
    }
    if (!file_exists(cpath)) {
        s = kiln_fail(ctx, KILN_ERR_IO, "%s: no adapter_config.json (a PEFT adapter directory "
                      "has adapter_config.json and adapter_model.safetensors)", dir);
        goto done;
    }
    if ((s = js_load_file(ctx, cpath, &o)) || (s = check_config(ctx, o, cpath))) goto done;
    int64_t r = 0;
    double alpha = 8, drop = 0;
    if ((s = js_get_int(ctx, o, "r", cpath, true, &r)) ||
        (s = js_get_double(ctx, o, "lora_alpha", cpath, false, &alpha)) ||
        (s = js_get_double(ctx, o, "lora_dropout", cpath, false, &drop)))
        goto done;
    if (r < 1 || r > 4096) {
        s = kiln_fail(ctx, KILN_ERR_FORMAT, "%s: \"r\" = %lld is outside [1, 4096]", cpath,
                      (long long)r);
        goto done;
    }
    if (!file_exists(wpath)) {
        s = kiln_fail(ctx, KILN_ERR_IO, "%s: missing (kiln reads the safetensors form of a "
                      "PEFT adapter, not adapter_model.bin)", wpath);
        goto done;
    }
    if ((s = st_open(ctx, wpath, f))) goto done;
    opened = true;
    /* the targets are the slots that have tensors; all layers alike */
    int L = c->n_layer, ns = kiln_lora_num_slots(c->arch);
    int cnt[KILN_LORA_MAX_SLOTS] = {0};
    for (int i = 0; i < f->n_tensors; i++) {
        int l;
        bool b;
        int sl = slot_of(c, f->tensors[i].name, &l, &b);
        if (sl < 0) {
            s = kiln_fail(ctx, KILN_ERR_FORMAT, "%s: tensor \"%s\" is no LoRA A/B matrix of a "
                          "linear module of this %s base of %d layers", wpath,
                          f->tensors[i].name, c->arch == KILN_ARCH_GPT2 ? "gpt2" : "llama", L);
            goto done;
        }
        cnt[sl]++;
        /* the shape the base needs, checked before anything changes */
        model_lora_slot g = model_lora_slot_of(c, sl);
        const st_tensor *ft = &f->tensors[i];
        int64_t want0 = b ? g.out : r, want1 = b ? r : g.in;
        if (ft->ndim != 2 || ft->shape[0] != want0 || ft->shape[1] != want1) {
            char fs[64] = "";
            for (int d = 0; d < ft->ndim && d < 4; d++)
                snprintf(fs + strlen(fs), sizeof fs - strlen(fs), "%s%lld", d ? ", " : "",
                         (long long)ft->shape[d]);
            s = kiln_fail(ctx, KILN_ERR_FORMAT,
                          "%s: tensor \"%s\" has shape [%s] but the base model needs [%lld, "
                          "%lld] (r = %lld; an adapter made for another base?)", wpath,
                          ft->name, fs, (long long)want0, (long long)want1, (long long)r);
            goto done;
        }
    }
    unsigned targets = 0;
    for (int k = 0; k < ns; k++) {
        if (!cnt[k]) continue;
        if (cnt[k] != 2 * L) {
            s = kiln_fail(ctx, KILN_ERR_UNSUPPORTED, "%s: %s has adapters in only some layers "
                          "(%d of %d A/B tensors; layers_to_transform is not supported)",
                          wpath, kiln_lora_slot_name(c->arch, k), cnt[k], 2 * L);
            goto done;
        }
        targets |= 1u << k;
    }
    if (!targets) {
        s = kiln_fail(ctx, KILN_ERR_FORMAT, "%s: no LoRA tensors in it", wpath);
        goto done;
    }
    *lo = (kiln_lora_opts){.rank = (int)r, .alpha = (float)alpha, .dropout = (float)drop,
                           .targets = targets};
done:
    if (s && opened) st_close(f);
    if (s) {
        free(wpath);
        wpath = NULL;
    }
    *wpath_out = wpath;
    json_decref(o);
    free(cpath);
    return s;
}

kiln_status kiln_model_load_adapter(kiln_ctx *ctx, kiln_model **mp, const char *dir)
{
    kiln_model *m = *mp;
    if (m->cfg.lora_rank > 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "%s: the base model has LoRA adapters already (merge them first)", dir);
    st_file f = {0};
    char *wpath = NULL;
    kiln_lora_opts lo;
    kiln_status s = open_adapter(ctx, &m->cfg, dir, &lo, &f, &wpath);
    if (s) return s;
    if ((s = kiln_model_add_lora(ctx, mp, &lo))) goto done;
    m = *mp;
    for (int i = 0; i < m->n_tensors && !s; i++) {
        const kiln_tensor_info *t = &m->tensors[i];
        if (!strstr(t->name, ".lora_")) continue;
        char name[256];
        snprintf(name, sizeof name, PEFT_PREFIX "%s", t->name);
        const st_tensor *ft = st_find(&f, name);
        KILN_ASSERT(ft); /* every slot's tensors were counted, shapes checked */
        s = st_read_f32(ctx, &f, ft, wpath, m->params + t->offset);
    }
    if (!s) model_params_touched(m);
done:
    st_close(&f);
    free(wpath);
    return s;
}

kiln_status model_adapter_read(kiln_ctx *ctx, const kiln_config *base, const char *dir,
                               model_adapter *ad)
{
    memset(ad, 0, sizeof *ad);
    if (base->lora_rank > 0)
        return kiln_fail(ctx, KILN_ERR_INVALID_ARG,
                         "%s: the base model has LoRA adapters already (merge them first)", dir);
    st_file f = {0};
    char *wpath = NULL;
    kiln_lora_opts lo;
    kiln_status s = open_adapter(ctx, base, dir, &lo, &f, &wpath);
    if (s) return s;
    ad->cfg = *base;
    ad->cfg.lora_rank = lo.rank;
    ad->cfg.lora_alpha = lo.alpha;
    ad->cfg.lora_dropout = 0; /* inference: no dropout */
    ad->cfg.lora_targets = lo.targets;
    int L = base->n_layer, ns = kiln_lora_num_slots(base->arch);
    size_t n = 0;
    for (int sl = 0; sl < ns; sl++) {
        if (!(lo.targets >> sl & 1)) continue;
        model_lora_slot g = model_lora_slot_of(base, sl);
        n += (size_t)L * lo.rank * (size_t)(g.in + g.out);
    }
    ad->n_floats = n;
    ad->data = malloc(n * sizeof(float));
    ad->a = calloc((size_t)L * KILN_LORA_MAX_SLOTS, sizeof *ad->a);
    ad->b = calloc((size_t)L * KILN_LORA_MAX_SLOTS, sizeof *ad->b);
    if (!ad->data || !ad->a || !ad->b) {
        s = kiln_fail(ctx, KILN_ERR_NOMEM, "%s: out of memory for the adapter", dir);
        goto done;
    }
    float *p = ad->data;
    const char *pre = base->arch == KILN_ARCH_GPT2 ? PEFT_PREFIX "transformer.h."
                                                   : PEFT_PREFIX "model.layers.";
    for (int l = 0; l < L && !s; l++)
        for (int sl = 0; sl < ns && !s; sl++) {
            if (!(lo.targets >> sl & 1)) continue;
            model_lora_slot g = model_lora_slot_of(base, sl);
            for (int ab = 0; ab < 2 && !s; ab++) {
                char name[256];
                snprintf(name, sizeof name, "%s%d.%s.lora_%c.weight", pre, l,
                         kiln_lora_slot_name(base->arch, sl), ab ? 'B' : 'A');
                const st_tensor *ft = st_find(&f, name);
                KILN_ASSERT(ft); /* counted and shape-checked by open_adapter */
                (ab ? ad->b : ad->a)[l * KILN_LORA_MAX_SLOTS + sl] = p;
                s = st_read_f32(ctx, &f, ft, wpath, p);
                p += (size_t)lo.rank * (ab ? g.out : g.in);
            }
        }
done:
    st_close(&f);
    free(wpath);
    if (s) model_adapter_free(ad);
    return s;
}

void model_adapter_free(model_adapter *ad)
{
    free(ad->data);
    free(ad->a);
    free(ad->b);
    memset(ad, 0, sizeof *ad);
}
