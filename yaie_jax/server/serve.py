"""`python -m yaie_jax.serve [MODEL] [flags]`: the OpenAI-compatible HTTP server.

Start-up: build the effective configuration (defaults < `--config` YAML < environment < flags; see
`yaie_jax.server.settings`), print it as JSON (API keys redacted) with any warnings, construct the engine
(`yaie_jax.engine.core.LLMEngine(config)`, imported only now so `--help`/`--print-config` stay fast), wrap it in an
`AsyncEngine`, and run uvicorn.

Shutdown (SIGTERM or Ctrl-C): new requests are refused at once (503 + Retry-After; /ready and /health turn 503
"draining", the listener stays open so probes see it), in-flight requests get `shutdown_timeout_s` to finish; at
that deadline every stream still open gets finish_reason "abort", an OpenAI-shaped error event (code
"drain_timeout") and `data: [DONE]`, every non-streamed request a 503; then the engine thread stops and the
process exits 0. A second signal ends the drain early (uvicorn's own shutdown); a further Ctrl-C forces the exit.

Exit codes: 0 after a clean shutdown, 2 for a configuration error (the message names the file key, variable
or flag at fault), 1 if the engine cannot be built.
"""
from __future__ import annotations

import importlib
import json
import logging
import signal
import sys
import threading
import time
from typing import Optional, Sequence

from .settings import ConfigError, Settings, parse_args

logger = logging.getLogger("yaie_jax.serve")


def build_engine(settings: Settings, factory: Optional[str] = None):
    """The engine to serve: `LLMEngine(settings.engine)`, or `factory` ("module:callable", called with the
    EngineConfig) for development and tests."""
    if factory:
        mod_name, _, fn_name = factory.partition(":")
        fn = getattr(importlib.import_module(mod_name), fn_name or "make_engine")
        return fn(settings.engine)
    from yaie_jax.engine.core import LLMEngine
    return LLMEngine(settings.engine)


def _log_engine_built(engine, seconds: float) -> None:
    """One line on what building the engine cost: its step programs compiled before serving (trace+lower holds
    the GIL; compile is short when JAX's persistent cache has the program)."""
    from .logging import fmt_age
    runner = getattr(engine, "runner", None)
    log = list(getattr(runner, "compile_log", None) or [])
    logger.info("start-up: engine built in %.2f s, %s; %d step programs compiled so far: trace+lower %.2f s, "
                "compile %.2f s (summed over threads)", seconds, fmt_age(), len(log),
                sum(e[4] for e in log), sum(e[5] for e in log))


def start_backend_init(settings: Settings, factory: Optional[str] = None) -> Optional[threading.Thread]:
    """Single-process serving of the built-in engine: initialize JAX's backend (on a GPU: CUDA context, device
    memory pool; C++ that releases the GIL) in a thread, so it overlaps the main thread's imports and model
    loading instead of waiting for the engine's first device call. Not with several processes
    (`jax.distributed.initialize` must come first) nor with an engine factory."""
    if factory or settings.engine.num_processes > 1:
        return None

    def init() -> None:
        t0 = time.monotonic()
        try:
            import jax
            devices = jax.devices()
        except Exception as e:  # the engine build reports it
            logger.info("start-up: background JAX backend init failed (%s: %s)", type(e).__name__, e)
            return
        logger.info("start-up: JAX backend initialized in the background in %.2f s: %d x %s", time.monotonic() - t0,
                    len(devices), devices[0].device_kind)

    thread = threading.Thread(target=init, name="yaie-backend-init", daemon=True)
    thread.start()
    return thread


DRAIN_TIMEOUT_CODE = "drain_timeout"     # the code of the error that ends what is left at the drain deadline
EXPIRED_FLUSH_S = 5.0                    # after the deadline, at most this long for the answers to go out


def _make_server_class():
    import uvicorn

    from yaie_jax.engine.async_engine import EngineUnavailableError

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, draining on the first SIGTERM/SIGINT: the engine refuses new requests at once (503,
        /ready 503) while the listener stays open; in-flight requests get `drain_timeout_s` to finish; at the
        deadline the rest are ended (a stream: finish_reason "abort" chunks, an error event, `[DONE]`; a
        non-streamed request: 503), then uvicorn shuts down. A second signal skips the rest of the drain (a
        further SIGINT forces the exit). The process exits 0 instead of re-raising the signal."""

        async_engine = None
        drain_timeout_s = 30.0
        _deadline = None             # monotonic drain deadline, once draining
        _expired_at = None           # when what was left was ended

        def handle_exit(self, sig, frame) -> None:
            if self._deadline is None and self.async_engine is not None:
                self.async_engine.begin_drain()
                self._deadline = time.monotonic() + self.drain_timeout_s
                logger.info("draining: %d requests in flight, %.1f s to finish",
                            self.async_engine.num_active_requests(), self.drain_timeout_s)
                return
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            else:
                self.should_exit = True

        async def on_tick(self, counter: int) -> bool:
            if self._deadline is not None and not self.should_exit:
                self._drain_tick(time.monotonic())
            return await super().on_tick(counter)

        def _drain_tick(self, now: float) -> None:
            eng = self.async_engine
            if eng.num_active_requests() == 0 or not eng.is_running:
                self.should_exit = True
            elif self._expired_at is None and now >= self._deadline:
                logger.info("drain deadline: ending %d requests still in flight", eng.num_active_requests())
                eng.expire_requests(EngineUnavailableError(
                    f"the server shut down before this request finished (drain deadline of "
                    f"{self.drain_timeout_s:g} s)", reason=DRAIN_TIMEOUT_CODE))
                self._expired_at = now
            elif self._expired_at is not None and now - self._expired_at > EXPIRED_FLUSH_S:
                self.should_exit = True

    return DrainingServer


def main(argv: Optional[Sequence[str]] = None, *, prog: str = "python -m yaie_jax.serve") -> int:
    from .settings import build_parser
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings, ns = parse_args(argv, parser=build_parser(prog))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("yaie_jax effective configuration:\n" + settings.to_json(), flush=True)
    for w in settings.warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    if getattr(ns, "print_config", False):
        return 0

    srv = settings.server
    logging.basicConfig(level=getattr(logging, srv.log_level.upper(), logging.INFO) if srv.log_level != "trace"
                        else logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s")
    start_backend_init(settings, getattr(ns, "engine_factory", None))
    # the web stack is imported before the engine is built: afterwards the engine's background compiles (tracing
    # holds the GIL) would slow these imports down several times, between warm-up and serving
    import uvicorn

    from yaie_jax.engine.async_engine import AsyncEngine
    from .app import create_app
    from .logging import StackSampler, fmt_age
    logger.info("start-up: building the engine, %s (Python start-up, imports, configuration)", fmt_age())
    t0 = time.monotonic()
    sampler = StackSampler().start() if srv.startup_profile else None     # --startup-profile, YAIE_STARTUP_PROFILE
    try:
        engine = build_engine(settings, getattr(ns, "engine_factory", None))
    except (ValueError, OSError) as e:
        print(f"error: cannot build the engine: {e}", file=sys.stderr)
        return 1
    finally:
        profile = sampler.stop() if sampler is not None else None
    _log_engine_built(engine, time.monotonic() - t0)
    if profile is not None:
        logger.info("start-up profile of the engine build (main thread, cumulative s by function): %s",
                    "; ".join(f"{sec:.2f} {where}" for sec, where in profile))

    async_engine = AsyncEngine(engine, max_waiting_requests=srv.max_waiting_requests,
                               model_name=settings.engine.served_model_name)
    app = create_app(async_engine, srv)
    # the drain happens before uvicorn's own graceful shutdown (DrainingServer): by then the answers are out
    config = uvicorn.Config(app, host=srv.host, port=srv.port, log_level=srv.log_level,
                            access_log=srv.access_log, timeout_graceful_shutdown=int(EXPIRED_FLUSH_S),
                            lifespan="on")
    server = _make_server_class()(config)
    server.async_engine = async_engine
    server.drain_timeout_s = srv.shutdown_timeout_s
    logger.info("start-up: app built, starting uvicorn, %s", fmt_age())
    print(json.dumps({"event": "listening", "url": f"http://{srv.host}:{srv.port}/v1",
                      "model": async_engine.model_name}), flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
