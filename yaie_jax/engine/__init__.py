"""The engine: `LLMEngine` (add / step / abort) and `LLM` (the offline API) in core.py, the asyncio face in
async_engine.py, incremental detokenization, and the garbage-collector pause meter.

`LLM` and `LLMEngine` are loaded on first use: core.py imports JAX, and importing this package (for the detokenizer
or the async engine) must stay light."""


def __getattr__(name):
    if name in ("LLM", "LLMEngine"):
        from yaie_jax.engine import core
        return getattr(core, name)
    raise AttributeError(name)
