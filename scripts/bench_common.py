"""Shared pieces of the benchmark scripts: workloads, random checkpoints, environment record, output files."""
from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Dict, List, Tuple

import numpy as np


def gpt2_124m_dir(path: str) -> str:
    """A random-weight GPT-2 124M checkpoint (HF format) with a byte-level tokenizer, built once in `path`."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    model.save_pretrained(path)
    _save_tokenizer(path, 50257)
    return path


def gpt2_large_dir(path: str, vocab_size: int = 50304) -> str:
    """A random-weight GPT-2 large checkpoint (36 layers, 1280 wide, 20 heads, 1024 positions; HF format, fp32)
    with a tokenizer covering its vocabulary, built once in `path`. The vocabulary is padded from 50257 to 50304
    (a multiple of 128, as nanoGPT does) so that a vocab-parallel LM head can split it 2 or 4 ways."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=36, n_embd=1280, n_head=20, n_positions=1024, vocab_size=vocab_size))
    model.save_pretrained(path)
    _save_tokenizer(path, vocab_size)
    return path


def smollm2_shape_dir(path: str) -> str:
    """Random weights in SmolLM2-135M's shape (Llama: 30 layers, 576 wide, 9 q / 3 kv heads, vocab 49152)."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=0,
                      eos_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    _save_tokenizer(path, 49152)
    return path


def _save_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer covering every id of the model: id i <-> the word "w{i}" (id 0 is EOS). Random
    weights sample ids anywhere in the vocabulary, and a streaming benchmark needs text for each of them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w0", eos_token="w0",
                            unk_token="w0").save_pretrained(path)


def workload(name: str) -> Tuple[List[List[int]], List[int]]:
    """(prompts as token-id lists, max new tokens per prompt) for a named workload (issue 10)."""
    rng = np.random.default_rng(0)
    if name == "W1":
        lens = rng.integers(64, 513, size=512)
        return [rng.integers(0, 50257, size=int(n)).tolist() for n in lens], [256] * 512
    if name == "W4":
        prompts = []
        for _ in range(8):
            prefix = rng.integers(0, 50257, size=512).tolist()
            prompts += [prefix + rng.integers(0, 50257, size=64).tolist() for _ in range(32)]
        return prompts, [128] * len(prompts)
    if name == "W6":
        plens = rng.integers(100, 1025, size=256)
        olens = rng.integers(100, 1025, size=256)
        return [rng.integers(0, 49152, size=int(n)).tolist() for n in plens], [int(x) for x in olens]
    if name == "W2":
        return [rng.integers(0, 50257, size=128).tolist()], [256]
    raise ValueError(f"unknown workload {name}")


def environment() -> Dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "host": platform.node()}
    try:
        import jax
        env["jax"] = jax.__version__
        env["device"] = str(jax.devices()[0].device_kind)
        env["num_devices"] = jax.device_count()
    except Exception:
        pass
    try:
        import torch
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["torch_device"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except Exception:
        pass
    return env


def write_result(out_dir: str, name: str, record: Dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    return path


def print_table(rows: List[Dict], cols: List[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)


def single_stream_runs(engine, prompt, params, repeats: int, tag: str = "single") -> List[Dict]:
    """One untimed run, then `repeats` timed runs of one request on an idle LLMEngine (prefix cache reset after
    each): [{"ttft_ms", "ms_per_token"}], ms per output token counted after the first token."""
    import time
    runs = []
    for rep in range(repeats + 1):
        t0 = time.perf_counter()
        engine.add_request(f"{tag}{rep}", prompt, params)
        t_first, n = None, 0
        while engine.has_unfinished_requests():
            for o in engine.step():
                n = len(o.outputs[0].token_ids)
                if t_first is None and n > 0:
                    t_first = time.perf_counter()
        t_end = time.perf_counter()
        engine.block_manager.reset_prefix_cache()
        if rep > 0:
            runs.append({"ttft_ms": (t_first - t0) * 1e3, "ms_per_token": (t_end - t_first) * 1e3 / max(1, n - 1)})
    return runs


def bar_plot(path: str, labels: List[str], values: List[float], ylabel: str, title: str) -> None:
    """A labelled bar chart as PNG (skipped with a note where matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", path)
        return
    fig, ax = plt.subplots(figsize=(max(5.5, 1.6 * len(labels)), 3.4))
    bars = ax.bar(labels, values, color="#4878a8")
    ax.bar_label(bars, fmt="%.3g")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
