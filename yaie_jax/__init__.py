"""yaie_jax: an LLM inference engine in JAX/XLA (paged KV cache, radix prefix cache, Pallas kernels, OpenAI server).

    from yaie_jax import LLM, SamplingParams
    llm = LLM("path/or/hub-id")            # no argument: the embedded SmolLM2-135M-Instruct GGUF
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
"""
from .config import EngineConfig
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]


def __getattr__(name):
    # The engine imports JAX; keep `import yaie_jax` light for the scheduler, cache and server tests.
    if name in ("LLM", "LLMEngine"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(name)
