"""Loader, registry, converter CLI and tokenizer: every checkpoint format gives the same params, the fast orbax
path round-trips, hub ids fail clearly (and quickly) without network, and sources route to the right reader."""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
import types

import jax
import ml_dtypes
import numpy as np
import pytest
import torch

from yaie_jax.models import load_model, load_model_config, save_model
from yaie_jax.models import loader, registry
from yaie_jax.tokenizer import apply_chat_template, load_tokenizer

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def assert_same_params(a, b, what):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b), what
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        assert isinstance(y, np.ndarray), (what, path, type(y))
        assert x.dtype == y.dtype and x.shape == y.shape, (what, jax.tree_util.keystr(path))
        assert np.array_equal(x, y), (what, jax.tree_util.keystr(path))


def save_bin(model, path, shards=1):
    """A legacy PyTorch checkpoint (transformers 5 no longer writes them): pytorch_model.bin, or `shards` files
    with pytorch_model.bin.index.json."""
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
        return
    keys = sorted(sd)
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        torch.save(part, os.path.join(path, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.fixture(scope="module")
def formats(tmp_path_factory, gpt2_factory):
    """One random GPT-2 written as safetensors, sharded safetensors, .bin and sharded .bin."""
    root = tmp_path_factory.mktemp("formats")
    hf = gpt2_factory.hf_model(seed=3, n_layer=2)
    paths = {"safetensors": str(root / "st"), "sharded": str(root / "sharded"), "bin": str(root / "bin"),
             "bin_sharded": str(root / "bin_sharded")}
    hf.save_pretrained(paths["safetensors"])
    hf.save_pretrained(paths["sharded"], max_shard_size="100KB")
    save_bin(hf, paths["bin"])
    save_bin(hf, paths["bin_sharded"], shards=3)
    assert os.path.exists(os.path.join(paths["sharded"], "model.safetensors.index.json"))
    assert len([f for f in os.listdir(paths["sharded"]) if f.endswith(".safetensors")]) > 1
    return paths


def test_formats_give_identical_params(formats, tmp_path, capsys):
    ref = load_model(formats["safetensors"], dtype="float32")
    assert "tensor" in capsys.readouterr().err  # the tqdm bar
    save_model(ref, tmp_path / "orbax")
    assert (tmp_path / "orbax" / loader.MARKER).exists()
    for name in ("sharded", "bin", "bin_sharded"):
        m = load_model(formats[name], dtype="float32")
        assert m.config == ref.config, name
        assert_same_params(ref.params, m.params, name)
    m = load_model(tmp_path / "orbax", dtype="float32")
    assert m.config == ref.config and type(m) is type(ref)
    assert_same_params(ref.params, m.params, "orbax")


def test_bf16_load_and_orbax_round_trip(formats, tmp_path):
    f32 = load_model(formats["safetensors"], dtype="float32")
    b16 = load_model(formats["safetensors"], dtype="bfloat16")
    expect = jax.tree_util.tree_map(lambda a: a.astype(ml_dtypes.bfloat16), f32.params)
    assert_same_params(expect, b16.params, "bf16 from safetensors")
    save_model(b16, tmp_path / "b16")
    assert_same_params(expect, load_model(tmp_path / "b16", dtype="bfloat16").params, "bf16 orbax")
    assert_same_params(f32.params, load_model(formats["bin"], dtype="float32").params, "bin")
    # bf16 weights on disk (safetensors stores them natively) read into numpy without torch
    hf = torch.load(os.path.join(formats["bin"], "pytorch_model.bin"), weights_only=True)
    from safetensors.torch import save_file
    bf_dir = tmp_path / "bf16_st"
    bf_dir.mkdir()
    shutil.copy(os.path.join(formats["bin"], "config.json"), bf_dir / "config.json")
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in hf.items() if k != "lm_head.weight"},
              str(bf_dir / "model.safetensors"))
    assert_same_params(expect, load_model(bf_dir, dtype="bfloat16").params, "bf16 safetensors")


def test_bin_without_torch_is_a_clear_error(formats, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_torch(name, *a, **k):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("no torch here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match="pip install torch.*safetensors"):
        load_model(formats["bin"])
    load_model(formats["safetensors"])  # safetensors needs no torch


def test_load_model_config(formats, tmp_path):
    cfg = load_model_config(formats["safetensors"])
    with open(os.path.join(formats["safetensors"], "config.json")) as f:
        hf = json.load(f)
    assert (cfg.arch, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.vocab_size, cfg.norm_eps) == \
        ("gpt2", hf["n_layer"], hf["n_embd"], hf["n_head"], hf["vocab_size"], hf["layer_norm_epsilon"])
    save_model(load_model(formats["safetensors"]), tmp_path / "saved")
    assert load_model_config(tmp_path / "saved") == cfg


def test_convert_cli_and_tokenizer_beside_params(tiny_gpt2_dir, tmp_path):
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    try:
        import convert_to_orbax
    finally:
        sys.path.pop(0)
    out = tmp_path / "converted"
    assert convert_to_orbax.main([tiny_gpt2_dir, str(out), "--dtype", "float32"]) == 0
    ref = load_model(tiny_gpt2_dir, dtype="float32")
    assert_same_params(ref.params, load_model(out, dtype="float32").params, "converted")
    text = "The quick brown fox, caf\u00e9 \U0001F600"
    assert load_tokenizer(out).encode(text) == load_tokenizer(tiny_gpt2_dir).encode(text)
    save_model(ref, tmp_path / "no_tok")
    with pytest.raises(FileNotFoundError, match="without a tokenizer"):
        load_tokenizer(tmp_path / "no_tok")


def test_tokenizer_and_chat_templates(tiny_gpt2_dir):
    from transformers import AutoTokenizer
    tok = load_tokenizer(tiny_gpt2_dir)
    text = "Paris is the capital of France.\n  def f(x): \u65e5\u672c"
    assert tok.encode(text) == AutoTokenizer.from_pretrained(tiny_gpt2_dir).encode(text)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
    assert apply_chat_template(tok, msgs) == "system: Be brief.\nuser: Hi\nassistant: Hello.\nuser: Why?\nassistant:"
    assert apply_chat_template(tok, msgs[:2], add_generation_prompt=False) == "system: Be brief.\nuser: Hi"
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert apply_chat_template(tok, msgs[:2]) == "<system>Be brief.<user>Hi<assistant>"
    assert apply_chat_template(tok, msgs[:2], add_generation_prompt=False) == "<system>Be brief.<user>Hi"


def test_gguf_sources_are_delegated(monkeypatch, tmp_path):
    calls = []
    fake = types.ModuleType("yaie_jax.models.gguf")
    fake.load_gguf = lambda path, dtype="bfloat16": calls.append(("model", path, dtype)) or "MODEL"
    fake.load_gguf_tokenizer = lambda path: calls.append(("tokenizer", path)) or "TOKENIZER"
    fake.load_gguf_config = lambda path: calls.append(("config", path)) or "CONFIG"
    monkeypatch.setitem(sys.modules, "yaie_jax.models.gguf", fake)
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    assert load_model(str(path), dtype="float32") == "MODEL"
    assert load_tokenizer(str(path)) == "TOKENIZER"
    assert load_model_config(str(path)) == "CONFIG"
    assert calls == [("model", str(path), "float32"), ("tokenizer", str(path)), ("config", str(path))]
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_model(str(tmp_path / "missing.gguf"))


def test_bad_sources_and_arguments(formats, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(ValueError, match="dtype"):
        load_model(formats["safetensors"], dtype="int8")
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="bert.*gpt2, llama"):
        load_model(tmp_path / "weird")
    (tmp_path / "empty").mkdir()
    shutil.copy(os.path.join(formats["bin"], "config.json"), tmp_path / "empty" / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(tmp_path / "empty")


def test_registry_families():
    from yaie_jax.models import gpt2
    mod, cls = registry.family("gpt2")
    assert mod is gpt2 and cls is gpt2.GPT2ForCausalLM
    assert registry.FAMILIES["llama"] == ("yaie_jax.models.llama", "LlamaForCausalLM")
    with pytest.raises(ValueError, match="no model_type"):
        registry.family(None)


# ----------------------------------------------------------------------------------------- hub, no network
# Each case runs in a fresh interpreter: huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME at import.

HUB_SCRIPT = textwrap.dedent("""
    import sys, time
    from yaie_jax.models import load_model, load_model_config
    t0 = time.time()
    try:
        model = load_model(sys.argv[1], dtype="float32")
        print("LOADED", model.config.num_layers)
        print("CONFIG", load_model_config(sys.argv[1]).hidden_size)
    except Exception as e:
        print("ERROR", type(e).__name__, str(e).replace(chr(10), " "))
    print("SECONDS", time.time() - t0)
""")


def run_hub_case(tmp_path, source, timeout_s=90, **env_overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), JAX_PLATFORMS="cpu", HF_HUB_DISABLE_TELEMETRY="1",
               PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", HUB_SCRIPT, source], env=env, capture_output=True, text=True,
                         timeout=timeout_s, cwd=str(tmp_path))
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.stdout.splitlines() if " " in line}
    assert "SECONDS" in lines, out.stdout + out.stderr
    return lines


def test_hub_id_offline_is_a_clear_error(tmp_path):
    r = run_hub_case(tmp_path, "no-such-org/no-such-model", HF_HUB_OFFLINE="1")
    assert r["ERROR"].startswith("OSError") and "'no-such-org/no-such-model'" in r["ERROR"]
    assert "HF_HUB_OFFLINE=1" in r["ERROR"]


def test_hub_unreachable_endpoint_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port with nothing listening: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run_hub_case(tmp_path, "some-org/some-model", HF_ENDPOINT=f"http://127.0.0.1:{port}")
    assert r["ERROR"].startswith("OSError") and "'some-org/some-model'" in r["ERROR"]
    assert "could not be reached" in r["ERROR"] and "HF_HUB_OFFLINE" in r["ERROR"]


def test_hub_silent_endpoint_does_not_hang(tmp_path):
    """An endpoint that accepts connections and never answers (a network that swallows packets)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept_and_hold():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept_and_hold, daemon=True)
    thread.start()
    try:
        t0 = time.time()
        r = run_hub_case(tmp_path, "some-org/some-model", timeout_s=60,
                         HF_ENDPOINT=f"http://127.0.0.1:{server.getsockname()[1]}", YAIE_HUB_TIMEOUT_S="2")
        elapsed = time.time() - t0
    finally:
        stop.set()
        thread.join()
        for c in held:
            c.close()
        server.close()
    assert r["ERROR"].startswith("OSError") and "'some-org/some-model'" in r["ERROR"]
    assert "Timeout" in r["ERROR"] or "timed out" in r["ERROR"]
    assert float(r["SECONDS"]) < 20 and elapsed < 45


def test_hub_id_served_from_cache_when_offline(tmp_path, formats):
    """A model already in the HF cache loads by its id with HF_HUB_OFFLINE=1."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--cached-org--tiny-gpt2"
    snap = repo / "snapshots" / sha
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(formats["safetensors"], name), snap / name)
    r = run_hub_case(tmp_path, "cached-org/tiny-gpt2", HF_HUB_OFFLINE="1")
    assert "ERROR" not in r, r
    assert r["LOADED"] == "2" and r["CONFIG"] == "64"


def test_hub_download_fetches_only_what_is_needed(monkeypatch, formats, tiny_gpt2_dir):
    """Online path, with huggingface_hub's network calls replaced: safetensors preferred over .bin, config and
    tokenizer files only for load_model_config / load_tokenizer, the preflight bounded by YAIE_HUB_TIMEOUT_S."""
    import huggingface_hub
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("YAIE_HUB_TIMEOUT_S", "3")
    seen = []
    files = ["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json", "README.md"]

    def model_info(self, repo_id, timeout=None, **kw):
        seen.append(("info", repo_id, timeout))
        return types.SimpleNamespace(sha="0" * 40, siblings=[types.SimpleNamespace(rfilename=f) for f in files])

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        seen.append(("download", repo_id, tuple(allow_patterns), kw.get("revision")))
        return tiny_gpt2_dir

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert load_model("org/m", dtype="float32").config.num_layers == 3
    load_model_config("org/m")
    load_tokenizer("org/m")
    downloads = [s for s in seen if s[0] == "download"]
    assert [s for s in seen if s[0] == "info"] == [("info", "org/m", 3.0)] * 3
    assert "*.safetensors" in downloads[0][2] and not any(".bin" in p for p in downloads[0][2])
    assert all(not any("safetensors" in p or ".bin" in p for p in d[2]) for d in downloads[1:])
    assert all("config.json" in d[2] and d[3] is None for d in downloads)


def test_hub_timeout_argument_wins_and_the_engine_passes_its_own(monkeypatch, tiny_gpt2_dir):
    """`hub_timeout_s` given to the loaders beats the environment alias; the engine passes its config's
    `hub_timeout_s` to the model and the tokenizer loads."""
    import huggingface_hub
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("YAIE_HUB_TIMEOUT_S", "3")
    timeouts = []

    def model_info(self, repo_id, timeout=None, **kw):
        timeouts.append(timeout)
        names = ["config.json", "model.safetensors", "tokenizer.json"]
        return types.SimpleNamespace(sha="0" * 40, siblings=[types.SimpleNamespace(rfilename=f) for f in names])

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: tiny_gpt2_dir)
    load_model("org/m", dtype="float32", hub_timeout_s=1.5)
    load_model_config("org/m", hub_timeout_s=2.5)
    load_tokenizer("org/m", hub_timeout_s=0.5)
    assert timeouts == [1.5, 2.5, 0.5]
    del timeouts[:]
    from yaie_jax.engine.core import LLMEngine
    LLMEngine(model="org/m", dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None,
              max_num_seqs=2, max_num_batched_tokens=64, hub_timeout_s=4.5)
    assert timeouts == [4.5, 4.5]                   # weights and tokenizer
