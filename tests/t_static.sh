#!/usr/bin/env bash
# t_static.sh — the edge build (`make static`, docs/quantize.md): one
# statically linked binary, build-static/kiln-run, with no shared library
# at all (no program interpreter, no NEEDED entry; ldd: not a dynamic
# executable) and without oneDNN, runs generate, chat, eval and serve on a
# .gguf and gives the same greedy tokens, replies and perplexity as the
# ordinary kiln on the same files. The build is make's: up to date it
# costs nothing (CI builds it once before the tests), from nothing about
# half a minute on two cores.
set -u
D="$KILN_TMP/t_static"
rm -rf "$D"; mkdir -p "$D"
source "$(dirname "$0")/lib_serve.sh"
PY=/usr/bin/python3
ROOT=${KILN_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
S="$ROOT/build-static/kiln-run"

env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -C "$ROOT" --no-print-directory -j2 static >"$D/make.log" 2>&1; rc=$?
DETAIL="exit $rc: $(tail -20 "$D/make.log")"; check static_build [ $rc -eq 0 ] && [ -x "$S" ]
[ -x "$S" ] || exit 1

# ---- the kernels it runs without oneDNN: the blocked OpenMP GEMM (and
# the rest of the fast table) against the reference, in this build's
# objects ----
env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -C "$ROOT" --no-print-directory BUILD=build-static NO_DNNL=1 NO_MPI=1 \
  build-static/tests/test_kernels >"$D/make_tk.log" 2>&1; rc=$?
out=$([ $rc -eq 0 ] && "$ROOT/build-static/tests/test_kernels" 2>&1); rc2=$?
DETAIL="make exit $rc, test_kernels exit $rc2: $(tail -5 "$D/make_tk.log") $(grep FAIL <<<"$out" | head -5)"
check static_kernels_without_onednn [ $rc -eq 0 ] && [ $rc2 -eq 0 ] && grep -q '^PASS test_gemm' <<<"$out" && ! grep -q '^FAIL' <<<"$out"

# ---- no shared libraries ----
DETAIL="$(readelf -lW "$S" 2>&1 | grep -i interp)"
check static_no_interpreter [ -z "$(readelf -lW "$S" 2>&1 | grep -i 'program interpreter')" ]
DETAIL="$(readelf -dW "$S" 2>&1 | grep NEEDED)"
check static_no_needed_libraries [ -z "$(readelf -dW "$S" 2>&1 | grep NEEDED)" ]
out=$(ldd "$S" 2>&1)
DETAIL="ldd: $out"; check static_ldd_not_dynamic grep -q "not a dynamic executable" <<<"$out"
if command -v file >/dev/null; then
  out=$(file -L "$S" 2>&1)
  DETAIL="file: $out"; check static_file_statically_linked grep -q "statically linked" <<<"$out"
else
  echo "SKIP static_file_statically_linked: no file(1) (readelf and ldd above checked the same)"
fi
out=$(strings "$S" | grep -c 'dnnl_sgemm\|libdnnl')
DETAIL="$out oneDNN strings"; check static_without_onednn [ "$out" = 0 ]

# ---- what it runs, what it does not ----
help=$("$S" --help 2>&1)
DETAIL="$help"
check static_help_lists_inference bash -c 'for c in generate chat serve eval info; do grep -q "^  $c " <<<"$1" || exit 1; done' _ "$help"
out=$("$S" train --help 2>&1); rc=$?
DETAIL="exit $rc: $out"; check static_train_not_in_build [ $rc -eq 2 ] && grep -q "'train' is not available in this build" <<<"$out"

# ---- a small trained Llama, as GGUF ----
awk 'BEGIN { for (i = 0; i < 600; i++) printf "the cat sat on the mat %d times, and the dog ran %d laps\n", i, i % 7 }' >"$D/corpus.txt"
"$KILN" tokenize --tokenizer bytes --input "$D/corpus.txt" --out "$D/data" --quiet >/dev/null 2>&1 \
  || { fail static_setup "kiln tokenize failed"; exit 1; }
cat >"$D/cfg.json" <<'J'
{"model_type": "llama", "vocab_size": 257, "num_hidden_layers": 2, "hidden_size": 256,
 "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
 "max_position_embeddings": 128, "bos_token_id": 256, "eos_token_id": 256}
J
"$KILN" train --data "$D/data" --config "$D/cfg.json" --out "$D/run" --seq 32 --batch 4 --steps 30 \
  --eval-every 0 --warmup 3 --lr 3e-3 --threads 1 --progress none >"$D/train.log" 2>&1 \
  || { fail static_setup "kiln train failed: $(tail -3 "$D/train.log")"; exit 1; }
for t in f32 q8_0 q4_k_m; do
  "$KILN" quantize --model "$D/run" --type $t --out "$D/m_$t.gguf" --tokenizer bytes >"$D/q_$t.log" 2>&1 \
    || { fail static_setup "kiln quantize $t failed: $(tail -3 "$D/q_$t.log")"; exit 1; }
done

# ---- the same greedy tokens as the ordinary kiln, 1 and 2 threads ----
gen() { local k=$1; shift; "$k" generate --prompt "the cat" --max-tokens 40 --temperature 0 --print-ids "$@" 2>>"$D/gen.err"; }
for t in f32 q8_0 q4_k_m; do
  for th in 1 2; do
    a=$(gen "$KILN" --model "$D/m_$t.gguf" --threads $th); b=$(gen "$S" --model "$D/m_$t.gguf" --threads $th)
    DETAIL="kiln: $a | kiln-run: $b | $(tail -3 "$D/gen.err")"
    check "static_generate_${t}_threads$th" [ -n "$a" ] && [ "$(wc -w <<<"$a")" -ge 40 ] && [ "$a" = "$b" ]
  done
done

# ---- chat: the same greedy reply ----
chat() { printf 'the dog\n/exit\n' | timeout 60 "$1" chat --model "$D/m_q4_k_m.gguf" --tokenizer bytes \
           --temperature 0 --max-tokens 24 --threads 1 2>/dev/null; }
a=$(chat "$KILN"); b=$(chat "$S")
DETAIL="kiln: '$a' | kiln-run: '$b'"; check static_chat_same_reply [ -n "$a" ] && [ "$a" = "$b" ]

# ---- eval through the engine: the same perplexity (the quantized
# kernels are the same code; fp32 products differ in summation order
# between oneDNN and the blocked loop, so to 1e-5 relative) ----
ev() { "$1" eval --model "$D/m_$2.gguf" --data "$D/data" --split train --max-tokens 6000 --seq 64 \
         --threads 1 --engine --json 2>/dev/null | sed -n 's/.*"loss": *\([0-9.]*\).*/\1/p'; }
for t in f32 q4_k_m; do
  a=$(ev "$KILN" $t); b=$(ev "$S" $t)
  DETAIL="kiln $a, kiln-run $b"
  check "static_eval_$t" "$PY" -c "import sys; a, b = map(float, sys.argv[1:]); sys.exit(0 if abs(a - b) <= 1e-5 * a else 1)" "$a" "$b"
done

# ---- serve: the same completion over HTTP ----
complete() {
  curl -s -X POST -H 'Content-Type: application/json' "http://127.0.0.1:$PORT/v1/completions" \
    -d '{"prompt": "the cat", "max_tokens": 24, "temperature": 0}' |
    "$PY" -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])' 2>/dev/null
}
if ! command -v curl >/dev/null; then
  echo "SKIP static_serve: needs curl"
else
  texts=()
  for k in "$S" "$KILN"; do
    if KILN="$k" serve_start "$D/m_q8_0.gguf" --threads 1; then
      texts+=("$(complete)")
      stop_checked
    else
      fail static_serve_start "$k serve did not come up"
      texts+=("")
    fi
  done
  DETAIL="kiln-run: '${texts[0]}' | kiln: '${texts[1]}'"
  check static_serve_same_completion [ -n "${texts[0]}" ] && [ "${texts[0]}" = "${texts[1]}" ]
fi
