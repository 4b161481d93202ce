"""Incremental detokenization: deltas concatenate to the full decode, never emit a broken character, and
stop strings are cut (also across token boundaries)."""
import os
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
import support  # noqa: E402
from yaie_jax.detokenizer import REPLACEMENT, IncrementalDetokenizer  # noqa: E402

TOK = support.tiny_tokenizer()


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 383), min_size=1, max_size=40), st.lists(st.integers(1, 383), max_size=5))
def test_deltas_concatenate_to_full_decode(ids, prompt):
    det = IncrementalDetokenizer(TOK, prompt)
    deltas = [det.add_tokens([t]) for t in ids]
    deltas.append(det.flush())
    assert "".join(deltas) == TOK.decode(ids, skip_special_tokens=True)
    for d in deltas[:-1]:
        assert not d.endswith(REPLACEMENT) or TOK.decode(ids).count(REPLACEMENT) > 0


def test_multibyte_characters_never_split():
    text = "caf\u00e9 \U0001F600\U0001F680 \u65e5\u672c"
    ids = TOK.encode(text)
    det = IncrementalDetokenizer(TOK, [])
    out = [det.add_tokens([t]) for t in ids]
    assert REPLACEMENT not in "".join(out)
    assert "".join(out) + det.flush() == text


def test_stop_string_across_tokens_and_holdback():
    text = "Paris is the capital of France. Berlin"
    ids = TOK.encode(text)
    det = IncrementalDetokenizer(TOK, [], stop=["capital of", "nothing"])
    released = ""
    for t in ids:
        released += det.add_tokens([t])
        assert "capital of"[:3] not in released[len("Paris is the "):] or det.stopped
        if det.stopped:
            break
    assert det.stopped and det.stop_reason == "capital of"
    assert det.text == "Paris is the " and released == "Paris is the "


def test_partial_stop_prefix_released_when_disambiguated():
    det = IncrementalDetokenizer(TOK, [], stop=["France!"])
    out = "".join(det.add_tokens([t]) for t in TOK.encode("France. ok"))
    assert not det.stopped and out + det.flush() == "France. ok"
