"""Shared by the simulator benchmarks: run a Simulation, counting the SimPy events it processed, optionally under
cProfile."""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from typing import Any


def timed_run(sim: Any, profile: bool = False) -> tuple[Any, float, int]:
    """(run record, wall seconds, SimPy events processed) of ``sim.run()``.

    Events processed = events scheduled (SimPy numbers each one it schedules) less those still queued at
    the end, read after the run: wrapping ``env.step`` to count them cost a Python call per event, 3-4% of
    a 512-rank run's wall time. A SimPy without those attributes gets the wrapper."""
    env = sim.env
    count = [0]
    numbered = hasattr(env, "_eid") and hasattr(env, "_queue")
    if not numbered:
        step = env.step

        def counted_step() -> None:
            count[0] += 1
            step()

        env.step = counted_step
    prof = cProfile.Profile() if profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    rec = sim.run()
    if prof:
        prof.disable()
    wall = time.perf_counter() - t0
    if numbered:
        count[0] = next(env._eid) - len(env._queue)
    if prof:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(int(__import__("os").environ.get("TOPN", "25")))
    return rec, wall, count[0]


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (rank counts, element counts), else a one-line usage error."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
