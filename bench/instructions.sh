#!/usr/bin/env bash
# User-space instructions the proxy executes per forwarded chunk, counted by callgrind.
#
# CPU seconds on a shared machine move by 10-20 % between runs; instruction counts do not, so
# this is the figure to compare two builds by. Kernel work (the syscalls) is not counted.
# The proxy runs under valgrind twice, for N and 2N requests of the same shape; the difference
# divided by the extra chunks is the cost of one chunk, start-up and idle work cancelled out.
#
# Usage: bench/instructions.sh [tokentap|tokentap-notel|nginx|relay] [--streams S] [--tokens T]
#        [--itl MS] (simulator inter-token time, default 50; 0 sends chunks back to back)
#        [--cache] (also simulate the caches: misses per chunk, first level and last level)
#        [--cold] (--cache with a 512 KiB last level, smaller than the state of a few hundred
#        streams: its misses per chunk count the cache lines a chunk touches that a stream's
#        previous chunk left behind, which at 1,000 streams are fetched from farther away)
#        [--plain] (per non-streaming request instead: the benchmark's 16-token chat completion
#        sent by wrk on 8 connections for $SECS seconds (default 6) after 2 s of warm-up; what
#        was counted divided by the requests answered, idle work included)
# PROXY_BIN=/other/build/tokentap counts another build of the proxy (same simulator and client).
# Everything on 127.0.0.1; every process it starts is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-tokentap}
[ $# -gt 0 ] && shift
streams=100 tokens=50 itl=50.0 cache=() plain=
while [ $# -gt 0 ]; do
  case $1 in
    --streams) streams=$2; shift 2 ;;
    --tokens) tokens=$2; shift 2 ;;
    --itl) itl=$2; shift 2 ;;
    --cache) cache=(--cache-sim=yes); shift ;;
    --cold) cache=(--cache-sim=yes --LL=524288,16,64); shift ;;
    --plain) plain=${SECS:-6}; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet --bin tokentap --example relay
B=target/release/tokentap
P=${PROXY_BIN:-$B}
d=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${KEEP:-}" ] && cp "$d"/cg.* "$KEEP"/; rm -rf "$d"' EXIT

. bench/configs.sh
sim_config "$d/sim.toml" "$([ -n "$plain" ] && echo 0 || echo "$itl")"
# Non-streaming requests are answered at once, as in bench/run.py's requests-per-second suite.
[ -n "$plain" ] && sed -i 's/^ttft_base_ms = .*/ttft_base_ms = 0.0/' "$d/sim.toml"
proxy_config "$d/tt.toml" "$([ "$target" = tokentap-notel ] && echo false || echo true)"
sed -e "s|@DIR@|$d|" -e "s|@PORT@|18080|" -e "s|@UPSTREAM@|127.0.0.1:18000|" bench/nginx.conf \
  > "$d/nginx.conf"

TOKENTAP_LOG=warn taskset -c 0 $B simulate --config "$d/sim.toml" --listen 127.0.0.1:18000 \
  2>/dev/null &
pids+=($!)

# Sends `requests` requests of `tokens` tokens through the proxy, at most `streams` at once.
load() {
  taskset -c 0 $B bench --base-url http://127.0.0.1:18080 --model "$MODEL" --num-prompts "$1" \
    --max-concurrency "$2" --random-input-len 16 --random-output-len "$3" --ignore-eos \
    --disable-tqdm
}

# Instructions the proxy executes while `requests` requests of `tokens` tokens pass through it.
# Starts the proxy under callgrind, writing to $1 (nginx: one file per process).
start_proxy() {
  local out=$1
  case $target in
    tokentap | tokentap-notel)
      TOKENTAP_LOG=warn taskset -c 1 valgrind --tool=callgrind "${cache[@]}" --callgrind-out-file="$out" \
        "$P" serve --config "$d/tt.toml" 2>/dev/null &
      ;;
    relay)
      taskset -c 1 valgrind --tool=callgrind "${cache[@]}" --callgrind-out-file="$out" \
        target/release/examples/relay 127.0.0.1:18080 127.0.0.1:18000 2>/dev/null &
      ;;
    nginx)
      taskset -c 1 valgrind --tool=callgrind "${cache[@]}" --trace-children=yes \
        --callgrind-out-file="$out.%p" nginx -p "$d" -c "$d/nginx.conf" 2>/dev/null &
      ;;
  esac
  proxy=$!
  wait_port 18080
}

# Stops the proxy and prints every event callgrind counted in $1, summed over the processes:
# Ir, and with --cache the misses.
stop_proxy() {
  if [ "$target" = nginx ]; then
    kill -QUIT "$(cat "$d/nginx.pid")"
  else
    kill -TERM $proxy
  fi
  wait $proxy || true
  grep -h '^summary:' "$1"* | awk '{for (i = 2; i <= NF; i++) s[i] += $i}
    END {for (i = 2; i <= NF; i++) printf "%d ", s[i]; print ""}'
}

count() {
  local requests=$1 out="$d/cg.$1"
  start_proxy "$out"
  # Start-up and the first requests are not counted: on its first use quanta (the metrics
  # exporter's clock) calibrates for a bounded time, not a bounded number of steps, so under
  # valgrind its count differs from run to run by more than a change per chunk could show.
  load 2 2 2 > /dev/null
  callgrind_control --zero >/dev/null
  load "$requests" "$streams" "$tokens" > "$d/bench.$requests"
  stop_proxy "$out"
}
# The names of those events, in callgrind's order.
events=$([ ${#cache[@]} -gt 0 ] && echo "Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw" || echo Ir)

wait_port 18000
if [ -n "$plain" ]; then
  command -v wrk > /dev/null || { echo "wrk is missing: apt-get install -y wrk" >&2; exit 1; }
  post_lua "$d/post.lua"
  url=http://127.0.0.1:18080/v1/chat/completions
  start_proxy "$d/cg.plain"
  taskset -c 0 wrk -t1 -c8 -d2s -s "$d/post.lua" "$url" > /dev/null
  callgrind_control --zero > /dev/null
  taskset -c 0 wrk -t1 -c8 -d"${plain}s" -s "$d/post.lua" "$url" > "$d/wrk.txt"
  stop_proxy "$d/cg.plain" > "$d/counted"
  read -ra counted < "$d/counted"
  requests=$(awk '/requests in/ {print $1}' "$d/wrk.txt")
  non2xx=$(awk '/Non-2xx/ {print $NF}' "$d/wrk.txt")
  echo "$target: $requests non-streaming requests in ${plain} s (non-2xx: ${non2xx:-0}): ${counted[*]} ($events)"
  i=0
  for e in $events; do
    awk -v c="${counted[$i]}" -v r="$requests" -v e="$e" -v t="$target" \
      'BEGIN {printf "%s: %s per request %.0f\n", t, e, c / r}'
    i=$((i + 1))
  done
  exit 0
fi
n=$((streams * 2))
a=$(count $n)
b=$(count $((2 * n)))
chunks=$((n * tokens))
echo "$target: $streams streams x $tokens tokens, ITL $itl ms; $n requests: $a, $((2 * n)): $b ($events)"
read -ra as <<< "$a"
read -ra bs <<< "$b"
i=0
for e in $events; do
  awk -v a="${as[$i]}" -v b="${bs[$i]}" -v c="$chunks" -v e="$e" -v t="$target" \
    'BEGIN {printf "%s: %s per chunk %.1f\n", t, e, (b - a) / c}'
  i=$((i + 1))
done
