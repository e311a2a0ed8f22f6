#!/usr/bin/env python3
"""Summarizes a bench/run.py result directory into summary.md (medians over repeats) and
replaces the generated block of BENCHMARKS.md with it.

Usage: bench/report.py bench/results/<run>
"""

import json
import os
import re
import statistics
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ["direct", "tokentap", "tokentap-pgo", "tokentap-notel", "nginx", "relay"]
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f(x, nd=1):
    return "–" if x is None else f"{x:,.{nd}f}"


def main(out, write_doc=True):
    rows = [json.loads(line) for line in open(os.path.join(out, "rows.jsonl"))]
    info = json.load(open(os.path.join(out, "machine.json")))
    lines = []
    w = lines.append
    w(f"Run `{os.path.basename(out)}`: {info['date']}, commit `{info['commit']}`, "
      f"{info['cpu']} × {info['cores']} cores, {info['mem_gib']} GiB, Linux {info['kernel']}, "
      f"{info['nginx']}, {info['rustc']}; options {info['args']}. "
      "Every figure is the median over the repeats.")
    w("")

    lat = defaultdict(list)
    for r in rows:
        if r["tag"].startswith("lat-"):
            lat[(r["streams"], r["target"])].append(r)
    if lat:
        w("#### Added latency per chunk (one-way, simulator emit → client receive)")
        w("")
        w("| streams | target | chunk p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs "
          "| added p99.9 µs | TTFT p50 ms | added TTFT ms | failed |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for streams in sorted({k[0] for k in lat}):
            base = {}
            for t in TARGETS:
                rs = lat.get((streams, t), [])
                if not rs:
                    continue
                m = {k: med([(r["chunk_us"] or {}).get(k) for r in rs])
                     for k in ["p50", "p99", "p99.9"]}
                ttft = med([r["ttft_p50_ms"] for r in rs])
                failed = sum(r["failed"] for r in rs)
                if t == "direct":
                    base = dict(m, ttft=ttft)
                add = {k: (m[k] - base[k]) if base.get(k) is not None and m[k] is not None
                       else None for k in m}
                addt = ttft - base["ttft"] if t != "direct" and base.get("ttft") else None
                w(f"| {streams:,} | {t} | {f(m['p50'])} | {f(m['p99'])} | {f(m['p99.9'])} | "
                  f"{f(add['p50']) if t != 'direct' else ''} | "
                  f"{f(add['p99']) if t != 'direct' else ''} | "
                  f"{f(add['p99.9']) if t != 'direct' else ''} | {f(ttft, 2)} | "
                  f"{f(addt, 2) if t != 'direct' else ''} | {failed} |")
        w("")
        w("#### Proxy CPU and memory (same runs)")
        w("")
        w("| streams | target | CPU s per 1M chunks | of it user space | vs nginx | RSS idle MiB "
          "| RSS peak MiB | KiB per stream |")
        w("|---|---|---|---|---|---|---|---|")
        for streams in sorted({k[0] for k in lat}):
            ng = med([r["cpu_s_per_m_chunks"] for r in lat.get((streams, "nginx"), [])])
            for t in TARGETS[1:]:
                rs = lat.get((streams, t), [])
                if not rs:
                    continue
                cpu = med([r["cpu_s_per_m_chunks"] for r in rs])
                user = med([r.get("user_s_per_m_chunks") for r in rs])
                base = med([r["rss_base_kib"] for r in rs])
                peak = med([r["rss_peak_kib"] for r in rs])
                per = med([(r["rss_peak_kib"] - r["rss_base_kib"]) / streams for r in rs])
                w(f"| {streams:,} | {t} | {f(cpu, 2)} | {f(user, 2)} | "
                  f"{f(cpu / ng, 2) + '×' if cpu and ng else '–'} | {f(base / 1024)} | "
                  f"{f(peak / 1024)} | {f(per) if streams >= 1000 else ''} |")
        w("")
        w("Telemetry's own cost (tokentap − tokentap-notel, share of tokentap's CPU per chunk; "
          "then the same for user time alone, as telemetry makes no syscalls of its own):")
        w("")
        for streams in sorted({k[0] for k in lat}):
            on_rows = lat.get((streams, "tokentap"), [])
            off_rows = lat.get((streams, "tokentap-notel"), [])
            on = med([r["cpu_s_per_m_chunks"] for r in on_rows])
            off = med([r["cpu_s_per_m_chunks"] for r in off_rows])
            on_u = med([r.get("user_s_per_m_chunks") for r in on_rows])
            off_u = med([r.get("user_s_per_m_chunks") for r in off_rows])
            if on and off:
                user = (f"; user time {f(on_u, 2)} vs {f(off_u, 2)} → "
                        f"{f((on_u - off_u) / on * 100)} %" if on_u is not None
                        and off_u is not None else "")
                w(f"- {streams:,} streams: {f(on, 2)} vs {f(off, 2)} s per 1M chunks → "
                  f"{f((on - off) / on * 100)} %{user}")
        w("")

    sat = defaultdict(list)
    for r in rows:
        if r["tag"].startswith("sat-"):
            sat[r["target"]].append(r)
    if sat:
        w("#### Saturation: streaming chunks per second (simulator ITL 0, 50 streams)")
        w("")
        w("| target | chunks/s at the client | proxy CPU busy | chunks/s per proxy core "
          "| CPU s per 1M chunks |")
        w("|---|---|---|---|---|")
        for t in TARGETS:
            rs = sat.get(t, [])
            if not rs:
                continue
            rate = med([r["chunks"] / r["duration"] for r in rs])
            util = med([r["proxy_cpu_s"] / r["duration"] for r in rs]) if t != "direct" else None
            cap = med([r["chunks"] / r["proxy_cpu_s"] for r in rs]) if t != "direct" else None
            cpm = med([r["cpu_s_per_m_chunks"] for r in rs]) if t != "direct" else None
            w(f"| {t} | {f(rate, 0)} | {f(util * 100 if util else None, 0)}"
              f"{' %' if util else ''} | {f(cap, 0)} | {f(cpm, 2)} |")
        w("")

    rps = defaultdict(list)
    for r in rows:
        if r["tag"].startswith("rps-"):
            rps[r["target"]].append(r)
    if rps:
        w("#### Non-streaming requests per second (16-token JSON completion, wrk -c64)")
        w("")
        w("| target | requests/s | proxy CPU busy | requests/s per proxy core | non-2xx |")
        w("|---|---|---|---|---|")
        for t in TARGETS:
            rs = rps.get(t, [])
            if not rs:
                continue
            v = med([r["rps"] for r in rs])
            util = med([r["proxy_cpu_util"] for r in rs]) if t != "direct" else None
            cap = med([r["rps"] / r["proxy_cpu_util"] for r in rs if r["proxy_cpu_util"]]) \
                if t != "direct" else None
            w(f"| {t} | {f(v, 0)} | {f(util * 100 if util else None, 0)}"
              f"{' %' if util else ''} | {f(cap, 0)} | {sum(r['non2xx'] for r in rs)} |")
        w("")

    text = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(text)
    print(text)
    bm = os.path.join(ROOT, "BENCHMARKS.md")
    if write_doc and os.path.exists(bm):
        doc = open(bm).read()
        if BEGIN in doc and END in doc:
            doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END),
                         lambda _: f"{BEGIN}\n{text}\n{END}", doc, flags=re.S)
            open(bm, "w").write(doc)
            print(f"\nupdated {bm}")


if __name__ == "__main__":
    main(sys.argv[1], write_doc="--no-doc" not in sys.argv[2:])
