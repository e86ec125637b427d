#!/usr/bin/env bash
# bench_dist_model.sh — the data-parallel scaling cost model of
# docs/distributed.md, printed as a table (no measurement; instant).
#
# Ring allreduce of the fp32 gradient (4P bytes) over N nodes:
#   t_comm = 2(N-1)/N * 4P / BW + 2(N-1) * alpha
# Compute per optimizer step on one node, for a fixed global batch of
# GLOBAL tokens split over the N nodes (strong scaling, the usual case: the
# batch size is a hyper-parameter of the run, not of the cluster):
#   t_comp = 6 * P * (GLOBAL / N) / FLOPS
# Efficiency without overlap: t_comp / (t_comp + t_comm); with ideal overlap
# behind the backward pass (2/3 of t_comp): t_comp / (t_comp + max(0,
# t_comm - 2/3 t_comp)). Speed-up = N * efficiency.
#
# Knobs (environment): GLOBAL (tokens per optimizer step, default 524288 =
# 0.5M, GPT-2/3 scale), FLOPS (sustained training FLOP/s per node, default
# 5e12: a two-socket AMX server at a realistic share of its bf16 peak),
# ALPHA25 / ALPHA100 (per-hop latency in s, default 30e-6 and 5e-6).
GLOBAL=${GLOBAL:-524288}
FLOPS=${FLOPS:-5e12}
ALPHA25=${ALPHA25:-30e-6}
ALPHA100=${ALPHA100:-5e-6}
awk -v glob="$GLOBAL" -v fl="$FLOPS" -v a25="$ALPHA25" -v a100="$ALPHA100" '
function gpt2(V, C, L, n) { return V*C + n*C + L*(12*C*C + 13*C) + 2*C }
BEGIN {
  name[1]="kiln default (gpt2 L4 C256)"; P[1]=gpt2(257,256,4,256)
  name[2]="GPT-2 124M (L12 C768)";      P[2]=gpt2(50257,768,12,1024)
  name[3]="GPT-2 355M (L24 C1024)";     P[3]=gpt2(50257,1024,24,1024)
  name[4]="GPT-2 774M (L36 C1280)";     P[4]=gpt2(50257,1280,36,1024)
  name[5]="GPT-2 1.5B (L48 C1600)";     P[5]=gpt2(50257,1600,48,1024)
  bw[1]=25e9/8; al[1]=a25; bn[1]="25 Gb/s"
  bw[2]=100e9/8; al[2]=a100; bn[2]="100 Gb/s"
  split("8 64 512", Ns, " ")
  printf "cost model: global batch %d tokens/step, %.2g FLOP/s per node, fp32 gradients, ring allreduce\n", glob, fl
  printf "%-28s %8s %8s %5s %9s %9s %9s %7s %7s %9s\n", "model", "params", "network", "N", "tok/node", "t_comp s", "t_comm s", "eff", "eff+ovl", "speed-up"
  for (m = 1; m <= 5; m++) for (b = 1; b <= 2; b++) for (k = 1; k <= 3; k++) {
    N = Ns[k]; p = P[m]
    tok = glob / N
    tc = 6 * p * tok / fl
    tm = 2 * (N - 1) / N * 4 * p / bw[b] + 2 * (N - 1) * al[b]
    e = tc / (tc + tm)
    x = tm - 2 / 3 * tc; if (x < 0) x = 0
    eo = tc / (tc + x)
    printf "%-28s %7.1fM %8s %5d %9d %9.4f %9.4f %6.1f%% %6.1f%% %9.1f\n", name[m], p / 1e6, bn[b], N, tok, tc, tm, 100 * e, 100 * eo, N * eo
  }
}'
