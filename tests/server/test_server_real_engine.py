"""The server around the REAL engine (not the fake): the embedded SmolLM2-135M-Instruct answers a chat question
sensibly through the official openai client without leaking template tokens, and with a tiny random GPT-2:
streamed == non-streamed under greedy, and a client that disconnects mid-stream leaves nothing held."""
import threading
import time

import httpx
import pytest

import support
from conftest import live_server
from yaie_jax.engine.core import LLMEngine

ENGINE = dict(attention_backend="xla", warmup=False, compile_cache_dir=None)


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france():
    eng = LLMEngine(model=None, dtype="float32", max_model_len=512, **ENGINE)
    with live_server(engine=eng, api_keys=["k"]) as srv:
        client = srv.client(api_key="k")
        r = client.chat.completions.create(model=srv.model, temperature=0, max_tokens=24,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        text = r.choices[0].message.content
        assert "Paris" in text, text
        assert "<|im_" not in text and "<|endoftext|>" not in text
        chunks = client.chat.completions.create(model=srv.model, temperature=0, max_tokens=24, stream=True,
                                                messages=[{"role": "user",
                                                           "content": "What is the capital of France?"}])
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_tiny_gpt2_stream_equals_nonstream_and_disconnect_frees(tmp_path):
    path = support.make_gpt2_dir(str(tmp_path))
    eng = LLMEngine(model=path, dtype="float32", **ENGINE)
    with live_server(engine=eng) as srv:
        client = srv.client()
        full = client.completions.create(model=srv.model, prompt="The quick brown", max_tokens=20, temperature=0,
                                         extra_body={"ignore_eos": True})
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=srv.model, prompt="The quick brown", max_tokens=20, temperature=0, stream=True,
            extra_body={"ignore_eos": True}) if c.choices)
        assert streamed == full.choices[0].text
        assert full.usage.completion_tokens == 20
        # open a long stream, read one chunk, drop the connection
        with httpx.stream("POST", srv.base_url + "/completions", timeout=30,
                          json={"prompt": "Once upon", "max_tokens": 200, "stream": True, "ignore_eos": True,
                                "temperature": 0}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    break
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            h = srv.health().json()
            if h["num_running"] == 0 and h["num_waiting"] == 0 and h["active_requests"] == 0:
                break
            time.sleep(0.1)
        assert h["num_running"] == 0 and h["num_waiting"] == 0
        eng_bm = eng.block_manager
        time.sleep(0.2)
        assert eng_bm.num_free_gpu_blocks + eng_bm.num_evictable_gpu_blocks == eng.runner.num_gpu_blocks


def test_server_without_a_tokenizer_takes_token_ids_and_refuses_text(tmp_path):
    """skip_tokenizer_init: token-id prompts are answered with token ids (text ""), logprob tokens read
    "token_id:N" as vLLM writes them; chat, text prompts and /tokenize get a 400 saying why."""
    path = support.make_gpt2_dir(str(tmp_path), with_tokenizer=False)
    eng = LLMEngine(model=path, dtype="float32", skip_tokenizer_init=True, **ENGINE)
    with live_server(engine=eng) as srv:
        r = srv.client().completions.create(model=srv.model, prompt=[5, 6, 7], max_tokens=4, temperature=0,
                                            logprobs=1, extra_body={"ignore_eos": True})
        assert r.choices[0].text == "" and r.usage.completion_tokens == 4
        assert all(t.startswith("token_id:") for t in r.choices[0].logprobs.tokens)
        for url, body, param in [("/v1/completions", {"model": srv.model, "prompt": "text"}, "prompt"),
                                 ("/v1/chat/completions", {"model": srv.model,
                                                           "messages": [{"role": "user", "content": "hi"}]},
                                  "messages"),
                                 ("/tokenize", {"prompt": "hi"}, "prompt")]:
            resp = httpx.post(srv.url + url, json=body, timeout=30)
            assert resp.status_code == 400, (url, resp.text)
            err = resp.json()["error"]
            assert err["param"] == param and "tokenizer" in err["message"], err


def test_prompt_logprobs_over_http_equal_the_engines(tmp_path):
    """vLLM's `prompt_logprobs` extra parameter: the completions choice (and chat's top level) carries the engine's
    own prompt logprobs, entry 0 None; a streamed request asking for them is a 400 naming the field."""
    from yaie_jax import SamplingParams
    path = support.make_gpt2_dir(str(tmp_path))
    eng = LLMEngine(model=path, dtype="float32", **ENGINE)
    prompt = [5, 17, 99, 3, 250]
    eng.add_request("ref", prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))
    ref = None
    while eng.has_unfinished_requests():
        for out in eng.step():
            ref = out if out.finished else ref
    want = ref.prompt_logprobs
    assert want[0] is None and len(want) == len(prompt)
    with live_server(engine=eng) as srv:
        r = srv.client().completions.create(model=srv.model, prompt=prompt, max_tokens=1, temperature=0,
                                            extra_body={"prompt_logprobs": 2})
        got = r.choices[0].model_extra["prompt_logprobs"]
        assert got[0] is None and len(got) == len(prompt)
        for pos, (g, w) in enumerate(zip(got[1:], want[1:]), start=1):
            assert str(prompt[pos]) in g                       # the prompt token itself, plus the top 2
            assert {int(k) for k in g} == set(w)
            for k, v in g.items():
                assert v["logprob"] == pytest.approx(w[int(k)].logprob, abs=1e-6)
                assert v["rank"] == w[int(k)].rank
        plain = srv.client().completions.create(model=srv.model, prompt=prompt, max_tokens=1, temperature=0)
        assert "prompt_logprobs" not in (plain.choices[0].model_extra or {})
        resp = httpx.post(srv.url + "/v1/completions", timeout=30, json={
            "model": srv.model, "prompt": prompt, "max_tokens": 1, "stream": True, "prompt_logprobs": 1})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt_logprobs"
        resp = httpx.post(srv.url + "/v1/completions", timeout=30, json={
            "model": srv.model, "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 21})
        assert resp.status_code == 400
        chat = httpx.post(srv.url + "/v1/chat/completions", timeout=30, json={
            "model": srv.model, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 1,
            "prompt_logprobs": 0}).json()
        plps = chat["prompt_logprobs"]
        assert plps[0] is None and len(plps) == chat["usage"]["prompt_tokens"]
        assert all(len(e) == 1 for e in plps[1:])                 # 0: only the prompt token's own
