"""The store server model: one TCPStore-like server, one request queue, a service time per operation.

Requests travel from the rank's host to the store's host (rank 0's, like MASTER_ADDR) and back with the
topology's TCP latency; the server applies them one at a time, so a large group shows the central store
as a bottleneck (queueing delay grows with the number of ranks polling it).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import simpy

from mooncake_protocol import effects as fx

#: Seconds the server spends on one request (a TCPStore op in C++ is a few microseconds).
DEFAULT_SERVICE_S = 5e-6


class StoreServer:
    def __init__(self, env: simpy.Environment, service_s: float = DEFAULT_SERVICE_S, extra_delay_s: float = 0.0):
        self.env = env
        self.service_s = service_s
        self.extra_delay_s = extra_delay_s
        self.data: dict[str, bytes] = {}
        self.free_at = 0.0
        self.ops = 0
        self.max_queue_s = 0.0

    def apply(self, effect: fx.Effect) -> Any:
        self.ops += 1
        d = self.data
        if isinstance(effect, fx.StoreSet):
            d[effect.key] = effect.value
            return None
        if isinstance(effect, fx.StoreGet):
            return d.get(effect.key)
        if isinstance(effect, fx.StoreCheck):
            return all(k in d for k in effect.keys)
        if isinstance(effect, fx.StoreDelete):
            return d.pop(effect.key, None) is not None
        if isinstance(effect, fx.StoreAdd):
            value = int(d.get(effect.key, b"0")) + effect.delta
            d[effect.key] = str(value).encode()
            return value
        raise TypeError(f"not a store effect: {effect!r}")

    def request(self, effect: fx.Effect, one_way_s: float) -> Generator[simpy.Event, Any, Any]:
        """Carry one request: travel, queue, service, travel back. Returns the op's result."""
        env = self.env
        arrive = env.now + one_way_s + self.extra_delay_s
        start = max(arrive, self.free_at)
        self.max_queue_s = max(self.max_queue_s, start - arrive)
        self.free_at = start + self.service_s
        if isinstance(effect, fx.StoreWait):
            yield env.timeout(self.free_at - env.now)
            deadline = env.now + effect.timeout_s
            while not all(k in self.data for k in effect.keys):
                if env.now >= deadline:
                    yield env.timeout(one_way_s)
                    return False
                yield env.timeout(min(0.001, deadline - env.now))
            yield env.timeout(one_way_s)
            return True
        yield env.timeout(self.free_at - env.now)
        result = self.apply(effect)
        yield env.timeout(one_way_s + self.extra_delay_s)
        return result
