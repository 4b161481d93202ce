"""Research loop: train a tiny GPT-2 on a checkable task, save it, serve it, get the exact answers; perplexity
agrees with HF transformers."""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
sys.path.insert(0, os.path.dirname(__file__))
import finetune  # noqa: E402
import support  # noqa: E402


def test_train_save_serve_exact_answers(tmp_path):
    base = finetune.build_tiny_gpt2(str(tmp_path / "base"))
    saved, losses = finetune.finetune(base, str(tmp_path / "trained"), steps=250, plot=True)
    assert losses[-1] < 0.05 < losses[0]
    assert os.path.exists(os.path.join(saved, "loss.png"))
    from yaie_jax import LLM, SamplingParams
    llm = LLM(saved, dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None)
    starts = np.random.default_rng().integers(1, 65, size=6).tolist()
    outs = llm.generate([[s] for s in starts], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    for s, o in zip(starts, outs):
        expect = [((s - 1 + k) % 64) + 1 for k in range(1, 11)]
        assert o.outputs[0].token_ids == expect


def test_perplexity_matches_hf(tmp_path):
    from transformers import GPT2LMHeadModel
    from yaie_jax.models import load_model
    from yaie_jax.research import perplexity
    path = support.make_gpt2_dir(str(tmp_path), initializer_range=0.05)
    tok = support.tiny_tokenizer()
    ids = np.array([tok.encode("Paris is the capital of France. The quick brown fox jumps.")])
    ours = perplexity(load_model(path, dtype="float32"), ids)
    hf = GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = float(torch.exp(hf(torch.tensor(ids), labels=torch.tensor(ids)).loss))
    assert abs(ours - ref) / ref < 1e-4
