#!/usr/bin/env bash
# The test command: finds PostgreSQL at $DATABASE_URL (default: postgres@127.0.0.1:5432) or,
# if none answers, starts a throwaway cluster from the local binaries; installs the PostgREST
# client suites' pinned packages (npm ci for postgrest-js and supabase-js, a venv with postgrest-py) and, for
# the browser tests, Debian's chromium and playwright-core (npm ci in clients/js); then runs
# cargo fmt --check, cargo clippy -D warnings, cargo doc (warnings denied) and cargo test
# against it (the client suites run inside cargo test: tests/integration/clients.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"

# Finds a PostgreSQL server binary directory (initdb, pg_ctl, postgres).
pg_bindir() {
    if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
        pg_config --bindir; return
    fi
    if command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v initdb)"; return
    fi
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

answers() {
    psql "$1" -Atqc 'select 1' >/dev/null 2>&1
}

if answers "$DATABASE_URL"; then
    echo "test.sh: using PostgreSQL at $DATABASE_URL"
else
    bindir="$(pg_bindir)"
    if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
        echo "test.sh: no PostgreSQL answers at $DATABASE_URL and no initdb was found" >&2
        exit 1
    fi
    export PGRELAY_TEST_PGBIN="$bindir"
    dir="$(mktemp -d /tmp/pgrelay-test-pg.XXXXXX)"
    port=$(( 20000 + RANDOM % 20000 ))
    as_owner=()
    if [ "$(id -u)" = 0 ]; then
        # initdb refuses to run as root: the cluster belongs to the postgres user.
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
        chown postgres "$dir"
        as_owner=(runuser -u postgres --)
    fi
    "${as_owner[@]}" "$bindir/initdb" -D "$dir/data" -U postgres -A trust >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    "${as_owner[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300" start >/dev/null
    cleanup() {
        "${as_owner[@]}" "$bindir/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$dir"
    }
    trap cleanup EXIT
    export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
    echo "test.sh: started a throwaway PostgreSQL at $DATABASE_URL"
fi

# The PostgREST client suites need Node.js 20+ and Python 3 with venv: no silent skip.
node_major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || true)"
if [ -z "$node_major" ] || [ "$node_major" -lt 20 ] || ! command -v npm >/dev/null 2>&1; then
    echo "test.sh: Node.js 20+ with npm is required (the postgrest-js suite, clients/postgrest)" >&2
    exit 1
fi
if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv' >/dev/null 2>&1; then
    echo "test.sh: Python 3 with venv is required (the postgrest-py suite, clients/postgrest/python)" >&2
    exit 1
fi
# The browser tests (the JS client and the dashboard) drive Debian's Chromium with
# playwright-core: install the package when it is missing and we may.
if [ -z "${CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing Debian's chromium package for the browser tests"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q chromium >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
    else
        echo "test.sh: the browser tests need Chromium: install Debian's chromium package or set CHROMIUM" >&2
        exit 1
    fi
fi
(cd clients/postgrest && npm ci --no-audit --no-fund)
(cd clients/js && npm ci --no-audit --no-fund)
(cd clients/supabase && npm ci --no-audit --no-fund)
venv=target/postgrest-py-venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r clients/postgrest/python/requirements.txt

cargo fmt --check
cargo clippy --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
cargo test
