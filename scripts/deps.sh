#!/usr/bin/env bash
# scripts/deps.sh — installs the Debian packages kiln needs that are missing,
# saying what it installs. Runs apt-get as root, or through sudo. With
# KILN_NO_INSTALL=1 it only reports what is missing.
#
#   required : build-essential, libjansson-dev, libpcre2-dev, libmicrohttpd-dev
#   optional : libdnnl-dev (fast GEMM), openmpi-bin + libopenmpi-dev (MPI),
#              libicu-dev (the NFC normalizer of Qwen2 tokenizers)
#   tests    : python3-torch (PyTorch reference), libopenblas0-pthread (its
#              fp32 BLAS in the benchmarks), nodejs + npm (JS clients),
#              clang + libclang-rt-14-dev (fuzzers, sanitizers), curl;
#              npm packages in tests/js/package.json (below)
#   corpus   : fortunes, fortunes-min (the demo's training text)
set -u
pkgs="build-essential libjansson-dev libpcre2-dev libmicrohttpd-dev
libdnnl-dev openmpi-bin libopenmpi-dev libicu-dev python3-torch python3-numpy libopenblas0-pthread
clang libclang-rt-14-dev curl fortunes fortunes-min"
missing=()
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js may come from elsewhere with npm bundled; ask Debian only when absent.
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "${KILN_NO_INSTALL:-0}" = 1 ]; then
    echo "kiln deps: missing Debian packages: ${missing[*]}" >&2
  else
    echo "kiln deps: installing missing Debian packages: ${missing[*]}"
    if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
      echo "kiln deps: not root and no sudo; install them with: apt-get install ${missing[*]}" >&2; exit 1; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q >/dev/null || { echo "kiln deps: apt-get update failed" >&2; exit 1; }
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/tmp/kiln-apt.log 2>&1 || {
      tail -20 /tmp/kiln-apt.log >&2; echo "kiln deps: apt-get install failed (log: /tmp/kiln-apt.log)" >&2; exit 1; }
  fi
fi
# JavaScript references for the tests, installed into tests/js/node_modules
# from the npm registry: gpt-3-encoder and tiktoken (tokenizer references),
# openai (the server's client), node-llama-cpp + @node-llama-cpp/linux-x64
# (llama.cpp's CPU build, for the GGUF interop test). Optional dependencies
# (node-llama-cpp's CUDA/Vulkan builds, ~650 MB) and install scripts are
# skipped. A stamp file holding package.json's checksum makes a changed
# package.json reinstall.
if [ -f tests/js/package.json ] && command -v npm >/dev/null; then
  sum=$(cksum <tests/js/package.json | cut -d' ' -f1)
  stamp=tests/js/node_modules/.kiln-deps-stamp
  if [ ! -d tests/js/node_modules ] || [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
    deps=$(sed -n '/"dependencies"/,/}/p' tests/js/package.json | grep -o '"[^"]*": *"[^"]*"' |
           sed 's/"\([^"]*\)": *"\([^"]*\)"/\1@\2/' | tr '\n' ' ')
    if [ "${KILN_NO_INSTALL:-0}" = 1 ]; then
      echo "kiln deps: tests/js/node_modules is missing or older than tests/js/package.json (${deps})" >&2
    else
      echo "kiln deps: installing npm test dependencies into tests/js/node_modules: ${deps}"
      echo "kiln deps: (npm install --omit=optional --ignore-scripts: no GPU builds of llama.cpp)"
      (cd tests/js && npm install --omit=optional --ignore-scripts --no-audit --no-fund --silent \
         >/tmp/kiln-npm.log 2>&1) || {
        tail -20 /tmp/kiln-npm.log >&2; echo "kiln deps: npm install failed (log: /tmp/kiln-npm.log)" >&2; exit 1; }
      echo "$sum" >"$stamp"
    fi
  fi
fi
exit 0
