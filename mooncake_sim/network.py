"""Per-host port tables and RPC over the topology.

A port table maps (host, port) to its holder: a rank, or ``"foreign"`` for a process outside the job
(fault ``hold_port``). A bind on a held port fails with EADDRINUSE. An RPC to "host:port" reaches whoever
holds that port on that host, as on a real network: with a duplicate server name published, the call
reaches the rank that really owns the port. "127.0.0.1" and "localhost" mean the caller's own host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mooncake_protocol import topology as topo

FOREIGN = -1
RPC_SERVICE_S = 10e-6  # handler time per request (C++ coro_rpc: microseconds)
REFUSED_RTT_FACTOR = 2.0


@dataclass
class Server:
    rank: int
    handler: Callable[[str, bytes], bytes] | None  # None: bound but serving nothing


class Network:
    def __init__(self, topology: topo.Topology):
        self.topology = topology
        self.hosts = set(topo.hosts(topology))
        self.ports: dict[tuple[str, int], int] = {}
        self.servers: dict[tuple[str, int], Server] = {}
        self._lat: dict[tuple[str, str], float] = {}
        self._resolved: dict[tuple[str, str], tuple[str | None, int]] = {}

    def hold(self, host: str, port: int, holder: int) -> bool:
        key = (host, port)
        if key in self.ports:
            return False
        self.ports[key] = holder
        return True

    def release_rank(self, rank: int) -> None:
        for key, holder in list(self.ports.items()):
            if holder == rank:
                del self.ports[key]
                self.servers.pop(key, None)

    def serve(self, host: str, port: int, rank: int, handler: Callable[[str, bytes], bytes]) -> bool:
        if self.ports.get((host, port)) != rank:
            return False
        self.servers[(host, port)] = Server(rank, handler)
        return True

    def resolve(self, caller_host: str, target: str) -> tuple[str | None, int]:
        """(host, port) of an "addr:port" string; host None when the address is unknown (kept: the answer
        depends on the two strings and the topology's hosts only)."""
        key = (caller_host, target)
        hit = self._resolved.get(key)
        if hit is None:
            hit = self._resolved[key] = self._resolve(caller_host, target)
        return hit

    def _resolve(self, caller_host: str, target: str) -> tuple[str | None, int]:
        addr, _, port_s = target.rpartition(":")
        try:
            port = int(port_s)
        except ValueError:
            return None, -1
        if addr in ("127.0.0.1", "localhost", "::1"):
            return caller_host, port
        return (addr if addr in self.hosts else None), port

    def one_way(self, a: str, b: str) -> float:
        """One-way latency of a small control message between two hosts (TCP)."""
        key = (a, b) if a <= b else (b, a)
        lat = self._lat.get(key)
        if lat is None:
            p = topo.path(self.topology, topo.Endpoint(a, "host"), topo.Endpoint(b, "host"), "tcp")
            lat = p.latency_s if isinstance(p, topo.Path) else 50e-6
            self._lat[key] = lat
        return lat
