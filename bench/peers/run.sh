#!/usr/bin/env bash
# Steady commit-to-receive latency of pgrelay beside its peers, measured in the same runs by
# the same client (BENCHMARKS.md, 0e): FastAPI + broadcaster and PostGraphile v4 (and
# pg_eventserv when given a binary), each fed by the bench's bare row-level
# `pg_notify(row_to_json(new))` trigger in the same transactions as pgrelay's rows.
#
# It installs the peers into a throwaway directory (a venv and `npm ci` under target/), starts
# them against the database, runs `pgrelay bench --scenario steady --peer …` RUNS times (every
# system is measured in every run, from the same commits), prints each run and the medians as
# markdown, and stops the peers.
#
# usage: bench/peers/run.sh [RUNS]        (default 3)
# environment (defaults in brackets):
#   DATABASE_URL  [postgres://postgres@127.0.0.1:5432/postgres] the bench creates and drops its
#                 tables there (pgrelay_bench, pgrelay_bench_baseline); the peers connect to it
#   PGRELAY       [target/release/pgrelay] the binary that runs the bench (and its relay)
#   RATE [1000] DURATION [10] SUBSCRIBERS [1] WRITERS [4] CAPTURE [notify]  the bench's settings
#   PEERS_DIR     [target/bench-peers] where the peers are installed and the results written
#   PG_EVENTSERV  a pg_eventserv binary, measured too when set (it is not built here)
set -euo pipefail
cd "$(dirname "$0")/../.."

runs="${1:-3}"
export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
pgrelay="${PGRELAY:-target/release/pgrelay}"
rate="${RATE:-1000}"
duration="${DURATION:-10}"
subscribers="${SUBSCRIBERS:-1}"
writers="${WRITERS:-4}"
capture="${CAPTURE:-notify}"
dir="${PEERS_DIR:-target/bench-peers}"
channel=pgrelay_bench_baseline

[ -x "$pgrelay" ] || { echo "run.sh: no $pgrelay (cargo build --release, or set PGRELAY)" >&2; exit 1; }
command -v node >/dev/null && command -v npm >/dev/null \
    || { echo "run.sh: Node.js and npm are required (PostGraphile)" >&2; exit 1; }
python3 -c 'import venv' 2>/dev/null || { echo "run.sh: Python 3 with venv is required (broadcaster)" >&2; exit 1; }

mkdir -p "$dir/postgraphile" "$dir/logs"
dir="$(cd "$dir" && pwd)"

echo "run.sh: installing the peers into $dir" >&2
[ -x "$dir/venv/bin/python" ] || python3 -m venv "$dir/venv"
"$dir/venv/bin/python" -m pip install -q --disable-pip-version-check -r bench/peers/broadcaster/requirements.txt
cp bench/peers/postgraphile/package.json bench/peers/postgraphile/package-lock.json \
    bench/peers/postgraphile/server.js "$dir/postgraphile/"
(cd "$dir/postgraphile" && npm ci --omit=dev --no-audit --no-fund --loglevel=error >/dev/null)

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pids=()
names=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT INT TERM

# start NAME PORT COMMAND…: runs COMMAND in the background (logs in $dir/logs/NAME.log) and
# waits until PORT accepts connections.
start() {
    local name="$1" port="$2"
    shift 2
    "$@" >"$dir/logs/$name.log" 2>&1 &
    pids+=("$!")
    names+=("$name")
    local deadline=$((SECONDS + 60))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        if ! kill -0 "${pids[-1]}" 2>/dev/null || [ "$SECONDS" -gt "$deadline" ]; then
            echo "run.sh: $name did not start; its log:" >&2
            cat "$dir/logs/$name.log" >&2
            exit 1
        fi
        sleep 0.2
    done
}

peer_args=()

port="$(free_port)"
start broadcaster "$port" env DATABASE_URL="$DATABASE_URL" "$dir/venv/bin/uvicorn" \
    --app-dir bench/peers/broadcaster app:app --host 127.0.0.1 --port "$port" \
    --log-level warning --no-access-log
peer_args+=(--peer "broadcaster=ws://127.0.0.1:$port/ws/$channel")

port="$(free_port)"
start postgraphile "$port" env DATABASE_URL="$DATABASE_URL" PORT="$port" NODE_ENV=production \
    node "$dir/postgraphile/server.js"
query="subscription { row(topic: \\\"$channel\\\") { id payload } }"
peer_args+=(
    --peer "postgraphile=ws://127.0.0.1:$port/graphql"
    --peer-protocol postgraphile=graphql-transport-ws
    --peer-send 'postgraphile={"type":"connection_init"}'
    --peer-send "postgraphile={\"id\":\"1\",\"type\":\"subscribe\",\"payload\":{\"query\":\"$query\"}}"
    --peer-id postgraphile=/payload/data/row/id
)

if [ -n "${PG_EVENTSERV:-}" ]; then
    port="$(free_port)"
    start pg_eventserv "$port" env DATABASE_URL="$DATABASE_URL" ES_HTTPHOST=127.0.0.1 \
        ES_HTTPPORT="$port" "$PG_EVENTSERV"
    peer_args+=(--peer "pg_eventserv=ws://127.0.0.1:$port/listen/$channel")
fi

{
    echo "pgrelay $(git rev-parse --short HEAD 2>/dev/null || echo '?') ($pgrelay)"
    psql "$DATABASE_URL" -Atqc 'select version()' 2>/dev/null || true
    echo "node $(node --version), postgraphile $(node -p "require('$dir/postgraphile/node_modules/postgraphile/package.json').version"), @graphile/pg-pubsub $(node -p "require('$dir/postgraphile/node_modules/@graphile/pg-pubsub/package.json').version"), graphql $(node -p "require('$dir/postgraphile/node_modules/graphql/package.json').version"), pg $(node -p "require('$dir/postgraphile/node_modules/pg/package.json').version")"
    echo "$("$dir/venv/bin/python" --version), $("$dir/venv/bin/python" -m pip freeze --disable-pip-version-check | grep -iE '^(broadcaster|fastapi|starlette|uvicorn|uvloop|websockets|asyncpg)==' | paste -sd ' ')"
    [ -n "${PG_EVENTSERV:-}" ] && echo "pg_eventserv: $PG_EVENTSERV"
    echo "bench: steady, $rate tx/s, $duration s, $writers writers, $subscribers subscriber(s) per system, capture $capture, $runs runs"
} | tee "$dir/versions.txt" >&2

# NAME=CPU-seconds (user + system, from /proc) of every peer process, space-separated.
peer_cpu() {
    local i
    for i in "${!pids[@]}"; do
        awk -v name="${names[$i]}" '{ sub(/.*\) /, ""); printf "%s=%.2f ", name, ($12 + $13) / 100 }' \
            "/proc/${pids[$i]}/stat"
    done
}

results="$dir/results.jsonl"
: >"$results"
for run in $(seq 1 "$runs"); do
    echo "run.sh: run $run of $runs" >&2
    before="$(peer_cpu)"
    report="$("$pgrelay" bench --scenario steady --rate "$rate" --duration "$duration" \
        --subscribers "$subscribers" --writers "$writers" --capture "$capture" --baseline \
        --json "${peer_args[@]}")"
    after="$(peer_cpu)"
    python3 - "$report" "$run" "$before" "$after" "$(cut -d' ' -f1 /proc/loadavg)" >>"$results" <<'PY'
import json, sys
report, run, before, after, load = sys.argv[1:]
report = json.loads(report)
cpu = lambda text: {k: float(v) for k, v in (pair.split("=") for pair in text.split())}
before, after = cpu(before), cpu(after)
report["run"] = int(run)
report["peer_cpu_secs"] = {name: round(after[name] - before[name], 2) for name in after}
report["load_average"] = float(load)
print(json.dumps(report))
PY
done

python3 bench/peers/summary.py "$results"
