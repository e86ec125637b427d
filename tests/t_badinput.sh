#!/usr/bin/env bash
# t_badinput.sh — hostile input to every subcommand: each case must exit
# non-zero (not by a signal, not by timing out), print no sanitizer or crash
# report, and name the offending flag/file/field in its message. Cases that
# once crashed or silently did the wrong thing are the regression tests of
# the QA pass (see the comment on each).
set -u
d=$KILN_TMP/t_badinput
rm -rf "$d"
mkdir -p "$d"
crash='Sanitizer|runtime error|Segmentation|Aborted|core dumped|internal assertion'

# rej NAME EXPECTED-TEXT CMD... : CMD must fail cleanly and mention EXPECTED-TEXT
rej() {
  local name=$1 want=$2
  shift 2
  local out rc
  out=$(timeout 60 "$@" 2>&1 </dev/null)
  rc=$?
  if [ "$rc" -eq 0 ]; then
    echo "FAIL $name: exited 0"; echo "$out" | tail -n 5
  elif [ "$rc" -eq 124 ] || [ "$rc" -ge 128 ]; then
    echo "FAIL $name: killed or timed out (status $rc)"; echo "$out" | tail -n 5
  elif echo "$out" | grep -qE "$crash"; then
    echo "FAIL $name: crash report"; echo "$out" | grep -E "$crash" | head -n 3
  elif ! echo "$out" | grep -qF -- "$want"; then
    echo "FAIL $name: message does not mention '$want'"; echo "$out" | tail -n 3
  else
    echo "PASS $name"
  fi
}

# fixtures: a small model matching the byte tokenizer, one data directory
cat >"$d/cfg.json" <<'EOF'
{"model_type":"gpt2","vocab_size":257,"n_layer":1,"n_embd":32,"n_head":2,"n_positions":64,
 "bos_token_id":256,"eos_token_id":256}
EOF
cat >"$d/small.json" <<'EOF'
{"model_type":"gpt2","vocab_size":100,"n_layer":1,"n_embd":32,"n_head":2,"n_positions":64}
EOF
head -c 4000 "$KILN_ROOT/README.md" >"$d/text.txt"
: >"$d/empty.txt"
if ! $KILN init --config "$d/cfg.json" --out "$d/m" >/dev/null 2>&1 ||
   ! $KILN tokenizer convert --tokenizer bytes --out "$d/m/tokenizer.json" >/dev/null 2>&1 ||
   ! $KILN init --config "$d/small.json" --out "$d/sm" >/dev/null 2>&1 ||
   ! $KILN tokenizer convert --tokenizer bytes --out "$d/sm/tokenizer.json" >/dev/null 2>&1 ||
   ! $KILN tokenize --tokenizer bytes --input "$d/text.txt" --out "$d/data" --quiet >/dev/null 2>&1; then
  echo "FAIL fixtures: could not build the model and data fixtures"
  exit 1
fi

# --threads: 100000 segfaulted every command (OpenMP team size); negatives
# were silently "all cores"
rej threads_huge_eval "--threads" $KILN eval --model "$d/m" --tokens "$d/data/train_0000.bin" --threads 100000
rej threads_huge_generate "--threads" $KILN generate --model "$d/m" --max-tokens 1 --threads 100000
rej threads_huge_tokenize "--threads" $KILN tokenize --input "$d/text.txt" --out "$d/x1" --threads 100000
rej threads_negative_train "--threads" $KILN train --config "$d/cfg.json" --data "$d/data" --out "$d/x2" --steps 1 --threads -3
# --ctx: negative was silently the model's context
rej ctx_negative_generate "--ctx" $KILN generate --model "$d/m" --max-tokens 1 --ctx -1
rej ctx_negative_serve "--ctx" $KILN serve --model "$d/m" --port 0 --ctx -5

# eval: negative --seq / --max-tokens were silently the defaults
rej eval_seq_negative "--seq" $KILN eval --model "$d/m" --tokens "$d/data/train_0000.bin" --seq -1
rej eval_max_tokens_negative "--max-tokens" $KILN eval --model "$d/m" --tokens "$d/data/train_0000.bin" --max-tokens -5
rej eval_vocab_mismatch "vocab" $KILN eval --model "$d/sm" --data "$d/data" --split train

# tokenize: an empty corpus passed NULL to memset (UBSan report)
rej tokenize_empty_corpus "no training tokens" $KILN tokenize --input "$d/empty.txt" --out "$d/x3" --quiet
# tokenize into a model directory overwrote its tokenizer.json
cp -r "$d/m" "$d/m_copy"
before=$(cksum <"$d/m_copy/tokenizer.json")
rej tokenize_into_model_dir "is not empty" $KILN tokenize --tokenizer "$d/m/tokenizer.json" --input "$d/text.txt" --out "$d/m_copy" --quiet
if [ "$(cksum <"$d/m_copy/tokenizer.json")" = "$before" ] && [ ! -e "$d/m_copy/meta.json" ]; then
  echo "PASS tokenize_into_model_dir_untouched"
else
  echo "FAIL tokenize_into_model_dir_untouched: the model directory was written to"
fi
rej tokenize_input_is_out "is the --out directory" $KILN tokenize --input "$d/data" --out "$d/data" --quiet
# re-tokenizing into an earlier data directory still works
if $KILN tokenize --input "$d/text.txt" --out "$d/data" --quiet >/dev/null 2>&1; then
  echo "PASS tokenize_rerun_data_dir"
else
  echo "FAIL tokenize_rerun_data_dir"
fi

# tokenizer train: empty input wrote a merge-less tokenizer and exited 0;
# a bad --out was found only after training; flags out of range
rej tokenizer_train_empty "no text" $KILN tokenizer train --input "$d/empty.txt" --vocab-size 300 --out "$d/tk_empty.json" --quiet
[ -e "$d/tk_empty.json" ] && echo "FAIL tokenizer_train_empty_no_file: a file was written" || echo "PASS tokenizer_train_empty_no_file"
rej tokenizer_train_out_missing_dir "/proc/nonexistent-kiln" $KILN tokenizer train --input "$d/text.txt" --vocab-size 300 --out /proc/nonexistent-kiln/t.json --quiet
rej tokenizer_train_out_is_dir "is a directory" $KILN tokenizer train --input "$d/text.txt" --vocab-size 300 --out "$d" --quiet
rej tokenizer_train_min_frequency "--min-frequency" $KILN tokenizer train --input "$d/text.txt" --vocab-size 300 --out "$d/t1.json" --min-frequency 0 --quiet
rej tokenizer_train_max_bytes "--max-bytes" $KILN tokenizer train --input "$d/text.txt" --vocab-size 300 --out "$d/t2.json" --max-bytes -1 --quiet
rej tokenizer_train_vocab_small "--vocab-size" $KILN tokenizer train --input "$d/text.txt" --vocab-size 10 --out "$d/t3.json" --quiet
# the message of a bad --pattern was garbled (kiln_fail wrapping its own message)
rej tokenizer_train_bad_pattern "--pattern: pre-tokenizer pattern does not compile" $KILN tokenizer train --input "$d/text.txt" --vocab-size 300 --out "$d/t4.json" --pattern '([a-' --quiet
rej tokenizer_encode_gen_prompt "--chat" $KILN tokenizer encode --tokenizer bytes --input "$d/text.txt" --generation-prompt
rej tokenizer_decode_out_of_vocab "outside the vocabulary" bash -c "echo '1 2 99999' | $KILN tokenizer decode --tokenizer bytes"

# chat: a tokenizer larger than the model failed every turn and exited 0
rej chat_vocab_mismatch "vocabulary is 100" bash -c "echo hi | $KILN chat --model '$d/sm' --tokenizer bytes --max-tokens 2"
rej chat_max_tokens_negative "--max-tokens" bash -c "echo hi | $KILN chat --model '$d/m' --max-tokens -5"
# --stop-token beyond the vocabulary was silently accepted
rej generate_stop_token_oov "--stop-token 99999" $KILN generate --model "$d/m" --max-tokens 1 --stop-token 99999
rej generate_vocab_mismatch "vocabulary is 100" $KILN generate --model "$d/sm" --tokenizer bytes --max-tokens 1

# train flags and inputs
T="--data $d/data --seq 16 --batch 1 --progress none --eval-every 0"
rej train_batch_zero "--batch" $KILN train --config "$d/cfg.json" $T --out "$d/r1" --steps 1 --batch 0
rej train_lr_nan "--lr" $KILN train --config "$d/cfg.json" $T --out "$d/r2" --steps 1 --lr nan
# an explicit --steps 0 silently trained a whole epoch
rej train_steps_zero "--steps" $KILN train --config "$d/cfg.json" $T --out "$d/r0" --steps 0
rej train_steps_negative "--steps" $KILN train --config "$d/cfg.json" $T --out "$d/r3" --steps -3
rej train_vocab_mismatch "vocab size mismatch" $KILN train --config "$d/small.json" $T --out "$d/r4" --steps 1
rej train_out_is_file "exists and is not a directory" $KILN train --config "$d/cfg.json" $T --out "$d/text.txt" --steps 1

# a real run, then damaged copies of its checkpoint
if $KILN train --config "$d/cfg.json" $T --out "$d/run" --steps 2 >/dev/null 2>&1; then
  ck=$(cat "$d/run/latest")
  cp -r "$d/run" "$d/run_v"; rm -f "$d/run_v/$ck/checksums.json"
  /usr/bin/python3 - "$d/run_v/$ck/trainer_state.json" <<'EOF'
import json, sys
p = sys.argv[1]; s = json.load(open(p)); s["version"] = 2; json.dump(s, open(p, "w"))
EOF
  rej resume_state_version "version 2" $KILN train --resume "$d/run_v" --steps 3 --progress none
  cp -r "$d/run" "$d/run_r"; rm -f "$d/run_r/$ck/checksums.json"
  /usr/bin/python3 - "$d/run_r/$ck/trainer_state.json" <<'EOF'
import json, sys
p = sys.argv[1]; s = json.load(open(p)); s["rng"] = ["0", "0", "0", "0"]; json.dump(s, open(p, "w"))
EOF
  rej resume_rng_zero '"rng"' $KILN train --resume "$d/run_r" --steps 3 --progress none
  cp -r "$d/run" "$d/run_t"; truncate -s 100 "$d/run_t/$ck/optimizer.safetensors"
  rej resume_truncated_optimizer "optimizer.safetensors" $KILN train --resume "$d/run_t" --steps 3 --progress none
  # info on a run directory now describes its latest checkpoint
  if $KILN info --model "$d/run" --json 2>/dev/null | grep -q '"params"'; then
    echo "PASS info_run_directory"
  else
    echo "FAIL info_run_directory"
  fi
  cp -r "$d/run" "$d/run_l"; echo step_99 >"$d/run_l/latest"
  rej info_run_bad_latest "step_99" $KILN info --model "$d/run_l"
  # generate/chat/serve on a checkpoint ignored its checksums.json: a flipped
  # byte near the end of model.safetensors ran with exit 0
  cp -r "$d/run" "$d/run_f"; f="$d/run_f/$ck/model.safetensors"
  printf '\x55' | dd of="$f" bs=1 seek=$(( $(stat -c %s "$f") - 3 )) conv=notrunc 2>/dev/null
  rej generate_checkpoint_corrupt "model.safetensors' is corrupted" $KILN generate --model "$d/run_f/$ck" --max-tokens 1
  rej chat_checkpoint_corrupt "model.safetensors' is corrupted" bash -c "echo hi | $KILN chat --model '$d/run_f/$ck' --max-tokens 1"
  rej serve_checkpoint_corrupt "model.safetensors' is corrupted" $KILN serve --model "$d/run_f/$ck" --port 0
  rej train_rerun_into_run "already holds checkpoints" $KILN train --config "$d/cfg.json" $T --out "$d/run" --steps 1
else
  echo "FAIL train_fixture_run: kiln train did not finish"
fi

# plot: a non-numeric step or an overflowing loss range drew NaN coordinates
mkdir -p "$d/p1" "$d/p2"
printf '{"step":2,"loss":1e308}\n{"step":-1,"loss":-1e308}\n{"step":3,"loss":2.5}\n{"step":4,"loss":2.0}\n' >"$d/p2/metrics.jsonl"
if $KILN plot "$d/p2" --out "$d/p2/l.svg" >/dev/null 2>&1 && ! grep -qi nan "$d/p2/l.svg"; then
  echo "PASS plot_huge_values_no_nan"
else
  echo "FAIL plot_huge_values_no_nan"
fi
printf '{"step":"x","loss":1}\n' >"$d/p1/metrics.jsonl"
rej plot_step_not_number "holds no loss values" $KILN plot "$d/p1"

# damaged model files and configs
cp -r "$d/m" "$d/mt"; truncate -s 1000 "$d/mt/model.safetensors"
rej model_truncated "model.safetensors" $KILN generate --model "$d/mt" --max-tokens 1
echo '{"model_type":"gpt2","vocab_size":-5,"n_layer":1,"n_embd":8,"n_head":2,"n_positions":8}' >"$d/neg.json"
rej config_negative_vocab '"vocab_size" = -5' $KILN info --config "$d/neg.json"
# sampler flags: the message named the API field (--top_p) not the CLI flag
rej generate_top_p_flag "--top-p" $KILN generate --model "$d/m" --max-tokens 1 --top-p 0
rej generate_min_p_flag "--min-p" $KILN generate --model "$d/m" --max-tokens 1 --min-p 2
rej generate_rep_penalty_flag "--repetition-penalty" $KILN generate --model "$d/m" --max-tokens 1 --repetition-penalty 0
rej chat_top_p_flag "--top-p" $KILN chat --model "$d/m" --top-p 5
# meta.json train_tokens/val_tokens were not checked against the shards
cp -r "$d/data" "$d/data_bad"
sed -i 's/"train_tokens": *[0-9]*/"train_tokens": 99999999/' "$d/data_bad/meta.json"
rej meta_train_tokens_mismatch '"train_tokens" is 99999999' $KILN train --config "$d/cfg.json" --data "$d/data_bad" --seq 16 --batch 1 --progress none --eval-every 0 --out "$d/r5" --steps 1
rej meta_train_tokens_mismatch_eval "meta.json" $KILN eval --model "$d/m" --data "$d/data_bad" --split train
exit 0
