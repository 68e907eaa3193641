"""The transfer engine's data path in real mode: batches of WRITEs over SHM, TCP and CUDA IPC.

Rules of this module:

* A writer learns the target region from the owner's registry file (``<job_dir>/regions/rank<r>.json``,
  written by :class:`mooncake_real.memory.RegionTable`) and asks :func:`mooncake_protocol.fabric.write_failure`
  whether the hardware can carry the WRITE, with the facts the simulator uses: every rank of a real job is on
  this one machine (``same_physical_host=True``); SHM, TCP and NVLink have a path here; RDMA and MNNVL
  "cannot be realised" (scenarios needing them are refused up front, see launcher.py).
* Only then it touches memory: ``shm`` writes into the owner's segment directly; ``tcp`` sends the bytes to
  the owner's RPC server (``__write__``; an owner with no server fails the WRITE as ``peer-dead``);
  ``nvlink`` opens the owner's CUDA IPC handle (``__ipc__``) and copies on the GPU.
* Each rank runs its WRITEs on one transfer thread, like the engine's worker: a copy stuck in CUDA leaves its
  requests "pending", exactly what the protocol would see. Statuses: "pending" | "completed" |
  "failed:<reason>" with reasons from :data:`mooncake_protocol.fabric.FAILURE_REASONS`.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import struct
import threading
import time
from pathlib import Path
from typing import Any

from mooncake_protocol import effects as fx
from mooncake_protocol.fabric import TargetInfo, write_failure
from mooncake_protocol.memory import split_addr

from .memory import PeerSegments, RegionTable, registry_path

#: Transports that have a path on one real machine; the others "cannot be realised".
REALISABLE = ("shm", "tcp", "nvlink")

WRITE_HEADER = struct.Struct("<Q")


def encode_write(dst_addr: int, data: bytes) -> bytes:
    """``__write__`` payload: the 8-byte little-endian target address, then the bytes."""
    return WRITE_HEADER.pack(dst_addr) + data


def decode_write(payload: bytes) -> tuple[int, bytes]:
    if len(payload) < WRITE_HEADER.size:
        raise ValueError("short __write__ payload")
    (addr,) = WRITE_HEADER.unpack_from(payload)
    return addr, payload[WRITE_HEADER.size:]


def read_registry(job_dir: str | Path, owner: int) -> dict[str, Any]:
    """The owner's registry (rid -> facts), or {} when it has none (not started, or gone)."""
    try:
        return dict(json.loads(registry_path(job_dir, owner).read_text())["regions"])
    except (OSError, ValueError, KeyError):
        return {}


class RegistryCache:
    """Peers' registry files as last read, re-read only when a file was replaced or changed.

    An owner rewrites its registry by atomic replace on every Allocate and Register, so (inode, mtime, size)
    of the path tells whether the copy held here is current: one ``stat`` per WRITE instead of reading and
    parsing the JSON each time (which cost 0.3-9 ms per small WRITE inside a running 4-rank job)."""

    def __init__(self, job_dir: str | Path) -> None:
        self.job_dir = Path(job_dir)
        self._held: dict[int, tuple[tuple[int, int, int], dict[str, Any]]] = {}

    def get(self, owner: int) -> dict[str, Any] | None:
        """The owner's regions (rid -> facts), or None when it has no registry file."""
        path = registry_path(self.job_dir, owner)
        try:
            st = os.stat(path)
        except OSError:
            self._held.pop(owner, None)
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        held = self._held.get(owner)
        if held is not None and held[0] == key:
            return held[1]
        regions = read_registry(self.job_dir, owner)
        self._held[owner] = (key, regions)
        return regions


def target_facts(regions: dict[str, Any], owner: int, addr: int, length: int) -> tuple[TargetInfo | None, dict[str, Any] | None]:
    """(TargetInfo, registry entry) of a WRITE's target in the owner's registry ``regions``, or (None, None) if
    the owner registered no such range."""
    parts = split_addr(addr)
    if parts.owner != owner:
        return None, None
    entry = regions.get(str(parts.rid))
    if entry is None or not entry.get("registered") or parts.offset + length > int(entry["size"]):
        return None, None
    return TargetInfo(str(entry["kind"]), bool(entry["ipc"]), bool(entry["fabric"])), entry


#: How many WRITE durations per transport a rank keeps for its result file.
WRITES_KEPT = 2000


class TransferEngine:
    """One rank's batches and its transfer thread."""

    def __init__(
        self,
        rank: int,
        job_dir: str | Path,
        table: RegionTable,
        rpc_client: Any,
        gpu: Any = None,
        rpc_timeout_s: float = 5.0,
        blocked_to: Any = (),
    ) -> None:
        self.rank = rank
        self.blocked_to = frozenset(int(r) for r in blocked_to)  # fault block_direction
        self.job_dir = Path(job_dir)
        self.table = table
        self.rpc = rpc_client
        self.gpu = gpu
        self.rpc_timeout_s = rpc_timeout_s
        self.peers = PeerSegments()
        self.registries = RegistryCache(job_dir)
        self._batches: dict[int, list[str]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, int, fx.WriteReq] | None] = queue.Queue()
        self._ipc_ptrs: dict[tuple[str, int], int] = {}
        #: what the transfer thread is doing now (for dumps): (description, monotonic start) or None
        self.current: tuple[str, float] | None = None
        #: seconds each WRITE took on the transfer thread, per transport (the first WRITES_KEPT of each);
        #: ``mooncake-real calibrate`` reads them from the result files to measure WRITEs inside a job. A
        #: transport's first WRITE to a peer goes to ``first_durations`` instead: it also opens what later
        #: ones reuse (TCP: the thread's RPC connection; SHM: a mapping of the peer's segment; NVLink: the
        #: peer's IPC handle, fetched by RPC and opened), which in a job can cost many times a WRITE. A WRITE
        #: that opened the thread's RPC connection to its server (a TCP ``__write__``, or an NVLink WRITE's
        #: ``__ipc__`` call, whichever came first) goes to ``connect_durations``: the first NVLink WRITE to a
        #: peer pays the connection only where no TCP WRITE to that peer came before it, and vice versa
        self.durations: dict[str, list[float]] = {}
        self.first_durations: dict[str, list[float]] = {}
        self.connect_durations: dict[str, list[float]] = {}
        self._contacted: set[tuple[str, int]] = set()
        self._thread = threading.Thread(target=self._loop, name=f"transfer-{rank}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the engine's API
    def submit(self, writes: tuple[fx.WriteReq, ...]) -> int:
        bid = next(self._ids)
        with self._lock:
            self._batches[bid] = ["pending"] * len(writes)
        for i, w in enumerate(writes):
            self._queue.put((bid, i, w))
        return bid

    def status(self, batch: int) -> tuple[str, ...]:
        with self._lock:
            st = self._batches.get(batch)
            return tuple(st) if st is not None else ()

    def free(self, batch: int) -> None:
        with self._lock:
            self._batches.pop(batch, None)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(1)
        self.peers.close()

    # ------------------------------------------------------------------ the transfer thread
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            bid, i, w = item
            t0 = time.monotonic()
            self.current = (f"{w.transport} WRITE of {w.length} bytes to rank {w.dst_owner}", t0)
            had = self.rpc.connected(w.dst_server)
            try:
                reason = self.execute(w)
            except Exception as exc:  # a driver fault must show as a failed request, not a dead thread
                reason = f"driver-error:{type(exc).__name__}:{exc}"
            self.current = None
            contact = (w.transport, w.dst_owner)
            # an NVLink WRITE to this rank's own memory opens no IPC handle (see execute)
            first = contact not in self._contacted and not (w.transport == "nvlink" and w.dst_owner == self.rank)
            self._contacted.add(contact)
            if not had and self.rpc.connected(w.dst_server):
                kept = self.connect_durations.setdefault(w.transport, [])
            else:
                kept = (self.first_durations if first else self.durations).setdefault(w.transport, [])
            if len(kept) < WRITES_KEPT and reason is None:
                kept.append(round(time.monotonic() - t0, 7))
            with self._lock:
                st = self._batches.get(bid)
                if st is not None:
                    st[i] = "completed" if reason is None else f"failed:{reason}"

    def execute(self, w: fx.WriteReq) -> str | None:
        """Carry out one WRITE; None when it completed, else the failure reason."""
        if w.dst_owner in self.blocked_to and split_addr(w.dst_addr).owner == w.dst_owner:
            return "blocked-direction"  # fault block_direction, decided where the simulator decides it
        regions = self.registries.get(w.dst_owner)
        if regions is not None or split_addr(w.dst_addr).owner != w.dst_owner:
            target, entry = target_facts(regions or {}, w.dst_owner, w.dst_addr, w.length)
        else:  # the owner runs on another host (torchrun/SLURM): ask its server
            target, entry = self._remote_facts(w)
        path_reason = None if w.transport in REALISABLE else "cannot be realised"
        reason = write_failure(w.transport, target, same_physical_host=True, path_reason=path_reason)
        if reason is not None:
            return reason
        assert entry is not None
        offset = split_addr(w.dst_addr).offset
        if w.transport == "shm":
            data = self.table.read(w.src_rid, w.src_offset, w.length)
            name = entry.get("shm")
            if not name:
                return "no-ipc-handle"
            try:
                self.peers.get(str(name)).write(offset, data)
            except FileNotFoundError:
                return "peer-dead"
            return None
        if w.transport == "tcp":
            data = self.table.read(w.src_rid, w.src_offset, w.length)
            reply = self.rpc.call(w.dst_server, "__write__", encode_write(w.dst_addr, data), self.rpc_timeout_s)
            if not reply.ok:
                return "peer-dead" if reply.error in ("refused", "timeout", "unreachable") else "address-not-found"
            return reply.payload.decode() or None
        if w.transport == "nvlink":
            if self.gpu is None or not self.gpu.available:
                return "no-ipc-handle"
            rid = split_addr(w.dst_addr).rid
            if w.dst_owner == self.rank:
                # a process cannot open its own IPC handle (cudaIpcOpenMemHandle: invalid device context);
                # TENT copies to its own memory directly
                ptr: int | str | None = self.table.ptr(rid)
            else:
                ptr = self._ipc_ptr(w.dst_server, rid)
            if isinstance(ptr, str):
                return ptr
            if ptr is None:
                return "no-ipc-handle"
            self.gpu.copy_ptr(ptr + offset, self.table.ptr(w.src_rid) + w.src_offset, w.length)
            return None
        return "no-path"

    def _remote_facts(self, w: fx.WriteReq) -> tuple[TargetInfo | None, dict[str, Any] | None]:
        parts = split_addr(w.dst_addr)
        reply = self.rpc.call(w.dst_server, "__region__", str(parts.rid).encode(), self.rpc_timeout_s)
        if not reply.ok:
            return None, None
        try:
            e = json.loads(reply.payload)
        except ValueError:
            return None, None
        if not e.get("registered") or parts.offset + w.length > int(e.get("size", 0)):
            return None, None
        return TargetInfo(str(e["kind"]), bool(e["ipc"]), bool(e["fabric"])), e

    def _ipc_ptr(self, server: str, rid: int) -> int | str | None:
        """The opened IPC pointer of a peer's region; None when it has no handle (host memory), "peer-dead"
        when its server does not answer (as the simulator says of a WRITE to a dead owner)."""
        key = (server, rid)
        if key not in self._ipc_ptrs:
            reply = self.rpc.call(server, "__ipc__", str(rid).encode(), self.rpc_timeout_s)
            if not reply.ok and reply.error in ("refused", "timeout", "unreachable"):
                return "peer-dead"
            if not reply.ok or not reply.payload:
                return None
            self._ipc_ptrs[key] = self.gpu.ipc_open(reply.payload)
        return self._ipc_ptrs[key]


def rpc_builtins(table: RegionTable) -> dict[str, Any]:
    """The driver's own RPC methods a rank's server answers (the data path's server side)."""

    def write(payload: bytes) -> bytes:
        addr, data = decode_write(payload)
        reason = table.write_at_addr(addr, data)
        return b"" if reason is None else reason.encode()

    def ipc(payload: bytes) -> bytes:
        return table.ipc_handle(int(payload.decode())) or b""

    def region(payload: bytes) -> bytes:
        e = table.entries.get(int(payload.decode()))
        if e is None:
            return b"{}"
        reg = e.registration
        return json.dumps({"kind": e.region.kind, "size": e.region.size, "registered": reg is not None,
                           "ipc": bool(reg and reg.ipc_handle), "fabric": bool(reg and reg.fabric_handle)}).encode()

    return {"__write__": write, "__ipc__": ipc, "__region__": region}
