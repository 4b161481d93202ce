"""load_tokenizer skips AutoTokenizer (whose AutoConfig import pulls in torch: seconds of server start-up) only
where it loads the same class AutoTokenizer would, with the same behaviour; everything else still goes through
AutoTokenizer."""
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import support  # noqa: E402

from yaie_jax.tokenizer import direct_tokenizer_class, load_tokenizer  # noqa: E402

TEXTS = ["Paris is the capital of France.\n  def f(x): \u65e5\u672c \U0001F600",
         "<|endoftext|>The quick brown fox<|endoftext|>", " leading space and trailing  ", ""]


def _tok_dir(path, tokenizer_class=None, config=None, tok_extra=None):
    """support.tiny_tokenizer saved in `path`, its tokenizer_config's class replaced, and a config.json."""
    os.makedirs(path, exist_ok=True)
    support.tiny_tokenizer(384).save_pretrained(path)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    with open(cfg_path) as f:
        tok_cfg = json.load(f)
    if tokenizer_class is not None:
        tok_cfg["tokenizer_class"] = tokenizer_class
    tok_cfg.update(tok_extra or {})
    with open(cfg_path, "w") as f:
        json.dump(tok_cfg, f)
    if config is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    return str(path)


def _same_as_auto(path):
    from transformers import AutoTokenizer
    ours, auto = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    assert type(ours) is type(auto)
    for text in TEXTS:
        for special in (True, False):
            ids = auto.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == auto.decode(ids, skip_special_tokens=skip)
    assert (ours.eos_token_id, ours.bos_token_id, ours.chat_template, len(ours)) == \
        (auto.eos_token_id, auto.bos_token_id, auto.chat_template, len(auto))


@pytest.mark.parametrize("cls,model_type", [
    (None, "gpt2"), (None, "llama"), (None, None), ("PreTrainedTokenizerFast", "llama"),
    ("GPT2Tokenizer", "gpt2"), ("GPT2Tokenizer", "llama"), ("GPT2TokenizerFast", "gpt2"), ("GPT2Tokenizer", None)])
def test_direct_class_is_the_one_autotokenizer_loads(tmp_path, cls, model_type):
    config = None if model_type is None else {"model_type": model_type}
    path = _tok_dir(tmp_path / "t", cls, config)
    assert direct_tokenizer_class(path) is not None
    _same_as_auto(path)


@pytest.mark.parametrize("cls,config,tok_extra", [
    ("LlamaTokenizer", {"model_type": "llama"}, None),                     # class-specific pipelines
    (None, {"model_type": "qwen2"}, None),                                 # model types AutoTokenizer overrides
    (None, {"model_type": "gpt2"}, {"auto_map": {"AutoTokenizer": [None, "x.Tok"]}}),   # remote code
    ("GPT2Tokenizer", {"model_type": "gpt2", "_name_or_path": "org/name"}, None),       # overridden by hub name
    (None, {"model_type": "gpt2", "tokenizer_class": "BertTokenizer"}, None),
])
def test_anything_else_goes_through_autotokenizer(tmp_path, cls, config, tok_extra):
    assert direct_tokenizer_class(_tok_dir(tmp_path / "t", cls, config, tok_extra)) is None


def test_no_tokenizer_json_goes_through_autotokenizer(tmp_path):
    path = _tok_dir(tmp_path / "t", None, {"model_type": "gpt2"})
    os.remove(os.path.join(path, "tokenizer.json"))
    assert direct_tokenizer_class(path) is None


def test_model_dir_tokenizer_loads_without_torch(tmp_path):
    """A model directory (config.json + tokenizer files), as the server loads it: torch and transformers' auto
    classes stay unimported (they are what made start-up slow)."""
    path = _tok_dir(tmp_path / "t", None, {"model_type": "gpt2"})
    code = ("import sys; from yaie_jax.tokenizer import load_tokenizer; t = load_tokenizer(sys.argv[1]); "
            "assert t.encode('The quick'); "
            "bad = [m for m in ('torch', 'transformers.models.auto', 'transformers.configuration_utils') "
            "if m in sys.modules]; print('IMPORTED', bad)")
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "IMPORTED []" in r.stdout, r.stdout
