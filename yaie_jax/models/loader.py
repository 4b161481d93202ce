"""Turn a model source into a model (config + params as numpy arrays in the requested dtype).

Sources, tried in this order:
  * a yaie orbax directory (written by `save_model`; has `yaie_model.json`) - the fast path
  * a `.gguf` file (llama.cpp format; see models/gguf.py)
  * a local HF directory: config.json with model.safetensors, sharded safetensors + index, or pytorch_model.bin
  * a HF hub id, through huggingface_hub's cache (a clear error when offline)
safetensors and GGUF are read into numpy directly: no torch at run time (only a .bin checkpoint needs torch).
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from .config import ModelConfig
from .registry import family

MARKER = "yaie_model.json"
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
HF_WEIGHT_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                      "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json", "*.model"]


def np_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in NP_DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r} (supported: {', '.join(NP_DTYPES)})")
        return np.dtype(NP_DTYPES[dtype])
    return np.dtype(dtype)


def resolve_source(source: str) -> str:
    """A local path for `source`: itself if it exists, else a hub snapshot (downloaded or cached)."""
    path = os.path.expanduser(source)
    if os.path.exists(path):
        return path
    if source.count("/") > 1 or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {source!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(source, allow_patterns=HF_WEIGHT_PATTERNS)
    except Exception as e:  # offline, unknown id, no network
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise OSError(
            f"could not load model {source!r}: it is not a local path and the HF hub could not provide it "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). HF_HUB_OFFLINE={offline}: with no "
            f"network, download it elsewhere and pass its directory, or set HF_HUB_OFFLINE=1 to use only the "
            f"local cache.") from e


def read_hf_state_dict(path: str) -> Dict[str, np.ndarray]:
    """All tensors of a HF checkpoint directory as numpy arrays (safetensors, sharded safetensors or .bin)."""
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    binfile = os.path.join(path, "pytorch_model.bin")
    if os.path.exists(single):
        files = [single]
    elif os.path.exists(index):
        with open(index) as f:
            files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    elif os.path.exists(binfile):
        return _read_bin(binfile)
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    from safetensors import safe_open
    out: Dict[str, np.ndarray] = {}
    bar = tqdm(desc=f"loading {os.path.basename(os.path.normpath(path))}", unit="tensor", leave=False)
    for fname in files:
        with safe_open(fname, framework="numpy") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
                bar.update(1)
    bar.close()
    return out


def _read_bin(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a PyTorch .bin checkpoint, which needs torch to read: pip install torch, or "
                          f"convert the checkpoint to safetensors") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
            for k, v in tqdm(sd.items(), desc="loading .bin", unit="tensor", leave=False)}


def hf_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def config_from_hf_dir(path: str) -> Tuple[ModelConfig, object]:
    hf = hf_config(path)
    arch = hf.get("model_type")
    mod, _ = family(arch)
    return mod.config_from_hf(hf), mod


def cast_params(params, dtype) -> dict:
    import jax
    dt = np_dtype(dtype)
    return jax.tree_util.tree_map(lambda a: np.asarray(a).astype(dt), params)


def load_model(source: str, dtype="bfloat16"):
    """Load a model from any supported source. Returns an object with `.config`, `.params` (numpy) and the
    models/base.py methods."""
    np_dtype(dtype)
    path = resolve_source(str(source))
    if os.path.isdir(path) and os.path.exists(os.path.join(path, MARKER)):
        return load_saved(path, dtype)
    if path.endswith(".gguf"):
        from .gguf import load_gguf
        return load_gguf(path, dtype=dtype)
    if not os.path.isdir(path):
        raise ValueError(f"{source!r} is neither a model directory nor a .gguf file")
    cfg, mod = config_from_hf_dir(path)
    _, cls = family(cfg.arch)
    params = mod.params_from_hf(read_hf_state_dict(path), cfg)
    return cls(cfg, cast_params(params, dtype))


def save_model(model, path: str) -> str:
    """Save converted params with orbax plus the config, in the directory format `load_model` reads fast."""
    import orbax.checkpoint as ocp
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    ckpt = ocp.PyTreeCheckpointer()
    target = os.path.join(path, "params")
    ckpt.save(target, model.params, force=True)
    with open(os.path.join(path, MARKER), "w") as f:
        f.write(model.config.to_json())
    return path


def load_saved(path: str, dtype="bfloat16"):
    import orbax.checkpoint as ocp
    with open(os.path.join(path, MARKER)) as f:
        cfg = ModelConfig.from_json(f.read())
    params = ocp.PyTreeCheckpointer().restore(os.path.join(path, "params"))
    _, cls = family(cfg.arch)
    return cls(cfg, cast_params(params, dtype))
