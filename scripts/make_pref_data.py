#!/usr/bin/python3
"""make_pref_data.py OUT [SEED] [KINDS] -- the word-list reversal task with a known
better answer, for kiln sft and kiln dpo (docs/alignment.md).

Writes to OUT:
  corpus.txt       random word lists (pretraining text; never the chat format)
  sft.jsonl        400 chat examples: "reverse: a b c" -> "c b a"
  prefs.jsonl      2000 preference pairs {"prompt": [system, user],
                   "chosen": [assistant: the reversal], "rejected":
                   [assistant: a corrupted reversal]}
  prefs_val.jsonl  200 held-out pairs (their word lists appear in no
                   training file)
A corruption is one of KINDS (comma-separated; default all three):
"unreversed" (the list as given), "swap" (two neighbouring words of the
reversal swapped) or "replace" (one word of the reversal replaced by a word
that is not in the list). Lists have 3
to 5 words from a 40-word vocabulary; the seed fixes everything.
"""
import json
import random
import sys

WORDS = ("red green blue black white cat dog bird fish cow one two three four five "
         "river hill tree stone cloud sun moon star rain snow apple bread milk salt "
         "honey north south east west alpha beta gamma delta omega fire").split()
SYSTEM = "You reverse word lists."


def corrupt(rng, words, kinds):
    rev = list(reversed(words))
    kind = rng.choice(kinds)
    if kind == "unreversed":
        return list(words)
    if kind == "swap":
        i = rng.randrange(len(rev) - 1)
        rev[i], rev[i + 1] = rev[i + 1], rev[i]
        return rev
    i = rng.randrange(len(rev))
    rev[i] = rng.choice([w for w in WORDS if w not in rev])
    return rev


def main():
    out = sys.argv[1]
    rng = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    kinds = (sys.argv[3] if len(sys.argv) > 3 else "unreversed,swap,replace").split(",")
    assert all(k in ("unreversed", "swap", "replace") for k in kinds), kinds
    seen = set()

    def fresh():
        while True:
            w = rng.sample(WORDS, rng.randint(3, 5))
            if tuple(w) not in seen:
                seen.add(tuple(w))
                return w

    with open(f"{out}/corpus.txt", "w") as f:
        for _ in range(3000):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "\n")
    val = [fresh() for _ in range(200)]
    with open(f"{out}/sft.jsonl", "w") as f:
        for _ in range(400):
            w = fresh()
            f.write(json.dumps({"messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "reverse: " + " ".join(w)},
                {"role": "assistant", "content": " ".join(reversed(w))}]}) + "\n")
    for name, lists in (("prefs", [fresh() for _ in range(2000)]), ("prefs_val", val)):
        with open(f"{out}/{name}.jsonl", "w") as f:
            for w in lists:
                bad = corrupt(rng, w, kinds)
                f.write(json.dumps({
                    "prompt": [{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": "reverse: " + " ".join(w)}],
                    "chosen": [{"role": "assistant", "content": " ".join(reversed(w))}],
                    "rejected": [{"role": "assistant", "content": " ".join(bad)}]}) + "\n")


if __name__ == "__main__":
    main()
