"""Incremental detokenization (yaie_jax/engine/detokenizer.py) against the tokenizer's own full decode.

Two tokenizers are built here (no hub): a byte-level BPE (GPT-2 style: multi-byte characters split across byte
tokens) and a SentencePiece-style BPE with byte fallback (Llama style: Metaspace "▁" spaces, a decoder that drops
the leading space of a decode, <0xNN> byte tokens). Both are trained on a tiny corpus with accents, CJK and emoji.
"""
from __future__ import annotations

import functools
import json

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from yaie_jax.engine import detokenizer as detok_mod
from yaie_jax.engine.detokenizer import IncrementalDetokenizer, decode_token

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve résumé, über straße.",
    "日本語の文章と中文句子。 😀🚀🎉 emoji!",
    "def f(x):\n    return x * 2  # code with    spaces\n",
    "Once upon a time, there was a little engine that could.",
]
SPECIALS = ["<|endoftext|>", "<|im_end|>"]


@functools.lru_cache(maxsize=None)
def byte_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], unk_token=SPECIALS[0],
                                   additional_special_tokens=SPECIALS[1:], clean_up_tokenization_spaces=False)


@functools.lru_cache(maxsize=None)
def sentencepiece_bpe():
    """Llama-style: ASCII merges only, so every non-ASCII character falls back to <0xNN> byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    meta = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = meta
    base.train_from_iterator(CORPUS * 10, trainer=trainers.BpeTrainer(vocab_size=220, show_progress=False))
    model = json.loads(base.to_str())["model"]
    ascii_ok = lambda t: all(c.isascii() or c == "▁" for c in t)  # noqa: E731
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for t in model["vocab"]:
        if ascii_ok(t) and t not in vocab:
            vocab[t] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    merges = [m for m in merges if ascii_ok(m[0] + m[1]) and m[0] + m[1] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = meta
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def feed(det, ids, chunks=None):
    """Feed ids (in chunks of the given sizes, cycling; default one by one); returns the deltas and, after each
    call, the text released so far."""
    chunks = chunks or [1]
    deltas, released, i, j = [], [], 0, 0
    while i < len(ids):
        c = chunks[j % len(chunks)]
        deltas.append(det.add_tokens(ids[i:i + c]))
        released.append("".join(deltas))
        i, j = i + c, j + 1
    return deltas, released


# ------------------------------------------------------------------------------- the tokenizers behave as assumed

def test_tokenizers_split_characters_across_tokens():
    bb, sp = byte_bpe(), sentencepiece_bpe()
    for tok in (bb, sp):
        ids = enc(tok, "日本語 😀")
        assert any("\ufffd" in tok.decode([i]) for i in ids)            # single tokens hold partial characters
        assert tok.decode(ids) == "日本語 😀"
    assert sp.decode(enc(sp, " world")) == "world"                     # SentencePiece drops the leading space
    assert sp.convert_ids_to_tokens(enc(sp, "😀"))[-1] == "<0x80>"


# -------------------------------------------------------------------------------------------- streaming, basic

@pytest.mark.parametrize("make", [byte_bpe, sentencepiece_bpe])
def test_stream_equals_full_decode(make):
    tok = make()
    prompt = enc(tok, "Once upon a time")
    text = " there was café crème 日本語の文章 😀🚀 and über straße.\n    return x"
    out = enc(tok, text)
    det = IncrementalDetokenizer(tok, prompt)
    deltas, released = feed(det, out)
    deltas.append(det.flush())
    expected = tok.decode(prompt + out)[len(tok.decode(prompt)):]
    assert expected == text
    assert "".join(deltas) == expected == det.text == det.released_text
    for r in released:
        assert expected.startswith(r)                                   # never a character that changes later
    assert not any("\ufffd" in d for d in deltas)


def test_sentencepiece_first_token_keeps_its_space():
    sp = sentencepiece_bpe()
    prompt, out = enc(sp, "Hello"), enc(sp, " world and more")[0:]
    assert sp.decode(out) == "world and more"                         # decoded alone, the space is lost
    det = IncrementalDetokenizer(sp, prompt)
    deltas, _ = feed(det, out)
    assert "".join(deltas) + det.flush() == " world and more"
    # without a prompt there is no space to keep
    det = IncrementalDetokenizer(sp, [])
    assert det.add_tokens(out) + det.flush() == "world and more"


def test_multibyte_character_is_released_whole():
    bb = byte_bpe()
    ids = enc(bb, "😀")
    assert len(ids) > 1
    det = IncrementalDetokenizer(bb, enc(bb, "x"))
    assert [det.add_tokens([i]) for i in ids] == [""] * (len(ids) - 1) + ["😀"]


def test_prompt_ending_inside_a_character():
    bb = byte_bpe()
    ids = enc(bb, "a😀b")
    k = next(i for i in range(1, len(ids)) if bb.decode(ids[:i]).endswith("\ufffd"))
    prompt, out = ids[:k], ids[k:]
    det = IncrementalDetokenizer(bb, prompt)
    assert "".join(feed(det, out)[0]) + det.flush() == bb.decode(out)   # the output decoded on its own


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(skip):
    bb = byte_bpe()
    eot, im_end = bb.convert_tokens_to_ids(SPECIALS)
    out = enc(bb, "ab") + [eot] + enc(bb, " 日本") + [im_end, im_end] + enc(bb, "c")
    det = IncrementalDetokenizer(bb, enc(bb, "hi"), skip_special_tokens=skip)
    text = "".join(feed(det, out)[0]) + det.flush()
    assert text == bb.decode(out, skip_special_tokens=skip)
    assert ("<|endoftext|>" in text) == (not skip)


def test_flush_releases_an_unfinished_character():
    bb = byte_bpe()
    ids = enc(bb, "ok 😀")
    det = IncrementalDetokenizer(bb, [])
    assert det.add_tokens(ids[:-1]) == "ok "
    assert det.flush() == bb.decode(ids[:-1])[3:]                    # U+FFFD: the sequence really ends there
    assert det.flush() == ""


@pytest.mark.parametrize("make", [byte_bpe, sentencepiece_bpe])
def test_decoder_of_equals_tokenizer_decode(make):
    """The direct Rust decode gives tokenizer.decode's text for any ids, specials kept or skipped; a tokenizer
    that cleans up spaces keeps transformers' decode."""
    import random
    tok = make()
    fn = detok_mod.decoder_of(tok)
    assert fn is detok_mod.decoder_of(tok)
    rng = random.Random()
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(0, 12))]
        for skip in (False, True):
            assert fn(ids, skip) == tok.decode(ids, skip_special_tokens=skip)

    class Cleaning:
        clean_up_tokenization_spaces = True
        is_fast = True
        backend_tokenizer = tok.backend_tokenizer

        def decode(self, ids, skip_special_tokens=False):
            return "via transformers"
    assert detok_mod.decoder_of(Cleaning())([1, 2], False) == "via transformers"


def test_decode_token():
    bb, sp = byte_bpe(), sentencepiece_bpe()
    eot = bb.convert_tokens_to_ids(SPECIALS[0])
    assert decode_token(bb, eot) == "<|endoftext|>"
    for i in enc(bb, "quick 😀"):
        assert decode_token(bb, i) == bb.decode([i])                 # byte-level: a token reads the same alone
    wor = enc(sp, "x world")[1]
    piece = sp.convert_ids_to_tokens(wor)
    assert piece.startswith("▁") and len(piece) > 1
    assert sp.decode([wor]) == piece[1:] and decode_token(sp, wor) == " " + piece[1:]   # SentencePiece keeps it
    assert decode_token(sp, sp.convert_tokens_to_ids("<0xE6>")) == "\ufffd"
    assert decode_token(sp, sp.eos_token_id) == "</s>"
    ids = enc(sp, "Hello world and more")
    assert "".join(decode_token(sp, i) for i in ids) == " Hello world and more"


class CountingTokenizer:
    """Passes decode through and records how many ids each call decodes."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids, **kw):
        self.sizes.append(len(ids))
        return self.tok.decode(ids, **kw)


@pytest.mark.parametrize("make", [byte_bpe, sentencepiece_bpe])
def test_work_per_token_is_bounded(make):
    tok = make()
    text = " ".join(CORPUS) * 20
    out = enc(tok, text)
    counting = CountingTokenizer(tok)
    prompt = enc(tok, "Once upon a time, there was a little")
    det = IncrementalDetokenizer(counting, prompt, stop=["never"])
    got = "".join(feed(det, out)[0]) + det.flush()
    assert got == tok.decode(prompt + out)[len(tok.decode(prompt)):]
    assert len(out) > 2000
    # the window stays short (a byte-fallback run may hold it a few tokens longer until its character is whole)
    assert max(counting.sizes) <= detok_mod.WINDOW_TOKENS + 4
    assert sum(counting.sizes) / len(out) <= 2 * detok_mod.WINDOW_TOKENS
    assert len(counting.sizes) <= 2 * len(out)


def byte_token(tok, b):
    """Id of the byte-level token for the single byte b (GPT-2's printable-character alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    if b in printable:
        ch = chr(b)
    else:
        ch = chr(256 + [x for x in range(256) if x not in printable].index(b))
    return tok.convert_tokens_to_ids(ch)


def test_byte_token_helper():
    bb = byte_bpe()
    assert bb.decode([byte_token(bb, 0xE6), byte_token(bb, 0x97), byte_token(bb, 0xA5)]) == "日"


def test_emoji_run_flows_and_window_stays_short():
    """Tokens that end one emoji and start the next keep every decode ending in U+FFFD: text must still flow."""
    bb = byte_bpe()
    out = enc(bb, "😀" * 300)
    assert all(bb.decode(out[:k]).endswith("\ufffd") for k in range(3, 40))
    counting = CountingTokenizer(bb)
    det = IncrementalDetokenizer(counting, enc(bb, "smile"))
    deltas, released = feed(det, out)
    assert "".join(deltas) + det.flush() == "😀" * 300
    assert len(released[len(out) // 2]) >= 100                        # released while streaming, not at the end
    assert max(counting.sizes) <= detok_mod.WINDOW_TOKENS + 4


def test_invalid_utf8_stream_is_released_and_bounded():
    bb = byte_bpe()
    lone = byte_token(bb, 0x80)                                      # a continuation byte with no lead byte
    out = [lone] * 300 + enc(bb, "ok 日本") + [lone] * 100 + [byte_token(bb, 0xE6)] * 80
    counting = CountingTokenizer(bb)
    det = IncrementalDetokenizer(counting, [])
    deltas, released = feed(det, out)
    assert "".join(deltas) + det.flush() == bb.decode(out)
    assert max(counting.sizes) <= detok_mod.MAX_WINDOW_TOKENS + 1
    assert len(released[200]) > 100                                  # garbage is not held forever


# ---------------------------------------------------------------------------------------- streaming, property

TEXT_ALPHABET = st.sampled_from(list("ab cdé日本語😀🚀\n.,") + ["the ", "über ", "  "])


@st.composite
def byte_level_streams(draw):
    bb = byte_bpe()
    segments = draw(st.lists(st.one_of(
        st.lists(TEXT_ALPHABET, min_size=1, max_size=8).map(lambda cs: enc(bb, "".join(cs))),
        st.lists(st.integers(0, len(bb) - 1), min_size=1, max_size=6),           # any ids: broken UTF-8 too
        st.sampled_from([[0], [1]])), min_size=1, max_size=16))
    out = [i for s in segments for i in s]
    prompt = draw(st.one_of(st.lists(TEXT_ALPHABET, max_size=4).map(lambda cs: enc(bb, "".join(cs))),
                            st.lists(st.integers(0, len(bb) - 1), max_size=6)))
    chunks = draw(st.lists(st.sampled_from([1, 2, 3, 4, 9, 17, 40]), min_size=1, max_size=4))
    return prompt, out, chunks


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=byte_level_streams(), skip=st.booleans())
def test_byte_level_streaming_property(stream, skip):
    """Released text is always a prefix of the final decode (so no U+FFFD that is not in the final text), and
    deltas + flush == tokenizer.decode(output ids), whatever the prompt, the ids and the chunking."""
    bb = byte_bpe()
    prompt, out, chunks = stream
    det = IncrementalDetokenizer(bb, prompt, skip_special_tokens=skip)
    deltas, released = feed(det, out, chunks)
    final = "".join(deltas) + det.flush()
    expected = bb.decode(out, skip_special_tokens=skip)
    assert final == expected == det.text
    for r in released:
        assert expected.startswith(r)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=byte_level_streams(), skip=st.booleans(), sp_text=st.lists(TEXT_ALPHABET, max_size=30).map("".join))
def test_finish_equals_add_then_flush(stream, skip, sp_text):
    """`finish` (one decode of everything) releases the text that add_tokens + flush release, on both
    tokenizers, after any number of tokens already added."""
    for tok, (prompt, out, chunks) in ((byte_bpe(), stream), (sentencepiece_bpe(), (enc(sentencepiece_bpe(), "Once"),
                                                                                      enc(sentencepiece_bpe(), sp_text),
                                                                                      stream[2]))):
        k = min(len(out), chunks[0] * 3)                       # some tokens already added one way or the other
        a = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        b = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
        head_a, head_b = a.add_tokens(out[:k]), b.add_tokens(out[:k])
        assert head_a + a.add_tokens(out[k:]) + a.flush() == head_b + b.finish(out[k:])
        assert a.text == b.text and b.num_output_tokens == len(out)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams=st.lists(byte_level_streams(), min_size=1, max_size=6), skip=st.booleans(),
       sp_texts=st.lists(st.tuples(st.lists(TEXT_ALPHABET, max_size=6).map("".join),
                                   st.lists(TEXT_ALPHABET, max_size=20).map("".join)), min_size=1, max_size=4))
def test_final_texts_equal_finish(streams, skip, sp_texts):
    """`final_texts` (batched decodes for many finished outputs) gives each output the text a fresh detokenizer's
    `finish` gives, on both tokenizers, for any prompt (broken UTF-8 at its end too) and output; None only where
    the context starts inside a character, and never for a clean prompt."""
    sp = sentencepiece_bpe()
    cases = [(byte_bpe(), [(p, o) for p, o, _ in streams]),
             (sp, [(enc(sp, a) or [sp.bos_token_id], enc(sp, b)) for a, b in sp_texts])]
    for tok, items in cases:
        got = detok_mod.final_texts(tok, items, skip_special_tokens=skip)
        assert len(got) == len(items)
        for (prompt, out), text in zip(items, got):
            want = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip).finish(out)
            if text is None:
                assert "\ufffd" in tok.decode(prompt[-detok_mod.CONTEXT_TOKENS:], skip_special_tokens=skip)
            else:
                assert text == want


def test_final_texts_branches():
    """The three cases of the batched rule, each against `finish`: a clean context, a prompt ending inside a
    character (no context), a context starting inside one (None: left to the detokenizer)."""
    bb = byte_bpe()
    emoji = enc(bb, "😀")
    assert len(emoji) > 1
    out = enc(bb, " über fox")
    clean, cut_end = enc(bb, "The quick brown fox"), enc(bb, "ab") + emoji[:-1]
    cut_start = enc(bb, "ab") + emoji[1:] * 2 + enc(bb, "a")      # context: 4 continuation bytes, then "a"
    got = detok_mod.final_texts(bb, [(clean, out), (cut_end, out), (cut_start, out)])
    for prompt, text in zip((clean, cut_end), got):
        assert text == IncrementalDetokenizer(bb, prompt).finish(out)
    assert got[1] == bb.decode(out)
    assert got[2] is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(st.one_of(st.lists(TEXT_ALPHABET, min_size=1, max_size=6).map("".join),
                                 st.sampled_from(["<s>", "</s>"])), min_size=1, max_size=8),
       prompt=st.lists(TEXT_ALPHABET, max_size=10).map("".join),
       chunks=st.lists(st.sampled_from([1, 2, 3, 4, 9, 40]), min_size=1,
                                                                                max_size=3),
       skip=st.booleans())
def test_sentencepiece_streaming_property(pieces, prompt, chunks, skip):
    sp = sentencepiece_bpe()
    specials = {"<s>": [sp.bos_token_id], "</s>": [sp.eos_token_id]}
    out = [i for p in pieces for i in (specials.get(p) or enc(sp, p))]
    prompt_ids = enc(sp, prompt)
    full, head = sp.decode(prompt_ids + out, skip_special_tokens=skip), sp.decode(prompt_ids, skip_special_tokens=skip)
    assume(full.startswith(head))
    expected = full[len(head):]
    det = IncrementalDetokenizer(sp, prompt_ids, skip_special_tokens=skip)
    deltas, released = feed(det, out, chunks)
    assert "".join(deltas) + det.flush() == expected
    for r in released:
        assert expected.startswith(r)


# ------------------------------------------------------------------------------------------------ stop strings

SENTENCE = "The quick brown fox jumps over the lazy dog."


def run_stop(stop, include=False, text=SENTENCE, chunks=None, **kw):
    bb = byte_bpe()
    det = IncrementalDetokenizer(bb, enc(bb, "Once"), stop=stop, include_stop_str_in_output=include, **kw)
    deltas, released = feed(det, enc(bb, text), chunks)
    deltas.append(det.flush())
    return det, deltas, released


def test_stop_string_spanning_tokens():
    bb = byte_bpe()
    assert len(enc(bb, " brown fox")) > 2
    det, deltas, released = run_stop(["brown fox"])
    assert det.stopped and det.stop_reason == "brown fox"
    assert det.text == "".join(deltas) == "The quick "
    assert all("b" not in r for r in released)                       # never released, not even a prefix
    det, deltas, _ = run_stop(["brown fox"], include=True)
    assert det.text == "".join(deltas) == "The quick brown fox"


def test_partial_match_is_held_then_released():
    bb = byte_bpe()
    det = IncrementalDetokenizer(bb, [], stop=["brown cat"])
    ids = enc(bb, SENTENCE)
    released = ""
    for k, i in enumerate(ids):
        released += det.add_tokens([i])
        shown = bb.decode(ids[:k + 1])
        if shown.endswith(" brown"):
            assert released == "The quick " and det.text == "The quick brown"
    released += det.flush()
    assert not det.stopped and det.stop_reason is None and released == det.text == SENTENCE


def test_earliest_completed_stop_wins():
    for stops in (["lazy", "quick brown", "fox"], ["fox", "quick brown", "lazy"]):
        det, deltas, _ = run_stop(stops)
        assert det.stop_reason == "quick brown" and "".join(deltas) == "The "
    # "brown" is complete before "quick brown fox" is, although the latter starts earlier
    det, deltas, _ = run_stop(["quick brown fox", "brown"])
    assert det.stop_reason == "brown" and "".join(deltas) == "The quick "
    # completed at the same character: the one that starts earlier (the longer) wins
    det, deltas, _ = run_stop(["own", "brown"])
    assert det.stop_reason == "brown" and "".join(deltas) == "The quick "
    # all tokens in one call: same answers
    det, deltas, _ = run_stop(["quick brown fox", "brown"], chunks=[100])
    assert det.stop_reason == "brown" and "".join(deltas) == "The quick "


def test_stop_with_multibyte_characters():
    det, deltas, released = run_stop(["日本"], text="中文 日本語 more")
    assert "".join(deltas) == det.text == "中文 " and det.stop_reason == "日本"
    det, deltas, _ = run_stop(["😀!"], text="smile 😀 and 😀!", include=True)
    assert "".join(deltas) == "smile 😀 and 😀!"


def test_flush_releases_a_possible_stop_prefix():
    det, deltas, released = run_stop(["dog!"], text="the lazy dog")
    assert released[-1] == "the lazy " and det.text == "the lazy dog" and not det.stopped
    assert deltas[-1] == "dog" and det.released_text == "the lazy dog"


def test_nothing_after_a_stop():
    bb = byte_bpe()
    det = IncrementalDetokenizer(bb, [], stop=["fox"])
    det.add_tokens(enc(bb, SENTENCE))
    assert det.stopped and det.text == "The quick brown "
    assert det.add_tokens(enc(bb, " more")) == "" and det.flush() == "" and det.text == "The quick brown "


def test_stop_on_special_token_text():
    bb = byte_bpe()
    im_end = bb.convert_tokens_to_ids(SPECIALS[1])
    out = enc(bb, "answer") + [im_end] + enc(bb, " junk")
    det = IncrementalDetokenizer(bb, [], stop=["<|im_end|>"], skip_special_tokens=False)
    assert det.add_tokens(out) == "answer" and det.stopped


def test_min_tokens_defers_stop_strings():
    bb = byte_bpe()
    ids = enc(bb, SENTENCE)
    k = next(i for i in range(len(ids)) if "quick" in bb.decode(ids[:i + 1]))   # token k completes "quick"
    det = IncrementalDetokenizer(bb, [], stop=["quick"], min_tokens=k + 1)
    feed(det, ids)
    assert not det.stopped and det.text == SENTENCE[:len(det.text)]
    # a stop string that began before min_tokens but is completed after it still counts
    det = IncrementalDetokenizer(bb, [], stop=["quick"], min_tokens=k)
    feed(det, ids)
    assert det.stopped and det.text == "The "


def first_stop(text, stops, include):
    """Reference: read the text one character at a time; the first stop string to be complete wins (ties: the
    longest, i.e. the one that starts earliest)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text.endswith(s, 0, end)]
        if done:
            s = max(done, key=len)
            return text[:end] if include else text[:end - len(s)], s
    return text, None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.lists(st.sampled_from(list("ab c日😀")), min_size=1, max_size=20).map("".join),
       stops=st.lists(st.lists(st.sampled_from(list("ab c日😀")), min_size=1, max_size=4).map("".join),
                      min_size=1, max_size=3),
       include=st.booleans(), chunks=st.lists(st.integers(1, 5), min_size=1, max_size=4))
def test_stop_strings_property(text, stops, include, chunks):
    bb = byte_bpe()
    ids = enc(bb, text)
    assert bb.decode(ids) == text
    expected, reason = first_stop(text, stops, include)
    det = IncrementalDetokenizer(bb, [], stop=stops, include_stop_str_in_output=include)
    deltas, released = feed(det, ids, chunks)
    final = "".join(deltas) + det.flush()
    assert final == expected == det.text
    assert det.stopped == (reason is not None) and det.stop_reason == reason
    for r in released:
        assert expected.startswith(r)


def test_stop_string_in_a_held_back_replacement_run_is_found_at_flush():
    """Trailing U+FFFD are held back (more bytes could make them a character), so a stop string that ends among
    them is complete only when flush() makes them final; `.stopped` tells the caller after flush (the engine then
    reports a stop-string finish)."""
    bb = byte_bpe()
    lone = byte_token(bb, 0x80)                                      # a continuation byte with no lead byte
    out = enc(bb, "ok <") + [lone] * 5
    for stop, include, want in (("\ufffd\ufffd", False, "ok <"), ("<\ufffd", False, "ok "),
                                ("<\ufffd", True, "ok <\ufffd")):
        det = IncrementalDetokenizer(bb, [], stop=[stop], include_stop_str_in_output=include)
        det.add_tokens(out)
        assert not det.stopped and det.text == "ok <"
        det.flush()
        assert det.stopped and det.stop_reason == stop and det.text == det.released_text == want


@st.composite
def byte_level_streams_with_stops(draw):
    """A byte-level stream (any ids: broken UTF-8 too) and stop strings cut from its final decode (so they may
    hold U+FFFD and span tokens), plus one that may not occur."""
    bb = byte_bpe()
    prompt, out, chunks = draw(byte_level_streams())
    skip = draw(st.booleans())
    text = bb.decode(out, skip_special_tokens=skip)
    stops = []
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        stops.append(text[i:i + draw(st.integers(1, 4))])
    stops.append(draw(st.lists(st.sampled_from(list("ab \ufffd日")), min_size=1, max_size=3).map("".join)))
    return prompt, out, chunks, skip, [s for s in stops if s]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=byte_level_streams_with_stops(), include=st.booleans())
def test_stop_strings_on_broken_utf8_property(stream, include):
    """With stop strings taken from text that holds U+FFFD, token by token (any chunking) + flush and finish()
    give the text and stop reason that a character scan of the full decode gives."""
    bb = byte_bpe()
    prompt, out, chunks, skip, stops = stream
    expected, reason = first_stop(bb.decode(out, skip_special_tokens=skip), stops, include)
    a = IncrementalDetokenizer(bb, prompt, skip_special_tokens=skip, stop=stops, include_stop_str_in_output=include)
    b = IncrementalDetokenizer(bb, prompt, skip_special_tokens=skip, stop=stops, include_stop_str_in_output=include)
    deltas, released = feed(a, out, chunks)
    assert "".join(deltas) + a.flush() == expected == a.text == b.finish(out) == b.text
    assert (a.stop_reason, b.stop_reason) == (reason, reason)
    for r in released:
        assert expected.startswith(r)
