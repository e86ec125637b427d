#!/usr/bin/env bash
# t_option_names.sh — the library names an option by its field, the kiln
# command by its flag (docs/architecture.md, "Errors"):
#   - the mistakes of tests/test_option_names.c, made on the command line,
#     read with the flag (tools/cli.c maps the field), in errors and in
#     log lines, and no STRUCT.FIELD is left in them;
#   - no string literal in src/ names a --flag (comments are skipped; the
#     server's HTTP messages name JSON parameters, which have no dashes);
#   - every STRUCT.FIELD that a string in src/ names, and every field of
#     the table in tools/cli.c, is a real field of that struct in
#     include/kiln.h (checked by the compiler), and every flag of the table
#     is a flag of some kiln command.
set -u
cd "${KILN_ROOT:-$(dirname "$0")/..}"
T="$KILN_TMP/t_option_names"; rm -rf "$T"; mkdir -p "$T"
ok() { echo "PASS $1"; }
no() { echo "FAIL $1: $2"; }
field_re='kiln_[a-z0-9_]+\.[a-z_]'

# shows NAME FLAG-TEXT CMD... : CMD fails, its stderr has FLAG-TEXT and no
# option field
shows() {
  local name=$1 want=$2 out rc
  shift 2
  out=$(timeout 60 "$@" 2>&1 >/dev/null </dev/null)
  rc=$?
  if [ "$rc" -eq 0 ] || [ "$rc" -ge 124 ]; then no "$name" "exit $rc: $out"
  elif ! grep -qF -- "$want" <<<"$out"; then no "$name" "no '$want' in: $out"
  elif grep -qE "$field_re" <<<"$out"; then no "$name" "a field is left in: $out"
  else ok "$name"; fi
}

shows cli_train_batch "kiln train: --batch, --seq and --grad-accum must be positive (got 0," \
  "$KILN" train --data "$T/none" --out "$T/run" --batch 0
shows cli_train_lr "--lr must be positive" "$KILN" train --data "$T/none" --out "$T/run" --lr 0
shows cli_train_zero "--zero 7 is not supported" \
  "$KILN" train --data "$T/none" --out "$T/run" --zero 7
shows cli_train_no_data "create it with kiln_tokenize_corpus (kiln tokenize), --out $T/none" \
  "$KILN" train --data "$T/none" --out "$T/run"
shows cli_generate_top_p "kiln generate: --top-p 2 must be in (0, 1]" \
  "$KILN" generate --model "$T/none" --top-p 2
shows cli_serve_parallel "kiln serve: --parallel 0 is not in 1..256" \
  "$KILN" serve --model "$T/none" --parallel 0
shows cli_serve_watch_ms "kiln serve: --watch-ms -5 must be >= 0" \
  "$KILN" serve --model "$T/none" --watch-ms -5
shows cli_tokenizer_vocab "--vocab-size 100 must be in" \
  "$KILN" tokenizer train --input "$T/none" --vocab-size 100 --out "$T/tok.json"
printf 'one document\n' >"$T/one.txt"
shows cli_tokenize_val_fraction "kiln tokenize: --val-fraction 2 must be in [0, 1)" \
  "$KILN" tokenize --quiet --input "$T/one.txt" --out "$T/d0" --val-fraction 2
shows cli_tokenize_missing_input "--input '$T/none': " \
  "$KILN" tokenize --quiet --input "$T/none" --out "$T/d0"

# a log line: one document and a validation share
if "$KILN" tokenize --quiet --input "$T/one.txt" --out "$T/d1" --val-fraction 0.5 \
     >/dev/null 2>"$T/log1" &&
   grep -q '^kiln: warn: .*use more files or --doc-separator' "$T/log1" &&
   ! grep -qE "$field_re" "$T/log1"; then
  ok cli_log_line_shows_flag
else
  no cli_log_line_shows_flag "$(cat "$T/log1")"
fi

# --- the sources ---------------------------------------------------------
if ! command -v python3 >/dev/null; then
  echo "SKIP source_checks: python3 is needed to read C string literals"
  exit 0
fi
# string literals of src/ (outside comments), "FILE:LINE<TAB>TEXT" each
python3 - src >"$T/strings" <<'EOF'
import os, sys
for root, _, files in sorted(os.walk(sys.argv[1])):
    for fn in sorted(files):
        if not fn.endswith(('.c', '.h')): continue
        p = os.path.join(root, fn)
        s = open(p, encoding='utf-8', errors='replace').read()
        i, n, line = 0, len(s), 1
        while i < n:
            c = s[i]
            if s.startswith('//', i):
                j = s.find('\n', i); i = n if j < 0 else j
            elif s.startswith('/*', i):
                j = s.find('*/', i + 2); j = n if j < 0 else j + 2
                line += s.count('\n', i, j); i = j
            elif c in '"\'':
                j, buf = i + 1, []
                while j < n and s[j] != c:
                    if s[j] == '\\': buf.append(s[j:j + 2]); j += 2
                    else: buf.append(s[j]); j += 1
                if c == '"': print('%s:%d\t%s' % (p, line, ''.join(buf)))
                line += s.count('\n', i, j); i = j + 1
            else:
                if c == '\n': line += 1
                i += 1
EOF
if [ ! -s "$T/strings" ]; then
  no src_strings_read "no string literal read from src/"
elif grep -P '\t.*(?<![A-Za-z0-9-])--[a-z]' "$T/strings" >"$T/flags"; then
  no src_names_no_flag "library strings name a command-line flag; name the option field (STRUCT.FIELD) instead:
$(cat "$T/flags")"
else
  ok src_names_no_flag
fi

# STRUCT.FIELD names of src/ strings and of the table in tools/cli.c
{ cut -f2- "$T/strings" | grep -oE 'kiln_[a-z0-9_]+(\.[a-z_][a-z0-9_]*)+'
  sed -n 's/^ *{"\(kiln_[a-z0-9_.]*\)", "--[a-z0-9-]*"},.*/\1/p' tools/cli.c
} | sort -u >"$T/fields"
n_table=$(grep -cE '^ *\{"kiln_[a-z0-9_.]+", "--[a-z0-9-]+"\},' tools/cli.c)
{
  echo '#include "kiln.h"'
  i=0
  while IFS= read -r f; do
    i=$((i + 1))
    echo "#line $i \"$f\""
    echo "void f$i(${f%%.*} *p); void f$i(${f%%.*} *p) { (void)sizeof(p->${f#*.}); }"
  done <"$T/fields"
} >"$T/fields.c"
if [ "$n_table" -lt 20 ]; then
  no fields_are_real "read only $n_table entries of the table in tools/cli.c"
elif ${CC:-gcc} -fsyntax-only -Iinclude "$T/fields.c" 2>"$T/cc.err"; then
  ok fields_are_real
else
  no fields_are_real "these names are no field of their struct in include/kiln.h:
$(grep -oE '^kiln_[a-z0-9_.]+' "$T/cc.err" | sort -u)"
fi

# every flag of the table is a flag of a kiln command
missing=""
for fl in $(sed -n 's/^ *{"kiln_[a-z0-9_.]*", "--\([a-z0-9-]*\)"},.*/\1/p' tools/cli.c | sort -u); do
  grep -qE "\{\"$fl\", CLI_" tools/*.c || missing="$missing --$fl"
done
if [ -z "$missing" ]; then ok table_flags_exist; else no table_flags_exist "no command has$missing"; fi
