"""The top-level activity of one rank: construct the backend, then run the workload.

``rank_main(env)`` is what both drivers run as the rank's "caller" activity (the user's thread in
PyTorch). Phases are announced with ``phase`` marks: bootstrap -> warmup -> collective -> done.
"""

from __future__ import annotations

from .backend import construct, new_process
from .effects import Activity, mark
from .rankenv import RankEnv


def rank_main(env: RankEnv) -> Activity:
    proc = new_process(env)
    yield mark("phase", phase="bootstrap")
    groups = []
    for g in range(max(1, env.concurrent_groups)):
        b = yield from construct(proc, group=g)
        groups.append(b)
    proc.engine.phase = "collective"
    yield mark("phase", phase="collective")
    if env.workload:
        from .collectives import run_workload

        yield from run_workload(groups)
    proc.stopping = True
    yield mark("phase", phase="done")
