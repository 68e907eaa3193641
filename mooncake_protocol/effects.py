"""The effect vocabulary: the seam between the protocol and its two drivers.

Protocol activities (the caller, the connection poller, the worker, the P2P threads) are generator
functions that ``yield`` these small frozen objects and receive their results. A driver is an interpreter
of this vocabulary: ``mooncake_sim`` against models of the hardware, ``mooncake_real`` against real
processes, sockets, shared memory and CuPy kernels. All decisions stay in the protocol.

Rules:

* Effects are frozen dataclasses with a one-line docstring that says what the driver must do and what it
  returns. Nothing in here does anything.
* Every effect that can block carries what it awaits (``what``) and a deadline, so a hang report can name
  the effect each activity is blocked in.
* Addresses are the protocol's synthetic addresses (see :mod:`mooncake_protocol.memory`), identical in
  both worlds, so traces compare.

docs/effects.md has the table of all effects; ``tests/test_effects_doc.py`` keeps it in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Protocol


class MemoryReader(Protocol):
    """What a :class:`WaitUntil` predicate may look at: memory and transfer status, read-only."""

    def read(self, rid: int, offset: int, length: int) -> bytes: ...

    def status(self, batch: int) -> tuple[str, ...]: ...


#: A predicate over memory and transfer state, evaluated by the driver.
Predicate = Callable[[MemoryReader], bool]


class Effect:
    """Base class of every effect (for isinstance checks and dispatch)."""

    __slots__ = ()
    #: True for effects that may block; the hang detector reports those.
    blocking = False


# ---------------------------------------------------------------- store (TCPStore-like key-value server)


@dataclass(frozen=True)
class StoreSet(Effect):
    """Set ``key`` to ``value`` in the job's store. Returns None."""

    key: str
    value: bytes


@dataclass(frozen=True)
class StoreGet(Effect):
    """Read ``key`` without waiting. Returns the bytes, or None if absent."""

    key: str


@dataclass(frozen=True)
class StoreCheck(Effect):
    """Whether all ``keys`` are present (one round trip). Returns bool."""

    keys: tuple[str, ...]


@dataclass(frozen=True)
class StoreDelete(Effect):
    """Delete ``key``. Returns whether it existed."""

    key: str


@dataclass(frozen=True)
class StoreAdd(Effect):
    """Atomically add ``delta`` to the integer at ``key`` (absent = 0). Returns the new value."""

    key: str
    delta: int


@dataclass(frozen=True)
class StoreWait(Effect):
    """Block until all ``keys`` exist or ``timeout_s`` passes. Returns True if they all exist."""

    keys: tuple[str, ...]
    timeout_s: float
    what: str = ""
    blocking = True


# ---------------------------------------------------------------- RPC (one server per process)


@dataclass(frozen=True)
class BindResult:
    ok: bool
    error: str | None = None  # e.g. "EADDRINUSE"


@dataclass(frozen=True)
class RpcBind(Effect):
    """Try to bind a TCP listening socket on ``port`` of this rank's host. Returns :class:`BindResult`.

    The socket is kept on success (bind-and-keep); the protocol decides whether to look at the result.
    """

    port: int


@dataclass(frozen=True)
class RpcServe(Effect):
    """Serve RPCs on the bound ``port`` with ``handler(method, payload) -> bytes``. Returns None.

    A rank whose bind failed may still yield this (legacy): the driver then serves nothing.
    """

    port: int
    handler: Callable[[str, bytes], bytes] = field(compare=False)


@dataclass(frozen=True)
class RpcReply:
    ok: bool
    payload: bytes = b""
    error: str | None = None  # "refused", "timeout", "unreachable", "bad-reply"


@dataclass(frozen=True)
class RpcCall(Effect):
    """Call ``method`` on the server at ``target`` ("host:port"), waiting at most ``timeout_s``.

    Returns :class:`RpcReply`. ``target`` is resolved as the network would: whoever holds that port on
    that host answers.
    """

    target: str
    method: str
    payload: bytes
    timeout_s: float
    blocking = True


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class Region:
    """A memory region owned by one rank. ``kind``: device (GPU), pinned (mapped host), host (heap)."""

    rid: int
    name: str
    kind: str
    addr: int
    size: int
    device: int | None = None

    def contains(self, addr: int, length: int) -> bool:
        return self.addr <= addr and addr + length <= self.addr + self.size


@dataclass(frozen=True)
class Allocate(Effect):
    """Allocate ``size`` bytes of ``kind`` memory at synthetic address ``addr``. Returns :class:`Region`.

    ``zero``: whether the memory starts zeroed; otherwise it holds what the allocator left (the driver
    may fill it with garbage, deterministically).
    """

    name: str
    kind: str
    size: int
    addr: int
    device: int | None = None
    zero: bool = True


@dataclass(frozen=True)
class RegisterResult:
    """What the engine's transports could do with the region: export a CUDA IPC / fabric handle."""

    ipc_handle: bool
    fabric_handle: bool
    error: str | None = None


@dataclass(frozen=True)
class Register(Effect):
    """Register ``region`` with the transfer engine under location ``label``. Returns RegisterResult.

    The driver tries what the hardware would: exporting a CUDA IPC handle when the label says cuda
    (fails on host memory), a fabric handle when asked.
    """

    region: Region
    label: str
    want_ipc: bool
    want_fabric: bool


@dataclass(frozen=True)
class ReadMem(Effect):
    """Read ``length`` bytes at ``offset`` of one of this rank's regions. Returns bytes."""

    rid: int
    offset: int
    length: int


@dataclass(frozen=True)
class WriteMem(Effect):
    """Write ``data`` at ``offset`` of one of this rank's regions (host memory). Returns None."""

    rid: int
    offset: int
    data: bytes


# ---------------------------------------------------------------- transfers (the engine's data path)


@dataclass(frozen=True, init=False)
class WriteReq:
    """One WRITE: ``length`` bytes from my region ``src_rid`` at ``src_offset`` to ``dst_addr`` in the
    segment owned by ``dst_owner`` (the rank that answered the segment descriptor, reached at
    ``dst_server`` = its "host:port"), over ``transport``. ``dst_rank`` is the peer the protocol meant
    (differs from ``dst_owner`` when a duplicate server name sent the WRITE elsewhere)."""

    transport: str
    src_rid: int
    src_offset: int
    length: int
    dst_owner: int
    dst_server: str
    dst_addr: int
    dst_rank: int

    def __init__(self, transport: str, src_rid: int, src_offset: int, length: int, dst_owner: int, dst_server: str,
                 dst_addr: int, dst_rank: int) -> None:
        # the generated frozen __init__ sets each field through object.__setattr__: three times slower, and a
        # 512-rank collective builds millions of these (the instance stays frozen: __setattr__ still refuses)
        d = self.__dict__
        d["transport"], d["src_rid"], d["src_offset"], d["length"] = transport, src_rid, src_offset, length
        d["dst_owner"], d["dst_server"], d["dst_addr"], d["dst_rank"] = dst_owner, dst_server, dst_addr, dst_rank


@dataclass(frozen=True)
class SubmitTransfer(Effect):
    """Submit a batch of WRITEs. Returns the batch id (int). Status via :class:`PollTransfer`."""

    writes: tuple[WriteReq, ...]


@dataclass(frozen=True)
class PollTransfer(Effect):
    """Status of every request of a batch: a tuple of "pending", "completed" or "failed:<reason>"."""

    batch: int


@dataclass(frozen=True)
class FreeBatch(Effect):
    """Forget a batch. Returns None."""

    batch: int


# ---------------------------------------------------------------- GPU


@dataclass(frozen=True)
class LoadKernel(Effect):
    """Load (preload) ``kernel``'s module now, like cudaFuncGetAttributes. Returns None.

    Blocking: loading waits while a kernel of this process is resident.
    """

    kernel: str
    blocking = True


@dataclass(frozen=True)
class SpinArgs:
    """The spin kernel's arguments: publish the task in ``slot`` of the task table and spin."""

    table_rid: int
    slot: int
    task: bytes  # the task fields the kernel writes (op, size, root, parity, ...)
    timeout_s: float


@dataclass(frozen=True)
class ReduceArgs:
    """A reduce kernel: combine ``nranks`` slices of ``count`` elements from ``src_rid`` into ``dst_rid``."""

    src_rid: int
    src_offset: int
    dst_rid: int
    dst_offset: int
    count: int
    nranks: int
    stride: int  # bytes between rank slices in src
    active: tuple[bool, ...]  # used when active_rid is None
    active_rid: int | None = None  # a region of one byte per rank, read when the kernel runs


@dataclass(frozen=True)
class Launch(Effect):
    """Launch ``kernel`` on ``stream`` (asynchronous). Returns None.

    Kernels: "spin" (:class:`SpinArgs`), "reduce_<dtype>_<op>" (:class:`ReduceArgs`). The launch call
    itself may block the host thread (a JIT loader loading a cold module behind a resident kernel).
    """

    kernel: str
    stream: str
    args: SpinArgs | ReduceArgs
    blocking = True


@dataclass(frozen=True)
class Memcpy(Effect):
    """Copy ``length`` bytes between regions on ``stream``; ``sync`` blocks the host until done.

    Stream "legacy" is the legacy default stream (synchronises with every blocking stream).
    """

    dst_rid: int
    dst_offset: int
    src_rid: int
    src_offset: int
    length: int
    stream: str
    sync: bool = False
    blocking = True


@dataclass(frozen=True)
class Memset(Effect):
    """Set ``length`` bytes of a region to ``value`` on ``stream`` (asynchronous). Returns None."""

    rid: int
    offset: int
    length: int
    value: int
    stream: str


@dataclass(frozen=True)
class EventRecord(Effect):
    """Record an event on ``stream``. Returns the event id (int)."""

    stream: str


@dataclass(frozen=True)
class EventQuery(Effect):
    """Whether the work before ``event`` has finished. Returns bool."""

    event: int


@dataclass(frozen=True)
class StreamSync(Effect):
    """Block until all work on ``stream`` has finished, or ``timeout_s``. Returns True if finished."""

    stream: str
    timeout_s: float
    what: str = ""
    blocking = True


# ---------------------------------------------------------------- time and control


@dataclass(frozen=True)
class HostCompute(Effect):
    """The protocol has just done host CPU work over ``nbytes`` bytes between two effects. Returns None.

    ``what``: ``reduce`` (the CPU backend's reduce of a chunk's slices), ``fill`` (building a collective's
    input values from the scenario's rule), ``decode`` (turning its output into the values the trace reports).
    The work itself is the protocol's own code, run by both drivers alike; this effect only says how much
    there was. The real driver does nothing (the time has passed already); the simulator charges the host
    CPU ``nbytes`` at the calibrated ``host_<what>_Bps`` (nothing uncalibrated)."""

    what: str
    nbytes: int


@dataclass(frozen=True)
class SteadyState(Effect):
    """The caller of collective ``index`` is about to issue chunk ``chunk``, and the next ``chunks`` chunks
    repeat the ones before exactly (same sizes, peers, buffers, policy): a driver may fast-forward over them.

    Returns how many chunks it skipped (0 or ``chunks``, an even number so buffer parity and task slots
    line up); the caller then advances its counters as if it had issued them. The real driver always
    returns 0. The simulator skips only where it has measured a steady period (see docs/architecture.md).
    """

    index: int
    chunk: int
    chunks: int
    stream: str = ""
    blocking = True


@dataclass(frozen=True)
class Sleep(Effect):
    """Sleep ``seconds``. Returns None."""

    seconds: float


@dataclass(frozen=True)
class Now(Effect):
    """The current time in seconds (simulated or monotonic). Returns float."""


#: A protocol activity: a generator of effects.
Activity = Generator[Effect, Any, Any]


@dataclass(frozen=True)
class Spawn(Effect):
    """Start ``activity`` as a concurrent activity of this rank named ``name``. Returns a handle (int).

    ``daemon`` activities (poller, worker) do not keep a rank alive.
    """

    name: str
    activity: Activity = field(compare=False)
    daemon: bool = False


@dataclass(frozen=True)
class Join(Effect):
    """Wait until the activity ``handle`` ends. Returns its return value."""

    handle: int
    what: str = ""
    blocking = True


@dataclass(frozen=True)
class WaitUntil(Effect):
    """Wait until ``predicate(reader)`` holds, re-checking at least every ``poll_s``.

    Returns True when it holds, False when ``timeout_s`` (None = never) passes first. ``what`` names what is
    awaited; ``blockers()`` names, at the moment of a hang dump, who it waits for ("rank:3",
    "store:buffer_0_3", ...). A driver may also re-check early, whenever this rank's state may have changed.
    """

    predicate: Predicate = field(compare=False)
    poll_s: float
    what: str
    timeout_s: float | None = None
    blockers: Callable[[], tuple[str, ...]] | None = field(default=None, compare=False)
    blocking = True


@dataclass(frozen=True, init=False)
class Mark(Effect):
    """A protocol milestone or observation, recorded in the trace by both drivers alike. Returns None.

    ``name`` is from :data:`mooncake_protocol.trace.MARKS`; ``data`` holds JSON-able facts.
    """

    name: str
    data: tuple[tuple[str, Any], ...] = ()

    def __init__(self, name: str, data: tuple[tuple[str, Any], ...] = ()) -> None:
        # as WriteReq's: the generated frozen __init__ sets each field through object.__setattr__, and a 512-rank
        # run makes millions of marks (the instance stays frozen: __setattr__ still refuses)
        d = self.__dict__
        d["name"], d["data"] = name, data


def mark(name: str, /, **data: Any) -> Mark:
    """Build a :class:`Mark` from keyword facts (sorted, so traces are stable)."""
    return Mark(name, tuple(sorted(data.items())))


ALL_EFFECTS: tuple[type[Effect], ...] = (
    StoreSet, StoreGet, StoreCheck, StoreDelete, StoreAdd, StoreWait,
    RpcBind, RpcServe, RpcCall,
    Allocate, Register, ReadMem, WriteMem,
    SubmitTransfer, PollTransfer, FreeBatch,
    LoadKernel, Launch, Memcpy, Memset, EventRecord, EventQuery, StreamSync, SteadyState, HostCompute,
    Sleep, Now, Spawn, Join, WaitUntil, Mark,
)
