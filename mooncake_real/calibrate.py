"""``mooncake-real calibrate [-o FILE]``: measure this machine, write the simulator's timing constants.

Measured (``measured``, seconds and bytes/s):

* store round trip: ``ping`` (transport only) and ``set``/``get`` of the pyzmq store (:mod:`.store`);
* RPC round trip (:mod:`.rpc`), and a 4 MiB payload (TCP WRITE bandwidth: the TCP transport is the
  ``__write__`` RPC);
* SHM WRITE latency and bandwidth (a copy into a mapped /dev/shm segment, as the SHM transport does);
* the real driver's cost per effect, measured *through the real driver*: one rank process runs a tiny
  protocol activity (:func:`probe_activity`: ``Now`` x N, ``ReadMem`` x N, ``Allocate`` + ``Register`` of
  the bootstrap's region sizes) and the trace gives the time per effect; the same activity in the
  simulator costs no simulated time, so the whole difference is the per-effect overhead;
* with CuPy and a GPU: kernel launch, module load (compile + load of a fresh RawKernel), H2D/D2D memcpy
  bandwidth, CUDA IPC handle open time.

``sim`` holds exactly the fields of ``mooncake_sim.driver.Calibration`` (this module does not import
the simulator; the field list is repeated in :data:`SIM_FIELDS` and a test checks it matches).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from .driver import WAIT_POLL_MAX_S

#: The fields of ``mooncake_sim.driver.Calibration`` (tests/parity checks the two agree).
SIM_FIELDS = ("store_service_s", "store_one_way_s", "rpc_service_s", "rpc_one_way_s", "effect_cpu_s",
              "rdma_overhead_s", "alloc_s", "register_s", "host_cpus", "tcp_latency_s", "tcp_bandwidth_Bps",
              "shm_latency_s", "shm_bandwidth_Bps", "module_load_s", "kernel_launch_s", "poll_overshoot_s",
              "poll_cap_s", "transfer_threads", "rpc_connect_s")

BIG = 4 << 20


def _median_time(fn: Any, n: int) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_store(n: int = 300) -> dict[str, float]:
    from .store import StoreClient, StoreServer

    server = StoreServer("calibrate", host="127.0.0.1").start()
    try:
        c = StoreClient(server.address, "calibrate", timeout_s=5.0)
        c.set("k", b"x" * 64)
        for _ in range(20):
            c.ping()
        ping = _median_time(c.ping, n)
        setr = _median_time(lambda: c.set("k", b"x" * 112), n)
        getr = _median_time(lambda: c.get("k"), n)
        c.close()
    finally:
        server.stop()
    return {"store_ping_rtt_s": ping, "store_set_rtt_s": setr, "store_get_rtt_s": getr}


def _bind_free(server: Any, first: int) -> int:
    """Bind ``server`` to the first free port of ``first .. first + 99``; 0 when none is."""
    return next((p for p in range(first, first + 100) if server.bind(p).ok), 0)


def measure_rpc(n: int = 300) -> dict[str, float]:
    from .rpc import RpcClient, RpcServer

    server = RpcServer("127.0.0.1")
    port = _bind_free(server, 24600)
    if not port:
        return {}
    server.serve(port, lambda method, payload: payload[:8])
    try:
        target = f"127.0.0.1:{port}"
        firsts = []  # a fresh client's first call: port probe, connect, then the call
        for _ in range(10):
            fresh = RpcClient()
            t0 = time.perf_counter()
            fresh.call(target, "echo", b"x" * 8, 5.0)
            firsts.append(time.perf_counter() - t0)
            fresh.close()
        client = RpcClient()
        for _ in range(20):
            client.call(target, "echo", b"", 5.0)
        small = _median_time(lambda: client.call(target, "echo", b"x" * 8, 5.0), n)
        big_payload = b"y" * BIG
        big = _median_time(lambda: client.call(target, "echo", big_payload, 10.0), 20)
        client.close()
    finally:
        server.close()
    bw = BIG / max(big - small, 1e-9)
    return {"rpc_rtt_s": small, "rpc_first_call_s": statistics.median(firsts), "tcp_write_small_s": small,
            "tcp_write_4mib_s": big, "tcp_bandwidth_Bps": bw}


def measure_shm(n: int = 200) -> dict[str, float]:
    import mmap

    name = f"/dev/shm/mccal_{os.getpid()}"
    size = 16 << 20
    fd = os.open(name, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
        small, big = b"z" * 4, b"w" * BIG
        lat = _median_time(lambda: mm.__setitem__(slice(0, 4), small), n)
        t_big = _median_time(lambda: mm.__setitem__(slice(0, BIG), big), 20)
        mm.close()
    finally:
        os.close(fd)
        os.unlink(name)
    return {"shm_write_small_s": lat, "shm_write_4mib_s": t_big, "shm_bandwidth_Bps": BIG / max(t_big, 1e-9)}


def measure_writes(n: int = 200) -> dict[str, float]:
    """Small and 4 MiB SHM and TCP WRITEs through the driver's own path (:meth:`TransferEngine.execute`: the
    owner's registry lookup, the fabric check, then the mmap write or the ``__write__`` RPC to a real server),
    which is what a simulated WRITE stands for; the bare RPC and mmap figures above leave that work out."""
    import secrets
    import tempfile

    from mooncake_protocol import effects as fx
    from mooncake_protocol.memory import region_addr

    from .memory import RegionTable, sweep_shm
    from .rpc import RpcClient, RpcServer
    from .transports import TransferEngine, rpc_builtins

    out: dict[str, float] = {}
    job = secrets.token_hex(4)
    with tempfile.TemporaryDirectory() as d:
        owner, writer = RegionTable(job, d, 0), RegionTable(job, d, 1)
        server = RpcServer("127.0.0.1", builtins=rpc_builtins(owner))
        client = RpcClient()
        engine: TransferEngine | None = None
        try:
            size = 2 * BIG
            dst = owner.allocate(fx.Allocate("recv", "host", size, region_addr(0, 1), None, True))
            owner.register(dst, "*", False, False)
            src = writer.allocate(fx.Allocate("send", "host", size, region_addr(1, 1), None, True))
            writer.register(src, "*", False, False)
            port = _bind_free(server, 24700)
            if not port:
                return {}
            server.serve(port, None)
            engine = TransferEngine(1, d, writer, client)
            for transport in ("shm", "tcp"):
                small = fx.WriteReq(transport, 1, 0, 4, 0, f"127.0.0.1:{port}", region_addr(0, 1), 0)
                big = fx.WriteReq(transport, 1, 0, BIG, 0, f"127.0.0.1:{port}", region_addr(0, 1), 0)
                for _ in range(10):
                    engine.execute(small)
                t_small = _median_time(functools.partial(engine.execute, small), n)
                t_big = _median_time(functools.partial(engine.execute, big), 10)
                out[f"{transport}_driver_write_small_s"] = t_small
                out[f"{transport}_driver_write_4mib_s"] = t_big
                out[f"{transport}_driver_bandwidth_Bps"] = BIG / max(t_big - t_small, 1e-9)
        finally:
            if engine is not None:
                engine.close()
            client.close()
            server.close()
            owner.close()
            writer.close()
            sweep_shm(job)
    return out


# ----------------------------------------------------------------------------- through the real driver


def probe_activity(spec: Any) -> Any:
    """A tiny protocol-shaped activity: N x Now, N x ReadMem, the bootstrap's Allocate/Register pairs."""
    from mooncake_protocol import effects as fx
    from mooncake_protocol.memory import region_addr

    n = int(spec.args.get("n", 300))

    def act() -> Any:
        rid = 1
        yield fx.mark("phase", phase="bootstrap")
        small = yield fx.Allocate("probe", "host", 256, region_addr(spec.rank, rid), None, True)
        rid += 1
        for _ in range(n):
            yield fx.Now()
        for _ in range(n):
            yield fx.ReadMem(small.rid, 0, 4)
        for size in (16 << 20, 16 << 20, 256, 256):
            region = yield fx.Allocate(f"r{rid}", "host", size, region_addr(spec.rank, rid), None, True)
            rid += 1
            yield fx.Register(region, "*", False, False)
        # the driver's polling: a WaitUntil at the worker's 100 us poll and at the warmup's 50 ms poll
        for poll in (1e-4, 0.05):
            count = [0]
            t_end = time.monotonic() + 0.04

            def pred(_r: Any, t_end: float = t_end, count: list[int] = count) -> bool:
                count[0] += 1
                return time.monotonic() >= t_end

            t0 = yield fx.Now()
            yield fx.WaitUntil(pred, poll, "calibration: a polling wait")
            t1 = yield fx.Now()
            yield fx.mark("poll_probe", poll_s=poll, checks=count[0], elapsed_s=t1 - t0)
        yield fx.mark("phase", phase="done")
        return None

    return act()


def measure_driver(ranks: int = 1, n: int = 300) -> dict[str, float]:
    """Per-effect time of the real driver, from the probe's trace (``ranks`` processes at once)."""
    from .launcher import launch

    res = launch(ranks, entry="mooncake_real.calibrate:probe_activity", args={"n": n}, deadline_s=60.0)
    by: dict[str, list[float]] = defaultdict(list)
    spans: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
    for rec in res.trace:
        if rec.get("type") == "effect":
            spans[int(rec["rank"])].append((float(rec["t0"]), float(rec["t1"]), str(rec["effect"])))
    for recs in spans.values():
        recs.sort()
        for i, (t0, t1, eff) in enumerate(recs):
            nxt = recs[i + 1][0] if i + 1 < len(recs) else t1
            by[eff].append(max(t1, nxt) - t0)  # the effect plus the step to the next one
    out = {f"{k}_s": statistics.median(v) for k, v in by.items()}
    for rec in res.trace:
        if rec.get("type") == "mark" and rec.get("name") == "poll_probe":
            d = rec["data"]
            if int(d["checks"]) > 1:  # the first check is at once; each later one follows a sleep
                out[f"poll_tick_{d['poll_s']:g}_s"] = float(d["elapsed_s"]) / (int(d["checks"]) - 1)
    if "Allocate_s" in out:
        allocs = by["Allocate"]
        out["Allocate_mean_s"] = statistics.fmean(allocs)
    if "Register_s" in out:
        out["Register_mean_s"] = statistics.fmean(by["Register"])
    return out


def measure_gpu() -> dict[str, float]:
    """Kernel launch, module load, memcpy bandwidth, IPC open: only with CuPy and a device."""
    try:
        import cupy as cp
        if cp.cuda.runtime.getDeviceCount() < 1:
            return {}
    except Exception:  # noqa: BLE001 - no CuPy, no driver, no device
        return {}
    out: dict[str, float] = {}
    k = cp.RawKernel(r'extern "C" __global__ void nop(int *p) { if (p == 0) p[0] = 1; }', "nop")
    buf = cp.zeros(1, dtype=cp.int32)
    k((1,), (1,), (buf,))
    cp.cuda.Device().synchronize()
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        k((1,), (1,), (buf,))
    out["kernel_launch_s"] = (time.perf_counter() - t0) / n
    cp.cuda.Device().synchronize()
    loads = []
    for i in range(3):
        src = f'extern "C" __global__ void fresh{i}_{os.getpid()}_{time.time_ns()}(int *p) {{ p[0] += {i}; }}'
        name = src.split("void ")[1].split("(")[0]
        t0 = time.perf_counter()
        fk = cp.RawKernel(src, name)
        fk.compile()
        fk((1,), (1,), (buf,))
        cp.cuda.Device().synchronize()
        loads.append(time.perf_counter() - t0)
    out["module_load_fresh_s"] = statistics.median(loads)
    # what a real run pays: the launcher warms CuPy's disk cache first, so a rank's module load reads a
    # compiled cubin (time a first launch in a child process, after another child compiled it)
    import subprocess

    tag = f"{os.getpid()}_{time.time_ns()}"
    srcs = [f'extern "C" __global__ void cached{j}_{tag}(int *p) {{ p[0] += {j}; }}' for j in (1, 2)]
    code = ("import sys,time,cupy as cp\n"
            "def run(src):\n"
            "    k=cp.RawKernel(src,src.split('void ')[1].split('(')[0]);k((1,),(1,),(b,));cp.cuda.Device().synchronize()\n"
            "b=cp.zeros(1,dtype=cp.int32);cp.cuda.Device().synchronize()\n"
            "run(sys.argv[1])\n"  # the process's first kernel pays one-time costs: not a module load
            "t=time.perf_counter();run(sys.argv[2]);print(time.perf_counter()-t)")
    cached = []
    for i in range(3):
        r = subprocess.run([sys.executable, "-c", code, *srcs], capture_output=True, text=True, timeout=120, check=False)
        if r.returncode == 0 and r.stdout.strip() and i > 0:  # the first child compiles into the disk cache
            cached.append(float(r.stdout.strip().splitlines()[-1]))
    out["module_load_s"] = statistics.median(cached) if cached else out["module_load_fresh_s"]
    host = cp.cuda.alloc_pinned_memory(BIG * 4)
    dev_a = cp.cuda.alloc(BIG * 4)
    dev_b = cp.cuda.alloc(BIG * 4)
    for label, fn in (("h2d", lambda: dev_a.copy_from_host(host.ptr, BIG * 4)),
                      ("d2d", lambda: dev_b.copy_from_device(dev_a, BIG * 4))):
        fn()
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        cp.cuda.Device().synchronize()
        out[f"memcpy_{label}_Bps"] = BIG * 4 * 10 / (time.perf_counter() - t0)
    try:
        handle = cp.cuda.runtime.ipcGetMemHandle(dev_a.ptr)
        out["ipc_get_handle_ok"] = 1.0
        out["ipc_handle_bytes"] = float(len(handle))
        # opening one's own handle in the same process is refused by CUDA; time it in a child process
        code = ("import sys,time,cupy as cp;h=bytes.fromhex(sys.argv[1]);t=time.perf_counter();"
                "p=cp.cuda.runtime.ipcOpenMemHandle(h);print(time.perf_counter()-t);cp.cuda.runtime.ipcCloseMemHandle(p)")
        r = subprocess.run([sys.executable, "-c", code, bytes(handle).hex()], capture_output=True, text=True,
                           timeout=120, check=False)
        if r.returncode == 0 and r.stdout.strip():
            out["ipc_open_s"] = float(r.stdout.strip().splitlines()[-1])
    except Exception as exc:  # noqa: BLE001 - report, do not fail the calibration
        out["ipc_error"] = 0.0
        print(f"calibrate: CUDA IPC not measured: {exc}", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- measured -> sim


def derive_sim(m: dict[str, float]) -> dict[str, float | None]:
    """The simulator's constants from the measurements (documented in docs/parity.md)."""
    ping = m.get("store_ping_rtt_s", 0.0)
    store_op = statistics.fmean([m.get("store_set_rtt_s", ping), m.get("store_get_rtt_s", ping)])
    effect = m.get("Now_s", 0.0)
    rpc_rtt = m.get("rpc_rtt_s", 0.0)
    sim: dict[str, float | None] = {
        # the store: ping is the transport, the rest of a set/get round trip is the server's service time;
        # a StoreX effect also pays the driver's per-effect overhead (effect_cpu_s)
        "store_one_way_s": ping / 2,
        "store_service_s": max(store_op - ping, 1e-6),
        "rpc_one_way_s": rpc_rtt / 2 * 0.9,
        "rpc_service_s": rpc_rtt * 0.1,
        "effect_cpu_s": effect,
        "rdma_overhead_s": 0.0,
        "alloc_s": max(m.get("Allocate_mean_s", effect) - effect, 0.0),
        "register_s": max(m.get("Register_mean_s", effect) - effect, 0.0),
        "host_cpus": float(os.cpu_count() or 1),
        # a WRITE as the driver does it (registry lookup, fabric check, copy or RPC); the bare figures remain
        # for calibration files written before this was measured
        "tcp_latency_s": m.get("tcp_driver_write_small_s", m.get("tcp_write_small_s")),
        "tcp_bandwidth_Bps": m.get("tcp_driver_bandwidth_Bps", m.get("tcp_bandwidth_Bps")),
        "shm_latency_s": m.get("shm_driver_write_small_s", m.get("shm_write_small_s")),
        "shm_bandwidth_Bps": m.get("shm_driver_bandwidth_Bps", m.get("shm_bandwidth_Bps")),
        "module_load_s": m.get("module_load_s"),
        "kernel_launch_s": m.get("kernel_launch_s"),
        # a 100 us polling wait re-checks every 100 us + overshoot (sleep wake-up, predicate, driver loop)
        "poll_overshoot_s": max(m["poll_tick_0.0001_s"] - 1e-4, 0.0) if "poll_tick_0.0001_s" in m else None,
        "poll_cap_s": WAIT_POLL_MAX_S,
        "transfer_threads": 1.0,  # transports.py: one transfer thread per rank
        # a thread's first call to a server: probe and connect on top of the round trip
        "rpc_connect_s": max(m["rpc_first_call_s"] - rpc_rtt, 0.0) if "rpc_first_call_s" in m else None,
    }
    assert set(sim) == set(SIM_FIELDS)
    return {k: sim[k] for k in SIM_FIELDS}


def calibrate(*, gpu: bool = True, quick: bool = False) -> dict[str, Any]:
    n = 60 if quick else 300
    measured: dict[str, float] = {}
    measured.update(measure_store(n))
    measured.update(measure_rpc(n))
    measured.update(measure_shm(n))
    measured.update(measure_writes(n))
    measured.update(measure_driver(1, n))
    if gpu:
        measured.update(measure_gpu())
    machine = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "platform": platform.platform()}
    return {"machine": machine, "measured": {k: round(v, 12) for k, v in sorted(measured.items())},
            "sim": derive_sim(measured)}


def cmd_calibrate(args: Any) -> int:
    data = calibrate(gpu=not getattr(args, "no_gpu", False), quick=getattr(args, "quick", False))
    text = json.dumps(data, indent=1) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
