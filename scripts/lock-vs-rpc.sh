#!/usr/bin/env bash
# Runs the lock-vs-rpc benchmark (bench/): installs PostgreSQL and Redis when absent,
# finds or installs tansu, and runs the default sweep in release mode. The harness
# starts its own throwaway servers and stops them on exit, also on failure.
# Arguments go to the harness (`--help` lists them); results land in target/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-services.sh
if [[ -z "${KAFKA_BOOTSTRAP:-}" ]]; then
    if [[ -z "${TANSU_BIN:-}" && -x ../shared/bin/tansu ]]; then
        export TANSU_BIN="$(cd ../shared/bin && pwd)/tansu"
    fi
    TANSU_BIN="$(scripts/install-tansu.sh)"
    export TANSU_BIN
fi
exec cargo run --release -p lock-vs-rpc -- "$@"
