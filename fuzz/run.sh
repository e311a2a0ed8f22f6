#!/usr/bin/env bash
# Builds and runs the fuzz targets on the stable toolchain (RUSTC_BOOTSTRAP=1, no rustup, no
# cargo-fuzz needed: the build passes libFuzzer's instrumentation flags itself, the same ones
# `cargo fuzz build --sanitizer none` would).
#   fuzz/run.sh TARGET SECONDS [libFuzzer flags...]   one target
#   fuzz/run.sh all SECONDS [libFuzzer flags...]      each target in turn, SECONDS each
#   fuzz/run.sh build                                 build every target, run none
# New inputs go to fuzz/corpus-run/TARGET (not checked in), read together with the seeds in
# fuzz/corpus/TARGET; a failing input is written to fuzz/artifacts/TARGET/. See docs/fuzzing.md.
# FUZZ_CODEGEN_UNITS (default 1, as cargo-fuzz: faster targets) may be raised, and FUZZ_OPT_LEVEL
# (default 3) lowered, for a quicker build when the run is short, as in CI.
set -euo pipefail
cd "$(dirname "$0")"
targets=(request chunked response_head sse json_scan usage_cut responses messages accept)
what=${1:?usage: fuzz/run.sh TARGET|all SECONDS [libFuzzer flags...] | fuzz/run.sh build}
triple=$(rustc -vV | sed -n 's/^host: //p')
flags=(
    -Cpasses=sancov-module
    -Cllvm-args=-sanitizer-coverage-level=4
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
    -Cllvm-args=-sanitizer-coverage-pc-table
    -Cllvm-args=-sanitizer-coverage-trace-compares
    -Cllvm-args=-sanitizer-coverage-stack-depth
    -Cllvm-args=-simplifycfg-branch-fold-threshold=0
    --cfg fuzzing
    -Cdebug-assertions
    -Ccodegen-units="${FUZZ_CODEGEN_UNITS:-1}"
)
# No sanitizer: the crate forbids `unsafe`, and without ASan a target runs several times faster.
# `--target` keeps the flags off build scripts.
RUSTC_BOOTSTRAP=1 RUSTFLAGS="${flags[*]}" cargo build --quiet --release --target "$triple" \
    --config 'profile.release.debug="line-tables-only"' \
    --config "profile.release.opt-level=${FUZZ_OPT_LEVEL:-3}" --bins
[ "$what" = build ] && exit 0
seconds=${2:?usage: fuzz/run.sh TARGET|all SECONDS [libFuzzer flags...]}
shift 2
[ "$what" = all ] || targets=("$what")
for target in "${targets[@]}"; do
    mkdir -p "corpus-run/$target" "artifacts/$target"
    echo "fuzz: $target for ${seconds}s"
    "target/$triple/release/$target" "corpus-run/$target" "corpus/$target" \
        -artifact_prefix="artifacts/$target/" -max_total_time="$seconds" -max_len=65536 \
        -rss_limit_mb=2048 -print_final_stats=1 "$@"
done
