#!/usr/bin/env bash
# t_getenv.sh — the library reads no settings from the environment
# (docs/architecture.md: settings live in options structs and kiln_ctx).
# Every read of the environment under src/ must be one of the environment
# DETECTION uses listed below, by file and code (line numbers do not
# matter). A new getenv fails this test: make the setting a field of an
# options struct (and map a variable in tools/ if scripts need one). A
# listed use that no longer exists fails too: take it off the list.
set -u
cd "${KILN_ROOT:-$(dirname "$0")/..}"

# file<TAB>code (whitespace-trimmed line)
allowed=$(cat <<'EOF'
src/base/ctx.c	if (getenv("OMP_NUM_THREADS")) return 0;
src/base/ctx.c	const char *env = getenv("KILN_LOG");
src/train/dist.c	const char *s = getenv(name);
src/train/dist.c	if (!n && getenv("PMIX_RANK")) n = 1;
EOF
)
# why each is detection, not a setting:
#   OMP_NUM_THREADS  OpenMP's own variable: when set, kiln leaves the thread
#                    count to OpenMP (kiln_set_threads is the setting)
#   KILN_LOG         the initial log level of a new ctx (kiln_set_log_level
#                    is the setting); lets any program be debugged
#   getenv(name)     env_int() in dist.c, read only for the launcher's
#                    variables (checked below)
#   PMIX_RANK        the launcher says this process is a rank of a job

found=$(grep -rnE '\b(secure_)?getenv\b|\benviron\b|\bputenv\b|\bsetenv\b' src/ --include='*.c' --include='*.h' |
        sed -E 's/^([^:]*):[0-9]+:[[:space:]]*(.*[^[:space:]])[[:space:]]*$/\1\t\2/' | sort)
want=$(printf '%s\n' "$allowed" | sort)

new=$(comm -13 <(printf '%s\n' "$want") <(printf '%s\n' "$found"))
gone=$(comm -23 <(printf '%s\n' "$want") <(printf '%s\n' "$found"))
if [ -z "$new" ] && [ -z "$gone" ]; then
  echo "PASS getenv_only_detection"
else
  [ -n "$new" ] && printf 'environment read in src/ that is not environment detection (make it an option; see docs/architecture.md):\n%s\n' "$new"
  [ -n "$gone" ] && printf 'listed in tests/t_getenv.sh but no longer in src/ (take it off the list):\n%s\n' "$gone"
  echo "FAIL getenv_only_detection"
fi

# env_int() (the getenv(name) above) reads only the launcher's variables
calls=$(grep -ohE 'env_int\("[A-Z_0-9]+"' src/train/dist.c | sed -E 's/env_int\("(.*)"/\1/' | sort -u | tr '\n' ' ')
if [ "$calls" = "OMPI_COMM_WORLD_SIZE PMIX_SIZE PMI_SIZE " ] &&
   [ "$(grep -rn 'env_int(' src/ | grep -vc 'env_int("\(OMPI_COMM_WORLD_SIZE\|PMIX_SIZE\|PMI_SIZE\)"\|static int env_int(')" = 0 ]; then
  echo "PASS env_int_only_launcher"
else
  echo "env_int reads: $calls(expected OMPI_COMM_WORLD_SIZE PMIX_SIZE PMI_SIZE)"
  grep -rn 'env_int(' src/
  echo "FAIL env_int_only_launcher"
fi
