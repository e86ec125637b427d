#!/usr/bin/env bash
# t_serve_deploy.sh — kiln serve for real deployments (issue 22): a busy
# port is an error, unsupported OpenAI parameters (functions, function_call,
# best_of, suffix) and out-of-vocabulary
# ids get 400s naming the field, the API key's scheme is case-insensitive
# and an empty key is refused, NUL characters in chat content count,
# special tokens stay out of the text, a burst of hostile requests gives its
# memory back, the connection limits hold (floods, slow senders, a stalled
# chunked body gets a JSON 408, a per-client share). A tiny random model
# with the bytes tokenizer. Loopback only; servers are killed on exit. The
# HTTP layer's own errors and chunked framing: t_serve_http.sh.
set -u
D="$KILN_TMP/t_serve_deploy"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
serve_needs serve_deploy
serve_tiny_gpt2

start_server() { serve_start "$D/tiny" --threads 1 "$@"; } # ARGS...: SPID, PORT
. "$KILN_ROOT/tests/lib_http.sh"

# ---- a busy port is an error, not a second server sharing it ----
start_server || { fail start_server; exit 1; }
timeout 10 "$KILN" serve --model "$D/tiny" --tokenizer bytes --port "$PORT" --threads 1 >"$D/second.log" 2>&1 &
SPID2=$!
wait "$SPID2"; rc=$?; SPID2=""
DETAIL="status $rc: $(head -c 300 "$D/second.log")"
check port_in_use_fails test "$rc" -ne 0 -a "$rc" -ne 124
check port_in_use_message grep -q "address already in use.*$PORT\|$PORT.*address already in use" "$D/second.log"
req GET /health
check first_server_still_serves py "d['status']=='ok'"

# ---- unsupported OpenAI parameters: a 400 naming them, not a plain 200 ----
# (response_format, tools and tool_choice are supported now: t_serve_structured.sh;
# tool_choice "auto" is its 400 there)
for pb in 'functions:[{"name":"f"}]' 'function_call:{"name":"f"}'; do
  p=${pb%%:*}; v=${pb#*:}
  req POST /v1/chat/completions "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":2,\"$p\":$v}"
  check "unsupported_${p}_400 ($v)" err_is 400 unsupported_parameter "'$p'"
done
for pb in 'best_of:3' 'suffix:"tail"'; do
  p=${pb%%:*}; v=${pb#*:}
  req POST /v1/completions "{\"prompt\":\"x\",\"max_tokens\":2,\"$p\":$v}"
  check "unsupported_${p}_400 ($v)" err_is 400 unsupported_parameter "'$p'"
done
# the defaults spelled out are fine
req POST /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"max_tokens":2,"response_format":{"type":"text"},"tools":[],"tool_choice":"none"}'
DETAIL="$CODE $(head -c 200 "$D/body")"
check default_params_200 [ "$CODE" = 200 ]
req POST /v1/completions '{"prompt":"x","max_tokens":2,"best_of":1,"suffix":null}'
DETAIL="$CODE $(head -c 200 "$D/body")"
check default_best_of_200 [ "$CODE" = 200 ]

# ---- out-of-vocabulary ids: invalid_value naming the field ----
req POST /v1/completions '{"prompt":"x","max_tokens":2,"logit_bias":{"257":5}}'
check oov_logit_bias_400 err_is 400 invalid_value "'logit_bias'"
req POST /v1/completions '{"prompt":"x","max_tokens":2,"logit_bias":{"99999":5}}'
check oov_logit_bias_far_400 err_is 400 invalid_value "'logit_bias'"
req POST /v1/completions '{"prompt":[72,257],"max_tokens":2}'
check oov_prompt_400 err_is 400 invalid_value "'prompt'"
req POST /v1/completions '{"prompt":[72,100000],"max_tokens":2}'
check oov_prompt_far_400 err_is 400 invalid_value "'prompt'"
req POST /v1/completions '{"prompt":[72,256],"max_tokens":2,"logit_bias":{"256":-1}}'
DETAIL="$CODE $(head -c 200 "$D/body")"
check last_token_id_ok [ "$CODE" = 200 ]

# ---- the API key: an empty one is refused, the scheme is case-insensitive ----
timeout 10 "$KILN" serve --model "$D/tiny" --tokenizer bytes --port 0 --threads 1 --api-key "" >"$D/empty.log" 2>&1
rc=$?
DETAIL="status $rc: $(head -c 300 "$D/empty.log")"
check empty_api_key_refused test "$rc" -ne 0 -a "$rc" -ne 124
check empty_api_key_names_flag grep -q -- '--api-key' "$D/empty.log"
stop_checked
start_server --api-key 'k3y-123' || { fail start_server_key; exit 1; }
for scheme in Bearer bearer BEARER 'bearer  '; do
  req GET /v1/models "" -H "Authorization: $scheme k3y-123"
  DETAIL="$CODE $(head -c 200 "$D/body")"
  check "key_scheme_${scheme// /_}_200" [ "$CODE" = 200 ]
done
for h in 'Basic k3y-123' 'bearerk3y-123' 'bearer k3y-12' 'bearer'; do
  req GET /v1/models "" -H "Authorization: $h"
  check "bad_auth_401 ($h)" err_is 401 invalid_api_key
done

# ---- NUL characters in chat content count (JSON strings carry their length) ----
chat_pt() { # CONTENT-JSON -> prompt_tokens of a one-message chat
  req POST /v1/chat/completions "{\"messages\":[{\"role\":\"user\",\"content\":$1}],\"max_tokens\":1}" -H "Authorization: Bearer k3y-123"
  "$PY" -c "import json;print(json.load(open('$D/body'))['usage']['prompt_tokens'])" 2>/dev/null
}
A=$(chat_pt '"ab"'); B=$(chat_pt '"a\u0000b"'); C=$(chat_pt '[{"type":"text","text":"a\u0000b"}]')
DETAIL="ab=$A a\\0b=$B parts=$C"
check chat_nul_counts test -n "$A" -a "$B" = "$((A + 1))" -a "$C" = "$((A + 1))"

# ---- special tokens add no text unless skip_special_tokens is false ----
# logit_bias pins every step to <|endoftext|> (256); ignore_eos keeps going
SP='{"prompt":"Hi","max_tokens":4,"ignore_eos":true,"logit_bias":{"256":100}'
req POST /v1/completions "$SP}" -H "Authorization: Bearer k3y-123"
DETAIL="$CODE $(head -c 300 "$D/body")"
check special_skipped py "d['choices'][0]['text']=='' and d['usage']['completion_tokens']==4"
req POST /v1/completions "$SP,\"skip_special_tokens\":false}" -H "Authorization: Bearer k3y-123"
DETAIL="$CODE $(head -c 300 "$D/body")"
check special_kept_on_request py "d['choices'][0]['text']=='<|endoftext|>'*4"
curl -sN -m 10 -H 'Authorization: Bearer k3y-123' -d "$SP,\"stream\":true}" "http://127.0.0.1:$PORT/v1/completions" >"$D/sp.txt"
DETAIL=$(head -c 300 "$D/sp.txt")
check special_skipped_stream "$PY" -c "
import json,sys; ev=[e[6:] for e in open('$D/sp.txt').read().split('\n\n') if e.startswith('data: {')]
sys.exit(''.join(json.loads(e)['choices'][0]['text'] for e in ev if json.loads(e)['choices']) != '')"
req POST /v1/completions "$SP,\"skip_special_tokens\":1}" -H "Authorization: Bearer k3y-123"
check skip_special_type_400 err_is 400 invalid_type "'skip_special_tokens'"

# ---- resident memory comes back after a burst of large hostile requests ----
# 24 clients x 6 requests of ~1 MB (invalid JSON, over-long prompts, huge
# token-id arrays, a deep nest): RSS after 2 s idle within 10% of the
# warmed-up baseline
stop_checked
start_server || { fail start_server_rss; exit 1; }
cat >"$D/rss.py" <<'EOF'
import http.client, json, sys, threading, time
port, pid, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) / 1024
def post(body, path="/v1/completions"):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse(); r.read(); c.close(); return r.status
    except Exception as e:
        return type(e).__name__
for _ in range(20):
    post(json.dumps({"prompt": "Hello", "max_tokens": 8}))
    post(json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}), "/v1/chat/completions")
time.sleep(1.5)
base = rss()
big = "a" * 1000000
bodies = [(b'{"prompt":"' + big.encode() + b'"', "/v1/completions"),
          (json.dumps({"prompt": big, "max_tokens": 2}).encode(), "/v1/completions"),
          (json.dumps({"messages": [{"role": "user", "content": big}]}).encode(), "/v1/chat/completions"),
          (json.dumps({"prompt": [1] * 150000}).encode(), "/v1/completions"),
          (b"[" * 500000, "/v1/completions")]
codes = {}
lock = threading.Lock()
def worker(k):
    for i in range(6):
        b, p = bodies[(k + i) % len(bodies)]
        s = post(b, p)
        with lock: codes[s] = codes.get(s, 0) + 1
ts = [threading.Thread(target=worker, args=(k,)) for k in range(24)]
[t.start() for t in ts]
peak = 0
while any(t.is_alive() for t in ts):
    peak = max(peak, rss()); time.sleep(0.05)
[t.join() for t in ts]
time.sleep(2)
idle = rss()
open(out, "w").write("%.1f %.1f %.1f %s\n" % (base, peak, idle, json.dumps(codes)))
EOF
if [ "${KILN_SANITIZE:-}" = 1 ]; then
  echo "SKIP rss_back_after_hostile_burst: the sanitizer build keeps freed memory in its quarantine"
else
  "$PY" "$D/rss.py" "$PORT" "$SPID" "$D/rss.out"
  DETAIL="baseline, peak, after 2 s idle (MiB), statuses: $(cat "$D/rss.out")"
  echo "rss: $DETAIL"
  check rss_back_after_hostile_burst awk '$1 > 0 && $3 <= 1.10 * $1 && $4 == "{\"400\":" && $5 == "144}" {ok=1} END {exit !ok}' "$D/rss.out"
fi

# ---- the connection limits (the HTTP layer's errors and chunked framing: t_serve_http.sh) ----
stop_checked
start_server --max-connections 8 || { fail start_server_limits; exit 1; }

# ---- more clients than --max-connections: refused or served, never stuck ----
# (libmicrohttpd 0.9.75 deadlocks when MHD_add_connection meets its own
# connection limit; the gate keeps below it)
cat >"$D/flood.py" <<'EOF'
import http.client, sys, threading
port, out = int(sys.argv[1]), sys.argv[2]
codes, lock = {}, threading.Lock()
def worker():
    for _ in range(4):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("POST", "/v1/completions", body=b'{"prompt":"' + b"a" * 200000 + b'"}')
            s = c.getresponse().status
        except Exception as e:
            s = type(e).__name__
        with lock: codes[s] = codes.get(s, 0) + 1
ts = [threading.Thread(target=worker) for _ in range(32)]
[t.start() for t in ts]; [t.join() for t in ts]
open(out, "w").write(" ".join("%s:%d" % kv for kv in sorted(codes.items(), key=str)) + "\n")
EOF
timeout 60 "$PY" "$D/flood.py" "$PORT" "$D/flood.out"
DETAIL=$(cat "$D/flood.out")
check flood_answered_400_or_503 grep -qE '^((400|503):[0-9]+ ?)+$' "$D/flood.out"
# (the flood's last connections are counted until their threads close: allow 2 s)
for _ in $(seq 20); do
  C=$(curl -s -m 3 -o "$D/body" -w '%{http_code}' "http://127.0.0.1:$PORT/health")
  [ "$C" = 200 ] && break
  sleep 0.1
done
check flood_then_health [ "$C" = 200 ]

# a chunked body that stalls half-way (no byte for 10 s) gets a JSON 408
# from the relay; it runs beside the next checks and is read after the
# slow senders' (which take longer than 10 s)
"$PY" "$D/parts.py" "$PORT" "$D/stalled" --wait 15 "$CH"'e\r\n{"prompt":"a"}\r\n5\r\nab' &
STALLED=$!

# ---- a chunked body over --max-body is refused when it passes the limit ----
# 1.1 MB in one chunk (the limit is 1 MiB), then the body never ends: the
# 413 must come anyway, within 3 s
"$PY" - "$PORT" "$D/chunk413" <<'EOF'
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.settimeout(3)
buf = b""
try:
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    n = 1100000
    s.sendall(b"%x\r\n" % n + b'{"prompt":"' + b"a" * (n - 11) + b"\r\n")
    end = time.time() + 3
    while time.time() < end and b"\r\n\r\n" not in buf:
        c = s.recv(65536)
        if not c: break
        buf += c
    time.sleep(0.2)
    buf += s.recv(65536)
except (socket.timeout, OSError):
    pass
open(sys.argv[2], "wb").write(buf)
EOF
cp "$D/chunk413" "$D/raw"
check chunked_413_before_body_ends raw_json_err 413

# ---- slow senders: a head deadline, and they do not take the connection limit ----
# 8 sockets (= --max-connections) trickle a header byte each second; /health
# must still answer promptly, and each trickler gets a 408 after the 10 s
# head deadline.
"$PY" - "$PORT" "$D/slow.out" <<'EOF' &
import socket, sys, time
port, out = int(sys.argv[1]), sys.argv[2]
req = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n"
socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
got = [b""] * 8
t0 = time.time()
for i in range(16):                       # at most 16 s
    for k, s in enumerate(socks):
        if got[k]: continue
        s.settimeout(0.01)
        try:
            s.send(req[i:i + 1])
            c = s.recv(4096)
            got[k] = c if c else b"closed"
        except socket.timeout: pass
        except OSError: got[k] = b"closed"
    if all(got): break
    time.sleep(1)
open(out, "w").write("%d %.1f\n" % (sum(g.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in g for g in got), time.time() - t0))
EOF
SLOW=$!
sleep 2.5
T0=$(date +%s.%N)
ok=1
for _ in 1 2 3; do [ "$(curl -s -m 3 "http://127.0.0.1:$PORT/health")" = '{"status":"ok"}' ] || ok=0; done
T1=$(date +%s.%N)
check slow_senders_health_served [ $ok = 1 ]
check slow_senders_health_fast awk -v a="$T0" -v b="$T1" 'BEGIN{exit !(b-a < 3)}'
wait $SLOW
DETAIL="$(cat "$D/slow.out" 2>/dev/null) (408s, seconds)"
check slow_senders_get_408 awk '$1 == 8 && $2 < 14 {ok=1} END {exit !ok}' "$D/slow.out"
wait $STALLED
cp "$D/stalled" "$D/raw"
check chunk_stalled_408_json raw_json_err 408

# ---- a per-client share of the connection limit ----
# 127.0.0.2 (loopback too) opens 8 connections with complete heads whose
# bodies never come; a client from 127.0.0.1 is still served, and the
# greedy client's connections past its share (3/4) are refused with 503.
"$PY" - "$PORT" "$D/share.out" <<'EOF' &
import socket, sys, time
port, out = int(sys.argv[1]), sys.argv[2]
socks, codes = [], []
for _ in range(8):
    try:
        s = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        socks.append(s)
    except OSError:
        pass
    time.sleep(0.1)
time.sleep(0.5)
for s in socks:
    s.settimeout(0.2)
    try:
        c = s.recv(4096)
        codes.append(c.split(b" ")[1].decode() if c.startswith(b"HTTP/") else "closed")
    except socket.timeout:
        codes.append("held")
    except OSError:
        codes.append("closed")
open(out, "w").write(" ".join(codes) + "\n")
time.sleep(3)
EOF
SHARE=$!
sleep 1.5
C=$(curl -s -m 3 -o "$D/body" -w '%{http_code}' "http://127.0.0.1:$PORT/health")
check per_client_share_others_served [ "$C" = 200 ]
wait $SHARE
DETAIL=$(cat "$D/share.out")
check per_client_share_capped grep -qx 'held held held held held held 503 503' "$D/share.out"
stop_checked
exit 0
