#!/usr/bin/env bash
# t_serve_endpoints.sh — kiln serve's llama.cpp-style endpoints and
# deployment switches: /tokenize and /detokenize (ids equal to `kiln
# tokenizer encode`'s for a trained BPE tokenizer, the BOS rule with
# add_special, pieces, the round trip, errors naming the field), /props
# (context, slots, template, build), CORS (--cors: headers, the OPTIONS
# preflight without a key, off by default, a listed origin), and the
# access log (--log-format text|json|off: one line per request with
# method, path, status, bytes, duration and the X-Request-Id, the front
# door's own refusals included). Loopback
# only; the server is killed on exit.
set -u
D="$KILN_TMP/t_serve_endpoints"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
PY=/usr/bin/python3
if ! command -v curl >/dev/null || [ ! -x "$PY" ]; then
  echo "SKIP serve_endpoints: needs curl and /usr/bin/python3"; exit 0
fi

# a small BPE tokenizer and a Llama model with a BOS token over it
for i in $(seq 200); do echo "the quick brown fox jumps over the lazy dog $i times, héllo wörld"; done >"$D/text.txt"
"$KILN" tokenizer train --input "$D/text.txt" --vocab-size 300 --out "$D/tok.json" --quiet || { fail tokenizer_train; exit 1; }
cat >"$D/tiny.json" <<'J'
{"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
 "vocab_size": 300, "max_position_embeddings": 256, "bos_token_id": 1}
J
"$KILN" init --config "$D/tiny.json" --out "$D/tiny" --force >/dev/null || { fail init; exit 1; }
export SERVE_TOKENIZER="$D/tok.json"

# req METHOD PATH [BODY] [curl args...]: CODE, body in $D/body, headers in $D/hdr
req() {
  local m=$1 p=$2 b=${3-}
  shift 3 2>/dev/null || shift $#
  if [ -n "$b" ]; then
    CODE=$(curl -s -D "$D/hdr" -o "$D/body" -w '%{http_code}' -X "$m" -H 'Content-Type: application/json' \
      --data-binary "$b" "$@" "http://127.0.0.1:$PORT$p")
  else
    CODE=$(curl -s -D "$D/hdr" -o "$D/body" -w '%{http_code}' -X "$m" "$@" "http://127.0.0.1:$PORT$p")
  fi
}
py() { "$PY" -c "import json,sys; d=json.load(open('$D/body')); sys.exit(0 if ($1) else 1)" 2>/dev/null; }
hdr() { grep -qi "^$1" "$D/hdr"; }
nohdr() { ! grep -qi "^$1" "$D/hdr"; }

serve_start "$D/tiny" --threads 1 --parallel 2 --log-format json || { fail start_server; exit 1; }

# ---- /tokenize and /detokenize against the tokenizer's own ids ----
TEXT='the quick brown fox, héllo wörld 42'
printf '%s' "$TEXT" | "$KILN" tokenizer encode --tokenizer "$D/tok.json" --json >"$D/own.json"
BODY=$("$PY" -c "import json,sys; print(json.dumps({'content': sys.argv[1]}))" "$TEXT")
req POST /tokenize "$BODY"
check tokenize_equals_tokenizer "$PY" -c "
import json; d=json.load(open('$D/body')); own=json.load(open('$D/own.json'))
assert d['tokens'] == own and len(own) < len('$TEXT'.encode()), (d, own)"
cp "$D/body" "$D/tok1.json"
BODY=$("$PY" -c "import json,sys; print(json.dumps({'content': sys.argv[1], 'add_special': True}))" "$TEXT")
req POST /tokenize "$BODY"
check tokenize_add_special_bos "$PY" -c "
import json; d=json.load(open('$D/body')); own=json.load(open('$D/own.json'))
assert d['tokens'] == [1] + own, d"
req POST /detokenize "$(cat "$D/tok1.json")"
check detokenize_round_trip "$PY" -c "
import json,sys; d=json.load(open('$D/body')); sys.exit(d['content'] != sys.argv[1])" "$TEXT"
BODY=$("$PY" -c "import json,sys; print(json.dumps({'content': sys.argv[1], 'with_pieces': True}))" "$TEXT")
req POST /tokenize "$BODY"
check tokenize_pieces "$PY" -c "
import json,sys; d=json.load(open('$D/body')); own=json.load(open('$D/own.json'))
ids=[t['id'] for t in d['tokens']]
b=b''.join(t['piece'].encode() if isinstance(t['piece'], str) else bytes(t['piece']) for t in d['tokens'])
assert ids == own and b == sys.argv[1].encode(), d" "$TEXT"
req POST /tokenize '{"content":""}'
check tokenize_empty py "d == {'tokens': []}"
req POST /tokenize '{"content":5}'
check tokenize_bad_content py "d['error']['param'] == 'content' and d['error']['code'] == 'invalid_type'"
[ "$CODE" = 400 ] || fail tokenize_bad_content_status "$CODE"
req POST /tokenize '{"content":"x","add_special":"yes"}'
check tokenize_bad_add_special py "d['error']['param'] == 'add_special'"
req POST /detokenize '{"tokens":[5,300]}'
check detokenize_oov py "d['error']['param'] == 'tokens' and d['error']['code'] == 'invalid_value' and '300' in d['error']['message']"
[ "$CODE" = 400 ] || fail detokenize_oov_status "$CODE"
req POST /detokenize '{"tokens":"abc"}'
check detokenize_bad_type py "d['error']['param'] == 'tokens' and d['error']['code'] == 'invalid_type'"
req POST /detokenize '{"tokens":[]}'
check detokenize_empty py "d == {'content': ''}"
req GET /tokenize
check tokenize_get_405 test "$CODE" = 405
check tokenize_allow_post hdr 'Allow: POST'

# ---- /props ----
req GET /props
check props_values py "d['model'] == 'tiny' and d['n_ctx'] == 256 and d['total_slots'] == 2 and d['vocab_size'] == 300 and d['bos_token_id'] == 1 and d['chat_template_name'] == 'chatml' and '<|im_start|>' in d['chat_template'] and d['build_info'].startswith('kiln ') and d['default_generation_settings']['n_ctx'] == 256"

# ---- CORS is off by default ----
req OPTIONS /v1/chat/completions '' -H 'Origin: https://app.example' -H 'Access-Control-Request-Method: POST'
check cors_off_preflight_405 test "$CODE" = 405
req GET /health '' -H 'Origin: https://app.example'
check cors_off_no_header nohdr 'Access-Control-Allow-Origin'
check request_id_header hdr 'X-Request-Id: req-'

# ---- the access log (json): one line per request above, with its fields ----
req POST /v1/completions '{"prompt":"the fox","max_tokens":3,"temperature":0,"ignore_eos":true}'
RID=$(sed -n 's/^X-Request-Id: \([^[:space:]]*\).*/\1/Ip' "$D/hdr")
CID=$("$PY" -c "import json; print(json.load(open('$D/body'))['id'])")
req GET /nope
sleep 0.3
check access_log_json "$PY" - "$D/serve.log" "$RID" "$CID" <<'PYEOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')]
assert len(lines) == 16, len(lines)  # one per request above
c = [l for l in lines if l['path'] == '/v1/completions'][0]
assert c['request_id'] == sys.argv[2] == sys.argv[3], (c, sys.argv)
assert c['method'] == 'POST' and c['status'] == 200 and c['bytes'] > 100 and c['duration_ms'] > 0, c
assert c['completion_tokens'] == 3 and c['prompt_tokens'] >= 2, c
t = [l for l in lines if l['path'] == '/tokenize' and l['status'] == 405][0]
assert t['method'] == 'GET' and t['bytes'] > 20, t
n = [l for l in lines if l['path'] == '/nope'][0]
assert n['status'] == 404 and n['request_id'].startswith('req-'), n
o = [l for l in lines if l['method'] == 'OPTIONS'][0]
assert o['status'] == 405, o
PYEOF
# a request the front door answers itself (HTTP/2.0: 505) is logged too
"$PY" - "$PORT" <<'PYEOF'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n")
s.recv(4096); s.close()
PYEOF
sleep 0.3
check access_log_gate "$PY" - "$D/serve.log" <<'PYEOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.startswith('{')]
assert len(lines) == 17, len(lines)
g = lines[-1]
assert g['status'] == 505 and g['method'] == '-' and g['path'] == '-' and g['bytes'] > 50 and g['client'] == '127.0.0.1' and g['request_id'].startswith('req-'), g
PYEOF
stop_checked

# ---- CORS on; the text access log ----
serve_start "$D/tiny" --threads 1 --cors '*' --api-key k1 || { fail start_server_cors; exit 1; }
req OPTIONS /v1/chat/completions '' -H 'Origin: https://app.example' -H 'Access-Control-Request-Method: POST' -H 'Access-Control-Request-Headers: authorization, content-type'
check cors_preflight_204 test "$CODE" = 204
check cors_preflight_origin hdr 'Access-Control-Allow-Origin: \*'
check cors_preflight_methods hdr 'Access-Control-Allow-Methods: GET, POST, OPTIONS'
check cors_preflight_headers hdr 'Access-Control-Allow-Headers: authorization, content-type'
req POST /v1/completions '{"prompt":"the","max_tokens":1}' -H 'Origin: https://app.example' -H 'Authorization: Bearer k1'
check cors_response_header hdr 'Access-Control-Allow-Origin: \*'
check cors_200 test "$CODE" = 200
req POST /v1/completions '{"prompt":"the","max_tokens":1}' -H 'Origin: https://app.example'
check cors_on_401_carries_header hdr 'Access-Control-Allow-Origin: \*'
check cors_key_still_needed test "$CODE" = 401
req POST /tokenize '{"content":"the"}'
check tokenize_needs_key test "$CODE" = 401
sleep 0.3
check access_log_text grep -Eq '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z 127\.0\.0\.1 POST /v1/completions 200 [0-9]+ [0-9.]+ms cmpl-[0-9a-f]+ prompt_tokens=[0-9]+ completion_tokens=1$' "$D/serve.log"
check access_log_text_401 grep -Eq ' POST /tokenize 401 [0-9]+ [0-9.]+ms req-' "$D/serve.log"
stop_checked

serve_start "$D/tiny" --threads 1 --cors 'https://a.example, https://b.example' --log-format off || { fail start_server_cors_list; exit 1; }
req GET /health '' -H 'Origin: https://b.example'
check cors_listed_origin hdr 'Access-Control-Allow-Origin: https://b.example'
check cors_vary hdr 'Vary: Origin'
req GET /health '' -H 'Origin: https://evil.example'
check cors_unlisted_origin nohdr 'Access-Control-Allow-Origin'
sleep 0.2
check access_log_off test "$(grep -c 'GET /health' "$D/serve.log")" = 0
stop_checked

# bad switches are refused at start
"$KILN" serve --model "$D/tiny" --log-format xml --port 0 >"$D/bad.log" 2>&1
check log_format_bad test $? -ne 0 -a -n "$(grep -- "--log-format 'xml'" "$D/bad.log")"
"$KILN" serve --model "$D/tiny" --cors '' --port 0 >"$D/bad.log" 2>&1
check cors_empty_refused test $? -ne 0 -a -n "$(grep -- "--cors is empty" "$D/bad.log")"
exit 0
