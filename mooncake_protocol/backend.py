"""Backend construction (``MooncakeBackend`` constructor, mooncake-pg.md section 4.2, steps 1-13).

A :class:`ProcessState` is what one OS process holds across all its backends: the transfer engine
(created once), the process-wide backend index, the poller and worker activities, and the global
per-rank connected flags. A :class:`Backend` is one process group's state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from . import effects as fx
from .effects import Activity, mark
from .engine import Engine, SegmentDesc
from .errors import ProtocolError
from .poller import PeerConnection, PeerState, buffer_key, poller, server_name_key
from .rankenv import BUFFER_SIZE, RankEnv

SYNC_SLOTS = 64  # kMaxNumRanks int32 flags per sync region
SYNC_BYTES = SYNC_SLOTS * 4
WARMUP_BYTES = 64 * 4
P2P_CTRL_SLOT = 128
P2P_CTRL_BYTES = 64 * P2P_CTRL_SLOT


@dataclass(frozen=True)
class SegmentInfo:
    """The 112-byte record each rank publishes as ``buffer_<bi>_<r>``: 14 little-endian u64 addresses."""

    send: tuple[int, int]
    recv: tuple[int, int]
    send_sync: tuple[int, int]
    recv_sync: tuple[int, int]
    warmup_send: int
    warmup_recv: int
    p2p_send: int
    p2p_recv: int
    p2p_ctrl_send: int
    p2p_ctrl_recv: int

    FORMAT = "<14Q"

    def pack(self) -> bytes:
        return struct.pack(self.FORMAT, *self.send, *self.recv, *self.send_sync, *self.recv_sync,
                           self.warmup_send, self.warmup_recv, self.p2p_send, self.p2p_recv,
                           self.p2p_ctrl_send, self.p2p_ctrl_recv)

    @staticmethod
    def unpack(data: bytes) -> SegmentInfo:
        v = struct.unpack(SegmentInfo.FORMAT, data[:112])
        return SegmentInfo((v[0], v[1]), (v[2], v[3]), (v[4], v[5]), (v[6], v[7]), v[8], v[9], v[10], v[11],
                           v[12], v[13])


@dataclass
class ProcessState:
    """Process-wide state: one per rank process."""

    env: RankEnv
    engine: Engine
    backend_index: int = 0
    backends: list[Backend] = field(default_factory=list)
    global_connected: list[bool] = field(default_factory=list)
    poller_started: bool = False
    worker: Any = None  # mooncake_protocol.worker.Worker, started at first backend
    stopping: bool = False
    engine_initialised: bool = False
    loaded_kernels: set[str] = field(default_factory=set)


@dataclass
class Backend:
    env: RankEnv
    process: ProcessState
    index: int
    location: str
    regions: dict[str, fx.Region] = field(default_factory=dict)
    info: SegmentInfo | None = None
    task_count: int = 0
    active: list[bool] = field(default_factory=list)
    peer_connected: list[bool] = field(default_factory=list)
    peers: list[PeerConnection] = field(default_factory=list)
    segment_infos: list[SegmentInfo | None] = field(default_factory=list)
    segments: list[SegmentDesc | None] = field(default_factory=list)
    connected_count: int = 0
    skip_warmup: bool = False
    p2p: Any = None  # mooncake_protocol.p2p.P2PProxy when the workload has point-to-point ops
    group: int = 0  # which of concurrent process groups (task-slot sharing)

    def not_connected(self) -> tuple[str, ...]:
        return tuple(f"rank:{p}:{self.peers[p].state.value}" for p in range(self.env.size)
                     if not self.peer_connected[p])


def new_process(env: RankEnv) -> ProcessState:
    return ProcessState(env=env, engine=Engine(env), backend_index=_initial_backend_index(env),
                        global_connected=[False] * env.size)


def _initial_backend_index(env: RankEnv) -> int:
    f = env.fault("extra_backend")
    return int(f.count) if f is not None else 0


def _needs_p2p(env: RankEnv) -> bool:
    return any(getattr(c, "op", "") == "send_recv" for c in env.workload)


def construct(proc: ProcessState, group: int = 0) -> Activity:
    """Run the constructor; return the :class:`Backend` once every peer is connected (step 12).

    Raises :class:`ProtocolError` for a group above the size limit (step 6) or, with bounded waits, when
    peers do not connect in time.
    """
    env = proc.env
    pol = env.policy
    engine = proc.engine
    # 1. location of device buffers
    location = env.location
    host_label = "*" if pol.host_region_wildcard_label else location
    if env.backend == "cpu":
        data_label = "*" if (pol.cpu_backend_wildcard_label or not env.cuda_platform) else location
        data_kind = "host"
    else:
        data_label = location
        data_kind = "device"
    # 2. engine init, once per process; 3. local server name
    if not proc.engine_initialised:
        proc.engine_initialised = True
        yield from engine.init()
    b = Backend(env=env, process=proc, index=proc.backend_index, location=location, group=group)
    tag = f"g{group}." if group else ""
    # 5. data buffers: 2 send + 2 recv of 16 MiB
    for name in ("send0", "send1", "recv0", "recv1"):
        r = yield from engine.alloc(tag + name, data_kind, BUFFER_SIZE, env.gpu if data_kind == "device" else None)
        b.regions[name] = r
        yield from engine.register(r, data_label)
    # 6. size check, then CPU sync regions (zeroed and "*" since #1755)
    if env.size > pol.max_group_size:
        yield mark("log", level="error", text=f"group size {env.size} exceeds kMaxNumRanks {pol.max_group_size}")
        raise ProtocolError(f"Mooncake backend supports at most {pol.max_group_size} ranks, group has {env.size}",
                            cause="group-size-limit")
    for name in ("send_sync0", "send_sync1", "recv_sync0", "recv_sync1"):
        r = yield from engine.alloc(tag + name, "host", max(SYNC_BYTES, env.size * 4), None, zero=pol.zero_sync_flags)
        b.regions[name] = r
        yield from engine.register(r, host_label)
    yield mark("sync_flags", zeroed=pol.zero_sync_flags, label=host_label)
    # 7. worker (and reduce-kernel preload for the GPU backend)
    if proc.worker is None:
        from .worker import Worker

        proc.worker = Worker(proc)
        yield from proc.worker.allocate_table()
        if env.backend == "cuda" and pol.preload_reduce_kernels:
            yield from proc.worker.preload_reduce_kernels()
        yield fx.Spawn("worker", proc.worker.run(), daemon=True)
    # 8. P2P proxy: rings with the step-1 location, control slots "*" (#1755)
    if _needs_p2p(env):
        from .p2p import P2PProxy

        b.p2p = P2PProxy(b)
        yield from b.p2p.allocate(data_kind, data_label, host_label, tag)
    # 9. warmup regions unless MNNVL warmup skip (#1644)
    b.skip_warmup = env.env.get("MC_USE_NVLINK_IPC") == "0" and env.all_fabric
    if not b.skip_warmup:
        ws = yield from engine.alloc(tag + "warmup_send", "host", max(WARMUP_BYTES, env.size * 4), None)
        yield fx.WriteMem(ws.rid, 0, (1).to_bytes(4, "little"))
        wr = yield from engine.alloc(tag + "warmup_recv", "host", max(WARMUP_BYTES, env.size * 4), None)
        b.regions["warmup_send"], b.regions["warmup_recv"] = ws, wr
        yield from engine.register(ws, host_label)
        yield from engine.register(wr, host_label)
    # 10. SegmentInfo and group meta
    regs = b.regions
    p2p_addrs = b.p2p.addresses() if b.p2p is not None else (0, 0, 0, 0)
    b.info = SegmentInfo(
        (regs["send0"].addr, regs["send1"].addr), (regs["recv0"].addr, regs["recv1"].addr),
        (regs["send_sync0"].addr, regs["send_sync1"].addr), (regs["recv_sync0"].addr, regs["recv_sync1"].addr),
        regs["warmup_send"].addr if "warmup_send" in regs else 0,
        regs["warmup_recv"].addr if "warmup_recv" in regs else 0,
        *p2p_addrs)
    size = env.size
    b.regions["active_ranks"] = yield from engine.alloc(tag + "active_ranks", "pinned" if env.backend == "cuda" else "host",
                                                       max(64, size), None)
    yield fx.WriteMem(b.regions["active_ranks"].rid, 0, b"\x01" * size)
    b.active = [True] * size
    b.peer_connected = [False] * size
    b.peers = [PeerConnection() for _ in range(size)]
    b.segment_infos = [None] * size
    b.segments = [None] * size
    # 11. bootstrapLocalPeer: open own segment by name, mark self connected
    me = env.rank
    if engine.server_name:
        b.segments[me] = yield from engine.open_segment(engine.server_name)
    b.segment_infos[me] = b.info
    b.peer_connected[me] = True
    proc.global_connected[me] = True
    b.peers[me].state = PeerState.CONNECTED
    b.connected_count = 1
    # 12. publish, register with the poller, wait for all peers
    if env.fault("skip_publish") is None:
        yield fx.StoreSet(buffer_key(b.index, me), b.info.pack())
        yield mark("key_published", key=buffer_key(b.index, me))
        yield fx.StoreSet(server_name_key(b.index, me), engine.server_name.encode())
        yield mark("key_published", key=server_name_key(b.index, me), server_name=engine.server_name)
    else:
        yield mark("log", level="warning", text="fault: this rank never publishes its keys")
    proc.backends.append(b)
    yield mark("phase", phase="warmup", backend=b.index)
    if not proc.poller_started:
        proc.poller_started = True
        yield fx.Spawn("poller", poller(proc), daemon=True)
    timeout = env.connect_timeout_s if pol.bounded_connect_wait else None
    ok = yield fx.WaitUntil(lambda _r: b.connected_count >= size, 0.05,
                            "all peers connected (waitUntilAllConnected)", timeout, b.not_connected)
    if not ok:
        missing = ", ".join(b.not_connected())
        raise ProtocolError(f"timed out after {timeout:g} s waiting for peers to connect: {missing}")
    yield mark("all_connected", backend=b.index, size=size)
    # 13. process-wide backend index
    proc.backend_index += 1
    return b
