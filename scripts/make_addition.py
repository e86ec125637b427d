#!/usr/bin/python3
"""make_addition.py OUT_DIR [--seed N] -- a verifiable task for kiln sft + kiln grpo.

Two-digit addition, "a+b=" answered as "#### c". The 8100 pairs (a, b) in
10..99 are shuffled with the seed and split without overlap:
  heldout.jsonl   300 prompts {"prompt","answer"}: accuracy before/after
  sft.jsonl      1500 {"prompt","completion"}: teaches the format
  grpo.jsonl     3000 prompts {"prompt","answer"}: the RL prompts
(docs/alignment.md, "GRPO").
"""
import json
import os
import random
import sys

out = sys.argv[1]
seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else 1
os.makedirs(out, exist_ok=True)
pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
random.Random(seed).shuffle(pairs)
held, sft, rl = pairs[:300], pairs[300:1800], pairs[1800:4800]


def write(name, rows, completion):
    with open(os.path.join(out, name), "w") as f:
        for a, b in rows:
            rec = {"prompt": f"{a}+{b}="}
            if completion:
                rec["completion"] = f"#### {a + b}"
            else:
                rec["answer"] = str(a + b)
            f.write(json.dumps(rec) + "\n")


write("heldout.jsonl", held, False)
write("sft.jsonl", sft, True)
write("grpo.jsonl", rl, False)
print(f"{out}: heldout.jsonl {len(held)}, sft.jsonl {len(sft)}, grpo.jsonl {len(rl)} (seed {seed})")
