#!/usr/bin/env bash
# Regenerates every benchmark figure in BENCHMARKS.md: builds the release binary, then runs
# bench/run.py (direct / tokentap / tokentap without telemetry / nginx / a TCP relay that reads
# nothing, the floor; on 127.0.0.1 only).
# Needs nginx and wrk: apt-get install -y nginx-light wrk
# Options are passed on: --quick, --repeats N, --only latency,saturation,rps, --streams,
# --targets; --pgo also builds tokentap with profile-guided optimization (bench/pgo.sh, needs
# llvm-profdata) and runs it as a sixth target, tokentap-pgo.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin tokentap --example relay
for a in "$@"; do
  [ "$a" = --pgo ] && bash bench/pgo.sh
done
exec python3 bench/run.py "$@"
