#!/usr/bin/env bash
# scripts/demo.sh [BUILD_DIR] — what `make demo` runs after installing the
# Debian packages and building: tokenizes the fortunes corpus with the byte
# tokenizer, trains a small GPT-2-style model for a few minutes with the
# progress bar, evaluates the validation loss before and after, prints a
# generated sample, and says where the checkpoint and the loss plot are.
#
# Environment: KILN_DEMO_DIR (output, default BUILD_DIR/demo),
# KILN_DEMO_STEPS (optimizer steps, default 1000), KILN_DEMO_MAX_TIME
# (seconds; the run stops, saves and is resumable when reached; default
# 240), KILN_DEMO_THREADS (default: one per core). OpenMP threads sleep
# at barriers (OMP_WAIT_POLICY=passive unless set): on a shared machine a
# spinning thread whose sibling was descheduled slows training several
# times over, for ~15% on an idle one.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-build}
case "$build" in /*) ;; *) build="$root/$build" ;; esac
kiln="$build/kiln"
demo=${KILN_DEMO_DIR:-$build/demo}
steps=${KILN_DEMO_STEPS:-1000}
max_time=${KILN_DEMO_MAX_TIME:-240}
threads=${KILN_DEMO_THREADS:-0}
corpus=/usr/share/games/fortunes
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}

[ -x "$kiln" ] || { echo "demo: $kiln is missing; run make first" >&2; exit 1; }
mapfile -t files < <(find "$corpus" -maxdepth 1 -type f ! -name '*.dat' 2>/dev/null | sort)
if [ ${#files[@]} -eq 0 ]; then
  echo "demo: no fortunes corpus in $corpus; install it with: apt-get install fortunes-min fortunes" >&2
  exit 1
fi
mkdir -p "$demo"
step() { printf '\n== %s\n' "$*"; }

step "1/6 tokenize ${#files[@]} fortune files from $corpus (byte tokenizer, 2% held out)"
rm -rf "$demo/data"
"$kiln" tokenize --tokenizer bytes --input "${files[@]}" --out "$demo/data" \
  --val-fraction 0.02 --doc-separator % --quiet
sed -n 's/.*"\(train_tokens\|val_tokens\)": *\([0-9]*\).*/   \1 \2/p' "$demo/data/meta.json"

step "2/6 a small GPT-2-style model (4 layers, 192 wide, 6 heads, context 256)"
cat > "$demo/config.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 4, "n_embd": 192, "n_head": 6,
 "n_positions": 256, "vocab_size": 257, "layer_norm_epsilon": 1e-5,
 "tie_word_embeddings": true, "bos_token_id": 256, "eos_token_id": 256}
EOF
rm -rf "$demo/init" "$demo/run"
"$kiln" init --config "$demo/config.json" --out "$demo/init" --seed 1337

# validation loss of a model directory: prints a line, sets $loss
val_loss() {
  local j
  j=$("$kiln" eval --model "$1" --data "$demo/data" --seq 128 --threads "$threads" --json)
  loss=$(sed -n 's/.*"loss": *\([0-9.]*\).*/\1/p' <<<"$j")
  local ppl=$(sed -n 's/.*"perplexity": *\([0-9.]*\).*/\1/p' <<<"$j")
  local toks=$(sed -n 's/.*"tokens": *\([0-9]*\).*/\1/p' <<<"$j")
  printf '   val loss %s nats/token (perplexity %s) over %s tokens\n' "$loss" "$ppl" "$toks"
}

step "3/6 validation loss before training"
val_loss "$demo/init"
before=$loss

step "4/6 train ($steps steps of 16 x 128 tokens, stops early after ${max_time}s)"
"$kiln" train --init-from "$demo/init" --data "$demo/data" --out "$demo/run" \
  --batch 16 --seq 128 --steps "$steps" --lr 2e-3 --min-lr 2e-4 --warmup 50 \
  --eval-every 200 --eval-steps 10 --save-every 500 --keep-last 2 \
  --max-time "$max_time" --threads "$threads"

step "5/6 validation loss after training"
val_loss "$demo/run"
echo "   before training: $before   after: $loss"

ckpt="$demo/run/$(cat "$demo/run/latest")"
step "6/6 a sample from the trained model"
if "$kiln" generate --help >/dev/null 2>&1; then
  "$kiln" generate --model "$ckpt" --prompt "The meaning of life is" \
    --max-tokens 200 --temperature 0.8 --top-k 40 --seed 7 --threads "$threads"
  echo
else
  echo "   (kiln generate is not in this build; sample with it once it is)"
fi

cat <<EOF

checkpoint : $ckpt
metrics    : $demo/run/metrics.jsonl
loss plot  : $demo/run/loss.svg   (open it in a browser)
continue   : $kiln train --resume $demo/run --steps $((steps * 2))
EOF
