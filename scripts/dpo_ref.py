#!/usr/bin/python3
"""dpo_ref.py -- independent PyTorch reference for tests/test_dpo.c: TRL's
DPOTrainer losses (loss_type sigmoid, ipo, hinge; no label smoothing) and
metrics, written from TRL's definitions:

  pi_logratios  = policy_chosen_logps - policy_rejected_logps
  ref_logratios = reference_chosen_logps - reference_rejected_logps
  logits        = pi_logratios - ref_logratios
  sigmoid: -F.logsigmoid(beta * logits)
  ipo:     (logits - 1 / (2 * beta)) ** 2   (log-probs averaged per token)
  hinge:   torch.relu(1 - beta * logits)
  rewards/chosen = beta * (policy_chosen_logps - reference_chosen_logps), ...
  loss = losses.mean()  (over pairs)

Sequence log-probs: log_softmax(logits) gathered at the labels, summed over
the positions whose label is not ignored (-1 here), rows in pairs (chosen
2k, rejected 2k+1).

Modes (float64 autograd):
  logits DIR B T V BETA LOSS  reads DIR/logits.f32 (B*T, V), targets.i32
        (B*T), ref.f64 (B); writes DIR/out.f64 = [loss, 6 metrics, dloss/dlogits]
  model DIR BETA LOSS  DIR has config.json, model.safetensors and
        kiln_out.safetensors (tokens, targets, ref, loss, grad.*): rebuilds
        the model with torch_ref.py's forward, compares loss and every
        parameter gradient (max|kiln - torch| <= 1e-4 * max|torch|); exit 1
        on a mismatch.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_ref  # noqa: E402  (the model's forward, safetensors reading)


def sequence_logps(logits, labels, average):
    lp = F.log_softmax(logits, dim=-1)
    mask = labels != -1
    tok = torch.gather(lp, 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    s = (tok * mask).sum(-1)
    return s / mask.sum(-1) if average else s


def dpo(all_logps, ref, beta, loss_type):
    pc, pr = all_logps[0::2], all_logps[1::2]
    rc, rr = ref[0::2], ref[1::2]
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        raise SystemExit(f"unknown loss {loss_type}")
    cr = beta * (pc - rc).detach()
    rj = beta * (pr - rr).detach()
    metrics = [cr.mean(), rj.mean(), (cr > rj).double().mean(), (cr - rj).mean(),
               pc.detach().mean(), pr.detach().mean()]
    return losses.mean(), [m.item() for m in metrics]


def mode_logits(d, B, T, V, beta, loss_type):
    x = np.fromfile(f"{d}/logits.f32", dtype="<f4").astype(np.float64).reshape(B, T, V)
    x = torch.tensor(x, requires_grad=True)
    labels = torch.from_numpy(np.fromfile(f"{d}/targets.i32", dtype="<i4").astype(np.int64)).reshape(B, T)
    ref = torch.from_numpy(np.fromfile(f"{d}/ref.f64", dtype="<f8"))
    if loss_type == "ipo":  # the reference's sums become per-token means too
        ref = ref / (labels != -1).sum(-1)
    loss, metrics = dpo(sequence_logps(x, labels, loss_type == "ipo"), ref, beta, loss_type)
    loss.backward()
    np.concatenate([[loss.item()], metrics, x.grad.numpy().ravel()]).astype("<f8").tofile(f"{d}/out.f64")
    print("ok")


def mode_model(d, beta, loss_type):
    cfg = json.load(open(f"{d}/config.json"))
    W = torch_ref.load_weights(d)
    K = torch_ref.load_safetensors(f"{d}/kiln_out.safetensors")
    P = {n: torch.tensor(a, dtype=torch.float64, requires_grad=True) for n, a in W.items()}
    tok = torch.tensor(K["tokens"], dtype=torch.int64)
    labels = torch.tensor(K["targets"], dtype=torch.int64)
    ref = torch.tensor(K["ref"], dtype=torch.float64)
    if loss_type == "ipo":
        ref = ref / (labels != -1).sum(-1)
    fwd = torch_ref.forward_gpt2 if cfg["model_type"] == "gpt2" else torch_ref.forward_llama
    logits = fwd(cfg, P, tok)
    loss, _ = dpo(sequence_logps(logits, labels, loss_type == "ipo"), ref, beta, loss_type)
    loss.backward()
    bad, worst = 0, 0.0

    def cmp(name, ours, want):
        nonlocal bad, worst
        want = np.asarray(want, dtype=np.float64)
        ours = np.asarray(ours, dtype=np.float64)
        scale = max(np.abs(want).max(initial=0.0), 1e-30)
        err = np.abs(ours - want).max(initial=0.0) / scale
        worst = max(worst, err)
        ok = err <= 1e-4
        bad += 0 if ok else 1
        print(f"{'ok  ' if ok else 'FAIL'} {name:40s} rel err {err:.2e}")

    cmp("loss", K["loss"], [loss.item()])
    for n in W:
        g = P[n].grad
        cmp("grad " + n, K["grad." + n], g.numpy() if g is not None else np.zeros_like(W[n]))
    print(f"{loss_type}: loss kiln {float(K['loss'][0]):.7f} torch {loss.item():.7f}, "
          f"worst relative error {worst:.2e}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    if sys.argv[1] == "logits":
        d, B, T, V = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        mode_logits(d, B, T, V, float(sys.argv[6]), sys.argv[7])
    else:
        mode_model(sys.argv[2], float(sys.argv[3]), sys.argv[4])
