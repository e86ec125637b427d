#!/usr/bin/env bash
# t_serve_openai.sh — the official openai npm client (tests/js) against
# kiln serve with an API key: see tests/js/serve_openai.js. Loopback only;
# the server is killed on exit.
set -u
D="$KILN_TMP/t_serve_openai"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
if ! command -v node >/dev/null || [ ! -d "$KILN_ROOT/tests/js/node_modules/openai" ]; then
  echo "SKIP serve_openai_client: needs node and tests/js/node_modules (bash scripts/deps.sh installs them)"
  exit 0
fi
cat >"$D/tiny.json" <<'J'
{"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
 "vocab_size": 257, "max_position_embeddings": 1024}
J
"$KILN" init --config "$D/tiny.json" --out "$D/tiny-llama" --force >/dev/null || { echo "FAIL init"; exit 1; }
serve_start "$D/tiny-llama" --api-key test-key-123 --parallel 2 || { echo "FAIL serve_start"; exit 1; }
node "$KILN_ROOT/tests/js/serve_openai.js" "http://127.0.0.1:$PORT/v1" test-key-123 tiny-llama
rc=$?
# a client that crashed took its remaining checks with it
[ $rc -eq 0 ] || echo "FAIL serve_openai_client: node exited with status $rc"
stop_checked
exit 0
