"""What the engine does with a device call's sampled tokens: append them, apply stop conditions, feed the
detokenizers of sequences whose text someone reads while it grows, decode the rest once at the finish, and build
the `RequestOutput`s.

It works on host arrays (the engine's `_fetch` brought them back). The `OutputProcessor` finishes sequences
through the scheduler (`Scheduler.finish_seq`), which frees their memory, and tells it when a prompt is computed
(`Scheduler.cache_computed`), so that its blocks join the prefix cache.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, Optional

from yaie_jax.engine.detokenizer import CONTEXT_TOKENS, IncrementalDetokenizer, decode_token, final_texts
from yaie_jax.executor import prompt_logprobs
from yaie_jax.outputs import CompletionOutput, Logprob, RequestOutput
from yaie_jax.scheduler import Scheduler
from yaie_jax.sequence import Request, Sequence, SeqStatus
from yaie_jax.step_types import SchedulerOutput


class OutputProcessor:
    """Turns sampled token ids into sequence state and `RequestOutput`s for one engine.

    tokenizer: None for token ids only (`skip_tokenizer_init`: texts are empty). eos_token_ids: the model's end
    tokens (a stop unless `ignore_eos`). step_view(result, j): step j of a fused call's result (fields stacked on
    a leading [num_steps] axis). host_time_s: the engine's per-phase host seconds ("process" is added here)."""

    def __init__(self, scheduler: Scheduler, tokenizer, eos_token_ids: List[int], max_model_len: int,
                 step_view: Callable, host_time_s: Dict[str, float]):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self._step_view, self.host_time_s = step_view, host_time_s

    # ------------------------------------------------------------------ tokens in
    def process(self, out: SchedulerOutput, result, finished_now: Dict[str, Request],
                touched: Dict[str, Request]) -> None:
        """Append the sampled tokens of a finished device call (host arrays), apply stop conditions, note which
        requests advanced (`touched`, streamed requests only) or finished (`finished_now`). Rows whose sequence is
        no longer running (finished or aborted while the call was in flight) are skipped, and so are tokens
        sampled after a sequence stopped."""
        t0 = time.perf_counter()
        now = time.monotonic()
        K = out.num_steps
        tokens = result.token_ids.tolist() if K == 1 else None     # [S]
        rows = result.token_ids.T.tolist() if K > 1 else None      # [S][num_steps]
        views = [result] if K == 1 else [self._step_view(result, j) for j in range(K)]
        for i, s in enumerate(out.scheduled):
            seq = s.seq
            req = seq.request
            if not s.sample or seq.status is not SeqStatus.RUNNING:
                continue
            if rows is None or not self._append_row(seq, rows[i], now):
                for j in range(K):
                    token = tokens[i] if K == 1 else rows[i][j]
                    self._append_token(seq, token, views[j], i)
                    if req.first_token_time is None:
                        req.first_token_time = now
                    if seq.num_output_tokens == 1:
                        self.scheduler.cache_computed(seq)     # the prompt is computed: share it from now on
                    self._check_stop(seq)
                    if seq.status is not SeqStatus.RUNNING:
                        break       # tokens sampled after a stop in a fused multi-step call are dropped
            if req.finished:
                finished_now[req.request_id] = req
            elif req.stream:
                touched[req.request_id] = req
        self.host_time_s["process"] += time.perf_counter() - t0

    def _append_row(self, seq: Sequence, row: List[int], now: float) -> bool:
        """The tokens of one sequence from a fused call, appended in one go; the same result as appending them one
        at a time (`_append_token` + `_check_stop`), for a sequence that needs nothing per token (no logprobs, no
        incremental text: not streamed, no stop strings). False (nothing done) for any other sequence."""
        req = seq.request
        p = req.params
        if seq.logprobs is not None or seq.detokenizer is not None or req.stream or p.stop:
            return False
        n0 = seq.num_output_tokens
        limit = min(len(row), req.max_tokens - n0, self.max_model_len - len(seq.token_ids))   # to a length stop
        if limit < 1:
            return False
        stop_ids = p.stop_token_ids
        take, stop_token = limit, None
        if stop_ids or not p.ignore_eos:
            for j in range(max(0, p.min_tokens - n0 - 1), limit):      # a stop token counts from min_tokens on
                t = row[j]
                if t in stop_ids or (not p.ignore_eos and t in self.eos_token_ids):
                    take, stop_token = j + 1, t
                    break
        seq.token_ids.extend(row[:take])
        seq.rng_counter += take
        if req.first_token_time is None:
            req.first_token_time = now
        if n0 == 0:
            self.scheduler.cache_computed(seq)                 # the prompt is computed: share it from now on
        if stop_token is not None:
            seq.text_excludes_last = True          # the stop token itself is not part of the text
            self.scheduler.finish_seq(seq, "stop", stop_reason=stop_token if stop_token in stop_ids else None)
        elif n0 + take >= req.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self.scheduler.finish_seq(seq, "length")
        return True

    def _append_token(self, seq: Sequence, token: int, result, row: int) -> None:
        """Append one sampled token with its logprobs (if asked: row `row` of `result`); give the sequence a
        detokenizer at its first token if its text is read while it grows (streamed, or stop strings)."""
        seq.token_ids.append(token)
        seq.rng_counter += 1
        if seq.logprobs is not None:
            lp = float(result.sampled_logprob[row])
            seq.cumulative_logprob += lp
            entry = {token: Logprob(lp, rank=int(result.sampled_rank[row]) if result.sampled_rank is not None else None,
                                    decoded_token=self._token_text(token))}
            k = seq.request.params.logprobs
            for j in range(k):
                tid = int(result.top_ids[row, j])
                if tid not in entry:
                    entry[tid] = Logprob(float(result.top_logprobs[row, j]), rank=j + 1,
                                         decoded_token=self._token_text(tid))
            seq.logprobs.append(entry)
        if seq.detokenizer is None and (seq.request.stream or seq.request.params.stop) and self.tokenizer is not None:
            self._new_detokenizer(seq)

    def _token_text(self, token: int) -> Optional[str]:
        return None if self.tokenizer is None else decode_token(self.tokenizer, token)

    def _new_detokenizer(self, seq: Sequence) -> None:
        """Give `seq` a detokenizer (nothing fed yet) with its request's text and stop-string options; stop strings
        count only when completed after the first min_tokens output tokens, as stop tokens do."""
        p = seq.request.params
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer, seq.token_ids[:seq.num_prompt_tokens], skip_special_tokens=p.skip_special_tokens,
            stop=p.stop, include_stop_str_in_output=p.include_stop_str_in_output, min_tokens=p.min_tokens)
        seq.detok_fed = 0

    # ------------------------------------------------------------------ stops
    def _check_stop(self, seq: Sequence) -> None:
        """After one appended token: finish `seq` on a stop token or stop string (from min_tokens on) or at its
        length limit (max_tokens, max_model_len); otherwise feed the token to its detokenizer, if any."""
        p = seq.request.params
        token = seq.token_ids[-1]
        n_out = seq.num_output_tokens
        is_stop_token = (token in p.stop_token_ids) or (not p.ignore_eos and token in self.eos_token_ids)
        if is_stop_token and n_out >= p.min_tokens:
            seq.text_excludes_last = True          # the stop token itself is not part of the text
            self._feed_detok(seq, exclude_last=True)
            self._finish_at_end_of_text(seq, "stop", token if token in p.stop_token_ids else None)
            return
        self._feed_detok(seq)
        det = seq.detokenizer
        if det is not None and det.stopped and n_out >= p.min_tokens:
            self.scheduler.finish_seq(seq, "stop", stop_reason=det.stop_reason)
            return
        if n_out >= seq.request.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self._finish_at_end_of_text(seq, "length", None)

    def _finish_at_end_of_text(self, seq: Sequence, reason: str, stop_reason) -> None:
        """Finish `seq` for a token-level reason (a stop token, the length limit) once its tokens are fed.

        Its text is final now, so the detokenizer releases what it held back (a trailing run of U+FFFD that more
        bytes could have completed, a tail that could have begun a stop string). If that text completes a stop
        string, the text is cut there and the sequence finishes as stopped by that string (vLLM's rule: a stop
        string found in the last step's text wins over the length or stop-token reason); otherwise with `reason`.
        """
        det = seq.detokenizer
        if det is not None and not seq.detok_flushed:
            det.flush()
            seq.detok_flushed = True
            if det.stopped:
                reason, stop_reason = "stop", det.stop_reason
        self.scheduler.finish_seq(seq, reason, stop_reason=stop_reason)

    def _feed_detok(self, seq: Sequence, exclude_last: bool = False) -> None:
        """Feed `seq`'s detokenizer (if any) the output tokens it has not seen (all but the last: `exclude_last`)."""
        det = seq.detokenizer
        if det is None:
            return
        end = len(seq.token_ids) - (1 if exclude_last else 0)
        start = seq.num_prompt_tokens + seq.detok_fed
        if end > start:
            det.add_tokens(seq.token_ids[start:end])
            seq.detok_fed = end - seq.num_prompt_tokens

    # ------------------------------------------------------------------ text and outputs
    def outputs(self, finished_now: Dict[str, Request], touched: Dict[str, Request]) -> List[RequestOutput]:
        """The outputs of one step: the advanced requests' (not finished), then the finished ones', which the
        scheduler then forgets (`Scheduler.pop_finished`)."""
        if finished_now:
            self._decode_final_texts(finished_now.values())
        outputs = [self.make_output(r) for r in touched.values() if r.request_id not in finished_now]
        for req in finished_now.values():
            outputs.append(self.make_output(req))
            self.scheduler.pop_finished(req)
        return outputs

    def _decode_final_texts(self, reqs: Iterable[Request]) -> None:
        """Set `final_text` of every finished sequence of `reqs` whose text nobody read while it grew (no
        detokenizer: not streamed, no stop strings), decoding them together (`detokenizer.final_texts`: two
        batched decodes per skip_special_tokens setting, where one detokenizer per sequence made two decodes
        each). A sequence the batch cannot decode is left to `_final_text`."""
        groups: Dict[bool, List[Sequence]] = {}
        for req in reqs if self.tokenizer is not None else ():
            if req.params.stop:
                continue
            for seq in req.seqs:
                if seq.detokenizer is None and seq.final_text is None and seq.is_finished():
                    groups.setdefault(req.params.skip_special_tokens, []).append(seq)
        for skip, seqs in groups.items():
            items = []
            for seq in seqs:
                p = seq.num_prompt_tokens
                end = len(seq.token_ids) - (1 if seq.text_excludes_last else 0)
                items.append((seq.token_ids[max(0, p - CONTEXT_TOKENS):p], seq.token_ids[p:end]))
            for seq, text in zip(seqs, final_texts(self.tokenizer, items, skip)):
                seq.final_text = text

    def _final_text(self, seq: Sequence) -> str:
        """Text of a sequence; decodes now if nobody needed it incrementally."""
        if seq.final_text is not None:
            return seq.final_text
        if self.tokenizer is None:         # skip_tokenizer_init: token ids only
            return ""
        if seq.detokenizer is None:
            self._new_detokenizer(seq)
            if seq.is_finished():          # all tokens at once: one decode (add + flush)
                end = len(seq.token_ids) - (1 if seq.text_excludes_last else 0)
                seq.detokenizer.finish(seq.token_ids[seq.num_prompt_tokens:end])
                seq.detok_fed = end - seq.num_prompt_tokens
                seq.detok_flushed = True
            else:
                self._feed_detok(seq, exclude_last=seq.text_excludes_last)
        if seq.is_finished() and not seq.detok_flushed:
            seq.detokenizer.flush()
            seq.detok_flushed = True
        return seq.detokenizer.text

    def make_output(self, req: Request) -> RequestOutput:
        """The request's output now: each sequence's final text if finished, else its released text if streamed
        (empty otherwise), token ids, logprobs, finish reasons, timing metrics and prompt logprobs."""
        outs = []
        for seq in sorted(req.seqs, key=lambda s: s.index):
            if seq.is_finished():
                text = self._final_text(seq)
            elif req.stream and seq.detokenizer is not None:
                text = seq.detokenizer.released_text
            else:
                text = ""
            outs.append(CompletionOutput(
                index=seq.index, text=text,
                token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        metrics = {"arrival_time": req.arrival_time, "first_scheduled_time": req.first_scheduled_time,
                   "first_token_time": req.first_token_time, "finished_time": req.finished_time}
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             outputs=outs, finished=req.finished, num_cached_tokens=req.seqs[0].num_cached_tokens,
                             metrics=metrics, prompt_logprobs=prompt_logprobs.finished_list(req))
