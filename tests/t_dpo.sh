#!/usr/bin/env bash
# t_dpo.sh — `kiln dpo` as a user runs it: a tiny model pretrained here with
# kiln train (bytes vocabulary), then trained by DPO on generated preference
# pairs (strings and message lists; the chosen answer ends in "ok", the
# rejected one in "no"). Checks: the run trains and writes TRL's metrics (and val_ ones on
# held-out pairs); with the reference equal to the initial policy the first
# losses are ln 2 and the rewards 0; the reference is cached and a resumed
# run reads it and ends bit-identical to a straight one; --ref changes the
# reference; LoRA trains adapters against the base as the reference;
# held-out preference accuracy rises; bad lines are named
# FILE:LINE with the field; bad flags are refused naming the flag; the
# checkpoint generates.
set -u
D="$KILN_TMP/t_dpo"
rm -rf "$D"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh" # pass, fail, check
PY=/usr/bin/python3
if [ ! -x "$PY" ]; then echo "SKIP dpo: needs /usr/bin/python3"; exit 0; fi
"$PY" - "$D" <<'EOF'
import json, random, sys
d = sys.argv[1]
random.seed(1)
words = "alpha beta gamma delta red green blue one two three cat dog bird".split()
with open(d + "/corpus.txt", "w") as f:
    for i in range(300):
        f.write(" ".join(random.choice(words) for _ in range(12)) + "\n")
with open(d + "/prefs.jsonl", "w") as f:
    for i in range(60):
        a = random.sample(words, 3)
        # a preference a tiny model learns in a few steps: the same reversal,
        # signed "ok" (chosen) or "no" (rejected)
        good, bad = " ".join(reversed(a)) + " ok", " ".join(reversed(a)) + " no"
        if i % 2:
            f.write(json.dumps({"prompt": "reverse: " + " ".join(a) + "\n", "chosen": good,
                                "rejected": bad}) + "\n")
        else:
            f.write(json.dumps({"prompt": [{"role": "user", "content": "reverse " + " ".join(a)}],
                                "chosen": [{"role": "assistant", "content": good}],
                                "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
EOF
cat >"$D/tiny.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 96}
EOF
"$KILN" tokenize --input "$D/corpus.txt" --out "$D/data" --quiet >/dev/null 2>&1 || { fail dpo_setup tokenize; exit 1; }
"$KILN" train --config "$D/tiny.json" --data "$D/data" --out "$D/pre" --steps 30 --batch 4 --seq 64 \
  --lr 1e-3 --warmup 5 --eval-every 0 --progress none --threads 2 >/dev/null 2>&1 || { fail dpo_setup train; exit 1; }

DPO=("$KILN" dpo --model "$D/pre" --data "$D/prefs.jsonl" --batch 4 --lr 2e-3 --progress lines
     --log-every 1 --threads 2 --precision fp32 --val-fraction 0.2)

# ---- a run: metrics, ln 2 at the start, accuracy rises ----
"${DPO[@]}" --out "$D/run" --steps 30 --eval-every 15 --beta 0.5 >"$D/run.out" 2>&1
rc=$?
DETAIL="status $rc: $(tail -3 "$D/run.out" | tr '\n' ' ')"
check dpo_runs test "$rc" = 0 -a -f "$D/run/step_00000030/model.safetensors"
check dpo_rows_reported grep -q '^rows: 48 train pairs, 12 held out' "$D/run.out"
check dpo_reference_cached eval "test -s $D/run/ref_logps.bin && grep -q '^reference: .* over 120 rows' $D/run.out"
DETAIL="$(head -c 600 "$D/run/metrics.jsonl")"
check dpo_metrics "$PY" - "$D/run/metrics.jsonl" <<'EOF'
import json, math, sys
m = [json.loads(l) for l in open(sys.argv[1])]
names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
         "logps/chosen", "logps/rejected"]
steps = [x for x in m if "loss" in x]
vals = [x for x in m if "val_loss" in x]
ok = len(steps) == 30 and all(all(n in x for n in names) for x in steps)
ok = ok and len(vals) == 3 and all(all("val_" + n in x for n in names) for x in vals)
ok = ok and all(x.get("loss_weight") == 4 and "loss_tokens" not in x for x in steps)  # pairs
# the reference is the initial policy: h = 0 at the start
ok = ok and abs(vals[0]["val_loss"] - math.log(2)) < 1e-5 and abs(steps[0]["loss"] - math.log(2)) < 1e-5
ok = ok and steps[0]["rewards/chosen"] == 0 and steps[0]["rewards/margins"] == 0
# rewards/margins = chosen - rejected
ok = ok and all(abs(x["rewards/margins"] - (x["rewards/chosen"] - x["rewards/rejected"])) < 1e-6 for x in steps)
sys.exit(not ok)
EOF
read -r a0 a1 l0 l1 < <("$PY" - "$D/run/metrics.jsonl" <<'EOF'
import json, sys
v = [json.loads(l) for l in open(sys.argv[1])]
v = [x for x in v if "val_loss" in x]
print(v[0]["val_rewards/accuracies"], v[-1]["val_rewards/accuracies"], v[0]["val_loss"], v[-1]["val_loss"])
EOF
)
DETAIL="held-out accuracy $a0 -> $a1, val_loss $l0 -> $l1"
check dpo_val_accuracy_rises "$PY" -c "import sys; sys.exit(not (float('$a1') >= 0.75 and float('$l1') < 0.8 * float('$l0')))"
check dpo_progress_line grep -q 'rewards/accuracies' "$D/run.out"
check dpo_json_written grep -q '"loss": "sigmoid"' "$D/run/dpo.json"
"$KILN" generate --model "$D/run" --prompt "reverse: cat dog" --max-tokens 4 --temperature 0 --threads 2 >/dev/null 2>&1
check dpo_checkpoint_generates test $? = 0

# ---- exact resume: 8 straight == 3, stop, resume to 8; the cache is read ----
R=("${DPO[@]}" --steps 8 --eval-every 4 --save-every 2 --keep-last 0)
"${R[@]}" --out "$D/ra" >/dev/null 2>&1
"${R[@]}" --out "$D/rb" --stop-at 3 >"$D/rb.out" 2>&1
check dpo_stop_at_saves grep -q 'resume with: kiln dpo --resume' "$D/rb.out"
(cd / && "$KILN" dpo --resume "$D/rb" --progress none --threads 2 >"$D/rb2.out" 2>&1)
DETAIL="$(tail -3 "$D/rb2.out" | tr '\n' ' ')"
check dpo_resume_reads_cache grep -q "^reference: log-probabilities of .* rows read from" "$D/rb2.out"
check dpo_resume_bit_exact cmp -s "$D/ra/step_00000008/model.safetensors" "$D/rb/step_00000008/model.safetensors"
strip() { "$PY" -c "import json,sys
for l in open(sys.argv[1]):
    x = json.loads(l)
    for k in ('tokens_per_s', 'elapsed', 'comm_s', 'comm_frac'): x.pop(k, None)
    print(json.dumps(x, sort_keys=True))" "$1"; }
check dpo_resume_same_metrics cmp -s <(strip "$D/ra/metrics.jsonl") <(strip "$D/rb/metrics.jsonl")
# the rows cannot change under a run
"$KILN" dpo --resume "$D/rb" --data "$D/prefs.jsonl" --progress none >"$D/rc.out" 2>&1
rc=$?
check dpo_resume_keeps_data eval "test $rc -ne 0 && grep -q -- '--data cannot change on --resume' $D/rc.out"
# a damaged cache is not silently recomputed on resume
cp -r "$D/rb" "$D/rd"
printf 'x' | dd of="$D/rd/ref_logps.bin" bs=1 seek=40 conv=notrunc 2>/dev/null
"$KILN" dpo --resume "$D/rd" --steps 9 --progress none >"$D/rd.out" 2>&1
rc=$?
DETAIL="status $rc: $(tail -2 "$D/rd.out" | tr '\n' ' ')"
check dpo_resume_cache_checked eval "test $rc -ne 0 && grep -q 'ref_logps.bin' $D/rd.out"

# kiln train --resume on a dpo run hands it to kiln dpo: the same trajectory
"${R[@]}" --out "$D/re" --stop-at 3 >/dev/null 2>&1
(cd / && "$KILN" train --resume "$D/re" --progress none --threads 2 >"$D/re2.out" 2>&1)
DETAIL="$(tail -3 "$D/re2.out" | tr '\n' ' ')"
check train_resume_of_dpo_run eval "grep -q 'is a kiln dpo run' $D/re2.out && cmp -s $D/ra/step_00000008/model.safetensors $D/re/step_00000008/model.safetensors"

# ---- under mpirun: 2 ranks x 2 pairs == 1 rank x 4 pairs ----
if command -v mpirun >/dev/null 2>&1 && ldd "$KILN" 2>/dev/null | grep -q libmpi; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
  [ -n "${KILN_SANITIZE:-}" ] && export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
  M=("$KILN" dpo --model "$D/pre" --data "$D/prefs.jsonl" --steps 4 --precision fp32 --threads 1
     --progress none --eval-every 2 --lr 2e-3 --val-fraction 0.2)
  "${M[@]}" --out "$D/m1" --batch 4 >/dev/null 2>&1
  timeout 120 mpirun --oversubscribe -np 2 "${M[@]}" --out "$D/m2" --batch 2 >"$D/m2.out" 2>&1
  DETAIL="$(tail -3 "$D/m2.out" | tr '\n' ' ')"
  check dpo_mpi_same_metrics "$PY" - "$D/m1/metrics.jsonl" "$D/m2/metrics.jsonl" <<'EOF'
import json, sys
a, b = ([json.loads(l) for l in open(f)] for f in sys.argv[1:3])
ok = len(a) == len(b) == 5 and b[-1]["world_size"] == 2
for x, y in zip(a, b):
    for k in ("loss", "val_loss", "rewards/margins", "val_rewards/margins", "val_rewards/accuracies"):
        if k in x: ok = ok and abs(x[k] - y[k]) < 1e-5
sys.exit(not ok)
EOF
else
  echo "SKIP dpo_mpi_same_metrics: mpirun or an MPI build of kiln is absent"
fi

# ---- --ref: another reference, so the first loss is not ln 2 ----
"${DPO[@]}" --out "$D/ref" --ref "$D/run" --steps 1 --eval-every 0 >"$D/ref.out" 2>&1
rc=$?
DETAIL="status $rc: $(tail -2 "$D/ref.out" | tr '\n' ' ')"
check dpo_ref_flag "$PY" - "$D/ref/metrics.jsonl" <<'EOF'
import json, math, sys
m = [json.loads(l) for l in open(sys.argv[1])]
sys.exit(not (abs(m[0]["loss"] - math.log(2)) > 0.05 and m[0]["rewards/margins"] < 0))
EOF

# ---- LoRA: adapters on the policy, the base (without them) the reference ----
# B starts at zero, so the policy is the reference at step 0 (ln 2); the
# adapters learn (the rewards move), the checkpoint is a PEFT directory,
# and the base's own weights are those of --model
"${DPO[@]}" --out "$D/lora" --lora-rank 4 --lora-alpha 8 --lora-targets c_attn,c_fc --lr 5e-3 \
  --beta 0.5 --steps 12 --eval-every 0 >"$D/lora.out" 2>&1
rc=$?
DETAIL="status $rc: $(tail -3 "$D/lora.out" | tr '\n' ' ')"
check dpo_lora_runs eval "test $rc = 0 && grep -q '^lora: r 4' $D/lora.out && test -f $D/lora/step_00000012/adapter_config.json"
check dpo_lora_starts_at_ln2_and_learns "$PY" - "$D/lora/metrics.jsonl" <<'EOF'
import json, math, sys
m = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
sys.exit(not (abs(m[0]["loss"] - math.log(2)) < 1e-6 and abs(m[-1]["rewards/margins"]) > 1e-3))
EOF
"$KILN" merge --model "$D/pre" --adapter "$D/lora/step_00000012" --out "$D/lora_merged" >"$D/lora_merge.out" 2>&1
DETAIL="$(tail -2 "$D/lora_merge.out" | tr '\n' ' ')"
check dpo_lora_adapter_merges test -f "$D/lora_merged/model.safetensors"

# ---- losses: ipo and hinge run and start where their formulas say ----
for L in ipo hinge; do
  "${DPO[@]}" --out "$D/l_$L" --loss $L --beta 0.5 --steps 2 --eval-every 0 >"$D/l_$L.out" 2>&1
  want=$([ $L = ipo ] && echo 1.0 || echo 1.0) # h = 0: (1/(2*0.5))^2 = 1, max(0, 1) = 1
  DETAIL="$(tail -2 "$D/l_$L.out" | tr '\n' ' ')"
  check "dpo_loss_$L" "$PY" -c "import json,sys; m=[json.loads(l) for l in open('$D/l_$L/metrics.jsonl')]; sys.exit(not abs(m[0]['loss'] - $want) < 1e-5)"
done

# ---- bad lines are named FILE:LINE with the field ----
{ head -2 "$D/prefs.jsonl"; echo '{"prompt": "x", "chosen": "y"'; head -4 "$D/prefs.jsonl" | tail -2
  echo '{"prompt": "reverse: a b", "chosen": "b a"}'
  echo '{"prompt": [{"role": "user", "content": "x"}], "chosen": 3, "rejected": "z"}'; } >"$D/bad.jsonl"
"$KILN" dpo --model "$D/pre" --data "$D/bad.jsonl" --out "$D/bad" --steps 1 --progress none >"$D/bad.out" 2>&1
rc=$?
DETAIL="status $rc: $(tr '\n' ' ' <"$D/bad.out" | head -c 600)"
check dpo_bad_line_named eval "test $rc = 1 && grep -q 'bad.jsonl:3:' $D/bad.out && grep -q -- '--skip-bad' $D/bad.out"
check dpo_missing_field_named grep -q 'bad.jsonl:6: field "rejected" is missing' "$D/bad.out"
check dpo_wrong_type_named grep -q 'bad.jsonl:7: .*chosen' "$D/bad.out"
check dpo_bad_line_fails_run test ! -e "$D/bad/latest"
"$KILN" dpo --model "$D/pre" --data "$D/bad.jsonl" --out "$D/bad2" --steps 1 --progress none --skip-bad --val-fraction 0 >"$D/bad2.out" 2>&1
DETAIL="$(tr '\n' ' ' <"$D/bad2.out" | head -c 600)"
check dpo_skip_bad_lines grep -q '4 pairs (7 lines, 3 bad' "$D/bad2.out"

# ---- flags are checked, the flag named ----
flag() { # NAME NEEDLE ARGS...: a non-zero exit and NEEDLE in the output
  local n=$1 needle=$2; shift 2
  "$KILN" dpo --model "$D/pre" --data "$D/prefs.jsonl" --out "$D/f_$n" --progress none "$@" >"$D/f_$n.out" 2>&1
  local rc=$?
  DETAIL="status $rc: $(tr '\n' ' ' <"$D/f_$n.out" | head -c 300)"
  check "dpo_flag_$n" test "$rc" -ne 0 -a -n "$(grep -F -- "$needle" "$D/f_$n.out")"
}
flag loss "--loss 'kto'" --loss kto
flag beta "--beta" --beta 0
flag batch "--batch" --batch 0
flag ref "--ref" --ref "$D/nowhere"
flag val_fraction "--val-fraction" --val-fraction 1.5
"$KILN" dpo --help >"$D/help.out" 2>&1
check dpo_help eval "grep -q -- '--beta' $D/help.out && grep -q 'sigmoid | ipo | hinge' $D/help.out && grep -q -- '--grad-accum' $D/help.out"
