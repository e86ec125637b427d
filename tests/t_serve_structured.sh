#!/usr/bin/env bash
# t_serve_structured.sh — structured output on kiln serve: response_format
# json_object and json_schema by constrained decoding (every sample that
# ends with finish_reason "stop" parses, and validates against the schema,
# checked by a validator of the subset here), streamed == non-streamed,
# unsupported schema keywords refused by name, stop + response_format
# refused; tools with tool_choice "required" or a named function (tool_calls
# with id, type, name and arguments that validate against the tool's
# parameters, finish_reason "tool_calls", content null; streamed as one
# tool_calls delta), "auto" (the default) answering text like any chat,
# tool history accepted. A random tiny model with the bytes tokenizer: logit_bias
# favours closing quotes and brackets so samples end within max_tokens
# (the grammar alone decides what is allowed). Loopback only.
set -u
D="$KILN_TMP/t_serve_structured"
mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh"
PY=/usr/bin/python3
if ! command -v curl >/dev/null || [ ! -x "$PY" ]; then
  echo "SKIP serve_structured: needs curl and /usr/bin/python3"; exit 0
fi
cat >"$D/tiny.json" <<'J'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 1024}
J
"$KILN" init --config "$D/tiny.json" --out "$D/tiny" --force >/dev/null || { fail init; exit 1; }
serve_start "$D/tiny" --threads 1 --parallel 4 --log-format off || { fail start_server; exit 1; }
post() { CODE=$(curl -s -o "$3" -w '%{http_code}' -H 'Content-Type: application/json' --data-binary "$2" "http://127.0.0.1:$PORT$1"); }
sse() { curl -sN -H 'Content-Type: application/json' -d "$2" "http://127.0.0.1:$PORT$1" >"$3"; }
# '"' ',' ']' '}' favoured: strings and containers close soon
BIAS='"logit_bias":{"34":6,"44":2,"93":6,"125":6}'

cat >"$D/validate.py" <<'PYEOF'
# validate(value, schema): the schema subset kiln serve supports
def validate(v, s, path="$"):
    if "enum" in s:
        assert v in s["enum"] and type(v) in [type(x) for x in s["enum"] if x == v], (path, v)
        return
    if "const" in s:
        assert v == s["const"], (path, v)
        return
    t = s.get("type")
    ts = t if isinstance(t, list) else [t] if t else None
    def is_(x, name):
        return {"object": isinstance(x, dict), "array": isinstance(x, list),
                "string": isinstance(x, str), "boolean": isinstance(x, bool), "null": x is None,
                "integer": isinstance(x, int) and not isinstance(x, bool),
                "number": isinstance(x, (int, float)) and not isinstance(x, bool)}[name]
    if ts:
        assert any(is_(v, n) for n in ts), (path, v, ts)
    if isinstance(v, dict) and ("properties" in s or "object" in (ts or [])):
        props = s.get("properties", {})
        for r in s.get("required", []):
            assert r in v, (path, "missing", r)
        for k, x in v.items():
            if props:
                assert k in props, (path, "extra key", k)
                validate(x, props[k], path + "." + k)
    if isinstance(v, list) and "items" in s:
        for i, x in enumerate(v):
            validate(x, s["items"], "%s[%d]" % (path, i))
PYEOF

# ---- json_object: n = 3, each a JSON object when it stops ----
post /v1/chat/completions '{"messages":[{"role":"user","content":"json please"}],"response_format":{"type":"json_object"},"max_tokens":300,"seed":1,"n":3,'"$BIAS"'}' "$D/obj.json"
check json_object_parses "$PY" - "$D/obj.json" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
stops = [c for c in d["choices"] if c["finish_reason"] == "stop"]
assert len(stops) == 3, [c["finish_reason"] for c in d["choices"]]
for c in stops:
    v = json.loads(c["message"]["content"])
    assert isinstance(v, dict), c
    assert c["message"]["content"] == c["message"]["content"].strip(), c
PYEOF

# ---- json_schema: n = 4, each validates when it stops ----
SCHEMA='{"type":"object","properties":{"name":{"type":"string"},"age":{"type":"integer"},"tags":{"type":"array","items":{"enum":["red","green","blue"]}},"ok":{"type":"boolean"},"score":{"type":["number","null"]},"pet":{"type":"object","properties":{"kind":{"enum":["cat","dog"]},"legs":{"type":"integer"}},"required":["kind"]}},"required":["name","age","pet"],"additionalProperties":false}'
echo "$SCHEMA" >"$D/schema.json"
REQ='{"messages":[{"role":"user","content":"a person"}],"response_format":{"type":"json_schema","json_schema":{"name":"person","strict":true,"schema":'"$SCHEMA"'}},"max_tokens":400,"seed":5,"n":4,'"$BIAS"'}'
post /v1/chat/completions "$REQ" "$D/sch.json"
check json_schema_validates "$PY" - "$D/sch.json" "$D/schema.json" "$D/validate.py" <<'PYEOF'
import json, sys
exec(open(sys.argv[3]).read())
d = json.load(open(sys.argv[1])); schema = json.load(open(sys.argv[2]))
fins = [c["finish_reason"] for c in d["choices"]]
assert len(d["choices"]) == 4 and fins.count("stop") >= 3, fins
for c in d["choices"]:
    if c["finish_reason"] == "stop":
        validate(json.loads(c["message"]["content"]), schema)
texts = [c["message"]["content"] for c in d["choices"]]
assert len(set(texts)) == 4, texts
PYEOF
# the same through /v1/completions
post /v1/completions '{"prompt":"{","response_format":{"type":"json_schema","json_schema":{"schema":'"$SCHEMA"'}},"max_tokens":400,"seed":9,'"$BIAS"'}' "$D/sch_c.json"
check json_schema_completions "$PY" - "$D/sch_c.json" "$D/schema.json" "$D/validate.py" <<'PYEOF'
import json, sys
exec(open(sys.argv[3]).read())
c = json.load(open(sys.argv[1]))["choices"][0]
assert c["finish_reason"] == "stop", c
validate(json.loads(c["text"]), json.load(open(sys.argv[2])))
PYEOF
# streamed: the same text as non-streamed
sse /v1/chat/completions "${REQ%\}},\"stream\":true}" "$D/sch.sse"
check json_schema_stream_equals "$PY" - "$D/sch.sse" "$D/sch.json" <<'PYEOF'
import json, sys
raw = open(sys.argv[1]).read()
assert raw.endswith("data: [DONE]\n\n"), raw[-80:]
text = {}
for e in raw.split("\n\n")[:-2]:
    ch = json.loads(e[6:])["choices"][0]
    text[ch["index"]] = text.get(ch["index"], "") + (ch["delta"].get("content") or "")
full = json.load(open(sys.argv[2]))["choices"]
assert [text[i] for i in range(4)] == [c["message"]["content"] for c in full], (text, full)
PYEOF
# cut by max_tokens: finish_reason length (the prefix need not parse)
post /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"},"max_tokens":3,"seed":1}' "$D/short.json"
check json_length_cut "$PY" -c "import json; c=json.load(open('$D/short.json'))['choices'][0]; assert c['finish_reason']=='length' and c['message']['content'].startswith('{'), c"

# ---- refusals ----
err() { "$PY" -c "import json,sys; d=json.load(open('$D/e.json')); e=d['error']; sys.exit(0 if ('$CODE'=='400' and e['param']==sys.argv[1] and sys.argv[2] in e['message']) else 1)" "$1" "$2"; }
post /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"schema":{"type":"string","pattern":"a+"}}}}' "$D/e.json"
check schema_pattern_400 err response_format "'pattern'"
post /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"schema":{"type":"object","properties":{"a":{"type":"array","minItems":1}}}}}}' "$D/e.json"
check schema_nested_minItems_400 err response_format "'minItems'"
post /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"x"}}}' "$D/e.json"
check schema_missing_400 err response_format "schema"
post /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"yaml"}}' "$D/e.json"
check response_format_type_400 err response_format "yaml"
post /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"},"stop":["}"]}' "$D/e.json"
check stop_with_json_400 err stop "cut the JSON"
post /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"response_format":{"type":"text"},"max_tokens":2}' "$D/e.json"
check response_format_text_ok test "$CODE" = 200

# ---- tools ----
TOOLS='[{"type":"function","function":{"name":"get_weather","description":"Weather in a city","parameters":{"type":"object","properties":{"city":{"type":"string"},"unit":{"enum":["c","f"]}},"required":["city"]}}},{"type":"function","function":{"name":"get_time","parameters":{"type":"object","properties":{"tz":{"enum":["UTC","CET"]}},"required":["tz"]}}}]'
echo "$TOOLS" >"$D/tools.json"
TREQ='{"messages":[{"role":"user","content":"weather in Oslo?"}],"tools":'"$TOOLS"',"tool_choice":"required","max_tokens":200,"seed":4,"n":3,'"$BIAS"'}'
post /v1/chat/completions "$TREQ" "$D/tc.json"
check tool_required "$PY" - "$D/tc.json" "$D/tools.json" "$D/validate.py" <<'PYEOF'
import json, sys
exec(open(sys.argv[3]).read())
d = json.load(open(sys.argv[1])); tools = {t["function"]["name"]: t["function"]["parameters"] for t in json.load(open(sys.argv[2]))}
n_calls = 0
for c in d["choices"]:
    if c["finish_reason"] != "tool_calls":
        assert c["finish_reason"] == "length", c
        continue
    n_calls += 1
    m = c["message"]
    assert m["role"] == "assistant" and m["content"] is None and len(m["tool_calls"]) == 1, m
    call = m["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] in tools, call
    validate(json.loads(call["function"]["arguments"]), tools[call["function"]["name"]])
assert n_calls >= 2, d
ids = [c["message"]["tool_calls"][0]["id"] for c in d["choices"] if c["finish_reason"] == "tool_calls"]
assert len(set(ids)) == len(ids), ids
PYEOF
post /v1/chat/completions '{"messages":[{"role":"user","content":"time?"}],"tools":'"$TOOLS"',"tool_choice":{"type":"function","function":{"name":"get_time"}},"max_tokens":200,"seed":4,'"$BIAS"'}' "$D/tn.json"
check tool_named "$PY" -c "
import json; c=json.load(open('$D/tn.json'))['choices'][0]; call=c['message']['tool_calls'][0]['function']
assert c['finish_reason']=='tool_calls' and call['name']=='get_time' and json.loads(call['arguments'])['tz'] in ('UTC','CET'), c"
sse /v1/chat/completions '{"messages":[{"role":"user","content":"time?"}],"tools":'"$TOOLS"',"tool_choice":{"type":"function","function":{"name":"get_time"}},"max_tokens":200,"seed":4,"stream":true,'"$BIAS"'}' "$D/tn.sse"
check tool_stream "$PY" - "$D/tn.sse" "$D/tn.json" <<'PYEOF'
import json, sys
raw = open(sys.argv[1]).read()
assert raw.endswith("data: [DONE]\n\n"), raw[-80:]
ev = [json.loads(e[6:]) for e in raw.split("\n\n")[:-2]]
assert ev[0]["choices"][0]["delta"]["role"] == "assistant", ev[0]
calls = [ch for e in ev for ch in e["choices"] if ch["delta"].get("tool_calls")]
assert len(calls) == 1 and calls[0]["finish_reason"] == "tool_calls", ev
tc = calls[0]["delta"]["tool_calls"][0]
full = json.load(open(sys.argv[2]))["choices"][0]["message"]["tool_calls"][0]
assert tc["index"] == 0 and tc["id"].startswith("call_") and tc["function"] == full["function"], (tc, full)
assert not any(ch["delta"].get("content") for e in ev for ch in e["choices"]), ev
PYEOF
# auto (and its default): the model writes text or <tool_call> blocks; the
# random model writes text, which comes back as content, streamed the same
# (test_serve_tools checks the blocks becoming calls)
post /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"tools":'"$TOOLS"',"tool_choice":"auto","max_tokens":12,"seed":3}' "$D/auto.json"
check tool_auto_text "$PY" -c "
import json; c=json.load(open('$D/auto.json'))['choices'][0]
assert '$CODE'=='200' and isinstance(c['message']['content'], str) and 'tool_calls' not in c['message'] and c['finish_reason'] in ('stop','length'), c"
sse /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"tools":'"$TOOLS"',"max_tokens":12,"seed":3,"stream":true}' "$D/auto.sse"
check tool_auto_default_stream "$PY" - "$D/auto.sse" "$D/auto.json" <<'PYEOF'
import json, sys
raw = open(sys.argv[1]).read()
assert raw.endswith("data: [DONE]\n\n"), raw[-80:]
ev = [json.loads(e[6:]) for e in raw.split("\n\n")[:-2]]
text = "".join(ch["delta"].get("content") or "" for e in ev for ch in e["choices"])
full = json.load(open(sys.argv[2]))["choices"][0]
assert text == full["message"]["content"] and ev[-1]["choices"][0]["finish_reason"] == full["finish_reason"], (text, full)
PYEOF
post /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"tools":'"$TOOLS"',"tool_choice":"sometimes"}' "$D/e.json"
check tool_choice_bad_400 err tool_choice "required"
post /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"tools":'"$TOOLS"',"tool_choice":{"type":"function","function":{"name":"nope"}}}' "$D/e.json"
check tool_named_unknown_400 err tool_choice "name one of"
post /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","properties":{"a":{"anyOf":[]}}}}}],"tool_choice":"required"}' "$D/e.json"
check tool_schema_anyOf_400 err tools "'anyOf'"
post /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"bad name"}}],"tool_choice":"required"}' "$D/e.json"
check tool_bad_name_400 err tools "name"
post /v1/chat/completions '{"messages":[{"role":"user","content":"x"}],"tools":'"$TOOLS"',"tool_choice":"none","max_tokens":3}' "$D/e.json"
check tool_none_text "$PY" -c "import json; c=json.load(open('$D/e.json'))['choices'][0]; assert '$CODE'=='200' and isinstance(c['message']['content'], str) and 'tool_calls' not in c['message'], c"
# a conversation with a call and its result: rendered and answered
post /v1/chat/completions '{"messages":[{"role":"user","content":"time?"},{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_time","arguments":"{\"tz\":\"UTC\"}"}}]},{"role":"tool","tool_call_id":"call_1","content":"12:00"}],"tools":'"$TOOLS"',"tool_choice":"none","max_tokens":3}' "$D/hist.json"
check tool_history_ok "$PY" -c "import json; d=json.load(open('$D/hist.json')); assert '$CODE'=='200' and d['usage']['prompt_tokens'] > 300, d"
stop_checked
exit 0
