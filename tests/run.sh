#!/usr/bin/env bash
# tests/run.sh BUILD_DIR — runs every test program (BUILD_DIR/tests/test_*)
# and every shell test (tests/t_*.sh), counts their PASS/FAIL/SKIP lines and
# ends with "N passed, N failed, N skipped". A program that exits non-zero
# without printing FAIL counts as one failure (a crash is never a pass).
# Set TESTS=pattern to run a subset (names containing it), or
# TEST_NAMES="test_x t_y.sh" for exactly those, TEST_SKIP="t_serve*.sh ..."
# (glob patterns) to leave those out (listed at the end as not run).
set -u
build=${1:-build}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export KILN="$root/$build/kiln" KILN_BUILD="$root/$build" KILN_ROOT="$root"
export KILN_TMP=$(mktemp -d /tmp/kiln-test.XXXXXX)
# precision auto caches its probe in the kiln command's cache folder: the
# tests keep theirs inside KILN_TMP, not in the user's ~/.cache
export XDG_CACHE_HOME="$KILN_TMP/xdg-cache"
trap 'rm -rf "$KILN_TMP"' EXIT
pass=0 fail=0 skip=0
failed_names=()
not_run=()
progs=()
for p in "$build"/tests/test_*; do [ -x "$p" ] && progs+=("$p"); done
for s in tests/t_*.sh; do [ -f "$s" ] && progs+=("$s"); done
for p in "${progs[@]}"; do
  name=$(basename "$p")
  if [ -n "${TESTS:-}" ] && [[ "$name" != *${TESTS}* ]]; then continue; fi
  if [ -n "${TEST_NAMES:-}" ] && [[ " $TEST_NAMES " != *" $name "* ]]; then continue; fi
  left_out=0
  for pat in ${TEST_SKIP:-}; do [[ "$name" == $pat ]] && left_out=1; done
  if [ $left_out = 1 ]; then not_run+=("$name"); continue; fi
  log="$KILN_TMP/$name.log"
  start=$(date +%s.%N)
  case "$p" in
    *.sh) bash "$p" >"$log" 2>&1; rc=$? ;;
    *)    "$p" >"$log" 2>&1; rc=$? ;;
  esac
  secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  np=$(grep -c '^PASS ' "$log"); nf=$(grep -c '^FAIL ' "$log"); ns=$(grep -c '^SKIP ' "$log")
  if [ "$rc" -ne 0 ] && [ "$nf" -eq 0 ]; then
    nf=1; echo "FAIL $name: exited with status $rc" >>"$log"
  fi
  pass=$((pass+np)); fail=$((fail+nf)); skip=$((skip+ns))
  if [ "$nf" -gt 0 ]; then
    echo "FAIL  $name ($np passed, $nf failed, ${secs}s)"
    sed 's/^/    /' "$log" | tail -n 60
    failed_names+=("$name")
  else
    echo "ok    $name ($np passed, $ns skipped, ${secs}s)"
    grep '^SKIP ' "$log" | sed 's/^/    /'
  fi
done
[ ${#failed_names[@]} -gt 0 ] && echo "failed: ${failed_names[*]}"
[ ${#not_run[@]} -gt 0 ] && echo "not run (TEST_SKIP): ${not_run[*]}"
echo "$pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ]
