#!/usr/bin/env bash
# bench/run.sh BUILD_DIR — runs every benchmark: BUILD_DIR/bench/bench_*
# programs and bench/bench_*.sh scripts. Each prints one result per line with
# its ratio to a reference measured in the same run. Benchmarks never fail
# the build: a failing one is reported and the rest still run.
set -u
build=${1:-build}
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export KILN="$root/$build/kiln" KILN_BUILD="$root/$build" KILN_ROOT="$root"
for p in "$build"/bench/bench_* bench/bench_*.sh; do
  [ -e "$p" ] || continue
  case "$p" in *.d | *.o) continue ;; esac   # the compiler's dependency files
  if [ -n "${BENCH:-}" ] && [[ "$(basename "$p")" != *${BENCH}* ]]; then continue; fi
  echo "== $(basename "$p")"
  case "$p" in
    *.sh) bash "$p" || echo "   (benchmark exited with status $?)" ;;
    *)    "$p" || echo "   (benchmark exited with status $?)" ;;
  esac
done
exit 0
