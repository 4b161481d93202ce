"""What the server keeps about a generation request while it runs: its outputs so far and their timings.

- `OutputTracker` (one per engine request = one prompt): the cumulative outputs seen, what of them was already
  streamed (text and token counts per sample), first/last token times.
- `Call` (one per HTTP request): its engine requests (one stream and one tracker per prompt) and the fixed facts
  of its answer (id, endpoint, model, creation time).
- `RequestRecorder`: turns observations into Prometheus metrics (TTFT, inter-token latency, finished requests
  and sequences) and one request-log line per finished request; logs the first answered request at start-up.
Times are `time.monotonic()` seconds of this process (like the engine's `first_token_time`).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import List, Optional

from yaie_jax.engine.async_engine import RequestStream
from ..outputs import CompletionOutput, RequestOutput
from .logging import RequestLog, fmt_age
from .metrics import ServerMetrics

logger = logging.getLogger("yaie_jax.server")


class OutputTracker:
    """Per engine request with `n` samples: turns cumulative outputs into deltas and timing observations."""

    def __init__(self, n: int, arrival: float):
        self.arrival = arrival
        self.text = [""] * n                 # per sample: the text already sent
        self.ntok = [0] * n                  # per sample: the tokens already sent (or observed)
        self.done = [False] * n              # per sample: its last chunk was sent
        self.first_token_at: List[Optional[float]] = [None] * n
        self.last_token_at: List[Optional[float]] = [None] * n
        self.finish_at: List[Optional[float]] = [None] * n
        self.final: Optional[RequestOutput] = None      # the finished output, once it came
        self.last: Optional[RequestOutput] = None       # the latest output
        self.ttft: Optional[float] = None               # seconds, the earliest first token of any sample

    @property
    def latest(self) -> Optional[RequestOutput]:
        return self.final or self.last

    def text_delta(self, c: CompletionOutput) -> str:
        """The text of sample `c.index` not yet sent (all of it if the engine rewrote what was sent)."""
        sent = self.text[c.index]
        return c.text[len(sent):] if c.text.startswith(sent) else c.text

    def mark_sent(self, c: CompletionOutput, delta: str) -> None:
        """`delta` of sample `c.index` (and its tokens so far) went out in a chunk."""
        j = c.index
        self.text[j] = c.text if c.text.startswith(self.text[j]) else self.text[j] + delta
        self.ntok[j] = len(c.token_ids)
        if c.finish_reason is not None:
            self.done[j] = True


@dataclasses.dataclass
class Call:
    """One generation request after admission (every prompt admitted, or none and no Call)."""
    rid: str                          # the answer's id ("cmpl-..." / "chatcmpl-..."), prefix of the engine ids
    endpoint: str                     # "/v1/completions" or "/v1/chat/completions"
    input_param: str                  # the request field holding the prompt: "prompt" or "messages"
    n: int                            # samples per prompt
    arrival: float                    # time.monotonic() when the HTTP request arrived
    client: Optional[str]             # api key id or host, ":user" appended when given
    model: str                        # the model name the answer echoes
    created: int                      # unix seconds, echoed in every chunk
    streams: List[RequestStream]      # one per prompt
    trackers: List[OutputTracker]     # trackers[i] follows streams[i]

    def abort(self) -> None:
        """Abort every engine request that has not finished (frees their KV blocks). Never raises."""
        for s in self.streams:
            s.abort()


def usage_of(trackers: List[OutputTracker]) -> dict:
    """OpenAI's `usage` summed over the latest outputs of `trackers`."""
    prompt = completion = cached = 0
    for tr in trackers:
        out = tr.latest
        if out is None:
            continue
        prompt += len(out.prompt_token_ids)
        completion += sum(len(c.token_ids) for c in out.outputs)
        cached += int(out.num_cached_tokens or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class RequestRecorder:
    """Metrics and request-log lines of the generation requests of one app."""

    def __init__(self, metrics: ServerMetrics, reqlog: RequestLog, model_name: str):
        self.metrics = metrics
        self.reqlog = reqlog
        self.model_name = model_name
        self.answered_one = False          # the first answered request is logged once (start-up log)

    def observe(self, tr: OutputTracker, out: RequestOutput, now: float, streamed: bool) -> None:
        """Record output `out` of `tr`'s request: token timings, finished sequences. Not `streamed`: only the
        final output comes, so the first-token time is the engine's and the inter-token latency an average."""
        tr.last = out
        for c in out.outputs:
            j = c.index
            if j >= len(tr.ntok):
                continue
            k = len(c.token_ids) - tr.ntok[j]
            if k > 0:
                if tr.first_token_at[j] is None:
                    self._first_token(tr, j, out, now, streamed)
                elif streamed and tr.last_token_at[j] is not None:
                    gap = (now - tr.last_token_at[j]) / k
                    for _ in range(k):
                        self.metrics.observe_itl(gap)
                tr.last_token_at[j] = now
            if c.finish_reason is not None and tr.finish_at[j] is None:
                self._sequence_finished(tr, c, now, streamed)
        if out.finished:
            tr.final = out

    def _first_token(self, tr: OutputTracker, j: int, out: RequestOutput, now: float, streamed: bool) -> None:
        first = now
        ftt = (out.metrics or {}).get("first_token_time")
        if not streamed and isinstance(ftt, float) and tr.arrival <= ftt <= now:
            first = ftt                    # only the final output came back: take the engine's first-token time
        tr.first_token_at[j] = first
        if tr.ttft is None or first - tr.arrival < tr.ttft:
            tr.ttft = first - tr.arrival

    def _sequence_finished(self, tr: OutputTracker, c: CompletionOutput, now: float, streamed: bool) -> None:
        j = c.index
        tr.finish_at[j] = now
        ntok = len(c.token_ids)
        if not streamed and ntok > 1 and tr.first_token_at[j] is not None:
            self.metrics.observe_itl((now - tr.first_token_at[j]) / (ntok - 1))
        self.metrics.observe_sequence_finished(
            c.finish_reason, ntok, None if tr.first_token_at[j] is None else tr.first_token_at[j] - tr.arrival,
            now - tr.arrival)

    def finish(self, call: Call, now: float) -> None:
        """The request is over: record TTFT and the request's totals for every engine request that answered."""
        for tr in call.trackers:
            out = tr.latest
            if out is None:
                continue
            if tr.ttft is not None:
                self.metrics.observe_ttft(tr.ttft)
            self.metrics.observe_request_finished(len(out.prompt_token_ids),
                                                  sum(len(c.token_ids) for c in out.outputs), now - tr.arrival)

    def log_finished(self, call: Call, stream: bool, status: int = 200, aborted: bool = False) -> None:
        """The request-log line of `call` (finish reason "abort" for samples without one when `aborted`)."""
        u = usage_of(call.trackers)
        reasons = []
        for tr in call.trackers:
            out = tr.latest
            for j in range(len(tr.ntok)):
                r = out.outputs[j].finish_reason if out is not None and j < len(out.outputs) else None
                reasons.append(r or ("abort" if aborted else None))
        uniq = sorted(set(str(r) for r in reasons))
        ttfts = [tr.ttft for tr in call.trackers if tr.ttft is not None]
        if status == 200 and not self.answered_one:
            self.answered_one = True
            logger.info("start-up: first request answered, %s (its latency %.3f s)", fmt_age(),
                        time.monotonic() - call.arrival)
        self.reqlog.finished(request_id=call.rid, model=self.model_name, endpoint=call.endpoint,
                             prompt_tokens=u["prompt_tokens"], completion_tokens=u["completion_tokens"],
                             cached_tokens=u["prompt_tokens_details"]["cached_tokens"],
                             ttft_s=min(ttfts) if ttfts else None, latency_s=time.monotonic() - call.arrival,
                             finish_reason=uniq[0] if len(uniq) == 1 else uniq, n=call.n, stream=stream,
                             status=status, client=call.client)


__all__ = ["OutputTracker", "Call", "usage_of", "RequestRecorder"]
