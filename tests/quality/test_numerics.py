"""Per path (prefill, decode, chunked prefill, prefix-cache hit) and attention backend, the engine's logprobs are
as close to HF fp32 as HF's own in the same dtype, on the same token sequences (scripts/quality_common.py).

fp32: within qc.FP32_TOL of HF fp32 (the summation order is all that differs).
bf16: our mean |logprob - HF fp32| at most qc.MARGIN x HF bf16's on the same positions and tokens, our max at most
qc.MAX_MARGIN x HF bf16's (HF's pooled over every path of the run where a path has fewer than qc.MIN_POSITIONS
positions), and the top-1 agreement with HF fp32 at most qc.TOP1_SLACK below HF bf16's (`qc.path_failures`)."""
import pytest

import quality_common as qc  # scripts/ (on sys.path: tests/quality/conftest.py)

CASES = [(d, b) for d in ("float32", "bfloat16") for b in ("xla", "pallas")]


@pytest.mark.parametrize("dtype,backend", CASES)
def test_paths_within_hf_error(engine_run, refs, dtype, backend):
    s = qc.compare(engine_run(dtype, backend)["records"], refs, None if dtype == "float32" else dtype)
    print(f"\n{dtype} {backend}\n" + qc.format_table(s))
    want = {"prefill", "decode"} | ({"chunked", "cached"} if backend == "xla" else set()) \
        | ({"cached"} if dtype == "float32" else set())
    assert want <= set(s)
    assert qc.path_failures(s, dtype) == []
