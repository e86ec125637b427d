#!/usr/bin/env bash
# t_serve_choices.sh — n > 1 and echo on kiln serve: n independent choices
# (indices, finish reasons, distinct texts with a fixed seed, choice i ==
# the n = 1 answer with seed + i, usage over all, streamed chunks by index
# reassembling the non-streamed choices and interleaving), echo (the prompt before the
# text; prompt-token logprobs equal to the logprobs the same tokens got
# when generated; max_tokens 0 scores the prompt only; streamed echo).
# Loopback only; the server is killed on exit.
set -u
D="$KILN_TMP/t_serve_choices"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
PY=/usr/bin/python3
if ! command -v curl >/dev/null || [ ! -x "$PY" ]; then
  echo "SKIP serve_choices: needs curl and /usr/bin/python3"; exit 0
fi
cat >"$D/tiny.json" <<'J'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 128}
J
"$KILN" init --config "$D/tiny.json" --out "$D/tiny" --force >/dev/null || { fail init; exit 1; }
serve_start "$D/tiny" --threads 1 --parallel 4 --log-format off || { fail start_server; exit 1; }

# post PATH BODY OUT: the response body in OUT, status in CODE
post() { CODE=$(curl -s -o "$3" -w '%{http_code}' -H 'Content-Type: application/json' --data-binary "$2" "http://127.0.0.1:$PORT$1"); }
sse() { curl -sN -H 'Content-Type: application/json' -d "$2" "http://127.0.0.1:$PORT$1" >"$3"; }

# ---- n ----
post /v1/completions '{"prompt":"Hello","max_tokens":12,"temperature":1,"seed":7,"n":3,"ignore_eos":true}' "$D/n3.json"
post /v1/completions '{"prompt":"Hello","max_tokens":12,"temperature":1,"seed":7,"n":3,"ignore_eos":true}' "$D/n3b.json"
post /v1/completions '{"prompt":"Hello","max_tokens":12,"temperature":1,"seed":7,"ignore_eos":true}' "$D/s7.json"
post /v1/completions '{"prompt":"Hello","max_tokens":12,"temperature":1,"seed":9,"ignore_eos":true}' "$D/s9.json"
check n3_choices "$PY" - "$D" <<'PYEOF'
import json, sys
D = sys.argv[1]
a, b = json.load(open(D + "/n3.json")), json.load(open(D + "/n3b.json"))
s7, s9 = json.load(open(D + "/s7.json")), json.load(open(D + "/s9.json"))
c = a["choices"]
assert [x["index"] for x in c] == [0, 1, 2], c
assert all(x["finish_reason"] == "length" for x in c), c
t = [x["text"] for x in c]
assert len(set(t)) == 3, t                      # distinct samples
assert a["choices"] == b["choices"], (a, b)     # the same seed, the same choices
assert t[0] == s7["choices"][0]["text"] and t[2] == s9["choices"][0]["text"], (t, s7, s9)
assert a["usage"] == {"prompt_tokens": 5, "completion_tokens": 36, "total_tokens": 41}, a["usage"]
PYEOF
post /v1/completions '{"prompt":"Hello","max_tokens":6,"temperature":0,"n":2,"ignore_eos":true}' "$D/g2.json"
check n2_greedy_equal "$PY" -c "import json; c=json.load(open('$D/g2.json'))['choices']; assert len(c)==2 and c[0]['text']==c[1]['text']"
post /v1/chat/completions '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"temperature":1,"seed":3,"n":2,"ignore_eos":true}' "$D/chat2.json"
check n2_chat "$PY" -c "
import json; d=json.load(open('$D/chat2.json')); c=d['choices']
assert [x['index'] for x in c]==[0,1] and all(x['message']['role']=='assistant' and x['finish_reason']=='length' for x in c), d
assert c[0]['message']['content'] != c[1]['message']['content'] and d['usage']['completion_tokens']==16, d"

sse /v1/completions '{"prompt":"Hello","max_tokens":12,"temperature":1,"seed":7,"n":3,"ignore_eos":true,"stream":true,"stream_options":{"include_usage":true}}' "$D/n3.sse"
sse /v1/chat/completions '{"messages":[{"role":"user","content":"Hi"}],"max_tokens":8,"temperature":1,"seed":3,"n":2,"ignore_eos":true,"stream":true}' "$D/chat2.sse"
check n_stream_by_index "$PY" - "$D" <<'PYEOF'
import json, sys
D = sys.argv[1]
def events(p):
    raw = open(p).read()
    assert raw.endswith("data: [DONE]\n\n"), raw[-60:]
    return [json.loads(e[6:]) for e in raw.split("\n\n")[:-2] if e.startswith("data: ")]
ev = events(D + "/n3.sse")
text, fin = {}, {}
for e in ev[:-1]:
    assert len(e["choices"]) == 1, e
    ch = e["choices"][0]
    text[ch["index"]] = text.get(ch["index"], "") + ch["text"]
    if ch["finish_reason"]:
        assert ch["index"] not in fin, e
        fin[ch["index"]] = ch["finish_reason"]
full = json.load(open(D + "/n3.json"))
assert [text[i] for i in range(3)] == [c["text"] for c in full["choices"]], (text, full)
assert fin == {0: "length", 1: "length", 2: "length"}, fin
# (prompt_tokens_details.cached_tokens depends on what the caches held)
core = lambda u: {k: u[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
assert ev[-1]["choices"] == [] and core(ev[-1]["usage"]) == core(full["usage"]), ev[-1]
ev = events(D + "/chat2.sse")
text, roles = {}, {}
for e in ev:
    ch = e["choices"][0]
    if "role" in ch["delta"]: roles[ch["index"]] = ch["delta"]["role"]
    text[ch["index"]] = text.get(ch["index"], "") + (ch["delta"].get("content") or "")
full = json.load(open(D + "/chat2.json"))
assert roles == {0: "assistant", 1: "assistant"}, roles
assert [text[0], text[1]] == [c["message"]["content"] for c in full["choices"]], (text, full)
PYEOF

# ---- echo ----
# (sampled among A-F, not greedy: the tiny model's greedy text repeats one
# byte, which would hide a prompt token scored at the wrong position; ASCII,
# so that the text is the generated bytes and can be scored as a prompt)
post /v1/completions '{"prompt":"Hello","max_tokens":6,"temperature":1,"seed":5,"ignore_eos":true,"logprobs":2,"logit_bias":{"65":100,"66":100,"67":100,"68":100,"69":100,"70":100}}' "$D/plain.json"
post /v1/completions '{"prompt":"Hello","max_tokens":6,"temperature":1,"seed":5,"ignore_eos":true,"logprobs":2,"logit_bias":{"65":100,"66":100,"67":100,"68":100,"69":100,"70":100},"echo":true}' "$D/echo.json"
GEN=$("$PY" -c "import json; print(json.dumps('Hello' + json.load(open('$D/plain.json'))['choices'][0]['text']))")
post /v1/completions "{\"prompt\":$GEN,\"max_tokens\":0,\"echo\":true,\"logprobs\":2,\"logit_bias\":{\"65\":100,\"66\":100,\"67\":100,\"68\":100,\"69\":100,\"70\":100}}" "$D/score.json"
check echo_text_and_logprobs "$PY" - "$D" <<'PYEOF'
import json, sys
D = sys.argv[1]
p, e, s = (json.load(open(D + f)) for f in ("/plain.json", "/echo.json", "/score.json"))
pc, ec, sc = p["choices"][0], e["choices"][0], s["choices"][0]
assert ec["text"] == "Hello" + pc["text"], (ec, pc)
lp = ec["logprobs"]
assert lp["tokens"][:5] == list("Hello") and lp["tokens"][5:] == pc["logprobs"]["tokens"], lp
assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None, lp
assert all(x <= 0 for x in lp["token_logprobs"][1:]), lp
assert lp["text_offset"][:6] == list(range(6)), lp["text_offset"]   # one byte per token
assert len(set(pc["logprobs"]["tokens"])) >= 3, pc                   # varied tokens
assert lp["token_logprobs"][5:] == pc["logprobs"]["token_logprobs"], (lp, pc)
assert all(len(t) == 2 for t in lp["top_logprobs"][1:]), lp["top_logprobs"]
core = lambda u: {k: u[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
assert core(e["usage"]) == core(p["usage"]), (e["usage"], p["usage"])
assert "prompt_tokens_details" not in e["usage"], e["usage"]   # scored prompts are never reused
# scoring the generated text as a prompt gives the logprobs it was generated with
assert sc["text"] == ec["text"] and sc["finish_reason"] == "length", sc
assert s["usage"]["completion_tokens"] == 0 and s["usage"]["prompt_tokens"] == 11, s["usage"]
a, b = sc["logprobs"]["token_logprobs"][5:], pc["logprobs"]["token_logprobs"]
assert len(a) == 6 and all(abs(x - y) < 1e-4 for x, y in zip(a, b)), (a, b)
assert sc["logprobs"]["token_logprobs"][1:5] == lp["token_logprobs"][1:5], (sc, lp)
PYEOF
sse /v1/completions '{"prompt":"Hello","max_tokens":6,"temperature":1,"seed":5,"ignore_eos":true,"logprobs":2,"logit_bias":{"65":100,"66":100,"67":100,"68":100,"69":100,"70":100},"echo":true,"stream":true}' "$D/echo.sse"
check echo_stream "$PY" - "$D" <<'PYEOF'
import json, sys
D = sys.argv[1]
raw = open(D + "/echo.sse").read()
ev = [json.loads(x[6:]) for x in raw.split("\n\n")[:-2] if x.startswith("data: ")]
first = ev[0]["choices"][0]
assert first["text"].startswith("Hello") and first["logprobs"]["token_logprobs"][0] is None, first
text = "".join(e["choices"][0]["text"] for e in ev)
toks = sum((e["choices"][0]["logprobs"]["tokens"] for e in ev if e["choices"][0]["logprobs"]), [])
full = json.load(open(D + "/echo.json"))["choices"][0]
assert text == full["text"] and toks == full["logprobs"]["tokens"], (text, toks, full)
PYEOF
post /v1/completions '{"prompt":"Hi","max_tokens":3,"temperature":0,"echo":true,"n":2}' "$D/echo_n.json"
check echo_with_n "$PY" -c "
import json; c=json.load(open('$D/echo_n.json'))['choices']
assert len(c)==2 and all(x['text'].startswith('Hi') and len(x['text'].encode()) >= 3 for x in c), c"
post /v1/chat/completions '{"messages":[{"role":"user","content":"Hi"}],"echo":true}' "$D/echo_chat.json"
check echo_chat_400 "$PY" -c "
import json; d=json.load(open('$D/echo_chat.json')); assert '$CODE'=='400' and d['error']['param']=='echo', d"
post /v1/completions '{"prompt":"Hi","max_tokens":0}' "$D/mt0.json"
check max_tokens_0_needs_echo "$PY" -c "
import json; d=json.load(open('$D/mt0.json')); assert '$CODE'=='400' and d['error']['param']=='max_tokens', d"
stop_checked

# interleaving: on a model slow enough that the reader keeps up, the
# choices' chunks alternate (each step adds a token to every choice)
cat >"$D/mid.json" <<'J'
{"model_type": "gpt2", "n_layer": 4, "n_embd": 256, "n_head": 4, "vocab_size": 257, "n_positions": 128}
J
"$KILN" init --config "$D/mid.json" --out "$D/mid" --force >/dev/null || { fail init_mid; exit 1; }
serve_start "$D/mid" --threads 1 --parallel 3 --log-format off || { fail start_server_mid; exit 1; }
sse /v1/completions '{"prompt":"Hello","max_tokens":40,"temperature":1,"seed":7,"n":3,"ignore_eos":true,"stream":true}' "$D/inter.sse"
check n_stream_interleaves "$PY" - "$D/inter.sse" <<'PYEOF'
import json, sys
raw = open(sys.argv[1]).read()
idx = [json.loads(e[6:])["choices"][0]["index"] for e in raw.split("\n\n")[:-2]
       if json.loads(e[6:])["choices"][0]["text"]]
# not all of choice 0, then all of 1, then all of 2
assert idx != sorted(idx) and set(idx) == {0, 1, 2}, idx
PYEOF
stop_checked
exit 0
