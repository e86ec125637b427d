#!/usr/bin/env bash
# t_tokenizer_train.sh — kiln tokenizer train: the incremental trainer
# learns exactly the merges of a naive recount-every-merge trainer
# (tests/js/bpe_train_ref.js), its tokenizer.json encodes text to the same
# ids in gpt-3-encoder's Encoder.js (OpenAI's encoder.py algorithm), the
# result does not depend on the thread count, the Llama-3 pattern round
# trips, Qwen2's layout (its Split regex, normalizer NFC) encodes as
# JavaScript's regex engine and String.normalize do, and bad flags give
# clear errors.
set -u
T="$KILN_TMP/train"; rm -rf "$T"; mkdir -p "$T"
JS="$KILN_ROOT/tests/js"
FORT=/usr/share/games/fortunes
ok() { echo "PASS $1"; }
no() { echo "FAIL $1: $2"; }
have_node=1
command -v node >/dev/null && [ -d "$JS/node_modules/gpt-3-encoder" ] || have_node=0
if [ ! -f "$FORT/fortunes" ]; then
  for n in train_matches_naive trained_json_encoder_js train_threads_deterministic train_llama3_roundtrip; do
    echo "SKIP $n: fortunes corpus missing (apt-get install fortunes)"; done
else
  # corpus: ~60 kB of fortunes plus multilingual text
  head -c 60000 "$FORT/computers" >"$T/small.txt"
  printf 'Café naïve 日本語のテキスト 😀😃 Ελληνικά Русский текст\n  spaces   and\ttabs\n' >>"$T/small.txt"

  # 1. same merges as the naive trainer
  "$KILN" tokenizer train --quiet --input "$T/small.txt" --vocab-size 759 --out "$T/small.json" >"$T/o1" 2>&1 \
    || no train_matches_naive "$(cat "$T/o1")"
  if [ $have_node = 0 ]; then echo "SKIP train_matches_naive: node or tests/js/node_modules missing"
  elif [ -f "$T/small.json" ]; then
    node "$JS/bpe_train_ref.js" "$T/small.txt" 500 2 >"$T/ref_merges.txt"
    node -e 'const tj=JSON.parse(require("fs").readFileSync(process.argv[1],"utf-8"));const v=tj.model.vocab;
      console.log(tj.model.merges.map(m=>{const [a,b]=Array.isArray(m)?m:m.split(" ");return v[a]+" "+v[b];}).join("\n"))' \
      "$T/small.json" >"$T/kiln_merges.txt"
    if cmp -s "$T/kiln_merges.txt" "$T/ref_merges.txt" && [ "$(wc -l <"$T/ref_merges.txt")" = 500 ]; then ok train_matches_naive
    else no train_matches_naive "merges differ: $(diff "$T/kiln_merges.txt" "$T/ref_merges.txt" | head -4 | tr '\n' ' ')"; fi
  fi

  # 2. a kiln-trained tokenizer.json in an independent encoder
  "$KILN" tokenizer train --quiet --input "$FORT" --vocab-size 3000 --out "$T/t3k.json" >"$T/o2" 2>&1 || no trained_json_encoder_js "$(cat "$T/o2")"
  head -c 40000 "$FORT/fortunes" >"$T/enc.txt"; cat "$T/small.txt" >>"$T/enc.txt"
  if [ $have_node = 0 ]; then echo "SKIP trained_json_encoder_js: node or tests/js/node_modules missing"
  elif [ -f "$T/t3k.json" ]; then
    "$KILN" tokenizer encode --tokenizer "$T/t3k.json" --input "$T/enc.txt" >"$T/k.ids"
    node "$JS/gpt2_ref.js" gpt3enc "$T/t3k.json" "$T/enc.txt" >"$T/g.ids"
    if [ -s "$T/k.ids" ] && cmp -s "$T/k.ids" "$T/g.ids"; then ok trained_json_encoder_js; echo "  $(wc -w <"$T/k.ids") ids identical"
    else no trained_json_encoder_js "ids differ"; fi
  fi

  # 3. thread count does not change the result
  "$KILN" tokenizer train --quiet --threads 1 --input "$FORT" --vocab-size 1000 --out "$T/a.json" >/dev/null 2>&1
  "$KILN" tokenizer train --quiet --threads 2 --input "$FORT" --vocab-size 1000 --out "$T/b.json" >/dev/null 2>&1
  if [ -s "$T/a.json" ] && cmp -s "$T/a.json" "$T/b.json"; then ok train_threads_deterministic; else no train_threads_deterministic "outputs differ"; fi

  # 4. llama3 pattern: saved as Split + ByteLevel, reloads to the same ids, decodes exactly
  "$KILN" tokenizer train --quiet --pattern llama3 --input "$T/small.txt" --vocab-size 600 --special '<|user|>' --out "$T/l3.json" >"$T/o4" 2>&1
  printf 'Numbers 1234567 and DON'"'"'T stop.\n\n\xff\xfe bytes 日本語\n' >"$T/l3.txt"
  "$KILN" tokenizer encode --tokenizer "$T/l3.json" --input "$T/l3.txt" >"$T/l3.ids" 2>&1
  "$KILN" tokenizer decode --tokenizer "$T/l3.json" --input "$T/l3.ids" >"$T/l3.back" 2>&1
  "$KILN" tokenizer convert --tokenizer "$T/l3.json" --out "$T/l3b.json" >/dev/null 2>&1
  "$KILN" tokenizer encode --tokenizer "$T/l3b.json" --input "$T/l3.txt" >"$T/l3b.ids" 2>&1
  if grep -q '"Split"' "$T/l3.json" && grep -q '<|user|>' "$T/l3.json" && cmp -s "$T/l3.txt" "$T/l3.back" \
     && cmp -s "$T/l3.ids" "$T/l3b.ids" && cmp -s "$T/l3.json" "$T/l3b.json"; then ok train_llama3_roundtrip
  else no train_llama3_roundtrip "$(cat "$T/o4" "$T/l3.ids" | head -5)"; fi
fi

# 5. Llama-3 pattern: kiln (PCRE2) against JavaScript's regex engine and
#    an independent merge-rank BPE (gpt2_ref.js bpe-json) on mixed text
if [ $have_node = 0 ] || [ ! -f "$FORT/fortunes" ]; then echo "SKIP llama3_matches_js: node, node_modules or fortunes missing"
else
  "$KILN" tokenizer train --quiet --pattern llama3 --input "$FORT" --vocab-size 2000 --out "$T/l3k.json" >/dev/null 2>&1
  { head -c 50000 "$FORT/fortunes"; cat "$T/small.txt"
    printf "DON'T I'M it'S Ll 12345678 1,234.5 x\r\n\r\n  y  \n\t\tz!!!\n\n  \n"; } >"$T/l3in.txt"
  "$KILN" tokenizer encode --tokenizer "$T/l3k.json" --input "$T/l3in.txt" >"$T/l3.k" 2>&1
  node "$JS/gpt2_ref.js" bpe-json "$T/l3k.json" "$T/l3in.txt" >"$T/l3.r" 2>&1
  if [ -s "$T/l3.k" ] && cmp -s "$T/l3.k" "$T/l3.r"; then ok llama3_matches_js; echo "  $(wc -w <"$T/l3.k") ids identical"
  else no llama3_matches_js "$(head -c 200 "$T/l3.r")"; fi
fi

# 5b. Qwen2's layout: its Split regex (digits one by one) and normalizer
#     NFC, on text with decomposed accents, against JavaScript's regex
#     engine and String.normalize('NFC')
QW_RX="(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
if [ $have_node = 0 ] || [ ! -f "$FORT/fortunes" ]; then echo "SKIP qwen2_matches_js: node, node_modules or fortunes missing"
else
  { head -c 40000 "$FORT/fortunes"; printf 'Caf\xc3\xa9 cafe\xcc\x81 na\xc3\xafve nai\xcc\x88ve \xe1\x84\x80\xe1\x85\xa1 12345 3.14159 DON'"'"'T\r\n'; } >"$T/qwtrain.txt"
  "$KILN" tokenizer train --quiet --pattern "$QW_RX" --input "$T/qwtrain.txt" --vocab-size 1200 --out "$T/qwk0.json" >"$T/o5" 2>&1
  /usr/bin/python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); j["normalizer"]={"type":"NFC"}; json.dump(j,open(sys.argv[2],"w"))' "$T/qwk0.json" "$T/qwk.json" 2>>"$T/o5"
  { head -c 30000 "$FORT/fortunes" | tail -c 20000; printf 'cafe\xcc\x81 Cafe\xcc\x81! \xe1\x84\x80\xe1\x85\xa1\xe1\x86\xa8 A\xcc\x8a 2024-01-02 99 bottles\n'; } >"$T/qwin.txt"
  "$KILN" tokenizer encode --tokenizer "$T/qwk.json" --input "$T/qwin.txt" >"$T/qw.k" 2>&1
  node "$JS/gpt2_ref.js" bpe-json "$T/qwk.json" "$T/qwin.txt" >"$T/qw.r" 2>&1
  # without the normalizer the decomposed text gives other ids: NFC is exercised
  node "$JS/gpt2_ref.js" bpe-json "$T/qwk0.json" "$T/qwin.txt" >"$T/qw0.r" 2>&1
  if [ -s "$T/qw.k" ] && cmp -s "$T/qw.k" "$T/qw.r" && ! cmp -s "$T/qw.r" "$T/qw0.r"; then
    ok qwen2_matches_js; echo "  $(wc -w <"$T/qw.k") ids identical"
  else no qwen2_matches_js "$(cat "$T/o5"; head -c 200 "$T/qw.k"; echo; head -c 200 "$T/qw.r")"; fi
fi

# 6. errors
"$KILN" tokenizer train --input "$KILN_ROOT/README.md" --vocab-size 100 --out "$T/x.json" >"$T/e1" 2>&1; rc=$?
if [ $rc -ne 0 ] && grep -q -- "--vocab-size 100" "$T/e1"; then ok train_vocab_too_small; else no train_vocab_too_small "rc $rc $(cat "$T/e1")"; fi
"$KILN" tokenizer train --input "$KILN_ROOT/README.md" --vocab-size 100000000 --out "$T/x.json" >"$T/e2" 2>&1; rc=$?
if [ $rc -ne 0 ] && grep -q -- "--vocab-size" "$T/e2"; then ok train_vocab_too_large; else no train_vocab_too_large "rc $rc"; fi
"$KILN" tokenizer train --input "$T/missing.txt" --vocab-size 1000 --out "$T/x.json" >"$T/e3" 2>&1; rc=$?
if [ $rc -ne 0 ] && grep -q "missing.txt" "$T/e3"; then ok train_missing_input; else no train_missing_input "rc $rc"; fi
"$KILN" tokenizer train --input "$KILN_ROOT/README.md" --pattern '([' --out "$T/x.json" >"$T/e4" 2>&1; rc=$?
if [ $rc -ne 0 ] && grep -q -- "--pattern" "$T/e4"; then ok train_bad_pattern; else no train_bad_pattern "rc $rc $(cat "$T/e4")"; fi
exit 0
