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

``--refresh FILE`` measures only the in-job figures again (:func:`refresh`: the jobs above, about 20 s on a
2-CPU host) and keeps the rest of FILE; the report's ``--recalibrate`` does this before each round.

``sim`` holds exactly the fields of ``mooncake_sim.driver.Calibration`` (this module does not import
the simulator; the field list is repeated in :data:`SIM_FIELDS` and a test checks it matches).
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from mooncake_protocol.errors import InputError
from mooncake_protocol.resources import check_output

from .driver import WAIT_POLL_MAX_S
from .rpc import DEAD_PEER_CHECK_S

#: The fields of ``mooncake_sim.driver.Calibration`` (tests/parity checks the two agree).
SIM_FIELDS = ("store_service_s", "store_one_way_s", "rpc_service_s", "rpc_one_way_s", "effect_cpu_s",
              "rdma_overhead_s", "alloc_s", "register_s", "host_cpus", "tcp_latency_s", "tcp_bandwidth_Bps",
              "shm_latency_s", "shm_bandwidth_Bps", "module_load_s", "kernel_launch_s", "poll_overshoot_s",
              "poll_cap_s", "transfer_threads", "rpc_connect_s", "store_connect_s", "thread_start_s",
              "dead_peer_check_s", "dead_notice_s",
              "rank_spread", "gpu_timeslice_s", "first_kernel_s", "nvlink_same_gpu_s", "ipc_open_s",
              "host_copy_Bps", "host_reduce_Bps", "host_fill_Bps", "host_decode_Bps")

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
        firsts = []  # a fresh client's first request: connect, then the request
        for _ in range(10):
            t0 = time.perf_counter()
            fresh = StoreClient(server.address, "calibrate", timeout_s=5.0)
            fresh.set("k", b"x" * 112)
            firsts.append(time.perf_counter() - t0)
            fresh.close()
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
    return {"store_ping_rtt_s": ping, "store_set_rtt_s": setr, "store_get_rtt_s": getr,
            "store_first_op_s": statistics.median(firsts)}


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


#: A process serving RPC (as a rank does) for :func:`measure_dead_notice`; it prints its port once it serves
#: (it imports no more than a rank's RPC server needs: a larger process takes longer to tear down).
_DYING_SERVER = """
import sys
from mooncake_real.rpc import RpcServer
s = RpcServer("127.0.0.1")
port = next((p for p in range(24700, 24800) if s.bind(p).ok), 0)  # as _bind_free, without importing calibrate
if port and s.serve(port, lambda method, payload: payload):
    print(port, flush=True)
    sys.stdin.read()
"""


def measure_dead_notice(trials: int = 7) -> dict[str, float]:
    """How long a killed process's RPC port keeps taking requests: SIGKILL a process serving RPC, then probe
    its port (it prints the one it bound) every 0.2 ms until a connection is refused (median over ``trials``). A call sent on a cached
    connection within that window goes out as if the peer were alive, and the real client only learns
    otherwise at its next port probe, ``DEAD_PEER_CHECK_S`` later (docs/parity.md, "tenth session")."""
    import signal
    import socket
    import subprocess

    def refused(port: int) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return False
        except ConnectionRefusedError:
            return True
        except OSError:
            return False

    from .launcher import child_pythonpath

    got = []
    env = dict(os.environ, PYTHONPATH=child_pythonpath(os.environ))
    for _ in range(trials):
        proc = subprocess.Popen([sys.executable, "-c", _DYING_SERVER], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        try:
            line = proc.stdout.readline().strip() if proc.stdout is not None else b""
            if not line.isdigit():
                continue
            port = int(line)
            t0 = time.perf_counter()
            os.kill(proc.pid, signal.SIGKILL)
            while not refused(port) and time.perf_counter() - t0 < 1.0:
                time.sleep(0.0002)
            got.append(time.perf_counter() - t0)
        finally:
            proc.kill()
            proc.wait()
    return {"dead_notice_s": statistics.median(got)} if got else {}


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
    """A tiny protocol-shaped activity: N x Now, N x ReadMem, the bootstrap's Allocate/Register pairs, the
    copies and host work of a large tensor (marks ``copy_probe``, ``reduce_probe``, ``fill_probe`` and
    ``decode_probe``: bytes and mean seconds), and polling waits."""
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
        big = []
        for size in (16 << 20, 16 << 20, 256, 256):
            region = yield fx.Allocate(f"r{rid}", "host", size, region_addr(spec.rank, rid), None, True)
            rid += 1
            yield fx.Register(region, "*", False, False)
            if size == 16 << 20:
                big.append(region)
        # a large tensor's chunks: WriteMem and ReadMem of 16 MiB, into fresh memory first (page faults), then
        # again; and the CPU backend's reduce of two 8 MiB slices (the protocol's own combine)
        payload, copies = bytes(16 << 20), []
        for region in big + big:
            t0 = time.perf_counter()
            yield fx.WriteMem(region.rid, 0, payload)
            t1 = time.perf_counter()
            yield fx.ReadMem(region.rid, 0, len(payload))
            copies += [t1 - t0, time.perf_counter() - t1]
        yield fx.mark("copy_probe", bytes=len(payload), seconds=statistics.fmean(copies))
        import numpy as np

        from mooncake_protocol.collectives import decode_output, encode_input
        from mooncake_protocol.reduce import combine
        from mooncake_protocol.scenario import InputRule

        class _Spec:  # the two fields encode_input reads of a workload entry
            input = InputRule(1, 0, 1)
            dtype = "int32"

        raw = np.arange(4 << 20, dtype=np.int32).tobytes()  # 16 MiB: what a reduce step reads, two 8 MiB slices
        half = len(raw) // 2
        # the protocol's own host work, mean of 3 each: the reduce as collectives._chunk_cpu does it (slice the
        # bytes read, then combine), building 16 MiB of input from a rule, decoding 16 MiB of output
        for name, work in (("reduce_probe", lambda: combine("int32", "sum", [raw[:half], raw[half:]], [True, True])),
                           ("fill_probe", lambda: encode_input(_Spec, spec.rank, 4 << 20)),
                           ("decode_probe", lambda: decode_output("int32", raw))):
            spans = []
            for _ in range(3):
                t0 = time.perf_counter()
                work()
                spans.append(time.perf_counter() - t0)
            yield fx.mark(name, bytes=len(raw), seconds=statistics.fmean(spans))
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


def effect_steps(trace: list[dict[str, Any]]) -> list[tuple[tuple[int, str], dict[str, Any], float]]:
    """Each effect record of a real run's trace with its step: its span plus the gap to the same activity's
    next effect (the driver's work between effects belongs to the effect before it); per (rank, activity),
    in time order."""
    by_act: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in trace:
        if rec.get("type") == "effect":
            by_act[(int(rec["rank"]), str(rec["activity"]))].append(rec)
    out = []
    for key, recs in by_act.items():
        recs.sort(key=lambda r: float(r["t0"]))
        for i, rec in enumerate(recs):
            t0, t1 = float(rec["t0"]), float(rec["t1"])
            nxt = float(recs[i + 1]["t0"]) if i + 1 < len(recs) else t1
            out.append((key, rec, max(t1, nxt) - t0))
    return out


def first_loads_of(stepped: list[tuple[tuple[int, str], dict[str, Any], float]]) -> dict[int, dict[str, Any]]:
    """Each rank's earliest ``LoadKernel`` record among :func:`effect_steps`', where it is the process's first
    kernel (a rank whose first kernel was a ``Launch`` paid the set-up there, and has none)."""
    firsts: dict[int, dict[str, Any]] = {}
    for (rank, _act), rec, _step in stepped:
        if rec.get("effect") in ("LoadKernel", "Launch") and (rank not in firsts or float(rec["t0"]) < float(firsts[rank]["t0"])):
            firsts[rank] = rec
    return {rank: rec for rank, rec in firsts.items() if rec["effect"] == "LoadKernel"}


def first_store_requests(stepped: list[tuple[tuple[int, str], dict[str, Any], float]], ranks: int) -> set[int]:
    """The ``id`` of each thread's (rank's activity's) first store request among :func:`effect_steps`', which
    also opened its store connection; not the callers' when there are two or more ranks (the start barrier
    opened theirs before the run)."""
    seen: set[tuple[int, str]] = {(r, "caller") for r in range(ranks)} if ranks > 1 else set()
    out: set[int] = set()
    for key, rec, _step in sorted(stepped, key=lambda ks: float(ks[1]["t0"])):
        if rec.get("effect") in _STORE_OPS and key not in seen:
            seen.add(key)
            out.add(id(rec))
    return out


def measure_driver(ranks: int = 1, n: int = 300) -> dict[str, float]:
    """Per-effect time of the real driver, from the probe's trace (``ranks`` processes at once)."""
    from .launcher import launch

    res = launch(ranks, entry="mooncake_real.calibrate:probe_activity", args={"n": n}, deadline_s=60.0)
    by: dict[str, list[float]] = defaultdict(list)
    for _key, rec, step in effect_steps(res.trace):
        by[str(rec["effect"])].append(step)
    out = {f"{k}_s": statistics.median(v) for k, v in by.items()}
    for rec in res.trace:
        if rec.get("type") == "mark" and rec.get("name") == "poll_probe":
            d = rec["data"]
            if int(d["checks"]) > 1:  # the first check is at once; each later one follows a sleep
                out[f"poll_tick_{d['poll_s']:g}_s"] = float(d["elapsed_s"]) / (int(d["checks"]) - 1)
        elif rec.get("type") == "mark" and rec.get("name") in ("copy_probe", "reduce_probe", "fill_probe",
                                                                "decode_probe"):
            d = rec["data"]
            if float(d["seconds"]) > 0:
                out[f"host_{rec['name'][:-len('_probe')]}_Bps"] = float(d["bytes"]) / float(d["seconds"])
    if "Allocate_s" in out:
        allocs = by["Allocate"]
        out["Allocate_mean_s"] = statistics.fmean(allocs)
    if "Register_s" in out:
        out["Register_mean_s"] = statistics.fmean(by["Register"])
    return out


#: The job :class:`InSitu` measures: the default of ``mooncake-real run`` (4 CPU ranks, bootstrap,
#: warmup, two small collectives over TCP).
IN_SITU_SCENARIO = "real-cpu-allreduce"
#: The rank counts :func:`calibrate` runs it at; the simulator interpolates between them by a scenario's
#: ranks per host (the load that slows everything in a job is the number of rank processes sharing the CPUs).
IN_SITU_RANKS = (2, 4, 8)
#: With a GPU, the CUDA job measured the same way (ranks sharing GPU 0: reduce kernels preloaded, CUDA IPC
#: WRITEs, spin kernels): what CUDA ranks pay inside a job (module loads, launches, device allocations under
#: contention) is not in the CPU job. It becomes ``sim_cuda_by_ranks``, used by runs with the cuda backend.
IN_SITU_CUDA_SCENARIO = "lazy-kernel-load-1gpu-fixed"
#: Effects whose cost is the driver's overhead alone (no network, no wait).
_CHEAP = ("Now", "ReadMem", "WriteMem", "SubmitTransfer", "PollTransfer", "FreeBatch")
_STORE_OPS = ("StoreSet", "StoreGet", "StoreCheck", "StoreAdd", "StoreDelete")
_THREAD_STARTS = ("Spawn", "RpcServe")


def in_situ_scenario(ranks: int, where: str, name: str = IN_SITU_SCENARIO) -> str:
    """The bundled scenario ``name`` with ``ranks`` ranks (a YAML file written under ``where``; its per-op
    ``expect`` values are dropped, as they hold for the bundled rank count only; an explicit placement
    puts every rank where its first rank is)."""
    import yaml

    from mooncake_protocol.resources import bundled_path

    doc = yaml.safe_load(Path(bundled_path("scenarios", name)).read_text())
    doc["name"] = f"{name}-{ranks}"
    doc["ranks"] = int(ranks)
    if isinstance(doc.get("placement"), list) and doc["placement"]:
        doc["placement"] = [dict(doc["placement"][0]) for _ in range(int(ranks))]
    for op in doc.get("workload") or []:
        op.pop("expect", None)
    path = Path(where) / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


class InSitu:
    """Costs measured *inside a running job*, prefixed ``in_situ_``: the runs of one scenario go in one by
    one (:meth:`add`), the means come out of :meth:`figures`.

    A job's ranks share the host's CPUs with every other rank's threads (workers re-checking every 100 us,
    RPC servers, transfer threads, zmq I/O threads), so an effect, an RPC or a TCP WRITE there takes several
    times what the same operation takes alone (docs/parity.md). The means are taken from each run's trace
    (each effect's step: its span plus the gap to the same activity's next effect) and from the ranks' result
    files (each WRITE's time on the transfer thread). A rank's first ``LoadKernel`` also sets CuPy up, so it
    is kept apart (``in_situ_LoadKernel_first_s``), and so is a thread's first store request, which opens its
    connection (``in_situ_store_first_s``). A run that did not complete cleanly is left out.
    """

    def __init__(self, scenario: Any) -> None:
        self.sc = scenario
        self.steps: dict[str, list[float]] = defaultdict(list)
        self.rpc_first: list[float] = []
        self.store_first: list[float] = []  # each thread's first store request step, the callers' excepted
        self.first_loads: list[float] = []  # each rank's first LoadKernel step (the process's first kernel)
        self.writes: dict[str, list[float]] = defaultdict(list)
        self.first_writes: dict[str, list[float]] = defaultdict(list)  # a transport's first WRITE to a peer
        self.connect_writes: dict[str, list[float]] = defaultdict(list)  # ... that opened the RPC connection
        self.oversleep: list[float] = []
        self.spans: list[list[float]] = []
        self.done = 0

    def add(self, res: Any) -> None:
        """Take one run's figures (a :class:`~mooncake_real.launcher.JobResult` of the scenario)."""
        from .runner import run_record

        if not res.clean():
            return
        self.done += 1
        phase_times = run_record(res, self.sc).phase_times
        self.spans.append(bootstrap_spans(phase_times))
        seen: set[tuple[tuple[int, str], str]] = set()  # (rank, activity), server: a connection is open
        stepped = effect_steps(res.trace)
        firsts = first_loads_of(stepped)
        store_firsts = first_store_requests(stepped, self.sc.ranks)
        for key, rec, step in stepped:
            eff = str(rec["effect"])
            if firsts.get(key[0]) is rec:
                self.first_loads.append(step)
                continue
            if id(rec) in store_firsts:  # this thread's first store request opens its connection
                self.store_first.append(step)
                continue
            if eff in _BOOTSTRAP_STEPS and not in_bootstrap(phase_times, key[0], float(rec["t0"])):
                continue  # a collective's few Allocates, dearer beside the running worker and poller
            self.steps[eff].append(step)
            if eff == "RpcCall" and (rec.get("result") or {}).get("ok"):
                conn = (key, str((rec.get("args") or {}).get("target")))
                if conn not in seen:
                    self.rpc_first.append(step)
                    seen.add(conn)
            if eff == "Sleep":
                asked = float((rec.get("args") or {}).get("seconds", 0.0))
                self.oversleep.append(float(rec["t1"]) - float(rec["t0"]) - asked)
        for result in res.results.values():
            for transport, ds in (result.get("write_s") or {}).items():
                self.writes[transport] += [float(d) for d in ds]
            for transport, ds in (result.get("write_first_s") or {}).items():
                self.first_writes[transport] += [float(d) for d in ds]
            for transport, ds in (result.get("write_connect_s") or {}).items():
                self.connect_writes[transport] += [float(d) for d in ds]

    def figures(self) -> dict[str, float]:
        """The means over the runs taken so far ({} when none completed)."""
        if not self.done:
            return {}
        steps = self.steps
        out: dict[str, float] = {"in_situ_runs": float(self.done), "in_situ_ranks": float(self.sc.ranks)}
        cheap = [v for e in _CHEAP for v in steps.get(e, [])]
        if cheap:
            out["in_situ_effect_s"] = statistics.fmean(cheap)
        store = [v for e in _STORE_OPS for v in steps.get(e, [])]
        if store:
            out["in_situ_store_op_s"] = statistics.fmean(store)
        if self.store_first:
            out["in_situ_store_first_s"] = statistics.fmean(self.store_first)
        for eff in ("Allocate", "Register", "LoadKernel", "Launch"):
            if steps.get(eff):
                out[f"in_situ_{eff}_s"] = statistics.fmean(steps[eff])
        if self.first_loads:  # a rank's first load also sets CuPy up: kept apart from the later ones
            out["in_situ_LoadKernel_first_s"] = statistics.fmean(self.first_loads)
        starts = [v for e in _THREAD_STARTS for v in steps.get(e, [])]
        if starts:
            out["in_situ_thread_start_s"] = statistics.fmean(starts)
        if self.rpc_first:
            out["in_situ_rpc_first_s"] = statistics.fmean(self.rpc_first)
            out["in_situ_rpc_first_n"] = float(len(self.rpc_first))
        for transport in sorted(set(self.writes) | set(self.first_writes) | set(self.connect_writes)):
            later, first = self.writes.get(transport), self.first_writes.get(transport)
            connect = self.connect_writes.get(transport)
            if later or first or connect:  # with no later WRITE, the first ones are all there is
                out[f"in_situ_{transport}_write_s"] = statistics.fmean(later or first or connect or [])
            if later and first:
                out[f"in_situ_{transport}_write_first_s"] = statistics.fmean(first)
                out[f"in_situ_{transport}_write_first_n"] = float(len(first))
            if (later or first) and connect:
                out[f"in_situ_{transport}_write_connect_s"] = statistics.fmean(connect)
                out[f"in_situ_{transport}_write_connect_n"] = float(len(connect))
        if self.oversleep:
            out["in_situ_oversleep_s"] = max(0.0, statistics.fmean(self.oversleep))
        spread = pooled_rank_spread(self.spans)
        if spread is not None:
            out["in_situ_rank_spread"] = spread
        longest = [max(s) for s in self.spans if s]
        if longest:  # the job's own bootstrap phase (its longest rank), to hold the simulator's against
            out["in_situ_bootstrap_s"] = statistics.median(longest)
        return out


#: Effects whose in-job cost is taken from the bootstrap phase only. A rank allocates and registers its
#: buffers there (12 and 10 per rank in the CPU job), before its worker and poller run; the collective's
#: few Allocates (its tensors) cost a third more beside them (0.82 against 0.62 ms at 2 ranks on the dev
#: VM), and a mean over the whole job overcharged every bootstrap (docs/parity.md, "twelfth session").
_BOOTSTRAP_STEPS = ("Allocate", "Register")


def in_bootstrap(phase_times: dict[int, dict[str, float]], rank: int, t: float) -> bool:
    """Whether time ``t`` of ``rank`` falls before its ``warmup`` phase mark (True when it has none)."""
    warmup = phase_times.get(rank, {}).get("warmup")
    return warmup is None or t < warmup


def bootstrap_spans(phase_times: dict[int, dict[str, float]]) -> list[float]:
    """Each rank's bootstrap time, from its ``bootstrap`` phase mark to its ``warmup`` one (``phase_times``: a
    run record's, rank -> phase -> time); ranks that did not do both are left out."""
    return [m["warmup"] - m["bootstrap"] for m in phase_times.values() if "bootstrap" in m and "warmup" in m]


def rank_spread(phase_times: dict[int, dict[str, float]]) -> float | None:
    """How unequal the ranks of one real run are: the coefficient of variation (sample standard deviation over
    mean) of their bootstrap times (:func:`bootstrap_spans`). None with fewer than two ranks that did both."""
    return pooled_rank_spread([bootstrap_spans(phase_times)])


def pooled_rank_spread(runs: list[list[float]]) -> float | None:
    """The ranks' spread over several runs: every rank's bootstrap time over its run's mean, and the sample
    standard deviation of those ratios around 1, one degree of freedom spent per run (for one run: its
    coefficient of variation). Pooling uses every rank of every run: a run of two ranks alone gives
    ``|a - b| / (a + b) * sqrt(2)``, which one odd run can make several times the typical figure."""
    ss, df = 0.0, 0
    for spans in runs:
        mean = statistics.fmean(spans) if len(spans) >= 2 else 0.0
        if mean <= 0:
            continue
        ss += sum((x / mean - 1.0) ** 2 for x in spans)
        df += len(spans) - 1
    return math.sqrt(ss / df) if df else None


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
    out["module_load_fresh_s"] = statistics.fmean(loads)
    # what a real run pays: the launcher warms CuPy's disk cache first, so a rank's module load reads a
    # compiled cubin (time a first launch in a child process, after another child compiled it)
    import subprocess

    tag = f"{os.getpid()}_{time.time_ns()}"
    srcs = [f'extern "C" __global__ void cached{j}_{tag}(int *p) {{ p[0] += {j}; }}' for j in (1, 2)]
    code = ("import sys,time,cupy as cp\n"
            "def run(src):\n"
            "    k=cp.RawKernel(src,src.split('void ')[1].split('(')[0]);k((1,),(1,),(b,));cp.cuda.Device().synchronize()\n"
            "b=cp.zeros(1,dtype=cp.int32);cp.cuda.Device().synchronize()\n"
            # the process's first kernel pays one-time costs (CuPy's compiler and cache set-up) on top of its load
            "t=time.perf_counter();run(sys.argv[1]);f=time.perf_counter()-t\n"
            "t=time.perf_counter();run(sys.argv[2]);print(f,time.perf_counter()-t)")
    cached, first = [], []
    for i in range(4):
        r = subprocess.run([sys.executable, "-c", code, *srcs], capture_output=True, text=True, timeout=120, check=False)
        if r.returncode == 0 and r.stdout.strip() and i > 0:  # the first child compiles into the disk cache
            f, later = (float(x) for x in r.stdout.strip().splitlines()[-1].split())
            cached.append(later)
            first.append(max(f - later, 0.0))
    out["module_load_s"] = statistics.fmean(cached) if cached else out["module_load_fresh_s"]
    if first:
        out["first_kernel_s"] = statistics.fmean(first)
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
    out.update(measure_timeslice(cp))
    return out


#: A kernel that spins on the GPU's clock until ``ns`` have passed: it ends by itself.
HOLD_KERNEL = r"""extern "C" __global__ void hold(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now)); } while (now - start < ns);
}"""
TIMESLICE_REPS = 60


def measure_timeslice(cp: Any, reps: int = TIMESLICE_REPS, hold_s: float = 3.0) -> dict[str, float]:
    """The GPU's time slice between processes (``gpu_timeslice_s``), as ``benchmarks/probe_timeslice.py
    --jitter`` measures it: with one other process keeping a kernel resident and a kernel of this process
    resident too (a rank's spin kernel), a 4-byte device-to-device copy submitted at a random moment waits
    for this context's next slice, uniform over 0..2T, so the mean wait is T. Each kernel ends by itself
    after ``hold_s``. {} when the other process does not start."""
    import random
    import selectors
    import subprocess

    code = ("import sys,cupy as cp\n"
            "k=cp.RawModule(code=sys.argv[1]).get_function('hold');s=cp.cuda.Stream(non_blocking=True)\n"
            "k((1,),(1,),(cp.uint64(1000),),stream=s);s.synchronize()\n"
            "k((1,),(1,),(cp.uint64(int(float(sys.argv[2])*1e9)),),stream=s);print('ready',flush=True);s.synchronize()")
    hold = cp.RawModule(code=HOLD_KERNEL).get_function("hold")
    a, b = cp.zeros(1, dtype=cp.int32), cp.zeros(1, dtype=cp.int32)
    stream, own = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)

    def copy() -> float:
        t0 = time.perf_counter()
        cp.cuda.runtime.memcpyAsync(b.data.ptr, a.data.ptr, 4, 3, stream.ptr)  # device to device
        stream.synchronize()
        return time.perf_counter() - t0

    copy()
    alone = statistics.median(copy() for _ in range(20))
    other = subprocess.Popen([sys.executable, "-c", code, HOLD_KERNEL, str(hold_s + 1.0)], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        assert other.stdout is not None
        with selectors.DefaultSelector() as sel:  # a child that never gets going is not waited for forever
            sel.register(other.stdout, selectors.EVENT_READ)
            if not sel.select(timeout=60.0) or other.stdout.readline().strip() != "ready":
                print("calibrate: the GPU time slice not measured (the other process did not start)", file=sys.stderr)
                return {}
        hold((1,), (1,), (cp.uint64(int(hold_s * 1e9)),), stream=own)
        time.sleep(0.05)
        rng, waits = random.Random(0), list[float]()
        t_end = time.monotonic() + hold_s * 0.8
        while len(waits) < reps and time.monotonic() < t_end:  # only while both kernels are resident
            time.sleep(rng.uniform(0.0, 0.005))
            waits.append(copy())
        own.synchronize()
    finally:
        try:
            other.wait(hold_s + 30)  # its kernel ends by itself within hold_s + 1 s
        except subprocess.TimeoutExpired:
            other.kill()
            other.wait()
    if len(waits) < reps // 2:
        return {}
    return {"timeslice_copy_alone_s": alone, "timeslice_copy_wait_s": statistics.fmean(waits),
            "gpu_timeslice_s": max(statistics.fmean(waits) - alone, 0.0)}


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
        # a thread's first store request: connect on top of the round trip
        "store_connect_s": max(m["store_first_op_s"] - m.get("store_set_rtt_s", ping), 0.0)
        if "store_first_op_s" in m else None,
        "thread_start_s": None,  # measured inside a job only (sim_by_ranks)
        "dead_peer_check_s": DEAD_PEER_CHECK_S,  # rpc.py: how often a waiting call probes the server's port
        "dead_notice_s": m.get("dead_notice_s"),  # a killed process's port takes requests this long
        "rank_spread": None,  # likewise
        # a copy's mean wait beside one other busy context, its own kernel resident (measure_timeslice)
        "gpu_timeslice_s": m.get("gpu_timeslice_s"),
        "nvlink_same_gpu_s": None,  # measured inside a CUDA job only (sim_cuda_by_ranks)
        "ipc_open_s": None,  # likewise
        "first_kernel_s": m.get("first_kernel_s"),  # a fresh process's first kernel less a later one (alone)
        # a ReadMem or WriteMem of 16 MiB as the driver does it (fresh memory and again), per byte; the CPU
        # backend's reduce of two 8 MiB int32 slices, per byte read (measure_driver's probe, alone)
        "host_copy_Bps": m.get("host_copy_Bps"),
        "host_reduce_Bps": m.get("host_reduce_Bps"),
        # building 16 MiB of int32 input from a rule, and turning 16 MiB of output into the trace's values
        "host_fill_Bps": m.get("host_fill_Bps"),
        "host_decode_Bps": m.get("host_decode_Bps"),
    }
    assert set(sim) == set(SIM_FIELDS)
    return {k: sim[k] for k in SIM_FIELDS}


def derive_by_ranks(m: dict[str, float], job: str = "in_situ_r") -> dict[str, dict[str, float | None]]:
    """Per rank count measured in situ (``in_situ_r<N>_*``; the CUDA job's: ``job="in_situ_cuda_r"``), the
    constants that replace ``sim``'s."""
    alone = derive_sim(m)
    out = {}
    for n in sorted({int(k[len(job):].split("_")[0]) for k in m if k.startswith(job) and k[len(job):][:1].isdigit()}):
        prefix = f"{job}{n}_"
        part = {"in_situ_" + k[len(prefix):]: v for k, v in m.items() if k.startswith(prefix)}
        if "in_situ_effect_s" in part:
            out[str(n)] = in_situ_sim(part, alone)
    return out


def _weighted_mean(pairs: list[tuple[float, float]]) -> float:
    """The mean of (value, count) pairs, each value weighted by its count."""
    return sum(x * n for x, n in pairs) / sum(n for _, n in pairs)


def in_situ_sim(m: dict[str, float], alone: dict[str, float | None]) -> dict[str, float | None]:
    """The constants from :class:`InSitu`'s figures, which replace those of operations measured alone.

    Costs inside a job already include the waits for a CPU that the job's other threads cause, so the
    simulator charges them as they are (``host_cpus`` None: no second CPU queue on top). Every effect pays
    ``effect_cpu_s``; what an effect costs beyond that goes to its own constant. In a job every RPC a thread
    makes goes to a new server, so a call's round trip is taken from the TCP WRITEs (the ``__write__`` RPC
    on an open connection) and the rest of a first call is the connection.
    """
    effect = m["in_situ_effect_s"]
    out: dict[str, float | None] = {"effect_cpu_s": effect, "host_cpus": None}
    if "in_situ_store_op_s" in m:
        service = alone["store_service_s"] or 0.0
        out["store_one_way_s"] = max(m["in_situ_store_op_s"] - effect - service, 0.0) / 2
        if "in_situ_store_first_s" in m:
            out["store_connect_s"] = max(m["in_situ_store_first_s"] - m["in_situ_store_op_s"], 0.0)
    # not Launch: its step in a job (1-4 ms on the H100 host) is mostly the caller waiting for the GIL after
    # the call returned; charged before the caller's next launch it lets a worker's copies slip in ahead of a
    # lazily loaded reduce kernel, which no real run did (docs/parity.md), so kernel_launch_s stays as measured alone
    for eff, key in (("Allocate", "alloc_s"), ("Register", "register_s"), ("LoadKernel", "module_load_s")):
        if f"in_situ_{eff}_s" in m:
            out[key] = max(m[f"in_situ_{eff}_s"] - effect, 0.0)
    if "in_situ_thread_start_s" in m:
        out["thread_start_s"] = max(m["in_situ_thread_start_s"] - effect, 0.0)
    rtt = m.get("in_situ_tcp_write_s")
    if rtt is not None:
        out["tcp_latency_s"] = rtt
        service = alone["rpc_service_s"] or 0.0
        out["rpc_one_way_s"] = max(rtt - service, 0.0) / 2
        # what a first call costs beyond a call on an open connection, pooled over both kinds of call that
        # opened one (one client code): a thread's first RpcCall to a server, a transfer thread's TCP WRITE
        # that opened its connection to the server (not a first TCP WRITE to a peer whose connection an
        # NVLink WRITE's ``__ipc__`` call had opened: those are ordinary WRITEs)
        extra = []
        if "in_situ_rpc_first_s" in m:
            extra.append((m["in_situ_rpc_first_s"] - effect - rtt, m.get("in_situ_rpc_first_n", 1.0)))
        if "in_situ_tcp_write_connect_s" in m:
            extra.append((m["in_situ_tcp_write_connect_s"] - rtt, m.get("in_situ_tcp_write_connect_n", 1.0)))
        if extra:
            out["rpc_connect_s"] = max(_weighted_mean(extra), 0.0)
    if "in_situ_shm_write_s" in m:
        out["shm_latency_s"] = m["in_situ_shm_write_s"]
    if "in_situ_LoadKernel_first_s" in m and "in_situ_LoadKernel_s" in m:  # the first kernel's one-time set-up
        out["first_kernel_s"] = max(m["in_situ_LoadKernel_first_s"] - m["in_situ_LoadKernel_s"], 0.0)
    if "in_situ_nvlink_write_s" in m:  # the CUDA job: IPC copies between ranks sharing the GPU
        out["nvlink_same_gpu_s"] = m["in_situ_nvlink_write_s"]
        # a first WRITE to a peer also fetches its IPC handle by RPC (opening the transfer thread's connection
        # to the peer's server where no TCP WRITE had) and opens it: both kinds, weighted by their counts
        first = [(m[f"in_situ_nvlink_write_{kind}_s"], m.get(f"in_situ_nvlink_write_{kind}_n", 1.0))
                 for kind in ("first", "connect") if f"in_situ_nvlink_write_{kind}_s" in m]
        if first:
            out["ipc_open_s"] = max(_weighted_mean(first) - m["in_situ_nvlink_write_s"], 0.0)
    if "in_situ_oversleep_s" in m:
        out["poll_overshoot_s"] = m["in_situ_oversleep_s"]
    if "in_situ_rank_spread" in m:
        out["rank_spread"] = m["in_situ_rank_spread"]
    return out


def in_situ_runs(ranks: int, share: float = 1.0) -> int:
    """Real runs of the in-job measurement at ``ranks`` ranks: at least 3, and about 24 rank bootstraps in all,
    so the small jobs, whose warmup race is a coin toss decided by ``rank_spread``, get a steadier figure
    (2 ranks: 12 runs, 4: 6, 8: 3). ``share`` below 1 takes that share of them, at least 2 (``refresh``'s
    cheaper measurement: 0.5 gives 6, 3, 2)."""
    full = max(3, -(-24 // max(1, ranks)))
    return full if share >= 1 else max(2, round(full * share))


def interleaved(runs: dict[int, int]) -> list[int]:
    """The order of the in-job runs, ``runs[ranks]`` of each rank count, spread evenly over the whole
    measurement (2 ranks x 4, 8 ranks x 2: 2 8 2 2 8 2), so that a few busy seconds of the host land on every
    rank count a little rather than on one a lot."""
    slots = sorted((k / n, i, ranks) for i, (ranks, n) in enumerate(runs.items()) for k in range(n))
    return [ranks for _, _, ranks in slots]


def _in_situ_jobs(scenario: str, job: str, what: str, quick: bool, share: float = 1.0) -> dict[str, float]:
    """:class:`InSitu` figures of ``scenario`` at each of :data:`IN_SITU_RANKS` (their runs interleaved),
    keyed ``<job><N>_...``."""
    from mooncake_protocol.scenario import load_scenario

    from .runner import run_job

    out: dict[str, float] = {}
    runs = {ranks: 1 if quick else in_situ_runs(ranks, share) for ranks in IN_SITU_RANKS}
    order = interleaved(runs)
    with tempfile.TemporaryDirectory(prefix="mooncake-calibrate-") as where:
        accs = {ranks: InSitu(load_scenario(in_situ_scenario(ranks, where, scenario))) for ranks in IN_SITU_RANKS}
        print(f"calibrate: {what.format('/'.join(map(str, IN_SITU_RANKS)))}, {len(order)} runs interleaved, to "
              "measure costs inside it", file=sys.stderr, flush=True)
        for k, ranks in enumerate(order):
            accs[ranks].add(run_job(accs[ranks].sc))
            if (k + 1) % 6 == 0 or k + 1 == len(order):
                print(f"calibrate:   {k + 1}/{len(order)} runs", file=sys.stderr, flush=True)
    for ranks, acc in accs.items():
        out.update({key.replace("in_situ_", f"{job}{ranks}_", 1): v for key, v in acc.figures().items()})
    return out


#: The store round trip at the end of ``calibrate`` may differ from the one at its start by this factor
#: before the run is called unsteady.
UNSTEADY_FACTOR = 1.3


def speed_changed(a_s: float, b_s: float) -> bool:
    """Whether two store round trips of one host differ by more than :data:`UNSTEADY_FACTOR`."""
    lo, hi = sorted((a_s, b_s))
    return lo > 0 and hi / lo > UNSTEADY_FACTOR


def unsteady(first_s: float, last_s: float) -> str | None:
    """A warning when the host's speed changed while ``calibrate`` ran (a freshly started machine can run
    its first minutes at half speed), judged by the store round trip at the start and at the end."""
    if not speed_changed(first_s, last_s):
        return None
    return (f"the host's speed changed while calibrating (store round trip {first_s * 1e6:.0f} us at the start, "
            f"{last_s * 1e6:.0f} us at the end): the in-job figures may not describe it; run calibrate again "
            "once the machine has settled")


def calibrate(*, gpu: bool = True, quick: bool = False, in_situ: bool = True) -> dict[str, Any]:
    n = 60 if quick else 300
    measured: dict[str, float] = {}
    measured.update(measure_store(n))
    measured.update(measure_rpc(n))
    measured.update(measure_dead_notice(3 if quick else 7))
    measured.update(measure_shm(n))
    measured.update(measure_writes(n))
    measured.update(measure_driver(1, n))
    if in_situ:
        measured.update(_in_situ_jobs(IN_SITU_SCENARIO, "in_situ_r", "a real job of {} ranks", quick))
    if gpu:
        measured.update(measure_gpu())
    if gpu and in_situ and "module_load_s" in measured:  # CuPy and a device are there
        measured.update(_in_situ_jobs(IN_SITU_CUDA_SCENARIO, "in_situ_cuda_r",
                                      "a real CUDA job of {} ranks sharing GPU 0", quick))
    again = measure_store(n)  # the host's speed at the end, against the first measurement
    measured["store_ping_rtt_end_s"] = again["store_ping_rtt_s"]
    note = unsteady(measured["store_ping_rtt_s"], again["store_ping_rtt_s"])
    if note:
        print(f"calibrate: warning: {note}", file=sys.stderr, flush=True)
    return _assemble(measured)


def _assemble(measured: dict[str, float]) -> dict[str, Any]:
    """A calibration file's contents from its measurements: this machine, the figures, and the simulator's
    constants derived from them."""
    machine = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "platform": platform.platform()}
    out: dict[str, Any] = {"machine": machine, "measured": {k: round(v, 12) for k, v in sorted(measured.items())},
                           "sim": derive_sim(measured)}
    by_ranks = derive_by_ranks(measured)
    if by_ranks:
        out["sim_by_ranks"] = by_ranks
    cuda_by_ranks = derive_by_ranks(measured, "in_situ_cuda_r")
    if cuda_by_ranks:
        out["sim_cuda_by_ranks"] = cuda_by_ranks
    return out


def refresh(data: dict[str, Any], *, cuda: bool = True, quick: bool = False, share: float = 1.0) -> dict[str, Any]:
    """``data`` (a calibration file's contents) with its in-job figures measured again on this host now, and
    the constants derived again; the figures of operations measured alone are kept.

    The jobs are ``calibrate``'s own (:data:`IN_SITU_SCENARIO`, and :data:`IN_SITU_CUDA_SCENARIO` where
    ``data`` has the CUDA job's figures, ``cuda`` is true and this host has CuPy and a GPU; otherwise the
    CUDA job's figures are kept, with a note on stderr), so this takes a fraction of a full calibration (about
    20 s on a 2-CPU host; the CPU and CUDA jobs 100 s on a lent H100 host, whose processes start slower).
    ``share`` below 1 runs that share of the runs (:func:`in_situ_runs`). A small host's speed drifts by a
    quarter within minutes (docs/parity.md): what a job costs is what drifts most, and this measures it again
    right before it is used. The result says which machine the kept figures came from (``refreshed_from``).
    """
    old = data.get("measured")
    if not isinstance(old, dict) or not any(k.startswith("in_situ_r") for k in old):
        raise ValueError("the calibration has no in-job figures (in_situ_r*) to measure again: "
                         "write a full one with `mooncake-real calibrate`")
    jobs = [(IN_SITU_SCENARIO, "in_situ_r", "a real job of {} ranks")]
    if cuda and any(k.startswith("in_situ_cuda_r") for k in old):
        from .gpu import cupy_or_none

        if cupy_or_none() is not None:
            jobs.append((IN_SITU_CUDA_SCENARIO, "in_situ_cuda_r", "a real CUDA job of {} ranks sharing GPU 0"))
        else:
            print("calibrate: no CuPy or no GPU here: the CUDA job's figures are kept as they were",
                  file=sys.stderr, flush=True)
    measured = dict(old)
    for scenario, job, what in jobs:
        for k in [k for k in measured if k.startswith(job) and k[len(job):][:1].isdigit()]:
            del measured[k]
        measured.update(_in_situ_jobs(scenario, job, what, quick, share))
    out = _assemble(measured)
    out["refreshed_from"] = data.get("refreshed_from") or data.get("machine")
    return out


def cmd_calibrate(args: Any) -> int:
    if args.output:  # before the measurements, not after them
        check_output(args.output, "--output")
    if getattr(args, "refresh", None):
        path = args.refresh
        if getattr(args, "no_in_situ", False):
            raise InputError(path, "--no-in-situ", "--refresh measures only the in-job figures; drop one of the two")
        try:
            old = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InputError(path, "", "calibration file not found; write one with `mooncake-real calibrate -o FILE`") from None
        except json.JSONDecodeError as exc:
            raise InputError(path, f"line {exc.lineno}", f"not valid JSON ({exc.msg}); write a new one with "
                             "`mooncake-real calibrate -o FILE`") from None
        try:
            data = refresh(old, cuda=not getattr(args, "no_gpu", False), quick=getattr(args, "quick", False))
        except ValueError as exc:
            raise InputError(path, "measured", str(exc)) from None
    else:
        data = calibrate(gpu=not getattr(args, "no_gpu", False), quick=getattr(args, "quick", False),
                         in_situ=not getattr(args, "no_in_situ", False))
    text = json.dumps(data, indent=1) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
