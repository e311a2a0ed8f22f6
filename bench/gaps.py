#!/usr/bin/env python3
"""Whether this machine takes CPUs away: reads the clock in a loop for a while and lists every
gap over 1 ms between two reads (time into the run, gap length, both in ms).

On a VM whose CPUs the host shares, a gap is a stretch in which the CPU ran something else;
whatever runs there (a proxy under test, say) waits it out too. Run it pinned, on an
otherwise idle CPU and then with the other CPUs busy:

    taskset -c 1 bench/gaps.py 15
    taskset -c 0 python3 -c 'while True: pass' & taskset -c 1 bench/gaps.py 15; kill %1
"""

import sys
import time


def main():
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 15.0
    t0 = last = time.perf_counter()
    gaps = []
    while last - t0 < secs:
        now = time.perf_counter()
        if now - last > 0.001:
            gaps.append((now - t0, now - last))
        last = now
    print(f"{len(gaps)} gaps over 1 ms in {secs:g} s"
          + (f", longest {max(g for _, g in gaps) * 1000:.1f} ms" if gaps else ""))
    for at, gap in gaps:
        print(f"  at {at * 1000:9.1f} ms: {gap * 1000:6.2f} ms")


if __name__ == "__main__":
    main()
