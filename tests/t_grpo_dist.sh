#!/usr/bin/env bash
# t_grpo_dist.sh — `kiln grpo` under `mpirun -np 2`: each rank rolls out its
# share of the step's prompts (3 prompts: 1 on rank 0, 2 on rank 1, so the
# split is uneven), and the run equals one process with the same 3 prompts:
# the same completions (the rollout seeds are the step's, whatever rank
# samples them), the same metrics and final weights within 1e-5 relative
# (the gradients are summed across ranks under the global normaliser), for
# GRPO (per-completion token means) and Dr. GRPO (rows x max-new-tokens);
# only rank 0 writes metrics, samples and checkpoints; a 2-rank run stopped
# at step 2 and resumed under mpirun ends bit-identical to a straight one,
# and resumed by 1 process equals it within 1e-5 (the checkpoint does not
# depend on the number of ranks);
# held-out evaluations are split across the ranks too (sampled, from
# per-prompt seeds: the same as one process); fewer prompts per step than
# ranks is refused.
set -u
D="$KILN_TMP/t_grpo_dist"
rm -rf "$D"; mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh" # pass, fail, check
PY=/usr/bin/python3
if [ ! -x "$PY" ] || ! "$PY" -c "import numpy" 2>/dev/null; then
  echo "SKIP grpo_dist: needs /usr/bin/python3 with numpy"; exit 0
fi
if ! command -v mpirun >/dev/null 2>&1 || ! ldd "$KILN" 2>/dev/null | grep -q libmpi; then
  echo "SKIP grpo_dist: mpirun or an MPI build of kiln is absent"; exit 0
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
[ -n "${KILN_SANITIZE:-}" ] && export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
MPI=(timeout 300 mpirun --allow-run-as-root --oversubscribe -np 2)

"$PY" - "$D" <<'PYEOF'
import json, random, sys
d = sys.argv[1]
random.seed(3)
with open(d + "/prompts.jsonl", "w") as f:
    for i in range(12):
        a, b = random.randint(10, 99), random.randint(10, 99)
        f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b}) + "\n")
PYEOF
cat >"$D/tiny.json" <<'JEOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 257, "n_positions": 48}
JEOF
"$KILN" init --config "$D/tiny.json" --out "$D/m" >/dev/null 2>&1 || { fail grpo_dist_setup init; exit 1; }

G=("$KILN" grpo --model "$D/m" --tokenizer bytes --prompts "$D/prompts.jsonl" --group 4
   --batch-prompts 3 --micro-batch 3 --max-new-tokens 10 --beta 0.05 --updates 2 --lr 3e-3
   --reward exact,regex:0.2 --regex '[0-9]' --reward-cmd "awk '{print length(\$0) % 3}'"
   --save-every 2 --keep-last 0 --threads 1 --seed 5 --eval-prompts "$D/prompts.jsonl" --eval-every 2
   --eval-temperature 0.8)

# same: metrics (all but throughput) within 1e-5 relative, the same
# samples, final weights within 1e-5 relative (per tensor, in the L2 norm;
# the key bias aside: see below)
same() { "$PY" - "$1" "$2" "$3" <<'PYEOF'
import json, math, sys
import numpy as np
a, b, step = sys.argv[1], sys.argv[2], sys.argv[3]
ma = [json.loads(l) for l in open(a + "/metrics.jsonl")]
mb = [json.loads(l) for l in open(b + "/metrics.jsonl")]
assert len(ma) == len(mb) and len(ma) > 0, (len(ma), len(mb))
for x, y in zip(ma, mb):
    assert x.keys() == y.keys(), (x.keys(), y.keys())
    for k in x:
        if k.endswith("tokens_per_s") or k == "world_size": continue
        assert abs(x[k] - y[k]) <= 1e-5 * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])
assert any(y.get("world_size") == 2 for y in mb), "the second run is not 2 ranks"
sa = [json.loads(l) for l in open(a + "/samples.jsonl")]
sb = [json.loads(l) for l in open(b + "/samples.jsonl")]
assert [s["completions"] for s in sa] == [s["completions"] for s in sb], "samples differ"
def load(path):
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    hdr = json.loads(raw[8:8 + n])
    out = {}
    for k, v in hdr.items():
        if k == "__metadata__": continue
        assert v["dtype"] == "F32", v
        s, e = v["data_offsets"]
        out[k] = np.frombuffer(raw[8 + n + s:8 + n + e], dtype=np.float32).astype(np.float64)
    return out
wa = {k: v.copy() for k, v in load(f"{a}/step_{int(step):08d}/model.safetensors").items()}
wb = {k: v.copy() for k, v in load(f"{b}/step_{int(step):08d}/model.safetensors").items()}
w0 = load(sys.argv[1].rsplit("/", 1)[0] + "/m/model.safetensors")
assert wa.keys() == wb.keys()
moved = 0
for k in wa:
    if k.endswith("attn.c_attn.bias"):
        # the key bias: softmax is shift-invariant, so its gradient is 0 in
        # exact arithmetic and only rounding (which differs with the order
        # of the sums) drives it, which Adam scales up to lr-sized steps
        E = wa[k].size // 3
        wa[k][E:2 * E] = wb[k][E:2 * E] = 0
    d = np.linalg.norm(wa[k] - wb[k]) / max(np.linalg.norm(wa[k]), 1e-30)
    assert d <= 1e-5, (k, d)
    moved += np.linalg.norm(wa[k] - w0[k]) > 1e-4 * max(np.linalg.norm(w0[k]), 1e-30)
assert moved > 0, "the weights did not move: the comparison would be empty"
PYEOF
}

# ---- GRPO: 2 ranks == 1 process ----
"${G[@]}" --out "$D/one" --steps 4 >"$D/one.out" 2>&1
rc1=$?
"${MPI[@]}" "${G[@]}" --out "$D/two" --steps 4 >"$D/two.out" 2>&1
rc2=$?
DETAIL="status $rc1/$rc2: $(tail -3 "$D/two.out" | tr '\n' ' ')"
check grpo_dist_runs test "$rc1" = 0 -a "$rc2" = 0 -a -f "$D/two/step_00000004/model.safetensors"
DETAIL="$(grep -c '^step ' "$D/two.out") progress lines: $(head -5 "$D/two.out" | tr '\n' ' ')"
check grpo_dist_rank0_logs test "$(grep -c '^step ' "$D/two.out")" = 4 -a \
  "$(grep -c '^mpi: 2 ranks, 1 or 2 prompts' "$D/two.out")" = 1
DETAIL="$(same "$D/one" "$D/two" 4 2>&1 | tail -2)"
check grpo_dist_equals_one_process same "$D/one" "$D/two" 4

# ---- Dr. GRPO: the global rows x max-new-tokens ----
DR=("$KILN" grpo --model "$D/m" --tokenizer bytes --prompts "$D/prompts.jsonl" --group 3
    --batch-prompts 4 --micro-batch 5 --max-new-tokens 8 --lr 3e-3 --reward regex --regex '[0-9]+'
    --dr-grpo --updates 2 --threads 1 --seed 7 --steps 3 --save-every 0)
"${DR[@]}" --out "$D/dr1" >"$D/dr1.out" 2>&1
"${MPI[@]}" "${DR[@]}" --out "$D/dr2" >"$D/dr2.out" 2>&1
DETAIL="$(same "$D/dr1" "$D/dr2" 3 2>&1 | tail -2) $(tail -2 "$D/dr2.out")"
check grpo_dist_dr_grpo_equals_one_process same "$D/dr1" "$D/dr2" 3

# ---- a 2-rank run stopped at 2 and resumed under mpirun = straight ----
"${MPI[@]}" "${G[@]}" --out "$D/res" --steps 2 >"$D/res.out" 2>&1
"${MPI[@]}" "$KILN" grpo --resume "$D/res" --steps 4 --threads 1 >"$D/res2.out" 2>&1
rc=$?
DETAIL="status $rc: $(tail -3 "$D/res2.out" | tr '\n' ' ')"
check grpo_dist_resume_runs test "$rc" = 0
DETAIL="weights differ"
check grpo_dist_resume_identical cmp -s "$D/two/step_00000004/model.safetensors" "$D/res/step_00000004/model.safetensors"
strip() { "$PY" -c "
import json, sys
for l in open(sys.argv[1]):
    x = json.loads(l)
    for k in ('rollout_tokens_per_s', 'train_tokens_per_s'): x.pop(k, None)
    print(json.dumps(x, sort_keys=True))" "$1"; }
DETAIL="$(diff <(strip "$D/two/metrics.jsonl") <(strip "$D/res/metrics.jsonl") | head -4)"
check grpo_dist_resume_metrics_identical test -z "$DETAIL" -a -s "$D/res/metrics.jsonl"
DETAIL="samples differ"
check grpo_dist_resume_samples_identical cmp -s "$D/two/samples.jsonl" "$D/res/samples.jsonl"

# ---- the 2-rank checkpoint at step 2 resumed by 1 process = the 2-rank run ----
mkdir -p "$D/r1"
cp -r "$D/res/grpo.json" "$D/res/step_00000002" "$D/r1/"
echo step_00000002 >"$D/r1/latest"
"$PY" -c "
import json, sys
for n in ('metrics', 'samples'):
    with open('$D/r1/' + n + '.jsonl', 'w') as f:
        for l in open('$D/res/' + n + '.jsonl'):
            if json.loads(l)['step'] <= 2: f.write(l)"
"$KILN" grpo --resume "$D/r1" --steps 4 --threads 1 >"$D/r1.out" 2>&1
rc=$?
DETAIL="status $rc: $(tail -2 "$D/r1.out" | tr '\n' ' ') $(same "$D/r1" "$D/two" 4 2>&1 | tail -1)"
check grpo_dist_resume_at_one_rank test "$rc" = 0 -a -z "$(same "$D/r1" "$D/two" 4 2>&1)"

# ---- fewer prompts per step than ranks ----
"${MPI[@]}" "$KILN" grpo --model "$D/m" --tokenizer bytes --prompts "$D/prompts.jsonl" --group 2 \
  --batch-prompts 1 --steps 1 --threads 1 --out "$D/few" >"$D/few.out" 2>&1
rc=$?
DETAIL="status $rc: $(head -3 "$D/few.out")"
check grpo_dist_too_few_prompts test "$rc" != 0 -a -n "$(grep -- '--batch-prompts 1 is less than the 2 ranks' "$D/few.out")"
