"""Real-mode benchmark: start-up of ``mooncake-real run`` next to torch.distributed gloo; GPU allreduce busbw.

CPU part (always): wall time of ``mooncake-real run SCENARIO`` for 2, 4 and 8 ranks of the CPU backend
(bootstrap plus a first int32 allreduce), measured around the CLI process, so it counts what a user
waits for: interpreter start, imports, the store, spawning the ranks, bootstrap, the collective, the
release and the clean-up. Next to it, when torch imports: the same number of ranks brought up with
``torch.multiprocessing.spawn`` + ``init_process_group("gloo")`` over a TCP store + one allreduce +
``destroy_process_group``, measured the same way (a fresh interpreter running the spawn).

GPU part (only with CuPy and a CUDA device): allreduce bus bandwidth of 4 ranks sharing GPU 0
(``topologies/h100-1gpu.yaml``, explicit placement, ``data: sizes``) for 1 MiB .. 256 MiB:
``busbw = 2 * (n - 1) / n * bytes / time``, where time is one allreduce from the first rank's
``collective_start`` to the last rank's ``collective_done`` (median of the repetitions after a warm-up).

    PYTHONPATH=. python benchmarks/bench_real.py                 # 2, 4, 8 ranks, 3 repetitions; GPU if present
    PYTHONPATH=. python benchmarks/bench_real.py 4 --reps 5      # chosen sizes
    PYTHONPATH=. python benchmarks/bench_real.py --no-gloo --no-gpu
    PYTHONPATH=. python benchmarks/bench_real.py --gpu-only --gpu-sizes 1,16,256 --gpu-reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _simrun import positive_int  # noqa: E402  (benchmarks/ is on sys.path when a script runs)

REPO = str(Path(__file__).resolve().parent.parent)

CPU_SCENARIO = """\
name: bench-real-cpu-{n}
description: benchmark only; {n} CPU-backend ranks, bootstrap and one int32 allreduce.
topology: cpu-host
ranks: {n}
backend: cpu
engine: tent
policy: fixed
workload:
  - {{op: allreduce, dtype: int32, count: 1, reduce_op: sum, input: "rank + 1", expect: [{total}]}}
deadlines: {{bootstrap_s: 30, collective_s: 30, stall_s: 10}}
expect: {{verdict: completed, phase: done, cause: null}}
"""

GPU_SCENARIO = """\
name: bench-real-gpu-allreduce
description: benchmark only; 4 ranks sharing GPU 0, float32 allreduces of {sizes} MiB ({reps} each).
topology: {topology}
ranks: 4
backend: cuda
engine: tent
policy: fixed
placement:
  - {{host: dev0, gpu: 0}}
  - {{host: dev0, gpu: 0}}
  - {{host: dev0, gpu: 0}}
  - {{host: dev0, gpu: 0}}
data: sizes
workload:
{workload}
deadlines: {{bootstrap_s: 60, collective_s: 60, stall_s: 30}}
expect: {{verdict: completed, phase: done, cause: null}}
"""


def _env() -> dict[str, str]:
    pp = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=REPO + (os.pathsep + pp if pp else ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------- mooncake-real


def run_real(scenario: Path, timeout: float = 300.0, trace: Path | None = None) -> tuple[float, dict[str, Any]]:
    """(wall seconds of the CLI process, its --json outcome)."""
    cmd = [sys.executable, "-m", "mooncake_real.cli", "run", str(scenario), "--json"]
    if trace is not None:
        cmd += ["--trace", str(trace)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=REPO)
    wall = time.perf_counter() - t0
    try:
        out = json.loads(p.stdout)
    except ValueError:
        raise RuntimeError(f"mooncake-real run failed (exit {p.returncode}): {p.stderr[-2000:]}") from None
    if not out.get("matches_expect"):
        blocked = "; ".join(f"rank {b['rank']} {b['activity']}: {b['effect']}: {b['what']}" for b in out.get("blocked", [])[:6])
        raise RuntimeError(f"{scenario.name}: {out.get('verdict')} {out.get('cause')}: {out.get('mismatches')}\n"
                           f"  diagnosis: {out.get('diagnosis', {}).get('explanation')}\n  phases: "
                           f"{out.get('phase_times_s')}\n  blocked: {blocked}")
    return wall, out


# ---------------------------------------------------------------------------------- gloo


def _gloo_worker(rank: int, n: int, port: int) -> None:  # pragma: no cover - runs in spawned children
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n)
    t = torch.tensor([rank + 1], dtype=torch.int32)
    dist.all_reduce(t)
    assert int(t.item()) == n * (n + 1) // 2, t
    dist.destroy_process_group()


def gloo_child(n: int) -> int:
    """Body of ``bench_real.py --gloo-child N``: spawn N gloo ranks, one allreduce, exit."""
    import torch.multiprocessing as mp

    mp.spawn(_gloo_worker, args=(n, _free_port()), nprocs=n, join=True)
    return 0


def torch_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("torch") is not None
    except Exception:
        return False


def run_gloo(n: int, timeout: float = 300.0) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--gloo-child", str(n)], capture_output=True,
                       text=True, timeout=timeout, env=_env(), cwd=REPO)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"gloo run with {n} ranks failed: {p.stderr[-2000:]}")
    return wall


# ---------------------------------------------------------------------------------- CPU table


def cpu_part(sizes: list[int], reps: int, gloo: bool) -> None:
    gloo = gloo and torch_available()
    print(f"CPU start-up: `mooncake-real run` (bootstrap + one allreduce), {reps} runs each, wall seconds "
          f"(median / min){'' if gloo else '; gloo column skipped (torch not importable)'}", flush=True)
    head = f"{'ranks':>5}  {'mooncake-real':>17}  {'in-run end':>10}  {'bootstrap':>9}  {'warmup':>8}  {'collective':>10}"
    if gloo:
        head += f"  {'gloo (spawn+init+allreduce)':>28}  {'ratio':>6}"
    print(head)
    with tempfile.TemporaryDirectory(prefix="bench-real-") as td:
        for n in sizes:
            f = Path(td) / f"bench-real-cpu-{n}.yaml"
            f.write_text(CPU_SCENARIO.format(n=n, total=n * (n + 1) // 2))
            walls, outs = [], []
            for _ in range(reps):
                w, o = run_real(f)
                walls.append(w)
                outs.append(o)
            best = outs[walls.index(min(walls))]
            ph = best["phase_times_s"]
            row = (f"{n:>5}  {statistics.median(walls):>8.2f} / {min(walls):>5.2f}  {best['sim_time_s']:>10.3f}  "
                   f"{ph.get('bootstrap', 0):>9.3f}  {ph.get('warmup', 0):>8.3f}  {ph.get('collective', 0):>10.3f}")
            if gloo:
                g = [run_gloo(n) for _ in range(reps)]
                row += f"  {statistics.median(g):>19.2f} / {min(g):>5.2f}  {statistics.median(walls) / statistics.median(g):>6.2f}"
            print(row, flush=True)
    print("  in-run end: seconds from the launcher's start to the last rank's caller finishing (as measured by the"
          " run); bootstrap/warmup/collective: the outcome's phase_times_s")


# ---------------------------------------------------------------------------------- GPU table


def gpu_present() -> str | None:
    """None when CuPy sees a CUDA device, else why not."""
    try:
        import cupy

        if int(cupy.cuda.runtime.getDeviceCount()) < 1:
            return "no CUDA device"
    except BaseException as exc:  # noqa: BLE001 - any failure means no GPU part
        return f"{type(exc).__name__}: {exc}"
    return None


def _per_collective_times(trace: Path) -> dict[int, float]:
    start: dict[int, float] = {}
    done: dict[int, float] = {}
    with open(trace) as f:
        for line in f:
            if '"collective_' not in line:
                continue
            rec = json.loads(line)
            if rec.get("type") != "mark":
                continue
            i = int(rec["data"].get("index", -1))
            if rec["name"] == "collective_start":
                start[i] = min(start.get(i, float("inf")), float(rec["t"]))
            elif rec["name"] == "collective_done":
                done[i] = max(done.get(i, 0.0), float(rec["t"]))
    return {i: done[i] - start[i] for i in start if i in done}


def gpu_part(sizes_mib: list[int], reps: int) -> None:
    why = gpu_present()
    if why is not None:
        print(f"GPU part skipped: {why}")
        return
    n = 4
    workload = []
    plan = []
    for mib in sizes_mib:
        count = mib * (1 << 20) // 4
        for r in range(reps + 1):  # the first of each size is a warm-up
            plan.append((mib, r == 0))
            workload.append(f"  - {{op: allreduce, dtype: float32, count: {count}, reduce_op: sum}}")
    topo = str(Path(REPO) / "topologies" / "h100-1gpu.yaml")
    text = GPU_SCENARIO.format(sizes=",".join(map(str, sizes_mib)), reps=reps, topology=topo,
                               workload="\n".join(workload))
    with tempfile.TemporaryDirectory(prefix="bench-real-gpu-") as td:
        f = Path(td) / "bench-real-gpu.yaml"
        f.write_text(text)
        trace = Path(td) / "trace.jsonl"
        try:
            wall, out = run_real(f, timeout=600, trace=trace)
        except Exception as exc:  # a failed GPU run must still print what happened
            print(f"GPU part failed: {exc}")
            return
        times = _per_collective_times(trace)
    print(f"\nGPU allreduce, {n} ranks sharing GPU 0 (float32 sum, data: sizes), {reps} timed runs per size after "
          f"one warm-up; run wall {wall:.1f} s")
    print(f"{'size':>8}  {'time (median)':>13}  {'time (min)':>10}  {'algbw GB/s':>10}  {'busbw GB/s':>10}")
    by_size: dict[int, list[float]] = {}
    for i, (mib, warm) in enumerate(plan):
        if not warm and i in times:
            by_size.setdefault(mib, []).append(times[i])
    for mib in sizes_mib:
        ts = by_size.get(mib)
        if not ts:
            print(f"{mib:>5} MiB  {'(no timing)':>13}")
            continue
        nbytes = mib * (1 << 20)
        med = statistics.median(ts)
        alg = nbytes / med / 1e9
        bus = 2 * (n - 1) / n * alg
        print(f"{mib:>5} MiB  {med * 1e3:>10.3f} ms  {min(ts) * 1e3:>7.3f} ms  {alg:>10.2f}  {bus:>10.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sizes", nargs="*", type=positive_int, default=[2, 4, 8], help="rank counts of the CPU part")
    ap.add_argument("--reps", type=int, default=3, help="runs per size (CPU part)")
    ap.add_argument("--no-gloo", action="store_true", help="skip the torch gloo column")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU part")
    ap.add_argument("--gpu-only", action="store_true", help="run only the GPU part")
    ap.add_argument("--gpu-sizes", default="1,4,16,64,256", help="MiB sizes of the GPU part (comma separated)")
    ap.add_argument("--gpu-reps", type=int, default=3, help="timed allreduces per size (GPU part)")
    ap.add_argument("--gloo-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.gloo_child is not None:
        return gloo_child(args.gloo_child)
    if not args.gpu_only:
        cpu_part(args.sizes, args.reps, not args.no_gloo)
    if not args.no_gpu:
        gpu_part([int(x) for x in args.gpu_sizes.split(",") if x], args.gpu_reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
