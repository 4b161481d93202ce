"""Model architecture description shared by every model family, loader and the engine.

Built by loaders from a HF `config.json`, GGUF metadata or an orbax directory; never from guesses.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str                       # "gpt2" | "llama"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int                  # query heads
    num_kv_heads: int               # = num_heads for GPT-2 (MHA); fewer for GQA
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float                 # layer_norm_epsilon (GPT-2) / rms_norm_eps (Llama)
    tie_word_embeddings: bool = True
    activation: str = "gelu_new"    # "gelu_new" (GPT-2) | "silu" (Llama SwiGLU)
    rope_theta: float = 10000.0     # Llama only
    rope_scaling: Optional[dict] = None  # Llama only; None = plain RoPE
    attention_bias: bool = False    # Llama: q/k/v/o biases
    mlp_bias: bool = False          # Llama: MLP biases
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    # GPT-2's fused QKV columns: 1 = HF order [q | k | v]; G = grouped for G tensor-parallel shards,
    # [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (q_g: the g-th of G slices of q's heads), see parallel.group_fused_qkv
    qkv_groups: int = 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        return cls(**json.loads(text))

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token over all layers, for a 2-byte (bf16) cache."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2
