"""GPT-2 parity with HF transformers (PyTorch, fp32, random weights saved with save_pretrained)."""
import numpy as np
import pytest
import torch

import support
from yaie_jax.models import load_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return support.make_gpt2_dir(str(tmp_path_factory.mktemp("g")), n_layer=3, n_embd=64, n_head=4, seed=1)


def hf_model(path):
    from transformers import GPT2LMHeadModel
    return GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()


def test_logits_match_hf_padded_batch(tiny):
    rng = np.random.default_rng()
    lens = [17, 5, 11]
    S = max(lens)
    ids = rng.integers(0, 384, size=(3, S))
    mask = np.array([[1] * n + [0] * (S - n) for n in lens])
    ours = load_model(tiny, dtype="float32").logits(ids, mask)
    ref = hf_model(tiny)(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.detach().numpy()
    diffs = [np.abs(ours[i, :n] - ref[i, :n]).max() for i, n in enumerate(lens)]
    print("tiny max|diff|", max(diffs))
    assert max(diffs) <= 1e-4


@pytest.mark.slow
def test_logits_match_hf_124m(tmp_path):
    path = support.make_gpt2_dir(str(tmp_path), vocab_size=50257, n_layer=12, n_embd=768, n_head=12,
                                 n_positions=1024, initializer_range=0.02, with_tokenizer=False)
    rng = np.random.default_rng()
    ids = rng.integers(0, 50257, size=(2, 24))
    ours = load_model(path, dtype="float32").logits(ids)
    ref = hf_model(path)(torch.tensor(ids)).logits.detach().numpy()
    d = np.abs(ours - ref).max()
    print("124M max|diff|", d)
    assert d <= 1e-4


def test_greedy_32_tokens_match_generate(tiny):
    model = load_model(tiny, dtype="float32")
    rng = np.random.default_rng()
    prompt = rng.integers(1, 384, size=9).tolist()
    ids = list(prompt)
    for _ in range(32):
        ids.append(int(model.logits(np.array([ids]))[0, -1].argmax()))
    support.assert_same_greedy(tiny, prompt, ids[len(prompt):], support.hf_greedy(tiny, prompt, 32))


def save_bin(model, path):
    """A legacy pytorch_model.bin checkpoint (transformers 5 no longer writes them)."""
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(path))
    torch.save(model.state_dict(), str(path / "pytorch_model.bin"))


def test_formats_give_identical_params(tmp_path):
    import jax
    from transformers import GPT2LMHeadModel
    from yaie_jax.models import save_model
    base = support.make_gpt2_dir(str(tmp_path / "st"), seed=3, with_tokenizer=False)
    model = GPT2LMHeadModel.from_pretrained(base)
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    save_bin(model, tmp_path / "bin")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert (tmp_path / "bin" / "pytorch_model.bin").exists()
    ref = load_model(base, dtype="float32")
    save_model(ref, str(tmp_path / "orbax"))
    for other in ("sharded", "bin", "orbax"):
        m = load_model(str(tmp_path / other), dtype="float32")
        assert m.config == ref.config
        same = jax.tree_util.tree_map(lambda a, b: a.shape == b.shape and bool(np.array_equal(a, b)),
                                      ref.params, m.params)
        assert all(jax.tree_util.tree_leaves(same)), other


def test_bf16_close_to_fp32(tiny):
    ids = np.random.default_rng().integers(0, 384, size=(2, 16))
    f32 = load_model(tiny, dtype="float32").logits(ids)
    b16 = load_model(tiny, dtype="bfloat16").logits(ids)
    rel = np.linalg.norm(b16 - f32) / np.linalg.norm(f32)
    print("bf16 rel err", rel)
    assert rel <= 2e-2


def test_gradients_match_torch(tiny):
    import jax
    import jax.numpy as jnp
    model = load_model(tiny, dtype="float32")
    ids = np.random.default_rng().integers(0, 384, size=(2, 12))

    def loss(params):
        pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
        from yaie_jax.models.attention_dense import dense_causal_attention
        h, _ = model.apply_hidden(params, jnp.asarray(ids), pos, dense_causal_attention(), None)
        logits = model.apply_logits(params, h)[:, :-1]
        lp = jax.nn.log_softmax(logits, -1)
        return -jnp.take_along_axis(lp, jnp.asarray(ids)[:, 1:, None], -1).mean()

    g = jax.grad(loss)(model.params)
    hf = hf_model(tiny)
    out = hf(torch.tensor(ids), labels=torch.tensor(ids))
    out.loss.backward()
    pairs = {
        "wte": (g["wte"]["embedding"], hf.transformer.wte.weight.grad),
        "attn_qkv": (g["h_1"]["attn_qkv"]["kernel"], hf.transformer.h[1].attn.c_attn.weight.grad),
        "mlp_proj": (g["h_2"]["mlp_proj"]["kernel"], hf.transformer.h[2].mlp.c_proj.weight.grad),
        "ln_f": (g["ln_f"]["scale"], hf.transformer.ln_f.weight.grad),
    }
    for name, (a, b) in pairs.items():
        b = b.numpy()
        rel = np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b)
        assert rel <= 1e-4, (name, rel)


@pytest.mark.parametrize("opt", [{"reorder_and_upcast_attn": True}, {"scale_attn_by_inverse_layer_idx": True},
                                 {"activation_function": "relu"}])
def test_unsupported_options_raise(tmp_path, opt):
    import json
    path = support.make_gpt2_dir(str(tmp_path), with_tokenizer=False)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg.update(opt)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=list(opt)[0]):
        load_model(path)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(OSError, match="no-such-org/no-such-model.*HF_HUB_OFFLINE"):
        load_model("no-such-org/no-such-model")


def test_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    import builtins
    from transformers import GPT2LMHeadModel
    base = support.make_gpt2_dir(str(tmp_path / "st"), with_tokenizer=False)
    save_bin(GPT2LMHeadModel.from_pretrained(base), tmp_path / "bin")
    real_import = builtins.__import__

    def no_torch(name, *a, **k):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("no torch here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match="safetensors"):
        load_model(str(tmp_path / "bin"))
