#!/usr/bin/env python3
"""A chunk's path through the proxy at 1 stream, from the proxy's own syscalls.

At 1 stream the proxy's CPU sleeps between chunks, and what a chunk's one-way latency adds
over a direct connection is mostly the machine's: waking the proxy's CPU, the loopback
syscalls, waking the client's. Those move by tens of µs from one run to the next on a shared
VM, more than the proxies differ, so `bench/run.py`'s 1-stream figures cannot tell two proxies'
own work apart. This script can: it traces the proxy's syscalls with `perf record -e
raw_syscalls:*` (a tracepoint: no hardware counters needed) while one stream goes through it,
and for each wake-up that brings a chunk it measures, on the proxy's CPU, from the return of
`epoll_wait` to the read of the chunk (the event loop: dispatch, timers, the task's poll), the
read itself, from the read to the write to the client (parsing, telemetry, framing), the write,
and the whole span from the wake-up to the write, which is where a chunk waits on the proxy;
`user` is the first and third added, the proxy's own user-space time on the chunk's path.

Usage: bench/critical.py [--targets tokentap,tokentap-pgo,nginx,relay] [--rounds 4]
       [--requests 4] [--tokens 100] [--itl 20]
Each round runs every target once, in an order rotated by one per round; each figure is the
median over a run's chunks, and the table gives the median of those over the rounds.
Needs perf (Debian: linux-perf) and permission to trace syscalls (root, or
kernel.perf_event_paranoid <= -1). Everything on 127.0.0.1, pinned as in bench/run.py.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import run

EPOLL_WAIT = {232, 281}  # epoll_wait, epoll_pwait (x86-64)
READS = {0, 45}  # read, recvfrom
WRITES = {1, 20, 44}  # write, writev, sendto
# The last, `user`, is the first and third added: the proxy's user-space time on the path.
PARTS = ["wake_to_read", "read", "read_to_write", "write", "wake_to_write", "user"]
LINE = re.compile(r"\s*(\d+)\s+([\d.]+):\s+raw_syscalls:sys_(enter|exit):\s+NR (\d+)(.*)")


def spans(trace):
    """Per wake-up of the proxy that forwarded a chunk: the PARTS, in µs. Each thread's
    syscalls are read in turn; the one that forwarded the most chunks is the event loop's."""
    threads = {}
    for line in trace.splitlines():
        m = LINE.match(line)
        if m:
            threads.setdefault(m[1], []).append(
                (float(m[2]) * 1e6, m[3], int(m[4]), m[5].strip()))
    return max((thread_spans(events) for events in threads.values()), key=len, default=[])


def thread_spans(events):
    """The PARTS of each wake-up in one thread's syscalls."""
    out = []
    wake = None
    calls = []

    def close():
        reads = [c for c in calls if c[2] in READS and not c[3].startswith("= -")]
        writes = [c for c in calls if c[2] in WRITES]
        if wake is None or not reads or not writes:
            return
        # The chunk's read is the last one with data before the first write.
        write = writes[0]
        before = [c for c in reads if c[1] <= write[0]]
        if not before:
            return
        read = before[-1]
        out.append((read[0] - wake, read[1] - read[0], write[0] - read[1], write[1] - write[0],
                    write[0] - wake, read[0] - wake + write[0] - read[1]))

    pending = None
    for t, kind, nr, rest in events:
        if kind == "enter":
            if nr in EPOLL_WAIT:
                close()
                wake, calls = None, []
            pending = (t, nr)
        elif pending and pending[1] == nr:
            if nr in EPOLL_WAIT:
                wake = t if rest != "= 0" else None
            elif wake is not None:
                calls.append((pending[0], t, nr, rest))
            pending = None
    close()
    return out


def one(name, out, tag, args):
    """Runs `args.requests` requests of one stream through `name` while perf traces it."""
    p, pids, port = run.start_proxy(name, out)
    time.sleep(0.3)
    # A first request opens the upstream connection and warms the proxy up, untraced.
    run.bench(port, os.path.join(out, f"{tag}-{name}-warm.json"), 1, 1, 10, None)
    data = os.path.join(out, f"{tag}-{name}.perf")
    rec = subprocess.Popen(["perf", "record", "-q", "-o", data, "-e", "raw_syscalls:sys_enter",
                            "-e", "raw_syscalls:sys_exit", "-p", ",".join(map(str, pids))],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    run.bench(port, os.path.join(out, f"{tag}-{name}.json"), args.requests, 1, args.tokens, None)
    rec.send_signal(signal.SIGINT)
    rec.wait()  # its exit status after SIGINT is not 0 even when it wrote the trace
    if not os.path.exists(data) or os.path.getsize(data) == 0:
        raise RuntimeError(f"perf record failed on {name} (tracing syscalls needs root or "
                           "kernel.perf_event_paranoid <= -1)")
    if p:
        run.stop(p)
        run.wait_free(port)
    trace = subprocess.run(["perf", "script", "--ns", "-i", data, "-F", "tid,time,event,trace"],
                           capture_output=True, text=True).stdout
    os.remove(data)
    s = spans(trace)
    if not s:
        raise RuntimeError(f"{name}: no chunk found in the syscall trace")
    row = {"target": name, "tag": tag, "chunks": len(s)}
    row.update({part: statistics.median(c) for part, c in zip(PARTS, zip(*s))})
    row["wake_to_write_p90"] = sorted(c[4] for c in s)[int(0.9 * len(s))]
    print(f"  {tag:<4} {name:<13} {len(s):4d} chunks  " + "  ".join(
        f"{part} {row[part]:5.1f}" for part in PARTS) + " µs", flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default="tokentap,tokentap-pgo,nginx,relay")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--itl", type=float, default=20.0)
    a = ap.parse_args()
    targets = [t for t in a.targets.split(",") if t != "direct"]
    if "tokentap-pgo" in targets:
        run.check_pgo_bin()
    for tool in ["perf", "nginx", "taskset"]:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install -y linux-perf nginx-light util-linux")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = os.path.join(run.ROOT, "bench", "results", f"critical-{stamp}")
    for sub in ["run/client_body", "run/proxy"]:
        os.makedirs(os.path.join(out, sub))
    print(f"results: {out}\n1 stream, ITL {a.itl:g} ms, {a.requests} requests of {a.tokens} "
          "tokens per run; µs, median over the run's chunks", flush=True)
    sim = run.start_sim(out, a.itl, stamp=False)
    rows = []
    for r in range(a.rounds):
        k = r % len(targets)
        for name in targets[k:] + targets[:k]:
            rows.append(one(name, out, f"r{r}", a))
    run.stop(sim)
    run.cleanup()
    info = run.machine()
    info["args"] = vars(a)
    with open(os.path.join(out, "critical.json"), "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
    print(f"\nmedian over {a.rounds} rounds, µs:\n\n| target | "
          + " | ".join(p.replace("_", " ") for p in PARTS) + " | wake to write p90 |\n|---"
          + "|---" * (len(PARTS) + 1) + "|")
    for name in targets:
        mine = [row for row in rows if row["target"] == name]
        cells = [statistics.median(row[p] for row in mine) for p in PARTS + ["wake_to_write_p90"]]
        print(f"| {name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
