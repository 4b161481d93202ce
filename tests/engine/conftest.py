import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import support  # noqa: E402


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    return support.make_gpt2_dir(str(tmp_path_factory.mktemp("tiny_gpt2")), n_positions=256)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return support.make_llama_dir(str(tmp_path_factory.mktemp("tiny_llama")))
