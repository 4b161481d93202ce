"""Model families (GPT-2, Llama) and their loaders."""
from .config import ModelConfig
from .loader import load_model, save_model

__all__ = ["ModelConfig", "load_model", "save_model"]
