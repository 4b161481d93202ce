"""Builders for tiny random HF checkpoints (model + tokenizer) used across the test suite.

No hub is reachable: models are random-init transformers models saved with `save_pretrained`, tokenizers are
byte-level BPEs trained here on a small built-in corpus (with multi-byte characters).
"""
from __future__ import annotations

import functools
import os
from typing import Optional

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "JAX compiles numerical programs with XLA for CPUs, GPUs and TPUs.",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve r\u00e9sum\u00e9, \u00fcber stra\u00dfe.",
    "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3068\u4e2d\u6587\u53e5\u5b50\u3002 \U0001F600\U0001F680\U0001F389 emoji!",
    "def f(x):\n    return x * 2  # code with    spaces\n",
    "Once upon a time, there was a little engine that could serve many requests at once.",
]


@functools.lru_cache(maxsize=8)
def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE PreTrainedTokenizerFast with `<|endoftext|>` as bos/eos (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def make_gpt2_dir(path: str, *, vocab_size: int = 384, n_layer: int = 2, n_embd: int = 64, n_head: int = 4,
                  n_positions: int = 256, seed: int = 0, initializer_range: float = 0.1,
                  with_tokenizer: bool = True, safe_serialization: bool = True) -> str:
    """Save a random GPT2LMHeadModel (fp32) and a matching tokenizer in `path`; returns `path`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions,
                     initializer_range=initializer_range, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    if with_tokenizer:
        tiny_tokenizer(vocab_size).save_pretrained(path)
    return path


def make_llama_dir(path: str, *, vocab_size: int = 384, num_hidden_layers: int = 2, hidden_size: int = 96,
                   num_attention_heads: int = 6, num_key_value_heads: int = 2, intermediate_size: int = 160,
                   max_position_embeddings: int = 256, tie_word_embeddings: bool = False, seed: int = 0,
                   initializer_range: float = 0.1, rope_theta: float = 10000.0) -> str:
    """Save a random LlamaForCausalLM (fp32, GQA) and a matching tokenizer in `path`; returns `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=num_hidden_layers, hidden_size=hidden_size,
                      num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                      intermediate_size=intermediate_size, max_position_embeddings=max_position_embeddings,
                      tie_word_embeddings=tie_word_embeddings, initializer_range=initializer_range,
                      rope_theta=rope_theta, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tiny_tokenizer(vocab_size).save_pretrained(path)
    return path


def hf_greedy(path: str, prompt_ids, max_new_tokens: int, arch: Optional[str] = None):
    """Greedy continuation by HF transformers (fp32, EOS ignored): list of new token ids."""
    import torch
    from transformers import AutoModelForCausalLM

    model = _hf_model(path)
    ids = torch.tensor([list(prompt_ids)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=0, attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


@functools.lru_cache(maxsize=4)
def _hf_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def hf_logits(path: str, ids):
    """Full-sequence fp32 logits from HF for one prompt: numpy [len, vocab]."""
    import torch
    model = _hf_model(path)
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].numpy()


def assert_same_greedy(path: str, prompt, ours, ref, tie_tol: float = 1e-4) -> None:
    """Token-identical greedy continuations, except that a divergence exactly at a near-tie of HF's own top-2
    logits (|gap| < tie_tol, where fp32 rounding order decides) is reported instead of failed."""
    ours, ref = list(ours), list(ref)
    if ours == ref:
        return
    k = next((i for i in range(min(len(ours), len(ref))) if ours[i] != ref[i]), None)
    assert k is not None, f"lengths differ: {len(ours)} vs {len(ref)}"
    logits = hf_logits(path, list(prompt) + ref[:k])[-1]
    gap = abs(float(logits[ours[k]]) - float(logits[ref[k]]))
    assert gap < tie_tol, f"diverged at token {k}: ours {ours[k]} vs HF {ref[k]} (logit gap {gap:.2e})"
    print(f"note: greedy tie at token {k} (gap {gap:.1e}); continuations legitimately differ after it")
