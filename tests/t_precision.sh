#!/usr/bin/env bash
# t_precision.sh — `kiln train --precision` end to end on a tiny model:
#   - bad --precision values are refused naming the flag (exit 2);
#   - bf16 and fp32 runs start from the same loss and end close; the banner
#     names the precision and the kernels;
#   - fp16 at the default loss scale tracks fp32 step by step (loss and the
#     logged grad_norm, which must be the unscaled gradient's);
#   - fp16 with an overflowing initial loss scale (KILN_LOSS_SCALE=2^40):
#     steps are skipped with a log line, metrics.jsonl carries loss_scale /
#     skipped, the scale halves on each skip, then training proceeds;
#   - the scaler state is in trainer_state.json and a resumed fp16 run
#     continues from that scale (stop + resume == straight run, bit for bit);
#   - --loss-scale (over KILN_LOSS_SCALE) sets the first scale; bad
#     --bf16-kernel / KILN_OPTIM_KERNEL values are refused naming them;
#   - fp16 diverging at --lr 10 warns that the loss scale fell below 1;
#   - --precision auto logs its choice and reason once and caches the probe.
set -u
if [ ! -x "$KILN" ]; then echo "FAIL precision_cli: $KILN not built"; exit 0; fi
W="$KILN_TMP/precision"
rm -rf "$W"; mkdir -p "$W"
awk 'BEGIN { srand(3); for (i = 0; i < 2000; i++) { n = int(rand() * 10) + 3;
  line = ""; for (j = 0; j < n; j++) line = line sprintf("%c", 97 + int(rand() * 26));
  printf "%s %d a stitch in time saves %s\n", line, i, (i % 2 ? "nine" : "ten") } }' >"$W/corpus.txt"
"$KILN" tokenize --tokenizer bytes --input "$W/corpus.txt" --out "$W/data" --quiet >/dev/null 2>&1 \
  || { echo "FAIL precision_setup: kiln tokenize failed"; exit 0; }
cat >"$W/tiny.json" <<'EOF2'
{"model_type": "gpt2", "vocab_size": 257, "n_layer": 2, "n_embd": 64, "n_head": 2,
 "n_positions": 32, "bos_token_id": 256, "eos_token_id": 256}
EOF2
COMMON=(--data "$W/data" --config "$W/tiny.json" --seq 32 --batch 8 --warmup 2 --lr 3e-3
        --eval-every 0 --progress lines --log-every 5 --threads 1)
field() { grep -o "\"$2\": *[-0-9.e+a-z]*" "$1" | sed "s/\"$2\": *//"; }

# 1. bad values
out=$("$KILN" train "${COMMON[@]}" --steps 2 --out "$W/bad" --precision fp8 2>&1); rc=$?
if [ $rc -eq 2 ] && echo "$out" | grep -q -- "--precision 'fp8'"; then echo "PASS precision_bad_value"
else echo "FAIL precision_bad_value: rc=$rc: $out"; fi

# 2. fp32 vs bf16
timeout 300 "$KILN" train "${COMMON[@]}" --steps 30 --out "$W/f32" --precision fp32 >"$W/f32.log" 2>&1
timeout 300 "$KILN" train "${COMMON[@]}" --steps 30 --out "$W/b16" --precision bf16 >"$W/b16.log" 2>&1
a0=$(field "$W/f32/metrics.jsonl" loss | head -1); b0=$(field "$W/b16/metrics.jsonl" loss | head -1)
a1=$(field "$W/f32/metrics.jsonl" loss | tail -1); b1=$(field "$W/b16/metrics.jsonl" loss | tail -1)
if [ -n "$a1" ] && [ -n "$b1" ] && awk -v a0="$a0" -v b0="$b0" -v a="$a1" -v b="$b1" \
   'BEGIN { d0 = (a0 - b0) / a0; d = (a - b) / a; if (d0 < 0) d0 = -d0; if (d < 0) d = -d;
            exit !(d0 < 0.01 && d < 0.05 && a < a0 - 0.5) }' \
   && grep -q "precision: bf16 matrix products" "$W/b16.log" && grep -q "precision: fp32" "$W/f32.log"; then
  echo "PASS precision_bf16_tracks_fp32 (loss fp32 $a0 -> $a1, bf16 $b0 -> $b1)"
else echo "FAIL precision_bf16_tracks_fp32: fp32 $a0 -> $a1, bf16 $b0 -> $b1"; tail -3 "$W/b16.log"; fi
if grep -q '"precision": "bf16"' "$W/b16/step_00000030/trainer_state.json"; then echo "PASS precision_saved_in_state"
else echo "FAIL precision_saved_in_state"; fi

# 2b. fp16 with the default loss scale (65536, no overflow here) against
#     the same fp32 run, step by step: the loss within 0.5% and the logged
#     grad_norm (the true, unscaled gradient's) within 5% at every step,
#     and of the fp32 size (measured: loss within 6e-5 relative, grad_norm
#     within 0.4%). A norm left scaled, or clipping on the scaled norm,
#     fails this at step 1.
timeout 300 "$KILN" train "${COMMON[@]}" --steps 30 --out "$W/h16d" --precision fp16 >"$W/h16d.log" 2>&1
pairs() { paste <(field "$1" loss) <(field "$1" grad_norm); }
if [ -s "$W/h16d/metrics.jsonl" ] && grep -q '"loss_scale": *65536' "$W/h16d/metrics.jsonl" && \
   paste <(pairs "$W/f32/metrics.jsonl") <(pairs "$W/h16d/metrics.jsonl") | awk '
     function abs(x) { return x < 0 ? -x : x }
     NF != 4 { bad = "step " NR ": missing values"; exit }
     { if (abs($3 - $1) > 0.005 * abs($1)) { bad = "step " NR ": loss fp32 " $1 " fp16 " $3; exit }
       if (abs($4 - $2) > 0.05 * abs($2) || $4 <= 0) { bad = "step " NR ": grad_norm fp32 " $2 " fp16 " $4; exit }
       n++ }
     END { if (bad != "" || n != 30) { print (bad != "" ? bad : n " steps"); exit 1 } }' >"$W/h16d.cmp"; then
  echo "PASS precision_fp16_tracks_fp32 (30 steps: loss within 0.5%, grad_norm within 5%)"
else echo "FAIL precision_fp16_tracks_fp32: $(cat "$W/h16d.cmp" 2>/dev/null)"; tail -3 "$W/h16d.log"; fi

# 3. fp16 with an overflowing loss scale: skips, halving, then progress
KILN_LOSS_SCALE=1099511627776 timeout 300 "$KILN" train "${COMMON[@]}" --steps 40 --save-every 20 \
  --out "$W/h16" --precision fp16 >"$W/h16.log" 2>&1
nskip=$(grep -c '"skipped": *true' "$W/h16/metrics.jsonl")
first=$(field "$W/h16/metrics.jsonl" loss_scale | head -1); second=$(field "$W/h16/metrics.jsonl" loss_scale | sed -n 2p)
last_scale=$(field "$W/h16/metrics.jsonl" loss_scale | tail -1)
l0=$(field "$W/h16/metrics.jsonl" loss | head -1); l1=$(field "$W/h16/metrics.jsonl" loss | tail -1)
if [ "$nskip" -ge 3 ] && [ "$nskip" -lt 40 ] && grep -q "skipped: inf/NaN gradient at loss scale" "$W/h16.log" \
   && awk -v a="$first" -v b="$second" -v c="$last_scale" -v l0="$l0" -v l1="$l1" \
      'BEGIN { exit !(a == 2 * b && c < a && l1 < l0 - 0.3) }'; then
  echo "PASS precision_fp16_skips_and_backs_off ($nskip skipped, scale $first -> $last_scale, loss $l0 -> $l1)"
else echo "FAIL precision_fp16_skips_and_backs_off: skipped=$nskip scale $first, $second .. $last_scale loss $l0 -> $l1"; tail -5 "$W/h16.log"; fi
sc=$(grep -A3 '"scaler"' "$W/h16/step_00000040/trainer_state.json" | grep -o '"scale": *[0-9.e+]*' | sed 's/.*: *//')
if [ -n "$sc" ] && awk -v s="$sc" -v c="$last_scale" 'BEGIN { exit !(s > 0 && s <= c) }'; then
  echo "PASS precision_scaler_in_state (scale $sc)"
else echo "FAIL precision_scaler_in_state: '$sc'"; fi

# 4. resume continues the scale: stop at 20, resume to 40 == straight run
KILN_LOSS_SCALE=1099511627776 timeout 300 "$KILN" train "${COMMON[@]}" --steps 40 --save-every 20 \
  --stop-at 20 --out "$W/r16" --precision fp16 >"$W/r16a.log" 2>&1
timeout 300 "$KILN" train --resume "$W/r16" --progress lines --threads 1 >"$W/r16b.log" 2>&1
if [ -f "$W/r16/step_00000040/model.safetensors" ] && \
   cmp -s "$W/h16/step_00000040/model.safetensors" "$W/r16/step_00000040/model.safetensors" && \
   diff <(field "$W/h16/metrics.jsonl" loss_scale) <(field "$W/r16/metrics.jsonl" loss_scale) >/dev/null; then
  echo "PASS precision_fp16_resume_exact"
else echo "FAIL precision_fp16_resume_exact"; tail -3 "$W/r16b.log"; fi

# 5. the settings' flags and the variables the CLI maps onto the same
#    fields: --loss-scale wins over KILN_LOSS_SCALE; bad values name the
#    flag or the variable (exit 2)
KILN_LOSS_SCALE=1099511627776 timeout 300 "$KILN" train "${COMMON[@]}" --steps 2 --out "$W/ls" \
  --precision fp16 --loss-scale 1024 --optim-kernel portable --bf16-kernel ref >"$W/ls.log" 2>&1
if awk -v s="$(field "$W/ls/metrics.jsonl" loss_scale | head -1)" 'BEGIN { exit !(s == 1024) }'; then echo "PASS precision_loss_scale_flag"
else echo "FAIL precision_loss_scale_flag: $(field "$W/ls/metrics.jsonl" loss_scale | head -1)"; tail -3 "$W/ls.log"; fi
o1=$("$KILN" train "${COMMON[@]}" --steps 2 --out "$W/bad2" --bf16-kernel avx2 2>&1); r1=$?
o2=$(KILN_OPTIM_KERNEL=fast "$KILN" train "${COMMON[@]}" --steps 2 --out "$W/bad3" 2>&1); r2=$?
if [ $r1 -eq 2 ] && echo "$o1" | grep -q -- "--bf16-kernel 'avx2'" &&
   [ $r2 -eq 2 ] && echo "$o2" | grep -q "KILN_OPTIM_KERNEL 'fast'"; then echo "PASS precision_settings_bad_values"
else echo "FAIL precision_settings_bad_values: $r1 '$o1' / $r2 '$o2'"; fi

# 6. fp16 at a learning rate that diverges (--lr 10): the loss scale falls
#    below 1 and the run warns, saying what it means, once and again per
#    factor of 10 (a few lines, not one per skipped step); the normal fp16
#    run (2b) and the overflowing initial scale of 3 (skips at scales >= 1)
#    do not warn.
timeout 300 "$KILN" train "${COMMON[@]}" --steps 40 --warmup 0 --lr 10 --out "$W/lr10" \
  --precision fp16 >"$W/lr10.log" 2>&1
nwarn=$(grep -c "^kiln: warn: .*loss scale fell to .*below 1: the gradients overflow fp16 even unscaled" "$W/lr10.log")
nskip=$(grep -c "skipped: inf/NaN" "$W/lr10.log")
minscale=$(field "$W/lr10/metrics.jsonl" loss_scale | sort -g | head -1)
# Whether --lr 10 drives the scale below 1 depends on the fp16 products:
# the native AMX/AVX-512 kernels overflow (~25 skips, scale ~1e-3); the
# portable build's did not (one skip, scale 32768). Then the rule "no
# warning while the scale is >= 1" is what can be checked here, and the
# warning itself is a SKIP (test_scaler checks scaler_warn_low directly).
if awk -v s="$minscale" 'BEGIN { exit !(s < 1) }'; then
  if [ "$nwarn" -ge 1 ] && [ "$nwarn" -le 4 ] && [ "$nskip" -gt "$nwarn" ] &&
     grep -q -- "lower --lr" "$W/lr10.log" && ! grep -q "below 1" "$W/h16d.log" "$W/h16.log"; then
    echo "PASS precision_fp16_scale_below_1_warns ($nwarn warnings, $nskip skips, scale down to $minscale)"
  else
    echo "FAIL precision_fp16_scale_below_1_warns: $nwarn warnings, $nskip skips, min scale $minscale"
    grep "warn" "$W/lr10.log" "$W/h16d.log" "$W/h16.log" | head -5
  fi
elif [ "$nwarn" -eq 0 ] && ! grep -q "below 1" "$W/h16d.log" "$W/h16.log"; then
  echo "PASS precision_fp16_no_warning_at_scale_ge_1 (min scale $minscale, $nskip skips)"
  echo "SKIP precision_fp16_scale_below_1_warns: this build's fp16 products did not overflow enough at --lr 10 to bring the scale below 1 (min $minscale); test_scaler covers the rule"
else
  echo "FAIL precision_fp16_scale_below_1_warns: $nwarn warnings with the scale never below 1 (min $minscale)"
fi

# 7. --precision auto: the choice and its reason on one log line; the probe
#    cached in $XDG_CACHE_HOME/kiln (tests/run.sh points it into KILN_TMP);
#    --no-precision-probe and KILN_PRECISION_PROBE=0 skip the measurement
export XDG_CACHE_HOME="$W/xdg"
timeout 300 "$KILN" train "${COMMON[@]}" --steps 2 --out "$W/auto1" >"$W/auto1.log" 2>&1
timeout 300 "$KILN" train "${COMMON[@]}" --steps 2 --out "$W/auto2" --no-precision-probe >"$W/auto2.log" 2>&1
KILN_PRECISION_PROBE=0 timeout 300 "$KILN" train "${COMMON[@]}" --steps 2 --out "$W/auto3" >"$W/auto3.log" 2>&1
n1=$(grep -c "^kiln: info: precision: \(bf16\|fp32\) (" "$W/auto1.log")
chosen=$(sed -n 's/^kiln: info: precision: \([a-z0-9]*\) (.*/\1/p' "$W/auto1.log")
if [ "$n1" -eq 1 ] && grep -q "precision: $chosen matrix products" "$W/auto1.log" &&
   grep -q "\"precision_auto\"" "$W/auto1/step_00000002/trainer_state.json" &&
   { grep -q "no bf16 hardware" "$W/auto1.log" || ls "$W/xdg/kiln/"precision-auto-*.txt >/dev/null 2>&1; } &&
   grep -q "not measured: the probe is off\|no bf16 hardware" "$W/auto2.log" &&
   grep -q "not measured: the probe is off\|no bf16 hardware" "$W/auto3.log"; then
  echo "PASS precision_auto_cli ($(grep '^kiln: info: precision:' "$W/auto1.log"))"
else
  echo "FAIL precision_auto_cli: $n1 lines, chosen '$chosen'"; grep -i "precision" "$W/auto1.log" "$W/auto2.log" "$W/auto3.log"
fi
