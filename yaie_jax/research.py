"""JAX-native research loop on any model the engine serves: losses, perplexity, an optax training step, and
saving the result in the directory format `load_model` (and so `LLM` and the server) read.

    model = load_model(path, dtype="float32")
    step = make_train_step(model, optax_adamw(3e-3))
    params, opt_state = model.params, step.init(model.params)
    params, opt_state, loss = step(params, opt_state, batch_ids)   # batch_ids int [B, S]
    save_for_serving(model, params, "out_dir", tokenizer)           # then LLM("out_dir")
"""
from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .models.attention_dense import dense_causal_attention


def next_token_loss(model, params, input_ids, mask=None):
    """Mean cross-entropy of predicting token t+1 from tokens <= t. input_ids int [B, S]; mask [B, S] (1 = real
    token, right padding 0) excludes padded targets. Differentiable in params."""
    B, S = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    hidden, _ = model.apply_hidden(params, input_ids, positions, dense_causal_attention(mask), None)
    logits = model.apply_logits(params, hidden[:, :-1])                       # [B, S-1, V] float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]  # [B, S-1]
    w = jnp.ones_like(nll) if mask is None else mask[:, 1:].astype(nll.dtype)
    return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)


def perplexity(model, input_ids: np.ndarray, mask: Optional[np.ndarray] = None, params=None) -> float:
    """exp(mean next-token loss) of `input_ids [B, S]` under the model."""
    params = model.params if params is None else params
    ids = jnp.asarray(np.asarray(input_ids, np.int32))
    m = None if mask is None else jnp.asarray(mask, jnp.int32)
    loss = jax.jit(lambda p, i, mm: next_token_loss(model, p, i, mm))(params, ids, m)
    return float(jnp.exp(loss))


def optax_adamw(learning_rate: float = 1e-3, weight_decay: float = 0.01, clip_norm: float = 1.0):
    """AdamW with global-norm gradient clipping."""
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(learning_rate, weight_decay=weight_decay))


class TrainStep(NamedTuple):
    init: Callable
    step: Callable

    def __call__(self, params, opt_state, input_ids, mask=None):
        return self.step(params, opt_state, input_ids, mask)


def make_train_step(model, optimizer) -> TrainStep:
    """A jitted (params, opt_state, ids [B, S], mask) -> (params, opt_state, loss) step."""

    def step(params, opt_state, input_ids, mask):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(model, p, input_ids, mask))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return TrainStep(init=optimizer.init, step=jax.jit(step))


def save_for_serving(model, params, path: str, tokenizer=None) -> str:
    """Save trained params (orbax) + config, and the tokenizer beside them, as a directory `LLM(path)` loads."""
    from .models.loader import save_model
    host = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)
    out = type(model)(model.config, host)
    save_model(out, path)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    return path
