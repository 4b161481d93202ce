"""The one launch point of the runner's device calls.

Every runner method through which the engine reaches the device (`DEVICE_CALLS`) runs its device work as
`runner.launcher.launch(name, fn, *args)`, with host data (numpy, plain Python) as `args`. One process: the
`LocalLauncher` calls `fn(*args)`. The multi-host leader (distributed.Leader) is a launcher that first publishes
`(name, args)` to the follower processes, which make the same call on their own runner; a new device call from
the engine is a new name here and a `launcher.launch` in the runner, nothing else.
"""
from __future__ import annotations

from typing import Any, Callable

# the runner methods whose device work goes through the launcher (followers replay them by these names)
DEVICE_CALLS = ("run_program", "copy_blocks", "swap_out", "swap_in")


class LocalLauncher:
    """Runs each device call at once, in this process."""

    def launch(self, name: str, fn: Callable[..., Any], *args) -> Any:
        return fn(*args)


__all__ = ["DEVICE_CALLS", "LocalLauncher"]
