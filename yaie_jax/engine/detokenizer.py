"""Incremental detokenization with stop strings.

Decoding all output tokens again for every new token costs O(length) per token. Instead each new token is decoded
inside a short window of the latest tokens, and the new text is what the window's decode gained past the chars
already accounted for (context or text released earlier). Decoding a window rather than the new tokens alone
keeps the spacing right (SentencePiece decoders drop the leading space of a decode's first token, so the window
starts a few tokens back; the first output token gets the prompt's last tokens as context) and keeps a character
whose UTF-8 bytes span several tokens together.

Text is final, and so released, only when
- it is not part of the run of U+FFFD at the end of the decoded window: such a run may be a multi-byte character
  whose remaining bytes are still to come (byte-level BPE turns the incomplete tail into U+FFFD; byte-fallback
  decoders turn a whole run of byte tokens into U+FFFDs until every character in it is complete). Text before the
  run is released at once, so a stream of emoji split across tokens still flows;
- it cannot be the beginning of a stop string any more.

The window moves up once it holds WINDOW_TOKENS tokens, to a start a few tokens back whose decode lines up with the
current one (same text after at most 3 U+FFFD of a cut character, ending in the not-yet-released text), so the
work per token is O(window) whatever the length. A stream that stays unreadable for MAX_WINDOW_TOKENS tokens is
invalid UTF-8, not a character in progress: it is released as it decodes.

Stop strings: the first stop string to be completed, reading the text left to right, wins (ties: the one that
starts earliest, i.e. the longest). The text is cut before it (after it with include_stop_str_in_output),
`.stopped` is set and `.stop_reason` is the stop string; later tokens are ignored. This is what a character-by-
character scan finds, so it does not depend on how the text is split into tokens.
"""
from __future__ import annotations

import weakref
from typing import Callable, List, Optional, Sequence, Tuple

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5        # tokens of context before the new text (prompt tail at first), for spacing
CONTEXT_SEARCH = 4        # how much further back a context may start, to find one that begins on a character
WINDOW_TOKENS = 16        # the window moves up once it holds this many tokens
MAX_WINDOW_TOKENS = 64    # ... and is forced to when it has held this many without a complete character
BULK_TOKENS = 8           # tokens decoded together by add_tokens when there are no stop strings
MAX_CUT_CHAR = 3          # a context cut inside a character shows at most 3 continuation bytes as U+FFFD


_TOKEN_TEXT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # tokenizer -> {id: text}


def _anchor_id(tokenizer) -> Optional[int]:
    """A plain token ("a") to decode before another, so that the other keeps its leading space."""
    try:
        ids = tokenizer.encode("a", add_special_tokens=False)
    except Exception:
        return None
    return int(ids[-1]) if ids else None


def decode_token(tokenizer, token_id: int) -> str:
    """Text of one token, as it reads after other text (for logprobs): special tokens kept, SentencePiece's "▁"
    kept as a leading space (decoding the token alone would drop it), a partial UTF-8 byte as U+FFFD. Cached per
    tokenizer."""
    token_id = int(token_id)
    try:
        cache = _TOKEN_TEXT.setdefault(tokenizer, {})
    except TypeError:                                 # not weak-referenceable / hashable: no cache
        cache = {}
    if token_id in cache:
        return cache[token_id]
    if "anchor" not in cache:
        cache["anchor"] = _anchor_id(tokenizer)
    anchor = cache["anchor"]
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if anchor is not None:
        head = tokenizer.decode([anchor], skip_special_tokens=False)
        both = tokenizer.decode([anchor, token_id], skip_special_tokens=False)
        if both.startswith(head) and len(both) > len(head) and not head.endswith(REPLACEMENT):
            text = both[len(head):]
    cache[token_id] = text
    return text


_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()    # tokenizer -> decode function


def _rust_backend(tokenizer):
    """The `tokenizers` object behind a fast tokenizer that does no clean-up of the text (so its decode alone is
    `tokenizer.decode`), or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and hasattr(backend, "decode_batch") \
            and getattr(tokenizer, "is_fast", False) and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
        return backend
    return None


def decoder_of(tokenizer) -> Callable[[List[int], bool], str]:
    """decode(ids, skip_special_tokens) -> text, equal to `tokenizer.decode(ids, skip_special_tokens=...)` for a
    list of ints. For a `tokenizers`-backed tokenizer that does no clean-up of the text (clean_up_tokenization_
    spaces off, as for GPT-2 and Llama tokenizers in transformers 5) that is the Rust decode alone, called
    directly: transformers' wrapper around it spends most of a short decode converting and checking the ids."""
    try:
        return _DECODERS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = _rust_backend(tokenizer)
    if backend is not None:
        def fn(ids, skip_special_tokens):
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)
    else:
        def fn(ids, skip_special_tokens):
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    try:
        _DECODERS[tokenizer] = fn
    except TypeError:                                 # not weak-referenceable / hashable: no cache
        pass
    return fn


_BATCH_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> batch decode


def batch_decoder_of(tokenizer) -> Callable[[List[List[int]], bool], List[str]]:
    """decode_batch(list of id lists, skip_special_tokens) -> texts, each equal to `decoder_of(tokenizer)` of that
    list: one call into the Rust tokenizer (which decodes the lists in parallel) where `decoder_of` uses it
    directly, else one decode per list."""
    try:
        return _BATCH_DECODERS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = _rust_backend(tokenizer)
    if backend is not None:
        def fn(batch, skip_special_tokens):
            return backend.decode_batch(batch, skip_special_tokens=skip_special_tokens)
    else:
        one = decoder_of(tokenizer)

        def fn(batch, skip_special_tokens):
            return [one(ids, skip_special_tokens) for ids in batch]
    try:
        _BATCH_DECODERS[tokenizer] = fn
    except TypeError:                                 # not weak-referenceable / hashable: no cache
        pass
    return fn


def final_texts(tokenizer, items: Sequence[Tuple[Sequence[int], Sequence[int]]],
                skip_special_tokens: bool = True) -> List[Optional[str]]:
    """The text of finished outputs that nobody read while they grew, decoded for all of them at once.

    items: (prompt token ids, output token ids) per output. Each text equals
    `IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens).finish(output)` without stop strings: the output
    decoded after the prompt's last CONTEXT_TOKENS tokens, minus the context's own text (no context where the
    context's decode ends inside a character). Two batched decodes in all (contexts, then contexts + outputs)
    instead of two per output. None for an output whose context starts inside a character (the detokenizer then
    searches further back): the caller decodes that one with an `IncrementalDetokenizer`."""
    decode_batch = batch_decoder_of(tokenizer)
    contexts = [[int(t) for t in prompt[-CONTEXT_TOKENS:]] for prompt, _ in items]
    context_texts = decode_batch(contexts, skip_special_tokens)
    windows: List[List[int]] = []
    skips: List[Optional[int]] = []                  # chars of a window's text that are the context's
    for ctx, ctx_text, (_, output) in zip(contexts, context_texts, items):
        junk = _leading_replacements(ctx_text)
        if junk > MAX_CUT_CHAR or (junk and junk == len(ctx_text)):
            skips.append(None)                       # `_set_context` would look further back
            windows.append([])
        elif ctx_text.endswith(REPLACEMENT):
            skips.append(0)                          # the prompt ends inside a character: no context
            windows.append(list(output))
        else:
            skips.append(len(ctx_text))
            windows.append(ctx + list(output))
    window_texts = decode_batch(windows, skip_special_tokens)
    return [None if skip is None else text[skip:] for skip, text in zip(skips, window_texts)]


def _trailing_replacements(s: str) -> int:
    return len(s) - len(s.rstrip(REPLACEMENT))


def _leading_replacements(s: str) -> int:
    return len(s) - len(s.lstrip(REPLACEMENT))


class IncrementalDetokenizer:
    """Feed generated token ids with `add_tokens`; each call returns the newly released text.

    `text`: all output text decoded so far (cut at the stop string once one is found); it may end in a tail that
    is not released yet because it could still become a stop string. `released_text` / `released`: what has been
    handed out as deltas, and its length. `flush()` releases the rest when the sequence ends for another reason.
    `min_tokens`: stop strings are looked for only from the token after the first `min_tokens` output tokens
    (vLLM's rule), so a stop string completed by token min_tokens + 1 still counts even if it began earlier.
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Optional[Sequence[str]] = None, include_stop_str_in_output: bool = False,
                 min_tokens: int = 0):
        self.tokenizer = tokenizer
        self._decode_fn = decoder_of(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        if isinstance(stop, str):
            stop = [stop]
        self.stop: List[str] = [s for s in (stop or []) if s]
        self.include_stop = include_stop_str_in_output
        self.min_tokens = min_tokens
        self._max_stop = max((len(s) for s in self.stop), default=0)
        # decode window: the text of tokens[_window:] is decoded; its first _done chars are accounted for
        # (context, or output text already taken)
        self._tokens: List[int] = []
        self._window, self._done = 0, 0
        self._set_context([int(t) for t in list(prompt_token_ids)[-(CONTEXT_TOKENS + CONTEXT_SEARCH):]])
        self._num_output_tokens = 0
        # text state: text = released_text + _unreleased; only _unreleased is ever cut (at a stop string)
        self._released_chunks: List[str] = []
        self._unreleased = ""
        self._text_cache: Optional[str] = ""
        self._tail = ""           # the last (max_stop - 1) chars of text, for stop checks and hold-back
        self.released = 0         # chars of `text` handed out so far
        self.stopped = False
        self.stop_reason: Optional[str] = None

    # ------------------------------------------------------------------ text
    @property
    def text(self) -> str:
        """All output text so far (cut at the stop string once found), released or not."""
        if self._text_cache is None:
            self._text_cache = self.released_text + self._unreleased
        return self._text_cache

    @property
    def released_text(self) -> str:
        """The concatenation of every delta handed out so far."""
        if len(self._released_chunks) > 1:
            self._released_chunks = ["".join(self._released_chunks)]
        return self._released_chunks[0] if self._released_chunks else ""

    @property
    def num_output_tokens(self) -> int:
        return self._num_output_tokens

    def _decode(self, ids) -> str:
        return self._decode_fn(ids, self.skip_special_tokens)

    # ------------------------------------------------------------------ decoding
    def _set_context(self, tail: List[int]) -> None:
        """Use the prompt's last tokens as context: from CONTEXT_TOKENS back (further back, up to CONTEXT_SEARCH,
        if that start cuts a character), none if the prompt ends inside a character (the output is then decoded
        on its own)."""
        for start in range(max(0, len(tail) - CONTEXT_TOKENS), -1, -1):
            ctx = self._decode(tail[start:])
            junk = _leading_replacements(ctx)
            if junk > MAX_CUT_CHAR or (junk and junk == len(ctx)):
                continue
            if not ctx.endswith(REPLACEMENT):
                self._tokens, self._window, self._done = list(tail), start, len(ctx)
            return

    def _find_context(self, window_text: str, lo: int, pending: int) -> Optional[Tuple[int, int]]:
        """A later window start whose decode lines up with window_text: (start, chars accounted in it), or None.

        Lining up: after at most MAX_CUT_CHAR U+FFFD (bytes of a character cut by the start) the new decode is a
        suffix of window_text, and that suffix covers the unaccounted text. A start whose leading U+FFFD run is
        not followed by real text is refused: with byte-fallback decoders it can poison the bytes that follow.
        pending: how many chars at the end of window_text are not accounted for."""
        top = len(self._tokens) - CONTEXT_TOKENS
        for start in range(top, max(lo + 1, top - CONTEXT_SEARCH) - 1, -1):
            text = self._decode(self._tokens[start:])
            junk = _leading_replacements(text)
            rest = text[junk:]
            if junk > MAX_CUT_CHAR or (junk and not rest) or len(rest) < pending:
                continue
            if window_text.endswith(rest):
                return start, len(text) - pending
        return None

    def _decode_new(self, force: bool = False) -> str:
        """Decode the window; return the text that became final (all of it when forced)."""
        window_text = self._decode(self._tokens[self._window:])
        size = len(self._tokens) - self._window
        if size > MAX_WINDOW_TOKENS:
            force = True                              # unreadable for too long: invalid UTF-8, not pending
        end = len(window_text) if force else len(window_text) - _trailing_replacements(window_text)
        new = window_text[self._done:end] if end > self._done else ""
        self._done = max(self._done, end)
        if size >= WINDOW_TOKENS:
            ctx = self._find_context(window_text, self._window, len(window_text) - self._done)
            if ctx is not None:
                self._window, self._done = ctx
                del self._tokens[:self._window]           # tokens before the window are never decoded again
                self._window = 0
            elif size > MAX_WINDOW_TOKENS:
                self._tokens, self._window, self._done = [], 0, 0   # start afresh (all text was taken)
        return new

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Decode new output tokens; returns the newly released text (possibly empty)."""
        if self.stopped:
            return ""
        if not self.stop:
            # no stop strings: nothing depends on per-token granularity, so decode the window once per
            # BULK_TOKENS tokens (the released text is the same; far fewer decode calls for long additions)
            ids = [int(t) for t in token_ids]
            for i in range(0, len(ids), BULK_TOKENS):
                chunk = ids[i:i + BULK_TOKENS]
                self._tokens.extend(chunk)
                self._num_output_tokens += len(chunk)
                self._add_text(self._decode_new())
            return self._release()
        for t in token_ids:
            self._tokens.append(int(t))
            self._num_output_tokens += 1
            self._add_text(self._decode_new())
            if self.stopped:
                break
        return self._release()

    def _add_text(self, new: str) -> None:
        if not new:
            return
        before = self._tail
        text_len = self.released + len(self._unreleased)
        self._unreleased += new
        self._text_cache = None
        if self._max_stop > 1:
            self._tail = (before + new)[-(self._max_stop - 1):]
        if not self.stop or self._num_output_tokens <= self.min_tokens:
            return
        # a new occurrence ends inside `new`, so it starts within the retained tail + new
        region = before + new
        best = None                                          # (end, start, stop) in region coordinates
        for s in self.stop:
            i = region.find(s, max(0, len(before) - len(s) + 1))
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        if best is None:
            return
        end, start, s = best
        cut = text_len - len(before) + (end if self.include_stop else start)   # in text coordinates
        # released text never reaches into a stop string (hold-back), so the cut is in the unreleased part
        self._unreleased = self._unreleased[:max(0, cut - self.released)]
        self._text_cache = None
        self.stopped = True
        self.stop_reason = s

    def _holdback(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        if self.stopped or not self.stop or self.include_stop:
            return 0
        tail = self._tail
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, final: bool = False) -> str:
        n = len(self._unreleased) if final else len(self._unreleased) - self._holdback()
        if n <= 0:
            return ""
        delta, self._unreleased = self._unreleased[:n], self._unreleased[n:]
        self._released_chunks.append(delta)
        self.released += n
        return delta

    def flush(self) -> str:
        """End of the sequence (length, EOS, abort): decode what is pending and release all text. The text held
        back until now (a trailing run of U+FFFD) may complete a stop string: the text is then cut there and
        `.stopped` / `.stop_reason` are set by this call, so a caller reporting why the sequence ended reads them
        after it."""
        if not self.stopped:
            self._add_text(self._decode_new(force=True))
        return self._release(final=True)

    def finish(self, token_ids: Sequence[int]) -> str:
        """`add_tokens(token_ids)` then `flush()`, for a sequence whose text nobody read while it grew: without
        stop strings the window (context + every token) is decoded once, rather than every BULK_TOKENS tokens
        with the window moving up. Returns all text released by the call."""
        if self.stop or self.stopped:
            return self.add_tokens(token_ids) + self.flush()
        ids = list(token_ids)          # (ints or anything with __index__: the Rust decode takes either)
        self._tokens.extend(ids)
        self._num_output_tokens += len(ids)
        window_text = self._decode(self._tokens[self._window:])
        self._add_text(window_text[self._done:])
        self._done = len(window_text)
        return self._release(final=True)
