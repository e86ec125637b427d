#!/usr/bin/env bash
# t_examples.sh — the programs in examples/ (built on kiln.h alone) work:
# a hand-written training loop lowers the loss on real text, a custom loss
# checks itself against kiln_cross_entropy and finite differences, and the
# generation example produces the same greedy text as `kiln generate`.
set -u
ex="$KILN_BUILD/examples"
tmp="$KILN_TMP/examples"; mkdir -p "$tmp"
corpus=/usr/share/games/fortunes/fortunes

if [ ! -f "$corpus" ]; then
  echo "SKIP examples_train_loop: $corpus missing (apt-get install fortunes)"
else
  out=$(OMP_NUM_THREADS=1 "$ex/train_loop" "$corpus" 60 2>&1)
  line=$(echo "$out" | grep '^first=')
  first=$(echo "$line" | sed 's/first=\([0-9.]*\).*/\1/')
  last=$(echo "$line" | sed 's/.*last=\([0-9.]*\)/\1/')
  if [ -n "$first" ] && awk -v f="$first" -v l="$last" 'BEGIN{exit !(l < 0.7*f)}'; then
    echo "PASS examples_train_loop (loss $first -> $last)"
  else
    echo "$out"; echo "FAIL examples_train_loop: loss did not fall below 0.7x ($first -> $last)"
  fi
fi

out=$("$ex/custom_loss" 2>&1); rc=$?
if [ $rc -eq 0 ] && [ "$(echo "$out" | grep -c '^ok ')" -eq 3 ]; then
  echo "PASS examples_custom_loss"
else
  echo "$out"; echo "FAIL examples_custom_loss (exit $rc)"
fi

m="$tmp/model"
"$KILN" init --config "$KILN_ROOT/configs/gpt2-tiny.json" --out "$m" --seed 5 >/dev/null &&
  "$KILN" tokenizer convert --tokenizer bytes --out "$m/tokenizer.json" >/dev/null 2>&1
a=$("$ex/generate" "$m" "Hello" 40 0 2>"$tmp/ex.err"); ra=$?
b=$("$KILN" generate --model "$m" --prompt "Hello" --max-tokens 40 --temperature 0 --quiet 2>&1)
if [ $ra -eq 0 ] && [ ${#a} -gt 10 ] && [ "$a" = "$b" ] && grep -q "stopped by" "$tmp/ex.err"; then
  echo "PASS examples_generate_matches_cli"
else
  printf 'example (exit %d): %q\ncli    : %q\n' "$ra" "$a" "$b"; cat "$tmp/ex.err"; echo "FAIL examples_generate_matches_cli"
fi
