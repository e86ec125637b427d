#!/usr/bin/env bash
# t_omp_wait.sh — the inference commands run with OMP_WAIT_POLICY=passive
# (kiln sets it and executes itself again; libgomp reads it at load), unless
# the user set an OpenMP wait setting of their own. Checked on a running
# `kiln serve` through /proc/PID/environ. Loopback only; bounded waits.
set -u
D="$KILN_TMP/t_omp_wait"
mkdir -p "$D"
pass() { echo "PASS $1"; }
fail() { echo "FAIL $1${2:+: $2}"; }
if [ ! -r /proc/self/environ ]; then echo "SKIP omp_wait: needs /proc"; exit 0; fi
cat >"$D/tiny.json" <<'EOF'
{"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 257, "n_positions": 128}
EOF
"$KILN" init --config "$D/tiny.json" --out "$D/tiny" --force >/dev/null || { fail init; exit 1; }
# policy_of ENV...: the OMP_WAIT_POLICY a kiln serve started with that environment runs with
policy_of() {
  env -u OMP_WAIT_POLICY -u GOMP_SPINCOUNT -u KMP_BLOCKTIME "$@" \
    "$KILN" serve --model "$D/tiny" --tokenizer bytes --port 0 --threads 1 >"$D/serve.log" 2>&1 &
  local pid=$! v=""
  for _ in $(seq 200); do grep -q 'listening on' "$D/serve.log" && break; kill -0 $pid 2>/dev/null || break; sleep 0.05; done
  v=$(tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | sed -n 's/^OMP_WAIT_POLICY=//p')
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  echo "${v:-unset}"
}
v=$(policy_of)
[ "$v" = passive ] && pass omp_wait_passive_by_default || fail omp_wait_passive_by_default "OMP_WAIT_POLICY=$v"
v=$(policy_of OMP_WAIT_POLICY=active)
[ "$v" = active ] && pass omp_wait_user_policy_kept || fail omp_wait_user_policy_kept "OMP_WAIT_POLICY=$v"
v=$(policy_of GOMP_SPINCOUNT=1000)
[ "$v" = unset ] && pass omp_wait_user_spincount_kept || fail omp_wait_user_spincount_kept "OMP_WAIT_POLICY=$v"
exit 0
