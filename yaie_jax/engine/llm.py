"""`LLM`: offline generation, vLLM-shaped, over one `LLMEngine`; `_RequestFeeder` adds a call's requests while
the engine runs."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence as Seq, Union

from yaie_jax.engine.core import LLMEngine
from yaie_jax.engine.input_processor import PromptType, is_one_prompt
from yaie_jax.outputs import RequestOutput
from yaie_jax.sampling_params import SamplingParams


class LLM:
    """Offline generation, vLLM-shaped: `LLM(model, **engine_args).generate(prompts, sampling_params)`."""

    def __init__(self, model: Optional[str] = None, **engine_args):
        self.engine = LLMEngine(model=model, **engine_args)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_stats(self) -> dict:
        return self.engine.get_stats()

    def generate(self, prompts: Union[PromptType, Seq[PromptType]],
                 sampling_params: Union[None, SamplingParams, Seq[SamplingParams]] = None, *,
                 use_tqdm: bool = True, priority: Optional[Seq[int]] = None) -> List[RequestOutput]:
        """Generate for every prompt (strings, token-id lists, or a mix); outputs come back in input order.

        Requests are added as the engine runs (`_RequestFeeder`): a first chunk, then the rest while the device
        works. A prompt that fails validation raises ValueError after every request this call added is aborted."""
        if is_one_prompt(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        feeder = _RequestFeeder(self, prompts, params_list, priority)
        engine = self.engine
        try:
            feeder.add_first_chunk()
            engine.on_device_wait = feeder.add_while
            return self._run(feeder, use_tqdm)
        except BaseException:
            feeder.abort_all()
            raise
        finally:
            engine.on_device_wait = None

    def chat(self, messages, sampling_params: Union[None, SamplingParams, Seq[SamplingParams]] = None, *,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> List[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation (a list of {role, content}) or a list of them."""
        from yaie_jax.tokenizer import apply_chat_template
        if self.engine.tokenizer is None:
            raise ValueError("chat needs a tokenizer; this engine was built with skip_tokenizer_init")
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [apply_chat_template(self.engine.tokenizer, c, add_generation_prompt=add_generation_prompt)
                   for c in convs]
        token_prompts = [self.engine.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outs = self.generate(token_prompts, sampling_params, use_tqdm=use_tqdm)
        for o, p in zip(outs, prompts):
            o.prompt = p
        return outs

    def _run(self, feeder: "_RequestFeeder", use_tqdm: bool) -> List[RequestOutput]:
        from tqdm.auto import tqdm
        results: Dict[str, RequestOutput] = {}
        bar = tqdm(total=feeder.num_prompts, desc="generating", unit="req", disable=not use_tqdm)
        try:
            while len(results) < feeder.num_prompts:
                feeder.raise_error()
                if not self.engine.has_unfinished_requests():
                    if not feeder.add_chunk():
                        break
                    continue
                for out in self.engine.step():
                    if out.finished and out.request_id in feeder.ids and out.request_id not in results:
                        results[out.request_id] = out
                        bar.update(1)
            feeder.raise_error()
        finally:
            bar.close()
        return [results[i] for i in feeder.id_list]


class _RequestFeeder:
    """Adds an `LLM.generate` call's requests to the engine: enough to fill the first steps before the first one,
    the rest while the device runs (`LLMEngine.on_device_wait`), or in chunks whenever the engine runs dry:
    making a request costs host time, and adding all of a large call's before the first step kept the device idle
    (bench/NOTES.md, "Figures moved out of the code"). Each request's arrival time is when it is added.

    A prompt that fails validation stops the feeding; the error is raised from `generate` once the step under
    way returns, after every request it added is aborted (vLLM's `generate` also aborts what it added)."""

    FIRST_CHUNK_STEPS = 2     # prompt tokens of this many full steps before the first step (hits not counted)

    def __init__(self, llm: "LLM", prompts: list, params: list, priority):
        self.engine = llm.engine
        self.prompts, self.params, self.priority = prompts, params, priority
        self.num_prompts = len(prompts)
        self.id_list: List[str] = []
        self.ids: set = set()
        self.next = 0
        self.error: Optional[BaseException] = None
        self._prefix = f"offline-{id(llm)}-"
        # admission order depends on the whole queue with priorities or a policy other than fcfs: add all first
        self.all_first = priority is not None or self.engine.config.scheduling_policy != "fcfs"

    def _add_one(self) -> int:
        """Add the next prompt; returns its number of tokens."""
        i = self.next
        rid = self._prefix + str(next(self.engine._request_counter))
        req = self.engine.make_request(rid, self.prompts[i], self.params[i],
                                       priority=self.priority[i] if self.priority else 0, stream=False)
        self.engine.add_prepared(req)
        self.next = i + 1
        self.id_list.append(rid)
        self.ids.add(rid)
        return len(req.prompt_token_ids)

    def add_first_chunk(self) -> None:
        """Add prompts until they hold FIRST_CHUNK_STEPS steps of prompt tokens or number max_num_seqs, or all of
        them (raises at once on a bad prompt). All of them where the order of admission depends on the whole
        queue (priorities given, or a policy other than fcfs)."""
        cfg = self.engine.config
        if self.all_first:
            budget, cap = float("inf"), self.num_prompts
        else:
            budget, cap = self.FIRST_CHUNK_STEPS * cfg.max_num_batched_tokens, cfg.max_num_seqs
        tokens, added = 0, 0
        while self.next < self.num_prompts and tokens < budget and added < cap:
            tokens += self._add_one()
            added += 1

    def add_chunk(self) -> bool:
        """The engine has nothing to do: add the next chunk (as the first). False when every prompt is added."""
        if self.next >= self.num_prompts or self.error is not None:
            return False
        self.add_first_chunk()
        return True

    def add_while(self, busy_done) -> None:
        """`LLMEngine.on_device_wait`: add prompts until the call in flight is done. Never raises: a bad prompt's
        error is kept for `raise_error`."""
        if self.all_first:
            return                      # all were added up front
        try:
            while self.next < self.num_prompts and self.error is None and not busy_done():
                self._add_one()
        except Exception as e:          # noqa: BLE001 - re-raised by raise_error, outside the engine's step
            self.error = e

    def raise_error(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err

    def abort_all(self) -> None:
        """Abort every request this call added and run the engine until nothing is left in flight."""
        engine = self.engine
        engine.on_device_wait = None
        engine.abort_request(list(self.id_list))
        while engine.has_unfinished_requests():
            engine.step()
