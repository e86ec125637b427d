#!/usr/bin/env bash
# t_serve_prefix.sh — prefix caching in kiln serve: a prompt that extends
# an earlier request's prompt and output reuses that slot's KV cache
# (usage.prompt_tokens_details.cached_tokens, exact counts, and the
# Prometheus counters: only the new tokens are prefilled); the answer is
# the one a fresh server gives (text, logprobs within 1e-3); a chat's
# second turn reuses the first; n > 1 choices prefill the prompt once and
# copy it; echo with logprobs never reuses. Loopback only.
set -u
D="$KILN_TMP/t_serve_prefix"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
PY=/usr/bin/python3
if ! command -v curl >/dev/null || [ ! -x "$PY" ]; then
  echo "SKIP serve_prefix: needs curl and /usr/bin/python3"; exit 0
fi
cat >"$D/tiny.json" <<'J'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 1024}
J
"$KILN" init --config "$D/tiny.json" --out "$D/tiny" --force >/dev/null || { fail init; exit 1; }
post() { CODE=$(curl -s -o "$3" -w '%{http_code}' -H 'Content-Type: application/json' --data-binary "$2" "http://127.0.0.1:$PORT$1"); }
metric() { curl -s "http://127.0.0.1:$PORT/metrics" | sed -n "s/^$1 //p"; }
P1=$("$PY" -c "print(('The quick brown fox jumps over the lazy dog. ' * 8)[:300])")
P3=$("$PY" -c "print(('Pack my box with five dozen liquor jugs! ' * 6)[:200])")
A='{"prompt":"'"$P1"'","max_tokens":5,"temperature":0,"logit_bias":{"65":100}}'
B='{"prompt":"'"$P1"'AAAAA and more","max_tokens":8,"temperature":0,"logprobs":1,"ignore_eos":true}'
N3='{"prompt":"'"$P3"'","max_tokens":4,"temperature":1,"seed":21,"n":3,"ignore_eos":true}'

serve_start "$D/tiny" --threads 1 --parallel 4 --log-format off || { fail start_server; exit 1; }
post /v1/completions "$A" "$D/a.json"
check first_request_no_cache "$PY" -c "
import json; d=json.load(open('$D/a.json')); u=d['usage']
assert d['choices'][0]['text']=='AAAAA' and u['prompt_tokens']==300 and 'prompt_tokens_details' not in u, d"
post /v1/completions "$B" "$D/b.json"
# the slot holds the prompt and the 4 tokens fed back (the 5th was sampled, never fed)
check extended_prompt_cached "$PY" -c "
import json; u=json.load(open('$D/b.json'))['usage']
assert u['prompt_tokens']==314 and u['prompt_tokens_details']=={'cached_tokens':304}, u"
check metrics_cached_tokens test "$(metric kiln_prompt_tokens_cached_total)" = 304
check metrics_cache_hits test "$(metric kiln_prefix_cache_hits_total)" = 1
check metrics_prefilled_only_new test "$(metric kiln_prompt_tokens_total)" = $((300 + 314 - 304))
post /v1/completions "$N3" "$D/n3.json"
# the leader prefills 200 tokens, each follower copies 199 and feeds the last
check n3_prompt_prefilled_once test "$(metric kiln_prompt_tokens_total)" = $((310 + 200 + 2))
check n3_followers_copied test "$(metric kiln_prompt_tokens_cached_total)" = $((304 + 2 * 199))
post /v1/completions '{"prompt":"'"$P1"'","max_tokens":0,"echo":true,"logprobs":1}' "$D/echo.json"
check echo_logprobs_not_cached "$PY" -c "
import json; d=json.load(open('$D/echo.json')); assert 'prompt_tokens_details' not in d['usage'] and d['choices'][0]['logprobs']['token_logprobs'][1] is not None, d['usage']"
check metrics_echo_prefilled test "$(metric kiln_prompt_tokens_total)" = $((512 + 300))
# a chat's second turn reuses the first (its prompt and the reply fed back)
T1='{"messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"Say something long."}],"max_tokens":6,"temperature":0,"logit_bias":{"66":100}}'
post /v1/chat/completions "$T1" "$D/t1.json"
T2=$("$PY" -c "
import json; d=json.load(open('$D/t1.json'))
print(json.dumps({'messages':[{'role':'system','content':'You are terse.'},{'role':'user','content':'Say something long.'},
      {'role':'assistant','content':d['choices'][0]['message']['content']},{'role':'user','content':'More.'}],'max_tokens':4,'temperature':0}))")
post /v1/chat/completions "$T2" "$D/t2.json"
check chat_second_turn_cached "$PY" -c "
import json; a=json.load(open('$D/t1.json'))['usage']; b=json.load(open('$D/t2.json'))['usage']
assert b['prompt_tokens_details']['cached_tokens'] >= a['prompt_tokens'] + 5, (a, b)"
stop_checked

# the same requests on a fresh server: the same answers without the caches
serve_start "$D/tiny" --threads 1 --parallel 4 --log-format off || { fail start_server2; exit 1; }
post /v1/completions "$B" "$D/b_fresh.json"
post /v1/completions "$N3" "$D/n3_fresh.json"
check cached_answer_equals_fresh "$PY" - "$D" <<'PYEOF'
import json, sys
D = sys.argv[1]
b, f = json.load(open(D + "/b.json")), json.load(open(D + "/b_fresh.json"))
assert "prompt_tokens_details" not in f["usage"], f["usage"]
cb, cf = b["choices"][0], f["choices"][0]
assert cb["text"] == cf["text"], (cb, cf)
assert all(abs(x - y) < 1e-3 for x, y in zip(cb["logprobs"]["token_logprobs"], cf["logprobs"]["token_logprobs"])), (cb, cf)
n, nf = json.load(open(D + "/n3.json")), json.load(open(D + "/n3_fresh.json"))
assert [c["text"] for c in n["choices"]] == [c["text"] for c in nf["choices"]], (n, nf)
assert len({c["text"] for c in n["choices"]}) == 3, n
PYEOF
stop_checked

# a model whose vocabulary is larger than the tokenizer's (padding rows):
# those ids are never sampled (before: a 500 "outside the vocabulary")
sed 's/"vocab_size": 257/"vocab_size": 512/' "$D/tiny.json" >"$D/pad.json"
"$KILN" init --config "$D/pad.json" --out "$D/pad" --force >/dev/null || { fail init_pad; exit 1; }
serve_start "$D/pad" --threads 1 --log-format off || { fail start_server_pad; exit 1; }
post /v1/completions '{"prompt":"Hello","max_tokens":40,"temperature":0,"ignore_eos":true,"logprobs":1}' "$D/pad_out.json"
check padded_vocab_never_sampled "$PY" -c "
import json; d=json.load(open('$D/pad_out.json')); assert '$CODE'=='200' and d['usage']['completion_tokens']==40, d"
stop_checked
exit 0
