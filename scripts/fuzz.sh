#!/usr/bin/env bash
# Runs the cargo-fuzz targets (all of them, or those named) for FUZZ_SECONDS each (default
# 180), on the stable toolchain without a sanitizer. Seeds come from fuzz/corpus/<target>/
# (committed, read only here); inputs the run finds go to fuzz/target/corpus/<target>/ (not
# committed), crashes to fuzz/artifacts/<target>/. Needs `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-180}
if [ $# -eq 0 ]; then
  set -- client_message filter log_body rest_request ws_handshake
fi
for target in "$@"; do
  mkdir -p "fuzz/target/corpus/$target"
  cargo fuzz run --sanitizer none "$target" "fuzz/target/corpus/$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -max_len=4096 -timeout=10 -print_final_stats=1
done
