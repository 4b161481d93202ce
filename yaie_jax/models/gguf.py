"""GGUF (llama.cpp) files: model config, dequantized params and the tokenizer, read with the `gguf` package.

    model = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", dtype="bfloat16")   # LlamaForCausalLM
    tokenizer = load_gguf_tokenizer(path)                                     # PreTrainedTokenizerFast

- Metadata (`llama.block_count`, `llama.attention.head_count`, ...) becomes a ModelConfig.
- Tensors are dequantized with numpy (no torch, no llama.cpp): F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
  are decoded here; other types (K-quants, ...) go through `gguf.quants.dequantize`, the package's reference.
  The engine computes in float (bf16/fp32), so quantization only saves disk, not device memory.
- llama.cpp's converter reorders the rows of Q and K inside each head (interleaved rotary pairs, GPT-J style);
  `unpermute_qk` puts them back in the HF (rotate-half) order that models/rope.py uses.
- The tokenizer is built at run time from the metadata with `tokenizers` (transformers' own GGUF tokenizer
  path imports torch): byte-level BPE vocab + merges, the pre-tokenizer that `tokenizer.ggml.pre` names,
  control tokens as special tokens, bos/eos/unk/pad, and `tokenizer.chat_template`.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Dict, Tuple

import numpy as np

from .config import ModelConfig

logger = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama",)

# GGUF tensor name (per layer, after `blk.N.`) -> (our layer param, is a Q/K projection needing unpermute)
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj",
    "attn_output": "o_proj", "ffn_norm": "post_attention_layernorm", "ffn_gate": "gate_proj",
    "ffn_up": "up_proj", "ffn_down": "down_proj",
}
NORMS = {"input_layernorm", "post_attention_layernorm"}


# ----------------------------------------------------------------------------------------------- reading

@functools.lru_cache(maxsize=2)
def _reader_cached(path: str, mtime_ns: int, size: int):
    import gguf
    return gguf.GGUFReader(path)


def open_gguf(path: str):
    """A `gguf.GGUFReader` for `path` (memory-mapped). Parsing the metadata of a 49k-token vocabulary takes
    seconds, and the model and the tokenizer both read the same file, so readers are cached per file version."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    st = os.stat(path)
    return _reader_cached(path, st.st_mtime_ns, st.st_size)


def _field_value(field) -> Any:
    """A metadata field as plain Python: str / int / float / bool, or a list of them."""
    import gguf
    T = gguf.GGUFValueType

    def scalar(part, vtype):
        if vtype == T.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        v = part[0].item()
        return bool(v) if vtype == T.BOOL else v

    if field.types[0] == T.ARRAY:
        vtype = field.types[-1]
        if vtype == T.ARRAY:
            raise ValueError(f"nested GGUF arrays are not supported ({field.name})")
        if vtype == T.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        # numeric arrays: all elements are consecutive one-element parts
        return [scalar(field.parts[i], vtype) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


def read_metadata(path_or_reader, skip_arrays: bool = False) -> Dict[str, Any]:
    """All key/value metadata of a GGUF file (e.g. `general.architecture`, `tokenizer.ggml.tokens`)."""
    import gguf
    reader = open_gguf(path_or_reader) if isinstance(path_or_reader, (str, os.PathLike)) else path_or_reader
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        if skip_arrays and field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        out[name] = _field_value(field)
    return out


# ------------------------------------------------------------------------------------------ dequantizing

def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] packed bytes -> [n, 32] 4-bit values: byte j holds element j (low) and j + 16 (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes (little-endian uint32) -> [n, 32] fifth bits: bit j belongs to element j."""
    bits = np.ascontiguousarray(qh).view("<u4")                                   # [n, 1]
    return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)       # [n, 32]


def _deq_q8_0(b):  # 34 bytes: fp16 scale d, 32 x int8; x = d * q
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8).astype(np.float32)


def _deq_q4_0(b):  # 18 bytes: fp16 d, 16 bytes of nibbles; x = d * (q - 8)
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).astype(np.float32) - 8.0)


def _deq_q4_1(b):  # 20 bytes: fp16 d, fp16 min m, 16 bytes of nibbles; x = d * q + m
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).astype(np.float32) + _f16(b[:, 2:4])


def _deq_q5_0(b):  # 22 bytes: fp16 d, 4 bytes of fifth bits, 16 bytes of nibbles; x = d * (q - 16)
    q = _nibbles(b[:, 6:]) | (_high_bits(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.astype(np.float32) - 16.0)


def _deq_q5_1(b):  # 24 bytes: fp16 d, fp16 m, 4 bytes of fifth bits, 16 bytes of nibbles; x = d * q + m
    q = _nibbles(b[:, 8:]) | (_high_bits(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.astype(np.float32) + _f16(b[:, 2:4])


# type name -> (elements per block, bytes per block, block decoder)
BLOCK_TYPES = {
    "Q8_0": (32, 34, _deq_q8_0),
    "Q4_0": (32, 18, _deq_q4_0),
    "Q4_1": (32, 20, _deq_q4_1),
    "Q5_0": (32, 22, _deq_q5_0),
    "Q5_1": (32, 24, _deq_q5_1),
}


def dequantize(raw: np.ndarray, qtype, shape: Tuple[int, ...]) -> np.ndarray:
    """Decode one GGUF tensor to float32 `shape` (numpy order: GGUF's `ne` reversed, rows of `shape[-1]`).

    `raw`: the tensor's bytes (any dtype; viewed as uint8). `qtype`: a `gguf.GGMLQuantizationType` or its name.
    """
    import gguf
    qt = gguf.GGMLQuantizationType[qtype] if isinstance(qtype, str) else gguf.GGMLQuantizationType(qtype)
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    n = int(np.prod(shape, dtype=np.int64))
    if qt == gguf.GGMLQuantizationType.F32:
        out = raw.view("<f4").astype(np.float32, copy=False)
    elif qt == gguf.GGMLQuantizationType.F16:
        out = raw.view("<f2").astype(np.float32)
    elif qt == gguf.GGMLQuantizationType.BF16:
        out = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)    # bf16 = top half of an fp32
    elif qt.name in BLOCK_TYPES:
        block, nbytes, decode = BLOCK_TYPES[qt.name]
        if n % block or raw.size != n // block * nbytes:
            raise ValueError(f"{qt.name} tensor of shape {shape}: {raw.size} bytes, expected {n // block * nbytes}")
        out = np.empty((n // block, block), np.float32)
        blocks = raw.reshape(-1, nbytes)
        step = 1 << 16  # blocks per chunk: bounds the temporaries of big embeddings
        for s in range(0, blocks.shape[0], step):
            out[s:s + step] = decode(blocks[s:s + step])
    else:
        try:
            from gguf.quants import dequantize as reference
        except ImportError as e:  # pragma: no cover - old gguf package
            raise NotImplementedError(f"GGUF tensor type {qt.name} is not supported") from e
        try:
            block, nbytes = gguf.GGML_QUANT_SIZES[qt]
            out = np.asarray(reference(raw.reshape(-1, shape[-1] // block * nbytes), qt), np.float32)
        except NotImplementedError as e:
            raise NotImplementedError(f"GGUF tensor type {qt.name} is not supported") from e
    if out.size != n:
        raise ValueError(f"{qt.name} tensor: decoded {out.size} values, expected {n} for shape {shape}")
    return out.reshape(shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order. Its converter stores, inside each head, row `2*j + t` = HF row
    `t*(head_dim/2) + j` (rotary pairs interleaved); this returns HF's rotate-half order. Works for weights
    `[n_heads*head_dim, in]` and biases `[n_heads*head_dim]`."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    rest = w.shape[1:]
    return w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


# ----------------------------------------------------------------------------------------- model config

def config_from_gguf(meta: Dict[str, Any], tensor_shapes=()) -> ModelConfig:
    """ModelConfig from GGUF metadata. `tensor_shapes`: the file's tensor names, or a dict name -> numpy shape;
    they tell tied vs untied head, biases, and the vocabulary size when the metadata lacks it."""
    shapes = dict(tensor_shapes) if isinstance(tensor_shapes, dict) else {n: None for n in tensor_shapes}
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported GGUF architecture {arch!r} (yaie_jax supports: {', '.join(SUPPORTED_ARCHS)})")

    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required and default is None:
            raise ValueError(f"GGUF metadata is missing {full!r}")
        return default

    d = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", d // heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ValueError("unsupported GGUF: attention.value_length differs from attention.key_length")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"unsupported GGUF: partial rotary embeddings (rope.dimension_count="
                         f"{get('rope.dimension_count')} < head_dim={head_dim})")
    if get("expert_count", 0, required=False):
        raise ValueError("unsupported GGUF: mixture-of-experts models")
    scaling_type = get("rope.scaling.type", "none", required=False)
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif scaling_type in ("none", None) or float(get("rope.scaling.factor", 1.0, required=False)) == 1.0:
        rope_scaling = None
    else:
        raise ValueError(f"unsupported GGUF rope scaling type {scaling_type!r}")
    if "rope_freqs.weight" in shapes:
        raise ValueError("unsupported GGUF: per-frequency rope factors (`rope_freqs.weight`, Llama 3.1 style)")
    vocab = get("vocab_size", 0, required=False) or (shapes.get("token_embd.weight") or [0])[0] \
        or len(meta.get("tokenizer.ggml.tokens", ()))
    if not vocab:
        raise ValueError("GGUF metadata gives no vocabulary size")
    names = set(shapes)
    return ModelConfig(
        arch="llama", vocab_size=int(vocab), hidden_size=d, num_layers=int(get("block_count")), num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, intermediate_size=int(get("feed_forward_length")),
        max_position_embeddings=int(get("context_length", 2048, required=False)),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings=bool(names) and "output.weight" not in names, activation="silu",
        rope_theta=float(get("rope.freq_base", 10000.0, required=False)), rope_scaling=rope_scaling,
        attention_bias="blk.0.attn_q.bias" in names, mlp_bias="blk.0.ffn_up.bias" in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"))


# ------------------------------------------------------------------------------------------------ params

def tensor_shapes(reader) -> Dict[str, Tuple[int, ...]]:
    """name -> numpy-order shape (GGUF's `ne` reversed: matrices are [out, in] like HF's)."""
    return {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in reader.tensors}


def params_from_gguf(reader, cfg: ModelConfig, dtype=np.float32, progress: bool = True) -> dict:
    """Dequantize every tensor into our Llama params pytree (numpy, `dtype`)."""
    from tqdm.auto import tqdm
    dtype = np.dtype(dtype)
    params: dict = {f"layers_{i}": {} for i in range(cfg.num_layers)}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", leave=False, disable=not progress):
        name = t.name
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # numpy order; [out, in] for matrices
        w = dequantize(t.data, t.tensor_type, shape)
        if name == "token_embd.weight":
            if shape[0] != cfg.vocab_size:
                raise ValueError(f"token_embd.weight has {shape[0]} rows; metadata says vocab {cfg.vocab_size}")
            params["embed_tokens"] = {"embedding": w.astype(dtype)}
        elif name == "output_norm.weight":
            params["norm"] = {"scale": w.astype(dtype)}
        elif name == "output.weight":
            if not cfg.tie_word_embeddings:
                params["lm_head"] = {"kernel": np.ascontiguousarray(w.T).astype(dtype)}
        elif name.startswith("blk."):
            _, idx, kind, leaf = name.split(".", 3)
            ours = LAYER_TENSORS.get(kind)
            if ours is None or leaf not in ("weight", "bias") or (ours in NORMS and leaf == "bias") \
                    or not 0 <= int(idx) < cfg.num_layers:
                raise ValueError(f"unsupported GGUF tensor {name!r}")
            if kind in ("attn_q", "attn_k"):
                w = unpermute_qk(w, cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads)
            if ours in NORMS:
                key = "scale"
            elif leaf == "weight":
                key, w = "kernel", np.ascontiguousarray(w.T)        # [out, in] -> [in, out]
            else:
                key = "bias"
            params[f"layers_{int(idx)}"].setdefault(ours, {})[key] = w.astype(dtype)
        else:  # rope_freqs.weight (rejected earlier by config_from_gguf) or anything we do not know
            raise ValueError(f"unsupported GGUF tensor {name!r}")
    missing = [g for g, o in (("token_embd.weight", "embed_tokens"), ("output_norm.weight", "norm")) if o not in params]
    if not cfg.tie_word_embeddings and "lm_head" not in params:
        missing.append("output.weight")
    for i in range(cfg.num_layers):
        for kind, ours in LAYER_TENSORS.items():
            leaves = params[f"layers_{i}"].get(ours, {})
            if not ({"scale"} if ours in NORMS else {"kernel"}) <= set(leaves):
                missing.append(f"blk.{i}.{kind}.weight")
            wants_bias = cfg.attention_bias if ours in ("q_proj", "k_proj", "v_proj", "o_proj") else \
                cfg.mlp_bias if ours in ("gate_proj", "up_proj", "down_proj") else False
            if wants_bias and "bias" not in leaves:
                missing.append(f"blk.{i}.{kind}.bias")
    if missing:
        raise ValueError(f"GGUF file is missing tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return params


def load_gguf_config(path: str) -> ModelConfig:
    """The ModelConfig of a GGUF file, from its metadata and tensor list only (nothing dequantized)."""
    reader = open_gguf(path)
    return config_from_gguf(read_metadata(reader, skip_arrays=True), tensor_shapes(reader))


def load_gguf(path: str, dtype="bfloat16"):
    """A LlamaForCausalLM from a GGUF file, params dequantized to `dtype` (numpy, on the host)."""
    from .llama import LlamaForCausalLM
    from .loader import np_dtype
    reader = open_gguf(path)
    meta = read_metadata(reader, skip_arrays=True)
    cfg = config_from_gguf(meta, tensor_shapes(reader))
    params = params_from_gguf(reader, cfg, np_dtype(dtype))
    return LlamaForCausalLM(cfg, params)


# --------------------------------------------------------------------------------------------- tokenizer

# Text splitting before BPE, by `tokenizer.ggml.pre` (llama.cpp's name for the pre-tokenizer the vocabulary
# was trained with). Regexes are the published split patterns of those tokenizers.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PRE = ("default", "gpt2", "gpt-2")
SPLIT_PRE = {**{k: _LLAMA3_SPLIT for k in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3")},
             **{k: _QWEN2_SPLIT for k in ("qwen2", "deepseek-r1-qwen")}}
DIGITS_THEN_GPT2_PRE = ("smollm",)  # SmolLM/SmolLM2: every digit its own piece, then GPT-2's split


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGITS_THEN_GPT2_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in SPLIT_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in GPT2_PRE and pre is not None:
        logger.warning("GGUF pre-tokenizer %r is not known to yaie_jax; using GPT-2's split", pre)
    return byte_level


def load_gguf_tokenizer(path: str):
    """A transformers PreTrainedTokenizerFast built from the GGUF metadata (byte-level BPE vocabularies,
    `tokenizer.ggml.model == "gpt2"`, as Llama 3, SmolLM, Qwen and GPT-2 files use)."""
    meta = read_metadata(path)
    return tokenizer_from_metadata(meta)


def tokenizer_from_metadata(meta: Dict[str, Any]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise NotImplementedError(f"GGUF tokenizer model {kind!r} is not supported (yaie_jax builds byte-level "
                                  f"BPE tokenizers, tokenizer.ggml.model == 'gpt2'); pass --tokenizer with a "
                                  f"HF tokenizer directory instead")
    tokens = meta["tokenizer.ggml.tokens"]
    token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a duplicated spelling keeps its first id, as llama.cpp's lookup does
    pre = meta.get("tokenizer.ggml.pre")
    # Llama-3-style vocabularies look a whole piece up before merging (llama.cpp and their tokenizer.json do)
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in SPLIT_PRE and
                     SPLIT_PRE[pre] is _LLAMA3_SPLIT)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    # control tokens (type 3) are special: matched whole in text, skipped when decoding with
    # skip_special_tokens; user-defined ones (type 4) are matched whole but decoded as text
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, token_types) if ty == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, token_types) if ty == 4]
    tok.add_special_tokens(specials)
    if user:
        tok.add_tokens(user)

    def token(key):
        idx = meta.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=sorted({(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on}))
    kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", token("unknown_token_id")),
                                ("pad_token", token("padding_token_id"))) if v is not None}
    ctx = meta.get(f"{meta.get('general.architecture')}.context_length")
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=meta.get("tokenizer.chat_template"),
                                   model_max_length=int(ctx) if ctx else int(1e30),
                                   clean_up_tokenization_spaces=False, **kwargs)
