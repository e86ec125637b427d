#!/usr/bin/env bash
# t_gguf_import.sh — GGUF files that kiln did not write: tests/gguf_write.py
# (an independent writer from the GGUF spec, python3 standard library only)
# writes a gpt2 and a llama model in F32/F16/BF16/Q8_0 with alignment 64,
# u64 and other value types, merges, and llama's permuted q/k rows. kiln
# imports each (`kiln import`), the script checks every weight bit for bit
# against its own dequantization in HF layout, the tokenizer's merges give
# the ids they must, generate runs from the .gguf itself, and the imported
# directory trains. Also: export of the imported model reads back the same,
# and hostile input to the commands fails with a message naming the file.
set -u
D="$KILN_TMP/t_gguf_import"
mkdir -p "$D"
PY=/usr/bin/python3
. "$KILN_ROOT/tests/lib_serve.sh" # pass, fail, check
if [ ! -x "$PY" ]; then echo "SKIP gguf_import: needs /usr/bin/python3"; exit 0; fi
W="$KILN_ROOT/tests/gguf_write.py"
pycheck() { "$PY" "$W" check "$@" >/dev/null 2>&1; } # quiet; DETAIL has its report

for a in gpt2 llama; do
  "$PY" "$W" write $a "$D/$a.gguf" || { fail "${a}_write"; continue; }
  DETAIL=$("$KILN" import "$D/$a.gguf" --out "$D/$a" 2>&1)
  check "${a}_import" test -f "$D/$a/model.safetensors" -a -f "$D/$a/tokenizer.json" -a -f "$D/$a/config.json"
  DETAIL=$("$PY" "$W" check $a "$D/$a" 2>&1 | tail -5)
  check "${a}_weights_bit_exact" pycheck $a "$D/$a"
  # merges "h e", "l l", "he ll", "hell o": "hello" is id 259, " hello" is 32 259
  ids=$(printf 'hello hello' | "$KILN" tokenizer encode --tokenizer "$D/$a.gguf")
  DETAIL="ids: $ids"
  check "${a}_tokenizer_merges" test "$ids" = "259 32 259"
  ids2=$(printf 'hello hello' | "$KILN" tokenizer encode --tokenizer "$D/$a")
  DETAIL="from the .gguf: $ids, from the imported tokenizer.json: $ids2"
  check "${a}_tokenizer_json_same" test "$ids" = "$ids2"
  # --dtype fp32: the file's weights dequantized, as the imported directory
  # holds them (without it the engine keeps the file's stored types)
  g1=$("$KILN" generate --model "$D/$a.gguf" --dtype fp32 --prompt "hello" --max-tokens 6 --temperature 0 --ignore-eos --print-ids --quiet --threads 1 2>&1)
  g2=$("$KILN" generate --model "$D/$a" --prompt "hello" --max-tokens 6 --temperature 0 --ignore-eos --print-ids --quiet --threads 1 2>&1)
  DETAIL="gguf: $g1 / dir: $g2"
  check "${a}_generate_from_gguf" test -n "$g1" -a "$g1" = "$g2" -a "$(echo "$g1" | tail -1 | wc -w)" = 6
  # the imported directory trains (a few steps on its own tokenizer)
  for i in $(seq 1 60); do echo "hello hell he said hello to the hello"; done >"$D/text.txt"
  "$KILN" tokenize --tokenizer "$D/$a" --input "$D/text.txt" --out "$D/data_$a" --quiet >/dev/null 2>&1
  DETAIL=$("$KILN" train --init-from "$D/$a" --data "$D/data_$a" --out "$D/run_$a" --steps 3 --batch 2 \
           --seq 8 --eval-every 0 --threads 1 --progress none 2>&1 | tail -3)
  check "${a}_imported_trains" test -f "$D/run_$a/latest"
  e1=$("$KILN" eval --model "$D/$a.gguf" --data "$D/data_$a" --split train --threads 1 2>&1 | grep -o 'loss [0-9.]*')
  e2=$("$KILN" eval --model "$D/$a" --data "$D/data_$a" --split train --threads 1 2>&1 | grep -o 'loss [0-9.]*')
  DETAIL="gguf: '$e1' dir: '$e2'"
  check "${a}_eval_from_gguf" test -n "$e1" -a "$e1" = "$e2"
  DETAIL=$("$KILN" info --model "$D/$a.gguf" 2>&1 | head -3)
  check "${a}_info_from_gguf" test -n "$("$KILN" info --model "$D/$a.gguf" 2>/dev/null | grep "model_type  $a")"
  nt=$([ $a = gpt2 ] && echo 28 || echo 21)
  DETAIL=$("$KILN" info --model "$D/$a.gguf" 2>&1 | grep gguf)
  check "${a}_info_gguf_types" test -n "$("$KILN" info --model "$D/$a.gguf" 2>/dev/null | grep "^gguf  *$nt tensors" | grep q8_0 | grep bf16)"
  # quantize's summary and --calib: the fp32 perplexity is kiln eval's
  "$KILN" quantize --model "$D/$a" --type q4_k_m --out "$D/${a}_q.gguf" --calib "$D/data_$a" \
    --threads 1 >"$D/q_$a.txt" 2>&1
  DETAIL=$(cat "$D/q_$a.txt")
  check "${a}_quantize_summary" grep -q "bits per weight" "$D/q_$a.txt"
  # rows of 32 and 48 are not Q4_K's 256: every matrix falls back, and says so
  check "${a}_quantize_fallbacks_listed" grep -q "fallback  blk.0.*q4_K -> q8_0 (row length 32" "$D/q_$a.txt"
  p0=$(sed -n 's/.*perplexity \([0-9.]*\) (fp32).*/\1/p' "$D/q_$a.txt")
  pe=$("$KILN" eval --model "$D/$a" --data "$D/data_$a" --split train --seq 16 --batch 4 --threads 1 --json |
       "$PY" -c 'import json,sys; print("%.4f" % json.load(sys.stdin)["perplexity"])')
  DETAIL="quantize --calib: '$p0', kiln eval: '$pe'"
  check "${a}_calib_matches_eval" test -n "$p0" -a "$p0" = "$pe"
  # kiln -> GGUF F32 -> kiln: the same weights again
  "$KILN" export --format gguf --model "$D/$a" --out "$D/${a}_re.gguf" --quiet >/dev/null 2>&1
  "$KILN" import "$D/${a}_re.gguf" --out "$D/${a}_re" >/dev/null 2>&1
  DETAIL=$("$PY" "$W" check $a "$D/${a}_re" 2>&1 | tail -3)
  check "${a}_reexport_same" pycheck $a "$D/${a}_re"
done

# hostile input to the commands: a message naming the file, no crash
head -c 200 "$D/gpt2.gguf" >"$D/cut.gguf"
out=$("$KILN" generate --model "$D/cut.gguf" --prompt hi --max-tokens 2 2>&1); rc=$?
DETAIL="rc $rc: $out"
check cut_gguf_refused test $rc -eq 1 -a -n "$(echo "$out" | grep 'cut.gguf' | grep -E 'truncated|past the end')"
printf 'GGUF\003\000\000\000' >"$D/tiny.gguf"
out=$("$KILN" import "$D/tiny.gguf" --out "$D/tiny" 2>&1); rc=$?
DETAIL="rc $rc: $out"
check tiny_gguf_refused test $rc -eq 1 -a -n "$(echo "$out" | grep 'tiny.gguf')"
out=$("$KILN" quantize --model "$D/gpt2" --type q3_k --out "$D/x.gguf" 2>&1); rc=$?
DETAIL="rc $rc: $out"
check quantize_bad_type test $rc -eq 2 -a -n "$(echo "$out" | grep -- "--type: 'q3_k'")"
out=$("$KILN" export --format onnx --model "$D/gpt2" --out "$D/x.onnx" 2>&1); rc=$?
DETAIL="rc $rc: $out"
check export_bad_format test $rc -eq 2 -a -n "$(echo "$out" | grep -- "--format: 'onnx'")"
exit 0
