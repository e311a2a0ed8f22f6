#!/usr/bin/env bash
# Builds tokentap with profile-guided optimization into target/pgo/release/tokentap.
#
# A build instrumented to count its branches and calls forwards the benchmark's traffic (streamed
# chat and text completions with full telemetry at 100 and 1,000 streams, non-streaming requests,
# scrapes of /metrics and /stats); llvm-profdata merges the counts, and a second build inlines
# and lays out the code by them, the hot per-chunk path together and the rest out of its way.
# The simulator and the load client are the plain release build, so only the proxy is profiled.
#
# Needs llvm-profdata of the LLVM that rustc uses (`rustc -vV`; Debian: apt-get install -y
# llvm-22 for LLVM 22), and wrk for the non-streaming requests (skipped without it).
# Usage: bench/pgo.sh. bench/run.sh --pgo runs it, then measures its build as the target
# tokentap-pgo beside the default build.
# Everything on 127.0.0.1; every process it starts is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
llvm=$(rustc -vV | awk '/^LLVM version/ {split($3, v, "."); print v[1]}')
profdata=$(command -v "llvm-profdata-$llvm" || true)
if [ -z "$profdata" ]; then
  echo "llvm-profdata-$llvm is missing (rustc uses LLVM $llvm): apt-get install -y llvm-$llvm" >&2
  exit 1
fi

cargo build --release --quiet --bin tokentap
B=target/release/tokentap
data=$PWD/target/pgo-data
rm -rf "$data"
mkdir -p "$data"
echo "pgo: instrumented build (target/pgo-gen)"
CARGO_TARGET_DIR=target/pgo-gen RUSTFLAGS="-Cprofile-generate=$data" \
  cargo build --release --quiet --bin tokentap

d=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$d"' EXIT
. bench/configs.sh
sim_config "$d/sim.toml" 20
proxy_config "$d/tt.toml" true

TOKENTAP_LOG=warn taskset -c 0 $B simulate --config "$d/sim.toml" --listen 127.0.0.1:18000 \
  2>/dev/null &
pids+=($!)
# Only the proxy's counts: the build's instrumented build scripts and proc macros write theirs
# to $data too, under the default name.
LLVM_PROFILE_FILE="$data/proxy-%p.profraw" TOKENTAP_LOG=warn taskset -c 1 \
  target/pgo-gen/release/tokentap serve --config "$d/tt.toml" 2>/dev/null &
proxy=$!
pids+=($proxy)
wait_port 18000
wait_port 18080

# load ENDPOINT REQUESTS STREAMS TOKENS: streamed requests through the proxy.
load() {
  taskset -c 0 $B bench --base-url http://127.0.0.1:18080 --endpoint "$1" --model "$MODEL" \
    --num-prompts "$2" --max-concurrency "$3" --random-input-len 16 --random-output-len "$4" \
    --ignore-eos --disable-tqdm > /dev/null
}
echo "pgo: training run"
load /v1/chat/completions 400 100 100
load /v1/completions 200 100 100
load /v1/chat/completions 3000 1000 40
if command -v wrk > /dev/null; then
  post_lua "$d/post.lua"
  taskset -c 0 wrk -t1 -c64 -d5s -s "$d/post.lua" http://127.0.0.1:18080/v1/chat/completions \
    > /dev/null
else
  echo "pgo: wrk is missing, no non-streaming requests in the profile" >&2
fi
for _ in $(seq 1 20); do
  curl -s -o /dev/null http://127.0.0.1:19464/metrics
  curl -s -o /dev/null http://127.0.0.1:19464/stats
done
# The counts are written when the proxy exits.
kill -TERM $proxy
wait $proxy || true
ls "$data"/proxy-*.profraw > /dev/null

"$profdata" merge -o "$data/merged.profdata" "$data"/proxy-*.profraw
echo "pgo: optimized build (target/pgo)"
CARGO_TARGET_DIR=target/pgo RUSTFLAGS="-Cprofile-use=$data/merged.profdata" \
  cargo build --release --quiet --bin tokentap
echo "pgo: built target/pgo/release/tokentap"
