#!/usr/bin/env bash
# Issue #9's tansu targets in one run, as same-run ratios (docs/benchmarks.md):
#   1. the broker's one-way ceiling: plain rskafka, one producer, 60-record batches of
#      100 B, a reader with a 1 ms fetch wait (examples/broker_ceiling), fresh broker;
#      then, same broker, a plain-rskafka request-reply's round trip / one-way, the
#      anchor for kafka-rpc's;
#   2. kafka-rpc through tansu (examples/loadgen), fresh broker: client ready, first
#      reply, broker one-way p50 vs low-load round-trip p50, and req/s sustained for
#      DURATION seconds (default 60), once per entry of IN_FLIGHT (default "2000 10000":
#      the load generator's default and the client's default `max_in_flight`), a fresh
#      broker each. Below saturation the sustained rate is in-flight / latency, so one
#      in-flight figure alone says more about the load than about the system.
# Prints each run's output and the ratio of RPC records/s (two records per RPC) to the
# ceiling. Extra arguments go to loadgen.
set -euo pipefail
cd "$(dirname "$0")/.."
TANSU=${TANSU_BIN:-$(scripts/install-tansu.sh)}
DURATION=${DURATION:-60}
IN_FLIGHT=${IN_FLIGHT:-2000 10000}
cargo build --release --example broker_ceiling --example loadgen >&2
bin=${CARGO_TARGET_DIR:-target}/release/examples
work=$(mktemp -d)
broker=""
stop_broker() { [[ -n "$broker" ]] && kill "$broker" 2>/dev/null && wait "$broker" 2>/dev/null; broker=""; }
trap 'stop_broker; rm -rf "$work"' EXIT
fresh_broker() {
    stop_broker
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mkdir -p "$work/$port"
    (cd "$work/$port" && exec "$TANSU" broker --storage-engine memory://tansu/ \
        --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" >tansu.log 2>&1) &
    broker=$!
    for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return; sleep 0.1; done
    echo "tansu did not start" >&2; exit 1
}
fresh_broker
"$bin/broker_ceiling" --bootstrap "127.0.0.1:$port" --client rskafka --batch 60 --records 300000 | tee "$work/ceiling.txt"
ceiling=$(sed -n 's/.*produce -> fetched \([0-9]*\) records\/s.*/\1/p' "$work/ceiling.txt" | head -1)
summary=()
for n in $IN_FLIGHT; do
    fresh_broker
    "$bin/loadgen" --bootstrap "127.0.0.1:$port" --duration-secs "$DURATION" --in-flight "$n" "$@" | tee "$work/loadgen-$n.txt"
    rps=$(sed -n 's/^throughput: \([0-9]*\) req\/s.*/\1/p' "$work/loadgen-$n.txt" | head -1)
    summary+=("$(awk -v c="$ceiling" -v r="$rps" -v n="$n" 'BEGIN { printf "%d in flight: RPC %d req/s = %d records/s = %.1f%% of the broker one-way ceiling %d records/s (target >= 40%%)", n, r, 2 * r, 200 * r / c, c }')")
done
printf '%s\n' "${summary[@]}"
