"""OpenAI-compatible HTTP server (FastAPI).

    app.py        create_app(async_engine, settings): middleware, error handlers, routes that delegate
    serving.py    OpenAIServing: one method per endpoint; generation = start (validate, admit) + answer
    streaming.py  the SSE body shared by completions and chat; disconnect-aware waits
    tracking.py   per-request output trackers, usage, metrics and request-log recording
    logprobs.py   logprobs in OpenAI's completions and chat formats
    errors.py     APIError (OpenAI's error shape); engine errors (yaie_jax/errors.py) -> HTTP errors
    protocol.py   pydantic request schemas -> SamplingParams; validation errors -> 400 with `param`
    auth.py       API keys (constant-time), per-key token-bucket rate limit, body-size limit (ASGI middleware)
    metrics.py    Prometheus metrics (`yaie:` names), one CollectorRegistry per app
    logging.py    one structlog JSON line per finished request
    settings.py   ServerSettings and the layered configuration (defaults < YAML < environment < flags)
    serve.py      `python -m yaie_jax.serve`: build the engine, run uvicorn, drain on SIGTERM
    cli.py        the `yaie` command: `yaie serve`, `yaie chat` (in-process or against a server)

Run it with `python -m yaie_jax.serve` or `yaie serve MODEL` (yaie_jax/serve.py and yaie_jax/cli.py at the
package top are the old entry paths, aliases of serve.py and cli.py here).
"""


def create_app(*args, **kwargs):
    """See `yaie_jax.server.app.create_app` (imported lazily: FastAPI is only needed when serving)."""
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
