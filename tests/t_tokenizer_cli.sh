#!/usr/bin/env bash
# t_tokenizer_cli.sh — kiln tokenize and kiln tokenizer encode/decode from
# the command line: data directory layout, exact shard contents for the
# bytes tokenizer, JSONL input, bad-line reporting, and error exits.
set -u
T="$KILN_TMP/tokcli"; rm -rf "$T"; mkdir -p "$T/in/sub"
ok() { echo "PASS $1"; }
no() { echo "FAIL $1: $2"; }

# --- bytes tokenizer: exact shard contents ------------------------------
printf 'ab' >"$T/in/a.txt"
printf 'c\n' >"$T/in/sub/b.txt"
printf '.hidden' >"$T/in/.h.txt"
if "$KILN" tokenize --quiet --tokenizer bytes --input "$T/in" --out "$T/d1" >"$T/o1" 2>&1; then
  # train_0000.bin: 32-byte header, then uint16 tokens: eot a b eot c \n
  got=$(od -An -tu2 -j32 -v "$T/d1/train_0000.bin" | tr -s ' \n' ' ' | sed 's/^ //; s/ $//')
  if [ "$got" = "256 97 98 256 99 10" ]; then ok tokenize_bytes_shard; else no tokenize_bytes_shard "tokens '$got'"; fi
  if grep -q '"format": "kiln-tokens"' "$T/d1/meta.json" && grep -q '"train_tokens": 6' "$T/d1/meta.json" \
     && grep -q '"eot": 256' "$T/d1/meta.json" && grep -q '"vocab_size": 257' "$T/d1/meta.json" \
     && [ -f "$T/d1/tokenizer.json" ]; then ok tokenize_meta; else no tokenize_meta "$(cat "$T/d1/meta.json")"; fi
else
  no tokenize_bytes_shard "$(cat "$T/o1")"; no tokenize_meta "tokenize failed"
fi

# --- JSONL with --field, a blank line, and the validation split -----------
{
  for i in $(seq 1 40); do printf '{"body": "document number %d with some text"}\n' "$i"; done
  printf '\n'
} >"$T/c.jsonl"
if "$KILN" tokenize --quiet --input "$T/c.jsonl" --field body --val-fraction 0.1 --out "$T/d2" >"$T/o2" 2>&1; then
  tr_t=$(sed -n 's/.*"train_tokens": \([0-9]*\).*/\1/p' "$T/d2/meta.json")
  va_t=$(sed -n 's/.*"val_tokens": \([0-9]*\).*/\1/p' "$T/d2/meta.json")
  total=0; for i in $(seq 1 40); do s="document number $i with some text"; total=$((total + ${#s} + 1)); done
  if [ "$((tr_t + va_t))" = "$total" ] && [ "$va_t" -gt 0 ] && [ -f "$T/d2/val_0000.bin" ]; then
    ok tokenize_jsonl_split; else no tokenize_jsonl_split "train $tr_t val $va_t expected total $total"; fi
else
  no tokenize_jsonl_split "$(cat "$T/o2")"
fi

# --- malformed JSONL lines: every one reported by line, non-zero exit ----
printf '{"text": "fine"}\n{"text": 3}\n{"txt": "x"}\n{"text": "ok"}\nnot json\n' >"$T/bad.jsonl"
if "$KILN" tokenize --quiet --input "$T/bad.jsonl" --out "$T/d3" >"$T/o3" 2>&1; then
  no tokenize_bad_lines "exit 0"
elif grep -q 'bad.jsonl:2: field "text" must be a string' "$T/o3" && grep -q 'bad.jsonl:3: field "text" is missing' "$T/o3" \
     && grep -q 'bad.jsonl:5: invalid JSON' "$T/o3" && grep -q '3 malformed JSONL lines' "$T/o3" && [ ! -f "$T/d3/meta.json" ]; then
  ok tokenize_bad_lines
else
  no tokenize_bad_lines "$(cat "$T/o3")"
fi
if "$KILN" tokenize --quiet --skip-bad --input "$T/bad.jsonl" --out "$T/d4" >"$T/o4" 2>&1 \
   && grep -q '"train_tokens": 8' "$T/d4/meta.json"; then ok tokenize_skip_bad; else no tokenize_skip_bad "$(cat "$T/o4")"; fi

# --- usage errors -------------------------------------------------------
"$KILN" tokenize --input /nonexistent/x --out "$T/d5" >"$T/o5" 2>&1; rc=$?
if [ $rc -ne 0 ] && grep -q "/nonexistent/x" "$T/o5"; then ok tokenize_missing_input; else no tokenize_missing_input "rc $rc $(cat "$T/o5")"; fi
"$KILN" tokenize --input "$T/in" --out "$T/d6" --val-fraction 1.5 >"$T/o6" 2>&1; rc=$?
if [ $rc -ne 0 ] && grep -q "val-fraction" "$T/o6"; then ok tokenize_bad_fraction; else no tokenize_bad_fraction "rc $rc"; fi
"$KILN" tokenize --tokenizer /nonexistent/tok.json --input "$T/in" --out "$T/d7" >"$T/o7" 2>&1; rc=$?
if [ $rc -ne 0 ] && grep -q "/nonexistent/tok.json" "$T/o7"; then ok tokenize_bad_tokenizer; else no tokenize_bad_tokenizer "rc $rc"; fi

# --- encode / decode round trip with the bytes tokenizer ----------------
printf 'h\xc3\xa9llo \xff!' >"$T/e.txt"
ids=$("$KILN" tokenizer encode --tokenizer bytes --input "$T/e.txt")
if [ "$ids" = "104 195 169 108 108 111 32 255 33" ]; then ok encode_bytes; else no encode_bytes "got '$ids'"; fi
echo "$ids" | "$KILN" tokenizer decode --tokenizer bytes >"$T/e.out"
if cmp -s "$T/e.txt" "$T/e.out"; then ok decode_bytes; else no decode_bytes "bytes differ"; fi
json=$("$KILN" tokenizer encode --tokenizer bytes --json --input "$T/e.txt")
if [ "$json" = "[104, 195, 169, 108, 108, 111, 32, 255, 33]" ]; then ok encode_json; else no encode_json "got '$json'"; fi
echo "1 2 999" | "$KILN" tokenizer decode --tokenizer bytes >"$T/o8" 2>&1; rc=$?
if [ $rc -ne 0 ] && grep -q "999" "$T/o8"; then ok decode_out_of_range; else no decode_out_of_range "rc $rc"; fi

# --- thread count and sharding do not change the token stream ----------
FORT=/usr/share/games/fortunes
if [ -d "$FORT" ]; then
  "$KILN" tokenizer train --quiet --input "$FORT/computers" --vocab-size 800 --out "$T/t800.json" >/dev/null 2>&1
  "$KILN" tokenize --quiet --tokenizer "$T/t800.json" --input "$FORT" --doc-separator % --val-fraction 0.1 --threads 1 --out "$T/th1" >/dev/null 2>&1
  "$KILN" tokenize --quiet --tokenizer "$T/t800.json" --input "$FORT" --doc-separator % --val-fraction 0.1 --threads 2 --shard-tokens 50000 --out "$T/th2" >/dev/null 2>&1
  cat_tokens() { for f in "$@"; do od -An -tu2 -j32 -v "$f"; done | tr -s ' \n' '\n' | sed '/^$/d'; }
  cat_tokens "$T"/th1/train_*.bin >"$T/th1.t"; cat_tokens "$T"/th2/train_*.bin >"$T/th2.t"
  cat_tokens "$T"/th1/val_*.bin >"$T/th1.v"; cat_tokens "$T"/th2/val_*.bin >"$T/th2.v"
  n2=$(ls "$T"/th2/train_*.bin | wc -l)
  if [ -s "$T/th1.t" ] && [ -s "$T/th1.v" ] && cmp -s "$T/th1.t" "$T/th2.t" && cmp -s "$T/th1.v" "$T/th2.v" && [ "$n2" -gt 1 ]; then
    ok tokenize_threads_shards_same_stream; else no tokenize_threads_shards_same_stream "streams differ ($n2 shards)"; fi
else
  echo "SKIP tokenize_threads_shards_same_stream: fortunes corpus missing"
fi

# --- chat rendering from the command line (bytes: markers as text) ------
printf '[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]' >"$T/chat.json"
"$KILN" tokenizer encode --tokenizer bytes --chat --input "$T/chat.json" >"$T/chat.out" 2>&1
head -1 "$T/chat.out" | "$KILN" tokenizer decode --tokenizer bytes >"$T/chat.txt"
want=$(printf '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n')
ones=$(sed -n 's/^mask://p' "$T/chat.out" | tr ' ' '\n' | grep -c '^1$')
if [ "$(cat "$T/chat.txt")" = "$want" ] && [ "$ones" = 12 ]; then ok encode_chat; else no encode_chat "$(cat "$T/chat.out" | head -c 300)"; fi

# --- dataset validation: every bad line by number ------------------------
printf '{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}\n{"messages":[{"role":"bot","content":"x"}]}\n{"prompt":"p"}\n' >"$T/sft.jsonl"
"$KILN" tokenize --tokenizer bytes --dataset sft --input "$T/sft.jsonl" >"$T/ds.out" 2>&1; rc=$?
if [ $rc -ne 0 ] && grep -q 'sft.jsonl:2: messages\[0\]: unknown role "bot"' "$T/ds.out" \
   && grep -q 'sft.jsonl:3: field "completion" is missing' "$T/ds.out" && grep -q '2 malformed lines' "$T/ds.out"; then
  ok dataset_check_bad_lines; else no dataset_check_bad_lines "rc $rc $(cat "$T/ds.out")"; fi
"$KILN" tokenize --tokenizer bytes --dataset sft --skip-bad --input "$T/sft.jsonl" >"$T/ds2.out" 2>&1
if grep -q '3 lines, 1 examples' "$T/ds2.out" && grep -q '2 malformed' "$T/ds2.out"; then ok dataset_check_stats; else no dataset_check_stats "$(cat "$T/ds2.out")"; fi
# --- --add-special: a Llama 3 style post_processor (ByteLevel, then a
# template putting <|begin_of_text|> first), as Hugging Face's
# add_special_tokens=True: that id, then the text's own ids ---------------
printf 'the cat sat on the mat\nthe dog sat\n' >"$T/pp.txt"
if "$KILN" tokenizer train --input "$T/pp.txt" --vocab-size 270 --out "$T/pp.json" --quiet >/dev/null 2>&1 &&
   /usr/bin/python3 - "$T/pp.json" <<'EOF'
import json, sys
p = sys.argv[1]
t = json.load(open(p))
bid = max(a["id"] for a in t["added_tokens"]) + 1
t["added_tokens"].append({"id": bid, "content": "<|begin_of_text|>", "single_word": False,
    "lstrip": False, "rstrip": False, "normalized": False, "special": True})
t["post_processor"] = {"type": "Sequence", "processors": [
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
    {"type": "TemplateProcessing",
     "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}],
     "pair": [], "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>",
                                                          "ids": [bid], "tokens": ["<|begin_of_text|>"]}}}]}
json.dump(t, open(p, "w"))
open(p + ".bid", "w").write(str(bid))
EOF
then
  bid=$(cat "$T/pp.json.bid")
  plain=$(printf 'the cat' | "$KILN" tokenizer encode --tokenizer "$T/pp.json")
  full=$(printf 'the cat' | "$KILN" tokenizer encode --tokenizer "$T/pp.json" --add-special)
  if [ -n "$plain" ] && [ "$full" = "$bid $plain" ]; then ok encode_add_special_bos
  else no encode_add_special_bos "plain '$plain' with --add-special '$full' (BOS $bid)"; fi
  spec=$(printf 'the<|begin_of_text|>' | "$KILN" tokenizer encode --tokenizer "$T/pp.json" --add-special --special)
  case "$spec" in "$bid "*" $bid") ok encode_add_special_with_special ;;
    *) no encode_add_special_with_special "'$spec'" ;; esac
else
  no encode_add_special_bos "setup failed"
fi
"$KILN" tokenizer encode --tokenizer bytes --chat --add-special </dev/null >"$T/oas" 2>&1
if [ $? -eq 2 ] && grep -q -- '--add-special is for text' "$T/oas"; then ok encode_add_special_chat_refused
else no encode_add_special_chat_refused "$(cat "$T/oas")"; fi

exit 0
