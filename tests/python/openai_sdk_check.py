#!/usr/bin/env python3
"""Checks that the OpenAI Python SDK consumes a tokentap simulator (or any vLLM-compatible
server) without errors: chat and completions, streaming (with and without include_usage,
n=2) and not, plus /v1/models and embeddings.

Usage: python3 tests/python/openai_sdk_check.py http://127.0.0.1:8000/v1
Exits non-zero on the first failed check.
"""

import sys

import openai


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def main():
    if len(sys.argv) != 2:
        fail("usage: openai_sdk_check.py BASE_URL (e.g. http://127.0.0.1:8000/v1)")
    client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=30)

    models = client.models.list()
    model = models.data[0].id
    check(model, "no model listed")
    print(f"ok models: {[m.id for m in models.data]}")
    messages = [{"role": "user", "content": "Say something."}]

    # Chat, non-streaming.
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
    check(r.object == "chat.completion", f"object {r.object}")
    check(r.id.startswith("chatcmpl-"), f"id {r.id}")
    check(r.choices[0].message.role == "assistant", "role")
    check(r.choices[0].message.content, "empty content")
    check(r.choices[0].finish_reason == "length", f"finish {r.choices[0].finish_reason}")
    check(r.usage.completion_tokens == 8, f"usage {r.usage}")
    check(r.usage.total_tokens == r.usage.prompt_tokens + 8, f"usage {r.usage}")
    print("ok chat")

    # Chat, streaming, without usage.
    chunks = list(client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, stream=True))
    check(chunks[0].choices[0].delta.role == "assistant", "first delta has no role")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(text, "empty streamed text")
    check(all(c.usage is None for c in chunks), "usage without include_usage")
    check(chunks[-1].choices[0].finish_reason == "length", "no finish_reason")
    print(f"ok chat stream: {len(chunks)} chunks, {text!r}")

    # Chat, streaming, with usage.
    chunks = list(client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, stream=True,
        stream_options={"include_usage": True}))
    last = chunks[-1]
    check(last.choices == [], "usage chunk has choices")
    check(last.usage is not None and last.usage.completion_tokens == 6, f"usage {last.usage}")
    print("ok chat stream with usage")

    # Chat, streaming, n=2 (with continuous usage, a vLLM extension passed as extra body).
    chunks = list(client.chat.completions.create(
        model=model, messages=messages, max_tokens=4, stream=True, n=2,
        extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}}))
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    check(texts[0] and texts[1], f"n=2 texts {texts}")
    check(finishes == {0: "length", 1: "length"}, f"n=2 finishes {finishes}")
    check(chunks[-1].usage.completion_tokens == 8, f"n=2 usage {chunks[-1].usage}")
    print("ok chat stream n=2")

    # Completions, non-streaming and streaming.
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5)
    check(r.object == "text_completion", f"object {r.object}")
    check(r.choices[0].text, "empty completion")
    check(r.usage.completion_tokens == 5, f"usage {r.usage}")
    print("ok completions")
    for include_usage in (False, True):
        kwargs = {"stream_options": {"include_usage": True}} if include_usage else {}
        chunks = list(client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=5, stream=True, **kwargs))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        check(text, "empty streamed completion")
        if include_usage:
            check(chunks[-1].usage.completion_tokens == 5, f"usage {chunks[-1].usage}")
        else:
            check(all(c.usage is None for c in chunks), "usage without include_usage")
    chunks = list(client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=3, stream=True, n=2))
    check({c.choices[0].index for c in chunks} == {0, 1}, "completions n=2 indices")
    print("ok completions stream")

    # Embeddings (the SDK asks for base64 and decodes it).
    e = client.embeddings.create(model=model, input=["hello", "world"])
    check(len(e.data) == 2 and len(e.data[0].embedding) > 0, "embeddings")
    print(f"ok embeddings: dim {len(e.data[0].embedding)}")

    # Errors arrive as the SDK's exceptions.
    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        fail("unknown model accepted")
    except openai.NotFoundError:
        pass
    try:
        client.chat.completions.create(
            model=model, messages=messages,
            extra_headers={"x-tokentap-sim-fault": "status=429"})
        fail("status fault not raised")
    except openai.RateLimitError:
        pass
    print("ok errors")
    print("all checks passed")


if __name__ == "__main__":
    main()
