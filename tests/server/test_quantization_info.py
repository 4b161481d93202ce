"""/v1/models and /metrics say what the served weights are quantized to (yaie_jax/quantization)."""
import types

import httpx
import numpy as np

from conftest import live_server
from fake_engine import FakeEngine

from yaie_jax.quantization import quantize_kernel


def _engine_with_params(params):
    engine = FakeEngine()
    engine.model = types.SimpleNamespace(params=params)
    return engine


def test_quantized_weights_are_reported():
    kernel = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    params = {"layers_0": {"q_proj": quantize_kernel(kernel, "int4", group_size=32)},
              "lm_head": {"kernel": kernel}}
    with live_server(_engine_with_params(params)) as srv:
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert card["quantization"] == "int4"
        assert httpx.get(srv.url + f"/v1/models/{srv.model}").json()["quantization"] == "int4"
        assert f'yaie:model_quantization_info{{model_name="{srv.model}",quantization="int4"}} 1.0' in srv.metrics()


def test_unquantized_weights_say_none():
    params = {"layers_0": {"q_proj": {"kernel": np.zeros((4, 4), np.float32)}}}
    with live_server(_engine_with_params(params)) as srv:
        assert httpx.get(srv.url + "/v1/models").json()["data"][0]["quantization"] is None
        assert 'quantization="none"} 1.0' in srv.metrics()
