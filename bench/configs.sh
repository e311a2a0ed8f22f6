# Config files and helpers shared by bench/profile.sh, bench/instructions.sh and bench/pgo.sh
# (sourced, not run). The simulator on 127.0.0.1:18000 with exact timings, the proxy on
# 127.0.0.1:18080.

MODEL=Qwen/Qwen2.5-7B-Instruct

# sim_config FILE ITL_MS [STAMP]: no jitter, no slowdown, TTFT 10 ms; STAMP=true writes emit
# times into the chunks.
sim_config() {
  cat > "$1" <<T
seed = 1
stamp_emit_time = ${3:-false}
[timing]
ttft_base_ms = 10.0
prefill_ms_per_1k_tokens = 0.0
itl_ms = $2
jitter = 0.0
slowdown_per_seq = 0.0
max_num_seqs = 100000
T
}

# proxy_config FILE [TELEMETRY]: tokentap in front of the simulator; TELEMETRY=false forwards
# without parsing.
proxy_config() {
  cat > "$1" <<T
listen = "127.0.0.1:18080"
admin_listen = "127.0.0.1:19464"
[upstream]
url = "http://127.0.0.1:18000"
pool_max_idle = 20000
[proxy]
telemetry_enabled = ${2:-true}
[telemetry]
models = ["$MODEL"]
T
}

# post_lua FILE: a wrk script that POSTs the benchmark's non-streaming request, a 16-token chat
# completion.
post_lua() {
  cat > "$1" <<L
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"$MODEL","messages":[{"role":"user","content":"say hi"}],"max_tokens":16,"ignore_eos":true}'
L
}

# wait_port PORT: returns once something listens on 127.0.0.1:PORT; exits after 60 s.
wait_port() {
  for _ in $(seq 1 600); do
    (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2
  exit 1
}
