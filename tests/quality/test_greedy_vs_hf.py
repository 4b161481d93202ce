"""Greedy answers of the embedded model to the chat prompts of scripts/quality_common.py equal HF transformers'
(same GGUF, fp32) token for token: every prompt through the XLA path, the first one through the Pallas kernels
(interpret mode: a few tokens). In bfloat16 they may differ; the agreement floors (quality_common.py) are set under what
was measured (bench/NOTES.md §17), so a regression in bf16 quality fails."""
import quality_common as qc  # scripts/ (on sys.path: tests/quality/conftest.py)

TIE = 1e-4              # fp32 logit gap under which the summation order may legitimately pick either token


def first_divergence(a, b):
    return next((i for i in range(min(len(a), len(b))) if a[i] != b[i]), None)


def assert_same_or_tie(refs, prompt, ours, ref):
    """Token-identical, or diverging exactly at a near tie of HF fp32's logits (reported, not failed)."""
    if ours == ref:
        return
    k = first_divergence(ours, ref)
    assert k is not None, f"lengths differ: ours {len(ours)} vs HF {len(ref)} tokens"
    logp = refs.get("float32", list(prompt) + ref[:k + 1])[len(prompt) + k - 1]
    gap = abs(float(logp[ours[k]] - logp[ref[k]]))
    assert gap < TIE, f"diverged at token {k}: ours {ours[k]} vs HF {ref[k]} (logprob gap {gap:.2e})"
    print(f"note: greedy tie at token {k} (gap {gap:.1e})")


def test_suite_size():
    assert len(qc.PROMPTS) >= 20 and qc.GREEDY_TOKENS >= 16


def test_fp32_greedy_equals_hf(engine_run, refs, prompt_ids, hf_answers, tok):
    ours = engine_run("float32", "xla")["answers"]
    for p, text, a, b in zip(prompt_ids, qc.PROMPTS, ours, hf_answers):
        print(f"{text!r} -> {tok.decode(a, skip_special_tokens=True)!r}")
        assert_same_or_tie(refs, p, a, b)


def test_pallas_fp32_greedy_equals_hf(engine_run, refs, prompt_ids, hf_answers):
    ours = engine_run("float32", "pallas")["answers"][0]
    assert_same_or_tie(refs, prompt_ids[0], ours, hf_answers[0][:len(ours)])


def test_bf16_greedy_agreement_floor(engine_run, hf_answers, tok):
    ours = engine_run("bfloat16", "xla")["answers"]
    agree = qc.greedy_agreement(ours, hf_answers)
    print("bf16 vs HF fp32 greedy:", agree)
    for text, a, b in zip(qc.PROMPTS, ours, hf_answers):
        if a != b:
            print(f"  {text!r}: ours {tok.decode(a, skip_special_tokens=True)!r} | "
                  f"HF {tok.decode(b, skip_special_tokens=True)!r}")
    assert not qc.greedy_floor_failures(agree, None)   # on the CPU: the fixed floors


def test_greedy_floor_rule():
    """The 16-bit floor: the fixed floors, or HF's own exact count in that dtype less two binomial deviations."""
    n = 24

    def agree(exact, prefix):
        return {"prompts": n, "exact": exact, "exact_frac": exact / n, "mean_prefix_frac": prefix}
    assert not qc.greedy_floor_failures(agree(18, 0.85), None)             # 0.75 of 24
    assert qc.greedy_floor_failures(agree(17, 0.85), None)
    assert qc.greedy_floor_failures(agree(20, 0.79), None)                 # the prefix floor holds on its own
    assert not qc.greedy_floor_failures(agree(15, 0.82), agree(18, 0.88))  # 18 - 2*sqrt(24*.75*.25) = 13.8
    assert qc.greedy_floor_failures(agree(13, 0.82), agree(18, 0.88))
    assert qc.greedy_floor_failures(agree(17, 0.85), agree(24, 1.0))      # HF better: the fixed floor stays
