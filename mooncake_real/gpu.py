"""CUDA in real mode, through CuPy (imported lazily: this module imports and works without it).

Rules of this module:

* The spin kernel (``spin``) is one thread. It clears the slot's ``gave_up`` word, writes the task bytes
  into slot ``slot`` of the task table (64-byte slots: int32 ``active`` at offset 0, int32 ``gave_up`` at
  offset 4, task bytes from offset 8, at most :data:`TASK_BYTES`), fences (``__threadfence_system``), sets
  ``active = 1`` and spins while ``active`` stays 1. It is bounded by ``%globaltimer``: after ``timeout_s``
  it sets ``gave_up = 1`` and ``active = 3`` (:data:`SPIN_TIMED_OUT`) and exits, so it can never hang the
  GPU. ``gave_up`` stays set when the worker later writes ``active``; the caller checks it after the
  collective (``collectives.spin_gave_up``).
* Reduce kernels ``reduce_<dtype>_<op>``: 64 blocks x 256 threads, grid-stride loop; per element the first
  active rank initialises the accumulator, the others are combined; inactive ranks are skipped; nothing is
  written when no rank is active. The active set is a bit mask argument, or (``ReduceArgs.active_rid``) a
  region of one byte per rank that the kernel reads when it runs. The accumulator has the element type (C++ promotions, then truncation:
  integers wrap, bool sum/max = or, product/min = and); bfloat16 travels as uint16 bit patterns, is widened
  to float for each step and rounded back to nearest-even after it. No float16 (as in Mooncake).
  :func:`reduce_host` is the same rule in numpy, for the CPU backend.
* Every kernel is its own module (its own ``RawKernel``), so loading is per kernel, as in the real backend.
  :meth:`KernelCache.load` preloads (``RawKernel.compile()``, else ``.attributes``); a cold kernel is loaded by
  its first launch. With CuPy that first launch blocks host threads while a kernel of this process is
  resident (lazy-loading-probe.md).
* Streams: ``legacy`` is the legacy default stream (``Stream.null``); ``blocking:<name>`` a blocking stream;
  any other name a non-blocking stream (``Stream(non_blocking=True)``), created on first use.
* :class:`GpuContext` tracks loaded kernels, resident spin kernels and which host thread is inside which
  CUDA call, so a hang dump can name the resource holding a thread: ``module-load:<kernel>`` or
  ``legacy-stream`` (:meth:`GpuContext.resource_for`).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

SLOT_BYTES = 64
TASK_OFFSET = 8
TASK_BYTES = SLOT_BYTES - TASK_OFFSET
SPIN_ACTIVE = 1
SPIN_TIMED_OUT = 3

REDUCE_DTYPES = ("uint8", "int8", "int16", "int32", "int64", "float32", "float64", "bool", "bfloat16")
REDUCE_OPS = ("sum", "min", "max", "product")
REDUCE_GRID = (64,)
REDUCE_BLOCK = (256,)

_CTYPES = {
    "uint8": "unsigned char", "int8": "signed char", "int16": "short", "int32": "int",
    "int64": "long long", "float32": "float", "float64": "double", "bool": "bool",
    "bfloat16": "unsigned short",
}
_OPS_C = {"sum": "(a + b)", "product": "(a * b)", "min": "(b < a ? b : a)", "max": "(b > a ? b : a)"}

SPIN_SOURCE = r"""
extern "C" __global__ void spin(int* slot_base,
                                unsigned long long w0, unsigned long long w1, unsigned long long w2,
                                unsigned long long w3, unsigned long long w4, unsigned long long w5,
                                unsigned long long w6, unsigned long long timeout_ns) {
    volatile int* active = slot_base;
    volatile int* gave_up = slot_base + 1;
    volatile unsigned long long* task = (volatile unsigned long long*)((char*)slot_base + 8);
    *gave_up = 0;
    task[0] = w0; task[1] = w1; task[2] = w2; task[3] = w3; task[4] = w4; task[5] = w5; task[6] = w6;
    __threadfence_system();
    *active = 1;
    __threadfence_system();
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    while (*active == 1) {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        if (now - start > timeout_ns) {
            *gave_up = 1;
            __threadfence_system();
            *active = 3;
            __threadfence_system();
            return;
        }
    }
}
"""


def reduce_kernel_name(dtype: str, op: str) -> str:
    return f"reduce_{dtype}_{op}"


def reduce_source(dtype: str, op: str) -> str:
    """CUDA source of one reduce kernel (one module per kernel)."""
    t = _CTYPES[dtype]
    expr = _OPS_C[op]
    if dtype == "bfloat16":
        combine = f"""
    float a = __uint_as_float(((unsigned int)acc) << 16);
    float b = __uint_as_float(((unsigned int)v) << 16);
    float res = {expr};
    unsigned int u = __float_as_uint(res);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu)) acc = (unsigned short)((u >> 16) | 0x40u);
    else acc = (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);"""
    else:
        combine = f"""
    {t} a = acc; {t} b = v;
    acc = ({t}){expr};"""
    return f"""
extern "C" __global__ void {reduce_kernel_name(dtype, op)}(const unsigned char* src, {t}* dst, long long count,
                                                 int nranks, long long stride, unsigned long long active,
                                                 const unsigned char* active_flags) {{
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
       i += (long long)blockDim.x * gridDim.x) {{
    bool init = false;
    {t} acc = ({t})0;
    for (int r = 0; r < nranks; ++r) {{
      if (active_flags ? !active_flags[r] : !((active >> r) & 1ull)) continue;
      {t} v = ((const {t}*)(src + (long long)r * stride))[i];
      if (!init) {{ acc = v; init = true; continue; }}
      {combine}
    }}
    if (init) dst[i] = acc;
  }}
}}
"""


def all_kernel_names() -> tuple[str, ...]:
    return ("spin",) + tuple(reduce_kernel_name(d, o) for d in REDUCE_DTYPES for o in REDUCE_OPS)


def parse_reduce(kernel: str) -> tuple[str, str]:
    """("int32", "sum") from "reduce_int32_sum"; ValueError for an unknown kernel."""
    if not kernel.startswith("reduce_"):
        raise ValueError(f"not a reduce kernel: {kernel!r}")
    dtype, _, op = kernel[len("reduce_"):].rpartition("_")
    if dtype not in REDUCE_DTYPES or op not in REDUCE_OPS:
        raise ValueError(f"unsupported reduce kernel {kernel!r} (dtypes {', '.join(REDUCE_DTYPES)}; ops {', '.join(REDUCE_OPS)})")
    return dtype, op


# ---------------------------------------------------------------------------------- numpy (CPU) reduce


def _bf16_to_f32(bits: Any) -> Any:
    import numpy as np

    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(x: Any) -> Any:
    import numpy as np

    u = np.asarray(x, dtype=np.float32).view(np.uint32)
    nan = ((u & 0x7F800000) == 0x7F800000) & ((u & 0x007FFFFF) != 0)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def reduce_host(dtype: str, op: str, src: bytes, count: int, nranks: int, stride: int, active: tuple[bool, ...]) -> bytes | None:
    """The reduce kernels' rule on the CPU: bytes of ``count`` results, or None when no rank is active."""
    import numpy as np

    npdtype = {"bfloat16": np.uint16, "bool": np.bool_}.get(dtype, dtype)
    item = np.dtype(npdtype).itemsize
    acc = None
    with np.errstate(over="ignore", invalid="ignore"):
        for r in range(nranks):
            if r >= len(active) or not active[r]:
                continue
            v = np.frombuffer(src, dtype=npdtype, count=count, offset=r * stride)
            if acc is None:
                acc = v.copy()
                continue
            if dtype == "bfloat16":
                a, b = _bf16_to_f32(acc), _bf16_to_f32(v)
                acc = _f32_to_bf16(_combine(op, a, b))
            elif dtype == "bool":
                acc = {"sum": acc | v, "max": acc | v, "product": acc & v, "min": acc & v}[op]
            else:
                acc = _combine(op, acc, v).astype(npdtype)
    del item
    return None if acc is None else acc.tobytes()


def _combine(op: str, a: Any, b: Any) -> Any:
    import numpy as np

    if op == "sum":
        return a + b
    if op == "product":
        return a * b
    if op == "min":
        return np.where(b < a, b, a)
    return np.where(b > a, b, a)


# ---------------------------------------------------------------------------------- GPU context


def cupy_or_none() -> Any:
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:
        return None


def gpu_count() -> int:
    cp = cupy_or_none()
    return 0 if cp is None else int(cp.cuda.runtime.getDeviceCount())


class KernelCache:
    """The kernels of this process and which of them are loaded."""

    def __init__(self, cp: Any) -> None:
        self.cp = cp
        self._kernels: dict[str, Any] = {}
        self.loaded: set[str] = set()
        self._lock = threading.Lock()

    def get(self, name: str) -> Any:
        with self._lock:
            k = self._kernels.get(name)
            if k is None:
                if name == "spin":
                    src = SPIN_SOURCE
                else:
                    src = reduce_source(*parse_reduce(name))
                k = self._kernels[name] = self.cp.RawKernel(src, name)
            return k

    def load(self, name: str) -> None:
        """Preload: compile and load the module now (what cudaFuncGetAttributes does for the real backend)."""
        k = self.get(name)
        compile_ = getattr(k, "compile", None)
        if compile_ is not None:
            compile_()
        else:
            _ = k.attributes
        self.loaded.add(name)


def warm_disk_cache() -> int:
    """Compile every kernel of the backend into CuPy's disk cache, in this (launcher) process.

    The real backend ships compiled kernels: its lazy loading only *loads* a module at first launch, which
    takes milliseconds and starts right behind the spin kernel. A rank process that first had to run NVRTC
    for tens of milliseconds would load the module only after the exchange finished and hide the hazard.
    So the launcher compiles once; rank processes then find the cubins on disk and load them lazily, as
    the backend does. Returns the number of kernels compiled (0 without CuPy).
    """
    cp = cupy_or_none()
    if cp is None:
        return 0
    from mooncake_protocol.reduce import all_reduce_kernels

    cache = KernelCache(cp)
    names = ("spin", *all_reduce_kernels())
    for name in names:
        cache.load(name)
    return len(names)


@dataclass
class SpinRecord:
    table_rid: int
    slot: int
    stream: str
    launched_at: float
    released: bool = False


@dataclass
class DeviceBuffer:
    """A device region's storage."""

    gpu: GpuContext
    mem: Any
    size: int
    name: str = ""

    @property
    def ptr(self) -> int:
        return int(self.mem.ptr)

    def fill_zero(self) -> None:
        self.gpu.host_io("memset", lambda s: self.gpu.cp.cuda.runtime.memsetAsync(self.ptr, 0, self.size, s.ptr),
                         wait=False)

    def read(self, offset: int, length: int) -> bytes:
        import numpy as np

        out = np.empty(length, dtype=np.uint8)
        self.gpu.host_io("memcpy", lambda s: self.gpu.cp.cuda.runtime.memcpyAsync(
            out.ctypes.data, self.ptr + offset, length, 4, s.ptr), wait=True)
        return out.tobytes()

    def write(self, offset: int, data: bytes) -> None:
        import numpy as np

        # from pageable memory the bytes are staged before the call returns: ``data`` may go at once
        buf = np.frombuffer(data, dtype=np.uint8)
        self.gpu.host_io("memcpy", lambda s: self.gpu.cp.cuda.runtime.memcpyAsync(
            self.ptr + offset, buf.ctypes.data, len(data), 4, s.ptr), wait=False)

    def free(self) -> None:
        self.mem = None


@dataclass
class GpuContext:
    """One rank's view of its GPU. ``available`` is False without CuPy or a device (CPU backend)."""

    device: int = 0
    cp: Any = None
    available: bool = False
    kernels: Any = None
    streams: dict[str, Any] = field(default_factory=dict)
    events: dict[int, Any] = field(default_factory=dict)
    spins: list[SpinRecord] = field(default_factory=list)
    #: thread ident -> (what CUDA call, kernel or stream, monotonic start)
    in_cuda: dict[int, tuple[str, str, float]] = field(default_factory=dict)
    table: Any = None  # RegionTable, set by the driver (spin release tracking)

    def __post_init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._event_ids = itertools.count(1)
        self._registered: dict[str, int] = {}
        self._io_event: Any = None  # the last host write or fill of a device region (host_io)
        self._io_waited: set[str] = set()  # streams already made to wait for it
        self._ipc_open: dict[bytes, int] = {}

    @staticmethod
    def open(device: int | None) -> GpuContext:
        cp = cupy_or_none() if device is not None else None
        if cp is None or device is None:
            return GpuContext(device=-1)
        ctx = GpuContext(device=device, cp=cp, available=True)
        ctx.kernels = KernelCache(cp)
        ctx.enter()
        return ctx

    def enter(self) -> None:
        """Make this rank's device current on the calling thread (CuPy's current device is per thread)."""
        if not getattr(self._local, "entered", False):
            self.cp.cuda.Device(self.device).use()
            self._local.entered = True

    # ------------------------------------------------------------------ memory
    def alloc_device(self, size: int) -> DeviceBuffer:
        self.enter()
        return DeviceBuffer(self, self.cp.cuda.alloc(max(size, 1)), size)

    def host_register(self, seg: Any) -> None:
        self.enter()
        # cudaHostRegisterPortable | cudaHostRegisterMapped
        self.cp.cuda.runtime.hostRegister(seg.ptr, max(seg.size, 1), 3)
        self._registered[seg.name] = seg.ptr

    def host_unregister(self, seg: Any) -> None:
        ptr = self._registered.pop(seg.name, None)
        if ptr is not None:
            try:
                self.enter()
                self.cp.cuda.runtime.hostUnregister(ptr)
            except Exception:
                pass

    def device_ptr_of_host(self, seg: Any) -> int:
        self.enter()
        if seg.name in self._registered:
            fn = getattr(self.cp.cuda.runtime, "hostGetDevicePointer", None)
            if fn is not None:
                return int(fn(seg.ptr, 0))
        # unified addressing (every 64-bit Linux CUDA host): a registered mapped host pointer is valid on the GPU
        return int(seg.ptr)

    def ipc_get_handle(self, ptr: int) -> bytes | None:
        """Export a CUDA IPC handle; None when CUDA refuses (host memory: cudaErrorInvalidValue)."""
        self.enter()
        try:
            return bytes(self.cp.cuda.runtime.ipcGetMemHandle(ptr))
        except Exception:
            return None

    def ipc_open(self, handle: bytes) -> int:
        self.enter()
        with self._lock:
            if handle not in self._ipc_open:
                # cudaIpcMemLazyEnablePeerAccess
                self._ipc_open[handle] = int(self._call("ipc-open", "peer",
                                                        lambda: self.cp.cuda.runtime.ipcOpenMemHandle(handle, 1)))
            return self._ipc_open[handle]

    def host_io(self, what: str, fn: Any, wait: bool) -> None:
        """Run ``fn(stream)`` (a host<->device copy or a memset of a :class:`DeviceBuffer`) on the rank's own
        non-blocking stream ``__hostio__``; ``wait``: until the device has finished it (a read), else every
        stream this rank enqueues work on later waits for it on the device first (:meth:`work_stream`).

        Not ``cudaMemcpy``/``cudaMemset`` on the legacy stream, with nothing after: the memset returns at once,
        a small copy from pageable memory once its bytes are staged, and the copy the protocol then enqueues
        on a non-blocking stream (the fixed policy's ``enqueue``) does not wait for the legacy stream. A 20 KB
        allgather input arrived half written or zeroed after its values, differently on every run. Waiting on
        the host instead cost a GPU time slice (about 2 ms with other ranks' spin kernels resident) per
        write; a caller's tensor reaches Mooncake stream-ordered, not waited for. Like the simulator's
        ``ReadMem`` and ``WriteMem``, none of this queues behind kernels of other streams."""
        self.enter()
        s = self.stream("__hostio__")
        self._call(what, "__hostio__", lambda: fn(s))
        if wait:
            self._call("sync", "__hostio__", s.synchronize)
            return
        ev = self.cp.cuda.Event(disable_timing=True)
        self._call("event", "__hostio__", lambda: ev.record(s))
        with self._lock:
            self._io_event = ev
            self._io_waited = set()

    def work_stream(self, name: str) -> Any:
        """Stream ``name``, made to wait on the device for the last host write or fill of a device region."""
        s = self.stream(name)
        with self._lock:
            ev = self._io_event
            if ev is None or name in self._io_waited:
                return s
            self._io_waited.add(name)
        self._call("event", name, lambda: s.wait_event(ev))
        return s

    def copy_ptr(self, dst: int, src: int, length: int) -> None:
        """A synchronous copy for the NVLink transport, on its own non-blocking stream (as TENT does)."""
        self.enter()
        s = self.work_stream("__transfer__")
        self._call("memcpy", "__transfer__", lambda: self.cp.cuda.runtime.memcpyAsync(dst, src, length, 4, s.ptr))
        self._call("sync", "__transfer__", s.synchronize)

    # ------------------------------------------------------------------ streams, events
    def stream(self, name: str) -> Any:
        self.enter()
        with self._lock:
            s = self.streams.get(name)
            if s is None:
                if name == "legacy":
                    s = self.cp.cuda.Stream.null
                elif name.startswith("blocking:"):
                    s = self.cp.cuda.Stream(non_blocking=False)
                else:
                    s = self.cp.cuda.Stream(non_blocking=True)
                self.streams[name] = s
            return s

    def _call(self, what: str, target: str, fn: Any) -> Any:
        tid = threading.get_ident()
        self.in_cuda[tid] = (what, target, time.monotonic())
        try:
            return fn()
        finally:
            self.in_cuda.pop(tid, None)

    def load_kernel(self, name: str) -> None:
        self.enter()
        self._call("load", name, lambda: self.kernels.load(name))

    def launch_spin(self, stream: str, slot_ptr: int, table_rid: int, slot: int, task: bytes, timeout_s: float) -> None:
        import numpy as np

        if len(task) > TASK_BYTES:
            raise ValueError(f"task of {len(task)} bytes does not fit a {SLOT_BYTES}-byte slot")
        words = np.frombuffer(task.ljust(TASK_BYTES, b"\0"), dtype="<u8")
        args = (np.uint64(slot_ptr), *[np.uint64(w) for w in words], np.uint64(int(timeout_s * 1e9)))
        self._launch("spin", stream, (1,), (1,), args)
        with self._lock:
            self.spins.append(SpinRecord(table_rid, slot, stream, time.monotonic()))

    def launch_reduce(self, kernel: str, stream: str, src_ptr: int, dst_ptr: int, count: int, nranks: int,
                      stride: int, active: tuple[bool, ...], active_ptr: int = 0) -> None:
        """``active_ptr``: device-visible bytes, one per rank, read when the kernel runs (0: use ``active``)."""
        import numpy as np

        mask = sum(1 << r for r, a in enumerate(active[:64]) if a)
        args = (np.uint64(src_ptr), np.uint64(dst_ptr), np.int64(count), np.int32(nranks), np.int64(stride),
                np.uint64(mask), np.uint64(active_ptr))
        self._launch(kernel, stream, REDUCE_GRID, REDUCE_BLOCK, args)

    def _launch(self, kernel: str, stream: str, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        self.enter()
        k = self.kernels.get(kernel)
        s = self.work_stream(stream)
        self._call("launch", kernel, lambda: k(grid, block, args, stream=s))
        self.kernels.loaded.add(kernel)

    def memcpy(self, dst: int, src: int, length: int, stream: str, sync: bool) -> None:
        self.enter()
        rt = self.cp.cuda.runtime
        s = self.work_stream(stream)
        self._call("memcpy", stream, lambda: rt.memcpyAsync(dst, src, length, 4, s.ptr))
        if sync:
            self._call("sync", stream, s.synchronize)

    def memset(self, ptr: int, value: int, length: int, stream: str) -> None:
        self.enter()
        s = self.work_stream(stream)
        self._call("memset", stream, lambda: self.cp.cuda.runtime.memsetAsync(ptr, value, length, s.ptr))

    def event_record(self, stream: str) -> int:
        self.enter()
        ev = self.cp.cuda.Event(disable_timing=True)
        s = self.work_stream(stream)
        self._call("event", stream, lambda: ev.record(s))
        eid = next(self._event_ids)
        self.events[eid] = ev
        return eid

    def event_query(self, eid: int) -> bool:
        self.enter()
        ev = self.events[eid]
        return bool(self._call("event", "query", lambda: ev.done))

    def stream_sync(self, stream: str, timeout_s: float) -> bool:
        self.enter()
        s = self.stream(stream)
        deadline = time.monotonic() + timeout_s
        while True:
            if self._call("sync", stream, lambda: s.done):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)

    # ------------------------------------------------------------------ hazards, for dumps
    def note_host_write(self, rid: int, offset: int, data: bytes) -> None:
        """The host wrote into region ``rid``: a write over a slot's ``active`` word releases its spin."""
        with self._lock:
            for s in self.spins:
                if s.table_rid == rid and not s.released:
                    a = s.slot * SLOT_BYTES
                    if offset <= a < offset + len(data):
                        s.released = True

    def resident_spins(self) -> list[SpinRecord]:
        out = []
        with self._lock:
            spins = list(self.spins)
        for s in spins:
            if s.released:
                continue
            if self.table is not None:
                try:
                    flag = int.from_bytes(self.table.read(s.table_rid, s.slot * SLOT_BYTES, 4), "little", signed=True)
                    if flag == SPIN_TIMED_OUT:
                        s.released = True
                        continue
                except Exception:
                    pass
            out.append(s)
        return out

    def cold_loading(self) -> str | None:
        """The cold kernel some thread is loading by launching it, if any."""
        for what, target, _ in list(self.in_cuda.values()):
            if what in ("launch", "load") and target not in self.kernels.loaded:
                return target
        return None

    def resource_for(self, effect: Any) -> str | None:
        """The driver-level resource holding a thread that is blocked in ``effect`` (None if none known)."""
        if not self.available:
            return None
        resident = self.resident_spins()
        if not resident:
            return None
        name = type(effect).__name__
        kernel = getattr(effect, "kernel", None)
        if name in ("Launch", "LoadKernel") and kernel is not None and kernel not in self.kernels.loaded:
            return f"module-load:{kernel}"
        cold = self.cold_loading()
        if cold is not None and name in ("Launch", "LoadKernel", "Memcpy", "Memset", "EventRecord", "EventQuery", "StreamSync"):
            return f"module-load:{cold}"
        stream = getattr(effect, "stream", None)
        blocking = {s.stream for s in resident if s.stream == "legacy" or s.stream.startswith("blocking:")}
        if name in ("Memcpy", "StreamSync") and stream is not None:
            if (stream == "legacy" or stream.startswith("blocking:")) and blocking:
                return "legacy-stream"
        return None
