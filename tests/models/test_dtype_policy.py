"""dtype="auto" (models/dtype_policy.py): float32 for the embedded model and on a CPU, else the checkpoint's
16-bit dtype (bfloat16 for fp32, quantized or unknown checkpoints); an explicit dtype wins."""
import json

import numpy as np
import pytest

from yaie_jax.config import EngineConfig
from yaie_jax.models.default_model import default_model_path
from yaie_jax.models.dtype_policy import checkpoint_dtype, resolve_dtype


def hf_dir(tmp_path, name, **cfg):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", **cfg}))
    return str(d)


def test_engine_default_is_auto():
    assert EngineConfig().dtype == "auto"
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="fp8")


def test_default_model_is_float32_everywhere():
    for source in (None, str(default_model_path())):
        for platform in ("cpu", "gpu", "tpu"):
            assert resolve_dtype("auto", source, platform)[0] == "float32"


def test_cpu_is_float32_and_accelerators_take_the_checkpoint_dtype(tmp_path):
    bf = hf_dir(tmp_path, "bf", torch_dtype="bfloat16")
    f16 = hf_dir(tmp_path, "f16", dtype="float16")            # transformers 5 writes `dtype`
    f32 = hf_dir(tmp_path, "f32", torch_dtype="float32")
    none = hf_dir(tmp_path, "none")
    assert [checkpoint_dtype(p) for p in (bf, f16, f32, none)] == ["bfloat16", "float16", "float32", None]
    assert all(resolve_dtype("auto", p, "cpu")[0] == "float32" for p in (bf, f16, f32, none))
    assert [resolve_dtype("auto", p, "gpu")[0] for p in (bf, f16, f32, none)] == \
        ["bfloat16", "float16", "bfloat16", "bfloat16"]
    assert resolve_dtype("float16", bf, "gpu") == ("float16", "requested")
    assert resolve_dtype("bfloat16", None, "cpu")[0] == "bfloat16"


def test_gguf_file_type(tmp_path):
    import gguf
    for ftype, want in ((1, "float16"), (32, "bfloat16"), (0, "float32"), (3, "quantized")):
        path = str(tmp_path / f"t{ftype}.gguf")
        w = gguf.GGUFWriter(path, "llama")
        w.add_file_type(ftype)
        w.add_tensor("x", np.zeros((2, 32), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        assert checkpoint_dtype(path) == want
        assert resolve_dtype("auto", path, "gpu")[0] == ("float16" if want == "float16" else "bfloat16")
    assert checkpoint_dtype(str(default_model_path())) == "quantized"
