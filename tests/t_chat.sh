#!/usr/bin/env bash
# t_chat.sh — `kiln chat` as a person uses it: Ctrl-C (SIGINT) during a
# reply stops that reply and the chat goes on; a conversation that
# outgrows the context drops its oldest turns and still answers the new
# message. Random models with the bytes tokenizer; every wait is bounded.
set -u
D="$KILN_TMP/t_chat"
mkdir -p "$D"
PY=/usr/bin/python3
. "$KILN_ROOT/tests/lib_serve.sh" # pass, fail, check
if [ ! -x "$PY" ]; then echo "SKIP chat: needs /usr/bin/python3"; exit 0; fi
cat >"$D/tiny.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 128}
EOF
cat >"$D/slow.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 6, "n_embd": 384, "n_head": 6, "vocab_size": 257, "n_positions": 2048}
EOF
"$KILN" init --config "$D/tiny.json" --out "$D/tiny" --force >/dev/null || { fail init; exit 1; }
"$KILN" init --config "$D/slow.json" --out "$D/slow" --force >/dev/null || { fail init_slow; exit 1; }

# ---- Ctrl-C stops the reply, not the chat ----
# greedy on this random model never ends a reply by itself (checked first),
# so a reply of 1500 tokens is still running when SIGINT comes
echo hi | timeout 60 "$KILN" chat --model "$D/slow" --tokenizer bytes --temperature 0 --max-tokens 200 \
  --threads 1 2>"$D/probe.err" >/dev/null
if ! grep -q '^\[200 tokens' "$D/probe.err"; then
  echo "SKIP chat_ctrl_c: greedy replies of this random model end early ($(tail -1 "$D/probe.err"))"
else
  "$PY" - "$KILN" "$D/slow" "$D/ctrlc.err" "$D/ctrlc.out" <<'EOF'
import os, select, signal, subprocess, sys, time
kiln, model, errf, outf = sys.argv[1:5]
p = subprocess.Popen([kiln, "chat", "--model", model, "--tokenizer", "bytes", "--temperature", "0",
                      "--max-tokens", "1500", "--threads", "1"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(errf, "w"))
res = []
def reply_then_sigint(msg):
    p.stdin.write(msg); p.stdin.flush()
    got, end = b"", time.time() + 20
    while len(got) < 20 and time.time() < end:
        r, _, _ = select.select([p.stdout], [], [], 0.5)
        if r:
            c = os.read(p.stdout.fileno(), 4096)
            if not c: break
            got += c
    p.send_signal(signal.SIGINT)
    time.sleep(1.0)
    return len(got) >= 20 and p.poll() is None
res.append(reply_then_sigint(b"hi\n"))
res.append(reply_then_sigint(b"and again\n"))
p.stdin.write(b"/exit\n"); p.stdin.flush()
try:
    rc = p.wait(timeout=20)
except subprocess.TimeoutExpired:
    p.kill(); rc = "hung"
open(outf, "w").write("%s %s %s\n" % (res[0], res[1], rc))
EOF
  DETAIL="$(cat "$D/ctrlc.out") / $(tr '\n' ' ' <"$D/ctrlc.err" | head -c 300)"
  check chat_ctrl_c_keeps_chat grep -qx 'True True 0' "$D/ctrlc.out"
  DETAIL=$(tr '\n' ' ' <"$D/ctrlc.err" | head -c 300)
  check chat_ctrl_c_reported test "$(grep -c 'stopped by Ctrl-C' "$D/ctrlc.err")" = 2
fi

# ---- a full context drops the oldest turns and answers ----
printf 'hello there\nhow are you today\nwhat is the time\nsay something\n' |
  timeout 60 "$KILN" chat --model "$D/tiny" --tokenizer bytes --temperature 0 --max-tokens 8 \
    --threads 1 >"$D/ovf.out" 2>"$D/ovf.err"
rc=$?
DETAIL="status $rc: $(tr '\n' ' ' <"$D/ovf.err" | head -c 400)"
check chat_overflow_every_message_answered test "$rc" = 0 -a "$(grep -c '^\[[0-9]* tokens' "$D/ovf.err")" = 4
check chat_overflow_drops_oldest grep -q 'dropped the [0-9]* oldest message' "$D/ovf.err"
check chat_overflow_no_error test "$(grep -c 'kiln chat:' "$D/ovf.err")" = 0
exit 0
