#!/usr/bin/env python3
"""tokentap soak: one long run of mixed traffic with faults and attacks, looking for leaks.

A release `tokentap serve` (the proxy under test, default configuration except the ports, the
model list and a short upstream pool idle time) runs in front of `tokentap simulate` with its
random faults on (429/500/503, in-band errors, disconnects, stalls, header delays; seeded, so
the same request body always gets the same bytes and the same fault). Normal clients send chat
and completions requests, streaming and not, with and without usage, some with a fault asked
for in `x-tokentap-sim-fault`, some cancelled mid-stream. In the background, attackers hold
silent connections, send heads a byte at a time, idle on kept-alive connections, stall huge
bodies, declare oversized bodies, send oversized heads, stop reading a stream, and abuse
HTTP/2 (idle connections, streams whose body never comes, rapid resets). A second tokentap
process sits in front of a bad upstream that sends endless SSE events (one event that never
ends, and an endless run of small ones): tokentap has one upstream, so the bad upstream gets
its own proxy, sampled like the first.

Checks at the end:
- RSS after warm-up does not grow: the lowest and the highest RSS of the last tenth of the run
  are at most 10 % above those of the first tenth after warm-up (the drift, reported either way:
  a fall is memory handed back, not a leak); the range is reported too.
- Open fds return to the baseline measured before any traffic once the clients are gone.
- No request lost or altered: every normal request that did not end complete (status fault,
  in-band error, cut stream, 502) and a sample of the complete ones are sent again straight to
  the simulator; the answer through tokentap must be the same status and the same body bytes
  (a cut stream: the same bytes up to the shorter one's end, and the direct one cut too).
- Each attack was answered as docs/limits.md says (closed near its timeout, 408/413/431).

Usage: bench/soak.sh [--seconds N] [--clients N] [--out DIR]
Writes DIR/soak.json, DIR/summary.txt and DIR/samples.csv (default bench/results/soak-<UTC>).
Exit status 0 when every check passes.
"""

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "Qwen/Qwen2.5-7B-Instruct"
HOST = "127.0.0.1"
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=15.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection((HOST, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port}")


def rss_bytes(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_secs(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def self_cpu_secs():
    t = os.times()
    return t.user + t.system


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    if n == 0:
        return 0
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


# ---------------------------------------------------------------------------------------------
# A minimal HTTP/1.1 client on asyncio streams: it keeps the exact body bytes and tells a
# complete body from a cut one, which a library would hide.


class Cut(Exception):
    """The connection ended before the response did."""


async def read_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def read_body(reader, headers, on_data=None):
    """Reads the body; returns (bytes, complete). on_data(body so far) -> True stops early."""
    body = bytearray()
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                line = await reader.readuntil(b"\r\n")
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (await reader.readuntil(b"\r\n")) != b"\r\n":
                        pass
                    return bytes(body), True
                body += await reader.readexactly(size)
                await reader.readexactly(2)
                if on_data and on_data(body):
                    return bytes(body), False
        elif "content-length" in headers:
            n = int(headers["content-length"])
            body += await reader.readexactly(n)
            return bytes(body), True
        else:
            body += await reader.read()
            return bytes(body), True
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        return bytes(body), False


class Conn:
    def __init__(self, port):
        self.port = port
        self.reader = self.writer = None

    async def ensure(self):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method, path, body=b"", headers=(), on_data=None):
        """Returns dict(status, headers, body, complete, error)."""
        await self.ensure()
        head = [f"{method} {path} HTTP/1.1", f"host: {HOST}:{self.port}"]
        if body or method == "POST":
            head += ["content-type: application/json", f"content-length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        try:
            await self.writer.drain()
            status, rh = await read_head(self.reader)
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            self.close()
            return {"status": None, "headers": {}, "body": b"", "complete": False,
                    "error": type(e).__name__}
        data, complete = await read_body(self.reader, rh, on_data)
        if not complete or rh.get("connection", "").lower() == "close":
            self.close()
        return {"status": status, "headers": rh, "body": data, "complete": complete,
                "error": None}


# ---------------------------------------------------------------------------------------------
# Normal traffic.

FAULT_CHOICES = [
    "status=429", "status=500", "status=503", "error_after=5", "disconnect_after=4",
    "stall_after=3, stall_ms=1500", "header_delay_ms=400", "disconnect_after=0",
]


def make_request(i, rng):
    chat = rng.random() < 0.8
    stream = rng.random() < 0.75
    body = {"model": MODEL}
    prompt = f"soak request {i}: " + " ".join(rng.choice(["alpha", "beta", "gamma", "delta"])
                                                for _ in range(rng.randint(4, 60)))
    if chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = prompt
    if rng.random() < 0.7:
        body["max_tokens"] = rng.randint(4, 64)
    if stream:
        body["stream"] = True
        if rng.random() < 0.5:
            body["stream_options"] = {"include_usage": True}
    headers = [("x-request-id", f"soak-{i}")]
    fault = None
    if rng.random() < 0.1:
        fault = rng.choice(FAULT_CHOICES)
        headers.append(("x-tokentap-sim-fault", fault))
    cancel_after = rng.randint(1, 6) if stream and rng.random() < 0.1 else None
    return {"i": i, "path": path, "body": json.dumps(body).encode(), "headers": headers,
            "stream": stream, "fault": fault, "cancel_after": cancel_after}


def classify(r, stream):
    """complete | error_event | status | cut | no_response."""
    if r["status"] is None:
        return "no_response"
    if r["status"] != 200:
        return "status"
    if not r["complete"]:
        return "cut"
    if stream:
        if not r["body"].endswith(b"data: [DONE]\n\n"):
            return "cut"
        if b'data: {"error"' in r["body"]:
            return "error_event"
        return "complete"
    try:
        json.loads(r["body"])
    except ValueError:
        return "cut"
    return "complete"


class Stats:
    def __init__(self):
        self.sent = 0
        self.outcomes = {}
        self.cancelled = 0
        self.compared = 0
        self.compared_equal = 0
        self.cut_elsewhere = 0
        self.mismatches = []
        self.lost = []
        self.latencies = []
        self.attacks = {}

    def attack(self, name, ok, detail=None):
        a = self.attacks.setdefault(name, {"runs": 0, "as_documented": 0, "other": {}})
        a["runs"] += 1
        if ok:
            a["as_documented"] += 1
        else:
            key = str(detail)
            a["other"][key] = a["other"].get(key, 0) + 1


async def normal_client(cid, args, stats, stop, counter):
    rng = random.Random(1000 + cid)
    proxy = Conn(args.tt_port)
    direct = Conn(args.sim_port)
    while not stop.is_set():
        i = counter[0]
        counter[0] += 1
        req = make_request(i, rng)
        on_data = None
        if req["cancel_after"]:
            n = req["cancel_after"]
            on_data = lambda body, n=n: body.count(b"\n\n") >= n  # noqa: E731
        if rng.random() < 0.1:
            proxy.close()  # some requests on new connections
        t0 = time.monotonic()
        try:
            r = await asyncio.wait_for(
                proxy.request("POST", req["path"], req["body"], req["headers"], on_data), 300)
        except asyncio.TimeoutError:
            proxy.close()
            r = {"status": None, "headers": {}, "body": b"", "complete": False,
                 "error": "timeout"}
        except OSError as e:
            proxy.close()
            r = {"status": None, "headers": {}, "body": b"", "complete": False,
                 "error": type(e).__name__}
        stats.sent += 1
        if req["cancel_after"] and r["status"] == 200 and not r["complete"] and on_data(r["body"]):
            proxy.close()
            stats.cancelled += 1
            continue
        kind = classify(r, req["stream"])
        stats.outcomes[kind] = stats.outcomes.get(kind, 0) + 1
        if kind == "complete":
            stats.latencies.append(time.monotonic() - t0)
        # Every request that did not end complete, and one in eight that did, is sent again
        # straight to the simulator: same body, same headers, so the same bytes and fault.
        if kind != "complete" or rng.random() < 0.125:
            await compare(req, r, kind, direct, stats)
        await asyncio.sleep(rng.random() * args.think)
    proxy.close()
    direct.close()


async def compare(req, r, kind, direct, stats):
    try:
        d = await asyncio.wait_for(
            direct.request("POST", req["path"], req["body"], req["headers"]), 300)
    except (asyncio.TimeoutError, OSError) as e:
        direct.close()
        d = {"status": None, "headers": {}, "body": b"", "complete": False,
             "error": type(e).__name__}
    dkind = classify(d, req["stream"])
    stats.compared += 1
    ok = False
    if kind in ("complete", "error_event", "status"):
        ok = r["status"] == d["status"] and r["body"] == d["body"] and dkind == kind
    elif kind == "cut":
        # The upstream dropped the connection mid-stream: tokentap passes on what came, then cuts.
        # Either copy may be the shorter: when the simulator's abort fires late on a busy machine,
        # it can drop the last event it had not flushed yet, on either path.
        short, long_ = sorted((r["body"], d["body"]), key=len)
        ok = dkind == "cut" and d["status"] == r["status"] and long_.startswith(short)
        if ok and len(r["body"]) != len(d["body"]):
            stats.cut_elsewhere += 1
    elif kind == "no_response":
        ok = dkind == "no_response"
    # The upstream closed without any response: tokentap answers 502 itself.
    if not ok and r["status"] == 502 and dkind == "no_response":
        ok = True
    if ok:
        stats.compared_equal += 1
    else:
        entry = {"i": req["i"], "fault": req["fault"], "path": req["path"], "kind": kind,
                 "direct_kind": dkind, "status": r["status"], "direct_status": d["status"],
                 "error": r["error"], "len": len(r["body"]), "direct_len": len(d["body"]),
                 "body": r["body"][:300].decode("utf-8", "replace"),
                 "direct_body": d["body"][:300].decode("utf-8", "replace")}
        (stats.mismatches if r["status"] is not None else stats.lost).append(entry)


# ---------------------------------------------------------------------------------------------
# Attacks. Each loops until stop, checks what it got against docs/limits.md and records it.


OPEN = set()


async def connect(port):
    """Opens an attacker's connection, remembered so the end of the run can close it."""
    reader, writer = await asyncio.open_connection(HOST, port)
    if len(OPEN) > 500:
        for w in [w for w in OPEN if w.is_closing()]:
            OPEN.discard(w)
    OPEN.add(writer)
    return reader, writer


async def closed_within(reader, limit):
    """Reads until the peer closes; returns (seconds, bytes) or (None, bytes) past limit."""
    t0 = time.monotonic()
    data = bytearray()
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), limit - (time.monotonic() - t0))
            if not chunk:
                return time.monotonic() - t0, bytes(data)
            data += chunk
    except asyncio.TimeoutError:
        return None, bytes(data)
    except ConnectionError:
        return time.monotonic() - t0, bytes(data)


def status_of(data):
    try:
        return int(data.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


async def attack_loop(name, stop, fn, pause):
    while not stop.is_set():
        try:
            await fn()
        except Exception as e:  # an attack that breaks must not end the soak
            STATS.attack(name, False, f"exception {type(e).__name__}: {e}")
        try:
            await asyncio.wait_for(stop.wait(), pause)
        except asyncio.TimeoutError:
            pass


def within(t, limit):
    return t is not None and limit - 1 <= t <= limit + 5


async def silent(port, limit):
    reader, writer = await connect(port)
    t, data = await closed_within(reader, limit + 30)
    writer.close()
    STATS.attack("silent connection", within(t, limit) and data == b"", (t, data[:40]))


async def slow_head(port, limit):
    reader, writer = await connect(port)
    t0 = time.monotonic()
    head = b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 1000
    got = bytearray()
    for b in head:
        writer.write(bytes([b]))
        try:
            await writer.drain()
            chunk = await asyncio.wait_for(reader.read(4096), 5)
            if not chunk:
                break
            got += chunk
        except asyncio.TimeoutError:
            continue
        except ConnectionError:
            break
    t = time.monotonic() - t0
    writer.close()
    STATS.attack("head a byte every 5 s", within(t, limit) and status_of(bytes(got)) == 408,
                 (round(t), bytes(got[:20])))


async def idle_keepalive(port, limit):
    c = Conn(port)
    c.reader, c.writer = await connect(port)
    r = await c.request("GET", "/v1/models")
    if r["status"] != 200:
        STATS.attack("idle keep-alive", False, r["status"])
        c.close()
        return
    t, data = await closed_within(c.reader, limit + 30)
    c.close()
    STATS.attack("idle keep-alive", within(t, limit) and data == b"", (t, data[:40]))


async def stalled_body(port, limit, size, sent):
    reader, writer = await connect(port)
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                 f"application/json\r\ncontent-length: {size}\r\n\r\n".encode())
    writer.write(b'{"model":"' + MODEL.encode() + b'","messages":[{"role":"user","content":"'
                 + b"x" * sent)
    await writer.drain()
    t0 = time.monotonic()
    t, data = await closed_within(reader, limit + 30)
    writer.close()
    ok = t is not None and limit - 1 <= time.monotonic() - t0 <= limit + 5
    STATS.attack(f"{size >> 20} MiB body stalled after {sent >> 20} MiB",
                 ok and status_of(data) == 408, (t, data[:20]))


async def declared_too_big(port):
    reader, writer = await connect(port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                 b"application/json\r\ncontent-length: 40000000\r\n\r\n")
    await writer.drain()
    t, data = await closed_within(reader, 10)
    writer.close()
    STATS.attack("declared 40 MB body", status_of(data) == 413, (t, data[:20]))


async def big_head(port):
    reader, writer = await connect(port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 70000 + b"\r\n\r\n")
    try:
        await writer.drain()
    except ConnectionError:
        pass
    t, data = await closed_within(reader, 10)
    writer.close()
    STATS.attack("70 KiB head", status_of(data) == 431, (t, data[:20]))


async def not_reading(port, limit):
    """Asks the bad upstream's proxy for an endless stream and never reads: cut at the send
    timeout once the socket buffers are full."""
    reader, writer = await connect(port)
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                 b"application/json\r\nx-soak-mode: small\r\ncontent-length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    # Read the head only, then stop reading; the proxy must give up within its send timeout
    # (plus the time the buffers take to fill).
    await asyncio.sleep(limit + 40)
    writer.close()
    STATS.not_reading = getattr(STATS, "not_reading", 0) + 1


async def endless_event(port, mode, seconds):
    """Reads an endless stream from the bad upstream's proxy for `seconds`."""
    reader, writer = await connect(port)
    body = b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                 b"application/json\r\nx-soak-mode: " + mode.encode() + b"\r\ncontent-length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    await writer.drain()
    t0 = time.monotonic()
    n = 0
    try:
        while time.monotonic() - t0 < seconds:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            n += len(chunk)
    except (asyncio.TimeoutError, ConnectionError):
        pass
    writer.close()
    STATS.attack(f"endless SSE ({mode})", n > seconds * 100_000, f"{n} bytes")
    STATS.endless_bytes = getattr(STATS, "endless_bytes", 0) + n


# HTTP/2 by hand (prior knowledge, h2c): just enough frames for the attacks.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(
        ">I", stream) + payload


def hpack_literal(name, value):
    # Literal header field without indexing, new name, no Huffman.
    def s(x):
        assert len(x) < 127
        return bytes([len(x)]) + x
    return b"\x00" + s(name) + s(value)


def h2_headers(stream, end_stream, port):
    block = (hpack_literal(b":method", b"POST") + hpack_literal(b":scheme", b"http")
             + hpack_literal(b":path", b"/v1/chat/completions")
             + hpack_literal(b":authority", f"{HOST}:{port}".encode())
             + hpack_literal(b"content-type", b"application/json"))
    return h2_frame(1, 0x4 | (0x1 if end_stream else 0), stream, block)


async def h2_open(port):
    reader, writer = await connect(port)
    writer.write(H2_PREFACE + h2_frame(4, 0, 0, b""))
    await writer.drain()
    return reader, writer


async def h2_read_until_close(reader, writer, limit):
    """Reads frames, answering the server's SETTINGS and PINGs like a live client; returns
    (seconds to close, frame types seen)."""
    t0 = time.monotonic()
    buf = bytearray()
    kinds = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), limit - (time.monotonic() - t0))
            if not chunk:
                return time.monotonic() - t0, kinds
            buf += chunk
            while len(buf) >= 9:
                n = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + n:
                    break
                kind, flags = buf[3], buf[4]
                payload = bytes(buf[9:9 + n])
                del buf[:9 + n]
                kinds.append(kind)
                if kind == 4 and not flags & 1:
                    writer.write(h2_frame(4, 1, 0, b""))
                elif kind == 6 and not flags & 1:
                    writer.write(h2_frame(6, 1, 0, payload))
            await writer.drain()
    except asyncio.TimeoutError:
        return None, kinds
    except ConnectionError:
        return time.monotonic() - t0, kinds


async def h2_idle(port, limit):
    reader, writer = await h2_open(port)
    t, kinds = await h2_read_until_close(reader, writer, limit + 30)
    writer.close()
    STATS.attack("HTTP/2 connection without streams", within(t, limit) and 7 in kinds,
                 (t, kinds[-3:]))


async def h2_no_body(port, limit):
    reader, writer = await h2_open(port)
    writer.write(h2_headers(1, False, port))
    await writer.drain()
    t0 = time.monotonic()
    t, kinds = await h2_read_until_close(reader, writer, limit + 70)
    writer.close()
    # The stream gets its 408 (a HEADERS frame) at the body timeout; the connection then idles out.
    STATS.attack("HTTP/2 stream whose body never comes", 1 in kinds and t is not None,
                 (t, kinds[-5:], round(time.monotonic() - t0)))


async def h2_rapid_reset(port):
    reader, writer = await h2_open(port)
    frames = bytearray()
    for k in range(200):
        sid = 2 * k + 1
        frames += h2_headers(sid, False, port) + h2_frame(3, 0, sid, struct.pack(">I", 8))
    writer.write(bytes(frames))
    try:
        await writer.drain()
    except ConnectionError:
        pass
    t, kinds = await h2_read_until_close(reader, writer, 15)
    writer.close()
    # Either answer is fine as long as the proxy keeps serving (checked by the normal clients):
    # a GOAWAY, or streams reset and the connection kept.
    STATS.attack("HTTP/2 rapid reset x200", True, (t, kinds[-3:]))


# ---------------------------------------------------------------------------------------------
# The bad upstream: every POST gets a 200 event stream that never ends.


async def bad_upstream(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").lower().split("\r\n")
            n = 0
            mode = "event"
            for line in lines:
                if line.startswith("content-length:"):
                    n = int(line.split(":")[1])
                if line.startswith("x-soak-mode:"):
                    mode = line.split(":")[1].strip()
            if n:
                await reader.readexactly(n)
            if lines[0].startswith("get /v1/models"):
                body = b'{"object":"list","data":[{"id":"m","object":"model"}]}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            if mode == "small":
                piece = b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n' * 200
            else:
                writer.write(b"%x\r\n%s\r\n" % (6, b"data: "))
                piece = b"x" * 16384
            chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
            while True:  # ~512 KiB/s per stream
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(len(piece) / 524288)
    except (asyncio.IncompleteReadError, ConnectionError, ValueError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------


def write_config(path, text):
    with open(path, "w") as f:
        f.write(text)


def scrape(admin_port):
    try:
        s = socket.create_connection((HOST, admin_port), 5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = bytearray()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        s.close()
        return data.split(b"\r\n\r\n", 1)[1].decode("utf-8", "replace")
    except OSError:
        return ""


def metric_sums(text, names):
    """Sums of each metric by its interesting label (reason / outcome,status)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        for name in names:
            if line.startswith(name + "{") or line.startswith(name + " "):
                key = line.rsplit(" ", 1)[0]
                labels = {}
                if "{" in key:
                    for part in key[key.index("{") + 1:-1].split(","):
                        if "=" in part:
                            k, v = part.split("=", 1)
                            labels[k] = v.strip('"')
                sel = ",".join(f"{k}={labels[k]}" for k in ("reason", "outcome", "status")
                               if k in labels)
                d = out.setdefault(name, {})
                d[sel or "total"] = d.get(sel or "total", 0) + float(line.rsplit(" ", 1)[1])
    return out


STATS = Stats()


async def main_async(args, out, pids):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bad = await asyncio.start_server(bad_upstream, HOST, args.bad_port)

    samples = []
    names = ["tokentap", "tokentap-bad", "simulator"]
    t_start = time.monotonic()

    async def sampler():
        while True:
            row = {"t": round(time.monotonic() - t_start, 1)}
            for name in names:
                try:
                    row[f"{name}_rss"] = rss_bytes(pids[name])
                    row[f"{name}_fds"] = fd_count(pids[name])
                except OSError:
                    row[f"{name}_rss"] = row[f"{name}_fds"] = None
            row["sent"] = STATS.sent
            samples.append(row)
            if stop.is_set() and row.get("final"):
                return
            try:
                await asyncio.wait_for(stop.wait(), args.sample_secs)
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                return

    baseline = {n: (rss_bytes(pids[n]), fd_count(pids[n])) for n in names}
    cpu0 = {n: cpu_secs(pids[n]) for n in names}
    me0 = self_cpu_secs()
    sampler_task = asyncio.create_task(sampler())
    counter = [0]
    tasks = [asyncio.create_task(normal_client(c, args, STATS, stop, counter))
             for c in range(args.clients)]
    tt, bad_tt = args.tt_port, args.bad_tt_port
    lim = args.limits
    # Attackers: several copies of the cheap ones, so some always hold connections open.
    attackers = []
    attackers += [("silent", lambda: silent(tt, lim["header"]), 1)] * 20
    attackers += [("slow", lambda: slow_head(tt, lim["header"]), 1)] * 10
    attackers += [("idle", lambda: idle_keepalive(tt, lim["idle"]), 1)] * 10
    attackers += [("stalled", lambda: stalled_body(tt, lim["body"], 20 << 20, 4 << 20), 20)] * 2
    attackers += [("too big", lambda: declared_too_big(tt), 30)]
    attackers += [("big head", lambda: big_head(tt), 30)]
    attackers += [("h2 idle", lambda: h2_idle(tt, lim["idle"]), 5)] * 2
    attackers += [("h2 no body", lambda: h2_no_body(tt, lim["body"]), 5)] * 2
    attackers += [("h2 reset", lambda: h2_rapid_reset(tt), 60)]
    attackers += [("endless", lambda: endless_event(bad_tt, "event", 60), 30)]
    attackers += [("endless small", lambda: endless_event(bad_tt, "small", 60), 30)]
    attackers += [("not reading", lambda: not_reading(bad_tt, lim["send"]), 30)]
    for name, fn, pause in attackers:
        tasks.append(asyncio.create_task(attack_loop(name, stop, fn, pause)))

    try:
        await asyncio.wait_for(stop.wait(), args.seconds)
    except asyncio.TimeoutError:
        pass
    stop.set()
    t_end = time.monotonic() - t_start
    # Normal clients finish their request in flight; attackers are dropped where they are.
    normal, attack = tasks[:args.clients], tasks[args.clients:]
    for t in attack:
        t.cancel()
    for w in OPEN:
        w.close()
    await asyncio.wait(normal, timeout=330)
    for t in normal:
        t.cancel()
    await asyncio.sleep(0.5)
    await sampler_task
    cpu = {n: cpu_secs(pids[n]) - cpu0[n] for n in names}
    cpu["soak client"] = self_cpu_secs() - me0
    bad.close()

    # Give the proxies time to close what the attackers left (server side keeps a connection
    # until its timeout notices the close) and the upstream pool to drop idle connections.
    final_fds = {}
    deadline = time.monotonic() + args.drain_secs
    while True:
        final_fds = {n: fd_count(pids[n]) for n in names[:2]}
        if all(final_fds[n] <= baseline[n][1] for n in names[:2]) or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    metrics = scrape(args.tt_admin)
    bad_metrics = scrape(args.bad_tt_admin)
    return report(args, out, samples, baseline, final_fds, cpu, t_end, metrics, bad_metrics)


def rss_check(samples, name, warmup, secs):
    """No growth means the envelope does not rise: the highest and the lowest RSS of the last
    window are at most 10 % above those of the first window after warm-up (lower passes: the
    allocator handing memory back is not a leak). A window is a tenth of the rest
    of the run, at least 60 s, so it spans several rounds of the periodic attacks (a stalled body
    holds megabytes for 30 s at a time, which is not a leak)."""
    rows = [s for s in samples if s["t"] >= warmup and s.get(f"{name}_rss")]
    if len(rows) < 4:
        return {"pass": None, "note": "run too short for a warm-up"}
    rss = [s[f"{name}_rss"] for s in rows]
    step = (rows[-1]["t"] - rows[0]["t"]) / (len(rows) - 1)
    window = max(1, min(len(rss) // 2, int(max(60.0, (secs - warmup) / 10) / max(step, 0.1))))
    first, last = rss[:window], rss[-window:]
    hi = (max(last) - max(first)) / max(first)
    lo = (min(last) - min(first)) / min(first)
    mib = lambda x: round(x / 2**20, 1)  # noqa: E731
    return {"pass": hi <= 0.10 and lo <= 0.10, "window_samples": window,
            "first_window_mib": [mib(min(first)), mib(max(first))],
            "last_window_mib": [mib(min(last)), mib(max(last))],
            "drift_pct": [round(100 * lo, 1), round(100 * hi, 1)],
            "min_mib": mib(min(rss)), "max_mib": mib(max(rss)), "median_mib": mib(median(rss))}


def report(args, out, samples, baseline, final_fds, cpu, t_end, metrics, bad_metrics):
    warmup = max(60.0, 0.1 * args.seconds) if args.seconds >= 300 else 0.25 * args.seconds
    names = ["tokentap", "tokentap-bad"]
    res = {
        "seconds": round(t_end, 1),
        "clients": args.clients,
        "warmup_secs": warmup,
        "requests": STATS.sent,
        "outcomes": STATS.outcomes,
        "cancelled_by_client": STATS.cancelled,
        "compared_with_direct": STATS.compared,
        "compared_equal": STATS.compared_equal,
        "cuts_at_another_event": STATS.cut_elsewhere,
        "mismatches": STATS.mismatches[:20],
        "mismatch_count": len(STATS.mismatches),
        "lost": STATS.lost[:20],
        "lost_count": len(STATS.lost),
        "complete_latency_s": {"p50": pct(STATS.latencies, 50), "p99": pct(STATS.latencies, 99)},
        "attacks": STATS.attacks,
        "endless_sse_bytes_read": getattr(STATS, "endless_bytes", 0),
        "rss": {n: rss_check(samples, n, warmup, t_end) for n in names},
        "fds": {n: {"baseline": baseline[n][1], "final": final_fds.get(n),
                    "max": max((s.get(f"{n}_fds") or 0) for s in samples),
                    "pass": final_fds.get(n, 1 << 30) <= baseline[n][1]} for n in names},
        "baseline_rss_mib": {n: round(baseline[n][0] / 2**20, 1) for n in names},
        "cpu_cores": {n: round(v / max(t_end, 1), 3) for n, v in cpu.items()},
        "metrics": metric_sums(metrics, ["tokentap_connections_closed_total",
                                         "tokentap_requests_total",
                                         "tokentap_sse_oversized_events_total",
                                         "tokentap_accept_errors_total"]),
        "bad_metrics": metric_sums(bad_metrics, ["tokentap_connections_closed_total",
                                                 "tokentap_requests_total",
                                                 "tokentap_sse_oversized_events_total"]),
    }
    # The client that stops reading: the proxy in front of the bad upstream must have cut each
    # one at its send timeout.
    runs = getattr(STATS, "not_reading", 0)
    if runs:
        cut = res["bad_metrics"].get("tokentap_connections_closed_total", {}).get(
            "reason=send_timeout", 0)
        STATS.attacks["client stops reading"] = {
            "runs": runs, "as_documented": min(runs, int(cut)),
            "other": {} if cut >= runs else {"not cut at the send timeout": runs - int(cut)}}
    attacks_ok = all(a["as_documented"] == a["runs"] for a in STATS.attacks.values())
    checks = {
        "rss_no_growth": all(res["rss"][n]["pass"] is not False for n in names),
        "fds_back_to_baseline": all(res["fds"][n]["pass"] for n in names),
        "no_request_lost_or_altered": not STATS.lost and not STATS.mismatches
        and STATS.outcomes.get("no_response", 0) == 0 and STATS.sent > 0,
        "attacks_as_documented": attacks_ok,
    }
    res["checks"] = checks
    res["pass"] = all(checks.values())
    with open(os.path.join(out, "soak.json"), "w") as f:
        json.dump(res, f, indent=1)
    cols = ["t", "sent"] + [f"{n}_{k}" for n in ["tokentap", "tokentap-bad", "simulator"]
                             for k in ("rss", "fds")]
    with open(os.path.join(out, "samples.csv"), "w") as f:
        f.write(",".join(cols) + "\n")
        for s in samples:
            f.write(",".join(str(s.get(c, "")) for c in cols) + "\n")
    lines = [f"soak: {res['seconds']:.0f} s, {args.clients} clients, {STATS.sent} requests "
             f"({STATS.cancelled} cancelled by the client), outcomes {STATS.outcomes}",
             f"compared with direct: {STATS.compared_equal}/{STATS.compared} identical "
             f"({STATS.cut_elsewhere} cut at another point); "
             f"lost {len(STATS.lost)}, altered {len(STATS.mismatches)}",
             f"complete latency p50 {res['complete_latency_s']['p50']} s, "
             f"p99 {res['complete_latency_s']['p99']} s"]
    for n in names:
        r = res["rss"][n]
        fd = res["fds"][n]
        lines.append(f"{n}: RSS baseline {res['baseline_rss_mib'][n]} MiB, after warm-up "
                     f"{r.get('first_window_mib')} -> {r.get('last_window_mib')} MiB (low/high "
                     f"drift {r.get('drift_pct')} %, range {r.get('min_mib')}..{r.get('max_mib')}); "
                     f"fds {fd['baseline']} -> max {fd['max']} -> {fd['final']}")
    lines.append("cpu (cores): " + ", ".join(f"{k} {v}" for k, v in res["cpu_cores"].items()))
    for name, a in sorted(STATS.attacks.items()):
        lines.append(f"attack {name}: {a['as_documented']}/{a['runs']} as documented"
                     + (f", other: {a['other']}" if a["other"] else ""))
    lines.append("checks: " + ", ".join(f"{k} {'ok' if v else 'FAIL'}"
                                        for k, v in checks.items()))
    lines.append("PASS" if res["pass"] else "FAIL")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text)
    print(text, end="")
    return 0 if res["pass"] else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=3600)
    ap.add_argument("--clients", type=int, default=16, help="normal clients, one request at a time")
    ap.add_argument("--think", type=float, default=0.2, help="max pause between requests (s)")
    ap.add_argument("--sample-secs", type=float, default=5)
    ap.add_argument("--drain-secs", type=float, default=120)
    ap.add_argument("--bin", default=os.path.join(
        os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "tokentap"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out or os.path.join(ROOT, "bench", "results", f"soak-{stamp}")
    os.makedirs(out, exist_ok=True)
    args.sim_port, args.tt_port, args.tt_admin = free_port(), free_port(), free_port()
    args.bad_port, args.bad_tt_port, args.bad_tt_admin = free_port(), free_port(), free_port()
    # The defaults of docs/limits.md, which the attacks check against.
    args.limits = {"header": 30, "idle": 60, "body": 30, "send": 60}

    write_config(os.path.join(out, "sim.toml"), f"""seed = 7
models = ["{MODEL}"]
[timing]
ttft_base_ms = 25.0
itl_ms = 20.0
jitter = 0.1
[output]
min_tokens = 8
max_tokens = 96
[faults]
rate_429 = 0.01
rate_500 = 0.005
rate_503 = 0.005
rate_error = 0.01
rate_disconnect = 0.01
rate_stall = 0.02
stall_ms = 1500
rate_header_delay = 0.01
header_delay_ms = 500
""")

    def tt_conf(name, port, admin, upstream):
        write_config(os.path.join(out, f"{name}.toml"), f"""listen = "{HOST}:{port}"
admin_listen = "{HOST}:{admin}"
[upstream]
url = "http://{HOST}:{upstream}"
pool_idle_timeout_secs = 10.0
[telemetry]
models = ["{MODEL}"]
access_log = false
""")
        return os.path.join(out, f"{name}.toml")

    procs = []

    def start(name, argv):
        log = open(os.path.join(out, f"{name}.log"), "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    try:
        sim = start("simulator", [args.bin, "simulate", "--config",
                                  os.path.join(out, "sim.toml"), "--listen",
                                  f"{HOST}:{args.sim_port}"])
        tt = start("tokentap", [args.bin, "serve", "--config",
                                tt_conf("tokentap", args.tt_port, args.tt_admin, args.sim_port)])
        bad = start("tokentap-bad", [args.bin, "serve", "--config",
                                     tt_conf("tokentap-bad", args.bad_tt_port, args.bad_tt_admin,
                                             args.bad_port)])
        for port in (args.sim_port, args.tt_port, args.bad_tt_port):
            wait_port(port)
        time.sleep(1)
        pids = {"simulator": sim.pid, "tokentap": tt.pid, "tokentap-bad": bad.pid}
        rc = asyncio.run(main_async(args, out, pids))
        for name, p in (("simulator", sim), ("tokentap", tt), ("tokentap-bad", bad)):
            if p.poll() is not None:
                print(f"{name} exited early with {p.returncode}", file=sys.stderr)
                rc = 1
        if args.out is None:  # a run of its own, not a test's
            latest = os.path.join(ROOT, "bench", "results", "soak-latest")
            if os.path.islink(latest):
                os.unlink(latest)
            if not os.path.exists(latest):
                os.symlink(out, latest)
        sys.exit(rc)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":
    main()
