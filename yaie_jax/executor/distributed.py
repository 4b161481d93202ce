"""Multi-host serving through `jax.distributed`: process 0 schedules, every other process follows its steps.

JAX is multi-controller: with several processes, every process must launch the same device programs, in the same
order, with the same host inputs; a program whose mesh spans all processes' devices then runs as one (XLA inserts
the cross-process collectives: NCCL on GPUs, gloo on CPUs). Here only process 0 (the leader) runs the scheduler,
the HTTP server and the detokenizer. The engine reaches the device only through a few `ModelRunner` methods
(`METHODS` = launch.DEVICE_CALLS), each of which hands its device work to `runner.launcher` (launch.py); on the
leader the launcher is a `Leader`, which publishes the call's name and (host numpy) arguments to the followers
before it runs. A follower builds the same engine from the same configuration (same model, mesh, KV pool and
compiled buckets), then runs `follow(runner)`: it receives the leader's calls in order and makes the same calls on
its own runner (whose launcher runs them locally), until the leader's shutdown message (sent at the leader's exit).

    initialize(coordinator_address, num_processes, process_id)   jax.distributed.initialize, before any device use
    initialize_for(config)   called at the start of LLMEngine.__init__: `initialize` from the engine arguments and
                             `check_config` (TP over every process's devices, no host swap pool)
    setup(engine)            called at the end of LLMEngine.__init__: nothing for one process; on the leader makes
                             a `Leader` the runner's launcher; on a follower runs `follow` and exits the process
                             when it ends
    follow(runner, channel)  the follower loop; returns how many calls of each kind it made
    agree_min(name, value)   the smallest of every process's value (the KV pool size, so every process allocates
                             the same pool)

Channel: the key-value store of the jax distributed runtime (the coordinator service lives in process 0), one key
per message and follower (`yaie/mh/<follower>/<seq>`), deleted by the follower once read, so the store stays
small. Messages are encoded by `encode`/`decode` (JSON for the structure, raw bytes for numpy arrays; no pickle, so
a message can only ever be data). Device arrays cannot be published: the engine's pipelined decode (whose inputs
stay on the device) is off when `jax.process_count() > 1`, and the host swap pool is refused (see `check_config`).

Warm-up only compiles (`ModelRunner.compiled`), which is local to a process: every process compiles its own
programs at start-up (GPU) or on first use (CPU) and nothing needs to be mirrored.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import json
import logging
import struct
import sys
import threading
from typing import Any, Callable, Dict, List, Optional

import numpy as np

logger = logging.getLogger("yaie_jax.executor.distributed")

from yaie_jax.executor.launch import DEVICE_CALLS

# The ModelRunner methods through which the engine reaches the device (each runs device programs that every
# process must run too): see launch.py.
METHODS = DEVICE_CALLS

_PREFIX = "yaie/mh"
_POLL_MS = 60_000            # a follower waits this long per receive attempt, then tries again (idle servers)


# ---------------------------------------------------------------------------------------------------- set-up
def initialize(coordinator_address: Optional[str], num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize` (once per process; a second call with the same arguments does nothing).
    Must run before anything touches a JAX device. On CPUs, cross-process collectives use gloo."""
    import jax
    from jax._src import distributed as jdist

    if num_processes <= 1:
        return
    state = jdist.global_state
    if state.client is not None:
        if (state.num_processes, state.process_id) != (num_processes, process_id):
            raise RuntimeError(f"jax.distributed is already initialized as process {state.process_id} of "
                               f"{state.num_processes}, not {process_id} of {num_processes}")
        return
    try:
        if not jax.config.jax_cpu_collectives_implementation:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError) as e:  # pragma: no cover - depends on the jax build
        logger.warning("cannot select gloo CPU collectives: %s", e)
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except RuntimeError as e:
        raise RuntimeError(f"jax.distributed.initialize({coordinator_address!r}, num_processes={num_processes}, "
                           f"process_id={process_id}) failed: {e}. It must run before anything uses a JAX device "
                           f"in this process.") from e
    logger.info("jax.distributed: process %d of %d, %d local / %d global devices", process_id, num_processes,
                jax.local_device_count(), jax.device_count())


def initialize_for(config) -> None:
    """Called at the start of `LLMEngine.__init__`: `initialize` from the engine arguments, then `check_config`."""
    if config.num_processes > 1:
        initialize(config.coordinator_address, config.num_processes, config.process_id)
        check_config(config)


def check_config(config, process_count: Optional[int] = None, device_count: Optional[int] = None) -> None:
    """What multi-host serving needs, checked after `initialize` (ValueError naming the argument). The counts
    default to JAX's."""
    import jax

    process_count = jax.process_count() if process_count is None else process_count
    if process_count <= 1:
        return
    device_count = jax.device_count() if device_count is None else device_count
    if config.tensor_parallel_size != device_count:
        raise ValueError(
            f"invalid engine argument tensor_parallel_size={config.tensor_parallel_size}: with "
            f"{process_count} processes the tensor-parallel mesh must span every process's devices; set it to "
            f"the global device count, {device_count}")
    if config.num_cpu_blocks:
        raise ValueError(
            f"invalid engine argument num_cpu_blocks={config.num_cpu_blocks}: the host swap pool is "
            f"single-process only (with several processes each host holds only its shard of the KV pool); use "
            f"num_cpu_blocks=0 (preempted sequences are then recomputed)")


def _client():
    from jax._src import distributed as jdist
    client = jdist.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


_agree_calls = collections.Counter()


def agree_min(name: str, value: int) -> int:
    """The smallest `value` over all processes (each process calls this once per `name`, in the same order)."""
    import jax

    if jax.process_count() == 1:
        return value
    _agree_calls[name] += 1
    key = f"yaie/agree/{name}/{_agree_calls[name]}"
    client = _client()
    client.key_value_set(f"{key}/{jax.process_index()}", str(int(value)))
    values = [int(client.blocking_key_value_get(f"{key}/{p}", 600_000)) for p in range(jax.process_count())]
    return min(values)


# ---------------------------------------------------------------------------------------------------- messages
def _named_tuples() -> Dict[str, type]:
    from yaie_jax.executor import sampling
    return {f"{c.__module__}.{c.__qualname__}": c
            for c in (sampling.SamplingBatch, sampling.SamplingFlags, sampling.SampleResult)}


def _dataclasses() -> Dict[str, type]:
    from yaie_jax.step_types import StepBatch
    return {f"{c.__module__}.{c.__qualname__}": c for c in (StepBatch,)}


def encode(obj: Any) -> bytes:
    """Bytes for a tree of None/bool/int/float/str, lists, tuples, str-keyed dicts, numpy arrays and scalars, the
    sampling NamedTuples and StepBatch. Anything else (e.g. a device array) raises TypeError."""
    arrays: List[np.ndarray] = []
    known = _named_tuples()
    known_dc = _dataclasses()

    def enc(x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, np.ndarray):
            arrays.append(np.ascontiguousarray(x))
            return {"nd": len(arrays) - 1}
        if isinstance(x, np.generic):
            arrays.append(np.asarray(x))
            return {"sc": len(arrays) - 1}
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            name = f"{type(x).__module__}.{type(x).__qualname__}"
            if name not in known:
                raise TypeError(f"cannot publish a {name}")
            return {"nt": name, "v": [enc(v) for v in x]}
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            name = f"{type(x).__module__}.{type(x).__qualname__}"
            if name not in known_dc:
                raise TypeError(f"cannot publish a {name}")
            return {"dc": name, "v": [[f.name, enc(getattr(x, f.name))] for f in dataclasses.fields(x)]}
        if isinstance(x, tuple):
            return {"t": [enc(v) for v in x]}
        if isinstance(x, list):
            return {"l": [enc(v) for v in x]}
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise TypeError("cannot publish a dict with non-string keys")
            return {"d": [[k, enc(v)] for k, v in x.items()]}
        raise TypeError(f"cannot publish a {type(x).__name__} to the follower processes (only host data: numpy "
                        f"arrays and plain Python values; device arrays cannot be mirrored)")

    tree = enc(obj)
    meta, offset = [], 0
    for a in arrays:
        meta.append([a.dtype.str, list(a.shape), offset])
        offset += a.nbytes
    header = json.dumps({"tree": tree, "arrays": meta}, separators=(",", ":")).encode()
    return b"".join([struct.pack("<Q", len(header)), header] + [a.tobytes() for a in arrays])


def decode(data: bytes) -> Any:
    (n,) = struct.unpack_from("<Q", data, 0)
    head = json.loads(data[8:8 + n])
    body = memoryview(data)[8 + n:]
    known = _named_tuples()
    known_dc = _dataclasses()
    arrays = []
    for dtype, shape, offset in head["arrays"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape)) if shape else 1
        arrays.append(np.frombuffer(body, dt, count, offset).reshape(shape).copy())

    def dec(x):
        if not isinstance(x, dict):
            return x
        if "nd" in x:
            return arrays[x["nd"]]
        if "sc" in x:
            return arrays[x["sc"]][()]
        if "nt" in x:
            cls = known.get(x["nt"])
            if cls is None:
                raise ValueError(f"unknown message type {x['nt']!r}")
            return cls(*[dec(v) for v in x["v"]])
        if "dc" in x:
            cls = known_dc.get(x["dc"])
            if cls is None:
                raise ValueError(f"unknown message type {x['dc']!r}")
            return cls(**{k: dec(v) for k, v in x["v"]})
        if "t" in x:
            return tuple(dec(v) for v in x["t"])
        if "l" in x:
            return [dec(v) for v in x["l"]]
        if "d" in x:
            return {k: dec(v) for k, v in x["d"]}
        raise ValueError(f"malformed message node {x!r}")

    return dec(head["tree"])


# ---------------------------------------------------------------------------------------------------- channel
class KVChannel:
    """Leader -> followers messages through the jax distributed key-value store, in order."""

    def __init__(self, client=None, process_id: Optional[int] = None, num_processes: Optional[int] = None,
                 prefix: str = _PREFIX):
        import jax
        self.client = client if client is not None else _client()
        self.process_id = jax.process_index() if process_id is None else process_id
        self.num_processes = jax.process_count() if num_processes is None else num_processes
        self.prefix = prefix
        self.seq = 0

    def publish(self, data: bytes) -> None:
        for p in range(1, self.num_processes):
            self.client.key_value_set_bytes(f"{self.prefix}/{p}/{self.seq}", data)
        self.seq += 1

    def receive(self) -> bytes:
        key = f"{self.prefix}/{self.process_id}/{self.seq}"
        while True:
            try:
                data = self.client.blocking_key_value_get_bytes(key, _POLL_MS)
                break
            except Exception as e:  # the store's timeout; anything else (leader gone) is fatal
                if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                    raise
        try:
            self.client.key_value_delete(key)
        except Exception as e:  # pragma: no cover - the store keeps it; harmless but grows
            logger.warning("could not delete %s: %s", key, e)
        self.seq += 1
        return data


def _fingerprint(runner) -> dict:
    """What leader and followers must agree on for their programs to match."""
    return {"num_gpu_blocks": int(runner.num_gpu_blocks), "kv_shape": list(runner.kv_shape()),
            "max_blocks_per_seq": int(runner.max_blocks_per_seq), "dtype": str(runner.config.dtype),
            "tensor_parallel_size": int(runner.config.tensor_parallel_size),
            "tp_head_layout": str(runner.config.tp_head_layout),
            "attention_backend": str(runner.attention_backend), "block_size": int(runner.block_size),
            "num_layers": int(runner.mc.num_layers), "vocab_size": int(runner.mc.vocab_size)}


# ---------------------------------------------------------------------------------------------------- leader
class Leader:
    """The leader's launcher (launch.py): each device call of the runner is first published to the followers,
    then run here. Installed as `runner.launcher` (after the hello message that the followers check)."""

    def __init__(self, runner, channel):
        self.runner = runner
        self.channel = channel
        self.counts: Dict[str, int] = collections.Counter()
        self.closed = False
        self._lock = threading.Lock()
        self._send("hello", (_fingerprint(runner),), {})
        runner.launcher = self

    def _send(self, name: str, args: tuple, kwargs: dict) -> None:
        data = encode([name, list(args), kwargs])
        with self._lock:
            if self.closed:
                raise RuntimeError("the follower processes were shut down; this engine cannot run more steps")
            self.channel.publish(data)

    def launch(self, name: str, fn: Callable, *args):
        """Publish `name(*args)` to the followers, then run `fn(*args)` here."""
        if name not in METHODS:
            raise ValueError(f"{name!r} is not a device call the followers know (launch.DEVICE_CALLS)")
        self._send(name, args, {})
        self.counts[name] += 1
        return fn(*args)

    def shutdown(self) -> None:
        """Tell the followers to stop (idempotent). Called at exit."""
        with self._lock:
            if self.closed:
                return
            self.channel.publish(encode(["shutdown", [], {}]))
            self.closed = True


def follow(runner, channel=None, on_call: Optional[Callable[[str, tuple, dict], None]] = None) -> Dict[str, int]:
    """The follower loop: make the leader's runner calls on `runner` (by method name, through its own local
    launcher), in order, until its shutdown message. Returns how many calls of each kind were made."""
    channel = channel if channel is not None else KVChannel()
    counts: Dict[str, int] = collections.Counter()
    mine = _fingerprint(runner)
    while True:
        name, args, kwargs = decode(channel.receive())
        if name == "shutdown":
            break
        if name == "hello":
            theirs = args[0]
            diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
            if diff:
                raise RuntimeError(f"this follower's engine differs from the leader's (leader, follower): {diff}; "
                                   f"start every process with the same model and engine arguments")
            continue
        if name not in METHODS:
            raise RuntimeError(f"unknown call {name!r} from the leader")
        if on_call is not None:
            on_call(name, tuple(args), kwargs)
        getattr(runner, name)(*args, **kwargs)
        counts[name] += 1
    import jax
    jax.block_until_ready(runner.kv_caches)
    return dict(counts)


# ---------------------------------------------------------------------------------------------------- engine hook
_leader: Optional[Leader] = None


def setup(engine) -> None:
    """Called at the end of `LLMEngine.__init__`. One process: nothing. Leader: publish the runner's calls from
    now on (and the shutdown message at exit). Follower: follow the leader, then end the process (exit 0): on
    processes 1..N-1 an engine constructor never returns."""
    global _leader
    import jax

    if jax.process_count() == 1:
        return
    if jax.process_index() == 0:
        if _leader is not None:
            raise RuntimeError("multi-host: one engine per process lifetime (the followers follow the first one)")
        _leader = Leader(engine.runner, KVChannel())
        atexit.register(_leader.shutdown)
        logger.info("multi-host leader: %d followers", jax.process_count() - 1)
        return
    print(json.dumps({"event": "following", "process_id": jax.process_index(),
                      "num_processes": jax.process_count()}), flush=True)
    counts = follow(engine.runner)
    print(json.dumps({"event": "follower_exit", "process_id": jax.process_index(), "calls": counts}), flush=True)
    sys.stdout.flush()
    raise SystemExit(0)


def shutdown_followers() -> None:
    """Tell the followers to stop now (the leader does it at exit anyway); the engine cannot step after this."""
    if _leader is not None:
        _leader.shutdown()


__all__ = ["initialize", "initialize_for", "check_config", "agree_min", "setup", "follow", "Leader", "KVChannel",
           "encode", "decode", "shutdown_followers", "METHODS"]
