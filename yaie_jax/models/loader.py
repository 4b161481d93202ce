"""Turn a model source into a model: a ModelConfig plus params as numpy arrays of the requested dtype.

    model = load_model(source, dtype="bfloat16")     # -> e.g. GPT2ForCausalLM (models/base.py contract)
    model = load_model(source, quantization="int8")  # projection kernels quantized at load (yaie_jax/quantization)
    config = load_model_config(source)               # ModelConfig only, without reading weights
    save_model(model, out_dir, tokenizer=None)       # the fast-path directory (orbax params + config)

Sources, tried in this order:
  * a directory written by `save_model` (marker file `yaie_model.json`: the ModelConfig as JSON; params in
    `params/` with orbax; the tokenizer, when saved, in `tokenizer/`) - the fast path, no conversion
  * a path ending in `.gguf` (llama.cpp format; models/gguf.py)
  * a local HF directory: config.json with model.safetensors, sharded safetensors with
    model.safetensors.index.json, or pytorch_model.bin (also sharded with its index)
  * a HF hub id, through huggingface_hub's cache. With no network the cache is used; if the model is not
    there, an OSError names the id and the HF_HUB_OFFLINE setting. The first hub request is bounded by
    `hub_timeout_s` (the engine argument; default: EngineConfig's, 10 s or its environment alias
    YAIE_HUB_TIMEOUT_S), because huggingface_hub's own metadata request has no timeout.
safetensors and GGUF are read straight into numpy (no torch at run time); only a .bin checkpoint needs torch.
The architecture comes from config.json's `model_type` through models/registry.py.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from ..config import env_default
from .config import ModelConfig
from .registry import family

MARKER = "yaie_model.json"           # in a save_model directory: the ModelConfig as JSON
PARAMS_SUBDIR = "params"             # orbax checkpoint of the params pytree
TOKENIZER_SUBDIR = "tokenizer"       # optional: the tokenizer, saved with save_pretrained
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# Files fetched from the hub besides the weights (config, generation config, tokenizer files)
HUB_META_PATTERNS = ["config.json", "generation_config.json", "tokenizer*", "vocab.json", "merges.txt",
                     "special_tokens_map.json", "added_tokens.json", "*.model", "*.tiktoken", "chat_template*"]
SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


# ------------------------------------------------------------------------------------------------- dtypes

def np_dtype(dtype) -> np.dtype:
    """numpy dtype for "float32" | "bfloat16" | "float16" (or any numpy / jnp dtype)."""
    if isinstance(dtype, str):
        if dtype not in NP_DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r} (supported: {', '.join(NP_DTYPES)})")
        return np.dtype(NP_DTYPES[dtype])
    return np.dtype(dtype)


FLOAT_DTYPES = tuple(np.dtype(d) for d in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16))


def cast_params(params, dtype) -> dict:
    """The params pytree as numpy arrays, its float leaves cast to `dtype` (no copy for leaves already of that
    dtype); quantized leaves (int8, int4, float8) are kept as they are."""
    import jax
    dt = np_dtype(dtype)

    def one(a):
        a = np.asarray(a)
        return a.astype(dt, copy=False) if a.dtype in FLOAT_DTYPES else a
    return jax.tree_util.tree_map(one, params)


def quantize_model(model, quantization: Optional[str], group_size: int = 128):
    """`model` with its projection kernels quantized (`quantization`: None | "int8" | "int4" | "fp8"; int4 groups
    of `group_size` input rows); None returns it unchanged. See yaie_jax/quantization."""
    if quantization is None:
        return model
    from ..quantization import quantize_params
    return type(model)(model.config, quantize_params(model.params, quantization, group_size))


# ---------------------------------------------------------------------------------------------- hub / paths

def _hub_offline() -> bool:
    from huggingface_hub import constants
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or env


def _looks_like_local_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(".gguf") \
        or os.sep in source and os.sep != "/"


def weight_patterns(files: List[str]) -> List[str]:
    """allow_patterns for a hub repo with these files: safetensors when present, else PyTorch .bin."""
    if any(f.endswith(".safetensors") for f in files):
        return SAFETENSORS_PATTERNS
    if any(f.startswith("pytorch_model") and f.endswith(".bin") for f in files):
        return BIN_PATTERNS
    return []


def hub_snapshot(repo_id: str, patterns: Optional[Callable[[List[str]], List[str]]] = None,
                 hub_timeout_s: Optional[float] = None) -> str:
    """Local snapshot directory of hub repo `repo_id` with the config/tokenizer files and the files chosen by
    `patterns(repo_files)`. Uses the cache when offline or when the hub cannot be reached; raises OSError naming
    the id and the offline setting when neither works. The first request waits at most `hub_timeout_s` seconds
    (None: EngineConfig's default)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    offline = _hub_offline()
    cause: Optional[BaseException] = None
    if not offline:
        timeout_s = float(env_default("hub_timeout_s") if hub_timeout_s is None else hub_timeout_s)
        try:
            # Bounded preflight: snapshot_download's own repo_info request has no timeout and can hang for
            # minutes on a network that swallows packets.
            info = HfApi().model_info(repo_id, timeout=timeout_s)
        except HFValidationError as e:
            raise OSError(f"{repo_id!r} is neither an existing local path nor a valid HF hub model id") from e
        except (RepositoryNotFoundError, RevisionNotFoundError) as e:
            raise OSError(f"HF hub model {repo_id!r} was not found (or it is private/gated: log in with "
                          f"`hf auth login` or set HF_TOKEN)") from e
        except Exception as e:  # no network, DNS failure, timeout, hub down: fall back to the cache
            cause = e
        else:
            files = [s.rfilename for s in (info.siblings or [])]
            allow = HUB_META_PATTERNS + (patterns(files) if patterns else [])
            # revision left at "main" (not info.sha) so the cache records refs/main for later offline loads
            return snapshot_download(repo_id, allow_patterns=allow)
    try:
        return _cached_snapshot(repo_id, want_weights=patterns is not None)
    except Exception as e:
        why = ("HF_HUB_OFFLINE=1 (offline mode): only the local cache is used"
               if offline else f"the HF hub could not be reached ({type(cause).__name__}: "
                               f"{_first_line(cause)}; HF_HUB_OFFLINE is not set)")
        raise OSError(
            f"could not load {repo_id!r}: it is not a local path, it is not in the local HF cache, and {why}. "
            f"Download it on a machine with network access (e.g. `hf download {repo_id}`) and pass its "
            f"directory, or fill the HF cache (HF_HOME) and set HF_HUB_OFFLINE=1.") from (cause or e)


def _has_weights(path: str) -> bool:
    return any(f.endswith(".safetensors") or (f.startswith("pytorch_model") and f.endswith(".bin"))
               for f in os.listdir(path))


def _cached_snapshot(repo_id: str, want_weights: bool) -> str:
    """The cached snapshot of `repo_id`, without network. Tried with the same allow_patterns an online download
    used (recent huggingface_hub checks a cached snapshot's completeness against them)."""
    from huggingface_hub import snapshot_download
    error: Optional[BaseException] = None
    for extra in ([SAFETENSORS_PATTERNS, BIN_PATTERNS] if want_weights else [[]]):
        try:
            path = snapshot_download(repo_id, local_files_only=True, allow_patterns=HUB_META_PATTERNS + extra)
        except Exception as e:
            error = e
            continue
        if not want_weights or _has_weights(path):
            return path
        error = FileNotFoundError(f"the cached snapshot {path} has no weights")
    raise error


def _first_line(e) -> str:
    text = str(e) if e is not None else ""
    return text.strip().splitlines()[0][:200] if text.strip() else ""


def resolve_source(source: str, patterns: Optional[Callable[[List[str]], List[str]]] = weight_patterns,
                   hub_timeout_s: Optional[float] = None) -> str:
    """A local path for `source`: itself if it exists, else a hub snapshot (downloaded or cached) holding the
    config, tokenizer and the files chosen by `patterns` (by default the weights; `hub_snapshot`)."""
    source = str(source)
    path = os.path.expanduser(source)
    if os.path.exists(path):
        return path
    if _looks_like_local_path(source):
        raise FileNotFoundError(f"model path {source!r} does not exist")
    return hub_snapshot(source, patterns, hub_timeout_s)


# ------------------------------------------------------------------------------------------- HF checkpoints

def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (not a HF model directory)")
    with open(cfg_path) as f:
        return json.load(f)


def hf_config(path: str) -> dict:  # kept for callers of the earlier name
    return read_hf_config(path)


def config_from_hf_dir(path: str):
    """(ModelConfig, family module) of a HF model directory."""
    hf = read_hf_config(path)
    mod, _ = family(hf.get("model_type"))
    return mod.config_from_hf(hf), mod


def checkpoint_files(path: str) -> List[str]:
    """The weight files of a HF directory, in load order (safetensors preferred over .bin)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                weight_map = json.load(f)["weight_map"]
            return [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                            f"(a .gguf file must be passed as the path of the file itself)")


def read_hf_state_dict(path: str, dtype=None) -> Dict[str, np.ndarray]:
    """All tensors of a HF checkpoint directory as numpy arrays (cast to `dtype` while reading, which keeps the
    peak host memory near one copy of the model in that dtype)."""
    files = checkpoint_files(path)
    dt = None if dtype is None else np_dtype(dtype)
    out: Dict[str, np.ndarray] = {}
    name = os.path.basename(os.path.normpath(path))
    if files[0].endswith(".bin"):
        for fname in files:
            for key, arr in _read_bin(fname).items():
                out[key] = arr if dt is None else arr.astype(dt, copy=False)
        return out
    from safetensors import safe_open
    handles = [safe_open(fname, framework="numpy") for fname in files]
    total = sum(len(list(h.keys())) for h in handles)
    with tqdm(total=total, desc=f"loading {name}", unit="tensor", leave=False) as bar:
        for h in handles:
            for key in h.keys():
                arr = h.get_tensor(key)
                out[key] = arr if dt is None else arr.astype(dt, copy=False)
                bar.update(1)
    return out


def _read_bin(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path} is a PyTorch .bin checkpoint, which needs torch to read: `pip install torch` "
                          f"(CPU build is enough), or convert the checkpoint to safetensors") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for k, v in tqdm(sd.items(), desc=f"loading {os.path.basename(path)}", unit="tensor", leave=False):
        v = v.detach()
        out[k] = v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()  # numpy has no torch bf16
    return out


# ---------------------------------------------------------------------------------------------- public API

def is_saved_dir(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, MARKER))


def load_model(source, dtype="bfloat16", hub_timeout_s: Optional[float] = None,
               quantization: Optional[str] = None, quantization_group_size: int = 128):
    """Load a model from any supported source (see the module docstring). Returns the family's model object
    (`.config`, `.params` as numpy arrays of `dtype`, and the models/base.py methods). `hub_timeout_s`: see
    `hub_snapshot`. `quantization` (None | "int8" | "int4" | "fp8"): quantize the projection kernels after
    loading (`quantize_model`; int4 groups of `quantization_group_size` input rows)."""
    np_dtype(dtype)  # reject a bad dtype before any download
    from ..quantization import MODES
    if quantization is not None and quantization not in MODES:
        raise ValueError(f"unknown quantization {quantization!r} (supported: {', '.join(MODES)})")
    model = _load_unquantized(source, dtype, hub_timeout_s)
    return quantize_model(model, quantization, quantization_group_size)


def _load_unquantized(source, dtype, hub_timeout_s):
    source = str(source)
    if source.endswith(".gguf"):
        path = os.path.expanduser(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"GGUF file {source!r} does not exist")
        from .gguf import load_gguf
        return load_gguf(path, dtype=dtype)
    path = resolve_source(source, hub_timeout_s=hub_timeout_s)
    if is_saved_dir(path):
        return load_saved(path, dtype)
    if not os.path.isdir(path):
        raise ValueError(f"{source!r} is neither a model directory nor a .gguf file")
    cfg, mod = config_from_hf_dir(path)
    _, cls = family(cfg.arch)
    params = mod.params_from_hf(read_hf_state_dict(path, dtype), cfg)
    return cls(cfg, cast_params(params, dtype))


def load_model_config(source, hub_timeout_s: Optional[float] = None) -> ModelConfig:
    """The ModelConfig of `source` without reading its weights (for a hub id, only config.json is fetched;
    `hub_timeout_s`: see `hub_snapshot`)."""
    source = str(source)
    if source.endswith(".gguf"):
        import importlib
        gguf = importlib.import_module(__package__ + ".gguf")
        if hasattr(gguf, "load_gguf_config"):
            return gguf.load_gguf_config(source)
        return gguf.load_gguf(source, dtype="bfloat16").config  # no cheaper path in models/gguf.py yet
    path = resolve_source(source, patterns=None, hub_timeout_s=hub_timeout_s)
    if is_saved_dir(path):
        with open(os.path.join(path, MARKER)) as f:
            return ModelConfig.from_json(f.read())
    return config_from_hf_dir(path)[0]


def save_model(model, path: str, tokenizer=None) -> str:
    """Write `model` (config + params, in their current dtype) as a directory `load_model` reads without any
    conversion: `yaie_model.json` (ModelConfig), `params/` (orbax), and `tokenizer/` when a tokenizer is given.
    Overwrites an earlier save in `path`."""
    import jax
    import orbax.checkpoint as ocp
    path = os.path.abspath(os.path.expanduser(str(path)))
    os.makedirs(path, exist_ok=True)
    marker = os.path.join(path, MARKER)
    if os.path.exists(marker):
        os.remove(marker)  # re-added last, so an interrupted save never looks complete
    host = jax.tree_util.tree_map(np.asarray, model.params)  # device arrays -> numpy leaves, dtypes kept
    ocp.PyTreeCheckpointer().save(os.path.join(path, PARAMS_SUBDIR), host, force=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(path, TOKENIZER_SUBDIR))
    with open(marker, "w") as f:  # written last: a directory with the marker is complete
        f.write(model.config.to_json())
    return path


def load_saved(path: str, dtype="bfloat16"):
    """Load a directory written by `save_model`."""
    import orbax.checkpoint as ocp
    with open(os.path.join(path, MARKER)) as f:
        cfg = ModelConfig.from_json(f.read())
    _, cls = family(cfg.arch)
    params = ocp.PyTreeCheckpointer().restore(os.path.join(os.path.abspath(path), PARAMS_SUBDIR))
    return cls(cfg, cast_params(params, dtype))
