#!/usr/bin/python3
"""distill_ref.py DIR N V -- PyTorch reference for tests/test_distill.c.

Reads from DIR (raw little-endian arrays the test wrote):
  student.f32 (N, V), teacher.f32 (N, V), targets.i32 (N) with < 0 =
  no loss, weights.f32 (N), cases.txt: one case a line, "LOSS TAU ALPHA BETA"
and writes, for case k, case_k.f64 = [loss] + d(loss)/d(student) (N*V) in
float64 autograd, where loss is the weighted mean over the rows with a
target of
  alpha * F.cross_entropy(student, y) + (1 - alpha) * tau^2 * D
with D written the way TRL's GKDTrainer.generalized_jsd_loss writes it
(F.kl_div on log-softmaxes at temperature tau, log_target=True):
  forward: kl_div(log q, log p) = KL(p || q)
  reverse: kl_div(log p, log q) = KL(q || p)
  jsd:     log m = logsumexp(log q + log(1 - beta), log p + log(beta)),
           beta * kl_div(log m, log p) + (1 - beta) * kl_div(log m, log q);
           beta 0 and 1 as forward and reverse (TRL special-cases them too)
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F

d, N, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
student = np.fromfile(f"{d}/student.f32", dtype="<f4").reshape(N, V).astype(np.float64)
teacher = torch.from_numpy(np.fromfile(f"{d}/teacher.f32", dtype="<f4").reshape(N, V).astype(np.float64))
targets = torch.from_numpy(np.fromfile(f"{d}/targets.i32", dtype="<i4").astype(np.int64))
weights = torch.from_numpy(np.fromfile(f"{d}/weights.f32", dtype="<f4").astype(np.float64))
keep = (targets >= 0).double()
w = weights * keep


def divergence(kind, lq, lp, beta):
    def kl(inp, tgt):  # KL(exp(tgt) || exp(inp)) per row
        return F.kl_div(inp, tgt, reduction="none", log_target=True).sum(-1)

    if kind == "forward" or (kind == "jsd" and beta == 0):
        return kl(lq, lp)
    if kind == "reverse" or (kind == "jsd" and beta == 1):
        return kl(lp, lq)
    b = torch.tensor(beta, dtype=torch.float64)
    lm = torch.logsumexp(torch.stack([lq + torch.log(1 - b), lp + torch.log(b)]), dim=0)
    return b * kl(lm, lp) + (1 - b) * kl(lm, lq)


for k, line in enumerate(open(f"{d}/cases.txt")):
    kind, tau, alpha, beta = line.split()
    tau, alpha, beta = float(tau), float(alpha), float(beta)
    x = torch.tensor(student, dtype=torch.float64, requires_grad=True)
    lq = F.log_softmax(x / tau, dim=-1)
    lp = F.log_softmax(teacher / tau, dim=-1)
    kd = divergence(kind, lq, lp, beta)
    ce = F.cross_entropy(x, targets.clamp(min=0), reduction="none")
    per_row = alpha * ce + (1 - alpha) * tau * tau * kd
    loss = (w * per_row).sum() / w.sum()
    loss.backward()
    np.concatenate([[loss.item()], x.grad.numpy().ravel()]).astype("<f8").tofile(f"{d}/case_{k}.f64")
print("ok")
