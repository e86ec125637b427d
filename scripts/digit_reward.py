#!/usr/bin/python3
"""digit_reward.py -- a kiln grpo --reward-cmd checker with partial credit.

Reads one JSON object per line on stdin ({"prompt","completion","answer"})
and prints, per line, the share of the answer's digits that the
completion's final answer (after the last "####") has in the same place,
counted from the right: 1 for a correct answer, 0.5 for "#### 47" when the
answer is 57, 0 without a marker or a number. A denser signal than exact
match, tried in docs/alignment.md's addition run.
"""
import json
import sys

for line in sys.stdin:
    o = json.loads(line)
    c, a = o.get("completion") or "", str(o.get("answer") or "")
    got = c.rsplit("####", 1)[1].strip() if "####" in c else ""
    if not got.isdigit() or not a.isdigit():
        print(0)
        continue
    n = max(len(a), len(got))
    ra, rg = a.rjust(n, "_"), got.rjust(n, "_")
    print(sum(x == y for x, y in zip(ra, rg)) / n)
    sys.stdout.flush()
