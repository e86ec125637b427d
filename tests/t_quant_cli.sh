#!/usr/bin/env bash
# t_quant_cli.sh — quantized weights from the command line: `kiln eval
# --dtype` runs held-out tokens through the inference engine with the
# weights as served. fp32 through the engine gives the training forward's
# loss to the last printed digit (the same logits, bit for bit); q8_0,
# q6_k, q4_k and q4_0 stay close to it; generate and serve take the same
# --dtype; a type the engine does not store is refused naming the flag.
set -u
D="$KILN_TMP/t_quant_cli"
rm -rf "$D"; mkdir -p "$D"
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1${2:+: $2}"; }
check() { local n=$1; shift; if "$@"; then pass "$n"; else fail "$n" "${DETAIL:-}"; fi; DETAIL=""; }
PY=/usr/bin/python3
awk 'BEGIN { for (i = 0; i < 600; i++) printf "the cat sat on the mat %d times, and the dog ran %d laps\n", i, i % 7 }' >"$D/corpus.txt"
"$KILN" tokenize --tokenizer bytes --input "$D/corpus.txt" --out "$D/data" --quiet >/dev/null 2>&1 \
  || { fail quant_setup "kiln tokenize failed"; exit 1; }
# n_embd 256 and n_inner 512: every row suits the K-quants' 256-blocks
cat >"$D/cfg.json" <<'J'
{"model_type": "llama", "vocab_size": 257, "num_hidden_layers": 2, "hidden_size": 256,
 "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
 "max_position_embeddings": 64, "bos_token_id": 256, "eos_token_id": 256}
J
"$KILN" train --data "$D/data" --config "$D/cfg.json" --out "$D/run" --seq 32 --batch 4 --steps 30 \
  --eval-every 0 --warmup 3 --lr 3e-3 --threads 1 --progress none >"$D/train.log" 2>&1 \
  || { fail quant_setup "kiln train failed: $(tail -3 "$D/train.log")"; exit 1; }
# 20000 held-out tokens per evaluation; 6000 under the sanitizers (make asan
# runs the same arithmetic 10x slower: 11 evaluations, one a decode step
# per token)
NTOK=20000; [ -n "${KILN_SANITIZE:-}" ] && NTOK=6000
ev() { "$KILN" eval --model "$D/run" --data "$D/data" --split train --max-tokens $NTOK --seq 64 --threads 1 --json "$@" 2>"$D/eval.err"; }
loss() { "$PY" -c 'import json,sys; print(json.loads(sys.stdin.read())["loss"])' 2>/dev/null; }
ref=$(ev | loss)
f32=$(ev --dtype fp32 | loss)
DETAIL="training forward $ref, engine fp32 $f32"; check quant_eval_fp32_is_training_forward [ -n "$ref" ] && [ "$ref" = "$f32" ]
# the 8-bit activations and the weights' rounding cost little on held-out
# tokens: bounds about 7-20x what each type measures here (relative loss
# change 4e-5 bf16, 6e-5 q8_0, 6e-4 q6_k and q4_k, 1.5e-3 q4_0)
for t in bf16:0.001 q8_0:0.002 q6_k:0.005 q4_k:0.01 q4_0:0.01; do
  dt=${t%%:*}; tol=${t#*:}
  l=$(ev --dtype "$dt" | loss)
  DETAIL="$dt loss $l vs fp32 $ref (tolerance $tol relative): $(cat "$D/eval.err")"
  check "quant_eval_$dt" "$PY" -c "import sys; l, r, t = map(float, sys.argv[1:]); sys.exit(0 if abs(l - r) <= t * r else 1)" "$l" "$ref" "$tol"
done
out=$("$KILN" generate --model "$D/run" --tokenizer bytes --prompt "the cat" --max-tokens 16 --temperature 0 --dtype q4_k --threads 1 2>&1); rc=$?
DETAIL="exit $rc: $out"; check quant_generate_q4_k [ $rc -eq 0 ] && echo "$out" | grep -q "q4_K weights"
out=$("$KILN" eval --model "$D/run" --data "$D/data" --dtype q5_0 2>&1); rc=$?
DETAIL="exit $rc: $out"; check quant_bad_dtype_names_flag [ $rc -eq 2 ] && echo "$out" | grep -q -- "--dtype 'q5_0'"
# a .gguf's matrices are served in the types the file stores: q8_0 taken
# byte for byte gives the same greedy ids as quantizing its dequantized
# weights again (q8_0's quantizer reproduces its own blocks); a q4_k_m
# file keeps its q4_K/q6_K blocks (the log counts them)
for t in q8_0 q4_k_m; do
  "$KILN" quantize --model "$D/run" --type $t --out "$D/m_$t.gguf" --tokenizer bytes >"$D/q_$t.log" 2>&1 \
    || fail "quant_gguf_$t" "kiln quantize failed: $(tail -3 "$D/q_$t.log")"
done
gen() { "$KILN" generate --prompt "the cat" --max-tokens 24 --temperature 0 --print-ids --threads 1 "$@" 2>"$D/gen.err"; }
a=$(KILN_LOG=info gen --model "$D/m_q8_0.gguf"); b=$(gen --model "$D/m_q8_0.gguf" --dtype q8_0)
DETAIL="stored: $a | requantized: $b | $(cat "$D/gen.err")"
check quant_gguf_stored_q8_0_same_ids [ -n "$a" ] && [ "$a" = "$b" ]
out=$(KILN_LOG=info "$KILN" generate --model "$D/m_q4_k_m.gguf" --prompt "the cat" --max-tokens 8 --temperature 0 --threads 1 2>&1); rc=$?
n=$(echo "$out" | sed -n 's/.*engine: \([0-9]*\) matrices taken from .* in their stored types.*/\1/p')
DETAIL="exit $rc: $out"; check quant_gguf_q4_k_m_kept [ $rc -eq 0 ] && [ "${n:-0}" -ge 8 ] && echo "$out" | grep -q "the .gguf's own weights"
# eval --engine on a .gguf: the file's stored types through the engine, as
# generate runs them; q8_0 stored equals q8_0 quantized from the directory
# (the same blocks), and the JSON says which weights ran
js() { "$KILN" eval --data "$D/data" --split train --max-tokens $NTOK --seq 64 --threads 1 --json "$@" 2>"$D/eval.err"; }
a=$(js --model "$D/m_q8_0.gguf" --engine); b=$(js --model "$D/run" --dtype q8_0)
la=$(echo "$a" | loss); lb=$(echo "$b" | loss)
DETAIL="stored: $a | directory --dtype q8_0: $b | $(cat "$D/eval.err")"
check quant_eval_engine_gguf_q8_0 [ -n "$la" ] && [ "$la" = "$lb" ] && echo "$a" | grep -q '"weights": "stored types (engine)"'
a=$(KILN_LOG=info js --model "$D/m_q4_k_m.gguf" --engine)
DETAIL="$a | $(cat "$D/eval.err")"
check quant_eval_engine_gguf_q4_k_m_stored grep -q "matrices taken from .*m_q4_k_m.gguf in their stored types" "$D/eval.err"
# --chunk 1: every token a decode step, the 8-bit-activation dot products
# of generation (prefill widens the rows to fp32 for the GEMM instead):
# a different loss from the prefill path's, and close to it
l0=$(js --model "$D/m_q4_k_m.gguf" --engine | loss); l1=$(js --model "$D/m_q4_k_m.gguf" --engine --chunk 1 | loss)
DETAIL="prefill path $l0, decode path $l1: $(cat "$D/eval.err")"
check quant_eval_chunk1_decode_path "$PY" -c "import sys; a, b = map(float, sys.argv[1:]); sys.exit(0 if a != b and abs(a - b) <= 0.002 * a else 1)" "$l0" "$l1"
out=$("$KILN" eval --model "$D/run" --data "$D/data" --engine --chunk -1 2>&1); rc=$?
DETAIL="exit $rc: $out"; check quant_eval_bad_chunk [ $rc -eq 2 ] && echo "$out" | grep -q -- "--chunk must be >= 0"
