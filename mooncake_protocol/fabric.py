"""What the hardware does with one WRITE: the physical rules both drivers apply.

The protocol decides which transport a WRITE takes; whether the hardware can carry it out is decided here,
from facts the driver supplies (the target region as its owner registered it, whether the two processes
share a physical host, whether the topology has a path). The simulator calls this for every WRITE; the
real driver calls it before touching memory, so an impossible WRITE fails the same way in both worlds
(in real mode the physical attempt would fail too, with a less readable error).

A failure reason is one of :data:`FAILURE_REASONS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory import is_host_kind

FAILURE_REASONS = (
    "address-not-found",  # target address not inside a region the segment's owner registered
    "no-ipc-handle",  # CUDA IPC cannot open the target (host memory, or export failed)
    "not-same-machine",  # NVLink/SHM across physical hosts: IPC open fails
    "no-fabric-handle",  # MNNVL target not cuMemCreate memory with a fabric handle
    "no-path",  # the topology has no path for this transport (no NIC, no GPUDirect, no IMEX, ...)
    "peer-dead",  # the owner process is gone
    "blocked-direction",  # fault block_direction: this direction of the pair carries nothing
    "crossed-qp",  # an RDMA endpoint whose QPs were crossed by a simultaneous open
)


@dataclass(frozen=True)
class TargetInfo:
    """The target region as its owner registered it (None fields when the address is unknown)."""

    kind: str  # device | pinned | host
    ipc_handle: bool
    fabric_handle: bool


def write_failure(
    transport: str,
    target: TargetInfo | None,
    same_physical_host: bool,
    path_reason: str | None,
) -> str | None:
    """Why the hardware cannot carry out a WRITE over ``transport``, or None if it can.

    ``path_reason`` is the topology's reason when it has no path for this transport between the two
    endpoints (None when a path exists).
    """
    if target is None:
        return "address-not-found"
    if transport == "nvlink":
        if not same_physical_host:
            return "not-same-machine"
        if is_host_kind(target.kind) or not target.ipc_handle:
            return "no-ipc-handle"
    elif transport == "mnnvl":
        if is_host_kind(target.kind):
            return "address-not-found"
        if not target.fabric_handle:
            return "no-fabric-handle"
    elif transport == "shm":
        if not same_physical_host:
            return "not-same-machine"
        if not is_host_kind(target.kind):
            return "no-ipc-handle"
    if path_reason is not None:
        return "no-path"
    return None
