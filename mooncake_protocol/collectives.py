"""Collectives: submission by the caller (section 7.1) and the per-op buffer layout (section 7.3).

The caller cuts the tensor into chunks of ``((16 MiB - 1) / size) & ~7`` bytes per rank slice. Per chunk:

* CUDA path: on the spin stream (the legacy default stream before #1863, a non-blocking enqueue stream
  after), copy the chunk into ``send_buffer[parity]``, launch the spin kernel for task slot
  ``2 + cudaTaskCount % 2``, then the buffer-to-tensor step (copies, or memset + reduce kernel). The caller
  returns at once; reading the result waits for the stream.
* CPU path: slot ``cpuTaskCount % 2`` must be idle; fill it from the host, publish, wait for the worker,
  then copy or reduce on the host.

Values are real bytes (numpy) so both worlds compute results; ``data: sizes`` scenarios skip payloads.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import effects as fx
from .effects import Activity, mark
from .errors import ProtocolError
from .rankenv import BUFFER_SIZE
from .reduce import ITEMSIZE, combine, from_numpy, kernel_name, to_numpy, unsupported_reason
from .worker import ACTIVE_SET, SLOT_BYTES, SPIN_GAVE_UP_OFFSET, TASK_OFFSET, Op, Task

if TYPE_CHECKING:
    from .backend import Backend

OPS = {
    "allreduce": Op.ALLREDUCE, "reduce": Op.REDUCE, "broadcast": Op.BROADCAST, "allgather": Op.ALLGATHER,
    "gather": Op.GATHER, "scatter": Op.SCATTER, "alltoall": Op.ALLTOALL, "reduce_scatter": Op.REDUCE_SCATTER,
    "barrier": Op.BARRIER,
}
REDUCING = (Op.ALLREDUCE, Op.REDUCE, Op.REDUCE_SCATTER)
#: Ops whose input holds one slice per rank.
SLICED_INPUT = (Op.ALLTOALL, Op.REDUCE_SCATTER, Op.SCATTER)
#: Ops whose output holds one slice per rank.
SLICED_OUTPUT = (Op.ALLGATHER, Op.GATHER, Op.ALLTOALL)
FULL_OUTPUT_LIMIT = 256
#: Host time between two concurrent groups' collectives issued by one thread (copy, spin kernel and
#: buffer-to-tensor enqueue calls of the first), so their spin kernels start microseconds apart, not at once.
GROUP_ISSUE_GAP_S = 20e-6
#: The spin kernel's own time limit, in multiples of the host's wait for a collective. Mooncake's spin
#: kernel has none; ours has one so that a GPU is never left hung. It must outlast the host's wait: a spin
#: kernel that gave up first let the stream run on, and the rank ended a collective whose data never came,
#: "completed" with wrong values in one world while the other timed out (a lazy-loaded reduce kernel held
#: behind it, with the two time limits equal, on the H100).
SPIN_TIMEOUT_FACTOR = 2.0
#: The task-table slots of CUDA tasks (the CPU backend's are 0 and 1): a chunk takes them in turn.
CUDA_SLOTS = (2, 3)
#: Chunks issued in detail before the caller offers the driver to fast-forward over the identical ones
#: (:class:`~mooncake_protocol.effects.SteadyState`), and the fewest chunks a collective needs for the offer.
STEADY_AFTER_CHUNKS = 4
STEADY_MIN_CHUNKS = 16


def chunk_bytes(size: int) -> int:
    """Bytes per rank slice per chunk: ``((kBufferSize - 1) / size)`` rounded down to a multiple of 8."""
    return ((BUFFER_SIZE - 1) // size) & ~7


@dataclass
class Tensors:
    inp: fx.Region | None
    out: fx.Region | None
    slice_bytes: int


def spin_stream(b: Backend) -> str:
    base = "enqueue" if b.env.policy.nonblocking_spin_stream else "legacy"
    return base if b.group == 0 else f"user{b.group}"


def input_array(rule: Any, rank: int, n: int, floating: bool) -> np.ndarray:
    """``rule.values(rank, n)`` as a float64 (``floating``) or int64 array. Built by numpy while every value and
    step fits in int64 with room to spare: a Python list of 6 M ints took 0.3 s, charged to a real run's
    collective phase although Mooncake's caller has its tensor already (the simulator charges nothing for it)."""
    base, step = rule.rank_coef * rank + rule.const, rule.index_coef
    if abs(base) < 2**62 and abs(step) * max(n - 1, 0) < 2**62:
        arr = np.full(n, base, dtype=np.int64) if step == 0 else np.arange(base, base + step * n, step, dtype=np.int64)
        return arr.astype(np.float64) if floating else arr
    return np.asarray(rule.values(rank, n), dtype=np.float64 if floating else np.int64)


def encode_input(spec: Any, rank: int, n: int) -> bytes:
    arr = input_array(spec.input, rank, n, spec.dtype in ("float16", "bfloat16", "float32", "float64"))
    if spec.dtype == "bool":
        return from_numpy("bool", arr != 0)
    if spec.dtype == "bfloat16":
        return from_numpy("bfloat16", arr.astype(np.float32))
    return from_numpy(spec.dtype, arr.astype(np.dtype(spec.dtype)))


def _py(dtype: str, arr: np.ndarray) -> list[Any]:
    return [bool(x) if dtype == "bool" else (float(x) if arr.dtype.kind == "f" else int(x)) for x in arr]


def decode_output(dtype: str, data: bytes) -> Any:
    """Output values as JSON: the full list when short, else count, digest and first values."""
    arr = to_numpy(dtype, data)
    if len(arr) <= FULL_OUTPUT_LIMIT:
        return _py(dtype, arr)
    return {"n": int(len(arr)), "sha256": hashlib.sha256(data).hexdigest()[:16], "first": _py(dtype, arr[:4])}


def _alloc_tensors(b: Backend, spec: Any, op: Op, index: int) -> Activity:
    env = b.env
    kind = "device" if env.backend == "cuda" else "host"
    itemsize = ITEMSIZE[spec.dtype]
    count = 1 if op is Op.BARRIER else spec.count
    slice_bytes = count * itemsize
    size = env.size
    in_bytes = slice_bytes * (size if op in SLICED_INPUT else 1)
    out_bytes = slice_bytes * (size if op in SLICED_OUTPUT else 1)
    engine = b.process.engine
    tag = f"c{index}" + (f"g{b.group}" if b.group else "")
    inp = yield from engine.alloc(f"{tag}.in", kind, max(in_bytes, 8), env.gpu if kind == "device" else None)
    out = yield from engine.alloc(f"{tag}.out", kind, max(out_bytes, 8), env.gpu if kind == "device" else None)
    if env.data_values and op is not Op.BARRIER:
        n_in = count * (size if op in SLICED_INPUT else 1)
        data = encode_input(spec, env.rank, n_in)
        yield fx.HostCompute("fill", len(data))
        yield fx.WriteMem(inp.rid, 0, data)
    return Tensors(inp, out, slice_bytes)


def _send_layout(op: Op, size: int, slice_bytes: int, off: int, n: int) -> list[tuple[int, int, int]]:
    """(send buffer offset, input offset, length) copies that stage one chunk."""
    if op is Op.BARRIER:
        return []
    if op in SLICED_INPUT:
        return [(j * n, j * slice_bytes + off, n) for j in range(size)]
    return [(0, off, n)]


def _recv_layout(op: Op, rank: int, root: int, size: int, slice_bytes: int, off: int, n: int) -> list[tuple[int, int, int]]:
    """(output offset, receive buffer offset, length) copies of the buffer-to-tensor step (non-reducing)."""
    if op in (Op.ALLGATHER, Op.ALLTOALL) or (op is Op.GATHER and rank == root):
        return [(j * slice_bytes + off, j * n, n) for j in range(size)]
    if op in (Op.BROADCAST, Op.SCATTER):
        return [(off, 0, n)]
    return []


def run_collective(b: Backend, spec: Any, index: int) -> Activity:
    """Run one collective; return the output values (or None where the rank gets none)."""
    env = b.env
    op = OPS[spec.op]
    policy = env.policy
    reduce_op = spec.reduce_op if op in REDUCING else None
    if op in REDUCING:
        reason = unsupported_reason(env.backend, spec.dtype, reduce_op)
        if reason and policy.validate_reduce_before_enqueue:
            yield mark("unsupported_reduce", reason=reason, after_enqueue=False)
            raise ProtocolError(f"{spec.op}({spec.dtype}, {reduce_op}): {reason}", cause="unsupported-reduce")
    else:
        reason = None
    t = yield from _alloc_tensors(b, spec, op, index)
    yield mark("collective_start", index=index, op=spec.op, dtype=spec.dtype, count=spec.count)
    chunk = chunk_bytes(env.size)
    nchunks = max(1, -(-t.slice_bytes // chunk))
    stream = spin_stream(b)
    c = 0
    while c < nchunks:
        if c == STEADY_AFTER_CHUNKS and nchunks >= STEADY_MIN_CHUNKS and op is not Op.BARRIER and reason is None:
            c += yield from _steady_state(b, index, c, nchunks, stream if env.backend == "cuda" else "")
        off = c * chunk
        n = min(chunk, t.slice_bytes - off) if op is not Op.BARRIER else 1
        if env.backend == "cuda":
            yield from _chunk_cuda(b, spec, op, t, off, n, stream, reason)
        else:
            yield from _chunk_cpu(b, spec, op, t, off, n, reason)
        c += 1
    output: Any = None
    if env.backend == "cuda":
        ok = yield fx.StreamSync(stream, env.collective_timeout_s, what=f"collective {index} ({spec.op}) to finish")
        if not ok:
            raise ProtocolError(f"collective {index} ({spec.op}) did not finish in {env.collective_timeout_s:g} s")
        if (yield from spin_gave_up(b)):
            raise ProtocolError(f"collective {index} ({spec.op}) did not finish: a spin kernel gave up after its safety "
                                f"limit ({SPIN_TIMEOUT_FACTOR * env.collective_timeout_s:g} s; Mooncake's spins on), "
                                "so the stream ran on without the exchange")
    gets_output = not (op in (Op.REDUCE, Op.GATHER) and env.rank != spec.root)
    if op is Op.BARRIER:
        output = "ok"
    elif gets_output and env.data_values:
        raw = yield fx.ReadMem(t.out.rid, 0, t.out.size if op in SLICED_OUTPUT else t.slice_bytes)
        used = raw[: t.slice_bytes * (env.size if op in SLICED_OUTPUT else 1)]
        output = decode_output(spec.dtype, used)
        yield fx.HostCompute("decode", len(used))
    active = yield fx.ReadMem(b.regions["active_ranks"].rid, 0, env.size)
    yield mark("collective_done", index=index, op=spec.op, output=output, active=[int(x) for x in active])
    return output


def spin_gave_up(b: Backend) -> Activity:
    """Whether a spin kernel of the CUDA task slots (:data:`CUDA_SLOTS`) ran out its safety limit. A caller held past it
    (a cold kernel's launch blocks the host thread behind the resident spin kernel, on the H100) finds its
    stream finished when it gets to wait, and would end the collective with values that never arrived."""
    table = b.process.worker.table
    first = CUDA_SLOTS[0] * SLOT_BYTES
    raw = yield fx.ReadMem(table.rid, first, len(CUDA_SLOTS) * SLOT_BYTES)
    at = [k * SLOT_BYTES + SPIN_GAVE_UP_OFFSET for k in range(len(CUDA_SLOTS))]
    return any(int.from_bytes(raw[a:a + 4], "little") for a in at)


def _steady_state(b: Backend, index: int, c: int, nchunks: int, stream: str) -> Activity:
    """Offer the driver the chunks from ``c`` up to (not including) the last one, an even number of them
    (they repeat the chunks before: same sizes and peers); account for those it skips. Returns the count."""
    same = nchunks - 1 - c  # the last chunk may be shorter
    same -= same % 2  # parity buffers and task slots alternate: skip whole pairs
    if same <= 0:
        return 0
    skipped = yield fx.SteadyState(index, c, same, stream)
    if skipped not in (0, same):
        raise ProtocolError(f"driver skipped {skipped} chunks of collective {index}; only 0 or {same} are possible")
    if skipped:
        worker = b.process.worker
        b.task_count += skipped
        worker.seq += skipped
        worker.done_tasks += skipped
        if stream:
            worker.cuda_task_count += skipped
        else:
            worker.cpu_task_count += skipped
    return int(skipped)


def _claim_slot(b: Backend, slot: int) -> Activity:
    """Fixed policy: serialise per device: wait until the slot and its sibling are idle."""
    worker = b.process.worker
    table = worker.table

    def idle(r: fx.MemoryReader) -> bool:
        return all(int.from_bytes(r.read(table.rid, s * SLOT_BYTES, 4), "little") != ACTIVE_SET
                   for s in ((slot, slot ^ 1)))

    ok = yield fx.WaitUntil(idle, 1e-4, f"task slot {slot} to be idle", b.env.collective_timeout_s)
    if not ok:
        raise ProtocolError(f"task slot {slot} stayed busy for {b.env.collective_timeout_s:g} s")


def _chunk_cuda(b: Backend, spec: Any, op: Op, t: Tensors, off: int, n: int, stream: str, reason: str | None) -> Activity:
    env = b.env
    worker = b.process.worker
    parity = b.task_count % 2
    send = b.regions[f"send{parity}"]
    recv = b.regions[f"recv{parity}"]
    assert t.inp is not None and t.out is not None
    for dst_off, src_off, length in _send_layout(op, env.size, t.slice_bytes, off, n):
        yield fx.Memcpy(send.rid, dst_off, t.inp.rid, src_off, length, stream)
    # slot choice and counter bump are one step (putTaskCuda runs them back to back on the caller's thread):
    # concurrent groups of one device alternate over slots 2-3
    slot = CUDA_SLOTS[worker.cuda_task_count % len(CUDA_SLOTS)]
    worker.cuda_task_count += 1
    if env.policy.serialize_task_slots and env.concurrent_groups > 1:
        yield from _claim_slot(b, slot)
    # a task's sequence number is taken when it is built: concurrent groups of one device must not share one
    task = Task(op, spec.root, n, parity, b.group, worker.seq, n // ITEMSIZE[spec.dtype])
    worker.seq += 1
    spin = fx.SpinArgs(worker.table.rid, slot, task.pack(), SPIN_TIMEOUT_FACTOR * env.collective_timeout_s)
    yield fx.Launch("spin", stream, spin)
    if reason is not None:
        # Mooncake raised here, after this chunk's copy and spin kernel were enqueued: the exchange still runs,
        # the output is never written and the counters are not advanced.
        worker.cuda_task_count -= 1
        yield mark("unsupported_reduce", reason=reason, after_enqueue=True)
        raise ProtocolError(f"{spec.op}({spec.dtype}, {spec.reduce_op}): {reason}", cause="unsupported-reduce")
    if op in REDUCING and (op is not Op.REDUCE or env.rank == spec.root):
        out_off = off
        yield fx.Memset(t.out.rid, out_off, n, 0, stream)
        kname = kernel_name(spec.dtype, spec.reduce_op)
        if kname not in b.process.loaded_kernels:
            yield mark("kernel_first_launch", kernel=kname, preloaded=False)
            b.process.loaded_kernels.add(kname)
        yield fx.Launch(kname, stream, fx.ReduceArgs(recv.rid, 0, t.out.rid, out_off, n // ITEMSIZE[spec.dtype],
                                                     env.size, n, tuple(b.active), b.regions["active_ranks"].rid))
    else:
        for out_off, recv_off, length in _recv_layout(op, env.rank, spec.root, env.size, t.slice_bytes, off, n):
            yield fx.Memcpy(t.out.rid, out_off, recv.rid, recv_off, length, stream)
    b.task_count += 1


def _chunk_cpu(b: Backend, spec: Any, op: Op, t: Tensors, off: int, n: int, reason: str | None) -> Activity:
    env = b.env
    worker = b.process.worker
    table = worker.table
    parity = b.task_count % 2
    send = b.regions[f"send{parity}"]
    recv = b.regions[f"recv{parity}"]
    assert t.inp is not None and t.out is not None
    slot = worker.cpu_task_count % 2
    flag = yield fx.ReadMem(table.rid, slot * SLOT_BYTES, 4)
    if int.from_bytes(flag, "little") == ACTIVE_SET:
        if not env.policy.serialize_task_slots:
            yield mark("slot_exhausted", slot=slot, text=f"CPU task slot {slot} is not idle: more than 2 chunks in flight")
            raise ProtocolError(f"CPU task slot {slot} is not idle", cause="task-slot-exhaustion")
        yield from _claim_slot(b, slot)
    if env.data_values or n <= 64:
        for dst_off, src_off, length in _send_layout(op, env.size, t.slice_bytes, off, n):
            data = yield fx.ReadMem(t.inp.rid, src_off, length)
            yield fx.WriteMem(send.rid, dst_off, data)
    # a task's sequence number is taken when it is built: concurrent groups of one device must not share one
    task = Task(op, spec.root, n, parity, b.group, worker.seq, n // ITEMSIZE[spec.dtype])
    worker.seq += 1
    yield fx.WriteMem(table.rid, slot * SLOT_BYTES + TASK_OFFSET, task.pack())
    yield fx.WriteMem(table.rid, slot * SLOT_BYTES, struct.pack("<i", ACTIVE_SET))
    worker.cpu_task_count += 1
    ok = yield fx.WaitUntil(
        lambda r: int.from_bytes(r.read(table.rid, slot * SLOT_BYTES, 4), "little") != ACTIVE_SET,
        1e-4, f"CPU task in slot {slot} ({spec.op}) to complete", None)
    del ok
    if reason is not None:
        # Mooncake checks the dtype inside the completion callback on the worker thread: after the exchange
        yield mark("unsupported_reduce", reason=reason, after_enqueue=True)
        raise ProtocolError(f"{spec.op}({spec.dtype}, {spec.reduce_op}): {reason}", cause="unsupported-reduce")
    b.task_count += 1
    if not env.data_values:
        return
    if op in REDUCING and (op is not Op.REDUCE or env.rank == spec.root):
        raw = yield fx.ReadMem(recv.rid, 0, n * env.size)
        slices = [raw[j * n:(j + 1) * n] for j in range(env.size)]
        reduced = combine(spec.dtype, spec.reduce_op, slices, b.active)
        yield fx.HostCompute("reduce", len(raw))
        yield fx.WriteMem(t.out.rid, off, reduced)
        return
    for out_off, recv_off, length in _recv_layout(op, env.rank, spec.root, env.size, t.slice_bytes, off, n):
        data = yield fx.ReadMem(recv.rid, recv_off, length)
        yield fx.WriteMem(t.out.rid, out_off, data)


def run_workload(groups: list[Backend]) -> Activity:
    """Run the scenario's collectives in order; with several groups, each collective on all at once."""
    env = groups[0].env
    for index, spec in enumerate(env.workload):
        if spec.op == "send_recv":
            from .p2p import run_send_recv

            yield from run_send_recv(groups[0], spec, index)
            continue
        if len(groups) == 1:
            yield from run_collective(groups[0], spec, index)
            continue
        handles = []
        for g, b in enumerate(groups):
            if g:
                # one thread issues the groups' collectives in turn; enqueueing one takes host time
                yield fx.Sleep(GROUP_ISSUE_GAP_S)
            h = yield fx.Spawn(f"group{b.group}", run_collective(b, spec, index))
            handles.append(h)
        for h in handles:
            yield fx.Join(h, what=f"collective {index} of every group")
