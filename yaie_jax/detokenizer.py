"""Incremental detokenization with stop strings.

Decoding all output tokens again for every new token is O(length) per token. Instead each new token is decoded
inside a small window of tokens: the window starts at the token where the previously released chunk began, so
the decoded window = (text already released) + (new text). Decoding the window, not the new tokens alone, keeps
the spacing right: SentencePiece decoders drop the leading space of the first token of a decode, and byte-level
BPE needs the bytes of a character that spans tokens together. The chars of the window that precede the new
text are measured once, when the window moves.

Text is released only when final:
- never while the decoded window ends in U+FFFD (a multi-byte character whose remaining bytes are still to come).
  After MAX_PENDING_TOKENS tokens that never complete a character the replacement characters are taken as final
  (the model produced invalid UTF-8), which bounds the window;
- never while the tail of the text could still be the beginning of a stop string.

Stop strings: the first stop string to be completed, reading the text left to right, wins (ties: the one that
starts earliest). The text is cut before it (after it with include_stop_str_in_output), `.stopped` is set and
`.stop_reason` is the stop string; later tokens are ignored.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5        # prompt tokens kept as left context, so the first output token decodes with its spacing
MAX_PENDING_TOKENS = 8    # a character is at most 4 bytes: 8 tokens that never complete one are garbage, not pending
CONTEXT_SEARCH = 4        # how much further back the context may start, to avoid starting inside a character
WINDOW_TOKENS = 16        # the decode window is cut back to CONTEXT_TOKENS once it holds more than this


def decode_token(tokenizer, token_id: int) -> str:
    """Text of one token on its own (for logprobs): special tokens kept, a partial UTF-8 byte shows as U+FFFD."""
    return tokenizer.decode([int(token_id)], skip_special_tokens=False)


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
        self.skip_special_tokens = skip_special_tokens
        if isinstance(stop, str):
            stop = [stop]
        self.stop: List[str] = [s for s in (stop or []) if s]
        self.include_stop = include_stop_str_in_output
        self.min_tokens = min_tokens
        self._max_stop = max((len(s) for s in self.stop), default=0)
        # window state: tokens = context + output; the text of tokens[_window:_read] is already accounted for
        # (context or released output) and is _window_prefix_len chars long
        self._tokens: List[int] = [int(t) for t in list(prompt_token_ids)[-(CONTEXT_TOKENS + CONTEXT_SEARCH):]]
        if self._tokens and self._decode(self._tokens).endswith(REPLACEMENT):
            self._tokens = []     # the prompt ends inside a character: decode the output on its own
        self._read = len(self._tokens)
        self._window, self._window_prefix_len = self._context_start(0)
        self._num_output_tokens = 0
        # text state: text = "".join(_released_chunks) + _unreleased; only _unreleased is ever cut
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
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    # ------------------------------------------------------------------ decoding
    def _context_start(self, lo: int):
        """A window start for context ending at _read: CONTEXT_TOKENS back, moved further back (not before lo)
        while the context would begin inside a multi-byte character, whose bytes would decode differently alone
        (byte-fallback decoders turn a whole run of byte tokens into U+FFFDs when it starts mid-character)."""
        start = max(lo, self._read - CONTEXT_TOKENS)
        for s in range(start, max(lo, start - CONTEXT_SEARCH) - 1, -1):
            ctx = self._decode(self._tokens[s:self._read])
            if not ctx.startswith(REPLACEMENT):
                return s, len(ctx)
        return start, len(self._decode(self._tokens[start:self._read]))

    def _decode_new(self, force: bool = False) -> str:
        """Decode the window and return its new final text: "" while it ends in an incomplete character."""
        window_text = self._decode(self._tokens[self._window:])
        pending = len(self._tokens) - self._read
        if not force and pending <= MAX_PENDING_TOKENS and window_text.endswith(REPLACEMENT):
            return ""
        new = window_text[self._window_prefix_len:]
        self._read = len(self._tokens)
        self._window_prefix_len = len(window_text)
        if self._read - self._window > WINDOW_TOKENS:
            # move the window up: _read is a point where the text was complete, so the new context decodes the
            # same way now as it will with more tokens after it
            self._window, self._window_prefix_len = self._context_start(self._window)
        return new

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Decode new output tokens; returns the newly released text (possibly empty)."""
        if self.stopped:
            return ""
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
        """End of the sequence (length, EOS, abort): decode what is pending and release all text."""
        if not self.stopped and self._read < len(self._tokens):
            self._add_text(self._decode_new(force=True))
        return self._release(final=True)
