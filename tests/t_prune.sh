#!/usr/bin/env bash
# t_prune.sh — `kiln prune` as a user runs it, on a tiny model trained
# here: Wanda at 50% writes a model whose pruned matrices are half zeros
# (per layer in the report and prune_report.json), whose held-out loss
# `kiln eval` measures as the report says, and whose zeros stay zero
# through `kiln train --init-from` and `kiln sft --model` (read back from
# the checkpoints' safetensors here); 2:4 holds the pattern; mlp writes a
# smaller n_inner that eval and generate load; bad input (sparsity
# outside [0, 1), an unknown method, 2:4 on a width not divisible by 4,
# 2:4 with another sparsity, wanda without --calib) is refused naming the
# flag, with no library field left in the message.
set -u
D="$KILN_TMP/t_prune"
rm -rf "$D"; mkdir -p "$D"
. "$KILN_ROOT/tests/lib_serve.sh" # pass, fail, check
PY=/usr/bin/python3
if [ ! -x "$PY" ]; then echo "SKIP prune: needs /usr/bin/python3"; exit 0; fi
"$PY" - "$D" <<'EOF'
import json, random, sys
d = sys.argv[1]
random.seed(2)
words = "alpha beta gamma delta red green blue one two three cat dog bird".split()
with open(d + "/corpus.txt", "w") as f:
    for i in range(600):
        f.write(" ".join(random.choice(words) for _ in range(12)) + "\n")
        if i % 6 == 5:
            f.write("%\n")
with open(d + "/sft.jsonl", "w") as f:
    for i in range(40):
        a = random.sample(words, 3)
        f.write(json.dumps({"prompt": "reverse: " + " ".join(a) + "\n",
                            "completion": " ".join(reversed(a))}) + "\n")
EOF
cat >"$D/tiny.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 64}
EOF
cat >"$D/odd.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 1, "n_embd": 30, "n_head": 2, "vocab_size": 257, "n_positions": 64}
EOF
"$KILN" tokenize --input "$D/corpus.txt" --out "$D/data" --val-fraction 0.2 --doc-separator % --quiet >/dev/null 2>&1 \
  || { fail prune_setup tokenize; exit 1; }
"$KILN" train --config "$D/tiny.json" --data "$D/data" --out "$D/pre" --steps 30 --batch 4 --seq 64 \
  --lr 2e-3 --warmup 5 --eval-every 0 --progress none --threads 2 >/dev/null 2>&1 \
  || { fail prune_setup train; exit 1; }
P=(--calib "$D/data" --calib-tokens 1024 --eval-tokens 2048 --seq 64 --threads 2)

# ---- wanda 50% ----
"$KILN" prune --model "$D/pre" --method wanda --sparsity 0.5 "${P[@]}" --out "$D/wanda" >"$D/wanda.out" 2>&1
rc=$?
DETAIL="status $rc: $(tail -3 "$D/wanda.out" | tr '\n' ' ')"
check prune_wanda_runs test "$rc" = 0 -a -f "$D/wanda/model.safetensors" -a -f "$D/wanda/sparsity.json" \
  -a -f "$D/wanda/tokenizer.json"
DETAIL=$(cat "$D/wanda.out")
check prune_report_layers test "$(grep -c '^ *[01]   50.00%' "$D/wanda.out")" = 2
check prune_report_ppl grep -q '^held-out perplexity (2048 tokens): [0-9.]* before, [0-9.]* after' "$D/wanda.out"
# the report's loss after is what kiln eval measures on the same tokens
after=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['loss_after'])" "$D/wanda/prune_report.json")
# the held-out tokens: the val shard's tokens after the first 1024 (the
# shard's header: magic, version, bytes per token at 12, count at 24)
"$PY" - "$D" <<'EOF'
import struct, sys
d = sys.argv[1]
raw = open(d + "/data/val_0000.bin", "rb").read()
width = struct.unpack("<I", raw[12:16])[0]
n = struct.unpack("<Q", raw[24:32])[0]
toks = struct.unpack("<%d%s" % (n, "H" if width == 2 else "I"), raw[32:32 + width * n])
open(d + "/held.u32", "wb").write(struct.pack("<2048I", *toks[1024:1024 + 2048]))
EOF
ev=$("$KILN" eval --model "$D/wanda" --tokens "$D/held.u32" --seq 64 --batch 4 --threads 2 --json 2>&1)
got=$(sed -n 's/.*"loss": *\([0-9.eE+-]*\).*/\1/p' <<<"$ev")
DETAIL="report $after, kiln eval $got ($ev)"
check prune_report_matches_eval "$PY" -c "import sys; sys.exit(not abs(float('$after') - float('$got')) < 1e-4)"

# zeros of the pruned matrices, read from safetensors without a library
cat >"$D/zeros.py" <<'EOF'
import json, struct, sys
def load(p):
    b = open(p, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    out = {}
    for k, v in h.items():
        if k == "__metadata__" or not k.startswith("transformer.h.") or not k.endswith(".weight"):
            continue
        if v["shape"] and len(v["shape"]) == 2:
            s, e = v["data_offsets"]
            out[k] = struct.unpack("<%df" % ((e - s) // 4), b[8 + n + s:8 + n + e])
    return out
a = load(sys.argv[1])
zeros = sum(x == 0.0 for t in a.values() for x in t)
total = sum(len(t) for t in a.values())
if len(sys.argv) == 2:
    print(zeros, total)
    sys.exit(0)
b = load(sys.argv[2])
lost = sum(1 for k in a for x, y in zip(a[k], b[k]) if x == 0.0 and y != 0.0)
moved = sum(1 for k in a for x, y in zip(a[k], b[k]) if x != 0.0 and y != x)
print(zeros, total, lost, moved)
EOF
read -r z t < <("$PY" "$D/zeros.py" "$D/wanda/model.safetensors")
DETAIL="$z zeros of $t"
check prune_wanda_half_zero test "$z" = $((t / 2))

"$KILN" train --init-from "$D/wanda" --data "$D/data" --out "$D/rec" --steps 5 --batch 4 --seq 64 \
  --lr 2e-3 --weight-decay 0.1 --warmup 0 --eval-every 0 --progress lines --threads 2 >"$D/rec.out" 2>&1
read -r z t lost moved < <("$PY" "$D/zeros.py" "$D/wanda/model.safetensors" "$D/rec/step_00000005/model.safetensors")
DETAIL="$lost of $z zeros lost, $moved weights trained; $(grep sparse "$D/rec.out")"
check prune_train_keeps_zeros test "${lost:-1}" = 0 -a "${moved:-0}" -gt $((t / 4))
check prune_train_says_sparse grep -q "sparse model (.*sparsity.json): its $z zero weights" "$D/rec.out"
check prune_ckpt_carries_mark test -f "$D/rec/step_00000005/sparsity.json"

"$KILN" sft --model "$D/wanda" --data "$D/sft.jsonl" --out "$D/sft" --steps 3 --batch 4 --lr 3e-3 \
  --progress none --threads 2 --precision bf16 >"$D/sft.out" 2>&1
ck="$D/sft/$(cat "$D/sft/latest" 2>/dev/null)"
read -r z t lost moved < <("$PY" "$D/zeros.py" "$D/wanda/model.safetensors" "$ck/model.safetensors")
DETAIL="$lost of $z zeros lost, $moved trained; $(tail -2 "$D/sft.out" | tr '\n' ' ')"
check prune_sft_keeps_zeros test "${lost:-1}" = 0 -a "${moved:-0}" -gt $((t / 4))

# ---- 2:4 ----
"$KILN" prune --model "$D/pre" --method 2:4 "${P[@]}" --out "$D/24" >"$D/24.out" 2>&1
DETAIL=$(tail -3 "$D/24.out")
check prune_24_pattern "$PY" - "$D/24/model.safetensors" <<'EOF'
import json, struct, sys
b = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", b[:8])[0]
h = json.loads(b[8:8 + n])
bad = groups = 0
for k, v in h.items():
    if k == "__metadata__" or ".h." not in k or len(v["shape"]) != 2:
        continue
    i, o = v["shape"]           # gpt2 Conv1D: (in, out); groups run along in
    s, e = v["data_offsets"]
    w = struct.unpack("<%df" % (i * o), b[8 + n + s:8 + n + e])
    for r in range(o):
        for j in range(0, i, 4):
            z = sum(w[(j + q) * o + r] == 0.0 for q in range(4))
            groups += 1
            bad += z != 2
sys.exit(not (bad == 0 and groups > 1000))
EOF

# ---- mlp 25% ----
"$KILN" prune --model "$D/pre" --method mlp --sparsity 0.25 "${P[@]}" --out "$D/mlp" >"$D/mlp.out" 2>&1
DETAIL=$(cat "$D/mlp.out")
check prune_mlp_width grep -q '^MLP width (n_inner): 256 -> 192' "$D/mlp.out"
check prune_mlp_config grep -q '"n_inner": 192' "$D/mlp/config.json"
check prune_mlp_no_mark test ! -f "$D/mlp/sparsity.json"
after=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['loss_after'])" "$D/mlp/prune_report.json")
ev=$("$KILN" eval --model "$D/mlp" --tokens "$D/held.u32" --seq 64 --batch 4 --threads 2 --json 2>&1)
got=$(sed -n 's/.*"loss": *\([0-9.eE+-]*\).*/\1/p' <<<"$ev")
DETAIL="report $after, kiln eval $got ($ev)"
check prune_mlp_eval "$PY" -c "import sys; sys.exit(not abs(float('$after') - float('$got')) < 1e-4)"
out=$("$KILN" generate --model "$D/mlp" --prompt "alpha" --max-tokens 8 --temperature 0 --threads 2 2>&1)
rc=$?
DETAIL="exit $rc: $out"
check prune_mlp_generates test "$rc" = 0 -a -n "$out"

# ---- bad input ----
refused() { # name want args...: exit non-zero, the message has want, no field
  local name=$1 want=$2 o rc
  shift 2
  o=$("$KILN" prune "$@" 2>&1 >/dev/null)
  rc=$?
  DETAIL="exit $rc: $o"
  check "$name" bash -c '[ "$1" -ne 0 ] && [ "$1" -lt 124 ] && grep -qF -- "$2" <<<"$3" && ! grep -q "kiln_prune_opts" <<<"$3"' _ "$rc" "$want" "$o"
}
refused prune_bad_sparsity_1 "--sparsity 1 is outside [0, 1)" --model "$D/pre" --method magnitude --sparsity 1 --out "$D/x"
refused prune_bad_sparsity_neg "--sparsity -0.5 is outside [0, 1)" --model "$D/pre" --method wanda --sparsity -0.5 "${P[@]}" --out "$D/x"
refused prune_bad_method "--method 'random' is not one of magnitude | wanda | 2:4 | mlp" --model "$D/pre" --method random --out "$D/x"
refused prune_bad_score "--score 'l1' is not one of wanda | magnitude" --model "$D/pre" --method 2:4 --score l1 --out "$D/x"
refused prune_24_sparsity "--sparsity 0.6 with --method 2:4" --model "$D/pre" --method 2:4 --sparsity 0.6 "${P[@]}" --out "$D/x"
refused prune_wanda_needs_calib "give --calib DATA" --model "$D/pre" --method wanda --out "$D/x"
"$KILN" init --config "$D/odd.json" --out "$D/odd" >/dev/null 2>&1
refused prune_24_width "--method 2:4 needs input widths divisible by 4, but the qkv matrix (n_embd) has 30 inputs" \
  --model "$D/odd" --method 2:4 --score magnitude --out "$D/x"
check prune_refused_writes_nothing test ! -e "$D/x"
refused prune_out_exists "already holds a model" --model "$D/pre" --method magnitude --out "$D/wanda"
