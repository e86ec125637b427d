#!/usr/bin/env bash
# t_distill.sh — `kiln distill` as a user runs it: a tiny teacher trained
# here with kiln train (bytes vocabulary) for a few steps, then a smaller
# student distilled from it. Checks: the run writes checkpoints and
# distill.json and the distillation loss falls; with --alpha 1 the loss is
# the data's cross-entropy, so the run follows kiln train's trajectory
# (fp32, same seed: the same validation losses); a run stopped and resumed
# ends bit-identical to a straight one (by kiln distill --resume and by
# kiln train --resume, which hands it over); a quantized .gguf teacher and
# JSONL data (tokenized with the teacher's tokenizer) work with the JSD and
# reverse KL; a teacher and student of different vocabularies are refused
# naming both sizes; bad flags are refused naming the flag.
set -u
D="$KILN_TMP/t_distill"
rm -rf "$D"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh" # pass, fail, check
PY=/usr/bin/python3
if [ ! -x "$PY" ]; then echo "SKIP distill: needs /usr/bin/python3"; exit 0; fi
"$PY" - "$D" <<'EOF'
import json, random, sys
d = sys.argv[1]
random.seed(3)
words = "alpha beta gamma delta red green blue one two three cat dog bird".split()
with open(d + "/corpus.jsonl", "w") as f:
    for i in range(400):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(12))}) + "\n")
with open(d + "/text.jsonl", "w") as f:
    for i in range(200):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(16))}) + "\n")
EOF
cat >"$D/teacher.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 96}
EOF
cat >"$D/student.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 257, "n_positions": 96}
EOF
cat >"$D/other_vocab.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 300, "n_positions": 96}
EOF
"$KILN" tokenize --input "$D/corpus.jsonl" --out "$D/data" --val-fraction 0.1 --quiet >/dev/null 2>&1 ||
  { fail distill_setup tokenize; exit 1; }
"$KILN" train --config "$D/teacher.json" --data "$D/data" --out "$D/teacher" --steps 40 --batch 4 --seq 64 \
  --lr 3e-3 --warmup 5 --eval-every 0 --progress none --threads 2 >"$D/teacher.out" 2>&1 ||
  { fail distill_setup "teacher: $(tail -2 "$D/teacher.out")"; exit 1; }

DIST=("$KILN" distill --teacher "$D/teacher" --data "$D/data" --batch 4 --seq 64 --lr 3e-3
      --warmup 2 --progress none --threads 2 --precision fp32)

# ---- a run: checkpoints, distill.json, the KD loss falls ----
"${DIST[@]}" --student-config "$D/student.json" --out "$D/run" --steps 30 --eval-every 15 \
  --alpha 0 --temperature 2 >"$D/run.out" 2>&1
rc=$?
DETAIL="status $rc: $(tail -3 "$D/run.out" | tr '\n' ' ')"
check distill_runs test "$rc" = 0 -a -f "$D/run/step_00000030/model.safetensors"
check distill_json_written grep -q '"kd_loss": "forward"' "$D/run/distill.json"
check distill_reports_teacher grep -q '^teacher: .*L=2 C=64 V=257, fp32 weights' "$D/run.out"
read -r l0 l1 v0 v1 < <("$PY" - "$D/run/metrics.jsonl" <<'EOF'
import json, sys
m = [json.loads(l) for l in open(sys.argv[1])]
t = [x["loss"] for x in m if "loss" in x]
v = [x["val_loss"] for x in m if "val_loss" in x]
print(sum(t[:3]) / 3, sum(t[-3:]) / 3, v[0], v[-1])
EOF
)
DETAIL="KD loss $l0 -> $l1, val_loss $v0 -> $v1"
check distill_loss_falls "$PY" -c "import sys; sys.exit(not (float('$l1') < 0.7 * float('$l0') and float('$v1') < float('$v0')))"

# ---- alpha 1: the data's cross-entropy, kiln train's trajectory ----
"${DIST[@]}" --student-config "$D/student.json" --out "$D/a1" --steps 10 --eval-every 5 --alpha 1 \
  --seed 5 >"$D/a1.out" 2>&1
"$KILN" train --config "$D/student.json" --data "$D/data" --out "$D/t1" --steps 10 --eval-every 5 \
  --batch 4 --seq 64 --lr 3e-3 --warmup 2 --progress none --threads 2 --precision fp32 --seed 5 \
  >"$D/t1.out" 2>&1
read -r diff < <("$PY" - "$D/a1/metrics.jsonl" "$D/t1/metrics.jsonl" <<'EOF'
import json, sys
def val(p):
    return [x["val_loss"] for x in map(json.loads, open(p)) if "val_loss" in x]
a, b = val(sys.argv[1]), val(sys.argv[2])
print(max(abs(x - y) for x, y in zip(a, b)) if len(a) == len(b) == 3 else "nan")
EOF
)
DETAIL="largest val_loss difference $diff"
check distill_alpha1_is_train "$PY" -c "import sys; sys.exit(not (float('$diff') <= 1e-4))"

# ---- exact resume: 12 straight == 5, stop, resume to 12 ----
R=(--student-config "$D/student.json" --steps 12 --save-every 0 --eval-every 6 --kd-loss jsd --beta 0.3
   --temperature 1.5 --alpha 0.2)
"${DIST[@]}" "${R[@]}" --out "$D/ra" >"$D/ra.out" 2>&1
"${DIST[@]}" "${R[@]}" --out "$D/rb" --stop-at 5 >"$D/rb.out" 2>&1
check distill_stop_at_saves grep -q 'resume with: kiln distill --resume' "$D/rb.out"
(cd / && "$KILN" distill --resume "$D/rb" --progress none --threads 2 >"$D/rb2.out" 2>&1)
DETAIL="$(tail -3 "$D/rb2.out" | tr '\n' ' ')"
check distill_resume_bit_exact cmp -s "$D/ra/step_00000012/model.safetensors" "$D/rb/step_00000012/model.safetensors"
check distill_resume_same_metrics cmp -s <(cut -d, -f1-3 "$D/ra/metrics.jsonl") <(cut -d, -f1-3 "$D/rb/metrics.jsonl")
"${DIST[@]}" "${R[@]}" --out "$D/rc" --stop-at 5 >/dev/null 2>&1
(cd / && "$KILN" train --resume "$D/rc" --progress none --threads 2 >"$D/rc2.out" 2>&1)
DETAIL="$(tail -3 "$D/rc2.out" | tr '\n' ' ')"
check train_resume_of_distill_run eval "grep -q 'is a kiln distill run' $D/rc2.out && cmp -s $D/ra/step_00000012/model.safetensors $D/rc/step_00000012/model.safetensors"

# ---- a quantized .gguf teacher, JSONL data, reverse KL; a student directory ----
"$KILN" quantize --model "$D/teacher" --type q8_0 --tokenizer bytes --out "$D/teacher.gguf" --quiet \
  >"$D/q.out" 2>&1
"$KILN" init --config "$D/student.json" --out "$D/student0" --seed 3 >/dev/null 2>&1
"$KILN" distill --teacher "$D/teacher.gguf" --student "$D/student0" --data "$D/text.jsonl" \
  --out "$D/g" --kd-loss reverse --steps 4 --batch 2 --seq 32 --eval-every 2 --eval-steps 2 \
  --progress none --threads 2 >"$D/g.out" 2>&1
rc=$?
DETAIL="status $rc: $(tail -3 "$D/g.out" | tr '\n' ' ')"
check distill_gguf_teacher_jsonl test "$rc" = 0 -a -f "$D/g/step_00000004/model.safetensors" -a -f "$D/g/data/meta.json"
check distill_gguf_teacher_reported grep -q "its GGUF's weights" "$D/g.out"
check distill_jsonl_tokenized grep -q 'text.jsonl tokenized with .*teacher.gguf' "$D/g.out"
"$KILN" distill --teacher "$D/teacher" --teacher-dtype q4_0 --student-config "$D/student.json" \
  --data "$D/data" --out "$D/q4" --steps 2 --batch 2 --seq 32 --eval-every 0 --progress none \
  --threads 2 >"$D/q4.out" 2>&1
DETAIL="$(tail -3 "$D/q4.out" | tr '\n' ' ')"
check distill_quantized_teacher grep -q '^teacher: .*q4_0 weights' "$D/q4.out"

# ---- mpirun: 2 ranks of batch 2 give 1 rank of batch 4's losses ----
if command -v mpirun >/dev/null 2>&1 && ldd "$KILN" 2>/dev/null | grep -q libmpi; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
  [ -n "${KILN_SANITIZE:-}" ] && export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0"
  M=(--student-config "$D/student.json" --steps 6 --eval-every 0 --kd-loss forward --temperature 2
     --alpha 0.3)
  timeout 120 mpirun --oversubscribe -np 2 "${DIST[@]}" "${M[@]}" --batch 2 \
    --threads 1 --out "$D/np2" >"$D/np2.out" 2>&1
  "${DIST[@]}" "${M[@]}" --out "$D/np1" >"$D/np1.out" 2>&1
  read -r worst < <("$PY" - "$D/np1/metrics.jsonl" "$D/np2/metrics.jsonl" <<'EOF'
import json, sys
def run(p):
    return [(x["loss"], x["world_size"]) for x in map(json.loads, open(p)) if "loss" in x]
a, b = run(sys.argv[1]), run(sys.argv[2])
ok = len(a) == len(b) == 6 and all(w == 1 for _, w in a) and all(w == 2 for _, w in b)
print(max(abs(x[0] - y[0]) / abs(x[0]) for x, y in zip(a, b)) if ok else "nan")
EOF
)
  DETAIL="largest relative loss difference $worst; $(tail -2 "$D/np2.out" | tr '\n' ' ')"
  check distill_mpirun_matches_one_rank "$PY" -c "import sys; sys.exit(not (float('$worst') <= 1e-5))"
  # JSONL data: rank 0 tokenizes it, the other ranks wait for it
  timeout 120 mpirun --oversubscribe -np 2 "$KILN" distill --teacher "$D/teacher" \
    --student-config "$D/student.json" --data "$D/text.jsonl" --out "$D/np2j" --steps 2 --batch 2 \
    --seq 32 --eval-every 0 --progress none --threads 1 >"$D/np2j.out" 2>&1
  rc=$?
  DETAIL="status $rc: $(tail -3 "$D/np2j.out" | tr '\n' ' ')"
  check distill_mpirun_jsonl test "$rc" = 0 -a -f "$D/np2j/step_00000002/model.safetensors"
else
  echo "SKIP distill_mpirun: mpirun or an MPI build of kiln is absent"
fi

# ---- refused: another tokenizer of the same size (two byte tokens swapped) ----
"$KILN" init --config "$D/student.json" --out "$D/student_tok" --seed 3 >/dev/null 2>&1
"$PY" - "$D/teacher/step_00000040/tokenizer.json" "$D/student_tok/tokenizer.json" <<'EOF'
import json, sys
t = json.load(open(sys.argv[1]))
v = t["model"]["vocab"]
v["a"], v["b"] = v["b"], v["a"]
json.dump(t, open(sys.argv[2], "w"))
EOF
out=$("$KILN" distill --teacher "$D/teacher" --student "$D/student_tok" --data "$D/data" --out "$D/tokbad" \
  --steps 2 --seq 64 --progress none --threads 2 2>&1 >/dev/null)
rc=$?
DETAIL="status $rc: $out"
check distill_tokenizer_mismatch eval '[ "$rc" -eq 2 ] && grep -q "differ at token id 97" <<<"$out"'
# token shards written with the swapped tokenizer
cp -r "$D/data" "$D/data_tok"
cp "$D/student_tok/tokenizer.json" "$D/data_tok/tokenizer.json"
out=$("$KILN" distill --teacher "$D/teacher" --student-config "$D/student.json" --data "$D/data_tok" \
  --out "$D/tokbad2" --steps 2 --seq 64 --progress none --threads 2 2>&1 >/dev/null)
rc=$?
DETAIL="status $rc: $out"
check distill_data_tokenizer_mismatch eval '[ "$rc" -eq 2 ] && grep -q "data.s (--data) .* differ at token id 97" <<<"$out" && [ ! -e "$D/tokbad2" ]'
cp "$D/teacher/step_00000040/tokenizer.json" "$D/student_tok/tokenizer.json"
"$KILN" distill --teacher "$D/teacher" --student "$D/student_tok" --data "$D/data" --out "$D/tokok" \
  --steps 2 --seq 64 --eval-every 0 --progress none --threads 2 >"$D/tokok.out" 2>&1
DETAIL="$(tail -2 "$D/tokok.out")"
check distill_same_tokenizer_accepted test -f "$D/tokok/step_00000002/model.safetensors"

# ---- refused: another vocabulary, bad flags ----
refused() { # NAME TEXT ARGS...: exits non-zero (not a crash) with TEXT on stderr
  local n=$1 want=$2 out rc
  shift 2
  out=$("$KILN" distill "$@" 2>&1 >/dev/null)
  rc=$?
  DETAIL="status $rc: $out"
  check "$n" eval '[ "$rc" -ne 0 ] && [ "$rc" -lt 124 ] && grep -qF -- "$want" <<<"$out"'
}
B=(--teacher "$D/teacher" --data "$D/data" --out "$D/bad" --steps 2 --seq 64 --progress none --threads 2)
refused distill_vocab_mismatch "vocabulary has 257 tokens and the student's 300" \
  "${B[@]}" --student-config "$D/other_vocab.json"
check distill_refused_writes_nothing test ! -e "$D/bad"
refused distill_bad_kd_loss "--kd-loss 'kl' is not one of forward, reverse, jsd" \
  "${B[@]}" --student-config "$D/student.json" --kd-loss kl
refused distill_bad_temperature "--temperature 0 must be in (0, 1000]" \
  "${B[@]}" --student-config "$D/student.json" --temperature 0
refused distill_bad_alpha "--alpha 1.5 must be in [0, 1]" \
  "${B[@]}" --student-config "$D/student.json" --alpha 1.5
refused distill_bad_teacher_dtype "--teacher-dtype 'q3' is not one of" \
  "${B[@]}" --student-config "$D/student.json" --teacher-dtype q3
refused distill_needs_one_student "one of --student or --student-config" \
  "${B[@]}"
refused distill_missing_teacher "$D/nope" \
  --teacher "$D/nope" --data "$D/data" --out "$D/bad2" --student-config "$D/student.json"
refused distill_refuses_used_out "--resume $D/run" \
  "${B[@]/$D\/bad/$D/run}" --student-config "$D/student.json"
exit 0
