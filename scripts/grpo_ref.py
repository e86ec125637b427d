#!/usr/bin/python3
"""grpo_ref.py DIR B T V G MAXNEW -- PyTorch reference for tests/test_grpo.c.

An independent implementation of TRL GRPOTrainer's loss (loss_type "grpo"
and "dr_grpo") in float64 autograd. Reads from DIR (raw little-endian):
  logits.f32 (B, T, V), targets.i32 (B, T) (-1 = not learned),
  old.f32 (B, T), ref.f32 (B, T), rewards.f32 (B), params.f64
  [clip_low, clip_high, beta, dr_grpo]
and writes out.f64: [loss] + advantages (B) + dlogits (B*T*V).
"""
import sys

import numpy as np
import torch

d = sys.argv[1]
B, T, V, G, MAXNEW = (int(x) for x in sys.argv[2:7])
f32 = lambda n, shape: torch.from_numpy(np.fromfile(f"{d}/{n}", dtype="<f4").astype(np.float64).reshape(shape))
logits = f32("logits.f32", (B, T, V))
targets = torch.from_numpy(np.fromfile(f"{d}/targets.i32", dtype="<i4").astype(np.int64).reshape(B, T))
old, ref = f32("old.f32", (B, T)), f32("ref.f32", (B, T))
rewards = f32("rewards.f32", (B,))
clip_low, clip_high, beta, dr = np.fromfile(f"{d}/params.f64", dtype="<f8")

# group-relative advantages (TRL: mean and torch.std within each group)
grouped = rewards.view(-1, G)
mean = grouped.mean(dim=1).repeat_interleave(G)
adv = rewards - mean
if not dr:
    adv = adv / (grouped.std(dim=1).repeat_interleave(G) + 1e-4)

x = logits.clone().requires_grad_(True)
mask = (targets >= 0).double()
logp = torch.log_softmax(x, dim=-1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
coef1 = torch.exp(logp - old)
coef2 = torch.clamp(coef1, 1 - clip_low, 1 + clip_high)
ptl = -torch.min(coef1 * adv[:, None], coef2 * adv[:, None])
if beta > 0:
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    ptl = ptl + beta * kl
if dr:
    loss = (ptl * mask).sum() / (B * MAXNEW)
else:
    loss = ((ptl * mask).sum(dim=1) / mask.sum(dim=1)).mean()
loss.backward()
np.concatenate([[loss.item()], adv.numpy(), x.grad.numpy().ravel()]).astype("<f8").tofile(f"{d}/out.f64")
print("ok")
