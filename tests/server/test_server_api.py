"""OpenAI-client round trips: completions and chat, streaming vs not, usage, n, stop, logprobs, concurrency.

Tests marked `any_engine` only rely on engine-independent facts (greedy streamed == non-streamed, usage sums,
shapes), so they also run against the real engine with YAIE_SERVER_TEST_ENGINE=real; the others check exact
texts of the fake "echo" model.
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fake_engine import greedy_echo

HTTP = httpx.Client(timeout=30)   # shared: building a client per call costs ~0.3 s

any_engine = pytest.mark.any_engine


def chat_prompt(messages) -> str:
    # the fallback template of yaie_jax.tokenizer.apply_chat_template (the fake tokenizer has no template)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"


def sse_events(resp: httpx.Response):
    """Parse an SSE body into a list of JSON objects, with the literal "[DONE]" kept as a string."""
    events = []
    for line in resp.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        payload = line[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


# ------------------------------------------------------------------------------------------ basics
def test_models_health_version(any_server):
    c = any_server.client()
    models = c.models.list().data
    assert [m.id for m in models] == [any_server.model]
    assert c.models.retrieve(any_server.model).id == any_server.model
    h = any_server.health()
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "ok" and body["engine_loop_alive"] is True
    for key in ("active_requests", "queue_length", "device_memory", "num_running", "num_waiting"):
        assert key in body
    assert HTTP.get(any_server.url + "/version").json()["version"]


def test_completion_text_and_usage(server):
    c = server.client()
    prompt = "hello world"
    r = c.completions.create(model=server.model, prompt=prompt, max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == greedy_echo(prompt, 5) == "hello"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt.encode())
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_chat_text_and_usage(server):
    c = server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = c.chat.completions.create(model=server.model, messages=messages, max_tokens=12, temperature=0)
    prompt = chat_prompt(messages)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == greedy_echo(prompt, 12)
    assert r.usage.prompt_tokens == len(prompt.encode())
    assert r.usage.completion_tokens == 12
    # max_completion_tokens wins over max_tokens
    r2 = c.chat.completions.create(model=server.model, messages=messages, max_tokens=12, max_completion_tokens=3,
                                   temperature=0)
    assert r2.usage.completion_tokens == 3


def test_model_may_be_omitted_or_root_name(server):
    r = server.post("/v1/completions", json={"prompt": "abc", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "ab"


def test_eos_stops_and_ignore_eos_continues(server):
    c = server.client()
    r = c.completions.create(model=server.model, prompt="ab|", max_tokens=10, temperature=0)
    assert r.choices[0].text == "ab" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 3              # the EOS token counts, its text does not
    r = c.completions.create(model=server.model, prompt="ab|", max_tokens=7, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == "ababa" and r.choices[0].finish_reason == "length"
    r = c.completions.create(model=server.model, prompt="ab|", max_tokens=10, temperature=0,
                             extra_body={"min_tokens": 5})
    assert r.usage.completion_tokens >= 5


# ------------------------------------------------------------------------------------------ streaming
@any_engine
@pytest.mark.parametrize("prompt", ["hello world, streaming", "h\u00e9llo w\u00f6rld \u65e5\u672c\u8a9e \U0001F600!"])
def test_completion_stream_equals_non_stream(any_server, prompt):
    c = any_server.client()
    full = c.completions.create(model=any_server.model, prompt=prompt, max_tokens=24, temperature=0)
    chunks = list(c.completions.create(model=any_server.model, prompt=prompt, max_tokens=24, temperature=0,
                                       stream=True))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == full.choices[0].text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == full.choices[0].finish_reason and all(f is None for f in finishes[:-1])


@any_engine
def test_chat_stream_equals_non_stream_with_stop(any_server):
    c = any_server.client()
    msgs = [{"role": "user", "content": "Tell me: caf\u00e9 cr\u00e8me, na\u00efve r\u00e9sum\u00e9"}]
    kw = dict(model=any_server.model, messages=msgs, max_tokens=40, temperature=0, stop=["cr\u00e8", "zz"])
    full = c.chat.completions.create(**kw)
    chunks = list(c.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


async def _async_stream_vs_full(srv):
    c = srv.aclient()
    full = await c.completions.create(model=srv.model, prompt="async hello", max_tokens=16, temperature=0)
    stream = await c.completions.create(model=srv.model, prompt="async hello", max_tokens=16, temperature=0,
                                        stream=True)
    text = "".join([ch.choices[0].text async for ch in stream if ch.choices])
    await c.close()
    return full.choices[0].text, text


@any_engine
def test_async_client_stream_equals_non_stream(any_server):
    full, streamed = asyncio.run(_async_stream_vs_full(any_server))
    assert streamed == full


def test_sse_wire_format_chat_with_usage(server):
    body = {"messages": [{"role": "user", "content": "abc"}], "max_tokens": 6, "temperature": 0, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(e["object"] == "chat.completion.chunk" for e in chunks)
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 12
    assert all("usage" in e and e["usage"] is None for e in chunks[:-1])
    per_choice = {0: [], 1: []}
    for e in chunks[:-1]:
        for ch in e["choices"]:
            per_choice[ch["index"]].append(ch)
    for idx, chs in per_choice.items():
        assert chs[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in ch["delta"] for ch in chs[1:])
        assert [ch["finish_reason"] for ch in chs[:-1]] == [None] * (len(chs) - 1)
        assert chs[-1]["finish_reason"] == "length"
        assert "".join(ch["delta"].get("content", "") for ch in chs) == greedy_echo(chat_prompt(body["messages"]), 6)


def test_sse_wire_format_completion_without_usage(server):
    body = {"prompt": "xyz", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.base_url + "/completions", json=body, timeout=30) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "xyz"


# ------------------------------------------------------------------------------------------ n, prompts, stop
def test_n_samples_non_stream_and_stream_agree(server):
    c = server.client()
    kw = dict(model=server.model, prompt="sample me", max_tokens=10, temperature=0.9, seed=1234, n=3)
    full = c.completions.create(**kw)
    assert sorted(ch.index for ch in full.choices) == [0, 1, 2]
    texts = {ch.index: ch.text for ch in full.choices}
    assert len(set(texts.values())) == 3                     # distinct samples
    assert full.usage.completion_tokens == 30
    streamed = {0: "", 1: "", 2: ""}
    for chunk in c.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            streamed[ch.index] += ch.text
    assert streamed == texts                                  # same seed -> same samples, streamed or not


def test_seed_reproducible(server):
    c = server.client()
    kw = dict(model=server.model, prompt="seeded", max_tokens=12, temperature=1.0, seed=7)
    a = c.completions.create(**kw).choices[0].text
    b = c.completions.create(**kw).choices[0].text
    d = c.completions.create(**{**kw, "seed": 8}).choices[0].text
    assert a == b and a != d


def test_prompt_forms(server):
    c = server.client()
    r = c.completions.create(model=server.model, prompt=["abc", "xyz"], max_tokens=3, temperature=0, n=2)
    got = {ch.index: ch.text for ch in r.choices}
    assert got == {0: "abc", 1: "abc", 2: "xyz", 3: "xyz"}
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 12
    r = c.completions.create(model=server.model, prompt=list(b"hey"), max_tokens=3, temperature=0)
    assert r.choices[0].text == "hey"
    r = c.completions.create(model=server.model, prompt=[list(b"ab"), list(b"cd")], max_tokens=2, temperature=0)
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == ["ab", "cd"]
    # streamed multi-prompt: every choice index present, texts equal
    acc = {}
    for chunk in c.completions.create(model=server.model, prompt=["abc", "xyz"], max_tokens=3, temperature=0,
                                      stream=True):
        for ch in chunk.choices:
            acc[ch.index] = acc.get(ch.index, "") + ch.text
    assert acc == {0: "abc", 1: "xyz"}


def test_stop_strings_and_stop_token_ids(server):
    c = server.client()
    r = c.completions.create(model=server.model, prompt="hello world", max_tokens=20, temperature=0, stop=["o w"])
    assert r.choices[0].text == "hell" and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra.get("stop_reason") == "o w"
    r = c.completions.create(model=server.model, prompt="hello world", max_tokens=20, temperature=0, stop="wor",
                             extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == "hello wor"
    r = c.completions.create(model=server.model, prompt="hello world", max_tokens=20, temperature=0,
                             extra_body={"stop_token_ids": [ord("w")]})
    assert r.choices[0].text == "hello " and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=server.model, prompt="hello world", max_tokens=20, temperature=0, stop=["o w", "ld"], stream=True)
        if ch.choices)
    assert streamed == "hell"


def test_echo(server):
    c = server.client()
    r = c.completions.create(model=server.model, prompt="abc", max_tokens=2, temperature=0, echo=True)
    assert r.choices[0].text == "abcab"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=server.model, prompt="abc", max_tokens=2, temperature=0, echo=True, stream=True) if ch.choices)
    assert streamed == "abcab"


def test_logprobs(server):
    c = server.client()
    r = c.completions.create(model=server.model, prompt="abcd", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.tokens == ["a", "b", "c", "d"]
    assert lp.token_logprobs == [-0.25] * 4
    assert all(len(t) == 3 for t in lp.top_logprobs)        # the sampled token + 2 alternatives
    assert lp.text_offset == [0, 1, 2, 3]
    r = c.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                  temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and content[0].token == "u" and content[0].logprob == -0.25
    assert content[0].bytes == [ord("u")] and len(content[0].top_logprobs) == 2
    assert content[0].top_logprobs[0].token == "u"
    # streamed logprobs cover every token exactly once
    n = 0
    for ch in c.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "x"}],
                                        max_tokens=5, temperature=0, logprobs=True, top_logprobs=1, stream=True):
        if ch.choices and ch.choices[0].logprobs:
            n += len(ch.choices[0].logprobs.content)
    assert n == 5


def test_vllm_extras_accepted(server):
    c = server.client()
    r = c.completions.create(model=server.model, prompt="extras", max_tokens=4, temperature=0.5, top_p=0.9,
                             seed=3, presence_penalty=0.5, frequency_penalty=-0.5,
                             extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "priority": 3,
                                         "skip_special_tokens": False, "unknown_field_is_ignored": [1, 2]})
    assert r.usage.completion_tokens == 4


def test_prefix_cache_reported_in_usage(server):
    c = server.client()
    prompt = "a long shared prefix that fills several blocks of the fake KV cache ..."
    c.completions.create(model=server.model, prompt=prompt, max_tokens=1, temperature=0)
    r = c.completions.create(model=server.model, prompt=prompt, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens >= 8


def test_tokenize_detokenize(server):
    r = server.post("/tokenize", json={"prompt": "h\u00e9"})
    assert r.status_code == 200
    assert r.json()["tokens"] == list("h\u00e9".encode()) and r.json()["count"] == 3
    assert r.json()["max_model_len"] == 512
    r = server.post("/detokenize", json={"tokens": list("h\u00e9".encode())})
    assert r.json() == {"prompt": "h\u00e9"}
    r = server.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert bytes(r.json()["tokens"]).decode() == "user: hi\nassistant:"
    assert server.post("/detokenize", json={"tokens": [99999]}).status_code == 400
    assert server.post("/tokenize", json={}).status_code == 400


# ------------------------------------------------------------------------------------------ concurrency
async def _many_streams(srv, k: int):
    c = srv.aclient()

    async def one(i: int):
        prompt = f"stream number {i:02d} "
        stream = await c.chat.completions.create(model=srv.model, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=30, temperature=0, stream=True)
        text, finishes = "", []
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].delta.content or ""
                finishes.append(ch.choices[0].finish_reason)
        return prompt, text, finishes

    results = await asyncio.gather(*(one(i) for i in range(k)))
    await c.close()
    return results


@any_engine
def test_16_concurrent_streams(any_server):
    results = asyncio.run(_many_streams(any_server, 16))
    assert len(results) == 16
    for prompt, text, finishes in results:
        assert finishes[-1] in ("length", "stop") and all(f is None for f in finishes[:-1])
        if not any_server.model.startswith("tiny"):
            assert text == greedy_echo(chat_prompt([{"role": "user", "content": prompt}]), 30)
    any_server.wait_idle()
