#!/usr/bin/env bash
# t_serve.sh — kiln serve over raw HTTP with curl: routes, response shapes,
# SSE framing, streamed == non-streamed text, determinism, stop strings,
# logprobs, usage counts, the OpenAI error objects and their status codes
# (400, 401, 404, 405, 413), and the API key. A tiny random model (kiln
# init) with the bytes tokenizer keeps it fast. Loopback only; the server
# is killed on exit.
set -u
D="$KILN_TMP/t_serve"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
serve_needs serve_http
serve_tiny_gpt2

# start_server ARGS... : the tiny model on a free port (SPID, PORT)
start_server() { serve_start "$D/tiny" "$@"; }
stop_server() { stop_checked; }

# req METHOD PATH [BODY] [curl args...]: CODE <- status, body in $D/body
req() {
  local m=$1 p=$2 b=${3-}
  shift 3 2>/dev/null || shift $#
  if [ -n "$b" ]; then
    CODE=$(curl -s -o "$D/body" -w '%{http_code}' -X "$m" -H 'Content-Type: application/json' \
      --data-binary "$b" "$@" "http://127.0.0.1:$PORT$p")
  else
    CODE=$(curl -s -o "$D/body" -w '%{http_code}' -X "$m" "$@" "http://127.0.0.1:$PORT$p")
  fi
}
# py EXPR: evaluates a Python assertion over d = the JSON body
py() { "$PY" -c "import json,sys; d=json.load(open('$D/body')); sys.exit(0 if ($1) else 1)" 2>/dev/null; }
# err_is STATUS TYPE: an OpenAI error object with that status and type
err_is() { [ "$CODE" = "$1" ] && py "set(d['error']) >= {'message','type','param','code'} and d['error']['type'] == '$2' and len(d['error']['message']) > 10"; }

start_server --parallel 2 || { fail start_server; exit 1; }

req GET /health
check health_ok py "d['status'] == 'ok'"
req GET /v1/models
check models_list py "d['object'] == 'list' and d['data'][0]['id'] == 'tiny' and d['data'][0]['object'] == 'model'"
req GET /v1/models/tiny
check model_get py "d['id'] == 'tiny'"
req GET /v1/models/nope
check model_get_404 err_is 404 not_found_error

# ---- completions ----
req POST /v1/completions '{"model":"tiny","prompt":"Hello","max_tokens":12,"temperature":0,"ignore_eos":true}'
cp "$D/body" "$D/c1.json"
check completion_shape py "d['object']=='text_completion' and d['id'].startswith('cmpl-') and d['model']=='tiny' and d['choices'][0]['finish_reason']=='length' and d['usage']=={'prompt_tokens':5,'completion_tokens':12,'total_tokens':17}"
req POST /v1/completions '{"model":"tiny","prompt":"Hello","max_tokens":12,"temperature":0,"ignore_eos":true}'
check greedy_deterministic cmp -s <("$PY" -c "import json;print(json.load(open('$D/c1.json'))['choices'][0]['text'])") <("$PY" -c "import json;print(json.load(open('$D/body'))['choices'][0]['text'])")
req POST /v1/completions '{"prompt":"Hi","max_tokens":20,"temperature":1.0,"seed":42,"ignore_eos":true}'
cp "$D/body" "$D/s1.json"
req POST /v1/completions '{"prompt":"Hi","max_tokens":20,"temperature":1.0,"seed":42,"ignore_eos":true}'
check seed_reproducible "$PY" -c "import json;a=json.load(open('$D/s1.json'));b=json.load(open('$D/body'));exit(a['choices'][0]['text']!=b['choices'][0]['text'])"
req POST /v1/completions '{"prompt":"Hi","max_tokens":20,"temperature":1.0,"seed":43,"ignore_eos":true}'
check seed_changes_sample "$PY" -c "import json;a=json.load(open('$D/s1.json'));b=json.load(open('$D/body'));exit(a['choices'][0]['text']==b['choices'][0]['text'])"
# token-id prompt: the same as the text prompt
req POST /v1/completions '{"prompt":[72,101,108,108,111],"max_tokens":12,"temperature":0,"ignore_eos":true}'
check token_prompt "$PY" -c "import json;a=json.load(open('$D/c1.json'));b=json.load(open('$D/body'));exit(a['choices'][0]['text']!=b['choices'][0]['text'])"

# ---- SSE framing and streamed == non-streamed ----
curl -sN -H 'Content-Type: application/json' -d '{"prompt":"Hello","max_tokens":12,"temperature":0,"ignore_eos":true,"stream":true,"stream_options":{"include_usage":true}}' \
  -D "$D/sse.hdr" "http://127.0.0.1:$PORT/v1/completions" >"$D/sse.txt"
check sse_content_type grep -qi '^content-type: text/event-stream' "$D/sse.hdr"
check sse_framing "$PY" - "$D/sse.txt" "$D/c1.json" <<'EOF'
import json, sys
raw = open(sys.argv[1], encoding='utf-8').read()
assert raw.endswith("data: [DONE]\n\n"), repr(raw[-40:])
events = raw.split("\n\n")[:-1]
assert all(e.startswith("data: ") and "\n" not in e for e in events), events
chunks = [json.loads(e[6:]) for e in events[:-1]]
text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
want = json.load(open(sys.argv[2]))["choices"][0]["text"]
assert text == want, (text, want)
assert chunks[-2]["choices"][0]["finish_reason"] == "length"
assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
EOF

CHAT='{"model":"tiny","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi there"}],"max_tokens":16,"temperature":0,"ignore_eos":true'
req POST /v1/chat/completions "$CHAT}"
cp "$D/body" "$D/chat.json"
check chat_shape py "d['object']=='chat.completion' and d['id'].startswith('chatcmpl-') and d['choices'][0]['message']['role']=='assistant' and isinstance(d['choices'][0]['message']['content'], str) and d['usage']['prompt_tokens'] > 20"
curl -sN -H 'Content-Type: application/json' -d "$CHAT,\"stream\":true}" "http://127.0.0.1:$PORT/v1/chat/completions" >"$D/chat_sse.txt"
check chat_stream_equals "$PY" - "$D/chat_sse.txt" "$D/chat.json" <<'EOF'
import json, sys
raw = open(sys.argv[1], encoding='utf-8').read()
assert raw.endswith("data: [DONE]\n\n")
chunks = [json.loads(e[6:]) for e in raw.split("\n\n")[:-2]]
assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
d = json.load(open(sys.argv[2]))
assert text == d["choices"][0]["message"]["content"], (text, d)
assert chunks[-1]["choices"][0]["finish_reason"] == d["choices"][0]["finish_reason"]
assert all(c["object"] == "chat.completion.chunk" for c in chunks)
EOF

# ---- stop strings: the text ends before the first occurrence ----
STOP=$("$PY" - "$D/c1.json" <<'EOF'
import json, sys
t = json.load(open(sys.argv[1]))["choices"][0]["text"]
# a short ASCII stop taken from the middle of the greedy text
for i in range(2, len(t) - 2):
    s = t[i:i + 2]
    if s.isascii() and s.isprintable() and '"' not in s and '\\' not in s:
        print(s); break
EOF
)
if [ -n "$STOP" ]; then
  req POST /v1/completions "{\"prompt\":\"Hello\",\"max_tokens\":12,\"temperature\":0,\"ignore_eos\":true,\"stop\":[\"$STOP\"]}"
  check stop_string "$PY" -c "
import json; a=json.load(open('$D/c1.json'))['choices'][0]['text']; d=json.load(open('$D/body'))
c=d['choices'][0]; exit(not (c['text']==a[:a.index('$STOP')] and c['finish_reason']=='stop'))"
else
  echo "SKIP stop_string: the greedy text has no ASCII pair to stop on"
fi

# ---- stop_token_ids: generation ends at the first such token (bytes: id = byte) ----
SID=$("$PY" -c "
import json; t=json.load(open('$D/c1.json'))['choices'][0]['text']
c=[ch for ch in t[3:] if ch.isascii()]
print(ord(c[0]) if c else '')")
if [ -n "$SID" ]; then
  req POST /v1/completions "{\"prompt\":\"Hello\",\"max_tokens\":12,\"temperature\":0,\"ignore_eos\":true,\"stop_token_ids\":[$SID]}"
  check stop_token_ids "$PY" -c "
import json; a=json.load(open('$D/c1.json'))['choices'][0]['text']; d=json.load(open('$D/body'))
i=a.index(chr($SID)); c=d['choices'][0]
exit(not (c['text']==a[:i] and c['finish_reason']=='stop' and d['usage']['completion_tokens']==len(a[:i].encode())+1))"
else
  echo "SKIP stop_token_ids: the greedy text has no ASCII character to stop on"
fi
req POST /v1/completions '{"prompt":"x","stop_token_ids":[100000]}'
check stop_token_ids_range_400 err_is 400 invalid_request_error

# ---- logprobs ----
req POST /v1/completions '{"prompt":"Hello","max_tokens":6,"temperature":0,"ignore_eos":true,"logprobs":3}'
check completion_logprobs py "len(d['choices'][0]['logprobs']['tokens'])==6 and all(x<=0 for x in d['choices'][0]['logprobs']['token_logprobs']) and all(len(t)>=1 for t in d['choices'][0]['logprobs']['top_logprobs']) and max(d['choices'][0]['logprobs']['top_logprobs'][0].values())>=d['choices'][0]['logprobs']['token_logprobs'][0]-1e-6"
req POST /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"max_tokens":4,"temperature":0,"ignore_eos":true,"logprobs":true,"top_logprobs":2}'
check chat_logprobs py "len(d['choices'][0]['logprobs']['content'])==4 and all(len(e['top_logprobs'])==2 and e['logprob']<=0 and isinstance(e['bytes'],list) for e in d['choices'][0]['logprobs']['content'])"
# streamed logprobs: every chunk that carries text carries the logprobs of
# its tokens (one-token chunks included), and together they are the
# non-streamed request's, token for token
# (the completion is biased to "A", an ASCII byte: each token its own chunk)
req POST /v1/completions '{"prompt":"Hello","max_tokens":8,"temperature":0,"ignore_eos":true,"logprobs":2,"logit_bias":{"65":100}}'
cp "$D/body" "$D/lp_full.json"
curl -sN -H 'Content-Type: application/json' -d '{"prompt":"Hello","max_tokens":8,"temperature":0,"ignore_eos":true,"logprobs":2,"logit_bias":{"65":100},"stream":true}' \
  "http://127.0.0.1:$PORT/v1/completions" >"$D/lp_sse.txt"
req POST /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"max_tokens":6,"temperature":0,"ignore_eos":true,"logprobs":true,"top_logprobs":1}'
cp "$D/body" "$D/lpc_full.json"
curl -sN -H 'Content-Type: application/json' -d '{"messages":[{"role":"user","content":"x"}],"max_tokens":6,"temperature":0,"ignore_eos":true,"logprobs":true,"top_logprobs":1,"stream":true}' \
  "http://127.0.0.1:$PORT/v1/chat/completions" >"$D/lpc_sse.txt"
# a one-token reply is one chunk of one token (tokens generated faster than
# they are sent share a chunk, so this is the one-token chunk for sure)
curl -sN -H 'Content-Type: application/json' -d '{"prompt":"Hello","max_tokens":1,"temperature":0,"logprobs":1,"logit_bias":{"65":100},"stream":true}' \
  "http://127.0.0.1:$PORT/v1/completions" >"$D/lp1_sse.txt"
curl -sN -H 'Content-Type: application/json' -d '{"messages":[{"role":"user","content":"x"}],"max_tokens":1,"temperature":0,"logprobs":true,"logit_bias":{"65":100},"stream":true}' \
  "http://127.0.0.1:$PORT/v1/chat/completions" >"$D/lpc1_sse.txt"
check stream_logprobs_one_token_chunk "$PY" - "$D/lp1_sse.txt" "$D/lpc1_sse.txt" <<'EOF'
import json, sys
def texts(p, chat):
    out = []
    for ev in open(p).read().split("\n\n"):
        if ev.startswith("data: ") and ev[6:] != "[DONE]":
            for ch in json.loads(ev[6:])["choices"]:
                t = ch["delta"].get("content") if chat else ch["text"]
                if t: out.append((t, ch["logprobs"]))
    return out
a, b = texts(sys.argv[1], False), texts(sys.argv[2], True)
ok = (len(a) == 1 and a[0][0] == "A" and a[0][1] and a[0][1]["tokens"] == ["A"] and a[0][1]["token_logprobs"][0] <= 0
      and len(b) == 1 and b[0][0] == "A" and b[0][1] and len(b[0][1]["content"]) == 1 and b[0][1]["content"][0]["token"] == "A")
if not ok: print("one-token chunks:", a, b)
sys.exit(0 if ok else 1)
EOF
check stream_logprobs_every_chunk "$PY" - "$D/lp_sse.txt" "$D/lp_full.json" "$D/lpc_sse.txt" "$D/lpc_full.json" <<'EOF'
import json, sys
def chunks(p):
    out = []
    for ev in open(p).read().split("\n\n"):
        if ev.startswith("data: ") and ev[6:] != "[DONE]":
            out.append(json.loads(ev[6:]))
    return out
ok = True
# completions: tokens and token_logprobs, chunk by chunk
toks, lps = [], []
for c in chunks(sys.argv[1]):
    for ch in c["choices"]:
        if ch["text"]:
            if not ch["logprobs"] or len(ch["logprobs"]["tokens"]) < 1:
                print("completion chunk with text %r has logprobs %r" % (ch["text"], ch["logprobs"])); ok = False
                continue
            toks += ch["logprobs"]["tokens"]; lps += ch["logprobs"]["token_logprobs"]
full = json.load(open(sys.argv[2]))["choices"][0]["logprobs"]
if toks != full["tokens"] or any(abs(a - b) > 1e-5 for a, b in zip(lps, full["token_logprobs"])) or len(lps) != 8:
    print("streamed", toks, lps, "non-streamed", full["tokens"], full["token_logprobs"]); ok = False
# chat: logprobs.content entries
ents = []
for c in chunks(sys.argv[3]):
    for ch in c["choices"]:
        if ch["delta"].get("content"):
            if not ch["logprobs"] or not ch["logprobs"]["content"]:
                print("chat chunk with content %r has logprobs %r" % (ch["delta"]["content"], ch["logprobs"])); ok = False
                continue
            ents += ch["logprobs"]["content"]
fullc = json.load(open(sys.argv[4]))["choices"][0]["logprobs"]["content"]
if [e["token"] for e in ents] != [e["token"] for e in fullc] or len(ents) != 6:
    print("chat streamed", [e["token"] for e in ents], "non-streamed", [e["token"] for e in fullc]); ok = False
sys.exit(0 if ok else 1)
EOF

# ---- errors ----
req POST /v1/completions '{"prompt": "x", "max_tokens": 5'
check malformed_json_400 err_is 400 invalid_request_error
req POST /v1/completions '[1,2]'
check non_object_400 err_is 400 invalid_request_error
req POST /v1/completions '{"model":"gpt-4","prompt":"x"}'
check unknown_model_404 err_is 404 not_found_error
check unknown_model_code py "d['error']['code']=='model_not_found' and d['error']['param']=='model'"
req POST /v1/completions '{"prompt":"x","temperature":-1}'
check negative_temperature_400 err_is 400 invalid_request_error
check error_names_param py "d['error']['param']=='temperature'"
req POST /v1/completions '{"prompt":"x","top_p":"NaN"}'
check nan_string_400 err_is 400 invalid_request_error
req POST /v1/completions '{"prompt":"x","temperature":NaN}'
check nan_literal_400 err_is 400 invalid_request_error
req POST /v1/completions '{"prompt":"x","max_tokens":1000000000000}'
check huge_max_tokens_400 err_is 400 invalid_request_error
req POST /v1/completions '{"prompt":"x","max_tokens":-5}'
check negative_max_tokens_400 err_is 400 invalid_request_error
req POST /v1/completions '{"prompt":"x","n":129}'
check n_over_128_400 err_is 400 invalid_request_error
check n_over_128_param py "d['error']['param']=='n'"
req POST /v1/completions "{\"prompt\":\"$(head -c 300 /dev/zero | tr '\0' a)\"}"
check prompt_too_long_400 err_is 400 invalid_request_error
check prompt_too_long_code py "d['error']['code']=='context_length_exceeded'"
req POST /v1/chat/completions '{"messages":[]}'
check empty_messages_400 err_is 400 invalid_request_error
req POST /v1/chat/completions '{"messages":[{"role":"wizard","content":"x"}]}'
check bad_role_400 err_is 400 invalid_request_error
req GET /v1/completions
check wrong_method_405 err_is 405 invalid_request_error
req GET /v1/nothing
check unknown_route_404 err_is 404 invalid_request_error
printf '{"prompt":"%s"}' "$(head -c 2000000 /dev/zero | tr '\0' a)" >"$D/big.json"
CODE=$(curl -s -o "$D/body" -w '%{http_code}' -H 'Content-Type: application/json' --data-binary @"$D/big.json" "http://127.0.0.1:$PORT/v1/completions")
check body_too_large_413 err_is 413 invalid_request_error
req GET /health
check still_serving py "d['status']=='ok'"
stop_server

# ---- API key ----
start_server --api-key 's3cret-key' || { fail start_server_key; exit 1; }
req GET /v1/models
check no_key_401 err_is 401 authentication_error
req GET /v1/models "" -H 'Authorization: Bearer wrong'
check wrong_key_401 err_is 401 authentication_error
req GET /v1/models "" -H 'Authorization: Bearer s3cret-ke'
check prefix_key_401 err_is 401 authentication_error
req GET /v1/models "" -H 'Authorization: Bearer s3cret-key'
check right_key_200 py "d['data'][0]['id']=='tiny'"
req POST /v1/completions '{"prompt":"x","max_tokens":2}' -H 'Authorization: Bearer s3cret-key'
check right_key_completion py "d['usage']['completion_tokens']<=2"
req GET /health
check health_without_key py "d['status']=='ok'"
req GET /metrics
check metrics_text grep -q '^kiln_http_requests_total{route="models",code="401"} 3$' "$D/body"
stop_server
exit 0
