"""A model directory without tokenizer files: a clear error naming the fix, and token-id-only use
(skip_tokenizer_init, vLLM's name) giving the same tokens as the engine with a tokenizer."""
import os
import shutil

import pytest

import support
from yaie_jax import LLM, SamplingParams
from yaie_jax.tokenizer import TokenizerMissingError, load_tokenizer

PROMPTS = [[5, 17, 42, 99, 3], [200, 201, 7]]


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory):
    return support.make_gpt2_dir(str(tmp_path_factory.mktemp("bare_gpt2")), n_positions=128, with_tokenizer=False)


def test_missing_tokenizer_says_what_is_missing_and_how_to_pass_one(bare_dir):
    with pytest.raises(TokenizerMissingError, match="no tokenizer") as e:
        load_tokenizer(bare_dir)
    msg = str(e.value)
    assert "--tokenizer" in msg and "skip_tokenizer_init" in msg and "tokenizer.json" in msg
    with pytest.raises(FileNotFoundError, match="skip_tokenizer_init"):     # through the engine, too
        LLM(bare_dir, dtype="float32", num_gpu_blocks=32)


def test_token_ids_only_match_the_engine_with_a_tokenizer(bare_dir):
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    bare = LLM(bare_dir, dtype="float32", num_gpu_blocks=32, skip_tokenizer_init=True)
    assert bare.get_tokenizer() is None
    outs = bare.generate(PROMPTS, params, use_tqdm=False)
    # the same weights with a tokenizer beside them
    with_tok = os.path.join(os.path.dirname(bare_dir), "with_tok")
    shutil.copytree(bare_dir, with_tok, dirs_exist_ok=True)
    support.tiny_tokenizer(384).save_pretrained(with_tok)
    ref = LLM(with_tok, dtype="float32", num_gpu_blocks=32).generate(PROMPTS, params, use_tqdm=False)
    for o, r in zip(outs, ref):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids and len(o.outputs[0].token_ids) == 6
        assert o.outputs[0].text == ""
        assert [sorted(d) for d in o.outputs[0].logprobs] == [sorted(d) for d in r.outputs[0].logprobs]
        assert all(lp.decoded_token is None for d in o.outputs[0].logprobs for lp in d.values())
    with pytest.raises(ValueError, match="token ids"):
        bare.generate(["a text prompt"], params, use_tqdm=False)
    with pytest.raises(ValueError, match="stop"):
        bare.generate(PROMPTS[:1], SamplingParams(max_tokens=4, stop=["x"]), use_tqdm=False)
    with pytest.raises(ValueError, match="tokenizer"):
        bare.chat([{"role": "user", "content": "hi"}])
