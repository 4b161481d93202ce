"""Engine features beyond plain greedy: sampling, stops, n > 1, logprobs, deadlines, abort, policies."""
import time

import numpy as np
import pytest

import support
from yaie_jax import LLM, SamplingParams
from yaie_jax.engine.core import LLMEngine
from yaie_jax.engine.input_processor import checked_token_ids

BASE = dict(dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None)


@pytest.fixture(scope="module")
def llm(gpt2_dir):
    return LLM(gpt2_dir, **BASE)


def rand_prompt(rng, n=None):
    return rng.integers(1, 384, size=int(n or rng.integers(4, 30))).tolist()


def test_seeded_sampling_reproducible_and_batch_independent(llm):
    rng = np.random.default_rng()
    target = rand_prompt(rng, 12)
    sp = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([target], sp, use_tqdm=False)[0].outputs[0].token_ids
    others = [rand_prompt(rng) for _ in range(5)]
    mixed = llm.generate(others[:2] + [target] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=8)] * 2 + [sp]
                         + [SamplingParams(temperature=0.5, max_tokens=20)] * 3, use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = llm.generate([target], SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99,
                                                       max_tokens=16, ignore_eos=True), use_tqdm=False)
    assert other_seed[0].outputs[0].token_ids != alone


def test_multi_step_decode_keeps_seeded_samples_and_logprobs(gpt2_dir, llm):
    rng = np.random.default_rng()
    prompts = [rand_prompt(rng) for _ in range(3)]
    sp = SamplingParams(temperature=0.8, seed=11, max_tokens=12, ignore_eos=True, logprobs=2)
    fused = LLM(gpt2_dir, num_decode_steps=4, **BASE)
    a = llm.generate(prompts, sp, use_tqdm=False)
    b = fused.generate(prompts, sp, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for ex, ey in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert set(ex) == set(ey) and all(abs(ex[t].logprob - ey[t].logprob) < 1e-5 for t in ex)
    assert fused.get_stats()["num_steps"] < llm.get_stats()["num_steps"]


def test_pipelined_fused_decode_equals_single_steps_with_ragged_ends(gpt2_dir, llm):
    """Fused calls dispatched ahead (async scheduling) give the single-step engine's tokens when requests end
    inside a call: max_tokens not a multiple of num_decode_steps, and a stop token met mid-call."""
    rng = np.random.default_rng()
    prompts = [rand_prompt(rng) for _ in range(6)]
    params = [SamplingParams(temperature=0.8, seed=int(rng.integers(1 << 30)), max_tokens=int(rng.integers(3, 20)),
                             ignore_eos=True) for _ in prompts]
    params[0] = SamplingParams(temperature=0.8, seed=7, max_tokens=30, ignore_eos=True)
    free_run = llm.generate(prompts[:1], params[:1], use_tqdm=False)[0].outputs[0].token_ids
    params[0] = SamplingParams(temperature=0.8, seed=7, max_tokens=30, ignore_eos=True, stop_token_ids=[free_run[9]])
    ref = llm.generate(prompts, params, use_tqdm=False)
    fused = LLM(gpt2_dir, num_decode_steps=4, **BASE)
    got = fused.generate(prompts, params, use_tqdm=False)
    for x, y in zip(ref, got):
        assert y.outputs[0].token_ids == x.outputs[0].token_ids
        assert y.outputs[0].finish_reason == x.outputs[0].finish_reason
    assert got[0].outputs[0].finish_reason == "stop" and len(got[0].outputs[0].token_ids) <= 10
    assert fused.get_stats()["num_pipelined_calls"] > 0
    fused.engine.block_manager.reset_prefix_cache()
    assert fused.engine.block_manager.num_free_gpu_blocks == fused.engine.runner.num_gpu_blocks


def test_fused_rows_match_single_steps_on_stops_and_text(gpt2_dir, llm):
    """Fused calls append each sequence's tokens in one go (`_append_row`): the same tokens, finish and stop
    reasons and text as one step at a time, with min_tokens deferring a stop token, a stop token without it, and
    length stops inside a call."""
    rng = np.random.default_rng()
    prompts = [rand_prompt(rng) for _ in range(5)]
    free = [o.outputs[0].token_ids for o in llm.generate(
        prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)]
    params = [SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[free[0][2]], min_tokens=6),
              SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[free[1][5]]),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=13, ignore_eos=True, stop_token_ids=[free[3][0]],
                             min_tokens=13),
              # runs on after the others (whose min_tokens hold fused calls back until the 13th token), so that
              # fused calls, and a pipelined one, happen whatever the random stops do
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]
    ref = llm.generate(prompts, params, use_tqdm=False)
    fused = LLM(gpt2_dir, num_decode_steps=4, **BASE)
    got = fused.generate(prompts, params, use_tqdm=False)
    for x, y in zip(ref, got):
        a, b = x.outputs[0], y.outputs[0]
        assert (b.token_ids, b.finish_reason, b.stop_reason, b.text) == (a.token_ids, a.finish_reason,
                                                                          a.stop_reason, a.text)
    assert got[1].outputs[0].finish_reason == "stop" and got[2].outputs[0].finish_reason == "length"
    assert fused.get_stats()["num_pipelined_calls"] > 0


def test_sampled_tokens_respect_top_k(llm, gpt2_dir):
    rng = np.random.default_rng()
    prompt = rand_prompt(rng, 8)
    logits = support.hf_logits(gpt2_dir, prompt)[-1]
    allowed = set(np.argsort(-logits)[:3].tolist())
    outs = llm.generate([prompt] * 12, SamplingParams(temperature=1.5, top_k=3, max_tokens=1), use_tqdm=False)
    firsts = {o.outputs[0].token_ids[0] for o in outs}
    assert firsts <= allowed and len(firsts) > 1


def test_logprobs_match_hf_log_softmax(llm, gpt2_dir):
    import torch
    rng = np.random.default_rng()
    prompt = rand_prompt(rng, 10)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, logprobs=5, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    ids = prompt + out.token_ids
    ref = torch.log_softmax(torch.tensor(support.hf_logits(gpt2_dir, ids)), -1).numpy()
    for j, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + j]
        assert abs(entry[tok].logprob - row[tok]) < 1e-4
        top = np.argsort(-row)[:5]
        for r, t in enumerate(top):
            assert int(t) in entry and abs(entry[int(t)].logprob - row[t]) < 1e-4
        assert entry[tok].rank == 1
    assert abs(out.cumulative_logprob - sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs))) < 1e-4


def test_max_and_min_tokens_and_stop_token(llm):
    rng = np.random.default_rng()
    prompt = rand_prompt(rng, 6)
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    stop_tok = greedy[3]
    first = greedy.index(stop_tok)
    o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_tok]),
                     use_tqdm=False)[0].outputs[0]
    assert o.finish_reason == "stop" and o.token_ids == greedy[:first + 1] and o.stop_reason == stop_tok
    o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, min_tokens=first + 2,
                                              stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert len(o.token_ids) >= first + 2 and stop_tok not in o.token_ids[:first + 2]
    o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 3


def test_stop_string_cut_from_text(llm):
    tok = llm.get_tokenizer()
    rng = np.random.default_rng()
    prompt = rand_prompt(rng, 6)
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    text = full.text
    assert len(text) > 6
    stop = text[3:6]                         # spans token boundaries in general
    o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
                     use_tqdm=False)[0].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert o.text == text[:text.index(stop)] and stop not in o.text
    o2 = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert o2.text == text[:text.index(stop) + len(stop)]


# prompts on which the tiny model (seed 0) ends its 20 greedy tokens in a run of lone UTF-8 bytes (U+FFFD each)
# that covers text[5]: "VVV" + 17 U+FFFD, and "\x1bKK<" + 16 U+FFFD
FFFD_TAIL_PROMPTS = [[279, 1, 46, 50, 75, 54], [19, 76, 180, 146, 165, 69]]


def _stream_last(engine, prompt, params):
    rid = engine.add_request(None, prompt, params, stream=True)
    last = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == rid:
                last = o
    return last.outputs[0]


@pytest.mark.parametrize("prompt", FFFD_TAIL_PROMPTS)
def test_stop_string_completed_in_the_held_back_tail(llm, prompt):
    """A stop string that ends inside the trailing run of U+FFFD (bytes that more tokens could still have made a
    character, so the detokenizer holds them back) is only complete once the sequence ends and the run is
    flushed: the text is cut there and the finish is a stop-string stop, not "length" (streamed or not)."""
    sp = dict(temperature=0, max_tokens=20, ignore_eos=True)
    text = llm.generate([prompt], SamplingParams(**sp), use_tqdm=False)[0].outputs[0].text
    stop = text[3:6]
    cut = text.index(stop)
    assert cut + len(stop) > len(text.rstrip("\ufffd")), f"no stop string in a U+FFFD tail here: {text!r}"
    for include in (False, True):
        params = SamplingParams(**sp, stop=[stop], include_stop_str_in_output=include)
        want = text[:cut + len(stop)] if include else text[:cut]
        for o in (llm.generate([prompt], params, use_tqdm=False)[0].outputs[0],
                  _stream_last(llm.engine, prompt, params)):
            assert (o.finish_reason, o.stop_reason, o.text) == ("stop", stop, want)
            assert len(o.token_ids) == 20


def test_min_tokens_defers_stop_strings(llm):
    """vLLM's rule: a stop string counts only if completed by a token after the first min_tokens; one completed
    earlier neither cuts the text nor stops the sequence."""
    tok = llm.get_tokenizer()
    sp = dict(temperature=0, max_tokens=20, ignore_eos=True)
    for seed in range(20):
        prompt = rand_prompt(np.random.default_rng(seed), 6)
        ids = llm.generate([prompt], SamplingParams(**sp), use_tqdm=False)[0].outputs[0].token_ids
        text = tok.decode(ids, skip_special_tokens=True)
        stop, early = text[:2], tok.decode(ids[:8], skip_special_tokens=True)
        if "\ufffd" not in text and len(stop) == 2 and len(early) >= 2:
            break
    else:
        pytest.fail("no prompt with plain text to take an early stop string from")
    o = llm.generate([prompt], SamplingParams(**sp, stop=[stop], min_tokens=8), use_tqdm=False)[0].outputs[0]
    later = text.find(stop, len(early) - len(stop) + 1)          # first occurrence completed after 8 tokens
    if later < 0:
        assert (o.finish_reason, o.stop_reason, o.text) == ("length", None, text)
    else:
        assert (o.finish_reason, o.stop_reason, o.text) == ("stop", stop, text[:later])


def test_n_samples_share_prompt_and_differ(llm):
    rng = np.random.default_rng()
    out = llm.generate([rand_prompt(rng, 20)], SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=7,
                                                               ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    greedy = llm.generate([out.prompt_token_ids], SamplingParams(n=3, temperature=0, max_tokens=8,
                                                                  ignore_eos=True), use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in greedy.outputs}) == 1


def test_mixed_prompt_types_and_order(llm):
    tok = llm.get_tokenizer()
    outs = llm.generate(["Paris is", [5, 6, 7], "The quick brown"], SamplingParams(temperature=0, max_tokens=3),
                        use_tqdm=False)
    assert outs[0].prompt_token_ids == tok.encode("Paris is")
    assert outs[1].prompt_token_ids == [5, 6, 7]
    assert outs[2].prompt == "The quick brown"


def test_streaming_deltas_equal_final_text(gpt2_dir):
    eng = LLMEngine(model=gpt2_dir, **BASE)
    rng = np.random.default_rng()
    eng.add_request("s", rand_prompt(rng, 5), SamplingParams(temperature=0.8, seed=3, max_tokens=25,
                                                                ignore_eos=True))
    texts = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            texts.append(o.outputs[0].text)
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    full = eng.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True)
    assert texts[-1] == full


def test_batched_final_text_equals_streamed_text(gpt2_dir, llm):
    """Requests nobody streams get their text at the finish from one batched decode (`_decode_final_texts`):
    the same text as the same request streamed (one detokenizer per sequence, fed as tokens came), with a stop
    token left out of the text, n > 1, and special tokens kept or skipped."""
    rng = np.random.default_rng()
    prompts = [rand_prompt(rng) for _ in range(4)]
    free = llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    params = [SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[free[6]]),
              SamplingParams(temperature=0.9, seed=5, n=2, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=6, max_tokens=9, ignore_eos=True, skip_special_tokens=False),
              SamplingParams(temperature=0, max_tokens=11, ignore_eos=True)]
    batched = llm.generate(prompts, params, use_tqdm=False)
    eng = LLMEngine(model=gpt2_dir, **BASE)
    streamed = {}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(str(i), p, sp, stream=True)
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                streamed[int(o.request_id)] = o
    assert batched[0].outputs[0].finish_reason == "stop"
    for i, b in enumerate(batched):
        got = [(c.token_ids, c.text) for c in b.outputs]
        assert got == [(c.token_ids, c.text) for c in streamed[i].outputs]
        assert all(text for _, text in got)


def test_abort_and_timeouts_free_memory(gpt2_dir):
    eng = LLMEngine(model=gpt2_dir, max_num_seqs=2, **BASE)
    rng = np.random.default_rng()
    sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    eng.add_request("a", rand_prompt(rng), sp)
    eng.add_request("b", rand_prompt(rng), sp, timeout_s=0.0)
    eng.add_request("c", rand_prompt(rng), sp, queue_timeout_s=0.0)
    eng.add_request("d", rand_prompt(rng), sp)
    time.sleep(0.01)
    finished = {}
    for _ in range(3):
        for o in eng.step():
            if o.finished:
                finished[o.request_id] = o.outputs[0].finish_reason
    assert finished.get("b") == "timeout" and finished.get("c") == "timeout"
    eng.abort_request("a")
    eng.abort_request("d")
    assert not eng.has_unfinished_requests()
    eng.block_manager.reset_prefix_cache()
    assert eng.block_manager.num_free_gpu_blocks == eng.runner.num_gpu_blocks
    eng.block_manager.check_invariants()


def test_bad_requests_raise_clear_errors(llm):
    eng = llm.engine
    with pytest.raises(ValueError, match="context length"):
        eng.add_request("x", [1] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("y", [], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request("z", [10 ** 6], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="block_size"):
        LLM("unused", block_size=7)
    with pytest.raises(ValueError, match="gc_gen0_threshold"):
        LLM("unused", gc_gen0_threshold=-1)
    with pytest.raises(ValueError, match="nonsense_arg"):
        LLMEngine(model="unused", nonsense_arg=1)


def _start_order(gpt2_dir, policy, reqs):
    """Run with room for one sequence at a time; return request ids in the order they finished."""
    eng = LLMEngine(model=gpt2_dir, max_num_seqs=1, scheduling_policy=policy, **BASE)
    for rid, prompt_len, max_tokens, prio, client in reqs:
        eng.add_request(rid, [3] * prompt_len, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                              ignore_eos=True), priority=prio, client_id=client)
    order = []
    while eng.has_unfinished_requests():
        order += [o.request_id for o in eng.step() if o.finished]
    return order


def test_scheduling_policies_order(gpt2_dir):
    reqs = [("r0", 5, 6, 2, "A"), ("r1", 5, 2, 0, "A"), ("r2", 5, 4, 1, "A"), ("r3", 5, 3, 0, "B")]
    assert _start_order(gpt2_dir, "fcfs", reqs) == ["r0", "r1", "r2", "r3"]
    assert _start_order(gpt2_dir, "priority", reqs) == ["r1", "r3", "r2", "r0"]
    assert _start_order(gpt2_dir, "latency", reqs) == ["r1", "r3", "r2", "r0"]
    # fair: client B gets its turn right after A's first request instead of after all of A's
    assert _start_order(gpt2_dir, "fair", reqs)[:2] == ["r0", "r3"]


def test_chat_uses_fallback_template(llm):
    out = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=2),
                   use_tqdm=False)[0]
    assert out.prompt == "user: hi\nassistant:"
    assert len(out.outputs[0].token_ids) == 2


def test_pallas_backend_interpret_matches_hf(gpt2_dir):
    """The Pallas kernels (interpret mode on the CPU) inside the full engine give HF's greedy tokens."""
    rng = np.random.default_rng()
    prompts = [rand_prompt(rng, n) for n in (3, 17, 33)]
    llm = LLM(gpt2_dir, dtype="float32", attention_backend="pallas", warmup=False, compile_cache_dir=None,
              max_num_batched_tokens=32)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        support.assert_same_greedy(gpt2_dir, p, o.outputs[0].token_ids, support.hf_greedy(gpt2_dir, p, 6))


def test_target_itl_shrinks_decode_batch(gpt2_dir):
    eng = LLMEngine(model=gpt2_dir, max_num_seqs=8, target_itl_ms=1e-6, **BASE)
    rng = np.random.default_rng()
    for i in range(8):
        eng.add_request(f"r{i}", rand_prompt(rng), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.scheduler.decode_cap < 8


@pytest.mark.parametrize("ids, want", [
    ([3, 0, 9], [3, 0, 9]), ((1, 2), [1, 2]), (np.array([4, 5], np.int32), [4, 5]),
    ([np.int64(7), 2], [7, 2]), ([True, 2], [1, 2]), (np.array([9], np.uint8), [9]),
])
def test_checked_token_ids_accepts_integers(ids, want):
    out = checked_token_ids(ids, vocab_size=10)
    assert out == want and all(type(t) is int for t in out)


@pytest.mark.parametrize("ids, match", [
    ([], "empty"), (np.array([], np.int64), "empty"), ([10], r"\[0, 10\)"), ([-1, 3], r"\[0, 10\)"),
    ([2 ** 70], "integers|\\[0, 10\\)"), ([1.5], "integers"), (["3"], "integers"), (np.array([1.0]), "integers"),
    ([[1, 2]], "integers"), (np.zeros((2, 2), np.int64), "integers"),
])
def test_checked_token_ids_rejects_bad_input(ids, match):
    with pytest.raises(ValueError, match=match):
        checked_token_ids(ids, vocab_size=10)


def test_generate_adds_requests_while_the_device_runs(gpt2_dir, monkeypatch):
    """`generate` adds a first chunk (two steps of prompt tokens), then the rest while calls run
    (`on_device_wait`): the same greedy outputs as adding everything first, in input order."""
    from yaie_jax.engine import llm as engine_mod
    rng = np.random.default_rng()
    prompts = [rand_prompt(rng) for _ in range(24)]
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    eng = LLMEngine(model=gpt2_dir, max_num_batched_tokens=32, **BASE)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, sp)
    ref = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                ref[int(o.request_id)] = o.outputs[0].token_ids
    added_while_busy = []
    real = engine_mod._RequestFeeder.add_while

    def slow_device(self, busy_done):                 # the device "runs" for three more adds each time
        left = iter(range(3))
        before = self.next
        real(self, lambda: next(left, None) is None)
        added_while_busy.append(self.next - before)
    monkeypatch.setattr(engine_mod._RequestFeeder, "add_while", slow_device)
    llm = LLM(gpt2_dir, max_num_batched_tokens=32, **BASE)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [ref[i] for i in range(len(prompts))]
    assert [o.prompt_token_ids for o in outs] == prompts
    assert sum(added_while_busy) > 0 and max(added_while_busy) == 3
    assert not llm.engine.has_unfinished_requests() and llm.engine.on_device_wait is None


@pytest.mark.parametrize("busy", [False, True])
def test_generate_with_a_bad_prompt_late_aborts_what_it_added(gpt2_dir, monkeypatch, busy):
    """A prompt that fails validation after earlier ones started (added while a call ran, or in a later chunk):
    ValueError from `generate`, every request it added is aborted and its memory freed, and the engine serves
    the next call."""
    from yaie_jax.engine import llm as engine_mod
    if busy:                                          # the device "runs" for many adds each time
        real = engine_mod._RequestFeeder.add_while
        monkeypatch.setattr(engine_mod._RequestFeeder, "add_while", lambda self, done: real(self, lambda: False))
    rng = np.random.default_rng()
    prompts = [rand_prompt(rng) for _ in range(12)]
    llm = LLM(gpt2_dir, max_num_batched_tokens=32, **BASE)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with pytest.raises(ValueError, match="empty"):
        llm.generate(prompts[:9] + [[]] + prompts[9:], sp, use_tqdm=False)
    eng = llm.engine
    assert not eng.has_unfinished_requests() and not eng.scheduler.requests and not eng.block_manager.seqs
    eng.block_manager.reset_prefix_cache()
    assert eng.block_manager.num_free_gpu_blocks == eng.runner.num_gpu_blocks
    assert len(llm.generate(prompts[:3], sp, use_tqdm=False)) == 3
