#!/usr/bin/env bash
# t_serve_openai.sh — the official openai npm client (tests/js) against
# kiln serve with an API key: see tests/js/serve_openai.js. Loopback only;
# the server is killed on exit.
set -u
D="$KILN_TMP/t_serve_openai"
mkdir -p "$D"
SPID=""
cleanup() { [ -n "$SPID" ] && kill "$SPID" 2>/dev/null && wait "$SPID" 2>/dev/null; }
# stops the server with SIGTERM: it must exit 0 with no sanitizer report
stop_checked() {
  kill "$SPID" 2>/dev/null; wait "$SPID"; local rc=$?; SPID=""
  if [ $rc -eq 0 ] && ! grep -q 'Sanitizer\|runtime error' "$D/serve.log"; then echo "PASS server_clean_exit"
  else echo "FAIL server_clean_exit: status $rc"; grep -A20 'Sanitizer\|runtime error' "$D/serve.log" | head -40; fi
}
trap cleanup EXIT
if ! command -v node >/dev/null || [ ! -d "$KILN_ROOT/tests/js/node_modules/openai" ]; then
  echo "SKIP serve_openai_client: needs node and tests/js/node_modules (bash scripts/deps.sh installs them)"
  exit 0
fi
cat >"$D/tiny.json" <<'J'
{"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
 "vocab_size": 257, "max_position_embeddings": 256}
J
"$KILN" init --config "$D/tiny.json" --out "$D/tiny-llama" --force >/dev/null || { echo "FAIL init"; exit 1; }
"$KILN" serve --model "$D/tiny-llama" --tokenizer bytes --port 0 --api-key test-key-123 --parallel 2 \
  >"$D/serve.log" 2>&1 &
SPID=$!
PORT=""
for _ in $(seq 200); do
  PORT=$(sed -n 's/.*listening on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$D/serve.log" 2>/dev/null)
  [ -n "$PORT" ] && break
  kill -0 "$SPID" 2>/dev/null || break
  sleep 0.05
done
[ -n "$PORT" ] || { cat "$D/serve.log"; echo "FAIL serve_start"; exit 1; }
node "$KILN_ROOT/tests/js/serve_openai.js" "http://127.0.0.1:$PORT/v1" test-key-123 tiny-llama
rc=$?
# a client that crashed took its remaining checks with it
[ $rc -eq 0 ] || echo "FAIL serve_openai_client: node exited with status $rc"
stop_checked
exit 0
