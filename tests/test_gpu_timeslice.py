"""The GPU model's time-slicing between processes sharing one GPU (``mooncake_sim/gpu.py``, calibration
``gpu_timeslice_s``): the waits ``benchmarks/probe_timeslice.py --jitter`` measured on an H100."""

from __future__ import annotations

import pytest
import simpy

from mooncake_sim.gpu import GpuModel, Op

T = 2.25e-3


def _model(timeslice: float | None, devices: dict[int, str]) -> GpuModel:
    env = simpy.Environment()
    m = GpuModel(env, lambda _rank: None, devices.__getitem__, seed="test")
    m.timeslice_s = timeslice
    return m


def _hold(m: GpuModel, rank: int) -> Op:
    """A resident kernel of ``rank`` (a spin kernel that stays until released)."""
    op = m.context(rank).enqueue(Op("spin", "compute", 0.0, "spin", kernel="spin"))
    m.env.run(until=m.env.now + 1e-4)
    assert op.started
    return op


def _start_delay(m: GpuModel, rank: int, sm: bool = True) -> float:
    """How long a 1 us op of ``rank`` submitted now waits before it starts."""
    t0 = m.env.now
    op = m.context(rank).enqueue(Op("memcpy", "transfer", 1e-6, "copy", sm=sm))
    m.env.run(until=op.done)
    return op.start_t - t0


def test_without_a_time_slice_nothing_waits() -> None:
    m = _model(None, {0: "g", 1: "g", 2: "g"})
    _hold(m, 1)
    _hold(m, 2)
    assert _start_delay(m, 0) < 2e-5  # the start latency only
    assert m.slice_waits == 0


def test_waits_follow_the_measured_rules() -> None:
    m = _model(T, {0: "g", 1: "g", 2: "g", 3: "g", 9: "other"})
    _hold(m, 1)
    # an idle context beside one busy context starts at once
    assert _start_delay(m, 0) < 2e-5
    _hold(m, 2)
    # beside two busy contexts: T + uniform 0..2T
    idle = [_start_delay(m, 0) for _ in range(40)]
    assert all(T <= d <= 3 * T + 2e-5 for d in idle)
    assert max(idle) - min(idle) > T / 2  # drawn, not a constant
    # with a kernel of its own resident: its next slice, uniform 0..3T
    _hold(m, 0)
    busy = [_start_delay(m, 0) for _ in range(40)]
    assert all(0 <= d <= 3 * T + 2e-5 for d in busy)
    assert min(busy) < T and max(busy) > T
    # copies to or from host memory run on the copy engines; another GPU's context is not in the rotation
    assert _start_delay(m, 0, sm=False) < 2e-5
    assert _start_delay(m, 9) < 2e-5


def test_work_queued_behind_finished_sm_work_runs_on_in_that_slice() -> None:
    """probe_timeslice's burst3: three SM steps queued back to back wait as long as one. Only the first step
    of a queue draws a wait; a step submitted later (not queued behind one finishing) draws its own."""
    m = _model(T, {0: "g", 1: "g", 2: "g", 3: "g"})
    for rank in (1, 2, 3):
        _hold(m, rank)
    _hold(m, 0)  # its own kernel resident too: every step waits for its next slice, 0..4T
    ctx = m.context(0)
    t0 = m.env.now
    ops = [ctx.enqueue(Op("memcpy", "tail", 1e-6, f"step {i}", sm=True)) for i in range(3)]
    m.env.run(until=ops[-1].done)
    waits = m.slice_waits
    assert waits <= 1  # the first step's draw (it may be 0.0) and nothing for the two queued behind it
    assert ops[1].start_t == ops[0].start_t + 1e-6 and ops[2].start_t == ops[1].start_t + 1e-6
    assert ops[-1].start_t - t0 <= 4 * T + 1e-4
    later = [_start_delay(m, 0) for _ in range(20)]  # submitted one at a time: each draws its own wait
    assert m.slice_waits - waits >= 15 and max(later) > T


def test_a_released_spin_kernel_ends_at_its_next_slice() -> None:
    m = _model(T, {0: "g", 1: "g"})
    _hold(m, 1)
    ctx = m.context(0)
    op = _hold(m, 0)
    ctx.spins[(7, 0)] = op
    t0 = m.env.now
    ctx.release_spin((7, 0), noticed=False)
    m.env.run(until=op.done)
    assert 0 <= m.env.now - t0 <= 2 * T
    # its own timeout ends it at once
    op2 = _hold(m, 0)
    ctx.spins[(7, 1)] = op2
    t1 = m.env.now
    ctx.release_spin((7, 1), noticed=True)
    m.env.run(until=op2.done)
    assert m.env.now == t1


def test_the_draws_repeat_with_the_seed() -> None:
    def waits() -> list[float]:
        m = _model(T, {0: "g", 1: "g", 2: "g"})
        _hold(m, 1)
        _hold(m, 2)
        return [_start_delay(m, 0) for _ in range(5)]

    assert waits() == waits()


@pytest.mark.parametrize("name,waits_expected", [("cuda-collectives-1gpu", True), ("lazy-kernel-load-1gpu", False)])
def test_time_slicing_changes_the_timing_not_the_story(name: str, waits_expected: bool) -> None:
    """Ranks sharing one GPU: with a time slice the collective takes longer, while the canonical trace,
    verdict and cause stay those of the run without (and a run repeats itself). In the lazy-kernel-load hang
    no SM step waits: each rank's spin kernel is queued behind its send-buffer copy and runs on in its slice,
    and the reduce kernel never starts."""
    from mooncake_protocol.canonical import canonical
    from mooncake_protocol.outcome import evaluate
    from mooncake_protocol.scenario import load_scenario
    from mooncake_sim.driver import Calibration, Simulation

    sc = load_scenario(name)

    def run(cal: Calibration) -> tuple[dict[str, object], float, int]:
        sim = Simulation(sc, calibration=cal)
        rec = sim.run()
        out = evaluate(rec, sc).to_json()
        spans = [p["done"] - p["collective"] for p in rec.phase_times.values() if "collective" in p and "done" in p]
        return canonical(rec.marks, out), max(spans, default=rec.sim_time_s), sim.gpu.slice_waits

    plain, t_plain, waits_plain = run(Calibration())
    sliced, t_sliced, waits = run(Calibration(gpu_timeslice_s=T))
    assert sliced == plain
    assert waits_plain == 0 and (waits > 0) == waits_expected
    assert t_sliced > t_plain if waits_expected else t_sliced == t_plain
    assert run(Calibration(gpu_timeslice_s=T))[1] == t_sliced
