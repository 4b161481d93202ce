"""Perplexity of the Gettysburg Address (tests/quality/data) through the engine: prompt logprobs over the paged
path with chunked prefill (the text is longer than the step budget), against HF transformers' fp32 perplexity."""
import pytest

import quality_common as qc  # scripts/ (on sys.path: tests/quality/conftest.py)

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_perplexity_matches_hf(engine_run, refs, text_ids, dtype):
    assert len(text_ids) > 2 * qc.BUDGET            # at least three chunks
    ppl = qc.perplexity_of(engine_run(dtype, "xla")["records"], refs, ["float32", "bfloat16"])
    print(dtype, ppl)
    assert ppl["tokens"] == len(text_ids) - 1          # every text token after the first
    assert abs(ppl["ours"] / ppl["hf_float32"] - 1) <= qc.PPL_TOL[dtype]
