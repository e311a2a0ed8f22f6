#!/usr/bin/env python3
"""tokentap end-to-end benchmark: direct vs tokentap (telemetry on / off) vs nginx, and a TCP
relay that reads nothing (bench/relay.rs: what the extra hop alone costs).

Everything runs on 127.0.0.1. The simulator (with emit-time stamps) is the upstream and
`tokentap bench --chunk-latency` the client. CPU 0 runs the simulator and the client, CPU 1
the proxy under test (alone), so the load side and the proxy never compete for a core.

Usage: bench/run.sh [--quick] [--repeats N] [--only latency,saturation,rps]
                    [--streams 1000,5000] [--targets tokentap,nginx]
A run limited by --streams or --targets writes its summary to bench/results/ only and leaves
BENCHMARKS.md alone (it is for comparing one change quickly).
Results: bench/results/<UTC time>/ (raw JSON + summary.md); bench/results/latest -> it.
"""

import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "tokentap")
MODEL = "Qwen/Qwen2.5-7B-Instruct"
HOST = "127.0.0.1"
SIM_PORT, TT_PORT, TT_ADMIN, NOTEL_PORT, NOTEL_ADMIN, NGINX_PORT, RELAY_PORT = (
    18000, 18080, 19464, 18081, 19465, 18082, 18083)
# tokentap built with profile-guided optimization (bench/pgo.sh), full telemetry.
PGO_BIN = os.path.join(ROOT, "target", "pgo", "release", "tokentap")
PGO_PORT, PGO_ADMIN = 18084, 19466
# The floor: a TCP relay that reads nothing (bench/relay.rs, built by bench/run.sh).
RELAY = os.path.join(ROOT, "target", "release", "examples", "relay")
LOAD_CPU, PROXY_CPU = "0", "1"
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

TARGETS = ["direct", "tokentap", "tokentap-notel", "nginx", "relay"]
# Run only when asked for (--pgo or --targets): its binary is built by bench/pgo.sh.
OPTIONAL = ["tokentap-pgo"]

# (concurrent streams, inter-token ms, output tokens, arrival rate/s or None = all at once,
#  requests). 1,000+ streams use a longer ITL: the simulator and the client share one core.
LEVELS = [
    (1, 20, 100, None, 4),
    (100, 20, 100, None, 200),
    (1000, 100, 40, 1000, 1000),
    (5000, 200, 25, 5000, 5000),
]
QUICK_LEVELS = [
    (1, 20, 50, None, 2),
    (100, 20, 50, None, 100),
    (1000, 100, 20, 1000, 1000),
    (5000, 200, 12, 5000, 5000),
]

procs = []


def cleanup():
    for p in procs:
        if p.poll() is None:
            try:
                p.terminate()
                p.wait(5)
            except Exception:
                p.kill()
    procs.clear()


atexit.register(cleanup)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))


def start(args, cpu, log, env=None):
    f = open(log, "ab")
    p = subprocess.Popen(["taskset", "-c", cpu] + args, stdout=f, stderr=subprocess.STDOUT,
                         env=env, start_new_session=True)
    procs.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in procs:
        procs.remove(p)


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection((HOST, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port}")


def wait_free(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection((HOST, port), 0.2).close()
            time.sleep(0.1)
        except OSError:
            return


def children(pid):
    out = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def cpu_ticks(pids):
    return sum(user_sys_ticks(pids))


def user_sys_ticks(pids):
    user = system = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime
            system += int(fields[12])  # stime
        except OSError:
            pass
    return user, system


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class Sampler(threading.Thread):
    """Peak VmRSS of a process tree while a run goes on."""

    def __init__(self, pids):
        super().__init__(daemon=True)
        self.pids, self.peak, self.stop_flag = pids, 0, False

    def run(self):
        while not self.stop_flag:
            self.peak = max(self.peak, rss_kib(self.pids))
            time.sleep(0.1)


def sim_config(path, itl_ms, stamp=True, ttft_ms=10.0):
    with open(path, "w") as f:
        f.write(f"""seed = 1
stamp_emit_time = {'true' if stamp else 'false'}
[timing]
ttft_base_ms = {ttft_ms}
prefill_ms_per_1k_tokens = 0.0
itl_ms = {itl_ms}
jitter = 0.0
slowdown_per_seq = 0.0
max_num_seqs = 100000
[output]
completions_default_max_tokens = 16
""")


def tt_config(path, port, admin, telemetry):
    with open(path, "w") as f:
        f.write(f"""listen = "{HOST}:{port}"
admin_listen = "{HOST}:{admin}"
[upstream]
url = "http://{HOST}:{SIM_PORT}"
pool_max_idle = 20000
[proxy]
telemetry_enabled = {'true' if telemetry else 'false'}
[telemetry]
models = ["{MODEL}"]
""")


def nginx_config(d):
    with open(os.path.join(ROOT, "bench", "nginx.conf")) as f:
        text = f.read()
    text = text.replace("@DIR@", d).replace("@PORT@", str(NGINX_PORT)).replace(
        "@UPSTREAM@", f"{HOST}:{SIM_PORT}")
    path = os.path.join(d, "nginx.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


def start_proxy(name, out):
    """Starts one proxy on PROXY_CPU; returns (Popen, pids to account, port)."""
    d = os.path.join(out, "run")
    log = os.path.join(out, f"{name}.log")
    if name == "direct":
        return None, [], SIM_PORT
    if name.startswith("tokentap"):
        tel = name != "tokentap-notel"
        port, admin = {"tokentap": (TT_PORT, TT_ADMIN), "tokentap-notel": (NOTEL_PORT, NOTEL_ADMIN),
                       "tokentap-pgo": (PGO_PORT, PGO_ADMIN)}[name]
        cfg = os.path.join(d, f"{name}.toml")
        tt_config(cfg, port, admin, tel)
        env = dict(os.environ, TOKENTAP_LOG="warn")
        # PROXY_BIN: another build as the proxy, against the same simulator and client (A/B).
        binary = PGO_BIN if name == "tokentap-pgo" else os.environ.get("PROXY_BIN", BIN)
        p = start([binary, "serve", "--config", cfg], PROXY_CPU, log, env)
        # The access log goes to stderr at info level; keep it (it is part of telemetry).
        wait_port(port)
        return p, [p.pid], port
    if name == "relay":
        p = start([RELAY, f"{HOST}:{RELAY_PORT}", f"{HOST}:{SIM_PORT}"], PROXY_CPU, log)
        wait_port(RELAY_PORT)
        return p, [p.pid], RELAY_PORT
    p = start(["nginx", "-p", d, "-c", nginx_config(d), "-e", os.path.join(d, "nginx-error.log")],
              PROXY_CPU, log)
    wait_port(NGINX_PORT)
    time.sleep(0.2)
    return p, children(p.pid), NGINX_PORT


def bench(port, out_json, n, conc, tokens, rate, chunk_latency=True, extra=()):
    args = [BIN, "bench", "--base-url", f"http://{HOST}:{port}", "--model", MODEL,
            "--num-prompts", str(n), "--max-concurrency", str(conc),
            "--random-input-len", "16", "--random-output-len", str(tokens), "--ignore-eos",
            "--disable-tqdm", "--save-result", "--result-filename", out_json,
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
    if rate:
        args += ["--request-rate", str(rate)]
    if chunk_latency:
        args.append("--chunk-latency")
    args += list(extra)
    r = subprocess.run(["taskset", "-c", LOAD_CPU] + args, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"bench failed: {r.stderr[-2000:]}")
    with open(out_json) as f:
        return json.load(f)


def one_run(name, out, tag, n, conc, tokens, rate, chunk_latency=True, extra=()):
    p, pids, port = start_proxy(name, out)
    time.sleep(0.3)
    base_rss = rss_kib(pids)
    sampler = Sampler(pids)
    sampler.start()
    (u0, s0), t0 = user_sys_ticks(pids), time.time()
    res = bench(port, os.path.join(out, f"{tag}-{name}.json"), n, conc, tokens, rate,
                chunk_latency, extra)
    wall = time.time() - t0
    u1, s1 = user_sys_ticks(pids)
    user, cpu = (u1 - u0) / TICKS, (u1 + s1 - u0 - s0) / TICKS
    sampler.stop_flag = True
    sampler.join()
    if p:
        stop(p)
        wait_free(port)
    chunks = sum(res["output_lens"])
    row = {
        "target": name, "tag": tag, "streams": conc, "requests": n,
        "completed": res["completed"], "failed": res["failed"], "chunks": chunks,
        "duration": res["duration"], "wall": wall,
        "ttft_p50_ms": res.get("median_ttft_ms"), "ttft_p99_ms": res.get("p99_ttft_ms"),
        "itl_p50_ms": res.get("median_itl_ms"), "itl_p99_ms": res.get("p99_itl_ms"),
        "chunk_us": res.get("chunk_latency_us"),
        "proxy_cpu_s": cpu if pids else None,
        "cpu_s_per_m_chunks": cpu / chunks * 1e6 if pids and chunks else None,
        "user_s_per_m_chunks": user / chunks * 1e6 if pids and chunks else None,
        "rss_base_kib": base_rss if pids else None,
        "rss_peak_kib": sampler.peak if pids else None,
    }
    with open(os.path.join(out, "rows.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    lat = row["chunk_us"] or {}
    print(f"  {tag:<22} {name:<15} ok {row['completed']}/{n}  chunk p50 {lat.get('p50', 0):8.1f} "
          f"p99 {lat.get('p99', 0):9.1f} us  ttft p50 {row['ttft_p50_ms'] or 0:7.2f} ms  "
          f"cpu {row['proxy_cpu_s'] or 0:6.2f} s (user {user if pids else 0:5.2f})  rss {row['rss_base_kib'] or 0}->"
          f"{row['rss_peak_kib'] or 0} KiB", flush=True)
    return row


def start_sim(out, itl_ms, stamp=True, ttft_ms=10.0):
    cfg = os.path.join(out, "run", f"sim-{itl_ms}.toml")
    sim_config(cfg, itl_ms, stamp, ttft_ms)
    wait_free(SIM_PORT)
    p = start([BIN, "simulate", "--config", cfg, "--listen", f"{HOST}:{SIM_PORT}"], LOAD_CPU,
              os.path.join(out, "sim.log"), dict(os.environ, TOKENTAP_LOG="warn"))
    wait_port(SIM_PORT)
    return p


def order(r):
    """The targets in the order repeat `r` runs them: direct first, the proxies rotated by one
    per repeat, so that no proxy always runs at the same point (right after the simulator
    started, or after another proxy's thousands of connections)."""
    head = [t for t in TARGETS if t == "direct"]
    rest = [t for t in TARGETS if t != "direct"]
    k = r % len(rest) if rest else 0
    return head + rest[k:] + rest[:k]


def latency_suite(out, levels, repeats):
    for conc, itl, tokens, rate, n in levels:
        print(f"{conc} streams, ITL {itl} ms, {tokens} tokens, {n} requests", flush=True)
        sim = start_sim(out, itl)
        for r in range(repeats):
            for name in order(r):
                one_run(name, out, f"lat-c{conc}-r{r}", n, conc, tokens, rate)
        stop(sim)


def saturation_suite(out, repeats, quick):
    # Near-zero ITL: chunks go out as fast as the simulator can write them.
    streams, tokens = 50, (1000 if quick else 4000)
    print(f"saturation: {streams} streams x {tokens} tokens, ITL 0", flush=True)
    sim = start_sim(out, 0.0, stamp=False, ttft_ms=0.0)
    for r in range(repeats):
        for name in order(r):
            one_run(name, out, f"sat-r{r}", streams, streams, tokens, None, chunk_latency=False)
    stop(sim)


WRK_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"%s","messages":[{"role":"user","content":"say hi"}],"max_tokens":16,"ignore_eos":true}'
""" % MODEL


def rps_suite(out, repeats, quick):
    secs = 4 if quick else 8
    print(f"non-streaming: wrk 1 thread, 64 connections, {secs} s", flush=True)
    lua = os.path.join(out, "run", "post.lua")
    with open(lua, "w") as f:
        f.write(WRK_LUA)
    sim = start_sim(out, 0.0, stamp=False, ttft_ms=0.0)
    for r in range(repeats):
        for name in order(r):
            p, pids, port = start_proxy(name, out)
            time.sleep(0.3)
            c0, t0 = cpu_ticks(pids), time.time()
            w = subprocess.run(["taskset", "-c", LOAD_CPU, "wrk", "-t1", "-c64", f"-d{secs}s",
                                "--latency", "-s", lua, f"http://{HOST}:{port}/v1/chat/completions"],
                               capture_output=True, text=True)
            wall = time.time() - t0
            cpu = (cpu_ticks(pids) - c0) / TICKS
            if p:
                stop(p)
                wait_free(port)
            rps, non2xx = None, 0
            for line in w.stdout.splitlines():
                if line.startswith("Requests/sec:"):
                    rps = float(line.split()[1])
                if "Non-2xx" in line:
                    non2xx = int(line.split()[-1])
            row = {"target": name, "tag": f"rps-r{r}", "rps": rps, "non2xx": non2xx,
                   "proxy_cpu_util": cpu / wall if pids else None}
            with open(os.path.join(out, "rows.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"  rps-r{r:<18} {name:<15} {rps} req/s  non-2xx {non2xx}  proxy cpu "
                  f"{(cpu / wall * 100) if pids else 0:.0f}%", flush=True)
    stop(sim)


def machine():
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    rustc = subprocess.run(["rustc", "-V"], capture_output=True, text=True).stdout.strip()
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {"cpu": model, "cores": os.cpu_count(), "kernel": platform.release(),
            "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1), "nginx": nginx,
            "rustc": rustc, "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def check_pgo_bin():
    """Exits unless the PGO build exists and is newer than every source it is built from: an
    older one would be measured as if it were the current code."""
    if not os.path.exists(PGO_BIN):
        sys.exit(f"{PGO_BIN} is missing: bench/pgo.sh builds it")
    sources = [os.path.join(ROOT, f) for f in ["Cargo.toml", "Cargo.lock"]]
    for d, _, files in os.walk(os.path.join(ROOT, "src")):
        sources += [os.path.join(d, f) for f in files]
    newest = max(sources, key=os.path.getmtime)
    if os.path.getmtime(newest) > os.path.getmtime(PGO_BIN):
        sys.exit(f"{PGO_BIN} is older than {os.path.relpath(newest, ROOT)}: bench/pgo.sh "
                 "rebuilds it")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter runs, for a smoke test")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="latency,saturation,rps")
    ap.add_argument("--streams", help="comma-separated subset of 1,100,1000,5000")
    ap.add_argument("--targets", help="comma-separated subset of " + ",".join(TARGETS + OPTIONAL))
    ap.add_argument("--pgo", action="store_true",
                    help="also tokentap-pgo, the build of bench/pgo.sh (bench/run.sh --pgo builds it)")
    a = ap.parse_args()
    every = TARGETS[:2] + OPTIONAL + TARGETS[2:]
    if a.targets:
        TARGETS[:] = [t for t in every if t in a.targets.split(",")]
    elif a.pgo:
        TARGETS[:] = every
    if "tokentap-pgo" in TARGETS:
        check_pgo_bin()
    levels = QUICK_LEVELS if a.quick else LEVELS
    if a.streams:
        levels = [lv for lv in levels if str(lv[0]) in a.streams.split(",")]
    for tool in ["nginx", "wrk", "taskset"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install -y nginx-light wrk util-linux")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = os.path.join(ROOT, "bench", "results", stamp)
    os.makedirs(os.path.join(out, "run"))
    for sub in ["client_body", "proxy"]:
        os.makedirs(os.path.join(out, "run", sub))
    info = machine()
    info["args"] = vars(a)
    with open(os.path.join(out, "machine.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"results: {out}", flush=True)
    only = a.only.split(",")
    if "latency" in only:
        latency_suite(out, levels, a.repeats)
    if "saturation" in only:
        saturation_suite(out, a.repeats, a.quick)
    if "rps" in only:
        rps_suite(out, a.repeats, a.quick)
    cleanup()
    latest = os.path.join(ROOT, "bench", "results", "latest")
    if os.path.islink(latest):
        os.unlink(latest)
    os.symlink(stamp, latest)
    partial = ["--no-doc"] if a.streams or a.targets else []
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report.py"), out] + partial,
                   check=True)


if __name__ == "__main__":
    main()
