#!/usr/bin/env bash
# t_serve_batch.sh — batched prompts on /v1/completions: `prompt` as an
# array of strings or of token-id arrays gives one choice per prompt (times
# n), indexed prompt-major as OpenAI does (prompt p, choice i: p * n + i),
# each equal to the same prompt sent alone (text, seeded n > 1 choices,
# echo), usage summed over the prompts; streamed, one choice per event,
# reassembled by index to the non-streamed texts; bad items
# are a 400 naming prompt. Loopback only.
set -u
D="$KILN_TMP/t_serve_batch"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
PY=/usr/bin/python3
if ! command -v curl >/dev/null || [ ! -x "$PY" ]; then
  echo "SKIP serve_batch: needs curl and /usr/bin/python3"; exit 0
fi
cat >"$D/tiny.json" <<'J'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 256}
J
"$KILN" init --config "$D/tiny.json" --out "$D/tiny" --force >/dev/null || { fail init; exit 1; }
post() { CODE=$(curl -s -o "$3" -w '%{http_code}' -H 'Content-Type: application/json' --data-binary "$2" "http://127.0.0.1:$PORT$1"); }
serve_start "$D/tiny" --threads 1 --parallel 4 --log-format off || { fail start_server; exit 1; }

P1='Once upon a time'
P2='The quick brown fox'
IDS='[72,101,108,108,111]'
COMMON='"max_tokens":12,"temperature":1,"seed":5,"ignore_eos":true'
post /v1/completions '{"prompt":"'"$P1"'",'"$COMMON"',"n":2}' "$D/s1.json"
post /v1/completions '{"prompt":"'"$P2"'",'"$COMMON"',"n":2}' "$D/s2.json"
post /v1/completions '{"prompt":'"$IDS"','"$COMMON"',"n":2}' "$D/s3.json"
post /v1/completions '{"prompt":["'"$P1"'","'"$P2"'",'"$IDS"'],'"$COMMON"',"n":2}' "$D/b.json"
check batch_prompt_major_equals_single "$PY" -c "
import json
b=json.load(open('$D/b.json')); s=[json.load(open('$D/s%d.json' % i)) for i in (1,2,3)]
c=b['choices']
assert '$CODE'=='200' and [x['index'] for x in c]==list(range(6)), c
want=[x['text'] for d in s for x in d['choices']]
assert [x['text'] for x in c]==want, ([x['text'] for x in c], want)
assert len(set(want))==6, want
u=b['usage']; pt=sum(d['usage']['prompt_tokens'] for d in s); ct=sum(d['usage']['completion_tokens'] for d in s)
assert u['prompt_tokens']==pt==16+19+5 and u['completion_tokens']==ct==72 and u['total_tokens']==pt+ct, u"

post /v1/completions '{"prompt":["'"$P1"'","'"$P2"'"],"max_tokens":4,"temperature":0,"echo":true}' "$D/e.json"
check batch_echo_own_prompt "$PY" -c "
import json
c=json.load(open('$D/e.json'))['choices']
assert c[0]['text'].startswith('$P1') and c[1]['text'].startswith('$P2') and len(c[0]['text'])==len('$P1')+4, c"

post /v1/completions '{"prompt":[[72,101],[65,66,67]],"max_tokens":30,"temperature":0,"ignore_eos":true}' "$D/t.json"
curl -sN -H 'Content-Type: application/json' --data-binary '{"prompt":[[72,101],[65,66,67]],"max_tokens":30,"temperature":0,"ignore_eos":true,"stream":true,"stream_options":{"include_usage":true}}' \
  "http://127.0.0.1:$PORT/v1/completions" >"$D/stream.txt"
check batch_stream_by_index "$PY" -c "
import json
ev=[json.loads(l[6:]) for l in open('$D/stream.txt') if l.startswith('data: {')]
t=['','']; order=[]; fin={}
for e in ev:
    for c in e['choices']:
        t[c['index']]+=c['text']; order.append(c['index'])
        if c['finish_reason']: fin[c['index']]=c['finish_reason']
want=json.load(open('$D/t.json'))
assert t==[c['text'] for c in want['choices']] and fin=={0:'length',1:'length'}, (t, fin)
k=('prompt_tokens','completion_tokens','total_tokens')
assert [ev[-1]['usage'][x] for x in k]==[want['usage'][x] for x in k]==[5,60,65], ev[-1]
# one choice per event (they interleave as tokens arrive; how finely
# depends on when the client reads, so the order is not checked)
assert all(len(e['choices'])==1 for e in ev[:-1]) and set(order)=={0,1}, order"

for bad in '["a",5]' '[[1,2],[]]' '[[1,2],[99999]]' '["a",[1,"x"]]' '[[1,2],{"a":1}]'; do
  post /v1/completions '{"prompt":'"$bad"',"max_tokens":2}' "$D/err.json"
  check "batch_bad_item_400 $bad" "$PY" -c "
d=__import__('json').load(open('$D/err.json'))['error']; assert '$CODE'=='400' and d['param']=='prompt', d"
done
MANY=$("$PY" -c "import json; print(json.dumps(['x']*40))")
post /v1/completions '{"prompt":'"$MANY"',"max_tokens":2,"n":64}' "$D/err.json"
check batch_too_many_choices_400 "$PY" -c "
d=__import__('json').load(open('$D/err.json'))['error']; assert '$CODE'=='400' and d['param']=='prompt' and '2048' in d['message'], d"
stop_checked
