"""Tokenizer loading and chat templates.

`load_tokenizer(source)`: the tokenizer of a model source, as `load_model` understands sources:
  * a `.gguf` file: a fast tokenizer built from the GGUF metadata (models/gguf.py), because transformers' GGUF
    path imports torch;
  * a directory written by `save_model`: its `tokenizer/` subdirectory (an error if it was saved without one);
  * a HF directory or hub id: transformers' AutoTokenizer (for a hub id only config and tokenizer files are
    fetched, through the same cache / offline handling as models/loader.py). Where AutoTokenizer would pick a
    plain `tokenizers`-backed class (see `direct_tokenizer_class`), that class is used directly: AutoTokenizer
    imports AutoConfig, which imports torch when it is installed (seconds of server start-up, more with CUDA).
`apply_chat_template(tokenizer, messages, add_generation_prompt=True) -> str`: the tokenizer's chat template, or,
for models with none (GPT-2), a plain role-prefixed transcript:
    "system: ...\\nuser: ...\\nassistant:"
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

# tokenizer_config.json `tokenizer_class` -> the transformers class AutoTokenizer (transformers 5) resolves it to,
# for the model types below; these classes import without torch.
DIRECT_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast",
                            "PreTrainedTokenizerFast": "PreTrainedTokenizerFast",
                            "GPT2Tokenizer": "GPT2Tokenizer", "GPT2TokenizerFast": "GPT2Tokenizer"}
# config.json model_type values for which AutoTokenizer keeps such a declared class (None: no config.json, as in
# the tokenizer/ directory of a save_model directory)
DIRECT_MODEL_TYPES = (None, "gpt2", "llama")


def load_tokenizer(source, hub_timeout_s: Optional[float] = None):
    """The tokenizer of `source` (see the module docstring); `hub_timeout_s` bounds the first hub request of a
    hub id (models/loader.py `hub_snapshot`)."""
    source = str(source)
    path = os.path.expanduser(source)
    if path.endswith(".gguf"):
        from .models.gguf import load_gguf_tokenizer
        return load_gguf_tokenizer(path)
    from .models.loader import MARKER, TOKENIZER_SUBDIR, resolve_source
    if not os.path.exists(path):
        path = resolve_source(source, patterns=None, hub_timeout_s=hub_timeout_s)  # hub id: config, tokenizer
    if os.path.exists(os.path.join(path, MARKER)):
        tok_dir = os.path.join(path, TOKENIZER_SUBDIR)
        if not os.path.isdir(tok_dir):
            raise FileNotFoundError(f"{source!r} was saved without a tokenizer (no {TOKENIZER_SUBDIR}/ inside); "
                                    f"pass the tokenizer's source separately")
        path = tok_dir
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise TokenizerMissingError(_missing_message(source, path))
    cls = direct_tokenizer_class(path)
    if cls is not None:
        return cls.from_pretrained(path)
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError) as e:
        if "sentencepiece" in str(e) or "tiktoken" in str(e):    # transformers' words for "no usable files"
            raise TokenizerMissingError(_missing_message(source, path) + f" (transformers: {e})") from None
        raise


# Any of these in a model directory means a tokenizer may be there (transformers decides which it uses)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken")


class TokenizerMissingError(FileNotFoundError):
    """A model source without a tokenizer the engine can load."""


def _missing_message(source: str, path: str) -> str:
    return (f"no tokenizer in {source!r} ({path}: none of {', '.join(TOKENIZER_FILES)}). Pass one with "
            f"tokenizer=PATH_OR_HUB_ID (server: --tokenizer), or skip_tokenizer_init=True "
            f"(--skip-tokenizer-init) to send and receive token ids only")


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def direct_tokenizer_class(path: str):
    """The tokenizer class AutoTokenizer would load from the local directory `path`, when that is certain without
    asking transformers' auto classes: a `tokenizer.json`, a `tokenizer_class` from DIRECT_TOKENIZER_CLASSES, no
    remote code (`auto_map`), and a config.json (if any) of a model type from DIRECT_MODEL_TYPES with no hub name
    that transformers overrides by name. None otherwise (the caller uses AutoTokenizer)."""
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        return None
    tok_cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
    if tok_cfg is None or "auto_map" in tok_cfg:
        return None
    name = tok_cfg.get("tokenizer_class")
    if name not in DIRECT_TOKENIZER_CLASSES:
        return None
    cfg_path = os.path.join(path, "config.json")
    cfg = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
    if cfg is None or cfg.get("model_type") not in DIRECT_MODEL_TYPES or cfg.get("tokenizer_class"):
        return None
    # AutoTokenizer forces TokenizersBackend for some hub names (MODEL_IDS_TO_TOKENIZERS_BACKEND): only the
    # classes that already are TokenizersBackend stay certain then
    if cfg.get("_name_or_path") and DIRECT_TOKENIZER_CLASSES[name] != "PreTrainedTokenizerFast":
        return None
    import transformers
    return getattr(transformers, DIRECT_TOKENIZER_CLASSES[name])


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
