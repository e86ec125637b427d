#!/usr/bin/env bash
# t_run_dir.sh — a training run directory stands for its newest checkpoint
# wherever a model is named: `kiln generate`, `kiln chat` and `kiln serve
# --model RUN` use RUN/latest's checkpoint (the same greedy text as naming
# the checkpoint itself), and the server lists it under the run's name.
set -u
D="$KILN_TMP/t_run_dir"
rm -rf "$D"; mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
PY=/usr/bin/python3
awk 'BEGIN { for (i = 0; i < 400; i++) printf "the cat sat on the mat %d times\n", i }' >"$D/corpus.txt"
"$KILN" tokenize --tokenizer bytes --input "$D/corpus.txt" --out "$D/data" --quiet >/dev/null 2>&1 \
  || { fail run_dir_setup "kiln tokenize failed"; exit 1; }
cat >"$D/tiny.json" <<'J'
{"model_type": "gpt2", "vocab_size": 257, "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64,
 "bos_token_id": 256, "eos_token_id": 256}
J
"$KILN" train --data "$D/data" --config "$D/tiny.json" --out "$D/myrun" --seq 32 --batch 4 --steps 6 \
  --save-every 3 --eval-every 0 --warmup 1 --lr 3e-3 --threads 1 --progress none >"$D/train.log" 2>&1 \
  || { fail run_dir_setup "kiln train failed: $(tail -3 "$D/train.log")"; exit 1; }
ck="$D/myrun/$(cat "$D/myrun/latest")"
[ -f "$ck/model.safetensors" ] || { fail run_dir_setup "no checkpoint at $ck"; exit 1; }
gen() { "$KILN" generate --model "$1" --prompt "the cat" --max-tokens 12 --temperature 0 --quiet 2>&1; }
a=$(gen "$D/myrun"); b=$(gen "$ck")
check generate_run_dir [ "$a" = "$b" ] && [ ${#a} -gt 8 ]
[ "$a" = "$b" ] || printf '  run: %q\n  ckpt: %q\n' "$a" "$b"
out=$(printf 'hi\n/exit\n' | "$KILN" chat --model "$D/myrun" --max-tokens 4 --temperature 0 2>&1); rc=$?
DETAIL="exit $rc: $out"; check chat_run_dir [ $rc -eq 0 ]
if command -v curl >/dev/null && [ -x "$PY" ]; then
  serve_start "$D/myrun" --threads 1 || { fail serve_run_dir "did not start"; exit 1; }
  m=$(curl -s -m 10 "http://127.0.0.1:$PORT/v1/models")
  DETAIL="$m"; check serve_run_dir_name "$PY" -c "import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d['data'][0]['id'] == 'myrun' else 1)" "$m"
  c=$(curl -s -m 10 -H 'Content-Type: application/json' \
      -d '{"prompt":"the cat","max_tokens":12,"temperature":0}' "http://127.0.0.1:$PORT/v1/completions")
  DETAIL="$c vs ${b#the cat}"
  check serve_run_dir_same_text "$PY" -c "import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if 'the cat' + d['choices'][0]['text'] == sys.argv[2] else 1)" "$c" "$b"
  stop_checked
else
  echo "SKIP serve_run_dir: needs curl and /usr/bin/python3"
fi
exit 0
