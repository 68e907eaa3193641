"""Transfers: WRITEs along the selected transport's path, with latency, shared bandwidth and CUDA calls.

For each WRITE the model asks :func:`mooncake_protocol.fabric.write_failure` whether the hardware can do
it (MNNVL refuses host-memory targets, NVLink/SHM only within one physical host, RDMA only through NICs,
GPU memory over RDMA only with GPUDirect), then moves the bytes after ``latency + length / rate``, where
the rate is the path's bottleneck shared fairly with the flows already on its links.

Transports that call the CUDA runtime put that work on the writer's GPU context, so the GPU model can hold
it: TENT NVLink copies asynchronously on a non-blocking stream of its own; MNNVL copies synchronously
(legacy default stream) below 128 MiB; TCP stages through synchronous ``cudaMemcpy`` on the legacy stream
(TENT even for host memory, TE when GPU memory is involved). RDMA and SHM make no CUDA calls.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import simpy

from mooncake_protocol import effects as fx
from mooncake_protocol import topology as topo
from mooncake_protocol.fabric import TargetInfo, write_failure
from mooncake_protocol.memory import OFFSET_MASK, OWNER_SHIFT, RID_MASK, RID_SHIFT, split_addr

from .gpu import Op

if TYPE_CHECKING:
    from .driver import SimRank, Simulation
    from .memory import SimRegion

MNNVL_SYNC_LIMIT = 128 << 20
#: how long a WRITE that fails a local check (no path, no handle, unknown address) takes to fail; one to a dead
#: owner takes a refused connection attempt instead (:meth:`Simulation.refused_s`)
FAIL_LATENCY_S = 2e-6
SMALL_PAYLOAD = 64
#: a WRITE's links, by number (:meth:`TransferModel._links`)
Links = tuple[int, ...]


@dataclass
class BatchState:
    statuses: list[str]
    owner: int
    pending: int = 0
    view: tuple[str, ...] | None = None  # the statuses as last handed out, until one changes


@dataclass
class TransferModel:
    sim: Simulation
    batches: dict[int, BatchState] = field(default_factory=dict)
    next_id: int = 1
    #: links (directed edges of the topology, or a GPU's NVLink egress/ingress) by number: flows on each and its
    #: bandwidth (None until a WRITE first asks); a plan holds link numbers, so a WRITE joins and leaves its
    #: links by list index instead of hashing node-name pairs
    link_ids: dict[tuple[str, str], int] = field(default_factory=dict)
    link_names: list[tuple[str, str]] = field(default_factory=list)
    link_flows: list[int] = field(default_factory=list)
    _link_bw: list[float | None] = field(default_factory=list)
    writes: int = 0
    bytes_moved: int = 0
    _routes: dict[tuple[object, ...], tuple[topo.Path | topo.NoPath, Links]] = field(default_factory=dict)
    _threads: dict[int, simpy.Store] = field(default_factory=dict)
    _endpoints: dict[tuple[int, str, int | None], topo.Endpoint] = field(default_factory=dict)
    _plans: dict[tuple[Any, ...], tuple[Any, ...]] = field(default_factory=dict)
    #: the kept plans again, by (rank, source rid, target address >> RID_SHIFT, target owner, transport), with the
    #: target region's bounds: valid while no region is allocated or registered, no rank dies and the plans are
    #: kept (:meth:`regions_changed`, :meth:`forget_plans` clear it), since the key of :meth:`_plan_key` and
    #: the checks before it then give what they gave when the entry was made
    _fast: dict[tuple[int, int, int, int, str], tuple[tuple[Any, ...], int, int]] = field(default_factory=dict)

    def status(self, bid: int) -> tuple[str, ...]:
        b = self.batches.get(bid)
        if b is None:
            return ()
        if b.view is None:  # pollers ask far more often than statuses change
            b.view = tuple(b.statuses)
        return b.view

    def free(self, bid: int) -> None:
        self.batches.pop(bid, None)

    def forget_plans(self) -> None:
        """Drop the kept plans (the calibration in effect changed: they hold its same-host constants)."""
        self._plans.clear()
        self._fast.clear()

    def regions_changed(self) -> None:
        """A region was allocated or registered, or a rank died: what :attr:`_fast` holds may no longer hold."""
        self._fast.clear()

    def endpoint(self, r: SimRank, region: fx.Region) -> topo.Endpoint:
        """Where ``region`` of ``r`` lies in the topology (one object per rank, kind and device: routing every
        pair of ranks on first contact asks twice per pair)."""
        key = (r.env.rank, region.kind, region.device)
        ep = self._endpoints.get(key)
        if ep is None:
            if region.kind == "device":
                ep = topo.Endpoint(r.env.host, "gpu", region.device if region.device is not None else r.env.gpu)
            else:
                ep = topo.Endpoint(r.env.host, "host", None, r.env.numa)
            self._endpoints[key] = ep
        return ep

    def submit(self, r: SimRank, writes: tuple[fx.WriteReq, ...]) -> int:
        """Start a batch. Its WRITEs join their links together and share them fairly (a WRITE's rate is the
        bottleneck over its links of ``bandwidth / flows`` once the whole batch has joined), so WRITEs of one
        batch along the same links land at one instant: one event per landing time, not one per WRITE."""
        bid = self.next_id
        self.next_id += 1
        state = BatchState(["pending"] * len(writes), r.env.rank, len(writes))
        self.batches[bid] = state
        sim = self.sim
        env = sim.env
        flows = self.link_flows
        joined = []
        self.writes += len(writes)
        # the per-WRITE hot path (millions of WRITEs at 512 ranks), one loop without calls per WRITE once the pair
        # is known: its kept plan (_fast, else _plan_key's, else a new one from _plan_static), its payload, its
        # CUDA stream; what is the same for the whole batch is looked up once
        ranks, plans, fast, regions = sim.ranks, self._plans, self._fast, r.regions
        nranks, rank, carry_all = len(ranks), r.env.rank, r.env.data_values
        payloads: dict[tuple[int, int, int], bytes] = {}
        threads = sim.cal.transfer_threads
        for i, w in enumerate(writes):
            addr, o, length = w.dst_addr, w.dst_owner, w.length
            fast_key = (rank, w.src_rid, addr >> RID_SHIFT, o, w.transport)
            hit = fast.get(fast_key)
            if hit is not None and hit[1] <= addr and addr + length <= hit[2]:
                plan: tuple[Any, ...] | str | None = hit[0]
            else:
                plan = None
                if (addr >> OWNER_SHIFT) - 1 == o and 0 <= o < nranks:  # the kept plan (_plan_key), if any
                    owner = ranks[o]
                    dst = owner.regions.get((addr >> RID_SHIFT) & RID_MASK)
                    src = regions.get(w.src_rid)
                    if owner.alive and dst is not None and src is not None and dst.label is not None:
                        dr = dst.region
                        if dr.contains(addr, length):
                            plan = plans.get(self._plan_key(r, src, owner, dst, w.transport))
                            if plan is None:
                                plan = self._plan_static(r, w)
                            if not isinstance(plan, str):
                                fast[fast_key] = (plan, dr.addr, dr.addr + dr.size)
                if plan is None:
                    plan = self._plan_static(r, w)
            if isinstance(plan, str):
                if plan == "peer-dead" and w.transport == "tcp" and sim.still_taking(o):
                    # the dying rank's port still takes the request: it fails at the caller's next probe
                    if threads:
                        self._via_thread(r, (bid, i, w, None, (), 0.0, 0.0))
                    else:
                        self._fail_later(bid, i, plan, sim.cal.dead_peer_check_s or 0.0)
                    continue
                # a dead owner is learnt from a refused connection attempt; the other failures are local checks
                self._fail_later(bid, i, plan, sim.refused_s(r, o) if plan == "peer-dead" else FAIL_LATENCY_S)
                continue
            lat, cap, edges, cuda, in_job = plan
            # sizes mode moves only lengths; small control words (flags) are always carried exactly. Memory does
            # not change during a submit, so WRITEs of one source range (a sync flag to every peer) share a read
            if carry_all or length <= SMALL_PAYLOAD:
                src_range = (w.src_rid, w.src_offset, length)
                payload = payloads.get(src_range)
                if payload is None:
                    payload = payloads[src_range] = regions[w.src_rid].read(w.src_offset, length)
            else:
                payload = b""
            if cuda is not None:
                if cuda == "mnnvl":
                    cuda = "legacy" if length < MNNVL_SYNC_LIMIT else None
                if cuda is not None:
                    # a copy issued through the CUDA runtime starts when its stream gets to it: it joins the
                    # links then, at the rate they have then (queued copies do not share bandwidth yet)
                    self._via_gpu(r, bid, i, w, payload, edges, lat, cap, cuda, in_job)
                    continue
            if threads:
                self._via_thread(r, (bid, i, w, payload, edges, lat, cap))
            else:
                for e in edges:
                    flows[e] += 1
                joined.append((i, w, payload, edges, lat, cap))
        groups: dict[float, list[tuple[int, fx.WriteReq, bytes, Links]]] = defaultdict(list)
        rates: dict[tuple[Links, float], float] = {}
        for i, w, payload, edges, lat, cap in joined:
            rate = rates.get((edges, cap))
            if rate is None:
                rate = rates[(edges, cap)] = self._share(edges, cap)
            groups[lat + w.length / rate].append((i, w, payload, edges))
        for delay, items in groups.items():
            ev = env.timeout(delay)
            ev.callbacks.append(lambda _e, bid=bid, items=items: self._land(bid, items))
        return bid

    def _fail_later(self, bid: int, i: int, failure: str, delay: float) -> None:
        ev = self.sim.env.timeout(delay)
        ev.callbacks.append(lambda _e: self._fail(bid, i, failure))

    def _fail(self, bid: int, i: int, failure: str) -> None:
        b = self.batches.get(bid)
        if b is not None:
            b.statuses[i] = f"failed:{failure}"
            b.view = None
            b.pending -= 1
            self.sim.ranks[b.owner].epoch += 1  # its batch's statuses changed (Simulation.dirty_written)
            self.sim.dirty(b.owner)

    def _land(self, bid: int, items: list[tuple[int, fx.WriteReq, bytes, Links]]) -> None:
        sim = self.sim
        ranks = sim.ranks
        b = self.batches.get(bid)
        if b is not None:
            b.view = None
            b.pending -= len(items)
            ranks[b.owner].epoch += 1  # its batch's statuses change (Simulation.dirty_written)
            statuses = b.statuses
        touched = set()  # the owners to wake, in the order a set of ranks iterates
        written: dict[int, list[tuple[int, int, int]]] = {}  # per owner: the (rid, start, end) ranges written
        failed = False
        flows = self.link_flows
        moved = 0
        for i, w, payload, edges in items:
            for e in edges:
                flows[e] -= 1
            # deliver: into a registered region of a live owner (else the WRITE fails)
            o, addr = w.dst_owner, w.dst_addr
            owner = ranks[o]
            region = owner.regions.get((addr >> RID_SHIFT) & RID_MASK) if owner.alive else None
            if region is None:
                if b is not None:
                    statuses[i] = "failed:peer-dead"
                    failed = True
                continue
            if payload:  # a length-only WRITE (sizes mode) changes no byte the owner could be waiting on
                start = addr & OFFSET_MASK
                region.land(start, payload)  # reported to the driver below (dirty_written)
                touched.add(o)
                rng = ((addr >> RID_SHIFT) & RID_MASK, start, start + len(payload))
                if o in written:
                    written[o].append(rng)
                else:
                    written[o] = [rng]
            moved += w.length
            if b is not None:
                statuses[i] = "completed"
        self.bytes_moved += moved
        # the submitter's waits look at whole batches: wake it when the batch has settled or something failed
        if b is not None and (b.pending <= 0 or failed):
            sim.dirty(b.owner)
        sim.dirty_written(touched, written)

    def _route(self, r: SimRank, src: fx.Region, owner: SimRank, dst: fx.Region, transport: str) -> tuple[topo.Path | topo.NoPath, Links]:
        """The topology path of a WRITE and the directed resources it occupies (static: cached)."""
        key = (r.env.rank, src.kind, src.device, owner.env.rank, dst.kind, dst.device, transport)
        hit = self._routes.get(key)
        if hit is None:
            p = topo.path(self.sim.topology, self.endpoint(r, src), self.endpoint(owner, dst), transport)
            edges: Links = ()
            if isinstance(p, topo.Path):
                if transport in ("nvlink", "mnnvl") and p.hops and self._is_nvlink_edge(p.hops[0]):
                    # a GPU's NVLink ports act as one pipe per direction (18 links over the switches): the
                    # shared resources are the sender's egress and the receiver's ingress, each at the
                    # path's bandwidth
                    edges = self._links(((p.hops[0][0], "nvlink-out"), ("nvlink-in", p.hops[-1][1])))
                else:
                    edges = self._links(p.hops)  # directed: links are full duplex, each direction has its own bandwidth
            hit = self._routes[key] = (p, edges)
        return hit

    def _is_nvlink_edge(self, hop: tuple[str, str]) -> bool:
        """Whether a route's first hop is an NVLink (or NVSwitch) link: a CUDA IPC copy between GPUs without one
        crosses PCIe, whose links (and the socket link between NUMA nodes) are shared as they are."""
        edges = self.sim.topology.graph.edges
        return hop in edges and edges[hop]["cls"] in ("nvlink", "mnnvl")

    @staticmethod
    def _plan_key(r: SimRank, src: SimRegion, owner: SimRank, dst: SimRegion, transport: str) -> tuple[Any, ...]:
        """What a WRITE's plan is kept under.

        Whether and how a WRITE into a registered region of a live rank goes depends only on the two ranks,
        the kinds and devices of the two regions, the target's handles and the transport: a successful plan
        is kept under exactly those; per WRITE the target range, the payload and MNNVL's size rule are looked
        at again. Anything else (a dead or unknown owner, an unregistered target, a failure) takes the full
        path, :meth:`_plan_static`."""
        sr, dr = src.region, dst.region
        return (r.env.rank, sr.kind, sr.device, owner.env.rank, dr.kind, dr.device, dst.ipc_handle, dst.fabric_handle,
                transport)

    def _plan_static(self, r: SimRank, w: fx.WriteReq) -> tuple[Any, ...] | str:
        """The failure of a WRITE, or its (latency, bandwidth, links, CUDA stream or "mnnvl") plan, then kept."""
        sim = self.sim
        parts = split_addr(w.dst_addr)
        if parts.owner != w.dst_owner or not 0 <= w.dst_owner < len(sim.ranks):
            return "address-not-found"
        owner = sim.ranks[w.dst_owner]
        if not owner.alive:
            return "peer-dead"
        for f in r.env.faults:
            if f.kind == "block_direction" and tuple(f.ranks) == (r.env.rank, w.dst_owner):
                return "blocked-direction"
        dst = owner.regions.get(parts.rid)
        target = None
        if dst is not None and dst.label is not None and dst.region.contains(w.dst_addr, w.length):
            target = TargetInfo(dst.region.kind, dst.ipc_handle, dst.fabric_handle)
        src = r.regions[w.src_rid]
        p: topo.Path | topo.NoPath | None = None
        edges: Links = ()
        if target is not None and dst is not None:
            p, edges = self._route(r, src.region, owner, dst.region, w.transport)
        path_reason = p.reason if isinstance(p, topo.NoPath) else None
        failure = write_failure(w.transport, target, r.env.host == owner.env.host, path_reason)
        if failure is not None or not isinstance(p, topo.Path):
            return failure or "no-path"
        cap = p.bandwidth_Bps
        if w.transport == "rdma":
            lat = p.latency_s + sim.rdma_overhead_s
        else:
            lat = p.latency_s
        cal = sim.cal  # measured same-host TCP/SHM WRITEs replace the topology's link classes
        if w.transport in ("tcp", "shm") and r.env.host == owner.env.host:
            c_lat = getattr(cal, f"{w.transport}_latency_s")
            c_bw = getattr(cal, f"{w.transport}_bandwidth_Bps")
            lat = lat if c_lat is None else c_lat
            cap = cap if not c_bw else c_bw
        in_job = False  # the latency was measured inside a job: it holds the copy's time-slice waits already
        if (w.transport == "nvlink" and cal.nvlink_same_gpu_s is not None
                and self.endpoint(r, src.region) == self.endpoint(owner, dst.region)):
            lat = cal.nvlink_same_gpu_s  # measured in a job whose ranks share one GPU (docs/parity.md)
            in_job = True
        cuda = None  # which stream the CUDA call goes to; "mnnvl": decided by the WRITE's size
        if r.env.backend == "cuda" and r.env.cuda_platform:
            if w.transport == "nvlink":
                cuda = "transfer"
            elif w.transport == "mnnvl":
                cuda = "mnnvl"
            elif w.transport == "tcp" and (r.env.engine == "tent" or src.region.kind == "device"):
                cuda = "legacy"
        assert dst is not None
        plan = self._plans[self._plan_key(r, src, owner, dst, w.transport)] = (lat, cap, edges, cuda, in_job)
        return plan

    def _links(self, hops: Iterable[tuple[str, str]]) -> Links:
        """The numbers of directed links ``hops`` (numbered on first sight)."""
        out = []
        for e in hops:
            i = self.link_ids.get(e)
            if i is None:
                i = self.link_ids[e] = len(self.link_names)
                self.link_names.append(e)
                self.link_flows.append(0)
                self._link_bw.append(None)
            out.append(i)
        return tuple(out)

    def _share(self, edges: Links, cap: float) -> float:
        """The fair share of a flow already counted on ``edges``: the bottleneck of ``bandwidth / flows``. A
        link's bandwidth is the topology edge's, or (a GPU's NVLink pipe) the path's of the first WRITE on it."""
        rate = cap
        flows, link_bw = self.link_flows, self._link_bw
        for e in edges:
            bw = link_bw[e]
            if bw is None:
                name = self.link_names[e]
                graph_edges = self.sim.topology.graph.edges
                bw = link_bw[e] = graph_edges[name]["bandwidth_Bps"] if name in graph_edges else cap
            f = flows[e]
            share = bw / (f if f > 1 else 1)
            if share < rate:  # min(rate, bw / max(1, flows)), without two builtin calls
                rate = share
        return rate

    def _via_thread(self, r: SimRank, item: tuple[int, int, fx.WriteReq, bytes | None, Links, float, float]) -> None:
        """Calibrated: the real engine runs a rank's WRITEs one at a time on its transfer thread, on a CPU of
        the host (``host_cpus``) for the WRITE's whole duration."""
        q = self._threads.get(r.env.rank)
        if q is None:
            q = self._threads[r.env.rank] = simpy.Store(self.sim.env)
            self.sim.env.process(self._thread(r, q))
        q.put(item)

    def _thread(self, r: SimRank, q: simpy.Store) -> Generator[simpy.Event, Any, None]:
        env = self.sim.env
        while True:
            bid, i, w, payload, edges, lat, cap = yield q.get()
            if payload is None or (w.transport == "tcp" and self.sim.still_taking(w.dst_owner)):
                # sent to a rank that had just died (still_taking, at submit or now): no answer until the probe
                yield env.timeout(self.sim.cal.dead_peer_check_s or 0.0)
                self._fail(bid, i, "peer-dead")
                continue
            t0 = env.now
            duration = self._start_flow(edges, lat, cap, w.length)
            if w.transport == "tcp":  # the TCP transport is an RPC: its first WRITE to a server connects
                duration += self.sim.connect_cost(r.env.rank, "transfer", w.dst_server)
            duration *= r.speed
            with self.sim.host_cpu(r.env.host).request() as cpu:
                yield cpu
                yield env.timeout(duration)
            if w.transport == "tcp" and 0 <= w.dst_owner < len(self.sim.ranks):  # the __write__ RPC in flight
                yield from self.sim.notice_dead(self.sim.ranks[w.dst_owner], t0)
            self._land(bid, [(i, w, payload, edges)])

    def _start_flow(self, edges: Links, lat: float, cap: float, length: int) -> float:
        """One WRITE joins its links now: its duration at the share it gets."""
        for e in edges:
            self.link_flows[e] += 1
        return lat + length / self._share(edges, cap)

    def _via_gpu(self, r: SimRank, bid: int, i: int, w: fx.WriteReq, payload: bytes,
                 edges: Links, lat: float, cap: float, stream: str, in_job: bool = False) -> None:
        ctx = self.sim.gpu.context(r.env.rank)
        # NVLink/MNNVL copies go GPU to GPU (device to device: SM work, which waits for its context's time slice);
        # TCP staging copies go to host memory; a copy whose latency was measured inside a job (``in_job``:
        # nvlink_same_gpu_s) holds its waits already
        op = Op("memcpy", stream, 0.0, f"{w.transport} copy of {w.length} B to rank {w.dst_rank} (engine)",
                sm=w.transport in ("nvlink", "mnnvl") and not in_job)

        peer = w.transport == "nvlink" and w.dst_owner != r.env.rank

        def start() -> None:
            op.duration = self._start_flow(edges, lat, cap, w.length)
            if peer:  # calibrated: the real engine fetches a peer's IPC handle by RPC at its first WRITE there
                # and opens it (ipc_open_s, measured over such WRITEs: some opened the transfer thread's
                # connection to that server too); a TCP WRITE to the server after it finds the connection open
                self.sim.connected.add((r.env.rank, "transfer", w.dst_server))
                op.duration += self.sim.connect_cost(r.env.rank, "transfer", f"ipc:{w.dst_server}",
                                                     self.sim.cal.ipc_open_s or 0.0) * r.speed
            elif w.transport == "tcp":  # the TCP transport is an RPC (its copy staged through the GPU here):
                # the first WRITE to a server opens the transfer thread's connection, as on the thread path
                op.duration += self.sim.connect_cost(r.env.rank, "transfer", w.dst_server) * r.speed

        op.on_start = start
        op.on_done = lambda: self._land(bid, [(i, w, payload, edges)])
        ctx.enqueue(op)
