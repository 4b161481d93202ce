"""What the devices report about their memory (JAX `memory_stats()`), for /health and /metrics."""
from __future__ import annotations

import sys
from typing import List, Optional


def device_memory() -> Optional[List[dict]]:
    """Per-device memory from JAX's `memory_stats()` when JAX is already loaded and reports it, else None."""
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    try:
        out = []
        for d in jax.local_devices():
            stats = d.memory_stats()
            if not stats:
                continue
            out.append({"device": str(d), "bytes_in_use": stats.get("bytes_in_use"),
                        "bytes_limit": stats.get("bytes_limit"),
                        "peak_bytes_in_use": stats.get("peak_bytes_in_use")})
        return out or None
    except Exception:
        return None


def total_device_memory(devices: Optional[List[dict]]) -> Optional[dict]:
    """Bytes in use and limit summed over `device_memory()`'s devices, or None when no device reports them."""
    if not devices:
        return None
    return {"bytes_in_use": sum(d.get("bytes_in_use") or 0 for d in devices),
            "bytes_limit": sum(d.get("bytes_limit") or 0 for d in devices), "num_devices": len(devices)}


__all__ = ["device_memory", "total_device_memory"]
