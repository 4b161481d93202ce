"""What `dtype="auto"` (the engine's default) means: the one place it is resolved.

    resolve_dtype("auto", source, platform) -> (dtype, why)

1. the embedded default model (SmolLM2-135M-Instruct GGUF): float32 everywhere. It is small enough that fp32 costs
   little, and in bfloat16 it answers worse: the README's question flips to a wrong answer (a near tie of the first
   token, 0.08 nats apart in fp32, reversed by bf16 rounding; tests/quality, bench/NOTES.md §17);
2. on a CPU: float32 (bfloat16 buys no speed there: bench/NOTES.md §17);
3. on an accelerator, the checkpoint's dtype: HF `config.json` `torch_dtype` / `dtype`, or a GGUF file's type
   (F16 -> float16, BF16 -> bfloat16); float32, quantized or unknown checkpoints -> bfloat16 (16-bit for the
   tensor cores and the Pallas kernels, as vLLM's "auto" does for fp32 checkpoints).
An explicit dtype ("float32" | "bfloat16" | "float16") is returned as is.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

HALF = ("bfloat16", "float16")
GGUF_FILE_TYPES = {1: "float16", 32: "bfloat16", 0: "float32"}   # llama.cpp LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / BF16


def resolve_dtype(requested: str, source: Optional[str], platform: Optional[str] = None) -> Tuple[str, str]:
    """(dtype, why) for an engine dtype setting; `source` is the model source (None = the embedded default);
    `platform` defaults to jax.default_backend()."""
    if requested != "auto":
        return requested, "requested"
    if _is_default_model(source):
        return "float32", "the embedded default model is served in float32 (it answers worse in bfloat16)"
    if platform is None:
        import jax
        platform = jax.default_backend()
    if platform == "cpu":
        return "float32", "CPU: float32 (bfloat16 is no faster there)"
    ckpt = checkpoint_dtype(source)
    if ckpt in HALF:
        return ckpt, f"the checkpoint's dtype ({ckpt})"
    return "bfloat16", f"{platform}: bfloat16 (checkpoint dtype {ckpt or 'unknown'})"


def _is_default_model(source: Optional[str]) -> bool:
    if not source:
        return True
    from .default_model import DefaultModelMissing, default_model_path
    try:
        default = default_model_path()
    except DefaultModelMissing:
        return False
    path = os.path.expanduser(str(source))
    return os.path.exists(path) and os.path.samefile(path, default)


def checkpoint_dtype(source: Optional[str]) -> Optional[str]:
    """The dtype a checkpoint is stored in, if it says: "float32" | "bfloat16" | "float16" | "quantized" | None.
    Reads metadata only (a hub id: its cached or downloaded config.json); None when it cannot tell."""
    if not source:
        return None
    source = str(source)
    try:
        if source.endswith(".gguf"):
            from .gguf import read_metadata
            ftype = read_metadata(os.path.expanduser(source), skip_arrays=True).get("general.file_type")
            return GGUF_FILE_TYPES.get(ftype, "quantized" if ftype is not None else None)
        from .loader import read_hf_config, resolve_source
        path = resolve_source(source, patterns=None)
        if not os.path.exists(os.path.join(path, "config.json")):
            return None
        cfg = read_hf_config(path)
    except (OSError, ValueError, KeyError):
        return None
    dt = cfg.get("torch_dtype") or cfg.get("dtype")
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(str(dt).replace("torch.", ""))
