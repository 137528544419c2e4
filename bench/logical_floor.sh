#!/usr/bin/env bash
# What logical decoding alone costs writers: the floor under any capture that reads WAL
# instead of running a trigger (issue 11's poll-mode target asks for >= 0.75x the throughput
# of a table without capture).
#
# Starts a throwaway cluster with wal_level = logical (initdb from the local binaries, as the
# postgres user when run as root), then runs pgbench single-row INSERTs (8 clients, as
# `pgrelay bench --scenario writes`) on a plain table, interleaved, in three variants:
#   none      no replication slot
#   walsender a pgoutput slot streamed by pg_recvlogical to a file (the walsender decodes
#             continuously: what Debezium or Supabase Realtime's WAL readers cost)
#   sql       the same slot read by pg_logical_slot_get_binary_changes in a loop (what a relay
#             that polls the slot over an ordinary connection would cost)
# Nothing of pgrelay runs: this is the decoding alone, with no relay work on top.
#
# Usage: bench/logical_floor.sh [seconds per run] [runs]
set -euo pipefail
secs="${1:-8}"
runs="${2:-2}"

bindir="$(pg_config --bindir 2>/dev/null || ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)"
dir="$(mktemp -d /tmp/pgrelay-logical.XXXXXX)"
port=$(( 20000 + RANDOM % 20000 ))
as_owner=()
if [ "$(id -u)" = 0 ]; then
    chown postgres "$dir"
    as_owner=(runuser -u postgres --)
fi
"${as_owner[@]}" "$bindir/initdb" -D "$dir/data" -U postgres -A trust >/dev/null
"${as_owner[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c wal_level=logical" start >/dev/null
cleanup() {
    "${as_owner[@]}" "$bindir/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT

conn=(-h 127.0.0.1 -p "$port" -U postgres)
psql "${conn[@]}" -qc "create database floor"
psql "${conn[@]}" -d floor -q <<'SQL'
create table t (id bigserial primary key, payload text);
create publication p for table t;
SQL
echo "insert into t (payload) values (repeat('x', 64));" >"$dir/insert.sql"
echo "select count(*) from pg_logical_slot_get_binary_changes('s', null, 10000, 'proto_version', '1', 'publication_names', 'p');" >"$dir/consume.sql"

drop_slot() { psql "${conn[@]}" -d floor -qAtc "select pg_drop_replication_slot('s') from pg_replication_slots where slot_name = 's'" >/dev/null; }
new_slot() { drop_slot; psql "${conn[@]}" -d floor -qAtc "select pg_create_logical_replication_slot('s', 'pgoutput')" >/dev/null; }
writers() {
    psql "${conn[@]}" -d floor -qc checkpoint
    pgbench "${conn[@]}" -n -c 8 -j 2 -T "$secs" -f "$dir/insert.sql" floor 2>/dev/null \
        | awk '/^tps/ { printf "%.0f", $3 }'
}

declare -A sum
for variant in none walsender sql; do sum[$variant]=0; done
for run in $(seq "$runs"); do
    drop_slot
    none=$(writers)
    new_slot
    pg_recvlogical "${conn[@]}" -d floor --slot s --start -o proto_version=1 \
        -o publication_names=p -f /dev/null &
    recv=$!
    walsender=$(writers)
    kill "$recv"; wait "$recv" 2>/dev/null || true
    new_slot
    pgbench "${conn[@]}" -n -c 1 -T $(( secs + 1 )) -f "$dir/consume.sql" floor >/dev/null 2>&1 &
    consumer=$!
    sql=$(writers)
    wait "$consumer" || true
    echo "run $run: none $none tps, walsender $walsender tps, sql $sql tps"
    sum[none]=$(( ${sum[none]} + none ))
    sum[walsender]=$(( ${sum[walsender]} + walsender ))
    sum[sql]=$(( ${sum[sql]} + sql ))
done
drop_slot
awk -v n="${sum[none]}" -v w="${sum[walsender]}" -v s="${sum[sql]}" 'BEGIN {
    printf "walsender decoding: %.2fx the throughput without a slot; SQL-function decoding: %.2fx\n", w / n, s / n }'
