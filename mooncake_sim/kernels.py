"""Device work in the simulator: what the spin kernel, reduce kernels, memcpy and memset do to memory.

Each builder returns a :class:`mooncake_sim.gpu.Op` for the GPU model; the op's callbacks apply the
semantics to simulated memory when the op starts (spin kernel) or ends (the rest). Reduce results come
from :func:`mooncake_protocol.reduce.combine`, the same reference the real CuPy kernels are tested against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mooncake_protocol import effects as fx
from mooncake_protocol.reduce import ITEMSIZE, combine
from mooncake_protocol.worker import (
    ACTIVE_SET,
    ACTIVE_TIMED_OUT,
    SLOT_BYTES,
    SPIN_GAVE_UP_OFFSET,
    TASK_OFFSET,
)

from .gpu import DEVICE_BW, HOST_LINK_BW, KERNEL_LAUNCH_S, REDUCE_BW, Context, Op

if TYPE_CHECKING:
    from .driver import SimRank, Simulation


def launch_op(sim: Simulation, r: SimRank, ctx: Context, eff: fx.Launch) -> Op:
    args = eff.args
    if isinstance(args, fx.SpinArgs):
        op = Op("spin", eff.stream, 0.0, f"spin kernel (task slot {args.slot})", kernel="spin", sm=True)
        key = (args.table_rid, args.slot)

        def start() -> None:
            table = r.regions[args.table_rid]
            at = args.slot * SLOT_BYTES
            table.write(at + SPIN_GAVE_UP_OFFSET, bytes(4))
            table.write(at + TASK_OFFSET, args.task)
            table.write(at, ACTIVE_SET.to_bytes(4, "little"))
            ctx.spins[key] = op
            sim.dirty(r.env.rank)
            timer = sim.env.timeout(args.timeout_s)

            def expire(_e: Any) -> None:
                if key in ctx.spins and ctx.spins[key] is op:
                    table.write(at + SPIN_GAVE_UP_OFFSET, (1).to_bytes(4, "little"))
                    table.write(at, ACTIVE_TIMED_OUT.to_bytes(4, "little"))
                    ctx.release_spin(key, noticed=True)
                    sim.dirty(r.env.rank)

            timer.callbacks.append(expire)

        op.on_start = start
        return op
    assert isinstance(args, fx.ReduceArgs)
    _, dtype, rop = eff.kernel.split("_", 2)
    nbytes = args.count * ITEMSIZE[dtype]
    duration = KERNEL_LAUNCH_S + nbytes * (args.nranks + 1) / REDUCE_BW
    op = Op("kernel", eff.stream, duration, f"{eff.kernel} over {args.nranks} ranks", kernel=eff.kernel, sm=True)

    def done() -> None:
        if not r.env.data_values:
            return
        src = r.regions[args.src_rid]
        slices = [src.read(args.src_offset + j * args.stride, nbytes) for j in range(args.nranks)]
        active: tuple[bool, ...] | list[bool] = args.active
        if args.active_rid is not None:
            active = [x != 0 for x in r.regions[args.active_rid].read(0, args.nranks)]
        r.regions[args.dst_rid].write(args.dst_offset, combine(dtype, rop, slices, active))

    op.on_done = done
    return op


def memcpy_op(sim: Simulation, r: SimRank, eff: fx.Memcpy) -> Op:
    src = r.regions[eff.src_rid]
    dst = r.regions[eff.dst_rid]
    both_device = src.region.kind == "device" and dst.region.kind == "device"
    bw = DEVICE_BW if both_device else HOST_LINK_BW
    op = Op("memcpy", eff.stream, 2e-6 + eff.length / bw, f"memcpy of {eff.length} B on stream {eff.stream}",
            sm=both_device)

    def done() -> None:
        if r.env.data_values or eff.length <= 64:
            dst.write(eff.dst_offset, src.read(eff.src_offset, eff.length))
        sim.dirty(r.env.rank)

    op.on_done = done
    return op


def memset_op(sim: Simulation, r: SimRank, eff: fx.Memset) -> Op:
    dst = r.regions[eff.rid]
    op = Op("memset", eff.stream, 2e-6 + eff.length / DEVICE_BW, f"memset of {eff.length} B on stream {eff.stream}",
            sm=dst.region.kind == "device")

    def done() -> None:
        if r.env.data_values or eff.length <= 64:
            dst.fill(eff.offset, eff.length, eff.value)

    op.on_done = done
    return op
