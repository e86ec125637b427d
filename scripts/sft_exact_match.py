#!/usr/bin/python3
"""sft_exact_match.py KILN MODEL VAL.jsonl [kiln chat flags, e.g. --adapter DIR]
— held-out exact match: for each conversation of VAL.jsonl, `kiln chat`
answers its last user turn greedily (its system prompt given, a fresh
process per example); the reply must equal the reference assistant text
exactly (surrounding spaces stripped). Prints "exact_match K/N = P"."""
import json
import subprocess
import sys


def main():
    kiln, model, val = sys.argv[1:4]
    extra = sys.argv[4:]
    ok = n = 0
    for line in open(val):
        msgs = json.loads(line)["messages"]
        system = next((m["content"] for m in msgs if m["role"] == "system"), None)
        user = [m["content"] for m in msgs if m["role"] == "user"][-1]
        want = [m["content"] for m in msgs if m["role"] == "assistant"][-1].strip()
        cmd = [kiln, "chat", "--model", model, "--temperature", "0", "--max-tokens", "24",
               "--threads", "1"] + (["--system", system] if system else []) + extra
        p = subprocess.run(cmd, input=user + "\n", capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            sys.exit(f"kiln chat failed: {p.stderr.strip()}")
        got = p.stdout.splitlines()[0].strip() if p.stdout else ""
        ok += got == want
        n += 1
    print(f"exact_match {ok}/{n} = {ok / max(n, 1):.3f}")


if __name__ == "__main__":
    main()
