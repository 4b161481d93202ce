"""A deterministic stand-in for `yaie_jax.engine.core.LLMEngine`, so the server tests need no model.

It implements the engine interface the server relies on (add_request / make_request + add_prepared /
abort_request / step / has_unfinished_requests / get_stats, `tokenizer`, `model_config`, `max_model_len`,
`config`) with vLLM output semantics (cumulative text and token ids, finish reasons stop/length/timeout), and
refuses bad input with the engine's typed errors (yaie_jax/errors.py: `param` names the field at fault).

Tokenizer: bytes. Token id b < 256 is the byte b, 256 is EOS ("<|eos|>"), ids up to VOCAB_SIZE-1 are other
special tokens. Text is UTF-8; streamed text never ends in half a character.

Model ("echo"): under greedy sampling, output token j of every sample is prompt_ids[j % len(prompt)], except that
a '|' byte is replaced by EOS (so "ab|" answers "ab" and stops). With temperature > 0 each token is a lowercase
letter drawn from a RNG seeded by (seed or request id, sample index, position): seeded requests reproduce.

Scheduling: one token per running sequence per step, a waiting queue bounded by `max_num_seqs` running
sequences, `step_delay_s` of sleep per step (the "device"), KV blocks of `block_size` tokens held while
running, and a prefix cache of earlier prompts (block-aligned), so `num_cached_tokens` and the prefix-cache
counters move. Every engine call (except make_request, which only reads state) asserts it runs on one thread.
"""
from __future__ import annotations

import collections
import dataclasses
import random
import threading
import time
import types
import zlib
from typing import List, Optional, Union

from yaie_jax.config import EngineConfig
from yaie_jax.errors import ContextLengthError, InvalidRequestError
from yaie_jax.outputs import CompletionOutput, Logprob, RequestOutput
from yaie_jax.sampling_params import SamplingParams

EOS = 256
VOCAB_SIZE = 260
PIPE = ord("|")


class ByteTokenizer:
    """Just enough of a transformers tokenizer for the server: encode/decode/eos_token_id/chat_template."""
    eos_token_id = EOS
    eos_token = "<|eos|>"
    bos_token_id = None
    chat_template = None          # -> yaie_jax.tokenizer.apply_chat_template uses its role-prefixed fallback
    vocab_size = VOCAB_SIZE

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = bytearray()
        parts: List[str] = []
        for t in ids:
            t = int(t)
            if t < 256:
                out.append(t)
            elif not skip_special_tokens:
                parts.append(out.decode("utf-8", errors="replace"))
                out = bytearray()
                parts.append("<|eos|>" if t == EOS else f"<|special{t}|>")
        parts.append(out.decode("utf-8", errors="replace"))
        return "".join(parts)

    def __call__(self, text, **kw):
        return {"input_ids": self.encode(text)}


def complete_utf8_prefix(data: bytes) -> bytes:
    """The longest prefix of `data` that does not end inside a multi-byte UTF-8 character."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:          # continuation byte: keep looking for the lead byte
            continue
        if b & 0x80 == 0:             # ASCII
            return data
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return data if back >= need else data[:-back]
    return data


@dataclasses.dataclass
class _Seq:
    index: int
    token_ids: List[int] = dataclasses.field(default_factory=list)
    logprobs: Optional[list] = None
    text: str = ""
    released: str = ""
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None


class FakeRequest:
    def __init__(self, request_id, prompt_text, prompt_ids, params, *, priority, client_id, queue_timeout_s,
                 timeout_s, stream, max_tokens):
        self.request_id = request_id
        self.prompt = prompt_text
        self.prompt_token_ids = prompt_ids
        self.params = params
        self.priority = priority
        self.client_id = client_id
        self.queue_timeout_s = queue_timeout_s
        self.timeout_s = timeout_s
        self.stream = stream
        self.max_tokens = max_tokens
        self.arrival_time = time.monotonic()
        self.first_token_time: Optional[float] = None
        self.finished_time: Optional[float] = None
        self.seqs = [_Seq(i, logprobs=[] if params.logprobs is not None else None) for i in range(params.n)]
        self.num_cached_tokens = 0
        self.started = False

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class FakeEngine:
    """See the module docstring. Knobs: `step_delay_s`, `max_num_seqs`, `max_model_len`, `num_kv_blocks`,
    `paused` (steps make no progress: requests stay waiting), `fail_next_step` (next step raises), `hang_steps`
    (a threading.Event: while set, a step does not return), `compiling` (what `compiling_programs()` reports)."""

    def __init__(self, *, max_model_len: int = 512, max_num_seqs: int = 64, step_delay_s: float = 0.002,
                 block_size: int = 8, num_kv_blocks: int = 4096, split_admission: bool = True,
                 model: str = "fake-model"):
        self.config = EngineConfig(model=model, max_num_seqs=max_num_seqs, block_size=block_size,
                                   num_gpu_blocks=num_kv_blocks, warmup=False, max_model_len=max_model_len)
        self.tokenizer = ByteTokenizer()
        self.model_config = types.SimpleNamespace(max_position_embeddings=max_model_len, vocab_size=VOCAB_SIZE,
                                                  eos_token_id=EOS)
        self.max_model_len = max_model_len
        self.served_model_name = model
        self.step_delay_s = step_delay_s
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.paused = False
        self.fail_next_step = False
        self.hang_steps = threading.Event()
        self.compiling: List[dict] = []
        self.waiting: "collections.OrderedDict[str, FakeRequest]" = collections.OrderedDict()
        self.running: "collections.OrderedDict[str, FakeRequest]" = collections.OrderedDict()
        self.seen_prefixes = set()
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.num_preemptions = 0
        self.num_steps = 0
        self.num_aborted = 0
        self.added_ids: List[str] = []
        self._owner: Optional[int] = None
        if not split_admission:       # hide the split API: the AsyncEngine then falls back to add_request
            self.make_request = None
            self.add_prepared = None

    # ------------------------------------------------------------------ single-thread contract
    def _check_thread(self) -> None:
        me = threading.get_ident()
        if self._owner is None:
            self._owner = me
        assert self._owner == me, "FakeEngine used from two threads"

    # ------------------------------------------------------------------ requests
    def make_request(self, request_id, prompt: Union[str, List[int]], params: Optional[SamplingParams] = None, *,
                     prompt_token_ids=None, priority: int = 0, client_id=None, queue_timeout_s=None,
                     timeout_s=None, arrival_time=None, stream: bool = True) -> FakeRequest:
        params = params or SamplingParams()
        if prompt_token_ids is None:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        else:
            ids = [int(t) for t in prompt_token_ids]
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if min(ids) < 0 or max(ids) >= VOCAB_SIZE:
            raise InvalidRequestError(f"prompt token ids must be in [0, {VOCAB_SIZE})", param="prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        if len(ids) + max_tokens > self.max_model_len or max_tokens < 1:
            raise ContextLengthError(f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                     f"you requested {len(ids) + max(1, max_tokens)} tokens (context length "
                                     f"exceeded).")
        if params.n > self.config.max_num_seqs:
            raise InvalidRequestError(f"n={params.n} exceeds max_num_seqs={self.config.max_num_seqs}", param="n")
        for t in params.stop_token_ids:
            if not 0 <= t < VOCAB_SIZE:
                raise InvalidRequestError(f"stop_token_ids must be in [0, {VOCAB_SIZE})", param="stop_token_ids")
        return FakeRequest(request_id, prompt if isinstance(prompt, str) else None, ids, params, priority=priority,
                           client_id=client_id, queue_timeout_s=queue_timeout_s, timeout_s=timeout_s,
                           stream=stream, max_tokens=max_tokens)

    def add_prepared(self, req: FakeRequest) -> None:
        self._check_thread()
        if req.request_id in self.waiting or req.request_id in self.running:
            raise ValueError(f"duplicate request id {req.request_id}")
        self.waiting[req.request_id] = req
        self.added_ids.append(req.request_id)

    def add_request(self, request_id, prompt, params=None, **kwargs) -> str:
        self._check_thread()
        req = FakeEngine.make_request(self, request_id, prompt, params, **kwargs)
        FakeEngine.add_prepared(self, req)
        return request_id

    def abort_request(self, request_id) -> None:
        self._check_thread()
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            if self.waiting.pop(rid, None) is not None or self.running.pop(rid, None) is not None:
                self.num_aborted += 1

    def has_unfinished_requests(self) -> bool:
        self._check_thread()
        return bool(self.waiting or self.running)

    def compiling_programs(self) -> List[dict]:
        return list(self.compiling)

    # ------------------------------------------------------------------ stats
    def _blocks(self, req: FakeRequest) -> int:
        n = len(req.prompt_token_ids) + max((len(s.token_ids) for s in req.seqs), default=0)
        return -(-n // self.block_size) * len(req.seqs)

    def get_stats(self) -> dict:
        self._check_thread()
        used = sum(self._blocks(r) for r in self.running.values())
        return {"num_running": sum(len(r.seqs) for r in self.running.values()),
                "num_waiting": sum(len(r.seqs) for r in self.waiting.values()),
                "num_swapped": 0, "num_preemptions": self.num_preemptions,
                "prefix_cache_queried_tokens": self.queried_tokens, "prefix_cache_hit_tokens": self.hit_tokens,
                "kv_blocks_total": self.num_kv_blocks, "kv_blocks_free": self.num_kv_blocks - used,
                "kv_cache_usage": used / self.num_kv_blocks}

    # ------------------------------------------------------------------ the step
    def step(self) -> List[RequestOutput]:
        self._check_thread()
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected engine failure")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        while self.hang_steps.is_set():
            time.sleep(0.005)
        self.num_steps += 1
        now = time.monotonic()
        outputs: List[RequestOutput] = []
        # timeouts
        for pool in (self.waiting, self.running):
            for rid, req in list(pool.items()):
                over = req.timeout_s is not None and now - req.arrival_time > req.timeout_s
                over_q = (not req.started and req.queue_timeout_s is not None
                          and now - req.arrival_time > req.queue_timeout_s)
                if over or over_q:
                    for s in req.seqs:
                        if s.finish_reason is None:
                            s.finish_reason = "timeout"
                            s.text = s.released = self._final_text(req, s)
                    req.finished_time = now
                    del pool[rid]
                    outputs.append(self._output(req))
        if self.paused:
            return outputs
        # admit
        running_seqs = sum(len(r.seqs) for r in self.running.values())
        for rid, req in list(self.waiting.items()):
            if running_seqs + len(req.seqs) > self.config.max_num_seqs:
                break
            del self.waiting[rid]
            self.running[rid] = req
            req.started = True
            running_seqs += len(req.seqs)
            self._prefix_lookup(req)
        # decode one token per running sequence
        for rid, req in list(self.running.items()):
            for s in req.seqs:
                if s.finish_reason is None:
                    self._generate_one(req, s)
            if req.first_token_time is None:
                req.first_token_time = now
            if req.finished:
                req.finished_time = now
                del self.running[rid]
                outputs.append(self._output(req))
            elif req.stream:
                outputs.append(self._output(req))
        return outputs

    def _prefix_lookup(self, req: FakeRequest) -> None:
        ids = req.prompt_token_ids
        bs = self.block_size
        full = (len(ids) - 1) // bs            # the last prompt token is always computed
        hit = 0
        for k in range(full, 0, -1):
            if tuple(ids[:k * bs]) in self.seen_prefixes:
                hit = k * bs
                break
        for k in range(1, full + 1):
            self.seen_prefixes.add(tuple(ids[:k * bs]))
        req.num_cached_tokens = hit
        self.queried_tokens += len(ids)
        self.hit_tokens += hit

    def _next_token(self, req: FakeRequest, s: _Seq) -> int:
        p = req.params
        j = len(s.token_ids)
        if p.temperature == 0.0:
            t = req.prompt_token_ids[j % len(req.prompt_token_ids)]
            return EOS if t == PIPE else t
        seed = p.seed if p.seed is not None else zlib.crc32(req.request_id.encode())
        rng = random.Random(f"{seed}:{s.index}:{j}")
        return ord("a") + rng.randrange(26)

    def _generate_one(self, req: FakeRequest, s: _Seq) -> None:
        p = req.params
        t = self._next_token(req, s)
        n_out = len(s.token_ids) + 1
        if n_out <= p.min_tokens and (t == EOS or t in p.stop_token_ids):
            t = PIPE if t == EOS else t + 1 if t + 1 < 256 else 0
        s.token_ids.append(t)
        if s.logprobs is not None:
            entry = {t: Logprob(-0.25, rank=1, decoded_token=self.tokenizer.decode([t], skip_special_tokens=False))}
            for r in range(p.logprobs):
                alt = (t + 1 + r) % 256
                if alt not in entry:
                    entry[alt] = Logprob(-1.0 - r, rank=r + 2, decoded_token=self.tokenizer.decode([alt]))
            s.logprobs.append(entry)
        is_stop_token = t in p.stop_token_ids or (t == EOS and not p.ignore_eos)
        if is_stop_token and n_out >= p.min_tokens:
            s.finish_reason = "stop"
            s.stop_reason = t if t in p.stop_token_ids else None
            s.text = s.released = self._decode(s.token_ids[:-1])
            s.text = s.released = self._cut_stop(req, s, s.text, final=True)
            return
        text = self._decode(s.token_ids)
        cut = self._cut_stop(req, s, text, final=False)
        if s.finish_reason == "stop":
            s.text = s.released = cut
            return
        if n_out >= req.max_tokens or len(req.prompt_token_ids) + n_out >= self.max_model_len:
            s.finish_reason = "length"
            s.text = s.released = self._decode(s.token_ids, final=True)
            return
        s.text = text
        s.released = self._holdback(req, text)

    def _decode(self, ids: List[int], final: bool = False) -> str:
        data = bytes(t for t in ids if t < 256)
        if not final:
            data = complete_utf8_prefix(data)
        return data.decode("utf-8", errors="replace")

    def _cut_stop(self, req: FakeRequest, s: _Seq, text: str, final: bool) -> str:
        best = None
        for stop in req.params.stop:
            i = text.find(stop)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return text
        i, stop = best
        s.finish_reason = "stop"
        s.stop_reason = stop
        return text[:i + len(stop)] if req.params.include_stop_str_in_output else text[:i]

    def _holdback(self, req: FakeRequest, text: str) -> str:
        """Streamed text withholds a tail that could still become a stop string."""
        keep = len(text)
        for stop in req.params.stop:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    keep = min(keep, len(text) - k)
                    break
        return text[:keep]

    def _final_text(self, req: FakeRequest, s: _Seq) -> str:
        return self._decode([t for t in s.token_ids if t != EOS], final=True)

    def _output(self, req: FakeRequest) -> RequestOutput:
        outs = []
        for s in req.seqs:
            text = s.text if s.finish_reason is not None else (s.released if req.stream else "")
            outs.append(CompletionOutput(index=s.index, text=text, token_ids=list(s.token_ids),
                                         cumulative_logprob=None if s.logprobs is None else -0.25 * len(s.token_ids),
                                         logprobs=None if s.logprobs is None else list(s.logprobs),
                                         finish_reason=s.finish_reason, stop_reason=s.stop_reason))
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             outputs=outs, finished=req.finished, num_cached_tokens=req.num_cached_tokens,
                             metrics={"arrival_time": req.arrival_time, "first_token_time": req.first_token_time,
                                      "finished_time": req.finished_time})


def make_engine(config: Optional[EngineConfig] = None) -> FakeEngine:
    """Engine factory for `python -m yaie_jax.serve --engine-factory tests.server.fake_engine:make_engine`."""
    import os
    kw = {"step_delay_s": float(os.environ.get("FAKE_STEP_DELAY_S", "0.002"))}
    if config is not None:
        kw["model"] = config.served_model_name or config.model or "fake-model"
        if config.max_num_seqs:
            kw["max_num_seqs"] = config.max_num_seqs
        if config.max_model_len:
            kw["max_model_len"] = config.max_model_len
    return FakeEngine(**kw)


def greedy_echo(prompt: str, max_tokens: int) -> str:
    """What the fake model answers under greedy sampling (no stop strings): the prompt repeated, cut at '|'."""
    data = prompt.encode("utf-8")
    out = bytearray()
    for j in range(max_tokens):
        b = data[j % len(data)]
        if b == PIPE:
            break
        out.append(b)
    return out.decode("utf-8", errors="replace")
