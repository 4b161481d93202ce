"""Multi-host serving (yaie_jax/executor/distributed.py).

- Two `jax.distributed` processes on localhost, 2 fake CPU devices each, TP=4 over all four (cross-process
  collectives through gloo): process 0 schedules and gives the greedy tokens of a single-process TP=1 run; process
  1 follows, making the same runner calls, and exits when process 0 does.
- The leader/follower protocol in one process: a follower runner replaying a leader's published calls ends with
  the leader's KV cache, bit for bit.
- The message codec, the configuration checks.
"""
import collections
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import support  # noqa: E402

from yaie_jax.executor import distributed  # noqa: E402
from yaie_jax.config import EngineConfig  # noqa: E402

HERE = os.path.dirname(__file__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _result(stdout: str) -> dict:
    return json.loads([l for l in stdout.splitlines() if l.startswith("RESULT")][-1][6:])


def test_two_processes_tp4_same_tokens_as_one_process(tmp_path):
    path = support.make_gpt2_dir(str(tmp_path / "gpt2"), n_head=4, n_embd=64)
    seed = str(int(np.random.default_rng().integers(1 << 30)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    script = os.path.join(HERE, "multihost_check.py")
    coord = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, script, path, "single", seed, "1"], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    procs += [subprocess.Popen([sys.executable, script, path, str(i), seed, "4", coord, "2"], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (0, 1)]
    outs = []
    try:
        deadline = time.monotonic() + 300
        for p in procs:
            outs.append(p.communicate(timeout=max(1, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    single, leader = _result(outs[0][0]), _result(outs[1][0])
    follower = [json.loads(l) for l in outs[2][0].splitlines() if l.startswith('{"event": "follower_exit"')]
    assert leader["process_count"] == 2 and leader["device_count"] == 4
    assert leader["tokens"] == single["tokens"]
    # the KV pool is split by head over all 4 devices, 2 of them on this process
    assert leader["kv_devices"] == 4 and leader["kv_num_local_shards"] == 2
    assert leader["kv_local_shard_shape"][0] == 1
    # the follower made exactly the leader's device calls (steps, fused decode, copy-on-write copies)
    assert follower and follower[0]["calls"] == leader["leader_calls"]
    assert leader["leader_calls"]["run_program"] == leader["num_steps"]
    assert leader["leader_calls"].get("copy_blocks", 0) >= 1


class QueueChannel:
    def __init__(self):
        self.q = collections.deque()

    def publish(self, data: bytes) -> None:
        self.q.append(data)

    def receive(self) -> bytes:
        return self.q.popleft()


def test_follower_replay_reproduces_leader_kv_cache(tmp_path):
    import jax
    from yaie_jax import LLM, SamplingParams

    path = support.make_gpt2_dir(str(tmp_path / "gpt2"), n_head=4, n_embd=64)
    args = dict(dtype="float32", attention_backend="xla", warmup=False, compile_cache_dir=None,
                max_num_batched_tokens=32, num_decode_steps=2, max_model_len=64, max_num_seqs=4, num_gpu_blocks=24,
                block_size=8, async_scheduling=False)
    leader = LLM(path, **args)
    chan = QueueChannel()
    lead = distributed.Leader(leader.engine.runner, chan)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41, 42]]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2),
              SamplingParams(temperature=0.9, seed=3, max_tokens=5, ignore_eos=True, top_p=0.9)]
    outs = leader.generate(prompts, params, use_tqdm=False)
    lead.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        leader.engine.runner.copy_blocks([(0, 1)])
    follower = LLM(path, **args)
    seen = []
    counts = distributed.follow(follower.engine.runner, chan, on_call=lambda n, a, k: seen.append(n))
    assert counts == dict(lead.counts) and counts["run_program"] == leader.get_stats()["num_steps"]
    assert "copy_blocks" in counts and seen[0] == "run_program"
    for (k1, v1), (k2, v2) in zip(leader.engine.runner.kv_caches, follower.engine.runner.kv_caches):
        np.testing.assert_array_equal(np.asarray(jax.device_get(k1)), np.asarray(jax.device_get(k2)))
        np.testing.assert_array_equal(np.asarray(jax.device_get(v1)), np.asarray(jax.device_get(v2)))
    assert len(outs[0].outputs) == 2


def test_follower_refuses_a_different_engine():
    class R:
        num_gpu_blocks, max_blocks_per_seq, attention_backend, block_size = 10, 4, "xla", 16
        config = EngineConfig(dtype="float32")
        mc = type("MC", (), {"num_layers": 2, "vocab_size": 100})
        kv_caches = []

        def kv_shape(self):
            return (4, self.num_gpu_blocks, 16, 8)

        def run_program(self, *a):
            pass

        copy_blocks = swap_out = swap_in = run_program

    chan = QueueChannel()
    distributed.Leader(R(), chan)
    other = R()
    other.num_gpu_blocks = 12
    with pytest.raises(RuntimeError, match="num_gpu_blocks"):
        distributed.follow(other, chan)


def test_codec_round_trip_and_refuses_device_arrays():
    import jax.numpy as jnp
    from yaie_jax.executor import sampling

    sb, flags = sampling.build_sampling_batch([], pad_to=4, eos_token_ids=[0], engine_seed=0, vocab_size=50)
    msg = ["run_program", ["multi", {"ids": np.arange(6, dtype=np.int32).reshape(2, 3),
                                     "mask": np.array([True, False]), "empty": np.zeros((0, 3), np.float32)},
                           sb, flags, 2], {"k": (1, 2.5, None, "s", np.int64(7))}]
    back = distributed.decode(distributed.encode(msg))
    assert back[0] == "run_program" and back[1][0] == "multi" and back[1][4] == 2
    np.testing.assert_array_equal(back[1][1]["ids"], msg[1][1]["ids"])
    assert back[1][1]["ids"].dtype == np.int32 and back[1][1]["mask"].dtype == np.bool_
    assert back[1][1]["empty"].shape == (0, 3)
    assert type(back[1][2]) is sampling.SamplingBatch and type(back[1][3]) is sampling.SamplingFlags
    assert back[1][3] == flags
    for a, b in zip(back[1][2], sb):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert back[2]["k"][:4] == (1, 2.5, None, "s") and back[2]["k"][4] == 7
    with pytest.raises(TypeError, match="device arrays"):
        distributed.encode(["run_program", [jnp.zeros(3)], {}])


def test_config_checks():
    with pytest.raises(ValueError, match="coordinator_address"):
        EngineConfig(num_processes=2, process_id=1)
    with pytest.raises(ValueError, match="process_id"):
        EngineConfig(coordinator_address="h:1", num_processes=2, process_id=2)
    with pytest.raises(ValueError, match="num_processes"):
        EngineConfig(num_processes=0)
    cfg = EngineConfig(coordinator_address="h:1", num_processes=2, process_id=1, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size=2.*global device count, 4"):
        distributed.check_config(cfg, process_count=2, device_count=4)
    distributed.check_config(cfg, process_count=2, device_count=2)
    cfg.num_cpu_blocks = 8
    with pytest.raises(ValueError, match="num_cpu_blocks=8"):
        distributed.check_config(cfg, process_count=2, device_count=2)
    distributed.check_config(cfg, process_count=1, device_count=1)


def test_serve_cli_flags():
    from yaie_jax.server.settings import load_settings
    s = load_settings(["--coordinator-address", "10.0.0.1:1234", "--num-processes", "2", "--process-id", "1"],
                      environ={})
    assert (s.engine.coordinator_address, s.engine.num_processes, s.engine.process_id) == ("10.0.0.1:1234", 2, 1)
    s = load_settings([], environ={"YAIE_NUM_PROCESSES": "2", "YAIE_COORDINATOR_ADDRESS": "h:1"})
    assert s.engine.num_processes == 2 and s.engine.process_id == 0


def test_codec_round_trips_a_step_batch():
    from yaie_jax.step_types import STEP_BATCH_FIELDS, StepBatch

    batch = StepBatch(input_ids=np.arange(4, dtype=np.int32), positions=np.zeros(4, np.int32),
                      block_tables=np.ones((2, 3), np.int32), slots=np.full((2, 2), -1, np.int32),
                      cascade={"item_rows": np.zeros((2, 2), np.int32)}, num_chunks=np.int32(3))
    back = distributed.decode(distributed.encode(["run_program", ["multi", batch], {}]))[1][1]
    assert type(back) is StepBatch
    for name in STEP_BATCH_FIELDS:
        a, b = getattr(batch, name), getattr(back, name)
        if a is None or isinstance(a, dict):
            assert (a is None and b is None) or list(a) == list(b)
        else:
            np.testing.assert_array_equal(a, b)
            assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(back.cascade["item_rows"], batch.cascade["item_rows"])
