#!/usr/bin/env python3
"""tests/mutate.py — `make mutate`: the suite's own mutation check.

Reads tests/mutations.txt (a list of small deliberate bugs, each with the
tests expected to catch it), copies the checkout to a temporary directory,
builds it once, checks that every named test passes there unmutated, then
for each mutation: writes the bug into the copy, rebuilds only what changed
(make's dependency tracking: one object, the library, the named binaries),
runs the named tests one by one until one fails, and puts the file back.

A mutation is
  caught      when one of its tests fails (a FAIL line, a crash, a non-zero
              exit or the time limit: a hang is caught too);
  survived    when all of its tests pass — the suite missed the bug;
  stale       when its `find` text is not in the file exactly once (the code
              moved: update the entry);
  unbuildable when the mutated tree does not compile (a mutation must be a
              bug, not a syntax error).
Anything but `caught` fails the run (exit 1), as does a named test that
fails on the unmutated tree or a list with fewer than MIN_MUTATIONS entries.

Usage: tests/mutate.py [--list FILE] [--only ID[,ID...]] [--keep] [--jobs N] [--workers N]
                       [--no-baseline]
--no-baseline leaves out the unmutated run of the named tests: for a tree
whose whole suite has just passed (CI runs make test first).
The last line is "N passed, N failed" (one per mutation: caught = passed).
"""
import argparse
import threading
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_MUTATIONS = 25
TEST_TIMEOUT = 300  # seconds per test program or script


class Mutation:
    def __init__(self, mid, line):
        self.id = mid
        self.line = line
        self.fields = {}

    def get(self, k, default=None):
        return self.fields.get(k, default)


def parse(path):
    """Blocks: a header `[id]`, then `key: value` lines. `find` and
    `replace` are exact text; a value may continue on lines that start with
    `  | ` (a newline, then the rest of the line after the bar)."""
    muts, cur, key = [], None, None
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                key = None
                continue
            m = re.match(r"^\[([a-z0-9][a-z0-9_.-]*)\]\s*$", line)
            if m:
                cur = Mutation(m.group(1), n)
                muts.append(cur)
                key = None
                continue
            m = re.match(r"^  \| ?(.*)$", line)
            if m and cur is not None and key in ("find", "replace"):
                cur.fields[key] += "\n" + m.group(1)
                continue
            m = re.match(r"^(layer|file|find|replace|tests|why):(?: (.*))?$", line)
            if not m or cur is None:
                sys.exit("%s:%d: expected '[id]' or 'key: value' (layer, file, find, replace, "
                         "tests, why), got: %r" % (path, n, line))
            key = m.group(1)
            if key in cur.fields:
                sys.exit("%s:%d: [%s] has '%s' twice" % (path, n, cur.id, key))
            cur.fields[key] = m.group(2) or ""
    ids = set()
    for mu in muts:
        if mu.id in ids:
            sys.exit("%s:%d: duplicate id [%s]" % (path, mu.line, mu.id))
        ids.add(mu.id)
        for k in ("layer", "file", "find", "replace", "tests"):
            if k not in mu.fields:
                sys.exit("%s:%d: [%s] has no '%s:'" % (path, mu.line, mu.id, k))
        if mu.get("find") == mu.get("replace"):
            sys.exit("%s:%d: [%s]: replace is the same as find" % (path, mu.line, mu.id))
        mu.tests = mu.get("tests").split()
        if not mu.tests:
            sys.exit("%s:%d: [%s] names no test" % (path, mu.line, mu.id))
    return muts


def sh(cmd, cwd, log, timeout=None, env=None):
    """Runs cmd (a list), output appended to log; returns (rc, seconds)."""
    t0 = time.monotonic()
    with open(log, "ab") as out:
        try:
            rc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                timeout=timeout, env=env).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.monotonic() - t0


def targets_for(tests):
    """Make targets a list of test names needs: the kiln binary (every shell
    test and several programs run it), each named program, and what a shell
    test runs from the build (the test programs and examples it names)."""
    t = ["build/kiln"]
    for name in tests:
        if name.startswith("test_"):
            t.append("build/tests/" + name)
        else:
            with open(os.path.join(ROOT, "tests", name), encoding="utf-8") as f:
                text = f.read()
            t += sorted({"build/tests/" + p for p in re.findall(r"tests/(test_[a-z0-9_]+)", text)})
            if re.search(r"\bexamples/", text):
                t.append("examples")
    return t


def run_test(work, name, log):
    """Runs one test as tests/run.sh does; returns (rc, seconds, summary)."""
    env = dict(os.environ)
    env["TEST_NAMES"] = name
    # threads that spin at barriers collapse when another job shares the
    # CPU (seen: test_model 0.7 s -> 75 s); waiting passively changes when
    # a thread sleeps, not what it computes
    env.setdefault("OMP_WAIT_POLICY", "passive")
    rc, secs = sh(["bash", "tests/run.sh", "build"], work, log, TEST_TIMEOUT, env)
    return rc, secs


def last_lines(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def run_one(m, tree, work, jobs):
    """Plants mutation m in tree, builds its tests, runs them, puts the
    file back. Returns (status, by, seconds, log)."""
    path = os.path.join(tree, m.get("file"))
    with open(path, encoding="utf-8") as f:
        orig = f.read()
    find, repl = m.get("find"), m.get("replace")
    count = orig.count(find)
    mlog = os.path.join(work, "m-%s.log" % m.id)
    status, by, secs_total = None, "", 0.0
    if count != 1:
        return ("stale", "'find' text occurs %d times in %s (must be exactly once)"
                % (count, m.get("file")), 0.0, mlog)
    with open(path, "w", encoding="utf-8") as f:
        f.write(orig.replace(find, repl, 1))
    try:
        # a mutation that leaves a variable unused is still the bug it plants
        rc, secs = sh(["make", "-j" + jobs, "--no-print-directory", "WERROR=0"] + targets_for(m.tests), tree,
                      mlog)
        secs_total += secs
        if rc:
            status, by = "unbuildable", "the mutated tree does not compile (log: %s)" % mlog
        else:
            for t in m.tests:
                rc, secs = run_test(tree, t, mlog)
                secs_total += secs
                if rc:
                    status = "caught"
                    by = t + (" (time limit)" if rc == 124 else "")
                    break
            if status is None:
                status = "survived"
                by = "passed: " + " ".join(m.tests)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(orig)
        # newer than the mutated object: the next build recompiles it
        os.utime(path, None)
    return status, by, secs_total, mlog


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", default=os.path.join(ROOT, "tests", "mutations.txt"))
    ap.add_argument("--only", default="")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    ap.add_argument("--jobs", default="2")
    ap.add_argument("--no-baseline", action="store_true",
                    help="the named tests passed on this tree already (make test just ran)")
    ap.add_argument("--workers", default="1",
                    help="mutations run at once, each in its own copy of the tree (make -j1 then)")
    a = ap.parse_args()
    muts = parse(a.list)
    if len(muts) < MIN_MUTATIONS and not a.only:
        sys.exit("%s: %d mutations; the check needs at least %d" % (a.list, len(muts), MIN_MUTATIONS))
    if a.only:
        want = set(a.only.split(","))
        unknown = want - {m.id for m in muts}
        if unknown:
            sys.exit("--only: no mutation named %s in %s" % (", ".join(sorted(unknown)), a.list))
        muts = [m for m in muts if m.id in want]
    for m in muts:
        for t in m.tests:
            if not (t.startswith("test_") and os.path.exists(os.path.join(ROOT, "tests", t + ".c"))) \
               and not (t.startswith("t_") and os.path.exists(os.path.join(ROOT, "tests", t))):
                sys.exit("%s:%d: [%s] names test '%s', which is neither tests/%s.c nor tests/%s"
                         % (a.list, m.line, m.id, t, t, t))
        if not os.path.exists(os.path.join(ROOT, m.get("file"))):
            sys.exit("%s:%d: [%s]: no file %s" % (a.list, m.line, m.id, m.get("file")))

    work = tempfile.mkdtemp(prefix="kiln-mutate.")
    log = os.path.join(work, "mutate.log")
    print("mutate: %d mutations from %s; copy and logs in %s" % (len(muts), a.list, work), flush=True)
    # the checkout as git knows it (tracked and untracked-not-ignored files)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    tree = os.path.join(work, "tree")
    for f in files:
        if not f or not os.path.isfile(os.path.join(ROOT, f)):
            continue
        d = os.path.join(tree, os.path.dirname(f))
        os.makedirs(d, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(tree, f))
    nm = os.path.join(ROOT, "tests", "js", "node_modules")
    if os.path.isdir(nm):
        os.symlink(nm, os.path.join(tree, "tests", "js", "node_modules"))

    t0 = time.monotonic()
    all_tests = sorted({t for m in muts for t in m.tests})
    rc, secs = sh(["make", "-j" + a.jobs, "--no-print-directory", "WERROR=0"] + targets_for(all_tests) +
                  ["all"], tree, log)
    if rc:
        print(last_lines(log, 30))
        sys.exit("mutate: the unmutated copy does not build (log: %s)" % log)
    print("mutate: built the copy in %.0f s" % secs, flush=True)
    # each worker has its own copy of the built tree (copied with its
    # timestamps, so nothing rebuilds); the workers take the next baseline
    # test, then the next mutation, from shared queues
    nw = max(1, min(int(a.workers), len(muts)))
    trees = [tree] + [os.path.join(work, "tree%d" % k) for k in range(1, nw)]
    for t in trees[1:]:
        shutil.copytree(tree, t, symlinks=True)
    jobs = a.jobs if nw == 1 else "1"
    lock = threading.Lock()

    def in_parallel(n_items, one):
        """Calls one(i, tree) for i in [0, n_items), nw at a time."""
        nxt = [0]

        def worker(k):
            while True:
                with lock:
                    i = nxt[0]
                    nxt[0] += 1
                if i >= n_items:
                    return
                one(i, trees[k])

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(nw)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    # every named test must pass before any mutation: "caught" means
    # nothing when the test fails anyway
    base_fail = []

    def baseline(i, tr):
        t = all_tests[i]
        tlog = os.path.join(work, "base-" + t + ".log")
        rc, secs = run_test(tr, t, tlog)
        with lock:
            print("  baseline %-28s %s (%.1f s)" % (t, "ok" if rc == 0 else "FAILS", secs), flush=True)
            if rc:
                base_fail.append(t)
                print(last_lines(tlog))

    if a.no_baseline:
        print("mutate: no baseline run (--no-baseline: the suite passed on this tree)", flush=True)
    else:
        in_parallel(len(all_tests), baseline)
        print("mutate: baseline of %d tests done at %.0f s" % (len(all_tests), time.monotonic() - t0),
              flush=True)
    if base_fail:
        print("mutate: these tests fail without any mutation: %s" % " ".join(sorted(base_fail)))
        print("0 passed, %d failed" % len(muts))
        return 1

    results = [None] * len(muts)
    done = [0]

    def mutation(i, tr):
        m = muts[i]
        status, by, secs_total, mlog = run_one(m, tr, work, jobs)
        with lock:
            results[i] = (m, status, by)
            done[0] += 1
            print("%-5s %2d/%d %-40s %-11s %s (%.0f s) [%s]" %
                  ("ok" if status == "caught" else "FAIL", done[0], len(muts), m.id, status, by,
                   secs_total, m.get("layer")), flush=True)
            if status != "caught" and status != "stale":
                print("      " + last_lines(mlog, 12).replace("\n", "\n      "), flush=True)

    in_parallel(len(muts), mutation)
    caught = sum(1 for _, s, _ in results if s == "caught")
    bad = [(m, s) for m, s, _ in results if s != "caught"]
    print("mutate: %d of %d mutations caught in %.0f s" % (caught, len(results), time.monotonic() - t0))
    for m, s in bad:
        print("  %s: %s (%s:%d)" % (m.id, s, os.path.relpath(a.list, ROOT), m.line))
    if not a.keep and not bad:
        shutil.rmtree(work, ignore_errors=True)
    print("%d passed, %d failed" % (caught, len(results) - caught))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
