"""API keys (constant-time comparison) and a per-key token-bucket rate limit."""
from __future__ import annotations

import hmac
import threading
import time
from typing import Dict, Iterable, Optional, Tuple


def extract_key(headers) -> Optional[str]:
    auth = headers.get("authorization")
    if auth and auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get("x-api-key")


class ApiKeys:
    def __init__(self, keys: Iterable[str]):
        self.keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def check(self, presented: Optional[str]) -> bool:
        if not self.enabled:
            return True
        if not presented:
            return False
        p = presented.encode()
        ok = False
        for k in self.keys:           # no early exit: every key is compared
            ok |= hmac.compare_digest(p, k)
        return ok


class RateLimiter:
    """Requests per minute with a burst, per client key. `try_acquire` returns (allowed, retry_after_s)."""

    def __init__(self, requests_per_minute: Optional[float], burst: Optional[int] = None):
        self.rate = (requests_per_minute or 0) / 60.0
        self.capacity = float(burst or max(1, int(requests_per_minute or 0)))
        self.buckets: Dict[str, Tuple[float, float]] = {}
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def try_acquire(self, key: str) -> Tuple[bool, float]:
        if not self.enabled:
            return True, 0.0
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(key, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self.buckets[key] = (tokens - 1.0, now)
                return True, 0.0
            self.buckets[key] = (tokens, now)
            return False, (1.0 - tokens) / self.rate
