"""The SimPy driver: runs every rank's protocol activities as SimPy processes and interprets effects.

Rules: no protocol decision is made here. Each effect is interpreted against a model (store server,
network and port tables, transfers, GPU) in its own module; this file only dispatches, records the trace
and watches for hangs. A run always ends: when every rank's caller has finished, at the scenario's
deadline, or when no protocol progress (a non-noise mark) happened for the stall window.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

import simpy

from mooncake_protocol import effects as fx
from mooncake_protocol import topology as topo
from mooncake_protocol.errors import ProtocolError
from mooncake_protocol.memory import split_addr
from mooncake_protocol.outcome import RunRecord
from mooncake_protocol.rank import rank_main
from mooncake_protocol.rankenv import RankEnv, make_rank_envs
from mooncake_protocol.trace import NOISE_MARKS, PHASES, Blocked, describe_wait, effect_record, mark_record

from .gpu import ASYNC_CALL_S, KERNEL_LAUNCH_S, MODULE_LOAD_S, GpuModel, Op
from .memory import SimRegion
from .network import FOREIGN, RPC_SERVICE_S, Network
from .store import StoreServer
from .transfers import TransferModel

SimGen = Generator[simpy.Event, Any, Any]


@dataclass
class Calibration:
    """Timing constants the simulator takes from a calibration file (``mooncake-real calibrate``)."""

    store_service_s: float = 5e-6
    store_one_way_s: float | None = None  # None: from the topology
    rpc_service_s: float = RPC_SERVICE_S
    rpc_one_way_s: float | None = None
    effect_cpu_s: float = 0.0  # host CPU cost charged per effect, marks excepted (Python-level drivers are
    #                            slower; a mark's own time is in the step of the effect before it)
    rdma_overhead_s: float = 0.0
    # The fields below default to "not calibrated": the simulator then behaves exactly as without a file.
    alloc_s: float = 0.0  # extra host CPU per Allocate (real mode: create, size and map a /dev/shm segment)
    register_s: float = 0.0  # extra host CPU per Register (real mode: rewrite the region registry)
    host_cpus: float | None = None  # CPU cores a host's ranks share for the costs above (None: unlimited);
    #                                 a rank's own activities never overlap (one interpreter lock per rank)
    tcp_latency_s: float | None = None  # a same-host TCP WRITE: latency and bandwidth instead of the
    tcp_bandwidth_Bps: float | None = None  # topology's loopback link class
    shm_latency_s: float | None = None  # a SHM WRITE: instead of the topology's shm link class
    shm_bandwidth_Bps: float | None = None
    module_load_s: float | None = None  # a CUDA module load (gpu.MODULE_LOAD_S)
    kernel_launch_s: float | None = None  # host cost of a kernel launch (gpu.KERNEL_LAUNCH_S)
    poll_overshoot_s: float | None = None  # a polling wait's sleep lasts this much longer than asked (and a
    #                                        Sleep too); None: waits notice a change at once
    poll_cap_s: float | None = None  # the real driver's longest poll sleep (WAIT_POLL_MAX_S)
    transfer_threads: float | None = None  # set: a rank's non-CUDA WRITEs run one at a time on its transfer
    #                                        thread, each on a host CPU (real mode); None: all concurrent
    rpc_connect_s: float | None = None  # a thread's first RPC (or TCP WRITE) to a server also opens the
    #                                     connection: this much longer; None: connections are free
    store_connect_s: float | None = None  # a thread's first store request also opens its store connection: this
    #                                       much longer (the caller's is open from t=0: real mode connects it
    #                                       for the start barrier); None: connections are free
    thread_start_s: float | None = None  # extra host CPU per Spawn and RpcServe (real mode starts a thread)
    dead_peer_check_s: float | None = None  # an RPC (or TCP WRITE) whose server dies before answering fails at
    #                                         the caller's next port probe, this often from the call (the real
    #                                         driver's zmq client); None: at once
    dead_notice_s: float | None = None  # a rank's port keeps taking requests this long after it is killed (the
    #                                     process is still being torn down): a TCP WRITE to it sent then goes
    #                                     out and fails only at the next probe, dead_peer_check_s later
    #                                     (the real zmq client); None: a WRITE after the death fails at once
    rank_spread: float | None = None  # how much ranks of one job differ in speed, phase by phase (coefficient
    #                                   of variation of their bootstrap times inside a real job); None: all alike
    gpu_timeslice_s: float | None = None  # the time slice of processes sharing a GPU (gpu.py, "Time-slicing");
    #                                       None: their SM work never waits for one another
    first_kernel_s: float | None = None  # a process's first kernel (its first module load or launch) costs this
    #                                      much host time more: CuPy sets up its compiler and kernel cache
    #                                      then; None: no such cost
    nvlink_same_gpu_s: float | None = None  # an NVLink (CUDA IPC) WRITE between two processes on one GPU, as
    #                                         measured inside a real job (copy and synchronise on the transfer
    #                                         thread, time-slice waits included): its latency instead of the
    #                                         topology's; None: the topology's NVLink path
    ipc_open_s: float | None = None  # a rank's first NVLink WRITE to another rank's memory also fetches (by RPC)
    #                                  and opens that rank's CUDA IPC handle: this much longer, once per peer
    #                                  (measured inside a CUDA job, the RPC connection's opening included
    #                                  where that WRITE opened it); None: no such cost
    host_copy_Bps: float | None = None  # a ReadMem or WriteMem also costs host CPU per byte at this rate (real
    #                                     mode copies to and from shared memory; a large tensor's chunks make
    #                                     that most of a CPU collective); None: copies are free
    host_reduce_Bps: float | None = None  # the CPU backend's reduce (HostCompute "reduce") costs host CPU per
    #                                       byte of the slices it reads at this rate; None: free
    host_fill_Bps: float | None = None  # building a collective's input values (HostCompute "fill"), per byte
    host_decode_Bps: float | None = None  # turning its output into the trace's values (HostCompute "decode")
    #: constants measured inside real jobs of N ranks on one host (``sim_by_ranks`` of the file): a run
    #: uses them, interpolated at its own ranks per host (:meth:`for_ranks`), instead of the fields above
    by_ranks: dict[int, dict[str, float | None]] = field(default_factory=dict)
    #: the same, measured inside real jobs of CUDA ranks sharing a GPU (``sim_cuda_by_ranks``): a run with the
    #: cuda backend uses them on top of ``by_ranks``
    cuda_by_ranks: dict[int, dict[str, float | None]] = field(default_factory=dict)

    @staticmethod
    def from_dict(d: dict[str, Any], by_ranks: dict[Any, dict[str, Any]] | None = None,
                  cuda_by_ranks: dict[Any, dict[str, Any]] | None = None) -> Calibration:
        c = Calibration()
        for k, v in d.items():
            if k in CONSTANTS:
                setattr(c, k, float(v) if v is not None else None)
        c.by_ranks, c.cuda_by_ranks = (
            {int(n): {k: (float(v) if v is not None else None) for k, v in part.items()} for n, part in (t or {}).items()}
            for t in (by_ranks, cuda_by_ranks))
        return c

    def for_ranks(self, n: int, backend: str = "cpu") -> Calibration:
        """These constants for a host running ``n`` ranks: ``by_ranks`` (then, for the cuda ``backend``,
        ``cuda_by_ranks``) interpolated linearly between the two measured rank counts around ``n``
        (extrapolated from the nearest two outside them, never below 0); a constant that one point leaves
        unset (None) takes the other's value."""
        tables = [t for t in (self.by_ranks, self.cuda_by_ranks if backend == "cuda" else {}) if t]
        if not tables:
            return self
        out = dataclasses.replace(self, by_ranks={}, cuda_by_ranks={})
        for table in tables:
            out = dataclasses.replace(out, **self._at(table, n))
        return out

    def _at(self, table: dict[int, dict[str, float | None]], n: int) -> dict[str, Any]:
        """The constants of ``table`` interpolated at ``n`` ranks (:meth:`for_ranks`)."""
        pts = sorted(table)
        if len(pts) == 1:
            lo = hi = pts[0]
        elif n <= pts[0]:
            lo, hi = pts[0], pts[1]
        elif n >= pts[-1]:
            lo, hi = pts[-2], pts[-1]
        else:
            lo = max(p for p in pts if p <= n)
            hi = min(p for p in pts if p >= n)
        a, b = table[lo], table[hi]
        w = 0.0 if hi == lo else (n - lo) / (hi - lo)
        out: dict[str, Any] = {}
        for k in set(a) | set(b):
            x, y = a.get(k), b.get(k)
            if x is None or y is None:
                out[k] = x if y is None else y
            else:
                out[k] = max(0.0, x + (y - x) * w)
        return {k: v for k, v in out.items() if k in CONSTANTS}


#: The fields of :class:`Calibration` that hold per-rank-count tables, not constants.
TABLES = ("by_ranks", "cuda_by_ranks")
#: The fields of :class:`Calibration` that are constants (what a calibration file's ``sim`` section and
#: each of its per-rank-count parts may set).
CONSTANTS = tuple(f.name for f in dataclasses.fields(Calibration) if f.name not in TABLES)


@dataclass
class Act:
    rank: int
    name: str
    handle: int
    daemon: bool
    current: fx.Effect | None = None
    since: float = 0.0
    done: bool = False
    result: Any = None
    finished: simpy.Process | None = None  # triggers when the activity ends, with its result


@dataclass
class Waiter:
    effect: fx.WaitUntil
    event: simpy.Event
    t0: float = 0.0
    tick: float = 0.0  # calibrated: the real driver re-checks the predicate every ``tick`` from ``t0``
    #: what the predicate's last evaluation (which said no) read of the rank's memory, as (rid, start, end)
    #: ranges, and the rank's epoch then; None: not known (never evaluated, or it read what the driver does
    #: not follow), so any change re-evaluates it (:meth:`Simulation.dirty_written`)
    reads: list[tuple[int, int, int]] | None = None
    epoch: int = -1


class Reader:
    """The :class:`mooncake_protocol.effects.MemoryReader` of one rank.

    While ``log`` is a list, it records what a predicate reads (:meth:`Simulation._evaluate`): memory ranges,
    and whether it read anything else than this rank's memory and the statuses of this rank's batches
    (``foreign``)."""

    def __init__(self, sim: Simulation, rank: SimRank):
        self.sim = sim
        self.rank = rank
        self.log: list[tuple[int, int, int]] | None = None
        self.foreign = False

    def read(self, rid: int, offset: int, length: int) -> bytes:
        log = self.log
        if log is not None:
            log.append((rid, offset, offset + length))
        return self.rank.regions[rid].read(offset, length)

    def status(self, batch: int) -> tuple[str, ...]:
        transfers = self.sim.transfers
        if self.log is not None:
            # a batch's statuses change only in the transfer model, which then bumps its owner's epoch; a freed
            # batch stays gone (ids are never reused); another rank's batch or one not yet made is not followed
            b = transfers.batches.get(batch)
            if (b.owner != self.rank.env.rank) if b is not None else batch >= transfers.next_id:
                self.foreign = True
        return transfers.status(batch)


#: Two chunk intervals count as one steady period when they differ by at most this fraction.
FF_TOLERANCE = 1e-3
#: Marks after which the simulator no longer fast-forwards (the run is not in a clean steady state).
ANOMALY_MARKS = frozenset({"transfer_failed", "peer_marked_broken", "stale_task_poll", "transport_unspec",
                           "slot_exhausted", "error", "crossed_endpoints", "unwarmed_direction", "unsupported_reduce"})


@dataclass
class FastForward:
    """A fast-forward barrier: who arrived when, and the decided period (0.0 = no skip)."""

    decided: simpy.Event
    arrived: dict[int, float] = field(default_factory=dict)
    counted: bool = False


@dataclass
class SimRank:
    env: RankEnv
    alive: bool = True
    acts: dict[int, Act] = field(default_factory=dict)
    regions: dict[int, SimRegion] = field(default_factory=dict)
    waiters: list[Waiter] = field(default_factory=list)
    phase: str = "bootstrap"
    phase_t: dict[str, float] = field(default_factory=dict)
    error: ProtocolError | None = None
    paused_until: float = 0.0
    reader: Reader | None = None
    rpc_port: int | None = None
    batches: set[int] = field(default_factory=set)
    done_times: deque[float] = field(default_factory=lambda: deque(maxlen=3))  # last task completions
    caller: int | None = None  # handle of the rank's main activity
    died_at: float | None = None  # simulated time of a kill
    speed: float = 1.0  # calibrated rank_spread: this rank's factor on its host costs in its current phase
    #: bumped whenever anything a WaitUntil predicate of this rank may look at can have changed, except a WRITE
    #: landing in its memory: its activities run (its protocol state), its RPC handler runs, its memory is
    #: written otherwise (SimRegion.write/fill), a batch of its changes status (:meth:`Simulation.dirty_written`)
    epoch: int = 0


RunResult = RunRecord

#: The store server's name among :attr:`Simulation.connected`'s targets (an RPC target is "host:port").
STORE_SERVER = "store"

#: The store's effects (one request each to the store server).
_STORE_EFFECTS = (fx.StoreSet, fx.StoreGet, fx.StoreCheck, fx.StoreDelete, fx.StoreAdd, fx.StoreWait)

#: Effects whose interpretation never lets simulated time pass (no SimPy event is awaited).
_INSTANT_EFFECTS: frozenset[type] = frozenset({
    fx.Mark, fx.Now, fx.Allocate, fx.Register, fx.ReadMem, fx.WriteMem, fx.RpcBind, fx.RpcServe,
    fx.SubmitTransfer, fx.PollTransfer, fx.FreeBatch, fx.Spawn, fx.Memset, fx.EventRecord, fx.EventQuery,
})


class Simulation:
    def __init__(self, scenario: Any, *, record_effects: bool = False, calibration: Calibration | None = None,
                 progress: Callable[[str], None] | None = None, progress_every_s: float = 5.0,
                 fast_forward: bool = True, spread_seed: int = 0):
        self.scenario = scenario
        self.spread_seed = spread_seed
        self.topology: topo.Topology = scenario.topology
        self.envs = make_rank_envs(scenario)
        per_host = Counter(e.host for e in self.envs)
        self._cal_src = calibration or Calibration()
        self._cal_n = max(per_host.values(), default=1)
        self._cal_at: dict[int, Calibration] = {}
        self.cal = self._cal_for(self._cal_n)
        self.env = simpy.Environment()
        self.ranks = [SimRank(e) for e in self.envs]
        for r in self.ranks:
            r.reader = Reader(self, r)
        self.record_effects = record_effects
        self.progress = progress
        self.progress_every_s = progress_every_s
        self._wall0 = self._last_report = time.perf_counter()
        #: (last progress, effects, simulated and wall time) at the last progress line
        self._progress_seen: tuple[float, int, float, float] | None = None
        self.marks: list[dict[str, Any]] = []
        self.effects: list[dict[str, Any]] = []
        self.network = Network(self.topology)
        delay = sum(float(f.seconds) for f in scenario.faults if f.kind == "delay_store")
        self.store = StoreServer(self.env, self.cal.store_service_s, delay)
        self.store_host = self.envs[0].host if self.envs else ""
        self.transfers = TransferModel(self)
        self.gpu = GpuModel(self.env, self.dirty, lambda rank: (self.envs[rank].host, self.envs[rank].gpu),
                            seed=f"{scenario.seed}:{spread_seed}", speed_of=lambda rank: self.ranks[rank].speed)
        self.next_handle = 1
        self.last_progress = 0.0
        self.effect_count = 0
        self.connected: set[tuple[int, str, str]] = set()  # (rank, thread, server) with an open connection
        self.stop = self.env.event()
        self.killed: list[int] = []
        self.fast_forward = fast_forward
        self.ff_barriers: dict[tuple[int, int], FastForward] = {}
        self.ff_skipped = 0
        self.anomalies = 0
        self._apply_cal()
        self.cpus: dict[str, simpy.Resource] = {}
        self.gils: dict[int, simpy.Resource] = {}
        self._instant = self._instant_table()
        self._timed = self._timed_table()
        for f in scenario.faults:
            if f.kind == "hold_port":
                self.network.hold(f.host, int(f.port), FOREIGN)

    # ------------------------------------------------------------------ plumbing

    def _cal_for(self, n: int) -> Calibration:
        cal = self._cal_at.get(n)
        if cal is None:
            cal = self._cal_at[n] = self._cal_src.for_ranks(n, self.scenario.backend)
        return cal

    def _apply_cal(self) -> None:
        """Derive what the models keep of ``self.cal``."""
        cal = self.cal
        self.rdma_overhead_s = cal.rdma_overhead_s
        self.gpu.module_load_s = MODULE_LOAD_S if cal.module_load_s is None else cal.module_load_s
        self.gpu.first_kernel_s = cal.first_kernel_s or 0.0
        self.gpu.timeslice_s = cal.gpu_timeslice_s
        start = cal.thread_start_s or 0.0
        self.cpu_cost = {fx.Allocate: cal.alloc_s, fx.Register: cal.register_s, fx.Spawn: start, fx.RpcServe: start}
        self.transfers.forget_plans()  # plans hold same-host TCP/SHM constants

    def _running_changed(self) -> None:
        """Costs measured inside real jobs (``by_ranks``) follow the ranks that run, not the job's size: while
        some ranks of a host are paused or dead, the others share its CPUs with fewer processes (a real
        paused rank sleeps; a dead one is gone). Re-pick the constants for the most ranks running on one
        host now; a run without per-rank-count tables keeps its constants."""
        if not (self._cal_src.by_ranks or self._cal_src.cuda_by_ranks):
            return
        now = self.env.now
        running = Counter(r.env.host for r in self.ranks if r.alive and r.paused_until <= now)
        n = max(running.values(), default=1)
        if n != self._cal_n:
            self._cal_n = n
            self.cal = self._cal_for(n)
            self._apply_cal()

    def _report_progress(self) -> None:
        """A line for a long run, at most every ``progress_every_s`` of wall time."""
        now = time.perf_counter()
        if self.progress is None or now - self._last_report < self.progress_every_s:
            return
        self._last_report = now
        alive = [r for r in self.ranks if r.alive]
        slowest = min((r.phase for r in alive), key=PHASES.index, default="-")
        line = (f"... {self.env.now:.4f} s simulated, {self.effect_count:,} effects, "
                f"{now - self._wall0:.0f} s wall; slowest rank in phase {slowest}")
        # No progress mark since the last line, over many effects: something spins (a WRITE that fails and is
        # resubmitted at once, forever, as TENT did at the snapshot). Uncalibrated, a pass costs no simulated
        # time but the transfer's failure latency, so the stall window takes millions of passes to run out.
        seen = self._progress_seen
        if seen is None or seen[0] != self.last_progress:
            self._progress_seen = (self.last_progress, self.effect_count, self.env.now, now)
        elif self.effect_count - seen[1] >= 100_000:
            ends = self.last_progress + self.scenario.deadlines.stall_s
            pace = (self.env.now - seen[2]) / max(now - seen[3], 1e-9)  # simulated seconds per wall second
            wall_left = (ends - self.env.now) / pace if pace > 0 else None
            left = "" if wall_left is None else (f", about {wall_left / 60:.0f} min at this pace" if wall_left >= 120
                                                 else f", about {wall_left:.0f} s at this pace")
            line += (f"; no progress mark since {self.last_progress:.4f} s simulated ({self.effect_count - seen[1]:,}+ "
                     f"effects): a busy loop? The stall window (deadlines.stall_s) ends at {ends:.4f} s{left}"
                     + ("" if self.cal.effect_cpu_s else "; uncalibrated, a pass costs no host time: --calibration "
                                                          "FILE, or a smaller stall_s, ends it sooner"))
        self.progress(line)

    @staticmethod
    def _evaluate(r: SimRank, w: Waiter, reader: Reader) -> Any:
        """``w``'s predicate now; a "no" keeps what it read and the rank's epoch (:meth:`dirty_written`)."""
        reads: list[tuple[int, int, int]] = []
        reader.log, reader.foreign = reads, False
        try:
            ok = w.effect.predicate(reader)
        finally:
            reader.log = None
        if not ok:
            w.reads = None if reader.foreign else reads
            w.epoch = r.epoch
        return ok

    def dirty(self, rank: int) -> None:
        """Something of ``rank`` may have changed: re-check its waiters."""
        r = self.ranks[rank]
        waiters, reader = r.waiters, r.reader
        if not waiters or reader is None:
            return
        evaluate = self._evaluate
        still: list[Waiter] | None = None  # built only once some waiter leaves (most calls change nothing)
        for i, w in enumerate(waiters):
            if not w.event.triggered and not evaluate(r, w, reader):
                if still is not None:
                    still.append(w)
                continue
            if still is None:
                still = waiters[:i]
            if w.event.triggered:
                continue
            if w.tick:
                # a polling driver sees it at its next check: t0 + k * tick
                k = max(1, math.ceil((self.env.now - w.t0) / w.tick - 1e-9))
                at = w.t0 + k * w.tick
                if at > self.env.now:
                    t = self.env.timeout(at - self.env.now)
                    t.callbacks.append(lambda _e, ev=w.event: None if ev.triggered else ev.succeed(True))
                    continue
            w.event.succeed(True)
        if still is not None:
            r.waiters = still

    def dirty_written(self, ranks: Iterable[int], written: dict[int, list[tuple[int, int, int]]]) -> None:
        """WRITEs landed in the memory of ``ranks`` (in this order), at the (rid, start, end) ranges ``written``
        of each, and nothing else changed: :meth:`dirty` for each rank, without evaluating predicates whose
        answer cannot have changed.

        A predicate is a function of its rank's state only (protocol objects, memory, its batches' statuses).
        When its last evaluation said no, the rank's epoch has not moved since (nothing else of the rank
        changed) and no range written since overlaps what it read, it would say no again. Every landing is
        followed by a call of this method with its ranges, so the ranges of this call are all that was written
        since the last evaluation of a waiter it skips. A WRITE of a sync flag to a rank that waits for another
        peer's flag is then not a walk over its task table and peers. Any other case is :meth:`dirty`."""
        unchanged = self._unchanged
        for rank in ranks:
            r = self.ranks[rank]
            waiters = r.waiters
            if not waiters or r.reader is None:
                continue
            epoch, ranges = r.epoch, written[rank]
            for w in waiters:
                if not unchanged(w, epoch, ranges):
                    self.dirty(rank)
                    break

    @staticmethod
    def _unchanged(w: Waiter, epoch: int, ranges: list[tuple[int, int, int]]) -> bool:
        """Whether ``w``'s predicate would say no again (:meth:`dirty_written`)."""
        reads = w.reads
        if reads is None or w.epoch != epoch or w.event.triggered:
            return False
        for rid, lo, hi in reads:
            for wrid, wlo, whi in ranges:
                if rid == wrid and lo < whi and wlo < hi:
                    return False
        return True

    def _poll_tick(self, poll_s: float) -> float:
        """The period at which the real driver re-checks a ``WaitUntil`` (0.0: uncalibrated, notice at once):
        it sleeps ``min(poll_s, poll_cap_s)`` and each sleep overshoots by ``poll_overshoot_s``."""
        over = self.cal.poll_overshoot_s
        if over is None:
            return 0.0
        cap = self.cal.poll_cap_s or poll_s
        return min(poll_s, cap) + over

    def spawn(self, rank: SimRank, name: str, gen: fx.Activity, daemon: bool) -> Act:
        act = Act(rank.env.rank, name, self.next_handle, daemon)
        self.next_handle += 1
        rank.acts[act.handle] = act
        # the SimPy process is itself the event of the activity's end (value: its result), for Join
        act.finished = self.env.process(self._run_activity(rank, act, gen))
        return act

    def _run_activity(self, r: SimRank, act: Act, gen: fx.Activity) -> SimGen:
        result: Any = None
        error: BaseException | None = None
        # Waiters are re-checked (dirty) after this activity's effects, but only once per run of effects
        # that complete without simulated time passing: nobody else runs in between, so re-checking before
        # the activity suspends (or ends) sees the same state as re-checking after every effect.
        pending_dirty = False
        coalesce = not (self.cal.effect_cpu_s or any(self.cpu_cost.values()) or self.cal.host_copy_Bps)
        env, instants, timed, rank = self.env, self._instant, self._timed, r.env.rank  # the hot loop: locals
        progress, record = self.progress is not None, self.record_effects  # both fixed for the run
        while True:
            if not r.alive:
                break
            if r.paused_until and r.paused_until > env.now:  # (0.0: never paused, and time is never negative)
                if pending_dirty:
                    pending_dirty = False
                    self.dirty(rank)
                yield env.timeout(r.paused_until - env.now)
            r.epoch += 1  # the rank's protocol state may change (dirty_written)
            try:
                eff = gen.throw(error) if error is not None else gen.send(result)
            except StopIteration as stop:
                act.result = stop.value
                break
            except ProtocolError as exc:
                r.error = exc
                self._mark(r, act, fx.mark("error", text=str(exc), cause=exc.cause))
                break
            error = None
            instant = instants.get(type(eff))
            if pending_dirty and instant is None and type(eff) not in _INSTANT_EFFECTS:
                pending_dirty = False
                self.dirty(rank)
            act.current = eff
            act.since = t0 = env.now
            try:
                if instant is not None:
                    result = instant(r, act, eff)
                else:
                    result = yield from (timed.get(type(eff)) or self.interpret)(r, act, eff)
            except ProtocolError as exc:  # an effect can fail in a way the protocol must see
                error = exc
                result = None
            self.effect_count += 1
            if progress and not self.effect_count % 20000:
                self._report_progress()
            if not coalesce and type(eff) is not fx.Mark:
                # a mark costs nothing of its own: calibrate measures each effect's step up to the activity's
                # next effect, so what the real driver spends on a mark is in the effect before it already
                cost = self.cal.effect_cpu_s + self.cpu_cost.get(type(eff), 0.0)
                copy_Bps = self.cal.host_copy_Bps
                if copy_Bps:  # real mode copies a ReadMem's or WriteMem's bytes to or from shared memory
                    if type(eff) is fx.ReadMem:
                        cost += eff.length / copy_Bps
                    elif type(eff) is fx.WriteMem:
                        cost += len(eff.data) / copy_Bps
                yield from self._cpu(r, cost)
            if record and not isinstance(eff, fx.Mark):
                self.effects.append(effect_record(r.env.rank, act.name, t0, self.env.now, eff, result))
            act.current = None
            if coalesce:
                pending_dirty = True
            else:
                self.dirty(r.env.rank)
        if pending_dirty:
            self.dirty(r.env.rank)
        act.done = True
        if act.name == "caller":
            self._check_all_done()
        return act.result

    def host_cpu(self, host: str) -> simpy.Resource:
        """The host's CPU cores (calibration ``host_cpus``; unlimited capacity without it)."""
        cpu = self.cpus.get(host)
        if cpu is None:
            cap = max(1, int(self.cal.host_cpus)) if self.cal.host_cpus else 1 << 30
            cpu = self.cpus[host] = simpy.Resource(self.env, capacity=cap)
        return cpu

    def _cpu(self, r: SimRank, cost: float) -> SimGen:
        """Charge ``cost`` seconds of host CPU (calibration): on the host's cores, one activity of a rank at a time."""
        cost *= r.speed
        if cost <= 0:
            return
        if not self.cal.host_cpus:
            yield self.env.timeout(cost)
            return
        rank = r.env.rank
        cores = self.host_cpu(r.env.host)
        if rank not in self.gils:
            self.gils[rank] = simpy.Resource(self.env, capacity=1)
        with self.gils[rank].request() as gil:
            yield gil
            with cores.request() as cpu:
                yield cpu
                yield self.env.timeout(cost)

    def _check_all_done(self) -> None:
        """Stop when every live rank's caller has ended (one look per rank: its caller is its first activity)."""
        for r in self.ranks:
            if not r.alive:
                continue
            caller = r.acts.get(r.caller) if r.caller is not None else None
            if caller is not None and not caller.done:
                return
        if not self.stop.triggered:
            self.stop.succeed("completed")

    def _mark(self, r: SimRank, act: Act, m: fx.Mark) -> None:
        now, name = self.env.now, m.name  # millions of marks at 512 ranks: each looked up once
        self.marks.append(mark_record(r.env.rank, act.name, now, m))
        if name not in NOISE_MARKS and now > self.last_progress:
            self.last_progress = now
        if name == "task_phase" and ("phase", "done") in m.data:
            r.done_times.append(now)
        elif name in ANOMALY_MARKS:
            self.anomalies += 1
        if name == "collective_start":
            self._phase_faults(r, f"collective:{dict(m.data).get('index')}")
        if name == "phase":
            phase = dict(m.data).get("phase", "")
            if phase in PHASES and PHASES.index(phase) >= PHASES.index(r.phase):
                r.phase = phase
                r.phase_t.setdefault(phase, self.env.now)
                if self.cal.rank_spread:
                    r.speed = self.rank_speed(r.env.rank, phase)
            self._phase_faults(r, phase)

    def rank_speed(self, rank: int, phase: str) -> float:
        """Calibrated ``rank_spread``: the factor on ``rank``'s host costs (CPU charged per effect, store and RPC
        legs, transfer-thread WRITEs, CUDA module loads) while it is in ``phase``. Real ranks sharing a host's
        CPUs get unequal shares for tens of milliseconds at a time, so one finishes its bootstrap well before
        another (and finds its keys missing, docs/parity.md); drawn uniformly with mean 1 and standard
        deviation ``rank_spread``, from the scenario seed, ``spread_seed``, the rank and the phase: a run is
        repeatable."""
        cv = self.cal.rank_spread or 0.0
        u = random.Random(f"spread:{self.scenario.seed}:{self.spread_seed}:{rank}:{phase}").uniform(-1.0, 1.0)
        return max(0.0, 1.0 + cv * math.sqrt(3.0) * u)

    def _phase_faults(self, r: SimRank, phase: str) -> None:
        for f in r.env.faults:
            if getattr(f, "rank", None) != r.env.rank or getattr(f, "at", None) != phase:
                continue
            if f.kind == "kill_rank":
                delay = float(getattr(f, "seconds", None) or 0.0)
                if delay:
                    t = self.env.timeout(delay)
                    t.callbacks.append(lambda _e, r=r: self.kill(r))
                else:
                    self.kill(r)
            elif f.kind == "pause_rank":
                r.paused_until = self.env.now + float(f.seconds)
                self._running_changed()
                t = self.env.timeout(float(f.seconds))
                t.callbacks.append(lambda _e: self._running_changed())

    def kill(self, r: SimRank) -> None:
        if not r.alive:
            return
        r.alive = False
        self.transfers.regions_changed()
        r.died_at = self.env.now
        self.killed.append(r.env.rank)
        self.network.release_rank(r.env.rank)
        self._running_changed()
        self.marks.append({"type": "mark", "rank": r.env.rank, "activity": "driver", "t": round(self.env.now, 9),
                           "name": "killed", "data": {}})
        self._check_all_done()

    # ------------------------------------------------------------------ effects

    def _fx_mark(self, r: SimRank, act: Act, eff: fx.Mark) -> None:
        self._mark(r, act, eff)

    def _fx_now(self, r: SimRank, act: Act, eff: fx.Now) -> float:
        return self.env.now

    def _fx_allocate(self, r: SimRank, act: Act, eff: fx.Allocate) -> fx.Region:
        region = fx.Region(split_addr(eff.addr).rid, eff.name, eff.kind, eff.addr, eff.size, eff.device)
        r.regions[region.rid] = SimRegion(region, eff.zero, owner=r)
        self.transfers.regions_changed()
        return region

    def _fx_register(self, r: SimRank, act: Act, eff: fx.Register) -> fx.RegisterResult:
        sr = r.regions[eff.region.rid]
        self.transfers.regions_changed()
        sr.label = eff.label
        is_dev = eff.region.kind == "device"
        sr.ipc_handle = eff.want_ipc and is_dev
        gpu_ok = r.env.gpu is not None and topo.fabric_supported(self.topology, topo.GpuRef(r.env.host, r.env.gpu))
        sr.fabric_handle = eff.want_fabric and is_dev and gpu_ok
        err = None if (sr.ipc_handle or not eff.want_ipc) else "cudaIpcGetMemHandle: invalid argument (host memory)"
        return fx.RegisterResult(sr.ipc_handle, sr.fabric_handle, err)

    def _fx_read(self, r: SimRank, act: Act, eff: fx.ReadMem) -> bytes:
        return r.regions[eff.rid].read(eff.offset, eff.length)

    def _fx_write(self, r: SimRank, act: Act, eff: fx.WriteMem) -> None:
        r.regions[eff.rid].write(eff.offset, eff.data)
        self._host_wrote(r, eff.rid)

    def _fx_bind(self, r: SimRank, act: Act, eff: fx.RpcBind) -> fx.BindResult:
        ok = self.network.hold(r.env.host, eff.port, r.env.rank)
        if ok:
            r.rpc_port = eff.port
        return fx.BindResult(ok, None if ok else "EADDRINUSE")

    def _fx_serve(self, r: SimRank, act: Act, eff: fx.RpcServe) -> None:
        self.network.serve(r.env.host, eff.port, r.env.rank, eff.handler)

    def _fx_submit(self, r: SimRank, act: Act, eff: fx.SubmitTransfer) -> int:
        return self.transfers.submit(r, eff.writes)

    def _fx_poll(self, r: SimRank, act: Act, eff: fx.PollTransfer) -> tuple[str, ...]:
        return self.transfers.status(eff.batch)

    def _fx_free(self, r: SimRank, act: Act, eff: fx.FreeBatch) -> None:
        self.transfers.free(eff.batch)

    def _fx_spawn(self, r: SimRank, act: Act, eff: fx.Spawn) -> int:
        return self.spawn(r, eff.name, eff.activity, eff.daemon).handle

    def _instant_table(self) -> dict[type, Callable[[SimRank, Act, Any], Any]]:
        """Effects that complete at once, by type: plain calls, no generator per effect (the hot path)."""
        return {fx.Mark: self._fx_mark, fx.Now: self._fx_now, fx.Allocate: self._fx_allocate,
                fx.Register: self._fx_register, fx.ReadMem: self._fx_read, fx.WriteMem: self._fx_write,
                fx.RpcBind: self._fx_bind, fx.RpcServe: self._fx_serve, fx.SubmitTransfer: self._fx_submit,
                fx.PollTransfer: self._fx_poll, fx.FreeBatch: self._fx_free, fx.Spawn: self._fx_spawn}

    def _fx_sleep(self, r: SimRank, act: Act, eff: fx.Sleep) -> SimGen:
        yield self.env.timeout(eff.seconds + (self.cal.poll_overshoot_s or 0.0))
        return None

    def _fx_wait_until(self, r: SimRank, act: Act, eff: fx.WaitUntil) -> SimGen:
        env = self.env
        assert r.reader is not None
        ev = env.event()
        waiter = Waiter(eff, ev, env.now, self._poll_tick(eff.poll_s))
        if self._evaluate(r, waiter, r.reader):
            return True
        r.waiters.append(waiter)
        if eff.timeout_s is None:
            yield ev
            return True
        timer = env.timeout(eff.timeout_s)
        yield ev | timer
        if not ev.triggered:
            # timed out: drop the waiter, or every later dirty() re-evaluates its predicate in vain
            try:
                r.waiters.remove(waiter)
            except ValueError:
                pass
        return ev.triggered

    def _fx_store(self, r: SimRank, act: Act, eff: fx.Effect) -> SimGen:
        one_way = self.cal.store_one_way_s
        if one_way is None:
            one_way = self.network.one_way(r.env.host, self.store_host)
        # calibrated: a thread's first store request opens its connection; the caller's is open from the start in
        # a job of two or more ranks (real mode opens it for the start barrier, before t=0)
        if self.cal.store_connect_s and not (act.name == "caller" and len(self.ranks) > 1):
            connect = self.connect_cost(r.env.rank, act.name, STORE_SERVER, self.cal.store_connect_s)
            if connect:
                yield self.env.timeout(connect * r.speed)
        result = yield from self.store.request(eff, one_way * r.speed)
        return result

    def _timed_table(self) -> dict[type, Callable[[SimRank, Act, Any], SimGen]]:
        """The commonest effects that let time pass, by type: one generator each, straight from _run_activity
        (:meth:`interpret` handles the rest, and these too for a subclass)."""
        table: dict[type, Callable[[SimRank, Act, Any], SimGen]] = {
            fx.Sleep: self._fx_sleep, fx.WaitUntil: self._fx_wait_until, fx.RpcCall: self._rpc_of_act,
            fx.HostCompute: self._fx_host_compute}
        for t in _STORE_EFFECTS:
            table[t] = self._fx_store
        return table

    def _fx_host_compute(self, r: SimRank, act: Act, eff: fx.HostCompute) -> SimGen:
        """The protocol's host work over ``eff.nbytes``: host CPU at ``host_<what>_Bps`` (reduce, fill, decode)."""
        cal = self.cal
        rate = {"reduce": cal.host_reduce_Bps, "fill": cal.host_fill_Bps, "decode": cal.host_decode_Bps}.get(eff.what)
        if rate:
            yield from self._cpu(r, eff.nbytes / rate)
        return None

    def _rpc_of_act(self, r: SimRank, act: Act, eff: fx.RpcCall) -> SimGen:
        return self._rpc(r, eff, act.name)  # the generator itself: one frame less per resumption

    def interpret(self, r: SimRank, act: Act, eff: fx.Effect) -> SimGen:
        """An effect that may let simulated time pass (the instant ones are :meth:`_instant_table`'s)."""
        if isinstance(eff, fx.Sleep):
            result = yield from self._fx_sleep(r, act, eff)
            return result
        if isinstance(eff, fx.WaitUntil):
            result = yield from self._fx_wait_until(r, act, eff)
            return result
        if isinstance(eff, _STORE_EFFECTS):
            result = yield from self._fx_store(r, act, eff)
            return result
        if isinstance(eff, fx.RpcCall):
            reply = yield from self._rpc(r, eff, act.name)
            return reply
        if isinstance(eff, fx.HostCompute):
            yield from self._fx_host_compute(r, act, eff)
            return None
        if isinstance(eff, fx.Join):
            target = r.acts[eff.handle]
            assert target.finished is not None
            value = yield target.finished
            return value
        if isinstance(eff, fx.SteadyState):
            skipped = yield from self._steady_state(r, act, eff)
            return skipped
        if isinstance(eff, (fx.LoadKernel, fx.Launch, fx.Memcpy, fx.Memset, fx.EventRecord, fx.EventQuery,
                            fx.StreamSync)):
            result = yield from self._gpu(r, eff)
            return result
        raise TypeError(f"the simulator cannot interpret {type(eff).__name__}")

    def connect_cost(self, rank: int, thread: str, target: str, cost: float | None = None) -> float:
        """Calibrated: the first call of a rank's thread to a server opens its connection (the real clients
        connect once per thread and target: an RPC client probes the port first); ``cost`` (default
        ``rpc_connect_s``; ``store_connect_s`` for :data:`STORE_SERVER`) then, 0.0 after, or uncalibrated."""
        if cost is None:
            cost = self.cal.rpc_connect_s
        if not cost:
            return 0.0
        key = (rank, thread, target)
        if key in self.connected:
            return 0.0
        self.connected.add(key)
        return cost

    def _rpc(self, r: SimRank, eff: fx.RpcCall, thread: str = "") -> SimGen:
        env = self.env
        host, port = self.network.resolve(r.env.host, eff.target)
        if host is None:
            yield env.timeout(eff.timeout_s)
            return fx.RpcReply(False, b"", "unreachable")
        one_way = self.rpc_one_way(r, host)
        holder = self.network.ports.get((host, port))
        if holder is None:
            yield env.timeout(2 * one_way)
            return fx.RpcReply(False, b"", "refused")
        if holder == FOREIGN:
            yield env.timeout(2 * one_way + self.cal.rpc_service_s)
            return fx.RpcReply(False, b"", "bad-reply")
        server = self.network.servers.get((host, port))
        owner = self.ranks[holder]
        if server is None or server.handler is None or not owner.alive:
            yield env.timeout(eff.timeout_s)  # connected, nobody answers
            return fx.RpcReply(False, b"", "timeout")
        if owner.env.fault("close_port") is not None:
            yield env.timeout(eff.timeout_s)
            return fx.RpcReply(False, b"", "timeout")
        service = self.cal.rpc_service_s
        slow = owner.env.fault("slow_peer")
        if slow is not None:
            service += float(slow.seconds)
        connect = (self.connect_cost(r.env.rank, thread, eff.target) if self.cal.rpc_connect_s else 0.0) * r.speed
        one_way *= r.speed
        pause = max(0.0, owner.paused_until - (env.now + connect + one_way))
        total = connect + 2 * one_way + service + pause
        if total > eff.timeout_s:
            yield env.timeout(eff.timeout_s)
            return fx.RpcReply(False, b"", "timeout")
        t0 = env.now
        yield env.timeout(connect + one_way + service + pause)
        if self.cal.dead_peer_check_s and (yield from self.notice_dead(owner, t0)):  # (uncalibrated: False)
            return fx.RpcReply(False, b"", "refused")
        self.ranks[server.rank].epoch += 1  # the handler changes its rank's protocol state (dirty_written)
        payload = server.handler(eff.method, eff.payload)
        yield env.timeout(one_way)
        return fx.RpcReply(True, payload, None)

    def rpc_one_way(self, r: SimRank, host: str) -> float:
        """One leg of an RPC from rank ``r`` to ``host``: the calibrated ``rpc_one_way_s``, else the topology's."""
        return self.cal.rpc_one_way_s if self.cal.rpc_one_way_s is not None else self.network.one_way(r.env.host, host)

    def refused_s(self, r: SimRank, owner: int) -> float:
        """How long rank ``r`` takes to learn that rank ``owner``'s process is gone: a connection attempt to its
        closed port, refused after one round trip (as :meth:`_rpc` to a port with no holder; the real client
        probes the port before a call on a dropped connection, ``mooncake_real.rpc``)."""
        return 2 * self.rpc_one_way(r, self.ranks[owner].env.host)

    def still_taking(self, owner: int) -> bool:
        """Calibrated ``dead_notice_s`` (with ``dead_peer_check_s``): whether rank ``owner`` died so recently
        that its port still takes requests (its process is being torn down). A TCP WRITE sent to it then goes
        out on the open connection and fails at the real client's next port probe, not at once. (A first
        call would probe before sending and be refused; in a job the connections are open long before a kill.)"""
        cal = self.cal
        if not cal.dead_notice_s or not cal.dead_peer_check_s or not 0 <= owner < len(self.ranks):
            return False
        died = self.ranks[owner].died_at
        return died is not None and self.env.now - died < cal.dead_notice_s

    def notice_dead(self, owner: SimRank, t0: float) -> SimGen:
        """Calibrated ``dead_peer_check_s``: whether ``owner`` died with a call sent at ``t0`` in flight. If so the
        caller waits for its reply in slices of that length and probes the port after each; the probe after
        the death says "refused" (this waits until then). Uncalibrated: False, at once."""
        check = self.cal.dead_peer_check_s
        if not check or owner.died_at is None or owner.died_at < t0:
            return False
        at = t0 + check * max(1, math.ceil((owner.died_at - t0) / check - 1e-9))
        if at > self.env.now:
            yield self.env.timeout(at - self.env.now)
        return True

    # ------------------------------------------------------------------ GPU

    def _ctx(self, r: SimRank) -> Any:
        eager = r.env.env.get("CUDA_MODULE_LOADING", "").upper() == "EAGER"
        return self.gpu.context(r.env.rank, eager=eager)

    def _host_wrote(self, r: SimRank, rid: int) -> None:
        ctx = self.gpu.contexts.get(r.env.rank)
        if ctx is None:
            return
        for (table, slot), _op in list(ctx.spins.items()):
            if table == rid:
                flag = r.regions[rid].read(slot * 64, 4)
                if flag == b"\0\0\0\0":
                    ctx.release_spin((table, slot), noticed=False)

    def _gpu(self, r: SimRank, eff: fx.Effect) -> SimGen:
        from . import kernels

        env = self.env
        ctx = self._ctx(r)
        if isinstance(eff, (fx.LoadKernel, fx.Launch)) and not ctx.kernels_used:
            # the process's first kernel: a one-time set-up on the host before its load or launch (calibrated)
            ctx.kernels_used = True
            first = self.gpu.first_kernel_s_of(r.env.rank)
            if first > 0.0 and not (isinstance(eff, fx.LoadKernel) and eff.kernel in ctx.loaded):
                yield env.timeout(first)
        if isinstance(eff, fx.LoadKernel):
            # cudaFuncGetAttributes: loads the module now; it needs the context's submitted work to drain
            while eff.kernel not in ctx.loaded and not ctx.idle():
                ev = env.event()
                ctx.load_waiters.append(ev)
                yield ev | env.timeout(1e-3)
            if eff.kernel not in ctx.loaded:
                yield env.timeout(self.gpu.load_s(r.env.rank))
                ctx.loaded.add(eff.kernel)
            return None
        if isinstance(eff, fx.Launch):
            op = kernels.launch_op(self, r, ctx, eff)
            ctx.enqueue(op)
            yield env.timeout(KERNEL_LAUNCH_S if self.cal.kernel_launch_s is None else self.cal.kernel_launch_s)
            if ctx.jit_loader and ctx.load_pending is not None and ctx.load_pending[0] == op.kernel:
                ev = env.event()  # a JIT loader blocks the launching host thread until the module is loaded
                ctx.load_waiters.append(ev)
                yield ev
            return None
        if isinstance(eff, fx.Memcpy):
            op = kernels.memcpy_op(self, r, eff)
            ctx.enqueue(op)
            if eff.sync:
                assert op.done is not None
                yield op.done
            else:
                yield env.timeout(ASYNC_CALL_S)
            return None
        if isinstance(eff, fx.Memset):
            op = kernels.memset_op(self, r, eff)
            ctx.enqueue(op)
            yield env.timeout(ASYNC_CALL_S)
            return None
        if isinstance(eff, fx.EventRecord):
            op = Op("event", eff.stream, 0.0, f"event on {eff.stream}")
            ctx.enqueue(op)
            eid = ctx.next_event
            ctx.next_event += 1
            ctx.events[eid] = op
            return eid
        if isinstance(eff, fx.EventQuery):
            op = ctx.events.get(eff.event)
            return op is None or op.finished
        if isinstance(eff, fx.StreamSync):
            drained = yield from self._drain(r, eff.stream, eff.timeout_s)
            return drained
        raise TypeError(type(eff).__name__)

    def _drain(self, r: SimRank, stream: str, timeout_s: float) -> SimGen:
        """Wait until the work on ``stream`` of ``r``'s context so far has finished; False on timeout."""
        s = self.gpu.context(r.env.rank).stream(stream)
        last = s.queue[-1] if s.queue else s.running
        if last is None:
            return True
        assert last.done is not None
        yield last.done | self.env.timeout(timeout_s)
        return last.done.triggered

    # ------------------------------------------------------------------ fast-forward

    def _ff_eligible(self, r: SimRank) -> bool:
        """Whether a steady stretch of chunks may be skipped at all: sizes mode (no payload is lost), no
        scripted faults (nothing can happen inside the stretch), every rank alive and nothing anomalous so far."""
        sc = self.scenario
        return (self.fast_forward and not r.env.data_values and not sc.faults and not self.anomalies
                and all(x.alive and x.error is None for x in self.ranks))

    def _steady_state(self, r: SimRank, act: Act, eff: fx.SteadyState) -> SimGen:
        """Fast-forward over ``eff.chunks`` identical chunks (Wormhole-style steady-state skipping).

        Every rank drains the chunks it has issued, then meets the others at a barrier. If each rank's last
        chunks completed at one steady period (two equal intervals, within :data:`FF_TOLERANCE`), every rank
        sleeps ``chunks * period`` (the slowest rank's period) from the moment it drained and the caller skips
        the chunks; otherwise nobody skips. Chunks are all-to-all exchanges, so ranks run in lockstep and
        the period is a property of the whole group. A ``fast_forward`` mark records the skip.
        """
        env = self.env
        if not self._ff_eligible(r) or eff.chunks <= 0 or eff.chunks % 2:
            return 0
        if eff.stream:  # CUDA path: the chunks issued so far must finish (what the caller's stream holds)
            drained = yield from self._drain(r, eff.stream, r.env.collective_timeout_s)
            if not drained:
                return 0
        key = (eff.index, eff.chunk)
        bar = self.ff_barriers.get(key)
        if bar is None:
            bar = self.ff_barriers[key] = FastForward(env.event())
        bar.arrived[r.env.rank] = env.now
        alive = [x.env.rank for x in self.ranks if x.alive]
        if len(bar.arrived) == len(alive) and not bar.decided.triggered:
            bar.decided.succeed(self._ff_decide(bar, alive))
        period = yield bar.decided
        if not period or not self._ff_eligible(r):
            return 0
        resume = bar.arrived[r.env.rank] + eff.chunks * period
        self.last_progress = max(self.last_progress, resume)
        self._mark(r, act, fx.mark(
            "fast_forward", index=eff.index, chunk=eff.chunk, chunks=eff.chunks, period_us=round(period * 1e6, 3)))
        if resume > env.now:
            yield env.timeout(resume - env.now)
        if not bar.counted:
            bar.counted = True
            self.ff_skipped += eff.chunks
        return eff.chunks

    def _ff_decide(self, bar: FastForward, ranks: list[int]) -> float:
        """The group's steady chunk period, or 0.0 when some rank's last chunks were not steady."""
        if not self._ff_eligible(self.ranks[ranks[0]]):
            return 0.0
        period = 0.0
        for rank in ranks:
            t = self.ranks[rank].done_times
            if len(t) < 3:
                return 0.0
            d1, d2 = t[-2] - t[-3], t[-1] - t[-2]
            if d1 <= 0 or abs(d2 - d1) > FF_TOLERANCE * d1:
                return 0.0
            period = max(period, d1, d2)
        return period

    # ------------------------------------------------------------------ running

    def _monitor(self, stall_s: float, deadline_s: float) -> SimGen:
        """End the run when the stall window runs out or at the deadline, at that very instant.

        Not by polling: a check every ``stall_s / 4`` declared a hang up to a quarter window late, and an
        error the protocol raised in that quarter (a collective's time limit equal to the stall window) won,
        where the real launcher, which polls every few milliseconds, declared the hang first."""
        env = self.env
        while not self.stop.triggered:
            wake = min(self.last_progress + stall_s, deadline_s)
            yield env.timeout(max(wake - env.now, 1e-9))
            if self.stop.triggered:
                return
            if env.now - self.last_progress >= stall_s * (1 - 1e-12):
                self.stop.succeed("stall")
                return
            if env.now >= deadline_s:
                self.stop.succeed("deadline")
                return

    def blocked(self) -> list[Blocked]:
        out = []
        for r in self.ranks:
            if not r.alive:
                continue
            for a in r.acts.values():
                if a.done or a.current is None:
                    continue
                if not getattr(a.current, "blocking", False) and not isinstance(a.current, fx.Sleep):
                    continue
                if isinstance(a.current, fx.Sleep):
                    continue
                what, blockers = describe_wait(a.current)
                out.append(Blocked(r.env.rank, a.name, type(a.current).__name__, what, blockers,
                                   round(a.since, 9), None))
            ctx = self.gpu.contexts.get(r.env.rank)
            if ctx is not None:
                for what, resource in ctx.holds():
                    out.append(Blocked(r.env.rank, "gpu", "DeviceWork", what, (), round(self.env.now, 9), resource))
        return out

    def run(self) -> RunResult:
        wall0 = time.perf_counter()
        sc = self.scenario
        for r in self.ranks:
            r.caller = self.spawn(r, "caller", rank_main(r.env), daemon=False).handle
        deadline = sc.deadlines.bootstrap_s + sc.deadlines.collective_s * max(1, len(sc.workload))
        self.env.process(self._monitor(sc.deadlines.stall_s, deadline))
        # The cyclic collector is off for the run: events, activities and plans are freed by reference counting
        # (a 256-rank run leaves 1% of its objects as cyclic garbage, collected after), while every young
        # collection walks the marks and caches that stay alive (8% of a 512-rank run's wall time).
        collecting = gc.isenabled()
        gc.disable()
        try:
            self.env.run(until=self.stop)
        finally:
            if collecting:
                # What the run left alive (marks, caches, models: millions of objects at 512 ranks) is all in
                # the youngest generation now, and the first collection after enabling would walk every one of
                # it (seconds). Move it to the oldest generation instead: freeze then unfreeze walks nothing.
                # A full collection still looks at it, so the run's cyclic garbage is still collected. (Skipped
                # where someone else keeps objects frozen: unfreeze would release theirs too.)
                if not gc.get_freeze_count():
                    gc.freeze()
                    gc.unfreeze()
                gc.enable()
        reason = str(self.stop.value)
        blocked = self.blocked() if reason != "completed" else []
        return RunResult(
            mode="sim",
            end_reason=reason,
            sim_time_s=self.env.now if reason == "completed" else self.last_progress,
            wall_s=time.perf_counter() - wall0,
            envs=self.envs,
            marks=self.marks,
            effects=self.effects,
            blocked=blocked,
            errors={r.env.rank: (str(r.error), r.error.cause) for r in self.ranks if r.error is not None},
            phases={r.env.rank: r.phase for r in self.ranks},
            phase_times={r.env.rank: dict(r.phase_t) for r in self.ranks},
            killed=list(self.killed),
            stats={"effects": self.effect_count, "store_ops": self.store.ops,
                   "store_max_queue_s": self.store.max_queue_s, "writes": self.transfers.writes,
                   "bytes_moved": self.transfers.bytes_moved, "end_time_s": self.env.now,
                   "chunks_fast_forwarded": self.ff_skipped},
        )


def simulate(scenario: Any, *, record_effects: bool = False, calibration: Calibration | None = None,
             progress: Callable[[str], None] | None = None, fast_forward: bool = True,
             spread_seed: int = 0) -> RunResult:
    """Run one scenario in the simulator; ``progress`` gets a line every few seconds of a long run;
    ``fast_forward=False`` simulates every chunk of a long collective in detail; ``spread_seed`` draws another
    set of rank speeds where the calibration has a ``rank_spread`` (:meth:`Simulation.rank_speed`)."""
    return Simulation(scenario, record_effects=record_effects, calibration=calibration, progress=progress,
                      fast_forward=fast_forward, spread_seed=spread_seed).run()
