#!/usr/bin/env bash
# Write cost of pgrelay capture, measured as ratios within one run.
#
# Usage: bench/triggers.sh [DURATION_SECONDS]        (default 10)
#   DATABASE_URL  server to use (default postgres://postgres@127.0.0.1:5432/postgres); the
#                 database named in it is only used to create and drop the bench databases.
#   REPS          repetitions per variant and workload (default 3)
#   WORKLOADS     subset/order of: insert1 insert8 bulk1000 bulk200k update1
#                 (default: insert1 bulk1000 update1)
#   VARIANTS      subset/order of: a b c f (default: a b c f); ratios need a and b
#                 (the row-level variants d and e of earlier runs wrote the log's earlier
#                 layout; they are in git history with bench/capture_row.sql)
#   LOCK_TIMEOUT  if set (e.g. 1ms), the pgbench sessions run with that lock_timeout and each
#                 transaction is BEGIN; write; COMMIT: clients cancelled by a lock timeout are
#                 counted per variant and by where it struck (in the write, in pgrelay's
#                 trigger, at COMMIT) instead of failing the run.
#   SYNCHRONOUS_COMMIT  if set (e.g. off), used by the pgbench sessions; default: the server's.
#                 'off' takes the WAL flush out of every commit, so the CPU cost of capture
#                 is not buried under (noisy) fsync latency.
#
# Variants, each measured in its own freshly created database (dropped right after):
#   a  no trigger
#   b  bare row-level AFTER trigger: perform pg_notify('bench', row_to_json(new)::text)
#   c  pgrelay statement-level capture (sql/install.sql as it is, pgrelay.install)
#   f  pgrelay statement-level capture in poll mode (pgrelay.install(…, 'poll')): the log is
#      written the same way, no NOTIFY (no commit-time lock)
# Workloads:
#   insert1   single-row INSERT transactions       pgbench -n -c 4 -j 2 -T D
#   insert8   single-row INSERT transactions       pgbench -n -c 8 -j 2 -T D
#   bulk1000  INSERT ... SELECT generate_series     pgbench -n -c 1      -T D  (1,000 rows/stmt)
#   bulk200k  INSERT ... SELECT generate_series     pgbench -n -c 1      -t 2  (200,000 rows/stmt)
#   update1   single-row UPDATE by random id        pgbench -n -c 4 -j 2 -T D  (100,000-row table)
# Measurements are interleaved round robin (a,b,c,f,a,b,c,f,...) and the median TPS is reported.
# Nobody LISTENs. Progress goes to stderr; the markdown report goes to stdout.
set -euo pipefail

DURATION=${1:-10}
REPS=${REPS:-3}
WORKLOADS=${WORKLOADS:-"insert1 bulk1000 update1"}
VARIANTS=${VARIANTS:-"a b c f"}
URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
UPDATE_ROWS=100000

[[ $DURATION =~ ^[0-9]+$ && $DURATION -gt 0 ]] || { echo "usage: $0 [duration-seconds]" >&2; exit 2; }
[[ $REPS =~ ^[0-9]+$ && $REPS -gt 0 ]] || { echo "REPS must be a positive integer" >&2; exit 2; }
for w in $WORKLOADS; do
    case $w in insert1|insert8|bulk1000|bulk200k|update1) ;; *) echo "unknown workload: $w" >&2; exit 2 ;; esac
done
for v in $VARIANTS; do
    case $v in a|b|c|f) ;; *) echo "unknown variant: $v" >&2; exit 2 ;; esac
done
[[ " $VARIANTS " == *" a "* && " $VARIANTS " == *" b "* ]] || { echo "VARIANTS must include a and b" >&2; exit 2; }

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INSTALL_SQL=$HERE/../sql/install.sql
[[ -r $INSTALL_SQL ]] || { echo "missing $INSTALL_SQL" >&2; exit 1; }

# postgres://user@host:port/dbname?params  ->  base, query; url_for DB swaps the database name.
if [[ $URL =~ ^(postgres(ql)?://[^/?]*)(/[^?]*)?(\?.*)?$ ]]; then
    URL_BASE=${BASH_REMATCH[1]}
    URL_QUERY=${BASH_REMATCH[4]}
else
    echo "DATABASE_URL must be a postgres:// URL" >&2; exit 2
fi
url_for() { printf '%s/%s%s' "$URL_BASE" "$1" "$URL_QUERY"; }

export PGOPTIONS='-c client_min_messages=warning'
BENCH_PGOPTIONS=$PGOPTIONS
if [[ -n ${SYNCHRONOUS_COMMIT:-} ]]; then
    [[ $SYNCHRONOUS_COMMIT =~ ^[a-z_]+$ ]] || { echo "bad SYNCHRONOUS_COMMIT" >&2; exit 2; }
    BENCH_PGOPTIONS="$PGOPTIONS -c synchronous_commit=$SYNCHRONOUS_COMMIT"
fi
if [[ -n ${LOCK_TIMEOUT:-} ]]; then
    [[ $LOCK_TIMEOUT =~ ^[0-9]+(ms|s)?$ ]] || { echo "bad LOCK_TIMEOUT" >&2; exit 2; }
    BENCH_PGOPTIONS="$BENCH_PGOPTIONS -c lock_timeout=$LOCK_TIMEOUT"
fi
psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -At -d "$URL" "$@"; }
psql_db() { local db=$1; shift; psql -X -q -v ON_ERROR_STOP=1 -At -d "$(url_for "$db")" "$@"; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT   # replaced by cleanup below
# Snapshot the SQL once, so that every measurement of a run uses the same capture code even if
# the files are edited while it runs.
cp "$INSTALL_SQL" "$TMP/install.sql"
INSTALL_SQL=$TMP/install.sql
SQL_SUMS="sql/install.sql md5 $(md5sum <"$INSTALL_SQL" | cut -c1-12)"
PREFIX="pgrelay_bench_$$_$(date +%s)"
CREATED=()   # databases this run created and may still have to drop

cleanup() {
    local db
    for db in "${CREATED[@]}"; do
        psql_admin -c "drop database if exists \"$db\" with (force)" >/dev/null 2>&1 || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- pgbench scripts --------------------------------------------------------------------------
cat >"$TMP/insert1.sql" <<'EOF'
\set p random(1, 100000)
insert into bench_items (name, price) values ('item-' || :p, :p / 10.0);
EOF
cp "$TMP/insert1.sql" "$TMP/insert8.sql"
cat >"$TMP/bulk1000.sql" <<'EOF'
insert into bench_items (name, price) select 'item-' || g, g / 10.0 from generate_series(1, 1000) as g;
EOF
cat >"$TMP/bulk200k.sql" <<'EOF'
insert into bench_items (name, price) select 'item-' || g, g / 10.0 from generate_series(1, 200000) as g;
EOF
cat >"$TMP/update1.sql" <<EOF
\set id random(1, $UPDATE_ROWS)
update bench_items set price = price + 1 where id = :id;
EOF

if [[ -n ${LOCK_TIMEOUT:-} ]]; then
    # Explicit transactions: a cancel at COMMIT is then told apart from one in the write
    # (pgbench numbers the script's commands from 0: \set, begin, the write, commit).
    for w in insert1 insert8 bulk1000 bulk200k update1; do
        awk '/^\\/ {print; next} {print "begin;"; print; print "commit;"}' "$TMP/$w.sql" >"$TMP/$w.tx"
        mv "$TMP/$w.tx" "$TMP/$w.sql"
    done
fi

rows_per_tx() { case $1 in bulk1000) echo 1000 ;; bulk200k) echo 200000 ;; *) echo 1 ;; esac; }
pgbench_opts() {
    case $1 in
        bulk1000) echo "-n -c 1 -T $DURATION" ;;
        bulk200k) echo "-n -c 1 -t 2" ;;
        insert8) echo "-n -c 8 -j 2 -T $DURATION" ;;
        *) echo "-n -c 4 -j 2 -T $DURATION" ;;
    esac
}
variant_name() {
    case $1 in
        a) echo "(a) no trigger" ;;
        b) echo "(b) bare row-level pg_notify" ;;
        c) echo "(c) pgrelay statement-level" ;;
        f) echo "(f) pgrelay statement-level, poll mode" ;;
    esac
}
workload_name() {
    case $1 in
        insert1) echo "single-row INSERT (-c 4 -j 2)" ;;
        insert8) echo "single-row INSERT (-c 8 -j 2)" ;;
        bulk1000) echo "1,000-row INSERT ... SELECT (-c 1)" ;;
        bulk200k) echo "200,000-row INSERT ... SELECT (-c 1 -t 2)" ;;
        update1) echo "single-row UPDATE (-c 4 -j 2)" ;;
    esac
}

# Creates DB with bench_items (filled for update1) and installs variant V.
setup_db() {
    local db=$1 workload=$2 v=$3
    psql_admin -c "create database \"$db\" template template0"
    CREATED+=("$db")
    psql_db "$db" -c "create table bench_items (id bigserial primary key, name text, price numeric,
                                                created timestamptz default now())"
    if [[ $workload == update1 ]]; then
        psql_db "$db" -c "insert into bench_items (name, price)
                          select 'item-' || g, g / 10.0 from generate_series(1, $UPDATE_ROWS) as g" \
                      -c "vacuum analyze bench_items"
    fi
    case $v in
        a) ;;
        b) psql_db "$db" <<'EOF'
create function bench_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('bench', row_to_json(new)::text);
    return null;
end
$$;
create trigger bench_notify after insert or update on bench_items
    for each row execute function bench_notify();
EOF
        ;;
        c) psql_db "$db" -f "$INSTALL_SQL" -c "select pgrelay.install('public', 'bench_items')" >/dev/null ;;
        f) psql_db "$db" -f "$INSTALL_SQL" -c "select pgrelay.install('public', 'bench_items', 'poll')" >/dev/null ;;
    esac
}

drop_db() {
    local db=$1 i
    psql_admin -c "drop database if exists \"$db\" with (force)"
    for i in "${!CREATED[@]}"; do [[ ${CREATED[$i]} == "$db" ]] && unset 'CREATED[i]'; done
    CREATED=("${CREATED[@]}")
}

declare -A TPS   # TPS[workload,variant] = "run1 run2 run3"
declare -A ABORTS  # ABORTS[workload,variant,where] = clients cancelled, all runs together
declare -A CLIENTS # CLIENTS[workload,variant] = clients started, all runs together

# Counts the clients a lock timeout cancelled in pgbench output $3, by where it struck: the
# script's last command is COMMIT; an error in the write whose context names a pgrelay
# function struck inside pgrelay's trigger, any other one the table's own locks.
count_aborts() {
    local workload=$1 v=$2 out=$3 commit clients where line context
    commit=$(( $(grep -c . "$TMP/$workload.sql") - 1 ))
    clients=$(sed -n 's/^number of clients: \([0-9]*\).*/\1/p' <<<"$out")
    CLIENTS[$workload,$v]=$(( ${CLIENTS[$workload,$v]:-0} + clients ))
    while IFS= read -r line; do
        [[ $line =~ aborted\ in\ command\ ([0-9]+) ]] || continue
        if (( BASH_REMATCH[1] == commit )); then
            where=commit
        else
            # The lines after the error up to the next client's, for its CONTEXT.
            context=$(awk -v l="$line" 'f && /client [0-9]+ /{exit} f{print} $0==l{f=1}' <<<"$out")
            if grep -q 'pgrelay\.' <<<"$line$context"; then where=trigger; else where=write; fi
        fi
        ABORTS[$workload,$v,$where]=$(( ${ABORTS[$workload,$v,$where]:-0} + 1 ))
    done <<<"$out"
}
WARNINGS=()

run_one() {
    local workload=$1 v=$2 rep=$3 db out tps txs expect got
    db="${PREFIX}_${workload}_${v}_${rep}"
    setup_db "$db" "$workload" "$v"
    psql_admin -c checkpoint 2>/dev/null || true   # start every run from the same WAL state
    # shellcheck disable=SC2046
    local status=0
    out=$(PGOPTIONS=$BENCH_PGOPTIONS pgbench $(pgbench_opts "$workload") -f "$TMP/$workload.sql" "$(url_for "$db")" 2>&1) || status=$?
    # pgbench exits 2 when clients were aborted: expected (and counted) under LOCK_TIMEOUT.
    if (( status != 0 )) && ! [[ -n ${LOCK_TIMEOUT:-} && $status == 2 ]]; then
        echo "$out" >&2; echo "pgbench failed: $workload $v rep $rep" >&2; exit 1
    fi
    if [[ -n ${LOCK_TIMEOUT:-} ]]; then
        count_aborts "$workload" "$v" "$out"
    fi
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' <<<"$out" | tail -1)
    txs=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' <<<"$out")
    if [[ -z $tps || -z $txs ]]; then echo "$out" >&2; echo "cannot parse pgbench output" >&2; exit 1; fi
    if grep -q '^number of failed transactions: [1-9]' <<<"$out"; then
        WARNINGS+=("$workload $v rep $rep: $(grep '^number of failed' <<<"$out")")
    fi
    # Sanity: the capture variants must have logged exactly one change per written row.
    if [[ $v == c || $v == f ]]; then
        expect=$(( txs * $(rows_per_tx "$workload") ))
        got=$(psql_db "$db" -c "select coalesce(sum(n), 0) from pgrelay.changes")
        [[ $got == "$expect" ]] || WARNINGS+=("$workload $v rep $rep: pgrelay.changes has $got rows, expected $expect")
    fi
    drop_db "$db"
    TPS[$workload,$v]="${TPS[$workload,$v]:-}${TPS[$workload,$v]:+ }$tps"
    printf '  %-9s %s rep %d: %10.1f tps\n' "$workload" "$v" "$rep" "$tps" >&2
}

median() { tr ' ' '\n' <<<"$1" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# --- run ----------------------------------------------------------------------------------------
psql_admin -c "select 1" >/dev/null
START=$(date +%s)
echo "pgrelay trigger bench: duration ${DURATION}s, $REPS reps, workloads: $WORKLOADS" >&2
for workload in $WORKLOADS; do
    echo "$(workload_name "$workload")" >&2
    for rep in $(seq 1 "$REPS"); do
        for v in $VARIANTS; do
            run_one "$workload" "$v" "$rep"
        done
    done
done
ELAPSED=$(( $(date +%s) - START ))

# --- report -------------------------------------------------------------------------------------
PGVER=$(psql_admin -c "show server_version")
SETTINGS=$(psql_admin -c "select string_agg(name || '=' || current_setting(name), ', ' order by name)
                          from pg_settings where name in ('shared_buffers', 'synchronous_commit',
                          'fsync', 'full_page_writes', 'wal_level', 'max_wal_size')")

echo "### Capture trigger write cost ($(date -u +%Y-%m-%d))"
echo
echo "PostgreSQL $PGVER, $(nproc) CPUs, $SETTINGS."
echo "$SQL_SUMS."
CMD="bench/triggers.sh $DURATION"
[[ $VARIANTS == "a b c f" ]] || CMD="VARIANTS=\"$VARIANTS\" $CMD"
[[ $WORKLOADS == "insert1 bulk1000 update1" ]] || CMD="WORKLOADS=\"$WORKLOADS\" $CMD"
[[ $REPS == 3 ]] || CMD="REPS=$REPS $CMD"
[[ -z ${LOCK_TIMEOUT:-} ]] || CMD="LOCK_TIMEOUT=$LOCK_TIMEOUT $CMD"
if [[ -n ${SYNCHRONOUS_COMMIT:-} ]]; then
    CMD="SYNCHRONOUS_COMMIT=$SYNCHRONOUS_COMMIT $CMD"
    echo "pgbench sessions ran with synchronous_commit=$SYNCHRONOUS_COMMIT."
fi
echo "\`$CMD\`: ${DURATION}s per pgbench run, median of $REPS interleaved runs"
echo "(variants round robin: ${VARIANTS// /,},...; fresh database per run, checkpoint before each run, no LISTENer); total ${ELAPSED}s."
echo
echo "| workload | variant | median TPS | rows/s | vs (a) no trigger | vs (b) bare notify | runs (TPS) |"
echo "|---|---|---:|---:|---:|---:|---|"
for workload in $WORKLOADS; do
    ta=$(median "${TPS[$workload,a]}")
    tb=$(median "${TPS[$workload,b]}")
    for v in $VARIANTS; do
        t=$(median "${TPS[$workload,$v]}")
        runs=$(tr ' ' '\n' <<<"${TPS[$workload,$v]}" | awk '{printf ($1 < 10 ? "%s%.3f" : "%s%.0f"), (NR>1?", ":""), $1}')
        awk -v w="$(workload_name "$workload")" -v n="$(variant_name "$v")" -v t="$t" -v ta="$ta" -v tb="$tb" \
            -v r="$(rows_per_tx "$workload")" -v runs="$runs" \
            'BEGIN { f = (t < 10 ? "%.3f" : "%.0f"); printf "| %s | %s | " f " | %.0f | %.2f× | %.2f× | %s |\n", w, n, t, t*r, t/ta, t/tb, runs }'
    done
done
if [[ -n ${LOCK_TIMEOUT:-} ]]; then
    echo
    echo "Clients cancelled by lock_timeout=$LOCK_TIMEOUT (all runs together; a cancelled client stops):"
    echo
    echo "| workload | variant | clients | cancelled at COMMIT | in pgrelay's trigger | in the write (the table's own locks) |"
    echo "|---|---|---:|---:|---:|---:|"
    for workload in $WORKLOADS; do
        for v in $VARIANTS; do
            echo "| $(workload_name "$workload") | $(variant_name "$v") | ${CLIENTS[$workload,$v]:-0} | ${ABORTS[$workload,$v,commit]:-0} | ${ABORTS[$workload,$v,trigger]:-0} | ${ABORTS[$workload,$v,write]:-0} |"
        done
    done
fi
if (( ${#WARNINGS[@]} )); then
    echo
    echo "Warnings:"
    for w in "${WARNINGS[@]}"; do echo "- $w"; done
fi
