"""Bad input is a 4xx in OpenAI's error shape with the right `param`, never a 500."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

HTTP = httpx.Client(timeout=30)   # shared: building a client per call costs ~0.3 s

COMPLETION = {"prompt": "hi", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BOTH = [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]


def assert_openai_error(r, status: int, param=None, code=None, type_="invalid_request_error"):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["type"] == type_, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# every sampling parameter out of range or of the wrong type, on both endpoints
SHARED_BAD = [
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", "hot"), ("temperature", True),
    ("top_p", 0), ("top_p", 1.5), ("top_p", -1), ("n", 0), ("n", 129), ("n", 1.5), ("n", "2"),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", "10"), ("max_tokens", 2.5),
    ("presence_penalty", 2.5), ("presence_penalty", -3), ("frequency_penalty", 9), ("frequency_penalty", "x"),
    ("seed", "abc"), ("seed", 1.5), ("seed", 2 ** 65), ("stop", 5), ("stop", [""]), ("stop", ["a", 3]),
    ("stop", ["s"] * 65), ("stream", "yes"), ("top_k", -2), ("top_k", 0.5), ("min_p", 1.5), ("min_p", -0.1),
    ("repetition_penalty", 0), ("repetition_penalty", -1), ("min_tokens", -1), ("min_tokens", "1"),
    ("stop_token_ids", [-1]), ("stop_token_ids", "1"), ("stop_token_ids", [1.5]), ("ignore_eos", "no"),
    ("priority", "high"), ("priority", 2 ** 70), ("logit_bias", {"1": 5}), ("user", 5), ("model", 5),
    ("stream_options", {"include_usage": True}),   # without stream
    ("stream_options", "yes"), ("skip_special_tokens", 1), ("include_stop_str_in_output", "true"),
]


@pytest.mark.any_engine
@pytest.mark.parametrize("endpoint,base", BOTH, ids=["completions", "chat"])
@pytest.mark.parametrize("field,value", SHARED_BAD, ids=[f"{f}={v!r}"[:40] for f, v in SHARED_BAD])
def test_shared_parameter_out_of_range_is_400(any_server, endpoint, base, field, value):
    r = any_server.post(endpoint, json={**base, field: value})
    assert_openai_error(r, 400, param=field)


COMPLETION_BAD = [
    ({"prompt": None}, "prompt"), ({"max_tokens": 4}, "prompt"), ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"), ({"prompt": [[]]}, "prompt"), ({"prompt": [[1], "a"]}, "prompt"),
    ({"prompt": 5}, "prompt"), ({"prompt": [-1]}, "prompt"), ({"prompt": [True]}, "prompt"),
    ({"prompt": [10 ** 9]}, "prompt"),                 # out of the vocabulary: the engine says so
    ({"prompt": ["x"] * 257}, "prompt"), ({"logprobs": 21}, "logprobs"), ({"logprobs": -1}, "logprobs"),
    ({"logprobs": True}, "logprobs"), ({"echo": True, "logprobs": 1}, "echo"), ({"suffix": "x"}, "suffix"),
    ({"best_of": 3}, "best_of"), ({"min_tokens": 10, "max_tokens": 2}, "min_tokens"),
    ({"stop_token_ids": [10 ** 6]}, "stop_token_ids"), ({"n": 100}, "n"),   # n > max_num_seqs (64)
]


@pytest.mark.parametrize("patch,param", COMPLETION_BAD, ids=[repr(p)[:40] for p, _ in COMPLETION_BAD])
def test_completion_bad_input_is_400(server, patch, param):
    body = {**COMPLETION, **patch}
    body = {k: v for k, v in body.items() if not (k == "prompt" and "prompt" not in patch and "max_tokens" in patch
                                                   and len(patch) == 1)}
    r = server.post("/v1/completions", json=body)
    assert_openai_error(r, 400, param=param)


CHAT_BAD = [
    ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"), ({"messages": None}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "a"}, 7]}, "messages[1]"),
    ({"logprobs": "yes"}, "logprobs"), ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"min_tokens": 10, "max_completion_tokens": 2}, "min_tokens"),
]


@pytest.mark.parametrize("patch,param", CHAT_BAD, ids=[repr(p)[:40] for p, _ in CHAT_BAD])
def test_chat_bad_input_is_400(server, patch, param):
    body = {**CHAT, **patch}
    if patch.get("messages", 0) is None:
        body.pop("messages")
    r = server.post("/v1/chat/completions", json=body)
    assert_openai_error(r, 400, param=param)


@pytest.mark.any_engine
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
@pytest.mark.parametrize("raw", [b"{bad json", b"", b"[1, 2]", b'"text"', b"null", b"\xff\xfe\x00",
                                 b'{"prompt": NaN, "max_tokens": NaN}', b'{"prompt": "x",}', b"{" * 5000])
def test_malformed_json_is_400(any_server, endpoint, raw):
    r = any_server.post(endpoint, content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def test_wrong_content_type_still_parsed_or_400(server):
    r = server.post("/v1/completions", content=b'{"prompt": "ab", "max_tokens": 2, "temperature": 0}',
                    headers={"content-type": "text/plain"})
    assert r.status_code == 200
    r = server.post("/v1/completions", data={"prompt": "ab"})
    assert_openai_error(r, 400)


@pytest.mark.any_engine
@pytest.mark.parametrize("endpoint,base,param", [("/v1/completions", COMPLETION, "prompt"),
                                                 ("/v1/chat/completions", CHAT, "messages")])
def test_context_length_exceeded(any_server, endpoint, base, param):
    server = any_server
    r = server.post(endpoint, json={**base, "max_tokens": 10_000})
    err = assert_openai_error(r, 400, param=param, code="context_length_exceeded")
    assert "context length" in err["message"]
    long = "x " * 600
    r = server.post(endpoint, json={**base, "max_tokens": 4, **({"prompt": long} if "prompt" in base else
                                                               {"messages": [{"role": "user", "content": long}]})})
    assert_openai_error(r, 400, code="context_length_exceeded")
    # streaming requests fail the same way, before any event is sent
    r = server.post(endpoint, json={**base, "max_tokens": 10_000, "stream": True})
    assert_openai_error(r, 400, code="context_length_exceeded")


@pytest.mark.any_engine
def test_openai_client_raises_bad_request(any_server):
    server = any_server
    c = server.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=server.model, prompt="hi", max_tokens=100_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert e.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="no-such-model", prompt="hi")
    assert e.value.code == "model_not_found"


@pytest.mark.any_engine
def test_unknown_route_and_method(any_server):
    server = any_server
    r = server.post("/v1/nope", json={})
    assert_openai_error(r, 404, code="not_found")
    r = HTTP.get(server.url + "/v1/completions")
    assert_openai_error(r, 405)
    r = HTTP.get(server.url + "/v1/models/unknown-model")
    assert_openai_error(r, 404, code="model_not_found")


def test_body_too_large_is_413():
    from conftest import live_server
    with live_server(max_request_bytes=4096) as srv:
        r = srv.post("/v1/completions", json={"prompt": "x" * 10_000, "max_tokens": 1})
        assert_openai_error(r, 413)
        r = srv.post("/v1/completions", json={"prompt": "abc", "max_tokens": 1})
        assert r.status_code == 200


def test_server_still_healthy_after_bad_inputs(server):
    assert server.health().status_code == 200
    r = server.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2, "temperature": 0})
    assert r.json()["choices"][0]["text"] == "ok"
    server.wait_idle()


from conftest import live_server  # noqa: E402
from fake_engine import FakeEngine  # noqa: E402

from yaie_jax.errors import InvalidRequestError  # noqa: E402


class _RefusingEngine(FakeEngine):
    """Accepts a request at the HTTP layer, then refuses it in the engine thread (after the stream started)."""

    def add_prepared(self, req) -> None:
        self._check_thread()
        raise InvalidRequestError("prompt token ids must be in [0, 10)", param="prompt")


@pytest.mark.parametrize("endpoint,base,param", [("/v1/completions", COMPLETION, "prompt"),
                                                 ("/v1/chat/completions", CHAT, "messages")])
def test_refusal_after_the_stream_started_names_the_input_field(endpoint, base, param):
    with live_server(engine=_RefusingEngine()) as server:
        r = server.post(endpoint, json={**base, "max_tokens": 4, "stream": True})
        assert r.status_code == 200
        events = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error"
