#!/usr/bin/env bash
# Prints the path of a usable tansu 0.6.0, the Kafka-protocol broker the integration
# tests run against, installing it with cargo when none is found.
#
# Order: $TANSU_BIN if it is an executable; `tansu` on PATH, then ~/.cargo/bin/tansu,
# if it reports version 0.6.0; else `cargo install` (about 10 minutes on 2 cores).
# Progress goes to stderr so that `TANSU_BIN=$(scripts/install-tansu.sh)` works.
set -euo pipefail

want="0.6.0"

reports_version() {
    # `tansu --version` prints "tansu 0.6.0".
    local out
    out=$("$1" --version 2>/dev/null) || return 1
    [[ "$out" == *" $want"* || "$out" == "$want" ]]
}

if [[ -n "${TANSU_BIN:-}" ]]; then
    if [[ -x "$TANSU_BIN" && -f "$TANSU_BIN" ]]; then
        echo "$TANSU_BIN"
        exit 0
    fi
    echo "install-tansu: TANSU_BIN=$TANSU_BIN is not an executable file; looking elsewhere" >&2
fi

candidates=()
if on_path=$(command -v tansu 2>/dev/null); then
    candidates+=("$on_path")
fi
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
candidates+=("$cargo_home/bin/tansu")

for c in "${candidates[@]}"; do
    if [[ -x "$c" ]] && reports_version "$c"; then
        echo "$c"
        exit 0
    fi
done

if ! command -v cargo >/dev/null 2>&1; then
    echo "install-tansu: cargo is needed to build tansu $want and is not on PATH" >&2
    exit 1
fi

echo "install-tansu: building tansu $want with cargo install (takes ~10 minutes)..." >&2
# Only the in-memory and SQLite storage engines: the default features pull in
# cloud-storage and Postgres dependencies the tests never use.
cargo install tansu --locked --version "$want" --no-default-features --features dynostore,libsql >&2

bin="$cargo_home/bin/tansu"
if [[ -x "$bin" ]] && reports_version "$bin"; then
    echo "$bin"
    exit 0
fi
echo "install-tansu: cargo install finished but $bin does not report version $want" >&2
exit 1
