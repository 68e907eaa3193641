"""Shared by the simulator benchmarks: run a Simulation, counting SimPy events, optionally under cProfile."""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from typing import Any


def timed_run(sim: Any, profile: bool = False) -> tuple[Any, float, int]:
    """(run record, wall seconds, SimPy events processed) of ``sim.run()``."""
    env = sim.env
    count = [0]
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
    if prof:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(int(__import__("os").environ.get("TOPN", "25")))
    return rec, wall, count[0]
