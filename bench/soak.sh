#!/usr/bin/env bash
# The soak: one run (default an hour) of mixed traffic through a release `tokentap serve` in
# front of `tokentap simulate` with faults on, with attackers in the background; checks that
# RSS does not grow, fds come back, and no request is lost or altered (bench/soak.py says how).
# Options are passed on: --seconds N (default 3600), --clients N, --out DIR.
# Results: bench/results/soak-<UTC time>/ (soak.json, summary.txt, samples.csv);
# bench/results/soak-latest -> it. Runs at nice 5 and uses well under one core.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin tokentap
exec nice -n 5 python3 bench/soak.py "$@"
