#!/usr/bin/env bash
# scripts/spec_pair.sh [OUT] [BUILD] — trains the target/draft pair of the
# speculative-decoding figures in docs/performance.md on the fortunes
# corpus with the byte tokenizer (the data `make demo` tokenizes into
# BUILD/demo/data; this script tokenizes it there when missing), then
# runs bench_spec on it. Target: GPT-2 6 layers x 384 (10.7 M weights);
# draft: 2 x 192 (0.93 M). Both train at once on one thread each; the
# times are KILN_SPEC_TARGET_TIME [480] and KILN_SPEC_DRAFT_TIME [300]
# seconds (the figures' target was resumed twice more, 420 s and 900 s:
# `kiln train --resume OUT/target-run --max-time S --threads 1`).
# ARCH=llama trains the Llama pair instead (intermediate 1024 / 512).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-/work/cache/spec-models}
build=${2:-$root/build}
kiln="$build/kiln"
data="$build/demo/data"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
[ -x "$kiln" ] || { echo "spec_pair: $kiln is missing; run make first" >&2; exit 1; }
if [ ! -f "$data/meta.json" ]; then
  mapfile -t files < <(find /usr/share/games/fortunes -maxdepth 1 -type f ! -name '*.dat' | sort)
  [ ${#files[@]} -gt 0 ] || { echo "spec_pair: no fortunes corpus; apt-get install fortunes-min fortunes" >&2; exit 1; }
  "$kiln" tokenize --tokenizer bytes --input "${files[@]}" --out "$data" --val-fraction 0.02 \
    --doc-separator % --quiet
fi
mkdir -p "$out"
cd "$out"
if [ "${ARCH:-gpt2}" = llama ]; then
  p=llama-
  cfg() { printf '{"model_type": "llama", "num_hidden_layers": %d, "hidden_size": %d, "num_attention_heads": %d, "num_key_value_heads": %d, "intermediate_size": %d, "max_position_embeddings": 256, "vocab_size": 257, "rms_norm_eps": 1e-5, "tie_word_embeddings": true, "bos_token_id": 256, "eos_token_id": 256}\n' "$1" "$2" "$3" "$3" "$4"; }
  cfg 6 384 6 1024 > ${p}target-config.json
  cfg 2 192 3 512 > ${p}draft-config.json
else
  p=
  cfg() { printf '{"model_type": "gpt2", "n_layer": %d, "n_embd": %d, "n_head": %d, "n_positions": 256, "vocab_size": 257, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": true, "bos_token_id": 256, "eos_token_id": 256}\n' "$1" "$2" "$3"; }
  cfg 6 384 6 > ${p}target-config.json
  cfg 2 192 3 > ${p}draft-config.json
fi
rm -rf ${p}target-init ${p}draft-init ${p}target-run ${p}draft-run
"$kiln" init --config ${p}target-config.json --out ${p}target-init --seed 1
"$kiln" init --config ${p}draft-config.json --out ${p}draft-init --seed 2
common=(--data "$data" --batch 16 --seq 128 --steps 3000 --warmup 50 --eval-every 200
        --eval-steps 10 --save-every 100 --keep-last 1 --threads 1)
"$kiln" train --init-from ${p}target-init --out ${p}target-run --lr 1e-3 --min-lr 1e-4 \
  --max-time "${KILN_SPEC_TARGET_TIME:-480}" "${common[@]}" > ${p}target-train.log 2>&1 &
"$kiln" train --init-from ${p}draft-init --out ${p}draft-run --lr 2e-3 --min-lr 2e-4 \
  --max-time "${KILN_SPEC_DRAFT_TIME:-300}" "${common[@]}" > ${p}draft-train.log 2>&1 &
wait
[ -x "$build/bench/bench_spec" ] || make -C "$root" -j2 "$build/bench/bench_spec"
for k in 2 3 4; do "$build/bench/bench_spec" ${p}target-run ${p}draft-run $k 128 1 3; done
