#!/usr/bin/env bash
# What a row policy costs delivery: `pgrelay bench` with and without bench/policy.toml, runs
# interleaved (none, policy, none, policy, ...) so the machine's noise hits both alike; the
# ratio is computed per pair and its median reported.
#
# Usage: bench/policy.sh [RUNS]     (default 3)
#   SCENARIO     bench scenario (default fanout); SUBSCRIBERS (default 100); DURATION (default 10)
#   PGRELAY      the binary (default target/release/pgrelay)
#   DATABASE_URL as for `pgrelay bench`
set -euo pipefail
RUNS=${1:-3}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PGRELAY=${PGRELAY:-$HERE/../target/release/pgrelay}
SCENARIO=${SCENARIO:-fanout}
SUBSCRIBERS=${SUBSCRIBERS:-100}
DURATION=${DURATION:-10}
[[ -x $PGRELAY ]] || { echo "build first: cargo build --release" >&2; exit 1; }

run() {
    "$PGRELAY" bench --scenario "$SCENARIO" --subscribers "$SUBSCRIBERS" --duration "$DURATION" --json
}
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }

echo "| run | without policy (frames/s) | with policy (frames/s) | ratio | lost (without / with) | relay CPU s (without / with) |"
echo "|---|---:|---:|---:|---|---|"
ratios=()
for i in $(seq 1 "$RUNS"); do
    plain=$(env -u PGRELAY_CONFIG bash -c "$(declare -f run); PGRELAY='$PGRELAY' SCENARIO='$SCENARIO' SUBSCRIBERS='$SUBSCRIBERS' DURATION='$DURATION' run")
    policy=$(PGRELAY_CONFIG=$HERE/policy.toml bash -c "$(declare -f run); PGRELAY='$PGRELAY' SCENARIO='$SCENARIO' SUBSCRIBERS='$SUBSCRIBERS' DURATION='$DURATION' run")
    a=$(field frames_per_sec <<<"$plain"); b=$(field frames_per_sec <<<"$policy")
    r=$(python3 -c "print(f'{$b/$a:.2f}')")
    ratios+=("$r")
    echo "| $i | $(printf %.0f "$a") | $(printf %.0f "$b") | ${r}× | $(field lost <<<"$plain") / $(field lost <<<"$policy") | $(field relay_cpu_secs <<<"$plain") / $(field relay_cpu_secs <<<"$policy") |"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')
echo
echo "median ratio (with / without policy): ${median}×"
