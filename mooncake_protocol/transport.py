"""Transport offering and selection: TENT's per-request rule and TE's one-transport rule.

Pure tables and functions (mooncake-pg.md sections 5, 6). TENT:

1. At registration each loaded transport decides from the buffer's *label* whether to offer itself
   (:func:`tent_offers`).
2. Per request the engine takes the remote memory type from the target's label and the local type from
   the source memory, walks the target buffer's offered transports in priority order (:data:`TENT_PRIORITY`),
   skips NVLink and SHM when the peer's machine id differs, and picks the first whose capability
   (:data:`CAPABILITIES`) matches (:func:`tent_select`). None = UNSPEC.

TE: exactly one network transport per process, chosen at init (:func:`te_transport`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping

#: TENT's registration (and selection) order.
TENT_PRIORITY: tuple[str, ...] = ("mnnvl", "nvlink", "rdma", "shm", "tcp")

D2D, D2G, G2D, G2G = "dram_to_dram", "dram_to_gpu", "gpu_to_dram", "gpu_to_gpu"
ALL_CAPS = frozenset({D2D, D2G, G2D, G2G})

#: What each transport can move (RDMA: host only unless GPUDirect; TCP: all four on a CUDA platform).
CAPABILITIES: dict[str, frozenset[str]] = {
    "nvlink": frozenset({D2G, G2D, G2G}),
    "mnnvl": frozenset({D2G, G2G}),
    "rdma": frozenset({D2D}),
    "rdma+gpudirect": ALL_CAPS,
    "shm": frozenset({D2D}),
    "tcp": frozenset({D2D}),
    "tcp+cuda": ALL_CAPS,
}


def label_type(label: str) -> str:
    """TENT's LocationParser: the text before ':'; "*" or a string with no colon is type "*"."""
    if label == "*" or ":" not in label:
        return "*"
    return label.split(":", 1)[0]


def memory_type_of_label(label: str) -> str:
    """Remote memory type as TENT reads it from a label: cuda/npu/... -> "gpu", cpu/* -> "dram"."""
    return "dram" if label_type(label) in ("cpu", "*") else "gpu"


def capability(local_type: str, remote_type: str) -> str:
    return f"{'gpu' if local_type == 'gpu' else 'dram'}_to_{'gpu' if remote_type == 'gpu' else 'dram'}"


def tent_offers(transport: str, label: str, ipc_handle: bool, fabric_handle: bool) -> bool:
    """Whether a loaded TENT transport offers itself for a buffer registered under ``label``."""
    t = label_type(label)
    if transport == "nvlink":
        return ipc_handle if t == "cuda" else True
    if transport == "mnnvl":
        return fabric_handle if t == "cuda" else False
    return True  # rdma, shm, tcp offer themselves for any memory


def tent_loaded_transports(config: Mapping[str, bool], env: Mapping[str, str], *, has_rdma_nic: bool,
                           cuda_platform: bool, all_fabric: bool) -> tuple[str, ...]:
    """``loadTransports``: TCP (unless disabled), SHM (off by default), RDMA (if a NIC was found), then
    MNNVL if MC_ENABLE_MNNVL is set (or the config's ``mnnvl`` is true) and every device supports fabric
    handles, otherwise NVLink."""
    loaded = []
    if config.get("tcp", True):
        loaded.append("tcp")
    if config.get("shm", False):
        loaded.append("shm")
    if config.get("rdma", True) and has_rdma_nic:
        loaded.append("rdma")
    if cuda_platform:
        if (env.get("MC_ENABLE_MNNVL") or config.get("mnnvl", False)) and all_fabric:
            loaded.append("mnnvl")
        elif config.get("nvlink", True):
            loaded.append("nvlink")
    return tuple(t for t in TENT_PRIORITY if t in loaded)


def caps_of(transport: str, *, gpudirect: bool, cuda_platform: bool) -> frozenset[str]:
    if transport == "rdma":
        return CAPABILITIES["rdma+gpudirect" if gpudirect else "rdma"]
    if transport == "tcp":
        return CAPABILITIES["tcp+cuda" if cuda_platform else "tcp"]
    return CAPABILITIES[transport]


def tent_select(offered: Iterable[str], local_type: str, remote_label: str, *, same_machine: bool,
                gpudirect: bool, cuda_platform: bool, start: int = 0) -> tuple[str | None, int]:
    """Walk ``offered`` (priority order) from index ``start``; return (transport, index) or (None, -1).

    NVLink and SHM are skipped when the peer's machine id differs from ours.
    """
    return _tent_select(tuple(offered), local_type, remote_label, same_machine, gpudirect, cuda_platform, start)


@functools.lru_cache(maxsize=4096)
def _tent_select(offered: tuple[str, ...], local_type: str, remote_label: str, same_machine: bool,
                 gpudirect: bool, cuda_platform: bool, start: int) -> tuple[str | None, int]:
    need = capability(local_type, memory_type_of_label(remote_label))
    for i in range(start, len(offered)):
        t = offered[i]
        if t in ("nvlink", "shm") and not same_machine:
            continue
        if need in caps_of(t, gpudirect=gpudirect, cuda_platform=cuda_platform):
            return t, i
    return None, -1


def te_transport(env: Mapping[str, str], *, has_rdma_nic: bool, cuda_backend: bool, all_fabric: bool) -> str:
    """TE's single network transport: RDMA if a usable HCA and no MC_FORCE_TCP (MC_FORCE_HCA wins),
    else TCP; with an MNNVL build, cross-node NVLink if MC_FORCE_MNNVL, or no HCA on a fabric system;
    intra-node NVLink if MC_INTRANODE_NVLINK."""
    if env.get("MC_INTRANODE_NVLINK") and cuda_backend:
        return "nvlink"
    if env.get("MC_FORCE_MNNVL") and cuda_backend:
        return "mnnvl"
    if env.get("MC_FORCE_HCA") and has_rdma_nic:
        return "rdma"
    if has_rdma_nic and not env.get("MC_FORCE_TCP"):
        return "rdma"
    if not has_rdma_nic and all_fabric and cuda_backend and not env.get("MC_FORCE_TCP"):
        return "mnnvl"
    return "tcp"
