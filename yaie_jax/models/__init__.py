"""Model families (GPT-2, Llama) and their loaders.

`load_model(source, dtype)` -> a model implementing models/base.py; `load_model_config(source)` -> ModelConfig;
`save_model(model, path, tokenizer=None)` writes the fast-path directory `load_model` reads.
"""
from .config import ModelConfig
from .loader import load_model, load_model_config, save_model

__all__ = ["ModelConfig", "load_model", "load_model_config", "save_model"]
