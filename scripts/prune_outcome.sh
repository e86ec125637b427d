#!/usr/bin/env bash
# scripts/prune_outcome.sh MODEL DATA OUT [STEPS] — the pruning outcome of
# docs/prune.md: MODEL (a kiln-trained model directory or run) pruned by
# magnitude and Wanda at 50%, 2:4 (Wanda and magnitude scores) and 25% of
# the MLP channels; each then fine-tuned STEPS steps (default 200) on
# DATA's training split (the sparse ones keep their zeros), and the dense
# model for the same steps as the control. Every perplexity is on the
# same held-out tokens: DATA's validation split after its first 8192
# tokens (those are the calibration tokens). Prints one table.
# Environment: THREADS (default 1).
set -euo pipefail
model=$1 data=$2 out=$3 steps=${4:-200}
root=$(cd "$(dirname "$0")/.." && pwd)
kiln=${KILN:-$root/build/kiln}
threads=${THREADS:-1}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
mkdir -p "$out"
calib=8192 held=40000 seq=128
# the held-out tokens as raw uint32 for kiln eval --tokens (the shard's
# header: bytes per token at offset 12, count at 24, tokens from 32)
python3 - "$data/val_0000.bin" "$out/held.u32" "$calib" "$held" <<'EOF'
import struct, sys
raw = open(sys.argv[1], "rb").read()
w = struct.unpack("<I", raw[12:16])[0]
n = struct.unpack("<Q", raw[24:32])[0]
t = struct.unpack("<%d%s" % (n, "H" if w == 2 else "I"), raw[32:32 + w * n])
c, h = int(sys.argv[3]), int(sys.argv[4])
t = t[c:c + h]
open(sys.argv[2], "wb").write(struct.pack("<%dI" % len(t), *t))
EOF
ppl() { "$kiln" eval --model "$1" --tokens "$out/held.u32" --seq $seq --batch 8 --threads "$threads" --json |
  sed -n 's/.*"perplexity": *\([0-9.]*\).*/\1/p'; }
tune() { # DIR RUN: STEPS steps from DIR, then the perplexity of the result
  rm -rf "$2"
  "$kiln" train --init-from "$1" --data "$data" --out "$2" --steps "$steps" --batch 16 --seq $seq \
    --lr 3e-4 --min-lr 3e-5 --warmup 20 --eval-every 0 --save-every 0 --keep-last 1 \
    --threads "$threads" --progress none --seed 7 >"$2.log" 2>&1
  ppl "$2"
}
dense=$(ppl "$model")
printf '%-26s %10s %10s %14s\n' "model" "nonzero" "ppl" "ppl+${steps} steps"
printf '%-26s %10s %10s %14s\n' "dense" "100%" "$dense" "$(tune "$model" "$out/dense_tuned")"
run() { # NAME prune-flags...
  local name=$1
  shift
  "$kiln" prune --model "$model" "$@" --calib "$data" --calib-tokens $calib --eval-tokens $held \
    --seq $seq --batch 8 --threads "$threads" --out "$out/$name" --force >"$out/$name.log" 2>&1
  local nz=$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print('%.1f%%' % (100.0 * r['nonzero_after'] / r['params_before']))" "$out/$name/prune_report.json")
  printf '%-26s %10s %10s %14s\n' "$name" "$nz" "$(ppl "$out/$name")" "$(tune "$out/$name" "$out/${name}_tuned")"
}
run magnitude50 --method magnitude --sparsity 0.5
run wanda50 --method wanda --sparsity 0.5
run 2of4_wanda --method 2:4 --score wanda
run 2of4_magnitude --method 2:4 --score magnitude
run mlp25 --method mlp --sparsity 0.25
