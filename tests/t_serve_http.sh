#!/usr/bin/env bash
# t_serve_http.sh — the HTTP layer's own errors are OpenAI JSON (issue 22):
# a malformed request line, a missing Host, a bad header or Content-Length,
# HTTP/2 (505), an over-long URI (414) or header (431), 405 with Allow; and
# chunked bodies with bad framing get a JSON 400 at any offset (the relay,
# src/serve/relay.c, decodes them all; past 80 KiB and 600 KiB too), good
# framing with extensions, trailers and bare LF is served. A tiny random
# model with the bytes tokenizer. Loopback only; the server is killed on
# exit. (Split from t_serve_deploy.sh, whose slow timing checks the relay's
# mutations need not wait for.)
set -u
D="$KILN_TMP/t_serve_http"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
serve_needs serve_http
serve_tiny_gpt2

start_server() { serve_start "$D/tiny" --threads 1 "$@"; } # ARGS...: SPID, PORT
. "$KILN_ROOT/tests/lib_http.sh"

# ---- errors of the HTTP layer are OpenAI JSON too ----
start_server --max-connections 8 || { fail start_server_http; exit 1; }
printf 'garbage\r\n\r\n' | raw 3
check malformed_request_line_json raw_json_err 400
printf 'GET /health HTTP/1.1\r\n\r\n' | raw 3
check missing_host_json raw_json_err 400
printf 'GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n' | raw 3
check malformed_header_json raw_json_err 400
printf 'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12x\r\n\r\n{}' | raw 3
check bad_content_length_json raw_json_err 400
printf 'GET /health HTTP/2.0\r\nHost: x\r\n\r\n' | raw 3
check http_version_505_json raw_json_err 505
{ printf 'GET /health?'; head -c 10000 /dev/zero | tr '\0' a; printf ' HTTP/1.1\r\nHost: x\r\n\r\n'; } | raw 3
check uri_too_long_414_json raw_json_err 414
{ printf 'GET /health HTTP/1.1\r\nHost: x\r\nX-Big: '; head -c 40000 /dev/zero | tr '\0' a; printf '\r\n\r\n'; } | raw 3
check headers_too_large_431_json raw_json_err 431
# chunked bodies: bad framing is an OpenAI error, in the first packet or a
# later one (kiln decodes every chunked body itself, relay.c;
# libmicrohttpd's own answer would be an HTML page)
chunk_err() { "$PY" "$D/parts.py" "$PORT" "$D/raw" "$@"; raw_json_err 400 && grep -q 'malformed_chunked_body' "$D/raw"; }
chunk_ok() { "$PY" "$D/parts.py" "$PORT" "$D/raw" "$@"; DETAIL=$(head -c 300 "$D/raw"); head -1 "$D/raw" | grep -q '^HTTP/1.1 200' && grep -q '"text_completion"' "$D/raw"; }
check chunk_size_not_hex_json chunk_err "$CH"'zz\r\n{"prompt":"a"}\r\n0\r\n\r\n'
check chunk_size_bad_in_later_packet_json chunk_err "$CH"'5\r\n{"pro\r\n' 'q;;\r\nxx\r\n0\r\n\r\n'
check chunk_data_longer_than_size_json chunk_err "$CH"'5\r\n{"prompt":"a"}\r\n0\r\n\r\n'
check chunk_size_overflow_json chunk_err "$CH"'10000000000000000\r\n'
check chunk_bad_trailer_json chunk_err "$CH"'e\r\n{"prompt":"a"}\r\n0\r\nno colon\r\n\r\n'
check chunk_body_cut_short_json chunk_err --shut "$CH"'e\r\n{"prompt":"a"}\r\n'
check chunk_good_ext_trailer_200 chunk_ok "$CH"'e;x=1\r\n{"prompt":"a"}\r\n0\r\nX-T: 1\r\n\r\n'
check chunk_good_split_200 chunk_ok "$CH"'9\r\n{"prompt"\r\n' '5\r\n:"a"}\r\n' '0\r\n\r\n'
check chunk_good_bare_lf_200 chunk_ok "$CH"'e\n{"prompt":"a"}\n0\n\n'
# bad framing at any offset is JSON too: after 80 KiB of good chunks (past
# what a gate could peek) and after 600 KiB (past any socket buffer); the
# same body with good framing to its end is served.
# bigchunk.py PORT OUT KIB TAIL: a completion whose "x" field is KIB 1-KiB
# chunks of spaces, then TAIL (escapes as in printf) sent 0.3 s later
cat >"$D/bigchunk.py" <<'EOF'
import socket, sys, time
port, out, kib, tail = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
first = b'{"prompt":"a","x":"'
body = b"%x\r\n%s\r\n" % (len(first), first) + (b"400\r\n" + b" " * 1024 + b"\r\n") * kib
s = socket.create_connection(("127.0.0.1", port))
s.settimeout(10)
buf = b""
try:
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n" + body)
    time.sleep(0.3)
    s.sendall(tail.encode().decode("unicode_escape").encode("latin1"))
    while True:
        c = s.recv(65536)
        if not c: break
        buf += c
except (socket.timeout, ConnectionError):
    pass
open(out, "wb").write(buf)
EOF
big_err() { "$PY" "$D/bigchunk.py" "$PORT" "$D/raw" "$@"; raw_json_err 400 && grep -q 'malformed_chunked_body' "$D/raw"; }
big_ok() { "$PY" "$D/bigchunk.py" "$PORT" "$D/raw" "$@"; DETAIL=$(head -c 300 "$D/raw"); head -1 "$D/raw" | grep -q '^HTTP/1.1 200' && grep -q '"text_completion"' "$D/raw"; }
check chunk_bad_size_past_80k_json big_err 80 'zz\r\n0\r\n\r\n'
check chunk_data_overrun_past_80k_json big_err 80 '2\r\n"}XY\r\n0\r\n\r\n'
check chunk_bad_trailer_past_600k_json big_err 600 '2;e=1\r\n"}\r\n0\r\nno colon\r\n\r\n'
check chunk_good_past_600k_200 big_ok 600 '2\r\n"}\r\n0\r\n\r\n'

req GET /v1/completions
check method_405_json err_is 405 method_not_allowed
DETAIL=$(cat "$D/hdr")
check method_405_allow_header grep -qi '^Allow: POST' "$D/hdr"
req POST /health '{}'
check method_405_allow_get grep -qi '^Allow: GET, HEAD' "$D/hdr"
stop_checked
