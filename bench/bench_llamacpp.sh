#!/usr/bin/env bash
# bench/bench_llamacpp.sh [LLAMA_BENCH] — kiln against llama.cpp's llama-bench
# on the same GGUF files, in the same run, on the same machine and threads.
#
# The model is the shape of issue 18's speed table: a randomly initialized
# Llama of 8 layers, width 512, 8 heads, MLP 1376, vocabulary 8192 (33.7M
# parameters, untied output), written by `kiln init` and `kiln quantize` as
# F16, Q8_0, Q4_0 and Q4_K_M. For each file, rounds alternate kiln
# (build/bench/bench_decode FILE: batch-1 decode and a 128-token prefill,
# the engine on the file's own tensor types; fp32 KV cache) and llama-bench
# (-p 128 -n 64; its KV cache is F16, since llama-bench takes no F32 cache
# type: at these context lengths the cache is a small share of the bytes
# a step reads, and llama.cpp's is the smaller); the best of the rounds is printed for each, with
# kiln/llama.cpp ratios and the share of the weight-bytes roofline (bytes
# one decode step streams x tok/s, over the read bandwidth bench_decode
# measures in the same run). RSS: kiln's after load, llama-bench's peak.
#
# llama-bench is not part of kiln: build it outside the repository
# (docs/performance.md says how). Without it this benchmark says so and
# exits 0. Env: THREADS [1], ROUNDS [3], KILN_BUILD [build], TYPES
# ["f16 q8_0 q4_0 q4_k_m"], KEEP=DIR keeps the model files there.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
build=${KILN_BUILD:-$root/build}
lb=${1:-${LLAMA_BENCH:-}}
threads=${THREADS:-1}
rounds=${ROUNDS:-3}
types=${TYPES:-"f16 q8_0 q4_0 q4_k_m"}
if [ -z "$lb" ] || [ ! -x "$lb" ]; then
  echo "bench_llamacpp: skipped: no llama-bench (pass its path, or LLAMA_BENCH=...; docs/performance.md builds it)"
  exit 0
fi
for b in "$build/kiln" "$build/bench/bench_decode"; do
  [ -x "$b" ] || { echo "bench_llamacpp: skipped: $b is not built"; exit 0; }
done
dir=${KEEP:-$(mktemp -d)}
mkdir -p "$dir"
[ -n "${KEEP:-}" ] || trap 'rm -rf "$dir"' EXIT
cat > "$dir/config.json" <<'EOF'
{
  "model_type": "llama",
  "vocab_size": 8192,
  "num_hidden_layers": 8,
  "hidden_size": 512,
  "num_attention_heads": 8,
  "num_key_value_heads": 8,
  "intermediate_size": 1376,
  "max_position_embeddings": 512,
  "rms_norm_eps": 1e-05,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false,
  "bos_token_id": 1,
  "eos_token_id": 2
}
EOF
"$build/kiln" init --config "$dir/config.json" --out "$dir/model" --force >/dev/null || exit 1
for t in $types; do
  [ -s "$dir/m-$t.gguf" ] ||
    "$build/kiln" quantize --model "$dir/model" --type "$t" --out "$dir/m-$t.gguf" \
      --tokenizer bytes --quiet || exit 1
done
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $threads thread(s); llama-bench: $lb"
res="$dir/results.txt"
: > "$res"
for r in $(seq 1 "$rounds"); do
  for t in $types; do
    f="$dir/m-$t.gguf"
    k=$(OMP_WAIT_POLICY=passive OMP_NUM_THREADS=$threads "$build/bench/bench_decode" "$f" "$threads" 64 2>/dev/null | grep '^gguf')
    echo "kiln $t $k" >> "$res"
    l=$( { /usr/bin/time -f 'peak_rss_kb %M exit %x' "$lb" -m "$f" -t "$threads" -p 128 -n 64 -r 3 -o csv; } 2>&1 )
    echo "$l" | awk -v t="$t" '/^peak_rss_kb/ {print "llrss", t, $2; if ($4 != 0) print "llfail", t, $4}' >> "$res"
    echo "$l" | grep -q 'Command terminated by signal' && echo "llfail $t signal" >> "$res"
    echo "$l" | grep -v '^peak_rss_kb' | python3 -c '
import csv, sys
t = sys.argv[1]
rows = [r for r in csv.DictReader(l for l in sys.stdin if "," in l)]
for r in rows:
    kind = "pp" if int(r.get("n_prompt", 0) or 0) > 0 else "tg"
    print("llama", t, kind, r["avg_ts"])
' "$t" >> "$res"
  done
done
python3 - "$res" "$types" <<'EOF'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
types = sys.argv[2].split()
best = {}
def put(key, v):
    best[key] = max(best.get(key, 0.0), v)
for l in lines:
    p = l.split()
    if p[0] == "kiln":
        m = re.search(r"decode ([\d.]+) tok/s.*prefill \d+ ([\d.]+) tok/s.*weights ([\d.]+) MB.*"
                      r"\(([\d.]+) GB/s\).*rss ([\d.]+) MB", l)
        if not m: continue
        put((p[1], "kd"), float(m.group(1))); put((p[1], "kp"), float(m.group(2)))
        md = re.search(r"decode [\d.]+ tok/s \(median ([\d.]+)\).*prefill \d+ [\d.]+ tok/s \(median ([\d.]+)\)", l)
        if md: put((p[1], "kdm"), float(md.group(1))); put((p[1], "kpm"), float(md.group(2)))
        best[(p[1], "mb")] = float(m.group(3)); put((p[1], "bw"), float(m.group(4)))
        best[(p[1], "krss")] = float(m.group(5))
    elif p[0] == "llama":
        put((p[1], "ld" if p[2] == "tg" else "lp"), float(p[3]))
    elif p[0] == "llrss":
        best[(p[1], "lrss")] = float(p[2]) / 1024
    elif p[0] == "llfail":
        best[(p[1], "lfail")] = p[2]
print(f"{'type':7} {'MB/token':>8} | {'decode kiln':>11} {'(median)':>8} {'llama.cpp':>9} {'ratio':>6} | "
      f"{'roofline':>8} {'kiln %':>6} {'llama %':>7} | {'prefill128 kiln':>15} {'(median)':>8} {'llama.cpp':>9} {'ratio':>6} | "
      f"{'RSS kiln':>8} {'llama':>6}")
for t in types:
    g = lambda k: best.get((t, k), 0.0)
    mb, bw = g("mb"), g("bw")
    roof = bw * 1e3 / mb if mb else 0
    kd, ld, kp, lp = g("kd"), g("ld"), g("kp"), g("lp")
    r = lambda a, b: f"{a / b:6.2f}" if b else "     -"
    pc = lambda a: f"{100 * a / roof:5.0f}%" if roof else "     -"
    print(f"{t:7} {mb:8.1f} | {kd:11.1f} {g('kdm'):8.1f} {ld:9.1f} {r(kd, ld)} | {roof:8.1f} {pc(kd):>6} {pc(ld):>7} | "
          f"{kp:15.1f} {g('kpm'):8.1f} {lp:9.1f} {r(kp, lp)} | {g('krss'):7.0f}M {g('lrss'):5.0f}M"
          + (f"  llama-bench failed ({best[(t, 'lfail')]})" if (t, "lfail") in best else ""))
print("decode: tok/s at batch 1 (llama-bench tg64: the mean over 64 tokens); prefill: 128-token "
      "prompt (pp128); kiln: its best step (and the median step), best of the rounds; llama.cpp: "
      "llama-bench's mean of 3 repetitions, best of the rounds; ratio: kiln's best / llama.cpp's; roofline: tok/s if only the weight bytes cost, at the best read bandwidth "
      "measured by bench_decode in the same rounds")
EOF
