#!/usr/bin/env bash
# t_grpo.sh — `kiln grpo` as a user runs it, on a tiny random model (bytes
# vocabulary) and generated addition prompts: a run with the exact, regex
# and command rewards, the KL reference and two updates per batch writes
# every metric per step, held-out evaluations and sample completions, and the engine's
# log-probs of the sampled tokens equal the training forward's; a prompt longer than the
# context is counted and dropped; a run stopped at step 2 and resumed
# ends bit-identical to a straight one (weights, rewards, samples: the
# rollout RNG is in the checkpoint); a reward command that prints garbage
# is counted in metrics.jsonl and the run goes on; the checkpoint is a
# model directory kiln generate takes; bad flags are refused by name.
set -u
D="$KILN_TMP/t_grpo"
rm -rf "$D"; mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh" # pass, fail, check
PY=/usr/bin/python3
if [ ! -x "$PY" ]; then echo "SKIP grpo: needs /usr/bin/python3"; exit 0; fi
"$PY" - "$D" <<'PYEOF'
import json, random, sys
d = sys.argv[1]
random.seed(3)
with open(d + "/prompts.jsonl", "w") as f:
    for i in range(12):
        a, b = random.randint(10, 99), random.randint(10, 99)
        f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b}) + "\n")
    f.write(json.dumps({"prompt": "9" * 100, "answer": "1"}) + "\n")
PYEOF
cat >"$D/tiny.json" <<'JEOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 257, "n_positions": 48}
JEOF
"$KILN" init --config "$D/tiny.json" --out "$D/m" >/dev/null 2>&1 || { fail grpo_setup init; exit 1; }

G=("$KILN" grpo --model "$D/m" --tokenizer bytes --prompts "$D/prompts.jsonl" --group 4
   --batch-prompts 2 --micro-batch 3 --max-new-tokens 10 --beta 0.05 --updates 2 --lr 3e-3
   --reward exact,regex:0.2 --regex '[0-9]' --reward-cmd "awk '{print length(\$0) % 3}'"
   --save-every 2 --keep-last 0 --threads 1 --seed 5 --eval-prompts "$D/prompts.jsonl" --eval-every 2)

"${G[@]}" --out "$D/a" --steps 4 >"$D/a.out" 2>&1
rc=$?
DETAIL="status $rc: $(tail -3 "$D/a.out" | tr '\n' ' ')"
check grpo_runs test "$rc" = 0 -a -f "$D/a/step_00000004/model.safetensors"
DETAIL="$(head -2 "$D/a.out")"
check grpo_long_prompt_dropped grep -q '12 prompts (13 lines, 0 bad, 1 longer than the context of 48 and dropped)' "$D/a.out"
DETAIL="$(cat "$D/a/metrics.jsonl" 2>&1 | head -3)"
check grpo_metrics "$PY" - "$D/a/metrics.jsonl" <<'PYEOF'
import json, math, sys
m = [json.loads(l) for l in open(sys.argv[1])]
ev = [x for x in m if "eval_reward" in x]
m = [x for x in m if "loss" in x]
assert [x["step"] for x in m] == [1, 2, 3, 4], m
# held-out evaluations at the start, every 2 steps and at the end, over
# the 12 prompts that fit (the long one is skipped)
assert [x["step"] for x in ev] == [0, 2, 4], ev
assert all(x["eval_prompts"] == 12 and 0 <= x["eval_exact"] <= 1 for x in ev), ev
keys = ["loss", "reward_mean", "reward_std", "reward_exact", "reward_regex", "reward_cmd", "kl",
        "clip_frac", "completion_len", "rollout_tokens_per_s", "train_tokens_per_s", "lr",
        "grad_norm", "reward_cmd_failures"]
for x in m:
    for k in keys:
        assert k in x and math.isfinite(x[k]), (k, x)
    assert 1 <= x["completion_len"] <= 10 and x["rollout_tokens_per_s"] > 0
    assert x["train_tokens_per_s"] > 0 and x["reward_cmd_failures"] == 0
    # the engine's log-probs of the sampled tokens are the training forward's
    assert x["rollout_logp_diff_max"] < 1e-3, x
# the command's reward varies within groups, so the policy moves away from
# the reference and the second update clips some tokens
assert any(x["kl"] > 0 for x in m[1:]) and any(x["clip_frac"] > 0 for x in m), m
assert any(x["reward_std"] > 0 for x in m)
PYEOF
DETAIL="$(head -c 300 "$D/a/samples.jsonl" 2>&1)"
check grpo_samples "$PY" -c "
import json, sys
s = [json.loads(l) for l in open('$D/a/samples.jsonl')]
assert [x['step'] for x in s] == [1, 2, 3, 4]
assert all(len(x['completions']) == 4 and 'answer' in x and x['prompt'].endswith('=') for x in s)"

# ---- stopped at 2 and resumed = straight ----
"${G[@]}" --out "$D/b" --steps 2 >"$D/b.out" 2>&1
"$KILN" grpo --resume "$D/b" --steps 4 --threads 1 >"$D/b2.out" 2>&1
rc=$?
DETAIL="status $rc: $(tail -3 "$D/b2.out" | tr '\n' ' ')"
check grpo_resume_runs test "$rc" = 0
DETAIL="weights differ"
check grpo_resume_identical cmp -s "$D/a/step_00000004/model.safetensors" "$D/b/step_00000004/model.safetensors"
strip() { "$PY" -c "
import json, sys
for l in open(sys.argv[1]):
    x = json.loads(l)
    for k in ('rollout_tokens_per_s', 'train_tokens_per_s'): x.pop(k, None)
    print(json.dumps(x, sort_keys=True))" "$1"; }
DETAIL="$(diff <(strip "$D/a/metrics.jsonl") <(strip "$D/b/metrics.jsonl") | head -4)"
check grpo_resume_metrics_identical test -z "$DETAIL"
DETAIL="samples differ"
check grpo_resume_samples_identical cmp -s "$D/a/samples.jsonl" "$D/b/samples.jsonl"
"$KILN" grpo --resume "$D/b" --steps 5 --lr 1 >"$D/b3.out" 2>&1
rc=$?
DETAIL="status $rc: $(cat "$D/b3.out")"
check grpo_resume_refuses_changes test "$rc" = 2 -a -n "$(grep -- '--lr cannot change on --resume' "$D/b3.out")"

# ---- the checkpoint is a model directory ----
"$KILN" generate --model "$D/a" --prompt "12+34=" --max-tokens 4 --seed 1 --threads 1 >"$D/gen.out" 2>&1
rc=$?
DETAIL="status $rc: $(cat "$D/gen.out")"
check grpo_output_generates test "$rc" = 0

# ---- a reward command printing garbage: counted, the run goes on ----
"$KILN" grpo --model "$D/m" --tokenizer bytes --prompts "$D/prompts.jsonl" --group 2 \
  --batch-prompts 1 --max-new-tokens 4 --steps 2 --threads 1 --reward exact \
  --reward-cmd "cat >/dev/null; echo x" --out "$D/c" >"$D/c.out" 2>&1
rc=$?
DETAIL="status $rc: $(tail -4 "$D/c.out")"
check grpo_bad_reward_cmd_counted test "$rc" = 0 -a \
  "$(grep -c '"reward_cmd_failures":1' "$D/c/metrics.jsonl" 2>/dev/null)" = 2
check grpo_bad_reward_cmd_reported grep -q 'printed 1 line for 2 completions' "$D/c.out"

# ---- bad flags ----
"$KILN" grpo --model "$D/m" --tokenizer bytes --prompts "$D/prompts.jsonl" --out "$D/d" --group 1 >"$D/d.out" 2>&1
rc=$?
DETAIL="status $rc: $(cat "$D/d.out")"
check grpo_bad_group test "$rc" = 2 -a -n "$(grep -- '--group must be at least 2' "$D/d.out")"
"$KILN" grpo --model "$D/m" --tokenizer bytes --prompts "$D/prompts.jsonl" --out "$D/e" --reward exact,bogus >"$D/e.out" 2>&1
rc=$?
DETAIL="status $rc: $(cat "$D/e.out")"
check grpo_bad_reward test "$rc" = 1 -a -n "$(grep -- "--reward 'exact,bogus': unknown reward 'bogus'" "$D/e.out")"
"$KILN" grpo --model "$D/m" --tokenizer bytes --prompts "$D/prompts.jsonl" --out "$D/f" --dr-grpo --beta -1 >"$D/f.out" 2>&1
rc=$?
DETAIL="status $rc: $(cat "$D/f.out")"
check grpo_bad_beta test "$rc" = 1 -a -n "$(grep -- "--beta -1 must be >= 0" "$D/f.out")"
