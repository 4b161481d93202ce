"""Tokenizer loading and chat templates.

`load_tokenizer(source)`: transformers' AutoTokenizer for directories and hub ids; for a `.gguf` file, a fast
tokenizer built from the GGUF metadata (models/gguf.py), because transformers' GGUF path imports torch.
`apply_chat_template`: the tokenizer's template, or a plain role-prefixed fallback for models with none (GPT-2).
"""
from __future__ import annotations

import os
from typing import Dict, List


def load_tokenizer(source: str):
    path = os.path.expanduser(str(source))
    if path.endswith(".gguf"):
        from .models.gguf import load_gguf_tokenizer
        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "yaie_model.json")) \
            and os.path.exists(os.path.join(path, "tokenizer")):
        path = os.path.join(path, "tokenizer")  # an orbax-saved model keeps its tokenizer beside the params
    if not os.path.exists(path):
        from .models.loader import resolve_source
        path = resolve_source(str(source))
    return AutoTokenizer.from_pretrained(path)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(tokenizer, messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text for a conversation. Messages are {"role": ..., "content": ...} dicts."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)
