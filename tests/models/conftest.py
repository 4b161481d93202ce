"""Fixtures for model tests: tiny random HF GPT-2 checkpoints built with transformers and `save_pretrained`.

Every parameter is random, LayerNorm scales and all biases included (HF initialises them to 1 and 0, which would
hide a swapped or dropped scale/bias).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

TINY_VOCAB = 384  # matches support.tiny_tokenizer()


def gpt2_hf_model(seed=0, initializer_range=0.1, **overrides):
    """A random fp32 transformers GPT2LMHeadModel (eval mode). `overrides` are GPT2Config fields."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    kw = dict(vocab_size=TINY_VOCAB, n_layer=2, n_embd=64, n_head=4, n_positions=128,
              initializer_range=initializer_range, bos_token_id=0, eos_token_id=0)
    kw.update(overrides)
    model = GPT2LMHeadModel(GPT2Config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif ".ln_" in name:
                p.uniform_(0.5, 1.5)
    return model


def make_gpt2_dir(path, seed=0, with_tokenizer=False, initializer_range=0.1, **overrides):
    """Save a random GPT-2 (see gpt2_hf_model) with save_pretrained in `path`; returns `path` (str)."""
    model = gpt2_hf_model(seed=seed, initializer_range=initializer_range, **overrides)
    path = str(path)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    if with_tokenizer:
        import support
        support.tiny_tokenizer(TINY_VOCAB).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """3 layers, width 64, 4 heads, vocab 384, 128 positions, with a byte-level BPE tokenizer (no chat template)."""
    return make_gpt2_dir(tmp_path_factory.mktemp("tiny_gpt2"), seed=1, n_layer=3, with_tokenizer=True)


@pytest.fixture(scope="session")
def tiny_gpt2_hf(tiny_gpt2_dir):
    """transformers' model loaded from `tiny_gpt2_dir` (fp32, eval)."""
    import torch
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, dtype=torch.float32).eval()


class GPT2Factory:
    """Handed to tests by the `gpt2_factory` fixture (tests never import conftest: its module name is shared)."""
    vocab = TINY_VOCAB
    hf_model = staticmethod(gpt2_hf_model)
    make_dir = staticmethod(make_gpt2_dir)


@pytest.fixture(scope="session")
def gpt2_factory():
    return GPT2Factory
