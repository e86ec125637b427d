#!/usr/bin/env bash
# fuzz/run.sh — builds each libFuzzer harness fuzz/fuzz_*.c with clang
# (ASan + UBSan) against the library and runs it for FUZZ_SECONDS (default
# 30) from its seed corpus fuzz/corpus/<name>/. Exits non-zero on a crash.
# FUZZ_ONLY=name (e.g. gguf) runs only fuzz/fuzz_<name>.c.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${FUZZ_SECONDS:-30}
bd=build-fuzz
make --no-print-directory -s BUILD=$bd CC=clang OPT=-O1 NO_MPI=1 \
  EXTRA_CFLAGS="-fsanitize=fuzzer-no-link,address,undefined -Wno-unused-command-line-argument" \
  $bd/libkiln.a >/dev/null
libs="-fopenmp -lm -lpthread -ljansson -lpcre2-8 -lmicrohttpd"
[ -f /usr/include/dnnl.h ] && libs="$libs -ldnnl"
[ -f /usr/include/unicode/unorm2.h ] && libs="$libs -licuuc" # the Makefile detects ICU the same way
status=0
for h in fuzz/fuzz_*.c; do
  [ -e "$h" ] || continue
  name=$(basename "$h" .c)
  [ -n "${FUZZ_ONLY:-}" ] && [ "$name" != "fuzz_${FUZZ_ONLY}" ] && continue
  clang -std=c11 -D_GNU_SOURCE -O1 -g -march=native -Iinclude -Isrc \
    -fsanitize=fuzzer,address,undefined -o $bd/$name "$h" $bd/libkiln.a $libs
  corpus=fuzz/corpus/${name#fuzz_}
  work=$(mktemp -d)
  [ -d "$corpus" ] && cp -r "$corpus"/. "$work"/
  echo "fuzz: $name for ${secs}s"
  if ! ASAN_OPTIONS=detect_leaks=0 $bd/$name -max_total_time="$secs" -max_len=65536 \
       -print_final_stats=0 "$work" >"$work.log" 2>&1; then
    tail -40 "$work.log"; echo "fuzz: $name FOUND A CRASH"; status=1
  else
    grep -E '^(#[0-9]+ *DONE|Done)' "$work.log" | tail -1 || true
  fi
  rm -rf "$work" "$work.log"
done
exit $status
