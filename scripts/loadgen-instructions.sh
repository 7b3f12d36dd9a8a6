#!/usr/bin/env bash
# Instructions per embedded round trip (docs/benchmarks.md, "Counting instructions").
#
# Runs examples/loadgen under callgrind twice, with SHORT and LONG requests (defaults
# 40,000 and 120,000, 2,000 in flight), and prints the difference divided by the extra
# requests: startup and shutdown cancel out. Unlike wall-clock rates, which drift by up
# to 1.5x within an hour on a shared two-core machine, the count repeats to within
# ~0.2 % back to back but moves by up to ~1.5 % over an hour, so compare two builds in
# one sitting, alternating them (docs/benchmarks.md). It counts instructions only: cache
# misses, atomics contended between threads and clock reads cost more time than their
# count says, so confirm with timed runs (alternating builds) before keeping a change.
# Needs valgrind (Debian: `apt-get install valgrind`). Extra arguments go to loadgen;
# LOADGEN=path measures another build.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install valgrind" >&2; exit 1; }
SHORT=${SHORT:-40000}
LONG=${LONG:-120000}
if [[ -z "${LOADGEN:-}" ]]; then
    cargo build --release --example loadgen >&2
    LOADGEN=${CARGO_TARGET_DIR:-target}/release/examples/loadgen
fi
count() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null -- "$LOADGEN" --requests "$1" --sequential 10 "${@:2}" 2>&1 \
        | sed -n 's/.*Collected : \([0-9]*\)/\1/p'
}
short=$(count "$SHORT" "$@")
long=$(count "$LONG" "$@")
[[ -n "$short" && -n "$long" ]] || { echo "callgrind printed no instruction count" >&2; exit 1; }
echo "instructions per request: $(( (long - short) / (LONG - SHORT) ))"
