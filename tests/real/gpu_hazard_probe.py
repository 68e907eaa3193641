"""The lazy-loading / legacy-stream hazard, in a fresh process (module loading is per process).

``python gpu_hazard_probe.py lazy preload|cold`` or ``... legacy``; prints one JSON line. Every wait is
bounded: the spin kernel times out by itself after SPIN_TIMEOUT_S, and the host releases it earlier.
"""

from __future__ import annotations

import json
import secrets
import sys
import tempfile
import threading
import time

from mooncake_protocol import effects as fx
from mooncake_protocol.memory import region_addr
from mooncake_real.gpu import GpuContext
from mooncake_real.memory import RegionTable, sweep_shm

SPIN_TIMEOUT_S = 6.0
WATCH_S = 2.0
MIB = 1 << 20


def main(mode: str, variant: str) -> dict:
    job = secrets.token_hex(4)
    ctx = GpuContext.open(0)
    assert ctx.available
    table = RegionTable(job, tempfile.mkdtemp(), 0, ctx)
    ctx.table = table
    try:
        tab = table.allocate(fx.Allocate("tasks", "pinned", 256, region_addr(0, 1), None, True))
        src = table.allocate(fx.Allocate("src", "pinned", 4 * MIB, region_addr(0, 2), None, True))
        dst = table.allocate(fx.Allocate("dst", "device", 4 * MIB, region_addr(0, 3), 0, True))
        red = table.allocate(fx.Allocate("red", "device", 4096, region_addr(0, 4), 0, True))
        if variant == "preload":
            ctx.load_kernel("reduce_int32_sum")
        ctx.load_kernel("spin")
        spin_stream = "legacy" if mode == "legacy" else "enqueue"
        ctx.launch_spin(spin_stream, table.ptr(tab.rid), tab.rid, 0, b"task", SPIN_TIMEOUT_S)
        t_start = time.monotonic()
        while table.read(tab.rid, 0, 4) != (1).to_bytes(4, "little"):
            if time.monotonic() - t_start > 5:
                return {"error": "spin kernel never started"}
            time.sleep(0.001)
        out: dict = {}
        t0 = time.monotonic()

        def tail() -> None:
            ctx.launch_reduce("reduce_int32_sum", "enqueue", ctx.device_ptr_of_host(table.entry(src.rid).storage),
                              table.ptr(red.rid), 256, 2, 1024, (True, True))
            out["tail_returned"] = time.monotonic() - t0

        def copy() -> None:
            time.sleep(0.05)
            if mode == "legacy":
                ctx.memcpy(table.ptr(dst.rid), table.ptr(src.rid), 4 * MIB, "legacy", True)
            else:
                ctx.memcpy(table.ptr(dst.rid), table.ptr(src.rid), 4 * MIB, "copy", False)
                out["copy_call_returned"] = time.monotonic() - t0
                ev = ctx.event_record("copy")
                while not ctx.event_query(ev):
                    time.sleep(0.001)
            out["copy_done"] = time.monotonic() - t0

        threads = [threading.Thread(target=copy, daemon=True)]
        if mode == "lazy":
            threads.append(threading.Thread(target=tail, daemon=True))
        for t in threads:
            t.start()
        time.sleep(0.5)
        memcpy = fx.Memcpy(dst.rid, 0, src.rid, 0, 4 * MIB, "legacy" if mode == "legacy" else "copy", mode == "legacy")
        out["resource_memcpy"] = ctx.resource_for(memcpy)
        out["resource_launch"] = ctx.resource_for(fx.Launch("reduce_int32_sum", "enqueue", fx.ReduceArgs(0, 0, 0, 0, 1, 1, 4, (True,))))
        end = t0 + WATCH_S
        while time.monotonic() < end and "copy_done" not in out:
            time.sleep(0.005)
        # done within the window in which the host meant the spin kernel to stay resident; when CuPy's cold
        # module load holds the GIL, this thread only gets here once the spin kernel has timed out by itself
        # (SPIN_TIMEOUT_S), and the copy may then finish in the loop's first pass: that is no "before"
        out["done_before_release"] = "copy_done" in out and out["copy_done"] < WATCH_S
        table.write(tab.rid, 0, (0).to_bytes(4, "little"))  # release the spin kernel (host write)
        ctx.note_host_write(tab.rid, 0, b"\0\0\0\0")
        out["released_at"] = time.monotonic() - t0
        for t in threads:
            t.join(SPIN_TIMEOUT_S + 5)
        out["threads_alive"] = sum(t.is_alive() for t in threads)
        out["flag"] = int.from_bytes(table.read(tab.rid, 0, 4), "little")
        return out
    finally:
        table.close()
        sweep_shm(job)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")))
