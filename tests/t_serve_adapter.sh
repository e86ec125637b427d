#!/usr/bin/env bash
# t_serve_adapter.sh — kiln serve --adapter NAME=DIR: LoRA adapters served
# over one base (vLLM-style). A tiny gpt2 pretrained here and two adapters
# made by kiln sft --lora-rank (different ranks and targets). Checks:
# /v1/models lists the base and each adapter (parent = the base) and
# /v1/models/ID answers for an adapter; greedy text per model id equals
# kiln generate --adapter DIR for that adapter and the plain base for the
# base id, both one at a time and with the three requests running
# concurrently over --parallel 3 (they share engine steps: fewer steps than
# tokens generated); the response names the model asked for; an unknown
# id gets the OpenAI 404 model_not_found; a prompt cached under one id is
# not reused for another; /v1/embeddings takes an adapter id; metrics count requests per model
# id and the access log names it; the startup log gives the base's and
# each adapter's bytes; an adapter for another base is refused at startup
# naming the tensor; bad NAME=DIR values are refused naming the flag;
# with --draft the adapter's greedy text is unchanged, and following a run
# (--model RUN) each reloaded checkpoint gets the adapter again.
D="$KILN_TMP/t_serve_adapter"
rm -rf "$D"; mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
serve_needs serve_adapter
"$PY" - "$D" <<'EOF'
import json, random, sys
d = sys.argv[1]
random.seed(3)
words = "alpha beta gamma delta red green blue one two three cat dog bird".split()
with open(d + "/corpus.txt", "w") as f:
    for i in range(300):
        f.write(" ".join(random.choice(words) for _ in range(12)) + "\n")
with open(d + "/rev.jsonl", "w") as f:
    for i in range(60):
        a = random.sample(words, 3)
        f.write(json.dumps({"prompt": "reverse " + " ".join(a) + ":", "completion": " " + " ".join(reversed(a))}) + "\n")
with open(d + "/dup.jsonl", "w") as f:
    for i in range(60):
        a = random.sample(words, 2)
        f.write(json.dumps({"prompt": "double " + " ".join(a) + ":", "completion": " " + " ".join(a + a)}) + "\n")
EOF
cat >"$D/tiny.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 96}
EOF
cat >"$D/wide.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 96, "n_head": 4, "vocab_size": 257, "n_positions": 96}
EOF
"$KILN" tokenize --input "$D/corpus.txt" --out "$D/data" --quiet >/dev/null 2>&1 || { fail adapter_setup tokenize; exit 1; }
"$KILN" train --config "$D/tiny.json" --data "$D/data" --out "$D/pre" --steps 20 --batch 4 --seq 48 \
  --lr 1e-3 --warmup 5 --eval-every 0 --progress none --threads 2 >/dev/null 2>&1 || { fail adapter_setup train; exit 1; }
BASE="$D/pre/step_00000020"
sft() { "$KILN" sft --model "$BASE" --batch 4 --lr 1e-2 --progress none --threads 2 --precision fp32 \
          --warmup 2 --eval-every 0 "$@" >"$D/sft.log" 2>&1 || { fail adapter_setup "sft: $(tail -3 "$D/sft.log")"; exit 1; }; }
sft --data "$D/rev.jsonl" --out "$D/a1" --steps 12 --lora-rank 4 --lora-alpha 8 --lora-targets all-linear
sft --data "$D/dup.jsonl" --out "$D/a2" --steps 12 --lora-rank 2 --lora-alpha 4 --lora-targets c_attn,mlp.c_proj
A1="$D/a1/step_00000012"; A2="$D/a2/step_00000012"
[ -f "$A1/adapter_model.safetensors" ] && [ -f "$A2/adapter_model.safetensors" ] || { fail adapter_setup "no adapters"; exit 1; }

P1="reverse cat dog bird:"; P2="double red blue:"; P3="alpha beta"
gen() { "$KILN" generate --model "$BASE" "${@:2}" --prompt "$1" --max-tokens 40 --temperature 0 --threads 1 --quiet 2>&1; }

SERVE_TOKENIZER="$BASE"
serve_start "$BASE" --name base --parallel 3 --threads 1 \
  --adapter "rev=$A1" --adapter "dup=$A2" || { fail adapter_serve_starts; exit 1; }
pass adapter_serve_starts
U="http://127.0.0.1:$PORT"

m=$(curl -s -m 5 "$U/v1/models"); DETAIL="$m"
check models_lists_adapters "$PY" -c "
import json, sys
d = json.loads(sys.argv[1])['data']
ids = [x['id'] for x in d]
assert ids == ['base', 'rev', 'dup'], ids
assert d[1]['parent'] == 'base' and d[2]['parent'] == 'base' and d[1]['root'] == sys.argv[2]
" "$m" "$A1"
m=$(curl -s -m 5 "$U/v1/models/dup"); DETAIL="$m"
check model_route_adapter "$PY" -c "import json,sys; d=json.loads(sys.argv[1]); sys.exit(0 if d['id']=='dup' and d['parent']=='base' else 1)" "$m"

# startup log: the base's bytes once, each adapter's bytes
DETAIL=$(grep "kiln serve:" "$D/serve.log" | head -8)
check startup_memory_logged eval "grep -q \"adapter 'rev' ($A1): [0-9]* bytes of fp32 A and B\" $D/serve.log && grep -q \"base 'base': [0-9]* bytes of weight matrices, held once for it and its 2 adapters\" $D/serve.log"

complete() { # model prompt -> prompt + text (and the model the response names in $D/model.$1)
  curl -s -m 30 -H 'Content-Type: application/json' \
    -d "$("$PY" -c 'import json,sys; print(json.dumps({"model": sys.argv[1], "prompt": sys.argv[2], "max_tokens": 40, "temperature": 0}))' "$1" "$2")" \
    "$U/v1/completions" >"$D/resp.$1.json"
  "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); open(sys.argv[3],'w').write(d['model']); print(sys.argv[2] + d['choices'][0]['text'])" "$D/resp.$1.json" "$2" "$D/model.$1"
}
# one at a time
g_rev=$(gen "$P1" --adapter "$A1"); g_dup=$(gen "$P2" --adapter "$A2"); g_base=$(gen "$P3")
g_rev_base=$(gen "$P1")
t_rev=$(complete rev "$P1"); t_dup=$(complete dup "$P2"); t_base=$(complete base "$P3")
DETAIL="served '$t_rev', generate --adapter '$g_rev'"
check adapter1_equals_generate [ -n "$g_rev" -a "$t_rev" = "$g_rev" ]
DETAIL="served '$t_dup', generate --adapter '$g_dup'"
check adapter2_equals_generate [ -n "$g_dup" -a "$t_dup" = "$g_dup" ]
DETAIL="served '$t_base', generate '$g_base'"
check base_equals_generate [ -n "$g_base" -a "$t_base" = "$g_base" ]
DETAIL="adapter '$g_rev', base '$g_rev_base'"
check adapter_changes_text [ "$g_rev" != "$g_rev_base" ]
DETAIL="$(cat "$D/model.rev") $(cat "$D/model.dup") $(cat "$D/model.base")"
check response_names_model [ "$(cat "$D/model.rev")" = rev -a "$(cat "$D/model.dup")" = dup -a "$(cat "$D/model.base")" = base ]

# a prompt cached under one model id is not reused for another (a slot's
# cache holds its adapter's keys and values): the base's prompt P3 again,
# now under rev, then P1 (cached under rev) under the base
t_rev3=$(complete rev "$P3"); g_rev3=$(gen "$P3" --adapter "$A1")
t_base1=$(complete base "$P1")
DETAIL="rev on the base's cached prompt '$t_rev3' vs '$g_rev3'; base on rev's '$t_base1' vs '$g_rev_base'"
check prefix_cache_per_adapter [ "$t_rev3" = "$g_rev3" -a "$t_base1" = "$g_rev_base" -a "$g_rev3" != "$g_base" ]

# concurrently: the three models in shared steps
metric() { curl -s "$U/metrics" | sed -n "s/^$1 //p"; }
s0=$(metric kiln_engine_steps_total)
DETAIL=$("$PY" - "$U" "$P1" "$P2" "$P3" "$g_rev" "$g_dup" "$g_base" <<'EOF' 2>&1
import json, sys, threading, urllib.request
u, p1, p2, p3, w1, w2, w3 = sys.argv[1:]
jobs = [("rev", p1, w1), ("dup", p2, w2), ("base", p3, w3)] * 2
out = [None] * len(jobs)
go = threading.Barrier(len(jobs))
def run(i):
    m, p, _ = jobs[i]
    body = json.dumps({"model": m, "prompt": p, "max_tokens": 40, "temperature": 0}).encode()
    rq = urllib.request.Request(u + "/v1/completions", body, {"Content-Type": "application/json"})
    go.wait()
    out[i] = json.load(urllib.request.urlopen(rq, timeout=60))
th = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
[t.start() for t in th]; [t.join() for t in th]
gen = 0
for (m, p, want), r in zip(jobs, out):
    got = p + r["choices"][0]["text"]
    assert got == want and r["model"] == m, (m, got, want)
    gen += r["usage"]["completion_tokens"]
print(gen)
EOF
)
s1=$(metric kiln_engine_steps_total)
ntok=$DETAIL
check concurrent_equal_generate eval "[[ '$ntok' =~ ^[0-9]+$ ]] && [ '$ntok' -gt 0 ]"
# one request at a time would take a step per generated token at least
DETAIL="$((s1 - s0)) steps for $ntok generated tokens"; echo "  concurrent: $DETAIL"
check concurrent_shared_steps eval "[[ '$ntok' =~ ^[0-9]+$ ]] && [ $((s1 - s0)) -lt '$ntok' ]"

# embeddings: the adapter's hidden states under its id
emb() { curl -s -m 10 -H 'Content-Type: application/json' -d "{\"model\":\"$1\",\"input\":\"reverse cat dog\"}" "$U/v1/embeddings"; }
e_rev=$(emb rev); e_base=$(emb base); DETAIL="$(head -c 200 <<<"$e_rev")"
check embeddings_per_adapter "$PY" -c "
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
assert a['model'] == 'rev' and b['model'] == 'base'
va, vb = a['data'][0]['embedding'], b['data'][0]['embedding']
assert len(va) == len(vb) == 64 and max(abs(x - y) for x, y in zip(va, vb)) > 1e-3
" "$e_rev" "$e_base"

# unknown model: OpenAI's 404
code=$(curl -s -o "$D/nf.json" -w '%{http_code}' -H 'Content-Type: application/json' \
  -d '{"model":"nope","prompt":"x","max_tokens":2}' "$U/v1/completions")
DETAIL="$code $(cat "$D/nf.json")"
check unknown_model_404 eval "test $code = 404 && grep -q '\"code\":\"model_not_found\"' $D/nf.json && grep -q \"The model 'nope' does not exist; this server serves 'base' and 2 LoRA adapters\" $D/nf.json"
code=$(curl -s -o /dev/null -w '%{http_code}' "$U/v1/models/nope")
check unknown_model_route_404 [ "$code" = 404 ]

mt=$(curl -s "$U/metrics"); DETAIL=$(grep kiln_model_requests_total <<<"$mt")
check metrics_per_model eval "grep -q '^kiln_model_requests_total{model=\"rev\"} 5$' <<<\"\$mt\" && grep -q '^kiln_model_requests_total{model=\"base\"} 5$' <<<\"\$mt\""
DETAIL=$(grep "POST /v1/completions" "$D/serve.log" | tail -2)
check access_log_names_model grep -q 'POST /v1/completions 200 .* model=dup' "$D/serve.log"
stop_checked

# a followed run with a draft: the adapter over each reloaded checkpoint,
# speculative decoding (the draft without adapters) keeping greedy text
serve_start "$D/pre" --name base --parallel 2 --threads 1 --watch-ms 100 \
  --draft "$BASE" --draft-tokens 3 --adapter "rev=$A1" || { fail adapter_run_starts; exit 1; }
U="http://127.0.0.1:$PORT"
t=$(complete rev "$P1"); DETAIL="served '$t', generate --adapter '$g_rev'"
check adapter_with_draft_equals_generate [ "$t" = "$g_rev" ]
"$KILN" train --data "$D/data" --out "$D/pre" --steps 30 --batch 4 --seq 48 --lr 1e-3 --warmup 5 \
  --eval-every 0 --progress none --threads 1 --resume "$D/pre" >"$D/train2.log" 2>&1 \
  || { fail adapter_reload_train "$(tail -3 "$D/train2.log")"; exit 1; }
for _ in $(seq 200); do grep -q "now serving checkpoint step_00000030" "$D/serve.log" && break; sleep 0.05; done
g30=$("$KILN" generate --model "$D/pre/step_00000030" --adapter "$A1" --prompt "$P1" --max-tokens 40 --temperature 0 --threads 1 --quiet 2>&1)
t=$(complete rev "$P1"); DETAIL="reloaded: served '$t', generate --adapter over step 30 '$g30'; $(grep -c 'now serving checkpoint step_00000030' "$D/serve.log") reloads"
check adapter_over_reloaded_checkpoint [ "$t" = "$g30" -a "$g30" != "$g_rev" ]
stop_checked

# refusals at startup
"$KILN" init --config "$D/wide.json" --out "$D/wide" >/dev/null 2>&1
out=$("$KILN" serve --model "$D/wide" --tokenizer bytes --port 0 --adapter "rev=$A1" 2>&1); rc=$?
DETAIL="$rc: $out"
check other_base_refused eval "test $rc = 1 && grep -q 'transformer.h.0.attn.c_attn.lora_A.weight\" has shape \[4, 64\] but the base model needs \[4, 96\]' <<<\"\$out\""
out=$("$KILN" serve --model "$BASE" --port 0 --adapter "$A1" 2>&1); rc=$?
DETAIL="$rc: $out"
check name_eq_dir_needed eval "test $rc = 1 && grep -q -- '--adapter entry 1 = \".*\": give NAME=DIR' <<<\"\$out\""
out=$("$KILN" serve --model "$BASE" --port 0 --name base --adapter "x=$A1" "x=$A2" 2>&1); rc=$?
DETAIL="$rc: $out"
check duplicate_id_refused eval "test $rc = 1 && grep -q -- '--adapter entry 2: the id \"x\" is given twice' <<<\"\$out\""
exit 0
