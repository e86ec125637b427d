#!/usr/bin/env bash
# bench_dist.sh — data-parallel training on this machine: the benchmark
# model (configs/bench-gpt2-30m.json, 29.5M parameters, 118 MB of fp32
# gradients = 5 buckets of 25 MB) trained for a few steps at 1 rank and at 2
# ranks (same per-rank batch), the 2-rank run with the backward/allreduce
# overlap on and off (KILN_DIST_OVERLAP). Prints per-step time, tokens/s and
# the share of the step rank 0 spent waiting on communication (metrics.jsonl
# comm_s / step time), the first step excluded (warm-up).
# Knobs: BENCH_STEPS (default 3), BENCH_BATCH (2), BENCH_SEQ (128),
# BENCH_PRECISION (fp32; bf16 | fp16 | auto).
set -u
root=${KILN_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
KILN=${KILN:-$root/build/kiln}
if ! command -v mpirun >/dev/null 2>&1 || ! ldd "$KILN" 2>/dev/null | grep -q libmpi; then
  echo "bench_dist.sh: needs mpirun and an MPI build of kiln; nothing measured"; exit 0
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
steps=${BENCH_STEPS:-3} B=${BENCH_BATCH:-2} T=${BENCH_SEQ:-128} P=${BENCH_PRECISION:-fp32}
W=$(mktemp -d /tmp/kiln-bench-dist.XXXXXX)
trap 'rm -rf "$W"' EXIT
if [ -d /usr/share/games/fortunes ]; then src=(/usr/share/games/fortunes)
else src=("$root/docs" "$root/src"); fi
"$KILN" tokenize --tokenizer bytes --input "${src[@]}" --out "$W/data" --quiet >/dev/null 2>&1 \
  || { echo "bench_dist.sh: kiln tokenize failed"; exit 0; }
args=(--data "$W/data" --config "$root/configs/bench-gpt2-30m.json" --batch "$B" --seq "$T"
      --steps "$steps" --precision "$P" --warmup 1 --eval-every 0 --save-every 0 --threads 1 --progress none)

# summary RUN TOKENS_PER_STEP -> "step_s comm_s tokens_per_s comm_frac",
# averaged over steps 2..N
summary() {
  grep '"loss"' "$1/metrics.jsonl" | tail -n +2 | awk -v tok="$2" '{
    match($0, /"tokens_per_s":[-0-9.e+]*/); tps = substr($0, RSTART + 15, RLENGTH - 15)
    match($0, /"comm_s":[-0-9.e+]*/); c = substr($0, RSTART + 9, RLENGTH - 9)
    match($0, /"comm_frac":[-0-9.e+]*/); f = substr($0, RSTART + 12, RLENGTH - 12)
    n++; st += tok / tps; cs += c; ts += tps; fs += f }
    END { if (n) printf "%.3f %.3f %.1f %.4f\n", st / n, cs / n, ts / n, fs / n }'
}

echo "model configs/bench-gpt2-30m.json, B=$B T=$T per rank, $steps steps, 1 thread per rank, --precision $P"
"$KILN" train "${args[@]}" --out "$W/r1" >"$W/r1.log" 2>&1 || { echo "1-rank run failed"; tail -3 "$W/r1.log"; exit 0; }
read -r s1 c1 t1 f1 <<<"$(summary "$W/r1" $((B * T)))"
printf "%-34s step %7.3f s  %8.1f tok/s\n" "1 rank" "$s1" "$t1"
for ov in 1 0; do
  KILN_DIST_OVERLAP=$ov mpirun --oversubscribe -x KILN_DIST_OVERLAP -np 2 "$KILN" train "${args[@]}" \
    --out "$W/r2_$ov" >"$W/r2_$ov.log" 2>&1 || { echo "2-rank run failed"; tail -3 "$W/r2_$ov.log"; continue; }
  read -r s c t f <<<"$(summary "$W/r2_$ov" $((2 * B * T)))"
  printf "%-34s step %7.3f s  %8.1f tok/s  comm %6.3f s = %5.1f%% of the step  scaling %.2fx (ratio to 1 rank)\n" \
    "2 ranks, overlap $([ $ov = 1 ] && echo on || echo off)" "$s" "$t" "$c" "$(awk -v f="$f" 'BEGIN{print 100*f}')" \
    "$(awk -v a="$t" -v b="$t1" 'BEGIN{print a/b}')"
done
