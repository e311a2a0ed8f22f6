#!/usr/bin/env bash
# Regenerates every benchmark figure in BENCHMARKS.md: builds the release binary, then runs
# bench/run.py (direct / tokentap / tokentap without telemetry / nginx / a TCP relay that reads
# nothing, the floor; on 127.0.0.1 only).
# Needs nginx and wrk: apt-get install -y nginx-light wrk
# Options are passed on: --quick, --repeats N, --only latency,saturation,rps
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin tokentap --example relay
exec python3 bench/run.py "$@"
