# Config files shared by bench/profile.sh and bench/instructions.sh (sourced, not run).
# The simulator on 127.0.0.1:18000 with exact timings, the proxy on 127.0.0.1:18080.

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
