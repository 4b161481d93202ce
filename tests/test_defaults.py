"""yaie_jax/defaults.py: batch-shape arguments chosen when the user sets none; explicit values win."""
import pytest

from yaie_jax import defaults
from yaie_jax.config import EngineConfig

GIB = 1024 ** 3
GPT2_124M_BF16 = defaults.kv_bytes_per_token(12, 12, 64, 2)          # 36,864 bytes
LLAMA_8B_BF16 = defaults.kv_bytes_per_token(32, 8, 128, 2)           # 131,072 bytes


def test_kv_bytes_per_token():
    assert GPT2_124M_BF16 == 2 * 12 * 12 * 64 * 2 and LLAMA_8B_BF16 == 131072


def test_gpu_rule_on_an_h200_sized_device():
    # GPT-2 124M: 512 sequences of 1024 tokens need ~19 GB: the cap
    cfg, filled = defaults.resolve_batch_defaults(EngineConfig(), on_gpu=True, max_model_len=1024,
                                                  bytes_per_token=GPT2_124M_BF16, memory_limit_bytes=139 * GIB,
                                                  bytes_in_use=GIB)
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.num_decode_steps) == (512, 8192, 8)
    assert filled == {"max_num_seqs": 512, "max_num_batched_tokens": 8192, "num_decode_steps": 8}
    # Llama-8B shape (16 GB of weights, 128k positions): planned at 2048 tokens, 256 x 2048 x 128 KiB = 64 GiB fits
    # 0.9 x 139 - 16 - 2 = 107 GiB, 512 (128 GiB) does not
    cfg, _ = defaults.resolve_batch_defaults(EngineConfig(), on_gpu=True, max_model_len=131072,
                                             bytes_per_token=LLAMA_8B_BF16, memory_limit_bytes=139 * GIB,
                                             bytes_in_use=16 * GIB)
    assert cfg.max_num_seqs == 256


def test_gpu_rule_small_memory_and_floor():
    n = defaults.gpu_max_num_seqs(kv_budget_bytes=1 * GIB, bytes_per_token=LLAMA_8B_BF16, max_model_len=4096)
    assert n == defaults.GPU_MAX_NUM_SEQS_FLOOR         # 16 x 2048 x 128 KiB = 4 GiB > 1 GiB: the floor
    n = defaults.gpu_max_num_seqs(kv_budget_bytes=9 * GIB, bytes_per_token=LLAMA_8B_BF16, max_model_len=4096)
    assert n == 32                                       # 32 x 256 MiB = 8 GiB fits, 64 does not


def test_cpu_rule_and_explicit_values_win():
    cfg, filled = defaults.resolve_batch_defaults(EngineConfig(num_decode_steps=4), on_gpu=False,
                                                  max_model_len=2048, bytes_per_token=GPT2_124M_BF16)
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.num_decode_steps) == (256, 2048, 4)
    assert "num_decode_steps" not in filled
    explicit = EngineConfig(max_num_seqs=3, max_num_batched_tokens=100, num_decode_steps=2)
    cfg, filled = defaults.resolve_batch_defaults(explicit, on_gpu=True, max_model_len=1024,
                                                  bytes_per_token=GPT2_124M_BF16, memory_limit_bytes=139 * GIB)
    assert cfg is explicit and filled == {}


def test_without_chunked_prefill_a_whole_prompt_fits_one_step():
    cfg, _ = defaults.resolve_batch_defaults(EngineConfig(enable_chunked_prefill=False), on_gpu=False,
                                             max_model_len=8192, bytes_per_token=GPT2_124M_BF16)
    assert cfg.max_num_batched_tokens == 8192


@pytest.mark.parametrize("name", ["max_num_seqs", "max_num_batched_tokens", "num_decode_steps"])
def test_bad_explicit_values_are_refused(name):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=name):
            EngineConfig(**{name: bad})


def test_engine_fills_unset_arguments_and_keeps_given_ones(tmp_path):
    import support
    from yaie_jax.engine.core import LLMEngine
    path = support.make_gpt2_dir(str(tmp_path / "gpt2"), n_positions=128)
    eng = LLMEngine(model=path, dtype="float32", num_gpu_blocks=64, max_num_seqs=4, warmup=False)
    assert eng.auto_args == {"max_num_batched_tokens": 2048, "num_decode_steps": 1}     # the CPU rule
    assert (eng.config.max_num_seqs, eng.config.max_num_batched_tokens, eng.config.num_decode_steps) == (4, 2048, 1)
    assert eng.scheduler.config is eng.config and eng.runner.config is eng.config
