#!/usr/bin/env bash
# t_spec.sh — `kiln generate --draft`: greedy ids identical to the target
# alone (gpt2 target, a smaller random draft and the target itself as
# draft, K = 1, 3, 8), the stats line reports the acceptance, and bad
# drafts get clear errors: another vocabulary size, --draft-tokens out of
# range, a missing draft.
set -u
T="$KILN_TMP/t_spec"; rm -rf "$T"; mkdir -p "$T"
ok() { echo "PASS $1"; }
no() { echo "FAIL $1: $2"; }
cfg() { # layers embd vocab
  printf '{"model_type": "gpt2", "n_layer": %d, "n_embd": %d, "n_head": 4, "n_positions": 128, "vocab_size": %d, "bos_token_id": 256, "eos_token_id": 256}\n' "$1" "$2" "$3"
}
cfg 3 64 257 > "$T/t.json"; cfg 1 32 257 > "$T/d.json"; cfg 1 32 300 > "$T/v.json"
for m in t d v; do
  "$KILN" init --config "$T/$m.json" --out "$T/$m" --seed 3 >/dev/null 2>&1 || { no init "kiln init $m failed"; exit 0; }
done
gen() { "$KILN" generate --model "$T/t" --tokenizer bytes --prompt "Hello there" --max-tokens 40 \
          --temperature 0 --ignore-eos --threads 1 --print-ids "$@"; }
base=$(gen 2>/dev/null | tail -n 1)
[ -n "$base" ] || no base "no ids from the target alone"
fail=0
for d in d t; do
  for k in 1 3 8; do
    got=$(gen --draft "$T/$d" --draft-tokens $k 2>"$T/err" | tail -n 1)
    [ "$got" = "$base" ] || { no "greedy_${d}_k$k" "ids differ: '$got' vs '$base'"; fail=1; }
  done
done
[ $fail = 0 ] && ok greedy_ids_identical
if grep -q "draft 8 tokens/step: accepted [0-9]* of [0-9]* (" "$T/err" &&
   grep -q "speed-up" "$T/err"; then ok stats_line; else no stats_line "$(cat "$T/err")"; fi
# the target as its own draft accepts everything
gen --draft "$T/t" --draft-tokens 4 2>"$T/err2" >/dev/null
if grep -q "(100.0%)" "$T/err2"; then ok self_draft_all_accepted; else no self_draft_all_accepted "$(cat "$T/err2")"; fi
out=$(gen --draft "$T/v" 2>&1 >/dev/null); rc=$?
if [ $rc -ne 0 ] && grep -q "vocabulary is 300 tokens and the target's 257" <<<"$out"; then ok vocab_refused
else no vocab_refused "rc $rc: $out"; fi
out=$(gen --draft "$T/d" --draft-tokens 0 2>&1 >/dev/null); rc=$?
if [ $rc -ne 0 ] && grep -q -- "--draft-tokens 0 must be in 1..16" <<<"$out"; then ok draft_tokens_range
else no draft_tokens_range "rc $rc: $out"; fi
out=$(gen --draft "$T/none" 2>&1 >/dev/null); rc=$?
if [ $rc -ne 0 ] && [ $rc -lt 124 ] && grep -q "$T/none" <<<"$out"; then ok missing_draft
else no missing_draft "rc $rc: $out"; fi

# ---- kiln serve --draft ----------------------------------------------------
D="$T"
. "$(dirname "$0")/lib_serve.sh"
prompts=("Hello there" "The quick brown fox" "%%" "Once upon a time")
# the target alone, by kiln generate (greedy, 24 tokens)
for i in 0 1 2 3; do
  "$KILN" generate --model "$T/t" --tokenizer bytes --prompt "${prompts[$i]}" --max-tokens 24 \
    --temperature 0 --ignore-eos --threads 1 --no-echo 2>/dev/null | head -c -1 > "$T/want$i"
done
if serve_start "$T/t" --draft "$T/d" --draft-tokens 3 --parallel 2 --threads 1; then
  # four requests at once over two slots: drafting batched over the slots
  for i in 0 1 2 3; do
    body=$(python3 -c 'import json,sys; print(json.dumps({"prompt": sys.argv[1], "max_tokens": 24, "temperature": 0, "ignore_eos": True}))' "${prompts[$i]}")
    curl -s "http://127.0.0.1:$PORT/v1/completions" -d "$body" > "$T/got$i.json" &
  done
  wait $(jobs -p | grep -v "^$SPID$") 2>/dev/null
  same=1
  for i in 0 1 2 3; do
    got=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["choices"][0]["text"], end="")' "$T/got$i.json" 2>/dev/null)
    [ "$got" = "$(cat "$T/want$i")" ] || { same=0; DETAIL="prompt $i: '$got' vs '$(cat "$T/want$i")'"; }
  done
  check serve_greedy_identical [ $same = 1 ]
  # a grammar request decodes without the draft (and still works)
  out=$(curl -s "http://127.0.0.1:$PORT/v1/chat/completions" \
    -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":8,"response_format":{"type":"json_object"}}')
  DETAIL="$out"; check serve_grammar_falls_back grep -q '"choices"' <<<"$out"
  m=$(curl -s "http://127.0.0.1:$PORT/metrics")
  drafted=$(sed -n 's/^kiln_spec_draft_tokens_total \([0-9]*\)$/\1/p' <<<"$m")
  acc=$(sed -n 's/^kiln_spec_accepted_tokens_total \([0-9]*\)$/\1/p' <<<"$m")
  DETAIL="$(grep spec <<<"$m")"
  metrics_ok() { [ "${drafted:-0}" -gt 0 ] && [ -n "$acc" ] && [ "$acc" -le "$drafted" ] &&
                 grep -q '^kiln_spec_acceptance_rate [01]\.[0-9]*$' <<<"$m"; }
  check serve_metrics metrics_ok
  stop_checked
fi
out=$("$KILN" serve --model "$T/t" --tokenizer bytes --port 0 --draft "$T/v" 2>&1 >/dev/null); rc=$?
if [ $rc -ne 0 ] && [ $rc -lt 124 ] && grep -q "vocabulary is 300 tokens" <<<"$out"; then ok serve_vocab_refused
else no serve_vocab_refused "rc $rc: $out"; fi
