#!/usr/bin/python3
"""lora_ref.py DIR — the independent PyTorch reference for kiln's LoRA.

DIR holds the base model (config.json + model.safetensors, base tensors
only), a PEFT adapter directory DIR/adapter (adapter_config.json +
adapter_model.safetensors with PEFT's names) and kiln_out.safetensors
(tokens, targets, kiln's logits, loss and the gradients of the adapters and
of the base tensors kiln left trainable), written by tests/test_lora.c.
The model is rebuilt in float64 with PEFT's LoRA formula on the unfused HF
modules:  y = base(x) + (lora_alpha / r) * (x @ A.T) @ B.T  (no dropout:
eval mode), every module the adapter file names, GPT-2's Conv1D as
(in, out) weights (fan_in_fan_out). Pass: max|kiln - torch| <= 1e-4 *
max|torch| for every tensor; the gradients of frozen base matrices must be
absent (kiln writes none). Exits 1 on any failure.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_ref import attention, layer_norm, load_safetensors, rms_norm, rotate_half  # noqa: E402

PRE = "base_model.model."


def make_lin(P, Ad, scale, conv1d):
    """A linear module of the base with the adapter PEFT would wrap it in."""
    def lin(h, name, bias):
        W = P[name + ".weight"]
        y = h @ W if conv1d else h @ W.T
        if bias:
            y = y + P[name + ".bias"]
        a = Ad.get(PRE + name + ".lora_A.weight")
        if a is not None:
            b = Ad[PRE + name + ".lora_B.weight"]
            y = y + scale * ((h @ a.T) @ b.T)
        return y
    return lin


def forward_gpt2(cfg, P, lin, tok):
    B, T = tok.shape
    C, NH, L = cfg["n_embd"], cfg["n_head"], cfg["n_layer"]
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    x = P["transformer.wte.weight"][tok] + P["transformer.wpe.weight"][:T]
    for l in range(L):
        p = f"transformer.h.{l}."
        h = layer_norm(x, P[p + "ln_1.weight"], P[p + "ln_1.bias"], eps)
        q, k, v = lin(h, p + "attn.c_attn", True).split(C, dim=-1)
        sh = lambda t: t.view(B, T, NH, C // NH).transpose(1, 2)
        y = attention(sh(q), sh(k), sh(v), T).transpose(1, 2).reshape(B, T, C)
        x = x + lin(y, p + "attn.c_proj", True)
        h = layer_norm(x, P[p + "ln_2.weight"], P[p + "ln_2.bias"], eps)
        h = F.gelu(lin(h, p + "mlp.c_fc", True), approximate="tanh")
        x = x + lin(h, p + "mlp.c_proj", True)
    x = layer_norm(x, P["transformer.ln_f.weight"], P["transformer.ln_f.bias"], eps)
    return x @ P["transformer.wte.weight"].T


def forward_llama(cfg, P, lin, tok):
    B, T = tok.shape
    C, NH, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    KVH = cfg.get("num_key_value_heads", NH)
    HS = C // NH
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", 10000.0)
    inv_freq = 1.0 / (theta ** (torch.arange(0, HS, 2, dtype=torch.int64).float() / HS))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().double(), emb.sin().double()
    x = P["model.embed_tokens.weight"][tok]
    for l in range(L):
        p = f"model.layers.{l}."
        h = rms_norm(x, P[p + "input_layernorm.weight"], eps)
        q = lin(h, p + "self_attn.q_proj", False).view(B, T, NH, HS).transpose(1, 2)
        k = lin(h, p + "self_attn.k_proj", False).view(B, T, KVH, HS).transpose(1, 2)
        v = lin(h, p + "self_attn.v_proj", False).view(B, T, KVH, HS).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = NH // KVH
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = attention(q, k, v, T).transpose(1, 2).reshape(B, T, C)
        x = x + lin(y, p + "self_attn.o_proj", False)
        h = rms_norm(x, P[p + "post_attention_layernorm.weight"], eps)
        g = lin(h, p + "mlp.gate_proj", False)
        u = lin(h, p + "mlp.up_proj", False)
        x = x + lin(F.silu(g) * u, p + "mlp.down_proj", False)
    x = rms_norm(x, P["model.norm.weight"], eps)
    head = P["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings", False) else P["lm_head.weight"]
    return x @ head.T


def main():
    d = sys.argv[1]
    cfg = json.load(open(f"{d}/config.json"))
    acfg = json.load(open(f"{d}/adapter/adapter_config.json"))
    assert acfg["peft_type"] == "LORA" and acfg["bias"] == "none"
    assert acfg["task_type"] == "CAUSAL_LM"
    assert acfg["fan_in_fan_out"] == (cfg["model_type"] == "gpt2")
    W = load_safetensors(f"{d}/model.safetensors")
    AW = load_safetensors(f"{d}/adapter/adapter_model.safetensors")
    K = load_safetensors(f"{d}/kiln_out.safetensors")
    P = {n: torch.tensor(a, dtype=torch.float64, requires_grad=True) for n, a in W.items()}
    Ad = {n: torch.tensor(a, dtype=torch.float64, requires_grad=True) for n, a in AW.items()}
    for n, a in AW.items():  # PEFT's shapes: A (r, in), B (out, r)
        assert a.shape[0 if ".lora_A." in n else 1] == acfg["r"], n
    # each adapter's module must be one targeted by target_modules (suffix match)
    for n in AW:
        mod = n[len(PRE):].rsplit(".lora_", 1)[0]
        assert any(mod == t or mod.endswith("." + t) for t in acfg["target_modules"]), n
    gpt2 = cfg["model_type"] == "gpt2"
    lin = make_lin(P, Ad, acfg["lora_alpha"] / acfg["r"], gpt2)
    tok = torch.tensor(K["tokens"], dtype=torch.int64)
    tgt = torch.tensor(K["targets"], dtype=torch.int64)
    logits = (forward_gpt2 if gpt2 else forward_llama)(cfg, P, lin, tok)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-1)
    loss.backward()
    worst, bad = 0.0, 0

    def cmp(name, ours, ref):
        nonlocal worst, bad
        ref = np.asarray(ref, dtype=np.float64)
        ours = np.asarray(ours, dtype=np.float64)
        if ours.shape != ref.shape:
            print(f"FAIL {name}: shape {ours.shape} vs torch {ref.shape}")
            bad += 1
            return
        scale = max(np.abs(ref).max(initial=0.0), 1e-30)
        err = np.abs(ours - ref).max(initial=0.0) / scale
        worst = max(worst, err)
        ok = err <= 1e-4 and scale > 1e-12
        bad += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {name:60s} rel err {err:.2e} (max {scale:.2e})")

    cmp("logits", K["logits"], logits.detach().numpy())
    cmp("loss", K["loss"], [loss.item()])
    n_lora = 0
    for n, t in Ad.items():
        cmp("grad " + n, K["grad." + n], t.grad.numpy())
        n_lora += 1
    for k in K:
        if k.startswith("grad.") and not k.startswith("grad." + PRE):
            n = k[5:]  # a base tensor kiln left trainable: its gradient crosses the adapters
            cmp("grad " + n, K[k], P[n].grad.numpy())
    print(f"{cfg['model_type']}: {n_lora} adapter tensors, worst relative error {worst:.2e}, "
          f"loss kiln {float(K['loss'][0]):.7f} torch {loss.item():.7f}")
    sys.exit(1 if bad or not n_lora else 0)


if __name__ == "__main__":
    main()
