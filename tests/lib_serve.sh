# tests/lib_serve.sh — sourced (not run) by the server tests (t_serve*.sh,
# t_chat.sh). The caller sets D (its work directory) first. Gives:
#   pass NAME / fail NAME [WHY] / check NAME CMD...   (check appends $DETAIL)
#   serve_start MODEL_DIR [ARGS...]   kiln serve with the bytes tokenizer
#                                     (or $SERVE_TOKENIZER) on
#                                     a free loopback port: SPID, PORT; the
#                                     log in $D/serve.log; 1 when it did not
#                                     come up (the log is printed)
#   stop_checked                      SIGTERM: the server must exit 0 within
#                                     10 s with no sanitizer report
#   serve_needs NAME                  PY=/usr/bin/python3; SKIP NAME (exit 0)
#                                     without curl or python3
#   serve_tiny_gpt2                   $D/tiny: a random 2-layer gpt2 over
#                                     the 257 byte ids (exit 1 if init fails)
# and an EXIT trap that kills a server still running (SPID, SPID2).
SPID=""
SPID2=""
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1${2:+: $2}"; }
check() { local n=$1; shift; if "$@"; then pass "$n"; else fail "$n" "${DETAIL:-}"; fi; DETAIL=""; }

serve_cleanup() {
  [ -n "$SPID2" ] && kill "$SPID2" 2>/dev/null && wait "$SPID2" 2>/dev/null
  [ -n "$SPID" ] && kill "$SPID" 2>/dev/null && wait "$SPID" 2>/dev/null
}
trap serve_cleanup EXIT

serve_needs() {
  PY=/usr/bin/python3
  if ! command -v curl >/dev/null || [ ! -x "$PY" ]; then
    echo "SKIP $1: needs curl and /usr/bin/python3 (bash scripts/deps.sh installs them)"; exit 0
  fi
}

serve_tiny_gpt2() {
  cat >"$D/tiny.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 128}
EOF
  "$KILN" init --config "$D/tiny.json" --out "$D/tiny" --force >/dev/null || { fail init; exit 1; }
}

serve_start() {
  local model=$1; shift
  "$KILN" serve --model "$model" --tokenizer "${SERVE_TOKENIZER:-bytes}" --port 0 "$@" >"$D/serve.log" 2>&1 &
  SPID=$!
  PORT=""
  for _ in $(seq 400); do
    PORT=$(sed -n 's/.*listening on http:\/\/127\.0\.0\.1:\([0-9]*\).*/\1/p' "$D/serve.log" 2>/dev/null)
    [ -n "$PORT" ] && return 0
    kill -0 "$SPID" 2>/dev/null || break
    sleep 0.05
  done
  cat "$D/serve.log"; return 1
}

stop_checked() {
  kill "$SPID" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$SPID" 2>/dev/null; then
    kill -9 "$SPID"; wait "$SPID" 2>/dev/null; SPID=""
    echo "FAIL server_clean_exit: still running 10 s after SIGTERM (a deadlock?)"; return
  fi
  wait "$SPID"; local rc=$?; SPID=""
  if [ $rc -eq 0 ] && ! grep -q 'Sanitizer\|runtime error' "$D/serve.log"; then echo "PASS server_clean_exit"
  else echo "FAIL server_clean_exit: status $rc"; grep -A20 'Sanitizer\|runtime error' "$D/serve.log" | head -40; fi
}
