#!/usr/bin/env bash
# Installs the database servers the test suite and the lock-vs-rpc benchmark run
# against: PostgreSQL (initdb, pg_ctl, postgres, pgbench) and Redis (redis-server).
# Debian packages; quiet and quick when everything is already present.
#
# Tests start their own throwaway servers from these binaries (testkit/), so nothing
# is configured or started here.
set -euo pipefail

have_postgres() {
    local bin
    for bin in /usr/lib/postgresql/*/bin; do
        [[ -x "$bin/initdb" && -x "$bin/pg_ctl" && -x "$bin/postgres" && -x "$bin/pgbench" ]] && return 0
    done
    return 1
}
have_redis() { command -v redis-server >/dev/null 2>&1; }

missing=()
# pgbench lives in the server's bin dir on Debian; postgresql-contrib brings the
# extensions some setups expect alongside it.
have_postgres || missing+=(postgresql postgresql-contrib)
have_redis || missing+=(redis-server)
[[ ${#missing[@]} -eq 0 ]] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-services: missing ${missing[*]} and no apt-get here; install PostgreSQL (with pgbench) and Redis with your package manager" >&2
    exit 1
fi
sudo=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then sudo=(sudo); else
        echo "install-services: missing ${missing[*]}; run as root or install them: apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
echo "install-services: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq >&2
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
# The Debian packages start system-wide servers; the tests never use them.
if command -v service >/dev/null 2>&1; then
    "${sudo[@]}" service redis-server stop >/dev/null 2>&1 || true
    "${sudo[@]}" service postgresql stop >/dev/null 2>&1 || true
fi
have_postgres && have_redis
