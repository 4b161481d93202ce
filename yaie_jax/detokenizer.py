"""Incremental detokenization with stop strings.

Text is decoded over a small sliding window of tokens (so each token costs O(window), not O(length)) and
released only when it is final: never while the window's text ends in U+FFFD (an incomplete multi-byte
character split across tokens), and never while it could still be the start of a stop string.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 6   # prompt tokens kept as left context, so the first output token decodes with its spacing


def decode_token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


class IncrementalDetokenizer:
    """Feed generated token ids with `add_tokens`; read `.text` (all text, cut at a stop string) and the deltas.

    `released_text` is what has been handed out as deltas; `text` may hold more (a tail that could still
    become a stop string), which `flush()` releases when the sequence ends for another reason.
    """

    def __init__(self, tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True,
                 stop: Optional[Sequence[str]] = None, include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.include_stop = include_stop_str_in_output
        self._tokens: List[int] = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self.text = ""                 # decoded output text (cut at the stop string once found)
        self.released = 0              # chars of `text` already handed out
        self.stopped = False
        self.stop_reason: Optional[str] = None
        self._max_stop = max((len(s) for s in self.stop), default=0)

    @property
    def released_text(self) -> str:
        return self.text[:self.released]

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, token_id: int) -> str:
        self._tokens.append(token_id)
        prefix = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        full = self._decode(self._tokens[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            return full[len(prefix):]
        return ""

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Decode new tokens; returns the newly released text (possibly empty)."""
        if self.stopped:
            return ""
        start = len(self.text)
        for t in token_ids:
            self.text += self._decode_new(int(t))
            if self.stop and self._check_stop(max(0, start - self._max_stop)):
                break
        return self._release()

    def _check_stop(self, search_from: int) -> bool:
        best = None
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        i, s = best
        self.text = self.text[:i + len(s)] if self.include_stop else self.text[:i]
        self.stopped = True
        self.stop_reason = s
        return True

    def _holdback(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        if self.stopped or not self.stop:
            return 0
        best = 0
        tail = self.text[-self._max_stop:]
        for s in self.stop:
            for k in range(min(len(s) - 1, len(tail)), best, -1):
                if tail.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self) -> str:
        end = len(self.text) - self._holdback()
        if end <= self.released:
            return ""
        delta = self.text[self.released:end]
        self.released = end
        return delta

    def flush(self) -> str:
        """The sequence ended for a reason other than a stop string: decode whatever the window still holds
        (an incomplete character at the very end stays as U+FFFD, as a full decode shows it) and release all."""
        if not self.stopped and self._read_offset < len(self._tokens):
            prefix = self._decode(self._tokens[self._prefix_offset:self._read_offset])
            full = self._decode(self._tokens[self._prefix_offset:])
            if len(full) > len(prefix):
                self.text += full[len(prefix):]
            self._prefix_offset = self._read_offset = len(self._tokens)
        delta = self.text[self.released:]
        self.released = len(self.text)
        return delta
