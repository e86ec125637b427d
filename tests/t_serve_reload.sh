#!/usr/bin/env bash
# t_serve_reload.sh — `kiln serve --model RUN` follows a training run
# (issue 22): it serves RUN/latest's checkpoint, and when training writes a
# newer one it loads it in the background and swaps it in without a
# restart (/props, /v1/models and /metrics report the step; the text is the
# new checkpoint's). A checkpoint that fails to load (a truncated weights
# file without checksums.json, a damaged one with it) is logged and counted, and the old
# weights keep serving; a good one after it is picked up again.
# A tiny run with the bytes tokenizer; loopback only.
set -u
D="$KILN_TMP/t_serve_reload"
rm -rf "$D"; mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
PY=/usr/bin/python3
if ! command -v curl >/dev/null || [ ! -x "$PY" ]; then
  echo "SKIP serve_reload: needs curl and /usr/bin/python3 (bash scripts/deps.sh installs them)"; exit 0
fi
awk 'BEGIN { for (i = 0; i < 400; i++) printf "the cat sat on the mat %d times\n", i }' >"$D/corpus.txt"
"$KILN" tokenize --tokenizer bytes --input "$D/corpus.txt" --out "$D/data" --quiet >/dev/null 2>&1 \
  || { fail reload_setup "kiln tokenize failed"; exit 1; }
cat >"$D/tiny.json" <<'J'
{"model_type": "gpt2", "vocab_size": 257, "n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64,
 "bos_token_id": 256, "eos_token_id": 256}
J
train() { # STEPS [ARGS...]: trains (or resumes) run to STEPS, a checkpoint at the end
  local n=$1; shift
  "$KILN" train --data "$D/data" --out "$D/run" --seq 32 --steps "$n" --save-every 1000 \
    --eval-every 0 --warmup 1 --lr 1e-2 --batch 8 --threads 1 --progress none "$@" >>"$D/train.log" 2>&1
}
train 20 --config "$D/tiny.json" || { fail reload_setup "kiln train failed: $(tail -3 "$D/train.log")"; exit 1; }

serve_start "$D/run" --threads 1 --watch-ms 100 || { fail reload_start; exit 1; }
U="http://127.0.0.1:$PORT"
# props FIELD: the checkpoint object's field in /props
props() { curl -s -m 5 "$U/props" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['checkpoint']['$1'])" 2>/dev/null; }
# wait_for FIELD VALUE: polls /props (up to 20 s) until the field has the value
wait_for() { for _ in $(seq 200); do [ "$(props "$1")" = "$2" ] && return 0; sleep 0.1; done; return 1; }
metric() { curl -s -m 5 "$U/metrics" | awk -v m="$1" '$1==m {print $2}'; }
# complete OUT: greedy completion of "the cat" with the first token's logprobs
complete() {
  curl -s -m 10 -H 'Content-Type: application/json' \
    -d '{"prompt":"the cat","max_tokens":12,"temperature":0,"logprobs":3}' "$U/v1/completions" >"$1"
}
text() { "$PY" -c "import json,sys; print('the cat' + json.load(open(sys.argv[1]))['choices'][0]['text'])" "$1"; }
gen() { "$KILN" generate --model "$1" --prompt "the cat" --max-tokens 12 --temperature 0 --quiet 2>&1; }

DETAIL="$(curl -s "$U/props")"
check serves_latest_step [ "$(props step)" = 20 -a "$(props name)" = step_00000020 ]
m=$(curl -s -m 5 "$U/v1/models")
DETAIL="$m"
check models_checkpoint_step "$PY" -c "import json,sys; d=json.loads(sys.argv[1])['data'][0]; sys.exit(0 if d['id'] == 'run' and d['checkpoint_step'] == 20 and d['checkpoint'] == 'step_00000020' else 1)" "$m"
check metrics_checkpoint_step [ "$(metric kiln_checkpoint_step)" = 20 ]
check startup_says_following grep -q "serving checkpoint step_00000020 of run .*following" "$D/serve.log"
complete "$D/c20.json"
t20=$(text "$D/c20.json"); g20=$(gen "$D/run/step_00000020")
DETAIL="served '$t20', checkpoint '$g20'"
check step20_text_is_checkpoints [ "$t20" = "$g20" -a ${#t20} -gt 8 ]

# training goes on: a newer checkpoint is picked up without a restart
train 60 --resume "$D/run" || { fail reload_train "resume failed: $(tail -3 "$D/train.log")"; exit 1; }
DETAIL="$(curl -s "$U/props")"
check reload_to_step60 wait_for step 60
check reload_counted [ "$(props reloads)" = 1 -a "$(metric kiln_checkpoint_reloads_total)" = 1 ]
check reload_logged grep -q "reloaded: now serving checkpoint step_00000060 (step 60" "$D/serve.log"
complete "$D/c60.json"
t60=$(text "$D/c60.json"); g60=$(gen "$D/run/step_00000060")
DETAIL="served '$t60', checkpoint '$g60'"
check step60_text_is_checkpoints [ "$t60" = "$g60" ]
DETAIL="$(head -c 400 "$D/c20.json") vs $(head -c 400 "$D/c60.json")"
DETAIL="'$t20' then '$t60'"
check step60_text_differs [ "$t20" != "$t60" ]
check step60_weights_differ "$PY" - "$D/c20.json" "$D/c60.json" <<'EOF'
import json, sys
a, b = (json.load(open(p))["choices"][0]["logprobs"]["top_logprobs"][0] for p in sys.argv[1:3])
sys.exit(0 if a != b else 1)
EOF

# a broken checkpoint: logged and counted, the old weights stay
bad() { # NAME --damaged|--truncated: a copy of step 60 named by latest, its weights file
  # damaged in place (same size: only checksums.json tells) or cut short with no checksums.json
  cp -r "$D/run/step_00000060" "$D/run/$1"
  if [ "$2" = --damaged ]; then
    "$PY" -c "import sys; f=open(sys.argv[1],'r+b'); f.seek(-64, 2); f.write(b'\\x7f' * 64)" "$D/run/$1/model.safetensors"
  else
    head -c 3000 "$D/run/step_00000060/model.safetensors" >"$D/run/$1/model.safetensors"
    rm -f "$D/run/$1/checksums.json"
  fi
  printf '%s\n' "$1" >"$D/run/latest.tmp" && mv "$D/run/latest.tmp" "$D/run/latest"
}
bad step_00000090 --damaged
DETAIL="$(curl -s "$U/props")"
check bad_checksum_counted wait_for reload_failures 1
check bad_checksum_keeps_step60 [ "$(props step)" = 60 ]
check bad_checksum_error_named "$PY" -c "import json,sys; e=json.load(sys.stdin)['checkpoint']['last_error']; sys.exit(0 if e.startswith('step_00000090: ') else 1)" < <(curl -s "$U/props")
check bad_checksum_logged grep -q "reload failed: cannot load checkpoint .*step_00000090: .*corrupted: CRC-32C.*; still serving step_00000060" "$D/serve.log"
bad step_00000091 --truncated
check bad_truncated_counted wait_for reload_failures 2
check bad_truncated_logged grep -q "reload failed: cannot load checkpoint .*step_00000091: " "$D/serve.log"
# a broken checkpoint is tried once, not at every look (--watch-ms 100):
# five looks later the count is still 2
sleep 0.6
check bad_not_retried [ "$(props reload_failures)" = 2 ]
check metrics_failures [ "$(metric kiln_checkpoint_reload_failures_total)" = 2 ]
complete "$D/c60b.json"
DETAIL="$(text "$D/c60b.json") vs $t60"
check bad_still_serves_step60 [ "$(text "$D/c60b.json")" = "$t60" ]

# the run goes on from step 60: the next good checkpoint is swapped in
rm -rf "$D/run/step_00000090" "$D/run/step_00000091"
printf 'step_00000060\n' >"$D/run/latest.tmp" && mv "$D/run/latest.tmp" "$D/run/latest"
train 80 --resume "$D/run" || { fail reload_train "resume failed: $(tail -3 "$D/train.log")"; exit 1; }
DETAIL="$(curl -s "$U/props")"
check recovers_to_step80 wait_for step 80
check recovered_error_cleared [ "$(props last_error)" = None -a "$(props reloads)" = 2 ]
complete "$D/c80.json"
t80=$(text "$D/c80.json"); g80=$(gen "$D/run/step_00000080")
DETAIL="served '$t80', checkpoint '$g80'"
check step80_text_is_checkpoints [ "$t80" = "$g80" -a "$t80" != "$t60" ]
stop_checked

# ---- the swap rule: a request running when the new weights are ready
# finishes on the old ones; one arriving then waits and runs on the new ----
# two checkpoints of a model with a long context (2000 tokens stream for
# far longer than a load takes), step 1 served, step 2 named by latest
# once the stream runs
cat >"$D/long.json" <<'J'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 2048}
J
mkdir -p "$D/lrun"
"$KILN" init --config "$D/long.json" --out "$D/lrun/step_00000001" --seed 1 >/dev/null &&
  "$KILN" init --config "$D/long.json" --out "$D/lrun/step_00000002" --seed 2 >/dev/null ||
  { fail swap_rule_setup; exit 1; }
echo step_00000001 >"$D/lrun/latest"
serve_start "$D/lrun" --threads 1 --watch-ms 50 || { fail swap_rule_start; exit 1; }
cat >"$D/inflight.py" <<'EOF'
import json, os, sys, threading, urllib.request
port, run, log, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
U = "http://127.0.0.1:%d" % port
def post(body, stream=False):
    req = urllib.request.Request(U + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(req, timeout=120)
def text(body):
    return json.load(post(body))["choices"][0]["text"]
LONG = {"prompt": "Hi", "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
SHORT = {"prompt": "Hello", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
ref_long, ref_short1 = text(LONG), text(SHORT)          # step 1, before anything
r = post(dict(LONG, stream=True))
got, flipped, during, late = "", False, None, {}
for line in r:
    line = line.decode().strip()
    if not line.startswith("data: "): continue
    if line == "data: [DONE]": break
    d = json.loads(line[6:])
    if d["choices"]: got += d["choices"][0]["text"]
    if not flipped:                                      # the stream runs: step 2 becomes latest
        with open(run + "/latest.tmp", "w") as f: f.write("step_00000002\n")
        os.rename(run + "/latest.tmp", run + "/latest")
        flipped = True
    if during is None and "it takes over when" in open(log).read():
        # the new engine waits: still step 1, and a new request waits for it
        during = json.load(urllib.request.urlopen(U + "/props"))["checkpoint"]["step"]
        th = threading.Thread(target=lambda: late.update(t=text(SHORT)))
        th.start()
if during is not None: th.join()
res = {"handed_over_during_stream": during is not None, "step_during": during,
       "inflight_same_as_step1": got == ref_long, "inflight_len": len(got),
       "late_text": late.get("t"), "step1_short": ref_short1}
res["step2_short"] = text(SHORT)
res["step_after"] = json.load(urllib.request.urlopen(U + "/props"))["checkpoint"]["step"]
json.dump(res, open(out, "w"))
EOF
"$PY" "$D/inflight.py" "$PORT" "$D/lrun" "$D/serve.log" "$D/inflight.json" 2>"$D/inflight.err"
DETAIL="$(cat "$D/inflight.json" "$D/inflight.err" 2>/dev/null | head -c 600)"
jq_() { "$PY" -c "import json,sys; d=json.load(open('$D/inflight.json')); sys.exit(0 if ($1) else 1)" 2>/dev/null; }
check swap_ready_during_stream jq_ "d['handed_over_during_stream'] and d['step_during'] == 1"
check inflight_finishes_on_old_weights jq_ "d['inflight_same_as_step1'] and d['inflight_len'] > 1000"
check arriving_request_waits_for_new jq_ "d['late_text'] == d['step2_short'] != d['step1_short'] and d['step_after'] == 2"
stop_checked
exit 0
