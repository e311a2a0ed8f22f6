#!/usr/bin/env bash
# Profiles tokentap (full telemetry) at 1,000 streams, 100 ms ITL, with perf (cpu-clock).
# Output: bench/results/profile.txt. Everything on 127.0.0.1; all started processes are stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
d=$(mktemp -d)
B=target/release/tokentap
. bench/configs.sh
sim_config "$d/sim.toml" 100.0 true
proxy_config "$d/tt.toml"
TOKENTAP_LOG=warn taskset -c 0 $B simulate --config "$d/sim.toml" --listen 127.0.0.1:18000 2>/dev/null & sim=$!
TOKENTAP_LOG=warn taskset -c 1 $B serve --config "$d/tt.toml" 2>/dev/null & tt=$!
trap 'kill $sim $tt 2>/dev/null || true; rm -rf "$d"' EXIT
sleep 1
taskset -c 0 $B bench --base-url http://127.0.0.1:18080 --model "$MODEL" \
  --num-prompts 3000 --max-concurrency 1000 --request-rate 1000 --random-input-len 16 \
  --random-output-len 60 --ignore-eos --disable-tqdm > /dev/null &
bench=$!
sleep 2
perf record -e cpu-clock -g -p $tt -o "$d/perf.data" -- sleep 5 2>/dev/null
wait $bench
mkdir -p bench/results
perf report -i "$d/perf.data" --no-children --percent-limit 0.7 --stdio -g none 2>/dev/null \
  | grep -E '^ +[0-9]' > bench/results/profile.txt
perf report -i "$d/perf.data" --children --percent-limit 3 --stdio -g none 2>/dev/null \
  | grep -E '^ +[0-9]' > bench/results/profile-children.txt
echo "written bench/results/profile.txt and profile-children.txt"
