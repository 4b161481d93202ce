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


def test_quantization_settings_layering(tmp_path):
    import pytest
    from yaie_jax.server.settings import ConfigError, load_settings
    s = load_settings(["--quantization", "int4", "--quantization-group-size", "64"], {})
    assert (s.engine.quantization, s.engine.quantization_group_size) == ("int4", 64)
    assert load_settings([], {"YAIE_QUANTIZATION": "fp8"}).engine.quantization == "fp8"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: x\n  quantization: int8\n")
    assert load_settings(["--config", str(cfg)], {}).engine.quantization == "int8"
    assert load_settings([], {}).engine.quantization is None
    with pytest.raises(ConfigError, match="quantization"):
        load_settings(["--quantization", "int3"], {})
