#!/usr/bin/env python3
"""Where a run's late chunks are: the 100 ms windows in which chunks arrived more than a
threshold later than one inter-token time after the chunk before them, from the per-request
ITLs that `tokentap bench --save-result` writes.

A chunk-latency tail made of a few windows with hundreds of late chunks each is a stall (of
the proxy's CPU, or the machine's) and the backlog after it; a tail spread evenly over the run
is the proxy's own per-chunk cost.

Usage: bench/stalls.py RESULT.json [RESULT.json ...] [--itl-ms 200] [--late-ms 1.5] [--top 8]
(bench/run.py writes one result per target and repeat: bench/results/<run>/lat-*.json)
"""

import argparse
import collections
import json
import os


def windows(path, itl, late):
    """(late chunks, {window start s: (late chunks, worst lateness ms)}) of one result."""
    d = json.load(open(path))
    t0 = min(d["start_times"])
    count = collections.Counter()
    worst = collections.defaultdict(float)
    total = 0
    for start, ttft, itls in zip(d["start_times"], d["ttfts"], d["itls"]):
        t = start - t0 + ttft
        for gap in itls:
            t += gap
            if gap > itl + late:
                w = int(t * 10) / 10
                count[w] += 1
                worst[w] = max(worst[w], (gap - itl) * 1000)
                total += 1
    return total, {w: (count[w], worst[w]) for w in count}, d.get("chunk_latency_us") or {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--itl-ms", type=float, default=200.0, help="the simulator's inter-token time")
    ap.add_argument("--late-ms", type=float, default=1.5, help="lateness that counts")
    ap.add_argument("--top", type=int, default=8, help="windows to list per result")
    a = ap.parse_args()
    for path in a.results:
        total, ws, lat = windows(path, a.itl_ms / 1000, a.late_ms / 1000)
        top = sorted(ws.items(), key=lambda kv: -kv[1][0])[: a.top]
        listed = ", ".join(f"{w:.1f} s: {n} late, worst {m:.1f} ms" for w, (n, m) in sorted(top))
        p99 = lat.get("p99")
        print(f"{os.path.basename(path)}: {total} late chunks in {len(ws)} windows"
              f"{f'; chunk p99 {p99 / 1000:.2f} ms' if p99 else ''}")
        if listed:
            print(f"  {listed}")


if __name__ == "__main__":
    main()
