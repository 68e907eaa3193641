"""GPU time-slicing probe: what a process's small GPU steps cost while other processes keep kernels resident.

Ranks that share one GPU each run their own CUDA context, and during a collective every rank keeps a spin
kernel resident until the host clears its flag. Without MPS the GPU runs one context at a time and switches
between contexts that have work (time-slicing). This probe measures, on GPU 0, with 0, 1 and 3 other
processes each holding one spinning kernel (a single thread that reads ``%globaltimer`` until its time is
up: every kernel here ends by itself, at most ``--hold`` seconds after launch):

* ``launch``: an empty kernel launched and waited for (``stream.synchronize``);
* ``d2h``: a 4-byte device-to-host ``cudaMemcpyAsync`` and its wait (``d2d``: device to device);
* ``burst3``: three SM steps queued back to back on one stream (a device-to-device copy, an empty kernel,
  another copy) and one wait for all: whether steps that follow each other share a slice, as a
  collective's tail (memset, reduce kernel, copy out) does once its spin kernel ends;
* ``load``: a module (one empty kernel, new each step) loaded from CuPy's disk cache, compiled beforehand by
  another process: what a lazily loaded kernel's first launch costs (the spin kernel's, a reduce kernel's);
* ``flag``: the collective's pattern: a spin kernel of this process polls a mapped host flag; the host
  clears it and waits for the kernel to end (time from the clear to the end of the wait), 2 ms after the
  launch (``flag``) and once the kernel has long been resident (``resident_flag``).

With ``--own`` each case is measured again with a kernel of this process resident as well (on another
stream, as a rank's spin kernel is during a collective). Back-to-back steps start in lockstep with the
slices (each begins right after the last one's wait); ``--jitter MS`` sleeps a random 0..MS ms (seeded)
before each ``launch``, ``d2d`` and ``burst3`` step instead, so those steps arrive at random phases of the rotation.
It prints, per case, the mean, 10th percentile, median, 90th percentile and maximum over ``--reps``
repetitions (milliseconds), and with ``--json`` the raw samples.

    python benchmarks/probe_timeslice.py [--others 0 1 3] [--own] [--reps 40] [--hold 4] [--jitter 0] [--json]

Needs CuPy and a CUDA GPU; exits 2 with one line when there is none.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import statistics
import sys
import time
from typing import Any

from mooncake_real.calibrate import HOLD_KERNEL  # hold(ns): spins on the GPU's clock until ns have passed

HOLD_SOURCE = HOLD_KERNEL + r"""
extern "C" __global__ void empty() {}
extern "C" __global__ void flag_spin(volatile int* flag, unsigned long long timeout_ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    while (*flag == 1) {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
        if (now - start > timeout_ns) { *flag = 3; return; }
    }
}
"""
FLAG_TIMEOUT_S = 1.0  # a flag spin that is never cleared ends by itself after this
#: ``load``: a module of one empty kernel, distinct per step (``{tag}``), compiled beforehand into CuPy's disk
#: cache by another process, so the step is what a rank's lazy first launch pays: read the cubin, load it
LOAD_SOURCE = 'extern "C" __global__ void cold_{tag}() {{}}\n'


def _warm(tags: list[str]) -> None:
    """Another process: compile every ``load`` module into CuPy's disk cache (NVRTC runs here, not in the probe)."""
    import cupy as cp

    for tag in tags:
        cp.RawModule(code=LOAD_SOURCE.format(tag=tag)).get_function(f"cold_{tag}")


def _holder(device: int, hold_s: float, ready: Any, go: Any) -> None:
    """Another process: load the kernel, wait for the start, keep one spinning kernel resident for ``hold_s``."""
    import cupy as cp

    cp.cuda.Device(device).use()
    mod = cp.RawModule(code=HOLD_SOURCE)
    hold = mod.get_function("hold")
    stream = cp.cuda.Stream(non_blocking=True)
    hold((1,), (1,), (cp.uint64(1000),), stream=stream)  # loaded and run once before the start
    stream.synchronize()
    ready.set()
    go.wait(30)
    hold((1,), (1,), (cp.uint64(int(hold_s * 1e9)),), stream=stream)
    stream.synchronize()


def _stats(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {"mean_ms": statistics.fmean(s) * 1e3, "median_ms": statistics.median(s) * 1e3,
            "p10_ms": s[int(0.1 * (len(s) - 1))] * 1e3, "p90_ms": s[int(0.9 * (len(s) - 1))] * 1e3, "max_ms": s[-1] * 1e3}


def measure(cp: Any, device: int, others: int, reps: int, hold_s: float, own: bool = False,
            jitter_s: float = 0.0, seed: int = 0, load_tags: list[str] | None = None) -> dict[str, list[float]]:
    import numpy as np

    rng = random.Random(seed)

    ctx = mp.get_context("spawn")
    go = ctx.Event()
    readies = [ctx.Event() for _ in range(others)]
    procs = [ctx.Process(target=_holder, args=(device, hold_s, readies[i], go), daemon=True) for i in range(others)]
    for p in procs:
        p.start()
    try:
        for e in readies:
            if not e.wait(120):
                raise RuntimeError("a holder process did not start in 120 s")
        mod = cp.RawModule(code=HOLD_SOURCE)
        empty, flag_spin = mod.get_function("empty"), mod.get_function("flag_spin")
        stream = cp.cuda.Stream(non_blocking=True)
        flag = np.zeros(16, dtype=np.int32)
        cp.cuda.runtime.hostRegister(flag.ctypes.data, flag.nbytes, 3)  # portable | mapped
        get_ptr = getattr(cp.cuda.runtime, "hostGetDevicePointer", None)  # not in every CuPy; with unified
        dev_flag = int(get_ptr(flag.ctypes.data, 0)) if get_ptr else flag.ctypes.data  # addressing: the same
        small, small2 = cp.zeros(1, dtype=cp.int32), cp.zeros(1, dtype=cp.int32)
        host = np.zeros(1, dtype=np.int32)
        empty((1,), (1,), (), stream=stream)  # loaded before timing
        stream.synchronize()
        go.set()
        if own:  # this process keeps a kernel resident too, on a stream of its own (as its spin kernel does)
            own_stream = cp.cuda.Stream(non_blocking=True)
            mod.get_function("hold")((1,), (1,), (cp.uint64(int(hold_s * 0.9 * 1e9)),), stream=own_stream)
        time.sleep(0.05 if others or own else 0.0)  # the kernels are resident
        out: dict[str, list[float]] = {"launch": [], "d2h": [], "d2d": [], "burst3": [], "flag": [], "load": []}
        t_end = time.monotonic() + hold_s * 0.8
        for rep in range(reps):
            if (others or own) and time.monotonic() > t_end:
                break  # only while the held kernels are still resident
            if jitter_s:
                time.sleep(rng.uniform(0.0, jitter_s))
            t0 = time.perf_counter()
            empty((1,), (1,), (), stream=stream)
            stream.synchronize()
            out["launch"].append(time.perf_counter() - t0)
            if load_tags:  # none with a kernel of its own resident: a load would wait for it (lazy-loading-probe)
                if jitter_s:
                    time.sleep(rng.uniform(0.0, jitter_s))
                t0 = time.perf_counter()
                cp.RawModule(code=LOAD_SOURCE.format(tag=load_tags[rep])).get_function(f"cold_{load_tags[rep]}")
                out["load"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            cp.cuda.runtime.memcpyAsync(host.ctypes.data, small.data.ptr, 4, 2, stream.ptr)  # D2H
            stream.synchronize()
            out["d2h"].append(time.perf_counter() - t0)
            if jitter_s:
                time.sleep(rng.uniform(0.0, jitter_s))
            t0 = time.perf_counter()
            cp.cuda.runtime.memcpyAsync(small2.data.ptr, small.data.ptr, 4, 3, stream.ptr)  # D2D
            stream.synchronize()
            out["d2d"].append(time.perf_counter() - t0)
            if jitter_s:
                time.sleep(rng.uniform(0.0, jitter_s))
            t0 = time.perf_counter()  # three SM steps queued back to back on one stream, as a collective's tail
            cp.cuda.runtime.memcpyAsync(small2.data.ptr, small.data.ptr, 4, 3, stream.ptr)
            empty((1,), (1,), (), stream=stream)
            cp.cuda.runtime.memcpyAsync(small.data.ptr, small2.data.ptr, 4, 3, stream.ptr)
            stream.synchronize()
            out["burst3"].append(time.perf_counter() - t0)
            flag[0] = 1
            flag_spin((1,), (1,), (cp.uint64(dev_flag), cp.uint64(int(FLAG_TIMEOUT_S * 1e9))), stream=stream)
            time.sleep(0.002)  # the kernel gets going (or queued behind the others' time slices)
            t0 = time.perf_counter()
            flag[0] = 0
            stream.synchronize()
            out["flag"].append(time.perf_counter() - t0)
            if flag[0] == 3:
                out.setdefault("flag_timed_out", []).append(1.0)
        # a spin kernel already resident (started long ago) sees its flag cleared: until the end of its wait
        resident = cp.cuda.Stream(non_blocking=True)
        dev_flag2 = dev_flag + 16
        for _ in range(max(1, reps // 3)):
            if (others or own) and time.monotonic() > t_end:
                break
            flag[4] = 1
            flag_spin((1,), (1,), (cp.uint64(dev_flag2), cp.uint64(int(FLAG_TIMEOUT_S * 1e9))), stream=resident)
            time.sleep(0.003 * (others + 2) + 0.005)  # well past the launch wait: it is resident and spinning
            t0 = time.perf_counter()
            flag[4] = 0
            resident.synchronize()
            out.setdefault("resident_flag", []).append(time.perf_counter() - t0)
            if flag[4] == 3:
                out.setdefault("flag_timed_out", []).append(1.0)
        if own:
            own_stream.synchronize()
        cp.cuda.runtime.hostUnregister(flag.ctypes.data)
        return out
    finally:
        go.set()
        for p in procs:
            p.join(hold_s + 30)
            if p.is_alive():
                p.terminate()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--others", type=int, nargs="*", default=[0, 1, 3], help="other processes holding a kernel")
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--hold", type=float, default=4.0, help="seconds each other process's kernel stays resident")
    ap.add_argument("--device", type=int, default=0)
    ap.add_argument("--own", action="store_true", help="also measure with a kernel of this process resident")
    ap.add_argument("--jitter", type=float, default=0.0, metavar="MS",
                    help="sleep a random 0..MS ms before each launch and d2d step (default 0: back to back)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the --jitter draws")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    try:
        import cupy as cp

        cp.cuda.Device(a.device).use()
        cp.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001
        print(f"probe_timeslice: no usable CUDA GPU ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    results = {}
    cases = [(own, k) for own in ((False, True) if a.own else (False,)) for k in a.others]
    nonce = f"{time.time_ns():x}"  # new modules each run: nothing of this process's memory cache is reused
    # the load step runs only without a kernel of this process resident (behind one, a load waits for it to end)
    tags = {case: [f"{nonce}_{case[1]}_{i}" for i in range(a.reps)] for case in cases if not case[0]}
    warm = mp.get_context("spawn").Process(target=_warm, args=([t for ts in tags.values() for t in ts],))
    warm.start()
    warm.join(600)
    if warm.exitcode != 0:
        print(f"probe_timeslice: compiling the load step's modules failed (exit {warm.exitcode})", file=sys.stderr)
        return 1
    for own, k in cases:
        samples = measure(cp, a.device, k, a.reps, a.hold, own, a.jitter / 1e3, a.seed, tags.get((own, k)))
        results[f"others={k} own={int(own)}"] = samples
        row = "  ".join(f"{name} {s['mean_ms']:.2f}/{s['p10_ms']:.2f}/{s['median_ms']:.2f}/{s['p90_ms']:.2f}/{s['max_ms']:.2f}"
                        for name, xs in samples.items() if name != "flag_timed_out" and xs for s in [_stats(xs)])
        timed_out = len(samples.get("flag_timed_out", []))
        print(f"others {k}, own kernel {'resident' if own else 'none'}: n={len(samples['launch'])}  "
              f"(ms mean/p10/median/p90/max)  {row}" + (f"  flag spins timed out: {timed_out}" if timed_out else ""),
              flush=True)
    if a.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
