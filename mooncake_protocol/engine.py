"""The transfer engine of one process (TE or TENT): RPC server, registration, segments, transfers.

Process-wide state (Mooncake's ``TransferEngine`` facade is a leaky singleton created at library load).
Its activities are generators that yield effects. What it decides:

* the RPC server's port (TENT: 15000 + random(2000), 10 attempts, bind result checked or not by policy;
  TE: random in [MC_MIN_PRC_PORT, MC_MAX_PRC_PORT], bind-and-keep, 500 attempts) and the server name;
* which transports are loaded and which a registered buffer offers (:mod:`mooncake_protocol.transport`);
* per request, which transport carries it; TENT re-resolves UNSPEC requests and resubmits FAILED ones
  while another transport exists, so a bad choice shows up as "pending forever", as at the snapshot.

Rules: no I/O; randomness only from ``self.rng`` (seeded by scenario seed and rank) so a seed reproduces
every port draw.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from . import effects as fx
from . import transport as tp
from .effects import Activity, mark
from .rankenv import RankEnv

TENT_PORT_BASE = 15000
TENT_PORT_SPAN = 2000
TENT_BIND_ATTEMPTS = 10
TE_PORT_MIN = 15000
TE_PORT_MAX = 17000
TE_BIND_ATTEMPTS = 500
RPC_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class BufferDesc:
    """One registered buffer as peers see it in the segment descriptor."""

    addr: int
    size: int
    label: str
    offered: tuple[str, ...]


@dataclass(frozen=True)
class SegmentDesc:
    """A process's segment descriptor (what ``GetSegmentDesc`` returns). ``owner`` is the rank that
    answered: with a duplicate server name that is not the rank whose name it was."""

    owner: int
    name: str
    machine_id: str
    boot_id: str
    buffers: tuple[BufferDesc, ...]

    def to_bytes(self) -> bytes:
        return json.dumps({
            "owner": self.owner, "name": self.name, "machine_id": self.machine_id, "boot_id": self.boot_id,
            "buffers": [[b.addr, b.size, b.label, list(b.offered)] for b in self.buffers],
        }, separators=(",", ":")).encode()

    @staticmethod
    def from_bytes(data: bytes) -> SegmentDesc:
        d = json.loads(data.decode())
        return SegmentDesc(
            owner=int(d["owner"]), name=str(d["name"]), machine_id=str(d["machine_id"]),
            boot_id=str(d["boot_id"]),
            buffers=tuple(BufferDesc(int(a), int(s), str(lab), tuple(o)) for a, s, lab, o in d["buffers"]),
        )

    def find(self, addr: int, length: int) -> BufferDesc | None:
        for b in self.buffers:
            if b.addr <= addr and addr + length <= b.addr + b.size:
                return b
        return None


@dataclass
class Request:
    """One WRITE as the engine tracks it across re-resolution and resubmission."""

    seg: SegmentDesc | None
    dst_rank: int
    dst_addr: int
    src: fx.Region
    src_offset: int
    length: int
    transport: str | None = None
    driver: tuple[int, int] | None = None  # (driver batch, index)
    final: str | None = None  # "completed" or "failed:<reason>" once settled
    reported: bool = False  # an anomaly mark was emitted for it


@dataclass
class EngineBatch:
    reqs: list[Request]


@dataclass
class Engine:
    env: RankEnv
    rng: random.Random = field(init=False)
    port: int = 0
    server_name: str = ""
    server_running: bool = False
    available: bool = False
    transports: tuple[str, ...] = ()
    buffers: list[BufferDesc] = field(default_factory=list)
    segments: dict[str, SegmentDesc | None] = field(default_factory=dict)
    batches: dict[int, EngineBatch] = field(default_factory=dict)
    next_batch: int = 1
    next_rid: int = 1
    handlers: dict[str, Any] = field(default_factory=dict)
    announced: set[tuple[int, str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"mooncake:{self.env.seed}:{self.env.rank}")

    # ------------------------------------------------------------------ identity

    @property
    def kind(self) -> str:
        return self.env.engine

    def machine_key(self) -> str:
        """What TENT compares to decide "same machine": machine id, or boot id with the #1863 fix."""
        return self.env.boot_id if self.env.policy.use_boot_id else self.env.machine_id

    def local_desc(self) -> SegmentDesc:
        return SegmentDesc(self.env.rank, self.server_name, self.env.machine_id, self.env.boot_id,
                           tuple(self.buffers))

    def advertised_host(self) -> str:
        f = self.env.fault("advertise_host")
        if f is not None:
            return str(f.address)
        return self.env.address

    # ------------------------------------------------------------------ RPC handler (runs in the server)

    def handle_rpc(self, method: str, payload: bytes) -> bytes:
        """The RPC server's dispatch by function id: GetSegmentDesc, Handshake (TE), Notify (ping)."""
        if method in ("GetSegmentDesc", "Handshake"):
            return self.local_desc().to_bytes()
        if method == "Notify":
            return b"ok"
        return b"error:unknown-method"

    # ------------------------------------------------------------------ init

    def init(self) -> Activity:
        """``TransferEngine::init("P2PHANDSHAKE", hostIp)``: start the RPC server, load transports."""
        env = self.env
        if self.kind == "tent":
            yield from self._tent_start_rpc()
            self.transports = tp.tent_loaded_transports(
                env.tent_transports, env.env, has_rdma_nic=env.has_rdma_nic,
                cuda_platform=env.cuda_platform, all_fabric=env.all_fabric)
        else:
            yield from self._te_start_rpc()
            self.transports = (tp.te_transport(env.env, has_rdma_nic=env.has_rdma_nic,
                                               cuda_backend=env.cuda_platform, all_fabric=env.all_fabric),)
        yield mark("engine_ready", engine=self.kind, transports=list(self.transports),
                   server_name=self.server_name, server_running=self.server_running)

    def _serve(self, port: int) -> Activity:
        yield fx.RpcServe(port, self.handle_rpc)

    def _tent_start_rpc(self) -> Activity:
        env = self.env
        configured = env.rpc_server_port
        for attempt in range(TENT_BIND_ATTEMPTS):
            port = configured if configured else TENT_PORT_BASE + self.rng.randrange(TENT_PORT_SPAN)
            res = yield fx.RpcBind(port)
            yield mark("rpc_bind", port=port, ok=res.ok, error=res.error, attempt=attempt,
                       checked=env.policy.check_rpc_bind)
            if res.ok:
                yield from self._serve(port)
                self._set_server(port, running=True)
                return
            if not env.policy.check_rpc_bind:
                # Before #1755: async_start's bind failure went unnoticed; start reports success on a port
                # someone else owns, and the process runs with no RPC server.
                self._set_server(port, running=False)
                return
            configured = 0  # #1755: even a configured port is abandoned for a random one
        # "Failed to bind any RPC port": construction fails; PG ignores init's return value.
        self.port, self.server_name, self.server_running, self.available = 0, "", False, False
        yield mark("log", level="error", text="Failed to bind any RPC port")

    def _te_start_rpc(self) -> Activity:
        env = self.env
        lo = int(env.env.get("MC_MIN_PRC_PORT", TE_PORT_MIN))
        hi = int(env.env.get("MC_MAX_PRC_PORT", TE_PORT_MAX))
        for attempt in range(TE_BIND_ATTEMPTS):
            port = self.rng.randint(lo, hi)
            res = yield fx.RpcBind(port)
            if res.ok:
                yield mark("rpc_bind", port=port, ok=True, error=None, attempt=attempt, checked=True)
                yield from self._serve(port)
                self._set_server(port, running=True)
                return
        self.available = False
        yield mark("log", level="error", text="TE: no free handshake port")

    def _set_server(self, port: int, running: bool) -> None:
        self.port = port
        self.server_name = f"{self.advertised_host()}:{port}"
        self.server_running = running
        self.available = True

    # ------------------------------------------------------------------ registration

    def alloc(self, name: str, kind: str, size: int, device: int | None, zero: bool = True) -> Activity:
        from .memory import region_addr

        rid = self.next_rid
        self.next_rid += 1
        region = yield fx.Allocate(name, kind, size, region_addr(self.env.rank, rid), device, zero)
        return region

    def register(self, region: fx.Region, label: str) -> Activity:
        """``registerLocalMemory(addr, size, label)``: which transports offer themselves for it."""
        tlabel = tp.label_type(label)
        if self.kind == "tent":
            want_ipc = "nvlink" in self.transports and tlabel == "cuda"
            want_fabric = "mnnvl" in self.transports and tlabel == "cuda"
        else:
            want_ipc = self.transports == ("nvlink",) and region.kind == "device"
            want_fabric = self.transports == ("mnnvl",) and region.kind == "device"
        res = yield fx.Register(region, label, want_ipc, want_fabric)
        if self.kind == "tent":
            offered = tuple(t for t in self.transports if tp.tent_offers(t, label, res.ipc_handle, res.fabric_handle))
        else:
            offered = self.transports
        self.buffers.append(BufferDesc(region.addr, region.size, label, offered))
        yield mark("registered", region=region.name, label=label, kind=region.kind, offered=list(offered))

    # ------------------------------------------------------------------ segments

    def open_segment(self, name: str) -> Activity:
        """``openSegment(name)``: TENT fetches the descriptor by RPC, TE handshakes; cached by name.

        Returns the descriptor, or None for a failed open (Mooncake stores segment id -1).
        """
        if name in self.segments and self.segments[name] is not None:
            return self.segments[name]
        if name == self.server_name:
            desc: SegmentDesc | None = self.local_desc()  # TENT maps its own name to the local segment
        else:
            method = "GetSegmentDesc" if self.kind == "tent" else "Handshake"
            payload = b"" if self.kind == "tent" else self.local_desc().to_bytes()
            reply = yield fx.RpcCall(name, method, payload, RPC_TIMEOUT_S)
            desc = None
            if reply.ok:
                try:
                    desc = SegmentDesc.from_bytes(reply.payload)
                except (ValueError, KeyError, TypeError):
                    desc = None
            yield mark("segment_opened", name=name, ok=desc is not None,
                       owner=desc.owner if desc else None, error=None if reply.ok else reply.error)
        self.segments[name] = desc
        return desc

    def close_segment(self, name: str) -> None:
        self.segments.pop(name, None)

    # ------------------------------------------------------------------ transfers

    def same_machine(self, seg: SegmentDesc) -> bool:
        mine = self.machine_key()
        theirs = seg.boot_id if self.env.policy.use_boot_id else seg.machine_id
        return mine == theirs

    def _choose(self, req: Request) -> None:
        req.transport = None
        if req.seg is None:
            return
        if self.kind == "te":
            req.transport = self.transports[0] if self.transports else None
            return
        buf = req.seg.find(req.dst_addr, req.length)
        if buf is None:
            # unknown target buffer: TENT cannot resolve a transport for it
            return
        local_type = "gpu" if req.src.kind == "device" else "dram"
        t, _ = tp.tent_select(buf.offered, local_type, buf.label, same_machine=self.same_machine(req.seg),
                              gpudirect=self.env.gpudirect, cuda_platform=self.env.cuda_platform)
        req.transport = t

    def submit(self, reqs: list[Request]) -> Activity:
        """``submitTransfer``: resolve each request's transport and hand the batch to the hardware.

        Returns the engine batch id.
        """
        for r in reqs:
            self._choose(r)
        yield from self._dispatch([r for r in reqs if r.transport is not None])
        bid = self.next_batch
        self.next_batch += 1
        self.batches[bid] = EngineBatch(reqs)
        return bid

    def _dispatch(self, reqs: list[Request]) -> Activity:
        if not reqs:
            return
        writes = []
        for r in reqs:
            assert r.seg is not None and r.transport is not None
            buf = r.seg.find(r.dst_addr, r.length)
            kind = tp.capability("gpu" if r.src.kind == "device" else "dram",
                                 tp.memory_type_of_label(buf.label) if buf else "dram")
            key = (r.dst_rank, r.transport, kind)
            if key not in self.announced:
                self.announced.add(key)
                yield mark("transport", peer=r.dst_rank, transport=r.transport, kind=kind)
            writes.append(fx.WriteReq(r.transport, r.src.rid, r.src_offset, r.length, r.seg.owner,
                                      r.seg.name, r.dst_addr, r.dst_rank))
        dbid = yield fx.SubmitTransfer(tuple(writes))
        for i, r in enumerate(reqs):
            r.driver = (dbid, i)

    def poll(self, bid: int) -> Activity:
        """``getTransferStatus`` for every request of a batch: "pending", "completed" or "failed:<why>".

        TENT at the snapshot: an UNSPEC request is re-resolved; a FAILED one is resubmitted (reported
        PENDING) while its buffer offers another transport. TE reports failures as they are.
        """
        batch = self.batches.get(bid)
        if batch is None:
            return ()
        driver_ids = sorted({r.driver[0] for r in batch.reqs if r.driver is not None and r.final is None})
        statuses: dict[int, tuple[str, ...]] = {}
        for dbid in driver_ids:
            statuses[dbid] = yield fx.PollTransfer(dbid)
        out = []
        redo: list[Request] = []
        for r in batch.reqs:
            if r.final is not None:
                out.append(r.final)
                continue
            if r.driver is None:  # UNSPEC
                if r.seg is None:
                    r.final = "failed:no-segment"
                    out.append(r.final)
                    continue
                if not r.reported:
                    r.reported = True
                    buf = r.seg.find(r.dst_addr, r.length)
                    yield mark("transport_unspec", dst_rank=r.dst_rank, label=buf.label if buf else None,
                               offered=list(buf.offered) if buf else [], src_kind=r.src.kind)
                if self.kind == "tent":
                    self._choose(r)
                    if r.transport is not None:
                        redo.append(r)
                    out.append("pending")
                else:
                    r.final = "failed:unspec"
                    out.append(r.final)
                continue
            st = statuses[r.driver[0]][r.driver[1]]
            if st == "completed":
                r.final = st
                out.append(st)
            elif st.startswith("failed"):
                buf = r.seg.find(r.dst_addr, r.length) if r.seg else None
                if not r.reported:
                    r.reported = True
                    yield mark("transfer_failed", dst_rank=r.dst_rank, owner=r.seg.owner if r.seg else None,
                               transport=r.transport, reason=st.split(":", 1)[-1],
                               label=buf.label if buf else None, src_kind=r.src.kind)
                if self.kind == "tent" and buf is not None and len(buf.offered) > 1:
                    self._choose(r)
                    if r.transport is not None:
                        redo.append(r)
                    out.append("pending")
                else:
                    r.final = st
                    out.append(st)
            else:
                out.append("pending")
        if redo:
            yield from self._dispatch(redo)
        return tuple(out)

    def free(self, bid: int) -> Activity:
        batch = self.batches.pop(bid, None)
        if batch is None:
            return
        for dbid in sorted({r.driver[0] for r in batch.reqs if r.driver is not None}):
            yield fx.FreeBatch(dbid)
