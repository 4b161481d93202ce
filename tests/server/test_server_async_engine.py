"""AsyncEngine without HTTP: one engine thread, admission errors, abort on abandon, drain bound, dead loop."""
from __future__ import annotations

import asyncio

import pytest
from fake_engine import FakeEngine

from yaie_jax.engine.async_engine import AsyncEngine, EngineDeadError, EngineUnavailableError
from yaie_jax.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=5)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


@pytest.mark.parametrize("split", [True, False], ids=["make_request", "add_request"])
def test_generate_cumulative_outputs_and_errors(split):
    async def main():
        eng = FakeEngine(split_admission=split)
        ae = AsyncEngine(eng)
        ae.start()
        outs = [o async for o in ae.generate("hello", GREEDY, "r1")]
        assert outs[-1].finished and outs[-1].outputs[0].text == "hello"
        texts = [o.outputs[0].text for o in outs]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))       # cumulative
        with pytest.raises(ValueError, match="context length"):
            await ae.add_request("r2", "x" * 600, GREEDY)
        with pytest.raises(ValueError, match="empty"):
            await ae.add_request("r3", [], GREEDY)
        # non-streamed: only the final output comes back
        rs = await ae.add_request("r4", "abc", GREEDY, stream=False)
        got = [o async for o in rs]
        assert len(got) == 1 and got[0].finished and got[0].outputs[0].text == "abcab"
        assert ae.num_active_requests() == 0
        await ae.shutdown(1.0)
        assert not ae.is_running
    run(main())


def test_abandoned_iteration_aborts_and_frees():
    async def main():
        eng = FakeEngine(step_delay_s=0.005)
        ae = AsyncEngine(eng)
        ae.start()
        agen = ae.generate("forever", SamplingParams(temperature=0.0, max_tokens=400), "long")
        async for out in agen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await agen.aclose()
        for _ in range(200):
            if ae.num_active_requests() == 0 and ae.stats().get("num_running") == 0:
                break
            await asyncio.sleep(0.01)
        assert ae.num_active_requests() == 0 and ae.stats()["kv_blocks_free"] == ae.stats()["kv_blocks_total"]
        assert eng.num_aborted == 1

        # a consumer task cancelled while waiting also aborts
        async def consume():
            async for _ in ae.generate("cancel me", SamplingParams(temperature=0.0, max_tokens=400), "c1"):
                pass
        t = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        for _ in range(200):
            if ae.num_active_requests() == 0:
                break
            await asyncio.sleep(0.01)
        assert eng.num_aborted == 2
        await ae.shutdown(1.0)
    run(main())


def test_shutdown_drains_within_bound_then_aborts():
    async def main():
        eng = FakeEngine(step_delay_s=0.005)
        ae = AsyncEngine(eng)
        ae.start()
        short = await ae.add_request("short", "ab", SamplingParams(temperature=0.0, max_tokens=10))
        long = await ae.add_request("long", "cd", SamplingParams(temperature=0.0, max_tokens=400))
        eng.step_delay_s = 0.02                     # the long one cannot finish within the drain bound
        t0 = asyncio.get_running_loop().time()
        shutdown = asyncio.ensure_future(ae.shutdown(0.5))
        await asyncio.sleep(0.01)
        with pytest.raises(EngineUnavailableError):
            await ae.add_request("late", "x", GREEDY)
        short_out = [o async for o in short][-1]
        long_out = [o async for o in long][-1]
        await shutdown
        assert asyncio.get_running_loop().time() - t0 < 3
        assert short_out.outputs[0].finish_reason == "length"
        assert long_out.finished and long_out.outputs[0].finish_reason == "abort"
        assert 0 < len(long_out.outputs[0].token_ids) < 400
        assert ae.health()["status"] == "stopped"
    run(main())


def test_dead_loop_fails_streams_and_health():
    async def main():
        eng = FakeEngine(step_delay_s=0.005)
        ae = AsyncEngine(eng)
        ae.start()
        rs = await ae.add_request("a", "abc", SamplingParams(temperature=0.0, max_tokens=200))
        eng.fail_next_step = True
        with pytest.raises(EngineDeadError):
            async for _ in rs:
                pass
        h = ae.health()
        assert h["status"] == "dead" and h["engine_loop_alive"] is False and "injected" in h["error"]
        with pytest.raises(EngineDeadError):
            await ae.add_request("b", "abc", GREEDY)
    run(main())


def test_queue_cap():
    async def main():
        eng = FakeEngine()
        eng.paused = True
        ae = AsyncEngine(eng, max_waiting_requests=1)
        ae.start()
        first = await ae.add_request("a", "abc", GREEDY)
        with pytest.raises(EngineUnavailableError) as e:
            await ae.add_request("b", "abc", GREEDY)      # counted while still in the inbox
        assert e.value.reason == "queue_full"
        first.abort()
        eng.paused = False
        await ae.shutdown(1.0)
    run(main())


def test_engine_calls_stay_on_one_thread():
    """FakeEngine asserts one owner thread for add/step/abort/stats; many loops' requests must not break it."""
    eng = FakeEngine()
    ae = AsyncEngine(eng)
    ae.start()

    async def client(i):
        return [o async for o in ae.generate(f"p{i}", GREEDY, f"t{i}")][-1].outputs[0].text

    async def many():
        return await asyncio.gather(*(client(i) for i in range(8)))

    for _ in range(3):                               # three separate event loops, one engine thread
        texts = run(many())
        assert texts == [f"p{i}p{i}p" for i in range(8)]
    assert ae.is_running
    ae.stop()


def test_queue_cap_counts_requests_handed_over_since_the_last_stats_snapshot():
    """A request handed to the engine thread counts as waiting before any stats snapshot shows it, so a third
    request is refused at a cap of 2 however stale the snapshot is (a snapshot interval of an hour here)."""
    async def main():
        eng = FakeEngine()
        eng.paused = True                                 # nothing gets scheduled: requests stay waiting
        ae = AsyncEngine(eng, max_waiting_requests=2, stats_interval_s=3600.0)
        ae.start()
        await ae.add_request("a", "hello", GREEDY)
        await ae.add_request("b", "hello", GREEDY)
        for _ in range(200):                              # until the engine thread has taken both
            if len(eng.added_ids) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(eng.added_ids) == 2 and ae.num_waiting_requests() >= 2
        with pytest.raises(EngineUnavailableError, match="overloaded"):
            await ae.add_request("c", "hello", GREEDY)
        eng.paused = False
        await ae.shutdown(1.0)
    run(main())
