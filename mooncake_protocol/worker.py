"""The MooncakeWorker: a 4-slot task table polled by one worker activity per process (section 7.2).

Slots 0-1 serve the CPU path, 2-3 the CUDA path. A task is published into its slot of the mapped task
table (by the spin kernel on the CUDA path, by the caller on the CPU path) and the worker drives it through
:data:`SLOT_TRANSITIONS`: IDLE -> TRANSFERRED_1 (data WRITEs submitted and completed) -> SIGNALED_1
(all-to-all sync flags exchanged) -> DONE (active flag cleared: this releases the spin kernel).

Policies that live here: ``reset_task_ids`` (kInvalidTaskId before each batch, #1755), ``liveness_probe``
(#1808) versus the ping-every-pass rule after 100 us, ``zero_sync_flags`` (handled at registration).

Task table layout (mapped pinned host memory, 64 bytes per slot): int32 ``active`` at offset 0 (1 = task
published, 0 = done, 3 = the spin kernel timed out), task fields from offset 8 (:data:`TASK_FMT`).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import effects as fx
from .effects import Activity, mark
from .engine import Request
from .reduce import all_reduce_kernels

if TYPE_CHECKING:
    from .backend import Backend, ProcessState

NUM_SLOTS = 4
SLOT_BYTES = 64
TASK_OFFSET = 8
#: int32 in a slot that our spin kernel sets when its safety limit ran out (Mooncake's has no limit); nothing
#: else writes it, so it outlives the worker's later write of ``active``
SPIN_GAVE_UP_OFFSET = 4
TASK_FMT = "<iiqiiii"  # op, root, size (bytes per rank slice), parity, group, seq, n (elements)
INVALID_TASK_ID = (1 << 64) - 1
#: What an uninitialised ``rankToTaskId`` stack array holds before a slot's first batch.
GARBAGE_TASK_ID = 0x5EED_BEEF
PING_AFTER_S = 100e-6  # kPingTimeoutMicroseconds_
PING_TIMEOUT_S = 5e-3
PROBE_INTERVAL_S = 0.5  # #1808: a dedicated liveness probe instead of pinging every pass
PROBE_TIMEOUT_S = 2.0
ACTIVE_DONE, ACTIVE_SET, ACTIVE_TIMED_OUT = 0, 1, 3
_SEQ_AT = TASK_OFFSET + 24  # byte offset of ``seq`` in a slot
_FLAG_SET = (1).to_bytes(4, "little")
#: every slot's ``active`` flag (unsigned) and task ``seq`` (signed) in one read of the whole table
_TABLE_WORDS = struct.Struct("<" + f"I{_SEQ_AT - 4}xi{SLOT_BYTES - _SEQ_AT - 4}x" * NUM_SLOTS)


class Op(enum.IntEnum):
    ALLREDUCE = 0
    ALLGATHER = 1
    BROADCAST = 2
    GATHER = 3
    SCATTER = 4
    ALLTOALL = 5
    REDUCE_SCATTER = 6
    REDUCE = 7
    BARRIER = 8


#: Ops whose non-root ranks (or everyone, for BARRIER) move no data: straight to the sync phase.
def skips_data(op: Op, rank: int, root: int) -> bool:
    return op is Op.BARRIER or (op in (Op.BROADCAST, Op.SCATTER) and rank != root)


class SlotState(enum.Enum):
    IDLE = "IDLE"
    TRANSFERRED_1 = "TRANSFERRED_1"
    SIGNALED_1 = "SIGNALED_1"
    DONE = "DONE"


class SlotEvent(enum.Enum):
    TASK_WITH_DATA = "task published, data WRITEs submitted"
    TASK_NO_DATA = "task published, no data for this rank"
    DATA_PENDING = "some data WRITE not completed"
    DATA_DONE = "all data WRITEs completed, sync flags submitted"
    SYNC_PENDING = "some sync flag missing"
    SYNC_DONE = "all sync flags seen, active flag cleared"
    NEXT_TASK = "slot reused"


_SS, _SE = SlotState, SlotEvent

#: slot state -> event -> next state.
SLOT_TRANSITIONS: dict[SlotState, dict[SlotEvent, SlotState]] = {
    _SS.IDLE: {_SE.TASK_WITH_DATA: _SS.TRANSFERRED_1, _SE.TASK_NO_DATA: _SS.TRANSFERRED_1},
    _SS.TRANSFERRED_1: {_SE.DATA_PENDING: _SS.TRANSFERRED_1, _SE.DATA_DONE: _SS.SIGNALED_1},
    _SS.SIGNALED_1: {_SE.SYNC_PENDING: _SS.SIGNALED_1, _SE.SYNC_DONE: _SS.DONE},
    _SS.DONE: {_SE.NEXT_TASK: _SS.IDLE},
}


def slot_transition(state: SlotState, event: SlotEvent) -> SlotState:
    try:
        return SLOT_TRANSITIONS[state][event]
    except KeyError:
        raise ValueError(f"{event.name} is not allowed in slot state {state.name}") from None


@dataclass(frozen=True)
class Task:
    op: Op
    root: int
    size: int
    parity: int
    group: int
    seq: int
    count: int

    def pack(self) -> bytes:
        return struct.pack(TASK_FMT, int(self.op), self.root, self.size, self.parity, self.group, self.seq, self.count)

    @staticmethod
    def unpack(data: bytes) -> Task:
        op, root, size, parity, group, seq, count = struct.unpack(TASK_FMT, data[:struct.calcsize(TASK_FMT)])
        return Task(Op(op), root, size, parity, group, seq, count)


@dataclass
class Slot:
    index: int
    state: SlotState = SlotState.IDLE
    task: Task | None = None
    batch: int | None = None
    batch_len: int = 0
    ids: list[int] = field(default_factory=lambda: [GARBAGE_TASK_ID] * 64)
    t_start: float = 0.0
    last_probe: float = 0.0
    seq_seen: int = -1
    callback: Any = None  # CPU path: the caller's continuation, run at DONE
    stale_reported: bool = False
    backend: Backend | None = None  # the task's group
    flags_rid: int = 0  # the region its sync flags arrive in
    #: (batch, state, j): peers before j were found done by :meth:`Worker._progress_possible` in this batch and
    #: state. Completion is final within a batch (statuses never return to pending; flags stay set until
    #: DONE), so the next evaluation resumes at j instead of re-reading every peer.
    ready_prefix: tuple[int | None, SlotState, int] = (None, SlotState.IDLE, 0)


class Worker:
    """One per process (Mooncake: one per device plus a CPU worker, sharing nothing we model)."""

    def __init__(self, proc: ProcessState) -> None:
        self.proc = proc
        self.slots = [Slot(i) for i in range(NUM_SLOTS)]
        self.table: fx.Region | None = None
        self.cpu_task_count = 0
        self.cuda_task_count = 0
        self.done_tasks = 0
        self.seq = 0
        #: every slot idle (or done) and nothing else can move them: the task table as it was then, and
        #: ``_moves`` (slot state changes) at that time; the same table at the same count is still "no"
        self._idle_seen: tuple[bytes, int] | None = None
        self._moves = 0

    # ------------------------------------------------------------------ set-up

    def allocate_table(self) -> Activity:
        env = self.proc.env
        kind = "pinned" if env.backend == "cuda" else "host"
        self.table = yield from self.proc.engine.alloc("task_table", kind, NUM_SLOTS * SLOT_BYTES, None)

    def preload_reduce_kernels(self) -> Activity:
        """``preloadReduceKernels`` (#1755): load every reduce instantiation before any spin kernel."""
        for k in all_reduce_kernels():
            yield fx.LoadKernel(k)
            self.proc.loaded_kernels.add(k)
            yield mark("kernel_preloaded", kernel=k)  # progress: a real module load takes tens of ms
        yield mark("kernels_preloaded", count=len(all_reduce_kernels()))

    # ------------------------------------------------------------------ helpers

    def _backend(self, group: int) -> Backend:
        for b in self.proc.backends:
            if b.group == group:
                return b
        raise LookupError(f"no backend for group {group}")

    def _set(self, s: Slot, event: SlotEvent) -> None:
        s.state = slot_transition(s.state, event)
        self._moves += 1

    def _progress_possible(self, reader: fx.MemoryReader) -> bool:
        """Whether a worker pass could change anything now. It mirrors :meth:`step` (same per-peer reading of
        task ids and statuses), so the simulator can sleep until it holds instead of busy-polling."""
        assert self.table is not None
        engine = self.proc.engine
        table = reader.read(self.table.rid, 0, NUM_SLOTS * SLOT_BYTES)  # one read: flags and sequence numbers
        if self._idle_seen == (table, self._moves):
            return False  # all idle, and neither the table nor a slot changed since the last "no"
        seen: dict[int, tuple[str, ...]] = {}
        idle = True
        words = _TABLE_WORDS.unpack(table)
        for s in self.slots:
            flag, seq = words[2 * s.index], words[2 * s.index + 1]
            if s.state is SlotState.IDLE or s.state is SlotState.DONE:
                if flag == ACTIVE_SET:
                    if s.state is SlotState.IDLE or seq != s.seq_seen:
                        return True
                continue
            idle = False
            if seq != s.seq_seen or s.task is None:
                return True  # overwritten in flight
            batch = engine.batches.get(s.batch) if s.batch is not None else None
            if batch is None:
                return True
            b = s.backend
            assert b is not None
            # SIGNALED_1 also needs the peers' sync flags: read one flag at a time, only those looked at (a
            # driver can then tell that a flag landing beyond the first missing one changes no answer)
            flags_rid = s.flags_rid if s.state is SlotState.SIGNALED_1 else None
            ready = True
            start = s.ready_prefix[2] if s.ready_prefix[:2] == (s.batch, s.state) else 0
            active, ids, reqs = b.active, s.ids, batch.reqs
            for j in range(start, b.env.size):
                if not active[j]:
                    continue
                idx = ids[j]
                if idx == INVALID_TASK_ID:
                    continue
                if not 0 <= idx < len(reqs):
                    ready = False  # a stale id reads as a phantom "pending"
                    break
                r = reqs[idx]
                st = r.final
                if st is None and r.driver is None and (r.crossed or (r.awaiting and engine.endpoint_state(r) != "connecting")):
                    return True  # the endpoint handshake ended: the engine can post or fail it
                if st is None:
                    if r.driver is None:
                        st = "pending"
                    else:  # one status read per driver batch, not one per peer (a batch has a peer's worth)
                        sts = seen.get(r.driver[0])
                        if sts is None:
                            sts = seen[r.driver[0]] = reader.status(r.driver[0])
                        st = sts[r.driver[1]]
                if st != "completed":
                    if st.startswith("failed"):
                        return True
                    ready = False
                elif flags_rid is not None and reader.read(flags_rid, 4 * j, 4) != _FLAG_SET:
                    ready = False
                if not ready:
                    s.ready_prefix = (s.batch, s.state, j)
                    break
            if ready:
                return True
        if idle:
            self._idle_seen = (table, self._moves)
        return False

    def _busy(self) -> bool:
        return any(s.state in (SlotState.TRANSFERRED_1, SlotState.SIGNALED_1) for s in self.slots)

    # ------------------------------------------------------------------ the worker activity

    def run(self) -> Activity:
        policy = self.proc.env.policy
        idle_passes = 0
        last_idle_t = -1.0
        while True:
            progressed = False
            for s in self.slots:
                moved = yield from self.step(s)
                progressed = progressed or moved
            if progressed:
                idle_passes = 0
                continue
            now = yield fx.Now()
            idle_passes = idle_passes + 1 if now == last_idle_t else 0
            last_idle_t = now
            if idle_passes > 2:
                # passes that change nothing at one instant: the real worker busy-polls, and a pass costs
                # time, never zero (this keeps a simulated worker from spinning in place)
                yield fx.Sleep(PING_AFTER_S)
            if self._busy():
                timeout = PROBE_INTERVAL_S if policy.liveness_probe else PING_AFTER_S
            else:
                timeout = None
            yield fx.WaitUntil(self._progress_possible, PING_AFTER_S, "worker: a task to publish or a transfer to finish",
                               timeout, self._blockers)

    def _blockers(self) -> tuple[str, ...]:
        out = []
        for s in self.slots:
            if s.state in (SlotState.TRANSFERRED_1, SlotState.SIGNALED_1) and s.task is not None:
                out.append(f"slot:{s.index}:{s.state.value}:{s.task.op.name}")
        return tuple(out)

    def step(self, s: Slot) -> Activity:
        """Advance one slot as far as it can go now. Returns whether anything changed."""
        if s.state in (SlotState.IDLE, SlotState.DONE):
            flag = yield fx.ReadMem(self.table.rid if self.table else 0, s.index * SLOT_BYTES, 4)
            if int.from_bytes(flag, "little") != ACTIVE_SET:
                return False
            raw = yield fx.ReadMem(self.table.rid if self.table else 0, s.index * SLOT_BYTES + TASK_OFFSET,
                                   struct.calcsize(TASK_FMT))
            task = Task.unpack(raw)
            if s.state is SlotState.DONE:
                if task.seq == s.seq_seen:
                    return False  # still the finished task: the spin kernel has not seen the flag yet
                self._set(s, SlotEvent.NEXT_TASK)
            yield from self._start(s, task)
            return True
        seq = yield fx.ReadMem(self.table.rid if self.table else 0, s.index * SLOT_BYTES + TASK_OFFSET + 24, 4)
        if int.from_bytes(seq, "little", signed=True) != s.seq_seen:
            yield mark("slot_exhausted", slot=s.index,
                       text=f"task slot {s.index} was overwritten by another group's task while its task was in flight")
            from .errors import ProtocolError

            raise ProtocolError(f"worker: task slot {s.index} overwritten while in flight", cause="task-slot-exhaustion")
        if s.state is SlotState.TRANSFERRED_1:
            changed = yield from self._poll_data(s)
            return changed
        if s.state is SlotState.SIGNALED_1:
            changed = yield from self._poll_sync(s)
            return changed
        return False

    def _start(self, s: Slot, task: Task) -> Activity:
        b = self._backend(task.group)
        me = b.env.rank
        s.task = task
        s.backend = b
        s.flags_rid = b.regions[f"recv_sync{task.parity}"].rid
        s.seq_seen = task.seq
        s.stale_reported = False
        if skips_data(task.op, me, task.root):
            s.batch = None
            yield mark("task_phase", slot=s.index, op=task.op.name, phase="data", seq=task.seq, writes=0)
            self._set(s, SlotEvent.TASK_NO_DATA)
            return
        self._prepare_ids(s, b)
        reqs: list[Request] = []
        send = b.regions[f"send{task.parity}"]
        # per peer: one WRITE of the task's slice; which peers, and where from and to, depend on the op only
        only_root = task.op in (Op.GATHER, Op.REDUCE)
        per_peer_src = task.op in (Op.ALLTOALL, Op.REDUCE_SCATTER, Op.SCATTER)
        dst_off = 0 if task.op in (Op.BROADCAST, Op.SCATTER) else me * task.size
        size, parity, root = task.size, task.parity, task.root
        active, infos, segments, ids = b.active, b.segment_infos, b.segments, s.ids
        for j in range(b.env.size):
            if not active[j]:
                continue
            if only_root and j != root:
                continue
            info = infos[j]
            if info is None:
                continue
            ids[j] = len(reqs)
            reqs.append(Request(segments[j], j, info.recv[parity] + dst_off, send, j * size if per_peer_src else 0, size))
        now = yield fx.Now()
        s.t_start = s.last_probe = now
        s.batch = yield from self.proc.engine.submit(reqs)
        s.batch_len = len(reqs)
        yield mark("task_phase", slot=s.index, op=task.op.name, phase="data", seq=task.seq, writes=len(reqs))
        self._set(s, SlotEvent.TASK_WITH_DATA)

    def _stale_status(self, s: Slot, j: int) -> Activity:
        """The status the worker reads for peer j whose task id lies outside this batch (a stale id, legacy).

        getTransferStatus then returns an error without filling the status; the loop reads its uninitialised
        local: modelled as a phantom "pending" (marked once per slot)."""
        if not s.stale_reported:
            s.stale_reported = True
            yield mark("stale_task_poll", slot=s.index, peer=j, task_id=s.ids[j], outcome="phantom pending")
        return "pending"

    def _poll_data(self, s: Slot) -> Activity:
        assert s.task is not None
        b = self._backend(s.task.group)
        engine = self.proc.engine
        if s.batch is not None:
            statuses = yield from engine.poll(s.batch)
            done = yield from self._check_peers(s, b, statuses, "transferring")
            if not done:
                self._set(s, SlotEvent.DATA_PENDING)
                return False
            yield from engine.free(s.batch)
            s.batch = None
        yield from self._submit_sync(s, b)
        self._set(s, SlotEvent.DATA_DONE)
        return True

    @staticmethod
    def _prepare_ids(s: Slot, b: Backend) -> None:
        """Before building a batch: reset ``rankToTaskId`` to the sentinel (#1755), or leave it stale."""
        if b.env.policy.reset_task_ids:
            s.ids = [INVALID_TASK_ID] * max(64, b.env.size)
        elif len(s.ids) < b.env.size:  # kMaxNumRanks entries; more only with max_group_size raised
            s.ids += [GARBAGE_TASK_ID] * (b.env.size - len(s.ids))

    def _submit_sync(self, s: Slot, b: Backend) -> Activity:
        assert s.task is not None
        me = b.env.rank
        self._prepare_ids(s, b)
        reqs: list[Request] = []
        flag_src = b.regions[f"send_sync{s.task.parity}"]
        yield fx.WriteMem(flag_src.rid, 0, (1).to_bytes(4, "little"))
        parity, active, infos, segments, ids = s.task.parity, b.active, b.segment_infos, b.segments, s.ids
        for j in range(b.env.size):
            if not active[j]:
                continue
            info = infos[j]
            if info is None:
                continue
            ids[j] = len(reqs)
            reqs.append(Request(segments[j], j, info.recv_sync[parity] + me * 4, flag_src, 0, 4))
        now = yield fx.Now()
        s.t_start = s.last_probe = now
        s.batch = yield from self.proc.engine.submit(reqs)
        s.batch_len = len(reqs)
        yield mark("task_phase", slot=s.index, op=s.task.op.name, phase="sync", seq=s.task.seq)

    def _check_peers(self, s: Slot, b: Backend, statuses: tuple[str, ...], during: str) -> Activity:
        """The TRANSFERRED_1 / SIGNALED_1 loop over active peers. Returns whether all are done."""
        assert s.task is not None
        me = b.env.rank
        policy = b.env.policy
        now = yield fx.Now()
        flags = b""
        if during == "syncing":
            flags = yield fx.ReadMem(b.regions[f"recv_sync{s.task.parity}"].rid, 0, 4 * b.env.size)
        all_done = True
        nst = len(statuses)
        for j in range(b.env.size):
            if not b.active[j]:
                continue
            idx = s.ids[j]  # the status read for peer j: none for the sentinel id
            if idx == INVALID_TASK_ID:
                continue
            st = statuses[idx] if 0 <= idx < nst else (yield from self._stale_status(s, j))
            ok = st == "completed"
            if during == "syncing":
                ok = ok and flags[4 * j:4 * j + 4] == b"\x01\0\0\0"
            if ok:
                continue
            if st.startswith("failed"):
                yield from self._mark_broken(b, j, f"failed ({st.split(':', 1)[-1]})", during)
                continue
            if j != me and not policy.liveness_probe and now - s.t_start > PING_AFTER_S:
                alive = yield from self._ping(b, j, PING_TIMEOUT_S)
                if not alive:
                    yield from self._mark_broken(b, j, "ping failed", during)
                    continue
                if during == "syncing":
                    s.t_start = now  # the sync timer is reset every 100 us
            elif j != me and policy.liveness_probe and now - s.last_probe >= PROBE_INTERVAL_S:
                s.last_probe = now
                alive = yield from self._ping(b, j, PROBE_TIMEOUT_S)
                if not alive:
                    yield from self._mark_broken(b, j, "liveness probe failed", during)
                    continue
            all_done = False
            break
        return all_done

    def _ping(self, b: Backend, j: int, timeout: float) -> Activity:
        seg = b.segments[j]
        if seg is None:
            return False
        reply = yield fx.RpcCall(seg.name, "Notify", b"ping", timeout)
        yield mark("ping", peer=j, ok=reply.ok)
        return reply.ok

    def publish_active(self, b: Backend) -> Activity:
        """Mirror ``activeRanks`` into its mapped region (what reduce kernels and the user tensor read)."""
        if "active_ranks" in b.regions:
            yield fx.WriteMem(b.regions["active_ranks"].rid, 0, bytes(int(a) for a in b.active))

    def _mark_broken(self, b: Backend, j: int, why: str, during: str) -> Activity:
        b.peer_connected[j] = False
        b.active[j] = False
        yield from self.publish_active(b)
        yield mark("log", level="warning", text=f"marking peer {j} as broken during {during} op: {why}")
        yield mark("peer_marked_broken", peer=j, reason=why, during=during)

    def _poll_sync(self, s: Slot) -> Activity:
        assert s.task is not None and s.batch is not None
        b = self._backend(s.task.group)
        engine = self.proc.engine
        statuses = yield from engine.poll(s.batch)
        done = yield from self._check_peers(s, b, statuses, "syncing")
        if not done:
            self._set(s, SlotEvent.SYNC_PENDING)
            return False
        rid = b.regions[f"recv_sync{s.task.parity}"].rid
        yield fx.WriteMem(rid, 0, bytes(4 * b.env.size))
        yield from engine.free(s.batch)
        s.batch = None
        self._set(s, SlotEvent.SYNC_DONE)
        self.done_tasks += 1
        yield mark("task_phase", slot=s.index, op=s.task.op.name, phase="done", seq=s.task.seq)
        yield from self.publish_active(b)
        assert self.table is not None
        # clear ``active``: releases the spin kernel (CUDA) or lets the caller continue (CPU)
        yield fx.WriteMem(self.table.rid, s.index * SLOT_BYTES, ACTIVE_DONE.to_bytes(4, "little"))
        return True
