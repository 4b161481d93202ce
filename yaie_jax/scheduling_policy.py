"""Scheduling policies: the order in which the scheduler admits sequences (most important first) and preempts them
(least important first). Plain Python.

  fcfs      arrival order
  priority  lower `priority` value first, then arrival
  latency   shortest remaining work (uncomputed prompt + tokens still to generate) first
  fair      round-robin across clients: the client with the fewest tokens served so far goes first
"""
from __future__ import annotations

import collections
from typing import Dict

from .sequence import Sequence


class SchedulingPolicy:
    """The ordering key of one policy (`EngineConfig.scheduling_policy`), and what it is computed from: each
    request's arrival number (ties of arrival time) and each client's tokens served so far."""

    def __init__(self, name: str):
        self.name = name
        self.client_served_tokens: Dict[str, int] = collections.defaultdict(int)
        self._arrival_counter = 0
        self._arrival_order: Dict[str, int] = {}

    def arrived(self, request_id: str) -> None:
        self._arrival_order[request_id] = self._arrival_counter
        self._arrival_counter += 1

    def forget(self, request_id: str) -> None:
        self._arrival_order.pop(request_id, None)

    def served(self, client_id: str, num_tokens: int) -> None:
        self.client_served_tokens[client_id] += num_tokens

    def key(self, seq: Sequence) -> tuple:
        """Sort key: smaller is more important."""
        req = seq.request
        order = self._arrival_order.get(req.request_id, 0)
        if self.name == "priority":
            return (req.priority, req.arrival_time, order, seq.index)
        if self.name == "latency":
            return (req.remaining_work_tokens(), req.arrival_time, order, seq.index)
        if self.name == "fair":
            return (self.client_served_tokens[req.client_id], req.arrival_time, order, seq.index)
        return (req.arrival_time, order, seq.index)
