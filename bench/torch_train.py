#!/usr/bin/python3
"""torch_train.py — PyTorch's training speed on kiln's benchmark config.

The same GPT-2 model as kiln's (tied embeddings, tanh GELU, learned
positions), written with torch.nn, fp32, forward + cross-entropy + backward
per step. Run with OPENBLAS_CORETYPE=SkylakeX so Debian's OpenBLAS uses its
AVX-512 kernel. Prints its thread count, tokens per wall-clock second and
tokens per CPU second (process time; robust to other load on a shared
machine) and tokens/s of its best (least disturbed) step.
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, C, NH, Fdim, eps):
        super().__init__()
        self.ln_1 = nn.LayerNorm(C, eps=eps)
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.ln_2 = nn.LayerNorm(C, eps=eps)
        self.c_fc = nn.Linear(C, Fdim)
        self.mlp_proj = nn.Linear(Fdim, C)
        self.NH = NH

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        sh = lambda t: t.view(B, T, self.NH, C // self.NH).transpose(1, 2)
        q, k, v = sh(q), sh(k), sh(v)
        att = (q @ k.transpose(-2, -1)) * (1.0 / (C // self.NH) ** 0.5)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, V = cfg["n_embd"], cfg["vocab_size"]
        self.wte = nn.Embedding(V, C)
        self.wpe = nn.Embedding(cfg["n_positions"], C)
        eps = cfg.get("layer_norm_epsilon", 1e-5)
        Fdim = cfg.get("n_inner") or 4 * C
        self.h = nn.ModuleList(Block(C, cfg["n_head"], Fdim, eps) for _ in range(cfg["n_layer"]))
        self.ln_f = nn.LayerNorm(C, eps=eps)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for b in self.h:
            x = b(x)
        return self.ln_f(x) @ self.wte.weight.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    cfg = json.load(open(a.config))
    torch.manual_seed(0)
    model = GPT(cfg)
    V = cfg["vocab_size"]
    idx = torch.randint(0, V, (a.batch, a.seq))
    tgt = torch.randint(0, V, (a.batch, a.seq))
    total = 0.0
    cpu = 0.0
    best = float("inf")
    for s in range(a.steps + 1):
        t0 = time.perf_counter()
        c0 = time.process_time()
        logits = model(idx)
        loss = F.cross_entropy(logits.view(-1, V), tgt.view(-1))
        model.zero_grad(set_to_none=False)
        loss.backward()
        dt = time.perf_counter() - t0
        dc = time.process_time() - c0
        if s > 0:
            total += dt
            cpu += dc
            best = min(best, dt)
    print(f"torch_threads {torch.get_num_threads()}")
    print(f"torch_tokens_per_s {a.batch * a.seq * a.steps / total:.2f}")
    print(f"torch_tokens_per_cpu_s {a.batch * a.seq * a.steps / cpu:.2f}")
    print(f"torch_best_tokens_per_s {a.batch * a.seq / best:.2f}")


if __name__ == "__main__":
    main()
