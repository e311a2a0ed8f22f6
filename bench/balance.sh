#!/usr/bin/env bash
# Balancing policies compared on one route of three simulated replicas: two healthy ones and a
# slow one (4x the inter-token time, 4 sequences at once, so that work sent to it queues), under
# the same open-loop load (Poisson arrivals, same seed) for each of round_robin, least_request
# and peak_ewma. Prints, per policy, the client's p50/p99 TTFT and E2EL (from `tokentap bench`'s
# saved result) and the share of requests each replica got (from the proxy's
# tokentap_upstream_requests_total).
#
# Usage: bench/balance.sh [--rate R] [--prompts N] [--tokens T]   (defaults 6, 240, 32)
# BIN=/other/build/tokentap runs another build (default: target/release/tokentap, built here).
# Everything on 127.0.0.1; every process it starts is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
rate=6 prompts=240 tokens=32
while [ $# -gt 0 ]; do
  case $1 in
    --rate) rate=$2; shift 2 ;;
    --prompts) prompts=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet --bin tokentap
  BIN=target/release/tokentap
fi
MODEL=Qwen/Qwen2.5-7B-Instruct
d=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$d"' EXIT

# sim FILE ITL_MS MAX_NUM_SEQS: the simulator's default timing model (TTFT 25 ms + prefill,
# 10 % jitter, +0.2 % per running sequence) with the given decode step and batch size.
sim() {
  cat > "$1" <<T
seed = 7
models = ["$MODEL"]
[timing]
itl_ms = $2
max_num_seqs = $3
T
}
sim "$d/fast.toml" 20.0 256
sim "$d/slow.toml" 80.0 4
ports=(18101 18102 18103)
for i in 0 1 2; do
  cfg=$d/fast.toml
  [ $i = 2 ] && cfg=$d/slow.toml
  TOKENTAP_LOG=warn $BIN simulate --config "$cfg" --listen 127.0.0.1:${ports[$i]} 2>/dev/null &
  pids+=($!)
done

wait_port() {
  for _ in $(seq 100); do
    (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  exit 1
}
for p in "${ports[@]}"; do wait_port "$p"; done

printf '%-14s %9s %9s %9s %9s %8s  %s\n' policy 'TTFT p50' 'TTFT p99' 'E2EL p50' 'E2EL p99' failed \
  'share fast/fast/slow'
for policy in round_robin least_request peak_ewma; do
  cat > "$d/tt.toml" <<T
listen = "127.0.0.1:18180"
admin_listen = "127.0.0.1:19564"
[[routes]]
models = ["*"]
upstreams = ["http://127.0.0.1:${ports[0]}", "http://127.0.0.1:${ports[1]}", "http://127.0.0.1:${ports[2]}"]
balance = "$policy"
T
  TOKENTAP_LOG=warn $BIN serve --config "$d/tt.toml" 2>/dev/null &
  proxy=$!
  pids+=($proxy)
  wait_port 18180
  $BIN bench --base-url http://127.0.0.1:18180 --model "$MODEL" --num-prompts "$prompts" \
    --request-rate "$rate" --seed 1 --random-input-len 256 --random-output-len "$tokens" \
    --ignore-eos --percentile-metrics ttft,e2el --metric-percentiles 50,99 --disable-tqdm \
    --save-result --result-filename "$d/$policy.json" > "$d/$policy.txt"
  curl -s http://127.0.0.1:19564/metrics > "$d/$policy.prom"
  kill "$proxy"
  wait "$proxy" 2>/dev/null || true
  python3 - "$d/$policy.json" "$d/$policy.prom" "$policy" "${ports[@]}" <<'P'
import json, re, sys
res, prom, policy, ports = json.load(open(sys.argv[1])), open(sys.argv[2]).read(), sys.argv[3], sys.argv[4:]
sent = {}
for m in re.finditer(r'^tokentap_upstream_requests_total\{upstream="([^"]+)"\} (\S+)$', prom, re.M):
    sent[m.group(1)] = float(m.group(2))
total = sum(sent.values()) or 1
share = "/".join(f"{100 * sent.get(f'http://127.0.0.1:{p}', 0) / total:.0f}%" for p in ports)
print(f"{policy:<14} {res['median_ttft_ms']:9.1f} {res['p99_ttft_ms']:9.1f} "
      f"{res['median_e2el_ms']:9.1f} {res['p99_e2el_ms']:9.1f} {res['failed']:8d}  {share}")
P
done
echo "(ms; $prompts requests of $tokens tokens at $rate/s, Poisson, seed 1)"
