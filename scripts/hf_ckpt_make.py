#!/usr/bin/python3
"""hf_ckpt_make.py DIR ARCH DTYPE [SHARDS [VOCAB]] — writes a small random Hugging
Face checkpoint as transformers' save_pretrained lays it out, for
tests/test_model_torch.c: config.json with the keys of the real model
family, and the weights in DTYPE (F32, BF16 or F16) split over SHARDS files
model-0000i-of-0000n.safetensors plus model.safetensors.index.json
({"metadata": {"total_size"}, "weight_map": {name: file}}). SHARDS 1 writes
model.safetensors alone. VOCAB sets vocab_size (67 when not given).

ARCH: qwen2 (Qwen2.5-0.5B's layout: q/k/v biases, no o_proj bias, tied
embeddings, GQA, rope_theta 1e6), mistral (Mistral-7B-v0.2's: no biases,
untied, sliding_window null), llama (SmolLM2's: tied, head_dim key).

safetensors is written by hand (no safetensors package): 8-byte little-
endian header length, JSON header, raw little-endian data.
"""
import json
import os
import struct
import sys

import torch

ST = {"F32": (torch.float32, 4), "BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2)}


def config(arch):
    base = {"hidden_act": "silu", "hidden_size": 32, "intermediate_size": 48,
            "num_attention_heads": 4, "num_hidden_layers": 3, "num_key_value_heads": 2,
            "vocab_size": 67, "initializer_range": 0.02, "use_cache": True,
            "transformers_version": "4.44.0", "attention_dropout": 0.0}
    if arch == "qwen2":
        base.update({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                     "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 64,
                     "max_window_layers": 3, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                     "sliding_window": 64, "use_sliding_window": False,
                     "tie_word_embeddings": True})
    elif arch == "mistral":
        base.update({"architectures": ["MistralForCausalLM"], "model_type": "mistral",
                     "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 64,
                     "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None,
                     "tie_word_embeddings": False, "num_key_value_heads": 1})
    elif arch == "llama":
        base.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                     "attention_bias": False, "bos_token_id": 0, "eos_token_id": 0,
                     "head_dim": 8, "is_llama_config": True, "max_position_embeddings": 64,
                     "mlp_bias": False, "pretraining_tp": 1, "rms_norm_eps": 1e-5,
                     "rope_interleaved": False, "rope_scaling": None, "rope_theta": 100000,
                     "tie_word_embeddings": True})
    else:
        sys.exit(f"unknown arch {arch}")
    return base


def weights(cfg, gen):
    C, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    NH, KVH = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    HS = C // NH
    qwen2 = cfg["model_type"] == "qwen2"
    W = {}

    def r(*shape, std=0.3, mean=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * std + mean

    W["model.embed_tokens.weight"] = r(V, C, std=1.0)
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        W[p + "input_layernorm.weight"] = r(C, std=0.1, mean=1.0)
        W[p + "self_attn.q_proj.weight"] = r(NH * HS, C)
        W[p + "self_attn.k_proj.weight"] = r(KVH * HS, C)
        W[p + "self_attn.v_proj.weight"] = r(KVH * HS, C)
        if qwen2:
            W[p + "self_attn.q_proj.bias"] = r(NH * HS)
            W[p + "self_attn.k_proj.bias"] = r(KVH * HS)
            W[p + "self_attn.v_proj.bias"] = r(KVH * HS)
        W[p + "self_attn.o_proj.weight"] = r(C, NH * HS)
        W[p + "post_attention_layernorm.weight"] = r(C, std=0.1, mean=1.0)
        W[p + "mlp.gate_proj.weight"] = r(F, C)
        W[p + "mlp.up_proj.weight"] = r(F, C)
        W[p + "mlp.down_proj.weight"] = r(C, F)
    W["model.norm.weight"] = r(C, std=0.1, mean=1.0)
    if not cfg["tie_word_embeddings"]:
        W["lm_head.weight"] = r(V, C)
    return W


def save_safetensors(path, tensors, dtype):
    tdt, size = ST[dtype]
    header, blobs, pos = {}, [], 0
    for name, t in tensors.items():
        raw = t.to(tdt).contiguous().view(torch.uint8 if size == 1 else torch.int16
                                          if size == 2 else torch.int32).numpy().tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape),
                        "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    header["__metadata__"] = {"format": "pt"}
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    return pos


def main():
    d, arch, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
    shards = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    gen = torch.Generator().manual_seed(20240 + len(arch) + len(dtype))
    cfg = config(arch)
    if len(sys.argv) > 5:
        cfg["vocab_size"] = int(sys.argv[5])
    cfg["torch_dtype"] = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[dtype]
    W = weights(cfg, gen)
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/config.json", "w") as f:
        json.dump(cfg, f, indent=2)
    if shards == 1:
        save_safetensors(f"{d}/model.safetensors", W, dtype)
        return
    names = list(W)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: W[n] for n in names[i * per:(i + 1) * per]}
        total += save_safetensors(f"{d}/{fn}", part, dtype)
        weight_map.update({n: fn for n in part})
    with open(f"{d}/model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


if __name__ == "__main__":
    main()
