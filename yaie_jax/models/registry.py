"""Model families by architecture name. Each family module exposes `config_from_hf(dict) -> ModelConfig`,
`params_from_hf(state_dict, config) -> params` and a model class (imported lazily: llama needs nothing of gpt2)."""
from __future__ import annotations

import importlib

FAMILIES = {
    # arch / HF model_type -> (module, model class)
    "gpt2": ("yaie_jax.models.gpt2", "GPT2ForCausalLM"),
    "llama": ("yaie_jax.models.llama", "LlamaForCausalLM"),
}


def family(arch: str):
    if arch not in FAMILIES:
        raise ValueError(f"unsupported model architecture {arch!r} (supported: {', '.join(sorted(FAMILIES))})")
    mod_name, cls_name = FAMILIES[arch]
    mod = importlib.import_module(mod_name)
    return mod, getattr(mod, cls_name)
