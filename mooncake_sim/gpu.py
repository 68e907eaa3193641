"""The GPU model: streams, kernels, the spin kernel, and the lazy module loader.

One :class:`Context` per rank process on its GPU (several ranks sharing a GPU have separate contexts: the
lazy-loading hazard is per context, as the H100 probe showed). Facts modelled (lazy-loading-probe.md):

* Streams are FIFO queues; ops on different streams run concurrently.
* The spin kernel publishes its task into the mapped task table and stays resident until the host worker
  clears the task's active flag (or its own timeout passes).
* Module loading needs a context with no running kernel. Launching a kernel whose module is not loaded
  while a kernel is resident holds back *all new device work on every stream* of that context until no
  kernel is resident (the runtime API; the launch call itself returns). With a JIT loader (CuPy), the host
  thread that launches, and every other host CUDA call of the process, blocks as well.
* A preloaded kernel (cudaFuncGetAttributes / RawKernel.compile) launches freely;
  CUDA_MODULE_LOADING=EAGER loads runtime-API kernels at context creation.
* A process's first kernel (its first load or launch) costs a one-time host set-up on top (calibrated
  ``first_kernel_s``; none without it): CuPy initialises its compiler and kernel cache then, 27-36 ms in a
  fresh process on the H100 host and 38-62 ms inside a 2-4 rank job (docs/parity.md, eighth session).
* Time-slicing (calibrated: ``gpu_timeslice_s``; off without it). Contexts of several processes on one GPU
  without MPS take turns of one slice T each while more than one has work. What
  ``benchmarks/probe_timeslice.py --jitter`` measured on an H100 (T = 2.25 ms) for SM work (kernels,
  device-to-device copies, memsets) arriving at a random moment, with k other contexts holding a resident
  kernel: a context that has a kernel resident itself waits for its next slice, uniform in 0..(k+1)T; an
  idle context starts at once beside one busy context and waits T + uniform 0..kT beside two or more. A
  resident spin kernel sees its flag cleared at its context's next slice (0..(k+1)T). SM work queued behind
  SM work of its context that has just finished runs on in that slice without a wait of its own (the probe's
  ``burst3``: three steps queued back to back on one stream waited as long as one step), so a collective's
  tail (memset, reduce kernel, copy out) waits once, when its spin kernel ends. Host-to-device and
  device-to-host copies run on the copy engines and do not wait, nor does an NVLink copy whose latency was
  measured inside a job (``nvlink_same_gpu_s``: it holds its waits). The draws come from a seeded generator.

Rules: the model never decides protocol behaviour; it only delays or holds device work and reports, for a
hang dump, which resource holds what.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from random import Random

import simpy

KERNEL_LAUNCH_S = 3e-6  # host cost of a kernel launch call
ASYNC_CALL_S = 2e-6  # host cost of an asynchronous memcpy/memset call
START_LATENCY_S = 10e-6  # from a launch call until the work can start on the device
MODULE_LOAD_S = 1e-3  # runtime-API module load when the context is idle
DEVICE_BW = 1.5e12  # bytes/s for copies within a GPU (read+write ~3 TB/s)
HOST_LINK_BW = 53e9  # pinned H2D/D2H (probe: 53-54 GB/s)
REDUCE_BW = 1.5e12


@dataclass(eq=False)
class Op:
    kind: str  # kernel | spin | memcpy | memset | event | load
    stream: str
    duration: float
    desc: str
    kernel: str | None = None
    on_start: Callable[[], None] | None = None
    on_done: Callable[[], None] | None = None
    done: simpy.Event | None = None
    started: bool = False
    finished: bool = False
    start_t: float = 0.0
    seq: int = 0
    ready_t: float = 0.0
    wake_set: bool = False
    sm: bool = False  # runs on the SMs (kernel, device-to-device copy, memset), so it waits for its time slice
    sliced: bool = False  # its time-slice wait was drawn


@dataclass
class Stream:
    name: str
    queue: deque[Op] = field(default_factory=deque)
    running: Op | None = None


class Context:
    def __init__(self, model: GpuModel, rank: int, eager: bool, jit_loader: bool):
        self.model = model
        self.env = model.env
        self.rank = rank
        self.streams: dict[str, Stream] = {}
        self.loaded: set[str] = set()
        self.kernels_used = False  # a kernel was loaded or launched (the one-time set-up is behind)
        self.eager = eager
        self.jit_loader = jit_loader
        self.next_seq = 1
        #: a cold kernel's module waiting to load: (kernel, barrier seq). Work submitted up to the barrier
        #: runs on; everything submitted later is held until every op up to the barrier has finished.
        self.load_pending: tuple[str, int] | None = None
        self.loading = False
        self.load_waiters: list[simpy.Event] = []
        self.unfinished: dict[int, Op] = {}
        self.running_kernels: set[Op] = set()
        self.spins: dict[tuple[int, int], Op] = {}  # (table rid, slot) -> resident spin op
        self.events: dict[int, Op] = {}
        self.next_event = 1
        #: when SM work of this context last finished, and the sequence number of the next op submitted then:
        #: work already queued at that moment runs on in that slice
        self.slice_at, self.slice_seq = -1.0, 0

    # ------------------------------------------------------------ queueing

    def stream(self, name: str) -> Stream:
        s = self.streams.get(name)
        if s is None:
            s = self.streams[name] = Stream(name)
        return s

    def is_loaded(self, kernel: str) -> bool:
        return kernel == "spin" or kernel in self.loaded or (self.eager and not self.jit_loader)

    def enqueue(self, op: Op) -> Op:
        op.done = self.env.event()
        op.ready_t = self.env.now + START_LATENCY_S
        op.seq = self.next_seq
        self.next_seq += 1
        self.unfinished[op.seq] = op
        if op.kind == "kernel" and op.kernel and not self.is_loaded(op.kernel) and self.load_pending is None:
            # the first launch of an unloaded kernel: its module must load, which needs the work submitted
            # so far to drain; meanwhile no new device work starts on any stream of this context
            self.load_pending = (op.kernel, op.seq - 1)
            self.model.on_change(self.rank)
        self.stream(op.stream).queue.append(op)
        self._try_load()
        self.schedule()
        return op

    def held(self, op: Op) -> bool:
        return self.load_pending is not None and op.seq > self.load_pending[1]

    def schedule(self) -> None:
        for s in self.streams.values():
            if s.running is not None or not s.queue:
                continue
            op = s.queue[0]
            if self.held(op):
                continue
            if op.sm and not op.sliced:
                op.sliced = True
                if self.slice_at != self.env.now or op.seq >= self.slice_seq:  # not queued behind SM work just ended
                    op.ready_t = max(op.ready_t, self.env.now + self.model.slice_wait(self))
            if op.ready_t > self.env.now:
                if not op.wake_set:
                    op.wake_set = True
                    t = self.env.timeout(op.ready_t - self.env.now)
                    t.callbacks.append(lambda _e: self.schedule())
                continue
            if op.kind == "kernel" and op.kernel and not self.is_loaded(op.kernel):
                continue  # its load is still to come (another module is loading first)
            s.queue.popleft()
            s.running = op
            self._start(op)

    def _try_load(self) -> None:
        if self.load_pending is None or self.loading:
            return
        kernel, barrier = self.load_pending
        if any(seq <= barrier for seq in self.unfinished):
            return
        self.loading = True
        load = self.env.timeout(self.model.load_s(self.rank))

        def done(_e: simpy.Event) -> None:
            self.loaded.add(kernel)
            self.load_pending = None
            self.loading = False
            for w in self.load_waiters:
                if not w.triggered:
                    w.succeed()
            self.load_waiters.clear()
            # the next cold kernel already queued starts its own load
            for op in sorted(self.unfinished.values(), key=lambda o: o.seq):
                if not op.started and op.kind == "kernel" and op.kernel and not self.is_loaded(op.kernel):
                    self.load_pending = (op.kernel, op.seq - 1)
                    break
            self.model.on_change(self.rank)
            self._try_load()
            self.schedule()

        load.callbacks.append(done)

    def _start(self, op: Op) -> None:
        op.started = True
        op.start_t = self.env.now
        if op.kind in ("kernel", "spin"):
            self.running_kernels.add(op)
        if op.on_start is not None:
            op.on_start()
        if op.kind == "spin":
            return  # resident until released
        t = self.env.timeout(op.duration)
        t.callbacks.append(lambda _e, op=op: self._finish(op))

    def _finish(self, op: Op) -> None:
        if op.finished:
            return
        op.finished = True
        if op.sm:
            self.slice_at, self.slice_seq = self.env.now, self.next_seq
        self.unfinished.pop(op.seq, None)
        self.running_kernels.discard(op)
        s = self.streams[op.stream]
        if s.running is op:
            s.running = None
        if op.on_done is not None:
            op.on_done()
        assert op.done is not None
        op.done.succeed()
        self.model.on_change(self.rank)
        self._try_load()
        self.schedule()

    # ------------------------------------------------------------ spin kernel

    def release_spin(self, key: tuple[int, int], noticed: bool = True) -> None:
        """The spin kernel of ``key`` ends: at once when it ``noticed`` by itself (its own timeout), else (the
        host cleared its flag) when it next runs, at its context's next time slice."""
        op = self.spins.pop(key, None)
        if op is None:
            return
        wait = 0.0 if noticed else self.model.slice_wait(self, resident=True)
        if wait <= 0.0:
            self._finish(op)
            return
        spin = op

        def notice(_e: simpy.Event) -> None:
            self._finish(spin)

        self.env.timeout(wait).callbacks.append(notice)

    def busy(self) -> bool:
        """A kernel of this context is resident (it takes part in the GPU's time-slicing)."""
        return bool(self.running_kernels)

    def idle(self) -> bool:
        return not self.unfinished

    # ------------------------------------------------------------ hang reports

    def holds(self) -> list[tuple[str, str]]:
        """(what is held, resource) pairs for a hang dump."""
        out = []
        if self.load_pending is not None:
            kernel, barrier = self.load_pending
            ahead = [o.desc for o in sorted(self.unfinished.values(), key=lambda o: o.seq) if o.seq <= barrier]
            waiting_for = ", ".join(ahead[:3]) + (" ..." if len(ahead) > 3 else "") or "nothing"
            held = [o for o in sorted(self.unfinished.values(), key=lambda o: o.seq) if o.seq > barrier and not o.started]
            for op in held[:8]:
                out.append((f"{op.desc} held: the module load of {kernel} waits for earlier work to drain "
                            f"({waiting_for})", f"module-load:{kernel}"))
            return out
        for s in self.streams.values():
            if s.running is not None and s.running.kind == "spin" and s.queue:
                for op in list(s.queue)[:8]:
                    res = "legacy-stream" if s.name == "legacy" and op.kind == "memcpy" and "engine" in op.desc else f"stream:{s.name}"
                    out.append((f"{op.desc} queued behind the resident spin kernel on stream {s.name}", res))
        return out


class GpuModel:
    def __init__(self, env: simpy.Environment, on_change: Callable[[int], None],
                 device_of: Callable[[int], Hashable] | None = None, seed: str = "",
                 speed_of: Callable[[int], float] | None = None):
        self.env = env
        self.on_change = on_change
        self.contexts: dict[int, Context] = {}
        self.module_load_s = MODULE_LOAD_S  # a calibration may override it
        #: the extra host time of a process's first kernel (calibration ``first_kernel_s``; 0: none)
        self.first_kernel_s = 0.0
        #: a rank's factor on its host costs (calibrated ``rank_spread``): a module load is the driver's work
        #: on the loading process's CPU, so it scales like the rank's other host costs
        self.speed_of = speed_of or (lambda rank: 1.0)
        #: the time slice of contexts sharing a GPU (calibration ``gpu_timeslice_s``); None: no time-slicing
        self.timeslice_s: float | None = None
        self.device_of = device_of or (lambda rank: rank)  # a rank's GPU: contexts on one GPU share its SMs
        self.rng = Random(f"timeslice:{seed}")
        self.slice_waits = 0  # SM ops and spin releases that waited for a slice (a count, for reports and tests)

    def load_s(self, rank: int) -> float:
        """How long a module load of ``rank``'s process takes (preloaded or lazy: the driver's work on its CPU)."""
        return self.module_load_s * self.speed_of(rank)

    def first_kernel_s_of(self, rank: int) -> float:
        """The one-time set-up before ``rank``'s first kernel (host work, like a module load)."""
        return self.first_kernel_s * self.speed_of(rank)

    def slice_wait(self, ctx: Context, resident: bool = False) -> float:
        """How long SM work of ``ctx`` arriving now waits for the context's time slice (the module docstring);
        ``resident``: the work is an already resident kernel's (its context is busy by definition)."""
        t = self.timeslice_s
        if not t:
            return 0.0
        dev = self.device_of(ctx.rank)
        k = sum(1 for c in self.contexts.values() if c is not ctx and c.running_kernels and self.device_of(c.rank) == dev)
        if k == 0:
            return 0.0
        if resident or ctx.busy():
            wait = self.rng.uniform(0.0, (k + 1) * t)
        else:
            wait = 0.0 if k == 1 else t + self.rng.uniform(0.0, k * t)
        self.slice_waits += wait > 0.0
        return wait

    def context(self, rank: int, eager: bool = False, jit_loader: bool = False) -> Context:
        c = self.contexts.get(rank)
        if c is None:
            c = self.contexts[rank] = Context(self, rank, eager, jit_loader)
        return c
