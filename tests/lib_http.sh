# tests/lib_http.sh — sourced (not run) by t_serve_deploy.sh and
# t_serve_http.sh after lib_serve.sh, with D, PY and PORT set. Gives:
#   req METHOD PATH [BODY] [curl args...]   CODE, body in $D/body, headers in $D/hdr
#   py EXPR                                 EXPR true of the JSON body d
#   err_is STATUS CODE PARAM                an OpenAI error with that status, code, param
#   raw SECS                                stdin over a raw socket, the reply in $D/raw
#   raw_json_err STATUS                     the raw reply is STATUS with a JSON error body
#   $D/parts.py PORT OUT [--wait S] [--shut] PART...   parts sent 0.3 s apart
#   CH                                      a chunked completion request's head
# req METHOD PATH [BODY] [curl args...]: CODE <- status, body in $D/body, headers in $D/hdr
req() {
  local m=$1 p=$2 b=${3-}
  shift 3 2>/dev/null || shift $#
  if [ -n "$b" ]; then
    CODE=$(curl -s -m 10 -o "$D/body" -D "$D/hdr" -w '%{http_code}' -X "$m" -H 'Content-Type: application/json' \
      --data-binary "$b" "$@" "http://127.0.0.1:$PORT$p")
  else
    CODE=$(curl -s -m 10 -o "$D/body" -D "$D/hdr" -w '%{http_code}' -X "$m" "$@" "http://127.0.0.1:$PORT$p")
  fi
}
py() { "$PY" -c "import json,sys; d=json.load(open('$D/body')); sys.exit(0 if ($1) else 1)" 2>/dev/null; }
# err_is STATUS CODE PARAM: an OpenAI error object with that status, code and param
err_is() {
  DETAIL="$CODE $(head -c 300 "$D/body")"
  [ "$CODE" = "$1" ] && py "set(d['error']) >= {'message','type','param','code'} and d['error']['code'] == '$2' and d['error']['param'] == ${3:-None} and len(d['error']['message']) > 10"
}
# raw SECS: sends stdin over a raw socket, the reply (status line, headers, body) in $D/raw
# (the client is a file: "python3 -" would read its program from the data)
cat >"$D/raw.py" <<'EOF'
import socket, sys, time
data = sys.stdin.buffer.read()
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
buf = b""
try:
    s.sendall(data)
    end = time.time() + float(sys.argv[2])
    while time.time() < end:
        c = s.recv(65536)
        if not c: break
        buf += c
except (socket.timeout, ConnectionError):
    pass
open(sys.argv[3], "wb").write(buf)
EOF
raw() { "$PY" "$D/raw.py" "$PORT" "${1:-5}" "$D/raw"; }
# raw_json_err STATUS: the raw reply is that status with an OpenAI JSON error body
raw_json_err() {
  DETAIL=$(head -c 300 "$D/raw")
  "$PY" - "$D/raw" "$1" <<'EOF'
import json, sys
b = open(sys.argv[1], "rb").read()
head, _, body = b.partition(b"\r\n\r\n")
lines = head.split(b"\r\n")
ok = lines[0].startswith(b"HTTP/1.1 " + sys.argv[2].encode() + b" ")
hdr = {l.split(b":", 1)[0].strip().lower(): l.split(b":", 1)[1].strip() for l in lines[1:] if b":" in l}
ok = ok and hdr.get(b"content-type", b"").startswith(b"application/json")
try:
    e = json.loads(body)["error"]
    ok = ok and set(e) >= {"message", "type", "param", "code"} and len(e["message"]) > 10
except Exception:
    ok = False
sys.exit(0 if ok else 1)
EOF
}
cat >"$D/parts.py" <<'EOF'
import socket, sys, time
# parts.py PORT OUT [--wait SECS] [--shut] PART...: sends the parts 0.3 s
# apart (escapes as in printf), --shut closes the sending side after the
# last; waits up to SECS (5) for each piece of the reply
port, out, rest = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
wait = 5.0
if rest[:1] == ["--wait"]:
    wait, rest = float(rest[1]), rest[2:]
shut = rest[:1] == ["--shut"]
parts = [p.encode().decode("unicode_escape").encode("latin1") for p in rest[shut:]]
s = socket.create_connection(("127.0.0.1", port))
s.settimeout(wait)
for i, p in enumerate(parts):
    if i: time.sleep(0.3)
    s.sendall(p)
if shut: s.shutdown(socket.SHUT_WR)
buf = b""
try:
    while True:
        c = s.recv(65536)
        if not c: break
        buf += c
except (socket.timeout, ConnectionError):
    pass
open(out, "wb").write(buf)
EOF
CH='POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n'
