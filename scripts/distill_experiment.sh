#!/usr/bin/env bash
# scripts/distill_experiment.sh [BUILD_DIR] — the experiment of
# docs/distill.md: a teacher (GPT-2 style, 4 layers x 192, 1.88M
# parameters) trained on Debian's fortunes corpus (byte tokenizer, 2% of
# the documents held out), then a student of half its depth and half its
# width (2 x 96, 0.27M parameters) trained twice for the same 1500 steps of
# 16 x 128 tokens, same seed and learning-rate schedule: on the data alone
# (kiln train) and distilled from the teacher (kiln distill, several
# losses, and from the teacher quantized to a Q4_0 .gguf). Prints every
# model's held-out loss and perplexity (kiln eval on the held-out split).
#
# Environment: KILN_DISTILL_DIR (output, default /work/cache/distill-models
# when it exists, else BUILD_DIR/distill), KILN_DISTILL_THREADS (per run,
# default 1), KILN_DISTILL_STEPS (default 1500). Each run takes a few
# minutes on one core; the students run two at a time.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-build}
case "$build" in /*) ;; *) build="$root/$build" ;; esac
kiln="$build/kiln"
def=/work/cache/distill-models
[ -d "$def" ] || def="$build/distill"
out=${KILN_DISTILL_DIR:-$def}
threads=${KILN_DISTILL_THREADS:-1}
steps=${KILN_DISTILL_STEPS:-1500}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
corpus=/usr/share/games/fortunes
[ -x "$kiln" ] || { echo "distill_experiment: $kiln is missing; run make first" >&2; exit 1; }
mapfile -t files < <(find "$corpus" -maxdepth 1 -type f ! -name '*.dat' 2>/dev/null | sort)
if [ ${#files[@]} -eq 0 ]; then
  echo "distill_experiment: no fortunes corpus in $corpus (apt-get install fortunes-min fortunes)" >&2
  exit 1
fi
mkdir -p "$out"
cd "$out"
[ -f data/meta.json ] ||
  "$kiln" tokenize --tokenizer bytes --input "${files[@]}" --out data --val-fraction 0.02 \
    --doc-separator % --quiet
cat > teacher-config.json <<'EOF'
{"model_type": "gpt2", "n_layer": 4, "n_embd": 192, "n_head": 6,
 "n_positions": 256, "vocab_size": 257, "layer_norm_epsilon": 1e-5,
 "tie_word_embeddings": true, "bos_token_id": 256, "eos_token_id": 256}
EOF
cat > student-config.json <<'EOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 96, "n_head": 3,
 "n_positions": 256, "vocab_size": 257, "layer_norm_epsilon": 1e-5,
 "tie_word_embeddings": true, "bos_token_id": 256, "eos_token_id": 256}
EOF
common=(--data data --batch 16 --seq 128 --steps "$steps" --lr 2e-3 --min-lr 2e-4 --warmup 50
        --eval-every 250 --eval-steps 10 --save-every 500 --keep-last 1 --threads "$threads"
        --seed 1337 --progress lines --log-every 100)
[ -f teacher-run/latest ] ||
  "$kiln" train --config teacher-config.json --out teacher-run "${common[@]}" > teacher-train.log 2>&1

run() { # NAME ARGS...: a student run into NAME, its log NAME.log; skipped when done
  local name=$1
  shift
  [ -f "$name/latest" ] || "$kiln" "$@" --out "$name" "${common[@]}" > "$name.log" 2>&1
}
run student-baseline train --config student-config.json &
run student-distill-fwd distill --teacher teacher-run --student-config student-config.json \
  --kd-loss forward --temperature 1 --alpha 0 &
wait
run student-distill-t2a05 distill --teacher teacher-run --student-config student-config.json \
  --kd-loss forward --temperature 2 --alpha 0.5 &
run student-distill-jsd distill --teacher teacher-run --student-config student-config.json \
  --kd-loss jsd --beta 0.5 --temperature 1 --alpha 0 &
wait
[ -f teacher-q4_0.gguf ] ||
  "$kiln" quantize --model teacher-run --type q4_0 --out teacher-q4_0.gguf --quiet
run student-distill-rev distill --teacher teacher-run --student-config student-config.json \
  --kd-loss reverse --temperature 1 --alpha 0 &
run student-distill-fwd-q4t distill --teacher teacher-q4_0.gguf --student-config student-config.json \
  --kd-loss forward --temperature 1 --alpha 0 &
wait

printf '%-24s %10s %10s\n' model "val loss" perplexity
for m in teacher-run teacher-q4_0.gguf student-baseline student-distill-fwd \
         student-distill-t2a05 student-distill-jsd student-distill-rev student-distill-fwd-q4t; do
  j=$("$kiln" eval --model "$m" --data data --seq 128 --threads "$threads" --json)
  printf '%-24s %10s %10s\n' "$m" "$(sed -n 's/.*"loss": *\([0-9.]*\).*/\1/p' <<<"$j")" \
    "$(sed -n 's/.*"perplexity": *\([0-9.]*\).*/\1/p' <<<"$j")"
done
