#!/usr/bin/python3
"""objective_ref.py DIR N V -- PyTorch reference for tests/test_objective.c.

Reads from DIR (raw little-endian arrays the test wrote):
  logits.f32 (N, V), targets.i32 (N) with -100 = ignored, weights.f32 (N),
  dlogp.f32 (N)
and writes, in float64 autograd:
  masked.f64   [loss] + dlogits (N*V): 0/1-mask masked CE as PyTorch defines
               it, F.cross_entropy(ignore_index=-100, reduction='sum') divided
               by the count of targets != -100, the rows with weight 0 turned
               into -100 first (weights must be 0/1 for this one)
  weighted.f64 [loss] + dlogits: sum(w * ce) / sum(w) over rows != -100
               (reduction='none' then weighted)
  logp.f64     (N) log_softmax(logits)[target], 0 where ignored
  dlogp.f64    (N*V) d(sum(dlogp * logp))/d(logits)
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F

d, N, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
logits = np.fromfile(f"{d}/logits.f32", dtype="<f4").reshape(N, V).astype(np.float64)
targets = torch.from_numpy(np.fromfile(f"{d}/targets.i32", dtype="<i4").astype(np.int64))
weights = torch.from_numpy(np.fromfile(f"{d}/weights.f32", dtype="<f4").astype(np.float64))
dlogp = torch.from_numpy(np.fromfile(f"{d}/dlogp.f32", dtype="<f4").astype(np.float64))


def leaf():
    return torch.tensor(logits, dtype=torch.float64, requires_grad=True)


def save(name, loss, x):
    loss.backward()
    np.concatenate([[loss.item()], x.grad.numpy().ravel()]).astype("<f8").tofile(f"{d}/{name}")


# 0/1 mask: masked rows become ignore_index
x = leaf()
t01 = targets.clone()
t01[weights == 0] = -100
count = (t01 != -100).sum()
save("masked.f64", F.cross_entropy(x, t01, ignore_index=-100, reduction="sum") / count, x)

# real-valued weights
x = leaf()
ce = F.cross_entropy(x, targets, ignore_index=-100, reduction="none")
keep = (targets != -100).double()
save("weighted.f64", (weights * keep * ce).sum() / (weights * keep).sum(), x)

# per-token log-probs and their backward
x = leaf()
lp = F.log_softmax(x, dim=-1).gather(1, targets.clamp(min=0)[:, None])[:, 0]
lp = torch.where(targets >= 0, lp, torch.zeros_like(lp))
lp.detach().numpy().astype("<f8").tofile(f"{d}/logp.f64")
(dlogp * lp).sum().backward()
x.grad.numpy().ravel().astype("<f8").tofile(f"{d}/dlogp.f64")
print("ok")
