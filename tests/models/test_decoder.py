"""The shared decoder pieces (models/base.py, decoder.py, hf_checkpoint.py) on their own: checkpoint conversion
refuses checkpoints that do not match their config, `param_shapes` (traced for one layer) is the full module's
tree, and a DecoderSpec names only kinds the block implements. Numerics are covered per family against HF
(test_gpt2.py, test_llama.py)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from yaie_jax.models import gpt2, llama
from yaie_jax.models.attention_dense import dense_causal_attention
from yaie_jax.models.config import ModelConfig
from yaie_jax.models.decoder import DecoderSpec


def hf_llama(**overrides):
    """(state dict as numpy, config.json dict) of a random tiny transformers Llama (2 layers, GQA)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    kw = dict(vocab_size=64, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=32, tie_word_embeddings=False)
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}, model.config.to_dict()


def test_llama_checkpoint_not_matching_config_raises():
    sd, hf = hf_llama(attention_bias=True)
    cfg = llama.config_from_hf(hf)
    params = llama.params_from_hf(sd, cfg)
    q_weight = sd["model.layers.1.self_attn.q_proj.weight"]                      # HF Linear [out, in]
    np.testing.assert_array_equal(params["layers_1"]["q_proj"]["kernel"], q_weight.T)
    np.testing.assert_array_equal(params["layers_0"]["k_proj"]["bias"], sd["model.layers.0.self_attn.k_proj.bias"])
    with pytest.raises(ValueError, match=r"'layers\.0\.mlp\.\w+\.weight' has shape"):
        llama.params_from_hf(sd, dataclasses.replace(cfg, intermediate_size=40))
    with pytest.raises(ValueError, match="more layers than its config"):
        llama.params_from_hf(sd, dataclasses.replace(cfg, num_layers=1))
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="missing tensor 'layers.1.mlp.up_proj.weight'"):
        llama.params_from_hf(sd, cfg)
    del sd["lm_head.weight"]
    with pytest.raises(KeyError, match="lm_head.weight.*tie_word_embeddings is false"):
        llama.params_from_hf(sd, cfg)


@pytest.mark.parametrize("family, cfg", [
    (gpt2, ModelConfig(arch="gpt2", vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=4,
                       head_dim=8, intermediate_size=40, max_position_embeddings=16, norm_eps=1e-5,
                       tie_word_embeddings=False)),
    (llama, ModelConfig(arch="llama", vocab_size=50, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                        head_dim=8, intermediate_size=40, max_position_embeddings=16, norm_eps=1e-5,
                        activation="silu", mlp_bias=True))])
def test_param_shapes_is_the_full_modules_tree(family, cfg):
    model = (family.GPT2ForCausalLM if family is gpt2 else family.LlamaForCausalLM)(cfg)
    ids = jnp.zeros((1, 2), jnp.int32)
    full = jax.eval_shape(lambda: model.module.init(jax.random.PRNGKey(0), ids, ids, dense_causal_attention(),
                                                    None))["params"]
    ours = model.param_shapes()
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(full)
    assert jax.tree_util.tree_leaves(ours) == jax.tree_util.tree_leaves(full)
    assert sorted(k for k in ours if k[-1].isdigit()) == sorted(f"{model.spec.layer_prefix}{i}" for i in range(3))


@pytest.mark.parametrize("field, value", [("norm", "batchnorm"), ("positions", "alibi"), ("qkv", "fused_gqa"),
                                          ("mlp", "moe")])
def test_decoder_spec_rejects_kinds_the_block_lacks(field, value):
    with pytest.raises(ValueError, match=f"DecoderSpec.{field}='{value}'"):
        DecoderSpec(**{field: value})
