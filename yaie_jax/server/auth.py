"""API keys, per-key rate limiting, request-size limit: one pure-ASGI middleware in front of the app.

Contract:
- Protected paths: everything under `/v1` (known routes or not, so a 404 never leaks before auth) and
  `/tokenize`, `/detokenize`. Open: `/health`, `/metrics`, `/version`, docs, and CORS preflight (OPTIONS).
- With keys configured, a request must carry one as `Authorization: Bearer <key>` or `X-API-Key: <key>`.
  Keys are compared with `hmac.compare_digest` against every configured key (no early exit), so timing does
  not reveal which prefix matched. Failure: 401 in OpenAI's error shape with `WWW-Authenticate: Bearer`.
- Rate limit (when `rate_limit_rpm` is set): a token bucket per API key (per client address when no keys are
  configured), refilled at rpm/60 per second up to `burst`. Over the limit: 429 with `Retry-After` (whole
  seconds, rounded up) and `x-ratelimit-*` headers.
- Bodies larger than `max_request_bytes` (by Content-Length) are refused with 413 before being read.
- The key's identity for logs and fair scheduling is `scope["state"]["api_key_id"]`: "key-<sha256 prefix>"
  (never the key itself), or None without keys.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from typing import Dict, Iterable, List, Optional, Tuple

PROTECTED_PREFIXES = ("/v1",)
PROTECTED_PATHS = ("/tokenize", "/detokenize")


def key_id(key: str) -> str:
    """A stable, non-reversible label for a key (logs, metrics, fair-scheduling client id)."""
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def extract_key(headers: Dict[str, str]) -> Optional[str]:
    """The presented key from `Authorization: Bearer` (scheme case-insensitive) or `X-API-Key`."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("x-api-key")
    return key.strip() if key and key.strip() else None


class APIKeys:
    """The accepted keys. `match(presented)` returns the key's id or None, in time independent of which key."""

    def __init__(self, keys: Iterable[str]):
        self._keys: List[Tuple[bytes, str]] = [(k.encode("utf-8"), key_id(k)) for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def match(self, presented: Optional[str]) -> Optional[str]:
        if not presented:
            return None
        p = presented.encode("utf-8", errors="surrogateescape")
        found = None
        for k, kid in self._keys:        # compare against every key: no early exit
            if hmac.compare_digest(p, k) and found is None:
                found = kid
        return found


class RateLimiter:
    """Token bucket per client: `rpm` requests per minute sustained, `burst` at once. Thread-safe."""

    def __init__(self, rpm: Optional[float], burst: Optional[int] = None, max_clients: int = 100_000):
        self.rate_per_s = (rpm or 0.0) / 60.0
        self.capacity = float(burst if burst is not None else max(1, int(rpm or 0)))
        self._buckets: Dict[str, Tuple[float, float]] = {}
        self._lock = threading.Lock()
        self._max_clients = max_clients

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def acquire(self, client: str, now: Optional[float] = None) -> Tuple[bool, float, int]:
        """Take one token. Returns (allowed, retry_after_s, remaining whole tokens)."""
        if not self.enabled:
            return True, 0.0, 0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate_per_s)
            if tokens >= 1.0:
                tokens -= 1.0
                allowed, wait = True, 0.0
            else:
                allowed, wait = False, (1.0 - tokens) / self.rate_per_s
            if len(self._buckets) >= self._max_clients and client not in self._buckets:
                self._evict_full(now)
            self._buckets[client] = (tokens, now)
            return allowed, wait, int(tokens)

    def _evict_full(self, now: float) -> None:
        # buckets that have refilled completely carry no information: drop them
        for c, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.rate_per_s >= self.capacity:
                del self._buckets[c]


def _error_body(message: str, type_: str, code: Optional[str]) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


class AuthRateLimitMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: it would buffer streams and hide client disconnects)."""

    def __init__(self, app, *, keys: APIKeys, limiter: RateLimiter, max_request_bytes: int,
                 on_reject=None):
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.max_request_bytes = max_request_bytes
        self.on_reject = on_reject          # callable(status, code, path) for metrics/logs

    @staticmethod
    def is_protected(path: str) -> bool:
        return any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES) or path in PROTECTED_PATHS

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        clen = headers.get("content-length")
        if clen is not None:
            try:
                too_big = int(clen) > self.max_request_bytes
            except ValueError:
                too_big = False
            if too_big:
                return await self._reject(send, 413, f"Request body too large (limit {self.max_request_bytes} "
                                                     f"bytes).", "invalid_request_error", "request_too_large", path)
        scope.setdefault("state", {})
        if not self.is_protected(path):
            return await self.app(scope, receive, send)
        kid = None
        if self.keys.enabled:
            presented = extract_key(headers)
            kid = self.keys.match(presented)
            if kid is None:
                msg = ("You didn't provide an API key. Provide it as 'Authorization: Bearer <key>' or "
                       "'X-API-Key: <key>'.") if presented is None else "Incorrect API key provided."
                return await self._reject(send, 401, msg, "invalid_request_error", "invalid_api_key", path,
                                          {"www-authenticate": "Bearer"})
        scope["state"]["api_key_id"] = kid
        if self.limiter.enabled:
            client = kid or ((scope.get("client") or ("unknown",))[0])
            allowed, wait, remaining = self.limiter.acquire(client)
            if not allowed:
                retry = max(1, math.ceil(wait))
                return await self._reject(
                    send, 429, f"Rate limit reached: {self.limiter.rate_per_s * 60:g} requests per minute "
                               f"(burst {self.limiter.capacity:g}). Please try again in {wait:.1f}s.",
                    "requests", "rate_limit_exceeded", path,
                    {"retry-after": str(retry), "x-ratelimit-limit-requests": f"{self.limiter.rate_per_s * 60:g}",
                     "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": f"{wait:.3f}s"})
        return await self.app(scope, receive, send)

    async def _reject(self, send, status: int, message: str, type_: str, code: str, path: str,
                      extra_headers: Optional[Dict[str, str]] = None) -> None:
        if self.on_reject is not None:
            try:
                self.on_reject(status, code, path)
            except Exception:
                pass
        body = _error_body(message, type_, code)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        for k, v in (extra_headers or {}).items():
            headers.append((k.encode("latin-1"), v.encode("latin-1")))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


__all__ = ["APIKeys", "RateLimiter", "AuthRateLimitMiddleware", "extract_key", "key_id"]
