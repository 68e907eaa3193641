"""Fast-forward over a steady stretch of identical chunks (``SteadyState``): the skipped run must tell the
same story as the detailed one (verdict, phase, transports) with the collective's simulated time within
0.5 %, and it must not happen where it could hide anything (payload values, scripted faults)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mooncake_protocol.collectives import STEADY_AFTER_CHUNKS, chunk_bytes
from mooncake_protocol.scenario import load_scenario
from mooncake_sim.driver import Simulation
from mooncake_sim.runner import run_one

SCENARIO = """\
name: ff-{tag}
description: 8 ranks, one allreduce of {chunks} chunks (fast-forward test).
topology: {topology}
ranks: 8
backend: {backend}
engine: tent
policy: fixed
data: {data}
workload:
  - {{op: allreduce, dtype: int32, count: {count}, reduce_op: sum}}
{faults}deadlines: {{bootstrap_s: 60, collective_s: 600, stall_s: 10}}
expect: {{verdict: completed, phase: done}}
"""


def _scenario(tmp_path: Path, tag: str, *, backend: str = "cuda", data: str = "sizes", chunks: int = 20,
              faults: str = "") -> Any:
    count = chunks * chunk_bytes(8) // 4
    topology = "hgx-h100" if backend == "cuda" else "cpu-host"
    path = tmp_path / f"ff-{tag}.yaml"
    path.write_text(SCENARIO.format(tag=tag, chunks=chunks, topology=topology, backend=backend, data=data,
                                    count=count, faults=faults))
    return load_scenario(str(path))


def _skippable(chunks: int) -> int:
    same = chunks - 1 - STEADY_AFTER_CHUNKS
    return same - same % 2


def _collective_s(o: Any) -> float:
    return float(o.phase_times_s["collective"])


@pytest.mark.parametrize("backend", ["cuda", "cpu"])
def test_fast_forward_matches_detailed_run(tmp_path: Path, backend: str) -> None:
    sc = _scenario(tmp_path, backend, backend=backend)
    fast = run_one(sc)
    slow = run_one(sc, fast_forward=False)
    assert fast.verdict == slow.verdict == "completed"
    assert fast.matches and slow.matches
    assert slow.stats["chunks_fast_forwarded"] == 0
    # the first chunks in detail, then all but the last one skipped in pairs
    assert fast.stats["chunks_fast_forwarded"] == _skippable(20)
    assert fast.stats["writes"] < slow.stats["writes"] / 2
    assert fast.transports == slow.transports
    a, b = _collective_s(fast), _collective_s(slow)
    assert abs(a - b) <= 0.005 * b, f"fast-forwarded collective {a:.6f} s vs detailed {b:.6f} s"


def test_fast_forward_is_marked_on_every_rank(tmp_path: Path) -> None:
    sim = Simulation(_scenario(tmp_path, "marks"))
    sim.run()
    ff = [m for m in sim.marks if m["name"] == "fast_forward"]
    assert sorted(m["rank"] for m in ff) == list(range(8))
    assert {m["data"]["chunks"] for m in ff} == {_skippable(20)}
    assert all(m["data"]["period_us"] > 0 for m in ff)


def test_no_fast_forward_with_values_or_faults(tmp_path: Path) -> None:
    # payload values would be lost in skipped chunks; a scripted fault could fire inside the stretch
    values = Simulation(_scenario(tmp_path, "values", data="values", chunks=16))
    assert not values._ff_eligible(values.ranks[0])
    faulty = _scenario(tmp_path, "faults", faults="faults:\n  - {kind: delay_store, seconds: 0.001}\n")
    o = run_one(faulty)
    assert o.verdict == "completed"
    assert o.stats["chunks_fast_forwarded"] == 0


def test_short_collective_is_never_offered(tmp_path: Path) -> None:
    o = run_one(_scenario(tmp_path, "short", chunks=8))
    assert o.verdict == "completed"
    assert o.stats["chunks_fast_forwarded"] == 0
