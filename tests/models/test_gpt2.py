"""GPT-2 (Flax) against transformers' PyTorch GPT2LMHeadModel: fp32 random weights saved with save_pretrained,
fresh random token ids per run. Figures are printed (`pytest -s`)."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import support
from yaie_jax.models import gpt2, load_model
from yaie_jax.models.attention_dense import dense_causal_attention


TINY_VOCAB = 384  # the tiny checkpoints' vocabulary (conftest.TINY_VOCAB)


def hf_logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.numpy()                    # [B, S, V]


def padded_batch(rng, lens, vocab):
    S = max(lens)
    ids = rng.integers(0, vocab, size=(len(lens), S))                            # [B, S]
    mask = (np.arange(S)[None, :] < np.array(lens)[:, None]).astype(np.int64)    # [B, S] right padding
    return ids * mask, mask


def max_diff_real_tokens(a, b, lens):
    return max(float(np.abs(a[i, :n] - b[i, :n]).max()) for i, n in enumerate(lens))


VARIANTS = {
    # name: GPT2Config overrides (odd widths, n_inner, epsilon, exact gelu, untied head, small position table)
    "odd_shapes": dict(n_layer=2, n_embd=48, n_head=3, n_inner=100, vocab_size=389, n_positions=40,
                       layer_norm_epsilon=1e-3),
    "gelu_exact": dict(n_layer=2, activation_function="gelu"),
    "gelu_pytorch_tanh": dict(n_layer=1, activation_function="gelu_pytorch_tanh"),
    "untied_head": dict(n_layer=2, tie_word_embeddings=False),
    "one_head": dict(n_layer=1, n_embd=32, n_head=1),
}


def test_logits_match_hf_padded_batch(tiny_gpt2_dir, tiny_gpt2_hf):
    rng = np.random.default_rng()
    lens = [23, 5, 14, 1]
    ids, mask = padded_batch(rng, lens, TINY_VOCAB)
    ours = load_model(tiny_gpt2_dir, dtype="float32").logits(ids, mask)
    assert ours.dtype == np.float32 and ours.shape == (4, 23, TINY_VOCAB)
    d = max_diff_real_tokens(ours, hf_logits(tiny_gpt2_hf, ids, mask), lens)
    print(f"\ntiny GPT-2 padded batch: max|diff| = {d:.2e}")
    assert d <= 1e-4
    # each row alone (no padding) gives the same logits as inside the padded batch
    alone = load_model(tiny_gpt2_dir, dtype="float32").logits(ids[1:2, :5])
    assert np.abs(alone[0] - ours[1, :5]).max() <= 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_hf_config_variants(tmp_path, variant, gpt2_factory):
    kw = VARIANTS[variant]
    hf = gpt2_factory.hf_model(seed=7, **kw)
    hf.save_pretrained(tmp_path)
    path = str(tmp_path)
    model = load_model(path, dtype="float32")
    assert ("lm_head" in model.params) == (variant == "untied_head")
    rng = np.random.default_rng()
    lens = [min(19, kw.get("n_positions", 128)), 7]
    ids, mask = padded_batch(rng, lens, kw.get("vocab_size", TINY_VOCAB))
    d = max_diff_real_tokens(model.logits(ids, mask), hf_logits(hf, ids, mask), lens)
    print(f"\n{variant}: max|diff| = {d:.2e}")
    assert d <= 1e-4


def test_gelu_and_gelu_new_are_told_apart(tmp_path, gpt2_factory):
    """The activation really follows the config: swapping gelu <-> gelu_new moves the logits far past 1e-4."""
    hf = gpt2_factory.hf_model(seed=5, activation_function="gelu")
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="float32")
    ids = np.random.default_rng().integers(0, TINY_VOCAB, size=(2, 16))
    ref = hf_logits(hf, ids)
    right = np.abs(model.logits(ids) - ref).max()
    wrong_cfg = dataclasses.replace(model.config, activation="gelu_new")
    wrong = np.abs(gpt2.GPT2ForCausalLM(wrong_cfg, model.params).logits(ids) - ref).max()
    print(f"\ngelu model: max|diff| {right:.2e} with gelu, {wrong:.2e} if computed with gelu_new")
    assert right <= 1e-4 and wrong > 20 * right


def test_activations_match_torch():
    """gelu_new = HF's tanh approximation, gelu = torch's exact erf GELU; the two differ by more than 1e-4."""
    from transformers.activations import ACT2FN
    x = np.linspace(-6, 6, 2001, dtype=np.float32)
    ours = {name: np.asarray(gpt2.activation_fn(name)(jnp.asarray(x))) for name in ("gelu_new", "gelu")}
    ref = {name: ACT2FN[name](torch.tensor(x)).numpy() for name in ("gelu_new", "gelu")}
    for name in ours:
        assert np.abs(ours[name] - ref[name]).max() <= 1e-6, name
    assert np.abs(ref["gelu_new"] - ref["gelu"]).max() > 1e-4


@pytest.mark.slow
def test_logits_match_hf_124m(tmp_path, gpt2_factory):
    kw = dict(vocab_size=50257, n_layer=12, n_embd=768, n_head=12, n_positions=1024)
    hf = gpt2_factory.hf_model(seed=11, initializer_range=0.02, **kw)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="float32")
    assert model.config.num_layers == 12 and model.config.hidden_size == 768
    lens = [20, 11]
    ids, mask = padded_batch(np.random.default_rng(), lens, 50257)
    d = max_diff_real_tokens(model.logits(ids, mask), hf_logits(hf, ids, mask), lens)
    print(f"\n124M GPT-2: max|diff| = {d:.2e}")
    assert d <= 1e-4


def test_greedy_32_tokens_match_generate(tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir, dtype="float32")
    prompt = np.random.default_rng().integers(1, TINY_VOCAB, size=9).tolist()
    new = 32
    buf = np.zeros((1, len(prompt) + new), np.int64)  # fixed shape: one compile; causal, so the tail is ignored
    buf[0, :len(prompt)] = prompt
    for n in range(len(prompt), len(prompt) + new):
        buf[0, n] = int(model.logits(buf)[0, n - 1].argmax())
    ours = buf[0, len(prompt):].tolist()
    support.assert_same_greedy(tiny_gpt2_dir, prompt, ours, support.hf_greedy(tiny_gpt2_dir, prompt, new))


def test_bf16_close_to_fp32(tiny_gpt2_dir):
    ids = np.random.default_rng().integers(0, TINY_VOCAB, size=(2, 24))
    f32 = load_model(tiny_gpt2_dir, dtype="float32").logits(ids)
    b16_model = load_model(tiny_gpt2_dir, dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(b16_model.params))
    b16 = b16_model.logits(ids)
    assert b16.dtype == np.float32
    rel = float(np.linalg.norm(b16 - f32) / np.linalg.norm(f32))
    print(f"\nbf16 vs fp32 logits: relative error {rel:.2e}")
    assert rel <= 2e-2


def test_gradients_match_torch(tiny_gpt2_dir, tiny_gpt2_hf):
    """d(mean next-token loss)/d(every parameter) against torch autograd."""
    model = load_model(tiny_gpt2_dir, dtype="float32")
    B, S = 3, 16
    ids = np.random.default_rng().integers(0, TINY_VOCAB, size=(B, S))

    def loss_fn(params, input_ids):
        positions = jnp.broadcast_to(jnp.arange(S), (B, S))
        hidden, _ = model.apply_hidden(params, input_ids, positions, dense_causal_attention(), None)
        logp = jax.nn.log_softmax(model.apply_logits(params, hidden)[:, :-1], -1)     # [B, S-1, V]
        return -jnp.take_along_axis(logp, input_ids[:, 1:, None], -1).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(model.params, jnp.asarray(ids, jnp.int32))

    hf = tiny_gpt2_hf
    hf.zero_grad()
    out = hf(torch.tensor(ids), labels=torch.tensor(ids))
    out.loss.backward()
    hf_grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    ref = gpt2.params_from_hf(hf_grads, model.config)  # renames HF grads into our pytree layout
    hf.zero_grad()

    rel = {jax.tree_util.keystr(path): float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))
           for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(ref))}
    worst = max(rel, key=rel.get)
    print(f"\ngradients: loss {float(loss):.6f} vs torch {out.loss.item():.6f}; {len(rel)} tensors, max rel err "
          f"{rel[worst]:.2e} ({worst})")
    assert abs(float(loss) - out.loss.item()) <= 1e-5
    assert len(rel) == len(hf_grads)
    assert rel[worst] <= 1e-4


def test_ragged_flat_batch_through_the_attention_callable(tiny_gpt2_dir, tiny_gpt2_hf):
    """The engine's calling convention: one flat [T] batch of several sequences with arbitrary positions, the
    engine's own attention callable, per-layer kv_caches passed through in layer order."""
    model = load_model(tiny_gpt2_dir, dtype="float32")
    rng = np.random.default_rng()
    lens = [6, 1, 9]
    seqs = [rng.integers(0, TINY_VOCAB, size=n) for n in lens]
    flat_ids = np.concatenate(seqs).astype(np.int32)                                     # [T]
    positions = np.concatenate([np.arange(n) for n in lens]).astype(np.int32)           # [T]
    seg = np.repeat(np.arange(len(lens)), lens)                                          # [T]
    calls = []

    def segment_attention(layer_idx, q, k, v, kv_cache):
        # q, k, v [T, H, Dh]: causal inside each sequence, nothing across sequences
        calls.append((layer_idx, kv_cache))
        allowed = (seg[:, None] == seg[None, :]) & (positions[:, None] >= positions[None, :])   # [T, T]
        s = jnp.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
        p = jax.nn.softmax(jnp.where(allowed[None], s, -1e30), -1)
        return jnp.einsum("hqk,khd->qhd", p, v), kv_cache + 1

    caches = [jnp.full((2,), 10 * i, jnp.int32) for i in range(model.config.num_layers)]   # stand-in caches
    step = jax.jit(lambda p, i, pos, c: model.apply_hidden(p, i, pos, segment_attention, c))
    hidden, new_caches = step(model.params, jnp.asarray(flat_ids), jnp.asarray(positions), caches)
    assert [c for c, _ in calls] == list(range(model.config.num_layers))   # traced once, layers in order
    assert [int(c[0]) for c in new_caches] == [10 * i + 1 for i in range(model.config.num_layers)]
    ours = np.asarray(model.apply_logits(model.params, hidden))                         # [T, V] float32
    starts = np.cumsum([0] + lens)
    d = max(float(np.abs(ours[starts[i]:starts[i + 1]] - hf_logits(tiny_gpt2_hf, s[None])[0]).max())
            for i, s in enumerate(seqs))
    print(f"\nflat ragged batch: max|diff| = {d:.2e}")
    assert d <= 1e-4


@pytest.mark.parametrize("opt", [{"reorder_and_upcast_attn": True}, {"scale_attn_by_inverse_layer_idx": True},
                                 {"scale_attn_weights": False}, {"add_cross_attention": True},
                                 {"activation_function": "relu"}, {"activation_function": "gelu_fast"}])
def test_unsupported_options_raise(tmp_path, opt, gpt2_factory):
    path = gpt2_factory.make_dir(tmp_path, n_layer=1)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(opt)
    cfg_path.write_text(json.dumps(cfg))
    key = list(opt)[0]
    with pytest.raises(ValueError, match=key):
        load_model(path)
    with pytest.raises(ValueError, match=key):
        gpt2.config_from_hf(cfg)


def test_checkpoint_not_matching_config_raises(tmp_path, gpt2_factory):
    path = gpt2_factory.make_dir(tmp_path, n_layer=2)
    cfg_path = tmp_path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["n_embd"] = 128
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape"):
        load_model(path)
