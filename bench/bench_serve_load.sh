#!/usr/bin/env bash
# bench/bench_serve_load.sh — kiln serve under load, loopback only, bounded
# (about 2 x BENCH_SECONDS + 15 s). The benchmark model
# (configs/bench-gpt2-30m.json, random weights, `kiln init`), the bytes
# tokenizer, `kiln serve` with its default flags. Prints:
#   - 32 streaming clients for 20 s on the idle machine, then again while a
#     CPU-bound process (a shell busy loop) runs: errors, requests/s,
#     generated tokens/s, time to first token p50/p99, and the busy/idle
#     ratios;
#   - prefix caching: the time to first token of a chat's second turn (the
#     first turn's messages, its answer and one more user message) when the
#     first turn was served just before (its KV cache reused) and for the
#     same-length second turn of a conversation the server never saw
#     (prefilled in full); medians of 7 each, in the same run.
# BENCH_CLIENTS, BENCH_SECONDS (capped at 64 and 60) change the run; KILN
# the binary (default build/kiln).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
KILN=${KILN:-$root/build/kiln}
CLIENTS=${BENCH_CLIENTS:-32}
SECS=${BENCH_SECONDS:-20}
[ "$CLIENTS" -gt 64 ] && CLIENTS=64
[ "$SECS" -gt 60 ] && SECS=60
PY=${PYTHON:-python3}
W=$(mktemp -d /tmp/kiln-bench-serve.XXXXXX)
SPID="" BUSY=""
cleanup() {
  [ -n "$BUSY" ] && kill "$BUSY" 2>/dev/null
  [ -n "$SPID" ] && kill "$SPID" 2>/dev/null && wait "$SPID" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
"$KILN" init --config "$root/configs/bench-gpt2-30m.json" --out "$W/model" --force >/dev/null || exit 1
"$KILN" serve --model "$W/model" --tokenizer bytes --port 0 --log-format off >"$W/serve.log" 2>&1 &
SPID=$!
PORT=""
for _ in $(seq 600); do
  PORT=$(sed -n 's/.*listening on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$W/serve.log")
  [ -n "$PORT" ] && break
  kill -0 "$SPID" 2>/dev/null || break
  sleep 0.05
done
[ -n "$PORT" ] || { cat "$W/serve.log"; exit 1; }
head -1 "$W/serve.log"

cat >"$W/load.py" <<'EOF'
# load.py PORT CLIENTS SECONDS LABEL OUT: streaming clients, each sending
# completions (max_tokens 32, ignore_eos) back to back until SECONDS pass
import http.client, json, sys, threading, time
port, clients, secs, label, out = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
lock = threading.Lock()
ttft, ok, err, toks = [], [0], [0], [0]
def one(k, i):
    body = json.dumps({"prompt": "Client %d asks question %d about the weather today." % (k, i),
                       "max_tokens": 32, "temperature": 0.8, "seed": k * 1000 + i,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.time()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        r.read(); c.close(); return None
    first, n, done = None, 0, False
    for line in r:
        if not line.startswith(b"data: "): continue
        d = line[6:].strip()
        if d == b"[DONE]": done = True; break
        ev = json.loads(d)
        if ev["choices"] and ev["choices"][0]["text"] and first is None: first = time.time() - t0
        if ev.get("usage"): n = ev["usage"]["completion_tokens"]
    c.close()
    return (first, n) if done and first is not None and n == 32 else None
def worker(k, end):
    i = 0
    while time.time() < end:
        try: res = one(k, i)
        except Exception: res = None
        with lock:
            if res: ok[0] += 1; ttft.append(res[0]); toks[0] += res[1]
            else: err[0] += 1
        i += 1
t0 = time.time(); end = t0 + secs
ts = [threading.Thread(target=worker, args=(k, end)) for k in range(clients)]
[t.start() for t in ts]; [t.join() for t in ts]
el = time.time() - t0
ttft.sort()
q = lambda p: ttft[min(len(ttft) - 1, int(p * len(ttft)))] * 1000 if ttft else float("nan")
res = {"label": label, "clients": clients, "secs": el, "ok": ok[0], "errors": err[0],
       "rps": ok[0] / el, "tps": toks[0] / el, "p50": q(0.5), "p99": q(0.99)}
print("%-5s %d streaming clients, %.1f s: %d requests ok, %d errors; %.1f requests/s; %.0f tokens/s; TTFT p50 %.0f ms, p99 %.0f ms"
      % (label, clients, el, ok[0], err[0], res["rps"], res["tps"], res["p50"], res["p99"]))
json.dump(res, open(out, "w"))
EOF

cat >"$W/prefix.py" <<'EOF'
# prefix.py PORT: a chat's second turn, its first turn served just before
# (cached) or never seen (full prefill); the same lengths, medians of 7
import http.client, json, statistics, sys, time
port = int(sys.argv[1])
def chat(msgs, stream):
    body = {"messages": msgs, "max_tokens": 16 if not stream else 4, "temperature": 0,
            "logit_bias": {"65": 100}, "stream": stream}
    if stream: body["stream_options"] = {"include_usage": True}
    t0 = time.time()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if not stream:
        d = json.loads(r.read()); c.close(); return d["choices"][0]["message"]["content"], None, None
    first, cached = None, None
    for line in r:
        if not line.startswith(b"data: ") or line[6:].strip() == b"[DONE]": continue
        ev = json.loads(line[6:])
        if ev["choices"] and ev["choices"][0]["delta"].get("content") and first is None: first = time.time() - t0
        if ev.get("usage"): cached = (ev["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0); pt = ev["usage"]["prompt_tokens"]
    c.close()
    return None, first, (cached, pt)
def convo(k):
    sysm = "Chat %02d. Bakery assistant." % k   # (the model's context is 256 tokens)
    return [{"role": "system", "content": sysm}, {"role": "user", "content": "When do you open on Sunday?"}]
hit, miss, info = [], [], {}
for k in range(7):
    m = convo(2 * k)
    ans, _, _ = chat(m, False)                      # turn 1 (fills the cache)
    _, t, c = chat(m + [{"role": "assistant", "content": ans}, {"role": "user", "content": "And Monday?"}], True)
    hit.append(t * 1000); info["hit"] = c
    m = convo(2 * k + 1)                            # never seen: full prefill
    _, t, c = chat(m + [{"role": "assistant", "content": ans}, {"role": "user", "content": "And Monday?"}], True)
    miss.append(t * 1000); info["miss"] = c
h, mi = statistics.median(hit), statistics.median(miss)
print("prefix cache: second turn of a chat (%d prompt tokens), TTFT median of 7: %.1f ms with the first turn cached (%d tokens reused), %.1f ms never seen (%d reused); %.2fx"
      % (info["hit"][1], h, info["hit"][0], mi, info["miss"][0], mi / h))
EOF

# a short warm-up (first-touch of the weights and caches)
"$PY" "$W/load.py" "$PORT" 4 2 warm "$W/warm.json" >/dev/null
"$PY" "$W/load.py" "$PORT" "$CLIENTS" "$SECS" idle "$W/idle.json"
# the CPU-bound neighbour: a busy loop for the duration
bash -c 'while :; do :; done' &
BUSY=$!
"$PY" "$W/load.py" "$PORT" "$CLIENTS" "$SECS" busy "$W/busy.json"
kill "$BUSY" 2>/dev/null; wait "$BUSY" 2>/dev/null; BUSY=""
"$PY" - "$W/idle.json" "$W/busy.json" <<'EOF'
import json, sys
i, b = (json.load(open(p)) for p in sys.argv[1:3])
print("busy/idle: requests/s %.2f, tokens/s %.2f, TTFT p50 %.2f, p99 %.2f; errors %d idle, %d busy"
      % (b["rps"] / i["rps"], b["tps"] / i["tps"], b["p50"] / i["p50"], b["p99"] / i["p99"], i["errors"], b["errors"]))
EOF
"$PY" "$W/prefix.py" "$PORT"
