"""The engine: `LLMEngine` (add / step / abort) in core.py, built from loading.py's parts, with its request intake
(input_processor.py) and its token and text handling (output_processor.py); `LLM` (the offline API) in llm.py; the
asyncio face in async_engine.py (its streams in request_stream.py); incremental detokenization, compile logging and
the garbage-collector pause meter.

`LLM` and `LLMEngine` are loaded on first use: core.py imports JAX, and importing this package (for the detokenizer
or the async engine) must stay light."""


def __getattr__(name):
    if name == "LLMEngine":
        from yaie_jax.engine import core
        return core.LLMEngine
    if name == "LLM":
        from yaie_jax.engine import llm
        return llm.LLM
    raise AttributeError(name)
