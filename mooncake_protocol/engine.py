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

import bisect
import functools
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
#: Creating the local QPs of a new RDMA endpoint before the handshake RPC goes out (ibv_create_qp and the
#: state changes take milliseconds); the endpoint is CONNECTING for that whole time.
QP_CREATE_S = 2e-3


@dataclass(frozen=True)
class BufferDesc:
    """One registered buffer as peers see it in the segment descriptor (``nic``: the owner's RDMA NIC for
    the buffer's location, "" without one)."""

    addr: int
    size: int
    label: str
    offered: tuple[str, ...]
    nic: str = ""


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
            "buffers": [[b.addr, b.size, b.label, list(b.offered), b.nic] for b in self.buffers],
        }, separators=(",", ":")).encode()

    @staticmethod
    def from_bytes(data: bytes) -> SegmentDesc:
        return _desc_from_bytes(data)

    @staticmethod
    def _decode(data: bytes) -> SegmentDesc:
        d = json.loads(data.decode())
        return SegmentDesc(
            owner=int(d["owner"]), name=str(d["name"]), machine_id=str(d["machine_id"]),
            boot_id=str(d["boot_id"]),
            buffers=tuple(BufferDesc(int(a), int(s), str(lab), tuple(o), str(n)) for a, s, lab, o, n in d["buffers"]),
        )

    def find(self, addr: int, length: int) -> BufferDesc | None:
        """The registered buffer holding ``[addr, addr + length)``: the first so registered. Buffers that do not
        overlap (the usual case) are searched by bisection over their start addresses, built once per
        descriptor (a descriptor never changes); overlapping ones, or an empty range, in registration order."""
        index: tuple[list[int], list[BufferDesc]] | None = self.__dict__.get("_index")
        if index is None:
            index = _buffer_index(self.buffers)
            object.__setattr__(self, "_index", index)
        starts, ordered = index
        if not starts or length <= 0:
            for b in self.buffers:
                if b.addr <= addr and addr + length <= b.addr + b.size:
                    return b
            return None
        i = bisect.bisect_right(starts, addr) - 1
        if i < 0:
            return None
        b = ordered[i]
        return b if addr + length <= b.addr + b.size else None


def _buffer_index(buffers: tuple[BufferDesc, ...]) -> tuple[list[int], list[BufferDesc]]:
    """Start addresses and buffers sorted by start, or two empty lists when two buffers overlap or share a
    start (then only a scan in registration order finds "the first registered")."""
    ordered = sorted(buffers, key=lambda b: b.addr)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.addr < a.addr + a.size or b.addr == a.addr:
            return [], []
    return [b.addr for b in ordered], ordered


@functools.lru_cache(maxsize=8192)
def _desc_from_bytes(data: bytes) -> SegmentDesc:
    """Decoding is pure and the result immutable, so peers fetching one descriptor share the parse."""
    return SegmentDesc._decode(data)


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
    crossed: bool = False  # its RDMA endpoint's QPs are crossed: every WRITE on it fails
    awaiting: bool = False  # waiting for its RDMA endpoint's handshake
    buf: BufferDesc | None = None  # the target buffer in ``seg``, as the last transport choice found it


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
    #: RDMA endpoints by (local NIC, peer rank, peer NIC): "connecting" | "connected" | "crossed"
    endpoints: dict[tuple[str, int, str], str] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)  # rid -> registered label
    #: peers to which a WRITE of ours completed during warmup (the directions warmup proved)
    warmed: set[int] = field(default_factory=set)
    phase: str = "bootstrap"
    _desc_bytes: tuple[tuple[str, int], bytes] | None = field(default=None, repr=False)
    #: TENT's choice per (target buffer, local memory kind): (buffer, its descriptor, transport); the choice
    #: depends on nothing else (a descriptor is immutable), and holding both keeps their ids from reuse
    _choices: dict[tuple[int, str], tuple[BufferDesc, SegmentDesc, str | None]] = field(
        default_factory=dict, repr=False)
    #: per request shape (peer, transport, local kind, target label): the capability, once announced
    _kinds: dict[tuple[int, str, str, str | None], str] = field(default_factory=dict, repr=False)
    _local_nics: dict[int, str] = field(default_factory=dict, repr=False)  # rid -> the NIC its label picks

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
            key = (self.server_name, len(self.buffers))  # buffers are only ever appended
            if self._desc_bytes is None or self._desc_bytes[0] != key:
                self._desc_bytes = (key, self.local_desc().to_bytes())
            return self._desc_bytes[1]
        if method == "Notify":
            return b"ok"
        if method == "BootstrapRdma":
            return self._passive_endpoint(payload)
        return b"error:unknown-method"

    def _passive_endpoint(self, payload: bytes) -> bytes:
        """The passive side of an RDMA endpoint handshake (``setupConnectionsByPassive``)."""
        d = json.loads(payload.decode())
        key = (str(d["peer_nic"]), int(d["from"]), str(d["local_nic"]))
        state = self.endpoints.get(key)
        if state == "connecting":
            if self.env.policy.rdma_connecting_state:
                return b"reuse"  # #1733: the in-flight handshake is reused
            # before #1733: the half-built endpoint is deleted and a new one made: the QPs end up crossed
            self.endpoints[key] = "crossed"
            return b"crossed"
        if state == "crossed":
            return b"crossed"
        self.endpoints[key] = "connected"
        return b"ok"

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
        self.labels[region.rid] = label
        self._local_nics.pop(region.rid, None)
        nic = self.env.nic_for_label.get(label) or self.env.nic_for_label.get("*", "")
        self.buffers.append(BufferDesc(region.addr, region.size, label, offered, nic))
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

    def refresh_segment(self, seg: SegmentDesc) -> Activity:
        """Re-read a cached descriptor that lacks a target buffer of its rightful owner.

        The owner registered that buffer after we fetched its descriptor: the buffers of a later process
        group of the same process (one engine, one segment per process). The engines re-read a segment's
        descriptor when a buffer lookup misses; the cache then holds the fresh one. A descriptor from the
        wrong owner (duplicate server name) is not refreshed: its owner never had the buffer.
        """
        cached = self.segments.get(seg.name)
        if cached is not None and cached is not seg and len(cached.buffers) > len(seg.buffers):
            return cached
        if seg.name == self.server_name:
            fresh: SegmentDesc | None = self.local_desc()
        else:
            method = "GetSegmentDesc" if self.kind == "tent" else "Handshake"
            payload = b"" if self.kind == "tent" else self.local_desc().to_bytes()
            reply = yield fx.RpcCall(seg.name, method, payload, RPC_TIMEOUT_S)
            fresh = None
            if reply.ok:
                try:
                    fresh = SegmentDesc.from_bytes(reply.payload)
                except (ValueError, KeyError, TypeError):
                    fresh = None
        if fresh is None or fresh.owner != seg.owner:
            return seg
        self.segments[seg.name] = fresh
        return fresh

    def close_segment(self, name: str) -> None:
        self.segments.pop(name, None)

    # ------------------------------------------------------------------ transfers

    def same_machine(self, seg: SegmentDesc) -> bool:
        mine = self.machine_key()
        theirs = seg.boot_id if self.env.policy.use_boot_id else seg.machine_id
        return mine == theirs

    def _choose(self, req: Request) -> None:
        """Pick ``req``'s transport."""
        self._choose_for(req, req.seg.find(req.dst_addr, req.length) if req.seg is not None else None)

    def _choose_for(self, req: Request, buf: BufferDesc | None) -> None:
        """Pick ``req``'s transport, ``buf`` being its target buffer in ``req.seg`` (as :meth:`SegmentDesc.find`
        gives it)."""
        req.transport = None
        req.buf = buf
        seg = req.seg
        if seg is None:
            return
        if self.kind == "te":
            req.transport = self.transports[0] if self.transports else None
            return
        if buf is None:
            # unknown target buffer: TENT cannot resolve a transport for it
            return
        key = (id(buf), req.src.kind)
        hit = self._choices.get(key)
        if hit is not None and hit[0] is buf and hit[1] is seg:  # TENT chose for this buffer before
            req.transport = hit[2]
            return
        local_type = "gpu" if req.src.kind == "device" else "dram"
        t, _ = tp.tent_select(buf.offered, local_type, buf.label, same_machine=self.same_machine(seg),
                              gpudirect=self.env.gpudirect, cuda_platform=self.env.cuda_platform)
        req.transport = t
        self._choices[key] = (buf, seg, t)

    def submit(self, reqs: list[Request]) -> Activity:
        """``submitTransfer``: resolve each request's transport and hand the batch to the hardware.

        Returns the engine batch id.
        """
        for r in reqs:
            seg = r.seg
            buf = seg.find(r.dst_addr, r.length) if seg is not None else None
            if seg is not None and buf is None and seg.owner == r.dst_rank:
                seg = r.seg = yield from self.refresh_segment(seg)
                buf = seg.find(r.dst_addr, r.length)
            self._choose_for(r, buf)
        yield from self._dispatch([r for r in reqs if r.transport is not None])
        bid = self.next_batch
        self.next_batch += 1
        self.batches[bid] = EngineBatch(reqs)
        return bid

    def _endpoint_key(self, r: Request) -> tuple[str, int, str] | None:
        if r.transport != "rdma":
            return None
        seg = r.seg
        assert seg is not None
        if seg.owner == self.env.rank:
            return None
        local = self._local_nics.get(r.src.rid)
        if local is None:
            label = self.labels.get(r.src.rid, self.env.location)
            local = self._local_nics[r.src.rid] = self.env.nic_for_label.get(label) or self.env.nic_for_label.get("*", "")
        buf = r.buf
        return (local, seg.owner, buf.nic if buf else "")

    def _handshake(self, key: tuple[str, int, str], target: str) -> Activity:
        """The active side of an RDMA endpoint handshake (``setupConnectionsByActive``), run by the engine's
        transfer thread, not by whoever submitted: create the local QPs, then ask the peer."""
        yield fx.Sleep(QP_CREATE_S)
        payload = json.dumps({"from": self.env.rank, "local_nic": key[0], "peer_nic": key[2]}).encode()
        reply = yield fx.RpcCall(target, "BootstrapRdma", payload, RPC_TIMEOUT_S)
        if self.endpoints.get(key) == "crossed" or (reply.ok and reply.payload == b"crossed"):
            self.endpoints[key] = "crossed"
            yield mark("crossed_endpoints", peer=key[1], local_nic=key[0], peer_nic=key[2])
        elif reply.ok:
            self.endpoints[key] = "connected"
        else:
            self.endpoints[key] = "failed"

    def batch_settled(self, reader: fx.MemoryReader, bid: int) -> bool:
        """Whether polling batch ``bid`` now would find something new for every request (a predicate for
        :class:`~mooncake_protocol.effects.WaitUntil`: read-only)."""
        batch = self.batches.get(bid)
        if batch is None:
            return True
        for r in batch.reqs:
            if r.final is not None or r.crossed:
                continue
            if r.driver is None:
                if r.awaiting and self.endpoint_state(r) != "connecting":
                    continue
                if r.seg is None:
                    continue
                return False  # UNSPEC: stays pending
            if reader.status(r.driver[0])[r.driver[1]] == "pending":
                return False
        return True

    def endpoint_state(self, r: Request) -> str | None:
        """None when the request needs no RDMA endpoint, else the endpoint's state."""
        if r.seg is None:
            return None
        key = self._endpoint_key(r)
        return None if key is None else self.endpoints.get(key, "new")

    def _dispatch(self, reqs: list[Request]) -> Activity:
        if not reqs:
            return
        usable = []
        endpoints = self.endpoints
        for r in reqs:
            key = self._endpoint_key(r)
            if key is not None:
                state = endpoints.get(key)
                if state is None:
                    assert r.seg is not None
                    endpoints[key] = "connecting"
                    yield fx.Spawn("rdma-handshake", self._handshake(key, r.seg.name), daemon=True)
                    state = "connecting"
                if state in ("connecting", "failed"):
                    r.driver = None
                    r.awaiting = True  # posted once the endpoint is up
                    continue
                if state == "crossed":
                    r.driver = None
                    r.crossed = True
                    continue
            usable.append(r)
        reqs = usable
        if not reqs:
            return
        writes = []
        kinds = self._kinds
        write_req = fx.WriteReq
        for r in reqs:
            seg, transport, src, buf = r.seg, r.transport, r.src, r.buf
            assert seg is not None and transport is not None
            shape = (r.dst_rank, transport, src.kind, buf.label if buf else None)
            if shape not in kinds:
                kind = kinds[shape] = tp.capability("gpu" if src.kind == "device" else "dram",
                                                    tp.memory_type_of_label(buf.label) if buf else "dram")
                seen = (r.dst_rank, transport, kind)
                if seen not in self.announced:
                    self.announced.add(seen)
                    yield mark("transport", peer=r.dst_rank, transport=transport, kind=kind)
            writes.append(write_req(transport, src.rid, r.src_offset, r.length, seg.owner, seg.name, r.dst_addr,
                                    r.dst_rank))
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
            if r.driver is None and r.awaiting:
                state = self.endpoint_state(r)
                if state == "connecting":
                    out.append("pending")
                    continue
                r.awaiting = False
                if state == "connected":
                    redo.append(r)
                    out.append("pending")
                    continue
                if state == "crossed":
                    r.crossed = True
                else:
                    r.final = "failed:no-path"
                    out.append(r.final)
                    continue
            if r.driver is None and r.crossed:
                st_crossed = "failed:crossed-qp"
                r.crossed = False
                if self.kind == "tent" and r.seg is not None:
                    buf = r.seg.find(r.dst_addr, r.length)
                    if buf is not None and len(buf.offered) > 1:
                        self._choose(r)
                        if r.transport is not None:
                            redo.append(r)
                        out.append("pending")
                        continue
                r.final = st_crossed
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
                               label=buf.label if buf else None, src_kind=r.src.kind, phase=self.phase)
                    if self.phase == "collective" and r.dst_rank not in self.warmed and r.dst_rank != self.env.rank:
                        yield mark("unwarmed_direction", peer=r.dst_rank, reason=st.split(":", 1)[-1])
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
