#!/usr/bin/env bash
# Runs the fuzz targets with cargo-fuzz on the stable toolchain (RUSTC_BOOTSTRAP=1, no rustup).
#   fuzz/run.sh TARGET SECONDS [libFuzzer flags...]   one target
#   fuzz/run.sh all SECONDS [libFuzzer flags...]      each target in turn, SECONDS each
# New inputs go to fuzz/corpus-run/TARGET (not checked in), read together with the seeds in
# fuzz/corpus/TARGET; a failing input is written to fuzz/artifacts/TARGET/. See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")"
targets=(request chunked response_head sse json_scan usage_cut)
what=${1:?usage: fuzz/run.sh TARGET|all SECONDS [libFuzzer flags...]}
seconds=${2:?usage: fuzz/run.sh TARGET|all SECONDS [libFuzzer flags...]}
shift 2
export RUSTC_BOOTSTRAP=1
# No sanitizer: the crate forbids `unsafe`, and without ASan a target runs several times faster.
if [ "$what" = all ]; then
    cargo fuzz build --sanitizer none
else
    targets=("$what")
    cargo fuzz build --sanitizer none "$what"
fi
for target in "${targets[@]}"; do
    mkdir -p "corpus-run/$target"
    echo "fuzz: $target for ${seconds}s"
    cargo fuzz run --sanitizer none "$target" "corpus-run/$target" "corpus/$target" -- \
        -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 "$@"
done
