"""The server's settings as data: `ServerSettings` (the HTTP side, validated on construction), `Settings` (the
effective engine and server settings and where each value came from) and `ConfigError`. How the values are
read (defaults < YAML < environment < CLI) is settings.py."""
from __future__ import annotations

import dataclasses
import json
from typing import Dict, List, Optional

from ..config import EngineConfig


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names where it came from. `field`: the
    ServerSettings field at fault, when one is."""

    def __init__(self, message: str, *, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass
class ServerSettings:
    """HTTP-side settings. Validated on construction (`ConfigError` naming the field)."""
    host: str = "127.0.0.1"                  # 0.0.0.0 to listen on every interface
    port: int = 8000                         # 0 = any free port
    api_keys: List[str] = dataclasses.field(default_factory=list)   # empty = no auth
    rate_limit_rpm: Optional[float] = None   # per API key (or per client address without keys); None = off
    rate_limit_burst: Optional[int] = None   # bucket size; None = max(1, rate_limit_rpm)
    max_waiting_requests: Optional[int] = 1024   # waiting-queue cap: 503 + Retry-After beyond it; None = no cap
    retry_after_s: int = 1                   # Retry-After sent with 503 (queue full, draining)
    request_timeout_s: Optional[float] = None    # whole-request bound (finish_reason "timeout"); None = none
    queue_timeout_s: Optional[float] = None      # bound on time spent waiting before the first step
    shutdown_timeout_s: float = 30.0         # SIGTERM: drain this long, then end what is left (error event / 503)
    stall_timeout_s: Optional[float] = 120.0     # work waiting, no step for this long: not ready (None = off)
    prompt_chars_per_token: int = 32         # text longer than max_model_len * this is refused before tokenizing
    max_request_bytes: int = 16 * 1024 * 1024    # larger bodies are refused with 413
    log_level: str = "info"
    log_requests: bool = True                # one JSON line per finished request
    access_log: bool = False                 # uvicorn's own access log (the JSON request log usually suffices)
    cors_allow_origins: List[str] = dataclasses.field(default_factory=list)
    startup_profile: bool = False            # log where the engine build's time went (sampled main-thread stacks)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ConfigError(f"invalid server setting {name}={getattr(self, name)!r}: {why}", field=name)

        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            bad("port", "must be an integer in [0, 65535]")
        if any((not isinstance(k, str)) or not k.strip() for k in self.api_keys):
            bad("api_keys", "keys must be non-empty strings")
        if self.rate_limit_rpm is not None and not self.rate_limit_rpm > 0:
            bad("rate_limit_rpm", "must be > 0 or None")
        if self.rate_limit_burst is not None and (not isinstance(self.rate_limit_burst, int)
                                                  or self.rate_limit_burst < 1):
            bad("rate_limit_burst", "must be a positive integer or None")
        if self.max_waiting_requests is not None and (not isinstance(self.max_waiting_requests, int)
                                                      or self.max_waiting_requests < 0):
            bad("max_waiting_requests", "must be a non-negative integer or None")
        if not isinstance(self.retry_after_s, int) or self.retry_after_s < 0:
            bad("retry_after_s", "must be a non-negative integer")
        for name in ("request_timeout_s", "queue_timeout_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                bad(name, "must be > 0 or None")
        if not self.shutdown_timeout_s >= 0:
            bad("shutdown_timeout_s", "must be >= 0")
        if self.stall_timeout_s is not None and not self.stall_timeout_s > 0:
            bad("stall_timeout_s", "must be > 0 or None")
        if not isinstance(self.prompt_chars_per_token, int) or self.prompt_chars_per_token < 1:
            bad("prompt_chars_per_token", "must be a positive integer")
        if not isinstance(self.max_request_bytes, int) or self.max_request_bytes < 1024:
            bad("max_request_bytes", "must be an integer >= 1024")
        if str(self.log_level).lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
            bad("log_level", "must be one of critical, error, warning, info, debug, trace")
        self.log_level = str(self.log_level).lower()

    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in dataclasses.fields(cls)}


@dataclasses.dataclass
class Settings:
    engine: EngineConfig
    server: ServerSettings
    sources: Dict[str, str]                  # "engine.max_num_seqs" -> "file:cfg.yaml" | "env:MAX_BATCH_SIZE" | ...
    warnings: List[str]
    config_file: Optional[str] = None

    def effective(self) -> dict:
        """The effective configuration as plain data, API keys redacted (what `serve` prints at start-up)."""
        eng = dataclasses.asdict(self.engine)
        srv = dataclasses.asdict(self.server)
        srv["api_keys"] = [f"<redacted {len(k)} chars>" for k in self.server.api_keys]
        return {"engine": eng, "server": srv, "sources": dict(sorted(self.sources.items())),
                "config_file": self.config_file, "warnings": list(self.warnings)}

    def to_json(self) -> str:
        return json.dumps(self.effective(), indent=2, sort_keys=False, default=str)
