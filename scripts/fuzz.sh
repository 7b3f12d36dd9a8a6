#!/usr/bin/env bash
# Runs each cargo-fuzz target of fuzz/ for SECONDS (default 60) and prints libFuzzer's
# summary line (executions, corpus) per target. Needs a nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz`). A crash stops the run with the input saved
# under fuzz/artifacts/<target>/ and a non-zero exit.
#
#   scripts/fuzz.sh 300                      # every target, 5 minutes each
#   scripts/fuzz.sh 60 broker_responses      # one target
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(wire_headers codecs group_metadata broker_responses fetched_batches)
fi
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2; exit 1; }
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    # Hand-made inputs the fuzzer would take long to find (fuzz/seeds/<target>/, read
    # as a second corpus; what it adds goes to the first).
    seeds=()
    if [ -d "fuzz/seeds/$t" ]; then seeds=("fuzz/seeds/$t"); fi
    log="$(mktemp)"
    # -rss_limit_mb: a decoder that allocates by an untrusted count shows up as an
    # out-of-memory crash rather than as a slow machine.
    if ! cargo +nightly fuzz run --fuzz-dir fuzz "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "$t: FAILED (see fuzz/artifacts/$t/)" >&2
        exit 1
    fi
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || true)"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)"
    corpus="$(find "fuzz/corpus/$t" -type f | wc -l)"
    echo "$t: ${runs:-?} executions in ${seconds} s, ${cov:-cov: ?}, corpus ${corpus} inputs, no crash"
    rm -f "$log"
done
