#!/usr/bin/env bash
# t_serve_load.sh — a bounded loopback load test of kiln serve: C
# concurrent clients (default 24) send a mix of streamed and non-streamed
# completions and chat completions for a fixed duration (default 4 s).
# Passes when no request failed, every stream ended with [DONE], the
# server is still healthy, and its resident memory after the load (once
# idle) is back within 16 MiB of its warmed-up baseline. Prints requests/s,
# generated tokens/s and p50/p99 time to first token (the figures in
# docs/serving.md). Under `make asan` the same test runs on the sanitizer
# build. LOAD_CLIENTS / LOAD_SECONDS override the bounds (capped at 64 and
# 30). Loopback only; the server is killed on exit.
set -u
D="$KILN_TMP/t_serve_load"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
PY=/usr/bin/python3
if [ ! -x "$PY" ] || ! command -v curl >/dev/null; then
  echo "SKIP serve_load: needs /usr/bin/python3 and curl"; exit 0
fi
CLIENTS=${LOAD_CLIENTS:-24}; [ "$CLIENTS" -gt 64 ] && CLIENTS=64
SECS=${LOAD_SECONDS:-4}; [ "$SECS" -gt 30 ] && SECS=30
MODEL=${LOAD_MODEL:-}
if [ -z "$MODEL" ]; then
  cat >"$D/m.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 257, "n_positions": 256}
EOF
  "$KILN" init --config "$D/m.json" --out "$D/load-model" --force >/dev/null || { echo "FAIL init"; exit 1; }
  MODEL="$D/load-model"
fi
SERVE_TOKENIZER="${LOAD_TOKENIZER:-bytes}" serve_start "$MODEL" --parallel 8 --max-queue 256 --name load \
  ${LOAD_SERVE_ARGS:---threads 1} || { echo "FAIL serve_start"; exit 1; }
rss() { awk '/^VmRSS/ {print $2}' "/proc/$SPID/status"; }

"$PY" - "$PORT" "$CLIENTS" "$SECS" "$SPID" <<'EOF'
import http.client, json, sys, threading, time, traceback

port, clients, secs, pid = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]

def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024.0
    return 0.0

def one(i, stream):
    chat = i % 2 == 0
    body = {"max_tokens": 8 + (i % 4) * 8, "temperature": 0.8, "seed": i, "stream": stream}
    if chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": "request %d: tell me something" % i}]
    else:
        path = "/v1/completions"
        body["prompt"] = "request %d:" % i
    if stream:
        body["stream_options"] = {"include_usage": True}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t0 = time.monotonic()
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError("status %d: %s" % (r.status, r.read()[:200]))
    ttft, toks = None, 0
    if stream:
        done = False
        buf = b""
        while True:
            chunk = r.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                assert ev.startswith(b"data: "), ev[:50]
                data = ev[6:]
                if data == b"[DONE]":
                    done = True
                    continue
                d = json.loads(data)
                if d.get("usage"):
                    toks = d["usage"]["completion_tokens"]
                if d["choices"] and ttft is None:
                    ch = d["choices"][0]
                    if ch.get("text") or (ch.get("delta") or {}).get("content"):
                        ttft = time.monotonic() - t0
        if not done:
            raise RuntimeError("stream ended without [DONE]")
    else:
        d = json.loads(r.read())
        toks = d["usage"]["completion_tokens"]
        ttft = None
    c.close()
    return ttft, toks

# warm up, then the baseline; a warm-up that fails is a failed test
try:
    for i in range(8):
        one(i, i % 2 == 0)
except Exception:
    traceback.print_exc()
    print("FAIL load_warm_up: a warm-up request failed (traceback above)")
    sys.exit(1)
time.sleep(0.5)
base = rss()
stats = {"ok": 0, "fail": 0, "toks": 0, "ttft": [], "errors": []}
lock = threading.Lock()
deadline = time.monotonic() + secs

def worker(w):
    n = 0
    while time.monotonic() < deadline:
        try:
            ttft, toks = one(w * 1000 + n, n % 2 == 0)
            with lock:
                stats["ok"] += 1
                stats["toks"] += toks
                if ttft is not None:
                    stats["ttft"].append(ttft)
        except Exception as e:
            with lock:
                stats["fail"] += 1
                stats["errors"].append(repr(e)[:200])
        n += 1

t0 = time.monotonic()
th = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
for t in th: t.start()
for t in th: t.join()
el = time.monotonic() - t0
peak = rss()
time.sleep(1.0)
after = rss()
tt = sorted(stats["ttft"])
p = lambda q: tt[min(len(tt) - 1, int(q * len(tt)))] * 1000 if tt else float("nan")
print("load: %d clients, %.1f s: %d requests ok, %d failed; %.1f requests/s; %.0f generated tokens/s; "
      "TTFT p50 %.0f ms, p99 %.0f ms; RSS %.1f MiB before, %.1f MiB at the end, %.1f MiB after 1 s idle"
      % (clients, el, stats["ok"], stats["fail"], stats["ok"] / el, stats["toks"] / el, p(0.5), p(0.99),
         base, peak, after))
for e in stats["errors"][:5]:
    print("  error:", e)
print(("PASS" if stats["fail"] == 0 and stats["ok"] >= clients else "FAIL") + " load_no_failures")
import os
if os.environ.get("KILN_SANITIZE") == "1":
    print("SKIP load_memory_back_to_baseline: the sanitizer build keeps freed memory in its quarantine "
          "(leaks are checked by LeakSanitizer at the server's exit instead)")
else:
    print(("PASS" if after <= base + 16 else "FAIL") + " load_memory_back_to_baseline")
EOF
rc=$?
# the driver's own checks vanish when it crashes: its status is a check too
[ $rc -eq 0 ] || echo "FAIL load_driver: the Python load driver exited with status $rc"
[ "$(curl -s -m 5 "http://127.0.0.1:$PORT/health")" = '{"status":"ok"}' ] && echo "PASS load_server_healthy" || echo "FAIL load_server_healthy"
curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^kiln_(slots_active|queue_depth|generation_tokens_total) ' | sed 's/^/  /'
stop_checked
exit 0
