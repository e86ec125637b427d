#!/usr/bin/python3
"""PyTorch reference for bench_precision: trains the same GPT-2 (config.json
keys n_layer, n_embd, n_head, vocab_size, n_positions; tied embeddings,
gelu_new, AdamW) in fp32 and in bf16 autocast on the CPU and prints one line
per precision:

    TORCH <precision> <tokens/s> <tokens per CPU s> <step ms> <peak RSS MiB> <loss>

Usage: bench_precision_torch.py CONFIG B T STEPS PRECISION...
Run with OPENBLAS_CORETYPE=SkylakeX (Debian's OpenBLAS misdetects this CPU).
"""
import json
import math
import os
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.NH = NH
        self.ln_1 = nn.LayerNorm(C, eps=1e-5)
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.ln_2 = nn.LayerNorm(C, eps=1e-5)
        self.c_fc = nn.Linear(C, 4 * C)
        self.mlp_proj = nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        hs = C // self.NH
        q = q.view(B, T, self.NH, hs).transpose(1, 2)
        k = k.view(B, T, self.NH, hs).transpose(1, 2)
        v = v.view(B, T, self.NH, hs).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.c_proj(y)
        x = x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))
        return x


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, V = cfg["n_embd"], cfg["vocab_size"]
        self.wte = nn.Embedding(V, C)
        self.wpe = nn.Embedding(cfg.get("n_positions", 1024), C)
        self.h = nn.ModuleList(Block(C, cfg["n_head"]) for _ in range(cfg["n_layer"]))
        self.ln_f = nn.LayerNorm(C, eps=1e-5)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.h:
            x = b(x)
        return self.ln_f(x) @ self.wte.weight.t()


def main():
    cfg_path, B, T, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    cfg = json.load(open(cfg_path))
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("KILN_THREADS", "0")) or os.cpu_count())
    V = cfg["vocab_size"]
    for prec in sys.argv[5:]:
        model = GPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        x = torch.randint(0, V, (B, T))
        y = torch.randint(0, V, (B, T))

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=prec == "bf16"):
                logits = model(x)
                loss = F.cross_entropy(logits.float().view(-1, V), y.view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()

        step()  # warm-up (allocations, oneDNN primitive creation)
        best = best_cpu = float("inf")
        loss = 0.0
        for _ in range(steps):
            t0, c0 = time.perf_counter(), time.process_time()
            loss = step()
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, time.process_time() - c0)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        print(f"TORCH {prec} {B * T / best:.1f} {B * T / best_cpu:.1f} {best * 1e3:.1f} {rss:.0f} {loss:.4f}",
              flush=True)


if __name__ == "__main__":
    main()
