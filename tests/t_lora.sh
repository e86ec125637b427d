#!/usr/bin/env bash
# t_lora.sh — LoRA from the command line: a tiny gpt2 pretrained here, then
# kiln sft --lora-rank on generated chat JSONL. Checks: the held-out loss
# falls; only the adapters train (the base in the checkpoint is the
# start's, bit for bit); every checkpoint is a PEFT adapter directory
# (adapter_config.json fields, PEFT's tensor names and shapes); a run
# stopped and resumed ends bit-identical to a straight one (dropout on);
# kiln merge writes a model directory whose generate/eval output equals
# the base with --adapter (and a GGUF with --gguf-type); an adapter for
# another base and bad flags are refused, naming the tensor or the flag.
set -u
D="$KILN_TMP/t_lora"
rm -rf "$D"; mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh" # pass, fail, check
PY=/usr/bin/python3
if [ ! -x "$PY" ]; then echo "SKIP lora: needs /usr/bin/python3"; exit 0; fi
"$PY" - "$D" <<'EOF'
import json, random, sys
d = sys.argv[1]
random.seed(2)
words = "alpha beta gamma delta red green blue one two three cat dog bird".split()
with open(d + "/corpus.txt", "w") as f:
    for i in range(300):
        f.write(" ".join(random.choice(words) for _ in range(12)) + "\n")
with open(d + "/sft.jsonl", "w") as f:
    for i in range(60):
        a = random.sample(words, 3)
        f.write(json.dumps({"messages": [
            {"role": "user", "content": "reverse " + " ".join(a)},
            {"role": "assistant", "content": " ".join(reversed(a))}]}) + "\n")
EOF
cat >"$D/tiny.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 96}
EOF
cat >"$D/wide.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 96, "n_head": 4, "vocab_size": 257, "n_positions": 96}
EOF
"$KILN" tokenize --input "$D/corpus.txt" --out "$D/data" --quiet >/dev/null 2>&1 || { fail lora_setup tokenize; exit 1; }
"$KILN" train --config "$D/tiny.json" --data "$D/data" --out "$D/pre" --steps 20 --batch 4 --seq 48 \
  --lr 1e-3 --warmup 5 --eval-every 0 --progress none --threads 2 >/dev/null 2>&1 || { fail lora_setup train; exit 1; }
BASE="$D/pre/step_00000020"
SFT=("$KILN" sft --model "$BASE" --data "$D/sft.jsonl" --batch 4 --lr 1e-2 --progress none
     --threads 2 --precision fp32 --warmup 2
     --lora-rank 4 --lora-alpha 8 --lora-targets all-linear)

# ---- training: the held-out loss falls, only the adapters move ----
"${SFT[@]}" --out "$D/run" --steps 30 --eval-every 15 >"$D/run.out" 2>&1
rc=$?
C="$D/run/step_00000030"
DETAIL="status $rc: $(tail -3 "$D/run.out" | tr '\n' ' ')"
check lora_sft_runs test "$rc" = 0 -a -f "$C/adapter_model.safetensors"
check lora_share_reported grep -q '^lora: r 4, alpha 8, dropout 0, targets all-linear: 8192 trainable' "$D/run.out"
read -r v0 v1 < <("$PY" - "$D/run/metrics.jsonl" <<'EOF'
import json, sys
v = [x["val_loss"] for x in map(json.loads, open(sys.argv[1])) if "val_loss" in x]
print(v[0], v[-1])
EOF
)
DETAIL="val_loss $v0 -> $v1"
check lora_val_loss_falls "$PY" -c "import sys; sys.exit(not (float('$v1') < 0.97 * float('$v0')))"
# the checkpoint's base tensors are the start's exactly; the adapters moved
DETAIL=$("$PY" - "$BASE/model.safetensors" "$C/model.safetensors" "$C/adapter_model.safetensors" "$C/adapter_config.json" 2>&1 <<'EOF'
import json, struct, sys
def st(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n])
    return {k: (v["shape"], b[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]])
            for k, v in h.items() if k != "__metadata__"}
base, ck, ad, cfg = st(sys.argv[1]), st(sys.argv[2]), st(sys.argv[3]), json.load(open(sys.argv[4]))
for k, v in base.items():
    assert ck[k][1] == v[1], "base tensor changed: " + k
assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8, cfg
assert cfg["bias"] == "none" and cfg["task_type"] == "CAUSAL_LM" and cfg["fan_in_fan_out"] is True
assert sorted(cfg["target_modules"]) == ["c_attn", "c_fc", "c_proj"], cfg["target_modules"]
assert cfg["base_model_name_or_path"].endswith("pre/step_00000020"), cfg
a = ad["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"]
b = ad["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
assert a[0] == [4, 64] and b[0] == [192, 4], (a[0], b[0])
assert ad["base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight"][0] == [4, 256]
assert len(ad) == 16 and any(c != 0 for c in b[1]), "B did not train"
print("ok")
EOF
)
check lora_checkpoint_is_peft test "$DETAIL" = ok

# ---- exact resume with dropout: 8 straight == 3, stop, resume to 8 ----
"${SFT[@]}" --lora-dropout 0.1 --out "$D/ra" --steps 8 --grad-accum 2 --eval-every 4 >"$D/ra.out" 2>&1
"${SFT[@]}" --lora-dropout 0.1 --out "$D/rb" --steps 8 --grad-accum 2 --eval-every 4 --stop-at 3 >"$D/rb.out" 2>&1
"$KILN" sft --resume "$D/rb" --progress none --threads 2 >"$D/rb2.out" 2>&1
DETAIL="$(tail -2 "$D/rb2.out" | tr '\n' ' ')"
check lora_resume_bit_exact cmp -s "$D/ra/step_00000008/adapter_model.safetensors" "$D/rb/step_00000008/adapter_model.safetensors"
"${SFT[@]}" --out "$D/rc" --steps 8 --grad-accum 2 --eval-every 0 >/dev/null 2>&1
check lora_dropout_changes_training eval "! cmp -s $D/ra/step_00000008/adapter_model.safetensors $D/rc/step_00000008/adapter_model.safetensors"

# ---- merge, --adapter ----
"$KILN" merge --model "$BASE" --adapter "$C" --out "$D/merged" >"$D/merge.out" 2>&1
check lora_merge_runs test $? = 0 -a -f "$D/merged/model.safetensors" -a -f "$D/merged/tokenizer.json"
G=(generate --prompt "reverse cat dog bird" --max-tokens 16 --temperature 0 --threads 2)
"$KILN" "${G[@]}" --model "$D/merged" 2>/dev/null >"$D/g_merged.txt"
"$KILN" "${G[@]}" --model "$BASE" --adapter "$C" 2>/dev/null >"$D/g_adapter.txt"
"$KILN" "${G[@]}" --model "$BASE" 2>/dev/null >"$D/g_base.txt"
DETAIL="merged '$(cat "$D/g_merged.txt")' adapter '$(cat "$D/g_adapter.txt")'"
check lora_generate_adapter_equals_merged eval "test -s $D/g_merged.txt && cmp -s $D/g_merged.txt $D/g_adapter.txt"
check lora_generate_adapter_differs_from_base eval "test -s $D/g_base.txt && ! cmp -s $D/g_base.txt $D/g_adapter.txt"
e1=$("$KILN" eval --model "$D/merged" --data "$D/data" --split train --threads 2 --json 2>&1)
e2=$("$KILN" eval --model "$BASE" --adapter "$C" --data "$D/data" --split train --threads 2 --json 2>&1)
DETAIL="$e1 vs $e2"
l1=$(grep -o '"loss": [0-9.]*' <<<"$e1"); l2=$(grep -o '"loss": [0-9.]*' <<<"$e2")
check lora_eval_adapter_equals_merged test -n "$l1" -a "$l1" = "$l2"
"$KILN" merge --model "$BASE" --adapter "$C" --out "$D/merged.gguf" --gguf-type q8_0 >/dev/null 2>&1
check lora_merge_gguf eval "test \$? = 0 && head -c 4 $D/merged.gguf | grep -q GGUF"
"$KILN" "${G[@]}" --model "$D/merged.gguf" --tokenizer "$D/merged/tokenizer.json" >/dev/null 2>&1
check lora_merged_gguf_generates test $? = 0

# ---- refusals ----
"$KILN" init --config "$D/wide.json" --out "$D/wide" >/dev/null 2>&1
out=$("$KILN" merge --model "$D/wide" --adapter "$C" --out "$D/bad" 2>&1); rc=$?
DETAIL="$rc: $out"
check lora_other_base_refused eval "test $rc = 1 && grep -q 'transformer.h.0.attn.c_attn.lora_A.weight\" has shape \[4, 64\] but the base model needs \[4, 96\]' <<<\"\$out\""
out=$("${SFT[@]}" --out "$D/bt" --steps 1 --lora-targets c_attn,q_proj 2>&1); rc=$?
DETAIL="$rc: $out"
check lora_bad_target_named eval "test $rc = 2 && grep -q -- '--lora-targets: \"q_proj\" is no linear module of a gpt2 model' <<<\"\$out\""
out=$("$KILN" sft --model "$BASE" --data "$D/sft.jsonl" --out "$D/bt2" --lora-alpha 4 2>&1); rc=$?
DETAIL="$rc: $out"
check lora_alpha_needs_rank eval "test $rc = 2 && grep -q -- '--lora-rank' <<<\"\$out\""
out=$("${SFT[@]}" --out "$D/bt3" --steps 1 --lora-dropout 1.5 2>&1); rc=$?
DETAIL="$rc: $out"
check lora_bad_dropout_named eval "test $rc = 2 && grep -q -- '--lora-dropout' <<<\"\$out\""
exit 0
