"""The engine's refusals are typed (yaie_jax/errors.py): the field at fault and OpenAI's code are data, so the
server never reads the message. Messages stay as they were (tests elsewhere match on them)."""
import pytest

from yaie_jax import SamplingParams
from yaie_jax.engine.core import LLMEngine
from yaie_jax.errors import ContextLengthError, InvalidParameterError, InvalidRequestError


@pytest.fixture(scope="module")
def engine(gpt2_dir):
    return LLMEngine(model=gpt2_dir, dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None,
                     max_num_seqs=4)


@pytest.mark.parametrize("prompt,params,param,match", [
    ([1] * 250, SamplingParams(max_tokens=10), "prompt", "context length"),
    ([], SamplingParams(), "prompt", "empty"),
    ([10 ** 6], SamplingParams(), "prompt", r"token ids must be in \[0, "),
    ([-1, 3], SamplingParams(), "prompt", r"token ids must be in \[0, "),
    ([1.5], SamplingParams(), "prompt", "must be integers"),
    ([1, 2], SamplingParams(n=5), "n", "max_num_seqs=4"),
    ([1, 2], SamplingParams(stop_token_ids=[10 ** 6]), "stop_token_ids", r"stop_token_ids must be in \[0, "),
])
def test_make_request_refusals_name_the_field(engine, prompt, params, param, match):
    with pytest.raises(InvalidRequestError, match=match) as e:
        engine.make_request("r", prompt, params)
    assert e.value.param == param
    assert isinstance(e.value, ValueError)
    assert (e.value.code == "context_length_exceeded") == isinstance(e.value, ContextLengthError)
    assert not engine.has_unfinished_requests()


def test_context_length_error_carries_code_and_param(engine):
    with pytest.raises(ContextLengthError) as e:
        engine.add_request("r", [1] * 250, SamplingParams(max_tokens=10))
    assert (e.value.param, e.value.code) == ("prompt", "context_length_exceeded")
    assert e.value.client_message == str(e.value)
    assert "maximum context length is 256 tokens" in str(e.value)


@pytest.mark.parametrize("kwargs,field,reason", [
    ({"top_p": 0}, "top_p", "must be in (0, 1] (got 0)"),
    ({"temperature": -1.0}, "temperature", "must be >= 0 (got -1.0)"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens", "must be <= max_tokens (got 5)"),
    ({"stop": [""]}, "stop", "must be non-empty strings (got [''])"),
])
def test_sampling_params_errors_name_the_field(kwargs, field, reason):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == field and e.value.code is None
    assert str(e.value) == f"SamplingParams.{field} {reason}"
    assert e.value.client_message == f"Invalid value for '{field}': {reason}."
