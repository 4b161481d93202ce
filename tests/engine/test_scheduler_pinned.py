"""Scheduling while a step is in flight (pipelined prefill): a sequence whose sampled token is still on the
device ("pinned") is neither scheduled nor preempted; the next least important sequence is preempted instead."""
import pytest

from yaie_jax import SamplingParams
from yaie_jax.config import EngineConfig
from yaie_jax.scheduler import Scheduler
from yaie_jax.sequence import Request, SeqStatus


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_pinned_sequence_is_not_the_preemption_victim(mode):
    config = EngineConfig(block_size=8, max_num_batched_tokens=64, max_num_seqs=8, num_decode_steps=1, preemption_mode=mode,
                          enable_prefix_caching=False, num_cpu_blocks=16 if mode == "swap" else 0)
    sched = Scheduler(config, max_model_len=64, num_gpu_blocks=6)     # its BlockManager: 6 device blocks of 8
    reqs = [Request(f"r{i}", None, list(range(1 + 20 * i, 17 + 20 * i)), SamplingParams(max_tokens=4),
                    arrival_time=float(i), max_tokens=4) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    first = sched.schedule()                              # 3 prompts of 2 blocks each: the pool is full
    assert [s.seq.request.request_id for s in first.scheduled] == ["r0", "r1", "r2"]
    sched.commit_step(first)
    a, b, c = (r.seqs[0] for r in reqs)
    a.token_ids.append(7)                                  # r0's and r1's first tokens are read back...
    b.token_ids.append(7)
    out = sched.schedule(pinned=frozenset({c.seq_id}))     # ...r2's is still on the device
    # r0 needs a new block: r2 is the least important but pinned, so r1 goes
    assert c.status is SeqStatus.RUNNING and c in sched.running
    assert b.status is (SeqStatus.SWAPPED if mode == "swap" else SeqStatus.WAITING)
    assert [s.seq for s in out.scheduled] == [a] and sched.num_preemptions == 1
    # without pinning, the least important (r2) would have gone
    unpinned = Scheduler(config, max_model_len=64, num_gpu_blocks=6)
    reqs2 = [Request(f"s{i}", None, list(range(1 + 20 * i, 17 + 20 * i)), SamplingParams(max_tokens=4),
                     arrival_time=float(i), max_tokens=4) for i in range(3)]
    for r in reqs2:
        unpinned.add_request(r)
    unpinned.commit_step(unpinned.schedule())
    reqs2[0].seqs[0].token_ids.append(7)
    reqs2[1].seqs[0].token_ids.append(7)
    unpinned.schedule()
    assert reqs2[2].seqs[0].status is not SeqStatus.RUNNING and reqs2[1].seqs[0].status is SeqStatus.RUNNING
