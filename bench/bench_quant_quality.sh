#!/usr/bin/env bash
# bench/bench_quant_quality.sh [BUILD_DIR] — the quantization quality table
# of docs/quantize.md, from scratch: trains a 4.2M-parameter Llama on the
# fortune files (a BPE tokenizer of 2048 tokens learnt on them, 5% of the
# documents held out), writes it as GGUF in every type, and measures the
# perplexity of each file on the held-out tokens, two ways:
#   weights   `kiln eval --model m-TYPE.gguf`: the file dequantized to fp32
#             and run by the training forward: the rounding of the weights
#             alone, what `kiln quantize --calib` reports and what the
#             engine's prefill computes (it widens quantized rows to fp32
#             for the GEMM);
#   decode    `kiln eval --model m-TYPE.gguf --engine --chunk 1`: every
#             token a decode step of the inference engine of generate,
#             chat and serve, the matrices in their stored types dotted
#             with activations rounded to 8-bit blocks (as llama.cpp
#             does): the perplexity of generated text.
# Prints a markdown table (also written to DIR/table.md) and one line per
# type with its change against F32. A benchmark: it never fails a build.
#
# Environment: QQ_DIR (work directory, default BUILD_DIR/quant-quality),
# QQ_STEPS (optimizer steps, default 1500), QQ_MAX_TIME (seconds of
# training at most, default 900), QQ_THREADS (default 0: every core),
# QQ_REUSE=1 (keep a finished run in QQ_DIR and only quantize and
# evaluate again). 16-20 minutes on 2 busy cores, two thirds of it training.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-${KILN_BUILD:-build}}
case "$build" in /*) ;; *) build="$root/$build" ;; esac
kiln=${KILN:-$build/kiln}
dir=${QQ_DIR:-$build/quant-quality}
steps=${QQ_STEPS:-1500}
max_time=${QQ_MAX_TIME:-900}
threads=${QQ_THREADS:-0}
corpus=/usr/share/games/fortunes
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}

[ -x "$kiln" ] || { echo "bench_quant_quality: $kiln is missing; run make first" >&2; exit 1; }
mapfile -t files < <(find "$corpus" -maxdepth 1 -type f ! -name '*.dat' 2>/dev/null | sort)
if [ ${#files[@]} -eq 0 ]; then
  echo "bench_quant_quality: no fortunes corpus in $corpus (apt-get install fortunes-min fortunes); skipped"
  exit 0
fi
mkdir -p "$dir"
cd "$dir"

if [ "${QQ_REUSE:-0}" != 1 ] || [ ! -f run/latest ]; then
  rm -rf data run tok.json
  "$kiln" tokenizer train --input "${files[@]}" --vocab-size 2048 --out tok.json --quiet
  "$kiln" tokenize --tokenizer tok.json --input "${files[@]}" --out data --val-fraction 0.05 \
    --doc-separator % --quiet
  eot=$(sed -n 's/.*"eot": *\([0-9]*\).*/\1/p' data/meta.json)
  # width 256 and MLP 768: every matrix row is a whole number of the
  # K-quants' 256-weight blocks, so q4_k_m and q6_k are what they say
  cat >llama.json <<EOF
{"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
 "num_key_value_heads": 2, "intermediate_size": 768, "vocab_size": 2048,
 "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
 "tie_word_embeddings": false, "bos_token_id": $eot, "eos_token_id": $eot}
EOF
  "$kiln" train --config llama.json --data data --out run --seed 1 --steps "$steps" \
    --batch 16 --seq 128 --lr 2e-3 --min-lr 2e-4 --warmup 50 --eval-every 250 --eval-steps 20 \
    --save-every 0 --max-time "$max_time" --threads "$threads" --progress lines --log-every 50 >train.log 2>&1 ||
    { tail -5 train.log >&2; echo "bench_quant_quality: training failed (train.log)" >&2; exit 1; }
fi
ckpt="run/$(cat run/latest)"
val=$(sed -n 's/.*"val_tokens": *\([0-9]*\).*/\1/p' data/meta.json)

# perplexity of one model (a file or a directory) on the whole val split,
# in windows of the length it was trained on
ppl() { "$kiln" eval --model "$1" --data data --seq 128 --threads "$threads" --json "${@:2}" |
        sed -n 's/.*"perplexity": *\([0-9.]*\).*/\1/p'; }

types="f32 bf16 q8_0 q6_k q4_k_m q4_0"
declare -A pw ps bytes bpw
for t in $types; do
  "$kiln" quantize --model "$ckpt" --type "$t" --out "m-$t.gguf" >"quantize-$t.log" 2>&1 ||
    { tail -3 "quantize-$t.log" >&2; echo "bench_quant_quality: quantize $t failed" >&2; exit 1; }
  bytes[$t]=$(stat -c %s "m-$t.gguf")
  bpw[$t]=$(sed -n 's/.* \([0-9.]*\) bits per weight.*/\1/p' "quantize-$t.log" | head -1)
  pw[$t]=$(ppl "m-$t.gguf")
  ps[$t]=$(ppl "m-$t.gguf" --engine --chunk 1)
done
pdir=$(ppl "$ckpt")

{
  echo "| type | file bytes | bits/weight | perplexity (weights) | vs F32 | perplexity (decode) | vs F32 |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for t in $types; do
    awk -v t="$t" -v b="${bytes[$t]}" -v q="${bpw[$t]}" -v w="${pw[$t]}" -v s="${ps[$t]}" \
        -v w0="${pw[f32]}" -v s0="${ps[f32]}" '
      function commas(n,   s, o) { s = n ""; o = ""
        while (length(s) > 3) { o = "," substr(s, length(s) - 2) o; s = substr(s, 1, length(s) - 3) }
        return s o }
      BEGIN {
        rw = t == "f32" ? "" : sprintf("%+.2f%%", 100 * (w / w0 - 1))
        rs = t == "f32" ? "" : sprintf("%+.2f%%", 100 * (s / s0 - 1))
        printf "| %s | %s | %s | %.3f | %s | %.3f | %s |\n", toupper(t), commas(b), q, w, rw, s, rs }'
  done
} >table.md
echo "quantization quality: $(grep -o 'step [0-9]*' train.log | tail -1 || true), $val held-out tokens, model directory perplexity $pdir"
cat table.md
for t in $types; do
  [ "$t" = f32 ] && continue
  awk -v t="$t" -v s="${ps[$t]}" -v s0="${ps[f32]}" -v w="${pw[$t]}" -v w0="${pw[f32]}" \
    'BEGIN { printf "ppl_%s: decode %.4f (%+.3f%% vs F32), weights only %.4f (%+.3f%%)\n", t, s, 100 * (s / s0 - 1), w, 100 * (w / w0 - 1) }'
done
