#!/usr/bin/env bash
# Timed pairs of two loadgen builds (docs/benchmarks.md, "Counting instructions").
#
# usage: [REQUESTS=N] scripts/loadgen-pairs.sh OLD_LOADGEN NEW_LOADGEN [PAIRS]
#
# Runs `loadgen --requests $REQUESTS --sequential 10` (default 3,000,000 requests) with
# each build in turn, PAIRS times (default 6), the old one first in odd pairs and second
# in even ones, and prints each run's req/s and CPU per request (user + system, from
# /usr/bin/time), then the mean ratio new/old of CPU per request with its standard
# deviation across pairs, and its median and quartiles, and the median ratio new/old of
# req/s. This machine's speed drifts by up to 1.5x within an hour, and single runs jump
# by a quarter, so only the ratio within a pair means much and many short pairs
# (REQUESTS=1000000, PAIRS=20) resolve more than a few long ones; build each binary with
# `cargo build --release --example loadgen` at the commit to compare and copy it aside.
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 OLD_LOADGEN NEW_LOADGEN [PAIRS]" >&2; exit 2; }
old=$1 new=$2 pairs=${3:-6}
REQUESTS=${REQUESTS:-3000000}
run() {
    local out
    out=$(/usr/bin/time -f "cpu %U %S" "$1" --requests "$REQUESTS" --sequential 10 2>&1)
    awk '/^throughput:/ {rps = $2} /^cpu / {cpu = $2 + $3} END {if (rps == "" || cpu == "") exit 1; print rps, cpu}' <<<"$out" \
        || { echo "$1 printed no throughput:" >&2; echo "$out" >&2; exit 1; }
}
for i in $(seq "$pairs"); do
    if (( i % 2 )); then a=$(run "$old"); b=$(run "$new"); else b=$(run "$new"); a=$(run "$old"); fi
    echo "$a $b"
done | awk -v n="$REQUESTS" '
    { ratio = $4 / $2; sum += ratio; squares += ratio * ratio; pairs++; old += $1; new += $3
      printf "pair %d: old %d req/s, %.2f us CPU per request; new %d req/s, %.2f us; new/old CPU %.3f\n", pairs, $1, $2 * 1e6 / n, $3, $4 * 1e6 / n, ratio }
    { ratios[pairs] = ratio; rates[pairs] = $3 / $1 }
    END { mean = sum / pairs; sd = pairs > 1 ? sqrt((squares - pairs * mean * mean) / (pairs - 1)) : 0
          printf "mean new/old CPU per request %.3f (standard deviation %.3f over %d pairs); mean req/s old %d, new %d\n", mean, sd, pairs, old / pairs, new / pairs
          # Insertion sort: mawk has no asort.
          for (i = 2; i <= pairs; i++) { v = ratios[i]; for (j = i - 1; j >= 1 && ratios[j] > v; j--) ratios[j + 1] = ratios[j]; ratios[j + 1] = v }
          for (i = 2; i <= pairs; i++) { v = rates[i]; for (j = i - 1; j >= 1 && rates[j] > v; j--) rates[j + 1] = rates[j]; rates[j + 1] = v }
          printf "median new/old CPU per request %.3f (quartiles %.3f to %.3f)\n", ratios[int((pairs + 1) / 2)], ratios[int((pairs + 3) / 4)], ratios[int((3 * pairs + 3) / 4)]
          printf "median new/old req/s %.3f (lowest %.3f, highest %.3f)\n", rates[int((pairs + 1) / 2)], rates[1], rates[pairs] }'
