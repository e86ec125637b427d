#!/usr/bin/env bash
# t_serve_hostile.sh — kiln serve against hostile clients: truncated and
# oversized bodies (Content-Length and chunked), invalid UTF-8, deeply
# nested JSON, absurd numbers, garbage instead of HTTP, oversized headers,
# slow senders (slowloris) and slow readers, a client that disconnects
# mid-stream (its slot must be freed), and a full queue (503). Every case
# gets a clean error or a closed connection, and the server keeps serving
# others throughout. Loopback only; the server is killed on exit.
set -u
D="$KILN_TMP/t_serve_hostile"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
PY=/usr/bin/python3
if ! command -v curl >/dev/null || [ ! -x "$PY" ]; then
  echo "SKIP serve_hostile: needs curl and /usr/bin/python3"; exit 0
fi

cat >"$D/tiny.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 128}
EOF
# a model slow enough that a long generation outlives a client
cat >"$D/slow.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 6, "n_embd": 384, "n_head": 6, "vocab_size": 257, "n_positions": 2048}
EOF
"$KILN" init --config "$D/tiny.json" --out "$D/tiny" --force >/dev/null || { fail init; exit 1; }
"$KILN" init --config "$D/slow.json" --out "$D/slow" --force >/dev/null || { fail init_slow; exit 1; }

start_server() { local m=$1; shift; serve_start "$D/$m" --threads 1 "$@"; } # MODEL ARGS...
stop_server() { stop_checked; }
alive() { [ "$(curl -s -m 5 "http://127.0.0.1:$PORT/health")" = '{"status":"ok"}' ] && kill -0 "$SPID" 2>/dev/null; }
# raw NAME: sends stdin bytes over a raw socket (python below), prints the
# status code (or "closed"); argument 2 = seconds to wait for a reply
# (the client is a file: with "python3 -" the program itself would be stdin)
cat >"$D/raw.py" <<'EOF'
import socket, sys
data = sys.stdin.buffer.read()
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
try:
    s.sendall(data)
    buf = b""
    while b"\r\n" not in buf:
        c = s.recv(4096)
        if not c: break
        buf += c
    print(buf.split(b" ")[1].decode() if buf.startswith(b"HTTP/") else "closed")
except (socket.timeout, ConnectionError):
    print("closed")
EOF
raw() { "$PY" "$D/raw.py" "$PORT" "${1:-5}"; }
post() { # BODY-FILE -> status code, body in $D/body
  curl -s -m 10 -o "$D/body" -w '%{http_code}' -H 'Content-Type: application/json' \
    --data-binary @"$1" "http://127.0.0.1:$PORT/v1/completions"
}
is_err() { "$PY" -c "import json;d=json.load(open('$D/body'));exit(0 if d['error']['type'] else 1)" 2>/dev/null; }

start_server tiny --parallel 2 --max-body 65536 || { fail start; exit 1; }

# truncated body: Content-Length promises more than arrives, then close
printf 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt":"ab' | raw 2 >"$D/trunc.txt"
check truncated_body_no_answer grep -qx 'closed' "$D/trunc.txt"
check truncated_body_survives alive
# invalid UTF-8 inside a JSON string
printf '{"prompt":"ab\xff\xfecd","max_tokens":2}' >"$D/u.json"
C=$(post "$D/u.json")
check invalid_utf8_400 [ "$C" = 400 ]
check invalid_utf8_error_object is_err
printf '{"messages":[{"role":"user","content":"\xc3\x28"}]}' >"$D/u2.json"
C=$(curl -s -m 10 -o "$D/body" -w '%{http_code}' --data-binary @"$D/u2.json" "http://127.0.0.1:$PORT/v1/chat/completions")
check invalid_utf8_chat_400 [ "$C" = 400 ]
# deeply nested JSON (far beyond the parser's depth limit)
"$PY" -c "print('{\"prompt\":' + '['*20000 + ']'*20000 + '}')" >"$D/deep.json"
C=$(post "$D/deep.json")
check deep_nesting_400 [ "$C" = 400 ]
"$PY" -c "print('['*60000)" >"$D/deep2.json"
C=$(post "$D/deep2.json")
check deep_unclosed_400 [ "$C" = 400 ]
# numbers out of every range
nbad=0
for b in '{"prompt":"x","max_tokens":1e400}' '{"prompt":"x","temperature":1e308}' \
         '{"prompt":"x","top_k":-7}' '{"prompt":"x","seed":"abc"}' '{"prompt":"x","logprobs":99}' \
         '{"prompt":"x","logit_bias":{"99999":5}}' '{"prompt":"x","logit_bias":{"a":1}}' \
         '{"prompt":"x","stop":["a","b","c","d","e","f","g","h","i"]}' '{"prompt":{"a":1}}' \
         '{"prompt":[1,2,-3]}' '{"prompt":"x","frequency_penalty":-2.5}' '{"prompt":"x","stream":"yes"}'; do
  printf '%s' "$b" >"$D/n.json"
  C=$(post "$D/n.json")
  if [ "$C" != 400 ] || ! is_err; then fail "bad_params_400" "$b -> $C $(cat "$D/body")"; nbad=$((nbad+1)); fi
done
[ "$nbad" -eq 0 ] && pass bad_params_400_all
# NUL characters are valid JSON text
printf '{"prompt":"a\\u0000b","max_tokens":3}' >"$D/nul.json"
check nul_in_prompt_200 [ "$(post "$D/nul.json")" = 200 ]
# oversized: by Content-Length, and chunked without a length
head -c 100000 /dev/zero | tr '\0' 'a' | sed 's/^/{"prompt":"/; s/$/"}/' >"$D/big.json"
check content_length_413 [ "$(post "$D/big.json")" = 413 ]
C=$(curl -s -m 10 -o "$D/body" -w '%{http_code}' -H 'Transfer-Encoding: chunked' -H 'Content-Type: application/json' \
    --data-binary @"$D/big.json" "http://127.0.0.1:$PORT/v1/completions")
check chunked_413 [ "$C" = 413 ]
# garbage instead of HTTP; an enormous header
head -c 3000 /dev/urandom | raw 3 >"$D/garbage.txt"
check garbage_answered_400 grep -qx '400' "$D/garbage.txt"
check garbage_survives alive
{ printf 'GET /health HTTP/1.1\r\nHost: x\r\nX-Big: '; head -c 200000 /dev/zero | tr '\0' a; printf '\r\n\r\n'; } | raw 3 >"$D/hdr.txt"
check huge_header_rejected grep -qx '431' "$D/hdr.txt"
check huge_header_survives alive

# slowloris: headers trickle in while normal requests are served promptly
"$PY" - "$PORT" <<'EOF' &
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
for ch in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"prompt\":":
    try: s.send(bytes([ch]))
    except OSError: break
    time.sleep(0.05)
time.sleep(1)
EOF
SLOW=$!
T0=$(date +%s.%N)
printf '{"prompt":"Hi","max_tokens":4}' >"$D/ok.json"
ok=1
for _ in 1 2 3 4 5; do [ "$(post "$D/ok.json")" = 200 ] || ok=0; done
T1=$(date +%s.%N)
check slow_sender_others_served [ $ok = 1 ]
check slow_sender_others_fast awk -v a="$T0" -v b="$T1" 'BEGIN{exit !(b-a < 5)}'
wait $SLOW 2>/dev/null
# slow reader: a stream nobody reads does not block other requests
"$PY" - "$PORT" <<'EOF' &
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
body = b'{"prompt":"Hi","max_tokens":100,"stream":true,"ignore_eos":true}'
s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
time.sleep(2)
EOF
SLOWR=$!
sleep 0.3
check slow_reader_others_served [ "$(post "$D/ok.json")" = 200 ]
wait $SLOWR 2>/dev/null
check survives_all alive
stop_server

# ---- disconnect frees the slot; a full queue answers 503 ----
start_server slow --parallel 1 --max-queue 1 || { fail start_slow; exit 1; }
metric() { curl -s "http://127.0.0.1:$PORT/metrics" | awk -v m="$1" '$1==m {print $2}'; }
LONG='{"prompt":"Hi","max_tokens":1900,"ignore_eos":true,"stream":true}'
curl -sN -m 1.5 -d "$LONG" "http://127.0.0.1:$PORT/v1/completions" >"$D/partial.txt" 2>/dev/null
check partial_stream_received grep -q '^data: {' "$D/partial.txt"
freed=0
for _ in $(seq 50); do
  [ "$(metric kiln_slots_active)" = 0 ] && [ "$(metric kiln_requests_cancelled_total)" = 1 ] && { freed=1; break; }
  sleep 0.1
done
check disconnect_frees_slot [ $freed = 1 ]
printf '{"prompt":"Hi","max_tokens":3}' >"$D/short.json"
check served_after_disconnect [ "$(post "$D/short.json")" = 200 ]
# same for a non-streamed request whose client gives up
curl -s -m 1.5 -d '{"prompt":"Hi","max_tokens":1900,"ignore_eos":true}' "http://127.0.0.1:$PORT/v1/completions" >/dev/null 2>&1
freed=0
for _ in $(seq 50); do
  [ "$(metric kiln_slots_active)" = 0 ] && [ "$(metric kiln_requests_cancelled_total)" = 2 ] && { freed=1; break; }
  sleep 0.1
done
check disconnect_nonstream_frees_slot [ $freed = 1 ]
# queue: one running, one waiting, the third is refused with 503
curl -sN -m 4 -d "$LONG" "http://127.0.0.1:$PORT/v1/completions" >/dev/null 2>&1 &
A=$!
sleep 0.5
curl -sN -m 4 -d "$LONG" "http://127.0.0.1:$PORT/v1/completions" >/dev/null 2>&1 &
B=$!
sleep 0.5
C=$(post "$D/short.json")
check queue_full_503 [ "$C" = 503 ]
check queue_full_error_object "$PY" -c "import json;d=json.load(open('$D/body'));exit(d['error']['code']!='server_overloaded')"
wait $A $B 2>/dev/null
check survives_queue alive
stop_server
exit 0
