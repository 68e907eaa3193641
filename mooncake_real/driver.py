"""The real interpreter of the effect vocabulary: one rank = one OS process, one thread per activity.

Rules of this module:

* :func:`run_rank` runs one rank from a :class:`RankSpec` (a JSON-able record the launcher writes): it
  builds the rank's top-level activity from ``spec.entry`` ("module:callable", called with the spec) and
  runs it on the calling thread as activity ``caller``. ``Spawn`` starts a thread per activity (``daemon``
  activities are daemon threads); ``Join`` joins it and returns its value (or re-raises its exception).
* Every effect class of :data:`mooncake_protocol.effects.ALL_EFFECTS` has a handler here
  (:data:`HANDLERS`; tests/real/test_driver.py checks the table is complete). All decisions stay in the
  protocol: a handler only does what the effect says, with real sockets, memory and CUDA.
* An exception while carrying out an effect is thrown into the activity at its ``yield``; the effect's
  trace record then has ``result = {"error": "..."}``.
* Every effect and mark is recorded with :func:`mooncake_protocol.trace.effect_record` /
  :func:`~mooncake_protocol.trace.mark_record` (times relative to the launcher's start, ``spec.t0``, on the
  machine-wide monotonic clock) as one JSON line of ``<job_dir>/rank<r>.trace.jsonl``, flushed per line
  (the launcher tails it for phase faults).
* The effect each activity is in is kept, so the watchdog thread can write a hang dump
  (``<job_dir>/rank<r>.dump.json``): on SIGUSR1, at the rank's own deadline, or on SIGTERM. SIGUSR1 and
  SIGTERM are blocked in every thread and taken by the watchdog with ``sigtimedwait``, so a dump works even
  when every other thread is stuck inside a CUDA call. A CUDA call that holds the GIL stops the watchdog
  too; for that case each activity's current effect is mirrored into ``<job_dir>/rank<r>.board``
  (:class:`StateBoard`), which the launcher reads when a rank does not answer.
* Start barrier: a rank starts its top-level activity only once every rank of the job has started up
  (imports, threads, the entry loaded): each adds itself to :data:`READY_KEY`, the last one sets
  :data:`GO_KEY`. Process start-up takes long and differs between ranks; without the barrier a rank
  started first is hundreds of milliseconds ahead, which the simulator (all ranks start at t=0) never sees.
  A rank whose entry failed to load still counts itself ready, so the others are never held.
* When the top-level activity ends, the rank writes ``<job_dir>/rank<r>.result.json`` and keeps serving
  (its RPC server and memory stay up, as a real process keeps its process group) until it is released:
  the launcher sets the store key :data:`RELEASE_KEY`, or, in ``count`` mode (torchrun/SLURM), every rank
  has added itself to :data:`DONE_KEY`; bounded by the deadline.
"""

from __future__ import annotations

import ctypes
import importlib
import itertools
import json
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mooncake_protocol import effects as fx
from mooncake_protocol import trace as tr

from .gpu import GpuContext, parse_reduce, reduce_host
from .memory import MemoryReader, RegionTable
from .rpc import RpcClient, RpcServer
from .store import StoreClient
from .transports import TransferEngine, rpc_builtins

RELEASE_KEY = "mooncake_real/release"
DONE_KEY = "mooncake_real/done"
READY_KEY = "mooncake_real/ready"
GO_KEY = "mooncake_real/go"
LAST_EVENTS = 50
WAIT_POLL_MAX_S = 0.002
_DUMP_SIGNALS = {signal.SIGUSR1, signal.SIGTERM}


def thread_stacks(depth: int = 8) -> dict[str, list[str]]:
    """Every thread's innermost Python frames (``file:function:line``, innermost first), keyed ``name/tid``: a
    thread blocked inside a C call (a CUDA call, a syscall) shows the line that made it."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out: dict[str, list[str]] = {}
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue  # the dumping thread itself
        frames: list[str] = []
        f: Any = frame
        while f is not None and len(frames) < depth:
            frames.append(f"{Path(f.f_code.co_filename).name}:{f.f_code.co_name}:{f.f_lineno}")
            f = f.f_back
        out[f"{names.get(ident, '?')}/{ident}"] = frames
    return out


@dataclass
class RankSpec:
    """Everything a rank process needs. JSON-able (the launcher writes it to ``<job_dir>/rank<r>.spec.json``)."""

    job_id: str
    job_dir: str
    rank: int
    world_size: int
    store_addr: str  # "host:port"
    token: str
    t0: float  # launcher's start, time.monotonic() (CLOCK_MONOTONIC is machine-wide on Linux)
    deadline_s: float  # the rank's own deadline, seconds after t0: dump, then exit after exit_grace_s
    entry: str = "mooncake_real.entry:protocol_activity"  # "module:callable", called with the spec
    scenario: str | None = None
    host: str = "127.0.0.1"  # the address this rank binds and advertises
    gpu: int | None = None  # the CUDA device of this rank (None: CPU backend)
    kill_at_phase: str | None = None  # fault kill_rank: SIGKILL itself on mark phase(phase=...)
    kill_after_s: float = 0.0  # kill_rank with seconds: that long after the phase mark
    pause_at_phase: str | None = None  # fault pause_rank: SIGSTOP itself; the launcher SIGCONTs it
    pause_s: float = 0.0
    rpc_delay_s: float = 0.0  # fault slow_peer: this rank's server answers protocol RPCs that much later
    rpc_closed: bool = False  # fault close_port: this rank's server takes protocol RPCs and never answers
    blocked_to: list[int] = field(default_factory=list)  # fault block_direction: WRITEs to these ranks fail
    release: str = "launcher"  # "launcher" | "count" | "none"
    start_barrier: bool = True  # wait until every rank is up before the caller starts (the simulator's t=0)
    job_dir_owned: bool = False  # job_dir is the launcher's temporary directory: a rank orphaned by the launcher removes it
    exit_grace_s: float = 5.0
    store_timeout_s: float = 30.0
    rpc_timeout_s: float = 5.0
    pythonpath: list[str] = field(default_factory=list)
    args: dict[str, Any] = field(default_factory=dict)  # free-form, for entries

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @staticmethod
    def from_json(text: str) -> RankSpec:
        return RankSpec(**json.loads(text))

    # files of this rank
    def path(self, what: str) -> Path:
        """``trace`` -> rank<r>.trace.jsonl; ``dump``, ``result``, ``spec`` -> rank<r>.<what>.json."""
        ext = "jsonl" if what == "trace" else "json"
        return Path(self.job_dir) / f"rank{self.rank}.{what}.{ext}"


def rank_file(job_dir: str | Path, rank: int, what: str) -> Path:
    ext = "jsonl" if what == "trace" else "json"
    return Path(job_dir) / f"rank{rank}.{what}.{ext}"


def load_callable(ref: str) -> Callable[..., Any]:
    mod, _, name = ref.partition(":")
    if not mod or not name:
        raise ValueError(f"entry {ref!r} is not 'module:callable'")
    obj: Any = importlib.import_module(mod)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


class TraceWriter:
    """JSON lines, one per record, flushed per line; keeps the last events for dumps."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "a", buffering=1, encoding="utf-8")
        self._lock = threading.Lock()
        self.last: deque[dict[str, Any]] = deque(maxlen=LAST_EVENTS)
        self.count = 0

    def write(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, default=repr)
        with self._lock:
            self.last.append(rec)
            self.count += 1
            if not self._f.closed:
                self._f.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._f.close()


class StateBoard:
    """What each activity thread is in, mirrored into a memory-mapped file (``rank<r>.board``).

    A CUDA call can hold the GIL for seconds (CuPy loading a cold module behind a resident kernel): then no
    Python thread of the rank runs, the watchdog cannot answer a dump request, and the launcher reads this
    board instead (:func:`read_board`). Each thread owns one fixed slot; a slot holds the JSON of a
    :class:`~mooncake_protocol.trace.Blocked` (what/blockers/resource as known when the effect began) or is
    empty. Writing a slot is a memory copy, no system call.
    """

    SLOTS = 64
    SLOT = 2048

    def __init__(self, path: Path) -> None:
        import mmap

        size = self.SLOTS * self.SLOT
        with open(path, "w+b") as f:
            f.truncate(size)
            self._mm = mmap.mmap(f.fileno(), size)
        self._slots: dict[int, int] = {}
        self._lock = threading.Lock()

    def _slot(self, tid: int) -> int | None:
        s = self._slots.get(tid)
        if s is None:
            with self._lock:
                if len(self._slots) >= self.SLOTS:
                    return None
                s = self._slots[tid] = len(self._slots)
        return s

    def enter(self, tid: int, blocked: tr.Blocked) -> None:
        s = self._slot(tid)
        if s is None:
            return
        data = json.dumps(blocked.to_json(), default=repr).encode()[: self.SLOT - 1]
        off = s * self.SLOT
        self._mm[off:off + self.SLOT] = data + b"\0" * (self.SLOT - len(data))

    def leave(self, tid: int) -> None:
        s = self._slots.get(tid)
        if s is not None:
            self._mm[s * self.SLOT] = 0

    def close(self) -> None:
        try:
            self._mm.close()
        except Exception:
            pass


def read_board(path: str | Path) -> list[dict[str, Any]]:
    """The Blocked records (as JSON dicts) on a rank's state board; [] if there is none."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    out = []
    for off in range(0, len(data), StateBoard.SLOT):
        raw = data[off:off + StateBoard.SLOT].split(b"\0", 1)[0]
        if raw:
            try:
                out.append(json.loads(raw))
            except ValueError:
                pass  # a slot being written right now
    return out


@dataclass
class _Current:
    activity: str
    effect: fx.Effect
    since: float  # run seconds


@dataclass
class _Handle:
    name: str
    thread: threading.Thread
    value: Any = None
    error: BaseException | None = None


def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1, default=repr))
    os.replace(tmp, path)


class RankDriver:
    """The interpreter for one rank (lives in the rank's process)."""

    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        self.rank = spec.rank
        self.t0 = spec.t0
        self.trace = TraceWriter(spec.path("trace"))
        self.board = StateBoard(Path(spec.job_dir) / f"rank{spec.rank}.board")
        self.gpu = GpuContext.open(spec.gpu)
        self.table = RegionTable(spec.job_id, spec.job_dir, spec.rank, self.gpu if self.gpu.available else None)
        self.gpu.table = self.table
        self.rpc_client = RpcClient()
        self.rpc_server = RpcServer(spec.host, builtins=rpc_builtins(self.table), delay_s=spec.rpc_delay_s,
                                    closed=spec.rpc_closed)
        self.transfers = TransferEngine(spec.rank, spec.job_dir, self.table, self.rpc_client,
                                        self.gpu if self.gpu.available else None, spec.rpc_timeout_s,
                                        blocked_to=spec.blocked_to)
        self.reader = MemoryReader(self.table, self.transfers)
        self._store_local = threading.local()
        self._stores: list[StoreClient] = []
        self._stores_lock = threading.Lock()
        self.current: dict[int, _Current] = {}
        self.handles: dict[int, _Handle] = {}
        self._handle_ids = itertools.count(1)
        self._cpu_events = itertools.count(1)
        self._dump_lock = threading.Lock()
        self.dumps = 0
        self.finished = threading.Event()
        #: set once the launcher is gone (:meth:`orphaned_exit`): no file is written into the job directory
        #: after that, and none is half-written when it is removed (:meth:`write_file` holds the lock)
        self.orphaned = False
        self._files_lock = threading.Lock()

    # ------------------------------------------------------------------ helpers
    def now(self) -> float:
        return time.monotonic() - self.t0

    def store(self) -> StoreClient:
        c = getattr(self._store_local, "client", None)
        if c is None:
            c = StoreClient(self.spec.store_addr, self.spec.token, self.spec.store_timeout_s)
            self._store_local.client = c
            with self._stores_lock:
                self._stores.append(c)
        return c

    # ------------------------------------------------------------------ running activities
    def run_activity(self, name: str, gen: fx.Activity) -> Any:
        """Drive one activity generator to its end on the calling thread; returns its value."""
        tid = threading.get_ident()
        send: Any = None
        throw: BaseException | None = None
        while True:
            try:
                eff = gen.throw(throw) if throw is not None else gen.send(send)
            except StopIteration as stop:
                return stop.value
            throw = None
            if not isinstance(eff, fx.Effect):
                throw = TypeError(f"activity {name} yielded {eff!r}, not an effect")
                continue
            if isinstance(eff, fx.Mark):
                self._mark(name, eff)
                send = None
                continue
            t0 = self.now()
            self.current[tid] = _Current(name, eff, t0)
            self.board.enter(tid, self._blocked_now(self.current[tid]))
            try:
                send = self.interpret(name, eff)
                result: Any = send
            except Exception as exc:
                throw, send = exc, None
                result = {"error": f"{type(exc).__name__}: {exc}"}
            finally:
                self.current.pop(tid, None)
                self.board.leave(tid)
            self.trace.write(tr.effect_record(self.rank, name, t0, self.now(), eff, result))

    def _mark(self, activity: str, m: fx.Mark) -> None:
        self.trace.write(tr.mark_record(self.rank, activity, self.now(), m))
        if m.name == "collective_start":
            phase: Any = f"collective:{dict(m.data).get('index')}"  # fault points "collective:N"
        elif m.name == "phase":
            phase = dict(m.data).get("phase")
        else:
            return
        if phase is not None and phase == self.spec.kill_at_phase:
            if self.spec.kill_after_s > 0:
                threading.Timer(self.spec.kill_after_s, self.kill_self).start()
            else:
                self.kill_self()
        if phase is not None and phase == self.spec.pause_at_phase:
            os.kill(os.getpid(), signal.SIGSTOP)  # the launcher sends SIGCONT after pause_s

    def kill_self(self) -> None:
        """Fault kill_rank: record the ``killed`` mark the simulator records, then SIGKILL this process."""
        self.trace.write(tr.mark_record(self.rank, "driver", self.now(), fx.mark("killed")))
        self.rpc_server.quiesce()  # replies to requests already handled reach their callers
        os.kill(os.getpid(), signal.SIGKILL)

    def _activity_thread(self, h: _Handle, gen: fx.Activity) -> None:
        from mooncake_protocol.errors import ProtocolError

        try:
            h.value = self.run_activity(h.name, gen)
        except BaseException as exc:  # kept for Join
            h.error = exc
            if isinstance(exc, ProtocolError):  # as the simulator marks it
                self.error_mark(h.name, exc)

    def error_mark(self, activity: str, exc: Any) -> None:
        """Record the ``error`` mark the simulator records when an activity raises a ProtocolError."""
        self.trace.write(tr.mark_record(self.rank, activity, self.now(),
                                        fx.mark("error", text=str(exc), cause=exc.cause)))
        try:
            exc._marked = True  # re-raised by a Join: marked once
        except AttributeError:
            pass

    def interpret(self, activity: str, eff: fx.Effect) -> Any:
        handler = HANDLERS.get(type(eff))
        if handler is None:
            raise TypeError(f"the real driver has no handler for effect {type(eff).__name__}")
        return handler(self, eff)

    # ------------------------------------------------------------------ store
    def _store_set(self, e: fx.StoreSet) -> None:
        self.store().set(e.key, e.value)

    def _store_get(self, e: fx.StoreGet) -> bytes | None:
        return self.store().get(e.key)

    def _store_check(self, e: fx.StoreCheck) -> bool:
        return self.store().check(e.keys)

    def _store_delete(self, e: fx.StoreDelete) -> bool:
        return self.store().delete(e.key)

    def _store_add(self, e: fx.StoreAdd) -> int:
        return self.store().add(e.key, e.delta)

    def _store_wait(self, e: fx.StoreWait) -> bool:
        return self.store().wait(e.keys, e.timeout_s)

    # ------------------------------------------------------------------ RPC
    def _rpc_bind(self, e: fx.RpcBind) -> fx.BindResult:
        return self.rpc_server.bind(e.port)

    def _rpc_serve(self, e: fx.RpcServe) -> None:
        self.rpc_server.serve(e.port, e.handler)

    def _rpc_call(self, e: fx.RpcCall) -> fx.RpcReply:
        return self.rpc_client.call(e.target, e.method, e.payload, e.timeout_s)

    # ------------------------------------------------------------------ memory
    def _allocate(self, e: fx.Allocate) -> fx.Region:
        return self.table.allocate(e)

    def _register(self, e: fx.Register) -> fx.RegisterResult:
        return self.table.register(e.region, e.label, e.want_ipc, e.want_fabric)

    def _read_mem(self, e: fx.ReadMem) -> bytes:
        return self.table.read(e.rid, e.offset, e.length)

    def _write_mem(self, e: fx.WriteMem) -> None:
        self.table.write(e.rid, e.offset, e.data)
        self.gpu.note_host_write(e.rid, e.offset, e.data)

    # ------------------------------------------------------------------ transfers
    def _submit(self, e: fx.SubmitTransfer) -> int:
        return self.transfers.submit(e.writes)

    def _poll(self, e: fx.PollTransfer) -> tuple[str, ...]:
        return self.transfers.status(e.batch)

    def _free(self, e: fx.FreeBatch) -> None:
        self.transfers.free(e.batch)

    # ------------------------------------------------------------------ GPU (or its CPU stand-in)
    def _load_kernel(self, e: fx.LoadKernel) -> None:
        if e.kernel != "spin":
            parse_reduce(e.kernel)
        if self.gpu.available:
            self.gpu.load_kernel(e.kernel)

    def _launch(self, e: fx.Launch) -> None:
        a = e.args
        if e.kernel == "spin":
            if not isinstance(a, fx.SpinArgs):
                raise TypeError("spin kernel needs SpinArgs")
            if not self.gpu.available:
                raise RuntimeError("the spin kernel needs a GPU (CuPy and a CUDA device); this rank has none")
            slot_ptr = self.table.ptr(a.table_rid) + a.slot * 64
            self.gpu.launch_spin(e.stream, slot_ptr, a.table_rid, a.slot, a.task, a.timeout_s)
            return
        dtype, op = parse_reduce(e.kernel)
        if not isinstance(a, fx.ReduceArgs):
            raise TypeError(f"{e.kernel} needs ReduceArgs")
        active_rid = getattr(a, "active_rid", None)
        if self.gpu.available:
            self.gpu.launch_reduce(e.kernel, e.stream, self.table.ptr(a.src_rid) + a.src_offset,
                                   self.table.ptr(a.dst_rid) + a.dst_offset, a.count, a.nranks, a.stride, a.active,
                                   self.table.ptr(active_rid) if active_rid is not None else 0)
            return
        active = a.active
        if active_rid is not None:  # CPU stand-in: read the flags now, as the kernel would when it runs
            active = tuple(b != 0 for b in self.table.read(active_rid, 0, a.nranks))
        item = 2 if dtype == "bfloat16" else 1 if dtype == "bool" else int(__import__("numpy").dtype(dtype).itemsize)
        span = (a.nranks - 1) * a.stride + a.count * item if a.nranks else 0
        src = self.table.read(a.src_rid, a.src_offset, span)
        out = reduce_host(dtype, op, src, a.count, a.nranks, a.stride, active)
        if out is not None:
            self.table.write(a.dst_rid, a.dst_offset, out)

    def _memcpy(self, e: fx.Memcpy) -> None:
        if self.gpu.available:
            self.gpu.memcpy(self.table.ptr(e.dst_rid) + e.dst_offset, self.table.ptr(e.src_rid) + e.src_offset,
                            e.length, e.stream, e.sync)
            return
        self.table.write(e.dst_rid, e.dst_offset, self.table.read(e.src_rid, e.src_offset, e.length))

    def _memset(self, e: fx.Memset) -> None:
        if self.gpu.available:
            self.gpu.memset(self.table.ptr(e.rid) + e.offset, e.value, e.length, e.stream)
            return
        self.table.write(e.rid, e.offset, bytes([e.value & 0xFF]) * e.length)

    def _event_record(self, e: fx.EventRecord) -> int:
        if self.gpu.available:
            return self.gpu.event_record(e.stream)
        return next(self._cpu_events)  # CPU stand-in: work is done synchronously

    def _event_query(self, e: fx.EventQuery) -> bool:
        if self.gpu.available:
            return self.gpu.event_query(e.event)
        return True

    def _host_compute(self, e: fx.HostCompute) -> None:
        """The protocol's own work, done before the effect: its time has passed already."""
        return None

    def _steady_state(self, e: fx.SteadyState) -> int:
        """Real hardware runs every chunk: never fast-forward."""
        return 0

    def _stream_sync(self, e: fx.StreamSync) -> bool:
        if self.gpu.available:
            return self.gpu.stream_sync(e.stream, e.timeout_s)
        return True

    # ------------------------------------------------------------------ time and control
    def _sleep(self, e: fx.Sleep) -> None:
        time.sleep(max(0.0, e.seconds))

    def _now(self, e: fx.Now) -> float:
        return self.now()

    def _spawn(self, e: fx.Spawn) -> int:
        hid = next(self._handle_ids)
        h = _Handle(e.name, threading.Thread())
        h.thread = threading.Thread(target=self._activity_thread, args=(h, e.activity),
                                    name=f"rank{self.rank}-{e.name}", daemon=e.daemon)
        self.handles[hid] = h
        h.thread.start()
        return hid

    def _join(self, e: fx.Join) -> Any:
        h = self.handles[e.handle]
        h.thread.join()
        if h.error is not None:
            raise h.error
        return h.value

    def _wait_until(self, e: fx.WaitUntil) -> bool:
        interval = min(e.poll_s, WAIT_POLL_MAX_S) if e.poll_s > 0 else WAIT_POLL_MAX_S
        deadline = None if e.timeout_s is None else time.monotonic() + e.timeout_s
        while True:
            if e.predicate(self.reader):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def _mark_effect(self, e: fx.Mark) -> None:  # marks are recorded by run_activity; kept for the table
        self._mark("caller", e)

    # ------------------------------------------------------------------ dumps
    def _blocked_now(self, cur: _Current) -> tr.Blocked:
        what, blockers = tr.describe_wait(cur.effect)
        try:
            resource = self.gpu.resource_for(cur.effect)
        except Exception:
            resource = None
        return tr.Blocked(self.rank, cur.activity, type(cur.effect).__name__, what, blockers, round(cur.since, 6),
                          resource)

    def blocked(self) -> list[tr.Blocked]:
        out = [self._blocked_now(cur) for cur in list(self.current.values())]
        return sorted(out, key=lambda b: (b.activity, b.since))

    def dump(self, reason: str) -> Path:
        """Write the hang dump: blocked activities, last events, driver-level state."""
        with self._dump_lock:
            self.dumps += 1
            gpu: dict[str, Any] = {"available": self.gpu.available}
            if self.gpu.available:
                gpu.update(
                    loaded=sorted(self.gpu.kernels.loaded),
                    resident_spins=[asdict(s) for s in self.gpu.resident_spins()],
                    in_cuda=[list(v) for v in self.gpu.in_cuda.values()],
                )
            cur = self.transfers.current
            doc = {
                "rank": self.rank, "pid": os.getpid(), "reason": reason, "seq": self.dumps, "t": round(self.now(), 6),
                "finished": self.finished.is_set(),
                "blocked": [b.to_json() for b in self.blocked()],
                "last_events": list(self.trace.last),
                "driver": {
                    "transfer_thread": None if cur is None else {"doing": cur[0], "since": round(cur[1] - self.t0, 6)},
                    "rpc_served_ports": list(self.rpc_server.served_ports),
                    "gpu": gpu,
                    "trace_records": self.trace.count,
                    "threads": thread_stacks(),
                },
            }
            path = self.spec.path("dump")
            self.write_file(path, doc)
            return path

    def watchdog(self, stop: threading.Event) -> None:
        """Dump on SIGUSR1 or at the deadline; clean up and exit on SIGTERM or when the parent is gone."""
        deadline = self.t0 + self.spec.deadline_s
        parent = os.getppid()
        dumped_at_deadline = False
        while not stop.is_set():
            now = time.monotonic()
            if now >= deadline and not dumped_at_deadline:
                self.dump("deadline")
                dumped_at_deadline = True
            if dumped_at_deadline and now >= deadline + self.spec.exit_grace_s:
                self.emergency_exit(124)
            info = signal.sigtimedwait(_DUMP_SIGNALS, 0.1)
            # (after SIGSTOP/SIGCONT, sigtimedwait can return a struct with garbage: act on known signals only)
            if info is not None and info.si_signo in (signal.SIGUSR1, signal.SIGTERM):
                # the launcher never sends SIGTERM: one "from" it is the parent-death signal (getppid() can still
                # name it while its last threads die), and nobody is left to read a dump
                if info.si_signo == signal.SIGTERM and (info.si_pid == parent or os.getppid() != parent):
                    self.orphaned_exit(143)
                if info.si_signo == signal.SIGUSR1:
                    self.dump("request")
                else:
                    self.dump(f"terminated (signal {info.si_signo}, from pid {info.si_pid})")
                    self.emergency_exit(143)
            if os.getppid() != parent:
                self.orphaned_exit(129)

    def emergency_exit(self, code: int) -> None:
        self.cleanup()
        os._exit(code)

    def write_file(self, path: Path, doc: Any) -> None:
        """Write a JSON file into the job directory, unless the rank is orphaned (see :meth:`orphaned_exit`)."""
        with self._files_lock:
            if not self.orphaned:
                _write_json(path, doc)

    def orphaned_exit(self, code: int) -> None:
        """The launcher is gone (killed): clean up, and remove its temporary job directory, which no one will read
        or remove now. Every orphaned rank removes it as it exits, after its own last write (another thread's
        result file, written while the cleanup made its activity fail, once left the directory behind), so the
        last rank to go leaves nothing."""
        with self._files_lock:
            self.orphaned = True
        self.cleanup()
        if self.spec.job_dir_owned:
            shutil.rmtree(self.spec.job_dir, ignore_errors=True)
        os._exit(code)

    # ------------------------------------------------------------------ end of the run
    def wait_release(self) -> None:
        """Keep serving until every rank is done (see module docstring), bounded by the deadline."""
        mode = self.spec.release
        if mode == "none":
            return
        deadline = self.t0 + self.spec.deadline_s
        client = self.store()
        try:
            if mode == "count":
                client.add(DONE_KEY, 1)
            while time.monotonic() < deadline:
                left = deadline - time.monotonic()
                if mode == "count":
                    v = client.get(DONE_KEY)
                    if v is not None and int(v) >= self.spec.world_size:
                        return
                    time.sleep(min(0.02, max(left, 0)))
                elif client.wait([RELEASE_KEY], min(1.0, max(left, 0.0))):
                    return
        except Exception:
            return  # the store is gone: nobody needs us any more

    _cleaned = False

    def cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        for fn in (self.transfers.close, self.rpc_server.close, self.rpc_client.close, self.table.close):
            try:
                fn()
            except Exception:
                pass
        with self._stores_lock:
            for c in self._stores:
                try:
                    c.close()
                except Exception:
                    pass
        try:
            self.trace.close()
        except Exception:
            pass
        self.board.close()


HANDLERS: dict[type[fx.Effect], Callable[[RankDriver, Any], Any]] = {
    fx.StoreSet: RankDriver._store_set,
    fx.StoreGet: RankDriver._store_get,
    fx.StoreCheck: RankDriver._store_check,
    fx.StoreDelete: RankDriver._store_delete,
    fx.StoreAdd: RankDriver._store_add,
    fx.StoreWait: RankDriver._store_wait,
    fx.RpcBind: RankDriver._rpc_bind,
    fx.RpcServe: RankDriver._rpc_serve,
    fx.RpcCall: RankDriver._rpc_call,
    fx.Allocate: RankDriver._allocate,
    fx.Register: RankDriver._register,
    fx.ReadMem: RankDriver._read_mem,
    fx.WriteMem: RankDriver._write_mem,
    fx.SubmitTransfer: RankDriver._submit,
    fx.PollTransfer: RankDriver._poll,
    fx.FreeBatch: RankDriver._free,
    fx.LoadKernel: RankDriver._load_kernel,
    fx.Launch: RankDriver._launch,
    fx.Memcpy: RankDriver._memcpy,
    fx.Memset: RankDriver._memset,
    fx.EventRecord: RankDriver._event_record,
    fx.EventQuery: RankDriver._event_query,
    fx.StreamSync: RankDriver._stream_sync,
    fx.SteadyState: RankDriver._steady_state,
    fx.HostCompute: RankDriver._host_compute,
    fx.Sleep: RankDriver._sleep,
    fx.Now: RankDriver._now,
    fx.Spawn: RankDriver._spawn,
    fx.Join: RankDriver._join,
    fx.WaitUntil: RankDriver._wait_until,
    fx.Mark: RankDriver._mark_effect,
}


def _set_parent_death_signal() -> None:
    """Ask Linux to send SIGTERM when the launcher dies (the watchdog then cleans up)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def start_barrier(driver: RankDriver) -> None:
    """Wait until every rank of the job is up (see the module docstring); bounded by the rank's deadline."""
    spec = driver.spec
    if not spec.start_barrier or spec.world_size <= 1 or spec.release == "none":
        return
    try:
        client = driver.store()
        if client.add(READY_KEY, 1) >= spec.world_size:
            client.set(GO_KEY, b"1")
        else:
            client.wait([GO_KEY], max(0.0, spec.t0 + spec.deadline_s - time.monotonic()))
    except Exception:
        pass  # no store (or it went away): start anyway; the run's own waits will tell


def run_rank(spec: RankSpec) -> int:
    """Run one rank to its end in this process. Returns the exit code.

    0: the top-level activity returned; 1: it raised ProtocolError (verdict ``error``); 3: anything else
    raised (a driver or protocol bug). The result file says which, with the value or the error.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, _DUMP_SIGNALS)  # before any thread exists: all inherit it
    _set_parent_death_signal()
    for p in spec.pythonpath:
        if p not in sys.path:
            sys.path.insert(0, p)
    driver = RankDriver(spec)
    stop = threading.Event()
    wd = threading.Thread(target=driver.watchdog, args=(stop,), name="watchdog", daemon=True)
    wd.start()
    result: dict[str, Any] = {"rank": spec.rank, "pid": os.getpid()}
    code = 0
    activity: Any = None
    entry_error: BaseException | None = None
    try:
        activity = load_callable(spec.entry)(spec)
    except Exception as exc:
        entry_error = exc
    start_barrier(driver)
    try:
        if entry_error is not None:
            raise entry_error
        value = driver.run_activity("caller", activity)
        result.update(status="completed", value=tr._jsonable(value))
    except Exception as exc:
        from mooncake_protocol.errors import ProtocolError

        if isinstance(exc, ProtocolError):
            if not getattr(exc, "_marked", False):
                driver.error_mark("caller", exc)
            result.update(status="error", error=str(exc), cause=exc.cause)
            code = 1
        else:
            result.update(status="crash", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            code = 3
    result["t"] = round(driver.now(), 6)
    result["write_s"] = {k: list(v) for k, v in list(driver.transfers.durations.items())}
    result["write_first_s"] = {k: list(v) for k, v in list(driver.transfers.first_durations.items())}
    result["write_connect_s"] = {k: list(v) for k, v in list(driver.transfers.connect_durations.items())}
    driver.finished.set()
    driver.write_file(spec.path("result"), result)
    for h in list(driver.handles.values()):
        if not h.thread.daemon:
            h.thread.join(max(0.0, spec.t0 + spec.deadline_s - time.monotonic()))
    driver.wait_release()
    stop.set()
    wd.join(1)
    driver.cleanup()
    return code
