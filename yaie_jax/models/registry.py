"""Model families by architecture name (HF config.json `model_type`, also `ModelConfig.arch`).

Each family module exposes `config_from_hf(hf_config: dict) -> ModelConfig`,
`params_from_hf(state_dict: dict[str, np.ndarray], config) -> params` and a model class implementing
models/base.py. Modules are imported lazily, on first use of their family: loading GPT-2 never imports Llama.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Tuple

FAMILIES = {
    # arch / HF model_type -> (module, model class name)
    "gpt2": ("yaie_jax.models.gpt2", "GPT2ForCausalLM"),
    "llama": ("yaie_jax.models.llama", "LlamaForCausalLM"),
}


def supported_archs() -> list:
    return sorted(FAMILIES)


def family(arch) -> Tuple[ModuleType, type]:
    """(family module, model class) for `arch`; ValueError naming the supported ones otherwise."""
    if arch not in FAMILIES:
        what = "config.json has no model_type" if arch is None else f"unsupported model architecture {arch!r}"
        raise ValueError(f"{what} (yaie_jax supports: {', '.join(supported_archs())})")
    mod_name, cls_name = FAMILIES[arch]
    mod = importlib.import_module(mod_name)
    return mod, getattr(mod, cls_name)
