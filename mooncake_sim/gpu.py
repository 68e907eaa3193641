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

Rules: the model never decides protocol behaviour; it only delays or holds device work and reports, for a
hang dump, which resource holds what.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import simpy

KERNEL_LAUNCH_S = 6e-6  # empty RawKernel launch on H100 (probe)
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
        self.eager = eager
        self.jit_loader = jit_loader
        self.load_pending: str | None = None
        self.load_waiters: list[simpy.Event] = []
        self.running_kernels: set[Op] = set()
        self.spins: dict[tuple[int, int], Op] = {}  # (table rid, slot) -> resident spin op
        self.events: dict[int, Op] = {}
        self.next_event = 1

    # ------------------------------------------------------------ queueing

    def stream(self, name: str) -> Stream:
        s = self.streams.get(name)
        if s is None:
            s = self.streams[name] = Stream(name)
        return s

    def enqueue(self, op: Op) -> Op:
        op.done = self.env.event()
        self.stream(op.stream).queue.append(op)
        self.schedule()
        return op

    def is_loaded(self, kernel: str) -> bool:
        return kernel in self.loaded or (self.eager and not self.jit_loader) or kernel == "spin"

    def schedule(self) -> None:
        if self.load_pending is not None:
            if self.running_kernels:
                return  # the loader waits for an idle context; meanwhile nothing new starts
            self._finish_load()
            return
        for s in self.streams.values():
            if s.running is not None or not s.queue:
                continue
            op = s.queue[0]
            if op.kind in ("kernel",) and op.kernel and not self.is_loaded(op.kernel):
                self.load_pending = op.kernel
                self.model.on_change(self.rank)
                if self.running_kernels:
                    return
                self._finish_load()
                return
            s.queue.popleft()
            s.running = op
            self._start(op)

    def _finish_load(self) -> None:
        kernel = self.load_pending
        assert kernel is not None
        load = self.env.timeout(MODULE_LOAD_S)

        def done(_e: simpy.Event) -> None:
            self.loaded.add(kernel)
            if self.load_pending == kernel:
                self.load_pending = None
            for w in self.load_waiters:
                if not w.triggered:
                    w.succeed()
            self.load_waiters.clear()
            self.model.on_change(self.rank)
            self.schedule()

        self.load_pending = kernel + "#loading"
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
        self.running_kernels.discard(op)
        s = self.streams[op.stream]
        if s.running is op:
            s.running = None
        if op.on_done is not None:
            op.on_done()
        assert op.done is not None
        op.done.succeed()
        self.model.on_change(self.rank)
        self.schedule()

    # ------------------------------------------------------------ spin kernel

    def release_spin(self, key: tuple[int, int]) -> None:
        op = self.spins.pop(key, None)
        if op is not None:
            self._finish(op)

    def idle(self) -> bool:
        return not self.running_kernels and all(s.running is None and not s.queue for s in self.streams.values())

    # ------------------------------------------------------------ hang reports

    def holds(self) -> list[tuple[str, str]]:
        """(what is held, resource) pairs for a hang dump."""
        out = []
        queued = [op for s in self.streams.values() for op in s.queue]
        if self.load_pending is not None:
            kernel = self.load_pending.split("#")[0]
            resident = ", ".join(sorted(o.desc for o in self.running_kernels)) or "none"
            for op in queued or [None]:
                what = op.desc if op is not None else "module load"
                out.append((f"{what} held: module load of {kernel} waits for resident kernels ({resident})",
                            f"module-load:{kernel}"))
        else:
            for s in self.streams.values():
                if s.running is not None and s.running.kind == "spin" and s.queue:
                    for op in s.queue:
                        res = "legacy-stream" if s.name == "legacy" else f"stream:{s.name}"
                        out.append((f"{op.desc} queued behind resident spin kernel on stream {s.name}", res))
        return out


class GpuModel:
    def __init__(self, env: simpy.Environment, on_change: Callable[[int], None]):
        self.env = env
        self.on_change = on_change
        self.contexts: dict[int, Context] = {}

    def context(self, rank: int, eager: bool = False, jit_loader: bool = False) -> Context:
        c = self.contexts.get(rank)
        if c is None:
            c = self.contexts[rank] = Context(self, rank, eager, jit_loader)
        return c
