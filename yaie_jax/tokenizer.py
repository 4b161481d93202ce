"""Tokenizer loading and chat templates.

`load_tokenizer(source)`: the tokenizer of a model source, as `load_model` understands sources:
  * a `.gguf` file: a fast tokenizer built from the GGUF metadata (models/gguf.py), because transformers' GGUF
    path imports torch;
  * a directory written by `save_model`: its `tokenizer/` subdirectory (an error if it was saved without one);
  * a HF directory or hub id: transformers' AutoTokenizer (for a hub id only config and tokenizer files are
    fetched, through the same cache / offline handling as models/loader.py).
`apply_chat_template(tokenizer, messages, add_generation_prompt=True) -> str`: the tokenizer's chat template, or,
for models with none (GPT-2), a plain role-prefixed transcript:
    "system: ...\\nuser: ...\\nassistant:"
"""
from __future__ import annotations

import os
from typing import Dict, List


def load_tokenizer(source):
    source = str(source)
    path = os.path.expanduser(source)
    if path.endswith(".gguf"):
        from .models.gguf import load_gguf_tokenizer
        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    from .models.loader import MARKER, TOKENIZER_SUBDIR, resolve_source
    if not os.path.exists(path):
        path = resolve_source(source, patterns=None)  # hub id: config + tokenizer files only
    if os.path.exists(os.path.join(path, MARKER)):
        tok_dir = os.path.join(path, TOKENIZER_SUBDIR)
        if not os.path.isdir(tok_dir):
            raise FileNotFoundError(f"{source!r} was saved without a tokenizer (no {TOKENIZER_SUBDIR}/ inside); "
                                    f"pass the tokenizer's source separately")
        path = tok_dir
    return AutoTokenizer.from_pretrained(path)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _text(content) -> str:
    """Message content as text: a string, or OpenAI-style parts [{"type": "text", "text": ...}, ...]."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)


def apply_chat_template(tokenizer, messages: List[Dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text for a conversation of {"role": ..., "content": ...} messages."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    lines = [f"{m['role']}: {_text(m.get('content'))}" for m in messages]
    if add_generation_prompt:
        lines.append("assistant:")
    return "\n".join(lines)
