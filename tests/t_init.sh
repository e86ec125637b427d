#!/usr/bin/env bash
# t_init.sh — `kiln init` and `kiln info` end to end: both families, the
# written directory reloads, bad configs and existing directories are
# refused with a message and a non-zero exit.
set -u
ok() { echo "PASS $1"; }
bad() { echo "FAIL $1"; }
d=$KILN_TMP/t_init
mkdir -p "$d"

if $KILN init --config "$KILN_ROOT/configs/gpt2-tiny.json" --out "$d/g" --seed 7 >"$d/out" 2>&1 &&
   grep -q "wrote $d/g: gpt2, 3290880 parameters" "$d/out" &&
   [ -f "$d/g/config.json" ] && [ -f "$d/g/model.safetensors" ]; then ok init_gpt2; else cat "$d/out"; bad init_gpt2; fi

if $KILN info --model "$d/g" --json >"$d/info" 2>&1 && grep -q '"params": 3290880' "$d/info" &&
   grep -q '"model_type": "gpt2"' "$d/info"; then ok info_json; else cat "$d/info"; bad info_json; fi

if $KILN init --config "$KILN_ROOT/configs/llama-tiny.json" --out "$d/l" >"$d/out" 2>&1 &&
   $KILN info --model "$d/l" --tensors >"$d/info" 2>&1 && grep -q "(GQA)" "$d/info" &&
   grep -q "model.layers.3.mlp.down_proj.weight *\[256, 688\]" "$d/info"; then ok init_llama; else cat "$d/out" "$d/info"; bad init_llama; fi

# same seed, same bytes; another seed, other bytes
$KILN init --config "$KILN_ROOT/configs/gpt2-tiny.json" --out "$d/g2" --seed 7 >/dev/null 2>&1
$KILN init --config "$KILN_ROOT/configs/gpt2-tiny.json" --out "$d/g3" --seed 8 >/dev/null 2>&1
if cmp -s "$d/g/model.safetensors" "$d/g2/model.safetensors" &&
   ! cmp -s "$d/g/model.safetensors" "$d/g3/model.safetensors"; then ok init_seeded; else bad init_seeded; fi

# refuses to overwrite without --force
if ! $KILN init --config "$KILN_ROOT/configs/gpt2-tiny.json" --out "$d/g" 2>"$d/err" &&
   grep -q "already holds a model" "$d/err" &&
   $KILN init --config "$KILN_ROOT/configs/gpt2-tiny.json" --out "$d/g" --force >/dev/null 2>&1
then ok init_no_clobber; else bad init_no_clobber; fi

# bad configs: the message names the key, exit non-zero
printf '{"model_type":"llama","vocab_size":10,"hidden_size":30,"num_hidden_layers":1,"num_attention_heads":4,"intermediate_size":8}' >"$d/bad1.json"
printf '{"model_type":"llama","vocab_size":10,"hidden_size":32,"num_hidden_layers":1,"num_attention_heads":4,"intermediate_size":8,"rope_scaling":{"type":"yarn"}}' >"$d/bad2.json"
printf '{"model_type":"gpt2", "n_layer": 2,' >"$d/bad3.json"
r=0
$KILN init --config "$d/bad1.json" --out "$d/x" 2>"$d/e1" && r=1
$KILN init --config "$d/bad2.json" --out "$d/x" 2>"$d/e2" && r=1
$KILN init --config "$d/bad3.json" --out "$d/x" 2>"$d/e3" && r=1
$KILN init --config "$d/missing.json" --out "$d/x" 2>"$d/e4" && r=1
$KILN init --out "$d/x" 2>"$d/e5" && r=1
if [ $r = 0 ] && grep -q hidden_size "$d/e1" && grep -q rope_scaling "$d/e2" &&
   grep -q "invalid JSON" "$d/e3" && grep -q missing.json "$d/e4" && grep -q -- "--config is required" "$d/e5" &&
   [ ! -e "$d/x" ]; then ok init_bad_config; else cat "$d"/e?; bad init_bad_config; fi

# info on a broken model directory
cp -r "$d/g" "$d/broken"; head -c 1000 "$d/g/model.safetensors" >"$d/broken/model.safetensors"
if ! $KILN info --model "$d/broken" 2>"$d/e6" && grep -q "model.safetensors" "$d/e6"; then ok info_broken; else cat "$d/e6"; bad info_broken; fi
