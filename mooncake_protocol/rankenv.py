"""What one rank knows about itself and its machine when it starts: :class:`RankEnv`.

Built from a scenario by :func:`make_rank_envs`, the same way in both worlds. The real driver passes the
addresses it can actually reach (127.0.0.1), the simulator the topology's host names. Nothing in here
looks at other ranks' state: a rank learns about peers only through the store and RPC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import topology as topo
from .policy import Policy

#: The protocol's own waits are this share of the scenario's deadlines: the fixed policy's bounded connect
#: wait (of ``deadlines.bootstrap_s``) and a collective's wait for its stream (of ``deadlines.collective_s``).
HOST_WAIT_SHARE = 0.5

KIB = 1024
MIB = 1024 * KIB

#: Collective staging buffer (kBufferSize), x2 send + x2 recv per backend.
BUFFER_SIZE = 16 * MIB
#: Per-peer P2P lane size (kP2PBufferSize).
P2P_BUFFER_SIZE = 16 * MIB


@dataclass(frozen=True)
class RankEnv:
    rank: int
    size: int
    host: str  # topology host name
    address: str  # what this rank publishes as its IP (host name in sim, 127.0.0.1 in real mode)
    gpu: int | None
    numa: int
    backend: str  # cuda | cpu
    engine: str  # tent | te
    policy: Policy
    env: Mapping[str, str]
    tent_transports: Mapping[str, bool]
    rpc_server_port: int
    machine_id: str
    boot_id: str
    cuda_platform: bool  # CUDA reports >= 1 device on this host
    all_fabric: bool  # every local device supports fabric handles
    has_rdma_nic: bool
    gpudirect: bool
    seed: int
    connect_timeout_s: float
    collective_timeout_s: float
    workload: tuple[Any, ...] = ()
    faults: tuple[Any, ...] = ()
    data_values: bool = True
    concurrent_groups: int = 1
    #: the RDMA NIC this rank's engine uses for memory under each location label (TENT: first NIC of the best
    #: non-empty tier; TE: first preferred)
    nic_for_label: Mapping[str, str] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def fault(self, kind: str) -> Any | None:
        """This rank's first fault of ``kind`` (or a job-wide one), else None."""
        for f in self.faults:
            if f.kind == kind:
                return f
        return None

    @property
    def location(self) -> str:
        """Step 1 of construction: where device buffers live ("cuda:N" on a GPU host, else "*")."""
        if self.cuda_platform:
            return f"cuda:{self.gpu if self.gpu is not None else 0}"
        return "*"


def _as_dict(obj: Any) -> dict[str, bool]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: bool(v) for k, v in dataclasses.asdict(obj).items()}
    return {str(k): bool(v) for k, v in dict(obj).items()}


def _fault_rank(f: Any) -> int | None:
    r = getattr(f, "rank", None)
    return r if isinstance(r, int) else None


def make_rank_envs(scenario: Any, address_of: Callable[[str], str] | None = None) -> list[RankEnv]:
    """One :class:`RankEnv` per rank of ``scenario`` (a :class:`mooncake_protocol.scenario.Scenario`)."""
    t = scenario.topology
    envs = []
    size = scenario.ranks
    concurrent = 1
    for f in scenario.faults:
        if f.kind == "concurrent_groups":
            concurrent = int(getattr(f, "count", 2))
    for p in scenario.placement:
        host_gpus = topo.gpus(t, p.host)
        cuda_platform = bool(host_gpus)
        rdma = [n for n in topo.nics(t, p.host) if n.type == "rdma"]
        faults = tuple(f for f in scenario.faults if _fault_rank(f) in (None, p.rank))
        labels = {"*", f"cpu:{p.numa}"} | ({f"cuda:{p.gpu}"} if p.gpu is not None and cuda_platform else set())
        nic_for_label = {}
        for label in sorted(labels):
            if scenario.engine == "te":
                pref, avail = topo.te_nic_preference(t, p.host, label)
                order = pref + avail
            else:
                t0, t1, t2 = topo.nic_tiers(t, p.host, label)
                order = t0 or t1 or t2
            if order:
                nic_for_label[label] = order[0]
        envs.append(RankEnv(
            rank=p.rank,
            size=size,
            host=p.host,
            address=address_of(p.host) if address_of else p.host,
            gpu=p.gpu,
            numa=p.numa,
            backend=scenario.backend,
            engine=scenario.engine,
            policy=scenario.policy,
            env=dict(scenario.env),
            tent_transports=_as_dict(scenario.tent.transports),
            rpc_server_port=int(scenario.tent.rpc_server_port or 0),
            machine_id=topo.machine_id(t, p.host),
            boot_id=topo.boot_id(t, p.host),
            cuda_platform=cuda_platform,
            all_fabric=cuda_platform and all(topo.fabric_supported(t, g) for g in host_gpus),
            has_rdma_nic=bool(rdma),
            gpudirect=bool(rdma) and all(n.gpudirect for n in rdma),
            seed=scenario.seed,
            connect_timeout_s=scenario.deadlines.bootstrap_s * HOST_WAIT_SHARE,
            collective_timeout_s=scenario.deadlines.collective_s * HOST_WAIT_SHARE,
            workload=tuple(scenario.workload),
            faults=faults,
            data_values=getattr(scenario, "data", "values") == "values",
            concurrent_groups=concurrent,
            nic_for_label=nic_for_label,
        ))
    return envs
