"""The collector-pause meter counts every collection, and the start-up freeze keeps live objects out of later
collections while a later freeze reclaims what died in between (no leak across engines in one process)."""
import gc
import subprocess
import sys
import weakref

import numpy as np

from yaie_jax import LLM, SamplingParams
from yaie_jax.engine.gc_pause import PAUSES, GcPauseMeter, freeze_live_objects, install_pause_meter, raise_gen0_threshold


class Node:
    def __init__(self):
        self.other = self


def test_meter_counts_a_full_collection():
    install_pause_meter()
    before = PAUSES.snapshot()
    gc.collect()
    gc.collect(0)
    d = GcPauseMeter.delta(PAUSES.snapshot(), before)
    assert d["collections"][2] >= 1 and d["collections"][0] >= 1
    assert d["pause_s"][2] > 0 and abs(d["total_pause_s"] - sum(d["pause_s"].values())) < 1e-9
    assert 0 < PAUSES.max_pause_s[2] <= PAUSES.pause_s[2]


def test_nothing_installed_on_import_and_installing_is_idempotent():
    code = ("import gc, yaie_jax, yaie_jax.engine.gc_pause as g, yaie_jax.engine.core; n = len(gc.callbacks); "
            "assert g.PAUSES not in gc.callbacks; assert g.install_pause_meter() is g.PAUSES; "
            "g.install_pause_meter(); assert gc.callbacks.count(g.PAUSES) == 1 and len(gc.callbacks) == n + 1; "
            "print('OK')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_engine_installs_the_meter_once(gpt2_dir):
    while PAUSES in gc.callbacks:              # (an earlier test or engine of this process installed it)
        gc.callbacks.remove(PAUSES)
    LLM(gpt2_dir, dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None, max_num_seqs=4,
        max_num_batched_tokens=64)
    assert gc.callbacks.count(PAUSES) == 1
    LLM(gpt2_dir, dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None, max_num_seqs=4,
        max_num_batched_tokens=64)
    assert gc.callbacks.count(PAUSES) == 1
    gc.unfreeze()


def test_freeze_skips_live_objects_and_the_next_freeze_reclaims_the_dead():
    try:
        node = Node()                      # a reference cycle: only the collector can free it
        dead = weakref.ref(node)
        n = freeze_live_objects()
        assert n > 0 and gc.get_freeze_count() == n
        del node
        gc.collect()
        assert dead() is not None          # frozen: collections do not walk it
        freeze_live_objects()
        assert dead() is None              # unfrozen, collected, then the rest frozen again
    finally:
        gc.unfreeze()


def test_engine_freezes_at_start_up_and_reports_pauses(gpt2_dir):
    base = dict(dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None, max_num_seqs=4,
                max_num_batched_tokens=64)
    try:
        gc.unfreeze()
        LLM(gpt2_dir, gc_freeze=False, **base)
        assert gc.get_freeze_count() == 0
        llm = LLM(gpt2_dir, **base)
        assert gc.get_freeze_count() > 0
        prompt = np.random.default_rng().integers(1, 384, size=9).tolist()
        before = llm.get_stats()["gc"]
        gc.collect()
        llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), use_tqdm=False)
        d = GcPauseMeter.delta(llm.get_stats()["gc"], before)
        assert d["collections"][2] >= 1
    finally:
        gc.unfreeze()


def test_idle_work_freezes_again_after_new_compiles_only(gpt2_dir, monkeypatch):
    import yaie_jax.engine.gc_pause as gc_pause
    calls = []
    real = gc_pause.freeze_live_objects
    monkeypatch.setattr(gc_pause, "freeze_live_objects", lambda: calls.append(1) or real())
    try:
        llm = LLM(gpt2_dir, dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None,
                  max_num_seqs=4, max_num_batched_tokens=64)
        assert len(calls) == 1 and not llm.engine.runner.compiling
        llm.engine.idle_work()
        assert len(calls) == 1                          # nothing compiled since start-up
        prompt = np.random.default_rng().integers(1, 384, size=9).tolist()
        llm.generate([prompt], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)   # compiles lazily
        llm.engine.idle_work()
        assert len(calls) == 2
        llm.engine.idle_work()
        llm.engine.wait_for_warmup()
        assert len(calls) == 2
    finally:
        gc.unfreeze()


def test_gen0_threshold_is_raised_never_lowered(gpt2_dir):
    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, saved[1], saved[2])
        assert raise_gen0_threshold(0) == 700 and gc.get_threshold()[0] == 700
        assert raise_gen0_threshold(5000) == 5000 and gc.get_threshold() == (5000, saved[1], saved[2])
        assert raise_gen0_threshold(1000) == 5000 and gc.get_threshold()[0] == 5000
        gc.set_threshold(700, saved[1], saved[2])
        LLM(gpt2_dir, dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None,
            max_num_seqs=4, max_num_batched_tokens=64, gc_gen0_threshold=12_345)
        assert gc.get_threshold()[0] == 12_345
    finally:
        gc.set_threshold(*saved)
        gc.unfreeze()


def test_finished_requests_are_freed_without_the_collector(gpt2_dir):
    """A finished request and its sequences (token lists included) are freed by reference counts once the
    engine is done with them: no cycle left for the collector (they piled up between young collections)."""
    from yaie_jax.engine.core import LLMEngine
    eng = LLMEngine(model=gpt2_dir, dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None,
                    max_num_seqs=4, max_num_batched_tokens=64)
    rng = np.random.default_rng()
    req = eng.make_request("r", rng.integers(1, 384, size=9).tolist(),
                           SamplingParams(max_tokens=4, temperature=0.0, n=2, ignore_eos=True), stream=False)
    eng.add_prepared(req)
    gc.disable()
    try:
        outs = eng.step()                            # the prompt step forks the second sequence
        refs = [weakref.ref(req)] + [weakref.ref(s) for s in req.seqs]
        assert len(refs) == 3
        del req
        while eng.has_unfinished_requests():
            outs += eng.step()
        assert [len(c.token_ids) for c in outs[-1].outputs] == [4, 4]
        assert [r() for r in refs] == [None, None, None]
    finally:
        gc.enable()
        gc.unfreeze()
