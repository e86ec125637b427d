#!/usr/bin/python3
"""sft_reverse_data.py OUT — the data of docs/finetuning.md's worked
example and its full-vs-LoRA comparison (seeded, so the figures there
reproduce): OUT/corpus.txt (random word lists: the pretraining text, no
chat format in it), OUT/train.jsonl (400 conversations) and OUT/val.jsonl
(40 held-out ones, lists not in train.jsonl) of a word-list reversal task
in chat form, and OUT/model.json (a 0.41M parameter llama)."""
import json
import os
import random
import sys

WORDS = ("red green blue black white river stone cloud tree bird fish cat dog "
         "one two three four five alpha beta gamma delta sun moon star rain snow "
         "wind fire water hill lake road door house book pen cup bread milk apple "
         "pear lion wolf bear fox owl").split()
SYSTEM = "You reverse word lists."


def conv(ws):
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": "reverse: " + " ".join(ws)},
                         {"role": "assistant", "content": " ".join(reversed(ws))}]}


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    r = random.Random(19)
    with open(f"{out}/corpus.txt", "w") as f:
        for _ in range(4000):
            f.write(" ".join(r.choice(WORDS) for _ in range(r.randint(3, 12))) + "\n")
    seen, rows = set(), []
    while len(rows) < 440:
        ws = tuple(r.sample(WORDS, r.randint(2, 4)))
        if ws in seen:
            continue
        seen.add(ws)
        rows.append(conv(list(ws)))
    with open(f"{out}/train.jsonl", "w") as f:
        for c in rows[:400]:
            f.write(json.dumps(c) + "\n")
    with open(f"{out}/val.jsonl", "w") as f:
        for c in rows[400:]:
            f.write(json.dumps(c) + "\n")
    json.dump({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 128,
               "num_attention_heads": 4, "intermediate_size": 344, "vocab_size": 400,
               "max_position_embeddings": 128, "tie_word_embeddings": True},
              open(f"{out}/model.json", "w"))


if __name__ == "__main__":
    main()
