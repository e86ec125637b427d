#!/usr/bin/python3
"""sft_tasks_data.py OUT_DIR [--seed N] [--train N] [--val N] — an instruction
set for the full-vs-LoRA SFT comparison of docs/finetuning.md: four string
and arithmetic transformations in chat form, answered in a few characters.

  reverse  "reverse: red cat sun"  -> "sun cat red"
  upper    "upper: river"          -> "RIVER"
  add      "add: 37 45"            -> "82"
  count    "count: a a b a"        -> "3"   (how many "a")

The words come from a fixed list; every (task, input) appears in one split
only (train.jsonl, val.jsonl: {"messages": [system, user, assistant]})."""
import json
import os
import random
import sys

WORDS = ("red blue green cat dog sun moon tree river stone bird fish rain snow "
         "wind fire gold road ship star").split()


def example(rng):
    task = rng.choice(["reverse", "upper", "add", "count"])
    if task == "reverse":
        w = rng.sample(WORDS, 3)
        return f"reverse: {' '.join(w)}", " ".join(reversed(w))
    if task == "upper":
        n = rng.randint(1, 2)
        w = " ".join(rng.sample(WORDS, n))
        return f"upper: {w}", w.upper()
    if task == "add":
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        return f"add: {a} {b}", str(a + b)
    seq = [rng.choice("ab") for _ in range(rng.randint(3, 7))]
    return f"count: {' '.join(seq)}", str(seq.count("a"))


def main():
    out = sys.argv[1]
    arg = lambda k, d: int(sys.argv[sys.argv.index(k) + 1]) if k in sys.argv else d
    rng = random.Random(arg("--seed", 1))
    n_train, n_val = arg("--train", 3000), arg("--val", 200)
    os.makedirs(out, exist_ok=True)
    seen, rows = set(), []
    while len(rows) < n_train + n_val:
        q, a = example(rng)
        if q in seen:
            continue
        seen.add(q)
        rows.append({"messages": [{"role": "system", "content": "Do the task."},
                                  {"role": "user", "content": q},
                                  {"role": "assistant", "content": a}]})
    for name, part in (("val.jsonl", rows[:n_val]), ("train.jsonl", rows[n_val:])):
        with open(os.path.join(out, name), "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
    print(f"{out}: {n_train} training and {n_val} held-out conversations (seed {arg('--seed', 1)})")


if __name__ == "__main__":
    main()
