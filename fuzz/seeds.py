#!/usr/bin/env python3
"""Writes the seed corpora in corpus/<target>/seed-*: vLLM-style streams and request bodies,
the smuggling cases of tests/smuggling.rs, and response heads. Inputs a fuzzer found
(regress-*) are kept. Run from anywhere: python3 fuzz/seeds.py"""
import ast
import json
import os
import re
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def hdr(b0, seed):
    return bytes([b0]) + struct.pack("<H", seed)


# --- vLLM-style streams -------------------------------------------------------------------
ID = "chatcmpl-8f1c2a9e0b7d4e3fa1c25e6d7b8a9c0d"
MODEL = "Qwen/Qwen2.5-7B-Instruct"


def chunk(delta, finish=None, usage=None, index=0, obj="chat.completion.chunk", cid=ID):
    c = {"id": cid, "object": obj, "created": 1735689600, "model": MODEL,
         "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if usage is not None:
        c["usage"] = usage
    return c


def ev(obj, eol="\n"):
    s = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {s}{eol}{eol}"


USAGE = {"prompt_tokens": 12, "total_tokens": 20, "completion_tokens": 8}
usage_ev = {"id": ID, "object": "chat.completion.chunk", "created": 1735689600, "model": MODEL,
            "choices": [], "usage": USAGE}
words = [" Hello", ",", " world", "!", " \u00e9t\u00e9", " \"quoted\"", "\n", " \U0001F600"]

streams = {}
s = ev(chunk({"role": "assistant", "content": ""}))
for w in words:
    s += ev(chunk({"content": w}))
s += ev(chunk({"content": ""}, finish="stop")) + ev(usage_ev) + ev("[DONE]")
streams["chat-usage"] = s
streams["chat-no-usage"] = s.replace(ev(usage_ev), "")
streams["chat-crlf"] = "".join(ev(chunk({"content": w}), "\r\n") for w in words[:4]) + ev(usage_ev, "\r\n") + ev("[DONE]", "\r\n")
streams["chat-cr"] = "".join(ev(chunk({"content": w}), "\r") for w in words[:3]) + ev(usage_ev, "\r")
streams["continuous-usage"] = "".join(
    ev(chunk({"content": w}, usage={"prompt_tokens": 5, "total_tokens": 5 + i, "completion_tokens": i}))
    for i, w in enumerate(words[:5], 1)) + ev(usage_ev) + ev("[DONE]")
streams["reasoning"] = (ev(chunk({"role": "assistant", "reasoning_content": "think"}))
                        + ev(chunk({"reasoning_content": " more"})) + ev(chunk({"reasoning": "r"}))
                        + ev(chunk({"content": "answer"}, finish="length")) + ev(usage_ev) + ev("[DONE]"))
streams["tool-calls"] = (ev(chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                   "function": {"name": "f", "arguments": ""}}]}))
                         + ev(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\":1}"}}]}))
                         + ev(chunk({}, finish="tool_calls")) + ev(usage_ev) + ev("[DONE]"))
streams["n2"] = "".join(ev(chunk({"content": w}, index=i % 2)) for i, w in enumerate(words)) + ev(usage_ev) + ev("[DONE]")
streams["completions"] = "".join(
    ev({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "text": w, "logprobs": None, "finish_reason": None}]}) for w in words[:5]
) + ev({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [], "usage": USAGE}) + ev("[DONE]")
streams["error-midstream"] = ev(chunk({"content": "a"})) + ev(
    {"error": {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}}) + ev("[DONE]")
streams["comments-fields"] = (": keep-alive\n\nevent: message\nid: 7\nretry: 100\n" + ev(chunk({"content": "x"}))
                              + "data\n\ndata:no-space\n\n: c\n" + ev(usage_ev))
streams["multiline-data"] = "data: {\"choices\":\ndata: [{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n" + ev(usage_ev)
streams["escaped-id"] = (
    'data: {"id":"chatcmpl-\\u0031","model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n' + ev(usage_ev))
streams["blank-lines-before-usage"] = ev(chunk({"content": "a"})) + "\n\n\n" + ev(usage_ev) + ev("[DONE]")
streams["usage-null-fields"] = ev(chunk({"content": "a"})) + ev({"choices": [], "usage": None}) + ev(
    {"choices": None, "usage": {"prompt_tokens": None}}) + ev({"usage": {"completion_tokens": 3}})
streams["not-json"] = "data: hello\n\ndata: {broken\n\ndata: [DONE] \n\ndata: 12\n\n" + ev(usage_ev)
streams["incomplete-end"] = ev(chunk({"content": "a"})) + ev(usage_ev) + "data: {\"choices\":[]"
streams["template-drift"] = (ev(chunk({"content": "a"})) + ev(chunk({"content": ""})) + ev(chunk({"content": "b\\"}))
                             + ev(chunk({"content": "c"}, finish="stop")) + ev(chunk({"content": "d"}, cid="other")) + ev(usage_ev))

for i, (name, s) in enumerate(sorted(streams.items())):
    b = s.encode()
    for sel, tag in [(0, "default"), (3, "cap64")]:
        write("sse", f"{name}-{tag}", hdr(sel, 0x1234 + i) + b)
        write("usage_cut", f"{name}-{tag}", hdr(sel, 0x4321 + i) + b)
# Oversized events against small caps.
big = ev(chunk({"content": "x" * 300}))
write("sse", "oversized-cap16", hdr(1, 7) + (big + ev(usage_ev) + "data: " + "y" * 200).encode())
write("usage_cut", "oversized-cap16", hdr(1, 7) + (big + ev(usage_ev) + ev("[DONE]")).encode())
write("usage_cut", "oversized-usage-cap32", hdr(2, 9) + (ev(chunk({"content": "a"})) + ev(usage_ev) + ev("[DONE]")).encode())

# --- JSON payloads -------------------------------------------------------------------------
payloads = []
for s in streams.values():
    for line in s.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line.startswith("data: {"):
            payloads.append(line[6:])
payloads = list(dict.fromkeys(payloads))
for i, p in enumerate(payloads[:40]):
    write("json_scan", f"one-{i:02}", b"\x00" + p.encode())
extra = [
    '{"choices":[{"index":4294967296,"delta":{"content":"a"}}]}',
    '{"choices":[],"usage":{"prompt_tokens":1.0,"completion_tokens":2}}',
    '{"choices":[],"choices":[{"delta":{"content":"a"}}]}',
    '{"ch\\u006fices":[{"delta":{"content":"a"}}]}',
    '{"error":null,"choices":[{"text":"x"}]}',
    '{"error":{},"choices":[{"text":"x"}]}',
    '{"id":"a\\"b","model":"\\u00e9","choices":[{"delta":{"content":"\\ud83d\\ude00"}}]}',
    '{"choices":[{"delta":{"content":"\\ud800"}}]}',
    '{"choices":[{"finish_reason":"stop","delta":null}],"usage":{}}',
    '{"choices":[' + "[" * 70 + "]" * 70 + ']}',
    '{"usage":{"prompt_tokens":18446744073709551616}}',
    '{"usage":{"prompt_tokens":-1}}',
    '{"choices":[{"delta":{"content":"a"}}]} x',
    '{"choices":[{"delta":{"content":"a"}}],}',
]
for i, p in enumerate(extra):
    write("json_scan", f"edge-{i:02}", b"\x00" + p.encode())
chat = [l[6:] for l in streams["chat-usage"].split("\n") if l.startswith("data: {")]
write("json_scan", "stream-chat", b"\x01" + b"\xff".join(p.encode() for p in chat))
comp = [l[6:] for l in streams["completions"].split("\n") if l.startswith("data: {")]
write("json_scan", "stream-completions", b"\x01" + b"\xff".join(p.encode() for p in comp))
drift = [l[6:] for l in streams["template-drift"].split("\n") if l.startswith("data: {")]
write("json_scan", "stream-drift", b"\x01" + b"\xff".join(p.encode() for p in drift))

# --- Requests ------------------------------------------------------------------------------
def rust_bytes(lit):
    """The bytes of a Rust b"..." literal's body."""
    out = bytearray()
    i = 0
    while i < len(lit):
        c = lit[i]
        if c == "\\":
            n = lit[i + 1]
            if n == "x":
                out.append(int(lit[i + 2:i + 4], 16)); i += 4; continue
            if n == "\n":
                i += 2
                while i < len(lit) and lit[i] in " \t\n":
                    i += 1
                continue
            out += {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\0", "\\": b"\\", '"': b'"', "'": b"'"}[n]
            i += 2
            continue
        out += c.encode()
        i += 1
    return bytes(out)


src = open(os.path.join(HERE, "..", "tests", "smuggling.rs")).read()
cases = []
for m in re.finditer(r'b"((?:[^"\\]|\\.)*)"', src, re.S):
    b = rust_bytes(m.group(1))
    if re.match(rb"^[A-Z]+ \S+ HTTP/", b) and b"\r\n\r\n" in b:
        cases.append(b)
cases = list(dict.fromkeys(cases))
# A few dozen, spread over the file's sections.
cases = cases[:: max(1, len(cases) // 48)]
for i, b in enumerate(cases):
    write("request", f"smuggling-{i:02}", bytes([i % 3]) + b)
bodies = [
    '{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}',
    '{"model":"m","messages":[],"stream":true,"stream_options":{"continuous_usage_stats":false}}',
    '{"model":"m","stream":true,"stream_options":null,"max_tokens":16,"n":2}',
    ' {\n "model" : "m\\u00e9" , "stream" : true } ',
    '{"stream":true}',
    '{}',
    '{"model":"m","prompt":"once","stream":true,"max_completion_tokens":7}',
    '{"stream":true,"stream_options":{"include_usage":false},"stream_options":null}',
]
for i, body in enumerate(bodies):
    b = body.encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(b)}\r\n\r\n".encode()
    write("request", f"chat-{i:02}", bytes([1]) + head + b)
    write("request", f"body-only-{i:02}", bytes([2]) + b)
    # Chunked request bodies, as the proxy writes them, for the decoder too.
    enc = f"{len(b):X}\r\n".encode() + b + b"\r\n0\r\n\r\n"
    write("chunked", f"request-body-{i:02}", hdr(0, 0x100 + i) + enc)
    write("chunked", f"encode-{i:02}", hdr(1, 0x200 + i) + b)

# --- Chunked bodies ------------------------------------------------------------------------
chunked = {
    "simple": b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    "trailers": b"5\r\nhello\r\n0\r\nX-T: 1\r\nY: two\r\n\r\n",
    "ext": b"5;name=value\r\nhello\r\n0;x\r\n\r\n",
    "ws-after-size": b"5 \t\r\nhello\r\n0\r\n\r\n",
    "upper-hex": b"A\r\n0123456789\r\n0\r\n\r\nextra",
    "bare-lf": b"5\nhello\r\n0\r\n\r\n",
    "missing-crlf": b"5\r\nhelloXX0\r\n\r\n",
    "overflow": b"10000000000000000\r\nx\r\n",
    "negative": b"-5\r\nhello\r\n0\r\n\r\n",
    "long-size": b"0" * 5000 + b"5\r\nhello\r\n0\r\n\r\n",
    "cr-in-ext": b"5;a\rb\r\nhello\r\n0\r\n\r\n",
    "sse-chunks": b"".join(f"{len(x):x}\r\n".encode() + x + b"\r\n" for x in [ev(chunk({"content": w})).encode() for w in words[:3]]) + b"0\r\n\r\n",
    "pipelined-after": b"3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
    "partial": b"5\r\nhel",
}
for i, (name, b) in enumerate(chunked.items()):
    write("chunked", name, hdr(0, 0x300 + i) + b)
write("chunked", "length", hdr(4, 12) + b"hello world, and more")
write("chunked", "close", hdr(6, 1) + b"anything until the end")
write("chunked", "encode-big", hdr(1, 0xffff) + bytes(range(256)) * 4)

# --- Response heads ------------------------------------------------------------------------
heads = {
    "sse": b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + chunked["sse-chunks"],
    "json-cl": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    "te-and-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "cl-dup-same": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "cl-dup-differ": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "cl-list": b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
    "te-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxxxx",
    "te-chunked-gzip": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nxxxx",
    "http10-te": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "http10-keepalive": b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
    "close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody until close",
    "no-length": b"HTTP/1.1 200 OK\r\n\r\nbody until close",
    "204": b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
    "304": b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
    "100-then-200": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    "101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    "reason": b"HTTP/1.1 429 Slow Down Please\r\ncontent-length: 0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 1\n\nx",
    "status-999": b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n",
    "status-600": b"HTTP/1.1 600 Odd\r\n\r\n",
    "nul-value": b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 0\r\n\r\n",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello",
    "cl-plus": b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    "cl-huge": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
    "many-headers": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(40)) + b"Content-Length: 0\r\n\r\n",
    "too-many-headers": b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(120)) + b"\r\n",
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}
for i, (name, b) in enumerate(heads.items()):
    write("response_head", name, bytes([i % 5]) + b)
write("response_head", "head-method-te", bytes([2]) + heads["sse"])
write("response_head", "connect-200", bytes([3]) + b"HTTP/1.1 200 Connection Established\r\n\r\n")

# --- The Responses and Messages APIs -------------------------------------------------------
def named(name, obj, eol="\n"):
    s = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"event: {name}{eol}data: {s}{eol}{eol}"


def resp_ev(kind, seq, **fields):
    return named(kind, {"type": kind, "sequence_number": seq, **fields})


def response(status, output, usage=None, incomplete=None):
    return {"id": "resp_8f1c2a9e0b7d4e3f", "object": "response", "created_at": 1735689600,
            "model": MODEL, "status": status, "incomplete_details": incomplete,
            "output": output, "usage": usage}


R_USAGE = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 8}, "output_tokens": 9,
           "output_tokens_details": {"reasoning_tokens": 4}, "total_tokens": 21}


def resp_stream(parts, status="completed", incomplete=None, tool=False):
    s = resp_ev("response.created", 0, response=response("in_progress", []))
    s += resp_ev("response.in_progress", 1, response=response("in_progress", []))
    seq, out = 2, []
    for i, (kind, deltas) in enumerate(parts):
        item = {"reasoning_text": "reasoning", "output_text": "message",
                "function_call_arguments": "function_call"}[kind]
        s += resp_ev("response.output_item.added", seq, output_index=i,
                     item={"id": f"it_{i}", "type": item, "status": "in_progress"})
        seq += 1
        for d in deltas:
            s += resp_ev(f"response.{kind}.delta", seq, item_id=f"it_{i}", output_index=i,
                         content_index=0, delta=d)
            seq += 1
        s += resp_ev(f"response.{kind}.done", seq, item_id=f"it_{i}", output_index=i,
                     text="".join(deltas))
        seq += 1
        out.append({"id": f"it_{i}", "type": item, "status": "completed"})
    end = "response.completed" if status == "completed" else "response.incomplete"
    s += resp_ev(end, seq, response=response(status, out, R_USAGE, incomplete))
    return s


rstreams = {
    "text": resp_stream([("output_text", words)]),
    "reasoning-text": resp_stream([("reasoning_text", ["Hmm", ", so"]), ("output_text", words[:4])]),
    "tool-call": resp_stream([("function_call_arguments", ['{"city":', ' "Paris"}'])]),
    "max-output-tokens": resp_stream([("output_text", words[:3])], "incomplete",
                                     {"reason": "max_output_tokens"}),
    "content-filter": resp_stream([("output_text", words[:2])], "incomplete",
                                  {"reason": "content_filter"}),
    "error": resp_stream([("output_text", words[:2])]).split("event: response.output_text.done")[0]
    + named("error", {"type": "error", "code": "server_error", "message": "engine died"}),
    "failed": resp_ev("response.created", 0, response=response("in_progress", []))
    + resp_ev("response.failed", 1, response=response("failed", [])),
    "crlf": resp_stream([("output_text", words[:3])]).replace("\n", "\r\n"),
    "done-marker": resp_stream([("output_text", words[:2])]) + ev("[DONE]"),
    "pings-and-comments": ": keep-alive\n\n" + resp_stream([("output_text", words[:2])]),
    "malformed": named("response.output_text.delta", '{"type":"response.output_text.delta","delta":')
    + named("response.output_text.delta", '{"type":7,"delta":"a"}')
    + named("response.completed", '{"type":"response.completed","response":[1,2],"usage":{"input_tokens":"x"}}')
    + named("response.completed", '{"type":"response.completed","response":{"status":"completed","output":{"type":"function_call"},"usage":[5,6]}}'),
}
rstreams["cut"] = rstreams["reasoning-text"][: len(rstreams["reasoning-text"]) * 2 // 3]

MSG_ID = "msg_8f1c2a9e0b7d4e3fa1c25e6d"


def msg_ev(kind, **fields):
    return named(kind, {"type": kind, **fields})


def msg_stream(blocks, stop="end_turn", usage=None):
    s = msg_ev("message_start", message={"id": MSG_ID, "type": "message", "role": "assistant",
                                         "content": [], "model": MODEL, "stop_reason": None,
                                         "stop_sequence": None,
                                         "usage": usage or {"input_tokens": 12, "output_tokens": 0}})
    s += msg_ev("ping")
    for i, (kind, deltas) in enumerate(blocks):
        block, delta, field = {
            "thinking": ({"type": "thinking", "thinking": ""}, "thinking_delta", "thinking"),
            "text": ({"type": "text", "text": ""}, "text_delta", "text"),
            "tool_use": ({"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
                         "input_json_delta", "partial_json"),
        }[kind]
        s += msg_ev("content_block_start", index=i, content_block=block)
        for d in deltas:
            s += msg_ev("content_block_delta", index=i, delta={"type": delta, field: d})
        if kind == "thinking":
            s += msg_ev("content_block_delta", index=i,
                        delta={"type": "signature_delta", "signature": "9f1c2a"})
        s += msg_ev("content_block_stop", index=i)
    s += msg_ev("message_delta", delta={"stop_reason": stop, "stop_sequence": None},
                usage={"input_tokens": 12, "output_tokens": 9})
    s += msg_ev("message_stop")
    return s


mstreams = {
    "text": msg_stream([("text", words)]),
    "thinking-text": msg_stream([("thinking", ["Let", " me"]), ("text", words[:4])]),
    "tool-use": msg_stream([("tool_use", ["", '{"city":', ' "Paris"}'])], "tool_use"),
    "max-tokens": msg_stream([("text", words[:3])], "max_tokens"),
    "stop-sequence": msg_stream([("text", words[:3])], "stop_sequence"),
    "cache-usage": msg_stream([("text", words[:2])], "end_turn",
                              {"input_tokens": 5, "cache_read_input_tokens": 100,
                               "cache_creation_input_tokens": 20, "output_tokens": 1}),
    "error": msg_stream([("text", words[:2])]).split("event: content_block_stop")[0]
    + msg_ev("error", error={"type": "overloaded_error", "message": "Overloaded"}),
    "crlf": msg_stream([("text", words[:3])]).replace("\n", "\r\n"),
    "unknown-stop": msg_stream([("text", words[:2])], "x-new-reason"),
    "malformed": named("content_block_delta", '{"type":"content_block_delta","delta":{"type":"text_delta"')
    + named("content_block_delta", '{"type":"content_block_delta","delta":["text_delta","a"]}')
    + named("message_delta", '{"type":"message_delta","delta":{"stop_reason":7},"usage":[1,2,3,4]}')
    + named("message_start", '{"type":"message_start","message":{"usage":{"input_tokens":18446744073709551615,"cache_read_input_tokens":5}}}'),
}
mstreams["cut"] = mstreams["thinking-text"][: len(mstreams["thinking-text"]) * 2 // 3]

for target, table in (("responses", rstreams), ("messages", mstreams)):
    for i, (name, text) in enumerate(table.items()):
        b = text.encode()
        # Whole events at the default cap, and a small cap that passes big events over.
        write(target, f"{name}", hdr(0, 0x2345 + i) + b)
        if i % 3 == 0:
            write(target, f"{name}-cap64", hdr(3, 0x5432 + i) + b)

print({t: len(os.listdir(os.path.join(CORPUS, t))) for t in sorted(os.listdir(CORPUS))})
