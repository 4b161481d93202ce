"""Weight quantization (yaie_jax/quantization) against plain fp32 math, and quantized GPT-2 / Llama checkpoints
loaded through the real loader against the fp32 model, with a stated error bound per mode.

Error measure for logits: ||logits_q - logits_fp32|| / ||logits_fp32 - mean over the vocabulary|| (relative RMS
error of the centred logits) over 2 x 24 random tokens of tiny random models (initializer_range 0.1: random
weights, the hard case for a quantizer). Measured: int8 0.012 (GPT-2) / 0.026 (Llama), fp8 0.070 / 0.142,
int4 (groups of 32) 0.20 / 0.36. Bounds: about twice those (int4: 1.8x).
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import support  # noqa: E402

from yaie_jax.config import EngineConfig  # noqa: E402
from yaie_jax.models.loader import load_model  # noqa: E402
from yaie_jax.quantization import describe, quantize_kernel, quantize_params, quantized_matmul  # noqa: E402

HERE = os.path.dirname(__file__)
LOGIT_BOUND = {"int8": 0.05, "fp8": 0.3, "int4": 0.65}   # relative RMS error of the centred logits (docstring)
GROUP = 32                                               # int4 group size for the tiny models (width 64 / 96)


def _dequant(leaves):
    """float64 [in, out] weights the quantized leaves stand for (independent of quantized_matmul)."""
    q = np.asarray(leaves["kernel_q"]).astype(np.float64)
    if "group_scale" in leaves:
        gs = np.asarray(leaves["group_scale"], np.float64)
        return q * np.repeat(gs, q.shape[0] // gs.shape[0], axis=0)
    return q * np.asarray(leaves["scale"], np.float64)[None, :]


@pytest.fixture(scope="module")
def weights():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 48)).astype(np.float32)
    w[:, 5] = 0.0                                          # an all-zero column must not give NaN scales
    return w


def test_int8_rounds_to_nearest_step(weights):
    leaves = quantize_kernel(weights, "int8")
    assert leaves["kernel_q"].dtype == np.int8 and leaves["scale"].shape == (48,)
    assert np.abs(leaves["kernel_q"]).max() <= 127
    step = np.asarray(leaves["scale"], np.float64)
    np.testing.assert_allclose(step, np.where(np.abs(weights).max(0) > 0, np.abs(weights).max(0) / 127, 1), rtol=1e-6)
    assert np.all(np.abs(_dequant(leaves) - weights) <= step / 2 * (1 + 1e-6))


def test_int4_groups_along_input(weights):
    leaves = quantize_kernel(weights, "int4", group_size=64)
    assert leaves["kernel_q"].dtype == ml_dtypes.int4 and leaves["group_scale"].shape == (4, 48)
    q = np.asarray(leaves["kernel_q"]).astype(np.int8)
    assert q.min() >= -7 and q.max() <= 7
    absmax = np.abs(weights.reshape(4, 64, 48)).max(1)                          # [G, out]
    np.testing.assert_allclose(leaves["group_scale"], np.where(absmax > 0, absmax / 7, 1), rtol=1e-6)
    step = np.repeat(np.asarray(leaves["group_scale"], np.float64), 64, axis=0)
    assert np.all(np.abs(_dequant(leaves) - weights) <= step / 2 * (1 + 1e-6))


def test_fp8_weights_within_e4m3_rounding(weights):
    leaves = quantize_kernel(weights, "fp8")
    assert leaves["kernel_q"].dtype == ml_dtypes.float8_e4m3fn
    scaled = weights / np.asarray(leaves["scale"])[None, :]
    assert np.abs(scaled).max() <= 448
    err = np.abs(_dequant(leaves) - weights)
    # e4m3: 3 mantissa bits -> relative rounding error <= 2^-4 for normals; subnormals (|v| < 2^-6): step 2^-9
    bound = np.maximum(np.abs(weights) * 2.0 ** -4, 2.0 ** -10 * np.asarray(leaves["scale"])[None, :])
    assert np.all(err <= bound * (1 + 1e-6))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_weight_only_matmul_is_x_times_dequantized(weights, mode):
    x = np.random.default_rng(1).standard_normal((3, 5, 256)).astype(np.float32)      # [..., in]
    leaves = quantize_kernel(weights, mode, group_size=64)
    y = np.asarray(jax.jit(quantized_matmul)(jnp.asarray(x), leaves))                 # [3, 5, 48]
    np.testing.assert_allclose(y, x.astype(np.float64) @ _dequant(leaves), rtol=1e-4, atol=1e-4)


def test_fp8_matmul_quantizes_activations_per_token(weights):
    x = np.random.default_rng(2).standard_normal((7, 256)).astype(np.float32)
    x[3] *= 100.0                                          # one loud token must not change the others' scales
    leaves = quantize_kernel(weights, "fp8")
    y = np.asarray(jax.jit(quantized_matmul)(jnp.asarray(x), leaves))
    sx = np.abs(x).max(-1, keepdims=True) / 448                                      # [T, 1]
    xq = (x / sx).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * sx
    np.testing.assert_allclose(y, xq @ _dequant(leaves), rtol=1e-4, atol=1e-3)


def test_bad_input_is_refused(weights):
    with pytest.raises(ValueError, match="group size 100 does not divide"):
        quantize_kernel(weights, "int4", group_size=100)
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_kernel(weights, "int3")
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="nf4")
    with pytest.raises(ValueError, match="quantization_group_size"):
        EngineConfig(quantization="int4", quantization_group_size=0)
    assert EngineConfig(quantization="fp8").quantization == "fp8"


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {"gpt2": support.make_gpt2_dir(str(root / "gpt2"), n_layer=2, n_embd=64, n_head=4),
            "llama": support.make_llama_dir(str(root / "llama"), hidden_size=128, num_attention_heads=8,
                                            num_key_value_heads=4, intermediate_size=256)}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_quantized_logits_within_bounds(tiny_dirs, arch):
    ids = np.random.default_rng(0).integers(0, 384, (2, 24))
    ref_model = load_model(tiny_dirs[arch], dtype="float32")
    ref = ref_model.logits(ids)                                                        # [2, 24, V]
    centred = np.linalg.norm(ref - ref.mean(-1, keepdims=True))
    errors = {}
    for mode in LOGIT_BOUND:
        model = load_model(tiny_dirs[arch], dtype="float32", quantization=mode, quantization_group_size=GROUP)
        info = describe(model.params)
        n_proj = 4 * model.config.num_layers if arch == "gpt2" else 7 * model.config.num_layers
        assert info == {"quantized_kernels": n_proj, "float_kernels": 0 if arch == "gpt2" else 1, "modes": [mode]}
        head = model.params.get("lm_head", {}).get("kernel")
        assert head is None or head.dtype == np.float32                              # the LM head stays
        errors[mode] = float(np.linalg.norm(model.logits(ids) - ref) / centred)
    print(arch, errors)
    for mode, bound in LOGIT_BOUND.items():
        assert 0 < errors[mode] <= bound, (mode, errors)
    assert errors["int8"] < errors["fp8"] < errors["int4"]


def test_quantized_bfloat16_load_keeps_scales_in_bfloat16(tiny_dirs):
    model = load_model(tiny_dirs["llama"], dtype="bfloat16", quantization="int8")
    q = model.params["layers_0"]["q_proj"]
    assert set(q) == {"kernel_q", "scale"} and q["scale"].dtype == ml_dtypes.bfloat16
    assert model.params["embed_tokens"]["embedding"].dtype == ml_dtypes.bfloat16
    again = quantize_params(model.params, "int8")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(model.params)))


def test_tensor_parallel_shards_scales_with_their_kernels(tiny_dirs):
    """On 4 fake CPU devices (subprocess): quantized TP=2 / TP=4 logits equal TP=1's within fp32 summation-order
    noise, and every kernel_q / scale / group_scale is split as parallel.py's rules say."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "quant_tp_check.py"), tiny_dirs["gpt2"],
                           tiny_dirs["llama"]], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][6:])
    assert len(res) == 2 * 3 * 2                                    # archs x modes x (TP=2, TP=4)
    for key, r in res.items():
        assert r["max_abs_diff"] <= 2e-4, (key, r)
        for name, (shape, shard_shape, expect) in r["shards"].items():
            assert shard_shape == expect, (key, name, shape, shard_shape)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_engine_quantization_argument(tiny_dirs, mode):
    """LLM(..., quantization=) serves the quantized weights: its params are quantized and its greedy tokens equal
    the quantized model's full-sequence argmax, recomputed per token."""
    from yaie_jax import LLM, SamplingParams
    path = tiny_dirs["llama"]
    llm = LLM(path, dtype="float32", quantization=mode, max_num_seqs=4, num_gpu_blocks=64, warmup=False)
    assert describe(llm.engine.model.params)["modes"] == [mode]
    prompt = [5, 17, 42, 7, 99, 3]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    model = load_model(path, dtype="float32", quantization=mode)
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(model.logits(np.asarray([ids]))[0, -1].argmax()))
    assert list(out.outputs[0].token_ids) == ids[len(prompt):]
