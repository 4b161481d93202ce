"""HF state dict -> our params pytree, driven by a family's name table and the module's own param shapes.

The family states only how names differ (`HFCheckpoint`); which tensors exist and their shapes come from the
Flax module (`CausalLMBase.param_shapes`), so the two cannot disagree. Leaf names map as kernel / scale /
embedding -> `weight`, bias -> `bias`. Every tensor is shape-checked against the config.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, Mapping, Tuple

import numpy as np

LEAF_NAMES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class HFCheckpoint:
    """How a family's HF tensor names relate to our param names."""
    family: str                                # for messages, e.g. "GPT-2"
    modules: Mapping[str, str]                 # our module name -> HF module path ("q_proj" -> "self_attn.q_proj")
    layer: str                                 # HF path of layer i, e.g. "layers.{}"
    prefixes: Tuple[str, ...] = ()             # tried in front of a name the state dict lacks ("model.")
    kernels_in_out: frozenset = frozenset()    # modules whose HF weight is [in, out] (Conv1D); others [out, in]


class _StateDict:
    def __init__(self, sd: Dict[str, np.ndarray], ckpt: HFCheckpoint):
        self.sd, self.ckpt = sd, ckpt

    def has(self, name: str) -> bool:
        return any(p + name in self.sd for p in ("",) + self.ckpt.prefixes)

    def get(self, name: str, hint: str = "") -> np.ndarray:
        for key in (name,) + tuple(p + name for p in self.ckpt.prefixes):
            if key in self.sd:
                return np.asarray(self.sd[key])
        raise KeyError(f"{self.ckpt.family} checkpoint is missing tensor {name!r}{hint}")

    def module(self, hf_path: str, ours: str, leaves: dict) -> dict:
        """Our params of module `ours` (leaf name -> expected ShapeDtypeStruct) from HF module `hf_path`."""
        hint = " (and tie_word_embeddings is false)" if ours == "lm_head" else ""
        out = {}
        for leaf, want in leaves.items():
            name = f"{hf_path}.{LEAF_NAMES[leaf]}"
            a = self.get(name, hint)
            transposed = leaf == "kernel" and ours not in self.ckpt.kernels_in_out
            hf_shape = tuple(want.shape[::-1]) if transposed else tuple(want.shape)
            if a.shape != hf_shape:
                raise ValueError(f"{self.ckpt.family} tensor {name!r} has shape {a.shape}, config says {hf_shape}")
            out[leaf] = np.ascontiguousarray(a.T) if transposed else a          # HF Linear [out, in] -> [in, out]
        return out


def params_from_state_dict(sd: Dict[str, np.ndarray], ckpt: HFCheckpoint, expected: dict,
                           layer_prefix: str, num_layers: int) -> dict:
    """Our params (the arrays of `sd`, renamed and transposed) for the param tree `expected` (ShapeDtypeStructs,
    layers named f"{layer_prefix}{i}"). Tensors of `sd` that `expected` does not name are ignored, except a layer
    beyond `num_layers`, which means the checkpoint does not match its config."""
    reader = _StateDict(sd, ckpt)
    layer_re = re.compile(re.escape(layer_prefix) + r"(\d+)")
    params = {}
    for top, sub in expected.items():
        m = layer_re.fullmatch(top)
        if m is None:
            params[top] = reader.module(ckpt.modules[top], top, sub)
        else:
            base = ckpt.layer.format(int(m.group(1)))
            params[top] = {name: reader.module(f"{base}.{ckpt.modules[name]}", name, leaves)
                           for name, leaves in sub.items()}
    first = next(iter(expected[f"{layer_prefix}0"])) if num_layers else None
    if first is not None and reader.has(f"{ckpt.layer.format(num_layers)}.{ckpt.modules[first]}.weight"):
        raise ValueError(f"{ckpt.family} checkpoint has more layers than its config's {num_layers}")
    return params
