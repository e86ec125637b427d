#!/usr/bin/env python3
"""sft_packing_data.py OUT_DIR — data for the --packing figure in
docs/finetuning.md: a small text corpus (to pretrain a byte-level model on)
and chat SFT examples of widely varying length (copy / reverse / count a
list of 1 to 40 words), the case where one example per row pads most."""
import json, os, random, sys

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
random.seed(7)
words = ("alpha beta gamma delta red green blue one two three cat dog bird "
         "river stone cloud light north south").split()
with open(os.path.join(out, "corpus.txt"), "w") as f:
    for _ in range(400):
        f.write(" ".join(random.choice(words) for _ in range(16)) + "\n")
with open(os.path.join(out, "sft.jsonl"), "w") as f:
    for i in range(600):
        n = random.choice([1, 2, 3, 4, 6, 8, 12, 20, 30, 40])
        a = [random.choice(words) for _ in range(n)]
        task = random.choice(["copy", "reverse", "count"])
        ans = {"copy": " ".join(a), "reverse": " ".join(reversed(a)), "count": str(n)}[task]
        f.write(json.dumps({"messages": [
            {"role": "user", "content": task + ": " + " ".join(a)},
            {"role": "assistant", "content": ans}]}) + "\n")
