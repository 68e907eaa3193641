"""A rank's memory regions in real mode: POSIX shared memory for host regions, CuPy for device regions.

Rules of this module:

* Host regions (kinds ``host`` and ``pinned``) live in POSIX shared memory: ``/dev/shm/mc<job>_<owner>_<rid>``,
  created by the owner at Allocate, opened by peers on demand (cached), unlinked by the owner at exit and
  swept by the launcher (prefix ``mc<job>_``) whatever happened. We use ``/dev/shm`` + ``mmap`` directly,
  not ``multiprocessing.shared_memory``: before Python 3.13 the latter registers every *attach* with a
  resource tracker process that unlinks the segment when the attaching process exits.
* With a GPU, ``pinned`` regions are the same shared memory, page-locked and mapped into the GPU's address
  space with ``cudaHostRegister(Portable | Mapped)``: the GPU sees them, and peers can still write them.
* Device regions are ``cupy.cuda.alloc`` buffers; without CuPy they cannot exist (Allocate raises).
* A region that is not zeroed holds deterministic garbage, :func:`garbage`, the same rule the simulator
  uses, so traces of a "garbage sync flag" compare.
* Every Allocate and Register rewrites this rank's registry file ``<job_dir>/regions/rank<r>.json`` (atomic
  rename): a writer learns a target region's kind and registration from it before it writes
  (:mod:`mooncake_real.transports`).
* :func:`register_result` is the one place that says what a registration yields on this machine.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mooncake_protocol import effects as fx
from mooncake_protocol.memory import split_addr

SHM_DIR = Path("/dev/shm")


def garbage(rid: int, size: int) -> bytes:
    """What an allocator left in a region that was not zeroed: byte i is ``(rid * 131 + i) % 251 + 1``.

    Never zero, so an uninitialised flag always reads as set. Shared with the simulator (docs/real-mode.md).
    """
    import numpy as np

    return ((rid * 131 + np.arange(size, dtype=np.int64)) % 251 + 1).astype(np.uint8).tobytes()


def shm_prefix(job_id: str) -> str:
    return f"mc{job_id}_"


def shm_name(job_id: str, owner: int, rid: int) -> str:
    return f"{shm_prefix(job_id)}{owner}_{rid}"


def registry_path(job_dir: str | Path, rank: int) -> Path:
    return Path(job_dir) / "regions" / f"rank{rank}.json"


def sweep_shm(job_id: str) -> list[str]:
    """Unlink every shared-memory segment of the job; returns the names removed."""
    removed: list[str] = []
    prefix = shm_prefix(job_id)
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for n in names:
        if n.startswith(prefix):
            try:
                os.unlink(SHM_DIR / n)
                removed.append(n)
            except FileNotFoundError:
                pass
    return removed


class ShmSegment:
    """A mapped POSIX shared-memory segment (created by its owner, opened by peers)."""

    def __init__(self, name: str, size: int, create: bool) -> None:
        self.name = name
        self.size = size
        self.owner = create
        path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, max(size, 1))
            else:
                self.size = os.fstat(fd).st_size
            self.mm = mmap.mmap(fd, max(self.size, 1))
        finally:
            os.close(fd)
        self._view: Any = None

    def read(self, offset: int, length: int) -> bytes:
        return self.mm[offset:offset + length]

    def write(self, offset: int, data: bytes) -> None:
        self.mm[offset:offset + len(data)] = data

    def fill(self, data: bytes) -> None:
        self.mm[: len(data)] = data

    @property
    def ptr(self) -> int:
        """Host virtual address of the mapping (numpy view kept alive until close)."""
        import numpy as np

        if self._view is None:
            self._view = np.frombuffer(self.mm, dtype=np.uint8)
        return int(self._view.ctypes.data)

    def close(self, unlink: bool = False) -> None:
        self._view = None
        try:
            self.mm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with the process
        if unlink:
            try:
                os.unlink(SHM_DIR / self.name)
            except FileNotFoundError:
                pass


@dataclass
class Registration:
    label: str
    ipc_handle: bool
    fabric_handle: bool
    ipc_bytes: bytes | None = None


@dataclass
class RegionEntry:
    region: fx.Region
    storage: Any  # ShmSegment (host kinds) or DeviceBuffer (device)
    registration: Registration | None = None


def register_result(kind: str, want_ipc: bool, want_fabric: bool, ipc_exported: bool) -> fx.RegisterResult:
    """What registering a region yields on this machine (the rule the simulator mirrors for a real host).

    Registration itself never fails; the IPC export fails on host memory (cudaErrorInvalidValue), and fabric
    handles cannot be exported on a host without MNNVL/IMEX (that is, never here).
    """
    return fx.RegisterResult(ipc_handle=bool(want_ipc and ipc_exported and kind == "device"),
                             fabric_handle=False, error=None)


class RegionTable:
    """rid -> (Region, storage, registration) for one rank, plus its registry file."""

    def __init__(self, job_id: str, job_dir: str | Path, rank: int, gpu: Any = None) -> None:
        self.job_id = job_id
        self.job_dir = Path(job_dir)
        self.rank = rank
        self.gpu = gpu  # mooncake_real.gpu.GpuContext or None (CPU backend)
        self.entries: dict[int, RegionEntry] = {}
        self._lock = threading.Lock()
        self._write_registry()

    # ------------------------------------------------------------------ allocate / register
    def allocate(self, eff: fx.Allocate) -> fx.Region:
        rid = split_addr(eff.addr).rid
        if rid in self.entries:
            raise ValueError(f"rank {self.rank}: region id {rid} allocated twice")
        region = fx.Region(rid, eff.name, eff.kind, eff.addr, eff.size, eff.device)
        if eff.kind == "device":
            if self.gpu is None or not self.gpu.available:
                raise RuntimeError("device memory needs a GPU and CuPy; this rank runs the CPU backend")
            storage: Any = self.gpu.alloc_device(eff.size)
            if eff.zero:
                storage.fill_zero()
            else:
                storage.write(0, garbage(rid, eff.size))
        elif eff.kind in ("host", "pinned"):
            storage = ShmSegment(shm_name(self.job_id, self.rank, rid), eff.size, create=True)
            if not eff.zero:
                storage.fill(garbage(rid, eff.size))
            if eff.kind == "pinned" and self.gpu is not None and self.gpu.available:
                self.gpu.host_register(storage)
        else:
            raise ValueError(f"unknown region kind {eff.kind!r}")
        with self._lock:
            self.entries[rid] = RegionEntry(region, storage)
        self._write_registry()
        return region

    def register(self, region: fx.Region, label: str, want_ipc: bool, want_fabric: bool) -> fx.RegisterResult:
        entry = self.entries.get(region.rid)
        if entry is None:
            return fx.RegisterResult(False, False, f"region {region.rid} not allocated")
        exported = False
        ipc_bytes = None
        if want_ipc and self.gpu is not None and self.gpu.available:
            ptr = entry.storage.ptr
            ipc_bytes = self.gpu.ipc_get_handle(ptr)  # None on host memory (cudaErrorInvalidValue)
            exported = ipc_bytes is not None
        res = register_result(region.kind, want_ipc, want_fabric, exported)
        entry.registration = Registration(label, res.ipc_handle, res.fabric_handle, ipc_bytes if res.ipc_handle else None)
        self._write_registry()
        return res

    def _write_registry(self) -> None:
        doc = {}
        for rid, e in self.entries.items():
            doc[str(rid)] = {
                "name": e.region.name, "kind": e.region.kind, "size": e.region.size, "addr": e.region.addr,
                "device": e.region.device,
                "shm": e.storage.name if isinstance(e.storage, ShmSegment) else None,
                "registered": e.registration is not None,
                "label": e.registration.label if e.registration else None,
                "ipc": bool(e.registration and e.registration.ipc_handle),
                "fabric": bool(e.registration and e.registration.fabric_handle),
            }
        path = registry_path(self.job_dir, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"rank": self.rank, "pid": os.getpid(), "regions": doc}))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ access
    def entry(self, rid: int) -> RegionEntry:
        e = self.entries.get(rid)
        if e is None:
            raise KeyError(f"rank {self.rank} has no region {rid}")
        return e

    def read(self, rid: int, offset: int, length: int) -> bytes:
        e = self.entry(rid)
        if offset < 0 or offset + length > e.region.size:
            raise IndexError(f"read of {length} bytes at {offset} outside region {e.region.name} ({e.region.size} bytes)")
        return bytes(e.storage.read(offset, length))

    def write(self, rid: int, offset: int, data: bytes) -> None:
        e = self.entry(rid)
        if offset < 0 or offset + len(data) > e.region.size:
            raise IndexError(f"write of {len(data)} bytes at {offset} outside region {e.region.name} ({e.region.size} bytes)")
        e.storage.write(offset, data)

    def ptr(self, rid: int) -> int:
        """The address the GPU uses for this region (device pointer, or mapped host pointer)."""
        e = self.entry(rid)
        if isinstance(e.storage, ShmSegment) and self.gpu is not None and self.gpu.available:
            return int(self.gpu.device_ptr_of_host(e.storage))
        return int(e.storage.ptr)

    def write_at_addr(self, addr: int, data: bytes) -> str | None:
        """A peer's WRITE landing here (the TCP transport's ``__write__``): None, or a failure reason."""
        parts = split_addr(addr)
        e = self.entries.get(parts.rid)
        if parts.owner != self.rank or e is None or e.registration is None:
            return "address-not-found"
        if parts.offset + len(data) > e.region.size:
            return "address-not-found"
        e.storage.write(parts.offset, data)
        return None

    def ipc_handle(self, rid: int) -> bytes | None:
        e = self.entries.get(rid)
        if e is None or e.registration is None:
            return None
        return e.registration.ipc_bytes

    def close(self) -> None:
        """Free everything this rank owns and unlink its segments."""
        with self._lock:
            entries, self.entries = list(self.entries.values()), {}
        for e in entries:
            try:
                if isinstance(e.storage, ShmSegment):
                    if self.gpu is not None and self.gpu.available:
                        self.gpu.host_unregister(e.storage)
                    e.storage.close(unlink=True)
                else:
                    e.storage.free()
            except Exception:
                pass


class MemoryReader:
    """What a WaitUntil predicate sees: this rank's memory and transfer statuses (``fx.MemoryReader``)."""

    def __init__(self, table: RegionTable, transfers: Any) -> None:
        self.table = table
        self.transfers = transfers

    def read(self, rid: int, offset: int, length: int) -> bytes:
        return self.table.read(rid, offset, length)

    def status(self, batch: int) -> tuple[str, ...]:
        return tuple(self.transfers.status(batch))


class PeerSegments:
    """Peers' shared-memory segments, opened on demand and cached (the SHM transport's view)."""

    def __init__(self) -> None:
        self._open: dict[str, ShmSegment] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> ShmSegment:
        with self._lock:
            seg = self._open.get(name)
            if seg is None:
                seg = ShmSegment(name, 0, create=False)
                self._open[name] = seg
            return seg

    def close(self) -> None:
        with self._lock:
            segs, self._open = list(self._open.values()), {}
        for s in segs:
            s.close(unlink=False)


def shm_segments_of_job(job_id: str) -> list[str]:
    """Names of the job's segments now in /dev/shm (sorted)."""
    prefix = shm_prefix(job_id)
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except OSError:
        return []
