#!/usr/bin/env python3
"""A small streaming client that measures one request at a time as docs/METRICS.md sections 1
and 2 define it, written from that page alone (standard library only), so that a bug shared by
the proxy and `tokentap bench` (which share their SSE code) does not agree with itself here.

Usage:
  stream_client.py vectors FILE
      Reads a vectors file (tests/vectors/vllm-bench-0.33.json) and prints, as one JSON object,
      for each chat and completions vector: the indices of its output events, the event TTFT
      is taken at, the ITL pairs, the event E2EL is taken at and the output tokens.
  stream_client.py run BASE_URL MODEL N MAX_TOKENS
      Sends N streaming chat requests one after another to BASE_URL (http://host:port), each
      with `x-request-id: py-<i>`, and prints one JSON line per request with its figures in
      milliseconds.
"""

import http.client
import json
import sys
import time
import urllib.parse

OUTPUT_FIELDS = ("content", "reasoning", "reasoning_content", "tool_calls", "function_call")


def carries(value):
    """A JSON value that carries something: not null, "", [] or {}."""
    return value is not None and value != "" and value != [] and value != {}


def choice_is_output(choice):
    """Section 1: whether one choice of an event streamed output."""
    if not isinstance(choice, dict):
        return False
    if "delta" not in choice:
        # Completions: every choice counts, empty text included.
        return True
    delta = choice["delta"]
    if not isinstance(delta, dict):
        return False
    if any(carries(delta.get(k)) for k in OUTPUT_FIELDS):
        return True
    # A special token that decodes to nothing; the opening role chunk is not one.
    return delta.get("content") == "" and delta.get("role") is None


def output_indices(data):
    """The choice indices that streamed output in one parsed event (empty when none)."""
    if not isinstance(data, dict) or isinstance(data.get("error"), dict):
        return []
    choices = data.get("choices")
    if not isinstance(choices, list):
        return []
    out = []
    for choice in choices:
        if choice_is_output(choice):
            index = choice.get("index", 0) if isinstance(choice, dict) else 0
            out.append(index if isinstance(index, int) else 0)
    return out


def completion_tokens(data):
    """usage.completion_tokens of an event, when it has one."""
    if isinstance(data, dict) and isinstance(data.get("usage"), dict):
        n = data["usage"].get("completion_tokens")
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


class Measure:
    """TTFT, ITL per choice and E2EL over events stamped with their times (section 2)."""

    def __init__(self, t0):
        self.t0 = t0
        self.first = None
        self.last = None
        self.last_by_choice = {}
        self.itl = []
        self.itl_pairs = []
        self.output_events = []
        self.usage_tokens = None

    def event(self, position, data, now):
        indices = output_indices(data)
        if indices:
            self.output_events.append(position)
            if self.first is None:
                self.first = (position, now)
            for index in indices:
                previous = self.last_by_choice.get(index)
                if previous is not None:
                    self.itl.append(now - previous[1])
                    self.itl_pairs.append([previous[0], position])
                self.last_by_choice[index] = (position, now)
            self.last = (position, now)
        tokens = completion_tokens(data)
        if tokens is not None:
            self.usage_tokens = tokens

    def output_tokens(self):
        if self.usage_tokens is not None:
            return self.usage_tokens
        return len(self.output_events)


def parse_data(payload):
    try:
        return json.loads(payload)
    except ValueError:
        return None


def vectors(path):
    with open(path, encoding="utf-8") as f:
        file = json.load(f)
    result = {}
    for v in file["vectors"]:
        if v["endpoint"] not in ("chat", "completions"):
            continue
        m = Measure(0.0)
        for i, event in enumerate(v["events"]):
            if event.startswith(":"):
                continue
            payload = event[len("data:"):].lstrip(" ") if event.startswith("data:") else event
            m.event(i, parse_data(payload), float(i))
        result[v["name"]] = {
            "output_events": m.output_events,
            "ttft_event": m.first[0] if m.first else None,
            "itl_pairs": m.itl_pairs,
            "e2el_event": m.last[0] if m.last else None,
            "output_tokens": m.output_tokens(),
        }
    print(json.dumps(result, sort_keys=True))


def events(response):
    """Yields each SSE event's data (its data lines joined with \\n) as its blank line arrives."""
    lines = []
    has_data = False
    while True:
        raw = response.readline()
        if not raw:
            return
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line == "":
            if has_data:
                yield "\n".join(lines)
            lines, has_data = [], False
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "data":
            lines.append(value)
            has_data = True


def run(base_url, model, n, max_tokens):
    url = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=60)
    for i in range(n):
        body = json.dumps({
            "model": model,
            "messages": [{"role": "user", "content": "Count to %d" % max_tokens}],
            "max_tokens": max_tokens,
            "stream": True,
        })
        request_id = "py-%d" % i
        headers = {"Content-Type": "application/json", "x-request-id": request_id}
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = conn.getresponse()
        if response.status != 200:
            print(json.dumps({"request_id": request_id, "error": response.status}))
            response.read()
            continue
        m = Measure(t0)
        for position, payload in enumerate(events(response)):
            now = time.perf_counter()
            if payload.strip() == "[DONE]":
                break
            m.event(position, parse_data(payload), now)
        response.read()
        ms = lambda s: s * 1000.0
        print(json.dumps({
            "request_id": request_id,
            "ttft_ms": ms(m.first[1] - t0) if m.first else None,
            "e2el_ms": ms(m.last[1] - t0) if m.last else None,
            "itl_count": len(m.itl),
            "itl_ms": [ms(x) for x in m.itl],
            "output_tokens": m.output_tokens(),
        }), flush=True)
    conn.close()


def main(argv):
    if len(argv) == 3 and argv[1] == "vectors":
        vectors(argv[2])
    elif len(argv) == 6 and argv[1] == "run":
        run(argv[2], argv[3], int(argv[4]), int(argv[5]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
