#!/usr/bin/env bash
# t_sft.sh — `kiln sft` as a user runs it: a tiny model pretrained here
# with kiln train (bytes vocabulary), then fine-tuned on generated chat and
# prompt/completion JSONL. Checks: the held-out loss on the assistant
# tokens falls; --loss-on changes what is counted (loss_tokens); a run
# stopped and resumed ends bit-identical to a straight one (resumed by kiln
# sft --resume or by kiln train --resume, which hands it over); bad lines are
# reported as FILE:LINE; bad flags are refused naming the flag; a .gguf
# base is imported and its tokenizer.chat_template renders the examples;
# --packing gives the loss of one example per row.
set -u
D="$KILN_TMP/t_sft"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh" # pass, fail, check
PY=/usr/bin/python3
if [ ! -x "$PY" ]; then echo "SKIP sft: needs /usr/bin/python3"; exit 0; fi
"$PY" - "$D" <<'EOF'
import json, random, sys
d = sys.argv[1]
random.seed(1)
words = "alpha beta gamma delta red green blue one two three cat dog bird".split()
with open(d + "/corpus.txt", "w") as f:
    for i in range(300):
        f.write(" ".join(random.choice(words) for _ in range(12)) + "\n")
with open(d + "/sft.jsonl", "w") as f:
    for i in range(80):
        a = random.sample(words, 3)
        if i % 3 == 0:
            f.write(json.dumps({"prompt": "reverse: " + " ".join(a) + "\n",
                                "completion": " ".join(reversed(a))}) + "\n")
        else:
            f.write(json.dumps({"messages": [
                {"role": "user", "content": "reverse " + " ".join(a)},
                {"role": "assistant", "content": " ".join(reversed(a))}]}) + "\n")
EOF
cat >"$D/tiny.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 96}
EOF
"$KILN" tokenize --input "$D/corpus.txt" --out "$D/data" --quiet >/dev/null 2>&1 || { fail sft_setup tokenize; exit 1; }
"$KILN" train --config "$D/tiny.json" --data "$D/data" --out "$D/pre" --steps 30 --batch 4 --seq 64 \
  --lr 1e-3 --warmup 5 --eval-every 0 --progress none --threads 2 >/dev/null 2>&1 || { fail sft_setup train; exit 1; }

SFT=("$KILN" sft --model "$D/pre" --data "$D/sft.jsonl" --batch 4 --lr 3e-3 --progress none
     --threads 2 --precision fp32 --warmup 2)

# ---- the held-out loss on the assistant tokens falls ----
"${SFT[@]}" --out "$D/run" --steps 40 --eval-every 20 >"$D/run.out" 2>&1
rc=$?
DETAIL="status $rc: $(tail -3 "$D/run.out" | tr '\n' ' ')"
check sft_runs test "$rc" = 0 -a -f "$D/run/step_00000040/model.safetensors"
read -r v0 v1 < <("$PY" - "$D/run/metrics.jsonl" <<'EOF'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1])]
v = [x["val_loss"] for x in m if "val_loss" in x]
print(v[0], v[-1])
EOF
)
DETAIL="val_loss $v0 -> $v1"
check sft_val_loss_falls "$PY" -c "import sys; sys.exit(not (float('$v1') < 0.75 * float('$v0')))"
check sft_rows_reported grep -q '^rows: 72 train, 8 held out' "$D/run.out"
check sft_json_written grep -q '"loss_on": "assistant"' "$D/run/sft.json"
# the fine-tuned checkpoint is a model directory the other commands load
echo 'reverse red cat dog' >"$D/p.txt"
"$KILN" generate --model "$D/run" --prompt "$(cat "$D/p.txt")" --max-tokens 4 --temperature 0 >"$D/gen.out" 2>&1
DETAIL="$(tail -2 "$D/gen.out")"
check sft_checkpoint_generates test $? = 0

# ---- --loss-on: what the loss averages over (loss_tokens of step 1) ----
lt() { "$PY" -c "import json,sys; print([json.loads(l) for l in open(sys.argv[1])][0]['loss_tokens'])" "$1/metrics.jsonl"; }
for mode in assistant completion all; do
  "${SFT[@]}" --out "$D/lo_$mode" --steps 1 --eval-every 0 --sequential --loss-on $mode >/dev/null 2>&1
done
# --eval-every 0: no validation, though 8 examples are held out
check sft_eval_every_0_no_val eval "! grep -q val_loss $D/lo_all/metrics.jsonl && grep -q loss_tokens $D/lo_all/metrics.jsonl"
a=$(lt "$D/lo_assistant"); c=$(lt "$D/lo_completion"); l=$(lt "$D/lo_all")
DETAIL="assistant $a completion $c all $l"
# single-turn examples: completion = assistant; all counts the prompts too
check sft_loss_on_counts test "$a" -gt 0 -a "$a" = "$c" -a "$l" -gt "$a"

# ---- the model's own chat template (tokenizer_config.json) ----
mkdir -p "$D/tmpl"
cp "$D/pre/step_00000030/config.json" "$D/pre/step_00000030/model.safetensors" \
   "$D/pre/step_00000030/tokenizer.json" "$D/tmpl/"
cat >"$D/tmpl/tokenizer_config.json" <<'EOF'
{"eos_token": "</s>", "chat_template": "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n{% endif %}\n{% endfor %}"}
EOF
"$KILN" sft --model "$D/tmpl" --data "$D/sft.jsonl" --out "$D/tm" --steps 2 --batch 4 --sequential \
  --val-fraction 0 --progress none --threads 2 >"$D/tm.out" 2>&1
rc=$?
DETAIL="status $rc: $(tail -3 "$D/tm.out" | tr '\n' ' ')"
check sft_template_runs test "$rc" = 0
# step 1 = the first 4 lines: an assistant turn learns its content and
# "</s>" (4 bytes); a completion its text and the end-of-text id
want=$("$PY" - "$D/sft.jsonl" <<'EOF'
import json, sys
n = 0
for l in list(open(sys.argv[1]))[:4]:
    x = json.loads(l)
    n += len(x["completion"]) + 1 if "completion" in x else len(x["messages"][-1]["content"]) + 4
print(n)
EOF
)
got=$(lt "$D/tm")
DETAIL="loss_tokens $got, want $want"
check sft_template_mask test "$got" = "$want"
check sft_template_in_checkpoint cmp -s "$D/tmpl/tokenizer_config.json" "$D/tm/step_00000002/tokenizer_config.json"
# ---- a .gguf base: its tokenizer.chat_template renders the examples ----
# (eos_token travels as tokenizer.ggml.eos_token_id: a special token here)
mkdir -p "$D/tg_src"
cp "$D/tmpl/config.json" "$D/tmpl/model.safetensors" "$D/tmpl/tokenizer.json" "$D/tg_src/"
cat >"$D/tg_src/tokenizer_config.json" <<'EOF'
{"eos_token": "<|endoftext|>", "chat_template": "{% for message in messages %}{{ '[' + message['role'] + ']\\n' + message['content'] + eos_token }}{% endfor %}"}
EOF
"$KILN" export --format gguf --model "$D/tg_src" --out "$D/tg.gguf" --quiet >"$D/tg.out" 2>&1
"$KILN" sft --model "$D/tg.gguf" --data "$D/sft.jsonl" --out "$D/tg" --steps 2 --batch 4 --sequential \
  --val-fraction 0 --progress none --threads 2 >>"$D/tg.out" 2>&1
rc=$?
# step 1: each assistant turn learns its content and the one <|endoftext|> id
want=$("$PY" - "$D/sft.jsonl" <<'EOF'
import json, sys
n = 0
for l in list(open(sys.argv[1]))[:4]:
    x = json.loads(l)
    n += len(x["completion"]) + 1 if "completion" in x else len(x["messages"][-1]["content"]) + 1
print(n)
EOF
)
got=$(lt "$D/tg" 2>/dev/null)
DETAIL="status $rc, loss_tokens $got, want $want: $(tail -3 "$D/tg.out" | tr '\n' ' ')"
check sft_gguf_template eval "test $rc = 0 && test '$got' = '$want' && grep -q 'with its chat template' $D/tg.out"
check sft_gguf_template_kept "$PY" -c "import json,sys; a=json.load(open(sys.argv[1])); b=json.load(open(sys.argv[2])); sys.exit(a['chat_template'] != b['chat_template'] or b.get('eos_token') != '<|endoftext|>')" "$D/tg_src/tokenizer_config.json" "$D/tg/step_00000002/tokenizer_config.json"
# the run resumes from its imported base
"$KILN" sft --resume "$D/tg" --steps 3 --progress none --threads 2 >"$D/tg2.out" 2>&1
DETAIL="$(tail -3 "$D/tg2.out" | tr '\n' ' ')"
check sft_gguf_resume test -f "$D/tg/step_00000003/model.safetensors"

cat >"$D/tmpl/tokenizer_config.json" <<'EOF'
{"chat_template": "{% for m in messages %}{% if m.role == 'user' and loop.last %}{{ raise_exception('the last message must be the assistant reply') }}{% endif %}{{ m.content }}{% endfor %}"}
EOF
printf '%s\n' '{"messages":[{"role":"assistant","content":"a"},{"role":"user","content":"b"}]}' >"$D/raise.jsonl"
"$KILN" sft --model "$D/tmpl" --data "$D/raise.jsonl" --out "$D/tr" --steps 1 --progress none >"$D/tr.out" 2>&1
rc=$?
DETAIL="status $rc: $(tr '\n' ' ' <"$D/tr.out" | head -c 400)"
check sft_template_raise_named eval "test $rc = 1 && grep -q 'raise.jsonl:1: .*the last message must be the assistant reply' $D/tr.out"

# ---- exact resume: 12 straight == 5, stop, resume to 12 ----
"${SFT[@]}" --out "$D/ra" --steps 12 --grad-accum 2 --eval-every 4 >/dev/null 2>&1
"${SFT[@]}" --out "$D/rb" --steps 12 --grad-accum 2 --eval-every 4 --stop-at 5 >"$D/rb.out" 2>&1
check sft_stop_at_saves grep -q 'resume with: kiln sft --resume' "$D/rb.out"
(cd / && "$KILN" sft --resume "$D/rb" --progress none --threads 2 >"$D/rb2.out" 2>&1)
DETAIL="$(tail -3 "$D/rb2.out" | tr '\n' ' ')"
check sft_resume_bit_exact cmp -s "$D/ra/step_00000012/model.safetensors" "$D/rb/step_00000012/model.safetensors"
check sft_resume_same_metrics cmp -s <(cut -d, -f1-3 "$D/ra/metrics.jsonl") <(cut -d, -f1-3 "$D/rb/metrics.jsonl")
# kiln train --resume on an sft run hands it to kiln sft: the same trajectory
"${SFT[@]}" --out "$D/rc" --steps 12 --grad-accum 2 --eval-every 4 --stop-at 5 >/dev/null 2>&1
(cd / && "$KILN" train --resume "$D/rc" --progress none --threads 2 >"$D/rc2.out" 2>&1)
DETAIL="$(tail -3 "$D/rc2.out" | tr '\n' ' ')"
check train_resume_of_sft_run eval "grep -q 'is a kiln sft run' $D/rc2.out && cmp -s $D/ra/step_00000012/model.safetensors $D/rc/step_00000012/model.safetensors"

# ---- under mpirun: 2 ranks x batch 2 train what 1 rank x batch 4 does ----
if command -v mpirun >/dev/null 2>&1 && ldd "$KILN" 2>/dev/null | grep -q libmpi; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
  [ -n "${KILN_SANITIZE:-}" ] && export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
  M=("$KILN" sft --model "$D/pre" --data "$D/sft.jsonl" --steps 4 --precision fp32 --threads 1
     --progress none --eval-every 2 --lr 3e-3)
  "${M[@]}" --out "$D/m1" --batch 4 >/dev/null 2>&1
  timeout 120 mpirun --oversubscribe -np 2 "${M[@]}" --out "$D/m2" --batch 2 >"$D/m2.out" 2>&1
  DETAIL="$(tail -3 "$D/m2.out" | tr '\n' ' ')"
  check sft_mpi_same_losses "$PY" - "$D/m1/metrics.jsonl" "$D/m2/metrics.jsonl" <<'EOF'
import json, sys
a, b = ([json.loads(l) for l in open(f)] for f in sys.argv[1:3])
ok = len(a) == len(b) == 5 and b[-1]["world_size"] == 2
for x, y in zip(a, b):
    for k in ("loss", "val_loss"):
        if k in x: ok = ok and abs(x[k] - y[k]) < 1e-5 and x.get("loss_tokens") == y.get("loss_tokens")
sys.exit(not ok)
EOF
else
  echo "SKIP sft_mpi_same_losses: mpirun or an MPI build of kiln is absent"
fi

# ---- bad lines are named FILE:LINE ----
{ head -2 "$D/sft.jsonl"; echo '{"messages": [{"role": "user", "content": "x"}'; head -4 "$D/sft.jsonl" | tail -2
  echo '{"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}'; } >"$D/bad.jsonl"
"$KILN" sft --model "$D/pre" --data "$D/bad.jsonl" --out "$D/bad" --steps 1 --progress none >"$D/bad.out" 2>&1
rc=$?
DETAIL="status $rc: $(tr '\n' ' ' <"$D/bad.out" | head -c 600)"
check sft_bad_line_named eval "test $rc = 1 && grep -q bad.jsonl:3: $D/bad.out && grep -q bad.jsonl:6: $D/bad.out && grep -q -- --skip-bad $D/bad.out"
check sft_bad_line_fails_run test ! -e "$D/bad/latest"
"$KILN" sft --model "$D/pre" --data "$D/bad.jsonl" --out "$D/bad2" --steps 1 --progress none --skip-bad-lines >"$D/bad2.out" 2>&1
DETAIL="$(tr '\n' ' ' <"$D/bad2.out" | head -c 600)"
check sft_skip_bad_lines grep -q '4 examples (6 lines, 2 bad' "$D/bad2.out"

# ---- --packing: several examples per row, each attending to itself ----
# One step over every training example (one batch) from the same model:
# packed and one-per-row give the same loss, and the same update (the
# held-out loss after it, itself measured on packed / padded rows).
"${SFT[@]}" --out "$D/pk0" --steps 1 --eval-every 1 --sequential --batch 72 --max-len 97 >"$D/pk0.out" 2>&1
rc0=$?
"${SFT[@]}" --out "$D/pkr" --steps 1 --eval-every 0 --sequential --batch 72 --max-len 97 --packing >"$D/pkr.out" 2>&1
R=$(grep -oE '^rows: [0-9]+' "$D/pkr.out" | grep -oE '[0-9]+')
"${SFT[@]}" --out "$D/pk1" --steps 1 --eval-every 1 --sequential --batch "${R:-1}" --max-len 97 --packing >"$D/pk1.out" 2>&1
rc1=$?
DETAIL="status $rc0 $rc1: $(tail -3 "$D/pk1.out" | tr '\n' ' ')"
check sft_packing_runs test "$rc0" = 0 -a "$rc1" = 0
DETAIL="$(grep '^packing:' "$D/pk1.out")"
check sft_packing_reported grep -qE '^packing: 72 examples in [0-9]+ rows, [0-9.]+% of positions filled' "$D/pk1.out"
DETAIL="rows $R"
check sft_packing_fewer_rows test "${R:-99}" -lt 72
DETAIL=$("$PY" - "$D/pk0/metrics.jsonl" "$D/pk1/metrics.jsonl" <<'EOF'
import json, sys
def get(p):
    m = [json.loads(l) for l in open(p)]
    return [x["loss"] for x in m if "loss" in x], [x["val_loss"] for x in m if "val_loss" in x]
a, b = get(sys.argv[1]), get(sys.argv[2])
print(a, b)
ok = len(a[0]) == len(b[0]) == 1 and len(a[1]) == len(b[1]) >= 1
ok = ok and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a[0] + a[1], b[0] + b[1]))
sys.exit(0 if ok else 1)
EOF
)
check sft_packing_same_loss test $? = 0
grep -q '"packing": true' "$D/pk1/sft.json"; check sft_packing_in_sft_json test $? = 0
"${SFT[@]}" --out "$D/pk2" --steps 6 --eval-every 3 --batch 2 --max-len 97 --packing >"$D/pk2.out" 2>&1
DETAIL="$(tail -3 "$D/pk2.out" | tr '\n' ' ')"
check sft_packing_trains grep -q 'done: step 6' "$D/pk2.out"

# ---- flags are checked, the flag named ----
flag() { # NAME NEEDLE ARGS...: exit 2 or 1 and NEEDLE on stderr
  local n=$1 needle=$2; shift 2
  "$KILN" sft --model "$D/pre" --data "$D/sft.jsonl" --out "$D/f_$n" --progress none "$@" >"$D/f_$n.out" 2>&1
  local rc=$?
  DETAIL="status $rc: $(tr '\n' ' ' <"$D/f_$n.out" | head -c 300)"
  check "sft_flag_$n" test "$rc" -ne 0 -a -n "$(grep -F -- "$needle" "$D/f_$n.out")"
}
flag loss_on "--loss-on 'bogus'" --loss-on bogus
flag val_fraction "--val-fraction 1.5" --val-fraction 1.5
flag max_len "--max-len 500 exceeds" --max-len 500
flag batch "--batch" --batch 0 --steps 1
flag steps "--steps must be positive" --steps 0
flag no_model "--model, --data and --out are required" --model ""
"$KILN" sft --model "$D/pre" --out "$D/f_nodata" >"$D/f_nodata.out" 2>&1
DETAIL="$(cat "$D/f_nodata.out")"
check sft_flag_data_required grep -q -- '--model, --data and --out are required' "$D/f_nodata.out"
"$KILN" sft --model "$D/pre" --data "$D/sft.jsonl" --out "$D/run" --steps 1 --progress none >"$D/again.out" 2>&1
DETAIL="$(cat "$D/again.out")"
check sft_refuses_used_out grep -q -- "--resume $D/run" "$D/again.out"
exit 0
