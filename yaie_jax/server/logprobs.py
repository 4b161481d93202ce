"""Logprobs of a `CompletionOutput` in OpenAI's two JSON formats.

- completions: {"tokens", "token_logprobs", "top_logprobs" (one {text: logprob} per token), "text_offset"}
- chat:        {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}
and prompt logprobs in vLLM's format (both endpoints): one entry per prompt token, None for the first, else
{token_id: {"logprob", "rank", "decoded_token"}} holding the prompt token and the top-k alternatives.

Both cover the output's tokens from index `start` on (a streamed chunk sends only the new ones). JSON has no
-inf: every logprob is clamped to `LOGPROB_FLOOR` (vLLM does the same); a missing or NaN one is the floor.
"""
from __future__ import annotations

from typing import Optional

from ..outputs import CompletionOutput, Logprob, PromptLogprobs

LOGPROB_FLOOR = -9999.0


def clamp_logprob(v: Optional[float]) -> float:
    if v is None or v != v:
        return LOGPROB_FLOOR
    return max(float(v), LOGPROB_FLOOR)


def token_text(tokenizer, tid: int, lp: Optional[Logprob] = None) -> str:
    """The text of token `tid`: the engine's decoding when it gave one, else the tokenizer's ("" if it fails)."""
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    if tokenizer is None:                     # skip_tokenizer_init: the id itself, as vLLM writes it
        return f"token_id:{tid}"
    try:
        return tokenizer.decode([tid], skip_special_tokens=False)
    except Exception:
        return ""


def completion_logprobs(tokenizer, c: CompletionOutput, start: int, offset0: int) -> Optional[dict]:
    """Completions format from token `start` on; `offset0`: the text offset (in characters) of that token."""
    if c.logprobs is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    off = offset0
    for j in range(start, min(len(c.logprobs), len(c.token_ids))):
        entry = c.logprobs[j]
        tid = c.token_ids[j]
        s = token_text(tokenizer, tid, entry.get(tid))
        tokens.append(s)
        token_lps.append(clamp_logprob(entry[tid].logprob) if tid in entry else LOGPROB_FLOOR)
        tops.append({token_text(tokenizer, t, lp): clamp_logprob(lp.logprob) for t, lp in entry.items()})
        offsets.append(off)
        off += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, c: CompletionOutput, start: int, top_n: int) -> Optional[dict]:
    """Chat format from token `start` on, with the `top_n` best alternatives per token (by rank, then logprob)."""
    if c.logprobs is None:
        return None
    content = []
    for j in range(start, min(len(c.logprobs), len(c.token_ids))):
        entry = c.logprobs[j]
        tid = c.token_ids[j]
        s = token_text(tokenizer, tid, entry.get(tid))
        ranked = sorted(entry.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                       -clamp_logprob(kv[1].logprob)))[:top_n]
        content.append({
            "token": s, "logprob": clamp_logprob(entry[tid].logprob) if tid in entry else LOGPROB_FLOOR,
            "bytes": list(s.encode("utf-8")),
            "top_logprobs": [{"token": token_text(tokenizer, t, lp), "logprob": clamp_logprob(lp.logprob),
                              "bytes": list(token_text(tokenizer, t, lp).encode("utf-8"))} for t, lp in ranked]})
    return {"content": content}


def prompt_logprobs_json(tokenizer, entries: Optional[PromptLogprobs]) -> Optional[list]:
    """vLLM's prompt_logprobs JSON of a `RequestOutput.prompt_logprobs` (None when it was not asked for)."""
    if entries is None:
        return None
    return [None if e is None else
            {str(t): {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank,
                      "decoded_token": token_text(tokenizer, t, lp)} for t, lp in e.items()}
            for e in entries]


__all__ = ["LOGPROB_FLOOR", "clamp_logprob", "token_text", "completion_logprobs", "chat_logprobs",
           "prompt_logprobs_json"]
