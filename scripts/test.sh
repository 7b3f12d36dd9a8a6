#!/usr/bin/env bash
# Runs the test suite with what the real-broker tests need: a Kafka-protocol broker
# (KAFKA_BOOTSTRAP, or tansu found or installed by scripts/install-tansu.sh),
# Python's confluent-kafka, the foreign client that checks our group commits,
# PostgreSQL and Redis binaries (scripts/install-services.sh; tests start their own),
# and the NestJS peer's npm packages.
# Arguments go to `cargo test --workspace`.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "test.sh: $python not found; the Kafka group test needs Python 3 (set PYTHON to choose one)" >&2
    exit 1
fi
if ! "$python" -c "import confluent_kafka" 2>/dev/null; then
    # Debian's python3 refuses `pip install` outside a virtual environment (PEP 668),
    # so the module goes into a venv of our own (under the ignored target/), reused
    # by later runs.
    venv="$PWD/target/test-venv"
    if ! "$venv/bin/python" -c "import confluent_kafka" 2>/dev/null; then
        echo "test.sh: installing confluent-kafka into $venv" >&2
        if ! "$python" -m venv "$venv" >&2; then
            echo "test.sh: $python cannot create a virtual environment (Debian: apt-get install python3-venv)" >&2
            exit 1
        fi
        "$venv/bin/python" -m pip install --quiet confluent-kafka >&2
    fi
    python="$venv/bin/python"
fi
export PYTHON="$python"

if [[ -z "${KAFKA_BOOTSTRAP:-}" ]]; then
    # A prebuilt copy beside the checkout saves the ~10-minute build when present.
    if [[ -z "${TANSU_BIN:-}" && -x ../shared/bin/tansu ]]; then
        export TANSU_BIN="$(cd ../shared/bin && pwd)/tansu"
    fi
    TANSU_BIN="$(scripts/install-tansu.sh)"
    export TANSU_BIN
    echo "test.sh: broker binary $TANSU_BIN" >&2
fi

scripts/install-services.sh

# The NestJS peer of tests/interop_nestjs.rs: pinned packages from its lock file.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "test.sh: node and npm are needed for the NestJS interop tests (Node.js >= 20; Debian: apt-get install nodejs npm)" >&2
    exit 1
fi
if [[ ! tests/peers/nestjs/node_modules/.package-lock.json -nt tests/peers/nestjs/package-lock.json ]]; then
    echo "test.sh: installing the NestJS test peer (npm ci)" >&2
    (cd tests/peers/nestjs && npm ci --no-audit --no-fund --loglevel=error) >&2
fi

# The PostgreSQL inbox (feature `postgres`) is tested against the server installed above;
# trace context (feature `otel`) with an in-memory span exporter; the `tls` feature so the
# guide's TLS example and the TLS connection code compile under test.
cargo test --workspace --features kafka-rpc/postgres,kafka-rpc/otel,kafka-rpc/tls "$@"
