#!/usr/bin/python3
"""torch_ref.py DIR — the independent PyTorch reference for kiln's model.

DIR holds a config.json and model.safetensors (or HF's shards with
model.safetensors.index.json) plus kiln_out.safetensors
(tokens, targets, kiln's logits, loss and every parameter gradient, written
by tests/test_model_torch.c). This script rebuilds the model from the config
in plain PyTorch (GPT2LMHeadModel and LlamaForCausalLM semantics written out
by hand: Conv1D (in, out) weights, tanh GELU, HF rotate_half RoPE, RMSNorm,
SwiGLU, GQA via repeat_kv; Qwen2ForCausalLM's q/k/v biases without an o_proj
bias, MistralForCausalLM without biases), runs it in float64, and compares kiln's logits,
loss and gradients. Pass: max|kiln - torch| <= 1e-4 * max|torch| for every
tensor. Prints one line per tensor checked and exits 1 on any failure.

safetensors is parsed here with numpy (no safetensors package), which also
checks that kiln's files follow the format.
"""
import json
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

DT = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I32": np.int32,
      "I64": np.int64, "BF16": None}


def load_safetensors(path):
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n])
    base = 8 + n
    out = {}
    pos = 0
    for name, ent in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                            key=lambda kv: kv[1]["data_offsets"][0]):
        b, e = ent["data_offsets"]
        assert b == pos, f"{path}: {name} does not start where the previous tensor ends"
        pos = e
        raw = buf[base + b:base + e]
        if ent["dtype"] == "BF16":
            a = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
            a = a.view(np.float32)
        else:
            a = np.frombuffer(raw, dtype=DT[ent["dtype"]])
        out[name] = a.reshape(ent["shape"]).copy()
    assert base + pos == len(buf), f"{path}: trailing bytes after the last tensor"
    assert header.get("__metadata__", {}).get("format") in (None, "pt")
    return out


def load_weights(d):
    """DIR's weights: the shards its index names (each tensor from the file
    the weight_map gives), else model.safetensors."""
    try:
        index = json.load(open(f"{d}/model.safetensors.index.json"))
    except FileNotFoundError:
        return load_safetensors(f"{d}/model.safetensors")
    out = {}
    for fn in sorted(set(index["weight_map"].values())):
        part = load_safetensors(f"{d}/{fn}")
        for n, a in part.items():
            assert index["weight_map"].get(n) == fn, f"{n} in {fn} but not mapped there"
            out[n] = a
    assert set(out) == set(index["weight_map"]), "the index names tensors no shard holds"
    return out


def layer_norm(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def rms_norm(x, w, eps):
    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def attention(q, k, v, T):
    # q (B, NH, T, HS), k/v (B, NH, T, HS) already expanded for GQA
    hs = q.shape[-1]
    att = (q @ k.transpose(-2, -1)) / (hs ** 0.5)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    att = att.masked_fill(~mask, float("-inf"))
    return F.softmax(att, dim=-1) @ v


def forward_gpt2(cfg, P, tok):
    B, T = tok.shape
    C, NH, L = cfg["n_embd"], cfg["n_head"], cfg["n_layer"]
    eps = cfg.get("layer_norm_epsilon", 1e-5)
    x = P["transformer.wte.weight"][tok] + P["transformer.wpe.weight"][:T]
    for l in range(L):
        p = f"transformer.h.{l}."
        h = layer_norm(x, P[p + "ln_1.weight"], P[p + "ln_1.bias"], eps)
        qkv = h @ P[p + "attn.c_attn.weight"] + P[p + "attn.c_attn.bias"]  # Conv1D
        q, k, v = qkv.split(C, dim=-1)
        sh = lambda t: t.view(B, T, NH, C // NH).transpose(1, 2)
        y = attention(sh(q), sh(k), sh(v), T).transpose(1, 2).reshape(B, T, C)
        x = x + y @ P[p + "attn.c_proj.weight"] + P[p + "attn.c_proj.bias"]
        h = layer_norm(x, P[p + "ln_2.weight"], P[p + "ln_2.bias"], eps)
        h = F.gelu(h @ P[p + "mlp.c_fc.weight"] + P[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + h @ P[p + "mlp.c_proj.weight"] + P[p + "mlp.c_proj.bias"]
    x = layer_norm(x, P["transformer.ln_f.weight"], P["transformer.ln_f.bias"], eps)
    head = P["transformer.wte.weight"] if cfg.get("tie_word_embeddings", True) else P["lm_head.weight"]
    return x @ head.T


def forward_llama(cfg, P, tok):
    B, T = tok.shape
    C, NH, L = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    KVH = cfg.get("num_key_value_heads", NH)
    HS = C // NH
    eps = cfg.get("rms_norm_eps", 1e-6)
    theta = cfg.get("rope_theta", 10000.0)
    # the biases each HF class hard-codes: LlamaAttention reads attention_bias
    # (q/k/v/o); Qwen2Attention: q/k/v yes, o no; MistralAttention: none
    mt = cfg["model_type"]
    qkv_bias = mt == "qwen2" or (mt == "llama" and cfg.get("attention_bias", False))
    o_bias = mt == "llama" and cfg.get("attention_bias", False)
    # HF LlamaRotaryEmbedding: fp32 inv_freq and angles, then cos/sin
    inv_freq = 1.0 / (theta ** (torch.arange(0, HS, 2, dtype=torch.int64).float() / HS))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().double(), emb.sin().double()
    lin = lambda h, name, b: h @ P[name + ".weight"].T + (P[name + ".bias"] if b else 0)
    x = P["model.embed_tokens.weight"][tok]
    for l in range(L):
        p = f"model.layers.{l}."
        h = rms_norm(x, P[p + "input_layernorm.weight"], eps)
        q = lin(h, p + "self_attn.q_proj", qkv_bias).view(B, T, NH, HS).transpose(1, 2)
        k = lin(h, p + "self_attn.k_proj", qkv_bias).view(B, T, KVH, HS).transpose(1, 2)
        v = lin(h, p + "self_attn.v_proj", qkv_bias).view(B, T, KVH, HS).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        rep = NH // KVH  # HF repeat_kv: kv head j serves query heads j*rep .. j*rep+rep-1
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = attention(q, k, v, T).transpose(1, 2).reshape(B, T, C)
        x = x + lin(y, p + "self_attn.o_proj", o_bias)
        h = rms_norm(x, P[p + "post_attention_layernorm.weight"], eps)
        g = h @ P[p + "mlp.gate_proj.weight"].T
        u = h @ P[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(g) * u) @ P[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, P["model.norm.weight"], eps)
    head = P["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings", False) else P["lm_head.weight"]
    return x @ head.T


def main():
    d = sys.argv[1]
    cfg = json.load(open(f"{d}/config.json"))
    W = load_weights(d)
    K = load_safetensors(f"{d}/kiln_out.safetensors")
    P = {n: torch.tensor(a, dtype=torch.float64, requires_grad=True) for n, a in W.items()}
    tok = torch.tensor(K["tokens"], dtype=torch.int64)
    tgt = torch.tensor(K["targets"], dtype=torch.int64)
    fwd = forward_gpt2 if cfg["model_type"] == "gpt2" else forward_llama
    logits = fwd(cfg, P, tok)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-1)
    loss.backward()
    worst = 0.0
    bad = 0

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
        ok = err <= 1e-4
        bad += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {name:52s} rel err {err:.2e}")

    cmp("logits", K["logits"], logits.detach().numpy())
    cmp("loss", K["loss"], [loss.item()])
    for n in W:
        g = P[n].grad
        cmp("grad " + n, K["grad." + n], g.numpy() if g is not None else np.zeros_like(W[n]))
    extra = [k[5:] for k in K if k.startswith("grad.") and k[5:] not in W]
    for n in extra:
        print(f"FAIL gradient for unknown tensor {n}")
        bad += 1
    print(f"{cfg['model_type']}: {len(W)} tensors, worst relative error {worst:.2e}, "
          f"loss kiln {float(K['loss'][0]):.7f} torch {loss.item():.7f}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
