#!/usr/bin/env bash
# t_serve_embed.sh — POST /v1/embeddings: the vector of a text equals an
# independent numpy forward's final-norm hidden states (tests/embed_ref.py),
# mean-pooled by default and last-token with --embedding-pooling last,
# unit length; token-array input, a batch of inputs (indices, usage
# summed), base64 (little-endian float32) equal to float; an embedding
# taken while a completion streams in another slot is the one taken idle,
# and the completion is the one generated alone; errors name the field
# (dimensions, encoding_format, input). Loopback only.
set -u
D="$KILN_TMP/t_serve_embed"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
PY=/usr/bin/python3
if ! command -v curl >/dev/null || [ ! -x "$PY" ] || ! "$PY" -c 'import numpy' 2>/dev/null; then
  echo "SKIP serve_embed: needs curl and /usr/bin/python3 with numpy"; exit 0
fi
cat >"$D/tiny.json" <<'J'
{"model_type": "gpt2", "n_layer": 8, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 1024}
J
"$KILN" init --config "$D/tiny.json" --out "$D/tiny" --force >/dev/null || { fail init; exit 1; }
post() { CODE=$(curl -s -o "$3" -w '%{http_code}' -H 'Content-Type: application/json' --data-binary "$2" "http://127.0.0.1:$PORT$1"); }
TEXT='The quick brown fox jumps over the lazy dog, twice over.'
LONG=$("$PY" -c "print('Pack my box with five dozen liquor jugs. ' * 3)")

serve_start "$D/tiny" --threads 1 --parallel 2 --log-format off || { fail start_server; exit 1; }
post /tokenize '{"content":"'"$TEXT"'","add_special":true}' "$D/ids.json"
IDS=$("$PY" -c "import json; print(json.dumps(json.load(open('$D/ids.json'))['tokens']))")
post /tokenize '{"content":"'"$LONG"'","add_special":true}' "$D/ids2.json"
IDS2=$("$PY" -c "import json; print(json.dumps(json.load(open('$D/ids2.json'))['tokens']))")
"$PY" "$KILN_ROOT/tests/embed_ref.py" "$D/tiny" "$IDS" mean >"$D/ref_mean.json"
"$PY" "$KILN_ROOT/tests/embed_ref.py" "$D/tiny" "$IDS2" mean >"$D/ref2_mean.json"
"$PY" "$KILN_ROOT/tests/embed_ref.py" "$D/tiny" "$IDS" last >"$D/ref_last.json"
# close: within 1e-4 of the reference (fp32 against float64), and not close
# to the other pooling's reference (the comparison can tell them apart)
CLOSE="
import json, math
def close(a, b): return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 1e-4
def unit(a): return abs(math.sqrt(sum(x * x for x in a)) - 1) < 1e-5
"
post /v1/embeddings '{"model":"tiny","input":"'"$TEXT"'"}' "$D/e1.json"
check embed_equals_reference_mean "$PY" -c "$CLOSE
d=json.load(open('$D/e1.json')); ref=json.load(open('$D/ref_mean.json')); other=json.load(open('$D/ref_last.json'))
e=d['data'][0]['embedding']
assert '$CODE'=='200' and d['object']=='list' and d['model']=='tiny' and d['data'][0]['object']=='embedding' and d['data'][0]['index']==0, d
assert len(e)==64 and unit(e) and close(e, ref) and not close(e, other), (e[:4], ref[:4])
assert d['usage']=={'prompt_tokens':len($IDS),'total_tokens':len($IDS)}, d['usage']"
post /v1/embeddings '{"input":'"$IDS"',"encoding_format":"float"}' "$D/e2.json"
check embed_token_array_input "$PY" -c "$CLOSE
a=json.load(open('$D/e1.json'))['data'][0]['embedding']; b=json.load(open('$D/e2.json'))['data'][0]['embedding']
assert a==b, 'token ids and text give different vectors'"
post /v1/embeddings '{"input":["'"$TEXT"'","'"$LONG"'",'"$IDS"'],"dimensions":64}' "$D/e3.json"
check embed_batch "$PY" -c "$CLOSE
d=json.load(open('$D/e3.json')); r1=json.load(open('$D/ref_mean.json')); r2=json.load(open('$D/ref2_mean.json'))
v=[x['embedding'] for x in d['data']]
assert [x['index'] for x in d['data']]==[0,1,2] and close(v[0],r1) and close(v[1],r2) and v[2]==v[0], d['data'][1]['embedding'][:3]
assert d['usage']['prompt_tokens']==2*len($IDS)+len($IDS2), d['usage']"
post /v1/embeddings '{"input":"'"$TEXT"'","encoding_format":"base64"}' "$D/e4.json"
check embed_base64 "$PY" -c "$CLOSE
import base64, struct
s=json.load(open('$D/e4.json'))['data'][0]['embedding']; f=json.load(open('$D/e1.json'))['data'][0]['embedding']
b=base64.b64decode(s); v=list(struct.unpack('<%df' % (len(b)//4), b))
assert isinstance(s,str) and len(v)==64 and max(abs(x-y) for x,y in zip(v,f)) < 1e-7, v[:3]"

# under load: a streamed completion runs in the other slot meanwhile
BODY='{"prompt":"'"$LONG"'","max_tokens":850,"temperature":0,"ignore_eos":true}'
post /v1/completions "$BODY" "$D/alone.json"
curl -sN -H 'Content-Type: application/json' --data-binary "${BODY%\}}"',"stream":true}' \
  "http://127.0.0.1:$PORT/v1/completions" >"$D/stream.txt" &
CPID=$!
for _ in $(seq 200); do [ -s "$D/stream.txt" ] && break; sleep 0.01; done
# the five requests at once (sent one after another they can outlast a
# fast stream); each is answered between the stream's decode steps
EPIDS=()
for i in 1 2 3 4 5; do
  curl -s -o "$D/load$i.json" -H 'Content-Type: application/json' \
    --data-binary '{"input":["'"$TEXT"'","'"$LONG"'"]}' "http://127.0.0.1:$PORT/v1/embeddings" &
  EPIDS+=($!)
done
wait "${EPIDS[@]}"
RUNNING=$(grep -c 'DONE' "$D/stream.txt")
wait $CPID
check embeddings_ran_during_the_stream test "$RUNNING" = 0
check embed_under_load_equal "$PY" -c "
import json
a=json.load(open('$D/e3.json'))['data']
for i in range(1,6):
    b=json.load(open('$D/load%d.json' % i))['data']
    assert [x['embedding'] for x in b]==[x['embedding'] for x in a[:2]], i"
check completion_beside_embeddings_unchanged "$PY" -c "
import json
t=''.join(json.loads(l[6:])['choices'][0]['text'] for l in open('$D/stream.txt') if l.startswith('data: {'))
a=json.load(open('$D/alone.json'))['choices'][0]['text']
assert t==a and len(t)>=850, (t[:40], a[:40])"
# an embedding leaves its slot empty: the prefix cache does not reuse
# what the embedding overwrote (both slots embed TEXT, then LONG again)
post /v1/embeddings '{"input":["'"$TEXT"'","'"$TEXT"'"]}' "$D/e5.json"
post /v1/completions "$BODY" "$D/again.json"
check completion_after_embeddings_unchanged "$PY" -c "
import json
a=json.load(open('$D/alone.json')); b=json.load(open('$D/again.json'))
assert a['choices'][0]['text']==b['choices'][0]['text'] and 'prompt_tokens_details' not in b['usage'], b['usage']"

# errors name the field
post /v1/embeddings '{"input":"x","dimensions":32}' "$D/err.json"
check embed_dimensions_400 "$PY" -c "
d=__import__('json').load(open('$D/err.json'))['error']; assert '$CODE'=='400' and d['param']=='dimensions' and '64' in d['message'], d"
post /v1/embeddings '{"input":"x","encoding_format":"int8"}' "$D/err.json"
check embed_encoding_400 "$PY" -c "
d=__import__('json').load(open('$D/err.json'))['error']; assert '$CODE'=='400' and d['param']=='encoding_format', d"
for bad in '{}' '{"input":""}' '{"input":[]}' '{"input":[1,"a"]}' '{"input":[99999]}' '{"input":{"a":1}}' '{"input":["a",""]}'; do
  post /v1/embeddings "$bad" "$D/err.json"
  check "embed_bad_input_400 $bad" "$PY" -c "
d=__import__('json').load(open('$D/err.json'))['error']; assert '$CODE'=='400' and d['param'] in ('input','input[]'), d"
done
BIG=$("$PY" -c "print(list(range(65,91))*40)")
post /v1/embeddings '{"input":'"$BIG"'}' "$D/err.json"
check embed_too_long_400 "$PY" -c "
d=__import__('json').load(open('$D/err.json'))['error']; assert '$CODE'=='400' and d['code']=='context_length_exceeded', d"
FULL=$("$PY" -c "print([65 + i % 26 for i in range(1024)])")
post /v1/embeddings '{"input":'"$FULL"'}' "$D/full.json"
check embed_whole_context "$PY" -c "
d=__import__('json').load(open('$D/full.json')); assert '$CODE'=='200' and d['usage']['prompt_tokens']==1024, d"
post /v1/embeddings '{"input":"x","model":"other"}' "$D/err.json"
check embed_unknown_model_404 test "$CODE" = 404
CODE=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/v1/embeddings")
check embed_get_405 test "$CODE" = 405
stop_checked

# --embedding-pooling last: the last token's final-norm state
serve_start "$D/tiny" --threads 1 --parallel 1 --log-format off --embedding-pooling last || { fail start_server_last; exit 1; }
post /v1/embeddings '{"input":"'"$TEXT"'"}' "$D/l1.json"
check embed_equals_reference_last "$PY" -c "$CLOSE
e=json.load(open('$D/l1.json'))['data'][0]['embedding']; ref=json.load(open('$D/ref_last.json')); other=json.load(open('$D/ref_mean.json'))
assert unit(e) and close(e, ref) and not close(e, other), e[:4]"
stop_checked
"$KILN" serve --model "$D/tiny" --tokenizer bytes --port 0 --embedding-pooling max >"$D/bad.log" 2>&1
check embed_pooling_flag_checked grep -q "embedding-pooling must be mean or last" "$D/bad.log"
