"""Determinism: one seed gives a byte-identical trace; another seed changes the RPC port draws."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mooncake_protocol.scenario import load_scenario
from mooncake_sim.runner import run_one

#: Small bundled scenarios with random port draws: TENT (fixed, redraw after a conflict) and classic TE.
TENT_SCENARIO = "rpc-port-conflict-fixed"
TE_SCENARIO = "unreachable-segment-fixed"


def _trace(tmp_path: Path, name: str, seed: int, tag: str) -> bytes:
    sc = dataclasses.replace(load_scenario(name), seed=seed)
    path = tmp_path / f"{name}-{seed}-{tag}.jsonl"
    run_one(sc, trace=str(path))
    return path.read_bytes()


def _bind_ports(trace: bytes) -> list[tuple[int, int, bool]]:
    out = []
    for line in trace.decode().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "mark" and rec.get("name") == "rpc_bind":
            out.append((rec["rank"], rec["data"]["port"], rec["data"]["ok"]))
    return sorted(out)


def test_same_seed_byte_identical_trace(tmp_path: Path) -> None:
    for name in (TENT_SCENARIO, TE_SCENARIO):
        a = _trace(tmp_path, name, 7, "a")
        b = _trace(tmp_path, name, 7, "b")
        assert a, f"{name}: empty trace"
        assert b'"type": "effect"' in a, f"{name}: trace holds no effect records"
        assert a == b, f"{name}: two runs with seed 7 wrote different traces"


def test_different_seed_changes_port_draws(tmp_path: Path) -> None:
    for name in (TENT_SCENARIO, TE_SCENARIO):
        p1 = _bind_ports(_trace(tmp_path, name, 1, "x"))
        p2 = _bind_ports(_trace(tmp_path, name, 2, "x"))
        assert p1 and p2
        # every rank ends with a bound port in both runs
        assert {r for r, _, ok in p1 if ok} == {r for r, _, ok in p2 if ok}
        assert [p for _, p, ok in p1 if ok] != [p for _, p, ok in p2 if ok], f"{name}: seeds 1 and 2 drew the same ports"


def test_calibrated_run_is_deterministic_and_no_file_changes_nothing(tmp_path: Path) -> None:
    """With a calibration (CPU costs, contention, measured links) one seed still gives one trace; the
    default Calibration() is the uncalibrated simulator."""
    from mooncake_sim.driver import Calibration

    cal = Calibration(effect_cpu_s=2e-5, alloc_s=5e-4, register_s=3e-4, host_cpus=2, store_one_way_s=5e-5,
                      tcp_latency_s=8e-5, tcp_bandwidth_Bps=2e9, shm_latency_s=1e-6, shm_bandwidth_Bps=1e10)
    sc = load_scenario("real-cpu-collectives")
    paths = []
    for tag, c in (("a", cal), ("b", cal), ("none", None), ("default", Calibration())):
        p = tmp_path / f"cal-{tag}.jsonl"
        run_one(sc, trace=str(p), calibration=c)
        paths.append(p.read_bytes())
    assert paths[0] == paths[1], "two calibrated runs with one seed wrote different traces"
    assert paths[2] == paths[3], "Calibration() is not the uncalibrated simulator"
    assert paths[0] != paths[2]


def test_calibrated_connections_cost_once_per_thread_and_server() -> None:
    """``rpc_connect_s``: a thread's first RPC or TCP WRITE to a server pays the connection, later ones do not."""
    from mooncake_sim.driver import Calibration, Simulation

    sc = load_scenario("real-cpu-allreduce")
    base = Calibration(host_cpus=2, transfer_threads=1, tcp_latency_s=3e-4, tcp_bandwidth_Bps=4e8)
    plain = Simulation(sc, calibration=base)
    plain.run()
    assert plain.connected == set()
    sim = Simulation(sc, calibration=dataclasses.replace(base, rpc_connect_s=1e-3))
    rec = sim.run()
    assert rec.end_reason == "completed"
    # every rank's transfer thread wrote to all four ranks' servers over TCP (itself included): four
    # connections each; a connection already open costs nothing
    transfer = sorted((r, s) for r, t, s in sim.connected if t == "transfer")
    assert [r for r, _ in transfer] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert len({s for _, s in transfer}) == 4
    assert sim.connect_cost(*next(iter(sim.connected))) == 0.0
    # connecting makes the run longer, never shorter
    assert sim.env.now > plain.env.now


def test_calibrated_store_connections_cost_once_per_thread() -> None:
    """``store_connect_s``: a thread's first store request pays the connection, later ones do not; the caller's
    connection is open from the start (real mode opens it for the start barrier)."""
    from mooncake_sim.driver import Calibration, simulate

    sc = load_scenario("real-cpu-bootstrap-2")
    base = Calibration(store_one_way_s=1e-4)

    def store_steps(cal: Calibration) -> dict[tuple[int, str], list[float]]:
        out: dict[tuple[int, str], list[float]] = {}
        for e in simulate(sc, calibration=cal, record_effects=True).effects:
            if e["effect"].startswith("Store"):
                out.setdefault((e["rank"], e["activity"]), []).append(e["t1"] - e["t0"])
        return out

    plain, connecting = store_steps(base), store_steps(dataclasses.replace(base, store_connect_s=1e-3))
    assert set(plain) == set(connecting) == {(0, "caller"), (1, "caller"), (0, "poller"), (1, "poller")}
    for key, steps in plain.items():
        extra = [b - a for a, b in zip(steps, connecting[key], strict=True)]
        first = 1e-3 if key[1] == "poller" else 0.0
        assert extra[0] == pytest.approx(first, abs=1e-9), key
        assert extra[1:] == pytest.approx([0.0] * (len(extra) - 1), abs=1e-9), key


def test_a_calibrated_run_charges_no_cpu_for_a_mark() -> None:
    """calibrate measures an effect's step up to the activity's next effect, so the real driver's time for a
    mark is inside the step of the effect before it: the simulator charges ``effect_cpu_s`` (and an effect's
    own cost) after every effect but a mark, and the marks still all happen."""
    from mooncake_sim.driver import Calibration, Simulation

    sc = load_scenario("real-cpu-allreduce")
    sim = Simulation(sc, calibration=Calibration(effect_cpu_s=1e-4), record_effects=True)
    charged: list[float] = []
    cpu = sim._cpu

    def spy(r, cost):  # type: ignore[no-untyped-def]
        charged.append(cost)
        return cpu(r, cost)

    sim._cpu = spy  # type: ignore[method-assign]
    rec = sim.run()
    assert rec.end_reason == "completed" and len(rec.marks) > 50
    assert len(charged) == len(rec.effects)  # one charge per recorded (non-mark) effect
    assert sim.effect_count > len(rec.effects) + 50  # the marks were effects of the activities all the same
